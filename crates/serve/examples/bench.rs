//! Throughput of `qlora serve`'s continuous batching: total generated tokens per second for 1 client and
//! for N concurrent clients (default 16), each asking for 64 new tokens (greedy completions), on
//! SmolLM2-135M-Instruct quantized to NF4 + DQ on load, on the CPU, over real HTTP on loopback.
//!
//!     cargo run -p qlora-serve --example bench [-- --clients 16 --tokens 64 --model smollm2]
//!
//! Prints one line per run and the speed-up; run it on a quiet machine (no build running).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use burn::tensor::Device;
use serde_json::{Value, json};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn complete(addr: SocketAddr, prompt: &str, tokens: usize) -> u64 {
    let body = json!({"model": "base", "prompt": prompt, "max_tokens": tokens, "temperature": 0}).to_string();
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: b\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let json: Value = serde_json::from_str(raw.split_once("\r\n\r\n").unwrap().1).unwrap();
    json["usage"]["completion_tokens"].as_u64().unwrap_or_else(|| panic!("{json}"))
}

/// `clients` concurrent requests; returns (tokens, seconds).
fn run(addr: SocketAddr, clients: usize, tokens: usize) -> (u64, f64) {
    let prompts = [
        "Once upon a time, in a small village,",
        "The history of the Roman Empire",
        "Here is a recipe for bread:",
        "In mathematics, a prime number",
    ];
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let prompt = prompts[i % prompts.len()];
            std::thread::spawn(move || complete(addr, prompt, tokens))
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    (total, started.elapsed().as_secs_f64())
}

fn main() {
    let clients: usize = arg("--clients", "16").parse().unwrap();
    let tokens: usize = arg("--tokens", "64").parse().unwrap();
    let spec = arg("--model", "smollm2");
    let source = formats::source::resolve(&spec).unwrap();
    let options = llama::LoadOptions { quant: Some(quant::QuantConfig::new()), ..Default::default() };
    let loaded = llama::load(&source, &options, &Device::flex()).unwrap();
    let tokenizer = loaded.tokenizer.unwrap();
    let stop_ids = tokenizer.stop_ids(&loaded.config.eos_token_ids);
    let served = serve::Served {
        model: serve::ServedModel::Llama(loaded.model),
        tokenizer,
        name: "base".into(),
        adapters: Vec::new(),
        context: loaded.config.max_position_embeddings,
        stop_ids,
    };
    let config = serve::ServeConfig { port: 0, max_batch: clients.max(1), ..Default::default() };
    let running = serve::start(served, &config).unwrap();
    let addr = running.addr;
    run(addr, 1, 4); // warm-up
    let (t1, s1) = run(addr, 1, tokens);
    println!("1 client: {t1} tokens in {s1:.2} s = {:.1} tokens/s", t1 as f64 / s1);
    let (tn, sn) = run(addr, clients, tokens);
    println!("{clients} clients: {tn} tokens in {sn:.2} s = {:.1} tokens/s", tn as f64 / sn);
    println!("speed-up: {:.2}x", (tn as f64 / sn) / (t1 as f64 / s1));
}
