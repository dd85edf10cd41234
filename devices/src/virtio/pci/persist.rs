//! Save and restore of a virtio-pci device: the transport's registers, MSI-X and queues,
//! and its device model's own state, through [`Persist`].

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::queue::Notifier;
use super::{build_config, VirtQueue, VirtQueueState, VirtioPciDevice, VirtioPciError};
use crate::interrupt::MsiSender;
use crate::pci::msix::{Msix, MsixState};
use crate::pci::{PciConfiguration, PciConfigurationState};
use crate::persist::Persist;
use crate::virtio::VirtioDevice;
use crate::GuestMem;

/// Saved state of the transport (the device model saves its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub pci: PciConfigurationState,
    pub msix: MsixState,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
    pub device_status: u8,
    pub config_generation: u8,
    pub msix_config: u16,
    pub isr: u8,
    pub queues: Vec<VirtQueueState>,
}

/// Saved state of a virtio-pci device: the transport's and its device model's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciDeviceState<S> {
    pub transport: VirtioPciState,
    pub device: S,
}

/// Host resources a (restored) virtio-pci device is built with: the guest memory mapping,
/// the interrupt sender, and what its device model needs of this host (`model`).
pub struct VirtioPciArgs<A> {
    pub mem: GuestMem,
    pub msi: Arc<dyn MsiSender>,
    pub model: A,
}

/// Errors saving or restoring a virtio-pci device: of the transport, or of its model
/// (typed by the model, so the chain names what failed).
#[derive(Debug, thiserror::Error)]
pub enum VirtioPersistError<E: std::error::Error + 'static> {
    #[error("virtio-pci transport")]
    Transport(#[source] VirtioPciError),
    #[error("virtio device model")]
    Device(#[source] E),
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// Rebuilds the transport from saved state around a restored device model, with fresh
    /// host resources (guest memory mapping, interrupt sender).
    fn restore_transport(
        state: &VirtioPciState,
        device: D,
        mem: GuestMem,
        msi: Arc<dyn MsiSender>,
    ) -> Result<Self, VirtioPciError> {
        let expected = device.queue_max_sizes().len();
        if state.queues.len() != expected {
            return Err(VirtioPciError::QueueCount {
                found: state.queues.len(),
                expected,
            });
        }
        let msix = Msix::restore(msi, &state.msix)?;
        // The capability layout is a function of the device; rebuild it to find the
        // offsets, then take the saved register contents.
        let (fresh, caps) = build_config(&device, &msix, 0)?;
        let config = PciConfiguration::restore((), &state.pci)?;
        if config.read_reg(0) != fresh.read_reg(0) {
            return Err(VirtioPciError::DeviceMismatch {
                saved: config.read_reg(0),
                device: fresh.read_reg(0),
            });
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                VirtQueue::restore((), q)
                    .map_err(|source| VirtioPciError::QueueState { index, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            config,
            msix_cap_reg: caps.msix / 4,
            pci_cfg_cap: caps.pci_cfg,
            device_feature_select: state.device_feature_select,
            driver_feature_select: state.driver_feature_select,
            driver_features: state.driver_features,
            queue_select: state.queue_select,
            queues,
            notifier: Notifier {
                msix,
                isr: state.isr,
                msix_config: state.msix_config,
                device_status: state.device_status,
                config_generation: state.config_generation,
            },
            mem,
            device,
        })
    }

    /// The transport's state (the device model saves its own).
    fn save_transport(&self) -> Result<VirtioPciState, VirtioPciError> {
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                q.save()
                    .map_err(|source| VirtioPciError::QueueState { index, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(VirtioPciState {
            pci: self.config.save()?,
            msix: self.notifier.msix.save()?,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            device_status: self.notifier.device_status,
            config_generation: self.notifier.config_generation,
            msix_config: self.notifier.msix_config,
            isr: self.notifier.isr,
            queues,
        })
    }
}

/// The transport and its device model are saved and restored together: the model first
/// on restore (the transport's layout is a function of it), the transport first on save.
impl<'a, D> Persist<'a> for VirtioPciDevice<D>
where
    D: VirtioDevice + Persist<'a>,
{
    type State = VirtioPciDeviceState<D::State>;
    type ConstructorArgs = VirtioPciArgs<D::ConstructorArgs>;
    type Error = VirtioPersistError<D::Error>;

    fn save(&self) -> Result<Self::State, Self::Error> {
        Ok(VirtioPciDeviceState {
            transport: self
                .save_transport()
                .map_err(VirtioPersistError::Transport)?,
            device: self.device.save().map_err(VirtioPersistError::Device)?,
        })
    }

    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error> {
        let device = D::restore(args.model, &state.device).map_err(VirtioPersistError::Device)?;
        Self::restore_transport(&state.transport, device, args.mem, args.msi)
            .map_err(VirtioPersistError::Transport)
    }
}
