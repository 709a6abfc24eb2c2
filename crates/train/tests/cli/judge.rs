//! End to end, on the CPU, through the real `qlora` binary: `qlora answer` (a local model with and without
//! an adapter, and an OpenAI-compatible endpoint), `qlora judge pairwise` killed part-way and resumed,
//! `qlora judge score` and `qlora judge elo`, against a fake OpenAI-compatible server on a loopback port
//! that answers and judges by script (including a judgment that cannot be read).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const KEY_VAR: &str = "QLORA_E2E_JUDGE_KEY";
const KEY: &str = "sk-e2e-never-printed";

#[derive(Default)]
struct State {
    /// User messages of the judge requests that were answered, in order.
    judged: Vec<String>,
    /// Answer requests served.
    answered: usize,
    /// Authorization headers of the judge requests.
    auth: Vec<Option<String>>,
    /// Hold the n-th judge request (1-based, counting from the last reset) without replying.
    hang_at: Option<usize>,
    seen_since_reset: usize,
    hanging: bool,
}

/// The fake endpoint: model `fake-answerer` answers questions, any other model judges.
struct FakeServer {
    url: String,
    state: Arc<Mutex<State>>,
}

fn read_request(stream: &mut BufReader<TcpStream>) -> Option<(String, Value)> {
    let mut head = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().ok()?;
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).ok()?;
    Some((head, serde_json::from_slice(&body).ok()?))
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let s = text.find(start).map(|p| p + start.len()).unwrap_or(0);
    let e = text[s..].find(end).map(|p| p + s).unwrap_or(text.len());
    &text[s..e]
}

/// The script: the endpoint's answers ("ENDPOINT ANSWER ...") beat the local model's, local against local
/// is a tie, and on question 6 the judge cannot decide when the endpoint's answer is shown first. Scores:
/// 8 for an endpoint answer, 4 for any other.
fn judge_reply(user: &str, system: &str) -> String {
    if system.contains("scale of 1 to 10") || user.contains("scale of 1 to 10") {
        let s = |a: &str| if a.contains("ENDPOINT ANSWER") { 8 } else { 4 };
        let one = between(user, "Assistant 1's Answer]\n", "[The End of Assistant 1");
        let two = between(user, "Assistant 2's Answer]\n", "[The End of Assistant 2");
        return format!("{} {}\nThe first answer is ...", s(one), s(two));
    }
    let a = between(user, "[The Start of Assistant A's Answer]\n", "[The End of Assistant A");
    let b = between(user, "[The Start of Assistant B's Answer]\n", "[The End of Assistant B");
    let (ea, eb) = (a.contains("ENDPOINT ANSWER"), b.contains("ENDPOINT ANSWER"));
    if user.contains("Question number six") && ea {
        return "Both answers have merit; I cannot pick one.".into();
    }
    match (ea, eb) {
        (true, false) => "Assistant A is more helpful.\n\n[[A]]".into(),
        (false, true) => "Assistant B is more helpful.\n\n[[B]]".into(),
        _ => "They are equally good. [[C]]".into(),
    }
}

