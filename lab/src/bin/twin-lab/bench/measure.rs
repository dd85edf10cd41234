//! One cell run: a fresh `ha` topology and fresh processes (`twin run`, or `twin backup`
//! and `twin protect`), settle, then the measured window: the client load, the guest's
//! STATS at both ends, the primary's per-epoch lines and its status.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use twin::control::{self, Request, Response};
use twin_lab::{
    guest_service, GuestClient, HarnessError, Netns, Stream, TestDir, Topology, TwinProcess,
    BACKUP_REPL_ADDR, GUEST_CIDR, TAP,
};

use super::plan::{Mode, Plan, Workload, PAGE, REPL_PORT};
use super::report::first_line;
use super::stats::{dist, xorshift, Dist};
use super::{check_interrupt, nap, Interrupted, INTERRUPTED};

/// One run of a (workload, mode) cell.
#[derive(Debug, Serialize)]
pub(super) struct Run {
    pub(super) workload: String,
    pub(super) mode: String,
    pub(super) hz: Option<u32>,
    pub(super) round: u32,
    pub(super) error: Option<String>,
    /// Seconds from nothing to measuring (topology, boot, sync, settle).
    pub(super) setup_s: f64,
    pub(super) window_s: f64,
    pub(super) requests: u64,
    pub(super) requests_per_s: f64,
    pub(super) latency_us: Option<Dist>,
    pub(super) guest_dirty_mib_s: Option<f64>,
    pub(super) guest_pages_skipped: Option<u64>,
    pub(super) checkpoints: u64,
    pub(super) checkpoint_rate_hz: Option<f64>,
    /// Per epoch in the window: pause (µs), dirty pages, bytes sent.
    pub(super) pause_us: Vec<f64>,
    pub(super) dirty_pages: Vec<f64>,
    pub(super) epoch_bytes: Vec<f64>,
    /// The primary's status at the end of the window.
    pub(super) status: Option<serde_json::Value>,
    #[serde(skip)]
    pub(super) key: (Workload, Mode),
    #[serde(skip)]
    pub(super) latency_raw: Vec<f64>,
}

impl Run {
    pub(super) fn new(round: u32, w: Workload, m: Mode) -> Self {
        Run {
            workload: w.label(),
            mode: m.label(),
            hz: m.hz(),
            round,
            error: None,
            setup_s: 0.0,
            window_s: 0.0,
            requests: 0,
            requests_per_s: 0.0,
            latency_us: None,
            guest_dirty_mib_s: None,
            guest_pages_skipped: None,
            checkpoints: 0,
            checkpoint_rate_hz: None,
            pause_us: Vec::new(),
            dirty_pages: Vec::new(),
            epoch_bytes: Vec::new(),
            status: None,
            key: (w, m),
            latency_raw: Vec::new(),
        }
    }
}

/// Waits until `p` prints a line containing one of `pats`; returns the line. Waits in
/// slices so that Ctrl-C is noticed.
fn wait_any(p: &mut TwinProcess, pats: &[&str], timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let what = pats
        .iter()
        .map(|p| format!("{p:?}"))
        .collect::<Vec<_>>()
        .join(" or ");
    loop {
        check_interrupt()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "{} printed no line containing {what} within {timeout:?}; last output:\n{}",
                p.name(),
                p.tail(12)
            );
        }
        match p.wait_for(
            twin_lab::Mark::default(),
            &what,
            left.min(Duration::from_millis(250)),
            |l| pats.iter().any(|pat| l.contains(pat)),
        ) {
            Ok((_, l)) => return Ok(l),
            Err(HarnessError::Timeout { .. }) => {}
            Err(e) => return Err(anyhow!(e)).with_context(|| format!("waiting for {what}")),
        }
    }
}

fn wait_line(p: &mut TwinProcess, pat: &str, timeout: Duration) -> Result<String> {
    wait_any(p, &[pat], timeout)
}

fn spawn_twin(
    ns: &Netns,
    dir: &TestDir,
    name: &str,
    args: &[String],
    log: &str,
) -> Result<TwinProcess> {
    let exe = twin_lab::twin_bin().context("locating the twin binary")?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TwinProcess::spawn_program(ns, dir, name, &exe, &args, &[("TWIN_LOG", log)])
        .with_context(|| format!("starting {name}"))
}

