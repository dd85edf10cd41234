//! The messages of the replication protocol and the limits they must respect.
//!
//! Control messages are small and are encoded with bincode 1.3 (fixed-width little-endian
//! integers, a byte limit equal to the frame payload, trailing bytes rejected). The bulk
//! messages of the checkpoint stream ([`Pages`], [`SyncPages`], [`State`]) have a hand-made
//! layout (see `PROTOCOL.md`) so that page data is copied once on encode (straight from guest
//! memory into the output buffer) and never on decode ([`Bytes`] slices of the receive buffer).

use crate::pagecodec::PageEncoding;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Version of the protocol spoken by this build. A peer speaking another version is refused
/// during the handshake: checkpoints are only meaningful between identical formats.
pub const PROTOCOL_VERSION: u32 = 4;

/// Version string of this build, sent in [`Hello`] so that a refusal can name both sides.
pub const SOFTWARE_VERSION: &str = concat!("twin ", env!("CARGO_PKG_VERSION"));

/// Largest vCPU/device state blob of one epoch. The state of a few vCPUs and devices is a few
/// hundred KiB; the cap keeps a corrupt or hostile `EpochBegin` from reserving gigabytes.
pub const MAX_STATE_LEN: usize = 16 << 20;

/// Largest opaque VM configuration blob in [`VmDescription`].
pub const MAX_CONFIG_LEN: usize = 1 << 20;

/// Largest free-text field (software version, refusal detail, goodbye reason).
pub const MAX_TEXT_LEN: usize = 4096;

/// Smallest page size accepted. Pages are the unit of dirty tracking; anything below this is
/// a bug, not a configuration.
pub const MIN_PAGE_SIZE: u32 = 512;

/// Largest page size accepted (2 MiB huge pages).
pub const MAX_PAGE_SIZE: u32 = 2 << 20;

/// Which end of a replication session a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Runs the VM and streams checkpoints.
    Primary,
    /// Keeps the replica and takes over when the primary is lost.
    Backup,
}

/// Identity of a protected VM. Both ends must agree on it: a backup holding the replica of
/// one VM must never apply checkpoints of another.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VmId(pub [u8; 16]);

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VmId({self})")
    }
}

/// First message of a connection, sent by the primary.
///
/// Wire compatibility rule: `protocol_version` is the first field and stays a little-endian
/// `u32` forever, so that a peer of any version can read it and refuse cleanly even when the
/// rest of the message does not decode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub protocol_version: u32,
    /// Human-readable build version of the sender, for error messages.
    pub software_version: String,
    /// Role the sender takes in this session.
    pub role: Role,
    /// The VM being protected.
    pub vm_id: VmId,
    /// Replication generation: increases every time the primary starts a fresh session
    /// (e.g. after losing a backup), so that a backup can tell a new full sync from a stale
    /// connection of an old session.
    pub generation: u64,
}

impl Hello {
    /// A `Hello` of this build.
    pub fn new(role: Role, vm_id: VmId, generation: u64) -> Self {
        Self {
            protocol_version: PROTOCOL_VERSION,
            software_version: SOFTWARE_VERSION.to_owned(),
            role,
            vm_id,
            generation,
        }
    }
}

/// Positive answer to [`Hello`], sent by the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// [`PROTOCOL_VERSION`] of the sender (equal to the one in `Hello`).
    pub protocol_version: u32,
    /// Build version of the sender.
    pub software_version: String,
    /// Echo of the accepted VM identity.
    pub vm_id: VmId,
    /// Echo of the accepted generation.
    pub generation: u64,
}

/// Why a peer refused a session. Encoded as a `u32` code so that codes added by a later
/// version still decode (as [`RefuseReason::Other`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u32", into = "u32")]
pub enum RefuseReason {
    /// The peers speak different protocol versions.
    VersionMismatch,
    /// The peer announced a role that cannot talk to us (e.g. two primaries).
    WrongRole,
    /// The backup holds (or expects) another VM.
    VmMismatch,
    /// The generation is older than one the backup already served.
    StaleGeneration,
    /// The backup already serves a session.
    Busy,
    /// The peer violated the protocol (bad frame, bad sequence).
    ProtocolError,
    /// A code this build does not know.
    Other(u32),
}

