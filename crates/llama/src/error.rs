use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong loading or running a model; each names the file and tensor involved.
#[derive(Debug, Error)]
pub enum LlamaError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {reason}")]
    InvalidConfig { file: String, reason: String },
    /// A tensor missing or of the wrong shape, or a weight source that failed (`lora::weights`).
    #[error(transparent)]
    Weights(#[from] lora::weights::WeightError),
    #[error(transparent)]
    Quant(#[from] quant::QuantError),
    /// An adapter, or a checkpoint read as a merge base (`lora`).
    #[error(transparent)]
    Lora(#[from] lora::LoraError),
    /// A model file, tokenizer or model spec (`formats`); a GGUF error arrives here too.
    #[error(transparent)]
    Format(#[from] formats::FormatError),
    #[error("token id {id} is outside the vocabulary ({vocab} tokens)")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("{0}")]
    Generation(String),
    #[error("{file}: {reason}")]
    Tokenizer { file: String, reason: String },
}

/// A GGUF error is a [`formats::FormatError::Gguf`], so each error has one place in [`LlamaError`].
impl From<formats::gguf::GgufError> for LlamaError {
    fn from(e: formats::gguf::GgufError) -> Self {
        LlamaError::Format(e.into())
    }
}
