//! ggml's dequantizers (`ggml-quants.c` `dequantize_row_*`), bit-exact: [`dequantize`].

use half::{bf16, f16};

use super::GgmlType;
use super::tensor_types::QK_K;

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

const KVALUES_IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];
const KVALUES_MXFP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Dequantizes `bytes` (whole blocks of `ty`) to `f32`, exactly as ggml's `dequantize_row_*`.
/// Returns `None` when the type is not supported or `bytes` is not a whole number of blocks.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    if !ty.can_dequantize() {
        return None;
    }
    let (block, block_bytes) = ty.block_layout()?;
    let (block, block_bytes) = (block as usize, block_bytes as usize);
    if !bytes.len().is_multiple_of(block_bytes) {
        return None;
    }
    let n_blocks = bytes.len() / block_bytes;
    let mut out = Vec::with_capacity(n_blocks * block);
    let blocks = bytes.chunks_exact(block_bytes);
    match ty {
        GgmlType::F32 => out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        GgmlType::F16 => out.extend(blocks.map(|b| f16_at(b, 0))),
        GgmlType::BF16 => out.extend(blocks.map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())),
        GgmlType::F64 => out.extend(blocks.map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)),
        GgmlType::I8 => out.extend(blocks.map(|b| b[0] as i8 as f32)),
        GgmlType::I16 => out.extend(blocks.map(|b| i16::from_le_bytes([b[0], b[1]]) as f32)),
        GgmlType::I32 => out.extend(blocks.map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32)),
        GgmlType::I64 => out.extend(blocks.map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)),
        GgmlType::Q4_0 => blocks.for_each(|b| dequant_q4_0(b, &mut out)),
        GgmlType::Q4_1 => blocks.for_each(|b| dequant_q4_1(b, &mut out)),
        GgmlType::Q5_0 => blocks.for_each(|b| dequant_q5_0(b, &mut out)),
        GgmlType::Q5_1 => blocks.for_each(|b| dequant_q5_1(b, &mut out)),
        GgmlType::Q8_0 => blocks.for_each(|b| dequant_q8_0(b, &mut out)),
        GgmlType::Q2K => blocks.for_each(|b| dequant_q2_k(b, &mut out)),
        GgmlType::Q3K => blocks.for_each(|b| dequant_q3_k(b, &mut out)),
        GgmlType::Q4K => blocks.for_each(|b| dequant_q4_k(b, &mut out)),
        GgmlType::Q5K => blocks.for_each(|b| dequant_q5_k(b, &mut out)),
        GgmlType::Q6K => blocks.for_each(|b| dequant_q6_k(b, &mut out)),
        GgmlType::Q8K => blocks.for_each(|b| dequant_q8_k(b, &mut out)),
        GgmlType::IQ4NL => blocks.for_each(|b| dequant_iq4_nl(b, &mut out)),
        GgmlType::IQ4XS => blocks.for_each(|b| dequant_iq4_xs(b, &mut out)),
        GgmlType::MXFP4 => blocks.for_each(|b| dequant_mxfp4(b, &mut out)),
        _ => return None,
    }
    Some(out)
}

/// block_q4_0 { half d; u8 qs[16] }: y[j] = ((qs[j] & 15) - 8) * d, y[j+16] = ((qs[j] >> 4) - 8) * d.
fn dequant_q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    out.extend(qs.iter().map(|&q| ((q & 0x0F) as i32 - 8) as f32 * d));
    out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
}

/// block_q4_1 { half d; half m; u8 qs[16] }: y = q * d + m.
fn dequant_q4_1(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    out.extend(qs.iter().map(|&q| (q & 0x0F) as f32 * d + m));
    out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
}

/// block_q5_0 { half d; u8 qh[4]; u8 qs[16] }.
fn dequant_q5_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    out.extend((0..16).map(|j| {
        let xh = (((qh >> j) << 4) & 0x10) as u8;
        (((qs[j] & 0x0F) | xh) as i32 - 16) as f32 * d
    }));
    out.extend((0..16).map(|j| {
        let xh = ((qh >> (j + 12)) & 0x10) as u8;
        (((qs[j] >> 4) | xh) as i32 - 16) as f32 * d
    }));
}

/// block_q5_1 { half d; half m; u8 qh[4]; u8 qs[16] }.
fn dequant_q5_1(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    out.extend((0..16).map(|j| {
        let xh = (((qh >> j) << 4) & 0x10) as u8;
        ((qs[j] & 0x0F) | xh) as f32 * d + m
    }));
    out.extend((0..16).map(|j| {
        let xh = ((qh >> (j + 12)) & 0x10) as u8;
        ((qs[j] >> 4) | xh) as f32 * d + m
    }));
}

