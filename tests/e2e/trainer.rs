//! The trainer end to end on the tiny NF4 model (fixtures: xtask/fixtures/make_train_fixtures.py).

use std::path::{Path, PathBuf};

use qlora_tests::{assert_same_len, fixtures_dir, max_rel_diff, rng_lock};
use train::config::TrainConfig;
use train::trainer::{self, Quiet};

fn tiny() -> PathBuf {
    fixtures_dir().join("tiny-train")
}

fn base_config(out: &Path) -> TrainConfig {
    TrainConfig {
        model: tiny().join("model-nf4").display().to_string(),
        output_dir: out.to_path_buf(),
        lora_r: 8,
        eval_steps: 0,
        save_steps: 0,
        sample_prompt: String::new(),
        ..TrainConfig::default()
    }
}

/// Per-step losses against transformers + PEFT + bitsandbytes (NF4 base, batch 1, file order, AdamW, clip 0.3).
#[test]
fn trajectory_matches_transformers_peft_bitsandbytes() {
    trajectory_on("cpu");
}

/// The same run on `device` (also used by the CubeCL tests: `wgpu` over lavapipe).
pub(crate) fn trajectory_on(device: &str) {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        init_adapter: Some(tiny().join("init-adapter")),
        data: tiny().join("text.jsonl").display().to_string(),
        format: data::DatasetFormat::Text,
        micro_batch_size: 1,
        grad_accum: 1,
        no_shuffle: true,
        group_by_length: false,
        lr: 1e-3,
        warmup_ratio: 0.0,
        max_steps: 12,
        device: device.parse().expect("device spec"),
        ..base_config(dir.path())
    };
    let summary = trainer::train(&config, None, &mut Quiet).unwrap();
    check_trajectory(&summary, dir.path(), &tiny().join("reference.json"), device);
}

/// The run's per-step losses and gradient norms (metrics.jsonl in `out`) within 1e-3 relative of the
/// reference run's (`reference`: `{"losses", "grad_norms"}`).
fn check_trajectory(summary: &trainer::TrainSummary, out: &Path, reference: &Path, label: &str) {
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
    let theirs: Vec<f64> = reference["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(summary.losses.len(), theirs.len());
    let mut worst = 0.0f64;
    for (step, (ours, theirs)) in summary.losses.iter().zip(&theirs).enumerate() {
        let rel = ((ours - theirs) / theirs).abs();
        println!("  {label} step {:2}: ours {ours:.6} reference {theirs:.6} (rel {rel:.1e})", step + 1);
        worst = worst.max(rel);
    }
    assert!(worst <= 1e-3, "loss trajectory differs by {worst:e} relative");
    let norms: Vec<f64> = reference["grad_norms"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let ours: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["grad_norm"].as_f64().unwrap())
        .collect();
    assert_eq!(ours.len(), summary.losses.len(), "one gradient norm per step in metrics.jsonl");
    let worst_norm = max_rel_diff(&ours, &norms);
    println!("  {label} gradient norms: worst relative difference {worst_norm:.1e}, losses {worst:.1e}");
    assert!(worst_norm <= 1e-3);
}

/// `config`'s model (family `F`) loaded afresh with the adapter in `adapter`, and its held-out loss.
fn reloaded_eval_loss<F: train::family::Family>(config: &TrainConfig, adapter: &Path) -> (F, f64) {
    let reload = TrainConfig { init_adapter: Some(adapter.to_path_buf()), ..config.clone() };
    let (loaded, _) = trainer::load_for_training::<F>(&reload, &trainer::training_device(&reload).unwrap()).unwrap();
    let data = trainer::prepare_data(&reload, &loaded).unwrap();
    let loss = trainer::eval_loss(&loaded, loaded.model(), &data.eval, config.micro_batch_size).unwrap();
    (loaded, loss)
}

fn t5_fixtures() -> PathBuf {
    fixtures_dir().join("t5/train")
}

/// T5 through the same trainer: a seq2seq run (`{"input", "output"}` lines, source to the encoder, loss on the
/// target) from the NF4 checkpoint with a PEFT adapter, batch 1, file order, against transformers + PEFT +
/// bitsandbytes (fixtures: `tests/fixtures/t5/train`, xtask/fixtures/make_t5_train_fixtures.py). The adapter
/// it writes is a PEFT `SEQ_2_SEQ_LM` adapter.
#[test]
fn t5_trajectory_matches_transformers_peft_bitsandbytes() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        model: t5_fixtures().join("model-nf4").display().to_string(),
        init_adapter: Some(t5_fixtures().join("init-adapter")),
        data: t5_fixtures().join("steps.jsonl").display().to_string(),
        micro_batch_size: 1,
        grad_accum: 1,
        no_shuffle: true,
        group_by_length: false,
        lr: 1e-3,
        warmup_ratio: 0.0,
        max_steps: 12,
        ..base_config(dir.path())
    };
    let summary = trainer::train(&config, None, &mut Quiet).unwrap();
    check_trajectory(&summary, dir.path(), &t5_fixtures().join("reference.json"), "t5");
    let adapter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(summary.adapter_dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(adapter["task_type"], "SEQ_2_SEQ_LM");
}

