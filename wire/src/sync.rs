//! The backup's check of the initial synchronisation.
//!
//! During the sync the backup writes pages straight into its replica (the replica is not a
//! failover image until the sync is done *and* the first epoch is committed). [`SyncTracker`]
//! validates every batch before it is applied and, at `SyncDone`, proves that every guest
//! page was sent at least once (as data or as a zero page) and that no batch was lost.

use crate::message::{Geometry, SyncDone, SyncPages, SyncZeroPages};

/// A sync batch or the end of the sync is wrong. The batch must not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// The batch's page size is not the VM's.
    #[error("sync page size {got}, the VM's is {expected}")]
    PageSize {
        /// The VM's page size.
        expected: u32,
        /// The batch's page size.
        got: u32,
    },
    /// A page's data is not exactly one page long.
    #[error("sync page {index} has {len} bytes, not {page_size}")]
    PageLength {
        /// Page index.
        index: u64,
        /// Data length.
        len: usize,
        /// The VM's page size.
        page_size: u32,
    },
    /// A page index beyond the end of guest memory.
    #[error("sync page index {index} out of range (the VM has {page_count} pages)")]
    PageOutOfRange {
        /// The index.
        index: u64,
        /// Pages in the VM.
        page_count: u64,
    },
    /// A batch after `SyncDone`.
    #[error("sync data after the end of the sync")]
    AfterDone,
    /// `SyncDone` counts another number of page entries than arrived (a batch was lost).
    #[error("sync end says {sent} page entries were sent, {received} arrived")]
    CountMismatch {
        /// Entries the primary sent.
        sent: u64,
        /// Entries received.
        received: u64,
    },
    /// Some guest pages were never sent.
    #[error("{missing} guest pages were never sent, the first is {first}")]
    Incomplete {
        /// Number of pages never sent.
        missing: u64,
        /// The lowest such page index.
        first: u64,
    },
}

/// Tracks the initial synchronisation; see the module documentation.
#[derive(Debug, Clone)]
pub struct SyncTracker {
    geometry: Geometry,
    covered: Vec<u64>,
    entries: u64,
    done: bool,
}

impl SyncTracker {
    /// A tracker for a VM of `geometry`.
    pub fn new(geometry: Geometry) -> Self {
        Self {
            geometry,
            covered: vec![0; geometry.page_count().div_ceil(64) as usize],
            entries: 0,
            done: false,
        }
    }

    fn check_index(&self, index: u64) -> Result<(), SyncError> {
        if index < self.geometry.page_count() {
            Ok(())
        } else {
            Err(SyncError::PageOutOfRange {
                index,
                page_count: self.geometry.page_count(),
            })
        }
    }

    fn mark(&mut self, index: u64) {
        self.covered[(index / 64) as usize] |= 1 << (index % 64);
        self.entries += 1;
    }

    /// Check a batch of full pages; on success they may be written to the replica. On error
    /// the tracker is unchanged.
    pub fn pages(&mut self, batch: &SyncPages) -> Result<(), SyncError> {
        if self.done {
            return Err(SyncError::AfterDone);
        }
        let page_size = self.geometry.page_size();
        if batch.page_size != page_size {
            return Err(SyncError::PageSize {
                expected: page_size,
                got: batch.page_size,
            });
        }
        for p in &batch.pages {
            self.check_index(p.index)?;
            if p.data.len() != page_size as usize {
                return Err(SyncError::PageLength {
                    index: p.index,
                    len: p.data.len(),
                    page_size,
                });
            }
        }
        for p in &batch.pages {
            self.mark(p.index);
        }
        Ok(())
    }

    /// Check a batch of zero pages; on success they may be zeroed in the replica. On error
    /// the tracker is unchanged.
    pub fn zero_pages(&mut self, batch: &SyncZeroPages) -> Result<(), SyncError> {
        if self.done {
            return Err(SyncError::AfterDone);
        }
        for &index in &batch.indices {
            self.check_index(index)?;
        }
        for &index in &batch.indices {
            self.mark(index);
        }
        Ok(())
    }

