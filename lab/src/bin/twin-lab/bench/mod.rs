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
//!   per-epoch `checkpoint sent` debug lines inside the window; the pause split and the ack
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
//! start and at the end.
//!
//! Output in `--out` (default `results/`): `bench.md` (also printed), `bench.json` (every
//! run, raw per-epoch samples), `bench.svg`. Logs of failed runs go to `failed/` there.
//! Needs root and `/dev/kvm`, like the end-to-end tests. Ctrl-C stops everything started
//! (processes killed, namespaces deleted). Not a timed test: nothing here judges speed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use twin_lab::{
    guest_service, GuestClient, HarnessError, Netns, Signal, Stream, TestDir, Topology,
    TwinProcess, BACKUP_REPL_ADDR, GUEST_CIDR, TAP,
};

use twin::control::{self, Request, Response};

const PAGE: usize = 4096;
/// Port the backup listens on for replication.
const REPL_PORT: u16 = 7700;
/// Shortest upper bound of the PING probe's random think time (the longest checkpoint
/// interval measured is used when longer).
const PROBE_THINK_MIN: Duration = Duration::from_millis(100);
/// Working set of the memory workloads.
const WSS: &str = "128M";
/// The protected VM of the failover trials: the product's default interval, a guest that
/// writes memory.
const FAILOVER_WORKLOAD: Workload = Workload::Dirty(16);
const FAILOVER_HZ: u32 = 40;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Directory for bench.md, bench.json and bench.svg (created if missing).
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
    /// (`--encrypt`); empty for none.
    #[arg(long, value_delimiter = ',', default_value = "40")]
    encrypt_rates: Vec<u32>,
    /// Workloads to measure: idle, 16M, 64M, 256M (guest dirty rates per second), tcp.
    #[arg(long, value_delimiter = ',', default_value = "idle,16M,64M,256M,tcp")]
    workloads: Vec<String>,
    /// Guest RAM.
    #[arg(long, default_value = "256M")]
    mem: String,
    /// `--heartbeat-timeout` for the backups [default: the backup's own default].
    #[arg(long)]
    heartbeat_timeout: Option<String>,
}

// ---------------------------------------------------------------------------------------
// Ctrl-C

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// The bench was interrupted by a signal; everything it started is dropped on the way out.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

fn install_interrupt_handler() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal as Sig};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Sig::SIGINT, Sig::SIGTERM, Sig::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe, and
        // replaces the default action (termination) that would skip every destructor.
        unsafe { sigaction(sig, &action) }
            .with_context(|| format!("installing a handler for {sig}"))?;
    }
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
// What is measured

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Idle,
    /// Guest memory workload, MiB dirtied per second.
    Dirty(u32),
    /// The TCP service under a closed-loop client.
    Tcp,
}

