//! Blockwise 8-bit quantization with a 256-entry code book (bitsandbytes' `quantize_blockwise` on the CPU).
//!
//! Used for double quantization of the 4-bit absmax values and for 8-bit optimizer state. bitsandbytes 0.50
//! quantizes on the CPU through a 65,536-entry lookup table: each value is scaled by the float32 reciprocal
//! of its block's absmax, clamped to [-1, 1], mapped to a table index by `(v + 1) * 0.5 * 65535 + 0.5`
//! (one fused multiply-add, truncated), and the table holds the code whose midpoint interval contains the
//! table's grid point. That is nearest-code up to the grid, and it is what we reproduce, byte for byte.

use rayon::prelude::*;

use crate::Nf4Error;

/// Grid points of the lookup table.
const LUT_SIZE: usize = 65_536;

/// A 256-entry code book with its quantization lookup table.
pub struct Codebook8 {
    values: [f32; 256],
    lut: Box<[u8]>,
}

impl Codebook8 {
    /// Builds the lookup table for a sorted 256-entry code book.
    pub fn new(values: [f32; 256]) -> Self {
        let mut midpoints = [0.0f32; 255];
        for (i, m) in midpoints.iter_mut().enumerate() {
            *m = 0.5 * (values[i] + values[i + 1]);
        }
        let mut lut = vec![0u8; LUT_SIZE].into_boxed_slice();
        let mut code = 0usize;
        for (i, slot) in lut.iter_mut().enumerate() {
            let grid = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
            while code < 255 && midpoints[code] < grid {
                code += 1;
            }
            *slot = code as u8;
        }
        Codebook8 { values, lut }
    }

    /// The code book values, code → value.
    pub fn values(&self) -> &[f32; 256] {
        &self.values
    }

    /// The 65,536-entry grid → code table (what device kernels upload to quantize the same way).
    pub fn lookup_table(&self) -> &[u8] {
        &self.lut
    }

    /// The code of a value already scaled into the block (`x * (1 / absmax)`).
    #[inline(always)]
    pub fn code_of_scaled(&self, scaled: f32) -> u8 {
        let v = scaled.clamp(-1.0, 1.0);
        let t = (v + 1.0) * 0.5;
        let index = t.mul_add((LUT_SIZE - 1) as f32, 0.5) as u32 as u16;
        self.lut[index as usize]
    }
}

/// The result of blockwise 8-bit quantization.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized8bit {
    pub codes: Vec<u8>,
    pub absmax: Vec<f32>,
    pub blocksize: usize,
}

/// Quantizes `values` blockwise to 8-bit codes of `codebook` (bitsandbytes' CPU `quantize_blockwise`).
/// A block of zeros gets absmax 0 and code 0.
pub fn quantize_blockwise_8bit(
    values: &[f32],
    codebook: &Codebook8,
    blocksize: usize,
) -> Result<Quantized8bit, Nf4Error> {
    if blocksize == 0 || !blocksize.is_power_of_two() {
        return Err(Nf4Error::InvalidNestedBlocksize(blocksize));
    }
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(Nf4Error::NonFinite { index, value: values[index] });
    }
    let blocks = values.len().div_ceil(blocksize);
    let mut codes = vec![0u8; values.len()];
    let mut absmax = vec![0.0f32; blocks];
    codes.par_chunks_mut(blocksize).zip(values.par_chunks(blocksize)).zip(absmax.par_iter_mut()).for_each(
        |((out, block), amax_slot)| {
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            *amax_slot = amax;
            if amax == 0.0 {
                out.fill(0);
                return;
            }
            let inverse = 1.0f32 / amax;
            for (o, &v) in out.iter_mut().zip(block) {
                *o = codebook.code_of_scaled(v * inverse);
            }
        },
    );
    Ok(Quantized8bit { codes, absmax, blocksize })
}

/// `value = code[q] * absmax[block]` in f32 (bitsandbytes' CPU `dequantize_blockwise`).
pub fn dequantize_blockwise_8bit(
    codes: &[u8],
    absmax: &[f32],
    codebook: &[f32; 256],
    blocksize: usize,
) -> Result<Vec<f32>, Nf4Error> {
    if blocksize == 0 || !blocksize.is_power_of_two() {
        return Err(Nf4Error::InvalidNestedBlocksize(blocksize));
    }
    let blocks = codes.len().div_ceil(blocksize);
    if absmax.len() != blocks {
        return Err(Nf4Error::LengthMismatch {
            what: "8-bit absmax (one per block)",
            expected: blocks,
            found: absmax.len(),
        });
    }
    Ok(codes.iter().enumerate().map(|(i, &q)| codebook[q as usize] * absmax[i / blocksize]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codebook::signed_dynamic_map;

    #[test]
    fn exact_codes_round_trip() {
        let book = Codebook8::new(signed_dynamic_map());
        // Every code value itself (scaled by absmax 1) should map back to its own code, except where the
        // 65,536-point grid is coarser than the code spacing near zero.
        let mut exact = 0;
        for (i, &v) in book.values().iter().enumerate() {
            if book.code_of_scaled(v) as usize == i || book.values()[book.code_of_scaled(v) as usize] == v {
                exact += 1;
            }
        }
        assert!(exact > 200, "only {exact} of 256 codes map to themselves");
        assert_eq!(book.code_of_scaled(1.0), 255);
        assert_eq!(book.code_of_scaled(-1.0), 0);
    }

    #[test]
    fn zero_block_gets_zero_absmax() {
        let book = Codebook8::new(signed_dynamic_map());
        let q = quantize_blockwise_8bit(&[0.0; 300], &book, 256).unwrap();
        assert_eq!(q.absmax, vec![0.0, 0.0]);
        assert!(q.codes.iter().all(|&c| c == 0));
    }
}
