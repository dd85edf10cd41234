//! The disk workload: writes whole blocks of a working set at the end of disk 0 at a fixed
//! rate, paced by the TSC clock like the memory workload, a FLUSH after every `dflush`
//! writes, and verifies them on request (`VERIFY`).
//!
//! A block is `dblock / 4096` workload pages in the memory workload's format (`pagefmt`:
//! index, sequence number, checksum, pattern), page `k` of block `b` carrying index
//! `b × pages_per_block + k`. The sequence numbers live in a table in guest memory, updated
//! when the device has completed the write: so a checkpoint's memory and the disk as of
//! that checkpoint agree, and on a VM failed over to the disk replica `VERIFY` finds every
//! block the table says was written with exactly that sequence number. A block never
//! written must read as zeroes.

use crate::blk::{VirtioBlk, SECTOR};
use crate::pagefmt::{self, PageError, WORDS};
use alloc::vec;
use alloc::vec::Vec;

/// Most blocks written per main-loop iteration (each is a synchronous request).
const BUDGET: u64 = 8;
const PAGE: usize = 4096;

/// Outcome of [`DiskLoad::verify`].
pub struct DiskVerify {
    pub blocks: u64,
    pub bad: u64,
    /// The first bad block: (block, what is wrong, sequence number expected).
    pub first: Option<(u64, PageError, u64)>,
    /// A read failed (the device's status).
    pub io_error: bool,
}

pub struct DiskLoad {
    /// First sector of the working set.
    base: u64,
    blocks: u64,
    block_bytes: usize,
    seq: Vec<u64>,
    rate: u64,
    flush_every: u64,
    unflushed: u64,
    cursor: u64,
    start_ns: u64,
    paced: u64,
    max_backlog: u64,
    buf: Vec<u8>,
    page: [u64; WORDS],
    pub written: u64,
    pub flushes: u64,
    pub skipped: u64,
    pub errors: u64,
    /// TSC-clock nanoseconds spent in writes and flushes (for the write-latency report).
    pub busy_ns: u64,
}

impl DiskLoad {
    /// A workload over sectors `[base, base + bytes / 512)` of the disk.
    pub fn new(base: u64, bytes: u64, block_bytes: u64, rate: u64, flush_every: u64) -> Self {
        let blocks = bytes / block_bytes;
        let per_sec = rate / block_bytes;
        DiskLoad {
            base,
            blocks,
            block_bytes: block_bytes as usize,
            seq: vec![0; blocks as usize],
            rate,
            flush_every,
            unflushed: 0,
            cursor: 0,
            start_ns: 0,
            paced: 0,
            max_backlog: (per_sec / 10).max(BUDGET),
            buf: vec![0; block_bytes as usize],
            page: [0; WORDS],
            written: 0,
            flushes: 0,
            skipped: 0,
            errors: 0,
            busy_ns: 0,
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn start(&mut self, now_ns: u64) {
        self.start_ns = now_ns;
        self.paced = 0;
    }

    fn pages_per_block(&self) -> u64 {
        (self.block_bytes / PAGE) as u64
    }

    fn sector_of(&self, block: u64) -> u64 {
        self.base + block * (self.block_bytes / SECTOR) as u64
    }

    /// Writes the blocks due by `now_ns` (at most [`BUDGET`]); `clock` gives nanoseconds.
    /// Returns whether it wrote any.
    pub fn step(
        &mut self,
        now_ns: u64,
        dev: &mut VirtioBlk,
        mut clock: impl FnMut() -> u64,
    ) -> bool {
        if self.rate == 0 || self.blocks == 0 {
            return false;
        }
        let elapsed = u128::from(now_ns.saturating_sub(self.start_ns));
        let target =
            (u128::from(self.rate) * elapsed / (self.block_bytes as u128 * 1_000_000_000)) as u64;
        let mut due = target.saturating_sub(self.paced);
        if due > self.max_backlog {
            let excess = due - self.max_backlog;
            self.paced += excess;
            self.skipped += excess;
            due = self.max_backlog;
        }
        let n = due.min(BUDGET);
        let t0 = clock();
        for _ in 0..n {
            let b = self.cursor;
            self.cursor = if b + 1 >= self.blocks { 0 } else { b + 1 };
            let seq = self.seq[b as usize] + 1;
            let ppb = self.pages_per_block();
            for k in 0..ppb {
                pagefmt::fill(&mut self.page, b * ppb + k, seq);
                let at = k as usize * PAGE;
                for (i, w) in self.page.iter().enumerate() {
                    self.buf[at + i * 8..at + i * 8 + 8].copy_from_slice(&w.to_le_bytes());
                }
            }
            let sector = self.sector_of(b);
            if dev.write(sector, &self.buf).is_err() {
                // The block may hold part of the new write: its sequence number is no longer
                // known. Count it; VERIFY reports the block.
                self.errors += 1;
                continue;
            }
            // Completed: the table follows the disk.
            self.seq[b as usize] = seq;
            self.written += 1;
            self.unflushed += 1;
            if self.unflushed >= self.flush_every {
                if dev.flush().is_err() {
                    self.errors += 1;
                } else {
                    self.flushes += 1;
                }
                self.unflushed = 0;
            }
        }
        self.paced += n;
        self.busy_ns += clock().saturating_sub(t0);
        n > 0
    }

    /// Reads and checks every block of the working set.
    pub fn verify(&mut self, dev: &mut VirtioBlk) -> DiskVerify {
        let mut out = DiskVerify {
            blocks: self.blocks,
            bad: 0,
            first: None,
            io_error: false,
        };
        let ppb = self.pages_per_block();
        for b in 0..self.blocks {
            let sector = self.sector_of(b);
            if dev.read(sector, &mut self.buf).is_err() {
                out.io_error = true;
                return out;
            }
            let seq = self.seq[b as usize];
            for k in 0..ppb {
                let at = k as usize * PAGE;
                for (i, w) in self.page.iter_mut().enumerate() {
                    let mut bytes = [0u8; 8];
                    bytes.copy_from_slice(&self.buf[at + i * 8..at + i * 8 + 8]);
                    *w = u64::from_le_bytes(bytes);
                }
                if let Err(e) = pagefmt::check(&self.page, b * ppb + k, seq) {
                    out.bad += 1;
                    if out.first.is_none() {
                        out.first = Some((b, e, seq));
                    }
                    break;
                }
            }
        }
        out
    }
}
