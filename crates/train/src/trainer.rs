//! The training loop: QLoRA's recipe, top to bottom, for any model [`Family`] (the Llama family, T5).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{DType, Device, Tensor};
use dashboard::status::{RunState, StatusFile};
use data::{BatchStream, DataCursor, Limits, OrderConfig};
use llama::LoadedModel;
use lora::{LoraConfig, TargetModules};
use optim::{FlatTensor, LrSchedule, LrScheduleConfig, PagedAdamW, PagedAdamWConfig, StepReport, TensorPages, Warmup};
use serde::{Deserialize, Serialize};
use t5::LoadedT5;

use crate::TrainError;
use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;
use crate::family::{Family, MicroBatch, TrainModel};
use crate::metrics::{MetricsLog, StepMetrics, peak_rss_mib};

/// Something that shows progress (a progress bar in the binary, nothing in tests).
pub trait Progress {
    fn start(&mut self, total_steps: u64, first_step: u64);
    fn step(&mut self, metrics: &StepMetrics);
    fn message(&mut self, text: &str);
    fn finish(&mut self);
}

/// No output.
pub struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, _: u64, _: u64) {}
    fn step(&mut self, _: &StepMetrics) {}
    fn message(&mut self, _: &str) {}
    fn finish(&mut self) {}
}

/// What a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub first_step: u64,
    pub losses: Vec<f64>,
    pub eval_loss_before: Option<f64>,
    pub eval_loss_after: Option<f64>,
    pub adapter_dir: PathBuf,
    pub metrics_file: PathBuf,
    pub plot_file: Option<PathBuf>,
    pub sample_before: Option<String>,
    pub sample_after: Option<String>,
    pub train_seconds: f64,
    pub peak_rss_mib: f64,
}

/// The training data after reading and tokenizing, as the model family takes it.
pub struct PreparedData<E> {
    pub train: Vec<E>,
    pub eval: Vec<E>,
    pub notes: Vec<String>,
}

/// Loads the model for training on `device`: quantized as configured, with a fresh LoRA or `init_adapter`.
/// Returns the model and the LoRA configuration in effect (the init adapter's, when there is one).
pub fn load_for_training<F: Family>(config: &TrainConfig, device: &Device) -> Result<(F, LoraConfig), TrainError> {
    let mut loaded = F::load(config, device)?;
    let lora = match &config.init_adapter {
        Some(dir) => loaded.model_mut().load_peft_adapter(dir)?.config,
        None => {
            let lora = lora_config(config)?;
            device.seed(config.seed); // the A matrices' random initialisation
            loaded.model_mut().add_lora(&lora, device)?;
            lora
        }
    };
    Ok((loaded, lora))
}

/// The LoRA configuration of a run.
pub fn lora_config(config: &TrainConfig) -> Result<LoraConfig, TrainError> {
    let targets = match config.target_modules.as_str() {
        "all-linear" => TargetModules::AllLinear,
        s if s.starts_with("regex:") => TargetModules::Regex(s["regex:".len()..].to_string()),
        s => TargetModules::Names(s.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect()),
    };
    Ok(LoraConfig::new()
        .with_r(config.lora_r)
        .with_alpha(config.lora_alpha)
        .with_dropout(config.lora_dropout)
        .with_target_modules(targets))
}

fn read_dataset(
    spec: &str,
    heldout: bool,
    config: &TrainConfig,
    notes: &mut Vec<String>,
) -> Result<Vec<data::Example>, TrainError> {
    let format = config.format;
    let report = if spec == data::embedded::WORDNET_NAME {
        let text = if heldout { data::embedded::WORDNET_HELDOUT } else { data::embedded::WORDNET_TRAIN };
        data::parse_jsonl(text, "wordnet (embedded)", format, config.skip_bad_lines)?
    } else {
        data::read_jsonl(Path::new(spec), format, config.skip_bad_lines)?
    };
    if !report.skipped_lines.is_empty() {
        let shown: Vec<String> = report.skipped_lines.iter().take(5).map(|(l, r)| format!("line {l}: {r}")).collect();
        notes.push(format!(
            "{spec}: skipped {} malformed lines ({}{})",
            report.skipped_lines.len(),
            shown.join("; "),
            if report.skipped_lines.len() > 5 { "; …" } else { "" }
        ));
    }
    Ok(report.examples)
}

