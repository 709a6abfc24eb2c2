//! `qlora train` settings: one struct that is both the command line (clap) and the TOML config file that
//! reproduces a run (`train_config.toml` in the output directory, accepted back with `--config`).

use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// Everything a training run depends on. Defaults are QLoRA's recipe where it has one.
#[derive(Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// An HF model directory, a bitsandbytes 4-bit checkpoint, a .gguf file, a hub id, or `smollm2`.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Quantize the linear weights on load: nf4, fp4 or none (a bitsandbytes checkpoint is 4-bit already).
    #[arg(long, default_value = "nf4")]
    pub quant: String,
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Keep f32 absmax statistics (double quantization is on by default).
    #[arg(long)]
    pub no_double_quant: bool,
    /// Compute dtype of activations and matmuls: f32, or bf16 (QLoRA's `--bf16`: the 4-bit base decodes to
    /// bf16, norms and the loss stay f32).
    #[arg(long, default_value = "f32")]
    pub compute_dtype: String,
    /// cpu, or wgpu / cuda / cuda:N in builds with those features.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Continue from an existing PEFT adapter instead of a fresh LoRA.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,

    /// LoRA rank.
    #[arg(long, default_value_t = 64)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// `all-linear`, a comma-separated list of module names, or `regex:<pattern>`.
    #[arg(long, default_value = "all-linear")]
    pub target_modules: String,

    /// Training data: a JSONL file, or `wordnet` (the embedded dataset).
    #[arg(long, default_value = "wordnet")]
    pub data: String,
    /// Held-out data for eval (JSONL); `wordnet` data brings its own held-out split.
    #[arg(long)]
    pub eval_data: Option<String>,
    /// auto, alpaca, oasst, chat or text.
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// Skip malformed JSONL lines (reported by number) instead of stopping.
    #[arg(long)]
    pub skip_bad_lines: bool,
    #[arg(long, default_value_t = 384)]
    pub source_max_len: usize,
    #[arg(long, default_value_t = 128)]
    pub target_max_len: usize,
    /// Compute the loss on the prompt too.
    #[arg(long)]
    pub train_on_source: bool,
    /// Group examples of similar length into batches (transformers' group_by_length).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub group_by_length: bool,
    /// Keep the file order (no shuffling).
    #[arg(long)]
    pub no_shuffle: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Examples per forward/backward.
    #[arg(long, default_value_t = 1)]
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step (QLoRA: 16 examples per step).
    #[arg(long, default_value_t = 16)]
    pub grad_accum: usize,
    /// Optimizer steps (0: derive from --epochs).
    #[arg(long, default_value_t = 0)]
    pub max_steps: u64,
    #[arg(long, default_value_t = 1.0)]
    pub epochs: f64,
    /// Stop after this many seconds of training (0: no limit); the run still saves and evaluates.
    #[arg(long, default_value_t = 0)]
    pub time_limit_s: u64,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// constant, linear or cosine.
    #[arg(long, default_value = "constant")]
    pub schedule: String,
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 0.3)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    /// paged_adamw_32bit or paged_adamw_8bit.
    #[arg(long, default_value = "paged_adamw_32bit")]
    pub optimizer: String,
    /// Device budget for optimizer state in MiB (0: unlimited, state stays resident).
    #[arg(long, default_value_t = 0)]
    pub optimizer_device_budget_mib: usize,
    /// Recompute memory-bound activations in the backward pass.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub gradient_checkpointing: bool,

    /// Where the adapter, checkpoints, metrics, plot and config go.
    #[arg(long, default_value = "runs/qlora")]
    pub output_dir: PathBuf,
    /// Evaluate every N steps (0: only at the end).
    #[arg(long, default_value_t = 50)]
    pub eval_steps: u64,
    /// Use at most this many held-out examples per eval (0: all).
    #[arg(long, default_value_t = 64)]
    pub eval_samples: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 50)]
    pub save_steps: u64,
    /// Keep this many checkpoints.
    #[arg(long, default_value_t = 2)]
    pub save_total_limit: usize,
    /// Start over in an output directory that already holds a run (its checkpoints and metrics are replaced).
    #[arg(long)]
    pub overwrite_output_dir: bool,
    /// A held-out prompt answered before and after training (empty: none).
    #[arg(long, default_value = "")]
    pub sample_prompt: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: TrainConfig,
        }
        <Wrapper as clap::Parser>::parse_from(["qlora"]).config
    }
}

impl TrainConfig {
    /// Reads a TOML config file written by a previous run (or by hand; missing keys take the defaults).
    pub fn from_toml_file(path: &Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| TrainError::Input(format!("{}: {e}", path.display())))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serializes")
    }

    /// The command line over an optional config file: flags given on the command line win, the file gives
    /// the rest, the defaults fill what neither sets.
    pub fn from_matches_over_file(
        matches: &ArgMatches,
        file: Option<&Path>,
    ) -> Result<Self, TrainError> {
        let cli =
            TrainConfig::from_arg_matches(matches).map_err(|e| TrainError::Input(e.to_string()))?;
        let Some(file) = file else { return Ok(cli) };
        let base = TrainConfig::from_toml_file(file)?;
        let mut merged = toml::Table::try_from(&base).expect("table");
        let cli_table = toml::Table::try_from(&cli).expect("table");
        for id in matches.ids() {
            let name = id.as_str();
            if matches.value_source(name) == Some(ValueSource::CommandLine) {
                match cli_table.get(name) {
                    Some(v) => {
                        merged.insert(name.to_string(), v.clone());
                    }
                    None => {
                        merged.remove(name);
                    }
                }
            }
        }
        merged
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::Input(format!("{}: {e}", file.display())))
    }
}
