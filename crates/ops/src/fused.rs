//! The decoder's element-wise blocks as single ops: RMSNorm and SwiGLU's `silu(gate) · up`.
//!
//! Composed from burn ops, RMSNorm is nine full-size passes (cast, square, mean, add, sqrt, recip, mul,
//! cast, mul) and SwiGLU four, each a fresh allocation, each recorded by autodiff and recomputed by the
//! checkpointer. Here each is one op with its own backward: on flex one pass over the rows in f32
//! (vectorised `exp` from [`crate::simd`]), rounded once to the compute dtype where transformers rounds
//! (RMSNorm: the normalised row, then the product with the weight; SwiGLU: `silu(gate)`, then the
//! product with `up`); on the CubeCL backend the same formulas in backend ops. The backward keeps only
//! the inputs (as checkpointed nodes) and recomputes the statistics:
//! RMSNorm `dx = r · (w·dy − n · mean(w·dy · n))` with `n = x·r`, `r = (mean(x²) + ε)^−½` (the weight is
//! frozen); SwiGLU `d_gate = dy · up · s · (1 + g · (1 − s))`, `d_up = dy · g · s` with `s = σ(g)`.

#[cfg(feature = "cube")]
use burn::backend::Cube;
use burn::backend::autodiff::{
    Autodiff, NodeId,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::{
    Backend, Dispatch, Flex, FloatDType, Scalar, TensorMetadata, backend_extension, tensor::FloatTensor,
};
use burn::tensor::{DType, Shape, Tensor, TensorData};
use half::bf16;
use rayon::prelude::*;

use crate::host_matmul::{HostFloat, host_values};

use crate::dtype::HostDtype;
use crate::simd;

/// The extension. Its default bodies are the formulas in backend ops (the CubeCL backend uses them); `Flex`
/// runs the host kernels below; `Autodiff` adds the backward.
#[backend_extension(Flex, Cube: cfg(feature = "cube"), Autodiff)]
pub trait FusedOpsBackend: Backend {
    /// `w · (x · (mean(x²) + ε)^−½)` per row of `x [rows, hidden]`, `w [hidden]`, in x's dtype.
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        rms_norm_reference::<Self>(x, weight, eps)
    }
    /// The input gradient of [`rms_norm`](FusedOpsBackend::rms_norm) for the upstream `grad`.
    fn rms_norm_grad(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        rms_norm_grad_reference::<Self>(x, weight, eps, grad)
    }
    /// `silu(gate) · up`, any shape (both the same), in their dtype.
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        swiglu_reference::<Self>(gate, up)
    }
    /// `(d_gate, d_up)` of [`swiglu`](FusedOpsBackend::swiglu) for the upstream `grad`.
    fn swiglu_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        swiglu_grad_reference::<Self>(gate, up, grad)
    }
}

// ---------------------------------------------------------------------------------------------------
// The formulas in backend ops (CubeCL backend, and the tests' second opinion).

fn last_dim_mean<B: Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
    let dim = t.shape().num_dims() - 1;
    B::float_mean_dim(t, dim)
}

/// `(x in f32, r = (mean(x²) + ε)^−½)`.
fn rms_statistics<B: Backend>(x: FloatTensor<B>, eps: f64) -> (FloatTensor<B>, FloatTensor<B>) {
    let x32 = B::float_cast(x, FloatDType::F32);
    let variance = last_dim_mean::<B>(B::float_mul(x32.clone(), x32.clone()));
    let r = B::float_recip(B::float_sqrt(B::float_add_scalar(variance, Scalar::Float(eps))));
    (x32, r)
}

pub fn rms_norm_reference<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    let dtype: FloatDType = x.dtype().into();
    let shape = x.shape();
    let (x32, r) = rms_statistics::<B>(x, eps);
    let normed = B::float_cast(B::float_mul(x32, r), dtype);
    B::float_mul(B::float_expand(B::float_cast(weight, dtype), shape), normed)
}

