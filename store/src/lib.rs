//! The replica store: a backup's replica of a VM's memory on disk, not in RAM.
//!
//! `twin backup --replica-dir DIR` keeps, beside the disk replicas (`disk-<i>.img`):
//!
//! - `memory.img`: guest RAM as a sparse file, page `i` at offset `i * 4096`; a zero page
//!   is a hole. Committed pages are written to it with `pwrite`, which needs no read of the
//!   page first, so a page that is not in the page cache costs nothing to overwrite.
//! - `pages.idx`: a 4 KiB header, then one 8-byte entry per page: whether it holds data,
//!   the low 31 bits of the epoch that last wrote it, and the CRC32C of its contents
//!   ([`Entry`]). The checksum makes a page damaged on disk an error, never memory a VM
//!   runs on; the epoch is the working set's order for a restore (most recently written
//!   first). The file is mapped; entries are updated in place as pages are written.
//! - `state`: the committed epoch's machine state and the VM's identity (a length, then a
//!   checksummed container), written in place at every commit — while the header says the
//!   epoch is being applied, so a state cut short is in a store refused as torn.
//! - `first-touch`: the pages the guest touched first in the last lazy restore from it.
//!
//! The header says which epoch is being applied and which was committed: a store whose
//! writer stopped between the two (a backup killed while applying an epoch) is torn —
//! its pages mix two epochs — and [`open_committed`] refuses it. The backup itself never
//! reads a torn store: it fails over only from the epoch it committed last, in-process.
//!
//! The store's page cache is what holds the hot pages in RAM. With a memory budget
//! (`--replica-memory`) the store writes its dirty pages back and drops from the cache
//! the pages not written recently (a trimmer thread, off the apply path), so the backup
//! holds about the budget however large the VM; under a memory cgroup the kernel reclaims
//! the clean cache by itself as well.

mod source;
mod trim;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use twin_vmm::container::{self, Kind};
use twin_vmm::memory::PAGE_SIZE;

pub use source::StoreSource;

pub const MEMORY_FILE: &str = "memory.img";
pub const INDEX_FILE: &str = "pages.idx";
pub const STATE_FILE: &str = "state";

const MAGIC: u64 = u64::from_le_bytes(*b"TWINSTOR");
/// Version of the index layout.
pub const STORE_FORMAT: u64 = 1;
const HEADER: usize = 4096;
const H_MAGIC: usize = 0;
const H_FORMAT: usize = 1;
const H_MEM_SIZE: usize = 2;
const H_PAGE_SIZE: usize = 3;
const H_APPLYING: usize = 4;
const H_COMMITTED: usize = 5;
/// No epoch (header fields).
const NONE: u64 = u64::MAX;
/// Largest state file read back.
const MAX_STATE: u64 = 64 << 20;

/// One page's entry in the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry(pub u64);

impl Entry {
    const DATA: u64 = 1 << 63;
    pub const ZERO: Entry = Entry(0);

    pub fn data(epoch: u64, crc: u32) -> Self {
        Entry(Self::DATA | ((epoch & 0x7fff_ffff) << 32) | crc as u64)
    }
    pub fn has_data(self) -> bool {
        self.0 & Self::DATA != 0
    }
    /// The low 31 bits of the epoch that wrote the page (0 for the initial sync).
    pub fn epoch(self) -> u32 {
        ((self.0 >> 32) & 0x7fff_ffff) as u32
    }
    pub fn crc(self) -> u32 {
        self.0 as u32
    }
}

/// What the store says about the VM as of its committed epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreState {
    pub epoch: u64,
    pub vm_id: [u8; 16],
    pub generation: u64,
    pub mac: [u8; 6],
    /// The machine state, encoded ([`twin_vmm::MachineState::encode`]).
    pub machine: Vec<u8>,
}

