//! `twin bench`: protected against unprotected, measured side by side in one run on this
//! machine, with the physical limits measured in the same run.
//!
//! ```sh
//! sudo target/release/twin bench            # about 10 minutes
//! sudo target/release/twin bench --quick    # about 2 minutes
//! ```
//!
//! For every workload (idle guest, `dirty=16M/s`, `64M/s`, `256M/s`, and the TCP service
//! under a closed-loop client) and every mode (unprotected `twin run`, `twin protect` at
//! 100/40/10 checkpoints per second), a *cell* starts fresh processes in a fresh `ha`
//! topology of the test harness (the unprotected VM runs on the primary host, so both modes
//! use the same network path), waits until the VM answers (and, protected, until the first
//! checkpoint is acknowledged), lets it settle, and measures for a bounded window:
//!
//! - per checkpoint (protected): pause, dirty pages and bytes sent, from the primary's
//!   per-epoch `epoch_sent` events inside the window; the pause split and the ack
//!   latency from its status (session medians); the achieved rate from the epochs counted;
//! - the guest: its achieved dirty rate (`STATS` `dirty_pages_written` over guest time) and
//!   the reply latency of a PING probe (20 per second), or, for the TCP workload, requests
//!   per second and reply latency of one connection sending `INCR` back to back.
//!
//! Cells are interleaved over rounds (the order reversed every other round) so that noise
//! from whatever else runs on the machine spreads over every mode; samples of all rounds
//! are pooled for medians and p99, rates are medians over runs. Failover: fresh protected
//! VMs (40 Hz, `dirty=16M/s`) with a client sending `INCR` back to back on one connection;
//! the primary is SIGKILLed, and the time to the first reply from the backup on the same
//! connection is measured, and the counter checked for continuity. Physical limits: memcpy
//! of random 4 KiB pages, TCP over loopback and over the replication veth, measured at the
//! start and at the end. Compression: memory workloads whose writes change 5/25/100% of a
//! page (`--compress-workloads`), protected with `--compress delta` and `none` side by
//! side — bytes sent per dirty byte, the replication thread's CPU per GiB, the pause.
//! Restore (`twin bench restore`): a 4 GiB guest restored from a snapshot on disk with a
//! cold page cache, eager, lazy and working set first, and failed over from a replica
//! store — time to the first reply and until the guest's workload is back to 90% of its
//! speed, pages read, faults, against the disk's read bandwidth (`restore`).
//!
//! Output in `--out` (default `results/`): `bench.md` (also printed), `bench.json` (every
//! run, raw per-epoch samples), `bench.svg` and the same plot as `bench.png`. Logs of failed runs go to `failed/` there.
//! Needs root and `/dev/kvm`, like the end-to-end tests. Ctrl-C stops everything started
//! (processes killed, namespaces deleted). Not a timed test: nothing here judges speed.
//!
//! Here: the command, its options and Ctrl-C. What runs and in which order: `plan`; one
//! cell run: `measure`; the failover trials: `failover`; machine facts and physical limits:
//! `limits`; quantiles: `stats`; aggregation, `bench.md` and `bench.json`: `report`;
//! `bench.svg`, `bench.png`: `plot`; the restore section: `restore`.

mod failover;
mod limits;
mod measure;
mod plan;
mod plot;
mod redis;
mod report;
mod restore;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use twin::signals::Termination;

