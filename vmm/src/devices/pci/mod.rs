//! PCI: configuration mechanism #1 and the device trait.
