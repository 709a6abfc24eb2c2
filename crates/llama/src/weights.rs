//! Where the loader reads weights from ([`WeightSource`], `lora::weights`, under Hugging Face names): an HF
//! checkpoint (dense or bitsandbytes 4-bit), a GGUF file ([`GgufWeights`]) or random weights
//! (`crate::random`).

use std::collections::BTreeMap;

use formats::gguf::{GgufFile, GgufLlamaParams};
use lora::weights::WeightError;
pub use lora::weights::WeightSource;
use quant::QuantizedWeight;

use crate::{LlamaConfig, LlamaError};

/// A GGUF file seen through Hugging Face names: tensors dequantized, llama.cpp's Q/K permutation undone.
pub struct GgufWeights {
    pub file: GgufFile,
    pub params: GgufLlamaParams,
    /// HF name → GGUF name.
    names: BTreeMap<String, String>,
}

impl GgufWeights {
    pub fn new(file: GgufFile) -> Result<Self, LlamaError> {
        let params = file.llama_params()?;
        let names = file
            .tensors
            .iter()
            .filter_map(|t| formats::gguf::hf_tensor_name(&t.name).map(|hf| (hf, t.name.clone())))
            .collect();
        Ok(GgufWeights { file, params, names })
    }

    /// The decoder's config from the GGUF hyperparameters (and its tokenizer's bos/eos).
    pub fn config(&self) -> Result<LlamaConfig, LlamaError> {
        let p = &self.params;
        let file = self.file.path().display().to_string();
        if !["llama", "mistral", "qwen2", "smollm3"].contains(&p.arch.as_str()) {
            return Err(LlamaError::InvalidConfig {
                file,
                reason: format!("GGUF architecture `{}` is not a Llama-family decoder", p.arch),
            });
        }
        let id = |key: &str| self.file.get_u64(key).ok().map(|v| v as u32);
        let config = LlamaConfig {
            vocab_size: p.vocab,
            hidden_size: p.hidden,
            intermediate_size: p.intermediate,
            num_hidden_layers: p.n_layers,
            num_attention_heads: p.n_heads,
            num_key_value_heads: p.n_kv_heads,
            head_dim: Some(p.head_dim),
            rms_norm_eps: p.rms_eps as f64,
            rope_theta: p.rope_theta as f64,
            rope_scaling: None,
            max_position_embeddings: p.context_length,
            tie_word_embeddings: p.tie_embeddings,
            qkv_bias: self.names.contains_key("model.layers.0.self_attn.q_proj.bias"),
            o_bias: self.names.contains_key("model.layers.0.self_attn.o_proj.bias"),
            mlp_bias: self.names.contains_key("model.layers.0.mlp.up_proj.bias"),
            bos_token_id: id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        };
        config.validate(&file)?;
        Ok(config)
    }
}

impl WeightSource for GgufWeights {
    fn file_of(&self, _name: &str) -> String {
        self.file.path().display().to_string()
    }
    fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }
    fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), WeightError> {
        let gguf_name = self
            .names
            .get(name)
            .ok_or_else(|| WeightError::MissingTensor { file: self.file_of(name), tensor: name.into() })?;
        let (_, values, shape) =
            self.file.hf_tensor_f32(gguf_name, &self.params).map_err(|e| WeightError::Source(Box::new(e)))?;
        Ok((values, shape))
    }
    fn bnb_weight(&self, _name: &str) -> Result<Option<QuantizedWeight>, WeightError> {
        Ok(None)
    }
}
