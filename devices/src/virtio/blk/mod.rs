//! virtio-blk (virtio 1.2, 5.2) on a raw image file.
//!
//! Features: `VIRTIO_F_VERSION_1`, `SIZE_MAX`, `SEG_MAX`, `BLK_SIZE` (512), `FLUSH`,
//! `DISCARD`, `WRITE_ZEROES`, and `RO` for a read-only disk; one request queue of 256
//! entries; `GET_ID` answers the image's serial. This is what Linux's `virtio_blk` driver
//! needs to use it unchanged.
//!
//! - The vCPU thread that takes the queue notification pops the chains, checks each
//!   (`request.rs`: every address and length, the sector range) and hands the good ones to
//!   the [`BlkWorker`] thread; a bad one is answered at once with `IOERR` or `UNSUPP`.
//! - The worker does the I/O on the image (`disk.rs`), off the vCPU thread, one request at a
//!   time in the order they came (so a flush covers every write before it), then takes the
//!   device lock to complete it: read data and the status written into guest memory (so
//!   into the VMM's dirty bitmap), the used ring, one interrupt per batch. Guest memory is
//!   written only under that lock, so a VM frozen for a checkpoint does not change; while
//!   the device is paused completions wait, so a stopped VM does not either.
//! - A request in flight when the device is saved (popped, not completed) is part of the
//!   saved state and is executed again by the restored device: its data and the status
//!   are written again, which is what the guest is still waiting for.
//! - An I/O error on the image (a full file system, a failing disk) gives that request
//!   `IOERR` and a log line; nothing else changes.
//!
//! Files: the model and its queue (here), request parsing (`request.rs`), the image and
//! the write log (`disk.rs`), the worker (`worker.rs`), save and restore (`persist.rs`).

pub mod disk;
mod persist;
pub mod request;
mod worker;

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use virtio_bindings::virtio_blk as vb;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK as ID_BLOCK;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::pci::{QueueContext, VirtioPciDevice};
use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use disk::{DiskImage, WriteLog, SECTOR_SIZE};
use request::{Limits, Rejected, Request, MAX_RANGES, MAX_RANGE_SECTORS, SEG_MAX, SIZE_MAX};

pub use persist::{BlkHost, BlkResources, BlkState, VirtioBlkState};
pub use worker::BlkWorker;

/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;
pub const REQUEST_QUEUE: usize = 0;
/// virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u16 = ID_BLOCK as u16;
/// Logical block size offered (`blk_size`).
pub const BLOCK_SIZE: u32 = 512;

const fn bit(b: u32) -> u64 {
    1 << b
}
pub const VIRTIO_BLK_F_SIZE_MAX: u64 = bit(vb::VIRTIO_BLK_F_SIZE_MAX);
pub const VIRTIO_BLK_F_SEG_MAX: u64 = bit(vb::VIRTIO_BLK_F_SEG_MAX);
pub const VIRTIO_BLK_F_RO: u64 = bit(vb::VIRTIO_BLK_F_RO);
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = bit(vb::VIRTIO_BLK_F_BLK_SIZE);
pub const VIRTIO_BLK_F_FLUSH: u64 = bit(vb::VIRTIO_BLK_F_FLUSH);
pub const VIRTIO_BLK_F_DISCARD: u64 = bit(vb::VIRTIO_BLK_F_DISCARD);
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = bit(vb::VIRTIO_BLK_F_WRITE_ZEROES);

// `virtio_blk_config` offsets this device fills in.
const CFG_CAPACITY: usize = std::mem::offset_of!(vb::virtio_blk_config, capacity);
const CFG_SIZE_MAX: usize = std::mem::offset_of!(vb::virtio_blk_config, size_max);
const CFG_SEG_MAX: usize = std::mem::offset_of!(vb::virtio_blk_config, seg_max);
const CFG_BLK_SIZE: usize = std::mem::offset_of!(vb::virtio_blk_config, blk_size);
const CFG_NUM_QUEUES: usize = std::mem::offset_of!(vb::virtio_blk_config, num_queues);
const CFG_MAX_DISCARD_SECTORS: usize =
    std::mem::offset_of!(vb::virtio_blk_config, max_discard_sectors);
