//! The encoder–decoder, op for op as transformers' `T5ForConditionalGeneration`: RMS layer norm without mean
//! or bias, attention without `1/√d` scaling plus a relative position bias (the table in the first layer of
//! each stack, shared by the rest), cross-attention, ReLU or gated feed-forward, the `d_model^-0.5` rescale
//! before a tied head, and a KV cache for self- and cross-attention.

use burn::module::Module;
use burn::tensor::activation::{gelu, relu, silu, softmax, tanh};
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use lora::{FrozenLinear, LoraLinear};

use crate::config::Activation;

/// T5's layer norm: `weight * (x * rsqrt(mean(x²) + eps))`, statistics in f32, no mean, no bias.
#[derive(Module, Debug)]
pub struct T5LayerNorm {
    pub weight: Tensor<1>,
    pub eps: f64,
}

impl T5LayerNorm {
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        ops::fused::rms_norm(x, self.weight.clone(), self.eps)
    }
}

/// transformers' `_relative_position_bucket`: the bucket of `relative_position = key − query`. Bidirectional
/// (encoder): half the buckets for keys after the query; causal (decoder): keys after the query fall in
/// bucket 0. Distances below `max_exact` (half the remaining buckets) get a bucket each; larger ones are
/// log-spaced up to `max_distance`, beyond which they share the last bucket. The logarithm in f32, as torch.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut buckets = num_buckets as i64;
    let mut base = 0i64;
    let distance = if bidirectional {
        buckets /= 2;
        if relative_position > 0 {
            base += buckets;
        }
        relative_position.abs()
    } else {
        -relative_position.min(0)
    };
    let max_exact = buckets / 2;
    if distance < max_exact {
        return (base + distance) as usize;
    }
    let log_ratio = (max_distance as f64 / max_exact as f64).ln() as f32;
    let scaled = (distance as f32 / max_exact as f32).ln() / log_ratio * (buckets - max_exact) as f32;
    let large = (max_exact + scaled as i64).min(buckets - 1);
    (base + large) as usize
}

/// The relative position bias of a stack: a learned `[num_buckets, heads]` table.
#[derive(Module, Debug)]
pub struct RelativeBias {
    /// `[num_buckets, heads]` (`relative_attention_bias.weight`).
    pub table: Tensor<2>,
    pub bidirectional: bool,
    pub num_buckets: usize,
    pub max_distance: usize,
}

impl RelativeBias {
    /// The bias `[1, heads, q_len, k_len]` in f32 for queries at positions `q_start..q_start + q_len` over
    /// keys at `0..k_len`.
    pub fn forward(&self, q_start: usize, q_len: usize, k_len: usize) -> Tensor<4> {
        let mut ids = Vec::with_capacity(q_len * k_len);
        for i in q_start..q_start + q_len {
            for j in 0..k_len {
                let rel = j as i64 - i as i64;
                ids.push(relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance) as i64);
            }
        }
        let device = self.table.device();
        let heads = self.table.dims()[1];
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, q_len * k_len]), &device);
        burn::tensor::module::embedding(self.table.clone(), ids)
            .reshape([q_len, k_len, heads])
            .permute([2, 0, 1])
            .unsqueeze_dim(0)
            .cast(DType::F32)
    }
}

/// Self- or cross-attention: q, k, v, o without biases; `softmax(q·kᵀ + bias)·v` (no `1/√d` scaling).
#[derive(Module, Debug)]
pub struct Attention {
    pub q: LoraLinear,
    pub k: LoraLinear,
    pub v: LoraLinear,
    pub o: LoraLinear,
    /// The stack's position bias table (first layer's self-attention only).
    pub relative_attention_bias: Option<RelativeBias>,
    pub num_heads: usize,
    pub d_kv: usize,
}

/// Keys and values of one attention, `[batch, heads, len, d_kv]`.
pub type KeyValues = (Tensor<4>, Tensor<4>);

