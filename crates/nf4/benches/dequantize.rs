//! Dequantize throughput against a plain memcpy of the output size.
//!
//! `cargo bench -p qlora-nf4 --bench dequantize` — a Llama-7B-sized projection (4096 × 4096), NF4 with
//! double quantization at blocksize 64, dequantized to f32 and to bf16. Throughput is counted in output
//! bytes, the same bytes the memcpy baseline moves. RAYON_NUM_THREADS sets the thread count.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use nf4::QuantType;
use std::hint::black_box;

const ROWS: usize = 4096;
const COLS: usize = 4096;

fn weights() -> Vec<f32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..ROWS * COLS)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * 0.04
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let n = ROWS * COLS;
    let q = nf4::quantize(&weights(), 64, QuantType::Nf4, true).unwrap();
    let absmax = q.absmax.to_f32().unwrap().into_owned();
    let mut group = c.benchmark_group(format!("dequantize_nf4_dq_{ROWS}x{COLS}"));
    group.sample_size(20);

    group.throughput(Throughput::Bytes((n * 4) as u64));
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    group.bench_function(BenchmarkId::new("memcpy", "f32"), |b| b.iter(|| dst.copy_from_slice(black_box(&src))));
    group.bench_function(BenchmarkId::new("dequantize", "f32"), |b| {
        b.iter(|| nf4::dequantize_4bit_into(black_box(&q.packed), &absmax, 64, QuantType::Nf4, &mut dst).unwrap())
    });
    group.bench_function(BenchmarkId::new("dequantize_incl_absmax_decode", "f32"), |b| b.iter(|| q.dequantize_into(&mut dst).unwrap()));

    group.throughput(Throughput::Bytes((n * 2) as u64));
    let src16 = vec![bf16::ONE; n];
    let mut dst16 = vec![bf16::ZERO; n];
    group.bench_function(BenchmarkId::new("memcpy", "bf16"), |b| b.iter(|| dst16.copy_from_slice(black_box(&src16))));
    group.bench_function(BenchmarkId::new("dequantize", "bf16"), |b| {
        b.iter(|| nf4::dequantize_4bit_into(black_box(&q.packed), &absmax, 64, QuantType::Nf4, &mut dst16).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
