//! # optim — paged AdamW for QLoRA
//!
//! Beside `lora` in the stack (nf4 / bf16-gemm → quant → ops → lora / optim → formats → llama → data → train),
//! on `adamw-rules` (the update rules and the page interface, shared with the device kernels). QLoRA's third memory
//! idea: optimizer state that pages between host and device, so a memory spike never runs a finetune out of
//! device memory. [`PagedAdamW`] keeps both Adam moments in fixed-size host pages — f32 with
//! `torch.optim.AdamW`'s update, or 8-bit blockwise with `bitsandbytes.optim.AdamW8bit`'s (signed/unsigned
//! dynamic maps, 256-element blocks, small tensors in 32-bit) — and a [`Pager`] streams them through a device
//! budget, counting the bytes it moves. [`device`] runs the whole step on the training device (the trainer's
//! path on every backend: gradients, their norm, clipping and the update never leave the device; pages are
//! tensors there and the update is `ops::adamw`); [`module`] is the same bridge for host slices. Also here:
//! global gradient-norm clipping as torch's `clip_grad_norm_` ([`clip`]), warmup + constant/linear/cosine
//! schedules ([`schedule`]), bit-exact state checkpoints.

mod checkpoint;
pub mod device;
pub mod module;
mod optimizer;
pub mod pager;
pub mod schedule;

/// The update rules, code books and pages live in `adamw-rules` (shared with the device kernels).
pub use adamw_rules::{clip, codebooks, page, update};

use std::collections::BTreeMap;
use std::path::Path;

pub use adamw_rules::{HostMemory, PageDevice, PageState, ParamValues, StateFormat, UpdateRule};
pub use device::{FlatTensor, TensorPages};
pub use module::{HostTensor, gradients_of, trainable_tensors, write_tensors};
pub use optimizer::{AdamPrecision, PagedAdamW, PagedAdamWConfig, ParamGrad};
pub use pager::{Pager, PagerStats};
pub use schedule::{LrSchedule, LrScheduleConfig, ScheduleKind, Warmup};

/// Errors of optimizer configuration, parameters and checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("optimizer config: {0}")]
    Config(String),
    #[error("device budget of {budget} bytes is smaller than one page ({page_bytes} bytes)")]
    BudgetTooSmall { budget: usize, page_bytes: usize },
    #[error("parameter {key}: {reason}")]
    Param { key: String, reason: String },
    #[error("gradient norm is {norm} (gradient of {key} is not finite): stopping before the update")]
    NonFiniteGradient { key: String, norm: f32 },
    #[error("optimizer checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },
}

impl OptimError {
    pub(crate) fn checkpoint(path: &Path, reason: impl std::fmt::Display) -> Self {
        OptimError::Checkpoint { path: path.display().to_string(), reason: reason.to_string() }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub lr: f64,
    pub pager: PagerStats,
}

impl<D: PageDevice<Values = [f32]>> PagedAdamW<D> {
    /// One step on a burn module: clip `grads` (by module path, e.g. accumulated over micro-batches) to a global
    /// norm of `max_grad_norm`, update every parameter that has a gradient, and return the updated module.
    /// A non-finite gradient stops before anything is changed.
    pub fn step_module<M: burn::module::Module>(
        &mut self,
        module: &M,
        mut grads: BTreeMap<String, HostTensor>,
        lr: f64,
        max_grad_norm: Option<f32>,
    ) -> Result<(M, StepReport), OptimError> {
        let norm = clip::global_grad_norm(grads.values().map(|g| g.values.as_slice()));
        if !norm.is_finite() {
            let key = grads
                .iter()
                .find(|(_, g)| g.values.iter().any(|v| !v.is_finite()))
                .map(|(k, _)| k.clone())
                .unwrap_or_default();
            return Err(OptimError::NonFiniteGradient { key, norm });
        }
        if let Some(max) = max_grad_norm {
            let mut slices: Vec<&mut [f32]> = grads.values_mut().map(|g| g.values.as_mut_slice()).collect();
            clip::clip_grad_norm(&mut slices, max);
        }
        let mut params = trainable_tensors(module)?;
        if let Some(unknown) = grads.keys().find(|k| !params.contains_key(*k)) {
            return Err(OptimError::Param {
                key: unknown.clone(),
                reason: "has a gradient but is not a trainable parameter".into(),
            });
        }
        let mut updates: Vec<ParamGrad<'_>> = Vec::with_capacity(grads.len());
        for (key, param) in params.iter_mut() {
            if let Some(grad) = grads.get(key) {
                updates.push(ParamGrad { key, param: &mut param.values, grad: &grad.values });
            }
        }
        let pager = self.step(lr, &mut updates)?;
        drop(updates);
        params.retain(|k, _| grads.contains_key(k));
        let module = write_tensors(module.clone(), &params)?;
        Ok((module, StepReport { grad_norm: norm, lr, pager }))
    }
}

#[cfg(test)]
mod tests;
