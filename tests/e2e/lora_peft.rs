//! LoRA against PEFT 0.21.2 (fixtures: `tests/fixtures/peft`, made by `xtask/fixtures/make_peft_fixtures.py`):
//! a PEFT adapter loaded here gives PEFT's logits and gradients, on a dense and on an NF4 base.

use std::path::PathBuf;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use llama::{LlamaModel, LoadOptions, load_hf};
use lora::{LoraConfig, TargetModules};

use crate::fixture::Fixture;
use qlora_tests::{max_abs_diff, max_scaled_diff, rng_lock};

fn fixtures() -> PathBuf {
    qlora_tests::fixtures_dir()
}

fn reference() -> Fixture {
    Fixture::open(&fixtures().join("peft/reference.safetensors"))
}

fn base(nf4: bool, device: &Device) -> LlamaModel {
    let dir = if nf4 { "tiny-llama-bnb-nf4-dq" } else { "tiny-llama-f32" };
    load_hf(&fixtures().join(dir), &LoadOptions::default(), device).unwrap().1
}

fn input(f: &Fixture, device: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = f.raw("input_ids").chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    let t = ids.len() / 2;
    Tensor::<2, Int>::from_data(TensorData::new(ids, [2, t]), device)
}

#[test]
fn peft_adapter_logits_and_gradients_match_peft() {
    let reference = reference();
    let probe_values = reference.f32("probe");
    // Measured max |Δlogits|: 6.9e-7 dense, 6.9e-7 NF4 base (7.3e-7 and 7.9e-7 in docs/architecture.md).
    for (name, nf4, logits_tol) in [("dense", false, 8e-6), ("nf4", true, 8e-6)] {
        let device = Device::flex().autodiff();
        let mut model = base(nf4, &device);
        let adapter = model.load_peft_adapter(&fixtures().join("peft/adapter-tiny-llama")).unwrap();
        assert_eq!(adapter.modules.len(), 14);
        let logits = model.forward(input(&reference, &device), None);
        let dims = logits.dims();
        let ours: Vec<f32> = logits.clone().into_data().try_into_vec().unwrap();
        let diff = max_abs_diff(&ours, &reference.f32(&format!("logits_{name}")));
        println!("{name} base + PEFT adapter: max |logits - PEFT| = {diff:e}");
        assert!(diff < logits_tol, "{name}: {diff}");

        let probe = Tensor::<3>::from_data(TensorData::new(probe_values.clone(), dims), &device);
        let grads = (logits * probe).sum().backward();
        let mut worst = 0.0f64;
        for (module, linear) in model.linears() {
            let adapter = linear.adapter.as_ref().unwrap();
            for (which, param) in [("lora_A", &adapter.lora_a), ("lora_B", &adapter.lora_b)] {
                let grad =
                    param.val().grad(&grads).unwrap_or_else(|| panic!("{name}: no gradient for {module}.{which}"));
                let ours: Vec<f32> = grad.cast(DType::F32).into_data().try_into_vec().unwrap();
                let theirs = reference.f32(&format!("grad_{name}.base_model.model.{module}.{which}.weight"));
                let rel = max_scaled_diff(&ours, &theirs);
                worst = worst.max(rel);
                // Measured worst: 1.9e-6 dense, 2.4e-6 NF4 base (2.7e-6 in docs/architecture.md).
                assert!(rel < 3e-5, "{name}: {module}.{which}: relative gradient error {rel:e}");
            }
        }
        println!("{name} base: worst relative gradient error over all lora_A/lora_B = {worst:e}");
    }
}

#[test]
fn rslora_scaling_matches_peft() {
    let reference = reference();
    let device = Device::flex();
    let mut model = base(false, &device);
    let adapter = model.load_peft_adapter(&fixtures().join("peft/adapter-tiny-llama-rslora")).unwrap();
    assert!(adapter.config.use_rslora);
    let ours: Vec<f32> = model.forward(input(&reference, &device), None).into_data().try_into_vec().unwrap();
    let diff = max_abs_diff(&ours, &reference.f32("logits_rslora_dense"));
    println!("rsLoRA adapter: max |logits - PEFT| = {diff:e}");
    assert!(diff < 1e-5, "{diff}"); // measured 1.25e-6
}

