//! `twin`: Remus-style high availability for KVM virtual machines.

mod lab;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use twin_vmm::memory::Memory;
use twin_vmm::snapshot;
use twin_vmm::{HostResources, NetConfig, SnapshotOptions, VmConfig, VmEvent, Vmm};

use twin::args::{self, Cidr, Mac, Size};
use twin::control::{self, Control, Request, Response};
use twin::signals::Termination;
use twin_api::{EventKind, EventLog, Role as ApiRole};

#[derive(Parser)]
#[command(
    name = "twin",
    version,
    about = "Remus-style high availability for KVM virtual machines"
)]
struct Cli {
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
    /// Show the state of a running VM process.
    Status(StatusArgs),
    /// Resume a VM left paused by `snapshot --stop` or `restore --paused`.
    Resume(StatusArgs),
    /// Run a VM protected by a backup: checkpoints every epoch, output held until acked.
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
}

#[derive(Args)]
struct EventsArgs {
    /// Control socket of the process.
    #[arg(long, default_value = "/run/twin/twin.sock")]
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
    #[arg(long)]
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
    /// What to do with held output when the backup is lost: release it and run
    /// unprotected, or hold it until a backup returns.
    #[arg(long, value_enum, default_value_t = LossArg::Release)]
    on_backup_loss: LossArg,
    /// Silence from the backup longer than this means it is lost.
    #[arg(long, default_value = "500ms")]
    backup_timeout: args::Millis,
    #[command(flatten)]
    auth: AuthArgs,
    #[command(flatten)]
    arbiter: ArbiterArgs,
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    host: HostArgs,
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
    #[arg(long)]
    tap: String,
    /// Silence from the primary longer than this means it is dead.
    #[arg(long, default_value = "100ms")]
    heartbeat_timeout: args::Millis,
    /// Write the guest console (after a takeover) to this file instead of standard output.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Control socket of this process.
    #[arg(long, default_value = "/run/twin/backup.sock")]
    control: PathBuf,
    #[command(flatten)]
    auth: AuthArgs,
    #[command(flatten)]
    arbiter: ArbiterArgs,
    /// Where the replicas of the protected VM's disks live, `DIR/disk-<i>.img` (sparse,
    /// flushed as each epoch commits); after a takeover the VM runs on them. Needed for a
    /// VM with disks.
    #[arg(long, value_name = "DIR")]
    replica_dir: Option<PathBuf>,
    /// After a takeover, protect the VM again to this standby backup (`HOST:PORT`, or a
    /// comma-separated list tried in order): a live initial sync, then epochs, with the
    /// same key and arbiter.
    #[arg(long)]
    reprotect: Option<String>,
}

#[derive(Args)]
struct FailoverArgs {
    /// Control socket of the backup process.
    #[arg(long, default_value = "/run/twin/backup.sock")]
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
    /// Guest RAM, e.g. 256M or 1G (a multiple of 2M, at most 3G).
    #[arg(long, default_value = "256M")]
    mem: Size,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
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
    /// Linux kernel (bzImage) to boot instead of the built-in guest (not supported yet).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// initramfs for --kernel (not supported yet).
    #[arg(long)]
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
    #[arg(long)]
    tap: String,
    /// Write the guest console to this file instead of standard output.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Control socket of this VM process.
    #[arg(long, default_value = "/run/twin/twin.sock")]
    control: PathBuf,
}

#[derive(Args)]
struct SnapshotArgs {
    /// Directory to create for the snapshot.
    dir: PathBuf,
    /// Store only the pages written since the previous snapshot of this VM process.
    #[arg(long)]
    incremental: bool,
    /// Leave the VM paused after the snapshot (for moving it elsewhere).
    #[arg(long)]
    stop: bool,
    /// Control socket of the VM process.
    #[arg(long, default_value = "/run/twin/twin.sock")]
    control: PathBuf,
}

