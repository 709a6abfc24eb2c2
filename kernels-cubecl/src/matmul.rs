//! The QLoRA linear's two products with the frozen 4-bit weight, reading W as packed codes:
//! forward `y = x·Wᵀ` and input gradient `dx = dy·W` (W is `[out, in]`, as bitsandbytes stores it).
//!
//! [`fused_matmul`] is a tiled kernel: each cube computes a 64×64 tile of the output, walking the reduction
//! dimension 16 at a time; the x tile and the decoded W tile (code book value × block absmax, double-quant
//! absmax decoded on the fly) go to shared memory and are never written back. Inputs and outputs are f32, bf16
//! or f16; products accumulate in f32. [`gemv`] is the decode-sized variant (M ≤ 16 rows): a streaming pass over
//! W in which 32 units share each output row, each decoding 8 codes per packed word. Both are checked against
//! the CPU reference (`nf4` dequantize, then an f64 matmul).

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::numerics::{block_absmax, code_at, nibble};
use nf4::FloatDtype;

use crate::KernelError;
use crate::weight::DeviceWeight4bit;

const TILE_M: usize = 64;
const TILE_P: usize = 64;
const TILE_R: usize = 16;
/// 16 × 16 units, each computing a 4 × 4 patch of the 64 × 64 tile.
const UNITS: u32 = 256;
/// Rows per GEMV cube (32 units each).
const GEMV_ROWS: u32 = 8;
/// The largest batch the GEMV serves.
pub const GEMV_MAX_ROWS: usize = 16;

/// Which product with W.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    /// `y[M, out] = x[M, in] · Wᵀ`.
    Forward,
    /// `dx[M, in] = dy[M, out] · W`.
    InputGrad,
}

/// `C[M, P] = A[M, R] · B[R, P]` where `B(r, p) = W[p, r]` (forward: W is `[P, R]`) or `W[r, p]` (input
/// gradient: W is `[R, P]`); `W` is read as 4-bit codes from `packed`.
#[cube(launch_unchecked)]
fn fused_matmul_kernel<F: Float>(
    a: &[F],
    packed: &[u32],
    absmax: &[u32],
    nested_absmax: &[f32],
    nested_code: &[f32],
    codebook: &[f32],
    c: &mut [F],
    m_size: usize,
    r_size: usize,
    p_size: usize,
    offset: f32,
    #[comptime] blocksize: usize,
    #[comptime] double_quant: bool,
    #[comptime] w_is_p_by_r: bool,
) {
    let mut book = Shared::<[f32]>::new_slice(16usize);
    let mut a_tile = Shared::<[f32]>::new_slice(TILE_R * TILE_M);
    let mut b_tile = Shared::<[f32]>::new_slice(TILE_R * TILE_P);
    let unit = UNIT_POS as usize;
    if unit < 16 {
        book[unit] = codebook[unit];
    }
    let m0 = CUBE_POS_Y as usize * TILE_M;
    let p0 = CUBE_POS_X as usize * TILE_P;
    let tx = unit % 16;
    let ty = unit / 16;
    let mut acc = Array::<f32>::new(16usize);
    #[unroll]
    for i in 0..16usize {
        acc[i] = 0.0f32;
    }
    let tiles = r_size.div_ceil(TILE_R);
    for t in 0..tiles {
        let r0 = t * TILE_R;
        sync_cube();
        // A tile: 64 rows × 16 reduction indices, consecutive units along r (coalesced).
        #[unroll]
        for l in 0..4usize {
            let idx = unit + 256 * l;
            let m = idx / TILE_R;
            let k = idx % TILE_R;
            let mut v = 0.0f32;
            if m0 + m < m_size && r0 + k < r_size {
                v = f32::cast_from(a[(m0 + m) * r_size + r0 + k]);
            }
            a_tile[k * TILE_M + m] = v;
        }
        // W tile, decoded: consecutive units along W's rows (coalesced packed reads).
        #[unroll]
        for l in 0..4usize {
            let idx = unit + 256 * l;
            let mut k = 0usize;
            let mut p = 0usize;
            if comptime![w_is_p_by_r] {
                p = idx / TILE_R;
                k = idx % TILE_R;
            } else {
                k = idx / TILE_P;
                p = idx % TILE_P;
            }
            let mut v = 0.0f32;
            if p0 + p < p_size && r0 + k < r_size {
                let mut flat = 0usize;
                if comptime![w_is_p_by_r] {
                    flat = (p0 + p) * r_size + r0 + k;
                } else {
                    flat = (r0 + k) * p_size + p0 + p;
                }
                let scale = block_absmax(flat / blocksize, absmax, nested_absmax, nested_code, offset, double_quant);
                v = book[code_at(packed, flat) as usize] * scale;
            }
            b_tile[k * TILE_P + p] = v;
        }
        sync_cube();
        #[unroll]
        for k in 0..TILE_R {
            let mut av = Array::<f32>::new(4usize);
            let mut bv = Array::<f32>::new(4usize);
            #[unroll]
            for i in 0..4usize {
                av[i] = a_tile[k * TILE_M + ty * 4 + i];
                bv[i] = b_tile[k * TILE_P + tx * 4 + i];
            }
            #[unroll]
            for i in 0..4usize {
                #[unroll]
                for j in 0..4usize {
                    acc[i * 4 + j] += av[i] * bv[j];
                }
            }
        }
    }
    #[unroll]
    for i in 0..4usize {
        let row = m0 + ty * 4 + i;
        #[unroll]
        for j in 0..4usize {
            let col = p0 + tx * 4 + j;
            if row < m_size && col < p_size {
                c[row * p_size + col] = F::cast_from(acc[i * 4 + j]);
            }
        }
    }
}

