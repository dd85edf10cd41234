//! [`FrameCodec`]: tokio-util `Encoder`/`Decoder` for the replication stream.
//!
//! The decoder checks the header (magic, header check, reserved bits) and the payload
//! length cap *before* reserving room for a payload, so a corrupt or hostile peer can make
//! it allocate at most the cap. It never panics on any input.
//!
//! Page data is on the hot path: the encoder copies each page once, straight from the
//! caller's slice into the output buffer, computing the frame CRC while the page is still
//! in cache; the decoder returns pages as [`Bytes`] slices of the received frame.

use crate::checksum::EpochChecksum;
use crate::frame::{crc64, FrameHeader, HeaderError, DEFAULT_MAX_FRAME_LEN, HEADER_LEN};
use crate::message::{
    check_encoded_pages, check_page_size, Ack, CompressedPages, CompressedPagesRef, DiskExtent,
    DiskWrites, EpochBegin, EpochEnd, FrameType, Goodbye, Heartbeat, Hello, HelloAck, Inbound,
    Message, Page, PageRef, Pages, PagesRef, Refuse, State, StateRef, SyncDisk, SyncDone,
    SyncPages, SyncPagesRef, SyncZeroPages, ValidationError, VmDescription, MAX_STATE_LEN,
    PROTOCOL_VERSION,
};
use crate::message::{EncodedPage, EncodedPageRef};
use crate::pagecodec::PageEncoding;
use bincode::Options;
use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io;
use tokio_util::codec::{Decoder, Encoder};

/// Bytes before the page indices in a `Pages` payload: epoch u64, page_size u32, count u32.
const PAGES_PREFIX: usize = 16;
/// Bytes before the page indices in a `SyncPages` payload: page_size u32, count u32.
const SYNC_PAGES_PREFIX: usize = 8;
/// Bytes before the entry table of a `CompressedPages` payload: epoch u64, page_size u32,
/// count u32.
const COMPRESSED_PREFIX: usize = 16;
/// Bytes per entry of that table: index u64, encoding u8, reserved [u8; 3], data length u32.
pub(crate) const COMPRESSED_ENTRY_LEN: usize = 16;
/// Bytes before the blob in a `State` payload: epoch u64. (`SyncZeroPages` is just
/// `index u64 × n`.)
const STATE_PREFIX: usize = 8;

/// Encoder and decoder of frames. Holds only its configuration, so one value can serve both
/// directions of a connection (e.g. inside `tokio_util::codec::Framed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCodec {
    max_frame_len: u32,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new()
    }
}

/// A message that could not be encoded. Nothing is left in the output buffer.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The payload would exceed the frame length cap.
    #[error("{frame_type:?} payload of {len} bytes exceeds the frame cap of {max} bytes")]
    Oversize {
        /// Frame type.
        frame_type: FrameType,
        /// Payload length it would have.
        len: u64,
        /// The cap.
        max: u32,
    },
    /// The message breaks a protocol limit.
    #[error("invalid {frame_type:?} message")]
    Invalid {
        /// Frame type.
        frame_type: FrameType,
        /// What is wrong.
        #[source]
        source: ValidationError,
    },
    /// bincode failed to serialise a control message.
    #[error("cannot serialise {frame_type:?} message")]
    Bincode {
        /// Frame type.
        frame_type: FrameType,
        /// bincode's error.
        #[source]
        source: bincode::Error,
    },
    /// Writing the encoded frame to the transport failed.
    #[error("transport write failed")]
    Io(#[from] io::Error),
}

/// A frame that could not be decoded.
///
/// [`DecodeError::is_fatal`] tells whether the byte stream is still frame-synchronised.
/// Either way the protocol treats every decode error as the end of the session (see
/// `PROTOCOL.md`); continuing past a non-fatal error is only useful for diagnostics.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The frame header is corrupt; nothing was consumed.
    #[error("corrupt frame header")]
    Header(#[from] HeaderError),
    /// The header announces a payload above the cap; nothing was consumed or allocated.
    #[error("frame payload of {len} bytes exceeds the cap of {max} bytes")]
    Oversize {
        /// Announced payload length.
        len: u32,
        /// The cap.
        max: u32,
    },
    /// The frame type byte is not one this version knows; the frame was skipped.
    #[error("unknown frame type {frame_type}")]
    UnknownType {
        /// The type byte.
        frame_type: u8,
    },
    /// The payload does not match the header's CRC; the frame was skipped.
    #[error("payload checksum mismatch in frame type {frame_type}: header says {expected:#018x}, computed {computed:#018x}")]
    PayloadChecksum {
        /// The type byte.
        frame_type: u8,
        /// CRC carried in the header.
        expected: u64,
        /// CRC computed over the payload.
        computed: u64,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame: {have} bytes buffered, at least {need} needed")]
    Truncated {
        /// Bytes buffered at end of stream.
        have: usize,
        /// Bytes the frame needs.
        need: usize,
    },
    /// A page/state payload's layout is inconsistent; the frame was skipped.
    #[error("malformed {frame_type:?} payload")]
    Malformed {
        /// Frame type.
        frame_type: FrameType,
        /// What is inconsistent.
        #[source]
        source: LayoutError,
    },
    /// bincode could not decode a control message; the frame was skipped.
    #[error("cannot decode {frame_type:?} payload")]
    Bincode {
        /// Frame type.
        frame_type: FrameType,
        /// bincode's error.
        #[source]
        source: bincode::Error,
    },
    /// The message decoded but breaks a protocol limit; the frame was skipped.
    #[error("invalid {frame_type:?} message")]
    Invalid {
        /// Frame type.
        frame_type: FrameType,
        /// What is wrong.
        #[source]
        source: ValidationError,
    },
    /// A `Hello` from a peer of another protocol version that this build cannot decode. The
    /// backup answers with `Refuse { VersionMismatch }`.
    #[error("hello from protocol version {protocol_version} (ours is {PROTOCOL_VERSION}) does not decode")]
    IncompatibleHello {
        /// The peer's protocol version.
        protocol_version: u32,
    },
    /// Reading from the transport failed.
    #[error("transport read failed")]
    Io(#[from] io::Error),
}

impl DecodeError {
    /// Whether the byte stream has lost frame synchronisation (nothing after this error can
    /// be decoded). Non-fatal errors consumed exactly the offending frame.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::Header(_) | Self::Oversize { .. } | Self::Truncated { .. } | Self::Io(_)
        )
    }
}

