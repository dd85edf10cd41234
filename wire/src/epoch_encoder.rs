//! The primary's side of an epoch: [`EpochEncoder`] writes `EpochBegin`, `Pages` batches,
//! `State` and `EpochEnd` in the order the backup's assembler demands, and computes the
//! end-to-end checksum while it copies the pages.

use crate::checksum::EpochChecksum;
use crate::codec::{EncodeError, FrameCodec};
use crate::message::{EpochBegin, EpochEnd, Message, PageRef, PagesRef, StateRef};
use bytes::BytesMut;

/// The primary broke the order of an epoch, or a frame failed to encode. Frames already
/// appended to the output for this epoch must not be sent: the session is broken.
#[derive(Debug, thiserror::Error)]
pub enum EpochEncodeError {
    /// A frame failed to encode.
    #[error("epoch {epoch}: frame encoding failed")]
    Encode {
        /// The epoch.
        epoch: u64,
        /// The codec's error.
        #[source]
        source: EncodeError,
    },
    /// More pages than announced in `EpochBegin`.
    #[error("epoch {epoch}: more than the {declared} pages announced")]
    ExcessPages {
        /// The epoch.
        epoch: u64,
        /// Announced page count.
        declared: u64,
    },
    /// Pages after the state.
    #[error("epoch {epoch}: pages after the state")]
    PagesAfterState {
        /// The epoch.
        epoch: u64,
    },
    /// State before all announced pages, or twice.
    #[error("epoch {epoch}: state after {sent} of {declared} pages (or sent twice)")]
    StateOutOfOrder {
        /// The epoch.
        epoch: u64,
        /// Pages sent.
        sent: u64,
        /// Announced page count.
        declared: u64,
    },
    /// The state's length is not the one announced.
    #[error("epoch {epoch}: state of {len} bytes, {declared} announced")]
    StateLength {
        /// The epoch.
        epoch: u64,
        /// Actual length.
        len: u64,
        /// Announced length.
        declared: u64,
    },
    /// End before the state.
    #[error("epoch {epoch}: end before the state")]
    MissingState {
        /// The epoch.
        epoch: u64,
    },
}

/// Writes the frames of one epoch; see the module documentation.
#[derive(Debug)]
pub struct EpochEncoder {
    codec: FrameCodec,
    begin: EpochBegin,
    page_size: u32,
    sent_pages: u64,
    state_sent: bool,
    checksum: EpochChecksum,
}

impl EpochEncoder {
    /// Append `EpochBegin` to `dst` and start the epoch.
    pub fn begin(
        codec: FrameCodec,
        begin: EpochBegin,
        page_size: u32,
        dst: &mut BytesMut,
    ) -> Result<Self, EpochEncodeError> {
        codec
            .encode_message(&Message::EpochBegin(begin), dst)
            .map_err(|source| EpochEncodeError::Encode {
                epoch: begin.epoch,
                source,
            })?;
        Ok(Self {
            codec,
            begin,
            page_size,
            sent_pages: 0,
            state_sent: false,
            checksum: EpochChecksum::new(begin.epoch),
        })
    }

    /// The epoch being written.
    pub fn epoch(&self) -> u64 {
        self.begin.epoch
    }

    /// Append `pages` as one or more `Pages` frames (split at the codec's frame cap).
    pub fn pages(
        &mut self,
        pages: &[PageRef<'_>],
        dst: &mut BytesMut,
    ) -> Result<(), EpochEncodeError> {
        let epoch = self.begin.epoch;
        if self.state_sent {
            return Err(EpochEncodeError::PagesAfterState { epoch });
        }
        if self.sent_pages + pages.len() as u64 > self.begin.page_count {
            return Err(EpochEncodeError::ExcessPages {
                epoch,
                declared: self.begin.page_count,
            });
        }
        let per_frame = self.codec.max_pages_per_frame(self.page_size).max(1);
        for chunk in pages.chunks(per_frame) {
            self.codec
                .encode_pages_checksummed(
                    PagesRef {
                        epoch,
                        page_size: self.page_size,
                        pages: chunk,
                    },
                    &mut self.checksum,
                    dst,
                )
                .map_err(|source| EpochEncodeError::Encode { epoch, source })?;
            self.sent_pages += chunk.len() as u64;
        }
        Ok(())
    }

    /// Append the `State` frame (after every announced page).
    pub fn state(&mut self, blob: &[u8], dst: &mut BytesMut) -> Result<(), EpochEncodeError> {
        let epoch = self.begin.epoch;
        if self.state_sent || self.sent_pages != self.begin.page_count {
            return Err(EpochEncodeError::StateOutOfOrder {
                epoch,
                sent: self.sent_pages,
                declared: self.begin.page_count,
            });
        }
        if blob.len() as u64 != self.begin.state_len {
            return Err(EpochEncodeError::StateLength {
                epoch,
                len: blob.len() as u64,
                declared: self.begin.state_len,
            });
        }
        self.codec
            .encode_state(StateRef { epoch, blob }, dst)
            .map_err(|source| EpochEncodeError::Encode { epoch, source })?;
        self.checksum.state(blob);
        self.state_sent = true;
        Ok(())
    }

    /// Append `EpochEnd` and return it (its checksum identifies the epoch in logs).
    pub fn end(self, dst: &mut BytesMut) -> Result<EpochEnd, EpochEncodeError> {
        let epoch = self.begin.epoch;
        if !self.state_sent {
            return Err(EpochEncodeError::MissingState { epoch });
        }
        let end = EpochEnd {
            epoch,
            page_count: self.sent_pages,
            total_bytes: self.checksum.total_bytes(),
            checksum: self.checksum.sum(),
        };
        self.codec
            .encode_message(&Message::EpochEnd(end), dst)
            .map_err(|source| EpochEncodeError::Encode { epoch, source })?;
        Ok(end)
    }
}
