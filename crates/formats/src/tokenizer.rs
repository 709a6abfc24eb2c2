//! Tokenizer and chat template: Hugging Face `tokenizers` for the text ↔ ids, minijinja for the chat
//! template rendered as transformers renders it (`trim_blocks`, `lstrip_blocks`, `raise_exception`,
//! `strftime_now`, `tojson`, Python string methods).

use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::FormatError;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A tokenizer with its special tokens and chat template.
pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

fn tok_err(file: &str, e: impl std::fmt::Display) -> FormatError {
    FormatError::Tokenizer { file: file.to_string(), reason: e.to_string() }
}

/// Runs a call into the `tokenizers` crate, turning a panic inside it (some malformed tokenizer.json files make
/// its deserializers panic instead of returning an error) into an error naming the file.
fn guard<T>(file: &str, f: impl FnOnce() -> T) -> Result<T, FormatError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let reason = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("the tokenizers library panicked");
        tok_err(file, format!("malformed tokenizer: {reason}"))
    })
}

/// A special token in tokenizer_config.json: a string, or `{"content": ...}`.
fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

impl TextTokenizer {
    /// Reads `tokenizer.json`, and `tokenizer_config.json` / `chat_template.jinja` where present.
    pub fn from_dir(dir: &Path) -> Result<Self, FormatError> {
        let path = dir.join("tokenizer.json");
        let file = path.display().to_string();
        if !path.exists() {
            return Err(tok_err(&file, "not found (an HF model directory needs tokenizer.json)"));
        }
        let inner = guard(&file, || tokenizers::Tokenizer::from_file(&path))?.map_err(|e| tok_err(&file, e))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|source| FormatError::Io { path: config_path.clone(), source })?;
            serde_json::from_str(&text).map_err(|e| tok_err(&config_path.display().to_string(), e))?
        } else {
            Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            Some(std::fs::read_to_string(&jinja).map_err(|source| FormatError::Io { path: jinja.clone(), source })?)
        } else {
            match config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(Value::Array(items)) => items
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(String::from),
                _ => None,
            }
        };
        Ok(TextTokenizer {
            inner,
            chat_template,
            bos_token: special_token(&config, "bos_token"),
            eos_token: special_token(&config, "eos_token"),
        })
    }

    /// The tokenizer and chat template stored in a GGUF file's metadata.
    pub fn from_gguf(file: &crate::gguf::GgufFile) -> Result<Self, FormatError> {
        let t = crate::gguf::tokenizer::tokenizer_from_gguf(file)?;
        Ok(TextTokenizer {
            inner: t.tokenizer,
            chat_template: t.chat_template,
            bos_token: t.bos_token,
            eos_token: t.eos_token,
        })
    }

    /// Token ids of `text`; `add_special_tokens` as transformers' argument of that name.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, FormatError> {
        let encoding =
            guard("tokenizer", || self.inner.encode(text, add_special_tokens))?.map_err(|e| tok_err("tokenizer", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, FormatError> {
        guard("tokenizer", || self.inner.decode(ids, skip_special_tokens))?.map_err(|e| tok_err("tokenizer", e))
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids that end generation: the EOS token, `<|im_end|>`, `<|eot_id|>`, `<|end_of_text|>`, `</s>`
    /// where the vocabulary has them, plus `extra`.
    pub fn stop_ids(&self, extra: &[u32]) -> Vec<u32> {
        let mut ids: Vec<u32> = extra.to_vec();
        let names = self.eos_token.iter().map(String::as_str).chain([
            "<|im_end|>",
            "<|eot_id|>",
            "<|end_of_text|>",
            "</s>",
            "<|endoftext|>",
        ]);
        for name in names {
            if let Some(id) = self.token_id(name)
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
        ids
    }

    /// Renders `messages` with the model's chat template, as `tokenizer.apply_chat_template(messages,
    /// tokenize=False, add_generation_prompt=...)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, FormatError> {
        let template =
            self.chat_template.as_deref().ok_or_else(|| tok_err("tokenizer", "the model has no chat template"))?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
        )
    }
}

/// Renders a Hugging Face chat template.
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String, FormatError> {
    let mut env = Environment::new();
    env.set_syntax(SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().expect("default delimiters"));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |message: String| -> Result<String, JinjaError> {
        Err(JinjaError::new(ErrorKind::InvalidOperation, message))
    });
    env.add_function("strftime_now", |format: String| -> String { strftime_now(&format) });
    let err = |e: JinjaError| FormatError::Tokenizer { file: "chat template".into(), reason: format!("{e:#}") };
    env.add_template("chat", template).map_err(err)?;
    let tmpl = env.get_template("chat").map_err(err)?;
    tmpl.render(context! {
        messages => Serde(messages),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
        tools => Serde(Value::Null),
    })
    .map_err(err)
}

/// Today's date in a strftime format, for templates that print it (only the common directives).
fn strftime_now(format: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    format
        .replace("%Y", &year.to_string())
        .replace("%m", &format!("{month:02}"))
        .replace("%d", &format!("{day:02}"))
        .replace("%B", MONTHS[(month - 1) as usize])
        .replace("%b", &MONTHS[(month - 1) as usize][..3])
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_like_transformers() {
        let out = render_chat_template(CHATML, &[ChatMessage::new("user", "Hi")], true, None, None).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let t = "{% if messages[0]['content'].strip().startswith('x') %}{{ raise_exception('no x') }}{% endif %}{{ messages[0]['content'].upper() }}";
        assert_eq!(render_chat_template(t, &[ChatMessage::new("user", " ab ")], false, None, None).unwrap(), " AB ");
        let e = render_chat_template(t, &[ChatMessage::new("user", "xy")], false, None, None).unwrap_err().to_string();
        assert!(e.contains("no x"), "{e}");
    }

    #[test]
    fn strftime_has_a_plausible_year() {
        let y: i64 = strftime_now("%Y").parse().unwrap();
        assert!(y >= 2024);
    }
}
