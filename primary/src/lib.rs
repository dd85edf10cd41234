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
//!
//! The link is authenticated (`twin-link`): only a peer holding the key is a backup. And
//! only a backup that acknowledged an epoch of this session holds this VM's committed
//! replica, so only its `Goodbye(Takeover)` makes this primary fence its output and stop.

mod arbiter;
pub mod compress;
mod inbound;
pub mod mode;
pub mod stats;
mod unchanged;

pub use mode::{Mode, ModeEvent, Transition};

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
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tracing::{debug, error, info, warn};
use twin_api::{EventKind, EventLog};
use twin_link::{FrameReader, FrameWriter, Heartbeats, LinkConfig, RecvError};
use twin_netbuf::{Mode as BufferMode, NetBuffer};
use twin_vmm::devices::virtio::blk::disk::DiskWrite;
use twin_vmm::memory::{Memory, PAGE_SIZE};
use twin_vmm::{bitmap_pages, Vmm, VmmError};
use twin_wire::{
    handshake, DiskExtent, DiskWrites, EpochBegin, EpochEncoder, FrameCodec, Goodbye,
    GoodbyeReason, Hello, Message, PageRef, Role, SyncDisk, SyncDone, SyncPagesRef, SyncZeroPages,
    VmDescription, VmId, MAX_DISK_DATA, PROTOCOL_VERSION, SOFTWARE_VERSION,
};

use crate::stats::Samples;
use twin_api::Compression;

/// What to do with held output when the backup is lost (the control API's type).
pub use twin_api::LossPolicy;

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
    /// Pre-copy: harvest and copy the epoch's pages while the guest runs, just before the
    /// pause, so that the pause copies only what is written in between
    /// ([`twin_vmm::Vmm::precopy`]). Off: every page is copied inside the pause.
    pub precopy: bool,
    pub on_backup_loss: LossPolicy,
    /// Silence from the backup longer than this means it is lost.
    pub backup_timeout: Duration,
    /// A heartbeat is sent when nothing else was sent for this long.
    pub heartbeat_interval: Duration,
    pub vm_id: VmId,
    /// Authentication and encryption of the replication link.
    pub link: LinkConfig,
    /// The arbiter whose grant this primary needs to run on without its backup
    /// (`--arbiter`); `None`: the loss policy alone decides (a partition can then produce
    /// two running VMs).
    pub arbiter: Option<twin_arbiter::Arbitration>,
    /// The ownership record as this process already holds it (a backup that took the VM
    /// over and protects it again); `None`: read or create it.
    pub arbiter_seen: Option<twin_arbiter::Seen>,
    /// How checkpoint pages are encoded ([`compress`]), and the delta cache's size in bytes.
    pub compress: twin_api::Compression,
    pub compress_cache: u64,
}

/// Errors of one replication session; each ends the session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot resolve backup address {0}")]
    Resolve(String, #[source] std::io::Error),
    #[error("cannot connect to the backup at {0}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("replication link")]
    Link(#[from] twin_link::LinkError),
    #[error("sending to the backup failed")]
    Send(#[from] twin_link::SendError),
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
    #[error("finding which pages of guest memory hold data (SEEK_DATA on its memfd) failed")]
    MemoryScan(#[source] std::io::Error),
    #[error("the backup was silent for {0:?}")]
    Silent(Duration),
    #[error("the backup closed the connection")]
    Closed,
    #[error("the backup said goodbye ({reason}): {detail}")]
    Goodbye {
        reason: GoodbyeReason,
        detail: String,
    },
    #[error("the backup takes over the VM: {0}")]
    TakenOver(String),
    #[error(
        "a peer that never acknowledged an epoch of this session claims to take over ({0}); \
         not standing down for it"
    )]
    UnverifiedTakeover(String),
    #[error("the backup has not acknowledged epochs sent {0:?} ago")]
    TooFarBehind(Duration),
    #[error("the backup acknowledged epoch {epoch}, which was never sent")]
    BogusAck { epoch: u64 },
    #[error("unexpected {0} from the backup")]
    Unexpected(&'static str),
    #[error("writing to the backup failed")]
    Io(#[from] std::io::Error),
    #[error("stopping")]
    Stopping,
    #[error("the arbiter gave the VM to another host")]
    Fenced,
}

impl From<RecvError> for SessionError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Closed => SessionError::Closed,
            RecvError::Silent(d) => SessionError::Silent(d),
            RecvError::Decode(e) => SessionError::Decode(e),
            RecvError::Link(e) => SessionError::Link(e),
        }
    }
}

impl SessionError {
    /// Whether the connection just broke (the reader knows why better than the writer).
    fn is_broken_connection(&self) -> bool {
        matches!(
            self,
            SessionError::Closed
                | SessionError::Io(_)
                | SessionError::Send(twin_link::SendError::Io(_))
        )
    }

    /// Whether retrying in a second cannot help: another protocol version, a wrong or
    /// missing key, a peer that is not Twin.
    fn is_configuration(&self) -> bool {
        match self {
            SessionError::Handshake(handshake::HandshakeError::VersionMismatch { .. })
            | SessionError::Handshake(handshake::HandshakeError::Refused {
                reason: twin_wire::RefuseReason::VersionMismatch,
                ..
            }) => true,
            SessionError::Link(e) => e.is_configuration(),
            _ => false,
        }
    }
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
    /// Dirty pages not sent: unchanged since the previous epoch (`unchanged`).
    unchanged: u64,
    /// Pages sent raw, LZ4, as deltas; bytes of dirty pages in, of page frames out; CPU
    /// time encoding them.
    raw_pages: u64,
    lz4_pages: u64,
    delta_pages: u64,
    page_bytes_in: u64,
    page_bytes_out: u64,
    encode_cpu_ns: u64,
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
    last_sync: Option<twin_api::status::SyncSummary>,
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
            unchanged: 0,
            raw_pages: 0,
            lz4_pages: 0,
            delta_pages: 0,
            page_bytes_in: 0,
            page_bytes_out: 0,
            encode_cpu_ns: 0,
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
    /// Typed lifecycle events, for programs (the control socket streams them).
    events: Arc<EventLog>,
    netbuf: NetBuffer,
    cfg: ProtectConfig,
    status: Mutex<Status>,
    /// Last sealed epoch, for heartbeats.
    last_epoch: Arc<AtomicU64>,
    stop: AtomicBool,
    /// Stopping because this primary cannot go on (its NIC died): the backup must take over.
    handover: AtomicBool,
    /// The arbiter gave the VM to someone else: this primary is fenced (final).
    fenced: AtomicBool,
    /// The VM's ownership record as this primary last saw it (what its claims compare
    /// against).
    arbiter_seen: Mutex<Option<twin_arbiter::Seen>>,
}

