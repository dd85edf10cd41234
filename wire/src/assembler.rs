//! The backup's epoch assembler: a pure state machine that turns a sequence of decoded
//! epoch messages into whole, verified checkpoints.
//!
//! An epoch is accepted only as `EpochBegin`, zero or more `Pages` batches, zero or more
//! `DiskWrites` (each within a disk of the VM), exactly one `State`, `EpochEnd`, for exactly the next epoch number, with every count, length and the
//! end-to-end checksum matching. Anything else is a typed [`AssembleError`]; the partial
//! epoch is dropped and the committed position ([`EpochAssembler::next_epoch`]) is unchanged,
//! so the replica only ever sees whole epochs.

use crate::checksum::EpochChecksum;
use crate::message::{
    CompressedPages, DiskWrites, EpochBegin, EpochEnd, FrameType, Geometry, Message, Page, Pages,
    State, MAX_STATE_LEN,
};
use crate::pagecodec::{decode_page, PageCodecError, PageEncoding};

/// Most bytes of disk writes one epoch may carry (the backup holds them until the end).
pub const MAX_EPOCH_DISK_BYTES: u64 = 1 << 30;
use bytes::Bytes;
use tracing::debug;

/// The subset of [`Message`] that makes up an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EpochMessage {
    /// Start of an epoch.
    Begin(EpochBegin),
    /// A batch of its pages.
    Pages(Pages),
    /// A batch of its pages, each encoded (raw, LZ4 or a delta).
    Compressed(CompressedPages),
    /// Writes to one of its disks.
    Disk(DiskWrites),
    /// Its state blob.
    State(State),
    /// Its end and checksum.
    End(EpochEnd),
}

impl EpochMessage {
    /// Epoch number the message names.
    pub fn epoch(&self) -> u64 {
        match self {
            Self::Begin(m) => m.epoch,
            Self::Pages(m) => m.epoch,
            Self::Compressed(m) => m.epoch,
            Self::Disk(m) => m.epoch,
            Self::State(m) => m.epoch,
            Self::End(m) => m.epoch,
        }
    }

    /// Frame type the message travels in.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::Begin(_) => FrameType::EpochBegin,
            Self::Pages(_) => FrameType::Pages,
            Self::Compressed(_) => FrameType::CompressedPages,
            Self::Disk(_) => FrameType::DiskWrites,
            Self::State(_) => FrameType::State,
            Self::End(_) => FrameType::EpochEnd,
        }
    }
}

impl TryFrom<Message> for EpochMessage {
    /// Messages that are not part of an epoch are handed back unchanged.
    type Error = Message;

    fn try_from(msg: Message) -> Result<Self, Message> {
        match msg {
            Message::EpochBegin(m) => Ok(Self::Begin(m)),
            Message::Pages(m) => Ok(Self::Pages(m)),
            Message::CompressedPages(m) => Ok(Self::Compressed(m)),
            Message::DiskWrites(m) => Ok(Self::Disk(m)),
            Message::State(m) => Ok(Self::State(m)),
            Message::EpochEnd(m) => Ok(Self::End(m)),
            other => Err(other),
        }
    }
}

impl From<EpochMessage> for Message {
    fn from(msg: EpochMessage) -> Message {
        match msg {
            EpochMessage::Begin(m) => Message::EpochBegin(m),
            EpochMessage::Pages(m) => Message::Pages(m),
            EpochMessage::Compressed(m) => Message::CompressedPages(m),
            EpochMessage::Disk(m) => Message::DiskWrites(m),
            EpochMessage::State(m) => Message::State(m),
            EpochMessage::End(m) => Message::EpochEnd(m),
        }
    }
}

/// Where the assembler reads the *base* of a delta page ([`PageEncoding::XorLz4`]): the
/// page as the backup's replica holds it **as of its last committed epoch** (the session's
/// initial sync included). That is exactly what the primary deltas against — the contents
/// it last sent for the page — because (1) after the sync only a committed epoch writes the
/// replica's memory, whole or not at all; (2) an epoch names a page at most once (a second
/// copy is [`AssembleError::DuplicatePage`]; pre-copy merges its two copies into one on the
/// primary); (3) epochs are assembled one at a time and applied before the next one is
/// assembled, so while an epoch is open the replica is its predecessor's; (4) a failed epoch
/// ends the session, and a new session starts from a full sync with an empty delta cache.
///
/// One small trait so that the replica's memory can live anywhere (RAM, a file).
pub trait BasePages {
    /// Copies page `index` (in range: the assembler checked it) as of the last committed
    /// epoch into `buf`, exactly one page.
    fn read_committed_page(&self, index: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

/// No replica to read from: a delta page is an error ([`EpochAssembler::push`]).
struct NoBase;

impl BasePages for NoBase {
    fn read_committed_page(&self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "no replica to read a base page from",
        ))
    }
}

/// A whole, verified checkpoint, ready to be applied to the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompleteEpoch {
    /// Epoch number.
    pub epoch: u64,
    /// Dirty pages, in the order they were sent (indices are distinct and in range).
    pub pages: Vec<Page>,
    /// Writes to the disks, per message in the order sent (apply them in this order).
    pub disk_writes: Vec<DiskWrites>,
    /// vCPU and device state.
    pub state: Bytes,
    /// The verified end-to-end checksum.
    pub checksum: u64,
}

