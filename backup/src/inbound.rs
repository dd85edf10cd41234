//! Frames the primary's guest received that no committed checkpoint covers yet
//! ([`twin_wire::Inbound`]), kept so that a takeover can deliver them at once.
//!
//! A request that reached the primary's guest after its last acknowledged checkpoint is
//! lost with the primary; the client only sends it again when its retransmission timer
//! fires (≥ 200 ms on Linux, whatever the network). The primary forwards every inbound
//! frame, tagged with the epoch open when its guest received it; this log keeps those of
//! epochs above the last committed one, and at a takeover from epoch `e` the frames tagged
//! `> e` — exactly what the restored guest never saw — go into its RX queue first.
//! Best effort: one that never arrived is retransmitted by the client as before, and one
//! delivered twice is dropped by the guest's TCP as a duplicate. Bounded by
//! [`MAX_BYTES`] (oldest dropped first).

use std::collections::VecDeque;

use twin_wire::Inbound;

/// Most frame bytes kept (a few epochs of a busy server's requests).
pub const MAX_BYTES: usize = 4 << 20;

#[derive(Debug, Default)]
pub struct InboundLog {
    frames: VecDeque<Inbound>,
    bytes: usize,
    /// Frames dropped to stay within [`MAX_BYTES`].
    pub overflowed: u64,
}

impl InboundLog {
    /// Keeps `f` unless epoch `committed` already covers it.
    pub fn push(&mut self, f: Inbound, committed: Option<u64>) {
        if committed.is_some_and(|c| f.epoch <= c) {
            return;
        }
        self.bytes += f.frame.len();
        self.frames.push_back(f);
        while self.bytes > MAX_BYTES {
            let Some(old) = self.frames.pop_front() else {
                break;
            };
            self.bytes -= old.frame.len();
            self.overflowed += 1;
        }
    }

    /// Epoch `e` is committed: forgets every frame it covers.
    pub fn commit(&mut self, e: u64) {
        let before = self.frames.len();
        self.frames.retain(|f| f.epoch > e);
        if self.frames.len() != before {
            self.bytes = self.frames.iter().map(|f| f.frame.len()).sum();
        }
    }

    /// The frames a guest restored from epoch `e` never saw, in the order received.
    pub fn take_after(&mut self, e: u64) -> Vec<Vec<u8>> {
        self.bytes = 0;
        std::mem::take(&mut self.frames)
            .into_iter()
            .filter(|f| f.epoch > e)
            .map(|f| f.frame)
            .collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.frames.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(epoch: u64, b: u8, len: usize) -> Inbound {
        Inbound {
            epoch,
            frame: vec![b; len],
        }
    }

    #[test]
    fn a_takeover_gets_exactly_the_frames_after_its_epoch() {
        let mut l = InboundLog::default();
        l.push(f(5, 1, 60), Some(4));
        l.push(f(6, 2, 60), Some(4));
        l.push(f(6, 3, 60), Some(4));
        l.push(f(7, 4, 60), Some(4));
        l.commit(5);
        assert_eq!(l.len(), 3);
        let out = l.take_after(6);
        assert_eq!(out, vec![vec![4; 60]]);
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn frames_a_commit_already_covers_are_not_kept() {
        let mut l = InboundLog::default();
        l.push(f(3, 1, 60), Some(3));
        l.push(f(2, 1, 60), Some(3));
        assert_eq!(l.len(), 0);
        l.push(f(1, 1, 60), None);
        assert_eq!(l.len(), 1, "nothing committed yet: kept");
    }

    #[test]
    fn the_log_is_bounded_oldest_first() {
        let mut l = InboundLog::default();
        let n = MAX_BYTES / 1000 + 10;
        for i in 0..n {
            l.push(f(10 + i as u64, 0, 1000), Some(9));
        }
        assert!(l.bytes <= MAX_BYTES);
        assert_eq!(l.overflowed, 10);
        let out = l.take_after(0);
        assert_eq!(out.len(), n - 10);
    }
}