/// Reads and tokenizes the training and held-out data.
pub fn prepare_data<F: Family>(config: &TrainConfig, loaded: &F) -> Result<PreparedData<F::Example>, TrainError> {
    let limits = Limits {
        source_max_len: config.source_max_len,
        target_max_len: config.target_max_len,
        train_on_source: config.train_on_source,
    };
    let mut notes = Vec::new();
    let train_examples = read_dataset(&config.data, false, config, &mut notes)?;
    let train = loaded.tokenize(&train_examples, &limits)?;
    if train.truncated > 0 || train.dropped > 0 {
        notes.push(format!(
            "train: {} examples cut to the length limits, {} left without targets and dropped",
            train.truncated, train.dropped
        ));
    }
    let eval_spec =
        config.eval_data.clone().or_else(|| (config.data == data::embedded::WORDNET_NAME).then(|| config.data.clone()));
    let eval = match eval_spec {
        Some(spec) => {
            let examples = read_dataset(&spec, true, config, &mut notes)?;
            let mut eval = loaded.tokenize(&examples, &limits)?.examples;
            if config.eval_samples > 0 {
                eval.truncate(config.eval_samples);
            }
            eval
        }
        None => Vec::new(),
    };
    let vocab = loaded.vocab_size() as u32;
    if let Some(bad) = train.examples.iter().chain(&eval).flat_map(F::token_ids).find(|&id| id >= vocab) {
        return Err(TrainError::Input(format!(
            "the tokenizer produced token id {bad}, outside the model's vocabulary of {vocab}"
        )));
    }
    Ok(PreparedData { train: train.examples, eval, notes })
}

/// Mean loss over all target tokens of `examples` with the model in eval mode (no dropout, no autodiff).
pub fn eval_loss<F: Family>(
    loaded: &F,
    model: &F::Model,
    examples: &[F::Example],
    micro_batch_size: usize,
) -> Option<f64> {
    if examples.is_empty() {
        return None;
    }
    let model = model.valid();
    let device = model.devices()[0].clone();
    let (mut sum, mut count) = (0.0f64, 0usize);
    for chunk in examples.chunks(micro_batch_size.max(1)) {
        let batch = loaded.batch(&chunk.iter().collect::<Vec<_>>());
        if batch.targets() == 0 {
            continue;
        }
        let nll = model.nll_sum(&batch, &device).into_data().convert::<f64>().try_to_vec::<f64>().expect("scalar")[0];
        sum += nll;
        count += batch.targets();
    }
    (count > 0).then(|| sum / count as f64)
}

/// Forward and backward over this rank's micro-batches of one optimizer step: the summed LoRA gradients of the
/// loss divided by `step_targets` (the target tokens of the whole step, all ranks), on the device, and the summed
/// NLL (a `[1]` tensor; `None` without targets). Micro-batch `i` is the step's micro-batch `first_index + i` and
/// draws its dropout masks from `seed ^ (first_index + i)`, so they depend only on the run's seed, the step and
/// the micro-batch, not on how the step is split across ranks.
pub fn accumulate_gradients<M: TrainModel>(
    model: &M,
    batches: &[M::Batch],
    first_index: usize,
    step_targets: usize,
    device: &Device,
    seed: u64,
) -> (BTreeMap<String, FlatTensor>, Option<Tensor<1>>) {
    let mut grads = BTreeMap::new();
    let mut nll_sum: Option<Tensor<1>> = None;
    for (i, batch) in batches.iter().enumerate() {
        if batch.targets() == 0 {
            continue;
        }
        let micro_seed = seed ^ (first_index + i) as u64;
        device.seed(micro_seed);
        ops::dropout::seed_dropout(micro_seed);
        let nll = model.nll_sum(batch, device);
        let loss = nll.clone().div_scalar(step_targets.max(1) as f64);
        let g = loss.backward();
        let nll = nll.inner().cast(DType::F32);
        nll_sum = Some(match nll_sum {
            Some(sum) => sum.add(nll),
            None => nll,
        });
        optim::device::accumulate(&mut grads, optim::device::gradients_on_device(model, &g));
    }
    (grads, nll_sum)
}