impl Workload {
    fn parse(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "idle" => Workload::Idle,
            "tcp" => Workload::Tcp,
            _ => {
                let n = t
                    .trim_end_matches("/s")
                    .trim_end_matches('m')
                    .parse::<u32>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| {
                        anyhow!("unknown workload {s:?} (known: idle, tcp, <N>M for dirty=<N>M/s)")
                    })?;
                Workload::Dirty(n)
            }
        })
    }

    fn label(self) -> String {
        match self {
            Workload::Idle => "idle".into(),
            Workload::Dirty(m) => format!("dirty={m}M/s"),
            Workload::Tcp => "tcp closed-loop".into(),
        }
    }

    fn guest_args(self) -> Option<String> {
        match self {
            Workload::Idle | Workload::Tcp => None,
            Workload::Dirty(m) => Some(format!("dirty={m}M/s,wss={WSS}")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Unprotected,
    /// Checkpoints per second.
    Protected(u32),
    /// Checkpoints per second, the replication stream encrypted.
    Encrypted(u32),
}

impl Mode {
    fn label(self) -> String {
        match self {
            Mode::Unprotected => "unprotected".into(),
            Mode::Protected(hz) => format!("protected {hz} Hz"),
            Mode::Encrypted(hz) => format!("protected {hz} Hz, encrypted"),
        }
    }

    fn hz(self) -> Option<u32> {
        match self {
            Mode::Unprotected => None,
            Mode::Protected(hz) | Mode::Encrypted(hz) => Some(hz),
        }
    }
}

/// Timings of one bench.
#[derive(Clone, Debug, Serialize)]
struct Plan {
    quick: bool,
    cell_secs: f64,
    warmup_secs: f64,
    rounds: u32,
    failovers: u32,
    rates: Vec<u32>,
    encrypt_rates: Vec<u32>,
    workloads: Vec<String>,
    mem: String,
    limit_reps: u32,
    tcp_bytes: usize,
    /// The PING probe waits a random time in `[0, probe_think_max)` after each reply.
    probe_think_max: Duration,
    heartbeat_timeout: Option<String>,
    #[serde(skip)]
    workload_list: Vec<Workload>,
}

impl Plan {
    fn new(a: &BenchArgs) -> Result<Self> {
        let workload_list = a
            .workloads
            .iter()
            .map(|w| Workload::parse(w))
            .collect::<Result<Vec<_>>>()?;
        if workload_list.is_empty() {
            bail!("--workloads is empty");
        }
        for &hz in a.rates.iter().chain(&a.encrypt_rates) {
            if !(1..=1000).contains(&hz) {
                bail!("checkpoint rate {hz}/s is out of range (1–1000)");
            }
        }
        let cell_secs = a.cell_secs.unwrap_or(if a.quick { 2.0 } else { 6.0 });
        if !(0.5..=600.0).contains(&cell_secs) {
            bail!("--cell-secs {cell_secs} is out of range (0.5–600)");
        }
        Ok(Plan {
            quick: a.quick,
            cell_secs,
            warmup_secs: if a.quick { 0.5 } else { 1.0 },
            rounds: a.rounds.unwrap_or(if a.quick { 1 } else { 2 }).max(1),
            failovers: a.failovers.unwrap_or(if a.quick { 3 } else { 10 }),
            rates: a.rates.clone(),
            encrypt_rates: a.encrypt_rates.clone(),
            workloads: workload_list.iter().map(|w| w.label()).collect(),
            mem: a.mem.clone(),
            limit_reps: if a.quick { 3 } else { 5 },
            tcp_bytes: if a.quick { 256 << 20 } else { 1 << 30 },
            probe_think_max: a
                .rates
                .iter()
                .map(|&hz| Duration::from_micros(1_000_000 / u64::from(hz)))
                .max()
                .unwrap_or_default()
                .max(PROBE_THINK_MIN),
            heartbeat_timeout: a.heartbeat_timeout.clone(),
            workload_list,
        })
    }

    fn modes(&self) -> Vec<Mode> {
        let mut m = vec![Mode::Unprotected];
        m.extend(self.rates.iter().map(|&hz| Mode::Protected(hz)));
        m.extend(self.encrypt_rates.iter().map(|&hz| Mode::Encrypted(hz)));
        m
    }

    /// Every (round, workload, mode) in the order run: rounds interleave, and every other
    /// round runs backwards so that slow drifts in background load hit every mode alike.
    fn schedule(&self) -> Vec<(u32, Workload, Mode)> {
        let mut out = Vec::new();
        for round in 1..=self.rounds {
            let mut cells = Vec::new();
            for &w in &self.workload_list {
                for m in self.modes() {
                    cells.push((round, w, m));
                }
            }
            if round % 2 == 0 {
                cells.reverse();
            }
            out.extend(cells);
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// Statistics

/// Median, p99 (nearest rank) and max of some samples.
#[derive(Clone, Copy, Debug, Serialize)]
struct Dist {
    n: usize,
    median: f64,
    p99: f64,
    max: f64,
}

fn quantile_sorted(v: &[f64], q: f64) -> f64 {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn dist(v: &[f64]) -> Option<Dist> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some(Dist {
        n: s.len(),
        median: quantile_sorted(&s, 0.5),
        p99: quantile_sorted(&s, 0.99),
        max: s[s.len() - 1],
    })
}

fn median(v: &[f64]) -> Option<f64> {
    dist(v).map(|d| d.median)
}

// ---------------------------------------------------------------------------------------
// Machine facts and physical limits

#[derive(Debug, Serialize)]
struct Machine {
    cores: usize,
    cpu: String,
    kernel: String,
    kvm_modules: Vec<String>,
    mem_total_mib: u64,
    loadavg_start: String,
    loadavg_end: String,
    started: String,
    twin_version: &'static str,
    commit: Option<String>,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem_total_mib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024);
    let kvm_modules = ["kvm_pvm", "kvm_intel", "kvm_amd", "kvm"]
        .iter()
        .filter(|m| Path::new("/sys/module").join(m).exists())
        .map(|m| m.to_string())
        .collect();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
        kernel: read_trim("/proc/sys/kernel/osrelease"),
        kvm_modules,
        mem_total_mib,
        loadavg_start: read_trim("/proc/loadavg"),
        loadavg_end: String::new(),
        started: utc_now(),
        twin_version: env!("CARGO_PKG_VERSION"),
        commit,
    }
}

/// The current UTC time as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[derive(Debug, Default, Serialize)]
struct Limits {
    /// GB/s copying random 4 KiB pages of a 256 MiB buffer into a contiguous one.
    memcpy_random_gbps: Vec<f64>,
    /// GB/s of one sequential 64 MiB copy.
    memcpy_seq_gbps: Vec<f64>,
    /// GB/s of one TCP stream over loopback, between two threads.
    loopback_tcp_gbps: Vec<f64>,
    /// GB/s of one TCP stream over the replication veth (primary → backup namespace).
    repl_veth_tcp_gbps: Vec<f64>,
    /// GB/s of the replication link over that veth: authenticated, plaintext records.
    link_plain_gbps: Vec<f64>,
    /// The same, encrypted (AES-256-GCM records): the throughput cost of `--encrypt`.
    link_encrypted_gbps: Vec<f64>,
}

impl Limits {
    fn us_per_page(&self) -> Option<f64> {
        median(&self.memcpy_random_gbps).map(|g| PAGE as f64 / (g * 1e9) * 1e6)
    }
}

/// xorshift64*: cheap reproducible pseudo-random numbers.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn measure_memcpy(reps: u32, limits: &mut Limits) {
    const SRC_PAGES: usize = 65_536; // 256 MiB: well beyond any cache
    const COPY_PAGES: usize = 16_384; // 64 MiB
                                      // Non-zero fills touch every page, so no page fault is timed.
    let src = vec![0x5au8; SRC_PAGES * PAGE];
    let mut dst = vec![0xa5u8; COPY_PAGES * PAGE];
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..reps {
        let idx: Vec<usize> = (0..COPY_PAGES)
            .map(|_| (xorshift(&mut rng) % SRC_PAGES as u64) as usize)
            .collect();
        let t = Instant::now();
        for (i, &p) in idx.iter().enumerate() {
            dst[i * PAGE..(i + 1) * PAGE].copy_from_slice(&src[p * PAGE..(p + 1) * PAGE]);
        }
        std::hint::black_box(&mut dst);
        let secs = t.elapsed().as_secs_f64();
        limits
            .memcpy_random_gbps
            .push((COPY_PAGES * PAGE) as f64 / secs / 1e9);
        let t = Instant::now();
        dst.copy_from_slice(&src[..COPY_PAGES * PAGE]);
        std::hint::black_box(&mut dst);
        let secs = t.elapsed().as_secs_f64();
        limits
            .memcpy_seq_gbps
            .push((COPY_PAGES * PAGE) as f64 / secs / 1e9);
    }
}

/// GB/s of one TCP stream from a socket in `from` to a listener on `ip` in `to`.
fn tcp_gbps(to: &Netns, ip: Ipv4Addr, from: &Netns, bytes: usize) -> Result<f64> {
    let listener = to
        .enter(|| TcpListener::bind((ip, 0)))?
        .with_context(|| format!("binding a TCP listener on {ip} in {}", to.name()))?;
    let addr = listener.local_addr()?;
    let mut tx = from
        .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?
        .with_context(|| format!("connecting to {addr} from {}", from.name()))?;
    let (mut rx, _) = listener.accept().context("accepting the TCP connection")?;
    rx.set_read_timeout(Some(Duration::from_secs(20)))?;
    tx.set_write_timeout(Some(Duration::from_secs(20)))?;
    std::thread::scope(|s| -> Result<f64> {
        let t = Instant::now();
        let writer = s.spawn(move || -> std::io::Result<()> {
            let buf = vec![0x5au8; 1 << 20];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len());
                tx.write_all(&buf[..n])?;
                left -= n;
            }
            Ok(())
        });
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < bytes {
            let n = rx.read(&mut buf).context("reading the TCP stream")?;
            if n == 0 {
                bail!("the TCP stream ended after {got} of {bytes} bytes");
            }
            got += n;
        }
        let secs = t.elapsed().as_secs_f64();
        writer
            .join()
            .map_err(|_| anyhow!("the TCP writer thread panicked"))?
            .context("writing the TCP stream")?;
        Ok(bytes as f64 / secs / 1e9)
    })
}

