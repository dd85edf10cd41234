//! Backup side: keeps the replica, watches heartbeats, fails over.
//!
//! The backup listens for one primary at a time. A session: handshake, VM description,
//! initial sync straight into the replica memory (a memfd, the same kind the VMM runs
//! on), then epochs. An epoch is assembled apart from the replica and applied only when it
//! arrived whole and its checksum matched and its state decodes; then it is acknowledged.
//! A partial or corrupt epoch is dropped and never touches the replica.
//!
//! Failover: when the primary falls silent for `heartbeat_timeout` or its connection dies,
//! the backup builds a VM around the replica memory as it is (no copy: the replica *is*
//! the guest's RAM), restores the last committed state, opens its own TAP with the guest's
//! MAC, announces the guest (gratuitous ARP), and runs it. A corrupt stream or protocol
//! violation is not taken as a dead primary: the primary is alive and, having lost its
//! backup, may release output this replica does not have. The replica is detached (never
//! used for failover) and the primary's next session resynchronises it.

pub mod announce;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio_util::codec::Decoder;
use tracing::{debug, info, warn};
use twin_vmm::devices::serial::ConsoleOut;
use twin_vmm::memory::{Memory, PAGE_SIZE};
use twin_vmm::{HostResources, MachineState, Vmm, VmmError};
use twin_wire::{
    handshake::{self, AcceptPolicy},
    Ack, CompleteEpoch, EpochAssembler, EpochMessage, FrameCodec, Geometry, Goodbye, Heartbeat,
    Message, SyncTracker, VmId,
};

/// How the backup runs.
pub struct BackupConfig {
    pub listen: SocketAddr,
    /// TAP the VM gets after failover.
    pub tap: String,
    pub heartbeat_timeout: Duration,
    pub heartbeat_interval: Duration,
}

/// A control request the backup loop serves.
pub enum BackupRequest {
    Status(Box<dyn FnOnce(serde_json::Value) + Send>),
    /// Planned switchover: tell the primary to stand down, then take over.
    Failover(FailoverReply),
}

/// Where the outcome of a requested failover goes.
pub type FailoverReply = Box<dyn FnOnce(Result<serde_json::Value, String>) + Send>;

