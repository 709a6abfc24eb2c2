//! Examples for an encoder–decoder model (T5): the source goes to the encoder, the target is what the decoder
//! learns to produce, as transformers' `T5ForConditionalGeneration(labels=…)` trains it.
//!
//! - Source and target are each tokenized with the end-of-sequence token appended (as T5's tokenizer does),
//!   and cut to `source_max_len` / `target_max_len` keeping that final EOS (transformers' truncation).
//! - The decoder reads `decoder_start_token_id` followed by the target without its last token (transformers'
//!   `_shift_right`) and predicts every target token, EOS included: the loss is on the target only.
//! - `{"input", "output"}` and Alpaca lines give source and target directly. A chat gives the conversation
//!   before its last assistant turn as the source (through the tokenizer's chat template when it has one,
//!   else the messages' texts one per line) and that turn as the target. OASST threads likewise. Plain
//!   `text` has no source/target split and is refused.

use formats::tokenizer::{ChatMessage, TextTokenizer};

use crate::DataError;
use crate::batches::TokenCount;
use crate::records::Example;
use crate::tokenize::Limits;

/// One example as token ids: the encoder's input and the decoder's target, each ending with EOS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seq2SeqExample {
    pub source: Vec<u32>,
    pub target: Vec<u32>,
}

impl TokenCount for Seq2SeqExample {
    fn token_count(&self) -> usize {
        self.source.len() + self.target.len()
    }
}

/// What tokenizing a dataset for an encoder–decoder produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Seq2SeqReport {
    pub examples: Vec<Seq2SeqExample>,
    /// Examples cut to the limits.
    pub truncated: usize,
}

/// The source and target texts of an example.
fn texts(example: &Example, tokenizer: &TextTokenizer) -> Result<(String, String), DataError> {
    match example {
        Example::SourceTarget { source, target } => Ok((source.clone(), target.clone())),
        Example::Chat { turns } => {
            let last = turns.iter().rposition(|t| t.role == "assistant").ok_or_else(|| {
                DataError::NotSeq2Seq("a conversation without an assistant turn has no target".into())
            })?;
            let context: Vec<ChatMessage> =
                turns[..last].iter().map(|t| ChatMessage::new(&t.role, &t.content)).collect();
            Ok((conversation_source(&context, tokenizer)?, turns[last].content.clone()))
        }
        Example::Segments { segments, .. } => {
            let last = segments
                .iter()
                .rposition(|(_, trained)| *trained)
                .ok_or_else(|| DataError::NotSeq2Seq("a conversation without a trained reply has no target".into()))?;
            if last == 0 {
                return Err(DataError::NotSeq2Seq(
                    "plain `text` lines have no source/target split: an encoder–decoder model needs \
                     {\"input\", \"output\"}, Alpaca or chat lines"
                        .into(),
                ));
            }
            let source: String = segments[..last].iter().map(|(text, _)| text.as_str()).collect();
            Ok((source, segments[last].0.clone()))
        }
    }
}

