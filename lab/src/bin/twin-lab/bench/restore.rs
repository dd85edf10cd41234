//! The restore section (`twin bench restore`): how soon a VM restored from disk serves and
//! works again, for each way of bringing its memory back (`twin restore --restore
//! eager|lazy|ws`) and for a failover from a backup's replica store (`--replica-dir`).
//!
//! The guest: `--mem 4G` (and more with `--restore-mem 4G,16G`) running the memory
//! workload over a 1 GiB working set (above the MMIO hole) plus 2 GiB of heap written once
//! at boot and then cold (`cold=`). Per trial and memory size:
//!
//! - Snapshot: a fresh `twin run`; once the whole working set was written, its steady rate
//!   (STATS `dirty_pages_written` over guest time, sampled every few ms) — the reference
//!   of "back to 90%" — then `twin snapshot --stop`, SIGKILL. Then, each from that
//!   snapshot, `eager`, `lazy` and `ws`: the snapshot's `memory` file is written back and
//!   dropped from the page cache (`fdatasync` + `posix_fadvise(DONTNEED)`, its cached MiB
//!   checked with `mincore` and reported), `twin restore` starts, and from its start:
//!   the first reply (a fresh TCP connection attempted every 2 ms, `PING` on each that
//!   connects: no SYN retransmission timeout in the number), the rate (STATS every few ms,
//!   in windows of 100 ms of guest time) until it has stayed ≥ 90% of steady for a hold
//!   time, the loader's counters (`twin status` `restore`: faults, prefetched, bytes read)
//!   along the way, the load's completion (eager, ws), `VERIFY` at the end. The `lazy`
//!   restore is what records the first touches that `ws` then loads first (REAP's record
//!   run): a lazy load completes only when something needs all of memory, so after its
//!   measurement it is finished by a `twin snapshot` to a scratch directory (dropped),
//!   which writes the record beside the snapshot.
//! - Failover: the same guest protected (40 Hz) to a backup with `--replica-dir`; once
//!   protected and the working set written, the store's `memory.img` is written back and
//!   dropped from the cache, the primary SIGKILLed, and the same measured on the backup's
//!   VM (which always restores `ws`: newest-written pages first), from the SIGKILL and
//!   from the backup's detection.
//! - The physical limit: the disk's sequential read bandwidth (`O_DIRECT`, 1 MiB reads of
//!   a file written for it) and its 4 KiB random read latency (`O_DIRECT`, one at a time:
//!   what a fault served from a cold page cache waits for at best).
//!
//! Clones (`twin clone`, N = 1, 4, 16) belong here too; they are not built yet
//! ([`clones_pending`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use twin::control::{self, Request, Response};
use twin_api::EventKind;
use twin_lab::events::Events;
use twin_lab::{guest_service, GuestClient, Netns, Signal, TestDir, Topology, TwinProcess};
use twin_lab::{GUEST_CIDR, TAP};

use super::measure::{save_logs, spawn_twin, start_protected, wait_event, Protection, Slots};
use super::plan::{Plan, Workload, FAILOVER_HZ, PAGE};
use super::stats::{dist, json_f64, median, Dist};
use super::{check_interrupt, nap, Interrupted, INTERRUPTED};

/// Guest time one rate window spans.
const WINDOW_NS: u64 = 100_000_000;
/// The rate must stay ≥ [`RECOVERED`] of steady this long to count as back.
const HOLD_MS: f64 = 1000.0;
/// "Back to speed": this share of the steady rate.
const RECOVERED: f64 = 0.9;
/// Longest wait for the rate to come back, per restore (seconds from its start).
const RECOVERY_TIMEOUT_S: f64 = 60.0;
/// Pause between two STATS samples.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);
/// The loader's status is read at most this often while sampling.
const STATUS_EVERY: Duration = Duration::from_millis(50);
/// A new connection attempt this often until one is answered.
const PROBE_EVERY: Duration = Duration::from_millis(2);
/// An attempt is given up after this (its SYN's first retransmission would come at 1 s).
const PROBE_MAX_AGE: Duration = Duration::from_millis(900);
/// The restore modes measured from each snapshot, in this order (`lazy` records the first
/// touches `ws` loads first).
const MODES: [&str; 3] = ["eager", "lazy", "ws"];

/// What the restore section runs.
#[derive(Clone, Debug, Serialize)]
pub(super) struct RestorePlan {
    pub(super) mems: Vec<String>,
    pub(super) trials: u32,
    /// The guest's memory workload (`dirty=`), its working set (`wss=`) and the heap
    /// written once at boot (`cold=`).
    pub(super) dirty: String,
    pub(super) wss: String,
    pub(super) cold: String,
    /// Size of the file the disk's read bandwidth is measured on.
    pub(super) disk_file_mib: u64,
    /// Run the failover from a replica store too.
    pub(super) failover: bool,
}

impl RestorePlan {
    pub(super) fn guest_args(&self) -> String {
        format!("dirty={}/s,wss={},cold={}", self.dirty, self.wss, self.cold)
    }
}

