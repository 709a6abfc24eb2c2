//! The llama crate against transformers 5.24 on the CPU (fixtures: `tests/fixtures/llama`, made by
//! `xtask/fixtures/make_llama_fixtures.py`): logits, greedy tokens, the KV cache.

use std::path::PathBuf;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use llama::generate::{SamplingConfig, generate};
use llama::{LlamaModel, LoadOptions, load_hf};
use quant::QuantConfig;

use crate::fixture::Fixture;
use qlora_tests::max_abs_diff;

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
fn logits_diff(model: &LlamaModel, reference: &Fixture) -> f64 {
    let (ids, _) = ids_of(reference, "input_ids");
    let t = ids.len() / 2;
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, t]), &model.device());
    let ours: Vec<f32> = model.forward(input, None).cast(DType::F32).into_data().try_into_vec().unwrap();
    max_abs_diff(&ours, &reference.f32("logits"))
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
        // Measured 2.7e-7 (llama), 3.0e-7 (tied), 3.3e-7 (qwen2), 2.7e-7 (llama3-scaled); 3.6e-7 in docs/architecture.md.
        assert!(diff < 3e-6, "{name}: {diff}");
    }
}

#[test]
fn bnb_nf4_checkpoint_logits_match_transformers_bitsandbytes() {
    let model = load("tiny-llama-bnb-nf4-dq", &LoadOptions::default());
    assert!(model.layers[0].self_attn.q_proj.base.is_quantized(), "a 4-bit checkpoint stays 4-bit");
    let reference = reference("tiny-llama-bnb-nf4-dq");
    let diff = logits_diff(&model, &reference);
    println!("bnb nf4 checkpoint: max diff {diff:e}");
    assert!(diff < 3e-6, "{diff}"); // measured 2.7e-7 (3.0e-7 in docs/architecture.md)
    // Quantizing the f32 checkpoint on load gives the same weights, so the same logits.
    let on_load = load("tiny-llama-f32", &LoadOptions { quant: Some(QuantConfig::new()), ..Default::default() });
    let diff = logits_diff(&on_load, &reference);
    println!("nf4 quantized on load: max diff {diff:e}");
    assert!(diff < 3e-6, "{diff}"); // measured 2.7e-7
}

#[test]
fn bf16_logits_match_transformers_bf16() {
    let model = load("tiny-llama-bf16", &LoadOptions { dtype: DType::BF16, quant: None });
    let diff = logits_diff(&model, &reference("tiny-llama-bf16"));
    println!("bf16: max |logits - transformers bf16| = {diff:e}");
    assert!(diff < 1e-2, "{diff}"); // measured 3.9e-3 (4.2e-3 in docs/architecture.md)
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

/// Damaged checkpoints give errors that name the file and the tensor.
#[test]
fn bad_checkpoints_name_file_and_tensor() {
    use quant::bnb::StoredTensor;
    use quant::checkpoint::HfCheckpoint;
    let src = dir("tiny-llama-f32");
    let checkpoint = HfCheckpoint::open(&src).unwrap();
    type Values = (Vec<f32>, Vec<usize>);
    type Edit<'a> = &'a dyn Fn(&str, Vec<f32>, Vec<usize>) -> Option<Values>;
    let write = |edit: Edit| -> tempfile::TempDir {
        let out = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), out.path().join("config.json")).unwrap();
        let mut tensors = Vec::new();
        for name in checkpoint.names() {
            let (v, s) = checkpoint.tensor_f32(name).unwrap();
            if let Some((v, s)) = edit(name, v, s) {
                tensors.push((name.to_string(), StoredTensor::f32(s, &v)));
            }
        }
        let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.clone(), t)), None).unwrap();
        std::fs::write(out.path().join("model.safetensors"), bytes).unwrap();
        out
    };
    let err = |d: &tempfile::TempDir| {
        load_hf(d.path(), &LoadOptions::default(), &Device::flex()).expect_err("must fail").to_string()
    };

    let missing = write(&|name, v, s| (name != "model.layers.1.mlp.up_proj.weight").then_some((v, s)));
    let e = err(&missing);
    assert!(e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"), "{e}");

    let reshaped = write(&|name, v, s| {
        Some(if name == "model.layers.0.self_attn.k_proj.weight" {
            (v[..v.len() - 96].to_vec(), vec![s[0] - 1, s[1]])
        } else {
            (v, s)
        })
    });
    let e = err(&reshaped);
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.weight")
            && e.contains("model.safetensors")
            && e.contains("[32, 96]"),
        "{e}"
    );

    let bad_config = write(&|_, v, s| Some((v, s)));
    std::fs::write(bad_config.path().join("config.json"), r#"{"model_type": "llama", "hidden_size": 96}"#).unwrap();
    let e = err(&bad_config);
    assert!(e.contains("config.json") && e.contains("missing `num_attention_heads`"), "{e}");

    let truncated = write(&|_, v, s| Some((v, s)));
    let p = truncated.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&truncated);
    assert!(e.contains("model.safetensors"), "{e}");
}

/// `qlora forward` writes input_ids and logits that equal transformers' (through the library entry point).
#[test]
fn forward_command_writes_transformers_logits() {
    let loaded = train::infer::load_model(dir("tiny-llama-f32").to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert!(loaded.tokenizer.is_none());
    let reference = reference("tiny-llama-f32");
    let (ids, _) = ids_of(&reference, "input_ids");
    let prompt: Vec<u32> = ids[..ids.len() / 2].iter().map(|&i| i as u32).collect();
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("logits.safetensors");
    train::infer::forward_to_file(&loaded, &prompt, &path).unwrap();
    let written = Fixture::open(&path);
    assert_eq!(ids_of(&written, "input_ids").0, ids[..ids.len() / 2].to_vec());
    let ours = written.f32("logits");
    let theirs = reference.f32("logits");
    // The command ran the first of the fixture's two rows: its logits are the first half of the reference's.
    assert_eq!(2 * ours.len(), theirs.len(), "one row of logits written");
    let diff = max_abs_diff(&ours, &theirs[..ours.len()]);
    println!("qlora forward: max |logits - transformers| = {diff:e}");
    assert!(diff < 2e-6, "{diff}"); // measured 2.1e-7
    let e = train::infer::forward_to_file(&loaded, &[9999], &path).err().unwrap().to_string();
    assert!(e.contains("9999") && e.contains("vocabulary"), "{e}");
}
