//! Frozen tensors for a model's blocks, by their Hugging Face names, shared by every model family (`llama`,
//! `t5`): where they come from ([`WeightSource`]: an HF checkpoint, dense or bitsandbytes 4-bit, or a
//! family's own source such as a GGUF file or `random:` weights), and how a block gets them
//! ([`FrozenWeights`]: [`RandomInit`] for fresh weights, [`FrozenReader`] over a source, in the compute dtype,
//! 4-bit where stored so or quantized on load).

use burn::tensor::{DType, Device, Distribution, Tensor, TensorData};
use quant::checkpoint::HfCheckpoint;
use quant::{QuantConfig, QuantizedWeight};

use crate::FrozenLinear;

/// A tensor that is not there or not the shape the config needs, or a source that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{file}: missing tensor `{tensor}`")]
    MissingTensor { file: String, tensor: String },
    #[error("{file}: tensor `{tensor}` has shape {found:?}, but the config needs {expected:?}")]
    ShapeMismatch { file: String, tensor: String, expected: Vec<usize>, found: Vec<usize> },
    #[error(transparent)]
    Quant(#[from] quant::QuantError),
    /// A model family's own source failed (a GGUF file, ...); the family's error inside.
    #[error(transparent)]
    Source(Box<dyn std::error::Error + Send + Sync>),
}

/// Where a loader reads weights from, under their Hugging Face names.
pub trait WeightSource {
    /// A label for errors (the file holding `name`, or the checkpoint).
    fn file_of(&self, name: &str) -> String;
    fn contains(&self, name: &str) -> bool;
    /// Values (as f32) and shape of a dense tensor.
    fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), WeightError>;
    /// The weight in bitsandbytes 4-bit form, when the source stores it so.
    fn bnb_weight(&self, name: &str) -> Result<Option<QuantizedWeight>, WeightError>;
}

impl WeightSource for HfCheckpoint {
    fn file_of(&self, name: &str) -> String {
        self.shard_of(name).map(|(_, p)| p.display().to_string()).unwrap_or_else(|| self.dir.display().to_string())
    }
    fn contains(&self, name: &str) -> bool {
        HfCheckpoint::contains(self, name)
    }
    fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), WeightError> {
        Ok(HfCheckpoint::tensor_f32(self, name)?)
    }
    fn bnb_weight(&self, name: &str) -> Result<Option<QuantizedWeight>, WeightError> {
        Ok(HfCheckpoint::bnb_weight(self, name)?)
    }
}

/// Where a block's frozen tensors come from when it is built (each model config's `init_with`).
pub trait FrozenWeights {
    /// The linear layer `name` (`name.weight` `[out, in]`, and `name.bias` `[out]` when `bias`).
    fn linear(
        &self,
        name: &str,
        out_features: usize,
        in_features: usize,
        bias: bool,
    ) -> Result<FrozenLinear, WeightError>;
    /// The norm weight `name` `[len]`.
    fn norm_weight(&self, name: &str, len: usize) -> Result<Tensor<1>, WeightError>;
    /// An embedding table `name` `[rows, cols]` (tokens, or relative-position buckets).
    fn embedding(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<2>, WeightError>;
    /// The untied output layer `lm_head` `[vocab, hidden]` (QLoRA leaves it dense unless the source stores it
    /// in 4 bits), or `None` where the source has none and the model ties it to the embedding.
    fn lm_head(&self, vocab: usize, hidden: usize) -> Result<Option<FrozenLinear>, WeightError>;
}

/// Fresh weights as transformers initialises a decoder (`initializer_range` 0.02): linear and embedding
/// weights N(0, std²), biases 0, norm weights 1; dense f32 on `device`, drawn from the device's generator
/// (`device.seed(..)` makes them reproducible).
pub struct RandomInit {
    pub device: Device,
    pub std: f64,
}

impl RandomInit {
    pub fn new(device: &Device) -> Self {
        RandomInit { device: device.clone(), std: 0.02 }
    }

    fn normal<const D: usize>(&self, shape: [usize; D]) -> Tensor<D> {
        Tensor::random(shape, Distribution::Normal(0.0, self.std), &self.device)
    }
}

impl FrozenWeights for RandomInit {
    fn linear(&self, _name: &str, out: usize, inp: usize, bias: bool) -> Result<FrozenLinear, WeightError> {
        let bias = bias.then(|| Tensor::zeros([out], &self.device));
        Ok(FrozenLinear::dense(self.normal([out, inp]), bias))
    }
    fn norm_weight(&self, _name: &str, len: usize) -> Result<Tensor<1>, WeightError> {
        Ok(Tensor::ones([len], &self.device))
    }
    fn embedding(&self, _name: &str, rows: usize, cols: usize) -> Result<Tensor<2>, WeightError> {
        Ok(self.normal([rows, cols]))
    }
    fn lm_head(&self, vocab: usize, hidden: usize) -> Result<Option<FrozenLinear>, WeightError> {
        Ok(Some(FrozenLinear::dense(self.normal([vocab, hidden]), None)))
    }
}

/// How to load: the compute dtype, and whether to quantize dense linear weights on load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// f32, bf16 or f16.
    pub dtype: DType,
    /// Quantize every linear weight of the blocks on load (`None`: keep dense; a checkpoint already in
    /// bitsandbytes 4-bit form stays 4-bit either way, without re-quantizing).
    pub quant: Option<QuantConfig>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { dtype: DType::F32, quant: None }
    }
}

