//! Hugging Face checkpoints on disk: open single or sharded safetensors, and convert one to the
//! bitsandbytes 4-bit layout (what `qlora quantize` does).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use nf4::{FloatDtype, QuantType};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::bnb::{BnbQuantizationConfig, StoredTensor, bnb_tensors};
use crate::{QuantConfig, QuantError, QuantizedWeight};

/// Tokenizer and generation files copied alongside converted weights.
pub const AUXILIARY_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// Output shards are cut at this many bytes (transformers' default `max_shard_size` of 5 GB).
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;

/// The safetensors files of a checkpoint directory, memory-mapped, with a name → file index.
pub struct HfCheckpoint {
    pub dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    index: BTreeMap<String, usize>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> QuantError + '_ {
    move |source| QuantError::Io { path: path.to_path_buf(), source }
}

impl HfCheckpoint {
    /// Opens `model.safetensors`, or the shards listed by `model.safetensors.index.json`, and checks every
    /// header (offsets and sizes against the file) before any tensor is read.
    pub fn open(dir: &Path) -> Result<Self, QuantError> {
        let index_path = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
            let value: Value =
                serde_json::from_str(&text).map_err(|source| QuantError::Json { path: index_path.clone(), source })?;
            let map = value.get("weight_map").and_then(Value::as_object).ok_or_else(|| QuantError::InvalidConfig {
                path: index_path.clone(),
                reason: "no `weight_map` object".into(),
            })?;
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| QuantError::InvalidConfig {
                    path: index_path.clone(),
                    reason: format!("weight_map entry `{tensor}` is not a file name"),
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(QuantError::InvalidConfig {
                        path: index_path.clone(),
                        reason: format!("shard name `{file}` leaves the checkpoint directory"),
                    });
                }
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_string());
                }
            }
            names.sort();
            names
        } else if dir.join("model.safetensors").exists() {
            vec!["model.safetensors".to_string()]
        } else {
            return Err(QuantError::InvalidConfig {
                path: dir.to_path_buf(),
                reason: "no model.safetensors or model.safetensors.index.json".into(),
            });
        };
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            let path = dir.join(name);
            let file = File::open(&path).map_err(io_err(&path))?;
            // SAFETY: the mapping is read-only; a checkpoint changed underneath a running conversion is the
            // user's error, and safetensors re-validates offsets against the mapped length.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
            let tensors = SafeTensors::deserialize(&mmap)
                .map_err(|source| QuantError::Safetensors { file: path.display().to_string(), source })?;
            for tensor in tensors.names() {
                if index.insert(tensor.to_string(), i).is_some() {
                    return Err(QuantError::InvalidTensor {
                        file: path.display().to_string(),
                        tensor: tensor.to_string(),
                        reason: "appears in more than one shard".into(),
                    });
                }
            }
            files.push((path, mmap));
        }
        Ok(HfCheckpoint { dir: dir.to_path_buf(), files, index })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The parsed shard holding `name`, and its path (for error messages).
    pub fn shard_of(&self, name: &str) -> Option<(SafeTensors<'_>, &Path)> {
        let &i = self.index.get(name)?;
        let (path, mmap) = &self.files[i];
        Some((SafeTensors::deserialize(mmap).expect("validated in open"), path))
    }

    /// A view of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<(TensorView<'_>, &Path), QuantError> {
        let (shard, path) = self.shard_of(name).ok_or_else(|| QuantError::MissingTensor {
            file: self.dir.display().to_string(),
            weight: name.to_string(),
            tensor: name.to_string(),
        })?;
        let view = shard.tensor(name).expect("indexed name exists");
        Ok((view, path))
    }

    /// Tensor `name` as f32 values (from F32, BF16 or F16), with its shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), QuantError> {
        let (view, path) = self.tensor(name)?;
        let values = read_float(&view, name, &path.display().to_string())?.into_f32();
        Ok((values, view.shape().to_vec()))
    }

    /// The quantized weight `name` when the checkpoint stores it in bitsandbytes 4-bit form.
    pub fn bnb_weight(&self, name: &str) -> Result<Option<QuantizedWeight>, QuantError> {
        let Some((shard, path)) = self.shard_of(name) else { return Ok(None) };
        if !crate::bnb::is_bnb_4bit(&shard, name) {
            return Ok(None);
        }
        crate::bnb::read_bnb_weight(&shard, name, &path.display().to_string()).map(Some)
    }
}

