//! KVM virtual machine monitor: guest memory, vCPUs, platform and virtio devices, state
//! capture.
//!
//! [`Vmm`] owns one VM. It is built from a [`VmConfig`], started, and then either runs until
//! the guest powers off or is controlled (paused, checkpointed, resumed) by the caller.

pub mod boot;
pub mod container;
pub mod devices;
pub mod dirty;
pub mod interrupt;
pub mod layout;
pub mod memory;
pub mod persist;
pub mod snapshot;
pub mod state;
pub mod vcpu;
pub mod vm;

use std::net::Ipv4Addr;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};

use kvm_bindings::kvm_lapic_state;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{BootError, BootParams};
use crate::devices::bus::{Bus, BusError};
use crate::devices::pci::{PciError, PciRoot};
use crate::devices::power::PowerDevice;
use crate::devices::serial::{ConsoleOut, SerialArgs, SerialDevice};
use crate::devices::tap::{Tap, TapError};
use crate::devices::virtio::net::{NetError, NetResources, NetSink, NetWorker, TapSink, VirtioNet};
use crate::devices::{DeviceError, Pausable};
use crate::dirty::DirtyTracker;
pub use crate::dirty::TrackingSpan;
use crate::layout::*;
use crate::memory::{Memory, MemoryError};
pub use crate::persist::Persist;
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

/// Guest-visible configuration a restored VM must be rebuilt with.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MachineConfig {
    pub mem_size: u64,
    pub vcpus: u8,
    pub mac: Option<[u8; 6]>,
    /// The guest's address when the host knows it (built-in guest), for the gratuitous
    /// ARP a restored VM announces itself with.
    pub ip: Option<Ipv4Addr>,
}

/// State of every device, one field per device, each from that device's
/// [`Persist::save`]: a device that cannot save makes the whole capture fail (it is never
/// left out).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct DeviceStates {
    pub serial: devices::serial::SerialDeviceState,
    pub pci: devices::pci::PciRootState,
    pub net: Option<devices::virtio::net::VirtioNetState>,
}

/// The whole VM except guest memory: what a checkpoint or snapshot carries beside pages.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    pub config: MachineConfig,
    /// Saved before KVM state (see `Vmm::capture_state`).
    pub devices: DeviceStates,
    pub vm: state::VmState,
    pub vcpus: Vec<state::VcpuState>,
}

impl MachineState {
    pub fn encode(&self) -> Result<Vec<u8>, container::ContainerError> {
        container::encode(container::Kind::MachineState, self)
    }

    pub fn decode(data: &[u8]) -> Result<Self, container::ContainerError> {
        container::decode(
            data,
            container::Kind::MachineState,
            container::DEFAULT_MAX_PAYLOAD,
        )
    }
}

/// Host resources a restored VM gets from its caller, not from the saved state.
pub struct HostResources {
    /// The TAP for the NIC, already open (a backup holds its TAP from start-up so the
    /// bridge port is forwarding long before a takeover).
    pub tap: Option<Tap>,
    pub console: ConsoleOut,
}

/// Time spent in each phase of one checkpoint.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CheckpointTimings {
    /// From the pause request until every vCPU is parked.
    pub stop_ns: u64,
    pub device_state_ns: u64,
    pub kvm_state_ns: u64,
    pub harvest_ns: u64,
    pub copy_ns: u64,
    /// From the pause request until the vCPUs run again: the guest-visible pause.
    pub pause_ns: u64,
}

/// One checkpoint: the machine state and the pages written since the previous one.
pub struct Checkpoint {
    pub state: MachineState,
    /// Dirty-page bitmap (KVM's log OR the VMM's), one bit per page.
    pub dirty: Vec<u64>,
    /// Contents of the dirty pages, in bitmap order, `PAGE_SIZE` bytes each.
    pub pages: Vec<u8>,
    /// The tracking generations `dirty` covers (see [`dirty`]).
    pub tracking: TrackingSpan,
    pub timings: CheckpointTimings,
}

impl Checkpoint {
    /// Indices of the dirty pages, ascending.
    pub fn dirty_pages(&self) -> impl Iterator<Item = usize> + '_ {
        bitmap_pages(&self.dirty)
    }
}

