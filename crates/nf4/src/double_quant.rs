//! Double quantization (QLoRA §3): the f32 absmax of every 4-bit block is itself quantized.
//!
//! bitsandbytes subtracts the mean of the absmax values (`offset`), quantizes the centred values blockwise
//! (256 per block) to 8 bits with its signed dynamic map, and keeps one f32 absmax per 256 blocks
//! (`nested_absmax`). Dequantized: `absmax[b] = dyn[code[b]] * nested_absmax[b / 256] + offset`, two float32
//! roundings in that order. At blocksize 64 this costs 8/64 + 32/(64·256) = 0.127 bits per parameter instead
//! of 32/64 = 0.5.

use std::sync::OnceLock;

use crate::Nf4Error;
use crate::blockwise8::{Codebook8, dequantize_blockwise_8bit, quantize_blockwise_8bit};
use crate::codebook::signed_dynamic_map;
use crate::torch_sum::{TORCH_AVX2_LANES, torch_mean_f32};

/// bitsandbytes' nested blocksize for double quantization.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The signed dynamic map with its lookup table, built once.
pub fn signed_dynamic_codebook() -> &'static Codebook8 {
    static BOOK: OnceLock<Codebook8> = OnceLock::new();
    BOOK.get_or_init(|| Codebook8::new(signed_dynamic_map()))
}

/// Double-quantized absmax statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuantized {
    /// One 8-bit code per 4-bit block (`X.weight.absmax` on disk, U8).
    pub codes: Vec<u8>,
    /// One f32 absmax per `nested_blocksize` codes (`X.weight.nested_absmax`).
    pub nested_absmax: Vec<f32>,
    /// The mean that was subtracted (`nested_offset` in the quant_state JSON).
    pub offset: f32,
    /// 256 in bitsandbytes.
    pub nested_blocksize: usize,
    /// The 256-entry code map (`X.weight.nested_quant_map`): the signed dynamic map unless read from a file.
    pub code: Box<[f32; 256]>,
}

/// Double-quantizes absmax values exactly as bitsandbytes' `quantize_4bit(compress_statistics=True)`.
pub fn double_quantize(absmax: &[f32]) -> Result<DoubleQuantized, Nf4Error> {
    if absmax.is_empty() {
        return Err(Nf4Error::Empty);
    }
    let offset = torch_mean_f32(absmax, TORCH_AVX2_LANES);
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let book = signed_dynamic_codebook();
    let q = quantize_blockwise_8bit(&centred, book, NESTED_BLOCKSIZE)?;
    Ok(DoubleQuantized {
        codes: q.codes,
        nested_absmax: q.absmax,
        offset,
        nested_blocksize: NESTED_BLOCKSIZE,
        code: Box::new(*book.values()),
    })
}

impl DoubleQuantized {
    /// The f32 absmax values back: `code[q] * nested_absmax[b / nested_blocksize] + offset`.
    pub fn dequantize(&self) -> Result<Vec<f32>, Nf4Error> {
        let mut values =
            dequantize_blockwise_8bit(&self.codes, &self.nested_absmax, &self.code, self.nested_blocksize)?;
        for v in values.iter_mut() {
            *v += self.offset;
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_close() {
        let absmax: Vec<f32> = (0..1000).map(|i| 0.01 + (i as f32 * 0.37).sin().abs() * 0.2).collect();
        let dq = double_quantize(&absmax).unwrap();
        assert_eq!(dq.codes.len(), 1000);
        assert_eq!(dq.nested_absmax.len(), 4);
        let back = dq.dequantize().unwrap();
        for (a, b) in absmax.iter().zip(&back) {
            assert!((a - b).abs() < 0.2 * 0.02, "{a} vs {b}");
        }
    }
}