/// Tensor-core variant of [`fused_matmul_kernel`] for 16-bit activations: the decoded W tile is rounded to
/// the activation type in shared memory (as dequantize-then-matmul in that type would), and four planes
/// each multiply a 32×32 quarter of the 64×64 output tile as 2×2 16×16×16 fragments, accumulating in f32.
#[cube(launch_unchecked)]
fn fused_matmul_cmma_kernel<F: Float>(
    a: &[F],
    packed: &[u32],
    absmax: &[u32],
    nested_absmax: &[f32],
    nested_code: &[f32],
    codebook: &[f32],
    c: &mut [F],
    m_size: usize,
    r_size: usize,
    p_size: usize,
    offset: f32,
    #[comptime] blocksize: usize,
    #[comptime] double_quant: bool,
    #[comptime] w_is_p_by_r: bool,
    #[comptime] aligned: bool,
) {
    let mut book = Shared::<[f32]>::new_slice(16usize);
    let mut a_tile = Shared::<[F]>::new_aligned_slice(64usize * 32usize, 32usize);
    let mut b_tile = Shared::<[F]>::new_aligned_slice(32usize * 64usize, 32usize);
    let mut c_tile = Shared::<[f32]>::new_aligned_slice(64usize * 64usize, 32usize);
    let unit = UNIT_POS as usize;
    if unit < 16 {
        book[unit] = codebook[unit];
    }
    let plane = unit / 32;
    let pm = (plane / 2) * 32;
    let pp = (plane % 2) * 32;
    let m0 = CUBE_POS_Y as usize * 64;
    let p0 = CUBE_POS_X as usize * 64;
    let acc00 = cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::Undefined,
        0.0f32,
    );
    let acc01 = cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::Undefined,
        0.0f32,
    );
    let acc10 = cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::Undefined,
        0.0f32,
    );
    let acc11 = cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        16usize,
        16usize,
        16usize,
        cmma::MatrixLayout::Undefined,
        0.0f32,
    );
    let tiles = r_size.div_ceil(32);
    for t in 0..tiles {
        let r0 = t * 32;
        sync_cube();
        #[unroll]
        for l in 0..16usize {
            let idx = unit + 128 * l;
            let m = idx / 32;
            let k = idx % 32;
            let mut v = F::new(0.0);
            if m0 + m < m_size && r0 + k < r_size {
                v = a[(m0 + m) * r_size + r0 + k];
            }
            a_tile[m * 32 + k] = v;
        }
        if comptime![aligned] {
            // Whole packed words: 8 consecutive elements of a W row share one word and one block, so each
            // unit decodes two words with one absmax each (W's columns are a multiple of 8).
            #[unroll]
            for l in 0..2usize {
                let widx = unit + 128 * l;
                let mut k = 0usize;
                let mut p = 0usize;
                if comptime![w_is_p_by_r] {
                    p = widx / 4;
                    k = (widx % 4) * 8;
                } else {
                    k = widx / 8;
                    p = (widx % 8) * 8;
                }
                if p0 + p < p_size && r0 + k < r_size {
                    let mut flat = 0usize;
                    if comptime![w_is_p_by_r] {
                        flat = (p0 + p) * r_size + r0 + k;
                    } else {
                        flat = (r0 + k) * p_size + p0 + p;
                    }
                    let scale =
                        block_absmax(flat / blocksize, absmax, nested_absmax, nested_code, offset, double_quant);
                    let word = packed[flat / 8];
                    #[unroll]
                    for j in 0..8usize {
                        let code = nibble(word, j);
                        let v = F::cast_from(book[code as usize] * scale);
                        if comptime![w_is_p_by_r] {
                            b_tile[(k + j) * 64 + p] = v;
                        } else {
                            b_tile[k * 64 + p + j] = v;
                        }
                    }
                } else {
                    #[unroll]
                    for j in 0..8usize {
                        if comptime![w_is_p_by_r] {
                            b_tile[(k + j) * 64 + p] = F::new(0.0);
                        } else {
                            b_tile[k * 64 + p + j] = F::new(0.0);
                        }
                    }
                }
            }
        } else {
            #[unroll]
            for l in 0..16usize {
                let idx = unit + 128 * l;
                let mut k = 0usize;
                let mut p = 0usize;
                if comptime![w_is_p_by_r] {
                    p = idx / 32;
                    k = idx % 32;
                } else {
                    k = idx / 64;
                    p = idx % 64;
                }
                let mut v = 0.0f32;
                if p0 + p < p_size && r0 + k < r_size {
                    let mut flat = 0usize;
                    if comptime![w_is_p_by_r] {
                        flat = (p0 + p) * r_size + r0 + k;
                    } else {
                        flat = (r0 + k) * p_size + p0 + p;
                    }
                    let scale =
                        block_absmax(flat / blocksize, absmax, nested_absmax, nested_code, offset, double_quant);
                    v = book[code_at(packed, flat) as usize] * scale;
                }
                b_tile[k * 64 + p] = F::cast_from(v);
            }
        }
        sync_cube();
        #[unroll]
        for kk in 0..2usize {
            let a0 = cmma::Matrix::<F>::from_slice(
                cmma::MatrixIdent::A,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                &a_tile[pm * 32 + kk * 16..2048usize],
                32u32,
            );
            let a1 = cmma::Matrix::<F>::from_slice(
                cmma::MatrixIdent::A,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                &a_tile[(pm + 16) * 32 + kk * 16..2048usize],
                32u32,
            );
            let b0 = cmma::Matrix::<F>::from_slice(
                cmma::MatrixIdent::B,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                &b_tile[kk * 16 * 64 + pp..2048usize],
                64u32,
            );
            let b1 = cmma::Matrix::<F>::from_slice(
                cmma::MatrixIdent::B,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                &b_tile[kk * 16 * 64 + pp + 16..2048usize],
                64u32,
            );
            cmma::execute(&a0, &b0, &acc00, &acc00);
            cmma::execute(&a0, &b1, &acc01, &acc01);
            cmma::execute(&a1, &b0, &acc10, &acc10);
            cmma::execute(&a1, &b1, &acc11, &acc11);
        }
    }
    sync_cube();
    cmma::store(&mut c_tile[pm * 64 + pp..4096usize], &acc00, 64u32, cmma::MatrixLayout::RowMajor);
    cmma::store(&mut c_tile[pm * 64 + pp + 16..4096usize], &acc01, 64u32, cmma::MatrixLayout::RowMajor);
    cmma::store(&mut c_tile[(pm + 16) * 64 + pp..4096usize], &acc10, 64u32, cmma::MatrixLayout::RowMajor);
    cmma::store(&mut c_tile[(pm + 16) * 64 + pp + 16..4096usize], &acc11, 64u32, cmma::MatrixLayout::RowMajor);
    sync_cube();
    #[unroll]
    for l in 0..32usize {
        let idx = unit + 128 * l;
        let m = idx / 64;
        let p = idx % 64;
        if m0 + m < m_size && p0 + p < p_size {
            c[(m0 + m) * p_size + p0 + p] = F::cast_from(c_tile[idx]);
        }
    }
}