/// The encoder's text for a conversation whose next reply is wanted: the messages through the tokenizer's
/// chat template, ready for the assistant's turn, when it has one; else their texts, one per line.
pub fn conversation_source(messages: &[ChatMessage], tokenizer: &TextTokenizer) -> Result<String, DataError> {
    if tokenizer.chat_template.is_some() {
        tokenizer.apply_chat_template(messages, true).map_err(|e| DataError::Template(e.to_string()))
    } else {
        Ok(messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"))
    }
}

/// `text`'s ids followed by `eos`, at most `max` ids in all (the EOS kept); and whether it was cut.
pub fn encode_with_eos(
    tokenizer: &TextTokenizer,
    text: &str,
    eos: u32,
    max: usize,
) -> Result<(Vec<u32>, bool), DataError> {
    let mut ids = tokenizer.encode(text, false).map_err(|e| DataError::Tokenizer(e.to_string()))?;
    let keep = max.max(1) - 1;
    let truncated = ids.len() > keep;
    ids.truncate(keep);
    ids.push(eos);
    Ok((ids, truncated))
}

/// Tokenizes one example for an encoder–decoder model; also returns whether it was cut to the limits.
pub fn tokenize_seq2seq_example(
    example: &Example,
    tokenizer: &TextTokenizer,
    limits: &Limits,
) -> Result<(Seq2SeqExample, bool), DataError> {
    let eos = tokenizer.eos_token.as_deref().and_then(|t| tokenizer.token_id(t)).ok_or_else(|| {
        DataError::Tokenizer("the tokenizer has no end-of-sequence token to end source and target".into())
    })?;
    let (source, target) = texts(example, tokenizer)?;
    let (source, cut_source) = encode_with_eos(tokenizer, &source, eos, limits.source_max_len)?;
    let (target, cut_target) = encode_with_eos(tokenizer, &target, eos, limits.target_max_len)?;
    Ok((Seq2SeqExample { source, target }, cut_source || cut_target))
}

/// Tokenizes every example for an encoder–decoder model; the first that cannot be one stops with its
/// 1-based position.
pub fn tokenize_all_seq2seq(
    examples: &[Example],
    tokenizer: &TextTokenizer,
    limits: &Limits,
) -> Result<Seq2SeqReport, DataError> {
    let mut out = Vec::with_capacity(examples.len());
    let mut truncated = 0;
    for (i, example) in examples.iter().enumerate() {
        let (tokenized, cut) = tokenize_seq2seq_example(example, tokenizer, limits).map_err(|e| match e {
            DataError::NotSeq2Seq(why) => DataError::NotSeq2Seq(format!("example {}: {why}", i + 1)),
            other => other,
        })?;
        truncated += usize::from(cut);
        out.push(tokenized);
    }
    if out.is_empty() {
        return Err(DataError::NothingToTrain { dropped: 0 });
    }
    Ok(Seq2SeqReport { examples: out, truncated })
}

/// A padded encoder–decoder micro-batch, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Seq2SeqBatch {
    pub batch: usize,
    /// Encoder length (the longest source).
    pub source_len: usize,
    /// `[batch, source_len]`, right-padded with the pad id.
    pub source_ids: Vec<u32>,
    /// `[batch, source_len]`: true at padding (no position attends to it).
    pub source_padding: Vec<bool>,
    /// Decoder length (the longest target).
    pub target_len: usize,
    /// `[batch, target_len]`: the decoder start token, then the target shifted right; pad id after the end.
    pub decoder_ids: Vec<u32>,
    /// `[batch, target_len]`: the target token each decoder position predicts; 0 where unused.
    pub labels: Vec<u32>,
    /// `[batch, target_len]`: 1.0 where `labels` counts in the loss.
    pub label_mask: Vec<f32>,
    /// Number of target tokens (sum of `label_mask`).
    pub targets: usize,
}

impl Seq2SeqBatch {
    /// Pads `examples`: sources with `pad_id` (masked), decoder inputs start with `decoder_start_id`.
    pub fn new(examples: &[&Seq2SeqExample], pad_id: u32, decoder_start_id: u32) -> Seq2SeqBatch {
        let batch = examples.len();
        let source_len = examples.iter().map(|e| e.source.len()).max().unwrap_or(0);
        let target_len = examples.iter().map(|e| e.target.len()).max().unwrap_or(0);
        let mut source_ids = vec![pad_id; batch * source_len];
        let mut source_padding = vec![true; batch * source_len];
        let mut decoder_ids = vec![pad_id; batch * target_len];
        let mut labels = vec![0u32; batch * target_len];
        let mut label_mask = vec![0.0f32; batch * target_len];
        let mut targets = 0;
        for (b, e) in examples.iter().enumerate() {
            let row = b * source_len;
            source_ids[row..row + e.source.len()].copy_from_slice(&e.source);
            source_padding[row..row + e.source.len()].iter_mut().for_each(|p| *p = false);
            let row = b * target_len;
            for (t, &label) in e.target.iter().enumerate() {
                decoder_ids[row + t] = if t == 0 { decoder_start_id } else { e.target[t - 1] };
                labels[row + t] = label;
                label_mask[row + t] = 1.0;
            }
            targets += e.target.len();
        }
        Seq2SeqBatch {
            batch,
            source_len,
            source_ids,
            source_padding,
            target_len,
            decoder_ids,
            labels,
            label_mask,
            targets,
        }
    }
}
