//! Snapshots end to end: `twin snapshot` of a running VM, `twin restore` in a new process.
//!
//! - a snapshot taken with `--stop`, the VM process SIGKILLed and the snapshot restored on a
//!   new TAP of the same bridge keeps a client's TCP connection, loses no acknowledged INCR
//!   and does not move guest time backwards;
//! - restore `--paused` then snapshot again gives the same memory page for page and the same
//!   machine state except the fields that measure elapsed host time (named below);
//! - a chain of incremental snapshots restores to the same memory as a full snapshot of the
//!   same moment, also when snapshots failed in between (the target existed, the disk
//!   filled up after the dirty pages were harvested);
//! - hostile snapshot directories are refused with one clear line, never a panic.
//!
//! Private helpers (the harness has no equivalent): a second TAP on the `single` bridge, a
//! background INCR/TIME load on one connection, `twin` control commands parsed as JSON,
//! and a field-by-field diff of two decoded `MachineState`s.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use twin_api::EventKind;
use twin_lab::events::Events;
use twin_lab::*;
use twin_vmm::container::{self, Kind};
use twin_vmm::memory::{Memory, PAGE_SIZE};
use twin_vmm::snapshot::{self, SnapshotMeta};
use twin_vmm::MachineState;

/// Boot plus service start-up, generous for software KVM (PVM) on a busy 2-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// A control command (`snapshot`, `status`, …) or a failing `restore`.
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// A restored process getting to "running".
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
/// One request while the VM moves between processes: TCP retransmits (exponential backoff)
/// carry it over; generous because restore on a busy machine can take seconds.
const MOVE_REQUEST_TIMEOUT: Duration = Duration::from_secs(90);
/// Waiting for a number of INCRs to complete.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// Clean shutdown after SIGTERM.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// The second TAP on the `single` bridge, for the restored VM.
const TAP2: &str = "tap1";
const MEM: &str = "256M";
const GUEST_ARGS: &str = "dirty=16M/s,wss=64M";

static NEXT_CMD: AtomicU32 = AtomicU32::new(0);

/// Waits for the `vm_running` event of the restored VM `p` serving `control`.
fn wait_restored(p: &mut TwinProcess, control: &Path) -> Result<()> {
    Events::at(control)
        .wait_live(p, 0, "the restored VM running", RESTORE_TIMEOUT, |e| {
            matches!(e.kind, EventKind::VmRunning { .. })
        })
        .map(|_| ())
}

fn run_args(tap: &str, control: &Path, guest_args: &str) -> Vec<String> {
    [
        "run",
        "--tap",
        tap,
        "--ip",
        GUEST_CIDR,
        "--mem",
        MEM,
        "--guest-args",
        guest_args,
        "--control",
        &control.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Runs `twin ARGS` to completion; it must succeed and print one JSON object on stdout.
fn twin_json(
    ns: &Netns,
    dir: &TestDir,
    label: &str,
    args: &[&str],
    procs: &[&TwinProcess],
) -> serde_json::Value {
    let name = format!("{label}-{}", NEXT_CMD.fetch_add(1, Ordering::Relaxed));
    let done = TwinProcess::run_to_exit(ns, dir, &name, args, CMD_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "`twin {}` did not finish: {e}\n{}",
            args.join(" "),
            tails(procs)
        )
    });
    assert!(
        done.status.success(),
        "`twin {}` failed ({}):\nstdout: {}\nstderr: {}\n{}",
        args.join(" "),
        describe_status(done.status),
        done.stdout,
        done.stderr,
        tails(procs)
    );
    serde_json::from_str(done.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "`twin {}` printed no JSON ({e}): {:?}",
            args.join(" "),
            done.stdout
        )
    })
}

fn snapshot_cmd(
    ns: &Netns,
    dir: &TestDir,
    snap: &Path,
    control: &Path,
    flags: &[&str],
    procs: &[&TwinProcess],
) -> serde_json::Value {
    let snap_s = snap.display().to_string();
    let control_s = control.display().to_string();
    let mut args = vec!["snapshot", &snap_s];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--control", &control_s]);
    let v = twin_json(ns, dir, "twin-snapshot", &args, procs);
    assert_eq!(
        v["stopped"].as_bool(),
        Some(flags.contains(&"--stop")),
        "snapshot report: {v}"
    );
    v
}

/// `twin run` on `tap` serving `control`, and a client connected to its guest service with
/// the long request timeout a move needs.
fn start_vm(
    topo: &Single,
    dir: &TestDir,
    tap: &str,
    control: &Path,
    guest_args: &str,
) -> (TwinProcess, GuestClient) {
    let mut vm = TwinProcess::spawn(
        topo.vm_ns(),
        dir,
        "twin-run",
        &strs(&run_args(tap, control, guest_args)),
    )
    .expect("spawn twin run");
    let mut guest =
        GuestClient::connect_retry(topo.client_ns(), guest_service(), BOOT_TIMEOUT, || {
            vm.ensure_running()
        })
        .expect("guest service comes up");
    guest
        .set_request_timeout(MOVE_REQUEST_TIMEOUT)
        .expect("request timeout");
    (vm, guest)
}

/// `twin restore SNAP FLAGS --tap TAP --control CONTROL`, waited for until it runs.
fn restore(
    ns: &Netns,
    dir: &TestDir,
    label: &str,
    snap: &Path,
    tap: &str,
    control: &Path,
    flags: &[&str],
) -> TwinProcess {
    let (snap_s, control_s) = (snap.display().to_string(), control.display().to_string());
    let mut args = vec!["restore", &snap_s];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--tap", tap, "--control", &control_s]);
    let mut p = TwinProcess::spawn(ns, dir, label, &args)
        .unwrap_or_else(|e| panic!("spawn `twin {}`: {e}", args.join(" ")));
    wait_restored(&mut p, control)
        .unwrap_or_else(|e| panic!("`twin {}`: {e}\n{}", args.join(" "), tails(&[&p])));
    p
}

/// `RssShmem` of process `pid` in KiB: its resident shared memory (guest RAM is a memfd).
fn rss_shmem_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssShmem in /proc/PID/status")
}

/// A second TAP on the `single` layout's bridge.
fn second_tap(topo: &Single) -> Tap {
    let tap = Tap::create(topo.vm_ns(), TAP2, TapOptions::default()).expect("second TAP");
    topo.lan
        .bridge
        .enslave(TAP2)
        .expect("second TAP joins the bridge");
    tap
}

fn link_flags(ns: &Netns, ifname: &str) -> String {
    ns.run(&["ip", "-o", "link", "show", ifname])
        .unwrap_or_else(|e| panic!("ip link show {ifname}: {e}"))
}

// ---------------------------------------------------------------------------------------
// 1. Round trip under load.

