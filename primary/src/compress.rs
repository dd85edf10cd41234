//! Compression of the checkpoint stream (`--compress`): each dirty page goes raw, LZ4, or
//! as a delta against the copy of it this primary last sent — whichever is smallest
//! (`twin_wire::pagecodec`).
//!
//! **The delta base.** The backup decodes a delta against its replica's page as of its last
//! committed epoch. [`DeltaCache`] holds, for a bounded number of pages, exactly that: the
//! contents last *sent* for the page in this session (raw, LZ4 or delta alike), updated for
//! every page sent and cleared with the session. It equals the backup's copy because epochs
//! are applied in order, whole, one at a time, each naming a page at most once (pre-copy's
//! two copies of a page are merged before encoding); a failed epoch ends the session, and
//! the next session starts from an empty cache and a full sync. A page not in the cache is
//! sent LZ4 or raw; a page whose content equals its cached copy is not sent at all (the
//! backup already holds it: what `unchanged.rs` does for the previous epoch's pages, for
//! every cached page).
//!
//! The cache is a CLOCK (second-chance LRU) over [`DeltaCache::capacity`] page slots,
//! allocated as they fill: a page used (sent or found unchanged) gets a second chance
//! before its slot is reused.
//!
//! **Off the pause.** All of this runs on the replication thread after the vCPUs resumed,
//! on the checkpoint's copy of the pages. An epoch of many pages is split among helper
//! threads when cores are idle ([`free_cores`]): the cache is read by all of them, and
//! updated by the replication thread alone once they are done.

use std::collections::HashMap;

use twin_api::Compression;
use twin_vmm::memory::PAGE_SIZE;
use twin_wire::pagecodec::{encode_lz4, encode_xor_lz4, max_lz4_len};
use twin_wire::{EncodedPageRef, PageEncoding};

/// Fewest pages per helper thread: below, spawning costs more than it saves.
const PAGES_PER_HELPER: usize = 512;
/// Most helper threads beside the replication thread.
const MAX_HELPERS: usize = 3;

type Slot = Box<[u8; PAGE_SIZE]>;

/// What the primary last sent of up to `capacity` pages; see the module documentation.
#[derive(Default)]
pub struct DeltaCache {
    capacity: usize,
    /// (page index, second chance, contents).
    slots: Vec<(u64, bool, Slot)>,
    map: HashMap<u64, usize>,
    hand: usize,
}

impl DeltaCache {
    /// A cache of `bytes` (rounded down to whole pages).
    pub fn new(bytes: u64) -> Self {
        DeltaCache {
            capacity: usize::try_from(bytes / PAGE_SIZE as u64).unwrap_or(usize::MAX),
            ..Default::default()
        }
    }

    /// Pages it may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Pages it holds.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The copy last sent of page `index`, if kept.
    pub fn get(&self, index: u64) -> Option<&[u8]> {
        self.map.get(&index).map(|&s| &self.slots[s].2[..])
    }

    /// Page `index` was found unchanged: keep it longer.
    pub fn touch(&mut self, index: u64) {
        if let Some(&s) = self.map.get(&index) {
            self.slots[s].1 = true;
        }
    }

    /// Page `index` was sent with `data`: the backup holds that from now on.
    pub fn put(&mut self, index: u64, data: &[u8]) {
        if let Some(&s) = self.map.get(&index) {
            self.slots[s].1 = true;
            self.slots[s].2.copy_from_slice(data);
            return;
        }
        if self.capacity == 0 {
            return;
        }
        let slot = if self.slots.len() < self.capacity {
            let mut page: Slot = Box::new([0; PAGE_SIZE]);
            page.copy_from_slice(data);
            self.slots.push((index, true, page));
            self.slots.len() - 1
        } else {
            // Second chance: clear the bits of used slots until one was not used since
            // the hand last passed it.
            loop {
                let s = self.hand;
                self.hand = (self.hand + 1) % self.slots.len();
                if std::mem::replace(&mut self.slots[s].1, false) {
                    continue;
                }
                self.map.remove(&self.slots[s].0);
                self.slots[s] = (
                    index,
                    true,
                    std::mem::replace(&mut self.slots[s].2, Box::new([0; PAGE_SIZE])),
                );
                self.slots[s].2.copy_from_slice(data);
                break s;
            }
        };
        self.map.insert(index, slot);
    }

    /// Forgets everything (a new session: the backup starts over from a full sync).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.map.clear();
        self.hand = 0;
    }
}

