//! Snapshots of a running VM: [`Vmm::snapshot`] freezes the VM, captures its state,
//! harvests its dirty pages and writes one layer; `layer.rs` is the directory format, the
//! chains of layers and their checks.
//!
//! A snapshot changes nothing when it fails. What can be known to fail is checked before
//! the VM is paused: the target, and for an increment its parent (still the layer this VMM
//! wrote last). A failure after the harvest gives the harvested pages back to the dirty
//! tracking (the next increment on the previous layer holds them and still chains), and
//! tracking started for a failed first snapshot is stopped again.

mod disks;
mod layer;
mod source;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use disks::{build_images, DiskSource, LayerDisk};
pub use layer::{
    chain, check_target, load_memory, read_meta, read_state, write, write_with_disks, Layer,
    LayerError, LayerId, SnapshotMeta, WriteReport, MAX_CHAIN, SNAPSHOT_FORMAT,
};
pub use source::{
    clone_base, read_first_touches, write_first_touches, ChainSource, CloneBase, FIRST_TOUCH_FILE,
};

/// Builds the disk images a VM restored from the chain ending at `dir` runs on, at
/// `targets` (new files, one per disk of the snapshot, in order), and opens them as the
/// snapshot's machine state says (read-only or not).
pub fn restore_disks(
    dir: &Path,
    targets: &[PathBuf],
) -> Result<Vec<std::sync::Arc<crate::devices::virtio::blk::disk::DiskImage>>, LayerError> {
    let state = read_state(dir)?;
    let ro: Vec<bool> = state.config.disks.iter().map(|d| d.read_only).collect();
    let layers = chain(dir)?;
    if ro.len() != targets.len() {
        return Err(LayerError::Inconsistent {
            path: dir.to_path_buf(),
            what: format!(
                "the snapshot's VM has {} disks, {} images were named for them (--disk)",
                ro.len(),
                targets.len()
            ),
        });
    }
    disks::restore(&layers, targets, &ro)
}

use crate::checkpoint::Frozen;
use crate::{describe_error, TrackingSpan, Vmm, VmmError};

/// How to take a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Store only the pages written since the previous snapshot this VMM took, as a layer
    /// on top of it.
    pub incremental: bool,
    /// Leave the VM paused afterwards, devices included (to move it elsewhere).
    pub stop: bool,
}

/// What a snapshot wrote.
#[derive(Clone, Debug)]
pub struct SnapshotReport {
    /// Pages stored in the layer.
    pub pages: u64,
    pub bytes: u64,
    pub layer_id: LayerId,
    pub parent_id: Option<LayerId>,
    /// The dirty-tracking generations the layer covers.
    pub tracking: TrackingSpan,
    /// How long the VM stood still for it (from the pause to the end of the write).
    pub paused: Duration,
}

/// The latest layer this VMM wrote: where, and which layer it is (a directory replaced
/// since by another snapshot is not the parent the dirty tracking continues).
#[derive(Clone, Debug)]
pub(crate) struct LastLayer {
    dir: PathBuf,
    id: LayerId,
}

