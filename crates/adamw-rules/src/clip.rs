//! Global gradient-norm clipping across all trainable tensors, as `torch.nn.utils.clip_grad_norm_`.
//!
//! burn's `GradientClippingConfig::Norm` clips each parameter by its own norm; QLoRA (max_grad_norm 0.3)
//! clips by the norm of all gradients together: `total = ‖(‖g₁‖, ‖g₂‖, …)‖₂`, `coef = max / (total + 1e-6)`,
//! and every gradient is multiplied by `min(coef, 1)` (torch multiplies even when the coefficient is 1).

use rayon::prelude::*;

/// The L2 norm of one tensor, accumulated in f64 and rounded once.
pub fn tensor_norm(values: &[f32]) -> f32 {
    values.par_chunks(1 << 14).map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()).sum::<f64>().sqrt()
        as f32
}

/// The global norm: the L2 norm of the per-tensor norms (each rounded to f32, as torch's `_foreach_norm`).
pub fn global_grad_norm<'a>(grads: impl IntoIterator<Item = &'a [f32]>) -> f32 {
    grads.into_iter().map(|g| tensor_norm(g) as f64).map(|n| n * n).sum::<f64>().sqrt() as f32
}

/// The factor torch multiplies every gradient by: `min(max_norm / (total_norm + 1e-6), 1)` in f32.
pub fn clip_coefficient(total_norm: f32, max_norm: f32) -> f32 {
    (max_norm / (total_norm + 1e-6)).min(1.0)
}

/// Clips `grads` in place to a global norm of `max_norm`; returns the norm before clipping. A non-finite norm
/// is returned as is and the gradients are left untouched (the caller decides to stop).
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let total = global_grad_norm(grads.iter().map(|g| &**g));
    if !total.is_finite() {
        return total;
    }
    let coef = clip_coefficient(total, max_norm);
    for g in grads.iter_mut() {
        g.par_iter_mut().for_each(|v| *v *= coef);
    }
    total
}
