//! A background client load on one guest connection: INCRs of one key, with a TIME every
//! few requests if asked, every reply recorded with when it came.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{GuestClient, Result};

/// What a request was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Incr,
    Time,
}

/// One answered request.
#[derive(Clone, Copy, Debug)]
pub struct Op {
    pub kind: OpKind,
    pub sent: Instant,
    pub replied: Instant,
    pub value: u64,
}

/// The load thread and what it shares.
pub struct IncrLoad {
    stop: Arc<AtomicBool>,
    incrs: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
    handle: JoinHandle<(GuestClient, Vec<Op>)>,
}

impl IncrLoad {
    /// Starts INCRs of `key` on `guest`, with a TIME after every `time_every` INCRs (0: INCRs
    /// only).
    pub fn start(mut guest: GuestClient, key: &'static str, time_every: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let incrs = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let (s, n, err) = (stop.clone(), incrs.clone(), error.clone());
        let handle = std::thread::spawn(move || {
            let mut ops = Vec::new();
            let mut i = 0u64;
            while !s.load(Ordering::Acquire) {
                let kind = if time_every > 0 && i % (time_every + 1) == time_every {
                    OpKind::Time
                } else {
                    OpKind::Incr
                };
                i += 1;
                let sent = Instant::now();
                let r = match kind {
                    OpKind::Incr => guest.incr(key),
                    OpKind::Time => guest.time_ns(),
                };
                match r {
                    Ok(value) => {
                        ops.push(Op {
                            kind,
                            sent,
                            replied: Instant::now(),
                            value,
                        });
                        if kind == OpKind::Incr {
                            n.fetch_add(1, Ordering::Release);
                        }
                    }
                    Err(e) => {
                        *err.lock().unwrap() = Some(format!(
                            "{kind:?} #{} sent {:?} ago failed: {e}",
                            ops.len() + 1,
                            sent.elapsed()
                        ));
                        break;
                    }
                }
            }
            (guest, ops)
        });
        IncrLoad {
            stop,
            incrs,
            error,
            handle,
        }
    }

    pub fn incrs(&self) -> u64 {
        self.incrs.load(Ordering::Acquire)
    }

    /// Waits until `n` INCRs have been answered; `Err` (with the load's own error) if the
    /// load stopped, `alive` failed or the timeout passed.
    pub fn wait_for(
        &self,
        n: u64,
        timeout: Duration,
        mut alive: impl FnMut() -> Result<()>,
    ) -> std::result::Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.incrs() >= n {
                return Ok(());
            }
            if self.handle.is_finished() {
                return Err(format!(
                    "the client load stopped after {} INCRs: {}",
                    self.incrs(),
                    self.error.lock().unwrap().clone().unwrap_or_default()
                ));
            }
            alive().map_err(|e| format!("while waiting for INCR #{n}: {e}"))?;
            if Instant::now() >= deadline {
                return Err(format!(
                    "only {} of {n} INCRs answered after {timeout:?}",
                    self.incrs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the load and returns the connection and every completed request; `Err` if it
    /// had failed.
    pub fn finish(self) -> std::result::Result<(GuestClient, Vec<Op>), String> {
        self.stop.store(true, Ordering::Release);
        let (guest, ops) = self
            .handle
            .join()
            .map_err(|_| "the client load thread panicked".to_string())?;
        match self.error.lock().unwrap().clone() {
            Some(e) => Err(e),
            None => Ok((guest, ops)),
        }
    }
}

/// Every INCR reply is the previous one plus one, starting at `first` (TIMEs are skipped):
/// none lost (a repeat), none applied twice (a skip). Returns the last.
pub fn check_incr_sequence(ops: &[Op], first: u64) -> std::result::Result<u64, String> {
    let mut last = None;
    let incrs = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| o.kind == OpKind::Incr);
    for ((i, op), want) in incrs.zip(first..) {
        if op.value != want {
            let lo = i.saturating_sub(3);
            let hi = (i + 3).min(ops.len());
            return Err(format!(
                "request #{i}: INCR returned {} where {want} was expected (an acknowledged INCR \
                 was {}); neighbourhood: {:?}",
                op.value,
                if op.value < want {
                    "lost"
                } else {
                    "applied twice or skipped"
                },
                &ops[lo..hi]
                    .iter()
                    .map(|o| (o.kind, o.value))
                    .collect::<Vec<_>>()
            ));
        }
        last = Some(op.value);
    }
    last.ok_or_else(|| "no INCR completed".to_string())
}