/// Why a snapshot was not taken. Those before [`SnapshotError::Capture`] are refusals made
/// before the VM was touched.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("no earlier snapshot of this VM process to be incremental on")]
    NoParent,
    #[error("dirty tracking is off; take a full snapshot first")]
    TrackingOff,
    #[error("refusing the snapshot")]
    Refused(#[source] LayerError),
    #[error(
        "the previous snapshot {} (the parent of an incremental one) is unusable",
        dir.display()
    )]
    ParentUnusable {
        dir: PathBuf,
        #[source]
        source: LayerError,
    },
    #[error(
        "the previous snapshot {} was replaced (it is layer {found}, this process wrote \
         {wrote}); take a full snapshot",
        dir.display()
    )]
    ParentReplaced {
        dir: PathBuf,
        found: LayerId,
        wrote: LayerId,
    },
    #[error("pausing the VM's devices")]
    PauseDevices(#[source] VmmError),
    #[error("capturing VM state")]
    Capture(#[source] VmmError),
    #[error("starting dirty tracking")]
    StartTracking(#[source] VmmError),
    #[error("writing snapshot {}", dir.display())]
    Write {
        dir: PathBuf,
        #[source]
        source: LayerError,
    },
}

impl Vmm {
    /// Snapshots the VM into `dir`, which must not exist: a full layer (every non-zero
    /// page; the first snapshot also starts dirty tracking) or, with `incremental`, the
    /// pages written since the previous snapshot of this VMM, on top of it. The VM is
    /// frozen while the layer is written, then runs again unless `stop` (or it was
    /// paused already). A failure leaves the VM and its dirty tracking as they were (see
    /// the module docs).
    pub fn snapshot(
        &mut self,
        dir: &Path,
        opts: SnapshotOptions,
    ) -> Result<SnapshotReport, SnapshotError> {
        // Everything that can be known to fail is checked before the VM is touched: a
        // refusal here leaves it running and its dirty tracking as it was.
        let parent = match (opts.incremental, &self.last_snapshot) {
            (true, Some(p)) => Some(p),
            (true, None) => return Err(SnapshotError::NoParent),
            (false, _) => None,
        };
        if parent.is_some() && !self.vm.dirty_logging() {
            return Err(SnapshotError::TrackingOff);
        }
        check_target(dir).map_err(SnapshotError::Refused)?;
        if let Some(p) = parent {
            let meta = read_meta(&p.dir).map_err(|source| SnapshotError::ParentUnusable {
                dir: p.dir.clone(),
                source,
            })?;
            if meta.layer_id != p.id {
                return Err(SnapshotError::ParentReplaced {
                    dir: p.dir.clone(),
                    found: meta.layer_id,
                    wrote: p.id,
                });
            }
        }
        let parent = parent.map(|p| p.dir.clone());

        let t0 = Instant::now();
        let was_stopped = self.is_paused();
        self.pause();
        if opts.stop {
            // Before the freeze: once its locks are released no queued frame may slip in.
            if let Err(e) = self.pause_devices() {
                if !was_stopped {
                    self.resume();
                }
                return Err(SnapshotError::PauseDevices(e));
            }
        }
        // Frozen: vCPUs paused and device workers locked out, so the memory written
        // matches the state. With tracking on, the harvest makes this snapshot the base of
        // the next increment; a first snapshot starts tracking instead.
        let tracking = self.vm.dirty_logging();
        let result = self.frozen(|fz| write_layer(fz, dir, parent.as_deref(), tracking));
        let paused = t0.elapsed();
        if (!opts.stop || result.is_err()) && !was_stopped {
            if let Err(e) = self.resume_devices() {
                tracing::warn!("{}", describe_error(&e));
            }
            self.resume();
        }
        let written = result?;
        self.last_snapshot = Some(LastLayer {
            dir: std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()),
            id: written.layer_id,
        });
        tracing::info!(dir = %dir.display(), pages = written.pages, layer = %written.layer_id, paused_ms = paused.as_millis() as u64, "snapshot written");
        Ok(SnapshotReport {
            pages: written.pages,
            bytes: written.bytes,
            layer_id: written.layer_id,
            parent_id: written.parent_id,
            tracking: written.tracking,
            paused,
        })
    }
}

/// Captures the frozen VM and writes its layer into `dir`: an increment on `parent` with
/// the pages harvested now, or a full layer. A failure gives the harvested pages back and
/// stops tracking started for this layer only.
fn write_layer(
    fz: &Frozen<'_>,
    dir: &Path,
    parent: Option<&Path>,
    tracking: bool,
) -> Result<WriteReport, SnapshotError> {
    let (state, harvest) = if tracking {
        let cp = fz.checkpoint(false).map_err(SnapshotError::Capture)?;
        (cp.state, Some((cp.dirty, cp.tracking)))
    } else {
        (fz.capture().map_err(SnapshotError::Capture)?, None)
    };
    // The disks' blocks written since the previous layer: an increment stores them; a
    // full layer copies the disks whole, and takes them only so that the next increment
    // counts from here (a failure gives them back). The first snapshot starts tracking.
    let logs = fz.disk_logs();
    let images = fz.disk_images();
    let mut started_disk_tracking = Vec::new();
    let disk_dirty: Vec<Option<Vec<u64>>> = logs
        .iter()
        .map(|l| {
            let taken = l.take_dirty();
            if taken.is_none() {
                l.start_tracking();
                started_disk_tracking.push(l.clone());
            }
            taken
        })
        .collect();
    if parent.is_some() && !started_disk_tracking.is_empty() {
        for l in &started_disk_tracking {
            l.stop_tracking();
        }
        for (l, d) in logs.iter().zip(&disk_dirty) {
            if let Some(d) = d {
                l.merge_dirty(d);
            }
        }
        return Err(SnapshotError::TrackingOff);
    }
    let sources: Vec<DiskSource<'_>> = images
        .iter()
        .zip(&disk_dirty)
        .map(|(image, dirty)| DiskSource {
            image,
            dirty: dirty.as_deref().filter(|_| parent.is_some()),
        })
        .collect();
    let mut started_tracking = false;
    let written = (|| {
        let layer = match (parent, &harvest) {
            (Some(p), Some((dirty, span))) => Layer::Incremental {
                parent: p,
                dirty,
                tracking: *span,
            },
            (Some(_), None) => return Err(SnapshotError::TrackingOff),
            (None, Some((_, span))) => Layer::Full { tracking: span.to },
            (None, None) => {
                let from = fz
                    .start_dirty_tracking()
                    .map_err(SnapshotError::StartTracking)?;
                started_tracking = true;
                Layer::Full { tracking: from }
            }
        };
        write_with_disks(dir, &state, fz.memory(), layer, &sources).map_err(|source| {
            SnapshotError::Write {
                dir: dir.to_path_buf(),
                source,
            }
        })
    })();
    if let Err(e) = &written {
        // The disks' blocks go back too, and tracking started for this snapshot stops.
        for (l, d) in logs.iter().zip(&disk_dirty) {
            if let Some(d) = d {
                l.merge_dirty(d);
            }
        }
        for l in &started_disk_tracking {
            l.stop_tracking();
        }
        // The harvested pages are still owed to the layer the next increment is taken on
        // (the previous snapshot): give them back. And tracking started for this snapshot
        // only is stopped again.
        if let Some((dirty, span)) = &harvest {
            let rejoined = fz.restore_dirty(dirty, *span);
            tracing::warn!(
                error = %describe_error(e),
                pages = dirty.iter().map(|w| w.count_ones() as u64).sum::<u64>(),
                rejoined,
                "snapshot failed; its harvested dirty pages go to the next one"
            );
        }
        if started_tracking {
            if let Err(e) = fz.stop_dirty_tracking() {
                tracing::warn!(error = %e, "could not stop the dirty tracking started for the failed snapshot");
            }
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Memory, PAGE_SIZE};
    use crate::{HostResources, MachineConfig};
    use std::fs;
    use vm_memory::{Bytes, GuestAddress};

    const MEM: u64 = 4 << 20;

    /// A VM without NIC or guest, its vCPU parked before its first instruction: enough to
    /// freeze, capture and harvest (the pages come from the VMM's own writes).
    fn paused_vmm() -> Vmm {
        let config = MachineConfig {
            mem_size: MEM,
            vcpus: 1,
            mac: None,
            ip: None,
            disks: vec![],
        };
        let host = HostResources {
            tap: None,
            console: Box::new(std::io::sink()),
            disks: vec![],
        };
        let mut vmm = Vmm::build(config, Memory::new(MEM).unwrap(), host, None)
            .expect("a KVM VM (needs /dev/kvm)");
        vmm.start_paused().unwrap();
        vmm
    }

    fn write_page(vmm: &Vmm, page: u64, v: u8) {
        vmm.memory()
            .guest_memory()
            .write_slice(&[v; PAGE_SIZE], GuestAddress(page * PAGE_SIZE as u64))
            .unwrap();
    }

    fn layer_pages(dir: &Path) -> Vec<usize> {
        let b = fs::read(dir.join("pages")).unwrap();
        let words: Vec<u64> = b
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        crate::bitmap_pages(&words).collect()
    }

    fn tempdir() -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "twin-vmm-snap-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    const FULL: SnapshotOptions = SnapshotOptions {
        incremental: false,
        stop: false,
    };
    const INCREMENTAL: SnapshotOptions = SnapshotOptions {
        incremental: true,
        stop: false,
    };

    #[test]
    fn refusals_come_before_the_vm_is_touched() {
        let tmp = tempdir();
        let mut vmm = paused_vmm();
        let e = vmm.snapshot(&tmp.join("inc"), INCREMENTAL).unwrap_err();
        assert!(matches!(e, SnapshotError::NoParent), "{e}");
        fs::create_dir(tmp.join("there")).unwrap();
        let e = vmm.snapshot(&tmp.join("there"), FULL).unwrap_err();
        assert!(
            matches!(e, SnapshotError::Refused(LayerError::Exists(_))),
            "{e}"
        );
        assert_eq!(
            describe_error(&e),
            format!(
                "refusing the snapshot: snapshot {} already exists",
                tmp.join("there").display()
            )
        );
        assert!(!vmm.vm().dirty_logging(), "no refusal started tracking");
        // A parent replaced since this VMM wrote it.
        let a = tmp.join("a");
        vmm.snapshot(&a, FULL).unwrap();
        assert!(
            vmm.vm().dirty_logging(),
            "the first snapshot starts tracking"
        );
        fs::rename(&a, tmp.join("a-old")).unwrap();
        // Another full layer at the same path (frozen in place: this vCPU must never run).
        let state = vmm.frozen(|fz| fz.capture()).unwrap();
        write(&a, &state, vmm.memory(), Layer::Full { tracking: 1 }).unwrap();
        let e = vmm.snapshot(&tmp.join("b"), INCREMENTAL).unwrap_err();
        assert!(matches!(e, SnapshotError::ParentReplaced { .. }), "{e}");
        assert!(!tmp.join("b").exists());
    }

    /// A write that fails after the harvest gives the harvested pages back: the next
    /// increment on the same parent holds them and chains; a first snapshot that fails
    /// stops the tracking it started.
    #[test]
    fn a_failed_snapshot_changes_nothing() {
        let tmp = tempdir();
        let mut vmm = paused_vmm();
        let squat = |name: &str| {
            let p = tmp.join(format!(".{name}.tmp-{}", std::process::id()));
            fs::write(&p, b"x").unwrap();
            p
        };
        let s = squat("a");
        let e = vmm.snapshot(&tmp.join("a"), FULL).unwrap_err();
        assert!(matches!(e, SnapshotError::Write { .. }), "{e}");
        assert!(
            !vmm.vm().dirty_logging(),
            "tracking started for it is off again"
        );
        fs::remove_file(s).unwrap();

        write_page(&vmm, 3, 1);
        let a = tmp.join("a");
        let ra = vmm.snapshot(&a, FULL).unwrap();
        assert_eq!((ra.parent_id, ra.tracking.from), (None, ra.tracking.to));
        assert_eq!(
            layer_pages(&a),
            vec![3],
            "a full layer stores the non-zero pages"
        );

        write_page(&vmm, 5, 2);
        let s = squat("b");
        let e = vmm.snapshot(&tmp.join("b"), INCREMENTAL).unwrap_err();
        assert!(matches!(e, SnapshotError::Write { .. }), "{e}");
        assert!(!tmp.join("b").exists());
        fs::remove_file(s).unwrap();

        write_page(&vmm, 7, 3);
        let b = tmp.join("b");
        let rb = vmm.snapshot(&b, INCREMENTAL).unwrap();
        assert_eq!(rb.parent_id, Some(ra.layer_id));
        assert_eq!(rb.tracking.from, ra.tracking.to, "the chain still adds up");
        assert_eq!(
            layer_pages(&b),
            vec![5, 7],
            "the failed increment's page is not lost"
        );
        assert_eq!(chain(&b).unwrap().len(), 2);
        let restored = Memory::new(MEM).unwrap();
        load_memory(&b, &restored).unwrap();
        assert!(restored.to_vec() == vmm.memory().to_vec());
        assert!(vmm.is_paused(), "a VM paused before stays paused");
    }
}
