//! One cell run: a fresh `ha` topology and fresh processes (`twin run`, or `twin backup`
//! and `twin protect`), settle, then the measured window: the client load, the guest's
//! STATS at both ends, the primary's per-epoch events and its status.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use twin::control::{self, Request, Response};
use twin_api::{Event, EventKind};
use twin_lab::events::{took_over, Events, Recorder};
use twin_lab::rig::describe;
use twin_lab::{
    guest_service, GuestClient, HarnessError, Netns, TestDir, Topology, TwinProcess,
    BACKUP_REPL_ADDR, GUEST_CIDR, TAP,
};

use super::plan::{Mode, Plan, Workload, DISK_SIZE, PAGE, REPL_PORT};
use super::redis::{run_matrix, RedisResult};
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
    /// Disk workload: MiB/s the guest wrote (4 KiB blocks, each flushed), its blocks
    /// skipped (it could not keep up), and µs per block write + flush as the guest saw it.
    pub(super) guest_disk_mib_s: Option<f64>,
    pub(super) guest_disk_skipped: Option<u64>,
    pub(super) disk_write_flush_us: Option<f64>,
    pub(super) checkpoints: u64,
    pub(super) checkpoint_rate_hz: Option<f64>,
    /// Per epoch in the window: pause (µs), dirty pages, bytes sent.
    pub(super) pause_us: Vec<f64>,
    pub(super) dirty_pages: Vec<f64>,
    pub(super) epoch_bytes: Vec<f64>,
    /// Per epoch: bytes of the dirty pages reported, of their page frames sent, and the
    /// replication thread's CPU µs encoding and writing the epoch.
    pub(super) dirty_bytes: Vec<f64>,
    pub(super) page_bytes: Vec<f64>,
    pub(super) encode_cpu_us: Vec<f64>,
    pub(super) send_cpu_us: Vec<f64>,
    /// The primary's status at the end of the window.
    pub(super) status: Option<serde_json::Value>,
    /// The Redis workload: every test of every redis-benchmark run of the matrix.
    pub(super) redis: Vec<RedisResult>,
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
            guest_disk_mib_s: None,
            guest_disk_skipped: None,
            disk_write_flush_us: None,
            checkpoints: 0,
            checkpoint_rate_hz: None,
            pause_us: Vec::new(),
            dirty_pages: Vec::new(),
            epoch_bytes: Vec::new(),
            dirty_bytes: Vec::new(),
            page_bytes: Vec::new(),
            encode_cpu_us: Vec::new(),
            send_cpu_us: Vec::new(),
            status: None,
            redis: Vec::new(),
            key: (w, m),
            latency_raw: Vec::new(),
        }
    }
}

/// Waits until `p`'s recorded events (`events`) hold one that `pred` accepts (from the
/// first on); returns it. Waits in slices so that Ctrl-C is noticed, and fails at once if
/// `p` exits.
pub(super) fn wait_event(
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
                "{} reported no {what} within {timeout:?} (its events: {:?}); last output:\n{}",
                p.name(),
                events.names_since(0),
                p.tail(12)
            );
        }
        match events.wait(since, what, left.min(Duration::from_millis(250)), &mut pred) {
            Ok(e) => return Ok(e),
            Err(HarnessError::Timeout { .. }) => {}
            Err(e) => return Err(anyhow!(e)).with_context(|| format!("waiting for {what}")),
        }
        p.ensure_running()
            .with_context(|| format!("waiting for {what}"))?;
    }
}

pub(super) fn spawn_twin(
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
    if matches!(w, Workload::Disk(_)) {
        let img = dir.join(format!("{name}-disk.img"));
        // A fresh sparse image per VM (a failure shows as the VM refusing to start).
        let _ = std::fs::File::create(&img).and_then(|f| f.set_len(DISK_SIZE));
        a.push("--disk".into());
        a.push(img.display().to_string());
    }
    a
}

/// Starts a protected VM: the backup, then (once it listens) the primary. The processes go
/// into `slots` as they start, so that the caller can inspect them whatever happens.
/// How a protected run is set up.
#[derive(Clone, Copy)]
pub(super) struct Protection<'a> {
    /// Checkpoints per second.
    pub(super) hz: u32,
    /// `--encrypt` on the primary.
    pub(super) encrypt: bool,
    /// `--no-precopy` on the primary (today's behaviour before pre-copy, for comparison).
    pub(super) no_precopy: bool,
    /// `--compress none` on the primary (raw pages, as before protocol 4).
    pub(super) uncompressed: bool,
    /// `--arbiter` on both sides.
    pub(super) arbiter: Option<&'a twin_lab::etcd::EtcdHost>,
    /// `--replica-dir DIR/replica` on the backup (always for the disk workload).
    pub(super) replica_dir: bool,
    /// The VM's `--mem` and `--guest-args` instead of the plan's and the workload's (the
    /// restore section's big guests).
    pub(super) guest: Option<(&'a str, &'a str)>,
}

