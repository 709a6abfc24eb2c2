//! `cargo xtask bench`: the CPU step benchmark of issue 9, ours against transformers + PEFT + bitsandbytes.
//!
//! Ours: `qlora bench-step` (release build) per shape and compute dtype, each in its own process (peak RSS
//! is per process). The reference (`--reference`): xtask/bench/reference_step.py in a venv with the pinned
//! versions of xtask/fixtures/requirements.txt, on the same GGUF weights, shapes and thread count. Prints one
//! markdown table and, with `--write-docs`, puts it into docs/benchmarks.md (a block per set of compute dtypes
//! inside the `<!-- step-bench -->` section) with the machine, thread count, date and commit.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{cargo, root, run};

pub struct StepBenchArgs {
    pub shapes: Vec<(usize, usize)>,
    pub dtypes: Vec<String>,
    pub steps: usize,
    pub threads: usize,
    pub reference: bool,
    pub venv: PathBuf,
    pub write_docs: bool,
}

/// `4x256` → (4, 256).
pub fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let (b, t) = s.split_once('x').ok_or_else(|| format!("{s}: expected BATCHxSEQ, e.g. 4x256"))?;
    let parse = |v: &str| v.trim().parse::<usize>().map_err(|e| format!("{s}: {e}"));
    Ok((parse(b)?, parse(t)?))
}

fn json_line(output: &std::process::Output, what: &str) -> Result<Value> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("{what} failed with {}:\n{}", output.status, tail.join("\n"));
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("{what} printed no JSON line"))?;
    serde_json::from_str(line).with_context(|| format!("{what}: parsing {line}"))
}

fn ours(batch: usize, seq: usize, dtype: &str, steps: usize, threads: usize) -> Result<Value> {
    let what = format!("qlora bench-step {batch}x{seq} {dtype}");
    eprintln!("+ {what}");
    let output = Command::new(root().join("target/release/qlora"))
        .current_dir(root())
        .env("RAYON_NUM_THREADS", threads.to_string())
        .args(["bench-step", "--batch", &batch.to_string(), "--seq", &seq.to_string(), "--compute-dtype", dtype])
        .args(["--steps", &steps.to_string(), "--warmup", "1"])
        .output()
        .with_context(|| format!("starting {what}"))?;
    json_line(&output, &what)
}

fn reference_python(venv: &Path) -> Result<PathBuf> {
    let python = venv.join("bin/python");
    if !python.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(venv))?;
    }
    run(Command::new(&python).args(["-m", "pip", "install", "-q", "-r", "xtask/fixtures/requirements.txt"]))?;
    Ok(python)
}

fn reference(
    python: &Path,
    model_dir: &Path,
    batch: usize,
    seq: usize,
    dtype: &str,
    steps: usize,
    threads: usize,
) -> Result<Value> {
    let what = format!("reference step {batch}x{seq} {dtype}");
    eprintln!("+ {what}");
    let output = Command::new(python)
        .current_dir(root())
        .env("OMP_NUM_THREADS", threads.to_string())
        .args(["xtask/bench/reference_step.py", "step", "--model"])
        .arg(model_dir)
        .args(["--batch", &batch.to_string(), "--seq", &seq.to_string(), "--dtype", dtype])
        .args(["--steps", &steps.to_string(), "--warmup", "1", "--threads", &threads.to_string()])
        .output()
        .with_context(|| format!("starting {what}"))?;
    json_line(&output, &what)
}

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

