//! Dequantize NF4/FP4 (plain or double-quantized absmax) to f32, bf16 or f16 in one pass.
//!
//! A cube decodes a tile of 2,048 elements: its first units decode the absmax of every block the tile
//! touches (8-bit code · nested absmax + offset when double-quantized) into shared memory once, beside the
//! 16-entry code book; then each unit writes 8 f32 words (or 4 words of two bf16/f16), word `k·256 + unit`
//! of the tile, so every store instruction of a warp is one contiguous 128-byte line. `code[q] · absmax` is
//! rounded to the output type (f32 → bf16/f16 with round-to-nearest-even). Equal bit for bit to
//! `nf4::Blockwise4bit::dequantize`. A second kernel stores 16 bytes per instruction (each unit one packed
//! word's 8 values, [`DequantStores::Wide`]); it is the default wherever the shape allows it.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::numerics::{block_absmax, code_at, f32_to_bf16_bits, f32_to_f16_bits, nibble};
use nf4::FloatDtype;

use crate::KernelError;
use crate::weight::{DeviceWeight4bit, dtype_code, read_f32, read_u32};

/// Units per cube of the elementwise kernels.
const CUBE_SIZE: u32 = 256;

/// Rounds `value` to the output dtype's bits (f32: its own bits).
#[cube]
pub fn encode(value: f32, #[comptime] dtype: u32) -> u32 {
    let mut bits = 0u32;
    if comptime![dtype == 0] {
        bits = u32::reinterpret(value);
    } else if comptime![dtype == 1] {
        bits = f32_to_bf16_bits(value);
    } else {
        bits = f32_to_f16_bits(value);
    }
    bits
}

/// Elements per cube of the tiled kernel (256 units × 8).
const TILE_ELEMS: usize = 2048;
/// The most absmax blocks a tile touches (blocksize ≥ 32, tiles need not start on a block).
const TILE_BLOCKS: usize = TILE_ELEMS / 32 + 1;

/// The tables of the tile starting at `CUBE_POS · TILE_ELEMS`, in shared memory: the code book, and the
/// decoded absmax of every block the tile touches (block `first + i` at `scales[i]`), each decoded once.
#[cube]
fn load_tile_tables(
    book: &mut Shared<[f32]>,
    scales: &mut Shared<[f32]>,
    absmax: &[u32],
    nested_absmax: &[f32],
    nested_code: &[f32],
    codebook: &[f32],
    numel: usize,
    offset: f32,
    #[comptime] blocksize: usize,
    #[comptime] double_quant: bool,
) {
    let unit = UNIT_POS as usize;
    let first_block = CUBE_POS * TILE_ELEMS / blocksize;
    let blocks = numel.div_ceil(blocksize);
    if unit < 16 {
        book[unit] = codebook[unit];
    }
    if unit < TILE_BLOCKS {
        let block = first_block + unit;
        if block < blocks {
            scales[unit] = block_absmax(block, absmax, nested_absmax, nested_code, offset, double_quant);
        }
    }
    sync_cube();
}

#[cube(launch_unchecked)]
fn dequantize_4bit_tiled_kernel(
    packed: &[u32],
    absmax: &[u32],
    nested_absmax: &[f32],
    nested_code: &[f32],
    codebook: &[f32],
    out: &mut [u32],
    numel: usize,
    offset: f32,
    #[comptime] blocksize: usize,
    #[comptime] double_quant: bool,
    #[comptime] dtype: u32,
) {
    let mut book = Shared::<[f32]>::new_slice(16usize);
    let mut scales = Shared::<[f32]>::new_slice(TILE_BLOCKS);
    let unit = UNIT_POS as usize;
    let tile_start = CUBE_POS * TILE_ELEMS;
    let first_block = tile_start / blocksize;
    load_tile_tables(
        &mut book,
        &mut scales,
        absmax,
        nested_absmax,
        nested_code,
        codebook,
        numel,
        offset,
        blocksize,
        double_quant,
    );
    if comptime![dtype == 0] {
        #[unroll]
        for k in 0..8usize {
            let i = tile_start + k * 256 + unit;
            if i < numel {
                out[i] = u32::reinterpret(book[code_at(packed, i) as usize] * scales[i / blocksize - first_block]);
            }
        }
    } else {
        #[unroll]
        for k in 0..4usize {
            let word_index = tile_start / 2 + k * 256 + unit;
            let first = word_index * 2;
            if first < numel {
                // A pair never crosses a block (blocks hold an even number of elements).
                let scale = scales[first / blocksize - first_block];
                let byte = (packed[first / 8] >> (8u32 * u32::cast_from(word_index % 4))) & 0xFFu32;
                let lo = encode(book[(byte >> 4u32) as usize] * scale, dtype);
                let mut hi = 0u32;
                if first + 1 < numel {
                    hi = encode(book[(byte & 0x0Fu32) as usize] * scale, dtype);
                }
                out[word_index] = lo | (hi << 16u32);
            }
        }
    }
}

