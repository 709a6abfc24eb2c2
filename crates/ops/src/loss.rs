//! The next-token loss without the full-vocabulary logits: `Σ mask · (logsumexp(h·Wᵀ) − (h·Wᵀ)[label])`
//! computed a chunk of rows at a time, with its own backward.
//!
//! At 1,024 tokens and SmolLM2's 49,152-token vocabulary the logits are 192 MiB in f32, and the plain
//! `log_softmax(logits).gather(label)` keeps them, the log-probabilities and both gradients alive (≈ 770
//! MiB). Here the forward makes the logits of `chunk` rows, reduces them to one loss per row and drops
//! them; the backward keeps only the hidden states `h` (`[rows, hidden]`) and recomputes each chunk's
//! softmax to write `dh = g · mask · (softmax − onehot(label)) · W`. The output weight gets no gradient (it
//! is frozen in QLoRA: the tied embedding or a dense lm_head). The statistics are in f32 whatever the
//! compute dtype, as transformers' upcast of the logits.

use crate::dtype::HostDtype;
#[cfg(feature = "cube")]
use burn::backend::Cube;
use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::{
    Backend, Dispatch, Flex, FloatDType, TensorMetadata, backend_extension,
    tensor::{FloatTensor, IntTensor},
};
use burn::tensor::{IndexingUpdateOp, Int, Shape, Slice, Tensor};

/// Rows per chunk: `[256, vocab]` f32 logits (48 MiB for a 49,152-token vocabulary) at a time.
pub const DEFAULT_CHUNK_ROWS: usize = 256;

/// The extension. Its default bodies are the chunked reference in backend ops (the CubeCL backend uses
/// them); `Flex` runs the host kernels of `loss_host`; `Autodiff` adds the hand-written backward.
#[backend_extension(Flex, Cube: cfg(feature = "cube"), Autodiff)]
pub trait ChunkedNllBackend: Backend {
    /// The masked summed loss `[1]` (f32) of `h [rows, hidden]` against `w_t [hidden, vocab]`, labels
    /// `[rows, 1]` (int), mask `[rows, 1]` (f32).
    fn chunked_nll(
        h: FloatTensor<Self>,
        w_t: FloatTensor<Self>,
        labels: IntTensor<Self>,
        mask: FloatTensor<Self>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        chunked_nll_reference::<Self>(h, w_t, labels, mask, chunk)
    }
    /// The loss and `dh` for an upstream gradient of 1 (in h's dtype), from one pass over each chunk's
    /// logits: what the autodiff forward runs, so the backward only scales `dh` (the loss is linear in its
    /// upstream gradient) instead of making every chunk's logits again.
    fn chunked_nll_and_unit_grad(
        h: FloatTensor<Self>,
        w_t: FloatTensor<Self>,
        labels: IntTensor<Self>,
        mask: FloatTensor<Self>,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        chunked_nll_and_unit_grad_reference::<Self>(h, w_t, labels, mask, chunk)
    }
    /// `dh` for an upstream gradient `grad` (`[1]`) of that loss, in h's dtype. (Under autodiff only the
    /// inner backend's runs, inside a backward; the autodiff one is the reference through autodiff's ops.)
    fn chunked_nll_grad(
        h: FloatTensor<Self>,
        w_t: FloatTensor<Self>,
        labels: IntTensor<Self>,
        mask: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        chunked_nll_grad_reference::<Self>(h, w_t, labels, mask, grad, chunk)
    }
}

fn rows<B: Backend>(t: FloatTensor<B>, start: usize, end: usize) -> FloatTensor<B> {
    B::float_slice(t, &[Slice::from(start..end), Slice::from(..)])
}

