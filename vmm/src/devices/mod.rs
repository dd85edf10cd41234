//! Platform and virtio devices, and the buses the vCPU exits are dispatched on.

pub mod bus;
pub mod pci;
pub mod power;
pub mod serial;
pub mod tap;
pub mod virtio;

/// A device that failed to save or restore, by name, with its own typed error.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("serial port (COM1)")]
    Serial(#[source] serial::SerialError),
    #[error("PCI root")]
    PciRoot(#[source] pci::PciError),
    #[error("virtio-net")]
    Net(#[source] virtio::pci::VirtioPersistError<virtio::net::NetError>),
}

/// A device that does work on its own (a worker thread writing guest memory, raising
/// interrupts) and can be stopped and started with the VM. Paused, it touches neither guest
/// memory nor interrupts, so a stopped VM does not change. Devices that only act when a
/// vCPU accesses them need not implement this: parked vCPUs already stop them. Saving is
/// [`crate::persist::Persist`]'s; this is only about standing still.
pub trait Pausable {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Stops the device's own work. Once this returns, it no longer changes guest memory
    /// or raises interrupts.
    fn pause(&mut self) -> Result<(), Self::Error>;
    /// Lets the device work again; an error means it may stay idle until the guest next
    /// notifies it.
    fn resume(&mut self) -> Result<(), Self::Error>;
}
