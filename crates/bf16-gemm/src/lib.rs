//! # bf16-gemm — bf16 matrix products on AVX512-BF16, f32 accumulation
//!
//! At the bottom of the stack beside `nf4`: the CPU matmul that the flex backend's bf16 path lacks (burn's
//! flex converts bf16 operands to f32, multiplies in f32 and converts back). `C = A·B` for a row-major bf16
//! A `[m, k]` and a right-hand operand that hands out **panels** ([`PanelSource`]): 32 output columns as
//! k-pairs of bf16 in u32 words, the layout `vdpbf16ps` multiplies. A panel comes from a dense bf16 matrix
//! ([`Dense`], either orientation) or straight from a 4-bit bitsandbytes weight ([`Packed4bit`]: NF4/FP4
//! codes × absmax, decoded into the panel and never into a dense W). Each panel is packed once per product
//! and reused across all rows; tiles of 12 rows × 32 columns accumulate in 24 zmm registers. Results are
//! f32 or bf16 (rounded once, to nearest even). Without AVX512-BF16 a portable kernel computes the same.

#[cfg(target_endian = "big")]
compile_error!("bf16-gemm packs its panels little-endian (bf16 halves of u32 words)");

use std::borrow::Cow;

use half::bf16;
use rayon::prelude::*;

/// Output columns per panel: two 16-lane f32 accumulators per row.
pub const NR: usize = 32;
/// Rows per register tile.
const MR: usize = 12;

/// Whether this CPU runs the AVX512-BF16 kernel (else [`matmul`] uses the portable one).
pub fn accelerated() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The right-hand operand B `[k, n]` of a product, handed out panel by panel.
pub trait PanelSource: Sync {
    /// The reduction length.
    fn k(&self) -> usize;
    /// The output columns.
    fn n(&self) -> usize;
    /// Writes columns `n0 .. n0 + NR` of B into `out` (`k.div_ceil(2) · NR` words): word `p · NR + j`
    /// holds `B[2p][n0 + j]` in its low half and `B[2p + 1][n0 + j]` in its high half (bf16 bits), zero
    /// past k and past n.
    fn pack(&self, n0: usize, out: &mut [u32]);
}

/// How a dense operand's values are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseLayout {
    /// B itself, row-major `[k, n]`.
    KByN,
    /// Bᵀ row-major `[n, k]` (for `A·Wᵀ` with W stored `[n, k]`).
    NByK,
}

/// A dense bf16 right-hand operand.
#[derive(Debug, Clone, Copy)]
pub struct Dense<'a> {
    values: &'a [bf16],
    k: usize,
    n: usize,
    layout: DenseLayout,
}

impl<'a> Dense<'a> {
    /// B `[k, n]` stored as `layout` says; `None` when `values` does not hold `k · n` elements.
    pub fn new(values: &'a [bf16], k: usize, n: usize, layout: DenseLayout) -> Option<Self> {
        (values.len() == k * n).then_some(Dense { values, k, n, layout })
    }
}

fn bits(v: bf16) -> u32 {
    v.to_bits() as u32
}

impl PanelSource for Dense<'_> {
    fn k(&self) -> usize {
        self.k
    }

    fn n(&self) -> usize {
        self.n
    }

    fn pack(&self, n0: usize, out: &mut [u32]) {
        let (k, n, v) = (self.k, self.n, self.values);
        out.fill(0);
        let cols = NR.min(n.saturating_sub(n0));
        match self.layout {
            DenseLayout::NByK => {
                for j in 0..cols {
                    let row = &v[(n0 + j) * k..(n0 + j + 1) * k];
                    let mut pairs = row.chunks_exact(2);
                    for (p, pair) in (&mut pairs).enumerate() {
                        out[p * NR + j] = bits(pair[0]) | bits(pair[1]) << 16;
                    }
                    if let [last] = pairs.remainder() {
                        out[(k / 2) * NR + j] = bits(*last);
                    }
                }
            }
            DenseLayout::KByN => {
                for p in 0..k.div_ceil(2) {
                    let low = &v[2 * p * n + n0..2 * p * n + n0 + cols];
                    let words = &mut out[p * NR..p * NR + cols];
                    if 2 * p + 1 < k {
                        let high = &v[(2 * p + 1) * n + n0..(2 * p + 1) * n + n0 + cols];
                        for ((w, l), h) in words.iter_mut().zip(low).zip(high) {
                            *w = bits(*l) | bits(*h) << 16;
                        }
                    } else {
                        for (w, l) in words.iter_mut().zip(low) {
                            *w = bits(*l);
                        }
                    }
                }
            }
        }
    }
}

