//! `cargo xtask`: the project's chores, in Rust so they run wherever cargo does.
//!
//! - `cargo xtask ci`: what CI runs (`.ci/run` calls it): the workspace test suite (which drives the `qlora`
//!   binary's commands through their library functions and its argument parser).
//! - `cargo xtask fixtures`: remake the golden fixtures with the pinned reference implementations
//!   (transformers, PEFT, bitsandbytes on the CPU) in a venv; needs python3 and PyPI.
//! - `cargo xtask bench`: the benchmarks that docs/benchmarks.md quotes.
//! - `cargo xtask train [QLORA TRAIN FLAGS]`: the main job — a release build of `qlora`, then `qlora train` on
//!   SmolLM2-135M-Instruct (NF4 + DQ, LoRA r 64 on all linear layers) and the embedded WordNet dataset for a
//!   few minutes on the CPU, with a before/after answer to a held-out question. Any flag passes through.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the test suite as CI does.
    Ci,
    /// Remake the golden fixtures in tests/fixtures with the pinned reference implementations.
    Fixtures {
        /// The Python virtual environment to create or reuse.
        #[arg(long, default_value = "target/ref-venv")]
        venv: PathBuf,
    },
    /// Run the criterion benchmarks (never while a build runs on the same machine).
    Bench,
    /// Finetune SmolLM2-135M-Instruct with QLoRA on the embedded WordNet dataset (flags pass to `qlora train`).
    #[command(disable_help_flag = true)]
    Train {
        /// `cpu` (flex backend) or `cuda`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Flags for `qlora train` (they override the defaults of this job).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace").to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.current_dir(root()).status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Ci => {
            // One build: the CLI is exercised by the tests themselves (a separate `cargo run` would resolve
            // burn's features differently and compile it a second time).
            run(cargo().args(["test", "--workspace", "--no-fail-fast"]))?;
        }
        Task::Fixtures { venv } => {
            let venv = root().join(venv);
            let python = venv.join("bin/python");
            if !python.exists() {
                run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
            }
            run(Command::new(&python).args(["-m", "pip", "install", "-q", "-r", "xtask/fixtures/requirements.txt"]))?;
            run(Command::new(&python).args(["xtask/fixtures/make_nf4_fixtures.py", "tests/fixtures/nf4"]))?;
            run(Command::new(&python).args(["xtask/fixtures/make_quant_fixtures.py", "tests/fixtures"]))?;
            run(Command::new(&python).args(["xtask/fixtures/make_optim_fixtures.py", "tests/fixtures/optim"]))?;
        }
        Task::Train { device, args } => {
            if device != "cpu" {
                bail!("--device {device}: this build trains on the CPU; the CUDA backend (feature `cuda`) comes with kernels-cubecl");
            }
            run(cargo().args(["build", "--release", "-p", "qlora-train", "--bin", "qlora"]))?;
            // The demo's defaults: a few minutes on 2 CPU cores; every one can be overridden.
            let defaults = [
                "--model", "smollm2", "--quant", "nf4", "--data", "wordnet",
                "--micro-batch-size", "4", "--grad-accum", "4", "--max-steps", "10", "--time-limit-s", "300",
                "--lr", "1e-3", "--eval-steps", "10", "--eval-samples", "32", "--save-steps", "10",
                "--sample-prompt", "What does the word \"camp\" mean?",
            ];
            let given: Vec<&str> = args.iter().filter(|a| a.starts_with("--")).map(|a| a.split('=').next().unwrap_or(a)).collect();
            let mut full: Vec<String> = vec!["train".into()];
            // A resumed or config-file run takes its settings from there.
            if !given.contains(&"--config") && !given.contains(&"--resume") {
                for pair in defaults.chunks(2) {
                    if !given.contains(&pair[0]) {
                        full.extend(pair.iter().map(|s| s.to_string()));
                    }
                }
                if !given.contains(&"--output-dir") {
                    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                    full.extend(["--output-dir".to_string(), format!("runs/wordnet-{stamp}")]);
                }
            }
            full.extend(args);
            run(Command::new(root().join("target/release/qlora")).args(&full))?;
        }
        Task::Bench => {
            run(cargo().args(["bench", "-p", "qlora-nf4", "--bench", "dequantize"]))?;
            run(cargo().args(["bench", "-p", "qlora-optim", "--bench", "optimizer_step"]))?;
        }
    }
    Ok(())
}

