//! The primary's side of an epoch: [`EpochEncoder`] writes `EpochBegin`, `Pages` batches,
//! `State` and `EpochEnd` in the order the backup's assembler demands, and computes the
//! end-to-end checksum while it copies the pages.

use crate::checksum::EpochChecksum;
use crate::codec::COMPRESSED_ENTRY_LEN;
use crate::codec::{EncodeError, FrameCodec};
use crate::message::{
    CompressedPagesRef, DiskWrites, EncodedPageRef, EpochBegin, EpochEnd, Message, PageRef,
    PagesRef, StateRef,
};
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
    #[error("epoch {epoch}: disk writes after the state, or for another epoch")]
    DiskOutOfOrder { epoch: u64 },
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

    /// Append `pages`, each already encoded, as one or more `CompressedPages` frames (split
    /// where the next page would pass the codec's frame cap). The epoch checksum covers
    /// each page's decoded contents (`raw`), as for [`EpochEncoder::pages`].
    pub fn compressed_pages(
        &mut self,
        pages: &[EncodedPageRef<'_>],
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
        // Frame prefix: epoch, page size, count.
        let cap = u64::from(self.codec.max_frame_len()).saturating_sub(16);
        let mut rest = pages;
        while !rest.is_empty() {
            let mut n = 0;
            let mut len = 0u64;
            for p in rest {
                let more = COMPRESSED_ENTRY_LEN as u64 + p.data.len() as u64;
                if n > 0 && len + more > cap {
                    break;
                }
                len += more;
                n += 1;
            }
            let (chunk, tail) = rest.split_at(n);
            self.codec
                .encode_compressed_pages(
                    CompressedPagesRef {
                        epoch,
                        page_size: self.page_size,
                        pages: chunk,
                    },
                    Some(&mut self.checksum),
                    dst,
                )
                .map_err(|source| EpochEncodeError::Encode { epoch, source })?;
            self.sent_pages += n as u64;
            rest = tail;
        }
        Ok(())
    }

    /// Writes of one disk in this epoch (after the pages, before the state; a disk may have
    /// several messages, applied in order).
    pub fn disk_writes(
        &mut self,
        w: &DiskWrites,
        dst: &mut BytesMut,
    ) -> Result<(), EpochEncodeError> {
        let epoch = self.begin.epoch;
        if self.state_sent || w.epoch != epoch {
            return Err(EpochEncodeError::DiskOutOfOrder { epoch });
        }
        self.codec
            .encode_message(&Message::DiskWrites(w.clone()), dst)
            .map_err(|source| EpochEncodeError::Encode { epoch, source })?;
        self.checksum.disk(w);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::EpochBegin;

    fn begin(pages: u64, state: u64) -> (EpochEncoder, BytesMut) {
        let mut buf = BytesMut::new();
        let e = EpochEncoder::begin(
            FrameCodec::new(),
            EpochBegin {
                epoch: 4,
                page_count: pages,
                state_len: state,
            },
            4096,
            &mut buf,
        )
        .unwrap();
        (e, buf)
    }

    #[test]
    fn order_violations_are_refused() {
        let page = vec![0u8; 4096];
        let refs = [
            PageRef {
                index: 0,
                data: &page,
            },
            PageRef {
                index: 1,
                data: &page,
            },
        ];
        let (mut e, mut buf) = begin(1, 2);
        assert!(matches!(
            e.pages(&refs, &mut buf),
            Err(EpochEncodeError::ExcessPages {
                epoch: 4,
                declared: 1
            })
        ));
        assert!(matches!(
            e.state(b"ab", &mut buf),
            Err(EpochEncodeError::StateOutOfOrder { .. })
        ));
        e.pages(&refs[..1], &mut buf).unwrap();
        assert!(matches!(
            e.state(b"abc", &mut buf),
            Err(EpochEncodeError::StateLength {
                len: 3,
                declared: 2,
                ..
            })
        ));
        e.state(b"ab", &mut buf).unwrap();
        assert!(matches!(
            e.pages(&[], &mut buf),
            Err(EpochEncodeError::PagesAfterState { epoch: 4 })
        ));
        let end = e.end(&mut buf).unwrap();
        assert_eq!(end.page_count, 1);
        assert_eq!(end.total_bytes, 4098);
        let (e, mut buf) = begin(0, 0);
        assert!(matches!(
            e.end(&mut buf),
            Err(EpochEncodeError::MissingState { epoch: 4 })
        ));
    }

    #[test]
    fn pages_are_split_at_the_frame_cap() {
        let page = vec![7u8; 4096];
        let refs: Vec<_> = (0..5).map(|index| PageRef { index, data: &page }).collect();
        let mut buf = BytesMut::new();
        let codec = FrameCodec::with_max_frame_len(2 * (4096 + 8) + 16);
        let mut e = EpochEncoder::begin(
            codec,
            EpochBegin {
                epoch: 1,
                page_count: 5,
                state_len: 0,
            },
            4096,
            &mut buf,
        )
        .unwrap();
        e.pages(&refs, &mut buf).unwrap();
        e.state(b"", &mut buf).unwrap();
        e.end(&mut buf).unwrap();
        let mut dec = codec;
        let mut batches = 0;
        while let Some(m) = tokio_util::codec::Decoder::decode_eof(&mut dec, &mut buf).unwrap() {
            if let Message::Pages(p) = m {
                assert!(p.pages.len() <= 2);
                batches += 1;
            }
        }
        assert_eq!(batches, 3);
    }
}
