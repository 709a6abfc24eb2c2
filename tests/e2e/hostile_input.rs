//! Inputs the fuzzers found (fuzz/, `cargo xtask fuzz`), kept as regression tests: each must give a clear
//! error, never a panic. Inputs with several files join them with the fuzz targets' separator.

use qlora_tests::fixtures_dir;

const SEPARATOR: &[u8] = b"\n--8<--\n";

fn parts(name: &str) -> Vec<Vec<u8>> {
    let data = std::fs::read(fixtures_dir().join("regressions").join(name)).unwrap();
    let mut out = Vec::new();
    let mut rest = data.as_slice();
    while let Some(i) = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        out.push(rest[..i].to_vec());
        rest = &rest[i + SEPARATOR.len()..];
    }
    out.push(rest.to_vec());
    out
}

fn dir_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    dir
}

/// tokenizers 0.22 panics (instead of failing) on a decoder entry it cannot parse; our loader reports it.
#[test]
fn tokenizer_json_that_makes_the_tokenizers_crate_panic_is_an_error() {
    let p = parts("tokenizer-decoder-panic.bin");
    let dir = dir_with(&[("tokenizer.json", &p[0]), ("tokenizer_config.json", &p[1])]);
    let err = formats::tokenizer::TextTokenizer::from_dir(dir.path()).err().expect("an error, not a tokenizer");
    let text = err.to_string();
    assert!(text.contains("tokenizer.json") && text.contains("malformed tokenizer"), "{text}");
}

/// The fuzzers start from valid inputs, so that mutations reach past the first checks: the GGUF seed (written
/// by gguf-py, `fuzz/make_gguf_seed.py`) loads as a model with its tokenizer and chat template.
#[test]
fn the_gguf_fuzz_seed_is_a_loadable_model() {
    let path = fixtures_dir().join("../../fuzz/seeds/gguf/tiny.gguf");
    let loaded = llama::load(
        &formats::source::ModelSource::Gguf(path),
        &llama::LoadOptions::default(),
        &burn::tensor::Device::flex(),
    )
    .unwrap();
    assert_eq!((loaded.config.vocab_size, loaded.config.hidden_size, loaded.config.num_hidden_layers), (261, 8, 1));
    let tokenizer = loaded.tokenizer().unwrap();
    assert_eq!(tokenizer.encode("hi", false).unwrap().len(), 2);
    assert_eq!(tokenizer.encode("ab", false).unwrap(), [260], "the merge applies");
    assert!(
        tokenizer
            .apply_chat_template(&[formats::tokenizer::ChatMessage::new("user", "x")], true)
            .unwrap()
            .ends_with("<|im_start|>assistant\n")
    );
}

/// A GGUF whose `llama.block_count` is absurd used to reach `Vec::with_capacity(layers)` and abort.
#[test]
fn gguf_with_an_absurd_layer_count_is_an_error() {
    let p = parts("gguf-huge-block-count.bin");
    let dir = dir_with(&[("m.gguf", &p[0])]);
    let source = formats::source::ModelSource::Gguf(dir.path().join("m.gguf"));
    let err =
        llama::load(&source, &llama::LoadOptions::default(), &burn::tensor::Device::flex()).err().expect("an error");
    println!("  {err}");
    assert!(err.to_string().contains("m.gguf"), "{err}");
}
