//! Causal self-attention with grouped K/V heads, `softmax(q·kᵀ·scale + causal) · v`, as one op with its own
//! backward that keeps no score or probability matrix between forward and backward.
//!
//! Through burn's autodiff the decomposed attention keeps the scores and the probabilities
//! (`[batch, heads, len, len]` each, 36 MiB per layer in f32 at SmolLM2's 9 heads × 1,024 tokens) for the
//! backward of every layer. Here the backward keeps only q, k and v (retrieved through the checkpointer, so
//! gradient checkpointing may recompute them instead) and recomputes the probabilities one batch row and one
//! block of 128 query positions at a time: `dv = Pᵀ·do`, `dP = do·vᵀ`, `dS = P ⊙ (dP − rowsum(P ⊙ dP))`,
//! `dq = dS·k·scale`, `dk = dSᵀ·q·scale`. A block of positions `[p0, p1)` multiplies against keys `0..p1`
//! only, skipping most of the masked triangle. Grouped heads need no `repeat_kv` copy: the `rep` query
//! heads of a K/V head are stacked position-major as `len · rep` rows against that head's keys. The op sequence of the forward is transformers' eager attention (scores in
//! the compute dtype, softmax in f32, probabilities back to the compute dtype).

#[cfg(feature = "cube")]
use burn::backend::Cube;
use burn::backend::autodiff::{
    Autodiff, NodeId,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::{Backend, Dispatch, Flex, FloatDType, TensorMetadata, backend_extension, tensor::FloatTensor};
use burn::tensor::{Shape, Slice, Tensor, TensorData};

use crate::dtype::HostDtype;

/// The extension: `Flex` (and the CubeCL backend) run the batch-row-at-a-time reference below, `Autodiff`
/// adds the hand-written backward.
#[backend_extension(Flex, Cube: cfg(feature = "cube"), Autodiff)]
pub trait CausalAttentionBackend: Backend {
    /// `q [batch, heads, len, head_dim]`, `k`, `v [batch, kv_heads, len, head_dim]` (`heads` a multiple of
    /// `kv_heads`; query head `i` reads K/V head `i / (heads / kv_heads)`, as HF's `repeat_kv`) → the
    /// attended values `[batch, heads, len, head_dim]`; position `i` sees positions `0..=i`.
    /// The default is the reference below in backend ops (flex and the CubeCL backend use it).
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        causal_attention_reference::<Self>(q, k, v, scale)
    }
}

/// Query positions per block: block `[p0, p1)` attends to keys `0..p1` only, so the products skip most
/// of the masked upper triangle (at 1,024 tokens they do 56 % of the full products' work).
pub const BLOCK_POSITIONS: usize = 128;

/// `[(p1 − p0) · rep, p1]` f32: −∞ where row `r` (position `p0 + r / rep`) must not see column `j`, 0
/// elsewhere; added to the scores it is transformers' `masked_fill(−∞)` (an f32 tensor, because boolean
/// storage differs between backends).
fn causal_bias<B: Backend>(rep: usize, p0: usize, p1: usize, device: &B::Device) -> FloatTensor<B> {
    let rows = (p1 - p0) * rep;
    let values: Vec<f32> =
        (0..rows).flat_map(|r| (0..p1).map(move |j| if j > p0 + r / rep { f32::NEG_INFINITY } else { 0.0 })).collect();
    B::float_from_data(TensorData::new(values, [rows, p1]), device)
}

/// Batch row `i` of a `[batch, heads, len, d]` tensor as `[kv_heads, len · rep, d]`, position-major: row
/// `pos · rep + j` is query head `g · rep + j` of K/V head `g` at `pos` (for K and V, rep = 1).
fn grouped_row<B: Backend>(t: &FloatTensor<B>, i: usize, kv_heads: usize) -> FloatTensor<B> {
    let shape = t.shape();
    let (heads, len, d) = (shape[1], shape[2], shape[3]);
    let rep = heads / kv_heads;
    let row = B::float_slice(t.clone(), &[Slice::from(i..i + 1), Slice::from(..), Slice::from(..), Slice::from(..)]);
    if rep == 1 {
        return B::float_reshape(row, Shape::new([kv_heads, len, d]));
    }
    let by_head = B::float_reshape(row, Shape::new([kv_heads, rep, len, d]));
    B::float_reshape(B::float_swap_dims(by_head, 1, 2), Shape::new([kv_heads, len * rep, d]))
}

