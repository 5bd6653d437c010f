//! Statistics shared by the bundler (baselines), the agent (live windows) and the server (cohorts).
//!
//! One histogram type with fixed, equal-width bins over `[lo, hi]` plus an underflow and an
//! overflow bin, and the population stability index (PSI) between two histograms with the same
//! bins. Keeping these in one place guarantees that a baseline recorded at build time and a window
//! recorded on a device are binned the same way.

use serde::{Deserialize, Serialize};

/// A fixed-bin histogram. `counts.len() == bins + 2`: `counts[0]` counts values below `lo`,
/// `counts[bins + 1]` values at or above `hi` (and NaN), the rest the equal-width bins between.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub lo: f64,
    pub hi: f64,
    pub counts: Vec<u64>,
}

impl Histogram {
    /// An empty histogram with `bins` equal-width bins over `[lo, hi]`.
    /// A degenerate range (`hi <= lo`) is widened so the histogram stays usable.
    pub fn new(lo: f64, hi: f64, bins: usize) -> Histogram {
        let bins = bins.max(1);
        let (lo, hi) = if hi > lo && lo.is_finite() && hi.is_finite() {
            (lo, hi)
        } else if lo.is_finite() {
            (lo - 0.5, lo + 0.5)
        } else {
            (0.0, 1.0)
        };
        Histogram {
            lo,
            hi,
            counts: vec![0; bins + 2],
        }
    }

    /// An empty histogram with the same bins as `self`.
    pub fn empty_like(&self) -> Histogram {
        Histogram {
            lo: self.lo,
            hi: self.hi,
            counts: vec![0; self.counts.len()],
        }
    }

    pub fn bins(&self) -> usize {
        self.counts.len().saturating_sub(2)
    }

    /// Index into `counts` where `value` falls. A histogram read from elsewhere (a manifest, a
    /// telemetry record) may have fewer than the 3 counts [`Histogram::new`] makes: then the
    /// index is clamped to the last count (and is 0 for no counts; [`Histogram::add`] then
    /// counts nothing).
    pub fn bin_of(&self, value: f64) -> usize {
        let bins = self.bins();
        let last = self.counts.len().saturating_sub(1);
        let i = if value < self.lo {
            0
        } else if value >= self.hi || value.is_nan() || bins == 0 {
            bins + 1
        } else {
            let i = ((value - self.lo) / (self.hi - self.lo) * bins as f64) as usize;
            1 + i.min(bins - 1)
        };
        i.min(last)
    }

    pub fn add(&mut self, value: f64) {
        let i = self.bin_of(value);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
    }

    /// All counts (saturating: a histogram received from a device may hold any counts).
    pub fn total(&self) -> u64 {
        saturating_sum(&self.counts)
    }

    /// Adds the counts of `other`; fails when the bins differ.
    pub fn merge(&mut self, other: &Histogram) -> Result<(), BinsDiffer> {
        if !self.same_bins(other) {
            return Err(BinsDiffer);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        Ok(())
    }

    pub fn same_bins(&self, other: &Histogram) -> bool {
        self.lo == other.lo && self.hi == other.hi && self.counts.len() == other.counts.len()
    }

    /// The value below which a fraction `q` of the counted values lie, interpolated linearly
    /// inside the bin. Underflow values count as `lo`, overflow as `hi`. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let target = q.clamp(0.0, 1.0) * total as f64;
        let width = (self.hi - self.lo) / self.bins() as f64;
        let mut seen = 0.0;
        for (i, &c) in self.counts.iter().enumerate() {
            let next = seen + c as f64;
            if c > 0 && next >= target {
                if i == 0 {
                    return Some(self.lo);
                }
                if i == self.counts.len() - 1 {
                    return Some(self.hi);
                }
                let frac = (target - seen) / c as f64;
                return Some(self.lo + width * ((i - 1) as f64 + frac));
            }
            seen = next;
        }
        Some(self.hi)
    }
}

/// Two histograms with different bins cannot be combined or compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("histograms have different bins")]
pub struct BinsDiffer;

/// The sum of `counts`, saturating at `u64::MAX`: counts that come from devices (telemetry
/// windows) may be anything, and a sum must neither panic (debug) nor wrap (release).
pub fn saturating_sum(counts: &[u64]) -> u64 {
    counts.iter().fold(0, |a, &c| a.saturating_add(c))
}