/// A short real T5 finetune on the toy task (reverse the words), from a fresh adapter: the held-out loss
/// falls, and the written adapter reloaded gives the final held-out loss again.
#[test]
fn a_t5_finetune_learns_to_reverse_words() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        model: t5_fixtures().join("model-nf4").display().to_string(),
        data: t5_fixtures().join("reverse-train.jsonl").display().to_string(),
        eval_data: Some(t5_fixtures().join("reverse-heldout.jsonl").display().to_string()),
        micro_batch_size: 8,
        grad_accum: 1,
        lr: 3e-3,
        max_steps: 40,
        eval_steps: 20,
        lora_dropout: 0.05,
        sample_prompt: "reverse: red cat sun".into(),
        ..base_config(dir.path())
    };
    let summary = trainer::train(&config, None, &mut Quiet).unwrap();
    let (before, after) = (summary.eval_loss_before.unwrap(), summary.eval_loss_after.unwrap());
    println!(
        "t5 reverse-words: held-out loss {before:.4} → {after:.4}; sample {:?} → {:?}",
        summary.sample_before, summary.sample_after
    );
    assert!(after < 0.7 * before, "held-out loss {before} → {after}");

    let (loaded, again) = reloaded_eval_loss::<t5::LoadedT5>(&config, &summary.adapter_dir);
    assert_eq!(again, after, "reloaded adapter eval loss");

    // `qlora eval`'s loss (full logits per row) is the trainer's held-out loss (the chunked loss).
    use train::eval::{self, EvalArgs, EvalReport};
    let args = EvalArgs {
        data: t5_fixtures().join("reverse-heldout.jsonl"),
        format: data::DatasetFormat::Auto,
        limits: data::Limits::default(),
        micro_batch_size: 5,
        shots: 0,
    };
    let EvalReport::Loss { loss, examples, .. } = eval::run(&loaded, &args).unwrap() else { panic!("loss mode") };
    assert_eq!(examples, 16);
    assert!((loss - after).abs() < 1e-5 * after, "{loss} vs {after}");

    // Multiple choice, each choice scored as the target of the question: the reversal, the words as given,
    // the reversal of another line. The pick is the choice of least summed NLL, as the trainer's loss says.
    let heldout: Vec<serde_json::Value> =
        std::fs::read_to_string(&args.data).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let questions: Vec<(String, Vec<String>)> = (0..8)
        .map(|i| {
            let (q, a) = (heldout[i]["input"].as_str().unwrap(), heldout[i]["output"].as_str().unwrap());
            let words = q.trim_start_matches("reverse: ").to_string();
            (q.to_string(), vec![a.to_string(), words, heldout[i + 8]["output"].as_str().unwrap().to_string()])
        })
        .collect();
    let mc: String = questions
        .iter()
        .map(|(q, choices)| format!("{}\n", serde_json::json!({"question": q, "choices": choices, "answer": 0})))
        .collect();
    std::fs::write(dir.path().join("mc.jsonl"), mc).unwrap();
    let report = eval::run(&loaded, &EvalArgs { data: dir.path().join("mc.jsonl"), ..args.clone() }).unwrap();
    let EvalReport::MultipleChoice { correct, total, .. } = report else { panic!("multiple choice") };
    use train::family::{Family, TrainModel};
    let model = burn::module::Module::valid(&loaded.model);
    let device = model.device();
    let expected = questions
        .iter()
        .filter(|(q, choices)| {
            let nll: Vec<f64> = choices
                .iter()
                .map(|c| {
                    let example = loaded.choice_example(&format!("Question: {q}\nAnswer:"), c).unwrap();
                    let nll = TrainModel::nll_sum(&model, &loaded.batch(&[&example]), &device);
                    nll.into_data().convert::<f64>().try_to_vec::<f64>().unwrap()[0]
                })
                .collect();
            nll.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 == 0
        })
        .count();
    println!("t5 multiple choice after the finetune: {correct}/{total}");
    assert_eq!((correct, total), (expected, 8));
}

