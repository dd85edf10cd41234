//! Virtqueues on the transport, and what a device model gets while it processes them: guest
//! memory, its queues, and the means to interrupt the driver ([`QueueContext`]).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{ISR_CONFIG, ISR_QUEUE, VIRTQ_AVAIL_F_NO_INTERRUPT};
use crate::pci::msix::Msix;
use crate::persist::Persist;
use crate::virtio::{status, VIRTIO_MSI_NO_VECTOR};
use crate::GuestMem;

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

/// One virtqueue and its transport-side settings.
#[derive(Debug)]
pub struct VirtQueue {
    pub queue: Queue,
    pub msix_vector: u16,
    pub broken: bool,
}

impl VirtQueue {
    pub(super) fn new(max_size: u16) -> Self {
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
pub(super) struct Notifier {
    pub(super) msix: Msix,
    pub(super) isr: u8,
    pub(super) msix_config: u16,
    pub(super) device_status: u8,
    pub(super) config_generation: u8,
}

impl Notifier {
    /// The driver finished set-up and the device may use its queues.
    pub(super) fn live(&self) -> bool {
        let s = self.device_status;
        s & status::DRIVER_OK != 0 && s & status::FEATURES_OK != 0 && s & status::FAILED == 0
    }

    pub(super) fn signal_config(&mut self) {
        self.isr |= ISR_CONFIG;
        if self.msix_config != VIRTIO_MSI_NO_VECTOR {
            self.msix.trigger(self.msix_config);
        }
    }
}

/// What a device model gets while processing queues: guest memory, the queues, and the
/// means to interrupt the driver.
pub struct QueueContext<'a> {
    pub(super) mem: &'a GuestMem,
    pub(super) queues: &'a mut [VirtQueue],
    pub(super) notifier: &'a mut Notifier,
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
