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

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{status, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MSI_NO_VECTOR};
use crate::devices::bus::BusDevice;
use crate::devices::pci::configuration::COMMAND_MEMORY_SPACE;
use crate::devices::pci::msix::{Msix, MsixError, MsixLayout, MsixState, MSIX_CAP_ID};
use crate::devices::pci::{
    BarKind, BarReprogram, PciBar, PciConfigError, PciConfiguration, PciConfigurationState,
    PciDevice, PciHeader,
};
use crate::interrupt::MsiSender;
use crate::memory::GuestMem;
use crate::persist::Persist;

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
/// Avail-ring flag: the driver does not want an interrupt when buffers are used.
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
const ISR_CONFIG: u8 = 2;

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

/// Saved state of one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtQueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    pub msix_vector: u16,
    /// The guest misprogrammed the queue; it stays stopped until a device reset.
    pub broken: bool,
}

/// Saved state of the transport (the device model saves its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub pci: PciConfigurationState,
    pub msix: MsixState,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
    pub device_status: u8,
    pub config_generation: u8,
    pub msix_config: u16,
    pub isr: u8,
    pub queues: Vec<VirtQueueState>,
}

/// Saved state of a virtio-pci device: the transport's and its device model's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciDeviceState<S> {
    pub transport: VirtioPciState,
    pub device: S,
}

/// Host resources a (restored) virtio-pci device is built with: the guest memory mapping,
/// the interrupt sender, and what its device model needs of this host (`model`).
pub struct VirtioPciArgs<A> {
    pub mem: GuestMem,
    pub msi: Arc<dyn MsiSender>,
    pub model: A,
}

/// Errors saving or restoring a virtio-pci device: of the transport, or of its model
/// (typed by the model, so the chain names what failed).
#[derive(Debug, thiserror::Error)]
pub enum VirtioPersistError<E: std::error::Error + 'static> {
    #[error("virtio-pci transport")]
    Transport(#[source] VirtioPciError),
    #[error("virtio device model")]
    Device(#[source] E),
}

/// One virtqueue and its transport-side settings.
#[derive(Debug)]
pub struct VirtQueue {
    pub queue: Queue,
    pub msix_vector: u16,
    pub broken: bool,
}

impl VirtQueue {
    fn new(max_size: u16) -> Self {
        Self {
            // Power-of-two sizes up to 32768 are the device's own constants.
            queue: Queue::new(max_size).expect("queue max size is a power of two <= 32768"),
            msix_vector: VIRTIO_MSI_NO_VECTOR,
            broken: false,
        }
    }
}

/// A queue's rings live in guest memory; what the transport holds of it is the state.
impl Persist<'_> for VirtQueue {
    type State = VirtQueueState;
    type ConstructorArgs = ();
    type Error = virtio_queue::Error;

    fn save(&self) -> Result<VirtQueueState, virtio_queue::Error> {
        let q = self.queue.state();
        Ok(VirtQueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
            msix_vector: self.msix_vector,
            broken: self.broken,
        })
    }

    fn restore((): (), s: &VirtQueueState) -> Result<Self, virtio_queue::Error> {
        let queue = Queue::try_from(QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        })?;
        Ok(Self {
            queue,
            msix_vector: s.msix_vector,
            broken: s.broken,
        })
    }
}

/// Transport state a device needs to tell the driver things: interrupts and status.
#[derive(Debug)]
struct Notifier {
    msix: Msix,
    isr: u8,
    msix_config: u16,
    device_status: u8,
    config_generation: u8,
}

impl Notifier {
    /// The driver finished set-up and the device may use its queues.
    fn live(&self) -> bool {
        let s = self.device_status;
        s & status::DRIVER_OK != 0 && s & status::FEATURES_OK != 0 && s & status::FAILED == 0
    }

    fn signal_config(&mut self) {
        self.isr |= ISR_CONFIG;
        if self.msix_config != VIRTIO_MSI_NO_VECTOR {
            self.msix.trigger(self.msix_config);
        }
    }
}

/// What a device model gets while processing queues: guest memory, the queues, and the
/// means to interrupt the driver.
pub struct QueueContext<'a> {
    mem: &'a GuestMem,
    queues: &'a mut [VirtQueue],
    notifier: &'a mut Notifier,
}

