//! Output commit: guest frames held per epoch until the backup acknowledges it.
//!
//! A Remus-style primary runs the guest ahead of its last checkpoint. Anything the guest
//! sends must not reach the outside world until the backup holds a checkpoint in which the
//! guest *has sent it*; otherwise a failover would roll the guest back to before a packet
//! that clients already saw (a duplicate or vanished TCP segment, an acknowledged write that
//! never happened). [`NetBuffer`] implements that rule:
//!
//! - the device pushes each transmitted frame through a [`FrameSink`]; it is tagged with
//!   the open epoch;
//! - the primary [`seal`](NetBuffer::seal)s epoch N while the vCPUs are paused for
//!   checkpoint N;
//! - when the backup acknowledges checkpoint N, [`ack`](NetBuffer::ack) releases, in push
//!   order and exactly once, every frame of epochs ≤ N to the output queue, from which an
//!   output thread ([`NetBuffer::spawn_release_thread`] or
//!   [`NetBuffer::wait_released`]) writes them to the TAP device.
//!
//! Policies when the backup is lost: [`NetBuffer::release_all`] (keep running unprotected),
//! [`NetBuffer::fence`] (this primary must go silent; unacknowledged output is discarded),
//! [`NetBuffer::protect`] to resume once a new backup is synchronised.
//!
//! Memory is bounded (bytes and frames, held plus queued). When full, the *newest* frame is
//! dropped and counted, as a congested NIC would: the guest's TCP retransmits, and the vCPU
//! thread is never blocked. Frames are opaque (they include the virtio-net header); nothing
//! here is VM-specific.
//!
//! Thread model: any number of pushing threads (vCPU / device), one controlling task
//! (seal, ack, policies), one output thread. All state sits behind one mutex held for a
//! few pointer moves; output waits on a condition variable.

mod buffer;
mod latency;
mod release;

pub use buffer::{
    AckError, Closed, DropReason, FrameSink, Mode, NetBuffer, NetBufferConfig, NetBufferStats,
    PushOutcome, ReleasedFrame, SealError,
};
pub use latency::{LatencySummary, HISTOGRAM_BUCKETS};
pub use release::{ReleaseReport, ReleaseThread};
