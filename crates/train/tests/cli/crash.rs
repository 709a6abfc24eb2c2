//! A training run killed with SIGKILL (during a step, during a checkpoint write) leaves only complete files,
//! and `qlora train --resume` then produces the losses of an uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-train")
}

fn qlora(out: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qlora"));
    cmd.args(["train", "--model"])
        .arg(fixtures().join("model-nf4"))
        .arg("--data")
        .arg(fixtures().join("chat-train.jsonl"))
        .args(["--lora-r", "8", "--micro-batch-size", "2", "--grad-accum", "2", "--max-steps", "12", "--lr", "2e-3"])
        .args([
            "--save-steps",
            "2",
            "--save-total-limit",
            "3",
            "--eval-steps",
            "0",
            "--lora-dropout",
            "0.1",
            "--sample-prompt",
            "",
        ])
        .arg("--output-dir")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn train_losses(out: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// Every visible entry of the output directory is complete.
fn assert_only_complete_files(out: &Path) {
    for entry in std::fs::read_dir(out).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue; // temporary files: removed or restored on the next start
        }
        if name.starts_with("checkpoint-") {
            let dir = entry.path();
            let state: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap()).unwrap();
            assert_eq!(format!("checkpoint-{}", state["step"]), name);
            for file in ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.safetensors"] {
                let bytes = std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{name}/{file}: {e}"));
                if file.ends_with(".safetensors") {
                    safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{name}/{file}: {e}"));
                }
            }
        }
    }
}

/// Starts a run and kills it when `kill_when` says so (or lets it finish).
fn run_and_kill(out: &Path, kill_when: impl Fn(&Path) -> bool) -> bool {
    let mut child = qlora(out).spawn().unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the run failed before it could be killed");
            return false;
        }
        if kill_when(out) {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return true;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "run did not progress");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn killed_runs_resume_with_the_losses_of_an_uninterrupted_run() {
    // A kill point from the clock, so that runs of the test cover different steps; QLORA_CRASH_SEED replays one.
    let seed: u64 = match std::env::var("QLORA_CRASH_SEED") {
        Ok(s) => s.trim().parse().unwrap_or_else(|e| panic!("QLORA_CRASH_SEED={s:?}: {e}")),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64,
    };
    eprintln!("seed {seed} (replay with QLORA_CRASH_SEED={seed})");
    let kill_at_step = 3 + (seed % 7) as usize;
    eprintln!("killing during a step once {kill_at_step} metrics lines are written");
    let straight = tempfile::tempdir().unwrap();
    assert!(qlora(straight.path()).status().unwrap().success());
    let expected = train_losses(straight.path());
    assert_eq!(expected.len(), 12);

    type KillWhen = Box<dyn Fn(&Path) -> bool>;
    let scenarios: [(&str, KillWhen); 2] = [
        (
            "during a step",
            Box::new(move |out: &Path| {
                std::fs::read_to_string(out.join("metrics.jsonl")).is_ok_and(|t| t.lines().count() >= kill_at_step)
            }),
        ),
        (
            "during a checkpoint write",
            Box::new(|out: &Path| {
                std::fs::read_dir(out)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().contains(".partial-"))
                    || std::fs::read_to_string(out.join("metrics.jsonl")).is_ok_and(|t| t.lines().count() >= 9)
            }),
        ),
    ];
    for (what, kill_when) in scenarios {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let killed = run_and_kill(&out, kill_when);
        println!("{what}: killed = {killed}, losses logged before the kill: {}", train_losses(&out).len());
        assert_only_complete_files(&out);
        if killed {
            let mut resume = Command::new(env!("CARGO_BIN_EXE_qlora"));
            resume.args(["train", "--resume"]).arg(&out).stdout(Stdio::null()).stderr(Stdio::piped());
            let output = resume.output().unwrap();
            assert!(output.status.success(), "resume failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        assert_only_complete_files(&out);
        assert_eq!(train_losses(&out), expected, "{what}: losses after resuming (QLORA_CRASH_SEED={seed})");
    }
}

/// A full disk (stood in for by a file-size limit: writes past it fail with EFBIG) stops the run with a clear
/// message and a non-zero exit, and leaves no partial checkpoint behind.
#[test]
fn a_full_disk_is_a_clear_error_and_leaves_nothing_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let inner = qlora(&out);
    let program = inner.get_program().to_owned();
    let args: Vec<_> = inner.get_args().map(|a| a.to_owned()).collect();
    // 64 KiB: the config and metrics fit, the first checkpoint's adapter and optimizer state do not.
    let output = Command::new("bash")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 64; exec \"$0\" \"$@\"")
        .arg(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the run must fail");
    assert!(stderr.contains("File too large") && stderr.contains(&out.display().to_string()), "{stderr}");
    assert_only_complete_files(&out);
    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    assert!(train_losses(&out).len() >= 2, "the steps before the failed checkpoint are logged");
}