const CFG_MAX_DISCARD_SEG: usize = std::mem::offset_of!(vb::virtio_blk_config, max_discard_seg);
const CFG_DISCARD_ALIGN: usize =
    std::mem::offset_of!(vb::virtio_blk_config, discard_sector_alignment);
const CFG_MAX_WZ_SECTORS: usize =
    std::mem::offset_of!(vb::virtio_blk_config, max_write_zeroes_sectors);
const CFG_MAX_WZ_SEG: usize = std::mem::offset_of!(vb::virtio_blk_config, max_write_zeroes_seg);
const CFG_WZ_UNMAP: usize = std::mem::offset_of!(vb::virtio_blk_config, write_zeroes_may_unmap);
/// Bytes of configuration space up to the end of the write-zeroes fields.
const CFG_LEN: usize = CFG_WZ_UNMAP + 4;
/// Discards are aligned to this many sectors (the tracking block).
const DISCARD_ALIGN_SECTORS: u32 = (disk::TRACK_BLOCK / SECTOR_SIZE) as u32;

/// Errors of the block device.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    #[error("the device mutex is poisoned (a thread panicked while holding it)")]
    Poisoned,
    #[error("spawning the disk worker thread failed")]
    Spawn(#[source] std::io::Error),
    #[error("the disk worker thread panicked")]
    WorkerPanicked,
    #[error("the disk worker was already started")]
    WorkerStarted,
    #[error("virtio-pci transport")]
    Transport(#[from] super::pci::VirtioPciError),
    #[error(
        "the saved disk has {saved} bytes, the image {} has {image}",
        path.display()
    )]
    CapacityMismatch {
        saved: u64,
        image: u64,
        path: std::path::PathBuf,
    },
    #[error(
        "the saved disk is {}, the image {} is opened {}",
        if *saved { "read-only" } else { "read-write" },
        path.display(),
        if *saved { "read-write" } else { "read-only" }
    )]
    ModeMismatch {
        saved: bool,
        path: std::path::PathBuf,
    },
    #[error("the saved request in flight at descriptor {head} does not fit the disk")]
    BadSavedRequest { head: u16 },
}

/// Host-side counters (not part of the saved state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests answered `IOERR`/`UNSUPP` (bad requests and host I/O errors).
    pub errors: u64,
}

/// What the worker gets.
enum Job {
    Run { req: Request, generation: u64 },
    Stop,
}

/// A request the worker finished, to be completed in guest memory.
struct Done {
    req: Request,
    generation: u64,
    status: u8,
    /// What a read (or `GET_ID`) returns, written into the request's data segments.
    data: Option<Vec<u8>>,
}

/// virtio-blk on the virtio-pci transport: the object to put on the buses.
pub type VirtioBlk = VirtioPciDevice<Blk>;

/// The virtio-blk device model.
pub struct Blk {
    disk: Arc<DiskImage>,
    log: Arc<WriteLog>,
    id: [u8; request::ID_BYTES],
    jobs: Sender<Job>,
    /// The worker's end of `jobs`, until it starts.
    jobs_rx: Option<Receiver<Job>>,
    /// Requests handed to the worker and not completed, in the order they were popped.
    in_flight: Vec<Request>,
    /// Bumped at every reset: a completion of an earlier generation is for a driver that
    /// is gone and is dropped, its buffers untouched.
    generation: u64,
    /// Paused by the VMM: completions wait in `parked`.
    paused: bool,
    parked: Vec<Done>,
    stats: BlkStats,
    /// An I/O error was logged and no request has succeeded since (one line per streak).
    io_failing: bool,
}

impl Blk {
    /// A device for `disk`, whose writes `log` records. `id` is its serial (`GET_ID`).
    pub fn new(disk: Arc<DiskImage>, log: Arc<WriteLog>, id: &str) -> Self {
        let (jobs, jobs_rx) = channel();
        let mut serial = [0u8; request::ID_BYTES];
        let n = id.len().min(serial.len());
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Self {
            disk,
            log,
            id: serial,
            jobs,
            jobs_rx: Some(jobs_rx),
            in_flight: Vec::new(),
            generation: 0,
            paused: false,
            parked: Vec::new(),
            stats: BlkStats::default(),
            io_failing: false,
        }
    }

    pub fn stats(&self) -> BlkStats {
        self.stats
    }