#[derive(Args)]
struct RestoreArgs {
    /// Snapshot directory (the top layer of a chain).
    dir: PathBuf,
    /// Leave the VM paused after restoring (resume with the control socket's Resume).
    #[arg(long)]
    paused: bool,
    /// Where to build each of the snapshot's disks (a new file, in order: the first is disk
    /// 0); the snapshot itself is left as it is.
    #[arg(long = "disk", value_name = "PATH")]
    disks: Vec<PathBuf>,
    #[command(flatten)]
    host: HostArgs,
}

#[derive(Args)]
struct StatusArgs {
    /// Control socket of the VM process.
    #[arg(long, default_value = "/run/twin/twin.sock")]
    control: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
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
}

fn take_snapshot(
    vmm: &mut Vmm,
    session: &mut Session,
    dir: &Path,
    incremental: bool,
    stop: bool,
) -> Result<serde_json::Value> {
    let report = vmm.snapshot(dir, SnapshotOptions { incremental, stop })?;
    session.snapshots += 1;
    Ok(serde_json::json!({
        "dir": dir,
        "incremental": incremental,
        "pages": report.pages,
        "bytes": report.bytes,
        "mem_size": vmm.memory().size(),
        "paused_ms": report.paused.as_secs_f64() * 1e3,
        "stopped": stop,
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
    }
}

fn handle_request(
    vmm: &mut Vmm,
    session: &mut Session,
    events: &EventLog,
    req: Request,
) -> Response {
    let r = match req {
        Request::Status => serde_json::to_value(status(vmm, session)).map_err(Into::into),
        Request::Snapshot {
            dir,
            incremental,
            stop,
        } => take_snapshot(vmm, session, &dir, incremental, stop).inspect(|v| {
            events.emit(EventKind::SnapshotWritten {
                dir: dir.display().to_string(),
                pages: v["pages"].as_u64().unwrap_or(0),
                paused_ms: v["paused_ms"].as_f64().unwrap_or(0.0),
            });
        }),
        Request::Resume => {
            resume_devices(vmm);
            vmm.resume();
            Ok(serde_json::json!({"vm": "running"}))
        }
        Request::Failover => Err(anyhow::anyhow!(
            "this VM is not protected; failover applies to `twin backup`"
        )),
        Request::Events { .. } => Err(anyhow::anyhow!(
            "events are served by the control socket itself"
        )),
    };
    match r {
        Ok(v) => Response::Ok(v),
        Err(e) => Response::Error(format!("{e:#}")),
    }
}

/// Runs a started VM until it powers off or a termination signal arrives, answering
/// control requests meanwhile.
fn serve_vm(
    mut vmm: Vmm,
    control: &Control,
    sigs: Termination,
    role: &'static str,
    events: &EventLog,
) -> Result<ExitCode> {
    forward_signals(sigs, vmm.event_sender())?;
    let mut session = Session {
        role,
        started: Instant::now(),
        snapshots: 0,
    };
    let outcome = loop {
        if let Some(outcome) = next_vm_outcome(&vmm) {
            break outcome;
        }
        while let Ok((req, reply)) = control.try_recv() {
            let _ = reply.send(handle_request(&mut vmm, &mut session, events, req));
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
        Ok(other) => Err(anyhow::anyhow!("VM stopped: {other:?}")),
        Err(RecvTimeoutError::Timeout) => return None,
        Err(RecvTimeoutError::Disconnected) => {
            Err(anyhow::anyhow!("the VM's event channel closed"))
        }
    })
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let sigs = Termination::block()?;
    let events = EventLog::new();
    let mut vmm = Vmm::new(args.vm.to_config(&args.host)?).context("cannot start the VM")?;
    let control = control::serve(&args.host.control, events.clone())?;
    vmm.start().context("cannot start the VM")?;
    tracing::info!(mem = args.vm.mem.0, vcpus = args.vm.vcpus, tap = %args.host.tap, "VM running");
    emit_running(&events, &vmm, ApiRole::Standalone);
    serve_vm(vmm, &control, sigs, "standalone", &events)
}

fn restore(args: RestoreArgs) -> Result<ExitCode> {
    let sigs = Termination::block()?;
    let t0 = Instant::now();
    let state = snapshot::read_state(&args.dir)
        .with_context(|| format!("cannot restore {}", args.dir.display()))?;
    let memory = Memory::new(state.config.mem_size).context("cannot create guest memory")?;
    let pages = snapshot::load_memory(&args.dir, &memory)
        .with_context(|| format!("cannot restore {}", args.dir.display()))?;
    let disks = snapshot::restore_disks(&args.dir, &args.disks)
        .with_context(|| format!("cannot restore the disks of {}", args.dir.display()))?;
    let tap =
        twin_vmm::devices::tap::Tap::open(&args.host.tap).context("cannot open the VM's TAP")?;
    let host = HostResources {
        tap: Some(tap),
        console: args.host.console()?,
        disks,
    };
    let mut vmm = Vmm::restore(&state, memory, host).context("cannot rebuild the VM")?;
    let events = EventLog::new();
    let control = control::serve(&args.host.control, events.clone())?;
    if args.paused {
        vmm.start_paused().context("cannot start the VM")?;
    } else {
        vmm.start().context("cannot start the VM")?;
    }
    tracing::info!(pages, paused = args.paused, elapsed_ms = t0.elapsed().as_millis() as u64, dir = %args.dir.display(), "VM restored and running");
    emit_running(&events, &vmm, ApiRole::Standalone);
    serve_vm(vmm, &control, sigs, "standalone", &events)
}

fn protect(args: ProtectArgs) -> Result<ExitCode> {
    use twin_primary::{LossPolicy, ProtectConfig};

    let sigs = Termination::block()?;
    let link = args.auth.link()?;
    if link.key.is_none() {
        tracing::warn!("the replication link is NOT authenticated (--no-auth): anyone who reaches the backup's port can pose as it and stop this VM");
    }
    let vmm = Vmm::new(args.vm.to_config(&args.host)?).context("cannot start the VM")?;
    // Output commit from the first frame: the guest's output waits for the first backup.
    let output = OutputCommit::attach(&vmm, false)?;
    let events = EventLog::new();
    let control = control::serve(&args.host.control, events.clone())?;
    let mut vmm = vmm;
    vmm.start().context("cannot start the VM")?;
    forward_signals(sigs, vmm.event_sender())?;
    emit_running(&events, &vmm, ApiRole::Primary);
    let cfg = ProtectConfig {
        backup: args.backup.clone(),
        interval: args.interval.0,
        eager_gap: (!args.no_eager).then_some(args.eager_gap.0),
        on_backup_loss: match args.on_backup_loss {
            LossArg::Release => LossPolicy::Release,
            LossArg::Hold => LossPolicy::Hold,
        },
        backup_timeout: args.backup_timeout.0,
        heartbeat_interval: twin_link::HEARTBEAT_INTERVAL,
        // A stable identity for this VM's replication sessions.
        vm_id: twin_wire::VmId(*uuid_like(&args.vm.mac.0)),
        link,
        arbiter: args.arbiter.arbitration(format!(
            "primary {} (pid {})",
            host_name(),
            std::process::id()
        ))?,
        arbiter_seen: None,
    };
    tracing::info!(backup = %args.backup, interval_ms = args.interval.0.as_millis() as u64, "VM running, protecting");
    serve_protected(std::sync::Arc::new(vmm), output, cfg, &control, &events)
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
        vmm.set_net_sink(Box::new(twin_primary::NetbufSink(netbuf.sink())));
        let tap = vmm.tap().context("a protected VM needs a NIC")?;
        let release = netbuf
            .spawn_release_thread("net-release", move |frame| tap.write_vnet(frame))
            .context("spawning the output release thread")?;
        Ok(OutputCommit { netbuf, release })
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
            let resp = match req {
                Request::Status => {
                    Response::Ok(serde_json::to_value(primary.status()).unwrap_or_default())
                }
                Request::Resume => Response::Error("a protected VM cannot be paused".into()),
                Request::Snapshot { .. } => {
                    Response::Error("snapshots of a protected VM are taken by its backup".into())
                }
                Request::Failover => Response::Error(
                    "failover is requested from the backup (`twin failover`)".into(),
                ),
                Request::Events { .. } => {
                    Response::Error("events are served by the control socket itself".into())
                }
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
    };
    // The TAP and the port first: a backup that cannot serve must not claim the control
    // socket (and a second one must never take a running backup's).
    let backup = Backup::bind(cfg)?;
    let control = control::serve(&args.control, events.clone())?;
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
                            Err(e) => Response::Error(e),
                        });
                    })))
                }
                _ => {
                    let _ = reply.send(Response::Error("the backup has no running VM yet".into()));
                    Ok(())
                }
            };
            if forwarded.is_err() {
                let _ = reply.send(Response::Error("the backup is shutting down".into()));
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
            match &args.reprotect {
                None => serve_vm(vmm, &control, pending, "primary (took over)", &events),
                Some(standby) => {
                    // The same process goes on as this VM's primary, under its identity and
                    // (with an arbiter) as the record's owner it just became.
                    forward_signals(pending, vmm.event_sender())?;
                    let output = OutputCommit::attach(&vmm, true)?;
                    let cfg = twin_primary::ProtectConfig {
                        backup: standby.clone(),
                        interval: Duration::from_millis(25),
                        eager_gap: Some(Duration::from_millis(2)),
                        on_backup_loss: twin_primary::LossPolicy::Release,
                        backup_timeout: Duration::from_millis(500),
                        heartbeat_interval: twin_link::HEARTBEAT_INTERVAL,
                        vm_id,
                        link: args.auth.link()?,
                        arbiter: arbitration,
                        arbiter_seen,
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

/// The first line of `twin status`: protected or not, and why.
fn headline(v: &serde_json::Value) -> Option<String> {
    let generation = v["arbiter"]["generation"]
        .as_u64()
        .map(|g| format!(", arbiter generation {g}"))
        .unwrap_or_default();
    match v["role"].as_str()? {
        "primary" if v["protected"].as_bool() == Some(true) => Some(format!(
            "PROTECTED by {}{generation}",
            v["backup"].as_str()?
        )),
        "primary" => Some(format!(
            "NOT PROTECTED: {}{generation}",
            v["why_not"].as_str().unwrap_or("unknown")
        )),
        "backup" => Some(format!(
            "BACKUP: {}",
            v["state"].as_str().unwrap_or("unknown")
        )),
        _ => None,
    }
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
        Response::Ok(v) => Ok(v),
        Response::Error(e) => bail!("{e}"),
    }
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    if let Err(e) = twin_failpoints::validate_env() {
        eprintln!("twin: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Restore(args) => restore(args),
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
        Command::Failover(a) => client(&a.control, Request::Failover).map(|v| {
            println!("{v}");
            ExitCode::SUCCESS
        }),
        Command::Snapshot(a) => client(
            &a.control,
            Request::Snapshot {
                dir: a.dir,
                incremental: a.incremental,
                stop: a.stop,
            },
        )
        .map(|v| {
            println!("{v}");
            ExitCode::SUCCESS
        }),
        Command::Resume(a) => client(&a.control, Request::Resume).map(|v| {
            println!("{v}");
            ExitCode::SUCCESS
        }),
        Command::Status(a) => client(&a.control, Request::Status).map(|v| {
            if a.json {
                println!("{v}");
            } else if let Some(o) = v.as_object() {
                if let Some(line) = headline(&v) {
                    println!("{line}");
                }
                for (k, v) in o {
                    println!("{k:>16}: {v}");
                }
            }
            ExitCode::SUCCESS
        }),
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TWIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}