/// The inverse of [`grouped_row`]: `[kv_heads, len · rep, d]` → `[1, kv_heads · rep, len, d]`.
fn ungrouped<B: Backend>(t: FloatTensor<B>, kv_heads: usize, rep: usize, len: usize, d: usize) -> FloatTensor<B> {
    if rep == 1 {
        return B::float_reshape(t, Shape::new([1, kv_heads, len, d]));
    }
    let by_position = B::float_reshape(t, Shape::new([kv_heads, len, rep, d]));
    B::float_reshape(B::float_swap_dims(by_position, 1, 2), Shape::new([1, kv_heads * rep, len, d]))
}

/// Rows `[p0 · rep, p1 · rep)` (dim 1) of a grouped `[kv_heads, len · rep, d]` tensor.
fn rows<B: Backend>(t: &FloatTensor<B>, from: usize, to: usize) -> FloatTensor<B> {
    B::float_slice(t.clone(), &[Slice::from(..), Slice::from(from..to), Slice::from(..)])
}

/// One block of query positions `[p0, p1)` with `rep` query heads per K/V head.
#[derive(Debug, Clone, Copy)]
struct Block {
    p0: usize,
    p1: usize,
    rep: usize,
}

impl Block {
    fn all(len: usize, rep: usize) -> impl Iterator<Item = Block> {
        (0..len).step_by(BLOCK_POSITIONS).map(move |p0| Block { p0, p1: (p0 + BLOCK_POSITIONS).min(len), rep })
    }
}

/// The f32 probabilities `[kv_heads, (p1 − p0) · rep, p1]` of one block of query rows against keys `0..p1`,
/// in transformers' op order.
fn probabilities<B: Backend>(
    q_block: FloatTensor<B>,
    k_prefix: FloatTensor<B>,
    block: Block,
    scale: f32,
) -> FloatTensor<B> {
    let scores = crate::host_matmul::matmul::<B>(q_block, B::float_transpose(k_prefix));
    let scores = match crate::host_matmul::downcast_flex::<B>(scores) {
        Ok(scores) if HostDtype::of_tensor(&scores).is_some() => {
            return crate::host_matmul::upcast_flex::<B>(host::causal_softmax(&scores, scale, block));
        }
        Ok(scores) => crate::host_matmul::upcast_flex::<B>(scores),
        Err(scores) => scores,
    };
    let scores = B::float_cast(B::float_mul_scalar(scores, scale.into()), FloatDType::F32);
    let [g, rows, cols] = [scores.shape()[0], scores.shape()[1], scores.shape()[2]];
    let bias = causal_bias::<B>(block.rep, block.p0, block.p1, &scores.device());
    let bias = B::float_expand(B::float_reshape(bias, Shape::new([1, rows, cols])), Shape::new([g, rows, cols]));
    B::softmax(B::float_add(scores, bias), 2)
}

fn check_shapes(q: &Shape, k: &Shape, v: &Shape) -> (usize, usize, usize, usize, usize) {
    let (b, h, t, d) = (q[0], q[1], q[2], q[3]);
    let kvh = k[1];
    assert!(
        q.num_dims() == 4 && k.num_dims() == 4 && k == v && k[0] == b && k[2] == t && k[3] == d,
        "causal attention: q {q:?}, k {k:?}, v {v:?}"
    );
    assert!(kvh > 0 && h % kvh == 0, "causal attention: {h} query heads over {kvh} K/V heads");
    (b, h, kvh, t, d)
}