    pub fn disk(&self) -> &Arc<DiskImage> {
        &self.disk
    }

    pub fn log(&self) -> &Arc<WriteLog> {
        &self.log
    }

    /// Requests popped and not completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn limits(&self) -> Limits {
        Limits {
            capacity: self.disk.capacity(),
            read_only: self.disk.read_only(),
        }
    }

    fn config_bytes(&self) -> [u8; CFG_LEN] {
        let mut c = [0u8; CFG_LEN];
        let mut put = |at: usize, v: &[u8]| c[at..at + v.len()].copy_from_slice(v);
        put(
            CFG_CAPACITY,
            &(self.disk.capacity() / SECTOR_SIZE).to_le_bytes(),
        );
        put(CFG_SIZE_MAX, &SIZE_MAX.to_le_bytes());
        put(CFG_SEG_MAX, &SEG_MAX.to_le_bytes());
        put(CFG_BLK_SIZE, &BLOCK_SIZE.to_le_bytes());
        put(CFG_NUM_QUEUES, &1u16.to_le_bytes());
        put(CFG_MAX_DISCARD_SECTORS, &MAX_RANGE_SECTORS.to_le_bytes());
        put(CFG_MAX_DISCARD_SEG, &MAX_RANGES.to_le_bytes());
        put(CFG_DISCARD_ALIGN, &DISCARD_ALIGN_SECTORS.to_le_bytes());
        put(CFG_MAX_WZ_SECTORS, &MAX_RANGE_SECTORS.to_le_bytes());
        put(CFG_MAX_WZ_SEG, &MAX_RANGES.to_le_bytes());
        put(CFG_WZ_UNMAP, &[1]);
        c
    }

    fn submit(&mut self, req: Request) {
        self.in_flight.push(req.clone());
        let generation = self.generation;
        // The worker's receiver lives as long as the device (it is dropped only with the
        // worker, which stops with the VM); a send into a stopped worker has nobody to
        // complete it, which is what a stopped VM is.
        let _ = self.jobs.send(Job::Run { req, generation });
    }

    /// Answers a request that never reaches the worker.
    fn reject(&mut self, ctx: &mut QueueContext<'_>, r: Rejected) {
        self.stats.errors += 1;
        tracing::warn!(head = r.head, status = r.status, why = %r.why, "virtio-blk request refused");
        let mem = ctx.mem();
        let len = match r.status_addr {
            Some(a) if mem.write_obj(r.status, GuestAddress(a)).is_ok() => 1,
            _ => 0,
        };
        if let Some(q) = ctx.queue(REQUEST_QUEUE) {
            if let Err(e) = q.add_used(mem, r.head, len) {
                ctx.fail_queue(REQUEST_QUEUE, &e);
            }
        }
    }

    fn process_queue(&mut self, ctx: &mut QueueContext<'_>) {
        let mem = ctx.mem();
        let limits = self.limits();
        let mut rejected = 0usize;
        let mut popped = 0usize;
        while let Some(queue) = ctx.queue(REQUEST_QUEUE) {
            // Bounded, like TX: chains added meanwhile come with their own notification.
            if popped == usize::from(QUEUE_SIZE) {
                break;
            }
            let chain = match queue.iter(mem).map(|mut it| it.next()) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    ctx.fail_queue(REQUEST_QUEUE, &e);
                    break;
                }
            };
            popped += 1;
            let head = chain.head_index();
            match request::parse(mem, head, chain, &limits) {
                Ok(req) => self.submit(req),
                Err(r) => {
                    self.reject(ctx, r);
                    rejected += 1;
                }
            }
        }
        if rejected > 0 {
            ctx.signal_used(REQUEST_QUEUE);
        }
    }

    /// Completes finished requests in guest memory (the device lock is held); one
    /// interrupt for all of them. While paused they wait for [`Blk::resume_completions`].
    fn complete(&mut self, ctx: &mut QueueContext<'_>, done: Vec<Done>) {
        if self.paused {
            self.parked.extend(done);
            return;
        }
        let mem = ctx.mem();
        let mut used = 0;
        for d in done {
            if d.generation != self.generation {
                // The driver reset the device meanwhile; its buffers are not ours now.
                continue;
            }
            let Some(pos) = self.in_flight.iter().position(|r| r.head == d.req.head) else {
                continue;
            };
            self.in_flight.remove(pos);
            let mut status = d.status;
            let mut written = 0u32;
            if let Some(data) = &d.data {
                let mut at = 0usize;
                for s in segments(&d.req) {
                    let n = (s.len as usize).min(data.len().saturating_sub(at));
                    if n == 0 {
                        break;
                    }
                    if mem
                        .write_slice(&data[at..at + n], GuestAddress(s.addr))
                        .is_err()
                    {
                        // Checked when parsed; guest memory does not shrink.
                        status = request::S_IOERR;
                        break;
                    }
                    at += n;
                }
                written = at as u32;
            }
            if mem.write_obj(status, GuestAddress(d.req.status)).is_ok() {
                written += 1;
            }
            self.account(&d.req, status);
            let Some(q) = ctx.queue(REQUEST_QUEUE) else {
                // The queue failed or the driver is gone: nothing to return it to.
                continue;
            };
            if let Err(e) = q.add_used(mem, d.req.head, written) {
                ctx.fail_queue(REQUEST_QUEUE, &e);
                continue;
            }
            used += 1;
        }
        if used > 0 {
            ctx.signal_used(REQUEST_QUEUE);
        }
    }

    fn account(&mut self, req: &Request, status: u8) {
        use request::Op;
        if status != request::S_OK {
            self.stats.errors += 1;
            return;
        }
        if self.io_failing {
            self.io_failing = false;
            tracing::info!(disk = %self.disk.path().display(), "disk I/O succeeds again");
        }
        match &req.op {
            Op::Read { .. } => {
                self.stats.reads += 1;
                self.stats.bytes_read += req.data_len();
            }
            Op::Write { .. } => {
                self.stats.writes += 1;
                self.stats.bytes_written += req.data_len();
            }
            Op::Flush => self.stats.flushes += 1,
            _ => {}
        }
    }

    /// Completes what waited while the device was paused.
    fn resume_completions(&mut self, ctx: &mut QueueContext<'_>) {
        self.paused = false;
        let parked = std::mem::take(&mut self.parked);
        self.complete(ctx, parked);
    }
}

