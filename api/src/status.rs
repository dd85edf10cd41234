//! `twin status` of each kind of process, as typed structures (the JSON is their serde form).

use serde::{Deserialize, Serialize};

/// The primary's mode (`twin-primary` moves it with one pure transition function).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Looking for its first backup (output held as epoch 1 meanwhile).
    Connecting,
    /// Initial sync to a backup.
    Syncing,
    /// A backup acknowledged a checkpoint of this session: output flows as it commits.
    Protected,
    /// The backup is lost and output flows unprotected (`--on-backup-loss release`).
    Unprotected,
    /// The backup is lost and output is held until one returns (`--on-backup-loss hold`).
    HoldingOutput,
    /// The backup took over: this primary discarded its unacknowledged output and must stop
    /// its VM. Final.
    Fenced,
    /// Replication ended. Final.
    Stopped,
}

/// What to do with held output when the backup is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossPolicy {
    /// Release held output and keep running unprotected (availability first).
    Release,
    /// Keep holding output until a backup returns (no unprotected output ever).
    Hold,
}

/// How the primary encodes the pages of its checkpoints (`twin protect --compress`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Every page raw, as before protocol 4.
    None,
    /// Each page LZ4-compressed when that makes it smaller.
    Lz4,
    /// Each page as a delta against the copy the primary last sent of it (a bounded cache),
    /// else LZ4, else raw: whichever is smallest.
    #[default]
    Delta,
}

/// What compression did, over every session.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompressionStatus {
    pub mode: Compression,
    /// The delta cache's size, bytes (0 unless `delta`).
    pub cache_bytes: u64,
    /// Pages sent raw, LZ4, as a delta.
    pub raw_pages: u64,
    pub lz4_pages: u64,
    pub delta_pages: u64,
    /// Bytes of the dirty pages sent (a page each) and bytes of their frames on the wire.
    pub page_bytes_in: u64,
    pub page_bytes_out: u64,
    /// CPU time of encoding (the replication thread and its helpers), µs per MiB in.
    pub encode_cpu_us_per_mib: f64,
}

/// A median and a 99th percentile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    pub median: f64,
    pub p99: f64,
}

/// A median and a 99th percentile of a count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub median: u64,
    pub p99: u64,
}

/// Where a checkpoint's pause goes, medians in µs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PauseSplit {
    pub stop_vcpus: f64,
    pub capture_state: f64,
    pub harvest_dirty: f64,
    pub copy_pages: f64,
}

/// Release latency of held output, µs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReleaseLatency {
    pub median: Option<f64>,
    pub p99: Option<f64>,
    pub max: f64,
}

/// The output-commit buffer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeldOutput {
    pub frames: usize,
    pub bytes: usize,
    /// The buffer's mode (`Protected`, `Unprotected`, `Fenced`, …).
    pub mode: String,
    pub released_frames: u64,
    pub dropped_frames: u64,
    pub release_latency_us: ReleaseLatency,
}

/// The last initial sync.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncSummary {
    pub pages: u64,
    pub zero_pages: u64,
    pub dirty_rounds: Vec<usize>,
    pub ms: f64,
}

/// The arbiter as a process sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArbiterStatus {
    pub endpoints: String,
    /// The ownership record's generation as last seen (0: not read yet).
    pub generation: u64,
    /// Its owner's label, as last seen.
    pub owner: Option<String>,
    /// Whether this process is the owner.
    pub owned_here: bool,
}

