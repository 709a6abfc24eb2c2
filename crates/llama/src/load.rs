//! Building a [`LlamaModel`] from any [`ModelSource`]: an HF checkpoint directory (dense or
//! bitsandbytes 4-bit), a GGUF file, or `random:…`.

use std::path::Path;

use burn::tensor::Device;
use formats::gguf::GgufFile;
use formats::source::ModelSource;
use formats::tokenizer::TextTokenizer;
use lora::weights::FrozenReader as WeightReader;
pub use lora::weights::LoadOptions;
use quant::checkpoint::HfCheckpoint;

use crate::random::RandomModel;
use crate::weights::GgufWeights;
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

/// Loads config.json and the weights of an HF directory onto `device`.
pub fn load_hf(dir: &Path, options: &LoadOptions, device: &Device) -> Result<(LlamaConfig, LlamaModel), LlamaError> {
    let config = LlamaConfig::from_hf_config(&dir.join("config.json"))?;
    let checkpoint = HfCheckpoint::open(dir)?;
    let model = config.init_with(&WeightReader { source: &checkpoint, options, device })?;
    Ok((config, model))
}
