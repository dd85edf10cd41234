//! The Redis workload: Debian's `redis-benchmark`, unmodified, against the guest's RESP2
//! service on port 6379, from the client namespace. Every (connections, pipeline) pair of
//! the matrix is one `redis-benchmark -t set,get,incr` run (SET first, so that GET finds
//! the keys); its request count is sized from a short INCR probe so that each test lasts
//! about [`Plan::redis_test_secs`]. Throughput and the p50/p99 latencies are
//! redis-benchmark's own (`--csv`), per test.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use twin_lab::{Netns, Stream, TestDir, TwinProcess, GUEST_ADDR};

use super::check_interrupt;
use super::plan::Plan;

/// The guest's Redis port.
pub(super) const REDIS_PORT: u16 = 6379;
/// Connections × pipeline depth measured.
pub(super) const MATRIX: [(u32, u32); 6] = [(1, 1), (16, 1), (64, 1), (1, 16), (16, 16), (64, 16)];
/// The tests of every run, in the order run.
pub(super) const TESTS: [&str; 3] = ["SET", "GET", "INCR"];
/// Keys the requests spread over (`-r`).
const KEYSPACE: &str = "100000";

/// One test of one `redis-benchmark` run, as its CSV reports it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(super) struct RedisResult {
    pub(super) clients: u32,
    pub(super) pipeline: u32,
    pub(super) test: String,
    pub(super) requests: u64,
    pub(super) rps: f64,
    pub(super) avg_ms: f64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
}

/// A CSV field without its quotes.
fn unquote(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
}

/// Parses `redis-benchmark --csv` output (redis-tools 7: a header line naming the columns,
/// then one line per test). Columns are found by name, so another column order still reads.
pub(super) fn parse_csv(
    out: &str,
    clients: u32,
    pipeline: u32,
    requests: u64,
) -> Result<Vec<RedisResult>> {
    let mut lines = out.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| anyhow!("redis-benchmark printed nothing"))?
        .split(',')
        .map(unquote)
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| anyhow!("redis-benchmark's CSV has no {name:?} column: {header:?}"))
    };
    let (test, rps, avg, p50, p99, max) = (
        col("test")?,
        col("rps")?,
        col("avg_latency_ms")?,
        col("p50_latency_ms")?,
        col("p99_latency_ms")?,
        col("max_latency_ms")?,
    );
    let mut results = Vec::new();
    for line in lines {
        let fields: Vec<&str> = line.split(',').map(unquote).collect();
        let num = |i: usize| -> Result<f64> {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| {
                    anyhow!("redis-benchmark CSV line {line:?}: column {i} is not a number")
                })
        };
        results.push(RedisResult {
            clients,
            pipeline,
            test: fields
                .get(test)
                .ok_or_else(|| anyhow!("redis-benchmark CSV line {line:?} has no test name"))?
                .to_string(),
            requests,
            rps: num(rps)?,
            avg_ms: num(avg)?,
            p50_ms: num(p50)?,
            p99_ms: num(p99)?,
            max_ms: num(max)?,
        });
    }
    if results.is_empty() {
        bail!("redis-benchmark's CSV has a header but no results: {out:?}");
    }
    Ok(results)
}

/// Runs `redis-benchmark` in `ns` to completion (at most `timeout`, and Ctrl-C stops it);
/// returns its standard output.
fn redis_benchmark(
    ns: &Netns,
    dir: &TestDir,
    name: &str,
    args: &[String],
    timeout: Duration,
) -> Result<String> {
    let guest = GUEST_ADDR.to_string();
    let port = REDIS_PORT.to_string();
    let mut argv: Vec<&str> = vec!["-h", &guest, "-p", &port, "--csv"];
    argv.extend(args.iter().map(String::as_str));
    let mut p = TwinProcess::spawn_program(ns, dir, name, Path::new("redis-benchmark"), &argv, &[])
        .context("starting redis-benchmark (apt-get install redis-tools)")?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        check_interrupt()?;
        match p.wait_exit(Duration::from_millis(100)) {
            Ok(s) => break s,
            Err(twin_lab::HarnessError::Timeout { .. }) if Instant::now() < deadline => {}
            Err(twin_lab::HarnessError::Timeout { .. }) => {
                let _ = p.kill();
                bail!(
                    "redis-benchmark {} did not finish within {timeout:?}: {}",
                    args.join(" "),
                    p.tail(5)
                );
            }
            Err(e) => return Err(anyhow!(e).context("waiting for redis-benchmark")),
        }
    };
    let out = p.text(Stream::Stdout);
    let err = p.text(Stream::Stderr);
    if !status.success() || out.contains("Error") || err.contains("Error") {
        bail!(
            "redis-benchmark {} failed ({status:?}): {}{}",
            args.join(" "),
            out.trim(),
            err.trim()
        );
    }
    Ok(out)
}

