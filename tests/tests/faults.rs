//! Fault injection: a protected VM (`twin protect` on the primary host, `twin backup` on the
//! backup host, the `ha` layout) serving a client that INCRs one counter over one TCP
//! connection, while something breaks — a host process killed at a given protocol step
//! (failpoints), the replication link cut, slowed or corrupted (nftables, tbf, and the
//! frame-rewriting proxy of `twin_tests::proxy`), a disk filling up under a snapshot, the TAP
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
//!   logged as committed by the backup;
//! - **the survivor serves** (more INCRs after the fault);
//! - **nothing panics** (no `panicked` in any process's stderr).
//!
//! What must happen where the invariants cannot hold (documented limits, asserted as such):
//! - primary killed **during the initial sync**: no checkpoint was ever committed, so the
//!   backup must not take over (it says "no committed checkpoint" and keeps waiting); the VM
//!   and everything the client saw (acknowledged unprotected) are gone;
//! - backup killed **during its failover restore** (after the primary died): nothing runs
//!   the VM; the backup's log shows a failover that started and never completed, the client
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

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use twin_tests::proxy::{frame_type, Fault, FaultKind, FrameProxy, Injection, Way};
use twin_tests::*;

/// Guest boot and service start-up under software KVM on a busy 2-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// From the backup's start to the primary's first acknowledged checkpoint.
const PROTECT_TIMEOUT: Duration = Duration::from_secs(90);
/// For a failpoint with `N*kill` to fire once protected.
const DEATH_TIMEOUT: Duration = Duration::from_secs(60);
/// From a fault to the backup's `FAILOVER` line.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// For the client stream to make progress.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-request limit of the workload while a failover must be ridden out.
const RIDE_THROUGH: Duration = Duration::from_secs(30);
/// Replies that prove a side serves (after a fault, or under protection).
const PROOF_REPLIES: u64 = 20;

const REPL_PORT: u16 = 7300;
const PROXY_PORT: u16 = 7301;
const GUEST_ARGS: &str = "dirty=16M/s,wss=64M";
const GUEST_MAC: &str = "52:54:00:12:34:56";
const KEY: &str = "ctr";

fn backup_listen() -> String {
    format!("{BACKUP_REPL_ADDR}:{REPL_PORT}")
}

// =============================================================================================
// The table.

fn rows_file() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("faults-{}.tsv", std::process::id()))
}

/// One scenario's row. Written on drop: a scenario that panics is recorded as failed at the
/// step it had reached.
struct Report {
    scenario: &'static str,
    step: String,
    started: Instant,
    outcome: Option<String>,
    recover: Option<Duration>,
    lost: Option<String>,
    notes: Vec<String>,
}

impl Report {
    fn new(scenario: &'static str) -> Self {
        require_kvm();
        eprintln!("=== {scenario}");
        Report {
            scenario,
            step: "setting up".into(),
            started: Instant::now(),
            outcome: None,
            recover: None,
            lost: None,
            notes: Vec::new(),
        }
    }

    fn step(&mut self, s: impl Into<String>) {
        self.step = s.into();
        eprintln!(
            "[{} +{:.1}s] {}",
            self.scenario,
            self.started.elapsed().as_secs_f64(),
            self.step
        );
    }

    fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        eprintln!("[{}] note: {s}", self.scenario);
        self.notes.push(s);
    }

    fn done(&mut self, outcome: impl Into<String>) {
        self.outcome = Some(outcome.into());
    }
}

fn clean(s: &str) -> String {
    s.replace(['\t', '\n'], " ")
}

