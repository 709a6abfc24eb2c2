//! `qlora forward`, `qlora generate` and `qlora chat` with an encoder–decoder (T5 / Flan-T5 / mT5): the binary picks this
//! path when `--model` is an HF directory whose config.json says `model_type` `t5` or `mt5`.

use std::io::Write;
use std::path::Path;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use formats::tokenizer::ChatMessage;
use lora::weights::LoadOptions;
use quant::bnb::StoredTensor;
use quant::checkpoint::write_atomically;
use t5::LoadedT5;
use t5::generate::{SamplingConfig, StopReason, generate};

use crate::TrainError;
use crate::infer::TextStream;

/// Whether `spec` names a T5 checkpoint directory.
pub fn is_t5(spec: &str) -> bool {
    let path = Path::new(spec);
    path.is_dir() && t5::is_t5_dir(path)
}

/// Loads the T5 directory `spec` onto `device`, with the PEFT adapter `adapter` applied when given.
pub fn load(
    spec: &str,
    options: &LoadOptions,
    device: &Device,
    adapter: Option<&Path>,
) -> Result<LoadedT5, TrainError> {
    let source = formats::source::resolve(spec)?;
    let mut loaded = t5::load(&source, options, device)?;
    if let Some(dir) = adapter {
        let adapter = loaded.model.load_peft_adapter(dir)?;
        eprintln!("applied adapter {} ({} modules, r = {})", dir.display(), adapter.modules.len(), adapter.config.r);
    }
    Ok(loaded)
}

fn check_ids(loaded: &LoadedT5, ids: &[u32], what: &str) -> Result<(), TrainError> {
    if ids.is_empty() {
        return Err(TrainError::Input(format!("no {what} tokens to run")));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= loaded.config.vocab_size) {
        return Err(TrainError::Input(format!(
            "{what} token id {bad} is outside the vocabulary ({} tokens)",
            loaded.config.vocab_size
        )));
    }
    Ok(())
}

fn ids_tensor(ids: &[u32], device: &Device) -> Tensor<2, Int> {
    let values: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    Tensor::from_data(TensorData::new(values, [1, ids.len()]), device)
}

fn ids_stored(ids: &[u32]) -> StoredTensor {
    StoredTensor {
        dtype: safetensors::Dtype::I64,
        shape: vec![1, ids.len()],
        data: ids.iter().flat_map(|&i| i64::from(i).to_le_bytes()).collect(),
    }
}

/// Runs the model on encoder ids `source` and decoder ids `target` (which start with
/// `decoder_start_token_id`) and writes `input_ids` (I64 `[1, S]`), `decoder_input_ids` (I64 `[1, T]`) and
/// `logits` (F32 `[1, T, V]`) to a safetensors file, atomically.
pub fn forward_to_file(loaded: &LoadedT5, source: &[u32], target: &[u32], out: &Path) -> Result<(), TrainError> {
    check_ids(loaded, source, "encoder")?;
    check_ids(loaded, target, "decoder")?;
    let device = loaded.model.device();
    let logits = loaded.model.forward(ids_tensor(source, &device), ids_tensor(target, &device));
    let values: Vec<f32> = logits.cast(DType::F32).into_data().try_into_vec().expect("f32 logits");
    let logits = StoredTensor::f32(vec![1, target.len(), loaded.config.vocab_size], &values);
    let (input, decoder) = (ids_stored(source), ids_stored(target));
    let tensors = [
        ("input_ids".to_string(), &input),
        ("decoder_input_ids".to_string(), &decoder),
        ("logits".to_string(), &logits),
    ];
    let bytes = safetensors::serialize(tensors, None)
        .map_err(|e| TrainError::Input(format!("serializing {}: {e}", out.display())))?;
    write_atomically(out, &bytes)?;
    Ok(())
}

/// The encoder input for `messages`: with `chat`, the conversation as the training data renders it
/// ([`data::seq2seq::conversation_source`]: the chat template when the tokenizer has one, else one message
/// per line); without, the last message's text. EOS appended, as T5's tokenizer does.
pub fn source_ids(loaded: &LoadedT5, messages: &[ChatMessage], chat: bool) -> Result<Vec<u32>, TrainError> {
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .ok_or_else(|| TrainError::Input("the model directory has no tokenizer.json".into()))?;
    let text = match (chat, messages.last()) {
        (true, _) => data::seq2seq::conversation_source(messages, tokenizer)?,
        (false, Some(last)) => last.content.clone(),
        (false, None) => String::new(),
    };
    Ok(data::seq2seq::encode_with_eos(tokenizer, &text, loaded.config.eos_token_id, usize::MAX)?.0)
}

/// Generation from the encoder input `source` (EOS included), each token picked as `sampling` says,
/// stopping at EOS, at the first of `stop_strings` or after `sampling.max_new_tokens`; the text is written
/// to `out` as it comes when the model has a tokenizer (else the token ids at the end). Returns the text, the
/// new tokens and why it stopped.
pub fn generate_text(
    loaded: &LoadedT5,
    source: &[u32],
    sampling: &SamplingConfig,
    stop_strings: &[String],
    out: &mut dyn Write,
) -> Result<(String, Vec<u32>, StopReason), TrainError> {
    check_ids(loaded, source, "encoder")?;
    let c = &loaded.config;
    let (start, stop_ids) = (c.decoder_start_token_id, [c.eos_token_id]);
    match &loaded.tokenizer {
        Some(tokenizer) => {
            let mut stream = TextStream::new(tokenizer, stop_strings, out);
            let (_, stop) = generate(&loaded.model, source, start, sampling, &stop_ids, |id| stream.push(id))?;
            let (text, tokens) = stream.finish()?;
            Ok((text, tokens, stop))
        }
        None => {
            let (tokens, stop) = generate(&loaded.model, source, start, sampling, &stop_ids, |_| true)?;
            let text = tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            out.write_all(text.as_bytes()).map_err(|source| TrainError::Io { path: "<stdout>".into(), source })?;
            Ok((text, tokens, stop))
        }
    }
}