pub fn rms_norm_grad_reference<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    eps: f64,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let dtype: FloatDType = x.dtype().into();
    let shape = x.shape();
    let (x32, r) = rms_statistics::<B>(x, eps);
    let n = B::float_mul(x32, r.clone());
    let w = B::float_expand(B::float_cast(weight, FloatDType::F32), shape);
    let dn = B::float_mul(B::float_cast(grad, FloatDType::F32), w);
    let dot = last_dim_mean::<B>(B::float_mul(dn.clone(), n.clone()));
    let dx = B::float_mul(r, B::float_sub(dn, B::float_mul(n, dot)));
    B::float_cast(dx, dtype)
}

/// `σ(g)` in f32.
fn sigmoid32<B: Backend>(g32: FloatTensor<B>) -> FloatTensor<B> {
    B::float_recip(B::float_add_scalar(B::float_exp(B::float_neg(g32)), Scalar::Float(1.0)))
}

pub fn swiglu_reference<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let dtype: FloatDType = gate.dtype().into();
    let g32 = B::float_cast(gate, FloatDType::F32);
    let silu = B::float_cast(B::float_mul(g32.clone(), sigmoid32::<B>(g32)), dtype);
    B::float_mul(silu, up)
}

pub fn swiglu_grad_reference<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let dtype: FloatDType = gate.dtype().into();
    let g32 = B::float_cast(gate, FloatDType::F32);
    let (u32_, dy) = (B::float_cast(up, FloatDType::F32), B::float_cast(grad, FloatDType::F32));
    let s = sigmoid32::<B>(g32.clone());
    let one_minus_s = B::float_add_scalar(B::float_neg(s.clone()), Scalar::Float(1.0));
    let slope =
        B::float_mul(s.clone(), B::float_add_scalar(B::float_mul(g32.clone(), one_minus_s), Scalar::Float(1.0)));
    let d_gate = B::float_mul(B::float_mul(dy.clone(), u32_), slope);
    let d_up = B::float_mul(dy, B::float_mul(g32, s));
    (B::float_cast(d_gate, dtype), B::float_cast(d_up, dtype))
}

// ---------------------------------------------------------------------------------------------------
// Host kernels (flex).

fn weight_f32(weight: &FlexTensor) -> Vec<f32> {
    match weight.dtype() {
        DType::BF16 => host_values::<bf16>(weight).iter().map(|v| v.to_f32()).collect(),
        DType::F32 => host_values::<f32>(weight).into_owned(),
        other => unreachable!("RMSNorm weight in {other:?}"),
    }
}

fn output<T: HostFloat>(values: Vec<T>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// `(Σ x², as f32)` of a row, 16 lanes (vectorised).
fn sum_squares(row: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = row.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            lanes[i] += c[i] * c[i];
        }
    }
    lanes.iter().sum::<f32>() + rest.iter().map(|v| v * v).sum::<f32>()
}

fn rms_norm_host<T: HostFloat>(x: &FlexTensor, weight: &FlexTensor, eps: f64) -> FlexTensor {
    let shape = x.shape();
    let hidden = shape[shape.num_dims() - 1];
    let (values, w) = (host_values::<T>(x), weight_f32(weight));
    let mut out = vec![T::from32(0.0); values.len()];
    out.par_chunks_mut(hidden).zip(values.par_chunks(hidden)).for_each_init(Vec::new, |row32, (out_row, row)| {
        row32.clear();
        row32.extend(row.iter().map(|v| v.to32()));
        let r = 1.0 / ((sum_squares(row32) / hidden as f32) + eps as f32).sqrt();
        for ((o, &x), &w) in out_row.iter_mut().zip(row32.iter()).zip(&w) {
            *o = T::from32(T::from32(w).to32() * T::from32(x * r).to32());
        }
    });
    output(out, shape)
}