/// A log line without its timestamp: `2026-…Z  WARN message` → `WARN message`.
fn log_msg(line: &str) -> String {
    let l = line.trim();
    match l.split_once("Z ") {
        Some((ts, rest)) if ts.len() >= 19 && ts.as_bytes()[4] == b'-' => rest.trim().to_string(),
        _ => l.to_string(),
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        let outcome = match (&self.outcome, std::thread::panicking()) {
            (_, true) => format!("FAILED at: {}", self.step),
            (Some(o), false) => o.clone(),
            (None, false) => "finished without an outcome".into(),
        };
        let recover = self
            .recover
            .map_or("-".to_string(), |d| format!("{:.2}s", d.as_secs_f64()));
        let lost = self.lost.clone().unwrap_or_else(|| "-".into());
        let notes = self.notes.join("; ");
        eprintln!(
            "ROW | {} | {} | {} | {} | {}",
            self.scenario, outcome, recover, lost, notes
        );
        let line = format!(
            "{}\t{}\t{}\t{}\t{}\n",
            self.scenario,
            clean(&outcome),
            recover,
            clean(&lost),
            clean(&notes)
        );
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(rows_file())
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

// =============================================================================================
// The client workload: one connection, INCR after INCR, every reply checked.

#[derive(Debug, Clone, Default)]
struct Progress {
    /// The last value the guest acknowledged.
    last: u64,
    /// Reply times, in order.
    replies: Vec<Instant>,
    /// Replies that were not previous + 1.
    anomalies: Vec<String>,
    /// Values skipped (acknowledged, then forgotten).
    lost: u64,
    /// Values answered again (a reply the survivor redid).
    repeats: u64,
    /// Why the stream ended, if it broke.
    error: Option<String>,
}

impl Progress {
    fn replies_after(&self, t: Instant) -> u64 {
        self.replies.iter().rev().take_while(|&&r| r > t).count() as u64
    }

    /// The longest silence between consecutive replies, counting only gaps that end after
    /// `from`.
    fn max_gap_after(&self, from: Instant) -> Option<Duration> {
        self.replies
            .windows(2)
            .filter(|w| w[1] > from)
            .map(|w| w[1] - w[0])
            .max()
    }

    /// Replies received within [a, b).
    fn replies_between(&self, a: Instant, b: Instant) -> u64 {
        self.replies.iter().filter(|&&r| r >= a && r < b).count() as u64
    }
}

struct Workload {
    stop: Arc<AtomicBool>,
    progress: Arc<Mutex<Progress>>,
    handle: Option<JoinHandle<GuestClient>>,
}

impl Workload {
    fn start(mut client: GuestClient, request_timeout: Duration) -> Self {
        client
            .set_request_timeout(request_timeout)
            .expect("set the workload's request timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Mutex::new(Progress::default()));
        let (stop2, prog2) = (stop.clone(), progress.clone());
        let handle = std::thread::Builder::new()
            .name("workload".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    let r = client.incr(KEY);
                    let now = Instant::now();
                    let mut p = prog2.lock().unwrap_or_else(|e| e.into_inner());
                    match r {
                        Ok(v) => {
                            let want = p.last + 1;
                            if v != want {
                                let n = p.replies.len() + 1;
                                p.anomalies
                                    .push(format!("reply #{n}: got {v}, expected {want}"));
                                if v > want {
                                    p.lost += v - want;
                                } else {
                                    p.repeats += want - v;
                                }
                            }
                            p.last = v;
                            p.replies.push(now);
                        }
                        Err(e) => {
                            p.error = Some(e.to_string());
                            break;
                        }
                    }
                }
                client
            })
            .expect("spawn the workload thread");
        Workload {
            stop,
            progress,
            handle: Some(handle),
        }
    }

    fn snapshot(&self) -> Progress {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `n` replies arrived after `t`; fails at once if the stream broke.
    fn wait_replies_after(&self, t: Instant, n: u64, timeout: Duration) -> Result<()> {
        wait_until(&format!("{n} INCR replies"), timeout, || {
            let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = &p.error {
                return Err(HarnessError::InvalidArgument(format!(
                    "the client stream broke after {} replies (last value {}): {e}",
                    p.replies.len(),
                    p.last
                )));
            }
            Ok(p.replies_after(t) >= n)
        })
    }

    /// Waits until the stream has broken (for scenarios where nothing survives).
    fn wait_broken(&self, timeout: Duration) -> Option<String> {
        let _ = wait_until("the client stream to break", timeout, || {
            Ok(self.snapshot().error.is_some())
        });
        self.snapshot().error
    }

    /// Stops after the request in flight; the client back (if the thread ended in time).
    fn finish(mut self, timeout: Duration) -> (Progress, Option<GuestClient>) {
        self.stop.store(true, Ordering::Release);
        let handle = self.handle.take().expect("finished once");
        let deadline = Instant::now() + timeout;
        while !handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let client = if handle.is_finished() {
            handle.join().ok()
        } else {
            None
        };
        (self.snapshot(), client)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // A blocked request ends with its timeout or the namespace; do not wait for it.
    }
}

/// Checks the client-visible invariants on a finished stream and records outputs lost.
fn check_stream(rep: &mut Report, p: &Progress, client: Option<GuestClient>, survivor: &str) {
    rep.step(format!("checking the client stream on the {survivor}"));
    rep.lost = Some(format!("{} (repeats {})", p.lost, p.repeats));
    assert!(
        p.error.is_none(),
        "the client's connection broke after {} replies (last acknowledged {}): {:?}",
        p.replies.len(),
        p.last,
        p.error
    );
    assert!(
        p.anomalies.is_empty(),
        "acknowledged output lost or repeated ({} lost, {} repeated): {:?}",
        p.lost,
        p.repeats,
        p.anomalies
    );
    let mut client = client.expect("the workload thread returned its client");
    client
        .set_request_timeout(RIDE_THROUGH)
        .expect("request timeout");
    let got = client.get(KEY).expect("final GET on the same connection");
    assert_eq!(
        got, p.last,
        "final GET {got} differs from the last acknowledged value {}",
        p.last
    );
    rep.step(format!("VERIFY on the {survivor}"));
    match client.verify().expect("VERIFY") {
        Verify::Ok { pages, writes } => {
            eprintln!("VERIFY OK on the {survivor}: pages={pages} writes={writes}")
        }
        Verify::Fail(why) => panic!(
            "VERIFY failed on the {survivor}: its memory is inconsistent (a partial checkpoint \
             applied?): {why}"
        ),
    }
}

// =============================================================================================
// The rig: ha layout, primary (+ proxy) + backup, client workload.

#[derive(Clone)]
struct Opts {
    primary_failpoints: String,
    backup_failpoints: String,
    /// `--on-backup-loss`.
    policy: &'static str,
    proxy: bool,
    /// Armed in the proxy before the backup starts.
    initial_fault: Option<Fault>,
    guest_args: &'static str,
    request_timeout: Duration,
    /// Wait for the first acknowledged checkpoint in `start`.
    wait_protected: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            primary_failpoints: String::new(),
            backup_failpoints: String::new(),
            policy: "release",
            proxy: false,
            initial_fault: None,
            guest_args: GUEST_ARGS,
            request_timeout: RIDE_THROUGH,
            wait_protected: true,
        }
    }
}

struct Rig {
    // Dropped first: the client, then the proxy, then the processes; the topology last.
    work: Option<Workload>,
    proxy: Option<FrameProxy>,
    primary: TwinProcess,
    backup: Option<TwinProcess>,
    /// Processes that ended (a replaced backup), kept for the panic check.
    retired: Vec<TwinProcess>,
    opts: Opts,
    /// When the backup was started (protection began after this).
    backup_started: Instant,
    dir: TestDir,
    ha: Ha,
}

fn spawn_twin(
    ns: &Netns,
    dir: &TestDir,
    name: &str,
    args: &[&str],
    failpoints: &str,
) -> TwinProcess {
    let log = "info,twin_backup=debug";
    let mut env = vec![("TWIN_LOG", log)];
    if !failpoints.is_empty() {
        env.push(("TWIN_FAILPOINTS", failpoints));
    }
    let bin = twin_bin().expect("twin binary (build it or set TWIN_BIN)");
    TwinProcess::spawn_program(ns, dir, name, &bin, args, &env)
        .unwrap_or_else(|e| panic!("spawning {name}: {e}"))
}

