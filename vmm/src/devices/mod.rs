//! Platform and virtio devices, and the buses the vCPU exits are dispatched on.

pub mod bus;
