use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong storing, reading or writing a quantized weight. Every variant names the
/// tensor (and the file where there is one).
#[derive(Debug, Error)]
pub enum QuantError {
    #[error("tensor `{tensor}`: {source}")]
    Quantize {
        tensor: String,
        #[source]
        source: nf4::Nf4Error,
    },
    #[error("tensor `{tensor}`: shape {shape:?} holds {expected} elements but {found} were given")]
    NumelMismatch { tensor: String, shape: Vec<usize>, expected: usize, found: usize },
    #[error("{file}: missing tensor `{tensor}` (needed for the bitsandbytes 4-bit weight `{weight}`)")]
    MissingTensor { file: String, weight: String, tensor: String },
    #[error("{file}: tensor `{tensor}` is invalid: {reason}")]
    InvalidTensor { file: String, tensor: String, reason: String },
    #[error("{file}: tensor `{tensor}` holds a malformed bitsandbytes quant_state: {reason}")]
    InvalidQuantState { file: String, tensor: String, reason: String },
    #[error("{file}: {source}")]
    Safetensors {
        file: String,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: {reason}", path.display())]
    InvalidConfig { path: PathBuf, reason: String },
}
