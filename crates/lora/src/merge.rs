//! Merging an adapter into its base checkpoint: `W' = dequant(W) + scaling · B · A`, written as a dense
//! HF checkpoint (f32 or bf16), or re-quantized to 4 bits with the error that introduces.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use half::bf16;
use quant::bnb::{BnbQuantizationConfig, StoredTensor, bnb_tensors};
use quant::checkpoint::{AUXILIARY_FILES, HfCheckpoint, write_atomically};
use quant::{QuantConfig, QuantizedWeight};
use serde_json::Value;

use crate::LoraError;
use crate::peft::read_peft_adapter;

/// The form of the merged weights.
#[derive(Debug, Clone, PartialEq)]
pub enum MergeOutput {
    /// Dense f32 weights.
    DenseF32,
    /// Dense bf16 weights.
    DenseBf16,
    /// The merged linear weights quantized again (bitsandbytes layout).
    Requantize(QuantConfig),
}

/// What a merge did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergeReport {
    pub merged_modules: usize,
    /// Largest |merged - dequant(requantized(merged))| over all merged weights (requantize only).
    pub requant_max_abs_error: f32,
    /// Mean of the same over all elements of the merged weights.
    pub requant_mean_abs_error: f64,
}

fn err(e: impl std::fmt::Display) -> LoraError {
    LoraError::Adapter(e.to_string())
}

/// The base model a merge reads: its tensors by checkpoint name, its config.json and the files written
/// beside the weights. [`HfBase`] is an HF checkpoint directory (dense or bitsandbytes 4-bit); `llama`
/// implements it for every other model source (GGUF files, `random:` weights).
pub trait MergeBase {
    /// A label for messages (the directory or file).
    fn label(&self) -> String;
    /// Every tensor name, in a stable order.
    fn names(&self) -> Vec<String>;
    fn contains(&self, name: &str) -> bool;
    /// A tensor the merge copies unchanged, as stored.
    fn stored(&self, name: &str) -> Result<StoredTensor, LoraError>;
    /// A dense tensor's values as f32 and its shape.
    fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), LoraError>;
    /// The weight in bitsandbytes 4-bit form, where the base stores it so.
    fn bnb_weight(&self, name: &str) -> Result<Option<QuantizedWeight>, LoraError>;
    /// config.json of the base (the merge sets its dtype and quantization_config).
    fn hf_config(&self) -> Result<Value, LoraError>;
    /// Files written beside the weights (tokenizer, generation config …): name and bytes.
    fn auxiliary_files(&self) -> Result<Vec<(String, Vec<u8>)>, LoraError>;
}

/// An HF checkpoint directory as a merge base.
pub struct HfBase {
    pub dir: std::path::PathBuf,
    pub checkpoint: HfCheckpoint,
}

impl HfBase {
    pub fn open(dir: &Path) -> Result<Self, LoraError> {
        Ok(HfBase { dir: dir.to_path_buf(), checkpoint: HfCheckpoint::open(dir).map_err(err)? })
    }
}

impl MergeBase for HfBase {
    fn label(&self) -> String {
        self.dir.display().to_string()
    }
    fn names(&self) -> Vec<String> {
        self.checkpoint.names().map(String::from).collect()
    }
    fn contains(&self, name: &str) -> bool {
        self.checkpoint.contains(name)
    }
    fn stored(&self, name: &str) -> Result<StoredTensor, LoraError> {
        let (view, _) = self.checkpoint.tensor(name).map_err(err)?;
        Ok(StoredTensor { dtype: view.dtype(), shape: view.shape().to_vec(), data: view.data().to_vec() })
    }
    fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), LoraError> {
        self.checkpoint.tensor_f32(name).map_err(err)
    }
    fn bnb_weight(&self, name: &str) -> Result<Option<QuantizedWeight>, LoraError> {
        self.checkpoint.bnb_weight(name).map_err(err)
    }
    fn hf_config(&self) -> Result<Value, LoraError> {
        let path = self.dir.join("config.json");
        serde_json::from_str(&std::fs::read_to_string(&path).map_err(err)?).map_err(err)
    }
    fn auxiliary_files(&self) -> Result<Vec<(String, Vec<u8>)>, LoraError> {
        AUXILIARY_FILES
            .iter()
            .map(|file| (file, self.dir.join(file)))
            .filter(|(_, path)| path.is_file())
            .map(|(file, path)| Ok((file.to_string(), std::fs::read(&path).map_err(err)?)))
            .collect()
    }
}

/// Merges the PEFT adapter in `adapter_dir` into the HF (or bitsandbytes 4-bit) checkpoint in `model_dir`
/// and writes the result to `out_dir`.
pub fn merge_checkpoint(
    model_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    output: &MergeOutput,
) -> Result<MergeReport, LoraError> {
    merge(&HfBase::open(model_dir)?, adapter_dir, out_dir, output)
}

