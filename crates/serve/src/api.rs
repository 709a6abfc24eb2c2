//! OpenAI's request shapes, checked: `POST /v1/chat/completions` and `POST /v1/completions` bodies become a
//! [`Prepared`] request (prompt tokens, adapter, sampling, stop strings) or one [`ApiError`]; and the text
//! of a generation, built token by token as `qlora generate` builds it ([`TextAssembler`]).

use std::sync::Arc;

use formats::tokenizer::{ChatMessage, TextTokenizer};
use sampling::SamplingConfig;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// Stop strings per request at most (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;
/// Characters per stop string at most.
pub const MAX_STOP_LEN: usize = 256;

/// The fields both endpoints share; unknown fields are ignored, as OpenAI-compatible servers do.
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    messages: Vec<RawMessage>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct RawMessage {
    role: String,
    #[serde(default)]
    content: Value,
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    prompt: Value,
    #[serde(flatten)]
    common: Common,
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// How a request's text becomes the model's input, by model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptForm {
    /// A decoder-only model continues its prompt: messages through the chat template, a completion prompt
    /// with the tokenizer's special tokens; prompt and completion share the context.
    Continue,
    /// An encoder–decoder model answers its encoder input, as `qlora chat` / `qlora generate` give it: the
    /// conversation rendered by [`data::seq2seq::conversation_source`] (the chat template if the tokenizer
    /// has one, else one message per line), or the completion prompt's text, then `eos`; the input and the
    /// answer may each be as long as the context.
    Source { eos: u32 },
}

/// What the server knows about the model to check requests against.
pub struct Limits<'a> {
    pub tokenizer: &'a TextTokenizer,
    /// Model names: the base first, then the adapters in order.
    pub models: &'a [String],
    pub form: PromptForm,
    /// Positions the model can attend to: prompt + completion ([`PromptForm::Continue`]), or each of them
    /// ([`PromptForm::Source`]).
    pub context: usize,
    pub vocab: usize,
    /// The largest `max_tokens` a request may ask for.
    pub max_tokens_cap: usize,
}

/// A checked request, ready for the scheduler.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// The model name as asked for.
    pub model: String,
    /// `None` for the base, else the adapter's index.
    pub adapter: Option<usize>,
    pub prompt: Vec<u32>,
    pub sampling: SamplingConfig,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            ApiError::invalid(format!("the body is not valid JSON: {e}"))
        } else {
            ApiError::invalid(format!("the request does not fit the API: {e}"))
        }
    })
}

/// The text of a message's `content`: a string, or an array of `{"type": "text", "text": ...}` parts.
fn content_text(content: &Value, index: usize) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid_param(
                            "messages",
                            "invalid_value",
                            format!("messages[{index}].content: only text parts are supported"),
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::invalid_param(
            "messages",
            "invalid_value",
            format!("messages[{index}].content must be a string or an array of text parts"),
        )),
    }
}

/// The prompt's token ids of a completions request: a string, a one-string array, or an array of token ids.
fn completion_prompt(prompt: &Value, limits: &Limits) -> Result<Vec<u32>, ApiError> {
    let bad = |m: &str| ApiError::invalid_param("prompt", "invalid_value", m.to_string());
    let encode = |text: &str| {
        let ids = match limits.form {
            PromptForm::Continue => limits.tokenizer.encode(text, true).map_err(|e| e.to_string()),
            PromptForm::Source { eos } => data::seq2seq::encode_with_eos(limits.tokenizer, text, eos, usize::MAX)
                .map(|(ids, _)| ids)
                .map_err(|e| e.to_string()),
        };
        ids.map_err(|e| ApiError::invalid(format!("tokenizing the prompt: {e}")))
    };
    match prompt {
        Value::String(s) => encode(s),
        Value::Array(items) if items.len() == 1 && items[0].is_string() => encode(items[0].as_str().unwrap_or("")),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => items
            .iter()
            .map(|v| match v.as_u64() {
                Some(id) if (id as usize) < limits.vocab => Ok(id as u32),
                _ => Err(bad(&format!("token {v} is not an id of the vocabulary (0..{})", limits.vocab))),
            })
            .collect(),
        Value::Array(items) if items.len() > 1 => {
            Err(bad("one prompt per request (batches of prompts are not supported)"))
        }
        _ => Err(bad("prompt must be a string or an array of token ids")),
    }
}

