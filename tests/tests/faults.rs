//! Fault injection: a protected VM (`twin protect` on the primary host, `twin backup` on the
//! backup host, the `ha` layout) serving a client that INCRs one counter over one TCP
//! connection, while something breaks — a host process killed at a given protocol step
//! (failpoints), the replication link cut, slowed or corrupted (nftables, tbf, and the
//! frame-rewriting proxy of `twin_lab::proxy`), a disk filling up under a snapshot, the TAP
//! vanishing, a partition.
//!
//! Invariants checked wherever they apply:
//! - **no acknowledged output lost**: every INCR reply is the previous one plus one (a gap
//!   is a reply the client saw and the survivor forgot; a repeat is one the survivor redid),
//!   and the final `GET` equals the last acknowledged value;
//! - **output commit**: the primary releases nothing before the backup acknowledges its
//!   checkpoint (observable directly when acks are withheld: nothing reaches the client);
//! - **no partial checkpoint applied**: `VERIFY` passes on the survivor (a half-applied epoch
//!   leaves the workload's pages inconsistent), and epochs the proxy corrupted are never
//!   reported committed by the backup (its `epoch_committed` events);
//! - **the survivor serves** (more INCRs after the fault);
//! - **nothing panics** (no `panicked` in any process's stderr).
//!
//! What must happen where the invariants cannot hold (documented limits, asserted as such):
//! - primary killed **during the initial sync**: no checkpoint was ever committed, so the
//!   backup must not take over (its session ends with nothing committed and it keeps
//!   waiting); the VM
//!   and everything the client saw (acknowledged unprotected) are gone;
//! - backup killed **during its failover restore** (after the primary died): nothing runs
//!   the VM; the backup's events show a failover that started and never completed, the client
//!   sees the service gone — there is no third copy;
//! - **partition** with `--on-backup-loss release`: Remus cannot tell a cut link from a dead
//!   primary; `split_brain_on_partition` measures what the world sees and asserts only that
//!   it was measured. With `hold` the cut scenarios must be clean (the primary lets nothing
//!   out, or stands down when the takeover Goodbye reaches it).
//!
//! Each scenario prints one row (scenario, outcome, time to recover, outputs lost) and
//! appends it to `<target>/tmp/faults-<pid>.tsv`; `zzz_summary_table`, which runs last,
//! prints the table of the run. Run with
//! `cargo test --release -p twin-tests --test faults -- --test-threads=1 --nocapture`.
//!
//! Time to recover is the longest silence between two consecutive INCR replies from just
//! before the fault to the end of the scenario (failure detection + restore + the client's
//! TCP retransmission back-off).

use std::path::Path;
use std::time::{Duration, Instant};

use twin_api::EventKind;
use twin_lab::events::took_over;
use twin_lab::proxy::{frame_type, Fault, FaultKind, FrameProxy, Injection, Way};
use twin_lab::rig::*;
use twin_lab::*;

/// The scenarios of a family share one shape over the rig: a row `name: shape(args…);` is
/// the `#[test]` `name`, which runs `shape(&mut Report::new("name"), args…)` — so the
/// scenario, its report row and the test all carry the same name. Attributes (docs) before
/// a row go on its test.
macro_rules! scenarios {
    ($($(#[$attr:meta])* $name:ident: $shape:ident($($arg:expr),* $(,)?);)*) => {
        $(
            $(#[$attr])*
            #[test]
            fn $name() {
                let mut rep = Report::new(stringify!($name));
                $shape(&mut rep, $($arg),*);
            }
        )*
    };
}

// =============================================================================================
// Primary killed.

/// The primary dies (SIGKILL from failpoint `point`, on its `nth` hit once protected): the
/// backup takes over from its last committed checkpoint, the client's connection survives
/// with no reply lost or repeated, and VERIFY passes on the backup.
fn primary_killed_at(rep: &mut Report, point: &str, nth: u64) {
    primary_killed_with(rep, point, nth, Auth::Key);
}

fn primary_killed_with(rep: &mut Report, point: &str, nth: u64, auth: Auth) {
    primary_killed_opts(
        rep,
        point,
        nth,
        Opts {
            auth,
            ..Opts::default()
        },
    );
}

fn primary_killed_on(rep: &mut Report, point: &str, nth: u64, auth: Auth, vcpus: u8) {
    primary_killed_opts(
        rep,
        point,
        nth,
        Opts {
            auth,
            vcpus,
            ..Opts::default()
        },
    );
}

fn primary_killed_opts(rep: &mut Report, point: &str, nth: u64, opts: Opts) {
    let vcpus = opts.vcpus;
    let mut rig = Rig::start(
        rep,
        Opts {
            primary_failpoints: format!("{point}={nth}*kill"),
            ..opts
        },
    );
    rep.step(format!("waiting for failpoint {point} to kill the primary"));
    let status = rig.primary.wait_exit(DEATH_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "failpoint {point}={nth}*kill did not kill the protected primary within \
             {DEATH_TIMEOUT:?} — is there a failpoint named {point} on the primary's path? ({e})"
        )
    });
    let died = Instant::now();
    if !killed_by_sigkill(status) {
        rig.assert_no_takeover_yet();
    }
    assert!(
        killed_by_sigkill(status) && fired(&rig.primary, point),
        "the primary ended ({}) but not by failpoint {point}:\n{}",
        describe_status(status),
        rig.primary.tail(20)
    );
    // Every event recorded came before the failpoint's kill.
    assert!(
        rig.primary_events().any(is_protected),
        "the failpoint fired before the VM was ever protected: the scenario tested nothing"
    );
    let fo = rig.wait_failover(rep);
    let epoch = fo["epoch"].as_u64().expect("FAILOVER names the epoch");
    rep.step("waiting for the client stream to resume on the backup");
    rig.wait_stream(died, "the client stream resumes on the backup");
    rig.finish_and_check(rep, died, "backup");
    // The VM the backup runs has every vCPU the primary had (restored from the stream).
    let running = rig
        .backup_events()
        .events()
        .into_iter()
        .find_map(|e| match e.kind {
            EventKind::VmRunning { vcpus, .. } => Some(vcpus),
            _ => None,
        })
        .expect("the backup reports its VM running after the takeover");
    assert_eq!(
        running,
        u32::from(vcpus),
        "vCPUs of the VM the backup took over"
    );
    rig.assert_no_panics();
    rep.done(format!(
        "backup took over at epoch {epoch} with {vcpus} vCPU(s) (restore {:.1} ms, detect→running {:.1} ms); stream intact",
        fo["restore_ms"].as_f64().unwrap_or(f64::NAN),
        fo["detect_to_running_ms"].as_f64().unwrap_or(f64::NAN)
    ));
}

scenarios! {
    primary_killed_before_pause: primary_killed_at("primary.before_pause", 200);
    primary_killed_during_page_collection: primary_killed_at("primary.collect", 200);
    primary_killed_mid_stream: primary_killed_at("primary.mid_stream", 200);
    primary_killed_after_send_before_ack: primary_killed_at("primary.after_send", 200);
    primary_killed_after_ack_before_release: primary_killed_at("primary.after_ack", 200);
    /// The primary killed mid-stream with the stream encrypted (`--encrypt`): the failover
    /// is as clean as in the clear.
    primary_killed_mid_stream_encrypted:
        primary_killed_with("primary.mid_stream", 200, Auth::Encrypted);
    /// Killed mid-stream during a burst of disk writes (the disk workload at 4 MiB/s, each
    /// block flushed): the backup runs on its disk replica as of the last commit, and
    /// VERIFY there checks every block against the sequence numbers in its memory.
    primary_killed_mid_disk_burst: primary_killed_opts(
        "primary.mid_stream",
        100,
        Opts {
            guest_args: "dirty=16M/s,wss=64M,disk=4M/s,dwss=8M",
            ..disk_opts()
        }
    );
    /// The same with compression off (`--compress none`): raw pages, as before.
    primary_killed_mid_stream_uncompressed:
        primary_killed_opts("primary.mid_stream", 200, uncompressed_opts());
    /// A VM with two vCPUs (the second parked) killed mid-stream: every vCPU is paused,
    /// captured and restored, the stream intact and VERIFY clean on the backup.
    primary_killed_mid_stream_2_vcpus:
        primary_killed_on("primary.mid_stream", 200, Auth::Key, 2);
}

/// With most pages travelling as deltas (each write changes a quarter of a page), the
/// primary's status shows deltas sent and less than half the dirty bytes on the wire; the
/// primary is then SIGKILLed and the backup takes over on a replica built from deltas:
/// the stream is intact and VERIFY there checks every page of the working set (index,
/// sequence, checksum of its whole body — which a delta applied to the wrong base breaks).
#[test]
fn primary_killed_with_deltas() {
    let mut rep = Report::new("primary_killed_with_deltas");
    let mut rig = Rig::start(&mut rep, delta_opts());
    rig.wait_stream(Instant::now(), "protected stream");
    // A few seconds of epochs, so that the delta cache is warm.
    std::thread::sleep(Duration::from_secs(2));
    rep.step("reading the primary's compression counters");
    let st = rig.primary_status().expect("primary status");
    let c = &st["compression"];
    let n = |k: &str| {
        c[k].as_u64()
            .unwrap_or_else(|| panic!("compression.{k} in {c}"))
    };
    assert_eq!(c["mode"], "delta", "{c}");
    assert!(
        n("delta_pages") > n("raw_pages") + n("lz4_pages"),
        "mostly deltas: {c}"
    );
    let ratio = n("page_bytes_out") as f64 / n("page_bytes_in") as f64;
    assert!(
        ratio < 0.5,
        "sent/dirty {ratio:.3} with a quarter of each page written: {c}"
    );
    rep.note(format!("sent/dirty {ratio:.3}"));
    rep.step("killing the primary (SIGKILL)");
    rig.assert_no_takeover_yet();
    rig.primary.kill().expect("SIGKILL the primary");
    let died = Instant::now();
    let fo = rig.wait_failover(&mut rep);
    rig.wait_stream(died, "the client stream resumes on the backup");
    rig.finish_and_check(&mut rep, died, "backup");
    rig.assert_no_panics();
    rep.done(format!(
        "deltas (sent/dirty {ratio:.3}); backup took over at epoch {}; stream intact, VERIFY clean",
        fo["epoch"]
    ));
}

/// Killed during the initial sync there is no committed checkpoint: the backup cannot take
/// over (it must say so and keep waiting), and the VM is gone. This is the window Remus
/// cannot cover; what the client saw acknowledged before (unprotected) is lost with it.
#[test]
fn primary_killed_during_initial_sync() {
    let mut rep = Report::new("primary_killed_during_initial_sync");
    let mut rig = Rig::start(
        &mut rep,
        Opts {
            primary_failpoints: "primary.sync=2*kill".into(),
            request_timeout: Duration::from_secs(8),
            wait_protected: false,
            ..Opts::default()
        },
    );
    rep.step("waiting for primary.sync to kill the primary");
    let status = rig
        .primary
        .wait_exit(DEATH_TIMEOUT)
        .expect("primary.sync=2*kill kills the primary during the initial sync");
    let died = Instant::now();
    assert!(killed_by_sigkill(status) && fired(&rig.primary, "primary.sync"));
    // Everything it said is recorded once its event stream has ended with it.
    rig.primary_events().wait_end(Duration::from_secs(5));
    assert!(
        !rig.primary_events().any(is_protected),
        "the primary was protected before the sync failpoint fired"
    );
    rep.step("checking the backup refuses to take over without a committed checkpoint");
    let ended = rig
        .backup_events()
        .wait(0, "the session's end", Duration::from_secs(20), |e| {
            matches!(e.kind, EventKind::SessionEnded { .. })
        })
        .expect("the backup sees the session end");
    assert!(
        matches!(
            ended.kind,
            EventKind::SessionEnded {
                decision: twin_api::Decision::Detach,
                committed_epoch: None,
                ..
            }
        ),
        "the backup must end the session with no committed checkpoint to take over from: {}",
        describe(&ended)
    );
    std::thread::sleep(Duration::from_secs(3));
    rig.backup()
        .ensure_running()
        .expect("the backup keeps running, waiting for a primary");
    assert!(
        rig.any_takeover().is_none(),
        "the backup took over from an incomplete initial sync"
    );
    let st = rig.backup_status().expect("backup status");
    assert!(
        st["committed_epoch"].is_null(),
        "backup reports a committed epoch after an incomplete sync: {st}"
    );
    rep.note(format!("backup state afterwards: {}", st["state"]));
    rep.step("checking the client sees the service gone");
    let broke = rig.work().wait_broken(Duration::from_secs(30));
    assert!(
        broke.is_some(),
        "the client stream kept running with no VM anywhere"
    );
    let p = rig.work().snapshot();
    let fresh = GuestClient::connect(rig.ha.client_ns(), guest_service(), Duration::from_secs(3));
    assert!(
        fresh.is_err(),
        "a new connection was answered with no VM running"
    );
    rig.assert_no_panics();
    rep.lost = Some(format!(
        "all {} (acknowledged unprotected, VM gone)",
        p.last
    ));
    rep.recover = None;
    rep.note(format!(
        "client saw {} replies, then: {}",
        p.replies.len(),
        broke.unwrap_or_default()
    ));
    let _ = died;
    rep.done("no takeover (no committed checkpoint): VM lost — expected, documented limit");
}

// =============================================================================================
// Backup killed.

/// The backup dies (failpoint): the primary notices, runs unprotected (policy release), the
/// client stream is untouched and VERIFY passes on the primary.
fn backup_killed_at(rep: &mut Report, point: &str, nth: u64) {
    backup_killed_with(rep, point, nth, Opts::default());
}

/// With a disk (`--disk`, `--replica-dir`) and the guest's disk workload on it.
fn disk_opts() -> Opts {
    Opts {
        disk: true,
        guest_args: "dirty=16M/s,wss=64M,disk=1M/s,dwss=4M",
        ..Opts::default()
    }
}

/// The backup keeps the replica's memory in a replica store on disk (`--replica-dir`) with
/// a 16 MiB cache budget (`--replica-memory`), and fails over from it lazily.
fn store_opts() -> Opts {
    Opts {
        store: Some(Some("16M")),
        guest_args: "dirty=16M/s,wss=64M",
        ..Opts::default()
    }
}

fn backup_killed_with(rep: &mut Report, point: &str, nth: u64, opts: Opts) -> Rig {
    let mut rig = Rig::start(
        rep,
        Opts {
            backup_failpoints: format!("{point}={nth}*kill"),
            wait_protected: false,
            ..opts
        },
    );
    let mark = rig.primary_events().mark();
    rep.step(format!("waiting for failpoint {point} to kill the backup"));
    let status = rig
        .backup()
        .wait_exit(DEATH_TIMEOUT)
        .unwrap_or_else(|e| panic!("failpoint {point}={nth}*kill did not kill the backup: {e}"));
    let died = Instant::now();
    assert!(
        killed_by_sigkill(status) && fired(rig.backup(), point),
        "the backup ended ({}) but not by failpoint {point}",
        describe_status(status)
    );
    assert!(
        rig.primary_events().any(is_protected),
        "the backup died before the VM was ever protected: the scenario tested nothing"
    );
    rep.step("waiting for the primary to report the lost backup");
    rig.primary_events()
        .wait(
            mark,
            "the lost backup",
            Duration::from_secs(20),
            is_backup_lost,
        )
        .expect("the primary reports the backup lost");
    rig.wait_stream(died, "the primary keeps serving");
    let st = rig.primary_status().expect("primary status");
    assert_eq!(st["mode"], "unprotected", "primary status: {st}");
    rig.finish_and_check(rep, died, "primary");
    rig.assert_no_panics();
    rep.done(format!(
        "primary runs unprotected, stream intact (last_error: {})",
        st["last_error"].as_str().unwrap_or("-")
    ));
    rig
}

/// The backup killed while it writes an epoch's pages into its replica store: the primary
/// runs on, and the store left behind is refused by `twin restore` as torn (its pages
/// mix two epochs), never run.
#[test]
fn backup_killed_mid_apply_to_a_replica_store_leaves_it_refused_as_torn() {
    let mut rep =
        Report::new("backup_killed_mid_apply_to_a_replica_store_leaves_it_refused_as_torn");
    let rig = backup_killed_with(&mut rep, "backup.mid_apply", 100, store_opts());
    let store = rig.replica_dir("backup");
    let bin = twin_bin().expect("twin binary");
    let out = std::process::Command::new(bin)
        .args(["restore", &store.to_string_lossy(), "--tap", "twt-none0"])
        .arg("--control")
        .arg(rig.dir.join("restore.sock"))
        .output()
        .expect("run twin restore");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "twin restore of a torn store: {err}"
    );
    assert!(
        err.contains("is torn") && err.contains("while applying epoch"),
        "twin restore of a torn store said: {err}"
    );
    rep.note(format!("twin restore: {}", err.trim()));
}

