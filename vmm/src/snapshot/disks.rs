//! The disks of a snapshot layer, beside its memory.
//!
//! For disk `i` a layer holds `disk-<i>`, a sparse file the size of the disk:
//! - a **full** layer: a copy of the whole image (only its data extents are read and
//!   written: holes stay holes, so a mostly empty 8 GiB disk costs what it holds);
//! - an **incremental** layer: the blocks ([`TRACK_BLOCK`]) written since the parent, at
//!   their offsets, and `disk-<i>.blocks`, the bitmap (u64 LE words) of which blocks those
//!   are. A block in the bitmap that reads as zeroes was zeroed (discarded): restoring
//!   makes it a hole.
//!
//! Restoring builds a new image from the chain (base copy, then each increment's blocks),
//! never in place: the snapshot stays as it was, and so does any image already at the
//! target path (refused).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::layer::{LayerError, SnapshotMeta};
use crate::container;
use crate::devices::virtio::blk::disk::{self, DiskImage, TRACK_BLOCK};

/// What a layer holds of one disk (in its `meta`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerDisk {
    /// Bytes of the disk.
    pub capacity: u64,
    /// A whole copy (base layer) rather than the blocks written since the parent.
    pub full: bool,
    /// Blocks stored (incremental) or bytes of data copied (full).
    pub stored: u64,
    /// CRC-64 of `disk-<i>.blocks` (incremental; 0 for a full layer).
    pub bitmap_crc: u64,
}

/// One disk as a snapshot takes it: the image and, for an increment, its blocks written
/// since the parent.
pub struct DiskSource<'a> {
    pub image: &'a DiskImage,
    /// `None`: copy it whole.
    pub dirty: Option<&'a [u64]>,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LayerError {
    let path = path.to_path_buf();
    move |source| LayerError::Io { op, path, source }
}

fn data_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("disk-{i}"))
}

fn bitmap_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("disk-{i}.blocks"))
}

fn blocks(bitmap: &[u64]) -> impl Iterator<Item = u64> + '_ {
    crate::bitmap_pages(bitmap).map(|b| b as u64)
}

/// Writes the disks' part of a layer into `dir` (being created); what `meta` records.
pub fn write(dir: &Path, disks: &[DiskSource<'_>]) -> Result<Vec<LayerDisk>, LayerError> {
    let mut out = Vec::with_capacity(disks.len());
    for (i, d) in disks.iter().enumerate() {
        let path = data_path(dir, i);
        let dst = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io("creating", &path))?;
        let cap = d.image.capacity();
        let entry = match d.dirty {
            None => {
                let copied = disk::copy_sparse(d.image.file(), &dst, cap)
                    .map_err(io("copying the disk image into", &path))?;
                LayerDisk {
                    capacity: cap,
                    full: true,
                    stored: copied,
                    bitmap_crc: 0,
                }
            }
            Some(bitmap) => {
                let mut buf = vec![0u8; TRACK_BLOCK as usize];
                let mut n = 0u64;
                for b in blocks(bitmap) {
                    let at = b * TRACK_BLOCK;
                    if at >= cap {
                        break;
                    }
                    let len = TRACK_BLOCK.min(cap - at) as usize;
                    d.image
                        .read_at(&mut buf[..len], at)
                        .map_err(io("reading the disk image for", &path))?;
                    if buf[..len].iter().any(|&x| x != 0) {
                        dst.write_all_at(&buf[..len], at)
                            .map_err(io("writing disk blocks to", &path))?;
                    }
                    n += 1;
                }
                dst.set_len(cap).map_err(io("sizing", &path))?;
                let bytes: Vec<u8> = bitmap.iter().flat_map(|w| w.to_le_bytes()).collect();
                let bpath = bitmap_path(dir, i);
                std::fs::write(&bpath, &bytes).map_err(io("writing", &bpath))?;
                File::open(&bpath)
                    .and_then(|f| f.sync_all())
                    .map_err(io("syncing", &bpath))?;
                LayerDisk {
                    capacity: cap,
                    full: false,
                    stored: n,
                    bitmap_crc: container::crc64(&bytes),
                }
            }
        };
        dst.sync_all().map_err(io("syncing", &path))?;
        out.push(entry);
    }
    Ok(out)
}

