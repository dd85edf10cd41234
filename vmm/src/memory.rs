//! Guest memory: one memfd, mapped once into the VMM and shown to the guest as one or two
//! RAM ranges around the MMIO hole.
//!
//! **Page index** means a page's offset in the memfd (`index × 4096`), never a guest
//! physical address: checkpoints, the replication protocol, replicas and snapshot memory
//! files all count pages that way, so a guest's RAM is one contiguous array of pages
//! whatever its guest-physical layout. Only this module turns one into the other
//! ([`RamMap`]): pages `[0, 3 GiB)` of the file sit at GPA 0, pages from 3 GiB on at GPA
//! 4 GiB, past the MMIO hole ([`crate::layout::HIGH_RAM_START`]). KVM sees one memory slot
//! per range; its per-slot dirty logs are concatenated into one page-index bitmap
//! ([`RamMap::concat`]) and split again to clear them ([`RamMap::split`]).
//!
//! The memfd lets a checkpoint read pages without going through the VMM's mapping and lets a
//! replica be mapped by a restored VM without a copy. A clone ([`Memory::new_private`], `twin clone`) is
//! the exception: its file is a base shared by every clone of one snapshot, mapped
//! `MAP_PRIVATE`, so what asks the file ([`Memory::data_ranges`],
//! [`Memory::resident_bytes`], [`Memory::zero_pages`]) accounts for the clone's private
//! copies or refuses. The VMM maps it once, contiguously
//! (page index `i` at [`Memory::host_address`] + `i × 4096`), and each guest range is a
//! window into that mapping. Every write the VMM itself makes through [`GuestMem`] or
//! [`Memory::pages`] is recorded in a [`DirtyBitmap`] (one per range for the devices'
//! view, one for the contiguous view; a harvest of one costs what was written, not the
//! size of RAM): KVM's dirty log only sees writes made by the guest,
//! so the checkpoint engine ORs these into KVM's (virtio RX buffers and used rings are
//! written here).
//!
//! Guest RAM is never handed out as `&[u8]`: the guest (or a device worker) may write it
//! while it is read, which a Rust reference forbids. Pages are reached as vm-memory
//! [`VolatileSlice`]s ([`Memory::pages`]) and copied with its volatile accessors
//! (`ReadVolatile`/`WriteVolatile`, `copy_to`); a caller that needs bytes (the wire encoder
//! takes `&[u8]` pages) gets a copy ([`Memory::copy_pages`], [`Memory::read_page`]). For
//! a copy of more than a few bytes those accessors are one `memcpy`, as a slice copy is,
//! so the checkpoint's page copy costs what it did.

use std::ffi::CStr;
use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use twin_devices::dirty_bitmap::DirtyBitmap;
use vm_memory::bitmap::BS;
use vm_memory::mmap::MmapRegion;
use vm_memory::VolatileMemoryError;
use vm_memory::{FileOffset, GuestAddress, VolatileMemory, VolatileSlice, WriteVolatile};

use crate::layout::{HIGH_RAM_START, MMIO_HOLE_START};

/// Guest memory as the whole VMM sees it: dirty-tracked mmap regions (the devices' type).
pub use twin_devices::GuestMem;
/// One region of [`GuestMem`].
pub type GuestRegion = vm_memory::GuestRegionMmap<DirtyBitmap>;
/// Guest RAM as volatile memory: what [`Memory::pages`] gives out. Writes through it are
/// recorded in the VMM's dirty bitmap.
pub type GuestSlice<'a> = VolatileSlice<'a, BS<'a, DirtyBitmap>>;

/// Size of a guest page, the unit of dirty tracking and of checkpoint transfer.
pub const PAGE_SIZE: usize = 4096;

/// Largest guest RAM: 64 GiB (GPA up to 65 GiB). What bounds it, loosest first: the page
/// directories of the guest's identity map must fit between [`crate::layout::PD_ADDR`] and
/// the image (238 GiB of guest-physical space); the VMM keeps about 2.4 bytes per page of
/// bookkeeping whatever the guest touches (the hot-page state, [`crate::hot`], 2 bytes; its
/// own dirty bitmaps and KVM's, a bit each: ~40 MiB at 64 GiB), and the primary's initial
/// sync names every hole as a zero page (8 bytes each on the wire: 128 MiB at 64 GiB);
/// and a replica must have room for all of it on the backup (`backup::replica::check_room`).
/// Tested at 16 GiB.
pub const MAX_MEM_SIZE: u64 = 64 << 30;

const _: () = assert!(
    (MMIO_HOLE_START as usize / PAGE_SIZE) % 64 == 0,
    "the low range ends on a bitmap word, so per-slot bitmaps concatenate word by word"
);
const _: () = assert!(
    HIGH_RAM_START + MAX_MEM_SIZE - MMIO_HOLE_START <= crate::layout::IDENTITY_MAP_MAX,
    "the page directories of the largest guest fit below the image"
);

/// One contiguous range of guest RAM: `pages` pages of the memfd from page index
/// `first_page`, at guest physical address `gpa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub gpa: u64,
    pub first_page: usize,
    pub pages: usize,
}

impl RamRange {
    /// Bytes in the range.
    pub fn size(&self) -> u64 {
        (self.pages * PAGE_SIZE) as u64
    }

    /// Offset of the range's first byte in the memfd.
    pub fn file_offset(&self) -> u64 {
        (self.first_page * PAGE_SIZE) as u64
    }

    /// The first guest physical address after the range.
    pub fn gpa_end(&self) -> u64 {
        self.gpa + self.size()
    }
}

/// Where the pages of a guest RAM of some size sit in guest physical memory, and the
/// translation between page indices and guest physical addresses: the one place that knows
/// (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamMap {
    ranges: Vec<RamRange>,
    pages: usize,
}

