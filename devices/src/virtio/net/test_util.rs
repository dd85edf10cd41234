//! What the virtio-net tests share: a device as a Linux driver leaves it, guest-side
//! views of its queues, sinks and frame sources that record or fail.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::rx::FrameSource;
use super::{NetResources, NetSink, VirtioNet, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS};
use crate::bus::BusDevice;
use crate::pci::msix::RecordingMsi;
use crate::tap::VNET_HDR_LEN;
use crate::virtio::pci::tests::{enable_msix, mem, negotiate, r, w, BAR};
use crate::GuestMem;

pub(super) const MAC: [u8; 6] = [0x02, 0x54, 0x57, 0x49, 0x4e, 0x01];

#[derive(Clone, Default)]
pub(super) struct Recorder(pub(super) Arc<Mutex<Vec<Vec<u8>>>>);
impl NetSink for Recorder {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.0.lock().unwrap().push(frame.to_vec());
        Ok(())
    }
}

pub(super) struct Failing;
impl NetSink for Failing {
    fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EIO))
    }
}

pub(super) struct Frames(pub(super) RefCell<VecDeque<Vec<u8>>>);
impl FrameSource for Frames {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let f = self
            .0
            .borrow_mut()
            .pop_front()
            .ok_or(io::ErrorKind::WouldBlock)?;
        // The TAP puts a (here garbage) vnet header first.
        buf[..VNET_HDR_LEN].fill(0xee);
        buf[VNET_HDR_LEN..VNET_HDR_LEN + f.len()].copy_from_slice(&f);
        Ok(VNET_HDR_LEN + f.len())
    }
}

/// A guest-side view of one split queue at `base` (desc, avail +0x1000, used +0x2000).
pub(crate) struct GuestQueue {
    pub(crate) mem: GuestMem,
    base: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl GuestQueue {
    pub(crate) fn new(mem: &GuestMem, base: u64, size: u16) -> Self {
        Self {
            mem: mem.clone(),
            base,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }
    pub(crate) fn program(&self, dev: &mut impl BusDevice, q: u16, vector: u16) {
        w(dev, 0x16, 2, u64::from(q));
        w(dev, 0x18, 2, u64::from(self.size));
        w(dev, 0x1a, 2, u64::from(vector));
        w(dev, 0x20, 8, self.base);
        w(dev, 0x28, 8, self.base + 0x1000);
        w(dev, 0x30, 8, self.base + 0x2000);
        w(dev, 0x1c, 2, 1);
    }
    /// Adds a chain of (addr, len, writable) buffers and makes it available.
    pub(crate) fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, (addr, len, wr)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            let d = self.base + u64::from(idx) * 16;
            let mut flags = if *wr { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.mem.write_obj(*addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(*len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(idx + 1, GuestAddress(d + 14)).unwrap();
            self.next_desc = (self.next_desc + 1) % self.size;
        }
        let slot = self.base + 0x1000 + 4 + u64::from(self.avail_idx % self.size) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.base + 0x1002))
            .unwrap();
        head
    }
    pub(crate) fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.base + 0x2002)).unwrap()
    }
    pub(crate) fn used(&self, i: u16) -> (u32, u32) {
        let e = self.base + 0x2004 + u64::from(i % self.size) * 8;
        (
            self.mem.read_obj(GuestAddress(e)).unwrap(),
            self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
        )
    }
}

pub(super) struct Setup {
    pub(super) dev: VirtioNet,
    pub(super) msi: Arc<RecordingMsi>,
    pub(super) mem: GuestMem,
    pub(super) rxq: GuestQueue,
    pub(super) txq: GuestQueue,
    pub(super) sent: Recorder,
}

/// A live device as a Linux driver would leave it: VERSION_1|MAC|STATUS, MSI-X on,
/// config vector 0, RX vector 1, TX vector 2, DRIVER_OK.
pub(super) fn setup() -> Setup {
    let mem = mem();
    let msi = Arc::new(RecordingMsi::default());
    let sent = Recorder::default();
    let mut dev = VirtioNet::new_net(
        MAC,
        BAR,
        NetResources {
            mem: mem.clone(),
            msi: msi.clone(),
            model: Box::new(sent.clone()),
        },
    )
    .unwrap();
    negotiate(&mut dev, (VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS) as u32);
    enable_msix(&mut dev, 3);
    w(&mut dev, 0x10, 2, 0);
    let rxq = GuestQueue::new(&mem, 0x10000, 256);
    let txq = GuestQueue::new(&mem, 0x20000, 256);
    rxq.program(&mut dev, 0, 1);
    txq.program(&mut dev, 1, 2);
    w(&mut dev, 0x14, 1, 0xf);
    assert_eq!(r(&mut dev, 0x14, 1), 0xf);
    Setup {
        dev,
        msi,
        mem,
        rxq,
        txq,
        sent,
    }
}

pub(super) fn frame(src_last: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, src_last, 0x08, 0x00]);
    f.extend((0..len - 14).map(|i| i as u8));
    f
}

pub(crate) fn dirty(mem: &GuestMem, addr: u64) -> bool {
    mem.find_region(GuestAddress(addr))
        .unwrap()
        .bitmap()
        .dirty_at(addr as usize)
}
