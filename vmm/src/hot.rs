//! Hot pages: pages the guest writes epoch after epoch are left writable instead of being
//! write-protected again at every harvest.
//!
//! KVM's dirty log learns of a guest write by write-protecting every page it reported and
//! taking a fault on the next write to it. Under PVM (software virtualization, shadow
//! paging) such a fault costs the guest ~25 µs of vCPU time (measured: a guest rewriting
//! 32k pages ran at 24k pages/s protected vs 690k/s unprotected), so a guest that touches
//! the same few hundred pages in every epoch — socket buffers, connection state, the
//! allocator's metadata, its stack — spends most of its time in faults when epochs are
//! short (eager output commit: hundreds of checkpoints per second): a Redis server with 64
//! connections was held to ~6k requests/s by ~5 faults a request.
//!
//! With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` a harvest reads the log without protecting
//! anything, and `KVM_CLEAR_DIRTY_LOG` re-protects exactly the pages the VMM chooses. A page
//! that is not re-protected stays writable *and stays set in the log*, so every later
//! harvest reports it (and the checkpoint copies it, inside the pause, like any dirty page)
//! until it is re-protected: correctness does not depend on the policy, only the cost
//! does. A copy costs ~0.5 µs of pause (plus the bytes on the wire), a fault ~25 µs of
//! guest time, so a page written in most epochs is cheaper left writable.
//!
//! The policy ([`HotPages::decide`], pure, over bitmaps): a page reported dirty in this
//! harvest and in at least [`PROMOTE_PREV`] of the [`WINDOW`] harvests before it becomes
//! *hot* and is left writable for [`HOLD`] harvests; then it is re-protected. If the guest
//! still writes it, it faults once, is dirty in the next harvest with its history still
//! set, and becomes hot again at once: a page written in most epochs costs one fault per
//! `HOLD + 1` epochs instead of one per epoch. One that stopped being written costs at most
//! `HOLD` needless copies inside the pause (the primary does not send a page whose contents
//! the backup already holds). Not "in a row": a server with 64 connections, each active in
//! about half the epochs, writes every connection's buffers in most but not all epochs
//! (measured: redis-benchmark -c 64 INCR, ~1800 pages each faulted once every ~7 epochs,
//! two faults a request), and a fault (~25 µs of guest time) costs as much as ~50 copies.
//! At most [`MAX_HOT`] pages are hot at once, which bounds what the hot set adds to a
//! pause. A workload that writes pages at random over a large set (so a page is rarely
//! dirty twice within a few epochs) promotes almost nothing, and a sequential sweep
//! nothing.

/// Harvests before the current one that the history remembers.
pub const WINDOW: usize = 7;
/// Of those, how many a page must have been dirty in (besides the current one) to be left
/// writable.
pub const PROMOTE_PREV: usize = 1;
/// Harvests a hot page stays writable before it is re-protected.
pub const HOLD: u8 = 32;
/// Most pages hot at once (16 MiB): at ~0.5 µs a page, at most ~2 ms added to a pause, and
/// in practice a few hundred pages.
pub const MAX_HOT: usize = 4096;

/// The hot-page state of one VM's RAM (one bit or byte per page).
#[derive(Debug, Clone)]
pub struct HotPages {
    /// KVM's log of the previous [`WINDOW`] harvests, newest first.
    history: Vec<Vec<u64>>,
    /// Pages left writable (always a subset of what KVM reports).
    hot: Vec<u64>,
    /// Harvests left before a hot page is re-protected (0 for a cold page).
    left: Vec<u8>,
    count: usize,
    max_hot: usize,
}

/// What one harvest decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HotStats {
    /// Pages left writable after this harvest.
    pub hot: usize,
    /// Pages that became hot at this harvest.
    pub promoted: usize,
    /// Hot pages re-protected at this harvest (their hold ran out).
    pub expired: usize,
}

impl HotPages {
    /// State for `pages` pages of RAM, none hot.
    pub fn new(pages: usize) -> Self {
        Self::with_limit(pages, MAX_HOT)
    }

    pub fn with_limit(pages: usize, max_hot: usize) -> Self {
        let words = pages.div_ceil(64);
        HotPages {
            history: vec![vec![0; words]; WINDOW],
            hot: vec![0; words],
            left: vec![0; pages],
            count: 0,
            max_hot,
        }
    }

