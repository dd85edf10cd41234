//! Building a VM: a new one around the built-in guest, or one restored from a saved state.
//!
//! Both go the same way: the KVM VM (irqchip, PIT, guest RAM registered), its vCPUs, then
//! the devices on their buses. A new VM then gets the host's CPUID, the built-in guest and
//! the boot contract's registers. A restore loads each device from its state as it is
//! built, then the VM's state, then each vCPU's (CPUID first): the order KVM needs, see
//! [`crate::state`]. Host resources (the TAP, the console) come from the caller either way.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, RwLock};

use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootParams, EntryPoint};
use crate::devices;
use crate::devices::bus::Bus;
use crate::devices::pci::PciRoot;
use crate::devices::serial::{SerialArgs, SerialDevice};
use crate::devices::tap::Tap;
use crate::devices::virtio::blk::disk::{DiskImage, WriteLog};
use crate::devices::virtio::blk::{BlkHost, BlkResources, VirtioBlk};
use crate::devices::virtio::net::{NetResources, TapSink, VirtioNet};
use crate::dirty::DirtyTracker;
use crate::layout::*;
use crate::memory::Memory;
use crate::power::PowerDevice;
use crate::state;
use crate::vcpu::{self, Vcpu, VcpuControl, VcpuError};
use crate::vm::Vm;
use crate::{
    DeviceError, DeviceStates, DiskDevice, DiskSpec, HostResources, MachineConfig, MachineState,
    NetDevice, VmConfig, VmEvent, Vmm, VmmError,
};
use twin_devices::Persist;

/// Most vCPUs a VM may have.
const MAX_VCPUS: u8 = 64;