impl From<u32> for RefuseReason {
    fn from(code: u32) -> Self {
        match code {
            1 => Self::VersionMismatch,
            2 => Self::WrongRole,
            3 => Self::VmMismatch,
            4 => Self::StaleGeneration,
            5 => Self::Busy,
            6 => Self::ProtocolError,
            other => Self::Other(other),
        }
    }
}

impl From<RefuseReason> for u32 {
    fn from(reason: RefuseReason) -> u32 {
        match reason {
            RefuseReason::VersionMismatch => 1,
            RefuseReason::WrongRole => 2,
            RefuseReason::VmMismatch => 3,
            RefuseReason::StaleGeneration => 4,
            RefuseReason::Busy => 5,
            RefuseReason::ProtocolError => 6,
            RefuseReason::Other(code) => code,
        }
    }
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::VersionMismatch => f.write_str("protocol version mismatch"),
            Self::WrongRole => f.write_str("wrong role"),
            Self::VmMismatch => f.write_str("VM identity mismatch"),
            Self::StaleGeneration => f.write_str("stale replication generation"),
            Self::Busy => f.write_str("backup busy with another session"),
            Self::ProtocolError => f.write_str("protocol error"),
            Self::Other(code) => write!(f, "unknown reason {code}"),
        }
    }
}

/// Negative answer to [`Hello`], or a last word before closing on a protocol error. Its
/// layout (`u32` code, string) is frozen so that any version can read any version's refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refuse {
    /// Machine-readable reason.
    pub reason: RefuseReason,
    /// Human-readable detail, e.g. both version numbers.
    pub detail: String,
}

/// Static description of the protected VM, sent by the primary after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    /// Bytes of guest RAM, a multiple of `page_size`.
    pub mem_size: u64,
    /// Size of a page of the checkpoint stream (a power of two).
    pub page_size: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// MAC address of the guest NIC, so the backup can take it over.
    pub mac: [u8; 6],
    /// Opaque VMM configuration (at most [`MAX_CONFIG_LEN`] bytes).
    #[serde(with = "byte_buf")]
    pub config: Vec<u8>,
    /// The VM's disks, in order: each one's size in bytes (a multiple of [`DISK_SECTOR`]),
    /// at most [`MAX_DISKS`].
    pub disks: Vec<u64>,
}

/// Most disks a VM may have on the wire.
pub const MAX_DISKS: usize = 16;
/// Disk sizes, offsets and lengths are multiples of this.
pub const DISK_SECTOR: u64 = 512;
/// Most data bytes one [`DiskWrites`] or [`SyncDisk`] carries (the sender splits).
pub const MAX_DISK_DATA: usize = 16 << 20;

/// One write of the guest to a disk: `data` at `offset`, or `[offset, offset + zero_len)`
/// made zero (a discard, a write of zeroes) with no data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskExtent {
    /// Byte offset on the disk (a multiple of [`DISK_SECTOR`]).
    pub offset: u64,
    /// Bytes made zero; 0 for a data write.
    pub zero_len: u64,
    /// The bytes written (a multiple of [`DISK_SECTOR`]); empty for a zeroing. Decoded
    /// data is a slice of the received frame.
    pub data: Bytes,
}

impl DiskExtent {
    /// Bytes of the disk it covers.
    pub fn len(&self) -> u64 {
        if self.data.is_empty() {
            self.zero_len
        } else {
            self.data.len() as u64
        }
    }

    /// Covers nothing (never valid on the wire).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The writes of epoch `epoch` to disk `disk`, in the order they reached the primary's
/// image (part of the epoch: after its pages, before its state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskWrites {
    pub epoch: u64,
    pub disk: u32,
    pub writes: Vec<DiskExtent>,
}

/// Initial sync: `data` at `offset` of disk `disk` (what is not sent is zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncDisk {
    pub disk: u32,
    pub offset: u64,
    pub data: Bytes,
}

