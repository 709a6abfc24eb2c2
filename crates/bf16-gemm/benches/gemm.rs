//! bf16-gemm at SmolLM2's QLoRA shapes (4 × 256 tokens): GFLOP/s of the 4-bit products (`x·Wᵀ`, `dy·W`)
//! in bf16 and in f32 (AVX-512 FMA kernel, same panels decoded to f32), and of dense bf16 products (lm_head
//! chunk, LoRA products).
//! `cargo bench -p qlora-bf16-gemm --bench gemm` (criterion prints elements/s = FLOP/s).

use bf16_gemm::{Dense, DenseLayout, Packed4bit, PanelSource, matmul, matmul_f32};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;

fn values(len: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("bf16_gemm");
    group.sample_size(20);
    println!("accelerated: {}", bf16_gemm::accelerated());
    let codebook: [f32; 16] = std::array::from_fn(|i| i as f32 / 8.0 - 1.0);
    for &(m, rows, cols, transposed, name) in &[
        (1024, 1536, 576, true, "x·Wᵀ 4-bit 1024×576→1536"),
        (1024, 1536, 576, false, "dy·W 4-bit 1024×1536→576"),
        (1024, 576, 576, true, "x·Wᵀ 4-bit 1024×576→576"),
        (1024, 192, 576, true, "x·Wᵀ 4-bit 1024×576→192"),
    ] {
        let bytes: Vec<u8> = values(rows * cols / 2, 3).iter().map(|v| v.to_bits() as u8).collect();
        let absmax = vec![0.5f32; rows * cols / 64];
        let w = Packed4bit::new(&bytes, &absmax, &codebook, 64, rows, cols, transposed).unwrap();
        let a = values(m * w.k(), 1);
        group.throughput(Throughput::Elements((2 * m * w.k() * w.n()) as u64));
        group.bench_function(name, |b| b.iter(|| matmul::<bf16>(&a, m, &w)));
        let a32: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
        group.bench_function(format!("{name} (f32)"), |b| b.iter(|| matmul_f32(&a32, m, &w)));
    }
    for &(m, k, n, layout, name) in &[
        (256, 576, 8192, DenseLayout::NByK, "h·Eᵀ dense 256×576→8192"),
        (1024, 576, 64, DenseLayout::NByK, "x·Aᵀ dense 1024×576→64"),
        (1024, 64, 1536, DenseLayout::NByK, "h·Bᵀ dense 1024×64→1536"),
        (64, 1024, 576, DenseLayout::KByN, "dhᵀ·x dense 64×1024→576"),
    ] {
        let b_values = values(k * n, 2);
        let dense = Dense::new(&b_values, k, n, layout).unwrap();
        let a = values(m * k, 1);
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        group.bench_function(name, |b| b.iter(|| matmul::<bf16>(&a, m, &dense)));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