/// 30 steps on chat data: held-out loss goes down; the saved adapter, reloaded, gives the final eval loss exactly.
#[test]
fn a_short_run_learns_and_its_adapter_reproduces_the_final_eval_loss() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        data: tiny().join("chat-train.jsonl").display().to_string(),
        eval_data: Some(tiny().join("chat-heldout.jsonl").display().to_string()),
        micro_batch_size: 4,
        grad_accum: 2,
        lr: 3e-3,
        max_steps: 30,
        eval_steps: 10,
        save_steps: 10,
        lora_dropout: 0.05,
        sample_prompt: "What does the word \"camp\" mean?".into(),
        ..base_config(dir.path())
    };
    let summary = trainer::train(&config, None, &mut Quiet).unwrap();
    let (before, after) = (summary.eval_loss_before.unwrap(), summary.eval_loss_after.unwrap());
    println!("  held-out loss {before:.4} -> {after:.4}; train {:.4} -> {:.4}", summary.losses[0], summary.losses[29]);
    assert!(after < before - 0.1, "held-out loss {before} -> {after}");
    for file in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "train_config.toml",
        "loss.png",
        "checkpoint-30/optimizer.safetensors",
    ] {
        assert!(dir.path().join(file).exists(), "{file} missing");
    }
    assert_eq!(
        train::checkpoint::checkpoints(dir.path()).iter().map(|c| c.0).collect::<Vec<_>>(),
        [20, 30],
        "keeps the newest 2"
    );

    // Reload the adapter on a fresh model: the same held-out loss, to the bit.
    let (_, again) = reloaded_eval_loss::<llama::LoadedModel>(&config, &dir.path().join("adapter"));
    assert_eq!(again, after, "reloaded adapter eval loss");

    // The written config reproduces the run's settings.
    let written = TrainConfig::from_toml_file(&dir.path().join("train_config.toml")).unwrap();
    assert_eq!(written, config);
}

/// A run resumed from a checkpoint continues with exactly the losses of the uninterrupted run.
#[test]
fn resuming_from_a_checkpoint_gives_the_same_losses() {
    let _rng = rng_lock();
    let a = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        data: tiny().join("chat-train.jsonl").display().to_string(),
        micro_batch_size: 2,
        grad_accum: 2,
        lr: 2e-3,
        max_steps: 8,
        save_steps: 3,
        save_total_limit: 5,
        lora_dropout: 0.1,
        optimizer: train::config::OptimizerChoice::PagedAdamW8bit,
        ..base_config(a.path())
    };
    let straight = trainer::train(&config, None, &mut Quiet).unwrap();
    let b = tempfile::tempdir().unwrap();
    let resumed = trainer::train(
        &TrainConfig { output_dir: b.path().to_path_buf(), ..config.clone() },
        Some(&a.path().join("checkpoint-3")),
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(resumed.first_step, 3);
    assert_eq!(resumed.losses, straight.losses[3..], "losses after resuming");
    // Starting over in a directory that holds a run needs an explicit choice.
    let err = trainer::train(&config, None, &mut Quiet).unwrap_err().to_string();
    assert!(err.contains("already holds a run"), "{err}");
}

#[test]
fn bad_training_input_is_a_clear_error() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"text\": \n").unwrap();
    let run = |config: TrainConfig| trainer::train(&config, None, &mut Quiet).unwrap_err().to_string();
    let base = TrainConfig { max_steps: 1, ..base_config(&dir.path().join("out")) };
    let err = run(TrainConfig { data: bad.display().to_string(), ..base.clone() });
    assert!(err.contains("bad.jsonl:2: not valid JSON"), "{err}");
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    assert!(run(TrainConfig { data: empty.display().to_string(), ..base.clone() }).contains("no usable examples"));
    let err = run(TrainConfig {
        data: tiny().join("text.jsonl").display().to_string(),
        source_max_len: 1,
        target_max_len: 0,
        format: data::DatasetFormat::Alpaca,
        ..base.clone()
    });
    assert!(err.contains("missing `instruction`"), "{err}");
    let err = run(TrainConfig {
        data: tiny().join("text.jsonl").display().to_string(),
        source_max_len: 1,
        target_max_len: 0,
        ..base.clone()
    });
    assert!(err.contains("no example has a target token"), "{err}");
    // An output directory that cannot be written: an error before any work.
    let blocked = dir.path().join("file");
    std::fs::write(&blocked, "").unwrap();
    let err = run(TrainConfig {
        data: tiny().join("text.jsonl").display().to_string(),
        output_dir: blocked.join("out"),
        ..base
    });
    assert!(err.contains("cannot create the output directory"), "{err}");
}