impl VmDescription {
    /// The page geometry this description implies.
    pub fn geometry(&self) -> Result<Geometry, GeometryError> {
        Geometry::new(self.mem_size, self.page_size)
    }
}

/// Serde adapter for opaque byte fields: same wire format as `Vec<u8>` (u64 length, bytes),
/// but decoded through `deserialize_byte_buf`, for which bincode checks the length against
/// its byte limit *before* allocating. (The generic sequence path preallocates up to 1 MiB
/// on the strength of an unchecked length prefix.)
mod byte_buf {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte buffer")
            }

            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }

            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                // Only self-describing formats get here; grow as elements really arrive.
                let mut out = Vec::new();
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// Page geometry of a replicated memory: what page indices and sizes are valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    page_size: u32,
    page_count: u64,
}

/// A memory size / page size pair that cannot describe guest memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// The page size is not a power of two within the accepted range.
    #[error("page size {page_size} is not a power of two in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}]")]
    PageSize {
        /// The rejected page size.
        page_size: u32,
    },
    /// The memory size is zero or not a multiple of the page size.
    #[error("memory size {mem_size} is not a non-zero multiple of the page size {page_size}")]
    MemSize {
        /// The rejected memory size.
        mem_size: u64,
        /// The page size it was checked against.
        page_size: u32,
    },
}

impl Geometry {
    /// Geometry of `mem_size` bytes in pages of `page_size` bytes.
    pub fn new(mem_size: u64, page_size: u32) -> Result<Self, GeometryError> {
        check_page_size(page_size).map_err(|_| GeometryError::PageSize { page_size })?;
        if mem_size == 0 || mem_size % u64::from(page_size) != 0 {
            return Err(GeometryError::MemSize {
                mem_size,
                page_size,
            });
        }
        Ok(Self {
            page_size,
            page_count: mem_size / u64::from(page_size),
        })
    }

    /// Size of a page in bytes.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Number of pages; valid indices are `0..page_count`.
    pub fn page_count(&self) -> u64 {
        self.page_count
    }

    /// Bytes of memory described.
    pub fn mem_size(&self) -> u64 {
        self.page_count * u64::from(self.page_size)
    }
}

/// Initial synchronisation: a batch of full pages. A page may be sent more than once during
/// an iterative sync; the last copy wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPages {
    /// Page size of every page in the batch.
    pub page_size: u32,
    /// The pages.
    pub pages: Vec<Page>,
}

/// Initial synchronisation: pages that are all zeroes, by index only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncZeroPages {
    /// Indices of pages that are entirely zero.
    pub indices: Vec<u64>,
}

/// End of the initial synchronisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncDone {
    /// Number of page entries sent during the sync (full pages plus zero-page indices), so
    /// the backup can detect a lost batch.
    pub pages_sent: u64,
    /// Bytes of disk data sent in `SyncDisk` messages, likewise.
    pub disk_bytes_sent: u64,
}

/// Start of the checkpoint of one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochBegin {
    /// Epoch number: exactly one more than the previous epoch of the session.
    pub epoch: u64,
    /// Number of dirty pages the epoch carries, over all its `Pages` batches.
    pub page_count: u64,
    /// Length of the epoch's `State` blob.
    pub state_len: u64,
}

/// One guest page of a checkpoint (owned; on decode a zero-copy slice of the receive buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Page index (guest physical address / page size).
    pub index: u64,
    /// Exactly `page_size` bytes.
    pub data: Bytes,
}

/// A borrowed page, for encoding straight from guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef<'a> {
    /// Page index.
    pub index: u64,
    /// Exactly `page_size` bytes.
    pub data: &'a [u8],
}

impl Page {
    /// Borrow as a [`PageRef`].
    pub fn as_ref(&self) -> PageRef<'_> {
        PageRef {
            index: self.index,
            data: &self.data,
        }
    }
}

/// A batch of the dirty pages of one epoch. An epoch may span several batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pages {
    /// Epoch the pages belong to.
    pub epoch: u64,
    /// Page size of every page in the batch.
    pub page_size: u32,
    /// The pages, each exactly `page_size` bytes.
    pub pages: Vec<Page>,
}

