//! `cargo xtask`: the project's chores, in Rust so they run wherever cargo does.
//!
//! - `cargo xtask ci`: what CI runs (`.ci/run` calls it): the workspace test suite (which drives the `qlora`
//!   binary's commands through their library functions and its argument parser).
//! - `cargo xtask fixtures`: remake the golden fixtures with the pinned reference implementations
//!   (transformers, PEFT, bitsandbytes on the CPU) in a venv; needs python3 and PyPI.
//! - `cargo xtask bench`: the criterion benchmarks that docs/benchmarks.md quotes.

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
        Task::Bench => {
            run(cargo().args(["bench", "-p", "qlora-nf4", "--bench", "dequantize"]))?;
            run(cargo().args(["bench", "-p", "qlora-optim", "--bench", "optimizer_step"]))?;
        }
    }
    Ok(())
}