/// The `source()` chain of an error, joined with ": " ("no further detail" if none): for
/// log lines that name the root cause, not just the outermost context.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push(c.to_string());
        cur = c.source();
    }
    if out.is_empty() {
        return "no further detail".into();
    }
    out.join(": ")
}

/// `e` and its causes on one line, `outer: cause: root cause`.
pub fn describe_error(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// Indices of the set bits of a page bitmap, ascending.
pub fn bitmap_pages(bitmap: &[u64]) -> impl Iterator<Item = usize> + '_ {
    bitmap.iter().enumerate().flat_map(|(w, &bits)| {
        let mut b = bits;
        std::iter::from_fn(move || {
            (b != 0).then(|| {
                let i = b.trailing_zeros() as usize;
                b &= b - 1;
                w * 64 + i
            })
        })
    })
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
    #[error("opening the NIC's TAP")]
    Tap(#[source] TapError),
    #[error("network device")]
    Net(#[source] NetError),
    #[error("placing a device on the PCI bus")]
    Pci(#[source] PciError),
    #[error("capturing or restoring KVM state")]
    State(#[from] state::StateError),
    #[error("saving the devices")]
    SaveDevices(#[source] DeviceError),
    #[error("restoring the devices")]
    RestoreDevices(#[source] DeviceError),
    #[error("the saved state has a network device but no TAP was given for it")]
    NoTap,
    #[error("the saved state has {saved} vCPUs, but {expected} were configured")]
    VcpuMismatch { saved: usize, expected: u8 },
}

/// One VM and its devices.
pub struct Vmm {
    // Field order is drop order: threads and devices before the VM, the VM before memory.
    vcpus: Vec<Vcpu>,
    control: Arc<VcpuControl>,
    pio: Arc<RwLock<Bus>>,
    mmio: Arc<RwLock<Bus>>,
    serial: Arc<Mutex<SerialDevice>>,
    pci: Arc<Mutex<PciRoot>>,
    net: Option<NetDevice>,
    events_tx: Sender<VmEvent>,
    events_rx: Mutex<Receiver<VmEvent>>,
    vm: Vm,
    memory: Memory,
    /// Generations of dirty tracking, and the lock that makes a harvest one step.
    dirty: DirtyTracker,
    config: MachineConfig,
    started: bool,
}

/// The NIC: the device, its TAP and, while running, its RX worker.
struct NetDevice {
    dev: Arc<Mutex<VirtioNet>>,
    tap: Arc<Tap>,
    worker: Option<NetWorker>,
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, reg: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[reg + i] = *b as i8;
    }
}

impl Vmm {
    /// Builds the VM: memory, KVM VM, vCPUs, devices, and loads the built-in guest.
    pub fn new(cfg: VmConfig) -> Result<Self, VmmError> {
        let memory = Memory::new(cfg.mem_size)?;
        let config = MachineConfig {
            mem_size: cfg.mem_size,
            vcpus: cfg.vcpus,
            mac: cfg.net.as_ref().map(|n| n.mac),
            ip: Some(cfg.ip),
        };
        let tap = match &cfg.net {
            Some(n) => Some(Tap::open(&n.tap).map_err(VmmError::Tap)?),
            None => None,
        };
        let host = HostResources {
            tap,
            console: cfg.console,
        };
        let vmm = Self::build(config, memory, host, None)?;
        let tsc_khz = vmm.vcpus[0].fd().get_tsc_khz().map_err(VmmError::TscKhz)? as u64;
        let params = BootParams {
            mem_size: cfg.mem_size,
            tsc_khz,
            ip: cfg.ip,
            prefix_len: cfg.prefix_len,
            gateway: cfg.gateway,
            guest_args: cfg.guest_args,
        };
        let entry = boot::load_builtin_guest(vmm.memory.guest_memory(), &cfg.guest_elf, &params)?;
        for v in &vmm.vcpus {
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
        Ok(vmm)
    }

    /// Rebuilds a VM from saved state and guest memory that already holds the guest's
    /// pages. Host resources (TAP, console) come from the caller.
    pub fn restore(
        state: &MachineState,
        memory: Memory,
        host: HostResources,
    ) -> Result<Self, VmmError> {
        Self::build(state.config.clone(), memory, host, Some(state))
    }

    /// Creates KVM VM, vCPUs and devices around `memory`; when restoring, devices, the VM
    /// and the vCPUs are then loaded from `saved`, in that order.
    fn build(
        config: MachineConfig,
        memory: Memory,
        host: HostResources,
        saved: Option<&MachineState>,
    ) -> Result<Self, VmmError> {
        let devices = saved.map(|s| &s.devices);
        if config.vcpus == 0 || config.vcpus > 64 {
            return Err(VmmError::VcpuCount(config.vcpus));
        }
        let vm = Vm::new(&memory)?;
        vcpu::register_kick_handler()?;

        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            let mut v = Vcpu::new(vm.fd(), id)?;
            if saved.is_none() {
                // A restored vCPU gets the CPUID of its state, below.
                v.configure_cpuid(vm.kvm(), config.vcpus)?;
            }
            vcpus.push(v);
        }

        let (events_tx, events_rx) = channel();
        let mut pio = Bus::new();
        let mmio = Bus::new();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
        let serial = match devices {
            None => SerialDevice::new(serial_irq, host.console),
            Some(d) => SerialDevice::restore(
                SerialArgs {
                    irq: serial_irq,
                    out: host.console,
                },
                &d.serial,
            )
            .map_err(|e| VmmError::RestoreDevices(DeviceError::Serial(e)))?,
        };
        let serial = Arc::new(Mutex::new(serial));
        pio.insert(serial.clone(), COM1_PORT, 8)?;
        pio.insert(
            Arc::new(Mutex::new(PowerDevice::new(events_tx.clone()))),
            POWER_PORT,
            1,
        )?;

        let mut mmio = mmio;
        let mut pci = match devices {
            None => PciRoot::new(),
            Some(d) => PciRoot::restore((), &d.pci)
                .map_err(|e| VmmError::RestoreDevices(DeviceError::PciRoot(e)))?,
        };
        let saved_net = devices.and_then(|d| d.net.as_ref());
        let net = match (config.mac, host.tap) {
            (Some(mac), Some(tap)) => {
                let tap = Arc::new(tap);
                let res = NetResources {
                    mem: memory.guest_memory().clone(),
                    msi: vm.msi_sender(),
                    model: TapSink::boxed(tap.clone()),
                };
                let dev = match saved_net {
                    None => VirtioNet::new_net(mac, PCI_MMIO_START, res).map_err(VmmError::Net)?,
                    Some(st) => VirtioNet::restore(res, st)
                        .map_err(|e| VmmError::RestoreDevices(DeviceError::Net(e)))?,
                };
                let bar = dev.bar_addr();
                let dev = Arc::new(Mutex::new(dev));
                // Devices are re-added in the same order on restore, so they keep their slots.
                pci.add_device(dev.clone()).map_err(VmmError::Pci)?;
                mmio.insert(dev.clone(), bar, devices::virtio::pci::BAR_SIZE)?;
                Some(NetDevice {
                    dev,
                    tap,
                    worker: None,
                })
            }
            (Some(_), None) if saved_net.is_some() => return Err(VmmError::NoTap),
            _ => None,
        };
        let pci = Arc::new(Mutex::new(pci));
        pio.insert(pci.clone(), PCI_CONFIG_PORT, PCI_CONFIG_PORT_SIZE)?;

        // KVM state after the devices, VM before vCPUs (see `state`).
        let (vm, vcpus) = match saved {
            None => (vm, vcpus),
            Some(s) => {
                if s.vcpus.len() != vcpus.len() {
                    return Err(VmmError::VcpuMismatch {
                        saved: s.vcpus.len(),
                        expected: config.vcpus,
                    });
                }
                let vm = Vm::restore(vm, &s.vm)?;
                let vcpus = vcpus
                    .into_iter()
                    .zip(&s.vcpus)
                    .map(|(v, st)| Vcpu::restore(v, st))
                    .collect::<Result<Vec<_>, _>>()?;
                (vm, vcpus)
            }
        };
        // Which MSRs a vCPU can read depends on its CPUID, so this comes after it is set.
        let msr_indices = state::saveable_msrs(vm.kvm(), &vcpus[0].fd())?;
        let mut vcpus = vcpus;
        for v in &mut vcpus {
            v.set_saved_msrs(msr_indices.clone());
        }

        Ok(Vmm {
            vcpus,
            control: Arc::new(VcpuControl::default()),
            pio: Arc::new(RwLock::new(pio)),
            mmio: Arc::new(RwLock::new(mmio)),
            serial,
            pci,
            net,
            events_tx,
            events_rx: Mutex::new(events_rx),
            vm,
            memory,
            dirty: DirtyTracker::default(),
            config,
            started: false,
        })
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), VmmError> {
        if let Some(net) = &mut self.net {
            net.worker =
                Some(NetWorker::start(net.dev.clone(), net.tap.clone()).map_err(VmmError::Net)?);
        }
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

    /// Like [`Vmm::start`], but the vCPUs park before running any guest code and the devices
    /// are paused; the VM runs on [`Vmm::resume_devices`] + [`Vmm::resume`].
    pub fn start_paused(&mut self) -> Result<(), VmmError> {
        self.pause_devices()?;
        self.control.pause_before_start();
        self.start()?;
        self.pause();
        Ok(())
    }

    /// The next event from vCPUs and devices, waiting at most `timeout`; the driver of the
    /// VM calls this from one thread.
    pub fn next_event(
        &self,
        timeout: std::time::Duration,
    ) -> Result<VmEvent, std::sync::mpsc::RecvTimeoutError> {
        self.events_rx
            .lock()
            .expect("event lock poisoned")
            .recv_timeout(timeout)
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

    /// Captures devices, then KVM VM state, then every vCPU. vCPUs must be paused and the
    /// caller must hold the device locks (see [`Vmm::checkpoint`]).
    fn capture_locked(
        &self,
        locked: &LockedDevices<'_>,
    ) -> Result<(MachineState, u64, u64), VmmError> {
        let t = std::time::Instant::now();
        // Devices first: a device quiescing may still raise an interrupt, which must land
        // in the LAPIC/IOAPIC state captured after it (Firecracker learned this).
        let devices = locked.save().map_err(VmmError::SaveDevices)?;
        let device_ns = t.elapsed().as_nanos() as u64;
        let vm = self.vm.save()?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(v.save()?);
        }
        let kvm_ns = t.elapsed().as_nanos() as u64 - device_ns;
        Ok((
            MachineState {
                config: self.config.clone(),
                devices,
                vm,
                vcpus,
            },
            device_ns,
            kvm_ns,
        ))
    }

    /// Runs `f` on the VM frozen: the caller has paused the vCPUs, and every device lock
    /// is held for the whole of `f`, so no device worker writes guest memory meanwhile. A
    /// snapshot writes memory from here; state captured here matches that memory.
    pub fn frozen<R>(&self, f: impl FnOnce(&Frozen<'_>) -> R) -> R {
        debug_assert!(self.is_paused(), "freeze only a paused VM");
        let frozen = Frozen {
            vmm: self,
            locked: self.lock_devices(),
        };
        f(&frozen)
    }

    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Holds every device lock: device workers (the virtio-net RX thread) write guest
    /// memory only under their lock, so with vCPUs paused and these held, guest memory
    /// and device state stand still.
    fn lock_devices(&self) -> LockedDevices<'_> {
        // Same order as a vCPU's config-space access: PCI root, then the device.
        let pci = self.pci.lock().expect("PCI root lock poisoned");
        let net = self
            .net
            .as_ref()
            .map(|n| n.dev.lock().expect("net device lock poisoned"));
        let serial = self.serial.lock().expect("serial lock poisoned");
        LockedDevices { net, pci, serial }
    }

    /// Pauses every device that works on its own (the NIC's RX): with the vCPUs paused too,
    /// the VM stands fully still (a VM stopped after a snapshot, or restored paused).
    pub fn pause_devices(&self) -> Result<(), VmmError> {
        if let Some(n) = &self.net {
            n.dev
                .lock()
                .expect("net device lock poisoned")
                .pause()
                .map_err(VmmError::Net)?;
        }
        Ok(())
    }

    /// Undoes [`Vmm::pause_devices`]. A device that fails to resume may stay idle until the
    /// guest next notifies it.
    pub fn resume_devices(&self) -> Result<(), VmmError> {
        if let Some(n) = &self.net {
            n.dev
                .lock()
                .expect("net device lock poisoned")
                .resume()
                .map_err(VmmError::Net)?;
        }
        Ok(())
    }

    /// Replaces where the guest's transmitted frames go (the output-commit buffer);
    /// returns the previous sink. No-op without a NIC.
    pub fn set_net_sink(&self, sink: Box<dyn NetSink>) -> Option<Box<dyn NetSink>> {
        let net = self.net.as_ref()?;
        Some(
            net.dev
                .lock()
                .expect("net device lock poisoned")
                .device_mut()
                .set_sink(sink),
        )
    }

    /// The NIC's TAP, for frames the host sends on the guest's behalf (gratuitous ARP).
    pub fn tap(&self) -> Option<Arc<Tap>> {
        self.net.as_ref().map(|n| n.tap.clone())
    }

    /// Why a device failed for good (the NIC's TAP disappeared), if one has: the VM can no
    /// longer do its job, and its driver should stop it (or hand it over to the backup).
    pub fn device_failure(&self) -> Option<String> {
        self.net.as_ref()?.worker.as_ref()?.failure()
    }
    /// Pauses the VM, captures its whole state, resumes it. No pages.
    pub fn capture_state(&self) -> Result<MachineState, VmmError> {
        self.pause();
        let locked = self.lock_devices();
        let r = self.capture_locked(&locked).map(|(s, _, _)| s);
        drop(locked);
        self.resume();
        r
    }

    /// Pages written since the previous harvest (KVM's log OR the VMM's bitmap), read while
    /// the guest runs: for the rounds of a live initial sync, where a page written again
    /// after being read is caught by the next round.
    pub fn harvest_dirty(&self) -> Result<Vec<u64>, VmmError> {
        Ok(self.dirty.harvest(&self.vm, &self.memory)?.0)
    }

    /// Starts dirty-page tracking: KVM's log on, both logs cleared. The next checkpoint
    /// returns the pages written from now on.
    pub fn start_dirty_tracking(&self) -> Result<(), VmmError> {
        self.dirty.start(&self.vm, &self.memory)?;
        Ok(())
    }

    /// Gives back the pages of a harvest whose consumer failed (`dirty` and `span` of a
    /// [`Checkpoint`]): the next harvest returns them again, so nothing written before the
    /// failure is missing from the next checkpoint or increment. True if the tracking is
    /// then as if the harvest had not happened (no other harvest since); false if another
    /// harvest came in between, whose span the next one cannot reach back over (see
    /// [`dirty`]). Safe while the guest runs.
    pub fn restore_dirty(&self, dirty: &[u64], span: TrackingSpan) -> bool {
        self.dirty.merge_back(&self.memory, dirty, span)
    }

    /// One epoch checkpoint: pause, capture device + KVM state, harvest the dirty pages
    /// (KVM's log OR the VMM's own bitmap) and copy them, resume. With `copy_pages` false
    /// only the bitmap is returned (the caller reads memory itself while the VM stays
    /// paused, e.g. for a snapshot that keeps the VM stopped).
    pub fn checkpoint(&self, copy_pages: bool) -> Result<Checkpoint, VmmError> {
        self.checkpoint_sealed(copy_pages, || ())
    }

    /// [`Vmm::checkpoint`], calling `seal` while the vCPUs are paused and the devices
    /// locked: the point where the guest's output of this epoch is exactly what it has
    /// transmitted so far (the output-commit buffer closes the epoch there).
    pub fn checkpoint_sealed(
        &self,
        copy_pages: bool,
        seal: impl FnOnce(),
    ) -> Result<Checkpoint, VmmError> {
        let t0 = std::time::Instant::now();
        self.pause();
        let stop_ns = t0.elapsed().as_nanos() as u64;
        let locked = self.lock_devices();
        seal();
        let r = self.checkpoint_locked(&locked, copy_pages);
        drop(locked);
        self.resume();
        let mut cp = r?;
        cp.timings.stop_ns = stop_ns;
        cp.timings.pause_ns = t0.elapsed().as_nanos() as u64;
        Ok(cp)
    }

    fn checkpoint_locked(
        &self,
        locked: &LockedDevices<'_>,
        copy_pages: bool,
    ) -> Result<Checkpoint, VmmError> {
        let (state, device_state_ns, kvm_state_ns) = self.capture_locked(locked)?;
        let t = std::time::Instant::now();
        let (dirty, tracking) = self.dirty.harvest(&self.vm, &self.memory)?;
        let harvest_ns = t.elapsed().as_nanos() as u64;
        let t = std::time::Instant::now();
        let mut pages = Vec::new();
        if copy_pages {
            let ram = self.memory.as_slice();
            let n: usize = dirty.iter().map(|w| w.count_ones() as usize).sum();
            pages.reserve_exact(n * memory::PAGE_SIZE);
            for p in bitmap_pages(&dirty) {
                pages.extend_from_slice(&ram[p * memory::PAGE_SIZE..(p + 1) * memory::PAGE_SIZE]);
            }
        }
        let copy_ns = t.elapsed().as_nanos() as u64;
        Ok(Checkpoint {
            state,
            dirty,
            pages,
            tracking,
            timings: CheckpointTimings {
                device_state_ns,
                kvm_state_ns,
                harvest_ns,
                copy_ns,
                ..Default::default()
            },
        })
    }

    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// Stops vCPUs and device workers; the VM can be dropped after this.
    pub fn shutdown(&mut self) {
        if self.started {
            self.control.stop(&mut self.vcpus);
            self.started = false;
        }
        if let Some(w) = self.net.as_mut().and_then(|n| n.worker.take()) {
            if let Err(e) = w.stop() {
                tracing::warn!("network worker ended with an error: {e}");
            }
        }
    }
}

/// A VM with vCPUs paused and device locks held; see [`Vmm::frozen`].
pub struct Frozen<'a> {
    vmm: &'a Vmm,
    locked: LockedDevices<'a>,
}

impl Frozen<'_> {
    /// The whole machine state.
    pub fn capture(&self) -> Result<MachineState, VmmError> {
        self.vmm.capture_locked(&self.locked).map(|(s, _, _)| s)
    }

    /// State plus the pages dirtied since the last harvest (copied if `copy_pages`).
    pub fn checkpoint(&self, copy_pages: bool) -> Result<Checkpoint, VmmError> {
        self.vmm.checkpoint_locked(&self.locked, copy_pages)
    }

    /// Guest RAM, which stands still while frozen.
    pub fn ram(&self) -> &[u8] {
        self.vmm.memory.as_slice()
    }

    /// Starts dirty tracking (KVM's log on, both logs cleared); returns the generation
    /// from which the next harvest counts: what a first full snapshot is the base of.
    pub fn start_dirty_tracking(&self) -> Result<u64, VmmError> {
        Ok(self.vmm.dirty.start(&self.vmm.vm, &self.vmm.memory)?)
    }

    /// Turns dirty tracking off again: undoes [`Frozen::start_dirty_tracking`] when what
    /// it was started for failed, so that a failure leaves the VM as it was (tracking off
    /// costs the guest no write faults).
    pub fn stop_dirty_tracking(&self) -> Result<(), VmmError> {
        Ok(self.vmm.dirty.stop(&self.vmm.vm)?)
    }

    /// [`Vmm::restore_dirty`]: gives back the pages of a checkpoint taken here whose
    /// consumer failed.
    pub fn restore_dirty(&self, dirty: &[u64], span: TrackingSpan) -> bool {
        self.vmm.restore_dirty(dirty, span)
    }
}

/// Device locks held during a capture (taken PCI root → NIC → serial; the NIC before its sink).
struct LockedDevices<'a> {
    net: Option<std::sync::MutexGuard<'a, VirtioNet>>,
    pci: std::sync::MutexGuard<'a, PciRoot>,
    serial: std::sync::MutexGuard<'a, SerialDevice>,
}

impl LockedDevices<'_> {
    /// Saves every device, stopping at the first that cannot.
    fn save(&self) -> Result<DeviceStates, DeviceError> {
        let net = self.net.as_ref().map(|n| n.save()).transpose();
        Ok(DeviceStates {
            net: net.map_err(DeviceError::Net)?,
            serial: self.serial.save().map_err(DeviceError::Serial)?,
            pci: self.pci.save().map_err(DeviceError::PciRoot)?,
        })
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
