//! `qlora answer` and `qlora judge pairwise | score | elo`: the paper's LLM-as-judge evaluation
//! (docs/evaluation.md). The formats, prompts, cache and statistics live in the `judge` crate; this module
//! parses the flags, runs the model or the endpoints, and prints and plots the results.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use formats::tokenizer::ChatMessage;
use judge::cache::Cache;
use judge::client::{ChatClient, Extra, Retry};
use judge::elo::{EloConfig, Rating, tournament};
use judge::files::{AnswerRecord, Choice, Winner, answered_so_far, read_answers, read_battles, read_questions};
use judge::prompt::{JudgePrompt, PromptKind};
use judge::run::{Counts, JudgeSettings, score_report};
use llama::generate::SamplingConfig;
use serde_json::json;
use train::infer;

use super::ModelArgs;

/// `qlora answer`: answers to a question file from a local model (with an adapter) or an endpoint.
#[derive(Args)]
pub struct AnswerArgs {
    /// Questions in FastChat's form (`{"question_id", "category", "turns": [..]}` per line).
    #[arg(long)]
    questions: PathBuf,
    /// The answer file (FastChat's model-answer lines); an existing one is continued.
    #[arg(long)]
    out: PathBuf,
    /// The system's name (`model_id`) in the answers; default: the endpoint model, or the model's name
    /// (plus `+` and the adapter directory's name).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    model: ModelArgs,
    /// Answer through an OpenAI-compatible chat endpoint instead of a local model (e.g.
    /// http://127.0.0.1:8000/v1).
    #[arg(long, requires = "endpoint_model", conflicts_with_all = ["adapter", "quant"])]
    endpoint: Option<String>,
    /// The model name to ask the endpoint for.
    #[arg(long, requires = "endpoint")]
    endpoint_model: Option<String>,
    /// Environment variable holding the endpoint's API key.
    #[arg(long, requires = "endpoint")]
    endpoint_key_env: Option<String>,
    /// A system message before the questions.
    #[arg(long)]
    system: Option<String>,
    /// The paper samples with temperature 0.7 and nucleus p 0.9; 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Question i (0-based, in file order) is sampled with seed + i.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// Where the judge is and how it is asked.
#[derive(Args)]
pub struct JudgeEndpoint {
    /// The judge's OpenAI-compatible endpoint (`http://host:port` → `/v1/chat/completions`,
    /// `https://api.openai.com/v1`, or a full `.../chat/completions` URL).
    #[arg(long)]
    judge_url: String,
    /// The judge model's name at the endpoint.
    #[arg(long)]
    judge_model: String,
    /// Environment variable holding the API key (sent as a Bearer token; never printed or cached).
    #[arg(long)]
    judge_key_env: Option<String>,
    /// The judge prompt (JSON; default: the built-in one, crates/judge/prompts/).
    #[arg(long)]
    prompt: Option<PathBuf>,
    /// The judgment cache (default: next to --out, `<out stem>.cache.jsonl`).
    #[arg(long)]
    cache: Option<PathBuf>,
    #[arg(long, default_value_t = 0.0)]
    judge_temperature: f64,
    #[arg(long, default_value_t = 2048)]
    judge_max_tokens: usize,
    /// Retries of a failed request (connection errors, timeouts, HTTP 408/429/5xx), with backoff.
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// Seconds before a request times out.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

#[derive(Subcommand)]
pub enum JudgeCommand {
    /// Every pair of systems judged on every question in both orders (verdicts [[A]]/[[B]]/[[C]]; orders
    /// that disagree are a tie); writes FastChat battle lines for `qlora judge elo`.
    Pairwise {
        #[arg(long)]
        questions: PathBuf,
        /// Two or more answer files (one system each).
        #[arg(long, num_args = 2.., required = true)]
        answers: Vec<PathBuf>,
        /// The battle file.
        #[arg(long, default_value = "judgments.jsonl")]
        out: PathBuf,
        #[command(flatten)]
        judge: JudgeEndpoint,
    },
    /// Each system and the reference rated 1–10 in both orders: total-score ratio against the reference
    /// ("% of ChatGPT") with bootstrap 95% intervals, per category and overall.
    Score {
        #[arg(long)]
        questions: PathBuf,
        /// One or more answer files.
        #[arg(long, num_args = 1.., required = true)]
        answers: Vec<PathBuf>,
        /// The reference system's answer file.
        #[arg(long)]
        reference: PathBuf,
        /// The report (JSON).
        #[arg(long, default_value = "scores.json")]
        out: PathBuf,
        /// Bootstrap resamples of the questions.
        #[arg(long, default_value_t = 1000)]
        bootstrap: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        judge: JudgeEndpoint,
    },
    /// Elo ratings from battles (FastChat's form): online Elo averaged over seeded random orderings, with
    /// 2.5/97.5 percentile intervals; a table, a JSON file and a PNG.
    Elo {
        #[arg(long)]
        battles: PathBuf,
        /// Random orderings of the battles.
        #[arg(long, default_value_t = 10_000)]
        rounds: usize,
        #[arg(long, default_value_t = 32.0)]
        k: f64,
        #[arg(long, default_value_t = 1000.0)]
        initial: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// `{"ratings": {NAME: {"elo", "ci_low", "ci_high", "wins", "ties", "losses"}}}`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The plot (default: beside --out with `.png`, else elo.png).
        #[arg(long)]
        plot: Option<PathBuf>,
    },
}

fn api_key(var: Option<&str>) -> anyhow::Result<Option<String>> {
    match var {
        None => Ok(None),
        Some(var) => match std::env::var(var) {
            Ok(key) if !key.is_empty() => Ok(Some(key)),
            _ => bail!("the environment variable {var} (the API key) is not set"),
        },
    }
}

pub fn answer(args: &AnswerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.temperature >= 0.0, "--temperature must be >= 0");
    anyhow::ensure!(args.top_p > 0.0 && args.top_p <= 1.0, "--top-p must be in (0, 1]");
    let questions = read_questions(&args.questions)?;
    let name = match (&args.name, &args.endpoint_model) {
        (Some(n), _) => n.clone(),
        (None, Some(m)) => m.clone(),
        (None, None) => {
            let stem = |p: &Path| p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let base = stem(Path::new(&args.model.model));
            match &args.model.adapter {
                Some(a) => format!("{base}+{}", stem(a)),
                None => base,
            }
        }
    };
    let (done, existing) = answered_so_far(&args.out)?;
    if let Some(existing) = existing.filter(|e| *e != name) {
        bail!(
            "{} holds answers of `{existing}`, not `{name}`: give --name {existing} or another --out",
            args.out.display()
        );
    }
    let done: BTreeSet<_> = done.into_iter().collect();
    let todo: Vec<(usize, &judge::files::Question)> =
        questions.iter().enumerate().filter(|(_, q)| !done.contains(&q.id)).collect();
    if todo.is_empty() {
        eprintln!("{}: all {} questions answered already", args.out.display(), questions.len());
        return Ok(());
    }
    if !done.is_empty() {
        eprintln!("{}: {} answered already, {} to go", args.out.display(), done.len(), todo.len());
    }
    enum Answerer {
        Local(Box<llama::LoadedModel>),
        Endpoint(ChatClient, String),
    }
    let answerer = match (&args.endpoint, &args.endpoint_model) {
        (Some(url), Some(model)) => {
            let key = api_key(args.endpoint_key_env.as_deref())?;
            Answerer::Endpoint(ChatClient::new(url, key, Duration::from_secs(600), Retry::default())?, model.clone())
        }
        _ => Answerer::Local(Box::new(args.model.load()?)),
    };
    let generation = |seed: u64| match &answerer {
        Answerer::Endpoint(client, model) => json!({
            "endpoint": client.url(), "endpoint_model": model, "temperature": args.temperature,
            "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "seed": seed, "system": args.system,
        }),
        Answerer::Local(_) => json!({
            "model": args.model.model, "adapter": args.model.adapter, "quant": args.model.quant,
            "dtype": args.model.dtype, "temperature": args.temperature,
            "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "seed": seed, "system": args.system,
        }),
    };
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
        .with_context(|| format!("opening {}", args.out.display()))?;
    let started = std::time::Instant::now();
    for (n, (index, q)) in todo.iter().enumerate() {
        let seed = args.seed.wrapping_add(*index as u64);
        let mut turns = Vec::new();
        let mut messages: Vec<ChatMessage> = args.system.iter().map(|s| ChatMessage::new("system", s)).collect();
        for turn in &q.turns {
            messages.push(ChatMessage::new("user", turn));
            let reply = match &answerer {
                Answerer::Local(loaded) => {
                    let sampling = SamplingConfig::new()
                        .with_temperature(args.temperature)
                        .with_top_p(args.top_p)
                        .with_max_new_tokens(args.max_new_tokens)
                        .with_seed(seed);
                    let ids = infer::chat_prompt_ids(loaded, &messages)?;
                    infer::generate_text(loaded, &ids, &sampling, &[], &mut std::io::sink())?.text
                }
                Answerer::Endpoint(client, model) => {
                    let conversation: Vec<(&str, &str)> =
                        messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
                    let extra = Extra { top_p: Some(args.top_p), seed: Some(seed) };
                    client.chat(model, &conversation, args.temperature, args.max_new_tokens, extra)?
                }
            };
            let reply = reply.trim().to_string();
            messages.push(ChatMessage::new("assistant", &reply));
            turns.push(reply);
        }
        let record = AnswerRecord {
            question_id: q.id.clone(),
            answer_id: format!("{name}-{}", q.id),
            model_id: name.clone(),
            choices: vec![Choice { index: 0, turns }],
            tstamp: judge::cache::now(),
            generation: generation(seed),
        };
        let mut line = serde_json::to_string(&record)?;
        line.push('\n');
        out.write_all(line.as_bytes())
            .and_then(|_| out.flush())
            .with_context(|| format!("writing {}", args.out.display()))?;
        eprintln!(
            "[{}/{}] question {} answered ({:.1} s so far)",
            n + 1,
            todo.len(),
            q.id,
            started.elapsed().as_secs_f64()
        );
    }
    eprintln!("wrote {} answers of `{name}` to {}", todo.len(), args.out.display());
    Ok(())
}

/// The endpoint client, prompt, settings and cache of a judge run.
fn open_judge(
    endpoint: &JudgeEndpoint,
    kind: PromptKind,
    out: &Path,
) -> anyhow::Result<(ChatClient, JudgePrompt, JudgeSettings, Cache)> {
    let key = api_key(endpoint.judge_key_env.as_deref())?;
    let retry = Retry { retries: endpoint.retries, ..Retry::default() };
    let client = ChatClient::new(&endpoint.judge_url, key, Duration::from_secs(endpoint.timeout), retry)?;
    let prompt = match &endpoint.prompt {
        Some(p) => JudgePrompt::from_file(p)?,
        None => JudgePrompt::builtin(kind),
    };
    anyhow::ensure!(prompt.kind == kind, "the prompt `{}` is a {:?} prompt, not {kind:?}", prompt.name, prompt.kind);
    let settings = JudgeSettings {
        model: endpoint.judge_model.clone(),
        temperature: endpoint.judge_temperature,
        max_tokens: endpoint.judge_max_tokens,
    };
    let cache_path = endpoint.cache.clone().unwrap_or_else(|| {
        let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "judge".into());
        out.with_file_name(format!("{stem}.cache.jsonl"))
    });
    let cache = Cache::open(&cache_path)?;
    if cache.dropped_partial_line {
        eprintln!("{}: dropped a judgment cut short by an interruption", cache_path.display());
    }
    eprintln!(
        "judge {} at {} with prompt `{}`; {} judgments cached in {}",
        settings.model,
        client.url(),
        prompt.name,
        cache.len(),
        cache_path.display()
    );
    Ok((client, prompt, settings, cache))
}