#[test]
fn adapter_round_trip_is_bit_exact_and_fresh_adapters_change_nothing() {
    let _rng = rng_lock(); // add_lora draws from the process-wide generator
    let device = Device::flex();
    let mut model = base(false, &device);
    let loaded = model.load_peft_adapter(&fixtures().join("peft/adapter-tiny-llama")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let saved = model.save_peft_adapter(out.path(), &loaded.config, Some("tests/fixtures/tiny-llama-f32")).unwrap();
    assert_eq!(saved, 14);
    let again = lora::peft::read_peft_adapter(out.path()).unwrap();
    assert_eq!(again.modules, loaded.modules, "saved tensors equal the loaded ones bit for bit");
    assert_eq!(again.config.r, 8);

    // A fresh adapter (B = 0) leaves the logits exactly as the base model's.
    let reference = reference();
    let plain = base(false, &device);
    let mut fresh = base(false, &device);
    let n = fresh.add_lora(&LoraConfig::new().with_r(4).with_dropout(0.0), &device).unwrap();
    assert_eq!(n, 14);
    let a: Vec<f32> = plain.forward(input(&reference, &device), None).into_data().try_into_vec().unwrap();
    let b: Vec<f32> = fresh.forward(input(&reference, &device), None).into_data().try_into_vec().unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn bad_lora_settings_are_clear_errors() {
    let _rng = rng_lock(); // add_lora draws from the process-wide generator
    let device = Device::flex();
    let mut model = base(false, &device);
    let e = model.add_lora(&LoraConfig::new().with_r(0), &device).unwrap_err().to_string();
    assert!(e.contains("at least 1"), "{e}");
    let e = model.add_lora(&LoraConfig::new().with_r(64), &device).unwrap_err().to_string();
    assert!(e.contains("exceeds") && e.contains("k_proj"), "{e}");
    let e = model
        .add_lora(
            &LoraConfig::new().with_r(4).with_target_modules(TargetModules::Names(vec!["qq_proj".into()])),
            &device,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("match no linear layer"), "{e}");
    let n = model
        .add_lora(
            &LoraConfig::new().with_r(4).with_target_modules(TargetModules::Regex(r".*\.(q|v)_proj".into())),
            &device,
        )
        .unwrap();
    assert_eq!(n, 4);

    // An adapter whose shapes do not fit, and one asking for DoRA.
    let dir = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixtures().join("peft/adapter-tiny-llama").join(f), dir.path().join(f)).unwrap();
    }
    let mut other = load_hf(&fixtures().join("llama/tiny-qwen2"), &LoadOptions::default(), &device).unwrap().1;
    let e = other.load_peft_adapter(dir.path()).unwrap_err().to_string();
    assert!(e.contains("lora_A") && e.contains("layer is"), "{e}");
    let cfg = std::fs::read_to_string(dir.path().join("adapter_config.json"))
        .unwrap()
        .replace("\"use_dora\": false", "\"use_dora\": true");
    std::fs::write(dir.path().join("adapter_config.json"), cfg).unwrap();
    let e = model.load_peft_adapter(dir.path()).unwrap_err().to_string();
    assert!(e.contains("DoRA"), "{e}");
}

