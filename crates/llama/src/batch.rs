//! Several sequences in one forward pass, for serving: each sequence brings its own new tokens, KV cache
//! (so its own positions) and LoRA adapter; the base's products — the 4-bit ones included — run once over
//! the rows of all sequences, each adapter adds its low-rank term to its own rows
//! ([`lora::LoraLinear::forward_grouped`]), and attention runs per sequence over its own cache.
//!
//! Row for row this computes what [`LlamaModel::forward_hidden`] with a cache computes for one sequence
//! with that adapter attached (the same ops in the same order), so greedy decoding in a batch picks the
//! tokens `generate` picks alone.

use burn::tensor::{DType, Int, Tensor, TensorData};
use lora::AdapterGroups;

use crate::model::causal_mask;
use crate::{KvCache, LlamaError, LlamaModel, Rotary};

pub use lora::SideAdapter;

/// One sequence of a batched step: the tokens after its cached positions (the whole prompt at first, then
/// one token per step), its cache (grown by the step), and its adapter (`None`: the base alone).
pub struct BatchRow<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub adapter: Option<&'a SideAdapter>,
}

impl LlamaModel {
    /// Runs `rows` together and returns the logits of each row's last position, `[rows, vocab]` in f32.
    /// Rows with the same adapter that are next to each other share its products (order rows by adapter).
    pub fn forward_batch(&self, rows: &mut [BatchRow<'_>]) -> Result<Tensor<2>, LlamaError> {
        if rows.is_empty() {
            return Err(LlamaError::Generation("a batch needs at least one sequence".into()));
        }
        for row in rows.iter() {
            if row.tokens.is_empty() {
                return Err(LlamaError::Generation("a sequence in the batch has no new tokens".into()));
            }
            if let Some(&id) = row.tokens.iter().find(|&&id| id as usize >= self.vocab_size) {
                return Err(LlamaError::TokenOutOfRange { id, vocab: self.vocab_size });
            }
            if let Some(adapter) = row.adapter
                && adapter.modules.len() != self.layers.len() * 7
            {
                return Err(LlamaError::Generation(format!(
                    "an adapter with {} modules does not fit this model's {} linear layers",
                    adapter.modules.len(),
                    self.layers.len() * 7
                )));
            }
        }
        let device = self.device();
        let dtype = self.dtype();
        // Each sequence's rows of the flattened batch, and its rotary tables and mask.
        let mut spans = Vec::with_capacity(rows.len());
        let mut total = 0;
        for row in rows.iter() {
            spans.push(total..total + row.tokens.len());
            total += row.tokens.len();
        }
        let geometry: Vec<_> = rows
            .iter()
            .map(|row| {
                let (start, len) = (row.cache.len(), row.tokens.len());
                let (cos, sin) = self.rotary.tables(start, len, dtype, &device);
                (cos, sin, causal_mask(start, len, &device))
            })
            .collect();
        let groups = AdapterGroups::new(spans.iter().cloned().zip(rows.iter().map(|row| row.adapter)));
        let linear = |x: Tensor<2>, layer: &lora::LoraLinear, module: usize| groups.forward(x, layer, module);

        let ids: Vec<i64> = rows.iter().flat_map(|r| r.tokens.iter().map(|&t| t as i64)).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, total]), &device);
        let mut x = burn::tensor::module::embedding(self.embed_tokens.clone(), ids);
        for (l, layer) in self.layers.iter().enumerate() {
            let m = l * 7; // q, k, v, o, gate, up, down: the order of `linears()`
            let a = &layer.self_attn;
            let (h, kvh, d) = (a.num_heads, a.num_kv_heads, a.head_dim);
            let normed = layer.input_layernorm.forward(x.clone()).reshape([total, self.hidden_size]);
            let q = linear(normed.clone(), &a.q_proj, m);
            let k = linear(normed.clone(), &a.k_proj, m + 1);
            let v = linear(normed, &a.v_proj, m + 2);
            let mut outs = Vec::with_capacity(rows.len());
            for ((row, span), (cos, sin, mask)) in rows.iter_mut().zip(&spans).zip(&geometry) {
                let t = span.len();
                let part = |p: &Tensor<2>, heads: usize| {
                    p.clone().slice([span.clone(), 0..heads * d]).reshape([1, t, heads, d]).swap_dims(1, 2)
                };
                let qi = Rotary::apply(part(&q, h), cos, sin);
                let ki = Rotary::apply(part(&k, kvh), cos, sin);
                let out = a.attend_cached(qi, ki, part(&v, kvh), mask, row.cache, l);
                outs.push(out.swap_dims(1, 2).reshape([t, h * d]));
            }
            let attended = linear(Tensor::cat(outs, 0), &a.o_proj, m + 3);
            let hidden = x + attended.reshape([1, total, self.hidden_size]);
            let mlp = &layer.mlp;
            let normed = layer.post_attention_layernorm.forward(hidden.clone()).reshape([total, self.hidden_size]);
            let gate = linear(normed.clone(), &mlp.gate_proj, m + 4);
            let up = linear(normed, &mlp.up_proj, m + 5);
            let down = linear(ops::fused::swiglu(gate, up), &mlp.down_proj, m + 6);
            x = hidden + down.reshape([1, total, self.hidden_size]);
        }
        for (row, span) in rows.iter_mut().zip(&spans) {
            row.cache.len += span.len();
        }
        let hidden = self.norm.forward(x);
        let hd = self.hidden_size;
        let last: Vec<i64> = spans.iter().map(|s| (s.end - 1) as i64).collect();
        let n = last.len();
        let last = Tensor::<1, Int>::from_data(TensorData::new(last, [n]), &device);
        let picked = hidden.reshape([total, hd]).select(0, last).reshape([1, n, hd]);
        Ok(self.logits(picked).cast(DType::F32).reshape([n, self.vocab_size]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::argmax;
    use burn::tensor::Device;
    use std::path::{Path, PathBuf};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    /// The tiny fixture model, 4-bit (NF4 + DQ on load), optionally with a PEFT adapter attached.
    fn model(adapter: Option<&Path>) -> LlamaModel {
        let options = crate::LoadOptions { dtype: DType::F32, quant: Some(quant::QuantConfig::new()) };
        let (_, mut model) = crate::load_hf(&fixtures().join("tiny-llama-f32"), &options, &Device::flex()).unwrap();
        if let Some(dir) = adapter {
            model.load_peft_adapter(dir).unwrap();
        }
        model
    }

    fn rows_of(t: Tensor<2>) -> Vec<Vec<f32>> {
        let [n, v] = t.dims();
        let all = t.into_data().try_into_vec::<f32>().unwrap();
        (0..n).map(|i| all[i * v..(i + 1) * v].to_vec()).collect()
    }

    /// Greedy decoding of `prompt` alone on `model` (adapter attached), through the ordinary cached forward:
    /// the logits of each step.
    fn alone(model: &LlamaModel, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
        let mut cache = model.new_cache();
        let mut pending = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..steps {
            let ids = Tensor::<2, Int>::from_data(
                TensorData::new(pending.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, pending.len()]),
                &model.device(),
            );
            let logits = model.forward(ids, Some(&mut cache)).cast(DType::F32);
            let [_, t, v] = logits.dims();
            let last = logits.slice([0..1, t - 1..t, 0..v]).reshape([1, v]);
            let row = rows_of(last).remove(0);
            pending = vec![argmax(&row)];
            out.push(row);
        }
        out
    }

    /// A batched decode with two adapters and the base in the same steps (a sequence joining mid-way, one
    /// leaving early) gives each sequence the logits of its own single-adapter decode, and so its tokens.
    #[test]
    fn batched_multi_adapter_decode_equals_single_decodes() {
        let adapters = [fixtures().join("peft/adapter-tiny-llama"), fixtures().join("peft/adapter-tiny-llama-rslora")];
        let base = model(None);
        let side: Vec<SideAdapter> = adapters.iter().map(|dir| base.read_side_adapter(dir).unwrap().1).collect();
        // (prompt, adapter index, first step, steps)
        let plan: [(&[u32], Option<usize>, usize, usize); 4] = [
            (&[1, 5, 9, 2, 77], Some(0), 0, 8),
            (&[3, 3, 200], None, 0, 5),
            (&[10, 11], Some(1), 0, 8),
            (&[42, 17, 99, 4, 8, 15, 16], Some(0), 3, 5),
        ];
        let expected: Vec<Vec<Vec<f32>>> = plan
            .iter()
            .map(|(prompt, adapter, _, steps)| alone(&model(adapter.map(|i| adapters[i].as_path())), prompt, *steps))
            .collect();
        let mut caches: Vec<KvCache> = plan.iter().map(|_| base.new_cache()).collect();
        let mut pending: Vec<Vec<u32>> = plan.iter().map(|p| p.0.to_vec()).collect();
        let mut got: Vec<Vec<Vec<f32>>> = plan.iter().map(|_| Vec::new()).collect();
        let mut worst = 0.0f32;
        for step in 0..8 {
            let active: Vec<usize> =
                (0..plan.len()).filter(|&i| step >= plan[i].2 && got[i].len() < plan[i].3).collect();
            let mut rows: Vec<BatchRow> = Vec::new();
            for (i, cache) in caches.iter_mut().enumerate() {
                if active.contains(&i) {
                    rows.push(BatchRow { tokens: &pending[i], cache, adapter: plan[i].1.map(|a| &side[a]) });
                }
            }
            let logits = rows_of(base.forward_batch(&mut rows).unwrap());
            for (&i, row) in active.iter().zip(logits) {
                let want = &expected[i][got[i].len()];
                let diff = row.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                worst = worst.max(diff);
                assert_eq!(argmax(&row), argmax(want), "sequence {i}, step {}", got[i].len());
                pending[i] = vec![argmax(&row)];
                got[i].push(row);
            }
        }
        for (i, p) in plan.iter().enumerate() {
            assert_eq!(got[i].len(), p.3, "sequence {i} ran all its steps");
        }
        println!("batched vs single decode: max |Δlogit| = {worst:e}");
        assert!(worst <= 1e-5, "batched logits differ from the single-sequence ones by {worst:e}");
        // The adapters matter: the adapter sequences' logits differ from the base's on the same prompt.
        let plain = alone(&base, plan[0].0, 1);
        assert!(plain[0] != expected[0][0], "adapter 0 changes the logits");
    }

    #[test]
    fn bad_batches_are_errors() {
        let base = model(None);
        let mut cache = base.new_cache();
        assert!(base.forward_batch(&mut []).is_err());
        let err = base.forward_batch(&mut [BatchRow { tokens: &[999], cache: &mut cache, adapter: None }]);
        assert!(matches!(err, Err(LlamaError::TokenOutOfRange { id: 999, .. })));
        assert!(base.forward_batch(&mut [BatchRow { tokens: &[], cache: &mut cache, adapter: None }]).is_err());
        let wrong = SideAdapter { modules: vec![None] };
        let mut rows = [BatchRow { tokens: &[1], cache: &mut cache, adapter: Some(&wrong) }];
        assert!(base.forward_batch(&mut rows).is_err());
    }
}
