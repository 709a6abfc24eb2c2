//! The floating-point element types a weight can come in: f32, bf16 and f16.

use half::{bf16, f16};

/// The storage dtype of a floating-point tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize), serde(rename_all = "lowercase"))]
pub enum FloatDtype {
    F32,
    Bf16,
    F16,
}

impl FloatDtype {
    /// torch's name without the `torch.` prefix, as bitsandbytes writes it in `quant_state` (`float32`, ...).
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "float32",
            FloatDtype::Bf16 => "bfloat16",
            FloatDtype::F16 => "float16",
        }
    }

    /// Parses torch names with or without `torch.`, and safetensors names (`F32`, `BF16`, `F16`).
    pub fn parse(name: &str) -> Option<Self> {
        let name = name.strip_prefix("torch.").unwrap_or(name);
        match name.to_ascii_lowercase().as_str() {
            "float32" | "float" | "f32" | "fp32" => Some(FloatDtype::F32),
            "bfloat16" | "bf16" => Some(FloatDtype::Bf16),
            "float16" | "half" | "f16" | "fp16" => Some(FloatDtype::F16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::Bf16 | FloatDtype::F16 => 2,
        }
    }
}

/// A float element that converts to f32 exactly and back with round-to-nearest-even (as torch and
/// bitsandbytes' CPU kernels do).
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: FloatDtype;
    fn to_f32(self) -> f32;
    fn from_f32(value: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: FloatDtype = FloatDtype::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        value
    }
}

impl Element for bf16 {
    const DTYPE: FloatDtype = FloatDtype::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        bf16::from_f32(value)
    }
}

impl Element for f16 {
    const DTYPE: FloatDtype = FloatDtype::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        f16::from_f32(value)
    }
}