/// The primary killed while the backup keeps its replica in a replica store: the VM runs
/// on the backup at once, its memory loaded lazily (working set first), the stream
/// intact and VERIFY clean; the backup reports the load's progress.
fn primary_killed_with_a_replica_store(rep: &mut Report, point: &str, nth: u64) {
    primary_killed_opts(rep, point, nth, store_opts());
}

/// After a failover from a replica store the store still holds the VM as of the failover:
/// with the taken-over VM SIGKILLed, `twin restore` of the store directory brings it back
/// (VERIFY clean) — unless a page of it was damaged on disk, which stops the restore with
/// an error naming the page, never a VM running on the damaged memory.
#[test]
fn a_replica_store_restores_after_a_failover_and_a_damaged_one_is_refused() {
    let mut rep =
        Report::new("a_replica_store_restores_after_a_failover_and_a_damaged_one_is_refused");
    let mut rig = Rig::start(&mut rep, store_opts());
    rig.wait_stream(Instant::now(), "protected stream");
    rig.primary.kill().expect("SIGKILL the primary");
    let died = Instant::now();
    rig.wait_failover(&mut rep);
    rig.wait_stream(died, "the stream resumes on the backup");
    rig.finish_and_check(&mut rep, died, "backup");
    rep.step("SIGKILL the VM taken over; restore its replica store");
    rig.backup().kill().expect("SIGKILL the backup's VM");
    let store = rig.replica_dir("backup");
    let store_s = store.to_string_lossy().into_owned();
    // A data page of the store, damaged by one flipped byte.
    let idx = std::fs::read(store.join("pages.idx")).expect("read the index");
    let page = idx[4096..]
        .chunks_exact(8)
        .position(|e| u64::from_le_bytes(e.try_into().unwrap()) >> 63 == 1)
        .expect("a page with data");
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(store.join("memory.img"))
        .expect("open memory.img");
    let at = page as u64 * 4096 + 17;
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&mem, &mut b, at).expect("read");
    std::os::unix::fs::FileExt::write_all_at(&mem, &[!b[0]], at).expect("damage");
    let control = rig.dir.join("restored.sock");
    let control_s = control.to_string_lossy().into_owned();
    let args = [
        "restore",
        &store_s,
        "--restore",
        "eager",
        "--tap",
        TAP,
        "--control",
        &control_s,
    ];
    let done = TwinProcess::run_to_exit(
        &rig.ha.backup.ns,
        &rig.dir,
        "restore-damaged",
        &args,
        Duration::from_secs(30),
    )
    .expect("twin restore of a damaged store ends");
    assert!(
        !done.status.success(),
        "a damaged store restored: {}",
        done.stderr
    );
    assert!(
        done.stderr.contains(&format!("page {page}")) && done.stderr.contains("damaged"),
        "twin restore of a damaged store said: {}",
        done.stderr
    );
    rep.note(format!("damaged: {}", done.stderr.trim()));
    std::os::unix::fs::FileExt::write_all_at(&mem, &b, at).expect("repair");
    let args = ["restore", &store_s, "--tap", TAP, "--control", &control_s];
    let mut p = TwinProcess::spawn(&rig.ha.backup.ns, &rig.dir, "restore-store", &args)
        .expect("spawn twin restore");
    let mut guest =
        GuestClient::connect_retry(rig.ha.client_ns(), guest_service(), BOOT_TIMEOUT, || {
            p.ensure_running()
        })
        .unwrap_or_else(|e| panic!("the VM restored from the store serves: {e}\n{}", p.tail(20)));
    let v = guest.verify().expect("VERIFY");
    assert!(
        matches!(v, Verify::Ok { .. }),
        "VERIFY on the VM restored from the store: {v:?}"
    );
    assert_no_panic(&p);
    rep.done(format!(
        "restored from the store, VERIFY {v:?}; the damaged page {page} refused"
    ));
}

/// A backup in a 128 MiB memory cgroup protects a 256 MiB VM that has written 160 MiB
/// once (cold) and keeps writing a 24 MiB working set: with the replica in a replica
/// store (and a 16 MiB cache budget) it keeps up — no OOM kill, the store holds more than
/// the cgroup allows — and fails over in the same cgroup with VERIFY clean: the restore
/// loads what fits, most recently written first, and the cold rest only when touched.
/// (In RAM a replica of that size is refused: `backup_memory_cgroup_too_small`.)
#[test]
fn backup_in_a_small_memory_cgroup_keeps_up_with_a_replica_store() {
    let mut rep = Report::new("backup_in_a_small_memory_cgroup_keeps_up_with_a_replica_store");
    let limit: u64 = 128 << 20;
    let mut rig = Rig::start(
        &mut rep,
        Opts {
            backup_cgroup: Some(limit),
            guest_args: "dirty=16M/s,wss=24M,cold=160M",
            ..store_opts()
        },
    );
    let mem = rig.replica_dir("backup").join("memory.img");
    rep.step("waiting until the replica store holds more than the cgroup's limit");
    let t0 = Instant::now();
    let held = loop {
        // Allocated blocks of the sparse file: the pages with data.
        let held = std::fs::metadata(&mem)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0);
        if held > limit + (16 << 20) {
            break held;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "the store holds only {} MiB after 40 s",
            held >> 20
        );
        rig.backup().ensure_running().expect("the backup is alive");
        std::thread::sleep(Duration::from_millis(200));
    };
    rep.step("replicating for 120 epochs in the cgroup");
    let t1 = Instant::now();
    while !rig.backup_committed(120) {
        assert!(
            t1.elapsed() < Duration::from_secs(30),
            "the backup did not commit 120 epochs in 30 s"
        );
        rig.backup().ensure_running().expect("the backup is alive");
        std::thread::sleep(Duration::from_millis(100));
    }
    rig.wait_stream(Instant::now(), "protected stream");
    let cg = rig.cgroup.as_ref().expect("the cgroup");
    assert_eq!(cg.oom_kills(), 0, "the cgroup OOM-killed the backup");
    let peak = cg.max_usage();
    rep.note(format!(
        "store holds {} MiB; the backup's cgroup peaked at {} MiB of its {} MiB",
        held >> 20,
        peak >> 20,
        limit >> 20
    ));
    rep.step("killing the primary");
    rig.assert_no_takeover_yet();
    rig.primary.kill().expect("SIGKILL the primary");
    let died = Instant::now();
    let fo = rig.wait_failover(&mut rep);
    rig.wait_stream(died, "the stream resumes on the backup");
    rig.finish_and_check(&mut rep, died, "backup");
    let st = rig
        .backup_status()
        .expect("status of the VM that took over");
    let r = &st["restore"];
    assert_eq!(r["mode"], "ws", "status of the VM taken over: {st}");
    let cg = rig.cgroup.as_ref().expect("the cgroup");
    assert_eq!(
        cg.oom_kills(),
        0,
        "the VM taken over was OOM-killed in the cgroup"
    );
    assert!(
        r["complete"] == false,
        "the whole store was loaded into an {} MiB cgroup: {st}",
        limit >> 20
    );
    assert!(
        r["resident"].as_u64().unwrap_or(0) > 0 && r["bytes_read"].as_u64().unwrap_or(0) > 0,
        "the restore's progress: {st}"
    );
    rig.assert_no_panics();
    rep.done(format!(
        "failover at epoch {} from a {} MiB store in a {} MiB cgroup; restore: {} of {} pages, {} faults, {} prefetched",
        fo["epoch"],
        held >> 20,
        limit >> 20,
        r["resident"],
        r["data_pages"],
        r["faults"],
        r["prefetched"]
    ));
}

scenarios! {
    backup_killed_mid_receive: backup_killed_at("backup.mid_receive", 200);
    backup_killed_mid_apply: backup_killed_at("backup.mid_apply", 200);
    /// Killed while it writes an epoch's disk writes to its disk replica: the primary
    /// runs on unprotected (the replica, partly written, is never a failover image).
    backup_killed_mid_disk_apply: backup_killed_with("backup.mid_disk_apply", 50, disk_opts());
    /// Killed mid-stream with the replica in a replica store (lazy failover).
    primary_killed_mid_stream_with_a_replica_store:
        primary_killed_with_a_replica_store("primary.mid_stream", 200);
    /// Killed between the ack and the release of the output, replica in a store.
    primary_killed_after_ack_with_a_replica_store:
        primary_killed_with_a_replica_store("primary.after_ack", 200);
}

/// The primary dies, then the backup dies while restoring: nothing runs the VM. Known
/// limit (no third copy). What must hold: the backup's events show the failover started and
/// never completed, it exits by the signal (no panic), and the client sees
/// the service gone rather than a half-restored VM.
#[test]
fn backup_killed_during_failover_restore() {
    let mut rep = Report::new("backup_killed_during_failover_restore");
    let mut rig = Rig::start(
        &mut rep,
        Opts {
            backup_failpoints: "backup.restore=kill".into(),
            request_timeout: Duration::from_secs(8),
            ..Opts::default()
        },
    );
    rig.wait_stream(Instant::now(), "protected stream");
    rep.step("killing the primary");
    rig.assert_no_takeover_yet();
    rig.primary.kill().expect("SIGKILL the primary");
    rep.step("waiting for the backup to die in its restore");
    let status = rig
        .backup()
        .wait_exit(FAILOVER_TIMEOUT)
        .expect("backup.restore=kill kills the backup during the failover");
    assert!(killed_by_sigkill(status) && fired(rig.backup(), "backup.restore"));
    let events = rig.backup_events();
    events.wait_end(Duration::from_secs(5));
    assert!(
        events.any(|e| matches!(e.kind, EventKind::FailoverStarted { .. })),
        "the backup's events do not show the failover starting: {:?}\n{}",
        events.names_since(0),
        rig.backup().tail(20)
    );
    assert!(
        !events.any(|e| matches!(e.kind, EventKind::FailoverComplete(_))),
        "the backup's events show a failover that completed: {:?}",
        events.names_since(0)
    );
    rep.step("checking the client sees the service gone");
    let broke = rig.work().wait_broken(Duration::from_secs(30));
    assert!(
        broke.is_some(),
        "the client stream kept running with both hosts dead"
    );
    let fresh = GuestClient::connect(rig.ha.client_ns(), guest_service(), Duration::from_secs(3));
    assert!(
        fresh.is_err(),
        "a new connection was answered with no VM running"
    );
    rig.assert_no_panics();
    let p = rig.work().snapshot();
    rep.lost = Some(format!("VM lost (last acknowledged {})", p.last));
    rep.done(
        "nothing survives: backup events show failover started, never completed — known limit",
    );
}

