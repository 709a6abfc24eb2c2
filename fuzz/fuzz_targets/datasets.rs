//! Every dataset format: JSONL parsing (stop and skip modes), tokenization, batching.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

#[path = "common.rs"]
mod common;

fn tokenizer() -> &'static formats::tokenizer::TextTokenizer {
    static T: OnceLock<formats::tokenizer::TextTokenizer> = OnceLock::new();
    T.get_or_init(|| formats::tokenizer::TextTokenizer::from_dir(&common::fixtures().join("tiny-train/model-nf4")).expect("fixture tokenizer"))
}

fuzz_target!(|data: &[u8]| {
    common::init();
    let text = String::from_utf8_lossy(data);
    for format in [data::DatasetFormat::Auto, data::DatasetFormat::Alpaca, data::DatasetFormat::Oasst, data::DatasetFormat::Chat, data::DatasetFormat::Text] {
        for skip in [false, true] {
            let Ok(report) = data::parse_jsonl(&text, "fuzz.jsonl", format, skip) else { continue };
            let limits = data::Limits { source_max_len: 64, target_max_len: 32, train_on_source: data.len() % 2 == 0 };
            if let Ok(tokenized) = data::tokenize_all(&report.examples, tokenizer(), &limits) {
                let refs: Vec<&data::TokenizedExample> = tokenized.examples.iter().take(4).collect();
                let _ = data::Batch::new(&refs, 0);
            }
        }
    }
});