/// GB/s of the replication link (handshake with a fresh key, then `bytes` written) from `from`
/// to a listener on `ip` in `to`, plaintext or encrypted.
fn link_gbps(to: &Netns, ip: Ipv4Addr, from: &Netns, bytes: usize, encrypt: bool) -> Result<f64> {
    use twin_link::{Key, LinkConfig, ReadOutcome};
    let cfg = LinkConfig::with_key(Key::generate()?, encrypt);
    let listener = to
        .enter(|| TcpListener::bind((ip, 0)))?
        .with_context(|| format!("binding a TCP listener on {ip} in {}", to.name()))?;
    let addr = listener.local_addr()?;
    let tx = from
        .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?
        .with_context(|| format!("connecting to {addr} from {}", from.name()))?;
    let (rx, _) = listener.accept().context("accepting the link")?;
    let timeout = Duration::from_secs(20);
    std::thread::scope(|s| -> Result<f64> {
        let cfg2 = cfg.clone();
        let sender = s.spawn(move || -> Result<()> {
            let mut link = twin_link::connect(tx, &cfg2, timeout)?;
            let buf = vec![0x5au8; 1 << 20];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len());
                link.writer.write_all(&buf[..n])?;
                left -= n;
            }
            Ok(())
        });
        let mut link = twin_link::accept(rx, &cfg, timeout).context("link handshake")?;
        let t = Instant::now();
        let mut buf = bytes::BytesMut::with_capacity(2 << 20);
        let mut got = 0;
        while got < bytes {
            buf.clear();
            match link.reader.read_into(&mut buf, timeout)? {
                ReadOutcome::Data(n) => got += n,
                other => bail!("the link ended ({other:?}) after {got} of {bytes} bytes"),
            }
        }
        let secs = t.elapsed().as_secs_f64();
        sender
            .join()
            .map_err(|_| anyhow!("the link writer thread panicked"))??;
        Ok(bytes as f64 / secs / 1e9)
    })
}

