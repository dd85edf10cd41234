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

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::pci::{QueueContext, VirtioPciArgs, VirtioPciDevice, VirtioPciDeviceState};
use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::tap::{Tap, VNET_HDR_LEN};
use crate::persist::Persist;

/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// virtio device id of a network card.
pub const VIRTIO_ID_NET: u16 = 1;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Largest buffer either way: vnet header + a 64 KiB IP packet + Ethernet and VLAN headers.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + 65550;
const ETH_HLEN: usize = 14;
/// Frames delivered per lock hold, so a busy TAP cannot keep vCPUs off the device long.
const RX_BATCH: usize = 64;
/// `virtio_net_hdr_v1` for received frames: no offload flags, `num_buffers` = 1.
const RX_HEADER: [u8; VNET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

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

/// Saved state of the virtio-net model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub link_up: bool,
}

/// Saved state of the whole device: transport plus model.
pub type VirtioNetState = VirtioPciDeviceState<NetState>;

/// Host resources a (restored) device is built with: guest memory, the interrupt sender,
/// and where its transmitted frames go (`model`).
pub type NetResources = VirtioPciArgs<Box<dyn NetSink>>;

/// virtio-net on the virtio-pci transport: the object to put on the buses.
pub type VirtioNet = VirtioPciDevice<Net>;

/// Outcome of offering one frame to the RX queue.
#[derive(Debug, PartialEq, Eq)]
enum RxOutcome {
    Delivered,
    /// Gone (no driver, bad frame, or the queue just failed): take the next one.
    Dropped,
    /// Keep the frame until the guest posts buffers.
    NoBuffers,
}

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
}

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
        })
    }

    /// Replaces where transmitted frames go; returns the previous sink.
    pub fn set_sink(&mut self, sink: Box<dyn NetSink>) -> Box<dyn NetSink> {
        std::mem::replace(&mut self.sink, sink)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
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

    /// Puts one frame (`frame[..12]` is room for the header) into the next RX buffer.
    fn receive(&mut self, ctx: &mut QueueContext<'_>, frame: &mut [u8]) -> RxOutcome {
        let outcome = self.receive_one(ctx, frame);
        match outcome {
            RxOutcome::Delivered => self.stats.rx_frames += 1,
            RxOutcome::Dropped => self.stats.rx_dropped += 1,
            RxOutcome::NoBuffers => {}
        }
        outcome
    }

    fn receive_one(&mut self, ctx: &mut QueueContext<'_>, frame: &mut [u8]) -> RxOutcome {
        if frame.len() < VNET_HDR_LEN + ETH_HLEN {
            return RxOutcome::Dropped;
        }
        let mem = ctx.mem();
        let Some(queue) = ctx.queue(RX_QUEUE) else {
            // No driver (or the queue failed): the frame is lost, as on a real NIC.
            return RxOutcome::Dropped;
        };
        let chain = match queue.iter(mem).map(|mut it| it.next()) {
            Ok(Some(c)) => c,
            Ok(None) => return RxOutcome::NoBuffers,
            Err(e) => {
                ctx.fail_queue(RX_QUEUE, &e);
                return RxOutcome::Dropped;
            }
        };
        let head = chain.head_index();
        let mut writer = match chain.writer(mem) {
            Ok(w) => w,
            Err(e) => {
                ctx.fail_queue(RX_QUEUE, &e);
                return RxOutcome::Dropped;
            }
        };
        let room = writer.available_bytes();
        if room < VNET_HDR_LEN + ETH_HLEN {
            ctx.fail_queue(RX_QUEUE, &format!("RX buffer of {room} bytes"));
            return RxOutcome::Dropped;
        }
        if room < frame.len() {
            // A host frame bigger than the guest's buffers: drop it but keep the buffer.
            if let Some(q) = ctx.queue(RX_QUEUE) {
                q.go_to_previous_position();
            }
            tracing::debug!(
                len = frame.len(),
                room,
                "frame larger than the RX buffer dropped"
            );
            return RxOutcome::Dropped;
        }
        frame[..VNET_HDR_LEN].copy_from_slice(&RX_HEADER);
        if let Err(e) = writer.write_all(frame) {
            ctx.fail_queue(RX_QUEUE, &e);
            return RxOutcome::Dropped;
        }
        if let Some(q) = ctx.queue(RX_QUEUE) {
            if let Err(e) = q.add_used(mem, head, frame.len() as u32) {
                ctx.fail_queue(RX_QUEUE, &e);
                return RxOutcome::Dropped;
            }
        }
        RxOutcome::Delivered
    }
}

