//! Building the decoder from its config, burn's way: `XConfig` → `.init(&device)` → module, for the whole
//! model ([`LlamaConfig::init`]) and for each block ([`RmsNormConfig`], [`AttentionConfig`], [`MlpConfig`],
//! [`DecoderLayerConfig`]).
//!
//! Each config knows its block's frozen tensors (which, with which shapes and names) once, in `init_with`,
//! and takes their values from a [`FrozenWeights`]: [`RandomInit`] for `init` (N(0, 0.02) as transformers
//! initialises a Llama, norms 1, biases 0, dense f32), or a loader's reader over a checkpoint, a GGUF file
//! or `random:` weights (`crate::load`), which fills the same structure and may keep linear weights in 4
//! bits. The names passed down are the module paths of the model (`model.layers.3.self_attn.q_proj`), which
//! are Hugging Face's names: the readers look tensors up by them.

use burn::config::Config;
use burn::tensor::Device;
use lora::LoraLinear;
pub use lora::weights::{FrozenWeights, RandomInit};

use crate::model::{Attention, DecoderLayer, LlamaModel, Mlp, RmsNorm, Rotary};
use crate::{LlamaConfig, LlamaError};

/// RMSNorm over the last dimension.
#[derive(Config, Debug)]
pub struct RmsNormConfig {
    /// The normalised width.
    pub size: usize,
    #[config(default = 1e-5)]
    pub eps: f64,
}

impl RmsNormConfig {
    /// Weight 1.
    pub fn init(&self, device: &Device) -> RmsNorm {
        self.init_with(&RandomInit::new(device), "norm").expect("random weights")
    }

    /// The weight `name` from `weights`.
    pub fn init_with(&self, weights: &dyn FrozenWeights, name: &str) -> Result<RmsNorm, LlamaError> {
        Ok(RmsNorm { weight: weights.norm_weight(name, self.size)?, eps: self.eps })
    }
}

/// Grouped-query self-attention: q, k, v, o projections.
#[derive(Config, Debug)]
pub struct AttentionConfig {
    pub hidden_size: usize,
    pub num_heads: usize,
    /// K/V heads (each serves `num_heads / num_kv_heads` query heads).
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// q/k/v carry a bias (Qwen2).
    #[config(default = false)]
    pub qkv_bias: bool,
    /// o_proj carries a bias.
    #[config(default = false)]
    pub o_bias: bool,
}

impl AttentionConfig {
    /// Random projections ([`RandomInit`]).
    pub fn init(&self, device: &Device) -> Attention {
        self.init_with(&RandomInit::new(device), "self_attn").expect("random weights")
    }

