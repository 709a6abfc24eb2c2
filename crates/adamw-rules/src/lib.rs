//! # adamw — the AdamW update rules and the page interface of the paged optimizer
//!
//! Below both users in the stack: `qlora-kernels` (the fused device updates) and `optim` (the paged
//! optimizer) read the same rules from here, so neither depends on the other. Host reference kernels of
//! `torch.optim.AdamW` (f32 state) and of bitsandbytes' 32-bit and 8-bit blockwise AdamW, each in its
//! reference's float32 operation order ([`update`]); the two 8-bit state code books ([`codebooks`]); pages
//! of optimizer state ([`page`]); global gradient-norm clipping as torch's `clip_grad_norm_` ([`clip`]); and
//! [`PageDevice`], the memory that holds resident pages and runs the update on them ([`HostMemory`] for the CPU;
//! burn tensors on the training device in `optim`; raw device buffers in `qlora-kernels`).

pub mod clip;
pub mod codebooks;
mod device;
pub mod page;
pub mod update;

pub use device::{HostMemory, PageDevice, ParamValues, UpdateRule, update_host_page};
pub use page::{PageInfo, PageState, StateFormat};
