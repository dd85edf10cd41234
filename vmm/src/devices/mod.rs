//! Platform and virtio devices, and the buses the vCPU exits are dispatched on.

pub mod bus;
pub mod pci;
pub mod power;
pub mod serial;
pub mod tap;
pub mod virtio;
