//! Building a [`T5Model`] from an HF checkpoint directory (dense f32/bf16/f16, single or sharded, or
//! bitsandbytes 4-bit) through `lora::weights`, the readers every model family shares.
//!
//! Two T5 rules of transformers apply on load. The embedding is `shared.weight`, or whichever of its tied
//! names (`encoder.embed_tokens.weight`, `decoder.embed_tokens.weight`) the checkpoint kept; a
//! `lm_head.weight` in the checkpoint is the head even when config.json says the embeddings are tied
//! (transformers 5 unties them then), while the `d_model^-0.5` rescale follows config.json. And quantizing on
//! load leaves the feed-forward output layers `wo` dense, as transformers does for T5
//! (`_keep_in_fp32_modules = ["wo"]`, which its bitsandbytes quantizer skips); a checkpoint that stores them
//! in 4 bits loads them so.

use std::path::Path;

use burn::tensor::{Device, Tensor};
use formats::source::ModelSource;
use formats::tokenizer::TextTokenizer;
use lora::FrozenLinear;
use lora::weights::{FrozenReader, FrozenWeights, LoadOptions, WeightError, WeightSource};
use quant::QuantizedWeight;
use quant::checkpoint::HfCheckpoint;

use crate::{T5Config, T5Error, T5Model};

/// A model ready to run: config, weights on the device, tokenizer (absent for a directory without
/// tokenizer.json, which can still run on token ids).
pub struct LoadedT5 {
    pub config: T5Config,
    pub model: T5Model,
    pub tokenizer: Option<TextTokenizer>,
}

/// Whether `dir` holds a T5 checkpoint (config.json's `model_type` is `t5` or `mt5`): how the binary picks
/// the model family.
pub fn is_t5_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|v| v.get("model_type").and_then(|t| t.as_str()).map(|t| t == "t5" || t == "mt5"))
        .unwrap_or(false)
}

/// Loads a T5 model from a [`ModelSource`] (an HF directory; GGUF files and `random:` specs are
/// Llama-family only).
pub fn load(source: &ModelSource, options: &LoadOptions, device: &Device) -> Result<LoadedT5, T5Error> {
    match source {
        ModelSource::HfDir(dir) => {
            let (config, model) = load_hf(dir, options, device)?;
            let tokenizer =
                if dir.join("tokenizer.json").exists() { Some(TextTokenizer::from_dir(dir)?) } else { None };
            Ok(LoadedT5 { config, model, tokenizer })
        }
        other => Err(T5Error::InvalidConfig {
            file: other.label(),
            reason: "T5 models load from HF checkpoint directories only".into(),
        }),
    }
}

/// Loads config.json and the weights of an HF directory onto `device`.
pub fn load_hf(dir: &Path, options: &LoadOptions, device: &Device) -> Result<(T5Config, T5Model), T5Error> {
    let config = T5Config::from_hf_config(&dir.join("config.json"))?;
    let checkpoint = HfCheckpoint::open(dir)?;
    let source = T5Names { checkpoint: &checkpoint };
    let reader = T5Reader(FrozenReader { source: &source, options, device });
    let mut model = config.init_with(&reader)?;
    if model.lm_head.is_none() {
        model.lm_head = reader.lm_head(config.vocab_size, config.d_model)?;
    }
    Ok((config, model))
}

/// The checkpoint with `shared.weight` found under any of its tied names.
struct T5Names<'a> {
    checkpoint: &'a HfCheckpoint,
}

const SHARED: &str = "shared.weight";
const SHARED_ALIASES: [&str; 3] = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"];

impl T5Names<'_> {
    fn resolve<'n>(&self, name: &'n str) -> &'n str {
        if name == SHARED {
            SHARED_ALIASES.into_iter().find(|n| self.checkpoint.contains(n)).unwrap_or(name)
        } else {
            name
        }
    }
}

impl WeightSource for T5Names<'_> {
    fn file_of(&self, name: &str) -> String {
        self.checkpoint.file_of(self.resolve(name))
    }
    fn contains(&self, name: &str) -> bool {
        WeightSource::contains(self.checkpoint, self.resolve(name))
    }
    fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), WeightError> {
        WeightSource::tensor_f32(self.checkpoint, self.resolve(name))
    }
    fn bnb_weight(&self, name: &str) -> Result<Option<QuantizedWeight>, WeightError> {
        WeightSource::bnb_weight(self.checkpoint, self.resolve(name))
    }
}

/// The shared reader, but quantizing on load leaves the `wo` layers dense (see the module docs).
struct T5Reader<'a>(FrozenReader<'a>);

impl FrozenWeights for T5Reader<'_> {
    fn linear(&self, name: &str, out: usize, inp: usize, bias: bool) -> Result<FrozenLinear, WeightError> {
        let quant = if name.ends_with(".wo") { None } else { self.0.options.quant.as_ref() };
        self.0.linear_as(name, out, inp, bias, quant)
    }
    fn norm_weight(&self, name: &str, len: usize) -> Result<Tensor<1>, WeightError> {
        self.0.norm_weight(name, len)
    }
    fn embedding(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<2>, WeightError> {
        self.0.embedding(name, rows, cols)
    }
    fn lm_head(&self, vocab: usize, hidden: usize) -> Result<Option<FrozenLinear>, WeightError> {
        self.0.lm_head(vocab, hidden)
    }
}
