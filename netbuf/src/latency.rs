//! Release latency accounting: how long a guest frame waited in the buffer.
//!
//! Output commit adds, to every packet, the wait for the end of its epoch plus the
//! checkpoint's transfer and acknowledgement; this is the number users feel, so it is kept
//! both as a coarse all-time histogram and as an exact window of recent samples from which
//! the median and p99 are computed.

use std::collections::VecDeque;
use std::time::Duration;

/// Number of histogram buckets: bucket 0 holds samples under 1 µs, bucket `i` samples in
/// `[2^(i-1), 2^i)` µs, the last bucket everything from about 1 s up.
pub const HISTOGRAM_BUCKETS: usize = 22;

/// Running latency statistics.
#[derive(Debug, Clone)]
pub(crate) struct LatencyRecorder {
    count: u64,
    sum: Duration,
    max: Duration,
    histogram: [u64; HISTOGRAM_BUCKETS],
    window: VecDeque<Duration>,
    window_len: usize,
}

/// A snapshot of the release latency statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencySummary {
    /// Frames released since the buffer was created.
    pub count: u64,
    /// Sum of their latencies (mean = sum / count).
    pub sum: Duration,
    /// Largest latency seen.
    pub max: Duration,
    /// Latency of the most recently released frame.
    pub last: Option<Duration>,
    /// Median over the recent window.
    pub p50: Option<Duration>,
    /// 99th percentile over the recent window.
    pub p99: Option<Duration>,
    /// Number of samples in the recent window.
    pub window: usize,
    /// All-time log2 histogram, see [`HISTOGRAM_BUCKETS`].
    pub histogram: [u64; HISTOGRAM_BUCKETS],
}

impl LatencySummary {
    /// Mean latency, if any frame was released.
    pub fn mean(&self) -> Option<Duration> {
        let count = u32::try_from(self.count).unwrap_or(u32::MAX);
        (count > 0).then(|| self.sum / count)
    }
}

fn bucket(d: Duration) -> usize {
    let us = d.as_micros();
    if us == 0 {
        0
    } else {
        // 1 µs -> 1, 2..3 µs -> 2, 4..7 µs -> 3, ...
        ((u128::BITS - us.leading_zeros()) as usize).min(HISTOGRAM_BUCKETS - 1)
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    // Nearest-rank percentile.
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

impl LatencyRecorder {
    pub(crate) fn new(window_len: usize) -> Self {
        Self {
            count: 0,
            sum: Duration::ZERO,
            max: Duration::ZERO,
            histogram: [0; HISTOGRAM_BUCKETS],
            window: VecDeque::with_capacity(window_len),
            window_len,
        }
    }

    pub(crate) fn record(&mut self, d: Duration) {
        self.count += 1;
        self.sum = self.sum.saturating_add(d);
        self.max = self.max.max(d);
        self.histogram[bucket(d)] += 1;
        if self.window_len > 0 {
            if self.window.len() == self.window_len {
                self.window.pop_front();
            }
            self.window.push_back(d);
        }
    }

    pub(crate) fn summary(&self) -> LatencySummary {
        let mut sorted: Vec<Duration> = self.window.iter().copied().collect();
        sorted.sort_unstable();
        LatencySummary {
            count: self.count,
            sum: self.sum,
            max: self.max,
            last: self.window.back().copied(),
            p50: percentile(&sorted, 50),
            p99: percentile(&sorted, 99),
            window: sorted.len(),
            histogram: self.histogram,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_microseconds() {
        assert_eq!(bucket(Duration::from_nanos(999)), 0);
        assert_eq!(bucket(Duration::from_micros(1)), 1);
        assert_eq!(bucket(Duration::from_micros(3)), 2);
        assert_eq!(bucket(Duration::from_micros(4)), 3);
        assert_eq!(bucket(Duration::from_millis(25)), 15);
        assert_eq!(bucket(Duration::from_secs(3600)), HISTOGRAM_BUCKETS - 1);
    }

    #[test]
    fn summary_over_a_window() {
        let mut r = LatencyRecorder::new(100);
        for ms in 1..=200u64 {
            r.record(Duration::from_millis(ms));
        }
        let s = r.summary();
        assert_eq!(s.count, 200);
        assert_eq!(s.window, 100);
        assert_eq!(s.max, Duration::from_millis(200));
        assert_eq!(s.last, Some(Duration::from_millis(200)));
        // The window holds 101..=200 ms.
        assert_eq!(s.p50, Some(Duration::from_millis(150)));
        assert_eq!(s.p99, Some(Duration::from_millis(199)));
        assert_eq!(s.mean(), Some(Duration::from_micros(100_500)));
        assert_eq!(s.histogram.iter().sum::<u64>(), 200);
    }

    #[test]
    fn empty_summary() {
        let s = LatencyRecorder::new(0).summary();
        assert_eq!((s.p50, s.p99, s.last, s.mean()), (None, None, None, None));
    }
}
