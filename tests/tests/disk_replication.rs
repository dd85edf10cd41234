//! Disk replication with output commit, end to end: a protected VM whose durable store is on
//! a virtio-blk disk (`twin protect --disk`, `twin backup --replica-dir`).
//!
//! - The primary is SIGKILLed under an INCR load: the backup's VM answers every
//!   acknowledged value from memory, and after the backup's VM is SIGKILLed in turn, a cold
//!   boot of `twin run` on its disk replica replays a log that holds every acknowledged
//!   value too — the disk replica was exactly the disk as of the committed epoch.
//! - The stream is cut in the middle of an epoch carrying disk writes (failpoint
//!   `primary.mid_stream`, kill): that partial epoch never touches the replica, which stays
//!   the disk as of the last committed epoch (the log it holds is a prefix of the
//!   primary's, ending at a record boundary, with every value the backup acknowledged).

use std::path::Path;
use std::time::{Duration, Instant};

use twin_guest_image::kvlog::{self, Head, Op, SECTOR};
use twin_lab::rig::*;
use twin_lab::*;

const PROGRESS: Duration = Duration::from_secs(60);
const BOOT: Duration = Duration::from_secs(60);

/// The values the log in `image` sets `key` to, in order (and how many records it has).
fn log_values(image: &Path, key: &str) -> (Vec<u64>, usize) {
    let bytes = std::fs::read(image).expect("read the image");
    assert_eq!(
        kvlog::label(&bytes[..SECTOR]),
        kvlog::Label::Log,
        "{} holds the guest's log",
        image.display()
    );
    let total = (bytes.len() / SECTOR) as u64;
    let (mut at, mut seq, mut out, mut n) = (1u64, 1u64, Vec::new(), 0);
    while at < total {
        let s = at as usize * SECTOR;
        let Head::Record { sectors } = kvlog::head(&bytes[s..s + SECTOR], total - at) else {
            break;
        };
        let Ok(op) = kvlog::decode(&bytes[s..s + sectors * SECTOR], seq) else {
            break;
        };
        if let Op::Set(k, v) = op {
            if k == key.as_bytes() {
                out.push(std::str::from_utf8(v).unwrap().parse().unwrap());
            }
        }
        n += 1;
        at += sectors as u64;
        seq += 1;
    }
    (out, n)
}

/// `twin run` of the built-in guest on `disk`, in `ns` on the TAP there.
fn cold_boot(
    ns: &Netns,
    client: &Netns,
    dir: &TestDir,
    name: &str,
    disk: &Path,
) -> (TwinProcess, GuestClient) {
    let disk = disk.to_string_lossy().into_owned();
    let mut vm = TwinProcess::spawn(
        ns,
        dir,
        name,
        &[
            "run", "--tap", TAP, "--ip", GUEST_CIDR, "--mem", "256M", "--disk", &disk,
        ],
    )
    .expect("spawn twin run");
    let g = GuestClient::connect_retry(client, guest_service(), BOOT, || vm.ensure_running())
        .unwrap_or_else(|e| panic!("the cold-booted guest answers: {e:#}\n{}", vm.tail(20)));
    (vm, g)
}

fn stat(g: &mut GuestClient, key: &str) -> String {
    g.stats().expect("STATS")[key].clone()
}

