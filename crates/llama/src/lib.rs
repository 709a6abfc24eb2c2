//! # llama — the decoder QLoRA finetunes
//!
//! Above `lora` and `formats` in the stack (nf4 / bf16-gemm → quant → ops → lora / optim → formats → llama
//! → data → train). A Llama-family causal LM
//! (Llama 2/3, Mistral, Qwen2 with q/k/v biases, SmolLM) on burn, computed as transformers computes it:
//! RMSNorm with f32 statistics, rotary embeddings with rotate_half (and Llama-3 scaling), grouped-query
//! attention (a fused causal op with its own backward, `ops::attention`) and a KV cache, SwiGLU MLP, tied or
//! untied lm_head, f32/bf16/f16 compute. [`batch`] runs many sequences at once, each with its own cache and
//! LoRA adapter on the one base (for serving).
//! Every projection is a [`lora::FrozenLinear`], dense or 4-bit, so LoRA wraps one type. Loaders read HF
//! directories (transformers 4 and 5 config forms, sharded safetensors) and bitsandbytes 4-bit checkpoints
//! without re-quantizing, or quantize on load (NF4/FP4, double quant). Generation: greedy and sampled
//! (temperature, top-k, top-p, repetition penalty) with stop tokens, through the KV cache.

mod adapters;
pub mod batch;
mod config;
mod error;
pub mod generate;
mod init;
mod load;
pub mod merge_base;
mod model;
pub mod random;
mod weights;

pub use config::{Llama3RopeScaling, LlamaConfig};
pub use error::LlamaError;
pub use init::{AttentionConfig, DecoderLayerConfig, FrozenWeights, MlpConfig, RandomInit, RmsNormConfig};
pub use load::{LoadOptions, LoadedModel, load, load_hf};
pub use model::{Attention, DecoderLayer, KvCache, LlamaModel, Mlp, RmsNorm, Rotary};
pub use weights::{GgufWeights, WeightSource};