/// Borrowed form of [`Pages`], encoded without first copying pages into owned buffers.
#[derive(Debug, Clone, Copy)]
pub struct PagesRef<'a> {
    /// Epoch the pages belong to.
    pub epoch: u64,
    /// Page size of every page in the batch.
    pub page_size: u32,
    /// The pages.
    pub pages: &'a [PageRef<'a>],
}

/// Borrowed form of [`SyncPages`].
#[derive(Debug, Clone, Copy)]
pub struct SyncPagesRef<'a> {
    /// Page size of every page in the batch.
    pub page_size: u32,
    /// The pages.
    pub pages: &'a [PageRef<'a>],
}

/// One page of a [`CompressedPages`] batch as it travels: raw, LZ4, or a delta against the
/// backup's committed copy of the page (see [`crate::pagecodec`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPage {
    /// Page index.
    pub index: u64,
    /// How `data` encodes the page.
    pub encoding: PageEncoding,
    /// Raw: exactly `page_size` bytes; compressed: 1 to `page_size - 1` bytes. Decoded
    /// data is a slice of the received frame.
    pub data: Bytes,
}

/// Borrowed form of [`EncodedPage`], for the encoder; `raw` is the page itself, which the
/// epoch checksum covers (the backup checks it against what it decoded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodedPageRef<'a> {
    /// Page index.
    pub index: u64,
    /// How `data` encodes the page.
    pub encoding: PageEncoding,
    /// The encoded bytes.
    pub data: &'a [u8],
    /// The page, decoded (exactly `page_size` bytes).
    pub raw: &'a [u8],
}

/// A batch of the dirty pages of one epoch, each page encoded on its own (protocol 4).
/// An epoch may mix `Pages` and `CompressedPages` batches; its checksum covers the decoded
/// pages either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressedPages {
    /// Epoch the pages belong to.
    pub epoch: u64,
    /// Page size of every page in the batch.
    pub page_size: u32,
    /// The pages.
    pub pages: Vec<EncodedPage>,
}

/// Borrowed form of [`CompressedPages`].
#[derive(Debug, Clone, Copy)]
pub struct CompressedPagesRef<'a> {
    /// Epoch the pages belong to.
    pub epoch: u64,
    /// Page size of every page in the batch.
    pub page_size: u32,
    /// The pages.
    pub pages: &'a [EncodedPageRef<'a>],
}

/// vCPU and device state of one epoch (opaque to this crate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// Epoch the state belongs to.
    pub epoch: u64,
    /// Opaque state, at most [`MAX_STATE_LEN`] bytes.
    pub blob: Bytes,
}

/// Borrowed form of [`State`].
#[derive(Debug, Clone, Copy)]
pub struct StateRef<'a> {
    /// Epoch the state belongs to.
    pub epoch: u64,
    /// Opaque state.
    pub blob: &'a [u8],
}

/// End of the checkpoint of one epoch; carries what the backup must verify before applying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochEnd {
    /// Epoch being closed.
    pub epoch: u64,
    /// Number of pages sent (equal to `EpochBegin::page_count`).
    pub page_count: u64,
    /// Page bytes plus state bytes of the epoch.
    pub total_bytes: u64,
    /// [`crate::EpochChecksum`] of the epoch's content, in order.
    pub checksum: u64,
}

/// The backup has applied (committed) the checkpoint of `epoch` and every earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Highest committed epoch.
    pub epoch: u64,
}

/// Most bytes of one [`Inbound`] frame (a virtio-net buffer's worth).
pub const MAX_INBOUND_FRAME: usize = 65550;

/// A network frame the primary's guest received while `epoch` was open (delivered after
/// checkpoint `epoch - 1`). The backup keeps those of epochs it has not committed and, if
/// it takes over from epoch `e`, delivers the ones with `epoch > e` to the guest before
/// anything else: requests that reached the dead primary need not wait for the client's
/// retransmission timer (≥ 200 ms on Linux). Best effort (one lost is retransmitted by
/// the client as before) and harmless twice (the guest's TCP drops a duplicate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inbound {
    pub epoch: u64,
    /// The Ethernet frame, as the guest received it (no virtio header).
    #[serde(with = "byte_buf")]
    pub frame: Vec<u8>,
}