/// Whether the device has 16×16×16 tensor-core fragments for `dtype` inputs with f32 accumulation.
pub fn has_tensor_cores(client: &Client, dtype: FloatDtype) -> bool {
    use cubecl::features::MmaConfig;
    use cubecl::ir::{ElemType, FloatKind};
    let kind = match dtype {
        FloatDtype::F32 => return false,
        FloatDtype::Bf16 => FloatKind::BF16,
        FloatDtype::F16 => FloatKind::F16,
    };
    client.features().matmul.cmma.contains(&MmaConfig {
        a_type: ElemType::Float(kind),
        b_type: ElemType::Float(kind),
        cd_type: ElemType::Float(FloatKind::F32),
        m: 16,
        k: 16,
        n: 16,
    })
}

/// `y[m, p] = Σ_r x[m, r] · W[p, r]` for a few rows m: 32 units per output row p stream over its codes.
#[cube(launch_unchecked)]
fn gemv_kernel<F: Float>(
    x: &[F],
    packed: &[u32],
    absmax: &[u32],
    nested_absmax: &[f32],
    nested_code: &[f32],
    codebook: &[f32],
    y: &mut [F],
    m_size: usize,
    r_size: usize,
    p_size: usize,
    offset: f32,
    #[comptime] blocksize: usize,
    #[comptime] double_quant: bool,
    #[comptime] aligned: bool,
) {
    let mut book = Shared::<[f32]>::new_slice(16usize);
    let mut partial = Shared::<[f32]>::new_slice(256usize);
    let unit = UNIT_POS as usize;
    if unit < 16 {
        book[unit] = codebook[unit];
    }
    sync_cube();
    let lane = unit % 32;
    let p = CUBE_POS * 8 + unit / 32;
    let mut acc = Array::<f32>::new(16usize);
    #[unroll]
    for i in 0..16usize {
        acc[i] = 0.0f32;
    }
    if p < p_size {
        let row_start = p * r_size;
        let chunks = r_size.div_ceil(8);
        let mut chunk = lane;
        while chunk < chunks {
            let r = chunk * 8;
            let flat = row_start + r;
            let scale = block_absmax(flat / blocksize, absmax, nested_absmax, nested_code, offset, double_quant);
            if comptime![aligned] {
                // A row starts on a word, and a word sits inside one block.
                let word = packed[flat / 8];
                #[unroll]
                for j in 0..8usize {
                    let code = nibble(word, j);
                    let w = book[code as usize] * scale;
                    for m in 0..m_size {
                        acc[m] += f32::cast_from(x[m * r_size + r + j]) * w;
                    }
                }
            } else {
                let end = min(r + 8, r_size);
                for rr in r..end {
                    let f = row_start + rr;
                    let s = block_absmax(f / blocksize, absmax, nested_absmax, nested_code, offset, double_quant);
                    let w = book[code_at(packed, f) as usize] * s;
                    for m in 0..m_size {
                        acc[m] += f32::cast_from(x[m * r_size + rr]) * w;
                    }
                }
            }
            chunk += 32;
        }
    }
    for m in 0..m_size {
        partial[unit] = acc[m];
        sync_cube();
        let mut stride = 16usize;
        while stride > 0 {
            if lane < stride {
                partial[unit] += partial[unit + stride];
            }
            sync_cube();
            stride /= 2;
        }
        if lane == 0 && p < p_size {
            y[m * p_size + p] = F::cast_from(partial[unit]);
        }
        sync_cube();
    }
}

