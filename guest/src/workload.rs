//! The memory workload: writes whole pages of its working set at a fixed rate, paced by the
//! TSC clock, and verifies them on request.
//!
//! Pages are written lazily (a never-written page is still zero: booting does not touch the
//! working set). Each page's sequence number lives in a table on the heap, outside the
//! working set. A
//! checkpoint/restore that lost a page write leaves a page whose header does not match the
//! table (or whose body does not match its checksum), and `VERIFY` reports it.

use crate::args::{Pattern, WriteData, PAGE};
use crate::pagefmt::{self, PageError, WORDS};
use crate::ram::Spans;
use alloc::vec;
use alloc::vec::Vec;

/// Most pages written per main-loop iteration (256 KiB), so the network stays responsive.
pub const BUDGET: u64 = 64;

/// Outcome of [`Workload::verify`].
pub struct Verify {
    pub pages: u64,
    pub bad: u64,
    /// The first bad page: (index, what is wrong, sequence number expected).
    pub first: Option<(u64, PageError, u64)>,
}

/// The workload state (all in guest memory, so it is checkpointed with the VM).
pub struct Workload {
    /// The working set: its pages laid end to end over these ranges (page `i` is byte
    /// `i × PAGE` of them), which may lie on both sides of the MMIO hole.
    set: Spans,
    pages: u64,
    seq: Vec<u64>,
    rate: u64,
    pattern: Pattern,
    /// Body words one write changes (all of them: the whole page is rewritten).
    wwords: usize,
    wdata: WriteData,
    cursor: u64,
    rng: u64,
    start_ns: u64,
    /// Pages accounted for by the pacing since `start_ns` (written + skipped).
    paced: u64,
    /// Largest backlog carried over (100 ms of writes, at least one budget).
    max_backlog: u64,
    /// Pages written by the workload (not counting the initial fill).
    pub written: u64,
    /// Pages the pacing gave up on because the guest could not keep up.
    pub skipped: u64,
}

impl Workload {
    /// A workload over the ranges of `set` writing `rate` bytes per second.
    ///
    /// # Safety
    /// The ranges must be page-aligned RAM that nothing else uses for the rest of the
    /// guest's life: the workload makes `&mut` references to its pages.
    /// Each write changes `wfrac` percent of a page's body (rounded up to a word), with
    /// `wdata`.
    pub unsafe fn new(
        set: Spans,
        rate: u64,
        pattern: Pattern,
        wfrac: u8,
        wdata: WriteData,
    ) -> Workload {
        let pages = set.total() / PAGE;
        let per_sec = rate / PAGE;
        Workload {
            set,
            pages,
            seq: vec![0; pages as usize],
            rate,
            pattern,
            wwords: (pagefmt::BODY_WORDS * usize::from(wfrac.clamp(1, 100))).div_ceil(100),
            wdata,
            cursor: 0,
            rng: 0x2545_F491_4F6C_DD1D,
            start_ns: 0,
            paced: 0,
            max_backlog: (per_sec / 10).max(BUDGET),
            written: 0,
            skipped: 0,
        }
    }

    /// Pages in the working set.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Write rate in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    fn page(&mut self, i: u64) -> &mut [u64; WORDS] {
        // Checked in release builds too: the reference below is only sound inside the set.
        let addr = match self.set.addr(i * PAGE) {
            Some(a) if i < self.pages => a,
            _ => panic!("workload page {i} out of range"),
        };
        // SAFETY: i < pages, so byte i × PAGE of the set is in one of its ranges, and so is
        // the whole page (the ranges are whole pages): inside the working set, which `new`'s
        // caller gave this workload alone; page-aligned, so aligned for u64, and any bytes
        // are valid u64s. The `&mut self` borrow makes it the only reference to that page
        // while it lives.
        unsafe { &mut *(addr as usize as *mut [u64; WORDS]) }
    }

    fn write_page(&mut self, i: u64) {
        let seq = self.seq[i as usize] + 1;
        self.seq[i as usize] = seq;
        let (words, data) = (self.wwords, self.wdata);
        let data = match data {
            WriteData::Random => pagefmt::Data::Random,
            WriteData::Text => pagefmt::Data::Text,
        };
        match (words, data) {
            // Today's write: the whole page, its own pattern.
            (pagefmt::BODY_WORDS, pagefmt::Data::Random) => {
                pagefmt::fill(self.page(i), i, seq);
            }
            // A page's first write fills it; later ones change a run of it.
            _ if seq == 1 => {
                pagefmt::rewrite(self.page(i), i, seq, 0, pagefmt::BODY_WORDS, data);
            }
            _ => {
                let from = pagefmt::rewrite_at(i, seq, words);
                pagefmt::rewrite(self.page(i), i, seq, from, words, data);
            }
        }
    }

    /// Percent of a page one write changes, and with what.
    pub fn write_shape(&self) -> (usize, WriteData) {
        (
            (self.wwords * 100).div_ceil(pagefmt::BODY_WORDS),
            self.wdata,
        )
    }

    /// Start pacing writes from `now_ns`.
    pub fn start(&mut self, now_ns: u64) {
        self.start_ns = now_ns;
        self.paced = 0;
    }

    fn next_page(&mut self) -> u64 {
        match self.pattern {
            Pattern::Sequential => {
                let i = self.cursor;
                self.cursor = if i + 1 >= self.pages { 0 } else { i + 1 };
                i
            }
            Pattern::Random => {
                // xorshift64*, scaled to [0, pages) with a multiply-high.
                let mut x = self.rng;
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                self.rng = x;
                let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
                ((u128::from(r) * u128::from(self.pages)) >> 64) as u64
            }
        }
    }

    /// Write the pages due by `now_ns` (at most [`BUDGET`]). Returns whether it wrote any.
    pub fn step(&mut self, now_ns: u64) -> bool {
        if self.rate == 0 || self.pages == 0 {
            return false;
        }
        let elapsed = u128::from(now_ns.saturating_sub(self.start_ns));
        let target = (u128::from(self.rate) * elapsed / (u128::from(PAGE) * 1_000_000_000)) as u64;
        let mut due = target.saturating_sub(self.paced);
        if due > self.max_backlog {
            let excess = due - self.max_backlog;
            self.paced += excess;
            self.skipped += excess;
            due = self.max_backlog;
        }
        let n = due.min(BUDGET);
        for _ in 0..n {
            let i = self.next_page();
            self.write_page(i);
        }
        self.paced += n;
        self.written += n;
        n > 0
    }

    /// Check every page of the working set.
    pub fn verify(&mut self) -> Verify {
        let mut out = Verify {
            pages: self.pages,
            bad: 0,
            first: None,
        };
        for i in 0..self.pages {
            let seq = self.seq[i as usize];
            if let Err(e) = pagefmt::check(self.page(i), i, seq) {
                out.bad += 1;
                if out.first.is_none() {
                    out.first = Some((i, e, seq));
                }
            }
        }
        out
    }
}