/// The same tile with 16-byte stores: unit `u` decodes packed word `u` of the tile (8 codes, one absmax:
/// blocks hold a multiple of 8 elements) and writes its 8 values as one 16-byte vector of four words of two
/// bf16/f16, or two vectors of f32 — so a warp's store instructions cover 512 bytes (1 KiB for f32) of
/// contiguous output instead of 128. For `numel` a multiple of 8 (every weight with an input width that is).
#[cube(launch_unchecked)]
fn dequantize_4bit_wide_kernel(
    packed: &[u32],
    absmax: &[u32],
    nested_absmax: &[f32],
    nested_code: &[f32],
    codebook: &[f32],
    out: &mut [Vector<u32, Const<4>>],
    numel: usize,
    offset: f32,
    #[comptime] blocksize: usize,
    #[comptime] double_quant: bool,
    #[comptime] dtype: u32,
) {
    let mut book = Shared::<[f32]>::new_slice(16usize);
    let mut scales = Shared::<[f32]>::new_slice(TILE_BLOCKS);
    let unit = UNIT_POS as usize;
    let tile_start = CUBE_POS * TILE_ELEMS;
    let first_block = tile_start / blocksize;
    load_tile_tables(
        &mut book,
        &mut scales,
        absmax,
        nested_absmax,
        nested_code,
        codebook,
        numel,
        offset,
        blocksize,
        double_quant,
    );
    let word = tile_start / 8 + unit;
    let first = word * 8;
    if first < numel {
        let codes = packed[word];
        let scale = scales[first / blocksize - first_block];
        if comptime![dtype == 0] {
            #[unroll]
            for half in 0..2usize {
                let mut values = Vector::<u32, Const<4>>::empty();
                #[unroll]
                for lane in 0..4usize {
                    values.insert(lane, u32::reinterpret(book[nibble(codes, half * 4 + lane) as usize] * scale));
                }
                out[word * 2 + half] = values;
            }
        } else {
            let mut values = Vector::<u32, Const<4>>::empty();
            #[unroll]
            for lane in 0..4usize {
                let lo = encode(book[nibble(codes, lane * 2) as usize] * scale, dtype);
                let hi = encode(book[nibble(codes, lane * 2 + 1) as usize] * scale, dtype);
                values.insert(lane, lo | (hi << 16u32));
            }
            out[word] = values;
        }
    }
}

/// Which dequantize kernel [`dequantize_into`] launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DequantStores {
    /// 4-byte stores, any shape ([`dequantize_4bit_tiled_kernel`]).
    Word,
    /// 16-byte stores ([`dequantize_4bit_wide_kernel`]); needs `numel` a multiple of 8 and an output of
    /// whole 16-byte vectors.
    Wide,
}

impl DequantStores {
    /// The wide stores wherever they apply; `QLORA_DEQUANT_STORES=word` forces the 4-byte kernel (for
    /// measuring one against the other on a GPU).
    pub fn for_weight(weight: &DeviceWeight4bit, dtype: FloatDtype, out: &Handle) -> Self {
        let forced_word = std::env::var("QLORA_DEQUANT_STORES").is_ok_and(|v| v == "word");
        let bytes = weight.numel * dtype.size_in_bytes();
        let fits = weight.numel.is_multiple_of(8) && bytes.is_multiple_of(16) && out.size() as usize >= bytes;
        if fits && !forced_word { DequantStores::Wide } else { DequantStores::Word }
    }
}

