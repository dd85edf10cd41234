//! `twin demo`: the whole story on one machine.
//!
//! Builds the `ha` layout of the test harness (a LAN switch namespace with a client, a
//! primary host and a backup host each bridging their own `tap0` onto the LAN, and a
//! replication veth between the two hosts), starts `twin backup` and `twin protect` with the
//! built-in guest, waits for protection, runs a client that sends `INCR` in a loop on ONE
//! TCP connection, kills the primary with a real SIGKILL, keeps the connection going against
//! the backup, and prints a report: protection costs, failover times, requests before and
//! after, acknowledged requests lost, requests applied twice, whether the connection
//! survived, and the guest's own memory check.
//!
//! Everything the demo creates belongs to harness objects that clean up on drop. Ctrl-C,
//! SIGTERM and SIGHUP are blocked and taken by a signal thread that only sets a flag; every
//! wait here checks the flag, so a signal ends the demo by returning normally, and the drops
//! delete the namespaces and kill the processes.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use twin_api::{Event, EventKind};
use twin_lab::etcd::EtcdHost;
use twin_lab::events::{took_over, Events, Recorder};
use twin_lab::{
    guest_service, Ha, HarnessError, HostRole, Netns, Signal, TestDir, Topology, TwinProcess,
    BACKUP_REPL_ADDR, BRIDGE, CLIENT_ADDR, GUEST_CIDR, PRIMARY_REPL_ADDR, TAP,
};

use twin::args::{Millis, Size};
use twin::control::{self, Request, Response};
use twin::signals::Termination;

/// The backup's replication port on `rep0`.
const REPL_PORT: u16 = 7788;
/// The key the client increments.
const KEY: &str = "demo";
/// The guest's MAC (`twin protect`'s default).
const GUEST_MAC: &str = "52:54:00:12:34:56";
/// Limit for one client request; a failover takes far less.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit for the VM to boot and the initial sync to finish.
const PROTECT_TIMEOUT: Duration = Duration::from_secs(120);
/// Limit for the backup to report its takeover after the kill.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// Exit status after Ctrl-C / SIGTERM (128 + SIGINT, as shells do).
const EXIT_INTERRUPTED: u8 = 130;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// How long the client runs; the primary is killed halfway through.
    #[arg(long, default_value = "6s")]
    duration: Millis,
    /// Checkpoint interval of the primary.
    #[arg(long, default_value = "25ms")]
    interval: Millis,
    /// Arguments for the built-in guest (its memory workload).
    #[arg(long, default_value = "dirty=16M/s,wss=64M")]
    guest_args: String,
    /// Guest RAM.
    #[arg(long, default_value = "256M")]
    mem: Size,
    /// Silence from the primary after which the backup takes over.
    #[arg(long, default_value = "100ms")]
    heartbeat_timeout: Millis,
    /// A real etcd as the arbiter (`--arbiter` on both sides), so that a partition cannot
    /// give two VMs: `auto` uses it when etcd is installed.
    #[arg(long, value_enum, default_value_t = UseArbiter::Auto)]
    arbiter: UseArbiter,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum UseArbiter {
    Auto,
    On,
    Off,
}

impl UseArbiter {
    fn wanted(self) -> bool {
        match self {
            UseArbiter::On => true,
            UseArbiter::Off => false,
            UseArbiter::Auto => twin_lab::etcd::installed(),
        }
    }
}

/// Set by the signal thread on SIGINT, SIGTERM or SIGHUP.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The demo was interrupted by a signal (not a failure of the demo).
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::Acquire) {
        Err(Interrupted.into())
    } else {
        Ok(())
    }
}

/// Blocks the termination signals in this thread (so in every thread spawned after; child
/// processes get an empty mask from `std::process`) and takes them on a thread of their own
/// that only raises [`INTERRUPTED`]. Must run before any other thread is spawned.
fn take_termination_signals() -> Result<()> {
    Termination::block()?.forward(|sig| {
        if !INTERRUPTED.swap(true, Ordering::AcqRel) {
            eprintln!("\ntwin demo: {sig} received, cleaning up");
        }
        true
    })?;
    Ok(())
}

/// Sleeps `d`, waking early (with an error) on a termination signal.
fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupt()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

/// A duration as `twin`'s command line takes it.
fn arg_duration(d: Duration) -> String {
    format!("{}us", d.as_micros())
}

/// Progress lines, stamped with the time since the demo started.
struct Log {
    t0: Instant,
}

