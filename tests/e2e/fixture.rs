//! Reading golden fixture files (safetensors written by the scripts in `xtask/fixtures/`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

pub struct Fixture {
    pub path: PathBuf,
    bytes: Vec<u8>,
}

impl Fixture {
    pub fn open(path: &Path) -> Fixture {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()));
        Fixture { path: path.to_path_buf(), bytes }
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("valid fixture")
    }

    pub fn metadata(&self) -> HashMap<String, String> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).expect("valid fixture");
        meta.metadata().clone().unwrap_or_default()
    }

    pub fn dtype(&self, name: &str) -> Dtype {
        self.tensors().tensor(name).unwrap().dtype()
    }

    pub fn raw(&self, name: &str) -> Vec<u8> {
        self.tensors()
            .tensor(name)
            .unwrap_or_else(|_| panic!("{}: no tensor {name}", self.path.display()))
            .data()
            .to_vec()
    }

    pub fn f32(&self, name: &str) -> Vec<f32> {
        let raw = self.raw(name);
        match self.dtype(name) {
            Dtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::BF16 => self.bf16(name).into_iter().map(f32::from).collect(),
            Dtype::F16 => self.f16(name).into_iter().map(f32::from).collect(),
            other => panic!("{name} is {other:?}, not a float"),
        }
    }

    pub fn bf16(&self, name: &str) -> Vec<bf16> {
        self.raw(name).chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])).collect()
    }

    pub fn f16(&self, name: &str) -> Vec<f16> {
        self.raw(name).chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect()
    }

    pub fn u8(&self, name: &str) -> Vec<u8> {
        assert_eq!(self.dtype(name), Dtype::U8, "{name} is not U8");
        self.raw(name)
    }
}

/// Every `*.safetensors` file in a fixture subdirectory, sorted.
pub fn fixture_files(subdir: &str) -> Vec<PathBuf> {
    let dir = qlora_tests::fixtures_dir().join(subdir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}
