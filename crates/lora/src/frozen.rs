//! The frozen base of a linear layer.

use burn::module::Module;
use burn::tensor::Tensor;
use quant::DeviceQuantizedWeight;

/// The base weight: dense `[in, out]` (stored transposed for `x·W`), or 4-bit `[out, in]` codes.
#[derive(Module, Debug)]
pub enum BaseWeight {
    /// Dense weight stored as `Wᵀ`, `[in_features, out_features]`, in the compute dtype.
    Dense(Tensor<2>),
    /// 4-bit weight, dequantized on the fly for each matmul.
    Quantized(DeviceQuantizedWeight),
}

/// A linear layer whose weight never trains: `y = x·Wᵀ + b`.
#[derive(Module, Debug)]
pub struct FrozenLinear {
    pub weight: BaseWeight,
    pub bias: Option<Tensor<1>>,
    pub in_features: usize,
    pub out_features: usize,
}

impl FrozenLinear {
    /// A dense layer from an HF-layout weight `[out, in]` (transposed once here).
    pub fn dense(weight_out_in: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        let [out_features, in_features] = weight_out_in.dims();
        FrozenLinear { weight: BaseWeight::Dense(weight_out_in.transpose()), bias, in_features, out_features }
    }

    /// A 4-bit layer.
    pub fn quantized(weight: DeviceQuantizedWeight, bias: Option<Tensor<1>>) -> Self {
        let (out_features, in_features) = (weight.rows, weight.cols);
        FrozenLinear { weight: BaseWeight::Quantized(weight), bias, in_features, out_features }
    }

    /// `x·Wᵀ + b` for `x` of shape `[..., in_features]`. A 4-bit weight goes through
    /// [`quant_matmul_t`](ops::quant_matmul::quant_matmul_t): no dense copy outlives the call.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let x2: Tensor<2> = x.reshape([rows, self.in_features]);
        let y = match &self.weight {
            BaseWeight::Dense(w) => x2.matmul(w.clone()),
            BaseWeight::Quantized(q) => ops::quant_matmul::quant_matmul_t(x2, q),
        };
        let y = self.add_bias(y);
        let mut out_dims = dims;
        out_dims[D - 1] = self.out_features;
        y.reshape(out_dims)
    }

    /// `Wᵀ` `[in, out]` when the weight is dense and there is no bias (what a chunked loss can stream through).
    pub fn dense_transposed(&self) -> Option<Tensor<2>> {
        match (&self.weight, &self.bias) {
            (BaseWeight::Dense(w_t), None) => Some(w_t.clone()),
            _ => None,
        }
    }

    /// `y + b` for `y [rows, out]` (y itself without a bias).
    pub fn add_bias(&self, y: Tensor<2>) -> Tensor<2> {
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze::<2>(),
            None => y,
        }
    }

    /// Whether the base is stored in 4 bits.
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, BaseWeight::Quantized(_))
    }
}