/// Reads a block's frozen tensors from a [`WeightSource`] by name, in the compute dtype, on the device: what
/// every loader hands to its model config's `init_with`.
pub struct FrozenReader<'a> {
    pub source: &'a dyn WeightSource,
    pub options: &'a LoadOptions,
    pub device: &'a Device,
}

impl FrozenWeights for FrozenReader<'_> {
    fn linear(&self, name: &str, out: usize, inp: usize, bias: bool) -> Result<FrozenLinear, WeightError> {
        self.linear_as(name, out, inp, bias, self.options.quant.as_ref())
    }
    fn norm_weight(&self, name: &str, len: usize) -> Result<Tensor<1>, WeightError> {
        self.tensor1(name, len)
    }
    fn embedding(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<2>, WeightError> {
        self.tensor2(name, rows, cols)
    }
    fn lm_head(&self, vocab: usize, hidden: usize) -> Result<Option<FrozenLinear>, WeightError> {
        let name = "lm_head";
        if !self.source.contains("lm_head.weight") {
            return Ok(None);
        }
        // lm_head stays dense (QLoRA leaves it unquantized), unless the checkpoint itself stores it in 4 bits.
        self.linear_as(name, vocab, hidden, false, None).map(Some)
    }
}

impl FrozenReader<'_> {
    /// Values of the dense tensor `name`, checked against `expected`.
    pub fn dense(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, WeightError> {
        if !self.source.contains(name) {
            return Err(WeightError::MissingTensor { file: self.source.file_of(name), tensor: name.into() });
        }
        let (values, shape) = self.source.tensor_f32(name)?;
        if shape != expected {
            return Err(WeightError::ShapeMismatch {
                file: self.source.file_of(name),
                tensor: name.into(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        Ok(values)
    }

    /// A 1-D tensor in the compute dtype.
    pub fn tensor1(&self, name: &str, len: usize) -> Result<Tensor<1>, WeightError> {
        let values = self.dense(name, &[len])?;
        Ok(Tensor::<1>::from_data(TensorData::new(values, [len]), self.device).cast(self.options.dtype))
    }

    /// A 2-D tensor in the compute dtype.
    pub fn tensor2(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<2>, WeightError> {
        let values = self.dense(name, &[rows, cols])?;
        Ok(Tensor::<2>::from_data(TensorData::new(values, [rows, cols]), self.device).cast(self.options.dtype))
    }

    /// The linear layer `prefix.weight` `[out, in]` (+ `prefix.bias`): 4-bit when the checkpoint stores it so,
    /// quantized per `quant` when given, dense otherwise.
    pub fn linear_as(
        &self,
        prefix: &str,
        out_features: usize,
        in_features: usize,
        bias: bool,
        quant: Option<&QuantConfig>,
    ) -> Result<FrozenLinear, WeightError> {
        let name = format!("{prefix}.weight");
        let bias = if bias { Some(self.tensor1(&format!("{prefix}.bias"), out_features)?) } else { None };
        if let Some(weight) = self.source.bnb_weight(&name)? {
            return self.quantized(&name, weight, out_features, in_features, bias);
        }
        match quant {
            Some(qconfig) => {
                let values = self.dense(&name, &[out_features, in_features])?;
                let weight = QuantizedWeight::quantize(&name, &values, &[out_features, in_features], qconfig)?;
                self.quantized(&name, weight, out_features, in_features, bias)
            }
            None => Ok(FrozenLinear::dense(self.tensor2(&name, out_features, in_features)?, bias)),
        }
    }

    fn quantized(
        &self,
        name: &str,
        weight: QuantizedWeight,
        out_features: usize,
        in_features: usize,
        bias: Option<Tensor<1>>,
    ) -> Result<FrozenLinear, WeightError> {
        if weight.shape != [out_features, in_features] {
            return Err(WeightError::ShapeMismatch {
                file: self.source.file_of(name),
                tensor: name.into(),
                expected: vec![out_features, in_features],
                found: weight.shape,
            });
        }
        Ok(FrozenLinear::quantized(weight.to_device(self.device), bias))
    }
}
