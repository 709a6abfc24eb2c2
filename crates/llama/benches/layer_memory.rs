//! Memory of a QLoRA decoder layer between forward and backward.
//!
//! `cargo bench -p qlora-llama --bench layer_memory` builds one Llama-7B-shaped decoder layer (hidden 4096,
//! 32 heads, MLP 11008) with random weights, once as NF4 + double quant and once dense bf16, puts LoRA
//! (r = 64, all seven projections) on it, runs a forward on `[1, 256, 4096]` under autodiff and counts the
//! bytes the process holds (a counting global allocator) before the forward, between forward and backward,
//! and at the backward's peak. If a dequantized copy of any weight survived the forward, the NF4 layer would
//! hold at least 4 bytes × its largest matrix (180 MB) more than the bf16 one.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::{Bool, DType, Device, Distribution, Tensor, TensorData};
use llama::{AttentionConfig, DecoderLayer, DecoderLayerConfig, LlamaConfig, MlpConfig, Rotary};
use lora::LoraConfig;

mod common;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const HIDDEN: usize = 4096;
const MLP: usize = 11008;
const HEADS: usize = 32;
const TOKENS: usize = 256;

/// One Llama-7B-shaped decoder layer built by its config; the bytes of its frozen weights.
fn layer(nf4: bool, dtype: DType, device: &Device) -> (DecoderLayer, usize) {
    let weights = common::SeededWeights::new(device, nf4, dtype, 0.04);
    let attention = AttentionConfig::new(HIDDEN, HEADS, HEADS, HIDDEN / HEADS);
    let layer = DecoderLayerConfig::new(attention, MlpConfig::new(HIDDEN, MLP)).init_with(&weights, "layer").unwrap();
    (layer, weights.bytes.get())
}

fn mib(b: usize) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn measure(nf4: bool, dtype: DType) {
    let device = Device::flex().autodiff();
    let (mut layer, weight_bytes) = layer(nf4, dtype, &device);
    let lora = LoraConfig::new().with_r(64).with_dropout(0.0);
    for (name, l) in [
        ("q", &mut layer.self_attn.q_proj),
        ("k", &mut layer.self_attn.k_proj),
        ("v", &mut layer.self_attn.v_proj),
        ("o", &mut layer.self_attn.o_proj),
        ("gate", &mut layer.mlp.gate_proj),
        ("up", &mut layer.mlp.up_proj),
        ("down", &mut layer.mlp.down_proj),
    ] {
        l.adapter = Some(lora.init_adapter(name, l.in_features(), l.out_features(), &device).unwrap());
    }
    let config =
        LlamaConfig::new().with_hidden_size(HIDDEN).with_num_attention_heads(HEADS).with_num_key_value_heads(HEADS);
    let rotary = Rotary::new(&config);
    let (cos, sin) = rotary.tables(0, TOKENS, dtype, &device);
    let mask_values: Vec<bool> = (0..TOKENS).flat_map(|i| (0..TOKENS).map(move |j| j > i)).collect();
    let mask = Tensor::<2, Bool>::from_data(TensorData::new(mask_values, [TOKENS, TOKENS]), &device);
    let x =
        Tensor::<3>::random([1, TOKENS, HIDDEN], Distribution::Normal(0.0, 1.0), &device).cast(dtype).require_grad();
    let before = LIVE.load(Ordering::Relaxed);
    let y = layer.forward(x.clone(), &cos, &sin, &mask, None);
    let between = LIVE.load(Ordering::Relaxed);
    PEAK.store(between, Ordering::Relaxed);
    let grads = y.sum().backward();
    let peak = PEAK.load(Ordering::Relaxed);
    drop(grads);
    println!(
        "| {} | {} | {} | {} | {} |",
        match (nf4, dtype) {
            (true, _) => "NF4 + DQ (f32 compute)",
            (false, DType::F32) => "dense f32 (f32 compute)",
            _ => "dense bf16 (bf16 compute)",
        },
        mib(weight_bytes),
        mib(before),
        mib(between - before),
        mib(peak - before)
    );
}

fn main() {
    println!("Llama-7B decoder layer, LoRA r=64 on all 7 projections, input [1, {TOKENS}, {HIDDEN}], flex backend");
    println!(
        "| base | weight bytes | live before forward | held between forward and backward | backward peak above the start |"
    );
    println!("|---|---|---|---|---|");
    measure(true, DType::F32);
    measure(false, DType::F32);
    measure(false, DType::BF16);
}