impl Attention {
    /// `[batch, len, heads·d_kv]` → `[batch, heads, len, d_kv]`.
    pub fn heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, t, _] = x.dims();
        x.reshape([b, t, self.num_heads, self.d_kv]).swap_dims(1, 2)
    }

    /// Keys and values of `x` `[batch, len, d_model]`.
    pub fn key_values(&self, x: Tensor<3>) -> KeyValues {
        (self.heads(self.k.forward(x.clone())), self.heads(self.v.forward(x)))
    }

    /// `x` `[batch, q_len, d_model]` attends to `kv` (its own, or the encoder's for cross-attention) with
    /// the additive f32 `bias` `[1 or batch, 1 or heads, q_len or 1, k_len]` (position bias and masks);
    /// `[batch, q_len, d_model]`. Scores, bias and softmax in f32.
    pub fn forward(&self, x: Tensor<3>, kv: KeyValues, bias: &Tensor<4>) -> Tensor<3> {
        let q = self.heads(self.q.forward(x));
        self.o.forward(self.attend(q, kv, bias))
    }

    /// The attention itself, between the projections: queries `q` `[batch, heads, q_len, d_kv]` over `kv`
    /// with the additive f32 `bias` → `[batch, q_len, heads·d_kv]`.
    pub fn attend(&self, q: Tensor<4>, kv: KeyValues, bias: &Tensor<4>) -> Tensor<3> {
        let [b, _, t, _] = q.dims();
        let (k, v) = kv;
        let scores = q.matmul(k.swap_dims(2, 3));
        let dtype = scores.dtype();
        let scores = scores.cast(DType::F32) + bias.clone();
        let weights = softmax(scores, 3).cast(dtype);
        weights.matmul(v).swap_dims(1, 2).reshape([b, t, self.num_heads * self.d_kv])
    }
}

/// The feed-forward block: `wo(act(wi(x)))` (v1.0), or `wo(act(wi_0(x)) · wi_1(x))` (gated).
#[derive(Module, Debug)]
pub struct FeedForward {
    /// `wi` (v1.0) or `wi_0` (gated).
    pub wi_0: LoraLinear,
    /// `wi_1` (gated only).
    pub wi_1: Option<LoraLinear>,
    pub wo: LoraLinear,
    #[module(skip)]
    pub activation: Activation,
}

/// transformers' activations: `gelu_new` is `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub fn activate(x: Tensor<3>, activation: Activation) -> Tensor<3> {
    match activation {
        Activation::Relu => relu(x),
        Activation::Gelu => gelu(x),
        Activation::Silu => silu(x),
        Activation::GeluNew => {
            let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715))
                .mul_scalar((2.0 / std::f64::consts::PI).sqrt());
            x.mul_scalar(0.5) * tanh(inner).add_scalar(1.0)
        }
    }
}

impl FeedForward {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = self.wi_1.as_ref().map(|wi_1| wi_1.forward(x.clone()));
        self.wo.forward(self.hidden(self.wi_0.forward(x), gate))
    }

    /// What `wo` sees: `act(wi_0(x))`, times `wi_1(x)` when gated.
    pub fn hidden(&self, wi_0: Tensor<3>, wi_1: Option<Tensor<3>>) -> Tensor<3> {
        let h = activate(wi_0, self.activation);
        match wi_1 {
            Some(gate) => h * gate,
            None => h,
        }
    }
}

/// One encoder block: pre-norm self-attention and pre-norm feed-forward, each with a residual
/// (`layer.0`, `layer.1`).
#[derive(Module, Debug)]
pub struct EncoderLayer {
    pub self_attention_norm: T5LayerNorm,
    pub self_attention: Attention,
    pub ff_norm: T5LayerNorm,
    pub ff: FeedForward,
}

impl EncoderLayer {
    pub fn forward(&self, x: Tensor<3>, bias: &Tensor<4>) -> Tensor<3> {
        let normed = self.self_attention_norm.forward(x.clone());
        let kv = self.self_attention.key_values(normed.clone());
        let h = clamp_f16(x + self.self_attention.forward(normed, kv, bias));
        clamp_f16(h.clone() + self.ff.forward(self.ff_norm.forward(h)))
    }
}

/// One decoder block: self-attention, cross-attention over the encoder output, feed-forward (`layer.0`,
/// `layer.1`, `layer.2`), each pre-norm with a residual.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub self_attention_norm: T5LayerNorm,
    pub self_attention: Attention,
    pub cross_attention_norm: T5LayerNorm,
    pub cross_attention: Attention,
    pub ff_norm: T5LayerNorm,
    pub ff: FeedForward,
}

