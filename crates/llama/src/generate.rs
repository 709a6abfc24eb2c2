//! Text generation through the KV cache: greedy, or sampled with temperature, top-k, top-p and a
//! repetition penalty (transformers' semantics), stopping on stop tokens or when the caller says so.

use burn::tensor::{Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
pub use sampling::{SamplingConfig, argmax, pick};

use crate::{LlamaError, LlamaModel};

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

#[cfg(test)]
mod tests {
    use super::*;

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