/// `qlora eval`: loss mode agrees with the trainer's eval; multiple choice picks the likeliest choice, batched
/// with padding exactly as one choice at a time.
#[test]
fn eval_loss_and_multiple_choice() {
    use train::eval::{self, EvalArgs, EvalReport};
    let loaded =
        train::infer::load_model(&tiny().join("model-nf4").display().to_string(), &llama::LoadOptions::default())
            .unwrap();
    let limits = data::Limits::default();
    let args = EvalArgs {
        data: tiny().join("chat-heldout.jsonl"),
        format: data::DatasetFormat::Auto,
        limits,
        micro_batch_size: 3,
        shots: 0,
    };
    let EvalReport::Loss { loss, examples, .. } = eval::run(&loaded, &args).unwrap() else { panic!("loss mode") };
    assert_eq!(examples, 24);
    let report = data::read_jsonl(&args.data, data::DatasetFormat::Auto, false).unwrap();
    let tokenized = data::tokenize_all(&report.examples, loaded.tokenizer().unwrap(), &limits).unwrap().examples;
    let trainer_loss = trainer::eval_loss(&loaded, &loaded.model, &tokenized, 5).unwrap();
    assert!((loss - trainer_loss).abs() < 1e-5, "{loss} vs {trainer_loss}");

    // Answers defined as the choice the model scores best one at a time: batched scoring must agree (100%),
    // and marking the worst choice as the answer must give 0%.
    let tokenizer = loaded.tokenizer().unwrap();
    let questions = ["What is a camp?", "What does abandon mean?", "Pick a colour.", "Which is a verb?", "Say hi."];
    let choices = [
        vec!["a place", "temporary living quarters", "x"],
        vec!["to leave", "give up completely", "stay", "q"],
        vec!["red", "blue"],
        vec!["run", "table", "quickly"],
        vec!["hi", "hello there"],
    ];
    let mut best_lines = String::new();
    let mut worst_lines = String::new();
    assert_same_len(&questions, &choices, "questions and their choices");
    for (q, cs) in questions.iter().zip(&choices) {
        let prompt = tokenizer.encode(&format!("<s>Question: {q}\nAnswer:"), false).unwrap();
        let scores: Vec<f64> = cs
            .iter()
            .map(|c| {
                let cont = tokenizer.encode(&format!(" {c}"), false).unwrap();
                let ex = data::TokenizedExample {
                    ids: prompt.iter().copied().chain(cont.iter().copied()).collect(),
                    target: (0..prompt.len() + cont.len()).map(|i| i >= prompt.len()).collect(),
                };
                eval::nll_per_example(&loaded.model, &data::Batch::new(&[&ex], 0))[0]
            })
            .collect();
        let best = (0..cs.len()).min_by(|&a, &b| scores[a].total_cmp(&scores[b])).unwrap();
        let worst = (0..cs.len()).max_by(|&a, &b| scores[a].total_cmp(&scores[b])).unwrap();
        best_lines += &format!("{}\n", serde_json::json!({"question": q, "choices": cs, "answer": best}));
        let letter = ((b'A' + worst as u8) as char).to_string();
        worst_lines += &format!("{}\n", serde_json::json!({"question": q, "choices": cs, "answer": letter}));
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, lines, expected) in [("best.jsonl", &best_lines, 1.0), ("worst.jsonl", &worst_lines, 0.0)] {
        std::fs::write(dir.path().join(name), lines).unwrap();
        let report = eval::run(&loaded, &EvalArgs { data: dir.path().join(name), shots: 0, ..args.clone() }).unwrap();
        assert_eq!(
            report,
            EvalReport::MultipleChoice { accuracy: expected, correct: (expected * 5.0) as usize, total: 5, shots: 0 },
            "{name}"
        );
    }
    let two_shot =
        eval::run(&loaded, &EvalArgs { data: dir.path().join("best.jsonl"), shots: 2, ..args.clone() }).unwrap();
    assert!(matches!(two_shot, EvalReport::MultipleChoice { total: 3, shots: 2, .. }), "{two_shot:?}");
    std::fs::write(dir.path().join("bad.jsonl"), "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 7}\n")
        .unwrap();
    let err =
        eval::run(&loaded, &EvalArgs { data: dir.path().join("bad.jsonl"), ..args.clone() }).unwrap_err().to_string();
    assert!(err.ends_with("bad.jsonl:1: `answer` must be an index below 2 or a letter"), "{err}");
}

