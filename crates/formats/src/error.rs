use std::path::PathBuf;

use thiserror::Error;

use crate::gguf::GgufError;

/// Everything that can go wrong reading a model file, a tokenizer or a model spec; each names the
/// file, spec or hub id involved.
#[derive(Debug, Error)]
pub enum FormatError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model spec (`--model`, `random:…`) or a file that is not what it must be.
    #[error("{file}: {reason}")]
    InvalidInput { file: String, reason: String },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{file}: {reason}")]
    Tokenizer { file: String, reason: String },
    #[error("hub model `{id}`: {reason}")]
    Hub { id: String, reason: String },
    #[error("fetching the model: {0}")]
    Fetch(String),
}
