//! virtio-net (virtio 1.2, 5.1) on a TAP.
//!
//! Features: `VIRTIO_F_VERSION_1`, `VIRTIO_NET_F_MAC`, `VIRTIO_NET_F_STATUS`; no offloads,
//! no mergeable RX buffers, one RX/TX queue pair of 256 entries. Every buffer starts with
//! the 12-byte `virtio_net_hdr_v1`, which is also the TAP's vnet header, so frames move
//! between guest and TAP with their header unchanged (TX) or freshly zeroed (RX).
//!
//! - TX runs in the vCPU thread that took the queue-1 notification: chains are gathered
//!   and handed to a [`NetSink`] (a [`TapSink`] by default; the output-commit buffer swaps
//!   in its own with [`Net::set_sink`]).
//! - RX runs in a [`NetWorker`] thread: it reads the TAP into the guest's RX buffers. With
//!   no buffers left it stops reading the TAP until the guest notifies queue 0. It writes
//!   guest memory only while holding the device mutex, so whoever holds that mutex (the
//!   checkpoint engine) sees no RX writes.
//!
//! Files: the device model and its TX path (here), the RX path and worker thread
//! (`rx.rs`), save and restore (`persist.rs`).

mod persist;
mod rx;
#[cfg(test)]
pub(crate) mod test_util;

use std::io::{self, Read};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET as ID_NET;
use virtio_bindings::virtio_net;
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::pci::{QueueContext, VirtioPciDevice};
use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::tap::{Tap, VNET_HDR_LEN};

pub use persist::{NetResources, NetState, VirtioNetState};
pub use rx::NetWorker;

/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// virtio device id of a network card.
pub const VIRTIO_ID_NET: u16 = ID_NET as u16;
/// Feature: the device has a MAC address (in its configuration space).
pub const VIRTIO_NET_F_MAC: u64 = 1 << virtio_net::VIRTIO_NET_F_MAC;
/// Feature: the configuration space has a link status field.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << virtio_net::VIRTIO_NET_F_STATUS;
const VIRTIO_NET_S_LINK_UP: u16 = virtio_net::VIRTIO_NET_S_LINK_UP as u16;
/// Largest buffer either way: vnet header + a 64 KiB IP packet + Ethernet and VLAN headers.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + 65550;
const ETH_HLEN: usize = 14;
/// Frames delivered per lock hold, so a busy TAP cannot keep vCPUs off the device long.
const RX_BATCH: usize = 64;
/// `virtio_net_hdr_v1` for received frames: no offload flags, `num_buffers` = 1.
const RX_HEADER: [u8; VNET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
// The TAP's vnet header is the device's `virtio_net_hdr_v1`: frames pass between the two
// with it unchanged.
const _: () = assert!(VNET_HDR_LEN == std::mem::size_of::<virtio_net::virtio_net_hdr_v1>());

/// Where transmitted frames go. `frame` starts with the 12-byte vnet header.
pub trait NetSink: Send {
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
}

/// The default sink: straight out of the TAP.
pub struct TapSink(pub Arc<Tap>);

impl TapSink {
    pub fn boxed(tap: Arc<Tap>) -> Box<dyn NetSink> {
        Box::new(Self(tap))
    }
}

impl NetSink for TapSink {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.0.write_vnet(frame)
    }
}

