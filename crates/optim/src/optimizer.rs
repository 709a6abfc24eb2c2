//! [`PagedAdamW`]: AdamW whose state lives in pages, 32-bit (torch) or 8-bit blockwise (bitsandbytes).

use std::collections::HashMap;
use std::ops::Range;

use burn::config::Config;
use serde::{Deserialize, Serialize};

use crate::OptimError;
use crate::page::{PageState, StateFormat, split_into_pages};
use crate::pager::{Pager, PagerStats};
use crate::update::AdamHyper;
use adamw_rules::{HostMemory, PageDevice, ParamValues, UpdateRule};

/// The state precision of AdamW.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdamPrecision {
    /// f32 moments, `torch.optim.AdamW`'s update (QLoRA's `paged_adamw_32bit`).
    Bits32,
    /// 8-bit blockwise moments, `bitsandbytes.optim.AdamW8bit`'s update (`paged_adamw_8bit`).
    Bits8,
}

impl std::str::FromStr for AdamPrecision {
    type Err = OptimError;
    fn from_str(s: &str) -> Result<Self, OptimError> {
        match s {
            "32" | "32bit" | "bits32" => Ok(AdamPrecision::Bits32),
            "8" | "8bit" | "bits8" => Ok(AdamPrecision::Bits8),
            other => Err(OptimError::Config(format!("unknown optimizer precision `{other}` (expected 32bit or 8bit)"))),
        }
    }
}

/// AdamW with paged state.
#[derive(Config, Debug)]
pub struct PagedAdamWConfig {
    /// State precision: 32-bit (torch semantics) or 8-bit blockwise (bitsandbytes semantics).
    #[config(default = "AdamPrecision::Bits32")]
    pub precision: AdamPrecision,
    #[config(default = 0.9)]
    pub beta1: f64,
    /// QLoRA uses 0.999 (transformers' default).
    #[config(default = 0.999)]
    pub beta2: f64,
    #[config(default = 1e-8)]
    pub eps: f64,
    /// Decoupled weight decay; QLoRA's recipe uses 0.
    #[config(default = 0.0)]
    pub weight_decay: f64,
    /// Tensors with fewer elements keep 32-bit state in 8-bit mode (bitsandbytes' `min_8bit_size`).
    #[config(default = 4096)]
    pub min_8bit_size: usize,
    /// Bytes of state per page (1 MiB).
    #[config(default = 1048576)]
    pub page_bytes: usize,
    /// Most state bytes resident on the device at once; `None`: no limit (state stays resident).
    #[config(default = "None")]
    pub device_budget_bytes: Option<usize>,
}

impl PagedAdamWConfig {
    /// The optimizer on the CPU (flex) device.
    pub fn init(&self) -> Result<PagedAdamW<HostMemory>, OptimError> {
        self.init_on(HostMemory::default())
    }

    /// The optimizer with its state paged to `device`.
    pub fn init_on<D: PageDevice>(&self, device: D) -> Result<PagedAdamW<D>, OptimError> {
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(OptimError::Config(format!("{name} = {beta} must be in [0, 1)")));
            }
        }
        if !(self.eps >= 0.0) || !(self.weight_decay >= 0.0) {
            return Err(OptimError::Config(format!(
                "eps ({}) and weight decay ({}) must be ≥ 0",
                self.eps, self.weight_decay
            )));
        }
        for format in [StateFormat::F32, StateFormat::Blockwise8] {
            if format.elements_per_page(self.page_bytes) == 0 {
                return Err(OptimError::Config(format!(
                    "page size {} bytes cannot hold one element of {format:?} state (8-bit pages hold whole 256-element blocks: ≥ 520 bytes)",
                    self.page_bytes
                )));
            }
        }
        if let Some(budget) = self.device_budget_bytes
            && budget < self.page_bytes
        {
            return Err(OptimError::BudgetTooSmall { budget, page_bytes: self.page_bytes });
        }
        Ok(PagedAdamW {
            config: self.clone(),
            params: Vec::new(),
            index: HashMap::new(),
            pager: Pager::new(device, self.device_budget_bytes),
        })
    }
}

/// One trainable tensor and its gradient, flattened, for one step: host slices (`[f32]`, the default) or
/// [`FlatTensor`](crate::device::FlatTensor)s on the training device, as the page device reads them.
pub struct ParamGrad<'a, V: ?Sized = [f32]> {
    /// A stable name (the module path), used to find its state across steps and checkpoints.
    pub key: &'a str,
    pub param: &'a mut V,
    pub grad: &'a V,
}

/// The optimizer's record of one parameter.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParamEntry {
    pub key: String,
    pub numel: usize,
    pub format: StateFormat,
    /// Updates applied so far (torch's and bitsandbytes' per-parameter `step`).
    pub step: u64,
    pub pages: Range<usize>,
}

/// AdamW with its state in pages on the host, streamed through a device budget.
pub struct PagedAdamW<D: PageDevice = HostMemory> {
    pub(crate) config: PagedAdamWConfig,
    pub(crate) params: Vec<ParamEntry>,
    pub(crate) index: HashMap<String, usize>,
    pub(crate) pager: Pager<D>,
}

impl<D: PageDevice> PagedAdamW<D> {
    pub fn config(&self) -> &PagedAdamWConfig {
        &self.config
    }

    /// The state format a parameter of `numel` elements gets.
    pub fn format_for(&self, numel: usize) -> StateFormat {
        match self.config.precision {
            AdamPrecision::Bits8 if numel >= self.config.min_8bit_size => StateFormat::Blockwise8,
            _ => StateFormat::F32,
        }
    }