impl Protection<'_> {
    pub(super) fn at(hz: u32) -> Self {
        Protection {
            hz,
            encrypt: false,
            no_precopy: false,
            uncompressed: false,
            arbiter: None,
            replica_dir: false,
            guest: None,
        }
    }
}

pub(super) fn start_protected(
    ha: &twin_lab::Ha,
    dir: &TestDir,
    plan: &Plan,
    w: Workload,
    how: Protection<'_>,
    slots: &mut Slots,
) -> Result<()> {
    let Protection {
        hz,
        encrypt,
        no_precopy,
        uncompressed,
        arbiter,
        replica_dir,
        guest,
    } = how;
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
    if let Some(e) = arbiter {
        backup_args.extend(["--arbiter".into(), e.url(twin_lab::HostRole::Backup)]);
    }
    if replica_dir || matches!(w, Workload::Disk(_)) {
        backup_args.extend([
            "--replica-dir".into(),
            dir.join("replica").display().to_string(),
        ]);
    }
    let backup = slots.backup.insert(spawn_twin(
        &ha.backup.ns,
        dir,
        "backup",
        &backup_args,
        "info",
    )?);
    let bevents = slots
        .backup_events
        .insert(Events::at(dir.join("backup.sock")).record(false));
    wait_event(
        backup,
        bevents,
        0,
        "listening",
        Duration::from_secs(20),
        |e| matches!(e.kind, EventKind::Listening { .. }),
    )?;
    let mut args = vm_args("protect", plan, w, dir, "primary");
    if let Some((mem, guest_args)) = guest {
        let mem_at = args
            .iter()
            .position(|a| a == "--mem")
            .expect("vm_args has --mem")
            + 1;
        args[mem_at] = mem.to_string();
        if let Some(at) = args.iter().position(|a| a == "--guest-args") {
            args.drain(at..at + 2);
        }
        args.extend(["--guest-args".into(), guest_args.to_string()]);
    }
    if encrypt {
        args.push("--encrypt".into());
    }
    if no_precopy {
        args.push("--no-precopy".into());
    }
    if uncompressed {
        args.extend(["--compress".into(), "none".into()]);
    }
    if let Some(e) = arbiter {
        args.extend(["--arbiter".into(), e.url(twin_lab::HostRole::Primary)]);
    }
    args.extend([
        "--key-file".into(),
        key,
        "--backup".into(),
        listen,
        "--interval".into(),
        format!("{}us", 1_000_000 / hz),
    ]);
    if let Some(g) = &plan.eager_gap {
        args.extend(["--eager-gap".into(), g.clone()]);
    }
    let primary = slots
        .vm
        .insert(spawn_twin(&ha.primary.ns, dir, "primary", &args, "info")?);
    let pevents = slots
        .vm_events
        .insert(Events::at(dir.join("primary.sock")).record(false));
    let e = wait_event(
        primary,
        pevents,
        0,
        "protection (or a lost backup)",
        Duration::from_secs(90),
        |e| {
            matches!(
                e.kind,
                EventKind::Protected { .. } | EventKind::BackupLost { .. }
            )
        },
    )?;
    if !matches!(e.kind, EventKind::Protected { .. }) {
        bail!(
            "the primary lost its backup before it was protected: {}",
            describe(&e)
        );
    }
    Ok(())
}

/// The processes of a run, and their recorded events.
#[derive(Default)]
pub(super) struct Slots {
    /// The VM process (`run`, or the primary's `protect`).
    pub(super) vm: Option<TwinProcess>,
    pub(super) backup: Option<TwinProcess>,
    pub(super) vm_events: Option<Recorder>,
    pub(super) backup_events: Option<Recorder>,
}

