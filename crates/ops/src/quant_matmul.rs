//! `y = x · dequant(W)ᵀ` as a burn backend extension with its own backward.
//!
//! The forward decodes the packed 4-bit weight, multiplies, and drops the decoded copy. The backward keeps
//! only the packed codes, the per-block absmax and the code book (≈ 4.1 bits per parameter), decodes W
//! again and returns `dx = dy · W`; the weight gets no gradient, and no dense copy of it lives between the
//! forward and the backward. On the flex (CPU) backend the decode runs in the `nf4` crate's kernel
//! ([`decode_weight_on_host`]); [`decode_weight`] is the same decode in generic backend ops, for backends
//! without a kernel yet (the CubeCL kernels replace both with a fused dequantize-matmul on GPUs).

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
use burn::tensor::{DType, IntDType, Shape, Slice, Tensor, TensorData, read_sync};
use quant::DeviceQuantizedWeight;

/// The geometry of a packed weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedShape {
    pub rows: usize,
    pub cols: usize,
    pub blocksize: usize,
}

/// The extension: `Flex` computes it, `Autodiff` routes through the hand-written backward below.
#[backend_extension(Flex, Cube: cfg(feature = "cube"), Autodiff)]
pub trait QuantMatmulBackend: Backend {
    /// `x · Wᵀ` (`transposed`, x `[M, K]` → `[M, N]`) or `x · W` (x `[M, N]` → `[M, K]`), W `[N, K]` given
    /// as packed codes (u32 words, bitsandbytes' byte order), f32 absmax per block and the 16-entry code book; in x's dtype.
    fn quant_matmul(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        codebook: FloatTensor<Self>,
        shape: PackedShape,
        transposed: bool,
    ) -> FloatTensor<Self>;
}

/// Decodes W `[rows, cols]` in `dtype` from its packed form (u32 words) with plain backend ops.
pub fn decode_weight<B: Backend>(
    packed: IntTensor<B>,
    absmax: FloatTensor<B>,
    codebook: FloatTensor<B>,
    shape: PackedShape,
    dtype: FloatDType,
) -> FloatTensor<B> {
    let numel = shape.rows * shape.cols;
    let words = packed.shape()[0];
    let column = |t: IntTensor<B>| B::int_reshape(B::int_cast(t, IntDType::I32), Shape::new([words, 1]));
    let bytes: Vec<IntTensor<B>> = (0..4)
        .map(|i| {
            column(B::bitwise_and_scalar(B::bitwise_right_shift_scalar(packed.clone(), (8 * i).into()), 255i64.into()))
        })
        .collect();
    let bytes = B::int_reshape(B::int_cat(bytes, 1), Shape::new([words * 4]));
    let high = B::int_reshape(B::bitwise_right_shift_scalar(bytes.clone(), 4i64.into()), Shape::new([words * 4, 1]));
    let low = B::int_reshape(B::bitwise_and_scalar(bytes, 15i64.into()), Shape::new([words * 4, 1]));
    let codes = B::int_reshape(B::int_cat(vec![high, low], 1), Shape::new([words * 8]));
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

/// Decodes W on the host with the `nf4` crate's threaded kernel (for CPU backends, whose tensors are host
/// memory): far faster than gathering through I64 code tensors, and no 8-byte-per-element temporaries.
pub fn decode_weight_on_host<B: Backend>(
    packed: IntTensor<B>,
    absmax: FloatTensor<B>,
    codebook: FloatTensor<B>,
    shape: PackedShape,
    dtype: FloatDType,
) -> FloatTensor<B> {
    let device = absmax.device();
    let host = HostWeight::read::<B>(packed, absmax, codebook, shape);
    let mut out = vec![0.0f32; shape.rows * shape.cols];
    nf4::dequantize_4bit_with_codebook_into(host.bytes(), &host.absmax, shape.blocksize, &host.codebook, &mut out)
        .expect("consistent packed weight");
    let w = B::float_from_data(TensorData::new(out, [shape.rows, shape.cols]), &device);
    if dtype == FloatDType::F32 { w } else { B::float_cast(w, dtype) }
}

/// A packed weight read into host memory (free on CPU backends, whose tensors are host memory).
struct HostWeight {
    words: Vec<u32>,
    numel: usize,
    absmax: Vec<f32>,
    codebook: [f32; 16],
}

impl HostWeight {
    fn read<B: Backend>(
        packed: IntTensor<B>,
        absmax: FloatTensor<B>,
        codebook: FloatTensor<B>,
        shape: PackedShape,
    ) -> Self {
        let words: Vec<u32> = read_sync(B::int_into_data(packed))
            .expect("readable codes")
            .convert_dtype(DType::U32)
            .try_into_vec()
            .expect("u32 codes");
        let absmax: Vec<f32> =
            read_sync(B::float_into_data(absmax)).expect("readable absmax").try_into_vec().expect("f32 absmax");
        let codebook: Vec<f32> =
            read_sync(B::float_into_data(codebook)).expect("readable code book").try_into_vec().expect("f32 code book");
        let codebook: [f32; 16] = codebook.try_into().expect("16-entry code book");
        HostWeight { words, numel: shape.rows * shape.cols, absmax, codebook }
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.numel.div_ceil(2)]
    }
}

