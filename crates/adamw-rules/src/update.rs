//! The AdamW update rules, on one page of one parameter, as host reference kernels.
//!
//! Each rule reproduces its reference's float32 operation order, including where the reference's vectorised
//! CPU kernels fuse a multiply-add (torch's `lerp_` and `addcmul_`, `add_(alpha=)`): that makes our moments
//! bit-identical to torch's and bitsandbytes'. Scalars are computed in f64 and rounded to f32 where the
//! reference does (Python floats passed to a float32 kernel). The only step we cannot reproduce bit for bit is
//! torch's CPU `sqrt`, which goes through MKL's vector math (not correctly rounded; about one element in five
//! differs by 1 ulp from the exact square root we use), so parameters agree to ~4e-8 of their scale.

use nf4::Codebook8;
use rayon::prelude::*;

/// bitsandbytes' blocksize for 8-bit optimizer state.
pub const STATE_BLOCKSIZE: usize = 256;

/// Elements per parallel work item inside a page.
const CHUNK: usize = 16 * STATE_BLOCKSIZE;

/// Hyperparameters of one AdamW update of one parameter (`step` counts from 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
}

/// `torch.optim.AdamW` (single-tensor CPU path of torch 2.15) on f32 state.
pub fn adamw_torch(param: &mut [f32], grad: &[f32], exp_avg: &mut [f32], exp_avg_sq: &mut [f32], h: &AdamHyper) {
    let decay = (1.0 - h.lr * h.weight_decay) as f32;
    let one_minus_beta1 = (1.0 - h.beta1) as f32;
    let beta2 = h.beta2 as f32;
    let one_minus_beta2 = (1.0 - h.beta2) as f32;
    let step = h.step as f64;
    let bias_correction1 = 1.0 - h.beta1.powf(step);
    let bias_correction2_sqrt = ((1.0 - h.beta2.powf(step)).powf(0.5)) as f32;
    let neg_step_size = (-(h.lr / bias_correction1)) as f32;
    let eps = h.eps as f32;
    let apply_decay = h.weight_decay != 0.0;
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(exp_avg.par_chunks_mut(CHUNK))
        .zip(exp_avg_sq.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                if apply_decay {
                    p[i] *= decay; // param.mul_(1 - lr * weight_decay)
                }
                m[i] = one_minus_beta1.mul_add(g[i] - m[i], m[i]); // exp_avg.lerp_(grad, 1 - beta1)
                v[i] = (one_minus_beta2 * g[i]).mul_add(g[i], v[i] * beta2); // mul_(beta2).addcmul_(g, g, 1 - beta2)
                let denom = v[i].sqrt() / bias_correction2_sqrt + eps;
                p[i] += neg_step_size * m[i] / denom; // addcdiv_(exp_avg, denom, value=-step_size)
            }
        });
}

/// The scalars both bitsandbytes updates derive from the hyperparameters (Python floats → f32 where the
/// kernels take them; bias corrections in f64 as Python computes them).
struct BnbScalars {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    correction1: f64,
    /// `sqrt(1 - beta2^t)`
    correction2: f64,
    decay: f32,
    apply_decay: bool,
}

impl BnbScalars {
    fn new(h: &AdamHyper) -> Self {
        let step = h.step as f64;
        BnbScalars {
            beta1: h.beta1 as f32,
            one_minus_beta1: (1.0 - h.beta1) as f32,
            beta2: h.beta2 as f32,
            one_minus_beta2: (1.0 - h.beta2) as f32,
            correction1: 1.0 - h.beta1.powf(step),
            correction2: (1.0 - h.beta2.powf(step)).sqrt(),
            decay: (1.0 - h.lr * h.weight_decay) as f32,
            apply_decay: h.weight_decay > 0.0,
        }
    }
}

