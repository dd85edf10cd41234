//! Rolling samples for status: medians and p99 over the last N values.

use std::collections::VecDeque;

/// The last `cap` samples of something (nanoseconds, bytes).
#[derive(Clone, Debug)]
pub struct Samples {
    values: VecDeque<u64>,
    cap: usize,
}

impl Samples {
    pub fn new(cap: usize) -> Self {
        Samples {
            values: VecDeque::with_capacity(cap),
            cap,
        }
    }

    pub fn push(&mut self, v: u64) {
        if self.values.len() == self.cap {
            self.values.pop_front();
        }
        self.values.push_back(v);
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The `q` quantile (0.0–1.0) by nearest rank, or 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.values.is_empty() {
            return 0;
        }
        let mut v: Vec<u64> = self.values.iter().copied().collect();
        v.sort_unstable();
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    }

    pub fn median(&self) -> u64 {
        self.quantile(0.5)
    }

    pub fn p99(&self) -> u64 {
        self.quantile(0.99)
    }

    pub fn values(&self) -> impl Iterator<Item = u64> + '_ {
        self.values.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_over_a_window() {
        let mut s = Samples::new(100);
        assert_eq!(s.median(), 0);
        for v in 1..=200 {
            s.push(v);
        }
        assert_eq!(s.len(), 100);
        assert_eq!(s.median(), 150);
        assert_eq!(s.p99(), 199);
        assert_eq!(s.quantile(1.0), 200);
    }
}