/// Why a message was rejected. The partial epoch, if any, was discarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    /// `EpochBegin` for an epoch already committed (a duplicate or replay).
    #[error("epoch {epoch} already committed (next expected is {next})")]
    Stale {
        /// The epoch received.
        epoch: u64,
        /// The next epoch expected.
        next: u64,
    },
    /// `EpochBegin` skips epochs: the pages dirtied in the missing ones are lost.
    #[error("epoch {got} received but {expected} expected")]
    Gap {
        /// The next epoch expected.
        expected: u64,
        /// The epoch received.
        got: u64,
    },
    /// `EpochBegin` for epoch `u64::MAX`, after which no epoch could follow.
    #[error("epoch number space exhausted")]
    EpochOverflow,
    /// `EpochBegin` while another epoch is still open.
    #[error("epoch {got} begins while epoch {open} is still open")]
    BeginWhileOpen {
        /// The open epoch (discarded).
        open: u64,
        /// The epoch that began.
        got: u64,
    },
    /// `Pages`, `State` or `EpochEnd` with no epoch open.
    #[error("{frame_type:?} for epoch {epoch} with no epoch open")]
    NotOpen {
        /// The message's frame type.
        frame_type: FrameType,
        /// The epoch it names.
        epoch: u64,
    },
    /// `Pages`, `State` or `EpochEnd` naming another epoch than the open one.
    #[error("{frame_type:?} for epoch {got} while epoch {open} is open")]
    WrongEpoch {
        /// The message's frame type.
        frame_type: FrameType,
        /// The open epoch.
        open: u64,
        /// The epoch it names.
        got: u64,
    },
    /// `DiskWrites` after the state.
    #[error("epoch {epoch}: disk writes after the state")]
    DiskAfterState {
        /// The epoch.
        epoch: u64,
    },
    /// `DiskWrites` for a disk the VM does not have.
    #[error("epoch {epoch}: writes to disk {disk}, the VM has {disks}")]
    NoSuchDisk {
        /// The epoch.
        epoch: u64,
        /// The disk named.
        disk: u32,
        /// Disks of the VM.
        disks: usize,
    },
    /// A disk write outside its disk.
    #[error("epoch {epoch}: a write of {len} bytes at {offset} is outside disk {disk} ({capacity} bytes)")]
    DiskOutOfRange {
        /// The epoch.
        epoch: u64,
        /// The disk.
        disk: u32,
        /// Offset of the write.
        offset: u64,
        /// Its length.
        len: u64,
        /// The disk's size.
        capacity: u64,
    },
    /// More disk data in one epoch than [`MAX_EPOCH_DISK_BYTES`].
    #[error("epoch {epoch}: more than {max} bytes of disk writes")]
    DiskTooMuch {
        /// The epoch.
        epoch: u64,
        /// The cap.
        max: u64,
    },
    /// `EpochBegin` announces more pages than the VM has.
    #[error("epoch {epoch} announces {declared} pages, the VM has {max}")]
    TooManyPagesDeclared {
        /// The epoch.
        epoch: u64,
        /// Announced page count.
        declared: u64,
        /// Pages in the VM.
        max: u64,
    },
    /// `EpochBegin` announces a state blob above the cap.
    #[error("epoch {epoch} announces {declared} bytes of state, the cap is {max}")]
    StateTooLarge {
        /// The epoch.
        epoch: u64,
        /// Announced state length.
        declared: u64,
        /// The cap.
        max: u64,
    },
    /// A batch's page size is not the VM's.
    #[error("epoch {epoch}: page size {got}, the VM's is {expected}")]
    PageSize {
        /// The epoch.
        epoch: u64,
        /// The VM's page size.
        expected: u32,
        /// The batch's page size.
        got: u32,
    },
    /// A page's data is not exactly one page long.
    #[error("epoch {epoch}: page {index} has {len} bytes, not {page_size}")]
    PageLength {
        /// The epoch.
        epoch: u64,
        /// Page index.
        index: u64,
        /// Data length.
        len: usize,
        /// The VM's page size.
        page_size: u32,
    },
    /// A page index beyond the end of guest memory.
    #[error("epoch {epoch}: page index {index} out of range (the VM has {page_count} pages)")]
    PageOutOfRange {
        /// The epoch.
        epoch: u64,
        /// The index.
        index: u64,
        /// Pages in the VM.
        page_count: u64,
    },
    /// The same page twice in one epoch.
    #[error("epoch {epoch}: page {index} sent twice")]
    DuplicatePage {
        /// The epoch.
        epoch: u64,
        /// The index.
        index: u64,
    },
    /// A page of a `CompressedPages` batch does not decode (corrupt LZ4, wrong length, a
    /// delta with no base).
    #[error("epoch {epoch}: page {index} does not decode")]
    PageDecode {
        /// The epoch.
        epoch: u64,
        /// The page.
        index: u64,
        /// Why.
        #[source]
        source: PageCodecError,
    },
    /// The base of a delta page could not be read from the replica.
    #[error("epoch {epoch}: the committed copy of page {index} cannot be read: {detail}")]
    BasePage {
        /// The epoch.
        epoch: u64,
        /// The page.
        index: u64,
        /// The replica's error.
        detail: String,
    },
    /// More pages arrived than `EpochBegin` announced.
    #[error("epoch {epoch}: more than the {declared} pages announced")]
    ExcessPages {
        /// The epoch.
        epoch: u64,
        /// Announced page count.
        declared: u64,
    },
    /// `Pages` after the epoch's `State`.
    #[error("epoch {epoch}: pages after the state")]
    PagesAfterState {
        /// The epoch.
        epoch: u64,
    },
    /// `State` before all announced pages arrived.
    #[error("epoch {epoch}: state after {received} of {declared} announced pages")]
    MissingPages {
        /// The epoch.
        epoch: u64,
        /// Announced page count.
        declared: u64,
        /// Pages received.
        received: u64,
    },
    /// A second `State` in one epoch.
    #[error("epoch {epoch}: state sent twice")]
    DuplicateState {
        /// The epoch.
        epoch: u64,
    },
    /// The state blob's length is not the one announced.
    #[error("epoch {epoch}: state of {got} bytes, {declared} announced")]
    StateLength {
        /// The epoch.
        epoch: u64,
        /// Announced length.
        declared: u64,
        /// Received length.
        got: u64,
    },
    /// `EpochEnd` before the state.
    #[error("epoch {epoch}: end before the state")]
    MissingState {
        /// The epoch.
        epoch: u64,
    },
    /// `EpochEnd`'s page count or byte count disagrees with what arrived.
    #[error(
        "epoch {epoch}: end says {end_pages} pages / {end_bytes} bytes, received {pages} / {bytes}"
    )]
    EndMismatch {
        /// The epoch.
        epoch: u64,
        /// Page count in `EpochEnd`.
        end_pages: u64,
        /// Byte count in `EpochEnd`.
        end_bytes: u64,
        /// Pages received.
        pages: u64,
        /// Bytes received.
        bytes: u64,
    },
    /// The end-to-end checksum does not match.
    #[error(
        "epoch {epoch}: checksum mismatch: end says {expected:#018x}, computed {computed:#018x}"
    )]
    Checksum {
        /// The epoch.
        epoch: u64,
        /// Checksum in `EpochEnd`.
        expected: u64,
        /// Checksum of what arrived.
        computed: u64,
    },
}

struct Partial {
    begin: EpochBegin,
    pages: Vec<Page>,
    disk: Vec<DiskWrites>,
    disk_bytes: u64,
    state: Option<Bytes>,
    checksum: EpochChecksum,
}

/// Assembles epochs for the backup; see the module documentation.
pub struct EpochAssembler {
    geometry: Geometry,
    max_state_len: u64,
    /// Sizes of the VM's disks (writes are checked against them).
    disks: Vec<u64>,
    next_epoch: u64,
    open: Option<Partial>,
    /// One bit per guest page: set for pages of the open epoch (duplicate detection).
    /// Allocated at the first `EpochBegin`; only the bits of the open epoch's pages are ever
    /// set, so clearing costs one operation per page, not per guest page.
    seen: Vec<u64>,
}

impl std::fmt::Debug for EpochAssembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochAssembler")
            .field("geometry", &self.geometry)
            .field("next_epoch", &self.next_epoch)
            .field("open_epoch", &self.open_epoch())
            .finish()
    }
}

impl EpochAssembler {
    /// An assembler for a VM of `geometry` whose next checkpoint will be `next_epoch`.
    pub fn new(geometry: Geometry, next_epoch: u64) -> Self {
        Self {
            geometry,
            max_state_len: MAX_STATE_LEN as u64,
            disks: Vec::new(),
            next_epoch,
            open: None,
            seen: Vec::new(),
        }
    }

    /// Lower the state blob cap (the default is [`MAX_STATE_LEN`]).
    pub fn with_max_state_len(mut self, max_state_len: u64) -> Self {
        self.max_state_len = max_state_len;
        self
    }

    /// The VM's disks, their sizes in bytes (without, any disk write is refused).
    pub fn with_disks(mut self, disks: Vec<u64>) -> Self {
        self.disks = disks;
        self
    }

    /// The geometry pages are checked against.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The epoch the next `EpochBegin` must carry (one past the last committed epoch).
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// The epoch being assembled, if any.
    pub fn open_epoch(&self) -> Option<u64> {
        self.open.as_ref().map(|p| p.begin.epoch)
    }

    /// Consume one message. Returns the epoch it completes, if any. On error the partial
    /// epoch is discarded and the assembler waits for `EpochBegin { next_epoch }` again.
    /// Delta pages need a base: see [`EpochAssembler::push_with`]; here they are refused.
    pub fn push(&mut self, msg: EpochMessage) -> Result<Option<CompleteEpoch>, AssembleError> {
        self.push_with(msg, &NoBase)
    }