#[test]
fn snapshot_stop_kill_restore_on_a_new_tap_keeps_the_connection_and_every_incr() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let _tap2 = second_tap(&topo);
    let dir = TestDir::new("snap-move").expect("test dir");
    let (sock1, sock2) = (dir.join("vm1.sock"), dir.join("vm2.sock"));
    let snap = dir.join("snap");
    let (mut vm, guest) = start_vm(&topo, &dir, TAP, &sock1, GUEST_ARGS);
    let load = IncrLoad::start(guest, "counter", 4);
    if let Err(e) = load.wait_for(300, PROGRESS_TIMEOUT, || vm.ensure_running()) {
        panic!("before the snapshot: {e}\n{}", tails(&[&vm]));
    }

    // Snapshot with the VM left paused; the client keeps sending meanwhile.
    let t_snap = Instant::now();
    let report = snapshot_cmd(topo.vm_ns(), &dir, &snap, &sock1, &["--stop"], &[&vm]);
    let at_snapshot = load.incrs();
    // The snapshot read only what the memfd holds: RAM the guest never touched (all but the
    // workload's 64 MiB and the guest's own few pages) stays unallocated. A scan through
    // the mapping would have allocated all 256 MiB of it.
    let shmem = rss_shmem_kib(vm.pid());
    assert!(
        shmem < 160 << 10,
        "after the snapshot the VM process holds {shmem} KiB of shared memory: the snapshot \
         allocated guest RAM the guest never used"
    );
    let killed = vm.kill().expect("SIGKILL the snapshotted VM process");
    assert_eq!(
        describe_status(killed),
        "killed by signal 9",
        "the VM process should have died of SIGKILL"
    );
    let t_restore = Instant::now();
    let mut restored = restore(topo.vm_ns(), &dir, "twin-restore", &snap, TAP2, &sock2, &[]);
    let restore_took = t_restore.elapsed();
    let after_restore = load.incrs();
    if let Err(e) = load.wait_for(after_restore + 300, PROGRESS_TIMEOUT, || {
        restored.ensure_running()
    }) {
        panic!(
            "after the restore (the same connection must continue): {e}\n{}",
            tails(&[&vm, &restored])
        );
    }
    let (mut guest, ops) = load
        .finish()
        .unwrap_or_else(|e| panic!("client load: {e}\n{}", tails(&[&vm, &restored])));

    // The restored VM really is on the new TAP: it has carrier, the old one does not.
    let new_link = link_flags(topo.vm_ns(), TAP2);
    let old_link = link_flags(topo.vm_ns(), TAP);
    assert!(
        new_link.contains("LOWER_UP"),
        "{TAP2} (the restored VM's TAP) has no carrier: {new_link}"
    );
    assert!(
        old_link.contains("NO-CARRIER"),
        "{TAP} still has carrier after its VM process was killed: {old_link}"
    );

    let last = check_incr_sequence(&ops, 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", tails(&[&vm, &restored])));
    assert!(
        last >= at_snapshot + 300,
        "the run must span the move: last INCR {last}, {at_snapshot} answered at the snapshot"
    );
    let got = guest.get("counter").expect("GET counter after the move");
    assert_eq!(
        got, last,
        "GET counter must equal the last acknowledged INCR"
    );

    // The request in flight across the move, and guest time around it.
    let straddler = ops
        .iter()
        .find(|o| o.sent < t_restore && o.replied > t_restore)
        .copied();
    let times: Vec<&Op> = ops.iter().filter(|o| o.kind == OpKind::Time).collect();
    for w in times.windows(2) {
        assert!(
            w[1].value >= w[0].value,
            "guest TIME went backwards: {} then {}",
            w[0].value,
            w[1].value
        );
    }
    let before = times
        .iter()
        .rev()
        .find(|o| o.replied <= t_snap)
        .expect("a TIME answered before the snapshot");
    let after = times
        .iter()
        .find(|o| o.sent >= t_restore)
        .expect("a TIME sent after the restore");
    assert!(
        before.value <= after.value,
        "guest TIME jumped backwards across the move: {} before, {} after",
        before.value,
        after.value
    );
    match guest.verify().expect("VERIFY") {
        Verify::Ok { pages, writes } => eprintln!("VERIFY OK pages={pages} writes={writes}"),
        Verify::Fail(why) => panic!("guest memory verification failed after the move: {why}"),
    }
    let t_final = guest.time_ns().expect("TIME");
    assert!(
        t_final >= after.value,
        "guest TIME went backwards at the end"
    );
    eprintln!(
        "snapshot report {report}; restore took {restore_took:?}; INCRs {last} \
         ({at_snapshot} at the snapshot); in-flight request across the move: {:?}; \
         guest TIME {} ns before, {} ns after (guest advanced {:.1} ms while the wall clock \
         advanced {:.1} ms)",
        straddler.map(|o| (o.kind, o.replied - o.sent)),
        before.value,
        after.value,
        (after.value - before.value) as f64 / 1e6,
        (after.replied - before.replied).as_secs_f64() * 1e3,
    );

    drop(guest);
    restored.terminate().expect("SIGTERM");
    let status = restored
        .wait_exit(SHUTDOWN_TIMEOUT)
        .expect("the restored VM exits on SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "restored VM: {}\n{}",
        describe_status(status),
        restored.tail(30)
    );
    assert_no_panic(&vm);
    assert_no_panic(&restored);
}

// ---------------------------------------------------------------------------------------
// 2. restore --paused, snapshot again: the same machine.

/// A leaf of a `MachineState`: its path and its bytes (bincode of the field).
type Leaves = BTreeMap<String, Vec<u8>>;

fn ser<T: serde::Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("bincode serialises state fields")
}

/// Breaks a state into named leaves fine enough that a difference names its field: every
/// MSR by index, every 16-byte LAPIC register by offset, every PIT channel with its load
/// time apart, each field of the KVM clock.
fn leaves(st: &MachineState) -> Leaves {
    let mut l = Leaves::new();
    l.insert("config".into(), ser(&st.config));
    l.insert("devices.serial".into(), ser(&st.devices.serial));
    l.insert("devices.pci".into(), ser(&st.devices.pci));
    l.insert("devices.net".into(), ser(&st.devices.net));
    l.insert("vm.pic_master".into(), ser(&st.vm.pic_master));
    l.insert("vm.pic_slave".into(), ser(&st.vm.pic_slave));
    l.insert("vm.ioapic".into(), ser(&st.vm.ioapic));
    for (i, ch) in st.vm.pit.channels.iter().enumerate() {
        let mut rest = *ch;
        rest.count_load_time = 0;
        l.insert(format!("vm.pit.channels[{i}]"), ser(&rest));
        l.insert(
            format!("vm.pit.channels[{i}].count_load_time"),
            ser(&ch.count_load_time),
        );
    }
    l.insert("vm.pit.flags".into(), ser(&st.vm.pit.flags));
    l.insert("vm.clock.clock".into(), ser(&st.vm.clock.clock));
    l.insert("vm.clock.flags".into(), ser(&st.vm.clock.flags));
    l.insert("vm.clock.realtime".into(), ser(&st.vm.clock.realtime));
    l.insert("vm.clock.host_tsc".into(), ser(&st.vm.clock.host_tsc));
    l.insert(
        "vm.clock.pad".into(),
        ser(&(st.vm.clock.pad0, st.vm.clock.pad)),
    );
    l.insert("vcpus.len".into(), ser(&st.vcpus.len()));
    for v in &st.vcpus {
        let p = format!("vcpu{}", v.id);
        l.insert(format!("{p}.cpuid"), ser(&v.cpuid));
        l.insert(format!("{p}.regs"), ser(&v.regs));
        l.insert(format!("{p}.sregs"), ser(&v.sregs));
        l.insert(format!("{p}.xsave"), ser(&v.xsave));
        l.insert(format!("{p}.xcrs"), ser(&v.xcrs));
        for m in &v.msrs {
            l.insert(format!("{p}.msr[{:#x}]", m.index), ser(&m.data));
        }
        for off in (0..v.lapic.regs.len()).step_by(16) {
            let reg: Vec<u8> = v.lapic.regs[off..off + 16]
                .iter()
                .map(|&b| b as u8)
                .collect();
            l.insert(format!("{p}.lapic[{off:#05x}]"), reg);
        }
        l.insert(format!("{p}.mp_state"), ser(&v.mp_state));
        l.insert(format!("{p}.events"), ser(&v.events));
        l.insert(format!("{p}.debugregs"), ser(&v.debugregs));
        l.insert(format!("{p}.tsc_khz"), ser(&v.tsc_khz));
    }
    l
}

fn show(bytes: Option<&Vec<u8>>) -> String {
    match bytes {
        None => "(absent)".into(),
        Some(b) if b.len() == 8 => {
            format!("{}", u64::from_le_bytes(b[..].try_into().expect("8")))
        }
        Some(b) if b.len() <= 32 => format!("{b:02x?}"),
        Some(b) => format!("{} bytes", b.len()),
    }
}

/// Names of the leaves that differ, with both values rendered.
fn diff_states(a: &MachineState, b: &MachineState) -> BTreeMap<String, (String, String)> {
    let (la, lb) = (leaves(a), leaves(b));
    la.keys()
        .chain(lb.keys())
        .filter(|k| la.get(*k) != lb.get(*k))
        .map(|k| (k.clone(), (show(la.get(k)), show(lb.get(k)))))
        .collect()
}

fn leaf_u64(st: &MachineState, name: &str) -> u64 {
    let l = leaves(st);
    let b = l
        .get(name)
        .unwrap_or_else(|| panic!("no state field {name}"));
    u64::from_le_bytes(b[..8].try_into().expect("at least 8 bytes"))
}

/// MSR IA32_TSC.
const MSR_IA32_TSC: u32 = 0x10;

