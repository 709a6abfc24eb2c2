//! Building the model from its config, burn's way: `XConfig` → `.init(&device)` → module, for the whole
//! model ([`T5Config::init`]) and for each block ([`T5LayerNormConfig`], [`AttentionConfig`],
//! [`FeedForwardConfig`], [`EncoderLayerConfig`], [`DecoderLayerConfig`]).
//!
//! Each config names its block's frozen tensors once, in `init_with`, and takes their values from a
//! [`FrozenWeights`] (`lora::weights`): [`RandomInit`] for `init`, or a reader over a checkpoint (dense or
//! bitsandbytes 4-bit, `crate::load`). The names passed down are Hugging Face's module paths
//! (`encoder.block.0.layer.0.SelfAttention.q`), which the readers look tensors up by and PEFT names adapters by.

use burn::config::Config;
use burn::tensor::Device;
use lora::LoraLinear;
use lora::weights::{FrozenWeights, RandomInit};

use crate::T5Error;
use crate::config::{Activation, T5Config};
use crate::model::{Attention, DecoderLayer, EncoderLayer, FeedForward, RelativeBias, T5LayerNorm, T5Model};

/// T5's layer norm (RMS, no mean, no bias).
#[derive(Config, Debug)]
pub struct T5LayerNormConfig {
    pub size: usize,
    #[config(default = 1e-6)]
    pub eps: f64,
}

impl T5LayerNormConfig {
    /// Weight 1.
    pub fn init(&self, device: &Device) -> T5LayerNorm {
        self.init_with(&RandomInit::new(device), "layer_norm.weight").expect("random weights")
    }

    /// The weight `name` from `weights`.
    pub fn init_with(&self, weights: &dyn FrozenWeights, name: &str) -> Result<T5LayerNorm, T5Error> {
        Ok(T5LayerNorm { weight: weights.norm_weight(name, self.size)?, eps: self.eps })
    }
}

/// Attention: `q`, `k`, `v` `[heads·d_kv, d_model]`, `o` `[d_model, heads·d_kv]`, and, in the first layer of
/// a stack, the relative position bias table `[num_buckets, heads]`.
#[derive(Config, Debug)]
pub struct AttentionConfig {
    pub d_model: usize,
    pub num_heads: usize,
    pub d_kv: usize,
    /// `Some(bidirectional)`: this attention holds its stack's position bias table.
    #[config(default = "None")]
    pub relative_bias: Option<bool>,
    #[config(default = 32)]
    pub num_buckets: usize,
    #[config(default = 128)]
    pub max_distance: usize,
}

impl AttentionConfig {
    /// Random projections ([`RandomInit`]).
    pub fn init(&self, device: &Device) -> Attention {
        self.init_with(&RandomInit::new(device), "SelfAttention").expect("random weights")
    }

    /// Projections `{prefix}.{q,k,v,o}` and the table `{prefix}.relative_attention_bias.weight` from `weights`.
    pub fn init_with(&self, weights: &dyn FrozenWeights, prefix: &str) -> Result<Attention, T5Error> {
        let inner = self.num_heads * self.d_kv;
        let linear = |name: &str, out: usize, inp: usize| {
            weights.linear(&format!("{prefix}.{name}"), out, inp, false).map(LoraLinear::frozen)
        };
        let relative_attention_bias = match self.relative_bias {
            Some(bidirectional) => Some(RelativeBias {
                table: weights.embedding(
                    &format!("{prefix}.relative_attention_bias.weight"),
                    self.num_buckets,
                    self.num_heads,
                )?,
                bidirectional,
                num_buckets: self.num_buckets,
                max_distance: self.max_distance,
            }),
            None => None,
        };
        Ok(Attention {
            q: linear("q", inner, self.d_model)?,
            k: linear("k", inner, self.d_model)?,
            v: linear("v", inner, self.d_model)?,
            o: linear("o", self.d_model, inner)?,
            relative_attention_bias,
            num_heads: self.num_heads,
            d_kv: self.d_kv,
        })
    }
}

/// The feed-forward block: `wi`, `wo` (v1.0) or `wi_0`, `wi_1`, `wo` (gated).
#[derive(Config, Debug)]
pub struct FeedForwardConfig {
    pub d_model: usize,
    pub d_ff: usize,
    #[config(default = "Activation::Relu")]
    pub activation: Activation,
    #[config(default = false)]
    pub gated: bool,
}

