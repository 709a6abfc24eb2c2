//! Several sequences in one step, for serving: each sequence brings its own LoRA adapter (held beside the
//! model, [`lora::SideAdapter`]) and its own caches; the base's products — the 4-bit ones included — run once
//! over the rows of all sequences and each adapter adds its low-rank term to its own rows
//! ([`lora::AdapterGroups`]), while attention runs per sequence.
//!
//! A sequence's first step brings its encoder input: the encoder runs over the new sequences together, their
//! cross-attention keys and values go into their caches, and the decoder starts from the given decoder
//! tokens (`decoder_start_token_id`). Later steps bring decoder tokens only. Row for row this computes what
//! [`T5Model::encode`] and [`T5Model::decode`] with a cache compute for one sequence with that adapter
//! attached (the same ops in the same order), so greedy decoding in a batch picks the tokens
//! [`crate::generate::generate`] picks alone. (In f16, the overflow clamp after each sub-layer looks at the
//! whole batch, where transformers looks at one sequence.)

use std::ops::Range;
use std::path::Path;

use burn::tensor::{DType, Int, Tensor, TensorData};
use lora::peft::PeftAdapter;
use lora::{AdapterGroups, LoraError, LoraLinear, SideAdapter, attach};

use crate::model::{Attention, FeedForward, clamp_f16};
use crate::{T5Cache, T5Error, T5Model};

/// One sequence of a batched step.
pub struct BatchRow<'a> {
    /// The encoder input (EOS included) on the sequence's first step, when its cache is empty; `None` after.
    pub source: Option<&'a [u32]>,
    /// The decoder tokens after the cached positions: `decoder_start_token_id` at first, then one per step.
    pub tokens: &'a [u32],
    /// Grown by the step (and given the cross-attention keys and values on the first).
    pub cache: &'a mut T5Cache,
    /// `None`: the base alone.
    pub adapter: Option<&'a SideAdapter>,
}

/// Where each layer's linears sit in [`T5Model::linears`]: an attention's q, k, v, o, then the
/// feed-forward's `wi` (or `wi_0`, `wi_1`) and `wo`.
#[derive(Clone, Copy)]
struct ModuleIndex {
    ff: usize,
    encoder_layers: usize,
}

impl ModuleIndex {
    fn encoder(&self, layer: usize) -> usize {
        layer * (4 + self.ff)
    }

    fn decoder(&self, layer: usize) -> usize {
        self.encoder(self.encoder_layers) + layer * (8 + self.ff)
    }
}

/// Each sequence's rows of a flattened batch of `lens`.
fn spans(lens: impl Iterator<Item = usize>) -> Vec<Range<usize>> {
    let mut total = 0;
    lens.map(|len| {
        total += len;
        total - len..total
    })
    .collect()
}

fn ids_tensor(ids: Vec<i64>, device: &burn::tensor::Device) -> Tensor<2, Int> {
    let n = ids.len();
    Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), device)
}

/// The linears of one batch: the base once over all rows, each adapter on its own rows.
struct Linears<'a> {
    groups: AdapterGroups<'a>,
    rows: usize,
}

impl Linears<'_> {
    /// `layer`, the `module`-th linear, over `x` `[1, rows, in]` → `[1, rows, out]`.
    fn apply(&self, x: Tensor<3>, layer: &LoraLinear, module: usize) -> Tensor<3> {
        let [_, rows, d] = x.dims();
        let y = self.groups.forward(x.reshape([rows, d]), layer, module);
        let out = y.dims()[1];
        y.reshape([1, self.rows, out])
    }

    /// The feed-forward block (`first`: the module index of its `wi` / `wi_0`).
    fn feed_forward(&self, x: Tensor<3>, ff: &FeedForward, first: usize) -> Tensor<3> {
        let gate = ff.wi_1.as_ref().map(|wi_1| self.apply(x.clone(), wi_1, first + 1));
        let wo = first + 1 + usize::from(ff.wi_1.is_some());
        self.apply(ff.hidden(self.apply(x, &ff.wi_0, first), gate), &ff.wo, wo)
    }
}