/// Builds disk images at `targets` (which must not exist) from a chain of layers (base
/// first, as [`super::chain`] returns it) and opens them, read-only where `read_only`
/// says. A failure removes what it created.
pub fn restore(
    layers: &[(PathBuf, SnapshotMeta)],
    targets: &[PathBuf],
    read_only: &[bool],
) -> Result<Vec<Arc<DiskImage>>, LayerError> {
    let Some((base_dir, base)) = layers.first() else {
        return Ok(Vec::new());
    };
    if targets.len() != base.disks.len() {
        return Err(LayerError::Inconsistent {
            path: base_dir.clone(),
            what: format!(
                "the snapshot has {} disks, {} images were named for them (--disk)",
                base.disks.len(),
                targets.len()
            ),
        });
    }
    build_images(targets, read_only, |i, dst, target| {
        restore_one(layers, i, dst, target)
    })
}

/// Creates the disk images `targets` (which must not exist), has `fill` write image `i`,
/// syncs and opens them, read-only where `read_only` says. A failure removes every image
/// it created: nothing half-written is left that looks like a restored disk.
pub fn build_images(
    targets: &[PathBuf],
    read_only: &[bool],
    mut fill: impl FnMut(usize, &File, &Path) -> Result<(), LayerError>,
) -> Result<Vec<Arc<DiskImage>>, LayerError> {
    let mut created = Vec::new();
    let r: Result<Vec<Arc<DiskImage>>, LayerError> = (|| {
        for (i, target) in targets.iter().enumerate() {
            let dst = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(target)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => LayerError::Target {
                        dir: target.clone(),
                        why: "a disk image is already there; a restore writes a new one".into(),
                    },
                    _ => io("creating the restored disk", target)(e),
                })?;
            created.push(target.clone());
            fill(i, &dst, target)?;
            dst.sync_all().map_err(io("syncing", target))?;
        }
        targets
            .iter()
            .zip(read_only)
            .map(|(t, &ro)| {
                DiskImage::open(t, ro)
                    .map(Arc::new)
                    .map_err(|e| LayerError::Inconsistent {
                        path: t.clone(),
                        what: format!("the restored disk does not open: {e}"),
                    })
            })
            .collect()
    })();
    if r.is_err() {
        for t in created {
            let _ = std::fs::remove_file(t);
        }
    }
    r
}

fn restore_one(
    layers: &[(PathBuf, SnapshotMeta)],
    i: usize,
    dst: &File,
    target: &Path,
) -> Result<(), LayerError> {
    let cap = layers[0].1.disks[i].capacity;
    for (n, (dir, meta)) in layers.iter().enumerate() {
        let Some(ld) = meta.disks.get(i) else {
            return Err(LayerError::Inconsistent {
                path: dir.clone(),
                what: format!("layer has no disk {i}"),
            });
        };
        if ld.capacity != cap || ld.full != (n == 0) {
            return Err(LayerError::Inconsistent {
                path: dir.clone(),
                what: format!(
                    "disk {i} is {} bytes ({}), the base's {cap}",
                    ld.capacity,
                    if ld.full { "full" } else { "incremental" }
                ),
            });
        }
        let path = data_path(dir, i);
        let src = File::open(&path).map_err(io("opening", &path))?;
        if ld.full {
            disk::copy_sparse(&src, dst, cap).map_err(io("copying the disk from", &path))?;
            continue;
        }
        let bpath = bitmap_path(dir, i);
        let bytes = std::fs::read(&bpath).map_err(io("reading", &bpath))?;
        let words = cap.div_ceil(TRACK_BLOCK).div_ceil(64) as usize;
        if container::crc64(&bytes) != ld.bitmap_crc || bytes.len() != words * 8 {
            return Err(LayerError::Inconsistent {
                path: bpath,
                what: "the disk's block bitmap does not match meta".into(),
            });
        }
        let bitmap: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let mut buf = vec![0u8; TRACK_BLOCK as usize];
        for b in blocks(&bitmap) {
            let at = b * TRACK_BLOCK;
            if at >= cap {
                break;
            }
            let len = TRACK_BLOCK.min(cap - at) as usize;
            src.read_exact_at(&mut buf[..len], at)
                .map_err(io("reading disk blocks from", &path))?;
            if buf[..len].iter().all(|&x| x == 0) {
                disk::zero_range(dst, at, len as u64)
            } else {
                dst.write_all_at(&buf[..len], at)
            }
            .map_err(io("writing the restored disk", target))?;
        }
    }
    Ok(())
}