    /// [`EpochAssembler::push`], decoding delta pages against `base` (the replica as of
    /// the last committed epoch). Pages are decoded as their batch arrives, and the epoch
    /// checksum is over the decoded pages: a delta decoded against anything but the base
    /// the primary used fails it, and the epoch is rejected before it touches the replica.
    pub fn push_with(
        &mut self,
        msg: EpochMessage,
        base: &dyn BasePages,
    ) -> Result<Option<CompleteEpoch>, AssembleError> {
        let result = self.step(msg, base);
        if let Err(e) = &result {
            if let Some(epoch) = self.discard() {
                debug!(epoch, error = %e, "partial epoch discarded");
            }
        }
        result
    }

    /// Drop the open epoch, if any (e.g. when the connection is lost), returning its number.
    pub fn discard(&mut self) -> Option<u64> {
        let partial = self.open.take()?;
        self.clear_seen(&partial.pages);
        Some(partial.begin.epoch)
    }

    fn clear_seen(&mut self, pages: &[Page]) {
        for p in pages {
            // Only pages that passed the range check are ever stored.
            self.seen[(p.index / 64) as usize] &= !(1 << (p.index % 64));
        }
    }

    fn open_for(
        &mut self,
        frame_type: FrameType,
        epoch: u64,
    ) -> Result<&mut Partial, AssembleError> {
        match &mut self.open {
            None => Err(AssembleError::NotOpen { frame_type, epoch }),
            Some(p) if p.begin.epoch != epoch => Err(AssembleError::WrongEpoch {
                frame_type,
                open: p.begin.epoch,
                got: epoch,
            }),
            Some(p) => Ok(p),
        }
    }

    fn step(
        &mut self,
        msg: EpochMessage,
        base: &dyn BasePages,
    ) -> Result<Option<CompleteEpoch>, AssembleError> {
        let frame_type = msg.frame_type();
        match msg {
            EpochMessage::Begin(b) => self.begin(b).map(|()| None),
            EpochMessage::Pages(p) => self.pages(p).map(|()| None),
            EpochMessage::Compressed(p) => self.compressed(p, base).map(|()| None),
            EpochMessage::Disk(w) => self.disk(w).map(|()| None),
            EpochMessage::State(s) => {
                let partial = self.open_for(frame_type, s.epoch)?;
                let epoch = s.epoch;
                if partial.state.is_some() {
                    return Err(AssembleError::DuplicateState { epoch });
                }
                let received = partial.pages.len() as u64;
                if received != partial.begin.page_count {
                    return Err(AssembleError::MissingPages {
                        epoch,
                        declared: partial.begin.page_count,
                        received,
                    });
                }
                if s.blob.len() as u64 != partial.begin.state_len {
                    return Err(AssembleError::StateLength {
                        epoch,
                        declared: partial.begin.state_len,
                        got: s.blob.len() as u64,
                    });
                }
                partial.checksum.state(&s.blob);
                partial.state = Some(s.blob);
                Ok(None)
            }
            EpochMessage::End(e) => self.end(e).map(Some),
        }
    }

    fn begin(&mut self, b: EpochBegin) -> Result<(), AssembleError> {
        if let Some(open) = &self.open {
            return Err(AssembleError::BeginWhileOpen {
                open: open.begin.epoch,
                got: b.epoch,
            });
        }
        if b.epoch < self.next_epoch {
            return Err(AssembleError::Stale {
                epoch: b.epoch,
                next: self.next_epoch,
            });
        }
        if b.epoch > self.next_epoch {
            return Err(AssembleError::Gap {
                expected: self.next_epoch,
                got: b.epoch,
            });
        }
        if b.epoch == u64::MAX {
            return Err(AssembleError::EpochOverflow);
        }
        if b.page_count > self.geometry.page_count() {
            return Err(AssembleError::TooManyPagesDeclared {
                epoch: b.epoch,
                declared: b.page_count,
                max: self.geometry.page_count(),
            });
        }
        if b.state_len > self.max_state_len {
            return Err(AssembleError::StateTooLarge {
                epoch: b.epoch,
                declared: b.state_len,
                max: self.max_state_len,
            });
        }
        if self.seen.is_empty() {
            self.seen = vec![0; self.geometry.page_count().div_ceil(64) as usize];
        }
        self.open = Some(Partial {
            begin: b,
            // Trust the announced count only up to a modest reservation; more grows as
            // pages actually arrive.
            pages: Vec::with_capacity(b.page_count.min(1 << 16) as usize),
            disk: Vec::new(),
            disk_bytes: 0,
            state: None,
            checksum: EpochChecksum::new(b.epoch),
        });
        Ok(())
    }

    /// The open epoch, if a page batch of `frame_type` for `epoch` with pages of
    /// `page_size`, `count` of them, may join it.
    fn open_for_pages(
        &mut self,
        frame_type: FrameType,
        epoch: u64,
        page_size: u32,
        count: usize,
    ) -> Result<&mut Partial, AssembleError> {
        let geometry = self.geometry;
        let partial = self.open_for(frame_type, epoch)?;
        if partial.state.is_some() {
            return Err(AssembleError::PagesAfterState { epoch });
        }
        if page_size != geometry.page_size() {
            return Err(AssembleError::PageSize {
                epoch,
                expected: geometry.page_size(),
                got: page_size,
            });
        }
        let declared = partial.begin.page_count;
        if partial.pages.len() as u64 + count as u64 > declared {
            return Err(AssembleError::ExcessPages { epoch, declared });
        }
        Ok(partial)
    }

    /// Checks that page `index` is in range and new in the open epoch.
    fn check_new_page(&self, epoch: u64, index: u64) -> Result<(), AssembleError> {
        let page_count = self.geometry.page_count();
        if index >= page_count {
            return Err(AssembleError::PageOutOfRange {
                epoch,
                index,
                page_count,
            });
        }
        if self.seen[(index / 64) as usize] & (1u64 << (index % 64)) != 0 {
            return Err(AssembleError::DuplicatePage { epoch, index });
        }
        Ok(())
    }

    /// Adds a checked, decoded page to the open epoch.
    fn add_page(&mut self, page: Page) {
        let index = page.index;
        // Mark and store together, so `discard` clears exactly the marked bits.
        self.seen[(index / 64) as usize] |= 1u64 << (index % 64);
        let partial = self.open.as_mut().expect("an open epoch");
        partial.checksum.page(index, &page.data);
        partial.pages.push(page);
    }

    fn compressed(
        &mut self,
        batch: CompressedPages,
        base: &dyn BasePages,
    ) -> Result<(), AssembleError> {
        let epoch = batch.epoch;
        self.open_for_pages(
            FrameType::CompressedPages,
            epoch,
            batch.page_size,
            batch.pages.len(),
        )?;
        let ps = self.geometry.page_size() as usize;
        let mut base_buf = Vec::new();
        for page in batch.pages {
            let index = page.index;
            self.check_new_page(epoch, index)?;
            let data = if page.encoding == PageEncoding::Raw && page.data.len() == ps {
                page.data
            } else {
                let base = if page.encoding.needs_base() {
                    base_buf.resize(ps, 0);
                    base.read_committed_page(index, &mut base_buf)
                        .map_err(|e| AssembleError::BasePage {
                            epoch,
                            index,
                            detail: e.to_string(),
                        })?;
                    Some(&base_buf[..])
                } else {
                    None
                };
                // Bounded: the batch has at most the pages `EpochBegin` announced, which
                // is at most the VM's, as for raw pages.
                let mut out = vec![0u8; ps];
                decode_page(page.encoding, &page.data, base, &mut out).map_err(|source| {
                    AssembleError::PageDecode {
                        epoch,
                        index,
                        source,
                    }
                })?;
                Bytes::from(out)
            };
            self.add_page(Page { index, data });
        }
        Ok(())
    }

