//! Merging an adapter into its base checkpoint: `W' = dequant(W) + scaling · B · A`, written as a dense
//! HF checkpoint (f32 or bf16), or re-quantized to 4 bits with the error that introduces.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use half::bf16;
use quant::bnb::{bnb_tensors, BnbQuantizationConfig, StoredTensor};
use quant::checkpoint::{write_atomically, HfCheckpoint, AUXILIARY_FILES};
use quant::{QuantConfig, QuantizedWeight};
use serde_json::Value;

use crate::peft::read_peft_adapter;
use crate::LoraError;

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

/// Merges the PEFT adapter in `adapter_dir` into the HF (or bitsandbytes 4-bit) checkpoint in `model_dir`
/// and writes the result to `out_dir`.
pub fn merge_checkpoint(model_dir: &Path, adapter_dir: &Path, out_dir: &Path, output: &MergeOutput) -> Result<MergeReport, LoraError> {
    let adapter = read_peft_adapter(adapter_dir)?;
    let scaling = adapter.config.scaling() as f32;
    let checkpoint = HfCheckpoint::open(model_dir).map_err(err)?;
    for module in adapter.modules.keys() {
        if !checkpoint.contains(&format!("{module}.weight")) {
            return Err(err(format!("adapter module `{module}` has no weight in {}", model_dir.display())));
        }
    }
    std::fs::create_dir_all(out_dir).map_err(err)?;
    let device = Device::flex();
    let mut report = MergeReport::default();
    let mut error_sum = 0.0f64;
    let mut error_count = 0usize;
    let mut tensors: Vec<(String, StoredTensor)> = Vec::new();
    let names: Vec<String> = checkpoint.names().map(String::from).collect();
    for name in &names {
        // bitsandbytes statistics tensors belong to their weight, handled with it.
        if name.contains(".weight.") && checkpoint.contains(&name[..name.find(".weight.").unwrap() + 7]) {
            continue;
        }
        let module = name.strip_suffix(".weight");
        let stored = module.and_then(|m| adapter.modules.get(m));
        let quantized = checkpoint.bnb_weight(name).map_err(err)?;
        if stored.is_none() && quantized.is_none() {
            let (view, _) = checkpoint.tensor(name).map_err(err)?;
            tensors.push((name.clone(), StoredTensor { dtype: view.dtype(), shape: view.shape().to_vec(), data: view.data().to_vec() }));
            continue;
        }
        let (mut values, shape) = match quantized {
            Some(q) => (q.dequantize_f32().map_err(err)?, q.shape.clone()),
            None => checkpoint.tensor_f32(name).map_err(err)?,
        };
        if let Some(stored) = stored {
            let [out_f, in_f] = [shape[0], shape[1]];
            if stored.a.1[1] != in_f || stored.b.1[0] != out_f {
                return Err(err(format!("`{name}` is {shape:?} but the adapter has lora_A {:?}, lora_B {:?}", stored.a.1, stored.b.1)));
            }
            let a = Tensor::<2>::from_data(TensorData::new(stored.a.0.clone(), stored.a.1), &device);
            let b = Tensor::<2>::from_data(TensorData::new(stored.b.0.clone(), stored.b.1), &device);
            let delta: Vec<f32> = b.matmul(a).mul_scalar(scaling).into_data().try_into_vec().map_err(|e| err(format!("{e:?}")))?;
            for (w, d) in values.iter_mut().zip(delta) {
                *w += d;
            }
            report.merged_modules += 1;
        }
        match output {
            MergeOutput::DenseF32 => tensors.push((name.clone(), StoredTensor::f32(shape, &values))),
            MergeOutput::DenseBf16 => tensors.push((
                name.clone(),
                StoredTensor { dtype: safetensors::Dtype::BF16, shape, data: values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect() },
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

    let config_path = model_dir.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).map_err(err)?).map_err(err)?;
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
    write_atomically(&out_dir.join("config.json"), serde_json::to_string_pretty(&config).expect("json").as_bytes()).map_err(err)?;
    for file in AUXILIARY_FILES {
        let from = model_dir.join(file);
        if from.is_file() {
            write_atomically(&out_dir.join(file), &std::fs::read(&from).map_err(err)?).map_err(err)?;
        }
    }
    Ok(report)
}