#[test]
fn failover_runs_on_the_disk_replica_and_it_holds_every_acknowledged_value() {
    let mut rep = Report::new("disk_failover");
    let mut rig = Rig::start(
        &mut rep,
        Opts {
            disk: true,
            // The disk workload too: 4 KiB blocks at 2 MiB/s, a FLUSH after each, checked
            // by VERIFY on the backup against the sequence numbers in its memory.
            guest_args: "dirty=16M/s,wss=64M,disk=2M/s,dwss=8M",
            ..Opts::default()
        },
    );
    let synced = rig
        .primary_events()
        .find(0, |e| {
            matches!(e.kind, twin_api::EventKind::DiskSynced { disk: 0, .. })
        })
        .expect("the primary reports disk 0 copied to the backup");
    rep.note(describe(&synced));
    rep.step("protected INCRs, each appended to the log and flushed before its reply");
    rig.work()
        .wait_replies_after(Instant::now(), 300, PROGRESS)
        .expect("protected stream");
    rig.assert_no_takeover_yet();
    rep.step("SIGKILL the primary");
    rig.primary.kill().expect("SIGKILL the primary");
    let died = Instant::now();
    let fo = rig.wait_failover(&mut rep);
    rig.work()
        .wait_replies_after(died, 100, PROGRESS)
        .expect("the stream resumes on the backup");
    let (p, client) = rig.finish_work();
    // Memory: every acknowledged value, the same connection, VERIFY passes.
    check_stream(&mut rep, &p, client, "backup");
    let mut g = GuestClient::connect(rig.ha.client_ns(), guest_service(), BOOT).expect("connect");
    assert_eq!(
        stat(&mut g, "disk"),
        "log",
        "the backup's VM runs with its disk"
    );
    let last = g.get(KEY).expect("GET");
    assert_eq!(last, p.last);
    drop(g);

    rep.step("SIGKILL the backup's VM, cold boot its disk replica");
    rig.backup().kill().expect("SIGKILL the backup's VM");
    let replica = rig.replica_dir("backup").join("disk-0.img");
    let (values, records) = log_values(&replica, KEY);
    assert_eq!(
        values.last().copied(),
        Some(p.last),
        "the replica's log ends at the last acknowledged value"
    );
    assert!(
        values.windows(2).all(|w| w[1] == w[0] + 1) && values[0] == 1,
        "the replica's log holds every INCR once, in order (1..={})",
        p.last
    );
    let (mut vm, mut g) = cold_boot(
        &rig.ha.backup.ns,
        rig.ha.client_ns(),
        &rig.dir,
        "cold",
        &replica,
    );
    assert_eq!(stat(&mut g, "log_replayed"), records.to_string());
    assert_eq!(stat(&mut g, "log_torn"), "none");
    assert_eq!(
        g.get(KEY).expect("GET after the cold boot"),
        p.last,
        "disk and memory agree"
    );
    vm.terminate().expect("SIGTERM");
    vm.wait_exit(Duration::from_secs(10)).expect("exit");
    rig.assert_no_panics();
    rep.done(format!(
        "failover at epoch {} on the disk replica; {} INCRs, replica log {records} records, \
         cold boot GET {}",
        fo["epoch"], p.last, p.last
    ));
}

