//! The server over real sockets with the tiny 4-bit fixture model: routes, greedy output equal to
//! `llama::generate`, streaming, each bad input's error JSON, the API key, and a client that goes away.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use llama::generate::{SamplingConfig, generate};
use serde_json::{Value, json};
use serve::{Running, ServeConfig, Served};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-train")
}

fn load() -> llama::LoadedModel {
    let source = formats::source::resolve(&tiny().join("model-nf4").display().to_string()).unwrap();
    llama::load(&source, &llama::LoadOptions::default(), &Device::flex()).unwrap()
}

fn start(config: ServeConfig) -> Running {
    let loaded = load();
    let (_, adapter) = loaded.model.read_side_adapter(&tiny().join("init-adapter")).unwrap();
    let tokenizer = loaded.tokenizer.unwrap();
    let stop_ids = tokenizer.stop_ids(&loaded.config.eos_token_ids);
    let served = Served {
        model: serve::ServedModel::Llama(loaded.model),
        tokenizer,
        name: "tiny".into(),
        adapters: vec![("tiny-init".into(), adapter)],
        context: loaded.config.max_position_embeddings,
        stop_ids,
    };
    serve::start(served, &ServeConfig { port: 0, ..config }).unwrap()
}

/// One HTTP/1.1 exchange (`Connection: close`): status and the body (de-chunked).
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    (status, body)
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = http(addr, "POST", path, &[("Content-Type", "application/json")], body.to_string().as_bytes());
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
}

/// What `qlora generate --chat` would print for `prompt` (greedy), with `adapter` attached.
fn generate_alone(prompt: &str, adapter: Option<&Path>, max: usize) -> String {
    let mut loaded = load();
    if let Some(dir) = adapter {
        loaded.model.load_peft_adapter(dir).unwrap();
    }
    let tokenizer = loaded.tokenizer.as_ref().unwrap();
    let text = tokenizer.apply_chat_template(&[formats::tokenizer::ChatMessage::new("user", prompt)], true).unwrap();
    let ids = tokenizer.encode(&text, false).unwrap();
    let stop = tokenizer.stop_ids(&loaded.config.eos_token_ids);
    let config = SamplingConfig::new().with_max_new_tokens(max);
    let (tokens, _) = generate(&loaded.model, &ids, &config, &stop, |_| true).unwrap();
    tokenizer.decode(&tokens, true).unwrap()
}

fn chat(model: &str, prompt: &str, extra: Value) -> Value {
    let mut body =
        json!({"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 12});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(String::from).collect()
}

#[test]
fn serves_models_chat_completions_and_streams() {
    let running = start(ServeConfig::default());
    let addr = running.addr;
    let (status, health) = http(addr, "GET", "/health", &[], b"");
    assert_eq!(status, 200, "{health}");

    let (status, models) = http(addr, "GET", "/v1/models", &[], b"");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["tiny", "tiny-init"]);
    assert_eq!(models["data"][1]["parent"], "tiny");
    assert_eq!(models["data"][0]["parent"], Value::Null);

    let init = tiny().join("init-adapter");
    for (model, adapter) in [("tiny", None), ("tiny-init", Some(init.as_path()))] {
        let want = generate_alone("What does the word \"host\" mean?", adapter, 12);
        let (status, reply) =
            post(addr, "/v1/chat/completions", &chat(model, "What does the word \"host\" mean?", json!({})));
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["object"], "chat.completion");
        assert_eq!(reply["model"], model);
        let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(content, want, "{model}: greedy output equals generate's");
        let usage = &reply["usage"];
        assert_eq!(
            usage["total_tokens"],
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        );
        let finish = reply["choices"][0]["finish_reason"].as_str().unwrap();
        assert!(finish == "length" || finish == "stop");
        if finish == "length" {
            assert_eq!(usage["completion_tokens"], 12);
        }

        let body = chat(
            model,
            "What does the word \"host\" mean?",
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        );
        let (status, text) = http(addr, "POST", "/v1/chat/completions", &[], body.to_string().as_bytes());
        assert_eq!(status, 200, "{text}");
        let data = sse_data(&text);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
        let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0).and_then(|ch| ch["delta"]["content"].as_str()).map(String::from))
            .collect();
        assert_eq!(streamed, content, "concatenated deltas equal the whole reply");
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(chunks.iter().any(|c| c["choices"].get(0).is_some_and(|ch| ch["finish_reason"] == finish)));
        assert_eq!(chunks.last().unwrap()["usage"], reply["usage"]);
    }

    // /v1/completions with a raw prompt, and a stop string that cuts the text.
    let (status, reply) = post(
        addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "The word", "max_tokens": 10, "temperature": 0}),
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "text_completion");
    let text = reply["choices"][0]["text"].as_str().unwrap().to_string();
    if let Some(cut) = text.char_indices().nth(3).map(|(i, _)| &text[i..]).filter(|rest| !rest.is_empty()) {
        let stop: String = cut.chars().take(2).collect();
        let (_, stopped) = post(
            addr,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "The word", "max_tokens": 10, "temperature": 0, "stop": [stop]}),
        );
        assert_eq!(stopped["choices"][0]["text"].as_str().unwrap(), &text[..text.find(&stop).unwrap()]);
        assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    }
    // Sampled with a seed: the same seed gives the same text.
    let sampled = json!({"model": "tiny-init", "prompt": "The word", "max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 5});
    assert_eq!(
        post(addr, "/v1/completions", &sampled).1["choices"][0]["text"],
        post(addr, "/v1/completions", &sampled).1["choices"][0]["text"]
    );
}

fn error_of(status_body: (u16, String)) -> (u16, Value) {
    let (status, body) = status_body;
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("code").is_some(), "{v}");
    (status, e.clone())
}

