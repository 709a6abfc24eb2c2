//! The bitsandbytes 4-bit checkpoint layout against what transformers 5.24 + bitsandbytes 0.50.2 write
//! (fixtures: `tests/fixtures/tiny-llama-*`, made by `xtask/fixtures/make_quant_fixtures.py`).

use std::path::Path;

use nf4::QuantType;
use quant::QuantConfig;
use quant::bnb::QuantStateJson;
use quant::checkpoint::{HfCheckpoint, quantize_checkpoint};
use safetensors::SafeTensors;

use crate::fixture::Fixture;
use qlora_tests::assert_same_len;

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
    let read_json =
        |p: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
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
                assert!(
                    a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0),
                    "{dir}: {name}[{i}] ours {a} theirs {b}"
                );
            }
            // The device form (flex backend) gives the same values.
            let device = burn::tensor::Device::flex();
            let on_device: Vec<f32> = weight.to_device(&device).dequantize().into_data().try_into_vec().unwrap();
            assert_same_len(&on_device, &ours, &format!("{dir}: {name} on flex"));
            assert!(on_device.iter().zip(&ours).all(|(a, b)| a.to_bits() == b.to_bits()), "{dir}: {name} on flex");
            seen += 1;
        }
        assert_eq!(seen, 14, "{dir}: quantized weights found");
    }
}

/// A bf16 checkpoint in two shards (with its index) converts like the same tensors quantized directly.
#[test]
fn sharded_bf16_checkpoint_converts() {
    use half::bf16;
    use quant::bnb::StoredTensor;
    let src = tempfile::tempdir().unwrap();
    let f32_dir = fixture("tiny-llama-f32");
    std::fs::copy(f32_dir.join("config.json"), src.path().join("config.json")).unwrap();
    let checkpoint = HfCheckpoint::open(&f32_dir).unwrap();
    let names: Vec<String> = checkpoint.names().map(String::from).collect();
    let mut shards: Vec<Vec<(String, StoredTensor)>> = vec![Vec::new(), Vec::new()];
    let mut weight_map = serde_json::Map::new();
    for (i, name) in names.iter().enumerate() {
        let (values, shape) = checkpoint.tensor_f32(name).unwrap();
        let data = values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
        let shard = i % 2;
        shards[shard].push((name.clone(), StoredTensor { dtype: safetensors::Dtype::BF16, shape, data }));
        weight_map.insert(name.clone(), format!("model-0000{}-of-00002.safetensors", shard + 1).into());
    }
    for (i, shard) in shards.iter().enumerate() {
        let bytes = safetensors::serialize(shard.iter().map(|(k, t)| (k.clone(), t)), None).unwrap();
        std::fs::write(src.path().join(format!("model-0000{}-of-00002.safetensors", i + 1)), bytes).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(src.path().join("model.safetensors.index.json"), index.to_string()).unwrap();

    let out = tempfile::tempdir().unwrap();
    let report = quantize_checkpoint(src.path(), out.path(), &QuantConfig::new()).unwrap();
    assert_eq!(report.quantized_tensors, 14);
    let converted = HfCheckpoint::open(out.path()).unwrap();
    for name in &names {
        let (values, shape) = checkpoint.tensor_f32(name).unwrap();
        match converted.bnb_weight(name).unwrap() {
            Some(w) => {
                let as_bf16: Vec<bf16> = values.iter().map(|v| bf16::from_f32(*v)).collect();
                let direct = quant::QuantizedWeight::quantize(name, &as_bf16, &shape, &QuantConfig::new()).unwrap();
                assert_eq!(w, direct, "{name}");
                assert_eq!(w.dtype, nf4::FloatDtype::Bf16);
            }
            None => {
                let (copied, copied_shape) = converted.tensor_f32(name).unwrap();
                assert_eq!(copied_shape, shape);
                assert_same_len(&copied, &values, name);
                assert!(copied.iter().zip(&values).all(|(a, b)| *a == bf16::from_f32(*b).to_f32()), "{name}");
            }
        }
    }
}

/// Damaged bitsandbytes files give typed errors that name the tensor, never a panic.
#[test]
fn damaged_bnb_tensors_give_clear_errors() {
    use quant::bnb::{StoredTensor, read_bnb_weight};
    let bytes = std::fs::read(fixture("tiny-llama-bnb-nf4-dq").join("model.safetensors")).unwrap();
    let original = SafeTensors::deserialize(&bytes).unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let all: Vec<(String, StoredTensor)> = original
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, StoredTensor { dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() }))
        .collect();
    type Tensors = Vec<(String, StoredTensor)>;
    let read_with = |edit: &dyn Fn(&mut Tensors)| -> String {
        let mut tensors = all.clone();
        edit(&mut tensors);
        let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.clone(), t)), None).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        read_bnb_weight(&st, name, "damaged.safetensors")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "no error".into())
    };
    let state_key = format!("{name}.quant_state.bitsandbytes__nf4");
    let set_state = |t: &mut Vec<(String, StoredTensor)>, json: &str| {
        let e = t.iter_mut().find(|(k, _)| *k == state_key).unwrap();
        e.1 = StoredTensor::u8(vec![json.len()], json.as_bytes().to_vec());
    };

    let missing = read_with(&|t| t.retain(|(k, _)| *k != format!("{name}.nested_absmax")));
    assert!(missing.contains("missing tensor") && missing.contains("nested_absmax"), "{missing}");

    let no_state = read_with(&|t| t.retain(|(k, _)| *k != state_key));
    assert!(no_state.contains("quant_state") && no_state.contains(name), "{no_state}");

    let malformed = read_with(&|t| set_state(t, "{\"quant_type\": \"nf4\", \"blocksize\": 64,"));
    assert!(malformed.contains("malformed bitsandbytes quant_state") && malformed.contains(&state_key), "{malformed}");

    let bad_blocksize = read_with(&|t| {
        set_state(
            t,
            r#"{"quant_type": "nf4", "blocksize": 48, "dtype": "float32", "shape": [96, 96], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.05}"#,
        )
    });
    assert!(bad_blocksize.contains("48"), "{bad_blocksize}");

    let wrong_shape = read_with(&|t| {
        set_state(
            t,
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [96, 97], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.05}"#,
        )
    });
    assert!(wrong_shape.contains(name) && wrong_shape.contains("packed bytes"), "{wrong_shape}");

    let truncated = read_with(&|t| {
        let e = t.iter_mut().find(|(k, _)| k == name).unwrap();
        e.1.data.truncate(100);
        e.1.shape = vec![100, 1];
    });
    assert!(truncated.contains(name) && truncated.contains("100 bytes"), "{truncated}");

    let mistyped = read_with(&|t| {
        let e = t.iter_mut().find(|(k, _)| *k == format!("{name}.nested_absmax")).unwrap();
        e.1.dtype = safetensors::Dtype::I32;
    });
    assert!(mistyped.contains("nested_absmax") && mistyped.contains("I32"), "{mistyped}");

    let mismatched = read_with(&|t| {
        set_state(t, r#"{"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [96, 96]}"#)
    });
    assert!(mismatched.contains("does not match"), "{mismatched}");
}