/// A diverging run stops with a clear message before updating on a non-finite loss; its checkpoints stay.
#[test]
fn a_diverging_run_stops_and_keeps_its_last_good_checkpoint() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        data: tiny().join("text.jsonl").display().to_string(),
        micro_batch_size: 1,
        grad_accum: 1,
        lr: 1e35, // every parameter moves by ~1e35: the next forward overflows
        warmup_ratio: 0.0,
        max_grad_norm: 0.0,
        max_steps: 6,
        save_steps: 1,
        ..base_config(dir.path())
    };
    let err = trainer::train(&config, None, &mut Quiet).unwrap_err().to_string();
    println!("  {err}");
    assert!(err.contains("training diverged") && err.contains("the last good checkpoint is"), "{err}");
    let checkpoints = train::checkpoint::checkpoints(dir.path());
    assert!(!checkpoints.is_empty(), "a checkpoint was written before the divergence");
    let (_, state) = train::checkpoint::latest(dir.path()).unwrap();
    assert!(err.contains(&format!("checkpoint-{}", state.step)), "{err}");
    let (_, ckpt) = &checkpoints[checkpoints.len() - 1];
    let adapter = std::fs::read(ckpt.join("adapter/adapter_model.safetensors")).unwrap();
    safetensors::SafeTensors::deserialize(&adapter).unwrap();
}

/// The per-step train lines of a run's metrics.jsonl.
pub(crate) fn train_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .collect()
}

/// A QLoRA run (r 32: the 8-bit optimizer keeps 8-bit state for the tensors of ≥ 4096 elements, 32-bit for the
/// rest; grad accumulation 4, dropout) on `device` with
/// `optimizer` and an optional device budget for its state; returns the per-step losses and metrics lines.
pub(crate) fn accumulating_run(
    device: &str,
    optimizer: train::config::OptimizerChoice,
    budget_mib: f64,
) -> (Vec<f64>, Vec<serde_json::Value>) {
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        data: tiny().join("chat-train.jsonl").display().to_string(),
        micro_batch_size: 1,
        grad_accum: 4,
        lr: 5e-4,
        warmup_ratio: 0.0,
        max_steps: 3,
        lora_r: 32,
        lora_dropout: 0.1,
        optimizer,
        optimizer_device_budget_mib: budget_mib,
        optimizer_page_kib: 16,
        device: device.parse().unwrap(),
        ..base_config(dir.path())
    };
    let summary = trainer::train(&config, None, &mut Quiet).unwrap();
    (summary.losses, train_lines(dir.path()))
}

/// The device-resident step reads back only scalars: the loss and the gradient norm, 4 bytes each, per step
/// (with grad accumulation 4). A budget below the state makes the pager move pages every step.
#[test]
fn a_training_step_reads_back_only_scalars() {
    let _rng = rng_lock();
    for budget in [0.0, 0.25] {
        let (_, lines) = accumulating_run("cpu", train::config::OptimizerChoice::PagedAdamW32bit, budget);
        assert_eq!(lines.len(), 3);
        for line in &lines {
            assert_eq!(line["readback_bytes"], 8, "budget {budget}: {line}");
            let moved = line["paged_out_bytes"].as_u64().unwrap();
            assert_eq!(moved > 0, budget > 0.0, "budget {budget}: {line}");
        }
    }
}

