//! `qlora forward`, `qlora generate` and `qlora chat`: running a model.

use std::io::{BufRead, Write};
use std::path::Path;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use formats::source::resolve;
use formats::tokenizer::{ChatMessage, TextTokenizer};
use llama::generate::{SamplingConfig, StopReason, generate};
use llama::{LoadOptions, LoadedModel, load};
use quant::bnb::StoredTensor;
use quant::checkpoint::write_atomically;

use crate::TrainError;

/// Resolves `spec` (HF dir, GGUF file, hub id, or `smollm2`) and loads it on the CPU (flex backend).
pub fn load_model(spec: &str, options: &LoadOptions) -> Result<LoadedModel, TrainError> {
    load_model_on(spec, options, &Device::flex())
}

/// [`load_model`] onto `device`.
pub fn load_model_on(spec: &str, options: &LoadOptions, device: &Device) -> Result<LoadedModel, TrainError> {
    let source = resolve(spec)?;
    Ok(load(&source, options, device)?)
}

/// Logits `[1, T, V]` (f32) for `ids`.
pub fn logits(loaded: &LoadedModel, ids: &[u32]) -> Result<Vec<f32>, TrainError> {
    check_ids(loaded, ids)?;
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(data, [1, ids.len()]), &loaded.model.device());
    let out = loaded.model.forward(input, None).cast(DType::F32);
    Ok(out.into_data().try_into_vec::<f32>().expect("f32 logits"))
}

fn check_ids(loaded: &LoadedModel, ids: &[u32]) -> Result<(), TrainError> {
    if ids.is_empty() {
        return Err(TrainError::Input("no tokens to run".into()));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= loaded.config.vocab_size) {
        return Err(TrainError::Input(format!(
            "token id {bad} is outside the vocabulary ({} tokens)",
            loaded.config.vocab_size
        )));
    }
    Ok(())
}

/// Runs the model on `ids` and writes `input_ids` (I64 `[1, T]`) and `logits` (F32 `[1, T, V]`) to a
/// safetensors file, atomically.
pub fn forward_to_file(loaded: &LoadedModel, ids: &[u32], out: &Path) -> Result<(), TrainError> {
    let values = logits(loaded, ids)?;
    let t = ids.len();
    let input = StoredTensor {
        dtype: safetensors::Dtype::I64,
        shape: vec![1, t],
        data: ids.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect(),
    };
    let logits = StoredTensor::f32(vec![1, t, loaded.config.vocab_size], &values);
    let bytes = safetensors::serialize([("input_ids".to_string(), &input), ("logits".to_string(), &logits)], None)
        .map_err(|e| TrainError::Input(format!("serializing {}: {e}", out.display())))?;
    write_atomically(out, &bytes)?;
    Ok(())
}

/// Parses `1,2,3` into token ids.
pub fn parse_token_list(text: &str) -> Result<Vec<u32>, TrainError> {
    text.split(',')
        .map(|t| {
            t.trim()
                .parse::<u32>()
                .map_err(|_| TrainError::Input(format!("`{t}` is not a token id (expected e.g. 1,2,3)")))
        })
        .collect()
}

/// What a generation call returns.
pub struct Generated {
    pub text: String,
    pub tokens: Vec<u32>,
    pub stop: StopReason,
}

/// Generates a continuation of `prompt_ids`, streaming text to `out` as it appears, stopping at the
/// model's stop tokens or at any of `stop_strings` (which are cut from the text).
pub fn generate_text(
    loaded: &LoadedModel,
    prompt_ids: &[u32],
    sampling: &SamplingConfig,
    stop_strings: &[String],
    out: &mut dyn Write,
) -> Result<Generated, TrainError> {
    check_ids(loaded, prompt_ids)?;
    let tokenizer = loaded.tokenizer()?;
    let stop_ids = tokenizer.stop_ids(&loaded.config.eos_token_ids);
    let mut stream = TextStream::new(tokenizer, stop_strings, out);
    let (_, stop) = generate(&loaded.model, prompt_ids, sampling, &stop_ids, |id| stream.push(id))?;
    let (text, tokens) = stream.finish()?;
    Ok(Generated { text, tokens, stop })
}