impl Log {
    fn step(&self, msg: impl std::fmt::Display) {
        println!("[{:5.1}s] {msg}", self.t0.elapsed().as_secs_f64());
    }
}

pub fn run(args: DemoArgs) -> Result<ExitCode> {
    take_termination_signals()?;
    let result = demo(&args);
    match result {
        Ok(true) => Ok(ExitCode::SUCCESS),
        Ok(false) => Ok(ExitCode::FAILURE),
        Err(e) if e.is::<Interrupted>() || INTERRUPTED.load(Ordering::Acquire) => {
            // Everything is dropped by now: namespaces deleted, processes killed.
            eprintln!("twin demo: interrupted; namespaces and processes removed");
            Ok(ExitCode::from(EXIT_INTERRUPTED))
        }
        Err(e) => Err(e),
    }
}

fn preflight() -> Result<PathBuf> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "twin demo creates network namespaces and TAP devices and must run as root \
             (e.g. `sudo -E cargo run --release -- demo`)"
        );
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context(
            "twin demo runs real VMs and needs /dev/kvm (load kvm_intel, kvm_amd or kvm_pvm)",
        )?;
    twin_lab::twin_bin().context("cannot find the twin binary to start primary and backup")
}

/// Runs the demo; `Ok(true)` when every check passed.
fn demo(args: &DemoArgs) -> Result<bool> {
    let exe = preflight()?;
    let log = Log { t0: Instant::now() };
    println!("twin demo: a protected VM, a client on one TCP connection, and a SIGKILL\n");

    log.step(
        "building the network: LAN switch, client, primary host, backup host, replication link",
    );
    let topo = Topology::ha().context("building the network namespaces")?;
    check_interrupt()?;
    let ns_names = topo.namespace_names();
    let dir = TestDir::new("demo").context("creating the demo's temporary directory")?;
    let mut keeper = LogKeeper {
        from: dir.path().to_path_buf(),
        done: false,
    };
    log.step(format_args!(
        "  namespaces {} (LAN, client {CLIENT_ADDR}, primary, backup); replication {PRIMARY_REPL_ADDR} <-> {BACKUP_REPL_ADDR}",
        ns_names.join(", ")
    ));

    let repl_addr = format!("{BACKUP_REPL_ADDR}:{REPL_PORT}");
    // One pre-shared key for the pair, as `twin keygen` writes it: the replication link is
    // authenticated both ways.
    let key = dir.key_file();
    log.step(format_args!(
        "  replication key {key} (twin keygen): the link is authenticated both ways"
    ));
    let backup_sock = dir.join("backup.sock");
    let primary_sock = dir.join("primary.sock");
    // The guest's durable store lives on a disk: every INCR is appended to a log on it and
    // flushed before the reply; the backup keeps a replica of the disk, written as each
    // epoch commits.
    let disk = dir.join("primary-disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .context("creating the primary's disk image")?;
    let replica_dir = dir.join("replica");
    let etcd = if args.arbiter.wanted() {
        let e = EtcdHost::start(&topo, &dir).context("starting etcd, the arbiter")?;
        log.step(format_args!(
            "arbiter: etcd in a namespace of its own, reached by each host on a link of its own ({}, {}); whoever takes the VM over must win its record first",
            e.url(HostRole::Primary),
            e.url(HostRole::Backup)
        ));
        Some(e)
    } else {
        log.step("no arbiter (--arbiter off, or etcd not installed): a partition of the replication link could give two VMs");
        None
    };
    let arbiter_args = |role: HostRole| -> Vec<String> {
        etcd.as_ref()
            .map(|e| vec!["--arbiter".to_string(), e.url(role)])
            .unwrap_or_default()
    };
    let backup_arbiter = arbiter_args(HostRole::Backup);
    let primary_arbiter = arbiter_args(HostRole::Primary);
    let mut backup = spawn_twin(
        &topo.backup.ns,
        &dir,
        "backup",
        &exe,
        &[
            "backup",
            "--key-file",
            &key,
            "--listen",
            &repl_addr,
            "--tap",
            TAP,
            "--heartbeat-timeout",
            &arg_duration(args.heartbeat_timeout.0),
            "--console",
            &dir.join("backup-console.txt").to_string_lossy(),
            "--control",
            &backup_sock.to_string_lossy(),
            "--replica-dir",
            &replica_dir.to_string_lossy(),
        ]
        .into_iter()
        .chain(backup_arbiter.iter().map(String::as_str))
        .collect::<Vec<_>>(),
    )?;
    let backup_events = Events::at(&backup_sock).record(false);
    wait_event(
        &mut backup,
        &backup_events,
        0,
        "listening",
        Duration::from_secs(30),
        |e| matches!(e.kind, EventKind::Listening { .. }),
    )
    .context("starting the backup")?;
    log.step(format_args!(
        "backup (pid {}) listening on {repl_addr} in the backup host",
        backup.pid()
    ));

    let mut primary = spawn_twin(
        &topo.primary.ns,
        &dir,
        "primary",
        &exe,
        &[
            "protect",
            "--key-file",
            &key,
            "--backup",
            &repl_addr,
            "--interval",
            &arg_duration(args.interval.0),
            "--tap",
            TAP,
            "--ip",
            GUEST_CIDR,
            "--mem",
            &args.mem.0.to_string(),
            "--guest-args",
            &args.guest_args,
            "--console",
            &dir.join("primary-console.txt").to_string_lossy(),
            "--control",
            &primary_sock.to_string_lossy(),
            "--disk",
            &disk.to_string_lossy(),
        ]
        .into_iter()
        .chain(primary_arbiter.iter().map(String::as_str))
        .collect::<Vec<_>>(),
    )?;
    log.step(format_args!(
        "primary (pid {}) booting the built-in guest ({} MiB, {}, its store on a 64 MiB disk), checkpoint every {} ms",
        primary.pid(),
        args.mem.0 >> 20,
        if args.guest_args.is_empty() {
            "no workload"
        } else {
            &args.guest_args
        },
        args.interval.0.as_secs_f64() * 1e3
    ));
    wait_protected(&primary_sock, &mut primary, &mut backup, &backup_events)
        .map_err(|e| with_logs("waiting for protection", e, &primary, &backup))?;
    log.step("protected: initial sync done, every epoch is acknowledged by the backup");

    let client = connect_client(topo.client_ns(), guest_service(), &mut primary)
        .map_err(|e| with_logs("connecting the client", e, &primary, &backup))?;
    let (local, peer) = (client.local, client.peer);
    log.step(format_args!(
        "client connected {local} -> {peer} (one TCP connection), sending INCR {KEY} in a loop"
    ));

    // The client runs on its own thread; this thread kills the primary and watches.
    let end = Arc::new(AtomicBool::new(false));
    let replies = Arc::new(AtomicU64::new(0));
    let guard = ClientGuard {
        end: end.clone(),
        stream: client
            .stream
            .try_clone()
            .context("cloning the client socket")?,
    };
    let worker = {
        let (end, replies) = (end.clone(), replies.clone());
        std::thread::Builder::new()
            .name("client".into())
            .spawn(move || incr_loop(client, &end, &replies))
            .context("spawning the client thread")?
    };

    let half = args.duration.0 / 2;
    wait_client(half, &worker)?;
    let before_status =
        status(&primary_sock).context("reading the primary's status before the kill")?;
    check_no_early_takeover(&backup_events)
        .map_err(|e| with_logs("checking before the kill", e, &primary, &backup))?;
    if before_status["mode"] != "protected" {
        return Err(with_logs(
            "checking before the kill",
            anyhow!(
                "the primary was no longer protected (mode {}, last error {})",
                before_status["mode"],
                before_status["last_error"]
            ),
            &primary,
            &backup,
        ));
    }
    let replies_at_kill = replies.load(Ordering::Acquire);
    log.step(format_args!(
        "{replies_at_kill} requests answered; SIGKILL -> primary (pid {})",
        primary.pid()
    ));
    let bmark = backup_events.mark();
    let t_kill = Instant::now();
    primary
        .signal(Signal::Kill)
        .context("sending SIGKILL to the primary")?;
    let switch_watch = watch_switch(&topo, t_kill, end.clone())?;
    primary
        .wait_exit(Duration::from_secs(10))
        .context("waiting for the killed primary to be gone")?;
    let t_dead = Instant::now();

    let done = wait_event(
        &mut backup,
        &backup_events,
        bmark,
        "the takeover",
        FAILOVER_TIMEOUT,
        |e| {
            matches!(
                e.kind,
                EventKind::FailoverComplete(_) | EventKind::FailoverFailed { .. }
            )
        },
    )
    .map_err(|e| with_logs("waiting for the backup to take over", e, &primary, &backup))?;
    let failover: Value = match done.kind {
        EventKind::FailoverComplete(report) => {
            serde_json::to_value(report).context("the backup's failover report")?
        }
        other => {
            return Err(with_logs(
                "waiting for the backup to take over",
                anyhow!("the takeover failed: {other:?}"),
                &primary,
                &backup,
            ))
        }
    };
    log.step(format_args!(
        "backup took over from epoch {} (VM running {} after it noticed)",
        failover["epoch"],
        fmt_ms_opt(num(&failover, &["detect_to_running_ms"]))
    ));

    // Keep going for the other half, and at least until the client got an answer from the
    // backup (or its request timed out).
    let after_end = t_kill + (args.duration.0 - half);
    let patience = after_end + REQUEST_TIMEOUT + Duration::from_secs(2);
    let mut said_first = false;
    loop {
        check_interrupt()?;
        let now = Instant::now();
        let answered = replies.load(Ordering::Acquire) > replies_at_kill + 1;
        if answered && !said_first {
            said_first = true;
            log.step("client: answers again, on the same connection");
        }
        if worker.is_finished() || (answered && now >= after_end) || now >= patience {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    end.store(true, Ordering::Release);
    let mut run = loop {
        check_interrupt()?;
        if worker.is_finished() {
            break worker
                .join()
                .map_err(|_| anyhow!("the client thread panicked"))?;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(guard);
    let switch_moved = switch_watch.join().ok().flatten();
    log.step(format_args!(
        "client stopped after {} requests; VERIFY and GET on the same connection",
        run.samples.len()
    ));
    let (verify, final_get) = if run.error.is_none() {
        let v = run.client.request("VERIFY");
        let g = run.client.request(&format!("GET {KEY}"));
        (v, g)
    } else {
        let skipped = || Err(anyhow!("skipped: the connection broke"));
        (skipped(), skipped())
    };
    let backup_status = status(&backup_sock).ok();

    // The disk side: stop the VM now running on the backup host, and cold-boot a new VM
    // from the backup's disk replica alone (no memory): its log must hold every
    // acknowledged INCR.
    let _ = backup.terminate();
    let _ = backup.wait_exit(Duration::from_secs(10));
    let replica = replica_dir.join("disk-0.img");
    log.step(format_args!(
        "stopped the VM on the backup host; cold boot of `twin run --disk {}` (the disk replica)",
        replica.display()
    ));
    let cold_get = cold_boot_get(&exe, &topo, &dir, &replica);

    let ok = report(&Report {
        args,
        before_status: &before_status,
        failover: &failover,
        backup_status: backup_status.as_ref(),
        run: &run,
        t_kill,
        t_dead,
        switch_moved,
        verify,
        final_get,
        cold_get,
    });

    // Orderly end: stop the VM now running on the backup host, then remove the network.
    let _ = backup.terminate();
    let _ = backup.wait_exit(Duration::from_secs(10));
    keeper.done = ok;
    drop(keeper);
    drop(backup);
    drop(backup_events);
    drop(primary);
    drop(etcd);
    drop(dir);
    drop(topo);
    let left: Vec<_> = ns_names.iter().filter(|n| Netns::exists(n)).collect();
    if left.is_empty() {
        println!(
            "cleaned up: processes stopped, {} namespaces removed",
            ns_names.len()
        );
    } else {
        println!("warning: namespaces still present: {left:?}");
    }
    Ok(ok)
}

/// On a failure (not on Ctrl-C), copies the processes' output out of the temporary
/// directory before it is removed, and says where.
struct LogKeeper {
    from: PathBuf,
    done: bool,
}

impl Drop for LogKeeper {
    fn drop(&mut self) {
        if self.done || INTERRUPTED.load(Ordering::Acquire) {
            return;
        }
        let to = std::env::temp_dir().join(format!("twin-demo-logs-{}", std::process::id()));
        let copied = std::fs::create_dir_all(&to).is_ok()
            && std::fs::read_dir(&self.from).is_ok_and(|entries| {
                entries.flatten().all(|e| {
                    !e.path().is_file() || std::fs::copy(e.path(), to.join(e.file_name())).is_ok()
                })
            });
        if copied {
            eprintln!(
                "twin demo: logs of primary and backup kept in {}",
                to.display()
            );
        }
    }
}

/// Polls the LAN switch's forwarding table (from SIGKILL on) until the guest's MAC is on
/// the backup host's port: when the LAN learnt where the guest is now. Ends with `None`
/// after 10 s or when `end` is set.
fn watch_switch(
    topo: &Ha,
    t_kill: Instant,
    end: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<Option<Duration>>> {
    let (lan, port) = topo.backup.uplink.b();
    let (lan, port) = (lan.clone(), port.to_string());
    std::thread::Builder::new()
        .name("switch-watch".into())
        .spawn(move || {
            while !end.load(Ordering::Acquire) && t_kill.elapsed() < Duration::from_secs(10) {
                let out = lan
                    .output(
                        &["bridge", "fdb", "show", "br", BRIDGE],
                        Duration::from_secs(5),
                    )
                    .ok()?;
                // Lines like `52:54:00:12:34:56 dev p2 master br0`.
                let moved = out.stdout.lines().any(|l| {
                    let mut w = l.split_whitespace();
                    w.next() == Some(GUEST_MAC) && w.nth(1) == Some(port.as_str())
                });
                if moved {
                    return Some(t_kill.elapsed());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            None
        })
        .context("spawning the switch watcher")
}

/// Stops the client thread (and unblocks its socket) if the demo ends early.
struct ClientGuard {
    end: Arc<AtomicBool>,
    stream: TcpStream,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        if !self.end.swap(true, Ordering::AcqRel) {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }
}

fn spawn_twin(
    ns: &Netns,
    dir: &TestDir,
    name: &str,
    exe: &Path,
    args: &[&str],
) -> Result<TwinProcess> {
    TwinProcess::spawn_program(ns, dir, name, exe, args, &[])
        .with_context(|| format!("starting the {name} (`twin {}`) in {}", args[0], ns.name()))
}

/// Waits for an event of `p` (recorded by `events`, from `since` on) that `pred` accepts,
/// checking for a termination signal meanwhile; fails at once if `p` exits.
fn wait_event(
    p: &mut TwinProcess,
    events: &Recorder,
    since: u64,
    what: &str,
    timeout: Duration,
    mut pred: impl FnMut(&Event) -> bool,
) -> Result<Event> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupt()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "no {what} from the {} within {timeout:?} (its events: {:?}); last output:\n{}",
                p.name(),
                events.names_since(since),
                p.tail(20)
            );
        }
        match events.wait(since, what, left.min(Duration::from_millis(200)), &mut pred) {
            Ok(e) => return Ok(e),
            Err(HarnessError::Timeout { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        p.ensure_running()?;
    }
}

/// Adds the last output of both processes to an error.
fn with_logs(
    step: &str,
    e: anyhow::Error,
    primary: &TwinProcess,
    backup: &TwinProcess,
) -> anyhow::Error {
    anyhow!(
        "{step}: {e:#}\nprimary's last output:\n{}backup's last output:\n{}",
        primary.tail(15),
        backup.tail(15)
    )
}

fn status(sock: &Path) -> Result<Value> {
    match control::request(sock, &Request::Status)? {
        Response::Ok(v) | Response::Accepted(v) => Ok(v),
        Response::Error(e) => bail!("{e}"),
    }
}

/// Fails if the backup has taken over although nobody killed the primary (both VMs would
/// then answer for the guest's address: nothing the demo measured would mean anything).
fn check_no_early_takeover(backup: &Recorder) -> Result<()> {
    backup.sync();
    match backup.find(0, took_over) {
        Some(e) => bail!(
            "the backup took over although the primary was not killed ({:?}); \
             nothing the demo would measure could be trusted",
            e.kind
        ),
        None => Ok(()),
    }
}

fn wait_protected(
    sock: &Path,
    primary: &mut TwinProcess,
    backup: &mut TwinProcess,
    backup_events: &Recorder,
) -> Result<()> {
    let deadline = Instant::now() + PROTECT_TIMEOUT;
    let mut last;
    loop {
        check_interrupt()?;
        primary.ensure_running()?;
        backup.ensure_running()?;
        check_no_early_takeover(backup_events)?;
        match status(sock) {
            Ok(v) if v["mode"] == "protected" => return Ok(()),
            Ok(v) if v["mode"] == "connecting" || v["mode"] == "syncing" => {
                last = format!("mode {}", v["mode"])
            }
            Ok(v) => bail!(
                "the primary lost its backup before protection was established: mode {}, last error {}",
                v["mode"],
                v["last_error"]
            ),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("the primary was not protected within {PROTECT_TIMEOUT:?} (last: {last})");
        }
        pause(Duration::from_millis(100))?;
    }
}

/// A line-protocol client on one TCP connection to the guest.
struct LineClient {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    local: SocketAddr,
    peer: SocketAddr,
}

impl LineClient {
    fn new(stream: TcpStream) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            local: stream.local_addr()?,
            peer: stream.peer_addr()?,
            stream,
        })
    }

    fn request(&mut self, line: &str) -> Result<String> {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .with_context(|| format!("sending `{line}`"))?;
        let mut reply = String::new();
        let n = self
            .reader
            .read_line(&mut reply)
            .with_context(|| format!("reading the reply to `{line}`"))?;
        if n == 0 {
            bail!("the connection was closed instead of answering `{line}`");
        }
        Ok(reply.trim_end_matches(['\r', '\n']).to_string())
    }
}

fn connect_client(ns: &Netns, addr: SocketAddr, primary: &mut TwinProcess) -> Result<LineClient> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last;
    loop {
        check_interrupt()?;
        primary.ensure_running()?;
        let attempt = ns
            .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
            .map_err(anyhow::Error::from)
            .and_then(|r| r.with_context(|| format!("connecting to {addr}")))
            .and_then(|s| LineClient::new(s).context("setting up the connection"))
            .and_then(|mut c| match c.request("PING")?.as_str() {
                "PONG" => Ok(c),
                other => bail!("PING answered {other:?}"),
            });
        match attempt {
            Ok(c) => return Ok(c),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("the guest service at {addr} did not answer within 60s (last: {last})");
        }
        pause(Duration::from_millis(200))?;
    }
}

/// One acknowledged `INCR`.
struct Sample {
    sent: Instant,
    replied: Instant,
    value: u64,
}

/// What the client thread did.
struct ClientRun {
    client: LineClient,
    samples: Vec<Sample>,
    /// Why the loop stopped early (the connection broke, a bad reply).
    error: Option<String>,
}

fn incr_loop(mut client: LineClient, end: &AtomicBool, replies: &AtomicU64) -> ClientRun {
    let mut samples = Vec::with_capacity(4096);
    let mut error = None;
    let line = format!("INCR {KEY}");
    while !end.load(Ordering::Acquire) {
        let sent = Instant::now();
        let reply = client.request(&line);
        let replied = Instant::now();
        match reply.and_then(|r| {
            r.parse::<u64>()
                .map_err(|_| anyhow!("`{line}` answered {r:?}, not a number"))
        }) {
            Ok(value) => {
                samples.push(Sample {
                    sent,
                    replied,
                    value,
                });
                replies.fetch_add(1, Ordering::AcqRel);
            }
            Err(e) => {
                if !end.load(Ordering::Acquire) {
                    error = Some(format!("{e:#}"));
                }
                break;
            }
        }
    }
    ClientRun {
        client,
        samples,
        error,
    }
}

/// Waits `d` while the client runs; returns early if the client thread stopped.
fn wait_client(d: Duration, worker: &std::thread::JoinHandle<ClientRun>) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end && !worker.is_finished() {
        pause(Duration::from_millis(20))?;
    }
    Ok(())
}

/// Follows a path of object keys to a number.
fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

fn fmt_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn fmt_ms_opt(ms: Option<f64>) -> String {
    ms.map_or_else(|| "n/a".into(), fmt_ms)
}

fn dur_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The value at quantile `q` of sorted `xs`.
fn quantile(xs: &[f64], q: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let i = ((xs.len() - 1) as f64 * q).round() as usize;
    Some(xs[i])
}

struct Report<'a> {
    args: &'a DemoArgs,
    before_status: &'a Value,
    failover: &'a Value,
    backup_status: Option<&'a Value>,
    run: &'a ClientRun,
    t_kill: Instant,
    t_dead: Instant,
    switch_moved: Option<Duration>,
    verify: Result<String>,
    final_get: Result<String>,
    /// `GET` of the key from a VM cold-booted on the backup's disk replica.
    cold_get: Result<String>,
}

/// Boots `twin run` on `disk` in the backup host and asks it for the key.
fn cold_boot_get(exe: &Path, topo: &Ha, dir: &TestDir, disk: &Path) -> Result<String> {
    let mut vm = spawn_twin(
        &topo.backup.ns,
        dir,
        "cold-boot",
        exe,
        &[
            "run",
            "--tap",
            TAP,
            "--ip",
            GUEST_CIDR,
            "--mem",
            "256M",
            "--disk",
            &disk.to_string_lossy(),
            "--console",
            &dir.join("cold-boot-console.txt").to_string_lossy(),
            "--control",
            &dir.join("cold-boot.sock").to_string_lossy(),
        ],
    )?;
    let got = connect_client(topo.client_ns(), guest_service(), &mut vm)
        .and_then(|mut c| c.request(&format!("GET {KEY}")));
    let _ = vm.terminate();
    let _ = vm.wait_exit(Duration::from_secs(10));
    got
}

/// Gaps and repeats in the sequence of acknowledged values.
#[derive(Default)]
struct Sequence {
    /// Acknowledged increments that a later reply shows forgotten (a repeat or step back).
    lost: u64,
    /// Increments applied without an acknowledgement of their own (a jump).
    extra: u64,
    /// The first few breaks, for the report.
    breaks: Vec<String>,
}

fn check_sequence(samples: &[Sample]) -> Sequence {
    let mut seq = Sequence::default();
    let mut prev = 0u64;
    for s in samples {
        if s.value != prev + 1 {
            if s.value <= prev {
                seq.lost += prev + 1 - s.value;
            } else {
                seq.extra += s.value - prev - 1;
            }
            if seq.breaks.len() < 5 {
                seq.breaks.push(format!("{prev} then {}", s.value));
            }
        }
        prev = s.value;
    }
    seq
}

fn row(label: &str, value: impl std::fmt::Display) {
    println!("  {label:<48} {value}");
}

/// Prints the report; returns whether every check passed.
fn report(r: &Report) -> bool {
    let samples = &r.run.samples;
    let before: Vec<&Sample> = samples.iter().filter(|s| s.replied <= r.t_kill).collect();
    let after: Vec<&Sample> = samples.iter().filter(|s| s.replied > r.t_kill).collect();
    // Replies read before the primary was gone may still be its own; the first one after
    // is the backup's.
    let first_from_backup = samples.iter().find(|s| s.replied > r.t_dead);
    let last_before = before.last();
    let first_after = after.first();
    let round_trips = |xs: &[&Sample]| {
        let mut v: Vec<f64> = xs.iter().map(|s| dur_ms(s.replied - s.sent)).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let rtt = round_trips(&before);
    // After the takeover the VM runs unprotected (no backup left): no output commit.
    let rtt_after = round_trips(after.get(1..).unwrap_or_default());
    let seq = check_sequence(samples);
    let last_acked = samples.last().map_or(0, |s| s.value);
    let st = r.before_status;

    println!("\n=== twin demo report ===\n");
    println!("protection before the kill (primary's status)");
    row("checkpoint interval", fmt_ms(dur_ms(r.args.interval.0)));
    row(
        "checkpoints / rate",
        format!(
            "{} / {:.1} per s",
            st["checkpoints"],
            num(st, &["checkpoint_rate_hz"]).unwrap_or(0.0)
        ),
    );
    row(
        "VM pause per checkpoint (median / p99)",
        format!(
            "{} / {}",
            fmt_ms_opt(num(st, &["pause_us", "median"]).map(|u| u / 1e3)),
            fmt_ms_opt(num(st, &["pause_us", "p99"]).map(|u| u / 1e3))
        ),
    );
    row(
        "dirty pages per epoch (median / p99)",
        format!(
            "{} / {}",
            st["dirty_pages"]["median"], st["dirty_pages"]["p99"]
        ),
    );
    row(
        "backup ack latency (median / p99)",
        format!(
            "{} / {}",
            fmt_ms_opt(num(st, &["ack_latency_us", "median"]).map(|u| u / 1e3)),
            fmt_ms_opt(num(st, &["ack_latency_us", "p99"]).map(|u| u / 1e3))
        ),
    );
    row(
        "client INCR round trip (median / p99)",
        format!(
            "{} / {}  (replies wait for the backup's ack)",
            fmt_ms_opt(quantile(&rtt, 0.5)),
            fmt_ms_opt(quantile(&rtt, 0.99))
        ),
    );

    println!("\nfailover (SIGKILL of the primary)");
    row(
        "backup: restore from replica",
        fmt_ms_opt(num(r.failover, &["restore_ms"])),
    );
    row(
        "backup: detected -> VM running",
        fmt_ms_opt(num(r.failover, &["detect_to_running_ms"])),
    );
    row(
        "backup: resumed from epoch",
        r.failover["epoch"].to_string(),
    );
    if let Some(b) = r.backup_status {
        row(
            "backup host now",
            format!(
                "{}, VM {}",
                b["role"].as_str().unwrap_or("?"),
                b["vm"].as_str().unwrap_or("?")
            ),
        );
        let a = &b["arbiter"];
        row(
            "arbiter: owner of the VM now",
            if a.is_null() {
                "no arbiter".to_string()
            } else {
                format!(
                    "{} (generation {}{})",
                    a["owner"].as_str().unwrap_or("?"),
                    a["generation"],
                    if a["owned_here"] == true {
                        ", this host"
                    } else {
                        ""
                    }
                )
            },
        );
    }
    row(
        "client: SIGKILL -> first reply from the backup",
        first_from_backup.map_or_else(
            || "none".to_string(),
            |s| fmt_ms(dur_ms(s.replied - r.t_kill)),
        ),
    );
    row(
        "client: gap between replies across the kill",
        match (last_before, first_after) {
            (Some(a), Some(b)) => fmt_ms(dur_ms(b.replied - a.replied)),
            _ => "n/a".into(),
        },
    );
    row(
        "LAN switch: guest's MAC on the backup's port",
        r.switch_moved.map_or_else(
            || "not seen".to_string(),
            |d| format!("{} after SIGKILL", fmt_ms(dur_ms(d))),
        ),
    );
    println!(
        "  (the client waits for TCP to resend what was in flight at the kill: after 200 ms\n   \
         at the earliest on Linux, doubling each time, once the switch knows the new port)"
    );

    println!(
        "\nclient: one TCP connection {} -> {}, INCR {KEY}",
        r.run.client.local, r.run.client.peer
    );
    row("requests acknowledged before the kill", before.len());
    row("requests acknowledged after the kill", after.len());
    row(
        "INCR round trip after the takeover (median)",
        format!(
            "{}  (unprotected: no backup left)",
            fmt_ms_opt(quantile(&rtt_after, 0.5))
        ),
    );
    row("acknowledged requests lost", seq.lost);
    row("requests applied twice", seq.extra);
    if !seq.breaks.is_empty() {
        row("breaks in the sequence", seq.breaks.join(", "));
    }
    let same_conn = r.run.error.is_none();
    row(
        "same TCP connection throughout",
        match &r.run.error {
            None => "yes".to_string(),
            Some(e) => format!("NO: {e}"),
        },
    );
    let get_ok = match &r.final_get {
        Ok(g) if g.parse::<u64>().ok() == Some(last_acked) => {
            row(
                "final GET = last acknowledged value",
                format!("{g} = {last_acked}"),
            );
            true
        }
        Ok(g) => {
            row(
                "final GET = last acknowledged value",
                format!("NO: GET {g}, last acknowledged {last_acked}"),
            );
            false
        }
        Err(e) => {
            row("final GET", format!("failed: {e:#}"));
            false
        }
    };
    let cold_ok = match &r.cold_get {
        Ok(g) if g.parse::<u64>().ok() == Some(last_acked) => {
            row(
                "cold boot of the backup's disk replica: GET",
                format!("{g} = {last_acked} (the disk holds every acknowledged INCR)"),
            );
            true
        }
        Ok(g) => {
            row(
                "cold boot of the backup's disk replica: GET",
                format!("NO: GET {g}, last acknowledged {last_acked}"),
            );
            false
        }
        Err(e) => {
            row(
                "cold boot of the backup's disk replica",
                format!("failed: {e:#}"),
            );
            false
        }
    };
    let verify_ok = match &r.verify {
        Ok(v) => {
            row("guest VERIFY (memory workload intact)", v);
            v.starts_with("OK")
        }
        Err(e) => {
            row("guest VERIFY", format!("failed: {e:#}"));
            false
        }
    };

    let mut problems = Vec::new();
    if seq.lost > 0 {
        problems.push(format!("{} acknowledged requests lost", seq.lost));
    }
    if seq.extra > 0 {
        problems.push(format!("{} requests applied twice", seq.extra));
    }
    if !same_conn {
        problems.push("the connection broke".to_string());
    }
    if before.is_empty() || after.is_empty() {
        problems.push("no requests answered before or after the kill".to_string());
    }
    if !get_ok {
        problems.push("final GET differs from the last acknowledged value".to_string());
    }
    if !verify_ok {
        problems.push("guest VERIFY failed".to_string());
    }
    if !cold_ok {
        problems.push("the backup's disk replica lacks acknowledged INCRs".to_string());
    }
    println!();
    if problems.is_empty() {
        println!("RESULT: PASS: the VM survived the SIGKILL of its host; no acknowledged request lost, same TCP connection");
    } else {
        println!("RESULT: FAIL: {}", problems.join("; "));
    }
    println!();
    problems.is_empty()
}
