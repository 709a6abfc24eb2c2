//! # lora — QLoRA linear layers
//!
//! Third in the stack (nf4 → quant → lora / optim → llama → data → train). A linear layer of the model is a
//! [`FrozenLinear`]: a frozen base weight, dense (f32/bf16/f16) or 4-bit ([`quant::DeviceQuantizedWeight`],
//! never stored dequantized), with an optional frozen bias, computing `y = x·Wᵀ + b` in HF's `[out, in]`
//! convention. The model crate builds every projection from this type, so the LoRA adapters (trainable A
//! and B, PEFT semantics and file format) wrap exactly one place.

mod frozen;

pub use frozen::{BaseWeight, FrozenLinear};
