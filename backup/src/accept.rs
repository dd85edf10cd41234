//! Accepting primaries: the listening socket, the link handshake and the `Hello`, off the
//! session thread.
//!
//! Every connection gets a short-lived thread that runs the link handshake (authentication)
//! and reads the peer's first message, all within [`HANDSHAKE_DEADLINE`]. Only a peer that
//! authenticated and sent a `Hello` becomes a [`Candidate`] for the backup's loop, which
//! alone decides whether it gets a session: nothing a peer sends before its `Hello` counts
//! as a sign of life, can end a grace, or can touch the replica. A slow or silent peer holds
//! one handshake thread for at most the deadline, never the session slot; at most
//! [`MAX_HANDSHAKES`] run at once, and connections beyond that are closed at once.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use twin_api::{EventKind, EventLog};
use twin_link::{FrameReader, FrameWriter, LinkConfig, LinkError, RecvError};
use twin_wire::{handshake, DecodeError, Hello, Message};

/// Time a peer has from its TCP connection to a complete `Hello` (link handshake included).
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// Handshakes running at once; connections beyond are closed without reading.
pub const MAX_HANDSHAKES: usize = 16;

/// A peer that authenticated and said `Hello`.
pub struct Candidate {
    pub hello: Hello,
    pub reader: FrameReader,
    pub writer: Arc<FrameWriter>,
    pub authenticated: bool,
    pub encrypted: bool,
}

impl std::fmt::Debug for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Candidate")
            .field("peer", &self.reader.peer())
            .field("vm", &self.hello.vm_id)
            .field("generation", &self.hello.generation)
            .finish()
    }
}

/// The accepting thread; stopped and joined on drop.
pub struct Acceptor {
    pub rx: Receiver<Candidate>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    /// Accepts on `listener` (already bound) until dropped.
    pub fn start(
        listener: TcpListener,
        link: LinkConfig,
        events: Arc<EventLog>,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept_loop(&listener, &link, &tx, &s, &events))?;
        Ok(Acceptor {
            rx,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    link: &LinkConfig,
    tx: &Sender<Candidate>,
    stop: &AtomicBool,
    events: &Arc<EventLog>,
) {
    let running = Arc::new(AtomicUsize::new(0));
    let mut error_logged = false;
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, peer)) => {
                error_logged = false;
                if running.load(Ordering::Acquire) >= MAX_HANDSHAKES {
                    warn!(%peer, "{MAX_HANDSHAKES} handshakes already under way; connection closed");
                    continue;
                }
                running.fetch_add(1, Ordering::AcqRel);
                let (tx, link, running2) = (tx.clone(), link.clone(), running.clone());
                let events = events.clone();
                // Detached on purpose: each ends by its deadline, and the count above bounds
                // how many exist.
                let spawned =
                    std::thread::Builder::new()
                        .name("handshake".into())
                        .spawn(move || {
                            if let Some(c) = handshake(stream, &link, &events) {
                                let _ = tx.send(c);
                            }
                            running2.fetch_sub(1, Ordering::AcqRel);
                        });
                if let Err(e) = spawned {
                    running.fetch_sub(1, Ordering::AcqRel);
                    warn!(%peer, "cannot start a handshake thread: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                // EMFILE and the like: back off rather than spin, and say it once.
                if !error_logged {
                    warn!("accepting a primary failed: {e}");
                    error_logged = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The link handshake and the first message, within [`HANDSHAKE_DEADLINE`].
fn handshake(stream: TcpStream, cfg: &LinkConfig, events: &EventLog) -> Option<Candidate> {
    let t0 = Instant::now();
    let peer = stream.peer_addr().ok()?;
    let refused = |reason: String| {
        events.emit(EventKind::PeerRefused {
            peer: peer.to_string(),
            reason,
        });
    };
    if stream.set_nonblocking(false).is_err() {
        return None;
    }
    let link = match twin_link::accept(stream, cfg, HANDSHAKE_DEADLINE) {
        Ok(l) => l,
        Err(e) => {
            if log_refusal(&e) {
                refused(e.to_string());
            }
            return None;
        }
    };
    let (authenticated, encrypted) = (link.info.authenticated, link.info.encrypted);
    let writer = Arc::new(FrameWriter::new(link.writer));
    let mut reader = FrameReader::new(link.reader);
    let left = HANDSHAKE_DEADLINE.saturating_sub(t0.elapsed());
    match reader.recv(left) {
        Ok(Message::Hello(hello)) => Some(Candidate {
            hello,
            reader,
            writer,
            authenticated,
            encrypted,
        }),
        Ok(other) => {
            warn!(%peer, frame = ?other.frame_type(), "peer sent something before Hello; closed");
            refused(format!("sent {:?} before Hello", other.frame_type()));
            None
        }
        Err(RecvError::Decode(DecodeError::IncompatibleHello { protocol_version })) => {
            let refuse = handshake::refuse_incompatible(protocol_version);
            warn!(%peer, detail = %refuse.detail, "refusing primary");
            refused(refuse.detail.clone());
            let _ = writer.send(&Message::Refuse(refuse));
            None
        }
        Err(RecvError::Silent(_)) => {
            warn!(%peer, "no Hello within {HANDSHAKE_DEADLINE:?} of connecting; closed");
            refused(format!("no Hello within {HANDSHAKE_DEADLINE:?}"));
            None
        }
        Err(e) => {
            debug!(%peer, "connection ended before Hello: {e}");
            None
        }
    }
}

/// Logs a failed link handshake; whether it is worth an event (a port scan or a health
/// probe that connects and closes is not).
fn log_refusal(e: &LinkError) -> bool {
    match e {
        LinkError::Io { .. } | LinkError::NotTwin { .. } => {
            debug!("link handshake failed: {e}");
            false
        }
        _ => {
            warn!("refused a replication peer: {e}");
            true
        }
    }
}