fn rms_norm_grad_host<T: HostFloat>(x: &FlexTensor, weight: &FlexTensor, eps: f64, grad: &FlexTensor) -> FlexTensor {
    let shape = x.shape();
    let hidden = shape[shape.num_dims() - 1];
    let (values, dy, w) = (host_values::<T>(x), host_values::<T>(grad), weight_f32(weight));
    let mut out = vec![T::from32(0.0); values.len()];
    out.par_chunks_mut(hidden).zip(values.par_chunks(hidden).zip(dy.par_chunks(hidden))).for_each_init(
        || (Vec::new(), Vec::new()),
        |(n, dn), (out_row, (row, dy_row))| {
            n.clear();
            n.extend(row.iter().map(|v| v.to32()));
            let r = 1.0 / ((sum_squares(n) / hidden as f32) + eps as f32).sqrt();
            n.iter_mut().for_each(|v| *v *= r);
            dn.clear();
            dn.extend(dy_row.iter().zip(&w).map(|(g, w)| g.to32() * w));
            let dot = dn.iter().zip(n.iter()).map(|(a, b)| a * b).sum::<f32>() / hidden as f32;
            for ((o, &dn), &n) in out_row.iter_mut().zip(dn.iter()).zip(n.iter()) {
                *o = T::from32(r * (dn - n * dot));
            }
        },
    );
    output(out, shape)
}

/// `σ(g)` with the vectorised exp.
#[inline(always)]
fn sigmoid(g: f32) -> f32 {
    1.0 / (simd::exp(-g) + 1.0)
}

fn swiglu_host<T: HostFloat>(gate: &FlexTensor, up: &FlexTensor) -> FlexTensor {
    let shape = gate.shape();
    let (g, u) = (host_values::<T>(gate), host_values::<T>(up));
    let mut out = vec![T::from32(0.0); g.len()];
    out.par_chunks_mut(4096).zip(g.par_chunks(4096).zip(u.par_chunks(4096))).for_each(|(o, (g, u))| {
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            let g = g.to32();
            *o = T::from32(T::from32(g * sigmoid(g)).to32() * u.to32());
        }
    });
    output(out, shape)
}

fn swiglu_grad_host<T: HostFloat>(gate: &FlexTensor, up: &FlexTensor, grad: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let shape = gate.shape();
    let (g, u, dy) = (host_values::<T>(gate), host_values::<T>(up), host_values::<T>(grad));
    let mut d_gate = vec![T::from32(0.0); g.len()];
    let mut d_up = vec![T::from32(0.0); g.len()];
    d_gate
        .par_chunks_mut(4096)
        .zip(d_up.par_chunks_mut(4096))
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)).zip(dy.par_chunks(4096)))
        .for_each(|((dg, du), ((g, u), dy))| {
            for i in 0..dg.len() {
                let (g, u, dy) = (g[i].to32(), u[i].to32(), dy[i].to32());
                let s = sigmoid(g);
                dg[i] = T::from32(dy * u * (s * (g * (1.0 - s) + 1.0)));
                du[i] = T::from32(dy * (g * s));
            }
        });
    (output(d_gate, shape.clone()), output(d_up, shape))
}

/// The host kernel in the tensor's host dtype, or the reference formula for the others ([`crate::dtype`]).
macro_rules! by_dtype {
    ($t:expr, $f:ident($($arg:expr),*), $reference:expr) => {
        match HostDtype::of_tensor(&$t) {
            Some(HostDtype::Bf16) => $f::<bf16>($($arg),*),
            Some(HostDtype::F32) => $f::<f32>($($arg),*),
            None => $reference,
        }
    };
}