/// Liveness probe, sent both ways at a fixed interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Sender's heartbeat counter (increases by one per heartbeat).
    pub seq: u64,
    /// Sender's monotonic clock when sent, in nanoseconds (for RTT estimates by echo only:
    /// the two clocks are not comparable).
    pub sent_at_ns: u64,
    /// Primary: last epoch sent. Backup: last epoch committed.
    pub last_epoch: u64,
}

/// Orderly end of a session: the peer will close the connection after it. What the receiver
/// does depends on the reason, never on the text of `detail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {
    /// Why the session ends; decides what the receiver does.
    pub reason: GoodbyeReason,
    /// Human-readable detail, for logs only.
    pub detail: String,
}

impl Goodbye {
    /// A goodbye for `reason` with a human-readable `detail`.
    pub fn new(reason: GoodbyeReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// Why a session ends. Encoded as a `u32` code so that codes added by a later version still
/// decode (as [`GoodbyeReason::Other`], which the receiver treats as [`GoodbyeReason::Abandon`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u32", into = "u32")]
pub enum GoodbyeReason {
    /// Primary → backup: the VM stops on purpose (signal, guest power-off). No failover; the
    /// replica is of no further use.
    Stopping,
    /// Either way: the sender gives up this session (a corrupt frame, a bogus ack, a silent
    /// or lagging peer) and may start another. No failover; the receiver's replica is
    /// detached (the primary may run on unprotected).
    Abandon,
    /// Backup → primary: this backup takes over the VM from its last committed checkpoint;
    /// the primary must fence its output and stop its VM.
    Takeover,
    /// Primary → backup: this primary cannot go on (its NIC died) and has fenced its output;
    /// the backup must take over now.
    Handover,
    /// A code this build does not know.
    Other(u32),
}

impl From<u32> for GoodbyeReason {
    fn from(code: u32) -> Self {
        match code {
            1 => Self::Stopping,
            2 => Self::Abandon,
            3 => Self::Takeover,
            4 => Self::Handover,
            other => Self::Other(other),
        }
    }
}

impl From<GoodbyeReason> for u32 {
    fn from(reason: GoodbyeReason) -> u32 {
        match reason {
            GoodbyeReason::Stopping => 1,
            GoodbyeReason::Abandon => 2,
            GoodbyeReason::Takeover => 3,
            GoodbyeReason::Handover => 4,
            GoodbyeReason::Other(code) => code,
        }
    }
}

impl fmt::Display for GoodbyeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stopping => f.write_str("stopping"),
            Self::Abandon => f.write_str("abandons the session"),
            Self::Takeover => f.write_str("takeover"),
            Self::Handover => f.write_str("handover"),
            Self::Other(code) => write!(f, "unknown reason {code}"),
        }
    }
}

/// Any message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloAck`].
    HelloAck(HelloAck),
    /// See [`Refuse`].
    Refuse(Refuse),
    /// See [`VmDescription`].
    VmDescription(VmDescription),
    /// See [`SyncPages`].
    SyncPages(SyncPages),
    /// See [`SyncZeroPages`].
    SyncZeroPages(SyncZeroPages),
    /// See [`SyncDone`].
    SyncDone(SyncDone),
    /// See [`EpochBegin`].
    EpochBegin(EpochBegin),
    /// See [`Pages`].
    Pages(Pages),
    /// See [`State`].
    State(State),
    /// See [`EpochEnd`].
    EpochEnd(EpochEnd),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`Goodbye`].
    Goodbye(Goodbye),
    /// See [`DiskWrites`].
    DiskWrites(DiskWrites),
    /// See [`SyncDisk`].
    SyncDisk(SyncDisk),
    /// See [`Inbound`].
    Inbound(Inbound),
    /// See [`CompressedPages`].
    CompressedPages(CompressedPages),
}

