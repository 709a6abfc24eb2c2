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
    #[error("{file}: missing tensor `{tensor}`")]
    MissingTensor { file: String, tensor: String },
    #[error("{file}: tensor `{tensor}` has shape {found:?}, but the config needs {expected:?}")]
    ShapeMismatch { file: String, tensor: String, expected: Vec<usize>, found: Vec<usize> },
    #[error(transparent)]
    Quant(#[from] quant::QuantError),
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error("token id {id} is outside the vocabulary ({vocab} tokens)")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("{0}")]
    Generation(String),
    #[error("{file}: {reason}")]
    Tokenizer { file: String, reason: String },
    #[error("hub model `{id}`: {reason}")]
    Hub { id: String, reason: String },
    #[error("fetching the model: {0}")]
    Fetch(String),
}
