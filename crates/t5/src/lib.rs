//! # t5 — the encoder–decoder QLoRA finetunes (T5, Flan-T5, mT5)
//!
//! Beside `llama` in the stack (nf4 / bf16-gemm → quant → ops → lora / optim → formats → llama, t5 → data
//! → train), on the same pieces: every projection is a [`lora::LoraLinear`] over a dense or 4-bit
//! [`lora::FrozenLinear`], weights come through `lora::weights` (HF checkpoints, single or sharded,
//! f32/bf16/f16, or bitsandbytes 4-bit; NF4/FP4 + double quant on load), adapters through `lora::attach`
//! (PEFT `SEQ_2_SEQ_LM`). Computed as transformers' `T5ForConditionalGeneration` computes it: RMS layer
//! norm without mean or bias (f32 statistics); attention without `1/√d` scaling plus a relative position
//! bias (buckets bidirectional in the encoder, causal in the decoder, log-spaced beyond `max_exact`, capped
//! at `max_distance`; the table in the first block of each stack, shared by the rest); cross-attention; ReLU
//! (v1.0: `wi`, `wo`) or gated-GELU (v1.1 / Flan-T5 / mT5: `wi_0`, `wi_1`, `wo`) feed-forward; the
//! `d_model^-0.5` rescale before the head of a tied model; KV caches for self- and cross-attention and
//! generation through them (greedy or sampled, [`generate`]); the training loss of a padded source/target
//! batch ([`T5Model::nll_sum`], the chunked loss when the head is dense), which `train` drives through the
//! same trainer as Llama; and several sequences with different adapters in one step for serving
//! ([`batch`]).

mod adapters;
pub mod batch;
mod config;
mod error;
pub mod generate;
mod init;
mod load;
mod model;

pub use config::{Activation, T5Config};
pub use error::T5Error;
pub use init::{AttentionConfig, DecoderLayerConfig, EncoderLayerConfig, FeedForwardConfig, T5LayerNormConfig};
pub use load::{LoadedT5, is_t5_dir, load, load_hf};
pub use lora::weights::LoadOptions;
pub use model::{
    Attention, DecoderLayer, EncoderLayer, FeedForward, KeyValues, RelativeBias, T5Cache, T5LayerNorm, T5Model,
    activate, relative_position_bucket,
};