impl FakeServer {
    fn start() -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let mut reader = BufReader::new(stream);
                let Some((head, body)) = read_request(&mut reader) else { continue };
                let model = body["model"].as_str().unwrap_or_default().to_string();
                let messages = body["messages"].as_array().cloned().unwrap_or_default();
                let content = |role: &str| {
                    messages
                        .iter()
                        .rev()
                        .find(|m| m["role"] == role)
                        .and_then(|m| m["content"].as_str())
                        .unwrap_or("")
                        .to_string()
                };
                let reply = if model == "fake-answerer" {
                    shared.lock().unwrap().answered += 1;
                    format!("ENDPOINT ANSWER to: {}", content("user"))
                } else {
                    let user = content("user");
                    let hang = {
                        let mut s = shared.lock().unwrap();
                        s.seen_since_reset += 1;
                        let hang = s.hang_at == Some(s.seen_since_reset);
                        if hang {
                            s.hanging = true;
                        } else {
                            s.judged.push(user.clone());
                            let auth = head
                                .lines()
                                .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
                                .map(|l| l["authorization:".len()..].trim().to_string());
                            s.auth.push(auth);
                        }
                        hang
                    };
                    if hang {
                        // Hold the request until the client goes away (killed).
                        let mut sink = Vec::new();
                        let _ = reader.read_to_end(&mut sink);
                        shared.lock().unwrap().hanging = false;
                        continue;
                    }
                    judge_reply(&user, &content("system"))
                };
                let body = json!({
                    "id": "x", "object": "chat.completion", "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                })
                .to_string();
                let mut stream = reader.into_inner();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FakeServer { url, state }
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-train")
}

fn qlora(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qlora"));
    cmd.args(args).env(KEY_VAR, KEY).stdin(Stdio::null());
    cmd
}

fn run_ok(args: &[&str]) -> Output {
    let out = qlora(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(out.status.success(), "qlora {args:?} failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    for stream in [&out.stdout, &out.stderr] {
        assert!(!text(stream).contains(KEY), "the API key was printed");
    }
    out
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn answer_judge_resume_score_and_elo() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let server = FakeServer::start();
    let numbers = ["one", "two", "three", "four", "five", "six"];
    let questions: String = numbers
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let category = if i < 3 { "generic" } else { "knowledge" };
            format!("{}\n", json!({"question_id": i + 1, "category": category, "turns": [format!("Question number {n}: what is a word?")]}))
        })
        .collect();
    std::fs::write(p("question.jsonl"), questions).unwrap();
    let model = fixtures().join("model-nf4").to_string_lossy().into_owned();
    let adapter = fixtures().join("init-adapter").to_string_lossy().into_owned();

    // Three systems: the base model, the base with an adapter at temperature 1.5, and an endpoint.
    let q = p("question.jsonl");
    let local = |out: &str, extra: &[&str]| {
        let mut args = vec!["answer", "--questions", &q, "--out", out, "--model", &model, "--max-new-tokens", "6"];
        args.extend_from_slice(extra);
        run_ok(&args);
    };
    local(&p("base.jsonl"), &["--temperature", "0", "--name", "base"]);
    local(&p("adapter.jsonl"), &["--adapter", &adapter, "--temperature", "1.5", "--seed", "7"]);
    let endpoint_args = [
        "answer",
        "--questions",
        &q,
        "--out",
        &p("endpoint.jsonl"),
        "--endpoint",
        &server.url,
        "--endpoint-model",
        "fake-answerer",
    ];
    run_ok(&endpoint_args);
    assert_eq!(server.state.lock().unwrap().answered, 6);
    let adapter_answers = lines(dir.path().join("adapter.jsonl").as_path());
    assert_eq!(adapter_answers.len(), 6);
    assert_eq!(adapter_answers[0]["model_id"], "model-nf4+init-adapter");
    assert_eq!(adapter_answers[0]["generation"]["temperature"], 1.5);
    assert_eq!(adapter_answers[0]["generation"]["top_p"], 0.9);
    assert_eq!(adapter_answers[2]["generation"]["seed"], 9);
    assert!(adapter_answers[0]["generation"]["adapter"].as_str().unwrap().ends_with("init-adapter"));
    let endpoint_answers = lines(dir.path().join("endpoint.jsonl").as_path());
    assert_eq!(endpoint_answers[5]["model_id"], "fake-answerer");
    assert_eq!(
        endpoint_answers[5]["choices"][0]["turns"][0],
        "ENDPOINT ANSWER to: Question number six: what is a word?"
    );
    assert_eq!(endpoint_answers[0]["generation"]["endpoint_model"], "fake-answerer");
    // Answering again continues the file: nothing is left to ask.
    let again = run_ok(&endpoint_args);
    assert!(String::from_utf8_lossy(&again.stderr).contains("all 6 questions answered already"));
    assert_eq!(server.state.lock().unwrap().answered, 6);

    // Pairwise: 3 pairs × 6 questions × 2 orders = 36 judgments. Hold the 10th and kill the run there.
    let (judgments, cache) = (p("judgments.jsonl"), p("judgments.cache.jsonl"));
    let (base, adapted, endpoint) = (p("base.jsonl"), p("adapter.jsonl"), p("endpoint.jsonl"));
    let pairwise = vec![
        "judge",
        "pairwise",
        "--questions",
        &q,
        "--answers",
        &base,
        &adapted,
        &endpoint,
        "--judge-url",
        &server.url,
        "--judge-model",
        "fake-judge",
        "--judge-key-env",
        KEY_VAR,
        "--out",
        &judgments,
    ];
    server.state.lock().unwrap().hang_at = Some(10);
    let mut child = qlora(&pairwise).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    while !server.state.lock().unwrap().hanging {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        assert!(started.elapsed() < Duration::from_secs(120), "the 10th judgment was never asked");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let first_run: Vec<String> = server.state.lock().unwrap().judged.clone();
    assert_eq!(first_run.len(), 9);
    assert_eq!(lines(Path::new(&cache)).len(), 9, "every answered judgment was cached before the kill");
    assert!(!Path::new(&judgments).exists(), "no battle file from an unfinished run");

    // Resumed: only the 27 missing judgments are asked.
    {
        let mut s = server.state.lock().unwrap();
        s.hang_at = None;
        s.judged.clear();
    }
    let out = run_ok(&pairwise);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let second_run: Vec<String> = server.state.lock().unwrap().judged.clone();
    assert_eq!(second_run.len(), 27, "{stdout}");
    let first: BTreeSet<&String> = first_run.iter().collect();
    let second: BTreeSet<&String> = second_run.iter().collect();
    assert!(first.is_disjoint(&second), "a cached judgment was asked again");
    assert_eq!(first.len() + second.len(), 36, "every (question, pair, order) asked exactly once");
    assert!(stdout.contains("27 asked, 9 from the cache, 2 unreadable"), "{stdout}");
    let bearer = format!("Bearer {KEY}");
    assert!(server.state.lock().unwrap().auth.iter().all(|a| a.as_deref() == Some(bearer.as_str())));

    // The battles: the endpoint wins against both local systems except on question 6, where one order could
    // not be read (no battle); the local systems tie each other.
    let battles = lines(Path::new(&judgments));
    assert_eq!(battles.len(), 16, "18 battles, 2 without an outcome");
    let count = |f: &dyn Fn(&Value) -> bool| battles.iter().filter(|b| f(b)).count();
    assert_eq!(count(&|b: &Value| b["model_b"] == "fake-answerer" && b["winner"] == "model_b"), 10);
    assert_eq!(count(&|b: &Value| b["model_b"] != "fake-answerer" && b["winner"] == "tie"), 6);
    assert_eq!(count(&|b: &Value| b["question_id"] == 6), 1);
    let cached = std::fs::read_to_string(&cache).unwrap();
    assert_eq!(cached.lines().count(), 36);
    assert!(cached.contains("\"verdict\":\"error\"") && cached.contains("I cannot pick one"), "unreadable kept");
    for file in [&cache, &judgments] {
        assert!(!std::fs::read_to_string(file).unwrap().contains(KEY), "the API key was written to {file}");
    }

    // A third run asks nothing and writes the same battles.
    let before = std::fs::read_to_string(&judgments).unwrap();
    let out = run_ok(&pairwise);
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 asked, 36 from the cache"));
    assert_eq!(server.state.lock().unwrap().judged.len(), 27);
    assert_eq!(std::fs::read_to_string(&judgments).unwrap(), before);

    // Elo over the battles.
    let (elo_json, elo_png) = (p("elo.json"), p("elo.png"));
    let out = run_ok(&["judge", "elo", "--battles", &judgments, "--rounds", "2000", "--seed", "1", "--out", &elo_json]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.contains("1    fake-answerer"), "the endpoint ranks first:\n{table}");
    let elo: Value = serde_json::from_str(&std::fs::read_to_string(&elo_json).unwrap()).unwrap();
    let r = &elo["ratings"];
    assert_eq!((r["fake-answerer"]["wins"].as_u64(), r["fake-answerer"]["losses"].as_u64()), (Some(10), Some(0)));
    assert_eq!((r["base"]["ties"].as_u64(), r["base"]["losses"].as_u64()), (Some(6), Some(5)));
    let sum: f64 =
        ["fake-answerer", "base", "model-nf4+init-adapter"].iter().map(|n| r[n]["elo"].as_f64().unwrap()).sum();
    assert!((sum - 3000.0).abs() < 1e-6, "ratings keep their sum: {sum}");
    for n in ["fake-answerer", "base", "model-nf4+init-adapter"] {
        let (lo, mid, hi) =
            (r[n]["ci_low"].as_f64().unwrap(), r[n]["elo"].as_f64().unwrap(), r[n]["ci_high"].as_f64().unwrap());
        assert!(lo <= mid && mid <= hi, "{n}: {lo} {mid} {hi}");
    }
    assert!(r["fake-answerer"]["elo"].as_f64().unwrap() > 1050.0);
    let png = std::fs::read(&elo_png).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    // Scores against the endpoint as the reference: 4 against 8 in both orders → 50%.
    let scores = p("scores.json");
    let score_args = [
        "judge",
        "score",
        "--questions",
        &q,
        "--answers",
        &base,
        &adapted,
        "--reference",
        &endpoint,
        "--judge-url",
        &server.url,
        "--judge-model",
        "fake-judge",
        "--out",
        &scores,
    ];
    let out = run_ok(&score_args);
    assert_eq!(server.state.lock().unwrap().judged.len(), 27 + 24, "2 systems × 6 questions × 2 orders");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&scores).unwrap()).unwrap();
    let overall = &report["systems"]["base"]["report"]["overall"];
    assert_eq!(
        (overall["ratio"].as_f64(), overall["ci_low"].as_f64(), overall["ci_high"].as_f64()),
        (Some(0.5), Some(0.5), Some(0.5))
    );
    assert_eq!(overall["questions"], 6);
    assert_eq!(report["systems"]["base"]["report"]["categories"]["knowledge"]["questions"], 3);
    assert!(String::from_utf8_lossy(&out.stdout).contains("50.0% [50.0, 50.0]"));
    run_ok(&score_args);
    assert_eq!(server.state.lock().unwrap().judged.len(), 51, "the second score run uses only the cache");