#[test]
fn bad_input_gets_openai_errors_and_the_key_is_checked() {
    let running = start(ServeConfig { api_key: Some("sekrit".into()), max_body_bytes: 4096, ..ServeConfig::default() });
    let addr = running.addr;
    let auth = [("Authorization", "Bearer sekrit")];
    let send = |path: &str, headers: &[(&str, &str)], body: &[u8]| error_of(http(addr, "POST", path, headers, body));
    let good = chat("tiny", "hi", json!({})).to_string();

    assert_eq!(send("/v1/chat/completions", &[], good.as_bytes()).0, 401, "no key");
    assert_eq!(send("/v1/chat/completions", &[("Authorization", "Bearer wrong")], good.as_bytes()).0, 401);
    assert_eq!(error_of(http(addr, "GET", "/v1/models", &[], b"")).0, 401);
    assert_eq!(http(addr, "GET", "/v1/models", &auth, b"").0, 200);
    assert_eq!(http(addr, "POST", "/v1/chat/completions", &auth, good.as_bytes()).0, 200);
    assert_eq!(http(addr, "GET", "/health", &[], b"").0, 200, "health needs no key");

    let (status, e) = send("/v1/chat/completions", &auth, b"{\"model\": \"tiny\", \"messages\": [");
    assert_eq!((status, e["type"].as_str()), (400, Some("invalid_request_error")));
    let (status, e) = send("/v1/chat/completions", &auth, chat("nope", "hi", json!({})).to_string().as_bytes());
    assert_eq!((status, e["code"].as_str()), (404, Some("model_not_found")));
    for bad in [json!(0), json!(-1), json!(100000), json!("x")] {
        let (status, _) =
            send("/v1/chat/completions", &auth, chat("tiny", "hi", json!({"max_tokens": bad})).to_string().as_bytes());
        assert_eq!(status, 400, "max_tokens {bad}");
    }
    // The tiny model's context is 512 tokens; each "word " is more than one token.
    let long = chat("tiny", &"word ".repeat(300), json!({})).to_string();
    assert!(long.len() < 4096);
    let (status, e) = send("/v1/chat/completions", &auth, long.as_bytes());
    assert_eq!((status, e["code"].as_str()), (400, Some("context_length_exceeded")));
    let huge = chat("tiny", &"x".repeat(5000), json!({})).to_string();
    let (status, e) = send("/v1/chat/completions", &auth, huge.as_bytes());
    assert_eq!((status, e["code"].as_str()), (413, Some("request_too_large")));
    let (status, _) = error_of(http(addr, "GET", "/v2/nothing", &auth, b""));
    assert_eq!(status, 404);
    // Still serving.
    assert_eq!(http(addr, "POST", "/v1/chat/completions", &auth, good.as_bytes()).0, 200);
}

/// A streaming client that closes its connection takes its sequence out of the batch.
#[test]
fn a_client_that_goes_away_stops_its_sequence() {
    let running = start(ServeConfig::default());
    let addr = running.addr;
    let request = json!({"model": "tiny", "prompt": "a", "max_tokens": 500, "temperature": 0});
    let health = || -> Value { serde_json::from_str(&http(addr, "GET", "/health", &[], b"").1).unwrap() };
    // Run to the end once: how many tokens the whole answer has (greedy: the same each time).
    let (_, whole) = post(addr, "/v1/completions", &request);
    let full = whole["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(full >= 100, "the fixture prompt should give a long answer, got {full} tokens: pick another prompt");
    let before = health()["tokens"].as_u64().unwrap();

    let mut body = request.clone();
    body["stream"] = json!(true);
    let body = body.to_string();
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(stream, "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut first = [0u8; 256];
    let n = stream.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(stream);
    let started = Instant::now();
    loop {
        let h = health();
        if h["active"] == 0 && h["cancelled"].as_u64() >= Some(1) {
            let ran = h["tokens"].as_u64().unwrap() - before;
            assert!(ran < full, "stopped before the end: {ran} of {full} tokens");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the sequence still runs: {h}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