impl FusedOpsBackend for Flex {
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        by_dtype!(x, rms_norm_host(&x, &weight, eps), rms_norm_reference::<Self>(x, weight, eps))
    }
    fn rms_norm_grad(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let grad = if grad.dtype() == x.dtype() { grad } else { Flex::float_cast(grad, x.dtype().into()) };
        by_dtype!(x, rms_norm_grad_host(&x, &weight, eps, &grad), rms_norm_grad_reference::<Self>(x, weight, eps, grad))
    }
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        by_dtype!(gate, swiglu_host(&gate, &up), swiglu_reference::<Self>(gate, up))
    }
    fn swiglu_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let grad = if grad.dtype() == gate.dtype() { grad } else { Flex::float_cast(grad, gate.dtype().into()) };
        by_dtype!(gate, swiglu_grad_host(&gate, &up, &grad), swiglu_grad_reference::<Self>(gate, up, grad))
    }
}

#[cfg(feature = "cube")]
impl FusedOpsBackend for Cube {}

impl<B: Backend + FusedOpsBackend, C: CheckpointStrategy> FusedOpsBackend for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RmsNormBackward;

        impl<B: Backend + FusedOpsBackend> Backward<B, 1> for RmsNormBackward {
            /// x as a checkpointed node, the (frozen) weight and ε.
            type State = (NodeId, FloatTensor<B>, f64);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_x] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x, weight, eps) = ops.state;
                if let Some(node) = node_x {
                    let x: FloatTensor<B> = checkpointer.retrieve_node_output(x);
                    grads.register::<B>(node.id, B::rms_norm_grad(x, weight, eps, grad));
                }
            }
        }

        let weight = weight.into_primitive();
        match RmsNormBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), weight.clone(), eps);
                prep.finish(state, B::rms_norm(x.into_primitive(), weight, eps))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(x.into_primitive(), weight, eps)),
        }
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SwigluBackward;

        impl<B: Backend + FusedOpsBackend> Backward<B, 2> for SwigluBackward {
            /// gate and up as checkpointed nodes.
            type State = (NodeId, NodeId);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_gate, node_up] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (gate, up) = ops.state;
                let gate: FloatTensor<B> = checkpointer.retrieve_node_output(gate);
                let up: FloatTensor<B> = checkpointer.retrieve_node_output(up);
                let (d_gate, d_up) = B::swiglu_grad(gate, up, grad);
                for (node, grad) in [(node_gate, d_gate), (node_up, d_up)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        match SwigluBackward.prepare::<C>([gate.node(), up.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&gate), prep.checkpoint(&up));
                prep.finish(state, B::swiglu(gate.into_primitive(), up.into_primitive()))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu(gate.into_primitive(), up.into_primitive())),
        }
    }
}

/// RMSNorm over the last dimension of `x` with weight `[hidden]`; gradients flow to x.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOpsBackend>::rms_norm(x.into_dispatch(), weight.into_dispatch(), eps))
}

