//! Replication end to end: `twin protect` on the primary host, `twin backup` on the backup
//! host, a client on the LAN keeping one TCP connection to the guest.
//!
//! - SIGKILL of the primary at a random moment under load, 20 times, each on a fresh `ha`
//!   layout: the backup takes over, the same connection continues, no acknowledged INCR is
//!   lost and none is applied twice, VERIFY passes;
//! - SIGKILL of the backup: the primary keeps serving unprotected, a new backup on the backup
//!   host resynchronises and protects again, and a later SIGKILL of the primary fails over
//!   to that new backup without loss.
//!
//! Private helpers (not in the harness): a background INCR load on one connection, `twin`
//! control commands parsed as JSON, a small seeded PRNG (`TWIN_TEST_SEED` replays a run).

use std::path::Path;
use std::time::{Duration, Instant};

use twin_api::{Event, EventKind};
use twin_lab::events::{took_over, Events, Recorder};
use twin_lab::rig::spawn_keyed_backup;
use twin_lab::*;

/// Boot, live initial sync and first ack, on a busy 2-core machine with software KVM.
const PROTECT_TIMEOUT: Duration = Duration::from_secs(90);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// One request across a failover (TCP retransmits carry it to the new host).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// From SIGKILL of the primary to the backup's `failover_complete` event.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(20);
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);
const CMD_TIMEOUT: Duration = Duration::from_secs(30);
const MEM: &str = "256M";
const GUEST_ARGS: &str = "dirty=16M/s,wss=64M";
/// Iterations of the random-kill loop (`TWIN_FAILOVER_ITERATIONS` overrides).
const ITERATIONS: u32 = 20;
/// Longest the whole loop may take.
const LOOP_BUDGET: Duration = Duration::from_secs(300);

fn spawn_primary(ha: &Ha, dir: &TestDir, name: &str, control: &Path) -> TwinProcess {
    let backup = twin_lab::rig::backup_listen();
    let control = control.display().to_string();
    let key = dir.key_file();
    TwinProcess::spawn(
        &ha.primary.ns,
        dir,
        name,
        &[
            "protect",
            "--key-file",
            &key,
            "--backup",
            &backup,
            "--tap",
            TAP,
            "--ip",
            GUEST_CIDR,
            "--mem",
            MEM,
            "--guest-args",
            GUEST_ARGS,
            "--control",
            &control,
        ],
    )
    .unwrap_or_else(|e| panic!("spawn {name}: {e}"))
}

/// `twin status --json` of the process behind `control`.
fn status(ns: &Netns, dir: &TestDir, control: &Path, procs: &[&TwinProcess]) -> serde_json::Value {
    twin_status(ns, dir, control, CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}\n{}", tails(procs)))
}

