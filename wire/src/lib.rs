//! Replication wire protocol between primary and backup.
//!
//! The protocol is described in `PROTOCOL.md` next to this crate. In short:
//!
//! - [`FrameCodec`] frames [`Message`]s behind a fixed 24-byte header (magic, type, length,
//!   payload CRC-64, header check); it refuses oversize frames before allocating and never
//!   panics on corrupt input.
//! - [`handshake`] checks versions and identities ([`Hello`] → [`HelloAck`] / [`Refuse`]).
//! - [`SyncTracker`] checks the initial synchronisation on the backup.
//! - [`EpochEncoder`] writes one epoch checkpoint on the primary; [`EpochAssembler`] accepts
//!   it on the backup only when it arrived whole, in order and verified.
//!
//! Everything here is pure (no I/O, no clocks), so the state machines are unit- and
//! property-tested without a network.

mod assembler;
mod checksum;
mod codec;
mod epoch_encoder;
mod frame;
pub mod handshake;
mod message;
pub mod pagecodec;
mod sync;

pub use assembler::{AssembleError, BasePages, CompleteEpoch, EpochAssembler, EpochMessage};
pub use checksum::EpochChecksum;
pub use codec::{DecodeError, EncodeError, FrameCodec, LayoutError};
pub use epoch_encoder::{EpochEncodeError, EpochEncoder};
pub use frame::{FrameHeader, HeaderError, DEFAULT_MAX_FRAME_LEN, HEADER_LEN, MAGIC};
pub use handshake::{AcceptPolicy, HandshakeError};
pub use message::{
    Ack, CompressedPages, CompressedPagesRef, DiskExtent, DiskWrites, EncodedPage, EncodedPageRef,
    EpochBegin, EpochEnd, FrameType, Geometry, GeometryError, Goodbye, GoodbyeReason, Heartbeat,
    Hello, HelloAck, Inbound, Message, Page, PageRef, Pages, PagesRef, Refuse, RefuseReason, Role,
    State, StateRef, SyncDisk, SyncDone, SyncPages, SyncPagesRef, SyncZeroPages, ValidationError,
    VmDescription, VmId, DISK_SECTOR, MAX_CONFIG_LEN, MAX_DISKS, MAX_DISK_DATA, MAX_INBOUND_FRAME,
    MAX_PAGE_SIZE, MAX_STATE_LEN, MAX_TEXT_LEN, MIN_PAGE_SIZE, PROTOCOL_VERSION, SOFTWARE_VERSION,
};
pub use pagecodec::{PageCodecError, PageEncoding};
pub use sync::{SyncError, SyncTracker};