/// `silu(gate) · up`; gradients flow to both.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOpsBackend>::swiglu(gate.into_dispatch(), up.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{values, worst};
    use burn::tensor::activation::silu;
    use burn::tensor::{Device, Distribution};

    /// RMSNorm as the model composed it from burn ops before this op.
    fn composed_rms_norm(x: Tensor<2>, weight: Tensor<1>, eps: f64) -> Tensor<2> {
        let dtype = x.dtype();
        let x32 = x.cast(DType::F32);
        let variance = x32.clone().square().mean_dim(1);
        let normed = x32 * (variance + eps).sqrt().recip();
        weight.unsqueeze::<2>() * normed.cast(dtype)
    }

    /// Values and input gradients of both fused ops equal the composed autodiff versions (f32 and bf16,
    /// rows not a multiple of the 16 lanes), and the flex kernels equal the backend-op formulas.
    #[test]
    fn fused_norm_and_swiglu_equal_the_composed_ops_and_their_gradients() {
        let device = Device::flex().autodiff();
        for (dtype, tol) in [(DType::F32, 2e-6f32), (DType::BF16, 2e-2)] {
            let x = Tensor::<2>::random([7, 70], Distribution::Normal(0.3, 2.0), &device).cast(dtype);
            let w = Tensor::<1>::random([70], Distribution::Uniform(0.5, 1.5), &device).cast(dtype);
            let r = Tensor::<2>::random([7, 70], Distribution::Normal(0.0, 1.0), &device).cast(dtype);
            let check = |what: &str, a: Tensor<2>, b: Tensor<2>| {
                let e = worst(&values(a), &values(b));
                assert!(e < tol, "{what} {dtype:?}: {e}");
            };

            let (x1, x2) = (x.clone().detach().require_grad(), x.clone().detach().require_grad());
            let (y1, y2) = (rms_norm(x1.clone(), w.clone(), 1e-5), composed_rms_norm(x2.clone(), w.clone(), 1e-5));
            let (g1, g2) = (
                (y1.clone() * r.clone()).cast(DType::F32).sum().backward(),
                (y2.clone() * r.clone()).cast(DType::F32).sum().backward(),
            );
            check("rms_norm", y1, y2);
            check("rms_norm dx", x1.grad(&g1).unwrap(), x2.grad(&g2).unwrap());

            let gate = Tensor::<2>::random([7, 70], Distribution::Normal(0.0, 3.0), &device).cast(dtype);
            let up = Tensor::<2>::random([7, 70], Distribution::Normal(0.0, 1.0), &device).cast(dtype);
            let (ga, ua) = (gate.clone().detach().require_grad(), up.clone().detach().require_grad());
            let (gb, ub) = (gate.clone().detach().require_grad(), up.clone().detach().require_grad());
            let (y1, y2) = (swiglu(ga.clone(), ua.clone()), silu(gb.clone()) * ub.clone());
            let (g1, g2) = (
                (y1.clone() * r.clone()).cast(DType::F32).sum().backward(),
                (y2.clone() * r.clone()).cast(DType::F32).sum().backward(),
            );
            check("swiglu", y1, y2);
            check("swiglu d_gate", ga.grad(&g1).unwrap(), gb.grad(&g2).unwrap());
            check("swiglu d_up", ua.grad(&g1).unwrap(), ub.grad(&g2).unwrap());

            // The flex host kernels against the same formulas in backend ops.
            let (xf, wf, rf) = (flex_of(&x), flex_of_1(&w), flex_of(&r));
            let (gf, uf) = (flex_of(&gate), flex_of(&up));
            let pairs = [
                (
                    Flex::rms_norm(xf.clone(), wf.clone(), 1e-5),
                    rms_norm_reference::<Flex>(xf.clone(), wf.clone(), 1e-5),
                ),
                (
                    Flex::rms_norm_grad(xf.clone(), wf.clone(), 1e-5, rf.clone()),
                    rms_norm_grad_reference::<Flex>(xf, wf, 1e-5, rf.clone()),
                ),
                (Flex::swiglu(gf.clone(), uf.clone()), swiglu_reference::<Flex>(gf.clone(), uf.clone())),
                (
                    Flex::swiglu_grad(gf.clone(), uf.clone(), rf.clone()).0,
                    swiglu_grad_reference::<Flex>(gf.clone(), uf.clone(), rf.clone()).0,
                ),
                (Flex::swiglu_grad(gf.clone(), uf.clone(), rf.clone()).1, swiglu_grad_reference::<Flex>(gf, uf, rf).1),
            ];
            for (i, (a, b)) in pairs.into_iter().enumerate() {
                let (a, b) = (flex_values(a), flex_values(b));
                let e = worst(&a, &b);
                assert!(e < tol, "host kernel {i} {dtype:?}: {e}");
            }
        }
    }

    fn flex_of(t: &Tensor<2>) -> FlexTensor {
        let data = t.clone().into_data();
        FlexTensor::from_data(data)
    }

    fn flex_of_1(t: &Tensor<1>) -> FlexTensor {
        FlexTensor::from_data(t.clone().into_data())
    }

    fn flex_values(t: FlexTensor) -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec().unwrap()
    }
}
