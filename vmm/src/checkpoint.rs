//! Checkpoints: the VM frozen, its state captured, the pages written since the last
//! harvest taken.
//!
//! *Frozen* means the vCPUs are paused and every device lock is held: device workers (the
//! virtio-net RX thread) write guest memory only under their lock, so guest memory and
//! device state stand still, and a state captured then matches the memory read then. Every
//! capture goes through [`Vmm::frozen`]; every harvest of the dirty logs (a checkpoint's,
//! a snapshot's, a live sync round's) through one function, `Vmm::harvest`, which also
//! bumps the tracking generation (see [`crate::dirty`]).

use std::sync::MutexGuard;
use std::time::Instant;

use crate::devices::pci::{PciError, PciRoot};
use crate::devices::serial::{SerialDevice, SerialError};
use crate::devices::virtio::blk::disk::DiskWrite;
use crate::devices::virtio::blk::{BlkError, VirtioBlk};
use crate::devices::virtio::net::{NetError, VirtioNet};
use crate::devices::virtio::pci::VirtioPersistError;
use crate::memory::{Memory, PAGE_SIZE};
use crate::{bitmap_pages, DeviceStates, MachineState, TrackingSpan, Vmm, VmmError};
use twin_devices::Persist;

/// A device of the VM that failed to save (here) or restore (in the builder), by name,
/// with its own typed error.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("serial port (COM1)")]
    Serial(#[source] SerialError),
    #[error("PCI root")]
    PciRoot(#[source] PciError),
    #[error("virtio-net")]
    Net(#[source] VirtioPersistError<NetError>),
    #[error("virtio-blk of disk {index}")]
    Disk {
        index: usize,
        #[source]
        source: VirtioPersistError<BlkError>,
    },
}

/// Time spent in each phase of one checkpoint.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CheckpointTimings {
    /// From the pause request until every vCPU is parked.
    pub stop_ns: u64,
    pub device_state_ns: u64,
    pub kvm_state_ns: u64,
    pub harvest_ns: u64,
    pub copy_ns: u64,
    /// From the pause request until the vCPUs run again: the guest-visible pause.
    pub pause_ns: u64,
    /// The pre-copy before the pause (0: none), and how many pages it copied.
    pub precopy_ns: u64,
    pub precopied_pages: u64,
}

/// Pages harvested and copied while the guest ran; see [`Vmm::precopy`].
pub struct PreCopy {
    dirty: Vec<u64>,
    pages: Vec<u8>,
    tracking: TrackingSpan,
    ns: u64,
}

/// The union of two harvests `a` then `b` (bitmaps and their pages in bitmap order), a page
/// in both taken from `b`, the later copy.
fn merge_pages(a: &[u64], a_pages: &[u8], b: &[u64], b_pages: &[u8]) -> (Vec<u64>, Vec<u8>) {
    let words = a.len().max(b.len());
    let word = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    let union: Vec<u64> = (0..words).map(|i| word(a, i) | word(b, i)).collect();
    let count = union.iter().map(|w| w.count_ones() as usize).sum::<usize>();
    let mut out = Vec::with_capacity(count * PAGE_SIZE);
    let (mut ia, mut ib) = (0usize, 0usize);
    for p in bitmap_pages(&union) {
        let bit = |v: &[u64]| word(v, p / 64) >> (p % 64) & 1 == 1;
        let (in_a, in_b) = (bit(a), bit(b));
        if in_b {
            out.extend_from_slice(&b_pages[ib * PAGE_SIZE..(ib + 1) * PAGE_SIZE]);
        } else {
            out.extend_from_slice(&a_pages[ia * PAGE_SIZE..(ia + 1) * PAGE_SIZE]);
        }
        ia += in_a as usize;
        ib += in_b as usize;
    }
    (union, out)
}

/// One checkpoint: the machine state and the pages written since the previous one.
pub struct Checkpoint {
    pub state: MachineState,
    /// Dirty-page bitmap (KVM's log OR the VMM's), one bit per page.
    pub dirty: Vec<u64>,
    /// Contents of the dirty pages, in bitmap order, `PAGE_SIZE` bytes each.
    pub pages: Vec<u8>,
    /// The tracking generations `dirty` covers (see [`crate::dirty`]).
    pub tracking: TrackingSpan,
    /// Per disk, the writes that reached its image since the previous checkpoint, in
    /// order (empty unless [`Vmm::start_disk_journal`]): every write whose completion
    /// `state` shows is here or in an earlier checkpoint's.
    pub disk_writes: Vec<Vec<DiskWrite>>,
    pub timings: CheckpointTimings,
}

impl Checkpoint {
    /// Indices of the dirty pages, ascending.
    pub fn dirty_pages(&self) -> impl Iterator<Item = usize> + '_ {
        bitmap_pages(&self.dirty)
    }
}

