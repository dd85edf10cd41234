//! The fault-injection rig: a protected VM (`twin protect` on the primary host, `twin backup`
//! on the backup host, the `ha` layout), a client that INCRs one counter over one TCP
//! connection with every reply checked, and the per-scenario report row that
//! `tests/tests/faults.rs` gathers into its table. See that file for the invariants.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use twin_api::{Event, EventKind};

use crate::events::{took_over, Events, Recorder};
use crate::proxy::{Fault, FrameProxy};
use crate::*;

/// Guest boot and service start-up under software KVM on a busy 2-core machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// From the backup's start to the primary's first acknowledged checkpoint.
pub const PROTECT_TIMEOUT: Duration = Duration::from_secs(90);
/// For a failpoint with `N*kill` to fire once protected.
pub const DEATH_TIMEOUT: Duration = Duration::from_secs(60);
/// From a fault to the backup's `failover_complete` event.
pub const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// For the client stream to make progress.
pub const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-request limit of the workload while a failover must be ridden out.
pub const RIDE_THROUGH: Duration = Duration::from_secs(30);
/// Replies that prove a side serves (after a fault, or under protection).
pub const PROOF_REPLIES: u64 = 20;

pub const REPL_PORT: u16 = 7300;
pub const PROXY_PORT: u16 = 7301;
pub const GUEST_ARGS: &str = "dirty=16M/s,wss=64M";
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
pub const KEY: &str = "ctr";

pub fn backup_listen() -> String {
    format!("{BACKUP_REPL_ADDR}:{REPL_PORT}")
}

// =============================================================================================
// The table.

pub fn rows_file() -> PathBuf {
    std::env::temp_dir().join(format!("twin-fault-table-{}.tsv", std::process::id()))
}

/// One scenario's row. Written on drop: a scenario that panics is recorded as failed at the
/// step it had reached.
pub struct Report {
    pub scenario: &'static str,
    pub step: String,
    pub started: Instant,
    pub outcome: Option<String>,
    pub recover: Option<Duration>,
    pub lost: Option<String>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: &'static str) -> Self {
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

    pub fn step(&mut self, s: impl Into<String>) {
        self.step = s.into();
        eprintln!(
            "[{} +{:.1}s] {}",
            self.scenario,
            self.started.elapsed().as_secs_f64(),
            self.step
        );
    }

    pub fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        eprintln!("[{}] note: {s}", self.scenario);
        self.notes.push(s);
    }

    pub fn done(&mut self, outcome: impl Into<String>) {
        self.outcome = Some(outcome.into());
    }
}

pub fn clean(s: &str) -> String {
    s.replace(['\t', '\n'], " ")
}

