//! The durable store: every change of the key-value store is appended to a log on disk 0
//! ([`crate::kvlog`] has the format) and flushed before the request is answered; at boot
//! the log is replayed. Like an append-only file with `fsync` on every write.
//!
//! A torn tail found at boot (a record whose write was never acknowledged) is dropped: its
//! sectors are zeroed and flushed before the guest serves anyone, so the next record goes
//! where it was and a later boot finds the log's clean end there.

use crate::blk::{BlkError, VirtioBlk, SECTOR};
use crate::kvlog::{self, Head, Label, Op, Torn};
use alloc::vec;
use alloc::vec::Vec;

/// What the guest does with disk 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The log: every change is appended and flushed before its reply.
    Log,
    /// A read-only disk with a log (or blank): replayed, changes refused.
    ReadOnly,
    /// Sector 0 is neither blank nor the log's label: the guest never writes it, and
    /// keeps the store in memory only.
    Foreign,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Log => "log",
            Mode::ReadOnly => "read-only",
            Mode::Foreign => "foreign",
        }
    }
}

/// Why a change could not be made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogError {
    Full,
    ReadOnly,
    TooLarge,
    Io(BlkError),
}

/// What the boot-time replay found.
#[derive(Clone, Copy, Debug, Default)]
pub struct Replay {
    pub records: u64,
    /// The torn tail dropped, if any: where it started and why it does not check.
    pub torn: Option<(u64, Torn)>,
    /// Records that checked but could not be applied (store limits).
    pub refused: u64,
}

/// Disk 0 as the store's log.
pub struct DiskLog {
    dev: VirtioBlk,
    pub mode: Mode,
    /// Sector the next record goes to.
    next: u64,
    /// Sequence number of the next record.
    seq: u64,
    /// First sector the log may not use (the disk workload's area starts there).
    limit: u64,
    scratch: Vec<u8>,
    pub replay: Replay,
    /// Records appended since boot.
    pub appended: u64,
    pub errors: u64,
}

/// Reads the disk in `max_io` chunks, so replay costs one request per chunk.
struct Reader<'a> {
    dev: &'a mut VirtioBlk,
    buf: Vec<u8>,
    /// First sector in `buf`, and how many it holds.
    start: u64,
    held: u64,
}

impl Reader<'_> {
    /// Sectors [sector, sector + n) (n × 512 <= max_io), read if not held.
    fn get(&mut self, sector: u64, n: u64) -> Result<&[u8], BlkError> {
        if sector < self.start || sector + n > self.start + self.held {
            let max = (self.dev.info.max_io / SECTOR) as u64;
            let count = max.min(self.dev.info.sectors - sector);
            if count < n {
                return Err(BlkError::Range);
            }
            let len = count as usize * SECTOR;
            self.buf.resize(len, 0);
            self.dev.read(sector, &mut self.buf[..len])?;
            self.start = sector;
            self.held = count;
        }
        let off = (sector - self.start) as usize * SECTOR;
        Ok(&self.buf[off..off + n as usize * SECTOR])
    }
}

