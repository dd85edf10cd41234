//! The VM's devices, apart from the VMM that runs them: the buses vCPU exits are dispatched
//! on, the 8250 serial port, PCI (configuration mechanism #1, configuration space, MSI-X),
//! the virtio-pci transport and the virtio devices behind it (`virtio/net/`, and beside it
//! `virtio/blk/` and a balloon when they come), the TAP a NIC is backed by.
//!
//! A device needs of the VMM only guest memory ([`GuestMem`], vm-memory's), a way to inject
//! interrupts ([`interrupt::MsiSender`], an irqfd for the serial port) and this crate's
//! traits: [`bus::BusDevice`] to be on a bus, [`pci::PciDevice`] to be on the PCI bus,
//! [`virtio::VirtioDevice`] to sit behind the transport, [`Persist`] to be saved and
//! restored, [`Pausable`] if it works on its own. Nothing here opens `/dev/kvm`, so every
//! device is unit-tested without it.

pub mod bus;
pub mod dirty_bitmap;
pub mod interrupt;
pub mod pci;
pub mod persist;
pub mod serial;
pub mod tap;
pub mod virtio;

pub use persist::Persist;

/// Guest memory as every device sees it: dirty-tracked mmap regions (the VMM's own writes,
/// virtio RX buffers and used rings among them, land in the regions' bitmaps, whose harvest
/// costs what was written, not the size of RAM: [`dirty_bitmap`]).
pub type GuestMem = vm_memory::GuestMemoryMmap<dirty_bitmap::DirtyBitmap>;

/// A device that does work on its own (a worker thread writing guest memory, raising
/// interrupts) and can be stopped and started with the VM. Paused, it touches neither guest
/// memory nor interrupts, so a stopped VM does not change. Devices that only act when a
/// vCPU accesses them need not implement this: parked vCPUs already stop them. Saving is
/// [`Persist`]'s; this is only about standing still.
pub trait Pausable {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Stops the device's own work. Once this returns, it no longer changes guest memory
    /// or raises interrupts.
    fn pause(&mut self) -> Result<(), Self::Error>;
    /// Lets the device work again; an error means it may stay idle until the guest next
    /// notifies it.
    fn resume(&mut self) -> Result<(), Self::Error>;
}
