//! PEFT adapters: adapter_config.json and adapter_model.safetensors, read and applied to a model.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

#[path = "common.rs"]
mod common;

fn base() -> &'static llama::LlamaModel {
    static M: OnceLock<llama::LlamaModel> = OnceLock::new();
    M.get_or_init(|| {
        let dir = common::fixtures().join("tiny-train/model-nf4");
        llama::load_hf(&dir, &llama::LoadOptions::default(), &burn::tensor::Device::flex()).expect("fixture model").1
    })
}

fuzz_target!(|data: &[u8]| {
    common::init();
    let parts = common::parts(data);
    let fixture = common::fixtures().join("tiny-train/init-adapter");
    let config = std::fs::read(fixture.join("adapter_config.json")).unwrap();
    let weights = std::fs::read(fixture.join("adapter_model.safetensors")).unwrap();
    let (config, weights): (&[u8], &[u8]) = match parts.as_slice() {
        [one] if data.first() == Some(&b'{') => (one, &weights),
        [one] => (&config, one),
        [config, weights, ..] => (config, weights),
        [] => return,
    };
    let dir = common::dir_with(&[("adapter_config.json", config), ("adapter_model.safetensors", weights)]);
    let _ = lora::peft::read_adapter_config(&dir.path().join("adapter_config.json"));
    let mut model = base().clone();
    let _ = model.load_peft_adapter(dir.path());
});
