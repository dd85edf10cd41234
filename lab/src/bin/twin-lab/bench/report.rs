//! Aggregation of the runs per cell, and the report: `bench.md` (also printed) and the
//! `bench.json` document.

use serde::Serialize;

use super::failover::Failover;
use super::limits::{Limits, Machine};
use super::measure::Run;
use super::plan::{
    Mode, Plan, Workload, COMPRESS_DIRTY, COMPRESS_WSS, FAILOVER_HZ, FAILOVER_WORKLOAD, PAGE,
    REDIS_HZ, WSS,
};
use super::redis::{RedisResult, MATRIX, TESTS};
use super::stats::{dist, json_f64, median, Dist};

/// One (workload, mode) cell over all its runs.
#[derive(Debug, Default)]
pub(super) struct Agg {
    pub(super) runs: usize,
    pub(super) failed: usize,
    pub(super) latency: Option<Dist>,
    pub(super) rps: Option<f64>,
    pub(super) dirty_mib_s: Option<f64>,
    pub(super) skipped: u64,
    pub(super) disk_mib_s: Option<f64>,
    pub(super) disk_skipped: u64,
    pub(super) disk_write_flush_us: Option<f64>,
    pub(super) ckpt_hz: Option<f64>,
    pub(super) pause: Option<Dist>,
    pub(super) dirty_pages: Option<Dist>,
    pub(super) epoch_bytes: Option<Dist>,
    pub(super) sent_per_dirty: Option<f64>,
    /// stop_vcpus, capture_state, harvest_dirty, copy_pages (µs, session medians).
    pub(super) split: [Option<f64>; 4],
    pub(super) ack_us: Option<f64>,
    pub(super) stretched: u64,
}

pub(super) fn aggregate(runs: &[Run], w: Workload, m: Mode) -> Agg {
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
        disk_mib_s: per_run(&|r| r.guest_disk_mib_s),
        disk_skipped: ok.iter().filter_map(|r| r.guest_disk_skipped).sum(),
        disk_write_flush_us: per_run(&|r| r.disk_write_flush_us),
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

pub(super) fn f(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.prec$}"),
        _ => "—".into(),
    }
}

pub(super) fn ms(us: Option<f64>) -> String {
    let v = us.map(|u| u / 1e3);
    match v {
        Some(x) if x < 1.0 => f(v, 3),
        Some(x) if x < 10.0 => f(v, 2),
        _ => f(v, 1),
    }
}

pub(super) fn kib(b: Option<f64>) -> String {
    f(b.map(|b| b / 1024.0), 0)
}

fn signed_ms(us: Option<f64>) -> String {
    match us {
        Some(u) if u >= 0.0 => format!("+{}", ms(Some(u))),
        Some(u) => format!("−{}", ms(Some(-u))),
        None => "—".into(),
    }
}

pub(super) struct Report<'a> {
    pub(super) plan: &'a Plan,
    pub(super) machine: &'a Machine,
    pub(super) limits: &'a Limits,
    pub(super) runs: &'a [Run],
    pub(super) failovers: &'a [Failover],
    pub(super) restore: &'a super::restore::RestoreResults,
    pub(super) elapsed_s: f64,
}

fn gb(v: &[f64]) -> String {
    match (dist(v), v.iter().copied().reduce(f64::min)) {
        (Some(d), Some(lo)) => format!("{:.2} ({:.2}–{:.2}, n={})", d.median, lo, d.max, d.n),
        _ => "—".into(),
    }
}

