//! # lora — QLoRA linear layers
//!
//! Above `ops` in the stack (nf4 / bf16-gemm → quant → ops → lora / optim → formats → llama → data → train). Every linear layer of the model
//! is a [`LoraLinear`]: a [`FrozenLinear`] base — dense, or 4-bit ([`quant::DeviceQuantizedWeight`], never
//! stored dequantized) — plus an optional trainable [`LoraAdapter`] (A `[r, in]`, B `[out, r]`), computing
//! `y = x·Wᵀ + b + (α/r)·dropout(x)·Aᵀ·Bᵀ` with PEFT's semantics and initialisation. The 4-bit product runs
//! through [`ops::quant_matmul::quant_matmul_t`], a burn backend extension whose backward keeps only the packed
//! weight and returns the input gradient; the base never gets a gradient. [`LoraConfig`] picks the targets
//! (`all-linear`, names, or a regex) and the rank, α, dropout and rsLoRA scaling. A layer with a 4-bit base and an
//! adapter runs as one op ([`qlora_linear`]). With the `wgpu` or `cuda` feature the ops also run on burn's
//! CubeCL backend through the `qlora-kernels` kernels (`ops::cube`). What every model family shares sits here
//! too: frozen tensors by Hugging Face name from a checkpoint ([`weights`]) and LoRA on a model's list of
//! named linear layers ([`attach`]: fresh adapters, PEFT adapter directories in and out), and adapters held
//! beside a shared base for serving ([`side`]).

mod adapter;
pub mod attach;
mod frozen;
pub mod merge;
pub mod peft;
pub mod qlora_linear;
pub mod side;
pub mod weights;

pub use adapter::{LoraAdapter, LoraConfig, LoraInit, LoraLinear, TargetModules};
pub use frozen::{BaseWeight, FrozenLinear};
pub use side::{AdapterGroups, SideAdapter};

/// Errors of LoRA configuration and adapters.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("LoRA config: {0}")]
    Config(String),
    #[error("LoRA adapter: {0}")]
    Adapter(String),
}
