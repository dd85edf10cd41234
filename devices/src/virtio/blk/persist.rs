//! Save and restore of virtio-blk: the model's state is what the guest sees of the disk
//! (its size, whether it is read-only, its serial) and the requests in flight; the image
//! itself is the host's (a restored device gets the disk it runs on from its caller).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::disk::{DiskImage, WriteLog, SECTOR_SIZE};
use super::request::{self, Op, Request};
use super::{Blk, BlkError};
use crate::persist::Persist;
use crate::virtio::pci::{VirtioPciArgs, VirtioPciDeviceState};

/// Saved state of the virtio-blk model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkState {
    pub capacity: u64,
    pub read_only: bool,
    pub id: [u8; request::ID_BYTES],
    /// Requests popped from the queue and not completed, in the order they were popped:
    /// the restored device executes them again.
    pub in_flight: Vec<Request>,
}

/// Saved state of the whole device: transport plus model.
pub type VirtioBlkState = VirtioPciDeviceState<BlkState>;

/// What the model is built with on this host: the image and its write log.
pub struct BlkHost {
    pub disk: Arc<DiskImage>,
    pub log: Arc<WriteLog>,
}

/// Host resources a (restored) device is built with.
pub type BlkResources = VirtioPciArgs<BlkHost>;

/// Whether a saved request still fits this disk (a state is data from elsewhere: a request
/// past the end of the image would grow the file). Its guest addresses need no check here:
/// the worker's guest-memory accesses are checked, and a failed one is an `IOERR`.
fn fits(req: &Request, capacity: u64) -> bool {
    let end_ok = |sector: u64, bytes: u64| {
        sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|o| o.checked_add(bytes))
            .is_some_and(|e| e <= capacity)
    };
    match &req.op {
        Op::Read { sector, .. } | Op::Write { sector, .. } => {
            req.data_len() <= request::MAX_DATA && end_ok(*sector, req.data_len())
        }
        Op::GetId { data } => data.len() <= request::SEG_MAX as usize + 2,
        Op::Flush => true,
        Op::Discard(r) | Op::WriteZeroes(r) => {
            r.len() <= request::MAX_RANGES as usize && r.iter().all(|r| end_ok(r.sector, r.bytes()))
        }
    }
}

/// The model is its guest-visible disk and its requests in flight; the image, the write
/// log, the worker and the counters are the host's.
impl Persist<'_> for Blk {
    type State = BlkState;
    type ConstructorArgs = BlkHost;
    type Error = BlkError;

    fn save(&self) -> Result<BlkState, BlkError> {
        Ok(BlkState {
            capacity: self.disk.capacity(),
            read_only: self.disk.read_only(),
            id: self.id,
            in_flight: self.in_flight.clone(),
        })
    }

    fn restore(host: BlkHost, s: &BlkState) -> Result<Self, BlkError> {
        let path = host.disk.path().to_path_buf();
        if host.disk.capacity() != s.capacity {
            return Err(BlkError::CapacityMismatch {
                saved: s.capacity,
                image: host.disk.capacity(),
                path,
            });
        }
        if host.disk.read_only() != s.read_only {
            return Err(BlkError::ModeMismatch {
                saved: s.read_only,
                path,
            });
        }
        if let Some(bad) = s.in_flight.iter().find(|r| !fits(r, s.capacity)) {
            return Err(BlkError::BadSavedRequest { head: bad.head });
        }
        let mut blk = Blk::new(host.disk, host.log, "");
        blk.id = s.id;
        for r in &s.in_flight {
            blk.submit(r.clone());
        }
        Ok(blk)
    }
}