/// One restore (of a snapshot, or a failover) measured.
#[derive(Debug, Default, Serialize)]
pub(super) struct RestoreTrial {
    pub(super) mem: String,
    pub(super) trial: u32,
    /// `eager`, `lazy`, `ws`, or `failover` (from a replica store, `ws`).
    pub(super) kind: String,
    pub(super) error: Option<String>,
    /// The unprotected VM's rate before the snapshot (MiB/s of pages written), and its
    /// slowest 100 ms window then (how noisy "90%" is on this machine).
    pub(super) steady_mib_s: Option<f64>,
    pub(super) steady_min_window_mib_s: Option<f64>,
    /// MiB of the memory file still in the page cache when the restore started.
    pub(super) cached_mib_at_start: Option<f64>,
    /// Failover: SIGKILL → the backup's detection (its restore start).
    pub(super) kill_to_detect_ms: Option<f64>,
    /// `twin restore`: its spawn → its VM running (its `vm_running` event's wall clock, ms
    /// resolution): what the process takes before the guest can run at all (eager: the
    /// whole load).
    pub(super) process_to_running_ms: Option<f64>,
    /// Restore start (failover: SIGKILL) → the first reply on a new connection.
    pub(super) first_reply_ms: Option<f64>,
    /// Restore start → the rate is back to ≥ 90% of steady (and stays for [`HOLD_MS`]).
    pub(super) recovered_ms: Option<f64>,
    /// The loader's counters when the rate was back (the status read nearest after).
    pub(super) pages_read_at_recovery: Option<u64>,
    pub(super) faults_at_recovery: Option<u64>,
    pub(super) prefetched_at_recovery: Option<u64>,
    /// At the end (after the load completed, for eager and ws).
    pub(super) data_pages: Option<u64>,
    pub(super) pages_read: Option<u64>,
    pub(super) faults: Option<u64>,
    pub(super) zero_faults: Option<u64>,
    pub(super) prefetched: Option<u64>,
    /// The loader's own time to load every page with data (not for lazy).
    pub(super) load_ms: Option<f64>,
    /// Pages in the first-touch record the `ws` restore started from.
    pub(super) ws_record_pages: Option<u64>,
    /// `VERIFY` of the working set after the measurement.
    pub(super) verify: Option<String>,
    /// (restore start → window start ms, MiB/s) of every rate window.
    pub(super) rate_windows: Vec<(f64, f64)>,
}

/// The disk's read limits, measured in the section.
#[derive(Debug, Default, Serialize)]
pub(super) struct DiskRead {
    pub(super) file_mib: u64,
    /// MB/s of 1 MiB sequential `O_DIRECT` reads.
    pub(super) seq_direct_mbps: Vec<f64>,
    /// MB/s of 1 MiB sequential buffered reads from a dropped cache (readahead on).
    pub(super) seq_buffered_mbps: Vec<f64>,
    /// Median µs of one 4 KiB random `O_DIRECT` read (queue depth 1).
    pub(super) rand_4k_direct_us: Vec<f64>,
}

#[derive(Debug, Default, Serialize)]
pub(super) struct RestoreResults {
    pub(super) plan: Option<RestorePlan>,
    pub(super) disk: DiskRead,
    pub(super) trials: Vec<RestoreTrial>,
    /// Why the clone measurements are missing.
    pub(super) clones: &'static str,
}

/// The clone part of the section, to come with `twin clone` (N = 1, 4, 16 clones of one
/// snapshot: time to the first reply of each, memory shared).
pub(super) fn clones_pending() -> &'static str {
    "not measured: `twin clone` is not built yet (N = 1, 4, 16 planned)"
}

// ---------------------------------------------------------------------------------------
// The section

pub(super) fn run_section(
    plan: &Plan,
    rp: &RestorePlan,
    failed_dir: &Path,
    out: &mut RestoreResults,
) -> Result<()> {
    out.plan = Some(rp.clone());
    out.clones = clones_pending();
    eprintln!("bench: restore: the disk's read limits…");
    measure_disk_read(rp.disk_file_mib, &mut out.disk).context("measuring the disk's reads")?;
    for trial in 1..=rp.trials {
        for mem in &rp.mems {
            check_interrupt()?;
            let logs = failed_dir.join(format!("restore-{mem}-{trial}"));
            let steady = match snapshot_trial(rp, mem, trial, &logs, &mut out.trials) {
                Ok(s) => s,
                Err(e) if e.downcast_ref::<Interrupted>().is_some() => return Err(e),
                Err(e) => {
                    eprintln!("bench: restore {mem} trial {trial}: FAILED: {e:#}");
                    out.trials.push(RestoreTrial {
                        mem: mem.clone(),
                        trial,
                        kind: "snapshot".into(),
                        error: Some(format!("{e:#}")),
                        ..Default::default()
                    });
                    None
                }
            };
            if rp.failover {
                check_interrupt()?;
                let logs = failed_dir.join(format!("restore-failover-{mem}-{trial}"));
                let mut t = RestoreTrial {
                    mem: mem.clone(),
                    trial,
                    kind: "failover".into(),
                    ..Default::default()
                };
                match failover_trial(plan, rp, mem, steady, &logs, &mut t) {
                    Ok(()) => {}
                    Err(e) if e.downcast_ref::<Interrupted>().is_some() => return Err(e),
                    Err(e) => t.error = Some(format!("{e:#}")),
                }
                report_line(&t);
                out.trials.push(t);
            }
        }
    }
    eprintln!("bench: restore: the disk's read limits again…");
    measure_disk_read(rp.disk_file_mib, &mut out.disk).context("measuring the disk's reads")?;
    Ok(())
}

fn report_line(t: &RestoreTrial) {
    match &t.error {
        None => eprintln!(
            "bench: restore {} trial {} {}: first reply {} ms, back to 90% {} ms, pages read {} ({} at 90%), faults {}, prefetched {}, load {} ms, {}",
            t.mem,
            t.trial,
            t.kind,
            f1(t.first_reply_ms),
            f1(t.recovered_ms),
            u(t.pages_read),
            u(t.pages_read_at_recovery),
            u(t.faults),
            u(t.prefetched),
            f1(t.load_ms),
            t.verify.as_deref().unwrap_or("no VERIFY")
        ),
        Some(e) => eprintln!(
            "bench: restore {} trial {} {}: FAILED: {e}",
            t.mem, t.trial, t.kind
        ),
    }
}