impl Shared {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().expect("status lock poisoned")
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Moves the mode on `event` (the one place the mode changes), logging the change.
    fn transition(&self, event: ModeEvent) -> Mode {
        let mut st = self.status();
        let was = st.mode;
        st.mode = was.next(event);
        if st.mode == Mode::Protected && was != Mode::Protected {
            st.protected_since = Some(Instant::now());
        } else if st.mode != Mode::Protected {
            st.protected_since = None;
        }
        if st.mode != was {
            debug!(?was, now = ?st.mode, ?event, "mode");
        }
        was
    }
}

/// The running replication of one VM.
pub struct Primary {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Watches the ownership record (with `--arbiter`).
    watcher: Option<JoinHandle<()>>,
}

impl Primary {
    /// Starts protecting `vmm` (already running, its NIC's sink already `netbuf`).
    pub fn start(
        vmm: Arc<Vmm>,
        netbuf: NetBuffer,
        cfg: ProtectConfig,
        events: Arc<EventLog>,
    ) -> std::io::Result<Self> {
        match &cfg.arbiter {
            Some(a) => info!(arbiter = %a.client.endpoints(), "running on without the backup needs the arbiter's grant"),
            None => warn!("no --arbiter: a partition of the replication link can produce two running VMs (this primary runs on by its --on-backup-loss policy alone)"),
        }
        let arbiter_seen = Mutex::new(cfg.arbiter_seen.clone());
        let shared = Arc::new(Shared {
            vmm,
            events,
            netbuf,
            cfg,
            status: Mutex::new(Status::new()),
            last_epoch: Arc::new(AtomicU64::new(0)),
            stop: AtomicBool::new(false),
            handover: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            arbiter_seen,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("replicate".into())
            .spawn(move || replicate(&s))?;
        let watcher = match shared.cfg.arbiter {
            Some(_) => {
                let s = shared.clone();
                Some(
                    std::thread::Builder::new()
                        .name("arbiter".into())
                        .spawn(move || arbiter::watch(&s))?,
                )
            }
            None => None,
        };
        Ok(Primary {
            shared,
            thread: Some(thread),
            watcher,
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
        // The watch ends at etcd's next progress notification (or its request timeout).
        if let Some(t) = self.watcher.take() {
            let _ = t.join();
        }
    }

    pub fn mode(&self) -> Mode {
        self.shared.status().mode
    }

    /// Status for `twin status`.
    pub fn status(&self) -> twin_api::PrimaryStatus {
        use twin_api::status::{Counts, HeldOutput, PauseSplit, Quantiles, ReleaseLatency};
        let st = self.shared.status();
        let nb = self.shared.netbuf.stats();
        let cfg = &self.shared.cfg;
        let rate = match (st.recent.front(), st.recent.back()) {
            (Some(a), Some(b)) if st.recent.len() > 1 => {
                (st.recent.len() - 1) as f64 / b.duration_since(*a).as_secs_f64().max(1e-9)
            }
            _ => 0.0,
        };
        let us = |ns: u64| ns as f64 / 1e3;
        let q_us = |s: &Samples| Quantiles {
            median: us(s.median()),
            p99: us(s.p99()),
        };
        let q = |s: &Samples| Counts {
            median: s.median(),
            p99: s.p99(),
        };
        let why_not = match st.mode {
            Mode::Protected => None,
            Mode::Connecting => Some("no backup has answered yet".to_string()),
            Mode::Syncing => Some("initial sync to the backup".to_string()),
            Mode::Unprotected => Some(format!(
                "backup lost ({}); output flows unprotected",
                st.last_error.as_deref().unwrap_or("no detail")
            )),
            Mode::HoldingOutput => Some(format!(
                "backup lost ({}); output held",
                st.last_error.as_deref().unwrap_or("no detail")
            )),
            Mode::Fenced => Some("stood down: the VM runs elsewhere".to_string()),
            Mode::Stopped => Some("replication stopped".to_string()),
        };
        let arbiter = cfg.arbiter.as_ref().map(|a| {
            let seen = self
                .shared
                .arbiter_seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            arbiter_status(a, seen.as_ref())
        });
        twin_api::PrimaryStatus {
            role: "primary".into(),
            protected: st.mode == Mode::Protected,
            why_not,
            mode: st.mode,
            backup: cfg.backup.clone(),
            authenticated: cfg.link.key.is_some(),
            encrypted: cfg.link.encrypt,
            interval_ms: cfg.interval.as_secs_f64() * 1e3,
            on_backup_loss: cfg.on_backup_loss,
            sessions: st.sessions,
            epoch: st.epoch,
            acked_epoch: st.acked,
            backup_lag_epochs: st
                .acked
                .map(|a| st.epoch.saturating_sub(a))
                .unwrap_or(st.epoch),
            checkpoints: st.checkpoints,
            eager_checkpoints: st.eager,
            eager_gap_ms: cfg.eager_gap.map(|g| g.as_secs_f64() * 1e3),
            checkpoint_rate_hz: rate,
            stretched_epochs: st.stretched,
            unchanged_pages: st.unchanged,
            pause_us: q_us(&st.pause_ns),
            pause_split_us_median: PauseSplit {
                stop_vcpus: us(st.stop_ns.median()),
                capture_state: us(st.state_ns.median()),
                harvest_dirty: us(st.harvest_ns.median()),
                copy_pages: us(st.copy_ns.median()),
            },
            epoch_bytes: q(&st.epoch_bytes),
            dirty_pages: q(&st.dirty_pages),
            ack_latency_us: q_us(&st.ack_ns),
            held_output: HeldOutput {
                frames: nb.held_frames,
                bytes: nb.held_bytes,
                mode: format!("{:?}", nb.mode),
                released_frames: nb.released_frames,
                dropped_frames: nb.dropped_overflow_frames,
                release_latency_us: ReleaseLatency {
                    median: nb.latency.p50.map(|d| d.as_secs_f64() * 1e6),
                    p99: nb.latency.p99.map(|d| d.as_secs_f64() * 1e6),
                    max: nb.latency.max.as_secs_f64() * 1e6,
                },
            },
            last_sync: st.last_sync.clone(),
            last_error: st.last_error.clone(),
            protected_for_s: st.protected_since.map(|t| t.elapsed().as_secs_f64()),
            arbiter,
            compression: twin_api::CompressionStatus {
                mode: cfg.compress,
                cache_bytes: match cfg.compress {
                    twin_api::Compression::Delta => cfg.compress_cache,
                    _ => 0,
                },
                raw_pages: st.raw_pages,
                lz4_pages: st.lz4_pages,
                delta_pages: st.delta_pages,
                page_bytes_in: st.page_bytes_in,
                page_bytes_out: st.page_bytes_out,
                encode_cpu_us_per_mib: if st.page_bytes_in > 0 {
                    st.encode_cpu_ns as f64 / 1e3 / (st.page_bytes_in as f64 / (1 << 20) as f64)
                } else {
                    0.0
                },
            },
        }
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// How long the link handshake and the backup's `HelloAck` may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The replication thread: sessions until stopped, applying the loss policy between them.
fn replicate(s: &Shared) {
    twin_link::realtime::elevate_or_warn("replicate");
    let mut generation = 0u64;
    let mut next_epoch = 1u64;
    if s.cfg.arbiter.is_some() {
        arbiter::wait_for_record(s);
    }
    while !s.stopping() && !s.fenced() {
        generation += 1;
        s.status().sessions += 1;
        let r = session(s, generation, &mut next_epoch);
        if s.fenced() {
            // The arbiter gave the VM away while this session ran.
            return;
        }
        match r {
            Ok(()) | Err(SessionError::Stopping) => break,
            Err(SessionError::TakenOver(why)) => {
                // The backup runs the VM from its last committed checkpoint; output this
                // primary holds beyond it will be produced again there.
                let discarded = s.netbuf.fence();
                warn!(
                    discarded,
                    "the backup took over ({why}): this primary is fenced and stops its VM"
                );
                s.transition(ModeEvent::TakenOver);
                s.events.emit(EventKind::StoodDown {
                    reason: why,
                    discarded_frames: discarded,
                });
                return;
            }
            Err(e) => {
                let msg = twin_vmm::describe_error(&e);
                let repeated = {
                    let mut st = s.status();
                    let same = st.last_error.as_deref() == Some(msg.as_str());
                    st.last_error = Some(msg.clone());
                    same
                };
                // With an arbiter, running on alone (releasing output no backup acknowledged)
                // needs its grant: the backup may be taking the VM over right now. Only
                // while output is held (after a won claim it flows; holding needs no grant).
                let claim = s.cfg.arbiter.is_some()
                    && s.cfg.on_backup_loss == LossPolicy::Release
                    && s.netbuf.mode() == BufferMode::Protected;
                let policy = match claim.then(|| arbiter::run_on(s)) {
                    Some(arbiter::RunOn::Lost(why)) => {
                        arbiter::fence(s, why);
                        return;
                    }
                    Some(arbiter::RunOn::Unreachable(why)) => {
                        error!("backup lost ({msg}) and the arbiter does not answer ({why}); holding all output until one of them does");
                        // `twin status` says why output is held: the arbiter, not the policy.
                        s.status().last_error =
                            Some(format!("{msg}; the arbiter does not answer ({why})"));
                        LossPolicy::Hold
                    }
                    Some(arbiter::RunOn::Won) | None => s.cfg.on_backup_loss,
                };
                let was = s.transition(ModeEvent::BackupLost(policy));
                // Said once per reason, not every second: a lost protection, or a new reason.
                let still = was != Mode::Protected && repeated;
                if let SessionError::UnverifiedTakeover(why) = &e {
                    s.events.emit(EventKind::TakeoverIgnored {
                        reason: why.clone(),
                    });
                }
                let released = match policy {
                    LossPolicy::Release => {
                        let n = s.netbuf.release_all();
                        if !still {
                            error!(released = n, "backup lost ({msg}); the VM runs UNPROTECTED until a backup returns");
                        }
                        n
                    }
                    LossPolicy::Hold => {
                        if !still {
                            error!(
                                "backup lost ({msg}); holding all output until a backup returns"
                            );
                        }
                        0
                    }
                };
                if !still {
                    s.events.emit(EventKind::BackupLost {
                        reason: msg.clone(),
                        policy: match policy {
                            LossPolicy::Release => "release".into(),
                            LossPolicy::Hold => "hold".into(),
                        },
                        released_frames: released,
                    });
                }
                if still {
                    debug!("backup still lost ({msg})");
                }
                // Reconnect after a pause that a stop request cuts short. A backup that
                // speaks another protocol version, or holds another key, will not change
                // its mind in a second (PROTOCOL.md §7: do not retry a mismatch); try again
                // much later, in case it is reconfigured meanwhile.
                let pause = if e.is_configuration() {
                    if !repeated {
                        warn!(
                            retry_s = VERSION_RETRY.as_secs(),
                            "the backup's configuration differs from this primary's; retrying much later"
                        );
                    }
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
    s.transition(ModeEvent::Stopped);
}

fn connect(s: &Shared) -> Result<twin_link::Link, SessionError> {
    // A list of backups is tried in order: the first that answers is this session's.
    let mut last = None;
    for backup in s
        .cfg
        .backup
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
    {
        match connect_one(s, backup) {
            Ok(link) => return Ok(link),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        SessionError::Resolve(
            s.cfg.backup.clone(),
            std::io::Error::new(std::io::ErrorKind::NotFound, "no backup address"),
        )
    }))
}

fn connect_one(s: &Shared, backup: &str) -> Result<twin_link::Link, SessionError> {
    let addrs: Vec<SocketAddr> = backup
        .to_socket_addrs()
        .map_err(|e| SessionError::Resolve(backup.to_string(), e))?
        .collect();
    let addr = *addrs.first().ok_or_else(|| {
        SessionError::Resolve(
            backup.to_string(),
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        )
    })?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| SessionError::Connect(addr, e))?;
    Ok(twin_link::connect(stream, &s.cfg.link, HANDSHAKE_TIMEOUT)?)
}

/// One session: handshake, description, initial sync, epochs.
fn session(s: &Shared, generation: u64, next_epoch: &mut u64) -> Result<(), SessionError> {
    if s.stopping() {
        return Err(SessionError::Stopping);
    }
    s.transition(ModeEvent::Connecting);
    let link = connect(s)?;
    let writer = Arc::new(FrameWriter::new(link.writer));
    let mut reader = FrameReader::new(link.reader);
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        software_version: SOFTWARE_VERSION.to_string(),
        role: Role::Primary,
        vm_id: s.cfg.vm_id,
        generation,
    };
    writer.send(&Message::Hello(hello.clone()))?;
    let reply = reader.recv(HANDSHAKE_TIMEOUT)?;
    let ack = handshake::check_hello_reply(&hello, reply)?;
    info!(
        backup = %s.cfg.backup,
        backup_version = %ack.software_version,
        generation,
        authenticated = link.info.authenticated,
        encrypted = link.info.encrypted,
        "connected to backup"
    );
    s.events.emit(EventKind::BackupConnected {
        backup: s.cfg.backup.clone(),
        generation,
        authenticated: link.info.authenticated,
        encrypted: link.info.encrypted,
    });
    // Epochs a lost backup never acknowledged will not be acknowledged by this one: their
    // age must not count against it (an epoch unacknowledged for 5 s means a lost backup).
    s.status().in_flight.clear();
    // Heartbeats from here on: a backup that hears nothing during a long sync gives up.
    let heartbeats = Heartbeats::spawn(
        "heartbeat",
        writer.clone(),
        s.cfg.heartbeat_interval,
        s.last_epoch.clone(),
        s.cfg.backup_timeout / 2,
    )?;
    let synced = (|| {
        let vmm = &s.vmm;
        let cfg = vmm.config();
        writer.send(&Message::VmDescription(VmDescription {
            mem_size: cfg.mem_size,
            page_size: PAGE_SIZE as u32,
            vcpus: cfg.vcpus as u32,
            mac: cfg.mac.unwrap_or_default(),
            config: Vec::new(),
            disks: cfg.disks.iter().map(|d| d.capacity).collect(),
        }))?;
        s.transition(ModeEvent::Syncing);
        initial_sync(s, &writer)
    })();
    let r = match synced {
        Ok(()) => {
            // Output from now on belongs to the first epoch this backup will hold.
            if s.netbuf.mode() != BufferMode::Protected {
                s.netbuf.protect(*next_epoch);
            }
            epoch_loop(s, &writer, reader, next_epoch)
        }
        Err(e) => {
            // The backup may have ended the session with a reason (it cannot hold the
            // replica, say) that this side, busy writing, only saw as a broken pipe.
            let e = match e {
                e if e.is_broken_connection() => backup_goodbye(&mut reader).unwrap_or(e),
                e => e,
            };
            if let Some(g) = goodbye_for(&e, s.handover.load(Ordering::Acquire)) {
                say_goodbye(&writer, g);
            }
            Err(e)
        }
    };
    drop(heartbeats);
    writer.shutdown(std::net::Shutdown::Both);
    // No one takes the disks' journal any more: a journal left on would end up holding
    // the guest's writes back (it waits when full). The next session's sync starts anew.
    s.vmm.stop_disk_journal();
    r
}

/// A goodbye the backup sent before the connection broke, if one is waiting.
fn backup_goodbye(reader: &mut FrameReader) -> Option<SessionError> {
    let until = Instant::now() + Duration::from_millis(100);
    while let Ok(Some(m)) = reader.poll(until.saturating_duration_since(Instant::now())) {
        if let Message::Goodbye(g) = m {
            return Some(SessionError::Goodbye {
                reason: g.reason,
                detail: g.detail,
            });
        }
    }
    None
}

/// Sends `g`, best effort. Failpoint `primary.goodbye` (`drop`) loses it, as a goodbye stuck
/// behind a full socket buffer is lost.
fn say_goodbye(writer: &FrameWriter, g: Goodbye) {
    if !twin_failpoints::hit("primary.goodbye") {
        writer.send_goodbye(g, GOODBYE_PATIENCE);
    }
}

/// What this primary tells the backup when a session ends with `e`: whether the backup
/// must take over (a handover), must not (stopping, abandoning), or already knows.
fn goodbye_for(e: &SessionError, handover: bool) -> Option<Goodbye> {
    match e {
        SessionError::Stopping if handover => Some(Goodbye::new(
            GoodbyeReason::Handover,
            "the primary's VM cannot go on",
        )),
        SessionError::Stopping => Some(Goodbye::new(GoodbyeReason::Stopping, "primary stopping")),
        // The backup already knows, or it is not the owner's business.
        SessionError::Goodbye { .. } | SessionError::TakenOver(_) | SessionError::Fenced => None,
        // The backup may be alive (it sent something bad, or was only slow), and a broken
        // connection may be half-open: tell it this primary is leaving, or it would take the
        // closed connection for a dead primary and run the VM beside this one.
        e => Some(Goodbye::new(
            GoodbyeReason::Abandon,
            format!("primary abandons the session: {e}"),
        )),
    }
}

/// Live initial sync: every page while the guest runs, then rounds of what it dirtied.
fn initial_sync(s: &Shared, writer: &FrameWriter) -> Result<(), SessionError> {
    const BATCH: usize = 256;
    const ROUNDS: usize = 8;
    const SMALL_ENOUGH: usize = 512;
    let t0 = Instant::now();
    let vmm = &s.vmm;
    // Tracking starts before the first read, so a page written while (or after) it is
    // read is resent by a later round or by the first checkpoint.
    vmm.start_dirty_tracking()?;
    // Likewise the disks: every write from now on is journaled and goes with the first
    // checkpoint, so a block written while (or after) the copy below reads it is sent
    // again, and applied after the copy.
    vmm.start_disk_journal();
    let disk_bytes = sync_disks(s, writer)?;
    let ram = vmm.memory();
    let pages = ram.page_count();
    let mut out = SyncOut {
        writer,
        codec: writer.codec(),
        buf: BytesMut::with_capacity(1 << 20),
        sent: 0,
    };
    let mut zero = Vec::new();
    // Pages are copied out of guest memory (which the guest writes meanwhile) with volatile
    // reads into this batch, and encoded from there.
    let mut batch = PageBatch::new(BATCH);
    let mut progress = SyncProgress::new(pages, &s.events);
    // A hole of the memfd is a zero page, named without reading it (a read would allocate
    // it); the pages of the data ranges are read and checked.
    let data = ram.data_ranges().map_err(SessionError::MemoryScan)?;
    let mut data = data.into_iter().flatten().peekable();
    for p in 0..pages {
        progress.at(p);
        let in_data = data.next_if_eq(&p).is_some();
        if !in_data || !batch.add(ram, p, true)? {
            zero.push(p as u64);
            continue;
        }
        if batch.len() == BATCH {
            out.pages(&mut batch)?;
            twin_failpoints::hit("primary.sync");
            if s.stopping() {
                return Err(SessionError::Stopping);
            }
        }
    }
    out.pages(&mut batch)?;
    let full_pages = out.sent;
    for chunk in zero.chunks(65536) {
        writer.send(&Message::SyncZeroPages(SyncZeroPages {
            indices: chunk.to_vec(),
        }))?;
        out.sent += chunk.len() as u64;
    }
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let dirty = vmm.harvest_dirty()?;
        let n = dirty.iter().map(|w| w.count_ones() as usize).sum::<usize>();
        rounds.push(n);
        for p in bitmap_pages(&dirty) {
            batch.add(ram, p, false)?;
            if batch.len() == BATCH {
                out.pages(&mut batch)?;
            }
        }
        out.pages(&mut batch)?;
        if n <= SMALL_ENOUGH {
            break;
        }
    }
    progress.done();
    writer.send(&Message::SyncDone(SyncDone {
        pages_sent: out.sent,
        disk_bytes_sent: disk_bytes,
    }))?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    info!(
        pages = full_pages,
        zero_pages = zero.len(),
        dirty_rounds = ?rounds,
        ms = format_args!("{ms:.1}"),
        "initial sync sent"
    );
    s.events.emit(EventKind::SyncSent {
        pages: full_pages,
        zero_pages: zero.len() as u64,
        ms,
    });
    s.status().last_sync = Some(twin_api::status::SyncSummary {
        pages: full_pages,
        zero_pages: zero.len() as u64,
        dirty_rounds: rounds,
        ms,
    });
    Ok(())
}

/// Copies every disk's data to the backup (holes are not sent: the replica starts zero),
/// live: the guest keeps writing, and the journal started before holds what it writes.
/// The bytes sent.
fn sync_disks(s: &Shared, writer: &FrameWriter) -> Result<u64, SessionError> {
    const CHUNK: u64 = 1 << 20;
    let mut sent = 0u64;
    for (disk, image) in s.vmm.disk_images().iter().enumerate() {
        let t0 = Instant::now();
        let cap = image.capacity();
        let extents = twin_vmm::devices::virtio::blk::disk::data_extents(image.file(), cap)?;
        let total: u64 = extents.iter().map(|&(_, len)| len).sum();
        let mut buf = vec![0u8; CHUNK as usize];
        let mut bytes = 0u64;
        let (mut done, mut tenth) = (0u64, 0u64);
        for (start, len) in extents {
            // Extents are block-granular on the file system; the wire wants sectors.
            let from = start / 512 * 512;
            let to = (start + len).div_ceil(512).saturating_mul(512).min(cap);
            let mut at = from;
            while at < to {
                let n = CHUNK.min(to - at);
                let chunk = &mut buf[..n as usize];
                image.read_at(chunk, at)?;
                if chunk.iter().any(|&b| b != 0) {
                    writer.send(&Message::SyncDisk(SyncDisk {
                        disk: disk as u32,
                        offset: at,
                        data: bytes::Bytes::copy_from_slice(chunk),
                    }))?;
                    bytes += n;
                }
                at += n;
                done += n;
                if total > 0 && done * 10 / total > tenth {
                    tenth = done * 10 / total;
                    s.events.emit(EventKind::DiskSyncProgress {
                        disk: disk as u32,
                        bytes_done: done.min(total),
                        bytes_total: total,
                    });
                }
                if s.stopping() {
                    return Err(SessionError::Stopping);
                }
            }
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        info!(
            disk,
            capacity = cap,
            bytes,
            ms = format_args!("{ms:.1}"),
            "disk copied to the backup (writes since are journaled)"
        );
        s.events.emit(EventKind::DiskSynced {
            disk: disk as u32,
            capacity: cap,
            bytes,
            ms,
        });
        sent += bytes;
    }
    Ok(sent)
}

/// Sync batches on their way out.
struct SyncOut<'a> {
    writer: &'a FrameWriter,
    codec: FrameCodec,
    buf: BytesMut,
    /// Page entries sent (full pages and zero-page indices), for `SyncDone`.
    sent: u64,
}

impl SyncOut<'_> {
    fn pages(&mut self, batch: &mut PageBatch) -> Result<(), SessionError> {
        if batch.len() == 0 {
            return Ok(());
        }
        let pages: Vec<PageRef<'_>> = batch.pages().collect();
        self.buf.clear();
        self.codec.encode_sync_pages(
            SyncPagesRef {
                page_size: PAGE_SIZE as u32,
                pages: &pages,
            },
            &mut self.buf,
        )?;
        self.sent += pages.len() as u64;
        batch.clear();
        Ok(self.writer.write(&self.buf)?)
    }
}

/// Copies of the pages of one sync batch (the encoder takes pages as byte slices).
struct PageBatch {
    data: Vec<u8>,
    indices: Vec<u64>,
}

impl PageBatch {
    fn new(capacity: usize) -> Self {
        Self {
            data: vec![0; capacity * PAGE_SIZE],
            indices: Vec::with_capacity(capacity),
        }
    }

    /// Copies page `p` in; with `skip_zero`, a page of zeroes is not kept (false).
    fn add(&mut self, ram: &Memory, p: usize, skip_zero: bool) -> Result<bool, SessionError> {
        let at = self.indices.len() * PAGE_SIZE;
        let data = &mut self.data[at..at + PAGE_SIZE];
        ram.read_page(p, data).map_err(VmmError::Memory)?;
        if skip_zero && data.iter().all(|&b| b == 0) {
            return Ok(false);
        }
        self.indices.push(p as u64);
        Ok(true)
    }

    fn len(&self) -> usize {
        self.indices.len()
    }

    fn pages(&self) -> impl Iterator<Item = PageRef<'_>> {
        let data = self.data.chunks_exact(PAGE_SIZE);
        self.indices
            .iter()
            .zip(data)
            .map(|(&index, data)| PageRef { index, data })
    }

    fn clear(&mut self) {
        self.indices.clear();
    }
}

/// A one-line progress bar for the initial sync, drawn only when stderr is a terminal.
struct SyncProgress<'a> {
    total: usize,
    shown: usize,
    /// The last tenth reported as an event.
    tenth: usize,
    tty: bool,
    events: &'a EventLog,
}

impl<'a> SyncProgress<'a> {
    fn new(total: usize, events: &'a EventLog) -> Self {
        use std::io::IsTerminal;
        SyncProgress {
            total: total.max(1),
            shown: usize::MAX,
            tenth: 0,
            tty: std::io::stderr().is_terminal(),
            events,
        }
    }

    fn at(&mut self, page: usize) {
        let pct = page * 100 / self.total;
        if pct / 10 > self.tenth {
            self.tenth = pct / 10;
            self.events.emit(EventKind::SyncProgress {
                pages_done: page as u64,
                pages_total: self.total as u64,
            });
        }
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

/// Longest the epoch loop sleeps without looking at its stop and failure flags.
const LOOP_WAKE: Duration = Duration::from_millis(5);

/// How long a goodbye may wait for the write lock.
const GOODBYE_PATIENCE: Duration = Duration::from_millis(200);

/// Reads acks and heartbeats until the connection fails; returns why it ended. Leaving, it
/// says goodbye as the end demands and shuts the connection: the epoch loop may be blocked
/// writing to a backup that stopped reading, and only that wakes it.
fn read_acks(
    s: &Shared,
    mut reader: FrameReader,
    writer: &FrameWriter,
    failed: &AtomicBool,
) -> SessionError {
    twin_link::realtime::elevate_or_warn("ack reader");
    // Whether the backup committed an epoch of this session: only then does it hold this
    // VM's replica, and only then may its takeover make this primary stand down.
    let mut acked = false;
    let err = loop {
        if s.stopping() {
            break SessionError::Stopping;
        }
        match reader.recv(s.cfg.backup_timeout) {
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
                let done: Vec<u64> = st.in_flight.range(..=a.epoch).map(|(e, _)| *e).collect();
                for e in done {
                    if let Some(sent) = st.in_flight.remove(&e) {
                        let ack = now.duration_since(sent);
                        st.ack_ns.push(ack.as_nanos() as u64);
                        // Per epoch, for the metrics' ack-latency histogram.
                        s.events.emit(EventKind::EpochAcked {
                            epoch: e,
                            ack_us: ack.as_secs_f64() * 1e6,
                        });
                    }
                }
                st.acked = Some(st.acked.map_or(a.epoch, |x| x.max(a.epoch)));
                drop(st);
                acked = true;
                if s.transition(ModeEvent::Acked) != Mode::Protected {
                    info!(epoch = a.epoch, "VM is protected");
                    let generation = s.status().sessions;
                    s.events.emit(EventKind::Protected {
                        epoch: a.epoch,
                        generation,
                    });
                }
            }
            Ok(Message::Heartbeat(_)) => {}
            Ok(Message::Goodbye(g)) => {
                break match g.reason {
                    GoodbyeReason::Takeover if acked => SessionError::TakenOver(g.detail),
                    GoodbyeReason::Takeover => SessionError::UnverifiedTakeover(g.detail),
                    reason => SessionError::Goodbye {
                        reason,
                        detail: g.detail,
                    },
                }
            }
            Ok(_) => break SessionError::Unexpected("message"),
            Err(e) => break e.into(),
        }
    };
    failed.store(true, Ordering::Release);
    if !matches!(err, SessionError::Stopping) && !s.stopping() {
        if let Some(g) = goodbye_for(&err, false) {
            say_goodbye(writer, g);
        }
        writer.shutdown(std::net::Shutdown::Both);
    }
    err
}

fn epoch_loop(
    s: &Shared,
    writer: &FrameWriter,
    reader: FrameReader,
    next_epoch: &mut u64,
) -> Result<(), SessionError> {
    let failed = AtomicBool::new(false);
    let handover = || s.handover.load(Ordering::Acquire);
    std::thread::scope(|scope| {
        let ack_reader = std::thread::Builder::new()
            .name("ack reader".into())
            .spawn_scoped(scope, || read_acks(s, reader, writer, &failed))?;
        let join = |h: std::thread::ScopedJoinHandle<'_, SessionError>| {
            h.join().unwrap_or(SessionError::Unexpected("reader panic"))
        };
        // Inbound frames go to the backup as the guest receives them.
        let fwd = std::sync::Arc::new(inbound::Forward::new(*next_epoch));
        {
            let f = fwd.clone();
            s.vmm
                .set_net_rx_tap(Some(Box::new(move |frame| f.push(frame))));
        }
        let forwarder = {
            let f = fwd.clone();
            std::thread::Builder::new()
                .name("inbound".into())
                .spawn_scoped(scope, move || inbound::forward(&f, writer))
        };
        let sent = send_epochs(s, writer, next_epoch, &failed, &fwd);
        s.vmm.set_net_rx_tap(None);
        fwd.stop();
        if let Ok(h) = forwarder {
            let _ = h.join();
        }
        match sent {
            // The reader ended first (and said goodbye), or the connection broke under the
            // writer: the reader knows why the backup went away (a Goodbye, silence, a bad
            // frame).
            Err(e) if e.is_broken_connection() => Err(join(ack_reader)),
            r => {
                if let Some(g) = r.as_ref().err().and_then(|e| goodbye_for(e, handover())) {
                    say_goodbye(writer, g);
                }
                // Half-close only: the reader must still get what the backup sent before it
                // went away — above all a takeover Goodbye, which says this primary must
                // stand down (fence) instead of releasing its held output. It ends at EOF
                // or its timeout.
                writer.shutdown(std::net::Shutdown::Write);
                match (r, join(ack_reader)) {
                    (Err(SessionError::Stopping), _) => Err(SessionError::Stopping),
                    (_, why @ SessionError::TakenOver(_)) => Err(why),
                    (r, _) => r,
                }
            }
        }
    })
}

/// One disk's journal of an epoch as `DiskWrites` messages of at most [`MAX_DISK_DATA`]
/// bytes of data each (a longer write is split).
fn disk_messages(epoch: u64, disk: u32, journal: Vec<DiskWrite>) -> Vec<DiskWrites> {
    let mut out = Vec::new();
    let mut cur = DiskWrites {
        epoch,
        disk,
        writes: Vec::new(),
    };
    let mut cur_bytes = 0usize;
    let mut push = |e: DiskExtent, cur: &mut DiskWrites, cur_bytes: &mut usize| {
        if *cur_bytes + e.data.len() > MAX_DISK_DATA && !cur.writes.is_empty() {
            out.push(std::mem::replace(
                cur,
                DiskWrites {
                    epoch,
                    disk,
                    writes: Vec::new(),
                },
            ));
            *cur_bytes = 0;
        }
        *cur_bytes += e.data.len();
        cur.writes.push(e);
    };
    for w in journal {
        match w {
            DiskWrite::Zero { offset, len } => push(
                DiskExtent {
                    offset,
                    zero_len: len,
                    data: bytes::Bytes::new(),
                },
                &mut cur,
                &mut cur_bytes,
            ),
            DiskWrite::Data { offset, data } => {
                let data = bytes::Bytes::from(data);
                let mut at = 0;
                while at < data.len() {
                    let n = MAX_DISK_DATA.min(data.len() - at);
                    push(
                        DiskExtent {
                            offset: offset + at as u64,
                            zero_len: 0,
                            data: data.slice(at..at + n),
                        },
                        &mut cur,
                        &mut cur_bytes,
                    );
                    at += n;
                }
            }
        }
    }
    if !cur.writes.is_empty() {
        out.push(cur);
    }
    out
}

fn send_epochs(
    s: &Shared,
    writer: &FrameWriter,
    next_epoch: &mut u64,
    failed: &AtomicBool,
    inbound: &inbound::Forward,
) -> Result<(), SessionError> {
    let interval = s.cfg.interval;
    let codec = writer.codec();
    let mut wbuf = BytesMut::with_capacity(1 << 20);
    // What the backup holds of the previous epoch's pages (this session's only).
    let mut last_sent = unchanged::LastSent::default();
    // With deltas, what it holds of every page in the cache (this session's only), which
    // also finds the unchanged pages.
    let mut compressor = compress::Compressor::new(s.cfg.compress, s.cfg.compress_cache);
    let mode = compressor.mode();
    let mut next_tick = Instant::now();
    let mut last_checkpoint = Instant::now();
    loop {
        if s.stopping() {
            return Err(SessionError::Stopping);
        }
        if s.fenced() {
            return Err(SessionError::Fenced);
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
        let pre = if s.cfg.precopy {
            Some(s.vmm.precopy()?)
        } else {
            None
        };
        twin_failpoints::hit("primary.before_pause");
        let seal = || {
            if let Err(e) = netbuf.seal(epoch) {
                warn!("sealing output epoch {epoch}: {e}");
            }
            // Frames delivered from here on are in the next checkpoint, not this one.
            inbound.set_open(epoch + 1);
            // The VM is paused here, its pages about to be collected.
            twin_failpoints::hit("primary.collect");
        };
        let mut cp = match pre {
            Some(pre) => s.vmm.checkpoint_precopied(pre, seal)?,
            None => s.vmm.checkpoint_sealed(true, seal)?,
        };
        *next_epoch += 1;
        // From here on the guest runs: encoding is the replication thread's (and its
        // helpers') work, off the pause.
        let cpu0 = compress::thread_cpu_ns();
        let state = cp.state.encode()?;
        let dirty: Vec<(u64, &[u8])> = cp
            .dirty_pages()
            .enumerate()
            .map(|(i, p)| (p as u64, &cp.pages[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]))
            .collect();
        let dirty_bytes = (dirty.len() * PAGE_SIZE) as u64;
        // Hot pages are reported every epoch, written or not: send only what changed.
        let skipped_before = last_sent.skipped;
        let to_send: Vec<(u64, &[u8])> = match mode {
            // The delta cache finds them (and more: any page it holds).
            Compression::Delta => dirty,
            Compression::None | Compression::Lz4 => last_sent
                .filter(&dirty)
                .into_iter()
                .map(|i| dirty[i])
                .collect(),
        };
        let encoded = (mode != Compression::None).then(|| {
            let helpers = if to_send.len() >= 1024 {
                compress::free_cores()
            } else {
                0
            };
            compressor.encode(&to_send, helpers)
        });
        let refs: Vec<PageRef<'_>>;
        let erefs: Vec<twin_wire::EncodedPageRef<'_>>;
        let sent_pages = match &encoded {
            None => {
                refs = to_send
                    .iter()
                    .map(|&(index, data)| PageRef { index, data })
                    .collect();
                erefs = Vec::new();
                refs.len()
            }
            Some(e) => {
                refs = Vec::new();
                erefs = e.refs(&to_send);
                erefs.len()
            }
        };
        let begin = EpochBegin {
            epoch,
            page_count: sent_pages as u64,
            state_len: state.len() as u64,
        };
        wbuf.clear();
        let mut enc = EpochEncoder::begin(codec, begin, PAGE_SIZE as u32, &mut wbuf)?;
        let pages_at = wbuf.len();
        if encoded.is_some() {
            enc.compressed_pages(&erefs, &mut wbuf)?;
        } else {
            enc.pages(&refs, &mut wbuf)?;
        }
        let page_bytes = (wbuf.len() - pages_at) as u64;
        let mut disk_bytes = 0u64;
        for (disk, journal) in std::mem::take(&mut cp.disk_writes).into_iter().enumerate() {
            for w in disk_messages(epoch, disk as u32, journal) {
                disk_bytes += w.writes.iter().map(|e| e.data.len() as u64).sum::<u64>();
                enc.disk_writes(&w, &mut wbuf)?;
            }
        }
        enc.state(&state, &mut wbuf)?;
        enc.end(&mut wbuf)?;
        let cpu1 = compress::thread_cpu_ns();
        let encode_cpu_ns =
            cpu1.saturating_sub(cpu0) + encoded.as_ref().map_or(0, |e| e.helper_cpu_ns);
        let unchanged = match &encoded {
            Some(e) if mode == Compression::Delta => e.skipped,
            _ => last_sent.skipped - skipped_before,
        };
        let bytes = wbuf.len() as u64;
        {
            let mut st = s.status();
            st.epoch = epoch;
            st.checkpoints += 1;
            st.unchanged += unchanged;
            match &encoded {
                Some(e) => {
                    st.raw_pages += e.raw;
                    st.lz4_pages += e.lz4;
                    st.delta_pages += e.delta;
                }
                None => st.raw_pages += sent_pages as u64,
            }
            st.page_bytes_in += dirty_bytes;
            st.page_bytes_out += page_bytes;
            st.encode_cpu_ns += encode_cpu_ns;
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
            st.dirty_pages.push(sent_pages as u64);
            st.recent.push_back(Instant::now());
            while st.recent.len() > 200 {
                st.recent.pop_front();
            }
        }
        if twin_failpoints::any_armed() {
            writer.write_split(&wbuf, || {
                twin_failpoints::hit("primary.mid_stream");
            })?;
        } else {
            writer.write(&wbuf)?;
        }
        let send_cpu_ns = compress::thread_cpu_ns().saturating_sub(cpu1);
        s.last_epoch.store(epoch, Ordering::Release);
        twin_failpoints::hit("primary.after_send");
        let t = &cp.timings;
        let us = |ns: u64| ns as f64 / 1e3;
        s.events.emit(EventKind::EpochSent {
            epoch,
            pages: sent_pages as u64,
            bytes,
            pause_us: us(t.pause_ns),
            stop_us: us(t.stop_ns),
            state_us: us(t.device_state_ns + t.kvm_state_ns),
            harvest_us: us(t.harvest_ns),
            copy_us: us(t.copy_ns),
            eager: started < next_tick,
            dirty_bytes,
            page_bytes,
            encode_cpu_us: us(encode_cpu_ns),
            send_cpu_us: us(send_cpu_ns),
        });
        debug!(
            epoch,
            pages = sent_pages,
            bytes,
            disk_bytes,
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

/// The arbiter as `twin status` shows it: `seen` is the record as last read.
pub fn arbiter_status(
    a: &twin_arbiter::Arbitration,
    seen: Option<&twin_arbiter::Seen>,
) -> twin_api::status::ArbiterStatus {
    twin_api::status::ArbiterStatus {
        endpoints: a.client.endpoints(),
        generation: seen.map_or(0, twin_arbiter::Seen::generation),
        owner: seen
            .and_then(|x| x.record.as_ref())
            .map(|r| r.owner.label.clone()),
        owned_here: seen.is_some_and(|x| x.owned_by(&a.me.id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_becomes_capped_messages_in_order() {
        let big = vec![7u8; MAX_DISK_DATA + 4096];
        let journal = vec![
            DiskWrite::Data {
                offset: 0,
                data: vec![1; 512],
            },
            DiskWrite::Zero {
                offset: 4096,
                len: 8192,
            },
            DiskWrite::Data {
                offset: 1 << 20,
                data: big.clone(),
            },
        ];
        let msgs = disk_messages(9, 2, journal);
        assert!(msgs.iter().all(|m| m.epoch == 9 && m.disk == 2));
        for m in &msgs {
            let data: usize = m.writes.iter().map(|e| e.data.len()).sum();
            assert!(data <= MAX_DISK_DATA, "{data} bytes in one message");
        }
        let all: Vec<&DiskExtent> = msgs.iter().flat_map(|m| &m.writes).collect();
        assert_eq!((all[0].offset, all[0].data.len()), (0, 512));
        assert_eq!(
            (all[1].offset, all[1].zero_len, all[1].data.len()),
            (4096, 8192, 0)
        );
        // The long write is split at the cap, its pieces contiguous and complete.
        let mut at = 1 << 20;
        let mut joined = Vec::new();
        for e in &all[2..] {
            assert_eq!(e.offset, at);
            at += e.data.len() as u64;
            joined.extend_from_slice(&e.data);
        }
        assert_eq!(joined, big);
        assert!(disk_messages(1, 0, Vec::new()).is_empty());
    }
}