/// Whether [`quant_matmul_on_host`] takes a product: an even block size, and bf16 x on an AVX512-BF16 CPU
/// or f32 x on an AVX-512 CPU.
fn host_product_applies(dtype: FloatDType, shape: PackedShape) -> bool {
    shape.blocksize.is_multiple_of(2)
        && match dtype {
            FloatDType::BF16 => bf16_gemm::accelerated(),
            FloatDType::F32 => bf16_gemm::accelerated_f32(),
            _ => false,
        }
}

/// The 4-bit product on the host with W decoded into the GEMM's panels (32 columns at a time,
/// `bf16_gemm::Packed4bit`), never into a dense W: bf16 x through AVX512-BF16 dot products accumulated in
/// f32 and rounded once to bf16 (no f32 copy of x or of the result), f32 x through AVX-512 FMAs.
pub fn quant_matmul_on_host<B: Backend>(
    x: FloatTensor<B>,
    packed: IntTensor<B>,
    absmax: FloatTensor<B>,
    codebook: FloatTensor<B>,
    shape: PackedShape,
    transposed: bool,
) -> FloatTensor<B> {
    let device = absmax.device();
    let [m, _] = x.shape().dims();
    let host = HostWeight::read::<B>(packed, absmax, codebook, shape);
    let weight = bf16_gemm::Packed4bit::new(
        host.bytes(),
        &host.absmax,
        &host.codebook,
        shape.blocksize,
        shape.rows,
        shape.cols,
        transposed,
    )
    .expect("consistent packed weight");
    let n = bf16_gemm::PanelSource::n(&weight);
    let x = read_sync(B::float_into_data(x)).expect("readable x");
    let out = match x.dtype() {
        DType::BF16 => {
            let out: Vec<half::bf16> = bf16_gemm::matmul(x.as_slice().expect("bf16 x"), m, &weight);
            TensorData::new(out, [m, n])
        }
        _ => TensorData::new(bf16_gemm::matmul_f32(x.as_slice().expect("f32 x"), m, &weight), [m, n]),
    };
    B::float_from_data(out, &device)
}

fn matmul_with<B: Backend>(x: FloatTensor<B>, w: FloatTensor<B>, transposed: bool) -> FloatTensor<B> {
    if transposed { B::float_matmul(x, B::float_transpose(w)) } else { B::float_matmul(x, w) }
}

impl QuantMatmulBackend for Flex {
    fn quant_matmul(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        codebook: FloatTensor<Self>,
        shape: PackedShape,
        transposed: bool,
    ) -> FloatTensor<Self> {
        let dtype = float_dtype_of::<Self>(&x);
        if host_product_applies(dtype, shape) {
            return quant_matmul_on_host::<Self>(x, packed, absmax, codebook, shape, transposed);
        }
        let w = decode_weight_on_host::<Self>(packed, absmax, codebook, shape, dtype);
        matmul_with::<Self>(x, w, transposed)
    }
}