/// Type byte of a frame. The values are part of the wire format and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// [`Hello`]
    Hello = 1,
    /// [`HelloAck`]
    HelloAck = 2,
    /// [`Refuse`]
    Refuse = 3,
    /// [`VmDescription`]
    VmDescription = 4,
    /// [`SyncPages`]
    SyncPages = 5,
    /// [`SyncZeroPages`]
    SyncZeroPages = 6,
    /// [`SyncDone`]
    SyncDone = 7,
    /// [`EpochBegin`]
    EpochBegin = 8,
    /// [`Pages`]
    Pages = 9,
    /// [`State`]
    State = 10,
    /// [`EpochEnd`]
    EpochEnd = 11,
    /// [`Ack`]
    Ack = 12,
    /// [`Heartbeat`]
    Heartbeat = 13,
    /// [`Goodbye`]
    Goodbye = 14,
    /// [`DiskWrites`]
    DiskWrites = 15,
    /// [`SyncDisk`]
    SyncDisk = 16,
    /// [`Inbound`]
    Inbound = 17,
    /// [`CompressedPages`]
    CompressedPages = 18,
}

impl FrameType {
    /// Every frame type, in wire order.
    pub const ALL: [FrameType; 18] = [
        Self::Hello,
        Self::HelloAck,
        Self::Refuse,
        Self::VmDescription,
        Self::SyncPages,
        Self::SyncZeroPages,
        Self::SyncDone,
        Self::EpochBegin,
        Self::Pages,
        Self::State,
        Self::EpochEnd,
        Self::Ack,
        Self::Heartbeat,
        Self::Goodbye,
        Self::DiskWrites,
        Self::SyncDisk,
        Self::Inbound,
        Self::CompressedPages,
    ];

    /// The frame type with wire value `value`, if any.
    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.get(usize::from(value).checked_sub(1)?).copied()
    }
}

impl Message {
    /// The frame type this message is sent in.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::Hello(_) => FrameType::Hello,
            Self::HelloAck(_) => FrameType::HelloAck,
            Self::Refuse(_) => FrameType::Refuse,
            Self::VmDescription(_) => FrameType::VmDescription,
            Self::SyncPages(_) => FrameType::SyncPages,
            Self::SyncZeroPages(_) => FrameType::SyncZeroPages,
            Self::SyncDone(_) => FrameType::SyncDone,
            Self::EpochBegin(_) => FrameType::EpochBegin,
            Self::Pages(_) => FrameType::Pages,
            Self::State(_) => FrameType::State,
            Self::EpochEnd(_) => FrameType::EpochEnd,
            Self::Ack(_) => FrameType::Ack,
            Self::Heartbeat(_) => FrameType::Heartbeat,
            Self::Goodbye(_) => FrameType::Goodbye,
            Self::DiskWrites(_) => FrameType::DiskWrites,
            Self::SyncDisk(_) => FrameType::SyncDisk,
            Self::Inbound(_) => FrameType::Inbound,
            Self::CompressedPages(_) => FrameType::CompressedPages,
        }
    }

    /// Check the limits a message must respect beyond what its layout enforces (text and
    /// blob lengths, page sizes). Run by the encoder, so we never send what a peer would
    /// refuse, and by the decoder.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Self::Hello(h) => check_text("software_version", &h.software_version),
            Self::HelloAck(a) => check_text("software_version", &a.software_version),
            Self::Refuse(r) => check_text("detail", &r.detail),
            Self::Goodbye(g) => check_text("detail", &g.detail),
            Self::Inbound(i) => check_len("frame", i.frame.len(), MAX_INBOUND_FRAME),
            Self::VmDescription(d) => {
                check_len("config", d.config.len(), MAX_CONFIG_LEN)?;
                check_len("disks", d.disks.len(), MAX_DISKS)?;
                if let Some(&size) = d.disks.iter().find(|&&s| s == 0 || s % DISK_SECTOR != 0) {
                    return Err(ValidationError::Disk {
                        what: "size",
                        value: size,
                    });
                }
                d.geometry().map(|_| ()).map_err(ValidationError::Geometry)
            }
            Self::SyncPages(s) => check_pages(s.page_size, s.pages.iter().map(Page::as_ref)),
            Self::Pages(p) => check_pages(p.page_size, p.pages.iter().map(Page::as_ref)),
            Self::CompressedPages(p) => check_encoded_pages(
                p.page_size,
                p.pages.iter().map(|e| (e.index, e.encoding, e.data.len())),
            ),
            Self::State(s) => check_len("state", s.blob.len(), MAX_STATE_LEN),
            Self::EpochBegin(b) => check_len(
                "state_len",
                usize::try_from(b.state_len).unwrap_or(usize::MAX),
                MAX_STATE_LEN,
            ),
            Self::DiskWrites(w) => {
                check_len("disk", w.disk as usize, MAX_DISKS - 1)?;
                let mut data = 0usize;
                for e in &w.writes {
                    check_extent(e.offset, e.len())?;
                    if !e.data.is_empty() && e.zero_len != 0 {
                        return Err(ValidationError::Disk {
                            what: "extent with both data and a zero length at",
                            value: e.offset,
                        });
                    }
                    data += e.data.len();
                }
                check_len("disk write data", data, MAX_DISK_DATA)
            }
            Self::SyncDisk(d) => {
                check_len("disk", d.disk as usize, MAX_DISKS - 1)?;
                check_extent(d.offset, d.data.len() as u64)?;
                check_len("disk sync data", d.data.len(), MAX_DISK_DATA)
            }
            Self::SyncZeroPages(_)
            | Self::SyncDone(_)
            | Self::EpochEnd(_)
            | Self::Ack(_)
            | Self::Heartbeat(_) => Ok(()),
        }
    }
}

