//! The KVM VM: its fd, in-kernel irqchip and PIT, and the memory slots of guest RAM (one
//! per [`crate::memory::RamRange`]: below the MMIO hole and above it).

use std::io;
use std::sync::Arc;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, kvm_msi, kvm_pit_config, kvm_userspace_memory_region,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::memory::{Memory, RamMap};
use twin_devices::interrupt::{MsiMessage, MsiSender};

/// Errors creating or configuring the KVM VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm (is KVM available and are we allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("creating the in-kernel irqchip failed")]
    Irqchip(#[source] kvm_ioctls::Error),
    #[error("creating the in-kernel PIT failed")]
    Pit(#[source] kvm_ioctls::Error),
    #[error("registering guest memory with KVM failed")]
    MemoryRegion(#[source] kvm_ioctls::Error),
    #[error("reading KVM's dirty log failed")]
    DirtyLog(#[source] kvm_ioctls::Error),
    #[error("KVM_CLEAR_DIRTY_LOG (re-protecting harvested pages) failed")]
    ClearDirtyLog(#[source] io::Error),
    #[error("enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 failed")]
    ManualProtect(#[source] kvm_ioctls::Error),
    #[error("connecting an eventfd to guest interrupt {gsi} failed")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Slot number of the first RAM range (at GPA 0); range `i` of the [`RamMap`] is slot
/// `RAM_SLOT + i`.
pub const RAM_SLOT: u32 = 0;

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`: `KVM_GET_DIRTY_LOG` stops write-protecting what it
/// reports; `KVM_CLEAR_DIRTY_LOG` does it for the pages asked (kernel `kvm.h`).
const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1;

// KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log), which kvm-ioctls
// does not wrap.
ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_clear_dirty_log
);

/// A KVM VM with its guest RAM registered.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    /// The RAM slots, in page-index order; behind a lock because dirty logging is toggled on
    /// a shared VM.
    ram: std::sync::Mutex<Vec<kvm_userspace_memory_region>>,
    /// Which page indices each slot holds: dirty logs are per slot, harvests per page index.
    map: RamMap,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` is on: reading the dirty log protects nothing,
    /// [`Vm::clear_dirty_log`] does (see [`crate::hot`]).
    manual_protect: bool,
}

impl Vm {
    /// Opens `/dev/kvm`, creates the VM, the irqchip (PIC, IOAPIC, LAPICs) and PIT, and
    /// registers each range of `memory` as a slot.
    pub fn new(memory: &Memory) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api));
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.create_irq_chip().map_err(VmError::Irqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::Pit)?;
        // Manual protection lets hot pages stay writable between harvests (`crate::hot`).
        // It must be on before the slot has dirty logging; without it (an old kernel),
        // every harvest re-protects everything, as before.
        let manual_protect =
            u64::try_from(kvm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into()))
                .is_ok_and(|flags| flags & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0);
        if manual_protect {
            let cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                args: [KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, 0, 0, 0],
                ..Default::default()
            };
            fd.enable_cap(&cap).map_err(VmError::ManualProtect)?;
        }
        let mut ram = Vec::new();
        for (i, (range, host)) in memory.host_ranges().enumerate() {
            let slot = kvm_userspace_memory_region {
                slot: RAM_SLOT + i as u32,
                flags: 0,
                guest_phys_addr: range.gpa,
                memory_size: range.size(),
                userspace_addr: host,
            };
            Self::set_region(&fd, slot)?;
            ram.push(slot);
        }
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
            ram: std::sync::Mutex::new(ram),
            map: memory.ram_map().clone(),
            manual_protect,
        })
    }

    fn set_region(fd: &VmFd, ram: kvm_userspace_memory_region) -> Result<(), VmError> {
        // SAFETY: the region describes memory owned by `Memory`, which the caller keeps
        // alive for as long as the VM (the `Vmm` owns both and drops the VM first).
        unsafe { fd.set_user_memory_region(ram) }.map_err(VmError::MemoryRegion)
    }

    /// Turns KVM's dirty-page logging of guest RAM on or off. Off costs nothing; on, every
    /// first guest write to a page after a harvest takes a fault.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        let mut ram = self.ram.lock().expect("ram slot lock poisoned");
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for i in 0..ram.len() {
            let slot = kvm_userspace_memory_region { flags, ..ram[i] };
            if let Err(e) = Self::set_region(&self.fd, slot) {
                // Put back the slots already switched: logging stays as it was, on all
                // slots or none.
                for done in &ram[..i] {
                    let _ = Self::set_region(&self.fd, *done);
                }
                return Err(e);
            }
        }
        for slot in ram.iter_mut() {
            slot.flags = flags;
        }
        Ok(())
    }

    pub fn dirty_logging(&self) -> bool {
        self.ram
            .lock()
            .expect("ram slot lock poisoned")
            .first()
            .is_some_and(|s| s.flags & KVM_MEM_LOG_DIRTY_PAGES != 0)
    }

    /// Whether harvests choose what to re-protect ([`Vm::clear_dirty_log`]); otherwise
    /// [`Vm::take_dirty_log`] re-protects everything it reports.
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// Re-protects the pages set in `bitmap` (one bit per page index of guest RAM) and
    /// clears them from the dirty log: the next write to each is logged again. Only with
    /// [`Vm::manual_protect`]; a no-op otherwise. One call per slot that has a page set,
    /// with that slot's part of the bitmap.
    pub fn clear_dirty_log(&self, bitmap: &[u64]) -> Result<(), VmError> {
        if !self.manual_protect || bitmap.iter().all(|&w| w == 0) {
            return Ok(());
        }
        let ram = self.ram.lock().expect("ram slot lock poisoned");
        for (slot, (range, part)) in ram.iter().zip(self.map.split(bitmap)) {
            // Only the words from the first to the last with a page set: the kernel walks
            // every word it is given, and a big guest's slot has tens of thousands.
            let Some(first) = part.iter().position(|&w| w != 0) else {
                continue;
            };
            let last = part.iter().rposition(|&w| w != 0).unwrap_or(first);
            let first_page = first * 64;
            let end_page = ((last + 1) * 64).min(range.pages);
            let mut bits = part[first..=last].to_vec();
            let mut arg = kvm_clear_dirty_log {
                slot: slot.slot,
                num_pages: u32::try_from(end_page - first_page).expect("a slot of at most 64 GiB"),
                first_page: first_page as u64,
                ..Default::default()
            };
            arg.__bindgen_anon_1.dirty_bitmap = bits.as_mut_ptr().cast();
            // SAFETY: KVM_CLEAR_DIRTY_LOG reads `num_pages` bits from `dirty_bitmap`, which
            // points at `bits`: `last - first + 1` u64s, at least num_pages rounded up to 64
            // bits, alive and unaliased for the call. `first_page` is 64-aligned (a word
            // boundary), and `num_pages` is whole words or reaches the slot's end (the only
            // case where the kernel accepts a count that is not a multiple of 64); bits past
            // the slot's end in the last word are never read. The kernel writes nothing back
            // into `arg`.
            let ret = unsafe { ioctl_with_ref(self.fd.as_ref(), KVM_CLEAR_DIRTY_LOG(), &arg) };
            if ret < 0 {
                return Err(VmError::ClearDirtyLog(io::Error::last_os_error()));
            }
        }
        Ok(())
    }

    /// Pages the guest wrote since the previous call (with [`Vm::manual_protect`]: since
    /// they were last cleared), one bit per page index in u64 words: the slots' logs
    /// concatenated in page-index order.
    pub fn take_dirty_log(&self) -> Result<Vec<u64>, VmError> {
        let ram = self.ram.lock().expect("ram slot lock poisoned");
        let mut logs = Vec::with_capacity(ram.len());
        for slot in ram.iter() {
            logs.push(
                self.fd
                    .get_dirty_log(slot.slot, slot.memory_size as usize)
                    .map_err(VmError::DirtyLog)?,
            );
        }
        Ok(self.map.concat(logs))
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// An MSI sender for devices.
    pub fn msi_sender(&self) -> Arc<dyn MsiSender> {
        Arc::new(KvmMsi(self.fd.clone()))
    }

    /// Makes a signal on `evt` raise interrupt line `gsi` (IOAPIC pin for legacy devices).
    pub fn register_irqfd(
        &self,
        evt: &vmm_sys_util::eventfd::EventFd,
        gsi: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }
}

/// `KVM_SIGNAL_MSI` on the VM fd.
struct KvmMsi(Arc<VmFd>);

impl MsiSender for KvmMsi {
    fn send_msi(&self, msg: MsiMessage) -> io::Result<()> {
        let msi = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        self.0
            .signal_msi(msi)
            .map(|_| ())
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}
