//! Snapshot directories: a layer of guest memory plus the machine state.
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
//! place, so a crash or a full disk never leaves a directory that looks complete.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::container::{self, ContainerError, Kind};
use crate::memory::{Memory, PAGE_SIZE};
use crate::{bitmap_pages, MachineState};

/// Chains longer than this are refused (and cycles therefore end).
pub const MAX_CHAIN: usize = 256;

/// Errors writing or reading a snapshot directory.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
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
    #[error("encoding snapshot metadata")]
    Encode(#[source] ContainerError),
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { op, path, source }
}

/// Metadata of one layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub format: u32,
    /// Parent layer directory (absolute) for an incremental snapshot.
    pub parent: Option<PathBuf>,
    pub mem_size: u64,
    pub page_size: u64,
    /// Pages stored in this layer.
    pub pages: u64,
    pub created_unix_ms: u64,
    pub state_crc: u64,
    pub bitmap_crc: u64,
}

/// How a snapshot's pages were chosen.
pub enum Layer<'a> {
    /// Every non-zero page of guest RAM.
    Full,
    /// The pages set in this bitmap, on top of `parent`.
    Incremental { parent: &'a Path, dirty: &'a [u64] },
}

/// What was written.
#[derive(Clone, Debug)]
pub struct WriteReport {
    pub pages: u64,
    pub bytes: u64,
}

fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// Writes a snapshot of `state` and the layer's pages of `ram` into `dir`, which must not
/// exist. `ram` must not change during the call (the VM is paused, or `ram` is a copy).
pub fn write(
    dir: &Path,
    state: &MachineState,
    ram: &[u8],
    layer: Layer<'_>,
) -> Result<WriteReport, SnapshotError> {
    if dir.exists() {
        return Err(SnapshotError::Exists(dir.to_path_buf()));
    }
    let page_count = ram.len() / PAGE_SIZE;
    let words = page_count.div_ceil(64);
    let (parent, mut present) = match layer {
        Layer::Full => {
            let mut bm = vec![0u64; words];
            for p in 0..page_count {
                if !is_zero(&ram[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]) {
                    bm[p / 64] |= 1 << (p % 64);
                }
            }
            (None, bm)
        }
        Layer::Incremental { parent, dirty } => {
            let parent =
                fs::canonicalize(parent).map_err(io("resolving parent snapshot", parent))?;
            read_meta(&parent)?;
            (Some(parent), dirty.to_vec())
        }
    };
    present.resize(words, 0);

    let tmp = dir.with_file_name(format!(
        ".{}.tmp-{}",
        dir.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    let result = write_files(&tmp, state, ram, parent, &present).and_then(|r| {
        fs::rename(&tmp, dir).map_err(io("renaming snapshot into place at", dir))?;
        Ok(r)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

fn write_files(
    dir: &Path,
    state: &MachineState,
    ram: &[u8],
    parent: Option<PathBuf>,
    present: &[u64],
) -> Result<WriteReport, SnapshotError> {
    fs::create_dir_all(dir).map_err(io("creating snapshot directory", dir))?;
    let state_bytes = state.encode().map_err(SnapshotError::Encode)?;
    write_file(&dir.join("state"), &state_bytes)?;
    let bitmap: Vec<u8> = present.iter().flat_map(|w| w.to_le_bytes()).collect();
    write_file(&dir.join("pages"), &bitmap)?;

    let mem_path = dir.join("memory");
    let mem = File::create(&mem_path).map_err(io("creating", &mem_path))?;
    mem.set_len(ram.len() as u64)
        .map_err(io("sizing", &mem_path))?;
    let mut pages = 0u64;
    // Write runs of consecutive pages with one call each.
    let mut run: Option<(usize, usize)> = None;
    let flush = |(start, end): (usize, usize)| {
        mem.write_all_at(
            &ram[start * PAGE_SIZE..end * PAGE_SIZE],
            (start * PAGE_SIZE) as u64,
        )
        .map_err(io("writing guest memory to", &mem_path))
    };
    for p in bitmap_pages(present) {
        if p * PAGE_SIZE >= ram.len() {
            break;
        }
        pages += 1;
        run = match run {
            Some((s, e)) if e == p => Some((s, p + 1)),
            Some(r) => {
                flush(r)?;
                Some((p, p + 1))
            }
            None => Some((p, p + 1)),
        };
    }
    if let Some(r) = run {
        flush(r)?;
    }
    mem.sync_all().map_err(io("syncing", &mem_path))?;

    let meta = SnapshotMeta {
        format: container::FORMAT_VERSION,
        parent,
        mem_size: ram.len() as u64,
        page_size: PAGE_SIZE as u64,
        pages,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        state_crc: container::crc64(&state_bytes),
        bitmap_crc: container::crc64(&bitmap),
    };
    let meta_bytes = container::encode(Kind::SnapshotMeta, &meta).map_err(SnapshotError::Encode)?;
    write_file(&dir.join("meta"), &meta_bytes)?;
    Ok(WriteReport {
        pages,
        bytes: pages * PAGE_SIZE as u64,
    })
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), SnapshotError> {
    let mut f = File::create(path).map_err(io("creating", path))?;
    f.write_all(data).map_err(io("writing", path))?;
    f.sync_all().map_err(io("syncing", path))
}

fn read_file(path: &Path, max: u64) -> Result<Vec<u8>, SnapshotError> {
    let f = File::open(path).map_err(io("opening", path))?;
    let len = f.metadata().map_err(io("reading the size of", path))?.len();
    if len > max {
        return Err(SnapshotError::Inconsistent {
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
pub fn read_meta(dir: &Path) -> Result<SnapshotMeta, SnapshotError> {
    let path = dir.join("meta");
    let data = read_file(&path, 1 << 20)?;
    let meta: SnapshotMeta =
        container::decode(&data, Kind::SnapshotMeta, 1 << 20).map_err(|source| {
            SnapshotError::Container {
                path: path.clone(),
                source,
            }
        })?;
    if meta.page_size != PAGE_SIZE as u64
        || meta.mem_size == 0
        || meta.mem_size % PAGE_SIZE as u64 != 0
    {
        return Err(SnapshotError::Inconsistent {
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
pub fn read_state(dir: &Path) -> Result<MachineState, SnapshotError> {
    let meta = read_meta(dir)?;
    let path = dir.join("state");
    let data = read_file(
        &path,
        container::DEFAULT_MAX_PAYLOAD + container::HEADER_LEN as u64,
    )?;
    if container::crc64(&data) != meta.state_crc {
        return Err(SnapshotError::Inconsistent {
            path,
            what: "state does not match the checksum in meta".into(),
        });
    }
    let state = MachineState::decode(&data).map_err(|source| SnapshotError::Container {
        path: path.clone(),
        source,
    })?;
    if state.config.mem_size != meta.mem_size {
        return Err(SnapshotError::Inconsistent {
            path,
            what: format!(
                "state says {} bytes of RAM, meta {}",
                state.config.mem_size, meta.mem_size
            ),
        });
    }
    Ok(state)
}

/// The chain of layers ending at `dir`, base first.
pub fn chain(dir: &Path) -> Result<Vec<(PathBuf, SnapshotMeta)>, SnapshotError> {
    let mut layers = Vec::new();
    let mut cur = Some(dir.to_path_buf());
    while let Some(d) = cur {
        if layers.len() >= MAX_CHAIN {
            return Err(SnapshotError::ChainTooLong(dir.to_path_buf()));
        }
        let meta = read_meta(&d)?;
        if let Some((_, child)) = layers.last() {
            let child: &SnapshotMeta = child;
            if child.mem_size != meta.mem_size {
                return Err(SnapshotError::Inconsistent {
                    path: d,
                    what: "parent has another memory size".into(),
                });
            }
        }
        cur = meta.parent.clone();
        layers.push((d, meta));
    }
    layers.reverse();
    Ok(layers)
}

/// Fills fresh guest memory from the chain ending at `dir`; returns the pages loaded.
pub fn load_memory(dir: &Path, memory: &Memory) -> Result<u64, SnapshotError> {
    let layers = chain(dir)?;
    let ram_len = memory.size() as usize;
    let ram_ptr = memory.host_address() as *mut u8;
    let mut loaded = 0u64;
    for (d, meta) in &layers {
        if meta.mem_size != memory.size() {
            return Err(SnapshotError::Inconsistent {
                path: d.clone(),
                what: format!(
                    "layer is for {} bytes of RAM, the VM has {}",
                    meta.mem_size,
                    memory.size()
                ),
            });
        }
        let bm_path = d.join("pages");
        let bitmap = read_file(&bm_path, meta.mem_size / PAGE_SIZE as u64 / 8 + 8)?;
        if container::crc64(&bitmap) != meta.bitmap_crc || bitmap.len() % 8 != 0 {
            return Err(SnapshotError::Inconsistent {
                path: bm_path,
                what: "page bitmap does not match meta".into(),
            });
        }
        let words: Vec<u64> = bitmap
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let mem_path = d.join("memory");
        let f = File::open(&mem_path).map_err(io("opening", &mem_path))?;
        let mut n = 0u64;
        for p in bitmap_pages(&words) {
            let off = p * PAGE_SIZE;
            if off + PAGE_SIZE > ram_len {
                return Err(SnapshotError::Inconsistent {
                    path: bm_path,
                    what: format!("page {p} is beyond RAM"),
                });
            }
            // SAFETY: `off..off + PAGE_SIZE` is inside the guest RAM mapping (checked
            // above); the VM is not running yet, so nothing else touches it.
            let page = unsafe { std::slice::from_raw_parts_mut(ram_ptr.add(off), PAGE_SIZE) };
            f.read_exact_at(page, off as u64)
                .map_err(io("reading guest memory from", &mem_path))?;
            n += 1;
        }
        if n != meta.pages {
            return Err(SnapshotError::Inconsistent {
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
            },
            devices: DeviceStates {
                serial: SerialDeviceState::default(),
                pci: crate::devices::pci::PciRoot::new().save_state(),
                net: None,
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

    fn fill(ram: &mut [u8], page: usize, v: u8) {
        ram[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].fill(v);
    }

    #[test]
    fn incremental_chain_restores_like_a_full_snapshot() {
        let tmp = tempdir();
        let size = 2 << 20;
        let pages = size / PAGE_SIZE;
        let mut ram = vec![0u8; size];
        fill(&mut ram, 3, 1);
        fill(&mut ram, 100, 2);
        let r = write(&tmp.join("a"), &state(size as u64), &ram, Layer::Full).unwrap();
        assert_eq!(r.pages, 2, "zero pages are not stored");
        // Epoch 2: page 3 changes, page 100 becomes zero, page 7 is new.
        fill(&mut ram, 3, 9);
        fill(&mut ram, 100, 0);
        fill(&mut ram, 7, 4);
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
            },
        )
        .unwrap();
        write(&tmp.join("full"), &state(size as u64), &ram, Layer::Full).unwrap();
        assert_eq!(chain(&b).unwrap().len(), 2);

        let from_chain = Memory::new(size as u64).unwrap();
        load_memory(&b, &from_chain).unwrap();
        let from_full = Memory::new(size as u64).unwrap();
        load_memory(&tmp.join("full"), &from_full).unwrap();
        assert_eq!(from_chain.as_slice(), &ram[..]);
        assert_eq!(from_full.as_slice(), from_chain.as_slice());
        assert_eq!(read_state(&b).unwrap().config.mem_size, size as u64);
        assert!(matches!(
            write(&b, &state(size as u64), &ram, Layer::Full),
            Err(SnapshotError::Exists(_))
        ));
    }

    #[test]
    fn corrupt_files_are_refused() {
        let tmp = tempdir();
        let size = 2 << 20;
        let mut ram = vec![0u8; size];
        fill(&mut ram, 1, 1);
        let d = tmp.join("s");
        write(&d, &state(size as u64), &ram, Layer::Full).unwrap();
        let mem = Memory::new(size as u64).unwrap();

        let mut st = fs::read(d.join("state")).unwrap();
        st[40] ^= 1;
        fs::write(d.join("state"), &st).unwrap();
        assert!(matches!(
            read_state(&d),
            Err(SnapshotError::Inconsistent { .. })
        ));

        let mut bm = fs::read(d.join("pages")).unwrap();
        bm[0] ^= 0x80;
        fs::write(d.join("pages"), &bm).unwrap();
        assert!(matches!(
            load_memory(&d, &mem),
            Err(SnapshotError::Inconsistent { .. })
        ));

        let meta = fs::read(d.join("meta")).unwrap();
        fs::write(d.join("meta"), &meta[..meta.len() - 3]).unwrap();
        assert!(matches!(
            read_meta(&d),
            Err(SnapshotError::Container { .. })
        ));
        fs::remove_file(d.join("meta")).unwrap();
        assert!(matches!(read_meta(&d), Err(SnapshotError::Io { .. })));

        let other = Memory::new(4 << 20).unwrap();
        let d2 = tmp.join("t");
        write(&d2, &state(size as u64), &ram, Layer::Full).unwrap();
        assert!(matches!(
            load_memory(&d2, &other),
            Err(SnapshotError::Inconsistent { .. })
        ));
    }

    #[test]
    fn a_failed_write_leaves_no_directory() {
        let tmp = tempdir();
        // A file where the parent directory should be makes creation fail midway.
        fs::write(tmp.join("blocker"), b"x").unwrap();
        let d = tmp.join("blocker").join("snap");
        let ram = vec![0u8; 2 << 20];
        assert!(write(&d, &state(2 << 20), &ram, Layer::Full).is_err());
        assert!(!d.exists());
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