/// A message that breaks a limit of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A text or blob field is longer than its cap.
    #[error("field `{field}` is {len} bytes, more than the {max} allowed")]
    TooLong {
        /// Field name.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The page size is not a power of two within range.
    #[error("page size {page_size} is not a power of two in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}]")]
    PageSize {
        /// The rejected page size.
        page_size: u32,
    },
    /// A page's data is not exactly one page long.
    #[error("page {index} has {len} bytes, not the page size {page_size}")]
    PageLength {
        /// Page index.
        index: u64,
        /// Its data length.
        len: usize,
        /// Expected length.
        page_size: u32,
    },
    /// An encoded page's length does not suit its encoding (raw: exactly a page;
    /// compressed: at least one byte and less than a page).
    #[error("page {index} is {len} bytes {encoding:?}, the page size is {page_size}")]
    EncodedLength {
        /// Page index.
        index: u64,
        /// Its encoding.
        encoding: PageEncoding,
        /// Its data length.
        len: usize,
        /// The page size.
        page_size: u32,
    },
    /// The VM description's geometry is invalid.
    #[error("invalid VM geometry")]
    Geometry(#[source] GeometryError),
    /// A disk size, offset or length that is zero or not a multiple of 512.
    #[error("disk {what} {value} is zero or not a multiple of 512")]
    Disk {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
}

fn check_extent(offset: u64, len: u64) -> Result<(), ValidationError> {
    if offset % DISK_SECTOR != 0 {
        return Err(ValidationError::Disk {
            what: "offset",
            value: offset,
        });
    }
    if len == 0 || len % DISK_SECTOR != 0 {
        return Err(ValidationError::Disk {
            what: "length",
            value: len,
        });
    }
    Ok(())
}

pub(crate) fn check_page_size(page_size: u32) -> Result<(), ValidationError> {
    if page_size.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
        Ok(())
    } else {
        Err(ValidationError::PageSize { page_size })
    }
}

pub(crate) fn check_pages<'a>(
    page_size: u32,
    pages: impl Iterator<Item = PageRef<'a>>,
) -> Result<(), ValidationError> {
    check_page_size(page_size)?;
    for p in pages {
        if p.data.len() != page_size as usize {
            return Err(ValidationError::PageLength {
                index: p.index,
                len: p.data.len(),
                page_size,
            });
        }
    }
    Ok(())
}