    fn pages(&mut self, batch: Pages) -> Result<(), AssembleError> {
        let geometry = self.geometry;
        let epoch = batch.epoch;
        self.open_for_pages(FrameType::Pages, epoch, batch.page_size, batch.pages.len())?;
        for page in batch.pages {
            let index = page.index;
            if index >= geometry.page_count() {
                return Err(AssembleError::PageOutOfRange {
                    epoch,
                    index,
                    page_count: geometry.page_count(),
                });
            }
            if page.data.len() != geometry.page_size() as usize {
                return Err(AssembleError::PageLength {
                    epoch,
                    index,
                    len: page.data.len(),
                    page_size: geometry.page_size(),
                });
            }
            self.check_new_page(epoch, index)?;
            self.add_page(page);
        }
        Ok(())
    }

    fn disk(&mut self, w: DiskWrites) -> Result<(), AssembleError> {
        let epoch = w.epoch;
        let disks = self.disks.clone();
        let partial = self.open_for(FrameType::DiskWrites, epoch)?;
        if partial.state.is_some() {
            return Err(AssembleError::DiskAfterState { epoch });
        }
        let Some(&capacity) = disks.get(w.disk as usize) else {
            return Err(AssembleError::NoSuchDisk {
                epoch,
                disk: w.disk,
                disks: disks.len(),
            });
        };
        let mut bytes = 0u64;
        for e in &w.writes {
            let len = e.len();
            if e.offset.checked_add(len).is_none_or(|end| end > capacity) {
                return Err(AssembleError::DiskOutOfRange {
                    epoch,
                    disk: w.disk,
                    offset: e.offset,
                    len,
                    capacity,
                });
            }
            bytes += e.data.len() as u64;
        }
        partial.disk_bytes += bytes;
        if partial.disk_bytes > MAX_EPOCH_DISK_BYTES {
            return Err(AssembleError::DiskTooMuch {
                epoch,
                max: MAX_EPOCH_DISK_BYTES,
            });
        }
        partial.checksum.disk(&w);
        partial.disk.push(w);
        Ok(())
    }

