//! The decoder's hyperparameters, read from HF config.json (transformers 4 and 5 forms).

use std::path::Path;

use burn::config::Config;
use serde_json::Value;

use crate::LlamaError;

/// Llama-3 style RoPE frequency scaling (`rope_type: "llama3"`).
#[derive(Config, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    #[config(default = 1.0)]
    pub low_freq_factor: f64,
    #[config(default = 4.0)]
    pub high_freq_factor: f64,
    #[config(default = 8192)]
    pub original_max_position_embeddings: usize,
}

/// A Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM). Defaults are Llama-2-7B's.
#[derive(Config, Debug, PartialEq)]
pub struct LlamaConfig {
    #[config(default = 32000)]
    pub vocab_size: usize,
    #[config(default = 4096)]
    pub hidden_size: usize,
    #[config(default = 11008)]
    pub intermediate_size: usize,
    #[config(default = 32)]
    pub num_hidden_layers: usize,
    #[config(default = 32)]
    pub num_attention_heads: usize,
    /// Grouped-query attention: heads of K and V (equal to `num_attention_heads` for plain MHA).
    #[config(default = 32)]
    pub num_key_value_heads: usize,
    /// Per-head width; `hidden_size / num_attention_heads` when absent.
    #[config(default = "None")]
    pub head_dim: Option<usize>,
    #[config(default = 1e-5)]
    pub rms_norm_eps: f64,
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    #[config(default = "None")]
    pub rope_scaling: Option<Llama3RopeScaling>,
    #[config(default = 4096)]
    pub max_position_embeddings: usize,
    /// lm_head shares the token embedding.
    #[config(default = false)]
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    #[config(default = false)]
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama `attention_bias: true` puts one on all four).
    #[config(default = false)]
    pub o_bias: bool,
    /// MLP projections carry a bias.
    #[config(default = false)]
    pub mlp_bias: bool,
    #[config(default = "None")]
    pub bos_token_id: Option<u32>,
    #[config(default = "Vec::new()")]
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Parameters of the base model (embeddings, every linear layer and norm, the head unless tied):
    /// 6,738,415,616 for Llama-2-7B, as transformers counts them.
    pub fn num_parameters(&self) -> u64 {
        let (h, i, v) = (self.hidden_size as u64, self.intermediate_size as u64, self.vocab_size as u64);
        let q = (self.num_attention_heads * self.head_dim()) as u64;
        let kv = (self.num_key_value_heads * self.head_dim()) as u64;
        let biases = if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { h } else { 0 }
            + if self.mlp_bias { 2 * i + h } else { 0 };
        let layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h + biases;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers as u64 * layer + h + head
    }

    /// Checks the shape relations the model relies on.
    pub fn validate(&self, source: &str) -> Result<(), LlamaError> {
        let bad = |reason: String| Err(LlamaError::InvalidConfig { file: source.to_string(), reason });
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim()),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
            // Generous bounds far above any released model; they keep products of sizes from overflowing
            // and a hostile file from asking for absurd allocations before its tensors are checked.
            let limit = match name {
                "vocab_size" => 1 << 24,
                "num_hidden_layers" | "num_attention_heads" | "num_key_value_heads" => 1 << 12,
                _ => 1 << 20,
            };
            if v > limit {
                return bad(format!("{name} = {v} exceeds {limit}"));
            }
        }
        for (what, a, b) in [
            ("num_attention_heads × head_dim", self.num_attention_heads, self.head_dim()),
            ("vocab_size × hidden_size", self.vocab_size, self.hidden_size),
            ("intermediate_size × hidden_size", self.intermediate_size, self.hidden_size),
        ] {
            if a.checked_mul(b).is_none_or(|n| n > 1 << 36) {
                return bad(format!("{what} = {a} × {b} is too large"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for rotary embeddings", self.head_dim()));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !(self.rms_norm_eps > 0.0) || !(self.rope_theta > 0.0) {
            return bad("rms_norm_eps and rope_theta must be positive".into());
        }
        Ok(())
    }

    /// Reads an HF `config.json` (transformers 4: top-level `rope_theta`, `rope_scaling`, `torch_dtype`;
    /// transformers 5: `rope_parameters`, `dtype`).
    pub fn from_hf_config(path: &Path) -> Result<Self, LlamaError> {
        let file = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| LlamaError::Io { path: path.to_path_buf(), source })?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| LlamaError::InvalidConfig { file: file.clone(), reason: e.to_string() })?;
        let config = Self::from_hf_json(&value, &file)?;
        config.validate(&file)?;
        Ok(config)
    }

    /// Builds the config from parsed HF JSON; `file` labels errors.
    pub fn from_hf_json(v: &Value, file: &str) -> Result<Self, LlamaError> {
        let bad = |reason: String| LlamaError::InvalidConfig { file: file.to_string(), reason };
        if !v.is_object() {
            return Err(bad("config.json is not a JSON object".into()));
        }
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("llama");
        const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2", "smollm", "smollm3"];
        if !SUPPORTED.contains(&model_type) {
            return Err(bad(format!(
                "model_type `{model_type}` is not a Llama-family decoder (supported: {SUPPORTED:?})"
            )));
        }
        let req = |key: &str| -> Result<usize, LlamaError> {
            match v.get(key) {
                Some(x) => x
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| bad(format!("`{key}` must be a non-negative integer, found {x}"))),
                None => Err(bad(format!("missing `{key}`"))),
            }
        };
        let opt_usize = |key: &str| -> Result<Option<usize>, LlamaError> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| bad(format!("`{key}` must be a non-negative integer, found {x}"))),
            }
        };
        let opt_f64 = |obj: &Value, key: &str| -> Result<Option<f64>, LlamaError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x.as_f64().map(Some).ok_or_else(|| bad(format!("`{key}` must be a number, found {x}"))),
            }
        };
        let heads = req("num_attention_heads")?;
        // transformers 5 keeps RoPE under rope_parameters; 4 keeps rope_theta at the top and rope_scaling beside it.
        let rope = v.get("rope_parameters").filter(|r| r.is_object());
        let rope_theta = rope
            .map(|r| opt_f64(r, "rope_theta"))
            .transpose()?
            .flatten()
            .or(opt_f64(v, "rope_theta")?)
            .unwrap_or(10000.0);
        let scaling_obj = rope.or_else(|| v.get("rope_scaling").filter(|r| r.is_object()));
        let rope_scaling = match scaling_obj {
            None => None,
            Some(r) => {
                let kind = r.get("rope_type").or_else(|| r.get("type")).and_then(Value::as_str).unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => Some(Llama3RopeScaling {
                        factor: opt_f64(r, "factor")?
                            .ok_or_else(|| bad("llama3 rope scaling without `factor`".into()))?,
                        low_freq_factor: opt_f64(r, "low_freq_factor")?.unwrap_or(1.0),
                        high_freq_factor: opt_f64(r, "high_freq_factor")?.unwrap_or(4.0),
                        original_max_position_embeddings: r
                            .get("original_max_position_embeddings")
                            .and_then(Value::as_u64)
                            .map(|n| n as usize)
                            .unwrap_or(8192),
                    }),
                    other => return Err(bad(format!("rope type `{other}` is not supported (default and llama3 are)"))),
                }
            }
        };
        let attention_bias = v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false);
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
            _ => Vec::new(),
        };
        Ok(LlamaConfig {
            vocab_size: req("vocab_size")?,
            hidden_size: req("hidden_size")?,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: opt_usize("num_key_value_heads")?.unwrap_or(heads),
            head_dim: opt_usize("head_dim")?,
            rms_norm_eps: opt_f64(v, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            qkv_bias: model_type == "qwen2" || attention_bias,
            o_bias: attention_bias,
            mlp_bias: v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id: v.get("bos_token_id").and_then(Value::as_u64).map(|x| x as u32),
            eos_token_ids,
        })
    }
}

