//! Percentiles and the bootstrap interval of a total-score ratio.

use splitmix::SplitMix64;

/// The `q`-th percentile (0–100) of `values` with linear interpolation between order statistics (numpy's
/// default); NaN for no values.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let pos = (q / 100.0).clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// A ratio with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RatioInterval {
    /// Σ system / Σ reference over the questions.
    pub ratio: f64,
    /// The 2.5th and 97.5th percentiles of the ratio over the resamples.
    pub ci_low: f64,
    pub ci_high: f64,
    pub questions: usize,
    pub system_total: f64,
    pub reference_total: f64,
}

/// The total-score ratio of `(system, reference)` score pairs (one per question), with a 95% interval
/// from `rounds` bootstrap resamples of the questions (with replacement; `seed` fixes them).
pub fn bootstrap_ratio(pairs: &[(f64, f64)], rounds: usize, seed: u64) -> RatioInterval {
    let (system_total, reference_total) = totals(pairs.iter());
    let ratio = system_total / reference_total;
    let mut rng = SplitMix64(seed);
    let n = pairs.len();
    let ratios: Vec<f64> = (0..if n == 0 { 0 } else { rounds })
        .map(|_| {
            let (s, r) = totals((0..n).map(|_| &pairs[rng.below(n as u64) as usize]));
            s / r
        })
        .collect();
    RatioInterval {
        ratio,
        ci_low: percentile(&ratios, 2.5),
        ci_high: percentile(&ratios, 97.5),
        questions: n,
        system_total,
        reference_total,
    }
}

fn totals<'a>(pairs: impl Iterator<Item = &'a (f64, f64)>) -> (f64, f64) {
    pairs.fold((0.0, 0.0), |(s, r), p| (s + p.0, r + p.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 4.0);
        assert_eq!(percentile(&v, 50.0), 2.5);
        // numpy.percentile([1,2,3,4], 2.5) = 1.075
        assert!((percentile(&v, 2.5) - 1.075).abs() < 1e-12);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn bootstrap_brackets_the_ratio_and_collapses_for_constant_ratios() {
        // Every question at the same 3:4 ratio: every resample gives 0.75.
        let same: Vec<(f64, f64)> = (1..=20).map(|i| (3.0 * i as f64, 4.0 * i as f64)).collect();
        let r = bootstrap_ratio(&same, 500, 7);
        assert!((r.ratio - 0.75).abs() < 1e-12 && (r.ci_low - 0.75).abs() < 1e-12 && (r.ci_high - 0.75).abs() < 1e-12);
        // Mixed questions: the interval contains the ratio, is not degenerate, and is seeded.
        let mixed: Vec<(f64, f64)> = (0..40).map(|i| (if i % 3 == 0 { 9.0 } else { 5.0 }, 7.0)).collect();
        let r = bootstrap_ratio(&mixed, 2000, 1);
        assert!(r.ci_low < r.ratio && r.ratio < r.ci_high, "{r:?}");
        assert_eq!(r.questions, 40);
        assert_eq!(r, bootstrap_ratio(&mixed, 2000, 1));
        // The standard error of a ratio of means is about sd / (mean_ref * sqrt(n)): the 95% interval
        // should be about ±1.96 of it (within 25%).
        let s: Vec<f64> = mixed.iter().map(|p| p.0).collect();
        let mean = s.iter().sum::<f64>() / 40.0;
        let sd = (s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 39.0).sqrt();
        let half = 1.96 * sd / (7.0 * 40f64.sqrt());
        let got = (r.ci_high - r.ci_low) / 2.0;
        assert!((got / half - 1.0).abs() < 0.25, "half-width {got} vs normal approximation {half}");
    }
}