fn cat_or_single<B: Backend>(mut parts: Vec<FloatTensor<B>>, dim: usize) -> FloatTensor<B> {
    if parts.len() == 1 { parts.pop().expect("one part") } else { B::float_cat(parts, dim) }
}

/// The attention with plain backend ops, one batch row and one block of query positions at a time.
pub fn causal_attention_reference<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    scale: f32,
) -> FloatTensor<B> {
    let (b, h, kvh, t, d) = check_shapes(&q.shape(), &k.shape(), &v.shape());
    let rep = h / kvh;
    let dtype: FloatDType = q.dtype().into();
    let batch_rows: Vec<FloatTensor<B>> = (0..b)
        .map(|i| {
            let (q_row, k_row, v_row) =
                (grouped_row::<B>(&q, i, kvh), grouped_row::<B>(&k, i, kvh), grouped_row::<B>(&v, i, kvh));
            let blocks: Vec<FloatTensor<B>> = Block::all(t, rep)
                .map(|block| {
                    let q_block = rows::<B>(&q_row, block.p0 * rep, block.p1 * rep);
                    let probs = probabilities::<B>(q_block, rows::<B>(&k_row, 0, block.p1), block, scale);
                    crate::host_matmul::matmul::<B>(B::float_cast(probs, dtype), rows::<B>(&v_row, 0, block.p1))
                })
                .collect();
            ungrouped::<B>(cat_or_single::<B>(blocks, 1), kvh, rep, t, d)
        })
        .collect();
    cat_or_single::<B>(batch_rows, 0)
}

/// `acc[:, 0..to, :] += part` (f32).
fn add_prefix<B: Backend>(acc: FloatTensor<B>, part: FloatTensor<B>, to: usize) -> FloatTensor<B> {
    let slices = [Slice::from(..), Slice::from(0..to), Slice::from(..)];
    let sum = B::float_add(B::float_slice(acc.clone(), &slices), B::float_cast(part, FloatDType::F32));
    B::float_slice_assign(acc, &slices, sum)
}

