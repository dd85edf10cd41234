//! Reading a Twin process's typed events (`twin-api`) from its control socket — what the
//! tests, the bench and the demo wait on instead of log lines.
//!
//! ```no_run
//! # use std::time::Duration;
//! # use twin_lab::events::Events;
//! let events = Events::at("/tmp/t/primary.sock");
//! let mark = events.mark().unwrap();
//! // ... do something ...
//! events
//!     .wait(mark, "protection", Duration::from_secs(60), |e| {
//!         matches!(e.kind, twin_api::EventKind::Protected { .. })
//!     })
//!     .unwrap();
//! ```
//!
//! [`Events`] asks the process each time, so it sees nothing once the process is gone; a
//! [`Recorder`] follows the stream from the start and keeps what it saw, for questions about
//! a process that has exited (was it ever protected? did the failover that began complete?)
//! and for waits on a process that may exit right after the event (a primary that stands
//! down).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use twin_api::{Event, EventKind, EventsQuery};

use crate::error::{HarnessError, Result};
use crate::process::TwinProcess;

/// How long the answer to an events request may take.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The events of the process serving one control socket.
#[derive(Clone, Debug)]
pub struct Events {
    sock: PathBuf,
}

impl Events {
    pub fn at(sock: impl AsRef<Path>) -> Self {
        Events {
            sock: sock.as_ref().to_path_buf(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// `GET /v1/events` on the control socket (the answer's head within [`HEAD_TIMEOUT`]:
    /// a stopped (SIGSTOP) process answers nothing).
    fn open(&self, since: u64, epochs: bool, follow: bool) -> Result<Stream> {
        let q = EventsQuery {
            since,
            epochs,
            follow,
        };
        let stream = twin::control::client::events_within(&self.sock, q, HEAD_TIMEOUT)
            .map_err(|e| HarnessError::InvalidArgument(anyhow_chain(&e)))?;
        Ok(Stream {
            next_seq: stream.next_seq(),
            reader: stream.into_lines(),
            partial: String::new(),
        })
    }

    /// The sequence number the next event will get: pass it to [`Events::wait`] to wait for
    /// what happens after now.
    pub fn mark(&self) -> Result<u64> {
        Ok(self.open(u64::MAX, false, false)?.next_seq)
    }

    /// Every event held from `since` on (per-epoch ones with `epochs`).
    pub fn all(&self, since: u64, epochs: bool) -> Result<Vec<Event>> {
        let mut s = self.open(since, epochs, false)?;
        let mut out = Vec::new();
        loop {
            match s.read(Duration::from_secs(10))? {
                Next::Event(e) => out.push(*e),
                Next::Closed => return Ok(out),
                Next::Quiet => {
                    return Err(HarnessError::Timeout {
                        what: format!("the events held by {}", self.sock.display()),
                        after: Duration::from_secs(10),
                    })
                }
            }
        }
    }

    /// Waits up to `timeout` for the first event from `since` on that `pred` accepts.
    pub fn wait(
        &self,
        since: u64,
        what: &str,
        timeout: Duration,
        pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event> {
        self.wait_epochs(since, false, what, timeout, pred)
    }

    /// [`Events::wait`] over the per-epoch events too.
    pub fn wait_epochs(
        &self,
        since: u64,
        epochs: bool,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event> {
        let deadline = Instant::now() + timeout;
        let mut s = self.open(since, epochs, true)?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HarnessError::Timeout {
                    what: format!("{what} (event on {})", self.sock.display()),
                    after: timeout,
                });
            }
            match s.read(left)? {
                Next::Event(e) if pred(&e) => return Ok(*e),
                Next::Event(_) | Next::Quiet => {}
                Next::Closed => {
                    return Err(HarnessError::InvalidArgument(format!(
                        "{} closed its event stream while waiting for {what}",
                        self.sock.display()
                    )))
                }
            }
        }
    }

    /// [`Events::wait`] for a process `p` that may not serve its control socket yet (just
    /// spawned): asks until it does, and fails at once (with its last output) if `p` exits.
    /// It asks every few milliseconds and keeps no stream open in between, so it leaves no
    /// connection behind on the process.
    pub fn wait_live(
        &self,
        p: &mut TwinProcess,
        since: u64,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            let last = match self.all(since, false) {
                Ok(events) => match events.into_iter().find(|e| pred(e)) {
                    Some(e) => return Ok(e),
                    None => String::from("no such event yet"),
                },
                Err(e) => e.to_string(),
            };
            p.ensure_running()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HarnessError::Timeout {
                    what: format!(
                        "{what} (event on {}; {last}); last output of {}:\n{}",
                        self.sock.display(),
                        p.name(),
                        p.tail(20)
                    ),
                    after: timeout,
                });
            }
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// The first event held from `since` on that `pred` accepts, if any (lifecycle events).
    pub fn find(&self, since: u64, pred: impl FnMut(&Event) -> bool) -> Result<Option<Event>> {
        let mut pred = pred;
        Ok(self.all(since, false)?.into_iter().find(|e| pred(e)))
    }

    /// Starts recording this process's events, from its first on (see [`Recorder`]); with
    /// `epochs` its per-epoch events too.
    pub fn record(&self, epochs: bool) -> Recorder {
        Recorder::start(self.clone(), 0, epochs)
    }

    /// [`Events::record`] from the event numbered `since` on.
    pub fn record_from(&self, since: u64, epochs: bool) -> Recorder {
        Recorder::start(self.clone(), since, epochs)
    }

    /// Waits until the control socket answers (the process has bound it), at most `timeout`.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.mark() {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// One open event stream.
struct Stream {
    reader: BufReader<twin::control::client::Body>,
    next_seq: u64,
    /// A line begun but not finished when a read timed out.
    partial: String,
}

/// What one read of a stream gave.
enum Next {
    Event(Box<Event>),
    /// Nothing within the wait.
    Quiet,
    /// The server closed the stream.
    Closed,
}

impl Stream {
    /// The next event, waiting at most `wait`.
    fn read(&mut self, wait: Duration) -> Result<Next> {
        self.reader
            .get_ref()
            .socket()
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .map_err(|e| HarnessError::io("setting the event stream's timeout", e))?;
        match self.reader.read_line(&mut self.partial) {
            Ok(0) => Ok(Next::Closed),
            Ok(_) if !self.partial.ends_with('\n') => Ok(Next::Closed),
            Ok(_) => {
                let line = std::mem::take(&mut self.partial);
                serde_json::from_str(&line)
                    .map(|e| Next::Event(Box::new(e)))
                    .map_err(|e| {
                        HarnessError::InvalidArgument(format!(
                            "an event that does not parse: {line:?}: {e}"
                        ))
                    })
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(Next::Quiet)
            }
            Err(e) => Err(HarnessError::io("reading an event", e)),
        }
    }
}

/// An error and its causes, one line.
fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        out.push_str(": ");
        out.push_str(&c.to_string());
        src = c.source();
    }
    out
}

