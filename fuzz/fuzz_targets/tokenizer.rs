//! Tokenizer loading (tokenizer.json, tokenizer_config.json with its chat template) and using it.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    common::init();
    let parts = common::parts(data);
    let fixture = common::fixtures().join("tiny-train/model-nf4");
    let tokenizer = std::fs::read(fixture.join("tokenizer.json")).unwrap();
    let config = std::fs::read(fixture.join("tokenizer_config.json")).unwrap();
    let (tokenizer, config): (&[u8], &[u8]) = match parts.as_slice() {
        [one] if one.windows(13).any(|w| w == b"chat_template") => (&tokenizer, one),
        [one] => (one, &config),
        [tokenizer, config, ..] => (tokenizer, config),
        [] => return,
    };
    let dir = common::dir_with(&[("tokenizer.json", tokenizer), ("tokenizer_config.json", config)]);
    if let Ok(t) = formats::tokenizer::TextTokenizer::from_dir(dir.path()) {
        if let Ok(ids) = t.encode("Hello <s> wörld", true) {
            let _ = t.decode(&ids, false);
        }
        let messages = [formats::tokenizer::ChatMessage::new("system", "s"), formats::tokenizer::ChatMessage::new("user", "u")];
        let _ = t.apply_chat_template(&messages, true);
        let _ = t.stop_ids(&[]);
    }
});
