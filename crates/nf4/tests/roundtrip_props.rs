//! Property tests: dequantize(quantize(x)) is within half a code step of x (times the block absmax), for
//! random shapes, blocksizes, magnitudes and all three 4-bit types.

use nf4::{Absmax, QuantType};
use proptest::prelude::*;

/// Half the gap between the two sorted code values around `s` (s in [-1, 1]).
fn half_step(codebook: &[f32; 16], s: f32) -> f32 {
    let mut sorted: Vec<f32> = codebook.to_vec();
    sorted.sort_by(f32::total_cmp);
    sorted.dedup();
    let hi = sorted.iter().position(|&c| c >= s).unwrap_or(sorted.len() - 1);
    let lo = hi.saturating_sub(1);
    (sorted[hi] - sorted[lo]) / 2.0
}

fn quant_type() -> impl Strategy<Value = QuantType> {
    prop_oneof![Just(QuantType::Nf4), Just(QuantType::Fp4), Just(QuantType::Int4)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn error_within_half_a_code_step(
        values in prop::collection::vec(-1.0f32..1.0, 1..3000),
        log_scale in -20i32..20,
        blocksize_log2 in 5u32..=12,
        qt in quant_type(),
    ) {
        let scale = 10f32.powi(log_scale);
        let x: Vec<f32> = values.iter().map(|v| v * scale).collect();
        let blocksize = 1usize << blocksize_log2;
        let q = nf4::quantize(&x, blocksize, qt, false).unwrap();
        let back: Vec<f32> = q.dequantize().unwrap();
        let Absmax::Plain(absmax) = &q.absmax else { unreachable!() };
        prop_assert_eq!(back.len(), x.len(), "dequantized length");
        for (i, (a, b)) in x.iter().zip(&back).enumerate() {
            let m = absmax[i / blocksize];
            if m == 0.0 { prop_assert_eq!(*b, 0.0); continue; }
            let s = (a / m).clamp(-1.0, 1.0);
            let bound = half_step(qt.codebook(), s) * m * (1.0 + 1e-5) + f32::MIN_POSITIVE;
            prop_assert!((a - b).abs() <= bound, "element {} of {}: x={} back={} absmax={} bound={}", i, x.len(), a, b, m, bound);
        }
    }

    #[test]
    fn double_quant_error_adds_only_the_absmax_error(
        values in prop::collection::vec(-1.0f32..1.0, 64..20000),
        blocksize_log2 in 5u32..=8,
    ) {
        let blocksize = 1usize << blocksize_log2;
        let plain = nf4::quantize(&values, blocksize, QuantType::Nf4, false).unwrap();
        let dq = nf4::quantize(&values, blocksize, QuantType::Nf4, true).unwrap();
        prop_assert_eq!(&plain.packed, &dq.packed, "double quant must not change the 4-bit codes");
        let (Absmax::Plain(exact), Absmax::Double(d)) = (&plain.absmax, &dq.absmax) else { unreachable!() };
        let decoded = d.dequantize().unwrap();
        let back: Vec<f32> = dq.dequantize().unwrap();
        prop_assert_eq!(back.len(), values.len(), "dequantized length");
        for (i, (a, b)) in values.iter().zip(&back).enumerate() {
            let block = i / blocksize;
            let s = (a / exact[block]).clamp(-1.0, 1.0);
            let bound = half_step(QuantType::Nf4.codebook(), s) * exact[block] + (decoded[block] - exact[block]).abs() + 1e-6;
            prop_assert!((a - b).abs() <= bound, "element {}: x={} back={}", i, a, b);
        }
    }
}