/// The names of `events`' kinds, in order (for messages).
pub fn names(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.name()).collect()
}

/// Whether `e` is a takeover decision, a grace that may end in one, or a takeover's start (a
/// backup judged its primary dead, or may have).
pub fn is_takeover(e: &Event) -> bool {
    matches!(
        &e.kind,
        EventKind::SessionEnded {
            decision: twin_api::Decision::TakeOver | twin_api::Decision::Grace,
            ..
        } | EventKind::FailoverStarted { .. }
    )
}

/// Whether `e` says the backup takes the VM over: the decision to (now, not a grace that a
/// reconnecting primary still ends without a takeover), its start or its end — what its log
/// says as "taking over", "failover: restoring" and `FAILOVER {…}`.
pub fn took_over(e: &Event) -> bool {
    matches!(
        &e.kind,
        EventKind::SessionEnded {
            decision: twin_api::Decision::TakeOver,
            ..
        } | EventKind::FailoverStarted { .. }
            | EventKind::FailoverComplete(_)
    )
}

// =============================================================================================
// The recorder.

/// How long a recorder's reads wait before they look at the stop flag.
const RECORD_POLL: Duration = Duration::from_millis(100);

struct Recorded {
    events: Vec<Event>,
    /// The next sequence number to record.
    next: u64,
    /// The stream was open at least once.
    connected: bool,
    /// The stream closed after it had been open, and the socket no longer answers: the
    /// process is gone; nothing more will come.
    ended: bool,
}

struct RecShared {
    state: Mutex<Recorded>,
    changed: Condvar,
    stop: AtomicBool,
}

impl RecShared {
    fn lock(&self) -> MutexGuard<'_, Recorded> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends what was not recorded yet (the thread and [`Recorder::sync`] both add).
    fn add(&self, batch: impl IntoIterator<Item = Event>) {
        let mut st = self.lock();
        for e in batch {
            if e.seq >= st.next {
                st.next = e.seq + 1;
                st.events.push(e);
            }
        }
        drop(st);
        self.changed.notify_all();
    }
}