/// `twin status --json` of the process behind `sock`, run in `ns`.
fn status(
    ns: &Netns,
    dir: &TestDir,
    sock: &Path,
) -> std::result::Result<serde_json::Value, String> {
    twin_status(ns, dir, sock, Duration::from_secs(20))
}

/// Whether `p` logged that failpoint `name` fired.
fn fired(p: &TwinProcess, name: &str) -> bool {
    p.text(Stream::Stderr)
        .lines()
        .any(|l| l.contains("failpoint fired") && l.contains(name))
}

fn killed_by_sigkill(s: std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    s.signal() == Some(9)
}

impl Rig {
    /// Starts the primary and the client stream, then the backup (so that failpoint hit
    /// counts and proxy faults start with protection, while the client already runs). With
    /// `--on-backup-loss hold` the primary lets nothing out until a backup acknowledges, so
    /// there the backup (and proxy) start first.
    fn start(rep: &mut Report, opts: Opts) -> Rig {
        rep.step("building the ha layout");
        let ha = Topology::ha().expect("ha topology");
        let dir = TestDir::new(rep.scenario).expect("test dir");
        let target = if opts.proxy {
            format!("127.0.0.1:{PROXY_PORT}")
        } else {
            backup_listen()
        };
        let backup_first = opts.policy == "hold";
        rep.step(if backup_first {
            "starting the primary (its backup comes first: policy hold)"
        } else {
            "starting the primary (no backup yet: it runs unprotected until one answers)"
        });
        let psock = dir.join("primary.sock").to_string_lossy().into_owned();
        let pcons = dir.join("primary.console").to_string_lossy().into_owned();
        let primary = spawn_twin(
            &ha.primary.ns,
            &dir,
            "primary",
            &[
                "protect",
                "--backup",
                &target,
                "--tap",
                TAP,
                "--ip",
                GUEST_CIDR,
                "--mem",
                "256M",
                "--guest-args",
                opts.guest_args,
                "--on-backup-loss",
                opts.policy,
                "--control",
                &psock,
                "--console",
                &pcons,
            ],
            &opts.primary_failpoints,
        );
        let mut rig = Rig {
            work: None,
            proxy: None,
            primary,
            backup: None,
            retired: Vec::new(),
            opts,
            backup_started: Instant::now(),
            dir,
            ha,
        };
        let mark = rig.primary.mark();
        if backup_first {
            rig.start_proxy_and_backup(rep);
        }
        rep.step("waiting for the guest service");
        let client = {
            let primary = &mut rig.primary;
            GuestClient::connect_retry(rig.ha.client_ns(), guest_service(), BOOT_TIMEOUT, || {
                primary.ensure_running()
            })
            .expect("the guest service comes up")
        };
        let t0 = Instant::now();
        let work = Workload::start(client, rig.opts.request_timeout);
        work.wait_replies_after(t0, 5, PROGRESS_TIMEOUT)
            .expect("the client stream runs");
        rig.work = Some(work);
        if !backup_first {
            rig.start_proxy_and_backup(rep);
        }
        if rig.opts.wait_protected {
            rep.step("waiting for the first acknowledged checkpoint");
            rig.primary
                .wait_for_line_after(mark, "VM is protected", PROTECT_TIMEOUT)
                .expect("the primary becomes protected");
        }
        rig
    }

    fn start_proxy_and_backup(&mut self, rep: &mut Report) {
        if self.opts.proxy {
            let p = FrameProxy::start(
                &self.ha.primary.ns,
                format!("127.0.0.1:{PROXY_PORT}").parse().expect("addr"),
                backup_listen().parse().expect("addr"),
            )
            .expect("start the proxy");
            if let Some(f) = self.opts.initial_fault {
                p.arm(f);
            }
            self.proxy = Some(p);
        }
        rep.step("starting the backup");
        self.spawn_backup("backup");
    }

    fn spawn_backup(&mut self, name: &str) {
        let bsock = self
            .dir
            .join(format!("{name}.sock"))
            .to_string_lossy()
            .into_owned();
        let bcons = self
            .dir
            .join(format!("{name}.console"))
            .to_string_lossy()
            .into_owned();
        let listen = backup_listen();
        let mut b = spawn_twin(
            &self.ha.backup.ns,
            &self.dir,
            name,
            &[
                "backup",
                "--listen",
                &listen,
                "--tap",
                TAP,
                "--control",
                &bsock,
                "--console",
                &bcons,
            ],
            &self.opts.backup_failpoints,
        );
        b.wait_for_line("waiting for a primary", Duration::from_secs(30))
            .expect("the backup listens");
        if let Some(old) = self.backup.replace(b) {
            self.retired.push(old);
        }
        self.backup_started = Instant::now();
    }

    fn backup(&mut self) -> &mut TwinProcess {
        self.backup.as_mut().expect("a backup was started")
    }

    fn work(&self) -> &Workload {
        self.work.as_ref().expect("the workload runs")
    }

    fn finish_work(&mut self) -> (Progress, Option<GuestClient>) {
        self.work
            .take()
            .expect("the workload runs")
            .finish(RIDE_THROUGH + Duration::from_secs(5))
    }

    fn primary_status(&self) -> std::result::Result<serde_json::Value, String> {
        status(
            &self.ha.primary.ns,
            &self.dir,
            &self.dir.join("primary.sock"),
        )
    }

    fn backup_status(&self) -> std::result::Result<serde_json::Value, String> {
        let name = self
            .backup
            .as_ref()
            .map_or("backup", |b| b.name())
            .to_string();
        status(
            &self.ha.backup.ns,
            &self.dir,
            &self.dir.join(format!("{name}.sock")),
        )
    }

