//! LoRA adapters on a frozen base: `y = base(x) + scaling · dropout(x) · Aᵀ · Bᵀ`, PEFT's semantics.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{DType, Device, Distribution, Tensor, TensorData};

use quant::DeviceQuantizedWeight;

use crate::qlora_linear::LoraScalars;
use crate::{BaseWeight, FrozenLinear, LoraError};

/// How A is initialised (B always starts at zero, so a fresh adapter changes nothing).
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum LoraInit {
    /// PEFT's default: kaiming-uniform with a = √5, i.e. U(-1/√in, 1/√in).
    Kaiming,
    /// `init_lora_weights="gaussian"`: N(0, (1/r)²).
    Gaussian,
}

/// Which linear layers get adapters (PEFT's `target_modules`).
#[derive(Config, Debug, PartialEq)]
pub enum TargetModules {
    /// Every linear layer of the decoder, not the output layer (`"all-linear"`).
    AllLinear,
    /// Module names; a module matches when its full name equals one, or ends with `.` + one.
    Names(Vec<String>),
    /// A regular expression the whole module name must match.
    Regex(String),
}

impl TargetModules {
    /// Whether the module `name` (e.g. `model.layers.0.self_attn.q_proj`) is targeted. `is_output` marks the
    /// output layer, which `AllLinear` leaves out.
    pub fn matches(&self, name: &str, is_output: bool) -> Result<bool, LoraError> {
        Ok(match self {
            TargetModules::AllLinear => !is_output,
            TargetModules::Names(names) => names.iter().any(|t| name == t || name.ends_with(&format!(".{t}"))),
            TargetModules::Regex(pattern) => {
                let re = regex::Regex::new(&format!("^(?:{pattern})$"))
                    .map_err(|e| LoraError::Config(format!("target_modules regex `{pattern}`: {e}")))?;
                re.is_match(name)
            }
        })
    }
}

/// A LoRA configuration. Defaults are QLoRA's: r = 64, α = 16, dropout 0.05, all linear layers.
#[derive(Config, Debug, PartialEq)]
pub struct LoraConfig {
    #[config(default = 64)]
    pub r: usize,
    #[config(default = 16.0)]
    pub alpha: f64,
    #[config(default = 0.05)]
    pub dropout: f64,
    #[config(default = "TargetModules::AllLinear")]
    pub target_modules: TargetModules,
    /// Scale by α/√r instead of α/r.
    #[config(default = false)]
    pub use_rslora: bool,
    #[config(default = "LoraInit::Kaiming")]
    pub init: LoraInit,
}