/// block_q8_0 { half d; i8 qs[32] }: y = q * d.
fn dequant_q8_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
}

/// block_q2_K { u8 scales[16]; u8 qs[64]; half d; half dmin }.
fn dequant_q2_k(b: &[u8], out: &mut Vec<f32>) {
    let scales = &b[0..16];
    let d = f16_at(b, 80);
    let min = f16_at(b, 82);
    let mut is = 0;
    for n in 0..2 {
        let q = &b[16 + 32 * n..16 + 32 * n + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0x0F) as f32;
                let ml = min * (sc >> 4) as f32;
                out.extend(q[16 * half..16 * half + 16].iter().map(|&x| dl * ((x >> shift) & 3) as f32 - ml));
            }
        }
    }
}

/// block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; half d }.
fn dequant_q3_k(b: &[u8], out: &mut Vec<f32>) {
    let hm = &b[0..32];
    let d_all = f16_at(b, 108);
    let mut aux = [0u32; 4];
    for (k, a) in aux.iter_mut().take(3).enumerate() {
        *a = u32::from_le_bytes([b[96 + 4 * k], b[97 + 4 * k], b[98 + 4 * k], b[99 + 4 * k]]);
    }
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4);
    aux[3] = ((aux[1] >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4);
    aux[0] = (aux[0] & KMASK2) | ((tmp & KMASK1) << 4);
    aux[1] = (aux[1] & KMASK2) | (((tmp >> 2) & KMASK1) << 4);
    let mut scales = [0i8; 16];
    for (k, a) in aux.iter().enumerate() {
        for (l, byte) in a.to_le_bytes().iter().enumerate() {
            scales[4 * k + l] = *byte as i8;
        }
    }
    let mut is = 0;
    let mut m: u8 = 1;
    for n in 0..2 {
        let q = &b[32 + 32 * n..32 + 32 * n + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let dl = d_all * (scales[is] as i32 - 32) as f32;
                is += 1;
                for l in 16 * half..16 * half + 16 {
                    let v = ((q[l] >> shift) & 3) as i32 - if hm[l] & m != 0 { 0 } else { 4 };
                    out.push(dl * v as f32);
                }
            }
            m = m.wrapping_shl(1);
        }
    }
}

/// `get_scale_min_k4` from ggml-quants.c.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// block_q4_K { half d; half dmin; u8 scales[12]; u8 qs[128] }.
fn dequant_q4_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let mut is = 0;
    for j in 0..4 {
        let q = &b[16 + 32 * j..16 + 32 * j + 32];
        let (sc, m) = scale_min_k4(is, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(is + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        out.extend(q.iter().map(|&x| d1 * (x & 0x0F) as f32 - m1));
        out.extend(q.iter().map(|&x| d2 * (x >> 4) as f32 - m2));
        is += 2;
    }
}

/// block_q5_K { half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128] }.
fn dequant_q5_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let mut is = 0;
    let (mut u1, mut u2) = (1u8, 2u8);
    for j in 0..4 {
        let ql = &b[48 + 32 * j..48 + 32 * j + 32];
        let (sc, m) = scale_min_k4(is, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(is + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        out.extend((0..32).map(|l| d1 * ((ql[l] & 0x0F) + if qh[l] & u1 != 0 { 16 } else { 0 }) as f32 - m1));
        out.extend((0..32).map(|l| d2 * ((ql[l] >> 4) + if qh[l] & u2 != 0 { 16 } else { 0 }) as f32 - m2));
        is += 2;
        u1 = u1.wrapping_shl(2);
        u2 = u2.wrapping_shl(2);
    }
}

/// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; half d }.
fn dequant_q6_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 208);
    let start = out.len();
    out.resize(start + QK_K, 0.0);
    let y = &mut out[start..];
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let y = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc[is] as i8 as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

/// block_q8_K { float d; i8 qs[256]; i16 bsums[16] }.
fn dequant_q8_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    out.extend(b[4..4 + QK_K].iter().map(|&q| d * q as i8 as f32));
}

/// block_iq4_nl { half d; u8 qs[16] }.
fn dequant_iq4_nl(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    out.extend(qs.iter().map(|&q| d * KVALUES_IQ4NL[(q & 0x0F) as usize] as f32));
    out.extend(qs.iter().map(|&q| d * KVALUES_IQ4NL[(q >> 4) as usize] as f32));
}

