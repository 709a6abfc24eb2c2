//! PEFT's adapter files: `adapter_config.json` and `adapter_model.safetensors`
//! (`base_model.model.<module>.lora_A.weight` `[r, in]`, `...lora_B.weight` `[out, r]`).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use crate::{LoraConfig, LoraError, TargetModules};

/// The key prefix PEFT puts before module names.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The adapter of one module as stored: A `[r, in]` and B `[out, r]` values in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAdapter {
    pub a: (Vec<f32>, [usize; 2]),
    pub b: (Vec<f32>, [usize; 2]),
}

/// A PEFT LoRA adapter read from disk.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub config: LoraConfig,
    pub base_model_name_or_path: Option<String>,
    /// Module name (e.g. `model.layers.0.self_attn.q_proj`) → its A and B.
    pub modules: BTreeMap<String, StoredAdapter>,
}

fn cfg_err(path: &Path, reason: impl std::fmt::Display) -> LoraError {
    LoraError::Adapter(format!("{}: {reason}", path.display()))
}

/// Reads `adapter_config.json`: the fields we honour, and a clear error for those we cannot (DoRA, biases,
/// per-module rank or alpha patterns, fan-in/fan-out layouts, layer subsets, modules to save).
pub fn read_adapter_config(path: &Path) -> Result<(LoraConfig, Option<String>), LoraError> {
    let text = std::fs::read_to_string(path).map_err(|e| cfg_err(path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| cfg_err(path, format!("invalid JSON: {e}")))?;
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "LORA" {
        return Err(cfg_err(path, format!("peft_type `{peft_type}` is not LORA")));
    }
    let unsupported =
        |cond: bool, what: &str| if cond { Err(cfg_err(path, format!("{what} is not supported"))) } else { Ok(()) };
    unsupported(v.get("use_dora").and_then(Value::as_bool).unwrap_or(false), "use_dora (DoRA)")?;
    unsupported(v.get("fan_in_fan_out").and_then(Value::as_bool).unwrap_or(false), "fan_in_fan_out")?;
    unsupported(v.get("bias").and_then(Value::as_str).is_some_and(|b| b != "none"), "a LoRA bias other than \"none\"")?;
    unsupported(v.get("lora_bias").and_then(Value::as_bool).unwrap_or(false), "lora_bias")?;
    for key in ["rank_pattern", "alpha_pattern"] {
        unsupported(v.get(key).and_then(Value::as_object).is_some_and(|m| !m.is_empty()), key)?;
    }
    for key in ["layers_to_transform", "modules_to_save", "layer_replication", "trainable_token_indices"] {
        unsupported(v.get(key).is_some_and(|x| !x.is_null()), key)?;
    }
    let r = v.get("r").and_then(Value::as_u64).ok_or_else(|| cfg_err(path, "missing or invalid `r`"))? as usize;
    let alpha =
        v.get("lora_alpha").and_then(Value::as_f64).ok_or_else(|| cfg_err(path, "missing or invalid `lora_alpha`"))?;
    let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let target_modules = match v.get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => TargetModules::AllLinear,
        Some(Value::String(s)) => TargetModules::Regex(s.clone()),
        Some(Value::Array(items)) => TargetModules::Names(
            items
                .iter()
                .map(|i| i.as_str().map(String::from).ok_or_else(|| cfg_err(path, "target_modules holds a non-string")))
                .collect::<Result<_, _>>()?,
        ),
        _ => return Err(cfg_err(path, "missing `target_modules`")),
    };
    let config = LoraConfig::new()
        .with_r(r)
        .with_alpha(alpha)
        .with_dropout(dropout)
        .with_target_modules(target_modules)
        .with_use_rslora(v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false));
    if r == 0 {
        return Err(cfg_err(path, "rank r must be at least 1"));
    }
    Ok((config, v.get("base_model_name_or_path").and_then(Value::as_str).map(String::from)))
}