/// This rank's part of one optimizer step, and with whom it sums its gradients (`None`: a single device).
pub struct RankStep<'a, B> {
    /// The rank's micro-batches and the index of its first in the step.
    pub batches: &'a [B],
    pub first_index: usize,
    /// Target tokens of the whole step, all ranks.
    pub step_targets: usize,
    pub sync: Option<(&'a dyn crate::parallel::GradientSync, usize)>,
}

/// What one optimizer step did.
pub struct StepOutcome {
    pub loss: f64,
    pub report: StepReport,
    /// Bytes read back from the device during the step (the loss and the gradient norm: scalars only).
    pub readback_bytes: u64,
}

/// One optimizer step, all of it on the training device: forward and backward over the rank's micro-batches,
/// their gradients summed (and summed across ranks), the global norm clipped, the paged AdamW update. Returns
/// the updated model; the loss is the step's (all ranks).
pub fn optimizer_step<M: TrainModel>(
    model: &M,
    optimizer: &mut PagedAdamW<TensorPages>,
    part: &RankStep<'_, M::Batch>,
    device: &Device,
    seed: u64,
    (lr, max_grad_norm): (f64, Option<f32>),
    step: u64,
) -> Result<(M, StepOutcome), TrainError> {
    let readback_before = optim::device::readback_bytes();
    let (grads, nll_sum) = accumulate_gradients(model, part.batches, part.first_index, part.step_targets, device, seed);
    let local_loss_sum = nll_sum.map_or(0.0, |sum| optim::device::read_scalars(sum)[0]);
    let (grads, loss_sum) = match part.sync {
        Some((sync, rank)) => sync.all_reduce_sum(rank, grads, local_loss_sum)?,
        None => (grads, local_loss_sum),
    };
    let loss = loss_sum / part.step_targets.max(1) as f64;
    if !loss.is_finite() {
        return Err(TrainError::Diverged(format!("the loss is {loss} at step {step}: stopping without updating")));
    }
    let (updated, report) = optimizer.step_module_on_device(model, grads, lr, max_grad_norm).map_err(|e| match e {
        optim::OptimError::NonFiniteGradient { .. } => TrainError::Diverged(format!("{e} at step {step}")),
        other => other.into(),
    })?;
    let readback_bytes = optim::device::readback_bytes() - readback_before;
    Ok((updated, StepOutcome { loss, report, readback_bytes }))
}

/// Runs one step with device failures (which burn and cubecl raise as panics: out of memory, a lost device)
/// turned into [`TrainError::Device`], naming the step and what to lower. `config.inject_device_oom_at_step`
/// makes that step fail as an allocation failure would (tests of this path) on the rank where `injectable`
/// (the last rank of a data-parallel run).
pub fn guarded_step<T>(
    step: u64,
    config: &TrainConfig,
    device_name: &str,
    injectable: bool,
    run: impl FnOnce() -> Result<T, TrainError>,
) -> Result<T, TrainError> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if injectable && config.inject_device_oom_at_step == Some(step) {
            panic!("injected: the device ran out of memory (OutOfMemory) allocating the step's buffers");
        }
        run()
    }));
    result.unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("unknown device failure")
            .to_string();
        let out = &config.output_dir;
        let checkpoint = checkpoint::latest(out)
            .map(|(p, _)| format!("the last good checkpoint is {} (continue with --resume {})", p.display(), out.display()))
            .unwrap_or_else(|_| "no checkpoint was written yet".into());
        let oom = ["out of memory", "OutOfMemory", "BufferTooBig", "out of device memory", "can't allocate"]
            .iter()
            .any(|needle| message.contains(needle));
        Err(TrainError::Device(if oom {
            format!(
                "step {step}: the {} device ran out of memory ({message}). Lower --micro-batch-size (now {}), the sequence length (--source-max-len {} / --target-max-len {}), or the optimizer's device budget (--optimizer-device-budget-mib, now {}, 0 = unlimited); {checkpoint}",
                device_name,
                config.micro_batch_size,
                config.source_max_len,
                config.target_max_len,
                config.optimizer_device_budget_mib,
            )
        } else {
            format!("step {step}: the {device_name} device failed: {message}; {checkpoint}")
        }))
    })
}

