//! virtio devices over the virtio-pci modern transport.
