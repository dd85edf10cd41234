//! Statistics of samples (nearest-rank quantiles), and the little number helpers shared
//! by the measurements and the report.

use serde::Serialize;

/// Median, p99 (nearest rank) and max of some samples.
#[derive(Clone, Copy, Debug, Serialize)]
pub(super) struct Dist {
    pub(super) n: usize,
    pub(super) median: f64,
    pub(super) p99: f64,
    pub(super) max: f64,
}

fn quantile_sorted(v: &[f64], q: f64) -> f64 {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

pub(super) fn dist(v: &[f64]) -> Option<Dist> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some(Dist {
        n: s.len(),
        median: quantile_sorted(&s, 0.5),
        p99: quantile_sorted(&s, 0.99),
        max: s[s.len() - 1],
    })
}

pub(super) fn median(v: &[f64]) -> Option<f64> {
    dist(v).map(|d| d.median)
}

/// xorshift64*: cheap reproducible pseudo-random numbers.
pub(super) fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// The number at `path` in a JSON value (a status, a failover report).
pub(super) fn json_f64(v: &serde_json::Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let d = dist(&v).unwrap();
        assert_eq!((d.n, d.median, d.p99, d.max), (100, 50.0, 99.0, 100.0));
        assert!(dist(&[]).is_none());
    }
}
