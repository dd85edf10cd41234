//! Self-tests of the harness, without a VM: layouts come up and carry traffic where they
//! should (and only there), the replication link can be cut, restored and slowed, processes
//! are watched and signalled, and nothing is left behind — also after a panic.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use twin_lab::*;

const SHORT: Duration = Duration::from_millis(500);
const LONG: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// A stand-in for the guest service, served from a namespace.

/// Serves the guest line protocol on `addr` inside `ns` until dropped. `HANG` gets no reply
/// (to exercise request timeouts); unknown requests get `ERR unknown`.
struct FakeGuest {
    ns: Netns,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeGuest {
    fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let listener = ns
            .enter(|| TcpListener::bind(addr))
            .expect("enter")
            .expect("bind fake guest");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let acceptor = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    std::thread::spawn(move || serve(conn));
                }
            }
        });
        Self {
            ns: ns.clone(),
            addr,
            stop,
            acceptor: Some(acceptor),
        }
    }
}

impl Drop for FakeGuest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocked accept.
        let addr = self.addr;
        let _ = self
            .ns
            .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn serve(conn: TcpStream) {
    let mut out = conn.try_clone().expect("clone");
    let mut map = std::collections::HashMap::<String, String>::new();
    let started = Instant::now();
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["PING"] => "PONG".to_string(),
            ["INCR", k] => {
                let v = map.get(*k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + 1;
                map.insert(k.to_string(), v.to_string());
                v.to_string()
            }
            ["GET", k] => map.get(*k).cloned().unwrap_or_else(|| "0".into()),
            ["SET", k, v] if v.parse::<u64>().is_ok() => {
                map.insert(k.to_string(), v.to_string());
                "OK".into()
            }
            ["SET", _, _] => "ERR value must be an unsigned 64-bit integer".into(),
            ["TIME"] => started.elapsed().as_nanos().to_string(),
            ["STATS"] => format!(
                "keys={} uptime_ns={}",
                map.len(),
                started.elapsed().as_nanos()
            ),
            ["VERIFY"] => "OK pages=16384 writes=42".into(),
            ["HANG"] => continue,
            _ => "ERR unknown".into(),
        };
        if out.write_all(format!("{reply}\n").as_bytes()).is_err() {
            break;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw frames for the TAP checks.

const ETH_ARP: [u8; 2] = [0x08, 0x06];

/// If `frame` is an ARP request for `target`, the sender's MAC and IPv4 address.
fn arp_request_for(frame: &[u8], target: Ipv4Addr) -> Option<([u8; 6], Ipv4Addr)> {
    if frame.len() < 42 || frame[12..14] != ETH_ARP || frame[20..22] != [0, 1] {
        return None;
    }
    let tpa = Ipv4Addr::new(frame[38], frame[39], frame[40], frame[41]);
    (tpa == target).then(|| {
        let mut sha = [0u8; 6];
        sha.copy_from_slice(&frame[22..28]);
        (
            sha,
            Ipv4Addr::new(frame[28], frame[29], frame[30], frame[31]),
        )
    })
}

/// An ARP reply "`spa` is at `sha`" to (`tha`, `tpa`), padded to the Ethernet minimum.
fn arp_reply(sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&ETH_ARP);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa.octets());
    f.resize(60, 0);
    f
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Sends a UDP datagram from the client towards the guest address every 200 ms (each one
/// makes the client ARP for 10.0.0.2 while unresolved) until `tap` sees an ARP request for
/// it; returns the requester's MAC and address.
fn client_arp_seen_on(
    client: &Netns,
    tap: &mut TapHandle,
    timeout: Duration,
) -> Option<([u8; 6], Ipv4Addr)> {
    let sock = client
        .enter(|| UdpSocket::bind((CLIENT_ADDR, 0)))
        .expect("enter")
        .expect("bind udp");
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        // The first send may fail with EHOSTUNREACH after a failed resolution; irrelevant.
        let _ = sock.send_to(b"probe", (GUEST_ADDR, 9));
        let slice = Instant::now() + Duration::from_millis(200);
        while let Some(left) = slice.checked_duration_since(Instant::now()) {
            match tap.recv_frame(left).expect("read tap") {
                Some(f) => {
                    if let Some(found) = arp_request_for(&f, GUEST_ADDR) {
                        return Some(found);
                    }
                }
                None => break,
            }
        }
    }
    None
}

fn neighbour_mac(ns: &Netns, addr: Ipv4Addr) -> String {
    ns.run(&["ip", "neigh", "show", &addr.to_string(), "dev", CLIENT_IF])
        .expect("ip neigh")
}

// ---------------------------------------------------------------------------------------------
// Replication-link probes.

/// Whether a UDP datagram from `from` reaches `to_addr` inside `to` within `timeout`.
fn udp_reaches(from: &Netns, to: &Netns, to_addr: Ipv4Addr, timeout: Duration) -> bool {
    let rx = to
        .enter(|| UdpSocket::bind((to_addr, 0)))
        .expect("enter")
        .expect("bind rx");
    rx.set_read_timeout(Some(timeout)).expect("timeout");
    let port = rx.local_addr().expect("addr").port();
    let tx = from
        .enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
        .expect("enter")
        .expect("bind tx");
    // Sending fails locally on a downed link; that is "does not reach".
    if tx.send_to(b"x", (to_addr, port)).is_err() {
        return false;
    }
    let mut buf = [0u8; 8];
    rx.recv_from(&mut buf).is_ok()
}

fn assert_replication(ha: &Ha, p2b: bool, b2p: bool, ctx: &str) {
    // A delivery is waited for up to LONG (ARP may need re-resolving); a loss for SHORT.
    let wait = |expected: bool| if expected { LONG } else { SHORT };
    assert_eq!(
        udp_reaches(&ha.primary.ns, &ha.backup.ns, BACKUP_REPL_ADDR, wait(p2b)),
        p2b,
        "{ctx}: primary -> backup delivery"
    );
    assert_eq!(
        udp_reaches(&ha.backup.ns, &ha.primary.ns, PRIMARY_REPL_ADDR, wait(b2p)),
        b2p,
        "{ctx}: backup -> primary delivery"
    );
}

/// Seconds to push `bytes` over TCP from the primary to the backup's replication address.
fn transfer_time(ha: &Ha, bytes: usize) -> Duration {
    let listener = ha
        .backup
        .ns
        .enter(|| TcpListener::bind((BACKUP_REPL_ADDR, 0)))
        .expect("enter")
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let receiver = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut n = 0usize;
        let mut buf = vec![0u8; 65536];
        loop {
            match conn.read(&mut buf).expect("read") {
                0 => break n,
                k => n += k,
            }
        }
    });
    let started = Instant::now();
    let mut conn = ha
        .primary
        .ns
        .enter(|| TcpStream::connect_timeout(&(BACKUP_REPL_ADDR, port).into(), LONG))
        .expect("enter")
        .expect("connect");
    conn.set_write_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    conn.write_all(&vec![0x5a; bytes]).expect("write");
    conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let received = receiver.join().expect("receiver");
    assert_eq!(received, bytes);
    started.elapsed()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn single_topology_carries_client_traffic_to_the_lan() {
    require_root();
    let topo = Topology::single().expect("single topology");
    assert!(topo.lan.bridge.has_port(TAP).expect("ports"), "tap0 in br0");
    assert!(!topo.lan.bridge.has_port("nope0").expect("ports"));

    // Something at the guest's address on the LAN, as the VM will be.
    let probe = topo
        .lan
        .attach("probe", Some(GUEST_CIDR))
        .expect("probe namespace");
    assert!(topo.client_ns().ping(GUEST_ADDR, LONG).expect("ping"));
    // The replication network does not exist here.
    assert!(!topo
        .client_ns()
        .run(&["ip", "-4", "addr"])
        .expect("ip addr")
        .contains("192.168.77."));

    let _guest = FakeGuest::start(&probe.ns, guest_service());
    let mut c = GuestClient::connect_retry(topo.client_ns(), guest_service(), LONG, || Ok(()))
        .expect("connect");
    for want in 1..=100 {
        assert_eq!(c.incr("n").expect("incr"), want);
    }
    c.set("k", 77).expect("set");
    assert_eq!(c.get("k").expect("get"), 77);
    assert_eq!(c.get("never-set").expect("get"), 0);
    assert!(matches!(
        c.request("SET k teal"),
        Err(HarnessError::Guest { .. })
    ));
    assert!(c.time_ns().expect("time") > 0);
    assert_eq!(
        c.stats().expect("stats").get("keys").map(String::as_str),
        Some("2")
    );
    assert_eq!(
        c.verify().expect("verify"),
        Verify::Ok {
            pages: 16384,
            writes: 42
        }
    );
    assert!(matches!(
        c.request("BOGUS"),
        Err(HarnessError::Guest { .. })
    ));
    assert!(matches!(
        c.set("a b", 1),
        Err(HarnessError::InvalidArgument(_))
    ));
    c.set_request_timeout(Duration::from_millis(200))
        .expect("timeout");
    let started = Instant::now();
    assert!(matches!(
        c.request("HANG"),
        Err(HarnessError::Timeout { .. })
    ));
    assert!(started.elapsed() < LONG);
}