impl DecoderLayer {
    /// `self_kv` maps this step's keys and values to all the positions' (the cache appends them);
    /// `cross_kv` are the encoder output's keys and values for this layer.
    pub fn forward(
        &self,
        x: Tensor<3>,
        self_bias: &Tensor<4>,
        cross_bias: &Tensor<4>,
        self_kv: impl FnOnce(KeyValues) -> KeyValues,
        cross_kv: KeyValues,
    ) -> Tensor<3> {
        let normed = self.self_attention_norm.forward(x.clone());
        let kv = self_kv(self.self_attention.key_values(normed.clone()));
        let h = clamp_f16(x + self.self_attention.forward(normed, kv, self_bias));
        let normed = self.cross_attention_norm.forward(h.clone());
        let h = clamp_f16(h + self.cross_attention.forward(normed, cross_kv, cross_bias));
        clamp_f16(h.clone() + self.ff.forward(self.ff_norm.forward(h)))
    }
}

/// transformers clamps f16 hidden states after each sub-layer when one became infinite, to the largest
/// finite f16 less 1000; clamping to that bound always changes only values at or beyond it.
pub(crate) fn clamp_f16(x: Tensor<3>) -> Tensor<3> {
    if x.dtype() != DType::F16 {
        return x;
    }
    const F16_MAX: f64 = 65504.0;
    let has_inf = x.clone().cast(DType::F32).abs().max().into_scalar::<f32>().is_infinite();
    if has_inf { x.clamp(-(F16_MAX - 1000.0), F16_MAX - 1000.0) } else { x }
}

/// Keys and values cached during generation: each decoder layer's self-attention (growing) and
/// cross-attention (the encoder output's, computed once).
#[derive(Debug, Default, Clone)]
pub struct T5Cache {
    pub(crate) self_kv: Vec<Option<KeyValues>>,
    pub(crate) cross_kv: Vec<Option<KeyValues>>,
    pub(crate) len: usize,
}

impl T5Cache {
    pub fn new(num_layers: usize) -> Self {
        T5Cache { self_kv: vec![None; num_layers], cross_kv: vec![None; num_layers], len: 0 }
    }

    /// Decoder positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A T5 encoder–decoder with a language-model head.
#[derive(Module, Debug)]
pub struct T5Model {
    /// `[vocab, d_model]` (`shared.weight`), the embedding of both stacks.
    pub shared: Tensor<2>,
    pub encoder: Vec<EncoderLayer>,
    pub encoder_final_norm: T5LayerNorm,
    pub decoder: Vec<DecoderLayer>,
    pub decoder_final_norm: T5LayerNorm,
    /// `None` when tied to `shared`.
    pub lm_head: Option<FrozenLinear>,
    /// Scale the decoder output by `d_model^-0.5` before the head (config.json's `tie_word_embeddings`, which
    /// transformers 5 reads as `scale_decoder_outputs`).
    pub scale_decoder_outputs: bool,
    pub vocab_size: usize,
    pub d_model: usize,
}

/// `[batch, len]` key mask (true = padding) as an additive f32 bias `[batch, 1, 1, len]`: 0 or f32's
/// lowest value, as transformers' extended attention mask.
fn padding_bias(mask: &Tensor<2, Bool>) -> Tensor<4> {
    let [b, s] = mask.dims();
    Tensor::<2>::zeros([b, s], &mask.device()).mask_fill(mask.clone(), f32::MIN).reshape([b, 1, 1, s])
}

impl T5Model {
    /// The compute dtype (that of the embedding).
    pub fn dtype(&self) -> DType {
        self.shared.dtype()
    }

    pub fn device(&self) -> Device {
        self.shared.device()
    }

    /// The encoder's self-attention bias `[1, heads, len, len]` (position bias only).
    pub fn encoder_bias(&self, len: usize) -> Tensor<4> {
        let position = self.encoder[0].self_attention.relative_attention_bias.as_ref().expect("layer 0 bias");
        position.forward(0, len, len)
    }