/// A 4-bit weight W `[rows, cols]` in bitsandbytes' layout (two codes per byte, the first in the high
/// nibble; one absmax per `blocksize` elements of the flattened W), as the operand `Wᵀ` (`transposed`:
/// k = cols, n = rows, for `x·Wᵀ`) or `W` (k = rows, n = cols, for `dy·W`). Each value is
/// `bf16(codebook[code] · absmax[block])`, the rounding of the dequantize-then-cast path.
#[derive(Debug, Clone, Copy)]
pub struct Packed4bit<'a> {
    bytes: &'a [u8],
    absmax: &'a [f32],
    codebook: &'a [f32; 16],
    blocksize: usize,
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl<'a> Packed4bit<'a> {
    /// `None` when the lengths do not describe a `[rows, cols]` weight or `blocksize` is odd or zero.
    pub fn new(
        bytes: &'a [u8],
        absmax: &'a [f32],
        codebook: &'a [f32; 16],
        blocksize: usize,
        rows: usize,
        cols: usize,
        transposed: bool,
    ) -> Option<Self> {
        let numel = rows * cols;
        let fits = blocksize > 0
            && blocksize.is_multiple_of(2)
            && bytes.len() >= numel.div_ceil(2)
            && absmax.len() >= numel.div_ceil(blocksize);
        fits.then_some(Packed4bit { bytes, absmax, codebook, blocksize, rows, cols, transposed })
    }

    /// The code of flattened element `f`.
    fn code(&self, f: usize) -> usize {
        let byte = self.bytes[f / 2];
        (if f.is_multiple_of(2) { byte >> 4 } else { byte & 0x0f }) as usize
    }

    /// `put(i, round(W[start + i]))` (flattened W; `codebook · absmax` in f32 as the dequantize kernel
    /// computes it, then `round`) for `len` consecutive elements, one block's 16-entry table at a time.
    fn for_run<T: Copy>(&self, start: usize, len: usize, round: impl Fn(f32) -> T, mut put: impl FnMut(usize, T)) {
        let bs = self.blocksize;
        let mut i = 0;
        while i < len {
            let block = (start + i) / bs;
            let end = len.min((block + 1) * bs - start);
            let scale = self.absmax[block];
            let table: [T; 16] = std::array::from_fn(|c| round(self.codebook[c] * scale));
            // An odd first element, then a byte (two codes) at a time, then an odd last element.
            let mut j = i;
            if (start + j) % 2 == 1 {
                put(j, table[self.code(start + j)]);
                j += 1;
            }
            while j + 1 < end {
                let byte = self.bytes[(start + j) / 2];
                put(j, table[(byte >> 4) as usize]);
                put(j + 1, table[(byte & 0x0f) as usize]);
                j += 2;
            }
            if j < end {
                put(j, table[self.code(start + j)]);
            }
            i = end;
        }
    }
}

impl PanelSource for Packed4bit<'_> {
    fn k(&self) -> usize {
        if self.transposed { self.cols } else { self.rows }
    }

    fn n(&self) -> usize {
        if self.transposed { self.rows } else { self.cols }
    }

    fn pack(&self, n0: usize, out: &mut [u32]) {
        let (rows, cols) = (self.rows, self.cols);
        let bf16_bits = |v: f32| bf16::from_f32(v).to_bits();
        out.fill(0);
        let halves: &mut [u16] = bytemuck_u16(out);
        if self.transposed {
            // Panel column j is row n0 + j of W: element kk goes to half kk % 2 of word (kk / 2, j).
            for j in 0..NR.min(rows.saturating_sub(n0)) {
                self.for_run((n0 + j) * cols, cols, bf16_bits, |kk, v| halves[2 * ((kk / 2) * NR + j) + kk % 2] = v);
            }
        } else {
            // Panel row pair p is rows 2p, 2p+1 of W at columns n0 .. n0 + NR.
            let width = NR.min(cols.saturating_sub(n0));
            for row in 0..rows {
                let (p, half) = (row / 2, row % 2);
                self.for_run(row * cols + n0, width, bf16_bits, |j, v| halves[2 * (p * NR + j) + half] = v);
            }
        }
    }
}

/// A right-hand operand that also hands out f32 panels, for the f32 kernel ([`matmul_f32`]).
pub trait F32Panels: PanelSource {
    /// Writes columns `n0 .. n0 + NR` of B into `out` (`k · NR` values, row `kk` at `kk · NR`), zero past n.
    fn pack_f32(&self, n0: usize, out: &mut [f32]);
}