/// Merges the PEFT adapter in `adapter_dir` into `base` and writes an HF checkpoint to `out_dir`.
pub fn merge(
    base: &dyn MergeBase,
    adapter_dir: &Path,
    out_dir: &Path,
    output: &MergeOutput,
) -> Result<MergeReport, LoraError> {
    let adapter = read_peft_adapter(adapter_dir)?;
    let scaling = adapter.config.scaling() as f32;
    for module in adapter.modules.keys() {
        if !base.contains(&format!("{module}.weight")) {
            return Err(err(format!("adapter module `{module}` has no weight in {}", base.label())));
        }
    }
    std::fs::create_dir_all(out_dir).map_err(err)?;
    let device = Device::flex();
    let mut report = MergeReport::default();
    let mut error_sum = 0.0f64;
    let mut error_count = 0usize;
    let mut tensors: Vec<(String, StoredTensor)> = Vec::new();
    for name in &base.names() {
        // bitsandbytes statistics tensors belong to their weight, handled with it.
        if name.contains(".weight.") && base.contains(&name[..name.find(".weight.").unwrap() + 7]) {
            continue;
        }
        let module = name.strip_suffix(".weight");
        let stored = module.and_then(|m| adapter.modules.get(m));
        let quantized = base.bnb_weight(name)?;
        if stored.is_none() && quantized.is_none() {
            tensors.push((name.clone(), base.stored(name)?));
            continue;
        }
        let (mut values, shape) = match quantized {
            Some(q) => (q.dequantize_f32().map_err(err)?, q.shape.clone()),
            None => base.tensor_f32(name)?,
        };
        if let Some(stored) = stored {
            let [out_f, in_f] = [shape[0], shape[1]];
            if stored.a.1[1] != in_f || stored.b.1[0] != out_f {
                return Err(err(format!(
                    "`{name}` is {shape:?} but the adapter has lora_A {:?}, lora_B {:?}",
                    stored.a.1, stored.b.1
                )));
            }
            let a = Tensor::<2>::from_data(TensorData::new(stored.a.0.clone(), stored.a.1), &device);
            let b = Tensor::<2>::from_data(TensorData::new(stored.b.0.clone(), stored.b.1), &device);
            let delta: Vec<f32> =
                b.matmul(a).mul_scalar(scaling).into_data().try_into_vec().map_err(|e| err(format!("{e:?}")))?;
            for (w, d) in values.iter_mut().zip(delta) {
                *w += d;
            }
            report.merged_modules += 1;
        }
        match output {
            MergeOutput::DenseF32 => tensors.push((name.clone(), StoredTensor::f32(shape, &values))),
            MergeOutput::DenseBf16 => tensors.push((
                name.clone(),
                StoredTensor {
                    dtype: safetensors::Dtype::BF16,
                    shape,
                    data: values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
                },
            )),
            MergeOutput::Requantize(config) => {
                let q = QuantizedWeight::quantize(name, &values, &shape, config).map_err(err)?;
                let back = q.dequantize_f32().map_err(err)?;
                for (a, b) in values.iter().zip(&back) {
                    let e = (a - b).abs();
                    report.requant_max_abs_error = report.requant_max_abs_error.max(e);
                    error_sum += e as f64;
                }
                error_count += values.len();
                tensors.extend(bnb_tensors(name, &q).map_err(err)?);
            }
        }
    }
    if error_count > 0 {
        report.requant_mean_abs_error = error_sum / error_count as f64;
    }
    let metadata = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.clone(), t)), metadata).map_err(err)?;
    write_atomically(&out_dir.join("model.safetensors"), &bytes).map_err(err)?;

    let mut config = base.hf_config()?;
    let object = config.as_object_mut().ok_or_else(|| err("config.json is not an object"))?;
    object.remove("quantization_config");
    match output {
        MergeOutput::DenseF32 => {
            object.insert("dtype".into(), "float32".into());
        }
        MergeOutput::DenseBf16 => {
            object.insert("dtype".into(), "bfloat16".into());
        }
        MergeOutput::Requantize(q) => {
            let bnb = BnbQuantizationConfig::new_4bit(q.quant_type, q.double_quant, nf4::FloatDtype::F32);
            object.insert("quantization_config".into(), serde_json::to_value(bnb).expect("json"));
        }
    }
    write_atomically(&out_dir.join("config.json"), serde_json::to_string_pretty(&config).expect("json").as_bytes())
        .map_err(err)?;
    for (file, bytes) in base.auxiliary_files()? {
        write_atomically(&out_dir.join(file), &bytes).map_err(err)?;
    }
    Ok(report)
}