fn f1(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

fn u(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

/// The `twin` binary, for the commands run outside the namespaces (`snapshot`).
fn twin_cmd(args: &[&str]) -> Result<()> {
    let exe = twin_lab::twin_bin().context("locating the twin binary")?;
    let out = std::process::Command::new(&exe)
        .args(args)
        .output()
        .with_context(|| format!("running twin {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "twin {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn vm_args(cmd: &str, dir: &TestDir, name: &str) -> Vec<String> {
    vec![
        cmd.into(),
        "--tap".into(),
        TAP.into(),
        "--control".into(),
        dir.join(format!("{name}.sock")).display().to_string(),
        "--console".into(),
        dir.join(format!("{name}.console")).display().to_string(),
    ]
}

fn wait_running(p: &mut TwinProcess, sock: &Path, timeout: Duration) -> Result<()> {
    let events = Events::at(sock).record(false);
    wait_event(p, &events, 0, "the VM running", timeout, |e| {
        matches!(e.kind, EventKind::VmRunning { .. })
    })?;
    Ok(())
}

/// Connects to the guest and waits until its workload wrote every page of its working set
/// once (so that all of it holds data), then measures its steady rate.
fn warm_and_steady(ns: &Netns, vm: &mut TwinProcess) -> Result<(GuestClient, Vec<Sample>)> {
    let mut c = GuestClient::connect_retry(ns, guest_service(), Duration::from_secs(180), || {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Err(twin_lab::HarnessError::InvalidArgument(
                "interrupted".into(),
            ));
        }
        vm.ensure_running()
    })
    .context("connecting to the guest")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        check_interrupt()?;
        let s = c.stats().context("STATS while warming up")?;
        let get = |k: &str| s.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let (written, wss) = (get("dirty_pages_written"), get("wss_pages"));
        if wss > 0 && written >= wss {
            break;
        }
        if Instant::now() > deadline {
            bail!("the guest wrote {written} of its {wss} working-set pages within 120 s");
        }
        nap(Duration::from_millis(200))?;
    }
    let t0 = Instant::now();
    let mut samples = Vec::new();
    while t0.elapsed() < Duration::from_secs(2) {
        check_interrupt()?;
        samples.push(sample(&mut c, t0)?);
        std::thread::sleep(SAMPLE_EVERY);
    }
    Ok((c, samples))
}

/// The steady rate (MiB/s) over all of `samples`, and their slowest window.
fn steady_of(samples: &[Sample]) -> Result<(f64, f64)> {
    let (a, b) = (
        samples.first().context("no samples")?,
        samples.last().context("no samples")?,
    );
    let ns = b.uptime_ns.saturating_sub(a.uptime_ns);
    if ns == 0 || b.written <= a.written {
        bail!(
            "the guest wrote nothing while its steady rate was measured ({} samples, first {a:?}, last {b:?})",
            samples.len()
        );
    }
    let rate = mib_s(b.written - a.written, ns);
    let min = windows(samples, WINDOW_NS)
        .iter()
        .map(|w| w.1)
        .fold(f64::INFINITY, f64::min);
    Ok((rate, min))
}

/// One snapshot and its restores in every mode; returns the steady rate (for the
/// failover of the same guest).
fn snapshot_trial(
    rp: &RestorePlan,
    mem: &str,
    trial: u32,
    keep_logs: &Path,
    out: &mut Vec<RestoreTrial>,
) -> Result<Option<f64>> {
    let ha = Topology::ha().context("building the ha topology")?;
    let dir = TestDir::new("bench-restore").context("creating the run directory")?;
    let ns = &ha.primary.ns;
    let result = (|| -> Result<Option<f64>> {
        let mut args = vm_args("run", &dir, "vm");
        args.extend([
            "--ip".into(),
            GUEST_CIDR.into(),
            "--mem".into(),
            mem.into(),
            "--guest-args".into(),
            rp.guest_args(),
        ]);
        let mut vm = spawn_twin(ns, &dir, "vm", &args, "info")?;
        wait_running(&mut vm, &dir.join("vm.sock"), Duration::from_secs(60))?;
        let (client, samples) = warm_and_steady(ha.client_ns(), &mut vm)?;
        let (steady, steady_min) = steady_of(&samples)?;
        drop(client);
        let snap = dir.join("snap");
        let t = Instant::now();
        twin_cmd(&[
            "snapshot",
            &snap.display().to_string(),
            "--stop",
            "--control",
            &dir.join("vm.sock").display().to_string(),
        ])?;
        eprintln!(
            "bench: restore {mem} trial {trial}: steady {steady:.1} MiB/s (slowest window {steady_min:.1}); snapshot took {:.1} s",
            t.elapsed().as_secs_f64()
        );
        vm.kill().context("killing the snapshotted VM")?;
        for (k, mode) in MODES.iter().enumerate() {
            check_interrupt()?;
            let mut t = RestoreTrial {
                mem: mem.into(),
                trial,
                kind: (*mode).into(),
                steady_mib_s: Some(steady),
                steady_min_window_mib_s: Some(steady_min),
                ..Default::default()
            };
            if *mode == "ws" {
                t.ws_record_pages = std::fs::metadata(snap.join("first-touch"))
                    .ok()
                    .map(|m| m.len() / 4);
            }
            let name = format!("restore-{k}-{mode}");
            match restore_once(&ha, &dir, &snap, mode, steady, &name, &mut t) {
                Ok(()) => {}
                Err(e) if e.downcast_ref::<Interrupted>().is_some() => return Err(e),
                Err(e) => {
                    save_logs(&dir, keep_logs);
                    t.error = Some(format!("{e:#}"));
                }
            }
            report_line(&t);
            out.push(t);
        }
        Ok(Some(steady))
    })();
    if let Err(e) = &result {
        if e.downcast_ref::<Interrupted>().is_none() {
            save_logs(&dir, keep_logs);
        }
    }
    result
}

/// `twin restore SNAP --restore MODE`, measured; for `lazy`, then finished (by a scratch
/// snapshot) so that its first touches are recorded for `ws`.
fn restore_once(
    ha: &twin_lab::Ha,
    dir: &TestDir,
    snap: &Path,
    mode: &str,
    steady: f64,
    name: &str,
    t: &mut RestoreTrial,
) -> Result<()> {
    t.cached_mib_at_start = Some(drop_cache(&snap.join("memory"))?);
    let sock = dir.join(format!("{name}.sock"));
    let mut args = vm_args("restore", dir, name);
    args.extend([snap.display().to_string(), "--restore".into(), mode.into()]);
    let t0 = Instant::now();
    let started_unix_ms = unix_ms();
    let mut p = spawn_twin(&ha.primary.ns, dir, name, &args, "info")?;
    let result = (|| -> Result<()> {
        observe(ha.client_ns(), &mut p, &sock, t0, steady, t)?;
        t.process_to_running_ms = Events::at(&sock)
            .find(0, |e| matches!(e.kind, EventKind::VmRunning { .. }))
            .ok()
            .flatten()
            .map(|e| e.unix_ms as f64 - started_unix_ms);
        if mode == "lazy" {
            // Finishing the load records the first touches beside the snapshot.
            let scratch = dir.join(format!("{name}-scratch"));
            twin_cmd(&[
                "snapshot",
                &scratch.display().to_string(),
                "--stop",
                "--control",
                &sock.display().to_string(),
            ])
            .context("finishing the lazy load (a scratch snapshot)")?;
            let _ = std::fs::remove_dir_all(&scratch);
            if !snap.join("first-touch").exists() {
                bail!("the lazy restore recorded no first touches beside the snapshot");
            }
        }
        Ok(())
    })();
    let _ = p.kill();
    result
}

/// Measures a VM that is being restored (`p`, status on `sock`) from `t0`: the first
/// reply, the rate until it is back, the loader's counters, the load's end, VERIFY.
fn observe(
    client_ns: &Netns,
    p: &mut TwinProcess,
    sock: &Path,
    t0: Instant,
    steady: f64,
    t: &mut RestoreTrial,
) -> Result<()> {
    let deadline = t0 + Duration::from_secs(120);
    let (first, stream) = first_reply(client_ns, guest_service(), t0, deadline, p)?;
    t.first_reply_ms = Some(first.as_secs_f64() * 1e3);
    let mut c = GuestClient::from_connected(stream)?;
    c.set_request_timeout(Duration::from_secs(10))?;
    let timeout = Duration::from_secs_f64(RECOVERY_TIMEOUT_S);
    let mut samples = Vec::new();
    let mut loads: Vec<(f64, serde_json::Value)> = Vec::new();
    let mut last_status = Instant::now() - STATUS_EVERY;
    let mut last_check = Instant::now();
    let threshold = RECOVERED * steady;
    let recovered = loop {
        check_interrupt()?;
        samples.push(sample(&mut c, t0)?);
        if last_status.elapsed() >= STATUS_EVERY {
            last_status = Instant::now();
            if let Some(r) = restore_status(sock)? {
                loads.push((ms_since(t0), r));
            }
        }
        if last_check.elapsed() >= Duration::from_millis(100) {
            last_check = Instant::now();
            let w = windows(&samples, WINDOW_NS);
            if let Some(at) = recovered_at(&w, threshold, HOLD_MS) {
                t.rate_windows = w;
                break Some(at);
            }
            if t0.elapsed() > timeout {
                t.rate_windows = w;
                break None;
            }
        }
        std::thread::sleep(SAMPLE_EVERY);
    };
    t.recovered_ms = recovered;
    if let Some(at) = recovered {
        if let Some((_, r)) = loads.iter().find(|(ms, _)| *ms >= at).or(loads.last()) {
            t.pages_read_at_recovery = json_u64(r, "bytes_read").map(|b| b / PAGE as u64);
            t.faults_at_recovery = json_u64(r, "faults");
            t.prefetched_at_recovery = json_u64(r, "prefetched");
        }
    }
    // The rest of the load (eager has none left; lazy never ends on its own).
    let end = Instant::now() + Duration::from_secs(120);
    let last = loop {
        check_interrupt()?;
        p.ensure_running()?;
        let r = restore_status(sock)?;
        let complete = r
            .as_ref()
            .and_then(|r| r.get("complete")?.as_bool())
            .unwrap_or(true);
        if complete || t.kind == "lazy" || Instant::now() > end {
            break r;
        }
        nap(Duration::from_millis(100))?;
    };
    if let Some(r) = &last {
        t.data_pages = json_u64(r, "data_pages");
        t.pages_read = json_u64(r, "bytes_read").map(|b| b / PAGE as u64);
        t.faults = json_u64(r, "faults");
        t.zero_faults = json_u64(r, "zero_faults");
        t.prefetched = json_u64(r, "prefetched");
        if r.get("complete").and_then(|c| c.as_bool()) == Some(true) {
            t.load_ms = json_f64(r, &["elapsed_ms"]);
        }
        if let Some(e) = r.get("error").and_then(|e| e.as_str()) {
            bail!("the load failed: {e}");
        }
    }
    c.set_request_timeout(Duration::from_secs(60))?;
    let v = c.request("VERIFY").context("VERIFY after the restore")?;
    if !v.starts_with("OK") {
        bail!("VERIFY after the restore: {v}");
    }
    t.verify = Some(v);
    Ok(())
}

/// The wall clock in ms: what events carry (`unix_ms`), comparable across processes.
fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn ms_since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

fn json_u64(v: &serde_json::Value, k: &str) -> Option<u64> {
    v.get(k)?.as_u64()
}

/// The `restore` object of the VM's status (none once the VM has no loader).
fn restore_status(sock: &Path) -> Result<Option<serde_json::Value>> {
    match control::request(sock, &Request::Status).context("reading the VM's status")? {
        Response::Ok(v) | Response::Accepted(v) => Ok(v.get("restore").cloned()),
        Response::Error(e) => bail!("the VM's status: {e}"),
    }
}

/// The failover from a replica store: protected, cache dropped, primary SIGKILLed.
fn failover_trial(
    plan: &Plan,
    rp: &RestorePlan,
    mem: &str,
    steady: Option<f64>,
    keep_logs: &Path,
    t: &mut RestoreTrial,
) -> Result<()> {
    let ha = Topology::ha().context("building the ha topology")?;
    let dir = TestDir::new("bench-restore-failover").context("creating the run directory")?;
    let mut slots = Slots::default();
    let guest_args = rp.guest_args();
    let result = (|| -> Result<()> {
        start_protected(
            &ha,
            &dir,
            plan,
            Workload::Idle,
            Protection {
                replica_dir: true,
                guest: Some((mem, &guest_args)),
                ..Protection::at(FAILOVER_HZ)
            },
            &mut slots,
        )?;
        let (client, samples) =
            warm_and_steady(ha.client_ns(), slots.vm.as_mut().expect("started"))?;
        drop(client);
        // The reference is the unprotected rate (the VM runs unprotected after the
        // takeover); the protected one only if the snapshot trial failed.
        let (protected, min) = steady_of(&samples)?;
        let steady = steady.unwrap_or(protected);
        t.steady_mib_s = Some(steady);
        t.steady_min_window_mib_s = Some(min);
        slots.judge(Ok(()))?;
        let store = dir.join("replica").join("memory.img");
        let events = slots.backup_events.as_ref().expect("started");
        let mark = events.mark();
        // Written back first, and then given time: writing gigabytes back stalls the
        // backup's own writes to the store (dirty-page throttling), and a backup stalled
        // for its heartbeat timeout is one the primary gives up on (it runs unprotected).
        sync_file(&store)?;
        nap(Duration::from_secs(2))?;
        slots.judge(Ok(()))?;
        let mode = control::request(&dir.join("primary.sock"), &Request::Status)
            .ok()
            .and_then(|r| match r {
                Response::Ok(v) | Response::Accepted(v) => {
                    v.get("mode")?.as_str().map(str::to_string)
                }
                Response::Error(_) => None,
            });
        if mode.as_deref() != Some("protected") {
            bail!(
                "the primary was {mode:?}, not protected, before the SIGKILL (it lost its backup)"
            );
        }
        // The pages the last epochs wrote are still dirty and stay cached.
        t.cached_mib_at_start = Some(drop_cached(&store)?);
        let killed = Instant::now();
        let killed_unix_ms = unix_ms();
        slots
            .vm
            .as_ref()
            .expect("started")
            .signal(Signal::Kill)
            .context("SIGKILL to the primary")?;
        let backup = slots.backup.as_mut().expect("started");
        let sock = dir.join("backup.sock");
        let result = observe(ha.client_ns(), backup, &sock, killed, steady, t);
        let done = events.find(mark, |e| {
            matches!(
                e.kind,
                EventKind::FailoverComplete(_) | EventKind::FailoverFailed { .. }
            )
        });
        match done.map(|e| (e.unix_ms, e.kind)) {
            // The detection: as long before the completion as the backup reports, on the
            // wall clock both sides share.
            Some((unix_ms, EventKind::FailoverComplete(r))) => {
                t.kill_to_detect_ms =
                    Some(unix_ms as f64 - r.detect_to_running_ms - killed_unix_ms);
            }
            Some((_, EventKind::FailoverFailed { error })) => {
                bail!("the takeover failed: {error}")
            }
            _ => {}
        }
        result
    })();
    slots.kill();
    if let Err(e) = &result {
        if e.downcast_ref::<Interrupted>().is_none() {
            save_logs(&dir, keep_logs);
        }
    }
    result
}

// ---------------------------------------------------------------------------------------
// Sampling and the rate

/// One STATS sample.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    /// Host ms since the restore started, when the reply came.
    t_ms: f64,
    uptime_ns: u64,
    written: u64,
}

fn sample(c: &mut GuestClient, t0: Instant) -> Result<Sample> {
    let s = c.stats().context("STATS")?;
    let get = |k: &str| -> Result<u64> {
        s.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("guest STATS has no numeric {k}"))
    };
    Ok(Sample {
        t_ms: ms_since(t0),
        uptime_ns: get("uptime_ns")?,
        written: get("dirty_pages_written")?,
    })
}

fn mib_s(pages: u64, ns: u64) -> f64 {
    (pages * PAGE as u64) as f64 / (1 << 20) as f64 / (ns as f64 / 1e9)
}

/// The rate windows of `samples`: from each sample, MiB/s written over the shortest run of
/// samples spanning at least `window_ns` of guest time; (host ms at its start, MiB/s).
fn windows(samples: &[Sample], window_ns: u64) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for (i, a) in samples.iter().enumerate() {
        j = j.max(i + 1);
        while j < samples.len() && samples[j].uptime_ns.saturating_sub(a.uptime_ns) < window_ns {
            j += 1;
        }
        let Some(b) = samples.get(j) else { break };
        let ns = b.uptime_ns.saturating_sub(a.uptime_ns);
        out.push((a.t_ms, mib_s(b.written.saturating_sub(a.written), ns)));
    }
    out
}

/// When the rate was back: the start of the first window from which every window
/// starting within `hold_ms` reaches `threshold`, once windows that late were seen.
fn recovered_at(w: &[(f64, f64)], threshold: f64, hold_ms: f64) -> Option<f64> {
    let mut from: Option<f64> = None;
    for &(t, rate) in w {
        if rate < threshold {
            from = None;
            continue;
        }
        let start = *from.get_or_insert(t);
        if t - start >= hold_ms {
            return Some(start);
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// The first reply

/// Opens a new connection to `addr` from `ns` every [`PROBE_EVERY`] and sends `PING` on
/// each that connects, until one answers `PONG`: (time from `t0`, that connection). A SYN
/// sent while the VM does not run yet is lost, and its retransmission would come a second
/// later; fresh attempts keep the measurement within a few ms of the first moment the
/// guest could answer. Fails when `p` exits or at `deadline`.
fn first_reply(
    ns: &Netns,
    addr: SocketAddr,
    t0: Instant,
    deadline: Instant,
    p: &mut TwinProcess,
) -> Result<(Duration, TcpStream)> {
    let SocketAddr::V4(addr) = addr else {
        bail!("the guest service has no IPv4 address");
    };
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let probe = s.spawn(|| ns.enter(|| probe_loop(addr, t0, deadline, &stop)));
        while !probe.is_finished() {
            if INTERRUPTED.load(Ordering::SeqCst) || p.ensure_running().is_err() {
                stop.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let r = probe
            .join()
            .map_err(|_| anyhow!("the probe thread panicked"))?;
        check_interrupt()?;
        p.ensure_running()?;
        r.map_err(|e| anyhow!(e))?
    })
}

enum Attempt {
    Connecting,
    Sent(Vec<u8>),
}

fn probe_loop(
    addr: SocketAddrV4,
    t0: Instant,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<(Duration, TcpStream)> {
    let mut open: Vec<(OwnedFd, Instant, Attempt)> = Vec::new();
    let mut next = Instant::now();
    loop {
        let now = Instant::now();
        if stop.load(Ordering::SeqCst) {
            bail!("stopped (the VM process ended, or Ctrl-C) before the guest answered");
        }
        if now > deadline {
            bail!(
                "no reply from the guest within {:.0} s of the start",
                (deadline - t0).as_secs_f64()
            );
        }
        if now >= next {
            open.push((connect_nonblocking(addr)?, now, Attempt::Connecting));
            next = now + PROBE_EVERY;
        }
        open.retain(|(_, born, _)| born.elapsed() < PROBE_MAX_AGE);
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|(fd, _, a)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: match a {
                    Attempt::Connecting => libc::POLLOUT,
                    Attempt::Sent(_) => libc::POLLIN,
                },
                revents: 0,
            })
            .collect();
        let wait = next.saturating_duration_since(Instant::now()).as_millis() as i32;
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait.max(0)) };
        if n <= 0 {
            continue;
        }
        let mut dead = Vec::new();
        for (k, pfd) in fds.iter().enumerate() {
            if pfd.revents == 0 {
                continue;
            }
            let (fd, _, state) = &mut open[k];
            match state {
                Attempt::Connecting => {
                    if so_error(fd) != 0 {
                        dead.push(k);
                        continue;
                    }
                    let req = b"PING\n";
                    // SAFETY: sends from a live buffer of its length on our socket.
                    let sent = unsafe {
                        libc::send(
                            fd.as_raw_fd(),
                            req.as_ptr().cast(),
                            req.len(),
                            libc::MSG_NOSIGNAL,
                        )
                    };
                    if sent != req.len() as isize {
                        dead.push(k);
                        continue;
                    }
                    *state = Attempt::Sent(Vec::new());
                }
                Attempt::Sent(got) => {
                    let mut buf = [0u8; 64];
                    // SAFETY: receives into a live buffer of its length from our socket.
                    let r = unsafe {
                        libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                    };
                    if r <= 0 {
                        dead.push(k);
                        continue;
                    }
                    got.extend_from_slice(&buf[..r as usize]);
                    if got.ends_with(b"\n") {
                        if got != b"PONG\n" {
                            bail!(
                                "the guest answered PING with {:?}",
                                String::from_utf8_lossy(got)
                            );
                        }
                        let took = t0.elapsed();
                        let (fd, _, _) = open.swap_remove(k);
                        let stream = TcpStream::from(fd);
                        stream
                            .set_nonblocking(false)
                            .context("making the connection blocking")?;
                        return Ok((took, stream));
                    }
                }
            }
        }
        for k in dead.into_iter().rev() {
            open.swap_remove(k);
        }
    }
}

fn connect_nonblocking(addr: SocketAddrV4) -> Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked and owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("a probe socket");
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: connects our socket to a live, correctly sized sockaddr_in.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e).context("connecting a probe socket");
        }
    }
    Ok(fd)
}

