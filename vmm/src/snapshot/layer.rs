//! Snapshot directories (*layers*): guest memory plus the machine state, on disk.
//!
//! A directory holds:
//! - `meta`: a state container (`Kind::SnapshotMeta`) with format, parent, sizes and the
//!   CRC-64 of the other files;
//! - `state`: the [`MachineState`] container;
//! - `pages`: the bitmap (u64 LE words) of pages present in this layer;
//! - `memory`: a sparse file the size of guest RAM holding those pages at their offsets.
//!
//! A full snapshot stores every non-zero page (absent = zero). An incremental one stores the
//! pages written since its parent and names the parent; restoring applies the chain from
//! the full base upwards. A directory is written under a temporary name and renamed into
//! place (never over an existing one), so a crash or a full disk never leaves a directory
//! that looks complete.
//!
//! A chain must add up: an increment is only right on top of the exact layer it was taken
//! after, and only if it holds every page written since. So each layer has a random
//! `layer_id`, an increment records its parent's (`parent_id`), and each layer records the
//! dirty-tracking generations it covers (`tracking_from`..`tracking_to`, see
//! [`crate::dirty`]; a full layer has both at the generation its increments count from).
//! Restoring refuses a chain where a parent's id is not the one its child names (the
//! parent was replaced) or where a child's `tracking_from` is not its parent's
//! `tracking_to` (a harvest in between went elsewhere: its pages are in neither layer).

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::VolatileMemoryError;
use vm_memory::{ReadVolatile, WriteVolatile};

use super::disks::{self, DiskSource, LayerDisk};
use crate::container::{self, ContainerError, Kind};
use crate::memory::{Memory, PAGE_SIZE};
use crate::{bitmap_runs, MachineState, TrackingSpan};

/// Chains longer than this are refused.
pub const MAX_CHAIN: usize = 256;

/// Version of the snapshot layout (`meta`'s first field). 2: layer ids and tracking
/// generations. 3: the disks (`disk-<i>`, see `disks.rs`). Older formats are refused.
pub const SNAPSHOT_FORMAT: u32 = 3;

/// A layer's identity: 128 random bits, written once, never reused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerId(pub [u8; 16]);

impl LayerId {
    /// A fresh random id (from the kernel's CSPRNG).
    pub fn random() -> Result<Self, LayerError> {
        let path = Path::new("/dev/urandom");
        let mut id = [0u8; 16];
        File::open(path)
            .and_then(|mut f| f.read_exact(&mut id))
            .map_err(io("reading a random layer id from", path))?;
        Ok(LayerId(id))
    }
}

impl std::fmt::Display for LayerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for LayerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LayerId({self})")
    }
}

/// Errors writing or reading a snapshot directory (one layer, or a chain of them).
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot file {path} is invalid")]
    Container {
        path: PathBuf,
        #[source]
        source: ContainerError,
    },
    #[error("snapshot {0} already exists")]
    Exists(PathBuf),
    #[error("snapshot {path}: {what}")]
    Inconsistent { path: PathBuf, what: String },
    #[error("snapshot chain from {0} is longer than {MAX_CHAIN} layers (or loops)")]
    ChainTooLong(PathBuf),
    #[error("snapshot chain from {dir} loops: {layer} is its own ancestor")]
    ChainLoop { dir: PathBuf, layer: PathBuf },
    #[error("snapshot chain broken between {child} and its parent {parent}: {what}")]
    ChainBroken {
        child: PathBuf,
        parent: PathBuf,
        what: String,
    },
    #[error(
        "{path}: snapshot format {found} is {} than the format {SNAPSHOT_FORMAT} this build \
         reads; take a new full snapshot",
        if *.found < SNAPSHOT_FORMAT { "older" } else { "newer" }
    )]
    Format { path: PathBuf, found: u32 },
    #[error("cannot create snapshot {dir}: {why}")]
    Target { dir: PathBuf, why: String },
    #[error("encoding snapshot metadata")]
    Encode(#[source] ContainerError),
}

pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LayerError {
    let path = path.to_path_buf();
    move |source| LayerError::Io { op, path, source }
}

/// Metadata of one layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// [`SNAPSHOT_FORMAT`]; first, so that a reader can refuse another format by it before
    /// decoding the rest.
    pub format: u32,
    pub layer_id: LayerId,
    /// Parent layer directory (absolute) for an incremental snapshot.
    pub parent: Option<PathBuf>,
    /// The parent's `layer_id`, as it was when this layer was written on it.
    pub parent_id: Option<LayerId>,
    /// The dirty-tracking generations whose pages this layer holds (see the module docs);
    /// for a full layer both are the generation its increments count from.
    pub tracking_from: u64,
    pub tracking_to: u64,
    pub mem_size: u64,
    pub page_size: u64,
    /// Pages stored in this layer.
    pub pages: u64,
    pub created_unix_ms: u64,
    pub state_crc: u64,
    pub bitmap_crc: u64,
    /// The disks, in order: a copy of each in a full layer, the blocks written since the
    /// parent in an increment.
    pub disks: Vec<LayerDisk>,
}

