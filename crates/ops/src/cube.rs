//! The extensions on burn's CubeCL backend (CUDA, wgpu): the 4-bit product runs the `qlora-kernels`
//! kernels on the tensors' own device buffers, dropout multiplies in its seeded mask.
//!
//! [`QuantMatmulStrategy`] picks the kernel of the 4-bit product: the fused dequantize-matmul (W decoded
//! tile by tile, never written as a dense matrix; a streaming GEMV for at most
//! [`GEMV_MAX_ROWS`](qlora_kernels::matmul::GEMV_MAX_ROWS) rows), or the one-pass dequantize into a
//! temporary followed by burn's dense matmul, which is dropped as soon as the product is made (what
//! bitsandbytes does for training batches). `QLORA_QUANT_MATMUL=fused|dequantize|auto` chooses; `auto`
//! (the default) takes the GEMV for small batches and the dequantize-then-matmul otherwise, the faster of
//! the two on the H200 at training batch sizes (docs/benchmarks.md).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use adamw_rules::UpdateRule;
use adamw_rules::update::AdamHyper;

use burn::backend::ops::FloatTensorOps;
use burn::backend::{Cube, DType, tensor::FloatTensor, tensor::IntTensor};
use burn::tensor::Shape;
use burn_cubecl::tensor::CubeTensor;
use nf4::FloatDtype;
use qlora_kernels::adamw::{self, DeviceCodebooks, StateBuffers};
use qlora_kernels::matmul::{self, GEMV_MAX_ROWS, Product};
use qlora_kernels::{DeviceWeight4bit, dequant};

use crate::adamw::OptimizerBackend;
use crate::dropout::{SeededDropoutBackend, apply_mask};
use crate::quant_matmul::{PackedShape, QuantMatmulBackend, decode_weight};

/// How the 4-bit product runs on a CubeCL device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum QuantMatmulStrategy {
    /// GEMV for at most 16 rows (forward), dequantize-then-matmul otherwise.
    Auto = 0,
    /// Always the fused kernels (GEMV for small forward batches).
    Fused = 1,
    /// Always dequantize into a temporary, then burn's matmul.
    Dequantize = 2,
}

const UNSET: u8 = u8::MAX;
static STRATEGY: AtomicU8 = AtomicU8::new(UNSET);

impl QuantMatmulStrategy {
    /// From `QLORA_QUANT_MATMUL` (unset: `Auto`).
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("QLORA_QUANT_MATMUL").as_deref() {
            Ok("fused") => Ok(QuantMatmulStrategy::Fused),
            Ok("dequantize") => Ok(QuantMatmulStrategy::Dequantize),
            Ok("auto") | Err(_) => Ok(QuantMatmulStrategy::Auto),
            Ok(other) => Err(format!("QLORA_QUANT_MATMUL={other}: expected fused, dequantize or auto")),
        }
    }

    /// The strategy in use: set by [`QuantMatmulStrategy::set`], else read from the environment once (an
    /// unknown value is reported on stderr and `Auto` used).
    pub fn current() -> Self {
        match STRATEGY.load(Ordering::Relaxed) {
            0 => QuantMatmulStrategy::Auto,
            1 => QuantMatmulStrategy::Fused,
            2 => QuantMatmulStrategy::Dequantize,
            _ => {
                let strategy = Self::from_env().unwrap_or_else(|message| {
                    eprintln!("{message}; using auto");
                    QuantMatmulStrategy::Auto
                });
                strategy.set();
                strategy
            }
        }
    }

    /// Uses this strategy from now on, process-wide.
    pub fn set(self) {
        STRATEGY.store(self as u8, Ordering::Relaxed);
    }
}

fn kernel_dtype(dtype: DType) -> Option<FloatDtype> {
    match dtype {
        DType::F32 => Some(FloatDtype::F32),
        DType::BF16 => Some(FloatDtype::Bf16),
        DType::F16 => Some(FloatDtype::F16),
        _ => None,
    }
}

/// The packed weight as the kernels see it: the tensors' buffers, no copies.
fn device_weight(
    packed: &CubeTensor,
    absmax: &CubeTensor,
    codebook: &CubeTensor,
    shape: PackedShape,
) -> DeviceWeight4bit {
    DeviceWeight4bit {
        packed: packed.handle.clone(),
        absmax: absmax.handle.clone(),
        // Not read for plain absmax.
        nested_absmax: absmax.handle.clone(),
        nested_code: absmax.handle.clone(),
        codebook: codebook.handle.clone(),
        offset: 0.0,
        double_quant: false,
        numel: shape.rows * shape.cols,
        blocksize: shape.blocksize,
        shape: [shape.rows, shape.cols],
    }
}

fn contiguous(t: CubeTensor) -> CubeTensor {
    burn_cubecl::kernel::into_contiguous(t)
}

