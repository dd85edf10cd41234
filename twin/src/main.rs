//! `twin`: Remus-style high availability for KVM virtual machines.

mod args;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use twin_vmm::{NetConfig, VmConfig, VmEvent, Vmm};

use crate::args::{Cidr, Mac, Size};

#[derive(Parser)]
#[command(name = "twin", version, about = "Remus-style high availability for KVM virtual machines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a VM with the built-in guest, unprotected.
    Run(VmArgs),
}

/// Options describing the VM, shared by every command that starts one.
#[derive(Args, Clone)]
struct VmArgs {
    /// Guest RAM, e.g. 256M or 1G (a multiple of 2M, at most 3G).
    #[arg(long, default_value = "256M")]
    mem: Size,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// TAP device (must exist, e.g. `ip tuntap add tap0 mode tap`) backing the guest NIC.
    #[arg(long)]
    tap: String,
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
    /// Write the guest console to this file instead of standard output.
    #[arg(long)]
    console: Option<PathBuf>,
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

impl VmArgs {
    fn to_config(&self) -> Result<VmConfig> {
        if self.kernel.is_some() || self.initrd.is_some() {
            bail!(
                "--kernel/--initrd (Linux guests) are not supported yet; omit them to run the built-in guest"
            );
        }
        let console: Box<dyn std::io::Write + Send> = match &self.console {
            Some(path) => Box::new(
                std::fs::File::create(path)
                    .with_context(|| format!("cannot create console file {}", path.display()))?,
            ),
            None => Box::new(std::io::stdout()),
        };
        Ok(VmConfig {
            mem_size: self.mem.0,
            vcpus: self.vcpus,
            net: Some(NetConfig { tap: self.tap.clone(), mac: self.mac.0 }),
            ip: self.ip.addr,
            prefix_len: self.ip.prefix_len,
            gateway: self.gateway,
            guest_args: self.guest_args.clone(),
            console,
            guest_elf: match &self.guest_elf {
                Some(path) => std::fs::read(path)
                    .with_context(|| format!("cannot read guest image {}", path.display()))?
                    .into(),
                None => twin_guest_image::GUEST_ELF.into(),
            },
        })
    }
}

/// Blocks the termination signals in this thread (and so in every thread spawned after),
/// and forwards them from a dedicated thread as VM events.
fn forward_signals(tx: std::sync::mpsc::Sender<VmEvent>) -> Result<()> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().context("blocking termination signals")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            if let Ok(sig) = set.wait() {
                tracing::info!("received {sig}, stopping the VM");
                if tx.send(VmEvent::Signal(sig as i32)).is_err() {
                    return;
                }
            }
        })
        .context("spawning the signal thread")?;
    Ok(())
}

fn run(args: VmArgs) -> Result<ExitCode> {
    let (tx, rx) = std::sync::mpsc::channel();
    forward_signals(tx.clone())?;
    let mut vmm = Vmm::new(args.to_config()?).context("cannot start the VM")?;
    // Forward the signal thread's events into the VMM's channel.
    let vm_tx = vmm.event_sender();
    std::thread::spawn(move || {
        while let Ok(ev) = rx.recv() {
            if vm_tx.send(ev).is_err() {
                return;
            }
        }
    });
    drop(tx);
    vmm.start().context("cannot start the VM")?;
    tracing::info!(mem = args.mem.0, vcpus = args.vcpus, tap = %args.tap, "VM running");
    let code = loop {
        match vmm.events().recv() {
            Ok(VmEvent::PowerOff(code)) => {
                tracing::info!(code, "guest powered off");
                break ExitCode::from(code);
            }
            Ok(VmEvent::Signal(_)) => break ExitCode::SUCCESS,
            Ok(VmEvent::VcpuFailed { vcpu, reason }) => {
                vmm.shutdown();
                bail!("vCPU {vcpu} failed: {reason}");
            }
            Ok(other) => {
                tracing::warn!("VM stopped: {other:?}");
                break ExitCode::FAILURE;
            }
            Err(_) => break ExitCode::FAILURE,
        }
    };
    vmm.shutdown();
    Ok(code)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TWIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
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