    fn proxy(&self) -> &FrameProxy {
        self.proxy.as_ref().expect("this rig has a proxy")
    }

    fn assert_no_panics(&self) {
        assert_no_panic(&self.primary);
        if let Some(b) = &self.backup {
            assert_no_panic(b);
        }
        for p in &self.retired {
            assert_no_panic(p);
        }
    }

    /// Panics if a backup took over before the test injected its fault: a live primary
    /// judged dead (a stall beyond `--heartbeat-timeout`, e.g. on a loaded machine). The
    /// scenario would then test something else; say so instead of failing obscurely later.
    fn assert_no_takeover_yet(&self) {
        for b in self.backup.iter().chain(self.retired.iter()) {
            if let Some(l) = b
                .text(Stream::Stderr)
                .lines()
                .find(|l| l.contains("taking over"))
            {
                panic!(
                    "SPURIOUS TAKEOVER before the fault was injected: {} judged the live \
                     primary dead: {} (primary: {:?})",
                    b.name(),
                    log_msg(l),
                    self.primary
                        .text(Stream::Stderr)
                        .lines()
                        .find(|l| l.contains("fenced") || l.contains("backup lost"))
                        .map(log_msg)
                );
            }
        }
    }

    /// Waits for the backup's `FAILOVER {json}` line; returns the JSON.
    fn wait_failover(&mut self, rep: &mut Report) -> serde_json::Value {
        rep.step("waiting for the backup to take over");
        let line = self
            .backup()
            .wait_for_line("FAILOVER ", FAILOVER_TIMEOUT)
            .expect("the backup takes over");
        let json = line.split_once("FAILOVER ").expect("prefix").1;
        serde_json::from_str(json).unwrap_or_else(|e| panic!("FAILOVER line {line:?}: {e}"))
    }

    /// Whether the backup logged epoch `e` as committed (needs its debug log).
    fn backup_committed(&self, e: u64) -> bool {
        let pat = format!("epoch={e} ");
        self.backup.iter().chain(self.retired.iter()).any(|b| {
            b.text(Stream::Stderr)
                .lines()
                .any(|l| l.contains("epoch committed") && l.contains(&pat))
        })
    }
}

// =============================================================================================
// Primary killed.

