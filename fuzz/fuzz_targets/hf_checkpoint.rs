//! An HF checkpoint directory: config.json and model.safetensors (dense or bitsandbytes 4-bit with its
//! quant_state JSON), read tensor by tensor and loaded as a model (shapes checked against the config).
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    common::init();
    let parts = common::parts(data);
    let fixture = common::fixtures().join("tiny-train/model-nf4");
    let config = std::fs::read(fixture.join("config.json")).unwrap();
    let (config, weights): (&[u8], &[u8]) = match parts.as_slice() {
        [weights] => (&config, weights),
        [config, weights, ..] => (config, weights),
        [] => return,
    };
    let dir = common::dir_with(&[("config.json", config), ("model.safetensors", weights)]);
    let _ = llama::LlamaConfig::from_hf_config(&dir.path().join("config.json"));
    if let Ok(ckpt) = quant::checkpoint::HfCheckpoint::open(dir.path()) {
        let names: Vec<String> = ckpt.names().map(String::from).collect();
        for name in names.iter().take(64) {
            let _ = ckpt.tensor_f32(name);
            let _ = ckpt.bnb_weight(name);
        }
    }
    let _ = llama::load_hf(dir.path(), &llama::LoadOptions::default(), &burn::tensor::Device::flex());
});
