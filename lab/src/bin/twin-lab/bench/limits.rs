//! Facts about the machine, and its physical limits measured in the same run: memcpy of
//! random pages, TCP over loopback and over the replication veth, the replication link
//! plaintext and encrypted.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use twin_lab::{Netns, Topology, BACKUP_REPL_ADDR};

use super::check_interrupt;
use super::plan::{Plan, PAGE};
use super::stats::{median, xorshift};

#[derive(Debug, Serialize)]
pub(super) struct Machine {
    pub(super) cores: usize,
    pub(super) cpu: String,
    pub(super) kernel: String,
    pub(super) kvm_modules: Vec<String>,
    pub(super) mem_total_mib: u64,
    pub(super) loadavg_start: String,
    pub(super) loadavg_end: String,
    pub(super) started: String,
    pub(super) twin_version: &'static str,
    pub(super) commit: Option<String>,
}

pub(super) fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub(super) fn machine() -> Machine {
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
pub(super) struct Limits {
    /// GB/s copying random 4 KiB pages of a 256 MiB buffer into a contiguous one.
    pub(super) memcpy_random_gbps: Vec<f64>,
    /// GB/s of one sequential 64 MiB copy.
    pub(super) memcpy_seq_gbps: Vec<f64>,
    /// GB/s of one TCP stream over loopback, between two threads.
    pub(super) loopback_tcp_gbps: Vec<f64>,
    /// GB/s of one TCP stream over the replication veth (primary → backup namespace).
    pub(super) repl_veth_tcp_gbps: Vec<f64>,
    /// GB/s of the replication link over that veth: authenticated, plaintext records.
    pub(super) link_plain_gbps: Vec<f64>,
    /// The same, encrypted (AES-256-GCM records): the throughput cost of `--encrypt`.
    pub(super) link_encrypted_gbps: Vec<f64>,
    /// µs per 4 KiB `pwrite` + `fdatasync` on the file system the disk images are on.
    pub(super) disk_4k_fsync_us: Vec<f64>,
    /// MB/s of 64 KiB sequential `O_DIRECT` writes of 64 MiB there (then `fdatasync`).
    pub(super) disk_seq_direct_mbps: Vec<f64>,
}

impl Limits {
    pub(super) fn us_per_page(&self) -> Option<f64> {
        median(&self.memcpy_random_gbps).map(|g| PAGE as f64 / (g * 1e9) * 1e6)
    }
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

/// The disk's own limits, on the file system of the bench's disk images (the test
/// directories' `/tmp`): 4 KiB write + `fdatasync` latency, and sequential `O_DIRECT`
/// bandwidth — what the guest's disk could do at best.
fn measure_disk(limits: &mut Limits) -> Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let dir = twin_lab::TestDir::new("bench-disk").context("a directory for the disk limit")?;
    let path = dir.join("limit.img");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .context("creating the disk-limit file")?;
    let block = vec![0x5au8; 4096];
    let mut lat = Vec::new();
    let until = Instant::now() + Duration::from_secs(1);
    let mut at = 0u64;
    while Instant::now() < until {
        let t = Instant::now();
        f.write_all_at(&block, at).context("4 KiB write")?;
        f.sync_data().context("fdatasync")?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        at = (at + 4096) % (32 << 20);
    }
    if let Some(m) = median(&lat) {
        limits.disk_4k_fsync_us.push(m);
    }
    drop(f);
    // O_DIRECT needs an aligned buffer: a 64 KiB chunk at a 4 KiB boundary of a larger Vec.
    let mut raw = vec![0x3cu8; (64 << 10) + 4096];
    let off = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[off..off + (64 << 10)];
    buf.fill(0x3c);
    let direct = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path);
    if let Ok(d) = direct {
        let t = Instant::now();
        let total: u64 = 64 << 20;
        let mut at = 0;
        while at < total {
            d.write_all_at(buf, at).context("O_DIRECT write")?;
            at += buf.len() as u64;
        }
        d.sync_data().context("fdatasync")?;
        limits
            .disk_seq_direct_mbps
            .push(total as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    Ok(())
}

pub(super) fn measure_limits(plan: &Plan, limits: &mut Limits) -> Result<()> {
    check_interrupt()?;
    measure_memcpy(plan.limit_reps, limits);
    measure_disk(limits)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert!(utc_now().ends_with(" UTC"));
        assert_eq!(utc_now().len(), "2025-01-01 00:00:00 UTC".len());
    }
}
