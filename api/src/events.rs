//! Typed lifecycle events of a Twin process and the log that holds them.
//!
//! Every event gets a sequence number (from 1, no gaps) and two clocks: `t_ms`, monotonic
//! milliseconds since the process started (for intervals), and `unix_ms` (for humans). A
//! reader asks for everything from a sequence number on, so "what happened after I did X"
//! is `since(seq_before_X)` — the typed counterpart of waiting for a log line after a mark.
//! Per-epoch events (dozens to hundreds a second) are kept in a ring of their own, so that
//! they never push the lifecycle events out, and are sent only to readers that ask.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Which part a process plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `twin run` / `twin restore`: a VM without a backup.
    Standalone,
    /// `twin protect`.
    Primary,
    /// `twin backup`, until it takes over.
    Backup,
    /// A backup that took over: the VM runs here now.
    TookOver,
}

/// What a backup decided when a session ended (`twin-backup` `takeover::decide`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Run the VM from the last committed checkpoint, now.
    TakeOver,
    /// Wait for the same VM's primary to start a new session; take over if none does.
    Grace,
    /// Keep the replica (pinned to its VM) but never fail over to it.
    Detach,
    /// Drop the replica and the pin: the VM was stopped on purpose.
    Release,
    /// Stop serving.
    Stop,
}

/// What a takeover did and how long it took.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailoverReport {
    pub epoch: u64,
    pub restore_ms: f64,
    pub announce_ms: f64,
    pub stale_frames_dropped: usize,
    /// Frames the primary's guest received after the committed epoch, delivered into the
    /// restored guest before anything else (see `backup/src/inbound.rs`).
    #[serde(default)]
    pub replayed_frames: usize,
    pub detect_to_running_ms: f64,
}

/// One event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    /// Milliseconds since the process started (monotonic).
    pub t_ms: f64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// The VM runs (booted, restored, or taken over).
    VmRunning {
        role: Role,
        mem_size: u64,
        vcpus: u32,
    },
    /// The VM stopped: `code` when the guest powered off, `reason` always.
    VmStopped { reason: String, code: Option<u8> },
    /// A snapshot was written.
    SnapshotWritten {
        dir: String,
        pages: u64,
        paused_ms: f64,
    },

    // --- primary ---
    /// The backup accepted a session.
    BackupConnected {
        backup: String,
        generation: u64,
        authenticated: bool,
        encrypted: bool,
    },
    /// Initial sync progress (at most every tenth of the RAM).
    SyncProgress { pages_done: u64, pages_total: u64 },
    /// Initial sync of a disk: its data copied so far (at most every tenth of it), live.
    DiskSyncProgress {
        disk: u32,
        bytes_done: u64,
        bytes_total: u64,
    },
    /// A disk's data was copied to the backup (its writes since are journaled and go with
    /// the first epoch).
    DiskSynced {
        disk: u32,
        capacity: u64,
        bytes: u64,
        ms: f64,
    },
    /// The initial sync was sent.
    SyncSent {
        pages: u64,
        zero_pages: u64,
        ms: f64,
    },
    /// The backup acknowledged the first epoch of a session: output flows as it commits.
    Protected { epoch: u64, generation: u64 },
    /// An epoch's checkpoint was sent (per epoch).
    EpochSent {
        epoch: u64,
        pages: u64,
        bytes: u64,
        pause_us: f64,
        stop_us: f64,
        state_us: f64,
        harvest_us: f64,
        copy_us: f64,
        eager: bool,
        /// Bytes of the dirty pages the checkpoint reported (a page each, before any is
        /// skipped as unchanged or compressed), and of the page frames sent for them.
        #[serde(default)]
        dirty_bytes: u64,
        #[serde(default)]
        page_bytes: u64,
        /// CPU time of the replication thread (and its encoding helpers) encoding the
        /// epoch, and writing it to the socket.
        #[serde(default)]
        encode_cpu_us: f64,
        #[serde(default)]
        send_cpu_us: f64,
    },
    /// The backup acknowledged an epoch (per epoch): `ack_us` from its checkpoint's send to
    /// the acknowledgement.
    EpochAcked { epoch: u64, ack_us: f64 },
    /// The backup was lost; the loss policy decided the output.
    BackupLost {
        reason: String,
        /// `release`: held output released, running unprotected; `hold`: output held.
        policy: String,
        released_frames: usize,
    },
    /// The backup took over: this primary discarded its unacknowledged output and stops.
    StoodDown {
        reason: String,
        discarded_frames: usize,
    },
    /// A peer claimed to take over without the right to (it never acknowledged).
    TakeoverIgnored { reason: String },
    /// The arbiter was asked for the VM (a takeover, or a primary running on alone):
    /// `outcome` is `won`, `lost` or `unreachable`; `generation` and `owner` as the record
    /// stands after it (when known).
    Arbitrated {
        outcome: String,
        generation: Option<u64>,
        owner: Option<String>,
    },

    // --- backup ---
    /// Listening for a primary.
    Listening { listen: String },
    /// A peer was refused: at the link (no key, wrong key, not Twin, too slow) or at its
    /// `Hello` (another VM, an old generation, busy).
    PeerRefused { peer: String, reason: String },
    /// A primary's session was admitted.
    PrimaryConnected {
        peer: String,
        vm: String,
        generation: u64,
        authenticated: bool,
        encrypted: bool,
    },
    /// The replica was (re)built for a session; the initial sync follows.
    ReplicaAllocated { mem_size: u64 },
    /// Every page of the initial sync arrived.
    SyncComplete,
    /// An epoch was applied and acknowledged (per epoch).
    EpochCommitted {
        epoch: u64,
        pages: u64,
        apply_us: f64,
    },
    /// A session ended, and what the backup does about it. `committed_epoch`: the last
    /// epoch the replica had committed when it ended (`None`: nothing to take over from).
    SessionEnded {
        reason: String,
        decision: Decision,
        #[serde(default)]
        committed_epoch: Option<u64>,
    },
    /// The takeover began: restoring the VM from the replica.
    FailoverStarted { epoch: u64 },
    /// The VM runs here now.
    FailoverComplete(FailoverReport),
    /// The takeover failed; nothing runs the VM here.
    FailoverFailed { error: String },
}