fn progress(done: usize, total: usize, cached: bool) {
    if !cached || done == total {
        eprintln!("[{done}/{total}] judgments{}", if cached { " (cached)" } else { "" });
    }
}

fn counts_line(c: &Counts) -> String {
    format!(
        "{} asked, {} from the cache, {} unreadable (kept in the cache, not counted)",
        c.asked, c.cached, c.unparseable
    )
}

fn interrupted(cache: &Path) -> impl FnOnce(judge::JudgeError) -> anyhow::Error + '_ {
    move |e| {
        anyhow::anyhow!(
            "{e}\nthe judgments received so far are kept in {}; run the same command again to continue",
            cache.display()
        )
    }
}

pub fn run(command: &JudgeCommand) -> anyhow::Result<()> {
    match command {
        JudgeCommand::Pairwise { questions, answers, out, judge: endpoint } => {
            let questions = read_questions(questions)?;
            let systems = answers.iter().map(|a| read_answers(a, &questions)).collect::<Result<Vec<_>, _>>()?;
            let (mut client, prompt, settings, mut cache) = open_judge(endpoint, PromptKind::Pairwise, out)?;
            let cache_path = cache.path().to_path_buf();
            let (results, counts) =
                judge::run::pairwise(&questions, &systems, &prompt, &settings, &mut client, &mut cache, &mut progress)
                    .map_err(interrupted(&cache_path))?;
            let mut text = String::new();
            let mut table: BTreeMap<(String, String), [usize; 4]> = BTreeMap::new();
            for r in &results {
                let row = table.entry((r.model_a.clone(), r.model_b.clone())).or_default();
                match r.winner {
                    Some(Winner::ModelA) => row[0] += 1,
                    Some(Winner::Tie) => row[1] += 1,
                    Some(Winner::ModelB) => row[2] += 1,
                    None => row[3] += 1,
                }
                let Some(winner) = r.winner else { continue };
                let line = json!({
                    "question_id": r.question_id, "category": r.category, "model_a": r.model_a, "model_b": r.model_b,
                    "winner": winner, "g1_verdict": r.g1_verdict, "g2_verdict": r.g2_verdict,
                    "judge": settings.model, "prompt": prompt.name,
                });
                text.push_str(&line.to_string());
                text.push('\n');
            }
            judge::files::write_atomically(out, &text)?;
            println!(
                "{:<24} {:<24} {:>5} {:>5} {:>5} {:>10}",
                "model_a", "model_b", "a won", "ties", "b won", "unreadable"
            );
            for ((a, b), [w, t, l, e]) in &table {
                println!("{a:<24} {b:<24} {w:>5} {t:>5} {l:>5} {e:>10}");
            }
            let battles = results.iter().filter(|r| r.winner.is_some()).count();
            println!("{}", counts_line(&counts));
            println!(
                "wrote {battles} battles to {} ({} without an outcome left out)",
                out.display(),
                results.len() - battles
            );
        }
        JudgeCommand::Score { questions, answers, reference, out, bootstrap, seed, judge: endpoint } => {
            let questions = read_questions(questions)?;
            let systems = answers.iter().map(|a| read_answers(a, &questions)).collect::<Result<Vec<_>, _>>()?;
            let reference = read_answers(reference, &questions)?;
            let (mut client, prompt, settings, mut cache) = open_judge(endpoint, PromptKind::Score, out)?;
            let cache_path = cache.path().to_path_buf();
            let (scores, counts) = judge::run::score(
                &questions,
                &systems,
                &reference,
                &prompt,
                &settings,
                &mut client,
                &mut cache,
                &mut progress,
            )
            .map_err(interrupted(&cache_path))?;
            let mut reports = BTreeMap::new();
            println!("relative to `{}` (total score ratio, bootstrap 95% interval over questions):", reference.name);
            for s in &scores {
                let r = score_report(s, *bootstrap, *seed);
                let pct = |x: f64| 100.0 * x;
                println!(
                    "{:<28} overall {:6.1}% [{:.1}, {:.1}]  ({} questions, {} unreadable)",
                    s.name,
                    pct(r.overall.ratio),
                    pct(r.overall.ci_low),
                    pct(r.overall.ci_high),
                    r.overall.questions,
                    r.unreadable_questions
                );
                for (cat, c) in &r.categories {
                    println!(
                        "{:<28}   {cat:<14} {:6.1}% [{:.1}, {:.1}]  ({} questions)",
                        "",
                        pct(c.ratio),
                        pct(c.ci_low),
                        pct(c.ci_high),
                        c.questions
                    );
                }
                reports
                    .insert(s.name.clone(), json!({"report": r, "questions": s.questions, "unreadable": s.unreadable}));
            }
            let doc = json!({
                "reference": reference.name, "judge": settings.model, "prompt": prompt.name,
                "bootstrap": bootstrap, "seed": seed, "systems": reports,
            });
            judge::files::write_atomically(out, &(serde_json::to_string_pretty(&doc)? + "\n"))?;
            println!("{}", counts_line(&counts));
            println!("wrote {}", out.display());
        }
        JudgeCommand::Elo { battles, rounds, k, initial, seed, out, plot } => {
            anyhow::ensure!(*rounds > 0, "--rounds must be at least 1");
            anyhow::ensure!(*k > 0.0 && k.is_finite(), "--k must be positive");
            let list = read_battles(battles)?;
            let ratings = tournament(&list, &EloConfig { rounds: *rounds, k: *k, initial: *initial, seed: *seed });
            let mut sorted: Vec<(&String, &Rating)> = ratings.iter().collect();
            sorted.sort_by(|a, b| b.1.elo.total_cmp(&a.1.elo));
            println!(
                "Elo over {rounds} random orderings of {} battles (K {k}, start {initial}, seed {seed}):",
                list.len()
            );
            println!(
                "{:<4} {:<28} {:>8} {:>18} {:>5} {:>5} {:>6}",
                "rank", "system", "elo", "95% interval", "wins", "ties", "losses"
            );
            for (i, (name, r)) in sorted.iter().enumerate() {
                println!(
                    "{:<4} {name:<28} {:>8.1} {:>18} {:>5} {:>5} {:>6}",
                    i + 1,
                    r.elo,
                    format!("[{:.1}, {:.1}]", r.ci_low, r.ci_high),
                    r.wins,
                    r.ties,
                    r.losses
                );
            }
            if let Some(out) = out {
                let doc = json!({
                    "ratings": ratings.iter().map(|(n, r)| (n.clone(), json!({
                        "elo": r.elo, "ci_low": r.ci_low, "ci_high": r.ci_high,
                        "wins": r.wins, "ties": r.ties, "losses": r.losses,
                    }))).collect::<serde_json::Map<_, _>>(),
                    "rounds": rounds, "k": k, "initial": initial, "seed": seed, "battles": list.len(),
                });
                judge::files::write_atomically(out, &(serde_json::to_string_pretty(&doc)? + "\n"))?;
                println!("wrote {}", out.display());
            }
            let png = match (plot, out) {
                (Some(p), _) => p.clone(),
                (None, Some(o)) => o.with_extension("png"),
                (None, None) => PathBuf::from("elo.png"),
            };
            let points: Vec<(&str, f64, f64, f64)> =
                sorted.iter().map(|(n, r)| (n.as_str(), r.elo, r.ci_low, r.ci_high)).collect();
            train::metrics::plot_intervals(&points, &png, &format!("Elo: mean over {rounds} orderings, 95% interval"))?;
            println!("plotted {}", png.display());
        }
    }
    Ok(())
}
