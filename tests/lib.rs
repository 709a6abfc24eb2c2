//! Shared helpers for the workspace end-to-end tests (`e2e/`): reading the golden fixtures that
//! `xtask/fixtures/*.py` made with the reference implementations.

use std::path::{Path, PathBuf};

/// The fixtures directory, `tests/fixtures/` of the workspace.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// burn's flex backend has one process-wide random generator: tests that seed it and expect the same draws
/// (dropout masks of a resumed run, LoRA initialisation) hold this lock while they use it.
pub fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
