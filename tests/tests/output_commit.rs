//! Output commit end to end: while the backup withholds its acks, nothing the guest sends
//! reaches the client; once acks flow, the held output is released.
//!
//! The backup withholds acks with `TWIN_FAILPOINTS=backup.before_ack=drop~3000`: every ack
//! in the 3 s after its first applied epoch is dropped. That window opens as soon as the
//! backup is synchronised, and a primary holds all output until its first ack, so the client
//! needs a connection from before: a first backup (no failpoint) protects the VM while the
//! client connects; it is then SIGKILLed, the primary (`--on-backup-loss hold`) holds output,
//! and a second backup with the failpoint resynchronises. A PING sent after that sync, inside
//! the window, must get its reply only after the window closes — and then promptly.
//!
//! Private helpers (not in the harness): spawning `twin backup` with a failpoint
//! environment, `twin status --json` parsed.

use std::path::Path;
use std::time::{Duration, Instant};

use twin_api::EventKind;
use twin_lab::events::{took_over, Events};
use twin_lab::rig::spawn_keyed_backup;
use twin_lab::*;

const PROTECT_TIMEOUT: Duration = Duration::from_secs(90);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// The failpoint window, as configured below.
const WINDOW: Duration = Duration::from_millis(3000);
const FAILPOINTS: &str = "backup.before_ack=drop~3000";
/// Slack for when the test sees an event after the process emitted it.
const SLACK: Duration = Duration::from_millis(200);
/// A PING under protection (epoch 25 ms + ack) is answered well within this.
const PROTECTED_PING: Duration = Duration::from_secs(2);

fn status(ns: &Netns, dir: &TestDir, control: &Path, procs: &[&TwinProcess]) -> serde_json::Value {
    twin_status(ns, dir, control, CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}\n{}", tails(procs)))
}

fn ping_latencies(guest: &mut GuestClient, n: usize) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            guest.ping().expect("PING");
            t.elapsed()
        })
        .collect()
}