    /// The decoder's self-attention bias `[1, heads, len, start + len]` for `len` positions after `start`
    /// cached ones: position bias, and f32's lowest value on keys after the query (causal).
    pub fn decoder_bias(&self, start: usize, len: usize) -> Tensor<4> {
        let total = start + len;
        let position = self.decoder[0].self_attention.relative_attention_bias.as_ref().expect("layer 0 bias");
        let causal: Vec<bool> = (0..len).flat_map(|i| (0..total).map(move |j| j > start + i)).collect();
        let causal = Tensor::<2, Bool>::from_data(TensorData::new(causal, [len, total]), &self.device());
        let heads = position.table.dims()[1];
        let causal = causal.reshape([1, 1, len, total]).expand([1, heads, len, total]);
        position.forward(start, len, total).mask_fill(causal, f32::MIN)
    }

    /// The encoder output `[batch, len, d_model]` (after its final norm) for `ids` `[batch, len]`;
    /// `padding` `[batch, len]` marks padded positions (true), which no position attends to.
    pub fn encode(&self, ids: Tensor<2, Int>, padding: Option<&Tensor<2, Bool>>) -> Tensor<3> {
        let [_, t] = ids.dims();
        let mut x = burn::tensor::module::embedding(self.shared.clone(), ids);
        let bias = self.encoder_bias(t);
        let bias = match padding {
            Some(mask) => bias + padding_bias(mask),
            None => bias,
        };
        for layer in &self.encoder {
            x = layer.forward(x, &bias);
        }
        self.encoder_final_norm.forward(x)
    }

    /// The decoder output `[batch, len, d_model]` (after its final norm) for decoder `ids` `[batch, len]`
    /// over the encoder output `encoded`. With a cache, `ids` are the tokens after the cached positions, the
    /// cross-attention keys and values are computed once, and the cache grows by their length.
    pub fn decode(
        &self,
        ids: Tensor<2, Int>,
        encoded: &Tensor<3>,
        encoder_padding: Option<&Tensor<2, Bool>>,
        mut cache: Option<&mut T5Cache>,
    ) -> Tensor<3> {
        let [_, t] = ids.dims();
        let s = encoded.dims()[1];
        let start = cache.as_ref().map_or(0, |c| c.len);
        let total = start + t;
        let device = self.device();
        let self_bias = self.decoder_bias(start, t);
        let cross_bias = match encoder_padding {
            Some(mask) => padding_bias(mask),
            None => Tensor::<4>::zeros([1, 1, 1, s], &device),
        };
        let mut x = burn::tensor::module::embedding(self.shared.clone(), ids);
        for (i, layer) in self.decoder.iter().enumerate() {
            let cross_kv = match cache.as_deref_mut() {
                Some(c) => {
                    c.cross_kv[i].get_or_insert_with(|| layer.cross_attention.key_values(encoded.clone())).clone()
                }
                None => layer.cross_attention.key_values(encoded.clone()),
            };
            let cross_bias = &cross_bias;
            x = match cache.as_deref_mut() {
                Some(c) => {
                    let slot = &mut c.self_kv[i];
                    layer.forward(
                        x,
                        &self_bias,
                        cross_bias,
                        |(k, v)| {
                            let kv = match slot.take() {
                                Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                                None => (k, v),
                            };
                            *slot = Some(kv.clone());
                            kv
                        },
                        cross_kv,
                    )
                }
                None => layer.forward(x, &self_bias, cross_bias, |kv| kv, cross_kv),
            };
        }
        if let Some(c) = cache {
            c.len = total;
        }
        self.decoder_final_norm.forward(x)
    }