impl Slots {
    /// Turns `result` into a "false takeover" error if the backup took over while the
    /// primary was running: the backup must never do so, and a measurement during which two
    /// VMs answered for one is void.
    pub(super) fn judge(&self, result: Result<()>) -> Result<()> {
        let Some(b) = &self.backup_events else {
            return result;
        };
        b.sync();
        let Some(took) = b.find(0, took_over) else {
            return result;
        };
        let why = self
            .vm_events
            .as_ref()
            .and_then(|p| p.find(0, |e| matches!(e.kind, EventKind::BackupLost { .. })))
            .map(|e| format!("; the primary had reported: {}", describe(&e)))
            .unwrap_or_default();
        let saw = match &result {
            Err(e) if e.downcast_ref::<Interrupted>().is_some() => return result,
            Err(e) => format!("; the bench saw: {}", first_line(&format!("{e:#}"))),
            Ok(()) => String::new(),
        };
        bail!(
            "false takeover: the backup declared the running primary dead and started the VM too ({}){why}{saw}",
            describe(&took)
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

/// One epoch of the window, from the primary's `epoch_sent` event.
#[derive(Debug, PartialEq)]
struct EpochSample {
    pages: f64,
    bytes: f64,
    pause_us: f64,
    dirty_bytes: f64,
    page_bytes: f64,
    encode_cpu_us: f64,
    send_cpu_us: f64,
}

/// The epochs the primary sent among `events`.
fn epoch_samples(events: &[Event]) -> Vec<EpochSample> {
    events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::EpochSent {
                pages,
                bytes,
                pause_us,
                dirty_bytes,
                page_bytes,
                encode_cpu_us,
                send_cpu_us,
                ..
            } => Some(EpochSample {
                pages: pages as f64,
                bytes: bytes as f64,
                pause_us,
                dirty_bytes: dirty_bytes as f64,
                page_bytes: page_bytes as f64,
                encode_cpu_us,
                send_cpu_us,
            }),
            _ => None,
        })
        .collect()
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
                let events = slots
                    .vm_events
                    .insert(Events::at(dir.join("vm.sock")).record(false));
                wait_event(
                    vm,
                    events,
                    0,
                    "the VM running",
                    Duration::from_secs(60),
                    |e| matches!(e.kind, EventKind::VmRunning { .. }),
                )?;
            }
            Mode::Protected(hz) => {
                start_protected(&ha, &dir, plan, w, Protection::at(hz), &mut slots)?
            }
            Mode::Encrypted(hz) => start_protected(
                &ha,
                &dir,
                plan,
                w,
                Protection {
                    encrypt: true,
                    ..Protection::at(hz)
                },
                &mut slots,
            )?,
            Mode::NoPrecopy(hz) => start_protected(
                &ha,
                &dir,
                plan,
                w,
                Protection {
                    no_precopy: true,
                    ..Protection::at(hz)
                },
                &mut slots,
            )?,
            Mode::Uncompressed(hz) => start_protected(
                &ha,
                &dir,
                plan,
                w,
                Protection {
                    uncompressed: true,
                    ..Protection::at(hz)
                },
                &mut slots,
            )?,
        }
        let vm = slots.vm.as_mut().expect("started above");
        let mut client = connect(&ha, vm)?;
        nap(Duration::from_secs_f64(plan.warmup_secs))?;
        vm.ensure_running()?;
        run.setup_s = t0.elapsed().as_secs_f64();
        let status = slots.backup.as_ref().map(|_| dir.join("primary.sock"));
        measure(
            plan,
            run,
            vm,
            &mut client,
            status.as_deref(),
            ha.client_ns(),
            &dir,
        )?;
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
/// per-epoch events in between and its status at the end (`status`: its control socket).
/// The client load runs in `client_ns`; `dir` takes the output of the programs it runs.
pub(super) fn measure(
    plan: &Plan,
    run: &mut Run,
    vm: &mut TwinProcess,
    client: &mut GuestClient,
    status: Option<&Path>,
    client_ns: &Netns,
    dir: &TestDir,
) -> Result<()> {
    let (w, m) = run.key;
    // The primary's epochs from the window's start on, as they happen (its ring of per-epoch
    // events would not hold a long window of eager checkpoints).
    let epochs = match status {
        Some(sock) => {
            let ev = Events::at(sock);
            let from = ev
                .mark()
                .context("the primary's events at the window start")?;
            Some((from, ev.record_from(from, true)))
        }
        None => None,
    };
    let s0 = client.stats().context("guest STATS at the window start")?;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(plan.cell_secs);
    let mut rng = 0x2545_F491_4F6C_DD1Du64 ^ u64::from(run.round);
    let think_max = plan.probe_think_max.as_micros() as u64;
    if w == Workload::Redis {
        run.redis = run_matrix(plan, client_ns, dir)?;
    }
    while w != Workload::Redis && Instant::now() < end {
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
    let window_events = match &epochs {
        Some((from, rec)) => {
            let until = rec
                .live()
                .mark()
                .context("the primary's events at the window end")?;
            rec.sync();
            let got: Vec<Event> = rec
                .since(*from)
                .into_iter()
                .filter(|e| e.seq < until)
                .collect();
            // Every event of the window, or the figures would leave epochs out.
            let contiguous = got.first().map(|e| e.seq) == Some(*from)
                && got.windows(2).all(|w| w[1].seq == w[0].seq + 1)
                && got.last().map(|e| e.seq + 1) == Some(until);
            if !contiguous && until > *from {
                bail!(
                    "the primary's events of the window are incomplete: {} of {} (seq {from}..{until})",
                    got.len(),
                    until - from
                );
            }
            got
        }
        None => Vec::new(),
    };
    drop(epochs);
    let s1 = client.stats().context("guest STATS at the window end")?;
    if let Some(sock) = status {
        match control::request(sock, &Request::Status).context("reading the primary's status")? {
            Response::Ok(v) | Response::Accepted(v) => run.status = Some(v),
            Response::Error(e) => bail!("the primary's status: {e}"),
        }
    }
    vm.ensure_running()?;

    run.window_s = window;
    run.requests = run.latency_raw.len() as u64 + run.redis.iter().map(|r| r.requests).sum::<u64>();
    run.requests_per_s = run.requests as f64 / window;
    run.latency_us = dist(&run.latency_raw);
    let guest_ns = stat(&s1, "uptime_ns")?.saturating_sub(stat(&s0, "uptime_ns")?);
    let written =
        stat(&s1, "dirty_pages_written")?.saturating_sub(stat(&s0, "dirty_pages_written")?);
    if matches!(w, Workload::Dirty(_) | Workload::Write { .. }) && guest_ns > 0 {
        run.guest_dirty_mib_s =
            Some((written * PAGE as u64) as f64 / (1 << 20) as f64 / (guest_ns as f64 / 1e9));
        run.guest_pages_skipped =
            Some(stat(&s1, "pages_skipped")?.saturating_sub(stat(&s0, "pages_skipped")?));
    }
    if matches!(w, Workload::Disk(_)) && guest_ns > 0 {
        let d = |k: &str| -> Result<u64> { Ok(stat(&s1, k)?.saturating_sub(stat(&s0, k)?)) };
        let blocks = d("dload_written")?;
        run.guest_disk_mib_s =
            Some((blocks * PAGE as u64) as f64 / (1 << 20) as f64 / (guest_ns as f64 / 1e9));
        run.guest_disk_skipped = Some(d("dload_skipped")?);
        if blocks > 0 {
            run.disk_write_flush_us = Some(d("dload_busy_ns")? as f64 / blocks as f64 / 1e3);
        }
    }
    if m != Mode::Unprotected {
        for e in epoch_samples(&window_events) {
            run.pause_us.push(e.pause_us);
            run.dirty_pages.push(e.pages);
            run.epoch_bytes.push(e.bytes);
            run.dirty_bytes.push(e.dirty_bytes);
            run.page_bytes.push(e.page_bytes);
            run.encode_cpu_us.push(e.encode_cpu_us);
            run.send_cpu_us.push(e.send_cpu_us);
        }
        run.checkpoints = run.pause_us.len() as u64;
        run.checkpoint_rate_hz = Some(run.checkpoints as f64 / window);
        if run.checkpoints == 0 {
            bail!("no `epoch_sent` events from the primary in the window");
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
    fn epochs_come_from_epoch_sent_events_only() {
        let ev = |seq, kind| Event {
            seq,
            t_ms: 0.0,
            unix_ms: 0,
            kind,
        };
        let sent = EventKind::EpochSent {
            epoch: 12,
            pages: 3,
            bytes: 13000,
            pause_us: 412.0,
            stop_us: 50.0,
            state_us: 100.0,
            harvest_us: 20.0,
            copy_us: 10.0,
            eager: false,
            dirty_bytes: 12288,
            page_bytes: 12400,
            encode_cpu_us: 30.0,
            send_cpu_us: 20.0,
        };
        let events = [
            ev(
                1,
                EventKind::Protected {
                    epoch: 1,
                    generation: 1,
                },
            ),
            ev(2, sent),
        ];
        assert_eq!(
            epoch_samples(&events),
            [EpochSample {
                pages: 3.0,
                bytes: 13000.0,
                pause_us: 412.0,
                dirty_bytes: 12288.0,
                page_bytes: 12400.0,
                encode_cpu_us: 30.0,
                send_cpu_us: 20.0,
            }]
        );
    }
}