impl RamMap {
    /// The layout of `size` bytes of RAM (a multiple of the page size): the first 3 GiB at
    /// GPA 0, the rest from GPA 4 GiB.
    pub fn new(size: u64) -> Self {
        let pages = (size as usize) / PAGE_SIZE;
        let low = pages.min(MMIO_HOLE_START as usize / PAGE_SIZE);
        let mut ranges = vec![RamRange {
            gpa: 0,
            first_page: 0,
            pages: low,
        }];
        if pages > low {
            ranges.push(RamRange {
                gpa: HIGH_RAM_START,
                first_page: low,
                pages: pages - low,
            });
        }
        RamMap { ranges, pages }
    }

    /// The ranges, in page-index order (which is also GPA order).
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Pages of RAM in all.
    pub fn page_count(&self) -> usize {
        self.pages
    }

    /// The range holding page `index`.
    fn range_of(&self, index: usize) -> Option<&RamRange> {
        self.ranges
            .iter()
            .find(|r| (r.first_page..r.first_page + r.pages).contains(&index))
    }

    /// Guest physical address of page `index`, if it is RAM.
    pub fn gpa(&self, index: usize) -> Option<u64> {
        let r = self.range_of(index)?;
        Some(r.gpa + ((index - r.first_page) * PAGE_SIZE) as u64)
    }

    /// Page index of the page holding guest physical address `gpa`, if it is RAM.
    pub fn page(&self, gpa: u64) -> Option<usize> {
        let r = self
            .ranges
            .iter()
            .find(|r| (r.gpa..r.gpa_end()).contains(&gpa))?;
        Some(r.first_page + ((gpa - r.gpa) as usize) / PAGE_SIZE)
    }