/// The f32 logits of rows `start..end`, shifted by their row maximum, and `log Σ exp` of the shifted row.
fn shifted_logits<B: Backend>(
    h: &FloatTensor<B>,
    w_t: &FloatTensor<B>,
    start: usize,
    end: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let logits =
        B::float_cast(crate::host_matmul::matmul::<B>(rows::<B>(h.clone(), start, end), w_t.clone()), FloatDType::F32);
    let max = B::float_max_dim(logits.clone(), 1);
    let shifted = B::float_sub(logits, max);
    let log_sum = B::float_log(B::float_sum_dim(B::float_exp(shifted.clone()), 1));
    (shifted, log_sum)
}

fn int_rows<B: Backend>(t: IntTensor<B>, start: usize, end: usize) -> IntTensor<B> {
    B::int_slice(t, &[Slice::from(start..end), Slice::from(..)])
}

/// The loss with plain backend ops, chunk by chunk.
pub fn chunked_nll_reference<B: Backend>(
    h: FloatTensor<B>,
    w_t: FloatTensor<B>,
    labels: IntTensor<B>,
    mask: FloatTensor<B>,
    chunk: usize,
) -> FloatTensor<B> {
    let n = h.shape()[0];
    let mut total: Option<FloatTensor<B>> = None;
    for start in (0..n).step_by(chunk.max(1)) {
        let end = (start + chunk.max(1)).min(n);
        let (shifted, log_sum) = shifted_logits::<B>(&h, &w_t, start, end);
        let picked = B::float_gather(1, shifted, int_rows::<B>(labels.clone(), start, end));
        let nll = B::float_mul(B::float_sub(log_sum, picked), rows::<B>(mask.clone(), start, end));
        let sum = B::float_sum(nll);
        total = Some(match total {
            Some(t) => B::float_add(t, sum),
            None => sum,
        });
    }
    total.unwrap_or_else(|| B::float_zeros(Shape::new([1]), &h.device(), FloatDType::F32))
}

/// The input gradient with plain backend ops, chunk by chunk.
pub fn chunked_nll_grad_reference<B: Backend>(
    h: FloatTensor<B>,
    w_t: FloatTensor<B>,
    labels: IntTensor<B>,
    mask: FloatTensor<B>,
    grad: FloatTensor<B>,
    chunk: usize,
) -> FloatTensor<B> {
    let n = h.shape()[0];
    let dtype: FloatDType = h.dtype().into();
    let grad = B::float_reshape(B::float_cast(grad, FloatDType::F32), Shape::new([1, 1]));
    let w = B::float_transpose(w_t.clone());
    let mut parts = Vec::new();
    for start in (0..n).step_by(chunk.max(1)) {
        let end = (start + chunk.max(1)).min(n);
        let (shifted, log_sum) = shifted_logits::<B>(&h, &w_t, start, end);
        let probs = B::float_exp(B::float_sub(shifted, log_sum));
        let minus_one = B::float_full(Shape::new([end - start, 1]), (-1.0f32).into(), &h.device(), FloatDType::F32);
        let dlogits =
            B::float_scatter(1, probs, int_rows::<B>(labels.clone(), start, end), minus_one, IndexingUpdateOp::Add);
        let weight = B::float_mul(rows::<B>(mask.clone(), start, end), grad.clone());
        let dlogits = B::float_cast(B::float_mul(dlogits, weight), dtype);
        parts.push(crate::host_matmul::matmul::<B>(dlogits, w.clone()));
    }
    if parts.len() == 1 { parts.pop().expect("one part") } else { B::float_cat(parts, 0) }
}

/// [`ChunkedNllBackend::chunked_nll_and_unit_grad`] with plain backend ops (two passes).
pub fn chunked_nll_and_unit_grad_reference<B: Backend>(
    h: FloatTensor<B>,
    w_t: FloatTensor<B>,
    labels: IntTensor<B>,
    mask: FloatTensor<B>,
    chunk: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let one = B::float_ones(Shape::new([1]), &h.device(), FloatDType::F32);
    let loss = chunked_nll_reference::<B>(h.clone(), w_t.clone(), labels.clone(), mask.clone(), chunk);
    (loss, chunked_nll_grad_reference::<B>(h, w_t, labels, mask, one, chunk))
}

