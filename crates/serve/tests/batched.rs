//! The scheduler with the real models: sequences of two adapters and of the base, decoded together in one
//! batch (continuous batching), get token for token what `llama::generate` (`t5::generate`) gives each alone
//! with its adapter attached (tiny fixture models, NF4 + DQ on load, PEFT fixture adapters).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{DType, Device};
use llama::generate::{SamplingConfig, generate};
use serve::engine::{self, Event, Job, LlamaDecoder, SchedulerConfig, Stats, T5Decoder};
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

/// `(prompt, adapter, max_tokens)` sequences, all queued at once on a scheduler over `decoder` with
/// `max_batch` 4, are checked token for token against `expected`; and the batch filled up.
fn schedule_and_check<D: engine::Decoder>(
    decoder: D,
    plan: &[(Vec<u32>, Option<usize>, usize)],
    expected: &[Vec<u32>],
) {
    let (jobs, rx) = mpsc::channel(16);
    let stats = Arc::new(Stats::default());
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
    schedule_and_check(LlamaDecoder { model: base, adapters }, &plan, &expected);
}

fn t5_model(adapter: Option<&Path>) -> t5::T5Model {
    let options = t5::LoadOptions { dtype: DType::F32, quant: Some(quant::QuantConfig::new()) };
    let (_, mut model) = t5::load_hf(&fixtures().join("t5/tiny-t5-gated"), &options, &Device::flex()).unwrap();
    if let Some(dir) = adapter {
        model.load_peft_adapter(dir).unwrap();
    }
    model
}

/// The same with an encoder–decoder: T5 sequences of two adapters and of the base, their prompts encoded as
/// they join, get token for token what `t5::generate` gives each alone with its adapter attached.
#[test]
fn batched_t5_sequences_equal_their_single_generations() {
    // A second adapter: the fixture's with every lora_B scaled by -1.5.
    let second = tempfile::tempdir().unwrap();
    let mut scaled = lora::peft::read_peft_adapter(&fixtures().join("t5/adapter-tiny-t5-gated")).unwrap();
    for stored in scaled.modules.values_mut() {
        stored.b.0.iter_mut().for_each(|x| *x *= -1.5);
    }
    let task = lora::peft::TaskType::Seq2SeqLm;
    lora::peft::write_peft_adapter(second.path(), &scaled.config, None, &scaled.modules, task).unwrap();
    let dirs = [fixtures().join("t5/adapter-tiny-t5-gated"), second.path().to_path_buf()];

    let base = t5_model(None);
    let adapters = dirs.iter().map(|d| base.read_side_adapter(d).unwrap().1).collect();
    let long: Vec<u32> = (0..30).map(|i| (i * 11 + 5) % 90 + 2).chain([1]).collect();
    let plan: Vec<(Vec<u32>, Option<usize>, usize)> = vec![
        (vec![5, 9, 2, 77, 1], Some(0), 10),
        (vec![3, 3, 60, 1], None, 6),
        (vec![10, 11, 1], Some(1), 10),
        (vec![42, 17, 19, 4, 8, 15, 16, 1], Some(0), 7),
        (long, Some(1), 9),
        (vec![7, 1], None, 10),
    ];
    let expected: Vec<Vec<u32>> = plan
        .iter()
        .map(|(source, adapter, max)| {
            let m = t5_model(adapter.map(|i| dirs[i].as_path()));
            let config = SamplingConfig::new().with_max_new_tokens(*max);
            t5::generate::generate(&m, source, 0, &config, &[], |_| true).unwrap().0
        })
        .collect();
    let config = SamplingConfig::new().with_max_new_tokens(10);
    let plain = t5::generate::generate(&base, &plan[0].0, 0, &config, &[], |_| true).unwrap().0;
    assert_ne!(plain, expected[0], "the adapter changes the tokens");
    schedule_and_check(T5Decoder { model: base, adapters, decoder_start: 0 }, &plan, &expected);
}