/// How a snapshot's pages were chosen.
pub enum Layer<'a> {
    /// Every non-zero page of guest RAM; increments on it count from tracking generation
    /// `tracking`.
    Full { tracking: u64 },
    /// The pages set in this bitmap, harvested over `tracking`, on top of `parent`.
    Incremental {
        parent: &'a Path,
        dirty: &'a [u64],
        tracking: TrackingSpan,
    },
}

/// What was written.
#[derive(Clone, Debug)]
pub struct WriteReport {
    pub pages: u64,
    pub bytes: u64,
    pub layer_id: LayerId,
    pub parent_id: Option<LayerId>,
    pub tracking: TrackingSpan,
}

fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// The directory a snapshot `dir` is created in (its temporary name lives there too).
fn target_parent(dir: &Path) -> &Path {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Checks what a [`write()`] of `dir` can be known to fail on before anything is captured or
/// harvested: `dir` exists (also as a dangling symlink), or the directory it is to be
/// created in is missing, not a directory, or not writable. [`write()`] checks `dir` again
/// (and creates it atomically); this is so that a caller can refuse before touching the VM.
pub fn check_target(dir: &Path) -> Result<(), LayerError> {
    let target = |why: String| LayerError::Target {
        dir: dir.to_path_buf(),
        why,
    };
    if dir.file_name().is_none() {
        return Err(target("the path names no directory to create".into()));
    }
    if fs::symlink_metadata(dir).is_ok() {
        return Err(LayerError::Exists(dir.to_path_buf()));
    }
    let parent = target_parent(dir);
    match fs::metadata(parent) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(target(format!("{} is not a directory", parent.display()))),
        Err(e) => return Err(target(format!("{}: {e}", parent.display()))),
    }
    let c_parent = std::ffi::CString::new(parent.as_os_str().as_encoded_bytes())
        .map_err(|_| target(format!("{} contains a NUL byte", parent.display())))?;
    // SAFETY: `c_parent` is a valid NUL-terminated path that outlives the call; `access`
    // reads it and touches no other memory.
    if unsafe { libc::access(c_parent.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(target(format!(
            "cannot write into {}: {e}",
            parent.display()
        )));
    }
    Ok(())
}

/// Renames `from` to `to` unless `to` exists (`renameat2(RENAME_NOREPLACE)`): a plain
/// rename would replace an empty directory created at `to` meanwhile.
fn rename_no_replace(from: &Path, to: &Path) -> Result<(), LayerError> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| LayerError::Target {
            dir: to.to_path_buf(),
            why: format!("{} contains a NUL byte", p.display()),
        })
    };
    let (cf, ct) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call; renameat2 reads
    // them and touches no other memory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cf.as_ptr(),
            libc::AT_FDCWD,
            ct.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => Err(LayerError::Exists(to.to_path_buf())),
        // A filesystem without RENAME_NOREPLACE: check, then rename (a narrow race).
        Some(libc::EINVAL) if fs::symlink_metadata(to).is_err() => {
            fs::rename(from, to).map_err(io("renaming snapshot into place at", to))
        }
        _ => Err(io("renaming snapshot into place at", to)(e)),
    }
}

/// The I/O error inside a volatile copy's error (a copy between a file and guest memory
/// fails only by its I/O).
fn volatile_io(e: VolatileMemoryError) -> std::io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        e => std::io::Error::other(e),
    }
}

/// Writes pages `first..first + count` of guest RAM into `file` at their own offset.
fn write_pages(file: &File, ram: &Memory, first: usize, count: usize) -> std::io::Result<()> {
    let pages = ram.pages(first, count).map_err(std::io::Error::other)?;
    let mut f = file;
    f.seek(SeekFrom::Start((first * PAGE_SIZE) as u64))?;
    f.write_all_volatile(&pages).map_err(volatile_io)
}

/// Reads pages `first..first + count` of guest RAM from `file` at their own offset.
fn read_pages(file: &File, ram: &Memory, first: usize, count: usize) -> std::io::Result<()> {
    let mut pages = ram.pages(first, count).map_err(std::io::Error::other)?;
    let mut f = file;
    f.seek(SeekFrom::Start((first * PAGE_SIZE) as u64))?;
    f.read_exact_volatile(&mut pages).map_err(volatile_io)
}

