//! Generation: the encoder runs once, the decoder starts from `decoder_start_token_id` and extends one token
//! at a time through the self- and cross-attention caches, each token greedy or sampled
//! ([`sampling::pick`]: temperature, top-k, top-p, a repetition penalty over the decoder's tokens, as
//! transformers applies it to an encoder–decoder), stopping on a stop token (EOS), when the caller says so,
//! or after `max_new_tokens`.

use burn::tensor::{DType, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
pub use sampling::SamplingConfig;

use crate::{T5Error, T5Model};

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    StopToken,
    MaxTokens,
    Caller,
}

fn ids_tensor(model: &T5Model, ids: &[u32]) -> Tensor<2, Int> {
    let values: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    Tensor::<2, Int>::from_data(TensorData::new(values, [1, ids.len()]), &model.device())
}

fn check(model: &T5Model, ids: &[u32], what: &str) -> Result<(), T5Error> {
    if ids.is_empty() {
        return Err(T5Error::Generation(format!("the {what} is empty")));
    }
    match ids.iter().find(|&&id| id as usize >= model.vocab_size) {
        Some(&id) => Err(T5Error::TokenOutOfRange { id, vocab: model.vocab_size }),
        None => Ok(()),
    }
}

/// Greedy decoding of the encoder input `source` (token ids, EOS included as the tokenizer appends it)
/// from `decoder_start`. `use_cache: false` recomputes the whole decoder sequence each step (for checking
/// the cache). Returns the new tokens without the stop token.
pub fn generate_greedy(
    model: &T5Model,
    source: &[u32],
    decoder_start: u32,
    max_new_tokens: usize,
    stop_tokens: &[u32],
    use_cache: bool,
) -> Result<(Vec<u32>, StopReason), T5Error> {
    let config = SamplingConfig::new().with_max_new_tokens(max_new_tokens).with_no_cache(!use_cache);
    generate(model, source, decoder_start, &config, stop_tokens, |_| true)
}

/// Generates an answer to the encoder input `source` (EOS included) from `decoder_start`, each token
/// picked as `config` says. `on_token` sees each new token (before a stop token is dropped) and returns
/// false to stop. Returns the new tokens without the stop token.
pub fn generate(
    model: &T5Model,
    source: &[u32],
    decoder_start: u32,
    config: &SamplingConfig,
    stop_tokens: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<(Vec<u32>, StopReason), T5Error> {
    check(model, source, "encoder input")?;
    check(model, &[decoder_start], "decoder start")?;
    let mut rng = StdRng::seed_from_u64(config.seed);
    let encoded = model.encode(ids_tensor(model, source), None);
    let mut cache = model.new_cache();
    let mut decoded = vec![decoder_start];
    let mut generated = Vec::new();
    for _ in 0..config.max_new_tokens {
        let hidden = if config.no_cache {
            model.decode(ids_tensor(model, &decoded), &encoded, None, None)
        } else {
            let pending = &decoded[cache.len()..];
            model.decode(ids_tensor(model, pending), &encoded, None, Some(&mut cache))
        };
        let t = hidden.dims()[1];
        let logits = model.logits(hidden.narrow(1, t - 1, 1));
        let logits: Vec<f32> = logits.cast(DType::F32).into_data().try_into_vec().expect("f32 logits");
        let next = sampling::pick(logits, &decoded, config, &mut rng);
        if stop_tokens.contains(&next) {
            return Ok((generated, StopReason::StopToken));
        }
        generated.push(next);
        decoded.push(next);
        if !on_token(next) {
            return Ok((generated, StopReason::Caller));
        }
    }
    Ok((generated, StopReason::MaxTokens))
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;

    use super::*;
    use crate::config::tiny_test_config;

    /// The cached path generates the tokens that recomputing the whole sequence does, and the cached
    /// logits equal the uncached ones.
    #[test]
    fn the_cache_changes_nothing() {
        let device = Device::flex();
        device.seed(7);
        let model = tiny_test_config().init(&device);
        let source = [3u32, 9, 14, 2, 27, 5, 1];
        let (cached, _) = generate_greedy(&model, &source, 0, 8, &[], true).unwrap();
        let (plain, _) = generate_greedy(&model, &source, 0, 8, &[], false).unwrap();
        assert_eq!(cached, plain);
        assert_eq!(cached.len(), 8);

        let encoded = model.encode(ids_tensor(&model, &source), None);
        let all = [0u32, 4, 8, 15, 16];
        let full: Vec<f32> = model
            .logits(model.decode(ids_tensor(&model, &all), &encoded, None, None))
            .into_data()
            .try_into_vec()
            .unwrap();
        let mut cache = model.new_cache();
        let mut stepped = Vec::new();
        for (start, len) in [(0, 2), (2, 1), (3, 2)] {
            let h = model.decode(ids_tensor(&model, &all[start..start + len]), &encoded, None, Some(&mut cache));
            stepped.extend(model.logits(h).into_data().try_into_vec::<f32>().unwrap());
        }
        assert_eq!(cache.len(), 5);
        let worst = full.iter().zip(&stepped).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "{worst}");
    }

    /// Sampling is seeded: the same seed gives the same tokens, and at a high temperature the answer
    /// differs from the greedy one; top-k 1 is greedy at any temperature.
    #[test]
    fn sampling_is_seeded_and_top_k_one_is_greedy() {
        let device = Device::flex();
        device.seed(7);
        let model = tiny_test_config().init(&device);
        let source = [3u32, 9, 14, 2, 27, 5, 1];
        let (greedy, _) = generate_greedy(&model, &source, 0, 10, &[], true).unwrap();
        let hot = SamplingConfig::new().with_temperature(5.0).with_max_new_tokens(10).with_seed(3);
        let run = |c: &SamplingConfig| generate(&model, &source, 0, c, &[], |_| true).unwrap().0;
        assert_eq!(run(&hot), run(&hot));
        assert_ne!(run(&hot), greedy);
        assert_eq!(run(&hot.clone().with_top_k(1)), greedy);
        // The caller can stop it.
        let (first, stop) = generate(&model, &source, 0, &hot, &[], |_| false).unwrap();
        assert_eq!((first.len(), stop), (1, StopReason::Caller));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let model = tiny_test_config().init(&Device::flex());
        assert!(generate_greedy(&model, &[], 0, 4, &[], true).is_err());
        let e = generate_greedy(&model, &[1, 99], 0, 4, &[], true).unwrap_err().to_string();
        assert!(e.contains("99"), "{e}");
    }
}
