//! The control socket: one JSON request per line, one JSON response per line, over a Unix
//! stream socket. `twin status`, `twin snapshot`, `twin failover` and `twin events` are its
//! clients; the process running a VM serves it from its main loop. An `Events` request is
//! answered by the connection's own thread from the process's [`EventLog`], without the
//! main loop: it streams typed events (`twin-api`) as they happen.
//!
//! One process owns a socket path: [`serve`] refuses a path another live process serves
//! (it holds `<path>.lock`, or something answers on the socket) and replaces only a stale
//! socket (nothing listens: its process died). A directory or any other file at the path is
//! refused, never deleted.
//!
//! Local clients cannot cost the process its control or unbounded resources:
//! - the socket is mode 0600 from before it accepts anything, and a peer whose uid is
//!   neither root nor the server's (SO_PEERCRED) is refused — both, so that a socket
//!   whose mode was widened afterwards is still not an open door;
//! - a request line is at most [`MAX_LINE`] bytes (a longer one gets an error and the
//!   connection is closed, without buffering more);
//! - at most [`MAX_CONNECTIONS`] connections are served at once (one thread each); beyond
//!   that a connection gets an error line and is closed, and a connection without a
//!   complete request for [`IDLE_TIMEOUT`] is closed;
//! - when `accept` fails (out of file descriptors, say) the accept thread backs off,
//!   10 ms doubling to 1 s, and logs once until it accepts again.
//!
//! Threads: `control` accepts; `control-conn` serves one connection. All are owned by the
//! [`Control`] handle: dropping it stops the accept thread, which shuts every connection
//! down, answers any request still waiting for the main loop, joins the connection threads,
//! and removes the socket (if it is still ours).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

/// Longest request line, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection that sends no complete request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection waits for the main loop to answer a request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that does not read its answer is dropped after this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Back-off after a failed accept: doubling from the first to the last.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

use twin_api::EventLog;
pub use twin_api::{Request, Response};

/// A request from a client and where to send its answer.
pub type Incoming = (Request, Sender<Response>);

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path} is in use by a running twin process")]
    InUse { path: PathBuf },
    #[error("control socket {path} is a directory")]
    IsDirectory { path: PathBuf },
    #[error("control socket path {path} exists and is not a socket; not replacing it")]
    NotASocket { path: PathBuf },
    #[error("cannot tell whether control socket {path} is in use; not replacing it")]
    Probe {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock {lock} (the lock of control socket {path})")]
    Lock {
        path: PathBuf,
        lock: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the control socket {path} (is the VM process running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path} did not answer")]
    Exchange {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path} answered something that is not a response")]
    BadResponse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The bounds a server keeps (see the module docs); [`Limits::default`] is what `twin`
/// serves with, tests shrink them.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_line: usize,
    pub max_connections: usize,
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line: MAX_LINE,
            max_connections: MAX_CONNECTIONS,
            idle: IDLE_TIMEOUT,
        }
    }
}

/// A served control socket: requests arrive here; dropping it stops serving (see the
/// module docs).
pub struct Control {
    rx: Option<Receiver<Incoming>>,
    stop: Arc<EventFd>,
    accept: Option<JoinHandle<()>>,
    path: PathBuf,
    /// Device and inode of the socket we bound: removed on drop only if it is still ours.
    inode: (u64, u64),
    /// Held for the life of the server: what makes the path ours (see [`serve`]).
    _lock: Flock<File>,
}

impl Control {
    /// A request, if one is waiting.
    pub fn try_recv(&self) -> Result<Incoming, TryRecvError> {
        self.rx
            .as_ref()
            .expect("receiver lives until drop")
            .try_recv()
    }

    /// The next request, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Incoming, RecvTimeoutError> {
        self.rx
            .as_ref()
            .expect("receiver lives until drop")
            .recv_timeout(timeout)
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        // Requests still queued lose their reply senders: their connections answer at once.
        drop(self.rx.take());
        let _ = self.stop.write(1);
        if let Some(t) = self.accept.take() {
            if t.join().is_err() {
                tracing::error!(path = %self.path.display(), "the control thread panicked");
            }
        }
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
        // The lock file stays: removing it would race with a process locking it.
    }
}