    /// Projections `{prefix}.{q,k,v,o}_proj` from `weights`.
    pub fn init_with(&self, weights: &dyn FrozenWeights, prefix: &str) -> Result<Attention, LlamaError> {
        let (q_out, kv_out) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        let linear = |name: &str, out: usize, inp: usize, bias: bool| {
            weights.linear(&format!("{prefix}.{name}"), out, inp, bias).map(LoraLinear::frozen)
        };
        Ok(Attention {
            q_proj: linear("q_proj", q_out, self.hidden_size, self.qkv_bias)?,
            k_proj: linear("k_proj", kv_out, self.hidden_size, self.qkv_bias)?,
            v_proj: linear("v_proj", kv_out, self.hidden_size, self.qkv_bias)?,
            o_proj: linear("o_proj", self.hidden_size, q_out, self.o_bias)?,
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        })
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) · up(x))`.
#[derive(Config, Debug)]
pub struct MlpConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    #[config(default = false)]
    pub bias: bool,
}

impl MlpConfig {
    /// Random projections ([`RandomInit`]).
    pub fn init(&self, device: &Device) -> Mlp {
        self.init_with(&RandomInit::new(device), "mlp").expect("random weights")
    }

    /// Projections `{prefix}.{gate,up,down}_proj` from `weights`.
    pub fn init_with(&self, weights: &dyn FrozenWeights, prefix: &str) -> Result<Mlp, LlamaError> {
        let (hidden, inter) = (self.hidden_size, self.intermediate_size);
        let linear = |name: &str, out: usize, inp: usize| {
            weights.linear(&format!("{prefix}.{name}"), out, inp, self.bias).map(LoraLinear::frozen)
        };
        Ok(Mlp {
            gate_proj: linear("gate_proj", inter, hidden)?,
            up_proj: linear("up_proj", inter, hidden)?,
            down_proj: linear("down_proj", hidden, inter)?,
        })
    }
}

/// One decoder layer: pre-norm attention and pre-norm MLP, each with a residual.
#[derive(Config, Debug)]
pub struct DecoderLayerConfig {
    pub attention: AttentionConfig,
    pub mlp: MlpConfig,
    #[config(default = 1e-5)]
    pub rms_norm_eps: f64,
}

impl DecoderLayerConfig {
    /// A layer with random projections ([`RandomInit`]).
    pub fn init(&self, device: &Device) -> DecoderLayer {
        self.init_with(&RandomInit::new(device), "layer").expect("random weights")
    }

    /// The layer `prefix` (`model.layers.{i}`) from `weights`.
    pub fn init_with(&self, weights: &dyn FrozenWeights, prefix: &str) -> Result<DecoderLayer, LlamaError> {
        let norm = RmsNormConfig::new(self.attention.hidden_size).with_eps(self.rms_norm_eps);
        Ok(DecoderLayer {
            input_layernorm: norm.init_with(weights, &format!("{prefix}.input_layernorm.weight"))?,
            self_attn: self.attention.init_with(weights, &format!("{prefix}.self_attn"))?,
            post_attention_layernorm: norm.init_with(weights, &format!("{prefix}.post_attention_layernorm.weight"))?,
            mlp: self.mlp.init_with(weights, &format!("{prefix}.mlp"))?,
        })
    }
}

impl LlamaConfig {
    /// The config of every decoder layer.
    pub fn layer(&self) -> DecoderLayerConfig {
        let attention =
            AttentionConfig::new(self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim())
                .with_qkv_bias(self.qkv_bias)
                .with_o_bias(self.o_bias);
        let mlp = MlpConfig::new(self.hidden_size, self.intermediate_size).with_bias(self.mlp_bias);
        DecoderLayerConfig::new(attention, mlp).with_rms_norm_eps(self.rms_norm_eps)
    }

    /// The model with fresh random weights ([`RandomInit`]: dense f32, N(0, 0.02), norms 1) on `device`.
    /// Checkpoints load through [`crate::load`], which builds the same structure from their weights.
    pub fn init(&self, device: &Device) -> LlamaModel {
        self.init_with(&RandomInit::new(device)).expect("random weights")
    }

    /// The model with its frozen tensors from `weights` (what the loaders call). An untied model whose
    /// source lacks `lm_head.weight` ties it, as transformers does.
    pub fn init_with(&self, weights: &dyn FrozenWeights) -> Result<LlamaModel, LlamaError> {
        let layer = self.layer();
        // Grows as layers load: a wrong layer count fails at its first missing tensor.
        let mut layers = Vec::with_capacity(self.num_hidden_layers);
        for i in 0..self.num_hidden_layers {
            layers.push(layer.init_with(weights, &format!("model.layers.{i}"))?);
        }
        let norm = RmsNormConfig::new(self.hidden_size).with_eps(self.rms_norm_eps);
        let lm_head = match self.tie_word_embeddings {
            true => None,
            false => weights.lm_head(self.vocab_size, self.hidden_size)?,
        };
        Ok(LlamaModel {
            embed_tokens: weights.embedding("model.embed_tokens.weight", self.vocab_size, self.hidden_size)?,
            layers,
            norm: norm.init_with(weights, "model.norm.weight")?,
            lm_head,
            rotary: Rotary::new(self),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Int, Tensor, TensorData};
    use lora::FrozenLinear;
    use lora::weights::WeightError;

    use super::*;

    fn tiny() -> LlamaConfig {
        crate::config::tiny_test_config().with_qkv_bias(true)
    }

    /// `LlamaConfig::init` builds a model that runs: `[batch, len]` ids → `[batch, len, vocab]` logits.
    #[test]
    fn init_builds_a_model_that_runs() {
        let device = Device::flex();
        let config = tiny();
        let model = config.init(&device);
        assert_eq!(model.layers.len(), 2);
        assert!(model.lm_head.is_some(), "untied by default");
        let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 3, 2, 7], [2, 3]), &device);
        let logits = model.forward(ids, None);
        assert_eq!(logits.dims(), [2, 3, 50]);
        let values: Vec<f32> = logits.into_data().convert::<f32>().try_into_vec().unwrap();
        assert!(values.iter().all(|v| v.is_finite()));
        // Blocks build alone from their own configs, with the shapes the model config gives them.
        let layer = config.layer().init(&device);
        assert_eq!(layer.self_attn.q_proj.out_features(), 16);
        assert_eq!(layer.self_attn.k_proj.out_features(), 8);
        assert_eq!(layer.mlp.down_proj.in_features(), 24);
    }

    /// A source that lacks a tensor: the error names it, nothing panics.
    #[test]
    fn a_missing_tensor_is_an_error_naming_it() {
        struct NoNorms(RandomInit);
        impl FrozenWeights for NoNorms {
            fn linear(&self, n: &str, o: usize, i: usize, b: bool) -> Result<FrozenLinear, WeightError> {
                self.0.linear(n, o, i, b)
            }
            fn norm_weight(&self, name: &str, _len: usize) -> Result<Tensor<1>, WeightError> {
                Err(WeightError::MissingTensor { file: "test".into(), tensor: name.into() })
            }
            fn embedding(&self, n: &str, v: usize, h: usize) -> Result<Tensor<2>, WeightError> {
                self.0.embedding(n, v, h)
            }
            fn lm_head(&self, v: usize, h: usize) -> Result<Option<FrozenLinear>, WeightError> {
                self.0.lm_head(v, h)
            }
        }
        let err = tiny().init_with(&NoNorms(RandomInit::new(&Device::flex()))).expect_err("an error").to_string();
        assert!(err.contains("model.layers.0.input_layernorm.weight"), "{err}");
    }
}