impl DiskLog {
    /// Opens disk 0: labels a blank disk, replays a log through `apply` (which returns
    /// `false` for a change it cannot make), drops a torn tail. An I/O error here is
    /// returned: the guest does not serve a store it could not read.
    pub fn open(
        mut dev: VirtioBlk,
        mut apply: impl FnMut(Op<'_>) -> bool,
    ) -> Result<DiskLog, (&'static str, BlkError)> {
        let sectors = dev.info.sectors;
        let read_only = dev.info.read_only;
        let mut first = vec![0u8; SECTOR];
        if sectors < 2 {
            return Err(("disk is smaller than two sectors", BlkError::Range));
        }
        dev.read(0, &mut first)
            .map_err(|e| ("reading the label", e))?;
        let mode = match kvlog::label(&first) {
            Label::Foreign => Mode::Foreign,
            Label::Blank | Label::Log if read_only => Mode::ReadOnly,
            Label::Log => Mode::Log,
            Label::Blank => {
                kvlog::write_label(&mut first);
                dev.write(0, &first).map_err(|e| ("writing the label", e))?;
                dev.flush().map_err(|e| ("flushing the label", e))?;
                Mode::Log
            }
        };
        let mut log = DiskLog {
            dev,
            mode,
            next: 1,
            seq: 1,
            limit: sectors,
            scratch: Vec::new(),
            replay: Replay::default(),
            appended: 0,
            errors: 0,
        };
        if mode == Mode::Foreign || kvlog::label(&first) == Label::Blank {
            return Ok(log);
        }
        let mut r = Reader {
            dev: &mut log.dev,
            buf: Vec::new(),
            start: 0,
            held: 0,
        };
        let mut torn_sectors = 0u64;
        while log.next < sectors {
            let first = r.get(log.next, 1).map_err(|e| ("reading the log", e))?;
            let n = match kvlog::head(first, sectors - log.next) {
                Head::End => break,
                Head::Torn(t) => {
                    log.replay.torn = Some((log.next, t));
                    torn_sectors = 1;
                    break;
                }
                Head::Record { sectors } => sectors as u64,
            };
            let rec = r.get(log.next, n).map_err(|e| ("reading the log", e))?;
            match kvlog::decode(rec, log.seq) {
                Ok(op) => {
                    if !apply(op) {
                        log.replay.refused += 1;
                    }
                }
                Err(t) => {
                    log.replay.torn = Some((log.next, t));
                    torn_sectors = n;
                    break;
                }
            }
            log.replay.records += 1;
            log.next += n;
            log.seq += 1;
        }
        if torn_sectors > 0 && mode == Mode::Log {
            log.zero(log.next, torn_sectors)
                .map_err(|e| ("zeroing the torn tail", e))?;
        }
        Ok(log)
    }

    fn zero(&mut self, sector: u64, n: u64) -> Result<(), BlkError> {
        let per = (self.dev.info.max_io / SECTOR) as u64;
        let zeroes = vec![0u8; per.min(n) as usize * SECTOR];
        let mut at = sector;
        while at < sector + n {
            let k = per.min(sector + n - at);
            self.dev.write(at, &zeroes[..k as usize * SECTOR])?;
            at += k;
        }
        self.dev.flush()
    }

    /// Appends `op` and flushes it: when this returns `Ok`, the change is durable.
    pub fn append(&mut self, op: Op<'_>) -> Result<(), LogError> {
        match self.mode {
            Mode::Log => {}
            Mode::ReadOnly => return Err(LogError::ReadOnly),
            // Not ours: the store is in memory only, as without a disk.
            Mode::Foreign => return Ok(()),
        }
        let len = kvlog::record_len(&op).ok_or(LogError::TooLarge)?;
        if len > self.dev.info.max_io {
            return Err(LogError::TooLarge);
        }
        let n = (len / SECTOR) as u64;
        if self.next + n > self.limit {
            return Err(LogError::Full);
        }
        self.scratch.resize(len, 0);
        kvlog::encode(self.seq, &op, &mut self.scratch).ok_or(LogError::TooLarge)?;
        // A failure leaves `next` and `seq` as they were: the next record overwrites
        // whatever part of this one reached the disk (it was never acknowledged).
        let r = self
            .dev
            .write(self.next, &self.scratch[..len])
            .and_then(|()| self.dev.flush());
        if let Err(e) = r {
            self.errors += 1;
            return Err(LogError::Io(e));
        }
        self.next += n;
        self.seq += 1;
        self.appended += 1;
        Ok(())
    }

    /// Gives the last `sectors` sectors of the disk to the disk workload: the log ends
    /// before them. Its first sector, or why not (the log already reaches into them).
    pub fn reserve_tail(&mut self, sectors: u64) -> Result<u64, &'static str> {
        if self.mode != Mode::Log {
            return Err("disk 0 is not writable by the guest (read-only or foreign)");
        }
        let base = self
            .dev
            .info
            .sectors
            .checked_sub(sectors)
            .ok_or("dwss is larger than disk 0")?;
        if base < self.next || base < 2 {
            return Err("dwss does not leave room for the store's log on disk 0");
        }
        self.limit = base;
        Ok(base)
    }

    pub fn device_mut(&mut self) -> &mut VirtioBlk {
        &mut self.dev
    }

    /// Sectors used by the log (label included).
    pub fn used_sectors(&self) -> u64 {
        self.next
    }

    pub fn sectors(&self) -> u64 {
        self.dev.info.sectors
    }

    pub fn device(&self) -> &VirtioBlk {
        &self.dev
    }
}
