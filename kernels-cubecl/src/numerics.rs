//! Bit-exact float conversions inside kernels, written with integer operations so they behave the same on
//! every backend (WGSL has no bf16 type, and f16 only on some adapters): f32 → bf16 / f16 with
//! round-to-nearest-even, exactly as the `half` crate (and torch) convert, and bf16 / f16 → f32.

use cubecl::prelude::*;

/// f32 → bf16 bits (in the low 16 bits), round to nearest even; NaN stays a quiet NaN with its sign.
#[cube]
pub fn f32_to_bf16_bits(value: f32) -> u32 {
    let x = u32::reinterpret(value);
    let mut out = x >> 16u32;
    if (x & 0x7FFF_FFFFu32) > 0x7F80_0000u32 {
        out = (x >> 16u32) | 0x0040u32;
    } else if (x & 0x8000u32) != 0u32 && (x & 0x17FFFu32) != 0u32 {
        out = (x >> 16u32) + 1u32;
    }
    out
}

/// f32 → f16 bits (in the low 16 bits), round to nearest even, overflow to infinity, subnormals kept.
#[cube]
pub fn f32_to_f16_bits(value: f32) -> u32 {
    let x = u32::reinterpret(value);
    let sign = (x & 0x8000_0000u32) >> 16u32;
    let exp = x & 0x7F80_0000u32;
    let man = x & 0x007F_FFFFu32;
    let mut out = 0u32;
    if exp == 0x7F80_0000u32 {
        let mut nan_bit = 0u32;
        if man != 0u32 {
            nan_bit = 0x0200u32;
        }
        out = sign | 0x7C00u32 | nan_bit | (man >> 13u32);
    } else {
        // Unbiased exponent + 15, computed without signed types: e = exp_field - 112.
        let exp_field = exp >> 23u32;
        if exp_field >= 143u32 {
            out = sign | 0x7C00u32; // half exponent >= 31: infinity
        } else if exp_field <= 112u32 {
            // half exponent <= 0: subnormal or zero; shift = 14 - half_exp = 126 - exp_field
            let shift = 126u32 - exp_field;
            if shift > 24u32 {
                out = sign;
            } else {
                let full = man | 0x0080_0000u32;
                let mut half_man = full >> shift;
                let round_bit = 1u32 << (shift - 1u32);
                if (full & round_bit) != 0u32 && (full & (3u32 * round_bit - 1u32)) != 0u32 {
                    half_man += 1u32;
                }
                out = sign | half_man;
            }
        } else {
            let half_exp = (exp_field - 112u32) << 10u32;
            let half_man = man >> 13u32;
            out = sign | half_exp | half_man;
            if (man & 0x1000u32) != 0u32 && (man & 0x2FFFu32) != 0u32 {
                out += 1u32;
            }
        }
    }
    out
}

/// bf16 bits (low 16 bits of `bits`) → f32, exact.
#[cube]
pub fn bf16_bits_to_f32(bits: u32) -> f32 {
    f32::reinterpret(bits << 16u32)
}

/// f16 bits (low 16 bits of `bits`) → f32, exact.
#[cube]
pub fn f16_bits_to_f32(bits: u32) -> f32 {
    let sign = (bits & 0x8000u32) << 16u32;
    let exp = bits & 0x7C00u32;
    let man = bits & 0x03FFu32;
    let mut out = 0.0f32;
    if exp == 0x7C00u32 {
        let mut nan = 0u32;
        if man != 0u32 {
            nan = 0x0040_0000u32 | (man << 13u32);
        }
        out = f32::reinterpret(sign | 0x7F80_0000u32 | nan);
    } else if exp == 0u32 {
        // Subnormal (or zero): man · 2⁻²⁴, exact in f32.
        let magnitude = f32::cast_from(man) * 5.960_464_5e-8f32;
        out = f32::reinterpret(sign | u32::reinterpret(magnitude));
    } else {
        out = f32::reinterpret(sign | (((exp >> 10u32) + 112u32) << 23u32) | (man << 13u32));
    }
    out
}

/// `a · b` rounded to f32 and kept from being fused into a following addition: NVRTC contracts `a·b + c`
/// into one FMA by default (`--fmad=true`), but the CPU reference (and bitsandbytes) round the product first.
/// A select on the product's own ordered-ness is opaque to the contraction and free at run time.
#[cube]
#[allow(clippy::eq_op)] // `product == product` is the NaN test the contraction cannot see through
pub fn mul_rounded(a: f32, b: f32) -> f32 {
    let product = a * b;
    select(product == product, product, 0.0f32)
}

/// The f32 absmax of 4-bit block `block`: stored directly (plain, the word is its bits) or double-quantized
/// (`code[q] · nested_absmax[block / 256] + offset`, two roundings like the CPU reference).
#[cube]
pub fn block_absmax(
    block: usize,
    absmax: &[u32],
    nested_absmax: &[f32],
    nested_code: &[f32],
    offset: f32,
    #[comptime] double_quant: bool,
) -> f32 {
    let mut scale = 0.0f32;
    if comptime![double_quant] {
        let word = absmax[block / 4];
        let code = (word >> (8u32 * u32::cast_from(block % 4))) & 0xFFu32;
        scale = mul_rounded(nested_code[code as usize], nested_absmax[block / 256]) + offset;
    } else {
        scale = f32::reinterpret(absmax[block]);
    }
    scale
}

/// Code `j` (0..8) of a packed u32 word: byte `j / 2`, its high nibble for even `j` (bitsandbytes' order).
#[cube]
pub fn nibble(word: u32, j: usize) -> u32 {
    let byte = (word >> (8u32 * u32::cast_from(j / 2))) & 0xFFu32;
    let mut code = byte & 0x0Fu32;
    if j.is_multiple_of(2) {
        code = byte >> 4u32;
    }
    code
}

/// The 4-bit code of flat element `index` from u32 words of packed bytes.
#[cube]
pub fn code_at(packed: &[u32], index: usize) -> u32 {
    nibble(packed[index / 8], index % 8)
}

#[cube(launch_unchecked)]
fn fma_probe_kernel(input: &[f32], out: &mut [f32]) {
    if ABSOLUTE_POS == 0 {
        out[0] = fma(input[0], input[1], input[2]);
    }
}

/// Whether the device computes `fma` with one rounding (CUDA does; WGSL allows a multiply then an add, and
/// Mesa's lavapipe does that). Rules that copy the host's fused multiply-adds are bit-exact only where it does.
pub fn fma_is_fused(client: &Client) -> Result<bool, crate::KernelError> {
    // (1 + 2⁻¹²)² − (1 + 2⁻¹¹) = 2⁻²⁴ exactly, 0 when the product is rounded first.
    let a = 1.0f32 + 2f32.powi(-12);
    let input = crate::weight::upload_f32(client, &[a, a, -(1.0 + 2f32.powi(-11))]);
    let out = client.empty(4);
    unsafe {
        fma_probe_kernel::launch_unchecked(
            client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(1),
            BufferArg::from_raw_parts(input, 3),
            BufferArg::from_raw_parts(out.clone(), 1),
        );
    }
    Ok(crate::weight::read_f32(client, out, 1, "probing fma")?[0] == 2f32.powi(-24))
}