/// A dequantized tensor on the device: `numel` values of `dtype` (16-bit types packed two per u32 word).
pub struct DeviceDense {
    pub handle: Handle,
    pub numel: usize,
    pub dtype: FloatDtype,
}

/// Dequantizes `weight` into a new device buffer of `dtype`.
pub fn dequantize(client: &Client, weight: &DeviceWeight4bit, dtype: FloatDtype) -> Result<DeviceDense, KernelError> {
    let out = client.empty(weight.numel.div_ceil(2) * 2 * dtype.size_in_bytes().max(2));
    dequantize_into(client, weight, dtype, &out)?;
    Ok(DeviceDense { handle: out, numel: weight.numel, dtype })
}

fn output_bytes(weight: &DeviceWeight4bit, dtype: FloatDtype, out: &Handle) -> Result<usize, KernelError> {
    let needed = weight.numel.div_ceil(2) * 2 * dtype.size_in_bytes();
    if (out.size() as usize) < needed {
        return Err(KernelError::Shape {
            what: "dequantize output buffer",
            expected: format!("≥ {needed} bytes"),
            found: format!("{} bytes", out.size()),
        });
    }
    Ok(needed)
}

/// Dequantizes `weight` into `out` (at least `numel · size` bytes, rounded up to whole u32 words).
pub fn dequantize_into(
    client: &Client,
    weight: &DeviceWeight4bit,
    dtype: FloatDtype,
    out: &Handle,
) -> Result<(), KernelError> {
    dequantize_into_with(client, weight, dtype, out, DequantStores::for_weight(weight, dtype, out))
}

/// [`dequantize_into`] with the given kernel (`Wide` falls back to `Word` where it does not apply).
pub fn dequantize_into_with(
    client: &Client,
    weight: &DeviceWeight4bit,
    dtype: FloatDtype,
    out: &Handle,
    stores: DequantStores,
) -> Result<(), KernelError> {
    let needed = output_bytes(weight, dtype, out)?;
    let cube_dim = CubeDim::new_1d(CUBE_SIZE);
    // One cube per tile; the count spreads over the grid's dimensions (CUBE_POS is the flat index), and
    // cubes past the last tile find nothing to write.
    let tiles = weight.numel.div_ceil(TILE_ELEMS);
    let count = cubecl::calculate_cube_count_elemwise(client, tiles * CUBE_SIZE as usize, cube_dim);
    if stores == DequantStores::Wide && DequantStores::for_weight(weight, dtype, out) == DequantStores::Wide {
        unsafe {
            dequantize_4bit_wide_kernel::launch_unchecked(
                client,
                count,
                cube_dim,
                BufferArg::from_raw_parts(weight.packed.clone(), weight.numel.div_ceil(8)),
                BufferArg::from_raw_parts(weight.absmax.clone(), 1),
                BufferArg::from_raw_parts(weight.nested_absmax.clone(), 1),
                BufferArg::from_raw_parts(weight.nested_code.clone(), 1),
                BufferArg::from_raw_parts(weight.codebook.clone(), 16),
                BufferArg::from_raw_parts(out.clone(), needed / 16),
                weight.numel,
                weight.offset,
                weight.blocksize,
                weight.double_quant,
                dtype_code(dtype),
            );
        }
        return Ok(());
    }
    unsafe {
        dequantize_4bit_tiled_kernel::launch_unchecked(
            client,
            count,
            cube_dim,
            BufferArg::from_raw_parts(weight.packed.clone(), weight.numel.div_ceil(8)),
            BufferArg::from_raw_parts(weight.absmax.clone(), 1),
            BufferArg::from_raw_parts(weight.nested_absmax.clone(), 1),
            BufferArg::from_raw_parts(weight.nested_code.clone(), 1),
            BufferArg::from_raw_parts(weight.codebook.clone(), 16),
            BufferArg::from_raw_parts(out.clone(), needed / 4),
            weight.numel,
            weight.offset,
            weight.blocksize,
            weight.double_quant,
            dtype_code(dtype),
        );
    }
    Ok(())
}

