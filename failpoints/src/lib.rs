//! Named fault-injection points, armed by the `TWIN_FAILPOINTS` environment variable.
//!
//! `TWIN_FAILPOINTS="primary.mid_stream=kill;backup.before_ack=sleep(500)"` arms two
//! points. Unarmed (the variable unset, as in production), a point costs one relaxed
//! atomic load. Actions:
//!
//! | action | effect at the point |
//! | --- | --- |
//! | `kill` | the process sends itself SIGKILL: a host dying at exactly that step |
//! | `panic` | panics (tests that the process fails loudly) |
//! | `sleep(MS)` | stalls the calling thread |
//! | `drop` | [`hit`] returns true: the caller skips the step (an ack not sent, a frame lost) |
//! | `off` | nothing |
//!
//! An action may be prefixed by a count, `3*kill`, to fire on the third hit only (the
//! earlier hits pass), suffixed `@P` with P in percent, `drop@10`, to fire at random on
//! that share of hits, or suffixed `~MS`, `drop~2000`, to fire on every hit within MS
//! milliseconds of the first one and never after.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Name of the environment variable.
pub const ENV: &str = "TWIN_FAILPOINTS";

/// Every failpoint in the code. Arming a name not in this list is an error: a mistyped
/// failpoint would otherwise test nothing.
pub const KNOWN: &[&str] = &[
    "primary.sync",
    "primary.before_pause",
    "primary.collect",
    "primary.mid_stream",
    "primary.after_send",
    "primary.after_ack",
    "primary.goodbye",
    "backup.mid_receive",
    "backup.mid_apply",
    "backup.mid_disk_apply",
    "lazy.fault",
    "lazy.prefetch",
    "backup.before_ack",
    "backup.restore",
    "twin.snapshot",
];

/// What an armed point does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Kill,
    Panic,
    Sleep(Duration),
    Drop,
    Off,
}

/// When an armed point fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Always,
    /// On the n-th hit only (1-based).
    Nth(u64),
    /// On this share of hits, in percent.
    Percent(u8),
    /// On every hit within this long after the first hit.
    Window(Duration),
}

#[derive(Debug)]
struct Point {
    action: Action,
    trigger: Trigger,
    hits: AtomicU64,
    first_hit: OnceLock<std::time::Instant>,
}

/// Errors in `TWIN_FAILPOINTS`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("failpoint entry `{0}` is not NAME=ACTION")]
    Entry(String),
    #[error("failpoint action `{0}` is not kill, panic, drop, off or sleep(MS)")]
    Action(String),
    #[error("failpoint trigger in `{0}` is not N*ACTION, ACTION@PERCENT or ACTION~MS")]
    Trigger(String),
    #[error("there is no failpoint named `{0}` (known: {known})", known = KNOWN.join(", "))]
    Unknown(String),
}

fn parse_action(s: &str) -> Result<Action, ParseError> {
    match s {
        "kill" => Ok(Action::Kill),
        "panic" => Ok(Action::Panic),
        "drop" => Ok(Action::Drop),
        "off" => Ok(Action::Off),
        _ => {
            let ms = s
                .strip_prefix("sleep(")
                .and_then(|r| r.strip_suffix(')'))
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| ParseError::Action(s.to_string()))?;
            Ok(Action::Sleep(Duration::from_millis(ms)))
        }
    }
}

/// Parses a `TWIN_FAILPOINTS` value into (name, action, trigger) entries.
pub fn parse(spec: &str) -> Result<Vec<(String, Action, Trigger)>, ParseError> {
    let mut out = Vec::new();
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, rest) = entry
            .split_once('=')
            .filter(|(n, _)| !n.trim().is_empty())
            .ok_or_else(|| ParseError::Entry(entry.to_string()))?;
        let rest = rest.trim();
        let (trigger, action) = if let Some((n, a)) = rest.split_once('*') {
            let n: u64 = n
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| ParseError::Trigger(entry.to_string()))?;
            (Trigger::Nth(n), a)
        } else if let Some((a, ms)) = rest.rsplit_once('~') {
            let ms: u64 = ms
                .parse()
                .map_err(|_| ParseError::Trigger(entry.to_string()))?;
            (Trigger::Window(Duration::from_millis(ms)), a)
        } else if let Some((a, p)) = rest.rsplit_once('@') {
            let p: u8 = p
                .parse()
                .ok()
                .filter(|&p| p <= 100)
                .ok_or_else(|| ParseError::Trigger(entry.to_string()))?;
            (Trigger::Percent(p), a)
        } else {
            (Trigger::Always, rest)
        };
        let name = name.trim();
        if !KNOWN.contains(&name) {
            return Err(ParseError::Unknown(name.to_string()));
        }
        out.push((name.to_string(), parse_action(action)?, trigger));
    }
    Ok(out)
}

