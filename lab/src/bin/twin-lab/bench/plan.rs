//! What a bench runs: the workloads, the modes (unprotected, protected at a rate,
//! encrypted), the timings of the run and the order of its cells.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde::Serialize;

use super::restore::RestorePlan;
use super::BenchArgs;

/// Every section of a bench, in the order run.
pub(super) const SECTIONS: [&str; 4] = ["main", "compress", "failover", "restore"];

/// The guest's page size.
pub(super) const PAGE: usize = 4096;
/// Port the backup listens on for replication.
pub(super) const REPL_PORT: u16 = 7700;
/// Shortest upper bound of the PING probe's random think time (the longest checkpoint
/// interval measured is used when longer).
const PROBE_THINK_MIN: Duration = Duration::from_millis(100);
/// Working set of the memory workloads.
pub(super) const WSS: &str = "128M";
/// The protected VM of the failover trials: the product's default interval, a guest that
/// writes memory.
pub(super) const FAILOVER_WORKLOAD: Workload = Workload::Dirty(16);
pub(super) const FAILOVER_HZ: u32 = 40;
/// The Redis workload is measured unprotected and protected at this rate only (each of its
/// runs is a whole matrix of redis-benchmark runs).
pub(super) const REDIS_HZ: u32 = 40;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Workload {
    Idle,
    /// Guest memory workload, MiB dirtied per second.
    Dirty(u32),
    /// The TCP service under a closed-loop client.
    Tcp,
    /// `redis-benchmark` against the guest's RESP2 port (see `redis.rs`).
    Redis,
    /// The compression section's memory workload ([`COMPRESS_DIRTY`] MiB/s): each write
    /// changes `wfrac` percent of a page, with text-like data (`text`) or incompressible.
    Write {
        wfrac: u8,
        text: bool,
    },
    /// The guest's disk workload, MiB written per second (4 KiB blocks, a FLUSH after
    /// each), on a sparse image of [`DISK_SIZE`] (`--disk`; the backup keeps its replica
    /// under `--replica-dir`).
    Disk(u32),
}

/// Dirty rate of the compression section's workloads, MiB/s.
pub(super) const COMPRESS_DIRTY: u32 = 64;
/// Their working set: half the default delta cache (64 MiB), so that a page is still
/// cached when it is written again. (A larger one written round-robin evicts every page
/// before its next write: no deltas at all — `--compress-cache` must exceed the pages
/// rewritten between two writes of one page.)
pub(super) const COMPRESS_WSS: &str = "32M";

/// Size of the disk image of the disk workload.
pub(super) const DISK_SIZE: u64 = 64 << 20;
/// Its working set, at the end of the disk.
pub(super) const DWSS: &str = "32M";

