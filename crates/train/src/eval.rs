//! `qlora eval`: held-out loss and perplexity, or multiple-choice accuracy (MMLU-style JSONL: `question`,
//! `choices`, `answer`) by comparing the log-likelihood of each choice after the question, k-shot. For any
//! model [`Family`]: a decoder scores the choice as the continuation of the prompt, an encoder–decoder as
//! the target given the prompt as its source.

use std::path::{Path, PathBuf};

use burn::module::Module;
use data::{Batch, DatasetFormat, Limits};
use llama::LlamaModel;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::TrainError;
use crate::family::{Family, MicroBatch, TrainModel};

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub question: String,
    pub choices: Vec<String>,
    pub answer: usize,
}

/// The result of `qlora eval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EvalReport {
    Loss { loss: f64, perplexity: f64, examples: usize, target_tokens: usize },
    MultipleChoice { accuracy: f64, correct: usize, total: usize, shots: usize },
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EvalReport::Loss { loss, perplexity, examples, target_tokens } => {
                write!(
                    f,
                    "loss {loss:.4}, perplexity {perplexity:.3} ({examples} examples, {target_tokens} target tokens)"
                )
            }
            EvalReport::MultipleChoice { accuracy, correct, total, shots } => {
                write!(f, "accuracy {:.2}% ({correct}/{total}, {shots}-shot)", accuracy * 100.0)
            }
        }
    }
}

/// Is this JSONL file multiple-choice (its first non-empty line has `question` and `choices`)?
pub fn is_multiple_choice(text: &str) -> bool {
    text.lines()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .is_some_and(|v| v.get("question").is_some() && v.get("choices").is_some())
}

/// Parses MMLU-style lines; `answer` is an index or a letter (A, B, …).
pub fn parse_questions(text: &str, file: &str) -> Result<Vec<Question>, TrainError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |reason: String| TrainError::Input(format!("{file}:{}: {reason}", i + 1));
        let v: Value = serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let question = v
            .get("question")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("`question` must be a string".into()))?
            .to_string();
        let choices: Vec<String> = v
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|c| c.as_str().map(String::from)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad("`choices` must be a list of strings".into()))?;
        if choices.len() < 2 {
            return Err(bad("a question needs at least two choices".into()));
        }
        let answer = match v.get("answer") {
            Some(Value::Number(n)) => n.as_u64().map(|n| n as usize),
            Some(Value::String(s)) if s.len() == 1 && s.as_bytes()[0].is_ascii_uppercase() => {
                Some((s.as_bytes()[0] - b'A') as usize)
            }
            _ => None,
        }
        .filter(|&a| a < choices.len())
        .ok_or_else(|| bad(format!("`answer` must be an index below {} or a letter", choices.len())))?;
        out.push(Question { question, choices, answer });
    }
    if out.is_empty() {
        return Err(TrainError::Input(format!("{file}: no questions")));
    }
    Ok(out)
}

/// Sum of the negative log-likelihood of each row's target tokens (a Llama-family model).
pub fn nll_per_example(model: &LlamaModel, batch: &Batch) -> Vec<f64> {
    model.nll_rows(batch, &model.device())
}

fn shot_text(q: &Question) -> String {
    format!("Question: {}\nAnswer: {}\n\n", q.question, q.choices[q.answer])
}

/// Multiple-choice accuracy: the first `shots` questions are the demonstrations, the rest are scored.
pub fn multiple_choice<F: Family>(loaded: &F, questions: &[Question], shots: usize) -> Result<EvalReport, TrainError> {
    if shots >= questions.len() {
        return Err(TrainError::Input(format!(
            "{shots} shots leave none of the {} questions to score",
            questions.len()
        )));
    }
    let model = loaded.model().valid();
    let device = model.devices()[0].clone();
    let prefix: String = questions[..shots].iter().map(shot_text).collect();
    let mut correct = 0;
    for q in &questions[shots..] {
        let prompt = format!("{prefix}Question: {}\nAnswer:", q.question);
        let rows: Vec<F::Example> =
            q.choices.iter().map(|c| loaded.choice_example(&prompt, c)).collect::<Result<_, TrainError>>()?;
        let nll = model.nll_rows(&loaded.batch(&rows.iter().collect::<Vec<_>>()), &device);
        let best = nll.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).expect("choices");
        correct += usize::from(best == q.answer);
    }
    let total = questions.len() - shots;
    Ok(EvalReport::MultipleChoice { accuracy: correct as f64 / total as f64, correct, total, shots })
}

/// What `qlora eval` needs.
#[derive(Debug, Clone)]
pub struct EvalArgs {
    pub data: PathBuf,
    pub format: DatasetFormat,
    pub limits: Limits,
    pub micro_batch_size: usize,
    pub shots: usize,
}

/// Runs `qlora eval` on a loaded model (with its adapter applied, if any).
pub fn run<F: Family>(loaded: &F, args: &EvalArgs) -> Result<EvalReport, TrainError> {
    let path: &Path = &args.data;
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io { path: path.to_path_buf(), source })?;
    let file = path.display().to_string();
    if is_multiple_choice(&text) {
        return multiple_choice(loaded, &parse_questions(&text, &file)?, args.shots);
    }
    let report = data::parse_jsonl(&text, &file, args.format, false)?;
    let tokenized = loaded.tokenize(&report.examples, &args.limits)?;
    let model = loaded.model().valid();
    let device = model.devices()[0].clone();
    let (mut sum, mut tokens) = (0.0f64, 0usize);
    for chunk in tokenized.examples.chunks(args.micro_batch_size.max(1)) {
        let batch = loaded.batch(&chunk.iter().collect::<Vec<_>>());
        sum += model.nll_rows(&batch, &device).iter().sum::<f64>();
        tokens += batch.targets();
    }
    let loss = sum / tokens.max(1) as f64;
    Ok(EvalReport::Loss { loss, perplexity: loss.exp(), examples: tokenized.examples.len(), target_tokens: tokens })
}