    /// Vocabulary logits `[batch, len, vocab]` of decoder outputs: scaled by `d_model^-0.5` when
    /// [`scale_decoder_outputs`](Self::scale_decoder_outputs), then `lm_head` or the tied embedding.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let hidden = match self.scale_decoder_outputs {
            true => hidden.mul_scalar((self.d_model as f64).powf(-0.5)),
            false => hidden,
        };
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, t, d] = hidden.dims();
                hidden.reshape([b * t, d]).matmul(self.shared.clone().transpose()).reshape([b, t, self.vocab_size])
            }
        }
    }

    /// Logits `[batch, dec_len, vocab]` for encoder `ids` `[batch, enc_len]` and decoder ids
    /// `[batch, dec_len]` (which start with `decoder_start_token_id`), no padding, no cache.
    pub fn forward(&self, encoder_ids: Tensor<2, Int>, decoder_ids: Tensor<2, Int>) -> Tensor<3> {
        let encoded = self.encode(encoder_ids, None);
        self.logits(self.decode(decoder_ids, &encoded, None, None))
    }

    /// The training loss: the summed negative log-likelihood `[1]` of `labels` `[batch, dec_len]` where
    /// `mask` `[batch, dec_len]` is 1, for encoder `ids` `[batch, enc_len]` (padding marked true in
    /// `encoder_padding`) and decoder inputs `decoder_ids` `[batch, dec_len]` (`decoder_start_token_id`, then
    /// the labels shifted right). With a dense head (tied or a plain `lm_head`) the full-vocabulary logits
    /// are never held ([`ops::loss::chunked_nll_sum`]); gradients flow to every LoRA weight.
    pub fn nll_sum(
        &self,
        encoder_ids: Tensor<2, Int>,
        encoder_padding: Option<&Tensor<2, Bool>>,
        decoder_ids: Tensor<2, Int>,
        labels: Tensor<2, Int>,
        mask: Tensor<2>,
    ) -> Tensor<1> {
        let encoded = self.encode(encoder_ids, encoder_padding);
        let hidden = self.decode(decoder_ids, &encoded, encoder_padding, None);
        let w_t = match &self.lm_head {
            None => Some(self.shared.clone().transpose()),
            Some(head) => head.dense_transposed(),
        };
        match w_t {
            // The chunked loss takes the hidden states as the head sees them: rescaled first.
            Some(w_t) => {
                let hidden = match self.scale_decoder_outputs {
                    true => hidden.mul_scalar((self.d_model as f64).powf(-0.5)),
                    false => hidden,
                };
                ops::loss::head_nll_sum(hidden, Some(w_t), labels, mask, |h| h)
            }
            None => ops::loss::head_nll_sum(hidden, None, labels, mask, |h| self.logits(h)),
        }
    }

    /// A fresh cache for generation.
    pub fn new_cache(&self) -> T5Cache {
        T5Cache::new(self.decoder.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets as transformers computes them (values worked through `_relative_position_bucket` by hand for
    /// 32 buckets, max distance 128).
    #[test]
    fn buckets_follow_transformers() {
        // Bidirectional: 16 buckets a side, 8 exact.
        let b = |r| relative_position_bucket(r, true, 32, 128);
        assert_eq!([b(0), b(-1), b(-7), b(1), b(7)], [0, 1, 7, 17, 23]);
        // 8 + floor(ln(d/8)/ln(16)·8): d = 8 → 8, 16 → 10, 32 → 12, 127 → 15, far → 15.
        assert_eq!([b(-8), b(-16), b(-32), b(-127), b(-1000)], [8, 10, 12, 15, 15]);
        assert_eq!([b(8), b(1000)], [24, 31]);
        // Causal: keys ahead share bucket 0; 16 exact.
        let c = |r| relative_position_bucket(r, false, 32, 128);
        assert_eq!([c(5), c(0), c(-1), c(-15)], [0, 0, 1, 15]);
        // 16 + floor(ln(d/16)/ln(8)·16): d = 16 → 16, 32 → 21, 64 → 26, 128 → 31 (capped), far → 31.
        assert_eq!([c(-16), c(-32), c(-64), c(-1000)], [16, 21, 26, 31]);
    }

    #[test]
    fn gelu_new_is_the_tanh_approximation() {
        let device = Device::flex();
        let x = Tensor::<3>::from_data(TensorData::new(vec![-2.0f32, -0.5, 0.0, 0.7, 3.0], [1, 1, 5]), &device);
        let y: Vec<f32> = activate(x, Activation::GeluNew).into_data().try_into_vec().unwrap();
        for (x, y) in [-2.0f64, -0.5, 0.0, 0.7, 3.0].iter().zip(y) {
            let want = 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
            assert!((want - y as f64).abs() < 1e-6, "{x}: {y} vs {want}");
        }
    }
}