/// The optimizer of a run.
pub fn optimizer_config(config: &TrainConfig) -> Result<PagedAdamWConfig, TrainError> {
    let precision = config.optimizer.precision();
    let budget_mib = config.optimizer_device_budget_mib;
    if !(budget_mib >= 0.0 && budget_mib.is_finite()) || config.optimizer_page_kib == 0 {
        return Err(TrainError::Input(format!(
            "--optimizer-device-budget-mib {budget_mib} must be ≥ 0 (0: unlimited) and --optimizer-page-kib ≥ 1"
        )));
    }
    let budget = (budget_mib > 0.0).then_some((budget_mib * (1u64 << 20) as f64) as usize);
    Ok(PagedAdamWConfig::new()
        .with_page_bytes(config.optimizer_page_kib << 10)
        .with_precision(precision)
        .with_beta2(config.adam_beta2)
        .with_weight_decay(config.weight_decay)
        .with_device_budget_bytes(budget))
}

fn schedule(config: &TrainConfig, total_steps: u64) -> Result<LrSchedule, TrainError> {
    let kind = config.schedule;
    Ok(LrScheduleConfig::new()
        .with_lr(config.lr)
        .with_kind(kind)
        .with_warmup(Warmup::Ratio(config.warmup_ratio))
        .init(total_steps)?)
}

fn check_config(config: &TrainConfig) -> Result<(), TrainError> {
    let bad = |m: &str| Err(TrainError::Input(m.to_string()));
    if config.micro_batch_size == 0 || config.grad_accum == 0 {
        return bad("--micro-batch-size and --grad-accum must be at least 1");
    }
    if config.max_steps == 0 && !(config.epochs > 0.0 && config.epochs.is_finite()) {
        return bad("give --max-steps or a positive --epochs");
    }
    if !(config.max_grad_norm >= 0.0) {
        return bad("--max-grad-norm must be ≥ 0 (0 turns clipping off)");
    }
    Ok(())
}

/// The device training runs on (`--device`) with autodiff, checkpointing as configured.
pub fn training_device(config: &TrainConfig) -> Result<Device, TrainError> {
    device_for_rank(config, config.rank_devices()[0])
}

/// A rank's training device: `spec` with autodiff, checkpointing as configured.
pub fn device_for_rank(config: &TrainConfig, spec: crate::config::DeviceSpec) -> Result<Device, TrainError> {
    let device = crate::device::open(spec)?.autodiff();
    Ok(if config.gradient_checkpointing { device.gradient_checkpointing() } else { device })
}

/// The run's `status.json` (read by `qlora dashboard`): written once the output directory is this run's.
struct Status {
    dir: PathBuf,
    file: StatusFile,
}

impl Status {
    fn write(&self) -> Result<(), TrainError> {
        let path = self.dir.join(dashboard::status::STATUS_FILE);
        self.file.write(&self.dir).map_err(|source| TrainError::Io { path, source })
    }
}

/// Runs (or resumes) a training run as configured; `resume` is an output or checkpoint directory. The
/// model family comes from `config.model`: an encoder–decoder (T5) checkpoint trains on source/target pairs,
/// anything else as a Llama-family decoder.
///
/// The output directory's `status.json` says "running" from the start, "finished" when the run has saved
/// its adapter, and "stopped" (with the error) when it fails; a killed trainer leaves "running" behind,
/// which `qlora dashboard` reads as stopped once the process is gone.
pub fn train(
    config: &TrainConfig,
    resume: Option<&Path>,
    progress: &mut dyn Progress,
) -> Result<TrainSummary, TrainError> {
    let mut status = None;
    let result = if crate::seq2seq::is_t5(&config.model) {
        train_with_status::<LoadedT5>(config, resume, progress, &mut status)
    } else {
        train_with_status::<LoadedModel>(config, resume, progress, &mut status)
    };
    if let (Err(e), Some(status)) = (&result, &status) {
        // Best effort: the error itself is what the caller needs to see.
        let _ =
            Status { dir: status.dir.clone(), file: status.file.with_state(RunState::Stopped, Some(e.to_string())) }
                .write();
    }
    result
}

