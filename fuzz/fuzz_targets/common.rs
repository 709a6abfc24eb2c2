//! Shared by the fuzz targets: split one input into several files, and fixture contents for the files the
//! input does not replace (so the fuzzer reaches past the first check).

use std::path::{Path, PathBuf};

/// Separator between the files of one input.
pub const SEPARATOR: &[u8] = b"\n--8<--\n";

/// The parts of `data` separated by [`SEPARATOR`].
pub fn parts(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        out.push(&rest[..i]);
        rest = &rest[i + SEPARATOR.len()..];
    }
    out.push(rest);
    out
}

/// The workspace's fixtures directory.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// Writes `files` (name, bytes) into a fresh temporary directory.
pub fn dir_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).expect("write");
    }
    dir
}

/// Makes panics fatal (as libFuzzer wants) except those raised inside the `tokenizers` crate, which our
/// tokenizer loader catches and reports as errors: without this, libFuzzer's hook would abort on them first.
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let inside_tokenizers = info.location().is_some_and(|l| l.file().contains("/tokenizers-"));
            if !inside_tokenizers {
                eprintln!("{info}");
                std::process::abort();
            }
        }));
    });
}
