//! `qlora bench-step`: one QLoRA training step (forward, backward, clip, optimizer) timed on random
//! tokens, the way `cargo xtask bench` compares it with transformers + PEFT + bitsandbytes
//! (xtask/bench/reference_step.py times the same step on its side).
//!
//! The step is the trainer's own ([`optimizer_step`]: everything on the training device), on the model
//! and LoRA settings of a [`TrainConfig`]; the batch is `batch × seq` uniform random token ids with a loss
//! on every next token, as the reference's `labels = input_ids`. Peak RSS is measured twice: over the whole
//! process (loading included) and over the steps only (the peak is reset after loading).

use std::time::Instant;

use data::{Batch, TokenizedExample};
use llama::LoadedModel;
use optim::TensorPages;
use serde::Serialize;

use crate::TrainError;
use crate::config::TrainConfig;
use crate::metrics::{peak_rss_mib, reset_peak_rss, rss_mib};
use crate::trainer::{RankStep, load_for_training, optimizer_config, optimizer_step, training_device};

/// What to time.
#[derive(Debug, Clone)]
pub struct StepBench {
    pub batch: usize,
    pub seq: usize,
    /// Timed steps (the median is reported).
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
}

/// One line of `qlora bench-step` output (JSON), with the same keys as the reference script's.
#[derive(Debug, Clone, Serialize)]
pub struct StepBenchReport {
    pub side: &'static str,
    pub batch: usize,
    pub seq: usize,
    pub dtype: String,
    pub threads: usize,
    /// Data-parallel ranks (devices); `batch` sequences each.
    pub ranks: usize,
    pub steps: usize,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    pub tokens_per_s: f64,
    pub step_peak_rss_mib: f64,
    pub process_peak_rss_mib: f64,
    /// Resident set when the steps start (model, adapters and optimizer loaded).
    pub rss_after_load_mib: f64,
    pub trainable_params: usize,
    pub loss_first: f64,
    pub loss_last: f64,
    /// The model file or directory the run loaded (the reference loads the same).
    pub model_path: String,
    /// Parameters of the base model (for model FLOPs: ≈ 6 per parameter and token with recomputation).
    pub base_params: u64,
    /// The most bytes the device's allocator held after a step (MiB; GPU backends only).
    pub device_reserved_mib: Option<f64>,
}

/// `batch` rows of `seq` token ids below `vocab` (SplitMix64 from `seed`), every next token a target.
pub fn random_batch(batch: usize, seq: usize, vocab: usize, seed: u64) -> Batch {
    let mut rng = splitmix::SplitMix64(seed);
    let mut next = move || rng.next_u64();
    let rows: Vec<TokenizedExample> = (0..batch)
        .map(|_| TokenizedExample {
            ids: (0..seq).map(|_| (next() % vocab as u64) as u32).collect(),
            target: vec![true; seq],
        })
        .collect();
    Batch::new(&rows.iter().collect::<Vec<_>>(), 0)
}

/// Loads the model as `config` says and times `bench.warmup + bench.steps` training steps.
pub fn run(config: &TrainConfig, bench: &StepBench) -> Result<StepBenchReport, TrainError> {
    if bench.batch == 0 || bench.seq < 2 || bench.steps == 0 {
        return Err(TrainError::Input("bench-step needs --batch ≥ 1, --seq ≥ 2 and --steps ≥ 1".into()));
    }
    let model_path = formats::source::resolve(&config.model)?.label();
    let device = training_device(config)?;
    let (loaded, _lora) = load_for_training::<LoadedModel>(config, &device)?;
    let loaded_config_params = loaded.config.num_parameters();
    let mut model = loaded.model.clone();
    drop(loaded);
    let trainable_params: usize = optim::trainable_tensors(&model)?.values().map(|t| t.values.len()).sum();
    let mut optimizer = optimizer_config(config)?.init_on(TensorPages::new(&device))?;
    let max_grad_norm = (config.max_grad_norm > 0.0).then_some(config.max_grad_norm as f32);
    // Several devices: data parallel, `batch` sequences per rank (tokens/s counts every rank's).
    let specs = config.rank_devices();
    let ranks = specs.len();
    let workers = if ranks > 1 {
        crate::parallel::Workers::start::<LoadedModel>(
            &TrainConfig { grad_accum: 1, ..config.clone() },
            &specs,
            &device,
            &model,
            None,
        )?
    } else {
        crate::parallel::Workers::none()
    };
    let process_peak_after_load = peak_rss_mib();
    let rss_after_load = rss_mib();
    reset_peak_rss();

    let base_params = loaded_config_params;
    let mut device_reserved_mib: Option<f64> = None;
    let mut times = Vec::with_capacity(bench.steps);
    let mut losses = Vec::new();
    for step in 0..bench.warmup + bench.steps {
        let batches: Vec<Batch> = (0..ranks)
            .map(|rank| {
                let seed = config.seed ^ step as u64 ^ ((rank as u64) << 32);
                random_batch(bench.batch, bench.seq, model.vocab_size, seed)
            })
            .collect();
        let targets = batches.iter().map(|b| b.targets).sum();
        let started = Instant::now();
        let seed = config.seed ^ ((step as u64) << 16);
        workers.send_step(&batches, targets, seed, config.lr, step as u64);
        let part = RankStep {
            batches: &batches[..1],
            first_index: 0,
            step_targets: targets,
            sync: workers.sync().map(|s| (s, 0)),
        };
        let stepped =
            optimizer_step(&model, &mut optimizer, &part, &device, seed, (config.lr, max_grad_norm), step as u64)
                .inspect_err(|e| workers.abort(0, e.to_string()));
        let others = workers.wait_step();
        let (updated, outcome) = stepped.and_then(|r| others.map(|()| r))?;
        model = updated;
        let loss = outcome.loss;
        let seconds = started.elapsed().as_secs_f64();
        if let Some(usage) = device.memory_pool_usage() {
            let mib = usage.bytes_reserved as f64 / 1048576.0;
            device_reserved_mib = Some(device_reserved_mib.map_or(mib, |m| m.max(mib)));
        }
        losses.push(loss);
        if step >= bench.warmup {
            times.push(seconds);
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median_s = if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
    };
    let step_peak = peak_rss_mib();
    Ok(StepBenchReport {
        side: "ours",
        batch: bench.batch,
        seq: bench.seq,
        dtype: config.compute_dtype.name().to_string(),
        threads: burn_threads(),
        ranks,
        steps: bench.steps,
        median_s,
        min_s: sorted[0],
        max_s: sorted[sorted.len() - 1],
        tokens_per_s: (ranks * bench.batch * bench.seq) as f64 / median_s,
        step_peak_rss_mib: step_peak,
        process_peak_rss_mib: process_peak_after_load.max(step_peak),
        rss_after_load_mib: rss_after_load,
        trainable_params,
        loss_first: losses[0],
        loss_last: losses[losses.len() - 1],
        model_path,
        base_params,
        device_reserved_mib,
    })
}

/// The worker threads the CPU backend uses (rayon's pool: `RAYON_NUM_THREADS`, else the core count).
fn burn_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_batches_cover_the_vocabulary_and_target_every_next_token() {
        let b = random_batch(3, 50, 1000, 7);
        assert_eq!((b.batch, b.len, b.targets), (3, 50, 3 * 49));
        assert!(b.ids.iter().all(|&i| i < 1000));
        assert_ne!(b.ids[..50], b.ids[50..100]);
        assert_eq!(random_batch(3, 50, 1000, 7).ids, b.ids);
    }
}
