//! The decoder: embeddings, RMSNorm, rotary embeddings as HF computes them (rotate_half), grouped-query
//! attention with a causal mask and a KV cache, SwiGLU MLP, tied or untied lm_head.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use lora::{FrozenLinear, LoraLinear};

use crate::config::{Llama3RopeScaling, LlamaConfig};

/// RMSNorm as HF's `LlamaRMSNorm`: `weight * (x * rsqrt(mean(x²) + eps))`, the statistics in f32.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Tensor<1>,
    pub eps: f64,
}

impl RmsNorm {
    /// `x [..., size]` → the same shape: `x / rms(x) · weight` over the last dimension (statistics in f32).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        ops::fused::rms_norm(x, self.weight.clone(), self.eps)
    }
}

/// Rotary position embedding tables, HF style: `inv_freq` from `rope_theta` (with optional Llama-3
/// scaling), cos/sin of `position * inv_freq` duplicated over both halves of the head.
#[derive(Module, Debug)]
pub struct Rotary {
    pub inv_freq: Vec<f32>,
    pub head_dim: usize,
}

impl Rotary {
    pub fn new(config: &LlamaConfig) -> Self {
        let dim = config.head_dim();
        // HF: 1 / base ** (arange(0, dim, 2).float() / dim), float32.
        let base = config.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32)).collect();
        if let Some(scaling) = &config.rope_scaling {
            llama3_scale(&mut inv_freq, scaling);
        }
        Rotary { inv_freq, head_dim: dim }
    }

    /// `(cos, sin)` of shape `[len, head_dim]` for positions `start..start + len`, in `dtype`.
    pub fn tables(&self, start: usize, len: usize, dtype: DType, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(len * self.head_dim);
        let mut sin = Vec::with_capacity(len * self.head_dim);
        for p in start..start + len {
            let angles: Vec<f32> = self.inv_freq.iter().map(|f| f * p as f32).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        debug_assert_eq!(cos.len(), len * 2 * half);
        let make = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [len, self.head_dim]), device).cast(dtype);
        (make(cos), make(sin))
    }

    /// `x * cos + rotate_half(x) * sin` for `x` of shape `[batch, heads, len, head_dim]`.
    pub fn apply(x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
        let [_, _, t, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        let cos = cos.clone().reshape([1, 1, t, d]);
        let sin = sin.clone().reshape([1, 1, t, d]);
        x * cos + rotated * sin
    }
}

/// HF's `_compute_llama3_parameters`: long wavelengths divided by `factor`, short ones kept, the band
/// between interpolated smoothly.
fn llama3_scale(inv_freq: &mut [f32], s: &Llama3RopeScaling) {
    let old_context = s.original_max_position_embeddings as f32;
    let low_wavelen = old_context / s.low_freq_factor as f32;
    let high_wavelen = old_context / s.high_freq_factor as f32;
    let factor = s.factor as f32;
    for f in inv_freq.iter_mut() {
        let wavelen = 2.0 * std::f32::consts::PI / *f;
        let scaled = if wavelen > low_wavelen { *f / factor } else { *f };
        let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
        *f = if medium {
            let smooth = (old_context / wavelen - s.low_freq_factor as f32)
                / (s.high_freq_factor as f32 - s.low_freq_factor as f32);
            (1.0 - smooth) * scaled / factor + smooth * scaled
        } else {
            scaled
        };
    }
}

/// Keys and values of the positions seen so far, per layer: `[batch, kv_heads, len, head_dim]`.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    pub(crate) len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache { layers: vec![None; num_layers], len: 0 }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn append(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (k, v) = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        (k, v)
    }
}

/// Grouped-query self-attention.
#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: LoraLinear,
    pub k_proj: LoraLinear,
    pub v_proj: LoraLinear,
    pub o_proj: LoraLinear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// `x`: `[batch, len, hidden]` at positions `start..start + len` (`start` = cached positions) → `[batch, len,
    /// hidden]`. `cos`/`sin`: `[len, head_dim]` rotary tables of those positions; `mask`: `[len, start + len]`,
    /// true where a query may not attend; `cache`: this layer's K/V and its index, grown by `len`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        mask: &Tensor<2, Bool>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x.clone()).reshape([b, t, h, d]).swap_dims(1, 2);
        let k = self.k_proj.forward(x.clone()).reshape([b, t, kvh, d]).swap_dims(1, 2);
        let v = self.v_proj.forward(x).reshape([b, t, kvh, d]).swap_dims(1, 2);
        let q = Rotary::apply(q, cos, sin);
        let k = Rotary::apply(k, cos, sin);
        let out = match cache {
            // Training, evaluation, and forward passes without a cache: the fused op, whose backward keeps no
            // `[len, len]` matrices (`crate::attention`).
            None => ops::attention::causal_attention(q, k, v, (d as f64).powf(-0.5) as f32),
            Some((cache, layer)) => self.attend_cached(q, k, v, mask, cache, layer),
        };
        self.o_proj.forward(out.swap_dims(1, 2).reshape([b, t, h * d]))
    }

    /// Attention of rotated `q [batch, heads, len, head_dim]` over the cached keys and values plus the new
    /// `k`, `v` (`[batch, kv_heads, len, head_dim]`, appended to the cache's `layer`); `mask` `[len, cached +
    /// len]` is true where a position is hidden. Returns `[batch, heads, len, head_dim]`.
    pub(crate) fn attend_cached(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        mask: &Tensor<2, Bool>,
        cache: &mut KvCache,
        layer: usize,
    ) -> Tensor<4> {
        let [b, _, t, _] = q.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let scale = (d as f64).powf(-0.5);
        let (k, v) = cache.append(layer, k, v);
        let s = k.dims()[2];
        let k = repeat_kv(k, h / kvh);
        let v = repeat_kv(v, h / kvh);
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
        let dtype = scores.dtype();
        let scores = scores
            .cast(DType::F32)
            .mask_fill(mask.clone().reshape([1, 1, t, s]).expand([b, h, t, s]), f32::NEG_INFINITY);
        softmax(scores, 3).cast(dtype).matmul(v)
    }
}