/// Population stability index between an expected and an actual distribution given as counts over
/// the same categories. Each proportion is floored at `1e-4` so empty bins do not give infinity.
/// Rules of thumb: < 0.1 no shift, 0.1–0.25 moderate, > 0.25 large.
pub fn psi(expected: &[u64], actual: &[u64]) -> f64 {
    let te = saturating_sum(expected);
    let ta = saturating_sum(actual);
    if te == 0 || ta == 0 || expected.len() != actual.len() {
        return 0.0;
    }
    psi_of_fractions(
        expected.iter().map(|&c| c as f64 / te as f64),
        actual.iter().map(|&c| c as f64 / ta as f64),
    )
}

/// PSI between two distributions given as fractions over the same categories.
pub fn psi_of_fractions(
    expected: impl IntoIterator<Item = f64>,
    actual: impl IntoIterator<Item = f64>,
) -> f64 {
    const FLOOR: f64 = 1e-4;
    expected
        .into_iter()
        .zip(actual)
        .map(|(e, a)| {
            let (e, a) = (e.max(FLOOR), a.max(FLOOR));
            (a - e) * (a / e).ln()
        })
        .sum()
}

/// A one-sided two-proportion test of "rate A exceeds rate B by more than `margin`" (a
/// non-inferiority test, as canary judging needs: a canary fails only on evidence, not on noise).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ProportionTest {
    pub rate_a: f64,
    pub rate_b: f64,
    /// `rate_a - rate_b`.
    pub difference: f64,
    /// z statistic of `difference - margin` with the unpooled standard error.
    pub z: f64,
    /// Probability of a z this large if A exceeded B by exactly `margin`.
    pub p_value: f64,
}

impl ProportionTest {
    /// A's excess over B beyond the margin is significant at level `alpha` (e.g. 0.05).
    pub fn significant(&self, alpha: f64) -> bool {
        self.p_value < alpha
    }
}

/// Tests `a_events / a_total` against `b_events / b_total`; `None` if either total is zero.
pub fn proportion_excess(
    a_events: u64,
    a_total: u64,
    b_events: u64,
    b_total: u64,
    margin: f64,
) -> Option<ProportionTest> {
    if a_total == 0 || b_total == 0 {
        return None;
    }
    let (na, nb) = (a_total as f64, b_total as f64);
    let (pa, pb) = (
        a_events.min(a_total) as f64 / na,
        b_events.min(b_total) as f64 / nb,
    );
    let difference = pa - pb;
    let se = (pa * (1.0 - pa) / na + pb * (1.0 - pb) / nb).sqrt();
    let excess = difference - margin;
    let z = if se > 0.0 {
        excess / se
    } else if excess > 0.0 {
        f64::INFINITY
    } else {
        f64::NEG_INFINITY
    };
    Some(ProportionTest {
        rate_a: pa,
        rate_b: pb,
        difference,
        z,
        p_value: 1.0 - normal_cdf(z),
    })
}

/// Standard normal cumulative distribution (Abramowitz & Stegun 7.1.26, error < 1.5e-7).
pub fn normal_cdf(z: f64) -> f64 {
    if z.is_infinite() {
        return if z > 0.0 { 1.0 } else { 0.0 };
    }
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.3275911 * x);
    let poly = t
        * (0.254829592
            + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let erf = 1.0 - poly * (-x * x).exp();
    if z >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// Running mean, variance, min and max (Welford).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    pub n: u64,
    pub mean: f64,
    m2: f64,
    pub min: f64,
    pub max: f64,
}

impl Moments {
    pub fn add(&mut self, x: f64) {
        if self.n == 0 {
            self.min = x;
            self.max = x;
        } else {
            self.min = self.min.min(x);
            self.max = self.max.max(x);
        }
        self.n += 1;
        let d = x - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (x - self.mean);
    }