/// The backup dies (SIGKILL) and a new one starts: the primary resynchronises it and is
/// protected again — proven by then killing the primary and failing over to the new backup
/// with the stream intact.
#[test]
fn backup_restarted_resyncs() {
    let mut rep = Report::new("backup_restarted_resyncs");
    let mut rig = Rig::start(&mut rep, Opts::default());
    rig.wait_stream(Instant::now(), "protected stream");
    let mark = rig.primary_events().mark();
    rep.step("killing the backup");
    rig.assert_no_takeover_yet();
    rig.backup().kill().expect("SIGKILL the backup");
    let killed = Instant::now();
    rig.primary_events()
        .wait(
            mark,
            "the lost backup",
            Duration::from_secs(20),
            is_backup_lost,
        )
        .expect("the primary reports the backup lost");
    rig.work()
        .wait_replies_after(killed, 10, PROGRESS_TIMEOUT)
        .expect("the primary serves unprotected");
    rep.step("starting a new backup");
    let mark = rig.primary_events().mark();
    let restarted = Instant::now();
    rig.spawn_backup("backup2");
    rig.primary_events()
        .wait(mark, "protection", PROTECT_TIMEOUT, is_protected)
        .expect("the primary resynchronises the new backup and is protected again");
    let resync = restarted.elapsed();
    let st = rig.primary_status().expect("primary status");
    assert_eq!(st["mode"], "protected", "{st}");
    rep.note(format!(
        "re-protected {:.1}s after the new backup started (sessions {}, last_sync {})",
        resync.as_secs_f64(),
        st["sessions"],
        st["last_sync"]
    ));
    rig.wait_stream(Instant::now(), "protected stream with the new backup");
    rep.step("killing the primary to prove the new backup holds a good image");
    rig.assert_no_takeover_yet();
    rig.primary.kill().expect("SIGKILL the primary");
    let died = Instant::now();
    let fo = rig.wait_failover(&mut rep);
    rig.wait_stream(died, "the stream resumes on the new backup");
    rig.finish_and_check(&mut rep, died, "new backup");
    rig.assert_no_panics();
    rep.done(format!(
        "resync in {:.1}s, then failover to the new backup at epoch {}; stream intact",
        resync.as_secs_f64(),
        fo["epoch"]
    ));
}

/// The backup's host hangs (SIGSTOP) for longer than the primary's `--backup-timeout`
/// while the guest dirties memory, then thaws. The primary gives up on the silent backup
/// and runs on; its goodbye may be stuck behind the full socket buffer, so the thawed
/// backup may read only an EOF. It must not take that for a dead primary (split brain):
/// the primary reconnects, resynchronises it, and a later real failover to it works.
#[test]
fn backup_stalled_past_the_primary_timeout() {
    let mut rep = Report::new("backup_stalled_past_the_primary_timeout");
    let mut rig = Rig::start(&mut rep, Opts::default());
    rig.wait_stream(Instant::now(), "protected stream");
    let pmark = rig.primary_events().mark();
    let bmark = rig.backup_events().mark();
    rep.step("freezing the backup (SIGSTOP) for 2 s");
    rig.assert_no_takeover_yet();
    rig.backup()
        .signal(Signal::Stop)
        .expect("SIGSTOP the backup");
    let frozen = Instant::now();
    rig.primary_events()
        .wait(
            pmark,
            "the lost backup",
            Duration::from_secs(20),
            is_backup_lost,
        )
        .expect("the primary gives up on the frozen backup");
    std::thread::sleep(Duration::from_secs(2).saturating_sub(frozen.elapsed()));
    rig.backup()
        .signal(Signal::Cont)
        .expect("SIGCONT the backup");
    rep.step("thawed; waiting for the primary to resynchronise the backup");
    rig.primary_events()
        .wait(pmark, "protection", PROTECT_TIMEOUT, is_protected)
        .expect("the primary resynchronises the thawed backup and is protected again");
    let said = rig
        .backup_events()
        .wait(
            bmark,
            "the primary reconnecting to the thawed backup",
            Duration::from_secs(5),
            |e| matches!(e.kind, EventKind::PrimaryConnected { .. }),
        )
        .expect("the primary reconnected to the thawed backup");
    rep.note(format!("backup: {}", describe(&said)));
    // Past the backup's grace for an ambiguous EOF: a takeover would have happened by now.
    std::thread::sleep(Duration::from_secs(4));
    rig.backup().ensure_running().expect("the backup stays up");
    assert!(
        rig.any_takeover().is_none(),
        "SPLIT BRAIN: the thawed backup took over while the primary runs"
    );
    rig.assert_no_takeover_yet();
    let st = rig.primary_status().expect("primary status");
    assert_eq!(st["mode"], "protected", "{st}");
    let why = rig
        .backup_events()
        .find(bmark, |e| matches!(e.kind, EventKind::SessionEnded { .. }))
        .map(|e| describe(&e))
        .unwrap_or_else(|| "nothing".into());
    rep.note(format!("how the backup saw the session end: {why}"));
    rig.wait_stream(Instant::now(), "protected stream after the resync");
    rep.step("killing the primary to prove the resynchronised replica");
    rig.primary.kill().expect("SIGKILL the primary");
    let died = Instant::now();
    let fo = rig.wait_failover(&mut rep);
    rig.wait_stream(died, "the stream resumes on the backup");
    rig.finish_and_check(&mut rep, died, "backup");
    rig.assert_no_panics();
    rep.done(format!(
        "no takeover by the thawed backup; resync, then failover at epoch {}; stream intact",
        fo["epoch"]
    ));
}

// =============================================================================================
// Replication link cut or slowed.

/// The link is cut while both hosts live. With `--on-backup-loss hold` the primary never
/// lets out output the backup lacks, so the backup's takeover is clean for the client: the
/// primary is alive but silent. (With `release` this is split brain: see
/// `split_brain_on_partition`.)
fn link_cut(rep: &mut Report, cut: Cut) {
    let mut rig = Rig::start(
        rep,
        Opts {
            policy: "hold",
            ..Opts::default()
        },
    );
    rig.wait_stream(Instant::now(), "protected stream");
    let mark = rig.primary_events().mark();
    rep.step(format!("cutting the replication link: {cut:?}"));
    rig.assert_no_takeover_yet();
    let cut_at = Instant::now();
    rig.ha.cut_replication(cut).expect("cut");
    let fo = rig.wait_failover(rep);
    rep.step("waiting for the primary to hold its output or stand down");
    let said = rig
        .primary_events()
        .wait(
            mark,
            "the primary holding its output or standing down",
            Duration::from_secs(20),
            |e| match &e.kind {
                EventKind::BackupLost { policy, .. } => policy == "hold",
                EventKind::StoodDown { .. } => true,
                _ => false,
            },
        )
        .expect("the primary reports the lost backup (holding output) or stands down");
    let fenced = matches!(said.kind, EventKind::StoodDown { .. });
    rig.wait_stream(cut_at, "the stream resumes on the backup");
    rig.finish_and_check(rep, cut_at, "backup");
    let primary_fate = if fenced {
        // The takeover Goodbye reached it: it stops its VM.
        let st = rig
            .primary
            .wait_exit(Duration::from_secs(20))
            .expect("a fenced primary stops");
        assert!(st.success(), "fenced primary exit: {}", describe_status(st));
        "fenced by the takeover Goodbye, stopped".to_string()
    } else {
        rig.primary
            .ensure_running()
            .expect("the primary process stays up");
        let st = rig.primary_status().expect("primary status");
        assert_eq!(
            st["mode"], "holding_output",
            "the primary must hold output after losing the backup: {st}"
        );
        format!("alive, holding {} frames", st["held_output"]["frames"])
    };
    rig.ha.restore_replication().expect("restore the link");
    rig.assert_no_panics();
    rep.done(format!(
        "backup took over at epoch {}; primary {primary_fate}; stream intact",
        fo["epoch"]
    ));
}

scenarios! {
    link_down_both_ways: link_cut(Cut::LinkDown);
    link_drop_both_ways: link_cut(Cut::Drop(Direction::Both));
    link_drop_primary_to_backup: link_cut(Cut::Drop(Direction::PrimaryToBackup));
    link_drop_backup_to_primary: link_cut(Cut::Drop(Direction::BackupToPrimary));
}

/// The replication link is slowed below what the checkpoints need: the primary stretches
/// epochs (backpressure) and reports it, output is released later but still in order and
/// complete, nobody fails over. The guest rewrites a small working set (2 MiB at 4 MiB/s),
/// so a stretched epoch carries at most that much and the lag settles: with a working set
/// larger than the slowed link carries per stretch (it was 64 MiB), every stretched epoch
/// carries more than the last, the lag grows without bound and the primary rightly gives
/// the backup up after 5 s — sooner or later within the window, so the test was flaky.
#[test]
fn link_slowed_backup_lags() {
    let mut rep = Report::new("link_slowed_backup_lags");
    let mut rig = Rig::start(
        &mut rep,
        Opts {
            guest_args: "dirty=4M/s,wss=2M",
            // Uncompressed: the link is slowed to half of what the epochs need; with deltas
            // the epochs shrink to ~23 KiB and the slowed link to ~3.8 Mbit/s, where the
            // backup takes the primary for dead ~1 s after the slowdown and takes over (the
            // primary is fenced: one VM) — a bug of the compressed path found here and not
            // yet understood (issue 14 note), kept apart from what this scenario tests.
            compress: Some("none"),
            ..Opts::default()
        },
    );
    let t0 = Instant::now();
    rig.wait_stream(t0, "protected stream");
    let before = rig.primary_status().expect("status");
    let fast_rate = rig.work().snapshot().replies_between(t0, Instant::now()) as f64
        / t0.elapsed().as_secs_f64();
    let bytes = before["epoch_bytes"]["median"].as_f64().unwrap_or(0.0);
    let interval_s = before["interval_ms"].as_f64().unwrap_or(25.0) / 1e3;
    // Half the rate the checkpoints need at the configured interval.
    let need_kbit = bytes * 8.0 / interval_s / 1e3;
    let kbit = ((need_kbit / 2.0) as u32).clamp(800, 200_000);
    rep.note(format!(
        "before: epoch median {bytes:.0} B ({need_kbit:.0} kbit/s needed), stretched {}, ack p99 {:.1} ms",
        before["stretched_epochs"],
        before["ack_latency_us"]["p99"].as_f64().unwrap_or(0.0) / 1e3
    ));
    rep.step(format!("slowing primary→backup to {kbit} kbit/s"));
    rig.assert_no_takeover_yet();
    let slow_at = Instant::now();
    rig.ha
        .slow_replication(Direction::PrimaryToBackup, Tbf::rate_kbit(kbit))
        .expect("tbf");
    std::thread::sleep(Duration::from_secs(10));
    let mut max_lag = 0u64;
    let mut during = serde_json::Value::Null;
    for _ in 0..10 {
        let s = rig.primary_status().expect("status");
        max_lag = max_lag.max(s["backup_lag_epochs"].as_u64().unwrap_or(0));
        during = s;
        std::thread::sleep(Duration::from_millis(300));
    }
    let slow_rate = rig
        .work()
        .snapshot()
        .replies_between(slow_at, Instant::now()) as f64
        / slow_at.elapsed().as_secs_f64();
    let stretched = during["stretched_epochs"].as_u64().unwrap_or(0)
        - before["stretched_epochs"].as_u64().unwrap_or(0);
    let ack_p99_ms = during["ack_latency_us"]["p99"].as_f64().unwrap_or(0.0) / 1e3;
    let rate_hz = during["checkpoint_rate_hz"].as_f64().unwrap_or(0.0);
    rep.note(format!(
        "slowed: +{stretched} stretched epochs, checkpoint rate {rate_hz:.1} Hz, ack p99 {ack_p99_ms:.0} ms, max lag {max_lag} epochs, INCR/s {fast_rate:.1} → {slow_rate:.1}"
    ));
    assert!(
        stretched > 0,
        "the primary reports no stretched epochs with the link at {kbit} kbit/s: {during}"
    );
    assert!(
        ack_p99_ms > interval_s * 1e3,
        "ack latency p99 {ack_p99_ms} ms does not show the backup falling behind"
    );
    assert_eq!(
        during["mode"], "protected",
        "the primary must stay protected: {during}"
    );
    assert!(
        rig.any_takeover().is_none(),
        "the backup took over on a slow link"
    );
    rep.step("removing the limit");
    rig.ha.unslow_replication().expect("unslow");
    rig.wait_stream(Instant::now(), "stream after the link recovers");
    let (p, client) = rig.finish_work();
    rep.recover = p.max_gap_after(slow_at);
    check_stream(&mut rep, &p, client, "primary");
    rig.assert_no_panics();
    rep.done(format!(
        "protected throughout; {stretched} stretched epochs, ack p99 {ack_p99_ms:.0} ms; output in order"
    ));
}