impl<'a> QueueContext<'a> {
    pub fn mem(&self) -> &'a GuestMem {
        self.mem
    }

    /// Queue `index` if the device may use it now: the driver set DRIVER_OK, enabled the
    /// queue, and has not misprogrammed it.
    pub fn queue(&mut self, index: usize) -> Option<&mut Queue> {
        if !self.notifier.live() {
            return None;
        }
        let q = self.queues.get_mut(index)?;
        (q.queue.ready() && !q.broken).then_some(&mut q.queue)
    }

    /// Sends a used-buffer notification for queue `index`.
    pub fn signal_used(&mut self, index: usize) {
        let Some(q) = self.queues.get(index) else {
            return;
        };
        // Without EVENT_IDX the driver suppresses interrupts with the avail ring's
        // VIRTQ_AVAIL_F_NO_INTERRUPT flag (virtio-queue does not look at it): the built-in
        // guest sets it on TX, where every interrupt would cost an emulated CPL-0 entry.
        if !q.queue.event_idx_enabled() {
            let flags: Result<u16, _> = self.mem.read_obj(GuestAddress(q.queue.avail_ring()));
            if flags.is_ok_and(|f| f & VIRTQ_AVAIL_F_NO_INTERRUPT != 0) {
                return;
            }
        }
        self.notifier.isr |= ISR_QUEUE;
        if q.msix_vector != VIRTIO_MSI_NO_VECTOR {
            self.notifier.msix.trigger(q.msix_vector);
        }
    }

    /// Stops processing queue `index` after guest misbehaviour, and tells the driver the
    /// device needs a reset (DEVICE_NEEDS_RESET + configuration interrupt).
    pub fn fail_queue(&mut self, index: usize, reason: &dyn std::fmt::Display) {
        let Some(q) = self.queues.get_mut(index) else {
            return;
        };
        if !q.broken {
            tracing::warn!(queue = index, %reason, "guest misprogrammed a virtqueue; queue stopped until device reset");
            q.broken = true;
        }
        let s = self.notifier.device_status;
        if s & status::DRIVER_OK != 0 && s & status::NEEDS_RESET == 0 {
            self.notifier.device_status |= status::NEEDS_RESET;
            self.notifier.config_generation = self.notifier.config_generation.wrapping_add(1);
            self.notifier.signal_config();
        }
    }
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

    /// Rebuilds the transport from saved state around a restored device model, with fresh
    /// host resources (guest memory mapping, interrupt sender).
    fn restore_transport(
        state: &VirtioPciState,
        device: D,
        mem: GuestMem,
        msi: Arc<dyn MsiSender>,
    ) -> Result<Self, VirtioPciError> {
        let expected = device.queue_max_sizes().len();
        if state.queues.len() != expected {
            return Err(VirtioPciError::QueueCount {
                found: state.queues.len(),
                expected,
            });
        }
        let msix = Msix::restore(msi, &state.msix)?;
        // The capability layout is a function of the device; rebuild it to find the
        // offsets, then take the saved register contents.
        let (fresh, caps) = build_config(&device, &msix, 0)?;
        let config = PciConfiguration::restore((), &state.pci)?;
        if config.read_reg(0) != fresh.read_reg(0) {
            return Err(VirtioPciError::DeviceMismatch {
                saved: config.read_reg(0),
                device: fresh.read_reg(0),
            });
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                VirtQueue::restore((), q)
                    .map_err(|source| VirtioPciError::QueueState { index, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            config,
            msix_cap_reg: caps.msix / 4,
            pci_cfg_cap: caps.pci_cfg,
            device_feature_select: state.device_feature_select,
            driver_feature_select: state.driver_feature_select,
            driver_features: state.driver_features,
            queue_select: state.queue_select,
            queues,
            notifier: Notifier {
                msix,
                isr: state.isr,
                msix_config: state.msix_config,
                device_status: state.device_status,
                config_generation: state.config_generation,
            },
            mem,
            device,
        })
    }

    /// The transport's state (the device model saves its own).
    fn save_transport(&self) -> Result<VirtioPciState, VirtioPciError> {
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                q.save()
                    .map_err(|source| VirtioPciError::QueueState { index, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(VirtioPciState {
            pci: self.config.save()?,
            msix: self.notifier.msix.save()?,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            device_status: self.notifier.device_status,
            config_generation: self.notifier.config_generation,
            msix_config: self.notifier.msix_config,
            isr: self.notifier.isr,
            queues,
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

    fn reset(&mut self) {
        tracing::debug!("virtio device reset");
        for q in &mut self.queues {
            q.queue.reset();
            q.msix_vector = VIRTIO_MSI_NO_VECTOR;
            q.broken = false;
        }
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.notifier.isr = 0;
        self.notifier.msix_config = VIRTIO_MSI_NO_VECTOR;
        self.notifier.device_status = 0;
        self.device.reset();
    }

    fn selected_queue(&mut self) -> Option<&mut VirtQueue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn valid_vector(&self, v: u16) -> u16 {
        // An unusable vector reads back as NO_VECTOR: that is how the driver learns the
        // assignment failed.
        if usize::from(v) < self.notifier.msix.num_vectors() {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len();
        let value: u64 = match (offset, len) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.notifier.msix_config),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.notifier.device_status),
            (0x15, 1) => u64::from(self.notifier.config_generation),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => self
                .selected_queue()
                .map_or(0, |q| u64::from(q.queue.size())),
            (0x1a, 2) => self
                .selected_queue()
                .map_or(u64::from(VIRTIO_MSI_NO_VECTOR), |q| {
                    u64::from(q.msix_vector)
                }),
            (0x1c, 2) => self
                .selected_queue()
                .map_or(0, |q| u64::from(q.queue.ready())),
            (0x1e, 2) => u64::from(self.queue_select),
            (0x20..=0x37, 4 | 8) if offset % 4 == 0 && (len == 4 || offset % 8 == 0) => {
                let q = self.selected_queue();
                let full = q.map_or(0, |q| match (offset - 0x20) / 8 {
                    0 => q.queue.desc_table(),
                    1 => q.queue.avail_ring(),
                    _ => q.queue.used_ring(),
                });
                if len == 8 {
                    full
                } else {
                    full >> (offset % 8 * 8) & 0xffff_ffff
                }
            }
            _ => {
                // Not a natural-width field access (the spec forbids it). Reads have no
                // side effects, so serve the bytes anyway rather than confuse the driver.
                tracing::debug!(offset, len, "non-natural virtio common config read");
                let snap = self.common_snapshot();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = snap.get(offset as usize + i).copied().unwrap_or(0);
                }
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes()[..len]);
    }

    /// The whole common configuration as the driver would read it field by field.
    fn common_snapshot(&mut self) -> [u8; COMMON_LEN as usize] {
        const FIELDS: [(u64, usize); 16] = [
            (0x00, 4),
            (0x04, 4),
            (0x08, 4),
            (0x0c, 4),
            (0x10, 2),
            (0x12, 2),
            (0x14, 1),
            (0x15, 1),
            (0x16, 2),
            (0x18, 2),
            (0x1a, 2),
            (0x1c, 2),
            (0x1e, 2),
            (0x20, 8),
            (0x28, 8),
            (0x30, 8),
        ];
        let mut snap = [0u8; COMMON_LEN as usize];
        for (off, len) in FIELDS {
            self.common_read(off, &mut snap[off as usize..off as usize + len]);
        }
        snap
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let len = data.len();
        let mut bytes = [0u8; 8];
        bytes[..len].copy_from_slice(data);
        let v = u64::from_le_bytes(bytes);
        match (offset, len) {
            (0x00, 4) => self.device_feature_select = v as u32,
            (0x08, 4) => self.driver_feature_select = v as u32,
            (0x0c, 4) => self.write_driver_features(v as u32),
            (0x10, 2) => self.notifier.msix_config = self.valid_vector(v as u16),
            (0x14, 1) => self.write_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18, 2) => self.with_unready_queue("queue_size", |q| {
                q.queue.try_set_size(v as u16).map_err(|e| e.to_string())
            }),
            (0x1a, 2) => {
                let vector = self.valid_vector(v as u16);
                if let Some(q) = self.selected_queue() {
                    q.msix_vector = vector;
                }
            }
            (0x1c, 2) => {
                if v == 1 {
                    if let Some(q) = self.selected_queue() {
                        q.queue.set_ready(true);
                    }
                } else {
                    tracing::warn!(
                        queue = self.queue_select,
                        value = v,
                        "queue_enable write other than 1 ignored"
                    );
                }
            }
            (0x20..=0x37, 4 | 8) if offset % 4 == 0 && (len == 4 || offset % 8 == 0) => {
                let field = (offset - 0x20) / 8;
                let shift = offset % 8 * 8;
                let keep = if len == 8 {
                    0
                } else {
                    !(0xffff_ffffu64 << shift)
                };
                let name = ["queue_desc", "queue_driver", "queue_device"][field as usize];
                self.with_unready_queue(name, |q| {
                    let cur = match field {
                        0 => q.queue.desc_table(),
                        1 => q.queue.avail_ring(),
                        _ => q.queue.used_ring(),
                    };
                    let addr = GuestAddress(cur & keep | v << shift);
                    match field {
                        0 => q.queue.try_set_desc_table_address(addr),
                        1 => q.queue.try_set_avail_ring_address(addr),
                        _ => q.queue.try_set_used_ring_address(addr),
                    }
                    .map_err(|e| format!("{e} ({:#x})", addr.0))
                });
            }
            (0x04 | 0x12 | 0x15 | 0x1e, _) => {
                tracing::warn!(
                    offset,
                    "write to a read-only virtio common config field ignored"
                )
            }
            _ => tracing::warn!(
                offset,
                len,
                "unaligned or out-of-range virtio common config write"
            ),
        }
    }

    /// Applies a queue-configuration write; those are only allowed before the queue is
    /// enabled, and a bad value stops the queue.
    fn with_unready_queue(
        &mut self,
        field: &str,
        f: impl FnOnce(&mut VirtQueue) -> Result<(), String>,
    ) {
        let select = self.queue_select;
        let Some(q) = self.selected_queue() else {
            tracing::warn!(
                queue = select,
                field,
                "write to a queue that does not exist ignored"
            );
            return;
        };
        if q.queue.ready() {
            tracing::warn!(queue = select, field, "write to an enabled queue ignored");
            return;
        }
        if let Err(e) = f(q) {
            tracing::warn!(queue = select, field, error = %e, "invalid queue configuration; queue stopped until device reset");
            q.broken = true;
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.notifier.device_status & status::FEATURES_OK != 0 {
            tracing::warn!("driver_feature write after FEATURES_OK ignored");
            return;
        }
        let (shift, mask) = match self.driver_feature_select {
            0 => (0, 0xffff_ffffu64),
            1 => (32, 0xffff_ffff_0000_0000),
            s => {
                tracing::warn!(select = s, "driver_feature write with select > 1 ignored");
                return;
            }
        };
        let offered = self.device.features();
        let want = u64::from(v) << shift;
        if want & !offered != 0 {
            tracing::warn!(
                unoffered = want & !offered,
                "driver acked features the device did not offer; dropped"
            );
        }
        self.driver_features = self.driver_features & !mask | want & offered;
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.notifier.device_status;
        // NEEDS_RESET is the device's to set; the driver cannot clear it without a reset.
        let mut new = v | old & status::NEEDS_RESET;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                tracing::warn!("driver did not accept VIRTIO_F_VERSION_1; FEATURES_OK refused");
                new &= !status::FEATURES_OK;
            } else {
                tracing::debug!(
                    features = self.driver_features,
                    "virtio features negotiated"
                );
            }
        }
        if new & status::FAILED != 0 && old & status::FAILED == 0 {
            tracing::warn!("virtio driver gave up on the device (FAILED)");
        }
        self.notifier.device_status = new;
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            self.activate();
        }
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

/// The transport and its device model are saved and restored together: the model first
/// on restore (the transport's layout is a function of it), the transport first on save.
impl<'a, D> Persist<'a> for VirtioPciDevice<D>
where
    D: VirtioDevice + Persist<'a>,
{
    type State = VirtioPciDeviceState<D::State>;
    type ConstructorArgs = VirtioPciArgs<D::ConstructorArgs>;
    type Error = VirtioPersistError<D::Error>;

    fn save(&self) -> Result<Self::State, Self::Error> {
        Ok(VirtioPciDeviceState {
            transport: self
                .save_transport()
                .map_err(VirtioPersistError::Transport)?,
            device: self.device.save().map_err(VirtioPersistError::Device)?,
        })
    }

    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error> {
        let device = D::restore(args.model, &state.device).map_err(VirtioPersistError::Device)?;
        Self::restore_transport(&state.transport, device, args.mem, args.msi)
            .map_err(VirtioPersistError::Transport)
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

    fn bars(&self) -> Vec<PciBar> {
        self.config.bars()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::pci::msix::RecordingMsi;
    use crate::devices::pci::PciRoot;
    use std::sync::Mutex;
    use virtio_queue::QueueOwnedT;
    use vm_memory::{Bytes, GuestMemoryMmap};

    /// A device with two queues that records notifications and completes every chain on
    /// queue 1 (through virtio-queue, i.e. guest-memory writes).
    #[derive(Default)]
    pub struct Dummy {
        pub notified: Vec<usize>,
        pub activated: bool,
        pub resets: usize,
        /// Pretends work is in flight, which its state cannot hold.
        pub in_flight: bool,
    }

    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct DummyState {
        pub activated: bool,
        /// Makes the restore fail, to see the model's error come through.
        pub refuse_restore: bool,
    }

    #[derive(Debug, thiserror::Error, PartialEq, Eq)]
    pub enum DummyError {
        #[error("a request is in flight")]
        InFlight,
        #[error("refused")]
        Refused,
    }

    impl Persist<'_> for Dummy {
        type State = DummyState;
        type ConstructorArgs = ();
        type Error = DummyError;
        fn save(&self) -> Result<DummyState, DummyError> {
            if self.in_flight {
                return Err(DummyError::InFlight);
            }
            Ok(DummyState {
                activated: self.activated,
                refuse_restore: false,
            })
        }
        fn restore((): (), s: &DummyState) -> Result<Self, DummyError> {
            if s.refuse_restore {
                return Err(DummyError::Refused);
            }
            Ok(Dummy {
                activated: s.activated,
                ..Dummy::default()
            })
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u16 {
            1
        }
        fn pci_class(&self) -> (u8, u8) {
            (0x02, 0x00)
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1 << 5
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let cfg = [1u8, 2, 3, 4, 5, 6];
            for (i, b) in data.iter_mut().enumerate() {
                *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, _ctx: &mut QueueContext<'_>) {
            self.activated = true;
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated = false;
        }
        fn queue_notify(&mut self, queue: usize, ctx: &mut QueueContext<'_>) {
            self.notified.push(queue);
            let mem = ctx.mem();
            let Some(q) = ctx.queue(queue) else { return };
            let heads: Vec<u16> = match q.iter(mem) {
                Ok(it) => it.map(|c| c.head_index()).collect(),
                Err(e) => {
                    ctx.fail_queue(queue, &e);
                    return;
                }
            };
            for h in &heads {
                ctx.queue(queue).unwrap().add_used(mem, *h, 0).unwrap();
            }
            if !heads.is_empty() {
                ctx.signal_used(queue);
            }
        }
    }

    pub const BAR: u64 = 0xc000_0000;

    pub fn mem() -> GuestMem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    pub fn r(dev: &mut impl BusDevice, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        dev.read(BAR, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    pub fn w(dev: &mut impl BusDevice, off: u64, len: usize, v: u64) {
        dev.write(BAR, off, &v.to_le_bytes()[..len]);
    }

    /// Programs queue `q` (size 16) at `base` (desc, then avail at +0x100, used at +0x200),
    /// vector `vector`, and enables it.
    pub fn setup_queue(dev: &mut impl BusDevice, q: u16, base: u64, vector: u16) {
        w(dev, 0x16, 2, u64::from(q));
        w(dev, 0x18, 2, 16);
        w(dev, 0x1a, 2, u64::from(vector));
        w(dev, 0x20, 4, base);
        w(dev, 0x24, 4, 0);
        w(dev, 0x28, 8, base + 0x100);
        w(dev, 0x30, 4, base + 0x200);
        w(dev, 0x34, 4, 0);
        w(dev, 0x1c, 2, 1);
    }

    /// Negotiates VERSION_1 (plus `extra` low feature bits).
    pub fn negotiate(dev: &mut impl BusDevice, extra: u32) {
        w(dev, 0x14, 1, 1);
        w(dev, 0x14, 1, 3);
        w(dev, 0x08, 4, 0);
        w(dev, 0x0c, 4, u64::from(extra));
        w(dev, 0x08, 4, 1);
        w(dev, 0x0c, 4, 1);
        w(dev, 0x14, 1, 0xb);
    }

    /// Enables MSI-X in config space and unmasks vectors 0..n at data 0x40 + i.
    pub fn enable_msix<D: VirtioDevice>(dev: &mut VirtioPciDevice<D>, n: u64) {
        let reg = dev.msix_cap_reg;
        dev.write_config_register(reg, 2, &0x8000u16.to_le_bytes());
        for i in 0..n {
            w(dev, MSIX_TABLE_OFFSET + i * 16, 8, 0xfee0_0000);
            w(dev, MSIX_TABLE_OFFSET + i * 16 + 8, 4, 0x40 + i);
            w(dev, MSIX_TABLE_OFFSET + i * 16 + 12, 4, 0);
        }
    }

    fn new_dummy() -> (VirtioPciDevice<Dummy>, Arc<RecordingMsi>, GuestMem) {
        let rec = Arc::new(RecordingMsi::default());
        let m = mem();
        let d = VirtioPciDevice::new(Dummy::default(), m.clone(), rec.clone(), BAR).unwrap();
        (d, rec, m)
    }

    /// Walks the capability list and returns (offset, cfg_type) of each vendor cap.
    fn vendor_caps(dev: &mut VirtioPciDevice<Dummy>) -> Vec<(usize, u8, u8)> {
        let mut caps = Vec::new();
        let mut ptr = (dev.read_config_register(13) & 0xff) as usize;
        while ptr != 0 {
            let d0 = dev.read_config_register(ptr / 4);
            let (id, next) = (d0 as u8, (d0 >> 8) as u8);
            caps.push((ptr, id, (d0 >> 24) as u8));
            ptr = usize::from(next);
        }
        caps
    }

    #[test]
    fn pci_identity_and_capabilities() {
        let (mut d, _, _) = new_dummy();
        assert_eq!(d.read_config_register(0), 0x1041_1af4);
        assert_eq!(d.read_config_register(2) >> 8, 0x02_00_00);
        assert_eq!(d.read_config_register(2) & 0xff, 1);
        assert_eq!(d.read_config_register(1) & (1 << 20), 1 << 20);
        let caps = vendor_caps(&mut d);
        let kinds: Vec<(u8, u8)> = caps.iter().map(|c| (c.1, c.2)).collect();
        assert_eq!(
            kinds,
            vec![(9, 1), (9, 3), (9, 4), (9, 2), (9, 5), (0x11, 0)]
        );
        // Notify cap: offset 0x3000, multiplier 4.
        let notify = caps[3].0 / 4;
        assert_eq!(d.read_config_register(notify + 1) & 0xff, 0);
        assert_eq!(d.read_config_register(notify + 2), 0x3000);
        assert_eq!(d.read_config_register(notify + 3), 8);
        assert_eq!(d.read_config_register(notify + 4), 4);
        // MSI-X: table size 3 (2 queues + config), table/PBA in BAR 0.
        let msix = caps[5].0 / 4;
        assert_eq!(d.read_config_register(msix) >> 16, 2);
        assert_eq!(d.read_config_register(msix + 1), 0x6000);
        assert_eq!(d.read_config_register(msix + 2), 0x7000);
        assert_eq!(d.bars()[0].size, BAR_SIZE);
    }

    #[test]
    fn on_conf1_with_linux_style_sizing() {
        let (d, _, _) = new_dummy();
        let d = Arc::new(Mutex::new(d));
        let mut root = PciRoot::new();
        root.add_device(d.clone()).unwrap();
        let root = Arc::new(Mutex::new(root));
        let mut bus = crate::devices::bus::Bus::new();
        bus.insert(root, PciRoot::PORT_BASE, PciRoot::PORT_LEN)
            .unwrap();
        let sel = |reg: u32| (1u32 << 31 | 1 << 11 | reg << 2).to_le_bytes();
        bus.write(0xcf8, &sel(4));
        bus.write(0xcfc, &u32::MAX.to_le_bytes());
        let mut v = [0u8; 4];
        bus.read(0xcfc, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0xffff_8004);
        bus.write(0xcfc, &0xc000_0000u32.to_le_bytes());
        bus.read(0xcfc, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0xc000_0004);
        assert_eq!(d.lock().unwrap().bar_addr(), BAR);
    }

    #[test]
    fn feature_negotiation_and_common_config() {
        let (mut d, _, _) = new_dummy();
        w(&mut d, 0x00, 4, 0);
        assert_eq!(r(&mut d, 0x04, 4), 1 << 5);
        w(&mut d, 0x00, 4, 1);
        assert_eq!(r(&mut d, 0x04, 4), 1);
        w(&mut d, 0x00, 4, 2);
        assert_eq!(r(&mut d, 0x04, 4), 0);
        assert_eq!(r(&mut d, 0x12, 2), 2);
        // Features without VERSION_1: FEATURES_OK is refused.
        w(&mut d, 0x14, 1, 3);
        w(&mut d, 0x08, 4, 0);
        w(&mut d, 0x0c, 4, 1 << 5 | 1 << 7);
        assert_eq!(r(&mut d, 0x0c, 4), 1 << 5, "unoffered bit dropped");
        w(&mut d, 0x14, 1, 0xb);
        assert_eq!(r(&mut d, 0x14, 1), 3);
        w(&mut d, 0x08, 4, 1);
        w(&mut d, 0x0c, 4, 1);
        w(&mut d, 0x14, 1, 0xb);
        assert_eq!(r(&mut d, 0x14, 1), 0xb);
        // Frozen after FEATURES_OK.
        w(&mut d, 0x08, 4, 0);
        w(&mut d, 0x0c, 4, 0);
        assert_eq!(r(&mut d, 0x0c, 4), 1 << 5);

        // Queue registers.
        w(&mut d, 0x16, 2, 1);
        assert_eq!(r(&mut d, 0x18, 2), 16);
        assert_eq!(r(&mut d, 0x1e, 2), 1);
        assert_eq!(r(&mut d, 0x1a, 2), 0xffff);
        w(&mut d, 0x1a, 2, 2);
        assert_eq!(r(&mut d, 0x1a, 2), 2);
        w(&mut d, 0x1a, 2, 3);
        assert_eq!(
            r(&mut d, 0x1a, 2),
            0xffff,
            "vector past the table reads NO_VECTOR"
        );
        w(&mut d, 0x18, 2, 8);
        assert_eq!(r(&mut d, 0x18, 2), 8);
        w(&mut d, 0x20, 8, 0x1_2340);
        assert_eq!(r(&mut d, 0x20, 4), 0x1_2340);
        assert_eq!(r(&mut d, 0x24, 4), 0);
        w(&mut d, 0x2c, 4, 0x1);
        assert_eq!(r(&mut d, 0x28, 8), 0x1_0000_0000);
        // Queue that does not exist.
        w(&mut d, 0x16, 2, 5);
        assert_eq!(r(&mut d, 0x18, 2), 0);
        w(&mut d, 0x18, 2, 8);
        // Non-natural reads are served from the field values.
        w(&mut d, 0x16, 2, 1);
        assert_eq!(r(&mut d, 0x14, 4), 0x0001_000b);
        assert_eq!(r(&mut d, 0x12, 1), 2);
        assert_eq!(r(&mut d, 0x40, 4), 0);
        // Device config and ISR.
        assert_eq!(r(&mut d, 0x2000, 4), 0x0403_0201);
        assert_eq!(r(&mut d, 0x2004, 4), 0x0605);
        assert_eq!(r(&mut d, 0x1000, 1), 0);
        // Reset clears everything driver-visible.
        w(&mut d, 0x14, 1, 0);
        assert_eq!(r(&mut d, 0x14, 1), 0);
        assert_eq!(r(&mut d, 0x0c, 4), 0);
        w(&mut d, 0x16, 2, 1);
        assert_eq!(r(&mut d, 0x18, 2), 16);
        assert_eq!(r(&mut d, 0x20, 8), 0);
        assert_eq!(d.device().resets, 1);
    }

    #[test]
    fn notify_processes_queue_and_raises_msix() {
        let (mut d, rec, m) = new_dummy();
        negotiate(&mut d, 0);
        enable_msix(&mut d, 3);
        setup_queue(&mut d, 1, 0x1000, 2);
        // One chain: descriptor 0 at 0x8000, made available.
        m.write_obj(0x8000u64, GuestAddress(0x1000)).unwrap();
        m.write_obj(64u32, GuestAddress(0x1008)).unwrap();
        m.write_obj(0u16, GuestAddress(0x1100 + 4)).unwrap();
        m.write_obj(1u16, GuestAddress(0x1100 + 2)).unwrap();
        // Before DRIVER_OK notifications are ignored.
        w(&mut d, 0x3004, 2, 1);
        assert!(d.device().notified.is_empty());
        w(&mut d, 0x14, 1, 0xf);
        assert!(d.device().activated);
        w(&mut d, 0x3004, 2, 1);
        assert_eq!(d.device().notified, vec![1]);
        assert_eq!(m.read_obj::<u16>(GuestAddress(0x1202)).unwrap(), 1);
        let sent = rec.take();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].data, 0x42);
        assert_eq!(r(&mut d, 0x1000, 1), 1, "ISR queue bit");
        assert_eq!(r(&mut d, 0x1000, 1), 0, "ISR read clears");
        // A notify for a queue past the end is ignored.
        w(&mut d, 0x3008, 2, 2);
        assert_eq!(d.device().notified, vec![1]);
    }

    #[test]
    fn garbage_queue_config_stops_the_queue() {
        let (mut d, rec, _) = new_dummy();
        negotiate(&mut d, 0);
        enable_msix(&mut d, 3);
        w(&mut d, 0x10, 2, 0);
        // Queue 1: rings far outside guest memory.
        w(&mut d, 0x16, 2, 1);
        w(&mut d, 0x20, 8, 0x7000_0000_0000);
        w(&mut d, 0x28, 8, 0x7000_0001_0000);
        w(&mut d, 0x30, 8, 0x7000_0002_0000);
        w(&mut d, 0x1c, 2, 1);
        // Queue 0: misaligned descriptor table.
        w(&mut d, 0x16, 2, 0);
        w(&mut d, 0x20, 8, 0x1001);
        w(&mut d, 0x18, 2, 3);
        w(&mut d, 0x1c, 2, 1);
        w(&mut d, 0x14, 1, 0xf);
        assert_ne!(r(&mut d, 0x14, 1) & status::NEEDS_RESET as u64, 0);
        assert_eq!(r(&mut d, 0x15, 1), 1, "config generation bumped");
        assert_eq!(rec.take().len(), 1, "config interrupt");
        w(&mut d, 0x3004, 2, 1);
        w(&mut d, 0x3000, 2, 0);
        d.with_queues(|_, ctx| {
            assert!(ctx.queue(0).is_none());
            assert!(ctx.queue(1).is_none());
        });
        // Writes to an enabled queue are ignored.
        w(&mut d, 0x16, 2, 1);
        w(&mut d, 0x18, 2, 4);
        assert_eq!(r(&mut d, 0x18, 2), 16);
        // Reset recovers.
        w(&mut d, 0x14, 1, 0);
        negotiate(&mut d, 0);
        setup_queue(&mut d, 1, 0x1000, 2);
        w(&mut d, 0x14, 1, 0xf);
        assert_eq!(r(&mut d, 0x14, 1), 0xf);
        d.with_queues(|_, ctx| assert!(ctx.queue(1).is_some()));
    }

    #[test]
    fn avail_index_garbage_stops_queue_without_panic() {
        let (mut d, _, m) = new_dummy();
        negotiate(&mut d, 0);
        setup_queue(&mut d, 1, 0x1000, 2);
        w(&mut d, 0x14, 1, 0xf);
        // avail idx 100 with a 16-entry queue.
        m.write_obj(100u16, GuestAddress(0x1102)).unwrap();
        w(&mut d, 0x3004, 2, 1);
        assert_ne!(d.device_status() & status::NEEDS_RESET, 0);
    }

    #[test]
    fn pci_cfg_window_reaches_the_bar() {
        let (mut d, _, _) = new_dummy();
        let cap = d.pci_cfg_cap / 4;
        // bar 0, offset 0x12 (num_queues), length 2.
        d.write_config_register(cap + 1, 0, &[0]);
        d.write_config_register(cap + 2, 0, &0x12u32.to_le_bytes());
        d.write_config_register(cap + 3, 0, &2u32.to_le_bytes());
        assert_eq!(d.read_config_register(cap + 4) & 0xffff, 2);
        // Write device_status = 1 through the window.
        d.write_config_register(cap + 2, 0, &0x14u32.to_le_bytes());
        d.write_config_register(cap + 3, 0, &1u32.to_le_bytes());
        d.write_config_register(cap + 4, 0, &[1]);
        assert_eq!(d.device_status(), 1);
        // Bad length: ignored, no panic.
        d.write_config_register(cap + 3, 0, &3u32.to_le_bytes());
        d.read_config_register(cap + 4);
    }

    fn args(m: &GuestMem, rec: &Arc<RecordingMsi>) -> VirtioPciArgs<()> {
        VirtioPciArgs {
            mem: m.clone(),
            msi: rec.clone(),
            model: (),
        }
    }

    #[test]
    fn save_restore_save_is_identical() {
        let (mut d, rec, m) = new_dummy();
        negotiate(&mut d, 1 << 5);
        enable_msix(&mut d, 3);
        w(&mut d, 0x10, 2, 0);
        setup_queue(&mut d, 0, 0x1000, 1);
        setup_queue(&mut d, 1, 0x2000, 2);
        w(&mut d, 0x14, 1, 0xf);
        let s = d.save().unwrap();
        assert!(s.device.activated, "the model's state rides along");
        let bytes = bincode::serialize(&s).unwrap();
        let decoded: VirtioPciDeviceState<DummyState> = bincode::deserialize(&bytes).unwrap();
        let d2 = VirtioPciDevice::<Dummy>::restore(args(&m, &rec), &decoded).unwrap();
        assert_eq!(d2.save().unwrap(), s);
        assert_eq!(d2.msix_cap_reg, d.msix_cap_reg);
        assert!(d2.device().activated);
        let restore = |st: &VirtioPciDeviceState<DummyState>| {
            VirtioPciDevice::<Dummy>::restore(args(&m, &rec), st)
        };
        let mut bad = s.clone();
        bad.transport.queues.pop();
        assert!(matches!(
            restore(&bad),
            Err(VirtioPersistError::Transport(VirtioPciError::QueueCount {
                found: 1,
                expected: 2
            }))
        ));
        let mut bad = s.clone();
        bad.transport.pci = PciConfiguration::new(PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class: 1,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        })
        .save()
        .unwrap();
        assert!(matches!(
            restore(&bad),
            Err(VirtioPersistError::Transport(
                VirtioPciError::DeviceMismatch { .. }
            ))
        ));
        let mut bad = s.clone();
        bad.transport.queues[0].size = 3;
        assert!(matches!(
            restore(&bad),
            Err(VirtioPersistError::Transport(VirtioPciError::QueueState {
                index: 0,
                ..
            }))
        ));
        let mut bad = s;
        bad.device.refuse_restore = true;
        assert!(matches!(
            restore(&bad),
            Err(VirtioPersistError::Device(DummyError::Refused))
        ));
    }

    /// A model that cannot represent its state (work in flight) makes the device's save
    /// fail, naming the model in the error chain: it is never saved without it.
    #[test]
    fn a_model_that_cannot_save_fails_the_save_loudly() {
        let (mut d, _, _) = new_dummy();
        d.device_mut().in_flight = true;
        let e = d.save().unwrap_err();
        assert!(matches!(
            e,
            VirtioPersistError::Device(DummyError::InFlight)
        ));
        assert_eq!(
            crate::describe_error(&e),
            "virtio device model: a request is in flight"
        );
    }
}
