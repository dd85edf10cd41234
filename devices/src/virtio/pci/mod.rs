//! The virtio-pci modern transport (virtio 1.2, 4.1) with MSI-X.
//!
//! One 64-bit memory BAR (BAR 0, [`BAR_SIZE`] bytes) holds every register block:
//!
//! | BAR offset | block |
//! | --- | --- |
//! | `0x0000` | common configuration (`virtio_pci_common_cfg`) |
//! | `0x1000` | ISR status (read clears) |
//! | `0x2000` | device-specific configuration |
//! | `0x3000` | notifications: queue `n` at `0x3000 + 4n` |
//! | `0x6000` | MSI-X table |
//! | `0x7000` | MSI-X pending-bit array |
//!
//! The object is both the MMIO [`BusDevice`] for that BAR and the [`PciDevice`] behind
//! configuration mechanism #1: put one `Arc<Mutex<VirtioPciDevice<_>>>` on both. Queue
//! notifications are handled synchronously in the vCPU thread that took the MMIO exit.
//! There is no INTx: a driver that does not enable MSI-X gets no interrupts.
//!
//! Files: the common configuration registers and feature/status negotiation
//! (`common_cfg.rs`), the virtqueues and what a device model sees of the transport while it
//! processes them (`queue.rs`), save and restore (`persist.rs`).

mod common_cfg;
mod persist;
mod queue;
#[cfg(test)]
pub(crate) mod tests;

use std::sync::Arc;

use virtio_queue::QueueT;

use super::{VirtioDevice, VIRTIO_MSI_NO_VECTOR};
use crate::bus::BusDevice;
use crate::interrupt::MsiSender;
use crate::pci::configuration::COMMAND_MEMORY_SPACE;
use crate::pci::msix::{Msix, MsixError, MsixLayout, MSIX_CAP_ID};
use crate::pci::{BarKind, BarReprogram, PciConfigError, PciConfiguration, PciDevice, PciHeader};
use crate::GuestMem;

pub use persist::{VirtioPciArgs, VirtioPciDeviceState, VirtioPciState, VirtioPersistError};
use queue::Notifier;
pub use queue::{QueueContext, VirtQueue, VirtQueueState};

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// BAR index of the register BAR.
pub const BAR_INDEX: usize = 0;
const COMMON_OFFSET: u64 = 0x0000;
/// `sizeof(struct virtio_pci_common_cfg)`.
const COMMON_LEN: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const ISR_LEN: u64 = 1;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses (`queue_notify_off` = queue index).
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x6000;
const MSIX_PBA_OFFSET: u64 = 0x7000;

// From Linux's `virtio_pci.h` and the PCI ids (virtio-bindings has neither).
const PCI_VENDOR_ID_REDHAT_QUMRANET: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
const PCI_CAP_ID_VNDR: u8 = 0x09;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;
/// ISR bits: a queue interrupt / a configuration change.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;
/// Avail-ring flag: the driver does not want an interrupt when buffers are used.
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 =
    virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;

