//! Inbound frames forwarded to the backup as the guest receives them ([`Inbound`]), so
//! that a takeover can deliver the requests that reached this primary after its last
//! acknowledged checkpoint at once instead of after the client's retransmission timeout
//! (see `backup/src/inbound.rs` for the receiving side).
//!
//! The NIC's RX worker reports every frame it delivers, under the NIC lock
//! ([`Forward::push`]: a copy into a queue, nothing else); each is tagged with the epoch
//! open at that moment, which the checkpoint advances while the devices are locked
//! ([`Forward::set_open`]), so a frame's tag is exactly the first checkpoint that contains
//! its delivery. A thread of the session ([`forward`]) writes the queue out as it fills,
//! between whole epochs (the writer's lock keeps frames whole). Best effort: a frame
//! still queued when the primary dies is retransmitted by the client as before, and the
//! queue is bounded ([`MAX_QUEUED_BYTES`], oldest dropped).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use twin_link::FrameWriter;
use twin_wire::{Inbound, Message, MAX_INBOUND_FRAME};

/// Most frame bytes waiting to be written.
pub const MAX_QUEUED_BYTES: usize = 1 << 20;

#[derive(Default)]
struct Queue {
    frames: VecDeque<Inbound>,
    bytes: usize,
}

/// The queue between the RX worker and the forwarding thread.
pub struct Forward {
    queue: Mutex<Queue>,
    ready: Condvar,
    open: AtomicU64,
    stop: AtomicBool,
    /// Frames dropped because the queue was full.
    pub dropped: AtomicU64,
}

impl Forward {
    /// Frames delivered from now on belong to epoch `open` until [`Forward::set_open`].
    pub fn new(open: u64) -> Self {
        Forward {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            open: AtomicU64::new(open),
            stop: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        }
    }

    /// Called while the devices are locked for the checkpoint of `epoch - 1`.
    pub fn set_open(&self, epoch: u64) {
        self.open.store(epoch, Ordering::Release);
    }

    /// A frame the guest just received (called by the RX worker under the NIC lock).
    pub fn push(&self, frame: &[u8]) {
        if frame.len() > MAX_INBOUND_FRAME || self.stop.load(Ordering::Acquire) {
            return;
        }
        let mut q = self.queue.lock().expect("inbound queue poisoned");
        q.bytes += frame.len();
        q.frames.push_back(Inbound {
            epoch: self.open.load(Ordering::Acquire),
            frame: frame.to_vec(),
        });
        while q.bytes > MAX_QUEUED_BYTES {
            let Some(old) = q.frames.pop_front() else {
                break;
            };
            q.bytes -= old.frame.len();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        drop(q);
        self.ready.notify_one();
    }

    /// Ends [`forward`] (after what is queued is written) and ignores later frames.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.ready.notify_all();
    }

    /// Everything queued, waiting up to `timeout` for the first frame.
    fn take(&self, timeout: Duration) -> Vec<Inbound> {
        let q = self.queue.lock().expect("inbound queue poisoned");
        let (mut q, _) = self
            .ready
            .wait_timeout_while(q, timeout, |q| {
                q.frames.is_empty() && !self.stop.load(Ordering::Acquire)
            })
            .expect("inbound queue poisoned");
        q.bytes = 0;
        std::mem::take(&mut q.frames).into()
    }
}

/// The forwarding thread of a session: writes queued frames until [`Forward::stop`] or a
/// write fails (the session then ends on its own).
pub fn forward(f: &Forward, writer: &FrameWriter) {
    let codec = writer.codec();
    let mut buf = BytesMut::with_capacity(64 << 10);
    loop {
        let batch = f.take(Duration::from_millis(100));
        if batch.is_empty() {
            if f.stop.load(Ordering::Acquire) {
                return;
            }
            continue;
        }
        buf.clear();
        for i in batch {
            if let Err(e) = codec.encode_message(&Message::Inbound(i), &mut buf) {
                tracing::warn!("cannot encode an inbound frame for the backup: {e}");
            }
        }
        if let Err(e) = writer.write(&buf) {
            tracing::debug!("forwarding inbound frames to the backup stopped: {e}");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_tagged_with_the_epoch_open_when_they_arrive() {
        let f = Forward::new(7);
        f.push(&[1; 60]);
        f.set_open(8);
        f.push(&[2; 60]);
        let got = f.take(Duration::ZERO);
        assert_eq!(
            got.iter()
                .map(|i| (i.epoch, i.frame[0]))
                .collect::<Vec<_>>(),
            [(7, 1), (8, 2)]
        );
        assert!(f.take(Duration::ZERO).is_empty());
    }

    #[test]
    fn the_queue_is_bounded_and_stop_ends_it() {
        let f = Forward::new(1);
        for _ in 0..(MAX_QUEUED_BYTES / 1000 + 5) {
            f.push(&[0; 1000]);
        }
        assert_eq!(f.dropped.load(Ordering::Relaxed), 5);
        assert_eq!(f.take(Duration::ZERO).len(), MAX_QUEUED_BYTES / 1000);
        f.stop();
        f.push(&[0; 60]);
        assert!(
            f.take(Duration::from_secs(5)).is_empty(),
            "stopped: returns at once"
        );
    }
}
