//! PCI configuration mechanism #1 (0xCF8/0xCFC, 32-bit accesses) on bus 0.

use crate::arch::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

/// A function on bus 0.
#[derive(Clone, Copy, Debug)]
pub struct PciFunction {
    pub device: u8,
    pub function: u8,
}

impl PciFunction {
    fn address(self, offset: u8) -> u32 {
        0x8000_0000
            | (u32::from(self.device) << 11)
            | (u32::from(self.function) << 8)
            | u32::from(offset & 0xFC)
    }

    /// Read the dword at `offset` (rounded down to a multiple of 4).
    pub fn read32(self, offset: u8) -> u32 {
        outl(CONFIG_ADDRESS, self.address(offset));
        inl(CONFIG_DATA)
    }

    /// Write the dword at `offset` (rounded down to a multiple of 4).
    pub fn write32(self, offset: u8, value: u32) {
        outl(CONFIG_ADDRESS, self.address(offset));
        outl(CONFIG_DATA, value);
    }

    /// Read the byte at `offset`.
    pub fn read8(self, offset: u8) -> u8 {
        (self.read32(offset) >> ((offset & 3) * 8)) as u8
    }

    /// Read the 16-bit word at `offset` (must be 2-byte aligned).
    pub fn read16(self, offset: u8) -> u16 {
        (self.read32(offset) >> ((offset & 2) * 8)) as u16
    }

    /// Write the 16-bit word at `offset` (2-byte aligned) with a read-modify-write of its
    /// dword.
    pub fn write16(self, offset: u8, value: u16) {
        let shift = (offset & 2) * 8;
        let old = self.read32(offset);
        let new = (old & !(0xFFFF << shift)) | (u32::from(value) << shift);
        self.write32(offset, new);
    }

    /// Vendor and device ID.
    pub fn ids(self) -> (u16, u16) {
        let v = self.read32(0);
        (v as u16, (v >> 16) as u16)
    }

    /// The memory address a BAR decodes (32- or 64-bit memory BARs), or `None` for an I/O
    /// or unassigned BAR.
    pub fn bar_address(self, bar: u8) -> Option<u64> {
        if bar > 5 {
            return None;
        }
        let offset = 0x10 + bar * 4;
        let lo = self.read32(offset);
        if lo & 1 != 0 {
            return None; // I/O BAR
        }
        let addr = match (lo >> 1) & 3 {
            0 => u64::from(lo & !0xF),
            2 if bar < 5 => u64::from(lo & !0xF) | (u64::from(self.read32(offset + 4)) << 32),
            _ => return None,
        };
        (addr != 0).then_some(addr)
    }

    /// Enable memory-space decoding and bus mastering; disable INTx.
    pub fn enable_memory_and_bus_master(self) {
        let cmd = self.read16(0x04);
        self.write16(0x04, cmd | 0x2 | 0x4 | 0x400);
    }

    /// Iterate the capability list: yields the config-space offset of each capability.
    pub fn capabilities(self) -> CapIter {
        let status = self.read16(0x06);
        let first = if status & 0x10 != 0 {
            self.read8(0x34) & 0xFC
        } else {
            0
        };
        CapIter {
            func: self,
            next: first,
            budget: 48,
        }
    }
}

/// Iterator over a function's capability offsets (bounded against loops).
pub struct CapIter {
    func: PciFunction,
    next: u8,
    budget: u32,
}

impl Iterator for CapIter {
    type Item = u8;
    fn next(&mut self) -> Option<u8> {
        if self.next < 0x40 || self.budget == 0 {
            return None;
        }
        self.budget -= 1;
        let at = self.next;
        self.next = self.func.read8(at + 1) & 0xFC;
        Some(at)
    }
}

/// Find the first function on bus 0 with the given IDs.
pub fn find(vendor: u16, device: u16) -> Option<PciFunction> {
    for dev in 0..32u8 {
        let f0 = PciFunction {
            device: dev,
            function: 0,
        };
        let (v, _) = f0.ids();
        if v == 0xFFFF {
            continue;
        }
        let multi = f0.read8(0x0E) & 0x80 != 0;
        for function in 0..if multi { 8 } else { 1 } {
            let f = PciFunction {
                device: dev,
                function,
            };
            if f.ids() == (vendor, device) {
                return Some(f);
            }
        }
    }
    None
}