    /// Cuts a page-index bitmap (one bit per page, u64 words) into each range's own bitmap
    /// (bit 0 = the range's first page), as KVM's per-slot calls take it. Every range
    /// starts on a word (3 GiB is 12288 words), so each part is a sub-slice; a bitmap
    /// shorter than RAM gives shorter (possibly empty) parts, extra words are ignored.
    pub fn split<'a>(&'a self, bitmap: &'a [u64]) -> impl Iterator<Item = (RamRange, &'a [u64])> {
        self.ranges.iter().map(move |r| {
            let first = (r.first_page / 64).min(bitmap.len());
            let end = (r.first_page + r.pages).div_ceil(64).min(bitmap.len());
            (*r, &bitmap[first..end])
        })
    }

    /// The inverse of [`RamMap::split`]: one page-index bitmap from the ranges' bitmaps,
    /// in range order. Each part is cut or zero-padded to its range's words (KVM and
    /// vm-memory size them so already), so a short part cannot shift the next range's
    /// pages onto wrong indices.
    pub fn concat(&self, parts: impl IntoIterator<Item = Vec<u64>>) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.pages.div_ceil(64));
        let mut parts = parts.into_iter();
        for r in &self.ranges {
            let words = r.pages.div_ceil(64);
            let part = parts.next().unwrap_or_default();
            let take = part.len().min(words);
            out.extend_from_slice(&part[..take]);
            out.resize(out.len() + words - take, 0);
        }
        out
    }
}

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0} bytes is not a non-zero multiple of 2 MiB")]
    BadSize(u64),
    #[error("guest memory size {size} bytes is above the maximum of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    #[error("memfd_create for guest memory failed")]
    Memfd(#[source] std::io::Error),
    #[error("sizing the guest memory file to {size} bytes failed")]
    Truncate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping guest memory failed")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    #[error("describing guest RAM range at GPA {gpa:#x} to vm-memory failed")]
    Region { gpa: u64 },
    #[error("pages {first}..{} are not inside guest memory", first + count)]
    Range { first: usize, count: usize },
    #[error("copying guest memory failed")]
    Copy(#[source] VolatileMemoryError),
    #[error("the base image of a clone must hold {size} bytes of guest RAM; it has {len}")]
    Base {
        size: u64,
        len: u64,
        #[source]
        source: Option<std::io::Error>,
    },
}

/// Guest RAM together with the file that backs it.
pub struct Memory {
    /// The devices' view: one region per [`RamRange`], each a window into `whole`.
    mem: GuestMem,
    /// The regions of `mem`, to tell at drop whether anyone still holds one.
    regions: Vec<Arc<GuestRegion>>,
    /// The whole memfd mapped once (page index `i` at offset `i × PAGE_SIZE`): the
    /// contiguous view [`Memory::pages`] gives out; its bitmap records writes through it.
    /// It owns the mapping the regions point into, so it is unmapped only once no region
    /// is left (see `Drop`).
    whole: ManuallyDrop<MmapRegion<DirtyBitmap>>,
    map: RamMap,
    file: File,
    size: u64,
    /// A lazy restore still loading this memory: until it completes, a hole of the memfd
    /// is not a zero page (see [`crate::lazy`]).
    pending: std::sync::Mutex<Option<crate::lazy::LoadGate>>,
    /// A clone ([`Memory::new_private`]): `file` is the shared base, mapped copy-on-write.
    private: bool,
}

impl Memory {
    /// Creates `size` bytes of zeroed guest RAM, backed by a new memfd and laid out as
    /// [`RamMap::new`] says.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        Self::check_size(size)?;
        let name: &CStr = c"twin-guest-ram";
        // SAFETY: `name` is a valid NUL-terminated string; the returned fd is checked and
        // owned by the `File` below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh, valid file descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|source| MemoryError::Truncate { size, source })?;
        // MAP_SHARED | MAP_NORESERVE, read-write: the memfd is sparse, a page costs memory
        // only once touched.
        Self::map(file, size, libc::MAP_SHARED | libc::MAP_NORESERVE, false)
    }

    /// Guest RAM of `size` bytes that starts as a copy of `base` (page index `i` at offset
    /// `i × 4096`, as a snapshot layer's `memory` file or a flattened chain holds it),
    /// mapped copy-on-write (`MAP_PRIVATE`): a clone. Every clone of one base shares the
    /// base's pages in the page cache; a page the guest or a device writes is copied for
    /// this memory alone, and `base` is never written (it may be opened read-only). `base`
    /// must not change while the memory lives (a snapshot layer is written once; a
    /// flattened chain is a sealed memfd): a page not yet copied reads what the file holds.
    ///
    /// What differs from [`Memory::new`]: the file is the base, not this memory, so
    /// [`Memory::data_ranges`] adds the privately written pages (from `/proc/self/pagemap`)
    /// to the base's data, [`Memory::resident_bytes`] counts only the private copies, and
    /// [`Memory::zero_pages`] is refused (a hole punched in the base would zero that page
    /// in every clone, and dropping a private copy would bring the base's page back).
    pub fn new_private(base: File, size: u64) -> Result<Self, MemoryError> {
        Self::check_size(size)?;
        let len = base
            .metadata()
            .map_err(|source| MemoryError::Base {
                size,
                len: 0,
                source: Some(source),
            })?
            .len();
        if len < size {
            // Past the end of the file a mapping faults with SIGBUS, not zeroes.
            return Err(MemoryError::Base {
                size,
                len,
                source: None,
            });
        }
        Self::map(base, size, libc::MAP_PRIVATE | libc::MAP_NORESERVE, true)
    }

    fn check_size(size: u64) -> Result<(), MemoryError> {
        if size == 0 || size % (2 << 20) != 0 {
            return Err(MemoryError::BadSize(size));
        }
        if size > MAX_MEM_SIZE {
            return Err(MemoryError::TooLarge {
                size,
                max: MAX_MEM_SIZE,
            });
        }
        Ok(())
    }

    /// Maps `file` (`size` bytes from offset 0) with `flags` and lays guest RAM over it.
    fn map(file: File, size: u64, flags: i32, private: bool) -> Result<Self, MemoryError> {
        let clone = file.try_clone().map_err(MemoryError::Memfd)?;
        let whole = MmapRegion::<DirtyBitmap>::build(
            Some(FileOffset::new(clone, 0)),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        )
        .map_err(MemoryError::Map)?;
        let map = RamMap::new(size);
        let mut regions = Vec::with_capacity(map.ranges().len());
        for r in map.ranges() {
            let region_err = MemoryError::Region { gpa: r.gpa };
            // SAFETY: `r` lies inside the file (RamMap covers exactly `size` bytes), so
            // `[base + offset, + r.size())` lies inside `whole`'s live mapping, page-aligned;
            // prot and flags are `whole`'s. The region does not own the mapping: `whole`
            // outlives every region (`Drop` unmaps only when no region is left).
            let mapping = unsafe {
                MmapRegion::<DirtyBitmap>::build_raw(
                    whole.as_ptr().add(r.file_offset() as usize),
                    r.size() as usize,
                    whole.prot(),
                    whole.flags(),
                )
            }
            .map_err(MemoryError::Map)?;
            let region = GuestRegion::new(mapping, GuestAddress(r.gpa)).ok_or(region_err)?;
            regions.push(Arc::new(region));
        }
        let mem = GuestMem::from_arc_regions(regions.clone())
            .map_err(|_| MemoryError::Region { gpa: 0 })?;
        Ok(Memory {
            mem,
            regions,
            whole: ManuallyDrop::new(whole),
            map,
            file,
            size,
            pending: std::sync::Mutex::new(None),
            private,
        })
    }

    pub fn guest_memory(&self) -> &GuestMem {
        &self.mem
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn page_count(&self) -> usize {
        (self.size as usize) / PAGE_SIZE
    }

    /// Where guest RAM is mapped in this process: (first page, host address, pages) per
    /// region, in page order (what a lazy restore registers with userfaultfd).
    /// The memfd is mapped contiguously (see [`Memory::host_address`]): one span.
    pub fn host_spans(&self) -> Vec<(usize, usize, usize)> {
        vec![(0, self.host_address() as usize, self.page_count())]
    }

    /// Makes [`Memory::data_ranges`] wait for a lazy restore of this memory to complete.
    pub fn set_pending_load(&self, gate: crate::lazy::LoadGate) {
        *self.pending.lock().expect("pending lock") = Some(gate);
    }

    /// Waits until a lazy restore of this memory (if any) has loaded every page with data.
    pub fn wait_loaded(&self) -> Result<(), crate::lazy::LazyError> {
        let gate = self.pending.lock().expect("pending lock").clone();
        match gate {
            Some(g) => {
                g.wait()?;
                *self.pending.lock().expect("pending lock") = None;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Where the pages are in guest physical memory (page index <-> GPA).
    pub fn ram_map(&self) -> &RamMap {
        &self.map
    }

    /// Host address of page index 0: the memfd is mapped contiguously, page index `i` at
    /// this address + `i × PAGE_SIZE` (a range's host address, for
    /// `KVM_SET_USER_MEMORY_REGION`, is this plus its [`RamRange::file_offset`]).
    pub fn host_address(&self) -> u64 {
        self.whole.as_ptr() as u64
    }

    /// Each RAM range with the host address of its first page.
    pub fn host_ranges(&self) -> impl Iterator<Item = (RamRange, u64)> + '_ {
        self.map
            .ranges()
            .iter()
            .map(|r| (*r, self.host_address() + r.file_offset()))
    }

    /// Pages `first..first + count` as volatile memory, to copy from or into with
    /// vm-memory's volatile accessors. What they hold changes under a running guest (a
    /// checkpoint reads them with the vCPUs paused and the devices locked; a live sync
    /// takes torn pages, which a later round sends again).
    pub fn pages(&self, first: usize, count: usize) -> Result<GuestSlice<'_>, MemoryError> {
        let range = MemoryError::Range { first, count };
        let (Some(off), Some(len)) = (first.checked_mul(PAGE_SIZE), count.checked_mul(PAGE_SIZE))
        else {
            return Err(range);
        };
        if off
            .checked_add(len)
            .is_none_or(|end| end > self.size as usize)
        {
            return Err(range);
        }
        // The contiguous view: a run of pages may span the MMIO hole in guest physical
        // terms and still be one slice here.
        self.whole.get_slice(off, len).map_err(|_| range)
    }

    /// Appends the contents of the pages set in `bitmap` (one bit per page, u64 words, as
    /// a harvest returns it) to `out`, in bitmap order: the checkpoint's page copy. Runs of
    /// consecutive pages are copied at once.
    pub fn copy_pages(&self, bitmap: &[u64], out: &mut Vec<u8>) -> Result<(), MemoryError> {
        let n: usize = bitmap.iter().map(|w| w.count_ones() as usize).sum();
        out.reserve_exact(n * PAGE_SIZE);
        // One slice of all of RAM, cut per run: the copy loop does no region lookup.
        let ram = self.pages(0, self.page_count())?;
        for (first, count) in crate::bitmap_runs(bitmap) {
            let run = ram
                .subslice(first * PAGE_SIZE, count * PAGE_SIZE)
                .map_err(|_| MemoryError::Range { first, count })?;
            // `Vec`'s `write_volatile` reserves, copies with one `memcpy` and sets the length:
            // what `extend_from_slice` does, without a `&[u8]` over guest memory.
            out.write_all_volatile(&run).map_err(MemoryError::Copy)?;
        }
        Ok(())
    }

    /// Copies page `index` into `buf` (a page's worth of it).
    pub fn read_page(&self, index: usize, buf: &mut [u8]) -> Result<(), MemoryError> {
        let page = self.pages(index, 1)?;
        if buf.len() != PAGE_SIZE {
            return Err(MemoryError::Copy(VolatileMemoryError::PartialBuffer {
                expected: PAGE_SIZE,
                completed: buf.len(),
            }));
        }
        page.copy_to(buf);
        Ok(())
    }

    /// A copy of the whole of guest RAM (tests and tools compare memories with it).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.write_all_volatile(&self.whole.as_volatile_slice())
            .expect("a Vec takes any number of bytes");
        out
    }

    /// Overwrites page `index` (the backup applying a checkpoint to its replica). Only for
    /// memory no vCPU runs on. Returns false if `index` is out of range or `data` is not
    /// one page.
    pub fn write_page(&self, index: u64, data: &[u8]) -> bool {
        let Some(off) = (index as usize).checked_mul(PAGE_SIZE) else {
            return false;
        };
        if data.len() != PAGE_SIZE
            || off
                .checked_add(PAGE_SIZE)
                .is_none_or(|e| e > self.size as usize)
        {
            return false;
        }
        // SAFETY: `off..off + PAGE_SIZE` lies inside the mapping (checked above), which lives
        // as long as `self`; no vCPU runs on this memory, so the write races nothing.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.host_address() as *mut u8).add(off),
                PAGE_SIZE,
            )
        };
        true
    }

    /// Zeroes the pages at `indices` by punching holes in the memfd: no page is touched
    /// or allocated (a fresh replica's initial sync names tens of thousands of zero
    /// pages, and writing or even reading them would fault each one in), and pages that
    /// held data are freed. Nothing is done and false returned if any index is out of
    /// range; an `Err` only if the kernel refuses the hole punch.
    ///
    /// Refused for a clone ([`Memory::new_private`]): its file is the base every clone
    /// shares, and it is never a replica.
    pub fn zero_pages(&self, indices: &[u64]) -> std::io::Result<bool> {
        if self.private {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "a clone's memory cannot be zeroed by punching holes: its file is the shared base",
            ));
        }
        let pages = self.page_count() as u64;
        if indices.iter().any(|&i| i >= pages) {
            return Ok(false);
        }
        punch_pages(&self.file, indices)?;
        Ok(true)
    }

    /// Takes the VMM's own dirty bitmap (one bit per page index, u64 words, like KVM's
    /// log) and clears it: the writes through the devices' regions (their bitmaps
    /// concatenated in page-index order) and through [`Memory::pages`].
    pub fn take_vmm_dirty_bitmap(&self) -> Vec<u64> {
        let mut out = vec![0u64; self.page_count().div_ceil(64)];
        for (region, r) in self.regions.iter().zip(self.map.ranges()) {
            // Each range starts on a bitmap word (see `RamMap::split`).
            let part = &mut out[r.first_page / 64..(r.first_page + r.pages).div_ceil(64)];
            region.get_mmap().bitmap().take_into(part);
        }
        self.whole.bitmap().take_into(&mut out);
        out
    }

    /// Marks the pages set in `bitmap` (one bit per page, u64 words, as
    /// [`Memory::take_vmm_dirty_bitmap`] returns) dirty in the VMM's own bitmap, so that the
    /// next harvest, which ORs this bitmap into KVM's log, returns them again: how pages a
    /// harvest took are given back when what they were taken for failed. Bits beyond the
    /// end of guest RAM are ignored. Safe while the guest runs: setting a bit races nothing
    /// (the page is at worst reported once more than needed).
    pub fn mark_vmm_dirty(&self, bitmap: &[u64]) {
        // Into the contiguous view's bitmap: it counts page indices directly.
        let bm = self.whole.bitmap();
        for (first, count) in crate::bitmap_runs(bitmap) {
            bm.mark_pages(first, count); // clipped to RAM
        }
    }

    /// The page ranges of guest RAM that the memfd backs with memory, in order; every page
    /// outside them is a hole and reads as zero. Found with `SEEK_DATA`/`SEEK_HOLE`, which
    /// touch no page: reading a hole through the mapping would allocate it (a full scan
    /// of a fresh 256 MiB guest made the VM process's RSS go from 2 MB to 262 MB and cost
    /// the first snapshot ~250 ms of pause). A range may still hold zero pages (a page
    /// the guest zeroed, or tmpfs's large-folio rounding): callers check the pages in it.
    pub fn data_ranges(&self) -> std::io::Result<Vec<std::ops::Range<usize>>> {
        // During a lazy restore a hole may be a page not loaded yet.
        self.wait_loaded().map_err(std::io::Error::other)?;
        let base = file_data_ranges(&self.file, self.size)?;
        if !self.private {
            return Ok(base);
        }
        // A clone: the base's data, and every page this clone copied (which may be a page
        // of a hole of the base that the guest wrote).
        let private = self.private_pages()?;
        Ok(merge_ranges(base, private))
    }

    /// The pages of a clone that hold a private copy (present and anonymous, or swapped
    /// out), as ordered, disjoint ranges, from `/proc/self/pagemap` (8 bytes per page of
    /// the mapping; reading it touches no page). Of a memory that is not a clone: none.
    pub fn private_pages(&self) -> std::io::Result<Vec<std::ops::Range<usize>>> {
        use std::os::unix::fs::FileExt;
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const FILE_OR_SHARED: u64 = 1 << 61;
        let mut out: Vec<std::ops::Range<usize>> = Vec::new();
        if !self.private {
            return Ok(out);
        }
        let pagemap = File::open("/proc/self/pagemap")?;
        let first_vpage = self.host_address() / PAGE_SIZE as u64;
        let total = self.page_count();
        let mut buf = vec![0u8; 8 * 8192];
        let mut at = 0usize;
        while at < total {
            let n = (total - at).min(buf.len() / 8);
            let bytes = &mut buf[..n * 8];
            pagemap.read_exact_at(bytes, (first_vpage + at as u64) * 8)?;
            for (k, e) in bytes.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                let private = e & SWAPPED != 0 || (e & PRESENT != 0 && e & FILE_OR_SHARED == 0);
                if !private {
                    continue;
                }
                let p = at + k;
                match out.last_mut() {
                    Some(r) if r.end == p => r.end = p + 1,
                    _ => out.push(p..p + 1),
                }
            }
            at += n;
        }
        Ok(out)
    }

    /// Whether this memory is a clone ([`Memory::new_private`]).
    pub fn is_clone(&self) -> bool {
        self.private
    }

    /// Bytes of guest RAM the memfd holds in memory (its allocated blocks): what guest
    /// memory costs the host now.
    ///
    /// Of a clone: its private copies only (the base's pages are shared by every clone).
    pub fn resident_bytes(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        if self.private {
            let pages: usize = self.private_pages()?.iter().map(|r| r.len()).sum();
            return Ok((pages * PAGE_SIZE) as u64);
        }
        Ok(self.file.metadata()?.blocks() * 512)
    }

    /// Raw fd of the backing memfd.
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