#[test]
fn output_is_held_while_the_backup_withholds_acks_and_released_when_they_flow() {
    require_kvm();
    let ha = Topology::ha().expect("ha topology");
    let dir = TestDir::new("output-commit").expect("test dir");
    // The backups' control sockets are `<name>.sock` (the harness's `spawn_backup`).
    let (psock, bsock2) = (dir.join("primary.sock"), dir.join("twin-backup-2.sock"));
    let mut backup1 = spawn_keyed_backup(&ha, &dir, "twin-backup-1", "");
    let psock_s = psock.display().to_string();
    let backup_addr = twin_lab::rig::backup_listen();
    let key = dir.key_file();
    let mut primary = TwinProcess::spawn(
        &ha.primary.ns,
        &dir,
        "twin-protect",
        &[
            "protect",
            "--key-file",
            &key,
            "--backup",
            &backup_addr,
            "--tap",
            TAP,
            "--ip",
            GUEST_CIDR,
            "--mem",
            "256M",
            "--guest-args",
            "dirty=16M/s,wss=64M",
            "--on-backup-loss",
            "hold",
            "--backup-timeout",
            "5s",
            "--control",
            &psock_s,
        ],
    )
    .expect("spawn twin protect");
    let pevents = Events::at(&psock).record(false);
    let protected = |e: &twin_api::Event| matches!(e.kind, EventKind::Protected { .. });
    Events::at(&psock)
        .wait_live(&mut primary, 0, "protection", PROTECT_TIMEOUT, protected)
        .unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&backup1])));
    let mut guest =
        GuestClient::connect_retry(ha.client_ns(), guest_service(), CONNECT_TIMEOUT, || {
            primary.ensure_running()
        })
        .expect("guest service");
    for want in 1..=20 {
        assert_eq!(guest.incr("counter").expect("INCR"), want);
    }
    let baseline = ping_latencies(&mut guest, 20);
    let baseline_max = *baseline.iter().max().expect("pings");
    assert!(
        baseline_max < PROTECTED_PING,
        "protected PINGs should be answered within {PROTECTED_PING:?}, the slowest took \
         {baseline_max:?}"
    );

    // Replace the backup by one that withholds its acks for 3 s after its first epoch.
    backup1.kill().expect("SIGKILL the first backup");
    let mark = pevents.mark();
    let backup2 = spawn_keyed_backup(&ha, &dir, "twin-backup-2", FAILPOINTS);
    let b2events = Events::at(&bsock2).record(false);
    let after_sync = pevents
        .wait(mark, "the initial sync sent", PROTECT_TIMEOUT, |e| {
            matches!(e.kind, EventKind::SyncSent { .. })
        })
        .unwrap_or_else(|e| panic!("resync with the second backup: {e}\n{}", tails(&[&backup2])))
        .seq
        + 1;
    let t_sync = Instant::now();
    std::thread::sleep(SLACK);

    // A PING inside the window, on the same connection, from another thread.
    guest
        .set_request_timeout(Duration::from_secs(30))
        .expect("request timeout");
    let pinger = std::thread::spawn(move || {
        let sent = Instant::now();
        let r = guest.ping();
        (guest, sent, Instant::now(), r)
    });
    std::thread::sleep((t_sync + WINDOW / 3).saturating_duration_since(Instant::now()));
    let mid = status(&ha.primary.ns, &dir, &psock, &[&primary, &backup2]);
    assert!(
        !pinger.is_finished(),
        "the PING sent {SLACK:?} after the resync was answered within {:?}, while the backup \
         withholds its acks; primary status: {mid}\n{}",
        WINDOW / 3,
        tails(&[&primary, &backup2])
    );
    assert_ne!(
        mid["mode"].as_str(),
        Some("protected"),
        "no ack has arrived, the primary cannot be protected yet: {mid}"
    );
    assert_eq!(
        mid["held_output"]["mode"].as_str(),
        Some("Protected"),
        "{mid}"
    );
    let held = mid["held_output"]["frames"].as_u64().unwrap_or(0);
    assert!(
        held >= 1,
        "the PONG (or at least the TCP ACK of the PING) must be held: {mid}"
    );

    // Acks flow again after the window: the primary says so, the PONG arrives.
    pevents
        .wait(
            after_sync,
            "protection",
            WINDOW + PROTECT_TIMEOUT,
            protected,
        )
        .unwrap_or_else(|e| panic!("acks after the window: {e}\n{}", tails(&[&backup2])));
    let t_protected = Instant::now();
    let (mut guest, sent, replied, r) = pinger.join().expect("pinger thread");
    r.unwrap_or_else(|e| {
        panic!(
            "the PING held during the window got no reply: {e}\n{}",
            tails(&[&primary, &backup2])
        )
    });
    let since_sync = replied - t_sync;
    eprintln!(
        "PING sent {:?} after the resync, answered {:?} after it ({:?} after sending); first \
         ack seen {:?} after the resync; {held} frames held mid-window; baseline PING max \
         {baseline_max:?}",
        sent - t_sync,
        since_sync,
        replied - sent,
        t_protected - t_sync
    );
    assert!(
        t_protected - t_sync >= WINDOW - SLACK,
        "the primary saw its first ack {:?} after the resync: the backup did not withhold acks \
         for {WINDOW:?}",
        t_protected - t_sync
    );
    assert!(
        since_sync >= WINDOW - SLACK,
        "the PONG arrived {since_sync:?} after the resync, before the backup's {WINDOW:?} of \
         withheld acks ended: output escaped before its epoch was acknowledged"
    );
    assert!(
        replied + Duration::from_millis(500) >= t_protected,
        "the PONG arrived {:?} before the primary's first ack",
        t_protected - replied
    );
    assert!(
        replied <= t_protected + PROTECTED_PING,
        "the PONG came {:?} after acks flowed again: held output must be released on the ack",
        replied - t_protected
    );

    // Protected again: prompt replies, the same connection, nothing lost.
    let after = ping_latencies(&mut guest, 20);
    let after_max = *after.iter().max().expect("pings");
    assert!(
        after_max < PROTECTED_PING,
        "after the window PINGs should be prompt again; the slowest took {after_max:?}"
    );
    assert_eq!(guest.incr("counter").expect("INCR"), 21);
    let st = status(&ha.primary.ns, &dir, &psock, &[&primary, &backup2]);
    assert_eq!(st["mode"].as_str(), Some("protected"), "{st}");
    assert!(st["sessions"].as_u64().unwrap_or(0) >= 2, "{st}");
    match guest.verify().expect("VERIFY") {
        Verify::Ok { .. } => {}
        Verify::Fail(why) => panic!("VERIFY: {why}"),
    }
    b2events.sync();
    assert!(
        b2events.find(0, took_over).is_none(),
        "the second backup took over while the primary was alive: {:?}\n{}",
        b2events.names_since(0),
        tails(&[&primary, &backup2])
    );
    drop(guest);
    for p in [&primary, &backup1, &backup2] {
        let all = format!("{}{}", p.text(Stream::Stdout), p.text(Stream::Stderr));
        assert!(!all.contains("panicked"), "{} panicked:\n{all}", p.name());
    }
}
