//! bf16 matmuls of the flex (CPU) backend through `bf16-gemm`'s AVX512-BF16 kernel.
//!
//! burn's flex multiplies bf16 by converting both operands to f32, multiplying in f32 and converting the
//! result back. [`matmul`] is `B::float_matmul` for any backend, except that on flex, with bf16 operands
//! and a CPU with AVX512-BF16, it reads the operands in place (the right-hand one transposed or not, so
//! `x · Wᵀ` needs no copy of W) and multiplies with bf16 dot products accumulated in f32, rounded once to
//! bf16 — the same values up to the order of the f32 sums. The QLoRA linear, the attention and the
//! chunked loss call it for their products. [`HostFloat`] and [`host_values`] serve the other flex host
//! kernels (dropout, `llama`'s fused ops).

use std::any::{Any, TypeId};
use std::borrow::Cow;

use bf16_gemm::{Dense, DenseLayout};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::{Backend, Flex, tensor::FloatTensor};
use burn::tensor::{DType, TensorData};
use half::bf16;

/// An element the flex host kernels read and write (f32 or bf16): arithmetic in f32, rounded once.
pub trait HostFloat: Copy + Send + Sync + 'static + bytemuck::Pod + burn::tensor::Element {
    fn to32(self) -> f32;
    fn from32(v: f32) -> Self;
    fn from64(v: f64) -> Self;
}

impl HostFloat for f32 {
    fn to32(self) -> f32 {
        self
    }
    fn from32(v: f32) -> Self {
        v
    }
    fn from64(v: f64) -> Self {
        v as f32
    }
}

impl HostFloat for bf16 {
    fn to32(self) -> f32 {
        self.to_f32()
    }
    fn from32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn from64(v: f64) -> Self {
        bf16::from_f64(v)
    }
}

/// The values of a flex tensor in row-major order, in its own element type (borrowed when contiguous).
pub fn host_values<T: HostFloat>(t: &FlexTensor) -> Cow<'_, [T]> {
    let numel = t.layout().num_elements();
    if t.is_contiguous() {
        let offset = t.layout().start_offset();
        Cow::Borrowed(&t.storage::<T>()[offset..offset + numel])
    } else {
        Cow::Owned(t.to_contiguous().storage::<T>()[..numel].to_vec())
    }
}

/// Whether B is the flex backend (whose tensors host kernels can read in place).
pub fn is_flex<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<Flex>()
}

/// `t` as the flex backend's tensor when B is flex (`Err(t)` otherwise), for host kernels.
pub fn downcast_flex<B: Backend>(t: FloatTensor<B>) -> Result<FlexTensor, FloatTensor<B>> {
    if TypeId::of::<B>() != TypeId::of::<Flex>() {
        return Err(t);
    }
    let any: Box<dyn Any> = Box::new(t);
    Ok(*any.downcast::<FlexTensor>().expect("flex float tensors are FlexTensors"))
}

/// The inverse of [`downcast_flex`]; B must be flex.
pub fn upcast_flex<B: Backend>(t: FlexTensor) -> FloatTensor<B> {
    let any: Box<dyn Any> = Box::new(t);
    *any.downcast::<FloatTensor<B>>().expect("B is Flex")
}

/// `lhs · rhs` for `[m, k] · [k, n]` or batched `[b, m, k] · [b, k, n]` (no broadcasting), as
/// `B::float_matmul`.
pub fn matmul<B: Backend>(lhs: FloatTensor<B>, rhs: FloatTensor<B>) -> FloatTensor<B> {
    if bf16_gemm::accelerated() && TypeId::of::<B>() == TypeId::of::<Flex>() {
        let (lhs, rhs) = (downcast_flex::<B>(lhs).expect("B is Flex"), downcast_flex::<B>(rhs).expect("B is Flex"));
        return upcast_flex::<B>(match flex_bf16_matmul(&lhs, &rhs) {
            Some(out) => out,
            None => <Flex as FloatTensorOps<Flex>>::float_matmul(lhs, rhs),
        });
    }
    B::float_matmul(lhs, rhs)
}

/// The 2-D matrices of a rank-2 or rank-3 tensor: (batch, rows, cols, batch stride, inner strides).
fn geometry(t: &FlexTensor) -> Option<(usize, usize, usize, isize, [isize; 2])> {
    let (shape, strides) = (t.layout().shape(), t.layout().strides());
    match shape.num_dims() {
        2 => Some((1, shape[0], shape[1], 0, [strides[0], strides[1]])),
        3 => Some((shape[0], shape[1], shape[2], strides[0], [strides[1], strides[2]])),
        _ => None,
    }
}

/// The product on flex through bf16-gemm; `None` where it does not apply (dtype, rank, broadcasting).
fn flex_bf16_matmul(lhs: &FlexTensor, rhs: &FlexTensor) -> Option<FlexTensor> {
    if lhs.dtype() != DType::BF16 || rhs.dtype() != DType::BF16 {
        return None;
    }
    let (batch, m, k, _, _) = geometry(lhs)?;
    let (rhs_batch, k2, n, _, _) = geometry(rhs)?;
    let rank = lhs.layout().shape().num_dims();
    if k != k2 || batch != rhs_batch || rank != rhs.layout().shape().num_dims() {
        return None;
    }
    // The left operand row-major and dense (copied if it is a view).
    let lhs_values = host_values::<bf16>(lhs);
    // The right operand in place when each matrix is row-major or transposed; else a dense copy.
    let in_place = |t: &FlexTensor| {
        let (_, _, _, batch_stride, [s0, s1]) = geometry(t)?;
        let layout = if s1 == 1 && s0 == n as isize {
            DenseLayout::KByN
        } else if s0 == 1 && s1 == k as isize {
            DenseLayout::NByK
        } else {
            return None;
        };
        (batch == 1 || batch_stride == (k * n) as isize).then_some(layout)
    };
    let (rhs, layout): (Cow<FlexTensor>, DenseLayout) = match in_place(rhs) {
        Some(layout) => (Cow::Borrowed(rhs), layout),
        None => (Cow::Owned(rhs.to_contiguous()), DenseLayout::KByN),
    };
    let rhs_values = &rhs.storage::<bf16>()[rhs.layout().start_offset()..][..batch * k * n];
    let mut out: Vec<bf16> = Vec::with_capacity(batch * m * n);
    for b in 0..batch {
        let dense = Dense::new(&rhs_values[b * k * n..(b + 1) * k * n], k, n, layout)?;
        out.extend(bf16_gemm::matmul::<bf16>(&lhs_values[b * m * k..(b + 1) * m * k], m, &dense));
    }
    let shape: Vec<usize> = if rank == 3 { vec![batch, m, n] } else { vec![m, n] };
    Some(FlexTensor::from_data(TensorData::new(out, shape)))
}
