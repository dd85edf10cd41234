//! Dirty-page tracking and its generations.
//!
//! A harvest takes the pages written since the previous one: KVM's dirty log OR the VMM's
//! own bitmap (see [`crate::memory`]), both cleared by the read. Whoever takes them owns
//! them: a consumer that loses them (a snapshot that failed after the harvest) makes the
//! next increment built on the previous one incomplete, silently. Two things guard against
//! that:
//!
//! - **merge-back**: a consumer that fails gives the pages back ([`DirtyTracker::merge_back`]),
//!   and the next harvest returns them again;
//! - **generations**: every harvest (and every start of tracking) bumps a counter, the
//!   *tracking generation*, and reports the span of generations its pages cover: `from` is
//!   the generation since which the pending pages are complete, `to` the generation the
//!   harvest ended. Consecutive increments chain only if one's `from` is the other's `to`;
//!   a harvest consumed in between by someone else leaves a gap that a snapshot chain
//!   records and a restore refuses. A merge-back does not renumber anything: it only moves
//!   the start of the pending span back to where the given-back harvest started, so the
//!   next harvest covers both (and the chain still adds up).

use std::sync::Mutex;

use crate::hot::HotPages;
use crate::memory::Memory;
use crate::vm::{Vm, VmError};

/// The tracking generations a harvest covers: every page written after the harvest (or
/// start of tracking) that ended generation `from` and before the harvest that ended `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrackingSpan {
    pub from: u64,
    pub to: u64,
}

#[derive(Debug, Default)]
struct Generations {
    /// Harvests (and starts of tracking) so far.
    current: u64,
    /// The generation since which the pending pages (KVM's log + the VMM's bitmap) hold
    /// every write.
    pending_since: u64,
    /// Which reported pages stay writable (with KVM's manual protection; see
    /// [`crate::hot`]). Sized at the first harvest.
    hot: Option<HotPages>,
    /// Scratch: the pages the last harvest re-protected.
    clear: Vec<u64>,
}

/// The bookkeeping of one VM's dirty tracking; the lock also makes a harvest and its
/// generation one step for concurrent harvesters.
#[derive(Debug, Default)]
pub(crate) struct DirtyTracker {
    generations: Mutex<Generations>,
}

