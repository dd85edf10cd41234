//! PCI: configuration mechanism #1 and the device trait.
//!
//! [`PciRoot`] is a port-I/O [`BusDevice`] for `0xCF8..=0xCFF` (insert it at
//! [`PciRoot::PORT_BASE`], length [`PciRoot::PORT_LEN`]). It decodes the address register at
//! `0xCF8` and forwards data accesses at `0xCFC..=0xCFF` to the device at the selected slot
//! of bus 0. Slot 0 is a host bridge; devices added with [`PciRoot::add_device`] take slots
//! 1, 2, ...
//!
//! BARs are assigned by the VMM; a guest normally leaves them alone. If it moves one, the
//! device's config write returns a [`BarReprogram`] and `PciRoot` hands it to the handler
//! set with [`PciRoot::set_bar_reprogram_handler`], which must move the device on the MMIO
//! bus (`Bus::remove(old)` + `Bus::insert(dev, new, len)`). A callback rather than a bus
//! reference here because the VMM owns how its MMIO bus is shared between vCPU threads.

pub mod configuration;
pub mod msix;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use configuration::{
    BarKind, BarReprogram, PciBar, PciConfigError, PciConfiguration, PciConfigurationState,
    PciHeader,
};

use super::bus::BusDevice;
use crate::persist::Persist;

/// Number of device slots on bus 0.
pub const NUM_SLOTS: u8 = 32;
/// Start of the MMIO window BARs are assigned from.
pub const MMIO_WINDOW_BASE: u64 = 0xc000_0000;