/// Errors that stop the backup for good.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot open the takeover TAP")]
    Tap(#[source] twin_vmm::devices::tap::TapError),
    #[error("cannot listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error("failover failed while restoring the VM")]
    Restore(#[source] VmmError),
    #[error("failover failed while starting the VM")]
    Start(#[source] VmmError),
    #[error("stopped before any failover")]
    Stopped,
}

/// Why one session with a primary ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("primary silent for {0:?}")]
    Silent(Duration),
    #[error("primary connection closed")]
    Closed,
    #[error("primary connection failed")]
    Io(#[from] std::io::Error),
    #[error("corrupt replication stream")]
    Corrupt(#[from] twin_wire::DecodeError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("cannot zero replica pages")]
    Replica(#[source] std::io::Error),
    #[error("primary said goodbye: {0}")]
    Goodbye(String),
    #[error("primary refused by the handshake: {0}")]
    Refused(String),
    #[error("takeover requested")]
    Takeover,
    #[error("stopping")]
    Stopping,
}

impl SessionEnd {
    /// Whether this end means the primary is presumed dead (take over now).
    fn primary_dead(&self) -> bool {
        matches!(
            self,
            SessionEnd::Silent(_) | SessionEnd::Closed | SessionEnd::Io(_)
        )
    }
}

/// The replica: guest memory plus the last committed state.
struct Replica {
    memory: Memory,
    vm_id: VmId,
    generation: u64,
    committed: Option<(u64, MachineState)>,
    mac: [u8; 6],
}

/// Counters shown by `twin status`.
#[derive(Default)]
struct Stats {
    sessions: u64,
    epochs_applied: u64,
    epochs_rejected: u64,
    last_apply_us: f64,
    apply_us_max: f64,
    bytes_received: u64,
    last_error: Option<String>,
    state: &'static str,
}

/// What the backup did.
pub enum Outcome {
    /// It took over: the VM runs here now.
    FailedOver { vmm: Vmm, report: serde_json::Value },
}

/// A framed connection.
struct Conn {
    stream: TcpStream,
    codec: FrameCodec,
    rbuf: BytesMut,
    wbuf: BytesMut,
    last_rx: Instant,
    tx: Arc<Sender>,
}

/// The sending half of a session, shared by the session loop (acks, goodbyes) and the
/// heartbeat thread; the lock keeps frames whole.
struct Sender {
    stream: TcpStream,
    /// When a frame last went out.
    last_tx: Mutex<Instant>,
    /// Last committed epoch, reported in heartbeats.
    committed: AtomicU64,
    done: AtomicBool,
    /// When the heartbeat thread last ran, and the end and length of the last gap in its
    /// running long enough for the primary to have given up on this backup.
    last_wake: Mutex<Instant>,
    last_stall: Mutex<Option<(Instant, Duration)>>,
}

impl Sender {
    /// A stall of this process that may explain a lost connection: the heartbeat thread
    /// has not run for [`SELF_STALL`] (it is stalled now), or it was stalled that long
    /// within the last [`STALL_MEMORY`].
    fn recent_stall(&self) -> Option<Duration> {
        let now_gap = self
            .last_wake
            .lock()
            .map(|w| w.elapsed())
            .unwrap_or_default();
        if now_gap >= SELF_STALL {
            return Some(now_gap);
        }
        let last = *self.last_stall.lock().ok()?;
        last.filter(|(end, _)| end.elapsed() < STALL_MEMORY)
            .map(|(_, len)| len)
    }

    fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut last = self.last_tx.lock().expect("send lock poisoned");
        (&self.stream).write_all(bytes)?;
        *last = Instant::now();
        Ok(())
    }
}

/// Sends a heartbeat whenever nothing else went out for `interval`. A thread of its own
/// so that the primary hears from a backup busy applying a large sync or epoch: a backup
/// the primary thinks silent is abandoned, and a goodbye stuck behind a full socket
/// buffer would then reach it as a bare EOF, the mark of a dead primary.
fn send_heartbeats(tx: &Sender, interval: Duration) {
    twin_vmm::realtime::elevate_or_warn("backup heartbeat");
    let codec = FrameCodec::new();
    let mut seq = 0u64;
    let mut buf = BytesMut::new();
    while !tx.done.load(Ordering::Acquire) {
        std::thread::park_timeout(interval / 4);
        if tx.done.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut wake) = tx.last_wake.lock() {
            let gap = wake.elapsed();
            *wake = Instant::now();
            if gap >= SELF_STALL {
                if let Ok(mut stall) = tx.last_stall.lock() {
                    *stall = Some((Instant::now(), gap));
                }
            }
        }
        let idle = tx.last_tx.lock().map(|l| l.elapsed()).unwrap_or_default();
        if idle < interval {
            continue;
        }
        seq += 1;
        buf.clear();
        let beat = Message::Heartbeat(Heartbeat {
            seq,
            sent_at_ns: 0,
            last_epoch: tx.committed.load(Ordering::Acquire),
        });
        if codec.encode_message(&beat, &mut buf).is_err() || tx.write(&buf).is_err() {
            return;
        }
    }
}

/// Stops and joins the heartbeat thread when a session ends, however it ends.
struct HeartbeatGuard {
    tx: Arc<Sender>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for HeartbeatGuard {
    fn drop(&mut self) {
        self.tx.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Conn {
    fn send(&mut self, msg: &Message) -> std::io::Result<()> {
        self.wbuf.clear();
        self.codec
            .encode_message(msg, &mut self.wbuf)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        self.tx.write(&self.wbuf)
    }

    /// The next message if one arrives within `wait`; `Ok(None)` on a quiet `wait`.
    fn poll(&mut self, wait: Duration, stats: &mut Stats) -> Result<Option<Message>, SessionEnd> {
        // A message waiting in the buffer is as good a sign of life as fresh bytes: time
        // spent applying a backlog is not the primary's silence.
        if let Some(m) = self.codec.decode(&mut self.rbuf)? {
            self.last_rx = Instant::now();
            return Ok(Some(m));
        }
        self.stream
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        let mut chunk = vec![0u8; 256 << 10];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(SessionEnd::Closed),
            Ok(n) => {
                self.last_rx = Instant::now();
                stats.bytes_received += n as u64;
                self.rbuf.extend_from_slice(&chunk[..n]);
                Ok(self.codec.decode(&mut self.rbuf)?)
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut
                    || e.kind() == std::io::ErrorKind::Interrupted =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The backup: listens, replicates, and fails over when the primary dies.
pub struct Backup {
    cfg: BackupConfig,
    replica: Option<Replica>,
    stats: Stats,
    min_generation: u64,
    /// Identity from the current session's Hello, for the replica its description builds.
    pending_identity: Option<(VmId, u64)>,
    /// Set when the last session ended within [`STALL_MEMORY`] of a stall of this process.
    stalled: Option<Duration>,
    /// The takeover TAP, held open from start-up: a TAP gets carrier when opened, and a
    /// bridge forwards on the port only after the kernel's link watch (up to a second)
    /// has noticed — opened at takeover, the first announcements would be dropped.
    tap: Option<twin_vmm::devices::tap::Tap>,
}

impl Backup {
    pub fn new(cfg: BackupConfig) -> Self {
        Backup {
            cfg,
            replica: None,
            stats: Stats {
                state: "waiting",
                ..Default::default()
            },
            min_generation: 0,
            pending_identity: None,
            stalled: None,
            tap: None,
        }
    }

    fn status(&self) -> serde_json::Value {
        let committed = self
            .replica
            .as_ref()
            .and_then(|r| r.committed.as_ref().map(|(e, _)| *e));
        serde_json::json!({
            "role": "backup",
            "state": self.stats.state,
            "listen": self.cfg.listen.to_string(),
            "sessions": self.stats.sessions,
            "committed_epoch": committed,
            "epochs_applied": self.stats.epochs_applied,
            "epochs_rejected": self.stats.epochs_rejected,
            "last_apply_us": self.stats.last_apply_us,
            "apply_us_max": self.stats.apply_us_max,
            "bytes_received": self.stats.bytes_received,
            "mem_size": self.replica.as_ref().map(|r| r.memory.size()),
            "last_error": self.stats.last_error,
        })
    }

    /// Serves primaries until it takes over (returns the running VM) or `stop` fires.
    pub fn run(
        mut self,
        control: &Receiver<BackupRequest>,
        stop: &AtomicBool,
        console: impl FnOnce() -> ConsoleOut,
    ) -> Result<Outcome, BackupError> {
        self.tap =
            Some(twin_vmm::devices::tap::Tap::open(&self.cfg.tap).map_err(BackupError::Tap)?);
        twin_vmm::realtime::elevate_or_warn("backup");
        let listener = TcpListener::bind(self.cfg.listen)
            .map_err(|e| BackupError::Listen(self.cfg.listen, e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| BackupError::Listen(self.cfg.listen, e))?;
        info!(listen = %self.cfg.listen, "backup waiting for a primary");
        let mut takeover_after: Option<Instant> = None;
        let mut takeover_reply: Option<FailoverReply> = None;
        loop {
            if stop.load(Ordering::Acquire) {
                return Err(BackupError::Stopped);
            }
            if takeover_after.is_some_and(|t| Instant::now() >= t) {
                let detected = takeover_after.take().expect("checked");
                match self.failover(detected, console) {
                    Ok((vmm, report)) => {
                        if let Some(reply) = takeover_reply.take() {
                            reply(Ok(report.clone()));
                        }
                        return Ok(Outcome::FailedOver { vmm, report });
                    }
                    Err(e) => {
                        if let Some(reply) = takeover_reply.take() {
                            reply(Err(format!("{e}")));
                        }
                        return Err(e);
                    }
                }
            }
            while let Ok(req) = control.try_recv() {
                match req {
                    BackupRequest::Status(reply) => reply(self.status()),
                    BackupRequest::Failover(reply) => {
                        if self.has_committed() {
                            takeover_after = Some(Instant::now());
                            takeover_reply = Some(reply);
                        } else {
                            reply(Err("no committed checkpoint to take over from".into()));
                        }
                    }
                }
            }
            if takeover_after.is_some() && takeover_reply.is_some() {
                continue;
            }
            match listener.accept() {
                Ok((stream, peer)) => {
                    takeover_after = None;
                    self.stats.sessions += 1;
                    info!(%peer, "primary connected");
                    let end = self.session(stream, control, stop, &mut takeover_reply);
                    self.stats.state = if self.has_committed() {
                        "orphaned"
                    } else {
                        "waiting"
                    };
                    let end_msg = format!("{end}");
                    match &end {
                        SessionEnd::Goodbye(reason)
                            if reason == HANDOVER && self.has_committed() =>
                        {
                            warn!("the primary cannot go on and hands the VM over; taking over");
                            takeover_after = Some(Instant::now());
                        }
                        SessionEnd::Goodbye(_) => {
                            info!("{end_msg}; no takeover");
                            // A primary that stopped on purpose keeps no replica alive.
                            self.replica = None;
                        }
                        SessionEnd::Takeover => takeover_after = Some(Instant::now()),
                        SessionEnd::Stopping => return Err(BackupError::Stopped),
                        e if e.primary_dead() && self.has_committed() => {
                            if let Some(stall) = self.stalled.take() {
                                // The primary abandons a backup it has not heard from, and
                                // its goodbye can be stuck behind a full socket buffer: a
                                // bare EOF after our own stall does not prove it dead. A
                                // live primary reconnects within a second; a dead one
                                // costs this grace.
                                warn!(
                                    stall_ms = stall.as_millis() as u64,
                                    grace_ms = STALL_GRACE.as_millis() as u64,
                                    "{end_msg} right after this backup was stalled; waiting for the primary to reconnect before any takeover"
                                );
                                takeover_after = Some(Instant::now() + STALL_GRACE);
                            } else {
                                warn!("{end_msg}: primary presumed dead, taking over");
                                takeover_after = Some(Instant::now());
                            }
                        }
                        _ if self.has_committed() => {
                            // The primary is alive (it sent us something bad) and, once it
                            // notices, may release output unprotected: this replica can no
                            // longer stand for what the world has seen. Detach; the primary
                            // reconnects and resynchronises.
                            warn!(
                                "{end_msg}: {}; replica detached (no takeover), waiting for the primary to resynchronise",
                                twin_vmm::error_chain(&end)
                            );
                            if let Some(r) = self.replica.as_mut() {
                                r.committed = None;
                            }
                            self.stats.state = "detached";
                        }
                        _ => warn!(
                            "{end_msg}: {}; no committed checkpoint, waiting for a primary",
                            twin_vmm::error_chain(&end)
                        ),
                    }
                    self.stats.last_error = Some(end_msg);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => warn!("accepting a primary failed: {e}"),
            }
        }
    }

    fn has_committed(&self) -> bool {
        self.replica.as_ref().is_some_and(|r| r.committed.is_some())
    }

    fn session(
        &mut self,
        stream: TcpStream,
        control: &Receiver<BackupRequest>,
        stop: &AtomicBool,
        takeover_reply: &mut Option<FailoverReply>,
    ) -> SessionEnd {
        if let Err(e) = stream
            .set_nonblocking(false)
            .and_then(|_| stream.set_nodelay(true))
        {
            return e.into();
        }
        let tx = match stream.try_clone() {
            Ok(w) => Arc::new(Sender {
                stream: w,
                last_tx: Mutex::new(Instant::now()),
                committed: AtomicU64::new(0),
                done: AtomicBool::new(false),
                last_wake: Mutex::new(Instant::now()),
                last_stall: Mutex::new(None),
            }),
            Err(e) => return e.into(),
        };
        let mut conn = Conn {
            stream,
            codec: FrameCodec::new(),
            rbuf: BytesMut::with_capacity(1 << 20),
            wbuf: BytesMut::new(),
            last_rx: Instant::now(),
            tx: tx.clone(),
        };
        let mut heartbeats = HeartbeatGuard { tx, thread: None };
        let end = self.serve(&mut conn, &mut heartbeats, control, stop, takeover_reply);
        self.stalled = if heartbeats.thread.is_some() {
            heartbeats.tx.recent_stall()
        } else {
            None
        };
        end
    }

    /// The body of [`Backup::session`]: handshake, sync and epochs until the session ends.
    fn serve(
        &mut self,
        conn: &mut Conn,
        heartbeats: &mut HeartbeatGuard,
        control: &Receiver<BackupRequest>,
        stop: &AtomicBool,
        takeover_reply: &mut Option<FailoverReply>,
    ) -> SessionEnd {
        let timeout = self.cfg.heartbeat_timeout;
        let hb = self.cfg.heartbeat_interval;
        let mut sync: Option<SyncTracker> = None;
        let mut assembler: Option<EpochAssembler> = None;
        let mut hello_done = false;
        let mut described = false;
        loop {
            if stop.load(Ordering::Acquire) {
                return SessionEnd::Stopping;
            }
            while let Ok(req) = control.try_recv() {
                match req {
                    BackupRequest::Status(reply) => reply(self.status()),
                    BackupRequest::Failover(reply) => {
                        if self.has_committed() {
                            // The primary must stand down before we run its VM.
                            let _ = conn.send(&Message::Goodbye(Goodbye {
                                reason: TAKEOVER.into(),
                            }));
                            *takeover_reply = Some(reply);
                            return SessionEnd::Takeover;
                        }
                        reply(Err("no committed checkpoint to take over from".into()));
                    }
                }
            }
            let now = Instant::now();
            let wait = hb.min(timeout.saturating_sub(now.duration_since(conn.last_rx)));
            let wait = if wait.is_zero() { hb } else { wait };
            let msg = match conn.poll(wait, &mut self.stats) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    // Until the first commit nothing can be taken over, and the primary may
                    // be quiet for a while (enabling dirty logging, scanning RAM, a first
                    // large epoch).
                    let limit = if self.has_committed() {
                        timeout
                    } else {
                        timeout.max(SYNC_SILENCE_LIMIT)
                    };
                    if conn.last_rx.elapsed() > limit {
                        if self.has_committed() {
                            // Silence is not proof of death: a primary that was only stalled
                            // finds this when it runs again and stands down (fences its
                            // output) instead of running on beside the VM taken over here.
                            let _ = conn.send(&Message::Goodbye(Goodbye {
                                reason: TAKEOVER.into(),
                            }));
                        }
                        return SessionEnd::Silent(limit);
                    }
                    continue;
                }
                Err(e) => return e,
            };
            match msg {
                Message::Hello(h) if !hello_done => {
                    let policy = AcceptPolicy {
                        vm_id: None,
                        min_generation: self.min_generation,
                    };
                    match handshake::accept_hello(&policy, &h) {
                        Ok(ack) => {
                            if let Err(e) = conn.send(&Message::HelloAck(ack)) {
                                return e.into();
                            }
                            hello_done = true;
                            if heartbeats.thread.is_none() {
                                let tx = heartbeats.tx.clone();
                                let spawned = std::thread::Builder::new()
                                    .name("backup-heartbeat".into())
                                    .spawn(move || send_heartbeats(&tx, hb));
                                match spawned {
                                    Ok(t) => heartbeats.thread = Some(t),
                                    Err(e) => return e.into(),
                                }
                            }
                            info!(generation = h.generation, version = %h.software_version, "primary accepted");
                            self.stats.state = "handshake";
                            // Replica is (re)built on VmDescription; remember who it is for.
                            self.pending_identity = Some((h.vm_id, h.generation));
                        }
                        Err(refuse) => {
                            let reason = format!("{refuse:?}");
                            let _ = conn.send(&Message::Refuse(refuse));
                            return SessionEnd::Refused(reason);
                        }
                    }
                }
                Message::VmDescription(d) if hello_done && !described => {
                    let geometry = match Geometry::new(d.mem_size, d.page_size) {
                        Ok(g) if d.page_size as usize == PAGE_SIZE => g,
                        Ok(_) => {
                            return SessionEnd::Protocol(format!(
                                "page size {} is not {PAGE_SIZE}",
                                d.page_size
                            ))
                        }
                        Err(e) => return SessionEnd::Protocol(format!("bad VM description: {e}")),
                    };
                    let memory = match Memory::new(d.mem_size) {
                        Ok(m) => m,
                        Err(e) => {
                            return SessionEnd::Protocol(format!(
                                "cannot hold a replica of {} bytes: {e}",
                                d.mem_size
                            ))
                        }
                    };
                    let (vm_id, generation) =
                        self.pending_identity.take().unwrap_or((VmId([0; 16]), 0));
                    // A new session always resynchronises; the old replica is superseded.
                    self.replica = Some(Replica {
                        memory,
                        vm_id,
                        generation,
                        committed: None,
                        mac: d.mac,
                    });
                    self.min_generation = generation;
                    sync = Some(SyncTracker::new(geometry));
                    assembler = None;
                    described = true;
                    self.stats.state = "syncing";
                    info!(
                        mem = d.mem_size,
                        vcpus = d.vcpus,
                        "replica allocated, initial sync"
                    );
                }
                Message::SyncPages(p) if described => {
                    let (Some(tracker), Some(r)) = (sync.as_mut(), self.replica.as_ref()) else {
                        return SessionEnd::Protocol("sync pages outside a sync".into());
                    };
                    if let Err(e) = tracker.pages(&p) {
                        return SessionEnd::Protocol(format!("{e}"));
                    }
                    for page in &p.pages {
                        if !r.memory.write_page(page.index, &page.data) {
                            return SessionEnd::Protocol(format!(
                                "sync page {} out of range",
                                page.index
                            ));
                        }
                    }
                }
                Message::SyncZeroPages(z) if described => {
                    let (Some(tracker), Some(r)) = (sync.as_mut(), self.replica.as_ref()) else {
                        return SessionEnd::Protocol("zero pages outside a sync".into());
                    };
                    if let Err(e) = tracker.zero_pages(&z) {
                        return SessionEnd::Protocol(format!("{e}"));
                    }
                    match r.memory.zero_pages(&z.indices) {
                        Ok(true) => {}
                        Ok(false) => {
                            return SessionEnd::Protocol("zero page index out of range".into())
                        }
                        Err(e) => return SessionEnd::Replica(e),
                    }
                }
                Message::SyncDone(done) if described => {
                    let Some(tracker) = sync.as_mut() else {
                        return SessionEnd::Protocol("sync done outside a sync".into());
                    };
                    if let Err(e) = tracker.done(&done) {
                        return SessionEnd::Protocol(format!("{e}"));
                    }
                    self.stats.state = "synced";
                    info!(entries = done.pages_sent, "initial sync complete");
                }
                Message::Heartbeat(_) => {}
                Message::Goodbye(g) => return SessionEnd::Goodbye(g.reason),
                other => {
                    let Ok(em) = EpochMessage::try_from(other) else {
                        return SessionEnd::Protocol("unexpected message".into());
                    };
                    if !sync.as_ref().is_some_and(|t| t.is_done()) {
                        return SessionEnd::Protocol(
                            "epoch before the initial sync completed".into(),
                        );
                    }
                    let r = self.replica.as_ref().expect("described");
                    let asm = assembler.get_or_insert_with(|| {
                        let g = Geometry::new(r.memory.size(), PAGE_SIZE as u32)
                            .expect("checked at description");
                        EpochAssembler::new(g, em.epoch())
                    });
                    if matches!(em, EpochMessage::Begin(_)) {
                        twin_failpoints::hit("backup.mid_receive");
                    }
                    match asm.push(em) {
                        Ok(None) => {}
                        Ok(Some(complete)) => {
                            if let Err(e) = self.apply(complete, conn) {
                                return e;
                            }
                        }
                        Err(e) => {
                            // The partial epoch is gone; the replica is untouched.
                            self.stats.epochs_rejected += 1;
                            return SessionEnd::Protocol(format!("rejected epoch: {e}"));
                        }
                    }
                }
            }
        }
    }

    /// Applies a whole, verified epoch to the replica and acknowledges it.
    fn apply(&mut self, epoch: CompleteEpoch, conn: &mut Conn) -> Result<(), SessionEnd> {
        let t0 = Instant::now();
        // Decode and check the state before touching memory: a state that does not decode
        // must not leave the replica with new pages and old state.
        let state = MachineState::decode(&epoch.state).map_err(|e| {
            self.stats.epochs_rejected += 1;
            SessionEnd::Protocol(format!("epoch {} state does not decode: {e}", epoch.epoch))
        })?;
        let r = self.replica.as_mut().expect("described");
        if state.config.mem_size != r.memory.size() {
            self.stats.epochs_rejected += 1;
            return Err(SessionEnd::Protocol(format!(
                "epoch {} state is for {} bytes of RAM, the replica has {}",
                epoch.epoch,
                state.config.mem_size,
                r.memory.size()
            )));
        }
        let half = epoch.pages.len() / 2;
        for (i, page) in epoch.pages.iter().enumerate() {
            if i == half {
                twin_failpoints::hit("backup.mid_apply");
            }
            // Indices were range-checked by the assembler.
            r.memory.write_page(page.index, &page.data);
        }
        r.committed = Some((epoch.epoch, state));
        conn.tx.committed.store(epoch.epoch, Ordering::Release);
        let us = t0.elapsed().as_secs_f64() * 1e6;
        self.stats.epochs_applied += 1;
        self.stats.last_apply_us = us;
        self.stats.apply_us_max = self.stats.apply_us_max.max(us);
        self.stats.state = "replicating";
        debug!(
            epoch = epoch.epoch,
            pages = epoch.pages.len(),
            apply_us = us as u64,
            "epoch committed"
        );
        if twin_failpoints::hit("backup.before_ack") {
            // Withheld: the primary keeps this epoch's output held.
            return Ok(());
        }
        conn.send(&Message::Ack(Ack { epoch: epoch.epoch }))?;
        Ok(())
    }

    /// Runs the VM from the replica. `detected` is when the primary was declared lost.
    fn failover(
        &mut self,
        detected: Instant,
        console: impl FnOnce() -> ConsoleOut,
    ) -> Result<(Vmm, serde_json::Value), BackupError> {
        let replica = self.replica.take().expect("failover needs a replica");
        let (epoch, state) = replica.committed.expect("failover needs a committed state");
        info!(epoch, vm = ?replica.vm_id, generation = replica.generation, "failover: restoring the VM from the replica");
        let t_restore = Instant::now();
        let tap = self
            .tap
            .take()
            .expect("the backup holds its TAP until a takeover");
        // Frames that reached the standby TAP were meant for the old primary's guest.
        let stale = tap.drain();
        let host = HostResources {
            tap: Some(tap),
            console: console(),
        };
        // The replica memory becomes the VM's RAM as it is: nothing is copied or loaded.
        let mut vmm = Vmm::restore(&state, replica.memory, host).map_err(BackupError::Restore)?;
        twin_failpoints::hit("backup.restore");
        let restore_ms = t_restore.elapsed().as_secs_f64() * 1e3;
        let t_announce = Instant::now();
        let mac = state.config.mac.unwrap_or(replica.mac);
        if let Some(tap) = vmm.tap() {
            let frame = match state.config.ip {
                Some(ip) => announce::gratuitous_arp(mac, ip),
                None => announce::rarp(mac),
            };
            announce::announce(tap, frame, &self.cfg.tap);
        }
        let announce_ms = t_announce.elapsed().as_secs_f64() * 1e3;
        vmm.start().map_err(BackupError::Start)?;
        let total_ms = detected.elapsed().as_secs_f64() * 1e3;
        info!(
            epoch,
            restore_ms = format_args!("{restore_ms:.2}"),
            announce_ms = format_args!("{announce_ms:.2}"),
            total_ms = format_args!("{total_ms:.2}"),
            "failover complete: the VM runs on this host"
        );
        let report = serde_json::json!({
            "epoch": epoch,
            "restore_ms": restore_ms,
            "announce_ms": announce_ms,
            "stale_frames_dropped": stale,
            "detect_to_running_ms": total_ms,
        });
        Ok((vmm, report))
    }
}

/// A gap in the heartbeat thread's running this long may have made the primary give up on
/// this backup: it is half the primary's default `--backup-timeout` (500 ms).
const SELF_STALL: Duration = Duration::from_millis(250);

/// How long after a stall a lost connection is still put down to it.
const STALL_MEMORY: Duration = Duration::from_secs(1);

/// How long a backup that was stalled waits for the primary to reconnect before it takes
/// a bare EOF for a dead primary. A primary that abandoned its backup reconnects after
/// one second.
const STALL_GRACE: Duration = Duration::from_secs(3);

/// Silence tolerated before the first committed checkpoint.
const SYNC_SILENCE_LIMIT: Duration = Duration::from_secs(5);

/// Goodbye reason a backup sends to make the primary stand down for a planned takeover.
pub const TAKEOVER: &str = "takeover";

/// Goodbye reason with which a primary that cannot go on (its NIC died) asks for a
/// takeover; it has fenced its own output.
pub const HANDOVER: &str = "handover";
