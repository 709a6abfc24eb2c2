//! The training dashboard over the real trainer (the tiny NF4 model of `tests/fixtures/tiny-train`): its files
//! read through the JSON API while it trains. The page itself is tested in a browser by the dashboard crate's
//! `tests/browser.rs`.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;

use dashboard::status::{RunState, StatusFile};
use dashboard::{ReadLimits, Runs};
use serde_json::Value;
use train::config::TrainConfig;
use train::metrics::StepMetrics;
use train::trainer::{self, Progress, Quiet};

/// `GET target` over plain HTTP/1.1: (status, body).
fn http_get(addr: SocketAddr, target: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

fn api_run(addr: SocketAddr, name: &str) -> Value {
    let (status, body) = http_get(addr, "/api/runs");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["runs"].as_array().unwrap().iter().find(|r| r["name"] == name).cloned().unwrap_or(Value::Null)
}

fn tiny_config(out: &Path) -> TrainConfig {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-train");
    TrainConfig {
        model: tiny.join("model-nf4").display().to_string(),
        data: tiny.join("chat-train.jsonl").display().to_string(),
        output_dir: out.to_path_buf(),
        lora_r: 8,
        micro_batch_size: 2,
        grad_accum: 1,
        max_steps: 3,
        eval_steps: 0,
        save_steps: 0,
        sample_prompt: String::new(),
        ..TrainConfig::default()
    }
}

/// Asks the dashboard about the run from inside the training loop, after each step.
struct Watch {
    addr: SocketAddr,
    name: String,
    seen: Vec<Value>,
}

impl Progress for Watch {
    fn start(&mut self, _: u64, _: u64) {}
    fn step(&mut self, m: &StepMetrics) {
        let run = api_run(self.addr, &self.name);
        assert_eq!(run["step"], m.step, "the dashboard shows the step just written: {run}");
        assert_eq!(run["last_train"]["loss"].as_f64(), Some(m.loss));
        self.seen.push(run);
    }
    fn message(&mut self, _: &str) {}
    fn finish(&mut self) {}
}

/// The trainer's files through the API while it trains: running with its step, total and ETA; then finished.
/// A run that fails says stopped, with the error.
#[test]
fn the_api_follows_a_real_training_run() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("tiny run");
    let listener = dashboard::bind("127.0.0.1", 0).unwrap();
    let addr = listener.local_addr().unwrap();
    dashboard::spawn(listener, Runs::single(&out, ReadLimits::default()).unwrap());

    let config = tiny_config(&out);
    let mut watch = Watch { addr, name: "tiny run".into(), seen: Vec::new() };
    let summary = trainer::train(&config, None, &mut watch).unwrap();
    assert_eq!(watch.seen.len(), 3);
    for run in &watch.seen {
        assert_eq!(run["status"]["state"], "running", "{run}");
        assert_eq!(run["total_steps"], 3);
        assert!(run["eta_seconds"].as_f64().is_some(), "{run}");
        assert_eq!(run["model"].as_str(), Some(config.model.as_str()));
    }
    let done = api_run(addr, "tiny run");
    assert_eq!(done["status"]["state"], "finished", "{done}");
    assert_eq!((done["step"].as_u64(), done["eta_seconds"].as_f64()), (Some(3), None));
    assert_eq!(done["last_train"]["loss"].as_f64(), summary.losses.last().copied());
    assert_eq!(done["counts"]["malformed"], 0);
    let (status, body) = http_get(addr, "/api/runs/tiny%20run/metrics");
    assert_eq!(status, 200);
    let curves: Value = serde_json::from_str(&body).unwrap();
    let losses: Vec<f64> = curves["train"]
        .as_array()
        .unwrap()
        .iter()
        .chain(curves["train_tail"].as_object().map(|_| &curves["train_tail"]))
        .map(|p| p["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses, summary.losses);

    // A run that cannot read its data stops, and says why.
    let bad = root.path().join("bad");
    let config = TrainConfig { data: "/nonexistent/data.jsonl".into(), ..tiny_config(&bad) };
    assert!(trainer::train(&config, None, &mut Quiet).is_err());
    let status = StatusFile::read(&bad).unwrap().unwrap();
    assert_eq!(status.state, RunState::Stopped);
    assert!(status.message.as_deref().unwrap_or("").contains("/nonexistent/data.jsonl"), "{status:?}");
}
