//! `random:<architecture>`: a model of any Llama-family shape with random weights, for benchmarks and
//! tests on machines without the checkpoint (a GPU box with no network, a shape no small model has).
//!
//! The spec `random:<preset or config.json>[,layers=N][,seed=S]` is parsed by
//! [`formats::source::RandomSpec`]: presets `smollm2-135m` (SmolLM2-135M), `llama-7b` (Llama-2-7B) and
//! `llama-65b` (LLaMA-65B), or any HF `config.json`; `layers` overrides the depth. Here it becomes a
//! [`LlamaConfig`] and weights: N(0, 0.02) as transformers initialises them (norms 1), drawn from
//! SplitMix64 per tensor, so the same spec always gives the same model. There is no tokenizer: such
//! a model runs on token ids.

use std::collections::BTreeMap;

use formats::source::{RandomBase, RandomSpec};
use quant::QuantizedWeight;
use rayon::prelude::*;
use serde_json::Value;

use crate::weights::WeightSource;
use crate::{LlamaConfig, LlamaError};
use lora::weights::WeightError;

const SMOLLM2_135M: &str = r#"{"model_type":"llama","vocab_size":49152,"hidden_size":576,"intermediate_size":1536,
"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"rms_norm_eps":1e-5,"rope_theta":100000.0,
"max_position_embeddings":8192,"tie_word_embeddings":true,"bos_token_id":1,"eos_token_id":2}"#;
const LLAMA_7B: &str = r#"{"model_type":"llama","vocab_size":32000,"hidden_size":4096,"intermediate_size":11008,
"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":32,"rms_norm_eps":1e-5,"rope_theta":10000.0,
"max_position_embeddings":4096,"tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2}"#;
const LLAMA_65B: &str = r#"{"model_type":"llama","vocab_size":32000,"hidden_size":8192,"intermediate_size":22016,
"num_hidden_layers":80,"num_attention_heads":64,"num_key_value_heads":64,"rms_norm_eps":1e-6,"rope_theta":10000.0,
"max_position_embeddings":2048,"tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2}"#;

/// A `random:` model: the spec's config, built.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomModel {
    /// What the spec named (for messages).
    pub label: String,
    pub config: LlamaConfig,
    pub seed: u64,
}

impl RandomModel {
    /// Parses `random:<preset or config.json>[,layers=N][,seed=S]` and builds its config.
    pub fn parse(spec: &str) -> Result<Self, LlamaError> {
        Self::from_spec(&RandomSpec::parse(spec)?)
    }

    /// The config a parsed spec names: the preset or config.json, with `layers` applied, validated.
    pub fn from_spec(spec: &RandomSpec) -> Result<Self, LlamaError> {
        let preset = |json: &str| serde_json::from_str::<Value>(json).expect("preset JSON");
        let mut config = match &spec.base {
            RandomBase::Smollm2_135m => LlamaConfig::from_hf_json(&preset(SMOLLM2_135M), &spec.base.name())?,
            RandomBase::Llama7b => LlamaConfig::from_hf_json(&preset(LLAMA_7B), &spec.base.name())?,
            RandomBase::Llama65b => LlamaConfig::from_hf_json(&preset(LLAMA_65B), &spec.base.name())?,
            RandomBase::ConfigJson(path) => LlamaConfig::from_hf_config(path)?,
        };
        if let Some(layers) = spec.layers {
            config.num_hidden_layers = layers;
        }
        config.validate(&spec.label)?;
        Ok(RandomModel { label: spec.label.clone(), config, seed: spec.seed })
    }

    /// The weights, under their HF names.
    pub fn weights(&self) -> RandomWeights {
        let c = &self.config;
        let (hidden, head_dim) = (c.hidden_size, c.head_dim());
        let (q_out, kv_out, inter) =
            (c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim, c.intermediate_size);
        let mut shapes = BTreeMap::new();
        shapes.insert("model.embed_tokens.weight".to_string(), vec![c.vocab_size, hidden]);
        shapes.insert("model.norm.weight".to_string(), vec![hidden]);
        if !c.tie_word_embeddings {
            shapes.insert("lm_head.weight".to_string(), vec![c.vocab_size, hidden]);
        }
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            for (name, shape) in [
                ("input_layernorm.weight", vec![hidden]),
                ("post_attention_layernorm.weight", vec![hidden]),
                ("self_attn.q_proj.weight", vec![q_out, hidden]),
                ("self_attn.k_proj.weight", vec![kv_out, hidden]),
                ("self_attn.v_proj.weight", vec![kv_out, hidden]),
                ("self_attn.o_proj.weight", vec![hidden, q_out]),
                ("mlp.gate_proj.weight", vec![inter, hidden]),
                ("mlp.up_proj.weight", vec![inter, hidden]),
                ("mlp.down_proj.weight", vec![hidden, inter]),
            ] {
                shapes.insert(format!("{p}.{name}"), shape);
            }
            let biases = [
                (c.qkv_bias, "self_attn.q_proj.bias", q_out),
                (c.qkv_bias, "self_attn.k_proj.bias", kv_out),
                (c.qkv_bias, "self_attn.v_proj.bias", kv_out),
                (c.o_bias, "self_attn.o_proj.bias", hidden),
                (c.mlp_bias, "mlp.gate_proj.bias", inter),
                (c.mlp_bias, "mlp.up_proj.bias", inter),
                (c.mlp_bias, "mlp.down_proj.bias", hidden),
            ];
            for (on, name, len) in biases {
                if on {
                    shapes.insert(format!("{p}.{name}"), vec![len]);
                }
            }
        }
        RandomWeights { label: self.label.clone(), shapes, seed: self.seed }
    }
}

