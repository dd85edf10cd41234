//! The KVM VM: its fd, in-kernel irqchip and PIT, and the memory slot of guest RAM.

use std::io;
use std::sync::Arc;

use kvm_bindings::{
    kvm_msi, kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};

use crate::memory::Memory;
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
    #[error("connecting an eventfd to guest interrupt {gsi} failed")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Slot number of guest RAM.
pub const RAM_SLOT: u32 = 0;

/// A KVM VM with its guest RAM registered.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    /// The RAM slot; behind a lock because dirty logging is toggled on a shared VM.
    ram: std::sync::Mutex<kvm_userspace_memory_region>,
}

impl Vm {
    /// Opens `/dev/kvm`, creates the VM, the irqchip (PIC, IOAPIC, LAPICs) and PIT, and
    /// registers `memory` as slot 0.
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
        let ram = kvm_userspace_memory_region {
            slot: RAM_SLOT,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: memory.size(),
            userspace_addr: memory.host_address(),
        };
        Self::set_region(&fd, ram)?;
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
            ram: std::sync::Mutex::new(ram),
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
        ram.flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        Self::set_region(&self.fd, *ram)
    }

    pub fn dirty_logging(&self) -> bool {
        self.ram.lock().expect("ram slot lock poisoned").flags & KVM_MEM_LOG_DIRTY_PAGES != 0
    }

    /// Pages the guest wrote since the previous call, one bit per page in u64 words.
    pub fn take_dirty_log(&self) -> Result<Vec<u64>, VmError> {
        let size = self.ram.lock().expect("ram slot lock poisoned").memory_size as usize;
        self.fd
            .get_dirty_log(RAM_SLOT, size)
            .map_err(VmError::DirtyLog)
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