/// The causal mask of `len` new positions after `start` cached ones: `[len, start + len]`, true where a
/// position is hidden (in the future).
pub(crate) fn causal_mask(start: usize, len: usize, device: &Device) -> Tensor<2, Bool> {
    let total = start + len;
    let values: Vec<bool> = (0..len).flat_map(|i| (0..total).map(move |j| j > start + i)).collect();
    Tensor::<2, Bool>::from_data(TensorData::new(values, [len, total]), device)
}

/// HF `repeat_kv`: each K/V head serves `rep` consecutive query heads.
fn repeat_kv(x: Tensor<4>, rep: usize) -> Tensor<4> {
    if rep == 1 {
        return x;
    }
    let [b, kvh, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2).expand([b, kvh, rep, s, d]).reshape([b, kvh * rep, s, d])
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: LoraLinear,
    pub up_proj: LoraLinear,
    pub down_proj: LoraLinear,
}

impl Mlp {
    /// `[batch, len, hidden]` → `[batch, len, hidden]`: `down(silu(gate(x)) ⊙ up(x))`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.down_proj.forward(ops::fused::swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x)))
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// `[batch, len, hidden]` → `[batch, len, hidden]`: `h = x + attn(norm(x))`, `h + mlp(norm(h))`; the other
    /// arguments as [`Attention::forward`].
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        mask: &Tensor<2, Bool>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor<3> {
        let h = x.clone() + self.self_attn.forward(self.input_layernorm.forward(x), cos, sin, mask, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// A Llama-family causal language model.
#[derive(Module, Debug)]
pub struct LlamaModel {
    /// `[vocab, hidden]`
    pub embed_tokens: Tensor<2>,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<FrozenLinear>,
    pub rotary: Rotary,
    pub vocab_size: usize,
    pub hidden_size: usize,
}

impl LlamaModel {
    /// The compute dtype (that of the embeddings).
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// Hidden states after the final norm, `[batch, len, hidden]`. With a cache, `ids` are the new tokens
    /// after the cached positions, and the cache grows by their length.
    pub fn forward_hidden(&self, ids: Tensor<2, Int>, mut cache: Option<&mut KvCache>) -> Tensor<3> {
        let [_, t] = ids.dims();
        let start = cache.as_ref().map_or(0, |c| c.len());
        let device = self.device();
        let dtype = self.dtype();
        let (cos, sin) = self.rotary.tables(start, t, dtype, &device);
        let total = start + t;
        let mask = causal_mask(start, t, &device);
        let mut x = burn::tensor::module::embedding(self.embed_tokens.clone(), ids);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x, &cos, &sin, &mask, cache.as_deref_mut().map(|c| (c, i)));
        }
        if let Some(c) = cache {
            c.len = total;
        }
        self.norm.forward(x)
    }

    /// Projects hidden states to vocabulary logits `[batch, len, vocab]`.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, t, hd] = hidden.dims();
                hidden.reshape([b * t, hd]).matmul(self.embed_tokens.clone().transpose()).reshape([
                    b,
                    t,
                    self.vocab_size,
                ])
            }
        }
    }

    /// `Σ mask · −log p(label)` over all positions of hidden states `[batch, len, hidden]`, labels and mask
    /// `[batch, len]`: the training loss without the full-vocabulary logits in memory ([`crate::loss`]) when
    /// the output weight is dense without bias (tied embeddings or a plain lm_head), else through
    /// [`logits`](Self::logits). Gradients flow to the hidden states.
    pub fn nll_sum(&self, hidden: Tensor<3>, labels: Tensor<2, Int>, mask: Tensor<2>) -> Tensor<1> {
        let w_t = match &self.lm_head {
            None => Some(self.embed_tokens.clone().transpose()),
            Some(head) => head.dense_transposed(),
        };
        ops::loss::head_nll_sum(hidden, w_t, labels, mask, |h| self.logits(h))
    }

    /// Logits `[batch, len, vocab]` for token ids `[batch, len]`.
    pub fn forward(&self, ids: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.logits(self.forward_hidden(ids, cache))
    }

    /// A fresh KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }
}
