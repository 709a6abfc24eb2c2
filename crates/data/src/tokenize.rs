//! Examples → token ids with a per-token "is a target" flag (the loss mask), QLoRA's way.

use formats::tokenizer::{ChatMessage, TextTokenizer};
use serde::{Deserialize, Serialize};

use crate::DataError;
use crate::records::{Example, Turn};

/// Length limits and what the loss covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Most tokens of the prompt (QLoRA's `source_max_len`).
    pub source_max_len: usize,
    /// Most tokens of the response (QLoRA's `target_max_len`).
    pub target_max_len: usize,
    /// Also compute the loss on the prompt.
    pub train_on_source: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { source_max_len: 384, target_max_len: 128, train_on_source: false }
    }
}

/// A tokenized example: `ids[t]` is a target (predicted from `ids[..t]`) where `target[t]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedExample {
    pub ids: Vec<u32>,
    pub target: Vec<bool>,
}

impl TokenizedExample {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Tokens the loss is computed on (the first token is never predicted).
    pub fn target_count(&self) -> usize {
        self.target.iter().skip(1).filter(|&&t| t).count()
    }
}

/// What tokenizing a dataset produced.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizeReport {
    pub examples: Vec<TokenizedExample>,
    /// Examples cut to the limits.
    pub truncated: usize,
    /// Examples left without any target token (e.g. the prompt filled the limit); not used.
    pub dropped: usize,
}

fn encode(tokenizer: &TextTokenizer, text: &str) -> Result<Vec<u32>, DataError> {
    tokenizer.encode(text, false).map_err(|e| DataError::Tokenizer(e.to_string()))
}

/// Tokenizes one example; `None` when nothing is left to learn from. Also returns whether it was truncated.
pub fn tokenize_example(
    example: &Example,
    tokenizer: &TextTokenizer,
    limits: &Limits,
) -> Result<(Option<TokenizedExample>, bool), DataError> {
    let bos = tokenizer.bos_token.as_deref().unwrap_or("");
    let eos = tokenizer.eos_token.as_deref().unwrap_or("");
    let (mut ids, mut target, truncated) = match example {
        Example::SourceTarget { source, target } => {
            // QLoRA's collator: tokenize `bos + source` and `target + eos` separately, each truncated to its limit.
            let mut src = encode(tokenizer, &format!("{bos}{source}"))?;
            let mut tgt = encode(tokenizer, &format!("{target}{eos}"))?;
            let truncated = src.len() > limits.source_max_len || tgt.len() > limits.target_max_len;
            src.truncate(limits.source_max_len);
            tgt.truncate(limits.target_max_len);
            let mask: Vec<bool> =
                std::iter::repeat_n(false, src.len()).chain(std::iter::repeat_n(true, tgt.len())).collect();
            src.extend(tgt);
            (src, mask, truncated)
        }
        Example::Segments { segments, add_bos } => {
            let mut ids = Vec::new();
            let mut mask = Vec::new();
            let last = segments.len() - 1;
            for (i, (text, trained)) in segments.iter().enumerate() {
                let mut text = text.clone();
                if i == 0 && *add_bos {
                    text.insert_str(0, bos);
                }
                if i == last {
                    text.push_str(eos);
                }
                let part = encode(tokenizer, &text)?;
                mask.extend(std::iter::repeat_n(*trained, part.len()));
                ids.extend(part);
            }
            let max = limits.source_max_len + limits.target_max_len;
            let truncated = ids.len() > max;
            ids.truncate(max);
            mask.truncate(max);
            (ids, mask, truncated)
        }
        Example::Chat { turns } => {
            let (ids, mask) = chat_tokens(turns, tokenizer)?;
            let max = limits.source_max_len + limits.target_max_len;
            let truncated = ids.len() > max;
            (ids.into_iter().take(max).collect(), mask.into_iter().take(max).collect(), truncated)
        }
    };
    if limits.train_on_source {
        target.iter_mut().for_each(|t| *t = true);
    }
    ids.shrink_to_fit();
    let example = TokenizedExample { ids, target };
    Ok((if example.target_count() == 0 { None } else { Some(example) }, truncated))
}

/// Chat messages through the model's template; the assistant turns' text (from after the generation prompt
/// to the end of the turn, including its end-of-turn tokens) are the targets.
fn chat_tokens(turns: &[Turn], tokenizer: &TextTokenizer) -> Result<(Vec<u32>, Vec<bool>), DataError> {
    let messages: Vec<ChatMessage> = turns.iter().map(|t| ChatMessage::new(&t.role, &t.content)).collect();
    let render = |upto: usize, generation_prompt: bool| {
        tokenizer
            .apply_chat_template(&messages[..upto], generation_prompt)
            .map_err(|e| DataError::Template(e.to_string()))
    };
    let mut segments: Vec<(String, bool)> = Vec::new();
    let mut done = String::new();
    for (i, turn) in turns.iter().enumerate() {
        if turn.role != "assistant" {
            continue;
        }
        let prompt = render(i, true)?;
        let through = render(i + 1, false)?;
        if !prompt.starts_with(&done) || !through.starts_with(&prompt) {
            return Err(DataError::Template(
                "the chat template does not render conversations prefix-first, so the assistant turns cannot be located".into(),
            ));
        }
        segments.push((prompt[done.len()..].to_string(), false));
        segments.push((through[prompt.len()..].to_string(), true));
        done = through;
    }
    let full = render(turns.len(), false)?;
    if full.len() > done.len() && full.starts_with(&done) {
        segments.push((full[done.len()..].to_string(), false));
    }
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for (text, trained) in segments.iter().filter(|(t, _)| !t.is_empty()) {
        let part = encode(tokenizer, text)?;
        mask.extend(std::iter::repeat_n(*trained, part.len()));
        ids.extend(part);
    }
    Ok((ids, mask))
}

/// Tokenizes every example.
pub fn tokenize_all(
    examples: &[Example],
    tokenizer: &TextTokenizer,
    limits: &Limits,
) -> Result<TokenizeReport, DataError> {
    let mut out = Vec::with_capacity(examples.len());
    let (mut truncated, mut dropped) = (0, 0);
    for example in examples {
        let (tokenized, was_truncated) = tokenize_example(example, tokenizer, limits)?;
        truncated += usize::from(was_truncated);
        match tokenized {
            Some(t) => out.push(t),
            None => dropped += 1,
        }
    }
    if out.is_empty() {
        return Err(DataError::NothingToTrain { dropped });
    }
    Ok(TokenizeReport { examples: out, truncated, dropped })
}
