//! The typed events of a protected VM's two processes, as a program reads them from their
//! control sockets (`twin events`, the `Events` request): the lifecycle of protection and of
//! a failover, in order, with their figures.

use std::time::{Duration, Instant};

use twin_api::{Decision, EventKind, Role};
use twin_lab::events::Events;
use twin_lab::rig::*;
use twin_lab::*;

/// The names of `events`' kinds, in order.
fn names(events: &[twin_api::Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.name()).collect()
}

/// `want` appears in `got` in this order (other events may come between).
fn in_order(got: &[&str], want: &[&str]) -> bool {
    let mut it = got.iter();
    want.iter().all(|w| it.any(|g| g == w))
}

#[test]
fn protection_and_failover_as_events() {
    let mut rep = Report::new("protection_and_failover_as_events");
    let mut rig = Rig::start(&mut rep, Opts::default());
    let primary = Events::at(rig.dir.join("primary.sock"));
    let backup = Events::at(rig.dir.join("backup.sock"));
    rig.wait_stream(Instant::now(), "protected stream");

    rep.step("the primary's events: running, connected, synced, protected");
    let p = primary.all(0, false).expect("primary events");
    let pn = names(&p);
    assert!(
        in_order(
            &pn,
            &["vm_running", "backup_connected", "sync_sent", "protected"]
        ),
        "primary events: {pn:?}"
    );
    assert!(matches!(
        p[0].kind,
        EventKind::VmRunning {
            role: Role::Primary,
            mem_size: 268_435_456,
            ..
        }
    ));
    let connected = p
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::BackupConnected {
                authenticated,
                encrypted,
                ..
            } => Some((*authenticated, *encrypted)),
            _ => None,
        })
        .expect("backup_connected");
    assert_eq!(
        connected,
        (true, false),
        "the rig's link is keyed, not encrypted"
    );
    // Sequence numbers rise and the clock runs forward; the per-epoch events fill the gaps
    // (a few seconds of them: none has left the ring yet).
    for w in p.windows(2) {
        assert!(w[1].seq > w[0].seq, "{:?}", names(&p));
        assert!(w[1].t_ms >= w[0].t_ms);
    }
    rep.step("per-epoch events on request only");
    let with_epochs = primary.all(0, true).expect("primary events with epochs");
    for w in with_epochs.windows(2) {
        assert_eq!(w[1].seq, w[0].seq + 1, "a gap after {:?}", w[0].kind);
    }
    let sent: Vec<_> = with_epochs
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::EpochSent {
                epoch, pause_us, ..
            } => Some((*epoch, *pause_us)),
            _ => None,
        })
        .collect();
    assert!(sent.len() >= 5, "epochs sent: {}", sent.len());
    assert!(
        sent.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "epochs in order"
    );
    assert!(sent.iter().all(|(_, us)| *us > 0.0));
    let committed = backup
        .wait_epochs(
            0,
            true,
            "an epoch committed",
            Duration::from_secs(10),
            |e| matches!(e.kind, EventKind::EpochCommitted { .. }),
        )
        .expect("the backup reports committed epochs");
    rep.note(format!("first committed: {:?}", committed.kind));

    rep.step("the backup's events before the kill");
    let b = backup.all(0, false).expect("backup events");
    let bn = names(&b);
    assert!(
        in_order(
            &bn,
            &[
                "listening",
                "primary_connected",
                "replica_allocated",
                "sync_complete"
            ]
        ),
        "backup events: {bn:?}"
    );

    rep.step("SIGKILL of the primary: the failover as events");
    let mark = backup.mark().expect("mark");
    rig.primary.kill().expect("SIGKILL the primary");
    let died = Instant::now();
    let done = backup
        .wait(mark, "the failover", Duration::from_secs(30), |e| {
            matches!(
                e.kind,
                EventKind::FailoverComplete(_) | EventKind::FailoverFailed { .. }
            )
        })
        .expect("the backup completes a failover");
    let EventKind::FailoverComplete(report) = &done.kind else {
        panic!("failover failed: {:?}", done.kind);
    };
    assert!(
        report.epoch > 0 && report.detect_to_running_ms > 0.0,
        "{report:?}"
    );
    // `vm_running` follows `failover_complete` (the VM process emits it once the restored
    // VM runs): wait for it too before reading the sequence.
    backup
        .wait(
            mark,
            "the VM running on the backup",
            Duration::from_secs(10),
            |e| matches!(e.kind, EventKind::VmRunning { .. }),
        )
        .expect("the backup's VM runs after the failover");
    let after = backup.all(mark, false).expect("events after the kill");
    let an = names(&after);
    assert!(
        in_order(
            &an,
            &[
                "session_ended",
                "failover_started",
                "failover_complete",
                "vm_running"
            ]
        ),
        "events after the kill: {an:?}"
    );
    assert!(
        after.iter().any(|e| matches!(
            &e.kind,
            EventKind::SessionEnded {
                decision: Decision::TakeOver,
                committed_epoch: Some(c),
                ..
            } if *c == report.epoch
        )),
        "the session ends naming the epoch the takeover runs from: {after:?}"
    );
    assert!(after.iter().any(|e| matches!(
        e.kind,
        EventKind::VmRunning {
            role: Role::TookOver,
            ..
        }
    )));
    rig.wait_stream(died, "the stream resumes on the backup");

    rep.step("`twin events` prints the same events");
    let out = rig
        .ha
        .backup
        .ns
        .output(
            &[
                twin_bin().expect("twin").to_str().expect("utf-8 path"),
                "events",
                "--control",
                backup.socket().to_str().expect("utf-8 path"),
            ],
            Duration::from_secs(20),
        )
        .expect("twin events");
    let printed: Vec<twin_api::Event> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let all = backup.all(0, false).expect("backup events");
    assert_eq!(names(&printed), names(&all[..printed.len()]));
    let (p, client) = rig.finish_work();
    check_stream(&mut rep, &p, client, "backup");
    rig.assert_no_panics();
    rep.done(format!(
        "{} primary and {} backup lifecycle events; failover at epoch {} in {:.1} ms",
        pn.len(),
        names(&all).len(),
        report.epoch,
        report.detect_to_running_ms
    ));
}
