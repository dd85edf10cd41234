//! The disk worker: executes requests on the image off the vCPU thread, then completes
//! them under the device lock.
//!
//! One thread per disk, one request at a time in the order they were popped: a flush is
//! then a barrier for every write before it, with no bookkeeping. (The image is a file in
//! the host's page cache; reads and writes there are memory copies, and only a flush waits
//! for the device. `twin bench` measures this worker against the disk's own limit.)

use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vm_memory::{Bytes, GuestAddress};

use super::disk::{DiskImage, DiskWrite, WriteLog, SECTOR_SIZE};
use super::request::{self, Op, Request, S_IOERR, S_OK};
use super::{BlkError, Done, Job, VirtioBlk};
use crate::GuestMem;

/// Requests executed before their completions are written, when more are waiting.
const BATCH: usize = 16;

/// The worker thread of one disk. Dropping it stops the thread.
pub struct BlkWorker {
    stop: Sender<Job>,
    thread: Option<JoinHandle<()>>,
}

impl BlkWorker {
    /// Starts executing `dev`'s requests (those already queued first).
    pub fn start(dev: Arc<Mutex<VirtioBlk>>, mem: GuestMem) -> Result<Self, BlkError> {
        let (rx, stop, disk, log, id, name) = {
            let mut d = dev.lock().map_err(|_| BlkError::Poisoned)?;
            let blk = d.device_mut();
            let rx = blk.jobs_rx.take().ok_or(BlkError::WorkerStarted)?;
            let name = blk
                .disk
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (
                rx,
                blk.jobs.clone(),
                blk.disk.clone(),
                blk.log.clone(),
                blk.id,
                name,
            )
        };
        let thread = std::thread::Builder::new()
            .name(format!("blk-{name}"))
            .spawn(move || run(&dev, &rx, &disk, &log, &mem, &id))
            .map_err(BlkError::Spawn)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the thread once the request it is executing is done (queued ones stay in
    /// flight: a saved state still holds them).
    pub fn stop(mut self) -> Result<(), BlkError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), BlkError> {
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        let _ = self.stop.send(Job::Stop);
        t.join().map_err(|_| BlkError::WorkerPanicked)
    }
}

impl Drop for BlkWorker {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn run(
    dev: &Mutex<VirtioBlk>,
    rx: &Receiver<Job>,
    disk: &DiskImage,
    log: &WriteLog,
    mem: &GuestMem,
    id: &[u8; request::ID_BYTES],
) {
    let mut failing = false;
    let mut stopping = false;
    while !stopping {
        let Ok(job) = rx.recv() else { return };
        let mut done = Vec::new();
        let mut next = Some(job);
        while let Some(job) = next.take() {
            let Job::Run { req, generation } = job else {
                stopping = true;
                break;
            };
            let flush = matches!(req.op, Op::Flush);
            let (status, data) = execute(&req, disk, log, mem, id, &mut failing);
            done.push(Done {
                req,
                generation,
                status,
                data,
            });
            // A flush completes at once (its latency is what a durable write waits
            // for); otherwise take what else waits, up to a batch.
            if flush || done.len() >= BATCH {
                break;
            }
            match rx.try_recv() {
                Ok(j) => next = Some(j),
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => break,
            }
        }
        if done.is_empty() {
            continue;
        }
        // What was executed before a stop is completed too.
        let Ok(mut d) = dev.lock() else {
            tracing::error!("virtio-blk device lock poisoned; the disk worker stops");
            return;
        };
        d.with_queues(|blk, ctx| blk.complete(ctx, done));
    }
}

/// Runs one request on the image: its status, and the data a read returns.
fn execute(
    req: &Request,
    disk: &DiskImage,
    log: &WriteLog,
    mem: &GuestMem,
    id: &[u8; request::ID_BYTES],
    failing: &mut bool,
) -> (u8, Option<Vec<u8>>) {
    let what = match &req.op {
        Op::Read { .. } => "read",
        Op::Write { .. } => "write",
        Op::Flush => "flush",
        Op::GetId { .. } => "get-id",
        Op::Discard(_) => "discard",
        Op::WriteZeroes(_) => "write-zeroes",
    };
    let r: std::io::Result<Option<Vec<u8>>> = (|| match &req.op {
        Op::Read { sector, .. } => {
            let mut buf = vec![0u8; req.data_len() as usize];
            disk.read_at(&mut buf, sector * SECTOR_SIZE)?;
            Ok(Some(buf))
        }
        Op::Write { sector, data } => {
            let mut buf = vec![0u8; req.data_len() as usize];
            let mut at = 0usize;
            for s in data {
                let n = s.len as usize;
                mem.read_slice(&mut buf[at..at + n], GuestAddress(s.addr))
                    .map_err(std::io::Error::other)?;
                at += n;
            }
            let offset = sector * SECTOR_SIZE;
            disk.write_at(&buf, offset)?;
            log.record(DiskWrite::Data { offset, data: buf });
            Ok(None)
        }
        Op::Flush => {
            disk.flush()?;
            Ok(None)
        }
        Op::GetId { data } => {
            let room: u64 = data.iter().map(|s| u64::from(s.len)).sum();
            Ok(Some(id[..(room as usize).min(id.len())].to_vec()))
        }
        Op::Discard(ranges) => {
            for r in ranges {
                disk.discard(r.offset(), r.bytes())?;
                log.record(DiskWrite::Zero {
                    offset: r.offset(),
                    len: r.bytes(),
                });
            }
            Ok(None)
        }
        Op::WriteZeroes(ranges) => {
            for r in ranges {
                disk.zero_range(r.offset(), r.bytes())?;
                log.record(DiskWrite::Zero {
                    offset: r.offset(),
                    len: r.bytes(),
                });
            }
            Ok(None)
        }
    })();
    match r {
        Ok(data) => {
            *failing = false;
            (S_OK, data)
        }
        Err(e) => {
            // The guest gets an I/O error, as a failing disk gives; the VMM says so once
            // per streak of failures.
            if !*failing {
                tracing::error!(
                    disk = %disk.path().display(),
                    op = what,
                    error = %e,
                    "disk I/O failed; the guest gets VIRTIO_BLK_S_IOERR"
                );
                *failing = true;
            } else {
                tracing::debug!(disk = %disk.path().display(), op = what, error = %e, "disk I/O failed again");
            }
            (S_IOERR, None)
        }
    }
}
