//! `qlora train` settings: one struct that is both the command line (clap) and the TOML config file that
//! reproduces a run (`train_config.toml` in the output directory, accepted back with `--config`).

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches, ValueEnum};
use data::DatasetFormat;
use nf4::QuantType;
use optim::{AdamPrecision, ScheduleKind};
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// `--quant`: the 4-bit type a model's linear weights are quantized to on load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantChoice {
    /// Keep the weights dense (a bitsandbytes checkpoint stays 4-bit).
    None,
    Nf4,
    Fp4,
}

impl QuantChoice {
    pub fn quant_type(self) -> Option<QuantType> {
        match self {
            QuantChoice::None => None,
            QuantChoice::Nf4 => Some(QuantType::Nf4),
            QuantChoice::Fp4 => Some(QuantType::Fp4),
        }
    }

    /// The quantization applied on load (`None`: keep dense).
    pub fn quant_config(self, blocksize: usize, double_quant: bool) -> Option<quant::QuantConfig> {
        self.quant_type().map(|qt| {
            quant::QuantConfig::new().with_quant_type(qt).with_blocksize(blocksize).with_double_quant(double_quant)
        })
    }
}

/// `--compute-dtype` of training: QLoRA computes in f32 or bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[value(alias = "float32")]
    #[serde(alias = "float32")]
    F32,
    #[value(alias = "bfloat16")]
    #[serde(alias = "bfloat16")]
    Bf16,
}

impl ComputeDtype {
    pub fn dtype(self) -> DType {
        match self {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::Bf16 => "bf16",
        }
    }
}

/// `--dtype` of inference (`generate`, `chat`, `forward`, `eval`): f16 too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InferenceDtype {
    F32,
    Bf16,
    F16,
}

impl InferenceDtype {
    pub fn dtype(self) -> DType {
        match self {
            InferenceDtype::F32 => DType::F32,
            InferenceDtype::Bf16 => DType::BF16,
            InferenceDtype::F16 => DType::F16,
        }
    }
}

/// `--optimizer`: QLoRA's paged AdamW with 32-bit or 8-bit blockwise state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum OptimizerChoice {
    #[value(name = "paged_adamw_32bit", aliases = ["adamw_32bit", "adamw"])]
    #[serde(rename = "paged_adamw_32bit", alias = "adamw_32bit", alias = "adamw")]
    PagedAdamW32bit,
    #[value(name = "paged_adamw_8bit", alias = "adamw_8bit")]
    #[serde(rename = "paged_adamw_8bit", alias = "adamw_8bit")]
    PagedAdamW8bit,
}

impl OptimizerChoice {
    pub fn precision(self) -> AdamPrecision {
        match self {
            OptimizerChoice::PagedAdamW32bit => AdamPrecision::Bits32,
            OptimizerChoice::PagedAdamW8bit => AdamPrecision::Bits8,
        }
    }
}

/// `--device`: `cpu` (burn's flex), `wgpu`, `cuda` or `cuda:N`. The spelling is checked when the command
/// line or config file is parsed; whether this build and machine have the device, when it is opened
/// ([`crate::device::open`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    Cpu,
    Wgpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = TrainError;
    fn from_str(spec: &str) -> Result<Self, TrainError> {
        match spec.trim().to_ascii_lowercase().as_str() {
            "cpu" | "flex" => Ok(DeviceSpec::Cpu),
            "wgpu" => Ok(DeviceSpec::Wgpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| TrainError::Input(format!("--device {spec}: expected cpu, wgpu, cuda or cuda:N"))),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Wgpu => f.write_str("wgpu"),
            DeviceSpec::Cuda(0) => f.write_str("cuda"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `--device` of training: one device, or one per data-parallel rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Devices(pub Vec<DeviceSpec>);

impl Devices {
    /// The first (rank 0's) device.
    pub fn first(&self) -> DeviceSpec {
        self.0[0]
    }
}

impl std::str::FromStr for Devices {
    type Err = TrainError;
    fn from_str(spec: &str) -> Result<Self, TrainError> {
        let devices = spec.split(',').map(str::parse).collect::<Result<Vec<DeviceSpec>, _>>()?;
        if devices.is_empty() {
            return Err(TrainError::Input("--device: name at least one device".into()));
        }
        Ok(Devices(devices))
    }
}

impl std::fmt::Display for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&names.join(","))
    }
}

impl TryFrom<String> for Devices {
    type Error = TrainError;
    fn try_from(s: String) -> Result<Self, TrainError> {
        s.parse()
    }
}

impl From<Devices> for String {
    fn from(d: Devices) -> String {
        d.to_string()
    }
}

