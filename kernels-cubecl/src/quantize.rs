//! Quantize on the device: f32 / bf16 / f16 → NF4 or FP4 codes with an absmax per block, and double
//! quantization of those absmax values, byte for byte what bitsandbytes (and `nf4::quantize`) produce.
//!
//! One unit per 4-bit block: its absmax, then each element scaled (full blocks multiply by the f32 reciprocal,
//! the ragged last block divides, as bitsandbytes does), clamped to [-1, 1] and bucketized on the sorted
//! midpoints between codes (a tie goes to the lower code). Double quantization subtracts the mean of the
//! absmax values — the one number computed on the host, in torch's summation order, from the absmax read back
//! (1/64 of the codes' size; the weights never leave the device) — and quantizes the centred values per
//! 256-block through bitsandbytes' 65,536-entry lookup table, one unit per 256-block.

use cubecl::prelude::*;
use cubecl::server::Handle;
use nf4::{FloatDtype, NESTED_BLOCKSIZE, QuantType};

use crate::KernelError;
use crate::numerics::{bf16_bits_to_f32, f16_bits_to_f32};
use crate::weight::{DeviceWeight4bit, bytes_to_words, dtype_code, read_f32, upload_f32, upload_u32};

/// bitsandbytes' floor for a block absmax before its reciprocal.
const ABSMAX_FLOOR: f32 = 1e-38;

/// Element `i` of an input stored as f32 (dtype 0) or as packed 16-bit pairs (1: bf16, 2: f16).
#[cube]
pub fn load_element(input: &[u32], i: usize, #[comptime] dtype: u32) -> f32 {
    let mut value = 0.0f32;
    if comptime![dtype == 0] {
        value = f32::reinterpret(input[i]);
    } else {
        let word = input[i / 2];
        let mut bits = word & 0xFFFFu32;
        if i % 2 == 1 {
            bits = word >> 16u32;
        }
        if comptime![dtype == 1] {
            value = bf16_bits_to_f32(bits);
        } else {
            value = f16_bits_to_f32(bits);
        }
    }
    value
}

/// `torch.bucketize(x, midpoints)` mapped back to a code: the number of midpoints strictly below x.
#[cube]
fn nearest_code(x: f32, midpoints: &[f32], sorted_to_code: &[u32]) -> u32 {
    let mut bucket = 0usize;
    #[unroll]
    for i in 0..15usize {
        if midpoints[i] < x {
            bucket += 1;
        }
    }
    sorted_to_code[bucket]
}

