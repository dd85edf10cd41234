//! The bitmap that records guest memory written by the VMM (devices among it): one bit per
//! 4 KiB page, and one *summary* bit per [`CHUNK_PAGES`] pages saying whether any of them
//! may be set.
//!
//! vm-memory's `AtomicBitmap` takes a harvest with an atomic swap of every word, whatever
//! was written: ~4 ns a word, 65536 words for 16 GiB, and the VMM takes one harvest per
//! checkpoint (the VMM writes a few pages per epoch: virtio RX buffers and used rings).
//! Here a harvest reads the summary (one word per 1 GiB) and swaps only the words of the
//! chunks it names: the cost follows what was written, not the size of RAM.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

/// Bytes per tracked page.
pub const PAGE: usize = 4096;
/// Pages one summary bit stands for (64 words of page bits: 16 MiB).
pub const CHUNK_PAGES: usize = 64 * 64;

/// Dirty pages of one guest memory region (offsets are bytes from its start).
#[derive(Debug, Default)]
pub struct DirtyBitmap {
    /// One bit per page.
    words: Vec<AtomicU64>,
    /// Bit `c` of word `c / 64`: a page of chunk `c` was marked since it was last taken.
    summary: Vec<AtomicU64>,
    pages: usize,
}

impl DirtyBitmap {
    /// A clean bitmap for `bytes` bytes (rounded up to whole pages).
    pub fn new(bytes: usize) -> Self {
        let pages = bytes.div_ceil(PAGE);
        let words = pages.div_ceil(64);
        let chunks = pages.div_ceil(CHUNK_PAGES);
        DirtyBitmap {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            summary: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            pages,
        }
    }

    /// Pages tracked.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Marks pages `first..first + count` (clipped to the bitmap).
    pub fn mark_pages(&self, first: usize, count: usize) {
        let end = first.saturating_add(count).min(self.pages);
        let mut p = first;
        while p < end {
            // One word at a time: the run's bits in it, then its chunk's summary bit. The
            // page bit goes first, so a harvest that sees the summary bit sees the page.
            let w = p / 64;
            let upto = end.min((w + 1) * 64);
            let n = upto - p;
            let bits = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << (p % 64)
            };
            self.words[w].fetch_or(bits, Ordering::Release);
            let c = p / CHUNK_PAGES;
            self.summary[c / 64].fetch_or(1 << (c % 64), Ordering::Release);
            p = upto;
        }
    }

    /// Whether page `p` is marked.
    pub fn is_page_marked(&self, p: usize) -> bool {
        self.words
            .get(p / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (p % 64)) != 0)
    }

    /// ORs the marked pages into `out` (one bit per page from this bitmap's first, u64
    /// words; words beyond `out` are left marked) and clears what it took. Visits only the
    /// chunks whose summary bit is set.
    pub fn take_into(&self, out: &mut [u64]) {
        for (si, s) in self.summary.iter().enumerate() {
            if s.load(Ordering::Relaxed) == 0 {
                continue;
            }
            // Summary first: a page marked after this swap sets its summary bit again, so
            // it is taken now or by the next harvest, never lost.
            let mut chunks = s.swap(0, Ordering::AcqRel);
            while chunks != 0 {
                let c = si * 64 + chunks.trailing_zeros() as usize;
                chunks &= chunks - 1;
                let first = c * (CHUNK_PAGES / 64);
                let end = (first + CHUNK_PAGES / 64).min(self.words.len());
                for w in first..end {
                    let Some(o) = out.get_mut(w) else {
                        // Not taken: put the summary bit back.
                        s.fetch_or(1 << (c % 64), Ordering::Release);
                        break;
                    };
                    if self.words[w].load(Ordering::Relaxed) != 0 {
                        *o |= self.words[w].swap(0, Ordering::AcqRel);
                    }
                }
            }
        }
    }

    /// The marked pages (one bit per page, u64 words), cleared.
    pub fn take(&self) -> Vec<u64> {
        let mut out = vec![0; self.words.len()];
        self.take_into(&mut out);
        out
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for DirtyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len > 0 {
            let first = offset / PAGE;
            let last = offset.saturating_add(len - 1) / PAGE;
            self.mark_pages(first, last - first + 1);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.is_page_marked(offset / PAGE)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DirtyBitmap {
    fn with_len(len: usize) -> Self {
        DirtyBitmap::new(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(bm: &[u64]) -> Vec<usize> {
        (0..bm.len() * 64)
            .filter(|&p| bm[p / 64] & (1 << (p % 64)) != 0)
            .collect()
    }

    #[test]
    fn marks_are_taken_once_and_by_page() {
        // 3 chunks and a bit.
        let b = DirtyBitmap::new((3 * CHUNK_PAGES + 100) * PAGE);
        assert_eq!(b.pages(), 3 * CHUNK_PAGES + 100);
        b.mark_dirty(5 * PAGE + 8, 4);
        b.mark_dirty(63 * PAGE, PAGE + 1); // pages 63 and 64: across a word
        b.mark_dirty(CHUNK_PAGES * PAGE - 1, 2); // across a chunk
        b.mark_dirty(7 * PAGE, 0); // nothing
        b.mark_pages(3 * CHUNK_PAGES + 99, 5); // clipped at the end
        b.mark_pages(1000, 200); // a run over several words
        assert!(b.dirty_at(5 * PAGE) && !b.dirty_at(6 * PAGE));
        let mut want = vec![
            5,
            63,
            64,
            CHUNK_PAGES - 1,
            CHUNK_PAGES,
            3 * CHUNK_PAGES + 99,
        ];
        want.extend(1000..1200);
        want.sort();
        assert_eq!(set(&b.take()), want);
        assert!(set(&b.take()).is_empty(), "cleared");
        assert!(!b.dirty_at(5 * PAGE));
    }

    #[test]
    fn a_short_output_leaves_the_rest_marked() {
        let b = DirtyBitmap::new(2 * CHUNK_PAGES * PAGE);
        b.mark_pages(3, 1);
        b.mark_pages(CHUNK_PAGES + 3, 1);
        let mut out = vec![0u64; CHUNK_PAGES / 64];
        b.take_into(&mut out);
        assert_eq!(set(&out), vec![3]);
        assert_eq!(
            set(&b.take()),
            vec![CHUNK_PAGES + 3],
            "kept for the next take"
        );
    }

    #[test]
    fn through_vm_memory_writes_are_marked() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
        let m: GuestMemoryMmap<DirtyBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10000), 8 * PAGE)]).unwrap();
        m.write_obj(1u32, GuestAddress(0x10000 + 3 * PAGE as u64 + 4))
            .unwrap();
        m.write_slice(&[1u8; 2], GuestAddress(0x10000 + 6 * PAGE as u64 - 1))
            .unwrap();
        let r = vm_memory::GuestMemoryBackend::iter(&m).next().unwrap();
        assert_eq!(set(&r.get_mmap().bitmap().take()), vec![3, 5, 6]);
    }
}
