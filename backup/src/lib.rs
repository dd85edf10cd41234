//! Backup side: keeps the replica, watches heartbeats, fails over.
//!
//! A connection becomes a session only after it authenticated and said `Hello` ([`accept`],
//! on threads of its own), and only if the backup admits it: a backup whose replica ever
//! committed is *pinned* to that VM, and refuses every other VM and every generation of its
//! own VM it has already seen. A session: VM description, initial sync straight into the
//! replica memory (a memfd, the same kind the VMM runs on), then epochs. An epoch is
//! assembled apart from the replica and applied only when it arrived whole, its checksum
//! matched and its state decodes; then it is acknowledged. A partial or corrupt epoch is
//! dropped and never touches the replica. The session's [`phase::Phase`] moves by one pure
//! function; how a session ends decides what happens next by another, [`takeover::decide`].
//!
//! Failover: when the primary of a session that committed falls silent for
//! `heartbeat_timeout` or its connection dies without a goodbye, the backup builds a VM
//! around the replica memory as it is (no copy: the replica *is* the guest's RAM), restores
//! the last committed state, opens its own TAP with the guest's MAC, announces the guest
//! (gratuitous ARP), and runs it. Everything else — a goodbye, a corrupt stream, a newer
//! session of the same VM — means the primary is alive and may run on without this backup:
//! the replica is detached (never used for failover) until a new session resynchronises it.

mod accept;
pub mod announce;
mod inbound;
mod phase;
mod replica;
pub mod takeover;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};
use twin_api::{EventKind, EventLog};
use twin_link::{FrameReader, FrameWriter, Heartbeats, LinkConfig, RecvError};
use twin_vmm::devices::serial::ConsoleOut;
use twin_vmm::memory::{Memory, PAGE_SIZE};
use twin_vmm::{HostResources, MachineState, Vmm, VmmError};
use twin_wire::{
    handshake::{self, AcceptPolicy},
    Ack, CompleteEpoch, Goodbye, GoodbyeReason, Message, Refuse, RefuseReason, VmId,
};

use crate::accept::{Acceptor, Candidate};
use crate::phase::{Phase, PhaseEnd, Step};
use crate::replica::{Pin, Replica, ReplicaMemory};
use crate::takeover::{
    ClaimOutcome, Decision, EndKind, Standby, StandbyEvent, SELF_STALL, STALL_MEMORY,
};

/// How the backup runs.
pub struct BackupConfig {
    pub listen: SocketAddr,
    /// TAP the VM gets after failover.
    pub tap: String,
    pub heartbeat_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// Authentication and encryption of the replication link.
    pub link: LinkConfig,
    /// Typed lifecycle events, for programs (the control socket streams them).
    pub events: Arc<EventLog>,
    /// The arbiter that must grant every takeover (`--arbiter`); `None`: take over on
    /// silence alone (a partition can then produce two VMs).
    pub arbiter: Option<twin_arbiter::Arbitration>,
    /// Where the replica lives on disk (`--replica-dir`): the disks as `disk-<i>.img`, the
    /// memory as a replica store (`twin-store`). A VM with disks is refused without it;
    /// without it the memory is kept in RAM.
    pub replica_dir: Option<std::path::PathBuf>,
    /// The page cache the replica store may keep (`--replica-memory`); `None`: the kernel
    /// (and the memory cgroup, if any) decides.
    pub replica_memory: Option<u64>,
}

/// A control request the backup loop serves.
pub enum BackupRequest {
    Status(Box<dyn FnOnce(BackupStatus) + Send>),
    /// Planned switchover: tell the primary to stand down, then take over.
    Failover(FailoverReply),
}

/// Where the outcome of a requested failover goes.
pub type FailoverReply = Box<dyn FnOnce(Result<FailoverReport, String>) + Send>;

