//! Prometheus metrics of a Twin process (`prometheus-client`, OpenMetrics text): served at
//! `/v1/metrics` on the control socket and, with `--metrics ADDR`, at `/metrics` over TCP.
//!
//! Two parts: what the process's status says at the moment of the scrape (every numeric and
//! boolean field of `twin status --json` as a gauge `twin_<field>`, nested fields joined
//! with `_`, the string fields `role`, `mode`, `state` and `vm` as `twin_<field>{<field>=…} 1`),
//! and what only a history can say, kept from the process's events by a `metrics` thread:
//! the histograms of checkpoint pauses, acknowledgement latency and backup apply times, the
//! bytes sent, epochs, failovers and lost backups.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use twin_api::{EventKind, EventLog};

/// The metrics kept from events.
struct Kept {
    registry: Registry,
    pause: Histogram,
    ack: Histogram,
    apply: Histogram,
    bytes_sent: Counter,
    epochs_sent: Counter,
    epochs_committed: Counter,
    failovers: Counter,
    failovers_failed: Counter,
    backups_lost: Counter,
    protected: Counter,
}

/// One process's metrics.
pub struct Metrics {
    kept: Mutex<Kept>,
}

/// Buckets from 10 µs to ~84 s, doubling (seconds).
fn seconds_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(10e-6, 2.0, 24)
}

impl Metrics {
    /// Metrics fed by `events` (a thread follows them while the metrics live).
    pub fn new(events: Arc<EventLog>) -> Arc<Self> {
        let mut registry = Registry::with_prefix("twin");
        let pause = Histogram::new(seconds_buckets());
        let ack = Histogram::new(seconds_buckets());
        let apply = Histogram::new(seconds_buckets());
        let (bytes_sent, epochs_sent, epochs_committed) = Default::default();
        let (failovers, failovers_failed, backups_lost, protected) = Default::default();
        registry.register(
            "checkpoint_pause_seconds",
            "How long the VM stood still for each checkpoint",
            pause.clone(),
        );
        registry.register(
            "ack_latency_seconds",
            "From a checkpoint's send to the backup's acknowledgement",
            ack.clone(),
        );
        registry.register(
            "backup_apply_seconds",
            "How long the backup took to apply each epoch",
            apply.clone(),
        );
        registry.register(
            "checkpoint_bytes_sent",
            "Bytes of checkpoints sent to the backup",
            Counter::clone(&bytes_sent),
        );
        registry.register(
            "epochs_sent",
            "Checkpoints sent to the backup",
            Counter::clone(&epochs_sent),
        );
        registry.register(
            "epochs_committed",
            "Epochs this backup applied and acknowledged",
            Counter::clone(&epochs_committed),
        );
        registry.register(
            "failovers",
            "Takeovers completed by this process",
            Counter::clone(&failovers),
        );
        registry.register(
            "failovers_failed",
            "Takeovers that failed",
            Counter::clone(&failovers_failed),
        );
        registry.register(
            "backups_lost",
            "Times this primary lost its backup",
            Counter::clone(&backups_lost),
        );
        registry.register(
            "protections",
            "Sessions in which a backup acknowledged its first epoch",
            Counter::clone(&protected),
        );
        let m = Arc::new(Metrics {
            kept: Mutex::new(Kept {
                registry,
                pause,
                ack,
                apply,
                bytes_sent,
                epochs_sent,
                epochs_committed,
                failovers,
                failovers_failed,
                backups_lost,
                protected,
            }),
        });
        let weak = Arc::downgrade(&m);
        if let Err(e) = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || follow(&events, &weak))
        {
            tracing::warn!(error = %e, "cannot start the metrics thread; histograms stay empty");
        }
        m
    }

    fn observe(&self, kind: &EventKind) {
        let k = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        match kind {
            EventKind::EpochSent {
                bytes, pause_us, ..
            } => {
                k.pause.observe(pause_us / 1e6);
                k.bytes_sent.inc_by(*bytes);
                k.epochs_sent.inc();
            }
            EventKind::EpochAcked { ack_us, .. } => k.ack.observe(ack_us / 1e6),
            EventKind::EpochCommitted { apply_us, .. } => {
                k.apply.observe(apply_us / 1e6);
                k.epochs_committed.inc();
            }
            EventKind::FailoverComplete(_) => {
                k.failovers.inc();
            }
            EventKind::FailoverFailed { .. } => {
                k.failovers_failed.inc();
            }
            EventKind::BackupLost { .. } => {
                k.backups_lost.inc();
            }
            EventKind::Protected { .. } => {
                k.protected.inc();
            }
            _ => {}
        }
    }

    /// The OpenMetrics text: `status` (the process's status JSON, `None` when it could not
    /// be had, e.g. during a snapshot) as gauges, then the kept metrics.
    pub fn render(&self, status: Option<&serde_json::Value>) -> String {
        let available = Gauge::<i64>::default();
        available.set(i64::from(status.is_some()));
        let mut now = Registry::with_prefix("twin");
        now.register(
            "status_available",
            "Whether the status part of this scrape could be read (not during a snapshot)",
            available,
        );
        if let Some(v) = status {
            status_gauges(&mut now, "", v);
        }
        let mut out = String::new();
        let k = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut out, &now);
        let _ = encode_registry(&mut out, &k.registry);
        let _ = encode_eof(&mut out);
        out
    }
}