/// `(dq, dk, dv)` for the upstream gradient `grad` (`[batch, heads, len, head_dim]`), recomputing the
/// probabilities one batch row and one block at a time; dk and dv sum over blocks in f32.
pub fn causal_attention_grad_reference<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    grad: FloatTensor<B>,
    scale: f32,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let (b, h, kvh, t, d) = check_shapes(&q.shape(), &k.shape(), &v.shape());
    let rep = h / kvh;
    let dtype: FloatDType = q.dtype().into();
    let grad = B::float_cast(grad, dtype);
    let device = q.device();
    let (mut dqs, mut dks, mut dvs) = (Vec::with_capacity(b), Vec::with_capacity(b), Vec::with_capacity(b));
    for i in 0..b {
        let (q_row, k_row, v_row) =
            (grouped_row::<B>(&q, i, kvh), grouped_row::<B>(&k, i, kvh), grouped_row::<B>(&v, i, kvh));
        let do_row = grouped_row::<B>(&grad, i, kvh);
        let mut dk = B::float_zeros(Shape::new([kvh, t, d]), &device, FloatDType::F32);
        let mut dv = B::float_zeros(Shape::new([kvh, t, d]), &device, FloatDType::F32);
        let mut dq_blocks = Vec::new();
        for block in Block::all(t, rep) {
            let (q_block, do_block) =
                (rows::<B>(&q_row, block.p0 * rep, block.p1 * rep), rows::<B>(&do_row, block.p0 * rep, block.p1 * rep));
            let (k_prefix, v_prefix) = (rows::<B>(&k_row, 0, block.p1), rows::<B>(&v_row, 0, block.p1));
            let probs = probabilities::<B>(q_block.clone(), k_prefix.clone(), block, scale);
            // dv = Pᵀ · do, with P in the compute dtype as the forward used it.
            let dv_part = crate::host_matmul::matmul::<B>(
                B::float_transpose(B::float_cast(probs.clone(), dtype)),
                do_block.clone(),
            );
            dv = add_prefix::<B>(dv, dv_part, block.p1);
            // dP = do · vᵀ; dS = P ⊙ (dP − Σ_j P ⊙ dP) in f32, then scaled into the compute dtype.
            let dp = crate::host_matmul::matmul::<B>(do_block, B::float_transpose(v_prefix));
            let ds = match (crate::host_matmul::downcast_flex::<B>(probs), crate::host_matmul::downcast_flex::<B>(dp)) {
                (Ok(probs), Ok(dp)) if HostDtype::of_tensor(&dp).is_some() => {
                    crate::host_matmul::upcast_flex::<B>(host::softmax_backward(&probs, &dp, scale, block))
                }
                (probs, dp) => {
                    let probs = probs.map_or_else(|t| t, crate::host_matmul::upcast_flex::<B>);
                    let dp =
                        B::float_cast(dp.map_or_else(|t| t, crate::host_matmul::upcast_flex::<B>), FloatDType::F32);
                    let row_dot = B::float_sum_dim(B::float_mul(probs.clone(), dp.clone()), 2);
                    let ds = B::float_mul(probs, B::float_sub(dp, row_dot));
                    B::float_cast(B::float_mul_scalar(ds, scale.into()), dtype)
                }
            };
            dq_blocks.push(crate::host_matmul::matmul::<B>(ds.clone(), k_prefix));
            let dk_part = crate::host_matmul::matmul::<B>(B::float_transpose(ds), q_block);
            dk = add_prefix::<B>(dk, dk_part, block.p1);
        }
        dqs.push(ungrouped::<B>(cat_or_single::<B>(dq_blocks, 1), kvh, rep, t, d));
        dks.push(ungrouped::<B>(B::float_cast(dk, dtype), kvh, 1, t, d));
        dvs.push(ungrouped::<B>(B::float_cast(dv, dtype), kvh, 1, t, d));
    }
    (cat_or_single::<B>(dqs, 0), cat_or_single::<B>(dks, 0), cat_or_single::<B>(dvs, 0))
}

impl CausalAttentionBackend for Flex {}

#[cfg(feature = "cube")]
impl CausalAttentionBackend for Cube {}

impl<B: Backend + CausalAttentionBackend, C: CheckpointStrategy> CausalAttentionBackend for Autodiff<B, C> {
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct CausalAttentionBackward;

        impl<B: Backend> Backward<B, 3> for CausalAttentionBackward {
            /// q, k and v as checkpointed nodes (stored or recomputed), and the scale: no scores.
            type State = (NodeId, NodeId, NodeId, f32);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_q, node_k, node_v] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (q, k, v, scale) = ops.state;
                let q: FloatTensor<B> = checkpointer.retrieve_node_output(q);
                let k: FloatTensor<B> = checkpointer.retrieve_node_output(k);
                let v: FloatTensor<B> = checkpointer.retrieve_node_output(v);
                let (dq, dk, dv) = causal_attention_grad_reference::<B>(q, k, v, grad, scale);
                for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        match CausalAttentionBackward.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&q), prep.checkpoint(&k), prep.checkpoint(&v), scale);
                let out = B::causal_attention(q.into_primitive(), k.into_primitive(), v.into_primitive(), scale);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::causal_attention(q.into_primitive(), k.into_primitive(), v.into_primitive(), scale))
            }
        }
    }
}

/// Causal attention of `q [batch, heads, len, head_dim]` over `k`, `v [batch, kv_heads, len, head_dim]`
/// scaled by `scale` (usually `head_dim^-½`): `[batch, heads, len, head_dim]`. Gradients flow to q, k, v.
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, scale: f32) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as CausalAttentionBackend>::causal_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        scale,
    ))
}

/// The softmax and its backward on the flex backend, one row at a time on the host: the causal part of
/// each row only (the rest is 0 and costs nothing), scaled as transformers does (`bf16(score · scale)`),
/// the statistics in f32 with the vectorised exp.
mod host {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{DType, TensorData};
    use half::bf16;
    use rayon::prelude::*;