/// Why the store cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("page {index} is outside the {pages} pages of the replica")]
    Range { index: u64, pages: u64 },
    #[error("a page of {0} bytes (a page is 4096)")]
    PageSize(usize),
    #[error("guest memory of {0} bytes is not a whole number of pages")]
    MemSize(u64),
    #[error("{} is not a replica store: {what}", path.display())]
    NotAStore { path: PathBuf, what: String },
    #[error("the replica store {} is torn: its backup stopped while applying epoch {applying} (last committed: {committed}); its pages mix two epochs", dir.display())]
    Torn {
        dir: PathBuf,
        applying: u64,
        committed: String,
    },
    #[error("the replica store {} has never committed an epoch", .0.display())]
    NothingCommitted(PathBuf),
    #[error("the state of the replica store {} is invalid", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: container::ContainerError,
    },
    #[error("the replica store {} says epoch {header} is committed, its state file is of epoch {state}", dir.display())]
    StateEpoch {
        dir: PathBuf,
        header: u64,
        state: u64,
    },
    #[error("page {index} of {} is damaged: {why}", path.display())]
    Damaged {
        index: u64,
        path: PathBuf,
        why: String,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// The mapped index: header words, then entries.
pub(crate) struct Index {
    ptr: *mut AtomicU64,
    words: usize,
    _file: File,
}

// SAFETY: the mapping is only reached through atomics; it lives as long as the `Index`.
unsafe impl Send for Index {}
// SAFETY: as above: every access is an atomic load or store.
unsafe impl Sync for Index {}

impl Index {
    fn map(file: File, path: &Path, pages: u64) -> Result<Self, StoreError> {
        let len = HEADER + pages as usize * 8;
        // SAFETY: maps `len` bytes of a file we hold open, shared, readable and writable;
        // the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io("mapping", path)(std::io::Error::last_os_error()));
        }
        Ok(Index {
            ptr: ptr.cast(),
            words: len / 8,
            _file: file,
        })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.words, "index word {i} of {}", self.words);
        // SAFETY: `i` is inside the mapping (checked), which is 8-byte aligned (page
        // aligned) and lives as long as `self`.
        unsafe { &*self.ptr.add(i) }
    }

    fn set_header(&self, field: usize, v: u64) {
        self.word(field).store(v, Ordering::Release)
    }

    pub(crate) fn entry(&self, page: usize) -> Entry {
        Entry(self.word(HEADER / 8 + page).load(Ordering::Acquire))
    }

    fn set_entry(&self, page: usize, e: Entry) {
        self.word(HEADER / 8 + page).store(e.0, Ordering::Release)
    }

    pub(crate) fn pages(&self) -> usize {
        self.words - HEADER / 8
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; nothing refers to it after.
        unsafe { libc::munmap(self.ptr.cast(), self.words * 8) };
    }
}

/// A replica store being written by a backup.
pub struct Store {
    dir: PathBuf,
    mem_path: PathBuf,
    state: File,
    mem: Arc<File>,
    index: Arc<Index>,
    pages: u64,
    trimmer: Option<trim::Trimmer>,
}