/// What every 4-bit product kernel takes before its comptime flags.
struct ProductArgs<'a> {
    a: &'a Handle,
    a_len: usize,
    weight: &'a DeviceWeight4bit,
    out: &'a Handle,
    out_len: usize,
    m: usize,
    r_size: usize,
    p_size: usize,
}

/// Launches a 4-bit product kernel (they share their argument list up to the comptime flags) for the
/// activation dtype.
macro_rules! launch_product {
    ($kernel:ident, $dtype:expr, $client:expr, $count:expr, $dim:expr, $args:expr $(, $flag:expr)*) => {{
        let ProductArgs { a, a_len, weight, out, out_len, m, r_size, p_size } = $args;
        macro_rules! with_type {
            ($t:ty) => {
                unsafe {
                    $kernel::launch_unchecked::<$t>(
                        $client,
                        $count,
                        $dim,
                        BufferArg::from_raw_parts(a.clone(), a_len),
                        BufferArg::from_raw_parts(weight.packed.clone(), 1),
                        BufferArg::from_raw_parts(weight.absmax.clone(), 1),
                        BufferArg::from_raw_parts(weight.nested_absmax.clone(), 1),
                        BufferArg::from_raw_parts(weight.nested_code.clone(), 1),
                        BufferArg::from_raw_parts(weight.codebook.clone(), 16),
                        BufferArg::from_raw_parts(out.clone(), out_len),
                        m,
                        r_size,
                        p_size,
                        weight.offset,
                        weight.blocksize,
                        weight.double_quant,
                        $($flag),*
                    )
                }
            };
        }
        match $dtype {
            FloatDtype::F32 => with_type!(f32),
            FloatDtype::Bf16 => with_type!(half::bf16),
            FloatDtype::F16 => with_type!(half::f16),
        }
    }};
}

