//! Every model source `--model` takes as the base of `qlora merge`: an HF directory merges through
//! `lora::merge::HfBase` (its bytes, bitsandbytes 4-bit weights and files kept as they are); a GGUF file or
//! `random:` weights through [`SourceBase`], which reads each tensor under its Hugging Face name (GGUF
//! tensors dequantized, llama.cpp's Q/K permutation undone), writes config.json from the decoder's config
//! and tokenizer.json + tokenizer_config.json (chat template, bos/eos) from the source's tokenizer. The
//! result is an HF checkpoint that transformers and `qlora --model DIR` load.

use formats::gguf::GgufFile;
use formats::source::ModelSource;
use formats::tokenizer::TextTokenizer;
use lora::LoraError;
use lora::merge::{HfBase, MergeBase};
use quant::QuantizedWeight;
use quant::bnb::StoredTensor;
use serde_json::Value;

use crate::random::RandomModel;
use crate::weights::{GgufWeights, WeightSource};
use crate::{LlamaConfig, LlamaError};

/// A non-HF model source seen as an HF checkpoint.
pub struct SourceBase {
    label: String,
    config: LlamaConfig,
    weights: Box<dyn WeightSource>,
    tokenizer: Option<TextTokenizer>,
}

/// The merge base of any model source.
pub fn merge_base(source: &ModelSource) -> Result<Box<dyn MergeBase>, LlamaError> {
    Ok(match source {
        ModelSource::HfDir(dir) => Box::new(HfBase::open(dir)?),
        ModelSource::Gguf(path) => {
            let weights = GgufWeights::new(GgufFile::open(path)?)?;
            let config = weights.config()?;
            let tokenizer = Some(TextTokenizer::from_gguf(&weights.file)?);
            Box::new(SourceBase { label: path.display().to_string(), config, weights: Box::new(weights), tokenizer })
        }
        ModelSource::Random(spec) => {
            let random = RandomModel::from_spec(spec)?;
            let weights = Box::new(random.weights());
            Box::new(SourceBase { label: random.label.clone(), config: random.config, weights, tokenizer: None })
        }
    })
}

fn err(e: impl std::fmt::Display) -> LoraError {
    LoraError::Adapter(e.to_string())
}

impl MergeBase for SourceBase {
    fn label(&self) -> String {
        self.label.clone()
    }

    /// The decoder's tensors in HF order: embedding, each layer's norms and projections (with their
    /// biases), the final norm, and lm_head where the source has an untied one.
    fn names(&self) -> Vec<String> {
        let c = &self.config;
        let mut names = vec!["model.embed_tokens.weight".to_string()];
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            names.push(format!("{p}.input_layernorm.weight"));
            for (proj, bias) in [("q", c.qkv_bias), ("k", c.qkv_bias), ("v", c.qkv_bias), ("o", c.o_bias)] {
                names.push(format!("{p}.self_attn.{proj}_proj.weight"));
                if bias {
                    names.push(format!("{p}.self_attn.{proj}_proj.bias"));
                }
            }
            names.push(format!("{p}.post_attention_layernorm.weight"));
            for proj in ["gate", "up", "down"] {
                names.push(format!("{p}.mlp.{proj}_proj.weight"));
                if c.mlp_bias {
                    names.push(format!("{p}.mlp.{proj}_proj.bias"));
                }
            }
        }
        names.push("model.norm.weight".into());
        if !c.tie_word_embeddings && self.weights.contains("lm_head.weight") {
            names.push("lm_head.weight".into());
        }
        names
    }

    fn contains(&self, name: &str) -> bool {
        self.weights.contains(name)
    }

    fn stored(&self, name: &str) -> Result<StoredTensor, LoraError> {
        let (values, shape) = self.tensor_f32(name)?;
        Ok(StoredTensor::f32(shape, &values))
    }

    fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), LoraError> {
        self.weights.tensor_f32(name).map_err(err)
    }

    fn bnb_weight(&self, name: &str) -> Result<Option<QuantizedWeight>, LoraError> {
        self.weights.bnb_weight(name).map_err(err)
    }

    fn hf_config(&self) -> Result<Value, LoraError> {
        Ok(self.config.to_hf_json())
    }

    fn auxiliary_files(&self) -> Result<Vec<(String, Vec<u8>)>, LoraError> {
        let Some(tokenizer) = &self.tokenizer else { return Ok(Vec::new()) };
        let json = tokenizer.inner.to_string(true).map_err(err)?;
        let mut config = serde_json::Map::new();
        if let Some(template) = &tokenizer.chat_template {
            config.insert("chat_template".into(), template.clone().into());
        }
        for (key, token) in [("bos_token", &tokenizer.bos_token), ("eos_token", &tokenizer.eos_token)] {
            if let Some(token) = token {
                config.insert(key.into(), token.clone().into());
            }
        }
        let config = serde_json::to_string_pretty(&Value::Object(config)).expect("json");
        Ok(vec![("tokenizer.json".into(), json.into_bytes()), ("tokenizer_config.json".into(), config.into_bytes())])
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Int, Tensor, TensorData};
    use lora::merge::{MergeOutput, merge};

    use super::*;
    use crate::{LoadOptions, load, load_hf};

    fn fixtures() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    /// A merge from a non-HF source (`random:` weights of the tiny fixture's shape, with the PEFT adapter
    /// made for that shape) writes an HF checkpoint whose logits equal the source model with the adapter
    /// applied; config.json round-trips.
    #[test]
    fn merge_from_a_random_source_equals_base_plus_adapter() {
        let spec = format!("random:{},seed=3", fixtures().join("tiny-llama-f32/config.json").display());
        let source = formats::source::resolve(&spec).unwrap();
        let adapter = fixtures().join("peft/adapter-tiny-llama");
        let out = tempfile::tempdir().unwrap();
        let base = merge_base(&source).unwrap();
        let report = merge(base.as_ref(), &adapter, out.path(), &MergeOutput::DenseF32).unwrap();
        assert!(report.merged_modules > 0);

        let device = Device::flex();
        let (config, merged) = load_hf(out.path(), &LoadOptions::default(), &device).unwrap();
        let mut with_adapter = load(&source, &LoadOptions::default(), &device).unwrap();
        assert_eq!(config, with_adapter.config);
        with_adapter.model.load_peft_adapter(&adapter).unwrap();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 7, 3, 9, 4, 2], [1, 6]), &device);
        let a: Vec<f32> = merged.forward(ids.clone(), None).into_data().try_into_vec().unwrap();
        let b: Vec<f32> = with_adapter.model.forward(ids, None).into_data().try_into_vec().unwrap();
        assert_eq!(a.len(), b.len());
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "merged logits off by {worst}");
    }
}
