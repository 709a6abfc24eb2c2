//! GGUF files: header, metadata, tensor infos, tokenizer and chat template, tensor data, the whole loader.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    common::init();
    if let Ok(file) = formats::gguf::GgufFile::from_bytes(data.to_vec(), "fuzz.gguf") {
        let _ = file.llama_params();
        let _ = formats::gguf::tokenizer::tokenizer_from_gguf(&file);
        for name in ["token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight"] {
            let _ = file.tensor_f32(name);
        }
        let dir = common::dir_with(&[("m.gguf", data)]);
        let source = formats::source::ModelSource::Gguf(dir.path().join("m.gguf"));
        let _ = llama::load(&source, &llama::LoadOptions::default(), &burn::tensor::Device::flex());
    }
});