impl DirtyTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.generations
            .lock()
            .expect("dirty tracking lock poisoned")
    }

    /// Turns KVM's log on and clears both logs; returns the generation from which the
    /// pending pages count.
    pub(crate) fn start(&self, vm: &Vm, memory: &Memory) -> Result<u64, VmError> {
        let mut g = self.lock();
        vm.set_dirty_logging(true)?;
        // With manual protection reading does not clear (logging may already have been on,
        // from an earlier session): re-protect whatever the log still holds.
        let stale = vm.take_dirty_log()?;
        vm.clear_dirty_log(&stale)?;
        if let Some(h) = g.hot.as_mut() {
            h.reset();
        }
        memory.take_vmm_dirty_bitmap();
        g.current += 1;
        g.pending_since = g.current;
        Ok(g.current)
    }

    /// Turns KVM's log off (undoing a [`DirtyTracker::start`] whose consumer failed).
    pub(crate) fn stop(&self, vm: &Vm) -> Result<(), VmError> {
        let mut g = self.lock();
        if let Some(h) = g.hot.as_mut() {
            h.reset();
        }
        vm.set_dirty_logging(false)
    }

    /// Takes the pages written since the previous harvest and the span they cover.
    pub(crate) fn harvest(
        &self,
        vm: &Vm,
        memory: &Memory,
    ) -> Result<(Vec<u64>, TrackingSpan), VmError> {
        let mut g = self.lock();
        let mut dirty = vm.take_dirty_log()?;
        if vm.manual_protect() {
            // Re-protect what was reported except the hot pages, which stay writable and
            // stay in the log (so the next harvest reports them again).
            let g = &mut *g;
            let hot = g
                .hot
                .get_or_insert_with(|| HotPages::new(memory.page_count()));
            hot.decide(&dirty, &mut g.clear);
            vm.clear_dirty_log(&g.clear)?;
        }
        for (d, v) in dirty.iter_mut().zip(memory.take_vmm_dirty_bitmap()) {
            *d |= v;
        }
        g.current += 1;
        let span = TrackingSpan {
            from: g.pending_since,
            to: g.current,
        };
        g.pending_since = g.current;
        Ok((dirty, span))
    }

    /// Gives back pages a harvest took: they go into the VMM's bitmap, so the next harvest
    /// returns them again. If no harvest happened since, the tracking is as if that harvest
    /// had not been taken (the next span starts at `span.from`) and this returns true. If
    /// another harvest consumed pages in between, the pages still go back (a page reported
    /// twice costs a copy, one missing costs correctness) but the span cannot be re-joined:
    /// false, and the next span starts where that other harvest ended.
    pub(crate) fn merge_back(&self, memory: &Memory, dirty: &[u64], span: TrackingSpan) -> bool {
        let mut g = self.lock();
        memory.mark_vmm_dirty(dirty);
        if g.pending_since == span.to {
            g.pending_since = span.from;
            true
        } else {
            false
        }
    }

    /// The generation since which the pending pages are complete (what the next harvest's
    /// span will start at).
    #[cfg(test)]
    pub(crate) fn pending_since(&self) -> u64 {
        self.lock().pending_since
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PAGE_SIZE;
    use vm_memory::{Bytes, GuestAddress};

    fn write_page(m: &Memory, p: u64) {
        m.guest_memory()
            .write_obj(0xabu8, GuestAddress(p * PAGE_SIZE as u64))
            .unwrap();
    }

    fn pages(bm: &[u64]) -> Vec<usize> {
        crate::bitmap_pages(bm).collect()
    }

    /// A KVM VM without vCPUs: the pages come from the VMM's own writes (what the NIC
    /// does), which is the half of a harvest a test can drive without a guest.
    #[test]
    fn a_merged_back_harvest_is_returned_again_and_its_span_rejoined() {
        let m = Memory::new(4 << 20).unwrap();
        let vm = Vm::new(&m).expect("a KVM VM (needs /dev/kvm)");
        let t = DirtyTracker::default();
        assert_eq!(t.start(&vm, &m).unwrap(), 1);
        assert!(vm.dirty_logging());

        write_page(&m, 3);
        let (first, span1) = t.harvest(&vm, &m).unwrap();
        assert_eq!(pages(&first), vec![3]);
        assert_eq!(span1, TrackingSpan { from: 1, to: 2 });

        // The consumer of `first` failed: it gives the pages back.
        write_page(&m, 5);
        assert!(t.merge_back(&m, &first, span1), "no harvest in between");
        assert_eq!(t.pending_since(), 1);
        let (second, span2) = t.harvest(&vm, &m).unwrap();
        assert_eq!(
            pages(&second),
            vec![3, 5],
            "the given-back page and the new one"
        );
        assert_eq!(
            span2,
            TrackingSpan { from: 1, to: 3 },
            "the span covers the failed harvest's too: the generation is not reused"
        );

        // A harvest consumed by someone else in between: the pages still go back, but the
        // span cannot claim to start before that harvest.
        write_page(&m, 7);
        let (third, span3) = t.harvest(&vm, &m).unwrap();
        assert_eq!(span3, TrackingSpan { from: 3, to: 4 });
        write_page(&m, 8);
        let (_fourth, span4) = t.harvest(&vm, &m).unwrap();
        assert!(
            !t.merge_back(&m, &third, span3),
            "a later harvest was taken"
        );
        let (fifth, span5) = t.harvest(&vm, &m).unwrap();
        assert_eq!(pages(&fifth), vec![7]);
        assert_eq!(span5.from, span4.to, "the gap stays visible");

        t.stop(&vm).unwrap();
        assert!(!vm.dirty_logging());
    }

    /// RAM past 3 GiB is a second KVM slot at GPA 4 GiB: its log comes back after the first
    /// slot's, at the page indices the VMM's own bitmap uses, and clearing reaches both.
    #[test]
    fn a_harvest_of_two_slots_is_one_page_index_bitmap() {
        let low = (3usize << 30) / PAGE_SIZE;
        let m = Memory::new((3 << 30) + (8 << 20)).unwrap();
        let vm = Vm::new(&m).expect("a KVM VM (needs /dev/kvm)");
        let t = DirtyTracker::default();
        t.start(&vm, &m).unwrap();
        m.guest_memory()
            .write_obj(1u8, GuestAddress((4 << 30) + 5 * PAGE_SIZE as u64))
            .unwrap();
        write_page(&m, 2);
        let log = vm.take_dirty_log().unwrap();
        assert_eq!(log.len(), m.page_count() / 64, "both slots, concatenated");
        let (dirty, _) = t.harvest(&vm, &m).unwrap();
        assert_eq!(dirty.len(), m.page_count() / 64);
        assert_eq!(pages(&dirty), vec![2, low + 5]);
        // Re-protecting every page of both slots is accepted (a no-op without manual
        // protection).
        vm.clear_dirty_log(&vec![u64::MAX; m.page_count() / 64])
            .unwrap();
        t.stop(&vm).unwrap();
        assert!(!vm.dirty_logging());
    }
}
