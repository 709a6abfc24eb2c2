//! # data — instruction-tuning datasets
//!
//! Between `formats` (whose tokenizer and chat template it uses) and `train` in the stack
//! (nf4 / bf16-gemm → quant → ops → lora / optim → formats → llama, t5 → data → serve → train). Reads JSONL in five formats — Alpaca
//! (`instruction`/`input`/`output`, QLoRA's prompt), OASST1 message trees rendered as Guanaco's
//! `### Human: … ### Assistant: …`, chat `messages` through the model's chat template, plain `text` and
//! `{"input", "output"}` pairs — reporting malformed lines by number ([`records`]). [`tokenize`] turns examples into token ids with a target
//! mask (loss on the response only unless `train_on_source`), with QLoRA's source/target length limits.
//! [`batches`] orders each epoch (seeded shuffle that never depends on a library version, transformers'
//! group-by-length) and pads micro-batches. [`seq2seq`] does the same for encoder–decoder models (T5): source
//! to the encoder, target to the decoder. [`embedded`] ships the default dataset (WordNet 3.0 pairs).

pub mod batches;
pub mod embedded;
pub mod records;
pub mod seq2seq;
pub mod tokenize;

pub use batches::{Batch, BatchStream, DataCursor, OrderConfig, TokenCount, epoch_order};
pub use records::{DatasetFormat, Example, ReadReport, Turn, parse_jsonl, read_jsonl};
pub use seq2seq::{Seq2SeqBatch, Seq2SeqExample, Seq2SeqReport, tokenize_all_seq2seq, tokenize_seq2seq_example};
pub use tokenize::{Limits, TokenizeReport, TokenizedExample, tokenize_all, tokenize_example};

/// Everything that can be wrong with a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{file}:{line}: {reason}")]
    Line { file: String, line: usize, reason: String },
    #[error("{file}: no usable examples{}", if *.skipped > 0 { format!(" ({skipped} malformed lines skipped)") } else { String::new() })]
    Empty { file: String, skipped: usize },
    #[error("unknown dataset format {0}")]
    UnknownFormat(String),
    #[error("reading {file}: {reason}")]
    Io { file: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error(
        "no example has a target token within the length limits ({dropped} dropped): raise --target-max-len / --source-max-len"
    )]
    NothingToTrain { dropped: usize },
    #[error("not an encoder–decoder example: {0}")]
    NotSeq2Seq(String),
}

#[cfg(test)]
mod tests;