impl F32Panels for Packed4bit<'_> {
    fn pack_f32(&self, n0: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        out.fill(0.0);
        if self.transposed {
            // Panel column j is row n0 + j of W, down the panel's k rows.
            for j in 0..NR.min(rows.saturating_sub(n0)) {
                self.for_run((n0 + j) * cols, cols, |v| v, |kk, v| out[kk * NR + j] = v);
            }
        } else {
            // Panel row kk is row kk of W at columns n0 .. n0 + NR.
            let width = NR.min(cols.saturating_sub(n0));
            for (row, panel_row) in out.chunks_exact_mut(NR).take(rows).enumerate() {
                self.for_run(row * cols + n0, width, |v| v, |j, v| panel_row[j] = v);
            }
        }
    }
}

/// The panel's words as bf16 halves (little-endian: the low half first).
fn bytemuck_u16(words: &mut [u32]) -> &mut [u16] {
    bytemuck::cast_slice_mut(words)
}

/// An element of the product's result.
pub trait Output: Copy + Send + Sync + 'static {
    const ZERO: Self;
    const IS_BF16: bool;
    fn from_f32(v: f32) -> Self;
}

impl Output for f32 {
    const ZERO: Self = 0.0;
    const IS_BF16: bool = false;
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Output for bf16 {
    const ZERO: Self = bf16::ZERO;
    const IS_BF16: bool = true;
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// `A · B` for A `[m, k]` row-major (k = `source.k()`), in f32 or bf16, row-major `[m, n]`. Threads: rayon's
/// pool. Panics when `a` does not hold `m · k` elements.
pub fn matmul<O: Output>(a: &[bf16], m: usize, source: &(impl PanelSource + ?Sized)) -> Vec<O> {
    matmul_with(a, m, source, accelerated())
}

/// [`matmul`] with the kernel chosen by the caller (`accelerated` needs [`accelerated()`] to be true).
pub fn matmul_with<O: Output>(a: &[bf16], m: usize, source: &(impl PanelSource + ?Sized), accelerated: bool) -> Vec<O> {
    let (k, n) = (source.k(), source.n());
    assert_eq!(a.len(), m * k, "A holds {} values, expected {m} × {k}", a.len());
    assert!(!accelerated || self::accelerated(), "the AVX512-BF16 kernel needs a CPU with AVX512-BF16");
    let mut out = vec![O::ZERO; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    let pairs = k.div_ceil(2);
    // A as k-pairs (u32 words), padded with a zero when k is odd.
    let a_words: Cow<[u32]> = match (k % 2, bytemuck::try_cast_slice::<bf16, u32>(a)) {
        (0, Ok(words)) => Cow::Borrowed(words),
        _ => Cow::Owned(
            (0..m)
                .flat_map(|i| {
                    let row = &a[i * k..(i + 1) * k];
                    (0..pairs).map(move |p| bits(row[2 * p]) | row.get(2 * p + 1).map_or(0, |&h| bits(h) << 16))
                })
                .collect(),
        ),
    };
    drive(
        &a_words,
        m,
        pairs,
        n,
        &mut out,
        |n0, panel| source.pack(n0, panel),
        |rows, a, panel, c, cols| {
            // Safety: `drive` hands out tiles inside `out` (see `tile`).
            unsafe { tile(accelerated, rows, a, pairs, panel, c, n, cols) }
        },
    );
    out
}

/// `$body` with `$r` a constant equal to the tile's row count (1 ..= MR), for the kernels' const generics.
#[cfg(target_arch = "x86_64")]
macro_rules! with_tile_rows {
    ($rows:expr, |$r:ident| $body:expr) => {
        with_tile_rows!(@ $rows, $r, $body, 1 2 3 4 5 6 7 8 9 10 11 12)
    };
    (@ $rows:expr, $r:ident, $body:expr, $($n:literal)*) => {
        match $rows {
            $($n => {
                const $r: usize = $n;
                $body
            })*
            _ => unreachable!("tile rows ≤ {MR}"),
        }
    };
}

/// Whether this CPU runs the AVX-512 f32 kernel of [`matmul_f32`].
pub fn accelerated_f32() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `A · B` in f32 for A `[m, k]` row-major f32 and B's f32 panels (for a 4-bit B: decoded into the panels,
/// never into a dense W), with the AVX-512 FMA kernel where the CPU has it.
pub fn matmul_f32(a: &[f32], m: usize, source: &(impl F32Panels + ?Sized)) -> Vec<f32> {
    matmul_f32_with(a, m, source, accelerated_f32())
}

/// [`matmul_f32`] with the kernel chosen by the caller (`accelerated` needs [`accelerated_f32()`]).
pub fn matmul_f32_with(a: &[f32], m: usize, source: &(impl F32Panels + ?Sized), accelerated: bool) -> Vec<f32> {
    let (k, n) = (source.k(), source.n());
    assert_eq!(a.len(), m * k, "A holds {} values, expected {m} × {k}", a.len());
    assert!(!accelerated || accelerated_f32(), "the AVX-512 kernel needs a CPU with AVX-512");
    let mut out = vec![0.0f32; m * n];
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    drive(
        a,
        m,
        k,
        n,
        &mut out,
        |n0, panel| source.pack_f32(n0, panel),
        |rows, a, panel, c, cols| {
            // Safety: `drive` hands out tiles inside `out`.
            unsafe { tile_f32(accelerated, rows, a, k, panel, c, n, cols) }
        },
    );
    out
}

/// One f32 tile, as [`tile`].
#[allow(clippy::too_many_arguments)]
unsafe fn tile_f32(
    accelerated: bool,
    rows: usize,
    a: &[f32],
    k: usize,
    panel: &[f32],
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    debug_assert!(a.len() >= (rows - 1) * k + k && panel.len() >= k * NR);
    #[cfg(target_arch = "x86_64")]
    if accelerated {
        with_tile_rows!(rows, |R| unsafe { avx512::tile_f32::<R>(a.as_ptr(), k, panel.as_ptr(), k, c, ldc, cols) });
        return;
    }
    let _ = accelerated;
    for i in 0..rows {
        for j in 0..cols {
            let acc = (0..k).fold(0.0f32, |acc, kk| a[i * k + kk].mul_add(panel[kk * NR + j], acc));
            unsafe { c.add(i * ldc + j).write(acc) };
        }
    }
}

/// The threaded loop shared by the kernels: A as `m` rows of `steps` words, panels of `steps · NR` words
/// packed once per task by `pack`, tiles of ≤ MR rows × ≤ NR columns of the row-major `out` `[m, n]`
/// computed by `tile(rows, A from the tile's first row, panel, C at the tile's corner, cols)`.
fn drive<W: Copy + Default + Send + Sync, O: Output>(
    a_words: &[W],
    m: usize,
    steps: usize,
    n: usize,
    out: &mut [O],
    pack: impl Fn(usize, &mut [W]) + Sync,
    tile: impl Fn(usize, &[W], &[W], *mut O, usize) + Sync,
) {
    let panels = n.div_ceil(NR);
    let threads = rayon::current_num_threads().max(1);
    let per_task = (panels / (2 * threads)).clamp(1, 4);
    let groups = panels.div_ceil(per_task);
    // Few panels (a narrow B): split the rows too, so every thread gets work.
    let row_chunks = (2 * threads).div_ceil(groups).clamp(1, m.div_ceil(MR));
    let rows_per_chunk = m.div_ceil(row_chunks).div_ceil(MR) * MR;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let panel_len = steps * NR;
    (0..groups * row_chunks).into_par_iter().for_each_init(Vec::<W>::new, |buf, task| {
        let (group, chunk) = (task / row_chunks, task % row_chunks);
        let (p0, p1) = (group * per_task, ((group + 1) * per_task).min(panels));
        let (r_start, r_end) = (chunk * rows_per_chunk, ((chunk + 1) * rows_per_chunk).min(m));
        if r_start >= r_end {
            return;
        }
        buf.resize((p1 - p0) * panel_len, W::default());
        for (i, p) in (p0..p1).enumerate() {
            pack(p * NR, &mut buf[i * panel_len..(i + 1) * panel_len]);
        }
        // The closure must capture the whole `Send` wrapper, not its raw-pointer field.
        #[allow(clippy::redundant_locals)]
        let out_ptr = out_ptr;
        for r0 in (r_start..r_end).step_by(MR) {
            let rows = MR.min(r_end - r0);
            let a_tile = &a_words[r0 * steps..];
            for (i, p) in (p0..p1).enumerate() {
                let panel = &buf[i * panel_len..(i + 1) * panel_len];
                let cols = NR.min(n - p * NR);
                // Tasks write disjoint tiles (rows r0.., columns p·NR..) of `out`, which outlives them.
                tile(rows, a_tile, panel, out_ptr.0.wrapping_add(r0 * n + p * NR), cols);
            }
        }
    });
}

/// One `rows × cols` tile (rows ≤ MR, cols ≤ NR) of C over the whole reduction.
///
/// Safety: `c` points at a tile of `rows` rows of stride `ldc` with `cols` writable elements each.
#[allow(clippy::too_many_arguments)]
unsafe fn tile<O: Output>(
    accelerated: bool,
    rows: usize,
    a: &[u32],
    pairs: usize,
    panel: &[u32],
    c: *mut O,
    ldc: usize,
    cols: usize,
) {
    debug_assert!(a.len() >= (rows - 1) * pairs + pairs && panel.len() >= pairs * NR);
    #[cfg(target_arch = "x86_64")]
    if accelerated {
        with_tile_rows!(rows, |R| unsafe {
            avx512::tile::<R, O>(a.as_ptr(), pairs, panel.as_ptr(), pairs, c, ldc, cols)
        });
        return;
    }
    let _ = accelerated;
    let half = |w: u32, high: bool| bf16::from_bits(if high { (w >> 16) as u16 } else { w as u16 }).to_f32();
    for i in 0..rows {
        let a_row = &a[i * pairs..(i + 1) * pairs];
        for j in 0..cols {
            let mut acc = 0.0f32;
            for (p, &w) in a_row.iter().enumerate() {
                let b = panel[p * NR + j];
                acc = acc + half(w, false) * half(b, false) + half(w, true) * half(b, true);
            }
            unsafe { c.add(i * ldc + j).write(O::from_f32(acc)) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{NR, Output};

    /// `R` rows × 32 columns: per k-pair, two panel vectors and one broadcast A pair per row, two
    /// `vdpbf16ps` per row into f32 accumulators; stored once (masked past `cols`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn tile<const R: usize, O: Output>(
        a: *const u32,
        lda: usize,
        panel: *const u32,
        pairs: usize,
        c: *mut O,
        ldc: usize,
        cols: usize,
    ) {
        let mut acc0 = [_mm512_setzero_ps(); R];
        let mut acc1 = [_mm512_setzero_ps(); R];
        for p in 0..pairs {
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR) as *const _));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR + 16) as *const _));
                for i in 0..R {
                    let pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(a.add(i * lda + p).read() as i32));
                    acc0[i] = _mm512_dpbf16_ps(acc0[i], pair, b0);
                    acc1[i] = _mm512_dpbf16_ps(acc1[i], pair, b1);
                }
            }
        }
        let (m0, m1) = column_masks(cols);
        if !O::IS_BF16 {
            // Safety: O is f32 (the only other output) and `c` is the caller's tile.
            return unsafe { store_f32(&acc0, &acc1, c as *mut f32, ldc, cols) };
        }
        for i in 0..R {
            unsafe {
                let row = c.add(i * ldc) as *mut i16;
                let low: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(acc0[i]));
                _mm256_mask_storeu_epi16(row, m0, low);
                if m1 != 0 {
                    let high: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(acc1[i]));
                    _mm256_mask_storeu_epi16(row.add(16), m1, high);
                }
            }
        }
    }

    /// The store masks of a tile's two 16-column halves for `cols` valid columns.
    fn column_masks(cols: usize) -> (__mmask16, __mmask16) {
        let mask = |n: usize| -> __mmask16 { if n >= 16 { 0xFFFF } else { ((1u32 << n) - 1) as u16 } };
        (mask(cols), mask(cols.saturating_sub(16)))
    }

    /// Stores `R` rows of f32 accumulators (two 16-column halves each), masked past `cols`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store_f32<const R: usize>(acc0: &[__m512; R], acc1: &[__m512; R], c: *mut f32, ldc: usize, cols: usize) {
        let (m0, m1) = column_masks(cols);
        for i in 0..R {
            unsafe {
                let row = c.add(i * ldc);
                _mm512_mask_storeu_ps(row, m0, acc0[i]);
                if m1 != 0 {
                    _mm512_mask_storeu_ps(row.add(16), m1, acc1[i]);
                }
            }
        }
    }

    /// `R` rows × 32 columns in f32: per k, two panel vectors and one broadcast A value per row, two FMAs per
    /// row into the accumulators; stored once (masked past `cols`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_f32<const R: usize>(
        a: *const f32,
        lda: usize,
        panel: *const f32,
        k: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        let mut acc0 = [_mm512_setzero_ps(); R];
        let mut acc1 = [_mm512_setzero_ps(); R];
        for p in 0..k {
            unsafe {
                let b0 = _mm512_loadu_ps(panel.add(p * NR));
                let b1 = _mm512_loadu_ps(panel.add(p * NR + 16));
                for i in 0..R {
                    let value = _mm512_set1_ps(a.add(i * lda + p).read());
                    acc0[i] = _mm512_fmadd_ps(value, b0, acc0[i]);
                    acc1[i] = _mm512_fmadd_ps(value, b1, acc1[i]);
                }
            }
        }
        unsafe { store_f32(&acc0, &acc1, c, ldc, cols) }
    }
}

#[cfg(test)]
mod tests;
