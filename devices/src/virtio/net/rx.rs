//! The RX path: frames from the TAP into the guest's RX buffers, in a [`NetWorker`] thread
//! of its own. It writes guest memory only while holding the device mutex, so whoever
//! holds that mutex (the checkpoint engine) sees no RX writes; with no buffers left it
//! stops reading the TAP (which queues the frames) until the guest notifies queue 0.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Net, NetError, VirtioNet, ETH_HLEN, MAX_BUFFER_LEN, RX_BATCH, RX_HEADER, RX_QUEUE};
use crate::tap::{Tap, VNET_HDR_LEN};
use crate::virtio::pci::QueueContext;

/// Outcome of offering one frame to the RX queue.
#[derive(Debug, PartialEq, Eq)]
enum RxOutcome {
    Delivered,
    /// Gone (no driver, bad frame, or the queue just failed): take the next one.
    Dropped,
    /// Keep the frame until the guest posts buffers.
    NoBuffers,
}

impl Net {
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

/// Something frames are received from (the TAP; a queue of frames in tests).
pub(super) trait FrameSource {
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
            let injected = if rx.len.is_none() {
                net.injected.pop_front()
            } else {
                None
            };
            if let Some(f) = injected {
                let n = f.len().min(rx.buf.len());
                rx.buf[..n].copy_from_slice(&f[..n]);
                rx.len = Some(n);
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
                    if let Some(tap) = net.rx_tap.as_mut() {
                        tap(&rx.buf[VNET_HDR_LEN..len]);
                    }
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
                    let why = error_chain(e);
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

/// The `source()` chain of an error, joined with ": " ("no further detail" if none): the
/// failure a dead NIC is reported with names its root cause, not just the outermost context.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push(c.to_string());
        cur = c.source();
    }
    if out.is_empty() {
        return "no further detail".into();
    }
    out.join(": ")
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
    use super::super::test_util::*;
    use super::super::TapSink;
    use super::*;
    use crate::virtio::pci::tests::w;
    use crate::virtio::status;
    use std::cell::RefCell;
    use vm_memory::{Bytes, GuestAddress};

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
    fn injected_frames_come_first_and_the_rx_tap_sees_every_delivered_frame() {
        let mut s = setup();
        let src = Frames(RefCell::new([frame(1, 60)].into()));
        let mut rx = RxPending {
            buf: vec![0; MAX_BUFFER_LEN],
            len: None,
            error: None,
        };
        let seen = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let log = seen.clone();
        s.dev.device_mut().set_rx_tap(Some(Box::new(move |f| {
            log.lock().unwrap().push(f.to_vec())
        })));
        // A runt is refused at once; the good one waits for a buffer.
        s.dev.device_mut().inject([frame(9, 60), vec![0; 3]]);
        assert_eq!(s.dev.device().stats().rx_dropped, 1);
        s.rxq.add(&[(0x50000, 1526, true)]);
        s.rxq.add(&[(0x51000, 1526, true)]);
        assert_eq!(rx_pass(&mut s.dev, &mut rx, &src), RxStop::SourceEmpty);
        assert_eq!(s.rxq.used_idx(), 2);
        let mut got = vec![0u8; 60];
        s.mem
            .read_slice(&mut got, GuestAddress(0x50000 + 12))
            .unwrap();
        assert_eq!(got, frame(9, 60), "the injected frame first");
        s.mem
            .read_slice(&mut got, GuestAddress(0x51000 + 12))
            .unwrap();
        assert_eq!(got, frame(1, 60), "then the TAP's");
        assert_eq!(*seen.lock().unwrap(), vec![frame(9, 60), frame(1, 60)]);
    }

    #[test]
    fn paused_rx_leaves_guest_memory_alone_until_resumed() {
        use crate::Pausable;
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
    fn worker_moves_frames_between_tap_and_guest() {
        use crate::tap::testutil::test_tap;
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