/// Fields of the machine state that measure host time elapsed since they were loaded, and so
/// must differ between two captures of one guest that did not run in between, and only
/// those. Each with why:
fn time_dependent_field(name: &str) -> bool {
    // The TSC keeps counting while vCPUs are parked (KVM offsets the host TSC; it does not
    // stop it), so a second capture reads a larger IA32_TSC. (Measured on the PVM host: the
    // guest's IA32_TSC equals `vm.clock.host_tsc` to within the capture's own duration in
    // both snapshots, so the TSC advanced by the whole wall time between them.)
    name.ends_with(&format!(".msr[{MSR_IA32_TSC:#x}]"))
        // KVM_GET_CLOCK: kvmclock nanoseconds keep running while the VM is paused; `realtime`
        // and `host_tsc` are the host's clocks at the moment of the read.
        || name == "vm.clock.clock"
        || name == "vm.clock.realtime"
        || name == "vm.clock.host_tsc"
        // The LAPIC timer current count (TMCCT, 0x390) is computed at read time from the
        // hrtimer's remaining time, which runs down in host time.
        || name.ends_with(".lapic[0x390]")
        // The PIT's count_load_time is a host ktime stamp: KVM_SET_PIT2 sets it to "now"
        // when the state is loaded into the restored VM.
        || (name.starts_with("vm.pit.channels[") && name.ends_with("].count_load_time"))
}

/// Compares the `memory` and `pages` files of two full snapshots page by page; returns the
/// differing page indices (at most `limit` of them) and the number of pages compared.
fn diff_snapshot_memory(a: &Path, b: &Path, limit: usize) -> (Vec<usize>, usize) {
    let open = |p: &Path| File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(&a.join("memory")), open(&b.join("memory")));
    let (la, lb) = (
        fa.metadata().expect("size").len(),
        fb.metadata().expect("size").len(),
    );
    assert_eq!(la, lb, "memory files differ in size");
    let mut diffs = Vec::new();
    let chunk = 256 * PAGE_SIZE;
    let (mut ba, mut bb) = (vec![0u8; chunk], vec![0u8; chunk]);
    let mut page = 0usize;
    let mut left = la as usize;
    while left > 0 {
        let n = left.min(chunk);
        fa.read_exact(&mut ba[..n]).expect("read memory a");
        fb.read_exact(&mut bb[..n]).expect("read memory b");
        for (i, (pa, pb)) in ba[..n]
            .chunks(PAGE_SIZE)
            .zip(bb[..n].chunks(PAGE_SIZE))
            .enumerate()
        {
            if pa != pb && diffs.len() < limit {
                diffs.push(page + i);
            }
        }
        page += n / PAGE_SIZE;
        left -= n;
    }
    (diffs, page)
}

#[test]
fn restore_paused_then_snapshot_again_gives_the_same_state_and_memory() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let _tap2 = second_tap(&topo);
    let dir = TestDir::new("snap-twice").expect("test dir");
    let (sock1, sock2) = (dir.join("vm1.sock"), dir.join("vm2.sock"));
    let (snap_a, snap_b) = (dir.join("a"), dir.join("b"));
    let (mut vm, guest) = start_vm(&topo, &dir, TAP, &sock1, GUEST_ARGS);
    {
        let mut guest = guest;
        for want in 1..=200 {
            assert_eq!(guest.incr("counter").expect("INCR"), want);
        }
        guest.set("answer", 42).expect("SET");
        // Closed here: a quiet LAN, so nothing reaches the paused restored VM's TAP.
    }
    std::thread::sleep(Duration::from_millis(500));
    let report_a = snapshot_cmd(topo.vm_ns(), &dir, &snap_a, &sock1, &["--stop"], &[&vm]);
    vm.kill().expect("SIGKILL the snapshotted VM process");

    let restored = restore(
        topo.vm_ns(),
        &dir,
        "twin-restore-paused",
        &snap_a,
        TAP2,
        &sock2,
        &["--paused"],
    );
    let sock2_s = sock2.display().to_string();
    let st = twin_json(
        topo.vm_ns(),
        &dir,
        "twin-status",
        &["status", "--json", "--control", &sock2_s],
        &[&restored],
    );
    assert_eq!(
        st["vm"].as_str(),
        Some("paused"),
        "restore --paused must leave the VM paused: {st}"
    );
    // Let host time pass, so that every time-dependent field visibly moves.
    std::thread::sleep(Duration::from_millis(300));
    let report_b = snapshot_cmd(
        topo.vm_ns(),
        &dir,
        &snap_b,
        &sock2,
        &["--stop"],
        &[&restored],
    );
    eprintln!("snapshot a: {report_a}\nsnapshot b: {report_b}");

    // Memory: page for page.
    let (meta_a, meta_b) = (
        snapshot::read_meta(&snap_a).expect("meta a"),
        snapshot::read_meta(&snap_b).expect("meta b"),
    );
    assert_eq!(meta_a.mem_size, meta_b.mem_size);
    let (pages_a, pages_b) = (
        fs::read(snap_a.join("pages")).expect("pages a"),
        fs::read(snap_b.join("pages")).expect("pages b"),
    );
    let (mem_diffs, compared) = diff_snapshot_memory(&snap_a, &snap_b, 16);
    assert!(
        mem_diffs.is_empty(),
        "guest memory changed between the snapshot and the snapshot of its paused restore \
         ({compared} pages compared); first differing pages: {mem_diffs:?}\n{}",
        tails(&[&restored])
    );
    assert_eq!(
        pages_a, pages_b,
        "the present-page bitmaps differ though the memory is identical"
    );
    assert_eq!(meta_a.pages, meta_b.pages);
    assert!(meta_a.pages > 0, "the snapshot holds no pages at all");

    // State: equal except the fields that measure elapsed host time.
    let (a, b) = (
        snapshot::read_state(&snap_a).expect("state a decodes"),
        snapshot::read_state(&snap_b).expect("state b decodes"),
    );
    let diffs = diff_states(&a, &b);
    let report: String = diffs
        .iter()
        .map(|(k, (x, y))| format!("  {k}: {x} -> {y}\n"))
        .collect();
    eprintln!("fields that differ between the two snapshots:\n{report}");
    let unexpected: Vec<&String> = diffs.keys().filter(|k| !time_dependent_field(k)).collect();
    assert!(
        unexpected.is_empty(),
        "restore --paused + snapshot changed fields that do not depend on elapsed time: \
         {unexpected:?}\nall differences:\n{report}"
    );
    // The time-dependent fields move forward, never back.
    let tsc = format!("vcpu0.msr[{MSR_IA32_TSC:#x}]");
    assert!(
        leaf_u64(&b, &tsc) >= leaf_u64(&a, &tsc),
        "the guest TSC went backwards: {} -> {}",
        leaf_u64(&a, &tsc),
        leaf_u64(&b, &tsc)
    );
    assert!(
        b.vm.clock.clock >= a.vm.clock.clock,
        "kvmclock went backwards: {} -> {}",
        a.vm.clock.clock,
        b.vm.clock.clock
    );
    drop(restored);
    assert_no_panic(&vm);
}

/// `snapshot --stop` leaves the VM paused "for moving it elsewhere": from then on nothing
/// of the VM may change, also when frames arrive for it (they must wait, not be consumed by a
/// VM that will never run again). Two snapshots of the stopped VM, with a client request
/// sent in between, must be equal like those of the test above.
#[test]
fn snapshot_stop_freezes_the_vm_even_when_frames_arrive() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("snap-frozen").expect("test dir");
    let sock = dir.join("vm.sock");
    let (snap_a, snap_b) = (dir.join("a"), dir.join("b"));
    let (vm, mut guest) = start_vm(&topo, &dir, TAP, &sock, GUEST_ARGS);
    for want in 1..=100 {
        assert_eq!(guest.incr("counter").expect("INCR"), want);
    }
    std::thread::sleep(Duration::from_millis(300));
    snapshot_cmd(topo.vm_ns(), &dir, &snap_a, &sock, &["--stop"], &[&vm]);
    // A request to the stopped VM: no reply can come (its vCPUs are parked) …
    guest
        .set_request_timeout(Duration::from_secs(1))
        .expect("timeout");
    match guest.ping() {
        Err(HarnessError::Timeout { .. }) => {}
        other => panic!("a stopped VM answered PING: {other:?}"),
    }
    // … and the VM must still be exactly what snapshot `a` holds.
    snapshot_cmd(topo.vm_ns(), &dir, &snap_b, &sock, &["--stop"], &[&vm]);
    let (mem_diffs, compared) = diff_snapshot_memory(&snap_a, &snap_b, 16);
    let (a, b) = (
        snapshot::read_state(&snap_a).expect("state a decodes"),
        snapshot::read_state(&snap_b).expect("state b decodes"),
    );
    let diffs = diff_states(&a, &b);
    let unexpected: Vec<String> = diffs
        .iter()
        .filter(|(k, _)| !time_dependent_field(k))
        .map(|(k, (x, y))| format!("{k}: {x} -> {y}"))
        .collect();
    assert!(
        mem_diffs.is_empty() && unexpected.is_empty(),
        "a VM stopped by `snapshot --stop` changed while stopped (one PING was sent to it): \
         {} of {compared} guest pages differ between two snapshots of it (first: {mem_diffs:?}) \
         and these state fields changed: {unexpected:#?}",
        mem_diffs.len(),
    );
    drop(guest);
    drop(vm);
}

