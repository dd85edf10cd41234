//! The heartbeat thread of a session, the same on both sides.
//!
//! It sends a [`Heartbeat`] whenever nothing else went out for the interval, from a
//! real-time thread of its own: the session thread may be busy (waiting for vCPUs to park,
//! applying a large sync), and a peer that hears nothing for its timeout gives up on this
//! one. It also watches its own running: a gap in it means this whole process was stopped
//! or starved, which the backup needs to know to read a lost connection right (see
//! `Heartbeats::recent_stall`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use twin_wire::{Heartbeat, Message};

use crate::FrameWriter;

/// The monotonic clock (`CLOCK_MONOTONIC`) in nanoseconds: what `Heartbeat.sent_at_ns`
/// carries. Not comparable between hosts; an echo of it measures a round trip.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// When the thread last ran, and the end and length of the last long gap in its running.
struct Health {
    last_wake: Instant,
    last_stall: Option<(Instant, Duration)>,
}

/// The heartbeat thread of one session; stopped and joined on drop.
pub struct Heartbeats {
    done: Arc<AtomicBool>,
    health: Arc<Mutex<Health>>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeats {
    /// Starts sending on `writer` every `interval` of write silence, reporting
    /// `last_epoch`; gaps of `stall` or more in its own running are remembered.
    pub fn spawn(
        name: &str,
        writer: Arc<FrameWriter>,
        interval: Duration,
        last_epoch: Arc<AtomicU64>,
        stall: Duration,
    ) -> std::io::Result<Self> {
        let done = Arc::new(AtomicBool::new(false));
        let health = Arc::new(Mutex::new(Health {
            last_wake: Instant::now(),
            last_stall: None,
        }));
        let (d, h, role) = (done.clone(), health.clone(), name.to_string());
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || beat(&role, &writer, interval, &last_epoch, &d, &h, stall))?;
        Ok(Heartbeats {
            done,
            health,
            thread: Some(thread),
        })
    }

    /// A stall of this process that may explain a lost connection: the thread has not run
    /// for `threshold` (it is stalled now), or it was stalled that long within `memory`.
    pub fn recent_stall(&self, threshold: Duration, memory: Duration) -> Option<Duration> {
        let h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let now_gap = h.last_wake.elapsed();
        if now_gap >= threshold {
            return Some(now_gap);
        }
        h.last_stall
            .filter(|(end, len)| end.elapsed() < memory && *len >= threshold)
            .map(|(_, len)| len)
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.stop();
    }
}

fn beat(
    role: &str,
    writer: &FrameWriter,
    interval: Duration,
    last_epoch: &AtomicU64,
    done: &AtomicBool,
    health: &Mutex<Health>,
    stall: Duration,
) {
    crate::realtime::elevate_or_warn(role);
    let mut seq = 0u64;
    while !done.load(Ordering::Acquire) {
        std::thread::park_timeout(interval / 4);
        if done.load(Ordering::Acquire) {
            return;
        }
        {
            let mut h = health.lock().unwrap_or_else(|e| e.into_inner());
            let gap = h.last_wake.elapsed();
            h.last_wake = Instant::now();
            if gap >= stall {
                h.last_stall = Some((Instant::now(), gap));
            }
        }
        if writer.idle_for().is_none_or(|idle| idle < interval) {
            continue;
        }
        seq += 1;
        let beat = Message::Heartbeat(Heartbeat {
            seq,
            sent_at_ns: monotonic_ns(),
            last_epoch: last_epoch.load(Ordering::Acquire),
        });
        if writer.send(&beat).is_err() {
            return;
        }
    }
}
