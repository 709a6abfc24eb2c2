//! Blockwise 4-bit quantization and dequantization, bit-exact with bitsandbytes.
//!
//! The input is taken flat (row-major), cut into blocks of `blocksize` consecutive elements (blocks cross
//! row boundaries; the last one may be short), each block scaled by its absolute maximum into [-1, 1], and
//! every element mapped to the nearest code of the code book. Two codes share a byte, the first element in
//! the high nibble. The arithmetic follows bitsandbytes 0.50's `quantize_4bit` step by step:
//! full blocks multiply by the float32 reciprocal of their absmax, the ragged last block divides by it,
//! a zero absmax is clamped to 1e-38 (the stored absmax keeps the clamp only for the ragged block), and a tie
//! between two codes goes to the lower one (`torch.bucketize` on the sorted midpoints).

use rayon::prelude::*;

use crate::Nf4Error;
use crate::codebook::QuantType;
use crate::element::Element;

/// bitsandbytes clamps a block's absmax to this before taking its reciprocal (`clamp(min=1e-38)`).
const ABSMAX_FLOOR: f32 = 1e-38;

/// Blocks per parallel task: large enough to amortise scheduling, small enough to balance 2-64 cores.
const BLOCKS_PER_TASK: usize = 1024;

/// Checks a 4-bit blocksize: a power of two from 32 to 4096.
pub fn check_blocksize(blocksize: usize) -> Result<(), Nf4Error> {
    if blocksize.is_power_of_two() && (32..=4096).contains(&blocksize) {
        Ok(())
    } else {
        Err(Nf4Error::InvalidBlocksize(blocksize))
    }
}

/// Number of blocks covering `numel` elements.
pub fn num_blocks(numel: usize, blocksize: usize) -> usize {
    numel.div_ceil(blocksize)
}

/// Number of bytes holding `numel` packed 4-bit codes.
pub fn packed_len(numel: usize) -> usize {
    numel.div_ceil(2)
}

/// A tensor quantized to 4 bits: packed codes plus one f32 absmax per block.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized4bit {
    /// Two codes per byte, element `2i` in the high nibble; `ceil(numel / 2)` bytes.
    pub packed: Vec<u8>,
    /// The absmax of each block (`ceil(numel / blocksize)` values).
    pub absmax: Vec<f32>,
    pub numel: usize,
    pub blocksize: usize,
    pub quant_type: QuantType,
}

/// Nearest-code lookup for one code book, built as bitsandbytes builds it: midpoints between the sorted
/// code values, `torch.bucketize` (a value on a midpoint goes to the lower code), then mapped back to codes.
struct CodeSearch {
    midpoints: [f32; 15],
    sorted_to_code: [u8; 16],
}

impl CodeSearch {
    fn new(quant_type: QuantType) -> Self {
        let codebook = quant_type.codebook();
        let mut order: Vec<u8> = (0..16).collect();
        // Stable sort: equal values (the two zeros of FP4, codes 0 and 8) keep their code order, as torch.argsort does here.
        order.sort_by(|&a, &b| codebook[a as usize].partial_cmp(&codebook[b as usize]).expect("finite code book"));
        let mut midpoints = [0.0f32; 15];
        for (i, m) in midpoints.iter_mut().enumerate() {
            *m = (codebook[order[i] as usize] + codebook[order[i + 1] as usize]) / 2.0;
        }
        let mut sorted_to_code = [0u8; 16];
        sorted_to_code.copy_from_slice(&order);
        CodeSearch { midpoints, sorted_to_code }
    }

    /// `torch.bucketize(x, midpoints, right=False)`: the number of midpoints strictly below `x`.
    #[inline(always)]
    fn code(&self, x: f32) -> u8 {
        let bucket = self.midpoints.iter().filter(|&&m| m < x).count();
        self.sorted_to_code[bucket]
    }
}