impl QuantMatmulBackend for Cube {
    fn quant_matmul(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        codebook: FloatTensor<Self>,
        shape: PackedShape,
        transposed: bool,
    ) -> FloatTensor<Self> {
        let x_shape = x.meta.shape().clone();
        let m = x_shape[0];
        let supported = kernel_dtype(x.dtype)
            .filter(|_| packed.dtype == DType::U32 && absmax.dtype == DType::F32 && codebook.dtype == DType::F32);
        let Some(dtype) = supported else {
            // Not a layout the kernels take: the generic decode, then burn's matmul.
            let w = decode_weight::<Self>(packed, absmax, codebook, shape, x.dtype.into());
            return if transposed { Self::float_matmul(x, Self::float_transpose(w)) } else { Self::float_matmul(x, w) };
        };
        let (x, packed, absmax, codebook) =
            (contiguous(x), contiguous(packed), contiguous(absmax), contiguous(codebook));
        let weight = device_weight(&packed, &absmax, &codebook, shape);
        let product = if transposed { Product::Forward } else { Product::InputGrad };
        let out_cols = if transposed { shape.rows } else { shape.cols };
        let strategy = QuantMatmulStrategy::current();
        let gemv = transposed && m <= GEMV_MAX_ROWS && strategy != QuantMatmulStrategy::Dequantize;
        if gemv || strategy == QuantMatmulStrategy::Fused {
            let out = x.client.empty((m * out_cols).max(1) * dtype.size_in_bytes());
            let launched = if gemv {
                matmul::gemv_into(&x.client, &x.handle, m, &weight, dtype, &out)
            } else {
                matmul::fused_matmul_into(&x.client, &x.handle, m, &weight, product, dtype, &out)
            };
            launched.expect("operands sized by the layer");
            return CubeTensor::new_contiguous(
                x.client.clone(),
                x.device.clone(),
                Shape::new([m, out_cols]),
                out,
                x.dtype,
            );
        }
        // Dequantize into a temporary of x's dtype (dropped when this returns), then the dense product.
        let numel = shape.rows * shape.cols;
        let buffer = x.client.empty(numel.div_ceil(2) * 2 * dtype.size_in_bytes());
        dequant::dequantize_into(&x.client, &weight, dtype, &buffer).expect("buffer sized for the weight");
        let w = CubeTensor::new_contiguous(
            x.client.clone(),
            x.device.clone(),
            Shape::new([shape.rows, shape.cols]),
            buffer,
            x.dtype,
        );
        if transposed { Self::float_matmul(x, Self::float_transpose(w)) } else { Self::float_matmul(x, w) }
    }
}

impl SeededDropoutBackend for Cube {
    fn seeded_dropout(x: FloatTensor<Self>, seed: u64, keep: f64) -> FloatTensor<Self> {
        apply_mask::<Self>(x, seed, keep)
    }
}

/// A tensor the kernels may write in place: contiguous and not shared with another tensor (copied otherwise).
fn writable(t: CubeTensor) -> CubeTensor {
    let t = contiguous(t);
    if t.can_mut() && t.is_contiguous_buffer() { t } else { t.copy() }
}

/// The 8-bit state code books on `t`'s device, uploaded once per device.
fn codebooks(t: &CubeTensor) -> Arc<DeviceCodebooks> {
    static BOOKS: Mutex<Vec<(String, Arc<DeviceCodebooks>)>> = Mutex::new(Vec::new());
    let key = format!("{:?}", t.device);
    let mut books = BOOKS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, b)) = books.iter().find(|(k, _)| *k == key) {
        return b.clone();
    }
    let b = Arc::new(DeviceCodebooks::upload(&t.client));
    books.push((key, b.clone()));
    b
}

/// The fused updates run in place on the page's buffers; the norm is a device reduction in f32.
#[allow(clippy::type_complexity)]
impl OptimizerBackend for Cube {
    fn l2_norm(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_sqrt(Self::float_sum(Self::float_mul(x.clone(), x)))
    }

    fn adamw_f32(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        exp_avg: FloatTensor<Self>,
        exp_avg_sq: FloatTensor<Self>,
        rule: UpdateRule,
        hyper: AdamHyper,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (param, m, v, grad) = (writable(param), writable(exp_avg), writable(exp_avg_sq), contiguous(grad));
        let n = param.meta.shape().num_elements();
        let state = StateBuffers::F32 { exp_avg: &m.handle, exp_avg_sq: &v.handle };
        adamw::update_in_place(&param.client, &codebooks(&param), rule, &param.handle, &grad.handle, state, n, &hyper)
            .unwrap_or_else(|e| panic!("optimizer update: {e}"));
        (param, m, v)
    }

    fn adamw_8bit(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        codes1: IntTensor<Self>,
        absmax1: FloatTensor<Self>,
        codes2: IntTensor<Self>,
        absmax2: FloatTensor<Self>,
        hyper: AdamHyper,
    ) -> (FloatTensor<Self>, IntTensor<Self>, FloatTensor<Self>, IntTensor<Self>, FloatTensor<Self>) {
        let (param, grad) = (writable(param), contiguous(grad));
        let (c1, a1, c2, a2) = (writable(codes1), writable(absmax1), writable(codes2), writable(absmax2));
        let n = param.meta.shape().num_elements();
        let state = StateBuffers::Blockwise8 {
            codes1: &c1.handle,
            absmax1: &a1.handle,
            codes2: &c2.handle,
            absmax2: &a2.handle,
        };
        adamw::update_in_place(
            &param.client,
            &codebooks(&param),
            UpdateRule::Bnb8,
            &param.handle,
            &grad.handle,
            state,
            n,
            &hyper,
        )
        .unwrap_or_else(|e| panic!("optimizer update: {e}"));
        (param, c1, a1, c2, a2)
    }
}

pub use qlora_kernels::DeviceKind;

/// Checks that a GPU can be opened: a clear error rather than a panic at the first tensor.
pub fn probe(kind: qlora_kernels::DeviceKind) -> Result<(), qlora_kernels::KernelError> {
    qlora_kernels::client_for(kind).map(|_| ())
}