/// On flex the host kernels ([`crate::loss_host`]) in f32 and bf16, the reference in other dtypes
/// ([`crate::dtype`]).
impl ChunkedNllBackend for Flex {
    fn chunked_nll(
        h: FloatTensor<Self>,
        w_t: FloatTensor<Self>,
        labels: IntTensor<Self>,
        mask: FloatTensor<Self>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        match HostDtype::of_tensor(&h) {
            Some(_) => crate::loss_host::chunked_nll(h, w_t, labels, mask, chunk),
            None => chunked_nll_reference::<Self>(h, w_t, labels, mask, chunk),
        }
    }

    fn chunked_nll_and_unit_grad(
        h: FloatTensor<Self>,
        w_t: FloatTensor<Self>,
        labels: IntTensor<Self>,
        mask: FloatTensor<Self>,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match HostDtype::of_tensor(&h) {
            Some(_) => crate::loss_host::chunked_nll_and_unit_grad(h, w_t, labels, mask, chunk),
            None => chunked_nll_and_unit_grad_reference::<Self>(h, w_t, labels, mask, chunk),
        }
    }

    fn chunked_nll_grad(
        h: FloatTensor<Self>,
        w_t: FloatTensor<Self>,
        labels: IntTensor<Self>,
        mask: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        match HostDtype::of_tensor(&h) {
            Some(_) => crate::loss_host::chunked_nll_grad(h, w_t, labels, mask, grad, chunk),
            None => chunked_nll_grad_reference::<Self>(h, w_t, labels, mask, grad, chunk),
        }
    }
}

/// On the CubeCL backend the chunked reference, in the device's own ops (the trait's defaults).
#[cfg(feature = "cube")]
impl ChunkedNllBackend for Cube {}

impl<B: Backend + ChunkedNllBackend, C: CheckpointStrategy> ChunkedNllBackend for Autodiff<B, C> {
    fn chunked_nll(
        h: FloatTensor<Self>,
        w_t: FloatTensor<Self>,
        labels: IntTensor<Self>,
        mask: FloatTensor<Self>,
        chunk: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ChunkedNllBackward;

        impl<B: Backend + ChunkedNllBackend> Backward<B, 1> for ChunkedNllBackward {
            /// `dh` for an upstream gradient of 1 (`[rows, hidden]`, made with the loss): never the logits.
            type State = FloatTensor<B>;

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_h] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let unit = ops.state;
                if let Some(node) = node_h {
                    let dtype: FloatDType = unit.dtype().into();
                    let g = B::float_reshape(B::float_cast(grad, FloatDType::F32), Shape::new([1, 1]));
                    let dh = B::float_mul(B::float_cast(unit, FloatDType::F32), g);
                    grads.register::<B>(node.id, B::float_cast(dh, dtype));
                }
            }
        }

        let w_t = w_t.into_primitive();
        let mask = mask.into_primitive();
        let (h, h_node) = h.into_parts();
        match ChunkedNllBackward.prepare::<C>([h_node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, unit) = B::chunked_nll_and_unit_grad(h, w_t, labels, mask, chunk);
                prep.finish(unit, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::chunked_nll(h, w_t, labels, mask, chunk)),
        }
    }
}

