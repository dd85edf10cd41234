//! A type-0 PCI configuration header: registers with per-bit write masks, BARs (sizing and
//! reprogramming) and a capabilities list.

use serde::{Deserialize, Serialize};

use crate::persist::Persist;

/// Number of 32-bit registers in the (conventional, 256-byte) configuration space.
pub const NUM_CONFIG_REGISTERS: usize = 64;
/// Number of BAR slots in a type-0 header.
pub const NUM_BARS: usize = 6;

const REG_ID: usize = 0;
const REG_COMMAND_STATUS: usize = 1;
const REG_CLASS_REVISION: usize = 2;
const REG_BIST_HEADER_LATENCY_CACHE: usize = 3;
const REG_BAR0: usize = 4;
const REG_SUBSYSTEM: usize = 11;
const REG_CAP_POINTER: usize = 13;
const REG_INTERRUPT: usize = 15;

/// Status register bit: the capabilities list at 0x34 is valid.
const STATUS_CAP_LIST: u32 = 1 << 4;
/// Command bits the guest may change: I/O space, memory space, bus master, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0407;
/// Command register bit enabling decode of memory BARs.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// First byte after the standard header, where capabilities go.
const FIRST_CAPABILITY: usize = 0x40;
const CONFIG_SPACE_SIZE: usize = NUM_CONFIG_REGISTERS * 4;

/// Errors building a configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciConfigError {
    #[error("BAR {index} does not exist or its 64-bit upper half would be past BAR 5")]
    BarIndex { index: usize },
    #[error("BAR {index} is already in use")]
    BarInUse { index: usize },
    #[error("BAR {index} size {size:#x} is not a power of two of at least 16 bytes")]
    BarSize { index: usize, size: u64 },
    #[error("BAR {index} address {addr:#x} is not aligned to its size {size:#x} or does not fit")]
    BarAddress { index: usize, addr: u64, size: u64 },
    #[error("capability of {len} bytes does not fit in configuration space")]
    CapabilitySpace { len: usize },
    #[error("saved configuration space has {found} registers, expected {NUM_CONFIG_REGISTERS}")]
    StateSize { found: usize },
}

/// The kind of address space a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    Mmio32,
    Mmio64 { prefetchable: bool },
}

impl BarKind {
    /// The read-only low bits of the BAR register (PCI 3.0, 6.2.5.1).
    fn type_bits(self) -> u32 {
        match self {
            BarKind::Mmio32 => 0,
            BarKind::Mmio64 { prefetchable } => 0b100 | if prefetchable { 0b1000 } else { 0 },
        }
    }
    fn is_64(self) -> bool {
        matches!(self, BarKind::Mmio64 { .. })
    }
}

/// A BAR as currently programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciBar {
    pub index: u8,
    pub addr: u64,
    pub size: u64,
    pub kind: BarKind,
}

/// The guest moved a BAR: whoever maps the device on the MMIO bus must move it from `old` to
/// `new` (both `len` bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarReprogram {
    pub bar: u8,
    pub old: u64,
    pub new: u64,
    pub len: u64,
}

/// Identity registers of a type-0 header.
#[derive(Clone, Copy, Debug)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct BarSlot {
    size: u64,
    kind: BarKind,
    /// The address last reported (or assigned): the one the bus mapping is at.
    addr: u64,
    /// Per dword: the guest's last write was all-ones, i.e. it is sizing the BAR and the
    /// register holds the size mask, not an address.
    sizing: [bool; 2],
}

/// Serializable state of a [`PciConfiguration`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigurationState {
    regs: Vec<u32>,
    writable: Vec<u32>,
    bars: Vec<Option<BarSlot>>,
    last_capability: Option<usize>,
    next_capability: usize,
}

/// Configuration space of one function.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    regs: [u32; NUM_CONFIG_REGISTERS],
    writable: [u32; NUM_CONFIG_REGISTERS],
    bars: [Option<BarSlot>; NUM_BARS],
    last_capability: Option<usize>,
    next_capability: usize,
}

