//! The control socket: an HTTP/1.1 + JSON API over a Unix stream socket, every path under
//! `/v1` (described in `twin/openapi.yaml`), as Firecracker's and Cloud Hypervisor's API
//! sockets are. `twin status`, `pause`, `resume`, `snapshot`, `protect`, `failover` and
//! `events` are its clients ([`client`]); so is `curl --unix-socket`.
//!
//! The server ([`server`]) runs on a thread of its own (`control`, a single-threaded tokio
//! runtime with hyper and axum): the VM's data path never waits on it. Requests that need the
//! VM go to the process's main loop through [`Control`] ([`Control::try_recv`]); the main
//! loop answers each through its [`Reply`]. Events are served from the process's
//! [`EventLog`] without the main loop (a followed stream has a `control-events` thread).
//!
//! One process owns a socket path: [`serve`] refuses a path another live process serves
//! (it holds `<path>.lock`, or something answers on the socket) and replaces only a stale
//! socket (nothing listens: its process died). A directory or any other file at the path is
//! refused, never deleted.
//!
//! Local clients cannot cost the process its control or unbounded resources:
//! - the socket is mode 0600 from before it accepts anything, and a peer whose uid is
//!   neither root nor the server's (SO_PEERCRED) is refused (403) — both, so that a socket
//!   whose mode was widened afterwards is still not an open door;
//! - request heads are bounded (hyper's buffer, 431 beyond it) and so are bodies
//!   ([`Limits::max_body`], 413 beyond it, refused from the `Content-Length` without
//!   reading the body);
//! - at most [`MAX_CONNECTIONS`] connections are served at once; beyond that a connection
//!   gets a 503 at once and is closed, and a connection that sends no complete request head
//!   for [`IDLE_TIMEOUT`] is closed;
//! - when `accept` fails (out of file descriptors, say) the accept loop backs off, 10 ms
//!   doubling to 1 s, and logs once until it accepts again.
//!
//! A request the main loop does not take within [`ANSWER_TIMEOUT`] is answered `timeout`. A
//! long operation (a snapshot) is accepted first and then has no deadline: its client gets
//! its real outcome, and other requests meanwhile get `busy`, naming the operation and how
//! long it has run, at once.
//!
//! Dropping the [`Control`] handle stops the server: requests still waiting for the main
//! loop are answered `unavailable`, every connection is closed, the thread joined and the
//! socket removed (if it is still ours).

pub mod client;
pub mod server;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

pub use client::{events, request, EventStream};
use twin_api::EventLog;
pub use twin_api::{ApiError, ErrorCode, Request, Response};

/// Longest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection that sends no complete request head for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a request waits for the main loop to take it.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

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
    #[error("control socket {path}: the exchange failed")]
    Exchange {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path} answered something that is not a control API answer: {what}")]
    BadResponse { path: PathBuf, what: String },
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the control server's runtime")]
    Runtime(#[source] std::io::Error),
}

/// The bounds a server keeps (see the module docs); [`Limits::default`] is what `twin`
/// serves with, tests shrink them.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_body: usize,
    pub max_connections: usize,
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: MAX_BODY,
            max_connections: MAX_CONNECTIONS,
            idle: IDLE_TIMEOUT,
        }
    }
}

/// Where the main loop sends its answer to one request: [`Response::Accepted`] first for
/// a long operation, then the outcome.
#[derive(Clone, Debug)]
pub struct Reply(tokio::sync::mpsc::UnboundedSender<Response>);

impl Reply {
    /// A reply and the receiving end the server waits on.
    pub fn channel() -> (Reply, tokio::sync::mpsc::UnboundedReceiver<Response>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Reply(tx), rx)
    }

    /// Sends an answer; `Err` if the client's request is gone (it is dropped then).
    pub fn send(&self, r: Response) -> Result<(), Response> {
        self.0.send(r).map_err(|e| e.0)
    }
}

/// A request from a client and where to send its answer.
pub type Incoming = (Request, Reply);