/// The training loss of a language-model head: `Σ mask · −log p(label)` over hidden states `[batch, len,
/// hidden]` with labels and mask `[batch, len]`. With the head's weight dense and without bias (`w_t`,
/// `[hidden, vocab]`: a tied embedding or a plain head) through [`chunked_nll_sum`], never holding the
/// full-vocabulary logits; otherwise through the full log-softmax of `logits(hidden)` (a 4-bit head). The
/// hidden states must already carry any rescale the head applies. Gradients flow to the hidden states.
pub fn head_nll_sum(
    hidden: Tensor<3>,
    w_t: Option<Tensor<2>>,
    labels: Tensor<2, Int>,
    mask: Tensor<2>,
    logits: impl FnOnce(Tensor<3>) -> Tensor<3>,
) -> Tensor<1> {
    let [b, t, d] = hidden.dims();
    match w_t {
        Some(w_t) => chunked_nll_sum(
            hidden.reshape([b * t, d]),
            w_t,
            labels.reshape([b * t]),
            mask.reshape([b * t]),
            DEFAULT_CHUNK_ROWS,
        ),
        None => {
            let log_probs = burn::tensor::activation::log_softmax(logits(hidden).cast(burn::tensor::DType::F32), 2);
            let picked = log_probs.gather(2, labels.reshape([b, t, 1])).reshape([b, t]);
            (picked * mask).sum().neg()
        }
    }
}

/// `Σ mask · nll` over rows: `h [rows, hidden]`, `w_t [hidden, vocab]` (the output weight transposed),
/// `labels [rows]`, `mask [rows]` (1 where the row counts). Gradients flow to `h` only.
pub fn chunked_nll_sum(
    h: Tensor<2>,
    w_t: Tensor<2>,
    labels: Tensor<1, Int>,
    mask: Tensor<1>,
    chunk: usize,
) -> Tensor<1> {
    let n = labels.dims()[0];
    let labels = labels.reshape([n, 1]);
    let mask = mask.reshape([n, 1]);
    Tensor::from_dispatch(<Dispatch as ChunkedNllBackend>::chunked_nll(
        h.into_dispatch(),
        w_t.into_dispatch(),
        labels.into_dispatch(),
        mask.into_dispatch(),
        chunk,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Device, Distribution, TensorData};

    /// Chunked (ragged last chunk, masked rows) = the full log-softmax loss, in value and input gradient.
    #[test]
    fn chunked_loss_and_gradient_equal_the_full_log_softmax() {
        let device = Device::flex().autodiff();
        let (n, hidden, vocab) = (37, 16, 50);
        let h0 = Tensor::<2>::random([n, hidden], Distribution::Normal(0.0, 1.0), &device);
        let w_t = Tensor::<2>::random([hidden, vocab], Distribution::Normal(0.0, 0.5), &device);
        let labels: Vec<i64> = (0..n).map(|i| ((i * 17 + 3) % vocab) as i64).collect();
        let mask: Vec<f32> = (0..n).map(|i| if i % 5 == 2 { 0.0 } else { 1.0 }).collect();
        let labels = Tensor::<1, Int>::from_data(TensorData::new(labels, [n]), &device);
        let mask = Tensor::<1>::from_data(TensorData::new(mask, [n]), &device);

        let h = h0.clone().detach().require_grad();
        let loss = chunked_nll_sum(h.clone(), w_t.clone(), labels.clone(), mask.clone(), 8);
        let dh = h.grad(&(loss.clone() * 0.5).backward()).unwrap();

        let hr = h0.detach().require_grad();
        let picked = log_softmax(hr.clone().matmul(w_t), 1).gather(1, labels.reshape([n, 1])).reshape([n]);
        let loss_r = (picked * mask).sum().neg();
        let dh_r = hr.grad(&(loss_r.clone() * 0.5).backward()).unwrap();

        let (a, b): (Vec<f32>, Vec<f32>) =
            (loss.into_data().try_into_vec().unwrap(), loss_r.into_data().try_into_vec().unwrap());
        assert!((a[0] - b[0]).abs() <= 1e-4 * b[0].abs(), "loss {} vs {}", a[0], b[0]);
        let (g, gr): (Vec<f32>, Vec<f32>) =
            (dh.into_data().try_into_vec().unwrap(), dh_r.into_data().try_into_vec().unwrap());
        assert_eq!(g.len(), n * hidden);
        let worst = g.iter().zip(&gr).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "gradient off by {worst}");
        // Masked rows get no gradient.
        assert!(g[2 * hidden..3 * hidden].iter().all(|&v| v == 0.0));
    }
}
