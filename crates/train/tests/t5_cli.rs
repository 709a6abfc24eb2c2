//! `qlora forward` and `qlora generate` with a T5 model (fixtures: `tests/fixtures/t5`, made by
//! `xtask/fixtures/make_t5_fixtures.py` with transformers 5.24): the logits file equals transformers' logits,
//! the generated text equals transformers' greedy answer for the same prompt.

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/t5")
}

fn ids(tensors: &SafeTensors, key: &str) -> Vec<i64> {
    let view = tensors.tensor(key).unwrap();
    view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

fn f32s(tensors: &SafeTensors, key: &str) -> (Vec<f32>, Vec<usize>) {
    let view = tensors.tensor(key).unwrap();
    (view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(), view.shape().to_vec())
}

fn join(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn forward_writes_transformers_logits() {
    let bytes = std::fs::read(fixtures().join("tiny-t5-gated.reference.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&bytes).unwrap();
    let (enc, dec) = (ids(&reference, "input_ids"), ids(&reference, "decoder_input_ids"));
    let (logits, shape) = f32s(&reference, "logits");
    let (s, t, v) = (enc.len() / 2, dec.len() / 2, shape[2]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f.safetensors");
    let status = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["forward", "--model"])
        .arg(fixtures().join("tiny-t5-gated"))
        .args(["--tokens", &join(&enc[..s]), "--decoder-tokens", &join(&dec[..t]), "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&out).unwrap();
    let ours = SafeTensors::deserialize(&bytes).unwrap();
    let (values, our_shape) = f32s(&ours, "logits");
    assert_eq!(our_shape, vec![1, t, v]);
    assert_eq!(ids(&ours, "decoder_input_ids"), dec[..t]);
    let scale = logits.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let worst = values.iter().zip(&logits[..t * v]).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst / scale < 1e-5, "logits off by {worst} (scale {scale})");

    // A decoder-only model refuses --decoder-tokens; a bad id is an error, not a panic.
    let bad = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["forward", "--model"])
        .arg(fixtures().join("tiny-t5-gated"))
        .args(["--tokens", "5,500", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("500"), "{}", String::from_utf8_lossy(&bad.stderr));
}

#[test]
fn generate_prints_transformers_greedy_answer() {
    let bytes = std::fs::read(fixtures().join("tiny-t5-gated.prompt.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["generate", "--model"])
        .arg(fixtures().join("tiny-t5-gated"))
        .args(["--prompt", &meta["prompt"], "--max-new-tokens", "8"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), meta["answer"].trim());
}
