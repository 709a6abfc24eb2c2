use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong loading or running a T5 model; each names the file and tensor involved.
#[derive(Debug, Error)]
pub enum T5Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {reason}")]
    InvalidConfig { file: String, reason: String },
    /// A tensor missing or of the wrong shape, or a checkpoint that cannot be read (`lora::weights`).
    #[error(transparent)]
    Weights(#[from] lora::weights::WeightError),
    #[error(transparent)]
    Quant(#[from] quant::QuantError),
    /// An adapter (`lora`).
    #[error(transparent)]
    Lora(#[from] lora::LoraError),
    /// A tokenizer or model source (`formats`).
    #[error(transparent)]
    Format(#[from] formats::FormatError),
    #[error("token id {id} is outside the vocabulary ({vocab} tokens)")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("{0}")]
    Generation(String),
}