fn check_operand(what: &'static str, handle: &Handle, elems: usize, dtype: FloatDtype) -> Result<(), KernelError> {
    let needed = elems * dtype.size_in_bytes();
    if (handle.size() as usize) < needed {
        return Err(KernelError::Shape {
            what,
            expected: format!("≥ {needed} bytes"),
            found: format!("{} bytes", handle.size()),
        });
    }
    Ok(())
}

/// The fused product of `a` (`[m, in]` for [`Product::Forward`], `[m, out]` for [`Product::InputGrad`],
/// row-major, `dtype`) with the 4-bit weight, into a new buffer of the same dtype.
pub fn fused_matmul(
    client: &Client,
    a: &Handle,
    m: usize,
    weight: &DeviceWeight4bit,
    product: Product,
    dtype: FloatDtype,
) -> Result<Handle, KernelError> {
    let [rows, cols] = weight.shape;
    let (r_size, p_size) = match product {
        Product::Forward => (cols, rows),
        Product::InputGrad => (rows, cols),
    };
    check_operand("activation buffer", a, m * r_size, dtype)?;
    let out = client.empty((m * p_size).max(1) * dtype.size_in_bytes());
    fused_matmul_into(client, a, m, weight, product, dtype, &out)?;
    Ok(out)
}

/// [`fused_matmul`] into an existing buffer.
pub fn fused_matmul_into(
    client: &Client,
    a: &Handle,
    m: usize,
    weight: &DeviceWeight4bit,
    product: Product,
    dtype: FloatDtype,
    out: &Handle,
) -> Result<(), KernelError> {
    let [rows, cols] = weight.shape;
    let (r_size, p_size, w_is_p_by_r) = match product {
        Product::Forward => (cols, rows, true),
        Product::InputGrad => (rows, cols, false),
    };
    check_operand("activation buffer", a, m * r_size, dtype)?;
    check_operand("output buffer", out, m * p_size, dtype)?;
    if m == 0 {
        return Ok(());
    }
    let count = CubeCount::Static(p_size.div_ceil(TILE_P) as u32, m.div_ceil(TILE_M) as u32, 1);
    let tensor_cores = has_tensor_cores(client, dtype);
    let dim = CubeDim::new_1d(if tensor_cores { 128 } else { UNITS });
    let args = ProductArgs { a, a_len: m * r_size, weight, out, out_len: m * p_size, m, r_size, p_size };
    if tensor_cores {
        launch_product!(fused_matmul_cmma_kernel, dtype, client, count, dim, args, w_is_p_by_r, cols % 8 == 0);
    } else {
        launch_product!(fused_matmul_kernel, dtype, client, count, dim, args, w_is_p_by_r);
    }
    Ok(())
}

