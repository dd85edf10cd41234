//! KVM virtual machine monitor: guest memory, vCPUs, platform and virtio devices, state
//! capture.
//!
//! [`Vmm`] owns one VM. It is built from a [`VmConfig`], started, and then either runs until
//! the guest powers off or is controlled (paused, checkpointed, resumed) by the caller.

pub mod boot;
pub mod devices;
pub mod interrupt;
pub mod layout;
pub mod memory;
pub mod vcpu;
pub mod vm;

use std::net::Ipv4Addr;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};

use kvm_bindings::kvm_lapic_state;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{BootError, BootParams};
use crate::devices::bus::{Bus, BusError};
use crate::devices::power::PowerDevice;
use crate::devices::serial::{ConsoleOut, SerialDevice};
use crate::layout::*;
use crate::memory::{Memory, MemoryError};
use crate::vcpu::{Vcpu, VcpuControl, VcpuError};
use crate::vm::{Vm, VmError};

/// Something that happened to a running VM, reported to whoever drives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest wrote its exit status to the power-off port.
    PowerOff(u8),
    /// Triple fault or reset request.
    GuestReset { vcpu: u8 },
    /// `hlt` exited to user space (cannot happen with the in-kernel irqchip).
    GuestHalted { vcpu: u8 },
    /// `KVM_RUN` failed or returned an exit the VMM cannot handle.
    VcpuFailed { vcpu: u8, reason: String },
    /// A device worker failed.
    DeviceFailed(String),
    /// The process got a termination signal.
    Signal(i32),
}

/// Network configuration of the VM's NIC.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
}

/// What to build.
pub struct VmConfig {
    pub mem_size: u64,
    pub vcpus: u8,
    pub net: Option<NetConfig>,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub guest_args: String,
    pub console: ConsoleOut,
    /// The built-in guest's ELF image.
    pub guest_elf: std::borrow::Cow<'static, [u8]>,
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    #[error("KVM VM")]
    Vm(#[from] VmError),
    #[error("vCPU")]
    Vcpu(#[from] VcpuError),
    #[error("loading the built-in guest")]
    Boot(#[from] BootError),
    #[error("placing a device on a bus")]
    Bus(#[from] BusError),
    #[error("--vcpus must be between 1 and 64, not {0}")]
    VcpuCount(u8),
    #[error("creating an eventfd failed")]
    EventFd(#[source] std::io::Error),
    #[error("reading the TSC frequency from KVM failed")]
    TscKhz(#[source] kvm_ioctls::Error),
    #[error("initialising the LAPIC of vCPU {vcpu} failed")]
    Lapic {
        vcpu: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("network device")]
    Net(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// One VM and its devices.
pub struct Vmm {
    // Field order is drop order: threads and devices before the VM, the VM before memory.
    vcpus: Vec<Vcpu>,
    control: Arc<VcpuControl>,
    pio: Arc<RwLock<Bus>>,
    mmio: Arc<RwLock<Bus>>,
    serial: Arc<Mutex<SerialDevice>>,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
    vm: Vm,
    memory: Memory,
    started: bool,
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, reg: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[reg + i] = *b as i8;
    }
}

impl Vmm {
    /// Builds the VM: memory, KVM VM, vCPUs, devices, and loads the built-in guest.
    pub fn new(cfg: VmConfig) -> Result<Self, VmmError> {
        if cfg.vcpus == 0 || cfg.vcpus > 64 {
            return Err(VmmError::VcpuCount(cfg.vcpus));
        }
        let memory = Memory::new(cfg.mem_size)?;
        let vm = Vm::new(&memory)?;
        vcpu::register_kick_handler()?;

        let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
        for id in 0..cfg.vcpus {
            let v = Vcpu::new(vm.fd(), id)?;
            v.configure_cpuid(vm.kvm(), cfg.vcpus)?;
            vcpus.push(v);
        }
        let tsc_khz = vcpus[0].fd().get_tsc_khz().map_err(VmmError::TscKhz)? as u64;

        let (events_tx, events_rx) = channel();
        let mut pio = Bus::new();
        let mmio = Bus::new();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, cfg.console)));
        pio.insert(serial.clone(), COM1_PORT, 8)?;
        pio.insert(
            Arc::new(Mutex::new(PowerDevice::new(events_tx.clone()))),
            POWER_PORT,
            1,
        )?;

        let params = BootParams {
            mem_size: cfg.mem_size,
            tsc_khz,
            ip: cfg.ip,
            prefix_len: cfg.prefix_len,
            gateway: cfg.gateway,
            guest_args: cfg.guest_args,
        };
        let entry = boot::load_builtin_guest(memory.guest_memory(), &cfg.guest_elf, &params)?;
        for v in &vcpus {
            let fd = v.fd();
            let sregs = fd.get_sregs().map_err(|source| VcpuError::Ioctl {
                op: "KVM_GET_SREGS",
                source,
            })?;
            fd.set_sregs(&boot::initial_sregs(sregs))
                .map_err(|source| VcpuError::Ioctl {
                    op: "KVM_SET_SREGS",
                    source,
                })?;
            fd.set_regs(&boot::initial_regs(entry))
                .map_err(|source| VcpuError::Ioctl {
                    op: "KVM_SET_REGS",
                    source,
                })?;
            let mut lapic = fd
                .get_lapic()
                .map_err(|source| VmmError::Lapic { vcpu: v.id, source })?;
            set_lapic_reg(&mut lapic, 0xF0, 0x1FF); // SVR: software-enabled, spurious 0xFF
            set_lapic_reg(&mut lapic, 0x350, 0x1_0700); // LINT0: ExtINT, masked
            set_lapic_reg(&mut lapic, 0x360, 0x400); // LINT1: NMI
            fd.set_lapic(&lapic)
                .map_err(|source| VmmError::Lapic { vcpu: v.id, source })?;
        }

        Ok(Vmm {
            vcpus,
            control: Arc::new(VcpuControl::default()),
            pio: Arc::new(RwLock::new(pio)),
            mmio: Arc::new(RwLock::new(mmio)),
            serial,
            events_tx,
            events_rx,
            vm,
            memory,
            started: false,
        })
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), VmmError> {
        for v in &mut self.vcpus {
            v.start(
                self.control.clone(),
                self.pio.clone(),
                self.mmio.clone(),
                self.events_tx.clone(),
            )?;
        }
        self.started = true;
        Ok(())
    }

    /// Events from vCPUs and devices; the driver of the VM waits on this.
    pub fn events(&self) -> &Receiver<VmEvent> {
        &self.events_rx
    }

    /// A sender into the event channel (for signal forwarding).
    pub fn event_sender(&self) -> Sender<VmEvent> {
        self.events_tx.clone()
    }

    /// Stops every vCPU at its next exit and waits until all are parked.
    pub fn pause(&self) {
        self.control.pause(&self.vcpus);
    }

    pub fn resume(&self) {
        self.control.resume();
    }

    pub fn memory(&self) -> &Memory {
        &self.memory
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    pub fn vm_mut(&mut self) -> &mut Vm {
        &mut self.vm
    }

    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.serial
    }

    /// Stops vCPUs and device workers; the VM can be dropped after this.
    pub fn shutdown(&mut self) {
        if self.started {
            self.control.stop(&mut self.vcpus);
            self.started = false;
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
