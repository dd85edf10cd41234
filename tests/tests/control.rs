//! The control socket end to end: one process owns it, and nothing a local client does to it
//! costs the process its control or unbounded resources.
//!
//! - a second `twin run` / `twin backup` given the socket of a running one refuses to start,
//!   naming the socket, and the running one still answers through it (a stale socket left by
//!   a killed process is replaced);
//! - the socket is private (mode 0600);
//! - connections are bounded (beyond the cap a client gets an HTTP 503 with an error body at
//!   once, and no thread), and so are a request head and a body (a 100 MB head gets 431, a
//!   100 MB body 413 from its Content-Length, neither buffered);
//! - when accept fails (the process is out of file descriptors) the control thread backs off
//!   instead of spinning, says so once, and serves again when descriptors are back.
//!
//! `twin backup` is the process under test where a VM is not needed (it serves its control
//! socket from start-up, long before it runs a VM).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use twin_api::EventKind;
use twin_lab::events::Events;
use twin_lab::*;

/// Boot plus service start-up, generous for software KVM on a busy 2-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// A process getting to where it serves its control socket, or exiting after a refusal.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// A control command.
const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// The connection cap of the control socket (twin/src/control/mod.rs).
const MAX_CONNECTIONS: usize = 32;
const TAP2: &str = "tap1";

fn backup_args<'a>(key: &'a str, tap: &'a str, listen: &'a str, control: &'a str) -> Vec<&'a str> {
    vec![
        "backup",
        "--key-file",
        key,
        "--listen",
        listen,
        "--tap",
        tap,
        "--control",
        control,
    ]
}

fn spawn_backup(
    ns: &Netns,
    dir: &TestDir,
    name: &str,
    listen: &str,
    control: &Path,
) -> TwinProcess {
    let sock = control;
    let control = control.display().to_string();
    let key = dir.key_file();
    let mut p = TwinProcess::spawn(ns, dir, name, &backup_args(&key, TAP, listen, &control))
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    Events::at(sock)
        .wait_live(&mut p, 0, "the backup listening", START_TIMEOUT, |e| {
            matches!(e.kind, EventKind::Listening { .. })
        })
        .unwrap_or_else(|e| panic!("{name} does not start: {e}"));
    p
}

/// A second process that must refuse to start: it exits by itself, non-zero, naming the
/// socket as in use.
fn assert_refused(mut dup: TwinProcess, control: &Path, first: &TwinProcess) {
    let status = match dup.wait_exit(START_TIMEOUT) {
        Ok(s) => s,
        Err(e) => panic!(
            "the second process given the control socket {} of a running one did not exit \
             ({e}): it runs on with the socket taken over\n{}",
            control.display(),
            tails(&[first, &dup])
        ),
    };
    let out = format!("{}\n{}", dup.text(Stream::Stdout), dup.text(Stream::Stderr));
    assert!(
        !status.success(),
        "the second process exited successfully: {out}"
    );
    assert!(
        out.contains("in use") && out.contains(&*control.to_string_lossy()),
        "the second process's error does not say that {} is in use: {out}",
        control.display()
    );
    eprintln!("{} refused: {}", dup.name(), out.trim());
    assert_no_panic(&dup);
}

