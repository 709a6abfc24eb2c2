//! # qlora-kernels — the GPU side of QLoRA, written once in CubeCL
//!
//! Sits beside the straight crate stack (nf4 → quant → lora / optim → …): it depends on `nf4` (the CPU
//! reference every kernel is tested against, and the code books) and `adamw-rules` (the host update rules and the
//! `PageDevice` trait the paged optimizer runs on; `optim` uses the same crate, so neither depends on the other). Kernels, each next to its launch code:
//! [`dequant`] (NF4/FP4, plain or double-quantized absmax → f32/bf16/f16 in one pass), [`matmul`] (the QLoRA
//! linear's `x·Wᵀ` and input gradient `dy·W` reading W as packed 4-bit codes, decoded tile by tile into shared
//! memory, plus a streaming GEMV for decode-sized batches), [`quantize`] (f32/bf16/f16 → NF4 + double quant on
//! the device, bitsandbytes-exact) and [`adamw`] (the paged optimizer's fused 32-bit and 8-bit blockwise
//! updates, and a [`adamw_rules::PageDevice`] whose pages live in device memory). The same kernels run on CUDA
//! (feature `cuda`) and, in CI, on the CPU through wgpu over Mesa's lavapipe (feature `wgpu`, the default).

// Kernel code initialises variables before comptime branches assign them (the cube macro needs a value).
#![allow(unused_assignments)]

pub mod adamw;
pub mod dequant;
mod device;
mod error;
pub mod matmul;
pub mod numerics;
pub mod quantize;
mod weight;

pub use device::{DeviceKind, client_for};
pub use error::KernelError;
pub use nf4::FloatDtype;
pub use weight::{DeviceWeight4bit, upload_as};

pub mod check;
