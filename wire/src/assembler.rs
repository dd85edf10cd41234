//! The backup's epoch assembler: a pure state machine that turns a sequence of decoded
//! epoch messages into whole, verified checkpoints.
//!
//! An epoch is accepted only as `EpochBegin`, zero or more `Pages` batches, exactly one
//! `State`, `EpochEnd`, for exactly the next epoch number, with every count, length and the
//! end-to-end checksum matching. Anything else is a typed [`AssembleError`]; the partial
//! epoch is dropped and the committed position ([`EpochAssembler::next_epoch`]) is unchanged,
//! so the replica only ever sees whole epochs.

use crate::checksum::EpochChecksum;
use crate::message::{
    EpochBegin, EpochEnd, FrameType, Geometry, Message, Page, Pages, State, MAX_STATE_LEN,
};
use bytes::Bytes;
use tracing::debug;

/// The subset of [`Message`] that makes up an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EpochMessage {
    /// Start of an epoch.
    Begin(EpochBegin),
    /// A batch of its pages.
    Pages(Pages),
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
            Self::State(m) => m.epoch,
            Self::End(m) => m.epoch,
        }
    }

    /// Frame type the message travels in.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::Begin(_) => FrameType::EpochBegin,
            Self::Pages(_) => FrameType::Pages,
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
            EpochMessage::State(m) => Message::State(m),
            EpochMessage::End(m) => Message::EpochEnd(m),
        }
    }
}

/// A whole, verified checkpoint, ready to be applied to the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompleteEpoch {
    /// Epoch number.
    pub epoch: u64,
    /// Dirty pages, in the order they were sent (indices are distinct and in range).
    pub pages: Vec<Page>,
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
    state: Option<Bytes>,
    checksum: EpochChecksum,
}

/// Assembles epochs for the backup; see the module documentation.
pub struct EpochAssembler {
    geometry: Geometry,
    max_state_len: u64,
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
    pub fn push(&mut self, msg: EpochMessage) -> Result<Option<CompleteEpoch>, AssembleError> {
        let result = self.step(msg);
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

    fn step(&mut self, msg: EpochMessage) -> Result<Option<CompleteEpoch>, AssembleError> {
        let frame_type = msg.frame_type();
        match msg {
            EpochMessage::Begin(b) => self.begin(b).map(|()| None),
            EpochMessage::Pages(p) => self.pages(p).map(|()| None),
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
            state: None,
            checksum: EpochChecksum::new(b.epoch),
        });
        Ok(())
    }

    fn pages(&mut self, batch: Pages) -> Result<(), AssembleError> {
        let geometry = self.geometry;
        let epoch = batch.epoch;
        let partial = match &mut self.open {
            None => {
                return Err(AssembleError::NotOpen {
                    frame_type: FrameType::Pages,
                    epoch,
                })
            }
            Some(p) if p.begin.epoch != epoch => {
                return Err(AssembleError::WrongEpoch {
                    frame_type: FrameType::Pages,
                    open: p.begin.epoch,
                    got: epoch,
                })
            }
            Some(p) => p,
        };
        if partial.state.is_some() {
            return Err(AssembleError::PagesAfterState { epoch });
        }
        if batch.page_size != geometry.page_size() {
            return Err(AssembleError::PageSize {
                epoch,
                expected: geometry.page_size(),
                got: batch.page_size,
            });
        }
        let declared = partial.begin.page_count;
        if partial.pages.len() as u64 + batch.pages.len() as u64 > declared {
            return Err(AssembleError::ExcessPages { epoch, declared });
        }
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
            let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
            if self.seen[word] & bit != 0 {
                return Err(AssembleError::DuplicatePage { epoch, index });
            }
            // Mark and store together, so `discard` clears exactly the marked bits.
            self.seen[word] |= bit;
            partial.checksum.page(index, &page.data);
            partial.pages.push(page);
        }
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
        let pages = self.open.take().map(|p| p.pages).unwrap_or_default();
        self.clear_seen(&pages);
        // `begin` refused `u64::MAX`, so this cannot overflow.
        self.next_epoch = epoch + 1;
        Ok(CompleteEpoch {
            epoch,
            pages,
            state,
            checksum: computed,
        })
    }
}
