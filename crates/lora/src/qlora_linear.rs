//! The whole QLoRA linear as one autodiff op: `y = x·dequant(W)ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ`.
//!
//! Built from the pieces (4-bit product, seeded dropout, two matmuls) in the same order as
//! [`LoraLinear::forward`](crate::LoraLinear) composed them, so the values are the same; what changes is
//! what lives between the forward and the backward. Composed, burn's autodiff (with checkpointing) keeps the
//! base output, the LoRA output and the dropped-out input of every layer — three `[rows, out]`/`[rows, in]`
//! tensors per linear — because the sum is a cheap op it recomputes from both of its inputs. This op keeps
//! x (as a checkpointed node: stored or recomputed), the `[rows, r]` intermediate `h = s·dropout(x)·Aᵀ`,
//! and A and B (small); the backward makes the dropout mask again from its seed:
//! `dB = dyᵀ·h`, `dh = s·dy·B`, `dA = dhᵀ·dropout(x)`, `dx = dy·W + dropout(dh·A)`.

use burn::backend::autodiff::{
    Autodiff, NodeId,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::{
    Backend, Dispatch, Flex, Scalar, backend_extension,
    tensor::{FloatTensor, IntTensor},
};
use burn::tensor::Tensor;
use quant::DeviceQuantizedWeight;

use ops::dropout::SeededDropoutBackend;
use ops::host_matmul::matmul;
use ops::quant_matmul::{PackedShape, QuantMatmulBackend};

/// The frozen 4-bit base of the op: packed codes, f32 absmax per block, code book, geometry.
#[derive(Debug, Clone)]
pub struct PackedBase<B: Backend> {
    pub packed: IntTensor<B>,
    pub absmax: FloatTensor<B>,
    pub codebook: FloatTensor<B>,
    pub shape: PackedShape,
}

/// The adapter's constants: scaling `s` and, when training, the dropout's seed and keep probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraScalars {
    pub scaling: f64,
    pub dropout: Option<(u64, f64)>,
}

/// The extension: `Flex` and `Cube` compose the forward from their 4-bit product and dropout;
/// `Autodiff` gives it the backward above.
#[backend_extension(Flex, Cube: cfg(feature = "cube"), Autodiff)]
pub trait QloraLinearBackend: Backend {
    /// `x [rows, in]` → `[rows, out]` for W `[out, in]` (packed), A `[r, in]`, B `[out, r]`, all in x's dtype
    /// (but the absmax and code book, f32).
    /// The default composes the backend's own 4-bit product and dropout (flex and Cube use it).
    #[allow(clippy::too_many_arguments)]
    fn qlora_linear(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        codebook: FloatTensor<Self>,
        shape: PackedShape,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scalars: LoraScalars,
    ) -> FloatTensor<Self>
    where
        Self: QuantMatmulBackend + SeededDropoutBackend,
    {
        qlora_linear_reference::<Self>(x, PackedBase { packed, absmax, codebook, shape }, a, b, scalars)
    }
}

fn dropped<B: SeededDropoutBackend>(x: FloatTensor<B>, scalars: LoraScalars) -> FloatTensor<B> {
    match scalars.dropout {
        Some((seed, keep)) => B::seeded_dropout(x, seed, keep),
        None => x,
    }
}

/// `h = s·dropout(x)·Aᵀ` `[rows, r]`.
fn lora_intermediate<B: SeededDropoutBackend>(
    x: FloatTensor<B>,
    a: FloatTensor<B>,
    scalars: LoraScalars,
) -> FloatTensor<B> {
    let xa = matmul::<B>(dropped::<B>(x, scalars), B::float_transpose(a));
    B::float_mul_scalar(xa, Scalar::Float(scalars.scaling))
}

/// The forward in backend ops; returns y and h.
fn forward_with_intermediate<B: QuantMatmulBackend + SeededDropoutBackend>(
    x: FloatTensor<B>,
    base: PackedBase<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    scalars: LoraScalars,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let h = lora_intermediate::<B>(x.clone(), a, scalars);
    let y_base = B::quant_matmul(x, base.packed, base.absmax, base.codebook, base.shape, true);
    let y = B::float_add(y_base, matmul::<B>(h.clone(), B::float_transpose(b)));
    (y, h)
}