/// A `twin run` and a `twin backup`, each followed by a duplicate given the same control
/// socket: the duplicate refuses to start (the backup's used to unlink the socket before
/// failing on its TAP or port, leaving the running backup without control), and the first
/// still answers `twin status` through the socket. A socket left by a SIGKILLed process is
/// stale and is replaced.
#[test]
fn control_socket_in_use() {
    require_kvm();
    let topo = Topology::single().expect("single topology");
    let _tap2 = Tap::create(topo.vm_ns(), TAP2, TapOptions::default()).expect("second TAP");
    let dir = TestDir::new("ctl-in-use").expect("test dir");
    let ns = topo.vm_ns();

    // twin run.
    let sock = dir.join("vm.sock");
    let sock_s = sock.display().to_string();
    let run = |tap: &str| {
        vec![
            "run".to_string(),
            "--tap".into(),
            tap.into(),
            "--ip".into(),
            GUEST_CIDR.into(),
            "--mem".into(),
            "128M".into(),
            "--control".into(),
            sock_s.clone(),
        ]
    };
    let args1 = run(TAP);
    let mut vm = TwinProcess::spawn(
        ns,
        &dir,
        "vm",
        &args1.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .expect("spawn twin run");
    Events::at(&sock)
        .wait_live(&mut vm, 0, "the VM running", BOOT_TIMEOUT, |e| {
            matches!(e.kind, EventKind::VmRunning { .. })
        })
        .unwrap_or_else(|e| panic!("twin run: {e}"));
    let before = twin_status(ns, &dir, &sock, CMD_TIMEOUT).expect("status of the first VM");
    assert_eq!(before["pid"].as_u64(), Some(vm.pid() as u64), "{before}");
    // Its own TAP, so that nothing but the socket stands in its way.
    let args2 = run(TAP2);
    let dup = TwinProcess::spawn(
        ns,
        &dir,
        "vm-dup",
        &args2.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .expect("spawn the second twin run");
    assert_refused(dup, &sock, &vm);
    let after = twin_status(ns, &dir, &sock, CMD_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "the first VM lost its control socket: {e}\n{}",
            tails(&[&vm])
        )
    });
    assert_eq!(
        after["pid"].as_u64(),
        Some(vm.pid() as u64),
        "the control socket is answered by another process: {after}"
    );
    vm.ensure_running().expect("the first VM runs on");
    // Done with it; its TAP is the backup's below.
    vm.kill().expect("SIGKILL the VM");

    // twin backup: the duplicate used to take the socket and then fail on the TAP / port.
    let bsock = dir.join("backup.sock");
    let listen = "127.0.0.1:7400";
    let mut backup = spawn_backup(ns, &dir, "backup", listen, &bsock);
    twin_status(ns, &dir, &bsock, CMD_TIMEOUT).expect("status of the backup");
    let bsock_s = bsock.display().to_string();
    let key = dir.key_file();
    // Its own TAP and port, so that nothing but the socket stands in its way: refused.
    let dup = TwinProcess::spawn(
        ns,
        &dir,
        "backup-dup",
        &backup_args(&key, TAP2, "127.0.0.1:7402", &bsock_s),
    )
    .expect("spawn the second twin backup");
    assert_refused(dup, &bsock, &backup);
    twin_status(ns, &dir, &bsock, CMD_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "the running backup lost its control socket to a duplicate: {e}\n{}",
            tails(&[&backup])
        )
    });
    // The same TAP and port: it fails on them before it looks at the socket (the TAP and the
    // port are bound first), and leaves the socket alone.
    let mut dup2 = TwinProcess::spawn(
        ns,
        &dir,
        "backup-dup2",
        &backup_args(&key, TAP, listen, &bsock_s),
    )
    .expect("spawn the third twin backup");
    let status = dup2
        .wait_exit(START_TIMEOUT)
        .expect("the third backup exits");
    assert!(!status.success());
    let err = dup2.text(Stream::Stderr);
    assert!(
        err.contains("TAP") || err.contains("cannot listen"),
        "the third backup should fail on its TAP or port: {err}"
    );
    twin_status(ns, &dir, &bsock, CMD_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "the running backup lost its control socket to a duplicate that failed to start: \
             {e}\n{}",
            tails(&[&backup])
        )
    });

    // A killed process leaves its socket behind: stale, so a new process replaces it.
    backup.kill().expect("SIGKILL the backup");
    assert!(
        std::fs::symlink_metadata(&bsock).is_ok(),
        "SIGKILL should have left the socket file behind"
    );
    let backup2 = spawn_backup(ns, &dir, "backup2", listen, &bsock);
    twin_status(ns, &dir, &bsock, CMD_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "the stale socket was not replaced: {e}\n{}",
            tails(&[&backup2])
        )
    });
    assert_no_panic(&backup2);
    drop(backup2);
    assert_no_panic(&vm);
}

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/{file}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/{file}"))
}

fn threads(pid: u32) -> u64 {
    proc_field(pid, "status", "Threads:")
}

fn rss_kib(pid: u32) -> u64 {
    proc_field(pid, "status", "VmRSS:")
}

/// CPU time (user + system) the threads of process `pid` named `control…` have used (the
/// accept thread and the connection threads).
fn control_cpu_time(pid: u32) -> Duration {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("list threads")
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("control"))
        })
        .map(|t| cpu_time(&t.path().join("stat")))
        .sum()
}