impl LoraConfig {
    /// The factor applied to the adapter's output.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora { self.alpha / (self.r as f64).sqrt() } else { self.alpha / self.r as f64 }
    }

    /// Checks the rank against a layer's dimensions.
    pub fn check(&self, module: &str, in_features: usize, out_features: usize) -> Result<(), LoraError> {
        if self.r == 0 {
            return Err(LoraError::Config("rank r must be at least 1".into()));
        }
        if self.r > in_features.min(out_features) {
            return Err(LoraError::Config(format!(
                "rank r = {} exceeds the dimensions of `{module}` ({in_features} in, {out_features} out)",
                self.r
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::Config(format!("lora dropout {} must be in [0, 1)", self.dropout)));
        }
        Ok(())
    }

    /// A fresh adapter for a layer, A initialised per `init`, B zero, in f32.
    pub fn init_adapter(
        &self,
        module: &str,
        in_features: usize,
        out_features: usize,
        device: &Device,
    ) -> Result<LoraAdapter, LoraError> {
        self.check(module, in_features, out_features)?;
        let a = match self.init {
            LoraInit::Kaiming => {
                let bound = 1.0 / (in_features as f64).sqrt();
                Tensor::<2>::random([self.r, in_features], Distribution::Uniform(-bound, bound), device)
            }
            LoraInit::Gaussian => {
                Tensor::<2>::random([self.r, in_features], Distribution::Normal(0.0, 1.0 / self.r as f64), device)
            }
        };
        let b = Tensor::<2>::zeros([out_features, self.r], device);
        Ok(LoraAdapter::new(a, b, self.scaling(), self.dropout))
    }
}

/// The trainable pair: A `[r, in]`, B `[out, r]` (PEFT's `lora_A.weight`, `lora_B.weight`).
#[derive(Module, Debug)]
pub struct LoraAdapter {
    pub lora_a: Param<Tensor<2>>,
    pub lora_b: Param<Tensor<2>>,
    pub scaling: f64,
    pub dropout: Dropout,
}

impl LoraAdapter {
    pub fn new(a: Tensor<2>, b: Tensor<2>, scaling: f64, dropout: f64) -> Self {
        LoraAdapter {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            scaling,
            dropout: DropoutConfig::new(dropout).init(),
        }
    }

    /// From PEFT-layout values: A `[r, in]`, B `[out, r]`.
    pub fn from_values(
        a: (Vec<f32>, [usize; 2]),
        b: (Vec<f32>, [usize; 2]),
        scaling: f64,
        dropout: f64,
        device: &Device,
    ) -> Self {
        let ta = Tensor::<2>::from_data(TensorData::new(a.0, a.1), device);
        let tb = Tensor::<2>::from_data(TensorData::new(b.0, b.1), device);
        LoraAdapter::new(ta, tb, scaling, dropout)
    }

    pub fn rank(&self) -> usize {
        self.lora_a.val().dims()[0]
    }

    /// The dropout's seed for one forward, when it is active (training under autodiff, p > 0).
    fn dropout_seed(&self, x: &Tensor<2>) -> Option<u64> {
        let training = self.dropout.training.is_enabled() && x.device().is_autodiff() && self.dropout.prob > 0.0;
        training.then(|| ops::dropout::draw_seed(&x.device()))
    }

    /// `scaling · dropout(x) · Aᵀ · Bᵀ` for `x [rows, in]`, computed in x's dtype.
    pub fn delta(&self, x: Tensor<2>) -> Tensor<2> {
        let dtype = x.dtype();
        let a = self.lora_a.val().cast(dtype);
        let b = self.lora_b.val().cast(dtype);
        let x = match self.dropout_seed(&x) {
            Some(seed) => ops::dropout::seeded_dropout(x, self.dropout.prob, seed),
            None => x,
        };
        // The scaling goes on the `[rows, r]` intermediate, not on the `[rows, out]` result.
        x.matmul(a.transpose()).mul_scalar(self.scaling).matmul(b.transpose())
    }

    /// `x·dequant(W)ᵀ + delta(x)` as one op ([`qlora_linear`](crate::qlora_linear::qlora_linear)): the same
    /// values as the composed sum, with only x and the `[rows, r]` intermediate kept for the backward.
    pub fn forward_on_4bit(&self, x: Tensor<2>, weight: &DeviceQuantizedWeight) -> Tensor<2> {
        let dtype = x.dtype();
        let a = self.lora_a.val().cast(dtype);
        let b = self.lora_b.val().cast(dtype);
        let dropout = self.dropout_seed(&x).map(|seed| (seed, 1.0 - self.dropout.prob));
        crate::qlora_linear::qlora_linear(x, weight, a, b, LoraScalars { scaling: self.scaling, dropout })
    }

    /// `scaling · B · A` `[out, in]` in f32, what merging adds to the base weight.
    pub fn merged_delta(&self) -> Tensor<2> {
        self.lora_b.val().cast(DType::F32).matmul(self.lora_a.val().cast(DType::F32)).mul_scalar(self.scaling)
    }
}

/// A linear layer of the model: a frozen base with an optional LoRA adapter.
#[derive(Module, Debug)]
pub struct LoraLinear {
    pub base: FrozenLinear,
    pub adapter: Option<LoraAdapter>,
}

impl LoraLinear {
    /// A layer without an adapter.
    pub fn frozen(base: FrozenLinear) -> Self {
        LoraLinear { base, adapter: None }
    }

    pub fn in_features(&self) -> usize {
        self.base.in_features
    }

    pub fn out_features(&self) -> usize {
        self.base.out_features
    }

    /// `base(x) + adapter(x)` for `x [..., in]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let Some(adapter) = &self.adapter else { return self.base.forward(x) };
        let dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let x2: Tensor<2> = x.reshape([rows, self.base.in_features]);
        let y = match &self.base.weight {
            BaseWeight::Quantized(weight) => self.base.add_bias(adapter.forward_on_4bit(x2, weight)),
            BaseWeight::Dense(_) => self.base.forward(x2.clone()) + adapter.delta(x2),
        };
        let mut out = dims;
        out[D - 1] = self.base.out_features;
        y.reshape(out)
    }

    /// Rows with different adapters in one call, for serving many adapters on one base: `x [rows, in]` →
    /// `[rows, out]`, where the rows of each `(range, adapter)` group get `base(x) + adapter(x)` and all other
    /// rows `base(x)` (the layer's own [`adapter`](Self::adapter) is not used). The base product — the 4-bit
    /// one for a quantized layer — runs once for all rows; each group adds its `delta` in place. Without
    /// dropout (inference) a group's rows get the values [`forward`](Self::forward) gives them with that
    /// adapter attached, in f32 bit for bit.
    pub fn forward_grouped(&self, x: Tensor<2>, groups: &[(std::ops::Range<usize>, &LoraAdapter)]) -> Tensor<2> {
        let [rows, _] = x.dims();
        let out = self.base.out_features;
        // The bias goes where `forward` adds it: after the delta on a 4-bit base, before it on a dense one.
        let mut y = match &self.base.weight {
            BaseWeight::Quantized(q) => ops::quant_matmul::quant_matmul_t(x.clone(), q),
            BaseWeight::Dense(_) => self.base.forward(x.clone()),
        };
        for (range, adapter) in groups {
            assert!(range.start < range.end && range.end <= rows, "group rows {range:?} outside 0..{rows}");
            let delta = adapter.delta(x.clone().slice([range.clone(), 0..self.base.in_features]));
            let base = y.clone().slice([range.clone(), 0..out]);
            y = y.slice_assign([range.clone(), 0..out], base + delta);
        }
        if self.base.is_quantized() { self.base.add_bias(y) } else { y }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64).map(|i| ((i * 2_654_435_761 + seed * 97_531) % 1009) as f32 / 1009.0 - 0.5).collect()
    }

    fn tensor(n: [usize; 2], seed: u64, device: &Device) -> Tensor<2> {
        Tensor::from_data(TensorData::new(values(n[0] * n[1], seed), n), device)
    }

    fn f32s(t: Tensor<2>) -> Vec<f32> {
        t.into_data().try_into_vec::<f32>().unwrap()
    }

    /// Rows of two adapters and rows of none in one call equal three `forward` calls with the adapter attached
    /// (or none), to rounding (1e-6 of the scale), on a 4-bit base and on a dense base with a bias.
    #[test]
    fn grouped_rows_equal_separate_forwards() {
        let device = Device::flex();
        let (inp, out, r) = (64, 48, 4);
        let w = values(out * inp, 1);
        let bias = Tensor::<1>::from_data(TensorData::new(values(out, 9), [out]), &device);
        let quantized = quant::QuantizedWeight::quantize("w", &w, &[out, inp], &quant::QuantConfig::new()).unwrap();
        let bases = [
            FrozenLinear::quantized(quantized.to_device(&device), None),
            FrozenLinear::dense(Tensor::from_data(TensorData::new(w, [out, inp]), &device), Some(bias)),
        ];
        for base in bases {
            let adapter =
                |seed| LoraAdapter::new(tensor([r, inp], seed, &device), tensor([out, r], seed + 1, &device), 2.0, 0.0);
            let (first, second) = (adapter(3), adapter(5));
            let x = tensor([7, inp], 7, &device);
            let mut layer = LoraLinear::frozen(base);
            let grouped = f32s(layer.forward_grouped(x.clone(), &[(0..2, &first), (4..7, &second)]));
            let rows = |t: Tensor<2>, range: std::ops::Range<usize>| f32s(t.slice([range, 0..out]));
            let plain = layer.forward(x.clone());
            layer.adapter = Some(adapter(3));
            let with_first = layer.forward(x.clone());
            layer.adapter = Some(adapter(5));
            let with_second = layer.forward(x.clone());
            // The single-adapter 4-bit forward is one fused op (`qlora_linear`), the grouped one adds each
            // adapter's term to the shared product: the same sums, rounded in another order (≤ a few ulp).
            let close = |a: &[f32], b: &[f32]| {
                assert_eq!(a.len(), b.len());
                let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let worst = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(worst <= 1e-6 * scale, "grouped rows differ by {worst} (scale {scale})");
            };
            close(&grouped[..2 * out], &rows(with_first, 0..2));
            close(&grouped[2 * out..4 * out], &rows(plain.clone(), 2..4));
            close(&grouped[4 * out..], &rows(with_second.clone(), 4..7));
            assert_ne!(rows(with_second, 4..7), rows(plain, 4..7), "the adapter changes the output");
        }
    }
}