/// The forward product for at most [`GEMV_MAX_ROWS`] rows of x, streaming W once.
pub fn gemv(
    client: &Client,
    x: &Handle,
    m: usize,
    weight: &DeviceWeight4bit,
    dtype: FloatDtype,
) -> Result<Handle, KernelError> {
    let [rows, _] = weight.shape;
    let out = client.empty((m * rows).max(1) * dtype.size_in_bytes());
    gemv_into(client, x, m, weight, dtype, &out)?;
    Ok(out)
}

/// [`gemv`] into an existing buffer.
pub fn gemv_into(
    client: &Client,
    x: &Handle,
    m: usize,
    weight: &DeviceWeight4bit,
    dtype: FloatDtype,
    out: &Handle,
) -> Result<(), KernelError> {
    let [rows, cols] = weight.shape;
    if m > GEMV_MAX_ROWS {
        return Err(KernelError::Shape {
            what: "GEMV batch rows",
            expected: format!("≤ {GEMV_MAX_ROWS}"),
            found: m.to_string(),
        });
    }
    check_operand("activation buffer", x, m * cols, dtype)?;
    check_operand("output buffer", out, m * rows, dtype)?;
    if m == 0 {
        return Ok(());
    }
    let aligned = cols % 8 == 0;
    let count = CubeCount::Static(rows.div_ceil(GEMV_ROWS as usize) as u32, 1, 1);
    let dim = CubeDim::new_1d(GEMV_ROWS * 32);
    let args = ProductArgs { a: x, a_len: m * cols, weight, out, out_len: m * rows, m, r_size: cols, p_size: rows };
    launch_product!(gemv_kernel, dtype, client, count, dim, args, aligned);
    Ok(())
}

