//! The scheduler with the real model: sequences of two adapters and of the base, decoded together in one
//! batch (continuous batching), get token for token what `llama::generate` gives each alone with its adapter
//! attached (tiny fixture model, NF4 + DQ on load, the two PEFT fixture adapters).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{DType, Device};
use llama::generate::{SamplingConfig, generate};
use serve::engine::{self, Event, Job, LlamaDecoder, SchedulerConfig, Stats};
use tokio::sync::mpsc;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model(adapter: Option<&Path>) -> llama::LlamaModel {
    let options = llama::LoadOptions { dtype: DType::F32, quant: Some(quant::QuantConfig::new()) };
    let (_, mut model) = llama::load_hf(&fixtures().join("tiny-llama-f32"), &options, &Device::flex()).unwrap();
    if let Some(dir) = adapter {
        model.load_peft_adapter(dir).unwrap();
    }
    model
}

#[test]
fn batched_multi_adapter_sequences_equal_their_single_generations() {
    let dirs = [fixtures().join("peft/adapter-tiny-llama"), fixtures().join("peft/adapter-tiny-llama-rslora")];
    let base = model(None);
    let adapters = dirs.iter().map(|d| base.read_side_adapter(d).unwrap().1).collect();
    let plan: Vec<(Vec<u32>, Option<usize>, usize)> = vec![
        (vec![1, 5, 9, 2, 77], Some(0), 12),
        (vec![3, 3, 200], None, 7),
        (vec![10, 11], Some(1), 12),
        (vec![42, 17, 99, 4, 8, 15, 16], Some(0), 9),
        (vec![7], Some(1), 10),
        (vec![100, 101, 102], None, 12),
    ];
    let expected: Vec<Vec<u32>> = plan
        .iter()
        .map(|(prompt, adapter, max)| {
            let m = model(adapter.map(|i| dirs[i].as_path()));
            let config = SamplingConfig::new().with_max_new_tokens(*max);
            generate(&m, prompt, &config, &[], |_| true).unwrap().0
        })
        .collect();
    let plain = generate(&base, &plan[0].0, &SamplingConfig::new().with_max_new_tokens(12), &[], |_| true).unwrap().0;
    assert_ne!(plain, expected[0], "the adapter changes the tokens");

    let (jobs, rx) = mpsc::channel(16);
    let stats = Arc::new(Stats::default());
    let decoder = LlamaDecoder { model: base, adapters };
    let s = stats.clone();
    let config = SchedulerConfig { max_batch: 4, max_prefill_tokens: 64 };
    let thread = std::thread::spawn(move || engine::run(decoder, config, vec![], rx, s));
    let receivers: Vec<_> = plan
        .iter()
        .map(|(prompt, adapter, max)| {
            let (tx, rx) = mpsc::unbounded_channel();
            let sampling = SamplingConfig::new().with_max_new_tokens(*max);
            jobs.blocking_send(Job { prompt: prompt.clone(), adapter: *adapter, sampling, events: tx }).unwrap();
            rx
        })
        .collect();
    for (i, mut rx) in receivers.into_iter().enumerate() {
        let mut tokens = Vec::new();
        while let Some(event) = rx.blocking_recv() {
            match event {
                Event::Token(t) => tokens.push(t),
                Event::Finished(_) => {}
                Event::Failed(m) => panic!("sequence {i}: {m}"),
            }
        }
        assert_eq!(tokens, expected[i], "sequence {i} (adapter {:?}) batched vs alone", plan[i].1);
    }
    drop(jobs);
    thread.join().unwrap();
    let seen = stats.max_batch_seen.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(seen, 4, "the sequences ran together, up to max_batch");
}
