//! Save and restore: one trait for every device, the VM and the vCPUs.
//!
//! After Firecracker's `snapshot::Persist`: a component saves itself into a `State` (plain
//! data, serde, part of the VMM's `MachineState` a checkpoint or snapshot carries) and
//! is rebuilt from a `State` plus `ConstructorArgs`, the things of *this* host that a state
//! must never hold: the guest memory mapping, the interrupt sender, the TAP behind a NIC,
//! the console behind the UART, the KVM objects created on this host. A failover rebuilds
//! every component on another host from the same state with that host's resources.
//!
//! Unlike Firecracker's, `save` returns a `Result`, as crosvm's `Suspendable::snapshot`
//! does: the KVM parts are saved with ioctls that can fail, and a device that is in a state
//! its `State` cannot represent must make the whole capture fail, loudly and by name,
//! rather than be left out of a checkpoint the backup would then resume from. Nothing is
//! ever skipped: the VMM's `DeviceStates` has one field per device, filled from that
//! device's `save`, and the capture stops at the first error.

/// A component that can be saved into a `State` and rebuilt from one.
///
/// The law every implementation keeps (unit-tested for each): `restore(args, &s)` followed
/// by `save()` gives `s` back, so a checkpoint of a restored VM is the checkpoint it was
/// restored from.
pub trait Persist<'a>: Sized {
    /// What is saved: guest-visible state only, never a host resource.
    type State;
    /// The host resources a restored component is built with.
    type ConstructorArgs;
    /// Why saving or restoring failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The component's state. Devices are saved with the vCPUs paused and the device's lock
    /// held, so the state cannot change meanwhile.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Rebuilds the component from `state` with this host's `args`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