/// CPU reference: `C = A · B` with `B(r, p)` from the dequantized W, in f64; also `Σ|a·b|` per output for
/// an error bound.
pub fn reference_product(a: &[f32], m: usize, w: &[f32], shape: [usize; 2], product: Product) -> (Vec<f32>, Vec<f64>) {
    let [rows, cols] = shape;
    let (r_size, p_size) = match product {
        Product::Forward => (cols, rows),
        Product::InputGrad => (rows, cols),
    };
    let mut out = vec![0.0f32; m * p_size];
    let mut magnitude = vec![0.0f64; m * p_size];
    for i in 0..m {
        for p in 0..p_size {
            let (mut s, mut mag) = (0.0f64, 0.0f64);
            for r in 0..r_size {
                let b = match product {
                    Product::Forward => w[p * r_size + r],
                    Product::InputGrad => w[r * p_size + p],
                } as f64;
                let x = a[i * r_size + r] as f64;
                s += x * b;
                mag += (x * b).abs();
            }
            out[i * p_size + p] = s as f32;
            magnitude[i * p_size + p] = mag;
        }
    }
    (out, magnitude)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{Rng, client, poison, random_weights};
    use crate::weight::{read_f32, upload_f32};
    use nf4::{QuantType, quantize};

    fn check(
        m: usize,
        rows: usize,
        cols: usize,
        blocksize: usize,
        dq: bool,
        product: Product,
        use_gemv: bool,
        rng: &mut Rng,
    ) {
        let client = client();
        let w = random_weights(rows * cols, rng);
        let q = quantize(&w, blocksize, QuantType::Nf4, dq).unwrap();
        let weight = DeviceWeight4bit::upload(&client, &q, [rows, cols]).unwrap();
        let r_size = if product == Product::Forward { cols } else { rows };
        let p_size = if product == Product::Forward { rows } else { cols };
        let a: Vec<f32> = (0..m * r_size).map(|_| rng.normal()).collect();
        let a_dev = upload_f32(&client, &a);
        let out = poison(&client, m * p_size * 4);
        if use_gemv {
            gemv_into(&client, &a_dev, m, &weight, FloatDtype::F32, &out).unwrap();
        } else {
            fused_matmul_into(&client, &a_dev, m, &weight, product, FloatDtype::F32, &out).unwrap();
        }
        let got = read_f32(&client, out, m * p_size, "test").unwrap();
        let (want, magnitude) = reference_product(&a, m, &q.dequantize::<f32>().unwrap(), [rows, cols], product);
        for i in 0..got.len() {
            let bound = 2e-6 * magnitude[i] + 1e-30;
            assert!(
                (got[i] as f64 - want[i] as f64).abs() <= bound,
                "m {m} W {rows}x{cols} bs {blocksize} dq {dq} {product:?} gemv {use_gemv}: element {i}: {} vs {} (bound {bound})",
                got[i],
                want[i]
            );
        }
    }

    #[test]
    fn fused_products_equal_the_cpu_reference() {
        let mut rng = Rng::from_env("fused_matmul");
        // Ragged in every dimension: partial tiles, blocks crossing rows (cols not a multiple of 64).
        for (m, rows, cols, bs) in
            [(1, 5, 64, 64), (7, 70, 130, 64), (65, 33, 100, 32), (130, 129, 67, 128), (3, 96, 256, 64)]
        {
            for dq in [false, true] {
                for product in [Product::Forward, Product::InputGrad] {
                    check(m, rows, cols, bs, dq, product, false, &mut rng);
                }
            }
        }
    }

    #[test]
    fn gemv_equals_the_cpu_reference() {
        let mut rng = Rng::from_env("gemv");
        for (m, rows, cols, bs) in
            [(1, 9, 64, 64), (4, 33, 136, 64), (16, 17, 200, 32), (3, 10, 37, 64), (1, 300, 515, 128)]
        {
            for dq in [false, true] {
                check(m, rows, cols, bs, dq, Product::Forward, true, &mut rng);
            }
        }
    }

    #[test]
    fn gemv_refuses_large_batches() {
        let client = client();
        let q = quantize(&[0.5f32; 64], 64, QuantType::Nf4, false).unwrap();
        let weight = DeviceWeight4bit::upload(&client, &q, [1, 64]).unwrap();
        let x = upload_f32(&client, &vec![0.0; 17 * 64]);
        assert!(matches!(gemv(&client, &x, 17, &weight, FloatDtype::F32), Err(KernelError::Shape { .. })));
        assert!(matches!(
            fused_matmul(&client, &x, 100, &weight, Product::Forward, FloatDtype::F32),
            Err(KernelError::Shape { .. })
        ));
    }
}