/// A served control socket: requests arrive here; dropping it stops serving (see the
/// module docs).
pub struct Control {
    rx: Option<Receiver<Incoming>>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
    /// Device and inode of the socket we bound: removed on drop only if it is still ours.
    inode: (u64, u64),
    /// Held for the life of the server: what makes the path ours (see [`serve`]).
    _lock: Flock<File>,
    metrics: Arc<crate::metrics::Metrics>,
    server: server::Handle,
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

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The process's metrics (served at `/v1/metrics`, and by [`Control::serve_metrics`]).
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// Also serves the metrics over HTTP on `addr` (`GET /metrics`), until the server
    /// stops; an address that cannot be bound is an error now.
    pub fn serve_metrics(&self, addr: std::net::SocketAddr) -> Result<(), ControlError> {
        let err = |source| ControlError::Metrics { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(err)?;
        self.server.serve_metrics(listener).map_err(err)
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        // Requests still queued lose their replies: their connections answer at once.
        drop(self.rx.take());
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(t) = self.thread.take() {
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

/// Checks that `path` can be a control socket without touching it: not a directory, not
/// another kind of file. For argument checks before a VM is built.
pub fn check_path(path: &Path) -> Result<(), ControlError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(ControlError::IsDirectory {
            path: path.to_path_buf(),
        }),
        Ok(m) if !m.file_type().is_socket() => Err(ControlError::NotASocket {
            path: path.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

/// Listens on `path` with the default [`Limits`]; see [`serve_with`].
pub fn serve(path: &Path, events: Arc<EventLog>) -> Result<Control, ControlError> {
    serve_with(path, Limits::default(), events)
}

/// Listens on `path` and forwards requests to the returned [`Control`]; the main loop
/// answers them.
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
    check_path(path)?;
    let existing = match std::fs::symlink_metadata(path) {
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
    let metrics = crate::metrics::Metrics::new(events.clone());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (tx, rx) = std::sync::mpsc::channel();
    let (thread, server) = server::spawn(server::Config {
        listener,
        tx,
        events,
        metrics: metrics.clone(),
        limits,
        path: path.to_path_buf(),
        stop: stopped,
    })
    .map_err(ControlError::Runtime)?;
    Ok(Control {
        rx: Some(rx),
        stop: Some(stop),
        thread: Some(thread),
        path: path.to_path_buf(),
        inode,
        _lock: lock,
        metrics,
        server,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Instant;

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

    /// A server whose requests a thread answers, like a main loop would: Status at once, a
    /// snapshot after `slow` (accepted first), the rest refused.
    struct Answering {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<()>,
    }

    fn answer(control: Control, slow: Duration) -> Answering {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                if let Ok((req, reply)) = control.recv_timeout(Duration::from_millis(10)) {
                    let _ = reply.send(match req {
                        Request::Status => Response::Ok(serde_json::json!({"role": "test"})),
                        Request::Snapshot(r) => {
                            let _ = reply.send(Response::Accepted(serde_json::json!({})));
                            std::thread::sleep(slow);
                            Response::Ok(serde_json::json!({"dir": r.dir, "pages": 7}))
                        }
                        other => Response::error(ErrorCode::Conflict, format!("no {other:?}")),
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

    /// Everything the server sends on `c` until it closes (or `timeout`).
    fn read_all(c: &mut UnixStream, timeout: Duration) -> String {
        c.set_read_timeout(Some(timeout)).unwrap();
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn requests_round_trip_with_codes() {
        let path = sock_path("round-trip");
        let server = answer(serve(&path, EventLog::new()).unwrap(), Duration::ZERO);
        assert!(status_ok(&path));
        match request(&path, &Request::Failover).unwrap() {
            Response::Error(e) => assert_eq!(e.code, ErrorCode::Conflict, "{e}"),
            other => panic!("{other:?}"),
        }
        // Raw HTTP: a malformed body, an unknown path, a relative snapshot directory.
        let raw = |msg: &str| {
            let mut c = UnixStream::connect(&path).unwrap();
            c.write_all(msg.as_bytes()).unwrap();
            read_all(&mut c, Duration::from_secs(5))
        };
        let a = raw("PUT /v1/vm/snapshot HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 9\r\n\r\n{nonsense");
        assert!(
            a.starts_with("HTTP/1.1 400") && a.contains("\"bad_request\""),
            "{a}"
        );
        let a = raw("GET /v2/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        assert!(
            a.starts_with("HTTP/1.1 404") && a.contains("not_found"),
            "{a}"
        );
        let body = r#"{"dir": "snap1"}"#;
        let a = raw(&format!("PUT /v1/vm/snapshot HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}", body.len()));
        assert!(
            a.starts_with("HTTP/1.1 400") && a.contains("relative"),
            "{a}"
        );
        // Two requests on one keep-alive connection.
        let a = raw("GET /v1/status HTTP/1.1\r\nhost: x\r\n\r\nGET /v1/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        assert_eq!(a.matches("HTTP/1.1 200").count(), 2, "{a}");
        stop(server);
        assert!(!path.exists(), "a stopped server removes its socket");
        assert!(matches!(
            request(&path, &Request::Status),
            Err(ControlError::Connect { .. })
        ));
    }

    #[test]
    fn a_long_operation_gets_its_outcome_and_others_hear_busy() {
        let path = sock_path("long");
        let server = answer(
            serve(&path, EventLog::new()).unwrap(),
            Duration::from_millis(1500),
        );
        let p = path.clone();
        let snap = std::thread::spawn(move || {
            request(
                &p,
                &Request::Snapshot(twin_api::SnapshotRequest {
                    dir: "/tmp/x".into(),
                    incremental: false,
                    stop: false,
                }),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        match request(&path, &Request::Status).unwrap() {
            Response::Error(e) => {
                assert_eq!(e.code, ErrorCode::Busy, "{e}");
                assert!(e.message.contains("taking a snapshot"), "{e}");
            }
            other => panic!("status during a snapshot: {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_millis(500), "busy at once");
        match snap.join().unwrap().unwrap() {
            Response::Ok(v) => assert_eq!(v["pages"], 7),
            other => panic!("{other:?}"),
        }
        assert!(status_ok(&path), "not busy once it ended");
        stop(server);
    }

    #[test]
    fn a_live_socket_is_not_taken_and_a_stale_one_is_replaced() {
        let path = sock_path("in-use");
        let server = answer(serve(&path, EventLog::new()).unwrap(), Duration::ZERO);
        let e = serve(&path, EventLog::new())
            .err()
            .expect("a second server");
        assert!(matches!(e, ControlError::InUse { .. }), "{e}");
        assert!(status_ok(&path), "the first server still answers");
        stop(server);
        drop(UnixListener::bind(&path).unwrap());
        let server = answer(
            serve(&path, EventLog::new()).expect("a stale socket is replaced"),
            Duration::ZERO,
        );
        assert!(status_ok(&path));
        stop(server);
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
        let e = serve(&path, EventLog::new()).err().unwrap();
        assert!(matches!(e, ControlError::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let e = serve(&path, EventLog::new()).err().unwrap();
        assert!(e.to_string().contains("is a directory"), "{e}");
        assert!(path.is_dir());
    }

    #[test]
    fn the_socket_is_private_and_strangers_are_refused() {
        let path = sock_path("private");
        let server = answer(serve(&path, EventLog::new()).unwrap(), Duration::ZERO);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "mode {mode:o}");
        // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
        let as_nobody = |path: PathBuf| {
            std::thread::spawn(move || {
                // SAFETY: setresuid takes three integers; -1 keeps the real and saved uid
                // (root, so the thread could switch back), only the effective uid changes.
                let rc = unsafe { libc::syscall(libc::SYS_setresuid, -1i32, 65534i32, -1i32) };
                assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
                UnixStream::connect(&path).map(|mut c| read_all(&mut c, Duration::from_secs(5)))
            })
            .join()
            .unwrap()
        };
        let e = as_nobody(path.clone()).expect_err("mode 0600 keeps uid 65534 out");
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let a = as_nobody(path.clone()).expect("connects once the mode allows");
        assert!(
            a.starts_with("HTTP/1.1 403") && a.contains("uid 65534"),
            "{a}"
        );
        assert!(status_ok(&path), "root still may");
        stop(server);
    }

    #[test]
    fn bodies_and_heads_are_bounded() {
        let path = sock_path("bounds");
        let limits = Limits {
            max_body: 1024,
            ..Limits::default()
        };
        let server = answer(
            serve_with(&path, limits, EventLog::new()).unwrap(),
            Duration::ZERO,
        );
        // A declared body beyond the bound: refused before it is sent.
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(
            b"PUT /v1/vm/snapshot HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n",
        )
        .unwrap();
        let a = read_all(&mut c, Duration::from_secs(5));
        assert!(
            a.starts_with("HTTP/1.1 413") && a.contains("longer than 1024 bytes"),
            "{a}"
        );
        // A chunked body beyond it: refused once the bound is passed.
        let mut c = UnixStream::connect(&path).unwrap();
        let mut msg =
            b"PUT /v1/vm/snapshot HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                .to_vec();
        for _ in 0..4 {
            msg.extend_from_slice(b"400\r\n");
            msg.extend_from_slice(&[b' '; 1024]);
            msg.extend_from_slice(b"\r\n");
        }
        let _ = c.write_all(&msg);
        let a = read_all(&mut c, Duration::from_secs(5));
        assert!(a.starts_with("HTTP/1.1 413"), "{a}");
        // A head that never ends: refused (431) without buffering it all.
        let mut c = UnixStream::connect(&path).unwrap();
        let w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut w = w;
            let _ = w.write_all(b"GET /v1/status HTTP/1.1\r\nx-long: ");
            let chunk = vec![b'x'; 1 << 16];
            let mut sent = 0usize;
            for _ in 0..1600 {
                if w.write_all(&chunk).is_err() {
                    break;
                }
                sent += chunk.len();
            }
            sent
        });
        let a = read_all(&mut c, Duration::from_secs(10));
        let sent = writer.join().unwrap();
        assert!(a.starts_with("HTTP/1.1 431"), "{a:?}");
        assert!(sent < 100 << 20, "the whole 100 MiB head was read");
        assert!(status_ok(&path));
        stop(server);
    }

    #[test]
    fn connections_are_capped_and_idle_ones_closed() {
        let path = sock_path("cap");
        let limits = Limits {
            max_connections: 2,
            idle: Duration::from_millis(500),
            ..Limits::default()
        };
        let server = answer(
            serve_with(&path, limits, EventLog::new()).unwrap(),
            Duration::ZERO,
        );
        let t = Instant::now();
        let mut a = UnixStream::connect(&path).unwrap();
        let mut b = UnixStream::connect(&path).unwrap();
        // A slow client: a byte of its head every 50 ms; cut at the bound all the same.
        let mut slow = b.try_clone().unwrap();
        let dribble = std::thread::spawn(move || {
            let _ = slow.write_all(b"GET /v1/status HTTP/1.1\r\n");
            for _ in 0..40 {
                if slow.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        let mut third = UnixStream::connect(&path).unwrap();
        let t3 = Instant::now();
        let r = read_all(&mut third, Duration::from_secs(5));
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("too many control connections"),
            "{r}"
        );
        assert!(t3.elapsed() < Duration::from_millis(300), "refused at once");
        for (name, c) in [("idle", &mut a), ("slow", &mut b)] {
            let _ = read_all(c, Duration::from_secs(5));
            let after = t.elapsed();
            assert!(
                after >= Duration::from_millis(450) && after < Duration::from_millis(2000),
                "{name} closed after {after:?}, want about 500 ms"
            );
        }
        dribble.join().unwrap();
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
        let log = EventLog::new();
        let control = serve(&path, log.clone()).unwrap();
        // A request the main loop never answers, a followed stream, an idle connection.
        let p = path.clone();
        let waiting = std::thread::spawn(move || request(&p, &Request::Status));
        let mut stream = client::events(&path, 0, false, true).unwrap();
        let idle = UnixStream::connect(&path).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        drop(control);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "drop took {:?}",
            t.elapsed()
        );
        match waiting.join().unwrap() {
            Ok(Response::Error(e)) => assert_eq!(e.code, ErrorCode::Unavailable, "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(stream.next_event().unwrap().is_none(), "the stream ends");
        let mut idle = idle;
        let _ = read_all(&mut idle, Duration::from_secs(5));
        assert!(!path.exists());
    }

    #[test]
    fn events_stream_as_they_happen() {
        let path = sock_path("events");
        let log = EventLog::new();
        let server = answer(serve(&path, log.clone()).unwrap(), Duration::ZERO);
        log.emit(twin_api::EventKind::SyncComplete);
        let mut s = client::events(&path, 0, false, true).unwrap();
        assert_eq!(s.next_seq(), 2);
        assert_eq!(s.next_event().unwrap().unwrap().seq, 1);
        let l = log.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            l.emit(twin_api::EventKind::SyncComplete);
        });
        let e = s.next_event().unwrap().unwrap();
        assert_eq!(e.seq, 2);
        let all = client::events(&path, 0, false, false).unwrap();
        let mut all = all;
        let mut n = 0;
        while all.next_event().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 2, "without follow the stream ends after what is held");
        stop(server);
    }
}
