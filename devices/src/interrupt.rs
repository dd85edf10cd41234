//! Interrupt delivery from devices to the guest.

use std::io;

/// One MSI message as programmed by the guest into an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Something that can inject an MSI into the guest (the KVM VM fd, `KVM_SIGNAL_MSI`).
///
/// A trait so device models are unit-testable without `/dev/kvm`.
pub trait MsiSender: Send + Sync {
    fn send_msi(&self, msg: MsiMessage) -> io::Result<()>;
}