/// The whole matrix against the guest; results in the order run.
pub(super) fn run_matrix(plan: &Plan, ns: &Netns, dir: &TestDir) -> Result<Vec<RedisResult>> {
    let mut all = Vec::new();
    for &(clients, pipeline) in &MATRIX {
        let c = clients.to_string();
        let p = pipeline.to_string();
        let common = |n: u64, tests: &str| -> Vec<String> {
            [
                "-c",
                &c,
                "-P",
                &p,
                "-r",
                KEYSPACE,
                "-n",
                &n.to_string(),
                "-t",
                tests,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        // Probe: enough requests for every connection to go round a few times, then size
        // the measured run from its rate.
        let probe_n = u64::from(clients * pipeline * 20).max(300);
        let out = redis_benchmark(
            ns,
            dir,
            &format!("redis-probe-c{clients}-P{pipeline}"),
            &common(probe_n, "incr"),
            Duration::from_secs(60),
        )?;
        let probe = parse_csv(&out, clients, pipeline, probe_n)?;
        let rate = probe.first().map_or(0.0, |r| r.rps).max(100.0);
        let n = ((rate * plan.redis_test_secs) as u64).clamp(probe_n, 20_000_000);
        let expect = Duration::from_secs_f64(plan.redis_test_secs * TESTS.len() as f64);
        let out = redis_benchmark(
            ns,
            dir,
            &format!("redis-c{clients}-P{pipeline}"),
            &common(n, &TESTS.join(",").to_ascii_lowercase()),
            expect * 10 + Duration::from_secs(30),
        )?;
        let results = parse_csv(&out, clients, pipeline, n)?;
        for t in TESTS {
            if !results.iter().any(|r| r.test == t) {
                bail!("redis-benchmark -c {clients} -P {pipeline} reported no {t} result: {out:?}");
            }
        }
        eprintln!(
            "bench:   redis -c {clients} -P {pipeline}: {}",
            results
                .iter()
                .map(|r| format!(
                    "{} {:.0}/s p50 {} p99 {} ms",
                    r.test, r.rps, r.p50_ms, r.p99_ms
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        all.extend(results);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_of_redis_benchmark_7_parses() {
        let out = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"SET\",\"8123.45\",\"7.812\",\"2.100\",\"7.700\",\"9.900\",\"11.300\",\"20.000\"\n\
                   \"GET\",\"9000.00\",\"7.000\",\"2.000\",\"6.900\",\"9.000\",\"10.100\",\"19.000\"\n";
        let r = parse_csv(out, 64, 1, 1000).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].test, "SET");
        assert_eq!(r[0].rps, 8123.45);
        assert_eq!(r[0].p50_ms, 7.7);
        assert_eq!(r[0].p99_ms, 11.3);
        assert_eq!(r[1].test, "GET");
        assert_eq!((r[1].clients, r[1].pipeline, r[1].requests), (64, 1, 1000));
    }

    #[test]
    fn bad_csv_is_refused() {
        assert!(parse_csv("", 1, 1, 1).is_err());
        assert!(parse_csv("\"test\",\"rps\"\n\"SET\",\"1\"\n", 1, 1, 1).is_err());
        let header = "\"test\",\"rps\",\"avg_latency_ms\",\"p50_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n";
        assert!(parse_csv(header, 1, 1, 1).is_err(), "no results");
        let bad = format!("{header}\"SET\",\"fast\",\"1\",\"1\",\"1\",\"1\"\n");
        assert!(parse_csv(&bad, 1, 1, 1).is_err(), "not a number");
    }
}