/// The forward of the op on a backend that has the 4-bit product and the seeded dropout.
pub fn qlora_linear_reference<B: QuantMatmulBackend + SeededDropoutBackend>(
    x: FloatTensor<B>,
    base: PackedBase<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    scalars: LoraScalars,
) -> FloatTensor<B> {
    forward_with_intermediate::<B>(x, base, a, b, scalars).0
}

impl QloraLinearBackend for Flex {}

#[cfg(feature = "cube")]
impl QloraLinearBackend for burn::backend::Cube {}

impl<B, C> QloraLinearBackend for Autodiff<B, C>
where
    B: Backend + QloraLinearBackend + QuantMatmulBackend + SeededDropoutBackend,
    C: CheckpointStrategy,
{
    fn qlora_linear(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        codebook: FloatTensor<Self>,
        shape: PackedShape,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scalars: LoraScalars,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct QloraLinearBackward;

        /// x as a checkpointed node, h, A, B, the packed base and the scalars: no `[rows, out]` tensor.
        type State<B> = (NodeId, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, PackedBase<B>, LoraScalars);

        impl<B: Backend + QuantMatmulBackend + SeededDropoutBackend> Backward<B, 3> for QloraLinearBackward {
            type State = State<B>;

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_x, node_a, node_b] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (x, h, a, b, base, scalars) = ops.state;
                if let Some(node) = node_b {
                    // dB = dyᵀ·h, [out, r]
                    grads.register::<B>(node.id, matmul::<B>(B::float_transpose(dy.clone()), h));
                }
                if node_x.is_none() && node_a.is_none() {
                    return;
                }
                // dh = s·dy·B, [rows, r]
                let dh = B::float_mul_scalar(matmul::<B>(dy.clone(), b), Scalar::Float(scalars.scaling));
                if let Some(node) = node_a {
                    let x: FloatTensor<B> = checkpointer.retrieve_node_output(x);
                    // dA = dhᵀ·dropout(x), [r, in]
                    let xd = dropped::<B>(x, scalars);
                    grads.register::<B>(node.id, matmul::<B>(B::float_transpose(dh.clone()), xd));
                }
                if let Some(node) = node_x {
                    let dx_base = B::quant_matmul(dy, base.packed, base.absmax, base.codebook, base.shape, false);
                    let dx_lora = dropped::<B>(matmul::<B>(dh, a), scalars);
                    grads.register::<B>(node.id, B::float_add(dx_base, dx_lora));
                }
            }
        }

        let base = PackedBase { packed, absmax: absmax.into_primitive(), codebook: codebook.into_primitive(), shape };
        match QloraLinearBackward.prepare::<C>([x.node(), a.node(), b.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let x_checkpoint = prep.checkpoint(&x);
                let (a, b) = (a.into_primitive(), b.into_primitive());
                let (y, h) =
                    forward_with_intermediate::<B>(x.into_primitive(), base.clone(), a.clone(), b.clone(), scalars);
                prep.finish((x_checkpoint, h, a, b, base, scalars), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::qlora_linear(
                x.into_primitive(),
                base.packed,
                base.absmax,
                base.codebook,
                base.shape,
                a.into_primitive(),
                b.into_primitive(),
                scalars,
            )),
        }
    }
}

/// `x·dequant(W)ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ` for `x [rows, in]`, W 4-bit `[out, in]`, A `[r, in]`, B `[out, r]`
/// (A and B in x's dtype). Gradients flow to x, A and B.
pub fn qlora_linear(
    x: Tensor<2>,
    weight: &DeviceQuantizedWeight,
    a: Tensor<2>,
    b: Tensor<2>,
    scalars: LoraScalars,
) -> Tensor<2> {
    let shape = PackedShape { rows: weight.rows, cols: weight.cols, blocksize: weight.blocksize };
    Tensor::from_dispatch(<Dispatch as QloraLinearBackend>::qlora_linear(
        x.into_dispatch(),
        weight.packed.clone().into_dispatch(),
        weight.absmax_f32().into_dispatch(),
        weight.codebook.clone().into_dispatch(),
        shape,
        a.into_dispatch(),
        b.into_dispatch(),
        scalars,
    ))
}
