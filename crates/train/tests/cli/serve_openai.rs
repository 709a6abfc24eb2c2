//! `qlora serve` driven by the official `openai` Python client (installed from PyPI into a venv under the
//! cache on first use): the tiny 4-bit fixture model with two adapters (one trained here by `qlora train`,
//! the fixture's initial adapter); models list, greedy chat and completions equal to `qlora generate` with
//! the same adapter, streamed deltas equal to the whole reply, 32 concurrent requests × 3 rounds with the
//! answers of the requests run one by one, each bad input's error, the API key; the server alive after.
//!
//! Needs python3 with venv and pip reaching PyPI (as the SmolLM2 tests do); fails with a clear message
//! without them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{Server, openai_python, start_serve};

const KEY: &str = "test-key-123";

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-train")
}

fn qlora() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
}

/// Trains a small adapter on the tiny model (so that it changes the greedy output).
fn train_adapter(out: &Path) -> PathBuf {
    let output = qlora()
        .args(["train", "--model"])
        .arg(tiny().join("model-nf4"))
        .arg("--data")
        .arg(tiny().join("chat-train.jsonl"))
        .args(["--lora-r", "8", "--micro-batch-size", "4", "--grad-accum", "1", "--max-steps", "30", "--lr", "1e-2"])
        .args(["--save-steps", "0", "--eval-steps", "0", "--sample-prompt", "", "--output-dir"])
        .arg(out)
        .output()
        .unwrap();
    assert!(output.status.success(), "qlora train: {}", String::from_utf8_lossy(&output.stderr));
    out.join("adapter")
}

/// `qlora generate --chat` greedy on the tiny model, 4-bit on load: the printed text.
fn generate(prompt: &str, adapter: Option<&Path>, max: usize) -> String {
    let args = ["--quant".into(), "nf4".into(), "--chat".into(), "--model".into(), tiny().join("model-nf4").into()];
    crate::common::generate_greedy(&args, prompt, adapter, max)
}

/// Starts `qlora serve` on the tiny model with its two adapters and an API key.
fn serve(adapter: &Path) -> (Server, String) {
    let mut args: Vec<std::ffi::OsString> =
        ["--quant", "nf4", "--served-name", "tiny", "--api-key", KEY, "--max-batch", "16"]
            .iter()
            .map(Into::into)
            .collect();
    args.extend(["--model".into(), tiny().join("model-nf4").into()]);
    args.extend(["--adapter".into(), format!("wordnet={}", adapter.display()).into()]);
    args.extend(["--adapter".into(), format!("init={}", tiny().join("init-adapter").display()).into()]);
    start_serve(&args)
}

const CLIENT: &str = r#"
import concurrent.futures, json, sys, urllib.request, urllib.error
import openai

base_url, key, expected = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=300)
log = lambda *a: print(*a, flush=True)

models = client.models.list()
ids = [m.id for m in models.data]
assert ids == ["tiny", "wordnet", "init"], ids
parents = {m.id: getattr(m, "parent", None) for m in models.data}
assert parents == {"tiny": None, "wordnet": "tiny", "init": "tiny"}, parents
log("models:", ids)

def chat(model, prompt, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          temperature=0, max_tokens=expected["max_tokens"], **kw)

for case in expected["cases"]:
    r = chat(case["model"], case["prompt"])
    text = r.choices[0].message.content
    assert text == case["text"], (case, text)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    parts, finishes = [], []
    for chunk in chat(case["model"], case["prompt"], stream=True):
        for c in chunk.choices:
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert "".join(parts) == text, (parts, text)
    assert finishes == [r.choices[0].finish_reason], finishes
    log("equal to qlora generate, whole and streamed:", case["model"], repr(text[:40]))

c = client.completions.create(model="wordnet", prompt="The word", max_tokens=8, temperature=0)
assert c.choices[0].text and c.usage.completion_tokens <= 8
streamed = "".join(x.choices[0].text for x in client.completions.create(model="wordnet", prompt="The word",
                                                                        max_tokens=8, temperature=0, stream=True))