    fn rule_for(&self, format: StateFormat) -> UpdateRule {
        match (self.config.precision, format) {
            (AdamPrecision::Bits32, _) => UpdateRule::TorchAdamW,
            (AdamPrecision::Bits8, StateFormat::F32) => UpdateRule::Bnb32,
            (AdamPrecision::Bits8, StateFormat::Blockwise8) => UpdateRule::Bnb8,
        }
    }

    /// Registers a parameter with the given state (fresh zeros unless restored from a checkpoint).
    pub(crate) fn register(
        &mut self,
        key: &str,
        numel: usize,
        step: u64,
        state: Option<PageState>,
    ) -> Result<usize, OptimError> {
        if numel == 0 {
            return Err(OptimError::Param { key: key.to_string(), reason: "has no elements".into() });
        }
        let format = state.as_ref().map_or_else(|| self.format_for(numel), PageState::format);
        let elements_per_page = format.elements_per_page(self.config.page_bytes);
        let param = self.params.len();
        let first = self.pager.pages().len();
        for info in split_into_pages(param, numel, format, elements_per_page) {
            let page_state = match &state {
                None => PageState::zeros(format, info.range.len()),
                Some(full) => slice_state(full, info.range.clone()),
            };
            self.pager.add_page(info, page_state)?;
        }
        let pages = first..self.pager.pages().len();
        self.params.push(ParamEntry { key: key.to_string(), numel, format, step, pages });
        self.index.insert(key.to_string(), param);
        Ok(param)
    }

    /// One AdamW step at learning rate `lr` for every parameter given (in the given order). Parameters seen
    /// for the first time get fresh state, as in torch.
    pub fn step(&mut self, lr: f64, params: &mut [ParamGrad<'_, D::Values>]) -> Result<PagerStats, OptimError> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(OptimError::Config(format!("learning rate {lr} must be finite and ≥ 0")));
        }
        for p in params.iter() {
            let numel = p.param.numel();
            if numel != p.grad.numel() {
                return Err(OptimError::Param {
                    key: p.key.to_string(),
                    reason: format!("{numel} values but {} gradient values", p.grad.numel()),
                });
            }
            match self.index.get(p.key) {
                Some(&i) if self.params[i].numel != numel => {
                    return Err(OptimError::Param {
                        key: p.key.to_string(),
                        reason: format!("has {numel} elements but its optimizer state has {}", self.params[i].numel),
                    });
                }
                Some(_) => {}
                None => {
                    self.register(p.key, numel, 0, None)?;
                }
            }
        }
        self.pager.begin_step();
        for p in params.iter_mut() {
            let i = self.index[p.key];
            let rule = self.rule_for(self.params[i].format);
            let entry = &mut self.params[i];
            entry.step += 1;
            let hyper = AdamHyper {
                lr,
                beta1: self.config.beta1,
                beta2: self.config.beta2,
                eps: self.config.eps,
                weight_decay: self.config.weight_decay,
                step: entry.step,
            };
            for page in entry.pages.clone() {
                self.pager.update(page, rule, p.param, p.grad, &hyper);
            }
        }
        Ok(self.pager.stats())
    }

    /// The pager's counters.
    pub fn stats(&self) -> PagerStats {
        self.pager.stats()
    }

    /// Total optimizer state bytes.
    pub fn state_bytes(&self) -> u64 {
        self.pager.stats().state_bytes
    }

    /// Keys of the parameters with state, in registration order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.key.as_str())
    }

    /// Updates applied to a parameter so far.
    pub fn steps_of(&self, key: &str) -> Option<u64> {
        self.index.get(key).map(|&i| self.params[i].step)
    }

    /// The whole state of one parameter, gathered from its pages (host copy).
    pub fn state_of(&self, key: &str) -> Option<PageState> {
        let entry = &self.params[*self.index.get(key)?];
        let parts: Vec<PageState> = entry.pages.clone().map(|p| self.pager.read(p)).collect();
        Some(concat_states(entry.format, parts))
    }
}

/// Concatenates consecutive page states of one parameter.
fn concat_states(format: StateFormat, parts: Vec<PageState>) -> PageState {
    let mut out = PageState::zeros(format, 0);
    for part in parts {
        match (&mut out, part) {
            (PageState::F32 { exp_avg, exp_avg_sq }, PageState::F32 { exp_avg: a, exp_avg_sq: b }) => {
                exp_avg.extend(a);
                exp_avg_sq.extend(b);
            }
            (
                PageState::Blockwise8 { codes1, absmax1, codes2, absmax2 },
                PageState::Blockwise8 { codes1: c1, absmax1: a1, codes2: c2, absmax2: a2 },
            ) => {
                codes1.extend(c1);
                absmax1.extend(a1);
                codes2.extend(c2);
                absmax2.extend(a2);
            }
            _ => unreachable!("pages of one parameter share a format"),
        }
    }
    out
}

/// The part of a whole-parameter state covering `range` (block-aligned for 8-bit).
fn slice_state(full: &PageState, range: Range<usize>) -> PageState {
    use crate::update::STATE_BLOCKSIZE;
    match full {
        PageState::F32 { exp_avg, exp_avg_sq } => {
            PageState::F32 { exp_avg: exp_avg[range.clone()].to_vec(), exp_avg_sq: exp_avg_sq[range].to_vec() }
        }
        PageState::Blockwise8 { codes1, absmax1, codes2, absmax2 } => {
            let blocks = range.start / STATE_BLOCKSIZE..range.end.div_ceil(STATE_BLOCKSIZE);
            PageState::Blockwise8 {
                codes1: codes1[range.clone()].to_vec(),
                absmax1: absmax1[blocks.clone()].to_vec(),
                codes2: codes2[range].to_vec(),
                absmax2: absmax2[blocks].to_vec(),
            }
        }
    }
}