/// `<path>.lock`.
fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Listens on `path` with the default [`Limits`]; see [`serve_with`].
pub fn serve(path: &Path, events: Arc<EventLog>) -> Result<Control, ControlError> {
    serve_with(path, Limits::default(), events)
}

/// Listens on `path` and forwards requests to the returned [`Control`]; the main loop
/// answers them (a client whose request is not answered within 30 s gets an error).
///
/// The path is ours if we hold the exclusive `flock` of `<path>.lock` (a live server holds
/// it for its whole life, so two processes starting at once cannot both replace a stale
/// socket) and nothing answers on a socket already there (a server from before the lock).
/// Only then is a socket at the path stale and replaced; a directory or another file is
/// refused.
pub fn serve_with(
    path: &Path,
    limits: Limits,
    events: Arc<EventLog>,
) -> Result<Control, ControlError> {
    let bind_err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let existing = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(ControlError::IsDirectory {
                path: path.to_path_buf(),
            })
        }
        Ok(m) if !m.file_type().is_socket() => {
            return Err(ControlError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(bind_err(e)),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    let lock = take_lock(path)?;
    if existing {
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(ControlError::InUse {
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing a stale control socket (nothing listens on it)");
                std::fs::remove_file(path).map_err(bind_err)?;
            }
            Err(source) => {
                return Err(ControlError::Probe {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    let listener = bind_private(path).map_err(bind_err)?;
    let inode = std::fs::metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(bind_err)?;
    let stop = Arc::new(
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| bind_err(e.into()))?,
    );
    let (tx, rx) = channel();
    let server = Server {
        listener,
        tx,
        events,
        stop: stop.clone(),
        limits,
        path: path.to_path_buf(),
        conns: Vec::new(),
    };
    let accept = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || server.run())
        .map_err(bind_err)?;
    Ok(Control {
        rx: Some(rx),
        stop,
        accept: Some(accept),
        path: path.to_path_buf(),
        inode,
        _lock: lock,
    })
}

fn take_lock(path: &Path) -> Result<Flock<File>, ControlError> {
    let lock = lock_path(path);
    let lock_err = |source| ControlError::Lock {
        path: path.to_path_buf(),
        lock: lock.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock)
        .map_err(lock_err)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(ControlError::InUse {
            path: path.to_path_buf(),
        }),
        Err((_, e)) => Err(lock_err(e.into())),
    }
}

/// Binds a non-blocking listening socket at `path` with mode 0600 set between bind and
/// listen: no one can connect before the mode is private (a bound socket that does not
/// listen refuses connections).
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    socket::bind(fd.as_raw_fd(), &addr)?;
    let listening = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| Ok(socket::listen(&fd, Backlog::new(64)?)?));
    if let Err(e) = listening {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// How often a connection waiting for the main loop's answer checks for a shutdown.
const SHUTDOWN_CHECK: Duration = Duration::from_millis(100);

/// What the accept thread and a connection thread share about one connection.
struct Conn {
    stream: UnixStream,
    /// Set at shutdown: a request still waiting for the main loop stops waiting (the
    /// sockets are shut down too, which ends reads and writes at once).
    stopping: AtomicBool,
}

/// The accept thread's state.
struct Server {
    listener: UnixListener,
    tx: Sender<Incoming>,
    events: Arc<EventLog>,
    stop: Arc<EventFd>,
    limits: Limits,
    path: PathBuf,
    /// Connection threads; the thread owns its connection (the last strong reference: the
    /// socket closes when the thread ends), this only reaches it to shut it down.
    conns: Vec<(JoinHandle<()>, Weak<Conn>)>,
}

/// Accept failures in a row: how long to sleep next and whether to log.
#[derive(Debug, Default)]
struct Backoff {
    failures: u64,
    delay: Duration,
}

impl Backoff {
    /// A failed accept: the pause before the next one, and whether this failure is the
    /// first of its run (the one to log).
    fn failed(&mut self) -> (Duration, bool) {
        self.failures += 1;
        self.delay = if self.failures == 1 {
            BACKOFF_MIN
        } else {
            (self.delay * 2).min(BACKOFF_MAX)
        };
        (self.delay, self.failures == 1)
    }

    /// A successful accept: the number of failures that preceded it (0: nothing to say).
    fn succeeded(&mut self) -> u64 {
        std::mem::take(self).failures
    }
}

/// Writes one response line, ignoring a client that has gone.
fn send(mut stream: &UnixStream, response: &Response) -> bool {
    let mut out = serde_json::to_string(response).expect("responses serialize");
    out.push('\n');
    stream.write_all(out.as_bytes()).is_ok()
}

impl Server {
    fn run(mut self) {
        let mut backoff = Backoff::default();
        let mut at_cap = false;
        loop {
            let mut fds = [
                PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.stop.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    // Cannot happen with two valid fds; do not spin if it does.
                    tracing::error!(path = %self.path.display(), error = %e, "control socket: poll failed");
                    std::thread::sleep(BACKOFF_MAX);
                }
            }
            if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                break;
            }
            // Take every pending connection, then poll again.
            loop {
                match self.listener.accept() {
                    Ok((stream, _)) => {
                        let failed = backoff.succeeded();
                        if failed > 0 {
                            tracing::info!(path = %self.path.display(), failed, "control socket: accepting again");
                        }
                        self.reap();
                        if self.conns.len() >= self.limits.max_connections {
                            if !at_cap {
                                tracing::warn!(path = %self.path.display(), max = self.limits.max_connections, "control socket: too many connections, refusing more (logged once until below the cap)");
                                at_cap = true;
                            }
                            refuse(
                                &stream,
                                &format!(
                                    "too many control connections ({} open); try again later",
                                    self.conns.len()
                                ),
                            );
                            continue;
                        }
                        at_cap = false;
                        self.start_connection(stream);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                        ) => {}
                    Err(e) => {
                        // EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection stays queued and
                        // the listener readable; retrying at once would spin.
                        let (pause, first) = backoff.failed();
                        if first {
                            tracing::warn!(path = %self.path.display(), error = %e, "control socket: accept failed; backing off up to 1 s between tries (logged once until it works again)");
                        }
                        if self.sleep_unless_stopped(pause) {
                            self.shut_down();
                            return;
                        }
                        break;
                    }
                }
            }
        }
        self.shut_down();
    }

    /// Sleeps `pause` unless told to stop first; true if told to stop.
    fn sleep_unless_stopped(&self, pause: Duration) -> bool {
        let mut fds = [PollFd::new(self.stop.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(pause).unwrap_or(PollTimeout::MAX);
        matches!(poll(&mut fds, ms), Ok(n) if n > 0)
    }

    /// Joins the connection threads that have finished.
    fn reap(&mut self) {
        let (done, live): (Vec<_>, Vec<_>) = std::mem::take(&mut self.conns)
            .into_iter()
            .partition(|(t, _)| t.is_finished());
        self.conns = live;
        for (t, _) in done {
            if t.join().is_err() {
                tracing::error!(path = %self.path.display(), "a control connection thread panicked");
            }
        }
    }

    fn start_connection(&mut self, stream: UnixStream) {
        if let Err(why) = check_peer(&stream) {
            tracing::warn!(path = %self.path.display(), "control socket: refused a connection: {why}");
            refuse(&stream, &why);
            return;
        }
        let conn = Arc::new(Conn {
            stream,
            stopping: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&conn);
        let (tx, limits, events) = (self.tx.clone(), self.limits, self.events.clone());
        match std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || serve_connection(&conn, &tx, &events, limits))
        {
            Ok(t) => self.conns.push((t, weak)),
            Err(e) => {
                // The closure (and the connection in it) is dropped: the client sees EOF.
                tracing::warn!(path = %self.path.display(), error = %e, "control socket: cannot start a connection thread");
            }
        }
    }

    /// Ends every connection and joins its thread: reads end at once, a request waiting
    /// for the main loop stops waiting within [`SHUTDOWN_CHECK`] and is answered with an
    /// error (only the read side is shut, so that this last answer still goes out; the
    /// short write timeout bounds a client that reads nothing).
    fn shut_down(&mut self) {
        for c in self.conns.iter().filter_map(|(_, c)| c.upgrade()) {
            c.stopping.store(true, Ordering::Release);
            let _ = c.stream.set_write_timeout(Some(Duration::from_millis(200)));
            let _ = c.stream.shutdown(std::net::Shutdown::Read);
        }
        for (t, _) in self.conns.drain(..) {
            let _ = t.join();
        }
    }
}

/// Root or our own uid only: the socket's mode already says so, this holds even if the
/// mode is widened later (or the socket is reached through a descriptor passed on).
fn check_peer(stream: &UnixStream) -> Result<(), String> {
    let cred = socket::getsockopt(stream, sockopt::PeerCredentials)
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    let me = unsafe { libc::geteuid() };
    if cred.uid() == 0 || cred.uid() == me {
        Ok(())
    } else {
        Err(format!(
            "uid {} (pid {}) may not use this control socket (only root and uid {me})",
            cred.uid(),
            cred.pid()
        ))
    }
}

/// Answers `why` and closes: the write cannot block long (a fresh socket's buffer is
/// empty, and a write timeout bounds it anyway).
fn refuse(stream: &UnixStream, why: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    send(stream, &Response::Error(why.into()));
}

/// What reading a request line came to.
enum Line {
    Complete(Vec<u8>),
    /// The peer closed (a last line without newline is still a line: `Complete`).
    Closed,
    TooLong,
    Idle,
}

/// Reads the next line (newline removed) into `buf`'s front, keeping what follows it in
/// `buf` for the next call. At most `limits.max_line` bytes plus one read are ever
/// buffered; the whole line must arrive within `limits.idle` (a per-read timeout would let
/// a byte a minute hold the connection forever).
fn read_line(stream: &UnixStream, buf: &mut Vec<u8>, limits: &Limits) -> Line {
    let deadline = Instant::now() + limits.idle;
    let mut scanned = 0;
    loop {
        if let Some(i) = buf[scanned..].iter().position(|&b| b == b'\n') {
            let end = scanned + i;
            if end > limits.max_line {
                return Line::TooLong;
            }
            let mut line: Vec<u8> = buf.drain(..=end).collect();
            line.pop();
            return Line::Complete(line);
        }
        scanned = buf.len();
        if buf.len() > limits.max_line {
            return Line::TooLong;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Line::Idle;
        }
        if stream.set_read_timeout(Some(left)).is_err() {
            return Line::Closed;
        }
        let mut chunk = [0u8; 8192];
        match (&*stream).read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Line::Closed,
            Ok(0) => return Line::Complete(std::mem::take(buf)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return Line::Closed,
        }
    }
}

/// The main loop's answer, or an error when it drops the request, takes longer than
/// [`ANSWER_TIMEOUT`], or the server shuts down meanwhile.
fn wait_for_answer(conn: &Conn, rrx: &Receiver<Response>) -> Response {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        match rrx.recv_timeout(SHUTDOWN_CHECK) {
            Ok(r) => return r,
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout)
                if conn.stopping.load(Ordering::Acquire) || Instant::now() >= deadline =>
            {
                break
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
    Response::Error("the VM process did not answer".into())
}

fn serve_connection(conn: &Conn, tx: &Sender<Incoming>, events: &Arc<EventLog>, limits: Limits) {
    let stream = &conn.stream;
    // An accepted socket does not inherit the listener's O_NONBLOCK on Linux; say so anyway.
    if stream.set_nonblocking(false).is_err()
        || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
    {
        return;
    }
    let mut buf = Vec::new();
    loop {
        let line = match read_line(stream, &mut buf, &limits) {
            Line::Complete(l) => l,
            Line::Closed => return,
            Line::TooLong => {
                refuse(
                    stream,
                    &format!(
                        "request line longer than {} bytes; closing the connection",
                        limits.max_line
                    ),
                );
                return;
            }
            Line::Idle => {
                refuse(
                    stream,
                    &format!(
                        "no complete request within {} s; closing the connection",
                        limits.idle.as_secs_f64()
                    ),
                );
                return;
            }
        };
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(Request::Events {
                since,
                epochs,
                follow,
            }) => {
                stream_events(conn, events, since, epochs, follow);
                return;
            }
            Ok(req) => {
                let (rtx, rrx) = channel();
                if tx.send((req, rtx)).is_err() {
                    return;
                }
                wait_for_answer(conn, &rrx)
            }
            Err(e) => Response::Error(format!("malformed request: {e}")),
        };
        if !send(stream, &response) {
            return;
        }
    }
}

/// How often a stream with nothing to send checks that its client is still there.
const STREAM_CHECK: Duration = Duration::from_millis(250);

/// Answers an `Events` request: the next sequence number, then the events from `since` on,
/// then (with `follow`) each new one, until the client goes or the server stops.
fn stream_events(conn: &Conn, events: &Arc<EventLog>, since: u64, epochs: bool, follow: bool) {
    let stream = &conn.stream;
    let head = Response::Ok(serde_json::json!({ "next_seq": events.next_seq() }));
    if !send(stream, &head) {
        return;
    }
    let mut sub = events.subscribe(since, epochs);
    loop {
        let batch = sub.next_batch(if follow { STREAM_CHECK } else { Duration::ZERO });
        if batch.is_empty() {
            if !follow || conn.stopping.load(Ordering::Acquire) || client_gone(stream) {
                return;
            }
            continue;
        }
        let mut out = String::new();
        for e in &batch {
            out.push_str(&serde_json::to_string(e).expect("events serialize"));
            out.push('\n');
        }
        if (&*stream).write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

/// Whether the client of a stream closed its end (it sends nothing after its request, so a
/// readable socket that has no byte to peek at is at its end).
fn client_gone(stream: &UnixStream) -> bool {
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => false,
        Ok(_) => {
            let r = fds[0].revents().unwrap_or(PollFlags::empty());
            if r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                return true;
            }
            let mut b = [0u8; 1];
            let flags = socket::MsgFlags::MSG_PEEK | socket::MsgFlags::MSG_DONTWAIT;
            match socket::recv(stream.as_raw_fd(), &mut b, flags) {
                Ok(0) => true,
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => false,
                Err(_) => true,
            }
        }
        Err(_) => true,
    }
}

/// A client's view of an event stream (see [`events`]).
pub struct EventStream {
    lines: std::io::Lines<BufReader<UnixStream>>,
    path: PathBuf,
}

impl EventStream {
    /// The next event; `None` when the server closed the stream.
    pub fn next_event(&mut self) -> Result<Option<twin_api::Event>, ControlError> {
        let Some(line) = self.lines.next() else {
            return Ok(None);
        };
        let line = line.map_err(|source| ControlError::Exchange {
            path: self.path.clone(),
            source,
        })?;
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|source| ControlError::BadResponse {
                path: self.path.clone(),
                source,
            })
    }
}

/// Asks for the events from `since` on (see [`Request::Events`]).
pub fn events(
    path: &Path,
    since: u64,
    epochs: bool,
    follow: bool,
) -> Result<EventStream, ControlError> {
    let exchange = |source| ControlError::Exchange {
        path: path.to_path_buf(),
        source,
    };
    let mut conn = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let mut line = serde_json::to_string(&Request::Events {
        since,
        epochs,
        follow,
    })
    .expect("requests serialize");
    line.push('\n');
    conn.write_all(line.as_bytes()).map_err(exchange)?;
    let mut lines = BufReader::new(conn).lines();
    let head = lines
        .next()
        .ok_or_else(|| exchange(std::io::ErrorKind::UnexpectedEof.into()))?
        .map_err(exchange)?;
    match serde_json::from_str::<Response>(&head) {
        Ok(Response::Ok(_)) => Ok(EventStream {
            lines,
            path: path.to_path_buf(),
        }),
        Ok(Response::Error(e)) => Err(exchange(std::io::Error::other(e))),
        Err(source) => Err(ControlError::BadResponse {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Sends one request and waits for its response.
pub fn request(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let exchange = |source| ControlError::Exchange {
        path: path.to_path_buf(),
        source,
    };
    let mut conn = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(exchange)?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    conn.write_all(line.as_bytes()).map_err(exchange)?;
    let mut answer = String::new();
    BufReader::new(conn)
        .read_line(&mut answer)
        .map_err(exchange)?;
    serde_json::from_str(&answer).map_err(|source| ControlError::BadResponse {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn sock_path(label: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "twin-ctl-test-{}-{}-{label}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("ctl.sock")
    }

    /// A server whose requests a thread answers, like a main loop would.
    struct Answering {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<()>,
    }

    /// Answers Status (and refuses the rest) until [`stop`]; the server is dropped then.
    fn answer(control: Control) -> Answering {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                if let Ok((req, reply)) = control.recv_timeout(Duration::from_millis(10)) {
                    let _ = reply.send(match req {
                        Request::Status => Response::Ok(serde_json::json!({"role": "test"})),
                        other => Response::Error(format!("unsupported {other:?}")),
                    });
                }
            }
        });
        Answering { stop, thread }
    }

    fn stop(server: Answering) {
        server.stop.store(true, Ordering::Release);
        server.thread.join().unwrap();
    }

    fn status_ok(path: &Path) -> bool {
        matches!(request(path, &Request::Status), Ok(Response::Ok(v)) if v["role"] == "test")
    }

    fn read_answer(c: &UnixStream, timeout: Duration) -> String {
        c.set_read_timeout(Some(timeout)).unwrap();
        let mut a = String::new();
        let _ = BufReader::new(c).read_line(&mut a);
        a
    }

    /// True if the server has closed `c`: EOF, or ECONNRESET when it closed with bytes of
    /// ours still unread (what a refused long line leaves) — not a timeout.
    fn closed(c: &UnixStream, timeout: Duration) -> bool {
        c.set_read_timeout(Some(timeout)).unwrap();
        let mut rest = Vec::new();
        match (&*c).read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    #[test]
    fn request_round_trip_and_malformed_input() {
        let path = sock_path("round-trip");
        let server = answer(serve(&path, EventLog::new()).unwrap());
        assert!(status_ok(&path));
        assert!(matches!(
            request(&path, &Request::Failover).unwrap(),
            Response::Error(_)
        ));
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"{nonsense\n").unwrap();
        let a = read_answer(&c, Duration::from_secs(5));
        assert!(a.contains("malformed request"), "{a}");
        // Two requests in one write, the second without a newline before the close.
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"\"Status\"\n\"Status\"").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut all = String::new();
        c.read_to_string(&mut all).unwrap();
        assert_eq!(all.lines().count(), 2, "{all}");
        stop(server);
        assert!(!path.exists(), "a stopped server removes its socket");
        assert!(matches!(
            request(&path, &Request::Status),
            Err(ControlError::Connect { .. })
        ));
    }

    #[test]
    fn a_live_socket_is_not_taken_and_a_stale_one_is_replaced() {
        let path = sock_path("in-use");
        let server = answer(serve(&path, EventLog::new()).unwrap());
        let e = serve(&path, EventLog::new())
            .err()
            .expect("a second server on a live socket");
        assert!(matches!(e, ControlError::InUse { .. }), "{e}");
        assert!(
            e.to_string().contains("in use by a running twin process")
                && e.to_string().contains(&*path.to_string_lossy()),
            "{e}"
        );
        assert!(status_ok(&path), "the first server still answers");
        stop(server);

        // A socket nobody listens on (its process died: std does not unlink on drop).
        drop(UnixListener::bind(&path).unwrap());
        let server = answer(serve(&path, EventLog::new()).expect("a stale socket is replaced"));
        assert!(status_ok(&path));
        stop(server);

        // A live listener of a server without the lock (an older twin) is not taken either.
        let other = UnixListener::bind(&path).unwrap();
        assert!(matches!(
            serve(&path, EventLog::new()),
            Err(ControlError::InUse { .. })
        ));
        drop(other);
    }

    #[test]
    fn other_files_at_the_path_are_refused_and_kept() {
        let path = sock_path("not-a-socket");
        std::fs::write(&path, b"precious").unwrap();
        let e = serve(&path, EventLog::new())
            .err()
            .expect("a regular file is not a socket");
        assert!(matches!(e, ControlError::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let e = serve(&path, EventLog::new())
            .err()
            .expect("a directory is not a socket");
        assert!(e.to_string().contains("is a directory"), "{e}");
        assert!(path.is_dir());
        std::fs::remove_dir(&path).unwrap();
        std::os::unix::fs::symlink("/nonexistent", &path).unwrap();
        assert!(matches!(
            serve(&path, EventLog::new()),
            Err(ControlError::NotASocket { .. })
        ));
        assert!(
            std::fs::symlink_metadata(&path).is_ok(),
            "the symlink is kept"
        );
    }

    #[test]
    fn the_socket_is_private_and_strangers_are_refused() {
        let path = sock_path("private");
        let server = answer(serve(&path, EventLog::new()).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "mode {mode:o}");
        // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
        // A thread of another uid: the raw syscall changes this thread's credentials only
        // (the libc wrapper would change every thread's).
        let as_nobody = |path: PathBuf| {
            std::thread::spawn(move || {
                // SAFETY: setresuid takes three integers; -1 keeps the real and saved uid
                // (root, so the thread could switch back), only the effective uid changes.
                let rc = unsafe { libc::syscall(libc::SYS_setresuid, -1i32, 65534i32, -1i32) };
                assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
                UnixStream::connect(&path).map(|c| read_answer(&c, Duration::from_secs(5)))
            })
            .join()
            .unwrap()
        };
        let e = as_nobody(path.clone()).expect_err("mode 0600 keeps uid 65534 out");
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        // Even with the mode widened, the peer's uid is checked.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let a = as_nobody(path.clone()).expect("connects once the mode allows");
        assert!(a.contains("uid 65534") && a.contains("may not use"), "{a}");
        assert!(status_ok(&path), "root still may");
        stop(server);
    }

    #[test]
    fn a_line_longer_than_the_bound_is_refused_without_being_buffered() {
        let path = sock_path("long-line");
        let limits = Limits {
            max_line: 1024,
            ..Limits::default()
        };
        let server = answer(serve_with(&path, limits, EventLog::new()).unwrap());
        // Exactly at the bound: a (malformed) request, answered.
        let mut c = UnixStream::connect(&path).unwrap();
        let mut line = vec![b' '; 1024];
        line.push(b'\n');
        c.write_all(&line).unwrap();
        let a = read_answer(&c, Duration::from_secs(5));
        assert!(a.contains("malformed request"), "{a}");
        // One byte more, unterminated: refused, and the connection closed.
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(&[b'x'; 1025]).unwrap();
        let a = read_answer(&c, Duration::from_secs(5));
        assert!(a.contains("longer than 1024 bytes"), "{a}");
        assert!(closed(&c, Duration::from_secs(5)));
        // Terminated but too long, in one write with a good request after it.
        let mut c = UnixStream::connect(&path).unwrap();
        let mut two = vec![b'x'; 2000];
        two.extend_from_slice(b"\n\"Status\"\n");
        c.write_all(&two).unwrap();
        let a = read_answer(&c, Duration::from_secs(5));
        assert!(a.contains("longer than"), "{a}");
        assert!(closed(&c, Duration::from_secs(5)));
        assert!(status_ok(&path));
        stop(server);
    }

    #[test]
    fn connections_are_capped_and_idle_ones_closed() {
        let path = sock_path("cap");
        let limits = Limits {
            max_connections: 2,
            idle: Duration::from_millis(300),
            ..Limits::default()
        };
        let server = answer(serve_with(&path, limits, EventLog::new()).unwrap());
        let t = Instant::now();
        let a = UnixStream::connect(&path).unwrap();
        let b = UnixStream::connect(&path).unwrap();
        // A slow client: a byte every 50 ms never completes a line; it is cut at the idle
        // bound all the same (the bound is on the request, not on each read).
        let mut slow = b.try_clone().unwrap();
        let dribble = std::thread::spawn(move || {
            for _ in 0..40 {
                if slow.write_all(b" ").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let third = UnixStream::connect(&path).unwrap();
        let t3 = Instant::now();
        let r = read_answer(&third, Duration::from_secs(5));
        assert!(r.contains("too many control connections"), "{r}");
        assert!(
            t3.elapsed() < Duration::from_millis(250),
            "refused at once, not after {:?}",
            t3.elapsed()
        );
        assert!(closed(&third, Duration::from_secs(5)));
        for (name, c) in [("idle", &a), ("slow", &b)] {
            let r = read_answer(c, Duration::from_secs(5));
            assert!(r.contains("no complete request"), "{name}: {r}");
            assert!(closed(c, Duration::from_secs(5)), "{name} still open");
            let after = t.elapsed();
            assert!(
                after >= Duration::from_millis(300) && after < Duration::from_millis(1200),
                "{name} closed after {after:?}, want about 300 ms"
            );
        }
        dribble.join().unwrap();
        // Both gone: there is room again.
        let mut ok = false;
        for _ in 0..50 {
            if status_ok(&path) {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(ok, "no room after the idle connections were closed");
        stop(server);
    }

    #[test]
    fn dropping_the_server_ends_every_connection_at_once() {
        let path = sock_path("drop");
        let control = serve(&path, EventLog::new()).unwrap();
        // A request the main loop never answers, and an idle connection.
        let mut waiting = UnixStream::connect(&path).unwrap();
        waiting.write_all(b"\"Status\"\n").unwrap();
        let idle = UnixStream::connect(&path).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        drop(control);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "drop took {:?}",
            t.elapsed()
        );
        let a = read_answer(&waiting, Duration::from_secs(5));
        assert!(a.contains("Error"), "{a}");
        assert!(closed(&idle, Duration::from_secs(5)));
        assert!(!path.exists());
    }

    #[test]
    fn accept_failures_back_off_and_are_logged_once() {
        let mut b = Backoff::default();
        let runs: Vec<(Duration, bool)> = (0..10).map(|_| b.failed()).collect();
        assert_eq!(runs[0], (BACKOFF_MIN, true));
        assert!(
            runs[1..].iter().all(|&(_, log)| !log),
            "logged once: {runs:?}"
        );
        assert!(runs.windows(2).all(|w| w[1].0 >= w[0].0), "{runs:?}");
        assert_eq!(runs[9].0, BACKOFF_MAX);
        let total: Duration = runs.iter().map(|r| r.0).sum();
        assert!(
            total > Duration::from_secs(3),
            "ten failures spread over {total:?}"
        );
        assert_eq!(b.succeeded(), 10);
        assert_eq!(b.succeeded(), 0);
        assert_eq!(b.failed(), (BACKOFF_MIN, true), "a new run logs again");
    }
}