/// bitsandbytes' 32-bit Adam/AdamW CPU update (`optimizer_update_32bit`): what `AdamW8bit` uses for tensors
/// under its `min_8bit_size`. Note its different epsilon placement (`eps * sqrt(1 - beta2^t)`).
pub fn adamw_bnb32(param: &mut [f32], grad: &[f32], state1: &mut [f32], state2: &mut [f32], h: &AdamHyper) {
    let BnbScalars { beta1, one_minus_beta1, beta2, one_minus_beta2, correction1, correction2, decay, apply_decay } =
        BnbScalars::new(h);
    let step_size = (-h.lr * correction2 / correction1) as f32;
    let eps_scaled = (h.eps * correction2) as f32;
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(state1.par_chunks_mut(CHUNK))
        .zip(state2.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                m[i] = g[i].mul_add(one_minus_beta1, m[i] * beta1); // mul_(beta1).add_(g, alpha=1 - beta1)
                v[i] = (one_minus_beta2 * g[i]).mul_add(g[i], v[i] * beta2);
                if apply_decay {
                    p[i] *= decay;
                }
                let update = m[i] / (v[i].sqrt() + eps_scaled);
                p[i] = update.mul_add(step_size, p[i]); // add_(update, alpha=step_size)
            }
        });
}

/// 8-bit blockwise state of a run of whole 256-element blocks: codes and one f32 absmax per block for each
/// moment (first: signed dynamic map, second: unsigned dynamic map).
pub struct Blockwise8Mut<'a> {
    pub codes1: &'a mut [u8],
    pub absmax1: &'a mut [f32],
    pub codes2: &'a mut [u8],
    pub absmax2: &'a mut [f32],
}

/// bitsandbytes' 8-bit blockwise AdamW CPU update (`optimizer_update_8bit_blockwise`): dequantize both
/// moments, update them in f32, update the parameter, re-quantize with the lookup-table quantizer.
pub fn adamw_bnb8(
    param: &mut [f32],
    grad: &[f32],
    state: Blockwise8Mut<'_>,
    signed: &Codebook8,
    unsigned: &Codebook8,
    h: &AdamHyper,
) {
    let BnbScalars { beta1, one_minus_beta1, beta2, one_minus_beta2, correction1, correction2, decay, apply_decay } =
        BnbScalars::new(h);
    let correction2 = correction2 as f32;
    let neg_step_size = (-h.lr / correction1) as f32;
    let eps = h.eps as f32;
    let Blockwise8Mut { codes1, absmax1, codes2, absmax2 } = state;
    let blocks_per_chunk = CHUNK / STATE_BLOCKSIZE;
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(codes1.par_chunks_mut(CHUNK))
        .zip(codes2.par_chunks_mut(CHUNK))
        .zip(absmax1.par_chunks_mut(blocks_per_chunk))
        .zip(absmax2.par_chunks_mut(blocks_per_chunk))
        .for_each(|(((((p, g), q1), q2), a1), a2)| {
            let mut m = [0.0f32; STATE_BLOCKSIZE];
            let mut v = [0.0f32; STATE_BLOCKSIZE];
            for (b, start) in (0..p.len()).step_by(STATE_BLOCKSIZE).enumerate() {
                let end = (start + STATE_BLOCKSIZE).min(p.len());
                let n = end - start;
                for i in 0..n {
                    let j = start + i;
                    let m_old = signed.values()[q1[j] as usize] * a1[b];
                    let v_old = unsigned.values()[q2[j] as usize] * a2[b];
                    m[i] = g[j].mul_add(one_minus_beta1, m_old * beta1);
                    v[i] = (one_minus_beta2 * g[j]).mul_add(g[j], v_old * beta2);
                    let denom = v[i].sqrt() / correction2 + eps;
                    if apply_decay {
                        p[j] *= decay;
                    }
                    p[j] += neg_step_size * m[i] / denom; // addcdiv_(m, denom, value=-lr / correction1)
                }
                a1[b] = requantize(&m[..n], signed, &mut q1[start..end]);
                a2[b] = requantize(&v[..n], unsigned, &mut q2[start..end]);
            }
        });
}

/// Quantizes one block like bitsandbytes' CPU `quantize_blockwise` and returns its absmax.
fn requantize(values: &[f32], codebook: &Codebook8, codes: &mut [u8]) -> f32 {
    let absmax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if absmax == 0.0 {
        codes.fill(0);
        return 0.0;
    }
    let inverse = 1.0f32 / absmax;
    for (c, &v) in codes.iter_mut().zip(values) {
        *c = codebook.code_of_scaled(v * inverse);
    }
    absmax
}