/// The page ranges of `file` (of `size` bytes) backed by data, with `SEEK_DATA`/`SEEK_HOLE`
/// (see [`Memory::data_ranges`]).
fn file_data_ranges(file: &File, size: u64) -> std::io::Result<Vec<std::ops::Range<usize>>> {
    let fd = file.as_raw_fd();
    let page_count = size as usize / PAGE_SIZE;
    let size = size as libc::off_t;
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let mut at: libc::off_t = 0;
    while at < size {
        // SAFETY: lseek on a file we own; it moves only its file offset, which nothing
        // reads (pages are reached through the mapping; a clone's base may share its
        // offset with other processes, and `SEEK_DATA`/`SEEK_HOLE` from an absolute
        // position do not depend on it).
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `at`.
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = hole.min(size);
        let first = data as usize / PAGE_SIZE;
        let end = (hole as usize).div_ceil(PAGE_SIZE);
        match out.last_mut() {
            Some(r) if r.end >= first => r.end = r.end.max(end),
            _ => out.push(first..end),
        }
        if hole <= data {
            // A kernel that reports no progress would loop forever: take the rest (into
            // the range just recorded, so the ranges stay ordered and disjoint).
            if let Some(r) = out.last_mut() {
                r.end = page_count;
            }
            break;
        }
        at = hole;
    }
    Ok(out)
}