    /// Population standard deviation.
    pub fn std(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            (self.m2 / self.n as f64).sqrt()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_with_too_few_counts_takes_values_without_panicking() {
        for counts in [vec![], vec![0], vec![0, 0]] {
            let mut h = Histogram {
                lo: 0.0,
                hi: 1.0,
                counts: counts.clone(),
            };
            for v in [-1.0, 0.0, 0.5, 1.0, 2.0, f64::NAN, f64::INFINITY] {
                h.add(v);
            }
            assert_eq!(h.counts.len(), counts.len());
            assert_eq!(h.total(), if counts.is_empty() { 0 } else { 7 });
        }
        // With degenerate bounds read from elsewhere (lo == hi, NaN) nothing panics either.
        for (lo, hi) in [(1.0, 1.0), (f64::NAN, f64::NAN), (2.0, 1.0)] {
            let mut h = Histogram {
                lo,
                hi,
                counts: vec![0; 5],
            };
            for v in [-1.0, 1.0, 1.5, f64::NAN] {
                h.add(v);
            }
            assert_eq!(h.total(), 4);
        }
    }

    #[test]
    fn histogram_bins_edges_and_outliers() {
        let mut h = Histogram::new(0.0, 1.0, 4);
        for v in [-1.0, 0.0, 0.24, 0.25, 0.99, 1.0, f64::NAN] {
            h.add(v);
        }
        assert_eq!(h.counts, vec![1, 2, 1, 0, 1, 2]);
        assert_eq!(h.total(), 7);
    }

    #[test]
    fn quantile_interpolates_inside_bins() {
        let mut h = Histogram::new(0.0, 100.0, 100);
        for v in 0..100 {
            h.add(v as f64 + 0.5);
        }
        let p95 = h.quantile(0.95).unwrap();
        assert!((p95 - 95.0).abs() < 1.01, "p95 {p95}");
        assert_eq!(Histogram::new(0.0, 1.0, 3).quantile(0.5), None);
    }

    #[test]
    fn psi_is_zero_for_same_and_large_for_shifted() {
        let a = [100, 200, 300, 400];
        assert!(psi(&a, &a).abs() < 1e-12);
        assert!(
            psi(&a, &[10, 20, 30, 40]).abs() < 1e-12,
            "scale does not matter"
        );
        assert!(psi(&a, &[400, 300, 200, 100]) > 0.5);
        assert!(psi(&[100, 0], &[0, 100]).is_finite());
    }

    #[test]
    fn merge_refuses_different_bins() {
        let mut a = Histogram::new(0.0, 1.0, 4);
        assert_eq!(a.merge(&Histogram::new(0.0, 2.0, 4)), Err(BinsDiffer));
        let mut b = a.empty_like();
        b.add(0.5);
        a.merge(&b).unwrap();
        assert_eq!(a.total(), 1);
    }

    #[test]
    fn normal_cdf_matches_tables() {
        for (z, p) in [
            (0.0, 0.5),
            (1.0, 0.841345),
            (1.645, 0.950015),
            (-1.96, 0.024998),
        ] {
            assert!((normal_cdf(z) - p).abs() < 1e-5, "{z}: {}", normal_cdf(z));
        }
    }

    #[test]
    fn proportion_excess_needs_evidence_not_just_a_difference() {
        // 3 errors in 100 vs 1 in 100: a difference, but not evidence of more than 1 point.
        let t = proportion_excess(3, 100, 1, 100, 0.01).unwrap();
        assert!((t.difference - 0.02).abs() < 1e-12);
        assert!(!t.significant(0.05), "{t:?}");
        // 30% vs 1% on 300 requests each: clear.
        let t = proportion_excess(90, 300, 3, 300, 0.01).unwrap();
        assert!(t.significant(0.05), "{t:?}");
        // Equal rates never fail, even when both are zero or one.
        assert!(!proportion_excess(0, 500, 0, 500, 0.01)
            .unwrap()
            .significant(0.05));
        assert!(!proportion_excess(500, 500, 500, 500, 0.01)
            .unwrap()
            .significant(0.05));
        assert!(proportion_excess(500, 500, 0, 500, 0.01)
            .unwrap()
            .significant(0.05));
        assert!(proportion_excess(1, 0, 0, 10, 0.0).is_none());
    }

    #[test]
    fn moments_match_closed_form() {
        let mut m = Moments::default();
        for x in [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0] {
            m.add(x);
        }
        assert_eq!(m.mean, 5.0);
        assert_eq!(m.std(), 2.0);
        assert_eq!((m.min, m.max), (2.0, 9.0));
    }

    /// Device-sent counts near `u64::MAX` (fuzzing, `fuzz/fuzz_targets/telemetry.rs`): sums
    /// saturate instead of panicking (debug) or wrapping (release).
    #[test]
    fn sums_of_huge_counts_saturate() {
        let max = u64::MAX;
        assert_eq!(saturating_sum(&[max, 1, max]), max);
        let mut h = Histogram {
            lo: 0.0,
            hi: 1.0,
            counts: vec![max, max, 0],
        };
        assert_eq!(h.total(), max);
        h.merge(&h.clone()).unwrap();
        assert_eq!(h.counts, vec![max, max, 0]);
        assert!(h.quantile(0.5).is_some());
        assert!(psi(&[max, max], &[1, max]).is_finite());
    }
}