impl EventKind {
    /// Per-epoch events: frequent, kept apart, sent only on request.
    pub fn is_per_epoch(&self) -> bool {
        matches!(
            self,
            EventKind::EpochSent { .. }
                | EventKind::EpochAcked { .. }
                | EventKind::EpochCommitted { .. }
        )
    }

    /// The event's name, as in its JSON `event` field.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::VmRunning { .. } => "vm_running",
            EventKind::VmStopped { .. } => "vm_stopped",
            EventKind::SnapshotWritten { .. } => "snapshot_written",
            EventKind::BackupConnected { .. } => "backup_connected",
            EventKind::SyncProgress { .. } => "sync_progress",
            EventKind::DiskSyncProgress { .. } => "disk_sync_progress",
            EventKind::DiskSynced { .. } => "disk_synced",
            EventKind::SyncSent { .. } => "sync_sent",
            EventKind::Protected { .. } => "protected",
            EventKind::EpochSent { .. } => "epoch_sent",
            EventKind::EpochAcked { .. } => "epoch_acked",
            EventKind::BackupLost { .. } => "backup_lost",
            EventKind::StoodDown { .. } => "stood_down",
            EventKind::TakeoverIgnored { .. } => "takeover_ignored",
            EventKind::Arbitrated { .. } => "arbitrated",
            EventKind::Listening { .. } => "listening",
            EventKind::PeerRefused { .. } => "peer_refused",
            EventKind::PrimaryConnected { .. } => "primary_connected",
            EventKind::ReplicaAllocated { .. } => "replica_allocated",
            EventKind::SyncComplete => "sync_complete",
            EventKind::EpochCommitted { .. } => "epoch_committed",
            EventKind::SessionEnded { .. } => "session_ended",
            EventKind::FailoverStarted { .. } => "failover_started",
            EventKind::FailoverComplete(_) => "failover_complete",
            EventKind::FailoverFailed { .. } => "failover_failed",
        }
    }
}

/// Lifecycle events kept (a process emits a few per session; this is hours of churn).
const MAX_LIFECYCLE: usize = 10_000;
/// Per-epoch events kept: tens of seconds at the highest checkpoint rates.
const MAX_PER_EPOCH: usize = 16384;

struct Inner {
    next: u64,
    lifecycle: VecDeque<Event>,
    per_epoch: VecDeque<Event>,
}

/// The event log of one process. Writers never block on readers.
pub struct EventLog {
    inner: Mutex<Inner>,
    changed: Condvar,
    start: Instant,
}