fn train_with_status<F: Family>(
    config: &TrainConfig,
    resume: Option<&Path>,
    progress: &mut dyn Progress,
    status: &mut Option<Status>,
) -> Result<TrainSummary, TrainError> {
    check_config(config)?;
    // A run killed before its first checkpoint has nothing to resume: it starts over.
    let restart = resume.is_some_and(|dir| checkpoint::latest(dir).is_err() && dir.join("train_config.toml").exists());
    if restart {
        progress.message("no checkpoint was written before the run stopped: starting it over");
    }
    let resume = resume.filter(|_| !restart);
    let config = &TrainConfig { overwrite_output_dir: config.overwrite_output_dir || restart, ..config.clone() };
    let out = &config.output_dir;
    if resume.is_none()
        && !config.overwrite_output_dir
        && (out.join("metrics.jsonl").exists() || !checkpoint::checkpoints(out).is_empty())
    {
        return Err(TrainError::Input(format!(
            "{} already holds a run: continue it with --resume {}, or start over with --overwrite-output-dir",
            out.display(),
            out.display()
        )));
    }
    checkpoint::prepare_output_dir(out)?;
    std::fs::write(out.join("train_config.toml"), config.to_toml())
        .map_err(|source| TrainError::Io { path: out.join("train_config.toml"), source })?;
    let status = status.insert(Status { dir: out.clone(), file: StatusFile::running(None) });
    status.write()?;

    // Model, adapter, data.
    let device = training_device(config)?;
    progress.message(&format!("loading {}", config.model));
    let (mut loaded, lora) = load_for_training::<F>(config, &device)?;
    let data = prepare_data(config, &loaded)?;
    for note in &data.notes {
        progress.message(note);
    }
    let order = OrderConfig {
        shuffle: !config.no_shuffle,
        seed: config.seed,
        group_by_length: config.group_by_length,
        micro_batch_size: config.micro_batch_size,
    };
    let rank_specs = config.rank_devices();
    let ranks = rank_specs.len();
    // One optimizer step takes `ranks × grad_accum` micro-batches.
    let micro_batches_per_step = ranks * config.grad_accum;
    let steps_per_epoch = data.train.len().div_ceil(config.micro_batch_size).div_ceil(micro_batches_per_step) as u64;
    let total_steps = if config.max_steps > 0 {
        config.max_steps
    } else {
        ((steps_per_epoch as f64) * config.epochs).ceil().max(1.0) as u64
    };
    let schedule = schedule(config, total_steps)?;
    status.file.total_steps = Some(total_steps);
    status.write()?;
    let mut optimizer = optimizer_config(config)?.init_on(TensorPages::new(&device))?;

    // Resume: adapter values, optimizer state, data position.
    let mut state = TrainerState { step: 0, cursor: DataCursor::default(), config_toml: config.to_toml() };
    if let Some(dir) = resume {
        let (ckpt, restored) = checkpoint::latest(dir)?;
        loaded.model_mut().load_peft_adapter(&ckpt.join("adapter"))?;
        optimizer.load(&ckpt.join("optimizer.safetensors"))?;
        progress.message(&format!("resumed from {} at step {}", ckpt.display(), restored.step));
        if restored.cursor.position > data.train.len() {
            return Err(TrainError::Input(format!(
                "{}: step {} at position {} of epoch {} does not fit this run's data ({} examples): resume with the run's own data and config",
                ckpt.display(),
                restored.step,
                restored.cursor.position,
                restored.cursor.epoch,
                data.train.len()
            )));
        }
        state.step = restored.step;
        state.cursor = restored.cursor;
    }
    let mut metrics = MetricsLog::open(&out.join("metrics.jsonl"), state.step)?;
    let mut model = loaded.model().clone();
    // Data parallel: ranks 1.. on their own threads and devices, with rank 0's adapter and optimizer state.
    let workers = if ranks > 1 {
        progress.message(&format!("data parallel over {ranks} ranks: {}", config.device));
        let optimizer_checkpoint =
            resume.map(|dir| checkpoint::latest(dir).map(|(p, _)| p.join("optimizer.safetensors")));
        crate::parallel::Workers::start::<F>(config, &rank_specs, &device, &model, optimizer_checkpoint.transpose()?)?
    } else {
        crate::parallel::Workers::none()
    };
    let sample_before = match (&config.sample_prompt, resume) {
        (p, None) if !p.is_empty() => Some(loaded.sample_answer(&model, p, 64)?),
        _ => None,
    };
    let eval_loss_before =
        if resume.is_none() { eval_loss(&loaded, &model, &data.eval, config.micro_batch_size) } else { None };
    if let Some(loss) = eval_loss_before {
        metrics.eval(state.step, loss)?;
    }

    let mut stream = BatchStream::new(&data.train, order, state.cursor);
    let first_step = state.step;
    let mut losses = Vec::new();
    let started = Instant::now();
    progress.start(total_steps, first_step);
    let max_grad_norm = (config.max_grad_norm > 0.0).then_some(config.max_grad_norm as f32);
    let mut ended_early = None;
    while state.step < total_steps {
        if config.time_limit_s > 0 && started.elapsed().as_secs() >= config.time_limit_s {
            let note = format!("time limit of {} s reached at step {}", config.time_limit_s, state.step);
            progress.message(&note);
            ended_early = Some(note);
            break;
        }
        let step_started = Instant::now();
        // One optimizer step = ranks × grad_accum micro-batches; rank r takes micro-batches r·k .. (r+1)·k; the
        // loss is the mean over all their target tokens.
        let batches: Vec<_> = (0..micro_batches_per_step).map(|_| loaded.batch(&stream.next_examples())).collect();
        let targets: usize = batches.iter().map(MicroBatch::targets).sum();
        let tokens: usize = batches.iter().map(MicroBatch::tokens).sum();
        let lr = schedule.lr_at(state.step);
        let seed = config.seed ^ (state.step << 16);
        let k = config.grad_accum;
        workers.send_step(&batches, targets, seed, lr, state.step + 1);
        let own = RankStep {
            batches: &batches[..k],
            first_index: 0,
            step_targets: targets,
            sync: workers.sync().map(|s| (s, 0)),
        };
        let rank0_name = rank_specs[0].to_string();
        let stepped = guarded_step(state.step + 1, config, &rank0_name, ranks == 1, || {
            optimizer_step(&model, &mut optimizer, &own, &device, seed, (lr, max_grad_norm), state.step + 1)
        })
        .inspect_err(|e| workers.abort(0, e.to_string()));
        let workers_done = workers.wait_step();
        let (updated, outcome) = stepped.and_then(|r| workers_done.map(|()| r)).map_err(|e| match e {
            TrainError::Diverged(why) => TrainError::Diverged(format!(
                "{why}; the last good checkpoint is {}",
                checkpoint::latest(out).map(|(p, _)| p.display().to_string()).unwrap_or_else(|_| "none".into())
            )),
            other => other,
        })?;
        let (loss, report) = (outcome.loss, outcome.report);
        model = updated;
        state.step += 1;
        state.cursor = stream.cursor;
        losses.push(loss);
        let seconds = step_started.elapsed().as_secs_f64();
        let m = StepMetrics {
            step: state.step,
            loss,
            lr,
            grad_norm: report.grad_norm as f64,
            tokens_per_s: tokens as f64 / seconds,
            target_tokens: targets,
            step_seconds: seconds,
            peak_rss_mib: peak_rss_mib(),
            paged_in_bytes: report.pager.paged_in_bytes,
            paged_out_bytes: report.pager.paged_out_bytes,
            optimizer_state_bytes: report.pager.state_bytes,
            readback_bytes: outcome.readback_bytes,
            epoch: stream.cursor.epoch as f64 + stream.cursor.position as f64 / data.train.len().max(1) as f64,
        };
        metrics.step(&m)?;
        progress.step(&m);
        let last = state.step == total_steps;
        if config.eval_steps > 0
            && state.step.is_multiple_of(config.eval_steps)
            && !last
            && let Some(loss) = eval_loss(&loaded, &model, &data.eval, config.micro_batch_size)
        {
            metrics.eval(state.step, loss)?;
            progress.message(&format!("step {}: eval loss {loss:.4} (perplexity {:.2})", state.step, loss.exp()));
        }
        if config.save_steps > 0 && state.step.is_multiple_of(config.save_steps) && !last {
            save(out, &model, &optimizer, &state, config, &lora)?;
        }
    }
    progress.finish();
    let train_seconds = started.elapsed().as_secs_f64();

    // Final: checkpoint, adapter, eval, plot, sample.
    save(out, &model, &optimizer, &state, config, &lora)?;
    let adapter_dir = out.join("adapter");
    checkpoint::write_adapter_atomically(&model, &lora, &adapter_dir, &config.model)?;
    let eval_loss_after = eval_loss(&loaded, &model, &data.eval, config.micro_batch_size);
    if let Some(loss) = eval_loss_after {
        metrics.eval(state.step, loss)?;
    }
    let plot_file = match crate::metrics::plot_losses(&out.join("metrics.jsonl"), &out.join("loss.png")) {
        Ok(path) => Some(path),
        Err(e) => {
            progress.message(&format!("no loss plot: {e}"));
            None
        }
    };
    let sample_after = if config.sample_prompt.is_empty() {
        None
    } else {
        Some(loaded.sample_answer(&model, &config.sample_prompt, 64)?)
    };
    status.file = status.file.with_state(RunState::Finished, ended_early);
    status.write()?;
    Ok(TrainSummary {
        steps: state.step,
        first_step,
        losses,
        eval_loss_before,
        eval_loss_after,
        adapter_dir,
        metrics_file: out.join("metrics.jsonl"),
        plot_file,
        sample_before,
        sample_after,
        train_seconds,
        peak_rss_mib: peak_rss_mib(),
    })
}