/// A process's events as they happen, kept after it exits: a thread follows its control
/// socket's event stream (connecting as soon as the socket answers, from the first event
/// on) and records every event. Stops when dropped.
pub struct Recorder {
    events: Events,
    epochs: bool,
    shared: Arc<RecShared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("Recorder")
            .field("sock", &self.events.sock)
            .field("events", &st.events.len())
            .field("ended", &st.ended)
            .finish()
    }
}

impl Recorder {
    fn start(events: Events, since: u64, epochs: bool) -> Recorder {
        let shared = Arc::new(RecShared {
            state: Mutex::new(Recorded {
                events: Vec::new(),
                next: since,
                connected: false,
                ended: false,
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let (ev, sh) = (events.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("event-recorder".into())
            .spawn(move || record(&ev, epochs, &sh))
            .expect("spawn an event recorder thread");
        Recorder {
            events,
            epochs,
            shared,
            thread: Some(thread),
        }
    }

    /// The live view of the same socket.
    pub fn live(&self) -> &Events {
        &self.events
    }

    pub fn socket(&self) -> &Path {
        self.events.socket()
    }

    /// Every event recorded so far.
    pub fn events(&self) -> Vec<Event> {
        self.shared.lock().events.clone()
    }

    /// The events recorded with `seq >= since`.
    pub fn since(&self, since: u64) -> Vec<Event> {
        let st = self.shared.lock();
        let start = st.events.partition_point(|e| e.seq < since);
        st.events[start..].to_vec()
    }

    /// The first recorded event from `since` on that `pred` accepts.
    pub fn find(&self, since: u64, mut pred: impl FnMut(&Event) -> bool) -> Option<Event> {
        let st = self.shared.lock();
        st.events
            .iter()
            .filter(|e| e.seq >= since)
            .find(|e| pred(e))
            .cloned()
    }

    /// Whether any recorded event is one `pred` accepts.
    pub fn any(&self, pred: impl FnMut(&Event) -> bool) -> bool {
        self.find(0, pred).is_some()
    }

    /// The names of the recorded events from `since` on (for messages).
    pub fn names_since(&self, since: u64) -> Vec<&'static str> {
        names(&self.since(since))
    }

    /// Whether the process is gone (its stream closed and its socket no longer answers).
    pub fn ended(&self) -> bool {
        self.shared.lock().ended
    }

    /// The sequence number the process's next event will get (asked of it; what was
    /// recorded if it no longer answers): pass it to [`Recorder::wait`] for what happens
    /// after now.
    pub fn mark(&self) -> u64 {
        match self.events.mark() {
            Ok(m) => m,
            Err(_) => self.shared.lock().next,
        }
    }

    /// Catches up with the process: everything it holds now is recorded when this returns
    /// (nothing to do if it no longer answers). For a check that something did *not*
    /// happen, so that an event the stream has not delivered yet is not missed.
    pub fn sync(&self) {
        let next = self.shared.lock().next;
        if let Ok(batch) = self.events.all(next, self.epochs) {
            self.shared.add(batch);
        }
    }

    /// Waits up to `timeout` until the process is gone and its stream ended (everything it
    /// said is recorded then); whether it did.
    pub fn wait_end(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        while !st.ended {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Waits up to `timeout` for the first recorded event from `since` on that `pred`
    /// accepts; fails at once if the process is gone without one.
    pub fn wait(
        &self,
        since: u64,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        let mut looked = 0;
        loop {
            let start = st.events.partition_point(|e| e.seq < since).max(looked);
            if let Some(e) = st.events[start..].iter().find(|e| pred(e)) {
                return Ok(e.clone());
            }
            looked = st.events.len();
            if st.ended {
                let seen = st
                    .events
                    .iter()
                    .filter(|e| e.seq >= since)
                    .map(|e| e.kind.name());
                return Err(HarnessError::InvalidArgument(format!(
                    "the process of {} is gone (its event stream ended) without {what}; its \
                     events from {since} on: {:?}",
                    self.events.sock.display(),
                    seen.collect::<Vec<_>>()
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let seen = st
                    .events
                    .iter()
                    .filter(|e| e.seq >= since)
                    .map(|e| e.kind.name());
                return Err(HarnessError::Timeout {
                    what: format!(
                        "{what} (event on {}{}; its events from {since} on: {:?})",
                        self.events.sock.display(),
                        if st.connected {
                            ""
                        } else {
                            ", which never answered"
                        },
                        seen.collect::<Vec<_>>()
                    ),
                    after: timeout,
                });
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The recorder's thread: connect (retrying until the socket answers), follow, record;
/// after a stream that was open closes, once more, and if the socket no longer answers the
/// process is gone.
fn record(events: &Events, epochs: bool, shared: &RecShared) {
    let stopping = || shared.stop.load(Ordering::Acquire);
    while !stopping() {
        let next = shared.lock().next;
        let stream = events.open(next, epochs, true);
        let mut s = match stream {
            Ok(s) => s,
            Err(_) => {
                let mut st = shared.lock();
                if st.connected {
                    st.ended = true;
                    drop(st);
                    shared.changed.notify_all();
                    return;
                }
                drop(st);
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        shared.lock().connected = true;
        shared.changed.notify_all();
        while !stopping() {
            match s.read(RECORD_POLL) {
                Ok(Next::Event(e)) => shared.add([*e]),
                Ok(Next::Quiet) => {}
                Ok(Next::Closed) | Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twin_api::EventLog;

    fn committed(epoch: u64) -> EventKind {
        EventKind::EpochCommitted {
            epoch,
            pages: 1,
            apply_us: 1.0,
        }
    }

    #[test]
    fn a_recorder_connects_when_the_socket_appears_follows_and_outlives_the_process() {
        let dir = crate::TestDir::new("events-unit").expect("dir");
        let sock = dir.join("p.sock");
        let rec = Events::at(&sock).record(true);
        // Nothing serves the socket yet: waits time out, and say so.
        let err = rec
            .wait(0, "anything", Duration::from_millis(100), |_| true)
            .unwrap_err();
        assert!(matches!(err, HarnessError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("never answered"), "{err}");

        let log = EventLog::new();
        log.emit(EventKind::SyncComplete);
        let control = twin::control::serve(&sock, log.clone()).expect("serve");
        let first = rec
            .wait(0, "the first event", Duration::from_secs(5), |_| true)
            .expect("the recorder connects and gets what came before");
        assert_eq!((first.seq, first.kind.name()), (1, "sync_complete"));
        let mark = rec.mark();
        assert_eq!(mark, 2);
        log.emit(committed(7));
        let e = rec
            .wait(mark, "the epoch", Duration::from_secs(5), |e| {
                matches!(e.kind, EventKind::EpochCommitted { epoch: 7, .. })
            })
            .expect("per-epoch events are recorded as they come");
        assert_eq!(e.seq, 2);
        log.emit(EventKind::SyncComplete);
        rec.sync();
        assert_eq!(
            names(&rec.events()),
            ["sync_complete", "epoch_committed", "sync_complete"]
        );
        assert!(!rec.ended());

        // The process goes: what it said stays, and a wait for more fails at once.
        drop(control);
        assert!(rec.wait_end(Duration::from_secs(5)));
        assert_eq!(rec.events().len(), 3);
        assert_eq!(rec.mark(), 4, "the recorded mark once the process is gone");
        let t = Instant::now();
        let err = rec
            .wait(0, "something else", Duration::from_secs(30), |e| {
                matches!(e.kind, EventKind::FailoverStarted { .. })
            })
            .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(err.to_string().contains("gone"), "{err}");
        assert!(Events::at(&sock).mark().is_err());
    }

    #[test]
    fn lifecycle_recorders_skip_per_epoch_events_and_takeovers_are_told_apart() {
        let dir = crate::TestDir::new("events-unit").expect("dir");
        let sock = dir.join("p.sock");
        let log = EventLog::new();
        let _control = twin::control::serve(&sock, log.clone()).expect("serve");
        let rec = Events::at(&sock).record(false);
        log.emit(committed(1));
        let grace = log.emit(EventKind::SessionEnded {
            reason: "x".into(),
            decision: twin_api::Decision::Grace,
            committed_epoch: Some(1),
        });
        rec.wait(0, "the grace", Duration::from_secs(5), |e| e.seq == grace)
            .expect("recorded");
        assert_eq!(names(&rec.events()), ["session_ended"]);
        let e = rec.events().remove(0);
        assert!(is_takeover(&e), "a grace may end in a takeover");
        assert!(!took_over(&e), "a grace is not a takeover yet");
        log.emit(EventKind::FailoverStarted { epoch: 1 });
        let started = rec
            .wait(0, "the takeover", Duration::from_secs(5), took_over)
            .expect("recorded");
        assert_eq!(started.kind.name(), "failover_started");
    }
}
