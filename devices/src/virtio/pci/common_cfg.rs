//! The common configuration registers (`virtio_pci_common_cfg`, virtio 1.2, 4.1.4.3) at
//! BAR offset 0: feature negotiation, device status and reset, and queue set-up. The
//! driver writes each field with its natural width; anything else is logged and ignored
//! (writes) or served byte by byte (reads, which have no side effects).

use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use super::{VirtQueue, VirtioPciDevice, COMMON_LEN};
use crate::virtio::{status, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MSI_NO_VECTOR};

impl<D: VirtioDevice> VirtioPciDevice<D> {
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

    pub(super) fn common_read(&mut self, offset: u64, data: &mut [u8]) {
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

    pub(super) fn common_write(&mut self, offset: u64, data: &[u8]) {
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
}