use failover::{run_failover, Failover};
use limits::{machine, measure_limits, read_trim, Limits};
use measure::{run_cell, Run};
use plan::{Mode, Plan};
use report::{f, markdown, ms, JsonReport, Report};
use stats::{dist, json_f64};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// The sections to run [default: all]: `main` (the workload cells), `compress`,
    /// `failover`, `restore` (eager/lazy/ws restores and a failover from a replica store,
    /// of a big guest with its memory on disk). `twin bench restore` runs only that one.
    #[arg(value_delimiter = ',')]
    sections: Vec<String>,
    /// The same as the positional SECTIONS, as an option.
    #[arg(long = "sections", value_delimiter = ',', value_name = "SECTIONS")]
    sections_opt: Vec<String>,
    /// Directory for bench.md, bench.json, bench.svg and bench.png (created if missing).
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// A shorter run (about 2 minutes): one round, 2 s windows, 3 failovers.
    #[arg(long)]
    quick: bool,
    /// Seconds measured per cell [default: 6, quick: 2].
    #[arg(long)]
    cell_secs: Option<f64>,
    /// Times every cell is run, interleaved [default: 2, quick: 1].
    #[arg(long)]
    rounds: Option<u32>,
    /// Failover trials (SIGKILL of the primary) [default: 10, quick: 3].
    #[arg(long)]
    failovers: Option<u32>,
    /// Checkpoint rates to measure, per second.
    #[arg(long, value_delimiter = ',', default_value = "100,40,10")]
    rates: Vec<u32>,
    /// Checkpoint rates to measure again with the replication stream encrypted
    /// (`--encrypt`); `--encrypt-rates` with no value for none.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "40")]
    encrypt_rates: Vec<u32>,
    /// Checkpoint rates to measure again without pre-copy (`--no-precopy`: every dirty page
    /// copied inside the pause), beside the same rates with it; no value for none.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "10")]
    no_precopy_rates: Vec<u32>,
    /// Workloads to measure: idle, 16M, 64M, 256M (guest dirty rates per second), tcp,
    /// redis (redis-benchmark, unprotected and protected at 40 Hz only), disk8M (the
    /// guest's disk workload at 8 MiB/s).
    #[arg(
        long,
        value_delimiter = ',',
        num_args = 0..,
        default_value = "idle,16M,64M,256M,tcp,redis,disk8M"
    )]
    workloads: Vec<String>,
    /// The compression section: memory workloads at 64 MiB/s whose writes change this
    /// percent of a page (text-like data), `25r` a quarter with incompressible data,
    /// `random` whole incompressible pages; each protected with compression (`delta`, the
    /// default) and without (`--compress none`), side by side. No value for none.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "5,25,100,25r,random")]
    compress_workloads: Vec<String>,
    /// Checkpoint rate of the compression section.
    #[arg(long, default_value_t = 40)]
    compress_hz: u32,
    /// Guest RAM.
    #[arg(long, default_value = "256M")]
    mem: String,
    /// `--heartbeat-timeout` for the backups [default: the backup's own default].
    #[arg(long)]
    heartbeat_timeout: Option<String>,
    /// `--eager-gap` for the protected primaries [default: the primary's own default].
    #[arg(long)]
    eager_gap: Option<String>,
    /// The restore section: guest RAM sizes (e.g. `4G,16G`) [default: 4G, quick: 1G].
    #[arg(long, value_delimiter = ',')]
    restore_mem: Vec<String>,
    /// The restore section: trials per size [default: 3, quick: 1].
    #[arg(long)]
    restore_trials: Option<u32>,
    /// The restore section: the guest's dirty rate per second.
    #[arg(long, default_value = "256M")]
    restore_dirty: String,
    /// The restore section: the working set [default: 1G, quick: 256M].
    #[arg(long)]
    restore_wss: Option<String>,
    /// The restore section: heap written once at boot, then cold (below 3 GiB with the
    /// image) [default: 2G, quick: 256M].
    #[arg(long)]
    restore_cold: Option<String>,
}

// ---------------------------------------------------------------------------------------
// Ctrl-C

/// Set by the signal thread on SIGINT, SIGTERM or SIGHUP.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The bench was interrupted by a signal; everything it started is dropped on the way out.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

