//! The store as the page source of a lazy restore: pages read from `memory.img` and
//! verified against the index; the working set ordered by recency of writing.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use twin_vmm::lazy::{PageSource, SourceError};
use twin_vmm::memory::PAGE_SIZE;

use crate::{Index, StoreError};

/// The committed pages of a store.
#[derive(Clone)]
pub struct StoreSource {
    dir: PathBuf,
    mem: Arc<File>,
    mem_path: PathBuf,
    index: Arc<Index>,
}

impl StoreSource {
    pub(crate) fn new(dir: PathBuf, mem: Arc<File>, mem_path: PathBuf, index: Arc<Index>) -> Self {
        StoreSource {
            dir,
            mem,
            mem_path,
            index,
        }
    }

    pub fn mem_size(&self) -> u64 {
        (self.index.pages() * PAGE_SIZE) as u64
    }

    /// Records the first touches of a restore from this store, for the next one.
    pub fn record_first_touches(&self, touched: &[u32]) {
        twin_vmm::snapshot::write_first_touches(
            &self.dir.join(twin_vmm::snapshot::FIRST_TOUCH_FILE),
            touched,
            self.index.pages(),
        );
    }

    /// Drops the store's memory file from the page cache (a cold restore, for the bench).
    pub fn drop_cache(&self) -> std::io::Result<()> {
        crate::trim::drop_range(&self.mem, 0, self.mem_size())
    }
}

/// Reads page `p` (with data, or a zero page) into `buf` and checks it against its entry.
pub(crate) fn read_verified(
    mem: &File,
    path: &Path,
    index: &Index,
    p: usize,
    buf: &mut [u8],
) -> Result<(), StoreError> {
    let e = index.entry(p);
    if !e.has_data() {
        buf.fill(0);
        return Ok(());
    }
    mem.read_exact_at(buf, (p * PAGE_SIZE) as u64)
        .map_err(crate::io("reading a page of", path))?;
    let crc = crc32fast::hash(buf);
    if crc != e.crc() {
        return Err(StoreError::Damaged {
            index: p as u64,
            path: path.to_path_buf(),
            why: format!(
                "its checksum is {crc:#010x}, the index says {:#010x}",
                e.crc()
            ),
        });
    }
    Ok(())
}

impl PageSource for StoreSource {
    fn page_count(&self) -> usize {
        self.index.pages()
    }

    fn has_data(&self, index: usize) -> bool {
        index < self.index.pages() && self.index.entry(index).has_data()
    }

    fn read(&self, first: usize, buf: &mut [u8]) -> Result<(), SourceError> {
        let count = buf.len() / PAGE_SIZE;
        // One read for the run, then each page checked.
        self.mem
            .read_exact_at(buf, (first * PAGE_SIZE) as u64)
            .map_err(|source| SourceError::Io {
                first,
                count,
                what: self.mem_path.display().to_string(),
                source,
            })?;
        for (k, page) in buf.chunks_mut(PAGE_SIZE).enumerate() {
            let e = self.index.entry(first + k);
            if !e.has_data() {
                page.fill(0);
                continue;
            }
            let crc = crc32fast::hash(page);
            if crc != e.crc() {
                return Err(SourceError::Damaged {
                    index: first + k,
                    what: format!("the replica store {}", self.dir.display()),
                    why: format!(
                        "its checksum is {crc:#010x}, the index says {:#010x}",
                        e.crc()
                    ),
                });
            }
        }
        Ok(())
    }

    fn working_set(&self) -> Vec<u32> {
        let pages = self.index.pages();
        let mut order = twin_vmm::snapshot::read_first_touches(
            &self.dir.join(twin_vmm::snapshot::FIRST_TOUCH_FILE),
            pages,
        );
        let mut seen = vec![false; pages];
        for &p in &order {
            seen[p as usize] = true;
        }
        // Then every page with data, most recently written first (pages of the initial
        // sync, epoch 0, last).
        let mut by_epoch: Vec<(u32, u32)> = (0..pages)
            .filter(|&p| !seen[p])
            .filter_map(|p| {
                let e = self.index.entry(p);
                e.has_data().then_some((e.epoch(), p as u32))
            })
            .collect();
        by_epoch.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        order.extend(by_epoch.into_iter().map(|(_, p)| p));
        order
    }

    fn describe(&self) -> String {
        format!("the replica store {}", self.dir.display())
    }
}