/// The MAC and the link status are the model's state; the sink (the TAP, or the
/// output-commit buffer) is the host's. Counters and the RX pause are host-side too.
impl Persist<'_> for Net {
    type State = NetState;
    type ConstructorArgs = Box<dyn NetSink>;
    type Error = NetError;

    fn save(&self) -> Result<NetState, NetError> {
        Ok(NetState {
            mac: self.mac,
            link_up: self.link_up,
        })
    }

    fn restore(sink: Box<dyn NetSink>, state: &NetState) -> Result<Self, NetError> {
        let mut net = Self::new(state.mac, sink)?;
        net.link_up = state.link_up;
        Ok(net)
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
        let cfg = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
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

/// Something frames are received from (the TAP; a queue of frames in tests).
trait FrameSource {
    /// Reads one frame, with room for the vnet header first; `WouldBlock` when empty.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
}

impl FrameSource for Tap {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_vnet(buf)
    }
}

/// A frame read from the TAP and not yet placed in a guest buffer.
struct RxPending {
    /// Why the source failed, when it did.
    error: Option<io::Error>,
    buf: Vec<u8>,
    len: Option<usize>,
}

impl crate::devices::Pausable for VirtioNet {
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

/// Why an RX pass ended.
#[derive(Debug, PartialEq, Eq)]
enum RxStop {
    SourceEmpty,
    /// The source failed for good (the error is in `RxPending::error`).
    SourceFailed,
    NoBuffers,
    /// Batch limit hit: go again after letting others take the lock.
    Budget,
}

/// Moves frames from `src` into the RX queue until the source is empty, the guest has
/// no buffers, or the batch is full; one interrupt for the whole pass.
fn rx_pass(dev: &mut VirtioNet, rx: &mut RxPending, src: &dyn FrameSource) -> RxStop {
    dev.with_queues(|net, ctx| {
        if net.rx_paused {
            // Like a full ring: stop reading the TAP until `resume` kicks the worker.
            return RxStop::NoBuffers;
        }
        let mut delivered = 0;
        let stop = loop {
            if delivered == RX_BATCH {
                break RxStop::Budget;
            }
            let len = match rx.len {
                Some(len) => len,
                None => match src.recv(&mut rx.buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break RxStop::SourceEmpty,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // A TAP read fails only when the TAP is gone or broken (EBADFD
                        // after `ip link del`): the NIC is dead, and saying so beats a VM
                        // that silently stops hearing anything.
                        rx.error = Some(e);
                        break RxStop::SourceFailed;
                    }
                },
            };
            rx.len = Some(len);
            match net.receive(ctx, &mut rx.buf[..len]) {
                RxOutcome::Delivered => {
                    delivered += 1;
                    rx.len = None;
                }
                RxOutcome::Dropped => rx.len = None,
                RxOutcome::NoBuffers => break RxStop::NoBuffers,
            }
        };
        if delivered > 0 {
            ctx.signal_used(RX_QUEUE);
        }
        stop
    })
}

const TOKEN_STOP: u64 = 0;
const TOKEN_KICK: u64 = 1;
const TOKEN_TAP: u64 = 2;

/// The RX thread of one virtio-net device. Dropping it stops the thread.
pub struct NetWorker {
    stop: EventFd,
    /// Why the thread ended, if it failed: read by the VMM to report a dead NIC.
    failure: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<Result<(), NetError>>>,
}

