//! The model's hyperparameters, read from HF config.json (`model_type` `t5` or `mt5`).

use std::path::Path;

use burn::config::Config;
use serde_json::Value;

use crate::T5Error;

/// The feed-forward block's activation (transformers' `feed_forward_proj`: `relu`, `gated-gelu`, ...).
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum Activation {
    Relu,
    /// The tanh approximation (`gelu_new`, what `gated-gelu` means).
    GeluNew,
    /// The exact erf form (`gelu`).
    Gelu,
    /// `silu` / `swish`.
    Silu,
}

/// A T5 encoder–decoder. Defaults are t5-small's (v1.0: ReLU feed-forward, tied head).
#[derive(Config, Debug, PartialEq)]
pub struct T5Config {
    #[config(default = 32128)]
    pub vocab_size: usize,
    #[config(default = 512)]
    pub d_model: usize,
    /// Per-head width of q, k, v (`num_heads × d_kv` need not equal `d_model`).
    #[config(default = 64)]
    pub d_kv: usize,
    #[config(default = 2048)]
    pub d_ff: usize,
    /// Encoder layers.
    #[config(default = 6)]
    pub num_layers: usize,
    #[config(default = 6)]
    pub num_decoder_layers: usize,
    #[config(default = 8)]
    pub num_heads: usize,
    #[config(default = 32)]
    pub relative_attention_num_buckets: usize,
    #[config(default = 128)]
    pub relative_attention_max_distance: usize,
    /// The input length the model was trained for (config.json's `n_positions`). Relative positions set no
    /// hard limit; serving bounds encoder inputs and answers by it.
    #[config(default = 512)]
    pub n_positions: usize,
    #[config(default = 1e-6)]
    pub layer_norm_epsilon: f64,
    #[config(default = "Activation::Relu")]
    pub activation: Activation,
    /// `wi_0`, `wi_1`, `wo` (v1.1, Flan-T5, mT5) instead of `wi`, `wo` (v1.0).
    #[config(default = false)]
    pub gated: bool,
    /// The decoder output is scaled by `d_model^-0.5` before the head (config.json's `scale_decoder_outputs`,
    /// else `tie_word_embeddings`, as transformers 5 reads them); a model without its own `lm_head.weight`
    /// uses the embedding as its head.
    #[config(default = true)]
    pub tie_word_embeddings: bool,
    #[config(default = 0)]
    pub pad_token_id: u32,
    #[config(default = 1)]
    pub eos_token_id: u32,
    #[config(default = 0)]
    pub decoder_start_token_id: u32,
}

impl T5Config {
    /// Checks the sizes the model relies on.
    pub fn validate(&self, source: &str) -> Result<(), T5Error> {
        let bad = |reason: String| Err(T5Error::InvalidConfig { file: source.to_string(), reason });
        for (name, v, limit) in [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("d_model", self.d_model, 1 << 20),
            ("d_kv", self.d_kv, 1 << 16),
            ("d_ff", self.d_ff, 1 << 20),
            ("num_layers", self.num_layers, 1 << 12),
            ("num_decoder_layers", self.num_decoder_layers, 1 << 12),
            ("num_heads", self.num_heads, 1 << 12),
            ("relative_attention_num_buckets", self.relative_attention_num_buckets, 1 << 16),
            ("relative_attention_max_distance", self.relative_attention_max_distance, 1 << 24),
            ("n_positions", self.n_positions, 1 << 24),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
            if v > limit {
                return bad(format!("{name} = {v} exceeds {limit}"));
            }
        }
        for (what, a, b) in [
            ("num_heads × d_kv × d_model", self.num_heads * self.d_kv, self.d_model),
            ("vocab_size × d_model", self.vocab_size, self.d_model),
            ("d_ff × d_model", self.d_ff, self.d_model),
        ] {
            if a.checked_mul(b).is_none_or(|n| n > 1 << 36) {
                return bad(format!("{what} = {a} × {b} is too large"));
            }
        }
        // The log-spaced buckets need max_exact ≥ 1 (num_buckets / 4 in the encoder) and max_distance above
        // max_exact (num_buckets / 2 in the decoder).
        let (buckets, max_distance) = (self.relative_attention_num_buckets, self.relative_attention_max_distance);
        if buckets < 4 || max_distance <= buckets / 2 {
            return bad(format!(
                "relative_attention_num_buckets {} and relative_attention_max_distance {} leave no log-spaced buckets",
                self.relative_attention_num_buckets, self.relative_attention_max_distance
            ));
        }
        if !(self.layer_norm_epsilon > 0.0) {
            return bad("layer_norm_epsilon must be positive".into());
        }
        for (name, id) in [
            ("pad_token_id", self.pad_token_id),
            ("eos_token_id", self.eos_token_id),
            ("decoder_start_token_id", self.decoder_start_token_id),
        ] {
            if id as usize >= self.vocab_size {
                return bad(format!("{name} {id} is outside the vocabulary ({})", self.vocab_size));
            }
        }
        Ok(())
    }

