//! Trainer checkpoints (`trainer_state.json`) and run configs (`train_config.toml`).
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    common::init();
    let dir = common::dir_with(&[("trainer_state.json", data), ("train_config.toml", data)]);
    let _ = train::checkpoint::latest(dir.path());
    let _ = train::config::TrainConfig::from_toml_file(&dir.path().join("train_config.toml"));
});