/// Errors that stop the backup for good.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot open the takeover TAP")]
    Tap(#[source] twin_vmm::devices::tap::TapError),
    #[error("cannot listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error("the accepting thread stopped")]
    AcceptorGone,
    #[error("failover failed while restoring the VM")]
    Restore(#[source] VmmError),
    #[error("failover failed while starting the VM")]
    Start(#[source] VmmError),
    #[error("failover failed: the replica store cannot be loaded")]
    Load(#[source] twin_vmm::lazy::LazyError),
    #[error("stopped before any failover")]
    Stopped,
}

pub use twin_api::status::{BackupState, BackupStatus, SessionStatus};
pub use twin_api::FailoverReport;

/// What the backup did.
pub enum Outcome {
    /// It took over: the VM runs here now.
    FailedOver {
        vmm: Vmm,
        report: FailoverReport,
        /// The VM's identity, for protecting it again under the same name.
        vm_id: VmId,
        /// The ownership record as this backup won it (with `--arbiter`).
        arbiter_seen: Option<twin_arbiter::Seen>,
    },
}

/// Counters shown by `twin status`.
#[derive(Default)]
struct Stats {
    sessions: u64,
    refused: u64,
    epochs_applied: u64,
    epochs_rejected: u64,
    last_apply_us: f64,
    apply_us_max: f64,
    /// Bytes of sessions that ended, and of the one under way.
    bytes_received: u64,
    session_bytes: u64,
    last_error: Option<String>,
}

/// Silence tolerated before the first committed checkpoint: until then nothing can be taken
/// over, and the primary may be quiet for a while (enabling dirty logging, scanning RAM, a
/// first large epoch).
const SYNC_SILENCE_LIMIT: Duration = Duration::from_secs(5);

/// How long a goodbye may wait for the write lock.
const GOODBYE_PATIENCE: Duration = Duration::from_millis(200);

/// Why one session with a primary ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("primary silent for {0:?}")]
    Silent(Duration),
    #[error("primary connection closed")]
    Closed,
    #[error("primary connection failed")]
    Link(#[source] twin_link::LinkError),
    #[error("corrupt replication stream")]
    Corrupt(#[source] twin_wire::DecodeError),
    #[error(transparent)]
    Phase(PhaseEnd),
    #[error("the replica cannot be kept: {0}")]
    Replica(String),
    #[error("epoch {epoch} cannot be applied: {what}")]
    BadEpoch { epoch: u64, what: String },
    #[error("a newer session of the same VM (generation {}) replaces this one", .0.hello.generation)]
    Superseded(Box<Candidate>),
    #[error("sending to the primary failed")]
    Send(#[source] twin_link::SendError),
    #[error("takeover requested")]
    TakeoverRequested,
    #[error("stopping")]
    Stopping,
}

impl SessionEnd {
    fn kind(&self) -> EndKind {
        match self {
            SessionEnd::Silent(_) | SessionEnd::Closed | SessionEnd::Send(_) => EndKind::Lost,
            // A reset or a failed read: the primary's host or process is gone. An altered
            // record is an attack or a broken path, not a dead primary.
            SessionEnd::Link(twin_link::LinkError::Io { .. }) => EndKind::Lost,
            SessionEnd::Link(_) => EndKind::Abandoned,
            SessionEnd::Phase(PhaseEnd::Goodbye { reason, .. }) => EndKind::Goodbye(*reason),
            SessionEnd::Phase(_)
            | SessionEnd::Corrupt(_)
            | SessionEnd::Replica(_)
            | SessionEnd::BadEpoch { .. } => EndKind::Abandoned,
            SessionEnd::Superseded(_) => EndKind::Superseded,
            SessionEnd::TakeoverRequested => EndKind::TakeoverRequested,
            SessionEnd::Stopping => EndKind::Stopping,
        }
    }

    fn from_recv(e: RecvError) -> Self {
        match e {
            RecvError::Closed => SessionEnd::Closed,
            RecvError::Silent(d) => SessionEnd::Silent(d),
            RecvError::Decode(e) => SessionEnd::Corrupt(e),
            RecvError::Link(e) => SessionEnd::Link(e),
        }
    }
}

/// No replica yet (before the VM's description): a delta page is refused.
struct NoReplica;

impl twin_wire::BasePages for NoReplica {
    fn read_committed_page(&self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
        Err(std::io::Error::other("no replica"))
    }
}

/// One admitted session.
struct Session {
    vm_id: VmId,
    generation: u64,
    reader: FrameReader,
    writer: Arc<FrameWriter>,
    heartbeats: Heartbeats,
    /// Last committed epoch, reported in heartbeats.
    committed: Arc<AtomicU64>,
    /// `None` only while a message is being handled.
    phase: Option<Phase>,
}

/// The backup: listens, replicates, and fails over when the primary dies.
pub struct Backup {
    cfg: BackupConfig,
    acceptor: Acceptor,
    /// The takeover TAP, held open from start-up: a TAP gets carrier when opened, and a
    /// bridge forwards on the port only after the kernel's link watch (up to a second)
    /// has noticed — opened at takeover, the first announcements would be dropped.
    tap: Option<twin_vmm::devices::tap::Tap>,
    replica: Option<Replica>,
    pin: Option<Pin>,
    standby: Standby,
    /// When the primary was declared lost (or the takeover requested).
    detected: Option<Instant>,
    takeover_reply: Option<FailoverReply>,
    state: BackupState,
    session: Option<SessionStatus>,
    stats: Stats,
    /// The VM's ownership record as read while its primary was in a session: the view a
    /// claim compares against (read anew in every session, before its first ack).
    arbiter_seen: Option<(String, twin_arbiter::Seen)>,
    /// Whether a failed read of the record was already reported in this session.
    record_unread_said: bool,
    /// The connection of the session whose loss may lead to a takeover: the primary is
    /// told `Goodbye(takeover)` on it only once the takeover is certain (with an arbiter,
    /// once the claim is won).
    takeover_writer: Option<Arc<FrameWriter>>,
    /// Whether an unanswered claim was already reported (once per claiming episode).
    claim_unreachable_said: bool,
    /// The record as this backup's winning claim left it.
    won: Option<twin_arbiter::Seen>,
}

impl Backup {
    /// Opens the takeover TAP and binds the replication port: a backup that cannot do both
    /// fails here, before its caller claims a control socket.
    pub fn bind(cfg: BackupConfig) -> Result<Self, BackupError> {
        let tap = twin_vmm::devices::tap::Tap::open(&cfg.tap).map_err(BackupError::Tap)?;
        let listener =
            TcpListener::bind(cfg.listen).map_err(|e| BackupError::Listen(cfg.listen, e))?;
        let acceptor = Acceptor::start(listener, cfg.link.clone(), cfg.events.clone())
            .map_err(|e| BackupError::Listen(cfg.listen, e))?;
        if cfg.link.key.is_none() {
            warn!(
                listen = %cfg.listen,
                "the replication link is NOT authenticated (--no-auth): anyone who reaches this port can replace the replica"
            );
        }
        match &cfg.arbiter {
            Some(a) => info!(arbiter = %a.client.endpoints(), "takeovers are granted by the arbiter"),
            None => warn!(
                "no --arbiter: a partition of the replication link can produce two running VMs (this backup takes over on silence alone)"
            ),
        }
        Ok(Backup {
            cfg,
            acceptor,
            tap: Some(tap),
            replica: None,
            pin: None,
            standby: Standby::Waiting,
            detected: None,
            takeover_reply: None,
            state: BackupState::Waiting,
            session: None,
            stats: Stats::default(),
            arbiter_seen: None,
            record_unread_said: false,
            takeover_writer: None,
            claim_unreachable_said: false,
            won: None,
        })
    }

    fn arbiter(&self) -> bool {
        self.cfg.arbiter.is_some()
    }

    /// Asks the arbiter for the VM, comparing against the record read during the lost
    /// session.
    fn claim(&mut self) -> ClaimOutcome {
        let Some(arb) = self.cfg.arbiter.clone() else {
            return ClaimOutcome::Won;
        };
        let Some(vm) = self.replica.as_ref().map(|r| r.vm_id.to_string()) else {
            return ClaimOutcome::Lost;
        };
        let seen = self
            .arbiter_seen
            .clone()
            .filter(|(v, _)| *v == vm)
            .map(|(_, s)| s);
        let emit = |events: &EventLog, outcome: &str, seen: Option<&twin_arbiter::Seen>| {
            events.emit(EventKind::Arbitrated {
                outcome: outcome.into(),
                generation: seen.map(twin_arbiter::Seen::generation),
                owner: seen
                    .and_then(|s| s.record.as_ref())
                    .map(|r| r.owner.label.clone()),
            });
        };
        let Some(seen) = seen else {
            error!(vm, "no ownership record of the VM was read while its primary was connected: a claim cannot be compared against anything; no takeover");
            emit(&self.cfg.events, "lost", None);
            self.detach_replica();
            return ClaimOutcome::Lost;
        };
        match arb.client.claim(&vm, &seen, &arb.me) {
            Ok(twin_arbiter::Claim::Won(now)) => {
                info!(
                    vm,
                    generation = now.generation(),
                    "the arbiter gives the VM to this backup"
                );
                emit(&self.cfg.events, "won", Some(&now));
                self.claim_unreachable_said = false;
                self.won = Some(now);
                ClaimOutcome::Won
            }
            Ok(twin_arbiter::Claim::Lost(now)) => {
                let owner = now.owner_label();
                warn!(
                    vm,
                    generation = now.generation(),
                    "the arbiter says {owner} owns the VM since this backup last saw it (the primary runs on): no takeover; replica detached"
                );
                emit(&self.cfg.events, "lost", Some(&now));
                self.detach_replica();
                self.claim_unreachable_said = false;
                ClaimOutcome::Lost
            }
            Err(e) => {
                if !self.claim_unreachable_said {
                    warn!(
                        vm,
                        "cannot reach the arbiter ({e}): no takeover until it answers"
                    );
                    emit(&self.cfg.events, "unreachable", Some(&seen));
                    self.claim_unreachable_said = true;
                }
                ClaimOutcome::Unreachable
            }
        }
    }

    /// With an arbiter: whether this session's view of the VM's ownership record is known,
    /// reading it now if not (the primary creates it before its first session).
    fn knows_the_record(&mut self, s: &Session) -> bool {
        let Some(arb) = &self.cfg.arbiter else {
            return true;
        };
        if self.arbiter_seen.is_some() {
            return true;
        }
        let vm = s.vm_id.to_string();
        match arb.client.get(&vm) {
            Ok(seen) if seen.record.is_some() => {
                debug!(vm, generation = seen.generation(), "ownership record read");
                self.arbiter_seen = Some((vm, seen));
                true
            }
            other => {
                if !self.record_unread_said {
                    let why = match other {
                        Ok(_) => "it does not exist yet".to_string(),
                        Err(e) => e.to_string(),
                    };
                    warn!(vm, "cannot read the VM's ownership record ({why}): acknowledgements withheld until it can");
                    self.record_unread_said = true;
                }
                false
            }
        }
    }

    fn detach_replica(&mut self) {
        if let Some(r) = self.replica.as_mut() {
            r.committed = None;
        }
        if let Some(w) = self.takeover_writer.take() {
            w.shutdown(std::net::Shutdown::Both);
        }
    }

    fn has_committed(&self) -> bool {
        self.replica.as_ref().is_some_and(|r| r.committed.is_some())
    }

    fn status(&self) -> BackupStatus {
        BackupStatus {
            role: "backup".into(),
            state: self.state,
            listen: self.cfg.listen.to_string(),
            requires_key: self.cfg.link.key.is_some(),
            session: self.session.clone(),
            pinned_vm: self.pin.map(|p| p.vm_id.to_string()),
            sessions: self.stats.sessions,
            refused: self.stats.refused,
            committed_epoch: self.replica.as_ref().and_then(Replica::committed_epoch),
            epochs_applied: self.stats.epochs_applied,
            epochs_rejected: self.stats.epochs_rejected,
            last_apply_us: self.stats.last_apply_us,
            apply_us_max: self.stats.apply_us_max,
            bytes_received: self.stats.bytes_received + self.stats.session_bytes,
            mem_size: self.replica.as_ref().map(|r| r.memory.size()),
            last_error: self.stats.last_error.clone(),
        }
    }

    /// The state between sessions, from what the backup holds.
    fn idle_state(&self) -> BackupState {
        match (self.standby, &self.replica) {
            (Standby::TakeOver, _) => BackupState::TakingOver,
            (Standby::Claiming { .. }, _) => BackupState::Claiming,
            (Standby::Grace { .. }, _) => BackupState::Grace,
            (Standby::Waiting, Some(_)) if self.pin.is_some() => BackupState::Detached,
            (Standby::Waiting, _) => BackupState::Waiting,
        }
    }

    /// Serves primaries until it takes over (returns the running VM) or `stop` fires.
    pub fn run(
        mut self,
        control: &Receiver<BackupRequest>,
        stop: &AtomicBool,
        console: impl FnOnce() -> ConsoleOut,
    ) -> Result<Outcome, BackupError> {
        twin_link::realtime::elevate_or_warn("backup");
        info!(listen = %self.cfg.listen, "backup waiting for a primary");
        self.cfg.events.emit(EventKind::Listening {
            listen: self.cfg.listen.to_string(),
        });
        loop {
            if stop.load(Ordering::Acquire) {
                return Err(BackupError::Stopped);
            }
            let now = Instant::now();
            self.standby = self
                .standby
                .next(StandbyEvent::Tick(now), now, self.arbiter());
            if let Standby::Claiming { next_try } = self.standby {
                if now >= next_try {
                    let outcome = self.claim();
                    self.standby =
                        self.standby
                            .next(StandbyEvent::Claimed(outcome), Instant::now(), true);
                }
            }
            if self.standby == Standby::TakeOver {
                return self.take_over(console);
            }
            while let Ok(req) = control.try_recv() {
                self.request_between_sessions(req);
            }
            self.state = self.idle_state();
            if self.standby == Standby::TakeOver {
                continue;
            }
            let mut next = match self.acceptor.rx.recv_timeout(Duration::from_millis(5)) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return Err(BackupError::AcceptorGone),
            };
            // A superseded session hands over its successor directly.
            while let Some(candidate) = next.take() {
                let Some(session) = self.admit(candidate) else {
                    break;
                };
                next = self.run_session(session, control, stop);
            }
        }
    }

    fn request_between_sessions(&mut self, req: BackupRequest) {
        match req {
            BackupRequest::Status(reply) => reply(self.status()),
            BackupRequest::Failover(reply) => {
                if self.has_committed() {
                    self.detected = Some(Instant::now());
                    self.takeover_reply = Some(reply);
                    self.standby = self.standby.next(
                        StandbyEvent::TakeoverRequested,
                        Instant::now(),
                        self.arbiter(),
                    );
                } else {
                    reply(Err("no committed checkpoint to take over from".into()));
                }
            }
        }
    }

    /// Answers a candidate's `Hello`: a session, or a refusal sent on its connection.
    fn admit(&mut self, c: Candidate) -> Option<Session> {
        let peer = c.reader.peer();
        let policy = AcceptPolicy {
            vm_id: self.pin.map(|p| p.vm_id),
            min_generation: self.pin.map_or(0, |p| p.min_generation),
        };
        let ack = match handshake::accept_hello(&policy, &c.hello) {
            Ok(ack) => ack,
            Err(refuse) => {
                self.refuse(&c, refuse);
                return None;
            }
        };
        if let Err(e) = c.writer.send(&Message::HelloAck(ack)) {
            warn!(%peer, "answering the primary's Hello failed: {e}");
            return None;
        }
        let same_vm = self.pin.is_some_and(|p| p.vm_id == c.hello.vm_id);
        if same_vm {
            // The pinned VM's primary started a new session: it has left the old one and
            // may have run on without this backup, so the old image stands for nothing now
            // (and any grace for it ends: its primary is alive).
            self.standby =
                self.standby
                    .next(StandbyEvent::SameVmHello, Instant::now(), self.arbiter());
            if let Some(p) = self.pin.as_mut() {
                p.min_generation = c.hello.generation + 1;
            }
            if let Some(r) = self.replica.as_mut() {
                r.committed = None;
            }
        }
        // This session's view of the ownership record, read before its first ack: what a
        // takeover after it claims against (the primary bumps it if it runs on without us).
        self.arbiter_seen = None;
        self.record_unread_said = false;
        // A newer session of the VM: an earlier one's takeover is off.
        if let Some(w) = self.takeover_writer.take() {
            w.shutdown(std::net::Shutdown::Both);
        }
        let committed = Arc::new(AtomicU64::new(0));
        let heartbeats = match Heartbeats::spawn(
            "backup-heartbeat",
            c.writer.clone(),
            self.cfg.heartbeat_interval,
            committed.clone(),
            SELF_STALL,
        ) {
            Ok(h) => h,
            Err(e) => {
                warn!("cannot start the heartbeat thread: {e}");
                return None;
            }
        };
        self.stats.sessions += 1;
        info!(
            %peer,
            vm = %c.hello.vm_id,
            generation = c.hello.generation,
            version = %c.hello.software_version,
            authenticated = c.authenticated,
            encrypted = c.encrypted,
            "primary connected"
        );
        self.cfg.events.emit(EventKind::PrimaryConnected {
            peer: peer.to_string(),
            vm: c.hello.vm_id.to_string(),
            generation: c.hello.generation,
            authenticated: c.authenticated,
            encrypted: c.encrypted,
        });
        self.session = Some(SessionStatus {
            peer: peer.to_string(),
            vm: c.hello.vm_id.to_string(),
            generation: c.hello.generation,
            authenticated: c.authenticated,
            encrypted: c.encrypted,
        });
        self.state = BackupState::Describing;
        Some(Session {
            vm_id: c.hello.vm_id,
            generation: c.hello.generation,
            reader: c.reader,
            writer: c.writer,
            heartbeats,
            committed,
            phase: Some(Phase::AwaitDescription),
        })
    }

    fn refuse(&mut self, c: &Candidate, refuse: Refuse) {
        self.stats.refused += 1;
        self.cfg.events.emit(EventKind::PeerRefused {
            peer: c.reader.peer().to_string(),
            reason: format!("{}: {}", refuse.reason, refuse.detail),
        });
        warn!(
            peer = %c.reader.peer(),
            vm = %c.hello.vm_id,
            generation = c.hello.generation,
            reason = %refuse.reason,
            "refused a primary: {}",
            refuse.detail
        );
        let _ = c.writer.send(&Message::Refuse(refuse));
    }

    /// Runs one session to its end and acts on how it ended; a superseding candidate is
    /// returned to be admitted next.
    fn run_session(
        &mut self,
        mut s: Session,
        control: &Receiver<BackupRequest>,
        stop: &AtomicBool,
    ) -> Option<Candidate> {
        let end = self.serve(&mut s, control, stop);
        let committed = self.has_committed();
        let committed_epoch = self.replica.as_ref().and_then(Replica::committed_epoch);
        let stalled = s
            .heartbeats
            .recent_stall(SELF_STALL, STALL_MEMORY)
            .is_some();
        s.heartbeats.stop();
        self.stats.bytes_received += s.reader.wire_bytes();
        self.stats.session_bytes = 0;
        self.session = None;
        let kind = end.kind();
        if kind == EndKind::Abandoned {
            // Tell a live primary why, or it would wait for its timeout to find out.
            s.writer.send_goodbye(
                Goodbye::new(
                    GoodbyeReason::Abandon,
                    format!("the backup ends the session: {end}"),
                ),
                GOODBYE_PATIENCE,
            );
        }
        let decision = takeover::decide(kind, committed, stalled);
        if matches!(decision, Decision::TakeOver | Decision::Grace) {
            // Kept open to tell a primary that was only stalled to stand down, once the
            // takeover is certain (`take_over`).
            self.takeover_writer = Some(s.writer.clone());
        } else {
            s.writer.shutdown(std::net::Shutdown::Both);
        }
        let end_msg = end.to_string();
        let full = twin_vmm::describe_error(&end);
        let next = match end {
            SessionEnd::Superseded(c) => Some(*c),
            _ => None,
        };
        match decision {
            Decision::Stop => {}
            Decision::TakeOver => {
                self.detected = Some(Instant::now());
                match kind {
                    EndKind::Goodbye(GoodbyeReason::Handover) => {
                        warn!("the primary cannot go on and hands the VM over; taking over")
                    }
                    EndKind::TakeoverRequested => info!("planned switchover: taking over"),
                    _ => warn!("{end_msg}: primary presumed dead, taking over"),
                }
            }
            Decision::Grace => {
                self.detected = Some(Instant::now());
                warn!(
                    grace_ms = takeover::STALL_GRACE.as_millis() as u64,
                    "{end_msg} right after this backup was stalled; waiting for the primary to reconnect before any takeover"
                );
            }
            Decision::Release => {
                info!("{end_msg}; no takeover");
                // A primary that stopped on purpose keeps no replica alive, and the next
                // VM may be another.
                self.replica = None;
                self.pin = None;
            }
            Decision::Detach if committed => {
                warn!("{full}; replica detached (no takeover), waiting for the primary to resynchronise");
                if let Some(r) = self.replica.as_mut() {
                    r.committed = None;
                }
            }
            Decision::Detach => {
                warn!("{full}; no committed checkpoint, waiting for a primary")
            }
        }
        self.standby = self.standby.next(
            StandbyEvent::Decided(decision),
            Instant::now(),
            self.arbiter(),
        );
        self.cfg.events.emit(EventKind::SessionEnded {
            reason: full.clone(),
            decision,
            committed_epoch,
        });
        self.stats.last_error = Some(full);
        self.state = self.idle_state();
        next
    }

    /// Handshake done: VM description, sync and epochs until the session ends.
    fn serve(
        &mut self,
        s: &mut Session,
        control: &Receiver<BackupRequest>,
        stop: &AtomicBool,
    ) -> SessionEnd {
        let timeout = self.cfg.heartbeat_timeout;
        let hb = self.cfg.heartbeat_interval;
        loop {
            if stop.load(Ordering::Acquire) {
                return SessionEnd::Stopping;
            }
            self.stats.session_bytes = s.reader.wire_bytes();
            while let Ok(req) = control.try_recv() {
                match req {
                    BackupRequest::Status(reply) => reply(self.status()),
                    BackupRequest::Failover(reply) => {
                        if self.has_committed() {
                            // The primary is told to stand down (`take_over`) before we run
                            // its VM.
                            self.takeover_reply = Some(reply);
                            return SessionEnd::TakeoverRequested;
                        }
                        reply(Err("no committed checkpoint to take over from".into()));
                    }
                }
            }
            while let Ok(c) = self.acceptor.rx.try_recv() {
                if let Some(end) = self.candidate_during_session(s, c) {
                    return end;
                }
            }
            let since_rx = s.reader.last_rx().elapsed();
            let wait = hb.min(timeout.saturating_sub(since_rx));
            let wait = if wait.is_zero() { hb } else { wait };
            let msg = match s.reader.poll(wait) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    let committed = self.has_committed();
                    let limit = if committed {
                        timeout
                    } else {
                        timeout.max(SYNC_SILENCE_LIMIT)
                    };
                    if s.reader.last_rx().elapsed() <= limit {
                        continue;
                    }
                    return SessionEnd::Silent(limit);
                }
                Err(e) => return SessionEnd::from_recv(e),
            };
            if matches!(msg, Message::EpochBegin(_)) {
                twin_failpoints::hit("backup.mid_receive");
            }
            let phase = s.phase.take().expect("a phase between messages");
            // Delta pages decode against the replica as committed (nothing is written to
            // it while an epoch is open); before the description there is none.
            let base: &dyn twin_wire::BasePages = match &self.replica {
                Some(r) => r,
                None => &NoReplica,
            };
            let (phase, step) = match phase.on_with(msg, PAGE_SIZE as u32, base) {
                Ok(next) => next,
                Err(e) => {
                    if matches!(e, PhaseEnd::Epoch(_)) {
                        // The partial epoch is gone; the replica is untouched.
                        self.stats.epochs_rejected += 1;
                    }
                    return SessionEnd::Phase(e);
                }
            };
            s.phase = Some(phase);
            if let Err(end) = self.step(s, step) {
                return end;
            }
        }
    }

    /// A `Hello` that arrives while a session runs: a newer generation of the same VM
    /// replaces the session (its primary has left it); anything else is refused.
    fn candidate_during_session(&mut self, s: &Session, c: Candidate) -> Option<SessionEnd> {
        if c.hello.vm_id != s.vm_id {
            let detail = format!("this backup is replicating VM {}", s.vm_id);
            self.refuse(
                &c,
                Refuse {
                    reason: RefuseReason::Busy,
                    detail,
                },
            );
            return None;
        }
        let policy = AcceptPolicy {
            vm_id: Some(s.vm_id),
            min_generation: s.generation + 1,
        };
        match handshake::accept_hello(&policy, &c.hello) {
            Ok(_) => {
                info!(
                    old = s.generation,
                    new = c.hello.generation,
                    "the primary started a new session; ending the old one"
                );
                s.writer.send_goodbye(
                    Goodbye::new(GoodbyeReason::Abandon, "superseded by a newer session"),
                    GOODBYE_PATIENCE,
                );
                Some(SessionEnd::Superseded(Box::new(c)))
            }
            Err(refuse) => {
                self.refuse(&c, refuse);
                None
            }
        }
    }

    /// Does what a message asked of the replica.
    fn step(&mut self, s: &Session, step: Step) -> Result<(), SessionEnd> {
        match step {
            Step::None => Ok(()),
            Step::Describe(d) => {
                // The old replica is superseded before its files are emptied for this one:
                // it must not stay a failover image on files that are no longer it.
                self.replica = None;
                let memory = match &self.cfg.replica_dir {
                    Some(dir) => ReplicaMemory::Store(
                        twin_store::Store::create(dir, d.mem_size, self.cfg.replica_memory)
                            .map_err(|e| {
                                SessionEnd::Replica(format!(
                                    "cannot hold a replica of {} bytes: {}",
                                    d.mem_size,
                                    twin_vmm::describe_error(&e)
                                ))
                            })?,
                    ),
                    None => {
                        replica::check_room(d.mem_size)
                            .map_err(|e| SessionEnd::Replica(e.to_string()))?;
                        ReplicaMemory::Ram(Memory::new(d.mem_size).map_err(|e| {
                            SessionEnd::Replica(format!(
                                "cannot hold a replica of {} bytes: {}",
                                d.mem_size,
                                twin_vmm::describe_error(&e)
                            ))
                        })?)
                    }
                };
                let disks = replica::create_disks(self.cfg.replica_dir.as_deref(), &d.disks)
                    .map_err(|e| SessionEnd::Replica(twin_vmm::describe_error(&e)))?;
                // A new session always resynchronises; the old replica is superseded.
                self.replica = Some(Replica {
                    memory,
                    disks,
                    vm_id: s.vm_id,
                    generation: s.generation,
                    committed: None,
                    mac: d.mac,
                    inbound: Default::default(),
                });
                self.state = BackupState::Syncing;
                info!(
                    mem = d.mem_size,
                    vcpus = d.vcpus,
                    "replica allocated, initial sync"
                );
                self.cfg.events.emit(EventKind::ReplicaAllocated {
                    mem_size: d.mem_size,
                });
                Ok(())
            }
            Step::SyncPages(p) => {
                let r = self.replica.as_ref().expect("described before sync");
                for page in &p.pages {
                    // Indices were range-checked by the sync tracker.
                    r.memory
                        .write_page(page.index, &page.data, 0)
                        .map_err(|e| SessionEnd::Replica(twin_vmm::describe_error(&e)))?;
                }
                Ok(())
            }
            Step::SyncZeroPages(z) => {
                let r = self.replica.as_ref().expect("described before sync");
                r.memory
                    .zero_pages(&z.indices)
                    .map_err(|e| SessionEnd::Replica(twin_vmm::describe_error(&e)))
            }
            Step::SyncDisk(d) => {
                let r = self.replica.as_ref().expect("described before sync");
                // Disk index and range were checked by the phase.
                r.disks[d.disk as usize]
                    .write(d.offset, &d.data)
                    .map_err(|e| SessionEnd::Replica(twin_vmm::describe_error(&e)))
            }
            Step::SyncDone => {
                // The copy is durable before any epoch is acknowledged on top of it.
                let r = self.replica.as_ref().expect("described before sync");
                for disk in &r.disks {
                    disk.flush()
                        .map_err(|e| SessionEnd::Replica(twin_vmm::describe_error(&e)))?;
                }
                self.state = BackupState::Synced;
                info!("initial sync complete");
                self.cfg.events.emit(EventKind::SyncComplete);
                Ok(())
            }
            Step::Commit(epoch) => self.apply(s, epoch),
            Step::Inbound(f) => {
                if let Some(r) = self.replica.as_mut() {
                    let committed = r.committed_epoch();
                    r.inbound.push(f, committed);
                }
                Ok(())
            }
        }
    }

    /// Applies a whole, verified epoch to the replica and acknowledges it.
    fn apply(&mut self, s: &Session, epoch: CompleteEpoch) -> Result<(), SessionEnd> {
        let t0 = Instant::now();
        // Decode and check the state before touching memory: a state that does not decode
        // must not leave the replica with new pages and old state.
        let state = MachineState::decode(&epoch.state).map_err(|e| {
            self.stats.epochs_rejected += 1;
            SessionEnd::BadEpoch {
                epoch: epoch.epoch,
                what: format!(
                    "its state does not decode: {}",
                    twin_vmm::describe_error(&e)
                ),
            }
        })?;
        let r = self.replica.as_mut().expect("described before epochs");
        if state.config.mem_size != r.memory.size() {
            self.stats.epochs_rejected += 1;
            return Err(SessionEnd::BadEpoch {
                epoch: epoch.epoch,
                what: format!(
                    "its state is for {} bytes of RAM, the replica has {}",
                    state.config.mem_size,
                    r.memory.size()
                ),
            });
        }
        if state.config.disks.len() != r.disks.len()
            || state
                .config
                .disks
                .iter()
                .zip(&r.disks)
                .any(|(d, rd)| d.capacity != rd.capacity)
        {
            self.stats.epochs_rejected += 1;
            return Err(SessionEnd::BadEpoch {
                epoch: epoch.epoch,
                what: format!(
                    "its state has {} disks of other sizes than the {} described",
                    state.config.disks.len(),
                    r.disks.len()
                ),
            });
        }
        if let ReplicaMemory::Store(st) = &r.memory {
            // Until the commit below the store on disk mixes two epochs.
            st.begin(epoch.epoch);
        }
        // The disks first, in order, then flushed: durable before the ack below. A failure
        // ends the session (the primary follows its --on-backup-loss policy); this epoch
        // is not acknowledged, and the replica is no failover image any more.
        let writes: usize = epoch.disk_writes.iter().map(|w| w.writes.len()).sum();
        let mut applied = 0usize;
        let mut touched = vec![false; r.disks.len()];
        for w in &epoch.disk_writes {
            let disk = &r.disks[w.disk as usize];
            touched[w.disk as usize] = true;
            for e in &w.writes {
                if applied == writes / 2 {
                    twin_failpoints::hit("backup.mid_disk_apply");
                }
                if let Err(e) = disk.apply(e) {
                    r.committed = None;
                    return Err(SessionEnd::Replica(twin_vmm::describe_error(&e)));
                }
                applied += 1;
            }
        }
        for (disk, _) in r.disks.iter().zip(&touched).filter(|(_, t)| **t) {
            if let Err(e) = disk.flush() {
                r.committed = None;
                return Err(SessionEnd::Replica(twin_vmm::describe_error(&e)));
            }
        }
        let half = epoch.pages.len() / 2;
        for (i, page) in epoch.pages.iter().enumerate() {
            if i == half {
                twin_failpoints::hit("backup.mid_apply");
            }
            // Indices were range-checked by the assembler.
            if let Err(e) = r.memory.write_page(page.index, &page.data, epoch.epoch) {
                r.committed = None;
                return Err(SessionEnd::Replica(twin_vmm::describe_error(&e)));
            }
        }
        if let ReplicaMemory::Store(st) = &r.memory {
            let committed = twin_store::StoreState {
                epoch: epoch.epoch,
                vm_id: s.vm_id.0,
                generation: s.generation,
                mac: r.mac,
                machine: epoch.state.to_vec(),
            };
            if let Err(e) = st.commit(&committed) {
                r.committed = None;
                return Err(SessionEnd::Replica(twin_vmm::describe_error(&e)));
            }
        }
        r.committed = Some((epoch.epoch, state));
        r.inbound.commit(epoch.epoch);
        if self.pin.is_none() {
            // From its first commit on, this backup stands for this VM only.
            self.pin = Some(Pin {
                vm_id: s.vm_id,
                min_generation: s.generation + 1,
            });
        }
        s.committed.store(epoch.epoch, Ordering::Release);
        let us = t0.elapsed().as_secs_f64() * 1e6;
        self.stats.epochs_applied += 1;
        self.stats.last_apply_us = us;
        self.stats.apply_us_max = self.stats.apply_us_max.max(us);
        self.state = BackupState::Replicating;
        debug!(
            epoch = epoch.epoch,
            pages = epoch.pages.len(),
            apply_us = us as u64,
            "epoch committed"
        );
        self.cfg.events.emit(EventKind::EpochCommitted {
            epoch: epoch.epoch,
            pages: epoch.pages.len() as u64,
            apply_us: us,
        });
        if twin_failpoints::hit("backup.before_ack") {
            // Withheld: the primary keeps this epoch's output held.
            return Ok(());
        }
        if !self.knows_the_record(s) {
            // Without the record no takeover could be claimed: an ack would promise a
            // protection this backup cannot give. Later epochs' acks cover this one.
            return Ok(());
        }
        s.writer
            .send(&Message::Ack(Ack { epoch: epoch.epoch }))
            .map_err(SessionEnd::Send)
    }

    /// Runs the VM from the replica and reports to whoever asked for the takeover.
    fn take_over(&mut self, console: impl FnOnce() -> ConsoleOut) -> Result<Outcome, BackupError> {
        self.state = BackupState::TakingOver;
        if let Some(w) = self.takeover_writer.take() {
            // Silence is not proof of death: a primary that was only stalled finds this
            // when it runs again and stands down (fences its output) instead of running on
            // beside the VM taken over here.
            w.send_goodbye(
                Goodbye::new(GoodbyeReason::Takeover, "this backup takes over the VM"),
                GOODBYE_PATIENCE,
            );
            w.shutdown(std::net::Shutdown::Both);
        }
        let detected = self.detected.unwrap_or_else(Instant::now);
        let r = self.failover(detected, console);
        self.cfg.events.emit(match &r {
            Ok((_, report, _)) => EventKind::FailoverComplete(report.clone()),
            Err(e) => EventKind::FailoverFailed {
                error: twin_vmm::describe_error(e),
            },
        });
        if let Some(reply) = self.takeover_reply.take() {
            reply(match &r {
                Ok((_, report, _)) => Ok(report.clone()),
                Err(e) => Err(e.to_string()),
            });
        }
        let won = self.won.take();
        r.map(|(vmm, report, vm_id)| Outcome::FailedOver {
            vmm,
            report,
            vm_id,
            arbiter_seen: won,
        })
    }

    /// Runs the VM from the replica. `detected` is when the primary was declared lost.
    fn failover(
        &mut self,
        detected: Instant,
        console: impl FnOnce() -> ConsoleOut,
    ) -> Result<(Vmm, FailoverReport, VmId), BackupError> {
        let mut replica = self.replica.take().expect("failover needs a replica");
        let replay = replica
            .committed_epoch()
            .map(|e| replica.inbound.take_after(e))
            .unwrap_or_default();
        let (epoch, state) = replica.committed.expect("failover needs a committed state");
        info!(epoch, vm = %replica.vm_id, generation = replica.generation, "failover: restoring the VM from the replica");
        self.cfg.events.emit(EventKind::FailoverStarted { epoch });
        let t_restore = Instant::now();
        let tap = self
            .tap
            .take()
            .expect("the backup holds its TAP until a takeover");
        // Frames that reached the standby TAP were meant for the old primary's guest.
        let stale = tap.drain();
        // The VM runs on the disk replicas: exactly the disks as of the committed epoch.
        let disks = replica
            .disks
            .iter()
            .zip(&state.config.disks)
            .enumerate()
            .map(|(index, (d, spec))| {
                twin_vmm::devices::virtio::blk::disk::DiskImage::open(&d.path, spec.read_only)
                    .map(Arc::new)
                    .map_err(|source| BackupError::Restore(VmmError::Disk { index, source }))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let host = HostResources {
            tap: Some(tap),
            console: console(),
            disks,
        };
        let mut vmm = match replica.memory {
            // The replica memory becomes the VM's RAM as it is: nothing is copied or loaded.
            ReplicaMemory::Ram(memory) => {
                Vmm::restore(&state, memory, host).map_err(BackupError::Restore)?
            }
            // The VM runs at once on fresh RAM; its pages come from the store as it touches
            // them, the working set (most recently written first) loaded ahead of it.
            ReplicaMemory::Store(store) => {
                let memory = Memory::new(state.config.mem_size)
                    .map_err(|e| BackupError::Restore(e.into()))?;
                let source = Arc::new(store.source());
                // Where memory is short (a backup in a memory cgroup) the prefetcher loads
                // what fits, most recently written first; the rest comes when touched.
                let budget = replica::room().map(|r| r.saturating_sub(replica::OVERHEAD));
                let loader = twin_vmm::lazy::Loader::start_within(
                    &memory,
                    source.clone(),
                    twin_vmm::lazy::RestoreMode::Ws,
                    budget,
                )
                .map_err(BackupError::Load)?;
                loader.on_complete(Box::new(move |touched| {
                    source.record_first_touches(&touched)
                }));
                let mut vmm = Vmm::restore(&state, memory, host).map_err(BackupError::Restore)?;
                vmm.attach_loader(loader);
                vmm
            }
        };
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
        // What the primary's guest received after the committed epoch, first in line.
        let replayed = replay.len();
        vmm.inject_frames(replay);
        vmm.start().map_err(BackupError::Start)?;
        // Tell the guest it moved: it announces itself too and retransmits what its peers
        // never acknowledged (output of the epoch that died with the primary) at once.
        vmm.notify_network_moved();
        let total_ms = detected.elapsed().as_secs_f64() * 1e3;
        info!(
            epoch,
            restore_ms = format_args!("{restore_ms:.2}"),
            announce_ms = format_args!("{announce_ms:.2}"),
            total_ms = format_args!("{total_ms:.2}"),
            replayed,
            "failover complete: the VM runs on this host"
        );
        Ok((
            vmm,
            FailoverReport {
                epoch,
                restore_ms,
                announce_ms,
                stale_frames_dropped: stale,
                replayed_frames: replayed,
                detect_to_running_ms: total_ms,
            },
            replica.vm_id,
        ))
    }
}
