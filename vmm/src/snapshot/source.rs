//! A snapshot chain as the page source of a lazy restore ([`crate::lazy`]): which layer
//! holds each page (the newest that stored it), read from that layer's memory file.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::layer::{chain, io, layer_bitmap, LayerError};
use crate::lazy::{PageSource, SourceError};
use crate::memory::PAGE_SIZE;

/// The file beside a snapshot's newest layer recording the order in which the guest
/// first touched its pages in a lazy restore (u32 LE page indices): the working set to
/// load first the next time (REAP's record).
pub const FIRST_TOUCH_FILE: &str = "first-touch";

/// The pages of a snapshot chain, by layer.
pub struct ChainSource {
    top: PathBuf,
    files: Vec<(PathBuf, File)>,
    /// Per page: 0 for a zero page, else 1 + the index in `files` of the layer holding it.
    owner: Vec<u16>,
    /// Pages of the newest layer first, then each older layer's: what was written last
    /// is the likeliest to be used soon.
    by_recency: Vec<u32>,
}

impl ChainSource {
    /// Opens the chain ending at `dir` for guest RAM of `mem_size` bytes.
    pub fn open(dir: &Path, mem_size: u64) -> Result<Self, LayerError> {
        let layers = chain(dir)?;
        let pages = (mem_size / PAGE_SIZE as u64) as usize;
        let mut owner = vec![0u16; pages];
        let mut files = Vec::with_capacity(layers.len());
        let mut per_layer = Vec::with_capacity(layers.len());
        for (k, (d, meta)) in layers.iter().enumerate() {
            if meta.mem_size != mem_size {
                return Err(LayerError::Inconsistent {
                    path: d.clone(),
                    what: format!(
                        "layer is for {} bytes of RAM, the VM has {mem_size}",
                        meta.mem_size
                    ),
                });
            }
            let words = layer_bitmap(d, meta)?;
            let mut mine = Vec::new();
            for p in crate::bitmap_pages(&words) {
                if p >= pages {
                    return Err(LayerError::Inconsistent {
                        path: d.join("pages"),
                        what: format!("page {p} is beyond RAM"),
                    });
                }
                owner[p] = k as u16 + 1;
                mine.push(p as u32);
            }
            if mine.len() as u64 != meta.pages {
                return Err(LayerError::Inconsistent {
                    path: d.clone(),
                    what: format!("bitmap has {} pages, meta says {}", mine.len(), meta.pages),
                });
            }
            let path = d.join("memory");
            let f = File::open(&path).map_err(io("opening", &path))?;
            // A lazy restore reads a page only when it is wanted: a file too short for its
            // bitmap is refused now, not when the guest has run for a while.
            let len = f
                .metadata()
                .map_err(io("reading the size of", &path))?
                .len();
            if let Some(&last) = mine.last() {
                let need = (last as u64 + 1) * PAGE_SIZE as u64;
                if len < need {
                    return Err(LayerError::Inconsistent {
                        path,
                        what: format!(
                            "memory file is truncated: {len} bytes, its bitmap names page {last} (needs {need})"
                        ),
                    });
                }
            }
            per_layer.push(mine);
            files.push((path, f));
        }
        let mut by_recency = Vec::new();
        for (k, mine) in per_layer.iter().enumerate().rev() {
            // A page a newer layer stored again is listed with that layer only.
            by_recency.extend(mine.iter().filter(|&&p| owner[p as usize] == k as u16 + 1));
        }
        Ok(ChainSource {
            top: dir.to_path_buf(),
            files,
            owner,
            by_recency,
        })
    }

    /// The order to prefetch in: the recorded first touches of an earlier lazy restore
    /// (if any), then every other page newest layer first.
    fn order(&self) -> Vec<u32> {
        let mut order = read_first_touches(&self.top.join(FIRST_TOUCH_FILE), self.owner.len());
        let mut seen = vec![false; self.owner.len()];
        for &p in &order {
            seen[p as usize] = true;
        }
        order.extend(self.by_recency.iter().filter(|&&p| !seen[p as usize]));
        order
    }

    /// Records the first touches of this restore for the next one (best effort: a
    /// snapshot on a read-only medium still restores).
    pub fn record_first_touches(&self, touched: &[u32]) {
        write_first_touches(&self.top.join(FIRST_TOUCH_FILE), touched, self.owner.len());
    }
}

/// Writes a first-touch record: this restore's first touches, then those of the record
/// already there that it did not touch. A `ws` restore faults only on what its prefetcher
/// had not loaded yet — a few pages — and must not replace the working set it was given
/// with them. Best effort: an image on a read-only medium still restores, only without
/// the record.
pub fn write_first_touches(path: &Path, touched: &[u32], pages: usize) {
    let old = read_first_touches(path, pages);
    let mut seen = vec![false; pages];
    let mut order = Vec::with_capacity(touched.len() + old.len());
    for &p in touched.iter().chain(&old) {
        if (p as usize) < pages && !std::mem::replace(&mut seen[p as usize], true) {
            order.push(p);
        }
    }
    let bytes: Vec<u8> = order.iter().flat_map(|p| p.to_le_bytes()).collect();
    if let Err(e) = std::fs::write(path, bytes) {
        tracing::warn!(path = %path.display(), "cannot record the restore's first touches: {e}");
    }
}