// ---------------------------------------------------------------------------------------
// 3. A chain of incremental snapshots restores like a full one.

/// The guest memory the chain ending at `dir` restores, as bytes.
fn load_into_memory(dir: &Path, size: u64) -> Vec<u8> {
    let mem = Memory::new(size).expect("memfd guest memory in the test");
    snapshot::load_memory(dir, &mem).unwrap_or_else(|e| panic!("loading {}: {e:?}", dir.display()));
    mem.to_vec()
}

/// The present-page bitmap of one layer.
fn layer_pages(dir: &Path) -> Vec<u64> {
    fs::read(dir.join("pages"))
        .expect("pages")
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// For a failure message: which layers hold page `p`, and where and how it differs.
fn explain_page(p: usize, layers: &[&Path], base: &[u8], chain: &[u8], full: &[u8]) -> String {
    let held: Vec<String> = layers
        .iter()
        .filter(|d| {
            layer_pages(d)
                .get(p / 64)
                .is_some_and(|w| w >> (p % 64) & 1 == 1)
        })
        .map(|d| {
            d.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let range = p * PAGE_SIZE..(p + 1) * PAGE_SIZE;
    let (c, f, b) = (&chain[range.clone()], &full[range.clone()], &base[range]);
    let offs: Vec<usize> = (0..PAGE_SIZE).filter(|&i| c[i] != f[i]).collect();
    let (lo, hi) = (offs[0], *offs.last().expect("differs"));
    let win = |m: &[u8]| {
        m[lo.saturating_sub(8)..(hi + 8).min(PAGE_SIZE).min(lo + 64)]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    };
    format!(
        "  page {p} (GPA {:#x}) held by {held:?}; {} bytes differ at offsets {lo:#x}..={hi:#x}\n    \
         chain {}\n    full  {}\n    base  {}",
        p * PAGE_SIZE,
        offs.len(),
        win(c),
        win(f),
        win(b)
    )
}

fn differing_pages(a: &[u8], b: &[u8]) -> Vec<usize> {
    a.chunks(PAGE_SIZE)
        .zip(b.chunks(PAGE_SIZE))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect()
}

/// INCRs on `counter` over one connection, each checked against the count so far.
struct Counter {
    guest: GuestClient,
    incrs: u64,
}

impl Counter {
    fn new(guest: GuestClient) -> Self {
        Counter { guest, incrs: 0 }
    }

    /// INCRs for `d`; returns the last acknowledged count.
    fn incr_for(&mut self, d: Duration) -> u64 {
        let until = Instant::now() + d;
        loop {
            self.incrs += 1;
            assert_eq!(self.guest.incr("counter").expect("INCR"), self.incrs);
            if Instant::now() >= until {
                return self.incrs;
            }
        }
    }
}

/// Asserts that the chain ending at the last of `layers` is exactly `layers`, and that it
/// restores to the memory and (but for elapsed time) the state of `full`, a full snapshot of
/// the same paused moment. `why` says what a difference would mean. Returns how many pages
/// changed between the first layer and `full` (more than none: else this proves nothing).
fn assert_chain_is_full(layers: &[&Path], full: &Path, why: &str) -> usize {
    let (base, head) = (layers[0], layers[layers.len() - 1]);
    let chain = snapshot::chain(head).unwrap_or_else(|e| panic!("chain of {head:?}: {e:?}"));
    let canon = |p: &Path| fs::canonicalize(p).expect("canonicalize");
    assert_eq!(
        chain.iter().map(|(d, _)| canon(d)).collect::<Vec<_>>(),
        layers.iter().map(|p| canon(p)).collect::<Vec<_>>(),
        "{head:?} must chain to exactly {layers:?} (a failed snapshot is no layer)"
    );
    let size = snapshot::read_meta(full).expect("meta").mem_size;
    let from_chain = load_into_memory(head, size);
    let from_full = load_into_memory(full, size);
    let from_base = load_into_memory(base, size);
    let moved = differing_pages(from_base.as_slice(), from_full.as_slice()).len();
    let diff = differing_pages(from_chain.as_slice(), from_full.as_slice());
    eprintln!(
        "{moved} pages changed between base and full; the chain's restore differs from the \
         full snapshot in {} pages",
        diff.len()
    );
    assert!(
        moved > 0,
        "the workload changed no page between base and full: the comparison proves nothing"
    );
    let mut all = layers.to_vec();
    all.push(full);
    assert!(
        diff.is_empty(),
        "{} pages differ between the chain {layers:?} and the full snapshot of the same paused \
         VM ({moved} pages changed since base): {why}; first: {:?}\n{}",
        diff.len(),
        &diff[..diff.len().min(16)],
        diff.iter()
            .take(4)
            .map(|&p| explain_page(
                p,
                &all,
                from_base.as_slice(),
                from_chain.as_slice(),
                from_full.as_slice()
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let (sh, sf) = (
        snapshot::read_state(head).expect("state of the chain's head"),
        snapshot::read_state(full).expect("state of the full snapshot"),
    );
    let sdiff = diff_states(&sh, &sf);
    let unexpected: Vec<&String> = sdiff.keys().filter(|k| !time_dependent_field(k)).collect();
    assert!(
        unexpected.is_empty(),
        "two snapshots of one paused VM differ in {unexpected:?}: {sdiff:?}"
    );
    moved
}

/// The chain's restore serves on the same connection: the last acknowledged count, the next
/// INCR, and a memory workload that checks out.
fn check_restored_chain(counter: &mut Counter, restored: &TwinProcess) {
    let last = counter.incrs;
    let got = counter
        .guest
        .get("counter")
        .unwrap_or_else(|e| panic!("GET after restoring the chain: {e}\n{}", tails(&[restored])));
    assert_eq!(got, last, "the restored chain lost acknowledged INCRs");
    assert_eq!(counter.incr_for(Duration::ZERO), last + 1);
    match counter.guest.verify().expect("VERIFY") {
        Verify::Ok { pages, writes } => {
            eprintln!("chain restored: VERIFY OK pages={pages} writes={writes}")
        }
        Verify::Fail(why) => panic!("guest memory verification failed after the chain: {why}"),
    }
}

#[test]
fn incremental_chain_restores_to_the_memory_of_a_full_snapshot_of_the_same_moment() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let _tap2 = second_tap(&topo);
    let dir = TestDir::new("snap-chain").expect("test dir");
    let (sock1, sock2) = (dir.join("vm1.sock"), dir.join("vm2.sock"));
    let (base, inc1, inc2, full) = (
        dir.join("base"),
        dir.join("inc1"),
        dir.join("inc2"),
        dir.join("full"),
    );
    let (mut vm, guest) = start_vm(&topo, &dir, TAP, &sock1, "dirty=32M/s,wss=64M");
    let mut counter = Counter::new(guest);
    counter.incr_for(Duration::from_millis(300));
    let r_base = snapshot_cmd(topo.vm_ns(), &dir, &base, &sock1, &[], &[&vm]);
    counter.incr_for(Duration::from_secs(1));
    let r1 = snapshot_cmd(
        topo.vm_ns(),
        &dir,
        &inc1,
        &sock1,
        &["--incremental"],
        &[&vm],
    );
    counter.incr_for(Duration::from_secs(1));
    // A quiet LAN before the last layer: the client's ACK of the last reply has landed. A
    // frame reaching the stopped VM between `inc2` and `full` would still be written into
    // guest RAM by the NIC (see `snapshot_stop_freezes_the_vm_even_when_frames_arrive`)
    // and make the two differ for a reason that is not the chain's.
    std::thread::sleep(Duration::from_millis(300));
    let r2 = snapshot_cmd(
        topo.vm_ns(),
        &dir,
        &inc2,
        &sock1,
        &["--incremental", "--stop"],
        &[&vm],
    );
    // The VM stays paused: a full snapshot now sees exactly the memory inc2 saw.
    let r_full = snapshot_cmd(topo.vm_ns(), &dir, &full, &sock1, &["--stop"], &[&vm]);
    eprintln!("base {r_base}\ninc1 {r1}\ninc2 {r2}\nfull {r_full}");

    let pages = |r: &serde_json::Value| r["pages"].as_u64().expect("pages in the report");
    for (name, r) in [("inc1", &r1), ("inc2", &r2)] {
        assert!(
            pages(r) > 0 && pages(r) < pages(&r_full),
            "{name} should hold some but not all pages: {r} (full: {r_full})"
        );
    }
    assert_chain_is_full(
        &[&base, &inc1, &inc2],
        &full,
        "the chain lost or misplaced pages",
    );

    // And the chain restores to a working VM: same connection, same counter, VERIFY.
    vm.kill().expect("SIGKILL the snapshotted VM");
    let restored = restore(
        topo.vm_ns(),
        &dir,
        "twin-restore-chain",
        &inc2,
        TAP2,
        &sock2,
        &[],
    );
    check_restored_chain(&mut counter, &restored);
    drop(counter);
    drop(restored);
    assert_no_panic(&vm);
}

/// Runs `twin snapshot` that must fail; returns its output (stdout and stderr).
fn snapshot_fails(
    ns: &Netns,
    dir: &TestDir,
    snap: &Path,
    control: &Path,
    flags: &[&str],
    procs: &[&TwinProcess],
) -> String {
    let snap_s = snap.display().to_string();
    let control_s = control.display().to_string();
    let mut args = vec!["snapshot", &snap_s];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--control", &control_s]);
    let name = format!(
        "twin-snapshot-fail-{}",
        NEXT_CMD.fetch_add(1, Ordering::Relaxed)
    );
    let done = TwinProcess::run_to_exit(ns, dir, &name, &args, CMD_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "`twin {}` did not finish: {e}\n{}",
            args.join(" "),
            tails(procs)
        )
    });
    let out = format!("{}{}", done.stdout, done.stderr);
    assert!(
        !done.status.success(),
        "`twin {}` should have failed but succeeded: {out}",
        args.join(" ")
    );
    out
}

/// A failed incremental snapshot must not cost the next one its pages: the pages written
/// before the failure are still owed to the chain. Two failures between a full snapshot and
/// a good incremental one — the target directory already exists (knowable before the VM is
/// touched) and the disk fills up while the layer is written (only after the dirty log was
/// harvested) — and then the chain base + increment must restore to exactly the memory of a
/// full snapshot of the same paused moment, and to a VM that passes VERIFY.
#[test]
fn snapshot_failure_keeps_dirty() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let _tap2 = second_tap(&topo);
    let dir = TestDir::new("snap-fail-dirty").expect("test dir");
    let (sock1, sock2) = (dir.join("vm1.sock"), dir.join("vm2.sock"));
    let (base, taken, inc, full) = (
        dir.join("base"),
        dir.join("taken"),
        dir.join("inc"),
        dir.join("full"),
    );
    // Before the VM process starts: `ip netns exec` gives it a copy of the mount table.
    let tiny = TinyFs::mount(dir.join("tiny"), "256k").expect("a 256 KiB tmpfs");
    let (mut vm, guest) = start_vm(&topo, &dir, TAP, &sock1, GUEST_ARGS);
    let mut counter = Counter::new(guest);
    counter.incr_for(Duration::from_millis(300));
    let r_base = snapshot_cmd(topo.vm_ns(), &dir, &base, &sock1, &[], &[&vm]);
    counter.incr_for(Duration::from_secs(1));

    // 1. The target exists.
    fs::create_dir(&taken).expect("an existing directory in the way");
    let exists = snapshot_fails(
        topo.vm_ns(),
        &dir,
        &taken,
        &sock1,
        &["--incremental"],
        &[&vm],
    );
    assert!(
        exists.contains("already exists") && exists.contains("taken"),
        "the error does not say that the target exists: {exists}"
    );
    counter.incr_for(Duration::from_secs(1));

    // 2. The disk fills up while the layer is written.
    let nospace = snapshot_fails(
        topo.vm_ns(),
        &dir,
        &tiny.path().join("inc"),
        &sock1,
        &["--incremental"],
        &[&vm],
    );
    assert!(
        nospace.contains("No space left on device"),
        "the error does not name ENOSPC: {nospace}"
    );
    let left: Vec<_> = fs::read_dir(tiny.path())
        .expect("list the tmpfs")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "the failed snapshot left {left:?} behind");
    vm.ensure_running()
        .expect("the VM survives the failed snapshots");
    counter.incr_for(Duration::from_secs(1));
    // A quiet LAN before the good layer (see the chain test above).
    std::thread::sleep(Duration::from_millis(300));
    let r_inc = snapshot_cmd(
        topo.vm_ns(),
        &dir,
        &inc,
        &sock1,
        &["--incremental", "--stop"],
        &[&vm],
    );
    let r_full = snapshot_cmd(topo.vm_ns(), &dir, &full, &sock1, &["--stop"], &[&vm]);
    eprintln!("failures:\n  {}\n  {}", exists.trim(), nospace.trim());
    eprintln!("base {r_base}\ninc {r_inc}\nfull {r_full}");

    let moved = assert_chain_is_full(
        &[&base, &inc],
        &full,
        "the pages written before the failed snapshots were lost",
    );
    let inc_pages = r_inc["pages"].as_u64().expect("pages in the report");
    assert!(
        inc_pages as usize >= moved,
        "the increment holds {inc_pages} pages, fewer than the {moved} that changed since base"
    );

    // The chain restores to a working VM whose memory workload checks out.
    vm.kill().expect("SIGKILL the snapshotted VM");
    let restored = restore(
        topo.vm_ns(),
        &dir,
        "twin-restore-chain",
        &inc,
        TAP2,
        &sock2,
        &[],
    );
    check_restored_chain(&mut counter, &restored);
    drop(counter);
    drop(restored);
    drop(tiny);
    assert_no_panic(&vm);
}

// ---------------------------------------------------------------------------------------
// 4. Hostile snapshot directories.

/// A copy of snapshot `src` at `dst`: files in `replace` get the given contents, the others
/// are hard links (never written through).
fn case_dir(src: &Path, dst: &Path, replace: &[(&str, Vec<u8>)], drop_files: &[&str]) {
    fs::create_dir_all(dst).expect("case dir");
    for f in ["meta", "state", "pages", "memory"] {
        if drop_files.contains(&f) {
            continue;
        }
        match replace.iter().find(|(n, _)| *n == f) {
            Some((_, data)) => fs::write(dst.join(f), data).expect("write case file"),
            None => fs::hard_link(src.join(f), dst.join(f)).expect("link case file"),
        }
    }
}

/// A `'static` copy of `s`, for the expected words of a case.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// `meta` of `src` as snapshot format 1 (before layer ids and tracking generations) wrote it.
fn meta_v1(src: &Path) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct MetaV1 {
        format: u32,
        parent: Option<PathBuf>,
        mem_size: u64,
        page_size: u64,
        pages: u64,
        created_unix_ms: u64,
        state_crc: u64,
        bitmap_crc: u64,
    }
    let m = snapshot::read_meta(src).expect("meta of the good snapshot");
    let v1 = MetaV1 {
        format: 1,
        parent: m.parent,
        mem_size: m.mem_size,
        page_size: m.page_size,
        pages: m.pages,
        created_unix_ms: m.created_unix_ms,
        state_crc: m.state_crc,
        bitmap_crc: m.bitmap_crc,
    };
    container::encode(Kind::SnapshotMeta, &v1).expect("encode meta")
}