    use crate::simd;

    fn contiguous(t: &FlexTensor) -> FlexTensor {
        if t.is_contiguous() { t.clone() } else { t.to_contiguous() }
    }

    /// Row `r` of a `[.., len]` tensor widened to f32.
    fn row_f32(t: &FlexTensor, r: usize, len: usize, out: &mut [f32]) {
        let offset = t.layout().start_offset() + r * len;
        let n = out.len();
        match t.dtype() {
            DType::F32 => out.copy_from_slice(&t.storage::<f32>()[offset..offset + n]),
            DType::BF16 => {
                for (o, v) in out.iter_mut().zip(&t.storage::<bf16>()[offset..offset + n]) {
                    *o = v.to_f32();
                }
            }
            other => unreachable!("attention in {other:?}"),
        }
    }

    /// The visible keys of row `r` of a block's `[g, (p1 − p0) · rep, p1]` matrix.
    fn visible(r: usize, block: super::Block) -> usize {
        let rows = (block.p1 - block.p0) * block.rep;
        block.p0 + (r % rows) / block.rep + 1
    }

    /// `softmax(bf16(scores · scale) + causal mask)` in f32 for one block of query rows.
    pub fn causal_softmax(scores: &FlexTensor, scale: f32, block: super::Block) -> FlexTensor {
        let scores = contiguous(scores);
        let shape = scores.layout().shape().clone();
        let len = shape[shape.num_dims() - 1];
        let bf16_scores = scores.dtype() == DType::BF16;
        let mut out = vec![0.0f32; shape.num_elements()];
        out.par_chunks_mut(len).enumerate().for_each(|(r, out_row)| {
            let visible = &mut out_row[..visible(r, block)];
            row_f32(&scores, r, len, visible);
            for v in visible.iter_mut() {
                *v = if bf16_scores { bf16::from_f32(*v * scale).to_f32() } else { *v * scale };
            }
            simd::softmax(visible);
        });
        FlexTensor::from_data(TensorData::new(out, shape))
    }

