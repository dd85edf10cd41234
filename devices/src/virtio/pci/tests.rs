//! Transport tests, and helpers (a dummy device, register access, driver set-up) the
//! device models' tests share.

use super::*;
use crate::pci::msix::RecordingMsi;
use crate::pci::PciRoot;
use crate::persist::Persist;
use crate::virtio::{status, VIRTIO_F_VERSION_1};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A device with two queues that records notifications and completes every chain on
/// queue 1 (through virtio-queue, i.e. guest-memory writes).
#[derive(Default)]
pub struct Dummy {
    pub notified: Vec<usize>,
    pub activated: bool,
    pub resets: usize,
    /// Pretends work is in flight, which its state cannot hold.
    pub in_flight: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DummyState {
    pub activated: bool,
    /// Makes the restore fail, to see the model's error come through.
    pub refuse_restore: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DummyError {
    #[error("a request is in flight")]
    InFlight,
    #[error("refused")]
    Refused,
}

impl Persist<'_> for Dummy {
    type State = DummyState;
    type ConstructorArgs = ();
    type Error = DummyError;
    fn save(&self) -> Result<DummyState, DummyError> {
        if self.in_flight {
            return Err(DummyError::InFlight);
        }
        Ok(DummyState {
            activated: self.activated,
            refuse_restore: false,
        })
    }
    fn restore((): (), s: &DummyState) -> Result<Self, DummyError> {
        if s.refuse_restore {
            return Err(DummyError::Refused);
        }
        Ok(Dummy {
            activated: s.activated,
            ..Dummy::default()
        })
    }
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u16 {
        1
    }
    fn pci_class(&self) -> (u8, u8) {
        (0x02, 0x00)
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1 << 5
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = [1u8, 2, 3, 4, 5, 6];
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, _ctx: &mut QueueContext<'_>) {
        self.activated = true;
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.activated = false;
    }
    fn queue_notify(&mut self, queue: usize, ctx: &mut QueueContext<'_>) {
        self.notified.push(queue);
        let mem = ctx.mem();
        let Some(q) = ctx.queue(queue) else { return };
        let heads: Vec<u16> = match q.iter(mem) {
            Ok(it) => it.map(|c| c.head_index()).collect(),
            Err(e) => {
                ctx.fail_queue(queue, &e);
                return;
            }
        };
        for h in &heads {
            ctx.queue(queue).unwrap().add_used(mem, *h, 0).unwrap();
        }
        if !heads.is_empty() {
            ctx.signal_used(queue);
        }
    }
}

pub const BAR: u64 = 0xc000_0000;

pub fn mem() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

pub fn r(dev: &mut impl BusDevice, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    dev.read(BAR, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

pub fn w(dev: &mut impl BusDevice, off: u64, len: usize, v: u64) {
    dev.write(BAR, off, &v.to_le_bytes()[..len]);
}

/// Programs queue `q` (size 16) at `base` (desc, then avail at +0x100, used at +0x200),
/// vector `vector`, and enables it.
pub fn setup_queue(dev: &mut impl BusDevice, q: u16, base: u64, vector: u16) {
    w(dev, 0x16, 2, u64::from(q));
    w(dev, 0x18, 2, 16);
    w(dev, 0x1a, 2, u64::from(vector));
    w(dev, 0x20, 4, base);
    w(dev, 0x24, 4, 0);
    w(dev, 0x28, 8, base + 0x100);
    w(dev, 0x30, 4, base + 0x200);
    w(dev, 0x34, 4, 0);
    w(dev, 0x1c, 2, 1);
}

/// Negotiates VERSION_1 (plus `extra` low feature bits).
pub fn negotiate(dev: &mut impl BusDevice, extra: u32) {
    w(dev, 0x14, 1, 1);
    w(dev, 0x14, 1, 3);
    w(dev, 0x08, 4, 0);
    w(dev, 0x0c, 4, u64::from(extra));
    w(dev, 0x08, 4, 1);
    w(dev, 0x0c, 4, 1);
    w(dev, 0x14, 1, 0xb);
}

/// Enables MSI-X in config space and unmasks vectors 0..n at data 0x40 + i.
pub fn enable_msix<D: VirtioDevice>(dev: &mut VirtioPciDevice<D>, n: u64) {
    let reg = dev.msix_cap_reg;
    dev.write_config_register(reg, 2, &0x8000u16.to_le_bytes());
    for i in 0..n {
        w(dev, MSIX_TABLE_OFFSET + i * 16, 8, 0xfee0_0000);
        w(dev, MSIX_TABLE_OFFSET + i * 16 + 8, 4, 0x40 + i);
        w(dev, MSIX_TABLE_OFFSET + i * 16 + 12, 4, 0);
    }
}

fn new_dummy() -> (VirtioPciDevice<Dummy>, Arc<RecordingMsi>, GuestMem) {
    let rec = Arc::new(RecordingMsi::default());
    let m = mem();
    let d = VirtioPciDevice::new(Dummy::default(), m.clone(), rec.clone(), BAR).unwrap();
    (d, rec, m)
}

/// Walks the capability list and returns (offset, cfg_type) of each vendor cap.
fn vendor_caps(dev: &mut VirtioPciDevice<Dummy>) -> Vec<(usize, u8, u8)> {
    let mut caps = Vec::new();
    let mut ptr = (dev.read_config_register(13) & 0xff) as usize;
    while ptr != 0 {
        let d0 = dev.read_config_register(ptr / 4);
        let (id, next) = (d0 as u8, (d0 >> 8) as u8);
        caps.push((ptr, id, (d0 >> 24) as u8));
        ptr = usize::from(next);
    }
    caps
}

#[test]
fn pci_identity_and_capabilities() {
    let (mut d, _, _) = new_dummy();
    assert_eq!(d.read_config_register(0), 0x1041_1af4);
    assert_eq!(d.read_config_register(2) >> 8, 0x02_00_00);
    assert_eq!(d.read_config_register(2) & 0xff, 1);
    assert_eq!(d.read_config_register(1) & (1 << 20), 1 << 20);
    let caps = vendor_caps(&mut d);
    let kinds: Vec<(u8, u8)> = caps.iter().map(|c| (c.1, c.2)).collect();
    assert_eq!(
        kinds,
        vec![(9, 1), (9, 3), (9, 4), (9, 2), (9, 5), (0x11, 0)]
    );
    // Notify cap: offset 0x3000, multiplier 4.
    let notify = caps[3].0 / 4;
    assert_eq!(d.read_config_register(notify + 1) & 0xff, 0);
    assert_eq!(d.read_config_register(notify + 2), 0x3000);
    assert_eq!(d.read_config_register(notify + 3), 8);
    assert_eq!(d.read_config_register(notify + 4), 4);
    // MSI-X: table size 3 (2 queues + config), table/PBA in BAR 0.
    let msix = caps[5].0 / 4;
    assert_eq!(d.read_config_register(msix) >> 16, 2);
    assert_eq!(d.read_config_register(msix + 1), 0x6000);
    assert_eq!(d.read_config_register(msix + 2), 0x7000);
    assert_eq!(d.bars()[0].size, BAR_SIZE);
}

#[test]
fn on_conf1_with_linux_style_sizing() {
    let (d, _, _) = new_dummy();
    let d = Arc::new(Mutex::new(d));
    let mut root = PciRoot::new();
    root.add_device(d.clone()).unwrap();
    let root = Arc::new(Mutex::new(root));
    let mut bus = crate::bus::Bus::new();
    bus.insert(root, PciRoot::PORT_BASE, PciRoot::PORT_LEN)
        .unwrap();
    let sel = |reg: u32| (1u32 << 31 | 1 << 11 | reg << 2).to_le_bytes();
    bus.write(0xcf8, &sel(4));
    bus.write(0xcfc, &u32::MAX.to_le_bytes());
    let mut v = [0u8; 4];
    bus.read(0xcfc, &mut v);
    assert_eq!(u32::from_le_bytes(v), 0xffff_8004);
    bus.write(0xcfc, &0xc000_0000u32.to_le_bytes());
    bus.read(0xcfc, &mut v);
    assert_eq!(u32::from_le_bytes(v), 0xc000_0004);
    assert_eq!(d.lock().unwrap().bar_addr(), BAR);
}

#[test]
fn feature_negotiation_and_common_config() {
    let (mut d, _, _) = new_dummy();
    w(&mut d, 0x00, 4, 0);
    assert_eq!(r(&mut d, 0x04, 4), 1 << 5);
    w(&mut d, 0x00, 4, 1);
    assert_eq!(r(&mut d, 0x04, 4), 1);
    w(&mut d, 0x00, 4, 2);
    assert_eq!(r(&mut d, 0x04, 4), 0);
    assert_eq!(r(&mut d, 0x12, 2), 2);
    // Features without VERSION_1: FEATURES_OK is refused.
    w(&mut d, 0x14, 1, 3);
    w(&mut d, 0x08, 4, 0);
    w(&mut d, 0x0c, 4, 1 << 5 | 1 << 7);
    assert_eq!(r(&mut d, 0x0c, 4), 1 << 5, "unoffered bit dropped");
    w(&mut d, 0x14, 1, 0xb);
    assert_eq!(r(&mut d, 0x14, 1), 3);
    w(&mut d, 0x08, 4, 1);
    w(&mut d, 0x0c, 4, 1);
    w(&mut d, 0x14, 1, 0xb);
    assert_eq!(r(&mut d, 0x14, 1), 0xb);
    // Frozen after FEATURES_OK.
    w(&mut d, 0x08, 4, 0);
    w(&mut d, 0x0c, 4, 0);
    assert_eq!(r(&mut d, 0x0c, 4), 1 << 5);

    // Queue registers.
    w(&mut d, 0x16, 2, 1);
    assert_eq!(r(&mut d, 0x18, 2), 16);
    assert_eq!(r(&mut d, 0x1e, 2), 1);
    assert_eq!(r(&mut d, 0x1a, 2), 0xffff);
    w(&mut d, 0x1a, 2, 2);
    assert_eq!(r(&mut d, 0x1a, 2), 2);
    w(&mut d, 0x1a, 2, 3);
    assert_eq!(
        r(&mut d, 0x1a, 2),
        0xffff,
        "vector past the table reads NO_VECTOR"
    );
    w(&mut d, 0x18, 2, 8);
    assert_eq!(r(&mut d, 0x18, 2), 8);
    w(&mut d, 0x20, 8, 0x1_2340);
    assert_eq!(r(&mut d, 0x20, 4), 0x1_2340);
    assert_eq!(r(&mut d, 0x24, 4), 0);
    w(&mut d, 0x2c, 4, 0x1);
    assert_eq!(r(&mut d, 0x28, 8), 0x1_0000_0000);
    // Queue that does not exist.
    w(&mut d, 0x16, 2, 5);
    assert_eq!(r(&mut d, 0x18, 2), 0);
    w(&mut d, 0x18, 2, 8);
    // Non-natural reads are served from the field values.
    w(&mut d, 0x16, 2, 1);
    assert_eq!(r(&mut d, 0x14, 4), 0x0001_000b);
    assert_eq!(r(&mut d, 0x12, 1), 2);
    assert_eq!(r(&mut d, 0x40, 4), 0);
    // Device config and ISR.
    assert_eq!(r(&mut d, 0x2000, 4), 0x0403_0201);
    assert_eq!(r(&mut d, 0x2004, 4), 0x0605);
    assert_eq!(r(&mut d, 0x1000, 1), 0);
    // Reset clears everything driver-visible.
    w(&mut d, 0x14, 1, 0);
    assert_eq!(r(&mut d, 0x14, 1), 0);
    assert_eq!(r(&mut d, 0x0c, 4), 0);
    w(&mut d, 0x16, 2, 1);
    assert_eq!(r(&mut d, 0x18, 2), 16);
    assert_eq!(r(&mut d, 0x20, 8), 0);
    assert_eq!(d.device().resets, 1);
}

#[test]
fn notify_processes_queue_and_raises_msix() {
    let (mut d, rec, m) = new_dummy();
    negotiate(&mut d, 0);
    enable_msix(&mut d, 3);
    setup_queue(&mut d, 1, 0x1000, 2);
    // One chain: descriptor 0 at 0x8000, made available.
    m.write_obj(0x8000u64, GuestAddress(0x1000)).unwrap();
    m.write_obj(64u32, GuestAddress(0x1008)).unwrap();
    m.write_obj(0u16, GuestAddress(0x1100 + 4)).unwrap();
    m.write_obj(1u16, GuestAddress(0x1100 + 2)).unwrap();
    // Before DRIVER_OK notifications are ignored.
    w(&mut d, 0x3004, 2, 1);
    assert!(d.device().notified.is_empty());
    w(&mut d, 0x14, 1, 0xf);
    assert!(d.device().activated);
    w(&mut d, 0x3004, 2, 1);
    assert_eq!(d.device().notified, vec![1]);
    assert_eq!(m.read_obj::<u16>(GuestAddress(0x1202)).unwrap(), 1);
    let sent = rec.take();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].data, 0x42);
    assert_eq!(r(&mut d, 0x1000, 1), 1, "ISR queue bit");
    assert_eq!(r(&mut d, 0x1000, 1), 0, "ISR read clears");
    // A notify for a queue past the end is ignored.
    w(&mut d, 0x3008, 2, 2);
    assert_eq!(d.device().notified, vec![1]);
}

#[test]
fn garbage_queue_config_stops_the_queue() {
    let (mut d, rec, _) = new_dummy();
    negotiate(&mut d, 0);
    enable_msix(&mut d, 3);
    w(&mut d, 0x10, 2, 0);
    // Queue 1: rings far outside guest memory.
    w(&mut d, 0x16, 2, 1);
    w(&mut d, 0x20, 8, 0x7000_0000_0000);
    w(&mut d, 0x28, 8, 0x7000_0001_0000);
    w(&mut d, 0x30, 8, 0x7000_0002_0000);
    w(&mut d, 0x1c, 2, 1);
    // Queue 0: misaligned descriptor table.
    w(&mut d, 0x16, 2, 0);
    w(&mut d, 0x20, 8, 0x1001);
    w(&mut d, 0x18, 2, 3);
    w(&mut d, 0x1c, 2, 1);
    w(&mut d, 0x14, 1, 0xf);
    assert_ne!(r(&mut d, 0x14, 1) & status::NEEDS_RESET as u64, 0);
    assert_eq!(r(&mut d, 0x15, 1), 1, "config generation bumped");
    assert_eq!(rec.take().len(), 1, "config interrupt");
    w(&mut d, 0x3004, 2, 1);
    w(&mut d, 0x3000, 2, 0);
    d.with_queues(|_, ctx| {
        assert!(ctx.queue(0).is_none());
        assert!(ctx.queue(1).is_none());
    });
    // Writes to an enabled queue are ignored.
    w(&mut d, 0x16, 2, 1);
    w(&mut d, 0x18, 2, 4);
    assert_eq!(r(&mut d, 0x18, 2), 16);
    // Reset recovers.
    w(&mut d, 0x14, 1, 0);
    negotiate(&mut d, 0);
    setup_queue(&mut d, 1, 0x1000, 2);
    w(&mut d, 0x14, 1, 0xf);
    assert_eq!(r(&mut d, 0x14, 1), 0xf);
    d.with_queues(|_, ctx| assert!(ctx.queue(1).is_some()));
}

#[test]
fn avail_index_garbage_stops_queue_without_panic() {
    let (mut d, _, m) = new_dummy();
    negotiate(&mut d, 0);
    setup_queue(&mut d, 1, 0x1000, 2);
    w(&mut d, 0x14, 1, 0xf);
    // avail idx 100 with a 16-entry queue.
    m.write_obj(100u16, GuestAddress(0x1102)).unwrap();
    w(&mut d, 0x3004, 2, 1);
    assert_ne!(d.device_status() & status::NEEDS_RESET, 0);
}

#[test]
fn pci_cfg_window_reaches_the_bar() {
    let (mut d, _, _) = new_dummy();
    let cap = d.pci_cfg_cap / 4;
    // bar 0, offset 0x12 (num_queues), length 2.
    d.write_config_register(cap + 1, 0, &[0]);
    d.write_config_register(cap + 2, 0, &0x12u32.to_le_bytes());
    d.write_config_register(cap + 3, 0, &2u32.to_le_bytes());
    assert_eq!(d.read_config_register(cap + 4) & 0xffff, 2);
    // Write device_status = 1 through the window.
    d.write_config_register(cap + 2, 0, &0x14u32.to_le_bytes());
    d.write_config_register(cap + 3, 0, &1u32.to_le_bytes());
    d.write_config_register(cap + 4, 0, &[1]);
    assert_eq!(d.device_status(), 1);
    // Bad length: ignored, no panic.
    d.write_config_register(cap + 3, 0, &3u32.to_le_bytes());
    d.read_config_register(cap + 4);
}

fn args(m: &GuestMem, rec: &Arc<RecordingMsi>) -> VirtioPciArgs<()> {
    VirtioPciArgs {
        mem: m.clone(),
        msi: rec.clone(),
        model: (),
    }
}

#[test]
fn save_restore_save_is_identical() {
    let (mut d, rec, m) = new_dummy();
    negotiate(&mut d, 1 << 5);
    enable_msix(&mut d, 3);
    w(&mut d, 0x10, 2, 0);
    setup_queue(&mut d, 0, 0x1000, 1);
    setup_queue(&mut d, 1, 0x2000, 2);
    w(&mut d, 0x14, 1, 0xf);
    let s = d.save().unwrap();
    assert!(s.device.activated, "the model's state rides along");
    let bytes = bincode::serialize(&s).unwrap();
    let decoded: VirtioPciDeviceState<DummyState> = bincode::deserialize(&bytes).unwrap();
    let d2 = VirtioPciDevice::<Dummy>::restore(args(&m, &rec), &decoded).unwrap();
    assert_eq!(d2.save().unwrap(), s);
    assert_eq!(d2.msix_cap_reg, d.msix_cap_reg);
    assert!(d2.device().activated);
    let restore = |st: &VirtioPciDeviceState<DummyState>| {
        VirtioPciDevice::<Dummy>::restore(args(&m, &rec), st)
    };
    let mut bad = s.clone();
    bad.transport.queues.pop();
    assert!(matches!(
        restore(&bad),
        Err(VirtioPersistError::Transport(VirtioPciError::QueueCount {
            found: 1,
            expected: 2
        }))
    ));
    let mut bad = s.clone();
    bad.transport.pci = PciConfiguration::new(PciHeader {
        vendor_id: 0x1af4,
        device_id: 0x1042,
        revision: 1,
        class: 1,
        subclass: 0,
        prog_if: 0,
        subsystem_vendor_id: 0,
        subsystem_id: 0,
    })
    .save()
    .unwrap();
    assert!(matches!(
        restore(&bad),
        Err(VirtioPersistError::Transport(
            VirtioPciError::DeviceMismatch { .. }
        ))
    ));
    let mut bad = s.clone();
    bad.transport.queues[0].size = 3;
    assert!(matches!(
        restore(&bad),
        Err(VirtioPersistError::Transport(VirtioPciError::QueueState {
            index: 0,
            ..
        }))
    ));
    let mut bad = s;
    bad.device.refuse_restore = true;
    assert!(matches!(
        restore(&bad),
        Err(VirtioPersistError::Device(DummyError::Refused))
    ));
}

/// A model that cannot represent its state (work in flight) makes the device's save
/// fail, naming the model in the error chain: it is never saved without it.
#[test]
fn a_model_that_cannot_save_fails_the_save_loudly() {
    let (mut d, _, _) = new_dummy();
    d.device_mut().in_flight = true;
    let e = d.save().unwrap_err();
    assert!(matches!(
        e,
        VirtioPersistError::Device(DummyError::InFlight)
    ));
    assert_eq!(
        format!("{e}: {}", std::error::Error::source(&e).unwrap()),
        "virtio device model: a request is in flight"
    );
}
