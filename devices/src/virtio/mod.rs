//! virtio devices over the virtio-pci modern transport.
//!
//! [`pci::VirtioPciDevice`] is the transport (configuration space, capabilities, common
//! configuration, ISR, notifications, MSI-X, queue state); a [`VirtioDevice`] plugged into it
//! supplies the device type, features, device configuration and queue processing.
//! [`net`] is virtio-net on a TAP. A device model lives in a directory of its own beside it
//! (`net/`: the model, its worker, its persist; a block device would be `blk/`), and is
//! put on the buses as `VirtioPciDevice<Model>`.

pub mod blk;
pub mod net;
pub mod pci;

pub use pci::{QueueContext, VirtioPciDevice, VirtioPciError, VirtioPciState};

use virtio_bindings::virtio_config;

/// Feature bit: the device conforms to virtio 1.0 or later (no legacy interface).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;

/// Device-status bits (virtio 1.2, 2.1), as the one-byte `device_status` register holds
/// them.
pub mod status {
    use virtio_bindings::virtio_config as c;

    pub const ACKNOWLEDGE: u8 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
    pub const DRIVER: u8 = c::VIRTIO_CONFIG_S_DRIVER as u8;
    pub const DRIVER_OK: u8 = c::VIRTIO_CONFIG_S_DRIVER_OK as u8;
    pub const FEATURES_OK: u8 = c::VIRTIO_CONFIG_S_FEATURES_OK as u8;
    pub const NEEDS_RESET: u8 = c::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
    pub const FAILED: u8 = c::VIRTIO_CONFIG_S_FAILED as u8;
}

/// MSI-X vector number meaning "no vector" (`VIRTIO_MSI_NO_VECTOR` of Linux's
/// `virtio_pci.h`; virtio-bindings has no virtio-pci constants, so the transport's are
/// written out in [`pci`]).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Copies device configuration `cfg` from `offset` into `data`, bytes past its end reading as
/// zero: [`VirtioDevice::read_config`] for a device whose configuration is a byte image.
pub(crate) fn read_config_bytes(cfg: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| cfg.get(at))
            .copied()
            .unwrap_or(0);
    }
}

/// A virtio device model behind the transport.
pub trait VirtioDevice: Send {
    /// virtio device id (1 = network); the PCI device id is `0x1040 + id`.
    fn device_type(&self) -> u16;
    /// PCI class and subclass.
    fn pci_class(&self) -> (u8, u8);
    /// Largest size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver (the transport adds nothing).
    fn features(&self) -> u64;
    /// Reads device-specific configuration at `offset`; bytes past it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: queues are configured and may be used.
    fn activate(&mut self, ctx: &mut QueueContext<'_>);
    /// The driver reset the device (the transport has already reset the queues).
    fn reset(&mut self);
    /// The driver notified `queue` (called in the vCPU thread that took the MMIO exit).
    fn queue_notify(&mut self, queue: usize, ctx: &mut QueueContext<'_>);
}