/// CPU time (user + system) in a `/proc/…/stat` file.
fn cpu_time(stat: &Path) -> Duration {
    let stat = std::fs::read_to_string(stat).unwrap_or_default();
    if stat.is_empty() {
        return Duration::ZERO; // the thread ended meanwhile
    }
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf takes an integer and returns one.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Everything the server sends on `conn` until it closes it (or `timeout` passes).
fn read_answer_within(conn: &UnixStream, timeout: Duration) -> std::io::Result<String> {
    conn.set_read_timeout(Some(timeout))?;
    let mut answer = Vec::new();
    let mut conn = conn;
    match conn.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if answer.is_empty() => return Err(e),
        Err(_) => {}
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Sends `head` (and nothing after it) and then `body_len` bytes of body from a thread,
/// stopping when the server closes; returns the server's answer and how much was sent.
fn flood(sock: &Path, head: Vec<u8>, body_len: usize) -> (String, usize) {
    let mut c = connect(sock);
    let writer = {
        let mut c = c.try_clone().expect("clone");
        std::thread::spawn(move || {
            if c.write_all(&head).is_err() {
                return 0;
            }
            let chunk = vec![b'x'; 1 << 20];
            let mut sent = 0usize;
            while sent < body_len {
                match c.write(&chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sent += n,
                }
            }
            sent
        })
    };
    c.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    // The server has answered and closed; a writer still blocked in write_all on a full
    // socket buffer would wait forever: shut our side down.
    let _ = c.shutdown(std::net::Shutdown::Both);
    let sent = writer.join().expect("writer");
    (String::from_utf8_lossy(&answer).into_owned(), sent)
}

/// Unix sockets are reached by path: no network namespace is involved.
fn connect(path: &Path) -> UnixStream {
    UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()))
}