/// `meta` of `src` re-encoded with `edit` applied (a consistent, checksummed meta).
fn meta_with(src: &Path, edit: impl FnOnce(&mut SnapshotMeta)) -> Vec<u8> {
    let mut meta = snapshot::read_meta(src).expect("meta of the good snapshot");
    edit(&mut meta);
    container::encode(Kind::SnapshotMeta, &meta).expect("encode meta")
}

/// A state file `state` plus a meta whose checksum matches it: only the state's own checks
/// can catch what is wrong with it.
fn consistent_state(src: &Path, state: Vec<u8>) -> Vec<(&'static str, Vec<u8>)> {
    let crc = container::crc64(&state);
    vec![
        ("meta", meta_with(src, |m| m.state_crc = crc)),
        ("state", state),
    ]
}

fn set_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn set_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A state container whose payload is `payload` (a correct envelope around it).
fn envelope(good: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut s = good[..container::HEADER_LEN].to_vec();
    set_u64(&mut s, 16, payload.len() as u64);
    set_u64(&mut s, 24, container::crc64(payload));
    s.extend_from_slice(payload);
    s
}

struct Case {
    name: &'static str,
    files: Vec<(&'static str, Vec<u8>)>,
    remove: Vec<&'static str>,
    /// The error line must contain every one of these …
    all: Vec<&'static str>,
    /// … and at least one of these.
    any: Vec<&'static str>,
}

#[test]
fn restore_refuses_hostile_snapshots_with_one_clear_line() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("snap-hostile").expect("test dir");
    let sock = dir.join("vm.sock");
    let (good, inc) = (dir.join("good"), dir.join("inc"));
    let (mut vm, mut guest) = start_vm(&topo, &dir, TAP, &sock, "dirty=4M/s,wss=16M");
    for want in 1..=20 {
        assert_eq!(guest.incr("counter").expect("INCR"), want);
    }
    drop(guest);
    snapshot_cmd(topo.vm_ns(), &dir, &good, &sock, &[], &[&vm]);
    std::thread::sleep(Duration::from_millis(200));
    snapshot_cmd(
        topo.vm_ns(),
        &dir,
        &inc,
        &sock,
        &["--incremental", "--stop"],
        &[&vm],
    );
    vm.kill().expect("SIGKILL the VM");