impl Vmm {
    /// Builds the VM: memory, KVM VM, vCPUs, devices, and loads the built-in guest.
    pub fn new(cfg: VmConfig) -> Result<Self, VmmError> {
        let memory = Memory::new(cfg.mem_size)?;
        let disks = cfg
            .disks
            .iter()
            .enumerate()
            .map(|(index, d)| {
                DiskImage::open(&d.path, d.read_only)
                    .map(Arc::new)
                    .map_err(|source| VmmError::Disk { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let config = MachineConfig {
            mem_size: cfg.mem_size,
            vcpus: cfg.vcpus,
            mac: cfg.net.as_ref().map(|n| n.mac),
            ip: Some(cfg.ip),
            disks: disks
                .iter()
                .map(|d| DiskSpec {
                    capacity: d.capacity(),
                    read_only: d.read_only(),
                })
                .collect(),
        };
        let tap = match &cfg.net {
            Some(n) => Some(Tap::open(&n.tap).map_err(VmmError::Tap)?),
            None => None,
        };
        let host = HostResources {
            tap,
            console: cfg.console,
            disks,
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
            boot_vcpu(v, entry)?;
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
    pub(crate) fn build(
        config: MachineConfig,
        memory: Memory,
        host: HostResources,
        saved: Option<&MachineState>,
    ) -> Result<Self, VmmError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
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
        let devices = Devices::build(
            &config,
            &memory,
            &vm,
            host,
            saved.map(|s| &s.devices),
            &events_tx,
        )?;

        // KVM state after the devices, VM before vCPUs (see `state`).
        let (vm, mut vcpus) = match saved {
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
        for v in &mut vcpus {
            v.set_saved_msrs(msr_indices.clone());
        }

        Ok(Vmm {
            vcpus,
            control: Arc::new(VcpuControl::default()),
            pio: Arc::new(RwLock::new(devices.pio)),
            mmio: Arc::new(RwLock::new(devices.mmio)),
            serial: devices.serial,
            pci: devices.pci,
            net: devices.net,
            disks: devices.disks,
            events_tx,
            events_rx: Mutex::new(events_rx),
            vm,
            memory,
            dirty: DirtyTracker::default(),
            config,
            last_snapshot: None,
            loader: None,
            started: false,
        })
    }
}

/// The devices of one VM and the buses they sit on.
struct Devices {
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    pci: Arc<Mutex<PciRoot>>,
    net: Option<NetDevice>,
    disks: Vec<DiskDevice>,
}

impl Devices {
    /// Creates every device, from `saved` when restoring, and puts it on its bus.
    fn build(
        config: &MachineConfig,
        memory: &Memory,
        vm: &Vm,
        host: HostResources,
        saved: Option<&DeviceStates>,
        events: &Sender<VmEvent>,
    ) -> Result<Self, VmmError> {
        let restore_error = VmmError::RestoreDevices;
        let mut pio = Bus::new();
        let mut mmio = Bus::new();

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
        let serial = match saved {
            None => SerialDevice::new(serial_irq, host.console),
            Some(d) => {
                let args = SerialArgs {
                    irq: serial_irq,
                    out: host.console,
                };
                SerialDevice::restore(args, &d.serial)
                    .map_err(|e| restore_error(DeviceError::Serial(e)))?
            }
        };
        let serial = Arc::new(Mutex::new(serial));
        pio.insert(serial.clone(), COM1_PORT, COM1_PORT_SIZE)?;
        let power = PowerDevice::new(events.clone());
        pio.insert(Arc::new(Mutex::new(power)), POWER_PORT, POWER_PORT_SIZE)?;

        let mut pci = match saved {
            None => PciRoot::new(),
            Some(d) => {
                PciRoot::restore((), &d.pci).map_err(|e| restore_error(DeviceError::PciRoot(e)))?
            }
        };
        let saved_net = saved.and_then(|d| d.net.as_ref());
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
                        .map_err(|e| restore_error(DeviceError::Net(e)))?,
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
        if host.disks.len() != config.disks.len() {
            return Err(VmmError::DiskCount {
                saved: config.disks.len(),
                given: host.disks.len(),
            });
        }
        if let Some(d) = saved {
            if d.disks.len() != config.disks.len() {
                return Err(VmmError::DiskCount {
                    saved: d.disks.len(),
                    given: config.disks.len(),
                });
            }
        }
        let mut disks = Vec::with_capacity(host.disks.len());
        for (index, image) in host.disks.into_iter().enumerate() {
            let log = Arc::new(WriteLog::new(image.capacity()));
            let res = BlkResources {
                mem: memory.guest_memory().clone(),
                msi: vm.msi_sender(),
                model: BlkHost {
                    disk: image.clone(),
                    log: log.clone(),
                },
            };
            // BARs after the NIC's, one per disk, at the same place on restore.
            let bar = PCI_MMIO_START + (index as u64 + 1) * devices::virtio::pci::BAR_SIZE;
            let dev = match saved.map(|d| &d.disks[index]) {
                None => VirtioBlk::new_blk(bar, &format!("twin-disk{index}"), res)
                    .map_err(|source| VmmError::Blk { index, source })?,
                Some(st) => VirtioBlk::restore(res, st)
                    .map_err(|source| restore_error(DeviceError::Disk { index, source }))?,
            };
            let bar = dev.bar_addr();
            let dev = Arc::new(Mutex::new(dev));
            pci.add_device(dev.clone()).map_err(VmmError::Pci)?;
            mmio.insert(dev.clone(), bar, devices::virtio::pci::BAR_SIZE)?;
            disks.push(DiskDevice {
                dev,
                image,
                log,
                worker: None,
            });
        }
        let pci = Arc::new(Mutex::new(pci));
        pio.insert(pci.clone(), PCI_CONFIG_PORT, PCI_CONFIG_PORT_SIZE)?;
        Ok(Devices {
            pio,
            mmio,
            serial,
            pci,
            net,
            disks,
        })
    }
}

/// Puts a new vCPU in the state the boot contract starts the guest in: long mode at CPL 3
/// at `entry`, the LAPIC software-enabled. vCPU 0 runs the guest; every other vCPU is
/// *parked*: halted with interrupts disabled (`RFLAGS.IF` clear, `KVM_MP_STATE_HALTED`), so
/// that nothing but an INIT or NMI — which nothing sends it — wakes it. The built-in guest
/// is single-threaded (one stack, one TSS: two vCPUs entering it would share both), but a
/// parked vCPU is still a vCPU of the VM: paused, captured and restored with the others.
fn boot_vcpu(v: &Vcpu, entry: EntryPoint) -> Result<(), VmmError> {
    let ioctl = |op: &'static str| move |source| VcpuError::Ioctl { op, source };
    let fd = v.fd();
    let sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    fd.set_sregs(&boot::initial_sregs(sregs))
        .map_err(ioctl("KVM_SET_SREGS"))?;
    let mut regs = boot::initial_regs(entry);
    if v.id != 0 {
        regs.rflags = boot::PARKED_RFLAGS;
    }
    fd.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
    let lapic_error = |source| VmmError::Lapic { vcpu: v.id, source };
    let mut lapic = fd.get_lapic().map_err(lapic_error)?;
    boot::initial_lapic(&mut lapic);
    fd.set_lapic(&lapic).map_err(lapic_error)?;
    if v.id != 0 {
        fd.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_HALTED,
        })
        .map_err(ioctl("KVM_SET_MP_STATE"))?;
    }
    Ok(())
}