/// A float tensor's values in their stored dtype.
pub enum FloatValues {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl FloatValues {
    /// The values widened to f32 (exact).
    pub fn into_f32(self) -> Vec<f32> {
        match self {
            FloatValues::F32(v) => v,
            FloatValues::Bf16(v) => v.into_iter().map(f32::from).collect(),
            FloatValues::F16(v) => v.into_iter().map(f32::from).collect(),
        }
    }
}

/// Reads a float tensor (F32, BF16 or F16, little-endian).
pub fn read_float(view: &TensorView<'_>, name: &str, file: &str) -> Result<FloatValues, QuantError> {
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => {
            FloatValues::F32(data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        }
        Dtype::BF16 => FloatValues::Bf16(data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])).collect()),
        Dtype::F16 => FloatValues::F16(data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect()),
        other => {
            return Err(QuantError::InvalidTensor {
                file: file.into(),
                tensor: name.into(),
                reason: format!("is {other:?}; expected F32, BF16 or F16"),
            });
        }
    })
}

/// Whether a tensor is a linear weight of a decoder layer, the weights QLoRA quantizes: a 2-D `.weight`
/// under `layers.` (attention and MLP projections; norms are 1-D, embeddings and lm_head sit outside).
pub fn is_decoder_linear_weight(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name.ends_with(".weight") && name.contains(".layers.")
}

/// What a conversion did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantizeReport {
    pub quantized_tensors: usize,
    pub copied_tensors: usize,
    pub quantized_params: usize,
    pub input_bytes: usize,
    pub output_bytes: usize,
    pub shards: usize,
}