    let state = fs::read(good.join("state")).expect("state");
    let meta = fs::read(good.join("meta")).expect("meta");
    let pages = fs::read(good.join("pages")).expect("pages");
    let mem_len = fs::metadata(good.join("memory")).expect("memory").len();
    let hdr = container::HEADER_LEN;
    let decoded = MachineState::decode(&state).expect("the good state decodes");

    let mut cases = Vec::new();
    let mut case = |name, files, remove, all: &[&'static str], any: &[&'static str]| {
        cases.push(Case {
            name,
            files,
            remove,
            all: all.to_vec(),
            any: any.to_vec(),
        })
    };

    // state: truncated, bit-flipped, oversized, wrong version — raw (meta's checksum
    // catches it) and with a consistent meta (the container's own checks must).
    case(
        "state truncated",
        vec![("state", state[..state.len() / 2].to_vec())],
        vec![],
        &["state"],
        &["truncated", "checksum"],
    );
    case(
        "state truncated, meta consistent",
        consistent_state(&good, state[..state.len() / 2].to_vec()),
        vec![],
        &["state", "truncated"],
        &[],
    );
    case(
        "state truncated inside the header, meta consistent",
        consistent_state(&good, state[..20].to_vec()),
        vec![],
        &["state"],
        &["shorter", "truncated"],
    );
    let mut flipped = state.clone();
    flipped[hdr + 100] ^= 0x10;
    case(
        "state bit-flipped",
        vec![("state", flipped.clone())],
        vec![],
        &["state"],
        &["checksum"],
    );
    case(
        "state bit-flipped, meta consistent",
        consistent_state(&good, flipped),
        vec![],
        &["state", "checksum"],
        &[],
    );
    let mut huge = state.clone();
    huge.resize(17 << 20, 0xA5);
    case(
        "state oversized file",
        vec![("state", huge)],
        vec![],
        &["state"],
        &["more than", "exceeds", "too large"],
    );
    let mut claim = state.clone();
    set_u64(&mut claim, 16, 1 << 40);
    case(
        "state claims a 1 TiB payload, meta consistent",
        consistent_state(&good, claim),
        vec![],
        &["state", "exceeds"],
        &[],
    );
    let mut trailing = state.clone();
    trailing.extend_from_slice(&[0u8; 64]);
    case(
        "state with trailing bytes, meta consistent",
        consistent_state(&good, trailing),
        vec![],
        &["state", "after the payload"],
        &[],
    );
    let mut newer = state.clone();
    set_u32(&mut newer, 8, container::FORMAT_VERSION + 1);
    case(
        "state from a newer format version, meta consistent",
        consistent_state(&good, newer),
        vec![],
        &["state", "version", "newer"],
        &[],
    );
    let mut older = state.clone();
    set_u32(&mut older, 8, 0);
    case(
        "state from an older format version, meta consistent",
        consistent_state(&good, older),
        vec![],
        &["state", "version", "older"],
        &[],
    );
    let mut kind = state.clone();
    set_u32(&mut kind, 12, Kind::SnapshotMeta as u32);
    case(
        "state of the wrong kind, meta consistent",
        consistent_state(&good, kind),
        vec![],
        &["state", "kind"],
        &[],
    );
    let mut magic = state.clone();
    magic[..8].copy_from_slice(b"NOTTWIN!");
    case(
        "state without the magic, meta consistent",
        consistent_state(&good, magic),
        vec![],
        &["state", "magic"],
        &[],
    );
    // A correct envelope around a payload that is not a MachineState (bytes reversed).
    let mut junk: Vec<u8> = state[hdr..].to_vec();
    junk.reverse();
    case(
        "state payload of junk in a valid envelope, meta consistent",
        consistent_state(&good, envelope(&state, &junk)),
        vec![],
        &["state", "decode"],
        &[],
    );
    case(
        "state missing",
        vec![],
        vec!["state"],
        &["state"],
        &["No such file", "opening"],
    );
    // Well-formed but lying: a state for another RAM size than meta / than it holds.
    let mut lie = MachineState::decode(&state).expect("decode");
    lie.config.mem_size *= 2;
    case(
        "state says another RAM size than meta",
        consistent_state(&good, lie.encode().expect("encode")),
        vec![],
        &["state", "RAM"],
        &[],
    );
    let mut vcpus = MachineState::decode(&state).expect("decode");
    vcpus.config.vcpus = 2;
    case(
        "state says 2 vCPUs but holds one",
        consistent_state(&good, vcpus.encode().expect("encode")),
        vec![],
        &["vCPU"],
        &[],
    );
    let mut no_vcpus = MachineState::decode(&state).expect("decode");
    no_vcpus.config.vcpus = 0;
    no_vcpus.vcpus.clear();
    case(
        "state with zero vCPUs",
        consistent_state(&good, no_vcpus.encode().expect("encode")),
        vec![],
        &["vcpus"],
        &[],
    );
    let mut terabyte = MachineState::decode(&state).expect("decode");
    terabyte.config.mem_size = 1 << 40;
    let tb_state = terabyte.encode().expect("encode");
    let tb_crc = container::crc64(&tb_state);
    case(
        "state and meta both claim 1 TiB of RAM",
        vec![
            (
                "meta",
                meta_with(&good, |m| {
                    m.mem_size = 1 << 40;
                    m.state_crc = tb_crc;
                }),
            ),
            ("state", tb_state),
        ],
        vec![],
        &[],
        &["RAM", "memory", "mem"],
    );

    // meta.
    case(
        "meta truncated",
        vec![("meta", meta[..meta.len() - 3].to_vec())],
        vec![],
        &["meta", "truncated"],
        &[],
    );
    case(
        "meta empty",
        vec![("meta", Vec::new())],
        vec![],
        &["meta"],
        &["shorter", "empty", "truncated"],
    );
    let mut meta_flip = meta.clone();
    let last = meta_flip.len() - 1;
    meta_flip[last] ^= 0x01;
    case(
        "meta bit-flipped",
        vec![("meta", meta_flip)],
        vec![],
        &["meta", "checksum"],
        &[],
    );
    let mut meta_newer = meta.clone();
    set_u32(&mut meta_newer, 8, container::FORMAT_VERSION + 1);
    case(
        "meta from a newer format version",
        vec![("meta", meta_newer)],
        vec![],
        &["meta", "version", "newer"],
        &[],
    );
    case(
        "meta is garbage",
        vec![("meta", vec![0x5A; 200])],
        vec![],
        &["meta", "magic"],
        &[],
    );
    case(
        "meta with page size 1000",
        vec![("meta", meta_with(&good, |m| m.page_size = 1000))],
        vec![],
        &["meta", "page size"],
        &[],
    );
    case(
        "meta missing",
        vec![],
        vec!["meta"],
        &["meta"],
        &["No such file", "opening"],
    );
    case(
        "meta in snapshot format 1 (before layer ids)",
        vec![("meta", meta_v1(&good))],
        vec![],
        &["format 1 is older"],
        &[],
    );

    // pages (the present-page bitmap) and memory.
    let mut pages_flip = pages.clone();
    pages_flip[0] ^= 0x80;
    case(
        "pages bit-flipped",
        vec![("pages", pages_flip)],
        vec![],
        &["pages", "bitmap"],
        &[],
    );
    case(
        "pages truncated",
        vec![("pages", pages[..pages.len() / 2].to_vec())],
        vec![],
        &["pages", "bitmap"],
        &[],
    );
    let mut pages_big = pages.clone();
    pages_big.resize(pages.len() * 4, 0xFF);
    case(
        "pages oversized",
        vec![("pages", pages_big)],
        vec![],
        &["pages"],
        &["more than", "bitmap"],
    );
    // A consistent meta that counts a page too many: the bitmap and the count disagree.
    let one_more = snapshot::read_meta(&good).expect("meta").pages + 1;
    case(
        "meta counts more pages than the bitmap",
        vec![("meta", meta_with(&good, |m| m.pages = one_more))],
        vec![],
        &["pages"],
        &["bitmap has", "meta says"],
    );
    let mut short_mem = vec![0u8; 0];
    File::open(good.join("memory"))
        .expect("memory")
        .take(mem_len / 4)
        .read_to_end(&mut short_mem)
        .expect("read memory");
    case(
        "memory truncated",
        vec![("memory", short_mem)],
        vec![],
        &["memory"],
        &["reading", "short", "truncated"],
    );