impl NetWorker {
    /// Starts receiving from `tap` into `dev`.
    pub fn start(dev: Arc<Mutex<VirtioNet>>, tap: Arc<Tap>) -> Result<Self, NetError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd)?;
        let kick = dev
            .lock()
            .map_err(|_| NetError::Poisoned)?
            .device()
            .rx_kick
            .try_clone()
            .map_err(NetError::EventFd)?;
        let epoll = Epoll::new().map_err(NetError::Epoll)?;
        let add = |fd, events, token| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(NetError::Epoll)
        };
        add(stop.as_raw_fd(), EventSet::IN, TOKEN_STOP)?;
        add(kick.as_raw_fd(), EventSet::IN, TOKEN_KICK)?;
        // Edge-triggered: a pass reads the TAP until it is empty or the guest has no room.
        add(
            tap.as_raw_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
            TOKEN_TAP,
        )?;
        let failure = Arc::new(Mutex::new(None));
        let failure2 = failure.clone();
        let thread = std::thread::Builder::new()
            .name(format!("net-rx-{}", tap.name()))
            .spawn(move || {
                let r = rx_loop(&dev, &tap, &kick, &epoll);
                if let Err(e) = &r {
                    let why = crate::error_chain(e);
                    tracing::error!(tap = tap.name(), "virtio-net RX worker stopped: {e}: {why}");
                    if let Ok(mut f) = failure2.lock() {
                        *f = Some(format!("{e}: {why}"));
                    }
                }
                r
            })
            .map_err(NetError::Spawn)?;
        Ok(Self {
            stop,
            failure,
            thread: Some(thread),
        })
    }

    /// Why the worker failed, once it has (`None` while it runs or after a clean stop).
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Whether the thread is still running (false after an error).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the thread and returns how it ended.
    pub fn stop(mut self) -> Result<(), NetError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), NetError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        if let Err(e) = self.stop.write(1) {
            tracing::warn!(error = %e, "signalling the RX worker to stop failed");
        }
        thread.join().map_err(|_| NetError::WorkerPanicked)?
    }
}

impl Drop for NetWorker {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn rx_loop(
    dev: &Mutex<VirtioNet>,
    tap: &Tap,
    kick: &EventFd,
    epoll: &Epoll,
) -> Result<(), NetError> {
    let tap_fd = tap.as_raw_fd();
    let mut rx = RxPending {
        buf: vec![0; MAX_BUFFER_LEN],
        len: None,
        error: None,
    };
    let mut tap_armed = true;
    // Frames may have queued up before the worker started (or before a restore).
    let mut run_pass = true;
    let mut events = [EpollEvent::default(); 4];
    loop {
        if run_pass {
            let stop = {
                let mut d = dev.lock().map_err(|_| NetError::Poisoned)?;
                rx_pass(&mut d, &mut rx, tap)
            };
            match stop {
                RxStop::Budget => continue,
                RxStop::SourceEmpty => {}
                RxStop::SourceFailed => {
                    return Err(NetError::TapGone {
                        tap: tap.name().to_owned(),
                        source: rx
                            .error
                            .take()
                            .unwrap_or_else(|| io::Error::other("unknown")),
                    })
                }
                RxStop::NoBuffers if tap_armed => {
                    // Stop reading the TAP (its queue holds the frames) until a kick.
                    epoll
                        .ctl(
                            ControlOperation::Modify,
                            tap_fd,
                            EpollEvent::new(EventSet::empty(), TOKEN_TAP),
                        )
                        .map_err(NetError::Epoll)?;
                    tap_armed = false;
                    tracing::debug!(tap = tap.name(), "no RX buffers; TAP reads paused");
                }
                RxStop::NoBuffers => {}
            }
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(NetError::Epoll(e)),
        };
        run_pass = false;
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_STOP => return Ok(()),
                TOKEN_KICK => {
                    // The counter only says "something happened"; its value is irrelevant.
                    let _ = kick.read();
                    if !tap_armed {
                        epoll
                            .ctl(
                                ControlOperation::Modify,
                                tap_fd,
                                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_TAP),
                            )
                            .map_err(NetError::Epoll)?;
                        tap_armed = true;
                        tracing::debug!(tap = tap.name(), "RX buffers posted; TAP reads resumed");
                    }
                    run_pass = true;
                }
                _ => run_pass = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::pci::msix::RecordingMsi;
    use crate::devices::pci::PciDevice;
    use crate::devices::virtio::pci::tests::{enable_msix, mem, negotiate, r, w, BAR};
    use crate::devices::virtio::status;
    use crate::memory::GuestMem;
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    const VRING_DESC_F_NEXT: u16 = 1;
    const VRING_DESC_F_WRITE: u16 = 2;
    const MAC: [u8; 6] = [0x02, 0x54, 0x57, 0x49, 0x4e, 0x01];

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);
    impl NetSink for Recorder {
        fn send(&mut self, frame: &[u8]) -> io::Result<()> {
            self.0.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
    }