// =============================================================================================
// Output commit made visible: acks withheld by the proxy.

/// Acks dropped on their way to the primary for a second: the primary must release nothing
/// in that time (the client sees no reply), then the next (cumulative) ack releases it all.
#[test]
fn acks_withheld_output_held() {
    let mut rep = Report::new("acks_withheld_output_held");
    let mut rig = Rig::start(
        &mut rep,
        Opts {
            proxy: true,
            ..Opts::default()
        },
    );
    rig.wait_stream(Instant::now(), "protected stream");
    rep.step("dropping every Ack for 1.5 s");
    rig.assert_no_takeover_yet();
    let armed = Instant::now();
    rig.proxy().arm(Fault {
        kind: FaultKind::Drop,
        way: Way::ToPrimary,
        frame_type: frame_type::ACK,
        nth: None,
    });
    std::thread::sleep(Duration::from_millis(1500));
    rig.proxy().disarm();
    let disarmed = Instant::now();
    let dropped = rig.proxy().injections().len();
    rig.wait_stream(disarmed, "output flows again once acks pass");
    // Frames already released when the drop began may still arrive just after: allow the
    // first 150 ms.
    let p = rig.work().snapshot();
    let leaked = p.replies_between(armed + Duration::from_millis(150), disarmed);
    rep.note(format!(
        "{dropped} acks dropped; replies during the window: {leaked}"
    ));
    assert!(dropped > 10, "the proxy dropped only {dropped} acks");
    assert_eq!(
        leaked, 0,
        "{leaked} replies reached the client while no checkpoint was acknowledged"
    );
    assert!(rig.any_takeover().is_none(), "the backup took over");
    let (p, client) = rig.finish_work();
    rep.recover = p.max_gap_after(armed);
    check_stream(&mut rep, &p, client, "primary");
    rig.assert_no_panics();
    rep.done("no output released while acks were withheld; released on the next ack");
}

// =============================================================================================
// Bad frames on the replication stream (the proxy).

/// What happened to the session after a bad frame.
fn expect_resync(rep: &mut Report, rig: &mut Rig, injected: &[Injection], bmark: u64, pmark: u64) {
    let inj = injected.first().expect("an injection");
    rep.step("waiting for the backup to reject the stream");
    let why = rig
        .backup_events()
        .wait(
            bmark,
            "the backup rejecting the stream",
            Duration::from_secs(20),
            |e| {
                matches!(
                    e.kind,
                    EventKind::SessionEnded { .. }
                        | EventKind::FailoverStarted { .. }
                        | EventKind::FailoverComplete(_)
                )
            },
        )
        .expect("the backup rejects the bad stream");
    rep.note(format!("backup: {}", describe(&why)));
    if took_over(&why) {
        let said = rig
            .primary_events()
            .wait(
                pmark,
                "the lost backup",
                Duration::from_secs(5),
                is_backup_lost,
            )
            .map(|e| describe(&e))
            .unwrap_or_else(|e| format!("nothing ({e})"));
        let primary_alive = rig.primary.ensure_running().is_ok();
        panic!(
            "SPLIT BRAIN: after {:?} on a {} frame ({:?}) the backup took over ({}) while the \
             primary is alive ({primary_alive}) and says: {said}",
            inj.kind,
            frame_type::name(inj.frame_type),
            inj.way,
            describe(&why),
        );
    }
    rep.step("waiting for the primary to reconnect, resync and be protected again");
    rig.primary_events()
        .wait(pmark, "protection", PROTECT_TIMEOUT, is_protected)
        .expect("the primary resynchronises and is protected again");
    rig.backup().ensure_running().expect("the backup stays up");
    assert!(
        rig.any_takeover().is_none(),
        "the backup took over after a bad frame from a live primary (split brain)"
    );
    // Only an epoch's own frames, on their way to the backup, make that epoch bad; a
    // corrupted Ack (to the primary) is about an epoch the backup rightly committed.
    if let (Some(e), Way::ToBackup) = (inj.epoch, inj.way) {
        // Every epoch the backup committed so far is recorded: the bad one is not.
        assert!(
            !rig.backup_committed(e),
            "the backup committed epoch {e}, which the proxy corrupted ({:?})",
            inj.kind
        );
    }
    assert!(
        rig.proxy().connections() >= 2,
        "the primary did not reconnect through the proxy"
    );
    let bst = rig.backup_status().expect("backup status");
    rep.note(format!(
        "backup after resync: state {}, committed {}, rejected {}",
        bst["state"], bst["committed_epoch"], bst["epochs_rejected"]
    ));
}

/// Injects `fault` once protected; expects the backup to reject, the primary to resync, and
/// then proves the resynchronised replica by failing over to it.
fn bad_frame(rep: &mut Report, fault: Fault) {
    bad_frame_with(rep, fault, Opts::default());
}

fn bad_frame_with(rep: &mut Report, fault: Fault, opts: Opts) {
    let mut rig = Rig::start(
        rep,
        Opts {
            proxy: true,
            ..opts
        },
    );
    let t = Instant::now();
    rig.wait_stream(t, "protected stream");
    let (bmark, pmark) = (rig.backup_events().mark(), rig.primary_events().mark());
    rep.step(format!("arming {fault:?}"));
    rig.assert_no_takeover_yet();
    let armed = Instant::now();
    rig.proxy().arm(fault);
    let inj = rig
        .proxy()
        .wait_injections(1, Duration::from_secs(20))
        .expect("the proxy injects the fault");
    rep.note(format!(
        "{:?} on {} epoch {:?}",
        inj[0].kind,
        frame_type::name(inj[0].frame_type),
        inj[0].epoch
    ));
    expect_resync(rep, &mut rig, &inj, bmark, pmark);
    rig.wait_stream(Instant::now(), "protected stream after the resync");
    rep.step("killing the primary to prove the resynchronised replica");
    rig.assert_no_takeover_yet();
    rig.primary.kill().expect("SIGKILL the primary");
    let died = Instant::now();
    let fo = rig.wait_failover(rep);
    rig.wait_stream(died, "the stream resumes on the backup");
    let (p, client) = rig.finish_work();
    rep.recover = p.max_gap_after(armed);
    check_stream(rep, &p, client, "backup");
    rig.assert_no_panics();
    assert!(
        rig.proxy().unframed().is_empty(),
        "{:?}",
        rig.proxy().unframed()
    );
    rep.done(format!(
        "rejected, resynced, later failover at epoch {} clean",
        fo["epoch"]
    ));
}

/// The fault `kind` on the first frame of `frame_type` going `way`.
fn first(kind: FaultKind, way: Way, frame_type: u8) -> Fault {
    Fault {
        kind,
        way,
        frame_type,
        nth: Some(1),
    }
}

/// The rig with deltas flowing: compression on (the default) and a guest whose writes
/// change a quarter of a page.
fn delta_opts() -> Opts {
    Opts {
        guest_args: DELTA_GUEST_ARGS,
        ..Opts::default()
    }
}

/// Compression off (`--compress none`): epochs travel as `Pages`, as before protocol 4.
fn uncompressed_opts() -> Opts {
    Opts {
        compress: Some("none"),
        ..Opts::default()
    }
}

scenarios! {
    /// Page frames (compressed, deltas among them) corrupted on the wire, reordered,
    /// duplicated: the epoch is refused whole, the pair resynchronises, and a later
    /// failover runs on a good replica. With a forged frame CRC the flipped bit reaches
    /// the page decoder: a delta that no longer decodes, or decodes to another page than
    /// the primary's (the epoch checksum is over the decoded pages).
    proxy_corrupt_frame_crc: bad_frame_with(
        first(FaultKind::FlipBit, Way::ToBackup, frame_type::COMPRESSED_PAGES),
        delta_opts()
    );
    proxy_corrupt_forged_crc_epoch_checksum: bad_frame_with(
        first(FaultKind::FlipBitForged, Way::ToBackup, frame_type::COMPRESSED_PAGES),
        delta_opts()
    );
    proxy_reordered_frames: bad_frame_with(
        first(FaultKind::SwapWithNext, Way::ToBackup, frame_type::COMPRESSED_PAGES),
        delta_opts()
    );
    proxy_duplicated_frame: bad_frame_with(
        first(FaultKind::Duplicate, Way::ToBackup, frame_type::COMPRESSED_PAGES),
        delta_opts()
    );
    /// The same faults on raw `Pages` (`--compress none`).
    proxy_corrupt_forged_crc_epoch_checksum_uncompressed: bad_frame_with(
        first(FaultKind::FlipBitForged, Way::ToBackup, frame_type::PAGES),
        uncompressed_opts()
    );
    proxy_reordered_frames_uncompressed: bad_frame_with(
        first(FaultKind::SwapWithNext, Way::ToBackup, frame_type::PAGES),
        uncompressed_opts()
    );
    /// A corrupt Ack on its way to the primary: the primary drops the session. PROTOCOL.md
    /// §7: a payload CRC error is a protocol error, answered with `Refuse { protocol error }`
    /// before closing — so the backup knows the primary is alive and detaches instead of
    /// taking over.
    proxy_corrupt_ack: bad_frame(first(FaultKind::FlipBit, Way::ToPrimary, frame_type::ACK));
    /// Disk writes corrupted on the wire (frame CRC), or with a forged frame CRC (the
    /// epoch checksum catches it): the epoch is refused whole, the disk replica never
    /// sees it, the pair resynchronises, and a later failover runs on a good replica.
    proxy_corrupt_disk_writes:
        bad_frame_with(first(FaultKind::FlipBit, Way::ToBackup, frame_type::DISK_WRITES), disk_opts());
    proxy_corrupt_forged_disk_writes:
        bad_frame_with(first(FaultKind::FlipBitForged, Way::ToBackup, frame_type::DISK_WRITES), disk_opts());
    proxy_dropped_disk_writes:
        bad_frame_with(first(FaultKind::Drop, Way::ToBackup, frame_type::DISK_WRITES), disk_opts());
}

/// A frame cut in half and the connection closed: to the backup this is exactly a primary
/// dying mid-send (EOF inside a frame), so it takes over from its last committed epoch —
/// never from the half epoch. With `--on-backup-loss hold` the live primary lets nothing out,
/// so the client sees one clean failover.
#[test]
fn proxy_truncated_frame() {
    let mut rep = Report::new("proxy_truncated_frame");
    let mut rig = Rig::start(
        &mut rep,
        Opts {
            proxy: true,
            policy: "hold",
            ..Opts::default()
        },
    );
    rig.wait_stream(Instant::now(), "protected stream");
    rep.step("truncating the next CompressedPages frame");
    rig.assert_no_takeover_yet();
    let armed = Instant::now();
    rig.proxy().arm(Fault {
        kind: FaultKind::Truncate,
        way: Way::ToBackup,
        frame_type: frame_type::COMPRESSED_PAGES,
        nth: Some(1),
    });
    let inj = rig
        .proxy()
        .wait_injections(1, Duration::from_secs(20))
        .expect("the proxy truncates a frame");
    let cut_epoch = inj[0].epoch.expect("CompressedPages names its epoch");
    let fo = rig.wait_failover(&mut rep);
    let epoch = fo["epoch"].as_u64().expect("epoch");
    assert!(
        epoch < cut_epoch,
        "the backup failed over at epoch {epoch}, but epoch {cut_epoch} was truncated"
    );
    assert!(!rig.backup_committed(cut_epoch));
    rig.wait_stream(inj[0].at, "the stream resumes on the backup");
    let (p, client) = rig.finish_work();
    rep.recover = p.max_gap_after(armed);
    check_stream(&mut rep, &p, client, "backup");
    rig.primary.ensure_running().expect("the primary stays up");
    rig.assert_no_panics();
    rep.done(format!(
        "truncated epoch {cut_epoch} discarded; backup took over at epoch {epoch}; primary (hold) silent"
    ));
}

/// Every `Hello` rewritten to the next protocol version: the backup refuses naming both versions,
/// builds no replica, the primary reports the refusal and keeps the VM serving unprotected.
/// PROTOCOL.md §7: the primary does not retry a version mismatch.
/// A protocol version from the future.
const FUTURE_VERSION: u32 = twin_wire::PROTOCOL_VERSION + 1;