#[test]
fn merged_checkpoints_give_peft_logits() {
    use lora::merge::{MergeOutput, merge_checkpoint};
    let reference = reference();
    let device = Device::flex();
    let adapter = fixtures().join("peft/adapter-tiny-llama");
    let logits_of = |dir: &std::path::Path| -> Vec<f32> {
        let model = load_hf(dir, &LoadOptions::default(), &device).unwrap().1;
        model.forward(input(&reference, &device), None).into_data().try_into_vec().unwrap()
    };
    let mut dense_merges = Vec::new();
    for (base_dir, logits_key) in [("tiny-llama-f32", "logits_dense"), ("tiny-llama-bnb-nf4-dq", "logits_nf4")] {
        let out = tempfile::tempdir().unwrap();
        let report =
            merge_checkpoint(&fixtures().join(base_dir), &adapter, out.path(), &MergeOutput::DenseF32).unwrap();
        assert_eq!(report.merged_modules, 14);
        let diff = max_abs_diff(&logits_of(out.path()), &reference.f32(logits_key));
        println!("merged into {base_dir}: max |logits - PEFT| = {diff:e}");
        assert!(diff < 1e-5, "{base_dir}: {diff}"); // measured 1.04e-6 (f32 base), 8.9e-7 (NF4 base)
        dense_merges.push(out);
    }

    // The same merge into the f32 base, re-quantized to NF4 + double quant.
    let dense = dense_merges[0].path();
    let out = tempfile::tempdir().unwrap();
    let report = merge_checkpoint(
        &fixtures().join("tiny-llama-f32"),
        &adapter,
        out.path(),
        &MergeOutput::Requantize(quant::QuantConfig::new()),
    )
    .unwrap();
    assert_eq!(report.merged_modules, 14);
    println!(
        "requantized merge: max error {:e}, mean {:e}",
        report.requant_max_abs_error, report.requant_mean_abs_error
    );
    assert!(report.requant_max_abs_error > 0.0 && report.requant_mean_abs_error < report.requant_max_abs_error as f64);

    // The reported error is the one in the files: the re-quantized weights, dequantized, against the dense
    // merge; every other tensor copied unchanged.
    let dense_ckpt = quant::checkpoint::HfCheckpoint::open(dense).unwrap();
    let requant_ckpt = quant::checkpoint::HfCheckpoint::open(out.path()).unwrap();
    let (mut max_error, mut error_sum, mut error_count, mut quantized) = (0.0f64, 0.0f64, 0usize, 0);
    for name in dense_ckpt.names() {
        let (merged, shape) = dense_ckpt.tensor_f32(name).unwrap();
        match requant_ckpt.bnb_weight(name).unwrap() {
            Some(q) => {
                assert_eq!(q.shape, shape, "{name}");
                let back = q.dequantize_f32().unwrap();
                let error = max_abs_diff(&back, &merged); // (checks the lengths for the sum below)
                assert!(error.is_finite(), "{name}: {error}");
                max_error = max_error.max(error);
                error_sum += back.iter().zip(&merged).map(|(a, b)| (a - b).abs() as f64).sum::<f64>();
                error_count += merged.len();
                quantized += 1;
            }
            None => assert_eq!(requant_ckpt.tensor_f32(name).unwrap(), (merged, shape), "{name}: copied unchanged"),
        }
    }
    assert_eq!(quantized, 14, "re-quantized weights");
    // (the report subtracts in f32, max_abs_diff in f64: equal up to one f32 rounding)
    let reported = report.requant_max_abs_error as f64;
    assert!(
        (max_error - reported).abs() <= reported * f32::EPSILON as f64,
        "reported max error {reported:e} vs the checkpoint's {max_error:e}"
    );
    let mean_error = error_sum / error_count as f64;
    assert!(
        (mean_error - report.requant_mean_abs_error).abs() <= 1e-9 * mean_error,
        "reported mean error {} vs the checkpoint's {mean_error}",
        report.requant_mean_abs_error
    );

    // Loaded, the re-quantized merge stays 4-bit and gives the logits of the dense merge quantized on load
    // (the same NF4 weights), to the bit.
    let requantized = load_hf(out.path(), &LoadOptions::default(), &device).unwrap().1;
    assert!(requantized.layers[0].mlp.up_proj.base.is_quantized());
    let requantized: Vec<f32> =
        requantized.forward(input(&reference, &device), None).into_data().try_into_vec().unwrap();
    let quantized_on_load =
        load_hf(dense, &LoadOptions { quant: Some(quant::QuantConfig::new()), ..Default::default() }, &device)
            .unwrap()
            .1;
    let quantized_on_load: Vec<f32> =
        quantized_on_load.forward(input(&reference, &device), None).into_data().try_into_vec().unwrap();
    assert_eq!(requantized, quantized_on_load, "re-quantized merge vs the dense merge quantized on load");

    // Against the dense merge, the logits move with the weight error. Measured: max |Δlogits| 0.278 = 7.4 x
    // the max weight error 3.78e-2 (the largest logit is 0.70). The bound is 10 x the weight error (0.378), not
    // 10 x the measured 0.278: that would exceed the adapter's whole effect on the logits (1.107, next) and so
    // pass a merge that dropped the adapter. The inputs are fixed, so only rounding can move the measurement.
    let dense_logits = logits_of(dense);
    let logit_diff = max_abs_diff(&requantized, &dense_logits);
    let bound = 10.0 * report.requant_max_abs_error as f64;
    eprintln!(
        "requantized vs dense merge: max |Δlogits| = {logit_diff:e} ({:.1} x the max weight error {:e}; bound {bound:e})",
        logit_diff / report.requant_max_abs_error as f64,
        report.requant_max_abs_error
    );
    assert!(logit_diff > 0.0, "re-quantizing changes the weights, so the logits");
    assert!(logit_diff < bound, "requantized vs dense merge: max |Δlogits| {logit_diff:e} >= {bound:e}");
    // The bound sees the adapter: the base without it is further from the dense merge (measured 1.107).
    let without_adapter = max_abs_diff(&logits_of(&fixtures().join("tiny-llama-f32")), &dense_logits);
    eprintln!("base without the adapter vs dense merge: max |Δlogits| = {without_adapter:e}");
    assert!(
        without_adapter > bound,
        "the bound {bound:e} must be tighter than the adapter's effect {without_adapter:e}"
    );
}