impl FeedForwardConfig {
    /// Random projections ([`RandomInit`]).
    pub fn init(&self, device: &Device) -> FeedForward {
        self.init_with(&RandomInit::new(device), "DenseReluDense").expect("random weights")
    }

    /// Projections under `{prefix}` (`...layer.1.DenseReluDense`) from `weights`.
    pub fn init_with(&self, weights: &dyn FrozenWeights, prefix: &str) -> Result<FeedForward, T5Error> {
        let (d, ff) = (self.d_model, self.d_ff);
        let linear = |name: &str, out: usize, inp: usize| {
            weights.linear(&format!("{prefix}.{name}"), out, inp, false).map(LoraLinear::frozen)
        };
        let (wi_0, wi_1) = match self.gated {
            true => (linear("wi_0", ff, d)?, Some(linear("wi_1", ff, d)?)),
            false => (linear("wi", ff, d)?, None),
        };
        Ok(FeedForward { wi_0, wi_1, wo: linear("wo", d, ff)?, activation: self.activation })
    }
}

/// An encoder block (`layer.0` self-attention, `layer.1` feed-forward).
#[derive(Config, Debug)]
pub struct EncoderLayerConfig {
    pub attention: AttentionConfig,
    pub ff: FeedForwardConfig,
    #[config(default = 1e-6)]
    pub eps: f64,
}

impl EncoderLayerConfig {
    /// A block with random weights ([`RandomInit`]).
    pub fn init(&self, device: &Device) -> EncoderLayer {
        self.init_with(&RandomInit::new(device), "encoder.block.0").expect("random weights")
    }

    /// The block `prefix` (`encoder.block.{i}`) from `weights`.
    pub fn init_with(&self, weights: &dyn FrozenWeights, prefix: &str) -> Result<EncoderLayer, T5Error> {
        let norm = T5LayerNormConfig::new(self.attention.d_model).with_eps(self.eps);
        Ok(EncoderLayer {
            self_attention_norm: norm.init_with(weights, &format!("{prefix}.layer.0.layer_norm.weight"))?,
            self_attention: self.attention.init_with(weights, &format!("{prefix}.layer.0.SelfAttention"))?,
            ff_norm: norm.init_with(weights, &format!("{prefix}.layer.1.layer_norm.weight"))?,
            ff: self.ff.init_with(weights, &format!("{prefix}.layer.1.DenseReluDense"))?,
        })
    }
}

/// A decoder block (`layer.0` self-attention, `layer.1` cross-attention, `layer.2` feed-forward).
#[derive(Config, Debug)]
pub struct DecoderLayerConfig {
    pub self_attention: AttentionConfig,
    pub cross_attention: AttentionConfig,
    pub ff: FeedForwardConfig,
    #[config(default = 1e-6)]
    pub eps: f64,
}

impl DecoderLayerConfig {
    /// A block with random weights ([`RandomInit`]).
    pub fn init(&self, device: &Device) -> DecoderLayer {
        self.init_with(&RandomInit::new(device), "decoder.block.0").expect("random weights")
    }

    /// The block `prefix` (`decoder.block.{i}`) from `weights`.
    pub fn init_with(&self, weights: &dyn FrozenWeights, prefix: &str) -> Result<DecoderLayer, T5Error> {
        let norm = T5LayerNormConfig::new(self.self_attention.d_model).with_eps(self.eps);
        Ok(DecoderLayer {
            self_attention_norm: norm.init_with(weights, &format!("{prefix}.layer.0.layer_norm.weight"))?,
            self_attention: self.self_attention.init_with(weights, &format!("{prefix}.layer.0.SelfAttention"))?,
            cross_attention_norm: norm.init_with(weights, &format!("{prefix}.layer.1.layer_norm.weight"))?,
            cross_attention: self.cross_attention.init_with(weights, &format!("{prefix}.layer.1.EncDecAttention"))?,
            ff_norm: norm.init_with(weights, &format!("{prefix}.layer.2.layer_norm.weight"))?,
            ff: self.ff.init_with(weights, &format!("{prefix}.layer.2.DenseReluDense"))?,
        })
    }
}

impl T5Config {
    fn attention(&self, relative_bias: Option<bool>) -> AttentionConfig {
        AttentionConfig::new(self.d_model, self.num_heads, self.d_kv)
            .with_relative_bias(relative_bias)
            .with_num_buckets(self.relative_attention_num_buckets)
            .with_max_distance(self.relative_attention_max_distance)
    }

