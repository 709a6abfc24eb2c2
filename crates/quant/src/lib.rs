//! # quant — quantized weight storage for QLoRA
//!
//! Second in the stack (nf4 / bf16-gemm → quant → ops → lora / optim → formats → llama → data → train). Where `nf4` is the data type
//! (code books, blockwise quantize/dequantize on slices), this crate is the *weight*: a [`QuantizedWeight`]
//! holds packed codes, plain or double-quantized statistics, the shape and the original dtype; it reads and
//! writes bitsandbytes' 4-bit safetensors layout exactly as transformers saves it ([`bnb`]), converts whole
//! Hugging Face checkpoints ([`checkpoint`]), and moves to any burn device as packed codes in little-endian u32 words (WGSL has no 8-bit integers;
//! the bytes are bitsandbytes' bytes) + float statistics
//! whose [`DeviceQuantizedWeight::dequantize`] rebuilds the float weight there (on the CPU through the
//! flex backend). The LoRA layers keep weights in this form and never store them dequantized.

pub mod bnb;
pub mod checkpoint;
mod device;
mod error;
mod weight;

pub use device::{DeviceAbsmax, DeviceDoubleQuant, DeviceQuantizedWeight};
pub use error::QuantError;
pub use weight::{QuantConfig, QuantizedWeight};