/// The argument list of a VM-running command.
fn vm_args(cmd: &str, plan: &Plan, w: Workload, dir: &TestDir, name: &str) -> Vec<String> {
    let mut a: Vec<String> = vec![
        cmd.into(),
        "--tap".into(),
        TAP.into(),
        "--ip".into(),
        GUEST_CIDR.into(),
        "--mem".into(),
        plan.mem.clone(),
        "--control".into(),
        dir.join(format!("{name}.sock")).display().to_string(),
        "--console".into(),
        dir.join(format!("{name}.console")).display().to_string(),
    ];
    if let Some(g) = w.guest_args() {
        a.push("--guest-args".into());
        a.push(g);
    }
    a
}

/// Starts a protected VM: the backup, then (once it listens) the primary. The processes go
/// into `slots` as they start, so that the caller can inspect them whatever happens.
pub(super) fn start_protected(
    ha: &twin_lab::Ha,
    dir: &TestDir,
    plan: &Plan,
    w: Workload,
    hz: u32,
    encrypt: bool,
    slots: &mut Slots,
) -> Result<()> {
    let listen = SocketAddr::from((BACKUP_REPL_ADDR, REPL_PORT)).to_string();
    let key = dir.key_file();
    let mut backup_args: Vec<String> = vec![
        "backup".into(),
        "--key-file".into(),
        key.clone(),
        "--listen".into(),
        listen.clone(),
        "--tap".into(),
        TAP.into(),
        "--control".into(),
        dir.join("backup.sock").display().to_string(),
        "--console".into(),
        dir.join("backup.console").display().to_string(),
    ];
    if let Some(t) = &plan.heartbeat_timeout {
        backup_args.extend(["--heartbeat-timeout".into(), t.clone()]);
    }
    let backup = slots.backup.insert(spawn_twin(
        &ha.backup.ns,
        dir,
        "backup",
        &backup_args,
        "info",
    )?);
    wait_line(
        backup,
        "backup waiting for a primary",
        Duration::from_secs(20),
    )?;
    let mut args = vm_args("protect", plan, w, dir, "primary");
    if encrypt {
        args.push("--encrypt".into());
    }
    args.extend([
        "--key-file".into(),
        key,
        "--backup".into(),
        listen,
        "--interval".into(),
        format!("{}us", 1_000_000 / hz),
    ]);
    let primary = slots.vm.insert(spawn_twin(
        &ha.primary.ns,
        dir,
        "primary",
        &args,
        "info,twin_primary=debug",
    )?);
    let line = wait_any(
        primary,
        &["VM is protected", "backup lost"],
        Duration::from_secs(90),
    )?;
    if !line.contains("VM is protected") {
        bail!("the primary lost its backup before it was protected: {line}");
    }
    Ok(())
}

/// The processes of a run.
#[derive(Default)]
pub(super) struct Slots {
    /// The VM process (`run`, or the primary's `protect`).
    pub(super) vm: Option<TwinProcess>,
    pub(super) backup: Option<TwinProcess>,
}

impl Slots {
    /// Turns `result` into a "false takeover" error if the backup took over while the
    /// primary was running: the backup must never do so, and a measurement during which two
    /// VMs answered for one is void.
    pub(super) fn judge(&self, result: Result<()>) -> Result<()> {
        let Some(b) = &self.backup else {
            return result;
        };
        let Some(line) = b
            .text(Stream::Stdout)
            .lines()
            .find(|l| l.contains("FAILOVER"))
            .map(str::to_string)
        else {
            return result;
        };
        let why = self
            .vm
            .as_ref()
            .and_then(|p| {
                p.text(Stream::Stderr)
                    .lines()
                    .find(|l| l.contains("backup lost"))
                    .map(|l| format!("; the primary had logged: {}", l.trim()))
            })
            .unwrap_or_default();
        let saw = match &result {
            Err(e) if e.downcast_ref::<Interrupted>().is_some() => return result,
            Err(e) => format!("; the bench saw: {}", first_line(&format!("{e:#}"))),
            Ok(()) => String::new(),
        };
        bail!(
            "false takeover: the backup declared the running primary dead and started the VM too ({}){why}{saw}",
            line.trim()
        )
    }

