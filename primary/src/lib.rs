//! Primary side: runs the protected VM and streams epoch checkpoints to the backup.
//!
//! One replication thread owns the connection to the backup. A session is: connect,
//! handshake, describe the VM, live initial sync (every page sent while the guest runs,
//! then rounds of the pages dirtied meanwhile), then the epoch loop. Every epoch it pauses
//! the vCPUs, seals the output buffer at that instant, captures state and dirty pages,
//! resumes the guest at once and only then encodes and sends the checkpoint: the guest
//! never waits for the network. A second thread reads the backup's acks (releasing the
//! epoch's held output) and heartbeats.
//!
//! Backpressure: the checkpoint is written with a blocking send, so a backup that falls
//! behind delays the next checkpoint instead of queueing them; dirty pages keep
//! accumulating in the dirty log, so the next epoch simply carries more (epochs merge).
//! Each epoch that starts late is counted as `stretched` in the status. Memory use is one
//! checkpoint in flight plus the bounded output buffer.
//!
//! When the backup is lost (I/O error, refusal, or silence for `backup_timeout`), the VM
//! keeps running and the loss policy decides the output: `Release` (default) releases every
//! held frame and runs unprotected, `Hold` keeps holding output until a backup returns. The
//! thread then reconnects every second; a backup that comes back gets a full resync and
//! the VM is protected again.

pub mod stats;

/// Goodbye reason with which a backup tells the primary to stand down for a planned
/// switchover (the backup's `TAKEOVER`).
pub const TAKEOVER_REASON: &str = "takeover";

/// Goodbye reason with which a primary that cannot go on asks the backup to take over now
/// (the backup's `HANDOVER`).
pub const HANDOVER_REASON: &str = "handover";

/// How long a primary waits before asking again a backup that refused its protocol version.
const VERSION_RETRY: Duration = Duration::from_secs(60);

/// Age of the oldest unacknowledged epoch beyond which the backup counts as lost: output
/// held that long is older than any client waits for.
const MAX_UNACKED_AGE: Duration = Duration::from_secs(5);

/// The NIC's transmit sink while protected: frames go into the output-commit buffer.
pub struct NetbufSink(pub twin_netbuf::FrameSink);

impl twin_vmm::devices::virtio::net::NetSink for NetbufSink {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        // Full-buffer drops are counted by the buffer; for the guest they look like a
        // congested link, which its TCP handles.
        self.0.push(frame);
        Ok(())
    }
}

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio_util::codec::Decoder;
use tracing::{debug, error, info, warn};
use twin_netbuf::{Mode as BufferMode, NetBuffer};
use twin_vmm::memory::PAGE_SIZE;
use twin_vmm::{bitmap_pages, Vmm, VmmError};
use twin_wire::{
    handshake, EpochBegin, EpochEncoder, FrameCodec, Goodbye, Heartbeat, Hello, Message, PageRef,
    Role, SyncDone, SyncPagesRef, SyncZeroPages, VmDescription, VmId, PROTOCOL_VERSION,
    SOFTWARE_VERSION,
};

use crate::stats::Samples;

/// What to do with held output when the backup is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossPolicy {
    /// Release held output and keep running unprotected (availability first).
    Release,
    /// Keep holding output until a backup returns (no unprotected output ever).
    Hold,
}

/// How the primary protects its VM.
#[derive(Clone, Debug)]
pub struct ProtectConfig {
    /// `HOST:PORT` of the backup.
    pub backup: String,
    /// Checkpoint interval: the longest an epoch lasts.
    pub interval: Duration,
    /// Eager output commit: when the guest has output held, checkpoint as soon as this long
    /// has passed since the previous checkpoint instead of waiting for the interval, so a
    /// reply waits ~1 ms instead of up to an interval. `None`: checkpoints on the timer only.
    pub eager_gap: Option<Duration>,
    pub on_backup_loss: LossPolicy,
    /// Silence from the backup longer than this means it is lost.
    pub backup_timeout: Duration,
    /// A heartbeat is sent when nothing else was sent for this long.
    pub heartbeat_interval: Duration,
    pub vm_id: VmId,
}

