//! Vectorised f32 row kernels for the host (flex) ops: `exp` with Cephes' single-precision polynomial
//! (≈ 1 ulp on the normal range, 0 below e⁻¹⁰⁴, ∞ above e^88.72, NaN kept), a row's maximum and
//! `Σ exp(x − max)`, and the softmax-minus-one-hot gradient of a row. Written as 16-lane loops that LLVM
//! vectorises, compiled three times (AVX-512, AVX2+FMA, baseline) and chosen at run time; no fused
//! multiply-adds, so every variant returns the same bits.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HIGH: f32 = 0.693_359_4;
const LN2_LOW: f32 = -2.121_944_4e-4;
const LANES: usize = 16;

/// `eˣ`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let clamped = x.clamp(-104.0, 88.72283);
    // n = round(x / ln 2) (the 1.5·2²³ trick rounds to nearest even), r = x − n·ln 2 in two parts.
    let n = (clamped * LOG2E + 12_582_912.0) - 12_582_912.0;
    let r = (clamped - n * LN2_HIGH) - n * LN2_LOW;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let y = p * (r * r) + r + 1.0;
    // 2ⁿ as two normal powers of two, so results down to the subnormals are exact products.
    let n = n as i32;
    let half = n >> 1;
    let pow = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let value = y * pow(half) * pow(n - half);
    if x.is_nan() {
        x
    } else if x > 88.72283 {
        f32::INFINITY
    } else if x < -104.0 {
        0.0
    } else {
        value
    }
}

#[inline(always)]
fn max_sum_exp_body(row: &[f32]) -> (f32, f32) {
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for c in chunks.clone() {
        for i in 0..LANES {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    let max = lanes.iter().chain(rest).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sums = [0.0f32; LANES];
    for c in chunks {
        for i in 0..LANES {
            sums[i] += exp(c[i] - max);
        }
    }
    let sum = sums.iter().sum::<f32>() + rest.iter().map(|&x| exp(x - max)).sum::<f32>();
    (max, sum)
}

/// `out[j] = (exp((row[j] − max) − log_sum) − [j = label]) · weight`.
#[inline(always)]
fn softmax_grad_body(row: &[f32], max: f32, log_sum: f32, label: usize, weight: f32, out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(row) {
        *o = exp((x - max) - log_sum) * weight;
    }
    if let (Some(o), Some(&x)) = (out.get_mut(label), row.get(label)) {
        *o = (exp((x - max) - log_sum) + -1.0) * weight;
    }
}

/// `row ← exp(row − max) / Σ exp(row − max)`.
#[inline(always)]
fn softmax_body(row: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    let max = lanes.iter().chain(chunks.remainder()).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sums = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp(c[i] - max);
            sums[i] += c[i];
        }
    }
    let mut sum = sums.iter().sum::<f32>();
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        sum += *x;
    }
    for x in row.iter_mut() {
        *x /= sum;
    }
}

macro_rules! dispatch {
    ($body:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return unsafe { avx512_variant::$body($($arg),*) };
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return unsafe { avx2_variant::$body($($arg),*) };
            }
        }
        $body($($arg),*)
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx512_variant {
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_body(row: &mut [f32]) {
        super::softmax_body(row)
    }
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn max_sum_exp_body(row: &[f32]) -> (f32, f32) {
        super::max_sum_exp_body(row)
    }
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_grad_body(
        row: &[f32],
        max: f32,
        log_sum: f32,
        label: usize,
        weight: f32,
        out: &mut [f32],
    ) {
        super::softmax_grad_body(row, max, log_sum, label, weight, out)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2_variant {
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_body(row: &mut [f32]) {
        super::softmax_body(row)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn max_sum_exp_body(row: &[f32]) -> (f32, f32) {
        super::max_sum_exp_body(row)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_grad_body(
        row: &[f32],
        max: f32,
        log_sum: f32,
        label: usize,
        weight: f32,
        out: &mut [f32],
    ) {
        super::softmax_grad_body(row, max, log_sum, label, weight, out)
    }
}

/// The softmax of a row, in place.
pub fn softmax(row: &mut [f32]) {
    dispatch!(softmax_body(row))
}

/// The row's maximum and `Σ exp(x − max)`.
pub fn max_sum_exp(row: &[f32]) -> (f32, f32) {
    dispatch!(max_sum_exp_body(row))
}

/// The gradient of `(log Σ exp(row) − row[label]) · weight` with respect to the row, into `out`.
pub fn softmax_grad(row: &[f32], max: f32, log_sum: f32, label: usize, weight: f32, out: &mut [f32]) {
    dispatch!(softmax_grad_body(row, max, log_sum, label, weight, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// exp within 2 ulp of the correctly rounded value (f64) over the whole f32 range it covers, and its edges.
    #[test]
    fn exp_is_accurate_and_handles_the_edges() {
        let mut worst = 0.0f64;
        let mut x = -103.9f32;
        while x < 88.7 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            if want > f32::MIN_POSITIVE as f64 {
                worst = worst.max(((got - want) / want).abs());
            } else {
                assert!((got - want).abs() <= 2.0 * 1.4e-45, "exp({x}) = {got}, want {want}");
            }
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    /// The dispatched row kernels equal the scalar bodies bit for bit, and the statistics the f64 ones.
    #[test]
    fn row_kernels_match_the_scalar_bodies_and_f64() {
        let row: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 11.0).collect();
        let (max, sum) = max_sum_exp(&row);
        assert_eq!((max, sum), max_sum_exp_body(&row));
        let want: f64 = row.iter().map(|&x| (x as f64 - max as f64).exp()).sum();
        assert!(((sum as f64 - want) / want).abs() < 1e-5, "{sum} vs {want}");
        let (mut fast, mut plain) = (vec![0.0; 1000], vec![0.0; 1000]);
        softmax_grad(&row, max, sum.ln(), 3, 0.5, &mut fast);
        softmax_grad_body(&row, max, sum.ln(), 3, 0.5, &mut plain);
        assert_eq!(fast, plain);
        let mut soft = row.clone();
        softmax(&mut soft);
        let mut plain_soft = row.clone();
        softmax_body(&mut plain_soft);
        assert_eq!(soft, plain_soft);
        assert!(soft.iter().zip(&row).all(|(p, &x)| ((*p as f64) - (x as f64 - max as f64).exp() / want).abs() < 1e-6));
        let total: f32 = fast.iter().sum();
        assert!(total.abs() < 1e-5, "softmax − one-hot sums to 0: {total}");
    }
}