fn measure_limits(plan: &Plan, limits: &mut Limits) -> Result<()> {
    check_interrupt()?;
    measure_memcpy(plan.limit_reps, limits);
    let ha = Topology::ha().context("building the ha topology for the TCP limits")?;
    for _ in 0..plan.limit_reps {
        check_interrupt()?;
        let lo = tcp_gbps(
            &ha.primary.ns,
            Ipv4Addr::LOCALHOST,
            &ha.primary.ns,
            plan.tcp_bytes,
        )
        .context("measuring loopback TCP bandwidth")?;
        limits.loopback_tcp_gbps.push(lo);
        check_interrupt()?;
        let veth = tcp_gbps(
            &ha.backup.ns,
            BACKUP_REPL_ADDR,
            &ha.primary.ns,
            plan.tcp_bytes,
        )
        .context("measuring TCP bandwidth over the replication veth")?;
        limits.repl_veth_tcp_gbps.push(veth);
        for encrypt in [false, true] {
            check_interrupt()?;
            let g = link_gbps(
                &ha.backup.ns,
                BACKUP_REPL_ADDR,
                &ha.primary.ns,
                plan.tcp_bytes,
                encrypt,
            )
            .context("measuring the replication link over the veth")?;
            if encrypt {
                limits.link_encrypted_gbps.push(g);
            } else {
                limits.link_plain_gbps.push(g);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// One cell run

/// One run of a (workload, mode) cell.
#[derive(Debug, Serialize)]
struct Run {
    workload: String,
    mode: String,
    hz: Option<u32>,
    round: u32,
    error: Option<String>,
    /// Seconds from nothing to measuring (topology, boot, sync, settle).
    setup_s: f64,
    window_s: f64,
    requests: u64,
    requests_per_s: f64,
    latency_us: Option<Dist>,
    guest_dirty_mib_s: Option<f64>,
    guest_pages_skipped: Option<u64>,
    checkpoints: u64,
    checkpoint_rate_hz: Option<f64>,
    /// Per epoch in the window: pause (µs), dirty pages, bytes sent.
    pause_us: Vec<f64>,
    dirty_pages: Vec<f64>,
    epoch_bytes: Vec<f64>,
    /// The primary's status at the end of the window.
    status: Option<serde_json::Value>,
    #[serde(skip)]
    key: (Workload, Mode),
    #[serde(skip)]
    latency_raw: Vec<f64>,
}

impl Run {
    fn new(round: u32, w: Workload, m: Mode) -> Self {
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
fn start_protected(
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
struct Slots {
    /// The VM process (`run`, or the primary's `protect`).
    vm: Option<TwinProcess>,
    backup: Option<TwinProcess>,
}

impl Slots {
    /// Turns `result` into a "false takeover" error if the backup took over while the
    /// primary was running: the backup must never do so, and a measurement during which two
    /// VMs answered for one is void.
    fn judge(&self, result: Result<()>) -> Result<()> {
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
    fn kill(&mut self) {
        if let Some(b) = self.backup.as_mut() {
            let _ = b.kill();
        }
        if let Some(v) = self.vm.as_mut() {
            let _ = v.kill();
        }
    }
}

fn connect(ha: &twin_lab::Ha, vm: &mut TwinProcess) -> Result<GuestClient> {
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
fn run_cell(plan: &Plan, run: &mut Run, keep_logs: &Path) -> Result<()> {
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
fn measure(
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
fn save_logs(dir: &TestDir, to: &Path) {
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

// ---------------------------------------------------------------------------------------
// Failover

#[derive(Debug, Default, Serialize)]
struct Failover {
    trial: u32,
    error: Option<String>,
    /// SIGKILL of the primary → first reply on the same connection (from the backup).
    client_visible_ms: Option<f64>,
    /// SIGKILL → the backup's `FAILOVER` line.
    kill_to_failover_line_ms: Option<f64>,
    /// The backup's own report (`detect_to_running_ms`, `restore_ms`, …).
    backup_report: Option<serde_json::Value>,
    replies_before_kill: u64,
    /// Replies the primary released just before it died that arrived after the SIGKILL.
    late_primary_replies: u64,
    replies_after_kill: u64,
    /// Every INCR reply was the previous one plus one, across the failover.
    consistent: Option<bool>,
}

#[derive(Default)]
struct LoopState {
    replies: Vec<(Instant, u64)>,
    error: Option<String>,
}

fn run_failover(plan: &Plan, trial: u32, keep_logs: &Path) -> Result<Failover> {
    let mut out = Failover {
        trial,
        ..Default::default()
    };
    let ha = Topology::ha().context("building the ha topology")?;
    let dir = TestDir::new("bench-failover").context("creating the run directory")?;
    let mut slots = Slots::default();
    let result = (|| -> Result<()> {
        start_protected(
            &ha,
            &dir,
            plan,
            FAILOVER_WORKLOAD,
            FAILOVER_HZ,
            false,
            &mut slots,
        )?;
        let mut client = connect(&ha, slots.vm.as_mut().expect("started"))?;
        client.set_request_timeout(Duration::from_secs(10))?;
        let state = Arc::new(Mutex::new(LoopState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, stop2) = (state.clone(), stop.clone());
        let looper = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) && !INTERRUPTED.load(Ordering::SeqCst) {
                match client.incr("failover") {
                    Ok(v) => st
                        .lock()
                        .expect("loop state")
                        .replies
                        .push((Instant::now(), v)),
                    Err(e) => {
                        st.lock().expect("loop state").error = Some(e.to_string());
                        return;
                    }
                }
            }
        });
        let result = kill_and_time(plan, &mut slots, &state, &mut out);
        stop.store(true, Ordering::SeqCst);
        // The loop ends within one request (10 s at worst, when the backup never answered).
        let _ = looper.join();
        result
    })();
    // A takeover before the SIGKILL is a false one.
    let result = if out.kill_to_failover_line_ms.is_none() {
        slots.judge(result)
    } else {
        result
    };
    slots.kill();
    if let Err(e) = result {
        if e.downcast_ref::<Interrupted>().is_some() {
            return Err(e);
        }
        save_logs(&dir, keep_logs);
        out.error = Some(format!("{e:#}"));
    }
    Ok(out)
}

/// SIGKILLs the primary while the client loop runs, and times the backup's takeover and
/// the first reply after it.
fn kill_and_time(
    plan: &Plan,
    slots: &mut Slots,
    state: &Mutex<LoopState>,
    out: &mut Failover,
) -> Result<()> {
    nap(Duration::from_secs_f64(plan.warmup_secs.max(1.0)))?;
    slots.judge(Ok(()))?;
    let backup = slots.backup.as_mut().expect("started");
    let mark = backup.mark();
    let killed = Instant::now();
    slots
        .vm
        .as_ref()
        .expect("started")
        .signal(Signal::Kill)
        .context("SIGKILL to the primary")?;
    let (_, line) = loop {
        check_interrupt()?;
        match backup.wait_for_line_after(mark, "FAILOVER", Duration::from_millis(250)) {
            Ok(found) => break found,
            Err(HarnessError::Timeout { .. }) if killed.elapsed() < Duration::from_secs(20) => {}
            Err(e) => return Err(anyhow!(e).context("waiting for the backup's FAILOVER")),
        }
    };
    out.kill_to_failover_line_ms = Some(killed.elapsed().as_secs_f64() * 1e3);
    out.backup_report = line
        .split_once("FAILOVER ")
        .and_then(|(_, j)| serde_json::from_str(j).ok());
    // The first reply after the backup noticed the primary was gone. A reply the primary
    // released just before it died may still arrive just after the SIGKILL; it says
    // nothing about the failover, so only replies after the detection count.
    let detect_ms = json_f64(
        out.backup_report
            .as_ref()
            .unwrap_or(&serde_json::Value::Null),
        &["detect_to_running_ms"],
    )
    .unwrap_or(0.0);
    let detected = killed
        + Duration::from_secs_f64(
            (out.kill_to_failover_line_ms.unwrap_or(0.0) - detect_ms).max(0.0) / 1e3,
        );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        check_interrupt()?;
        {
            let s = state.lock().expect("loop state");
            if let Some((t, _)) = s.replies.iter().find(|(t, _)| *t > detected) {
                out.client_visible_ms = Some((*t - killed).as_secs_f64() * 1e3);
                break;
            }
            if let Some(e) = &s.error {
                bail!("the client's connection failed across the failover: {e}");
            }
        }
        if Instant::now() > deadline {
            bail!("no reply on the client's connection within 20 s of the SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    nap(Duration::from_millis(300))?;
    let s = state.lock().expect("loop state");
    out.replies_before_kill = s.replies.iter().filter(|(t, _)| *t <= killed).count() as u64;
    out.late_primary_replies = s
        .replies
        .iter()
        .filter(|(t, _)| *t > killed && *t <= detected)
        .count() as u64;
    out.replies_after_kill = s.replies.len() as u64 - out.replies_before_kill;
    out.consistent = Some(s.replies.windows(2).all(|p| p[1].1 == p[0].1 + 1));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Aggregation and the report

/// One (workload, mode) cell over all its runs.
#[derive(Debug, Default)]
struct Agg {
    runs: usize,
    failed: usize,
    latency: Option<Dist>,
    rps: Option<f64>,
    dirty_mib_s: Option<f64>,
    skipped: u64,
    ckpt_hz: Option<f64>,
    pause: Option<Dist>,
    dirty_pages: Option<Dist>,
    epoch_bytes: Option<Dist>,
    sent_per_dirty: Option<f64>,
    /// stop_vcpus, capture_state, harvest_dirty, copy_pages (µs, session medians).
    split: [Option<f64>; 4],
    ack_us: Option<f64>,
    stretched: u64,
}

fn json_f64(v: &serde_json::Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

fn aggregate(runs: &[Run], w: Workload, m: Mode) -> Agg {
    let all: Vec<&Run> = runs.iter().filter(|r| r.key == (w, m)).collect();
    let ok: Vec<&Run> = all.iter().copied().filter(|r| r.error.is_none()).collect();
    let pool = |f: fn(&Run) -> &Vec<f64>| -> Vec<f64> {
        ok.iter().flat_map(|r| f(r).iter().copied()).collect()
    };
    let per_run = |f: &dyn Fn(&Run) -> Option<f64>| -> Option<f64> {
        median(&ok.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
    };
    let dirty = pool(|r| &r.dirty_pages);
    let bytes = pool(|r| &r.epoch_bytes);
    let dirty_bytes: f64 = dirty.iter().sum::<f64>() * PAGE as f64;
    let split_keys = ["stop_vcpus", "capture_state", "harvest_dirty", "copy_pages"];
    let mut split = [None; 4];
    for (i, k) in split_keys.iter().enumerate() {
        split[i] = per_run(&|r| {
            r.status
                .as_ref()
                .and_then(|s| json_f64(s, &["pause_split_us_median", k]))
        });
    }
    Agg {
        runs: all.len(),
        failed: all.len() - ok.len(),
        latency: dist(&pool(|r| &r.latency_raw)),
        rps: per_run(&|r| Some(r.requests_per_s)),
        dirty_mib_s: per_run(&|r| r.guest_dirty_mib_s),
        skipped: ok.iter().filter_map(|r| r.guest_pages_skipped).sum(),
        ckpt_hz: per_run(&|r| r.checkpoint_rate_hz),
        pause: dist(&pool(|r| &r.pause_us)),
        dirty_pages: dist(&dirty),
        epoch_bytes: dist(&bytes),
        sent_per_dirty: (dirty_bytes > 0.0).then(|| bytes.iter().sum::<f64>() / dirty_bytes),
        split,
        ack_us: per_run(&|r| {
            r.status
                .as_ref()
                .and_then(|s| json_f64(s, &["ack_latency_us", "median"]))
        }),
        stretched: ok
            .iter()
            .filter_map(|r| r.status.as_ref()?.get("stretched_epochs")?.as_u64())
            .sum(),
    }
}

fn f(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.prec$}"),
        _ => "—".into(),
    }
}

fn ms(us: Option<f64>) -> String {
    let v = us.map(|u| u / 1e3);
    match v {
        Some(x) if x < 1.0 => f(v, 3),
        Some(x) if x < 10.0 => f(v, 2),
        _ => f(v, 1),
    }
}

fn kib(b: Option<f64>) -> String {
    f(b.map(|b| b / 1024.0), 0)
}

fn signed_ms(us: Option<f64>) -> String {
    match us {
        Some(u) if u >= 0.0 => format!("+{}", ms(Some(u))),
        Some(u) => format!("−{}", ms(Some(-u))),
        None => "—".into(),
    }
}

struct Report<'a> {
    plan: &'a Plan,
    machine: &'a Machine,
    limits: &'a Limits,
    runs: &'a [Run],
    failovers: &'a [Failover],
    elapsed_s: f64,
}

fn gb(v: &[f64]) -> String {
    match (dist(v), v.iter().copied().reduce(f64::min)) {
        (Some(d), Some(lo)) => format!("{:.2} ({:.2}–{:.2}, n={})", d.median, lo, d.max, d.n),
        _ => "—".into(),
    }
}

fn markdown(r: &Report<'_>) -> String {
    let mut s = String::new();
    let m = r.machine;
    let p = r.plan;
    let line = |s: &mut String, l: &str| {
        s.push_str(l);
        s.push('\n');
    };
    line(&mut s, "# Twin bench: protected vs unprotected");
    line(&mut s, "");
    line(
        &mut s,
        &format!(
            "> **Noisy machine.** These numbers come from a shared {}-core machine ({}) where \
             other work runs at the same time, with KVM in software (PVM) when `kvm_pvm` is \
             listed below. Medians are robust to that; p99s and single cells are not. \
             Compare columns within this run, not with other machines.",
            m.cores, m.cpu
        ),
    );
    line(&mut s, "");
    line(
        &mut s,
        &format!(
            "- when: {} · took {:.0} s · `twin bench{}` · twin {}{}",
            m.started,
            r.elapsed_s,
            if p.quick { " --quick" } else { "" },
            m.twin_version,
            m.commit
                .as_ref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        ),
    );
    line(
        &mut s,
        &format!(
            "- machine: {} cores, {} MiB RAM, kernel {}, KVM modules: {}",
            m.cores,
            m.mem_total_mib,
            m.kernel,
            if m.kvm_modules.is_empty() {
                "none found".to_string()
            } else {
                m.kvm_modules.join(", ")
            }
        ),
    );
    line(
        &mut s,
        &format!(
            "- load average at start: {} · at end: {}",
            m.loadavg_start, m.loadavg_end
        ),
    );
    line(
        &mut s,
        &format!(
            "- per cell: fresh namespaces and processes, {:.1} s settle, {:.1} s measured, {} round(s) interleaved; guest {} RAM, memory workloads over wss={WSS}; \
             memory workloads probed by one PING at a time, each after a random think time in [0, {} ms) so that probes sample every phase of the checkpoint interval; the TCP workload by INCR back to back on one connection; backup heartbeat timeout: {}; \
             output commit: the `twin protect` default (eager: a checkpoint at most 2 ms after output starts waiting, so achieved Hz above the target are those extra checkpoints)",
            p.warmup_secs, p.cell_secs, p.rounds, p.mem, p.probe_think_max.as_millis(),
            p.heartbeat_timeout.as_deref().unwrap_or("the default")
        ),
    );
    line(&mut s, "");

    line(&mut s, "## Physical limits (same run, start and end)");
    line(&mut s, "");
    line(
        &mut s,
        "| what | GB/s median (min–max, n) | per 4 KiB page |",
    );
    line(&mut s, "| --- | --- | --- |");
    line(
        &mut s,
        &format!(
            "| memcpy, random 4 KiB pages of 256 MiB | {} | {} µs |",
            gb(&r.limits.memcpy_random_gbps),
            f(r.limits.us_per_page(), 2)
        ),
    );
    line(
        &mut s,
        &format!(
            "| memcpy, sequential 64 MiB | {} | |",
            gb(&r.limits.memcpy_seq_gbps)
        ),
    );
    line(
        &mut s,
        &format!(
            "| TCP over loopback, two threads | {} | |",
            gb(&r.limits.loopback_tcp_gbps)
        ),
    );
    line(
        &mut s,
        &format!(
            "| TCP over the replication veth (primary → backup namespace) | {} | |",
            gb(&r.limits.repl_veth_tcp_gbps)
        ),
    );
    line(
        &mut s,
        &format!(
            "| replication link over the veth, authenticated, plaintext | {} | |",
            gb(&r.limits.link_plain_gbps)
        ),
    );
    line(
        &mut s,
        &format!(
            "| replication link over the veth, encrypted (`--encrypt`, AES-256-GCM) | {} (× {} of plaintext) | |",
            gb(&r.limits.link_encrypted_gbps),
            f(
                median(&r.limits.link_encrypted_gbps)
                    .zip(median(&r.limits.link_plain_gbps))
                    .map(|(e, p)| e / p),
                2
            )
        ),
    );
    line(&mut s, "");

    let us_page = r.limits.us_per_page();
    let veth_gbps = median(&r.limits.repl_veth_tcp_gbps);
    line(&mut s, "## Checkpoints (protected)");
    line(&mut s, "");
    line(
        &mut s,
        "Pause and sizes are per epoch in the measured windows (pooled over rounds); the split \
         and the ack latency are the primary's session medians. *memcpy floor*: the median \
         dirty pages × the memcpy time per page above; *wire floor*: median bytes sent at the \
         veth TCP bandwidth above.",
    );
    line(&mut s, "");
    line(
        &mut s,
        "| workload | target Hz | achieved Hz | pause median ms | pause p99 ms | split µs: stop / state / harvest / copy | memcpy floor µs | dirty KiB/epoch median (p99) | sent KiB/epoch median (p99) | sent / dirty | wire floor ms | ack median ms | epochs (stretched) |",
    );
    line(
        &mut s,
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- | --- | ---: | ---: | ---: | --- |",
    );
    for &w in &p.workload_list {
        for mode in p.modes().into_iter().filter(|m| *m != Mode::Unprotected) {
            let a = aggregate(r.runs, w, mode);
            let hz = match mode {
                Mode::Encrypted(hz) => format!("{hz} enc."),
                m => m.hz().unwrap_or_default().to_string(),
            };
            if a.runs == a.failed {
                line(
                    &mut s,
                    &format!(
                        "| {} | {hz} | failed ({} of {} runs) | | | | | | | | | | |",
                        w.label(),
                        a.failed,
                        a.runs
                    ),
                );
                continue;
            }
            let split = a
                .split
                .iter()
                .map(|v| f(*v, 0))
                .collect::<Vec<_>>()
                .join(" / ");
            let dirty_bytes =
                |d: Option<Dist>, g: fn(&Dist) -> f64| d.as_ref().map(|d| g(d) * PAGE as f64);
            line(
                &mut s,
                &format!(
                    "| {} | {hz} | {} | {} | {} | {split} | {} | {} ({}) | {} ({}) | {} | {} | {} | {}{} ({}) |",
                    w.label(),
                    f(a.ckpt_hz, 1),
                    ms(a.pause.map(|d| d.median)),
                    ms(a.pause.map(|d| d.p99)),
                    f(
                        a.dirty_pages
                            .and_then(|d| us_page.map(|u| d.median * u)),
                        0
                    ),
                    kib(dirty_bytes(a.dirty_pages, |d| d.median)),
                    kib(dirty_bytes(a.dirty_pages, |d| d.p99)),
                    kib(a.epoch_bytes.map(|d| d.median)),
                    kib(a.epoch_bytes.map(|d| d.p99)),
                    f(a.sent_per_dirty, 2),
                    f(
                        a.epoch_bytes
                            .and_then(|d| veth_gbps.map(|g| d.median / (g * 1e9) * 1e3)),
                        3
                    ),
                    ms(a.ack_us),
                    a.pause.map_or(0, |d| d.n),
                    if a.failed > 0 {
                        format!(", {} run(s) failed", a.failed)
                    } else {
                        String::new()
                    },
                    a.stretched
                ),
            );
        }
    }
    line(&mut s, "");

    line(&mut s, "## The guest: throughput and reply latency");
    line(&mut s, "");
    line(
        &mut s,
        "Guest work: the memory workload's achieved dirty rate (MiB/s of guest time), or \
         requests per second of the closed loop. Ratio: protected / unprotected (medians over \
         runs). Added latency: protected − unprotected (medians, and p99s). Replies of the \
         memory workloads are PING probes; of the TCP workload, the closed loop's INCRs.",
    );
    line(&mut s, "");
    line(
        &mut s,
        "| workload | mode | guest work | ratio | reply median ms | reply p99 ms | added median ms | added p99 ms | replies |",
    );
    line(
        &mut s,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    );
    for &w in &p.workload_list {
        let base = aggregate(r.runs, w, Mode::Unprotected);
        let work = |a: &Agg| match w {
            Workload::Idle => None,
            Workload::Dirty(_) => a.dirty_mib_s,
            Workload::Tcp => a.rps,
        };
        for mode in p.modes() {
            let a = aggregate(r.runs, w, mode);
            if a.runs == a.failed {
                line(
                    &mut s,
                    &format!(
                        "| {} | {} | failed ({} of {} runs) | | | | | | |",
                        w.label(),
                        mode.label(),
                        a.failed,
                        a.runs
                    ),
                );
                continue;
            }
            let unit = match w {
                Workload::Idle => "",
                Workload::Dirty(_) => " MiB/s",
                Workload::Tcp => " req/s",
            };
            let ratio = match (work(&a), work(&base)) {
                (Some(x), Some(b)) if b > 0.0 => Some(x / b),
                _ => None,
            };
            let added = |g: fn(&Dist) -> f64| match (a.latency, base.latency) {
                (Some(x), Some(b)) if mode != Mode::Unprotected => Some(g(&x) - g(&b)),
                _ => None,
            };
            let mut work_s = f(work(&a), 0);
            if work_s != "—" {
                work_s.push_str(unit);
            }
            if a.skipped > 0 {
                work_s.push_str(&format!(" ({} pages skipped)", a.skipped));
            }
            line(
                &mut s,
                &format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {}{} |",
                    w.label(),
                    mode.label(),
                    work_s,
                    f(ratio, if ratio.is_some_and(|r| r < 0.1) { 4 } else { 2 }),
                    ms(a.latency.map(|d| d.median)),
                    ms(a.latency.map(|d| d.p99)),
                    signed_ms(added(|d| d.median)),
                    signed_ms(added(|d| d.p99)),
                    a.latency.map_or(0, |d| d.n),
                    if a.failed > 0 {
                        format!(" ({} run(s) failed)", a.failed)
                    } else {
                        String::new()
                    }
                ),
            );
        }
    }
    line(&mut s, "");

    line(&mut s, "## Failover (SIGKILL of the primary)");
    line(&mut s, "");
    line(
        &mut s,
        &format!("Protected at {FAILOVER_HZ} Hz, `{}`, one client connection sending INCR back to back. \
         *Client-visible*: SIGKILL → the first reply on that same connection from the \
         backup (replies the primary released just before dying, arriving after the SIGKILL, \
         do not count); it includes the client's TCP retransmission timeout (≥ 200 ms on Linux) for \
         the request whose reply died with the primary. *Detect → running*: the backup's own \
         figure (heartbeat silence noticed → VM running).", FAILOVER_WORKLOAD.label()),
    );
    line(&mut s, "");
    let ok: Vec<&Failover> = r.failovers.iter().filter(|t| t.error.is_none()).collect();
    let col = |g: &dyn Fn(&Failover) -> Option<f64>| {
        dist(&ok.iter().filter_map(|t| g(t)).collect::<Vec<_>>())
    };
    let row = |s: &mut String, name: &str, d: Option<Dist>| {
        let (med, p99, max, n) = d.map_or(("—".into(), "—".into(), "—".into(), 0), |d| {
            (
                f(Some(d.median), 1),
                f(Some(d.p99), 1),
                f(Some(d.max), 1),
                d.n,
            )
        });
        s.push_str(&format!("| {name} | {med} | {p99} | {max} | {n} |\n"));
    };
    line(&mut s, "| ms | median | p99 | max | n |");
    line(&mut s, "| --- | ---: | ---: | ---: | ---: |");
    row(
        &mut s,
        "client-visible: SIGKILL → first reply",
        col(&|t| t.client_visible_ms),
    );
    row(
        &mut s,
        "SIGKILL → backup prints FAILOVER",
        col(&|t| t.kill_to_failover_line_ms),
    );
    row(
        &mut s,
        "backup: detect → running",
        col(&|t| json_f64(t.backup_report.as_ref()?, &["detect_to_running_ms"])),
    );
    row(
        &mut s,
        "backup: restore",
        col(&|t| json_f64(t.backup_report.as_ref()?, &["restore_ms"])),
    );
    let consistent = ok.iter().filter(|t| t.consistent == Some(true)).count();
    line(&mut s, "");
    line(
        &mut s,
        &format!(
            "Counter continuity across the failover (every INCR reply = previous + 1): {consistent} of {} successful trials; {} trial(s) failed.",
            ok.len(),
            r.failovers.len() - ok.len()
        ),
    );
    let failed: Vec<String> = r
        .runs
        .iter()
        .filter_map(|run| {
            run.error.as_ref().map(|e| {
                format!(
                    "- {} / {} round {}: {}",
                    run.workload,
                    run.mode,
                    run.round,
                    first_line(e)
                )
            })
        })
        .chain(r.failovers.iter().filter_map(|t| {
            t.error
                .as_ref()
                .map(|e| format!("- failover trial {}: {}", t.trial, first_line(e)))
        }))
        .collect();
    if !failed.is_empty() {
        let protected = r.runs.iter().filter(|x| x.hz.is_some()).count();
        let false_takeovers = r
            .runs
            .iter()
            .filter(|x| {
                x.error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("false takeover"))
            })
            .count();
        line(&mut s, "");
        line(&mut s, "## Failed runs (logs in `failed/`)");
        line(&mut s, "");
        line(
            &mut s,
            &format!(
                "{false_takeovers} of {protected} protected runs ended in a false takeover (the backup started the VM while the primary ran). Tables above use the runs that succeeded.",
            ),
        );
        line(&mut s, "");
        for l in failed {
            line(&mut s, &l);
        }
    }
    s
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

// ---------------------------------------------------------------------------------------
// The plot

mod plot {
    use super::*;
    use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
    use plotters::prelude::*;

    /// Name, colour index, solid points, dashed points.
    type Series = (String, usize, Vec<(f64, f64)>, Vec<(f64, f64)>);
    /// Name, colour index, points.
    type Scatter = (String, usize, Vec<(f64, f64)>);

    /// A colour per workload, distinct on white.
    fn color(i: usize) -> RGBAColor {
        const C: [RGBColor; 6] = [
            RGBColor(214, 39, 40),
            RGBColor(44, 160, 44),
            RGBColor(148, 103, 189),
            RGBColor(31, 119, 180),
            RGBColor(255, 127, 14),
            RGBColor(23, 190, 207),
        ];
        C[i % C.len()].to_rgba()
    }

    fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
        anyhow!("drawing the plot: {e:?}")
    }

    fn bounds(series: &[Series], log: bool) -> (f64, f64) {
        let ys = series
            .iter()
            .flat_map(|s| s.2.iter().chain(s.3.iter()).map(|p| p.1))
            .filter(|y| y.is_finite() && (!log || *y > 0.0));
        let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
        if lo > hi {
            return if log { (0.01, 1.0) } else { (0.0, 1.0) };
        }
        if log {
            (lo / 2.0, hi * 2.0)
        } else {
            (0.0, (hi * 1.15).max(1.05))
        }
    }

    fn panel<Y>(
        area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
        title: &str,
        y_desc: &str,
        x_max: f64,
        y: Y,
        series: &[Series],
    ) -> Result<()>
    where
        Y: AsRangedCoord<Value = f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, y)
            .map_err(err)?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(238, 238, 238))
            .x_desc("checkpoints per second")
            .y_desc(y_desc)
            .draw()
            .map_err(err)?;
        for (name, i, solid, dashed) in series {
            let color = color(*i);
            chart
                .draw_series(LineSeries::new(
                    solid.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(solid.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
            if !dashed.is_empty() {
                chart
                    .draw_series(DashedLineSeries::new(
                        dashed.iter().copied(),
                        6,
                        4,
                        color.stroke_width(1),
                    ))
                    .map_err(err)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()
            .map_err(err)?;
        Ok(())
    }

    pub(super) fn draw(path: &Path, r: &Report<'_>) -> Result<()> {
        let p = r.plan;
        let x_max = p.rates.iter().copied().max().unwrap_or(100) as f64 * 1.1;
        let mut pause = Vec::new();
        let mut ratio = Vec::new();
        let mut added = Vec::new();
        let mut sent: Vec<Scatter> = Vec::new();
        let mut rates = p.rates.clone();
        rates.sort_unstable();
        for (wi, &w) in p.workload_list.iter().enumerate() {
            let base = aggregate(r.runs, w, Mode::Unprotected);
            let mut med = Vec::new();
            let mut p99 = Vec::new();
            let mut rat = Vec::new();
            let mut add = Vec::new();
            let mut sd = Vec::new();
            for &hz in &rates {
                let a = aggregate(r.runs, w, Mode::Protected(hz));
                let x = f64::from(hz);
                if let Some(d) = a.pause {
                    med.push((x, d.median / 1e3));
                    p99.push((x, d.p99 / 1e3));
                }
                let work = |a: &Agg| match w {
                    Workload::Idle => None,
                    Workload::Dirty(_) => a.dirty_mib_s,
                    Workload::Tcp => a.rps,
                };
                if let (Some(v), Some(b)) = (work(&a), work(&base)) {
                    if b > 0.0 {
                        rat.push((x, v / b));
                    }
                }
                if let (Some(l), Some(b)) = (a.latency, base.latency) {
                    add.push((x, ((l.median - b.median) / 1e3).max(0.001)));
                }
                if let (Some(d), Some(b)) = (a.dirty_pages, a.epoch_bytes) {
                    sd.push((
                        (d.median * PAGE as f64 / (1 << 20) as f64).max(1e-3),
                        (b.median / (1 << 20) as f64).max(1e-3),
                    ));
                }
            }
            pause.push((w.label(), wi, med, p99));
            if !rat.is_empty() {
                ratio.push((w.label(), wi, rat, Vec::new()));
            }
            added.push((w.label(), wi, add, Vec::new()));
            sent.push((w.label(), wi, sd));
        }

        let root = SVGBackend::new(path, (1400, 1000)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root
            .titled(
                "twin bench: protected vs unprotected (noisy shared 2-core machine; medians)",
                ("sans-serif", 22),
            )
            .map_err(err)?;
        let areas = root.split_evenly((2, 2));
        let (lo, hi) = bounds(&pause, true);
        panel(
            &areas[0],
            "Pause per checkpoint (solid median, dashed p99)",
            "ms (log)",
            x_max,
            (lo..hi).log_scale(),
            &pause,
        )?;
        let (_, hi) = bounds(&ratio, false);
        panel(
            &areas[1],
            "Guest throughput, protected / unprotected",
            "ratio",
            x_max,
            0f64..hi,
            &ratio,
        )?;
        let (lo, hi) = bounds(&added, true);
        panel(
            &areas[2],
            "Reply latency added (median)",
            "ms (log)",
            x_max,
            (lo..hi).log_scale(),
            &added,
        )?;
        sent_panel(&areas[3], &sent)?;
        root.present().map_err(err)?;
        Ok(())
    }

    fn sent_panel(
        area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
        sent: &[Scatter],
    ) -> Result<()> {
        let vals = sent
            .iter()
            .flat_map(|s| s.2.iter().flat_map(|p| [p.0, p.1]));
        let (lo, hi) = vals.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
        let (lo, hi) = if lo > hi {
            (0.001, 1.0)
        } else {
            (lo / 2.0, hi * 2.0)
        };
        let mut chart = ChartBuilder::on(area)
            .caption(
                "Bytes sent vs dirty bytes per epoch (median per rate)",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d((lo..hi).log_scale(), (lo..hi).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(238, 238, 238))
            .x_desc("dirty MiB per epoch (log)")
            .y_desc("sent MiB per epoch (log)")
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(vec![(lo, lo), (hi, hi)], BLACK.mix(0.4)))
            .map_err(err)?
            .label("sent = dirty")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.4)));
        for (name, i, pts) in sent {
            let color = color(*i);
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| Circle::new((x + 9, y), 4, color.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()
            .map_err(err)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The command

#[derive(Serialize)]
struct JsonReport<'a> {
    note: &'static str,
    plan: &'a Plan,
    machine: &'a Machine,
    limits: &'a Limits,
    runs: &'a [Run],
    failovers: &'a [Failover],
    elapsed_s: f64,
}

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
        plan.workload_list.len(),
        plan.modes().len(),
        plan.rounds,
        plan.cell_secs,
        plan.failovers,
        machine.cores
    );
    let mut limits = Limits::default();
    let mut runs: Vec<Run> = Vec::new();
    let mut failovers: Vec<Failover> = Vec::new();
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
        for trial in 1..=plan.failovers {
            check_interrupt()?;
            let logs = failed_dir.join(format!("failover-{trial}"));
            let t = run_failover(&plan, trial, &logs)
                .with_context(|| format!("failover trial {trial}"))?;
            match &t.error {
                None => eprintln!(
                    "bench: failover {trial}/{}: client-visible {} ms, backup detect→running {} ms, consistent: {}",
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
                    "bench: failover {trial}/{}: FAILED: {e} (logs in {})",
                    plan.failovers,
                    logs.display()
                ),
            }
            failovers.push(t);
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
        elapsed_s,
    };
    let json_path = args.out.join("bench.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&json)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let svg_path = args.out.join("bench.svg");
    plot::draw(&svg_path, &report).with_context(|| format!("writing {}", svg_path.display()))?;
    println!("{md}");
    eprintln!(
        "bench: wrote {}, {}, {} in {:.0} s",
        md_path.display(),
        json_path.display(),
        svg_path.display(),
        elapsed_s
    );
    let failures = runs.iter().filter(|r| r.error.is_some()).count()
        + failovers.iter().filter(|t| t.error.is_some()).count();
    Ok(if failures > 0 {
        eprintln!("bench: {failures} run(s) failed; see the report");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
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

    #[test]
    fn workloads_parse() {
        assert_eq!(Workload::parse("idle").unwrap(), Workload::Idle);
        assert_eq!(Workload::parse("64M").unwrap(), Workload::Dirty(64));
        assert_eq!(Workload::parse("256m/s").unwrap(), Workload::Dirty(256));
        assert_eq!(Workload::parse("TCP").unwrap(), Workload::Tcp);
        assert!(Workload::parse("0M").is_err());
        assert!(Workload::parse("lots").is_err());
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let d = dist(&v).unwrap();
        assert_eq!((d.n, d.median, d.p99, d.max), (100, 50.0, 99.0, 100.0));
        assert!(dist(&[]).is_none());
    }

    #[test]
    fn dates_are_civil() {
        assert!(utc_now().ends_with(" UTC"));
        assert_eq!(utc_now().len(), "2025-01-01 00:00:00 UTC".len());
    }
}
