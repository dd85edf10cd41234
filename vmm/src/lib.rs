//! KVM virtual machine monitor: guest memory, vCPUs, platform and virtio devices, state
//! capture.

pub mod devices;
pub mod interrupt;
pub mod memory;