/// An inconsistency in the hand-made layout of a `Pages`, `SyncPages` or `State` payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The payload is shorter than its fixed prefix.
    #[error("payload of {have} bytes is shorter than its {need}-byte prefix")]
    Short {
        /// Prefix length.
        need: usize,
        /// Payload length.
        have: usize,
    },
    /// The payload length is not a multiple of its element size.
    #[error("payload of {len} bytes is not a whole number of {unit}-byte entries")]
    NotMultiple {
        /// Payload length.
        len: usize,
        /// Entry size.
        unit: usize,
    },
    /// The payload length does not match the page count and size it declares.
    #[error("payload is {actual} bytes but {count} pages of {page_size} bytes need {expected}")]
    Length {
        /// Declared page count.
        count: u32,
        /// Declared page size.
        page_size: u32,
        /// Length implied by count and size.
        expected: u64,
        /// Actual payload length.
        actual: usize,
    },
    /// An entry of a `CompressedPages` table names an unknown encoding or has reserved
    /// bytes set.
    #[error("compressed page entry {entry}: {what}")]
    Entry {
        /// Position in the table.
        entry: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// The data lengths a `CompressedPages` table declares do not add up to its payload.
    #[error("compressed pages declare {declared} bytes of data, the payload holds {actual}")]
    EncodedData {
        /// Sum of the declared lengths.
        declared: u64,
        /// Bytes after the table.
        actual: usize,
    },
    /// The data lengths a `DiskWrites` declares do not add up to its payload.
    #[error("disk writes declare {declared} bytes of data, the payload holds {actual}")]
    DiskData {
        /// Sum of the declared data lengths.
        declared: u64,
        /// Bytes after the extent table.
        actual: usize,
    },
}

/// Bytes before the extent table of a `DiskWrites`: epoch u64, disk u32, count u32.
const DISK_WRITES_PREFIX: usize = 16;
/// Bytes per extent entry: offset, zero_len, data_len (u64 each).
const DISK_EXTENT_LEN: usize = 24;
/// Bytes before the data of a `SyncDisk`: disk u32, reserved u32, offset u64.
const SYNC_DISK_PREFIX: usize = 16;