    /// `dS = scale · P ⊙ (dP − Σ_j P ⊙ dP)` in dP's dtype for one block, P f32.
    pub fn softmax_backward(probs: &FlexTensor, dp: &FlexTensor, scale: f32, block: super::Block) -> FlexTensor {
        let (probs, dp) = (contiguous(probs), contiguous(dp));
        let shape = dp.layout().shape().clone();
        let len = shape[shape.num_dims() - 1];
        let p_values = &probs.storage::<f32>()[probs.layout().start_offset()..][..shape.num_elements()];
        let row_ds = |r: usize, dp_row: &mut [f32]| {
            let visible = visible(r, block);
            row_f32(&dp, r, len, &mut dp_row[..visible]);
            let p = &p_values[r * len..r * len + visible];
            let dot: f32 = p.iter().zip(&dp_row[..visible]).map(|(p, d)| p * d).sum();
            for (d, p) in dp_row[..visible].iter_mut().zip(p) {
                *d = p * (*d - dot) * scale;
            }
            dp_row[visible..].fill(0.0);
        };
        match dp.dtype() {
            DType::BF16 => {
                let mut out = vec![bf16::ZERO; shape.num_elements()];
                out.par_chunks_mut(len).enumerate().for_each_init(
                    || vec![0.0f32; len],
                    |buf, (r, out_row)| {
                        row_ds(r, buf);
                        for (o, v) in out_row.iter_mut().zip(buf.iter()) {
                            *o = bf16::from_f32(*v);
                        }
                    },
                );
                FlexTensor::from_data(TensorData::new(out, shape))
            }
            _ => {
                let mut out = vec![0.0f32; shape.num_elements()];
                out.par_chunks_mut(len).enumerate().for_each(|(r, out_row)| row_ds(r, out_row));
                FlexTensor::from_data(TensorData::new(out, shape))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{values, worst};
    use burn::tensor::activation::softmax;
    use burn::tensor::{Bool, DType, Device, Distribution};

    /// The decomposed attention of transformers' eager path (repeat_kv, mask, f32 softmax) through autodiff.
    fn decomposed(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, scale: f32) -> Tensor<4> {
        let [b, h, t, _] = q.dims();
        let [_, kvh, _, d] = k.dims();
        let rep = h / kvh;
        let repeat = |x: Tensor<4>| x.unsqueeze_dim::<5>(2).expand([b, kvh, rep, t, d]).reshape([b, h, t, d]);
        let (k, v) = (repeat(k), repeat(v));
        let values: Vec<bool> = (0..t).flat_map(|i| (0..t).map(move |j| j > i)).collect();
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(values, [t, t]), &q.device());
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
        let dtype = scores.dtype();
        let scores =
            scores.cast(DType::F32).mask_fill(mask.reshape([1, 1, t, t]).expand([b, h, t, t]), f32::NEG_INFINITY);
        softmax(scores, 3).cast(dtype).matmul(v)
    }

    /// Value and all three input gradients equal the decomposed attention's, with grouped heads (6 over 2),
    /// ungrouped heads and a batch of 3, under a non-uniform upstream gradient.
    #[test]
    fn fused_attention_and_its_gradients_equal_the_decomposed_attention() {
        let device = Device::flex().autodiff();
        for (b, h, kvh, t, d) in [(3, 6, 2, 17, 8), (1, 4, 4, 33, 16), (2, 3, 1, 5, 4), (2, 6, 2, 300, 8)] {
            let scale = (d as f32).powf(-0.5);
            let q0 = Tensor::<4>::random([b, h, t, d], Distribution::Normal(0.0, 1.0), &device);
            let k0 = Tensor::<4>::random([b, kvh, t, d], Distribution::Normal(0.0, 1.0), &device);
            let v0 = Tensor::<4>::random([b, kvh, t, d], Distribution::Normal(0.0, 1.0), &device);
            let c = Tensor::<4>::random([b, h, t, d], Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool| {
                let (q, k, v) = (
                    q0.clone().detach().require_grad(),
                    k0.clone().detach().require_grad(),
                    v0.clone().detach().require_grad(),
                );
                let out = if fused {
                    causal_attention(q.clone(), k.clone(), v.clone(), scale)
                } else {
                    decomposed(q.clone(), k.clone(), v.clone(), scale)
                };
                let grads = (out.clone() * c.clone()).sum().backward();
                let grad = |x: &Tensor<4>| values(x.grad(&grads).unwrap());
                (values(out), grad(&q), grad(&k), grad(&v))
            };
            let (ours, theirs) = (run(true), run(false));
            let errors = [
                worst(&ours.0, &theirs.0),
                worst(&ours.1, &theirs.1),
                worst(&ours.2, &theirs.2),
                worst(&ours.3, &theirs.3),
            ];
            assert!(errors.iter().all(|&e| e < 2e-6), "{b}x{h}/{kvh}x{t}x{d}: out, dq, dk, dv off by {errors:?}");
        }
    }

    /// Position 0 attends to itself only: its output is v's first row of its K/V head.
    #[test]
    fn the_first_position_sees_only_itself() {
        let device = Device::flex();
        let q = Tensor::<4>::random([1, 4, 6, 8], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<4>::random([1, 2, 6, 8], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<4>::random([1, 2, 6, 8], Distribution::Normal(0.0, 1.0), &device);
        let out = values(causal_attention(q, k, v.clone(), 0.3).slice([0..1, 0..4, 0..1, 0..8]));
        let v = values(v.slice([0..1, 0..2, 0..1, 0..8]));
        let expected: Vec<f32> = [0, 0, 1, 1].iter().flat_map(|&g| v[g * 8..g * 8 + 8].to_vec()).collect();
        assert!(worst(&out, &expected) < 1e-6, "{out:?} vs {expected:?}");
    }
}