/// Converts the Hugging Face checkpoint in `src` to bitsandbytes 4-bit form in `dst`: every decoder linear
/// weight quantized with `config`, every other tensor copied as it is, config.json given its
/// `quantization_config`, tokenizer and generation files copied. Files appear atomically.
pub fn quantize_checkpoint(src: &Path, dst: &Path, config: &QuantConfig) -> Result<QuantizeReport, QuantError> {
    if config.quant_type == QuantType::Int4 {
        return Err(QuantError::InvalidConfig {
            path: dst.to_path_buf(),
            reason: "int4 has no bitsandbytes checkpoint layout; use nf4 or fp4".into(),
        });
    }
    let config_path = src.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let mut model_config: Value =
        serde_json::from_str(&text).map_err(|source| QuantError::Json { path: config_path.clone(), source })?;
    let object = model_config
        .as_object_mut()
        .ok_or_else(|| QuantError::InvalidConfig { path: config_path.clone(), reason: "not a JSON object".into() })?;
    if object.contains_key("quantization_config") {
        return Err(QuantError::InvalidConfig {
            path: config_path.clone(),
            reason: "the checkpoint is already quantized (config.json has quantization_config)".into(),
        });
    }
    let compute_dtype = ["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| object.get(*k).and_then(Value::as_str).and_then(FloatDtype::parse))
        .unwrap_or(FloatDtype::F32);
    let checkpoint = HfCheckpoint::open(src)?;
    std::fs::create_dir_all(dst).map_err(io_err(dst))?;

    let mut report = QuantizeReport::default();
    let mut shards: Vec<Vec<(String, StoredTensor)>> = vec![Vec::new()];
    let mut shard_bytes = 0usize;
    for name in checkpoint.names() {
        let (view, path) = checkpoint.tensor(name)?;
        let file = path.display().to_string();
        report.input_bytes += view.data().len();
        let shape = view.shape().to_vec();
        let outputs = if is_decoder_linear_weight(name, &shape) {
            let weight = match read_float(&view, name, &file)? {
                FloatValues::F32(v) => QuantizedWeight::quantize(name, &v, &shape, config)?,
                FloatValues::Bf16(v) => QuantizedWeight::quantize(name, &v, &shape, config)?,
                FloatValues::F16(v) => QuantizedWeight::quantize(name, &v, &shape, config)?,
            };
            report.quantized_tensors += 1;
            report.quantized_params += weight.numel();
            bnb_tensors(name, &weight)?
        } else {
            report.copied_tensors += 1;
            vec![(name.to_string(), StoredTensor { dtype: view.dtype(), shape, data: view.data().to_vec() })]
        };
        let bytes: usize = outputs.iter().map(|(_, t)| t.data.len()).sum();
        if shard_bytes > 0 && shard_bytes + bytes > MAX_SHARD_BYTES {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        report.output_bytes += bytes;
        shards.last_mut().expect("one shard").extend(outputs);
    }

    let metadata = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    report.shards = shards.len();
    if shards.len() == 1 {
        let bytes =
            safetensors::serialize(shards[0].iter().map(|(k, t)| (k.clone(), t)), metadata).map_err(|source| {
                QuantError::Safetensors { file: dst.join("model.safetensors").display().to_string(), source }
            })?;
        write_atomically(&dst.join("model.safetensors"), &bytes)?;
    } else {
        let count = shards.len();
        let mut weight_map = serde_json::Map::new();
        for (i, shard) in shards.iter().enumerate() {
            let file_name = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
            let bytes = safetensors::serialize(shard.iter().map(|(k, t)| (k.clone(), t)), metadata.clone())
                .map_err(|source| QuantError::Safetensors { file: file_name.clone(), source })?;
            write_atomically(&dst.join(&file_name), &bytes)?;
            for (k, _) in shard {
                weight_map.insert(k.clone(), Value::String(file_name.clone()));
            }
        }
        let index = serde_json::json!({ "metadata": { "total_size": report.output_bytes }, "weight_map": weight_map });
        write_atomically(
            &dst.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index).expect("json").as_bytes(),
        )?;
    }

    let quantization = BnbQuantizationConfig::new_4bit(config.quant_type, config.double_quant, compute_dtype);
    object.insert("quantization_config".into(), serde_json::to_value(&quantization).expect("json"));
    write_atomically(&dst.join("config.json"), serde_json::to_string_pretty(&model_config).expect("json").as_bytes())?;
    for name in AUXILIARY_FILES {
        let from = src.join(name);
        if from.is_file() {
            let bytes = std::fs::read(&from).map_err(io_err(&from))?;
            write_atomically(&dst.join(name), &bytes)?;
        }
    }
    Ok(report)
}

/// Writes `bytes` to `path` so that a reader sees the old file or the whole new one, never a part: a
/// temporary file in the same directory, fsync, rename, fsync of the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), QuantError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        QuantError::Io { path: path.to_path_buf(), source }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_linear_rule() {
        assert!(is_decoder_linear_weight("model.layers.3.self_attn.q_proj.weight", &[64, 64]));
        assert!(is_decoder_linear_weight("model.layers.0.mlp.down_proj.weight", &[64, 172]));
        assert!(!is_decoder_linear_weight("model.layers.0.input_layernorm.weight", &[64]));
        assert!(!is_decoder_linear_weight("model.layers.0.self_attn.q_proj.bias", &[64]));
        assert!(!is_decoder_linear_weight("model.embed_tokens.weight", &[100, 64]));
        assert!(!is_decoder_linear_weight("lm_head.weight", &[100, 64]));
    }

    #[test]
    fn missing_checkpoint_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = HfCheckpoint::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("no model.safetensors"), "{err}");
    }

    #[test]
    fn truncated_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let t = StoredTensor::f32(vec![4, 4], &[1.0; 16]);
        let bytes = safetensors::serialize([("a".to_string(), &t)], None).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), &bytes[..bytes.len() - 8]).unwrap();
        let err = HfCheckpoint::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("model.safetensors"), "{err}");
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        write_atomically(&p, b"first").unwrap();
        write_atomically(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