    /// Reads and validates an HF `config.json`.
    pub fn from_hf_config(path: &Path) -> Result<Self, T5Error> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| T5Error::Io { path: path.to_path_buf(), source })?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| T5Error::InvalidConfig { file: file.clone(), reason: e.to_string() })?;
        let config = Self::from_hf_json(&value, &file)?;
        config.validate(&file)?;
        Ok(config)
    }

    /// Builds the config from parsed HF JSON (transformers' `T5Config` defaults for absent fields); `file`
    /// labels errors.
    pub fn from_hf_json(v: &Value, file: &str) -> Result<Self, T5Error> {
        let bad = |reason: String| T5Error::InvalidConfig { file: file.to_string(), reason };
        if !v.is_object() {
            return Err(bad("config.json is not a JSON object".into()));
        }
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if !["t5", "mt5"].contains(&model_type) {
            return Err(bad(format!("model_type `{model_type}` is not T5 (supported: t5, mt5)")));
        }
        let usize_or = |key: &str, default: usize| -> Result<usize, T5Error> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| bad(format!("`{key}` must be a non-negative integer, found {x}"))),
            }
        };
        let id_or = |key: &str, default: u32| -> Result<u32, T5Error> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| bad(format!("`{key}` must be a token id, found {x}"))),
            }
        };
        let feed_forward = v.get("feed_forward_proj").and_then(Value::as_str).unwrap_or("relu");
        // transformers: "gated-ACT" or "ACT"; "gated-gelu" means gelu_new.
        let (gated, act) = match feed_forward.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, feed_forward),
            Some(_) => return Err(bad(format!("feed_forward_proj `{feed_forward}` is not `ACT` or `gated-ACT`"))),
        };
        let activation = match (gated, act) {
            (true, "gelu") | (_, "gelu_new") => Activation::GeluNew,
            (false, "gelu") => Activation::Gelu,
            (_, "relu") => Activation::Relu,
            (_, "silu" | "swish") => Activation::Silu,
            _ => return Err(bad(format!("feed_forward_proj `{feed_forward}`: activation `{act}` is not supported"))),
        };
        let num_layers = usize_or("num_layers", 6)?;
        let pad_token_id = id_or("pad_token_id", 0)?;
        Ok(T5Config {
            vocab_size: usize_or("vocab_size", 32128)?,
            d_model: usize_or("d_model", 512)?,
            d_kv: usize_or("d_kv", 64)?,
            d_ff: usize_or("d_ff", 2048)?,
            num_layers,
            num_decoder_layers: usize_or("num_decoder_layers", num_layers)?,
            num_heads: usize_or("num_heads", 8)?,
            relative_attention_num_buckets: usize_or("relative_attention_num_buckets", 32)?,
            relative_attention_max_distance: usize_or("relative_attention_max_distance", 128)?,
            n_positions: usize_or("n_positions", 512)?,
            layer_norm_epsilon: match v.get("layer_norm_epsilon") {
                None | Some(Value::Null) => 1e-6,
                Some(x) => {
                    x.as_f64().ok_or_else(|| bad(format!("`layer_norm_epsilon` must be a number, found {x}")))?
                }
            },
            activation,
            gated,
            // transformers 5 writes `scale_decoder_outputs` (and then `tie_word_embeddings: true` whatever the
            // head); older configs carry only `tie_word_embeddings`, which is read as the rescale.
            tie_word_embeddings: v
                .get("scale_decoder_outputs")
                .and_then(Value::as_bool)
                .or_else(|| v.get("tie_word_embeddings").and_then(Value::as_bool))
                .unwrap_or(true),
            pad_token_id,
            eos_token_id: match v.get("eos_token_id") {
                Some(Value::Array(ids)) => ids.first().and_then(Value::as_u64).map(|n| n as u32).unwrap_or(1),
                _ => id_or("eos_token_id", 1)?,
            },
            decoder_start_token_id: id_or("decoder_start_token_id", pad_token_id)?,
        })
    }

    /// The config as an HF `config.json` that transformers reads back to the same model;
    /// [`Self::from_hf_json`] reads it to the same config.
    pub fn to_hf_json(&self) -> Value {
        let act = match self.activation {
            Activation::Relu => "relu",
            Activation::GeluNew if self.gated => "gelu",
            Activation::GeluNew => "gelu_new",
            Activation::Gelu => "gelu",
            Activation::Silu => "silu",
        };
        serde_json::json!({
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "is_encoder_decoder": true,
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_layers": self.num_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "num_heads": self.num_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "n_positions": self.n_positions,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "feed_forward_proj": if self.gated { format!("gated-{act}") } else { act.to_string() },
            "tie_word_embeddings": self.tie_word_embeddings,
            "scale_decoder_outputs": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id,
        })
    }
}