impl<B: Backend + QuantMatmulBackend, C: CheckpointStrategy> QuantMatmulBackend for Autodiff<B, C> {
    fn quant_matmul(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        codebook: FloatTensor<Self>,
        shape: PackedShape,
        transposed: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct QuantMatmulBackward;

        impl<B: Backend + QuantMatmulBackend> Backward<B, 1> for QuantMatmulBackward {
            /// Packed codes, absmax, code book, geometry, orientation: never the decoded weight.
            type State = (IntTensor<B>, FloatTensor<B>, FloatTensor<B>, PackedShape, bool);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_x] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (packed, absmax, codebook, shape, transposed) = ops.state;
                if let Some(node) = node_x {
                    // d(x·Wᵀ)/dx = dy·W and d(x·W)/dx = dy·Wᵀ: the same op, the other orientation.
                    grads.register::<B>(node.id, B::quant_matmul(grad, packed, absmax, codebook, shape, !transposed));
                }
            }
        }

        let absmax = absmax.into_primitive();
        let codebook = codebook.into_primitive();
        let (x, x_node) = x.into_parts();
        match QuantMatmulBackward.prepare::<C>([x_node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::quant_matmul(x, packed.clone(), absmax.clone(), codebook.clone(), shape, transposed);
                prep.finish((packed, absmax, codebook, shape, transposed), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::quant_matmul(x, packed, absmax, codebook, shape, transposed)),
        }
    }
}

/// `x · Wᵀ` for a 4-bit weight: `x [M, K]`, W `[N, K]` → `[M, N]`. Gradients flow to x only.
pub fn quant_matmul_t(x: Tensor<2>, weight: &DeviceQuantizedWeight) -> Tensor<2> {
    let shape = PackedShape { rows: weight.rows, cols: weight.cols, blocksize: weight.blocksize };
    let absmax = weight.absmax_f32();
    Tensor::from_dispatch(<Dispatch as QuantMatmulBackend>::quant_matmul(
        x.into_dispatch(),
        weight.packed.clone().into_dispatch(),
        absmax.into_dispatch(),
        weight.codebook.clone().into_dispatch(),
        shape,
        true,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use quant::{QuantConfig, QuantizedWeight};

    /// The host kernel and the generic backend-op decode give the same weight, bit for bit, and the op
    /// equals a plain matmul with the dequantized weight (also through autodiff's backward).
    #[test]
    fn host_and_generic_decodes_agree_and_gradients_flow_to_x() {
        let (rows, cols) = (37, 70);
        let values: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 613) as f32 / 300.0 - 1.0).collect();
        let q = QuantizedWeight::quantize("w", &values, &[rows, cols], &QuantConfig::new()).unwrap();
        let device = Device::flex();
        let w = q.to_device(&device);
        let shape = PackedShape { rows, cols, blocksize: 64 };
        let generic = Tensor::<2>::from_dispatch(decode_weight::<Dispatch>(
            w.packed.clone().into_dispatch(),
            w.absmax_f32().into_dispatch(),
            w.codebook.clone().into_dispatch(),
            shape,
            FloatDType::F32,
        ));
        let host = Tensor::<2>::from_dispatch(decode_weight_on_host::<Dispatch>(
            w.packed.clone().into_dispatch(),
            w.absmax_f32().into_dispatch(),
            w.codebook.clone().into_dispatch(),
            shape,
            FloatDType::F32,
        ));
        let (g, h): (Vec<f32>, Vec<f32>) =
            (generic.clone().into_data().try_into_vec().unwrap(), host.into_data().try_into_vec().unwrap());
        assert!(g.iter().zip(&h).all(|(a, b)| a.to_bits() == b.to_bits()));

        let ad = Device::flex().autodiff();
        let wq = q.to_device(&ad);
        let x0 = Tensor::<2>::random([5, cols], burn::tensor::Distribution::Uniform(-1.0, 1.0), &ad);
        let x = x0.clone().detach().require_grad();
        let y = quant_matmul_t(x.clone(), &wq);
        let dx = x.grad(&y.clone().sum().backward()).unwrap();
        let dense = Tensor::<2>::from_data(generic.into_data(), &ad);
        let xr = x0.detach().require_grad();
        let yr = xr.clone().matmul(dense.transpose());
        let dxr = xr.grad(&yr.clone().sum().backward()).unwrap();
        let close = |a: Tensor<2>, b: Tensor<2>| {
            let (a, b): (Vec<f32>, Vec<f32>) =
                (a.into_data().try_into_vec().unwrap(), b.into_data().try_into_vec().unwrap());
            a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-4)
        };
        assert!(close(y, yr), "forward");
        assert!(close(dx, dxr), "input gradient");
    }
}