impl Workload {
    pub(super) fn parse(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "idle" => Workload::Idle,
            "tcp" => Workload::Tcp,
            "redis" => Workload::Redis,
            d if d.starts_with("disk") => {
                let n = d
                    .trim_start_matches("disk")
                    .trim_start_matches('=')
                    .trim_end_matches("/s")
                    .trim_end_matches('m')
                    .parse::<u32>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| anyhow!("bad disk workload {s:?} (disk<N>M: disk=<N>M/s)"))?;
                Workload::Disk(n)
            }
            _ => {
                let n = t
                    .trim_end_matches("/s")
                    .trim_end_matches('m')
                    .parse::<u32>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| {
                        anyhow!("unknown workload {s:?} (known: idle, tcp, redis, <N>M for dirty=<N>M/s)")
                    })?;
                Workload::Dirty(n)
            }
        })
    }

    /// A workload of the compression section: `5`, `25`, `100` (percent of a page a write
    /// changes, text-like data) or `random` (whole pages of incompressible data: today's
    /// memory workload); `25r` for a quarter of a page, incompressible.
    pub(super) fn parse_write(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        if t == "random" {
            return Ok(Workload::Write {
                wfrac: 100,
                text: false,
            });
        }
        let (n, text) = match t.strip_suffix('r') {
            Some(n) => (n, false),
            None => (t.as_str(), true),
        };
        match n.trim_end_matches('%').parse::<u8>() {
            Ok(wfrac @ 1..=100) => Ok(Workload::Write { wfrac, text }),
            _ => bail!("bad compression workload {s:?} (known: 1–100 for a write changing that percent of a page with text, 25r for incompressible data, random)"),
        }
    }

    pub(super) fn label(self) -> String {
        match self {
            Workload::Write {
                wfrac: 100,
                text: false,
            } => format!("random pages, {COMPRESS_DIRTY}M/s"),
            Workload::Write { wfrac, text } => format!(
                "wfrac={wfrac}%{}, {COMPRESS_DIRTY}M/s",
                if text { " text" } else { " random" }
            ),
            Workload::Idle => "idle".into(),
            Workload::Dirty(m) => format!("dirty={m}M/s"),
            Workload::Tcp => "tcp closed-loop".into(),
            Workload::Redis => "redis-benchmark".into(),
            Workload::Disk(m) => format!("disk={m}M/s"),
        }
    }

    pub(super) fn guest_args(self) -> Option<String> {
        match self {
            Workload::Idle | Workload::Tcp | Workload::Redis => None,
            Workload::Dirty(m) => Some(format!("dirty={m}M/s,wss={WSS}")),
            Workload::Disk(m) => Some(format!("disk={m}M/s,dwss={DWSS}")),
            Workload::Write { wfrac, text } => Some(format!(
                "dirty={COMPRESS_DIRTY}M/s,wss={COMPRESS_WSS},wfrac={wfrac},wdata={}",
                if text { "text" } else { "random" }
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Unprotected,
    /// Checkpoints per second.
    Protected(u32),
    /// Checkpoints per second, the replication stream encrypted.
    Encrypted(u32),
    /// Checkpoints per second, every dirty page copied inside the pause (`--no-precopy`).
    NoPrecopy(u32),
    /// Checkpoints per second, pages raw (`--compress none`: before protocol 4).
    Uncompressed(u32),
}

impl Mode {
    pub(super) fn label(self) -> String {
        match self {
            Mode::Unprotected => "unprotected".into(),
            Mode::Protected(hz) => format!("protected {hz} Hz"),
            Mode::Encrypted(hz) => format!("protected {hz} Hz, encrypted"),
            Mode::NoPrecopy(hz) => format!("protected {hz} Hz, no pre-copy"),
            Mode::Uncompressed(hz) => format!("protected {hz} Hz, --compress none"),
        }
    }

    pub(super) fn hz(self) -> Option<u32> {
        match self {
            Mode::Unprotected => None,
            Mode::Protected(hz)
            | Mode::Encrypted(hz)
            | Mode::NoPrecopy(hz)
            | Mode::Uncompressed(hz) => Some(hz),
        }
    }
}

/// Timings of one bench.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Plan {
    pub(super) quick: bool,
    pub(super) cell_secs: f64,
    pub(super) warmup_secs: f64,
    pub(super) rounds: u32,
    pub(super) failovers: u32,
    pub(super) rates: Vec<u32>,
    pub(super) encrypt_rates: Vec<u32>,
    pub(super) no_precopy_rates: Vec<u32>,
    pub(super) workloads: Vec<String>,
    pub(super) mem: String,
    pub(super) limit_reps: u32,
    pub(super) tcp_bytes: usize,
    /// Seconds each redis-benchmark test (SET, GET, INCR) of the Redis workload lasts.
    pub(super) redis_test_secs: f64,
    /// The PING probe waits a random time in `[0, probe_think_max)` after each reply.
    pub(super) probe_think_max: Duration,
    pub(super) heartbeat_timeout: Option<String>,
    pub(super) eager_gap: Option<String>,
    /// The compression section: its workloads and checkpoint rate.
    pub(super) compress_workloads: Vec<String>,
    pub(super) compress_hz: u32,
    /// The sections run (`main`, `compress`, `failover`, `restore`).
    pub(super) sections: Vec<String>,
    /// The restore section, when it runs.
    pub(super) restore: Option<RestorePlan>,
    #[serde(skip)]
    pub(super) workload_list: Vec<Workload>,
    #[serde(skip)]
    pub(super) compress_list: Vec<Workload>,
}

impl Plan {
    pub(super) fn new(a: &BenchArgs) -> Result<Self> {
        let sections = select_sections(a.sections.iter().chain(&a.sections_opt))?;
        let on = |s: &str| sections.iter().any(|x| x == s);
        let mut workload_list = a
            .workloads
            .iter()
            .map(|w| Workload::parse(w))
            .collect::<Result<Vec<_>>>()?;
        let mut compress_list = a
            .compress_workloads
            .iter()
            .map(|w| Workload::parse_write(w))
            .collect::<Result<Vec<_>>>()?;
        if !on("main") {
            workload_list.clear();
        }
        if !on("compress") {
            compress_list.clear();
        }
        if workload_list.is_empty() && compress_list.is_empty() && !on("restore") {
            bail!("nothing to run: --workloads and --compress-workloads are empty (or their sections not selected), and the restore section is not selected");
        }
        let restore = on("restore").then(|| RestorePlan {
            mems: if a.restore_mem.is_empty() {
                vec![if a.quick { "1G" } else { "4G" }.to_string()]
            } else {
                a.restore_mem.clone()
            },
            trials: a
                .restore_trials
                .unwrap_or(if a.quick { 1 } else { 3 })
                .max(1),
            dirty: a.restore_dirty.clone(),
            wss: a
                .restore_wss
                .clone()
                .unwrap_or_else(|| if a.quick { "256M" } else { "1G" }.into()),
            cold: a
                .restore_cold
                .clone()
                .unwrap_or_else(|| if a.quick { "256M" } else { "2G" }.into()),
            disk_file_mib: if a.quick { 256 } else { 1024 },
            failover: true,
        });
        if !(1..=1000).contains(&a.compress_hz) {
            bail!("--compress-hz {} is out of range (1–1000)", a.compress_hz);
        }
        for &hz in a
            .rates
            .iter()
            .chain(&a.encrypt_rates)
            .chain(&a.no_precopy_rates)
        {
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
            failovers: if on("failover") {
                a.failovers.unwrap_or(if a.quick { 3 } else { 10 })
            } else {
                0
            },
            rates: a.rates.clone(),
            encrypt_rates: a.encrypt_rates.clone(),
            no_precopy_rates: a.no_precopy_rates.clone(),
            workloads: workload_list.iter().map(|w| w.label()).collect(),
            mem: a.mem.clone(),
            limit_reps: if a.quick { 3 } else { 5 },
            tcp_bytes: if a.quick { 256 << 20 } else { 1 << 30 },
            redis_test_secs: if a.quick { 1.0 } else { 2.0 },
            probe_think_max: a
                .rates
                .iter()
                .map(|&hz| Duration::from_micros(1_000_000 / u64::from(hz)))
                .max()
                .unwrap_or_default()
                .max(PROBE_THINK_MIN),
            heartbeat_timeout: a.heartbeat_timeout.clone(),
            eager_gap: a.eager_gap.clone(),
            compress_workloads: compress_list.iter().map(|w| w.label()).collect(),
            compress_hz: a.compress_hz,
            sections,
            restore,
            workload_list,
            compress_list,
        })
    }

    pub(super) fn modes(&self) -> Vec<Mode> {
        let mut m = vec![Mode::Unprotected];
        m.extend(self.rates.iter().map(|&hz| Mode::Protected(hz)));
        m.extend(self.encrypt_rates.iter().map(|&hz| Mode::Encrypted(hz)));
        m.extend(self.no_precopy_rates.iter().map(|&hz| Mode::NoPrecopy(hz)));
        m
    }

    /// The modes `w` is measured in: every mode, except for the Redis workload, which is
    /// measured unprotected and at [`REDIS_HZ`].
    pub(super) fn modes_for(&self, w: Workload) -> Vec<Mode> {
        match w {
            Workload::Redis => vec![Mode::Unprotected, Mode::Protected(REDIS_HZ)],
            // Compression on (the default) and off, side by side.
            Workload::Write { .. } => vec![
                Mode::Protected(self.compress_hz),
                Mode::Uncompressed(self.compress_hz),
            ],
            _ => self.modes(),
        }
    }

    /// Every (round, workload, mode) in the order run: rounds interleave, and every other
    /// round runs backwards so that slow drifts in background load hit every mode alike.
    pub(super) fn schedule(&self) -> Vec<(u32, Workload, Mode)> {
        let mut out = Vec::new();
        for round in 1..=self.rounds {
            let mut cells = Vec::new();
            for &w in self.workload_list.iter().chain(&self.compress_list) {
                for m in self.modes_for(w) {
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

/// The sections named (all when none is), each known, in the order run.
fn select_sections<'a>(named: impl Iterator<Item = &'a String>) -> Result<Vec<String>> {
    let named: Vec<String> = named.map(|s| s.trim().to_ascii_lowercase()).collect();
    for n in &named {
        if !SECTIONS.contains(&n.as_str()) {
            bail!(
                "unknown bench section {n:?} (known: {})",
                SECTIONS.join(", ")
            );
        }
    }
    Ok(SECTIONS
        .iter()
        .filter(|s| named.is_empty() || named.iter().any(|n| n == *s))
        .map(|s| s.to_string())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_default_to_all_and_keep_their_order() {
        let s = |v: &[&str]| {
            let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
            select_sections(v.iter())
        };
        assert_eq!(s(&[]).unwrap(), SECTIONS);
        assert_eq!(s(&["restore", "MAIN"]).unwrap(), ["main", "restore"]);
        assert!(s(&["clone"]).is_err());
    }

    #[test]
    fn workloads_parse() {
        assert_eq!(Workload::parse("idle").unwrap(), Workload::Idle);
        assert_eq!(Workload::parse("64M").unwrap(), Workload::Dirty(64));
        assert_eq!(Workload::parse("256m/s").unwrap(), Workload::Dirty(256));
        assert_eq!(Workload::parse("TCP").unwrap(), Workload::Tcp);
        assert_eq!(Workload::parse("redis").unwrap(), Workload::Redis);
        assert_eq!(Workload::parse("disk8M").unwrap(), Workload::Disk(8));
        assert_eq!(Workload::parse("disk=2M/s").unwrap(), Workload::Disk(2));
        assert!(Workload::parse("disk").is_err());
        assert!(Workload::parse("0M").is_err());
        assert!(Workload::parse("lots").is_err());
        assert_eq!(
            Workload::parse_write("25").unwrap(),
            Workload::Write {
                wfrac: 25,
                text: true
            }
        );
        assert_eq!(
            Workload::parse_write("random").unwrap(),
            Workload::Write {
                wfrac: 100,
                text: false
            }
        );
        assert_eq!(
            Workload::parse_write("25r").unwrap(),
            Workload::Write {
                wfrac: 25,
                text: false
            }
        );
        assert!(Workload::parse_write("0").is_err());
        assert!(Workload::parse_write("101").is_err());
    }
}
