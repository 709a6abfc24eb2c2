//! The CUDA check and benchmark of the QLoRA kernels (`cargo xtask gpu-check` builds it; run
//! `target/gpu-check/run.sh` on a machine with an NVIDIA GPU). Two parts:
//! 1. correctness: every kernel against the CPU reference on random inputs (seed printed), ragged shapes,
//!    all dtypes, outputs poisoned first;
//! 2. benchmarks at Llama-7B shapes: dequantize GB/s against the measured device copy bandwidth, the fused
//!    dequantize-matmul against burn's dense bf16 matmul of the same shape, and for small batches the
//!    streaming GEMV against dequantize-then-matmul.
//!
//! Prints one markdown table and writes it to `$OUT/gpu-check.md` (or `./gpu-check.md`).

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cubecl::prelude::*;
use cubecl::server::Handle;
use nf4::QuantType;
use qlora_kernels::check::{Rng, poison};
use qlora_kernels::dequant::{DequantStores, DeviceDense, dequantize, dequantize_into, dequantize_into_with};
use qlora_kernels::matmul::{Product, fused_matmul_into, gemv_into, reference_product};
use qlora_kernels::quantize::quantize;
use qlora_kernels::{DeviceKind, DeviceWeight4bit, FloatDtype, client_for, upload_as};

#[cube(launch_unchecked)]
fn copy_kernel(input: &[u32], out: &mut [u32], quarter: usize) {
    let i = ABSOLUTE_POS;
    if i < quarter {
        #[unroll]
        for k in 0..4usize {
            out[i + k * quarter] = input[i + k * quarter];
        }
    }
}

fn sync(client: &Client) -> Result<()> {
    cubecl::future::block_on(client.sync()).map_err(|e| anyhow::anyhow!("device sync: {e:?}"))
}

/// Mean seconds per call after one warm-up call.
fn time_it(client: &Client, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    sync(client)?;
    let start = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    sync(client)?;
    Ok(start.elapsed().as_secs_f64() / iters as f64)
}