/// Quantizes `input` (taken flat) blockwise to 4 bits, exactly as bitsandbytes' `quantize_4bit`.
///
/// Errors on an invalid blocksize, an empty input, or a NaN/infinite element (which bitsandbytes would turn
/// into garbage codes silently).
pub fn quantize_4bit<T: Element>(
    input: &[T],
    blocksize: usize,
    quant_type: QuantType,
) -> Result<Quantized4bit, Nf4Error> {
    check_blocksize(blocksize)?;
    if input.is_empty() {
        return Err(Nf4Error::Empty);
    }
    let numel = input.len();
    let blocks = num_blocks(numel, blocksize);
    let search = CodeSearch::new(quant_type);
    let mut absmax = vec![0.0f32; blocks];
    let mut packed = vec![0u8; packed_len(numel)];
    // blocksize is even, so every block starts on a byte boundary and owns `blocksize / 2` bytes.
    let bytes_per_block = blocksize / 2;
    let first_bad = absmax
        .par_chunks_mut(BLOCKS_PER_TASK)
        .zip(packed.par_chunks_mut(BLOCKS_PER_TASK * bytes_per_block))
        .enumerate()
        .map(|(task, (absmax_chunk, packed_chunk))| {
            let first_block = task * BLOCKS_PER_TASK;
            let mut first_bad = None;
            for (b, (amax_slot, bytes)) in
                absmax_chunk.iter_mut().zip(packed_chunk.chunks_mut(bytes_per_block)).enumerate()
            {
                let block = first_block + b;
                let start = block * blocksize;
                let end = (start + blocksize).min(numel);
                if let Some(bad) =
                    quantize_block(&input[start..end], end - start < blocksize, &search, amax_slot, bytes)
                {
                    first_bad.get_or_insert(start + bad);
                }
            }
            first_bad
        })
        .flatten()
        .min();
    if let Some(index) = first_bad {
        return Err(Nf4Error::NonFinite { index, value: input[index].to_f32() });
    }
    Ok(Quantized4bit { packed, absmax, numel, blocksize, quant_type })
}

/// Quantizes one block into `bytes`; returns the offset of a non-finite element if there is one.
#[inline]
fn quantize_block<T: Element>(
    block: &[T],
    ragged: bool,
    search: &CodeSearch,
    absmax_out: &mut f32,
    bytes: &mut [u8],
) -> Option<usize> {
    let mut amax = 0.0f32;
    for (i, v) in block.iter().enumerate() {
        let x = v.to_f32();
        if !x.is_finite() {
            return Some(i);
        }
        amax = amax.max(x.abs());
    }
    let clamped = amax.max(ABSMAX_FLOOR);
    // Full blocks: x * (1 / absmax); the ragged last block: x / absmax, whose stored absmax keeps the clamp.
    let reciprocal = 1.0f32 / clamped;
    let scale = |x: f32| -> f32 { (if ragged { x / clamped } else { x * reciprocal }).clamp(-1.0, 1.0) };
    *absmax_out = if ragged { clamped } else { amax };
    let mut pairs = block.chunks(2);
    for byte in bytes.iter_mut() {
        let pair = pairs.next().expect("a byte per pair");
        let hi = search.code(scale(pair[0].to_f32()));
        // An odd element count is padded with 0.0, which bitsandbytes quantizes like any value.
        let lo = search.code(pair.get(1).map_or(0.0, |v| scale(v.to_f32())));
        *byte = (hi << 4) | lo;
    }
    None
}

/// Dequantizes packed 4-bit codes with one f32 absmax per block into `out` (`out.len()` is the element
/// count): `value = code[q] * absmax` in f32, then rounded to `T`.
pub fn dequantize_4bit_into<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    quant_type: QuantType,
    out: &mut [T],
) -> Result<(), Nf4Error> {
    dequantize_4bit_with_codebook_into(packed, absmax, blocksize, quant_type.codebook(), out)
}

