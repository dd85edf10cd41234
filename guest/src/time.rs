//! Monotonic time from the TSC.

use crate::arch::rdtsc;

/// Nanoseconds since boot from `rdtsc`, never going backwards.
pub struct Clock {
    tsc0: u64,
    /// Nanoseconds per TSC tick, as a 32.32 fixed-point number.
    ns_per_tick_fp: u64,
    last: u64,
}

impl Clock {
    /// A clock whose zero is the TSC value `tsc0`, for a TSC running at `tsc_khz`.
    pub fn new(tsc0: u64, tsc_khz: u64) -> Clock {
        let ns_per_tick_fp = ((1_000_000u128 << 32) / u128::from(tsc_khz.max(1))) as u64;
        Clock {
            tsc0,
            ns_per_tick_fp,
            last: 0,
        }
    }

    /// Convert a TSC tick count to nanoseconds.
    pub fn ticks_to_ns(&self, ticks: u64) -> u64 {
        ((u128::from(ticks) * u128::from(self.ns_per_tick_fp)) >> 32) as u64
    }

    /// Nanoseconds since boot.
    #[inline]
    pub fn now_ns(&mut self) -> u64 {
        let ticks = rdtsc().saturating_sub(self.tsc0);
        let ns = self.ticks_to_ns(ticks);
        if ns > self.last {
            self.last = ns;
        }
        self.last
    }
}