fn stop_strings(stop: &Option<Value>) -> Result<Vec<String>, ApiError> {
    let bad = |m: String| ApiError::invalid_param("stop", "invalid_value", m);
    let list = match stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(String::from).ok_or_else(|| bad("stop must be a string or strings".into())))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("stop must be a string or an array of strings".into())),
    };
    if list.len() > MAX_STOP_STRINGS {
        return Err(bad(format!("at most {MAX_STOP_STRINGS} stop strings")));
    }
    if list.iter().any(|s| s.is_empty() || s.chars().count() > MAX_STOP_LEN) {
        return Err(bad(format!("stop strings must have 1 to {MAX_STOP_LEN} characters")));
    }
    Ok(list)
}

/// Parses and checks a request body for `endpoint`. `default_seed` is used when the request has no seed.
pub fn prepare(endpoint: Endpoint, body: &[u8], limits: &Limits, default_seed: u64) -> Result<Prepared, ApiError> {
    let (common, prompt) = match endpoint {
        Endpoint::Chat => {
            let chat: ChatBody = parse(body)?;
            let common = chat.common;
            let adapter = model_index(&common.model, limits)?;
            if chat.messages.is_empty() {
                return Err(ApiError::invalid_param("messages", "invalid_value", "messages must not be empty"));
            }
            let messages = chat
                .messages
                .iter()
                .enumerate()
                .map(|(i, m)| Ok(ChatMessage::new(m.role.clone(), content_text(&m.content, i)?)))
                .collect::<Result<Vec<_>, ApiError>>()?;
            let tokenizer = limits.tokenizer;
            let ids = match limits.form {
                PromptForm::Continue => {
                    let text = tokenizer
                        .apply_chat_template(&messages, true)
                        .map_err(|e| ApiError::invalid(format!("applying the chat template: {e}")))?;
                    tokenizer.encode(&text, false).map_err(|e| e.to_string())
                }
                PromptForm::Source { eos } => data::seq2seq::conversation_source(&messages, tokenizer)
                    .and_then(|text| data::seq2seq::encode_with_eos(tokenizer, &text, eos, usize::MAX))
                    .map(|(ids, _)| ids)
                    .map_err(|e| e.to_string()),
            }
            .map_err(|e| ApiError::invalid(format!("tokenizing the messages: {e}")))?;
            (common, (adapter, ids))
        }
        Endpoint::Completion => {
            let completion: CompletionBody = parse(body)?;
            let adapter = model_index(&completion.common.model, limits)?;
            let ids = completion_prompt(&completion.prompt, limits)?;
            (completion.common, (adapter, ids))
        }
    };
    let (adapter, prompt) = prompt;
    if prompt.is_empty() {
        return Err(ApiError::invalid_param("prompt", "invalid_value", "the prompt has no tokens"));
    }
    if let Some(&id) = prompt.iter().find(|&&id| id as usize >= limits.vocab) {
        return Err(ApiError::invalid(format!("the tokenizer gave token {id}, outside the model's vocabulary")));
    }
    let room = match limits.form {
        PromptForm::Continue if prompt.len() >= limits.context => {
            return Err(ApiError::invalid_param(
                "messages",
                "context_length_exceeded",
                format!(
                    "the prompt has {} tokens; this model's context is {} tokens, which leaves no room for a completion",
                    prompt.len(),
                    limits.context
                ),
            ));
        }
        PromptForm::Continue => limits.context - prompt.len(),
        PromptForm::Source { .. } if prompt.len() > limits.context => {
            return Err(ApiError::invalid_param(
                "messages",
                "context_length_exceeded",
                format!("the input has {} tokens; this model reads at most {} tokens", prompt.len(), limits.context),
            ));
        }
        PromptForm::Source { .. } => limits.context,
    };
    if let Some(n) = common.n
        && n != 1
    {
        return Err(ApiError::invalid_param("n", "invalid_value", "only n = 1 is supported"));
    }
    let max_tokens = match common.max_completion_tokens.or(common.max_tokens) {
        Some(m) if m < 1 => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                "invalid_value",
                format!("max_tokens must be at least 1, not {m}"),
            ));
        }
        Some(m) if m as u64 > limits.max_tokens_cap as u64 => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                "invalid_value",
                format!("max_tokens {m} is over this server's cap of {}", limits.max_tokens_cap),
            ));
        }
        Some(m) if m as usize > room => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                "context_length_exceeded",
                match limits.form {
                    PromptForm::Continue => format!(
                        "the prompt ({} tokens) and max_tokens ({m}) exceed the model's context of {} tokens",
                        prompt.len(),
                        limits.context
                    ),
                    PromptForm::Source { .. } => {
                        format!("max_tokens {m} is over the {} tokens this model answers at most", limits.context)
                    }
                },
            ));
        }
        Some(m) => m as usize,
        None => room.min(limits.max_tokens_cap),
    };
    let temperature = common.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_param("temperature", "invalid_value", "temperature must be between 0 and 2"));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_param("top_p", "invalid_value", "top_p must be in (0, 1]"));
    }
    let stop = stop_strings(&common.stop)?;
    let sampling = SamplingConfig::new()
        .with_temperature(temperature)
        .with_top_p(top_p)
        .with_max_new_tokens(max_tokens)
        .with_seed(common.seed.map_or(default_seed, |s| s as u64));
    let stream = common.stream.unwrap_or(false);
    let include_usage = common.stream_options.is_some_and(|o| o.include_usage);
    Ok(Prepared { model: common.model, adapter, prompt, sampling, stop, stream, include_usage })
}

