//! MSI-X: the capability, the vector table and the pending-bit array (PCI 3.0, 6.8.2).
//!
//! The table and PBA live in a memory BAR; the owning device forwards accesses to them.
//! A vector fires through [`MsiSender`] unless it (or the whole function) is masked, in
//! which case its pending bit is set and the message goes out when it is unmasked.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::interrupt::{MsiMessage, MsiSender};
use crate::persist::Persist;

/// Capability id of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Largest table a function can have.
pub const MSIX_MAX_VECTORS: u16 = 2048;

/// Message-control bit: MSI-X enabled.
pub const MSIX_CTL_ENABLE: u16 = 1 << 15;
/// Message-control bit: all vectors of the function masked.
pub const MSIX_CTL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector-control bit: this vector is masked.
const VECTOR_CTL_MASKED: u32 = 1;

/// Errors creating or restoring an MSI-X block.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsixError {
    #[error("MSI-X vector count {0} is not in 1..={MSIX_MAX_VECTORS}")]
    VectorCount(usize),
    #[error("saved MSI-X pending-bit array has {found} words, the table needs {expected}")]
    PbaSize { found: usize, expected: usize },
}

/// One table entry as the guest programmed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixTableEntry {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    pub vector_ctl: u32,
}

impl Default for MsixTableEntry {
    fn default() -> Self {
        // Vectors come out of reset masked.
        Self {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            vector_ctl: VECTOR_CTL_MASKED,
        }
    }
}

impl MsixTableEntry {
    fn masked(&self) -> bool {
        self.vector_ctl & VECTOR_CTL_MASKED != 0
    }
    fn word(&mut self, i: usize) -> &mut u32 {
        match i {
            0 => &mut self.addr_lo,
            1 => &mut self.addr_hi,
            2 => &mut self.data,
            _ => &mut self.vector_ctl,
        }
    }
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

/// Serializable state of an [`Msix`] block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub table: Vec<MsixTableEntry>,
    pub pba: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// Where the table and PBA live, for the capability.
#[derive(Clone, Copy, Debug)]
pub struct MsixLayout {
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

/// An MSI-X block: table, PBA and the enable/function-mask bits.
pub struct Msix {
    table: Vec<MsixTableEntry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    sender: Arc<dyn MsiSender>,
}

impl Msix {
    pub fn new(vectors: usize, sender: Arc<dyn MsiSender>) -> Result<Self, MsixError> {
        if vectors == 0 || vectors > usize::from(MSIX_MAX_VECTORS) {
            return Err(MsixError::VectorCount(vectors));
        }
        Ok(Self {
            table: vec![MsixTableEntry::default(); vectors],
            pba: vec![0; vectors.div_ceil(64)],
            enabled: false,
            function_masked: false,
            sender,
        })
    }

    pub fn num_vectors(&self) -> usize {
        self.table.len()
    }