    struct Failing;
    impl NetSink for Failing {
        fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
    }

    struct Frames(RefCell<VecDeque<Vec<u8>>>);
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
    struct GuestQueue {
        mem: GuestMem,
        base: u64,
        size: u16,
        next_desc: u16,
        avail_idx: u16,
    }

    impl GuestQueue {
        fn new(mem: &GuestMem, base: u64, size: u16) -> Self {
            Self {
                mem: mem.clone(),
                base,
                size,
                next_desc: 0,
                avail_idx: 0,
            }
        }
        fn program(&self, dev: &mut impl BusDevice, q: u16, vector: u16) {
            w(dev, 0x16, 2, u64::from(q));
            w(dev, 0x18, 2, u64::from(self.size));
            w(dev, 0x1a, 2, u64::from(vector));
            w(dev, 0x20, 8, self.base);
            w(dev, 0x28, 8, self.base + 0x1000);
            w(dev, 0x30, 8, self.base + 0x2000);
            w(dev, 0x1c, 2, 1);
        }
        /// Adds a chain of (addr, len, writable) buffers and makes it available.
        fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, (addr, len, wr)) in bufs.iter().enumerate() {
                let idx = self.next_desc;
                let d = self.base + u64::from(idx) * 16;
                let mut flags = if *wr { VRING_DESC_F_WRITE } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT;
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
        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(self.base + 0x2002)).unwrap()
        }
        fn used(&self, i: u16) -> (u32, u32) {
            let e = self.base + 0x2004 + u64::from(i % self.size) * 8;
            (
                self.mem.read_obj(GuestAddress(e)).unwrap(),
                self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
            )
        }
    }

    struct Setup {
        dev: VirtioNet,
        msi: Arc<RecordingMsi>,
        mem: GuestMem,
        rxq: GuestQueue,
        txq: GuestQueue,
        sent: Recorder,
    }

    /// A live device as a Linux driver would leave it: VERSION_1|MAC|STATUS, MSI-X on,
    /// config vector 0, RX vector 1, TX vector 2, DRIVER_OK.
    fn setup() -> Setup {
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

    fn frame(src_last: u8, len: usize) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, src_last, 0x08, 0x00]);
        f.extend((0..len - 14).map(|i| i as u8));
        f
    }

    fn dirty(mem: &GuestMem, addr: u64) -> bool {
        mem.find_region(GuestAddress(addr))
            .unwrap()
            .bitmap()
            .dirty_at(addr as usize)
    }

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
    fn rx_fills_buffers_and_waits_for_more() {
        let mut s = setup();
        let src = Frames(RefCell::new(
            [frame(1, 60), frame(2, 1514), frame(3, 80)].into(),
        ));
        let mut rx = RxPending {
            buf: vec![0; MAX_BUFFER_LEN],
            len: None,
            error: None,
        };
        s.rxq.add(&[(0x50000, 1526, true)]);
        s.rxq.add(&[(0x51000, 12, true), (0x52000, 1514, true)]);
        s.msi.take();
        assert_eq!(rx_pass(&mut s.dev, &mut rx, &src), RxStop::NoBuffers);
        assert_eq!(s.rxq.used_idx(), 2);
        assert_eq!(s.rxq.used(0), (0, 72));
        assert_eq!(s.rxq.used(1), (1, 1526));
        let mut got = vec![0u8; 72];
        s.mem.read_slice(&mut got, GuestAddress(0x50000)).unwrap();
        assert_eq!(&got[..12], &RX_HEADER);
        assert_eq!(&got[12..], &frame(1, 60)[..]);
        let mut got = vec![0u8; 1514];
        s.mem.read_slice(&mut got, GuestAddress(0x52000)).unwrap();
        assert_eq!(got, frame(2, 1514));
        assert!(dirty(&s.mem, 0x50000) && dirty(&s.mem, 0x52000) && dirty(&s.mem, 0x12002));
        let msgs = s.msi.take();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].data, 0x41);

        // The third frame waits for a buffer; nothing is lost.
        assert!(rx.len.is_some());
        s.rxq.add(&[(0x53000, 2048, true)]);
        assert_eq!(rx_pass(&mut s.dev, &mut rx, &src), RxStop::SourceEmpty);
        assert_eq!(s.rxq.used_idx(), 3);
        assert_eq!(s.rxq.used(2), (3, 92));
        assert_eq!(s.dev.device().stats().rx_frames, 3);
    }

    #[test]
    fn paused_rx_leaves_guest_memory_alone_until_resumed() {
        use crate::devices::Pausable;
        let mut s = setup();
        let src = Frames(RefCell::new([frame(1, 60)].into()));
        let mut rx = RxPending {
            buf: vec![0; MAX_BUFFER_LEN],
            len: None,
            error: None,
        };
        s.rxq.add(&[(0x50000, 1526, true)]);
        s.msi.take();
        s.dev.pause().unwrap();
        assert_eq!(rx_pass(&mut s.dev, &mut rx, &src), RxStop::NoBuffers);
        assert_eq!(s.rxq.used_idx(), 0, "nothing delivered while paused");
        assert!(s.msi.take().is_empty(), "no interrupt while paused");
        assert_eq!(src.0.borrow().len(), 1, "the frame stays in the TAP");
        // Drain the kick of the device's activation.
        let _ = s.dev.device().rx_kick.read();
        s.dev.resume().unwrap();
        assert_eq!(
            s.dev.device().rx_kick.read().unwrap(),
            1,
            "resume wakes the worker"
        );
        assert_eq!(rx_pass(&mut s.dev, &mut rx, &src), RxStop::SourceEmpty);
        assert_eq!(s.rxq.used_idx(), 1);
    }

    #[test]
    fn rx_oversized_frame_is_dropped_and_buffer_kept() {
        let mut s = setup();
        let src = Frames(RefCell::new([frame(1, 1514), frame(2, 60)].into()));
        let mut rx = RxPending {
            buf: vec![0; MAX_BUFFER_LEN],
            len: None,
            error: None,
        };
        s.rxq.add(&[(0x50000, 200, true)]);
        assert_eq!(rx_pass(&mut s.dev, &mut rx, &src), RxStop::SourceEmpty);
        assert_eq!(s.rxq.used_idx(), 1);
        assert_eq!(s.rxq.used(0), (0, 72));
        assert_eq!(s.dev.device().stats().rx_dropped, 1);
    }

    #[test]
    fn rx_garbage_stops_the_queue_and_frames_drop() {
        let mut s = setup();
        let src = Frames(RefCell::new([frame(1, 60), frame(2, 60)].into()));
        let mut rx = RxPending {
            buf: vec![0; MAX_BUFFER_LEN],
            len: None,
            error: None,
        };
        // A buffer too small for even the header.
        s.rxq.add(&[(0x50000, 4, true)]);
        assert_eq!(rx_pass(&mut s.dev, &mut rx, &src), RxStop::SourceEmpty);
        assert_ne!(s.dev.device_status() & status::NEEDS_RESET, 0);
        assert_eq!(s.rxq.used_idx(), 0);
        assert_eq!(s.dev.device().stats().rx_dropped, 2);

        // Before the driver is up, frames are dropped, not queued.
        let mut s = setup();
        w(&mut s.dev, 0x14, 1, 0);
        let src = Frames(RefCell::new([frame(1, 60)].into()));
        assert_eq!(rx_pass(&mut s.dev, &mut rx, &src), RxStop::SourceEmpty);
        assert_eq!(s.dev.device().stats().rx_dropped, 1);
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

    #[test]
    fn save_restore_save_is_identical() {
        let mut s = setup();
        s.txq.add(&[(0x40000, 72, false)]);
        w(&mut s.dev, 0x3004, 2, 1);
        s.rxq.add(&[(0x50000, 1526, true)]);
        s.dev.set_link_up(false);
        let st = s.dev.save().unwrap();
        assert_eq!(st.transport.queues[1].next_avail, 1);
        assert_eq!(st.transport.queues[1].next_used, 1);
        assert_eq!(st.device.mac, MAC);
        assert!(!st.device.link_up);
        // Through a real encoding, as a checkpoint would carry it.
        let bytes = bincode::serialize(&st).unwrap();
        let decoded: VirtioNetState = bincode::deserialize(&bytes).unwrap();
        let sent = Recorder::default();
        let mut restored = VirtioNet::restore(
            NetResources {
                mem: s.mem.clone(),
                msi: s.msi.clone(),
                model: Box::new(sent.clone()),
            },
            &decoded,
        )
        .unwrap();
        assert_eq!(restored.save().unwrap(), st);
        // And it carries on where the original stopped.
        s.mem
            .write_slice(&frame(9, 60), GuestAddress(0x4100c))
            .unwrap();
        s.txq.add(&[(0x41000, 72, false)]);
        s.msi.take();
        w(&mut restored, 0x3004, 2, 1);
        assert_eq!(sent.0.lock().unwrap().len(), 1);
        assert_eq!(s.txq.used_idx(), 2);
        assert_eq!(s.msi.take()[0].data, 0x42);
    }

    #[test]
    fn worker_moves_frames_between_tap_and_guest() {
        use crate::devices::tap::testutil::test_tap;
        use std::time::{Duration, Instant};
        let Some(t) = test_tap() else { return };
        let tap = t.tap.clone();
        let mut s = setup();
        s.dev.device_mut().set_sink(TapSink::boxed(tap.clone()));
        let mut rxq = s.rxq;
        let dev = Arc::new(Mutex::new(s.dev));
        let worker = NetWorker::start(dev.clone(), tap.clone()).unwrap();

        // A frame arriving while the guest has no RX buffers waits in the TAP.
        let inbound = {
            let mut f = MAC.to_vec();
            f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x77, 0x08, 0x00]);
            f.resize(100, 0x5a);
            f
        };
        t.inject(&inbound);
        std::thread::sleep(Duration::from_millis(50));
        for i in 0..8 {
            rxq.add(&[(0x60000 + i * 0x1000, 2048, true)]);
        }
        w(&mut *dev.lock().unwrap(), 0x3000, 2, 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        let found = 'outer: loop {
            {
                let _g = dev.lock().unwrap();
                for i in 0..rxq.used_idx() {
                    let (id, len) = rxq.used(i);
                    let mut buf = vec![0u8; len as usize];
                    s.mem
                        .read_slice(&mut buf, GuestAddress(0x60000 + u64::from(id) * 0x1000))
                        .unwrap();
                    if buf.len() > 18 && buf[18..24] == inbound[6..12] {
                        break 'outer Some(buf);
                    }
                }
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let buf = found.expect("inbound frame delivered to the guest");
        assert_eq!(&buf[..12], &RX_HEADER);
        assert_eq!(&buf[12..], &inbound[..]);

        // TX goes out of the TAP to the host side.
        let out = frame(0x99, 64);
        s.mem
            .write_slice(&[0u8; 12], GuestAddress(0x40000))
            .unwrap();
        s.mem.write_slice(&out, GuestAddress(0x4000c)).unwrap();
        s.txq.add(&[(0x40000, 76, false)]);
        w(&mut *dev.lock().unwrap(), 0x3004, 2, 1);
        let got = t
            .capture([0x02, 0, 0, 0, 0, 0x99], Duration::from_secs(2))
            .expect("TX frame seen on the host side");
        assert_eq!(got, out);

        assert!(worker.is_running());
        worker.stop().unwrap();
    }
}
