//! # lora — QLoRA linear layers
//!
//! Third in the stack (nf4 → quant → lora / optim → llama → data → train). Every linear layer of the model
//! is a [`LoraLinear`]: a [`FrozenLinear`] base — dense, or 4-bit ([`quant::DeviceQuantizedWeight`], never
//! stored dequantized) — plus an optional trainable [`LoraAdapter`] (A `[r, in]`, B `[out, r]`), computing
//! `y = x·Wᵀ + b + (α/r)·dropout(x)·Aᵀ·Bᵀ` with PEFT's semantics and initialisation. The 4-bit product runs
//! through [`quant_matmul::quant_matmul_t`], a burn backend extension whose backward keeps only the packed
//! weight and returns the input gradient; the base never gets a gradient. [`LoraConfig`] picks the targets
//! (`all-linear`, names, or a regex) and the rank, α, dropout and rsLoRA scaling. With the `wgpu` or `cuda`
//! feature the extensions also run on burn's CubeCL backend through the `qlora-kernels` kernels ([`cube`]).

mod adapter;
#[cfg(feature = "cube")]
pub mod cube;
pub mod dropout;
mod frozen;
pub mod host_matmul;
pub mod merge;
pub mod peft;
pub mod qlora_linear;
pub mod quant_matmul;

pub use adapter::{LoraAdapter, LoraConfig, LoraInit, LoraLinear, TargetModules};
pub use frozen::{BaseWeight, FrozenLinear};

/// Errors of LoRA configuration and adapters.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("LoRA config: {0}")]
    Config(String),
    #[error("LoRA adapter: {0}")]
    Adapter(String),
}