    /// Bytes of the table in the BAR.
    pub fn table_len(&self) -> u64 {
        self.table.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// Bytes of the PBA in the BAR.
    pub fn pba_len(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// The capability body (after id/next) and its write mask: only the enable and
    /// function-mask bits of message control are writable.
    pub fn capability(&self, layout: MsixLayout) -> ([u8; 10], [u8; 10]) {
        let mut body = [0u8; 10];
        let ctl = (self.table.len() - 1) as u16;
        body[0..2].copy_from_slice(&ctl.to_le_bytes());
        let table = layout.table_offset | u32::from(layout.table_bar);
        body[2..6].copy_from_slice(&table.to_le_bytes());
        let pba = layout.pba_offset | u32::from(layout.pba_bar);
        body[6..10].copy_from_slice(&pba.to_le_bytes());
        let mut mask = [0u8; 10];
        mask[1] = ((MSIX_CTL_ENABLE | MSIX_CTL_FUNCTION_MASK) >> 8) as u8;
        (body, mask)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Applies the enable/function-mask bits of a message-control value the guest wrote.
    pub fn set_message_control(&mut self, ctl: u16) {
        let (was_enabled, was_masked) = (self.enabled, self.function_masked);
        self.enabled = ctl & MSIX_CTL_ENABLE != 0;
        self.function_masked = ctl & MSIX_CTL_FUNCTION_MASK != 0;
        if (was_enabled, was_masked) != (self.enabled, self.function_masked) {
            tracing::debug!(
                enabled = self.enabled,
                function_masked = self.function_masked,
                "MSI-X control changed"
            );
            self.deliver_pending();
        }
    }

    /// Guest read of the table at byte `offset`; bytes past the table read as zero.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            let entry = (off / MSIX_TABLE_ENTRY_SIZE) as usize;
            *b = match self.table.get(entry) {
                Some(e) => {
                    let mut e = *e;
                    let word = *e.word((off % MSIX_TABLE_ENTRY_SIZE / 4) as usize);
                    word.to_le_bytes()[(off % 4) as usize]
                }
                None => 0,
            };
        }
    }

    /// Guest write to the table at byte `offset`. Unmasking a vector with its pending bit
    /// set sends the message.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let mut touched = Vec::new();
        for (i, b) in data.iter().enumerate() {
            let off = offset + i as u64;
            let entry = (off / MSIX_TABLE_ENTRY_SIZE) as usize;
            let Some(e) = self.table.get_mut(entry) else {
                tracing::warn!(offset = off, "MSI-X table write past the table ignored");
                return;
            };
            let word = e.word((off % MSIX_TABLE_ENTRY_SIZE / 4) as usize);
            let mut bytes = word.to_le_bytes();
            bytes[(off % 4) as usize] = *b;
            *word = u32::from_le_bytes(bytes);
            if touched.last() != Some(&entry) {
                touched.push(entry);
            }
        }
        for entry in touched {
            if !self.table[entry].masked() && self.is_pending(entry) {
                self.try_deliver(entry);
            }
        }
    }

    /// Guest read of the PBA at byte `offset` (the PBA is read-only).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset as usize + i;
            *b = self
                .pba
                .get(off / 8)
                .map_or(0, |w| w.to_le_bytes()[off % 8]);
        }
    }

    /// Raises `vector`: sends it now or, if masked, marks it pending.
    pub fn trigger(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.table.len() {
            tracing::debug!(vector, "interrupt on a vector past the MSI-X table dropped");
            return;
        }
        if !self.enabled {
            // No INTx fallback: a driver that does not enable MSI-X gets no interrupts.
            tracing::debug!(vector, "MSI-X disabled, interrupt dropped");
            return;
        }
        if self.function_masked || self.table[v].masked() {
            self.pba[v / 64] |= 1 << (v % 64);
            return;
        }
        self.send(v);
    }

    fn is_pending(&self, v: usize) -> bool {
        self.pba[v / 64] & (1 << (v % 64)) != 0
    }

    fn try_deliver(&mut self, v: usize) {
        if self.enabled && !self.function_masked && !self.table[v].masked() {
            self.pba[v / 64] &= !(1 << (v % 64));
            self.send(v);
        }
    }

    fn deliver_pending(&mut self) {
        for v in 0..self.table.len() {
            if self.is_pending(v) {
                self.try_deliver(v);
            }
        }
    }

    fn send(&self, v: usize) {
        let msg = self.table[v].message();
        if let Err(e) = self.sender.send_msi(msg) {
            tracing::warn!(vector = v, error = %e, "MSI delivery failed");
        }
    }
}

/// The table, PBA and control bits are the state; the interrupt sender is this host's.
impl Persist<'_> for Msix {
    type State = MsixState;
    type ConstructorArgs = Arc<dyn MsiSender>;
    type Error = MsixError;

    fn save(&self) -> Result<MsixState, MsixError> {
        Ok(MsixState {
            table: self.table.clone(),
            pba: self.pba.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        })
    }

    /// A pending vector stays pending: it fires when the guest unmasks it, as it would
    /// have on the saved host.
    fn restore(sender: Arc<dyn MsiSender>, state: &MsixState) -> Result<Self, MsixError> {
        let mut m = Self::new(state.table.len(), sender)?;
        if state.pba.len() != m.pba.len() {
            return Err(MsixError::PbaSize {
                found: state.pba.len(),
                expected: m.pba.len(),
            });
        }
        m.table.clone_from(&state.table);
        m.pba.clone_from(&state.pba);
        m.enabled = state.enabled;
        m.function_masked = state.function_masked;
        Ok(m)
    }
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.table.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish_non_exhaustive()
    }
}

/// An [`MsiSender`] that records messages, for tests across the device modules.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct RecordingMsi {
    pub sent: std::sync::Mutex<Vec<MsiMessage>>,
}