#[cube(launch_unchecked)]
fn quantize_4bit_kernel(
    input: &[u32],
    midpoints_in: &[f32],
    sorted_to_code_in: &[u32],
    packed: &mut [u32],
    absmax: &mut [f32],
    numel: usize,
    #[comptime] blocksize: usize,
    #[comptime] dtype: u32,
) {
    let mut midpoints = Shared::<[f32]>::new_slice(16usize);
    let mut sorted_to_code = Shared::<[u32]>::new_slice(16usize);
    let unit = UNIT_POS as usize;
    if unit < 15 {
        midpoints[unit] = midpoints_in[unit];
    }
    if unit < 16 {
        sorted_to_code[unit] = sorted_to_code_in[unit];
    }
    sync_cube();
    let block = ABSOLUTE_POS;
    let start = block * blocksize;
    if start < numel {
        let end = min(start + blocksize, numel);
        let mut amax = 0.0f32;
        let mut finite = true;
        for i in start..end {
            let x = load_element(input, i, dtype);
            // NaN and ±inf have an all-ones exponent (tested on the bits: shader compilers fold `x - x`).
            if (u32::reinterpret(x) & 0x7F80_0000u32) == 0x7F80_0000u32 {
                finite = false;
            }
            amax = max(amax, Abs::abs(x));
        }
        let ragged = end - start < blocksize;
        let clamped = max(amax, ABSMAX_FLOOR);
        let reciprocal = 1.0f32 / clamped;
        // Bytes of this block, four per word; the block starts on a word (blocksize is a multiple of 8).
        let pairs = (end - start).div_ceil(2);
        let words = pairs.div_ceil(4);
        for w in 0..words {
            let mut word = 0u32;
            #[unroll]
            for b in 0..4usize {
                let pair = w * 4 + b;
                if pair < pairs {
                    let i = start + 2 * pair;
                    let mut hi_x = load_element(input, i, dtype);
                    let mut lo_x = 0.0f32;
                    if i + 1 < end {
                        lo_x = load_element(input, i + 1, dtype);
                    }
                    if ragged {
                        hi_x /= clamped;
                        lo_x /= clamped;
                    } else {
                        hi_x *= reciprocal;
                        lo_x *= reciprocal;
                    }
                    hi_x = (hi_x).clamp(-1.0f32, 1.0f32);
                    lo_x = (lo_x).clamp(-1.0f32, 1.0f32);
                    let byte = (nearest_code(hi_x, &midpoints, &sorted_to_code) << 4u32)
                        | nearest_code(lo_x, &midpoints, &sorted_to_code);
                    word |= byte << (8u32 * u32::cast_from(b));
                }
            }
            packed[start / 8 + w] = word;
        }
        let mut stored = amax;
        if ragged {
            stored = clamped;
        }
        if !finite {
            stored = f32::reinterpret(0x7FC0_0000u32);
        }
        absmax[block] = stored;
    }
}

#[cube(launch_unchecked)]
fn double_quantize_kernel(
    absmax: &[f32],
    lut: &[u32],
    codes: &mut [u32],
    nested_absmax: &mut [f32],
    blocks: usize,
    offset: f32,
) {
    let group = ABSOLUTE_POS;
    let start = group * 256;
    if start < blocks {
        let end = min(start + 256, blocks);
        let mut amax = 0.0f32;
        for i in start..end {
            amax = max(amax, Abs::abs(absmax[i] - offset));
        }
        nested_absmax[group] = amax;
        let inverse = 1.0f32 / amax;
        let words = (end - start).div_ceil(4);
        for w in 0..words {
            let mut word = 0u32;
            #[unroll]
            for b in 0..4usize {
                let i = start + w * 4 + b;
                if i < end && amax != 0.0f32 {
                    let v = ((absmax[i] - offset) * inverse).clamp(-1.0f32, 1.0f32);
                    let t = (v + 1.0f32) * 0.5f32;
                    let index = u32::cast_from(fma(t, 65535.0f32, 0.5f32)) & 0xFFFFu32;
                    let code = (lut[(index / 4u32) as usize] >> (8u32 * (index % 4u32))) & 0xFFu32;
                    word |= code << (8u32 * u32::cast_from(b));
                }
            }
            codes[start / 4 + w] = word;
        }
    }
}

/// The sorted midpoints and sorted-index → code map of a code book, as `nf4` builds them.
fn code_search(quant_type: QuantType) -> ([f32; 16], [u32; 16]) {
    let codebook = quant_type.codebook();
    let mut order: Vec<u32> = (0..16).collect();
    // Stable by value with -0 == 0 (the CPU sorts with partial_cmp, which keeps code order for the two zeros).
    order.sort_by(|&a, &b| codebook[a as usize].partial_cmp(&codebook[b as usize]).expect("finite").then(a.cmp(&b)));
    let mut midpoints = [0.0f32; 16];
    for i in 0..15 {
        midpoints[i] = (codebook[order[i] as usize] + codebook[order[i + 1] as usize]) / 2.0;
    }
    let mut map = [0u32; 16];
    map.copy_from_slice(&order);
    (midpoints, map)
}