/// The primary dies (SIGKILL from failpoint `point`, on its `nth` hit once protected): the
/// backup takes over from its last committed checkpoint, the client's connection survives
/// with no reply lost or repeated, and VERIFY passes on the backup.
fn primary_killed_at(rep: &mut Report, point: &str, nth: u64) {
    let mut rig = Rig::start(
        rep,
        Opts {
            primary_failpoints: format!("{point}={nth}*kill"),
            ..Opts::default()
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
    let err = rig.primary.text(Stream::Stderr);
    let protected_at = err.find("VM is protected");
    let fired_at = err.find("failpoint fired");
    assert!(
        protected_at.is_some() && protected_at < fired_at,
        "the failpoint fired before the VM was ever protected: the scenario tested nothing"
    );
    let fo = rig.wait_failover(rep);
    let epoch = fo["epoch"].as_u64().expect("FAILOVER names the epoch");
    rep.step("waiting for the client stream to resume on the backup");
    rig.work()
        .wait_replies_after(died, PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("the client stream resumes on the backup");
    let (p, client) = rig.finish_work();
    rep.recover = p.max_gap_after(died - Duration::from_secs(1));
    check_stream(rep, &p, client, "backup");
    rig.assert_no_panics();
    rep.done(format!(
        "backup took over at epoch {epoch} (restore {:.1} ms, detect→running {:.1} ms); stream intact",
        fo["restore_ms"].as_f64().unwrap_or(f64::NAN),
        fo["detect_to_running_ms"].as_f64().unwrap_or(f64::NAN)
    ));
}

#[test]
fn primary_killed_before_pause() {
    let mut rep = Report::new("primary_killed_before_pause");
    primary_killed_at(&mut rep, "primary.before_pause", 200);
}

#[test]
fn primary_killed_during_page_collection() {
    let mut rep = Report::new("primary_killed_during_page_collection");
    primary_killed_at(&mut rep, "primary.collect", 200);
}

#[test]
fn primary_killed_mid_stream() {
    let mut rep = Report::new("primary_killed_mid_stream");
    primary_killed_at(&mut rep, "primary.mid_stream", 200);
}

#[test]
fn primary_killed_after_send_before_ack() {
    let mut rep = Report::new("primary_killed_after_send_before_ack");
    primary_killed_at(&mut rep, "primary.after_send", 200);
}

#[test]
fn primary_killed_after_ack_before_release() {
    let mut rep = Report::new("primary_killed_after_ack_before_release");
    primary_killed_at(&mut rep, "primary.after_ack", 200);
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
    assert!(
        !rig.primary.text(Stream::Stderr).contains("VM is protected"),
        "the primary was protected before the sync failpoint fired"
    );
    rep.step("checking the backup refuses to take over without a committed checkpoint");
    rig.backup()
        .wait_for_line("no committed checkpoint", Duration::from_secs(20))
        .expect("the backup says it has no committed checkpoint to take over from");
    std::thread::sleep(Duration::from_secs(3));
    rig.backup()
        .ensure_running()
        .expect("the backup keeps running, waiting for a primary");
    assert!(
        !rig.backup().text(Stream::Stdout).contains("FAILOVER"),
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
    let mut rig = Rig::start(
        rep,
        Opts {
            backup_failpoints: format!("{point}={nth}*kill"),
            wait_protected: false,
            ..Opts::default()
        },
    );
    let mark = rig.primary.mark();
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
        rig.primary.text(Stream::Stderr).contains("VM is protected"),
        "the backup died before the VM was ever protected: the scenario tested nothing"
    );
    rep.step("waiting for the primary to report the lost backup");
    rig.primary
        .wait_for_line_after(mark, "backup lost", Duration::from_secs(20))
        .expect("the primary reports the backup lost");
    rig.work()
        .wait_replies_after(died, PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("the primary keeps serving");
    let st = rig.primary_status().expect("primary status");
    assert_eq!(st["mode"], "unprotected", "primary status: {st}");
    let (p, client) = rig.finish_work();
    rep.recover = p.max_gap_after(died - Duration::from_secs(1));
    check_stream(rep, &p, client, "primary");
    rig.assert_no_panics();
    rep.done(format!(
        "primary runs unprotected, stream intact (last_error: {})",
        st["last_error"].as_str().unwrap_or("-")
    ));
}

#[test]
fn backup_killed_mid_receive() {
    let mut rep = Report::new("backup_killed_mid_receive");
    backup_killed_at(&mut rep, "backup.mid_receive", 200);
}

#[test]
fn backup_killed_mid_apply() {
    let mut rep = Report::new("backup_killed_mid_apply");
    backup_killed_at(&mut rep, "backup.mid_apply", 200);
}

/// The primary dies, then the backup dies while restoring: nothing runs the VM. Known
/// limit (no third copy). What must hold: the backup's log shows the failover started and
/// never completed, it exits by the signal (no panic, no FAILOVER line), and the client sees
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
    rig.work()
        .wait_replies_after(Instant::now(), PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("protected stream");
    rep.step("killing the primary");
    rig.assert_no_takeover_yet();
    rig.primary.kill().expect("SIGKILL the primary");
    rep.step("waiting for the backup to die in its restore");
    let status = rig
        .backup()
        .wait_exit(FAILOVER_TIMEOUT)
        .expect("backup.restore=kill kills the backup during the failover");
    assert!(killed_by_sigkill(status) && fired(rig.backup(), "backup.restore"));
    let err = rig.backup().text(Stream::Stderr);
    assert!(
        err.contains("failover: restoring"),
        "the backup's log does not show the failover starting:\n{}",
        rig.backup().tail(20)
    );
    assert!(!err.contains("failover complete"));
    assert!(!rig.backup().text(Stream::Stdout).contains("FAILOVER"));
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
    rep.done("nothing survives: backup log shows failover started, never completed — known limit");
}

/// The backup dies (SIGKILL) and a new one starts: the primary resynchronises it and is
/// protected again — proven by then killing the primary and failing over to the new backup
/// with the stream intact.
#[test]
fn backup_restarted_resyncs() {
    let mut rep = Report::new("backup_restarted_resyncs");
    let mut rig = Rig::start(&mut rep, Opts::default());
    rig.work()
        .wait_replies_after(Instant::now(), PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("protected stream");
    let mark = rig.primary.mark();
    rep.step("killing the backup");
    rig.assert_no_takeover_yet();
    rig.backup().kill().expect("SIGKILL the backup");
    let killed = Instant::now();
    rig.primary
        .wait_for_line_after(mark, "backup lost", Duration::from_secs(20))
        .expect("the primary reports the backup lost");
    rig.work()
        .wait_replies_after(killed, 10, PROGRESS_TIMEOUT)
        .expect("the primary serves unprotected");
    rep.step("starting a new backup");
    let mark = rig.primary.mark();
    let restarted = Instant::now();
    rig.spawn_backup("backup2");
    rig.primary
        .wait_for_line_after(mark, "VM is protected", PROTECT_TIMEOUT)
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
    rig.work()
        .wait_replies_after(Instant::now(), PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("protected stream with the new backup");
    rep.step("killing the primary to prove the new backup holds a good image");
    rig.assert_no_takeover_yet();
    rig.primary.kill().expect("SIGKILL the primary");
    let died = Instant::now();
    let fo = rig.wait_failover(&mut rep);
    rig.work()
        .wait_replies_after(died, PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("the stream resumes on the new backup");
    let (p, client) = rig.finish_work();
    rep.recover = p.max_gap_after(died - Duration::from_secs(1));
    check_stream(&mut rep, &p, client, "new backup");
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
    rig.work()
        .wait_replies_after(Instant::now(), PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("protected stream");
    let pmark = rig.primary.mark();
    let bmark = rig.backup().mark();
    rep.step("freezing the backup (SIGSTOP) for 2 s");
    rig.assert_no_takeover_yet();
    rig.backup()
        .signal(Signal::Stop)
        .expect("SIGSTOP the backup");
    let frozen = Instant::now();
    rig.primary
        .wait_for_line_after(pmark, "backup lost", Duration::from_secs(20))
        .expect("the primary gives up on the frozen backup");
    std::thread::sleep(Duration::from_secs(2).saturating_sub(frozen.elapsed()));
    rig.backup()
        .signal(Signal::Cont)
        .expect("SIGCONT the backup");
    rep.step("thawed; waiting for the primary to resynchronise the backup");
    rig.primary
        .wait_for_line_after(pmark, "VM is protected", PROTECT_TIMEOUT)
        .expect("the primary resynchronises the thawed backup and is protected again");
    let (_, said) = rig
        .backup()
        .wait_for(
            bmark,
            "the backup's view of the lost session",
            Duration::from_secs(5),
            |l| l.contains("primary connected"),
        )
        .expect("the primary reconnected to the thawed backup");
    rep.note(format!("backup: {}", log_msg(&said)));
    // Past the backup's grace for an ambiguous EOF: a takeover would have happened by now.
    std::thread::sleep(Duration::from_secs(4));
    rig.backup().ensure_running().expect("the backup stays up");
    assert!(
        !rig.backup().text(Stream::Stdout).contains("FAILOVER"),
        "SPLIT BRAIN: the thawed backup took over while the primary runs"
    );
    rig.assert_no_takeover_yet();
    let st = rig.primary_status().expect("primary status");
    assert_eq!(st["mode"], "protected", "{st}");
    let why = rig
        .backup()
        .text(Stream::Stderr)
        .lines()
        .find(|l| l.contains("stalled") || l.contains("said goodbye"))
        .map(log_msg)
        .unwrap_or_else(|| "nothing".into());
    rep.note(format!("how the backup saw the session end: {why}"));
    rig.work()
        .wait_replies_after(Instant::now(), PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("protected stream after the resync");
    rep.step("killing the primary to prove the resynchronised replica");
    rig.primary.kill().expect("SIGKILL the primary");
    let died = Instant::now();
    let fo = rig.wait_failover(&mut rep);
    rig.work()
        .wait_replies_after(died, PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("the stream resumes on the backup");
    let (p, client) = rig.finish_work();
    rep.recover = p.max_gap_after(died - Duration::from_secs(1));
    check_stream(&mut rep, &p, client, "backup");
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
    rig.work()
        .wait_replies_after(Instant::now(), PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("protected stream");
    let mark = rig.primary.mark();
    rep.step(format!("cutting the replication link: {cut:?}"));
    rig.assert_no_takeover_yet();
    let cut_at = Instant::now();
    rig.ha.cut_replication(cut).expect("cut");
    let fo = rig.wait_failover(rep);
    rep.step("waiting for the primary to hold its output or stand down");
    let (_, said) = rig
        .primary
        .wait_for(
            mark,
            "the primary holding its output or standing down",
            Duration::from_secs(20),
            |l| l.contains("holding all output") || l.contains("fenced"),
        )
        .expect("the primary reports the lost backup (holding output) or stands down");
    let fenced = said.contains("fenced");
    rig.work()
        .wait_replies_after(cut_at, PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("the stream resumes on the backup");
    let (p, client) = rig.finish_work();
    rep.recover = p.max_gap_after(cut_at - Duration::from_secs(1));
    check_stream(rep, &p, client, "backup");
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

#[test]
fn link_down_both_ways() {
    let mut rep = Report::new("link_down_both_ways");
    link_cut(&mut rep, Cut::LinkDown);
}

#[test]
fn link_drop_both_ways() {
    let mut rep = Report::new("link_drop_both_ways");
    link_cut(&mut rep, Cut::Drop(Direction::Both));
}

#[test]
fn link_drop_primary_to_backup() {
    let mut rep = Report::new("link_drop_primary_to_backup");
    link_cut(&mut rep, Cut::Drop(Direction::PrimaryToBackup));
}

#[test]
fn link_drop_backup_to_primary() {
    let mut rep = Report::new("link_drop_backup_to_primary");
    link_cut(&mut rep, Cut::Drop(Direction::BackupToPrimary));
}

/// The replication link is slowed below what the checkpoints need: the primary stretches
/// epochs (backpressure) and reports it, output is released later but still in order and
/// complete, nobody fails over.
#[test]
fn link_slowed_backup_lags() {
    let mut rep = Report::new("link_slowed_backup_lags");
    let mut rig = Rig::start(
        &mut rep,
        Opts {
            guest_args: "dirty=4M/s,wss=64M",
            ..Opts::default()
        },
    );
    let t0 = Instant::now();
    rig.work()
        .wait_replies_after(t0, PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("protected stream");
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
        !rig.backup().text(Stream::Stdout).contains("FAILOVER"),
        "the backup took over on a slow link"
    );
    rep.step("removing the limit");
    rig.ha.unslow_replication().expect("unslow");
    rig.work()
        .wait_replies_after(Instant::now(), PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("stream after the link recovers");
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
    rig.work()
        .wait_replies_after(Instant::now(), PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("protected stream");
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
    rig.work()
        .wait_replies_after(disarmed, PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("output flows again once acks pass");
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
    assert!(
        !rig.backup().text(Stream::Stdout).contains("FAILOVER"),
        "the backup took over"
    );
    let (p, client) = rig.finish_work();
    rep.recover = p.max_gap_after(armed);
    check_stream(&mut rep, &p, client, "primary");
    rig.assert_no_panics();
    rep.done("no output released while acks were withheld; released on the next ack");
}

// =============================================================================================
// Bad frames on the replication stream (the proxy).

/// What happened to the session after a bad frame.
fn expect_resync(
    rep: &mut Report,
    rig: &mut Rig,
    injected: &[Injection],
    bmark: Mark,
    pmark: Mark,
) {
    let inj = injected.first().expect("an injection");
    rep.step("waiting for the backup to reject the stream");
    let (_, why) = rig
        .backup()
        .wait_for(
            bmark,
            "the backup rejecting the stream",
            Duration::from_secs(20),
            |l| {
                l.contains("detached")
                    || l.contains("rejected epoch")
                    || l.contains("corrupt")
                    || l.contains("taking over")
                    || l.starts_with("FAILOVER")
            },
        )
        .expect("the backup rejects the bad stream");
    rep.note(format!("backup: {}", log_msg(&why)));
    if why.contains("taking over") || why.starts_with("FAILOVER") {
        let said = rig
            .primary
            .wait_for_line_after(pmark, "backup lost", Duration::from_secs(5))
            .map(|(_, l)| log_msg(&l))
            .unwrap_or_else(|e| format!("nothing ({e})"));
        let primary_alive = rig.primary.ensure_running().is_ok();
        panic!(
            "SPLIT BRAIN: after {:?} on a {} frame ({:?}) the backup took over ({}) while the \
             primary is alive ({primary_alive}) and says: {said}",
            inj.kind,
            frame_type::name(inj.frame_type),
            inj.way,
            log_msg(&why),
        );
    }
    rep.step("waiting for the primary to reconnect, resync and be protected again");
    rig.primary
        .wait_for_line_after(pmark, "VM is protected", PROTECT_TIMEOUT)
        .expect("the primary resynchronises and is protected again");
    rig.backup().ensure_running().expect("the backup stays up");
    assert!(
        !rig.backup().text(Stream::Stdout).contains("FAILOVER"),
        "the backup took over after a bad frame from a live primary (split brain)"
    );
    // Only an epoch's own frames, on their way to the backup, make that epoch bad; a
    // corrupted Ack (to the primary) is about an epoch the backup rightly committed.
    if let (Some(e), Way::ToBackup) = (inj.epoch, inj.way) {
        // Give the backup's log a moment, then make sure the bad epoch never committed.
        std::thread::sleep(Duration::from_millis(500));
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
    let mut rig = Rig::start(
        rep,
        Opts {
            proxy: true,
            ..Opts::default()
        },
    );
    let t = Instant::now();
    rig.work()
        .wait_replies_after(t, PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("protected stream");
    let (bmark, pmark) = (rig.backup().mark(), rig.primary.mark());
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
    rig.work()
        .wait_replies_after(Instant::now(), PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("protected stream after the resync");
    rep.step("killing the primary to prove the resynchronised replica");
    rig.assert_no_takeover_yet();
    rig.primary.kill().expect("SIGKILL the primary");
    let died = Instant::now();
    let fo = rig.wait_failover(rep);
    rig.work()
        .wait_replies_after(died, PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("the stream resumes on the backup");
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

#[test]
fn proxy_corrupt_frame_crc() {
    let mut rep = Report::new("proxy_corrupt_frame_crc");
    bad_frame(
        &mut rep,
        Fault {
            kind: FaultKind::FlipBit,
            way: Way::ToBackup,
            frame_type: frame_type::PAGES,
            nth: Some(1),
        },
    );
}

#[test]
fn proxy_corrupt_forged_crc_epoch_checksum() {
    let mut rep = Report::new("proxy_corrupt_forged_crc_epoch_checksum");
    bad_frame(
        &mut rep,
        Fault {
            kind: FaultKind::FlipBitForged,
            way: Way::ToBackup,
            frame_type: frame_type::PAGES,
            nth: Some(1),
        },
    );
}

#[test]
fn proxy_reordered_frames() {
    let mut rep = Report::new("proxy_reordered_frames");
    bad_frame(
        &mut rep,
        Fault {
            kind: FaultKind::SwapWithNext,
            way: Way::ToBackup,
            frame_type: frame_type::PAGES,
            nth: Some(1),
        },
    );
}

#[test]
fn proxy_duplicated_frame() {
    let mut rep = Report::new("proxy_duplicated_frame");
    bad_frame(
        &mut rep,
        Fault {
            kind: FaultKind::Duplicate,
            way: Way::ToBackup,
            frame_type: frame_type::PAGES,
            nth: Some(1),
        },
    );
}

/// A corrupt Ack on its way to the primary: the primary drops the session. PROTOCOL.md §7:
/// a payload CRC error is a protocol error, answered with `Refuse { protocol error }` before
/// closing — so the backup knows the primary is alive and detaches instead of taking over.
#[test]
fn proxy_corrupt_ack() {
    let mut rep = Report::new("proxy_corrupt_ack");
    bad_frame(
        &mut rep,
        Fault {
            kind: FaultKind::FlipBit,
            way: Way::ToPrimary,
            frame_type: frame_type::ACK,
            nth: Some(1),
        },
    );
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
    rig.work()
        .wait_replies_after(Instant::now(), PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("protected stream");
    rep.step("truncating the next Pages frame");
    rig.assert_no_takeover_yet();
    let armed = Instant::now();
    rig.proxy().arm(Fault {
        kind: FaultKind::Truncate,
        way: Way::ToBackup,
        frame_type: frame_type::PAGES,
        nth: Some(1),
    });
    let inj = rig
        .proxy()
        .wait_injections(1, Duration::from_secs(20))
        .expect("the proxy truncates a frame");
    let cut_epoch = inj[0].epoch.expect("Pages names its epoch");
    let fo = rig.wait_failover(&mut rep);
    let epoch = fo["epoch"].as_u64().expect("epoch");
    assert!(
        epoch < cut_epoch,
        "the backup failed over at epoch {epoch}, but epoch {cut_epoch} was truncated"
    );
    assert!(!rig.backup_committed(cut_epoch));
    rig.work()
        .wait_replies_after(inj[0].at, PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("the stream resumes on the backup");
    let (p, client) = rig.finish_work();
    rep.recover = p.max_gap_after(armed);
    check_stream(&mut rep, &p, client, "backup");
    rig.primary.ensure_running().expect("the primary stays up");
    rig.assert_no_panics();
    rep.done(format!(
        "truncated epoch {cut_epoch} discarded; backup took over at epoch {epoch}; primary (hold) silent"
    ));
}

/// Every `Hello` rewritten to protocol version 2: the backup refuses naming both versions,
/// builds no replica, the primary reports the refusal and keeps the VM serving unprotected.
/// PROTOCOL.md §7: the primary does not retry a version mismatch.
#[test]
fn proxy_wrong_version_hello() {
    let mut rep = Report::new("proxy_wrong_version_hello");
    let mut rig = Rig::start(
        &mut rep,
        Opts {
            proxy: true,
            wait_protected: false,
            initial_fault: Some(Fault {
                kind: FaultKind::SetHelloVersion(2),
                way: Way::ToBackup,
                frame_type: frame_type::HELLO,
                nth: None,
            }),
            ..Opts::default()
        },
    );
    rep.step("waiting for the refusal");
    let refusal = rig
        .backup()
        .wait_for(
            Mark::default(),
            "a version refusal",
            Duration::from_secs(30),
            |l| l.contains("version") && l.contains('2') && l.contains('1'),
        )
        .expect("the backup logs the version refusal")
        .1;
    rep.note(format!("backup: {}", log_msg(&refusal)));
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
    rig.work()
        .wait_replies_after(Instant::now(), PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("the VM serves, unprotected");
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
    let pmark = rig.primary.mark();
    let recovered = rig
        .primary
        .wait_for_line_after(pmark, "VM is protected", Duration::from_secs(15))
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
    rig.work()
        .wait_replies_after(Instant::now(), PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("protected stream");
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
        .backup()
        .wait_for_line("FAILOVER ", Duration::from_secs(5))
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

/// Replication cut both ways while both hosts live, policy `release` (the default). Remus
/// cannot tell this from a dead primary: the backup takes over, the primary releases its
/// held output and keeps serving. This measures what the outside world sees; it asserts
/// only that the measurements were taken and reported, not that the outcome is safe.
#[test]
fn split_brain_on_partition() {
    let mut rep = Report::new("split_brain_on_partition");
    let mut rig = Rig::start(&mut rep, Opts::default());
    rig.work()
        .wait_replies_after(Instant::now(), PROOF_REPLIES, PROGRESS_TIMEOUT)
        .expect("protected stream");
    let neigh_before = client_neighbour(&rig.ha);
    let port_before = switch_port(&rig.ha);
    rep.step("cutting replication both ways, both hosts alive");
    rig.assert_no_takeover_yet();
    let pmark = rig.primary.mark();
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
        .backup()
        .wait_for_line("FAILOVER ", Duration::from_secs(1))
        .ok();
    let primary_lost = rig
        .primary
        .wait_for_line_after(pmark, "backup lost", Duration::from_secs(1))
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
    // What is asserted: the measurement happened and both processes answered status.
    assert!(pst.is_ok(), "primary status unavailable: {pst:?}");
    assert!(bst.is_ok(), "backup status unavailable: {bst:?}");
    assert!(!ports.is_empty());
    rep.done(format!(
        "MEASURED: backup took over={}, primary kept serving={}, both answer={both}",
        took_over.is_some(),
        primary_view.starts_with("answers")
    ));
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

fn read_frame(s: &mut std::net::TcpStream) -> Option<twin_tests::proxy::Frame> {
    use std::io::Read as _;
    let mut header = [0u8; twin_tests::proxy::FRAME_HEADER_LEN];
    s.read_exact(&mut header).ok()?;
    let len = twin_tests::proxy::parse_header(&header).expect("a parseable header");
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).ok()?;
    Some(twin_tests::proxy::Frame { header, payload })
}

#[test]
fn proxy_selftest() {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    use twin_tests::proxy::Frame;
    require_root();
    let ns = Netns::new("proxyself").expect("namespace");
    let upstream = ns
        .enter(|| TcpListener::bind("127.0.0.1:0"))
        .expect("enter")
        .expect("bind");
    let up_addr = upstream.local_addr().expect("addr");
    let proxy =
        FrameProxy::start(&ns, "127.0.0.1:0".parse().expect("addr"), up_addr).expect("proxy");
    let mut primary = ns
        .enter(|| TcpStream::connect(proxy.listen_addr()))
        .expect("enter")
        .expect("connect");
    let (mut backup, _) = upstream.accept().expect("accept");
    for s in [&primary, &backup] {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
    }
    let pages = |e: u64, fill: u8| {
        let mut p = e.to_le_bytes().to_vec();
        p.extend_from_slice(&[fill; 64]);
        Frame::new(frame_type::PAGES, p)
    };
    let state = |e: u64| Frame::new(frame_type::STATE, e.to_le_bytes().to_vec());
    let send = |s: &mut TcpStream, f: &Frame| s.write_all(&f.to_bytes()).expect("send");
    let arm = |kind, way, ty| {
        proxy.arm(Fault {
            kind,
            way,
            frame_type: ty,
            nth: Some(1),
        })
    };

    // Untouched.
    send(&mut primary, &pages(1, 1));
    assert_eq!(read_frame(&mut backup), Some(pages(1, 1)));

    // Duplicate.
    arm(FaultKind::Duplicate, Way::ToBackup, frame_type::PAGES);
    send(&mut primary, &pages(2, 2));
    send(&mut primary, &state(2));
    assert_eq!(read_frame(&mut backup), Some(pages(2, 2)));
    assert_eq!(read_frame(&mut backup), Some(pages(2, 2)));
    assert_eq!(read_frame(&mut backup), Some(state(2)));

    // Swap with the next frame.
    arm(FaultKind::SwapWithNext, Way::ToBackup, frame_type::PAGES);
    send(&mut primary, &pages(3, 3));
    send(&mut primary, &state(3));
    assert_eq!(read_frame(&mut backup), Some(state(3)));
    assert_eq!(read_frame(&mut backup), Some(pages(3, 3)));

    // Bit flip, CRC left stale / forged.
    arm(FaultKind::FlipBit, Way::ToBackup, frame_type::PAGES);
    send(&mut primary, &pages(4, 4));
    let f = read_frame(&mut backup).expect("frame");
    assert!(!f.is_sealed(), "a stale CRC must not match");
    assert_ne!(f.payload, pages(4, 4).payload);
    assert_eq!(f.header, pages(4, 4).header);
    arm(FaultKind::FlipBitForged, Way::ToBackup, frame_type::PAGES);
    send(&mut primary, &pages(5, 5));
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
    send(&mut primary, &Frame::new(frame_type::HELLO, hello));
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
    send(&mut backup, &ack(6));
    send(&mut backup, &hb);
    assert_eq!(read_frame(&mut primary), Some(hb.clone()));
    proxy.disarm();
    send(&mut backup, &ack(7));
    assert_eq!(read_frame(&mut primary), Some(ack(7)));

    // Truncate: half a frame, then both sides closed.
    arm(FaultKind::Truncate, Way::ToBackup, frame_type::PAGES);
    send(&mut primary, &pages(8, 8));
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