/// A PCI function as configuration mechanism #1 sees it.
///
/// Every function has a [`PciConfiguration`]; the access methods default to it, so a
/// function overrides them only where a register has side effects (the virtio transport's
/// MSI-X enable and `pci_cfg` window).
pub trait PciDevice: Send {
    /// The function's configuration space.
    fn config(&self) -> &PciConfiguration;
    fn config_mut(&mut self) -> &mut PciConfiguration;
    /// Reads the 32-bit configuration register `reg` (byte offset `reg * 4`).
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config().read_reg(reg)
    }
    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` within register `reg`. Returns the
    /// BAR move the write made, if any.
    fn write_config_register(
        &mut self,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarReprogram> {
        self.config_mut().write(reg, offset, data)
    }
    /// The BARs the device decodes, at their current addresses.
    fn bars(&self) -> Vec<PciBar> {
        self.config().bars()
    }
}

/// Shared handle to a PCI device (the same object is usually also on the MMIO bus).
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Errors of PCI bus set-up and of restoring the root.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("all {NUM_SLOTS} slots of PCI bus 0 are taken")]
    NoFreeSlot,
    #[error("the saved configuration space of the host bridge is invalid")]
    HostBridge(#[source] PciConfigError),
}

/// Bus/device/function of a PCI function (always bus 0, function 0 here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PciAddress {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl std::fmt::Display for PciAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// Called with the function and the move when a guest reprograms a BAR.
pub type BarReprogramHandler = Box<dyn FnMut(PciAddress, BarReprogram) + Send>;

/// The host bridge at 00:00.0: identity only, no BARs.
pub struct PciHostBridge {
    config: PciConfiguration,
}

impl PciHostBridge {
    pub const VENDOR_ID: u16 = 0x8086;
    pub const DEVICE_ID: u16 = 0x0d57;

    pub fn new() -> Self {
        Self {
            config: PciConfiguration::new(PciHeader {
                vendor_id: Self::VENDOR_ID,
                device_id: Self::DEVICE_ID,
                revision: 0,
                class: 0x06,
                subclass: 0x00,
                prog_if: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

/// The host bridge decodes no BARs: its configuration space has none.
impl PciDevice for PciHostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
}

/// Serializable state of a [`PciRoot`] (the devices save their own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciRootState {
    pub config_address: u32,
    pub host_bridge: PciConfigurationState,
}

/// Configuration mechanism #1 on ports `0xCF8..=0xCFF`, bus 0.
pub struct PciRoot {
    config_address: u32,
    host_bridge: Arc<Mutex<PciHostBridge>>,
    devices: BTreeMap<u8, SharedPciDevice>,
    on_bar_reprogram: Option<BarReprogramHandler>,
}

const CONFIG_ENABLE: u32 = 1 << 31;

impl PciRoot {
    /// First port of the mechanism-#1 range.
    pub const PORT_BASE: u64 = 0xcf8;
    /// Length of the range: address register (4) + data window (4).
    pub const PORT_LEN: u64 = 8;

    pub fn new() -> Self {
        let host_bridge = Arc::new(Mutex::new(PciHostBridge::new()));
        let mut devices: BTreeMap<u8, SharedPciDevice> = BTreeMap::new();
        devices.insert(0, host_bridge.clone());
        Self {
            config_address: 0,
            host_bridge,
            devices,
            on_bar_reprogram: None,
        }
    }

    /// Puts `device` in the lowest free slot (1 onwards) and returns its address.
    pub fn add_device(&mut self, device: SharedPciDevice) -> Result<PciAddress, PciError> {
        let slot = (1..NUM_SLOTS)
            .find(|s| !self.devices.contains_key(s))
            .ok_or(PciError::NoFreeSlot)?;
        self.devices.insert(slot, device);
        let addr = PciAddress {
            bus: 0,
            device: slot,
            function: 0,
        };
        tracing::debug!(%addr, "PCI device added");
        Ok(addr)
    }

    /// Sets who moves devices on the MMIO bus when the guest reprograms a BAR.
    pub fn set_bar_reprogram_handler(&mut self, handler: BarReprogramHandler) {
        self.on_bar_reprogram = Some(handler);
    }

    /// The device selected by the address register, and the register index.
    fn selected(&self) -> Option<(PciAddress, &SharedPciDevice, usize)> {
        let a = self.config_address;
        if a & CONFIG_ENABLE == 0 {
            return None;
        }
        let bus = (a >> 16) as u8;
        let device = ((a >> 11) & 0x1f) as u8;
        let function = ((a >> 8) & 0x7) as u8;
        let reg = ((a >> 2) & 0x3f) as usize;
        if bus != 0 || function != 0 {
            return None;
        }
        let dev = self.devices.get(&device)?;
        Some((
            PciAddress {
                bus,
                device,
                function,
            },
            dev,
            reg,
        ))
    }

    fn config_read(&self, offset: u64, data: &mut [u8]) {
        let value = match self.selected() {
            Some((_, dev, reg)) => dev
                .lock()
                .expect("PCI device lock poisoned")
                .read_config_register(reg),
            None => u32::MAX,
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        let Some((addr, dev, reg)) = self.selected() else {
            return;
        };
        if offset as usize + data.len() > 4 {
            tracing::warn!(
                offset,
                len = data.len(),
                "PCI config data access crosses dword"
            );
            return;
        }
        let moved = dev
            .lock()
            .expect("PCI device lock poisoned")
            .write_config_register(reg, offset, data);
        if let Some(m) = moved {
            match self.on_bar_reprogram.as_mut() {
                Some(handler) => handler(addr, m),
                None => tracing::warn!(
                    %addr, bar = m.bar, old = m.old, new = m.new,
                    "guest moved a BAR but no handler is set: the device stays at the old address"
                ),
            }
        }
    }
}

/// The address register and the host bridge are the root's own state; the devices behind
/// it save their own, and the caller re-adds them in the same order after a restore, so
/// each gets its slot back.
impl Persist<'_> for PciRoot {
    type State = PciRootState;
    type ConstructorArgs = ();
    type Error = PciError;

    fn save(&self) -> Result<PciRootState, PciError> {
        let host_bridge = self
            .host_bridge
            .lock()
            .expect("host bridge lock poisoned")
            .config
            .save()
            .map_err(PciError::HostBridge)?;
        Ok(PciRootState {
            config_address: self.config_address,
            host_bridge,
        })
    }

    fn restore((): (), state: &PciRootState) -> Result<Self, PciError> {
        let root = Self::new();
        root.host_bridge
            .lock()
            .expect("host bridge lock poisoned")
            .config =
            PciConfiguration::restore((), &state.host_bridge).map_err(PciError::HostBridge)?;
        Ok(Self {
            config_address: state.config_address,
            ..root
        })
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for PciRoot {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match offset {
            // The address register only answers whole-dword accesses, like a real chipset.
            0 if data.len() == 4 => data.copy_from_slice(&self.config_address.to_le_bytes()),
            4..=7 => self.config_read(offset - 4, data),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let mut v = [0u8; 4];
                v.copy_from_slice(data);
                // Bits 1:0 are reserved and read back as 0.
                self.config_address = u32::from_le_bytes(v) & !0x3;
            }
            4..=7 => self.config_write(offset - 4, data),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;

    struct Fake {
        config: PciConfiguration,
    }

    impl Fake {
        fn new() -> Self {
            let mut config = PciConfiguration::new(PciHeader {
                vendor_id: 0x1af4,
                device_id: 0x1041,
                revision: 1,
                class: 2,
                subclass: 0,
                prog_if: 0,
                subsystem_vendor_id: 0x1af4,
                subsystem_id: 1,
            });
            config
                .add_bar(0, 0xc000_0000, 0x1000, BarKind::Mmio32)
                .unwrap();
            Self { config }
        }
    }

    impl PciDevice for Fake {
        fn config(&self) -> &PciConfiguration {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfiguration {
            &mut self.config
        }
    }

    fn addr(dev: u32, reg: u32) -> u32 {
        CONFIG_ENABLE | dev << 11 | reg << 2
    }

    fn setup() -> (Bus, Arc<Mutex<PciRoot>>) {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let dev = Arc::new(Mutex::new(Fake::new()));
        let a = root.lock().unwrap().add_device(dev).unwrap();
        assert_eq!(a.to_string(), "00:01.0");
        let mut bus = Bus::new();
        bus.insert(root.clone(), PciRoot::PORT_BASE, PciRoot::PORT_LEN)
            .unwrap();
        (bus, root)
    }

    fn read32(bus: &Bus, a: u32) -> u32 {
        bus.write(0xcf8, &a.to_le_bytes());
        let mut d = [0u8; 4];
        bus.read(0xcfc, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn conf1_decodes_address_and_sub_dword_data() {
        let (bus, _root) = setup();
        assert_eq!(read32(&bus, addr(0, 0)), 0x0d57_8086);
        assert_eq!(read32(&bus, addr(1, 0)), 0x1041_1af4);
        // Address register reads back (reserved low bits cleared).
        bus.write(0xcf8, &(addr(1, 2) | 3).to_le_bytes());
        let mut d = [0u8; 4];
        bus.read(0xcf8, &mut d);
        assert_eq!(u32::from_le_bytes(d), addr(1, 2));
        // Byte and word reads at 0xCFC + n pick bytes of the dword.
        let mut w = [0u8; 2];
        bus.write(0xcf8, &addr(1, 0).to_le_bytes());
        bus.read(0xcfe, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1041);
        let mut b = [0u8; 1];
        bus.read(0xcfd, &mut b);
        assert_eq!(b[0], 0x1a);
        // Absent slot, other bus, other function, enable bit clear: all-ones.
        assert_eq!(read32(&bus, addr(5, 0)), u32::MAX);
        assert_eq!(read32(&bus, addr(1, 0) | 1 << 16), u32::MAX);
        assert_eq!(read32(&bus, addr(1, 0) | 1 << 8), u32::MAX);
        assert_eq!(read32(&bus, addr(1, 0) & !CONFIG_ENABLE), u32::MAX);
        // Sub-dword writes: the command register's low byte.
        bus.write(0xcf8, &addr(1, 1).to_le_bytes());
        bus.write(0xcfc, &[0x06]);
        assert_eq!(read32(&bus, addr(1, 1)) & 0xffff, 0x6);
        // A byte write at 0xCF8 is not the address register.
        bus.write(0xcf8, &[0]);
        bus.read(0xcf8, &mut d);
        assert_eq!(u32::from_le_bytes(d), addr(1, 1));
    }

    #[test]
    fn bar_sizing_and_reprogram_handler() {
        let (bus, root) = setup();
        assert_eq!(read32(&bus, addr(1, 4)), 0xc000_0000);
        bus.write(0xcf8, &addr(1, 4).to_le_bytes());
        bus.write(0xcfc, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&bus, addr(1, 4)), 0xffff_f000);
        bus.write(0xcfc, &0xc000_0000u32.to_le_bytes());

        let moves = Arc::new(Mutex::new(Vec::new()));
        let m = moves.clone();
        root.lock()
            .unwrap()
            .set_bar_reprogram_handler(Box::new(move |a, r| m.lock().unwrap().push((a, r))));
        bus.write(0xcf8, &addr(1, 4).to_le_bytes());
        bus.write(0xcfc, &0xc010_0000u32.to_le_bytes());
        let moves = moves.lock().unwrap();
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].0.device, 1);
        assert_eq!(
            moves[0].1,
            BarReprogram {
                bar: 0,
                old: 0xc000_0000,
                new: 0xc010_0000,
                len: 0x1000
            }
        );
    }

    #[test]
    fn root_state_round_trip() {
        let (bus, root) = setup();
        bus.write(0xcf8, &addr(0, 1).to_le_bytes());
        bus.write(0xcfc, &[0x6]);
        let s = root.lock().unwrap().save().unwrap();
        assert_eq!(s.config_address, addr(0, 1));
        // Through an encoding, as a checkpoint carries it.
        let decoded: PciRootState = bincode::deserialize(&bincode::serialize(&s).unwrap()).unwrap();
        let r = PciRoot::restore((), &decoded).unwrap();
        assert_eq!(r.save().unwrap(), s);
    }
}
