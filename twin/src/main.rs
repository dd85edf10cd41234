//! `twin`: Remus-style high availability for KVM virtual machines.

mod config;
mod lab;
mod notify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use twin_vmm::memory::Memory;
use twin_vmm::snapshot;
use twin_vmm::{HostResources, NetConfig, SnapshotOptions, VmConfig, VmEvent, Vmm};

use twin::args::{self, Cidr, Mac, Size};
use twin::control::{self, Control, Reply, Request, Response};
use twin::signals::Termination;
use twin_api::{ErrorCode, EventKind, EventLog, ProtectRequest, Role as ApiRole, SnapshotRequest};

#[derive(Parser)]
#[command(
    name = "twin",
    version,
    about = "Remus-style high availability for KVM virtual machines",
    // A `--config` file's values come first on the command line; the user's flags after
    // them override them.
    args_override_self = true
)]
struct Cli {
    /// Read this subcommand's flags from a TOML file (keys are the long flag names; flags
    /// on the command line override it). See contrib/twin.example.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a VM with the built-in guest, unprotected.
    Run(RunArgs),
    /// Snapshot a running VM into a directory (through its control socket).
    Snapshot(SnapshotArgs),
    /// Start a VM from a snapshot directory.
    Restore(RestoreArgs),
    /// Start N clones of one snapshot, each with its own TAP, MAC and IPv4 address, sharing
    /// the snapshot's unmodified pages copy-on-write.
    ///
    /// Each clone is a `twin restore --share-memory` process of its own (own control
    /// socket, own TAP: a clone that crashes takes no other with it); this process starts
    /// them, prints a JSON report once every clone runs (time taken, memory each costs),
    /// and then stays as their supervisor: a termination signal stops them all, and it
    /// exits once every clone has exited.
    Clone(CloneArgs),
    /// Show the state of a running VM process.
    Status(StatusArgs),
    /// Pause a running VM (not a protected one).
    Pause(ControlArgs),
    /// Resume a VM left paused by `pause`, `snapshot --stop` or `restore --paused`.
    Resume(ControlArgs),
    /// Run a VM protected by a backup: checkpoints every epoch, output held until acked.
    ///
    /// Without --tap, puts the VM already running behind --control (`twin run`, `twin
    /// restore`) under protection instead, as `xl remus` does: a live initial sync, then
    /// epochs; it returns once the VM is protected.
    Protect(ProtectArgs),
    /// Keep a replica of a protected VM and take over when its primary dies.
    Backup(BackupArgs),
    /// Planned switchover: make the backup take over and the primary stand down.
    Failover(FailoverArgs),
    /// Demonstrate a failover on this machine: namespaces, primary, backup, client, SIGKILL.
    ///
    /// Runs `twin-lab demo` (`twin demo --help` for its options).
    #[command(disable_help_flag = true)]
    Demo(lab::LabArgs),
    /// Measure protected against unprotected runs and write a report.
    ///
    /// Runs `twin-lab bench` (`twin bench --help` for its options).
    #[command(disable_help_flag = true)]
    Bench(lab::LabArgs),
    /// Write a new replication key (give the same file to the primary and its backup).
    Keygen(KeygenArgs),
    /// Print a VM process's typed events (JSON, one per line), optionally following them.
    Events(EventsArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Print the man page (roff), e.g. `twin man > twin.1`.
    Man,
}

#[derive(Args)]
struct CompletionsArgs {
    shell: clap_complete::Shell,
}

/// The control socket of a running process.
#[derive(Args)]
struct ControlArgs {
    /// Control socket of the VM process.
    #[arg(long, default_value = "/run/twin/twin.sock", value_parser = args::control_path)]
    control: PathBuf,
}

#[derive(Args)]
struct EventsArgs {
    /// Control socket of the process.
    #[arg(long, default_value = "/run/twin/twin.sock", value_parser = args::control_path)]
    control: PathBuf,
    /// Only events from this sequence number on.
    #[arg(long, default_value_t = 0)]
    since: u64,
    /// Include the per-epoch events (checkpoint sent, epoch committed).
    #[arg(long)]
    epochs: bool,
    /// Keep printing events as they happen.
    #[arg(long, short)]
    follow: bool,
}

/// The arbiter, shared by `protect` and `backup`.
#[derive(Args, Clone)]
struct ArbiterArgs {
    /// etcd cluster that decides who owns the VM when primary and backup lose each other
    /// (`etcd://HOST:PORT[,HOST:PORT…]`): a takeover, and a primary running on alone, need
    /// its grant, so two copies never answer. Unreachable, nobody decides: the backup does
    /// not take over and a primary that lost its backup holds its output.
    #[arg(long, env = "TWIN_ARBITER")]
    arbiter: Option<String>,
}

impl ArbiterArgs {
    fn arbitration(&self, label: String) -> Result<Option<twin_arbiter::Arbitration>> {
        self.arbiter
            .as_deref()
            .map(|url| {
                Ok(twin_arbiter::Arbitration {
                    client: twin_arbiter::Arbiter::new(url)?,
                    me: twin_arbiter::incarnation(&label),
                })
            })
            .transpose()
    }
}

/// Authentication of the replication link, shared by `protect` and `backup`.
#[derive(Args, Clone)]
struct AuthArgs {
    /// Pre-shared key of the replication link (`twin keygen FILE` writes one; both hosts
    /// need the same file, readable by its owner only).
    #[arg(long, env = "TWIN_KEY_FILE", required_unless_present = "no_auth")]
    key_file: Option<PathBuf>,
    /// Run the replication link unauthenticated: anyone who reaches the port can replace
    /// the backup's replica or stop the primary's VM.
    #[arg(long, conflicts_with = "key_file")]
    no_auth: bool,
    /// Encrypt the replication stream (AES-256-GCM; needs --key-file). Either side asking
    /// is enough.
    #[arg(long, conflicts_with = "no_auth")]
    encrypt: bool,
}

impl AuthArgs {
    fn link(&self) -> Result<twin_link::LinkConfig> {
        match &self.key_file {
            Some(path) if !self.no_auth => {
                let key = twin_link::Key::load(path)?;
                Ok(twin_link::LinkConfig::with_key(key, self.encrypt))
            }
            _ => Ok(twin_link::LinkConfig::insecure()),
        }
    }
}

#[derive(Args)]
struct KeygenArgs {
    /// File to create (never overwritten), mode 0600.
    file: PathBuf,
}

#[derive(Args)]
struct ProtectArgs {
    /// The backup's replication address, HOST:PORT.
    #[arg(long, value_parser = args::host_port)]
    backup: String,
    /// Checkpoint interval: the longest an epoch lasts.
    #[arg(long, default_value = "25ms")]
    interval: args::Millis,
    /// Eager output commit: when the guest has output waiting, checkpoint as soon as this
    /// long has passed since the previous checkpoint (replies wait ~1 ms, not an interval).
    #[arg(long, default_value = "2ms")]
    eager_gap: args::Millis,
    /// Checkpoint on the interval only, as classic Remus does.
    #[arg(long)]
    no_eager: bool,
    /// Copy every dirty page inside the pause (no pre-copy while the guest runs first): the
    /// pause then grows with the pages the guest dirtied in the epoch.
    #[arg(long)]
    no_precopy: bool,
    /// What to do with held output when the backup is lost: release it and run
    /// unprotected, or hold it until a backup returns.
    #[arg(long, value_enum, default_value_t = LossArg::Release)]
    on_backup_loss: LossArg,
    /// Silence from the backup longer than this means it is lost.
    #[arg(long, default_value = "500ms")]
    backup_timeout: args::Millis,
    /// How checkpoint pages travel: `delta` sends each page as a delta against the copy
    /// last sent of it (while it is in the cache), LZ4, or raw, whichever is smallest;
    /// `lz4` LZ4 or raw; `none` raw (as before). Encoded on the replication thread after
    /// the guest resumed, never inside the pause.
    #[arg(long, value_enum, default_value_t = CompressArg::Delta)]
    compress: CompressArg,
    /// Size of the delta cache (what was last sent of each page, most recently used first).
    #[arg(long, default_value = "64M")]
    compress_cache: Size,
    #[command(flatten)]
    auth: AuthArgs,
    #[command(flatten)]
    arbiter: ArbiterArgs,
    #[command(flatten)]
    vm: VmArgs,
    /// TAP device backing the guest NIC of the VM to start. Without it, the VM already
    /// running behind --control is protected.
    #[arg(long, value_parser = args::tap_device)]
    tap: Option<String>,
    /// Write the guest console to this file instead of standard output.
    #[arg(long, requires = "tap")]
    console: Option<PathBuf>,
    /// Control socket of the VM process (the one started, or the running one to protect).
    #[arg(long, default_value = "/run/twin/twin.sock", value_parser = args::control_path)]
    control: PathBuf,
    /// Serve Prometheus metrics over HTTP on ADDR:PORT (`/metrics`).
    #[arg(long, requires = "tap")]
    metrics: Option<std::net::SocketAddr>,
}

impl ProtectArgs {
    /// The host resources of a VM to start, when --tap says to start one.
    fn host(&self) -> Option<HostArgs> {
        Some(HostArgs {
            tap: self.tap.clone()?,
            console: self.console.clone(),
            control: self.control.clone(),
            metrics: self.metrics,
        })
    }

