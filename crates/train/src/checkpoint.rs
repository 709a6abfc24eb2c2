//! Checkpoints that survive a crash: each is written into a hidden temporary directory, every file is
//! fsynced, and the directory is renamed into place (`checkpoint-<step>`), so a checkpoint directory either
//! exists complete or not at all. Older checkpoints beyond the limit are removed only after the new one is
//! in place.

use std::fs;
use std::path::{Path, PathBuf};

use data::DataCursor;
use lora::LoraConfig;
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::family::TrainModel;

/// Where a run is: enough, with the adapter and optimizer files beside it, to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// The data position after the last step (the shuffle order derives from the seed and the epoch).
    pub cursor: DataCursor,
    /// The configuration of the run, for the record.
    pub config_toml: String,
}

const STATE_FILE: &str = "trainer_state.json";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

/// Creates the output directory and checks that it is writable, before any work is done.
pub fn prepare_output_dir(out: &Path) -> Result<(), TrainError> {
    fs::create_dir_all(out)
        .map_err(|e| TrainError::Input(format!("cannot create the output directory {}: {e}", out.display())))?;
    // Temporary directories of a run that was killed mid-write are incomplete by construction: remove them.
    for entry in fs::read_dir(out).map_err(io(out))?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let path = entry.path();
        if let Some((original, _)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".old-")) {
            // Killed between moving the previous version aside and putting the new one in place: restore it.
            let target = out.join(original);
            if !target.exists() {
                fs::rename(&path, &target).map_err(io(&path))?;
                continue;
            }
        }
        if name.starts_with('.') && (name.contains(".partial") || name.contains(".old-") || name.contains(".tmp-")) {
            if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) }.map_err(io(&path))?;
        }
    }
    let probe = out.join(format!(".write-test-{}", std::process::id()));
    fs::write(&probe, b"ok")
        .map_err(|e| TrainError::Input(format!("the output directory {} is not writable: {e}", out.display())))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

fn fsync_tree(dir: &Path) -> Result<(), TrainError> {
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        if path.is_dir() {
            fsync_tree(&path)?;
        } else {
            fs::File::open(&path).and_then(|f| f.sync_all()).map_err(io(&path))?;
        }
    }
    fsync_dir(dir)
}

fn fsync_dir(dir: &Path) -> Result<(), TrainError> {
    fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

/// Writes a directory atomically: `fill` writes into a temporary sibling, which then replaces `target`.
pub fn write_dir_atomically(
    target: &Path,
    fill: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let parent = target.parent().unwrap_or(Path::new("."));
    let name = target.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    if let Err(e) = fill(&tmp).and_then(|_| fsync_tree(&tmp)) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if target.exists() {
        fs::rename(target, &old).map_err(io(target))?;
    }
    fs::rename(&tmp, target).map_err(io(target))?;
    fsync_dir(parent)?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(())
}

/// Writes the model's adapters as a PEFT adapter directory (files written atomically one by one).
pub fn write_adapter<M: TrainModel>(model: &M, lora: &LoraConfig, dir: &Path, base: &str) -> Result<(), TrainError> {
    model.save_peft_adapter(dir, lora, base)
}

/// Writes the adapter directory as a whole, atomically.
pub fn write_adapter_atomically<M: TrainModel>(
    model: &M,
    lora: &LoraConfig,
    dir: &Path,
    base: &str,
) -> Result<(), TrainError> {
    write_dir_atomically(dir, |tmp| write_adapter(model, lora, tmp, base))
}

fn checkpoint_step(path: &Path) -> Option<u64> {
    path.file_name()?.to_str()?.strip_prefix("checkpoint-")?.parse().ok()
}

/// Checkpoint directories under `out`, oldest first.
pub fn checkpoints(out: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| checkpoint_step(&e.path()).map(|s| (s, e.path())))
        .filter(|(_, p)| p.join(STATE_FILE).exists())
        .collect();
    found.sort();
    found
}

/// Saves a checkpoint `checkpoint-<step>` under `out` (files by `fill`, then the trainer state) and keeps the
/// newest `keep` checkpoints.
pub fn save(
    out: &Path,
    state: &TrainerState,
    keep: usize,
    fill: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<PathBuf, TrainError> {
    let target = out.join(format!("checkpoint-{}", state.step));
    write_dir_atomically(&target, |tmp| {
        fill(tmp)?;
        let json = serde_json::to_string_pretty(state).expect("state serializes");
        fs::write(tmp.join(STATE_FILE), json).map_err(io(&tmp.join(STATE_FILE)))
    })?;
    let all = checkpoints(out);
    if all.len() > keep.max(1) {
        for (_, old) in &all[..all.len() - keep.max(1)] {
            fs::remove_dir_all(old).map_err(io(old))?;
        }
    }
    Ok(target)
}

/// The checkpoint to resume from: `dir` itself if it is one, else the newest under it.
pub fn latest(dir: &Path) -> Result<(PathBuf, TrainerState), TrainError> {
    let ckpt = if dir.join(STATE_FILE).exists() {
        dir.to_path_buf()
    } else {
        checkpoints(dir)
            .pop()
            .map(|(_, p)| p)
            .ok_or_else(|| TrainError::Input(format!("{}: no checkpoint to resume from", dir.display())))?
    };
    let path = ckpt.join(STATE_FILE);
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| TrainError::Input(format!("{}: {e}", path.display())))?;
    Ok((ckpt, state))
}
