//! # ops — the custom ops of a QLoRA step, each with its own backward
//!
//! Between `quant` (the 4-bit weight) and the layers that use the ops (`lora`, `llama`, `t5`) in the stack
//! nf4 / bf16-gemm → quant → **ops** → lora / optim → formats → llama → data → train. burn composes
//! attention, RMSNorm, dropout and a dequantize-then-matmul from many small ops, and its autodiff keeps
//! every intermediate for the backward; here each is one op that keeps only what its backward needs.
//!
//! One convention for every op (one `#[backend_extension]` trait each):
//! - the **reference formula** in generic backend ops is the trait's default body (`*_reference`), so any
//!   backend runs it and the tests compare against it;
//! - a **flex host kernel** overrides it on the CPU (f32 and bf16; see [`dtype`] for the policy);
//! - the **Cube arm** (features `wgpu`/`cuda`) uses the reference or, for the 4-bit product and dropout,
//!   the `qlora-kernels` kernels on the tensors' own device buffers ([`cube`]);
//! - the **autodiff backward** is hand-written and recomputes what the forward dropped;
//! - a **test** checks the op and its gradient against the composed reference.
//!
//! | op | module | backward keeps |
//! |---|---|---|
//! | `x · dequant(W)ᵀ` | [`quant_matmul`] | the packed weight |
//! | seeded dropout | [`dropout`] | the seed |
//! | grouped causal attention | [`attention`] | q, k, v |
//! | RMSNorm, SwiGLU | [`fused`] | the inputs |
//! | chunked next-token loss | [`loss`] (host kernel [`loss_host`]) | the hidden states |
//! | AdamW page update, gradient norm (no autodiff) | [`adamw`] | — |
//!
//! [`host_matmul::matmul`] is the product all of them use (AVX512-BF16 through `bf16-gemm` on flex bf16),
//! [`simd`] the vectorised row kernels of the host ops.

pub mod adamw;
pub mod attention;
#[cfg(feature = "cube")]
pub mod cube;
pub mod dropout;
pub mod dtype;
pub mod fused;
pub mod host_matmul;
pub mod loss;
pub mod loss_host;
pub mod quant_matmul;
pub mod simd;
#[cfg(test)]
mod test_util;
