//! # judge — evaluating chatbots with an LLM judge, as the QLoRA paper does
//!
//! Beside `data` in the stack, with no dependency on the model crates (`train` builds the `qlora answer` and
//! `qlora judge` commands on it): everything about LLM-as-judge evaluation that is not running a model.
//!
//! - [`files`]: FastChat's `question.jsonl` (`{"question_id", "category", "turns"}`), its model-answer
//!   lines (`choices[0].turns`), FastChat's battle lines (`{"question_id", "model_a", "model_b", "winner"}`);
//!   bad lines are reported as `file:line: reason`.
//! - [`prompt`]: the judge prompts (FastChat's `pair-v2` three-class prompt, the Vicuna-benchmark 1–10
//!   scoring prompt), files the user can replace.
//! - [`verdict`]: reading `[[A]]`/`[[B]]`/`[[C]]`, qlora's last-line `1`/`2`/`3` and the first-line score
//!   pair; an unreadable judgment is an error verdict, never a guess; disagreeing orders are a tie.
//! - [`cache`]: the append-only JSONL judgment cache keyed by the exact request (question, both answers in
//!   their order, judge model, prompt), so interrupted runs resume.
//! - [`client`]: a blocking OpenAI-compatible chat client with bounded retries and backoff.
//! - [`run`]: the pairwise tournament and the score-against-a-reference run over any [`run::Judge`].
//! - [`elo`] and [`stats`]: online Elo averaged over seeded random orderings, bootstrap intervals.

pub mod cache;
pub mod client;
pub mod elo;
pub mod files;
pub mod prompt;
pub mod run;
pub mod stats;
pub mod verdict;

use std::path::PathBuf;

/// Errors of judge evaluation.
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    /// A line of an input file that cannot be used: `file:line: reason`.
    #[error("{}:{line}: {reason}", path.display())]
    Line { path: PathBuf, line: usize, reason: String },
    /// A problem with a whole file (missing questions, different question sets, ...).
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The judge endpoint failed after the retries (what was cached before stays cached).
    #[error("judge endpoint {url}: {reason}")]
    Endpoint { url: String, reason: String },
    #[error("{0}")]
    Input(String),
}

impl JudgeError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> JudgeError {
        let path = path.into();
        move |source| JudgeError::Io { path, source }
    }
}