#[test]
fn proxy_wrong_version_hello() {
    let mut rep = Report::new("proxy_wrong_version_hello");
    let mut rig = Rig::start(
        &mut rep,
        Opts {
            proxy: true,
            wait_protected: false,
            initial_fault: Some(Fault {
                kind: FaultKind::SetHelloVersion(FUTURE_VERSION),
                way: Way::ToBackup,
                frame_type: frame_type::HELLO,
                nth: None,
            }),
            ..Opts::default()
        },
    );
    rep.step("waiting for the refusal");
    let names_both = |l: &str| {
        l.contains("version")
            && l.contains(&FUTURE_VERSION.to_string())
            && l.contains(&twin_wire::PROTOCOL_VERSION.to_string())
    };
    let refused = rig
        .backup_events()
        .wait(
            0,
            "a version refusal",
            Duration::from_secs(30),
            |e| matches!(&e.kind, EventKind::PeerRefused { reason, .. } if names_both(reason)),
        )
        .expect("the backup refuses the version, naming both");
    rep.note(format!("backup: {}", describe(&refused)));
    // What an operator reads: the log names both versions too.
    let refusal = logged(
        rig.backup(),
        Mark::default(),
        "the version refusal",
        names_both,
    );
    rep.note(format!("backup logged: {}", log_msg(&refusal)));
    wait_until(
        "the primary's status to show the refusal",
        Duration::from_secs(20),
        || {
            Ok(rig
                .primary_status()
                .ok()
                .and_then(|s| s["last_error"].as_str().map(|e| e.contains("version")))
                .unwrap_or(false))
        },
    )
    .expect("the primary reports the version refusal");
    let st = rig.primary_status().expect("status");
    rep.note(format!("primary last_error: {}", st["last_error"]));
    assert_ne!(st["mode"], "protected");
    rig.wait_stream(Instant::now(), "the VM serves, unprotected");
    let bst = rig.backup_status().expect("backup status");
    assert!(
        bst["committed_epoch"].is_null() && bst["mem_size"].is_null(),
        "{bst}"
    );
    // Count the attempts over a few seconds.
    std::thread::sleep(Duration::from_secs(4));
    let attempts = rig.proxy().connections();
    let hellos = rig.proxy().injections().len();
    rep.note(format!(
        "{attempts} connection attempts, {hellos} Hellos rewritten"
    ));
    rig.proxy().disarm();
    let pmark = rig.primary_events().mark();
    let recovered = rig
        .primary_events()
        .wait(pmark, "protection", Duration::from_secs(15), is_protected)
        .is_ok();
    rep.note(format!(
        "after the rewrite stopped: protected again = {recovered}"
    ));
    let (p, client) = rig.finish_work();
    check_stream(&mut rep, &p, client, "primary");
    rig.assert_no_panics();
    rep.done(format!(
        "refused, VM served unprotected; {attempts} attempts while refused (spec: 1)"
    ));
    rep.step("checking a version mismatch is not retried (PROTOCOL.md §7)");
    assert_eq!(
        attempts, 1,
        "PROTOCOL.md §7 says a version mismatch is not retried; the primary connected {attempts} times"
    );
}

// =============================================================================================
// Disk full, TAP gone.

/// `twin snapshot` into a 256 KiB tmpfs: a clear error naming the problem, no partial snapshot
/// left behind, the VM keeps running (and a later snapshot elsewhere works).
#[test]
fn snapshot_disk_full() {
    let mut rep = Report::new("snapshot_disk_full");
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("snapshot_disk_full").expect("dir");
    let fs = TinyFs::mount(dir.join("full"), "256k").expect("a 256 KiB tmpfs");
    let sock = dir.join("vm.sock").to_string_lossy().into_owned();
    let cons = dir.join("vm.console").to_string_lossy().into_owned();
    let mut vm = spawn_twin(
        topo.vm_ns(),
        &dir,
        "vm",
        &[
            "run",
            "--tap",
            TAP,
            "--ip",
            GUEST_CIDR,
            "--mem",
            "256M",
            "--guest-args",
            GUEST_ARGS,
            "--control",
            &sock,
            "--console",
            &cons,
        ],
        "",
    );
    let client =
        GuestClient::connect_retry(topo.client_ns(), guest_service(), BOOT_TIMEOUT, || {
            vm.ensure_running()
        })
        .expect("guest service");
    let work = Workload::start(client, RIDE_THROUGH);
    work.wait_replies_after(Instant::now(), 10, PROGRESS_TIMEOUT)
        .expect("stream");
    rep.step("snapshot into the full filesystem");
    let target = fs.path().join("snap");
    let t = target.to_string_lossy().into_owned();
    let done = TwinProcess::run_to_exit(
        topo.vm_ns(),
        &dir,
        "snapshot-full",
        &["snapshot", &t, "--control", &sock],
        Duration::from_secs(120),
    )
    .expect("twin snapshot exits");
    let msg = format!("{}{}", done.stdout, done.stderr);
    rep.note(format!("message: {}", msg.trim()));
    assert!(
        !done.status.success(),
        "the snapshot into 256 KiB succeeded: {msg}"
    );
    assert!(
        msg.contains("No space left on device"),
        "the error does not name the problem (ENOSPC): {msg}"
    );
    assert!(
        msg.contains("snap"),
        "the error does not name the snapshot: {msg}"
    );
    let left: Vec<_> = std::fs::read_dir(fs.path())
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.is_empty(),
        "a partial snapshot was left behind: {left:?}"
    );
    vm.ensure_running()
        .expect("the VM survives the failed snapshot");
    let after = Instant::now();
    work.wait_replies_after(after, PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("the VM keeps serving");
    rep.step("a snapshot elsewhere still works");
    let ok = dir.join("ok").to_string_lossy().into_owned();
    let done = TwinProcess::run_to_exit(
        topo.vm_ns(),
        &dir,
        "snapshot-ok",
        &["snapshot", &ok, "--control", &sock],
        Duration::from_secs(120),
    )
    .expect("twin snapshot exits");
    assert!(done.status.success(), "{}{}", done.stdout, done.stderr);
    let (p, client) = work.finish(RIDE_THROUGH);
    check_stream(&mut rep, &p, client, "VM");
    assert_no_panic(&vm);
    rep.recover = p.max_gap_after(after);
    rep.done("ENOSPC reported, nothing left behind, VM kept running");
    drop(fs);
}

/// The primary's TAP deleted under it: the process says so clearly (a warning or error that
/// names the TAP, as every other TAP error of `twin` does) and does not panic. What happens
/// next (exit? failover? a VM cut off from the network that nobody replaces?) is measured.
#[test]
fn tap_deleted_while_running() {
    let mut rep = Report::new("tap_deleted_while_running");
    let mut rig = Rig::start(&mut rep, Opts::default());
    rig.wait_stream(Instant::now(), "protected stream");
    let mark = rig.primary.mark();
    rep.step("deleting the primary's TAP");
    rig.assert_no_takeover_yet();
    let gone = Instant::now();
    rig.ha
        .primary
        .ns
        .run(&["ip", "link", "delete", TAP])
        .expect("delete tap0");
    let report = rig.primary.wait_for(
        mark,
        "a message about the TAP",
        Duration::from_secs(30),
        |l| {
            let l = l.to_ascii_lowercase();
            (l.contains("error") || l.contains("warn"))
                && (l.contains("tap") || l.contains("device failed") || l.contains("net"))
        },
    );
    let exited = {
        std::thread::sleep(Duration::from_secs(3));
        rig.primary.try_status().ok().flatten()
    };
    let failed_over = rig
        .backup_events()
        .wait(0, "the takeover", Duration::from_secs(5), |e| {
            matches!(e.kind, EventKind::FailoverComplete(_))
        })
        .is_ok();
    let p = rig.work().snapshot();
    let after = p.replies_after(gone);
    if let Ok(st) = rig.primary_status() {
        std::thread::sleep(Duration::from_secs(2));
        let later = rig.primary_status().unwrap_or_default();
        rep.note(format!(
            "primary status after: mode {}, checkpoints {} then {} 2 s later, VM {}, held \
             frames {}, last_error {}",
            st["mode"],
            st["checkpoints"],
            later["checkpoints"],
            later["vm"],
            later["held_output"]["frames"],
            st["last_error"]
        ));
    }
    rep.note(format!(
        "primary {}; backup took over: {failed_over}; client replies after: {after}; stream: {}",
        exited.map_or("still running".to_string(), describe_status),
        p.error.clone().unwrap_or_else(|| "open".into())
    ));
    if let Some(tail) = exited.map(|_| rig.primary.tail(8)) {
        rep.note(format!(
            "primary's last words: {}",
            tail.replace('\n', " / ")
        ));
    }
    // How often the report repeats: a log flood is no clear report (and burns a core).
    let repeats = match &report {
        Ok((_, l)) => {
            let msg = log_msg(l);
            let msg = msg.split(" error=").next().unwrap_or(&msg).to_string();
            rig.primary
                .text(Stream::Stderr)
                .lines()
                .filter(|x| x.contains(&msg))
                .count()
        }
        Err(_) => 0,
    };
    let window = gone.elapsed().as_secs_f64();
    rep.note(format!(
        "the report appeared {repeats} times in {window:.1}s"
    ));
    rig.assert_no_panics();
    let line = report.unwrap_or_else(|e| {
        panic!("the primary did not report the vanished TAP clearly within 30 s: {e}")
    });
    rep.note(format!("reported: {}", log_msg(&line.1)));
    rep.step("checking a report names the TAP");
    let named = rig.primary.wait_for(
        mark,
        "a report naming the TAP",
        Duration::from_millis(10),
        |l| {
            let lower = l.to_ascii_lowercase();
            (lower.contains("error") || lower.contains("warn")) && l.contains(TAP)
        },
    );
    assert!(
        named.is_ok(),
        "no report names the TAP ({TAP}), so an operator cannot tell which device failed; the \
         only report: {}",
        log_msg(&line.1)
    );
    rep.done(format!(
        "reported; primary {}; failover: {failed_over}",
        exited.map_or("kept running".into(), describe_status)
    ));
}

// =============================================================================================
// Split brain.

/// The guest MAC's bridge port in the LAN switch, as a host name.
fn switch_port(ha: &Ha) -> String {
    let out = ha
        .lan
        .ns
        .run(&["bridge", "fdb", "show", "br", BRIDGE])
        .unwrap_or_default();
    let (_, pport) = ha.primary.uplink.b();
    let (_, bport) = ha.backup.uplink.b();
    let line = out
        .lines()
        .find(|l| l.starts_with(GUEST_MAC) && !l.contains("permanent"));
    match line {
        Some(l) if l.contains(&format!("dev {pport} ")) => "primary".into(),
        Some(l) if l.contains(&format!("dev {bport} ")) => "backup".into(),
        Some(l) => format!("other ({l})"),
        None => "none (flooding)".into(),
    }
}

/// The client's ARP entry for the guest.
fn client_neighbour(ha: &Ha) -> String {
    ha.client_ns()
        .run(&["ip", "neigh", "show", &GUEST_ADDR.to_string()])
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| e.to_string())
}

/// Asks the VM on `role`'s host alone (the other host's uplink down) for the counter.
fn ask_one_side(ha: &Ha, role: HostRole) -> String {
    let other = match role {
        HostRole::Primary => HostRole::Backup,
        HostRole::Backup => HostRole::Primary,
        HostRole::Standby => unreachable!("the ha layout of this scenario has no standby"),
    };
    let _ = ha.isolate_lan(other);
    std::thread::sleep(Duration::from_millis(300));
    let r = GuestClient::connect_retry(
        ha.client_ns(),
        guest_service(),
        Duration::from_secs(8),
        || Ok(()),
    )
    .and_then(|mut c| {
        c.set_request_timeout(Duration::from_secs(5))?;
        let v = c.get(KEY)?;
        Ok(v)
    });
    let _ = ha.reconnect_lan(other);
    std::thread::sleep(Duration::from_millis(300));
    match r {
        Ok(v) => format!("answers, {KEY}={v}"),
        Err(e) => format!("no answer ({})", e.to_string().lines().next().unwrap_or("")),
    }
}

scenarios! {
    /// Replication cut both ways while both hosts live, policy `release` (the default), no
    /// arbiter. Remus cannot tell this from a dead primary: the backup takes over, the
    /// primary releases its held output and keeps serving. This measures what the outside
    /// world sees; it asserts only that the measurements were taken and reported, not that
    /// the outcome is safe (that is what the arbiter is for: the next row).
    split_brain_on_partition: partition_both_ways(false);
    /// The same partition with a real etcd as the arbiter: exactly one side may answer when
    /// the client is put in front of each alone, and no acknowledged INCR is lost.
    no_split_brain_with_arbiter: partition_both_ways(true);
}

