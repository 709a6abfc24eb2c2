//! # sampling — the next token from a vector of logits
//!
//! At the bottom of the stack beside `splitmix` (no model, no tensor): greedy decoding, or sampling with
//! temperature, top-k, top-p and a repetition penalty with transformers' semantics, from a seeded
//! generator. Both model families (`llama`, `t5`) and the server (`serve`) pick tokens through [`pick`], so
//! the same settings and seed give the same tokens everywhere.

use burn::config::Config;
use rand::Rng;

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
    use rand::SeedableRng;
    use rand::rngs::StdRng;

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
}
