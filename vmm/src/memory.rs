//! Guest memory: one memfd-backed region starting at guest physical address 0.
//!
//! Every write the VMM itself makes through [`GuestMem`] is recorded in the region's
//! [`AtomicBitmap`]: KVM's dirty log only sees writes made by the guest, so the checkpoint
//! engine ORs this bitmap into KVM's (virtio RX buffers and used rings are written here).

use vm_memory::bitmap::AtomicBitmap;

/// Guest memory as the whole VMM sees it: dirty-tracked mmap regions.
pub type GuestMem = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMem`].
pub type GuestRegion = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Size of a guest page, the unit of dirty tracking and of checkpoint transfer.
pub const PAGE_SIZE: usize = 4096;