    /// Kills the backup first (so that it does not take over), then the VM.
    pub(super) fn kill(&mut self) {
        if let Some(b) = self.backup.as_mut() {
            let _ = b.kill();
        }
        if let Some(v) = self.vm.as_mut() {
            let _ = v.kill();
        }
    }
}

pub(super) fn connect(ha: &twin_lab::Ha, vm: &mut TwinProcess) -> Result<GuestClient> {
    check_interrupt()?;
    let mut c = GuestClient::connect_retry(
        ha.client_ns(),
        guest_service(),
        Duration::from_secs(60),
        || {
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Err(HarnessError::InvalidArgument("interrupted".into()));
            }
            vm.ensure_running()
        },
    )
    .map_err(|e| {
        if INTERRUPTED.load(Ordering::SeqCst) {
            anyhow!(Interrupted)
        } else {
            anyhow!(e).context("connecting to the guest service")
        }
    })?;
    c.set_request_timeout(Duration::from_secs(5))?;
    Ok(c)
}

fn stat(m: &BTreeMap<String, String>, k: &str) -> Result<u64> {
    m.get(k)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("guest STATS has no numeric {k}"))
}

struct EpochLine {
    pages: f64,
    bytes: f64,
    pause_us: f64,
}

/// Parses the primary's per-epoch debug line `… checkpoint sent epoch=… pages=… bytes=…
/// pause_us=…`.
fn parse_epoch_line(line: &str) -> Option<EpochLine> {
    let (_, fields) = line.split_once("checkpoint sent")?;
    let mut pages = None;
    let mut bytes = None;
    let mut pause_us = None;
    for tok in fields.split_whitespace() {
        match tok.split_once('=') {
            Some(("pages", v)) => pages = v.parse().ok(),
            Some(("bytes", v)) => bytes = v.parse().ok(),
            Some(("pause_us", v)) => pause_us = v.parse().ok(),
            _ => {}
        }
    }
    Some(EpochLine {
        pages: pages?,
        bytes: bytes?,
        pause_us: pause_us?,
    })
}

fn stderr_lines(p: &TwinProcess) -> Vec<String> {
    p.text(Stream::Stderr).lines().map(str::to_string).collect()
}

/// Runs one cell: fresh topology and processes, settle, measure, tear down.
pub(super) fn run_cell(plan: &Plan, run: &mut Run, keep_logs: &Path) -> Result<()> {
    let (w, m) = run.key;
    let t0 = Instant::now();
    let ha = Topology::ha().context("building the ha topology")?;
    let dir = TestDir::new("bench").context("creating the run directory")?;
    let mut slots = Slots::default();
    let result = (|| -> Result<()> {
        match m {
            Mode::Unprotected => {
                let args = vm_args("run", plan, w, &dir, "vm");
                let vm = slots
                    .vm
                    .insert(spawn_twin(&ha.primary.ns, &dir, "vm", &args, "info")?);
                wait_line(vm, "VM running", Duration::from_secs(60))?;
            }
            Mode::Protected(hz) => start_protected(&ha, &dir, plan, w, hz, false, &mut slots)?,
            Mode::Encrypted(hz) => start_protected(&ha, &dir, plan, w, hz, true, &mut slots)?,
        }
        let vm = slots.vm.as_mut().expect("started above");
        let mut client = connect(&ha, vm)?;
        nap(Duration::from_secs_f64(plan.warmup_secs))?;
        vm.ensure_running()?;
        run.setup_s = t0.elapsed().as_secs_f64();
        let status = slots.backup.as_ref().map(|_| dir.join("primary.sock"));
        measure(plan, run, vm, &mut client, status.as_deref())?;
        if let Some(mode) = run
            .status
            .as_ref()
            .and_then(|s| s.get("mode")?.as_str().map(str::to_string))
        {
            if mode != "protected" {
                bail!(
                    "the primary was {mode}, not protected, at the end of the window (last error: {})",
                    run.status
                        .as_ref()
                        .and_then(|s| s.get("last_error"))
                        .map_or("none".into(), |e| e.to_string())
                );
            }
        }
        Ok(())
    })();
    let result = slots.judge(result);
    slots.kill();
    if let Err(e) = &result {
        if e.downcast_ref::<Interrupted>().is_none() {
            save_logs(&dir, keep_logs);
        }
    }
    result
}