/// The string fields that become a labelled gauge.
const LABELLED: [&str; 4] = ["role", "mode", "state", "vm"];

/// Registers `v`'s numeric and boolean fields (recursively) as gauges named by their path.
fn status_gauges(reg: &mut Registry, prefix: &str, v: &serde_json::Value) {
    let Some(obj) = v.as_object() else {
        return;
    };
    for (k, v) in obj {
        let name: String = format!("{prefix}{k}")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let value = match v {
            serde_json::Value::Bool(b) => Some(f64::from(u8::from(*b))),
            serde_json::Value::Number(n) => n.as_f64(),
            serde_json::Value::Object(_) => {
                status_gauges(reg, &format!("{name}_"), v);
                continue;
            }
            serde_json::Value::String(s) if prefix.is_empty() && LABELLED.contains(&k.as_str()) => {
                let family = Family::<Vec<(String, String)>, Gauge>::default();
                family.get_or_create(&vec![(k.clone(), s.clone())]).set(1);
                reg.register(name, format!("The status field {k}"), family);
                continue;
            }
            _ => None,
        };
        if let Some(x) = value {
            let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            g.set(x);
            reg.register(name, format!("The status field {prefix}{k}"), g);
        }
    }
}

/// The metrics thread: observes every event (per-epoch ones included) until the metrics
/// are dropped.
fn follow(events: &Arc<EventLog>, metrics: &Weak<Metrics>) {
    let mut sub = events.subscribe(0, true);
    loop {
        let batch = sub.next_batch(Duration::from_millis(250));
        let Some(m) = metrics.upgrade() else {
            return;
        };
        for e in &batch {
            m.observe(&e.kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_and_events_become_metrics() {
        let log = EventLog::new();
        let m = Metrics::new(log.clone());
        log.emit(EventKind::EpochSent {
            epoch: 1,
            pages: 3,
            bytes: 12288,
            pause_us: 500.0,
            stop_us: 1.0,
            state_us: 1.0,
            harvest_us: 1.0,
            copy_us: 1.0,
            eager: false,
            dirty_bytes: 12288,
            page_bytes: 12288,
            encode_cpu_us: 1.0,
            send_cpu_us: 1.0,
        });
        log.emit(EventKind::EpochAcked {
            epoch: 1,
            ack_us: 800.0,
        });
        let status = serde_json::json!({
            "role": "primary", "protected": true, "stretched_epochs": 4,
            "pause_us": {"median": 480.5, "p99": 900.0}, "backup": "10.0.0.9:7000"
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let text = loop {
            let t = m.render(Some(&status));
            // Both events observed (the observer may take them in two batches).
            if (t.contains("twin_checkpoint_bytes_sent_total 12288")
                && t.contains("twin_ack_latency_seconds_count 1"))
                || std::time::Instant::now() > deadline
            {
                break t;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for want in [
            "twin_protected 1",
            "twin_stretched_epochs 4",
            "twin_pause_us_median 480.5",
            "twin_role{role=\"primary\"} 1",
            "twin_checkpoint_bytes_sent_total 12288",
            "twin_checkpoint_pause_seconds_count 1",
            "twin_ack_latency_seconds_count 1",
            "twin_status_available 1",
            "# EOF",
        ] {
            assert!(text.contains(want), "no {want:?} in\n{text}");
        }
        assert!(
            !text.contains("backup\""),
            "strings other than the labelled are left out"
        );
    }
}
