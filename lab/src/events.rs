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

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use twin_api::{Event, EventKind, Request, Response};

use crate::error::{HarnessError, Result};

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

    fn open(&self, since: u64, epochs: bool, follow: bool) -> Result<Stream> {
        let io = |what: &str, e| HarnessError::io(format!("{what} {}", self.sock.display()), e);
        let mut conn = UnixStream::connect(&self.sock).map_err(|e| io("connecting to", e))?;
        let mut line = serde_json::to_string(&Request::Events {
            since,
            epochs,
            follow,
        })
        .expect("requests serialize");
        line.push('\n');
        conn.write_all(line.as_bytes())
            .map_err(|e| io("asking for events on", e))?;
        let mut reader = BufReader::new(conn);
        let mut head = String::new();
        reader
            .read_line(&mut head)
            .map_err(|e| io("reading the events of", e))?;
        match serde_json::from_str::<Response>(&head) {
            Ok(Response::Ok(v)) => Ok(Stream {
                reader,
                next_seq: v["next_seq"].as_u64().unwrap_or(0),
                partial: String::new(),
            }),
            Ok(Response::Error(e)) => Err(HarnessError::InvalidArgument(format!(
                "{}: {e}",
                self.sock.display()
            ))),
            Err(e) => Err(HarnessError::InvalidArgument(format!(
                "{} answered {head:?}: {e}",
                self.sock.display()
            ))),
        }
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
    reader: BufReader<UnixStream>,
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

/// Whether `e` is a takeover decision or its start (a backup judged its primary dead).
pub fn is_takeover(e: &Event) -> bool {
    matches!(
        &e.kind,
        EventKind::SessionEnded {
            decision: twin_api::Decision::TakeOver | twin_api::Decision::Grace,
            ..
        } | EventKind::FailoverStarted { .. }
    )
}