/// How one page of an epoch goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Choice {
    /// Unchanged since last sent: not at all.
    Skip,
    /// The page itself.
    Raw,
    /// `len` bytes of `encoding` at `at` of its worker's buffer.
    Encoded {
        encoding: PageEncoding,
        worker: usize,
        at: usize,
        len: usize,
    },
}

/// The encoded pages of one epoch, borrowed by [`Encoded::refs`] to frame them.
#[derive(Default)]
pub struct Encoded {
    choices: Vec<Choice>,
    bufs: Vec<Vec<u8>>,
    /// Pages found unchanged (not sent).
    pub skipped: u64,
    /// Pages sent raw, LZ4, as a delta.
    pub raw: u64,
    pub lz4: u64,
    pub delta: u64,
    /// CPU time the helper threads spent (the replication thread's own is its caller's to
    /// measure).
    pub helper_cpu_ns: u64,
}

impl Encoded {
    /// The pages to send, in order, for `EpochEncoder::compressed_pages`.
    pub fn refs<'a>(&'a self, pages: &[(u64, &'a [u8])]) -> Vec<EncodedPageRef<'a>> {
        pages
            .iter()
            .zip(&self.choices)
            .filter_map(|(&(index, raw), c)| match *c {
                Choice::Skip => None,
                Choice::Raw => Some(EncodedPageRef {
                    index,
                    encoding: PageEncoding::Raw,
                    data: raw,
                    raw,
                }),
                Choice::Encoded {
                    encoding,
                    worker,
                    at,
                    len,
                } => Some(EncodedPageRef {
                    index,
                    encoding,
                    data: &self.bufs[worker][at..at + len],
                    raw,
                }),
            })
            .collect()
    }
}

/// The page encoder of one session.
pub struct Compressor {
    mode: Compression,
    cache: DeltaCache,
}

impl Compressor {
    /// An encoder for `mode` (a delta cache of `cache_bytes` for [`Compression::Delta`]).
    pub fn new(mode: Compression, cache_bytes: u64) -> Self {
        Compressor {
            mode,
            cache: DeltaCache::new(if mode == Compression::Delta {
                cache_bytes
            } else {
                0
            }),
        }
    }

    pub fn mode(&self) -> Compression {
        self.mode
    }

    /// Forgets what was sent (a new session).
    pub fn reset(&mut self) {
        self.cache.clear();
    }

    /// Encodes this epoch's `pages` (index, contents; distinct indices) with up to
    /// `helpers` other threads, and records what the backup will hold.
    pub fn encode(&mut self, pages: &[(u64, &[u8])], helpers: usize) -> Encoded {
        let helpers = helpers.min(MAX_HELPERS).min(pages.len() / PAGES_PER_HELPER);
        let mut out = Encoded::default();
        let per = pages.len().div_ceil(helpers + 1).max(1);
        let cache = &self.cache;
        let results: Vec<(Vec<Choice>, Vec<u8>, u64)> = if helpers == 0 {
            vec![encode_chunk(cache, pages, 0)]
        } else {
            std::thread::scope(|scope| {
                let mut chunks = pages.chunks(per).enumerate();
                let first = chunks.next();
                let handles: Vec<_> = chunks
                    .map(|(w, chunk)| {
                        scope.spawn(move || {
                            let t = thread_cpu_ns();
                            let (c, b, _) = encode_chunk(cache, chunk, w);
                            (c, b, thread_cpu_ns().saturating_sub(t))
                        })
                    })
                    .collect();
                let mut all = Vec::with_capacity(handles.len() + 1);
                if let Some((w, chunk)) = first {
                    all.push(encode_chunk(cache, chunk, w));
                }
                for h in handles {
                    // A helper panicking is a bug in pure code; take it down with us.
                    all.push(h.join().expect("an encoding helper panicked"));
                }
                all
            })
        };
        for (choices, buf, cpu) in results {
            out.choices.extend(choices);
            out.bufs.push(buf);
            out.helper_cpu_ns += cpu;
        }
        for (&(index, data), c) in pages.iter().zip(&out.choices) {
            match c {
                Choice::Skip => {
                    out.skipped += 1;
                    self.cache.touch(index);
                }
                Choice::Raw => out.raw += 1,
                Choice::Encoded {
                    encoding: PageEncoding::XorLz4,
                    ..
                } => out.delta += 1,
                Choice::Encoded { .. } => out.lz4 += 1,
            }
            if *c != Choice::Skip {
                self.cache.put(index, data);
            }
        }
        out
    }
}

/// Encodes `pages` against `cache` (read only): the choices and the buffer they point into.
fn encode_chunk(
    cache: &DeltaCache,
    pages: &[(u64, &[u8])],
    worker: usize,
) -> (Vec<Choice>, Vec<u8>, u64) {
    let mut choices = Vec::with_capacity(pages.len());
    let mut buf = Vec::with_capacity(pages.len() * PAGE_SIZE / 2);
    let mut scratch = vec![0u8; PAGE_SIZE];
    let mut delta = vec![0u8; max_lz4_len(PAGE_SIZE)];
    let mut lz4 = vec![0u8; max_lz4_len(PAGE_SIZE)];
    for &(index, data) in pages {
        let base = cache.get(index);
        if base == Some(data) {
            choices.push(Choice::Skip);
            continue;
        }
        // A page rewritten almost whole XORs to noise (even text XOR text): count the
        // changed words first (a compare pass, far cheaper than a compression) and spare
        // the delta's compression when more than three quarters changed.
        let d = base
            .filter(|b| changed_words(data, b) * 4 <= PAGE_SIZE / 8 * 3)
            .and_then(|b| encode_xor_lz4(data, b, &mut scratch, &mut delta));
        // A delta under half a page is rarely beaten by LZ4 of the page: spare the second
        // compression.
        let l = match d {
            Some(n) if n <= PAGE_SIZE / 2 => None,
            _ => encode_lz4(data, &mut lz4),
        };
        let (encoding, bytes) = match (d, l) {
            (Some(dn), Some(ln)) if ln < dn => (PageEncoding::Lz4, &lz4[..ln]),
            (Some(dn), _) => (PageEncoding::XorLz4, &delta[..dn]),
            (None, Some(ln)) => (PageEncoding::Lz4, &lz4[..ln]),
            (None, None) => {
                choices.push(Choice::Raw);
                continue;
            }
        };
        choices.push(Choice::Encoded {
            encoding,
            worker,
            at: buf.len(),
            len: bytes.len(),
        });
        buf.extend_from_slice(bytes);
    }
    (choices, buf, 0)
}

/// Words (8 bytes) in which `a` and `b` differ.
fn changed_words(a: &[u8], b: &[u8]) -> usize {
    a.chunks_exact(8)
        .zip(b.chunks_exact(8))
        .filter(|(x, y)| x != y)
        .count()
}

/// CPU time of the calling thread, ns (`CLOCK_THREAD_CPUTIME_ID`: user and system).
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel
    // knows. On failure `ts` stays zero, and so does the measurement.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Cores idle right now: the CPUs this process may use less the threads running on them
/// (`/proc/loadavg`'s runnable count, this thread included). 0 when unknown.
pub fn free_cores() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let running = std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| {
        let field = s.split_whitespace().nth(3)?;
        field.split('/').next()?.parse::<usize>().ok()
    });
    match running {
        Some(r) => cpus.saturating_sub(r),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twin_wire::pagecodec::decode_page;

    fn page(seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// The backup's side: decodes each sent page against its replica and applies it.
    fn apply(replica: &mut HashMap<u64, Vec<u8>>, sent: &[EncodedPageRef<'_>]) {
        for p in sent {
            let base = replica.get(&p.index).cloned();
            let mut out = vec![0; PAGE_SIZE];
            decode_page(p.encoding, p.data, base.as_deref(), &mut out).unwrap();
            assert_eq!(out, p.raw);
            replica.insert(p.index, out);
        }
    }

    #[test]
    fn the_cache_is_what_the_backup_holds_through_evictions() {
        // A cache of 8 pages over 24 pages, two thirds of them written a quarter at a time
        // each epoch, all 24 reported: every cached copy equals the backup's, every delta
        // decodes against it, unchanged pages are skipped.
        let mut c = Compressor::new(Compression::Delta, 8 * PAGE_SIZE as u64);
        let mut memory: Vec<Vec<u8>> = (0..24).map(page).collect();
        let mut replica = HashMap::new();
        let (mut deltas, mut skipped) = (0, 0);
        for epoch in 0..12u64 {
            for i in (0..24u64).filter(|i| (i + epoch) % 3 != 0) {
                let at = ((i + epoch) as usize * 1024) % PAGE_SIZE;
                memory[i as usize][at..at + 1024].copy_from_slice(&page(epoch * 100 + i)[..1024]);
            }
            let pages: Vec<(u64, &[u8])> =
                (0..24u64).map(|i| (i, &memory[i as usize][..])).collect();
            let e = c.encode(&pages, 0);
            let sent = e.refs(&pages);
            assert_eq!(sent.len() as u64 + e.skipped, 24);
            deltas += e.delta;
            skipped += e.skipped;
            apply(&mut replica, &sent);
            for (&i, &slot) in &c.cache.map {
                assert_eq!(&c.cache.slots[slot].2[..], &replica[&i][..], "page {i}");
            }
            assert!(c.cache.len() <= 8);
        }
        for (i, m) in memory.iter().enumerate() {
            assert_eq!(&replica[&(i as u64)], m, "page {i} replicated");
        }
        assert!(deltas > 0, "some pages went as deltas");
        assert!(skipped > 0, "some unchanged pages were not sent");
    }

    #[test]
    fn a_page_sent_raw_or_lz4_updates_its_cached_copy() {
        let mut c = Compressor::new(Compression::Delta, 4 * PAGE_SIZE as u64);
        let a = page(1);
        let e = c.encode(&[(5, &a)], 0);
        assert_eq!((e.raw, e.lz4, e.delta), (1, 0, 0), "random, no base: raw");
        assert_eq!(c.cache.get(5), Some(&a[..]));
        // Unchanged: skipped.
        let e = c.encode(&[(5, &a)], 0);
        assert_eq!((e.skipped, e.refs(&[(5, &a)]).len()), (1, 0));
        // All new random contents: the delta does not help, raw again, and the cache
        // follows.
        let b = page(2);
        let e = c.encode(&[(5, &b)], 0);
        assert_eq!(e.raw, 1);
        assert_eq!(c.cache.get(5), Some(&b[..]));
        // Zeroes: LZ4.
        let z = vec![0u8; PAGE_SIZE];
        let e = c.encode(&[(5, &z)], 0);
        assert_eq!(e.lz4 + e.delta, 1);
        assert_eq!(c.cache.get(5), Some(&z[..]));
        c.reset();
        assert_eq!(c.cache.get(5), None);
    }

    #[test]
    fn a_page_rewritten_whole_is_not_tried_as_a_delta() {
        let text: Vec<u8> = b"twin replicates pages "
            .iter()
            .copied()
            .cycle()
            .take(PAGE_SIZE)
            .collect();
        let mut c = Compressor::new(Compression::Delta, 4 * PAGE_SIZE as u64);
        c.encode(&[(1, &page(1))], 0);
        let e = c.encode(&[(1, &text)], 0);
        assert_eq!(
            (e.lz4, e.delta),
            (1, 0),
            "every word changed: LZ4 of the page"
        );
        let mut t2 = text.clone();
        t2[100..300].fill(b'x');
        let e = c.encode(&[(1, &t2)], 0);
        assert_eq!(e.delta, 1, "a few words changed: a delta");
        assert_eq!(changed_words(&text, &t2), 26);
    }

    #[test]
    fn lz4_mode_keeps_no_cache() {
        let mut c = Compressor::new(Compression::Lz4, 64 << 20);
        let z = vec![0u8; PAGE_SIZE];
        let e = c.encode(&[(1, &z)], 0);
        assert_eq!(e.lz4, 1);
        let e = c.encode(&[(1, &z)], 0);
        assert_eq!(
            (e.lz4, e.skipped),
            (1, 0),
            "no cache: not skipped, not a delta"
        );
    }

    #[test]
    fn clock_gives_used_pages_a_second_chance() {
        let mut cache = DeltaCache::new(2 * PAGE_SIZE as u64);
        let p = vec![1u8; PAGE_SIZE];
        cache.put(1, &p);
        cache.put(2, &p);
        // Both used: the hand clears both bits, then evicts the first (1).
        cache.put(3, &p);
        assert!(cache.get(1).is_none() && cache.get(2).is_some() && cache.get(3).is_some());
        cache.touch(2);
        // 2 was used again since; 3 was just inserted (used) → the hand clears 2 and 3,
        // then evicts 2.
        cache.put(4, &p);
        assert_eq!(cache.len(), 2);
        assert!(cache.get(4).is_some());
    }

    #[test]
    fn helpers_split_an_epoch_and_give_the_same_stream() {
        let pages_data: Vec<Vec<u8>> = (0..2048u64)
            .map(|i| vec![(i % 251) as u8; PAGE_SIZE])
            .collect();
        let pages: Vec<(u64, &[u8])> = pages_data
            .iter()
            .enumerate()
            .map(|(i, d)| (i as u64, &d[..]))
            .collect();
        let mut one = Compressor::new(Compression::Delta, 64 << 20);
        let mut four = Compressor::new(Compression::Delta, 64 << 20);
        let a = one.encode(&pages, 0);
        let b = four.encode(&pages, 3);
        assert_eq!(a.refs(&pages), b.refs(&pages));
        assert_eq!(b.bufs.len(), 4, "split among the caller and three helpers");
    }
}
