//! The t5 crate against transformers 5.24 + PEFT 0.21.2 + bitsandbytes 0.50.2 on the CPU (fixtures:
//! `tests/fixtures/t5`, made by `xtask/fixtures/make_t5_fixtures.py`): relative position buckets, encoder
//! outputs and logits of both feed-forward variants with tied and untied heads, an NF4 + double-quant
//! checkpoint and quantization on load (bytes and logits), a PEFT adapter, greedy generation.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use lora::weights::WeightSource;
use quant::QuantConfig;
use quant::checkpoint::HfCheckpoint;
use safetensors::{Dtype, SafeTensors};
use t5::generate::generate_greedy;
use t5::{LoadOptions, T5Model, load_hf, relative_position_bucket};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/t5")
}

/// A reference file's tensors as f32 or i64 values.
struct Reference(Vec<u8>);

impl Reference {
    fn open(name: &str) -> Reference {
        let path = fixtures().join(name);
        Reference(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    fn view(&self, key: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let tensors = SafeTensors::deserialize(&self.0).unwrap();
        let v = tensors.tensor(key).unwrap_or_else(|_| panic!("no tensor {key}"));
        (v.dtype(), v.shape().to_vec(), v.data().to_vec())
    }

    fn f32(&self, key: &str) -> Vec<f32> {
        let (dtype, _, data) = self.view(key);
        assert_eq!(dtype, Dtype::F32, "{key}");
        data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn ids(&self, key: &str) -> (Vec<i64>, [usize; 2]) {
        let (dtype, shape, data) = self.view(key);
        assert_eq!(dtype, Dtype::I64, "{key}");
        let ids = data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        let shape = match shape.as_slice() {
            [n] => [1, *n],
            [a, b] => [*a, *b],
            other => panic!("{key}: shape {other:?}"),
        };
        (ids, shape)
    }

    fn ids_tensor(&self, key: &str, device: &Device) -> Tensor<2, Int> {
        let (ids, shape) = self.ids(key);
        Tensor::from_data(TensorData::new(ids, shape), device)
    }
}

/// Max |a − b| / max |b|.
fn relative_diff(ours: &[f32], theirs: &[f32]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
    let worst = ours.iter().zip(theirs).fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    worst / scale
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(DType::F32).into_data().try_into_vec().unwrap()
}

fn load(dir: &str, options: &LoadOptions) -> T5Model {
    load_hf(&fixtures().join(dir), options, &Device::flex()).unwrap_or_else(|e| panic!("{dir}: {e}")).1
}

/// Encoder output and logits against the reference; returns the logits' relative difference.
fn check_outputs(model: &T5Model, reference: &str) -> f64 {
    let r = Reference::open(reference);
    let device = model.device();
    let ids = r.ids_tensor("input_ids", &device);
    let dec = r.ids_tensor("decoder_input_ids", &device);
    let encoded = model.encode(ids.clone(), None);
    let enc_diff = relative_diff(&values(encoded.clone()), &r.f32("encoder_hidden"));
    let logits_diff = relative_diff(&values(model.logits(model.decode(dec, &encoded, None, None))), &r.f32("logits"));
    println!("{reference}: encoder {enc_diff:e}, logits {logits_diff:e} (relative)");
    assert!(enc_diff < 1e-5, "{reference}: encoder output off by {enc_diff:e}");
    assert!(logits_diff < 1e-5, "{reference}: logits off by {logits_diff:e}");
    logits_diff
}

/// Greedy tokens equal transformers' `generate` (which stops after EOS, id 1, and pads with 0).
fn check_greedy(model: &T5Model, reference: &str) {
    let r = Reference::open(reference);
    let (ids, [_, s]) = r.ids("input_ids");
    let source: Vec<u32> = ids[..s].iter().map(|&i| i as u32).collect();
    let (theirs, _) = r.ids("greedy_ids");
    let mut expected: Vec<u32> = Vec::new();
    for &t in &theirs {
        if t == 1 {
            break;
        }
        expected.push(t as u32);
    }
    let (ours, _) = generate_greedy(model, &source, 0, theirs.len(), &[1], true).unwrap();
    assert_eq!(ours, expected, "{reference}: greedy tokens");
    let (uncached, _) = generate_greedy(model, &source, 0, theirs.len(), &[1], false).unwrap();
    assert_eq!(uncached, expected, "{reference}: greedy tokens without the cache");
}

#[test]
fn buckets_equal_transformers() {
    let r = Reference::open("buckets.safetensors");
    let (rel, _) = r.ids("relative_position");
    for (key, bidirectional, buckets, distance) in [
        ("bidirectional", true, 32, 128),
        ("causal", false, 32, 128),
        ("bidirectional_8_16", true, 8, 16),
        ("causal_8_16", false, 8, 16),
    ] {
        let (expected, _) = r.ids(key);
        for (&p, &want) in rel.iter().zip(&expected) {
            assert_eq!(relative_position_bucket(p, bidirectional, buckets, distance) as i64, want, "{key} at {p}");
        }
    }
}

#[test]
fn gated_untied_outputs_and_generation_match_transformers() {
    let model = load("tiny-t5-gated", &LoadOptions::default());
    assert!(model.lm_head.is_some() && !model.scale_decoder_outputs);
    check_outputs(&model, "tiny-t5-gated.reference.safetensors");
    check_greedy(&model, "tiny-t5-gated.reference.safetensors");
}

#[test]
fn relu_tied_bf16_checkpoint_outputs_and_generation_match_transformers() {
    let model = load("tiny-t5-relu", &LoadOptions::default());
    assert!(model.lm_head.is_none() && model.scale_decoder_outputs);
    assert!(model.encoder[0].ff.wi_1.is_none());
    check_outputs(&model, "tiny-t5-relu.reference.safetensors");
    check_greedy(&model, "tiny-t5-relu.reference.safetensors");
}

#[test]
fn nf4_checkpoint_and_quantize_on_load_match_bitsandbytes() {
    let model = load("tiny-t5-nf4", &LoadOptions::default());
    let quantized = model.linears().iter().filter(|(_, l)| l.base.is_quantized()).count();
    assert_eq!(quantized, 6 + 10, "every linear but wo stays 4-bit");
    check_outputs(&model, "tiny-t5-nf4.reference.safetensors");
    check_greedy(&model, "tiny-t5-nf4.reference.safetensors");

    // Quantizing the f32 checkpoint on load gives bitsandbytes' bytes, so the same logits.
    let dq = QuantConfig::new();
    let on_load = load("tiny-t5-nf4-src", &LoadOptions { quant: Some(dq.clone()), ..Default::default() });
    check_outputs(&on_load, "tiny-t5-nf4.reference.safetensors");
    let dense = HfCheckpoint::open(&fixtures().join("tiny-t5-nf4-src")).unwrap();
    let bnb = HfCheckpoint::open(&fixtures().join("tiny-t5-nf4")).unwrap();
    let mut compared = 0;
    for (name, linear) in model.linears() {
        let key = format!("{name}.weight");
        let Some(theirs) = WeightSource::bnb_weight(&bnb, &key).unwrap() else {
            assert!(name.ends_with(".wo") && !linear.base.is_quantized(), "{name}");
            continue;
        };
        let (w, shape) = WeightSource::tensor_f32(&dense, &key).unwrap();
        let ours = quant::QuantizedWeight::quantize(&key, &w, &shape, &dq).unwrap();
        assert_eq!(ours.shape, theirs.shape, "{key}");
        assert_eq!(ours.data, theirs.data, "{key}: our NF4 + DQ bytes differ from bitsandbytes'");
        compared += 1;
    }
    assert_eq!(compared, quantized);
}

#[test]
fn peft_adapter_logits_match_peft() {
    let mut model = load("tiny-t5-gated", &LoadOptions::default());
    let adapter = model.load_peft_adapter(&fixtures().join("adapter-tiny-t5-gated")).unwrap();
    assert_eq!(adapter.modules.len(), 2 * 7 + 3 * 11, "all-linear: every linear but lm_head");
    check_outputs(&model, "tiny-t5-gated-lora.reference.safetensors");
    check_greedy(&model, "tiny-t5-gated-lora.reference.safetensors");

    // Written back by us, it reads as PEFT wrote it.
    let out = tempfile::tempdir().unwrap();
    model.save_peft_adapter(out.path(), &adapter.config, Some("tiny-t5-gated")).unwrap();
    let mut again = load("tiny-t5-gated", &LoadOptions::default());
    again.load_peft_adapter(out.path()).unwrap();
    check_outputs(&again, "tiny-t5-gated-lora.reference.safetensors");
}

/// The T5 tokenizer (sentencepiece-style Unigram through tokenizer.json) gives transformers' ids, EOS
/// appended, and the model's greedy answer to them equals transformers'.
#[test]
fn tokenizer_appends_eos_and_the_answer_matches_transformers() {
    let bytes = std::fs::read(fixtures().join("tiny-t5-gated.prompt.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let prompt = meta.metadata().as_ref().unwrap()["prompt"].clone();
    let r = Reference::open("tiny-t5-gated.prompt.safetensors");
    let (expected, _) = r.ids("prompt_ids");
    let loaded = t5::load(
        &formats::source::ModelSource::HfDir(fixtures().join("tiny-t5-gated")),
        &LoadOptions::default(),
        &Device::flex(),
    )
    .unwrap();
    let tokenizer = loaded.tokenizer.as_ref().expect("tokenizer.json");
    let ids = tokenizer.encode(&prompt, true).unwrap();
    assert_eq!(ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(), expected);
    assert_eq!(ids.last(), Some(&loaded.config.eos_token_id));
    let (answer, _) = r.ids("answer_ids");
    let expected: Vec<u32> = answer.iter().take_while(|&&t| t != 1).map(|&t| t as u32).collect();
    let (ours, _) = generate_greedy(&loaded.model, &ids, 0, answer.len(), &[1], true).unwrap();
    assert_eq!(ours, expected);
}

/// Training: on the NF4 checkpoint with a PEFT adapter, the seq2seq loss of a padded batch (padded source
/// masked, labels shifted right behind `decoder_start_token_id` as transformers' `_shift_right`, padded
/// labels ignored) and every LoRA gradient equal PEFT's (fixtures `tests/fixtures/t5/train`, made by
/// `xtask/fixtures/make_t5_train_fixtures.py`).
#[test]
fn seq2seq_loss_and_every_lora_gradient_match_peft_on_the_nf4_checkpoint() {
    let device = Device::flex().autodiff();
    let dir = fixtures().join("train");
    let (_, mut model) = load_hf(&dir.join("model-nf4"), &LoadOptions::default(), &device).unwrap();
    let adapter = model.load_peft_adapter(&dir.join("init-adapter")).unwrap();
    assert_eq!(adapter.modules.len(), 2 * 7 + 2 * 11, "all-linear: every linear but lm_head");
    let r = Reference::open("train/gradients.safetensors");
    let (ids, [b, s]) = r.ids("input_ids");
    let (attention, _) = r.ids("attention_mask");
    let (labels, [_, t]) = r.ids("labels");
    let padding: Vec<bool> = attention.iter().map(|&m| m == 0).collect();
    let decoder: Vec<i64> = (0..b)
        .flat_map(|row| {
            let labels = &labels[row * t..(row + 1) * t];
            std::iter::once(0).chain(labels[..t - 1].iter().map(|&l| if l == -100 { 0 } else { l }))
        })
        .collect();
    let mask: Vec<f32> = labels.iter().map(|&l| if l == -100 { 0.0 } else { 1.0 }).collect();
    let targets = mask.iter().filter(|&&m| m > 0.0).count();
    let clean: Vec<i64> = labels.iter().map(|&l| l.max(0)).collect();
    let padding = Tensor::<2, burn::tensor::Bool>::from_data(TensorData::new(padding, [b, s]), &device);
    let nll = model.nll_sum(
        Tensor::from_data(TensorData::new(ids, [b, s]), &device),
        Some(&padding),
        Tensor::from_data(TensorData::new(decoder, [b, t]), &device),
        Tensor::from_data(TensorData::new(clean, [b, t]), &device),
        Tensor::from_data(TensorData::new(mask, [b, t]), &device),
    );
    let loss = nll.div_scalar(targets as f64);
    let ours = values(loss.clone())[0] as f64;
    let theirs = r.f32("loss")[0] as f64;
    println!("seq2seq loss: ours {ours} PEFT {theirs}");
    assert!(((ours - theirs) / theirs).abs() < 1e-5, "loss {ours} vs {theirs}");

    let grads = loss.backward();
    let mut worst = 0.0f64;
    let mut compared = 0;
    for (module, linear) in model.linears() {
        let Some(adapter) = linear.adapter.as_ref() else { continue };
        for (which, param) in [("lora_A", &adapter.lora_a), ("lora_B", &adapter.lora_b)] {
            let grad = param.val().grad(&grads).unwrap_or_else(|| panic!("no gradient for {module}.{which}"));
            let ours: Vec<f32> = grad.cast(DType::F32).into_data().try_into_vec().unwrap();
            let theirs = r.f32(&format!("base_model.model.{module}.{which}.default.weight"));
            let rel = relative_diff(&ours, &theirs);
            assert!(rel < 1e-4, "{module}.{which}: relative gradient error {rel:e}");
            worst = worst.max(rel);
            compared += 1;
        }
    }
    assert_eq!(compared, 2 * adapter.modules.len());
    println!("worst relative LoRA gradient error vs PEFT: {worst:e} over {compared} tensors");
}

/// `qlora merge` on a T5 checkpoint (`lora::merge` over the HF directory): the PEFT `SEQ_2_SEQ_LM` adapter
/// folded into the weights gives, without any adapter, PEFT's adapted logits and greedy tokens; and from the
/// NF4 checkpoint (dequantized, adapter added, written dense) the logits of the 4-bit base with the adapter.
#[test]
fn merging_an_adapter_into_a_t5_checkpoint_gives_the_adapted_model() {
    use lora::merge::{HfBase, MergeOutput, merge};
    let out = tempfile::tempdir().unwrap();
    let base = HfBase::open(&fixtures().join("tiny-t5-gated")).unwrap();
    let report = merge(&base, &fixtures().join("adapter-tiny-t5-gated"), out.path(), &MergeOutput::DenseF32).unwrap();
    assert_eq!(report.merged_modules, 2 * 7 + 3 * 11);
    let (_, merged) = load_hf(out.path(), &LoadOptions::default(), &Device::flex()).unwrap();
    assert!(merged.linears().iter().all(|(_, l)| l.adapter.is_none()));
    check_outputs(&merged, "tiny-t5-gated-lora.reference.safetensors");
    check_greedy(&merged, "tiny-t5-gated-lora.reference.safetensors");

    let train = fixtures().join("train");
    let nf4 = HfBase::open(&train.join("model-nf4")).unwrap();
    let out = tempfile::tempdir().unwrap();
    merge(&nf4, &train.join("init-adapter"), out.path(), &MergeOutput::DenseF32).unwrap();
    let (_, merged) = load_hf(out.path(), &LoadOptions::default(), &Device::flex()).unwrap();
    let (_, mut adapted) = load_hf(&train.join("model-nf4"), &LoadOptions::default(), &Device::flex()).unwrap();
    adapted.load_peft_adapter(&train.join("init-adapter")).unwrap();
    let device = Device::flex();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![3i64, 4, 9, 11, 15, 1], [1, 6]), &device);
    let dec = Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 15, 11, 9], [1, 4]), &device);
    let ours = values(merged.forward(ids.clone(), dec.clone()));
    let theirs = values(adapted.forward(ids, dec));
    let diff = relative_diff(&ours, &theirs);
    println!("NF4 base + adapter vs the merged dense checkpoint: logits {diff:e} (relative)");
    assert!(diff < 1e-5, "{diff:e}");
}