#[cfg(test)]
impl RecordingMsi {
    pub fn take(&self) -> Vec<MsiMessage> {
        std::mem::take(&mut *self.sent.lock().unwrap())
    }
}

#[cfg(test)]
impl MsiSender for RecordingMsi {
    fn send_msi(&self, msg: MsiMessage) -> std::io::Result<()> {
        self.sent.lock().unwrap().push(msg);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(m: &mut Msix, v: u64, addr: u64, data: u32, masked: bool) {
        let base = v * MSIX_TABLE_ENTRY_SIZE;
        m.write_table(base, &addr.to_le_bytes());
        m.write_table(base + 8, &data.to_le_bytes());
        m.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    fn msg(address: u64, data: u32) -> MsiMessage {
        MsiMessage { address, data }
    }

    #[test]
    fn table_reads_back_and_starts_masked() {
        let rec = Arc::new(RecordingMsi::default());
        let mut m = Msix::new(3, rec.clone()).unwrap();
        let mut b = [0u8; 4];
        m.read_table(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        program(&mut m, 1, 0xfee0_1000, 0x41, false);
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
        m.read_table(24, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x41);
        m.read_table(48, &mut b);
        assert_eq!(b, [0; 4]);
        m.write_table(48, &[1, 2, 3, 4]);
        assert!(Msix::new(0, rec.clone()).is_err());
        assert!(Msix::new(2049, rec).is_err());
    }

    #[test]
    fn masking_sets_pending_and_unmask_delivers() {
        let rec = Arc::new(RecordingMsi::default());
        let mut m = Msix::new(3, rec.clone()).unwrap();
        program(&mut m, 0, 0xfee0_0000, 0x30, false);
        program(&mut m, 2, 0xfee0_0000, 0x32, true);

        // Disabled: dropped, not pending.
        m.trigger(0);
        assert!(rec.take().is_empty());
        m.set_message_control(MSIX_CTL_ENABLE);
        m.trigger(0);
        assert_eq!(rec.take(), vec![msg(0xfee0_0000, 0x30)]);

        // Per-vector mask: pending until unmasked.
        m.trigger(2);
        assert!(rec.take().is_empty());
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b100);
        m.write_table(2 * 16 + 12, &0u32.to_le_bytes());
        assert_eq!(rec.take(), vec![msg(0xfee0_0000, 0x32)]);
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0);

        // Function mask: pending until the function is unmasked.
        m.set_message_control(MSIX_CTL_ENABLE | MSIX_CTL_FUNCTION_MASK);
        m.trigger(0);
        m.trigger(0);
        assert!(rec.take().is_empty());
        m.set_message_control(MSIX_CTL_ENABLE);
        assert_eq!(rec.take(), vec![msg(0xfee0_0000, 0x30)]);

        // Out-of-range vectors are ignored.
        m.trigger(7);
        assert!(rec.take().is_empty());
    }

    #[test]
    fn capability_layout() {
        let m = Msix::new(3, Arc::new(RecordingMsi::default())).unwrap();
        let (body, mask) = m.capability(MsixLayout {
            table_bar: 0,
            table_offset: 0x6000,
            pba_bar: 0,
            pba_offset: 0x7000,
        });
        assert_eq!(&body[0..2], &[2, 0]);
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x6000);
        assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x7000);
        assert_eq!(mask[1], 0xc0);
    }

    #[test]
    fn state_round_trip() {
        let rec = Arc::new(RecordingMsi::default());
        let mut m = Msix::new(3, rec.clone()).unwrap();
        program(&mut m, 1, 0xfee0_0000, 0x31, true);
        m.set_message_control(MSIX_CTL_ENABLE);
        m.trigger(1);
        let s = m.save().unwrap();
        let mut r = Msix::restore(rec.clone(), &s).unwrap();
        assert_eq!(r.save().unwrap(), s);
        // The restored pending bit still fires on unmask.
        r.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(rec.take(), vec![msg(0xfee0_0000, 0x31)]);
        let mut bad = s.clone();
        bad.pba.push(0);
        assert_eq!(
            Msix::restore(rec.clone(), &bad).unwrap_err(),
            MsixError::PbaSize {
                found: 2,
                expected: 1
            }
        );
        let mut bad = s;
        bad.table.clear();
        assert_eq!(
            Msix::restore(rec, &bad).unwrap_err(),
            MsixError::VectorCount(0)
        );
    }
}
