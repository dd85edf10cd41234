//! `twin run` end to end: the built-in guest boots on a TAP in a namespace, serves its line
//! protocol to a client on the LAN, keeps its memory workload consistent, and stops cleanly on
//! SIGTERM; bad arguments fail with a one-line message naming the culprit.

use std::time::{Duration, Instant};

use twin_lab::*;

/// Boot plus service start-up, generous for software KVM (PVM) on a busy 2-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a clean shutdown may take after SIGTERM.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `twin run` may take to reject bad arguments.
const REJECT_TIMEOUT: Duration = Duration::from_secs(20);
const INCRS: u64 = 1000;

fn run_args<'a>(tap: &'a str, mem: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--tap",
        tap,
        "--ip",
        GUEST_CIDR,
        "--mem",
        mem,
        "--guest-args",
        "dirty=16M/s,wss=64M",
    ]
}

#[test]
fn run_serves_the_guest_and_exits_cleanly_on_sigterm() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let names = topo.namespace_names();
    let dir = TestDir::new("run").expect("test dir");
    let mut vm = TwinProcess::spawn(topo.vm_ns(), &dir, "twin-run", &run_args(TAP, "256M"))
        .expect("spawn twin run");

    let started = Instant::now();
    let mut guest =
        GuestClient::connect_retry(topo.client_ns(), guest_service(), BOOT_TIMEOUT, || {
            vm.ensure_running()
        })
        .expect("guest service comes up");
    eprintln!("guest service answered after {:?}", started.elapsed());

    // Every INCR reply is exactly one more than the last, from 1 on a fresh guest.
    let started = Instant::now();
    for want in 1..=INCRS {
        let got = guest.incr("counter").expect("INCR");
        assert_eq!(got, want, "INCR #{want} returned {got}");
    }
    eprintln!("{INCRS} INCRs in {:?}", started.elapsed());

    guest.set("answer", 41).expect("SET");
    assert_eq!(guest.get("answer").expect("GET"), 41);
    guest.set("answer", 42).expect("SET again");
    assert_eq!(guest.get("answer").expect("GET after overwrite"), 42);
    guest.set("big", u64::MAX).expect("SET u64::MAX");
    assert_eq!(guest.get("big").expect("GET u64::MAX"), u64::MAX);
    assert_eq!(guest.get("counter").expect("GET counter"), INCRS);
    assert_eq!(guest.get("never-set").expect("GET missing key"), 0);
    guest.ping().expect("PING");
    let t1 = guest.time_ns().expect("TIME");
    let t2 = guest.time_ns().expect("TIME");
    assert!(t2 >= t1, "guest time went backwards: {t1} then {t2}");
    guest.stats().expect("STATS parses as k=v pairs");
    match guest.verify().expect("VERIFY") {
        Verify::Ok { pages, writes } => eprintln!("VERIFY OK pages={pages} writes={writes}"),
        Verify::Fail(why) => panic!("guest memory verification failed: {why}"),
    }

    vm.terminate().expect("SIGTERM");
    let status = vm
        .wait_exit(SHUTDOWN_TIMEOUT)
        .expect("twin run exits within a few seconds of SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "twin run should exit 0 on SIGTERM, got {}; output:\n{}",
        describe_status(status),
        vm.tail(30)
    );
    let stderr = vm.text(Stream::Stderr);
    assert!(!stderr.contains("panicked"), "twin run panicked:\n{stderr}");

    drop(guest);
    drop(vm);
    drop(topo);
    for n in &names {
        assert!(!Netns::exists(n), "namespace {n} left behind");
    }
}

#[test]
fn run_with_a_missing_tap_fails_with_one_line_naming_it() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("notap").expect("test dir");
    let tap = "twtnotap0";
    let done = TwinProcess::run_to_exit(
        topo.vm_ns(),
        &dir,
        "twin-run-notap",
        &run_args(tap, "256M"),
        REJECT_TIMEOUT,
    )
    .expect("twin run with a missing TAP exits by itself");
    assert!(
        !done.status.success(),
        "twin run with a missing TAP succeeded ({}); output:\n{}{}",
        describe_status(done.status),
        done.stdout,
        done.stderr
    );
    let lines = done.nonempty_lines();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line of output, got:\n{}",
        lines.join("\n")
    );
    assert!(
        lines[0].contains(tap),
        "the message does not name the TAP: {}",
        lines[0]
    );
}

#[test]
fn run_with_a_bad_memory_size_fails_naming_it() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("badmem").expect("test dir");
    let done = TwinProcess::run_to_exit(
        topo.vm_ns(),
        &dir,
        "twin-run-badmem",
        &run_args(TAP, "12Q"),
        REJECT_TIMEOUT,
    )
    .expect("twin run with a bad size exits by itself");
    assert!(
        !done.status.success(),
        "twin run --mem 12Q succeeded ({}); output:\n{}{}",
        describe_status(done.status),
        done.stdout,
        done.stderr
    );
    let output = format!("{}{}", done.stdout, done.stderr);
    assert!(
        output.contains("12Q"),
        "the message does not name the size:\n{output}"
    );
}