    fn feed_forward(&self) -> FeedForwardConfig {
        FeedForwardConfig::new(self.d_model, self.d_ff).with_activation(self.activation).with_gated(self.gated)
    }

    /// The config of encoder block `i` (block 0 holds the bidirectional position bias table).
    pub fn encoder_layer(&self, i: usize) -> EncoderLayerConfig {
        EncoderLayerConfig::new(self.attention((i == 0).then_some(true)), self.feed_forward())
            .with_eps(self.layer_norm_epsilon)
    }

    /// The config of decoder block `i` (block 0 holds the causal position bias table).
    pub fn decoder_layer(&self, i: usize) -> DecoderLayerConfig {
        DecoderLayerConfig::new(self.attention((i == 0).then_some(false)), self.attention(None), self.feed_forward())
            .with_eps(self.layer_norm_epsilon)
    }

    /// The model with fresh random weights ([`RandomInit`]: dense f32, N(0, 0.02), norms 1) on `device`.
    /// Checkpoints load through [`crate::load`], which builds the same structure from their weights.
    pub fn init(&self, device: &Device) -> T5Model {
        self.init_with(&RandomInit::new(device)).expect("random weights")
    }

    /// The model with its frozen tensors from `weights` (what the loaders call). The embedding is
    /// `shared.weight`; an untied model whose source lacks `lm_head.weight` ties it, as transformers does (the
    /// loaders also take a tied model's `lm_head.weight` where the checkpoint has one, see `crate::load`).
    pub fn init_with(&self, weights: &dyn FrozenWeights) -> Result<T5Model, T5Error> {
        let mut encoder = Vec::with_capacity(self.num_layers);
        for i in 0..self.num_layers {
            encoder.push(self.encoder_layer(i).init_with(weights, &format!("encoder.block.{i}"))?);
        }
        let mut decoder = Vec::with_capacity(self.num_decoder_layers);
        for i in 0..self.num_decoder_layers {
            decoder.push(self.decoder_layer(i).init_with(weights, &format!("decoder.block.{i}"))?);
        }
        let norm = T5LayerNormConfig::new(self.d_model).with_eps(self.layer_norm_epsilon);
        let lm_head = match self.tie_word_embeddings {
            true => None,
            false => weights.lm_head(self.vocab_size, self.d_model)?,
        };
        Ok(T5Model {
            shared: weights.embedding("shared.weight", self.vocab_size, self.d_model)?,
            encoder,
            encoder_final_norm: norm.init_with(weights, "encoder.final_layer_norm.weight")?,
            decoder,
            decoder_final_norm: norm.init_with(weights, "decoder.final_layer_norm.weight")?,
            lm_head,
            scale_decoder_outputs: self.tie_word_embeddings,
            vocab_size: self.vocab_size,
            d_model: self.d_model,
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Int, Tensor, TensorData};

    use super::*;
    use crate::config::tiny_test_config;

    /// `T5Config::init` builds a model that runs: encoder ids `[batch, s]` and decoder ids `[batch, t]` →
    /// logits `[batch, t, vocab]`; the blocks build alone from their configs.
    #[test]
    fn init_builds_a_model_that_runs() {
        let device = Device::flex();
        for config in [tiny_test_config(), tiny_test_config().with_gated(false).with_tie_word_embeddings(true)] {
            let model = config.init(&device);
            assert_eq!((model.encoder.len(), model.decoder.len()), (2, 3));
            assert_eq!(model.lm_head.is_some(), !config.tie_word_embeddings);
            assert!(model.encoder[0].self_attention.relative_attention_bias.is_some());
            assert!(model.encoder[1].self_attention.relative_attention_bias.is_none());
            assert!(model.decoder[0].cross_attention.relative_attention_bias.is_none());
            let enc = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 3, 2, 7, 4, 4], [2, 4]), &device);
            let dec = Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 5, 9, 0, 2, 7], [2, 3]), &device);
            let logits = model.forward(enc, dec);
            assert_eq!(logits.dims(), [2, 3, 40]);
            let values: Vec<f32> = logits.into_data().try_into_vec().unwrap();
            assert!(values.iter().all(|v| v.is_finite()));
        }
        let layer = tiny_test_config().decoder_layer(1).init(&device);
        assert_eq!(layer.self_attention.q.out_features(), 12);
        assert_eq!(layer.cross_attention.o.in_features(), 12);
        assert!(layer.ff.wi_1.is_some());
    }
}