/// A tiny config for unit tests: vocabulary 40, d_model 16, 3 heads of 4, 2 encoder and 3 decoder layers,
/// gated-GELU, untied, 8 buckets up to distance 12.
#[cfg(test)]
pub(crate) fn tiny_test_config() -> T5Config {
    T5Config::new()
        .with_vocab_size(40)
        .with_d_model(16)
        .with_d_kv(4)
        .with_d_ff(24)
        .with_num_layers(2)
        .with_num_decoder_layers(3)
        .with_num_heads(3)
        .with_relative_attention_num_buckets(8)
        .with_relative_attention_max_distance(12)
        .with_activation(Activation::GeluNew)
        .with_gated(true)
        .with_tie_word_embeddings(false)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn hf_json_round_trips() {
        for (act, gated, tied) in [
            (Activation::Relu, false, true),
            (Activation::GeluNew, true, false),
            (Activation::Gelu, false, false),
            (Activation::Silu, true, true),
        ] {
            let c = tiny_test_config()
                .with_activation(act)
                .with_gated(gated)
                .with_tie_word_embeddings(tied)
                .with_n_positions(77);
            assert_eq!(T5Config::from_hf_json(&c.to_hf_json(), "t").unwrap(), c);
        }
    }

    #[test]
    fn reads_flan_t5_and_t5_v1_0_configs() {
        let flan = json!({"model_type": "t5", "vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 2048,
            "num_layers": 12, "num_decoder_layers": 12, "num_heads": 12, "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": false, "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0});
        let c = T5Config::from_hf_json(&flan, "flan").unwrap();
        assert!(c.gated && c.activation == Activation::GeluNew && !c.tie_word_embeddings);
        let v10 = json!({"model_type": "t5", "d_model": 512, "num_layers": 6, "num_heads": 8});
        let c = T5Config::from_hf_json(&v10, "t5-small").unwrap();
        assert!(!c.gated && c.activation == Activation::Relu && c.tie_word_embeddings);
        // transformers 5's own save: the explicit rescale flag wins over tie_word_embeddings.
        let v5 = json!({"model_type": "t5", "tie_word_embeddings": true, "scale_decoder_outputs": false});
        assert!(!T5Config::from_hf_json(&v5, "t5").unwrap().tie_word_embeddings);
        assert_eq!((c.num_decoder_layers, c.relative_attention_max_distance, c.n_positions), (6, 128, 512));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let e = T5Config::from_hf_json(&json!({"model_type": "llama"}), "c.json").unwrap_err().to_string();
        assert!(e.contains("c.json") && e.contains("llama"), "{e}");
        let e = T5Config::from_hf_json(&json!({"model_type": "t5", "d_model": "big"}), "c.json").unwrap_err();
        assert!(e.to_string().contains("d_model"), "{e}");
        let e = T5Config::from_hf_json(&json!({"model_type": "t5", "feed_forward_proj": "gated-tanh"}), "c.json")
            .unwrap_err();
        assert!(e.to_string().contains("tanh"), "{e}");
        let c = tiny_test_config().with_relative_attention_max_distance(2);
        assert!(c.validate("c.json").unwrap_err().to_string().contains("buckets"));
        let c = tiny_test_config().with_eos_token_id(40);
        assert!(c.validate("c.json").unwrap_err().to_string().contains("eos_token_id"));
    }
}
