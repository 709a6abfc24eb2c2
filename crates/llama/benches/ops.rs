//! The pieces of a QLoRA step on the CPU (flex backend), at SmolLM2-135M's shapes and 4 × 256 tokens.
//!
//! `cargo bench -p qlora-llama --bench ops` (or `cargo xtask bench --criterion`). Throughput is in FLOPs of
//! the matmuls (criterion's "elements" read as FLOP/s) so the QLoRA linear compares with the plain f32
//! matmul of the same shape on the same backend:
//! - `matmul_f32`: `x [1024, 576] · Wᵀ`, W `[1536, 576]` dense f32 (the gate projection);
//! - `qlora_linear/forward`: the same product from NF4 + DQ plus LoRA r 64 (dropout 0.05), no autodiff;
//! - `qlora_linear/forward_backward`: forward and backward under autodiff (input and LoRA gradients);
//! - `attention/forward_backward`: SmolLM2's grouped-query attention block (9 heads, 3 KV heads) with
//!   NF4 projections, forward and backward;
//! - `rms_norm/forward_backward`: RMSNorm of `[4, 256, 576]`.
//!
//! RAYON_NUM_THREADS sets the thread count.

use burn::tensor::DType;
use burn::tensor::{Bool, Device, Distribution, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use llama::{AttentionConfig, FrozenWeights, LlamaConfig, RmsNormConfig, Rotary};
use lora::{LoraConfig, LoraLinear};

mod common;

const TOKENS: usize = 1024;
const BATCH: usize = 4;
const HIDDEN: usize = 576;
const MLP: usize = 1536;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;

/// LoRA r 64 (dropout 0.05) on a frozen layer.
fn with_adapter(layer: &mut LoraLinear, name: &str, device: &Device) {
    layer.adapter =
        Some(LoraConfig::new().init_adapter(name, layer.in_features(), layer.out_features(), device).unwrap());
}

/// An NF4 + DQ linear `[rows, cols]` with LoRA.
fn qlora_linear(rows: usize, cols: usize, name: &str, device: &Device) -> LoraLinear {
    let weights = common::SeededWeights::new(device, true, DType::F32, 0.08);
    let mut layer = LoraLinear::frozen(weights.linear(name, rows, cols, false).unwrap());
    with_adapter(&mut layer, name, device);
    layer
}

fn bench(c: &mut Criterion) {
    let flops = (2 * TOKENS * HIDDEN * MLP) as u64;
    let lora_flops = (2 * TOKENS * 64 * (HIDDEN + MLP)) as u64;

    let mut group = c.benchmark_group("linear_1024x576_to_1536");
    group.sample_size(10);
    let cpu = Device::flex();
    let x = Tensor::<2>::random([TOKENS, HIDDEN], Distribution::Normal(0.0, 1.0), &cpu);
    let dense = common::SeededWeights::new(&cpu, false, DType::F32, 0.08);
    // Stored as Wᵀ `[in, out]`: the product is x · Wᵀ.
    let lora::BaseWeight::Dense(w) = dense.linear("gate_proj", MLP, HIDDEN, false).unwrap().weight else {
        unreachable!("dense")
    };
    group.throughput(Throughput::Elements(flops));
    group.bench_function("matmul_f32", |b| b.iter(|| x.clone().matmul(w.clone()).into_data()));

    let layer = qlora_linear(MLP, HIDDEN, "gate_proj", &cpu);
    group.throughput(Throughput::Elements(flops + lora_flops));
    group.bench_function("qlora_forward", |b| b.iter(|| layer.forward(x.clone()).into_data()));

    let ad = cpu.clone().autodiff();
    let layer = qlora_linear(MLP, HIDDEN, "gate_proj", &ad);
    let xa = Tensor::<2>::random([TOKENS, HIDDEN], Distribution::Normal(0.0, 1.0), &ad).require_grad();
    // forward, input gradient (same size as the forward) and the LoRA gradients (twice the LoRA forward)
    group.throughput(Throughput::Elements(2 * flops + 3 * lora_flops));
    group.bench_function("qlora_forward_backward", |b| {
        b.iter(|| {
            let g = layer.forward(xa.clone()).sum().backward();
            xa.grad(&g).unwrap().into_data()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("attention_smollm2_4x256");
    group.sample_size(10);
    let head_dim = HIDDEN / HEADS;
    let weights = common::SeededWeights::new(&ad, true, DType::F32, 0.08);
    let mut attn = AttentionConfig::new(HIDDEN, HEADS, KV_HEADS, head_dim).init_with(&weights, "attn").unwrap();
    for (name, l) in [
        ("q_proj", &mut attn.q_proj),
        ("k_proj", &mut attn.k_proj),
        ("v_proj", &mut attn.v_proj),
        ("o_proj", &mut attn.o_proj),
    ] {
        with_adapter(l, name, &ad);
    }
    let seq = TOKENS / BATCH;
    let config =
        LlamaConfig::new().with_hidden_size(HIDDEN).with_num_attention_heads(HEADS).with_num_key_value_heads(KV_HEADS);
    let (cos, sin) = Rotary::new(&config).tables(0, seq, burn::tensor::DType::F32, &ad);
    let mask_values: Vec<bool> = (0..seq).flat_map(|i| (0..seq).map(move |j| j > i)).collect();
    let mask = Tensor::<2, Bool>::from_data(TensorData::new(mask_values, [seq, seq]), &ad);
    let x3 = Tensor::<3>::random([BATCH, seq, HIDDEN], Distribution::Normal(0.0, 1.0), &ad).require_grad();
    group.bench_function("forward_backward", |b| {
        b.iter(|| {
            let g = attn.forward(x3.clone(), &cos, &sin, &mask, None).sum().backward();
            x3.grad(&g).unwrap().into_data()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("rms_norm_4x256x576");
    group.sample_size(20);
    let norm = RmsNormConfig::new(HIDDEN).init(&ad);
    group.throughput(Throughput::Bytes((TOKENS * HIDDEN * 4) as u64));
    group.bench_function("forward_backward", |b| {
        b.iter(|| {
            let g = norm.forward(x3.clone()).sum().backward();
            x3.grad(&g).unwrap().into_data()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