/// Makes `tests/fixtures/peft/adapter-trained-here`: an adapter trained here (three normalised gradient
/// steps on the probe loss, on the NF4 base), saved with our writer. Run once with
/// `cargo test -p qlora-tests make_trained_here_adapter -- --ignored`, then
/// `python xtask/fixtures/make_peft_fixtures.py --trained-here tests/fixtures` records PEFT's logits for it.
#[test]
#[ignore = "fixture generator"]
fn make_trained_here_adapter() {
    use burn::module::Param;
    let reference = reference();
    let device = Device::flex().autodiff();
    let mut model = base(true, &device);
    let config = LoraConfig::new().with_r(8).with_alpha(16.0).with_dropout(0.0).with_init(lora::LoraInit::Gaussian);
    model.add_lora(&config, &device).unwrap();
    let probe_values = reference.f32("probe");
    for _ in 0..3 {
        let logits = model.forward(input(&reference, &device), None);
        let probe = Tensor::<3>::from_data(TensorData::new(probe_values.clone(), logits.dims()), &device);
        let grads = (logits * probe).sum().backward();
        for (_, linear) in model.linears_mut() {
            let adapter = linear.adapter.as_mut().unwrap();
            for param in [&mut adapter.lora_a, &mut adapter.lora_b] {
                let g = param.val().grad(&grads).unwrap();
                let step = g.clone().abs().max().into_scalar::<f32>() + 1e-12;
                let updated = param.val().inner() - g.div_scalar(step).mul_scalar(0.01);
                *param = Param::from_tensor(Tensor::from_inner(updated).require_grad());
            }
        }
    }
    let out = fixtures().join("peft/adapter-trained-here");
    model.save_peft_adapter(&out, &config, Some("tests/fixtures/tiny-llama-bnb-nf4-dq")).unwrap();
}

/// The adapter trained here, loaded in PEFT, gives our logits.
#[test]
fn adapter_trained_here_gives_our_logits_in_peft() {
    let peft = Fixture::open(&fixtures().join("peft/trained_here_reference.safetensors"));
    for (nf4, key) in [(true, "logits_nf4"), (false, "logits_dense")] {
        let device = Device::flex();
        let mut model = base(nf4, &device);
        model.load_peft_adapter(&fixtures().join("peft/adapter-trained-here")).unwrap();
        let ours: Vec<f32> = model.forward(input(&peft, &device), None).into_data().try_into_vec().unwrap();
        let diff = max_abs_diff(&ours, &peft.f32(key));
        println!("adapter trained here, {key}: max |ours - PEFT| = {diff:e}");
        assert!(diff < 4e-6, "{key}: {diff}"); // measured 3.6e-7 (NF4 base), 3.0e-7 (dense base)
    }
}