fn read_act(client: &Client, handle: Handle, n: usize, dtype: FloatDtype) -> Result<Vec<f32>> {
    let bytes = client.read_one(handle).map_err(|e| anyhow::anyhow!("read: {e:?}"))?;
    Ok(match dtype {
        FloatDtype::F32 => bytemuck::cast_slice::<u8, f32>(&bytes[..n * 4]).to_vec(),
        FloatDtype::Bf16 => {
            bytes[..n * 2].chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        FloatDtype::F16 => bytes[..n * 2].chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    })
}

struct Checks {
    lines: Vec<String>,
    failures: usize,
}

impl Checks {
    fn record(&mut self, ok: bool, what: String) {
        println!("{} {what}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            self.failures += 1;
        }
        self.lines.push(format!("| {} | {what} |", if ok { "ok" } else { "**FAIL**" }));
    }
}

fn check_dequant(
    client: &Client,
    checks: &mut Checks,
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    bs: usize,
    qt: QuantType,
    dq: bool,
) -> Result<()> {
    let w = rng.normals(rows * cols, 0.02);
    let q = nf4::quantize(&w, bs, qt, dq)?;
    let weight = DeviceWeight4bit::upload(client, &q, [rows, cols])?;
    for (dtype, stores) in [FloatDtype::F32, FloatDtype::Bf16, FloatDtype::F16]
        .into_iter()
        .flat_map(|d| [(d, DequantStores::Word), (d, DequantStores::Wide)])
    {
        let out = poison(client, q.numel.div_ceil(2) * 2 * dtype.size_in_bytes());
        dequantize_into_with(client, &weight, dtype, &out, stores)?;
        let dense = DeviceDense { handle: out, numel: q.numel, dtype };
        let mismatches = match dtype {
            FloatDtype::F32 => {
                let got = dense.to_f32(client)?;
                let want: Vec<f32> = q.dequantize()?;
                got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count()
            }
            FloatDtype::Bf16 => {
                let want: Vec<u16> = q.dequantize::<half::bf16>()?.iter().map(|v| v.to_bits()).collect();
                dense.to_bits16(client)?.iter().zip(&want).filter(|(a, b)| a != b).count()
            }
            FloatDtype::F16 => {
                let want: Vec<u16> = q.dequantize::<half::f16>()?.iter().map(|v| v.to_bits()).collect();
                dense.to_bits16(client)?.iter().zip(&want).filter(|(a, b)| a != b).count()
            }
        };
        checks.record(mismatches == 0, format!("dequantize {rows}×{cols} bs {bs} {qt:?} dq={dq} → {dtype:?} ({stores:?} stores): {mismatches} of {} elements differ from the CPU reference (bit-exact required)", q.numel));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn check_product(
    client: &Client,
    checks: &mut Checks,
    rng: &mut Rng,
    m: usize,
    rows: usize,
    cols: usize,
    dq: bool,
    product: Product,
    dtype: FloatDtype,
    use_gemv: bool,
) -> Result<()> {
    let w = rng.normals(rows * cols, 0.02);
    let q = nf4::quantize(&w, 64, QuantType::Nf4, dq)?;
    let weight = DeviceWeight4bit::upload(client, &q, [rows, cols])?;
    let (r_size, p_size) = if product == Product::Forward { (cols, rows) } else { (rows, cols) };
    let (a, a_rounded) = upload_as(client, &rng.normals(m * r_size, 1.0), dtype);
    let out = poison(client, m * p_size * dtype.size_in_bytes());
    if use_gemv {
        gemv_into(client, &a, m, &weight, dtype, &out)?;
    } else {
        fused_matmul_into(client, &a, m, &weight, product, dtype, &out)?;
    }
    let got = read_act(client, out, m * p_size, dtype)?;
    let (want, magnitude) = reference_product(&a_rounded, m, &q.dequantize::<f32>()?, [rows, cols], product);
    let rounding = if dtype == FloatDtype::F32 { 0.0 } else { 1.0 / 128.0 };
    // The tensor-core path rounds the decoded W to the activation type (as dequantize-then-matmul does).
    let w_rounding = match dtype {
        FloatDtype::Bf16 if !use_gemv => 1.0 / 256.0,
        FloatDtype::F16 if !use_gemv => 1.0 / 2048.0,
        _ => 0.0,
    };
    let mut worst = 0.0f64;
    for i in 0..got.len() {
        let err = (got[i] as f64 - want[i] as f64).abs();
        let bound = (4e-6 + w_rounding) * magnitude[i] + rounding * (want[i] as f64).abs() + 1e-30;
        worst = worst.max(err / bound);
    }
    let name = if use_gemv {
        "gemv"
    } else if qlora_kernels::matmul::has_tensor_cores(client, dtype) {
        "fused matmul (tensor cores)"
    } else {
        "fused matmul"
    };
    checks.record(worst <= 1.0, format!("{name} {product:?} m {m}, W {rows}×{cols}, dq={dq}, {dtype:?}: worst error {worst:.3} of its bound (≤ 1 required)"));
    Ok(())
}

fn check_quantize(
    client: &Client,
    checks: &mut Checks,
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    dtype: FloatDtype,
) -> Result<()> {
    let values = rng.normals(rows * cols, 0.02);
    let (input, rounded) = upload_as(client, &values, dtype);
    let want = nf4::quantize(&rounded, 64, QuantType::Nf4, true)?;
    let got = quantize(client, &input, dtype, [rows, cols], 64, QuantType::Nf4, true)?;
    let packed = client.read_one(got.packed.clone()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let code_diff = packed[..want.packed.len()].iter().zip(&want.packed).filter(|(a, b)| a != b).count();
    let nf4::Absmax::Double(dq) = &want.absmax else { bail!("expected double quant") };
    let codes = client.read_one(got.absmax.clone()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let absmax_diff = codes[..dq.codes.len()].iter().zip(&dq.codes).filter(|(a, b)| a != b).count();
    let ok = code_diff == 0 && absmax_diff == 0 && got.offset.to_bits() == dq.offset.to_bits();
    checks.record(ok, format!("quantize {rows}×{cols} {dtype:?} → NF4+DQ: {code_diff} code bytes, {absmax_diff} absmax codes differ from bitsandbytes' algorithm (nf4 crate)"));
    Ok(())
}

fn check_adamw(client: &Client, checks: &mut Checks, rng: &mut Rng) -> Result<()> {
    use adamw_rules::UpdateRule;
    use adamw_rules::update::{AdamHyper, Blockwise8Mut, adamw_bnb8, adamw_torch};
    use adamw_rules::{PageDevice, PageState, StateFormat};
    let n = 1 << 20;
    let mut device = qlora_kernels::adamw::DevicePages::new(client.clone());
    let init = rng.normals(n, 1.0);
    let (mut p_host, mut p_dev) = (init.clone(), init.clone());
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    let mut page = device.upload(PageState::zeros(StateFormat::F32, n));
    let mut p8_host = init.clone();
    let mut p8_dev = init;
    let PageState::Blockwise8 { mut codes1, mut absmax1, mut codes2, mut absmax2 } =
        PageState::zeros(StateFormat::Blockwise8, n)
    else {
        bail!("format")
    };
    let mut page8 = device.upload(PageState::zeros(StateFormat::Blockwise8, n));
    for step in 1..=5 {
        let grad = rng.normals(n, 0.1);
        let h = AdamHyper { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step };
        adamw_torch(&mut p_host, &grad, &mut m, &mut v, &h);
        device.update(&mut page, UpdateRule::TorchAdamW, &mut p_dev, &grad, 0..n, &h);
        let state =
            Blockwise8Mut { codes1: &mut codes1, absmax1: &mut absmax1, codes2: &mut codes2, absmax2: &mut absmax2 };
        adamw_bnb8(
            &mut p8_host,
            &grad,
            state,
            adamw_rules::codebooks::signed(),
            adamw_rules::codebooks::unsigned(),
            &h,
        );
        device.update(&mut page8, UpdateRule::Bnb8, &mut p8_dev, &grad, 0..n, &h);
    }
    if let Some(e) = device.take_error() {
        bail!("optimizer update: {e}");
    }
    let PageState::F32 { exp_avg, exp_avg_sq } = device.download(page) else { bail!("format") };
    let moment_diff = exp_avg.iter().zip(&m).filter(|(a, b)| a.to_bits() != b.to_bits()).count()
        + exp_avg_sq.iter().zip(&v).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    let param_diff = p_dev.iter().zip(&p_host).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    checks.record(moment_diff == 0 && param_diff == 0, format!("AdamW 32-bit (torch rule), 2^20 params × 5 steps: {moment_diff} moment values differ, {param_diff} parameters differ"));
    let PageState::Blockwise8 { codes1: d1, absmax1: a1, codes2: d2, absmax2: a2 } = device.download(page8) else {
        bail!("format")
    };
    let code_diff =
        d1.iter().zip(&codes1).filter(|(a, b)| a != b).count() + d2.iter().zip(&codes2).filter(|(a, b)| a != b).count();
    let absmax_diff = a1.iter().zip(&absmax1).filter(|(a, b)| a.to_bits() != b.to_bits()).count()
        + a2.iter().zip(&absmax2).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    let param_diff = p8_dev.iter().zip(&p8_host).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    checks.record(
        code_diff == 0 && absmax_diff == 0 && param_diff == 0,
        format!("AdamW 8-bit blockwise, 2^20 params × 5 steps: {code_diff} state codes, {absmax_diff} absmax, {param_diff} parameters differ"),
    );
    Ok(())
}

/// burn's dense bf16 matmul `[m, k] · [k, n]` on the CUDA device: seconds per call.
fn burn_dense_bf16(m: usize, k: usize, n: usize, iters: usize) -> Result<f64> {
    use burn::tensor::{DType, Device, Distribution, Tensor};
    let device = Device::cuda(0);
    let a = Tensor::<2>::random([m, k], Distribution::Default, (&device, DType::BF16));
    let b = Tensor::<2>::random([k, n], Distribution::Default, (&device, DType::BF16));
    for _ in 0..3 {
        let _ = a.clone().matmul(b.clone());
    }
    device.sync().map_err(|e| anyhow::anyhow!("burn sync: {e:?}"))?;
    let start = Instant::now();
    for _ in 0..iters {
        let _ = a.clone().matmul(b.clone());
    }
    device.sync().map_err(|e| anyhow::anyhow!("burn sync: {e:?}"))?;
    Ok(start.elapsed().as_secs_f64() / iters as f64)
}

fn main() -> Result<()> {
    let client = client_for(DeviceKind::Cuda(0)).context("opening CUDA device 0")?;
    let mut rng = Rng::from_env("gpu-check");
    let seed = rng.seed;
    let mut report = String::new();
    writeln!(report, "device: {:?}, seed {seed}", client.name())?;

    // 1. Correctness.
    let mut checks = Checks { lines: vec![], failures: 0 };
    let t = Instant::now();
    for (rows, cols, bs) in [(3, 37, 64), (17, 515, 32), (300, 97, 256), (4096, 4096, 64), (11008, 4096, 64)] {
        for (qt, dq) in [(QuantType::Nf4, true), (QuantType::Nf4, false), (QuantType::Fp4, true)] {
            if rows * cols > 1 << 20 && qt == QuantType::Fp4 {
                continue;
            }
            check_dequant(&client, &mut checks, &mut rng, rows, cols, bs, qt, dq)?;
        }
    }
    for dtype in [FloatDtype::F32, FloatDtype::Bf16, FloatDtype::F16] {
        for (m, rows, cols) in [(7, 70, 130), (130, 129, 67), (8, 4096, 4096), (5, 11008, 4096)] {
            for product in [Product::Forward, Product::InputGrad] {
                check_product(&client, &mut checks, &mut rng, m, rows, cols, true, product, dtype, false)?;
            }
        }
        for (m, rows, cols) in [(1, 300, 515), (16, 4096, 4096), (3, 4096, 11008)] {
            check_product(&client, &mut checks, &mut rng, m, rows, cols, true, Product::Forward, dtype, true)?;
        }
    }
    for dtype in [FloatDtype::F32, FloatDtype::Bf16, FloatDtype::F16] {
        check_quantize(&client, &mut checks, &mut rng, 4096, 4096, dtype)?;
    }
    check_quantize(&client, &mut checks, &mut rng, 333, 515, FloatDtype::F32)?;
    check_adamw(&client, &mut checks, &mut rng)?;
    println!(
        "correctness: {} checks, {} failed ({:.1} s)",
        checks.lines.len(),
        checks.failures,
        t.elapsed().as_secs_f64()
    );

    // 2. Benchmarks.
    let mut bench = String::new();
    let copy_bytes = 1usize << 30;
    let words = copy_bytes / 4;
    let src = client.empty(copy_bytes);
    let dst = client.empty(copy_bytes);
    let dim = CubeDim::new_1d(256);
    let count = cubecl::calculate_cube_count_elemwise(&client, words / 4, dim);
    let copy_s = time_it(&client, 20, || {
        unsafe {
            copy_kernel::launch_unchecked(
                &client,
                count.clone(),
                dim,
                BufferArg::from_raw_parts(src.clone(), words),
                BufferArg::from_raw_parts(dst.clone(), words),
                words / 4,
            );
        }
        Ok(())
    })?;
    let copy_gbs = 2.0 * copy_bytes as f64 / copy_s / 1e9;
    writeln!(bench, "device copy (1 GiB read + 1 GiB write): {copy_gbs:.0} GB/s")?;
    writeln!(bench)?;
    writeln!(bench, "| weight [out×in] | stores | dequantize NF4+DQ → bf16 | GB/s | % of copy |")?;
    writeln!(bench, "|---|---|---|---|---|")?;
    let shapes = [(4096usize, 4096usize), (11008, 4096), (4096, 11008)];
    let mut weights = vec![];
    // A Llama-2-70B MLP weight as well: large enough that per-launch overhead vanishes.
    for &(rows, cols) in shapes.iter().chain(&[(28672usize, 8192usize)]) {
        let w = rng.normals(rows * cols, 0.02);
        let q = nf4::quantize(&w, 64, QuantType::Nf4, true)?;
        let weight = DeviceWeight4bit::upload(&client, &q, [rows, cols])?;
        let out = client.empty(rows * cols * 2);
        // Both kernels: 4-byte stores (one per unit per 2 values) and 16-byte stores (8 values).
        for stores in [DequantStores::Word, DequantStores::Wide] {
            let s =
                time_it(&client, 50, || Ok(dequantize_into_with(&client, &weight, FloatDtype::Bf16, &out, stores)?))?;
            let bytes = (rows * cols) as f64 * (0.5 + 2.0) + (rows * cols / 64) as f64;
            let gbs = bytes / s / 1e9;
            let pct = 100.0 * gbs / copy_gbs;
            writeln!(bench, "| {rows}×{cols} | {stores:?} | {:.1} µs | {gbs:.0} | {pct:.0}% |", s * 1e6)?;
        }
        if rows * cols <= 11008 * 4096 {
            weights.push((rows, cols, weight));
        }
    }
    writeln!(bench)?;
    writeln!(
        bench,
        "| M | weight [out×in] | ours fused (bf16) | burn dense bf16 | ours / dense | dequant + dense | speed-up of ours over dequant+dense |"
    )?;
    writeln!(bench, "|---|---|---|---|---|---|---|")?;
    for (rows, cols, weight) in &weights {
        let (rows, cols) = (*rows, *cols);
        let dense_out = client.empty(rows * cols * 2);
        let dequant_s = time_it(&client, 20, || Ok(dequantize_into(&client, weight, FloatDtype::Bf16, &dense_out)?))?;
        for m in [1usize, 16, 4096] {
            let (x, _) = upload_as(&client, &rng.normals(m * cols, 1.0), FloatDtype::Bf16);
            let y = client.empty(m * rows * 2);
            let iters = if m >= 4096 { 5 } else { 50 };
            let ours = time_it(&client, iters, || {
                if m <= 16 {
                    gemv_into(&client, &x, m, weight, FloatDtype::Bf16, &y)?;
                } else {
                    fused_matmul_into(&client, &x, m, weight, Product::Forward, FloatDtype::Bf16, &y)?;
                }
                Ok(())
            })?;
            let dense = burn_dense_bf16(m, cols, rows, iters)?;
            let flops = 2.0 * (m * rows * cols) as f64;
            writeln!(
                bench,
                "| {m} | {rows}×{cols} | {:.1} µs ({:.2} TFLOP/s) | {:.1} µs ({:.2} TFLOP/s) | {:.2}x | {:.1} µs | {:.2}x |",
                ours * 1e6,
                flops / ours / 1e12,
                dense * 1e6,
                flops / dense / 1e12,
                dense / ours,
                (dequant_s + dense) * 1e6,
                (dequant_s + dense) / ours
            )?;
        }
    }
    // The input-gradient product at the largest batch.
    writeln!(bench)?;
    for (rows, cols, weight) in &weights {
        let m = 4096;
        let (dy, _) = upload_as(&client, &rng.normals(m * rows, 1.0), FloatDtype::Bf16);
        let dx = client.empty(m * cols * 2);
        let s = time_it(&client, 5, || {
            Ok(fused_matmul_into(&client, &dy, m, weight, Product::InputGrad, FloatDtype::Bf16, &dx)?)
        })?;
        writeln!(
            bench,
            "input gradient dy·W, M {m}, W {rows}×{cols}: {:.1} µs ({:.2} TFLOP/s)",
            s * 1e6,
            2.0 * (m * rows * cols) as f64 / s / 1e12
        )?;
    }
    let _ = dequantize(&client, &weights[0].2, FloatDtype::F32)?;

    writeln!(
        report,
        "\n## Correctness ({} checks, {} failed)\n\n| result | check |\n|---|---|",
        checks.lines.len(),
        checks.failures
    )?;
    for line in &checks.lines {
        writeln!(report, "{line}")?;
    }
    writeln!(report, "\n## Benchmarks\n\n{bench}")?;
    println!("\n{bench}");
    let out_dir = std::env::var("OUT").unwrap_or_else(|_| ".".into());
    std::fs::write(std::path::Path::new(&out_dir).join("gpu-check.md"), &report)?;
    if checks.failures > 0 {
        bail!("{} correctness checks failed", checks.failures);
    }
    Ok(())
}