fn model_index(name: &str, limits: &Limits) -> Result<Option<usize>, ApiError> {
    match limits.models.iter().position(|m| m == name) {
        Some(0) => Ok(None),
        Some(i) => Ok(Some(i - 1)),
        None => Err(ApiError::unknown_model(name, limits.models)),
    }
}

/// The text of a generation as tokens arrive, as `qlora generate` makes it: the tokens decoded together
/// (special tokens skipped), cut at the first stop string; [`push`](Self::push) hands out the part that is
/// final (holding back a possibly incomplete character or stop-string prefix), so the deltas add up to the text.
pub struct TextAssembler {
    tokenizer: Arc<TextTokenizer>,
    stop: Vec<String>,
    tokens: Vec<u32>,
    text: String,
    sent: usize,
    stopped: bool,
}

impl TextAssembler {
    pub fn new(tokenizer: Arc<TextTokenizer>, stop: Vec<String>) -> Self {
        TextAssembler { tokenizer, stop, tokens: Vec::new(), text: String::new(), sent: 0, stopped: false }
    }

    /// Adds a token; returns the new final text (maybe empty). After a stop string, [`stopped`](Self::stopped)
    /// is true and the text ends before it.
    pub fn push(&mut self, token: u32) -> String {
        self.tokens.push(token);
        self.text = self.tokenizer.decode(&self.tokens, true).unwrap_or_default();
        if let Some(pos) = self.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(pos);
            self.stopped = true;
            return self.flush();
        }
        let hold = self.stop.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut safe = self.text.len().saturating_sub(hold);
        while safe > self.sent && !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        if safe > self.sent && !self.text[self.sent..safe].contains('\u{FFFD}') {
            let delta = self.text[self.sent..safe].to_string();
            self.sent = safe;
            return delta;
        }
        String::new()
    }

    /// The rest of the text not handed out yet.
    pub fn flush(&mut self) -> String {
        let delta = self.text[self.sent.min(self.text.len())..].to_string();
        self.sent = self.text.len();
        delta
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Tokens received (the completion's token count).
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn tokenizer() -> TextTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-train/model-nf4");
        TextTokenizer::from_dir(&dir).unwrap()
    }

    fn limits<'a>(tokenizer: &'a TextTokenizer, models: &'a [String]) -> Limits<'a> {
        Limits { tokenizer, models, form: PromptForm::Continue, context: 64, vocab: 260, max_tokens_cap: 32 }
    }

    fn check(body: &str) -> Result<Prepared, ApiError> {
        let t = tokenizer();
        let models = ["base".to_string(), "wordnet".to_string()];
        let endpoint = if body.contains("\"messages\"") { Endpoint::Chat } else { Endpoint::Completion };
        prepare(endpoint, body.as_bytes(), &limits(&t, &models), 7)
    }

    fn code(body: &str) -> (u16, Option<&'static str>) {
        let e = check(body).unwrap_err();
        (e.status.as_u16(), e.code)
    }

    #[test]
    fn good_requests() {
        let p = check(r#"{"model":"wordnet","messages":[{"role":"user","content":"hi"}],"temperature":0,"max_tokens":5,"stop":"x","seed":3,"extra":1}"#).unwrap();
        assert_eq!(p.adapter, Some(0));
        assert_eq!(p.sampling.max_new_tokens, 5);
        assert_eq!(p.sampling.temperature, 0.0);
        assert_eq!(p.sampling.seed, 3);
        assert_eq!(p.stop, ["x"]);
        let t = tokenizer();
        let text = t.apply_chat_template(&[ChatMessage::new("user", "hi")], true).unwrap();
        assert_eq!(p.prompt, t.encode(&text, false).unwrap(), "the chat template's tokens");
        let p = check(r#"{"model":"base","prompt":"hello","stream":true,"stream_options":{"include_usage":true}}"#)
            .unwrap();
        assert_eq!((p.adapter, p.stream, p.include_usage), (None, true, true));
        assert_eq!(p.prompt, t.encode("hello", true).unwrap());
        assert_eq!(p.sampling.max_new_tokens, 32, "the cap when the room is larger");
        assert_eq!(p.sampling.seed, 7, "the default seed");
        let p = check(r#"{"model":"base","prompt":[1,2,3],"max_tokens":2}"#).unwrap();
        assert_eq!(p.prompt, [1, 2, 3]);
        let p = check(r#"{"model":"base","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#).unwrap();
        let text = t.apply_chat_template(&[ChatMessage::new("user", "ab")], true).unwrap();
        assert_eq!(p.prompt, t.encode(&text, false).unwrap());
    }

    /// An encoder–decoder's input is what `qlora chat` / `qlora generate` give T5 (the conversation one
    /// message per line without a chat template, or the prompt's text; EOS appended), and the answer may be
    /// as long as the context whatever the input's length.
    #[test]
    fn an_encoder_decoder_reads_its_input_as_qlora_chat_does() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/t5/tiny-t5-gated");
        let t = TextTokenizer::from_dir(&dir).unwrap();
        let models = ["t5".to_string()];
        let limits = Limits {
            tokenizer: &t,
            models: &models,
            form: PromptForm::Source { eos: 1 },
            context: 64,
            vocab: 96,
            max_tokens_cap: 100,
        };
        let prepare = |endpoint, body: &str| prepare(endpoint, body.as_bytes(), &limits, 7);
        let messages =
            [ChatMessage::new("user", "ab c"), ChatMessage::new("assistant", "c ab"), ChatMessage::new("user", "de f")];
        let p = prepare(
            Endpoint::Chat,
            r#"{"model":"t5","messages":[{"role":"user","content":"ab c"},{"role":"assistant","content":"c ab"},{"role":"user","content":"de f"}]}"#,
        )
        .unwrap();
        let source = data::seq2seq::conversation_source(&messages, &t).unwrap();
        assert_eq!(source, "ab c\nc ab\nde f");
        assert_eq!(p.prompt, data::seq2seq::encode_with_eos(&t, &source, 1, usize::MAX).unwrap().0);
        assert_eq!(p.prompt.last(), Some(&1), "EOS ends the input");
        assert_eq!(p.sampling.max_new_tokens, 64, "the whole context for the answer");
        let p = prepare(Endpoint::Completion, r#"{"model":"t5","prompt":"hello","max_tokens":64}"#).unwrap();
        let mut want = t.encode("hello", false).unwrap();
        want.push(1);
        assert_eq!(p.prompt, want);
        let e = prepare(Endpoint::Completion, r#"{"model":"t5","prompt":"hello","max_tokens":65}"#).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
        let long = format!(r#"{{"model":"t5","prompt":"{}"}}"#, "word ".repeat(100));
        assert_eq!(prepare(Endpoint::Completion, &long).unwrap_err().code, Some("context_length_exceeded"));
    }

    #[test]
    fn bad_requests_are_clear_errors() {
        assert_eq!(code("{not json"), (400, None));
        assert_eq!(code(r#"{"model":"base"}"#), (400, None), "no prompt");
        assert_eq!(code(r#"{"model":"nope","prompt":"x"}"#), (404, Some("model_not_found")));
        assert_eq!(code(r#"{"model":"base","prompt":"x","max_tokens":0}"#), (400, Some("invalid_value")));
        assert_eq!(code(r#"{"model":"base","prompt":"x","max_tokens":-3}"#), (400, Some("invalid_value")));
        assert_eq!(code(r#"{"model":"base","prompt":"x","max_tokens":33}"#), (400, Some("invalid_value")), "cap");
        assert_eq!(code(r#"{"model":"base","prompt":"x","max_tokens":"many"}"#), (400, None));
        let long = format!(r#"{{"model":"base","prompt":"{}"}}"#, "word ".repeat(100));
        assert_eq!(code(&long), (400, Some("context_length_exceeded")));
        let near = format!(r#"{{"model":"base","prompt":[{}],"max_tokens":30}}"#, vec!["1"; 40].join(","));
        assert_eq!(code(&near), (400, Some("context_length_exceeded")), "prompt + max_tokens over the context");
        assert_eq!(code(r#"{"model":"base","prompt":[1,999]}"#), (400, Some("invalid_value")));
        assert_eq!(code(r#"{"model":"base","prompt":[]}"#), (400, Some("invalid_value")));
        assert_eq!(code(r#"{"model":"base","prompt":"x","temperature":3}"#), (400, Some("invalid_value")));
        assert_eq!(code(r#"{"model":"base","prompt":"x","top_p":0}"#), (400, Some("invalid_value")));
        assert_eq!(code(r#"{"model":"base","prompt":"x","n":2}"#), (400, Some("invalid_value")));
        assert_eq!(code(r#"{"model":"base","prompt":"x","stop":["a","b","c","d","e"]}"#), (400, Some("invalid_value")));
        assert_eq!(code(r#"{"model":"base","prompt":"x","stop":[""]}"#), (400, Some("invalid_value")));
        assert_eq!(code(r#"{"model":"base","messages":[]}"#), (400, Some("invalid_value")));
        assert_eq!(
            code(r#"{"model":"base","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#),
            (400, Some("invalid_value"))
        );
    }

    #[test]
    fn assembled_deltas_add_up_to_the_text_and_stop_strings_cut_it() {
        let t = Arc::new(tokenizer());
        let ids = t.encode("hello world, again", false).unwrap();
        let mut plain = TextAssembler::new(t.clone(), vec![]);
        let mut deltas: String = ids.iter().map(|&i| plain.push(i)).collect();
        deltas.push_str(&plain.flush());
        assert_eq!(deltas, "hello world, again");
        assert_eq!(plain.text(), deltas);
        let mut cut = TextAssembler::new(t, vec![", ag".into()]);
        let mut deltas = String::new();
        for &i in &ids {
            deltas.push_str(&cut.push(i));
            if cut.stopped() {
                break;
            }
        }
        assert!(cut.stopped());
        assert_eq!(deltas, "hello world");
        assert_eq!(cut.text(), "hello world");
    }
}
