//! The quantized weight on the host: packed 4-bit codes, statistics, shape and the dtype it came from.

use burn::config::Config;
use nf4::{Absmax, Blockwise4bit, Element, FloatDtype, QuantType};

use crate::QuantError;

/// How to quantize a weight. Defaults are QLoRA's: NF4, blocksize 64, double quantization on.
#[derive(Config, Debug, PartialEq)]
pub struct QuantConfig {
    /// The 4-bit data type.
    #[config(default = "QuantType::Nf4")]
    pub quant_type: QuantType,
    /// Elements per absmax block: a power of two from 32 to 4096.
    #[config(default = 64)]
    pub blocksize: usize,
    /// Quantize the absmax values again to 8 bits (blocks of 256).
    #[config(default = true)]
    pub double_quant: bool,
}

/// A weight stored in 4 bits, as bitsandbytes' `Params4bit` holds it: flat blocks over the row-major
/// `[out, in]` weight.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    pub data: Blockwise4bit,
    /// The weight's shape, `[out_features, in_features]` for a linear layer (HF order).
    pub shape: Vec<usize>,
    /// The dtype the weight had before quantization (and dequantizes to by default).
    pub dtype: FloatDtype,
}

impl QuantizedWeight {
    /// Quantizes a row-major weight of `shape`. `name` only labels errors.
    pub fn quantize<T: Element>(
        name: &str,
        values: &[T],
        shape: &[usize],
        config: &QuantConfig,
    ) -> Result<Self, QuantError> {
        let expected: usize = shape.iter().product();
        if expected != values.len() {
            return Err(QuantError::NumelMismatch {
                tensor: name.to_string(),
                shape: shape.to_vec(),
                expected,
                found: values.len(),
            });
        }
        let data = nf4::quantize(values, config.blocksize, config.quant_type, config.double_quant)
            .map_err(|source| QuantError::Quantize { tensor: name.to_string(), source })?;
        Ok(QuantizedWeight { data, shape: shape.to_vec(), dtype: T::DTYPE })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.numel
    }

    pub fn quant_type(&self) -> QuantType {
        self.data.quant_type
    }

    pub fn blocksize(&self) -> usize {
        self.data.blocksize
    }

    pub fn is_double_quant(&self) -> bool {
        matches!(self.data.absmax, Absmax::Double(_))
    }

    /// The config this weight was quantized with.
    pub fn config(&self) -> QuantConfig {
        QuantConfig { quant_type: self.quant_type(), blocksize: self.blocksize(), double_quant: self.is_double_quant() }
    }

    /// Dequantizes to f32, row-major.
    pub fn dequantize_f32(&self) -> Result<Vec<f32>, QuantError> {
        self.data.dequantize().map_err(|source| QuantError::Quantize { tensor: "(dequantize)".into(), source })
    }

    /// Bits per parameter as the QLoRA paper counts them (NF4 + double quant at blocksize 64: 4.127).
    pub fn bits_per_param(&self) -> f64 {
        self.data.bits_per_param()
    }

    /// Bytes actually stored: packed codes plus statistics (including per-tensor constants and code maps).
    pub fn stored_bytes(&self) -> usize {
        self.data.packed.len() + self.data.absmax.stored_bytes() + 16 * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_qloras() {
        let c = QuantConfig::new();
        assert_eq!(c.quant_type, QuantType::Nf4);
        assert_eq!(c.blocksize, 64);
        assert!(c.double_quant);
    }

    #[test]
    fn nf4_dq_reports_4_127_bits() {
        let values: Vec<f32> = (0..64 * 256 * 2).map(|i| (i as f32 * 0.01).sin()).collect();
        let w = QuantizedWeight::quantize("w", &values, &[128, 256], &QuantConfig::new()).unwrap();
        assert_eq!(format!("{:.3}", w.bits_per_param()), "4.127");
        let plain =
            QuantizedWeight::quantize("w", &values, &[128, 256], &QuantConfig::new().with_double_quant(false)).unwrap();
        assert_eq!(plain.bits_per_param(), 4.5);
    }

    #[test]
    fn shape_mismatch_names_the_tensor() {
        let err =
            QuantizedWeight::quantize("layers.0.q_proj", &[0.0f32; 10], &[3, 4], &QuantConfig::new()).unwrap_err();
        assert!(err.to_string().contains("layers.0.q_proj"), "{err}");
    }

    #[test]
    fn bad_blocksize_names_the_tensor() {
        let err =
            QuantizedWeight::quantize("w", &[0.0f32; 12], &[3, 4], &QuantConfig::new().with_blocksize(48)).unwrap_err();
        assert!(err.to_string().contains("`w`") && err.to_string().contains("48"), "{err}");
    }
}