    /// The request that protects a running VM as these flags say.
    fn request(&self) -> Result<ProtectRequest> {
        let absolute = |p: &Path| {
            std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))
        };
        Ok(ProtectRequest {
            backup: self.backup.clone(),
            key_file: self.auth.key_file.as_deref().map(absolute).transpose()?,
            no_auth: self.auth.no_auth,
            encrypt: self.auth.encrypt,
            interval_ms: self.interval.0.as_secs_f64() * 1e3,
            eager_gap_ms: (!self.no_eager).then_some(self.eager_gap.0.as_secs_f64() * 1e3),
            precopy: !self.no_precopy,
            on_backup_loss: match self.on_backup_loss {
                LossArg::Release => twin_api::LossPolicy::Release,
                LossArg::Hold => twin_api::LossPolicy::Hold,
            },
            backup_timeout_ms: self.backup_timeout.0.as_secs_f64() * 1e3,
            arbiter: self.arbiter.arbiter.clone(),
            compress: match self.compress {
                CompressArg::None => twin_api::Compression::None,
                CompressArg::Lz4 => twin_api::Compression::Lz4,
                CompressArg::Delta => twin_api::Compression::Delta,
            },
            compress_cache: self.compress_cache.0,
        })
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CompressArg {
    None,
    Lz4,
    Delta,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LossArg {
    Release,
    Hold,
}

#[derive(Args)]
struct BackupArgs {
    /// Address to accept the primary's replication connection on, ADDR:PORT.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// TAP the VM gets when this host takes over.
    #[arg(long, value_parser = args::tap_device)]
    tap: String,
    /// Silence from the primary longer than this means it is dead.
    #[arg(long, default_value = "100ms")]
    heartbeat_timeout: args::Millis,
    /// Write the guest console (after a takeover) to this file instead of standard output.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Control socket of this process.
    #[arg(long, default_value = "/run/twin/backup.sock", value_parser = args::control_path)]
    control: PathBuf,
    /// Serve Prometheus metrics over HTTP on ADDR:PORT (`/metrics`).
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    #[command(flatten)]
    auth: AuthArgs,
    #[command(flatten)]
    arbiter: ArbiterArgs,
    /// Keep the replica on disk here: the VM's disks as `DIR/disk-<i>.img` (sparse,
    /// flushed as each epoch commits) and its memory as a replica store (`memory.img`,
    /// `pages.idx`, `state`), so the backup need not hold the VM's RAM; a takeover runs
    /// the VM on the disk replicas at once and loads its memory lazily, working set
    /// first. Needed for a VM with disks; without it the memory replica is kept in RAM.
    #[arg(long, value_name = "DIR")]
    replica_dir: Option<PathBuf>,
    /// With --replica-dir: how much of the replica's memory the backup keeps cached in RAM
    /// (the pages written most recently); the rest is written back and dropped from the
    /// cache. Default: what the kernel (and the memory cgroup) allow.
    #[arg(long, value_name = "SIZE", requires = "replica_dir")]
    replica_memory: Option<args::Size>,
    /// After a takeover, protect the VM again to this standby backup (`HOST:PORT`, or a
    /// comma-separated list tried in order): a live initial sync, then epochs, with the
    /// same key and arbiter.
    #[arg(long)]
    reprotect: Option<String>,
}

#[derive(Args)]
struct FailoverArgs {
    /// Control socket of the backup process.
    #[arg(long, default_value = "/run/twin/backup.sock", value_parser = args::control_path)]
    control: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    host: HostArgs,
}

/// Options describing the VM, shared by every command that creates one.
#[derive(Args, Clone)]
struct VmArgs {
    /// Guest RAM, e.g. 256M or 16G (a multiple of 2M, at most 64G; past 3G it continues
    /// above the MMIO hole, at 4G).
    #[arg(long, default_value = "256M", value_parser = args::guest_mem)]
    mem: Size,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    vcpus: u8,
    /// Guest MAC address.
    #[arg(long, default_value = "52:54:00:12:34:56")]
    mac: Mac,
    /// Guest IPv4 address and prefix.
    #[arg(long, default_value = "10.0.0.2/24")]
    ip: Cidr,
    /// Guest default gateway.
    #[arg(long)]
    gateway: Option<std::net::Ipv4Addr>,
    /// Arguments for the built-in guest, e.g. `dirty=64M/s,wss=128M`.
    #[arg(long, default_value = "")]
    guest_args: String,
    /// A disk: a raw image file (`PATH` or `PATH,readonly`), a virtio-blk device; repeat
    /// for more (the first is the guest's disk 0). Sparse images stay sparse.
    #[arg(long = "disk", value_name = "PATH[,readonly]")]
    disks: Vec<args::Disk>,
    /// Linux kernel (bzImage) to boot instead of the built-in guest: not supported yet, so
    /// hidden (given, it is refused).
    #[arg(long, hide = true)]
    kernel: Option<PathBuf>,
    /// initramfs for --kernel (not supported yet; hidden).
    #[arg(long, hide = true)]
    initrd: Option<PathBuf>,
    /// Developer option: a guest ELF following the built-in guest's boot contract, used
    /// instead of the embedded one.
    #[arg(long, hide = true)]
    guest_elf: Option<PathBuf>,
}

/// Host resources of the VM process: not part of the VM's saved state.
#[derive(Args, Clone)]
struct HostArgs {
    /// TAP device (must exist, e.g. `ip tuntap add tap0 mode tap`) backing the guest NIC.
    #[arg(long, value_parser = args::tap_device)]
    tap: String,
    /// Write the guest console to this file instead of standard output.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Control socket of this VM process.
    #[arg(long, default_value = "/run/twin/twin.sock", value_parser = args::control_path)]
    control: PathBuf,
    /// Serve Prometheus metrics over HTTP on ADDR:PORT (`/metrics`).
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
}

#[derive(Args)]
struct SnapshotArgs {
    /// Directory to create for the snapshot (a relative one is taken from the current
    /// directory).
    dir: PathBuf,
    /// Store only the pages written since the previous snapshot of this VM process.
    #[arg(long)]
    incremental: bool,
    /// Leave the VM paused after the snapshot (for moving it elsewhere).
    #[arg(long)]
    stop: bool,
    /// Control socket of the VM process.
    #[arg(long, default_value = "/run/twin/twin.sock", value_parser = args::control_path)]
    control: PathBuf,
}

#[derive(Args)]
struct RestoreArgs {
    /// Snapshot directory (the top layer of a chain).
    #[arg(value_parser = args::snapshot_dir)]
    dir: PathBuf,
    /// Leave the VM paused after restoring (resume with the control socket's Resume).
    #[arg(long)]
    paused: bool,
    /// Where to build each of the snapshot's disks (a new file, in order: the first is disk
    /// 0); the snapshot itself is left as it is.
    #[arg(long = "disk", value_name = "PATH")]
    disks: Vec<PathBuf>,
    /// How memory comes back: `eager` loads every page, then runs; `lazy` runs at once and
    /// loads a page when the guest touches it; `ws` runs at once, serves touches first and
    /// loads the working set (the pages an earlier restore saw touched first, then the
    /// newest layer's) ahead of them, then the rest.
    #[arg(long = "restore", value_name = "MODE", default_value = "ws")]
    mode: twin_vmm::lazy::RestoreMode,
    /// Map the snapshot's memory copy-on-write instead of loading it (`--restore` does not
    /// apply): every VM restored so from one snapshot shares the pages none of them wrote
    /// (a one-layer snapshot's `memory` file through the page cache; a longer chain is
    /// flattened into memory first, shared only by the clones of one `twin clone`).
    #[arg(long, conflicts_with = "mode")]
    share_memory: bool,
    /// Give the restored guest this MAC (with --ip): a clone's own identity. It takes it
    /// when it starts running, and drops the TCP connections of the old one.
    #[arg(long, requires = "ip")]
    mac: Option<Mac>,
    /// Give the restored guest this IPv4 address and prefix (with --mac).
    #[arg(long, requires = "mac")]
    ip: Option<Cidr>,
    /// The new identity's default gateway.
    #[arg(long, requires = "ip")]
    gateway: Option<std::net::Ipv4Addr>,
    /// The flattened base image, an inherited fd (`twin clone` passes it).
    #[arg(long, hide = true, requires = "share_memory")]
    base_fd: Option<i32>,
    #[command(flatten)]
    host: HostArgs,
}

#[derive(Args)]
struct CloneArgs {
    /// Snapshot directory (the top layer of a chain).
    #[arg(value_parser = args::snapshot_dir)]
    dir: PathBuf,
    /// How many clones to start.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Clone i runs on TAP `PREFIXi` (created beforehand, e.g. on one bridge).
    #[arg(long, default_value = "tap-c")]
    tap_prefix: String,
    /// MAC of clone 0; clone i gets this + i (in the low three bytes).
    #[arg(long, default_value = "52:54:00:00:10:00")]
    mac_base: Mac,
    /// Address of clone 0; clone i gets this + i in the same subnet.
    #[arg(long, default_value = "10.0.0.10/24")]
    ip_base: Cidr,
    /// Default gateway of every clone.
    #[arg(long)]
    gateway: Option<std::net::Ipv4Addr>,
    /// Directory for the clones' control sockets (`clone-i.sock`) and consoles
    /// (`clone-i.console`), created if missing.
    #[arg(long, default_value = "/run/twin/clones")]
    control_dir: PathBuf,
    /// Leave every clone paused (resume each through its control socket).
    #[arg(long)]
    paused: bool,
    /// How long to wait for every clone to run.
    #[arg(long, default_value = "120000ms")]
    timeout: args::Millis,
}

#[derive(Args)]
struct StatusArgs {
    /// Control socket of the VM process.
    #[arg(long, default_value = "/run/twin/twin.sock", value_parser = args::control_path)]
    control: PathBuf,
    /// Print JSON instead of text (the typed status of twin-api).
    #[arg(long)]
    json: bool,
    /// Exit 1 unless the VM is protected (a primary whose backup holds every checkpoint the
    /// world's output depends on), for monitoring scripts; 2 when the status cannot be had.
    #[arg(long)]
    check: bool,
}

impl HostArgs {
    fn console(&self) -> Result<Box<dyn std::io::Write + Send>> {
        Ok(match &self.console {
            Some(path) => Box::new(
                std::fs::File::create(path)
                    .with_context(|| format!("cannot create console file {}", path.display()))?,
            ),
            None => Box::new(std::io::stdout()),
        })
    }
}

impl VmArgs {
    fn to_config(&self, host: &HostArgs) -> Result<VmConfig> {
        if self.kernel.is_some() || self.initrd.is_some() {
            bail!(
                "--kernel/--initrd (Linux guests) are not supported yet; omit them to run the built-in guest"
            );
        }
        Ok(VmConfig {
            mem_size: self.mem.0,
            vcpus: self.vcpus,
            net: Some(NetConfig {
                tap: host.tap.clone(),
                mac: self.mac.0,
            }),
            ip: self.ip.addr,
            prefix_len: self.ip.prefix_len,
            gateway: self.gateway,
            guest_args: self.guest_args.clone(),
            disks: self
                .disks
                .iter()
                .map(|d| twin_vmm::DiskConfig {
                    path: d.path.clone(),
                    read_only: d.read_only,
                })
                .collect(),
            console: host.console()?,
            guest_elf: match &self.guest_elf {
                Some(path) => std::fs::read(path)
                    .with_context(|| format!("cannot read guest image {}", path.display()))?
                    .into(),
                None => twin_guest_image::GUEST_ELF.into(),
            },
        })
    }
}

/// Forwards the termination signals from the `signals` thread as VM events.
fn forward_signals(sigs: Termination, tx: std::sync::mpsc::Sender<VmEvent>) -> Result<()> {
    sigs.forward(move |sig| {
        tracing::info!("received {sig}, stopping the VM");
        tx.send(VmEvent::Signal(sig as i32)).is_ok()
    })?;
    Ok(())
}

/// What a VM process remembers between control requests (the VMM itself remembers the
/// layer its next incremental snapshot is taken on).
struct Session {
    role: &'static str,
    started: Instant,
    snapshots: u64,
    /// A backup that took over with an arbiter: the record it won.
    arbiter: Option<twin_api::status::ArbiterStatus>,
}

/// What a VM without a backup needs to be put under protection later: the identity its
/// replication sessions use (a VM that took over keeps its own) and, after a takeover, the
/// arbiter record it won.
struct Protectable {
    vm_id: twin_wire::VmId,
    arbiter_seen: Option<twin_arbiter::Seen>,
}

fn take_snapshot(
    vmm: &mut Vmm,
    session: &mut Session,
    req: &SnapshotRequest,
) -> Result<serde_json::Value> {
    // A slow disk, for the tests of long operations (`sleep(MS)`).
    twin_failpoints::hit("twin.snapshot");
    let report = vmm.snapshot(
        &req.dir,
        SnapshotOptions {
            incremental: req.incremental,
            stop: req.stop,
        },
    )?;
    session.snapshots += 1;
    Ok(serde_json::json!({
        "dir": req.dir,
        "incremental": req.incremental,
        "pages": report.pages,
        "bytes": report.bytes,
        "mem_size": vmm.memory().size(),
        "paused_ms": report.paused.as_secs_f64() * 1e3,
        "stopped": req.stop,
        "layer_id": report.layer_id.to_string(),
        "parent_id": report.parent_id.map(|i| i.to_string()),
        "tracking_from": report.tracking.from,
        "tracking_to": report.tracking.to,
    }))
}

/// Resumes the VM's devices; one that fails only logs (it wakes on the guest's next
/// notification), the VM runs on.
fn resume_devices(vmm: &Vmm) {
    if let Err(e) = vmm.resume_devices() {
        tracing::warn!("{}", twin_vmm::describe_error(&e));
    }
}

fn status(vmm: &Vmm, session: &Session) -> twin_api::VmStatus {
    twin_api::VmStatus {
        role: session.role.into(),
        pid: std::process::id(),
        vm: if vmm.is_paused() { "paused" } else { "running" }.into(),
        mem_size: vmm.memory().size(),
        vcpus: u32::from(vmm.config().vcpus),
        uptime_s: session.started.elapsed().as_secs_f64(),
        snapshots: session.snapshots,
        arbiter: session.arbiter.clone(),
        restore: vmm.load_progress().map(|p| twin_api::RestoreStatus {
            mode: p.mode.to_string(),
            data_pages: p.data_pages,
            resident: p.resident,
            remaining: p.data_pages.saturating_sub(p.resident),
            faults: p.faults,
            zero_faults: p.zero_faults,
            prefetched: p.prefetched,
            bytes_read: p.bytes_read,
            complete: p.complete,
            elapsed_ms: p.elapsed_ms,
            error: p.error,
        }),
    }
}

/// The replication settings a protect request asks for.
fn protect_config(
    req: &ProtectRequest,
    ctx: &Protectable,
) -> Result<twin_primary::ProtectConfig, twin_api::ApiError> {
    use twin_api::ApiError;
    let bad = |m: String| ApiError::new(ErrorCode::BadRequest, m);
    let ms = |what: &str, v: f64| {
        if v.is_finite() && v > 0.0 && v < 3.6e6 {
            Ok(Duration::from_secs_f64(v / 1e3))
        } else {
            Err(bad(format!(
                "{what} {v} ms must be positive (and under an hour)"
            )))
        }
    };
    args::host_port(&req.backup).map_err(bad)?;
    let link = match (&req.key_file, req.no_auth) {
        (Some(path), false) => {
            let key = twin_link::Key::load(path).map_err(|e| bad(format!("{e:#}")))?;
            twin_link::LinkConfig::with_key(key, req.encrypt)
        }
        (None, true) => twin_link::LinkConfig::insecure(),
        (Some(_), true) => return Err(bad("key_file and no_auth exclude each other".into())),
        (None, false) => return Err(bad("give key_file or no_auth".into())),
    };
    let arbiter = match &req.arbiter {
        None => None,
        Some(url) => Some(twin_arbiter::Arbitration {
            client: twin_arbiter::Arbiter::new(url).map_err(|e| bad(format!("{e:#}")))?,
            me: twin_arbiter::incarnation(&format!(
                "primary {} (pid {})",
                host_name(),
                std::process::id()
            )),
        }),
    };
    Ok(twin_primary::ProtectConfig {
        backup: req.backup.clone(),
        interval: ms("interval", req.interval_ms)?,
        eager_gap: req.eager_gap_ms.map(|g| ms("eager gap", g)).transpose()?,
        precopy: req.precopy,
        on_backup_loss: match req.on_backup_loss {
            twin_api::LossPolicy::Release => twin_primary::LossPolicy::Release,
            twin_api::LossPolicy::Hold => twin_primary::LossPolicy::Hold,
        },
        backup_timeout: ms("backup timeout", req.backup_timeout_ms)?,
        heartbeat_interval: twin_link::HEARTBEAT_INTERVAL,
        vm_id: ctx.vm_id,
        link,
        arbiter,
        arbiter_seen: ctx.arbiter_seen.clone(),
        compress: req.compress,
        compress_cache: req.compress_cache,
    })
}

/// What the main loop of a VM without a backup does next.
enum Next {
    Continue,
    /// Go on protected with this configuration.
    Protect(Box<twin_primary::ProtectConfig>),
}

fn handle_request(
    vmm: &mut Vmm,
    session: &mut Session,
    events: &EventLog,
    ctx: &Protectable,
    req: Request,
    reply: &Reply,
) -> Next {
    let fail = |e: anyhow::Error| Response::error(ErrorCode::Failed, format!("{e:#}"));
    let r = match req {
        Request::Status => {
            Response::Ok(serde_json::to_value(status(vmm, session)).unwrap_or_default())
        }
        Request::Snapshot(req) => {
            // The write can take long (seconds per GiB on a slow disk): the client is told
            // it started, and gets the outcome, however long it takes.
            let _ = reply.send(Response::Accepted(serde_json::json!({"dir": req.dir})));
            match take_snapshot(vmm, session, &req) {
                Ok(v) => {
                    events.emit(EventKind::SnapshotWritten {
                        dir: req.dir.display().to_string(),
                        pages: v["pages"].as_u64().unwrap_or(0),
                        paused_ms: v["paused_ms"].as_f64().unwrap_or(0.0),
                    });
                    Response::Ok(v)
                }
                Err(e) => fail(e),
            }
        }
        Request::Pause => {
            vmm.pause();
            Response::Ok(serde_json::json!({"vm": "paused"}))
        }
        Request::Resume => {
            resume_devices(vmm);
            vmm.resume();
            Response::Ok(serde_json::json!({"vm": "running"}))
        }
        Request::Protect(req) => {
            if vmm.is_paused() {
                Response::error(
                    ErrorCode::Conflict,
                    "the VM is paused; resume it before protecting it",
                )
            } else {
                match protect_config(&req, ctx) {
                    // Answered once the output buffer is in place.
                    Ok(cfg) => return Next::Protect(Box::new(cfg)),
                    Err(e) => Response::Error(e),
                }
            }
        }
        Request::Failover => Response::error(
            ErrorCode::NotSupported,
            "this VM is not protected; failover applies to `twin backup`",
        ),
        Request::Events(_) => Response::error(
            ErrorCode::BadRequest,
            "events are served by the control socket itself",
        ),
    };
    let _ = reply.send(r);
    Next::Continue
}

/// Runs a started VM until it powers off or a termination signal arrives, answering
/// control requests meanwhile; a protect request puts it under protection and it goes on
/// as a primary.
fn serve_vm(
    mut vmm: Vmm,
    control: &Control,
    sigs: Termination,
    role: &'static str,
    events: &std::sync::Arc<EventLog>,
    ctx: Protectable,
    arbiter: Option<twin_api::status::ArbiterStatus>,
) -> Result<ExitCode> {
    forward_signals(sigs, vmm.event_sender())?;
    let mut session = Session {
        role,
        started: Instant::now(),
        snapshots: 0,
        arbiter,
    };
    let outcome = loop {
        if let Some(outcome) = next_vm_outcome(&vmm) {
            break outcome;
        }
        while let Ok((req, reply)) = control.try_recv() {
            match handle_request(&mut vmm, &mut session, events, &ctx, req, &reply) {
                Next::Continue => {}
                Next::Protect(cfg) => {
                    // The output flows until the backup is in sync, then waits for acks.
                    let output = match OutputCommit::attach(&vmm, true) {
                        Ok(o) => o,
                        Err(e) => {
                            let _ = reply.send(Response::error(
                                ErrorCode::Failed,
                                format!("cannot protect the VM: {e:#}"),
                            ));
                            continue;
                        }
                    };
                    let _ = reply.send(Response::Ok(serde_json::json!({
                        "backup": cfg.backup,
                        "mode": "connecting",
                    })));
                    tracing::info!(backup = %cfg.backup, "protecting the running VM");
                    return serve_protected(
                        std::sync::Arc::new(vmm),
                        output,
                        *cfg,
                        control,
                        events,
                    );
                }
            }
        }
    };
    vmm.shutdown();
    emit_stopped(events, &outcome);
    outcome
}

/// The `VmRunning` event of a started VM.
fn emit_running(events: &EventLog, vmm: &Vmm, role: ApiRole) {
    events.emit(EventKind::VmRunning {
        role,
        mem_size: vmm.memory().size(),
        vcpus: u32::from(vmm.config().vcpus),
    });
}

/// The `VmStopped` event for how the VM's run ended.
fn emit_stopped(events: &EventLog, outcome: &Result<ExitCode>) {
    events.emit(match outcome {
        Ok(_) => EventKind::VmStopped {
            reason: "stopped".into(),
            code: None,
        },
        Err(e) => EventKind::VmStopped {
            reason: format!("{e:#}"),
            code: None,
        },
    });
}

/// Waits briefly for the VM's next event; `Some` when the VM's run is over, with the
/// process's exit status or the reason it failed.
fn next_vm_outcome(vmm: &Vmm) -> Option<Result<ExitCode>> {
    use std::sync::mpsc::RecvTimeoutError;
    if let Some(why) = vmm.device_failure() {
        return Some(Err(anyhow::anyhow!(
            "the VM's network device failed: {why}"
        )));
    }
    Some(match vmm.next_event(Duration::from_millis(5)) {
        Ok(VmEvent::PowerOff(code)) => {
            tracing::info!(code, "guest powered off");
            Ok(ExitCode::from(code))
        }
        Ok(VmEvent::Signal(_)) => Ok(ExitCode::SUCCESS),
        Ok(VmEvent::VcpuFailed { vcpu, reason }) => {
            Err(anyhow::anyhow!("vCPU {vcpu} failed: {reason}"))
        }
        Ok(VmEvent::DeviceFailed(reason)) => Err(anyhow::anyhow!("device failed: {reason}")),
        Ok(VmEvent::MemoryLoadFailed(reason)) => {
            // Threads may wait on pages that will never load (a vCPU, KVM's async page
            // fault worker, which tearing the VM down waits for): say why, poison those
            // pages so the waits end in a memory error, and end the process here rather
            // than unwind through a teardown that could wait on them.
            eprintln!("twin: the VM stopped: its memory could not be loaded: {reason}");
            vmm.abort_memory_load();
            std::process::exit(1);
        }
        Ok(other) => Err(anyhow::anyhow!("VM stopped: {other:?}")),
        Err(RecvTimeoutError::Timeout) => return None,
        Err(RecvTimeoutError::Disconnected) => {
            Err(anyhow::anyhow!("the VM's event channel closed"))
        }
    })
}

/// Serves the control socket (and `--metrics`) of a VM process.
fn serve_control(host: &HostArgs, events: &std::sync::Arc<EventLog>) -> Result<Control> {
    let control = control::serve(&host.control, events.clone())?;
    if let Some(addr) = host.metrics {
        control.serve_metrics(addr)?;
    }
    Ok(control)
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let sigs = Termination::block()?;
    let events = EventLog::new();
    let mut vmm = Vmm::new(args.vm.to_config(&args.host)?).context("cannot start the VM")?;
    let control = serve_control(&args.host, &events)?;
    vmm.start().context("cannot start the VM")?;
    tracing::info!(mem = args.vm.mem.0, vcpus = args.vm.vcpus, tap = %args.host.tap, "VM running");
    emit_running(&events, &vmm, ApiRole::Standalone);
    notify::ready("VM running, not protected");
    let ctx = Protectable {
        vm_id: twin_wire::VmId(*uuid_like(&args.vm.mac.0)),
        arbiter_seen: None,
    };
    serve_vm(vmm, &control, sigs, "standalone", &events, ctx, None)
}

fn restore(args: RestoreArgs) -> Result<ExitCode> {
    let sigs = Termination::block()?;
    let t0 = Instant::now();
    let image = RestoreImage::open(&args.dir, &args.disks)
        .with_context(|| format!("cannot restore {}", args.dir.display()))?;
    let state = image.state;
    let source = image.source;
    let (memory, loader) = if args.share_memory {
        (share_memory(&args, state.config.mem_size)?, None)
    } else {
        let memory = Memory::new(state.config.mem_size).context("cannot create guest memory")?;
        let loader = twin_vmm::lazy::Loader::start(&memory, source.clone(), args.mode)
            .context("cannot start loading guest memory")?;
        if args.mode == twin_vmm::lazy::RestoreMode::Eager {
            loader.wait().context("cannot load guest memory")?;
        }
        (memory, Some(loader))
    };
    let disks = image.disks;
    let tap =
        twin_vmm::devices::tap::Tap::open(&args.host.tap).context("cannot open the VM's TAP")?;
    let host = HostResources {
        tap: Some(tap),
        console: args.host.console()?,
        disks,
    };
    let mut vmm = Vmm::restore(&state, memory, host).context("cannot rebuild the VM")?;
    if let Some(loader) = loader {
        if args.mode != twin_vmm::lazy::RestoreMode::Eager {
            // What this restore's guest touched first is the working set of the next.
            loader.on_complete(image.record);
        }
        vmm.attach_loader(loader);
    }
    if let (Some(mac), Some(ip)) = (args.mac, args.ip) {
        let seq = vmm
            .set_network_identity(&twin_vmm::boot::NetIdentity {
                mac: mac.0,
                ip: ip.addr,
                prefix_len: ip.prefix_len,
                gateway: args.gateway,
            })
            .context("cannot give the restored VM its new identity")?;
        tracing::info!(%mac, %ip, seq, "the restored guest gets a new network identity");
    }
    let events = EventLog::new();
    let control = serve_control(&args.host, &events)?;
    if args.paused {
        vmm.start_paused().context("cannot start the VM")?;
    } else {
        vmm.start().context("cannot start the VM")?;
    }
    // The VM may run on another host than the one it was snapshotted on: it is told it
    // moved (it announces itself and prompts its peers at once) and the host announces
    // its MAC too, so that clients reach it now and not when their ARP entry expires.
    if !args.paused {
        announce_restored(&vmm, &args.host.tap);
    }
    let progress = vmm.load_progress().unwrap_or_default();
    tracing::info!(mode = %args.mode, pages = progress.data_pages, paused = args.paused, elapsed_ms = t0.elapsed().as_millis() as u64, dir = %args.dir.display(), "VM restored and running");
    emit_running(&events, &vmm, ApiRole::Standalone);
    notify::ready("VM restored, not protected");
    let mac = vmm.config().mac.unwrap_or_default();
    let ctx = Protectable {
        vm_id: twin_wire::VmId(*uuid_like(&mac)),
        arbiter_seen: None,
    };
    serve_vm(vmm, &control, sigs, "standalone", &events, ctx, None)
}

/// Memory of a process as `/proc/PID/smaps_rollup` counts it, in KiB: all it maps
/// (`Rss`), its proportional share of what it shares (`Pss`), and its anonymous memory
/// (`Anonymous`: a clone's private copies of guest pages, and the VMM's own heap).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
struct ProcMemory {
    rss_kib: u64,
    pss_kib: u64,
    anon_kib: u64,
}

fn proc_memory(pid: u32) -> Result<ProcMemory> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcMemory {
        rss_kib: field("Rss:"),
        pss_kib: field("Pss:"),
        anon_kib: field("Anonymous:"),
    })
}