/// Polls `twin status` until `pred` holds; returns that status.
fn wait_status(
    ns: &Netns,
    dir: &TestDir,
    control: &Path,
    what: &str,
    timeout: Duration,
    procs: &[&TwinProcess],
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let st = status(ns, dir, control, procs);
        if pred(&st) {
            return st;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}; last status: {st}\n{}",
                tails(procs)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The backup's failover report (its `failover_complete` event), as JSON.
/// (`others`: processes whose output a failure shows.)
fn failover_report(backup: &Recorder, others: &[&TwinProcess]) -> serde_json::Value {
    let done = backup
        .wait(0, "the takeover", TAKEOVER_TIMEOUT, |e| {
            matches!(
                e.kind,
                EventKind::FailoverComplete(_) | EventKind::FailoverFailed { .. }
            )
        })
        .unwrap_or_else(|e| panic!("no takeover: {e}\n{}", tails(others)));
    match done.kind {
        EventKind::FailoverComplete(report) => {
            serde_json::to_value(report).expect("a failover report serializes")
        }
        other => panic!("the takeover failed: {other:?}\n{}", tails(others)),
    }
}

/// The first event of `events` that says the backup took the VM over.
fn takeover_in(events: &Recorder) -> Option<Event> {
    events.sync();
    events.find(0, took_over)
}

/// Waits for the primary's first ack (its `protected` event). Fails at once, naming split
/// brain, if the backup takes over meanwhile: the primary is alive, so two copies of the VM
/// would run on the LAN.
fn wait_protected(
    primary: &mut TwinProcess,
    pevents: &Recorder,
    backup: &TwinProcess,
    bevents: &Recorder,
    what: &str,
) {
    let deadline = Instant::now() + PROTECT_TIMEOUT;
    loop {
        let slice = Duration::from_millis(250);
        match pevents.wait(0, "protection", slice, |e| {
            matches!(e.kind, EventKind::Protected { .. })
        }) {
            Ok(_) => return,
            Err(HarnessError::Timeout { .. }) => {}
            Err(e) => panic!("{what}: {e}\n{}", tails(&[primary, backup])),
        }
        primary
            .ensure_running()
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", tails(&[backup])));
        if let Some(e) = bevents.find(0, took_over) {
            panic!(
                "{what}: SPLIT BRAIN — the backup took over ({}) while the primary was alive \
                 and never protected (the primary keeps running its VM too)\n{}",
                e.kind.name(),
                tails(&[primary, backup])
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the primary was not protected within {PROTECT_TIMEOUT:?}\n{}",
            tails(&[primary, backup])
        );
    }
}

/// The client-visible outage around `at`: from `at` to the first reply after it.
fn outage_after(ops: &[Op], at: Instant) -> Option<Duration> {
    ops.iter().find(|o| o.replied > at).map(|o| o.replied - at)
}

/// xorshift64*: enough randomness for kill times, replayable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------------------
// 5. SIGKILL of the primary at a random moment, many times.

#[derive(Debug)]
struct Run {
    kill_after: Duration,
    incrs_at_kill: u64,
    last: u64,
    outage: Duration,
    detect_to_running_ms: f64,
    epoch: u64,
    took: Duration,
}

fn failover_once(iteration: u32, kill_after: Duration) -> Run {
    let t0 = Instant::now();
    let ha = Topology::ha().expect("ha topology");
    let dir = TestDir::new(&format!("failover-{iteration}")).expect("test dir");
    let (psock, bsock) = (dir.join("primary.sock"), dir.join("twin-backup.sock"));
    let mut backup = spawn_keyed_backup(&ha, &dir, "twin-backup", "");
    let bevents = Events::at(&bsock).record(false);
    let mut primary = spawn_primary(&ha, &dir, "twin-protect", &psock);
    let pevents = Events::at(&psock).record(false);
    wait_protected(
        &mut primary,
        &pevents,
        &backup,
        &bevents,
        &format!("iteration {iteration}"),
    );
    let mut guest =
        GuestClient::connect_retry(ha.client_ns(), guest_service(), CONNECT_TIMEOUT, || {
            primary.ensure_running()
        })
        .unwrap_or_else(|e| panic!("iteration {iteration}: guest service: {e}"));
    guest
        .set_request_timeout(REQUEST_TIMEOUT)
        .expect("request timeout");
    let load = IncrLoad::start(guest, "counter", 0);
    if let Err(e) = load.wait_for(20, PROGRESS_TIMEOUT, || primary.ensure_running()) {
        panic!(
            "iteration {iteration}: before the kill: {e}\n{}",
            tails(&[&primary, &backup])
        );
    }
    std::thread::sleep(kill_after);
    // No takeover yet: the backup must not have acted while the primary was alive.
    primary
        .ensure_running()
        .unwrap_or_else(|e| panic!("iteration {iteration}: primary died early: {e}"));
    assert!(
        takeover_in(&bevents).is_none(),
        "iteration {iteration}: the backup took over while the primary was alive\n{}",
        tails(&[&primary, &backup])
    );
    let incrs_at_kill = load.incrs();
    let t_kill = Instant::now();
    let killed = primary.kill().expect("SIGKILL the primary");
    assert_eq!(describe_status(killed), "killed by signal 9");
    pevents.wait_end(Duration::from_secs(5));
    // The primary's events are all recorded now (its stream ended with it). It must not
    // have lost its backup: nothing but the SIGKILL happened to either. If it did, the
    // backup gave up on a live primary, and if the backup took over then, two VMs ran at
    // once (split brain).
    if let Some(lost) = pevents.find(0, |e| matches!(e.kind, EventKind::BackupLost { .. })) {
        let why = bevents
            .find(0, |e| matches!(e.kind, EventKind::SessionEnded { .. }))
            .map_or("(no session ended)".to_string(), |e| {
                format!("{:?}", e.kind)
            });
        panic!(
            "iteration {iteration}: the primary lost its backup while alive, before the \
             SIGKILL {kill_after:?} after 20 INCRs:\n  primary: {:?}\n  backup:  {why}\n\
             {}{}",
            lost.kind,
            if takeover_in(&bevents).is_some() {
                "SPLIT BRAIN: the backup took over from a live primary, which went on running \
                 (and released output the backup does not have).\n"
            } else {
                ""
            },
            tails(&[&primary, &backup])
        );
    }
    let report = failover_report(&bevents, &[&primary]);
    if let Err(e) = load.wait_for(incrs_at_kill + 50, PROGRESS_TIMEOUT, || {
        backup.ensure_running()
    }) {
        panic!(
            "iteration {iteration} (kill {kill_after:?} after 20 INCRs): after the takeover \
             the same connection must continue: {e}\nfailover report: {report}\n{}",
            tails(&[&primary, &backup])
        );
    }
    let (mut guest, ops) = load.finish().unwrap_or_else(|e| {
        panic!(
            "iteration {iteration}: {e}\n{}",
            tails(&[&primary, &backup])
        )
    });
    let last = check_incr_sequence(&ops, 1).unwrap_or_else(|e| {
        panic!(
            "iteration {iteration} (kill {kill_after:?} after INCR {incrs_at_kill}): {e}\n\
             failover report: {report}\n{}",
            tails(&[&primary, &backup])
        )
    });
    let got = guest
        .get("counter")
        .unwrap_or_else(|e| panic!("iteration {iteration}: GET: {e}"));
    assert_eq!(
        got, last,
        "iteration {iteration}: GET counter must equal the last acknowledged INCR"
    );
    match guest.verify() {
        Ok(Verify::Ok { .. }) => {}
        other => panic!(
            "iteration {iteration}: VERIFY after failover: {other:?}\n{}",
            tails(&[&backup])
        ),
    }
    let st = status(&ha.backup.ns, &dir, &bsock, &[&backup]);
    assert_eq!(
        st["vm"].as_str(),
        Some("running"),
        "iteration {iteration}: the backup host's VM should run: {st}"
    );
    let outage = outage_after(&ops, t_kill).expect("a reply after the kill");
    drop(guest);
    backup.terminate().expect("SIGTERM the new primary");
    let status = backup
        .wait_exit(Duration::from_secs(10))
        .expect("the backup host's VM exits on SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", tails(&[&backup]));
    assert_no_panic(&primary);
    assert_no_panic(&backup);
    Run {
        kill_after,
        incrs_at_kill,
        last,
        outage,
        detect_to_running_ms: report["detect_to_running_ms"].as_f64().unwrap_or(f64::NAN),
        epoch: report["epoch"].as_u64().unwrap_or(0),
        took: t0.elapsed(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

#[test]
fn sigkill_of_the_primary_under_load_loses_no_acknowledged_incr_20_times() {
    require_kvm();
    let seed = env_u64("TWIN_TEST_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1
    });
    let iterations = env_u64("TWIN_FAILOVER_ITERATIONS").map_or(ITERATIONS, |n| n as u32);
    eprintln!(
        "failover loop: seed {seed} (TWIN_TEST_SEED={seed} replays it), {iterations} iterations"
    );
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut runs = Vec::new();
    for it in 0..iterations {
        let kill_after = Duration::from_millis(rng.below(1500));
        let run = failover_once(it, kill_after);
        eprintln!(
            "  #{it:2}: kill {:4} ms after 20 INCRs (at INCR {}), client outage {:6.1} ms, \
             backup detect→running {:5.1} ms, epoch {}, {} INCRs, iteration {:.1} s",
            run.kill_after.as_millis(),
            run.incrs_at_kill,
            run.outage.as_secs_f64() * 1e3,
            run.detect_to_running_ms,
            run.epoch,
            run.last,
            run.took.as_secs_f64()
        );
        runs.push(run);
        assert!(
            started.elapsed() < LOOP_BUDGET,
            "the failover loop exceeded its budget of {LOOP_BUDGET:?} after {} iterations",
            it + 1
        );
    }
    let mut outages: Vec<f64> = runs.iter().map(|r| r.outage.as_secs_f64() * 1e3).collect();
    outages.sort_by(f64::total_cmp);
    let mut takeovers: Vec<f64> = runs.iter().map(|r| r.detect_to_running_ms).collect();
    takeovers.sort_by(f64::total_cmp);
    eprintln!(
        "client outage after SIGKILL (ms): min {:.1} median {:.1} p90 {:.1} max {:.1}; \
         backup detect→running (ms): min {:.1} median {:.1} max {:.1}; total {:.1} s",
        outages[0],
        percentile(&outages, 0.5),
        percentile(&outages, 0.9),
        outages[outages.len() - 1],
        takeovers[0],
        percentile(&takeovers, 0.5),
        takeovers[takeovers.len() - 1],
        started.elapsed().as_secs_f64()
    );
    assert_eq!(runs.len(), iterations as usize);
}

// ---------------------------------------------------------------------------------------
// 7. The backup dies; a new one takes its place; then the primary dies.

#[test]
fn a_new_backup_resynchronises_after_the_backup_dies_and_then_takes_over() {
    require_kvm();
    let ha = Topology::ha().expect("ha topology");
    let dir = TestDir::new("backup-replaced").expect("test dir");
    let (psock, bsock1, bsock2) = (
        dir.join("primary.sock"),
        dir.join("twin-backup-1.sock"),
        dir.join("twin-backup-2.sock"),
    );
    let mut backup1 = spawn_keyed_backup(&ha, &dir, "twin-backup-1", "");
    let b1events = Events::at(&bsock1).record(false);
    let mut primary = spawn_primary(&ha, &dir, "twin-protect", &psock);
    let pevents = Events::at(&psock).record(false);
    wait_protected(&mut primary, &pevents, &backup1, &b1events, "first backup");
    let st = status(&ha.primary.ns, &dir, &psock, &[&primary]);
    assert_eq!(st["mode"].as_str(), Some("protected"), "{st}");
    let sessions_first = st["sessions"].as_u64().expect("sessions");
    let mut guest =
        GuestClient::connect_retry(ha.client_ns(), guest_service(), CONNECT_TIMEOUT, || {
            primary.ensure_running()
        })
        .expect("guest service");
    guest
        .set_request_timeout(REQUEST_TIMEOUT)
        .expect("request timeout");
    let load = IncrLoad::start(guest, "counter", 0);
    load.wait_for(50, PROGRESS_TIMEOUT, || primary.ensure_running())
        .unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&primary, &backup1])));

    // The backup dies: the primary keeps serving, unprotected.
    let t_backup_kill = Instant::now();
    backup1.kill().expect("SIGKILL the backup");
    let st = wait_status(
        &ha.primary.ns,
        &dir,
        &psock,
        "the primary to report its backup lost",
        Duration::from_secs(15),
        &[&primary],
        |s| s["mode"].as_str() == Some("unprotected"),
    );
    let lost_after = t_backup_kill.elapsed();
    assert_eq!(
        st["held_output"]["mode"].as_str(),
        Some("Unprotected"),
        "an unprotected primary must release output: {st}"
    );
    let n = load.incrs();
    load.wait_for(n + 100, PROGRESS_TIMEOUT, || primary.ensure_running())
        .unwrap_or_else(|e| {
            panic!(
                "without a backup the primary must keep serving: {e}\n{}",
                tails(&[&primary, &backup1])
            )
        });
    let st = status(&ha.primary.ns, &dir, &psock, &[&primary]);
    assert_eq!(st["mode"].as_str(), Some("unprotected"), "{st}");
    let sessions_unprotected = st["sessions"].as_u64().expect("sessions");

    // A new backup on the backup host: resynchronised, protected again.
    let t_new_backup = Instant::now();
    let mut backup2 = spawn_keyed_backup(&ha, &dir, "twin-backup-2", "");
    let b2events = Events::at(&bsock2).record(false);
    let st = wait_status(
        &ha.primary.ns,
        &dir,
        &psock,
        "the primary to be protected by the new backup",
        PROTECT_TIMEOUT,
        &[&primary, &backup2],
        |s| {
            assert!(
                b2events.find(0, took_over).is_none(),
                "SPLIT BRAIN — the new backup took over while the primary was alive: {s}\n{}",
                tails(&[&primary, &backup2])
            );
            s["mode"].as_str() == Some("protected")
        },
    );
    let reprotected_after = t_new_backup.elapsed();
    let sessions_again = st["sessions"].as_u64().expect("sessions");
    assert!(
        sessions_again > sessions_first && sessions_again >= sessions_unprotected,
        "sessions must have grown: {sessions_first} at first, {sessions_unprotected} while \
         unprotected, {sessions_again} now: {st}"
    );
    assert_eq!(
        st["held_output"]["mode"].as_str(),
        Some("Protected"),
        "{st}"
    );
    let bst = wait_status(
        &ha.backup.ns,
        &dir,
        &bsock2,
        "the new backup to hold a committed checkpoint",
        Duration::from_secs(15),
        &[&primary, &backup2],
        |s| s["committed_epoch"].as_u64().is_some() && s["state"] == "replicating",
    );
    assert_eq!(bst["sessions"].as_u64(), Some(1), "{bst}");
    let n = load.incrs();
    load.wait_for(n + 50, PROGRESS_TIMEOUT, || primary.ensure_running())
        .unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&primary, &backup2])));

    // The primary dies: the new backup takes over without loss.
    let at_kill = load.incrs();
    let t_kill = Instant::now();
    primary.kill().expect("SIGKILL the primary");
    let report = failover_report(&b2events, &[&primary]);
    load.wait_for(at_kill + 50, PROGRESS_TIMEOUT, || backup2.ensure_running())
        .unwrap_or_else(|e| {
            panic!(
                "after the takeover by the new backup: {e}\n{report}\n{}",
                tails(&[&primary, &backup2])
            )
        });
    let (mut guest, ops) = load
        .finish()
        .unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&primary, &backup1, &backup2])));
    let last = check_incr_sequence(&ops, 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&primary, &backup1, &backup2])));
    assert_eq!(guest.get("counter").expect("GET"), last);
    match guest.verify().expect("VERIFY") {
        Verify::Ok { pages, writes } => eprintln!("VERIFY OK pages={pages} writes={writes}"),
        Verify::Fail(why) => panic!("VERIFY after failover to the new backup: {why}"),
    }
    eprintln!(
        "backup loss noticed within {lost_after:?}; re-protected {reprotected_after:?} after \
         the new backup started (sessions {sessions_first} → {sessions_again}); failover to \
         it: {report}; client outage {:?}; {last} INCRs",
        outage_after(&ops, t_kill)
    );
    drop(guest);
    assert_no_panic(&primary);
    assert_no_panic(&backup1);
    assert_no_panic(&backup2);
}