/// block_iq4_xs { half d; u16 scales_h; u8 scales_l[4]; u8 qs[128] }.
fn dequant_iq4_xs(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let scales_l = &b[4..8];
    for ib in 0..QK_K / 32 {
        let qs = &b[8 + 16 * ib..8 + 16 * ib + 16];
        let ls = ((scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0F) as i32 | ((((scales_h >> (2 * ib)) & 3) as i32) << 4);
        let dl = d * (ls - 32) as f32;
        out.extend(qs.iter().map(|&q| dl * KVALUES_IQ4NL[(q & 0x0F) as usize] as f32));
        out.extend(qs.iter().map(|&q| dl * KVALUES_IQ4NL[(q >> 4) as usize] as f32));
    }
}

/// block_mxfp4 { u8 e (E8M0); u8 qs[16] }.
fn dequant_mxfp4(b: &[u8], out: &mut Vec<f32>) {
    let e = b[0] as u32;
    // ggml_e8m0_to_fp32_half
    let bits = if e < 2 { 0x0020_0000u32 << e } else { (e - 1) << 23 };
    let d = f32::from_bits(bits);
    let qs = &b[1..17];
    out.extend(qs.iter().map(|&q| KVALUES_MXFP4[(q & 0x0F) as usize] as f32 * d));
    out.extend(qs.iter().map(|&q| KVALUES_MXFP4[(q >> 4) as usize] as f32 * d));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::test_support::{Writer, parse};

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    // --- Dequantization against Python `gguf.quants.dequantize` (gguf 0.19.0) -----------------
    // Blocks come from `gguf.quants.quantize` of random normals (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0) or are
    // random bytes with sane f16 scales (K-quants, IQ4, MXFP4); the expected values are what
    // gguf-py's numpy dequantizer returns, as f32 bit patterns (Q8_K, which gguf-py lacks: ggml's
    // `d * qs`). They live in the workspace fixture `tests/fixtures/gguf/dequant_cases.json`, made by
    // `xtask/fixtures/make_gguf_fixtures.py` (`cargo xtask fixtures gguf`).

    /// One case of `tests/fixtures/gguf/dequant_cases.json`.
    #[derive(serde::Deserialize)]
    struct DequantCase {
        /// ggml's type name, upper case (`"Q4_0"`, `"Q2_K"`, ...).
        name: String,
        /// ggml type id.
        #[serde(rename = "type")]
        ty: u32,
        n_elems: u64,
        /// Whole blocks of the type, hex.
        blocks_hex: String,
        /// gguf-py's dequantized values, f32 little-endian bit patterns, hex.
        expected_f32_bits_hex: String,
    }

    fn dequant_cases() -> Vec<DequantCase> {
        let path = crate::gguf::test_support::workspace_fixtures().join("gguf/dequant_cases.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("missing committed fixture {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn check_dequant(ty: u32, n_elems: u64, block_hex: &str, expected_bits_hex: &str) {
        let data = hex(block_hex);
        let expected: Vec<f32> =
            hex(expected_bits_hex).chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(expected.len() as u64, n_elems);
        let f = parse(Writer::new().tensor("q", &[n_elems], ty, data.clone()).build()).unwrap();
        let (got, shape) = f.tensor_f32("q").unwrap();
        assert_eq!(shape, vec![n_elems as usize]);
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(g.to_bits(), e.to_bits(), "type {ty} element {i}: got {g}, expected {e}");
        }
        assert_eq!(dequantize(GgmlType::from_id(ty), &data).unwrap(), got);
    }

    #[test]
    fn dequantize_matches_gguf_py() {
        let cases = dequant_cases();
        let mut seen = Vec::new();
        for case in &cases {
            assert_eq!(GgmlType::from_id(case.ty).name().to_ascii_lowercase(), case.name.to_ascii_lowercase());
            check_dequant(case.ty, case.n_elems, &case.blocks_hex, &case.expected_f32_bits_hex);
            seen.push(case.name.as_str());
        }
        for required in ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"] {
            assert!(seen.contains(&required), "{required}");
        }
    }

    #[test]
    fn dequantize_rejects_partial_blocks() {
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 17]).is_none());
        assert!(dequantize(GgmlType::IQ2XXS, &[0u8; 66]).is_none());
        assert_eq!(dequantize(GgmlType::Q8_0, &[]).unwrap(), Vec::<f32>::new());
    }
}
