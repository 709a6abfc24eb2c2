//! The bitsandbytes 4-bit safetensors layout, exactly as transformers `save_pretrained` writes a 4-bit model.
//!
//! For a quantized weight `X.weight` of shape `[out, in]`:
//!
//! | key | dtype, shape | content |
//! |---|---|---|
//! | `X.weight` | U8 `[ceil(n/2), 1]` | packed codes, element 2i in the high nibble |
//! | `X.weight.absmax` | F32 `[blocks]`, or U8 `[blocks]` with double quant | absmax per block |
//! | `X.weight.quant_map` | F32 `[16]` | the code book |
//! | `X.weight.nested_absmax` | F32 `[ceil(blocks/256)]` | double quant only |
//! | `X.weight.nested_quant_map` | F32 `[256]` | double quant only: the signed dynamic map |
//! | `X.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) | U8 `[len]` | JSON: quant_type, blocksize, dtype, shape, nested_blocksize, nested_dtype, nested_offset |

use std::borrow::Cow;

use nf4::{Absmax, Blockwise4bit, DoubleQuantized, FloatDtype, QuantType};
use safetensors::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use crate::{QuantError, QuantizedWeight};

/// A tensor to be written to safetensors, owning its little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl StoredTensor {
    pub fn f32(shape: Vec<usize>, values: &[f32]) -> Self {
        StoredTensor { dtype: Dtype::F32, shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }

    pub fn u8(shape: Vec<usize>, values: Vec<u8>) -> Self {
        StoredTensor { dtype: Dtype::U8, shape, data: values }
    }
}

