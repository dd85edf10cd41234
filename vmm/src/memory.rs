//! Guest memory: one memfd-backed region starting at guest physical address 0.
//!
//! The memfd lets a checkpoint read pages without going through the VMM's mapping and lets a
//! replica be mapped by a restored VM without a copy. Every write the VMM itself makes
//! through [`GuestMem`] is recorded in the region's [`AtomicBitmap`]: KVM's dirty log only
//! sees writes made by the guest, so the checkpoint engine ORs this bitmap into KVM's
//! (virtio RX buffers and used rings are written here).
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
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::bitmap::{AtomicBitmap, BS};
use vm_memory::VolatileMemoryError;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
    VolatileSlice, WriteVolatile,
};

/// Guest memory as the whole VMM sees it: dirty-tracked mmap regions (the devices' type).
pub use twin_devices::GuestMem;
/// One region of [`GuestMem`].
pub type GuestRegion = vm_memory::GuestRegionMmap<AtomicBitmap>;
/// Guest RAM as volatile memory: what [`Memory::pages`] gives out. Writes through it are
/// recorded in the VMM's dirty bitmap.
pub type GuestSlice<'a> = VolatileSlice<'a, BS<'a, AtomicBitmap>>;

/// Size of a guest page, the unit of dirty tracking and of checkpoint transfer.
pub const PAGE_SIZE: usize = 4096;

/// Largest RAM the built-in guest layout supports: RAM ends where the MMIO hole begins.
pub const MAX_MEM_SIZE: u64 = crate::layout::MMIO_HOLE_START;

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
    Map(#[source] vm_memory::mmap::FromRangesError),
    #[error("pages {first}..{} are not inside guest memory", first + count)]
    Range { first: usize, count: usize },
    #[error("copying guest memory failed")]
    Copy(#[source] VolatileMemoryError),
}

/// Guest RAM together with the file that backs it.
pub struct Memory {
    mem: GuestMem,
    file: File,
    size: u64,
    /// A lazy restore still loading this memory: until it completes, a hole of the memfd
    /// is not a zero page (see [`crate::lazy`]).
    pending: std::sync::Mutex<Option<crate::lazy::LoadGate>>,
}

impl Memory {
    /// Creates `size` bytes of zeroed guest RAM at GPA 0, backed by a new memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || size % (2 << 20) != 0 {
            return Err(MemoryError::BadSize(size));
        }
        if size > MAX_MEM_SIZE {
            return Err(MemoryError::TooLarge {
                size,
                max: MAX_MEM_SIZE,
            });
        }
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
        let mem = Self::map(&file, size)?;
        Ok(Memory {
            mem,
            file,
            size,
            pending: std::sync::Mutex::new(None),
        })
    }

    fn map(file: &File, size: u64) -> Result<GuestMem, MemoryError> {
        let clone = file.try_clone().map_err(MemoryError::Memfd)?;
        GuestMem::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(clone, 0)),
        )])
        .map_err(MemoryError::Map)
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

    /// Host address of the mapping of GPA 0, for `KVM_SET_USER_MEMORY_REGION`.
    pub fn host_address(&self) -> u64 {
        self.region().as_ptr() as u64
    }

    fn region(&self) -> &GuestRegion {
        self.mem.iter().next().expect("guest memory has one region")
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
        self.region()
            .get_slice(MemoryRegionAddress(off as u64), len)
            .map_err(|_| range)
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
        out.write_all_volatile(&self.region().as_volatile_slice().expect("the whole region"))
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
    pub fn zero_pages(&self, indices: &[u64]) -> std::io::Result<bool> {
        let pages = self.page_count() as u64;
        if indices.iter().any(|&i| i >= pages) {
            return Ok(false);
        }
        let mut i = 0;
        while i < indices.len() {
            // Coalesce a run of consecutive pages into one hole.
            let first = indices[i];
            let mut len = 1u64;
            while i + (len as usize) < indices.len() && indices[i + len as usize] == first + len {
                len += 1;
            }
            i += len as usize;
            // SAFETY: plain syscall on our own memfd; the range lies inside the file (checked
            // above). The shared mapping stays valid: punched pages read back as zeroes.
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (first * PAGE_SIZE as u64) as libc::off_t,
                    (len * PAGE_SIZE as u64) as libc::off_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(true)
    }

    /// Takes the VMM's own dirty bitmap (one bit per page, u64 words, like KVM's log) and
    /// clears it.
    pub fn take_vmm_dirty_bitmap(&self) -> Vec<u64> {
        self.region().get_mmap().bitmap().get_and_reset()
    }

    /// Marks the pages set in `bitmap` (one bit per page, u64 words, as
    /// [`Memory::take_vmm_dirty_bitmap`] returns) dirty in the VMM's own bitmap, so that the
    /// next harvest, which ORs this bitmap into KVM's log, returns them again: how pages a
    /// harvest took are given back when what they were taken for failed. Bits beyond the
    /// end of guest RAM are ignored. Safe while the guest runs: setting a bit races nothing
    /// (the page is at worst reported once more than needed).
    pub fn mark_vmm_dirty(&self, bitmap: &[u64]) {
        let mmap = self.region().get_mmap();
        let bm = mmap.bitmap();
        let pages = self.page_count();
        for p in crate::bitmap_pages(bitmap).take_while(|&p| p < pages) {
            bm.set_addr_range(p * PAGE_SIZE, PAGE_SIZE);
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
        let fd = self.file.as_raw_fd();
        let size = self.size as libc::off_t;
        let mut out: Vec<std::ops::Range<usize>> = Vec::new();
        let mut at: libc::off_t = 0;
        while at < size {
            // SAFETY: lseek on our own memfd; it moves only this fd's file offset, which
            // nothing else uses (pages are reached through the mapping).
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
                    r.end = self.page_count();
                }
                break;
            }
            at = hole;
        }
        Ok(out)
    }

    /// Bytes of guest RAM the memfd holds in memory (its allocated blocks): what guest
    /// memory costs the host now.
    pub fn resident_bytes(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }

    /// Raw fd of the backing memfd.
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
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
            Memory::new(8 << 30),
            Err(MemoryError::TooLarge { .. })
        ));
    }
}
