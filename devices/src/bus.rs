//! Port-I/O and MMIO buses: map an address range to a device.
//!
//! A vCPU thread that gets a `KVM_EXIT_IO` / `KVM_EXIT_MMIO` looks the address up here and
//! calls the device with the offset into its range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes on a bus.
pub trait BusDevice: Send {
    /// `base` is the start of the range the device was inserted at, `offset` the access
    /// offset from it. Unbacked bytes read as all-ones, like real hardware.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Errors of bus set-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("no device at bus address {0:#x}")]
    NotFound(u64),
}

/// Shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// An address space of devices (one for port I/O, one for MMIO).
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        let before = self.devices.range(..end).next_back();
        if let Some((&b, e)) = before {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the device inserted at exactly `base`.
    pub fn remove(&mut self, base: u64) -> Result<SharedDevice, BusError> {
        self.devices
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound(base))
    }

    fn lookup(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, e) = self.devices.range(..=addr).next_back()?;
        (addr - base < e.len).then_some((base, &e.device))
    }

    /// Dispatches a read; returns false (and fills all-ones) when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr) {
            Some((base, dev)) => {
                dev.lock()
                    .expect("device lock poisoned")
                    .read(base, addr - base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr) {
            Some((base, dev)) => {
                dev.lock()
                    .expect("device lock poisoned")
                    .write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Reg {
        last: Vec<(u64, u64, Vec<u8>)>,
    }
    impl BusDevice for Reg {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last.push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Reg::default()));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0xf8, 0x9),
            Err(BusError::Overlap { base: 0xf8, len: 9 })
        );
        bus.insert(dev.clone(), 0x110, 0x10).unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x103, &mut b));
        assert_eq!(b, [3, 3]);
        assert!(!bus.read(0x120, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        assert!(bus.write(0x115, &[9]));
        assert_eq!(dev.lock().unwrap().last, vec![(0x110, 5, vec![9])]);
        bus.remove(0x110).unwrap();
        assert!(!bus.write(0x115, &[9]));
    }
}
