//! The built-in guest's durable store on a virtio-blk disk, end to end: `twin run --disk
//! IMG`, SET/INCR acknowledged, the VMM SIGKILLed, a cold boot of a new `twin run` on the
//! same image answers every acknowledged value (the guest replays its log); a torn tail
//! record (the write of a change never acknowledged) is detected and dropped, never
//! misread; a disk that is not the guest's log is left untouched.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use twin_guest_image::kvlog::{self, Head, Op, SECTOR};
use twin_lab::*;

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const DISK_SIZE: u64 = 16 << 20;

fn new_image(path: &Path) {
    let f = File::create(path).expect("create the disk image");
    f.set_len(DISK_SIZE).expect("size the disk image (sparse)");
}

fn boot(topo: &Single, dir: &TestDir, name: &str, disk: &str) -> (TwinProcess, GuestClient) {
    let mut vm = TwinProcess::spawn(
        topo.vm_ns(),
        dir,
        name,
        &[
            "run", "--tap", TAP, "--ip", GUEST_CIDR, "--mem", "128M", "--disk", disk,
        ],
    )
    .expect("spawn twin run");
    let guest = GuestClient::connect_retry(topo.client_ns(), guest_service(), BOOT_TIMEOUT, || {
        vm.ensure_running()
    })
    .unwrap_or_else(|e| panic!("guest service comes up: {e:#}\n{}", vm.tail(30)));
    (vm, guest)
}

/// The records of the log in `image`: (first sector, sectors, change), up to its end.
fn records(image: &Path) -> Vec<(u64, u64, String)> {
    let bytes = std::fs::read(image).expect("read the image");
    assert_eq!(
        kvlog::label(&bytes[..SECTOR]),
        kvlog::Label::Log,
        "sector 0 is the log's label"
    );
    let total = (bytes.len() / SECTOR) as u64;
    let mut out = Vec::new();
    let (mut at, mut seq) = (1u64, 1u64);
    while at < total {
        let s = at as usize * SECTOR;
        let Head::Record { sectors } = kvlog::head(&bytes[s..s + SECTOR], total - at) else {
            break;
        };
        let rec = &bytes[s..s + sectors * SECTOR];
        let Ok(op) = kvlog::decode(rec, seq) else {
            break;
        };
        let what = match op {
            Op::Set(k, v) => format!(
                "SET {} {}",
                String::from_utf8_lossy(k),
                String::from_utf8_lossy(v)
            ),
            Op::Del(k) => format!("DEL {}", String::from_utf8_lossy(k)),
            Op::Clear => "CLEAR".into(),
        };
        out.push((at, sectors as u64, what));
        at += sectors as u64;
        seq += 1;
    }
    out
}

fn stat(g: &mut GuestClient, key: &str) -> String {
    let s = g.stats().expect("STATS");
    s.get(key)
        .unwrap_or_else(|| panic!("STATS has no {key}: {s:?}"))
        .clone()
}

