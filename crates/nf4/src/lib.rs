//! # nf4 — the 4-bit data types of QLoRA, bit-exact with bitsandbytes
//!
//! The bottom of the stack (nf4 → quant → lora / optim → llama → data → train); it depends on no ML
//! framework. It builds the code books (NF4 from normal quantiles, bitsandbytes' FP4, a symmetric Int4, and
//! the signed/unsigned dynamic 8-bit maps) by their published constructions, quantizes f32/bf16/f16 slices
//! blockwise to packed 4-bit codes with an absmax per block, double-quantizes those absmax values to 8 bits,
//! and dequantizes back. Every byte and every float equals what bitsandbytes 0.50 produces on the CPU (the
//! workspace's golden-fixture tests prove it). Work is spread over threads with rayon.
//!
//! `quant` builds the stored weight type and the safetensors layout on top of this crate; the CubeCL kernels
//! and the flex backend use [`dequantize_4bit_into`] as their reference.

mod blockwise;
mod blockwise8;
mod codebook;
mod double_quant;
mod element;
mod error;
mod normal;
mod torch_sum;

pub use blockwise::{
    Quantized4bit, check_blocksize, dequantize_4bit, dequantize_4bit_into, dequantize_4bit_with_codebook_into,
    num_blocks, packed_len, quantize_4bit,
};
pub use blockwise8::{Codebook8, Quantized8bit, dequantize_blockwise_8bit, quantize_blockwise_8bit};
pub use codebook::{
    FP4_CODEBOOK, INT4_CODEBOOK, NF4_CODEBOOK, NF4_OFFSET, QuantType, build_nf4_codebook, signed_dynamic_map,
    unsigned_dynamic_map,
};
pub use double_quant::{DoubleQuantized, NESTED_BLOCKSIZE, double_quantize, signed_dynamic_codebook};
pub use element::{Element, FloatDtype};
pub use error::Nf4Error;
pub use normal::normal_ppf;
pub use torch_sum::{TORCH_AVX2_LANES, torch_mean_f32, torch_sum_f32};

/// The default 4-bit blocksize of bitsandbytes and QLoRA.
pub const DEFAULT_BLOCKSIZE: usize = 64;

/// Absmax statistics of a 4-bit tensor: plain f32 per block, or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Double(DoubleQuantized),
}

impl Absmax {
    /// The f32 absmax per block (decoded when double-quantized).
    pub fn to_f32(&self) -> Result<std::borrow::Cow<'_, [f32]>, Nf4Error> {
        match self {
            Absmax::Plain(v) => Ok(std::borrow::Cow::Borrowed(v)),
            Absmax::Double(dq) => Ok(std::borrow::Cow::Owned(dq.dequantize()?)),
        }
    }

    /// Number of 4-bit blocks described.
    pub fn num_blocks(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Double(dq) => dq.codes.len(),
        }
    }

    /// Bytes of statistics stored.
    pub fn stored_bytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len() * 4,
            Absmax::Double(dq) => dq.codes.len() + dq.nested_absmax.len() * 4 + 4 + 256 * 4,
        }
    }
}

/// A tensor quantized to 4 bits, with plain or double-quantized statistics: what bitsandbytes'
/// `quantize_4bit` returns (packed codes + `QuantState`), minus the shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Blockwise4bit {
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    pub numel: usize,
    pub blocksize: usize,
    pub quant_type: QuantType,
}

/// Quantizes `input` to 4 bits, double-quantizing the statistics when `double_quant` is set
/// (bitsandbytes' `quantize_4bit(A, blocksize, compress_statistics=double_quant, quant_type)`).
pub fn quantize<T: Element>(
    input: &[T],
    blocksize: usize,
    quant_type: QuantType,
    double_quant: bool,
) -> Result<Blockwise4bit, Nf4Error> {
    let q = quantize_4bit(input, blocksize, quant_type)?;
    let absmax = if double_quant { Absmax::Double(double_quantize(&q.absmax)?) } else { Absmax::Plain(q.absmax) };
    Ok(Blockwise4bit { packed: q.packed, absmax, numel: q.numel, blocksize, quant_type })
}

impl Blockwise4bit {
    /// Dequantizes into `out` (its length must be `numel`).
    pub fn dequantize_into<T: Element>(&self, out: &mut [T]) -> Result<(), Nf4Error> {
        if out.len() != self.numel {
            return Err(Nf4Error::LengthMismatch { what: "dequantize output", expected: self.numel, found: out.len() });
        }
        let absmax = self.absmax.to_f32()?;
        dequantize_4bit_into(&self.packed, &absmax, self.blocksize, self.quant_type, out)
    }

    /// Dequantizes to a new vector.
    pub fn dequantize<T: Element>(&self) -> Result<Vec<T>, Nf4Error> {
        let mut out = vec![T::from_f32(0.0); self.numel];
        self.dequantize_into(&mut out)?;
        Ok(out)
    }

    /// Storage cost in bits per parameter: packed codes plus statistics (NF4 + double quant at blocksize
    /// 64 is 4 + 8/64 + 32/(64·256) ≈ 4.127, counting the per-tensor constants as the paper does not).
    pub fn bits_per_param(&self) -> f64 {
        bits_per_param(self.blocksize, matches!(self.absmax, Absmax::Double(_)))
    }
}

/// The asymptotic bits per parameter of a 4-bit format, as the QLoRA paper counts them.
pub fn bits_per_param(blocksize: usize, double_quant: bool) -> f64 {
    let bs = blocksize as f64;
    if double_quant { 4.0 + 8.0 / bs + 32.0 / (bs * NESTED_BLOCKSIZE as f64) } else { 4.0 + 32.0 / bs }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_bits_per_param() {
        assert_eq!(format!("{:.3}", bits_per_param(64, true)), "4.127");
        assert_eq!(bits_per_param(64, false), 4.5);
    }

    #[test]
    fn quantize_with_and_without_double_quant() {
        let x: Vec<f32> = (0..5000).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        for dq in [false, true] {
            let q = quantize(&x, 64, QuantType::Nf4, dq).unwrap();
            let back: Vec<f32> = q.dequantize().unwrap();
            let max_err = x.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(max_err < 0.2, "double_quant={dq}: max error {max_err}");
        }
    }
}