/// What one harvest took: the pages written since the previous one and, if asked for,
/// their contents.
struct Harvest {
    dirty: Vec<u64>,
    tracking: TrackingSpan,
    /// The dirty pages' contents in bitmap order (empty unless copied).
    pages: Vec<u8>,
    harvest_ns: u64,
    copy_ns: u64,
}

impl Vmm {
    /// Runs `f` on the VM frozen: the caller has paused the vCPUs, and every device lock
    /// is held for the whole of `f`, so no device worker writes guest memory meanwhile. A
    /// snapshot writes memory from here; state captured here matches that memory.
    pub fn frozen<R>(&self, f: impl FnOnce(&Frozen<'_>) -> R) -> R {
        debug_assert!(self.is_paused(), "freeze only a paused VM");
        let frozen = Frozen {
            vmm: self,
            locked: self.lock_devices(),
        };
        f(&frozen)
    }

    /// Pauses the vCPUs, runs `f` on the VM frozen, unfreezes and resumes: the guest stands
    /// still for exactly `f`. Returns `f`'s result, when the pause was requested, and how
    /// long the vCPUs took to stop.
    fn pause_frozen<R>(&self, f: impl FnOnce(&Frozen<'_>) -> R) -> (R, Instant, u64) {
        let t0 = Instant::now();
        self.pause();
        let stop_ns = t0.elapsed().as_nanos() as u64;
        let r = self.frozen(f);
        self.resume();
        (r, t0, stop_ns)
    }

    /// Holds every device lock (see the module docs).
    fn lock_devices(&self) -> LockedDevices<'_> {
        // Same order as a vCPU's config-space access: PCI root, then the device.
        let pci = self.pci.lock().expect("PCI root lock poisoned");
        let net = self
            .net
            .as_ref()
            .map(|n| n.dev.lock().expect("net device lock poisoned"));
        let disks = self
            .disks
            .iter()
            .map(|d| d.dev.lock().expect("disk device lock poisoned"))
            .collect();
        let serial = self.serial.lock().expect("serial lock poisoned");
        LockedDevices {
            net,
            disks,
            pci,
            serial,
        }
    }

    /// Pauses the VM, captures its whole state, resumes it. No pages.
    pub fn capture_state(&self) -> Result<MachineState, VmmError> {
        self.pause_frozen(|fz| fz.capture()).0
    }

    /// Pages written since the previous harvest (KVM's log OR the VMM's bitmap), read while
    /// the guest runs: for the rounds of a live initial sync, where a page written again
    /// after being read is caught by the next round.
    pub fn harvest_dirty(&self) -> Result<Vec<u64>, VmmError> {
        Ok(self.harvest(false)?.dirty)
    }

    /// Starts dirty-page tracking: KVM's log on, both logs cleared. The next checkpoint
    /// returns the pages written from now on.
    pub fn start_dirty_tracking(&self) -> Result<(), VmmError> {
        self.dirty.start(&self.vm, &self.memory)?;
        Ok(())
    }

    /// Gives back the pages of a harvest whose consumer failed (`dirty` and `span` of a
    /// [`Checkpoint`]): the next harvest returns them again, so nothing written before the
    /// failure is missing from the next checkpoint or increment. True if the tracking is
    /// then as if the harvest had not happened (no other harvest since); false if another
    /// harvest came in between, whose span the next one cannot reach back over (see
    /// [`crate::dirty`]). Safe while the guest runs.
    pub fn restore_dirty(&self, dirty: &[u64], span: TrackingSpan) -> bool {
        self.dirty.merge_back(&self.memory, dirty, span)
    }

    /// One epoch checkpoint: pause, capture device + KVM state, harvest the dirty pages
    /// (KVM's log OR the VMM's own bitmap) and copy them, resume. With `copy_pages` false
    /// only the bitmap is returned (the caller reads memory itself while the VM stays
    /// paused, e.g. for a snapshot that keeps the VM stopped).
    pub fn checkpoint(&self, copy_pages: bool) -> Result<Checkpoint, VmmError> {
        self.checkpoint_sealed(copy_pages, || ())
    }

    /// [`Vmm::checkpoint`], calling `seal` while the vCPUs are paused and the devices
    /// locked: the point where the guest's output of this epoch is exactly what it has
    /// transmitted so far (the output-commit buffer closes the epoch there).
    pub fn checkpoint_sealed(
        &self,
        copy_pages: bool,
        seal: impl FnOnce(),
    ) -> Result<Checkpoint, VmmError> {
        let (r, t0, stop_ns) = self.pause_frozen(|fz| {
            seal();
            fz.checkpoint(copy_pages)
        });
        let mut cp = r?;
        cp.timings.stop_ns = stop_ns;
        cp.timings.pause_ns = t0.elapsed().as_nanos() as u64;
        Ok(cp)
    }

    /// Pre-copy: harvests and copies the pages written so far *while the guest runs*, so
    /// that the pause of the checkpoint that follows ([`Vmm::checkpoint_precopied`]) copies
    /// only what the guest writes from now until then. A page torn by a write during its
    /// copy is dirty again and taken again in the pause: the checkpoint still holds every
    /// page as it was at the pause.
    pub fn precopy(&self) -> Result<PreCopy, VmmError> {
        let t = Instant::now();
        let h = self.harvest(true)?;
        Ok(PreCopy {
            dirty: h.dirty,
            pages: h.pages,
            tracking: h.tracking,
            ns: t.elapsed().as_nanos() as u64,
        })
    }

    /// [`Vmm::checkpoint_sealed`] completing a [`PreCopy`]: the pause harvests and copies
    /// the pages written since it, and the checkpoint holds the union — a page copied in
    /// both from the pause's copy — with one tracking span over both harvests. The merge
    /// runs after the vCPUs resume. If the checkpoint fails, the pre-copy's pages are
    /// given back to the tracking, as a failed harvest's are.
    pub fn checkpoint_precopied(
        &self,
        pre: PreCopy,
        seal: impl FnOnce(),
    ) -> Result<Checkpoint, VmmError> {
        let mut cp = match self.checkpoint_sealed(true, seal) {
            Ok(cp) => cp,
            Err(e) => {
                self.restore_dirty(&pre.dirty, pre.tracking);
                return Err(e);
            }
        };
        cp.tracking = TrackingSpan {
            from: pre.tracking.from,
            to: cp.tracking.to,
        };
        cp.timings.precopy_ns = pre.ns;
        cp.timings.precopied_pages = pre.dirty.iter().map(|w| w.count_ones() as u64).sum();
        // Every epoch goes through here: copy pages a second time only when both harvests
        // hold some (an idle guest pre-copies nothing; a quiet window after the pre-copy
        // leaves the pause nothing).
        if cp.pages.is_empty() {
            cp.dirty = pre.dirty;
            cp.pages = pre.pages;
        } else if !pre.pages.is_empty() {
            (cp.dirty, cp.pages) = merge_pages(&pre.dirty, &pre.pages, &cp.dirty, &cp.pages);
        }
        Ok(cp)
    }

    /// Takes the pages written since the previous harvest, KVM's log OR the VMM's own
    /// bitmap, and copies their contents if `copy_pages` (only while frozen: a running
    /// guest would tear them).
    fn harvest(&self, copy_pages: bool) -> Result<Harvest, VmmError> {
        let t = Instant::now();
        let (dirty, tracking) = self.dirty.harvest(&self.vm, &self.memory)?;
        let harvest_ns = t.elapsed().as_nanos() as u64;
        let t = Instant::now();
        let mut pages = Vec::new();
        if copy_pages {
            self.memory.copy_pages(&dirty, &mut pages)?;
        }
        let copy_ns = t.elapsed().as_nanos() as u64;
        Ok(Harvest {
            dirty,
            tracking,
            pages,
            harvest_ns,
            copy_ns,
        })
    }
}

/// A VM with vCPUs paused and device locks held; see [`Vmm::frozen`].
pub struct Frozen<'a> {
    vmm: &'a Vmm,
    locked: LockedDevices<'a>,
}