#[test]
fn acknowledged_writes_survive_sigkill_and_a_cold_boot() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("disk-cold").expect("test dir");
    let img = dir.join("disk0.img");
    new_image(&img);
    let disk = img.to_str().unwrap();

    let (mut vm, mut g) = boot(&topo, &dir, "twin-run-1", disk);
    assert_eq!(stat(&mut g, "disk"), "log", "a blank disk becomes the log");
    assert_eq!(stat(&mut g, "log_replayed"), "0");
    let mut want = std::collections::BTreeMap::new();
    for i in 1..=300u64 {
        assert_eq!(g.incr("counter").expect("INCR"), i);
    }
    want.insert("counter".to_string(), 300u64);
    for i in 0..50u64 {
        let k = format!("key{i}");
        g.set(&k, i * 1_000_003).expect("SET");
        want.insert(k, i * 1_000_003);
    }
    g.set("key7", 7).expect("SET over a value");
    want.insert("key7".into(), 7);
    // Every change was a record, flushed before its reply.
    assert_eq!(stat(&mut g, "log_appended"), "351");
    let status = vm.kill().expect("SIGKILL the VMM");
    eprintln!("first VMM: {}", describe_status(status));
    drop(g);

    // The image holds all 351 records, and stays sparse: a 16 MiB file with ~180 KiB used.
    let recs = records(&img);
    assert_eq!(recs.len(), 351, "records on disk after SIGKILL");
    assert_eq!(recs.last().unwrap().2, "SET key7 7");
    let allocated = std::fs::metadata(&img).unwrap().blocks() * 512;
    assert!(
        allocated < 2 << 20,
        "the sparse image allocated {allocated} bytes for ~180 KiB of log"
    );

    let (mut vm, mut g) = boot(&topo, &dir, "twin-run-2", disk);
    assert_eq!(stat(&mut g, "log_replayed"), "351");
    assert_eq!(stat(&mut g, "log_torn"), "none");
    for (k, v) in &want {
        assert_eq!(g.get(k).expect("GET"), *v, "{k} after the cold boot");
    }
    // And it goes on from there.
    assert_eq!(g.incr("counter").expect("INCR after the cold boot"), 301);
    vm.terminate().expect("SIGTERM");
    vm.wait_exit(Duration::from_secs(10)).expect("exit");
    assert_no_panic(&vm);
}

#[test]
fn a_torn_tail_record_is_dropped_not_misread() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("disk-torn").expect("test dir");
    let img = dir.join("disk0.img");
    new_image(&img);
    let disk = img.to_str().unwrap();

    let (mut vm, mut g) = boot(&topo, &dir, "twin-run-1", disk);
    g.set("a", 1).expect("SET a");
    g.set("b", 2).expect("SET b");
    g.set("b", 3).expect("SET b again");
    vm.kill().expect("SIGKILL");
    drop(g);

    // Tear the last record as a write cut short would: its sector half written (the
    // second half still zero), so its checksum no longer matches.
    let recs = records(&img);
    assert_eq!(recs.len(), 3);
    let (at, _, what) = recs[2].clone();
    assert_eq!(what, "SET b 3");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    f.write_all_at(&[0u8; SECTOR / 2], at * SECTOR as u64 + (SECTOR / 2) as u64)
        .unwrap();
    // …and the value bytes themselves changed to what a misreading would return.
    let mut sector = [0u8; SECTOR];
    f.read_exact_at(&mut sector, at * SECTOR as u64).unwrap();
    let v = sector
        .iter()
        .rposition(|&b| b == b'3')
        .expect("the value byte");
    f.write_all_at(b"9", at * SECTOR as u64 + v as u64).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(records(&img).len(), 2, "the torn record does not check");

    let (mut vm, mut g) = boot(&topo, &dir, "twin-run-2", disk);
    assert_eq!(stat(&mut g, "log_replayed"), "2");
    assert_eq!(stat(&mut g, "log_torn"), "checksum");
    assert_eq!(stat(&mut g, "log_torn_at"), at.to_string());
    assert_eq!(g.get("a").unwrap(), 1);
    assert_eq!(
        g.get("b").unwrap(),
        2,
        "b as of the last good record, not 9"
    );
    let out = vm.text(Stream::Stdout);
    assert!(
        out.contains(&format!("torn tail dropped at sector {at} (checksum)")),
        "the console names the torn tail:\n{}",
        vm.tail(20)
    );
    // The torn sectors were zeroed: the next change goes where the torn one was, and a
    // later boot finds a clean log of three records.
    g.set("c", 4).expect("SET c");
    vm.kill().expect("SIGKILL");
    drop(g);
    let recs = records(&img);
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[2], (at, 1, "SET c 4".to_string()));
    let (mut vm, mut g) = boot(&topo, &dir, "twin-run-3", disk);
    assert_eq!(stat(&mut g, "log_torn"), "none");
    assert_eq!(stat(&mut g, "log_replayed"), "3");
    assert_eq!((g.get("b").unwrap(), g.get("c").unwrap()), (2, 4));
    vm.terminate().expect("SIGTERM");
    vm.wait_exit(Duration::from_secs(10)).expect("exit");
}

