//! The kernels against an f64 product of the same bf16 values, and the 4-bit panels against dense panels
//! of the decoded weight. Values are fresh per run (the seed is printed).

use super::*;

struct Rng(splitmix::SplitMix64);

impl Rng {
    /// Seeded from `QLORA_TEST_SEED`, or from the clock; prints the seed so a failure can be replayed.
    fn fresh(what: &str) -> Self {
        let seed = std::env::var("QLORA_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        });
        println!("{what}: QLORA_TEST_SEED={seed}");
        Rng(splitmix::SplitMix64(seed))
    }
    fn uniform(&mut self) -> f32 {
        self.0.unit_f32() * 2.0 - 1.0
    }
    fn values(&mut self, len: usize) -> Vec<bf16> {
        (0..len).map(|_| bf16::from_f32(self.uniform() * 3.0)).collect()
    }
}

/// `A·B` in f64 for B given as `b(kk, j)`, and the sum of |products| per element (the error scale).
fn reference(a: &[bf16], m: usize, k: usize, n: usize, b: impl Fn(usize, usize) -> f32) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; m * n];
    let mut scale = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            for kk in 0..k {
                let p = a[i * k + kk].to_f32() as f64 * b(kk, j) as f64;
                out[i * n + j] += p;
                scale[i * n + j] += p.abs();
            }
        }
    }
    (out, scale)
}

fn check(got_f32: &[f32], got_bf16: &[bf16], want: &(Vec<f64>, Vec<f64>), k: usize, what: &str) {
    assert_eq!(got_f32.len(), want.0.len(), "{what}: length");
    for (idx, ((&g, &h), (&w, &s))) in got_f32.iter().zip(got_bf16).zip(want.0.iter().zip(&want.1)).enumerate() {
        // f32 accumulation over k terms.
        let tol = 4.0 * (k as f64 + 2.0) * f32::EPSILON as f64 * s + 1e-30;
        assert!((g as f64 - w).abs() <= tol, "{what}: f32 element {idx}: {g} vs {w} (tolerance {tol})");
        // One rounding to bf16 of a value within `tol` of the exact one.
        let tol16 = (w.abs() + tol) * 2f64.powi(-8) + tol;
        assert!((h.to_f64() - w).abs() <= tol16, "{what}: bf16 element {idx}: {h} vs {w}");
    }
}

fn kernels() -> Vec<bool> {
    if accelerated() {
        vec![false, true]
    } else {
        println!("no AVX512-BF16 on this CPU: the portable kernel only");
        vec![false]
    }
}

/// Dense operands in both layouts, odd and even k, tails in m and n, one to several panels.
#[test]
fn dense_products_equal_the_f64_product_in_both_layouts() {
    let mut rng = Rng::fresh("dense");
    for &(m, k, n) in
        &[(1, 1, 1), (3, 2, 5), (12, 64, 32), (13, 63, 33), (37, 130, 75), (25, 7, 161), (5, 576, 64), (64, 31, 200)]
    {
        let a = rng.values(m * k);
        let b = rng.values(k * n);
        let want = reference(&a, m, k, n, |kk, j| b[kk * n + j].to_f32());
        let bt: Vec<bf16> = (0..n).flat_map(|j| (0..k).map(|kk| b[kk * n + j]).collect::<Vec<_>>()).collect();
        for accel in kernels() {
            for (layout, values) in [(DenseLayout::KByN, &b), (DenseLayout::NByK, &bt)] {
                let source = Dense::new(values, k, n, layout).expect("k · n values");
                let what = format!("{m}×{k}×{n} {layout:?} accelerated {accel}");
                check(
                    &matmul_with::<f32>(&a, m, &source, accel),
                    &matmul_with::<bf16>(&a, m, &source, accel),
                    &want,
                    k,
                    &what,
                );
            }
        }
    }
}

/// A bitsandbytes-style 4-bit weight: random codes, absmax and a code book.
fn weight(rng: &mut Rng, rows: usize, cols: usize, blocksize: usize) -> (Vec<u8>, Vec<f32>, [f32; 16]) {
    let numel = rows * cols;
    let bytes = (0..numel.div_ceil(2)).map(|_| rng.0.next_u64() as u8).collect();
    let absmax = (0..numel.div_ceil(blocksize)).map(|_| rng.uniform().abs() * 2.0 + 0.01).collect();
    let codebook = std::array::from_fn(|_| rng.uniform());
    (bytes, absmax, codebook)
}

/// The dequantize-then-cast values of W, row-major.
fn decoded(bytes: &[u8], absmax: &[f32], codebook: &[f32; 16], blocksize: usize, numel: usize) -> Vec<bf16> {
    (0..numel)
        .map(|f| {
            let code = if f % 2 == 0 { bytes[f / 2] >> 4 } else { bytes[f / 2] & 15 };
            bf16::from_f32(codebook[code as usize] * absmax[f / blocksize])
        })
        .collect()
}

