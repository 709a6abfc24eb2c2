//! The llama crate against transformers 5.24 on the CPU (fixtures: `tests/fixtures/llama`, made by
//! `xtask/fixtures/make_llama_fixtures.py`): logits, greedy tokens, the KV cache.

use std::path::PathBuf;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use llama::generate::{generate, SamplingConfig};
use llama::{load_hf, LlamaModel, LoadOptions};
use quant::QuantConfig;

use crate::fixture::Fixture;

fn dir(name: &str) -> PathBuf {
    let llama = qlora_tests::fixtures_dir().join("llama").join(name);
    if llama.exists() { llama } else { qlora_tests::fixtures_dir().join(name) }
}

fn reference(name: &str) -> Fixture {
    Fixture::open(&qlora_tests::fixtures_dir().join("llama").join(format!("{name}.logits.safetensors")))
}

fn ids_of(f: &Fixture, key: &str) -> (Vec<i64>, Vec<usize>) {
    let raw = f.raw(key);
    let ids: Vec<i64> = raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    let n = ids.len();
    (ids, vec![n])
}

/// Max |ours - transformers| over all logits of the fixture's two prompt rows.
fn logits_diff(model: &LlamaModel, reference: &Fixture) -> f32 {
    let (ids, _) = ids_of(reference, "input_ids");
    let t = ids.len() / 2;
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, t]), &model.device());
    let ours: Vec<f32> = model.forward(input, None).cast(DType::F32).into_data().try_into_vec().unwrap();
    let theirs = reference.f32("logits");
    assert_eq!(ours.len(), theirs.len());
    ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

fn load(name: &str, options: &LoadOptions) -> LlamaModel {
    load_hf(&dir(name), options, &Device::flex()).unwrap_or_else(|e| panic!("{name}: {e}")).1
}

#[test]
fn f32_logits_match_transformers() {
    for name in ["tiny-llama-f32", "tiny-llama-tied", "tiny-qwen2", "tiny-llama3-scaled"] {
        let model = load(name, &LoadOptions::default());
        let diff = logits_diff(&model, &reference(name));
        println!("{name}: max |logits - transformers| = {diff:e}");
        assert!(diff < 1e-4, "{name}: {diff}");
    }
}

#[test]
fn bnb_nf4_checkpoint_logits_match_transformers_bitsandbytes() {
    let model = load("tiny-llama-bnb-nf4-dq", &LoadOptions::default());
    assert!(model.layers[0].self_attn.q_proj.is_quantized(), "a 4-bit checkpoint stays 4-bit");
    let reference = reference("tiny-llama-bnb-nf4-dq");
    let diff = logits_diff(&model, &reference);
    println!("bnb nf4 checkpoint: max diff {diff:e}");
    assert!(diff < 1e-4, "{diff}");
    // Quantizing the f32 checkpoint on load gives the same weights, so the same logits.
    let on_load = load("tiny-llama-f32", &LoadOptions { quant: Some(QuantConfig::new()), ..Default::default() });
    let diff = logits_diff(&on_load, &reference);
    println!("nf4 quantized on load: max diff {diff:e}");
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn bf16_logits_match_transformers_bf16() {
    let model = load("tiny-llama-bf16", &LoadOptions { dtype: DType::BF16, quant: None });
    let diff = logits_diff(&model, &reference("tiny-llama-bf16"));
    println!("bf16: max |logits - transformers bf16| = {diff:e}");
    assert!(diff < 1e-2, "{diff}");
}

#[test]
fn greedy_tokens_match_transformers_and_the_cache_changes_nothing() {
    for name in ["tiny-llama-f32", "tiny-qwen2", "tiny-llama3-scaled"] {
        let model = load(name, &LoadOptions::default());
        let reference = reference(name);
        let (ids, _) = ids_of(&reference, "input_ids");
        let prompt: Vec<u32> = ids[..ids.len() / 2].iter().map(|&i| i as u32).collect();
        let (expected, _) = ids_of(&reference, "greedy_ids");
        let config = SamplingConfig::new().with_max_new_tokens(10);
        let (cached, _) = generate(&model, &prompt, &config, &[], |_| true).unwrap();
        let (recomputed, _) = generate(&model, &prompt, &config.clone().with_no_cache(true), &[], |_| true).unwrap();
        let expected: Vec<u32> = expected.iter().map(|&i| i as u32).collect();
        assert_eq!(cached, expected, "{name}: greedy tokens with the KV cache");
        assert_eq!(recomputed, expected, "{name}: greedy tokens recomputing the sequence");
    }
}