#[test]
fn a_disk_that_is_not_the_log_is_left_untouched() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("disk-foreign").expect("test dir");
    let img = dir.join("data.img");
    new_image(&img);
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(b"\xEB\x63\x90 someone else's boot sector", 0)
        .unwrap();
    drop(f);
    let before = std::fs::read(&img).unwrap();
    let (mut vm, mut g) = boot(&topo, &dir, "twin-run", img.to_str().unwrap());
    assert_eq!(stat(&mut g, "disk"), "foreign");
    g.set("x", 5).expect("SET in memory");
    assert_eq!(g.get("x").unwrap(), 5);
    vm.terminate().expect("SIGTERM");
    vm.wait_exit(Duration::from_secs(10)).expect("exit");
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the foreign disk was written"
    );
}

#[test]
fn a_read_only_disk_replays_and_refuses_changes() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("disk-ro").expect("test dir");
    let img = dir.join("disk0.img");
    new_image(&img);
    let disk = img.to_str().unwrap();
    let (mut vm, mut g) = boot(&topo, &dir, "twin-run-rw", disk);
    g.set("k", 11).expect("SET");
    vm.kill().expect("SIGKILL");
    drop(g);
    let before = std::fs::read(&img).unwrap();
    let ro = format!("{disk},readonly");
    let (mut vm, mut g) = boot(&topo, &dir, "twin-run-ro", &ro);
    assert_eq!(stat(&mut g, "disk"), "read-only");
    assert_eq!(g.get("k").unwrap(), 11);
    match g.request("SET k 12") {
        Err(HarnessError::Guest { reply, .. }) => assert_eq!(reply, "ERR disk is read-only"),
        other => panic!("SET on a read-only disk: {other:?}"),
    }
    assert_eq!(g.get("k").unwrap(), 11, "a refused change is not made");
    vm.terminate().expect("SIGTERM");
    vm.wait_exit(Duration::from_secs(10)).expect("exit");
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the read-only disk was written"
    );
}

#[test]
fn an_io_error_on_the_host_disk_is_an_error_reply_not_a_crash() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("disk-eio").expect("test dir");
    // A 16 MiB sparse image on a 128 KiB file system: the log's writes fail with ENOSPC
    // on the host once it is full, and the device answers them IOERR.
    let fs = TinyFs::mount(dir.join("tiny"), "128k").expect("a 128 KiB tmpfs");
    let img = fs.path().join("disk0.img");
    new_image(&img);
    let (mut vm, mut g) = boot(&topo, &dir, "twin-run", img.to_str().unwrap());
    let mut last_ok = None;
    let mut refused = None;
    // One 512-byte record per SET: 128 KiB holds fewer than 256 (the label and the
    // file's pages count too).
    for i in 0..2000u64 {
        match g.request(&format!("SET k{i} {}", i + 1)) {
            Ok(_) => last_ok = Some(i),
            Err(HarnessError::Guest { reply, .. }) => {
                refused = Some((i, reply));
                break;
            }
            Err(e) => panic!("SET k{i}: {e}"),
        }
    }
    let (i, reply) = refused.expect("the full file system makes a SET fail");
    assert_eq!(reply, "ERR disk I/O error (the change was not made)");
    assert!(
        last_ok.is_some(),
        "some SETs succeeded before the disk filled"
    );
    assert_eq!(
        g.get(&format!("k{i}")).unwrap(),
        0,
        "the refused SET was not made"
    );
    g.ping().expect("the guest still answers");
    let errors: u64 = stat(&mut g, "disk_errors").parse().unwrap();
    assert!(errors >= 1, "the device reported the error to the guest");
    vm.terminate().expect("SIGTERM");
    vm.wait_exit(Duration::from_secs(10)).expect("exit");
    assert_no_panic(&vm);
    let err = vm.text(Stream::Stderr);
    assert!(
        err.contains("disk") && (err.contains("No space left") || err.contains("I/O")),
        "the VMM logs the host I/O error:\n{err}"
    );
    drop(vm);
    drop(fs);
}
