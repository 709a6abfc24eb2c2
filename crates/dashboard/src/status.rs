//! `status.json`: what a run's directory says about the run's state. `qlora train` writes it (atomically,
//! through a rename) when the run starts, once the number of steps is known, and when it ends:
//!
//! ```json
//! {"state":"running","pid":4242,"host":"box","total_steps":10,"started_unix":1764640000.5,"updated_unix":...}
//! {"state":"finished", ...}
//! {"state":"stopped","message":"training diverged: ...", ...}
//! ```
//!
//! A trainer killed outright cannot write "stopped": the dashboard reads a "running" file whose process is gone
//! (same host, no such pid) as stopped. Runs written before this file existed are read from what they left:
//! a final `adapter/` means finished; otherwise a `metrics.jsonl` changed within [`LEGACY_RUNNING_S`] seconds
//! means running, and anything older stopped.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The file's name in a run directory.
pub const STATUS_FILE: &str = "status.json";
/// Files larger than this are not status files.
const MAX_STATUS_BYTES: u64 = 64 << 10;
/// A run without a status file counts as running while its metrics changed this recently.
pub const LEGACY_RUNNING_S: f64 = 120.0;

/// The state a trainer declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Finished,
    Stopped,
}

/// The contents of `status.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusFile {
    pub state: RunState,
    /// The trainer's process id and host name (to tell a killed trainer from a running one).
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub host: Option<String>,
    /// Optimizer steps the run will take, once known.
    #[serde(default)]
    pub total_steps: Option<u64>,
    #[serde(default)]
    pub started_unix: Option<f64>,
    #[serde(default)]
    pub updated_unix: Option<f64>,
    /// Why a run stopped, or a note on how it finished.
    #[serde(default)]
    pub message: Option<String>,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's host name (Linux; `None` elsewhere).
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// Whether process `pid` exists on this machine (Linux `/proc`; assumed alive where that cannot be asked).
pub fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") && Path::new("/proc/self").exists() {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

impl StatusFile {
    /// "running" for this process, started now.
    pub fn running(total_steps: Option<u64>) -> Self {
        let now = unix_now();
        StatusFile {
            state: RunState::Running,
            pid: Some(std::process::id()),
            host: host_name(),
            total_steps,
            started_unix: Some(now),
            updated_unix: Some(now),
            message: None,
        }
    }

    /// The same run in another state, now.
    pub fn with_state(&self, state: RunState, message: Option<String>) -> Self {
        StatusFile { state, message, updated_unix: Some(unix_now()), ..self.clone() }
    }

    /// Writes `dir/status.json` through a temporary file and a rename (readers never see half a file).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!(".{STATUS_FILE}.tmp-{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec(self).expect("status serializes"))?;
        std::fs::rename(&tmp, dir.join(STATUS_FILE))
    }

    /// Reads `dir/status.json`: `Ok(None)` when there is none, `Err` with the reason when it is unreadable.
    pub fn read(dir: &Path) -> Result<Option<Self>, String> {
        let path = dir.join(STATUS_FILE);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{STATUS_FILE}: {e}")),
        };
        if meta.len() > MAX_STATUS_BYTES {
            return Err(format!("{STATUS_FILE}: {} bytes, more than a status file holds", meta.len()));
        }
        let bytes = std::fs::read(&path).map_err(|e| format!("{STATUS_FILE}: {e}"))?;
        serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("{STATUS_FILE}: {e}"))
    }
}

/// A run's state as shown, with why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShownStatus {
    pub state: RunState,
    pub detail: Option<String>,
}

/// The state of the run in `dir`, from its status file, its process and its other files.
pub fn run_status(dir: &Path, status: &Result<Option<StatusFile>, String>, metrics_mtime: Option<f64>) -> ShownStatus {
    match status {
        Ok(Some(s)) => match s.state {
            RunState::Running => {
                let here = host_name();
                let same_host = s.host.is_none() || here.is_none() || s.host == here;
                match s.pid {
                    Some(pid) if same_host && !process_alive(pid) => ShownStatus {
                        state: RunState::Stopped,
                        detail: Some(format!("the trainer (pid {pid}) ended without saying so (killed?)")),
                    },
                    _ => ShownStatus { state: RunState::Running, detail: None },
                }
            }
            state => ShownStatus { state, detail: s.message.clone() },
        },
        Ok(None) | Err(_) => {
            let note = status.as_ref().err().cloned();
            if dir.join("adapter").join("adapter_config.json").exists() {
                ShownStatus { state: RunState::Finished, detail: note }
            } else if metrics_mtime.is_some_and(|t| unix_now() - t < LEGACY_RUNNING_S) {
                ShownStatus { state: RunState::Running, detail: note }
            } else {
                let why = "no status file and no final adapter".to_string();
                ShownStatus { state: RunState::Stopped, detail: Some(note.unwrap_or(why)) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_file_round_trips_and_a_dead_trainer_reads_as_stopped() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(StatusFile::read(dir.path()), Ok(None));
        let running = StatusFile::running(Some(10));
        running.write(dir.path()).unwrap();
        let read = StatusFile::read(dir.path());
        assert_eq!(read, Ok(Some(running.clone())));
        assert_eq!(run_status(dir.path(), &read, None).state, RunState::Running, "this process is alive");

        let finished = running.with_state(RunState::Finished, None);
        finished.write(dir.path()).unwrap();
        assert_eq!(run_status(dir.path(), &StatusFile::read(dir.path()), None).state, RunState::Finished);
        let stopped = running.with_state(RunState::Stopped, Some("diverged".into()));
        assert_eq!(
            run_status(dir.path(), &Ok(Some(stopped)), None),
            ShownStatus { state: RunState::Stopped, detail: Some("diverged".into()) }
        );
        if cfg!(target_os = "linux") {
            // A pid past the kernel's limit exists nowhere.
            let gone = StatusFile { pid: Some(u32::MAX - 1), ..running };
            assert_eq!(run_status(dir.path(), &Ok(Some(gone)), None).state, RunState::Stopped);
        }
        assert!(dir.path().read_dir().unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains("tmp")));
    }

    #[test]
    fn runs_without_a_status_file_are_read_from_their_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATUS_FILE), b"{broken").unwrap();
        let broken = StatusFile::read(dir.path());
        assert!(broken.as_ref().is_err_and(|e| e.starts_with("status.json")), "{broken:?}");
        let now = unix_now();
        assert_eq!(run_status(dir.path(), &broken, Some(now)).state, RunState::Running);
        assert_eq!(run_status(dir.path(), &Ok(None), Some(now - 3600.0)).state, RunState::Stopped);
        assert_eq!(run_status(dir.path(), &Ok(None), None).state, RunState::Stopped);
        std::fs::create_dir_all(dir.path().join("adapter")).unwrap();
        std::fs::write(dir.path().join("adapter/adapter_config.json"), b"{}").unwrap();
        assert_eq!(run_status(dir.path(), &Ok(None), None).state, RunState::Finished);
    }
}