fn so_error(fd: &OwnedFd) -> i32 {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: reads an int option of our socket into a live int of the given size.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        -1
    } else {
        err
    }
}

// ---------------------------------------------------------------------------------------
// The page cache and the disk

/// Writes `path`'s dirty pages back (dirty pages cannot be dropped) and drops all of its
/// pages from the page cache; returns the MiB of it still cached after that.
fn drop_cache(path: &Path) -> Result<f64> {
    sync_file(path)?;
    drop_cached(path)
}

/// Writes `path`'s dirty pages back.
fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_data())
        .with_context(|| format!("writing {} back", path.display()))
}

/// Drops `path`'s clean pages from the page cache; returns the MiB of it still cached.
fn drop_cached(path: &Path) -> Result<f64> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: plain syscall on our open file.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r))
            .with_context(|| format!("dropping {} from the page cache", path.display()));
    }
    cached_mib(&f).with_context(|| format!("the cached pages of {}", path.display()))
}

/// MiB of `f` in the page cache (`mincore` of a mapping of it).
fn cached_mib(f: &std::fs::File) -> Result<f64> {
    let len = f.metadata()?.len() as usize;
    if len == 0 {
        return Ok(0.0);
    }
    // SAFETY: maps our open file read-only; unmapped below, never dereferenced.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut vec = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: `addr..addr + len` is the mapping made above; `vec` has a byte per page.
    let r = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: unmaps the mapping made above, which nothing references.
    unsafe { libc::munmap(addr, len) };
    if r < 0 {
        return Err(err.into());
    }
    let pages = vec.iter().filter(|&&b| b & 1 != 0).count();
    Ok((pages * PAGE) as f64 / (1 << 20) as f64)
}