/// Reads a PEFT adapter directory, checking every tensor's dtype and shape against the config's rank.
pub fn read_peft_adapter(dir: &Path) -> Result<PeftAdapter, LoraError> {
    let (config, base) = read_adapter_config(&dir.join("adapter_config.json"))?;
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).map_err(|e| cfg_err(&path, e))?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| cfg_err(&path, e))?;
    type Half = Option<(Vec<f32>, [usize; 2])>;
    let mut halves: BTreeMap<String, (Half, Half)> = BTreeMap::new();
    for (key, view) in tensors.tensors() {
        let Some(rest) = key.strip_prefix(PEFT_PREFIX) else {
            return Err(cfg_err(&path, format!("tensor `{key}` does not start with `{PEFT_PREFIX}`")));
        };
        let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else {
            return Err(cfg_err(&path, format!("tensor `{key}` is not a lora_A or lora_B weight")));
        };
        let shape: [usize; 2] = view
            .shape()
            .try_into()
            .map_err(|_| cfg_err(&path, format!("tensor `{key}` is not 2-D: {:?}", view.shape())))?;
        let values = quant::checkpoint::read_float(&view, &key, &path.display().to_string())
            .map_err(|e| LoraError::Adapter(e.to_string()))?
            .into_f32();
        let rank_dim = if which == 0 { shape[0] } else { shape[1] };
        if rank_dim != config.r {
            return Err(cfg_err(&path, format!("tensor `{key}` has shape {shape:?}, but r = {}", config.r)));
        }
        let entry = halves.entry(module.to_string()).or_default();
        if which == 0 { entry.0 = Some((values, shape)) } else { entry.1 = Some((values, shape)) }
    }
    let mut modules = BTreeMap::new();
    for (module, (a, b)) in halves {
        match (a, b) {
            (Some(a), Some(b)) => {
                modules.insert(module, StoredAdapter { a, b });
            }
            _ => return Err(cfg_err(&path, format!("module `{module}` lacks its lora_A or lora_B weight"))),
        }
    }
    if modules.is_empty() {
        return Err(cfg_err(&path, "no LoRA tensors"));
    }
    Ok(PeftAdapter { config, base_model_name_or_path: base, modules })
}

/// PEFT's `task_type`: what kind of model the adapter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskType {
    /// A decoder-only causal LM (`CAUSAL_LM`).
    CausalLm,
    /// An encoder-decoder LM such as T5 (`SEQ_2_SEQ_LM`).
    Seq2SeqLm,
}

impl TaskType {
    /// The name PEFT writes.
    pub fn as_peft(self) -> &'static str {
        match self {
            TaskType::CausalLm => "CAUSAL_LM",
            TaskType::Seq2SeqLm => "SEQ_2_SEQ_LM",
        }
    }
}

/// Writes a PEFT adapter: `adapter_config.json` (PEFT 0.21's fields) and `adapter_model.safetensors` (f32),
/// each atomically.
pub fn write_peft_adapter(
    dir: &Path,
    config: &LoraConfig,
    base_model_name_or_path: Option<&str>,
    modules: &BTreeMap<String, StoredAdapter>,
    task_type: TaskType,
) -> Result<(), LoraError> {
    std::fs::create_dir_all(dir).map_err(|e| cfg_err(dir, e))?;
    let target_modules = match &config.target_modules {
        // Like PEFT after expanding "all-linear": the module names themselves (unique last components).
        TargetModules::AllLinear | TargetModules::Names(_) => {
            let mut names: Vec<String> =
                modules.keys().map(|m| m.rsplit('.').next().unwrap_or(m).to_string()).collect();
            names.sort();
            names.dedup();
            json!(names)
        }
        TargetModules::Regex(r) => json!(r),
    };
    let adapter_config = json!({
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": config.r,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
        "target_modules": target_modules,
        "task_type": task_type.as_peft(),
        "use_dora": false,
        "use_rslora": config.use_rslora,
    });
    let mut tensors = Vec::new();
    for (module, adapter) in modules {
        for (suffix, (values, shape)) in [("lora_A", &adapter.a), ("lora_B", &adapter.b)] {
            let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((
                format!("{PEFT_PREFIX}{module}.{suffix}.weight"),
                quant::bnb::StoredTensor { dtype: safetensors::Dtype::F32, shape: shape.to_vec(), data },
            ));
        }
    }
    let metadata = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    let bytes =
        safetensors::serialize(tensors.iter().map(|(k, t)| (k.clone(), t)), metadata).map_err(|e| cfg_err(dir, e))?;
    quant::checkpoint::write_atomically(&dir.join("adapter_model.safetensors"), &bytes)
        .map_err(|e| LoraError::Adapter(e.to_string()))?;
    let text = serde_json::to_string_pretty(&adapter_config).expect("json");
    quant::checkpoint::write_atomically(&dir.join("adapter_config.json"), text.as_bytes())
        .map_err(|e| LoraError::Adapter(e.to_string()))?;
    Ok(())
}