impl Frozen<'_> {
    /// The whole machine state.
    pub fn capture(&self) -> Result<MachineState, VmmError> {
        self.capture_timed().map(|(s, _, _)| s)
    }

    /// Devices, then KVM VM state, then every vCPU; with the nanoseconds the devices and
    /// the KVM parts took.
    fn capture_timed(&self) -> Result<(MachineState, u64, u64), VmmError> {
        let vmm = self.vmm;
        let t = Instant::now();
        // Devices first: a device quiescing may still raise an interrupt, which must land
        // in the LAPIC/IOAPIC state captured after it (Firecracker learned this).
        let devices = self.locked.save().map_err(VmmError::SaveDevices)?;
        let device_ns = t.elapsed().as_nanos() as u64;
        let vm = vmm.vm.save()?;
        let mut vcpus = Vec::with_capacity(vmm.vcpus.len());
        for v in &vmm.vcpus {
            vcpus.push(v.save()?);
        }
        let kvm_ns = t.elapsed().as_nanos() as u64 - device_ns;
        let state = MachineState {
            config: vmm.config.clone(),
            devices,
            vm,
            vcpus,
        };
        Ok((state, device_ns, kvm_ns))
    }

    /// State plus the pages dirtied since the last harvest (copied if `copy_pages`).
    pub fn checkpoint(&self, copy_pages: bool) -> Result<Checkpoint, VmmError> {
        let (state, device_state_ns, kvm_state_ns) = self.capture_timed()?;
        // With the disks' locks held no completion can happen between the state and this.
        let disk_writes = self
            .vmm
            .disks
            .iter()
            .map(|d| d.log.take_journal())
            .collect();
        let h = self.vmm.harvest(copy_pages)?;
        Ok(Checkpoint {
            state,
            dirty: h.dirty,
            pages: h.pages,
            tracking: h.tracking,
            disk_writes,
            timings: CheckpointTimings {
                device_state_ns,
                kvm_state_ns,
                harvest_ns: h.harvest_ns,
                copy_ns: h.copy_ns,
                ..Default::default()
            },
        })
    }

    /// Guest RAM, which stands still while frozen.
    pub fn memory(&self) -> &Memory {
        &self.vmm.memory
    }

    /// The disks' images: no request completes while frozen (one still in flight is in
    /// the state and is executed again by a restored VM).
    pub fn disk_images(&self) -> Vec<std::sync::Arc<crate::devices::virtio::blk::disk::DiskImage>> {
        self.vmm.disk_images()
    }

    /// The logs of the disks' writes.
    pub fn disk_logs(&self) -> Vec<std::sync::Arc<crate::devices::virtio::blk::disk::WriteLog>> {
        self.vmm.disk_logs()
    }

    /// Starts dirty tracking (KVM's log on, both logs cleared); returns the generation
    /// from which the next harvest counts: what a first full snapshot is the base of.
    pub fn start_dirty_tracking(&self) -> Result<u64, VmmError> {
        Ok(self.vmm.dirty.start(&self.vmm.vm, &self.vmm.memory)?)
    }

    /// Turns dirty tracking off again: undoes [`Frozen::start_dirty_tracking`] when what
    /// it was started for failed, so that a failure leaves the VM as it was (tracking off
    /// costs the guest no write faults).
    pub fn stop_dirty_tracking(&self) -> Result<(), VmmError> {
        Ok(self.vmm.dirty.stop(&self.vmm.vm)?)
    }

    /// [`Vmm::restore_dirty`]: gives back the pages of a checkpoint taken here whose
    /// consumer failed.
    pub fn restore_dirty(&self, dirty: &[u64], span: TrackingSpan) -> bool {
        self.vmm.restore_dirty(dirty, span)
    }
}