/// Errors building or restoring a virtio-pci device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("PCI configuration space")]
    Config(#[from] PciConfigError),
    #[error("MSI-X")]
    Msix(#[from] MsixError),
    #[error("queue {index} of the saved state is invalid")]
    QueueState {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("saved state is of PCI device {saved:#010x}, not {device:#010x}")]
    DeviceMismatch { saved: u32, device: u32 },
    #[error("saved state has {found} queues, the device has {expected}")]
    QueueCount { found: usize, expected: usize },
}

/// A virtio device on the virtio-pci modern transport.
pub struct VirtioPciDevice<D> {
    config: PciConfiguration,
    msix_cap_reg: usize,
    pci_cfg_cap: usize,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    queues: Vec<VirtQueue>,
    notifier: Notifier,
    mem: GuestMem,
    device: D,
}

/// Where the transport's capabilities landed in configuration space.
struct CapOffsets {
    msix: usize,
    pci_cfg: usize,
}

fn build_config<D: VirtioDevice>(
    device: &D,
    msix: &Msix,
    bar_addr: u64,
) -> Result<(PciConfiguration, CapOffsets), PciConfigError> {
    let (class, subclass) = device.pci_class();
    let mut config = PciConfiguration::new(PciHeader {
        vendor_id: PCI_VENDOR_ID_REDHAT_QUMRANET,
        device_id: VIRTIO_PCI_DEVICE_ID_BASE + device.device_type(),
        revision: 1,
        class,
        subclass,
        prog_if: 0,
        subsystem_vendor_id: PCI_VENDOR_ID_REDHAT_QUMRANET,
        subsystem_id: 0x40,
    });
    config.add_bar(
        BAR_INDEX,
        bar_addr,
        BAR_SIZE,
        BarKind::Mmio64 {
            prefetchable: false,
        },
    )?;
    // The VMM plays firmware: decoding and bus mastering are on from the start.
    config.set_reg(1, u32::from(COMMAND_MEMORY_SPACE | 0x4));

    let num_queues = device.queue_max_sizes().len() as u64;
    let vcap = |cfg_type: u8, offset: u64, length: u64, extra: usize| {
        // virtio_pci_cap after vndr/next: cap_len, cfg_type, bar, id, padding[2], offset,
        // length.
        let mut body = vec![(16 + extra) as u8, cfg_type, BAR_INDEX as u8, 0, 0, 0];
        body.extend_from_slice(&(offset as u32).to_le_bytes());
        body.extend_from_slice(&(length as u32).to_le_bytes());
        body
    };
    let none = |len: usize| vec![0u8; len];
    let b = vcap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_LEN, 0);
    config.add_capability(PCI_CAP_ID_VNDR, &b, &none(b.len()))?;
    let b = vcap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_LEN, 0);
    config.add_capability(PCI_CAP_ID_VNDR, &b, &none(b.len()))?;
    let b = vcap(
        VIRTIO_PCI_CAP_DEVICE_CFG,
        DEVICE_CFG_OFFSET,
        DEVICE_CFG_LEN,
        0,
    );
    config.add_capability(PCI_CAP_ID_VNDR, &b, &none(b.len()))?;
    let mut b = vcap(
        VIRTIO_PCI_CAP_NOTIFY_CFG,
        NOTIFY_OFFSET,
        num_queues * u64::from(NOTIFY_MULTIPLIER),
        4,
    );
    b.extend_from_slice(&NOTIFY_MULTIPLIER.to_le_bytes());
    config.add_capability(PCI_CAP_ID_VNDR, &b, &none(b.len()))?;
    // VIRTIO_PCI_CAP_PCI_CFG: a window into the BAR through configuration space. The
    // driver writes bar/offset/length, then accesses pci_cfg_data.
    let mut b = vcap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 4);
    b.extend_from_slice(&[0; 4]);
    let mut mask = none(b.len());
    mask[2] = 0xff;
    mask[6..18].fill(0xff);
    let pci_cfg = config.add_capability(PCI_CAP_ID_VNDR, &b, &mask)?;

    let (body, mask) = msix.capability(MsixLayout {
        table_bar: BAR_INDEX as u8,
        table_offset: MSIX_TABLE_OFFSET as u32,
        pba_bar: BAR_INDEX as u8,
        pba_offset: MSIX_PBA_OFFSET as u32,
    });
    let msix_off = config.add_capability(MSIX_CAP_ID, &body, &mask)?;
    Ok((
        config,
        CapOffsets {
            msix: msix_off,
            pci_cfg,
        },
    ))
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// Creates the device with BAR 0 at `bar_addr` (aligned to [`BAR_SIZE`], in the MMIO
    /// window). MSI-X gets one vector per queue plus one for configuration changes.
    pub fn new(
        device: D,
        mem: GuestMem,
        msi: Arc<dyn MsiSender>,
        bar_addr: u64,
    ) -> Result<Self, VirtioPciError> {
        let sizes = device.queue_max_sizes();
        let msix = Msix::new(sizes.len() + 1, msi)?;
        let (config, caps) = build_config(&device, &msix, bar_addr)?;
        let queues = sizes.iter().map(|&s| VirtQueue::new(s)).collect();
        Ok(Self {
            config,
            msix_cap_reg: caps.msix / 4,
            pci_cfg_cap: caps.pci_cfg,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            queues,
            notifier: Notifier {
                msix,
                isr: 0,
                msix_config: VIRTIO_MSI_NO_VECTOR,
                device_status: 0,
                config_generation: 0,
            },
            mem,
            device,
        })
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Current address of BAR 0 (where it must be on the MMIO bus).
    pub fn bar_addr(&self) -> u64 {
        self.config.bars().first().map_or(0, |b| b.addr)
    }

    /// The device status register (virtio `device_status`).
    pub fn device_status(&self) -> u8 {
        self.notifier.device_status
    }

    /// Runs `f` with the device model and its queue context (for device worker threads,
    /// which call this with the device lock held).
    pub fn with_queues<R>(&mut self, f: impl FnOnce(&mut D, &mut QueueContext<'_>) -> R) -> R {
        let mut ctx = QueueContext {
            mem: &self.mem,
            queues: &mut self.queues,
            notifier: &mut self.notifier,
        };
        f(&mut self.device, &mut ctx)
    }

    /// Tells the driver the device configuration changed (e.g. link status).
    pub fn config_changed(&mut self) {
        self.notifier.config_generation = self.notifier.config_generation.wrapping_add(1);
        self.notifier.signal_config();
    }

    fn activate(&mut self) {
        if !self.notifier.live() {
            tracing::warn!(
                status = self.notifier.device_status,
                "DRIVER_OK without FEATURES_OK; queues stay stopped"
            );
            return;
        }
        let mem = &self.mem;
        let mut bad = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            // Queues broken by a bad write before DRIVER_OK get reported now.
            if q.queue.ready() && (q.broken || !q.queue.is_valid(mem)) {
                bad.push(i);
            }
        }
        self.with_queues(|device, ctx| {
            for i in bad {
                ctx.fail_queue(i, &"rings are not inside guest memory");
            }
            device.activate(ctx);
        });
        tracing::debug!("virtio device activated");
    }

    fn notify(&mut self, offset: u64) {
        let index = (offset / u64::from(NOTIFY_MULTIPLIER)) as usize;
        if index >= self.queues.len() {
            tracing::warn!(
                queue = index,
                "notification for a queue that does not exist"
            );
            return;
        }
        if !self.notifier.live() {
            tracing::debug!(queue = index, "notification before DRIVER_OK ignored");
            return;
        }
        self.with_queues(|device, ctx| device.queue_notify(index, ctx));
    }

    /// A read of BAR 0 at `offset`.
    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.common_read(o - COMMON_OFFSET, data),
            o if (ISR_OFFSET..ISR_OFFSET + ISR_LEN).contains(&o) => {
                data.fill(0);
                data[0] = self.notifier.isr;
                // Reading the ISR acknowledges it.
                self.notifier.isr = 0;
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                data.fill(0);
                self.device.read_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.notifier.msix.table_len())
                .contains(&o) =>
            {
                self.notifier.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + self.notifier.msix.pba_len()).contains(&o) => {
                self.notifier.msix.read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {
                tracing::debug!(offset, len, "read of an unbacked virtio BAR offset");
                data.fill(0);
            }
        }
    }

    /// A write to BAR 0 at `offset`.
    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        let notify_len = self.queues.len() as u64 * u64::from(NOTIFY_MULTIPLIER);
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.common_write(o - COMMON_OFFSET, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + notify_len).contains(&o) => {
                self.notify(o - NOTIFY_OFFSET)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.notifier.msix.table_len())
                .contains(&o) =>
            {
                self.notifier.msix.write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => tracing::warn!(
                offset,
                len = data.len(),
                "write to a read-only or unbacked virtio BAR offset ignored"
            ),
        }
    }

    /// Access through the VIRTIO_PCI_CAP_PCI_CFG window: `bar`, `offset`, `length` as the
    /// driver programmed them in the capability.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let bar = (self.config.read_reg(cap / 4 + 1) & 0xff) as usize;
        let offset = u64::from(self.config.read_reg(cap / 4 + 2));
        let length = self.config.read_reg(cap / 4 + 3) as usize;
        let ok = bar == BAR_INDEX
            && matches!(length, 1 | 2 | 4)
            && offset % length as u64 == 0
            && offset + length as u64 <= BAR_SIZE;
        if !ok {
            tracing::warn!(
                bar,
                offset,
                length,
                "invalid VIRTIO_PCI_CAP_PCI_CFG access ignored"
            );
        }
        ok.then_some((offset, length))
    }
}

impl<D: VirtioDevice> BusDevice for VirtioPciDevice<D> {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.bar_read(offset, data)
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.bar_write(offset, data)
    }
}

impl<D: VirtioDevice> PciDevice for VirtioPciDevice<D> {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config_register(&mut self, reg: usize) -> u32 {
        if reg == self.pci_cfg_cap / 4 + 4 {
            if let Some((offset, length)) = self.pci_cfg_window() {
                let mut buf = [0u8; 4];
                self.bar_read(offset, &mut buf[..length]);
                return u32::from_le_bytes(buf);
            }
        }
        self.config.read_reg(reg)
    }

    fn write_config_register(
        &mut self,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarReprogram> {
        let moved = self.config.write(reg, offset, data);
        if reg == self.msix_cap_reg {
            let ctl = (self.config.read_reg(reg) >> 16) as u16;
            self.notifier.msix.set_message_control(ctl);
        } else if reg == self.pci_cfg_cap / 4 + 4 {
            if let Some((bar_offset, length)) = self.pci_cfg_window() {
                let value = self.config.read_reg(reg).to_le_bytes();
                self.bar_write(bar_offset, &value[..length]);
            }
        }
        moved
    }
}