    // The judge going away: retried, then a clear error; the cache keeps what it had.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead_url = format!("http://127.0.0.1:{dead}/v1");
    let mut args = pairwise.clone();
    let at = args.iter().position(|a| *a == server.url).unwrap();
    args[at] = dead_url.as_str();
    let at = args.iter().position(|a| *a == "fake-judge").unwrap();
    args[at] = "another-judge";
    args.extend(["--retries", "1"]);
    let out = qlora(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("judge endpoint") && stderr.contains("after 2 attempts"), "{stderr}");
    assert!(stderr.contains("run the same command again"), "{stderr}");
    assert!(!stderr.contains(KEY));
    assert_eq!(std::fs::read_to_string(&cache).unwrap(), cached);
}

#[test]
fn mismatched_files_are_named_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    std::fs::write(
        p("q.jsonl"),
        "{\"question_id\": 1, \"turns\": [\"a?\"]}\n{\"question_id\": 2, \"turns\": [\"b?\"]}\n",
    )
    .unwrap();
    std::fs::write(p("x.jsonl"), "{\"question_id\": 1, \"text\": \"A\"}\n{\"question_id\": 2, \"text\": \"B\"}\n")
        .unwrap();
    std::fs::write(p("y.jsonl"), "{\"question_id\": 1, \"text\": \"A\"}\n{\"question_id\": 9, \"text\": \"B\"}\n")
        .unwrap();
    let (q, x, y) = (p("q.jsonl"), p("x.jsonl"), p("y.jsonl"));
    let out = qlora(&[
        "judge",
        "pairwise",
        "--questions",
        &q,
        "--answers",
        &x,
        &y,
        "--judge-url",
        "http://127.0.0.1:9/v1",
        "--judge-model",
        "j",
        "--out",
        &p("j.jsonl"),
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("y.jsonl:2: question_id 9 is not in the question file"), "{stderr}");

    std::fs::write(
        p("b.jsonl"),
        "{\"question_id\": 1, \"model_a\": \"x\", \"model_b\": \"y\", \"winner\": \"model_c\"}\n",
    )
    .unwrap();
    let out = qlora(&["judge", "elo", "--battles", &p("b.jsonl")]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("b.jsonl:1: not a battle"));
}