pub(super) fn markdown(r: &Report<'_>) -> String {
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
             output commit: eager, `--eager-gap` {} (a checkpoint as soon as output waits and that long has passed since the previous one, so achieved Hz above the target are those extra checkpoints)",
            p.warmup_secs, p.cell_secs, p.rounds, p.mem, p.probe_think_max.as_millis(),
            p.heartbeat_timeout.as_deref().unwrap_or("the default"),
            p.eager_gap.as_deref().unwrap_or("the `twin protect` default")
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
        for mode in p
            .modes_for(w)
            .into_iter()
            .filter(|m| *m != Mode::Unprotected)
        {
            let a = aggregate(r.runs, w, mode);
            let hz = match mode {
                Mode::Encrypted(hz) => format!("{hz} enc."),
                Mode::NoPrecopy(hz) => format!("{hz} no pre-copy"),
                Mode::Uncompressed(hz) => format!("{hz} uncompressed"),
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
        if w == Workload::Redis {
            // Its own section below.
            continue;
        }
        let work = |a: &Agg| match w {
            Workload::Idle | Workload::Redis => None,
            Workload::Dirty(_) | Workload::Write { .. } => a.dirty_mib_s,
            Workload::Tcp => a.rps,
            Workload::Disk(_) => a.disk_mib_s,
        };
        for mode in p.modes_for(w) {
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
                Workload::Idle | Workload::Redis => "",
                Workload::Dirty(_) | Workload::Write { .. } => " MiB/s",
                Workload::Tcp => " req/s",
                Workload::Disk(_) => " MiB/s to disk",
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
            if a.disk_skipped > 0 {
                work_s.push_str(&format!(" ({} blocks skipped)", a.disk_skipped));
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

    if p.workload_list.contains(&Workload::Redis) {
        redis_section(&mut s, r);
    }
    disk_section(&mut s, r);
    compression_section(&mut s, r);

    line(&mut s, "## Failover (SIGKILL of the primary)");
    line(&mut s, "");
    line(
        &mut s,
        &format!("Protected at {FAILOVER_HZ} Hz, `{}`, one client connection sending INCR back to back. \
         *Client-visible*: SIGKILL → the first reply on that same connection from the \
         backup (replies the primary released just before dying, arriving after the SIGKILL, \
         do not count). The backup replays into the restored guest what the primary's guest \
         received after the committed epoch and tells the guest it moved (it retransmits at \
         once); a trial where neither applies waits for the client's TCP retransmission timeout \
         (≥ 200 ms on Linux). *Detect → running*: the backup's own figure (heartbeat silence \
         noticed → VM running).", FAILOVER_WORKLOAD.label()),
    );
    line(&mut s, "");
    let ok: Vec<&Failover> = r.failovers.iter().filter(|t| t.error.is_none()).collect();
    let with_arbiter = ok.iter().any(|t| t.arbiter);
    let col = |arbiter: bool, g: &dyn Fn(&Failover) -> Option<f64>| {
        dist(
            &ok.iter()
                .filter(|t| t.arbiter == arbiter)
                .filter_map(|t| g(t))
                .collect::<Vec<_>>(),
        )
    };
    let cells = |d: Option<Dist>| {
        d.map_or(("—".into(), "—".into(), "—".into(), 0), |d| {
            (
                f(Some(d.median), 1),
                f(Some(d.p99), 1),
                f(Some(d.max), 1),
                d.n,
            )
        })
    };
    let row = |s: &mut String, name: &str, g: &dyn Fn(&Failover) -> Option<f64>| {
        let (med, p99, max, n) = cells(col(false, g));
        if with_arbiter {
            let (amed, ap99, amax, an) = cells(col(true, g));
            s.push_str(&format!(
                "| {name} | {med} | {p99} | {max} | {n} | {amed} | {ap99} | {amax} | {an} |\n"
            ));
        } else {
            s.push_str(&format!("| {name} | {med} | {p99} | {max} | {n} |\n"));
        }
    };
    if with_arbiter {
        line(
            &mut s,
            "Each trial ran twice: as is, and with a real etcd as the arbiter (`--arbiter` on both sides: the backup must win the VM's record in etcd before it takes over; the arbiter is not on the epoch path, so only the takeover can cost more).",
        );
        line(&mut s, "");
        line(
            &mut s,
            "| ms | median | p99 | max | n | arbiter: median | p99 | max | n |",
        );
        line(
            &mut s,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        );
    } else {
        line(&mut s, "| ms | median | p99 | max | n |");
        line(&mut s, "| --- | ---: | ---: | ---: | ---: |");
    }
    row(&mut s, "client-visible: SIGKILL → first reply", &|t| {
        t.client_visible_ms
    });
    row(
        &mut s,
        "SIGKILL → backup reports failover_complete",
        &|t| t.kill_to_failover_line_ms,
    );
    row(&mut s, "backup: detect → running", &|t| {
        json_f64(t.backup_report.as_ref()?, &["detect_to_running_ms"])
    });
    row(&mut s, "backup: restore", &|t| {
        json_f64(t.backup_report.as_ref()?, &["restore_ms"])
    });
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
    super::restore::markdown(&mut s, r.restore);
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
            t.error.as_ref().map(|e| {
                format!(
                    "- failover trial {}{}: {}",
                    t.trial,
                    if t.arbiter { " (arbiter)" } else { "" },
                    first_line(e)
                )
            })
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

/// The Redis workload: per (connections, pipeline, test), medians over runs of
/// redis-benchmark's own throughput and latency percentiles.
fn redis_section(s: &mut String, r: &Report<'_>) {
    let mut line = |l: &str| {
        s.push_str(l);
        s.push('\n');
    };
    line("## Redis clients (redis-benchmark)");
    line("");
    line(&format!(
        "Debian's `redis-benchmark` (unmodified) from the client namespace against the guest's \
         RESP2 port, `-r 100000` random keys, one run per connections × pipeline, tests SET, \
         GET, INCR each about {:.0} s; protected at {REDIS_HZ} Hz with the default eager output \
         commit. req/s and the p50/p99 latencies are redis-benchmark's own, medians over the \
         runs (rounds). Ratio: protected / unprotected req/s.",
        r.plan.redis_test_secs
    ));
    line("");
    line("| conns | pipeline | test | unprotected req/s | protected req/s | ratio | unprotected p50 / p99 ms | protected p50 / p99 ms | runs |");
    line("| ---: | ---: | --- | ---: | ---: | ---: | --- | --- | --- |");
    let pick = |m: Mode, c: u32, pl: u32, t: &str, g: fn(&RedisResult) -> f64| -> Option<f64> {
        median(
            &r.runs
                .iter()
                .filter(|x| x.key == (Workload::Redis, m) && x.error.is_none())
                .flat_map(|x| x.redis.iter())
                .filter(|x| x.clients == c && x.pipeline == pl && x.test == t)
                .map(g)
                .collect::<Vec<_>>(),
        )
    };
    let (u, pr) = (Mode::Unprotected, Mode::Protected(REDIS_HZ));
    let runs = |m: Mode| {
        let all = r.runs.iter().filter(|x| x.key == (Workload::Redis, m));
        let n = all.clone().count();
        let failed = all.filter(|x| x.error.is_some()).count();
        (n, failed)
    };
    let ((un, uf), (pn, pf)) = (runs(u), runs(pr));
    let runs_s = format!(
        "{}/{}{}",
        un - uf,
        pn - pf,
        if uf + pf > 0 {
            format!(" ({} failed)", uf + pf)
        } else {
            String::new()
        }
    );
    for &(c, pl) in &MATRIX {
        for t in TESTS {
            let (ur, prr) = (pick(u, c, pl, t, |x| x.rps), pick(pr, c, pl, t, |x| x.rps));
            let lat = |m: Mode| {
                format!(
                    "{} / {}",
                    f(pick(m, c, pl, t, |x| x.p50_ms), 2),
                    f(pick(m, c, pl, t, |x| x.p99_ms), 2)
                )
            };
            line(&format!(
                "| {c} | {pl} | {t} | {} | {} | {} | {} | {} | {runs_s} |",
                f(ur, 0),
                f(prr, 0),
                f(prr.zip(ur).filter(|(_, u)| *u > 0.0).map(|(p, u)| p / u), 2),
                lat(u),
                lat(pr)
            ));
        }
    }
    line("");
}

pub(super) fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

#[derive(Serialize)]
pub(super) struct JsonReport<'a> {
    pub(super) note: &'static str,
    pub(super) plan: &'a Plan,
    pub(super) machine: &'a Machine,
    pub(super) limits: &'a Limits,
    pub(super) runs: &'a [Run],
    pub(super) failovers: &'a [Failover],
    pub(super) restore: &'a super::restore::RestoreResults,
    pub(super) elapsed_s: f64,
}

/// `## Compression`: bytes on the wire per dirty byte, the replication thread's CPU per
/// GiB and the pause, with compression (`delta`) and without (`--compress none`), for
/// writes that change a part of a page up to incompressible whole pages.
fn compression_section(s: &mut String, r: &Report<'_>) {
    let p = r.plan;
    if p.compress_list.is_empty() {
        return;
    }
    let mut line = |l: &str| {
        s.push_str(l);
        s.push('\n');
    };
    line("## Compression (`--compress delta`, the default, against `--compress none`)");
    line("");
    line(&format!(
        "The guest writes {COMPRESS_DIRTY} MiB/s; each write changes \
         `wfrac` percent of a page (a run at a moving spot; text-like data or incompressible), \
         round-robin over {COMPRESS_WSS} (inside the 64 MiB delta cache: a working set \
         rewritten round-robin that exceeds the cache evicts each page before its next write, \
         and gets no deltas), \
         *random* rewrites whole pages with incompressible data (the default memory workload). \
         Protected at {} Hz, both modes in the same run, cells interleaved. *sent / dirty*: \
         bytes of page frames on the wire over bytes of the dirty pages the checkpoints \
         reported (Σ over the windows; unchanged pages not sent count as dirty). *CPU*: the \
         replication thread's (and its encoding helpers') CPU time \
         (`CLOCK_THREAD_CPUTIME_ID`) per GiB of dirty pages: encoding the epoch (compression, \
         framing, checksums) and writing it to the socket. The pause is the vCPUs' (encoding \
         happens after they resume).",
        p.compress_hz
    ));
    line("");
    line("| workload | mode | sent / dirty | encode CPU ms/GiB | encode + send CPU ms/GiB | pause median ms | pause p99 ms | reply median ms (p99) | sent KiB/epoch median (p99) | guest MiB/s | epochs |");
    line("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |");
    for &w in &p.compress_list {
        for mode in p.modes_for(w) {
            let ok: Vec<&Run> = r
                .runs
                .iter()
                .filter(|x| x.key == (w, mode) && x.error.is_none())
                .collect();
            let all = r.runs.iter().filter(|x| x.key == (w, mode)).count();
            if ok.is_empty() {
                line(&format!(
                    "| {} | {} | failed ({all} runs) | | | | | | | | |",
                    w.label(),
                    mode.label()
                ));
                continue;
            }
            let sum = |f: fn(&Run) -> &Vec<f64>| -> f64 {
                ok.iter().flat_map(|x| f(x).iter()).sum::<f64>()
            };
            let dirty = sum(|x| &x.dirty_bytes);
            let gib = dirty / f64::from(1u32 << 30);
            let per_gib = |us: f64| (gib > 0.0).then(|| us / 1e3 / gib);
            let encode = sum(|x| &x.encode_cpu_us);
            let send = sum(|x| &x.send_cpu_us);
            let pause = dist(
                &ok.iter()
                    .flat_map(|x| x.pause_us.iter().copied())
                    .collect::<Vec<_>>(),
            );
            let page_bytes: Vec<f64> = ok
                .iter()
                .flat_map(|x| x.page_bytes.iter().copied())
                .collect();
            let sent = dist(&page_bytes);
            let agg = aggregate(r.runs, w, mode);
            line(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} ({}) | {} | {}{} |",
                w.label(),
                match mode {
                    Mode::Uncompressed(_) => "none",
                    _ => "delta",
                },
                f(
                    (dirty > 0.0).then(|| page_bytes.iter().sum::<f64>() / dirty),
                    3
                ),
                f(per_gib(encode), 0),
                f(per_gib(encode + send), 0),
                ms(pause.map(|d| d.median)),
                ms(pause.map(|d| d.p99)),
                ms(agg.latency.map(|d| d.median)),
                ms(agg.latency.map(|d| d.p99)),
                kib(sent.map(|d| d.median)),
                kib(sent.map(|d| d.p99)),
                f(agg.dirty_mib_s, 1),
                pause.map_or(0, |d| d.n),
                if ok.len() < all {
                    format!(", {} run(s) failed", all - ok.len())
                } else {
                    String::new()
                },
            ));
        }
    }
    line("");
}

/// `## Disk`: the disk workload's write rate and write + flush latency, unprotected against
/// protected, the checkpoints it makes, and the disk's own limit.
fn disk_section(s: &mut String, r: &Report<'_>) {
    let p = r.plan;
    let disks: Vec<Workload> = p
        .workload_list
        .iter()
        .copied()
        .filter(|w| matches!(w, Workload::Disk(_)))
        .collect();
    let mut line = |l: &str| {
        s.push_str(l);
        s.push('\n');
    };
    if disks.is_empty() {
        return;
    }
    line("## Disk (virtio-blk, replicated with output commit)");
    line("");
    line(&format!(
        "The guest's disk workload writes 4 KiB blocks to a sparse 64 MiB image on this \
         machine's file system, each block write followed by a FLUSH (the device: `pwrite`, \
         then `fdatasync`, on its worker thread), synchronously: *write+flush* is the time \
         the guest waits per block, from its own clock (`dload_busy_ns` / blocks). Protected, \
         each epoch carries its writes (`DiskWrites`) and the backup applies and `fdatasync`s \
         them before it acknowledges. Physical limit of the disk, same run: 4 KiB `pwrite` + \
         `fdatasync` {} µs median ({} per s); 64 KiB sequential `O_DIRECT` writes {} MB/s.",
        f(median(&r.limits.disk_4k_fsync_us), 0),
        f(median(&r.limits.disk_4k_fsync_us).map(|u| 1e6 / u), 0),
        f(median(&r.limits.disk_seq_direct_mbps), 0),
    ));
    line("");
    line("| workload | mode | guest MiB/s to disk | ratio | write+flush µs | added µs | pause median ms | pause p99 ms | epoch bytes median |");
    line("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &w in &disks {
        let base = aggregate(r.runs, w, Mode::Unprotected);
        for mode in p.modes() {
            let a = aggregate(r.runs, w, mode);
            let ratio = a.disk_mib_s.zip(base.disk_mib_s).map(|(x, b)| x / b);
            let added = match (a.disk_write_flush_us, base.disk_write_flush_us) {
                (Some(x), Some(b)) if mode != Mode::Unprotected => Some(x - b),
                _ => None,
            };
            line(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                w.label(),
                mode.label(),
                f(a.disk_mib_s, 2),
                f(ratio, 2),
                f(a.disk_write_flush_us, 0),
                f(added, 0),
                ms(a.pause.map(|d| d.median)),
                ms(a.pause.map(|d| d.p99)),
                kib(a.epoch_bytes.map(|d| d.median)),
            ));
        }
    }
    line("");
}