/// Where the primary is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Connecting,
    Syncing,
    Protected,
    /// The backup is lost and output flows unprotected.
    Unprotected,
    /// The backup is lost and output is held until one returns.
    HoldingOutput,
    /// The backup took over (planned switchover): this primary discarded its unacknowledged
    /// output and must stop its VM.
    Fenced,
    Stopped,
}

/// Errors of one replication session; each ends the session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot resolve backup address {0}")]
    Resolve(String, #[source] std::io::Error),
    #[error("cannot connect to the backup at {0}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("replication connection failed")]
    Io(#[from] std::io::Error),
    #[error("handshake with the backup failed")]
    Handshake(#[from] handshake::HandshakeError),
    #[error("encoding a replication frame failed")]
    Encode(#[from] twin_wire::EncodeError),
    #[error("encoding an epoch failed")]
    EncodeEpoch(#[from] twin_wire::EpochEncodeError),
    #[error("the backup sent a corrupt frame")]
    Decode(#[from] twin_wire::DecodeError),
    #[error("checkpoint failed")]
    Checkpoint(#[from] VmmError),
    #[error("encoding the machine state failed")]
    State(#[from] twin_vmm::container::ContainerError),
    #[error("the backup was silent for {0:?}")]
    Silent(Duration),
    #[error("the backup closed the connection")]
    Closed,
    #[error("the backup said goodbye: {0}")]
    Goodbye(String),
    #[error("the backup has not acknowledged epochs sent {0:?} ago")]
    TooFarBehind(Duration),
    #[error("the backup acknowledged epoch {epoch}, which was never sent")]
    BogusAck { epoch: u64 },
    #[error("unexpected {0} from the backup")]
    Unexpected(&'static str),
    #[error("stopping")]
    Stopping,
}

/// Status counters, shown by `twin status`.
struct Status {
    mode: Mode,
    sessions: u64,
    /// Last sealed (checkpointed) epoch.
    epoch: u64,
    acked: Option<u64>,
    checkpoints: u64,
    /// Checkpoints taken early because output was waiting (eager output commit).
    eager: u64,
    stretched: u64,
    pause_ns: Samples,
    stop_ns: Samples,
    state_ns: Samples,
    harvest_ns: Samples,
    copy_ns: Samples,
    epoch_bytes: Samples,
    dirty_pages: Samples,
    ack_ns: Samples,
    recent: VecDeque<Instant>,
    /// Send time of epochs awaiting their ack.
    in_flight: BTreeMap<u64, Instant>,
    last_sync: Option<serde_json::Value>,
    last_error: Option<String>,
    protected_since: Option<Instant>,
}

impl Status {
    fn new() -> Self {
        let s = || Samples::new(2048);
        Status {
            mode: Mode::Connecting,
            sessions: 0,
            epoch: 0,
            acked: None,
            checkpoints: 0,
            eager: 0,
            stretched: 0,
            pause_ns: s(),
            stop_ns: s(),
            state_ns: s(),
            harvest_ns: s(),
            copy_ns: s(),
            epoch_bytes: s(),
            dirty_pages: s(),
            ack_ns: s(),
            recent: VecDeque::new(),
            in_flight: BTreeMap::new(),
            last_sync: None,
            last_error: None,
            protected_since: None,
        }
    }
}

struct Shared {
    vmm: Arc<Vmm>,
    netbuf: NetBuffer,
    cfg: ProtectConfig,
    status: Mutex<Status>,
    stop: AtomicBool,
    /// Stopping because this primary cannot go on (its NIC died): the backup must take over.
    handover: AtomicBool,
}

impl Shared {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().expect("status lock poisoned")
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// The running replication of one VM.
pub struct Primary {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Primary {
    /// Starts protecting `vmm` (already running, its NIC's sink already `netbuf`).
    pub fn start(vmm: Arc<Vmm>, netbuf: NetBuffer, cfg: ProtectConfig) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            vmm,
            netbuf,
            cfg,
            status: Mutex::new(Status::new()),
            stop: AtomicBool::new(false),
            handover: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("replicate".into())
            .spawn(move || replicate(&s))?;
        Ok(Primary {
            shared,
            thread: Some(thread),
        })
    }

    /// Ends replication: says goodbye to the backup (so it does not take over) and joins.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Ends replication asking the backup to take over at once (this primary's VM cannot
    /// go on, e.g. its TAP is gone). The caller fences the output buffer first: output the
    /// backup has not acknowledged will be produced again there.
    pub fn hand_over(mut self) {
        self.shared.handover.store(true, Ordering::Release);
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn mode(&self) -> Mode {
        self.shared.status().mode
    }

    /// Status for `twin status`.
    pub fn status_json(&self) -> serde_json::Value {
        let st = self.shared.status();
        let nb = self.shared.netbuf.stats();
        let rate = match (st.recent.front(), st.recent.back()) {
            (Some(a), Some(b)) if st.recent.len() > 1 => {
                (st.recent.len() - 1) as f64 / b.duration_since(*a).as_secs_f64().max(1e-9)
            }
            _ => 0.0,
        };
        let us = |ns: u64| ns as f64 / 1e3;
        serde_json::json!({
            "role": "primary",
            "mode": st.mode,
            "backup": self.shared.cfg.backup,
            "interval_ms": self.shared.cfg.interval.as_secs_f64() * 1e3,
            "on_backup_loss": self.shared.cfg.on_backup_loss,
            "sessions": st.sessions,
            "epoch": st.epoch,
            "acked_epoch": st.acked,
            "backup_lag_epochs": st.acked.map(|a| st.epoch.saturating_sub(a)).unwrap_or(st.epoch),
            "checkpoints": st.checkpoints,
            "eager_checkpoints": st.eager,
            "eager_gap_ms": self.shared.cfg.eager_gap.map(|g| g.as_secs_f64() * 1e3),
            "checkpoint_rate_hz": rate,
            "stretched_epochs": st.stretched,
            "pause_us": {"median": us(st.pause_ns.median()), "p99": us(st.pause_ns.p99())},
            "pause_split_us_median": {
                "stop_vcpus": us(st.stop_ns.median()),
                "capture_state": us(st.state_ns.median()),
                "harvest_dirty": us(st.harvest_ns.median()),
                "copy_pages": us(st.copy_ns.median()),
            },
            "epoch_bytes": {"median": st.epoch_bytes.median(), "p99": st.epoch_bytes.p99()},
            "dirty_pages": {"median": st.dirty_pages.median(), "p99": st.dirty_pages.p99()},
            "ack_latency_us": {"median": us(st.ack_ns.median()), "p99": us(st.ack_ns.p99())},
            "held_output": {
                "frames": nb.held_frames,
                "bytes": nb.held_bytes,
                "mode": format!("{:?}", nb.mode),
                "released_frames": nb.released_frames,
                "dropped_frames": nb.dropped_overflow_frames,
                "release_latency_us": {
                    "median": nb.latency.p50.map(|d| d.as_secs_f64() * 1e6),
                    "p99": nb.latency.p99.map(|d| d.as_secs_f64() * 1e6),
                    "max": nb.latency.max.as_secs_f64() * 1e6,
                },
            },
            "last_sync": st.last_sync,
            "last_error": st.last_error,
            "protected_for_s": st.protected_since.map(|t| t.elapsed().as_secs_f64()),
        })
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A framed connection: the codec plus read and write buffers.
struct Conn {
    stream: TcpStream,
    codec: FrameCodec,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Conn {
    fn new(stream: TcpStream) -> Self {
        Conn {
            stream,
            codec: FrameCodec::new(),
            rbuf: BytesMut::with_capacity(64 << 10),
            wbuf: BytesMut::with_capacity(1 << 20),
        }
    }

    fn send(&mut self, msg: &Message) -> Result<(), SessionError> {
        self.codec.encode_message(msg, &mut self.wbuf)?;
        self.flush()
    }

    fn flush(&mut self) -> Result<(), SessionError> {
        self.stream.write_all(&self.wbuf)?;
        self.wbuf.clear();
        Ok(())
    }

    /// Next message, waiting at most `timeout` for it.
    fn recv(&mut self, timeout: Duration) -> Result<Message, SessionError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(msg) = self.codec.decode(&mut self.rbuf)? {
                return Ok(msg);
            }
            // Past the deadline, still look once: a process that was stalled (stopped,
            // starved) must read what arrived meanwhile before calling the peer silent.
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 64 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(SessionError::Closed),
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    if Instant::now() >= deadline {
                        return Err(SessionError::Silent(timeout));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The replication thread: sessions until stopped, applying the loss policy between them.
fn replicate(s: &Shared) {
    twin_vmm::realtime::elevate_or_warn("replicate");
    let mut generation = 0u64;
    let mut next_epoch = 1u64;
    while !s.stopping() {
        generation += 1;
        s.status().sessions += 1;
        let r = session(s, generation, &mut next_epoch);
        match r {
            Ok(()) | Err(SessionError::Stopping) => break,
            Err(SessionError::Goodbye(reason)) if reason == TAKEOVER_REASON => {
                // The backup runs the VM from its last committed checkpoint; output this
                // primary holds beyond it will be produced again there.
                let discarded = s.netbuf.fence();
                warn!(
                    discarded,
                    "the backup took over: this primary is fenced and stops its VM"
                );
                s.status().mode = Mode::Fenced;
                return;
            }
            Err(e) => {
                let msg = format!("{e}: {}", twin_vmm::error_chain(&e));
                let was = s.status().mode;
                s.status().last_error = Some(msg.clone());
                s.status().protected_since = None;
                match s.cfg.on_backup_loss {
                    LossPolicy::Release => {
                        let n = s.netbuf.release_all();
                        if was != Mode::Unprotected {
                            error!(released = n, "backup lost ({msg}); the VM runs UNPROTECTED until a backup returns");
                        }
                        s.status().mode = Mode::Unprotected;
                    }
                    LossPolicy::Hold => {
                        if was != Mode::HoldingOutput {
                            error!(
                                "backup lost ({msg}); holding all output until a backup returns"
                            );
                        }
                        s.status().mode = Mode::HoldingOutput;
                    }
                }
                // Reconnect after a pause that a stop request cuts short. A backup that
                // speaks another protocol version will not change its mind in a second
                // (PROTOCOL.md §7: do not retry a mismatch); try again much later, in case
                // it is upgraded meanwhile.
                let version_refused = matches!(
                    e,
                    SessionError::Handshake(handshake::HandshakeError::VersionMismatch { .. })
                        | SessionError::Handshake(handshake::HandshakeError::Refused {
                            reason: twin_wire::RefuseReason::VersionMismatch,
                            ..
                        })
                );
                let pause = if version_refused {
                    VERSION_RETRY
                } else {
                    Duration::from_secs(1)
                };
                let until = Instant::now() + pause;
                while Instant::now() < until && !s.stopping() {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
    s.status().mode = Mode::Stopped;
}

fn connect(s: &Shared) -> Result<TcpStream, SessionError> {
    let addrs: Vec<SocketAddr> = s
        .cfg
        .backup
        .to_socket_addrs()
        .map_err(|e| SessionError::Resolve(s.cfg.backup.clone(), e))?
        .collect();
    let addr = *addrs.first().ok_or_else(|| {
        SessionError::Resolve(
            s.cfg.backup.clone(),
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        )
    })?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| SessionError::Connect(addr, e))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn session(s: &Shared, generation: u64, next_epoch: &mut u64) -> Result<(), SessionError> {
    if s.stopping() {
        return Err(SessionError::Stopping);
    }
    let mut conn = Conn::new(connect(s)?);
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        software_version: SOFTWARE_VERSION.to_string(),
        role: Role::Primary,
        vm_id: s.cfg.vm_id,
        generation,
    };
    conn.send(&Message::Hello(hello.clone()))?;
    let reply = conn.recv(Duration::from_secs(5))?;
    let ack = handshake::check_hello_reply(&hello, reply)?;
    info!(backup = %s.cfg.backup, backup_version = %ack.software_version, generation, "connected to backup");

    let vmm = &s.vmm;
    let cfg = vmm.config();
    conn.send(&Message::VmDescription(VmDescription {
        mem_size: cfg.mem_size,
        page_size: PAGE_SIZE as u32,
        vcpus: cfg.vcpus as u32,
        mac: cfg.mac.unwrap_or_default(),
        config: Vec::new(),
    }))?;
    s.status().mode = Mode::Syncing;
    initial_sync(s, &mut conn)?;
    // Output from now on belongs to the first epoch this backup will hold.
    if s.netbuf.mode() != BufferMode::Protected {
        s.netbuf.protect(*next_epoch);
    }
    epoch_loop(s, conn, next_epoch)
}

/// Live initial sync: every page while the guest runs, then rounds of what it dirtied.
fn initial_sync(s: &Shared, conn: &mut Conn) -> Result<(), SessionError> {
    const BATCH: usize = 256;
    const ROUNDS: usize = 8;
    const SMALL_ENOUGH: usize = 512;
    let t0 = Instant::now();
    let vmm = &s.vmm;
    // Tracking starts before the first read, so a page written while (or after) it is
    // read is resent by a later round or by the first checkpoint.
    vmm.start_dirty_tracking()?;
    let ram = vmm.memory().as_slice();
    let pages = ram.len() / PAGE_SIZE;
    let mut sent = 0u64;
    let mut zero = Vec::new();
    let mut batch: Vec<PageRef<'_>> = Vec::with_capacity(BATCH);
    let mut progress = SyncProgress::new(pages);
    for p in 0..pages {
        progress.at(p);
        let data = &ram[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
        if data.iter().all(|&b| b == 0) {
            zero.push(p as u64);
            continue;
        }
        batch.push(PageRef {
            index: p as u64,
            data,
        });
        if batch.len() == BATCH {
            send_sync_batch(conn, &mut batch, &mut sent)?;
            twin_failpoints::hit("primary.sync");
            if s.stopping() {
                return Err(SessionError::Stopping);
            }
        }
    }
    send_sync_batch(conn, &mut batch, &mut sent)?;
    let full_pages = sent;
    for chunk in zero.chunks(65536) {
        conn.send(&Message::SyncZeroPages(SyncZeroPages {
            indices: chunk.to_vec(),
        }))?;
        sent += chunk.len() as u64;
    }
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let dirty = vmm.harvest_dirty()?;
        let n = dirty.iter().map(|w| w.count_ones() as usize).sum::<usize>();
        rounds.push(n);
        for p in bitmap_pages(&dirty) {
            batch.push(PageRef {
                index: p as u64,
                data: &ram[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
            });
            if batch.len() == BATCH {
                send_sync_batch(conn, &mut batch, &mut sent)?;
            }
        }
        send_sync_batch(conn, &mut batch, &mut sent)?;
        if n <= SMALL_ENOUGH {
            break;
        }
    }
    progress.done();
    conn.send(&Message::SyncDone(SyncDone { pages_sent: sent }))?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    info!(
        pages = full_pages,
        zero_pages = zero.len(),
        dirty_rounds = ?rounds,
        ms = format_args!("{ms:.1}"),
        "initial sync sent"
    );
    s.status().last_sync = Some(serde_json::json!({
        "pages": full_pages, "zero_pages": zero.len(), "dirty_rounds": rounds, "ms": ms,
    }));
    Ok(())
}

/// A one-line progress bar for the initial sync, drawn only when stderr is a terminal.
struct SyncProgress {
    total: usize,
    shown: usize,
    tty: bool,
}

impl SyncProgress {
    fn new(total: usize) -> Self {
        use std::io::IsTerminal;
        SyncProgress {
            total: total.max(1),
            shown: usize::MAX,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn at(&mut self, page: usize) {
        let pct = page * 100 / self.total;
        if self.tty && pct != self.shown {
            self.shown = pct;
            let bar = "#".repeat(pct / 4);
            let mib = (page * PAGE_SIZE) >> 20;
            let total = (self.total * PAGE_SIZE) >> 20;
            eprint!("\rinitial sync [{bar:<25}] {pct:3}% {mib}/{total} MiB");
        }
    }

    fn done(&mut self) {
        if self.tty {
            self.at(self.total);
            eprintln!();
        }
    }
}

fn send_sync_batch(
    conn: &mut Conn,
    batch: &mut Vec<PageRef<'_>>,
    sent: &mut u64,
) -> Result<(), SessionError> {
    if batch.is_empty() {
        return Ok(());
    }
    conn.codec.encode_sync_pages(
        SyncPagesRef {
            page_size: PAGE_SIZE as u32,
            pages: batch,
        },
        &mut conn.wbuf,
    )?;
    *sent += batch.len() as u64;
    batch.clear();
    conn.flush()
}

/// The sending side of a session, shared by the epoch loop, the heartbeat thread and the
/// ack reader: whole frames only, one writer at a time.
struct FrameWriter {
    stream: TcpStream,
    codec: FrameCodec,
    /// The write lock; holds the time of the last completed write.
    last_write: Mutex<Instant>,
}

impl FrameWriter {
    fn new(stream: TcpStream) -> Self {
        FrameWriter {
            stream,
            codec: FrameCodec::new(),
            last_write: Mutex::new(Instant::now()),
        }
    }

    /// Writes encoded frames. With `split`, half of them, then that failpoint, then the
    /// rest: a crash in the middle of an epoch.
    fn write(&self, bytes: &[u8], split: Option<&str>) -> Result<(), SessionError> {
        let mut last = self.last_write.lock().expect("write lock poisoned");
        let mut stream = &self.stream;
        match split {
            Some(point) if twin_failpoints::any_armed() => {
                let half = bytes.len() / 2;
                stream.write_all(&bytes[..half])?;
                twin_failpoints::hit(point);
                stream.write_all(&bytes[half..])?;
            }
            _ => stream.write_all(bytes)?,
        }
        *last = Instant::now();
        Ok(())
    }

    fn send(&self, msg: &Message) -> Result<(), SessionError> {
        let mut buf = BytesMut::new();
        self.codec.encode_message(msg, &mut buf)?;
        self.write(&buf, None)
    }

    /// Best effort, for leaving: waits at most `patience` for the write lock (a writer
    /// stuck on a dead peer holds it), then gives up.
    fn send_goodbye(&self, reason: String, patience: Duration) {
        let until = Instant::now() + patience;
        loop {
            if let Ok(mut last) = self.last_write.try_lock() {
                let mut buf = BytesMut::new();
                let msg = Message::Goodbye(Goodbye { reason });
                if self.codec.encode_message(&msg, &mut buf).is_ok()
                    && (&self.stream).write_all(&buf).is_ok()
                {
                    *last = Instant::now();
                }
                return;
            }
            if Instant::now() >= until {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// How long nothing was written, or `None` while a write is under way.
    fn idle_for(&self) -> Option<Duration> {
        self.last_write.try_lock().ok().map(|last| last.elapsed())
    }
}

/// Longest the epoch loop sleeps without looking at its stop and failure flags.
const LOOP_WAKE: Duration = Duration::from_millis(5);

/// How long a goodbye may wait for the write lock.
const GOODBYE_PATIENCE: Duration = Duration::from_millis(200);

/// Reads acks and heartbeats until the connection fails; returns why it ended.
fn read_acks(
    s: &Shared,
    mut conn: Conn,
    writer: &FrameWriter,
    failed: &AtomicBool,
) -> SessionError {
    twin_vmm::realtime::elevate_or_warn("ack reader");
    let err = loop {
        if s.stopping() {
            break SessionError::Stopping;
        }
        match conn.recv(s.cfg.backup_timeout) {
            Ok(Message::Ack(a)) => {
                let mut st = s.status();
                if a.epoch > st.epoch {
                    break SessionError::BogusAck { epoch: a.epoch };
                }
                // The backup has the checkpoint; its output is not released yet.
                twin_failpoints::hit("primary.after_ack");
                if let Err(e) = s.netbuf.ack(a.epoch) {
                    warn!("ack of epoch {} refused by the output buffer: {e}", a.epoch);
                }
                let now = Instant::now();
                let acked: Vec<u64> = st.in_flight.range(..=a.epoch).map(|(e, _)| *e).collect();
                for e in acked {
                    if let Some(sent) = st.in_flight.remove(&e) {
                        let ns = now.duration_since(sent).as_nanos() as u64;
                        st.ack_ns.push(ns);
                    }
                }
                st.acked = Some(st.acked.map_or(a.epoch, |x| x.max(a.epoch)));
                if st.mode != Mode::Protected {
                    st.mode = Mode::Protected;
                    st.protected_since = Some(now);
                    info!(epoch = a.epoch, "VM is protected");
                }
            }
            Ok(Message::Heartbeat(_)) => {}
            Ok(Message::Goodbye(g)) => break SessionError::Goodbye(g.reason),
            Ok(_) => break SessionError::Unexpected("message"),
            Err(e) => break e,
        }
    };
    failed.store(true, Ordering::Release);
    if !matches!(
        err,
        SessionError::Goodbye(_) | SessionError::Closed | SessionError::Stopping
    ) {
        // The backup may be alive (it sent something bad, or was only slow): tell it this
        // primary is leaving, or it would take the closed connection for a dead primary
        // and run the VM beside this one.
        writer.send_goodbye(
            format!("primary abandons the session: {err}"),
            GOODBYE_PATIENCE,
        );
    }
    let _ = conn.stream.shutdown(std::net::Shutdown::Both);
    err
}

/// Sends a heartbeat whenever nothing else went out for `heartbeat_interval`, from its own
/// real-time thread: the epoch loop may be waiting for vCPUs to park, and a backup that
/// hears nothing for its timeout takes over.
fn send_heartbeats(s: &Shared, writer: &FrameWriter, done: &AtomicBool) {
    twin_vmm::realtime::elevate_or_warn("heartbeat");
    let hb = s.cfg.heartbeat_interval;
    let mut seq = 0u64;
    while !done.load(Ordering::Acquire) {
        std::thread::sleep(hb / 4);
        if writer.idle_for().is_some_and(|idle| idle >= hb) {
            seq += 1;
            let last_epoch = s.status().epoch;
            let beat = Message::Heartbeat(Heartbeat {
                seq,
                sent_at_ns: now_ns(),
                last_epoch,
            });
            if writer.send(&beat).is_err() {
                return;
            }
        }
    }
}

fn epoch_loop(s: &Shared, mut conn: Conn, next_epoch: &mut u64) -> Result<(), SessionError> {
    let writer = FrameWriter::new(conn.stream.try_clone()?);
    let mut reader_conn = Conn::new(conn.stream.try_clone()?);
    // Bytes the handshake read past the HelloAck (an early heartbeat) belong to the reader;
    // starting it without them would start it mid-frame.
    reader_conn.rbuf = std::mem::take(&mut conn.rbuf);
    let failed = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| read_acks(s, reader_conn, &writer, &failed));
        let beats = scope.spawn(|| send_heartbeats(s, &writer, &done));
        let r = send_epochs(s, &mut conn, &writer, next_epoch, &failed);
        done.store(true, Ordering::Release);
        match &r {
            Err(SessionError::Stopping) => {
                let reason = if s.handover.load(Ordering::Acquire) {
                    HANDOVER_REASON.to_string()
                } else {
                    "primary stopping".to_string()
                };
                writer.send_goodbye(reason, GOODBYE_PATIENCE);
            }
            Err(SessionError::Closed | SessionError::Io(_)) | Ok(()) => {}
            Err(e) => writer.send_goodbye(
                format!("primary abandons the session: {e}"),
                GOODBYE_PATIENCE,
            ),
        }
        // Half-close only: the reader must still get what the backup sent before it went
        // away — above all a takeover Goodbye, which says this primary must stand down
        // (fence) instead of releasing its held output. It ends at EOF or its timeout.
        let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        let _ = beats.join();
        let reader_err = reader
            .join()
            .unwrap_or(SessionError::Unexpected("reader panic"));
        match (r, reader_err) {
            (Err(SessionError::Stopping), _) => Err(SessionError::Stopping),
            // The reader knows why the backup went away (a Goodbye, silence, a bad
            // frame); the writer only saw the consequence (a broken pipe).
            (Err(SessionError::Closed | SessionError::Io(_)), reader_err) => Err(reader_err),
            (r, _) => r,
        }
    })
}

fn send_epochs(
    s: &Shared,
    conn: &mut Conn,
    writer: &FrameWriter,
    next_epoch: &mut u64,
    failed: &AtomicBool,
) -> Result<(), SessionError> {
    let interval = s.cfg.interval;
    let mut next_tick = Instant::now();
    let mut last_checkpoint = Instant::now();
    loop {
        if s.stopping() {
            return Err(SessionError::Stopping);
        }
        if failed.load(Ordering::Acquire) {
            return Err(SessionError::Closed);
        }
        let oldest = s
            .status()
            .in_flight
            .first_key_value()
            .map(|(_, t)| t.elapsed());
        if let Some(age) = oldest.filter(|&a| a > MAX_UNACKED_AGE) {
            // Output would be held for longer than any client waits: treat the backup as
            // lost and let the loss policy decide.
            return Err(SessionError::TooFarBehind(age));
        }
        let now = Instant::now();
        let output_waits = s.cfg.eager_gap.is_some() && s.netbuf.has_open_output();
        let eager_due = output_waits
            && s.cfg
                .eager_gap
                .is_some_and(|gap| now >= last_checkpoint + gap);
        if now < next_tick && !eager_due {
            let wake = next_tick.min(now + LOOP_WAKE);
            match s.cfg.eager_gap {
                // Output already waits: sleep out the rest of the gap.
                Some(gap) if output_waits => {
                    std::thread::sleep(
                        wake.min(last_checkpoint + gap)
                            .saturating_duration_since(now),
                    );
                }
                // Woken by the guest's first frame of the epoch, not by polling.
                Some(_) => {
                    s.netbuf.wait_for_open_output(wake);
                }
                None => std::thread::sleep(wake - now),
            }
            continue;
        }
        let started = Instant::now();
        last_checkpoint = started;
        let epoch = *next_epoch;
        let netbuf = &s.netbuf;
        twin_failpoints::hit("primary.before_pause");
        let cp = s.vmm.checkpoint_sealed(true, || {
            if let Err(e) = netbuf.seal(epoch) {
                warn!("sealing output epoch {epoch}: {e}");
            }
            // The VM is paused here, its pages about to be collected.
            twin_failpoints::hit("primary.collect");
        })?;
        *next_epoch += 1;
        let state = cp.state.encode()?;
        let indices: Vec<usize> = cp.dirty_pages().collect();
        let refs: Vec<PageRef<'_>> = indices
            .iter()
            .enumerate()
            .map(|(i, &p)| PageRef {
                index: p as u64,
                data: &cp.pages[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
            })
            .collect();
        let begin = EpochBegin {
            epoch,
            page_count: refs.len() as u64,
            state_len: state.len() as u64,
        };
        conn.wbuf.clear();
        let mut enc = EpochEncoder::begin(conn.codec, begin, PAGE_SIZE as u32, &mut conn.wbuf)?;
        enc.pages(&refs, &mut conn.wbuf)?;
        enc.state(&state, &mut conn.wbuf)?;
        enc.end(&mut conn.wbuf)?;
        let bytes = conn.wbuf.len() as u64;
        {
            let mut st = s.status();
            st.epoch = epoch;
            st.checkpoints += 1;
            if started < next_tick {
                st.eager += 1;
            }
            st.in_flight.insert(epoch, Instant::now());
            let t = &cp.timings;
            st.pause_ns.push(t.pause_ns);
            st.stop_ns.push(t.stop_ns);
            st.state_ns.push(t.device_state_ns + t.kvm_state_ns);
            st.harvest_ns.push(t.harvest_ns);
            st.copy_ns.push(t.copy_ns);
            st.epoch_bytes.push(bytes);
            st.dirty_pages.push(refs.len() as u64);
            st.recent.push_back(Instant::now());
            while st.recent.len() > 200 {
                st.recent.pop_front();
            }
        }
        writer.write(&conn.wbuf, Some("primary.mid_stream"))?;
        conn.wbuf.clear();
        twin_failpoints::hit("primary.after_send");
        debug!(
            epoch,
            pages = refs.len(),
            bytes,
            pause_us = cp.timings.pause_ns / 1000,
            "checkpoint sent"
        );
        // The interval bounds an epoch's length from its start, eager or not.
        next_tick = started + interval;
        if next_tick < Instant::now() {
            // The send outlasted the interval: start the next epoch now, and say so.
            s.status().stretched += 1;
            next_tick = Instant::now();
        }
    }
}