/// A device allocation failure during a step is one clear error naming the step and what to lower; the last
/// good checkpoint stays and the run resumes from it to the losses of an uninterrupted run.
#[test]
fn a_device_out_of_memory_is_a_clear_error_and_the_run_resumes() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        data: tiny().join("text.jsonl").display().to_string(),
        micro_batch_size: 1,
        max_steps: 5,
        save_steps: 2,
        ..base_config(dir.path())
    };
    let failing = TrainConfig { inject_device_oom_at_step: Some(4), ..config.clone() };
    let err = trainer::train(&failing, None, &mut Quiet).unwrap_err();
    let message = err.to_string();
    println!("  {message}");
    assert!(matches!(err, train::TrainError::Device(_)), "{err:?}");
    for needle in ["step 4", "ran out of memory", "--micro-batch-size", "--optimizer-device-budget-mib", "checkpoint-2"]
    {
        assert!(message.contains(needle), "`{needle}` missing from: {message}");
    }
    assert_eq!(train::checkpoint::latest(dir.path()).unwrap().1.step, 2);
    let resumed = trainer::train(&config, Some(dir.path()), &mut Quiet).unwrap();
    let other = tempfile::tempdir().unwrap();
    let straight =
        trainer::train(&TrainConfig { output_dir: other.path().to_path_buf(), ..config }, None, &mut Quiet).unwrap();
    assert_eq!(resumed.first_step, 2);
    assert_eq!(resumed.losses, straight.losses[2..]);
}

/// The adapter a run wrote, by tensor name.
fn adapter_values(out: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (name, values)
        })
        .collect()
}

fn data_parallel_config(out: &Path, device: &str, grad_accum: usize) -> TrainConfig {
    TrainConfig {
        data: tiny().join("chat-train.jsonl").display().to_string(),
        micro_batch_size: 1,
        grad_accum,
        lr: 1e-3,
        warmup_ratio: 0.0,
        max_steps: 4,
        save_steps: 2,
        save_total_limit: 5,
        lora_dropout: 0.1,
        device: device.parse().unwrap(),
        ..base_config(out)
    }
}

/// Two CPU ranks × micro-batch 1 × accumulation 2 give the losses and adapter of one rank × accumulation 4 on
/// the same examples (dropout on); a 2-rank checkpoint resumes on one rank; a failing rank stops the run with
/// one error naming it, its last checkpoint kept.
#[test]
fn two_cpu_ranks_train_like_one_rank_with_double_accumulation() {
    let _rng = rng_lock();
    let (two, one) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let parallel = trainer::train(&data_parallel_config(two.path(), "cpu,cpu", 2), None, &mut Quiet).unwrap();
    let single = trainer::train(&data_parallel_config(one.path(), "cpu", 4), None, &mut Quiet).unwrap();
    println!("  2 ranks: {:?}\n  1 rank:  {:?}", parallel.losses, single.losses);
    assert_eq!(parallel.losses.len(), 4);
    let worst = max_rel_diff(&parallel.losses, &single.losses);
    assert!(worst <= 1e-6, "losses differ by {worst:e} relative");
    let (a, b) = (adapter_values(two.path()), adapter_values(one.path()));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut worst_abs = 0.0f32;
    for (key, values) in &a {
        assert_same_len(values, &b[key], key);
        worst_abs = values.iter().zip(&b[key]).fold(worst_abs, |m, (x, y)| m.max((x - y).abs()));
    }
    println!("  adapters: worst absolute difference {worst_abs:e}");
    assert!(worst_abs <= 1e-6, "adapters differ by {worst_abs:e}");
    // The per-step lines count the ranks' examples: one metrics file, written by rank 0.
    assert_eq!(train_lines(two.path()).len(), 4);

    // Resume the 2-rank run's step-2 checkpoint on one rank with accumulation 4.
    let resumed_dir = tempfile::tempdir().unwrap();
    let resumed = trainer::train(
        &data_parallel_config(resumed_dir.path(), "cpu", 4),
        Some(&two.path().join("checkpoint-2")),
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(resumed.first_step, 2);
    let worst = max_rel_diff(&resumed.losses, &single.losses[2..]);
    assert!(worst <= 1e-6, "resumed losses differ by {worst:e} relative");

    // Rank 1 runs out of memory at step 3: one error naming the rank and the step; checkpoint-2 stays.
    let failing_dir = tempfile::tempdir().unwrap();
    let failing =
        TrainConfig { inject_device_oom_at_step: Some(3), ..data_parallel_config(failing_dir.path(), "cpu,cpu", 2) };
    let err = trainer::train(&failing, None, &mut Quiet).unwrap_err().to_string();
    println!("  {err}");
    assert!(err.contains("rank 1") && err.contains("step 3") && err.contains("ran out of memory"), "{err}");
    assert_eq!(train::checkpoint::latest(failing_dir.path()).unwrap().1.step, 2);
}