assert streamed == c.choices[0].text, (streamed, c.choices[0].text)
log("completions:", repr(c.choices[0].text))

# Load: 32 concurrent requests x 3 rounds over the three models; greedy answers equal the one-by-one ones.
prompts = ["What does the word \"%s\" mean?" % w for w in ["host", "cheap", "river", "light"]]
names = ["tiny", "wordnet", "init"]
single = {(m, p): chat(m, p).choices[0].message.content for m in names for p in prompts}
for round in range(3):
    jobs = [(names[i % 3], prompts[(i // 3) % 4]) for i in range(32)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda j: chat(*j).choices[0].message.content, jobs))
    assert len(answers) == 32
    for job, answer in zip(jobs, answers):
        assert answer == single[job], (round, job, answer, single[job])
    log("round", round, ": 32 concurrent answers, each equal to its one-by-one answer")

def raw(path, body, headers):
    request = urllib.request.Request(base_url + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())

auth = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
def expect_error(status, code, got):
    s, body = got
    assert s == status, (status, got)
    err = body["error"]
    assert err["message"] and err["type"], body
    if code:
        assert err["code"] == code, (code, body)

expect_error(400, None, raw("/v1/chat/completions", b'{"model": "tiny", "messages": [', auth))
expect_error(401, "invalid_api_key", raw("/v1/chat/completions", b'{}', {"Content-Type": "application/json"}))
expect_error(413, "request_too_large", raw("/v1/completions", b'{"model": "tiny", "prompt": "' + b"x" * (2 << 20) + b'"}', auth))
try:
    openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401
for kw, status, code in [
    (dict(model="nope"), 404, "model_not_found"),
    (dict(max_tokens=0), 400, None),
    (dict(max_tokens=-5), 400, None),
    (dict(max_tokens=10**9), 400, None),
    (dict(messages=[{"role": "user", "content": "word " * 600}]), 400, "context_length_exceeded"),
]:
    args = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    args.update(kw)
    try:
        client.chat.completions.create(**args)
        raise AssertionError("accepted: %r" % kw)
    except openai.APIStatusError as e:
        assert e.status_code == status, (kw, e.status_code, e.body)
        assert e.body and e.body.get("message"), e.body
        if code:
            assert e.body.get("code") == code, (kw, e.body)
log("bad inputs: 400/401/404/413 with OpenAI error JSON")

with urllib.request.urlopen(base_url + "/health") as r:
    health = json.loads(r.read())
assert health["status"] == "ok" and health["active"] == 0, health
assert health["max_batch_seen"] > 1, health
log("healthy after:", health)
print("CLIENT OK")
"#;

#[test]
fn openai_client_against_qlora_serve() {
    let python = openai_python();
    let work = tempfile::tempdir().unwrap();
    let trained = train_adapter(&work.path().join("run"));
    let max_tokens = 16;
    let prompt = "What does the word \"host\" mean?";
    let base_text = generate(prompt, None, max_tokens);
    let adapter_text = generate(prompt, Some(&trained), max_tokens);
    let init_text = generate(prompt, Some(&tiny().join("init-adapter")), max_tokens);
    assert_ne!(base_text, adapter_text, "the trained adapter changes the greedy answer");
    let expected = serde_json::json!({
        "max_tokens": max_tokens,
        "cases": [
            {"model": "tiny", "prompt": prompt, "text": base_text},
            {"model": "wordnet", "prompt": prompt, "text": adapter_text},
            {"model": "init", "prompt": prompt, "text": init_text},
        ],
    });
    let (mut server, url) = serve(&trained);
    let script = work.path().join("client.py");
    std::fs::write(&script, CLIENT).unwrap();
    let output = Command::new(&python).arg(&script).arg(&url).arg(KEY).arg(expected.to_string()).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("{stdout}");
    assert!(output.status.success() && stdout.contains("CLIENT OK"), "the openai client failed:\n{stdout}\n{stderr}");
    assert!(server.0.try_wait().unwrap().is_none(), "the server is still running");
}
