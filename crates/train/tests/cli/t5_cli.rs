//! `qlora forward` and `qlora generate` with a T5 model (fixtures: `tests/fixtures/t5`, made by
//! `xtask/fixtures/make_t5_fixtures.py` with transformers 5.24): the logits file equals transformers' logits,
//! the generated text equals transformers' greedy answer for the same prompt; `qlora train`, `qlora chat` and
//! `qlora serve` take a T5 model.

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

/// `qlora train` with a T5 directory trains on `{"input", "output"}` lines (the family is picked from
/// config.json), reports its held-out loss and writes a PEFT `SEQ_2_SEQ_LM` adapter that `qlora generate
/// --adapter` applies.
#[test]
fn train_then_generate_with_the_adapter() {
    let train = fixtures().join("train");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let output = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["train", "--model"])
        .arg(train.join("model-nf4"))
        .arg("--data")
        .arg(train.join("reverse-train.jsonl"))
        .arg("--eval-data")
        .arg(train.join("reverse-heldout.jsonl"))
        .args(["--max-steps", "6", "--micro-batch-size", "4", "--lora-r", "4", "--lr", "3e-3"])
        .args(["--sample-prompt", "reverse: red cat", "--save-steps", "3", "--output-dir"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("held-out loss") && stdout.contains("trained 6 steps"), "{stdout}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["task_type"], "SEQ_2_SEQ_LM");
    assert_eq!(config["r"], 4);
    assert!(out.join("checkpoint-3/optimizer.safetensors").exists());

    let generated = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["generate", "--model"])
        .arg(train.join("model-nf4"))
        .arg("--adapter")
        .arg(out.join("adapter"))
        .args(["--prompt", "reverse: red cat", "--max-new-tokens", "6"])
        .output()
        .unwrap();
    assert!(generated.status.success(), "{}", String::from_utf8_lossy(&generated.stderr));
    assert!(String::from_utf8_lossy(&generated.stderr).contains("applied adapter"));
}

/// Sampled generation is seeded (the same seed prints the same text), and `qlora chat` talks to a T5
/// model: each turn's reply comes from the conversation so far.
#[test]
fn sampled_generation_and_chat() {
    let model = fixtures().join("tiny-t5-gated");
    let sample = |seed: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_qlora"))
            .args(["generate", "--model"])
            .arg(&model)
            .args(["--prompt", "the cat", "--max-new-tokens", "8", "--temperature", "1.5", "--top-p", "0.9"])
            .args(["--seed", seed])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(sample("3"), sample("3"));

    let mut chat = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["chat", "--model"])
        .arg(&model)
        .args(["--max-new-tokens", "4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    chat.stdin.take().unwrap().write_all(b"the cat\nand the dog\n/exit\n").unwrap();
    let output = chat.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout.matches("\n> ").count(), 3, "two replies, then /exit at the third prompt:\n{stdout}");
}

/// `qlora generate` on the gated fixture, 4-bit on load: the printed text.
fn generate_text(prompt: &str, adapter: Option<&Path>, max: usize) -> String {
    let args = ["--quant".into(), "nf4".into(), "--model".into(), fixtures().join("tiny-t5-gated").into()];
    crate::common::generate_greedy(&args, prompt, adapter, max)
}

const T5_CLIENT: &str = r#"
import concurrent.futures, json, sys, urllib.request
import openai

base_url, expected = sys.argv[1], json.loads(sys.argv[2])
client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=300)
assert [m.id for m in client.models.list().data] == ["t5", "reverse"]
n = expected["max_tokens"]

def chat(model, prompt, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          temperature=0, max_tokens=n, **kw)

for case in expected["cases"]:
    r = chat(case["model"], case["prompt"])
    assert r.choices[0].message.content == case["text"], (case, r.choices[0].message.content)
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(case["model"], case["prompt"], stream=True)
                       if c.choices)
    assert streamed == case["text"], (case, streamed)
    c = client.completions.create(model=case["model"], prompt=case["prompt"], max_tokens=n, temperature=0)
    assert c.choices[0].text == case["text"], (case, c.choices[0].text)
    print("equal to qlora generate (chat, streamed, completion):", case["model"], repr(case["text"]), flush=True)

jobs = [(m, c["prompt"]) for c in expected["cases"] for m in ("t5", "reverse")] * 4
single = {j: chat(*j).choices[0].message.content for j in set(jobs)}
with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    answers = list(pool.map(lambda j: chat(*j).choices[0].message.content, jobs))
assert all(a == single[j] for j, a in zip(jobs, answers)), (jobs, answers)
print(len(jobs), "concurrent answers equal to their one-by-one answers", flush=True)

try:
    chat("t5", "word " * 600)
    raise AssertionError("an input over n_positions was accepted")
except openai.BadRequestError as e:
    assert e.body.get("code") == "context_length_exceeded", e.body
with urllib.request.urlopen(base_url + "/health") as r:
    health = json.loads(r.read())
assert health["active"] == 0 and health["max_batch_seen"] > 1, health
print("CLIENT OK", health)
"#;

/// `qlora serve` with a T5 model and an adapter beside it, driven by the `openai` client: chat, streamed
/// chat and completions each give `qlora generate`'s greedy text for the same prompt and adapter, concurrent
/// requests of both models (batched together) the one-by-one answers, an input over `n_positions` a
/// `context_length_exceeded` error.
#[test]
fn serve_t5_to_the_openai_client() {
    let python = crate::common::openai_python();
    let adapter = fixtures().join("adapter-tiny-t5-gated");
    let max_tokens = 8;
    let mut cases = Vec::new();
    for prompt in ["the cat sat", "reverse: red dog"] {
        let (base, adapted) =
            (generate_text(prompt, None, max_tokens), generate_text(prompt, Some(&adapter), max_tokens));
        assert_ne!(base, adapted, "the adapter changes the greedy answer to {prompt:?}");
        cases.push(serde_json::json!({"model": "t5", "prompt": prompt, "text": base}));
        cases.push(serde_json::json!({"model": "reverse", "prompt": prompt, "text": adapted}));
    }
    let expected = serde_json::json!({"max_tokens": max_tokens, "cases": cases});
    let args: Vec<std::ffi::OsString> = vec![
        "--quant".into(),
        "nf4".into(),
        "--served-name".into(),
        "t5".into(),
        "--model".into(),
        fixtures().join("tiny-t5-gated").into(),
        "--adapter".into(),
        format!("reverse={}", adapter.display()).into(),
    ];
    let (mut server, url) = crate::common::start_serve(&args);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("client.py");
    std::fs::write(&script, T5_CLIENT).unwrap();
    let output = Command::new(&python).arg(&script).arg(&url).arg(expected.to_string()).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("{stdout}");
    assert!(output.status.success() && stdout.contains("CLIENT OK"), "the openai client failed:\n{stdout}\n{stderr}");
    assert!(server.0.try_wait().unwrap().is_none(), "the server is still running");
}