impl LlamaConfig {
    /// The config as an HF `config.json` (transformers 4 form, which both transformers 4 and 5 read):
    /// what a checkpoint written from a GGUF file or `random:` weights carries. [`Self::from_hf_json`] reads
    /// it back to the same config.
    pub fn to_hf_json(&self) -> Value {
        let qwen2 = self.qkv_bias && !self.o_bias;
        let mut v = serde_json::json!({
            "architectures": [if qwen2 { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
            "model_type": if qwen2 { "qwen2" } else { "llama" },
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim(),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.o_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
        });
        let object = v.as_object_mut().expect("object");
        if let Some(s) = &self.rope_scaling {
            object.insert(
                "rope_scaling".into(),
                serde_json::json!({"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                    "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_position_embeddings}),
            );
        }
        if let Some(bos) = self.bos_token_id {
            object.insert("bos_token_id".into(), bos.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                object.insert("eos_token_id".into(), (*one).into());
            }
            many => {
                object.insert("eos_token_id".into(), many.into());
            }
        }
        v
    }
}

/// A tiny grouped-query config for unit tests: vocabulary 50, hidden 16, MLP 24, 2 layers, 4 heads over 2
/// K/V heads.
#[cfg(test)]
pub(crate) fn tiny_test_config() -> LlamaConfig {
    LlamaConfig::new()
        .with_vocab_size(50)
        .with_hidden_size(16)
        .with_intermediate_size(24)
        .with_num_hidden_layers(2)
        .with_num_attention_heads(4)
        .with_num_key_value_heads(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hf_json_round_trips() {
        let mut c = tiny_test_config()
            .with_head_dim(Some(4))
            .with_rms_norm_eps(1e-6)
            .with_bos_token_id(Some(1))
            .with_eos_token_ids(vec![2, 7]);
        for (qkv, o, mlp, scaled) in
            [(false, false, false, false), (true, false, true, true), (true, true, false, false)]
        {
            c.qkv_bias = qkv;
            c.o_bias = o;
            c.mlp_bias = mlp;
            c.rope_scaling = scaled.then_some(Llama3RopeScaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            });
            assert_eq!(LlamaConfig::from_hf_json(&c.to_hf_json(), "t").unwrap(), c);
        }
    }

    #[test]
    fn reads_both_transformers_forms() {
        let v5 = json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
            "original_max_position_embeddings": 16}});
        let c = LlamaConfig::from_hf_json(&v5, "v5").unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling.unwrap().factor, 8.0);
        let v4 = json!({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "rope_theta": 1e6, "torch_dtype": "bfloat16", "eos_token_id": [1, 2]});
        let c = LlamaConfig::from_hf_json(&v4, "v4").unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let missing = json!({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2});
        let e = LlamaConfig::from_hf_json(&missing, "c.json").unwrap_err().to_string();
        assert!(e.contains("c.json") && e.contains("intermediate_size"), "{e}");
        let wrong = json!({"vocab_size": "ten", "hidden_size": 8, "intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 2});
        assert!(LlamaConfig::from_hf_json(&wrong, "c.json").unwrap_err().to_string().contains("vocab_size"));
        let gqa = json!({"vocab_size": 10, "hidden_size": 12, "intermediate_size": 1, "num_hidden_layers": 1,
            "num_attention_heads": 3, "num_key_value_heads": 2});
        let c = LlamaConfig::from_hf_json(&gqa, "c.json").unwrap();
        assert!(c.validate("c.json").unwrap_err().to_string().contains("multiple"));
        let other = json!({"model_type": "gpt2"});
        assert!(LlamaConfig::from_hf_json(&other, "c.json").unwrap_err().to_string().contains("gpt2"));
    }
}
