//! Shared helpers for the workspace end-to-end tests (`e2e/`): reading the golden fixtures that
//! `xtask/fixtures/*.py` made with the reference implementations.

use std::path::{Path, PathBuf};

/// The fixtures directory, `tests/fixtures/` of the workspace.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}
