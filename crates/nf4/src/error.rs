use thiserror::Error;

/// Everything that can be wrong with the arguments of a quantization call.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum Nf4Error {
    #[error("blocksize {0} is not supported: it must be a power of two from 32 to 4096")]
    InvalidBlocksize(usize),
    #[error("nested blocksize {0} is not supported: it must be a positive power of two")]
    InvalidNestedBlocksize(usize),
    #[error("unknown 4-bit quant type `{0}` (expected nf4, fp4 or int4)")]
    UnknownQuantType(String),
    #[error("element {index} is not finite ({value}): NaN and infinity cannot be quantized")]
    NonFinite { index: usize, value: f32 },
    #[error("{what}: expected {expected} values, found {found}")]
    LengthMismatch { what: &'static str, expected: usize, found: usize },
    #[error("cannot quantize an empty tensor")]
    Empty,
}