/// Quantizes `numel` elements of `input` (`dtype`: f32, or bf16/f16 as packed 16-bit pairs) on the device
/// into a `[rows, cols]` 4-bit weight.
pub fn quantize(
    client: &Client,
    input: &Handle,
    dtype: FloatDtype,
    shape: [usize; 2],
    blocksize: usize,
    quant_type: QuantType,
    double_quant: bool,
) -> Result<DeviceWeight4bit, KernelError> {
    nf4::check_blocksize(blocksize)?;
    let numel = shape[0].checked_mul(shape[1]).filter(|&n| n > 0).ok_or(nf4::Nf4Error::Empty)?;
    if (input.size() as usize) < numel * dtype.size_in_bytes() {
        return Err(KernelError::Shape {
            what: "quantize input buffer",
            expected: format!("≥ {} bytes", numel * dtype.size_in_bytes()),
            found: format!("{} bytes", input.size()),
        });
    }
    let blocks = nf4::num_blocks(numel, blocksize);
    let (midpoints, map) = code_search(quant_type);
    let packed = client.empty(numel.div_ceil(8) * 4);
    let absmax = client.empty(blocks * 4);
    let dim = CubeDim::new_1d(64);
    let count = cubecl::calculate_cube_count_elemwise(client, blocks, dim);
    unsafe {
        quantize_4bit_kernel::launch_unchecked(
            client,
            count,
            dim,
            BufferArg::from_raw_parts(input.clone(), 1),
            BufferArg::from_raw_parts(upload_f32(client, &midpoints), 16),
            BufferArg::from_raw_parts(upload_u32(client, &map), 16),
            BufferArg::from_raw_parts(packed.clone(), numel.div_ceil(8)),
            BufferArg::from_raw_parts(absmax.clone(), blocks),
            numel,
            blocksize,
            dtype_code(dtype),
        );
    }
    let host_absmax = read_f32(client, absmax.clone(), blocks, "reading block absmax values")?;
    if let Some(block) = host_absmax.iter().position(|a| !a.is_finite()) {
        return Err(first_non_finite(client, input, dtype, numel, block, blocksize));
    }
    let codebook = upload_f32(client, quant_type.codebook());
    if !double_quant {
        return Ok(DeviceWeight4bit {
            packed,
            absmax,
            nested_absmax: upload_f32(client, &[0.0]),
            nested_code: upload_f32(client, &[0.0]),
            codebook,
            offset: 0.0,
            double_quant: false,
            numel,
            blocksize,
            shape,
        });
    }
    let offset = nf4::torch_mean_f32(&host_absmax, nf4::TORCH_AVX2_LANES);
    let book = nf4::signed_dynamic_codebook();
    let lut = upload_u32(client, &bytes_to_words(book.lookup_table()));
    let groups = blocks.div_ceil(NESTED_BLOCKSIZE);
    let codes = client.empty(blocks.div_ceil(4) * 4);
    let nested_absmax = client.empty(groups * 4);
    let count = cubecl::calculate_cube_count_elemwise(client, groups, dim);
    unsafe {
        double_quantize_kernel::launch_unchecked(
            client,
            count,
            dim,
            BufferArg::from_raw_parts(absmax, blocks),
            BufferArg::from_raw_parts(lut, 16384),
            BufferArg::from_raw_parts(codes.clone(), blocks.div_ceil(4)),
            BufferArg::from_raw_parts(nested_absmax.clone(), groups),
            blocks,
            offset,
        );
    }
    Ok(DeviceWeight4bit {
        packed,
        absmax: codes,
        nested_absmax,
        nested_code: upload_f32(client, book.values()),
        codebook,
        offset,
        double_quant: true,
        numel,
        blocksize,
        shape,
    })
}

