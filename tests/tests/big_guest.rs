//! Guests bigger than the 3 GiB below the MMIO hole, end to end: their RAM continues at
//! 4 GiB (one memfd, two KVM slots; see ARCHITECTURE.md, "Guest physical memory map").
//!
//! - `twin run --mem 16G`: the guest is told both RAM ranges, its memory workload's working
//!   set spans the hole (`wssbase=`), every page of it is written and VERIFY passes; the
//!   host allocates only what was touched;
//! - `twin protect` of an 8 GiB guest whose working set spans the hole: the initial sync
//!   sends only the data the memfd holds, epochs carry pages from both sides, and after a
//!   SIGKILL of the primary VERIFY passes on the backup host;
//! - `twin snapshot --stop` of a 6 GiB guest with such a working set, restored in a new
//!   process: VERIFY passes.
//!
//! Each keeps the touched set to a few hundred MiB: memory is sparse, so a 16 GiB guest
//! costs what it writes.

use std::path::Path;
use std::time::{Duration, Instant};

use twin_api::EventKind;
use twin_lab::events::{took_over, Events, Recorder};
use twin_lab::rig::{spawn_keyed_backup, spawn_twin};
use twin_lab::*;

/// Boot plus service start-up, generous for software KVM (PVM) on a busy 2-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Boot, live initial sync and first ack.
const PROTECT_TIMEOUT: Duration = Duration::from_secs(90);
/// Until the workload has written every page of its working set once.
const FILL_TIMEOUT: Duration = Duration::from_secs(90);
/// From SIGKILL of the primary to the backup's `failover_complete` event.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// One request across a move (TCP retransmits carry it over).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// `VmRSS` of process `pid` in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/PID/status")
        * 1024
}