#[test]
fn guest_client_retry_stops_when_the_liveness_check_fails() {
    require_root();
    let topo = Topology::single().expect("single topology");
    let started = Instant::now();
    let mut calls = 0;
    let err = GuestClient::connect_retry(
        topo.client_ns(),
        guest_service(),
        Duration::from_secs(60),
        || {
            calls += 1;
            if calls > 2 {
                Err(HarnessError::InvalidArgument("vm died".into()))
            } else {
                Ok(())
            }
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("vm died"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // With nobody at the address, the retry ends at its deadline, naming the address.
    let err = GuestClient::connect_retry(topo.client_ns(), guest_service(), SHORT, || Ok(()))
        .unwrap_err();
    assert!(matches!(err, HarnessError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("10.0.0.2:7000"), "{err}");
}

#[test]
fn ha_topology_bridges_both_host_taps_to_the_client() {
    require_root();
    let ha = Topology::ha().expect("ha topology");
    for role in [HostRole::Primary, HostRole::Backup] {
        let host = ha.host(role);
        assert!(
            host.bridge.has_port(TAP).expect("ports"),
            "{role:?}: tap0 in br0"
        );
        assert!(
            host.bridge.has_port(UPLINK_IF).expect("ports"),
            "{role:?}: lan0 in br0"
        );
        // The guest side of the LAN carries no replication addresses and vice versa.
        let addrs = host.ns.run(&["ip", "-4", "-o", "addr"]).expect("ip addr");
        assert!(addrs.contains(&host.repl_addr.to_string()), "{addrs}");
        assert!(
            !addrs.contains("10.0.0."),
            "{role:?} host has a LAN address: {addrs}"
        );
    }

    // Each host's TAP sees the client's ARP for the guest, and a reply injected into the TAP
    // reaches the client: frames cross host bridge -> uplink -> LAN switch both ways.
    for (i, role) in [HostRole::Primary, HostRole::Backup]
        .into_iter()
        .enumerate()
    {
        let mut tap = ha.host(role).tap.open().expect("open tap");
        let (client_mac, client_ip) = client_arp_seen_on(ha.client_ns(), &mut tap, LONG)
            .unwrap_or_else(|| panic!("{role:?}: no ARP on tap0"));
        assert_eq!(client_ip, CLIENT_ADDR);
        let vm_mac = [0x02, 0x74, 0x77, 0, 0, i as u8 + 1];
        tap.send_frame(&arp_reply(vm_mac, GUEST_ADDR, client_mac, CLIENT_ADDR))
            .expect("inject");
        wait_until(
            &format!("{role:?}: client learning the guest MAC"),
            LONG,
            || Ok(neighbour_mac(ha.client_ns(), GUEST_ADDR).contains(&mac_string(vm_mac))),
        )
        .expect("ARP reply from the TAP reaches the client");
        ha.client_ns()
            .run(&["ip", "neigh", "flush", "dev", CLIENT_IF])
            .expect("flush");
    }

    // Cutting the primary's uplink hides it from the LAN while the backup still hears the
    // client.
    ha.isolate_lan(HostRole::Primary).expect("isolate");
    let mut p_tap = ha.primary.tap.open().expect("open primary tap");
    let mut b_tap = ha.backup.tap.open().expect("open backup tap");
    assert!(client_arp_seen_on(ha.client_ns(), &mut b_tap, LONG).is_some());
    let quiet_until = Instant::now() + Duration::from_secs(1);
    while let Some(f) = p_tap
        .recv_frame(quiet_until.saturating_duration_since(Instant::now()))
        .expect("read")
    {
        assert!(
            arp_request_for(&f, GUEST_ADDR).is_none(),
            "isolated primary got the client's ARP"
        );
    }
    ha.reconnect_lan(HostRole::Primary).expect("reconnect");
    ha.client_ns()
        .run(&["ip", "neigh", "flush", "dev", CLIENT_IF])
        .expect("flush");
    assert!(client_arp_seen_on(ha.client_ns(), &mut p_tap, LONG).is_some());
}

#[test]
fn replication_link_cuts_restore_and_slows() {
    require_root();
    let ha = Topology::ha().expect("ha topology");
    assert!(ha.primary.ns.ping(BACKUP_REPL_ADDR, LONG).expect("ping"));
    assert_replication(&ha, true, true, "fresh");

    let cases = [
        (Cut::LinkDown, false, false),
        (Cut::Drop(Direction::Both), false, false),
        (Cut::Drop(Direction::PrimaryToBackup), false, true),
        (Cut::Drop(Direction::BackupToPrimary), true, false),
    ];
    for (cut, p2b, b2p) in cases {
        ha.cut_replication(cut).expect("cut");
        // Repeating a cut changes nothing.
        ha.cut_replication(cut).expect("cut again");
        assert_replication(&ha, p2b, b2p, &format!("{cut:?}"));
        ha.restore_replication().expect("restore");
        assert_replication(&ha, true, true, &format!("restored after {cut:?}"));
    }
    // Restoring an intact link is harmless.
    ha.restore_replication().expect("restore twice");

    // 1 MiB at 8 Mbit/s takes about a second; unshaped it takes milliseconds.
    const BYTES: usize = 1 << 20;
    let fast = transfer_time(&ha, BYTES);
    ha.slow_replication(Direction::PrimaryToBackup, Tbf::rate_kbit(8_000))
        .expect("tbf");
    let slow = transfer_time(&ha, BYTES);
    ha.restore_replication().expect("unslow");
    let fast_again = transfer_time(&ha, BYTES);
    assert!(
        slow >= Duration::from_millis(700),
        "shaped transfer took only {slow:?}"
    );
    assert!(
        fast < Duration::from_millis(500),
        "unshaped transfer took {fast:?}"
    );
    assert!(
        fast_again < Duration::from_millis(500),
        "after restore: {fast_again:?}"
    );
}

#[test]
fn processes_are_watched_signalled_and_report_early_exit() {
    require_root();
    let ns = Netns::new("proc").expect("netns");
    let dir = TestDir::new("proc").expect("dir");

    let mut p = TwinProcess::spawn_program(
        &ns,
        &dir,
        "looper",
        Path::new("/bin/sh"),
        &[
            "-c",
            "echo starting; echo ready >&2; trap 'echo bye; exit 0' TERM; while :; do sleep 0.05; done",
        ],
        &[],
    )
    .expect("spawn");
    assert_eq!(p.wait_for_line("ready", LONG).expect("ready"), "ready");
    // Namespaces come with IPv6 off (no router solicitations or DAD towards the guest).
    assert_eq!(
        ns.run(&["cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"])
            .expect("cat"),
        "1\n"
    );
    // Spawned processes see the namespace's own /sys (only `lo` here), as under
    // `ip netns exec`.
    let mut ls =
        TwinProcess::spawn_program(&ns, &dir, "ls", Path::new("ls"), &["/sys/class/net"], &[])
            .expect("spawn ls");
    assert!(ls.wait_exit(LONG).expect("ls exits").success());
    assert_eq!(ls.text(Stream::Stdout), "lo\n");
    // It runs inside the namespace.
    let ino = |path: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).expect(path).ino()
    };
    assert_eq!(
        ino(&format!("/proc/{}/ns/net", p.pid())),
        ino(&format!("/run/netns/{}", ns.name()))
    );
    let mark = p.mark();
    let err = p
        .wait_for_line("never printed", Duration::from_millis(200))
        .unwrap_err();
    assert!(matches!(err, HarnessError::Timeout { .. }), "{err}");
    assert!(
        err.to_string().contains("ready"),
        "timeouts show the output: {err}"
    );
    p.ensure_running().expect("still running");
    p.terminate().expect("SIGTERM");
    let status = p.wait_exit(LONG).expect("exit");
    assert!(status.success(), "{}", describe_status(status));
    p.wait_for_line_after(mark, "bye", LONG)
        .expect("bye after the mark");
    assert_eq!(
        std::fs::read_to_string(p.stderr_path()).expect("stderr"),
        "ready\n"
    );
    assert!(
        p.terminate().is_err(),
        "signalling an exited process is refused"
    );

    // A process that dies while the test waits for it is reported at once, with its output.
    let mut early = TwinProcess::spawn_program(
        &ns,
        &dir,
        "early",
        Path::new("/bin/sh"),
        &["-c", "echo oops >&2; exit 3"],
        &[],
    )
    .expect("spawn");
    let started = Instant::now();
    let err = early
        .wait_for_line("ready", Duration::from_secs(60))
        .unwrap_err();
    assert!(started.elapsed() < LONG, "took {:?}", started.elapsed());
    let msg = err.to_string();
    assert!(matches!(err, HarnessError::ProcessExited { .. }), "{msg}");
    assert!(msg.contains("oops") && msg.contains("exit code 3"), "{msg}");
    assert!(early.ensure_running().is_err());

    let mut sleeper =
        TwinProcess::spawn_program(&ns, &dir, "sleeper", Path::new("sleep"), &["1000"], &[])
            .expect("spawn");
    sleeper.signal(Signal::Stop).expect("stop");
    sleeper.signal(Signal::Cont).expect("cont");
    let status = sleeper.kill().expect("kill");
    assert_eq!(describe_status(status), "killed by signal 9");
}

/// The events client on a real `twin backup` (no VM needed): a wait for a process still
/// starting, a recorder that keeps what it saw once the process is gone, and waits that
/// fail at once on a dead process instead of running into their timeouts.
#[test]
fn events_are_waited_for_and_recorded_and_outlive_the_process() {
    use twin_api::EventKind;
    use twin_lab::events::Events;
    require_root();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("events").expect("dir");
    let sock = dir.join("backup.sock");
    let (key, control) = (dir.key_file(), sock.display().to_string());
    let listen = "127.0.0.1:7410";
    let mut b = TwinProcess::spawn(
        topo.vm_ns(),
        &dir,
        "backup",
        &[
            "backup",
            "--key-file",
            &key,
            "--listen",
            listen,
            "--tap",
            TAP,
            "--control",
            &control,
        ],
    )
    .expect("spawn twin backup");
    let events = Events::at(&sock);
    let rec = events.record(true);
    let listening = events
        .wait_live(
            &mut b,
            0,
            "the backup listening",
            Duration::from_secs(30),
            |e| matches!(e.kind, EventKind::Listening { .. }),
        )
        .expect("the backup listens");
    assert!(
        matches!(&listening.kind, EventKind::Listening { listen: l } if l == listen),
        "{listening:?}"
    );
    let recorded = rec
        .wait(0, "the recorded listening", LONG, |e| {
            e.seq == listening.seq
        })
        .expect("the recorder has it too");
    assert_eq!(recorded, listening);
    let mark = rec.mark();
    assert!(mark > listening.seq);
    let quiet = rec
        .wait(mark, "nothing", Duration::from_millis(200), |_| true)
        .unwrap_err();
    assert!(matches!(quiet, HarnessError::Timeout { .. }), "{quiet}");

    b.kill().expect("SIGKILL the backup");
    assert!(rec.wait_end(LONG), "the recorder sees the process gone");
    assert!(rec.any(|e| e.seq == listening.seq), "what it said is kept");
    assert!(events.mark().is_err(), "nobody answers the socket now");
    let t = Instant::now();
    let gone = rec
        .wait(mark, "an event of a dead process", LONG, |_| true)
        .unwrap_err();
    assert!(gone.to_string().contains("gone"), "{gone}");
    let dead = events
        .wait_live(&mut b, 0, "an event of a dead process", LONG, |_| false)
        .unwrap_err();
    assert!(matches!(dead, HarnessError::ProcessExited { .. }), "{dead}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn namespaces_and_processes_are_gone_after_drop_and_after_a_panic() {
    require_root();
    let ha = Topology::ha().expect("ha topology");
    let names = ha.namespace_names();
    assert_eq!(names.len(), 4);
    assert!(names.iter().all(|n| Netns::exists(n)));
    drop(ha);
    for n in &names {
        assert!(!Netns::exists(n), "{n} survived drop");
    }

    let seen = Mutex::new((Vec::<String>::new(), 0u32, None::<std::path::PathBuf>));
    let result = catch_unwind(AssertUnwindSafe(|| {
        let topo = Topology::single().expect("single topology");
        let dir = TestDir::new("panic").expect("dir");
        let p = TwinProcess::spawn_program(
            topo.vm_ns(),
            &dir,
            "sleeper",
            Path::new("sleep"),
            &["1000"],
            &[],
        )
        .expect("spawn");
        let mut s = seen.lock().unwrap();
        *s = (
            topo.namespace_names(),
            p.pid(),
            Some(dir.path().to_path_buf()),
        );
        drop(s);
        panic!("deliberate panic inside a test body");
    }));
    assert!(result.is_err());
    let (names, pid, dir) = seen.into_inner().unwrap();
    assert_eq!(names.len(), 2);
    for n in &names {
        assert!(!Netns::exists(n), "{n} survived a panic");
    }
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} survived a panic"
    );
    // The logs of a panicking test are kept for inspection (the sweeper removes them once
    // this process is gone); remove them here.
    let dir = dir.expect("dir");
    assert!(dir.is_dir());
    std::fs::remove_dir_all(dir).expect("rm");
}

#[test]
fn cleanup_stale_removes_leftovers_of_dead_runs_only() {
    require_root();
    let mine = Netns::new("live").expect("netns");

    // A pid that surely is dead: a child that has been reaped.
    let mut child = std::process::Command::new("true").spawn().expect("spawn");
    let dead = child.id();
    child.wait().expect("wait");

    let stale_ns = format!("{PREFIX}{dead}-0-stale");
    let stale_dir = std::env::temp_dir().join(format!("{PREFIX}{dead}-1-stale"));
    std::process::Command::new("ip")
        .args(["netns", "add", &stale_ns])
        .status()
        .expect("ip netns add")
        .success()
        .then_some(())
        .expect("ip netns add failed");
    std::fs::create_dir_all(&stale_dir).expect("mkdir");
    // A leftover process inside the stale namespace.
    let mut orphan = std::process::Command::new("ip")
        .args(["netns", "exec", &stale_ns, "sleep", "1000"])
        .spawn()
        .expect("spawn orphan");
    wait_until("the orphan to enter the stale namespace", LONG, || {
        Ok(std::process::Command::new("ip")
            .args(["netns", "pids", &stale_ns])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false))
    })
    .expect("orphan inside");

    let report = cleanup_stale().expect("sweep");
    assert!(report.namespaces.contains(&stale_ns), "{report:?}");
    assert!(report.dirs.contains(&stale_dir), "{report:?}");
    assert!(!Netns::exists(&stale_ns));
    assert!(!stale_dir.exists());
    assert!(
        Netns::exists(mine.name()),
        "a live run's namespace was swept"
    );
    let status = orphan.wait().expect("reap orphan");
    assert!(!status.success(), "the orphan was killed: {status:?}");
}