/// Writes a snapshot of `state` and the layer's pages of `ram` into `dir`, which must not
/// exist. `ram` must not change during the call (the VM is frozen, or not running).
/// An increment is refused (nothing written) unless it continues its parent: its tracking
/// span must start where the parent's ends.
pub fn write(
    dir: &Path,
    state: &MachineState,
    ram: &Memory,
    layer: Layer<'_>,
) -> Result<WriteReport, LayerError> {
    write_with_disks(dir, state, ram, layer, &[])
}

/// [`write()`], with the VM's disks: copied whole into a full layer, their blocks written
/// since the parent into an increment (see `disks.rs`). The images must not change during
/// the call either (the VM is frozen: a request still in flight is executed again by the
/// restored VM).
pub fn write_with_disks(
    dir: &Path,
    state: &MachineState,
    ram: &Memory,
    layer: Layer<'_>,
    disks: &[DiskSource<'_>],
) -> Result<WriteReport, LayerError> {
    check_target(dir)?;
    let full = matches!(layer, Layer::Full { .. });
    if disks.iter().any(|d| d.dirty.is_none() != full) {
        return Err(LayerError::Inconsistent {
            path: dir.to_path_buf(),
            what: "a full layer copies every disk whole, an increment only written blocks".into(),
        });
    }
    let page_count = ram.page_count();
    let words = page_count.div_ceil(64);
    let (parent, mut present, tracking) = match layer {
        Layer::Full { tracking } => {
            let mut bm = vec![0u64; words];
            let mut page = vec![0u8; PAGE_SIZE];
            // Holes of the memfd are zero pages: only the data ranges are read (reading a
            // hole would allocate it).
            let ranges = ram
                .data_ranges()
                .map_err(io("finding the guest memory's data", dir))?;
            for p in ranges.into_iter().flatten() {
                ram.read_page(p, &mut page)
                    .expect("every page below page_count is in RAM");
                if !is_zero(&page) {
                    bm[p / 64] |= 1 << (p % 64);
                }
            }
            let span = TrackingSpan {
                from: tracking,
                to: tracking,
            };
            (None, bm, span)
        }
        Layer::Incremental {
            parent,
            dirty,
            tracking,
        } => {
            let parent =
                fs::canonicalize(parent).map_err(io("resolving parent snapshot", parent))?;
            let meta = read_meta(&parent)?;
            let broken = |what: String| LayerError::ChainBroken {
                child: dir.to_path_buf(),
                parent: parent.clone(),
                what,
            };
            if meta.mem_size != ram.size() {
                return Err(broken(format!(
                    "the parent is for {} bytes of RAM, the VM has {}",
                    meta.mem_size,
                    ram.size()
                )));
            }
            if meta.disks.len() != disks.len()
                || meta
                    .disks
                    .iter()
                    .zip(disks)
                    .any(|(m, d)| m.capacity != d.image.capacity())
            {
                return Err(broken(format!(
                    "the parent has {} disks of other sizes than the VM's {}",
                    meta.disks.len(),
                    disks.len()
                )));
            }
            if meta.tracking_to != tracking.from {
                return Err(broken(format!(
                    "the pages harvested for this layer were written from dirty-tracking \
                     generation {}, but the parent's end at generation {}: the pages written \
                     in between would be in neither layer",
                    tracking.from, meta.tracking_to
                )));
            }
            (Some((parent, meta.layer_id)), dirty.to_vec(), tracking)
        }
    };
    present.resize(words, 0);
    let ids = (LayerId::random()?, parent.as_ref().map(|(_, id)| *id));

    let tmp = dir.with_file_name(format!(
        ".{}.tmp-{}",
        dir.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    let parent = parent.map(|(p, _)| p);
    let result =
        write_files(&tmp, state, ram, parent, ids, tracking, &present, disks).and_then(|r| {
            rename_no_replace(&tmp, dir)?;
            Ok(r)
        });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn write_files(
    dir: &Path,
    state: &MachineState,
    ram: &Memory,
    parent: Option<PathBuf>,
    (layer_id, parent_id): (LayerId, Option<LayerId>),
    tracking: TrackingSpan,
    present: &[u64],
    disk_sources: &[DiskSource<'_>],
) -> Result<WriteReport, LayerError> {
    fs::create_dir_all(dir).map_err(io("creating snapshot directory", dir))?;
    let state_bytes = state.encode().map_err(LayerError::Encode)?;
    write_file(&dir.join("state"), &state_bytes)?;
    let bitmap: Vec<u8> = present.iter().flat_map(|w| w.to_le_bytes()).collect();
    write_file(&dir.join("pages"), &bitmap)?;

    let mem_path = dir.join("memory");
    let mem = File::create(&mem_path).map_err(io("creating", &mem_path))?;
    mem.set_len(ram.size()).map_err(io("sizing", &mem_path))?;
    let mut pages = 0u64;
    // Runs of consecutive pages, one write each; bits past the end of RAM are not pages.
    let in_ram = ram.page_count();
    for (first, count) in bitmap_runs(present) {
        let count = count.min(in_ram.saturating_sub(first));
        if count == 0 {
            break;
        }
        pages += count as u64;
        write_pages(&mem, ram, first, count).map_err(io("writing guest memory to", &mem_path))?;
    }
    mem.sync_all().map_err(io("syncing", &mem_path))?;
    let disks = disks::write(dir, disk_sources)?;

    let meta = SnapshotMeta {
        format: SNAPSHOT_FORMAT,
        layer_id,
        parent,
        parent_id,
        tracking_from: tracking.from,
        tracking_to: tracking.to,
        mem_size: ram.size(),
        page_size: PAGE_SIZE as u64,
        pages,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        state_crc: container::crc64(&state_bytes),
        bitmap_crc: container::crc64(&bitmap),
        disks,
    };
    let meta_bytes = container::encode(Kind::SnapshotMeta, &meta).map_err(LayerError::Encode)?;
    write_file(&dir.join("meta"), &meta_bytes)?;
    Ok(WriteReport {
        pages,
        bytes: pages * PAGE_SIZE as u64,
        layer_id,
        parent_id,
        tracking,
    })
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), LayerError> {
    let mut f = File::create(path).map_err(io("creating", path))?;
    f.write_all(data).map_err(io("writing", path))?;
    f.sync_all().map_err(io("syncing", path))
}

fn read_file(path: &Path, max: u64) -> Result<Vec<u8>, LayerError> {
    let f = File::open(path).map_err(io("opening", path))?;
    let len = f.metadata().map_err(io("reading the size of", path))?.len();
    if len > max {
        return Err(LayerError::Inconsistent {
            path: path.to_path_buf(),
            what: format!("file is {len} bytes, more than the {max} allowed"),
        });
    }
    let mut data = Vec::with_capacity(len as usize);
    f.take(max)
        .read_to_end(&mut data)
        .map_err(io("reading", path))?;
    Ok(data)
}

/// Reads and checks a layer's metadata.
pub fn read_meta(dir: &Path) -> Result<SnapshotMeta, LayerError> {
    let path = dir.join("meta");
    let data = read_file(&path, 1 << 20)?;
    let invalid = |source| LayerError::Container {
        path: path.clone(),
        source,
    };
    let payload = container::open(&data, Kind::SnapshotMeta, 1 << 20).map_err(invalid)?;
    // The format leads the payload (u32 LE): another format's meta is refused by it, not
    // by whatever its fields fail to decode as. Too short for it: the decode says so.
    if let Some(f) = payload.get(..4) {
        let found = u32::from_le_bytes(f.try_into().expect("4 bytes"));
        if found != SNAPSHOT_FORMAT {
            return Err(LayerError::Format { path, found });
        }
    }
    let meta: SnapshotMeta = container::decode_payload(payload, 1 << 20).map_err(invalid)?;
    if meta.parent.is_some() != meta.parent_id.is_some() || meta.tracking_from > meta.tracking_to {
        return Err(LayerError::Inconsistent {
            path,
            what: format!(
                "parent {:?} with parent id {:?}, tracking generations {}..{}",
                meta.parent, meta.parent_id, meta.tracking_from, meta.tracking_to
            ),
        });
    }
    if meta.page_size != PAGE_SIZE as u64
        || meta.mem_size == 0
        || meta.mem_size % PAGE_SIZE as u64 != 0
    {
        return Err(LayerError::Inconsistent {
            path,
            what: format!(
                "page size {} / memory size {} are not usable",
                meta.page_size, meta.mem_size
            ),
        });
    }
    Ok(meta)
}

/// Reads the machine state of the top layer `dir`.
pub fn read_state(dir: &Path) -> Result<MachineState, LayerError> {
    let meta = read_meta(dir)?;
    let path = dir.join("state");
    let data = read_file(
        &path,
        container::DEFAULT_MAX_PAYLOAD + container::HEADER_LEN as u64,
    )?;
    if container::crc64(&data) != meta.state_crc {
        return Err(LayerError::Inconsistent {
            path,
            what: "state does not match the checksum in meta".into(),
        });
    }
    let state = MachineState::decode(&data).map_err(|source| LayerError::Container {
        path: path.clone(),
        source,
    })?;
    if state.config.mem_size != meta.mem_size {
        return Err(LayerError::Inconsistent {
            path,
            what: format!(
                "state says {} bytes of RAM, meta {}",
                state.config.mem_size, meta.mem_size
            ),
        });
    }
    Ok(state)
}

/// The chain of layers ending at `dir`, base first. Refused: a loop, a chain longer than
/// [`MAX_CHAIN`], and a chain that does not add up (see the module docs) — each child must
/// name its parent's id and start its tracking span where the parent's ends.
pub fn chain(dir: &Path) -> Result<Vec<(PathBuf, SnapshotMeta)>, LayerError> {
    let mut layers: Vec<(PathBuf, SnapshotMeta)> = Vec::new();
    let mut seen = Vec::new();
    let mut cur = Some(dir.to_path_buf());
    while let Some(d) = cur {
        if layers.len() >= MAX_CHAIN {
            return Err(LayerError::ChainTooLong(dir.to_path_buf()));
        }
        let meta = read_meta(&d)?;
        seen.push(fs::canonicalize(&d).map_err(io("resolving snapshot", &d))?);
        if let Some((child_dir, child)) = layers.last() {
            let broken = |what: String| LayerError::ChainBroken {
                child: child_dir.clone(),
                parent: d.clone(),
                what,
            };
            if child.mem_size != meta.mem_size {
                return Err(LayerError::Inconsistent {
                    path: d,
                    what: "parent has another memory size".into(),
                });
            }
            if child.parent_id != Some(meta.layer_id) {
                return Err(broken(format!(
                    "the child was taken on layer {}, but the parent is layer {} (replaced \
                     since?)",
                    child.parent_id.map(|i| i.to_string()).unwrap_or_default(),
                    meta.layer_id
                )));
            }
            if child.tracking_from != meta.tracking_to {
                return Err(broken(format!(
                    "the child holds the pages written from dirty-tracking generation {}, but \
                     the parent's end at generation {}: the pages written in between are in \
                     neither layer",
                    child.tracking_from, meta.tracking_to
                )));
            }
        }
        cur = match &meta.parent {
            Some(p) => {
                let p = fs::canonicalize(p).map_err(io("resolving parent snapshot", p))?;
                if seen.contains(&p) {
                    return Err(LayerError::ChainLoop {
                        dir: dir.to_path_buf(),
                        layer: p,
                    });
                }
                Some(p)
            }
            None => None,
        };
        layers.push((d, meta));
    }
    layers.reverse();
    Ok(layers)
}

/// The page bitmap of one layer (its `pages` file), checked against its meta.
pub(crate) fn layer_bitmap(d: &Path, meta: &SnapshotMeta) -> Result<Vec<u64>, LayerError> {
    let bm_path = d.join("pages");
    let bitmap = read_file(&bm_path, meta.mem_size / PAGE_SIZE as u64 / 8 + 8)?;
    if container::crc64(&bitmap) != meta.bitmap_crc || bitmap.len() % 8 != 0 {
        return Err(LayerError::Inconsistent {
            path: bm_path,
            what: "page bitmap does not match meta".into(),
        });
    }
    Ok(bitmap
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Fills fresh guest memory from the chain ending at `dir`; returns the pages loaded.
pub fn load_memory(dir: &Path, memory: &Memory) -> Result<u64, LayerError> {
    let layers = chain(dir)?;
    let in_ram = memory.page_count();
    let mut loaded = 0u64;
    for (d, meta) in &layers {
        if meta.mem_size != memory.size() {
            return Err(LayerError::Inconsistent {
                path: d.clone(),
                what: format!(
                    "layer is for {} bytes of RAM, the VM has {}",
                    meta.mem_size,
                    memory.size()
                ),
            });
        }
        let words = layer_bitmap(d, meta)?;
        let bm_path = d.join("pages");
        let mem_path = d.join("memory");
        let f = File::open(&mem_path).map_err(io("opening", &mem_path))?;
        let mut n = 0u64;
        // Runs of consecutive pages, one read each (the file is sparse: the pages of this
        // layer are at their own offsets).
        for (first, count) in bitmap_runs(&words) {
            if first + count > in_ram {
                return Err(LayerError::Inconsistent {
                    path: bm_path,
                    what: format!("page {} is beyond RAM", first.max(in_ram)),
                });
            }
            read_pages(&f, memory, first, count)
                .map_err(io("reading guest memory from", &mem_path))?;
            n += count as u64;
        }
        if n != meta.pages {
            return Err(LayerError::Inconsistent {
                path: d.clone(),
                what: format!("bitmap has {n} pages, meta says {}", meta.pages),
            });
        }
        loaded += n;
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::SerialDeviceState;
    use crate::state::VmState;
    use crate::{DeviceStates, MachineConfig};

    fn state(mem_size: u64) -> MachineState {
        MachineState {
            config: MachineConfig {
                mem_size,
                vcpus: 1,
                mac: None,
                ip: None,
                disks: vec![],
            },
            devices: DeviceStates {
                serial: SerialDeviceState::default(),
                pci: crate::Persist::save(&crate::devices::pci::PciRoot::new()).unwrap(),
                net: None,
                disks: vec![],
            },
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpus: vec![],
        }
    }

    fn fill(ram: &Memory, page: usize, v: u8) {
        use vm_memory::{Bytes, GuestAddress};
        ram.guest_memory()
            .write_slice(&[v; PAGE_SIZE], GuestAddress((page * PAGE_SIZE) as u64))
            .unwrap();
    }

    #[test]
    fn incremental_chain_restores_like_a_full_snapshot() {
        let tmp = tempdir();
        let size = 2 << 20;
        let pages = size / PAGE_SIZE;
        let ram = Memory::new(size as u64).unwrap();
        fill(&ram, 3, 1);
        fill(&ram, 100, 2);
        let r = write(
            &tmp.join("a"),
            &state(size as u64),
            &ram,
            Layer::Full { tracking: 1 },
        )
        .unwrap();
        assert_eq!(r.pages, 2, "zero pages are not stored");
        // Epoch 2: page 3 changes, page 100 becomes zero, page 7 is new.
        fill(&ram, 3, 9);
        fill(&ram, 100, 0);
        fill(&ram, 7, 4);
        let mut dirty = vec![0u64; pages / 64];
        for p in [3, 7, 100] {
            dirty[p / 64] |= 1 << (p % 64);
        }
        let b = tmp.join("b");
        write(
            &b,
            &state(size as u64),
            &ram,
            Layer::Incremental {
                parent: &tmp.join("a"),
                dirty: &dirty,
                tracking: TrackingSpan { from: 1, to: 2 },
            },
        )
        .unwrap();
        write(
            &tmp.join("full"),
            &state(size as u64),
            &ram,
            Layer::Full { tracking: 1 },
        )
        .unwrap();
        assert_eq!(chain(&b).unwrap().len(), 2);

        let from_chain = Memory::new(size as u64).unwrap();
        load_memory(&b, &from_chain).unwrap();
        let from_full = Memory::new(size as u64).unwrap();
        load_memory(&tmp.join("full"), &from_full).unwrap();
        assert!(from_chain.to_vec() == ram.to_vec());
        assert!(from_full.to_vec() == from_chain.to_vec());
        assert_eq!(read_state(&b).unwrap().config.mem_size, size as u64);
        assert!(matches!(
            write(&b, &state(size as u64), &ram, Layer::Full { tracking: 1 }),
            Err(LayerError::Exists(_))
        ));
    }

    #[test]
    fn corrupt_files_are_refused() {
        let tmp = tempdir();
        let size = 2 << 20;
        let ram = Memory::new(size as u64).unwrap();
        fill(&ram, 1, 1);
        let d = tmp.join("s");
        write(&d, &state(size as u64), &ram, Layer::Full { tracking: 1 }).unwrap();
        let mem = Memory::new(size as u64).unwrap();

        let mut st = fs::read(d.join("state")).unwrap();
        st[40] ^= 1;
        fs::write(d.join("state"), &st).unwrap();
        assert!(matches!(
            read_state(&d),
            Err(LayerError::Inconsistent { .. })
        ));

        let mut bm = fs::read(d.join("pages")).unwrap();
        bm[0] ^= 0x80;
        fs::write(d.join("pages"), &bm).unwrap();
        assert!(matches!(
            load_memory(&d, &mem),
            Err(LayerError::Inconsistent { .. })
        ));

        let meta = fs::read(d.join("meta")).unwrap();
        fs::write(d.join("meta"), &meta[..meta.len() - 3]).unwrap();
        assert!(matches!(read_meta(&d), Err(LayerError::Container { .. })));
        fs::remove_file(d.join("meta")).unwrap();
        assert!(matches!(read_meta(&d), Err(LayerError::Io { .. })));

        let other = Memory::new(4 << 20).unwrap();
        let d2 = tmp.join("t");
        write(&d2, &state(size as u64), &ram, Layer::Full { tracking: 1 }).unwrap();
        assert!(matches!(
            load_memory(&d2, &other),
            Err(LayerError::Inconsistent { .. })
        ));
    }

    #[test]
    fn a_failed_write_leaves_no_directory() {
        let tmp = tempdir();
        // A file where the parent directory should be: refused before anything is written.
        fs::write(tmp.join("blocker"), b"x").unwrap();
        let d = tmp.join("blocker").join("snap");
        let ram = Memory::new(2 << 20).unwrap();
        assert!(write(&d, &state(2 << 20), &ram, Layer::Full { tracking: 1 }).is_err());
        assert!(!d.exists());
        // A file squatting the temporary name makes creation fail midway, after the checks.
        let d = tmp.join("snap");
        fs::write(tmp.join(format!(".snap.tmp-{}", std::process::id())), b"x").unwrap();
        check_target(&d).unwrap();
        assert!(matches!(
            write(&d, &state(2 << 20), &ram, Layer::Full { tracking: 1 }),
            Err(LayerError::Io { .. })
        ));
        assert!(!d.exists());
    }

    fn incremental<'a>(parent: &'a Path, dirty: &'a [u64], from: u64, to: u64) -> Layer<'a> {
        Layer::Incremental {
            parent,
            dirty,
            tracking: TrackingSpan { from, to },
        }
    }

    fn rewrite_meta(dir: &Path, edit: impl FnOnce(&mut SnapshotMeta)) {
        let mut m = read_meta(dir).unwrap();
        edit(&mut m);
        fs::write(
            dir.join("meta"),
            container::encode(Kind::SnapshotMeta, &m).unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn layers_record_their_ids_and_tracking_spans() {
        let tmp = tempdir();
        let size = 2 << 20;
        let ram = Memory::new(size as u64).unwrap();
        fill(&ram, 1, 1);
        let dirty = vec![0b10u64; size / PAGE_SIZE / 64];
        let (a, b, c) = (tmp.join("a"), tmp.join("b"), tmp.join("c"));
        let ra = write(&a, &state(size as u64), &ram, Layer::Full { tracking: 4 }).unwrap();
        let rb = write(&b, &state(size as u64), &ram, incremental(&a, &dirty, 4, 6)).unwrap();
        let rc = write(&c, &state(size as u64), &ram, incremental(&b, &dirty, 6, 7)).unwrap();
        let (ma, mb, mc) = (
            read_meta(&a).unwrap(),
            read_meta(&b).unwrap(),
            read_meta(&c).unwrap(),
        );
        assert_eq!(ma.format, SNAPSHOT_FORMAT);
        assert_eq!((ma.tracking_from, ma.tracking_to), (4, 4));
        assert_eq!((mb.tracking_from, mb.tracking_to), (4, 6));
        assert_eq!(ma.parent_id, None);
        assert_eq!(mb.parent_id, Some(ma.layer_id));
        assert_eq!(mc.parent_id, Some(mb.layer_id));
        assert_eq!(
            (ra.layer_id, rb.layer_id, rc.layer_id),
            (ma.layer_id, mb.layer_id, mc.layer_id)
        );
        assert_ne!(ma.layer_id, mb.layer_id, "ids are random, not derived");
        assert_eq!(chain(&c).unwrap().len(), 3);

        // Writing an increment that does not continue its parent is refused up front.
        let gap = tmp.join("gap");
        match write(
            &gap,
            &state(size as u64),
            &ram,
            incremental(&c, &dirty, 8, 9),
        ) {
            Err(LayerError::ChainBroken { what, .. }) => {
                assert!(
                    what.contains("generation 8") && what.contains("generation 7"),
                    "{what}"
                )
            }
            other => panic!("a gap was written: {other:?}"),
        }
        assert!(!gap.exists());
    }

    #[test]
    fn a_chain_that_does_not_add_up_is_refused_naming_both_layers() {
        let tmp = tempdir();
        let size = 2 << 20;
        let ram = Memory::new(size as u64).unwrap();
        fill(&ram, 1, 1);
        let dirty = vec![0b10u64; size / PAGE_SIZE / 64];
        let (a, b) = (tmp.join("a"), tmp.join("b"));
        write(&a, &state(size as u64), &ram, Layer::Full { tracking: 1 }).unwrap();
        write(&b, &state(size as u64), &ram, incremental(&a, &dirty, 1, 2)).unwrap();
        let mem = Memory::new(size as u64).unwrap();
        let names_both = |e: &LayerError| {
            let msg = e.to_string();
            assert!(msg.contains(&*b.to_string_lossy()), "{msg}");
            assert!(
                msg.contains(&*fs::canonicalize(&a).unwrap().to_string_lossy()),
                "{msg}"
            );
        };

        // The parent replaced by another full snapshot of the same VM: another id.
        let good = read_meta(&a).unwrap();
        rewrite_meta(&a, |m| m.layer_id = LayerId([7; 16]));
        let e = load_memory(&b, &mem).unwrap_err();
        assert!(matches!(e, LayerError::ChainBroken { .. }), "{e}");
        assert!(e.to_string().contains(&LayerId([7; 16]).to_string()), "{e}");
        names_both(&e);
        rewrite_meta(&a, |m| *m = good.clone());
        load_memory(&b, &mem).unwrap();

        // A harvest between the parent and the child went elsewhere.
        rewrite_meta(&b, |m| {
            m.tracking_from = 3;
            m.tracking_to = 4;
        });
        let e = chain(&b).unwrap_err();
        assert!(matches!(e, LayerError::ChainBroken { .. }), "{e}");
        assert!(e.to_string().contains("generation 3"), "{e}");
        names_both(&e);

        // Inconsistent on its own: an increment without a parent id.
        rewrite_meta(&b, |m| {
            m.tracking_from = 1;
            m.parent_id = None
        });
        assert!(matches!(
            read_meta(&b),
            Err(LayerError::Inconsistent { .. })
        ));
    }

    #[test]
    fn another_snapshot_format_is_refused_by_its_number() {
        let tmp = tempdir();
        let size = 2 << 20;
        let d = tmp.join("old");
        write(
            &d,
            &state(size as u64),
            &Memory::new(size as u64).unwrap(),
            Layer::Full { tracking: 1 },
        )
        .unwrap();
        // A format-1 meta, as builds before layer ids wrote it.
        #[derive(Serialize)]
        struct MetaV1 {
            format: u32,
            parent: Option<PathBuf>,
            mem_size: u64,
            page_size: u64,
            pages: u64,
            created_unix_ms: u64,
            state_crc: u64,
            bitmap_crc: u64,
        }
        let m = read_meta(&d).unwrap();
        let v1 = MetaV1 {
            format: 1,
            parent: None,
            mem_size: m.mem_size,
            page_size: m.page_size,
            pages: m.pages,
            created_unix_ms: m.created_unix_ms,
            state_crc: m.state_crc,
            bitmap_crc: m.bitmap_crc,
        };
        fs::write(
            d.join("meta"),
            container::encode(Kind::SnapshotMeta, &v1).unwrap(),
        )
        .unwrap();
        let e = read_meta(&d).unwrap_err();
        assert!(matches!(e, LayerError::Format { found: 1, .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("format 1 is older") && msg.contains("format 3"),
            "{msg}"
        );
        rewrite_meta_raw(&d, 4);
        assert!(read_meta(&d)
            .unwrap_err()
            .to_string()
            .contains("format 4 is newer"));
    }

    /// A current meta with only its format number changed.
    fn rewrite_meta_raw(dir: &Path, format: u32) {
        fs::remove_file(dir.join("meta")).unwrap();
        let m = SnapshotMeta {
            format,
            layer_id: LayerId([1; 16]),
            parent: None,
            parent_id: None,
            tracking_from: 1,
            tracking_to: 1,
            mem_size: 2 << 20,
            page_size: PAGE_SIZE as u64,
            pages: 0,
            created_unix_ms: 0,
            state_crc: 0,
            bitmap_crc: 0,
            disks: vec![],
        };
        fs::write(
            dir.join("meta"),
            container::encode(Kind::SnapshotMeta, &m).unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn targets_that_cannot_work_are_refused_before_anything_is_captured() {
        let tmp = tempdir();
        fs::create_dir(tmp.join("there")).unwrap();
        assert!(matches!(
            check_target(&tmp.join("there")),
            Err(LayerError::Exists(_))
        ));
        std::os::unix::fs::symlink("/nonexistent/twin", tmp.join("dangling")).unwrap();
        assert!(matches!(
            check_target(&tmp.join("dangling")),
            Err(LayerError::Exists(_))
        ));
        let e = check_target(&tmp.join("missing").join("snap")).unwrap_err();
        assert!(
            matches!(e, LayerError::Target { .. }) && e.to_string().contains("missing"),
            "{e}"
        );
        fs::write(tmp.join("file"), b"x").unwrap();
        let e = check_target(&tmp.join("file").join("snap")).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        check_target(&tmp.join("new")).unwrap();
        // The final rename does not replace a directory that appeared meanwhile.
        let size = 2 << 20;
        let ram = Memory::new(size as u64).unwrap();
        fs::create_dir(tmp.join("src")).unwrap();
        assert!(matches!(
            rename_no_replace(&tmp.join("src"), &tmp.join("there")),
            Err(LayerError::Exists(_))
        ));
        write(
            &tmp.join("new"),
            &state(size as u64),
            &ram,
            Layer::Full { tracking: 1 },
        )
        .unwrap();
    }

    fn tempdir() -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "twin-snap-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }
}