/// Device locks held during a capture (taken PCI root → NIC → disks → serial; the NIC
/// before its sink).
struct LockedDevices<'a> {
    net: Option<MutexGuard<'a, VirtioNet>>,
    disks: Vec<MutexGuard<'a, VirtioBlk>>,
    pci: MutexGuard<'a, PciRoot>,
    serial: MutexGuard<'a, SerialDevice>,
}

impl LockedDevices<'_> {
    /// Saves every device, stopping at the first that cannot.
    fn save(&self) -> Result<DeviceStates, DeviceError> {
        let net = self.net.as_ref().map(|n| n.save()).transpose();
        let disks = self
            .disks
            .iter()
            .enumerate()
            .map(|(index, d)| {
                d.save()
                    .map_err(|source| DeviceError::Disk { index, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(DeviceStates {
            net: net.map_err(DeviceError::Net)?,
            disks,
            serial: self.serial.save().map_err(DeviceError::Serial)?,
            pci: self.pci.save().map_err(DeviceError::PciRoot)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(v: u8) -> Vec<u8> {
        vec![v; PAGE_SIZE]
    }

    #[test]
    fn merge_takes_the_union_and_the_later_copy() {
        // a: pages 1, 3, 64 (copied while running); b: pages 3, 70 (copied in the pause).
        let a = vec![(1 << 1) | (1 << 3), 1];
        let a_pages = [page(1), page(3), page(64)].concat();
        let b = vec![1 << 3, 1 << 6];
        let b_pages = [page(33), page(70)].concat();
        let (u, pages) = merge_pages(&a, &a_pages, &b, &b_pages);
        assert_eq!(bitmap_pages(&u).collect::<Vec<_>>(), vec![1, 3, 64, 70]);
        let firsts: Vec<u8> = pages.chunks(PAGE_SIZE).map(|c| c[0]).collect();
        assert_eq!(
            firsts,
            vec![1, 33, 64, 70],
            "page 3 must be the pause's copy"
        );
        assert!(pages
            .chunks(PAGE_SIZE)
            .all(|c| c.iter().all(|&x| x == c[0])));
    }

    #[test]
    fn merge_of_empty_and_of_different_lengths() {
        let (u, pages) = merge_pages(&[], &[], &[], &[]);
        assert!(u.is_empty() && pages.is_empty());
        let (u, pages) = merge_pages(&[0, 0, 1], &page(128), &[1], &page(0));
        assert_eq!(bitmap_pages(&u).collect::<Vec<_>>(), vec![0, 128]);
        assert_eq!(pages.len(), 2 * PAGE_SIZE);
        assert_eq!((pages[0], pages[PAGE_SIZE]), (0, 128));
    }
}