/// The socket is private; connections beyond the cap get a 503 at once and cost no thread;
/// a request head or body longer than the bound is refused without being buffered.
#[test]
fn control_socket_bounds_connections_and_lines() {
    require_root();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("ctl-bounds").expect("test dir");
    let ns = topo.vm_ns();
    let sock = dir.join("backup.sock");
    let backup = spawn_backup(ns, &dir, "backup", "127.0.0.1:7401", &sock);
    let pid = backup.pid();

    let mode = std::fs::metadata(&sock)
        .expect("stat the socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        mode, 0o600,
        "the control socket has mode {mode:o}, want 600"
    );

    // Connections: the cap, then some more.
    let base_threads = threads(pid);
    let mut conns: Vec<UnixStream> = (0..MAX_CONNECTIONS).map(|_| connect(&sock)).collect();
    let mut refused = Vec::new();
    for _ in 0..20 {
        let c = connect(&sock);
        let t = Instant::now();
        let line = read_answer_within(&c, Duration::from_secs(5)).unwrap_or_default();
        refused.push((line, t.elapsed()));
        conns.push(c);
    }
    std::thread::sleep(Duration::from_millis(300));
    let with_conns = threads(pid);
    eprintln!(
        "threads: {base_threads} before, {with_conns} with {} connections; beyond the cap: {:?}",
        conns.len(),
        refused.first()
    );
    for (line, took) in &refused {
        assert!(
            line.starts_with("HTTP/1.1 503")
                && line.contains(r#""code":"unavailable""#)
                && line.contains("too many")
                && *took < Duration::from_secs(2),
            "a connection beyond the cap of {MAX_CONNECTIONS} got {line:?} after {took:?}, \
             want an immediate 503 with an error body"
        );
    }
    assert!(
        with_conns <= base_threads + MAX_CONNECTIONS as u64 + 1,
        "{} connections made {} threads ({} before): the connection cap does not hold",
        conns.len(),
        with_conns - base_threads,
        base_threads
    );
    drop(conns);
    wait_until(
        "the control connections to close",
        Duration::from_secs(10),
        || Ok(threads(pid) <= base_threads + 1),
    )
    .unwrap_or_else(|e| panic!("{e}: {} threads, {base_threads} before", threads(pid)));
    twin_status(ns, &dir, &sock, CMD_TIMEOUT).expect("the socket serves after the flood");

    // One 100 MB request head, never terminated: hyper's head buffer is bounded.
    let rss_before = rss_kib(pid);
    let (answer, sent) = flood(&sock, b"GET /v1/status".to_vec(), 100 << 20);
    let rss_after = rss_kib(pid);
    eprintln!(
        "long head: {sent} bytes sent before the server closed; answer {answer:?}; RSS \
         {rss_before} -> {rss_after} KiB"
    );
    assert!(
        answer.starts_with("HTTP/1.1 431") || answer.starts_with("HTTP/1.1 400"),
        "a 100 MB request head got {answer:?}, want 431 (or 400): the head is too long"
    );
    assert!(
        sent < 100 << 20,
        "the server read the whole 100 MB head instead of closing the connection"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "the server's RSS grew from {rss_before} to {rss_after} KiB on one long head"
    );
    twin_status(ns, &dir, &sock, CMD_TIMEOUT).expect("the socket serves after the long head");

    // One 100 MB request body: refused from its Content-Length, before it is read.
    let rss_before = rss_kib(pid);
    let head = format!(
        "PUT /v1/vm/snapshot HTTP/1.1\r\nhost: twin\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        100u64 << 20
    );
    let (answer, sent) = flood(&sock, head.into_bytes(), 100 << 20);
    let rss_after = rss_kib(pid);
    eprintln!(
        "long body: {sent} bytes sent before the server closed; answer {answer:?}; RSS \
         {rss_before} -> {rss_after} KiB"
    );
    assert!(
        answer.starts_with("HTTP/1.1 413")
            && answer.contains(r#""code":"payload_too_large""#)
            && answer.contains("longer than"),
        "a 100 MB request body got {answer:?}, want 413 with an error saying it is too long"
    );
    assert!(
        sent < 100 << 20,
        "the server read the whole 100 MB body instead of refusing it"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "the server's RSS grew from {rss_before} to {rss_after} KiB on one long body"
    );
    twin_status(ns, &dir, &sock, CMD_TIMEOUT).expect("the socket serves after the long line");
    assert_no_panic(&backup);
}

/// Out of file descriptors, `accept` fails for every pending connection: the control thread
/// must back off (not spin at 100% CPU), log it once, and serve again once descriptors are
/// back.
#[test]
fn control_socket_accept_errors_back_off() {
    require_root();
    let topo = Topology::single().expect("single topology");
    let dir = TestDir::new("ctl-emfile").expect("test dir");
    let ns = topo.vm_ns();
    let sock = dir.join("backup.sock");
    let backup = spawn_backup(ns, &dir, "backup", "127.0.0.1:7402", &sock);
    let pid = backup.pid();
    let open: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list fds")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    // The soft limit only (`N:`): lowering the hard one could not be undone without
    // CAP_SYS_RESOURCE.
    let soft = proc_field(pid, "limits", "Max open files");
    let limit = |n: String| {
        let out = std::process::Command::new("prlimit")
            .args(["--pid", &pid.to_string(), &format!("--nofile={n}:")])
            .output()
            .expect("run prlimit");
        assert!(
            out.status.success(),
            "prlimit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // No free descriptor below the limit: every accept fails with EMFILE (the kernel
    // allocates the descriptor before it takes a connection off the queue, so the
    // connections stay pending and the listener stays readable).
    let lowest_free = (0..).find(|fd| !open.contains(fd)).expect("a free fd");
    limit(lowest_free.to_string());
    let conns: Vec<UnixStream> = (0..8).map(|_| connect(&sock)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let (cpu0, t0) = (control_cpu_time(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let (cpu, wall) = (control_cpu_time(pid) - cpu0, t0.elapsed());
    let share = cpu.as_secs_f64() / wall.as_secs_f64();
    let warnings = backup
        .text(Stream::Stderr)
        .lines()
        .filter(|l| l.contains("control socket"))
        .count();
    eprintln!(
        "at EMFILE: the control threads used {:.0}% of a core over {wall:?}; {warnings} log \
         lines about the control socket",
        share * 100.0
    );
    assert!(
        share < 0.10,
        "the control threads used {:.0}% of a core while accept failed (EMFILE): they spin",
        share * 100.0
    );
    assert!(
        (1..=2).contains(&warnings),
        "accept failures of the control socket should be logged once (and at most once more \
         when they end), not {warnings} times:\n{}",
        backup.tail(10)
    );
    limit(soft.to_string());
    drop(conns);
    twin_status(ns, &dir, &sock, CMD_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "the socket does not serve again after EMFILE: {e}\n{}",
            backup.tail(10)
        )
    });
    assert_no_panic(&backup);
}