/// Errors of the network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("creating the RX notification eventfd failed")]
    EventFd(#[source] io::Error),
    #[error("setting up the RX worker's epoll failed")]
    Epoll(#[source] io::Error),
    #[error("spawning the RX worker thread failed")]
    Spawn(#[source] io::Error),
    #[error("the device mutex is poisoned (a thread panicked while holding it)")]
    Poisoned,
    #[error("the RX worker thread panicked")]
    WorkerPanicked,
    #[error("virtio-pci transport")]
    Transport(#[from] super::pci::VirtioPciError),
    #[error("waking the RX worker failed")]
    Kick(#[source] io::Error),
    #[error("TAP {tap} failed (was it deleted?)")]
    TapGone {
        tap: String,
        #[source]
        source: io::Error,
    },
}

/// Host-side counters (not part of the saved state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    /// Frames the sink refused (e.g. the TAP is down).
    pub tx_dropped: u64,
    pub rx_frames: u64,
    /// Frames from the TAP dropped: no driver, runt, or larger than the guest's buffer.
    pub rx_dropped: u64,
}

/// virtio-net on the virtio-pci transport: the object to put on the buses.
pub type VirtioNet = VirtioPciDevice<Net>;

/// The virtio-net device model.
pub struct Net {
    mac: [u8; 6],
    link_up: bool,
    sink: Box<dyn NetSink>,
    /// Written on a queue-0 notification (or activation) to wake the RX worker.
    rx_kick: EventFd,
    tx_buf: Vec<u8>,
    sink_failing: bool,
    stats: NetStats,
    /// Paused by the VMM (a stopped VM): the RX worker leaves frames in the TAP.
    rx_paused: bool,
    /// Called with every frame delivered into the guest (Ethernet frame, no vnet header),
    /// under the device lock: the primary logs inbound frames for its backup.
    rx_tap: Option<RxTap>,
    /// Frames (vnet header room included) to deliver before anything from the TAP: what a
    /// backup replays into the VM it took over.
    injected: std::collections::VecDeque<Vec<u8>>,
}

/// See [`Net::set_rx_tap`].
pub type RxTap = Box<dyn FnMut(&[u8]) + Send>;

impl Net {
    pub fn new(mac: [u8; 6], sink: Box<dyn NetSink>) -> Result<Self, NetError> {
        Ok(Self {
            mac,
            link_up: true,
            sink,
            rx_kick: EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd)?,
            tx_buf: Vec::with_capacity(MAX_BUFFER_LEN),
            sink_failing: false,
            stats: NetStats::default(),
            rx_paused: false,
            rx_tap: None,
            injected: std::collections::VecDeque::new(),
        })
    }

    /// Calls `tap` with every frame delivered into the guest from now on (under the device
    /// lock, so whoever holds it — the checkpoint engine — sees a frame either delivered
    /// and reported or neither).
    pub fn set_rx_tap(&mut self, tap: Option<RxTap>) {
        self.rx_tap = tap;
    }

    /// Queues Ethernet frames for delivery into the guest ahead of the TAP's, and wakes the
    /// RX worker. Frames that are too short or too long are dropped as a TAP's would be.
    pub fn inject(&mut self, frames: impl IntoIterator<Item = Vec<u8>>) {
        for f in frames {
            if f.len() < ETH_HLEN || f.len() + crate::tap::VNET_HDR_LEN > MAX_BUFFER_LEN {
                self.stats.rx_dropped += 1;
                continue;
            }
            let mut b = vec![0; crate::tap::VNET_HDR_LEN];
            b.extend_from_slice(&f);
            self.injected.push_back(b);
        }
        let _ = self.rx_kick.write(1);
    }

    /// Replaces where transmitted frames go; returns the previous sink.
    pub fn set_sink(&mut self, sink: Box<dyn NetSink>) -> Box<dyn NetSink> {
        std::mem::replace(&mut self.sink, sink)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Changes the MAC in the device's configuration (a restored clone's new identity);
    /// the driver rereads it after a configuration interrupt.
    pub fn set_mac(&mut self, mac: [u8; 6]) {
        self.mac = mac;
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    fn config_bytes(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        let status = if self.link_up {
            VIRTIO_NET_S_LINK_UP
        } else {
            0
        };
        c[6..].copy_from_slice(&status.to_le_bytes());
        c
    }

    fn kick_rx(&self) {
        if let Err(e) = self.rx_kick.write(1) {
            tracing::warn!(error = %e, "waking the RX worker failed");
        }
    }

    fn process_tx(&mut self, ctx: &mut QueueContext<'_>) {
        let mem = ctx.mem();
        let mut used = 0usize;
        while let Some(queue) = ctx.queue(TX_QUEUE) {
            // Bounded so a guest racing more chains in cannot hold the vCPU here forever;
            // chains added meanwhile come with their own notification.
            if used == usize::from(QUEUE_SIZE) {
                break;
            }
            let chain = match queue.iter(mem).map(|mut it| it.next()) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    ctx.fail_queue(TX_QUEUE, &e);
                    break;
                }
            };
            let head = chain.head_index();
            let mut reader = match chain.reader(mem) {
                Ok(r) => r,
                Err(e) => {
                    ctx.fail_queue(TX_QUEUE, &e);
                    break;
                }
            };
            let len = reader.available_bytes();
            if !(VNET_HDR_LEN..=MAX_BUFFER_LEN).contains(&len) {
                ctx.fail_queue(TX_QUEUE, &format!("TX chain of {len} bytes"));
                break;
            }
            self.tx_buf.resize(len, 0);
            if let Err(e) = reader.read_exact(&mut self.tx_buf) {
                ctx.fail_queue(TX_QUEUE, &e);
                break;
            }
            match self.sink.send(&self.tx_buf) {
                Ok(()) => {
                    self.stats.tx_frames += 1;
                    self.sink_failing = false;
                }
                Err(e) => {
                    // Like a NIC whose link is down: drop, and say so once per streak.
                    self.stats.tx_dropped += 1;
                    if !self.sink_failing {
                        tracing::warn!(error = %e, "network sink refused a frame; dropping until it accepts again");
                        self.sink_failing = true;
                    }
                }
            }
            let Some(queue) = ctx.queue(TX_QUEUE) else {
                break;
            };
            if let Err(e) = queue.add_used(mem, head, 0) {
                ctx.fail_queue(TX_QUEUE, &e);
                break;
            }
            used += 1;
        }
        if used > 0 {
            tracing::trace!(frames = used, "TX queue processed");
            ctx.signal_used(TX_QUEUE);
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_NET
    }

    fn pci_class(&self) -> (u8, u8) {
        // Network controller, Ethernet.
        (0x02, 0x00)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // virtio 1.x: the MAC is read-only to the driver without VIRTIO_NET_F_CTRL_MAC_ADDR.
        tracing::warn!(
            offset,
            len = data.len(),
            "write to read-only virtio-net config ignored"
        );
    }

    fn activate(&mut self, _ctx: &mut QueueContext<'_>) {
        self.kick_rx();
    }

    fn reset(&mut self) {}

    fn queue_notify(&mut self, queue: usize, ctx: &mut QueueContext<'_>) {
        match queue {
            RX_QUEUE => self.kick_rx(),
            TX_QUEUE => self.process_tx(ctx),
            _ => {}
        }
    }
}

impl VirtioPciDevice<Net> {
    /// Creates virtio-net with BAR 0 at `bar_addr` (see [`super::pci::BAR_SIZE`]).
    pub fn new_net(mac: [u8; 6], bar_addr: u64, res: NetResources) -> Result<Self, NetError> {
        let net = Net::new(mac, res.model)?;
        Ok(Self::new(net, res.mem, res.msi, bar_addr)?)
    }

    /// Changes the link status the guest sees and raises a configuration interrupt.
    pub fn set_link_up(&mut self, up: bool) {
        if self.device().link_up != up {
            self.device_mut().link_up = up;
            self.config_changed();
        }
    }
}

impl crate::Pausable for VirtioNet {
    type Error = NetError;

    fn pause(&mut self) -> Result<(), NetError> {
        self.device_mut().rx_paused = true;
        Ok(())
    }

    /// Fails if the RX worker cannot be woken: it would leave frames in the TAP until the
    /// guest's next RX notification.
    fn resume(&mut self) -> Result<(), NetError> {
        let net = self.device_mut();
        net.rx_paused = false;
        net.rx_kick.write(1).map_err(NetError::Kick)
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use crate::bus::BusDevice;
    use crate::pci::PciDevice;
    use crate::persist::Persist;
    use crate::virtio::pci::tests::{r, w, BAR};
    use crate::virtio::status;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn device_config_and_features() {
        let s = setup();
        let mut dev = s.dev;
        assert_eq!(dev.read_config_register(0), 0x1041_1af4);
        w(&mut dev, 0x00, 4, 0);
        assert_eq!(r(&mut dev, 0x04, 4), 1 << 5 | 1 << 16);
        w(&mut dev, 0x00, 4, 1);
        assert_eq!(r(&mut dev, 0x04, 4), 1);
        let mut mac = [0u8; 6];
        dev.read(BAR, 0x2000, &mut mac);
        assert_eq!(mac, MAC);
        assert_eq!(r(&mut dev, 0x2006, 2), 1, "link up");
        w(&mut dev, 0x2000, 1, 0);
        assert_eq!(r(&mut dev, 0x2000, 1), 2, "MAC is read-only");
        w(&mut dev, 0x16, 2, 0);
        assert_eq!(r(&mut dev, 0x18, 2), 256);
        let gen = r(&mut dev, 0x15, 1);
        s.msi.take();
        dev.set_link_up(false);
        assert_eq!(r(&mut dev, 0x2006, 2), 0);
        assert_eq!(r(&mut dev, 0x15, 1), gen + 1);
        assert_eq!(s.msi.take()[0].data, 0x40, "config vector");
    }

    #[test]
    fn tx_gathers_chain_into_sink_and_interrupts() {
        let mut s = setup();
        let f = frame(1, 60);
        let mut hdr = [0u8; 12];
        hdr[10] = 1;
        s.mem.write_slice(&hdr, GuestAddress(0x40000)).unwrap();
        s.mem.write_slice(&f[..20], GuestAddress(0x41000)).unwrap();
        s.mem.write_slice(&f[20..], GuestAddress(0x42000)).unwrap();
        s.txq.add(&[
            (0x40000, 12, false),
            (0x41000, 20, false),
            (0x42000, 40, false),
        ]);
        let f2 = frame(2, 100);
        s.mem
            .write_slice(&[0u8; 12], GuestAddress(0x43000))
            .unwrap();
        s.mem.write_slice(&f2, GuestAddress(0x4300c)).unwrap();
        s.txq.add(&[(0x43000, 112, false)]);
        s.msi.take();
        w(&mut s.dev, 0x3004, 2, 1);

        let sent = s.sent.0.lock().unwrap().clone();
        assert_eq!(sent.len(), 2);
        assert_eq!(&sent[0][..12], &hdr);
        assert_eq!(&sent[0][12..], &f[..]);
        assert_eq!(&sent[1][12..], &f2[..]);
        assert_eq!(s.txq.used_idx(), 2);
        assert_eq!(s.txq.used(0), (0, 0));
        assert_eq!(s.txq.used(1), (3, 0));
        let msgs = s.msi.take();
        assert_eq!(msgs.len(), 1, "one interrupt per batch");
        assert_eq!(msgs[0].data, 0x42);
        assert!(
            dirty(&s.mem, 0x22002),
            "used ring write is in the VMM dirty bitmap"
        );
        assert_eq!(s.dev.device().stats().tx_frames, 2);
    }

    #[test]
    fn tx_completion_respects_no_interrupt_flag() {
        let mut s = setup();
        // VIRTQ_AVAIL_F_NO_INTERRUPT in the TX avail ring's flags.
        s.mem
            .write_obj(1u16, GuestAddress(0x20000 + 0x1000))
            .unwrap();
        s.mem
            .write_slice(&[0u8; 12], GuestAddress(0x40000))
            .unwrap();
        s.mem
            .write_slice(&frame(1, 60), GuestAddress(0x4000c))
            .unwrap();
        s.txq.add(&[(0x40000, 72, false)]);
        s.msi.take();
        w(&mut s.dev, 0x3004, 2, 1);
        assert_eq!(s.sent.0.lock().unwrap().len(), 1);
        assert_eq!(s.txq.used_idx(), 1, "the buffer is still returned");
        assert!(
            s.msi.take().is_empty(),
            "no interrupt the driver asked not to get"
        );
        // Cleared again: interrupts resume.
        s.mem
            .write_obj(0u16, GuestAddress(0x20000 + 0x1000))
            .unwrap();
        s.txq.add(&[(0x40000, 72, false)]);
        w(&mut s.dev, 0x3004, 2, 1);
        assert_eq!(s.msi.take().len(), 1);
    }

    #[test]
    fn tx_sink_is_replaceable_and_failures_drop() {
        let mut s = setup();
        let old = s.dev.device_mut().set_sink(Box::new(Failing));
        drop(old);
        s.mem
            .write_slice(&frame(1, 60), GuestAddress(0x4000c))
            .unwrap();
        s.txq.add(&[(0x40000, 72, false)]);
        w(&mut s.dev, 0x3004, 2, 1);
        assert_eq!(
            s.txq.used_idx(),
            1,
            "buffer returned even though the frame was dropped"
        );
        assert_eq!(s.dev.device().stats().tx_dropped, 1);
        assert!(s.sent.0.lock().unwrap().is_empty());
    }

    #[test]
    fn tx_garbage_stops_the_queue() {
        // Oversized chain.
        let mut s = setup();
        s.txq.add(&[(0x40000, 0x20000, false)]);
        w(&mut s.dev, 0x3004, 2, 1);
        assert_ne!(s.dev.device_status() & status::NEEDS_RESET, 0);
        assert_eq!(s.txq.used_idx(), 0);
        // Further notifications do nothing.
        s.txq.add(&[(0x40000, 72, false)]);
        w(&mut s.dev, 0x3004, 2, 1);
        assert_eq!(s.txq.used_idx(), 0);

        // Descriptor outside guest memory.
        let mut s = setup();
        s.txq.add(&[(0xffff_0000, 72, false)]);
        w(&mut s.dev, 0x3004, 2, 1);
        assert_ne!(s.dev.device_status() & status::NEEDS_RESET, 0);

        // Head index past the queue size.
        let mut s = setup();
        s.mem.write_obj(999u16, GuestAddress(0x21004)).unwrap();
        s.mem.write_obj(1u16, GuestAddress(0x21002)).unwrap();
        w(&mut s.dev, 0x3004, 2, 1);
        assert!(s.sent.0.lock().unwrap().is_empty());
        assert!(s.dev.device().stats().tx_frames == 0);
    }

    #[test]
    fn reset_resets_queues() {
        let mut s = setup();
        s.txq.add(&[(0x40000, 72, false)]);
        w(&mut s.dev, 0x3004, 2, 1);
        w(&mut s.dev, 0x14, 1, 0);
        let st = s.dev.save().unwrap();
        assert!(st
            .transport
            .queues
            .iter()
            .all(|q| !q.ready && q.next_avail == 0));
        assert_eq!(st.transport.device_status, 0);
    }
}
