//! Platform and virtio devices, and the buses the vCPU exits are dispatched on.

pub mod bus;
pub mod pci;
pub mod power;
pub mod serial;
pub mod tap;
pub mod virtio;

/// A device that does work on its own (a worker thread writing guest memory, raising
/// interrupts) and can be stopped and started with the VM. Paused, it touches neither guest
/// memory nor interrupts, so a stopped VM does not change. Devices that only act when a
/// vCPU accesses them need not implement this: parked vCPUs already stop them.
pub trait Pausable {
    fn pause(&mut self);
    fn resume(&mut self);
}
