//! Optimizer checkpoints (`optimizer.safetensors`), loaded by both precisions and stepped.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    common::init();
    let dir = common::dir_with(&[("optimizer.safetensors", data)]);
    for precision in [optim::AdamPrecision::Bits32, optim::AdamPrecision::Bits8] {
        let mut opt = optim::PagedAdamWConfig::new().with_precision(precision).with_page_bytes(4096).init().unwrap();
        if opt.load(&dir.path().join("optimizer.safetensors")).is_ok() {
            let keys: Vec<String> = opt.keys().map(String::from).collect();
            for key in keys.iter().take(4) {
                let n = opt.state_of(key).map(|s| s.elements()).unwrap_or(0).min(1 << 16);
                let mut p = vec![0.5f32; n];
                let g = vec![0.1f32; n];
                let _ = opt.step(1e-3, &mut [optim::ParamGrad { key, param: &mut p, grad: &g }]);
            }
        }
    }
});