// ---------------------------------------------------------------------------------------
// A primary that stalls (SIGSTOP) past the heartbeat timeout, then resumes (SIGCONT).

/// A frozen host is one the backup cannot tell from a dead one, so it takes over — rightly.
/// But the primary is alive: when it thaws, it must stand down (fenced: discard unacked
/// output, stop its VM), never run on unprotected beside the new primary. The backup's
/// takeover ends their session, which the thawed primary sees; whatever it concludes, it
/// must not release output or keep its VM running (split brain: two copies of the guest on
/// the LAN, the old one ahead of the new one).
#[test]
fn a_primary_that_stalls_past_the_heartbeat_timeout_stands_down_after_the_takeover() {
    require_kvm();
    let ha = Topology::ha().expect("ha topology");
    let dir = TestDir::new("stalled-primary").expect("test dir");
    let (psock, bsock) = (dir.join("primary.sock"), dir.join("twin-backup.sock"));
    let mut backup = spawn_keyed_backup(&ha, &dir, "twin-backup", "");
    let bevents = Events::at(&bsock).record(false);
    let mut primary = spawn_primary(&ha, &dir, "twin-protect", &psock);
    let pevents = Events::at(&psock).record(false);
    wait_protected(&mut primary, &pevents, &backup, &bevents, "stalled-primary");
    let mut guest =
        GuestClient::connect_retry(ha.client_ns(), guest_service(), CONNECT_TIMEOUT, || {
            primary.ensure_running()
        })
        .expect("guest service");
    guest
        .set_request_timeout(REQUEST_TIMEOUT)
        .expect("request timeout");
    let load = IncrLoad::start(guest, "counter", 0);
    load.wait_for(50, PROGRESS_TIMEOUT, || primary.ensure_running())
        .unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&primary, &backup])));

    // Freeze the primary well past the backup's 100 ms heartbeat timeout: it takes over.
    primary.signal(Signal::Stop).expect("SIGSTOP the primary");
    let report = failover_report(&bevents, &[&primary]);
    primary.signal(Signal::Cont).expect("SIGCONT the primary");
    let t_thaw = Instant::now();

    // The thawed primary must stand down: its process ends (fenced) rather than serve on,
    // and never releases its held output to run unprotected. (Its events are all recorded
    // once its stream has ended with it.)
    let exited = primary.wait_exit(Duration::from_secs(10));
    let ended = exited.is_ok() && pevents.wait_end(Duration::from_secs(5));
    let stood_down = pevents.find(0, |e| matches!(e.kind, EventKind::StoodDown { .. }));
    let released = pevents.find(
        0,
        |e| matches!(&e.kind, EventKind::BackupLost { policy, .. } if policy == "release"),
    );
    assert!(
        exited.is_ok() && stood_down.is_some() && released.is_none(),
        "SPLIT BRAIN: after the backup took over ({report}), the thawed primary {} {}{}\n\
         its events: {:?} (all recorded: {ended})\n{}",
        match &exited {
            Ok(s) => format!("exited ({})", describe_status(*s)),
            Err(_) => format!(
                "was still running its VM {:?} after SIGCONT",
                t_thaw.elapsed()
            ),
        },
        if stood_down.is_none() {
            "without standing down "
        } else {
            ""
        },
        released.map_or(String::new(), |e| format!(
            "and released held output to run unprotected: {:?}",
            e.kind
        )),
        pevents.names_since(0),
        tails(&[&primary, &backup])
    );
    // And the client continues on the new primary without loss.
    let n = load.incrs();
    load.wait_for(n + 50, PROGRESS_TIMEOUT, || backup.ensure_running())
        .unwrap_or_else(|e| panic!("after the takeover: {e}\n{}", tails(&[&primary, &backup])));
    let (mut guest, ops) = load
        .finish()
        .unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&primary, &backup])));
    let last = check_incr_sequence(&ops, 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&primary, &backup])));
    assert_eq!(guest.get("counter").expect("GET"), last);
    assert_no_panic(&primary);
    assert_no_panic(&backup);
}