/// `twin status` of `twin protect`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrimaryStatus {
    pub role: String,
    /// Whether a backup holds every checkpoint the world's output depends on.
    pub protected: bool,
    /// Why not, when not.
    pub why_not: Option<String>,
    pub mode: Mode,
    pub backup: String,
    pub authenticated: bool,
    pub encrypted: bool,
    pub interval_ms: f64,
    pub on_backup_loss: LossPolicy,
    pub sessions: u64,
    /// Last sealed (checkpointed) epoch.
    pub epoch: u64,
    pub acked_epoch: Option<u64>,
    pub backup_lag_epochs: u64,
    pub checkpoints: u64,
    /// Checkpoints taken early because output was waiting (eager output commit).
    pub eager_checkpoints: u64,
    pub eager_gap_ms: Option<f64>,
    pub checkpoint_rate_hz: f64,
    /// Epochs that started late because the previous send outlasted the interval.
    pub stretched_epochs: u64,
    /// Dirty pages not sent because the backup already held their contents (hot pages the
    /// guest did not change in that epoch), over every session.
    #[serde(default)]
    pub unchanged_pages: u64,
    pub pause_us: Quantiles,
    pub pause_split_us_median: PauseSplit,
    pub epoch_bytes: Counts,
    pub dirty_pages: Counts,
    pub ack_latency_us: Quantiles,
    pub held_output: HeldOutput,
    pub last_sync: Option<SyncSummary>,
    pub last_error: Option<String>,
    pub protected_for_s: Option<f64>,
    /// With `--arbiter`.
    pub arbiter: Option<ArbiterStatus>,
    #[serde(default)]
    pub compression: CompressionStatus,
}

/// Where a backup is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupState {
    /// No session and no failover image.
    Waiting,
    /// A session was admitted; its VM description comes next.
    Describing,
    Syncing,
    /// Synced, no epoch committed yet.
    Synced,
    /// Committed epochs: a failover image.
    Replicating,
    /// A replica that is not a failover image, pinned to its VM until it resynchronises.
    Detached,
    /// A committed replica whose primary was lost right after this backup stalled.
    Grace,
    /// Ready to take over, waiting for the arbiter to grant it.
    Claiming,
    TakingOver,
}

/// The session a backup serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStatus {
    pub peer: String,
    pub vm: String,
    pub generation: u64,
    pub authenticated: bool,
    pub encrypted: bool,
}

/// `twin status` of `twin backup` (until it takes over).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackupStatus {
    pub role: String,
    pub state: BackupState,
    pub listen: String,
    /// Whether this backup requires authenticated primaries (`--key-file`).
    pub requires_key: bool,
    pub session: Option<SessionStatus>,
    /// The VM this backup is pinned to.
    pub pinned_vm: Option<String>,
    pub sessions: u64,
    /// Primaries refused after their `Hello` (another VM, an old generation, busy).
    pub refused: u64,
    pub committed_epoch: Option<u64>,
    pub epochs_applied: u64,
    pub epochs_rejected: u64,
    pub last_apply_us: f64,
    pub apply_us_max: f64,
    pub bytes_received: u64,
    pub mem_size: Option<u64>,
    pub last_error: Option<String>,
}

/// `twin status` of a VM without a backup (`twin run`, `twin restore`, a backup that took
/// over).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    pub role: String,
    pub pid: u32,
    /// `running` or `paused`.
    pub vm: String,
    pub mem_size: u64,
    pub vcpus: u32,
    pub uptime_s: f64,
    pub snapshots: u64,
    /// A backup that took over with `--arbiter`: the record it won.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arbiter: Option<ArbiterStatus>,
    /// A VM restored lazily (`twin restore`, a failover from a replica store): how far
    /// loading its memory is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreStatus>,
}

/// Progress of loading a restored VM's memory.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoreStatus {
    /// `eager`, `lazy` or `ws`.
    pub mode: String,
    /// Pages with data in the image (zero pages are never loaded).
    pub data_pages: u64,
    /// Of those, resident.
    pub resident: u64,
    /// Pages still to load.
    pub remaining: u64,
    /// Faults served from the image (the guest waited for each).
    pub faults: u64,
    pub zero_faults: u64,
    /// Pages loaded before the guest asked.
    pub prefetched: u64,
    pub bytes_read: u64,
    pub complete: bool,
    pub elapsed_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