/// [`dequantize_4bit_into`] with an explicit 16-entry code book.
pub fn dequantize_4bit_with_codebook_into<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    codebook: &[f32; 16],
    out: &mut [T],
) -> Result<(), Nf4Error> {
    check_blocksize(blocksize)?;
    let numel = out.len();
    if packed.len() != packed_len(numel) {
        return Err(Nf4Error::LengthMismatch {
            what: "packed 4-bit codes (bytes)",
            expected: packed_len(numel),
            found: packed.len(),
        });
    }
    if absmax.len() != num_blocks(numel, blocksize) {
        return Err(Nf4Error::LengthMismatch {
            what: "absmax (one per block)",
            expected: num_blocks(numel, blocksize),
            found: absmax.len(),
        });
    }
    let task_elems = BLOCKS_PER_TASK * blocksize;
    out.par_chunks_mut(task_elems).enumerate().for_each(|(task, out_chunk)| {
        let first_block = task * BLOCKS_PER_TASK;
        for (b, out_block) in out_chunk.chunks_mut(blocksize).enumerate() {
            let block = first_block + b;
            let scale = absmax[block];
            let bytes = &packed[block * blocksize / 2..];
            // Rounding the 16 products once per block gives the same values as rounding every element.
            let lut: [T; 16] = std::array::from_fn(|c| T::from_f32(codebook[c] * scale));
            let half = out_block.len() / 2;
            let mut pairs = out_block.chunks_exact_mut(2);
            for (pair, &byte) in (&mut pairs).zip(bytes) {
                pair[0] = lut[(byte >> 4) as usize];
                pair[1] = lut[(byte & 0x0f) as usize];
            }
            let rest = pairs.into_remainder();
            if let Some(last) = rest.first_mut() {
                *last = lut[(bytes[half] >> 4) as usize];
            }
        }
    });
    Ok(())
}

/// Dequantizes to a new vector of `numel` elements; see [`dequantize_4bit_into`].
pub fn dequantize_4bit<T: Element>(
    packed: &[u8],
    absmax: &[f32],
    numel: usize,
    blocksize: usize,
    quant_type: QuantType,
) -> Result<Vec<T>, Nf4Error> {
    let mut out = vec![T::from_f32(0.0); numel];
    dequantize_4bit_into(packed, absmax, blocksize, quant_type, &mut out)?;
    Ok(out)
}

impl Quantized4bit {
    /// Dequantizes back to `T`.
    pub fn dequantize<T: Element>(&self) -> Vec<T> {
        dequantize_4bit(&self.packed, &self.absmax, self.numel, self.blocksize, self.quant_type)
            .expect("a Quantized4bit is consistent by construction")
    }

    /// The 4-bit code of element `i` (unpacked).
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) { byte >> 4 } else { byte & 0x0f }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_blocksizes() {
        for bs in [0, 1, 16, 48, 100, 8192] {
            assert_eq!(quantize_4bit(&[1.0f32; 64], bs, QuantType::Nf4).unwrap_err(), Nf4Error::InvalidBlocksize(bs));
        }
    }

    #[test]
    fn rejects_non_finite_with_index() {
        let mut x = vec![0.5f32; 200];
        x[130] = f32::NAN;
        assert_eq!(
            quantize_4bit(&x, 64, QuantType::Nf4).unwrap_err().to_string(),
            Nf4Error::NonFinite { index: 130, value: f32::NAN }.to_string()
        );
    }

    #[test]
    fn packs_first_element_high() {
        let q = quantize_4bit(&[-1.0f32, 1.0, 0.0], 64, QuantType::Nf4).unwrap();
        // -1 -> code 0, 1 -> code 15, 0 -> 7, padding 0 -> 7.
        assert_eq!(q.packed, vec![0x0f, 0x77]);
        assert_eq!(q.absmax, vec![1.0]);
    }

    #[test]
    fn ties_go_to_the_lower_code() {
        let c = QuantType::Nf4.codebook();
        let mid = (c[9] + c[10]) / 2.0;
        let q = quantize_4bit(&[1.0f32, mid], 64, QuantType::Nf4).unwrap();
        assert_eq!(q.code(1), 9);
    }

    #[test]
    fn zero_blocks() {
        let mut x = vec![0.0f32; 64 + 10];
        x[70] = 0.0;
        let q = quantize_4bit(&x, 64, QuantType::Nf4).unwrap();
        assert_eq!(q.absmax[0], 0.0);
        assert_eq!(q.absmax[1], 1e-38);
        assert!(q.dequantize::<f32>().iter().all(|v| *v == 0.0));
    }

    #[test]
    fn length_checks_on_dequantize() {
        let err = dequantize_4bit::<f32>(&[0u8; 3], &[1.0], 64, 64, QuantType::Nf4).unwrap_err();
        assert!(matches!(err, Nf4Error::LengthMismatch { .. }));
        let err = dequantize_4bit::<f32>(&[0u8; 32], &[1.0, 2.0], 64, 64, QuantType::Nf4).unwrap_err();
        assert!(matches!(err, Nf4Error::LengthMismatch { .. }));
    }
}
