//! The 4-bit code books (NF4, FP4, Int4) and bitsandbytes' signed dynamic 8-bit map.
//!
//! Every table here is *built* by the construction its authors describe, with the same float32 rounding
//! steps that bitsandbytes takes through torch, so the values equal bitsandbytes' bit for bit. The tests
//! check that against the literal tables bitsandbytes ships.

use crate::normal::normal_ppf;

/// The 4-bit data types we quantize to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize), serde(rename_all = "lowercase"))]
pub enum QuantType {
    /// 4-bit NormalFloat: 16 quantiles of N(0, 1) scaled to [-1, 1] with an exact zero (QLoRA paper).
    Nf4,
    /// bitsandbytes' 4-bit float (E2M1 with its own bias), values divided by 12.
    Fp4,
    /// Symmetric linear 4-bit integers: two's complement nibble `k` means `k / 7`; code 8 (-8/7) is never produced.
    Int4,
}

impl QuantType {
    /// The 16 values of the code book, indexed by the 4-bit code.
    pub fn codebook(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4_CODEBOOK,
            QuantType::Fp4 => &FP4_CODEBOOK,
            QuantType::Int4 => &INT4_CODEBOOK,
        }
    }

    /// The name bitsandbytes uses (`nf4`, `fp4`); `int4` is ours.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
            QuantType::Int4 => "int4",
        }
    }

    /// Parses `nf4`, `fp4` or `int4` (case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            "int4" => Some(QuantType::Int4),
            _ => None,
        }
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QuantType {
    type Err = crate::Nf4Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QuantType::from_name(s).ok_or_else(|| crate::Nf4Error::UnknownQuantType(s.to_string()))
    }
}

/// NF4 as bitsandbytes ships it (`bitsandbytes.functional.get_4bit_type("nf4")`), code → value.
pub const NF4_CODEBOOK: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694,
    0.722_956_836_223_602_3,
    1.0,
];

/// bitsandbytes' FP4, code → value: `[0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3] / 12`
/// (code 8, the "negative zero", is +0.0 in bitsandbytes' table).
pub const FP4_CODEBOOK: [f32; 16] = fp4_codebook();

/// Symmetric Int4, code → value: the nibble as a two's complement integer `k`, value `k / 7`.
pub const INT4_CODEBOOK: [f32; 16] = int4_codebook();

const fn fp4_codebook() -> [f32; 16] {
    // bitsandbytes writes code 8 as `-0` in a Python list of numbers: the integer zero, so the value is +0.0.
    let raw: [f32; 16] =
        [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0];
    let mut out = [0.0f32; 16];
    let mut i = 0;
    while i < 16 {
        // bitsandbytes: `data.div_(data.abs().max())`, a float32 division by 12.
        out[i] = raw[i] / 12.0;
        i += 1;
    }
    out
}

const fn int4_codebook() -> [f32; 16] {
    let mut out = [0.0f32; 16];
    let mut i = 0;
    while i < 16 {
        let k = if i < 8 { i as i32 } else { i as i32 - 16 };
        out[i] = k as f32 / 7.0;
        i += 1;
    }
    out
}

/// The offset bitsandbytes' `create_normal_map` uses: the outermost quantile probability, chosen so that the
/// quantiles of both halves meet at an exact zero (QLoRA, appendix E).
pub const NF4_OFFSET: f64 = 0.9677083;

/// Builds NF4 from the normal-quantile construction of the paper exactly as bitsandbytes'
/// `create_normal_map(offset=0.9677083, use_extra_value=True)` does: 9 evenly spaced probabilities from
/// `offset` to 0.5 for the positive half (8 kept) and 8 for the negative half (7 kept), their N(0,1)
/// quantiles, an exact zero, and everything divided by the largest value.
pub fn build_nf4_codebook(offset: f64) -> [f32; 16] {
    let positive: Vec<f32> =
        torch_linspace_f32(offset as f32, 0.5, 9)[..8].iter().map(|&p| normal_ppf(p as f64) as f32).collect();
    let negative: Vec<f32> =
        torch_linspace_f32(offset as f32, 0.5, 8)[..7].iter().map(|&p| -normal_ppf(p as f64) as f32).collect();
    let mut values: Vec<f32> = negative.into_iter().chain(std::iter::once(0.0)).chain(positive).collect();
    values.sort_by(f32::total_cmp);
    let max = values[15];
    let mut out = [0.0f32; 16];
    for (slot, value) in out.iter_mut().zip(values) {
        *slot = value / max;
    }
    out
}

/// bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: the 256-entry signed
/// dynamic tree map used to quantize absmax values (double quantization) and 8-bit optimizer state.
pub fn signed_dynamic_map() -> [f32; 256] {
    dynamic_map(true, 7, 8)
}

/// bitsandbytes' `create_dynamic_map(signed=False, max_exponent_bits=7, total_bits=8)`: the unsigned map of
/// the 8-bit optimizers' second moment.
pub fn unsigned_dynamic_map() -> [f32; 256] {
    dynamic_map(false, 7, 8)
}

fn dynamic_map(signed: bool, max_exponent_bits: i32, total_bits: i32) -> [f32; 256] {
    let non_sign_bits = total_bits - 1;
    let additional_items = (1i64 << (non_sign_bits - max_exponent_bits)) - 1;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    let push_means = |data: &mut Vec<f32>, items: usize, exponent: i32| {
        let boundaries = torch_linspace_f32(0.1, 1.0, items);
        // A python float times a float32 tensor: torch multiplies in float32.
        let scale = 10f64.powi(exponent) as f32;
        for pair in boundaries.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            data.push(scale * mean);
        }
        if signed {
            for pair in boundaries.windows(2) {
                let mean = (pair[0] + pair[1]) / 2.0;
                data.push(-scale * mean);
            }
        }
    };
    let mut last_exponent = 0;
    for i in 0..max_exponent_bits {
        let items = if signed {
            (1usize << (i + non_sign_bits - max_exponent_bits)) + 1
        } else {
            (1usize << (i + non_sign_bits - max_exponent_bits + 1)) + 1
        };
        last_exponent = -(max_exponent_bits - 1) + i;
        push_means(&mut data, items, last_exponent);
    }
    if additional_items > 0 {
        push_means(&mut data, additional_items as usize + 1, last_exponent);
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0.0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU, value for value: the first half counts
/// up from `start`, the second half counts down from `end`, each point one fused multiply-add in float32
/// (checked against torch 2.15 for 2 to 129 steps).
pub(crate) fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|idx| {
            if idx < halfway { step.mul_add(idx as f32, start) } else { (-step).mul_add((steps - idx - 1) as f32, end) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_construction_equals_bitsandbytes_table_bit_for_bit() {
        let built = build_nf4_codebook(NF4_OFFSET);
        for (i, (b, t)) in built.iter().zip(NF4_CODEBOOK.iter()).enumerate() {
            assert_eq!(b.to_bits(), t.to_bits(), "code {i}: built {b:e}, bitsandbytes {t:e}");
        }
    }

    #[test]
    fn nf4_has_exact_zero_and_unit_ends() {
        let c = build_nf4_codebook(NF4_OFFSET);
        assert_eq!(c[0], -1.0);
        assert_eq!(c[7], 0.0);
        assert_eq!(c[15], 1.0);
        assert!(c.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn fp4_values() {
        assert_eq!(FP4_CODEBOOK[3], 1.0);
        assert_eq!(FP4_CODEBOOK[11], -1.0);
        assert_eq!(FP4_CODEBOOK[1], 0.0625f32 / 12.0);
        assert!(FP4_CODEBOOK[8].is_sign_positive() && FP4_CODEBOOK[8] == 0.0);
    }

    #[test]
    fn int4_is_symmetric() {
        for k in 1..8 {
            assert_eq!(INT4_CODEBOOK[k], -INT4_CODEBOOK[16 - k]);
        }
        assert_eq!(INT4_CODEBOOK[7], 1.0);
    }

    #[test]
    fn dynamic_maps_are_sorted_and_bounded() {
        let s = signed_dynamic_map();
        assert!(s.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(s[255], 1.0);
        assert!(s[0] > -1.0 && s[0] < -0.99);
        let u = unsigned_dynamic_map();
        assert!(u.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(u[0], 0.0);
        assert_eq!(u[255], 1.0);
    }

    #[test]
    fn linspace_matches_torch_endpoints() {
        let l = torch_linspace_f32(0.1, 1.0, 5);
        assert_eq!(l[0], 0.1);
        assert_eq!(l[4], 1.0);
    }
}