/// A log line without its timestamp: `2026-…Z  WARN message` → `WARN message`.
pub fn log_msg(line: &str) -> String {
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
pub struct Progress {
    /// The last value the guest acknowledged.
    pub last: u64,
    /// Reply times, in order.
    pub replies: Vec<Instant>,
    /// Replies that were not previous + 1.
    pub anomalies: Vec<String>,
    /// Values skipped (acknowledged, then forgotten).
    pub lost: u64,
    /// Values answered again (a reply the survivor redid).
    pub repeats: u64,
    /// Why the stream ended, if it broke.
    pub error: Option<String>,
}

impl Progress {
    pub fn replies_after(&self, t: Instant) -> u64 {
        self.replies.iter().rev().take_while(|&&r| r > t).count() as u64
    }

    /// The longest silence between consecutive replies, counting only gaps that end after
    /// `from`.
    pub fn max_gap_after(&self, from: Instant) -> Option<Duration> {
        self.replies
            .windows(2)
            .filter(|w| w[1] > from)
            .map(|w| w[1] - w[0])
            .max()
    }

    /// Replies received within [a, b).
    pub fn replies_between(&self, a: Instant, b: Instant) -> u64 {
        self.replies.iter().filter(|&&r| r >= a && r < b).count() as u64
    }
}

pub struct Workload {
    stop: Arc<AtomicBool>,
    progress: Arc<Mutex<Progress>>,
    handle: Option<JoinHandle<GuestClient>>,
}

impl Workload {
    pub fn start(mut client: GuestClient, request_timeout: Duration) -> Self {
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

    pub fn snapshot(&self) -> Progress {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `n` replies arrived after `t`; fails at once if the stream broke.
    pub fn wait_replies_after(&self, t: Instant, n: u64, timeout: Duration) -> Result<()> {
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
    pub fn wait_broken(&self, timeout: Duration) -> Option<String> {
        let _ = wait_until("the client stream to break", timeout, || {
            Ok(self.snapshot().error.is_some())
        });
        self.snapshot().error
    }

    /// Stops after the request in flight; the client back (if the thread ended in time).
    pub fn finish(mut self, timeout: Duration) -> (Progress, Option<GuestClient>) {
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
pub fn check_stream(rep: &mut Report, p: &Progress, client: Option<GuestClient>, survivor: &str) {
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
pub struct Opts {
    pub primary_failpoints: String,
    pub backup_failpoints: String,
    /// `--on-backup-loss`.
    pub policy: &'static str,
    pub proxy: bool,
    /// Armed in the proxy before the backup starts.
    pub initial_fault: Option<Fault>,
    pub guest_args: &'static str,
    pub request_timeout: Duration,
    /// Wait for the first acknowledged checkpoint in `start`.
    pub wait_protected: bool,
    /// How the replication link is secured.
    pub auth: Auth,
    /// A real etcd in a namespace of its own as the arbiter (`--arbiter` on both sides).
    pub arbiter: bool,
    /// `--vcpus` of the primary (the backup takes the VM's shape from the stream).
    pub vcpus: u8,
    /// A disk for the guest's durable store: the primary runs with `--disk
    /// <dir>/primary-disk.img` (a new sparse image of [`DISK_SIZE`]), every backup with
    /// `--replica-dir <dir>/<name>-replica` (its replica is `disk-0.img` there).
    pub disk: bool,
    /// The backup keeps the replica's memory in a replica store on disk (`--replica-dir
    /// <dir>/<name>-replica`, also set by `disk`) and fails over from it lazily; `Some`
    /// of a size also sets `--replica-memory`.
    pub store: Option<Option<&'static str>>,
    /// Every backup runs in a memory cgroup (v1) of this limit, joined as it starts.
    pub backup_cgroup: Option<u64>,
    /// `--compress` of the primary (`None`: its default, `delta`).
    pub compress: Option<&'static str>,
}

/// Guest arguments under which most dirty pages go as deltas: each write changes a
/// quarter of a page.
pub const DELTA_GUEST_ARGS: &str = "dirty=16M/s,wss=64M,wfrac=25";

/// Size of the rig's disk image (`Opts::disk`).
pub const DISK_SIZE: u64 = 64 << 20;

/// How a rig's replication link is secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// The pair's key (`--key-file`), the default.
    Key,
    /// The key, and the stream encrypted (`--encrypt` on the primary).
    Encrypted,
    /// `--no-auth` on both sides.
    None,
}

impl Auth {
    /// The flags for `twin protect` (`primary`) or `twin backup`.
    pub fn args(self, dir: &TestDir, primary: bool) -> Vec<String> {
        match self {
            Auth::None => vec!["--no-auth".into()],
            Auth::Key => vec!["--key-file".into(), dir.key_file()],
            Auth::Encrypted if primary => {
                vec!["--key-file".into(), dir.key_file(), "--encrypt".into()]
            }
            Auth::Encrypted => vec!["--key-file".into(), dir.key_file()],
        }
    }

    /// The link configuration a proxy between the pair needs.
    pub fn link(self, dir: &TestDir) -> twin_link::LinkConfig {
        match self {
            Auth::None => twin_link::LinkConfig::insecure(),
            Auth::Key => dir.link_config(),
            Auth::Encrypted => twin_link::LinkConfig {
                encrypt: true,
                ..dir.link_config()
            },
        }
    }
}

/// The rig's `--vcpus`: `TWIN_TEST_VCPUS` (1 to 8) if set, so that a whole suite can run at
/// several vCPUs (`TWIN_TEST_VCPUS=2 cargo test … --test faults`), else 1.
fn default_vcpus() -> u8 {
    match std::env::var("TWIN_TEST_VCPUS") {
        Err(_) => 1,
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n| (1..=8).contains(n))
            .unwrap_or_else(|| panic!("TWIN_TEST_VCPUS={v:?}: expected 1 to 8")),
    }
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
            auth: Auth::Key,
            arbiter: false,
            vcpus: default_vcpus(),
            disk: false,
            store: None,
            backup_cgroup: None,
            compress: None,
        }
    }
}

pub struct Rig {
    // Dropped first: the client, then the proxy, then the processes (and their event
    // recorders); the topology last.
    pub work: Option<Workload>,
    pub proxy: Option<FrameProxy>,
    pub primary: TwinProcess,
    pub backup: Option<TwinProcess>,
    /// Processes that ended (a replaced backup), kept for the panic check.
    pub retired: Vec<TwinProcess>,
    /// The events of every process the rig started, by its name, recorded from its control
    /// socket `<dir>/<name>.sock` as it runs (a backup's with its per-epoch events): what
    /// the scenarios wait on and check, also once the process has exited.
    pub recorders: Vec<(String, Recorder)>,
    /// The arbiter, with `Opts::arbiter` (dropped after the processes).
    pub etcd: Option<crate::etcd::EtcdHost>,
    pub opts: Opts,
    /// When the backup was started (protection began after this).
    pub backup_started: Instant,
    pub dir: TestDir,
    pub ha: Ha,
    /// The backups' memory cgroup (`Opts::backup_cgroup`), removed once they are gone.
    pub cgroup: Option<crate::MemoryCgroup>,
}

pub fn spawn_twin(
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

/// `twin protect` of the built-in guest (256 MiB, the rig's address) on the primary host,
/// replicating to `target`, with its control socket `<name>.sock` and console
/// `<name>.console` in `dir`; `auth` and `extra` are more flags.
pub fn spawn_primary(
    ha: &Ha,
    dir: &TestDir,
    name: &str,
    target: &str,
    auth: &[String],
    extra: &[&str],
    failpoints: &str,
) -> TwinProcess {
    let sock = dir
        .join(format!("{name}.sock"))
        .to_string_lossy()
        .into_owned();
    let cons = dir
        .join(format!("{name}.console"))
        .to_string_lossy()
        .into_owned();
    let mut args: Vec<&str> = vec!["protect"];
    args.extend(auth.iter().map(String::as_str));
    args.extend([
        "--backup",
        target,
        "--tap",
        TAP,
        "--ip",
        GUEST_CIDR,
        "--mem",
        "256M",
        "--control",
        &sock,
        "--console",
        &cons,
    ]);
    args.extend_from_slice(extra);
    spawn_twin(&ha.primary.ns, dir, name, &args, failpoints)
}

/// `twin backup` on the backup host listening on [`backup_listen`], with its control socket
/// `<name>.sock` and console `<name>.console` in `dir`; returns once it listens.
pub fn spawn_backup(
    ha: &Ha,
    dir: &TestDir,
    name: &str,
    auth: &[String],
    extra: &[&str],
    failpoints: &str,
) -> TwinProcess {
    let args = backup_args(dir, name, auth, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut b = spawn_twin(&ha.backup.ns, dir, name, &args, failpoints);
    wait_listening(&mut b, &dir.join(format!("{name}.sock")));
    b
}

/// [`spawn_backup`] with the test key and no extra flags.
pub fn spawn_keyed_backup(ha: &Ha, dir: &TestDir, name: &str, failpoints: &str) -> TwinProcess {
    spawn_backup(ha, dir, name, &Auth::Key.args(dir, false), &[], failpoints)
}

/// Waits for the `listening` event of the `twin backup` `b` serving `sock`.
pub fn wait_listening(b: &mut TwinProcess, sock: &Path) {
    Events::at(sock)
        .wait_live(b, 0, "the backup listening", Duration::from_secs(30), |e| {
            matches!(e.kind, EventKind::Listening { .. })
        })
        .unwrap_or_else(|e| panic!("{} does not listen: {e}", b.name()));
}

/// Whether `e` is the primary's `protected` event.
pub fn is_protected(e: &Event) -> bool {
    matches!(e.kind, EventKind::Protected { .. })
}

/// Whether `e` is the primary's `backup_lost` event.
pub fn is_backup_lost(e: &Event) -> bool {
    matches!(e.kind, EventKind::BackupLost { .. })
}

/// Whether `e` is a `backup_lost` whose reason contains `what`.
pub fn backup_lost_for(e: &Event, what: &str) -> bool {
    matches!(&e.kind, EventKind::BackupLost { reason, .. } if reason.contains(what))
}

/// Whether `e` is a `peer_refused` whose reason contains `what`.
pub fn refused_for(e: &Event, what: &str) -> bool {
    matches!(&e.kind, EventKind::PeerRefused { reason, .. } if reason.contains(what))
}

/// An event as one line for notes and messages: its name and its fields.
pub fn describe(e: &Event) -> String {
    let mut v = serde_json::to_value(&e.kind).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.remove("event");
    }
    format!("{} {v}", e.kind.name())
}

/// Checks that `p` also said it in words (the wording an operator reads in its log, after
/// the event that decided): waits up to 5 s for a line after `since` that `pred` accepts.
pub fn logged(p: &mut TwinProcess, since: Mark, what: &str, pred: impl Fn(&str) -> bool) -> String {
    p.wait_for(since, what, Duration::from_secs(5), pred)
        .unwrap_or_else(|e| panic!("{} did not log {what}: {e}", p.name()))
        .1
}

/// The arguments of [`spawn_backup`].
pub fn backup_args(dir: &TestDir, name: &str, auth: &[String], extra: &[&str]) -> Vec<String> {
    let path = |ext: &str| {
        dir.join(format!("{name}.{ext}"))
            .to_string_lossy()
            .into_owned()
    };
    let mut args = vec!["backup".to_string()];
    args.extend(auth.iter().cloned());
    args.extend([
        "--listen".into(),
        backup_listen(),
        "--tap".into(),
        TAP.into(),
        "--control".into(),
        path("sock"),
        "--console".into(),
        path("console"),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `twin status --json` of the process behind `sock`, run in `ns`.
pub fn status(
    ns: &Netns,
    dir: &TestDir,
    sock: &Path,
) -> std::result::Result<serde_json::Value, String> {
    twin_status(ns, dir, sock, Duration::from_secs(20))
}

/// Whether `p` logged that failpoint `name` fired (test instrumentation, not an event).
pub fn fired(p: &TwinProcess, name: &str) -> bool {
    p.text(Stream::Stderr)
        .lines()
        .any(|l| l.contains("failpoint fired") && l.contains(name))
}

pub fn killed_by_sigkill(s: std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    s.signal() == Some(9)
}

impl Rig {
    /// Starts the primary and the client stream, then the backup (so that failpoint hit
    /// counts and proxy faults start with protection, while the client already runs). With
    /// `--on-backup-loss hold` the primary lets nothing out until a backup acknowledges, so
    /// there the backup (and proxy) start first.
    pub fn start(rep: &mut Report, opts: Opts) -> Rig {
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
        let etcd = opts.arbiter.then(|| {
            rep.step("starting etcd, the arbiter");
            crate::etcd::EtcdHost::start(&ha, &dir).expect("etcd")
        });
        let mut auth = opts.auth.args(&dir, true);
        if let Some(e) = &etcd {
            auth.extend(["--arbiter".into(), e.url(HostRole::Primary)]);
        }
        let vcpus = opts.vcpus.to_string();
        let disk = dir.join("primary-disk.img").to_string_lossy().into_owned();
        let mut extra = vec![
            "--guest-args",
            opts.guest_args,
            "--on-backup-loss",
            opts.policy,
            "--vcpus",
            &vcpus,
        ];
        if let Some(c) = opts.compress {
            extra.extend(["--compress", c]);
        }
        if opts.disk {
            std::fs::File::create(&disk)
                .and_then(|f| f.set_len(DISK_SIZE))
                .expect("create the primary's disk image");
            extra.extend(["--disk", &disk]);
        }
        let primary = spawn_primary(
            &ha,
            &dir,
            "primary",
            &target,
            &auth,
            &extra,
            &opts.primary_failpoints,
        );
        let cgroup = opts
            .backup_cgroup
            .map(|l| crate::MemoryCgroup::new(rep.scenario, l));
        let mut rig = Rig {
            work: None,
            proxy: None,
            primary,
            backup: None,
            retired: Vec::new(),
            recorders: Vec::new(),
            etcd,
            opts,
            backup_started: Instant::now(),
            cgroup,
            dir,
            ha,
        };
        rig.record("primary", false);
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
            rig.primary_events()
                .wait(0, "protection", PROTECT_TIMEOUT, is_protected)
                .expect("the primary becomes protected");
        }
        rig
    }

    /// Starts recording the events of the process `name` (its socket `<dir>/<name>.sock`).
    fn record(&mut self, name: &str, epochs: bool) {
        let r = self.events(name).record(epochs);
        self.recorders.push((name.to_string(), r));
    }

    /// The live events of the process `name` (asked of it each time).
    pub fn events(&self, name: &str) -> Events {
        Events::at(self.dir.join(format!("{name}.sock")))
    }

    /// The recorded events of the process `name`.
    pub fn history(&self, name: &str) -> &Recorder {
        self.recorders
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r)
            .unwrap_or_else(|| panic!("the rig started no process named {name}"))
    }

    /// The primary's recorded events.
    pub fn primary_events(&self) -> &Recorder {
        self.history(self.primary.name())
    }

    /// The current backup's recorded events (with its per-epoch events).
    pub fn backup_events(&self) -> &Recorder {
        self.history(self.backup.as_ref().expect("a backup was started").name())
    }

    /// The recorded events of every backup the rig started (the current one and those it
    /// replaced).
    pub fn backups_events(&self) -> impl Iterator<Item = &Recorder> {
        self.backup
            .iter()
            .chain(self.retired.iter())
            .map(|b| self.history(b.name()))
    }

    /// Whether any backup took, or began to take, the VM over ([`took_over`]); caught up
    /// with the live processes first.
    pub fn any_takeover(&self) -> Option<Event> {
        self.backups_events().find_map(|r| {
            r.sync();
            r.find(0, took_over)
        })
    }

    pub fn start_proxy_and_backup(&mut self, rep: &mut Report) {
        if self.opts.proxy {
            let p = FrameProxy::start(
                &self.ha.primary.ns,
                format!("127.0.0.1:{PROXY_PORT}").parse().expect("addr"),
                backup_listen().parse().expect("addr"),
                self.opts.auth.link(&self.dir),
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

    pub fn spawn_backup(&mut self, name: &str) {
        let mut auth = self.opts.auth.args(&self.dir, false);
        if let Some(e) = &self.etcd {
            auth.extend(["--arbiter".into(), e.url(HostRole::Backup)]);
        }
        let replica = self.replica_dir(name).to_string_lossy().into_owned();
        let mut extra: Vec<&str> = if self.opts.disk || self.opts.store.is_some() {
            vec!["--replica-dir", &replica]
        } else {
            vec![]
        };
        if let Some(Some(budget)) = self.opts.store {
            extra.extend(["--replica-memory", budget]);
        }
        let b = match &self.cgroup {
            None => spawn_backup(
                &self.ha,
                &self.dir,
                name,
                &auth,
                &extra,
                &self.opts.backup_failpoints,
            ),
            Some(cg) => {
                // Entered with `nsenter --net`, as a systemd unit with
                // `NetworkNamespacePath=` would be: under `ip netns exec` the backup cannot
                // read its own cgroup's limit (ARCHITECTURE.md), and it must, to restore
                // only what fits after a takeover.
                let args = backup_args(&self.dir, name, &auth, &extra);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let mut env = vec![("TWIN_LOG", "info,twin_backup=debug")];
                if !self.opts.backup_failpoints.is_empty() {
                    env.push(("TWIN_FAILPOINTS", &self.opts.backup_failpoints));
                }
                let bin = twin_bin().expect("twin binary (build it or set TWIN_BIN)");
                let mut b = TwinProcess::spawn_program_nsenter(
                    &self.ha.backup.ns,
                    &self.dir,
                    name,
                    &bin,
                    &args,
                    &env,
                )
                .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
                cg.add(b.pid());
                wait_listening(&mut b, &self.dir.join(format!("{name}.sock")));
                b
            }
        };
        self.record(name, true);
        if let Some(old) = self.backup.replace(b) {
            self.retired.push(old);
        }
        self.backup_started = Instant::now();
    }

    /// The `--replica-dir` of the backup `name` (`Opts::disk`).
    pub fn replica_dir(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-replica"))
    }

    /// The primary's disk image (`Opts::disk`).
    pub fn primary_disk(&self) -> PathBuf {
        self.dir.join("primary-disk.img")
    }

    pub fn backup(&mut self) -> &mut TwinProcess {
        self.backup.as_mut().expect("a backup was started")
    }

    pub fn work(&self) -> &Workload {
        self.work.as_ref().expect("the workload runs")
    }

    pub fn finish_work(&mut self) -> (Progress, Option<GuestClient>) {
        self.work
            .take()
            .expect("the workload runs")
            .finish(RIDE_THROUGH + Duration::from_secs(5))
    }

    /// Waits until the client has had `PROOF_REPLIES` replies sent after `since` (the stream
    /// goes on); `what` names the expectation in the panic.
    pub fn wait_stream(&self, since: Instant, what: &str) {
        if let Err(e) = self
            .work()
            .wait_replies_after(since, PROOF_REPLIES, PROGRESS_TIMEOUT)
        {
            panic!("{what}: {e}");
        }
    }

    /// Ends the workload and checks its stream on the `survivor` (`check_stream`),
    /// recording the longest gap from a second before `since` (the fault) as the recovery.
    pub fn finish_and_check(&mut self, rep: &mut Report, since: Instant, survivor: &str) {
        let (p, client) = self.finish_work();
        rep.recover = p.max_gap_after(since - Duration::from_secs(1));
        check_stream(rep, &p, client, survivor);
    }

    pub fn primary_status(&self) -> std::result::Result<serde_json::Value, String> {
        status(
            &self.ha.primary.ns,
            &self.dir,
            &self.dir.join("primary.sock"),
        )
    }

    pub fn backup_status(&self) -> std::result::Result<serde_json::Value, String> {
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

    pub fn proxy(&self) -> &FrameProxy {
        self.proxy.as_ref().expect("this rig has a proxy")
    }

    pub fn assert_no_panics(&self) {
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
    pub fn assert_no_takeover_yet(&self) {
        if let Some(e) = self.any_takeover() {
            let said = self.primary_events().find(0, |e| {
                matches!(
                    e.kind,
                    EventKind::StoodDown { .. } | EventKind::BackupLost { .. }
                )
            });
            panic!(
                "SPURIOUS TAKEOVER before the fault was injected: a backup judged the live \
                 primary dead: {} (primary: {:?})",
                describe(&e),
                said.as_ref().map(describe)
            );
        }
    }

    /// Waits for the current backup's `failover_complete` event; returns its report as JSON
    /// (as the `FAILOVER {json}` line it prints has it).
    pub fn wait_failover(&mut self, rep: &mut Report) -> serde_json::Value {
        rep.step("waiting for the backup to take over");
        let done = self
            .backup_events()
            .wait(0, "the takeover", FAILOVER_TIMEOUT, |e| {
                matches!(
                    e.kind,
                    EventKind::FailoverComplete(_) | EventKind::FailoverFailed { .. }
                )
            })
            .expect("the backup takes over");
        match done.kind {
            EventKind::FailoverComplete(report) => {
                serde_json::to_value(report).expect("a failover report serializes")
            }
            other => panic!("the backup's takeover failed: {other:?}"),
        }
    }

    /// Whether a backup committed epoch `e` (its `epoch_committed` events), caught up with
    /// the live backups first. Panics if the recorded events cannot tell (they begin after
    /// `e`): the answer would say nothing.
    pub fn backup_committed(&self, e: u64) -> bool {
        let mut first = None;
        let mut committed = false;
        for r in self.backups_events() {
            r.sync();
            for ev in r.events() {
                if let EventKind::EpochCommitted { epoch, .. } = ev.kind {
                    first = Some(first.map_or(epoch, |f: u64| f.min(epoch)));
                    committed |= epoch == e;
                }
            }
        }
        assert!(
            committed || first.is_some_and(|f| f < e),
            "the backups' recorded epochs (from {first:?}) do not reach back to epoch {e}"
        );
        committed
    }
}
