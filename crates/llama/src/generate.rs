//! Text generation through the KV cache: greedy, or sampled with temperature, top-k, top-p and a
//! repetition penalty (transformers' semantics), stopping on stop tokens or when the caller says so.

use burn::config::Config;
use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{LlamaError, LlamaModel};

/// How to pick each next token. The defaults are greedy decoding.
#[derive(Config, Debug, PartialEq)]
pub struct SamplingConfig {
    /// 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    #[config(default = 0.0)]
    pub temperature: f64,
    /// Keep only the k most likely tokens (0: off).
    #[config(default = 0)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches top_p (1.0: off).
    #[config(default = 1.0)]
    pub top_p: f64,
    /// > 1 discourages tokens already in the context (transformers' rule: divide positive logits,
    /// > multiply negative ones).
    #[config(default = 1.0)]
    pub repetition_penalty: f64,
    #[config(default = 128)]
    pub max_new_tokens: usize,
    #[config(default = 42)]
    pub seed: u64,
    /// Recompute the whole sequence each step instead of using the KV cache (for checking the cache).
    #[config(default = false)]
    pub no_cache: bool,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    StopToken,
    MaxTokens,
    Caller,
}

/// Generates after `prompt`. `on_token` sees each new token (before a stop token is dropped) and returns
/// false to stop (e.g. when a stop string appeared). Returns the new tokens, without the stop token.
pub fn generate(
    model: &LlamaModel,
    prompt: &[u32],
    config: &SamplingConfig,
    stop_tokens: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<(Vec<u32>, StopReason), LlamaError> {
    if prompt.is_empty() {
        return Err(LlamaError::Generation("the prompt is empty".into()));
    }
    if let Some(&id) = prompt.iter().find(|&&id| id as usize >= model.vocab_size) {
        return Err(LlamaError::TokenOutOfRange { id, vocab: model.vocab_size });
    }
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut cache = model.new_cache();
    let mut context: Vec<u32> = prompt.to_vec();
    let mut generated = Vec::new();
    let mut pending: Vec<u32> = prompt.to_vec();
    for _ in 0..config.max_new_tokens {
        let logits = if config.no_cache {
            last_logits(model, &context, None)
        } else {
            last_logits(model, &pending, Some(&mut cache))
        };
        let next = pick(logits, &context, config, &mut rng);
        if stop_tokens.contains(&next) {
            return Ok((generated, StopReason::StopToken));
        }
        generated.push(next);
        context.push(next);
        pending = vec![next];
        if !on_token(next) {
            return Ok((generated, StopReason::Caller));
        }
    }
    Ok((generated, StopReason::MaxTokens))
}

fn last_logits(model: &LlamaModel, ids: &[u32], cache: Option<&mut crate::KvCache>) -> Vec<f32> {
    let device = model.device();
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(data, [1, ids.len()]), &device);
    let hidden = model.forward_hidden(input, cache);
    let [_, t, h] = hidden.dims();
    let last = hidden.narrow(1, t - 1, 1).reshape([1, 1, h]);
    model.logits(last).cast(burn::tensor::DType::F32).into_data().try_into_vec::<f32>().expect("f32 logits")
}

/// Applies the penalty, temperature, top-k and top-p to `logits` and picks a token.
pub fn pick(mut logits: Vec<f32>, context: &[u32], config: &SamplingConfig, rng: &mut impl Rng) -> u32 {
    if config.repetition_penalty != 1.0 {
        let p = config.repetition_penalty as f32;
        let mut seen = std::collections::HashSet::new();
        for &t in context {
            if seen.insert(t) {
                let l = &mut logits[t as usize];
                *l = if *l < 0.0 { *l * p } else { *l / p };
            }
        }
    }
    if config.temperature <= 0.0 {
        return argmax(&logits);
    }
    let t = config.temperature as f32;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if config.top_k > 0 {
        order.truncate(config.top_k);
    }
    let max = logits[order[0]] / t;
    let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i] / t - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if config.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= config.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut r: f64 = rng.random();
    for (p, &i) in probs.iter().zip(&order) {
        if r < *p {
            return i as u32;
        }
        r -= p;
    }
    order[order.len() - 1] as u32
}

/// Index of the largest logit (the first one on ties, as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_penalty() {
        let mut rng = StdRng::seed_from_u64(0);
        let c = SamplingConfig::new();
        assert_eq!(pick(vec![0.1, 3.0, 2.0], &[], &c, &mut rng), 1);
        let penalised = SamplingConfig::new().with_repetition_penalty(2.0);
        assert_eq!(pick(vec![0.1, 3.0, 2.0], &[1], &penalised, &mut rng), 2);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut rng = StdRng::seed_from_u64(0);
        let c = SamplingConfig::new().with_temperature(1.5).with_top_k(1);
        for _ in 0..20 {
            assert_eq!(pick(vec![0.1, 3.0, 2.9], &[], &c, &mut rng), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let mut rng = StdRng::seed_from_u64(1);
        let c = SamplingConfig::new().with_temperature(1.0).with_top_p(0.5);
        for _ in 0..50 {
            assert_eq!(pick(vec![5.0, 0.0, 0.0, 0.0], &[], &c, &mut rng), 0);
        }
    }

    /// `qlora generate --dtype f16` used to panic in the fused ops ("fused ops run in f32 or bf16"): an f16
    /// model (the tiny fixture, NF4 on load) now generates, and greedily picks the f32 model's tokens.
    #[test]
    fn an_f16_model_generates_what_the_f32_model_does() {
        use burn::tensor::{DType, Device};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama-f32");
        let device = Device::flex();
        let run = |dtype: DType| {
            let options = crate::LoadOptions { dtype, quant: Some(quant::QuantConfig::new()) };
            let (_, model) = crate::load_hf(&dir, &options, &device).unwrap();
            assert_eq!(model.dtype(), dtype);
            let config = SamplingConfig::new().with_max_new_tokens(6);
            generate(&model, &[1, 5, 9, 2], &config, &[], |_| true).unwrap().0
        };
        let (half, full) = (run(DType::F16), run(DType::F32));
        assert_eq!(half.len(), 6);
        assert_eq!(half, full, "greedy tokens in f16 vs f32");
    }
}
