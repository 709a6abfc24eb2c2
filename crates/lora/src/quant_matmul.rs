//! `y = x · dequant(W)ᵀ` as a burn backend extension with its own backward.
//!
//! The forward decodes the packed 4-bit weight, multiplies, and drops the decoded copy. The backward keeps
//! only the packed codes, the per-block absmax and the code book (≈ 4.1 bits per parameter), decodes W
//! again and returns `dx = dy · W`; the weight gets no gradient, and no dense copy of it lives between the
//! forward and the backward. On the flex (CPU) backend the decode is a few tensor ops; the CubeCL kernels
//! replace it with a fused dequantize-matmul on GPUs.

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::backend::{
    backend_extension,
    tensor::{FloatTensor, IntTensor},
    Backend, Dispatch, FloatDType, Flex, TensorMetadata,
};
use burn::tensor::{IntDType, Shape, Slice, Tensor};
use quant::DeviceQuantizedWeight;

/// The geometry of a packed weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedShape {
    pub rows: usize,
    pub cols: usize,
    pub blocksize: usize,
}

/// The extension: `Flex` computes it, `Autodiff` routes through the hand-written backward below.
#[backend_extension(Flex, Autodiff)]
pub trait QuantMatmulBackend: Backend {
    /// `x [M, K] · Wᵀ` with W `[N, K]` given as packed U8 codes, f32 absmax per block and the 16-entry code
    /// book; returns `[M, N]` in x's dtype.
    fn quant_matmul_t(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        codebook: FloatTensor<Self>,
        shape: PackedShape,
    ) -> FloatTensor<Self>;
}

/// Decodes W `[rows, cols]` in `dtype` from its packed form with plain backend ops.
pub fn decode_weight<B: Backend>(
    packed: IntTensor<B>,
    absmax: FloatTensor<B>,
    codebook: FloatTensor<B>,
    shape: PackedShape,
    dtype: FloatDType,
) -> FloatTensor<B> {
    let numel = shape.rows * shape.cols;
    let bytes = packed.shape()[0];
    let packed = B::int_cast(packed, IntDType::I64);
    let high = B::int_reshape(B::bitwise_right_shift_scalar(packed.clone(), 4i64.into()), Shape::new([bytes, 1]));
    let low = B::int_reshape(B::bitwise_and_scalar(packed, 15i64.into()), Shape::new([bytes, 1]));
    let codes = B::int_reshape(B::int_cat(vec![high, low], 1), Shape::new([bytes * 2]));
    let codes = B::int_slice(codes, &[Slice::from(0..numel)]);
    let values = B::float_select(codebook, 0, codes);
    let blocks = absmax.shape()[0];
    let padded = blocks * shape.blocksize;
    let values = if padded > numel {
        let device = values.device();
        let zeros = B::float_zeros(Shape::new([padded - numel]), &device, FloatDType::F32);
        B::float_cat(vec![values, zeros], 0)
    } else {
        values
    };
    let scaled = B::float_mul(
        B::float_reshape(values, Shape::new([blocks, shape.blocksize])),
        B::float_reshape(absmax, Shape::new([blocks, 1])),
    );
    let flat = B::float_slice(B::float_reshape(scaled, Shape::new([padded])), &[Slice::from(0..numel)]);
    let w = B::float_reshape(flat, Shape::new([shape.rows, shape.cols]));
    if dtype == FloatDType::F32 { w } else { B::float_cast(w, dtype) }
}

fn float_dtype_of<B: Backend>(x: &FloatTensor<B>) -> FloatDType {
    x.dtype().into()
}

fn forward<B: Backend>(x: FloatTensor<B>, packed: IntTensor<B>, absmax: FloatTensor<B>, codebook: FloatTensor<B>, shape: PackedShape) -> FloatTensor<B> {
    let dtype = float_dtype_of::<B>(&x);
    let w = decode_weight::<B>(packed, absmax, codebook, shape, dtype);
    B::float_matmul(x, B::float_transpose(w))
}

impl QuantMatmulBackend for Flex {
    fn quant_matmul_t(x: FloatTensor<Self>, packed: IntTensor<Self>, absmax: FloatTensor<Self>, codebook: FloatTensor<Self>, shape: PackedShape) -> FloatTensor<Self> {
        forward::<Self>(x, packed, absmax, codebook, shape)
    }
}

impl<B: Backend + QuantMatmulBackend, C: CheckpointStrategy> QuantMatmulBackend for Autodiff<B, C> {
    fn quant_matmul_t(x: FloatTensor<Self>, packed: IntTensor<Self>, absmax: FloatTensor<Self>, codebook: FloatTensor<Self>, shape: PackedShape) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct QuantMatmulBackward;

        impl<B: Backend> Backward<B, 1> for QuantMatmulBackward {
            /// Packed codes, absmax, code book, geometry: never the decoded weight.
            type State = (IntTensor<B>, FloatTensor<B>, FloatTensor<B>, PackedShape);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_x] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (packed, absmax, codebook, shape) = ops.state;
                if let Some(node) = node_x {
                    let dtype = float_dtype_of::<B>(&grad);
                    let w = decode_weight::<B>(packed, absmax, codebook, shape, dtype);
                    grads.register::<B>(node.id, B::float_matmul(grad, w));
                }
            }
        }

        let absmax = absmax.into_primitive();
        let codebook = codebook.into_primitive();
        let (x, x_node) = x.into_parts();
        match QuantMatmulBackward.prepare::<C>([x_node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::quant_matmul_t(x, packed.clone(), absmax.clone(), codebook.clone(), shape);
                prep.finish((packed, absmax, codebook, shape), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::quant_matmul_t(x, packed, absmax, codebook, shape)),
        }
    }
}

/// `x · Wᵀ` for a 4-bit weight: `x [M, K]`, W `[N, K]` → `[M, N]`. Gradients flow to x only.
pub fn quant_matmul_t(x: Tensor<2>, weight: &DeviceQuantizedWeight) -> Tensor<2> {
    let shape = PackedShape { rows: weight.rows, cols: weight.cols, blocksize: weight.blocksize };
    let absmax = weight.absmax_f32();
    Tensor::from_dispatch(<Dispatch as QuantMatmulBackend>::quant_matmul_t(
        x.into_dispatch(),
        weight.packed.clone().into_dispatch(),
        absmax.into_dispatch(),
        weight.codebook.clone().into_dispatch(),
        shape,
    ))
}