fn save<M: TrainModel>(
    out: &Path,
    model: &M,
    optimizer: &PagedAdamW<TensorPages>,
    state: &TrainerState,
    config: &TrainConfig,
    lora: &LoraConfig,
) -> Result<PathBuf, TrainError> {
    checkpoint::save(out, state, config.save_total_limit, |dir| {
        checkpoint::write_adapter(model, lora, &dir.join("adapter"), &config.model)?;
        optimizer.save(&dir.join("optimizer.safetensors"))?;
        Ok(())
    })
}

/// The end-of-run report printed by `qlora train`.
pub fn report(config: &TrainConfig, s: &TrainSummary) -> String {
    let mut out = String::new();
    let done = s.steps - s.first_step;
    out.push_str(&format!(
        "trained {done} steps ({} → {}) in {:.0} s, {:.2} s/step, peak memory {:.0} MiB\n",
        s.first_step,
        s.steps,
        s.train_seconds,
        s.train_seconds / done.max(1) as f64,
        s.peak_rss_mib
    ));
    if let (Some(first), Some(last)) = (s.losses.first(), s.losses.last()) {
        out.push_str(&format!("training loss {first:.4} → {last:.4}\n"));
    }
    match (s.eval_loss_before, s.eval_loss_after) {
        (Some(b), Some(a)) => {
            out.push_str(&format!("held-out loss {b:.4} → {a:.4} (perplexity {:.2} → {:.2})\n", b.exp(), a.exp()))
        }
        (None, Some(a)) => out.push_str(&format!("held-out loss {a:.4} (perplexity {:.2})\n", a.exp())),
        _ => {}
    }
    if let (Some(before), Some(after)) = (&s.sample_before, &s.sample_after) {
        out.push_str(&format!("\nQ: {}\nbefore: {before}\nafter:  {after}\n\n", config.sample_prompt));
    }
    out.push_str(&format!("adapter (PEFT): {}\nmetrics: {}\n", s.adapter_dir.display(), s.metrics_file.display()));
    if let Some(plot) = &s.plot_file {
        out.push_str(&format!("loss plot: {}\n", plot.display()));
    }
    out.push_str(&format!("config: {}", config.output_dir.join("train_config.toml").display()));
    out
}
