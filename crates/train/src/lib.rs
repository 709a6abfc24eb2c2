//! # train — the QLoRA trainer and the `qlora` binary
//!
//! The top of the stack (nf4 → quant → lora / optim → llama → data → train): this crate ties the others
//! into what a user runs. Its library holds the commands' logic with typed errors; `src/main.rs` is the thin
//! `qlora` binary (clap + anyhow) over it. Subcommands so far:
//!
//! - `qlora quantize`: convert a Hugging Face checkpoint to the bitsandbytes 4-bit layout (NF4/FP4,
//!   any power-of-two blocksize, double quantization on by default), loadable by transformers + bitsandbytes.
//! - `qlora forward | generate | chat`: run a model (HF directory, bitsandbytes checkpoint, GGUF, hub id or
//!   `smollm2`), dense or quantized on load; `forward` and `generate` take a T5 directory too ([`seq2seq`]).
//!
//! - `qlora train`: QLoRA finetuning ([`trainer`]) with checkpoints ([`checkpoint`]), metrics and a loss
//!   plot ([`metrics`]), configured by [`config::TrainConfig`] (flags or a TOML file).
//! - `qlora eval`: loss / perplexity on a dataset, or multiple-choice accuracy ([`eval`]).
//! - `qlora merge`: fold an adapter into its base.
//! - `qlora bench-step`: time one training step on random tokens ([`bench`]; `cargo xtask bench` runs it).
//! - `qlora answer` and `qlora judge pairwise | score | elo`: LLM-as-judge evaluation over the `judge` crate
//!   (the binary's `judge_cmd.rs`; the Elo plot is [`metrics::plot_intervals`]).

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod eval;
pub mod family;
pub mod infer;
pub mod metrics;
pub mod parallel;
pub mod quantize;
pub mod seq2seq;
pub mod trainer;

use std::path::PathBuf;

/// Errors of the qlora commands.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] llama::LlamaError),
    #[error(transparent)]
    T5(#[from] t5::T5Error),
    #[error(transparent)]
    Format(#[from] formats::FormatError),
    #[error(transparent)]
    Quant(#[from] quant::QuantError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Optim(#[from] optim::OptimError),
    #[error(transparent)]
    Lora(#[from] lora::LoraError),
    #[error("training diverged: {0}")]
    Diverged(String),
    /// The device failed during a step (out of memory, a lost device): nothing of that step was saved.
    #[error("{0}")]
    Device(String),
}