/// Where a finished read's (or `GET_ID`'s) data goes.
fn segments(req: &Request) -> &[request::Segment] {
    match &req.op {
        request::Op::Read { data, .. } | request::Op::GetId { data } => data,
        _ => &[],
    }
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_BLOCK
    }

    fn pci_class(&self) -> (u8, u8) {
        // Mass storage, other (what QEMU's virtio-blk-pci reports).
        (0x01, 0x80)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = if self.disk.read_only() {
            VIRTIO_BLK_F_RO
        } else {
            0
        };
        VIRTIO_F_VERSION_1
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_DISCARD
            | VIRTIO_BLK_F_WRITE_ZEROES
            | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only with CONFIG_WCE, which is not offered.
        tracing::warn!(
            offset,
            len = data.len(),
            "write to read-only virtio-blk config ignored"
        );
    }

    fn activate(&mut self, ctx: &mut QueueContext<'_>) {
        // Requests the driver queued before DRIVER_OK.
        self.process_queue(ctx);
    }

    fn reset(&mut self) {
        self.generation += 1;
        self.in_flight.clear();
        self.parked.clear();
    }

    fn queue_notify(&mut self, queue: usize, ctx: &mut QueueContext<'_>) {
        if queue == REQUEST_QUEUE {
            self.process_queue(ctx);
        }
    }
}

impl VirtioPciDevice<Blk> {
    /// Creates virtio-blk with BAR 0 at `bar_addr` (see [`super::pci::BAR_SIZE`]).
    pub fn new_blk(bar_addr: u64, id: &str, res: BlkResources) -> Result<Self, BlkError> {
        let blk = Blk::new(res.model.disk, res.model.log, id);
        Ok(Self::new(blk, res.mem, res.msi, bar_addr)?)
    }
}

impl crate::Pausable for VirtioBlk {
    type Error = BlkError;

    fn pause(&mut self) -> Result<(), BlkError> {
        self.device_mut().paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), BlkError> {
        self.with_queues(|blk, ctx| blk.resume_completions(ctx));
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