impl Store {
    /// Creates (or empties) the store of a VM of `mem_size` bytes in `dir`: every page a
    /// zero page, nothing committed. `budget`: the page cache it may keep (`None`: the
    /// kernel decides).
    pub fn create(dir: &Path, mem_size: u64, budget: Option<u64>) -> Result<Self, StoreError> {
        if mem_size == 0 || mem_size % PAGE_SIZE as u64 != 0 {
            return Err(StoreError::MemSize(mem_size));
        }
        std::fs::create_dir_all(dir).map_err(io("creating the directory", dir))?;
        let pages = mem_size / PAGE_SIZE as u64;
        let mem_path = dir.join(MEMORY_FILE);
        let idx_path = dir.join(INDEX_FILE);
        // The state of a previous replica is emptied below (truncated): it must not pass
        // for this one's.
        let _ = std::fs::remove_file(dir.join(twin_vmm::snapshot::FIRST_TOUCH_FILE));
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
                .map_err(io("creating", p))
        };
        let mem = open(&mem_path)?;
        mem.set_len(mem_size).map_err(io("sizing", &mem_path))?;
        let state = open(&dir.join(STATE_FILE))?;
        let idx = open(&idx_path)?;
        idx.set_len(HEADER as u64 + pages * 8)
            .map_err(io("sizing", &idx_path))?;
        let index = Index::map(idx, &idx_path, pages)?;
        index.set_header(H_FORMAT, STORE_FORMAT);
        index.set_header(H_MEM_SIZE, mem_size);
        index.set_header(H_PAGE_SIZE, PAGE_SIZE as u64);
        index.set_header(H_APPLYING, NONE);
        index.set_header(H_COMMITTED, NONE);
        // The magic last: a store whose creation was cut short is not a store.
        index.set_header(H_MAGIC, MAGIC);
        let mem = Arc::new(mem);
        let index = Arc::new(index);
        let trimmer = budget.map(|b| trim::Trimmer::start(mem.clone(), index.clone(), b));
        Ok(Store {
            dir: dir.to_path_buf(),
            mem_path,
            state,
            mem,
            index,
            pages,
            trimmer,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn mem_size(&self) -> u64 {
        self.pages * PAGE_SIZE as u64
    }

    fn check(&self, index: u64) -> Result<usize, StoreError> {
        if index >= self.pages {
            return Err(StoreError::Range {
                index,
                pages: self.pages,
            });
        }
        Ok(index as usize)
    }

    /// Writes page `index` as of `epoch` (0 for the initial sync). An all-zero page is
    /// stored as a hole.
    pub fn write_page(&self, index: u64, data: &[u8], epoch: u64) -> Result<(), StoreError> {
        let p = self.check(index)?;
        if data.len() != PAGE_SIZE {
            return Err(StoreError::PageSize(data.len()));
        }
        if data.iter().all(|&b| b == 0) {
            return self.zero_pages(&[index]);
        }
        self.mem
            .write_all_at(data, index * PAGE_SIZE as u64)
            .map_err(io("writing a page of", &self.mem_path))?;
        self.index
            .set_entry(p, Entry::data(epoch, crc32fast::hash(data)));
        if let Some(t) = &self.trimmer {
            t.written(PAGE_SIZE as u64);
        }
        Ok(())
    }

    /// Makes the pages at `indices` zero pages (holes: nothing written, freed on disk).
    pub fn zero_pages(&self, indices: &[u64]) -> Result<(), StoreError> {
        for &i in indices {
            self.check(i)?;
        }
        twin_vmm::memory::punch_pages(&self.mem, indices)
            .map_err(io("punching zero pages into", &self.mem_path))?;
        for &p in indices {
            self.index.set_entry(p as usize, Entry::ZERO);
        }
        Ok(())
    }

    /// Reads committed page `index` into `buf` (the version a delta of the next epoch is
    /// against), verified.
    pub fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let p = self.check(index)?;
        if buf.len() != PAGE_SIZE {
            return Err(StoreError::PageSize(buf.len()));
        }
        source::read_verified(&self.mem, &self.mem_path, &self.index, p, buf)
    }

    /// Epoch `epoch` is about to be applied: until [`Store::commit`] the store is torn.
    pub fn begin(&self, epoch: u64) {
        self.index.set_header(H_APPLYING, epoch);
    }

    /// Epoch `state.epoch` is applied: its state is written (atomically) and the store
    /// says so.
    pub fn commit(&self, state: &StoreState) -> Result<(), StoreError> {
        let path = self.dir.join(STATE_FILE);
        let bytes =
            container::encode(Kind::ReplicaState, state).map_err(|source| StoreError::State {
                path: path.clone(),
                source,
            })?;
        // In place, no rename (a metadata update per epoch): the header still says this
        // epoch is being applied, so a write cut short leaves a store refused as torn.
        let mut out = Vec::with_capacity(8 + bytes.len());
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(&bytes);
        self.state
            .write_all_at(&out, 0)
            .map_err(io("writing", &path))?;
        self.index.set_header(H_COMMITTED, state.epoch);
        self.index.set_header(H_APPLYING, state.epoch);
        if let Some(t) = &self.trimmer {
            t.committed(state.epoch);
        }
        Ok(())
    }

    /// The page source a lazy restore of the committed epoch loads from.
    pub fn source(&self) -> StoreSource {
        StoreSource::new(
            self.dir.clone(),
            self.mem.clone(),
            self.mem_path.clone(),
            self.index.clone(),
        )
    }

    /// Bytes of the store's memory file in the page cache (what the replica costs in RAM).
    pub fn resident_bytes(&self) -> u64 {
        trim::resident_bytes(&self.mem, self.mem_size()).unwrap_or(0)
    }
}

/// Opens the store in `dir` as of its committed epoch, for a restore: refused if it is
/// not a store, is torn, or never committed.
pub fn open_committed(dir: &Path) -> Result<(StoreSource, StoreState), StoreError> {
    let idx_path = dir.join(INDEX_FILE);
    let mem_path = dir.join(MEMORY_FILE);
    let not = |what: String| StoreError::NotAStore {
        path: dir.to_path_buf(),
        what,
    };
    let idx = File::options()
        .read(true)
        .write(true)
        .open(&idx_path)
        .map_err(io("opening", &idx_path))?;
    let len = idx
        .metadata()
        .map_err(io("reading the size of", &idx_path))?
        .len();
    let mut head = [0u8; 48];
    if len < HEADER as u64 {
        return Err(not(format!(
            "{INDEX_FILE} is {len} bytes, shorter than its header"
        )));
    }
    idx.read_exact_at(&mut head, 0)
        .map_err(io("reading", &idx_path))?;
    let h = |i: usize| u64::from_le_bytes(head[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if h(H_MAGIC) != MAGIC {
        return Err(not(format!("{INDEX_FILE} does not start with TWINSTOR")));
    }
    if h(H_FORMAT) != STORE_FORMAT {
        return Err(not(format!(
            "store format {} (this build reads {STORE_FORMAT})",
            h(H_FORMAT)
        )));
    }
    let mem_size = h(H_MEM_SIZE);
    if h(H_PAGE_SIZE) != PAGE_SIZE as u64 || mem_size == 0 || mem_size % PAGE_SIZE as u64 != 0 {
        return Err(not(format!(
            "page size {} / memory size {mem_size} are not usable",
            h(H_PAGE_SIZE)
        )));
    }
    let pages = mem_size / PAGE_SIZE as u64;
    if len != HEADER as u64 + pages * 8 {
        return Err(not(format!(
            "{INDEX_FILE} is {len} bytes, {} expected for {pages} pages",
            HEADER as u64 + pages * 8
        )));
    }
    let (applying, committed) = (h(H_APPLYING), h(H_COMMITTED));
    if committed == NONE && applying == NONE {
        return Err(StoreError::NothingCommitted(dir.to_path_buf()));
    }
    if applying != committed {
        return Err(StoreError::Torn {
            dir: dir.to_path_buf(),
            applying,
            committed: if committed == NONE {
                "none".into()
            } else {
                committed.to_string()
            },
        });
    }
    let state_path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&state_path).map_err(io("reading", &state_path))?;
    let len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .filter(|&l| l <= MAX_STATE && 8 + l <= bytes.len() as u64)
        .ok_or_else(|| {
            not(format!(
                "{STATE_FILE} is {} bytes, shorter than it says",
                bytes.len()
            ))
        })?;
    let bytes = &bytes[8..8 + len as usize];
    let state: StoreState =
        container::decode(bytes, Kind::ReplicaState, MAX_STATE).map_err(|source| {
            StoreError::State {
                path: state_path.clone(),
                source,
            }
        })?;
    if state.epoch != committed {
        return Err(StoreError::StateEpoch {
            dir: dir.to_path_buf(),
            header: committed,
            state: state.epoch,
        });
    }
    let mem = File::open(&mem_path).map_err(io("opening", &mem_path))?;
    let mem_len = mem
        .metadata()
        .map_err(io("reading the size of", &mem_path))?
        .len();
    if mem_len != mem_size {
        return Err(not(format!(
            "{MEMORY_FILE} is {mem_len} bytes, the index says {mem_size}"
        )));
    }
    let index = Index::map(idx, &idx_path, pages)?;
    let source = StoreSource::new(dir.to_path_buf(), Arc::new(mem), mem_path, Arc::new(index));
    Ok((source, state))
}

#[cfg(test)]
mod tests;