impl View for &StoredTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The JSON bitsandbytes stores under `X.weight.quant_state.bitsandbytes__{nf4,fp4}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantStateJson {
    pub quant_type: String,
    pub blocksize: usize,
    pub dtype: String,
    pub shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_blocksize: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_offset: Option<f64>,
}

/// The key of the quant_state tensor of weight `name`.
pub fn quant_state_key(name: &str, quant_type: QuantType) -> String {
    format!("{name}.quant_state.bitsandbytes__{}", quant_type.name())
}

/// Whether `name` is stored in bitsandbytes 4-bit form in `tensors` (it has a quant_state).
pub fn is_bnb_4bit(tensors: &SafeTensors<'_>, name: &str) -> bool {
    [QuantType::Nf4, QuantType::Fp4].iter().any(|&qt| tensors.tensor(&quant_state_key(name, qt)).is_ok())
}

/// The bitsandbytes tensors of one quantized weight `name` (e.g. `model.layers.0.mlp.up_proj.weight`).
pub fn bnb_tensors(name: &str, weight: &QuantizedWeight) -> Result<Vec<(String, StoredTensor)>, QuantError> {
    let data = &weight.data;
    if data.quant_type == QuantType::Int4 {
        return Err(QuantError::InvalidTensor {
            file: "(output)".into(),
            tensor: name.into(),
            reason: "int4 has no bitsandbytes 4-bit layout (bitsandbytes knows nf4 and fp4)".into(),
        });
    }
    let mut out = vec![
        (name.to_string(), StoredTensor::u8(vec![data.packed.len(), 1], data.packed.clone())),
        (format!("{name}.quant_map"), StoredTensor::f32(vec![16], data.quant_type.codebook())),
    ];
    let mut state = QuantStateJson {
        quant_type: data.quant_type.name().to_string(),
        blocksize: data.blocksize,
        dtype: weight.dtype.torch_name().to_string(),
        shape: weight.shape.clone(),
        nested_blocksize: None,
        nested_dtype: None,
        nested_offset: None,
    };
    match &data.absmax {
        Absmax::Plain(absmax) => out.push((format!("{name}.absmax"), StoredTensor::f32(vec![absmax.len()], absmax))),
        Absmax::Double(dq) => {
            out.push((format!("{name}.absmax"), StoredTensor::u8(vec![dq.codes.len()], dq.codes.clone())));
            out.push((
                format!("{name}.nested_absmax"),
                StoredTensor::f32(vec![dq.nested_absmax.len()], &dq.nested_absmax),
            ));
            out.push((format!("{name}.nested_quant_map"), StoredTensor::f32(vec![256], &dq.code[..])));
            state.nested_blocksize = Some(dq.nested_blocksize);
            state.nested_dtype = Some("float32".into());
            state.nested_offset = Some(dq.offset as f64);
        }
    }
    let json = quant_state_json_bytes(&state);
    out.push((quant_state_key(name, data.quant_type), StoredTensor::u8(vec![json.len()], json)));
    Ok(out)
}

/// The quant_state JSON as bitsandbytes writes it (`json.dumps`: `", "` and `": "` separators, its key order).
pub fn quant_state_json_bytes(state: &QuantStateJson) -> Vec<u8> {
    let value = serde_json::to_value(state).expect("plain data serializes");
    let mut out = String::from("{");
    let fields = ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"];
    let mut first = true;
    for key in fields {
        if let Some(v) = value.get(key) {
            if !first {
                out.push_str(", ");
            }
            first = false;
            let rendered = match v {
                serde_json::Value::Array(items) => {
                    format!("[{}]", items.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", "))
                }
                other => other.to_string(),
            };
            out.push_str(&format!("\"{key}\": {rendered}"));
        }
    }
    out.push('}');
    out.into_bytes()
}

/// Reads the quantized weight `name` from bitsandbytes tensors, checking every size against the others and
/// against the quant_state before anything is used. `file` only labels errors.
pub fn read_bnb_weight(tensors: &SafeTensors<'_>, name: &str, file: &str) -> Result<QuantizedWeight, QuantError> {
    let invalid =
        |tensor: &str, reason: String| QuantError::InvalidTensor { file: file.into(), tensor: tensor.into(), reason };
    let (state_key, key_type) = [QuantType::Nf4, QuantType::Fp4]
        .iter()
        .map(|&qt| (quant_state_key(name, qt), qt))
        .find(|(key, _)| tensors.tensor(key).is_ok())
        .ok_or_else(|| QuantError::MissingTensor {
            file: file.into(),
            weight: name.into(),
            tensor: format!("{name}.quant_state.bitsandbytes__nf4 (or __fp4)"),
        })?;
    let state_view = tensors.tensor(&state_key).expect("found above");
    let bad_state =
        |reason: String| QuantError::InvalidQuantState { file: file.into(), tensor: state_key.clone(), reason };
    if state_view.dtype() != Dtype::U8 {
        return Err(bad_state(format!("expected U8 bytes of JSON, found {:?}", state_view.dtype())));
    }
    let state: QuantStateJson = serde_json::from_slice(state_view.data()).map_err(|e| bad_state(e.to_string()))?;
    let quant_type = QuantType::from_name(&state.quant_type)
        .filter(|qt| *qt != QuantType::Int4)
        .ok_or_else(|| bad_state(format!("unknown quant_type `{}`", state.quant_type)))?;
    if quant_type != key_type {
        return Err(bad_state(format!(
            "quant_type `{}` does not match the key suffix `{}`",
            state.quant_type, key_type
        )));
    }
    nf4::check_blocksize(state.blocksize).map_err(|e| bad_state(e.to_string()))?;
    let dtype =
        FloatDtype::parse(&state.dtype).ok_or_else(|| bad_state(format!("unsupported dtype `{}`", state.dtype)))?;
    if state.shape.is_empty() {
        return Err(bad_state("empty shape".into()));
    }
    let numel = state
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n > 0)
        .ok_or_else(|| bad_state(format!("shape {:?} has no elements or overflows", state.shape)))?;
    let blocks = nf4::num_blocks(numel, state.blocksize);

    let get = |key: &str| {
        tensors.tensor(key).map_err(|_| QuantError::MissingTensor {
            file: file.into(),
            weight: name.into(),
            tensor: key.into(),
        })
    };

    // Packed codes: U8 as transformers saves them; other quant_storage dtypes hold the same bytes.
    let packed_view = get(name)?;
    let packed_bytes = packed_view.data();
    let needed = nf4::packed_len(numel);
    let storage = packed_view.dtype().bitsize().div_ceil(8);
    if packed_bytes.len() < needed || packed_bytes.len() >= needed + storage.max(1) {
        return Err(invalid(
            name,
            format!("holds {} bytes, but shape {:?} needs {needed} packed bytes", packed_bytes.len(), state.shape),
        ));
    }
    let packed = packed_bytes[..needed].to_vec();

    let quant_map_key = format!("{name}.quant_map");
    if let Ok(map) = tensors.tensor(&quant_map_key) {
        let values = read_f32(&map, &quant_map_key, file)?;
        let ours = quant_type.codebook();
        let same = values.len() == 16 && values.iter().zip(ours).all(|(a, b)| a == b);
        if !same {
            return Err(invalid(
                &quant_map_key,
                format!("is not the standard {quant_type} code book; custom code books are not supported"),
            ));
        }
    }

    let absmax_key = format!("{name}.absmax");
    let absmax_view = get(&absmax_key)?;
    if absmax_view.shape().iter().product::<usize>() != blocks {
        return Err(invalid(
            &absmax_key,
            format!(
                "has shape {:?}, expected {blocks} blocks for shape {:?} at blocksize {}",
                absmax_view.shape(),
                state.shape,
                state.blocksize
            ),
        ));
    }
    let nested = state.nested_offset.is_some() || absmax_view.dtype() == Dtype::U8;
    let absmax = if nested {
        if absmax_view.dtype() != Dtype::U8 {
            return Err(invalid(
                &absmax_key,
                format!("is {:?}, but double-quantized absmax must be U8", absmax_view.dtype()),
            ));
        }
        let offset =
            state.nested_offset.ok_or_else(|| bad_state("double-quantized absmax but no nested_offset".into()))?;
        let nested_blocksize = state.nested_blocksize.unwrap_or(nf4::NESTED_BLOCKSIZE);
        if nested_blocksize == 0 || !nested_blocksize.is_power_of_two() {
            return Err(bad_state(format!("nested_blocksize {nested_blocksize} is not a power of two")));
        }
        let nested_key = format!("{name}.nested_absmax");
        let nested_absmax = read_f32(&get(&nested_key)?, &nested_key, file)?;
        if nested_absmax.len() != blocks.div_ceil(nested_blocksize) {
            return Err(invalid(
                &nested_key,
                format!("holds {} values, expected {}", nested_absmax.len(), blocks.div_ceil(nested_blocksize)),
            ));
        }
        let map_key = format!("{name}.nested_quant_map");
        let map = read_f32(&get(&map_key)?, &map_key, file)?;
        let code: [f32; 256] = map
            .try_into()
            .map_err(|m: Vec<f32>| invalid(&map_key, format!("holds {} values, expected 256", m.len())))?;
        check_finite(&nested_absmax, &nested_key, file)?;
        check_finite(&code, &map_key, file)?;
        if !(offset as f32).is_finite() {
            return Err(bad_state(format!("nested_offset {offset} is not a finite float32")));
        }
        Absmax::Double(DoubleQuantized {
            codes: absmax_view.data().to_vec(),
            nested_absmax,
            offset: offset as f32,
            nested_blocksize,
            code: Box::new(code),
        })
    } else {
        let values = read_f32(&absmax_view, &absmax_key, file)?;
        check_finite(&values, &absmax_key, file)?;
        Absmax::Plain(values)
    };
    Ok(QuantizedWeight {
        data: Blockwise4bit { packed, absmax, numel, blocksize: state.blocksize, quant_type },
        shape: state.shape,
        dtype,
    })
}

/// Reads an F32 tensor's values, checking its dtype and byte length.
pub fn read_f32(view: &safetensors::tensor::TensorView<'_>, key: &str, file: &str) -> Result<Vec<f32>, QuantError> {
    if view.dtype() != Dtype::F32 {
        return Err(QuantError::InvalidTensor {
            file: file.into(),
            tensor: key.into(),
            reason: format!("is {:?}, expected F32", view.dtype()),
        });
    }
    Ok(view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn check_finite(values: &[f32], key: &str, file: &str) -> Result<(), QuantError> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(QuantError::InvalidTensor {
            file: file.into(),
            tensor: key.into(),
            reason: format!("element {i} is {}", values[i]),
        }),
    }
}

/// `quantization_config` of config.json for a bitsandbytes 4-bit checkpoint, with every field transformers
/// writes (readers ignore the ones they don't know).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BnbQuantizationConfig {
    pub quant_method: String,
    #[serde(default)]
    pub load_in_4bit: bool,
    #[serde(default)]
    pub load_in_8bit: bool,
    #[serde(default = "default_quant_type")]
    pub bnb_4bit_quant_type: String,
    #[serde(default)]
    pub bnb_4bit_use_double_quant: bool,
    #[serde(default = "default_compute_dtype")]
    pub bnb_4bit_compute_dtype: String,
    #[serde(default = "default_storage")]
    pub bnb_4bit_quant_storage: String,
    #[serde(default)]
    pub llm_int8_skip_modules: Option<Vec<String>>,
    #[serde(default = "default_threshold")]
    pub llm_int8_threshold: f64,
    #[serde(default)]
    pub llm_int8_has_fp16_weight: bool,
    #[serde(default)]
    pub llm_int8_enable_fp32_cpu_offload: bool,
    #[serde(rename = "_load_in_4bit", default)]
    pub private_load_in_4bit: bool,
    #[serde(rename = "_load_in_8bit", default)]
    pub private_load_in_8bit: bool,
}

fn default_quant_type() -> String {
    "fp4".into()
}
fn default_compute_dtype() -> String {
    "float32".into()
}
fn default_storage() -> String {
    "uint8".into()
}
fn default_threshold() -> f64 {
    6.0
}

impl BnbQuantizationConfig {
    /// The config transformers writes for a model loaded with `BitsAndBytesConfig(load_in_4bit=True, ...)`.
    pub fn new_4bit(quant_type: QuantType, double_quant: bool, compute_dtype: FloatDtype) -> Self {
        BnbQuantizationConfig {
            quant_method: "bitsandbytes".into(),
            load_in_4bit: true,
            load_in_8bit: false,
            bnb_4bit_quant_type: quant_type.name().into(),
            bnb_4bit_use_double_quant: double_quant,
            bnb_4bit_compute_dtype: compute_dtype.torch_name().into(),
            bnb_4bit_quant_storage: "uint8".into(),
            llm_int8_skip_modules: None,
            llm_int8_threshold: 6.0,
            llm_int8_has_fp16_weight: false,
            llm_int8_enable_fp32_cpu_offload: false,
            private_load_in_4bit: true,
            private_load_in_8bit: false,
        }
    }

    /// Whether this describes a bitsandbytes 4-bit checkpoint.
    pub fn is_bnb_4bit(&self) -> bool {
        self.quant_method == "bitsandbytes" && (self.load_in_4bit || self.private_load_in_4bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QuantConfig;

    fn roundtrip(config: &QuantConfig) {
        let values: Vec<f32> = (0..96 * 50).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let w = QuantizedWeight::quantize("w", &values, &[96, 50], config).unwrap();
        let stored = bnb_tensors("m.weight", &w).unwrap();
        let bytes = safetensors::serialize(stored.iter().map(|(k, t)| (k.clone(), t)), None).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert!(is_bnb_4bit(&st, "m.weight"));
        let back = read_bnb_weight(&st, "m.weight", "mem").unwrap();
        assert_eq!(back, w);
    }

    #[test]
    fn write_then_read_is_identity() {
        roundtrip(&QuantConfig::new());
        roundtrip(&QuantConfig::new().with_double_quant(false));
        roundtrip(&QuantConfig::new().with_quant_type(QuantType::Fp4).with_blocksize(128));
    }

    #[test]
    fn quant_state_json_matches_python_formatting() {
        let state = QuantStateJson {
            quant_type: "nf4".into(),
            blocksize: 64,
            dtype: "float32".into(),
            shape: vec![96, 96],
            nested_blocksize: Some(256),
            nested_dtype: Some("float32".into()),
            nested_offset: Some(0.05141773074865341),
        };
        assert_eq!(
            String::from_utf8(quant_state_json_bytes(&state)).unwrap(),
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [96, 96], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.05141773074865341}"#
        );
    }
}
