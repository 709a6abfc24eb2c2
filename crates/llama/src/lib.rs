//! # llama — the decoder QLoRA finetunes
//!
//! Fifth in the stack (nf4 → quant → lora / optim → llama → data → train). A Llama-family causal LM
//! (Llama 2/3, Mistral, Qwen2 with q/k/v biases, SmolLM) on burn, computed as transformers computes it:
//! RMSNorm with f32 statistics, rotary embeddings with rotate_half (and Llama-3 scaling), grouped-query
//! attention (a fused causal op with its own backward, [`attention`]) and a KV cache, SwiGLU MLP, tied or
//! untied lm_head, f32/bf16/f16 compute.
//! Every projection is a [`lora::FrozenLinear`], dense or 4-bit, so LoRA wraps one type. Loaders read HF
//! directories (transformers 4 and 5 config forms, sharded safetensors) and bitsandbytes 4-bit checkpoints
//! without re-quantizing, or quantize on load (NF4/FP4, double quant). Generation: greedy and sampled
//! (temperature, top-k, top-p, repetition penalty) with stop tokens, through the KV cache.

mod adapters;
pub mod attention;
mod config;
mod error;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod gguf_tokenizer;
mod load;
pub mod loss;
mod loss_host;
mod model;
pub mod random;
mod simd;
#[cfg(test)]
mod test_util;
pub mod source;
pub mod tokenizer;

pub use config::{Llama3RopeScaling, LlamaConfig};
pub use error::LlamaError;
pub use load::{load, load_hf, GgufWeights, LoadOptions, LoadedModel, WeightSource};
pub use model::{Attention, DecoderLayer, KvCache, LlamaModel, Mlp, RmsNorm, Rotary};
