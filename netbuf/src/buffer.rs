//! [`NetBuffer`]: the output commit buffer.

use crate::latency::{LatencyRecorder, LatencySummary};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Limits and first epoch of a [`NetBuffer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetBufferConfig {
    /// Most frame bytes held at once (held for an ack plus queued for output).
    pub max_bytes: usize,
    /// Most frames held at once.
    pub max_frames: usize,
    /// Epoch that frames pushed before the first `seal` belong to.
    pub first_epoch: u64,
    /// Number of recent release latencies kept for the median and p99.
    pub latency_window: usize,
}

impl Default for NetBufferConfig {
    /// 16 MiB / 16384 frames: several epochs of a saturated 1 Gb/s link at 25 ms epochs
    /// (about 3 MiB per epoch), so overflow means the backup is far behind, not a burst.
    fn default() -> Self {
        Self {
            max_bytes: 16 << 20,
            max_frames: 16384,
            first_epoch: 1,
            latency_window: 1024,
        }
    }
}

/// What the buffer does with frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Output commit: frames wait for the ack of their epoch.
    Protected,
    /// The backup is lost and the policy is to keep running unprotected: frames are queued
    /// for output at once.
    Unprotected,
    /// This primary must not emit anything more (it was fenced, or the backup is taking
    /// over): unacknowledged and new frames are discarded.
    Fenced,
}

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// Held until `epoch` is acknowledged.
    Held {
        /// Epoch the frame belongs to.
        epoch: u64,
    },
    /// Queued for output at once ([`Mode::Unprotected`]).
    Queued,
    /// Dropped and counted.
    Dropped(DropReason),
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The buffer is full (bytes or frames). The newest frame is dropped, as a congested
    /// NIC would; the guest's TCP retransmits. The vCPU is never blocked.
    Overflow,
    /// A single frame larger than the whole byte budget.
    TooLarge,
    /// The buffer is [`Mode::Fenced`].
    Fenced,
    /// The buffer was closed.
    Closed,
}

/// `seal` was called with an epoch that is not ahead of the open one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The epoch was already sealed (or is older).
    #[error("cannot seal epoch {epoch}: frames are already being collected for epoch {open}")]
    Backwards {
        /// The epoch to seal.
        epoch: u64,
        /// The open epoch.
        open: u64,
    },
    /// No epoch can follow `u64::MAX`.
    #[error("epoch number space exhausted")]
    Overflow,
}

/// `ack` named an epoch whose checkpoint was never taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// Acknowledging an unsealed epoch would release output whose checkpoint does not exist.
    #[error("ack of epoch {epoch}, but the last sealed epoch is {last_sealed:?}")]
    NotSealed {
        /// The acknowledged epoch.
        epoch: u64,
        /// The last sealed epoch.
        last_sealed: Option<u64>,
    },
}

/// The buffer was closed and every queued frame has been taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("network buffer closed")]
pub struct Closed;

/// A frame leaving the buffer for the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasedFrame {
    /// Epoch the frame belonged to.
    pub epoch: u64,
    /// The frame, exactly as pushed.
    pub frame: Vec<u8>,
}

/// A snapshot of a [`NetBuffer`]'s position and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetBufferStats {
    /// Current mode.
    pub mode: Mode,
    /// Epoch frames pushed now belong to.
    pub open_epoch: u64,
    /// Last sealed epoch.
    pub last_sealed: Option<u64>,
    /// Last acknowledged epoch.
    pub last_acked: Option<u64>,
    /// Frames waiting for an ack.
    pub held_frames: usize,
    /// Bytes waiting for an ack.
    pub held_bytes: usize,
    /// Frames released (acked) but not yet taken by the output side.
    pub queued_frames: usize,
    /// Bytes released but not yet taken.
    pub queued_bytes: usize,
    /// Frames handed to the output side since creation.
    pub released_frames: u64,
    /// Bytes handed to the output side since creation.
    pub released_bytes: u64,
    /// Frames dropped because the buffer was full (or a frame alone exceeded it).
    pub dropped_overflow_frames: u64,
    /// Bytes dropped because the buffer was full.
    pub dropped_overflow_bytes: u64,
    /// Frames discarded by policy (fenced, `discard_held`, closed).
    pub discarded_frames: u64,
    /// Bytes discarded by policy.
    pub discarded_bytes: u64,
    /// Push-to-release latency.
    pub latency: LatencySummary,
}

struct Entry {
    epoch: u64,
    pushed_at: Instant,
    frame: Vec<u8>,
}

struct Inner {
    mode: Mode,
    closed: bool,
    open_epoch: u64,
    last_sealed: Option<u64>,
    last_acked: Option<u64>,
    /// Frames waiting for the ack of their epoch, in push order (so epochs never decrease).
    held: VecDeque<Entry>,
    held_bytes: usize,
    /// Frames released, waiting for the output side, in release order.
    queued: VecDeque<Entry>,
    queued_bytes: usize,
    released_frames: u64,
    released_bytes: u64,
    dropped_overflow_frames: u64,
    dropped_overflow_bytes: u64,
    discarded_frames: u64,
    discarded_bytes: u64,
    /// Whether the last push overflowed: overflow is logged once per episode, not per frame.
    overflowing: bool,
    latency: LatencyRecorder,
}

impl Inner {
    fn has_open_output(&self) -> bool {
        self.mode == Mode::Protected && self.held.back().is_some_and(|e| e.epoch >= self.open_epoch)
    }

    fn release_through(&mut self, epoch: u64) -> usize {
        let mut n = 0;
        while self.held.front().is_some_and(|e| e.epoch <= epoch) {
            if let Some(e) = self.held.pop_front() {
                self.held_bytes -= e.frame.len();
                self.queued_bytes += e.frame.len();
                self.queued.push_back(e);
                n += 1;
            }
        }
        n
    }

    fn release_everything(&mut self) -> usize {
        let n = self.held.len();
        self.queued_bytes += self.held_bytes;
        self.held_bytes = 0;
        self.queued.append(&mut self.held);
        n
    }

    fn discard_held(&mut self) -> usize {
        let n = self.held.len();
        self.discarded_frames += n as u64;
        self.discarded_bytes += self.held_bytes as u64;
        self.held.clear();
        self.held_bytes = 0;
        n
    }

    fn take_queued(&mut self) -> Vec<ReleasedFrame> {
        let now = Instant::now();
        let mut out = Vec::with_capacity(self.queued.len());
        for e in self.queued.drain(..) {
            self.latency
                .record(now.saturating_duration_since(e.pushed_at));
            self.released_frames += 1;
            self.released_bytes += e.frame.len() as u64;
            out.push(ReleasedFrame {
                epoch: e.epoch,
                frame: e.frame,
            });
        }
        self.queued_bytes = 0;
        out
    }
}

struct Shared {
    config: NetBufferConfig,
    inner: Mutex<Inner>,
    /// Signalled when frames are queued for output or the buffer is closed.
    queued: Condvar,
    /// Signalled when the open epoch gets its first held frame (or the buffer is closed):
    /// wakes an eager primary, which checkpoints as soon as output waits.
    output_opened: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves `Inner` consistent before anything that could panic,
        // so a poisoned lock is still usable: the vCPU thread must never panic on it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, frame: Vec<u8>) -> PushOutcome {
        let len = frame.len();
        let pushed_at = Instant::now();
        let (outcome, overflow_started, totals) = {
            let mut s = self.lock();
            let outcome = if s.closed {
                PushOutcome::Dropped(DropReason::Closed)
            } else if s.mode == Mode::Fenced {
                PushOutcome::Dropped(DropReason::Fenced)
            } else if len > self.config.max_bytes {
                PushOutcome::Dropped(DropReason::TooLarge)
            } else if s.held.len() + s.queued.len() >= self.config.max_frames
                || s.held_bytes + s.queued_bytes + len > self.config.max_bytes
            {
                PushOutcome::Dropped(DropReason::Overflow)
            } else {
                let entry = Entry {
                    epoch: s.open_epoch,
                    pushed_at,
                    frame,
                };
                if s.mode == Mode::Unprotected {
                    s.queued_bytes += len;
                    s.queued.push_back(entry);
                    self.queued.notify_one();
                    PushOutcome::Queued
                } else {
                    let epoch = entry.epoch;
                    let opens = !s.has_open_output();
                    s.held_bytes += len;
                    s.held.push_back(entry);
                    if opens {
                        // Only the first frame of an epoch wakes: one futex call per epoch.
                        self.output_opened.notify_all();
                    }
                    PushOutcome::Held { epoch }
                }
            };
            let mut overflow_started = false;
            match outcome {
                PushOutcome::Dropped(DropReason::Overflow | DropReason::TooLarge) => {
                    s.dropped_overflow_frames += 1;
                    s.dropped_overflow_bytes += len as u64;
                    overflow_started = !s.overflowing;
                    s.overflowing = true;
                }
                PushOutcome::Dropped(DropReason::Fenced | DropReason::Closed) => {
                    s.discarded_frames += 1;
                    s.discarded_bytes += len as u64;
                }
                PushOutcome::Held { .. } | PushOutcome::Queued => s.overflowing = false,
            }
            let totals = (
                s.held.len() + s.queued.len(),
                s.held_bytes + s.queued_bytes,
                s.dropped_overflow_frames,
            );
            (outcome, overflow_started, totals)
        };
        if overflow_started {
            // Logged outside the lock, once per overflow episode.
            warn!(
                frames = totals.0,
                bytes = totals.1,
                dropped_total = totals.2,
                frame_len = len,
                "output buffer full: dropping guest frames until the backup catches up"
            );
        }
        outcome
    }
}

/// The output commit buffer; see the crate documentation. Cloning gives another handle to
/// the same buffer.
#[derive(Clone)]
pub struct NetBuffer {
    shared: Arc<Shared>,
}

/// A push-only handle for the device side (the virtio-net TX path): cheap to clone, never
/// blocks beyond a short mutex hold, never fails.
#[derive(Clone)]
pub struct FrameSink {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NetBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetBuffer")
            .field("stats", &self.stats())
            .finish()
    }
}

impl std::fmt::Debug for FrameSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSink").finish_non_exhaustive()
    }
}

impl FrameSink {
    /// Copy `frame` into the buffer, tagged with the open epoch.
    pub fn push(&self, frame: &[u8]) -> PushOutcome {
        // Copy before taking the lock, so the lock is held for a few pointer moves only.
        self.shared.push(frame.to_vec())
    }

    /// Move an owned frame into the buffer, tagged with the open epoch.
    pub fn push_vec(&self, frame: Vec<u8>) -> PushOutcome {
        self.shared.push(frame)
    }
}

impl Default for NetBuffer {
    fn default() -> Self {
        Self::new(NetBufferConfig::default())
    }
}

impl NetBuffer {
    /// A buffer in [`Mode::Protected`], collecting frames for `config.first_epoch`.
    pub fn new(config: NetBufferConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                inner: Mutex::new(Inner {
                    mode: Mode::Protected,
                    closed: false,
                    open_epoch: config.first_epoch,
                    last_sealed: None,
                    last_acked: None,
                    held: VecDeque::new(),
                    held_bytes: 0,
                    queued: VecDeque::new(),
                    queued_bytes: 0,
                    released_frames: 0,
                    released_bytes: 0,
                    dropped_overflow_frames: 0,
                    dropped_overflow_bytes: 0,
                    discarded_frames: 0,
                    discarded_bytes: 0,
                    overflowing: false,
                    latency: LatencyRecorder::new(config.latency_window),
                }),
                queued: Condvar::new(),
                output_opened: Condvar::new(),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> NetBufferConfig {
        self.shared.config
    }

    /// A push-only handle for the device side.
    pub fn sink(&self) -> FrameSink {
        FrameSink {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Same as `self.sink().push(frame)`.
    pub fn push(&self, frame: &[u8]) -> PushOutcome {
        self.shared.push(frame.to_vec())
    }

    /// Close epoch `epoch`: every frame pushed so far belongs to it (or to an earlier
    /// epoch), every frame pushed from now on to `epoch + 1`.
    ///
    /// The primary calls this while the vCPUs are paused for checkpoint `epoch`, after the
    /// device has stopped transmitting, so that the frames of the epoch are exactly those
    /// the checkpointed guest state has already sent. `epoch` is normally the open epoch;
    /// a larger one is allowed (the held frames simply belong to an earlier epoch).
    pub fn seal(&self, epoch: u64) -> Result<(), SealError> {
        let mut s = self.shared.lock();
        if epoch < s.open_epoch {
            return Err(SealError::Backwards {
                epoch,
                open: s.open_epoch,
            });
        }
        s.open_epoch = epoch.checked_add(1).ok_or(SealError::Overflow)?;
        s.last_sealed = Some(epoch);
        Ok(())
    }

    /// Whether output waits in the open epoch: frames only the next checkpoint can release.
    /// The primary checkpoints early when there is (eager output commit).
    pub fn has_open_output(&self) -> bool {
        self.shared.lock().has_open_output()
    }

    /// Blocks until output waits in the open epoch ([`NetBuffer::has_open_output`]) or
    /// `deadline` passes, and says which: an eager primary sleeps here instead of polling.
    pub fn wait_for_open_output(&self, deadline: Instant) -> bool {
        let mut s = self.shared.lock();
        loop {
            if s.has_open_output() {
                return true;
            }
            let now = Instant::now();
            if s.closed || now >= deadline {
                return false;
            }
            s = self
                .shared
                .output_opened
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The backup has committed checkpoint `epoch`: release, in push order, every held frame
    /// of epochs `<= epoch` to the output queue. Returns how many were released; an ack of
    /// an epoch already acknowledged releases nothing.
    pub fn ack(&self, epoch: u64) -> Result<usize, AckError> {
        let mut s = self.shared.lock();
        if s.last_sealed.is_none_or(|sealed| epoch > sealed) {
            return Err(AckError::NotSealed {
                epoch,
                last_sealed: s.last_sealed,
            });
        }
        if s.last_acked.is_some_and(|acked| epoch <= acked) {
            return Ok(0);
        }
        s.last_acked = Some(epoch);
        let n = s.release_through(epoch);
        if n > 0 {
            self.shared.queued.notify_all();
        }
        Ok(n)
    }

    /// Policy "backup lost, run unprotected": release every held frame now, in order, and
    /// queue future frames at once. Returns how many held frames were released.
    pub fn release_all(&self) -> usize {
        let n = {
            let mut s = self.shared.lock();
            s.mode = Mode::Unprotected;
            let n = s.release_everything();
            self.shared.queued.notify_all();
            n
        };
        info!(released = n, "output commit off: running unprotected");
        n
    }

    /// Policy "this primary must go silent" (it was fenced, or the backup takes over from
    /// its last acknowledged checkpoint): discard every unacknowledged frame, which the
    /// backup's copy of the guest will produce again, and every future one. Frames already
    /// acknowledged stay queued for output: their checkpoint is safe on the backup.
    /// Returns how many frames were discarded.
    pub fn fence(&self) -> usize {
        let n = {
            let mut s = self.shared.lock();
            s.mode = Mode::Fenced;
            s.discard_held()
        };
        info!(discarded = n, "output fenced");
        n
    }

    /// Discard every unacknowledged frame without changing the mode. Returns how many.
    pub fn discard_held(&self) -> usize {
        let n = self.shared.lock().discard_held();
        debug!(discarded = n, "held output discarded");
        n
    }

    /// Resume output commit (a new backup finished its initial sync): frames pushed from
    /// now on belong to `next_epoch`, and acks are counted from there. Frames still held
    /// (possible only if already protected) are kept.
    pub fn protect(&self, next_epoch: u64) {
        {
            let mut s = self.shared.lock();
            s.mode = Mode::Protected;
            s.open_epoch = next_epoch;
            s.last_sealed = None;
            s.last_acked = None;
        }
        info!(next_epoch, "output commit on");
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.shared.lock().mode
    }

    /// Take every frame queued for output, in order, without waiting.
    pub fn take_released(&self) -> Vec<ReleasedFrame> {
        self.shared.lock().take_queued()
    }

    /// Wait up to `timeout` for frames queued for output and take them all, in order. An
    /// empty vector means the timeout expired. `Err(Closed)` once the buffer is closed and
    /// drained. Meant for a single output thread: with several, each gets a batch in order
    /// but the batches race each other to the wire.
    pub fn wait_released(&self, timeout: Duration) -> Result<Vec<ReleasedFrame>, Closed> {
        let s = self.shared.lock();
        let (mut s, _) = self
            .shared
            .queued
            .wait_timeout_while(s, timeout, |s| s.queued.is_empty() && !s.closed)
            .unwrap_or_else(PoisonError::into_inner);
        if s.queued.is_empty() && s.closed {
            return Err(Closed);
        }
        Ok(s.take_queued())
    }

    /// Close the buffer: later pushes are discarded, and the output side gets `Closed` once
    /// it has taken what is queued. Held frames are neither released nor counted; call
    /// [`NetBuffer::release_all`] or [`NetBuffer::fence`] first to decide their fate.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.queued.notify_all();
        self.shared.output_opened.notify_all();
    }

    /// A snapshot of position and counters.
    pub fn stats(&self) -> NetBufferStats {
        let (stats, latency) = {
            let s = self.shared.lock();
            (self.counters(&s), s.latency.clone())
        };
        // Percentiles are computed outside the lock, which the vCPU thread also takes.
        NetBufferStats {
            latency: latency.summary(),
            ..stats
        }
    }

    fn counters(&self, s: &Inner) -> NetBufferStats {
        NetBufferStats {
            mode: s.mode,
            open_epoch: s.open_epoch,
            last_sealed: s.last_sealed,
            last_acked: s.last_acked,
            held_frames: s.held.len(),
            held_bytes: s.held_bytes,
            queued_frames: s.queued.len(),
            queued_bytes: s.queued_bytes,
            released_frames: s.released_frames,
            released_bytes: s.released_bytes,
            dropped_overflow_frames: s.dropped_overflow_frames,
            dropped_overflow_bytes: s.dropped_overflow_bytes,
            discarded_frames: s.discarded_frames,
            discarded_bytes: s.discarded_bytes,
            latency: LatencySummary::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u32) -> Vec<u8> {
        let mut f = vec![0u8; 12]; // virtio-net header
        f.extend_from_slice(&n.to_le_bytes());
        f
    }

    fn ids(frames: &[ReleasedFrame]) -> Vec<u32> {
        frames
            .iter()
            .map(|f| u32::from_le_bytes(f.frame[12..16].try_into().unwrap()))
            .collect()
    }

    fn buffer() -> NetBuffer {
        NetBuffer::new(NetBufferConfig::default())
    }

    #[test]
    fn a_waiting_primary_wakes_on_the_first_frame_of_an_epoch() {
        let b = buffer();
        let start = Instant::now();
        assert!(!b.wait_for_open_output(start + Duration::from_millis(20)));
        assert!(
            start.elapsed() >= Duration::from_millis(20),
            "waits out its deadline"
        );
        let sink = b.sink();
        let pusher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            sink.push(&frame(1));
        });
        assert!(
            b.wait_for_open_output(Instant::now() + Duration::from_secs(30)),
            "woken by the push, long before the deadline"
        );
        pusher.join().unwrap();
        b.seal(1).unwrap();
        assert!(
            !b.wait_for_open_output(Instant::now()),
            "sealed output is not open"
        );
        b.close();
        assert!(!b.wait_for_open_output(Instant::now() + Duration::from_secs(30)));
    }

    #[test]
    fn open_output_is_what_the_next_seal_would_close() {
        let b = buffer();
        assert!(!b.has_open_output());
        b.push(&frame(1));
        assert!(b.has_open_output());
        b.seal(1).unwrap();
        assert!(
            !b.has_open_output(),
            "sealed output waits for an ack, not a checkpoint"
        );
        b.push(&frame(2));
        assert!(b.has_open_output());
        b.release_all();
        b.push(&frame(3));
        assert!(!b.has_open_output(), "unprotected output is not held");
    }

    #[test]
    fn frames_are_released_only_after_the_ack_of_their_epoch_in_order_once() {
        let b = buffer();
        assert_eq!(b.push(&frame(1)), PushOutcome::Held { epoch: 1 });
        assert_eq!(b.push(&frame(2)), PushOutcome::Held { epoch: 1 });
        b.seal(1).unwrap();
        assert_eq!(b.push(&frame(3)), PushOutcome::Held { epoch: 2 });
        b.seal(2).unwrap();
        b.push(&frame(4));
        assert!(b.take_released().is_empty(), "nothing before an ack");
        assert_eq!(b.ack(1), Ok(2));
        let r = b.take_released();
        assert_eq!(ids(&r), [1, 2]);
        assert!(r.iter().all(|f| f.epoch == 1));
        assert!(b.take_released().is_empty(), "exactly once");
        assert_eq!(b.ack(2), Ok(1));
        assert_eq!(ids(&b.take_released()), [3]);
        // Frame 4 belongs to the open epoch 3, which is not sealed.
        assert_eq!(
            b.ack(3),
            Err(AckError::NotSealed {
                epoch: 3,
                last_sealed: Some(2)
            })
        );
        let s = b.stats();
        assert_eq!((s.held_frames, s.held_bytes), (1, 16));
        assert_eq!((s.released_frames, s.released_bytes), (3, 48));
        assert_eq!(s.latency.count, 3);
    }

    #[test]
    fn an_ack_releases_every_earlier_epoch() {
        let b = buffer();
        for e in 1..=3 {
            b.push(&frame(e));
            b.seal(u64::from(e)).unwrap();
        }
        assert_eq!(b.ack(3), Ok(3));
        assert_eq!(ids(&b.take_released()), [1, 2, 3]);
    }

    #[test]
    fn an_older_or_repeated_ack_releases_nothing_new() {
        let b = buffer();
        b.push(&frame(1));
        b.seal(1).unwrap();
        b.push(&frame(2));
        b.seal(2).unwrap();
        assert_eq!(b.ack(2), Ok(2));
        assert_eq!(b.ack(1), Ok(0));
        assert_eq!(b.ack(2), Ok(0));
        assert_eq!(ids(&b.take_released()), [1, 2]);
        assert_eq!(b.stats().last_acked, Some(2));
    }

    #[test]
    fn ack_before_any_seal_is_refused() {
        let b = buffer();
        b.push(&frame(1));
        assert_eq!(
            b.ack(0),
            Err(AckError::NotSealed {
                epoch: 0,
                last_sealed: None
            })
        );
        assert_eq!(b.stats().held_frames, 1);
    }

    #[test]
    fn seal_must_move_forward() {
        let b = buffer();
        b.seal(1).unwrap();
        assert_eq!(b.seal(1), Err(SealError::Backwards { epoch: 1, open: 2 }));
        // Skipping ahead is allowed: frames held keep their (earlier) epoch.
        b.push(&frame(1));
        b.seal(5).unwrap();
        assert_eq!(b.stats().open_epoch, 6);
        assert_eq!(b.ack(5), Ok(1));
        assert_eq!(b.take_released()[0].epoch, 2);
        assert_eq!(b.seal(u64::MAX), Err(SealError::Overflow));
    }

    #[test]
    fn release_all_flushes_in_order_and_passes_through() {
        let b = buffer();
        b.push(&frame(1));
        b.seal(1).unwrap();
        b.push(&frame(2));
        assert_eq!(b.release_all(), 2);
        assert_eq!(b.mode(), Mode::Unprotected);
        assert_eq!(b.push(&frame(3)), PushOutcome::Queued);
        assert_eq!(ids(&b.take_released()), [1, 2, 3]);
        // A late ack from the lost backup is harmless.
        assert_eq!(b.ack(1), Ok(0));
        // A new backup: protection resumes from the given epoch.
        b.protect(10);
        assert_eq!(b.push(&frame(4)), PushOutcome::Held { epoch: 10 });
        assert!(b.take_released().is_empty());
        b.seal(10).unwrap();
        assert_eq!(b.ack(10), Ok(1));
        assert_eq!(ids(&b.take_released()), [4]);
    }

    #[test]
    fn fence_discards_unacked_output_but_keeps_acked_output() {
        let b = buffer();
        b.push(&frame(1));
        b.seal(1).unwrap();
        b.push(&frame(2));
        b.seal(2).unwrap();
        b.push(&frame(3));
        b.ack(1).unwrap();
        assert_eq!(b.fence(), 2);
        assert_eq!(b.push(&frame(4)), PushOutcome::Dropped(DropReason::Fenced));
        assert_eq!(ids(&b.take_released()), [1]);
        let s = b.stats();
        assert_eq!((s.discarded_frames, s.discarded_bytes), (3, 48));
        assert_eq!(s.held_frames, 0);
    }

    #[test]
    fn discard_held_keeps_the_mode() {
        let b = buffer();
        b.push(&frame(1));
        assert_eq!(b.discard_held(), 1);
        assert_eq!(b.mode(), Mode::Protected);
        assert_eq!(b.push(&frame(2)), PushOutcome::Held { epoch: 1 });
    }

    #[test]
    fn overflow_drops_the_newest_frame_and_counts_it() {
        let b = NetBuffer::new(NetBufferConfig {
            max_bytes: 40,
            max_frames: 3,
            ..NetBufferConfig::default()
        });
        for n in 1..=2 {
            assert!(matches!(b.push(&frame(n)), PushOutcome::Held { .. }));
        }
        // 2 x 16 bytes held; a third 16-byte frame would make 48 > 40.
        assert_eq!(
            b.push(&frame(3)),
            PushOutcome::Dropped(DropReason::Overflow)
        );
        assert_eq!(b.push(&[0; 8]), PushOutcome::Held { epoch: 1 });
        // Now 3 frames: the frame limit applies.
        assert_eq!(b.push(&[]), PushOutcome::Dropped(DropReason::Overflow));
        assert_eq!(b.push(&[0; 41]), PushOutcome::Dropped(DropReason::TooLarge));
        let s = b.stats();
        assert_eq!(s.dropped_overflow_frames, 3);
        assert_eq!(s.dropped_overflow_bytes, 16 + 41);
        assert_eq!((s.held_frames, s.held_bytes), (3, 40));
        // Queued-but-not-taken frames still count against the budget.
        b.seal(1).unwrap();
        b.ack(1).unwrap();
        assert_eq!(
            b.push(&frame(9)),
            PushOutcome::Dropped(DropReason::Overflow)
        );
        assert_eq!(ids(&b.take_released()[..2]), [1, 2]);
        assert!(matches!(b.push(&frame(9)), PushOutcome::Held { .. }));
    }

    #[test]
    fn wait_released_wakes_on_ack_and_ends_on_close() {
        let b = buffer();
        assert_eq!(b.wait_released(Duration::from_millis(1)), Ok(vec![]));
        b.push(&frame(1));
        b.seal(1).unwrap();
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || b.wait_released(Duration::from_secs(30)))
        };
        std::thread::sleep(Duration::from_millis(20));
        b.ack(1).unwrap();
        assert_eq!(ids(&waiter.join().unwrap().unwrap()), [1]);
        b.push(&frame(2));
        b.release_all();
        b.close();
        assert_eq!(b.push(&frame(3)), PushOutcome::Dropped(DropReason::Closed));
        // Queued frames are still delivered after close, then Closed.
        assert_eq!(ids(&b.wait_released(Duration::from_secs(1)).unwrap()), [2]);
        assert_eq!(b.wait_released(Duration::from_secs(1)), Err(Closed));
    }

    #[test]
    fn release_thread_writes_in_order_and_counts_errors() {
        let b = buffer();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = b
            .spawn_release_thread("netbuf-test", move |f| {
                let id = u32::from_le_bytes(f[12..16].try_into().unwrap());
                if id == 2 {
                    return Err(std::io::Error::other("tap gone"));
                }
                tx.send(id).map_err(std::io::Error::other)
            })
            .unwrap();
        for n in 1..=4 {
            b.push(&frame(n));
        }
        b.seal(1).unwrap();
        b.ack(1).unwrap();
        b.close();
        let report = t.join().unwrap();
        assert_eq!(report.written, 3);
        assert_eq!(report.write_errors, 1);
        assert_eq!(rx.iter().collect::<Vec<_>>(), [1, 3, 4]);
    }

    #[test]
    fn sink_handle_pushes_into_the_same_buffer() {
        let b = buffer();
        let sink = b.sink();
        let sink2 = sink.clone();
        sink.push(&frame(1));
        sink2.push_vec(frame(2));
        b.seal(1).unwrap();
        b.ack(1).unwrap();
        assert_eq!(ids(&b.take_released()), [1, 2]);
    }

    #[test]
    fn release_latency_is_measured_from_push() {
        let b = buffer();
        b.push(&frame(1));
        std::thread::sleep(Duration::from_millis(5));
        b.seal(1).unwrap();
        b.ack(1).unwrap();
        b.take_released();
        let l = b.stats().latency;
        assert_eq!(l.count, 1);
        assert!(l.max >= Duration::from_millis(5));
        assert_eq!(l.p50, l.last);
    }
}
