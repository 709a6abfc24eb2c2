//! Weights for the benchmarks: blocks are built by their configs (`AttentionConfig`, `MlpConfig`, …) from
//! [`SeededWeights`], uniform random values per tensor name (SplitMix64 of the name), NF4 + double quant or
//! dense, counting the bytes the frozen weights occupy.

use std::cell::Cell;

use burn::tensor::{DType, Device, Tensor, TensorData};
use llama::FrozenWeights;
use lora::FrozenLinear;
use lora::weights::WeightError;
use quant::{QuantConfig, QuantizedWeight};

pub struct SeededWeights {
    pub device: Device,
    /// NF4 + double quant (as loading with `--quant nf4`), else dense in `dense_dtype`.
    pub nf4: bool,
    pub dense_dtype: DType,
    /// Values are uniform in ±scale/2.
    pub scale: f32,
    /// Bytes of the frozen linear weights made so far.
    pub bytes: Cell<usize>,
}

impl SeededWeights {
    pub fn new(device: &Device, nf4: bool, dense_dtype: DType, scale: f32) -> Self {
        SeededWeights { device: device.clone(), nf4, dense_dtype, scale, bytes: Cell::new(0) }
    }

    fn values(&self, name: &str, n: usize) -> Vec<f32> {
        let seed = name.bytes().fold(0u64, |h, b| splitmix::mix(h ^ b as u64));
        let mut rng = splitmix::SplitMix64(seed);
        (0..n).map(|_| (rng.unit_f32() - 0.5) * self.scale).collect()
    }
}

impl FrozenWeights for SeededWeights {
    fn linear(&self, name: &str, out: usize, inp: usize, bias: bool) -> Result<FrozenLinear, WeightError> {
        let values = self.values(name, out * inp);
        let bias = bias.then(|| Tensor::<1>::zeros([out], &self.device).cast(self.dense_dtype));
        if self.nf4 {
            let q = QuantizedWeight::quantize(name, &values, &[out, inp], &QuantConfig::new()).expect("quantizable");
            self.bytes.set(self.bytes.get() + q.stored_bytes());
            Ok(FrozenLinear::quantized(q.to_device(&self.device), bias))
        } else {
            self.bytes.set(self.bytes.get() + out * inp * self.dense_dtype.size());
            let w = Tensor::<2>::from_data(TensorData::new(values, [out, inp]), &self.device).cast(self.dense_dtype);
            Ok(FrozenLinear::dense(w, bias))
        }
    }

    fn norm_weight(&self, _name: &str, len: usize) -> Result<Tensor<1>, WeightError> {
        Ok(Tensor::<1>::ones([len], &self.device).cast(self.dense_dtype))
    }

    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Tensor<2>, WeightError> {
        Ok(Tensor::from_data(TensorData::new(self.values(name, vocab * hidden), [vocab, hidden]), &self.device))
    }

    fn lm_head(&self, _vocab: usize, _hidden: usize) -> Result<Option<FrozenLinear>, WeightError> {
        Ok(None)
    }
}