/// Takes the termination signals on a thread of their own that only raises [`INTERRUPTED`]
/// (instead of the default action, termination, which would skip every destructor). Must
/// run before any other thread is spawned.
fn install_interrupt_handler() -> Result<()> {
    Termination::block()?.forward(|_| {
        INTERRUPTED.store(true, Ordering::SeqCst);
        true
    })?;
    Ok(())
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// Sleeps `d`, waking early (with an error) on Ctrl-C.
fn nap(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupt()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

// ---------------------------------------------------------------------------------------
// The command

fn preflight() -> Result<()> {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("twin bench creates network namespaces and TAP devices and must run as root");
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context("twin bench runs VMs and needs /dev/kvm (read-write)")?;
    Ok(())
}

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    let plan = Plan::new(&args)?;
    preflight()?;
    install_interrupt_handler()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating the results directory {}", args.out.display()))?;
    let failed_dir = args.out.join("failed");
    let _ = std::fs::remove_dir_all(&failed_dir);
    let t0 = Instant::now();
    let mut machine = machine();
    let schedule = plan.schedule();
    eprintln!(
        "bench: {} cell runs ({} workloads × {} modes × {} rounds, {:.1} s each) + {} failovers; numbers from a noisy shared {}-core machine",
        schedule.len(),
        plan.workload_list.len() + plan.compress_list.len(),
        plan.modes().len(),
        plan.rounds,
        plan.cell_secs,
        plan.failovers,
        machine.cores
    );
    let mut limits = Limits::default();
    let mut runs: Vec<Run> = Vec::new();
    let mut failovers: Vec<Failover> = Vec::new();
    let mut restores = restore::RestoreResults::default();
    let result = (|| -> Result<()> {
        eprintln!("bench: physical limits (memcpy, loopback and veth TCP)…");
        measure_limits(&plan, &mut limits).context("measuring the physical limits")?;
        let mut consecutive_failures = 0;
        for (i, &(round, w, m)) in schedule.iter().enumerate() {
            check_interrupt()?;
            let mut run = Run::new(round, w, m);
            let label = format!("{} / {} / round {round}", w.label(), m.label());
            let logs = failed_dir.join(format!(
                "r{round}-{}-{}",
                w.label().replace(['/', ' ', '='], "_"),
                m.label().replace(' ', "_")
            ));
            let started = Instant::now();
            match run_cell(&plan, &mut run, &logs) {
                Ok(()) => {
                    consecutive_failures = 0;
                    eprintln!(
                        "bench: [{}/{}] {label}: {:.1} s; replies {} (median {} ms){}",
                        i + 1,
                        schedule.len(),
                        started.elapsed().as_secs_f64(),
                        run.requests,
                        ms(run.latency_us.map(|d| d.median)),
                        match dist(&run.pause_us) {
                            Some(d) => format!(
                                ", {:.1} checkpoints/s, pause median {} ms",
                                run.checkpoint_rate_hz.unwrap_or(0.0),
                                ms(Some(d.median))
                            ),
                            None => String::new(),
                        }
                    );
                }
                Err(e) if e.downcast_ref::<Interrupted>().is_some() => return Err(e),
                Err(e) => {
                    consecutive_failures += 1;
                    eprintln!(
                        "bench: [{}/{}] {label}: FAILED: {e:#} (logs in {})",
                        i + 1,
                        schedule.len(),
                        logs.display()
                    );
                    run.error = Some(format!("{e:#}"));
                }
            }
            runs.push(run);
            // Three failures in a row that an unprotected VM shares, or that span workloads,
            // point at the machine rather than at one workload: stop. One workload whose
            // protected runs all fail is a result, not a reason to stop.
            let last = &runs[runs.len().saturating_sub(consecutive_failures)..];
            if consecutive_failures >= 3
                && (last.iter().any(|r| r.key.1 == Mode::Unprotected)
                    || last.iter().any(|r| r.key.0 != last[0].key.0))
            {
                bail!("{consecutive_failures} runs in a row failed, across workloads or unprotected; stopping (see the errors above and the logs in {})", failed_dir.display());
            }
        }
        // Each trial without and (when etcd is installed) with the arbiter, interleaved so
        // that both see the same machine.
        let arbiter_modes: &[bool] = if twin_lab::etcd::installed() {
            &[false, true]
        } else {
            &[false]
        };
        for trial in 1..=plan.failovers {
            for &arbiter in arbiter_modes {
                check_interrupt()?;
                let tag = if arbiter { "arbiter" } else { "plain" };
                let logs = failed_dir.join(format!("failover-{trial}-{tag}"));
                let t = run_failover(&plan, trial, arbiter, &logs)
                    .with_context(|| format!("failover trial {trial} ({tag})"))?;
                match &t.error {
                    None => eprintln!(
                        "bench: failover {trial}/{} ({tag}): client-visible {} ms, backup detect→running {} ms, consistent: {}",
                        plan.failovers,
                        f(t.client_visible_ms, 1),
                        f(
                            t.backup_report
                                .as_ref()
                                .and_then(|r| json_f64(r, &["detect_to_running_ms"])),
                            1
                        ),
                        t.consistent.unwrap_or(false)
                    ),
                    Some(e) => eprintln!(
                        "bench: failover {trial}/{} ({tag}): FAILED: {e} (logs in {})",
                        plan.failovers,
                        logs.display()
                    ),
                }
                failovers.push(t);
            }
        }
        if let Some(rp) = &plan.restore {
            restore::run_section(&plan, rp, &failed_dir, &mut restores)?;
        }
        eprintln!("bench: physical limits again…");
        measure_limits(&plan, &mut limits).context("measuring the physical limits")?;
        Ok(())
    })();
    if let Err(e) = result {
        if e.downcast_ref::<Interrupted>().is_some() {
            eprintln!(
                "twin bench: interrupted; every process it started was killed and its namespaces deleted"
            );
            return Ok(ExitCode::from(130));
        }
        return Err(e);
    }
    machine.loadavg_end = read_trim("/proc/loadavg");
    let elapsed_s = t0.elapsed().as_secs_f64();
    let report = Report {
        plan: &plan,
        machine: &machine,
        limits: &limits,
        runs: &runs,
        failovers: &failovers,
        restore: &restores,
        elapsed_s,
    };
    let md = markdown(&report);
    let md_path = args.out.join("bench.md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let json = JsonReport {
        note: "numbers from a noisy shared machine; see bench.md",
        plan: &plan,
        machine: &machine,
        limits: &limits,
        runs: &runs,
        failovers: &failovers,
        restore: &restores,
        elapsed_s,
    };
    let json_path = args.out.join("bench.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&json)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let svg_path = args.out.join("bench.svg");
    let png_path = args.out.join("bench.png");
    if !runs.is_empty() {
        plot::draw(&svg_path, &png_path, &report)?;
    }
    println!("{md}");
    eprintln!(
        "bench: wrote {}, {}, {}, {} in {:.0} s",
        md_path.display(),
        json_path.display(),
        svg_path.display(),
        png_path.display(),
        elapsed_s
    );
    let failures = runs.iter().filter(|r| r.error.is_some()).count()
        + failovers.iter().filter(|t| t.error.is_some()).count()
        + restores.trials.iter().filter(|t| t.error.is_some()).count();
    Ok(if failures > 0 {
        eprintln!("bench: {failures} run(s) failed; see the report");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