impl DeviceDense {
    /// Reads the values back as f32 (16-bit types widened exactly).
    pub fn to_f32(&self, client: &Client) -> Result<Vec<f32>, KernelError> {
        match self.dtype {
            FloatDtype::F32 => read_f32(client, self.handle.clone(), self.numel, "reading a dequantized tensor"),
            _ => Ok(self.to_bits16(client)?.into_iter().map(|b| widen(b, self.dtype)).collect()),
        }
    }

    /// Reads 16-bit values back as their raw bits.
    pub fn to_bits16(&self, client: &Client) -> Result<Vec<u16>, KernelError> {
        let words = read_u32(client, self.handle.clone(), self.numel.div_ceil(2), "reading a dequantized tensor")?;
        Ok(words.iter().flat_map(|w| [(*w & 0xFFFF) as u16, (*w >> 16) as u16]).take(self.numel).collect())
    }
}

fn widen(bits: u16, dtype: FloatDtype) -> f32 {
    match dtype {
        FloatDtype::Bf16 => half::bf16::from_bits(bits).to_f32(),
        _ => half::f16::from_bits(bits).to_f32(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{Rng, client, poison, random_weights};
    use nf4::{QuantType, quantize};

    fn check(rows: usize, cols: usize, blocksize: usize, quant_type: QuantType, double_quant: bool, rng: &mut Rng) {
        let client = client();
        let values = random_weights(rows * cols, rng);
        let q = quantize(&values, blocksize, quant_type, double_quant).unwrap();
        let weight = DeviceWeight4bit::upload(&client, &q, [rows, cols]).unwrap();
        for dtype in [FloatDtype::F32, FloatDtype::Bf16, FloatDtype::F16] {
            for stores in [DequantStores::Word, DequantStores::Wide] {
                let out = poison(&client, q.numel.div_ceil(2) * 2 * dtype.size_in_bytes());
                dequantize_into_with(&client, &weight, dtype, &out, stores).unwrap();
                let dense = DeviceDense { handle: out, numel: q.numel, dtype };
                let what =
                    format!("{rows}x{cols} bs {blocksize} {quant_type:?} dq {double_quant} {dtype:?} {stores:?}");
                match dtype {
                    FloatDtype::F32 => {
                        let got = dense.to_f32(&client).unwrap();
                        let want: Vec<f32> = q.dequantize().unwrap();
                        let bad = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
                        assert!(
                            bad.is_none(),
                            "{what}: element {bad:?} differs: {:?} vs {:?}",
                            bad.map(|i| got[i]),
                            bad.map(|i| want[i])
                        );
                    }
                    FloatDtype::Bf16 => {
                        let want: Vec<u16> =
                            q.dequantize::<half::bf16>().unwrap().iter().map(|v| v.to_bits()).collect();
                        assert_eq!(dense.to_bits16(&client).unwrap(), want, "{what}");
                    }
                    FloatDtype::F16 => {
                        let want: Vec<u16> = q.dequantize::<half::f16>().unwrap().iter().map(|v| v.to_bits()).collect();
                        assert_eq!(dense.to_bits16(&client).unwrap(), want, "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn dequantize_equals_the_cpu_reference() {
        let mut rng = Rng::from_env("dequantize");
        // Ragged shapes: blocks crossing rows, a short last block, odd element counts, > 256 blocks (nested);
        // those with numel a multiple of 8 also run the 16-byte-store kernel.
        for (rows, cols, bs) in [
            (8, 24, 64),
            (16, 1000, 32),
            (24, 4104, 4096),
            (1, 7, 64),
            (3, 37, 64),
            (17, 515, 64),
            (64, 257, 32),
            (33, 1000, 128),
            (5, 4099, 4096),
            (300, 97, 256),
            (3, 3000, 64),
            (41, 211, 32),
        ] {
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                for dq in [false, true] {
                    check(rows, cols, bs, qt, dq, &mut rng);
                }
            }
        }
    }
}