impl PciConfiguration {
    pub fn new(h: PciHeader) -> Self {
        let mut regs = [0u32; NUM_CONFIG_REGISTERS];
        let mut writable = [0u32; NUM_CONFIG_REGISTERS];
        regs[REG_ID] = u32::from(h.device_id) << 16 | u32::from(h.vendor_id);
        regs[REG_CLASS_REVISION] = u32::from(h.class) << 24
            | u32::from(h.subclass) << 16
            | u32::from(h.prog_if) << 8
            | u32::from(h.revision);
        // Header type 0, single function.
        regs[REG_BIST_HEADER_LATENCY_CACHE] = 0;
        regs[REG_SUBSYSTEM] = u32::from(h.subsystem_id) << 16 | u32::from(h.subsystem_vendor_id);
        writable[REG_COMMAND_STATUS] = COMMAND_WRITABLE;
        // Cache line size is scratch the OS may write.
        writable[REG_BIST_HEADER_LATENCY_CACHE] = 0xff;
        // Interrupt line is scratch too; interrupt pin stays 0 (no INTx: MSI-X only).
        writable[REG_INTERRUPT] = 0xff;
        Self {
            regs,
            writable,
            bars: [None; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        }
    }

    /// Adds a memory BAR at a VMM-assigned address.
    pub fn add_bar(
        &mut self,
        index: usize,
        addr: u64,
        size: u64,
        kind: BarKind,
    ) -> Result<(), PciConfigError> {
        let slots = if kind.is_64() { 2 } else { 1 };
        if index + slots > NUM_BARS {
            return Err(PciConfigError::BarIndex { index });
        }
        if self.bar_slot_used(index) || (slots == 2 && self.bar_slot_used(index + 1)) {
            return Err(PciConfigError::BarInUse { index });
        }
        if size < 16 || !size.is_power_of_two() || (!kind.is_64() && size > 1 << 31) {
            return Err(PciConfigError::BarSize { index, size });
        }
        let fits = kind.is_64() || addr.checked_add(size).is_some_and(|e| e <= 1 << 32);
        if addr % size != 0 || !fits {
            return Err(PciConfigError::BarAddress { index, addr, size });
        }
        let reg = REG_BAR0 + index;
        self.regs[reg] = addr as u32 | kind.type_bits();
        self.writable[reg] = !(size - 1) as u32 & !0xf;
        if kind.is_64() {
            self.regs[reg + 1] = (addr >> 32) as u32;
            self.writable[reg + 1] = (!(size - 1) >> 32) as u32;
        }
        self.bars[index] = Some(BarSlot {
            size,
            kind,
            addr,
            sizing: [false; 2],
        });
        Ok(())
    }

    fn bar_slot_used(&self, index: usize) -> bool {
        self.bars[index].is_some()
            || (index > 0 && self.bars[index - 1].is_some_and(|b| b.kind.is_64()))
    }

    /// Appends a capability and links it into the list. `body` is everything after the
    /// 2-byte id/next header; `write_mask` (same length) says which body bits the guest may
    /// change. Returns the capability's offset in configuration space.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        write_mask: &[u8],
    ) -> Result<usize, PciConfigError> {
        assert_eq!(body.len(), write_mask.len(), "capability mask length");
        let len = 2 + body.len();
        let offset = self.next_capability;
        let end = offset + len;
        if end > CONFIG_SPACE_SIZE {
            return Err(PciConfigError::CapabilitySpace { len });
        }
        let mut bytes = vec![id, 0];
        bytes.extend_from_slice(body);
        let mut mask = vec![0, 0];
        mask.extend_from_slice(write_mask);
        for (i, (b, m)) in bytes.iter().zip(&mask).enumerate() {
            self.set_byte(offset + i, *b, *m);
        }
        match self.last_capability {
            Some(prev) => self.set_byte(prev + 1, offset as u8, 0),
            None => {
                self.set_byte(REG_CAP_POINTER * 4, offset as u8, 0);
                self.regs[REG_COMMAND_STATUS] |= STATUS_CAP_LIST << 16;
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = end.next_multiple_of(4);
        Ok(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8, mask: u8) {
        let (reg, shift) = (offset / 4, (offset % 4) * 8);
        self.regs[reg] = self.regs[reg] & !(0xff << shift) | u32::from(value) << shift;
        self.writable[reg] = self.writable[reg] & !(0xff << shift) | u32::from(mask) << shift;
    }

    /// Reads register `reg` (byte offset `reg * 4`); out of range reads as all-ones.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(u32::MAX)
    }

    /// Sets a register's value bypassing the write mask (device-side updates, e.g. a
    /// capability field the device itself owns).
    pub fn set_reg(&mut self, reg: usize, value: u32) {
        if let Some(r) = self.regs.get_mut(reg) {
            *r = value;
        }
    }

    /// A guest write of 1, 2 or 4 bytes at byte `offset` of register `reg`. Read-only bits
    /// keep their value. Returns the BAR move the write made, if any.
    pub fn write(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarReprogram> {
        let len = data.len();
        if reg >= NUM_CONFIG_REGISTERS || !matches!(len, 1 | 2 | 4) || offset as usize + len > 4 {
            tracing::warn!(reg, offset, len, "ignoring malformed PCI config write");
            return None;
        }
        let mut value = [0u8; 4];
        value[..len].copy_from_slice(data);
        let shift = offset * 8;
        let value = (u64::from(u32::from_le_bytes(value)) << shift) as u32;
        let mask = (((1u64 << (len * 8)) - 1) << shift) as u32 & self.writable[reg];
        self.regs[reg] = self.regs[reg] & !mask | value & mask;

        if (REG_BAR0..REG_BAR0 + NUM_BARS).contains(&reg) {
            // Sizing is a dword write of all-ones; anything else is an address.
            return self.bar_written(reg - REG_BAR0, len == 4 && value == u32::MAX);
        }
        None
    }

    fn bar_written(&mut self, slot: usize, sizing: bool) -> Option<BarReprogram> {
        let (index, half) = match self.bars[slot] {
            Some(_) => (slot, 0),
            None if slot > 0 && self.bars[slot - 1].is_some_and(|b| b.kind.is_64()) => {
                (slot - 1, 1)
            }
            None => return None,
        };
        let reg = REG_BAR0 + index;
        let regs = &self.regs;
        let bar = self.bars[index].as_mut()?;
        bar.sizing[half] = sizing;
        if bar.sizing.iter().any(|s| *s) {
            return None;
        }
        let mut new = u64::from(regs[reg] & !0xf);
        if bar.kind.is_64() {
            new |= u64::from(regs[reg + 1]) << 32;
        }
        if new == bar.addr {
            return None;
        }
        let event = BarReprogram {
            bar: index as u8,
            old: bar.addr,
            new,
            len: bar.size,
        };
        bar.addr = new;
        tracing::debug!(bar = index, old = event.old, new, "guest moved a BAR");
        Some(event)
    }

    /// The BARs with their current addresses.
    pub fn bars(&self) -> Vec<PciBar> {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                b.map(|b| PciBar {
                    index: i as u8,
                    addr: b.addr,
                    size: b.size,
                    kind: b.kind,
                })
            })
            .collect()
    }

    pub fn command(&self) -> u16 {
        self.regs[REG_COMMAND_STATUS] as u16
    }
}

/// Configuration space has no host resources: a state is all there is to it.
impl Persist<'_> for PciConfiguration {
    type State = PciConfigurationState;
    type ConstructorArgs = ();
    type Error = PciConfigError;