    fn end(&mut self, e: EpochEnd) -> Result<CompleteEpoch, AssembleError> {
        let partial = self.open_for(FrameType::EpochEnd, e.epoch)?;
        let epoch = e.epoch;
        let Some(state) = partial.state.clone() else {
            return Err(AssembleError::MissingState { epoch });
        };
        let pages = partial.pages.len() as u64;
        let bytes = partial.checksum.total_bytes();
        if e.page_count != pages || e.total_bytes != bytes {
            return Err(AssembleError::EndMismatch {
                epoch,
                end_pages: e.page_count,
                end_bytes: e.total_bytes,
                pages,
                bytes,
            });
        }
        let computed = partial.checksum.sum();
        if computed != e.checksum {
            return Err(AssembleError::Checksum {
                epoch,
                expected: e.checksum,
                computed,
            });
        }
        let (pages, disk_writes) = self
            .open
            .take()
            .map(|p| (p.pages, p.disk))
            .unwrap_or_default();
        self.clear_seen(&pages);
        // `begin` refused `u64::MAX`, so this cannot overflow.
        self.next_epoch = epoch + 1;
        Ok(CompleteEpoch {
            epoch,
            pages,
            disk_writes,
            state,
            checksum: computed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::FrameCodec;
    use crate::epoch_encoder::EpochEncoder;
    use crate::message::PageRef;
    use bytes::BytesMut;
    use tokio_util::codec::Decoder;

    const PS: u32 = 4096;

    fn geometry() -> Geometry {
        Geometry::new(64 * u64::from(PS), PS).unwrap()
    }

    fn data(index: u64, salt: u8) -> Vec<u8> {
        (0..PS as usize)
            .map(|i| (i as u8).wrapping_mul(salt) ^ index as u8)
            .collect()
    }

    /// The messages of a well-formed epoch, produced by the real encoder and decoder, with
    /// pages in batches of `batch`.
    fn epoch_msgs(epoch: u64, indices: &[u64], state: &[u8], batch: usize) -> Vec<EpochMessage> {
        let datas: Vec<Vec<u8>> = indices.iter().map(|&i| data(i, epoch as u8)).collect();
        let refs: Vec<PageRef<'_>> = indices
            .iter()
            .zip(&datas)
            .map(|(&index, d)| PageRef { index, data: d })
            .collect();
        let codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        let mut enc = EpochEncoder::begin(
            codec,
            EpochBegin {
                epoch,
                page_count: indices.len() as u64,
                state_len: state.len() as u64,
            },
            PS,
            &mut buf,
        )
        .unwrap();
        for chunk in refs.chunks(batch.max(1)) {
            enc.pages(chunk, &mut buf).unwrap();
        }
        enc.state(state, &mut buf).unwrap();
        enc.end(&mut buf).unwrap();
        let mut dec = codec;
        let mut out = Vec::new();
        while let Some(m) = dec.decode_eof(&mut buf).unwrap() {
            out.push(EpochMessage::try_from(m).unwrap());
        }
        out
    }

    fn feed(
        a: &mut EpochAssembler,
        msgs: Vec<EpochMessage>,
    ) -> Result<Option<CompleteEpoch>, AssembleError> {
        let mut last = None;
        for m in msgs {
            last = a.push(m)?;
        }
        Ok(last)
    }

    fn assert_idle_at(a: &EpochAssembler, next: u64) {
        assert_eq!(a.open_epoch(), None);
        assert_eq!(a.next_epoch(), next);
    }

    #[test]
    fn whole_epochs_are_yielded_in_order() {
        let mut a = EpochAssembler::new(geometry(), 1);
        let c = feed(&mut a, epoch_msgs(1, &[5, 0, 63], b"state1", 2))
            .unwrap()
            .unwrap();
        assert_eq!(c.epoch, 1);
        assert_eq!(
            c.pages.iter().map(|p| p.index).collect::<Vec<_>>(),
            [5, 0, 63]
        );
        assert_eq!(c.pages[0].data, data(5, 1));
        assert_eq!(c.state, &b"state1"[..]);
        // The same page may be dirty again in the next epoch; empty epochs are fine.
        let c = feed(&mut a, epoch_msgs(2, &[5], b"", 1)).unwrap().unwrap();
        assert_eq!(c.pages[0].data, data(5, 2));
        let c = feed(&mut a, epoch_msgs(3, &[], b"s", 1)).unwrap().unwrap();
        assert!(c.pages.is_empty());
        assert_idle_at(&a, 4);
    }

    #[test]
    fn only_end_yields() {
        let mut a = EpochAssembler::new(geometry(), 1);
        let msgs = epoch_msgs(1, &[1, 2], b"x", 1);
        let n = msgs.len();
        for (i, m) in msgs.into_iter().enumerate() {
            let r = a.push(m).unwrap();
            assert_eq!(r.is_some(), i == n - 1);
        }
    }

    #[test]
    fn gap_and_duplicate_epochs_are_refused() {
        let mut a = EpochAssembler::new(geometry(), 1);
        assert_eq!(
            feed(&mut a, epoch_msgs(2, &[1], b"", 1)),
            Err(AssembleError::Gap {
                expected: 1,
                got: 2
            })
        );
        feed(&mut a, epoch_msgs(1, &[1], b"", 1)).unwrap().unwrap();
        assert_eq!(
            feed(&mut a, epoch_msgs(1, &[1], b"", 1)),
            Err(AssembleError::Stale { epoch: 1, next: 2 })
        );
        assert_idle_at(&a, 2);
    }

    #[test]
    fn begin_while_open_discards_the_partial_epoch() {
        let mut a = EpochAssembler::new(geometry(), 1);
        let msgs = epoch_msgs(1, &[1, 2], b"", 1);
        a.push(msgs[0].clone()).unwrap();
        a.push(msgs[1].clone()).unwrap();
        assert_eq!(
            a.push(msgs[0].clone()),
            Err(AssembleError::BeginWhileOpen { open: 1, got: 1 })
        );
        assert_idle_at(&a, 1);
        // The discarded pages' duplicate markers were cleared: a clean retry succeeds.
        feed(&mut a, msgs).unwrap().unwrap();
    }

    #[test]
    fn messages_without_an_open_epoch_are_refused() {
        let mut a = EpochAssembler::new(geometry(), 1);
        let msgs = epoch_msgs(1, &[1], b"s", 1);
        for m in &msgs[1..] {
            let err = a.push(m.clone()).unwrap_err();
            assert!(
                matches!(err, AssembleError::NotOpen { epoch: 1, .. }),
                "{err}"
            );
        }
        assert_idle_at(&a, 1);
    }

    #[test]
    fn messages_of_another_epoch_are_refused() {
        let one = epoch_msgs(1, &[1], b"s", 1);
        let two = epoch_msgs(2, &[1], b"s", 1);
        for other in &two[1..] {
            let mut a = EpochAssembler::new(geometry(), 1);
            a.push(one[0].clone()).unwrap();
            let err = a.push(other.clone()).unwrap_err();
            assert!(
                matches!(
                    err,
                    AssembleError::WrongEpoch {
                        open: 1,
                        got: 2,
                        ..
                    }
                ),
                "{err}"
            );
            assert_idle_at(&a, 1);
        }
    }

    #[test]
    fn reordered_batches_fail_the_checksum() {
        let mut a = EpochAssembler::new(geometry(), 1);
        let mut msgs = epoch_msgs(1, &[1, 2], b"s", 1);
        msgs.swap(1, 2);
        assert!(matches!(
            feed(&mut a, msgs),
            Err(AssembleError::Checksum { epoch: 1, .. })
        ));
        assert_idle_at(&a, 1);
    }

    #[test]
    fn page_errors_are_typed() {
        let begin = |n| {
            EpochMessage::Begin(EpochBegin {
                epoch: 1,
                page_count: n,
                state_len: 0,
            })
        };
        let pages = |size: u32, list: Vec<(u64, usize)>| {
            EpochMessage::Pages(Pages {
                epoch: 1,
                page_size: size,
                pages: list
                    .into_iter()
                    .map(|(index, len)| Page {
                        index,
                        data: Bytes::from(vec![0; len]),
                    })
                    .collect(),
            })
        };
        let cases: Vec<(Vec<EpochMessage>, AssembleError)> = vec![
            (
                vec![begin(1), pages(4096, vec![(64, 4096)])],
                AssembleError::PageOutOfRange {
                    epoch: 1,
                    index: 64,
                    page_count: 64,
                },
            ),
            (
                vec![begin(2), pages(4096, vec![(3, 4096), (3, 4096)])],
                AssembleError::DuplicatePage { epoch: 1, index: 3 },
            ),
            (
                vec![
                    begin(2),
                    pages(4096, vec![(3, 4096)]),
                    pages(4096, vec![(3, 4096)]),
                ],
                AssembleError::DuplicatePage { epoch: 1, index: 3 },
            ),
            (
                vec![begin(1), pages(4096, vec![(1, 4096), (2, 4096)])],
                AssembleError::ExcessPages {
                    epoch: 1,
                    declared: 1,
                },
            ),
            (
                vec![begin(1), pages(8192, vec![(1, 8192)])],
                AssembleError::PageSize {
                    epoch: 1,
                    expected: 4096,
                    got: 8192,
                },
            ),
            (
                vec![begin(1), pages(4096, vec![(1, 10)])],
                AssembleError::PageLength {
                    epoch: 1,
                    index: 1,
                    len: 10,
                    page_size: 4096,
                },
            ),
            (
                vec![begin(65)],
                AssembleError::TooManyPagesDeclared {
                    epoch: 1,
                    declared: 65,
                    max: 64,
                },
            ),
        ];
        for (msgs, expected) in cases {
            let mut a = EpochAssembler::new(geometry(), 1);
            assert_eq!(feed(&mut a, msgs), Err(expected));
            assert_idle_at(&a, 1);
            // Whatever was marked before the error was cleared.
            feed(&mut a, epoch_msgs(1, &[1, 2, 3, 63], b"", 1))
                .unwrap()
                .unwrap();
        }
    }

    #[test]
    fn state_errors_are_typed() {
        let msgs = epoch_msgs(1, &[1, 2], b"abc", 1);
        let (begin, p1, p2, state, end) = (
            msgs[0].clone(),
            msgs[1].clone(),
            msgs[2].clone(),
            msgs[3].clone(),
            msgs[4].clone(),
        );
        let wrong_len = EpochMessage::State(State {
            epoch: 1,
            blob: Bytes::from_static(b"ab"),
        });
        let cases: Vec<(Vec<EpochMessage>, AssembleError)> = vec![
            (
                vec![begin.clone(), p1.clone(), state.clone()],
                AssembleError::MissingPages {
                    epoch: 1,
                    declared: 2,
                    received: 1,
                },
            ),
            (
                vec![
                    begin.clone(),
                    p1.clone(),
                    p2.clone(),
                    state.clone(),
                    state.clone(),
                ],
                AssembleError::DuplicateState { epoch: 1 },
            ),
            (
                vec![begin.clone(), p1.clone(), p2.clone(), wrong_len],
                AssembleError::StateLength {
                    epoch: 1,
                    declared: 3,
                    got: 2,
                },
            ),
            (
                vec![begin.clone(), p1.clone(), p2.clone(), end.clone()],
                AssembleError::MissingState { epoch: 1 },
            ),
            (
                vec![EpochMessage::Begin(EpochBegin {
                    epoch: 1,
                    page_count: 0,
                    state_len: MAX_STATE_LEN as u64 + 1,
                })],
                AssembleError::StateTooLarge {
                    epoch: 1,
                    declared: MAX_STATE_LEN as u64 + 1,
                    max: MAX_STATE_LEN as u64,
                },
            ),
        ];
        for (msgs, expected) in cases {
            let mut a = EpochAssembler::new(geometry(), 1);
            assert_eq!(feed(&mut a, msgs), Err(expected));
            assert_idle_at(&a, 1);
        }
        // Pages after the state: a begin for one page, state can't come first... use an
        // epoch with zero pages whose state arrives, then a page.
        let zero = epoch_msgs(1, &[], b"abc", 1);
        let mut a = EpochAssembler::new(geometry(), 1);
        let late = EpochMessage::Pages(Pages {
            epoch: 1,
            page_size: PS,
            pages: vec![],
        });
        assert_eq!(
            feed(&mut a, vec![zero[0].clone(), zero[1].clone(), late]),
            Err(AssembleError::PagesAfterState { epoch: 1 })
        );
    }

    #[test]
    fn end_errors_are_typed() {
        let msgs = epoch_msgs(1, &[1, 2], b"abc", 2);
        let EpochMessage::End(end) = msgs[3].clone() else {
            panic!("not an end");
        };
        let mut bad_count = end;
        bad_count.page_count = 1;
        let mut bad_bytes = end;
        bad_bytes.total_bytes += 1;
        let mut bad_sum = end;
        bad_sum.checksum ^= 1;
        for (bad, is_sum) in [(bad_count, false), (bad_bytes, false), (bad_sum, true)] {
            let mut a = EpochAssembler::new(geometry(), 1);
            let mut m = msgs[..3].to_vec();
            m.push(EpochMessage::End(bad));
            let err = feed(&mut a, m).unwrap_err();
            if is_sum {
                assert!(
                    matches!(err, AssembleError::Checksum { epoch: 1, .. }),
                    "{err}"
                );
            } else {
                assert!(
                    matches!(err, AssembleError::EndMismatch { epoch: 1, .. }),
                    "{err}"
                );
            }
            assert_idle_at(&a, 1);
        }
        // A corrupted page (valid frame, wrong content) fails the checksum.
        let mut m = msgs.clone();
        if let EpochMessage::Pages(p) = &mut m[1] {
            let mut d = p.pages[0].data.to_vec();
            d[0] ^= 1;
            p.pages[0].data = Bytes::from(d);
        }
        let mut a = EpochAssembler::new(geometry(), 1);
        assert!(matches!(
            feed(&mut a, m),
            Err(AssembleError::Checksum { .. })
        ));
    }

    #[test]
    fn epoch_overflow_is_refused() {
        let mut a = EpochAssembler::new(geometry(), u64::MAX);
        assert_eq!(
            a.push(EpochMessage::Begin(EpochBegin {
                epoch: u64::MAX,
                page_count: 0,
                state_len: 0
            })),
            Err(AssembleError::EpochOverflow)
        );
    }

    #[test]
    fn non_epoch_messages_are_handed_back() {
        let m = Message::Ack(crate::message::Ack { epoch: 1 });
        assert_eq!(EpochMessage::try_from(m.clone()), Err(m));
    }

    #[test]
    fn discard_drops_the_open_epoch() {
        let mut a = EpochAssembler::new(geometry(), 1);
        let msgs = epoch_msgs(1, &[1], b"", 1);
        a.push(msgs[0].clone()).unwrap();
        a.push(msgs[1].clone()).unwrap();
        assert_eq!(a.discard(), Some(1));
        assert_eq!(a.discard(), None);
        feed(&mut a, msgs).unwrap().unwrap();
    }
}

#[cfg(test)]
mod disk_tests {
    use super::*;
    use crate::codec::FrameCodec;
    use crate::epoch_encoder::EpochEncoder;
    use crate::message::DiskExtent;
    use bytes::BytesMut;
    use tokio_util::codec::Decoder;

    const PS: u32 = 4096;

    fn writes(epoch: u64, disk: u32, at: &[(u64, u8)]) -> DiskWrites {
        DiskWrites {
            epoch,
            disk,
            writes: at
                .iter()
                .map(|&(offset, fill)| {
                    if fill == 0 {
                        DiskExtent {
                            offset,
                            zero_len: 4096,
                            data: Bytes::new(),
                        }
                    } else {
                        DiskExtent {
                            offset,
                            zero_len: 0,
                            data: Bytes::from(vec![fill; 1024]),
                        }
                    }
                })
                .collect(),
        }
    }

    /// An epoch with no pages and `disk` writes, through the real encoder and decoder.
    fn epoch_with(epoch: u64, disk: &[DiskWrites]) -> Vec<EpochMessage> {
        let codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        let state = b"state";
        let mut enc = EpochEncoder::begin(
            codec,
            EpochBegin {
                epoch,
                page_count: 0,
                state_len: state.len() as u64,
            },
            PS,
            &mut buf,
        )
        .unwrap();
        for w in disk {
            enc.disk_writes(w, &mut buf).unwrap();
        }
        enc.state(state, &mut buf).unwrap();
        enc.end(&mut buf).unwrap();
        let mut dec = codec;
        let mut out = Vec::new();
        while let Some(m) = dec.decode_eof(&mut buf).unwrap() {
            out.push(EpochMessage::try_from(m).unwrap());
        }
        out
    }

    fn assembler() -> EpochAssembler {
        EpochAssembler::new(Geometry::new(64 * u64::from(PS), PS).unwrap(), 1)
            .with_disks(vec![1 << 20, 8192])
    }

    fn feed(
        a: &mut EpochAssembler,
        m: Vec<EpochMessage>,
    ) -> Result<Option<CompleteEpoch>, AssembleError> {
        let mut last = None;
        for m in m {
            last = a.push(m)?;
        }
        Ok(last)
    }

    #[test]
    fn disk_writes_come_with_their_epoch_in_order() {
        let mut a = assembler();
        let w = [
            writes(1, 0, &[(0, 1), (512, 2), (4096, 0)]),
            writes(1, 1, &[(4096, 3)]),
            writes(1, 0, &[(0, 4)]),
        ];
        let msgs = epoch_with(1, &w);
        let n = msgs.len();
        // Nothing comes out before the end: a partial epoch's writes stay in the assembler.
        for m in &msgs[..n - 1] {
            assert_eq!(a.push(m.clone()).unwrap(), None);
        }
        let done = a.push(msgs[n - 1].clone()).unwrap().expect("epoch 1");
        assert_eq!(done.disk_writes, w.to_vec());
    }

    #[test]
    fn bad_disk_writes_are_refused_and_the_epoch_discarded() {
        let mut a = assembler();
        let e = feed(&mut a, epoch_with(1, &[writes(1, 2, &[(0, 1)])])).unwrap_err();
        assert!(
            matches!(
                e,
                AssembleError::NoSuchDisk {
                    disk: 2,
                    disks: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!((a.next_epoch(), a.open_epoch()), (1, None));
        let e = feed(&mut a, epoch_with(1, &[writes(1, 1, &[(8192 - 512, 1)])])).unwrap_err();
        assert!(
            matches!(
                e,
                AssembleError::DiskOutOfRange {
                    disk: 1,
                    capacity: 8192,
                    ..
                }
            ),
            "{e}"
        );
        let e = feed(
            &mut a,
            epoch_with(1, &[writes(1, 0, &[(u64::MAX - 511, 1)])]),
        )
        .unwrap_err();
        assert!(matches!(e, AssembleError::DiskOutOfRange { .. }), "{e}");
        // Writes after the state.
        let mut msgs = epoch_with(1, &[]);
        let end = msgs.pop().unwrap();
        msgs.push(EpochMessage::Disk(writes(1, 0, &[(0, 1)])));
        msgs.push(end);
        let e = feed(&mut a, msgs).unwrap_err();
        assert!(
            matches!(e, AssembleError::DiskAfterState { epoch: 1 }),
            "{e}"
        );
        // Data changed between encoder and assembler: the end-to-end checksum catches it.
        let mut msgs = epoch_with(1, &[writes(1, 0, &[(0, 1)])]);
        if let EpochMessage::Disk(w) = &mut msgs[1] {
            w.writes[0].data = Bytes::from(vec![9u8; 1024]);
        } else {
            panic!("message 1 is the disk writes");
        }
        let e = feed(&mut a, msgs).unwrap_err();
        assert!(matches!(e, AssembleError::Checksum { .. }), "{e}");
        // A dropped disk message too (total bytes no longer match).
        let mut msgs = epoch_with(1, &[writes(1, 0, &[(0, 1)]), writes(1, 0, &[(0, 2)])]);
        msgs.remove(2);
        assert!(feed(&mut a, msgs).is_err());
        // Without disks, every disk write is refused.
        let mut none = EpochAssembler::new(Geometry::new(64 * u64::from(PS), PS).unwrap(), 1);
        let e = feed(&mut none, epoch_with(1, &[writes(1, 0, &[(0, 1)])])).unwrap_err();
        assert!(
            matches!(e, AssembleError::NoSuchDisk { disks: 0, .. }),
            "{e}"
        );
        // And after all that, a good epoch 1 still commits.
        assert!(feed(&mut a, epoch_with(1, &[writes(1, 0, &[(0, 1)])]))
            .unwrap()
            .is_some());
    }

    #[test]
    fn disk_frames_round_trip_and_hostile_tables_are_refused() {
        let codec = FrameCodec::new();
        let w = writes(7, 1, &[(512, 5), (1024, 0)]);
        for msg in [
            Message::DiskWrites(w.clone()),
            Message::SyncDisk(crate::message::SyncDisk {
                disk: 3,
                offset: 1 << 20,
                data: Bytes::from(vec![1u8; 4096]),
            }),
        ] {
            let mut buf = BytesMut::new();
            codec.encode_message(&msg, &mut buf).unwrap();
            let mut dec = codec;
            assert_eq!(dec.decode_eof(&mut buf).unwrap(), Some(msg));
        }
        // Unaligned, empty or double-kind extents are refused by the encoder (and decoder).
        let mut bad = w.clone();
        bad.writes[0].offset = 100;
        assert!(codec
            .encode_message(&Message::DiskWrites(bad), &mut BytesMut::new())
            .is_err());
        let mut bad = w.clone();
        bad.writes[1].zero_len = 0;
        assert!(codec
            .encode_message(&Message::DiskWrites(bad), &mut BytesMut::new())
            .is_err());
        let mut bad = w;
        bad.writes[0].zero_len = 512;
        assert!(codec
            .encode_message(&Message::DiskWrites(bad), &mut BytesMut::new())
            .is_err());
    }
}

#[cfg(test)]
mod compressed_tests {
    use super::*;
    use crate::codec::FrameCodec;
    use crate::epoch_encoder::EpochEncoder;
    use crate::message::{EncodedPage, PageRef};
    use bytes::BytesMut;
    use tokio_util::codec::Decoder;

    const PS: u32 = 4096;

    fn geometry() -> Geometry {
        Geometry::new(64 * u64::from(PS), PS).unwrap()
    }

    fn data(index: u64, salt: u8) -> Vec<u8> {
        (0..PS as usize)
            .map(|i| (i as u8).wrapping_mul(salt) ^ index as u8)
            .collect()
    }

    fn feed(
        a: &mut EpochAssembler,
        msgs: Vec<EpochMessage>,
    ) -> Result<Option<CompleteEpoch>, AssembleError> {
        feed_with(a, msgs, &NoBase)
    }

    fn assert_idle_at(a: &EpochAssembler, next: u64) {
        assert_eq!(a.open_epoch(), None);
        assert_eq!(a.next_epoch(), next);
    }

    use crate::message::EncodedPageRef;
    use crate::pagecodec::{encode_lz4, encode_xor_lz4, max_lz4_len};
    use std::collections::HashMap;

    /// A replica as the assembler sees it: committed pages (missing ones are zero).
    #[derive(Default)]
    struct Replica(HashMap<u64, Vec<u8>>);

    impl BasePages for Replica {
        fn read_committed_page(&self, index: u64, buf: &mut [u8]) -> std::io::Result<()> {
            match self.0.get(&index) {
                Some(p) => buf.copy_from_slice(p),
                None => buf.fill(0),
            }
            Ok(())
        }
    }

    struct Broken;

    impl BasePages for Broken {
        fn read_committed_page(&self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
            Err(std::io::Error::other("disk on fire"))
        }
    }

    /// Page `index` of `base` with bytes `[from, from + len)` rewritten.
    fn changed(base: &[u8], from: usize, len: usize, salt: u8) -> Vec<u8> {
        let mut p = base.to_vec();
        for (i, b) in p[from..from + len].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(salt) ^ 0x5a;
        }
        p
    }

    /// An epoch of `pages` (index, contents) as `CompressedPages`: each page a delta
    /// against `base` when it has one there, else LZ4, else raw, in batches of `batch`.
    fn compressed_msgs(
        epoch: u64,
        pages: &[(u64, Vec<u8>)],
        base: &Replica,
        batch: usize,
    ) -> Vec<EpochMessage> {
        let ps = PS as usize;
        let mut encoded: Vec<(PageEncoding, Vec<u8>)> = Vec::new();
        let mut scratch = vec![0; ps];
        for (index, page) in pages {
            let mut out = vec![0; max_lz4_len(ps)];
            let e = match base.0.get(index) {
                Some(b) => encode_xor_lz4(page, b, &mut scratch, &mut out)
                    .map(|n| (PageEncoding::XorLz4, n)),
                None => encode_lz4(page, &mut out).map(|n| (PageEncoding::Lz4, n)),
            };
            encoded.push(match e {
                Some((e, n)) => (e, out[..n].to_vec()),
                None => (PageEncoding::Raw, page.clone()),
            });
        }
        let refs: Vec<EncodedPageRef<'_>> = pages
            .iter()
            .zip(&encoded)
            .map(|((index, raw), (encoding, data))| EncodedPageRef {
                index: *index,
                encoding: *encoding,
                data,
                raw,
            })
            .collect();
        let codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        let mut enc = EpochEncoder::begin(
            codec,
            EpochBegin {
                epoch,
                page_count: pages.len() as u64,
                state_len: 2,
            },
            PS,
            &mut buf,
        )
        .unwrap();
        for chunk in refs.chunks(batch.max(1)) {
            enc.compressed_pages(chunk, &mut buf).unwrap();
        }
        enc.state(b"st", &mut buf).unwrap();
        enc.end(&mut buf).unwrap();
        let mut dec = codec;
        let mut out = Vec::new();
        while let Some(m) = dec.decode_eof(&mut buf).unwrap() {
            out.push(EpochMessage::try_from(m).unwrap());
        }
        out
    }

    /// The same epoch as plain `Pages`.
    fn raw_msgs(epoch: u64, pages: &[(u64, Vec<u8>)]) -> Vec<EpochMessage> {
        let refs: Vec<PageRef<'_>> = pages
            .iter()
            .map(|(index, data)| PageRef {
                index: *index,
                data,
            })
            .collect();
        let codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        let mut enc = EpochEncoder::begin(
            codec,
            EpochBegin {
                epoch,
                page_count: pages.len() as u64,
                state_len: 2,
            },
            PS,
            &mut buf,
        )
        .unwrap();
        enc.pages(&refs, &mut buf).unwrap();
        enc.state(b"st", &mut buf).unwrap();
        enc.end(&mut buf).unwrap();
        let mut dec = codec;
        let mut out = Vec::new();
        while let Some(m) = dec.decode_eof(&mut buf).unwrap() {
            out.push(EpochMessage::try_from(m).unwrap());
        }
        out
    }

    fn feed_with(
        a: &mut EpochAssembler,
        msgs: Vec<EpochMessage>,
        base: &dyn BasePages,
    ) -> Result<Option<CompleteEpoch>, AssembleError> {
        let mut last = None;
        for m in msgs {
            last = a.push_with(m, base)?;
        }
        Ok(last)
    }

    /// Three epochs: the first fills pages 0..8 (LZ4 or raw: no base yet), the next two
    /// change a quarter of some pages (deltas). Applying each compressed epoch to one
    /// replica and each raw epoch to another gives identical replicas and identical epochs.
    #[test]
    fn compressed_and_raw_epochs_give_identical_replicas() {
        let mut compressed = Replica::default();
        let mut raw = Replica::default();
        let mut ac = EpochAssembler::new(geometry(), 1);
        let mut ar = EpochAssembler::new(geometry(), 1);
        let mut current: HashMap<u64, Vec<u8>> = HashMap::new();
        for epoch in 1..=3u64 {
            let pages: Vec<(u64, Vec<u8>)> = match epoch {
                1 => (0..8).map(|i| (i, data(i, 3))).collect(),
                _ => [1u64, 4, 7, 20]
                    .iter()
                    .map(|&i| {
                        let old = current.get(&i).cloned().unwrap_or_else(|| data(i, 9));
                        (i, changed(&old, 512 * epoch as usize, 1024, epoch as u8))
                    })
                    .collect(),
            };
            let msgs = compressed_msgs(epoch, &pages, &compressed, 3);
            if epoch > 1 {
                assert!(msgs.iter().any(|m| matches!(m, EpochMessage::Compressed(b)
                    if b.pages.iter().any(|p| p.encoding == PageEncoding::XorLz4))));
            }
            let c = feed_with(&mut ac, msgs, &compressed).unwrap().unwrap();
            let r = feed_with(&mut ar, raw_msgs(epoch, &pages), &raw)
                .unwrap()
                .unwrap();
            assert_eq!(c, r, "epoch {epoch}: the same pages, state and checksum");
            for p in &c.pages {
                compressed.0.insert(p.index, p.data.to_vec());
            }
            for p in &r.pages {
                raw.0.insert(p.index, p.data.to_vec());
            }
            for (i, p) in pages {
                current.insert(i, p);
            }
            assert_eq!(compressed.0, raw.0);
            assert_eq!(compressed.0, current);
        }
    }

    /// A delta decoded against another base than the primary's (a replica that is not
    /// what the primary believes) decodes, but fails the epoch checksum: rejected whole.
    #[test]
    fn a_delta_against_the_wrong_base_fails_the_epoch_checksum() {
        let mut primary_view = Replica::default();
        primary_view.0.insert(2, data(2, 1));
        let page = changed(&data(2, 1), 0, 100, 7);
        let msgs = compressed_msgs(5, &[(2, page)], &primary_view, 8);
        let mut backup = Replica::default();
        backup.0.insert(2, data(2, 2));
        let mut a = EpochAssembler::new(geometry(), 5);
        assert!(matches!(
            feed_with(&mut a, msgs.clone(), &backup),
            Err(AssembleError::Checksum { epoch: 5, .. })
        ));
        assert_idle_at(&a, 5);
        // The right base: accepted.
        assert!(feed_with(&mut a, msgs, &primary_view).unwrap().is_some());
        assert_idle_at(&a, 6);
    }

    #[test]
    fn corrupt_or_unbased_encoded_pages_are_refused_and_the_epoch_discarded() {
        let mut base = Replica::default();
        base.0.insert(3, data(3, 1));
        let pages = [
            (3u64, changed(&data(3, 1), 8, 64, 2)),
            (9, vec![0; PS as usize]),
        ];
        let msgs = compressed_msgs(1, &pages, &base, 8);
        let corrupt = |f: &dyn Fn(&mut EncodedPage)| -> Vec<EpochMessage> {
            msgs.iter()
                .cloned()
                .map(|m| match m {
                    EpochMessage::Compressed(mut b) => {
                        f(&mut b.pages[0]);
                        EpochMessage::Compressed(b)
                    }
                    m => m,
                })
                .collect()
        };
        let mut a = EpochAssembler::new(geometry(), 1);
        // A delta whose LZ4 block is cut short.
        let cut = corrupt(&|p| p.data = p.data.slice(..p.data.len() - 1));
        assert!(matches!(
            feed_with(&mut a, cut, &base),
            Err(AssembleError::PageDecode {
                epoch: 1,
                index: 3,
                ..
            })
        ));
        assert_idle_at(&a, 1);
        // Garbage.
        let garbage = corrupt(&|p| p.data = Bytes::from_static(&[0xf0; 9]));
        assert!(matches!(
            feed_with(&mut a, garbage, &base),
            Err(AssembleError::PageDecode { index: 3, .. })
        ));
        // No base to apply the delta to.
        assert!(matches!(
            feed(&mut a, msgs.clone()),
            Err(AssembleError::BasePage { index: 3, .. })
        ));
        assert!(matches!(
            feed_with(&mut a, msgs.clone(), &Broken),
            Err(AssembleError::BasePage { index: 3, .. })
        ));
        // Out of range, and a page twice.
        let far = corrupt(&|p| p.index = 64);
        assert!(matches!(
            feed_with(&mut a, far, &base),
            Err(AssembleError::PageOutOfRange { index: 64, .. })
        ));
        let twice = corrupt(&|p| p.index = 9);
        assert!(matches!(
            feed_with(&mut a, twice, &base),
            Err(AssembleError::DuplicatePage { index: 9, .. })
        ));
        assert_idle_at(&a, 1);
        // The untouched stream still goes through after all that.
        let c = feed_with(&mut a, msgs, &base).unwrap().unwrap();
        assert_eq!(c.pages[0].data, pages[0].1);
        assert_eq!(c.pages[1].data, pages[1].1);
    }

    #[test]
    fn compressed_frames_round_trip_and_hostile_tables_are_refused() {
        use crate::codec::DecodeError;
        let base = Replica::default();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..PS)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let pages = [(1u64, vec![0; PS as usize]), (2, noise)];
        let msgs = compressed_msgs(1, &pages, &base, 8);
        let EpochMessage::Compressed(batch) = msgs[1].clone() else {
            panic!("{:?}", msgs[1]);
        };
        let codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        codec
            .encode_message(&Message::CompressedPages(batch.clone()), &mut buf)
            .unwrap();
        let frame = buf.clone();
        let mut dec = codec;
        assert_eq!(
            dec.decode(&mut buf).unwrap(),
            Some(Message::CompressedPages(batch.clone()))
        );
        // Re-frame a mutated payload (valid CRC) and decode it.
        let decode_payload = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut payload = frame[crate::frame::HEADER_LEN..].to_vec();
            f(&mut payload);
            let header = crate::frame::FrameHeader {
                frame_type: FrameType::CompressedPages as u8,
                flags: 0,
                payload_len: payload.len() as u32,
                payload_crc: crate::frame::crc64(&payload),
            };
            let mut b = BytesMut::new();
            b.extend_from_slice(&header.to_bytes());
            b.extend_from_slice(&payload);
            FrameCodec::new().decode(&mut b)
        };
        let set_u32 = |p: &mut Vec<u8>, at: usize, v: u32| {
            p[at..at + 4].copy_from_slice(&v.to_le_bytes());
        };
        let malformed = |r: Result<Option<Message>, DecodeError>| {
            matches!(
                r,
                Err(DecodeError::Malformed { .. }) | Err(DecodeError::Invalid { .. })
            )
        };
        // A count far beyond the payload.
        assert!(malformed(decode_payload(&|p| set_u32(p, 12, u32::MAX))));
        // A length that does not add up.
        assert!(malformed(decode_payload(&|p| set_u32(p, 16 + 12, 9999))));
        // An unknown encoding, reserved bytes set.
        assert!(malformed(decode_payload(&|p| p[16 + 8] = 7)));
        assert!(malformed(decode_payload(&|p| p[16 + 9] = 1)));
        // A raw page that is not a page long (length moved from the second entry).
        let raw = batch
            .pages
            .iter()
            .position(|p| p.encoding == PageEncoding::Raw);
        let lz4 = batch
            .pages
            .iter()
            .position(|p| p.encoding == PageEncoding::Lz4);
        if let (Some(r), Some(l)) = (raw, lz4) {
            assert!(malformed(decode_payload(&|p| {
                let (ra, la) = (16 + 16 * r + 12, 16 + 16 * l + 12);
                let rl = u32::from_le_bytes(p[ra..ra + 4].try_into().unwrap());
                let ll = u32::from_le_bytes(p[la..la + 4].try_into().unwrap());
                set_u32(p, ra, rl - 1);
                set_u32(p, la, ll + 1);
            })));
        } else {
            panic!("expected a raw and an LZ4 page in {batch:?}");
        }
        // Shorter than its prefix.
        assert!(malformed(decode_payload(&|p| p.truncate(15))));
    }
}