/// Page indices from a first-touch record; a damaged or foreign record (wrong length,
/// pages beyond RAM) yields only its valid entries: it orders a prefetch, it never says
/// what a page holds.
pub fn read_first_touches(path: &Path, pages: usize) -> Vec<u32> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let mut seen = vec![false; pages];
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .filter(|&p| {
            let ok = (p as usize) < pages && !seen[p as usize];
            if ok {
                seen[p as usize] = true;
            }
            ok
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_keeps_the_working_set_it_was_given_after_the_new_touches() {
        let dir = std::env::temp_dir().join(format!("twin-touch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FIRST_TOUCH_FILE);
        let _ = std::fs::remove_file(&path);
        write_first_touches(&path, &[5, 1, 9], 16);
        assert_eq!(read_first_touches(&path, 16), vec![5, 1, 9]);
        // A ws restore that faulted on two pages only (one beyond RAM: ignored).
        write_first_touches(&path, &[9, 3, 99], 16);
        assert_eq!(read_first_touches(&path, 16), vec![9, 3, 5, 1]);
        // A record from a larger VM: what is beyond this RAM is dropped.
        assert_eq!(read_first_touches(&path, 4), vec![3, 1]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

impl PageSource for ChainSource {
    fn page_count(&self) -> usize {
        self.owner.len()
    }

    fn has_data(&self, index: usize) -> bool {
        self.owner.get(index).is_some_and(|&o| o != 0)
    }

    fn read(&self, first: usize, buf: &mut [u8]) -> Result<(), SourceError> {
        let count = buf.len() / PAGE_SIZE;
        let mut k = 0;
        // Consecutive pages of one layer are read at once.
        while k < count {
            let o = self.owner.get(first + k).copied().unwrap_or(0);
            let mut n = 1;
            while k + n < count && self.owner.get(first + k + n).copied() == Some(o) {
                n += 1;
            }
            let dst = &mut buf[k * PAGE_SIZE..(k + n) * PAGE_SIZE];
            if o == 0 {
                dst.fill(0);
            } else {
                let (path, f) = &self.files[o as usize - 1];
                f.read_exact_at(dst, ((first + k) * PAGE_SIZE) as u64)
                    .map_err(|source| SourceError::Io {
                        first: first + k,
                        count: n,
                        what: path.display().to_string(),
                        source,
                    })?;
            }
            k += n;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("snapshot {}", self.top.display())
    }

    fn working_set(&self) -> Vec<u32> {
        self.order()
    }
}

/// Where clones of a snapshot get their memory ([`clone_base`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloneBase {
    /// The chain is one full layer: its `memory` file itself, read-only (clones started
    /// separately, e.g. by systemd, share it through the page cache).
    Layer(PathBuf),
    /// The chain's pages copied once into a sealed memfd (`layers` layers flattened): only
    /// clones handed this file share it.
    Flattened { layers: usize },
}

/// The base image clones of the snapshot chain at `dir` map copy-on-write
/// ([`crate::memory::Memory::new_private`]): page index `i` at offset `i × 4096`, holes
/// for zero pages, never written again. The chain is checked as a restore checks it
/// ([`ChainSource::open`]). A one-layer chain is its layer's `memory` file (opened
/// read-only: nothing is copied); a longer one is flattened into a new memfd, every page
/// read from the layer that holds it, then sealed against writes, growing and shrinking,
/// so no holder can change what the clones mapped. The memfd is close-on-exec; a parent
/// that hands it to its children clears that itself.
pub fn clone_base(dir: &Path, mem_size: u64) -> Result<(File, CloneBase), LayerError> {
    let source = ChainSource::open(dir, mem_size)?;
    if let [(path, _)] = source.files.as_slice() {
        let f = File::open(path).map_err(io("opening", path))?;
        return Ok((f, CloneBase::Layer(path.clone())));
    }
    let memfd_err = |source| LayerError::Io {
        op: "creating the flattened memory of",
        path: dir.to_path_buf(),
        source,
    };
    // SAFETY: a valid NUL-terminated name; the fd is checked and owned by the `File`.
    let fd = unsafe {
        libc::memfd_create(
            c"twin-clone-base".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(memfd_err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is fresh and owned by nothing else.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(mem_size).map_err(memfd_err)?;
    const RUN: usize = 256;
    let mut buf = vec![0u8; RUN * PAGE_SIZE];
    let pages = source.page_count();
    let mut p = 0;
    while p < pages {
        if !source.has_data(p) {
            p += 1;
            continue;
        }
        let mut n = 1;
        while n < RUN && p + n < pages && source.has_data(p + n) {
            n += 1;
        }
        let run = &mut buf[..n * PAGE_SIZE];
        source
            .read(p, run)
            .map_err(|e| memfd_err(std::io::Error::other(e)))?;
        f.write_all_at(run, (p * PAGE_SIZE) as u64)
            .map_err(memfd_err)?;
        p += n;
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on our own memfd; sealing changes no memory of this process.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(memfd_err(std::io::Error::last_os_error()));
    }
    Ok((
        f,
        CloneBase::Flattened {
            layers: source.files.len(),
        },
    ))
}
