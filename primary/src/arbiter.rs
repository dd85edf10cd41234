//! The primary's side of arbitration (`--arbiter`): it creates its VM's ownership record,
//! watches it (a takeover elsewhere fences this primary at once), and before it releases
//! output no backup acknowledged it claims the record for itself — only a primary that won
//! that compare-and-swap may run on alone.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};
use twin_api::EventKind;
use twin_arbiter::{Claim, Seen};

use crate::{ModeEvent, Shared};

/// What a claim to run on alone came to.
#[derive(Debug)]
pub(crate) enum RunOn {
    /// The record is ours at the next generation: releasing is safe.
    Won,
    /// Someone else owns the VM now (a backup took over): fence.
    Lost(String),
    /// The arbiter did not answer: hold everything until it does.
    Unreachable(String),
}

fn report(s: &Shared, outcome: &str, seen: Option<&Seen>) {
    s.events.emit(EventKind::Arbitrated {
        outcome: outcome.into(),
        generation: seen.map(Seen::generation),
        owner: seen
            .and_then(|x| x.record.as_ref())
            .map(|r| r.owner.label.clone()),
    });
}

/// Claims the VM for this primary at the next generation, against the last view of it.
pub(crate) fn run_on(s: &Shared) -> RunOn {
    let Some(arb) = &s.cfg.arbiter else {
        return RunOn::Won;
    };
    let vm = s.cfg.vm_id.to_string();
    let seen = s
        .arbiter_seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or(Seen {
            record: None,
            revision: 0,
        });
    match arb.client.claim(&vm, &seen, &arb.me) {
        Ok(Claim::Won(now)) => {
            info!(
                generation = now.generation(),
                "the arbiter lets this primary run on without its backup"
            );
            report(s, "won", Some(&now));
            *s.arbiter_seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
            RunOn::Won
        }
        Ok(Claim::Lost(now)) => {
            report(s, "lost", Some(&now));
            RunOn::Lost(now.given_away())
        }
        Err(e) => {
            report(s, "unreachable", Some(&seen));
            RunOn::Unreachable(e.to_string())
        }
    }
}

/// Fences this primary because the arbiter gave the VM to someone else.
pub(crate) fn fence(s: &Shared, why: String) {
    if s.fenced.swap(true, Ordering::AcqRel) {
        return;
    }
    let discarded = s.netbuf.fence();
    warn!(discarded, "{why}: this primary is fenced and stops its VM");
    s.transition(ModeEvent::TakenOver);
    s.events.emit(EventKind::StoodDown {
        reason: why,
        discarded_frames: discarded,
    });
}

/// Waits until the arbiter thread has the VM's ownership record (created or adopted): a
/// backup acknowledges nothing before it can read it, and nothing could be claimed without
/// it. The guest's output is held meanwhile (nothing is acknowledged).
pub(crate) fn wait_for_record(s: &Shared) {
    let t0 = std::time::Instant::now();
    let mut said = false;
    while !s.stopping() && !s.fenced() {
        if s.arbiter_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return;
        }
        if !said && t0.elapsed() > Duration::from_secs(2) {
            warn!("waiting for the arbiter before protecting the VM (its output is held)");
            said = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The arbiter thread: creates (or adopts) the record, then watches it until the primary
/// stops; a record owned by anyone else fences this primary.
pub(crate) fn watch(s: &Arc<Shared>) {
    let Some(arb) = s.cfg.arbiter.clone() else {
        return;
    };
    let vm = s.cfg.vm_id.to_string();
    let done = || s.stopping() || s.fenced.load(Ordering::Acquire);
    let mut said = false;
    while !done() {
        // The record as it stands (created if absent): read afresh at the start and after
        // a broken watch, so that no change is missed.
        let current = match arb.client.get(&vm) {
            Ok(seen) if seen.record.is_none() => match arb.client.claim(&vm, &seen, &arb.me) {
                Ok(Claim::Won(now)) => {
                    info!(generation = now.generation(), "ownership record created");
                    report(s, "won", Some(&now));
                    Ok(now)
                }
                Ok(Claim::Lost(now)) => Ok(now),
                Err(e) => Err(e),
            },
            other => other,
        };
        let seen = match current {
            Ok(seen) => seen,
            Err(e) => {
                if !said {
                    warn!("cannot reach the arbiter ({e}); retrying (no backup can take over until the record exists)");
                    said = true;
                }
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if !seen.owned_by(&arb.me.id) {
            fence(s, seen.given_away());
            return;
        }
        *s.arbiter_seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(seen.clone());
        said = false;
        let mut lost: Option<Seen> = None;
        let r = arb.client.watch(&vm, seen.revision, &done, &mut |now| {
            if now.owned_by(&arb.me.id) {
                *s.arbiter_seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
                true
            } else {
                lost = Some(now);
                false
            }
        });
        if let Some(now) = lost {
            fence(s, now.given_away());
            return;
        }
        if let Err(e) = r {
            if !done() {
                error!("the watch of the ownership record broke ({e}); watching again");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}
