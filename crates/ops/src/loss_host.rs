//! The chunked loss on the flex (CPU) backend: the same chunks and the same f32 statistics as
//! [`chunked_nll_reference`](crate::loss::chunked_nll_reference), but each chunk's logits are reduced row
//! by row in one pass over a cache-resident row (max, `Σ exp`, vectorised [`crate::simd::exp`]) instead of
//! seven full-size backend ops, and the backward writes `dlogits` in the compute dtype straight from the
//! row. The products go through [`crate::host_matmul::matmul`] (AVX512-BF16 for bf16).

use burn::backend::flex::FlexTensor;
use burn::backend::ops::{FloatTensorOps, IntTensorOps};
use burn::backend::tensor::IntTensor;
use burn::backend::{Flex, TensorMetadata};
use burn::tensor::{DType, Shape, Slice, TensorData, read_sync};
use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::simd;

fn rows(t: &FlexTensor, start: usize, end: usize) -> FlexTensor {
    Flex::float_slice(t.clone(), &[Slice::from(start..end), Slice::from(..)])
}

/// The `[end − start, vocab]` logits of a chunk, in the compute dtype.
fn chunk_logits(h: &FlexTensor, w_t: &FlexTensor, start: usize, end: usize) -> FlexTensor {
    crate::host_matmul::matmul::<Flex>(rows(h, start, end), w_t.clone())
}

fn host_f32(t: FlexTensor) -> Vec<f32> {
    read_sync(Flex::float_into_data(t))
        .expect("host tensor")
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 values")
}

fn host_labels(t: IntTensor<Flex>) -> Vec<i64> {
    read_sync(Flex::int_into_data(t)).expect("host tensor").convert::<i64>().try_into_vec::<i64>().expect("i64 values")
}

/// A chunk's logits as host values, contiguous `[rows, vocab]`.
struct HostRows {
    logits: FlexTensor,
    vocab: usize,
}

impl HostRows {
    fn new(logits: FlexTensor) -> Self {
        let logits = if logits.is_contiguous() { logits } else { logits.to_contiguous() };
        let vocab = logits.layout().shape()[1];
        HostRows { logits, vocab }
    }

    fn len(&self) -> usize {
        self.logits.layout().shape()[0]
    }

    /// Row `r` in f32 (bf16 rows are widened into `buf`).
    fn row<'a>(&'a self, r: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        let (offset, vocab) = (self.logits.layout().start_offset() + r * self.vocab, self.vocab);
        match self.logits.dtype() {
            DType::F32 => &self.logits.storage::<f32>()[offset..offset + vocab],
            DType::BF16 => {
                buf.resize(vocab, 0.0);
                self.logits.storage::<bf16>()[offset..offset + vocab].convert_to_f32_slice(buf);
                buf
            }
            other => unreachable!("logits in {other:?}: the loss runs in f32 or bf16"),
        }
    }
}

/// `(max, log Σ exp(x − max))` of a row.
fn row_statistics(row: &[f32]) -> (f32, f32) {
    let (max, sum) = simd::max_sum_exp(row);
    (max, sum.ln())
}