#[test]
fn a_stream_cut_mid_epoch_leaves_the_replica_as_of_the_last_commit() {
    let mut rep = Report::new("disk_cut_mid_epoch");
    // The 200th epoch's stream is cut half way (the primary dies there); with INCRs
    // flowing, that epoch (and the one being written meanwhile) carries disk writes. The
    // backup, once it has restored the VM from the replica, waits 3 s before running it:
    // the replica can be read as the failover found it.
    let mut rig = Rig::start(
        &mut rep,
        Opts {
            disk: true,
            primary_failpoints: "primary.mid_stream=200*kill".into(),
            backup_failpoints: "backup.restore=sleep(3000)".into(),
            ..Opts::default()
        },
    );
    let mark = rig.backup().mark();
    rep.step("waiting for the failpoint to kill the primary mid-epoch");
    let status = rig
        .primary
        .wait_exit(Duration::from_secs(120))
        .expect("the failpoint kills the primary");
    assert!(killed_by_sigkill(status) && fired(&rig.primary, "primary.mid_stream"));
    let acked = rig.work().snapshot().last;
    rig.backup()
        .wait_for(
            mark,
            "the restore failpoint",
            Duration::from_secs(30),
            |l| l.contains("failpoint fired") && l.contains("backup.restore"),
        )
        .expect("the backup restores the VM");
    let replica = rig.replica_dir("backup").join("disk-0.img");
    let primary = rig.primary_disk();
    let (theirs, _) = log_values(&replica, KEY);
    let (ours, _) = log_values(&primary, KEY);
    rep.note(format!(
        "at restore: {acked} acknowledged, primary log {} INCRs, replica {}",
        ours.len(),
        theirs.len()
    ));
    // The replica is the primary's disk as of the last commit: a prefix of its log that
    // holds every acknowledged value, without the INCRs of the cut epoch (and of the one
    // the primary was running), which reached the primary's disk only.
    assert_eq!(
        &ours[..theirs.len()],
        &theirs[..],
        "the replica's log is a prefix of the primary's"
    );
    assert!(
        theirs.len() as u64 >= acked,
        "every acknowledged INCR is on the replica"
    );
    assert!(
        ours.len() > theirs.len(),
        "the uncommitted epochs' disk writes stayed on the primary ({} vs {})",
        ours.len(),
        theirs.len()
    );
    let fo = rig.wait_failover(&mut rep);
    let epoch = fo["epoch"].as_u64().unwrap();
    assert!(
        !rig.backup_committed(epoch + 1),
        "the cut epoch was not committed"
    );
    let died = Instant::now();
    rig.work()
        .wait_replies_after(died, 50, PROGRESS)
        .expect("the stream resumes on the backup");
    let (p, client) = rig.finish_work();
    check_stream(&mut rep, &p, client, "backup");
    rig.backup().kill().expect("SIGKILL the backup's VM");
    let (mut vm, mut g) = cold_boot(
        &rig.ha.backup.ns,
        rig.ha.client_ns(),
        &rig.dir,
        "cold",
        &replica,
    );
    assert_eq!(stat(&mut g, "log_torn"), "none");
    assert_eq!(g.get(KEY).unwrap(), p.last, "disk and memory agree");
    vm.terminate().expect("SIGTERM");
    vm.wait_exit(Duration::from_secs(10)).expect("exit");
    rig.assert_no_panics();
    rep.done(format!(
        "cut in epoch {}; replica held {} of the primary's {} INCRs at restore; cold boot {}",
        epoch + 1,
        theirs.len(),
        ours.len(),
        p.last
    ));
}

#[test]
fn a_full_backup_disk_ends_the_session_and_the_primary_carries_on() {
    let mut rep = Report::new("disk_backup_full");
    let mut rig = Rig::start(
        &mut rep,
        Opts {
            disk: true,
            guest_args: "dirty=16M/s,wss=64M,disk=1M/s,dwss=4M",
            ..Opts::default()
        },
    );
    rig.work()
        .wait_replies_after(Instant::now(), 50, PROGRESS)
        .expect("protected stream");
    rep.step("replacing the backup by one whose --replica-dir is a 256 KiB file system");
    let mark = rig.primary_events().mark();
    rig.backup().kill().expect("SIGKILL the first backup");
    rig.primary_events()
        .wait(
            mark,
            "the lost backup",
            Duration::from_secs(20),
            is_backup_lost,
        )
        .expect("the primary reports the first backup lost");
    let fs = TinyFs::mount(rig.replica_dir("backup2"), "256k").expect("a 256 KiB tmpfs");
    let mark = rig.primary_events().mark();
    rig.spawn_backup("backup2");
    let lost = rig
        .primary_events()
        .wait(mark, "the full backup lost", Duration::from_secs(60), |e| {
            backup_lost_for(e, "No space left")
        })
        .expect("the session ends, naming the full disk");
    rep.note(describe(&lost));
    assert!(
        describe(&lost).contains("disk replica"),
        "the reason names the disk replica: {}",
        describe(&lost)
    );
    // The primary carries on (policy release) and nothing acknowledged is lost.
    let after = Instant::now();
    rig.work()
        .wait_replies_after(after, 50, PROGRESS)
        .expect("the primary serves on");
    assert!(
        rig.backup().try_status().unwrap().is_none(),
        "the backup did not crash"
    );
    let (p, client) = rig.finish_work();
    check_stream(&mut rep, &p, client, "primary");
    rig.assert_no_panics();
    rep.done("the session ended with the full disk named; the primary served on".to_string());
    // The processes (which hold the replica open) go before the file system.
    drop(rig);
    drop(fs);
}