/// Sends SIGTERM to every clone still running and waits for it.
fn stop_clones(children: &mut [std::process::Child]) {
    for c in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            // SAFETY: kill(2) of a child this process started and has not reaped (it is
            // still running, so its pid is not reused).
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}

/// `twin clone`: one `twin restore --share-memory` child per clone, all mapping one base.
fn clone_cmd(a: CloneArgs) -> Result<ExitCode> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let sigs = Termination::block()?;
    let t0 = Instant::now();
    let dir = std::path::absolute(&a.dir)
        .with_context(|| format!("cannot resolve {}", a.dir.display()))?;
    let plans = twin::clones::plan(
        a.count,
        &a.tap_prefix,
        a.mac_base,
        a.ip_base,
        &a.control_dir,
    )?;
    let state =
        snapshot::read_state(&dir).with_context(|| format!("cannot clone {}", dir.display()))?;
    if !state.config.disks.is_empty() {
        bail!(
            "cannot clone {}: its VM has {} disks, and clones of a VM with disks are not supported yet (each would need its own copy of every disk)",
            dir.display(),
            state.config.disks.len()
        );
    }
    if state.config.mac.is_none() {
        bail!(
            "cannot clone {}: its VM has no network device, so a clone could not be told its identity",
            dir.display()
        );
    }
    std::fs::create_dir_all(&a.control_dir)
        .with_context(|| format!("cannot create {}", a.control_dir.display()))?;
    for p in &plans {
        args::control_path(&p.control.display().to_string()).map_err(anyhow::Error::msg)?;
    }
    let (base, kind) = snapshot::clone_base(&dir, state.config.mem_size)
        .with_context(|| format!("cannot clone {}", dir.display()))?;
    let base_ms = t0.elapsed().as_secs_f64() * 1e3;
    let exe = std::env::current_exe().context("cannot find the twin executable")?;
    let fd = base.as_raw_fd();
    let mut children: Vec<std::process::Child> = Vec::with_capacity(plans.len());
    for p in &plans {
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("restore")
            .arg(&dir)
            .args(["--share-memory", "--base-fd", &fd.to_string()])
            .args(["--tap", &p.tap])
            .args(["--mac", &p.mac.to_string(), "--ip", &p.ip.to_string()])
            .arg("--control")
            .arg(&p.control)
            .arg("--console")
            .arg(&p.console);
        if let Some(g) = a.gateway {
            cmd.args(["--gateway", &g.to_string()]);
        }
        if a.paused {
            cmd.arg("--paused");
        }
        // SAFETY: runs in the forked child before exec and calls only fcntl(2) and prctl(2),
        // which are async-signal-safe, on the child's own copy of the fd table.
        unsafe {
            cmd.pre_exec(move || {
                // The base is inherited by the clone (and only by it: it stays close-on-exec
                // in this process).
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // A clone does not outlive its supervisor.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                stop_clones(&mut children);
                return Err(e).context(format!("cannot start clone {}", p.index));
            }
        }
    }
    // Every clone running (or paused, as asked) behind its control socket.
    let want = if a.paused { "paused" } else { "running" };
    let mut ready = vec![false; plans.len()];
    while ready.iter().any(|r| !r) {
        if t0.elapsed() > a.timeout.0 {
            stop_clones(&mut children);
            bail!(
                "clones {:?} were not {want} within {}",
                ready
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| !**r)
                    .map(|(i, _)| i)
                    .collect::<Vec<_>>(),
                fmt_ms(a.timeout.0.as_secs_f64() * 1e3)
            );
        }
        if sigs.pending()?.is_some() {
            stop_clones(&mut children);
            return Ok(ExitCode::FAILURE);
        }
        for (i, p) in plans.iter().enumerate() {
            if let Ok(Some(st)) = children[i].try_wait() {
                stop_clones(&mut children);
                bail!(
                    "clone {i} ({}) exited before it ran: {st}; its console is {}",
                    p.tap,
                    p.console.display()
                );
            }
            if !ready[i] && p.control.exists() {
                if let Ok(v) = client(&p.control, Request::Status) {
                    ready[i] = v["vm"].as_str() == Some(want);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let ready_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut clones = Vec::with_capacity(plans.len());
    for (p, c) in plans.iter().zip(&children) {
        let mem = proc_memory(c.id()).unwrap_or_default();
        clones.push(serde_json::json!({
            "index": p.index,
            "pid": c.id(),
            "tap": p.tap,
            "mac": p.mac.to_string(),
            "ip": p.ip.to_string(),
            "control": p.control,
            "console": p.console,
            "memory": mem,
        }));
    }
    let report = serde_json::json!({
        "snapshot": dir,
        "count": plans.len(),
        "mem_size": state.config.mem_size,
        "base": match &kind {
            snapshot::CloneBase::Layer(path) => serde_json::json!({"layer": path}),
            snapshot::CloneBase::Flattened { layers } => serde_json::json!({"flattened": layers}),
        },
        "base_ms": base_ms,
        "ready_ms": ready_ms,
        "clones": clones,
    });
    println!("{report}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    eprintln!(
        "clone: {} clones of {} {want} in {}",
        plans.len(),
        dir.display(),
        fmt_ms(ready_ms)
    );
    notify::ready(&format!("{} clones {want}", plans.len()));
    // Supervise: stop them all on a signal, end once none is left.
    let mut failed = false;
    let mut exited = vec![false; children.len()];
    while exited.iter().any(|e| !e) {
        if sigs.pending()?.is_some() {
            stop_clones(&mut children);
            break;
        }
        for (i, c) in children.iter_mut().enumerate() {
            if exited[i] {
                continue;
            }
            if let Ok(Some(st)) = c.try_wait() {
                exited[i] = true;
                if !st.success() {
                    failed = true;
                    tracing::warn!(clone = i, "clone exited: {st}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The memory of a clone (`twin restore --share-memory`): the snapshot's memory mapped
/// copy-on-write, from the base `twin clone` handed over (`--base-fd`) or, alone, from the
/// snapshot itself ([`snapshot::clone_base`]).
fn share_memory(args: &RestoreArgs, mem_size: u64) -> Result<Memory> {
    use std::os::fd::FromRawFd;
    if args.dir.join(twin_store::INDEX_FILE).exists() {
        bail!(
            "{} is a replica store; --share-memory maps a snapshot's memory (restore the store without it)",
            args.dir.display()
        );
    }
    let base = match args.base_fd {
        Some(fd) => {
            // SAFETY: `twin clone` started this process with the base open as `fd` and
            // nothing else in this process uses it: it is owned from here on. A number that
            // is no open file fails the fstat in `new_private`, not memory safety.
            let f = unsafe { std::fs::File::from_raw_fd(fd) };
            // No child of this process inherits it.
            // SAFETY: fcntl on the fd just taken over.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            // What `twin clone` hands over: a snapshot's memory file, or a memfd sealed
            // so that no one can change it under the clones. A memfd still open to seals
            // and not write-sealed is refused (a file on tmpfs reports only F_SEAL_SEAL).
            // SAFETY: fcntl on the fd just taken over.
            let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
            let is_file = f.metadata().map(|m| m.is_file()).unwrap_or(false);
            let unsealed_memfd =
                seals >= 0 && seals & (libc::F_SEAL_WRITE | libc::F_SEAL_SEAL) == 0;
            if !is_file || unsealed_memfd {
                bail!(
                    "--base-fd {fd} is not a clone base (a snapshot memory file or a sealed memfd)"
                );
            }
            f
        }
        None => {
            let (f, kind) = snapshot::clone_base(&args.dir, mem_size)
                .with_context(|| format!("cannot share the memory of {}", args.dir.display()))?;
            if let snapshot::CloneBase::Flattened { layers } = kind {
                tracing::warn!(
                    layers,
                    "the snapshot is a chain: its memory was flattened for this VM alone (clones started with `twin clone` share one flattened copy)"
                );
            }
            f
        }
    };
    Memory::new_private(base, mem_size).context("cannot map the snapshot's memory copy-on-write")
}

/// What `twin restore` starts a VM from: a snapshot chain or a backup's replica store.
struct RestoreImage {
    state: twin_vmm::MachineState,
    source: std::sync::Arc<dyn twin_vmm::lazy::PageSource>,
    disks: Vec<std::sync::Arc<twin_vmm::devices::virtio::blk::disk::DiskImage>>,
    /// Keeps a restore's first touches for the next restore from the same image.
    record: twin_vmm::lazy::CompleteHook,
}

impl RestoreImage {
    /// Opens `dir`, a replica store if it has a store index, else a snapshot; the disks
    /// are built at `targets` (new files) from the image's, which stay as they are.
    fn open(dir: &std::path::Path, targets: &[PathBuf]) -> Result<Self> {
        use twin_vmm::devices::virtio::blk::disk::copy_sparse;
        if !dir.join(twin_store::INDEX_FILE).exists() {
            let state = snapshot::read_state(dir)?;
            let source =
                std::sync::Arc::new(snapshot::ChainSource::open(dir, state.config.mem_size)?);
            let disks = snapshot::restore_disks(dir, targets)
                .context("cannot build the snapshot's disks")?;
            let rec = source.clone();
            return Ok(RestoreImage {
                state,
                source,
                disks,
                record: Box::new(move |t| rec.record_first_touches(&t)),
            });
        }
        let (source, st) = twin_store::open_committed(dir)?;
        let state = twin_vmm::MachineState::decode(&st.machine)
            .context("the replica store's machine state does not decode")?;
        if state.config.mem_size != source.mem_size() {
            bail!(
                "the replica store's state is for {} bytes of RAM, its memory has {}",
                state.config.mem_size,
                source.mem_size()
            );
        }
        if state.config.disks.len() != targets.len() {
            bail!(
                "the replica's VM has {} disks, {} images were named for them (--disk)",
                state.config.disks.len(),
                targets.len()
            );
        }
        // The disk replicas are copied to the new images (the store stays as it is); a
        // failure removes the images made so far.
        let read_only: Vec<bool> = state.config.disks.iter().map(|d| d.read_only).collect();
        let disks = snapshot::build_images(targets, &read_only, |i, dst, target| {
            let from = dir.join(format!("disk-{i}.img"));
            let capacity = state.config.disks[i].capacity;
            std::fs::File::open(&from)
                .and_then(|src| {
                    dst.set_len(capacity)?;
                    copy_sparse(&src, dst, capacity).map(|_| ())
                })
                .map_err(|source| snapshot::LayerError::Io {
                    op: "copying the disk replica to",
                    path: target.to_path_buf(),
                    source,
                })
        })
        .context("cannot build the replica's disks")?;
        let source = std::sync::Arc::new(source);
        let rec = source.clone();
        Ok(RestoreImage {
            state,
            source,
            disks,
            record: Box::new(move |t| rec.record_first_touches(&t)),
        })
    }
}

/// Announces a restored VM where it now runs: the host sends a gratuitous ARP (RARP if
/// the guest's address is unknown) for the guest's MAC and tells the guest it moved.
fn announce_restored(vmm: &Vmm, tap_name: &str) {
    if let Some(tap) = vmm.tap() {
        let mac = vmm.config().mac.unwrap_or_default();
        let frame = match vmm.config().ip {
            Some(ip) => twin_backup::announce::gratuitous_arp(mac, ip),
            None => twin_backup::announce::rarp(mac),
        };
        twin_backup::announce::announce(tap, frame, tap_name);
    }
    vmm.notify_network_moved();
}

/// Checks that the backup's address resolves, before a VM is built for it: a name that
/// does not resolve is a typo, not a backup that is down (which the primary retries).
fn check_backup_resolves(backup: &str) -> Result<()> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = backup
        .to_socket_addrs()
        .with_context(|| format!("the backup address {backup} does not resolve"))?
        .collect();
    if addrs.is_empty() {
        bail!("the backup address {backup} resolves to no address");
    }
    Ok(())
}

fn protect(args: ProtectArgs) -> Result<ExitCode> {
    check_backup_resolves(&args.backup)?;
    let Some(host) = args.host() else {
        return protect_running(&args);
    };
    let sigs = Termination::block()?;
    let link = args.auth.link()?;
    if link.key.is_none() {
        tracing::warn!("the replication link is NOT authenticated (--no-auth): anyone who reaches the backup's port can pose as it and stop this VM");
    }
    let vmm = Vmm::new(args.vm.to_config(&host)?).context("cannot start the VM")?;
    // Output commit from the first frame: the guest's output waits for the first backup.
    let output = OutputCommit::attach(&vmm, false)?;
    let events = EventLog::new();
    let control = serve_control(&host, &events)?;
    let mut vmm = vmm;
    vmm.start().context("cannot start the VM")?;
    forward_signals(sigs, vmm.event_sender())?;
    emit_running(&events, &vmm, ApiRole::Primary);
    let req = args.request()?;
    let ctx = Protectable {
        vm_id: twin_wire::VmId(*uuid_like(&args.vm.mac.0)),
        arbiter_seen: None,
    };
    let cfg = protect_config(&req, &ctx).map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(backup = %args.backup, interval_ms = args.interval.0.as_millis() as u64, "VM running, protecting");
    serve_protected(std::sync::Arc::new(vmm), output, cfg, &control, &events)
}

/// `twin protect` without --tap: asks the VM process behind --control to protect its VM,
/// then follows its events until it is protected (printing the initial sync's progress).
fn protect_running(args: &ProtectArgs) -> Result<ExitCode> {
    let req = args.request()?;
    let mark = control::events(&args.control, u64::MAX, false, false)?.next_seq();
    let v = client(&args.control, Request::Protect(req))?;
    eprintln!(
        "protecting the VM behind {} with {}",
        args.control.display(),
        v["backup"].as_str().unwrap_or(&args.backup)
    );
    let mut stream = control::events(&args.control, mark, false, true)?;
    while let Some(e) = stream.next_event()? {
        match e.kind {
            EventKind::BackupConnected { generation, .. } => {
                eprintln!("backup connected (generation {generation}); initial sync")
            }
            EventKind::SyncProgress {
                pages_done,
                pages_total,
            } => eprintln!(
                "initial sync: {:.0}% ({pages_done} of {pages_total} pages)",
                pages_done as f64 * 100.0 / pages_total.max(1) as f64
            ),
            EventKind::SyncSent { pages, ms, .. } => {
                eprintln!("initial sync sent: {pages} pages in {}", fmt_ms(ms))
            }
            EventKind::Protected { epoch, generation } => {
                println!(
                    "PROTECTED by {} (epoch {epoch}, generation {generation})",
                    args.backup
                );
                return Ok(ExitCode::SUCCESS);
            }
            EventKind::BackupLost { reason, .. } => {
                eprintln!("backup lost before protection: {reason}; the VM process retries")
            }
            EventKind::VmStopped { reason, .. } => bail!("the VM stopped: {reason}"),
            _ => {}
        }
    }
    bail!("the VM process closed its event stream before the VM was protected")
}

/// The output-commit buffer between a VM's NIC and its TAP, and the thread that releases
/// its frames.
struct OutputCommit {
    netbuf: twin_netbuf::NetBuffer,
    release: twin_netbuf::ReleaseThread,
}

impl OutputCommit {
    /// Puts a commit buffer between `vmm`'s NIC and its TAP. `unprotected`: frames flow
    /// until a backup is in sync (a running VM put under protection), else they wait for the
    /// first backup's acknowledgement.
    fn attach(vmm: &Vmm, unprotected: bool) -> Result<Self> {
        use twin_netbuf::{NetBuffer, NetBufferConfig};
        let netbuf = NetBuffer::new(NetBufferConfig::default());
        if unprotected {
            netbuf.release_all();
        }
        let tap = vmm.tap().context("a protected VM needs a NIC")?;
        vmm.set_net_sink(Box::new(twin_primary::NetbufSink(netbuf.sink())));
        let release = netbuf
            .spawn_release_thread("net-release", move |frame| tap.write_vnet(frame))
            .context("spawning the output release thread")?;
        Ok(OutputCommit { netbuf, release })
    }
}

/// READY=1 for systemd once the primary is protected the first time; STATUS= on changes.
fn notify_protection(events: &std::sync::Arc<EventLog>, backup: String) {
    if !notify::enabled() {
        return;
    }
    let mut sub = events.subscribe(events.next_seq(), false);
    let spawned = std::thread::Builder::new()
        .name("sd-notify".into())
        .spawn(move || loop {
            for e in sub.next_batch(Duration::from_secs(1)) {
                match e.kind {
                    EventKind::Protected { .. } => notify::ready(&format!("protected by {backup}")),
                    EventKind::BackupLost { reason, .. } => {
                        notify::status(&format!("NOT PROTECTED: backup lost ({reason})"))
                    }
                    EventKind::VmStopped { .. } | EventKind::StoodDown { .. } => return,
                    _ => {}
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the sd_notify thread");
    }
}

/// Runs a started VM protected by `cfg`'s backup until it stops, stands down or fails,
/// answering control requests meanwhile.
fn serve_protected(
    vmm: std::sync::Arc<Vmm>,
    output: OutputCommit,
    cfg: twin_primary::ProtectConfig,
    control: &Control,
    events: &std::sync::Arc<EventLog>,
) -> Result<ExitCode> {
    use twin_primary::{Mode, Primary};
    let OutputCommit { netbuf, release } = output;
    let backup = cfg.backup.clone();
    notify_protection(events, backup.clone());
    let primary = Primary::start(vmm.clone(), netbuf.clone(), cfg, events.clone())
        .context("starting replication")?;
    let outcome = loop {
        if let Some(outcome) = next_vm_outcome(&vmm) {
            break outcome;
        }
        if primary.mode() == Mode::Fenced {
            tracing::warn!("stood down for the backup's takeover; stopping this VM");
            vmm.pause();
            break Ok(ExitCode::SUCCESS);
        }
        while let Ok((req, reply)) = control.try_recv() {
            let conflict = |m: &str| Response::error(ErrorCode::Conflict, m);
            let resp = match req {
                Request::Status => {
                    Response::Ok(serde_json::to_value(primary.status()).unwrap_or_default())
                }
                Request::Pause | Request::Resume => {
                    conflict("a protected VM cannot be paused or resumed")
                }
                Request::Snapshot(_) => {
                    conflict("snapshots of a protected VM are taken by its backup")
                }
                Request::Protect(_) => {
                    conflict(&format!("the VM is protected already, by {backup}"))
                }
                Request::Failover => Response::error(
                    ErrorCode::NotSupported,
                    "failover is requested from the backup (`twin failover`)",
                ),
                Request::Events(_) => Response::error(
                    ErrorCode::BadRequest,
                    "events are served by the control socket itself",
                ),
            };
            let _ = reply.send(resp);
        }
    };
    vmm.pause();
    if primary.mode() == Mode::Fenced {
        // The backup took over; unacknowledged output was discarded.
        primary.stop();
    } else if outcome.is_err() {
        // This VM cannot go on (a device died, a vCPU failed): nothing more of its output
        // may leave, and the backup takes over from its last acknowledged checkpoint.
        let discarded = netbuf.fence();
        tracing::error!(discarded, "handing the VM over to the backup");
        primary.hand_over();
    } else {
        // Stopping on purpose (signal, guest power-off): the backup is told goodbye and
        // will not take over, and what the VM said is released.
        primary.stop();
        netbuf.release_all();
    }
    netbuf.close();
    let _ = release.join();
    if let Ok(mut vmm) = std::sync::Arc::try_unwrap(vmm) {
        vmm.shutdown();
    }
    emit_stopped(events, &outcome);
    outcome
}

/// This host's name, for the arbiter's owner labels.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// 16 bytes identifying a VM, derived from its MAC (unique on its LAN) and the start time.
fn uuid_like(mac: &[u8; 6]) -> Box<[u8; 16]> {
    let mut id = [0u8; 16];
    id[..6].copy_from_slice(mac);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    id[8..].copy_from_slice(&t.to_le_bytes());
    Box::new(id)
}

fn backup(args: BackupArgs) -> Result<ExitCode> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use twin_backup::{Backup, BackupConfig, BackupRequest, Outcome};

    let sigs = Termination::block()?;
    let events = EventLog::new();
    let arbitration = args.arbiter.arbitration(format!(
        "backup {} on {} (pid {})",
        args.listen,
        host_name(),
        std::process::id()
    ))?;
    let cfg = BackupConfig {
        listen: args.listen,
        tap: args.tap.clone(),
        heartbeat_timeout: args.heartbeat_timeout.0,
        heartbeat_interval: twin_link::HEARTBEAT_INTERVAL,
        link: args.auth.link()?,
        events: events.clone(),
        arbiter: arbitration.clone(),
        replica_dir: args.replica_dir.clone(),
        replica_memory: args.replica_memory.map(|s| s.0),
    };
    // The TAP and the port first: a backup that cannot serve must not claim the control
    // socket (and a second one must never take a running backup's).
    let backup = Backup::bind(cfg)?;
    let control = control::serve(&args.control, events.clone())?;
    if let Some(addr) = args.metrics {
        control.serve_metrics(addr)?;
    }
    notify::ready(&format!("listening on {}", args.listen));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel::<BackupRequest>();
    let console_path = args.console.clone();
    let stop2 = stop.clone();
    let worker = std::thread::Builder::new()
        .name("backup".into())
        .spawn(move || {
            backup.run(&rx, &stop2, move || -> Box<dyn std::io::Write + Send> {
                match console_path.and_then(|p| std::fs::File::create(p).ok()) {
                    Some(f) => Box::new(f),
                    None => Box::new(std::io::stdout()),
                }
            })
        })
        .context("spawning the backup thread")?;
    // Until a takeover, the main thread forwards control requests and watches signals.
    let pending = sigs;
    let outcome = loop {
        if worker.is_finished() {
            break worker
                .join()
                .map_err(|_| anyhow::anyhow!("the backup thread panicked"))?;
        }
        if let Ok(Some(sig)) = pending.pending() {
            tracing::info!("received {sig}, stopping the backup");
            stop.store(true, Ordering::Release);
        }
        if let Ok((req, reply)) = control.recv_timeout(Duration::from_millis(5)) {
            let forwarded = match req {
                Request::Status => {
                    let reply = reply.clone();
                    tx.send(BackupRequest::Status(Box::new(move |v| {
                        let _ =
                            reply.send(Response::Ok(serde_json::to_value(v).unwrap_or_default()));
                    })))
                }
                Request::Failover => {
                    let reply = reply.clone();
                    tx.send(BackupRequest::Failover(Box::new(move |r| {
                        let _ = reply.send(match r {
                            Ok(v) => Response::Ok(serde_json::to_value(v).unwrap_or_default()),
                            Err(e) => Response::error(ErrorCode::Conflict, e),
                        });
                    })))
                }
                _ => {
                    let _ = reply.send(Response::error(
                        ErrorCode::Conflict,
                        "the backup has no running VM yet",
                    ));
                    Ok(())
                }
            };
            if forwarded.is_err() {
                let _ = reply.send(Response::error(
                    ErrorCode::Unavailable,
                    "the backup is shutting down",
                ));
            }
        }
    };
    match outcome {
        Ok(Outcome::FailedOver {
            vmm,
            report,
            vm_id,
            arbiter_seen,
        }) => {
            println!(
                "FAILOVER {}",
                serde_json::to_string(&report).unwrap_or_default()
            );
            emit_running(&events, &vmm, ApiRole::TookOver);
            notify::status("took over: the VM runs here");
            match &args.reprotect {
                None => {
                    let arbiter = arbitration
                        .as_ref()
                        .map(|a| twin_primary::arbiter_status(a, arbiter_seen.as_ref()));
                    serve_vm(
                        vmm,
                        &control,
                        pending,
                        "primary (took over)",
                        &events,
                        Protectable {
                            vm_id,
                            arbiter_seen,
                        },
                        arbiter,
                    )
                }
                Some(standby) => {
                    // The same process goes on as this VM's primary, under its identity and
                    // (with an arbiter) as the record's owner it just became.
                    forward_signals(pending, vmm.event_sender())?;
                    let output = OutputCommit::attach(&vmm, true)?;
                    let cfg = twin_primary::ProtectConfig {
                        backup: standby.clone(),
                        interval: Duration::from_millis(25),
                        eager_gap: Some(Duration::from_millis(2)),
                        precopy: true,
                        on_backup_loss: twin_primary::LossPolicy::Release,
                        backup_timeout: Duration::from_millis(500),
                        heartbeat_interval: twin_link::HEARTBEAT_INTERVAL,
                        vm_id,
                        link: args.auth.link()?,
                        arbiter: arbitration,
                        arbiter_seen,
                        compress: twin_api::Compression::default(),
                        compress_cache: twin_api::DEFAULT_COMPRESS_CACHE,
                    };
                    tracing::info!(standby = %standby, "took over; protecting the VM again");
                    serve_protected(std::sync::Arc::new(vmm), output, cfg, &control, &events)
                }
            }
        }
        Err(twin_backup::BackupError::Stopped) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e.into()),
    }
}

/// Milliseconds for people: `0.42 ms`, `12.3 ms`, `1.25 s`.
fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1e3)
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

/// Bytes for people: `256 MiB`, `1.5 GiB`, `12 KiB`.
fn fmt_bytes(b: u64) -> String {
    let (v, unit) = match b {
        b if b >= 1 << 30 => (b as f64 / (1u64 << 30) as f64, "GiB"),
        b if b >= 1 << 20 => (b as f64 / (1u64 << 20) as f64, "MiB"),
        b if b >= 1 << 10 => (b as f64 / 1024.0, "KiB"),
        b => return format!("{b} B"),
    };
    if v.fract() < 0.05 || v >= 100.0 {
        format!("{v:.0} {unit}")
    } else {
        format!("{v:.1} {unit}")
    }
}

/// Seconds for people: `45 s`, `12 min`, `3.2 h`.
fn fmt_duration(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

/// `twin status`'s headline and the lines under it: protected or not and why, role,
/// generation, backup, epoch rate, last pause, held output — with units, rounded.
fn headline(v: &serde_json::Value) -> Vec<String> {
    let generation = v["arbiter"]["generation"]
        .as_u64()
        .map(|g| format!(", arbiter generation {g}"))
        .unwrap_or_default();
    let mut out = Vec::new();
    match v["role"].as_str().unwrap_or("") {
        "primary" => {
            let backup = v["backup"].as_str().unwrap_or("?");
            out.push(if v["protected"].as_bool() == Some(true) {
                format!("Protected by {backup}{generation}")
            } else {
                format!(
                    "Not protected: {}{generation}",
                    v["why_not"].as_str().unwrap_or("unknown")
                )
            });
            out.push(format!(
                "  role primary, mode {}, backup {backup}, session generation {}",
                v["mode"].as_str().unwrap_or("?"),
                v["sessions"].as_u64().unwrap_or(0)
            ));
            out.push(format!(
                "  epochs {:.1}/s (interval {}), last epoch {}, backup {} behind",
                v["checkpoint_rate_hz"].as_f64().unwrap_or(0.0),
                fmt_ms(v["interval_ms"].as_f64().unwrap_or(0.0)),
                v["epoch"].as_u64().unwrap_or(0),
                v["backup_lag_epochs"].as_u64().unwrap_or(0)
            ));
            out.push(format!(
                "  pause {} median, {} p99; ack {} median",
                fmt_ms(v["pause_us"]["median"].as_f64().unwrap_or(0.0) / 1e3),
                fmt_ms(v["pause_us"]["p99"].as_f64().unwrap_or(0.0) / 1e3),
                fmt_ms(v["ack_latency_us"]["median"].as_f64().unwrap_or(0.0) / 1e3)
            ));
            out.push(format!(
                "  held output {} frames ({})",
                v["held_output"]["frames"].as_u64().unwrap_or(0),
                fmt_bytes(v["held_output"]["bytes"].as_u64().unwrap_or(0))
            ));
            if let Some(s) = v["protected_for_s"].as_f64() {
                out.push(format!("  protected for {}", fmt_duration(s)));
            }
        }
        "backup" => {
            out.push(format!(
                "Backup: {}{}",
                v["state"].as_str().unwrap_or("unknown"),
                v["committed_epoch"]
                    .as_u64()
                    .map(|e| format!(", committed epoch {e}"))
                    .unwrap_or_default()
            ));
            out.push(format!(
                "  listening on {}, {} received, last apply {}",
                v["listen"].as_str().unwrap_or("?"),
                fmt_bytes(v["bytes_received"].as_u64().unwrap_or(0)),
                fmt_ms(v["last_apply_us"].as_f64().unwrap_or(0.0) / 1e3)
            ));
        }
        role => {
            out.push(format!("Not protected: no backup ({role})"));
            out.push(format!(
                "  VM {}, {} RAM, {} vCPU, up {}",
                v["vm"].as_str().unwrap_or("?"),
                fmt_bytes(v["mem_size"].as_u64().unwrap_or(0)),
                v["vcpus"].as_u64().unwrap_or(0),
                fmt_duration(v["uptime_s"].as_f64().unwrap_or(0.0))
            ));
            let r = &v["restore"];
            if r.is_object() {
                let n = |k: &str| r[k].as_u64().unwrap_or(0);
                out.push(format!(
                    "  restored ({}): {} of {} pages resident{}, {} faults served, {} prefetched, {} read, {}",
                    r["mode"].as_str().unwrap_or("?"),
                    n("resident"),
                    n("data_pages"),
                    if r["complete"].as_bool() == Some(true) {
                        String::new()
                    } else {
                        format!(" ({} to load)", n("remaining"))
                    },
                    n("faults"),
                    n("prefetched"),
                    fmt_bytes(n("bytes_read")),
                    fmt_ms(r["elapsed_ms"].as_f64().unwrap_or(0.0))
                ));
            }
        }
    }
    out
}

/// `twin status`.
fn print_status(a: &StatusArgs) -> Result<ExitCode> {
    let v = match client(&a.control, Request::Status) {
        Ok(v) => v,
        Err(e) if a.check => {
            eprintln!("twin: {e:#}");
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e),
    };
    let protected = v["protected"].as_bool() == Some(true);
    if a.json {
        println!("{v}");
    } else {
        for line in headline(&v) {
            println!("{line}");
        }
        if let Some(o) = v.as_object() {
            println!();
            for (k, v) in o {
                println!("{k:>24}: {v}");
            }
        }
    }
    Ok(if a.check && !protected {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `twin snapshot`: the directory resolved here (the VM process runs elsewhere), progress
/// on stderr while it is written, then its outcome.
fn snapshot_cmd(a: SnapshotArgs) -> Result<ExitCode> {
    let dir = std::path::absolute(&a.dir)
        .with_context(|| format!("cannot resolve {}", a.dir.display()))?;
    eprintln!("snapshot: writing {}", dir.display());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let done = done.clone();
        let t0 = Instant::now();
        std::thread::spawn(move || {
            let mut next = Duration::from_secs(5);
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(100));
                if t0.elapsed() >= next {
                    eprintln!(
                        "snapshot: still writing ({})",
                        fmt_duration(t0.elapsed().as_secs_f64())
                    );
                    next += Duration::from_secs(5);
                }
            }
        })
    };
    let r = client(
        &a.control,
        Request::Snapshot(SnapshotRequest {
            dir,
            incremental: a.incremental,
            stop: a.stop,
        }),
    );
    done.store(true, std::sync::atomic::Ordering::Release);
    let _ = ticker.join();
    let v = r?;
    eprintln!(
        "snapshot: {} pages ({}) in {}, VM paused {}",
        v["pages"].as_u64().unwrap_or(0),
        fmt_bytes(v["bytes"].as_u64().unwrap_or(0)),
        v["dir"].as_str().unwrap_or("?"),
        fmt_ms(v["paused_ms"].as_f64().unwrap_or(0.0))
    );
    println!("{v}");
    Ok(ExitCode::SUCCESS)
}

/// `twin events`: the process's events as JSON lines on stdout.
fn print_events(a: &EventsArgs) -> Result<ExitCode> {
    use std::io::Write as _;
    let mut stream = control::events(&a.control, a.since, a.epochs, a.follow)?;
    let mut out = std::io::stdout().lock();
    while let Some(e) = stream.next_event()? {
        let line = serde_json::to_string(&e).context("encoding an event")?;
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn client(path: &Path, req: Request) -> Result<serde_json::Value> {
    match control::request(path, &req)? {
        Response::Ok(v) | Response::Accepted(v) => Ok(v),
        Response::Error(e) => bail!("{e}"),
    }
}

fn print_ok(v: serde_json::Value) -> ExitCode {
    println!("{v}");
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    if let Err(e) = init_logging() {
        eprintln!("twin: {e}");
        return ExitCode::from(2);
    }
    let argv = match config::expand_args(std::env::args_os().collect(), &Cli::command()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("twin: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    if let Err(e) = twin_failpoints::validate_env() {
        eprintln!("twin: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Restore(args) => restore(args),
        Command::Clone(args) => clone_cmd(args),
        Command::Protect(args) => protect(args),
        Command::Demo(args) => lab::exec("demo", &args),
        Command::Bench(args) => lab::exec("bench", &args),
        Command::Backup(args) => backup(args),
        Command::Events(a) => print_events(&a),
        Command::Keygen(a) => twin_link::Key::generate()
            .and_then(|k| k.write_new(&a.file))
            .map(|()| {
                println!("{}", a.file.display());
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
        Command::Failover(a) => client(&a.control, Request::Failover).map(print_ok),
        Command::Snapshot(a) => snapshot_cmd(a),
        Command::Pause(a) => client(&a.control, Request::Pause).map(print_ok),
        Command::Resume(a) => client(&a.control, Request::Resume).map(print_ok),
        Command::Status(a) => print_status(&a),
        Command::Completions(a) => {
            clap_complete::generate(a.shell, &mut Cli::command(), "twin", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map(|()| ExitCode::SUCCESS)
            .context("writing the man page"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line naming the problem, with its causes.
            eprintln!("twin: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logging as `TWIN_LOG` (an `EnvFilter`, default `info`; an invalid one is an error) and
/// `TWIN_LOG_FORMAT` (`text`, the default, or `json`: one JSON object per line) say.
fn init_logging() -> Result<()> {
    let filter = match std::env::var("TWIN_LOG") {
        Ok(spec) => tracing_subscriber::EnvFilter::try_new(&spec)
            .map_err(|e| anyhow::anyhow!("TWIN_LOG={spec:?} is not a log filter: {e}"))?,
        Err(std::env::VarError::NotPresent) => tracing_subscriber::EnvFilter::new("info"),
        Err(e) => bail!("TWIN_LOG: {e}"),
    };
    let json = match std::env::var("TWIN_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") | Err(std::env::VarError::NotPresent) => false,
        Ok(other) => bail!("TWIN_LOG_FORMAT={other:?}: give text or json"),
        Err(e) => bail!("TWIN_LOG_FORMAT: {e}"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if json {
        builder.json().with_current_span(false).init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    Ok(())
}