    /// Forgets everything (tracking restarted: every page is protected again).
    pub fn reset(&mut self) {
        for h in &mut self.history {
            h.fill(0);
        }
        self.hot.fill(0);
        self.left.fill(0);
        self.count = 0;
    }

    /// Pages hot now.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether page `p` is hot (left writable).
    pub fn is_hot(&self, p: usize) -> bool {
        self.hot
            .get(p / 64)
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    /// Given the pages KVM reported dirty at this harvest (`kvm`: its log, which includes
    /// every hot page), returns in `clear` the pages to re-protect now (every reported page
    /// except those left hot) and updates the state. `kvm` and `clear` have one bit per
    /// page, as many words as [`HotPages::new`] was sized for (extra words are ignored).
    pub fn decide(&mut self, kvm: &[u64], clear: &mut Vec<u64>) -> HotStats {
        let words = self.hot.len();
        clear.clear();
        clear.resize(words, 0);
        let mut stats = HotStats::default();
        for (i, &d) in kvm.iter().enumerate().take(words) {
            // A hot page KVM did not report was re-protected behind our back (tracking
            // restarted): it is cold again.
            let lost = self.hot[i] & !d;
            if lost != 0 {
                for b in bits(lost) {
                    self.left[i * 64 + b] = 0;
                }
                self.count -= lost.count_ones() as usize;
                self.hot[i] &= d;
            }
            if d == 0 {
                continue;
            }
            // Hot pages age; those whose hold ran out are re-protected.
            let mut hot = self.hot[i];
            for b in bits(hot) {
                let l = &mut self.left[i * 64 + b];
                *l = l.saturating_sub(1);
                if *l == 0 {
                    hot &= !(1 << b);
                    self.count -= 1;
                    stats.expired += 1;
                }
            }
            // Cold pages dirty in this harvest and in at least PROMOTE_PREV of the previous
            // WINDOW (bit-sliced counts saturating at two).
            let (mut once, mut twice) = (0u64, 0u64);
            for h in &self.history {
                twice |= once & h[i];
                once |= h[i];
            }
            let seen = if PROMOTE_PREV >= 2 { twice } else { once };
            let candidates = d & !self.hot[i] & seen;
            for b in bits(candidates) {
                if self.count >= self.max_hot {
                    break;
                }
                hot |= 1 << b;
                self.left[i * 64 + b] = HOLD;
                self.count += 1;
                stats.promoted += 1;
            }
            self.hot[i] = hot;
            clear[i] = d & !hot;
        }
        // Shift the history: the oldest bitmap is reused for this harvest.
        if let Some(mut oldest) = self.history.pop() {
            oldest.clear();
            oldest.extend(kvm.iter().copied().take(words));
            oldest.resize(words, 0);
            self.history.insert(0, oldest);
        }
        stats.hot = self.count;
        stats
    }
}

/// The set bits of `w`, lowest first.
fn bits(mut w: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (w != 0).then(|| {
            let b = w.trailing_zeros() as usize;
            w &= w - 1;
            b
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u64]) -> Vec<usize> {
        crate::bitmap_pages(v).collect()
    }

    /// KVM's side of the protocol: a page stays reported while it is not cleared; a
    /// cleared page is reported again only when the guest writes it.
    struct Kvm {
        log: Vec<u64>,
    }

    impl Kvm {
        fn write(&mut self, p: usize) {
            self.log[p / 64] |= 1 << (p % 64);
        }
        fn harvest(&mut self, hot: &mut HotPages) -> (Vec<usize>, Vec<usize>, HotStats) {
            let reported = self.log.clone();
            let mut clear = Vec::new();
            let st = hot.decide(&reported, &mut clear);
            for (l, c) in self.log.iter_mut().zip(&clear) {
                *l &= !c;
            }
            (set(&reported), set(&clear), st)
        }
    }

    #[test]
    fn a_page_written_every_epoch_becomes_hot_and_is_reprotected_after_its_hold() {
        let mut hot = HotPages::new(128);
        let mut kvm = Kvm { log: vec![0; 2] };
        // Written in every epoch: protected (a fault each) until it has been dirty in
        // PROMOTE_PREV earlier harvests.
        for epoch in 1..=PROMOTE_PREV + 1 {
            kvm.write(7);
            let (reported, cleared, st) = kvm.harvest(&mut hot);
            assert_eq!(reported, [7]);
            if epoch <= PROMOTE_PREV {
                assert_eq!(cleared, [7], "epoch {epoch}: not hot yet");
            } else {
                assert!(cleared.is_empty(), "hot from epoch {epoch}");
                assert_eq!(st.promoted, 1);
            }
        }
        assert!(hot.is_hot(7));
        // While hot it is reported without a write (it is never protected), and kept.
        for _ in 1..HOLD {
            let (reported, cleared, _) = kvm.harvest(&mut hot);
            assert_eq!((reported, cleared), (vec![7], vec![]));
        }
        // The hold runs out: re-protected.
        let (_, cleared, st) = kvm.harvest(&mut hot);
        assert_eq!((cleared, st.expired, hot.count()), (vec![7], 1, 0));
        // Written again: one fault, and hot again at once (its history is still set).
        kvm.write(7);
        let (_, cleared, st) = kvm.harvest(&mut hot);
        assert!(cleared.is_empty());
        assert_eq!(st.promoted, 1);
        // Not written again after the next expiry: cold for good.
        for _ in 0..HOLD {
            kvm.harvest(&mut hot);
        }
        assert!(!hot.is_hot(7));
        let (reported, _, _) = kvm.harvest(&mut hot);
        assert!(reported.is_empty(), "a cold page is not reported");
    }

    #[test]
    fn a_page_written_in_some_of_the_recent_epochs_becomes_hot() {
        let mut hot = HotPages::new(256);
        let mut kvm = Kvm { log: vec![0; 4] };
        // Written every third epoch: within the window, so hot at its second write.
        for epoch in 0..3 * WINDOW {
            if epoch % 3 == 0 {
                kvm.write(250);
            }
            kvm.harvest(&mut hot);
            if epoch >= 3 * PROMOTE_PREV {
                assert!(hot.is_hot(250), "epoch {epoch}");
            }
        }
    }

    #[test]
    fn pages_written_once_or_rarely_are_never_hot() {
        let mut hot = HotPages::new(512);
        let mut kvm = Kvm { log: vec![0; 8] };
        for epoch in 0..400usize {
            // A sequential sweep (each page once per pass) and a page written less often
            // than once a window.
            kvm.write(epoch % 400);
            if epoch % (WINDOW + 1) == 0 {
                kvm.write(450);
            }
            let (reported, cleared, _) = kvm.harvest(&mut hot);
            assert_eq!(reported, cleared, "epoch {epoch}: everything re-protected");
        }
        assert_eq!(hot.count(), 0);
    }

    #[test]
    fn the_hot_set_is_bounded() {
        let mut hot = HotPages::with_limit(1024, 10);
        let mut kvm = Kvm { log: vec![0; 16] };
        for _ in 0..PROMOTE_PREV + 2 {
            for p in 0..1024 {
                kvm.write(p);
            }
            kvm.harvest(&mut hot);
        }
        assert_eq!(hot.count(), 10);
        let (reported, cleared, _) = kvm.harvest(&mut hot);
        assert_eq!(reported.len() - cleared.len(), 10);
    }

    #[test]
    fn a_hot_page_kvm_stops_reporting_is_cold_again() {
        let mut hot = HotPages::new(64);
        let mut kvm = Kvm { log: vec![0; 1] };
        for _ in 0..=PROMOTE_PREV {
            kvm.write(3);
            kvm.harvest(&mut hot);
        }
        assert!(hot.is_hot(3));
        // Tracking restarted under it: KVM's log is empty.
        kvm.log[0] = 0;
        kvm.harvest(&mut hot);
        assert_eq!(hot.count(), 0);
        assert!(!hot.is_hot(3));
    }

    #[test]
    fn everything_reported_is_either_cleared_or_hot() {
        // Whatever the pattern, a reported page is re-protected unless it is hot: nothing
        // can be dropped from tracking.
        let mut hot = HotPages::with_limit(640, 100);
        let mut kvm = Kvm { log: vec![0; 10] };
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..500 {
            for _ in 0..40 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                kvm.write((x % 64) as usize + if x & 1 == 0 { 0 } else { 320 });
            }
            let reported = kvm.log.clone();
            let (_, cleared, _) = kvm.harvest(&mut hot);
            for p in set(&reported) {
                assert!(cleared.contains(&p) != hot.is_hot(p), "page {p}");
            }
            assert!(hot.count() <= 100);
        }
    }
}