/// The error for a block with a NaN or infinite element: finds the element (reads back that one block).
fn first_non_finite(
    client: &Client,
    input: &Handle,
    dtype: FloatDtype,
    numel: usize,
    block: usize,
    blocksize: usize,
) -> KernelError {
    let start = block * blocksize;
    let end = (start + blocksize).min(numel);
    let values: Result<Vec<f32>, KernelError> = (|| {
        let bytes = client.read_one(input.clone()).map_err(|e| KernelError::from_server("reading the input", e))?;
        Ok((start..end)
            .map(|i| match dtype {
                FloatDtype::F32 => f32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().expect("4 bytes")),
                FloatDtype::Bf16 => half::bf16::from_le_bytes([bytes[i * 2], bytes[i * 2 + 1]]).to_f32(),
                FloatDtype::F16 => half::f16::from_le_bytes([bytes[i * 2], bytes[i * 2 + 1]]).to_f32(),
            })
            .collect())
    })();
    match values {
        Ok(values) => match values.iter().position(|v| !v.is_finite()) {
            Some(i) => KernelError::Nf4(nf4::Nf4Error::NonFinite { index: start + i, value: values[i] }),
            None => KernelError::Device {
                during: "quantize",
                message: format!("block {block} reported a non-finite value that is not in the input"),
            },
        },
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{Rng, client, random_weights};
    use crate::weight::read_u32;
    use nf4::Absmax;

    #[test]
    fn device_quantize_equals_bitsandbytes_bytes() {
        let client = client();
        let mut rng = Rng::from_env("quantize");
        for (rows, cols, bs) in [(1, 7, 64), (3, 37, 64), (17, 515, 64), (64, 257, 32), (300, 97, 256), (130, 300, 64)]
        {
            for dtype in [FloatDtype::F32, FloatDtype::Bf16, FloatDtype::F16] {
                let values = random_weights(rows * cols, &mut rng);
                let (input, rounded) = crate::upload_as(&client, &values, dtype);
                for qt in [QuantType::Nf4, QuantType::Fp4] {
                    for dq in [false, true] {
                        let what = format!("{rows}x{cols} bs {bs} {dtype:?} {qt:?} dq {dq}");
                        let want = nf4::quantize(&rounded, bs, qt, dq).unwrap();
                        let got = quantize(&client, &input, dtype, [rows, cols], bs, qt, dq).unwrap();
                        let packed = read_u32(
                            &client,
                            got.packed.clone(),
                            rows * cols / 8 + usize::from(rows * cols % 8 != 0),
                            "t",
                        )
                        .unwrap();
                        assert_eq!(
                            crate::weight::words_to_bytes(&packed, want.packed.len()),
                            want.packed,
                            "{what}: codes"
                        );
                        let blocks = want.absmax.num_blocks();
                        match &want.absmax {
                            Absmax::Plain(a) => {
                                let got_a = read_f32(&client, got.absmax.clone(), blocks, "t").unwrap();
                                assert_eq!(
                                    got_a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                    a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                                    "{what}: absmax"
                                );
                            }
                            Absmax::Double(d) => {
                                assert_eq!(got.offset.to_bits(), d.offset.to_bits(), "{what}: offset");
                                let codes = read_u32(&client, got.absmax.clone(), blocks.div_ceil(4), "t").unwrap();
                                assert_eq!(
                                    crate::weight::words_to_bytes(&codes, blocks),
                                    d.codes,
                                    "{what}: absmax codes"
                                );
                                let nested =
                                    read_f32(&client, got.nested_absmax.clone(), d.nested_absmax.len(), "t").unwrap();
                                assert_eq!(nested, d.nested_absmax, "{what}: nested absmax");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn non_finite_input_is_a_clear_error() {
        let client = client();
        let mut values = vec![0.25f32; 300];
        values[131] = f32::NAN;
        let input = upload_f32(&client, &values);
        match quantize(&client, &input, FloatDtype::F32, [3, 100], 64, QuantType::Nf4, true) {
            Err(KernelError::Nf4(nf4::Nf4Error::NonFinite { index: 131, .. })) => {}
            other => panic!("expected NonFinite at 131, got {:?}", other.map(|w| w.numel)),
        }
        assert!(quantize(&client, &input, FloatDtype::F32, [3, 100], 48, QuantType::Nf4, true).is_err());
    }
}