fn bincode_options(limit: u64) -> impl Options + Copy {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(limit)
        .reject_trailing_bytes()
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl FrameCodec {
    /// A codec with the default frame cap ([`DEFAULT_MAX_FRAME_LEN`], 64 MiB).
    pub fn new() -> Self {
        Self {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
        }
    }

    /// A codec with another frame payload cap. Both peers should use the same cap; a smaller
    /// one on the receiver makes it refuse the sender's largest frames.
    pub fn with_max_frame_len(max_frame_len: u32) -> Self {
        Self { max_frame_len }
    }

    /// The frame payload cap.
    pub fn max_frame_len(&self) -> u32 {
        self.max_frame_len
    }

    /// The most pages of `page_size` bytes one `Pages` frame can carry under the cap.
    pub fn max_pages_per_frame(&self, page_size: u32) -> usize {
        let per_page = 8 + u64::from(page_size);
        let room = u64::from(self.max_frame_len).saturating_sub(PAGES_PREFIX as u64);
        usize::try_from((room / per_page).min(u64::from(u32::MAX))).unwrap_or(usize::MAX)
    }

    fn check_len(&self, frame_type: FrameType, len: u64) -> Result<(), EncodeError> {
        if len > u64::from(self.max_frame_len) {
            Err(EncodeError::Oversize {
                frame_type,
                len,
                max: self.max_frame_len,
            })
        } else {
            Ok(())
        }
    }

    /// Write the header of the frame whose payload occupies `dst[start + HEADER_LEN..]`.
    fn finish_frame(dst: &mut BytesMut, start: usize, frame_type: FrameType, payload_crc: u64) {
        let payload_len = dst.len() - start - HEADER_LEN;
        let header = FrameHeader {
            frame_type: frame_type as u8,
            flags: 0,
            // The callers checked the length against the cap, which is a u32.
            payload_len: payload_len as u32,
            payload_crc,
        };
        dst[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
    }

    fn encode_bincode<T: Serialize>(
        &self,
        frame_type: FrameType,
        value: &T,
        dst: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        let opts = bincode_options(u64::from(self.max_frame_len));
        let len = opts
            .serialized_size(value)
            .map_err(|source| match *source {
                bincode::ErrorKind::SizeLimit => EncodeError::Oversize {
                    frame_type,
                    len: u64::from(self.max_frame_len) + 1,
                    max: self.max_frame_len,
                },
                _ => EncodeError::Bincode { frame_type, source },
            })?;
        self.check_len(frame_type, len)?;
        let start = dst.len();
        dst.reserve(HEADER_LEN + len as usize);
        dst.put_bytes(0, HEADER_LEN);
        if let Err(source) = opts.serialize_into((&mut *dst).writer(), value) {
            dst.truncate(start);
            return Err(EncodeError::Bincode { frame_type, source });
        }
        let crc = crc64(&dst[start + HEADER_LEN..]);
        Self::finish_frame(dst, start, frame_type, crc);
        Ok(())
    }

    /// Shared encoder of `Pages` and `SyncPages`: `prefix` is written before
    /// `page_size u32 ‖ count u32 ‖ indices u64… ‖ data…`.
    fn encode_page_frame<'a, I>(
        &self,
        frame_type: FrameType,
        epoch: Option<u64>,
        page_size: u32,
        pages: I,
        mut checksum: Option<&mut EpochChecksum>,
        dst: &mut BytesMut,
    ) -> Result<(), EncodeError>
    where
        I: ExactSizeIterator<Item = PageRef<'a>> + Clone,
    {
        let invalid = |source| EncodeError::Invalid { frame_type, source };
        check_page_size(page_size).map_err(invalid)?;
        let count = pages.len() as u64;
        let prefix = if epoch.is_some() {
            PAGES_PREFIX
        } else {
            SYNC_PAGES_PREFIX
        };
        let len = prefix as u64 + count * (8 + u64::from(page_size));
        self.check_len(frame_type, len)?;
        for p in pages.clone() {
            if p.data.len() != page_size as usize {
                return Err(invalid(ValidationError::PageLength {
                    index: p.index,
                    len: p.data.len(),
                    page_size,
                }));
            }
        }
        let start = dst.len();
        dst.reserve(HEADER_LEN + len as usize);
        dst.put_bytes(0, HEADER_LEN);
        let payload_start = dst.len();
        if let Some(epoch) = epoch {
            dst.put_u64_le(epoch);
        }
        dst.put_u32_le(page_size);
        // `len` fits the u32 cap and each page takes more than one byte, so `count` fits too.
        dst.put_u32_le(count as u32);
        for p in pages.clone() {
            dst.put_u64_le(p.index);
        }
        let mut crc = crc64fast::Digest::new();
        crc.write(&dst[payload_start..]);
        for p in pages {
            // Copy, then CRC the page while it is still in L1.
            let at = dst.len();
            dst.extend_from_slice(p.data);
            crc.write(&dst[at..]);
            if let Some(c) = checksum.as_deref_mut() {
                c.page(p.index, &dst[at..]);
            }
        }
        Self::finish_frame(dst, start, frame_type, crc.sum64());
        Ok(())
    }

    /// Encode a batch of epoch pages straight from borrowed slices (the primary's hot path).
    pub fn encode_pages(&self, pages: PagesRef<'_>, dst: &mut BytesMut) -> Result<(), EncodeError> {
        self.encode_page_frame(
            FrameType::Pages,
            Some(pages.epoch),
            pages.page_size,
            pages.pages.iter().copied(),
            None,
            dst,
        )
    }

    /// [`FrameCodec::encode_pages`] that also feeds each page into the epoch checksum while
    /// it is in cache.
    pub(crate) fn encode_pages_checksummed(
        &self,
        pages: PagesRef<'_>,
        checksum: &mut EpochChecksum,
        dst: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        self.encode_page_frame(
            FrameType::Pages,
            Some(pages.epoch),
            pages.page_size,
            pages.pages.iter().copied(),
            Some(checksum),
            dst,
        )
    }

    /// Encode a batch of encoded epoch pages (`CompressedPages`) from borrowed slices,
    /// feeding each page's *decoded* contents into `checksum` when given.
    pub(crate) fn encode_compressed_pages(
        &self,
        pages: CompressedPagesRef<'_>,
        checksum: Option<&mut EpochChecksum>,
        dst: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        let frame_type = FrameType::CompressedPages;
        let invalid = |source| EncodeError::Invalid { frame_type, source };
        check_encoded_pages(
            pages.page_size,
            pages
                .pages
                .iter()
                .map(|p| (p.index, p.encoding, p.data.len())),
        )
        .map_err(invalid)?;
        let raw_wrong = |p: &&EncodedPageRef<'_>| p.raw.len() != pages.page_size as usize;
        if let Some(p) = checksum
            .is_some()
            .then(|| pages.pages.iter().find(raw_wrong))
            .flatten()
        {
            return Err(invalid(ValidationError::PageLength {
                index: p.index,
                len: p.raw.len(),
                page_size: pages.page_size,
            }));
        }
        let data: u64 = pages.pages.iter().map(|p| p.data.len() as u64).sum();
        let len = (COMPRESSED_PREFIX + COMPRESSED_ENTRY_LEN * pages.pages.len()) as u64 + data;
        self.check_len(frame_type, len)?;
        let start = dst.len();
        dst.reserve(HEADER_LEN + len as usize);
        dst.put_bytes(0, HEADER_LEN);
        dst.put_u64_le(pages.epoch);
        dst.put_u32_le(pages.page_size);
        // `len` fits the u32 cap and each entry takes 16 bytes, so the count fits too.
        dst.put_u32_le(pages.pages.len() as u32);
        for p in pages.pages {
            dst.put_u64_le(p.index);
            dst.put_u8(p.encoding as u8);
            dst.put_bytes(0, 3);
            // Checked above: at most a page, and a page is at most 2 MiB.
            dst.put_u32_le(p.data.len() as u32);
        }
        for p in pages.pages {
            dst.extend_from_slice(p.data);
        }
        let crc = crc64(&dst[start + HEADER_LEN..]);
        if let Some(c) = checksum {
            for p in pages.pages {
                c.page(p.index, p.raw);
            }
        }
        Self::finish_frame(dst, start, frame_type, crc);
        Ok(())
    }

    /// Encode a batch of initial-sync pages straight from borrowed slices.
    pub fn encode_sync_pages(
        &self,
        pages: SyncPagesRef<'_>,
        dst: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        self.encode_page_frame(
            FrameType::SyncPages,
            None,
            pages.page_size,
            pages.pages.iter().copied(),
            None,
            dst,
        )
    }

    fn encode_disk_writes(&self, w: &DiskWrites, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let frame_type = FrameType::DiskWrites;
        let data: u64 = w.writes.iter().map(|e| e.data.len() as u64).sum();
        let len = (DISK_WRITES_PREFIX + DISK_EXTENT_LEN * w.writes.len()) as u64 + data;
        self.check_len(frame_type, len)?;
        let start = dst.len();
        dst.reserve(HEADER_LEN + len as usize);
        dst.put_bytes(0, HEADER_LEN);
        dst.put_u64_le(w.epoch);
        dst.put_u32_le(w.disk);
        dst.put_u32_le(w.writes.len() as u32);
        for e in &w.writes {
            dst.put_u64_le(e.offset);
            dst.put_u64_le(e.zero_len);
            dst.put_u64_le(e.data.len() as u64);
        }
        for e in &w.writes {
            dst.put_slice(&e.data);
        }
        let crc = crc64(&dst[start + HEADER_LEN..]);
        Self::finish_frame(dst, start, frame_type, crc);
        Ok(())
    }

    fn encode_sync_disk(&self, d: &SyncDisk, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let frame_type = FrameType::SyncDisk;
        let len = (SYNC_DISK_PREFIX + d.data.len()) as u64;
        self.check_len(frame_type, len)?;
        let start = dst.len();
        dst.reserve(HEADER_LEN + len as usize);
        dst.put_bytes(0, HEADER_LEN);
        dst.put_u32_le(d.disk);
        dst.put_u32_le(0);
        dst.put_u64_le(d.offset);
        dst.put_slice(&d.data);
        let crc = crc64(&dst[start + HEADER_LEN..]);
        Self::finish_frame(dst, start, frame_type, crc);
        Ok(())
    }

    /// Encode a batch of zero-page indices (initial sync).
    pub fn encode_zero_pages(
        &self,
        indices: &[u64],
        dst: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        let frame_type = FrameType::SyncZeroPages;
        let len = indices.len() as u64 * 8;
        self.check_len(frame_type, len)?;
        let start = dst.len();
        dst.reserve(HEADER_LEN + len as usize);
        dst.put_bytes(0, HEADER_LEN);
        for &i in indices {
            dst.put_u64_le(i);
        }
        let crc = crc64(&dst[start + HEADER_LEN..]);
        Self::finish_frame(dst, start, frame_type, crc);
        Ok(())
    }

    /// Encode the state blob of an epoch from a borrowed slice.
    pub fn encode_state(&self, state: StateRef<'_>, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let frame_type = FrameType::State;
        if state.blob.len() > MAX_STATE_LEN {
            return Err(EncodeError::Invalid {
                frame_type,
                source: ValidationError::TooLong {
                    field: "state",
                    len: state.blob.len(),
                    max: MAX_STATE_LEN,
                },
            });
        }
        let len = (STATE_PREFIX + state.blob.len()) as u64;
        self.check_len(frame_type, len)?;
        let start = dst.len();
        dst.reserve(HEADER_LEN + len as usize);
        dst.put_bytes(0, HEADER_LEN);
        dst.put_u64_le(state.epoch);
        dst.extend_from_slice(state.blob);
        let crc = crc64(&dst[start + HEADER_LEN..]);
        Self::finish_frame(dst, start, frame_type, crc);
        Ok(())
    }

    /// Encode any message, appending one frame to `dst`.
    pub fn encode_message(&self, msg: &Message, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let frame_type = msg.frame_type();
        msg.validate()
            .map_err(|source| EncodeError::Invalid { frame_type, source })?;
        match msg {
            Message::Hello(m) => self.encode_bincode(frame_type, m, dst),
            Message::HelloAck(m) => self.encode_bincode(frame_type, m, dst),
            Message::Refuse(m) => self.encode_bincode(frame_type, m, dst),
            Message::VmDescription(m) => self.encode_bincode(frame_type, m, dst),
            Message::SyncZeroPages(m) => self.encode_zero_pages(&m.indices, dst),
            Message::SyncDone(m) => self.encode_bincode(frame_type, m, dst),
            Message::EpochBegin(m) => self.encode_bincode(frame_type, m, dst),
            Message::EpochEnd(m) => self.encode_bincode(frame_type, m, dst),
            Message::Ack(m) => self.encode_bincode(frame_type, m, dst),
            Message::Heartbeat(m) => self.encode_bincode(frame_type, m, dst),
            Message::Goodbye(m) => self.encode_bincode(frame_type, m, dst),
            Message::DiskWrites(m) => self.encode_disk_writes(m, dst),
            Message::SyncDisk(m) => self.encode_sync_disk(m, dst),
            Message::Inbound(m) => self.encode_bincode(frame_type, m, dst),
            Message::SyncPages(m) => self.encode_page_frame(
                frame_type,
                None,
                m.page_size,
                m.pages.iter().map(Page::as_ref),
                None,
                dst,
            ),
            Message::Pages(m) => self.encode_page_frame(
                frame_type,
                Some(m.epoch),
                m.page_size,
                m.pages.iter().map(Page::as_ref),
                None,
                dst,
            ),
            Message::CompressedPages(m) => {
                // Only the framing: a message of already decoded pages has no `raw` to
                // checksum (the epoch encoder uses `encode_compressed_pages`).
                let refs: Vec<EncodedPageRef<'_>> = m
                    .pages
                    .iter()
                    .map(|p| EncodedPageRef {
                        index: p.index,
                        encoding: p.encoding,
                        data: &p.data,
                        raw: &[],
                    })
                    .collect();
                self.encode_compressed_pages(
                    CompressedPagesRef {
                        epoch: m.epoch,
                        page_size: m.page_size,
                        pages: &refs,
                    },
                    None,
                    dst,
                )
            }
            Message::State(m) => self.encode_state(
                StateRef {
                    epoch: m.epoch,
                    blob: &m.blob,
                },
                dst,
            ),
        }
    }

    fn decode_payload(frame_type: FrameType, payload: Bytes) -> Result<Message, DecodeError> {
        fn bc<T: DeserializeOwned>(
            frame_type: FrameType,
            payload: &[u8],
        ) -> Result<T, DecodeError> {
            bincode_options(payload.len() as u64)
                .deserialize(payload)
                .map_err(|source| DecodeError::Bincode { frame_type, source })
        }
        let malformed = |source| DecodeError::Malformed { frame_type, source };
        let msg = match frame_type {
            FrameType::Hello => match bc::<Hello>(frame_type, &payload) {
                Ok(h) => Message::Hello(h),
                Err(e) => {
                    // The version is the frozen first field: report it if it is not ours.
                    if payload.len() >= 4 && read_u32(&payload, 0) != PROTOCOL_VERSION {
                        return Err(DecodeError::IncompatibleHello {
                            protocol_version: read_u32(&payload, 0),
                        });
                    }
                    return Err(e);
                }
            },
            FrameType::HelloAck => Message::HelloAck(bc::<HelloAck>(frame_type, &payload)?),
            FrameType::Refuse => Message::Refuse(bc::<Refuse>(frame_type, &payload)?),
            FrameType::VmDescription => {
                Message::VmDescription(bc::<VmDescription>(frame_type, &payload)?)
            }
            FrameType::SyncZeroPages => {
                if payload.len() % 8 != 0 {
                    return Err(malformed(LayoutError::NotMultiple {
                        len: payload.len(),
                        unit: 8,
                    }));
                }
                Message::SyncZeroPages(SyncZeroPages {
                    indices: payload.chunks_exact(8).map(|c| read_u64(c, 0)).collect(),
                })
            }
            FrameType::SyncDone => Message::SyncDone(bc::<SyncDone>(frame_type, &payload)?),
            FrameType::EpochBegin => Message::EpochBegin(bc::<EpochBegin>(frame_type, &payload)?),
            FrameType::EpochEnd => Message::EpochEnd(bc::<EpochEnd>(frame_type, &payload)?),
            FrameType::Ack => Message::Ack(bc::<Ack>(frame_type, &payload)?),
            FrameType::Heartbeat => Message::Heartbeat(bc::<Heartbeat>(frame_type, &payload)?),
            FrameType::Goodbye => Message::Goodbye(bc::<Goodbye>(frame_type, &payload)?),
            FrameType::DiskWrites => {
                Message::DiskWrites(decode_disk_writes(&payload).map_err(malformed)?)
            }
            FrameType::SyncDisk => {
                if payload.len() < SYNC_DISK_PREFIX {
                    return Err(malformed(LayoutError::Short {
                        need: SYNC_DISK_PREFIX,
                        have: payload.len(),
                    }));
                }
                Message::SyncDisk(SyncDisk {
                    disk: read_u32(&payload, 0),
                    offset: read_u64(&payload, 8),
                    data: payload.slice(SYNC_DISK_PREFIX..),
                })
            }
            FrameType::Inbound => Message::Inbound(bc::<Inbound>(frame_type, &payload)?),
            FrameType::SyncPages => {
                let (page_size, pages) =
                    decode_page_list(&payload, SYNC_PAGES_PREFIX).map_err(malformed)?;
                Message::SyncPages(SyncPages { page_size, pages })
            }
            FrameType::Pages => {
                if payload.len() < PAGES_PREFIX {
                    return Err(malformed(LayoutError::Short {
                        need: PAGES_PREFIX,
                        have: payload.len(),
                    }));
                }
                let epoch = read_u64(&payload, 0);
                let (page_size, pages) =
                    decode_page_list(&payload, PAGES_PREFIX).map_err(malformed)?;
                Message::Pages(Pages {
                    epoch,
                    page_size,
                    pages,
                })
            }
            FrameType::CompressedPages => {
                Message::CompressedPages(decode_compressed_pages(&payload).map_err(malformed)?)
            }
            FrameType::State => {
                if payload.len() < STATE_PREFIX {
                    return Err(malformed(LayoutError::Short {
                        need: STATE_PREFIX,
                        have: payload.len(),
                    }));
                }
                Message::State(State {
                    epoch: read_u64(&payload, 0),
                    blob: payload.slice(STATE_PREFIX..),
                })
            }
        };
        msg.validate()
            .map_err(|source| DecodeError::Invalid { frame_type, source })?;
        Ok(msg)
    }
}

/// Parse `epoch u64 ‖ disk u32 ‖ count u32 ‖ count × (offset, zero_len, data_len) ‖ data`.
/// The table is checked against the payload before anything is allocated for it; data are
/// zero-copy slices of `payload`.
fn decode_disk_writes(payload: &Bytes) -> Result<DiskWrites, LayoutError> {
    if payload.len() < DISK_WRITES_PREFIX {
        return Err(LayoutError::Short {
            need: DISK_WRITES_PREFIX,
            have: payload.len(),
        });
    }
    let count = read_u32(payload, 12) as usize;
    let table_end = DISK_WRITES_PREFIX as u64 + DISK_EXTENT_LEN as u64 * count as u64;
    if table_end > payload.len() as u64 {
        return Err(LayoutError::Short {
            need: table_end as usize,
            have: payload.len(),
        });
    }
    let table_end = table_end as usize;
    let actual = payload.len() - table_end;
    let mut declared = 0u64;
    for i in 0..count {
        let at = DISK_WRITES_PREFIX + i * DISK_EXTENT_LEN;
        declared = declared.saturating_add(read_u64(payload, at + 16));
    }
    if declared != actual as u64 {
        return Err(LayoutError::DiskData { declared, actual });
    }
    let mut writes = Vec::with_capacity(count);
    let mut data_at = table_end;
    for i in 0..count {
        let at = DISK_WRITES_PREFIX + i * DISK_EXTENT_LEN;
        let len = read_u64(payload, at + 16) as usize;
        writes.push(DiskExtent {
            offset: read_u64(payload, at),
            zero_len: read_u64(payload, at + 8),
            data: payload.slice(data_at..data_at + len),
        });
        data_at += len;
    }
    Ok(DiskWrites {
        epoch: read_u64(payload, 0),
        disk: read_u32(payload, 8),
        writes,
    })
}

/// Parse `epoch u64 ‖ page_size u32 ‖ count u32 ‖ count × (index u64, encoding u8,
/// reserved [u8; 3], len u32) ‖ data`. The table is checked against the payload before
/// anything is allocated for it; the data lengths must add up to exactly the bytes after
/// it; data are zero-copy slices of `payload`. (Lengths per encoding are checked by
/// `Message::validate`.)
fn decode_compressed_pages(payload: &Bytes) -> Result<CompressedPages, LayoutError> {
    if payload.len() < COMPRESSED_PREFIX {
        return Err(LayoutError::Short {
            need: COMPRESSED_PREFIX,
            have: payload.len(),
        });
    }
    let count = read_u32(payload, 12) as usize;
    let table_end = COMPRESSED_PREFIX as u64 + COMPRESSED_ENTRY_LEN as u64 * count as u64;
    if table_end > payload.len() as u64 {
        return Err(LayoutError::Short {
            need: usize::try_from(table_end).unwrap_or(usize::MAX),
            have: payload.len(),
        });
    }
    let table_end = table_end as usize;
    let actual = payload.len() - table_end;
    let mut declared = 0u64;
    for i in 0..count {
        let at = COMPRESSED_PREFIX + i * COMPRESSED_ENTRY_LEN;
        if payload[at + 9..at + 12] != [0, 0, 0] {
            return Err(LayoutError::Entry {
                entry: i,
                what: "reserved bytes are not zero",
            });
        }
        if PageEncoding::from_u8(payload[at + 8]).is_none() {
            return Err(LayoutError::Entry {
                entry: i,
                what: "unknown page encoding",
            });
        }
        declared += u64::from(read_u32(payload, at + 12));
    }
    if declared != actual as u64 {
        return Err(LayoutError::EncodedData { declared, actual });
    }
    let mut pages = Vec::with_capacity(count);
    let mut data_at = table_end;
    for i in 0..count {
        let at = COMPRESSED_PREFIX + i * COMPRESSED_ENTRY_LEN;
        let len = read_u32(payload, at + 12) as usize;
        pages.push(EncodedPage {
            index: read_u64(payload, at),
            encoding: PageEncoding::from_u8(payload[at + 8]).expect("checked above"),
            data: payload.slice(data_at..data_at + len),
        });
        data_at += len;
    }
    Ok(CompressedPages {
        epoch: read_u64(payload, 0),
        page_size: read_u32(payload, 8),
        pages,
    })
}

/// Parse `page_size u32 ‖ count u32 ‖ indices ‖ data` that follows `prefix - 8` other bytes.
/// Page data are zero-copy slices of `payload`.
fn decode_page_list(payload: &Bytes, prefix: usize) -> Result<(u32, Vec<Page>), LayoutError> {
    if payload.len() < prefix {
        return Err(LayoutError::Short {
            need: prefix,
            have: payload.len(),
        });
    }
    let page_size = read_u32(payload, prefix - 8);
    let count = read_u32(payload, prefix - 4);
    let expected = prefix as u64 + u64::from(count) * (8 + u64::from(page_size));
    if expected != payload.len() as u64 {
        return Err(LayoutError::Length {
            count,
            page_size,
            expected,
            actual: payload.len(),
        });
    }
    // From here every offset is within `payload`, whose length bounds `count`.
    let count = count as usize;
    let ps = page_size as usize;
    let data_start = prefix + 8 * count;
    let mut pages = Vec::with_capacity(count);
    for i in 0..count {
        let at = data_start + i * ps;
        pages.push(Page {
            index: read_u64(payload, prefix + 8 * i),
            data: payload.slice(at..at + ps),
        });
    }
    Ok((page_size, pages))
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
        if src.len() < 4 {
            return Ok(None);
        }
        // Report garbage as soon as four bytes are in, rather than waiting for a header.
        FrameHeader::check_magic(src)?;
        let Some(header_bytes) = src.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = FrameHeader::parse(header_bytes)?;
        if header.payload_len > self.max_frame_len {
            return Err(DecodeError::Oversize {
                len: header.payload_len,
                max: self.max_frame_len,
            });
        }
        let total = HEADER_LEN + header.payload_len as usize;
        if src.len() < total {
            // Bounded by the cap checked above: one allocation for the whole frame (which
            // `BytesMut` may round up to twice the capacity already held).
            src.reserve(total - src.len());
            return Ok(None);
        }
        let payload = src.split_to(total).freeze().slice(HEADER_LEN..);
        let computed = crc64(&payload);
        if computed != header.payload_crc {
            return Err(DecodeError::PayloadChecksum {
                frame_type: header.frame_type,
                expected: header.payload_crc,
                computed,
            });
        }
        let frame_type = FrameType::from_u8(header.frame_type).ok_or(DecodeError::UnknownType {
            frame_type: header.frame_type,
        })?;
        Self::decode_payload(frame_type, payload).map(Some)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
        match self.decode(buf)? {
            Some(msg) => Ok(Some(msg)),
            None if buf.is_empty() => Ok(None),
            None => {
                let need = match buf.first_chunk::<HEADER_LEN>() {
                    Some(h) => FrameHeader::parse(h)
                        .map(|h| HEADER_LEN + h.payload_len as usize)
                        .unwrap_or(HEADER_LEN),
                    None => HEADER_LEN,
                };
                Err(DecodeError::Truncated {
                    have: buf.len(),
                    need,
                })
            }
        }
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = EncodeError;

    fn encode(&mut self, item: Message, dst: &mut BytesMut) -> Result<(), EncodeError> {
        self.encode_message(&item, dst)
    }
}

impl Encoder<&Message> for FrameCodec {
    type Error = EncodeError;

    fn encode(&mut self, item: &Message, dst: &mut BytesMut) -> Result<(), EncodeError> {
        self.encode_message(item, dst)
    }
}

impl Encoder<PagesRef<'_>> for FrameCodec {
    type Error = EncodeError;

    fn encode(&mut self, item: PagesRef<'_>, dst: &mut BytesMut) -> Result<(), EncodeError> {
        self.encode_pages(item, dst)
    }
}

