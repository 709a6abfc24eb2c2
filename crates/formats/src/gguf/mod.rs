//! Reader for GGUF files (llama.cpp's model format), with no dependency on burn.
//!
//! * [`GgufFile::open`] memory-maps a file and parses its header: metadata ([`GgufValue`]) and
//!   tensor infos ([`GgufTensorInfo`]). GGUF v2 and v3, little-endian only.
//! * [`GgufFile::tensor_f32`] dequantizes one tensor to `f32`, row-major, with the shape in
//!   PyTorch / Hugging Face order (GGUF lists dimensions fastest-first; they are reversed here).
//!   Types: F32, F16, BF16, F64, I8, I16, I32, I64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
//!   Q4_K, Q5_K, Q6_K, Q8_K, IQ4_NL, IQ4_XS and MXFP4, each exactly as ggml's
//!   `dequantize_row_*` (same operations in the same order, no fused multiply-add).
//! * [`unpermute_qk`] undoes the row permutation llama.cpp's `convert_hf_to_gguf.py` applies to
//!   `q_proj` / `k_proj` of Llama models, [`hf_tensor_name`] maps tensor names to Hugging Face
//!   names, and [`GgufFile::llama_params`] reads the hyper-parameters.
//!
//! # Hostile input
//! Every count, string length, array length, tensor dimension, offset and size is checked against
//! the real file size before anything is allocated, so a corrupt or malicious header yields a
//! [`GgufError`] (naming the file, and the tensor or metadata key where there is one), never a huge
//! allocation, a panic or a hang. Nested arrays are limited to [`MAX_ARRAY_NESTING`] levels.
//!
//! The file is memory-mapped: like every memory-mapped reader, it assumes the file is not
//! truncated by another process while it is open.
//!
//! Parts: [`GgufFile`] and the header parser (`file.rs`), metadata values ([`GgufValue`],
//! `values.rs`), tensor types and infos ([`GgmlType`], [`GgufTensorInfo`], `tensor_types.rs`), the
//! ggml dequantizers ([`dequantize`], `dequant.rs`), the Llama helpers ([`hf_tensor_name`],
//! [`unpermute_qk`], [`GgufLlamaParams`], `names.rs`) and the tokenizer rebuilt from the
//! `tokenizer.*` metadata ([`tokenizer`]).

mod dequant;
mod file;
mod names;
mod tensor_types;
#[cfg(test)]
pub(crate) mod test_support;
pub mod tokenizer;
mod values;

use std::path::PathBuf;

pub use dequant::dequantize;
pub use file::GgufFile;
pub use names::{GgufLlamaParams, hf_tensor_name, permute_qk, unpermute_qk};
pub use tensor_types::{GgmlType, GgufTensorInfo};
pub use values::{GgufValue, GgufValueType};

/// The four magic bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Tensor data alignment used when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most this many dimensions (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays accepted (GGUF files in the wild use 1).
pub const MAX_ARRAY_NESTING: usize = 8;
/// Largest `general.alignment` accepted.
pub const MAX_ALIGNMENT: u64 = 1 << 16;

/// Everything that can go wrong reading a GGUF file. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read GGUF file: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic bytes {magic:02x?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, magic: Vec<u8> },
    #[error("{path}: big-endian GGUF files are not supported")]
    BigEndian { path: PathBuf },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: file truncated: {what} needs {needed} bytes at offset {offset}, file has {file_len}")]
    Truncated { path: PathBuf, what: String, offset: u64, needed: u64, file_len: u64 },
    #[error("{path}: corrupt GGUF header: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: tensor `{tensor}`: {what}")]
    InvalidTensor { path: PathBuf, tensor: String, what: String },
    #[error("{path}: tensor `{tensor}` has ggml type {type_id} ({type_name}), which cannot be dequantized")]
    UnsupportedTensorType { path: PathBuf, tensor: String, type_id: u32, type_name: &'static str },
    #[error("{path}: no tensor named `{tensor}`")]
    TensorNotFound { path: PathBuf, tensor: String },
    #[error("{path}: missing metadata key `{key}`")]
    MissingMetadata { path: PathBuf, key: String },
    #[error("{path}: metadata key `{key}`: {what}")]
    InvalidMetadata { path: PathBuf, key: String, what: String },
    #[error("{path}: cannot build tokenizer: {what}")]
    Tokenizer { path: PathBuf, what: String },
    #[error("cannot unpermute Q/K weight: {what}")]
    InvalidPermutation { what: String },
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;