/// Random tensors under HF names (see the module docs).
pub struct RandomWeights {
    label: String,
    shapes: BTreeMap<String, Vec<usize>>,
    seed: u64,
}

/// `n` draws of N(0, std²) (Box–Muller on SplitMix64), in parallel chunks that depend on `seed` only.
fn normal(n: usize, std: f32, seed: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(chunk, values)| {
        let mut rng = splitmix::SplitMix64(seed ^ (chunk as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        for pair in values.chunks_mut(2) {
            let bits = rng.next_u64();
            let u1 = ((bits >> 40) as f32 + 1.0) / 16_777_217.0; // (0, 1]
            let u2 = (bits & 0xFF_FFFF) as f32 / 16_777_216.0;
            let radius = std * (-2.0 * u1.ln()).sqrt();
            let angle = std::f32::consts::TAU * u2;
            pair[0] = radius * angle.cos();
            if pair.len() > 1 {
                pair[1] = radius * angle.sin();
            }
        }
    });
    out
}

impl WeightSource for RandomWeights {
    fn file_of(&self, _name: &str) -> String {
        self.label.clone()
    }
    fn contains(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
    fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), WeightError> {
        let shape = self
            .shapes
            .get(name)
            .ok_or_else(|| WeightError::MissingTensor { file: self.label.clone(), tensor: name.into() })?;
        let n = shape.iter().product();
        let values = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            let seed = name
                .bytes()
                .fold(self.seed ^ 0xA076_1D64_78BD_642F, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3));
            normal(n, 0.02, seed)
        };
        Ok((values, shape.clone()))
    }
    fn bnb_weight(&self, _name: &str) -> Result<Option<QuantizedWeight>, WeightError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameter counts as transformers reports them for the real checkpoints.
    #[test]
    fn presets_have_their_models_parameter_counts() {
        assert_eq!(RandomModel::parse("random:llama-7b").unwrap().config.num_parameters(), 6_738_415_616);
        assert_eq!(RandomModel::parse("random:smollm2-135m").unwrap().config.num_parameters(), 134_515_008);
        let big = RandomModel::parse("random:llama-65b").unwrap().config;
        assert_eq!((big.num_hidden_layers, big.hidden_size, big.intermediate_size), (80, 8192, 22016));
        assert_eq!(big.num_parameters(), 65_285_660_672);
    }

    #[test]
    fn specs_parse_and_bad_specs_are_clear_errors() {
        let m = RandomModel::parse("random:smollm2-135m,layers=2,seed=3").unwrap();
        assert_eq!((m.config.num_hidden_layers, m.config.hidden_size, m.seed), (2, 576, 3));
        assert_eq!(RandomModel::parse("random:llama-7b").unwrap().config.intermediate_size, 11008);
        for bad in
            ["random:", "random:gpt9", "random:llama-7b,layers=x", "random:llama-7b,depth=2", "random:llama-7b,layers"]
        {
            let err = RandomModel::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: {err}");
        }
        assert!(RandomModel::parse("random:smollm2-135m,layers=0").is_err());
    }

    #[test]
    fn config_json_specs_build_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, SMOLLM2_135M).unwrap();
        let spec = format!("random:{},layers=3,seed=9", path.display());
        let m = RandomModel::parse(&spec).unwrap();
        assert_eq!((m.config.num_hidden_layers, m.config.hidden_size, m.seed), (3, 576, 9));
        assert_eq!(m.label, spec);
        // A config.json that is not one is the config's error, naming the file.
        std::fs::write(&path, "{").unwrap();
        let err = RandomModel::parse(&spec).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
    }

    #[test]
    fn weights_have_the_config_shapes_and_the_initialiser_statistics() {
        let m = RandomModel::parse("random:smollm2-135m,layers=1").unwrap();
        let w = m.weights();
        let (q, shape) = w.tensor_f32("model.layers.0.self_attn.k_proj.weight").unwrap();
        assert_eq!(shape, vec![192, 576]);
        let mean = q.iter().map(|&v| v as f64).sum::<f64>() / q.len() as f64;
        let std = (q.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / q.len() as f64).sqrt();
        assert!(mean.abs() < 1e-3 && (std - 0.02).abs() < 5e-4, "mean {mean} std {std}");
        assert_eq!(w.tensor_f32("model.layers.0.input_layernorm.weight").unwrap().0, vec![1.0; 576]);
        assert_eq!(w.tensor_f32("model.layers.0.self_attn.k_proj.weight").unwrap().0, q, "deterministic");
        assert_ne!(w.tensor_f32("model.layers.0.self_attn.v_proj.weight").unwrap().0, q);
        assert!(!w.contains("lm_head.weight") && !w.contains("model.layers.1.mlp.up_proj.weight"));
    }
}