fn machine() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn commit() -> String {
    let out = |args: &[&str]| {
        Command::new("git")
            .current_dir(root())
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let hash = out(&["rev-parse", "--short", "HEAD"]).unwrap_or_default();
    let dirty = out(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{hash} + uncommitted changes") } else { hash }
}

pub fn step_bench(args: StepBenchArgs) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "qlora-train", "--bin", "qlora"]))?;
    let python = if args.reference { Some(reference_python(&root().join(&args.venv))?) } else { None };
    let mut rows = Vec::new();
    let mut model_dir: Option<PathBuf> = None;
    for dtype in &args.dtypes {
        for &(batch, seq) in &args.shapes {
            let o = ours(batch, seq, dtype, args.steps, args.threads)?;
            let r = match &python {
                Some(python) => {
                    if model_dir.is_none() {
                        // The same weights: transformers dequantizes the GGUF our side loaded.
                        let gguf = o["model_path"].as_str().context("bench-step reported no model path")?.to_string();
                        let dir = root().join("target/bench-ref/smollm2-f32");
                        if !dir.join("model.safetensors").exists() {
                            run(Command::new(python)
                                .args(["xtask/bench/reference_step.py", "prepare", "--gguf", &gguf, "--out"])
                                .arg(&dir))?;
                        }
                        model_dir = Some(dir);
                    }
                    Some(reference(
                        python,
                        model_dir.as_ref().expect("prepared"),
                        batch,
                        seq,
                        dtype,
                        args.steps,
                        args.threads,
                    )?)
                }
                None => None,
            };
            eprintln!("  ours {o}\n  reference {}", r.as_ref().map_or("-".into(), |r| r.to_string()));
            rows.push((batch, seq, dtype.clone(), o, r));
        }
    }
    let mut table = String::from(
        "| shape | compute | ours s/step | reference s/step | speed (ref/ours) | ours tokens/s | ours peak RSS MiB | reference peak RSS MiB | RSS (ours/ref) |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for (batch, seq, dtype, o, r) in &rows {
        let (os, orss) = (num(o, "median_s"), num(o, "step_peak_rss_mib"));
        let (rs, rrss) = r.as_ref().map_or((f64::NAN, f64::NAN), |r| (num(r, "median_s"), num(r, "step_peak_rss_mib")));
        let opt = |v: f64, digits: usize| if v.is_nan() { "–".to_string() } else { format!("{v:.digits$}") };
        table.push_str(&format!(
            "| {batch} × {seq} | {dtype} | {} | {} | {} | {} | {} | {} | {} |\n",
            opt(os, 2),
            opt(rs, 2),
            opt(rs / os, 2),
            opt(num(o, "tokens_per_s"), 1),
            opt(orss, 0),
            opt(rrss, 0),
            opt(orss / rrss, 2)
        ));
    }
    let versions = rows
        .iter()
        .find_map(|(.., r)| r.as_ref().map(|r| r["versions"].to_string()))
        .unwrap_or_else(|| "not run".into());
    let date = Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let header = format!(
        "{date}, {}, {} threads, commit {}, median of {} steps after 1 warm-up step; peak RSS over the steps (reset after \
         loading). Reference versions: {versions}.\n\n",
        machine(),
        args.threads,
        commit(),
        args.steps
    );
    println!("\n{header}{table}");
    if args.write_docs {
        // Each set of compute dtypes has its own block inside the step-bench section, so f32 and bf16 can be
        // measured in separate runs.
        let path = root().join("docs/benchmarks.md");
        let doc = std::fs::read_to_string(&path).context("reading docs/benchmarks.md")?;
        let tag = args.dtypes.join(",");
        let (begin, end) = (format!("<!-- step-bench:{tag} -->"), format!("<!-- /step-bench:{tag} -->"));
        let block = format!("{begin}\n{header}{table}{end}");
        let updated = match (doc.find(&begin), doc.find(&end)) {
            (Some(a), Some(b)) if a < b => format!("{}{block}{}", &doc[..a], &doc[b + end.len()..]),
            _ => {
                let anchor = "<!-- /step-bench -->";
                let Some(at) = doc.find(anchor) else { bail!("docs/benchmarks.md has no {anchor} marker") };
                format!("{}{block}\n{}", &doc[..at], &doc[at..])
            }
        };
        std::fs::write(&path, updated).context("writing docs/benchmarks.md")?;
        eprintln!("wrote the table to {}", path.display());
    }
    Ok(())
}