/// Generated tokens decoded as they come: writes the text that can no longer change (holding back an
/// incomplete UTF-8 character or the start of a stop string) and ends the text before the first stop string.
pub struct TextStream<'a> {
    tokenizer: &'a TextTokenizer,
    stop_strings: &'a [String],
    out: &'a mut dyn Write,
    tokens: Vec<u32>,
    text: String,
    printed: usize,
    io_error: Option<std::io::Error>,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a TextTokenizer, stop_strings: &'a [String], out: &'a mut dyn Write) -> Self {
        TextStream { tokenizer, stop_strings, out, tokens: Vec::new(), text: String::new(), printed: 0, io_error: None }
    }

    /// Takes the next token; false when generation should stop (a stop string appeared, or writing failed).
    pub fn push(&mut self, id: u32) -> bool {
        self.tokens.push(id);
        self.text = self.tokenizer.decode(&self.tokens, true).unwrap_or_default();
        if let Some(pos) = self.stop_strings.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(pos);
            return false;
        }
        let hold = self.stop_strings.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut safe = self.text.len().saturating_sub(hold);
        while safe > self.printed && !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        if safe > self.printed && !self.text[self.printed..safe].contains('\u{FFFD}') {
            if let Err(e) = self.out.write_all(&self.text.as_bytes()[self.printed..safe]).and_then(|_| self.out.flush())
            {
                self.io_error = Some(e);
                return false;
            }
            self.printed = safe;
        }
        true
    }

    /// Writes the rest; the whole text and the tokens.
    pub fn finish(self) -> Result<(String, Vec<u32>), TrainError> {
        let stdout_error = |source| TrainError::Io { path: "<stdout>".into(), source };
        if let Some(e) = self.io_error {
            return Err(stdout_error(e));
        }
        if self.text.len() > self.printed {
            self.out.write_all(&self.text.as_bytes()[self.printed..]).map_err(stdout_error)?;
        }
        Ok((self.text, self.tokens))
    }
}

/// Renders one user turn with the model's chat template (ready for the assistant's reply) and encodes it.
pub fn chat_prompt_ids(loaded: &LoadedModel, messages: &[ChatMessage]) -> Result<Vec<u32>, TrainError> {
    let tokenizer = loaded.tokenizer()?;
    let text = tokenizer.apply_chat_template(messages, true)?;
    Ok(tokenizer.encode(&text, false)?)
}

/// An interactive chat: reads user lines from `input`, streams the replies to `output`. `/reset` starts
/// over, `/exit` or end of input leaves.
pub fn chat_loop(
    loaded: &LoadedModel,
    sampling: &SamplingConfig,
    system: Option<&str>,
    input: &mut dyn BufRead,
    output: &mut dyn Write,
) -> Result<(), TrainError> {
    converse(system, input, output, |messages, out| {
        let ids = chat_prompt_ids(loaded, messages)?;
        Ok(generate_text(loaded, &ids, sampling, &[], out)?.text)
    })
}

/// The terminal conversation of `qlora chat` for any model: `reply` writes the model's answer to the
/// conversation so far as it comes, and returns its text.
pub fn converse(
    system: Option<&str>,
    input: &mut dyn BufRead,
    output: &mut dyn Write,
    mut reply: impl FnMut(&[ChatMessage], &mut dyn Write) -> Result<String, TrainError>,
) -> Result<(), TrainError> {
    let io = |source| TrainError::Io { path: "<terminal>".into(), source };
    let mut messages: Vec<ChatMessage> = system.map(|s| vec![ChatMessage::new("system", s)]).unwrap_or_default();
    writeln!(output, "chat with the model: /reset starts over, /exit (or Ctrl-D) leaves").map_err(io)?;
    loop {
        write!(output, "\n> ").map_err(io)?;
        output.flush().map_err(io)?;
        let mut line = String::new();
        if input.read_line(&mut line).map_err(io)? == 0 {
            writeln!(output).map_err(io)?;
            return Ok(());
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                messages.retain(|m| m.role == "system");
                writeln!(output, "(conversation cleared)").map_err(io)?;
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", line));
        let text = reply(&messages, output)?;
        writeln!(output).map_err(io)?;
        messages.push(ChatMessage::new("assistant", text.trim()));
    }
}