    /// Check the end of the sync: every page covered, no batch lost.
    pub fn done(&mut self, done: &SyncDone) -> Result<(), SyncError> {
        if self.done {
            return Err(SyncError::AfterDone);
        }
        if done.pages_sent != self.entries {
            return Err(SyncError::CountMismatch {
                sent: done.pages_sent,
                received: self.entries,
            });
        }
        let page_count = self.geometry.page_count();
        let mut missing = 0u64;
        let mut first = None;
        for (w, &word) in self.covered.iter().enumerate() {
            // Bits past the last page are never set: count only real pages.
            let base = w as u64 * 64;
            let valid = (page_count - base).min(64);
            let mask = if valid == 64 {
                u64::MAX
            } else {
                (1u64 << valid) - 1
            };
            let holes = !word & mask;
            if holes != 0 {
                missing += u64::from(holes.count_ones());
                first.get_or_insert(base + u64::from(holes.trailing_zeros()));
            }
        }
        if let Some(first) = first {
            return Err(SyncError::Incomplete { missing, first });
        }
        self.done = true;
        Ok(())
    }

    /// Whether `SyncDone` was accepted.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Page;
    use bytes::Bytes;

    fn geometry() -> Geometry {
        Geometry::new(100 * 4096, 4096).unwrap()
    }

    fn page(index: u64) -> Page {
        Page {
            index,
            data: Bytes::from(vec![index as u8; 4096]),
        }
    }

    #[test]
    fn full_coverage_with_zero_pages_and_resends_completes() {
        let mut t = SyncTracker::new(geometry());
        let batch = SyncPages {
            page_size: 4096,
            pages: (0..50).map(page).collect(),
        };
        t.pages(&batch).unwrap();
        t.zero_pages(&SyncZeroPages {
            indices: (50..100).collect(),
        })
        .unwrap();
        // An iterative sync may resend a page dirtied meanwhile.
        t.pages(&SyncPages {
            page_size: 4096,
            pages: vec![page(3)],
        })
        .unwrap();
        t.done(&SyncDone {
            pages_sent: 101,
            disk_bytes_sent: 0,
        })
        .unwrap();
        assert!(t.is_done());
        assert_eq!(
            t.zero_pages(&SyncZeroPages { indices: vec![] }),
            Err(SyncError::AfterDone)
        );
    }

    #[test]
    fn missing_pages_are_reported() {
        let mut t = SyncTracker::new(geometry());
        t.zero_pages(&SyncZeroPages {
            indices: (0..100).filter(|i| *i != 7 && *i != 99).collect(),
        })
        .unwrap();
        assert_eq!(
            t.done(&SyncDone {
                pages_sent: 98,
                disk_bytes_sent: 0,
            }),
            Err(SyncError::Incomplete {
                missing: 2,
                first: 7
            })
        );
    }

    #[test]
    fn lost_batch_is_detected_by_count() {
        let mut t = SyncTracker::new(geometry());
        t.zero_pages(&SyncZeroPages {
            indices: (0..100).collect(),
        })
        .unwrap();
        assert_eq!(
            t.done(&SyncDone {
                pages_sent: 150,
                disk_bytes_sent: 0,
            }),
            Err(SyncError::CountMismatch {
                sent: 150,
                received: 100
            })
        );
    }

    #[test]
    fn bad_batches_leave_the_tracker_unchanged() {
        let mut t = SyncTracker::new(geometry());
        let bad = SyncPages {
            page_size: 4096,
            pages: vec![page(1), page(100)],
        };
        assert_eq!(
            t.pages(&bad),
            Err(SyncError::PageOutOfRange {
                index: 100,
                page_count: 100
            })
        );
        let bad_size = SyncPages {
            page_size: 8192,
            pages: vec![],
        };
        assert!(matches!(
            t.pages(&bad_size),
            Err(SyncError::PageSize { .. })
        ));
        let short = SyncPages {
            page_size: 4096,
            pages: vec![Page {
                index: 2,
                data: Bytes::from_static(b"x"),
            }],
        };
        assert!(matches!(t.pages(&short), Err(SyncError::PageLength { .. })));
        assert!(matches!(
            t.zero_pages(&SyncZeroPages {
                indices: vec![0, 1000]
            }),
            Err(SyncError::PageOutOfRange { .. })
        ));
        assert!(matches!(
            t.done(&SyncDone {
                pages_sent: 0,
                disk_bytes_sent: 0,
            }),
            Err(SyncError::Incomplete {
                missing: 100,
                first: 0
            })
        ));
    }
}
