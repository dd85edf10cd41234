//! Guest RAM as `BootInfo` describes it (one range below the MMIO hole, one above 4 GiB for
//! a guest of more than 3 GiB), and where the heap and the memory workload's working set
//! go in it.
//!
//! Pure `core` code: also compiled into host unit tests by `twin-guest-image`.

/// Most RAM ranges `BootInfo` carries.
pub const MAX_RANGES: usize = 4;
/// Page size: ranges and the working set are whole pages.
pub const PAGE: u64 = 4096;

/// The bytes `[base, base + len)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    pub base: u64,
    pub len: u64,
}

impl Span {
    pub fn end(&self) -> u64 {
        self.base + self.len
    }
}

/// Up to [`MAX_RANGES`] non-empty, page-aligned, disjoint spans in increasing address
/// order: RAM, or a working set laid over it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spans {
    spans: [Span; MAX_RANGES],
    n: usize,
}

impl Spans {
    /// `(base, len)` pairs checked to be spans as above (what the VMM's `BootInfo` must
    /// hold); the reason if not.
    pub fn new(list: &[(u64, u64)]) -> Result<Spans, &'static str> {
        if list.is_empty() {
            return Err("no RAM range");
        }
        if list.len() > MAX_RANGES {
            return Err("more RAM ranges than BootInfo holds");
        }
        let mut out = Spans::default();
        for &(base, len) in list {
            if len == 0 || base % PAGE != 0 || len % PAGE != 0 {
                return Err("a RAM range is empty or not page-aligned");
            }
            if base.checked_add(len).is_none_or(|e| e > 1 << 47) {
                return Err("a RAM range ends beyond the 47-bit address space");
            }
            if out.n > 0 && out.spans[out.n - 1].end() > base {
                return Err("RAM ranges overlap or are not in address order");
            }
            out.spans[out.n] = Span { base, len };
            out.n += 1;
        }
        Ok(out)
    }

    pub fn as_slice(&self) -> &[Span] {
        &self.spans[..self.n]
    }

    /// Bytes in all the spans.
    pub fn total(&self) -> u64 {
        self.as_slice().iter().map(|s| s.len).sum()
    }

    /// The address of byte `off` of the spans laid end to end.
    pub fn addr(&self, mut off: u64) -> Option<u64> {
        for s in self.as_slice() {
            if off < s.len {
                return Some(s.base + off);
            }
            off -= s.len;
        }
        None
    }

    /// The span holding `addr`, by position.
    fn find(&self, addr: u64) -> Option<usize> {
        self.as_slice()
            .iter()
            .position(|s| (s.base..s.end()).contains(&addr))
    }

    fn push(&mut self, s: Span) {
        if s.len > 0 {
            self.spans[self.n] = s;
            self.n += 1;
        }
    }
}

/// Where the heap and the working set go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// From the end of the image to the end of its RAM range or to the working set,
    /// whichever comes first.
    pub heap: Span,
    /// The working set, over one or more RAM ranges (empty for `wss=0`).
    pub wss: Spans,
}

/// Why the working set cannot be placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaceError {
    /// The image does not end inside RAM.
    ImageNotInRam,
    /// `wssbase` is not a page-aligned RAM address above the image.
    BaseNotRam,
    /// From `wssbase` (or anywhere, without one) RAM ends before the working set does.
    TooLarge,
    /// The working set leaves the heap less than it needs.
    HeapTooSmall { heap: u64 },
}

/// Lays out the heap and a working set of `wss` bytes (whole pages) in `ram`. The heap
/// starts at `image_end`, in the RAM range holding it, and needs `heap_min` bytes. The
/// working set starts at `wss_base` and runs on through the following ranges (skipping the
/// holes between them), or without one takes the last `wss` bytes of RAM: above 4 GiB
/// first on a big guest, leaving the range below the MMIO hole to the heap.
pub fn place(
    ram: &Spans,
    image_end: u64,
    heap_min: u64,
    wss: u64,
    wss_base: Option<u64>,
) -> Result<Layout, PlaceError> {
    let home = ram.find(image_end).ok_or(PlaceError::ImageNotInRam)?;
    let ranges = ram.as_slice();
    // The working set's start as (range, offset into it).
    let (first, mut off) = match wss_base {
        Some(b) => {
            let i = ram.find(b).ok_or(PlaceError::BaseNotRam)?;
            if b % PAGE != 0 || b < image_end {
                return Err(PlaceError::BaseNotRam);
            }
            (i, b - ranges[i].base)
        }
        None => {
            // Back from the top.
            let mut left = wss;
            let mut i = ranges.len();
            loop {
                if i == 0 {
                    return Err(PlaceError::TooLarge);
                }
                i -= 1;
                if left <= ranges[i].len {
                    break (i, ranges[i].len - left);
                }
                left -= ranges[i].len;
            }
        }
    };
    let mut set = Spans::default();
    let mut left = wss;
    for r in &ranges[first..] {
        if left == 0 {
            break;
        }
        let take = left.min(r.len - off);
        set.push(Span {
            base: r.base + off,
            len: take,
        });
        left -= take;
        off = 0;
    }
    if left > 0 {
        return Err(PlaceError::TooLarge);
    }
    let home_end = ranges[home].end();
    let heap_end = match set.as_slice().first() {
        // Only from the top (a `wssbase` is above the image): RAM ran out.
        Some(s) if s.base < image_end => return Err(PlaceError::TooLarge),
        Some(s) if s.base < home_end => s.base,
        _ => home_end,
    };
    let heap = Span {
        base: image_end,
        len: heap_end - image_end,
    };
    if heap.len < heap_min {
        return Err(PlaceError::HeapTooSmall { heap: heap.len });
    }
    Ok(Layout { heap, wss: set })
}

/// The largest working set [`place`] takes without `wssbase` when the heap needs
/// `heap_min` bytes plus `per_page` bytes for each page of it (the workload's sequence
/// table): what to suggest when one does not fit.
pub fn max_wss(ram: &Spans, image_end: u64, heap_min: u64, per_page: u64) -> u64 {
    let Some(home) = ram.find(image_end) else {
        return 0;
    };
    let ranges = ram.as_slice();
    // Room for heap + working set in the image's range, and RAM above it.
    let low = ranges[home].end().saturating_sub(image_end + heap_min);
    let above: u64 = ranges[home + 1..].iter().map(|s| s.len).sum();
    // Entirely above: the sequence table alone must fit the image's range.
    let above_only = above.min(low / per_page.max(1) * PAGE);
    // Spilling into the image's range: the set and its table share `low + above`.
    let spilled = (low + above) / (PAGE + per_page) * PAGE;
    let best = if spilled > above { spilled } else { above_only };
    best / PAGE * PAGE
}
