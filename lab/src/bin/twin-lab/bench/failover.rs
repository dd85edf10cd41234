//! Failover trials: a fresh protected VM with a client sending `INCR` back to back on one
//! connection; the primary is SIGKILLed, the time to the first reply from the backup on the
//! same connection is measured and the counter checked for continuity.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use twin_api::EventKind;
use twin_lab::etcd::EtcdHost;
use twin_lab::{Signal, TestDir, Topology};

use super::measure::{connect, save_logs, start_protected, wait_event, Protection, Slots};
use super::plan::{Plan, FAILOVER_HZ, FAILOVER_WORKLOAD};
use super::stats::json_f64;
use super::{check_interrupt, nap, Interrupted, INTERRUPTED};

#[derive(Debug, Default, Serialize)]
pub(super) struct Failover {
    pub(super) trial: u32,
    /// Both sides ran with a real etcd as the arbiter (the backup claims the VM's record
    /// before it takes over).
    pub(super) arbiter: bool,
    pub(super) error: Option<String>,
    /// SIGKILL of the primary → first reply on the same connection (from the backup).
    pub(super) client_visible_ms: Option<f64>,
    /// SIGKILL → the backup's `failover_complete` event, as the bench sees it (named after
    /// the `FAILOVER` line that event is printed as, a moment later).
    pub(super) kill_to_failover_line_ms: Option<f64>,
    /// The backup's own report (`detect_to_running_ms`, `restore_ms`, …).
    pub(super) backup_report: Option<serde_json::Value>,
    pub(super) replies_before_kill: u64,
    /// Replies the primary released just before it died that arrived after the SIGKILL.
    pub(super) late_primary_replies: u64,
    pub(super) replies_after_kill: u64,
    /// Every INCR reply was the previous one plus one, across the failover.
    pub(super) consistent: Option<bool>,
}

#[derive(Default)]
struct LoopState {
    replies: Vec<(Instant, u64)>,
    error: Option<String>,
}

pub(super) fn run_failover(
    plan: &Plan,
    trial: u32,
    arbiter: bool,
    keep_logs: &Path,
) -> Result<Failover> {
    let mut out = Failover {
        trial,
        arbiter,
        ..Default::default()
    };
    let ha = Topology::ha().context("building the ha topology")?;
    let dir = TestDir::new("bench-failover").context("creating the run directory")?;
    let mut slots = Slots::default();
    let etcd = if arbiter {
        Some(EtcdHost::start(&ha, &dir).context("starting etcd, the arbiter")?)
    } else {
        None
    };
    let result = (|| -> Result<()> {
        start_protected(
            &ha,
            &dir,
            plan,
            FAILOVER_WORKLOAD,
            Protection {
                arbiter: etcd.as_ref(),
                ..Protection::at(FAILOVER_HZ)
            },
            &mut slots,
        )?;
        let mut client = connect(&ha, slots.vm.as_mut().expect("started"))?;
        client.set_request_timeout(Duration::from_secs(10))?;
        let state = Arc::new(Mutex::new(LoopState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, stop2) = (state.clone(), stop.clone());
        let looper = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) && !INTERRUPTED.load(Ordering::SeqCst) {
                match client.incr("failover") {
                    Ok(v) => st
                        .lock()
                        .expect("loop state")
                        .replies
                        .push((Instant::now(), v)),
                    Err(e) => {
                        st.lock().expect("loop state").error = Some(e.to_string());
                        return;
                    }
                }
            }
        });
        let result = kill_and_time(plan, &mut slots, &state, &mut out);
        stop.store(true, Ordering::SeqCst);
        // The loop ends within one request (10 s at worst, when the backup never answered).
        let _ = looper.join();
        result
    })();
    // A takeover before the SIGKILL is a false one.
    let result = if out.kill_to_failover_line_ms.is_none() {
        slots.judge(result)
    } else {
        result
    };
    slots.kill();
    if let Err(e) = result {
        if e.downcast_ref::<Interrupted>().is_some() {
            return Err(e);
        }
        save_logs(&dir, keep_logs);
        out.error = Some(format!("{e:#}"));
    }
    Ok(out)
}

/// SIGKILLs the primary while the client loop runs, and times the backup's takeover and
/// the first reply after it.
fn kill_and_time(
    plan: &Plan,
    slots: &mut Slots,
    state: &Mutex<LoopState>,
    out: &mut Failover,
) -> Result<()> {
    nap(Duration::from_secs_f64(plan.warmup_secs.max(1.0)))?;
    slots.judge(Ok(()))?;
    let backup = slots.backup.as_mut().expect("started");
    let events = slots.backup_events.as_ref().expect("started");
    let mark = events.mark();
    let killed = Instant::now();
    slots
        .vm
        .as_ref()
        .expect("started")
        .signal(Signal::Kill)
        .context("SIGKILL to the primary")?;
    let done = wait_event(
        backup,
        events,
        mark,
        "the takeover",
        Duration::from_secs(20),
        |e| {
            matches!(
                e.kind,
                EventKind::FailoverComplete(_) | EventKind::FailoverFailed { .. }
            )
        },
    )?;
    let report = match done.kind {
        EventKind::FailoverComplete(report) => report,
        other => bail!("the backup's takeover failed: {other:?}"),
    };
    out.kill_to_failover_line_ms = Some(killed.elapsed().as_secs_f64() * 1e3);
    out.backup_report = serde_json::to_value(report).ok();
    // The first reply after the backup noticed the primary was gone. A reply the primary
    // released just before it died may still arrive just after the SIGKILL; it says
    // nothing about the failover, so only replies after the detection count.
    let detect_ms = json_f64(
        out.backup_report
            .as_ref()
            .unwrap_or(&serde_json::Value::Null),
        &["detect_to_running_ms"],
    )
    .unwrap_or(0.0);
    let detected = killed
        + Duration::from_secs_f64(
            (out.kill_to_failover_line_ms.unwrap_or(0.0) - detect_ms).max(0.0) / 1e3,
        );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        check_interrupt()?;
        {
            let s = state.lock().expect("loop state");
            if let Some((t, _)) = s.replies.iter().find(|(t, _)| *t > detected) {
                out.client_visible_ms = Some((*t - killed).as_secs_f64() * 1e3);
                break;
            }
            if let Some(e) = &s.error {
                bail!("the client's connection failed across the failover: {e}");
            }
        }
        if Instant::now() > deadline {
            bail!("no reply on the client's connection within 20 s of the SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    nap(Duration::from_millis(300))?;
    let s = state.lock().expect("loop state");
    out.replies_before_kill = s.replies.iter().filter(|(t, _)| *t <= killed).count() as u64;
    out.late_primary_replies = s
        .replies
        .iter()
        .filter(|(t, _)| *t > killed && *t <= detected)
        .count() as u64;
    out.replies_after_kill = s.replies.len() as u64 - out.replies_before_kill;
    out.consistent = Some(s.replies.windows(2).all(|p| p[1].1 == p[0].1 + 1));
    Ok(())
}