/// Polls VERIFY until the sequential workload has written each of its `pages` pages at
/// least once (so every page of the working set, on both sides of the hole, is checked
/// against a real sequence number, not just found zero); returns the last result.
fn verify_after_fill(
    guest: &mut GuestClient,
    pages: u64,
    mut alive: impl FnMut() -> Result<()>,
) -> u64 {
    let deadline = Instant::now() + FILL_TIMEOUT;
    loop {
        match guest.verify().expect("VERIFY") {
            Verify::Ok { pages: p, writes } => {
                assert_eq!(p, pages, "the working set's pages");
                if writes >= pages {
                    return writes;
                }
                assert!(
                    Instant::now() < deadline,
                    "the workload wrote {writes} of {pages} pages in {FILL_TIMEOUT:?}"
                );
            }
            Verify::Fail(why) => panic!("VERIFY: {why}"),
        }
        alive().expect("the VM process runs");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Asserts that the guest's console shows `lines` (its boot report of RAM and the
/// working set).
fn assert_console(console: &Path, lines: &[&str]) {
    let text = std::fs::read_to_string(console).expect("the guest console file");
    for l in lines {
        assert!(
            text.contains(l),
            "the guest console lacks {l:?}:\n{}",
            text.lines().take(20).collect::<Vec<_>>().join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------
// 1. A 16 GiB guest, unprotected.

#[test]
fn a_16_gib_guest_writes_and_verifies_a_working_set_across_the_mmio_hole() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("big-run").expect("test dir");
    let console = dir.join("vm.console");
    let control = dir.join("vm.sock");
    let (console_s, control_s) = (console.display().to_string(), control.display().to_string());
    // 512 MiB from 2.75 GiB: 256 MiB below the hole, 256 MiB from 4 GiB.
    let mut vm = TwinProcess::spawn(
        topo.vm_ns(),
        &dir,
        "twin-run",
        &[
            "run",
            "--tap",
            TAP,
            "--ip",
            GUEST_CIDR,
            "--mem",
            "16G",
            "--guest-args",
            "dirty=256M/s,wss=512M,wssbase=2816M",
            "--console",
            &console_s,
            "--control",
            &control_s,
        ],
    )
    .expect("spawn twin run");
    let mut guest =
        GuestClient::connect_retry(topo.client_ns(), guest_service(), BOOT_TIMEOUT, || {
            vm.ensure_running()
        })
        .expect("guest service comes up");
    assert_console(
        &console,
        &[
            "boot mem=16384M",
            "RAM [0x0, 0xc0000000) 3072M",
            "RAM [0x100000000, 0x440000000) 13312M",
            "workload range [0xb0000000, 0xc0000000) 256M",
            "workload range [0x100000000, 0x110000000) 256M",
        ],
    );
    let pages = 512 * MIB / 4096;
    let t = Instant::now();
    let writes = verify_after_fill(&mut guest, pages, || vm.ensure_running());
    eprintln!(
        "VERIFY OK pages={pages} writes={writes} (filled in {:?})",
        t.elapsed()
    );
    let st = twin_status(topo.vm_ns(), &dir, &control, CMD_TIMEOUT).expect("twin status");
    assert_eq!(st["mem_size"].as_u64(), Some(16 * GIB), "status: {st}");
    // Sparse: the process holds what the guest touched (the working set, its image, the
    // heap it used), not 16 GiB.
    let rss = rss(vm.pid());
    eprintln!(
        "VM process RSS with 512 MiB touched of 16 GiB: {} MiB",
        rss >> 20
    );
    assert!(
        rss < 2 * GIB,
        "the VM process holds {} MiB: guest RAM the guest never touched was allocated",
        rss >> 20
    );
    // Writes keep going past the fill and stay consistent.
    match guest.verify().expect("VERIFY") {
        Verify::Ok { writes: w, .. } => assert!(w >= writes),
        Verify::Fail(why) => panic!("VERIFY: {why}"),
    }
    vm.terminate().expect("SIGTERM");
    let status = vm.wait_exit(SHUTDOWN_TIMEOUT).expect("exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", vm.tail(30));
    assert_no_panic(&vm);
}

// ---------------------------------------------------------------------------------------
// 2. Protect and fail over an 8 GiB guest.

fn wait_event(
    rec: &Recorder,
    what: &str,
    procs: &[&TwinProcess],
    pred: impl FnMut(&twin_api::Event) -> bool,
) -> twin_api::Event {
    rec.wait(0, what, PROTECT_TIMEOUT, pred)
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", tails(procs)))
}

#[test]
fn an_8_gib_guest_with_a_working_set_across_the_hole_fails_over_and_verifies() {
    require_kvm();
    let ha = Topology::ha().expect("ha topology");
    let dir = TestDir::new("big-failover").expect("test dir");
    let (psock, bsock) = (dir.join("primary.sock"), dir.join("twin-backup.sock"));
    let mut backup = spawn_keyed_backup(&ha, &dir, "twin-backup", "");
    let bevents = Events::at(&bsock).record(false);
    let target = twin_lab::rig::backup_listen();
    let key = dir.key_file();
    let (psock_s, pcons) = (
        psock.display().to_string(),
        dir.join("primary.console").display().to_string(),
    );
    // 256 MiB from 2.875 GiB: 128 MiB on each side of the hole.
    let mut primary = spawn_twin(
        &ha.primary.ns,
        &dir,
        "twin-protect",
        &[
            "protect",
            "--key-file",
            &key,
            "--backup",
            &target,
            "--tap",
            TAP,
            "--ip",
            GUEST_CIDR,
            "--mem",
            "8G",
            "--guest-args",
            "dirty=64M/s,wss=256M,wssbase=2944M",
            "--control",
            &psock_s,
            "--console",
            &pcons,
        ],
        "",
    );
    let pevents = Events::at(&psock).record(false);
    wait_event(&pevents, "protection", &[&primary, &backup], |e| {
        matches!(e.kind, EventKind::Protected { .. })
    });
    let alloc = wait_event(&bevents, "the replica", &[&primary, &backup], |e| {
        matches!(e.kind, EventKind::ReplicaAllocated { .. })
    });
    assert!(
        matches!(alloc.kind, EventKind::ReplicaAllocated { mem_size } if mem_size == 8 * GIB),
        "{alloc:?}"
    );
    let sync = pevents
        .find(0, |e| matches!(e.kind, EventKind::SyncSent { .. }))
        .expect("sync_sent before protected");
    if let EventKind::SyncSent {
        pages,
        zero_pages,
        ms,
    } = sync.kind
    {
        eprintln!("initial sync of 8 GiB: {pages} pages, {zero_pages} zero pages, {ms:.1} ms");
        // Only what the memfd holds is read and sent: a freshly booted guest has touched a
        // few MiB, not 8 GiB.
        assert!(
            pages < GIB / 4096,
            "the initial sync sent {pages} pages of a guest that touched a few MiB"
        );
    }
    let mut guest =
        GuestClient::connect_retry(ha.client_ns(), guest_service(), BOOT_TIMEOUT, || {
            primary.ensure_running()
        })
        .expect("guest service");
    guest
        .set_request_timeout(REQUEST_TIMEOUT)
        .expect("request timeout");
    let pages = 256 * MIB / 4096;
    // Every page written once under protection: epochs carried pages of both slots.
    let writes = verify_after_fill(&mut guest, pages, || primary.ensure_running());
    assert_eq!(guest.incr("counter").expect("INCR"), 1);
    let st = twin_status(&ha.primary.ns, &dir, &psock, CMD_TIMEOUT).expect("primary status");
    eprintln!(
        "8 GiB protected: pause_us {} dirty_pages {}",
        st["pause_us"], st["dirty_pages"]
    );
    assert!(
        takeover_in_time(&bevents).is_none(),
        "the backup took over from a live primary\n{}",
        tails(&[&primary, &backup])
    );
    let killed = primary.kill().expect("SIGKILL the primary");
    assert_eq!(describe_status(killed), "killed by signal 9");
    let done = bevents
        .wait(0, "the takeover", TAKEOVER_TIMEOUT, |e| {
            matches!(
                e.kind,
                EventKind::FailoverComplete(_) | EventKind::FailoverFailed { .. }
            )
        })
        .unwrap_or_else(|e| panic!("no takeover: {e}\n{}", tails(&[&primary, &backup])));
    assert!(
        matches!(done.kind, EventKind::FailoverComplete(_)),
        "the takeover failed: {:?}\n{}",
        done.kind,
        tails(&[&backup])
    );
    // The same connection continues on the backup host.
    assert_eq!(guest.incr("counter").expect("INCR after failover"), 2);
    match guest.verify().expect("VERIFY after failover") {
        Verify::Ok {
            pages: p,
            writes: w,
        } => {
            assert_eq!(p, pages);
            assert!(w >= writes, "{w} writes after failover, {writes} before");
            eprintln!("VERIFY OK on the new primary: pages={p} writes={w}");
        }
        Verify::Fail(why) => panic!("VERIFY after failover: {why}\n{}", tails(&[&backup])),
    }
    let st = twin_status(&ha.backup.ns, &dir, &bsock, CMD_TIMEOUT).expect("new primary status");
    assert_eq!(st["vm"].as_str(), Some("running"), "{st}");
    assert_eq!(st["mem_size"].as_u64(), Some(8 * GIB), "{st}");
    drop(guest);
    backup.terminate().expect("SIGTERM the new primary");
    let status = backup
        .wait_exit(SHUTDOWN_TIMEOUT)
        .expect("exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", tails(&[&backup]));
    assert_no_panic(&primary);
    assert_no_panic(&backup);
}

/// The first event of `events` that says the backup took the VM over.
fn takeover_in_time(events: &Recorder) -> Option<twin_api::Event> {
    events.sync();
    events.find(0, took_over)
}

// ---------------------------------------------------------------------------------------
// 3. Snapshot and restore a 6 GiB guest.

#[test]
fn a_6_gib_guest_with_a_working_set_across_the_hole_restores_from_a_snapshot() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let tap2 = "tap1";
    let _tap2 = Tap::create(topo.vm_ns(), tap2, TapOptions::default()).expect("second TAP");
    topo.lan
        .bridge
        .enslave(tap2)
        .expect("second TAP joins the bridge");
    let dir = TestDir::new("big-snap").expect("test dir");
    let (sock1, sock2, snap) = (dir.join("vm1.sock"), dir.join("vm2.sock"), dir.join("snap"));
    let (sock1_s, sock2_s, snap_s) = (
        sock1.display().to_string(),
        sock2.display().to_string(),
        snap.display().to_string(),
    );
    let mut vm = TwinProcess::spawn(
        topo.vm_ns(),
        &dir,
        "twin-run",
        &[
            "run",
            "--tap",
            TAP,
            "--ip",
            GUEST_CIDR,
            "--mem",
            "6G",
            "--guest-args",
            "dirty=64M/s,wss=256M,wssbase=2944M",
            "--control",
            &sock1_s,
        ],
    )
    .expect("spawn twin run");
    let mut guest =
        GuestClient::connect_retry(topo.client_ns(), guest_service(), BOOT_TIMEOUT, || {
            vm.ensure_running()
        })
        .expect("guest service comes up");
    guest
        .set_request_timeout(REQUEST_TIMEOUT)
        .expect("request timeout");
    let pages = 256 * MIB / 4096;
    let writes = verify_after_fill(&mut guest, pages, || vm.ensure_running());
    assert_eq!(guest.incr("counter").expect("INCR"), 1);

    let done = TwinProcess::run_to_exit(
        topo.vm_ns(),
        &dir,
        "twin-snapshot",
        &["snapshot", &snap_s, "--stop", "--control", &sock1_s],
        CMD_TIMEOUT,
    )
    .expect("twin snapshot finishes");
    assert!(
        done.status.success(),
        "twin snapshot failed: {}{}\n{}",
        done.stdout,
        done.stderr,
        tails(&[&vm])
    );
    eprintln!("snapshot of 6 GiB: {}", done.stdout.trim());
    // The snapshot's memory file is indexed by page index (memfd offset), not by GPA: the
    // workload's page 32768, the first above the hole (GPA 4 GiB), is at offset 3 GiB, its
    // page 0 (GPA 2.875 GiB) at 2.875 GiB and its last (GPA 4 GiB + 128 MiB - 4 KiB) at
    // 3 GiB + 128 MiB - 4 KiB. Each page's first words are its workload index and sequence
    // number (the guest's page format).
    let mem = std::fs::File::open(snap.join("memory")).expect("the snapshot's memory file");
    for (offset, index) in [
        (2944 * MIB, 0u64),
        (3 * GIB - 4096, 32767),
        (3 * GIB, 32768),
        (3 * GIB + 128 * MIB - 4096, 65535),
    ] {
        let mut words = [0u8; 16];
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut words, offset)
            .expect("read the snapshot's memory");
        let (i, seq) = (
            u64::from_le_bytes(words[..8].try_into().unwrap()),
            u64::from_le_bytes(words[8..].try_into().unwrap()),
        );
        assert_eq!(
            (i, seq > 0),
            (index, true),
            "the page at memory offset {offset:#x} should be workload page {index}, written"
        );
    }
    let killed = vm.kill().expect("SIGKILL the snapshotted VM");
    assert_eq!(describe_status(killed), "killed by signal 9");

    let mut restored = TwinProcess::spawn(
        topo.vm_ns(),
        &dir,
        "twin-restore",
        &["restore", &snap_s, "--tap", tap2, "--control", &sock2_s],
    )
    .expect("spawn twin restore");
    Events::at(&sock2)
        .wait_live(
            &mut restored,
            0,
            "the restored VM running",
            BOOT_TIMEOUT,
            |e| matches!(e.kind, EventKind::VmRunning { mem_size, .. } if mem_size == 6 * GIB),
        )
        .unwrap_or_else(|e| panic!("restore: {e}\n{}", tails(&[&restored])));
    // The same connection continues in the restored VM.
    assert_eq!(guest.incr("counter").expect("INCR after restore"), 2);
    match guest.verify().expect("VERIFY after restore") {
        Verify::Ok {
            pages: p,
            writes: w,
        } => {
            assert_eq!(p, pages);
            assert!(w >= writes);
            eprintln!("VERIFY OK after restore: pages={p} writes={w}");
        }
        Verify::Fail(why) => panic!("VERIFY after restore: {why}\n{}", tails(&[&restored])),
    }
    let rss = rss(restored.pid());
    eprintln!("restored 6 GiB VM process RSS: {} MiB", rss >> 20);
    assert!(
        rss < 2 * GIB,
        "the restored VM holds {} MiB: restore allocated RAM the snapshot has no data for",
        rss >> 20
    );
    drop(guest);
    restored.terminate().expect("SIGTERM");
    let status = restored.wait_exit(SHUTDOWN_TIMEOUT).expect("exit");
    assert_eq!(status.code(), Some(0), "{}", tails(&[&restored]));
    assert_no_panic(&restored);
}
