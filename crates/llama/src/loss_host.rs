//! The chunked loss on the flex (CPU) backend: the same chunks and the same f32 statistics as
//! [`chunked_nll_reference`](crate::loss::chunked_nll_reference), but each chunk's logits are reduced row
//! by row in one pass over a cache-resident row (max, `Σ exp`, vectorised [`crate::simd::exp`]) instead of
//! seven full-size backend ops, and the backward writes `dlogits` in the compute dtype straight from the
//! row. The products go through [`lora::host_matmul::matmul`] (AVX512-BF16 for bf16).

use burn::backend::flex::FlexTensor;
use burn::backend::ops::{FloatTensorOps, IntTensorOps};
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
    lora::host_matmul::matmul::<Flex>(rows(h, start, end), w_t.clone())
}

fn host_f32(t: FlexTensor) -> Vec<f32> {
    read_sync(Flex::float_into_data(t)).expect("host tensor").convert::<f32>().try_into_vec::<f32>().expect("f32 values")
}

fn host_labels(t: burn::backend::tensor::IntTensor<Flex>) -> Vec<i64> {
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

/// The masked summed loss `[1]` (f32).
pub fn chunked_nll(h: FlexTensor, w_t: FlexTensor, labels: burn::backend::tensor::IntTensor<Flex>, mask: FlexTensor, chunk: usize) -> FlexTensor {
    let n = h.shape()[0];
    let (labels, mask) = (host_labels(labels), host_f32(mask));
    let mut total = 0.0f32;
    for start in (0..n).step_by(chunk.max(1)) {
        let end = (start + chunk.max(1)).min(n);
        let logits = HostRows::new(chunk_logits(&h, &w_t, start, end));
        let losses: Vec<f32> = (0..logits.len())
            .into_par_iter()
            .map_init(Vec::new, |buf, r| {
                let i = start + r;
                if mask[i] == 0.0 {
                    return 0.0;
                }
                let row = logits.row(r, buf);
                let (max, log_sum) = row_statistics(row);
                let picked = usize::try_from(labels[i]).ok().and_then(|l| row.get(l)).map_or(f32::NAN, |&x| x - max);
                (log_sum - picked) * mask[i]
            })
            .collect();
        total += losses.iter().sum::<f32>();
    }
    FlexTensor::from_data(TensorData::new(vec![total], [1]))
}

/// `dh` for an upstream gradient `grad` (`[1]`), in h's dtype.
pub fn chunked_nll_grad(
    h: FlexTensor,
    w_t: FlexTensor,
    labels: burn::backend::tensor::IntTensor<Flex>,
    mask: FlexTensor,
    grad: FlexTensor,
    chunk: usize,
) -> FlexTensor {
    let n = h.shape()[0];
    let vocab = w_t.shape()[1];
    let dtype = h.dtype();
    let (labels, mask) = (host_labels(labels), host_f32(mask));
    let g = host_f32(grad)[0];
    let w = Flex::float_transpose(w_t.clone());
    let mut parts = Vec::new();
    for start in (0..n).step_by(chunk.max(1)) {
        let end = (start + chunk.max(1)).min(n);
        let logits = HostRows::new(chunk_logits(&h, &w_t, start, end));
        let rows = logits.len();
        let grad_row = |r: usize, buf: &mut Vec<f32>, out: &mut [f32]| {
            let i = start + r;
            let row = logits.row(r, buf);
            let (max, log_sum) = row_statistics(row);
            let label = usize::try_from(labels[i]).unwrap_or(usize::MAX);
            simd::softmax_grad(row, max, log_sum, label, mask[i] * g, out);
        };
        let dlogits = match dtype {
            DType::BF16 => {
                let mut out = vec![bf16::ZERO; rows * vocab];
                out.par_chunks_mut(vocab).enumerate().for_each_init(
                    || (Vec::new(), vec![0.0f32; vocab]),
                    |(buf, grad), (r, out_row)| {
                        grad_row(r, buf, grad);
                        out_row.convert_from_f32_slice(grad);
                    },
                );
                TensorData::new(out, [rows, vocab])
            }
            _ => {
                let mut out = vec![0.0f32; rows * vocab];
                out.par_chunks_mut(vocab).enumerate().for_each_init(Vec::new, |buf, (r, out_row)| grad_row(r, buf, out_row));
                TensorData::new(out, [rows, vocab])
            }
        };
        drop(logits);
        parts.push(lora::host_matmul::matmul::<Flex>(FlexTensor::from_data(dlogits), w.clone()));
    }
    match parts.len() {
        0 => Flex::float_zeros(Shape::new([0, h.shape()[1]]), &h.device(), dtype.into()),
        1 => parts.pop().expect("one part"),
        _ => Flex::float_cat(parts, 0),
    }
}