fn partition_both_ways(rep: &mut Report, arbiter: bool) {
    let mut rig = Rig::start(
        rep,
        Opts {
            arbiter,
            ..Opts::default()
        },
    );
    rig.wait_stream(Instant::now(), "protected stream");
    let neigh_before = client_neighbour(&rig.ha);
    let port_before = switch_port(&rig.ha);
    rep.step("cutting replication both ways, both hosts alive");
    rig.assert_no_takeover_yet();
    let pmark = rig.primary_events().mark();
    let cut_at = Instant::now();
    rig.ha
        .cut_replication(Cut::Drop(Direction::Both))
        .expect("cut");
    // Watch for 6 s: the switch's idea of where the guest is, over time.
    let mut ports = Vec::new();
    while cut_at.elapsed() < Duration::from_secs(6) {
        let p = switch_port(&rig.ha);
        if ports
            .last()
            .map(|(_, q): &(f64, String)| q != &p)
            .unwrap_or(true)
        {
            ports.push((cut_at.elapsed().as_secs_f64(), p));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took_over = rig
        .backup_events()
        .wait(0, "the takeover", Duration::from_secs(1), |e| {
            matches!(e.kind, EventKind::FailoverComplete(_))
        })
        .ok();
    let primary_lost = rig
        .primary_events()
        .wait(
            pmark,
            "the lost backup",
            Duration::from_secs(1),
            is_backup_lost,
        )
        .is_ok();
    let pst = rig.primary_status();
    let bst = rig.backup_status();
    let p = rig.work().snapshot();
    let neigh_after = client_neighbour(&rig.ha);
    rep.step("stopping the client stream and asking each side alone");
    let (p_end, _client) = rig.finish_work();
    let primary_view = ask_one_side(&rig.ha, HostRole::Primary);
    let backup_view = ask_one_side(&rig.ha, HostRole::Backup);
    let both = primary_view.starts_with("answers") && backup_view.starts_with("answers");
    rep.note(format!("backup took over: {}", took_over.is_some()));
    rep.note(format!(
        "primary noticed: {primary_lost}, mode {}",
        pst.as_ref()
            .map(|s| s["mode"].to_string())
            .unwrap_or_else(|e| e.clone())
    ));
    rep.note(format!(
        "backup role {}",
        bst.as_ref()
            .map(|s| s["role"].to_string())
            .unwrap_or_else(|e| e.clone())
    ));
    rep.note(format!(
        "switch port for {GUEST_MAC}: before {port_before}, after cut {ports:?}"
    ));
    rep.note(format!(
        "client ARP before [{neigh_before}] after [{neigh_after}] (both VMs use {GUEST_MAC})"
    ));
    rep.note(format!(
        "client stream: {} replies after cut, {} lost, {} repeats, anomalies {:?}, end {:?}",
        p.replies_after(cut_at),
        p_end.lost,
        p_end.repeats,
        p_end.anomalies.iter().take(3).collect::<Vec<_>>(),
        p_end.error
    ));
    rep.note(format!(
        "primary alone: {primary_view}; backup alone: {backup_view}"
    ));
    rep.lost = Some(format!("{} (repeats {})", p_end.lost, p_end.repeats));
    rep.recover = p_end.max_gap_after(cut_at);
    rig.ha.restore_replication().expect("restore");
    rig.assert_no_panics();
    // Without an arbiter what is asserted is that the measurement happened and both
    // processes answered status; with one, that the world saw one VM and lost nothing.
    assert!(
        pst.is_ok() || arbiter,
        "primary status unavailable: {pst:?}"
    );
    assert!(bst.is_ok(), "backup status unavailable: {bst:?}");
    assert!(!ports.is_empty());
    if arbiter {
        assert!(
            !both,
            "SPLIT BRAIN with an arbiter: primary {primary_view}; backup {backup_view}"
        );
        assert!(
            primary_view.starts_with("answers") || backup_view.starts_with("answers"),
            "nobody serves the VM: primary {primary_view}; backup {backup_view}"
        );
        assert_eq!(p_end.lost, 0, "acknowledged INCRs lost");
        rep.done(format!(
            "ONE VM: backup took over={}, primary {primary_view}, backup {backup_view}",
            took_over.is_some()
        ));
        return;
    }
    rep.done(format!(
        "MEASURED: backup took over={}, primary kept serving={}, both answer={both}",
        took_over.is_some(),
        primary_view.starts_with("answers")
    ));
}

// =============================================================================================
// Strangers, fakes and stalls on the replication network (issue: six bugs found by attack
// testing). A stranger dials the backup's port from the primary host; a fake backup listens
// where the primary expects its backup.

fn backup_addr() -> std::net::SocketAddr {
    backup_listen().parse().expect("addr")
}

/// The VM the rig's primary protects, as the backup names it.
fn protected_vm(rig: &Rig) -> twin_wire::VmId {
    let st = rig.backup_status().expect("backup status");
    let hex = st["session"]["vm"]
        .as_str()
        .unwrap_or_else(|| panic!("the backup serves no session: {st}"));
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex VM id");
    }
    twin_wire::VmId(id)
}

/// The first refusal among `msgs`, if any; panics on a `HelloAck` (the stranger got in).
fn refusal(msgs: &[twin_wire::Message], who: &str) -> Option<twin_wire::Refuse> {
    for m in msgs {
        match m {
            twin_wire::Message::HelloAck(a) => panic!(
                "{who} was ACCEPTED by the backup (HelloAck for VM {} generation {})",
                a.vm_id, a.generation
            ),
            twin_wire::Message::Refuse(r) => return Some(r.clone()),
            _ => {}
        }
    }
    None
}

/// Kills the primary and proves the backup's replica is the protected VM's.
fn failover_proves_the_replica(
    rep: &mut Report,
    mut rig: Rig,
    since: Instant,
) -> serde_json::Value {
    rep.step("killing the primary to prove the replica is the protected VM's");
    rig.assert_no_takeover_yet();
    rig.primary.kill().expect("SIGKILL the primary");
    let died = Instant::now();
    let fo = rig.wait_failover(rep);
    rig.wait_stream(died, "the stream resumes on the backup");
    let (p, client) = rig.finish_work();
    rep.recover = p.max_gap_after(since);
    check_stream(rep, &p, client, "backup");
    rig.assert_no_panics();
    fo
}

/// A stranger (no authentication: `--no-auth` on both sides, so only the backup's pinning
/// stands in its way) queues `Hello{generation: 2^62}` and its own VM description while the
/// backup serves the real primary; then the real session ends without a takeover (a
/// corrupted Ack makes the primary abandon it). The stranger must be refused, the backup
/// must stay pinned to the real VM, and the real primary must resynchronise and fail over.
#[test]
fn stranger_takes_idle_slot() {
    use twin_lab::stranger::{description, hello, random_vm, Peer};
    use twin_link::LinkConfig;
    let mut rep = Report::new("stranger_takes_idle_slot");
    let rig = Rig::start(
        &mut rep,
        Opts {
            proxy: true,
            auth: Auth::None,
            ..Opts::default()
        },
    );
    rig.wait_stream(Instant::now(), "protected stream");
    let vm = protected_vm(&rig);
    let pmark = rig.primary_events().mark();
    rep.step("a stranger queues Hello{generation: 2^62} and its own VM description");
    let mut stranger = Peer::dial(&rig.ha.primary.ns, backup_addr(), &LinkConfig::insecure())
        .expect("dial the backup")
        .expect("an unauthenticated backup lets the stranger's link through");
    stranger
        .send(&hello(random_vm(), 1 << 62))
        .expect("stranger Hello");
    stranger
        .send(&description(256 << 20, [0x02, 0xba, 0xd0, 0, 0, 1]))
        .expect("stranger description");
    rep.step("ending the real session without a takeover (a corrupted Ack)");
    let t = Instant::now();
    rig.proxy().arm(Fault {
        kind: FaultKind::FlipBit,
        way: Way::ToPrimary,
        frame_type: frame_type::ACK,
        nth: Some(1),
    });
    rig.proxy()
        .wait_injections(1, Duration::from_secs(20))
        .expect("the proxy corrupts an Ack");
    let (msgs, _) = stranger.drain(Duration::from_secs(8));
    let refused = refusal(&msgs, "the stranger").expect("the stranger is refused");
    rep.note(format!(
        "stranger refused: {} ({})",
        refused.reason, refused.detail
    ));
    rig.primary_events()
        .wait(pmark, "protection", PROTECT_TIMEOUT, is_protected)
        .expect("the real primary resynchronises the backup (not refused as stale)");
    let st = rig.backup_status().expect("backup status");
    assert_eq!(
        st["pinned_vm"].as_str(),
        Some(vm.to_string().as_str()),
        "the backup is pinned to the protected VM: {st}"
    );
    assert_eq!(st["session"]["vm"].as_str(), Some(vm.to_string().as_str()));
    let fo = failover_proves_the_replica(&mut rep, rig, t);
    rep.done(format!(
        "stranger refused ({}); real primary resynced; failover at epoch {} intact",
        refused.reason, fo["epoch"]
    ));
}

/// With the pair's key on both sides, a stranger without it (or with another key) does not
/// even get to say Hello: both sides name the cause, and the live session is undisturbed.
#[test]
fn stranger_without_the_key() {
    use twin_lab::stranger::Peer;
    use twin_link::{Key, LinkConfig, LinkError};
    let mut rep = Report::new("stranger_without_the_key");
    let mut rig = Rig::start(&mut rep, Opts::default());
    rig.wait_stream(Instant::now(), "protected stream");
    let (bmark, blog) = (rig.backup_events().mark(), rig.backup().mark());
    rep.step("a stranger without a key, then one with another key");
    let none =
        Peer::dial(&rig.ha.primary.ns, backup_addr(), &LinkConfig::insecure()).expect("dial");
    let e = none.err().expect("refused without a key");
    assert!(matches!(e, LinkError::PeerRequiresKey { .. }), "{e}");
    let other = LinkConfig::with_key(Key::generate().expect("key"), false);
    let wrong = Peer::dial(&rig.ha.primary.ns, backup_addr(), &other).expect("dial");
    let e2 = wrong.err().expect("refused with the wrong key");
    assert!(matches!(e2, LinkError::WrongKey { .. }), "{e2}");
    rig.backup_events()
        .wait(
            bmark,
            "the backup refusing the keyless peer",
            Duration::from_secs(10),
            |e| refused_for(e, "has no key"),
        )
        .expect("the backup refuses the keyless peer, naming the cause");
    rig.backup_events()
        .wait(
            bmark,
            "the backup refusing the wrong key",
            Duration::from_secs(10),
            |e| refused_for(e, "key differs"),
        )
        .expect("the backup refuses the wrong key, naming the cause");
    // What an operator reads in the backup's log.
    let l1 = logged(rig.backup(), blog, "the keyless peer", |l| {
        l.contains("refused a replication peer") && l.contains("has no key")
    });
    let l2 = logged(rig.backup(), blog, "the wrong key", |l| {
        l.contains("refused a replication peer") && l.contains("key differs")
    });
    rep.note(format!("stranger: {e}; backup: {}", log_msg(&l1)));
    rep.note(format!("stranger: {e2}; backup: {}", log_msg(&l2)));
    rig.wait_stream(Instant::now(), "the protected stream goes on");
    let st = rig.primary_status().expect("primary status");
    assert_eq!(st["mode"], "protected", "{st}");
    let bst = rig.backup_status().expect("backup status");
    assert_eq!(
        bst["sessions"], 1,
        "the live session was never disturbed: {bst}"
    );
    assert_eq!(bst["state"], "replicating", "{bst}");
    let (p, client) = rig.finish_work();
    check_stream(&mut rep, &p, client, "primary");
    rig.assert_no_panics();
    rep.done("both strangers refused at the link, each named on both sides; session undisturbed");
}

/// The backup freezes (SIGSTOP) for `stall` while the primary lives, optionally with a TCP
/// health probe connecting and closing every 0.5 s: the primary gives up on it and
/// reconnects; when it thaws, nothing it finds (the primary's abandoned reconnects, the
/// probes, an EOF) may make it take over. It resynchronises and later fails over intact.
fn backup_stall(rep: &mut Report, stall: Duration, probe: bool) {
    let mut rig = Rig::start(rep, Opts::default());
    rig.wait_stream(Instant::now(), "protected stream");
    let stop_probe = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = probe.then(|| {
        let (ns, stop) = (rig.ha.primary.ns.clone(), stop_probe.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let c = ns.enter(|| {
                    std::net::TcpStream::connect_timeout(&backup_addr(), Duration::from_secs(1))
                });
                if matches!(c, Ok(Ok(_))) {
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            n
        })
    });
    std::thread::sleep(Duration::from_secs(1));
    let pmark = rig.primary_events().mark();
    rep.step(format!("freezing the backup (SIGSTOP) for {stall:?}"));
    rig.assert_no_takeover_yet();
    rig.backup()
        .signal(Signal::Stop)
        .expect("SIGSTOP the backup");
    let frozen = Instant::now();
    rig.primary_events()
        .wait(
            pmark,
            "the lost backup",
            stall.max(Duration::from_secs(20)),
            is_backup_lost,
        )
        .expect("the primary gives up on the frozen backup");
    std::thread::sleep(stall.saturating_sub(frozen.elapsed()));
    rig.backup()
        .signal(Signal::Cont)
        .expect("SIGCONT the backup");
    let thawed = Instant::now();
    rep.step("thawed; the primary must resynchronise it, and nothing may take over");
    rig.primary_events()
        .wait(pmark, "protection", PROTECT_TIMEOUT, is_protected)
        .expect("the primary resynchronises the thawed backup");
    // Past the backup's grace for an ambiguous loss: a takeover would have happened by now.
    std::thread::sleep(Duration::from_secs(5).saturating_sub(thawed.elapsed()));
    stop_probe.store(true, std::sync::atomic::Ordering::Release);
    if let Some(p) = prober {
        let n = p.join().expect("prober");
        rep.note(format!("{n} health probes connected"));
    }
    rig.backup().ensure_running().expect("the backup stays up");
    assert!(
        rig.any_takeover().is_none(),
        "SPLIT BRAIN: the thawed backup took over while the primary runs: {:?}\n{}",
        rig.backup_events().names_since(0),
        rig.backup().tail(30)
    );
    rig.assert_no_takeover_yet();
    let st = rig.primary_status().expect("primary status");
    assert_eq!(st["mode"], "protected", "{st}");
    rig.wait_stream(Instant::now(), "protected stream after the resync");
    let fo = failover_proves_the_replica(rep, rig, frozen);
    rep.done(format!(
        "no takeover by the thawed backup; resync, then failover at epoch {} intact",
        fo["epoch"]
    ));
}

scenarios! {
    backup_stalled_7s: backup_stall(Duration::from_secs(7), false);
    backup_stall_with_health_probe: backup_stall(Duration::from_millis(1200), true);
}

/// The backup is in its grace after a stall (the primary's goodbye lost: failpoint
/// `primary.goodbye=drop`), the primary is then SIGKILLed, and strangers send a bare
/// `Goodbye(stopping)` and `Goodbye(handover)` before any Hello (`--no-auth`, so only the
/// backup's admission rule stands in their way). Nothing before a Hello counts: the grace
/// runs out and the backup takes over; the client's stream is intact. (`--on-backup-loss
/// hold`: a primary that released output after giving up on its backup and then died
/// leaves a replica behind what the client saw, whoever takes over — the arbiter's case.)
#[test]
fn goodbye_before_hello() {
    use twin_lab::stranger::{goodbye, Peer};
    use twin_link::LinkConfig;
    use twin_wire::GoodbyeReason;
    let mut rep = Report::new("goodbye_before_hello");
    let mut rig = Rig::start(
        &mut rep,
        Opts {
            auth: Auth::None,
            policy: "hold",
            primary_failpoints: "primary.goodbye=drop".into(),
            ..Opts::default()
        },
    );
    rig.wait_stream(Instant::now(), "protected stream");
    let (pmark, bmark) = (rig.primary_events().mark(), rig.backup_events().mark());
    rep.step("freezing the backup until the primary gives up on it");
    rig.assert_no_takeover_yet();
    rig.backup()
        .signal(Signal::Stop)
        .expect("SIGSTOP the backup");
    let frozen = Instant::now();
    rig.primary_events()
        .wait(
            pmark,
            "the lost backup",
            Duration::from_secs(20),
            is_backup_lost,
        )
        .expect("the primary gives up on the frozen backup");
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(frozen.elapsed()));
    rep.step("SIGKILL of the primary; strangers queue bare goodbyes; the backup thaws");
    rig.primary.kill().expect("SIGKILL the primary");
    let strangers: Vec<_> = [GoodbyeReason::Stopping, GoodbyeReason::Handover]
        .into_iter()
        .map(|reason| {
            let ns = rig.ha.primary.ns.clone();
            std::thread::spawn(move || {
                let peer = Peer::dial(&ns, backup_addr(), &LinkConfig::insecure())
                    .expect("dial")
                    .expect("link without auth");
                peer.send(&goodbye(reason, "a stranger's goodbye"))
                    .expect("send");
                std::thread::sleep(Duration::from_secs(1));
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    rig.backup()
        .signal(Signal::Cont)
        .expect("SIGCONT the backup");
    let thawed = Instant::now();
    for s in strangers {
        s.join().expect("stranger");
    }
    let fo = rig.wait_failover(&mut rep);
    let waited = thawed.elapsed();
    let seen = rig
        .backup_events()
        .wait(
            bmark,
            "the backup refusing the goodbyes",
            Duration::from_secs(5),
            |e| refused_for(e, "before Hello"),
        )
        .expect("the backup refuses the strangers for sending something before Hello");
    rep.note(format!("backup: {}", describe(&seen)));
    rep.note(format!(
        "takeover {:.1}s after the thaw",
        waited.as_secs_f64()
    ));
    rig.wait_stream(thawed, "the stream resumes on the backup");
    let (p, client) = rig.finish_work();
    rep.recover = p.max_gap_after(frozen);
    check_stream(&mut rep, &p, client, "backup");
    rig.assert_no_panics();
    rep.done(format!(
        "goodbyes before Hello ignored; grace ran out, takeover at epoch {}; stream intact",
        fo["epoch"]
    ));
}

/// A fake backup that holds the pair's key but never acknowledges an epoch says
/// `Goodbye(takeover)`: the primary must not fence or stop its VM for it. Then a fake
/// without the key: the primary names the cause and runs on.
#[test]
fn takeover_goodbye_without_ack() {
    use twin_lab::stranger::{goodbye, FakeBackup};
    use twin_link::LinkConfig;
    use twin_wire::GoodbyeReason;
    let mut rep = Report::new("takeover_goodbye_without_ack");
    rep.step("building the ha layout; a fake backup with the key listens");
    let ha = Topology::ha().expect("ha topology");
    let dir = TestDir::new("takeover-without-ack").expect("test dir");
    let fake =
        FakeBackup::listen(&ha.backup.ns, backup_addr(), dir.link_config()).expect("fake backup");
    let auth = Auth::Key.args(&dir, true);
    let mut primary = spawn_primary(&ha, &dir, "primary", &backup_listen(), &auth, &[], "");
    let pe = twin_lab::events::Events::at(dir.join("primary.sock")).record(false);
    let (mut peer, hello) = fake
        .accept(BOOT_TIMEOUT)
        .expect("the primary dials")
        .expect("the link with the key");
    rep.note(format!(
        "fake backup accepted VM {} generation {}",
        hello.vm_id, hello.generation
    ));
    let pmark = pe.mark();
    let _ = peer.drain(Duration::from_millis(500));
    rep.step("the fake backup says takeover without ever acknowledging");
    peer.send(&goodbye(GoodbyeReason::Takeover, "a fake takeover"))
        .expect("send the goodbye");
    let said = pe
        .wait(
            pmark,
            "the primary refusing to stand down",
            Duration::from_secs(10),
            |e| matches!(e.kind, EventKind::TakeoverIgnored { .. }),
        )
        .expect("the primary says it does not stand down");
    rep.note(format!("primary: {}", describe(&said)));
    drop(peer);
    std::thread::sleep(Duration::from_secs(2));
    primary.ensure_running().expect("the primary keeps running");
    pe.sync();
    assert!(
        !pe.any(|e| matches!(e.kind, EventKind::StoodDown { .. })),
        "the primary fenced itself for a fake backup: {:?}\n{}",
        pe.names_since(0),
        primary.tail(20)
    );
    let st = status(&ha.primary.ns, &dir, &dir.join("primary.sock")).expect("status");
    assert_ne!(st["mode"], "fenced", "{st}");
    let mut client =
        GuestClient::connect_retry(ha.client_ns(), guest_service(), BOOT_TIMEOUT, || {
            primary.ensure_running()
        })
        .expect("the guest still serves");
    let a = client.incr(KEY).expect("INCR");
    assert_eq!(client.incr(KEY).expect("INCR"), a + 1);
    rep.step("a fake backup without the key");
    drop(fake);
    let keyless = FakeBackup::listen(&ha.backup.ns, backup_addr(), LinkConfig::insecure())
        .expect("keyless fake");
    let (pmark, plog) = (pe.mark(), primary.mark());
    let r = keyless
        .accept(Duration::from_secs(20))
        .expect("the primary dials again");
    let e = r.err().expect("the keyless fake cannot complete the link");
    pe.wait(
        pmark,
        "the primary naming the keyless backup",
        Duration::from_secs(10),
        |e| backup_lost_for(e, "has no key"),
    )
    .expect("the primary loses the keyless backup, naming the cause");
    let said = logged(&mut primary, plog, "the keyless backup's cause", |l| {
        l.contains("has no key")
    });
    rep.note(format!("fake: {e}; primary: {}", log_msg(&said)));
    primary.ensure_running().expect("the primary keeps running");
    assert_eq!(client.incr(KEY).expect("INCR"), a + 2);
    assert_no_panic(&primary);
    rep.done("fake takeover ignored (no ack in the session); keyless fake named; VM ran on");
}

/// Peers that connect and then dribble one byte a second, or send only heartbeats, must not
/// keep a real primary from being protected; the backup closes them at its Hello deadline.
#[test]
fn slow_peers_do_not_hold_the_backup() {
    use std::io::{Read as _, Write as _};
    use twin_lab::stranger::Peer;
    let mut rep = Report::new("slow_peers_do_not_hold_the_backup");
    let ha = Topology::ha().expect("ha topology");
    let dir = TestDir::new("slow-peers").expect("test dir");
    let auth = Auth::Key.args(&dir, false);
    let backup = spawn_backup(&ha, &dir, "backup", &auth, &[], "");
    rep.step("a peer dribbling a byte a second, and a keyed peer sending only heartbeats");
    let mut dribbler = ha
        .primary
        .ns
        .enter(|| std::net::TcpStream::connect(backup_addr()))
        .expect("enter")
        .expect("connect");
    let mut beater = Peer::dial(&ha.primary.ns, backup_addr(), &dir.link_config())
        .expect("dial")
        .expect("keyed link");
    let t0 = Instant::now();
    let dribble = std::thread::spawn(move || {
        let mut closed_after = None;
        for i in 0..15u8 {
            if dribbler
                .write_all(&[b"TWINLINK"[usize::from(i % 8)]])
                .is_err()
            {
                closed_after = Some(t0.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let mut b = [0u8; 64];
        dribbler
            .set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        if closed_after.is_none() && matches!(dribbler.read(&mut b), Ok(0) | Err(_)) {
            closed_after = Some(t0.elapsed());
        }
        closed_after
    });
    let beats = std::thread::spawn(move || {
        for seq in 1..150u64 {
            let hb = twin_wire::Message::Heartbeat(twin_wire::Heartbeat {
                seq,
                sent_at_ns: 0,
                last_epoch: 0,
            });
            if beater.send(&hb).is_err() {
                return Some(t0.elapsed());
            }
            if let Err(twin_link::RecvError::Closed | twin_link::RecvError::Link(_)) =
                beater.recv(Duration::from_millis(100))
            {
                return Some(t0.elapsed());
            }
        }
        None
    });
    rep.step("starting the real primary");
    let pauth = Auth::Key.args(&dir, true);
    let mut primary = spawn_primary(&ha, &dir, "primary", &backup_listen(), &pauth, &[], "");
    twin_lab::events::Events::at(dir.join("primary.sock"))
        .wait_live(&mut primary, 0, "protection", PROTECT_TIMEOUT, is_protected)
        .expect("the real primary is protected despite the slow peers");
    let protected = t0.elapsed();
    let d = dribble.join().expect("dribbler");
    let b = beats.join().expect("beater");
    rep.note(format!(
        "protected {:.1}s after the slow peers connected; dribbler closed after {d:?}, heartbeat-only peer after {b:?}",
        protected.as_secs_f64()
    ));
    assert!(
        d.is_some_and(|d| d < Duration::from_secs(12)),
        "the dribbler was not closed at the Hello deadline: {d:?}"
    );
    assert!(
        b.is_some_and(|b| b < Duration::from_secs(12)),
        "the heartbeat-only peer was not closed at the Hello deadline: {b:?}"
    );
    assert_no_panic(&primary);
    assert_no_panic(&backup);
    rep.done(format!(
        "primary protected in {:.1}s; slow peers closed at the deadline",
        protected.as_secs_f64()
    ));
}

/// A keyed peer that says Hello for another VM while the backup serves one is refused as
/// busy; one that says Hello for the protected VM at an old generation as stale. The live
/// session is undisturbed.
#[test]
fn busy_backup_refuses_a_second_primary() {
    use twin_lab::stranger::{hello, random_vm, Peer};
    use twin_wire::RefuseReason;
    let mut rep = Report::new("busy_backup_refuses_a_second_primary");
    let rig = Rig::start(&mut rep, Opts::default());
    rig.wait_stream(Instant::now(), "protected stream");
    let vm = protected_vm(&rig);
    let link = rig.dir.link_config();
    let ask = |vm, generation| {
        let mut p = Peer::dial(&rig.ha.primary.ns, backup_addr(), &link)
            .expect("dial")
            .expect("keyed link");
        p.send(&hello(vm, generation)).expect("Hello");
        let (msgs, _) = p.drain(Duration::from_secs(5));
        refusal(&msgs, "a second primary").expect("a refusal")
    };
    let busy = ask(random_vm(), 1);
    assert_eq!(busy.reason, RefuseReason::Busy, "{busy:?}");
    let stale = ask(vm, 1);
    assert_eq!(stale.reason, RefuseReason::StaleGeneration, "{stale:?}");
    rep.note(format!("other VM: {} ({})", busy.reason, busy.detail));
    rep.note(format!(
        "old generation: {} ({})",
        stale.reason, stale.detail
    ));
    rig.wait_stream(Instant::now(), "the protected stream goes on");
    let st = rig.primary_status().expect("primary status");
    assert_eq!(st["mode"], "protected", "{st}");
    let bst = rig.backup_status().expect("backup status");
    assert_eq!(
        bst["sessions"], 1,
        "the live session was never disturbed: {bst}"
    );
    assert_eq!(bst["refused"], 2, "{bst}");
    let fo = failover_proves_the_replica(&mut rep, rig, Instant::now());
    rep.done(format!(
        "refused busy and stale; session undisturbed; failover at epoch {} intact",
        fo["epoch"]
    ));
}

/// A backup in an 80 MiB memory cgroup is asked to hold a 256 MiB replica: it refuses at
/// the description, naming the limit, instead of being OOM-killed mid-sync.
#[test]
fn backup_memory_cgroup_too_small() {
    let mut rep = Report::new("backup_memory_cgroup_too_small");
    let ha = Topology::ha().expect("ha topology");
    let dir = TestDir::new("backup-cgroup").expect("test dir");
    let cg = twin_lab::MemoryCgroup::new("backup", 80 << 20);
    let auth = Auth::Key.args(&dir, false);
    // Entered with `nsenter --net`, as a systemd unit with `NetworkNamespacePath=` would be:
    // `ip netns exec` mounts a sysfs without the cgroup file systems, where the backup
    // cannot read its own limit (ARCHITECTURE.md).
    let args = backup_args(&dir, "backup", &auth, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bin = twin_bin().expect("twin binary");
    let mut backup = TwinProcess::spawn_program_nsenter(
        &ha.backup.ns,
        &dir,
        "backup",
        &bin,
        &args,
        &[("TWIN_LOG", "info")],
    )
    .expect("spawn the backup");
    cg.add(backup.pid());
    wait_listening(&mut backup, &dir.join("backup.sock"));
    rep.step("the backup runs in an 80 MiB memory cgroup; a 256 MiB primary protects to it");
    let pauth = Auth::Key.args(&dir, true);
    // A guest that writes 128 MiB of its RAM: the replica outgrows the cgroup.
    let mut primary = spawn_primary(
        &ha,
        &dir,
        "primary",
        &backup_listen(),
        &pauth,
        &["--guest-args", "dirty=64M/s,wss=128M"],
        "",
    );
    let pe = twin_lab::events::Events::at(dir.join("primary.sock"));
    let why = pe
        .wait_live(
            &mut primary,
            0,
            "the primary naming the refusal",
            PROTECT_TIMEOUT,
            |e| backup_lost_for(e, "does not fit"),
        )
        .expect("the primary reports why the backup cannot hold its replica");
    rep.note(format!("primary: {}", describe(&why)));
    let said = logged(&mut primary, Mark::default(), "the refusal's cause", |l| {
        l.contains("backup lost") && l.contains("does not fit")
    });
    rep.note(format!("primary logged: {}", log_msg(&said)));
    std::thread::sleep(Duration::from_secs(3));
    backup
        .ensure_running()
        .expect("the backup is alive (not OOM-killed)");
    assert_eq!(cg.oom_kills(), 0, "the cgroup OOM-killed something");
    let st = status(&ha.backup.ns, &dir, &dir.join("backup.sock")).expect("backup status");
    let err = st["last_error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("does not fit"), "{st}");
    assert!(
        pe.find(0, is_protected).expect("primary events").is_none(),
        "a replica that does not fit was accepted"
    );
    primary.ensure_running().expect("the primary runs on");
    rep.note(format!("backup: {err}"));
    assert_no_panic(&primary);
    assert_no_panic(&backup);
    rep.done("refused at the description naming the cgroup; no OOM kill; primary runs on");
}

/// Starts primary `name` with `auth` against `backup`, and waits until both sides name why
/// the backup refused it: the primary's `backup_lost` and log line say `says.0`, the backup's
/// `refused` event and log line say `says.1`.
fn refused_primary(
    rep: &mut Report,
    (ha, dir): (&Ha, &TestDir),
    (backup, be): (&mut TwinProcess, &twin_lab::events::Events),
    (name, auth): (&str, &[String]),
    says: (&str, &str),
) -> TwinProcess {
    let (bmark, blog) = (be.mark().expect("backup events"), backup.mark());
    let mut primary = spawn_primary(ha, dir, name, &backup_listen(), auth, &[], "");
    let pe = twin_lab::events::Events::at(dir.join(format!("{name}.sock")));
    pe.wait_live(
        &mut primary,
        0,
        &format!("{name} naming the cause"),
        PROTECT_TIMEOUT,
        |e| backup_lost_for(e, says.0),
    )
    .unwrap_or_else(|e| panic!("{name} does not say {:?}: {e}", says.0));
    be.wait_live(
        backup,
        bmark,
        &format!("the backup naming why it refused {name}"),
        Duration::from_secs(10),
        |e| refused_for(e, says.1),
    )
    .unwrap_or_else(|e| panic!("the backup does not say {:?}: {e}", says.1));
    // What an operator reads in the logs.
    let p = logged(&mut primary, Mark::default(), says.0, |l| {
        l.contains("backup lost") && l.contains(says.0)
    });
    let b = logged(backup, blog, says.1, |l| {
        l.contains("refused a replication peer") && l.contains(says.1)
    });
    rep.note(format!("{name}: {}", log_msg(&p)));
    rep.note(format!("backup: {}", log_msg(&b)));
    primary
}

/// Keys that differ, and a key on one side only: both sides name the cause.
#[test]
fn wrong_key_named_on_both_sides() {
    let mut rep = Report::new("wrong_key_named_on_both_sides");
    let ha = Topology::ha().expect("ha topology");
    let dir = TestDir::new("wrong-key").expect("test dir");
    let other = dir.join("other.key");
    twin_link::Key::generate()
        .and_then(|k| k.write_new(&other))
        .expect("a second key");
    let auth = Auth::Key.args(&dir, false);
    let mut backup = spawn_backup(&ha, &dir, "backup", &auth, &[], "");
    let wrong = [
        "--key-file".to_string(),
        other.to_string_lossy().into_owned(),
    ];
    let be = twin_lab::events::Events::at(dir.join("backup.sock"));
    rep.step("a primary with another key");
    let mut primary = refused_primary(
        &mut rep,
        (&ha, &dir),
        (&mut backup, &be),
        ("primary", &wrong),
        ("key differs", "key differs"),
    );
    primary.terminate().expect("SIGTERM");
    let _ = primary.wait_exit(Duration::from_secs(20));
    rep.step("a primary with no key (--no-auth)");
    let noauth = ["--no-auth".to_string()];
    let primary2 = refused_primary(
        &mut rep,
        (&ha, &dir),
        (&mut backup, &be),
        ("primary2", &noauth),
        ("requires an authenticated link", "has no key"),
    );
    let pe2 = twin_lab::events::Events::at(dir.join("primary2.sock"));
    assert!(pe2
        .find(0, is_protected)
        .expect("primary2 events")
        .is_none());
    assert_no_panic(&primary);
    assert_no_panic(&primary2);
    assert_no_panic(&backup);
    rep.done("wrong key and missing key each named by both sides; never protected");
}

// =============================================================================================

/// Prints the table of every scenario this test process ran (runs last: tests run in name
/// order with `--test-threads=1`).
#[test]
fn zzz_summary_table() {
    let rows = std::fs::read_to_string(rows_file()).unwrap_or_default();
    let mut out = String::new();
    out.push_str("\n| scenario | outcome | time to recover | outputs lost | notes |\n");
    out.push_str("| --- | --- | --- | --- | --- |\n");
    let mut n = 0;
    for line in rows.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() >= 5 {
            n += 1;
            let notes: String = cols[4].chars().take(400).collect();
            let more = if cols[4].chars().count() > 400 {
                "…"
            } else {
                ""
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {notes}{more} |
",
                cols[0], cols[1], cols[2], cols[3]
            ));
        }
    }
    if n == 0 {
        out.push_str("| (no scenario ran in this process) | | | | |\n");
    }
    let md = Path::new(env!("CARGO_TARGET_TMPDIR")).join("faults-summary.md");
    let _ = std::fs::write(&md, &out);
    println!("{out}\n(also in {})", md.display());
}

// =============================================================================================
// The proxy itself, without a VM: each fault does exactly what it says to the byte stream.

fn read_frame(s: &mut impl std::io::Read) -> Option<twin_lab::proxy::Frame> {
    let mut header = [0u8; twin_lab::proxy::FRAME_HEADER_LEN];
    s.read_exact(&mut header).ok()?;
    let len = twin_lab::proxy::parse_header(&header).expect("a parseable header");
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).ok()?;
    Some(twin_lab::proxy::Frame { header, payload })
}

/// Both ends hold the key and encrypt: the proxy terminates both links, so it reads and
/// rewrites frames as a man in the middle with the key would.
#[test]
fn proxy_selftest() {
    use std::io::Read as _;
    use std::net::{TcpListener, TcpStream};
    use twin_lab::proxy::Frame;
    use twin_link::{LinkConfig, LinkReader, LinkWriter};
    require_root();
    let ns = Netns::new("proxyself").expect("namespace");
    let upstream = ns
        .enter(|| TcpListener::bind("127.0.0.1:0"))
        .expect("enter")
        .expect("bind");
    let up_addr = upstream.local_addr().expect("addr");
    let link = LinkConfig::with_key(twin_link::Key::generate().expect("key"), true);
    let proxy = FrameProxy::start(
        &ns,
        "127.0.0.1:0".parse().expect("addr"),
        up_addr,
        link.clone(),
    )
    .expect("proxy");
    let t = Duration::from_secs(5);
    let link2 = link.clone();
    let backup_side = std::thread::spawn(move || {
        let (s, _) = upstream.accept().expect("accept");
        twin_link::accept(s, &link2, t).expect("backup link")
    });
    let primary = ns
        .enter(|| TcpStream::connect(proxy.listen_addr()))
        .expect("enter")
        .expect("connect");
    let primary = twin_link::connect(primary, &link, t).expect("primary link");
    let backup = backup_side.join().expect("backup side");
    assert!(primary.info.encrypted && backup.info.encrypted);
    let (mut primary, mut primary_w): (LinkReader, LinkWriter) = (primary.reader, primary.writer);
    let (mut backup, mut backup_w) = (backup.reader, backup.writer);
    for r in [&mut primary, &mut backup] {
        r.set_read_timeout(Some(t));
    }
    let pages = |e: u64, fill: u8| {
        let mut p = e.to_le_bytes().to_vec();
        p.extend_from_slice(&[fill; 64]);
        Frame::new(frame_type::PAGES, p)
    };
    let state = |e: u64| Frame::new(frame_type::STATE, e.to_le_bytes().to_vec());
    let send = |s: &mut LinkWriter, f: &Frame| s.write_all(&f.to_bytes()).expect("send");
    let arm = |kind, way, ty| {
        proxy.arm(Fault {
            kind,
            way,
            frame_type: ty,
            nth: Some(1),
        })
    };

    // Untouched.
    send(&mut primary_w, &pages(1, 1));
    assert_eq!(read_frame(&mut backup), Some(pages(1, 1)));

    // Duplicate.
    arm(FaultKind::Duplicate, Way::ToBackup, frame_type::PAGES);
    send(&mut primary_w, &pages(2, 2));
    send(&mut primary_w, &state(2));
    assert_eq!(read_frame(&mut backup), Some(pages(2, 2)));
    assert_eq!(read_frame(&mut backup), Some(pages(2, 2)));
    assert_eq!(read_frame(&mut backup), Some(state(2)));

    // Swap with the next frame.
    arm(FaultKind::SwapWithNext, Way::ToBackup, frame_type::PAGES);
    send(&mut primary_w, &pages(3, 3));
    send(&mut primary_w, &state(3));
    assert_eq!(read_frame(&mut backup), Some(state(3)));
    assert_eq!(read_frame(&mut backup), Some(pages(3, 3)));

    // Bit flip, CRC left stale / forged.
    arm(FaultKind::FlipBit, Way::ToBackup, frame_type::PAGES);
    send(&mut primary_w, &pages(4, 4));
    let f = read_frame(&mut backup).expect("frame");
    assert!(!f.is_sealed(), "a stale CRC must not match");
    assert_ne!(f.payload, pages(4, 4).payload);
    assert_eq!(f.header, pages(4, 4).header);
    arm(FaultKind::FlipBitForged, Way::ToBackup, frame_type::PAGES);
    send(&mut primary_w, &pages(5, 5));
    let f = read_frame(&mut backup).expect("frame");
    assert!(f.is_sealed(), "a forged frame must pass the frame CRC");
    assert_ne!(f.payload, pages(5, 5).payload);

    // Hello version.
    arm(
        FaultKind::SetHelloVersion(2),
        Way::ToBackup,
        frame_type::HELLO,
    );
    let mut hello = 1u32.to_le_bytes().to_vec();
    hello.extend_from_slice(b"rest of hello");
    send(&mut primary_w, &Frame::new(frame_type::HELLO, hello));
    let f = read_frame(&mut backup).expect("frame");
    assert!(f.is_sealed());
    assert_eq!(&f.payload[..4], &2u32.to_le_bytes());
    assert_eq!(&f.payload[4..], b"rest of hello");

    // Drop, the other way.
    proxy.arm(Fault {
        kind: FaultKind::Drop,
        way: Way::ToPrimary,
        frame_type: frame_type::ACK,
        nth: None,
    });
    let ack = |e: u64| Frame::new(frame_type::ACK, e.to_le_bytes().to_vec());
    let hb = Frame::new(frame_type::HEARTBEAT, vec![0; 24]);
    send(&mut backup_w, &ack(6));
    send(&mut backup_w, &hb);
    assert_eq!(read_frame(&mut primary), Some(hb.clone()));
    proxy.disarm();
    send(&mut backup_w, &ack(7));
    assert_eq!(read_frame(&mut primary), Some(ack(7)));

    // Truncate: half a frame, then both sides closed.
    arm(FaultKind::Truncate, Way::ToBackup, frame_type::PAGES);
    send(&mut primary_w, &pages(8, 8));
    let mut rest = Vec::new();
    let _ = backup.read_to_end(&mut rest);
    let whole = pages(8, 8).to_bytes();
    assert_eq!(rest.len(), 24 + (whole.len() - 24) / 2);
    assert_eq!(&rest[..], &whole[..rest.len()]);
    let mut tail = Vec::new();
    let _ = primary.read_to_end(&mut tail);

    let inj = proxy.injections();
    let kinds: Vec<_> = inj.iter().map(|i| (i.kind, i.epoch)).collect();
    assert_eq!(
        kinds,
        vec![
            (FaultKind::Duplicate, Some(2)),
            (FaultKind::SwapWithNext, Some(3)),
            (FaultKind::FlipBit, Some(4)),
            (FaultKind::FlipBitForged, Some(5)),
            (FaultKind::SetHelloVersion(2), None),
            (FaultKind::Drop, Some(6)),
            (FaultKind::Truncate, Some(8)),
        ]
    );
    assert!(proxy.unframed().is_empty());
}