    fn save(&self) -> Result<PciConfigurationState, PciConfigError> {
        Ok(PciConfigurationState {
            regs: self.regs.to_vec(),
            writable: self.writable.to_vec(),
            bars: self.bars.to_vec(),
            last_capability: self.last_capability,
            next_capability: self.next_capability,
        })
    }

    fn restore((): (), state: &PciConfigurationState) -> Result<Self, PciConfigError> {
        let regs: [u32; NUM_CONFIG_REGISTERS] =
            state
                .regs
                .as_slice()
                .try_into()
                .map_err(|_| PciConfigError::StateSize {
                    found: state.regs.len(),
                })?;
        let writable: [u32; NUM_CONFIG_REGISTERS] =
            state
                .writable
                .as_slice()
                .try_into()
                .map_err(|_| PciConfigError::StateSize {
                    found: state.writable.len(),
                })?;
        let bars: [Option<BarSlot>; NUM_BARS] =
            state
                .bars
                .as_slice()
                .try_into()
                .map_err(|_| PciConfigError::BarIndex {
                    index: state.bars.len(),
                })?;
        Ok(Self {
            regs,
            writable,
            bars,
            last_capability: state.last_capability,
            next_capability: state.next_capability,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            revision: 1,
            class: 0x02,
            subclass: 0x00,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    fn write32(c: &mut PciConfiguration, reg: usize, v: u32) -> Option<BarReprogram> {
        c.write(reg, 0, &v.to_le_bytes())
    }

    #[test]
    fn identity_and_read_only_registers() {
        let mut c = PciConfiguration::new(header());
        assert_eq!(c.read_reg(0), 0x1041_1af4);
        assert_eq!(c.read_reg(2), 0x0200_0001);
        write32(&mut c, 0, 0xdead_beef);
        assert_eq!(c.read_reg(0), 0x1041_1af4);
        // Command: only the writable bits stick; status is read-only.
        write32(&mut c, 1, 0xffff_ffff);
        assert_eq!(c.read_reg(1), COMMAND_WRITABLE);
        // Sub-dword write into the interrupt line byte.
        c.write(15, 0, &[0x0b]);
        assert_eq!(c.read_reg(15) & 0xff, 0x0b);
        c.write(15, 1, &[0x01]);
        assert_eq!(c.read_reg(15), 0x0b, "interrupt pin is read-only");
        assert_eq!(c.read_reg(64), u32::MAX);
        // Malformed writes are ignored.
        assert_eq!(c.write(1, 3, &[1, 2]), None);
        assert_eq!(c.read_reg(1), COMMAND_WRITABLE);
    }

    #[test]
    fn bar64_sizing_then_restore_reports_nothing() {
        let mut c = PciConfiguration::new(header());
        c.add_bar(
            0,
            0xc000_0000,
            0x8000,
            BarKind::Mmio64 {
                prefetchable: false,
            },
        )
        .unwrap();
        assert_eq!(c.read_reg(4), 0xc000_0004);
        assert_eq!(c.read_reg(5), 0);
        // Linux order: size low, restore low, size high, restore high.
        assert_eq!(write32(&mut c, 4, u32::MAX), None);
        assert_eq!(c.read_reg(4), 0xffff_8004);
        assert_eq!(write32(&mut c, 4, 0xc000_0000), None);
        assert_eq!(write32(&mut c, 5, u32::MAX), None);
        assert_eq!(c.read_reg(5), u32::MAX);
        assert_eq!(write32(&mut c, 5, 0), None);
        // Another order: both halves sized before either is restored.
        write32(&mut c, 4, u32::MAX);
        write32(&mut c, 5, u32::MAX);
        assert_eq!(write32(&mut c, 4, 0xc000_0000), None);
        assert_eq!(write32(&mut c, 5, 0), None);
        assert_eq!(c.bars()[0].addr, 0xc000_0000);
    }

    #[test]
    fn bar_reprogramming_is_reported() {
        let mut c = PciConfiguration::new(header());
        c.add_bar(
            0,
            0xc000_0000,
            0x8000,
            BarKind::Mmio64 {
                prefetchable: false,
            },
        )
        .unwrap();
        c.add_bar(2, 0xc001_0000, 0x1000, BarKind::Mmio32).unwrap();
        // Low bits below the size are not writable.
        assert_eq!(
            write32(&mut c, 4, 0xd000_1234),
            Some(BarReprogram {
                bar: 0,
                old: 0xc000_0000,
                new: 0xd000_0000,
                len: 0x8000
            })
        );
        assert_eq!(
            write32(&mut c, 5, 0x1),
            Some(BarReprogram {
                bar: 0,
                old: 0xd000_0000,
                new: 0x1_d000_0000,
                len: 0x8000
            })
        );
        assert_eq!(
            write32(&mut c, 6, 0xe000_0000).map(|r| (r.bar, r.new)),
            Some((2, 0xe000_0000))
        );
        // Unused BAR slots read 0 and ignore writes.
        assert_eq!(write32(&mut c, 7, u32::MAX), None);
        assert_eq!(c.read_reg(7), 0);
        let bars = c.bars();
        assert_eq!(bars.len(), 2);
        assert_eq!(bars[0].addr, 0x1_d000_0000);
    }

    #[test]
    fn bar_validation() {
        let mut c = PciConfiguration::new(header());
        let k = BarKind::Mmio32;
        assert!(matches!(
            c.add_bar(6, 0, 16, k),
            Err(PciConfigError::BarIndex { .. })
        ));
        assert!(matches!(
            c.add_bar(5, 0, 16, BarKind::Mmio64 { prefetchable: true }),
            Err(PciConfigError::BarIndex { .. })
        ));
        assert!(matches!(
            c.add_bar(0, 0, 24, k),
            Err(PciConfigError::BarSize { .. })
        ));
        assert!(matches!(
            c.add_bar(0, 0x10, 0x100, k),
            Err(PciConfigError::BarAddress { .. })
        ));
        c.add_bar(0, 0, 0x100, BarKind::Mmio64 { prefetchable: true })
            .unwrap();
        assert!(matches!(
            c.add_bar(1, 0, 0x100, k),
            Err(PciConfigError::BarInUse { .. })
        ));
        assert_eq!(c.read_reg(4), 0xc);
    }

    #[test]
    fn capability_list_is_linked() {
        let mut c = PciConfiguration::new(header());
        let a = c.add_capability(0x09, &[3, 0xaa], &[0, 0xff]).unwrap();
        let b = c.add_capability(0x11, &[0; 10], &[0; 10]).unwrap();
        assert_eq!((a, b), (0x40, 0x44));
        assert_ne!(c.read_reg(1) & (STATUS_CAP_LIST << 16), 0);
        assert_eq!(c.read_reg(13) & 0xff, 0x40);
        assert_eq!(c.read_reg(0x10), 0xaa03_4409);
        assert_eq!(c.read_reg(0x11) & 0xffff, 0x0011);
        c.write(0x10, 3, &[0x55]);
        c.write(0x10, 2, &[0x55]);
        assert_eq!(c.read_reg(0x10), 0x5503_4409);
        let big = vec![0; 256];
        assert!(c.add_capability(0x09, &big, &big).is_err());
    }

    #[test]
    fn state_round_trip() {
        let mut c = PciConfiguration::new(header());
        c.add_bar(
            0,
            0xc000_0000,
            0x8000,
            BarKind::Mmio64 {
                prefetchable: false,
            },
        )
        .unwrap();
        c.add_capability(0x09, &[2, 0], &[0, 0xff]).unwrap();
        write32(&mut c, 1, 0x6);
        write32(&mut c, 4, u32::MAX);
        let s = c.save().unwrap();
        let r = PciConfiguration::restore((), &s).unwrap();
        assert_eq!(r.save().unwrap(), s);
        let mut bad = s.clone();
        bad.regs.pop();
        assert_eq!(
            PciConfiguration::restore((), &bad).unwrap_err(),
            PciConfigError::StateSize { found: 63 }
        );
    }
}