    // Incremental layer: missing parent, and a parent loop.
    let inc_state = fs::read(inc.join("state")).expect("inc state");
    let inc_pages = fs::read(inc.join("pages")).expect("inc pages");
    let inc_memory_links =
        |name: &'static str, meta: Vec<u8>, all: &[&'static str], any: &[&'static str]| Case {
            name,
            files: vec![
                ("meta", meta),
                ("state", inc_state.clone()),
                ("pages", inc_pages.clone()),
            ],
            remove: vec![],
            all: all.to_vec(),
            any: any.to_vec(),
        };
    let mut inc_cases = vec![inc_memory_links(
        "incremental layer whose parent is missing",
        meta_with(&inc, |m| {
            m.parent = Some(PathBuf::from("/nonexistent/twin-parent"))
        }),
        &["/nonexistent/twin-parent"],
        &[],
    )];
    let good_id = snapshot::read_meta(&good).expect("meta").layer_id;
    let mut other_id = good_id;
    other_id.0[0] ^= 0xFF;
    inc_cases.push(inc_memory_links(
        "incremental layer whose parent was replaced (another layer id)",
        meta_with(&inc, |m| m.parent_id = Some(other_id)),
        &["chain broken", "good", leak(other_id.to_string())],
        &[],
    ));
    let from = snapshot::read_meta(&inc).expect("meta").tracking_from;
    inc_cases.push(inc_memory_links(
        "incremental layer with a dirty-tracking gap after its parent",
        meta_with(&inc, |m| {
            m.tracking_from = from + 1;
            m.tracking_to = m.tracking_to.max(from + 1);
        }),
        &["chain broken", "good", "generation"],
        &[],
    ));
    let looped_dir = dir.join("case-incremental-loop");
    inc_cases.push(inc_memory_links(
        "incremental layer that is its own parent",
        meta_with(&inc, |m| m.parent = Some(looped_dir.clone())),
        &[],
        &["loop", "longer than"],
    ));

    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for (i, c) in cases.iter().chain(inc_cases.iter()).enumerate() {
        let is_inc = c.name.starts_with("incremental");
        let case_path = if c.name == "incremental layer that is its own parent" {
            looped_dir.clone()
        } else {
            dir.join(format!("case-{i}"))
        };
        case_dir(
            if is_inc { &inc } else { &good },
            &case_path,
            &c.files,
            &c.remove,
        );
        let t = Instant::now();
        let done = TwinProcess::run_to_exit(
            topo.vm_ns(),
            &dir,
            &format!("restore-case-{i}"),
            &[
                "restore",
                &case_path.display().to_string(),
                "--tap",
                TAP,
                "--control",
                &dir.join(format!("case-{i}.sock")).display().to_string(),
            ],
            CMD_TIMEOUT,
        );
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                failures.push(format!("[{}] did not exit by itself: {e}", c.name));
                continue;
            }
        };
        let took = t.elapsed();
        let lines = done.nonempty_lines();
        let all_text = format!("{}{}", done.stdout, done.stderr);
        let mut problems = Vec::new();
        if done.status.code() != Some(1) {
            problems.push(format!(
                "exit status {} (want exit code 1)",
                describe_status(done.status)
            ));
        }
        if all_text.contains("panicked") {
            problems.push("it panicked".into());
        }
        if lines.len() != 1 {
            problems.push(format!("{} lines of output, want 1", lines.len()));
        }
        let line = lines.last().copied().unwrap_or("");
        if !line.starts_with("twin: ") {
            problems.push("the error line does not start with `twin: `".into());
        }
        for w in &c.all {
            if !line.contains(w) {
                problems.push(format!("the error does not mention {w:?}"));
            }
        }
        if !c.any.is_empty() && !c.any.iter().any(|w| line.contains(w)) {
            problems.push(format!("the error mentions none of {:?}", c.any));
        }
        summary.push(format!("  [{}] ({took:?}) {line}", c.name));
        if !problems.is_empty() {
            failures.push(format!(
                "[{}] {}\n    output:\n{}",
                c.name,
                problems.join("; "),
                all_text
                    .lines()
                    .take(12)
                    .map(|l| format!("      {l}\n"))
                    .collect::<String>()
            ));
        }
    }
    eprintln!("hostile restores:\n{}", summary.join("\n"));

    // Control: the unmodified snapshot restores (so each failure above is the mutation's).
    let good_sock = dir.join("good.sock");
    // (`restore` panics naming the command if the unmodified snapshot does not restore.)
    let mut ok = restore(
        topo.vm_ns(),
        &dir,
        "restore-good",
        &good,
        TAP,
        &good_sock,
        &[],
    );
    let mut guest =
        GuestClient::connect_retry(topo.client_ns(), guest_service(), BOOT_TIMEOUT, || {
            ok.ensure_running()
        })
        .expect("the restored good snapshot serves");
    assert_eq!(guest.get("counter").expect("GET"), 20);
    drop(guest);
    drop(ok);
    drop(decoded);

    assert!(
        failures.is_empty(),
        "{} of {} hostile snapshots were not refused with one clear line:\n{}",
        failures.len(),
        cases.len() + inc_cases.len(),
        failures.join("\n")
    );
}

/// A VM with a disk: a full snapshot then an incremental one (`--stop`), the process
/// SIGKILLed, `twin restore --disk NEW` builds the disk from the chain (the base's copy,
/// then the blocks written since); the restored VM's memory and disk agree — it answers
/// the values of the snapshot, and after it is SIGKILLed in turn a cold boot of its disk
/// replays every change, including one made after the restore. A restore never writes
/// over an existing image.
#[test]
fn snapshot_chain_with_a_disk_restores_the_disk() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("snap-disk").expect("test dir");
    let (sock1, sock2) = (dir.join("vm1.sock"), dir.join("vm2.sock"));
    let (base, inc) = (dir.join("base"), dir.join("inc"));
    let img = dir.join("disk.img");
    File::create(&img)
        .and_then(|f| f.set_len(16 << 20))
        .expect("sparse image");
    let restored_img = dir.join("restored.img");
    let mut args = run_args(TAP, &sock1, "dirty=8M/s,wss=32M");
    args.extend(["--disk".to_string(), img.display().to_string()]);
    let mut vm =
        TwinProcess::spawn(topo.vm_ns(), &dir, "twin-run", &strs(&args)).expect("spawn twin run");
    let mut guest =
        GuestClient::connect_retry(topo.client_ns(), guest_service(), BOOT_TIMEOUT, || {
            vm.ensure_running()
        })
        .expect("guest service comes up");
    for i in 1..=50 {
        assert_eq!(guest.incr("counter").unwrap(), i);
    }
    snapshot_cmd(topo.vm_ns(), &dir, &base, &sock1, &[], &[&vm]);
    for i in 51..=100 {
        assert_eq!(guest.incr("counter").unwrap(), i);
    }
    guest.set("x", 7).unwrap();
    snapshot_cmd(
        topo.vm_ns(),
        &dir,
        &inc,
        &sock1,
        &["--incremental", "--stop"],
        &[&vm],
    );
    vm.kill().expect("SIGKILL");
    drop(guest);
    // The base holds a sparse copy of the image, the increment only the blocks written.
    let base_copy = fs::metadata(base.join("disk-0")).expect("base disk copy");
    assert_eq!(base_copy.len(), 16 << 20);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&base_copy) * 512 < 1 << 20,
        "the base's disk copy stays sparse"
    );
    assert!(
        inc.join("disk-0.blocks").exists(),
        "the increment has its block bitmap"
    );

    let inc_s = inc.display().to_string();
    let restored_s = restored_img.display().to_string();
    let sock2_s = sock2.display().to_string();
    let mut restored = TwinProcess::spawn(
        topo.vm_ns(),
        &dir,
        "twin-restore",
        &[
            "restore",
            &inc_s,
            "--tap",
            TAP,
            "--control",
            &sock2_s,
            "--disk",
            &restored_s,
        ],
    )
    .expect("spawn twin restore");
    wait_restored(&mut restored, &sock2).unwrap_or_else(|e| panic!("restore: {e}"));
    let mut guest =
        GuestClient::connect_retry(topo.client_ns(), guest_service(), BOOT_TIMEOUT, || {
            restored.ensure_running()
        })
        .expect("the restored guest answers");
    assert_eq!(guest.get("counter").unwrap(), 100);
    assert_eq!(guest.get("x").unwrap(), 7);
    assert_eq!(
        guest.incr("counter").unwrap(),
        101,
        "the restored VM writes its disk"
    );
    restored.kill().expect("SIGKILL the restored VM");
    drop(guest);

    // A second restore to the same image is refused: it would overwrite a disk.
    let again = TwinProcess::run_to_exit(
        topo.vm_ns(),
        &dir,
        "twin-restore-again",
        &["restore", &inc_s, "--tap", TAP, "--disk", &restored_s],
        CMD_TIMEOUT,
    )
    .expect("twin restore exits");
    assert!(!again.status.success());
    assert!(
        again.stderr.contains("already there"),
        "the refusal names the problem: {}",
        again.stderr
    );

    let mut args = run_args(TAP, &dir.join("vm3.sock"), "");
    args.retain(|a| a != "--guest-args" && !a.is_empty());
    args.extend(["--disk".to_string(), restored_s.clone()]);
    let mut cold =
        TwinProcess::spawn(topo.vm_ns(), &dir, "twin-cold", &strs(&args)).expect("spawn twin run");
    let mut guest =
        GuestClient::connect_retry(topo.client_ns(), guest_service(), BOOT_TIMEOUT, || {
            cold.ensure_running()
        })
        .expect("cold boot answers");
    let stats = guest.stats().unwrap();
    assert_eq!(stats["log_replayed"], "102", "{stats:?}");
    assert_eq!(stats["log_torn"], "none");
    assert_eq!(guest.get("counter").unwrap(), 101);
    assert_eq!(guest.get("x").unwrap(), 7);
    cold.terminate().unwrap();
    cold.wait_exit(SHUTDOWN_TIMEOUT).unwrap();
}