/// 4-bit panels equal the panels of the decoded dense weight word for word (both orientations, blocks that
/// straddle rows, odd widths), and so do the products.
#[test]
fn four_bit_panels_equal_the_panels_of_the_decoded_weight() {
    let mut rng = Rng::fresh("4-bit");
    for &(rows, cols, blocksize) in
        &[(32, 64, 64), (45, 70, 64), (33, 31, 6), (7, 130, 2), (100, 576, 64), (3, 5, 4096)]
    {
        let (bytes, absmax, codebook) = weight(&mut rng, rows, cols, blocksize);
        let dense = decoded(&bytes, &absmax, &codebook, blocksize, rows * cols);
        for transposed in [true, false] {
            let packed =
                Packed4bit::new(&bytes, &absmax, &codebook, blocksize, rows, cols, transposed).expect("consistent");
            let (k, n, layout) =
                if transposed { (cols, rows, DenseLayout::NByK) } else { (rows, cols, DenseLayout::KByN) };
            let plain = Dense::new(&dense, k, n, layout).expect("k · n");
            assert_eq!((packed.k(), packed.n()), (k, n));
            let len = k.div_ceil(2) * NR;
            for n0 in (0..n).step_by(NR) {
                let (mut p, mut d) = (vec![7u32; len], vec![9u32; len]);
                packed.pack(n0, &mut p);
                plain.pack(n0, &mut d);
                assert_eq!(p, d, "{rows}×{cols} bs {blocksize} transposed {transposed} panel {n0}");
            }
            let m = 19;
            let a = rng.values(m * k);
            for accel in kernels() {
                let got: Vec<f32> = matmul_with(&a, m, &packed, accel);
                let want: Vec<f32> = matmul_with(&a, m, &plain, accel);
                assert_eq!(got, want, "{rows}×{cols} transposed {transposed}");
            }
        }
    }
    assert!(Packed4bit::new(&[0; 2], &[1.0], &[0.0; 16], 3, 2, 2, true).is_none(), "odd blocksize");
    assert!(Packed4bit::new(&[0; 1], &[1.0], &[0.0; 16], 64, 2, 2, true).is_none(), "too few bytes");
    assert!(Dense::new(&[bf16::ZERO; 5], 2, 3, DenseLayout::KByN).is_none());
}

/// The f32 kernel on 4-bit panels: each panel holds the f32 dequantized values (codebook · absmax), and
/// the product equals the f64 product of those values (both orientations, odd shapes, both kernels).
#[test]
fn f32_products_of_four_bit_panels_equal_the_f64_product() {
    let mut rng = Rng::fresh("f32 4-bit");
    let kernels: Vec<bool> = if accelerated_f32() { vec![false, true] } else { vec![false] };
    for &(rows, cols, blocksize) in &[(45, 70, 64), (33, 31, 6), (100, 576, 64), (7, 130, 2)] {
        let (bytes, absmax, codebook) = weight(&mut rng, rows, cols, blocksize);
        let dense: Vec<f32> = (0..rows * cols)
            .map(|f| {
                codebook[(if f % 2 == 0 { bytes[f / 2] >> 4 } else { bytes[f / 2] & 15 }) as usize]
                    * absmax[f / blocksize]
            })
            .collect();
        for transposed in [true, false] {
            let packed =
                Packed4bit::new(&bytes, &absmax, &codebook, blocksize, rows, cols, transposed).expect("consistent");
            let (k, n) = (packed.k(), packed.n());
            let b = |kk: usize, j: usize| if transposed { dense[j * cols + kk] } else { dense[kk * cols + j] };
            for n0 in (0..n).step_by(NR) {
                let mut panel = vec![f32::NAN; k * NR];
                packed.pack_f32(n0, &mut panel);
                for kk in 0..k {
                    for j in 0..NR {
                        let want = if n0 + j < n { b(kk, n0 + j) } else { 0.0 };
                        assert_eq!(panel[kk * NR + j], want, "{rows}×{cols} transposed {transposed} panel {n0}");
                    }
                }
            }
            let m = 17;
            let a: Vec<f32> = (0..m * k).map(|_| rng.uniform() * 2.0).collect();
            let (want, scale) = {
                let mut out = vec![0.0f64; m * n];
                let mut scale = vec![0.0f64; m * n];
                for i in 0..m {
                    for j in 0..n {
                        for kk in 0..k {
                            let p = a[i * k + kk] as f64 * b(kk, j) as f64;
                            out[i * n + j] += p;
                            scale[i * n + j] += p.abs();
                        }
                    }
                }
                (out, scale)
            };
            for &accel in &kernels {
                let got = matmul_f32_with(&a, m, &packed, accel);
                for (idx, ((g, w), s)) in got.iter().zip(&want).zip(&scale).enumerate() {
                    let tol = 4.0 * (k as f64 + 2.0) * f32::EPSILON as f64 * s + 1e-30;
                    assert!(
                        (*g as f64 - w).abs() <= tol,
                        "{rows}×{cols} transposed {transposed} accelerated {accel}: element {idx}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