impl Encoder<SyncPagesRef<'_>> for FrameCodec {
    type Error = EncodeError;

    fn encode(&mut self, item: SyncPagesRef<'_>, dst: &mut BytesMut) -> Result<(), EncodeError> {
        self.encode_sync_pages(item, dst)
    }
}

impl Encoder<StateRef<'_>> for FrameCodec {
    type Error = EncodeError;

    fn encode(&mut self, item: StateRef<'_>, dst: &mut BytesMut) -> Result<(), EncodeError> {
        self.encode_state(item, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{GoodbyeReason, RefuseReason, Role, VmId};

    fn page(index: u64, size: usize) -> Page {
        Page {
            index,
            data: Bytes::from(
                (0..size)
                    .map(|i| (i as u64 ^ index) as u8)
                    .collect::<Vec<_>>(),
            ),
        }
    }

    /// One message of every type.
    pub(crate) fn every_message() -> Vec<Message> {
        vec![
            Message::Hello(Hello::new(Role::Primary, VmId([9; 16]), 42)),
            Message::HelloAck(HelloAck {
                protocol_version: PROTOCOL_VERSION,
                software_version: "twin test".into(),
                vm_id: VmId([1; 16]),
                generation: 7,
            }),
            Message::Refuse(Refuse {
                reason: RefuseReason::Other(99),
                detail: "because".into(),
            }),
            Message::VmDescription(VmDescription {
                mem_size: 64 << 20,
                page_size: 4096,
                vcpus: 2,
                mac: [0x52, 0x54, 0, 1, 2, 3],
                config: b"{\"net\":true}".to_vec(),
                disks: Vec::new(),
            }),
            Message::SyncPages(SyncPages {
                page_size: 4096,
                pages: vec![page(0, 4096), page(17, 4096)],
            }),
            Message::SyncPages(SyncPages {
                page_size: 512,
                pages: vec![],
            }),
            Message::SyncZeroPages(SyncZeroPages {
                indices: vec![1, 2, 3, u64::MAX],
            }),
            Message::SyncDone(SyncDone {
                pages_sent: 12,
                disk_bytes_sent: 0,
            }),
            Message::EpochBegin(EpochBegin {
                epoch: 5,
                page_count: 2,
                state_len: 3,
            }),
            Message::Pages(Pages {
                epoch: 5,
                page_size: 4096,
                pages: vec![page(3, 4096), page(1, 4096)],
            }),
            Message::State(State {
                epoch: 5,
                blob: Bytes::from_static(b"abc"),
            }),
            Message::State(State {
                epoch: 6,
                blob: Bytes::new(),
            }),
            Message::EpochEnd(EpochEnd {
                epoch: 5,
                page_count: 2,
                total_bytes: 8195,
                checksum: 0xdead_beef,
            }),
            Message::Ack(Ack { epoch: 5 }),
            Message::Heartbeat(Heartbeat {
                seq: 1,
                sent_at_ns: 2,
                last_epoch: 3,
            }),
            Message::Goodbye(Goodbye::new(GoodbyeReason::Stopping, "shutdown")),
            Message::Inbound(Inbound {
                epoch: 9,
                frame: vec![0xab; 74],
            }),
        ]
    }

    fn encode(msg: &Message) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::new().encode(msg, &mut buf).unwrap();
        buf
    }

    /// A frame with valid header and CRC around an arbitrary payload.
    fn raw_frame(frame_type: u8, payload: &[u8]) -> BytesMut {
        let header = FrameHeader {
            frame_type,
            flags: 0,
            payload_len: payload.len() as u32,
            payload_crc: crc64(payload),
        };
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&header.to_bytes());
        buf.extend_from_slice(payload);
        buf
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = every_message();
        let mut stream = BytesMut::new();
        let mut codec = FrameCodec::new();
        for m in &msgs {
            codec.encode(m.clone(), &mut stream).unwrap();
        }
        let mut decoded = Vec::new();
        while let Some(m) = codec.decode_eof(&mut stream).unwrap() {
            decoded.push(m);
        }
        assert_eq!(decoded, msgs);
        assert!(stream.is_empty());
    }

    #[test]
    fn borrowed_encoders_match_owned_ones() {
        let pages = [page(3, 4096), page(1, 4096)];
        let refs: Vec<PageRef<'_>> = pages.iter().map(Page::as_ref).collect();
        let mut a = BytesMut::new();
        let mut codec = FrameCodec::new();
        codec
            .encode(
                PagesRef {
                    epoch: 5,
                    page_size: 4096,
                    pages: &refs,
                },
                &mut a,
            )
            .unwrap();
        let owned = Message::Pages(Pages {
            epoch: 5,
            page_size: 4096,
            pages: pages.to_vec(),
        });
        assert_eq!(a, encode(&owned));
        let mut b = BytesMut::new();
        codec
            .encode(
                SyncPagesRef {
                    page_size: 4096,
                    pages: &refs,
                },
                &mut b,
            )
            .unwrap();
        assert_eq!(
            b,
            encode(&Message::SyncPages(SyncPages {
                page_size: 4096,
                pages: pages.to_vec()
            }))
        );
        let mut c = BytesMut::new();
        codec
            .encode(
                StateRef {
                    epoch: 2,
                    blob: b"xyz",
                },
                &mut c,
            )
            .unwrap();
        assert_eq!(
            c,
            encode(&Message::State(State {
                epoch: 2,
                blob: Bytes::from_static(b"xyz")
            }))
        );
    }

    #[test]
    fn decoded_pages_share_the_frame_buffer() {
        let msg = Message::Pages(Pages {
            epoch: 1,
            page_size: 4096,
            pages: vec![page(0, 4096), page(1, 4096)],
        });
        let mut buf = encode(&msg);
        let range = buf.as_ptr_range();
        let Some(Message::Pages(p)) = FrameCodec::new().decode(&mut buf).unwrap() else {
            panic!("not pages");
        };
        for pg in &p.pages {
            assert!(range.contains(&pg.data.as_ptr()), "page data was copied");
        }
    }

    #[test]
    fn partial_input_waits_and_reserves_at_most_the_frame() {
        let full = encode(&Message::Pages(Pages {
            epoch: 1,
            page_size: 4096,
            pages: vec![page(0, 4096)],
        }));
        let mut codec = FrameCodec::new();
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert!(codec.decode(&mut part).unwrap().is_none(), "cut {cut}");
            // `BytesMut` may round a reservation up to twice the current capacity.
            assert!(
                part.capacity() <= 2 * full.len().max(cut),
                "cut {cut} cap {} full {}",
                part.capacity(),
                full.len()
            );
            assert!(matches!(
                codec.decode_eof(&mut part),
                Err(DecodeError::Truncated { .. }) | Ok(None)
            ));
        }
        let mut part = BytesMut::from(&full[..30]);
        match codec.decode_eof(&mut part) {
            Err(DecodeError::Truncated { have: 30, need }) => assert_eq!(need, full.len()),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bad_magic_is_fatal_and_consumes_nothing() {
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        let err = FrameCodec::new().decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::Header(HeaderError::BadMagic { found }) if &found == b"GET "
        ));
        assert!(err.is_fatal());
        assert_eq!(buf.len(), 16);
    }

    #[test]
    fn corrupt_header_is_fatal() {
        let mut buf = encode(&Message::Ack(Ack { epoch: 1 }));
        buf[9] ^= 0x10; // payload length
        let err = FrameCodec::new().decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::Header(HeaderError::HeaderChecksum { .. })
        ));
        assert!(err.is_fatal());
    }

    #[test]
    fn oversize_is_refused_before_allocating() {
        let header = FrameHeader {
            frame_type: FrameType::Pages as u8,
            flags: 0,
            payload_len: u32::MAX,
            payload_crc: 0,
        };
        let mut buf = BytesMut::from(&header.to_bytes()[..]);
        let cap = buf.capacity();
        let err = FrameCodec::new().decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::Oversize {
                len: u32::MAX,
                max: DEFAULT_MAX_FRAME_LEN
            }
        ));
        assert!(err.is_fatal());
        assert_eq!(buf.capacity(), cap);
        // A smaller cap applies to otherwise valid frames.
        let mut buf = encode(&Message::State(State {
            epoch: 1,
            blob: Bytes::from(vec![0; 100]),
        }));
        assert!(matches!(
            FrameCodec::with_max_frame_len(50).decode(&mut buf),
            Err(DecodeError::Oversize { len: 108, max: 50 })
        ));
    }

    #[test]
    fn payload_checksum_mismatch_skips_the_frame() {
        let mut buf = encode(&Message::Heartbeat(Heartbeat {
            seq: 1,
            sent_at_ns: 2,
            last_epoch: 3,
        }));
        let ack = encode(&Message::Ack(Ack { epoch: 9 }));
        let last = buf.len() - 1;
        buf[last] ^= 1;
        buf.extend_from_slice(&ack);
        let mut codec = FrameCodec::new();
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::PayloadChecksum { frame_type: 13, .. }
        ));
        assert!(!err.is_fatal());
        assert_eq!(
            codec.decode(&mut buf).unwrap(),
            Some(Message::Ack(Ack { epoch: 9 }))
        );
    }

    #[test]
    fn unknown_type_skips_the_frame() {
        let mut buf = raw_frame(200, b"future");
        let err = FrameCodec::new().decode(&mut buf).unwrap_err();
        assert!(matches!(err, DecodeError::UnknownType { frame_type: 200 }));
        assert!(!err.is_fatal());
        assert!(buf.is_empty());
        let mut buf = raw_frame(0, b"");
        assert!(matches!(
            FrameCodec::new().decode(&mut buf),
            Err(DecodeError::UnknownType { frame_type: 0 })
        ));
    }

    #[test]
    fn bincode_errors_are_typed() {
        // Truncated Ack.
        let mut buf = raw_frame(FrameType::Ack as u8, &[1, 2, 3]);
        assert!(matches!(
            FrameCodec::new().decode(&mut buf),
            Err(DecodeError::Bincode {
                frame_type: FrameType::Ack,
                ..
            })
        ));
        // Trailing bytes.
        let mut buf = raw_frame(FrameType::Ack as u8, &[0; 9]);
        assert!(matches!(
            FrameCodec::new().decode(&mut buf),
            Err(DecodeError::Bincode { .. })
        ));
        // Invalid enum tag for the role in a Hello of our version.
        let mut payload = PROTOCOL_VERSION.to_le_bytes().to_vec();
        payload.extend_from_slice(&0u64.to_le_bytes()); // empty software version
        payload.extend_from_slice(&7u32.to_le_bytes()); // role 7
        payload.extend_from_slice(&[0; 24]);
        let mut buf = raw_frame(FrameType::Hello as u8, &payload);
        assert!(matches!(
            FrameCodec::new().decode(&mut buf),
            Err(DecodeError::Bincode {
                frame_type: FrameType::Hello,
                ..
            })
        ));
    }

    #[test]
    fn huge_length_prefix_inside_a_small_frame_does_not_allocate() {
        // VmDescription whose config claims 2^40 bytes in a small payload.
        let mut payload = vec![0u8; 8 + 4 + 4 + 6];
        payload[..8].copy_from_slice(&4096u64.to_le_bytes());
        payload[8..12].copy_from_slice(&4096u32.to_le_bytes());
        payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
        payload.extend_from_slice(&[0; 8]);
        let mut buf = raw_frame(FrameType::VmDescription as u8, &payload);
        assert!(matches!(
            FrameCodec::new().decode(&mut buf),
            Err(DecodeError::Bincode { .. })
        ));
        // Zero-page indices must be whole u64s.
        let mut buf = raw_frame(FrameType::SyncZeroPages as u8, &[0; 12]);
        assert!(matches!(
            FrameCodec::new().decode(&mut buf),
            Err(DecodeError::Malformed {
                source: LayoutError::NotMultiple { len: 12, unit: 8 },
                ..
            })
        ));
        // Goodbye with a string of 2^62 bytes.
        let payload = (1u64 << 62).to_le_bytes();
        let mut buf = raw_frame(FrameType::Goodbye as u8, &payload);
        assert!(matches!(
            FrameCodec::new().decode(&mut buf),
            Err(DecodeError::Bincode { .. })
        ));
    }

    #[test]
    fn malformed_page_layouts_are_typed() {
        let mut codec = FrameCodec::new();
        let mut buf = raw_frame(FrameType::Pages as u8, &[0; 10]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(DecodeError::Malformed {
                source: LayoutError::Short { need: 16, have: 10 },
                ..
            })
        ));
        // One 4 KiB page declared, none present.
        let mut payload = 1u64.to_le_bytes().to_vec();
        payload.extend_from_slice(&4096u32.to_le_bytes());
        payload.extend_from_slice(&1u32.to_le_bytes());
        let mut buf = raw_frame(FrameType::Pages as u8, &payload);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(DecodeError::Malformed {
                source: LayoutError::Length { count: 1, .. },
                ..
            })
        ));
        // u32::MAX pages declared: no overflow, no allocation.
        let mut payload = 4096u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut buf = raw_frame(FrameType::SyncPages as u8, &payload);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(DecodeError::Malformed { .. })
        ));
        // Page size that is not a power of two.
        let mut payload = 1000u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&0u32.to_le_bytes());
        let mut buf = raw_frame(FrameType::SyncPages as u8, &payload);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(DecodeError::Invalid {
                source: ValidationError::PageSize { page_size: 1000 },
                ..
            })
        ));
        let mut buf = raw_frame(FrameType::State as u8, &[0; 7]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(DecodeError::Malformed {
                frame_type: FrameType::State,
                ..
            })
        ));
    }

    #[test]
    fn oversize_state_is_invalid_on_both_sides() {
        let blob = vec![0u8; MAX_STATE_LEN + 1];
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        assert!(matches!(
            codec.encode(
                StateRef {
                    epoch: 1,
                    blob: &blob
                },
                &mut buf
            ),
            Err(EncodeError::Invalid { .. })
        ));
        assert!(buf.is_empty());
        let mut payload = 1u64.to_le_bytes().to_vec();
        payload.extend_from_slice(&blob);
        let mut buf = raw_frame(FrameType::State as u8, &payload);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(DecodeError::Invalid {
                source: ValidationError::TooLong { field: "state", .. },
                ..
            })
        ));
    }

    #[test]
    fn encoder_refuses_invalid_and_oversize_messages() {
        let mut codec = FrameCodec::with_max_frame_len(10_000);
        let mut buf = BytesMut::new();
        let three = vec![page(0, 4096), page(1, 4096), page(2, 4096)];
        let err = codec
            .encode(
                Message::Pages(Pages {
                    epoch: 1,
                    page_size: 4096,
                    pages: three,
                }),
                &mut buf,
            )
            .unwrap_err();
        assert!(matches!(err, EncodeError::Oversize { .. }), "{err}");
        let err = codec
            .encode(
                Message::Pages(Pages {
                    epoch: 1,
                    page_size: 4096,
                    pages: vec![page(0, 100)],
                }),
                &mut buf,
            )
            .unwrap_err();
        assert!(matches!(err, EncodeError::Invalid { .. }));
        let err = codec
            .encode(
                Message::VmDescription(VmDescription {
                    mem_size: 4096,
                    page_size: 4096,
                    vcpus: 1,
                    mac: [0; 6],
                    config: vec![0; 20_000],
                    disks: Vec::new(),
                }),
                &mut buf,
            )
            .unwrap_err();
        assert!(matches!(err, EncodeError::Oversize { .. }), "{err}");
        assert!(buf.is_empty(), "failed encodes must leave nothing behind");
        assert_eq!(codec.max_pages_per_frame(4096), 2);
    }
}