/// One pass over the chunks: the summed loss and, with `grad = Some(g)`, `dh` for the upstream gradient g
/// (in h's dtype), each chunk's logits made once and reduced row by row for both.
fn chunk_pass(
    h: &FlexTensor,
    w_t: &FlexTensor,
    labels: IntTensor<Flex>,
    mask: FlexTensor,
    chunk: usize,
    grad: Option<f32>,
) -> (f32, Option<FlexTensor>) {
    let n = h.shape()[0];
    let vocab = w_t.shape()[1];
    let dtype = h.dtype();
    let (labels, mask) = (host_labels(labels), host_f32(mask));
    let w = grad.map(|_| Flex::float_transpose(w_t.clone()));
    let mut total = 0.0f32;
    let mut parts = Vec::new();
    for start in (0..n).step_by(chunk.max(1)) {
        let end = (start + chunk.max(1)).min(n);
        let logits = HostRows::new(chunk_logits(h, w_t, start, end));
        let rows = logits.len();
        // Row r's loss, and its gradient row into `out` when asked for.
        let row = |r: usize, buf: &mut Vec<f32>, out: Option<&mut [f32]>| -> f32 {
            let i = start + r;
            let row = logits.row(r, buf);
            let (max, log_sum) = row_statistics(row);
            let label = usize::try_from(labels[i]).ok().filter(|&l| l < row.len());
            if let (Some(out), Some(g)) = (out, grad) {
                simd::softmax_grad(row, max, log_sum, label.unwrap_or(usize::MAX), mask[i] * g, out);
            }
            if mask[i] == 0.0 {
                return 0.0;
            }
            let picked = label.map_or(f32::NAN, |l| row[l] - max);
            (log_sum - picked) * mask[i]
        };
        // The chunk's losses and, when asked for, its dlogits `[rows, vocab]` in h's dtype.
        let (losses, dlogits): (Vec<f32>, Option<TensorData>) = match (grad, dtype) {
            (None, _) => ((0..rows).into_par_iter().map_init(Vec::new, |buf, r| row(r, buf, None)).collect(), None),
            (Some(_), DType::BF16) => {
                let mut out = vec![bf16::ZERO; rows * vocab];
                let losses = out
                    .par_chunks_mut(vocab)
                    .enumerate()
                    .map_init(
                        || (Vec::new(), vec![0.0f32; vocab]),
                        |(buf, grad_row), (r, out_row)| {
                            let loss = row(r, buf, Some(grad_row));
                            out_row.convert_from_f32_slice(grad_row);
                            loss
                        },
                    )
                    .collect();
                (losses, Some(TensorData::new(out, [rows, vocab])))
            }
            (Some(_), _) => {
                let mut out = vec![0.0f32; rows * vocab];
                let losses = out
                    .par_chunks_mut(vocab)
                    .enumerate()
                    .map_init(Vec::new, |buf, (r, out_row)| row(r, buf, Some(out_row)))
                    .collect();
                (losses, Some(TensorData::new(out, [rows, vocab])))
            }
        };
        total += losses.iter().sum::<f32>();
        drop(logits);
        if let (Some(w), Some(dlogits)) = (&w, dlogits) {
            parts.push(crate::host_matmul::matmul::<Flex>(FlexTensor::from_data(dlogits), w.clone()));
        }
    }
    let dh = grad.map(|_| match parts.len() {
        0 => Flex::float_zeros(Shape::new([0, h.shape()[1]]), &h.device(), dtype.into()),
        1 => parts.pop().expect("one part"),
        _ => Flex::float_cat(parts, 0),
    });
    (total, dh)
}

fn scalar(total: f32) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(vec![total], [1]))
}

/// The masked summed loss `[1]` (f32).
pub fn chunked_nll(
    h: FlexTensor,
    w_t: FlexTensor,
    labels: IntTensor<Flex>,
    mask: FlexTensor,
    chunk: usize,
) -> FlexTensor {
    scalar(chunk_pass(&h, &w_t, labels, mask, chunk, None).0)
}

/// `dh` for an upstream gradient `grad` (`[1]`), in h's dtype.
pub fn chunked_nll_grad(
    h: FlexTensor,
    w_t: FlexTensor,
    labels: IntTensor<Flex>,
    mask: FlexTensor,
    grad: FlexTensor,
    chunk: usize,
) -> FlexTensor {
    let g = host_f32(grad)[0];
    chunk_pass(&h, &w_t, labels, mask, chunk, Some(g)).1.expect("asked for dh")
}

/// The loss and `dh` for an upstream gradient of 1, from the same logits.
pub fn chunked_nll_and_unit_grad(
    h: FlexTensor,
    w_t: FlexTensor,
    labels: IntTensor<Flex>,
    mask: FlexTensor,
    chunk: usize,
) -> (FlexTensor, FlexTensor) {
    let (total, dh) = chunk_pass(&h, &w_t, labels, mask, chunk, Some(1.0));
    (scalar(total), dh.expect("asked for dh"))
}
