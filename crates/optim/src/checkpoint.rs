//! Saving and restoring optimizer state for `--resume`, bit for bit.
//!
//! One safetensors file: per parameter `<key>.exp_avg` / `<key>.exp_avg_sq` (F32) or `<key>.state1` /
//! `<key>.state2` (U8 codes) with `<key>.absmax1` / `<key>.absmax2` (F32); the metadata holds the format
//! tag, the hyperparameters and, per parameter, its element count and step. Written atomically.

use std::path::Path;

use quant::bnb::StoredTensor;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::OptimError;
use crate::optimizer::{AdamPrecision, PagedAdamW};
use crate::page::{PageState, StateFormat};
use crate::update::STATE_BLOCKSIZE;
use adamw_rules::PageDevice;

const FORMAT_TAG: &str = "qlora-optim/1";

#[derive(Serialize, Deserialize)]
struct ParamRecord {
    key: String,
    numel: usize,
    step: u64,
    eight_bit: bool,
}

#[derive(Serialize, Deserialize)]
struct Header {
    precision: AdamPrecision,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    params: Vec<ParamRecord>,
}

impl<D: PageDevice> PagedAdamW<D> {
    /// Writes the whole state to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<(), OptimError> {
        let mut tensors: Vec<(String, StoredTensor)> = Vec::new();
        let mut records = Vec::new();
        for entry in &self.params {
            let state = self.state_of(&entry.key).expect("registered parameter");
            records.push(ParamRecord {
                key: entry.key.clone(),
                numel: entry.numel,
                step: entry.step,
                eight_bit: entry.format == StateFormat::Blockwise8,
            });
            let n = entry.numel;
            match state {
                PageState::F32 { exp_avg, exp_avg_sq } => {
                    tensors.push((format!("{}.exp_avg", entry.key), StoredTensor::f32(vec![n], &exp_avg)));
                    tensors.push((format!("{}.exp_avg_sq", entry.key), StoredTensor::f32(vec![n], &exp_avg_sq)));
                }
                PageState::Blockwise8 { codes1, absmax1, codes2, absmax2 } => {
                    let blocks = absmax1.len();
                    tensors.push((format!("{}.state1", entry.key), StoredTensor::u8(vec![n], codes1)));
                    tensors.push((format!("{}.absmax1", entry.key), StoredTensor::f32(vec![blocks], &absmax1)));
                    tensors.push((format!("{}.state2", entry.key), StoredTensor::u8(vec![n], codes2)));
                    tensors.push((format!("{}.absmax2", entry.key), StoredTensor::f32(vec![blocks], &absmax2)));
                }
            }
        }
        let c = &self.config;
        let header = Header {
            precision: c.precision,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            params: records,
        };
        let metadata = [
            ("format".to_string(), FORMAT_TAG.to_string()),
            ("optimizer".to_string(), serde_json::to_string(&header).expect("header serializes")),
        ]
        .into_iter()
        .collect();
        let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.clone(), t)), Some(metadata))
            .map_err(|e| OptimError::checkpoint(path, e))?;
        quant::checkpoint::write_atomically(path, &bytes).map_err(|e| OptimError::checkpoint(path, e))
    }

    /// Restores the state saved by [`save`](Self::save) into this (fresh) optimizer. The state precision and
    /// hyperparameters must match this optimizer's; paging settings may differ.
    pub fn load(&mut self, path: &Path) -> Result<(), OptimError> {
        if !self.params.is_empty() {
            return Err(OptimError::checkpoint(path, "the optimizer already has state; load into a fresh one"));
        }
        let bytes = std::fs::read(path).map_err(|e| OptimError::checkpoint(path, e))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| OptimError::checkpoint(path, e))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT_TAG) {
            return Err(OptimError::checkpoint(
                path,
                format!("not an optimizer checkpoint (format tag {:?}, expected {FORMAT_TAG:?})", meta.get("format")),
            ));
        }
        let header: Header = serde_json::from_str(
            meta.get("optimizer").ok_or_else(|| OptimError::checkpoint(path, "missing `optimizer` metadata"))?,
        )
        .map_err(|e| OptimError::checkpoint(path, e))?;
        let c = &self.config;
        if header.precision != c.precision
            || [header.beta1, header.beta2, header.eps, header.weight_decay]
                != [c.beta1, c.beta2, c.eps, c.weight_decay]
        {
            return Err(OptimError::checkpoint(
                path,
                format!(
                    "saved with {:?} β=({}, {}) eps {} wd {}, but this run uses {:?} β=({}, {}) eps {} wd {}",
                    header.precision,
                    header.beta1,
                    header.beta2,
                    header.eps,
                    header.weight_decay,
                    c.precision,
                    c.beta1,
                    c.beta2,
                    c.eps,
                    c.weight_decay
                ),
            ));
        }
        let tensors = SafeTensors::deserialize(&bytes).map_err(|e| OptimError::checkpoint(path, e))?;
        let read = |name: String, dtype: Dtype, len: usize| -> Result<Vec<u8>, OptimError> {
            let t = tensors.tensor(&name).map_err(|e| OptimError::checkpoint(path, format!("{name}: {e}")))?;
            let width = if dtype == Dtype::U8 { 1 } else { 4 };
            if t.dtype() != dtype || len.checked_mul(width) != Some(t.data().len()) {
                return Err(OptimError::checkpoint(
                    path,
                    format!("{name}: expected {len} {dtype:?} values, found {:?} {:?}", t.dtype(), t.shape()),
                ));
            }
            Ok(t.data().to_vec())
        };
        let f32s = |b: Vec<u8>| -> Vec<f32> {
            b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        };
        for record in header.params {
            let key = &record.key;
            let n = record.numel;
            let state = if record.eight_bit {
                let blocks = n.div_ceil(STATE_BLOCKSIZE);
                PageState::Blockwise8 {
                    codes1: read(format!("{key}.state1"), Dtype::U8, n)?,
                    absmax1: f32s(read(format!("{key}.absmax1"), Dtype::F32, blocks)?),
                    codes2: read(format!("{key}.state2"), Dtype::U8, n)?,
                    absmax2: f32s(read(format!("{key}.absmax2"), Dtype::F32, blocks)?),
                }
            } else {
                PageState::F32 {
                    exp_avg: f32s(read(format!("{key}.exp_avg"), Dtype::F32, n)?),
                    exp_avg_sq: f32s(read(format!("{key}.exp_avg_sq"), Dtype::F32, n)?),
                }
            };
            if self.index.contains_key(key) {
                return Err(OptimError::checkpoint(path, format!("parameter {key} appears twice")));
            }
            self.register(key, n, record.step, Some(state))?;
        }
        Ok(())
    }
}