/// The disk's read limits on the file system of the snapshots and stores (`/tmp`).
fn measure_disk_read(mib: u64, out: &mut DiskRead) -> Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    out.file_mib = mib;
    let dir = TestDir::new("bench-disk-read").context("a directory for the disk limit")?;
    let path: PathBuf = dir.join("read.img");
    const BLOCK: usize = 1 << 20;
    {
        let mut f = std::fs::File::create(&path).context("creating the read-limit file")?;
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut block = vec![0u8; BLOCK];
        for _ in 0..mib {
            for w in block.chunks_exact_mut(8) {
                w.copy_from_slice(&super::stats::xorshift(&mut rng).to_le_bytes());
            }
            f.write_all(&block).context("writing the read-limit file")?;
        }
        f.sync_all().context("fsync of the read-limit file")?;
    }
    let bytes = mib * BLOCK as u64;
    // O_DIRECT needs an aligned buffer.
    let mut raw = vec![0u8; BLOCK + 4096];
    let off = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[off..off + BLOCK];
    drop_cache(&path)?;
    let d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .context("opening the read-limit file with O_DIRECT")?;
    let t = Instant::now();
    let mut at = 0u64;
    while at < bytes {
        d.read_exact_at(buf, at).context("O_DIRECT read")?;
        at += BLOCK as u64;
    }
    out.seq_direct_mbps
        .push(bytes as f64 / t.elapsed().as_secs_f64() / 1e6);
    let mut lat = Vec::new();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let pages = bytes / PAGE as u64;
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let p = super::stats::xorshift(&mut rng) % pages;
        let t = Instant::now();
        d.read_exact_at(&mut buf[..PAGE], p * PAGE as u64)
            .context("4 KiB O_DIRECT read")?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    if let Some(m) = median(&lat) {
        out.rand_4k_direct_us.push(m);
    }
    drop(d);
    drop_cache(&path)?;
    let mut f = std::fs::File::open(&path)?;
    let t = Instant::now();
    let mut total = 0u64;
    loop {
        let n = f.read(buf).context("buffered read")?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    out.seq_buffered_mbps
        .push(total as f64 / t.elapsed().as_secs_f64() / 1e6);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The report

/// Medians over the trials of one (memory size, kind).
#[derive(Debug, Default, Serialize)]
pub(super) struct RestoreAgg {
    pub(super) n: usize,
    pub(super) failed: usize,
    pub(super) first_reply_ms: Option<Dist>,
    pub(super) recovered_ms: Option<Dist>,
    /// Trials whose rate did not come back within the timeout.
    pub(super) not_recovered: usize,
    pub(super) pages_read_at_recovery: Option<f64>,
    pub(super) pages_read: Option<f64>,
    pub(super) faults: Option<f64>,
    pub(super) prefetched: Option<f64>,
    pub(super) load_ms: Option<f64>,
    pub(super) cached_mib: Option<f64>,
    pub(super) steady_mib_s: Option<f64>,
    pub(super) kill_to_detect_ms: Option<f64>,
    pub(super) process_to_running_ms: Option<f64>,
}

pub(super) fn aggregate(trials: &[RestoreTrial], mem: &str, kind: &str) -> RestoreAgg {
    let all: Vec<&RestoreTrial> = trials
        .iter()
        .filter(|t| t.mem == mem && t.kind == kind)
        .collect();
    let ok: Vec<&RestoreTrial> = all.iter().copied().filter(|t| t.error.is_none()).collect();
    let fv = |g: &dyn Fn(&RestoreTrial) -> Option<f64>| -> Vec<f64> {
        ok.iter().filter_map(|t| g(t)).collect()
    };
    RestoreAgg {
        n: ok.len(),
        failed: all.len() - ok.len(),
        first_reply_ms: dist(&fv(&|t| t.first_reply_ms)),
        recovered_ms: dist(&fv(&|t| t.recovered_ms)),
        not_recovered: ok.iter().filter(|t| t.recovered_ms.is_none()).count(),
        pages_read_at_recovery: median(&fv(&|t| t.pages_read_at_recovery.map(|v| v as f64))),
        pages_read: median(&fv(&|t| t.pages_read.map(|v| v as f64))),
        faults: median(&fv(&|t| t.faults.map(|v| v as f64))),
        prefetched: median(&fv(&|t| t.prefetched.map(|v| v as f64))),
        load_ms: median(&fv(&|t| t.load_ms)),
        cached_mib: median(&fv(&|t| t.cached_mib_at_start)),
        steady_mib_s: median(&fv(&|t| t.steady_mib_s)),
        kill_to_detect_ms: median(&fv(&|t| t.kill_to_detect_ms)),
        process_to_running_ms: median(&fv(&|t| t.process_to_running_ms)),
    }
}

fn mdist(d: &Option<Dist>) -> String {
    match d {
        Some(d) if d.n > 1 => format!("{:.1} (p99 {:.1})", d.median, d.p99),
        Some(d) => format!("{:.1}", d.median),
        None => "-".into(),
    }
}

fn mnum(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

/// The section of `bench.md`.
pub(super) fn markdown(s: &mut String, r: &RestoreResults) {
    let Some(p) = &r.plan else { return };
    let line = |s: &mut String, l: &str| {
        s.push_str(l);
        s.push('\n');
    };
    line(s, "");
    line(
        s,
        "## Restore: eager, lazy, working set first; failover from a replica store",
    );
    line(s, "");
    line(
        s,
        &format!(
            "Guest `--guest-args {}`; {} trial(s) per size. Each trial: a fresh `twin run`, its steady rate once the working set was written, `twin snapshot --stop`, SIGKILL, then `twin restore --restore eager`, `lazy`, `ws` in that order from that snapshot, each after its `memory` file was written back and dropped from the page cache (`fdatasync` + `posix_fadvise(DONTNEED)`; the MiB still cached, by `mincore`, in the table). `ws` loads first the first touches the `lazy` restore just recorded (its load finished by a scratch snapshot). Failover: the same guest protected at {FAILOVER_HZ} Hz to a backup with `--replica-dir`, the store's `memory.img` written back (`fdatasync`), 2 s later (the primary checked to be still protected) its clean pages dropped (`DONTNEED`) right before the primary's SIGKILL (the pages the last epochs wrote are dirty and stay cached: the column), times from the SIGKILL; the backup restores `ws` (newest-written pages first). First reply: a new TCP connection tried every 2 ms, `PING`. Back to 90%: the first 100 ms window (guest time, STATS every 5 ms) from which every window for {:.0} s wrote ≥ 90% of the steady rate (timeout {:.0} s). Pages read = `bytes_read` / 4096 of `twin status`; at 90% = the status read next after that moment. Medians (p99 = max for 3 trials).",
            p.guest_args(),
            p.trials,
            HOLD_MS / 1e3,
            RECOVERY_TIMEOUT_S
        ),
    );
    let d = &r.disk;
    line(s, "");
    line(
        s,
        &format!(
            "Physical limit, the disk under `/tmp` ({} MiB file, at the start and the end): sequential `O_DIRECT` reads {} MB/s, buffered from a dropped cache {} MB/s; one 4 KiB random `O_DIRECT` read {} µs. A 1 GiB working set cannot load faster than {} ms.",
            d.file_mib,
            list(&d.seq_direct_mbps),
            list(&d.seq_buffered_mbps),
            list(&d.rand_4k_direct_us),
            median(&d.seq_direct_mbps)
                .map_or("-".into(), |m| format!("{:.0}", (1u64 << 30) as f64 / (m * 1e6) * 1e3))
        ),
    );
    for mem in &p.mems {
        line(s, "");
        line(s, &format!("### `--mem {mem}`"));
        line(s, "");
        line(s, "| restore | n | first reply ms | process → VM running ms | back to 90% ms | pages read by then | pages read | faults | prefetched | load done ms | cached MiB at start | steady MiB/s |");
        line(
            s,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        );
        let kinds = ["eager", "lazy", "ws", "failover"];
        let aggs: Vec<RestoreAgg> = kinds.iter().map(|k| aggregate(&r.trials, mem, k)).collect();
        for (k, a) in kinds.iter().zip(&aggs) {
            if a.n + a.failed == 0 {
                continue;
            }
            line(
                s,
                &format!(
                    "| {k} | {}{}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    a.n,
                    if a.failed > 0 {
                        format!(" ({} failed)", a.failed)
                    } else {
                        String::new()
                    },
                    if a.not_recovered > 0 {
                        format!(", {} not back", a.not_recovered)
                    } else {
                        String::new()
                    },
                    mdist(&a.first_reply_ms),
                    f1(a.process_to_running_ms),
                    mdist(&a.recovered_ms),
                    mnum(a.pages_read_at_recovery),
                    mnum(a.pages_read),
                    mnum(a.faults),
                    mnum(a.prefetched),
                    mnum(a.load_ms),
                    mnum(a.cached_mib),
                    a.steady_mib_s.map_or("-".into(), |v| format!("{v:.0}")),
                ),
            );
        }
        let rec = |a: &RestoreAgg| a.recovered_ms.map(|d| d.median);
        let (eager, lazy, ws) = (rec(&aggs[0]), rec(&aggs[1]), rec(&aggs[2]));
        let ratio = |a: Option<f64>| match (a, ws) {
            (Some(a), Some(w)) if w > 0.0 => Some(a / w),
            _ => None,
        };
        let met = |ok: Option<bool>| match ok {
            Some(true) => "met",
            Some(false) => "**unmet**",
            None => "unknown",
        };
        let first = aggs[2].first_reply_ms.map(|d| d.median);
        line(s, "");
        line(
            s,
            &format!(
                "Goals (`ws`): first reply < 30 ms: {} ({} ms); back to 90% ≥ 3× sooner than eager: {} ({}×); ≥ 2× sooner than lazy: {} ({}×). Failover: first reply {} ms after the SIGKILL, of which {} ms until the backup noticed (its heartbeat timeout), back to 90% {} ms after the SIGKILL.",
                met(first.map(|f| f < 30.0)),
                f1(first),
                met(ratio(eager).map(|x| x >= 3.0)),
                ratio(eager).map_or("-".into(), |x| format!("{x:.2}")),
                met(ratio(lazy).map(|x| x >= 2.0)),
                ratio(lazy).map_or("-".into(), |x| format!("{x:.2}")),
                f1(aggs[3].first_reply_ms.map(|d| d.median)),
                f1(aggs[3].kill_to_detect_ms),
                f1(aggs[3].recovered_ms.map(|d| d.median)),
            ),
        );
    }
    let failed: Vec<&RestoreTrial> = r.trials.iter().filter(|t| t.error.is_some()).collect();
    if !failed.is_empty() {
        line(s, "");
        line(s, "Failed restores (logs in `failed/`):");
        line(s, "");
        for t in failed {
            line(
                s,
                &format!(
                    "- {} trial {} {}: {}",
                    t.mem,
                    t.trial,
                    t.kind,
                    super::report::first_line(t.error.as_deref().unwrap_or(""))
                ),
            );
        }
    }
    line(s, "");
    line(s, &format!("Clones: {}.", r.clones));
}

fn list(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(rates: &[(u64, u64)]) -> Vec<Sample> {
        // (guest ms elapsed since the previous sample, pages written in it)
        let mut out = vec![Sample {
            t_ms: 0.0,
            uptime_ns: 1_000_000_000,
            written: 0,
        }];
        for &(ms, pages) in rates {
            let last = *out.last().unwrap();
            out.push(Sample {
                t_ms: last.t_ms + ms as f64,
                uptime_ns: last.uptime_ns + ms * 1_000_000,
                written: last.written + pages,
            });
        }
        out
    }

    #[test]
    fn windows_span_at_least_the_window_of_guest_time() {
        // 50 ms samples, 256 pages each = 1 MiB per 50 ms = 20 MiB/s; windows of 100 ms.
        let s = samples(&[(50, 256); 6]);
        let w = windows(&s, 100_000_000);
        assert_eq!(w.len(), 5);
        for (k, &(t, r)) in w.iter().enumerate() {
            assert_eq!(t, 50.0 * k as f64);
            assert!((r - 20.0).abs() < 1e-9, "{r}");
        }
        assert!(windows(&s[..1], 100_000_000).is_empty());
    }

    #[test]
    fn recovery_is_the_start_of_a_held_stretch_at_threshold() {
        let w: Vec<(f64, f64)> = vec![
            (0.0, 1.0),
            (100.0, 10.0),
            (200.0, 1.0), // a dip: the stretch starts again
            (300.0, 10.0),
            (400.0, 9.0),
            (500.0, 10.0),
            (600.0, 11.0),
        ];
        assert_eq!(recovered_at(&w, 9.0, 300.0), Some(300.0));
        // Not held long enough yet.
        assert_eq!(recovered_at(&w, 9.0, 400.0), None);
        // Never at threshold.
        assert_eq!(recovered_at(&w, 20.0, 100.0), None);
        assert_eq!(recovered_at(&[], 1.0, 1.0), None);
    }

    #[test]
    fn aggregates_take_medians_of_the_successful_trials_of_one_kind() {
        let t = |kind: &str, rec: Option<f64>, err: bool| RestoreTrial {
            mem: "4G".into(),
            kind: kind.into(),
            recovered_ms: rec,
            first_reply_ms: Some(5.0),
            error: err.then(|| "boom".into()),
            ..Default::default()
        };
        let trials = [
            t("ws", Some(100.0), false),
            t("ws", Some(300.0), false),
            t("ws", Some(200.0), false),
            t("ws", None, true),
            t("ws", None, false),
            t("eager", Some(1000.0), false),
        ];
        let a = aggregate(&trials, "4G", "ws");
        assert_eq!((a.n, a.failed, a.not_recovered), (4, 1, 1));
        assert_eq!(a.recovered_ms.unwrap().median, 200.0);
        assert_eq!(aggregate(&trials, "16G", "ws").n, 0);
    }
}
