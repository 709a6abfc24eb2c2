//! Dequantize throughput against a parallel copy of the same output.
//!
//! `cargo bench -p qlora-nf4 --bench dequantize` — a Llama-7B-sized projection (4096 × 4096), NF4 with
//! double quantization at blocksize 64, dequantized to f32 and to bf16.
//!
//! Like with like: for each output type the `copy` baseline writes exactly the bytes dequantize writes (n
//! elements of that type, copied from a source of the same type), on the same rayon pool, split into tasks
//! of the same size as dequantize's; every case reports throughput in those output bytes. Every case runs in
//! one pool whose thread count RAYON_NUM_THREADS sets (default: one per CPU); the group name records it.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;
use nf4::QuantType;
use rayon::prelude::*;
use std::hint::black_box;

const ROWS: usize = 4096;
const COLS: usize = 4096;
const BLOCKSIZE: usize = 64;
/// Elements per parallel task, as `dequantize_4bit_into` splits its output (1024 blocks a task).
const TASK_ELEMS: usize = 1024 * BLOCKSIZE;

fn weights() -> Vec<f32> {
    let mut rng = splitmix::SplitMix64(7);
    (0..ROWS * COLS).map(|_| (rng.unit_f32() - 0.5) * 0.04).collect()
}

/// The baseline: `dst = src` in dequantize's task size, on the current rayon pool.
fn par_copy<T: Copy + Send + Sync>(src: &[T], dst: &mut [T]) {
    dst.par_chunks_mut(TASK_ELEMS).zip(src.par_chunks(TASK_ELEMS)).for_each(|(d, s)| d.copy_from_slice(s));
}

fn bench(c: &mut Criterion) {
    let n = ROWS * COLS;
    let q = nf4::quantize(&weights(), BLOCKSIZE, QuantType::Nf4, true).unwrap();
    let absmax = q.absmax.to_f32().unwrap().into_owned();
    // Honours RAYON_NUM_THREADS, like the global pool the library uses outside benchmarks.
    let pool = rayon::ThreadPoolBuilder::new().build().expect("a rayon thread pool");
    let threads = pool.current_num_threads();
    let mut group = c.benchmark_group(format!("dequantize_nf4_dq_{ROWS}x{COLS}_{threads}threads"));
    group.sample_size(20);

    // f32 output: every case writes n * 4 bytes.
    group.throughput(Throughput::Bytes((n * size_of::<f32>()) as u64));
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    group.bench_function(BenchmarkId::new("copy", "f32"), |b| {
        b.iter(|| pool.install(|| par_copy(black_box(&src), black_box(&mut dst))))
    });
    group.bench_function(BenchmarkId::new("dequantize", "f32"), |b| {
        b.iter(|| {
            pool.install(|| {
                nf4::dequantize_4bit_into(black_box(&q.packed), &absmax, BLOCKSIZE, QuantType::Nf4, black_box(&mut dst))
                    .unwrap()
            })
        })
    });
    group.bench_function(BenchmarkId::new("dequantize_incl_absmax_decode", "f32"), |b| {
        b.iter(|| pool.install(|| black_box(&q).dequantize_into(black_box(&mut dst)).unwrap()))
    });

    // bf16 output: every case writes n * 2 bytes.
    group.throughput(Throughput::Bytes((n * size_of::<bf16>()) as u64));
    let src16 = vec![bf16::ONE; n];
    let mut dst16 = vec![bf16::ZERO; n];
    group.bench_function(BenchmarkId::new("copy", "bf16"), |b| {
        b.iter(|| pool.install(|| par_copy(black_box(&src16), black_box(&mut dst16))))
    });
    group.bench_function(BenchmarkId::new("dequantize", "bf16"), |b| {
        b.iter(|| {
            pool.install(|| {
                nf4::dequantize_4bit_into(
                    black_box(&q.packed),
                    &absmax,
                    BLOCKSIZE,
                    QuantType::Nf4,
                    black_box(&mut dst16),
                )
                .unwrap()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
