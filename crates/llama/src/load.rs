//! Building a [`LlamaModel`] from any [`ModelSource`]: an HF checkpoint directory (dense or
//! bitsandbytes 4-bit), a GGUF file, or `random:…`.

use std::path::Path;

use burn::tensor::{DType, Device, Tensor, TensorData};
use formats::gguf::GgufFile;
use formats::source::ModelSource;
use formats::tokenizer::TextTokenizer;
use lora::FrozenLinear;
use quant::checkpoint::HfCheckpoint;
use quant::{QuantConfig, QuantizedWeight};

use crate::init::FrozenWeights;
use crate::random::RandomModel;
use crate::weights::{GgufWeights, WeightSource};
use crate::{LlamaConfig, LlamaError, LlamaModel};

/// A model ready to run: config, weights on the device, tokenizer (absent for a directory without
/// tokenizer.json, which can still run on token ids).
pub struct LoadedModel {
    pub config: LlamaConfig,
    pub model: LlamaModel,
    pub tokenizer: Option<TextTokenizer>,
}

impl LoadedModel {
    /// The tokenizer, or an error saying the model has none.
    pub fn tokenizer(&self) -> Result<&TextTokenizer, LlamaError> {
        self.tokenizer.as_ref().ok_or_else(|| LlamaError::Tokenizer {
            file: "tokenizer.json".into(),
            reason: "the model directory has no tokenizer.json: pass token ids instead of text".into(),
        })
    }
}

/// Loads a model from any [`ModelSource`] (HF directory, bitsandbytes checkpoint, GGUF).
pub fn load(source: &ModelSource, options: &LoadOptions, device: &Device) -> Result<LoadedModel, LlamaError> {
    match source {
        ModelSource::HfDir(dir) => {
            let (config, model) = load_hf(dir, options, device)?;
            let tokenizer =
                if dir.join("tokenizer.json").exists() { Some(TextTokenizer::from_dir(dir)?) } else { None };
            Ok(LoadedModel { config, model, tokenizer })
        }
        ModelSource::Gguf(path) => {
            let weights = GgufWeights::new(GgufFile::open(path)?)?;
            let config = weights.config()?;
            let tokenizer = Some(TextTokenizer::from_gguf(&weights.file)?);
            let model = config.init_with(&WeightReader { source: &weights, options, device })?;
            Ok(LoadedModel { config, model, tokenizer })
        }
        ModelSource::Random(spec) => {
            let random = RandomModel::from_spec(spec)?;
            let weights = random.weights();
            let model = random.config.init_with(&WeightReader { source: &weights, options, device })?;
            Ok(LoadedModel { config: random.config, model, tokenizer: None })
        }
    }
}

/// How to load: the compute dtype, and whether to quantize dense linear weights on load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// f32, bf16 or f16.
    pub dtype: DType,
    /// Quantize every decoder linear weight on load (`None`: keep dense; a checkpoint already in
    /// bitsandbytes 4-bit form stays 4-bit either way, without re-quantizing).
    pub quant: Option<QuantConfig>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { dtype: DType::F32, quant: None }
    }
}

/// Loads config.json and the weights of an HF directory onto `device`.
pub fn load_hf(dir: &Path, options: &LoadOptions, device: &Device) -> Result<(LlamaConfig, LlamaModel), LlamaError> {
    let config = LlamaConfig::from_hf_config(&dir.join("config.json"))?;
    let checkpoint = HfCheckpoint::open(dir)?;
    let model = config.init_with(&WeightReader { source: &checkpoint, options, device })?;
    Ok((config, model))
}

/// Reads a block's frozen tensors from a [`WeightSource`] by name, in the compute dtype, on the device:
/// what every loader hands to [`LlamaConfig::init_with`].
struct WeightReader<'a> {
    source: &'a dyn WeightSource,
    options: &'a LoadOptions,
    device: &'a Device,
}

impl FrozenWeights for WeightReader<'_> {
    fn linear(&self, name: &str, out: usize, inp: usize, bias: bool) -> Result<FrozenLinear, LlamaError> {
        self.linear(name, out, inp, bias)
    }
    fn norm_weight(&self, name: &str, len: usize) -> Result<Tensor<1>, LlamaError> {
        self.tensor1(name, len)
    }
    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Tensor<2>, LlamaError> {
        self.tensor2(name, vocab, hidden)
    }
    fn lm_head(&self, vocab: usize, hidden: usize) -> Result<Option<FrozenLinear>, LlamaError> {
        let name = "lm_head.weight";
        if !self.source.contains(name) {
            return Ok(None);
        }
        // lm_head stays dense (QLoRA leaves it unquantized), unless the checkpoint itself stores it in 4 bits.
        Ok(Some(match self.source.bnb_weight(name)? {
            Some(w) => self.quantized(name, w, vocab, hidden, None)?,
            None => FrozenLinear::dense(self.tensor2(name, vocab, hidden)?, None),
        }))
    }
}

impl WeightReader<'_> {
    fn file(&self, name: &str) -> String {
        self.source.file_of(name)
    }

    fn dense(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LlamaError> {
        if !self.source.contains(name) {
            return Err(LlamaError::MissingTensor { file: self.file(name), tensor: name.into() });
        }
        let (values, shape) = self.source.tensor_f32(name)?;
        if shape != expected {
            return Err(LlamaError::ShapeMismatch {
                file: self.file(name),
                tensor: name.into(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        Ok(values)
    }

    fn tensor1(&self, name: &str, len: usize) -> Result<Tensor<1>, LlamaError> {
        let values = self.dense(name, &[len])?;
        Ok(Tensor::<1>::from_data(TensorData::new(values, [len]), self.device).cast(self.options.dtype))
    }

    fn tensor2(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<2>, LlamaError> {
        let values = self.dense(name, &[rows, cols])?;
        Ok(Tensor::<2>::from_data(TensorData::new(values, [rows, cols]), self.device).cast(self.options.dtype))
    }

    /// A linear layer `prefix.weight` `[out, in]` (+ `prefix.bias`): 4-bit when the checkpoint stores it so or
    /// when quantizing on load, dense otherwise.
    fn linear(
        &self,
        prefix: &str,
        out_features: usize,
        in_features: usize,
        bias: bool,
    ) -> Result<FrozenLinear, LlamaError> {
        let name = format!("{prefix}.weight");
        let bias = if bias { Some(self.tensor1(&format!("{prefix}.bias"), out_features)?) } else { None };
        if let Some(weight) = self.source.bnb_weight(&name)? {
            return self.quantized(&name, weight, out_features, in_features, bias);
        }
        match &self.options.quant {
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
    ) -> Result<FrozenLinear, LlamaError> {
        if weight.shape != [out_features, in_features] {
            return Err(LlamaError::ShapeMismatch {
                file: self.file(name),
                tensor: name.into(),
                expected: vec![out_features, in_features],
                found: weight.shape,
            });
        }
        Ok(FrozenLinear::quantized(weight.to_device(self.device), bias))
    }
}