impl EventLog {
    pub fn new() -> Arc<Self> {
        Arc::new(EventLog {
            inner: Mutex::new(Inner {
                next: 1,
                lifecycle: VecDeque::new(),
                per_epoch: VecDeque::new(),
            }),
            changed: Condvar::new(),
            start: Instant::now(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // An emitter that panicked holding the lock left whole events behind: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an event; returns its sequence number.
    pub fn emit(&self, kind: EventKind) -> u64 {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let t_ms = self.start.elapsed().as_secs_f64() * 1e3;
        let mut g = self.lock();
        let seq = g.next;
        g.next += 1;
        let per_epoch = kind.is_per_epoch();
        let ring = if per_epoch {
            &mut g.per_epoch
        } else {
            &mut g.lifecycle
        };
        ring.push_back(Event {
            seq,
            t_ms,
            unix_ms,
            kind,
        });
        let cap = if per_epoch {
            MAX_PER_EPOCH
        } else {
            MAX_LIFECYCLE
        };
        while ring.len() > cap {
            ring.pop_front();
        }
        drop(g);
        self.changed.notify_all();
        seq
    }

    /// The sequence number the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.lock().next
    }

    /// Every event still held with `seq >= since`, in order (per-epoch ones with `epochs`).
    pub fn since(&self, since: u64, epochs: bool) -> Vec<Event> {
        let g = self.lock();
        collect(&g, since, epochs)
    }

    /// Like [`EventLog::since`], but waits up to `timeout` for at least one such event.
    pub fn wait_since(&self, since: u64, epochs: bool, timeout: Duration) -> Vec<Event> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            let got = collect(&g, since, epochs);
            let left = deadline.saturating_duration_since(Instant::now());
            if !got.is_empty() || left.is_zero() {
                return got;
            }
            g = self
                .changed
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A reader that remembers where it is.
    pub fn subscribe(self: &Arc<Self>, since: u64, epochs: bool) -> Subscription {
        Subscription {
            log: self.clone(),
            next: since,
            epochs,
        }
    }
}

fn collect(g: &Inner, since: u64, epochs: bool) -> Vec<Event> {
    let pick = |ring: &VecDeque<Event>| -> Vec<Event> {
        let start = ring.partition_point(|e| e.seq < since);
        ring.range(start..).cloned().collect()
    };
    let mut out = pick(&g.lifecycle);
    if epochs {
        out.extend(pick(&g.per_epoch));
        out.sort_by_key(|e| e.seq);
    }
    out
}

/// A reader of an [`EventLog`] that moves on as it reads.
pub struct Subscription {
    log: Arc<EventLog>,
    next: u64,
    epochs: bool,
}

impl Subscription {
    /// The events that arrived since the last call, waiting up to `timeout` for one.
    pub fn next_batch(&mut self, timeout: Duration) -> Vec<Event> {
        let got = self.log.wait_since(self.next, self.epochs, timeout);
        if let Some(last) = got.last() {
            self.next = last.seq + 1;
        }
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost(reason: &str) -> EventKind {
        EventKind::BackupLost {
            reason: reason.into(),
            policy: "release".into(),
            released_frames: 0,
        }
    }

    fn epoch(n: u64) -> EventKind {
        EventKind::EpochCommitted {
            epoch: n,
            pages: 1,
            apply_us: 1.0,
        }
    }

    #[test]
    fn sequence_numbers_and_since() {
        let log = EventLog::new();
        assert_eq!(log.next_seq(), 1);
        let a = log.emit(EventKind::SyncComplete);
        let b = log.emit(epoch(1));
        let c = log.emit(lost("x"));
        assert_eq!((a, b, c), (1, 2, 3));
        let all: Vec<u64> = log.since(0, true).iter().map(|e| e.seq).collect();
        assert_eq!(all, [1, 2, 3]);
        let lifecycle: Vec<u64> = log.since(0, false).iter().map(|e| e.seq).collect();
        assert_eq!(lifecycle, [1, 3], "per-epoch events only on request");
        assert_eq!(log.since(3, true).len(), 1);
        assert!(log.since(4, true).is_empty());
    }

    #[test]
    fn per_epoch_events_never_push_lifecycle_events_out() {
        let log = EventLog::new();
        log.emit(EventKind::SyncComplete);
        for n in 0..(MAX_PER_EPOCH as u64 * 2) {
            log.emit(epoch(n));
        }
        let l = log.since(0, false);
        assert_eq!(l.len(), 1);
        assert_eq!(log.since(0, true).len(), 1 + MAX_PER_EPOCH);
    }

    #[test]
    fn a_subscription_waits_and_moves_on() {
        let log = EventLog::new();
        let mut sub = log.subscribe(1, false);
        assert!(sub.next_batch(Duration::from_millis(10)).is_empty());
        let l2 = log.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            l2.emit(EventKind::SyncComplete);
        });
        let got = sub.next_batch(Duration::from_secs(5));
        assert_eq!(got.len(), 1);
        t.join().unwrap();
        assert!(sub.next_batch(Duration::from_millis(10)).is_empty());
    }

    #[test]
    fn json_is_flat_and_tagged() {
        let log = EventLog::new();
        log.emit(EventKind::Protected {
            epoch: 7,
            generation: 2,
        });
        let e = &log.since(0, false)[0];
        let v: serde_json::Value = serde_json::to_value(e).unwrap();
        assert_eq!(v["event"], "protected");
        assert_eq!(v["epoch"], 7);
        assert_eq!(v["seq"], 1);
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(&back, e);
        assert_eq!(back.kind.name(), "protected");
        let f = EventKind::FailoverComplete(FailoverReport {
            epoch: 3,
            restore_ms: 1.0,
            announce_ms: 0.1,
            stale_frames_dropped: 0,
            replayed_frames: 2,
            detect_to_running_ms: 2.0,
        });
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["event"], "failover_complete");
        assert_eq!(v["epoch"], 3);
    }
}
