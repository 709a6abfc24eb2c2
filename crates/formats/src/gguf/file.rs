//! [`GgufFile`]: opening a file (memory-mapped) or an in-memory image, the header parser with its
//! bounds checks, and metadata / tensor access.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::{
    DEFAULT_ALIGNMENT, GGUF_MAGIC, GgmlType, GgufError, GgufTensorInfo, GgufValue, GgufValueType, MAX_ALIGNMENT,
    MAX_ARRAY_NESTING, MAX_DIMS, Result, dequantize,
};

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
        let io = |source| GgufError::Io { path: path.to_path_buf(), source };
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
            index: header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect(),
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
            .ok_or_else(|| GgufError::MissingMetadata { path: self.path.clone(), key: key.to_string() })
    }

    fn typed<'a, T>(&'a self, key: &str, what: &str, f: impl FnOnce(&'a GgufValue) -> Option<T>) -> Result<T> {
        let v = self.require(key)?;
        f(v).ok_or_else(|| self.invalid_metadata(key, format!("expected {what}, found {:?}", v.value_type())))
    }

    pub(super) fn invalid_metadata(&self, key: &str, what: String) -> GgufError {
        GgufError::InvalidMetadata { path: self.path.clone(), key: key.to_string(), what }
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
            .ok_or_else(|| GgufError::TensorNotFound { path: self.path.clone(), tensor: name.to_string() })
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
    /// (the GGUF dims reversed). No Q/K unpermutation is done here, see [`unpermute_qk`](super::unpermute_qk).
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
    pub fn tensor_rows_f32(&self, name: &str, rows: Range<usize>) -> Result<(Vec<f32>, Vec<usize>)> {
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
        let (block, block_bytes) = info.ggml_type.block_layout().ok_or_else(|| self.unsupported(info))?;
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
}

// Header parsing

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
        GgufError::Corrupt { path: self.path.to_path_buf(), what }
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

    fn value(&mut self, ty: GgufValueType, depth: usize, what: &dyn Fn() -> String) -> Result<GgufValue> {
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
                    return Err(self.corrupt(format!("{} nests arrays more than {MAX_ARRAY_NESTING} deep", what())));
                }
                let elem_id = self.u32(&|| format!("element type of {}", what()))?;
                let elem = GgufValueType::from_id(elem_id)
                    .ok_or_else(|| self.corrupt(format!("{} has unknown element type {elem_id}", what())))?;
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
        .map_err(|_| GgufError::BadMagic { path: path.to_path_buf(), magic: buf[..buf.len().min(4)].to_vec() })?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic { path: path.to_path_buf(), magic: magic.to_vec() });
    }
    let version = c.u32(&|| "version".into())?;
    if version & 0xFFFF == 0 && version != 0 {
        // A byte-swapped small version number: the file was written big-endian.
        return Err(GgufError::BigEndian { path: path.to_path_buf() });
    }
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion { path: path.to_path_buf(), version });
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
            return Err(GgufError::InvalidMetadata { path: path.to_path_buf(), key, what: "duplicate key".into() });
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            let a = v.as_u64().filter(|&a| a.is_power_of_two() && a <= MAX_ALIGNMENT);
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
        let invalid = |what: String| GgufError::InvalidTensor { path: path.to_path_buf(), tensor: name.clone(), what };
        let n_dims = c.u32(&|| format!("dimension count of tensor `{name}`"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(invalid(format!("{n_dims} dimensions (ggml supports at most {MAX_DIMS})")));
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
            return Err(invalid(format!("data offset {offset} is not a multiple of the alignment {alignment}")));
        }
        if seen.insert(name.clone(), i).is_some() {
            return Err(invalid("duplicate tensor name".into()));
        }
        tensors.push(GgufTensorInfo { name, dims, ggml_type, offset, n_elements, n_bytes });
    }

    let header_end = c.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    for t in &tensors {
        let end = t.n_bytes.and_then(|n| data_offset.checked_add(t.offset)?.checked_add(n));
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
                if data_offset.checked_add(t.offset).is_none_or(|s| s > file_len) {
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

    Ok(Header { version, alignment, data_offset, metadata, tensors })
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;
    use crate::gguf::test_support::{Writer, f32_bytes, parse};

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
            ("t.arr_str", GgufValue::Array(vec![GgufValue::String("a".into()), GgufValue::String("".into())])),
            ("t.arr_i32", GgufValue::Array(vec![GgufValue::I32(-1), GgufValue::I32(7)])),
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
        assert!(matches!(&e, GgufError::InvalidMetadata { key, .. } if key == "x.count"), "{e}");
    }

    #[test]
    fn f32_f16_bf16_f64_tensors_with_reversed_shape() {
        let vals: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        let f16b: Vec<u8> = vals.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
        let bf16b: Vec<u8> = vals.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect();
        let f64b: Vec<u8> = vals.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect();
        let i8b: Vec<u8> = [-3i8, -2, -1, 0, 1, 127].iter().map(|&v| v as u8).collect();
        let i32b: Vec<u8> = [-3i32, -2, -1, 0, 1, 1 << 20].iter().flat_map(|v| v.to_le_bytes()).collect();
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
        assert_eq!(f.tensor_f32("e").unwrap(), (vec![-3.0, -2.0, -1.0, 0.0, 1.0, 127.0], vec![1, 3, 2]));
        assert_eq!(f.tensor_f32("g").unwrap().0[5], (1 << 20) as f32);
        let info = f.tensor_info("a").unwrap();
        assert_eq!(info.dims, vec![3, 2]);
        assert_eq!(info.ggml_type, GgmlType::F32);
        assert_eq!(info.n_bytes, Some(24));
        assert_eq!(f.data_offset() % 32, 0);
        assert_eq!(f.tensor_data("b").unwrap().len(), 12);
        assert_eq!(f.tensor_rows_f32("a", 1..2).unwrap(), (vals[3..].to_vec(), vec![1, 3]));
        assert!(f.tensor_rows_f32("a", 1..3).is_err());
        assert!(matches!(f.tensor_f32("nope"), Err(GgufError::TensorNotFound { .. })));
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

        for bad in [GgufValue::U32(0), GgufValue::U32(48), GgufValue::String("x".into())] {
            let e = parse(Writer::new().kv("general.alignment", bad).build()).unwrap_err();
            assert!(matches!(&e, GgufError::InvalidMetadata { key, .. } if key == "general.alignment"), "{e}");
        }
    }

    #[test]
    fn unknown_tensor_type_opens_but_does_not_dequantize() {
        // 16 = IQ2_XXS: known size, no dequantizer; 200: unknown id.
        let f = parse(
            Writer::new().tensor("iq", &[256], 16, vec![0u8; 66]).tensor("weird", &[4], 200, vec![0u8; 16]).build(),
        )
        .unwrap();
        let e = f.tensor_f32("iq").unwrap_err();
        assert!(matches!(&e, GgufError::UnsupportedTensorType { tensor, type_id: 16, .. } if tensor == "iq"), "{e}");
        let e = f.tensor_f32("weird").unwrap_err();
        assert!(
            matches!(&e, GgufError::UnsupportedTensorType { tensor, type_id: 200, .. } if tensor == "weird"),
            "{e}"
        );
        assert!(e.to_string().contains("weird") && e.to_string().contains("test.gguf"), "{e}");
        assert_eq!(f.tensor_info("weird").unwrap().ggml_type, GgmlType::Other(200));
    }

    fn sample_file() -> Vec<u8> {
        let mut w = Writer::new();
        for (k, v) in all_value_kinds() {
            w = w.kv(k, v);
        }
        w.tensor("t0", &[4, 2], 0, f32_bytes(&[1.0; 8])).tensor("t1", &[32], 8, vec![1u8; 34]).build()
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
        for (nt, nkv) in [(u64::MAX, 0), (1 << 40, 0), (0, u64::MAX), (0, 1 << 40), (3, 0), (0, 5)] {
            let e = parse(with_counts(nt, nkv, &[0u8; 64])).unwrap_err();
            assert!(matches!(e, GgufError::Corrupt { .. } | GgufError::Truncated { .. }), "{e}");
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
        let ok = |dims: &[u64], ty: u32, data: Vec<u8>| parse(Writer::new().tensor("w", dims, ty, data).build());
        // Too many dims.
        let e = ok(&[1, 1, 1, 1, 1], 0, vec![0; 4]).unwrap_err();
        assert!(matches!(&e, GgufError::InvalidTensor { tensor, .. } if tensor == "w"), "{e}");
        // Element count overflow.
        assert!(ok(&[u64::MAX / 2, 4], 0, vec![0; 4]).is_err());
        assert!(ok(&[1 << 32, 1 << 32], 0, vec![0; 4]).is_err());
        // Row not a multiple of the block size.
        assert!(ok(&[16], 2, vec![0; 18]).is_err());
        // Data past the end of the file.
        let e = ok(&[1024], 0, vec![0; 16]).unwrap_err();
        assert!(matches!(&e, GgufError::Truncated { what, .. } if what.contains("`w`")), "{e}");
        // Unknown type whose offset points past the end.
        // (Offset field of the 1-d tensor `w`: after name, n_dims, one dim and the type.)
        let offset_field = |bytes: &[u8]| bytes.iter().rposition(|&b| b == b'w').unwrap() + 1 + 4 + 8 + 4;
        let mut bytes = Writer::new().tensor("w", &[4], 200, vec![]).build();
        let pos = offset_field(&bytes);
        bytes[pos..pos + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let e = parse(bytes).unwrap_err();
        assert!(matches!(&e, GgufError::Truncated { what, .. } if what.contains("`w`")), "{e}");
        // Misaligned offset.
        let mut bytes = Writer::new().tensor("w", &[4], 0, vec![0; 16]).build();
        let pos = offset_field(&bytes);
        bytes[pos..pos + 8].copy_from_slice(&4u64.to_le_bytes());
        let e = parse(bytes).unwrap_err();
        assert!(e.to_string().contains("alignment"), "{e}");
        // Duplicate names.
        let e =
            parse(Writer::new().tensor("w", &[1], 0, vec![0; 4]).tensor("w", &[1], 0, vec![0; 4]).build()).unwrap_err();
        assert!(e.to_string().contains("duplicate"), "{e}");
    }

    #[test]
    fn bad_magic_version_and_endianness() {
        assert!(matches!(parse(b"GGML\x03\0\0\0".to_vec()), Err(GgufError::BadMagic { .. })));
        assert!(matches!(parse(b"GG".to_vec()), Err(GgufError::BadMagic { .. })));
        let mut v1 = with_counts(0, 0, &[]);
        v1[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(parse(v1), Err(GgufError::UnsupportedVersion { version: 1, .. })));
        let mut be = with_counts(0, 0, &[]);
        be[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(matches!(parse(be), Err(GgufError::BigEndian { .. })));
        // Duplicate keys, unknown value type.
        let w = Writer::new().kv("a", GgufValue::U8(1)).kv("a", GgufValue::U8(2));
        assert!(matches!(parse(w.build()), Err(GgufError::InvalidMetadata { .. })));
        let mut body = Vec::new();
        Writer::string(&mut body, "k");
        body.extend(13u32.to_le_bytes());
        body.extend([0u8; 8]);
        let e = parse(with_counts(0, 1, &body)).unwrap_err();
        assert!(matches!(&e, GgufError::InvalidMetadata { key, .. } if key == "k"), "{e}");
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
}