impl From<DeviceSpec> for Devices {
    fn from(d: DeviceSpec) -> Devices {
        Devices(vec![d])
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = TrainError;
    fn try_from(s: String) -> Result<Self, TrainError> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

/// Everything a training run depends on. Defaults are QLoRA's recipe where it has one.
#[derive(Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// An HF model directory, a bitsandbytes 4-bit checkpoint, a .gguf file, a hub id, or `smollm2`.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Quantize the linear weights on load (a bitsandbytes checkpoint is 4-bit already).
    #[arg(long, value_enum, default_value = "nf4")]
    pub quant: QuantChoice,
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Keep f32 absmax statistics (double quantization is on by default).
    #[arg(long)]
    pub no_double_quant: bool,
    /// Compute dtype of activations and matmuls: f32, or bf16 (QLoRA's `--bf16`: the 4-bit base decodes to
    /// bf16, norms and the loss stay f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub compute_dtype: ComputeDtype,
    /// cpu, or wgpu / cuda / cuda:N in builds with those features; several, comma-separated, train data
    /// parallel with one rank per device (`cuda:0,cuda:1`; `cpu,cpu` for tests).
    #[arg(long, default_value = "cpu")]
    pub device: Devices,
    /// Data parallel on the first N CUDA GPUs (`cuda:0` … `cuda:N-1`), instead of `--device`.
    #[arg(long)]
    pub devices: Option<usize>,
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
    /// auto, alpaca, oasst, chat, text or input-output.
    #[arg(long, default_value = "auto")]
    pub format: DatasetFormat,
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
    pub schedule: ScheduleKind,
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 0.3)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(long, value_enum, default_value = "paged_adamw_32bit")]
    pub optimizer: OptimizerChoice,
    /// Device budget for optimizer state in MiB, fractions allowed (0: unlimited, the state stays resident);
    /// state beyond it lives in host memory and pages in for the update.
    #[arg(long, default_value_t = 0.0)]
    pub optimizer_device_budget_mib: f64,
    /// Optimizer state per page in KiB: pages move between host and device whole (the budget holds ≥ 1).
    #[arg(long, default_value_t = 1024)]
    pub optimizer_page_kib: usize,
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
    /// Testing only: step N fails as a device allocation failure would (the out-of-memory path end to end).
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub inject_device_oom_at_step: Option<u64>,
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
    /// One device per data-parallel rank (`--devices N`, else `--device`).
    pub fn rank_devices(&self) -> Vec<DeviceSpec> {
        match self.devices {
            Some(n) => (0..n).map(DeviceSpec::Cuda).collect(),
            None => self.device.0.clone(),
        }
    }
    /// Reads a TOML config file written by a previous run (or by hand; missing keys take the defaults).
    pub fn from_toml_file(path: &Path) -> Result<Self, TrainError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| TrainError::Io { path: path.to_path_buf(), source })?;
        toml::from_str(&text).map_err(|e| TrainError::Input(format!("{}: {e}", path.display())))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serializes")
    }

    /// The command line over an optional config file: flags given on the command line win, the file gives
    /// the rest, the defaults fill what neither sets.
    pub fn from_matches_over_file(matches: &ArgMatches, file: Option<&Path>) -> Result<Self, TrainError> {
        let cli = TrainConfig::from_arg_matches(matches).map_err(|e| TrainError::Input(e.to_string()))?;
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
        merged.try_into().map_err(|e: toml::de::Error| TrainError::Input(format!("{}: {e}", file.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: TrainConfig,
    }

    fn parse(args: &[&str]) -> Result<TrainConfig, String> {
        Cli::try_parse_from(std::iter::once("qlora").chain(args.iter().copied()))
            .map(|c| c.config)
            .map_err(|e| e.to_string())
    }

    /// Every choice is checked when the command line is parsed, before any work: a bad value names the
    /// flag and what it accepts.
    #[test]
    fn bad_choices_fail_at_parse_time() {
        for (flag, value) in [
            ("--quant", "nf3"),
            ("--compute-dtype", "f16"),
            ("--device", "tpu"),
            ("--format", "yaml"),
            ("--schedule", "step"),
            ("--optimizer", "sgd"),
        ] {
            let err = parse(&[flag, value]).unwrap_err();
            assert!(err.contains(flag) && err.contains(value), "{flag} {value}: {err}");
        }
    }

    #[test]
    fn choices_parse_with_their_aliases() {
        let c = parse(&[
            "--quant",
            "fp4",
            "--compute-dtype",
            "bfloat16",
            "--device",
            "cuda:1",
            "--format",
            "guanaco",
            "--schedule",
            "cosine",
            "--optimizer",
            "adamw_8bit",
        ])
        .unwrap();
        assert_eq!(c.quant, QuantChoice::Fp4);
        assert_eq!(c.compute_dtype, ComputeDtype::Bf16);
        assert_eq!(c.device, DeviceSpec::Cuda(1).into());
        assert_eq!(c.format, DatasetFormat::Oasst);
        assert_eq!(c.schedule, ScheduleKind::Cosine);
        assert_eq!(c.optimizer, OptimizerChoice::PagedAdamW8bit);
        let ranks = parse(&["--device", "cpu,cuda:1"]).unwrap();
        assert_eq!(ranks.rank_devices(), vec![DeviceSpec::Cpu, DeviceSpec::Cuda(1)]);
        assert_eq!(ranks.device.to_string(), "cpu,cuda:1");
        let gpus = parse(&["--devices", "3"]).unwrap();
        assert_eq!(gpus.rank_devices(), vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1), DeviceSpec::Cuda(2)]);
        assert!(parse(&["--device", "cpu,,cpu"]).is_err());
    }

    /// A config file round-trips, and a bad value in it is an error naming the file (not a later panic).
    #[test]
    fn config_files_round_trip_and_reject_bad_choices() {
        let dir = tempfile::tempdir().unwrap();
        let config = parse(&["--device", "cuda:2", "--optimizer", "paged_adamw_8bit", "--format", "chat"]).unwrap();
        let path = dir.path().join("train_config.toml");
        std::fs::write(&path, config.to_toml()).unwrap();
        assert_eq!(TrainConfig::from_toml_file(&path).unwrap(), config);
        for (key, bad) in
            [("device", "\"tpu\""), ("optimizer", "\"sgd\""), ("format", "\"yaml\""), ("quant", "\"nf3\"")]
        {
            let text = config
                .to_toml()
                .lines()
                .map(|l| if l.starts_with(&format!("{key} =")) { format!("{key} = {bad}") } else { l.to_string() })
                .collect::<Vec<_>>()
                .join("\n");
            std::fs::write(&path, text).unwrap();
            let err = TrainConfig::from_toml_file(&path).unwrap_err().to_string();
            assert!(err.contains("train_config.toml"), "{key}: {err}");
        }
    }
}