/// 16 connections of SET/INCR (the rig's stream and 15 more), the disk workload on: the
/// primary is SIGKILLed; on the backup every connection's acknowledged values are there,
/// VERIFY (memory and disk) passes, and a cold boot of the disk replica after the backup's
/// VM is SIGKILLed has every acknowledged value too.
#[test]
fn sixteen_writers_lose_nothing_in_memory_or_on_the_replica() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut rep = Report::new("disk_failover_16_writers");
    let mut rig = Rig::start(
        &mut rep,
        Opts {
            disk: true,
            guest_args: "dirty=16M/s,wss=64M,disk=1M/s,dwss=4M",
            ..Opts::default()
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for i in 0..15u64 {
        let mut c = GuestClient::connect(rig.ha.client_ns(), guest_service(), BOOT)
            .expect("another connection");
        c.set_request_timeout(RIDE_THROUGH).unwrap();
        let stop = stop.clone();
        writers.push(std::thread::spawn(move || -> (u64, u64) {
            // (last INCR of c<i> acknowledged, last SET of s<i> acknowledged)
            let (mut incr, mut set) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let v = c.incr(&format!("c{i}")).expect("INCR");
                assert_eq!(v, incr + 1, "connection {i}: INCR skipped or repeated");
                incr = v;
                if v % 4 == 0 {
                    c.set(&format!("s{i}"), v * 1000 + i).expect("SET");
                    set = v * 1000 + i;
                }
            }
            (incr, set)
        }));
    }
    rig.work()
        .wait_replies_after(Instant::now(), 100, PROGRESS)
        .expect("protected stream");
    rig.assert_no_takeover_yet();
    rep.step("SIGKILL the primary under 16 writers");
    rig.primary.kill().expect("SIGKILL the primary");
    let died = Instant::now();
    rig.wait_failover(&mut rep);
    rig.work()
        .wait_replies_after(died, 50, PROGRESS)
        .expect("the stream resumes on the backup");
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<(u64, u64)> = writers
        .into_iter()
        .map(|w| w.join().expect("a writer failed"))
        .collect();
    let (p, client) = rig.finish_work();
    check_stream(&mut rep, &p, client, "backup");
    let mut g = GuestClient::connect(rig.ha.client_ns(), guest_service(), BOOT).unwrap();
    for (i, &(incr, set)) in acked.iter().enumerate() {
        assert_eq!(g.get(&format!("c{i}")).unwrap(), incr, "c{i} on the backup");
        assert_eq!(g.get(&format!("s{i}")).unwrap(), set, "s{i} on the backup");
    }
    let v = g.request("VERIFY").expect("VERIFY");
    assert!(v.starts_with("OK ") && v.contains("disk_blocks="), "{v}");
    drop(g);
    rig.backup().kill().expect("SIGKILL the backup's VM");
    let replica = rig.replica_dir("backup").join("disk-0.img");
    let (mut vm, mut g) = cold_boot(
        &rig.ha.backup.ns,
        rig.ha.client_ns(),
        &rig.dir,
        "cold",
        &replica,
    );
    assert_eq!(stat(&mut g, "log_torn"), "none");
    assert_eq!(g.get(KEY).unwrap(), p.last);
    for (i, &(incr, set)) in acked.iter().enumerate() {
        assert_eq!(
            g.get(&format!("c{i}")).unwrap(),
            incr,
            "c{i} after the cold boot"
        );
        assert_eq!(
            g.get(&format!("s{i}")).unwrap(),
            set,
            "s{i} after the cold boot"
        );
    }
    vm.terminate().expect("SIGTERM");
    vm.wait_exit(Duration::from_secs(10)).expect("exit");
    rig.assert_no_panics();
    let total: u64 = acked.iter().map(|a| a.0).sum::<u64>() + p.last;
    rep.done(format!(
        "{total} INCRs over 16 connections; backup memory and cold-booted replica agree"
    ));
}