// ---------------------------------------------------------------------------------------
// Lazy restore: the modes, the record of first touches, a loader that dies.

/// The restore progress `twin status --json` of `control` reports.
fn restore_progress(ns: &Netns, dir: &TestDir, control: &Path) -> serde_json::Value {
    let st = twin_status(ns, dir, control, CMD_TIMEOUT).expect("twin status");
    st["restore"].clone()
}

/// Waits until `f` holds of the restore progress of `control`.
fn wait_progress(
    ns: &Netns,
    dir: &TestDir,
    control: &Path,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let r = restore_progress(ns, dir, control);
        if f(&r) {
            return r;
        }
        assert!(t0.elapsed() < RESTORE_TIMEOUT, "{what}: last progress {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One snapshot of a VM that wrote a 32 MiB working set and 48 MiB once (cold), restored
/// in each mode on the same TAP in turn: each restored VM passes VERIFY and keeps the
/// counter; `eager` has loaded everything before it runs (no fault), `lazy` loads only what
/// the guest touches (the cold pages stay on disk), `ws` loads everything in the
/// background. The lazy restore, stopped, leaves its record of first touches
/// (`first-touch`) beside the snapshot, which the next `ws` restore loads first.
#[test]
fn restore_in_each_mode_verifies_and_the_lazy_one_records_its_first_touches() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("snap-modes").expect("test dir");
    let sock = dir.join("vm.sock");
    let snap = dir.join("snap");
    let (mut vm, mut guest) = start_vm(&topo, &dir, TAP, &sock, "dirty=8M/s,wss=32M,cold=48M");
    for n in 1..=20 {
        assert_eq!(guest.incr("counter").expect("INCR"), n);
    }
    drop(guest);
    snapshot_cmd(topo.vm_ns(), &dir, &snap, &sock, &["--stop"], &[&vm]);
    vm.kill().expect("SIGKILL the snapshotted VM");
    let record = snap.join(snapshot::FIRST_TOUCH_FILE);
    for mode in ["eager", "lazy", "ws"] {
        let control = dir.join(format!("restore-{mode}.sock"));
        let mut p = restore(
            topo.vm_ns(),
            &dir,
            &format!("restore-{mode}"),
            &snap,
            TAP,
            &control,
            &["--restore", mode],
        );
        let early = restore_progress(topo.vm_ns(), &dir, &control);
        assert_eq!(early["mode"], mode, "{early}");
        let mut guest =
            GuestClient::connect_retry(topo.client_ns(), guest_service(), BOOT_TIMEOUT, || {
                p.ensure_running()
            })
            .unwrap_or_else(|e| panic!("{mode}: the restored VM serves: {e}\n{}", tails(&[&p])));
        assert_eq!(
            guest.incr("counter").expect("INCR"),
            21,
            "{mode}: every restore is of the same snapshot"
        );
        let v = guest.verify().expect("VERIFY");
        assert!(
            matches!(v, Verify::Ok { .. }),
            "{mode}: VERIFY after the restore: {v:?}"
        );
        let data = early["data_pages"].as_u64().expect("data pages");
        // The cold region alone is 12288 pages.
        assert!(data > 12288, "{mode}: {early}");
        match mode {
            "eager" => {
                assert_eq!(early["complete"], true, "eager: {early}");
                assert_eq!(early["faults"], 0, "eager: {early}");
            }
            "lazy" => {
                let r = restore_progress(topo.vm_ns(), &dir, &control);
                assert_eq!(r["complete"], false, "lazy loads only what is touched: {r}");
                assert_eq!(r["prefetched"], 0, "lazy: {r}");
                assert!(r["faults"].as_u64().unwrap_or(0) > 0, "lazy: {r}");
                assert!(
                    r["resident"].as_u64().unwrap_or(0) + 12288 <= data,
                    "lazy loaded the cold pages: {r}"
                );
            }
            _ => {
                let r = wait_progress(topo.vm_ns(), &dir, &control, "ws completes", |r| {
                    r["complete"] == true
                });
                assert_eq!(r["resident"].as_u64(), Some(data), "ws: {r}");
            }
        }
        drop(guest);
        p.signal(Signal::Term).expect("SIGTERM the restored VM");
        p.wait_exit(SHUTDOWN_TIMEOUT)
            .expect("the restored VM stops");
        if mode == "lazy" {
            let n = fs::metadata(&record).map(|m| m.len() / 4).unwrap_or(0);
            assert!(
                n > 0,
                "the lazy restore left no record of its first touches:\n{}",
                p.tail(30)
            );
        }
        assert_no_panic(&p);
    }
}

/// A loader thread that dies (failpoint `lazy.fault` / `lazy.prefetch` = panic) stops the
/// VM with one clear error, promptly — it must not leave a vCPU waiting forever on a page
/// nobody will load.
#[test]
fn a_dead_loader_thread_stops_the_vm_with_a_clear_error() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("snap-loader-dies").expect("test dir");
    let sock = dir.join("vm.sock");
    let snap = dir.join("snap");
    let (mut vm, guest) = start_vm(&topo, &dir, TAP, &sock, "dirty=32M/s,wss=16M");
    drop(guest);
    // The workload writes its working set once over: pages for the loader to load.
    std::thread::sleep(Duration::from_secs(1));
    snapshot_cmd(topo.vm_ns(), &dir, &snap, &sock, &["--stop"], &[&vm]);
    vm.kill().expect("SIGKILL the snapshotted VM");
    let bin = twin_bin().expect("twin binary");
    for (mode, point) in [("lazy", "lazy.fault"), ("ws", "lazy.prefetch")] {
        let control = dir.join(format!("dies-{mode}.sock"));
        let (snap_s, control_s) = (snap.display().to_string(), control.display().to_string());
        let args = [
            "restore",
            &snap_s,
            "--restore",
            mode,
            "--tap",
            TAP,
            "--control",
            &control_s,
        ];
        let fp = format!("{point}=panic");
        let mut p = TwinProcess::spawn_program(
            topo.vm_ns(),
            &dir,
            &format!("dies-{mode}"),
            &bin,
            &args,
            &[("TWIN_FAILPOINTS", fp.as_str())],
        )
        .expect("spawn twin restore");
        let status = p
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{point}: the VM did not stop: {e}\n{}", tails(&[&p])));
        // Exit 1, or SIGBUS if a thread touched a page poisoned as it stopped.
        assert!(
            status.code() == Some(1) || describe_status(status) == "killed by signal 7",
            "{point}: {}",
            describe_status(status)
        );
        let err = p.tail(20);
        assert!(
            err.contains("its memory could not be loaded") && err.contains("memory loader died"),
            "{point}: the error does not say why the VM stopped:\n{err}"
        );
    }
}