static ARMED: AtomicBool = AtomicBool::new(true);

/// Whether any failpoint is armed; lets a caller skip work that exists only to give a
/// failpoint its place (e.g. splitting a write in two).
pub fn any_armed() -> bool {
    ARMED.load(Ordering::Relaxed) && !points().is_empty()
}
static POINTS: OnceLock<HashMap<String, Point>> = OnceLock::new();

fn points() -> &'static HashMap<String, Point> {
    POINTS.get_or_init(|| {
        let spec = std::env::var(ENV).unwrap_or_default();
        let map: HashMap<String, Point> = match parse(&spec) {
            Ok(entries) => entries
                .into_iter()
                .map(|(name, action, trigger)| {
                    tracing::warn!(failpoint = %name, ?action, ?trigger, "failpoint armed");
                    (
                        name,
                        Point {
                            action,
                            trigger,
                            hits: AtomicU64::new(0),
                            first_hit: OnceLock::new(),
                        },
                    )
                })
                .collect(),
            Err(e) => {
                // A test that mistyped a failpoint must not silently test nothing.
                panic!("{ENV}: {e}");
            }
        };
        if map.is_empty() {
            ARMED.store(false, Ordering::Relaxed);
        }
        map
    })
}

/// Checks every name in `TWIN_FAILPOINTS` parses; call at start-up so a typo fails there.
pub fn validate_env() -> Result<(), ParseError> {
    parse(&std::env::var(ENV).unwrap_or_default()).map(|_| ())
}

fn random_percent() -> u8 {
    // xorshift on a per-process counter seeded by the clock: good enough to spread hits.
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        x = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    STATE.store(x, Ordering::Relaxed);
    (x % 100) as u8
}

/// Passes failpoint `name`. Returns true when the caller must skip its step (`drop`).
pub fn hit(name: &str) -> bool {
    if !ARMED.load(Ordering::Relaxed) {
        return false;
    }
    let Some(p) = points().get(name) else {
        return false;
    };
    let n = p.hits.fetch_add(1, Ordering::Relaxed) + 1;
    let fire = match p.trigger {
        Trigger::Always => true,
        Trigger::Nth(k) => n == k,
        Trigger::Percent(pc) => random_percent() < pc,
        Trigger::Window(w) => p.first_hit.get_or_init(std::time::Instant::now).elapsed() <= w,
    };
    if !fire {
        return false;
    }
    tracing::warn!(failpoint = name, hit = n, action = ?p.action, "failpoint fired");
    match p.action {
        Action::Kill => {
            // SAFETY: kill(2) on our own pid with a valid signal number has no memory
            // effects; SIGKILL cannot be caught, so this does not return.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            false
        }
        Action::Panic => panic!("failpoint {name} fired"),
        Action::Sleep(d) => {
            std::thread::sleep(d);
            false
        }
        Action::Drop => true,
        Action::Off => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_actions_and_triggers() {
        let e = parse(
            "primary.sync=kill; primary.collect=3*sleep(20);backup.before_ack=drop@25 ;\
             backup.restore=off;backup.mid_apply=drop~1500",
        )
        .unwrap();
        let ms = Duration::from_millis;
        assert_eq!(
            e,
            vec![
                ("primary.sync".into(), Action::Kill, Trigger::Always),
                (
                    "primary.collect".into(),
                    Action::Sleep(ms(20)),
                    Trigger::Nth(3)
                ),
                (
                    "backup.before_ack".into(),
                    Action::Drop,
                    Trigger::Percent(25)
                ),
                ("backup.restore".into(), Action::Off, Trigger::Always),
                (
                    "backup.mid_apply".into(),
                    Action::Drop,
                    Trigger::Window(ms(1500))
                ),
            ]
        );
        assert_eq!(
            parse("primary.colect=kill"),
            Err(ParseError::Unknown("primary.colect".into()))
        );
        assert_eq!(parse("").unwrap(), vec![]);
        assert!(matches!(parse("nameonly"), Err(ParseError::Entry(_))));
        assert!(matches!(
            parse("primary.sync=explode"),
            Err(ParseError::Action(_))
        ));
        assert!(matches!(
            parse("primary.sync=0*kill"),
            Err(ParseError::Trigger(_))
        ));
        assert!(matches!(
            parse("primary.sync=drop@101"),
            Err(ParseError::Trigger(_))
        ));
        assert!(matches!(
            parse("primary.sync=sleep(abc)"),
            Err(ParseError::Action(_))
        ));
    }

    #[test]
    fn unarmed_points_do_nothing() {
        // The test process has no TWIN_FAILPOINTS.
        assert!(!hit("anything"));
    }
}