/// The measured window of a cell: the client load, guest STATS at both ends, the primary's
/// per-epoch lines in between and its status at the end (`status`: its control socket).
pub(super) fn measure(
    plan: &Plan,
    run: &mut Run,
    vm: &mut TwinProcess,
    client: &mut GuestClient,
    status: Option<&Path>,
) -> Result<()> {
    let (w, m) = run.key;
    let s0 = client.stats().context("guest STATS at the window start")?;
    let n0 = stderr_lines(vm).len();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(plan.cell_secs);
    let mut rng = 0x2545_F491_4F6C_DD1Du64 ^ u64::from(run.round);
    let think_max = plan.probe_think_max.as_micros() as u64;
    while Instant::now() < end {
        check_interrupt()?;
        let t = Instant::now();
        if w == Workload::Tcp {
            client.incr("bench").context("INCR in the closed loop")?;
        } else {
            client.ping().context("PING probe")?;
        }
        run.latency_raw.push(t.elapsed().as_secs_f64() * 1e6);
        if w != Workload::Tcp {
            // A random think time over a whole checkpoint interval (or more): the next probe
            // lands at a uniformly random phase of the interval. Sent right after a reply
            // it would always arrive just after a checkpoint and wait a whole interval.
            let think = Duration::from_micros(xorshift(&mut rng) % think_max);
            std::thread::sleep(think.min(end.saturating_duration_since(Instant::now())));
        }
    }
    let window = start.elapsed().as_secs_f64();
    let lines = stderr_lines(vm);
    let s1 = client.stats().context("guest STATS at the window end")?;
    if let Some(sock) = status {
        match control::request(sock, &Request::Status).context("reading the primary's status")? {
            Response::Ok(v) => run.status = Some(v),
            Response::Error(e) => bail!("the primary's status: {e}"),
        }
    }
    vm.ensure_running()?;

    run.window_s = window;
    run.requests = run.latency_raw.len() as u64;
    run.requests_per_s = run.requests as f64 / window;
    run.latency_us = dist(&run.latency_raw);
    let guest_ns = stat(&s1, "uptime_ns")?.saturating_sub(stat(&s0, "uptime_ns")?);
    let written =
        stat(&s1, "dirty_pages_written")?.saturating_sub(stat(&s0, "dirty_pages_written")?);
    if matches!(w, Workload::Dirty(_)) && guest_ns > 0 {
        run.guest_dirty_mib_s =
            Some((written * PAGE as u64) as f64 / (1 << 20) as f64 / (guest_ns as f64 / 1e9));
        run.guest_pages_skipped =
            Some(stat(&s1, "pages_skipped")?.saturating_sub(stat(&s0, "pages_skipped")?));
    }
    if m != Mode::Unprotected {
        for l in lines.iter().skip(n0) {
            if let Some(e) = parse_epoch_line(l) {
                run.pause_us.push(e.pause_us);
                run.dirty_pages.push(e.pages);
                run.epoch_bytes.push(e.bytes);
            }
        }
        run.checkpoints = run.pause_us.len() as u64;
        run.checkpoint_rate_hz = Some(run.checkpoints as f64 / window);
        if run.checkpoints == 0 {
            bail!("no `checkpoint sent` lines from the primary in the window (is TWIN_LOG debug for twin_primary honoured?)");
        }
    }
    Ok(())
}

/// Copies a failed run's logs next to the report.
pub(super) fn save_logs(dir: &TestDir, to: &Path) {
    if std::fs::create_dir_all(to).is_err() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir.path()) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_file() {
                let _ = std::fs::copy(&p, to.join(e.file_name()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_lines_parse() {
        let l = "2025-01-01T00:00:00.000001Z DEBUG checkpoint sent epoch=12 pages=3 bytes=13000 pause_us=412";
        let e = parse_epoch_line(l).expect("parses");
        assert_eq!((e.pages, e.bytes, e.pause_us), (3.0, 13000.0, 412.0));
        assert!(parse_epoch_line("INFO VM is protected epoch=1").is_none());
    }
}