pub(crate) fn check_encoded_pages(
    page_size: u32,
    pages: impl Iterator<Item = (u64, PageEncoding, usize)>,
) -> Result<(), ValidationError> {
    check_page_size(page_size)?;
    let ps = page_size as usize;
    for (index, encoding, len) in pages {
        let ok = match encoding {
            PageEncoding::Raw => len == ps,
            PageEncoding::Lz4 | PageEncoding::XorLz4 => (1..ps).contains(&len),
        };
        if !ok {
            return Err(ValidationError::EncodedLength {
                index,
                encoding,
                len,
                page_size,
            });
        }
    }
    Ok(())
}

fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), ValidationError> {
    if len > max {
        Err(ValidationError::TooLong { field, len, max })
    } else {
        Ok(())
    }
}

fn check_text(field: &'static str, text: &str) -> Result<(), ValidationError> {
    check_len(field, text.len(), MAX_TEXT_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_type_round_trips_through_u8() {
        for t in FrameType::ALL {
            assert_eq!(FrameType::from_u8(t as u8), Some(t));
        }
        assert_eq!(FrameType::from_u8(0), None);
        assert_eq!(FrameType::from_u8(19), None);
        assert_eq!(FrameType::from_u8(255), None);
    }

    #[test]
    fn an_inbound_frame_longer_than_a_buffer_is_invalid() {
        let ok = Message::Inbound(Inbound {
            epoch: 1,
            frame: vec![0; MAX_INBOUND_FRAME],
        });
        assert!(ok.validate().is_ok());
        let long = Message::Inbound(Inbound {
            epoch: 1,
            frame: vec![0; MAX_INBOUND_FRAME + 1],
        });
        assert!(long.validate().is_err());
    }

    #[test]
    fn refuse_reason_codes_are_stable() {
        for code in 0..10u32 {
            assert_eq!(u32::from(RefuseReason::from(code)), code);
        }
        assert_eq!(RefuseReason::from(1), RefuseReason::VersionMismatch);
    }

    #[test]
    fn goodbye_reason_codes_are_stable() {
        for code in 0..10u32 {
            assert_eq!(u32::from(GoodbyeReason::from(code)), code);
        }
        assert_eq!(GoodbyeReason::from(3), GoodbyeReason::Takeover);
        assert_eq!(GoodbyeReason::from(4), GoodbyeReason::Handover);
    }

    #[test]
    fn geometry_rejects_bad_sizes() {
        assert!(Geometry::new(1 << 20, 4096).is_ok());
        assert_eq!(Geometry::new(1 << 20, 4096).unwrap().page_count(), 256);
        assert!(matches!(
            Geometry::new(1 << 20, 4095),
            Err(GeometryError::PageSize { .. })
        ));
        assert!(matches!(
            Geometry::new(0, 4096),
            Err(GeometryError::MemSize { .. })
        ));
        assert!(matches!(
            Geometry::new(4096 + 1, 4096),
            Err(GeometryError::MemSize { .. })
        ));
        assert!(matches!(
            Geometry::new(1 << 30, 4 << 20),
            Err(GeometryError::PageSize { .. })
        ));
    }

    #[test]
    fn validate_enforces_caps() {
        let long = "x".repeat(MAX_TEXT_LEN + 1);
        let g = Message::Goodbye(Goodbye::new(GoodbyeReason::Abandon, long));
        assert!(matches!(
            g.validate(),
            Err(ValidationError::TooLong {
                field: "detail",
                ..
            })
        ));
        let p = Message::Pages(Pages {
            epoch: 1,
            page_size: 4096,
            pages: vec![Page {
                index: 3,
                data: Bytes::from(vec![0; 100]),
            }],
        });
        assert!(matches!(
            p.validate(),
            Err(ValidationError::PageLength { index: 3, .. })
        ));
        let b = Message::EpochBegin(EpochBegin {
            epoch: 1,
            page_count: 0,
            state_len: MAX_STATE_LEN as u64 + 1,
        });
        assert!(b.validate().is_err());
    }

    #[test]
    fn vm_id_displays_as_hex() {
        let mut id = [0u8; 16];
        id[0] = 0xab;
        id[15] = 0x01;
        assert_eq!(VmId(id).to_string(), "ab000000000000000000000000000001");
    }
}