/// One sequence's rows of `p` `[1, rows, heads·d_kv]` as heads `[1, heads, len, d_kv]`.
fn part(a: &Attention, p: &Tensor<3>, span: &Range<usize>) -> Tensor<4> {
    let width = p.dims()[2];
    a.heads(p.clone().slice([0..1, span.clone(), 0..width]))
}

impl T5Model {
    /// Reads a PEFT adapter directory for this model without attaching it (for serving several adapters on
    /// one base); every module in it must exist with matching shapes.
    pub fn read_side_adapter(&self, dir: &Path) -> Result<(PeftAdapter, SideAdapter), LoraError> {
        attach::read_side_adapter(self.linears(), dir, &self.device())
    }

    fn module_index(&self) -> ModuleIndex {
        ModuleIndex { ff: 2 + usize::from(self.encoder[0].ff.wi_1.is_some()), encoder_layers: self.encoder.len() }
    }

    fn check_row(&self, row: &BatchRow<'_>, modules: usize) -> Result<(), T5Error> {
        let encoded = row.cache.cross_kv.first().is_some_and(Option::is_some);
        match (row.source, encoded) {
            (Some([]), _) => return Err(T5Error::Generation("a sequence in the batch has an empty source".into())),
            (Some(_), true) => {
                return Err(T5Error::Generation("a sequence brings a source but its cache is encoded already".into()));
            }
            (None, false) => {
                return Err(T5Error::Generation("a new sequence in the batch brings no source to encode".into()));
            }
            _ => {}
        }
        if row.tokens.is_empty() {
            return Err(T5Error::Generation("a sequence in the batch has no new decoder tokens".into()));
        }
        let ids = row.source.unwrap_or_default().iter().chain(row.tokens);
        if let Some(&id) = ids.into_iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(T5Error::TokenOutOfRange { id, vocab: self.vocab_size });
        }
        if let Some(adapter) = row.adapter
            && adapter.modules.len() != modules
        {
            return Err(T5Error::Generation(format!(
                "an adapter with {} modules does not fit this model's {modules} linear layers",
                adapter.modules.len()
            )));
        }
        Ok(())
    }

    /// Runs `rows` together and returns the logits of each row's last decoder position, `[rows, vocab]` in
    /// f32. Rows with the same adapter that are next to each other share its products (order rows by
    /// adapter).
    pub fn forward_batch(&self, rows: &mut [BatchRow<'_>]) -> Result<Tensor<2>, T5Error> {
        if rows.is_empty() {
            return Err(T5Error::Generation("a batch needs at least one sequence".into()));
        }
        let modules = self.linears().len();
        for row in rows.iter() {
            self.check_row(row, modules)?;
        }
        let index = self.module_index();
        self.encode_new(rows, index);

        let device = self.device();
        let spans = spans(rows.iter().map(|r| r.tokens.len()));
        let total = spans.last().map_or(0, |s| s.end);
        let linears = Linears {
            groups: AdapterGroups::new(spans.iter().cloned().zip(rows.iter().map(|r| r.adapter))),
            rows: total,
        };
        let biases: Vec<Tensor<4>> = rows.iter().map(|r| self.decoder_bias(r.cache.len, r.tokens.len())).collect();
        let ids = rows.iter().flat_map(|r| r.tokens.iter().map(|&t| i64::from(t))).collect();
        let mut x = burn::tensor::module::embedding(self.shared.clone(), ids_tensor(ids, &device));
        for (l, layer) in self.decoder.iter().enumerate() {
            let m = index.decoder(l);
            let a = &layer.self_attention;
            let normed = layer.self_attention_norm.forward(x.clone());
            let q = linears.apply(normed.clone(), &a.q, m);
            let k = linears.apply(normed.clone(), &a.k, m + 1);
            let v = linears.apply(normed, &a.v, m + 2);
            let mut outs = Vec::with_capacity(rows.len());
            for ((row, span), bias) in rows.iter_mut().zip(&spans).zip(&biases) {
                let (k, v) = (part(a, &k, span), part(a, &v, span));
                let slot = &mut row.cache.self_kv[l];
                let kv = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                    None => (k, v),
                };
                *slot = Some(kv.clone());
                outs.push(a.attend(part(a, &q, span), kv, bias));
            }
            let h = clamp_f16(x + linears.apply(Tensor::cat(outs, 1), &a.o, m + 3));

            let c = &layer.cross_attention;
            let q = linears.apply(layer.cross_attention_norm.forward(h.clone()), &c.q, m + 4);
            let mut outs = Vec::with_capacity(rows.len());
            for (row, span) in rows.iter().zip(&spans) {
                let kv = row.cache.cross_kv[l].clone().expect("encoded above");
                let bias = Tensor::<4>::zeros([1, 1, 1, kv.0.dims()[2]], &device);
                outs.push(c.attend(part(c, &q, span), kv, &bias));
            }
            let h = clamp_f16(h + linears.apply(Tensor::cat(outs, 1), &c.o, m + 7));
            let ff = linears.feed_forward(layer.ff_norm.forward(h.clone()), &layer.ff, m + 8);
            x = clamp_f16(h + ff);
        }
        for (row, span) in rows.iter_mut().zip(&spans) {
            row.cache.len += span.len();
        }
        let hidden = self.decoder_final_norm.forward(x);
        let last: Vec<i64> = spans.iter().map(|s| (s.end - 1) as i64).collect();
        let n = last.len();
        let last = Tensor::<1, Int>::from_data(TensorData::new(last, [n]), &device);
        let picked = hidden.select(1, last);
        Ok(self.logits(picked).cast(DType::F32).reshape([n, self.vocab_size]))
    }

    /// Runs the encoder over the rows that bring a source (together) and puts every decoder layer's
    /// cross-attention keys and values of their encoder output into their caches.
    fn encode_new(&self, rows: &mut [BatchRow<'_>], index: ModuleIndex) {
        let new: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].source.is_some()).collect();
        if new.is_empty() {
            return;
        }
        let sources: Vec<&[u32]> = new.iter().map(|&i| rows[i].source.unwrap_or_default()).collect();
        let spans = spans(sources.iter().map(|s| s.len()));
        let total = spans.last().map_or(0, |s| s.end);
        let linears = Linears {
            groups: AdapterGroups::new(spans.iter().cloned().zip(new.iter().map(|&i| rows[i].adapter))),
            rows: total,
        };
        let biases: Vec<Tensor<4>> = sources.iter().map(|s| self.encoder_bias(s.len())).collect();
        let ids = sources.iter().flat_map(|s| s.iter().map(|&t| i64::from(t))).collect();
        let mut x = burn::tensor::module::embedding(self.shared.clone(), ids_tensor(ids, &self.device()));
        for (l, layer) in self.encoder.iter().enumerate() {
            let m = index.encoder(l);
            let a = &layer.self_attention;
            let normed = layer.self_attention_norm.forward(x.clone());
            let q = linears.apply(normed.clone(), &a.q, m);
            let k = linears.apply(normed.clone(), &a.k, m + 1);
            let v = linears.apply(normed, &a.v, m + 2);
            let outs = spans
                .iter()
                .zip(&biases)
                .map(|(span, bias)| a.attend(part(a, &q, span), (part(a, &k, span), part(a, &v, span)), bias))
                .collect();
            let h = clamp_f16(x + linears.apply(Tensor::cat(outs, 1), &a.o, m + 3));
            let ff = linears.feed_forward(layer.ff_norm.forward(h.clone()), &layer.ff, m + 4);
            x = clamp_f16(h + ff);
        }
        let encoded = self.encoder_final_norm.forward(x);
        for (l, layer) in self.decoder.iter().enumerate() {
            let (c, m) = (&layer.cross_attention, index.decoder(l));
            let k = linears.apply(encoded.clone(), &c.k, m + 5);
            let v = linears.apply(encoded.clone(), &c.v, m + 6);
            for (&i, span) in new.iter().zip(&spans) {
                rows[i].cache.cross_kv[l] = Some((part(c, &k, span), part(c, &v, span)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use burn::tensor::Device;

    use super::*;
    use crate::generate::{SamplingConfig, generate};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/t5")
    }

    /// The gated fixture model, NF4 + DQ on load, optionally with a PEFT adapter attached.
    fn model(adapter: Option<&Path>) -> T5Model {
        let options = crate::LoadOptions { dtype: DType::F32, quant: Some(quant::QuantConfig::new()) };
        let (_, mut model) = crate::load_hf(&fixtures().join("tiny-t5-gated"), &options, &Device::flex()).unwrap();
        if let Some(dir) = adapter {
            model.load_peft_adapter(dir).unwrap();
        }
        model
    }

    /// A second adapter: the fixture's with every lora_B scaled by -1.5 (written to `dir`).
    fn scaled_adapter(dir: &Path) {
        let mut adapter = lora::peft::read_peft_adapter(&fixtures().join("adapter-tiny-t5-gated")).unwrap();
        for stored in adapter.modules.values_mut() {
            stored.b.0.iter_mut().for_each(|x| *x *= -1.5);
        }
        let task = lora::peft::TaskType::Seq2SeqLm;
        lora::peft::write_peft_adapter(dir, &adapter.config, None, &adapter.modules, task).unwrap();
    }

    fn rows_of(t: Tensor<2>) -> Vec<Vec<f32>> {
        let [n, v] = t.dims();
        let all = t.into_data().try_into_vec::<f32>().unwrap();
        (0..n).map(|i| all[i * v..(i + 1) * v].to_vec()).collect()
    }

    /// Greedy decoding of `source` alone through `generate` (adapter attached): the tokens.
    fn alone(model: &T5Model, source: &[u32], steps: usize) -> Vec<u32> {
        let config = SamplingConfig::new().with_max_new_tokens(steps);
        generate(model, source, 0, &config, &[], |_| true).unwrap().0
    }

    /// A batched decode with two adapters and the base in the same steps (sequences joining mid-way, one
    /// leaving early, sources of different lengths encoded together) gives each sequence the tokens of its
    /// own single-adapter generation, and the logits of its own cached decode.
    #[test]
    fn batched_multi_adapter_decode_equals_single_decodes() {
        let second = tempfile::tempdir().unwrap();
        scaled_adapter(second.path());
        let dirs = [fixtures().join("adapter-tiny-t5-gated"), second.path().to_path_buf()];
        let base = model(None);
        let side: Vec<SideAdapter> = dirs.iter().map(|d| base.read_side_adapter(d).unwrap().1).collect();
        // (source, adapter, first step, steps); the last source is longer than max_distance (16).
        let long: Vec<u32> = (0..23).map(|i| (i * 7 + 3) % 90 + 2).collect();
        let plan: [(&[u32], Option<usize>, usize, usize); 5] = [
            (&[5, 9, 2, 77, 1], Some(0), 0, 8),
            (&[3, 3, 60, 1], None, 0, 5),
            (&[10, 11, 1], Some(1), 0, 8),
            (&[42, 17, 19, 4, 8, 15, 16, 1], Some(0), 2, 6),
            (&long, Some(1), 3, 5),
        ];
        let singles: Vec<T5Model> = (0..3).map(|i| model(if i == 0 { None } else { Some(&dirs[i - 1]) })).collect();
        let single = |adapter: Option<usize>| &singles[adapter.map_or(0, |a| a + 1)];
        let expected: Vec<Vec<u32>> =
            plan.iter().map(|(source, adapter, _, steps)| alone(single(*adapter), source, *steps)).collect();
        assert_ne!(alone(&base, plan[0].0, 8), expected[0], "adapter 0 changes the tokens");
        assert_ne!(alone(single(Some(1)), plan[0].0, 8), expected[0], "the two adapters differ");

        let mut caches: Vec<T5Cache> = plan.iter().map(|_| base.new_cache()).collect();
        let mut pending: Vec<Vec<u32>> = plan.iter().map(|_| vec![0]).collect();
        let mut got: Vec<Vec<u32>> = plan.iter().map(|_| Vec::new()).collect();
        // Each sequence alone, step by step through its own cache, for the logits.
        let mut solo: Vec<(T5Cache, Tensor<3>)> = plan
            .iter()
            .map(|(source, adapter, ..)| {
                let m = single(*adapter);
                let ids = source.iter().map(|&t| i64::from(t)).collect();
                (m.new_cache(), m.encode(ids_tensor(ids, &m.device()), None))
            })
            .collect();
        let mut worst = 0.0f32;
        for step in 0..9 {
            // Rows of one adapter next to each other, as the server orders them.
            let mut active: Vec<usize> =
                (0..plan.len()).filter(|&i| step >= plan[i].2 && got[i].len() < plan[i].3).collect();
            active.sort_by_key(|&i| plan[i].1.map_or(0, |a| a + 1));
            if active.is_empty() {
                continue;
            }
            let mut slots: Vec<Option<&mut T5Cache>> = caches.iter_mut().map(Some).collect();
            let mut rows: Vec<BatchRow> = Vec::new();
            for &i in &active {
                let source = got[i].is_empty().then_some(plan[i].0);
                let cache = slots[i].take().unwrap();
                rows.push(BatchRow { source, tokens: &pending[i], cache, adapter: plan[i].1.map(|a| &side[a]) });
            }
            let logits = rows_of(base.forward_batch(&mut rows).unwrap());
            for (&i, row) in active.iter().zip(logits) {
                let m = single(plan[i].1);
                let (cache, encoded) = &mut solo[i];
                let ids = pending[i].iter().map(|&t| i64::from(t)).collect();
                let hidden = m.decode(ids_tensor(ids, &m.device()), encoded, None, Some(cache));
                let want: Vec<f32> = m.logits(hidden).into_data().try_into_vec().unwrap();
                worst = row.iter().zip(&want).fold(worst, |w, (a, b)| w.max((a - b).abs()));
                let next = sampling::argmax(&row);
                pending[i] = vec![next];
                got[i].push(next);
            }
        }
        for (i, p) in plan.iter().enumerate() {
            assert_eq!(got[i], expected[i], "sequence {i} (adapter {:?}) batched vs alone", p.1);
        }
        println!("batched vs single decode: max |Δlogit| = {worst:e}");
        assert!(worst <= 1e-5, "batched logits differ from the single-sequence ones by {worst:e}");
    }

    #[test]
    fn bad_batches_are_errors() {
        let base = model(None);
        let mut cache = base.new_cache();
        let mut row =
            |source: Option<&'static [u32]>, tokens: &'static [u32], adapter: Option<&'static SideAdapter>| {
                let mut rows = [BatchRow { source, tokens, cache: &mut cache, adapter }];
                base.forward_batch(&mut rows).map(|_| ()).unwrap_err().to_string()
            };
        assert!(row(None, &[0], None).contains("no source"));
        assert!(row(Some(&[]), &[0], None).contains("empty source"));
        assert!(row(Some(&[3, 1]), &[], None).contains("no new decoder tokens"));
        assert!(row(Some(&[3, 500]), &[0], None).contains("500"));
        let wrong: &'static SideAdapter = Box::leak(Box::new(SideAdapter { modules: vec![None] }));
        assert!(row(Some(&[3, 1]), &[0], Some(wrong)).contains("does not fit"));
        assert!(base.forward_batch(&mut []).is_err());
        // Once encoded, a sequence may not bring a source again.
        let mut rows = [BatchRow { source: Some(&[3, 1]), tokens: &[0], cache: &mut cache, adapter: None }];
        base.forward_batch(&mut rows).unwrap();
        let mut rows = [BatchRow { source: Some(&[3, 1]), tokens: &[5], cache: &mut cache, adapter: None }];
        assert!(base.forward_batch(&mut rows).unwrap_err().to_string().contains("encoded already"));
    }
}
