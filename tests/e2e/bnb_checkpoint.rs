//! The bitsandbytes 4-bit checkpoint layout against what transformers 5.24 + bitsandbytes 0.50.2 write
//! (fixtures: `tests/fixtures/tiny-llama-*`, made by `xtask/fixtures/make_quant_fixtures.py`).

use std::path::Path;

use quant::bnb::QuantStateJson;
use quant::checkpoint::{quantize_checkpoint, HfCheckpoint};
use quant::QuantConfig;
use nf4::QuantType;
use safetensors::SafeTensors;

use crate::fixture::Fixture;

fn fixture(name: &str) -> std::path::PathBuf {
    qlora_tests::fixtures_dir().join(name)
}

/// Our conversion of the f32 checkpoint equals transformers' save of the same model loaded in 4 bits:
/// same keys, same dtypes and shapes, same bytes; the quant_state JSON the same object.
fn check_conversion(config: QuantConfig, theirs_dir: &str) {
    let out = tempfile::tempdir().unwrap();
    let report = quantize_checkpoint(&fixture("tiny-llama-f32"), out.path(), &config).unwrap();
    assert_eq!(report.quantized_tensors, 14, "2 layers x 7 projections");
    let ours_bytes = std::fs::read(out.path().join("model.safetensors")).unwrap();
    let theirs_bytes = std::fs::read(fixture(theirs_dir).join("model.safetensors")).unwrap();
    let ours = SafeTensors::deserialize(&ours_bytes).unwrap();
    let theirs = SafeTensors::deserialize(&theirs_bytes).unwrap();
    let mut ours_names: Vec<_> = ours.names();
    let mut theirs_names: Vec<_> = theirs.names();
    ours_names.sort();
    theirs_names.sort();
    assert_eq!(ours_names, theirs_names, "{theirs_dir}: tensor names");
    for name in theirs_names {
        let (a, b) = (ours.tensor(name).unwrap(), theirs.tensor(name).unwrap());
        assert_eq!(a.dtype(), b.dtype(), "{theirs_dir}: {name} dtype");
        assert_eq!(a.shape(), b.shape(), "{theirs_dir}: {name} shape");
        if name.contains(".quant_state.") {
            let sa: QuantStateJson = serde_json::from_slice(a.data()).unwrap();
            let sb: QuantStateJson = serde_json::from_slice(b.data()).unwrap();
            assert_eq!(sa, sb, "{theirs_dir}: {name}");
        } else {
            assert!(a.data() == b.data(), "{theirs_dir}: {name} bytes differ");
        }
    }
    // config.json: the same quantization_config as transformers writes.
    let read_json = |p: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let ours_cfg = read_json(&out.path().join("config.json"));
    let theirs_cfg = read_json(&fixture(theirs_dir).join("config.json"));
    assert_eq!(ours_cfg["quantization_config"], theirs_cfg["quantization_config"], "{theirs_dir}: quantization_config");
    assert!(out.path().join("generation_config.json").exists());
}

#[test]
fn quantize_checkpoint_equals_transformers_bitsandbytes_nf4_double_quant() {
    check_conversion(QuantConfig::new(), "tiny-llama-bnb-nf4-dq");
}

#[test]
fn quantize_checkpoint_equals_transformers_bitsandbytes_fp4() {
    check_conversion(QuantConfig::new().with_quant_type(QuantType::Fp4).with_double_quant(false), "tiny-llama-bnb-fp4");
}

/// A checkpoint transformers wrote loads here and dequantizes to bitsandbytes' own values.
#[test]
fn transformers_bnb_checkpoint_loads_and_dequantizes_exactly() {
    for dir in ["tiny-llama-bnb-nf4-dq", "tiny-llama-bnb-fp4"] {
        let checkpoint = HfCheckpoint::open(&fixture(dir)).unwrap();
        let expected = Fixture::open(&fixture(dir).join("expected_dequant.safetensors"));
        let mut seen = 0;
        for name in checkpoint.names().map(String::from).collect::<Vec<_>>() {
            let Some(weight) = checkpoint.bnb_weight(&name).unwrap() else { continue };
            let ours = weight.dequantize_f32().unwrap();
            let theirs = expected.f32(&name);
            assert_eq!(ours.len(), theirs.len(), "{dir}: {name}");
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!(a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0), "{dir}: {name}[{i}] ours {a} theirs {b}");
            }
            // The device form (flex backend) gives the same values.
            let device = burn::tensor::Device::flex();
            let on_device: Vec<f32> = weight.to_device(&device).dequantize().into_data().try_into_vec().unwrap();
            assert!(on_device.iter().zip(&ours).all(|(a, b)| a.to_bits() == b.to_bits()), "{dir}: {name} on flex");
            seen += 1;
        }
        assert_eq!(seen, 14, "{dir}: quantized weights found");
    }
}