/// The union of two lists of ordered, disjoint page ranges, ordered and disjoint.
fn merge_ranges(
    a: Vec<std::ops::Range<usize>>,
    b: Vec<std::ops::Range<usize>>,
) -> Vec<std::ops::Range<usize>> {
    let mut all = a;
    all.extend(b);
    all.sort_by_key(|r| r.start);
    let mut out: Vec<std::ops::Range<usize>> = Vec::with_capacity(all.len());
    for r in all {
        match out.last_mut() {
            Some(l) if l.end >= r.start => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

impl Drop for Memory {
    /// Unmaps the memfd once no region into it is left. Device workers hold clones of
    /// [`GuestMem`] (hence of the regions, which point into `whole` without owning it);
    /// they are stopped before the memory is dropped, but if one still held a region the
    /// mapping is leaked instead: a warning and some address space, not a use after free.
    fn drop(&mut self) {
        // A lazy restore still loading this memory stops first (quietly: the VM is gone);
        // a copy of its that races the unmapping fails on an address no longer registered.
        if let Some(gate) = self.pending.get_mut().ok().and_then(|p| p.take()) {
            gate.stop();
        }
        drop(std::mem::take(&mut self.mem));
        let held = self
            .regions
            .iter()
            .any(|r| Arc::strong_count(r) > 1 || Arc::strong_count(&r.get_mmap()) > 2);
        self.regions.clear();
        if held {
            tracing::warn!(
                size = self.size,
                "guest memory dropped while a device still holds a region of it: mapping leaked"
            );
            return;
        }
        // SAFETY: `whole` is dropped once, here; no region into it is left (nobody else held
        // one, checked above, and ours were just dropped), and no slice of it outlives
        // `self` (they borrow it).
        unsafe { ManuallyDrop::drop(&mut self.whole) };
    }
}

/// Punches the pages at `indices` (page-index order, in range: the caller checks) out of
/// `file`, one hole per run of consecutive pages: they read back as zeroes, and hold no
/// memory or disk blocks. Guest memory's memfd and a replica store's `memory.img` alike.
pub fn punch_pages(file: &File, indices: &[u64]) -> std::io::Result<()> {
    let mut i = 0;
    while i < indices.len() {
        let first = indices[i];
        let mut len = 1u64;
        while i + (len as usize) < indices.len() && indices[i + len as usize] == first + len {
            len += 1;
        }
        i += len as usize;
        // SAFETY: plain syscall on a file the caller owns; the range lies inside it (the
        // caller checked). A shared mapping of it stays valid: punched pages read as zero.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (first * PAGE_SIZE as u64) as libc::off_t,
                (len * PAGE_SIZE as u64) as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn vmm_writes_are_tracked_and_reset() {
        let m = Memory::new(4 << 20).unwrap();
        assert_eq!(m.page_count(), 1024);
        m.guest_memory()
            .write_obj(0xdead_beefu32, GuestAddress(5 * PAGE_SIZE as u64 + 8))
            .unwrap();
        m.guest_memory()
            .write_slice(&[1u8; 2], GuestAddress(64 * PAGE_SIZE as u64 - 1))
            .unwrap();
        let bm = m.take_vmm_dirty_bitmap();
        let set: Vec<usize> = (0..1024)
            .filter(|&p| bm[p / 64] & (1 << (p % 64)) != 0)
            .collect();
        assert_eq!(set, vec![5, 63, 64]);
        assert!(m.take_vmm_dirty_bitmap().iter().all(|&w| w == 0));
        assert_eq!(m.to_vec()[5 * PAGE_SIZE + 8], 0xef);
        assert!(m.write_page(1023, &[7u8; PAGE_SIZE]));
        assert_eq!(m.to_vec()[1023 * PAGE_SIZE], 7);
        assert!(!m.write_page(1024, &[7u8; PAGE_SIZE]));
        assert!(!m.write_page(u64::MAX, &[7u8; PAGE_SIZE]));
        assert!(!m.write_page(0, &[7u8; 10]));
        assert!(m.write_page(1022, &[9u8; PAGE_SIZE]));
        assert!(m.write_page(5, &[9u8; PAGE_SIZE]));
        assert!(!m.zero_pages(&[5, 1024]).unwrap(), "out of range refused");
        assert_eq!(m.to_vec()[5 * PAGE_SIZE], 9, "nothing zeroed on refusal");
        assert!(m.zero_pages(&[5, 1022, 1023]).unwrap());
        let ram = m.to_vec();
        assert!(ram[5 * PAGE_SIZE..6 * PAGE_SIZE].iter().all(|&b| b == 0));
        assert!(ram[1022 * PAGE_SIZE..].iter().all(|&b| b == 0));
        assert_eq!(ram[4 * PAGE_SIZE], 0);
        assert_eq!(ram[6 * PAGE_SIZE - 1], 0);
    }

    #[test]
    fn data_ranges_find_written_pages_without_allocating_holes() {
        let m = Memory::new(8 << 20).unwrap();
        assert_eq!(
            m.data_ranges().unwrap(),
            Vec::<std::ops::Range<usize>>::new()
        );
        for p in [3u64, 4, 900, 2047] {
            assert!(m.write_page(p, &[1u8; PAGE_SIZE]));
        }
        let ranges = m.data_ranges().unwrap();
        let covered = |p: usize| ranges.iter().any(|r| r.contains(&p));
        for p in [3, 4, 900, 2047] {
            assert!(covered(p), "page {p} written but not in {ranges:?}");
        }
        let pages: usize = ranges.iter().map(|r| r.len()).sum();
        // tmpfs may allocate a little around a write (large folios); never the whole file.
        assert!(pages < 1024, "{pages} pages reported as data: {ranges:?}");
        assert!(
            ranges.windows(2).all(|w| w[0].end < w[1].start),
            "{ranges:?}"
        );
        let before = m.resident_bytes().unwrap();
        m.data_ranges().unwrap();
        assert_eq!(
            m.resident_bytes().unwrap(),
            before,
            "the scan allocated pages"
        );
        assert!(m.zero_pages(&[900]).unwrap());
        assert!(m.resident_bytes().unwrap() <= before);
    }

    #[test]
    fn pages_are_copied_through_volatile_slices() {
        let m = Memory::new(4 << 20).unwrap();
        for p in [0u64, 1, 7, 1023] {
            m.guest_memory()
                .write_slice(
                    &[p as u8 + 1; PAGE_SIZE],
                    GuestAddress(p * PAGE_SIZE as u64),
                )
                .unwrap();
        }
        m.take_vmm_dirty_bitmap();
        let mut bm = vec![0u64; 1024 / 64];
        for p in [0usize, 1, 7, 1023] {
            bm[p / 64] |= 1 << (p % 64);
        }
        let mut out = vec![0xaa];
        m.copy_pages(&bm, &mut out).unwrap();
        assert_eq!(out.len(), 1 + 4 * PAGE_SIZE, "appended, one page per bit");
        for (i, v) in [1u8, 2, 8, 0].into_iter().enumerate() {
            let page = &out[1 + i * PAGE_SIZE..1 + (i + 1) * PAGE_SIZE];
            assert!(page.iter().all(|&b| b == v), "page {i} holds {v}");
        }
        assert!(
            m.take_vmm_dirty_bitmap().iter().all(|&w| w == 0),
            "reading marks nothing dirty"
        );
        let mut page = [0u8; PAGE_SIZE];
        m.read_page(7, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 8));
        assert!(matches!(
            m.read_page(1024, &mut page),
            Err(MemoryError::Range {
                first: 1024,
                count: 1
            })
        ));
        assert!(m.read_page(0, &mut page[..10]).is_err());
        assert!(m.pages(1020, 4).is_ok());
        assert!(m.pages(1020, 5).is_err());
        assert!(m.pages(usize::MAX, 2).is_err());
        // A bit past the end of RAM is refused, not read.
        let mut past = vec![0u64; 1024 / 64 + 1];
        past[1024 / 64] = 1;
        assert!(m.copy_pages(&past, &mut Vec::new()).is_err());
    }

    #[test]
    fn marked_pages_come_back_with_the_next_harvest() {
        let m = Memory::new(4 << 20).unwrap();
        m.guest_memory()
            .write_obj(1u8, GuestAddress(9 * PAGE_SIZE as u64))
            .unwrap();
        let mut given_back = vec![0u64; 1024 / 64];
        for p in [0usize, 63, 64, 700, 1023] {
            given_back[p / 64] |= 1 << (p % 64);
        }
        // One more word than RAM has pages: ignored, not a panic.
        given_back.push(u64::MAX);
        m.mark_vmm_dirty(&given_back);
        let bm = m.take_vmm_dirty_bitmap();
        let set: Vec<usize> = crate::bitmap_pages(&bm).collect();
        assert_eq!(
            set,
            vec![0, 9, 63, 64, 700, 1023],
            "the marked pages and the page written meanwhile, nothing else"
        );
        assert!(m.take_vmm_dirty_bitmap().iter().all(|&w| w == 0));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(Memory::new(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(Memory::new(3 << 20), Err(MemoryError::BadSize(_))));
        assert!(matches!(
            Memory::new(MAX_MEM_SIZE + (2 << 20)),
            Err(MemoryError::TooLarge { .. })
        ));
    }

    const GIB: u64 = 1 << 30;
    const LOW_PAGES: usize = (3 * GIB) as usize / PAGE_SIZE;

    #[test]
    fn ram_up_to_3_gib_is_one_range_at_gpa_0() {
        for size in [2 << 20, 256 << 20, 3 * GIB] {
            let m = RamMap::new(size);
            let pages = size as usize / PAGE_SIZE;
            assert_eq!(
                m.ranges(),
                [RamRange {
                    gpa: 0,
                    first_page: 0,
                    pages
                }]
            );
            assert_eq!(m.gpa(0), Some(0));
            assert_eq!(m.gpa(pages - 1), Some(size - PAGE_SIZE as u64));
            assert_eq!(m.gpa(pages), None);
            assert_eq!(m.page(size - 1), Some(pages - 1));
            assert_eq!(m.page(size), None);
        }
    }

    #[test]
    fn ram_past_3_gib_continues_above_the_mmio_hole() {
        let m = RamMap::new(16 * GIB);
        assert_eq!(m.page_count(), (16 * GIB) as usize / PAGE_SIZE);
        assert_eq!(
            m.ranges(),
            [
                RamRange {
                    gpa: 0,
                    first_page: 0,
                    pages: LOW_PAGES
                },
                RamRange {
                    gpa: 4 * GIB,
                    first_page: LOW_PAGES,
                    pages: (13 * GIB) as usize / PAGE_SIZE
                }
            ]
        );
        assert_eq!(m.ranges()[1].file_offset(), 3 * GIB);
        assert_eq!(m.ranges()[1].gpa_end(), 17 * GIB);
        // Page index -> GPA: the last page below the hole, the first above it, the last.
        assert_eq!(m.gpa(LOW_PAGES - 1), Some(3 * GIB - 4096));
        assert_eq!(m.gpa(LOW_PAGES), Some(4 * GIB));
        assert_eq!(m.gpa(m.page_count() - 1), Some(17 * GIB - 4096));
        assert_eq!(m.gpa(m.page_count()), None);
        // GPA -> page index, and nothing in the hole or past the end.
        assert_eq!(m.page(3 * GIB - 1), Some(LOW_PAGES - 1));
        assert_eq!(m.page(3 * GIB), None);
        assert_eq!(m.page(4 * GIB - 1), None);
        assert_eq!(m.page(4 * GIB + 4095), Some(LOW_PAGES));
        assert_eq!(m.page(17 * GIB - 1), Some(m.page_count() - 1));
        assert_eq!(m.page(17 * GIB), None);
        assert_eq!(m.page(u64::MAX), None);
        for p in [
            0,
            1,
            LOW_PAGES - 1,
            LOW_PAGES,
            LOW_PAGES + 12345,
            m.page_count() - 1,
        ] {
            assert_eq!(m.page(m.gpa(p).unwrap()), Some(p), "page {p} round trip");
        }
    }

    #[test]
    fn slot_bitmaps_concatenate_into_page_indices_and_split_back() {
        // 3 GiB + 4 MiB: 12288 words below the hole, 16 above.
        let m = RamMap::new(3 * GIB + (4 << 20));
        let low_words = LOW_PAGES / 64;
        let mut low = vec![0u64; low_words];
        let mut high = vec![0u64; 16];
        low[0] = 1; // page 0
        low[low_words - 1] = 1 << 63; // the last page below the hole
        high[0] = 0b101; // the first and third pages above it
        high[15] = 1 << 63; // the last page of RAM
        let all = m.concat([low.clone(), high.clone()]);
        assert_eq!(all.len(), low_words + 16);
        let pages: Vec<usize> = crate::bitmap_pages(&all).collect();
        assert_eq!(
            pages,
            vec![
                0,
                LOW_PAGES - 1,
                LOW_PAGES,
                LOW_PAGES + 2,
                m.page_count() - 1
            ]
        );
        let gpas: Vec<u64> = pages.iter().map(|&p| m.gpa(p).unwrap()).collect();
        assert_eq!(
            gpas,
            vec![
                0,
                3 * GIB - 4096,
                4 * GIB,
                4 * GIB + 2 * 4096,
                4 * GIB + (4 << 20) - 4096
            ]
        );
        let parts: Vec<(RamRange, &[u64])> = m.split(&all).collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].1, &low[..]);
        assert_eq!(parts[1].1, &high[..]);
        assert_eq!(parts[1].0.first_page, LOW_PAGES);
        // A short part is padded, so the next range's pages keep their indices; a long one
        // is cut. A short bitmap splits into short parts.
        let padded = m.concat([
            vec![1],
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
        ]);
        assert_eq!(padded.len(), low_words + 16);
        assert_eq!(padded[low_words], 1);
        assert_eq!(padded[low_words + 15], 16);
        let short: Vec<usize> = m.split(&all[..10]).map(|(_, p)| p.len()).collect();
        assert_eq!(short, vec![10, 0]);
    }

    #[test]
    fn ram_above_the_hole_is_the_same_file_and_tracked_by_page_index() {
        // Sparse: only the pages written here are allocated.
        let m = Memory::new(4 * GIB).unwrap();
        assert_eq!(
            vm_memory::GuestMemoryBackend::num_regions(m.guest_memory()),
            2
        );
        let hi = LOW_PAGES + 7;
        // A device writes at GPA 4 GiB + 7 pages: page index 3 GiB / 4096 + 7.
        m.guest_memory()
            .write_obj(0x55u8, GuestAddress(4 * GIB + 7 * PAGE_SIZE as u64))
            .unwrap();
        m.guest_memory()
            .write_obj(0x66u8, GuestAddress(3 * GIB - 1))
            .unwrap();
        assert!(
            m.guest_memory()
                .write_obj(0u8, GuestAddress(3 * GIB))
                .is_err(),
            "the hole is not RAM"
        );
        let mut page = [0u8; PAGE_SIZE];
        m.read_page(hi, &mut page).unwrap();
        assert_eq!(page[0], 0x55);
        m.read_page(LOW_PAGES - 1, &mut page).unwrap();
        assert_eq!(page[PAGE_SIZE - 1], 0x66);
        // The contiguous view spans the hole: one slice over the last low and first high
        // page.
        let two = m.pages(LOW_PAGES - 1, 2).unwrap();
        assert_eq!(two.len(), 2 * PAGE_SIZE);
        // Written through the contiguous view: tracked by index too.
        let far = m.page_count() - 1;
        m.pages(far, 1).unwrap().write_obj(9u64, 0).unwrap();
        let bm = m.take_vmm_dirty_bitmap();
        assert_eq!(bm.len(), m.page_count() / 64);
        let set: Vec<usize> = crate::bitmap_pages(&bm).collect();
        assert_eq!(set, vec![LOW_PAGES - 1, hi, far]);
        // Given back, they come back at the same indices.
        m.mark_vmm_dirty(&bm);
        assert_eq!(m.take_vmm_dirty_bitmap(), bm);
        // The backup's write path and the file agree on where the page is.
        assert!(m.write_page(far as u64, &[3u8; PAGE_SIZE]));
        assert_eq!(
            m.guest_memory()
                .read_obj::<u8>(GuestAddress(5 * GIB - 1))
                .unwrap(),
            3
        );
        let ranges = m.data_ranges().unwrap();
        for p in [LOW_PAGES - 1, hi, far] {
            assert!(ranges.iter().any(|r| r.contains(&p)), "{p} in {ranges:?}");
        }
        assert!(m.resident_bytes().unwrap() < 64 << 20, "sparse");
        assert!(m.zero_pages(&[hi as u64]).unwrap());
        assert_eq!(
            m.guest_memory()
                .read_obj::<u8>(GuestAddress(4 * GIB + 7 * PAGE_SIZE as u64))
                .unwrap(),
            0
        );
    }

    #[test]
    fn clones_share_the_base_and_diverge_privately() {
        use std::io::Write as _;
        let size = 4u64 << 20;
        let mut base = tempfile_in_tmp();
        base.set_len(size).unwrap();
        // Pages 1 and 700 hold data in the base; the rest are holes.
        for (p, v) in [(1u64, 0x11u8), (700, 0x22)] {
            use std::io::Seek as _;
            base.seek(std::io::SeekFrom::Start(p * PAGE_SIZE as u64))
                .unwrap();
            base.write_all(&[v; PAGE_SIZE]).unwrap();
        }
        let a = Memory::new_private(base.try_clone().unwrap(), size).unwrap();
        let b = Memory::new_private(base.try_clone().unwrap(), size).unwrap();
        assert!(a.is_clone() && !Memory::new(size).unwrap().is_clone());
        let mut page = [0u8; PAGE_SIZE];
        a.read_page(1, &mut page).unwrap();
        assert_eq!(page[0], 0x11, "a clone starts as the base");
        assert_eq!(a.resident_bytes().unwrap(), 0, "reading copies nothing");
        // A writes a base page and a hole; B and the base see neither.
        assert!(a.write_page(1, &[0xaa; PAGE_SIZE]));
        a.guest_memory()
            .write_obj(0x33u8, GuestAddress(900 * PAGE_SIZE as u64))
            .unwrap();
        b.read_page(1, &mut page).unwrap();
        assert_eq!(page[0], 0x11, "the other clone keeps the base's page");
        b.read_page(900, &mut page).unwrap();
        assert_eq!(page[0], 0);
        let mut on_disk = [0u8; PAGE_SIZE];
        std::os::unix::fs::FileExt::read_exact_at(&base, &mut on_disk, PAGE_SIZE as u64).unwrap();
        assert_eq!(on_disk[0], 0x11, "the base is never written");
        a.read_page(1, &mut page).unwrap();
        assert_eq!(page[0], 0xaa);
        // A's data: the base's pages and its own copies (page 900, a hole of the base).
        assert_eq!(a.private_pages().unwrap(), vec![1..2, 900..901]);
        let ranges = a.data_ranges().unwrap();
        for p in [1, 700, 900] {
            assert!(ranges.iter().any(|r| r.contains(&p)), "{p} in {ranges:?}");
        }
        assert!(!b.data_ranges().unwrap().iter().any(|r| r.contains(&900)));
        assert_eq!(a.resident_bytes().unwrap(), 2 * PAGE_SIZE as u64);
        assert!(
            a.zero_pages(&[1]).is_err(),
            "no hole is punched in the base"
        );
        // A base shorter than the RAM is refused (its end would fault with SIGBUS).
        assert!(matches!(
            Memory::new_private(base.try_clone().unwrap(), 2 * size),
            Err(MemoryError::Base { .. })
        ));
    }

    /// A regular file in the temporary directory, already unlinked.
    fn tempfile_in_tmp() -> File {
        let path = std::env::temp_dir().join(format!(
            "twin-memory-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn merged_ranges_are_ordered_and_disjoint() {
        assert_eq!(
            merge_ranges(vec![0..2, 5..9], vec![1..3, 9..10, 20..21]),
            vec![0..3, 5..10, 20..21]
        );
        assert_eq!(merge_ranges(vec![], vec![4..5, 7..8]), vec![4..5, 7..8]);
    }

    #[test]
    fn a_region_held_past_the_memory_keeps_its_mapping() {
        let m = Memory::new(4 * GIB).unwrap();
        let held = m.guest_memory().clone();
        drop(m);
        // The mapping was leaked, not unmapped: the clone still reads RAM.
        held.write_obj(1u8, GuestAddress(4 * GIB)).unwrap();
        assert_eq!(held.read_obj::<u8>(GuestAddress(4 * GIB)).unwrap(), 1);
    }
}
