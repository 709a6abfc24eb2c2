//! The pager: optimizer state in host pages, at most `budget` bytes of it resident on the compute device.
//!
//! Every step visits the pages in the same order, so the pager evicts with Belady's rule (the resident page
//! whose next use is furthest away): with room for k of n pages, k of them stay resident from step to step
//! and only the other n - k stream through (the minimum), where least-recently-used eviction would move every page every
//! step. With a budget of at least the whole state nothing moves after the first step.

use crate::page::{PageInfo, PageState};
use crate::update::{adamw_bnb32, adamw_bnb8, adamw_torch, AdamHyper, Blockwise8Mut};
use crate::OptimError;

/// Which update rule a page gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateRule {
    /// torch.optim.AdamW on f32 state.
    TorchAdamW,
    /// bitsandbytes' 32-bit update (small tensors of the 8-bit optimizer).
    Bnb32,
    /// bitsandbytes' 8-bit blockwise update.
    Bnb8,
}

/// A device that holds resident pages and runs the update on them.
///
/// [`HostMemory`] is the CPU (flex) device. A CUDA device implements the same trait with device buffers and
/// the fused CubeCL update kernel (kernels-cubecl).
pub trait PageDevice {
    type Page: Send;
    /// Moves a page from host memory to the device.
    fn upload(&mut self, host: PageState) -> Self::Page;
    /// Moves a page back to host memory.
    fn download(&mut self, page: Self::Page) -> PageState;
    /// A host copy of a resident page (for checkpoints), leaving it resident.
    fn snapshot(&self, page: &Self::Page) -> PageState;
    /// Runs the update on a resident page for the parameter elements it covers.
    fn update(&mut self, page: &mut Self::Page, rule: UpdateRule, param: &mut [f32], grad: &[f32], hyper: &AdamHyper);
}

/// The CPU as a page device. With `copy_on_transfer` false (the default for the CPU), host and device memory
/// are the same, so a transfer hands the buffer over without copying; with it true every transfer copies into
/// a separate allocation, as a discrete device would, which tests and benchmarks use to measure paging.
#[derive(Debug, Default, Clone)]
pub struct HostMemory {
    pub copy_on_transfer: bool,
}

impl PageDevice for HostMemory {
    type Page = PageState;

    fn upload(&mut self, host: PageState) -> PageState {
        if self.copy_on_transfer { host.clone() } else { host }
    }

    fn download(&mut self, page: PageState) -> PageState {
        if self.copy_on_transfer { page.clone() } else { page }
    }

    fn snapshot(&self, page: &PageState) -> PageState {
        page.clone()
    }

    fn update(&mut self, page: &mut PageState, rule: UpdateRule, param: &mut [f32], grad: &[f32], hyper: &AdamHyper) {
        match (page, rule) {
            (PageState::F32 { exp_avg, exp_avg_sq }, UpdateRule::TorchAdamW) => adamw_torch(param, grad, exp_avg, exp_avg_sq, hyper),
            (PageState::F32 { exp_avg, exp_avg_sq }, UpdateRule::Bnb32) => adamw_bnb32(param, grad, exp_avg, exp_avg_sq, hyper),
            (PageState::Blockwise8 { codes1, absmax1, codes2, absmax2 }, UpdateRule::Bnb8) => {
                let state = Blockwise8Mut { codes1, absmax1, codes2, absmax2 };
                adamw_bnb8(param, grad, state, crate::codebooks::signed(), crate::codebooks::unsigned(), hyper)
            }
            (page, rule) => unreachable!("update rule {rule:?} on a {:?} page", page.format()),
        }
    }
}

/// What the pager did, for the trainer's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PagerStats {
    /// Bytes moved host → device during the last step.
    pub paged_in_bytes: u64,
    /// Bytes moved device → host during the last step.
    pub paged_out_bytes: u64,
    /// Totals since creation.
    pub total_paged_in_bytes: u64,
    pub total_paged_out_bytes: u64,
    /// State bytes resident on the device now.
    pub resident_bytes: u64,
    /// The most state bytes ever resident at once.
    pub peak_resident_bytes: u64,
    /// All optimizer state bytes (host + device).
    pub state_bytes: u64,
    /// The device budget (`u64::MAX` when unlimited).
    pub budget_bytes: u64,
}

/// Host pages, the resident subset, and the accounting.
pub struct Pager<D: PageDevice> {
    device: D,
    budget: Option<usize>,
    pages: Vec<PageInfo>,
    host: Vec<Option<PageState>>,
    resident: Vec<Option<D::Page>>,
    resident_bytes: usize,
    stats: PagerStats,
}

impl<D: PageDevice> Pager<D> {
    pub fn new(device: D, budget: Option<usize>) -> Self {
        let stats = PagerStats { budget_bytes: budget.map_or(u64::MAX, |b| b as u64), ..PagerStats::default() };
        Pager { device, budget, pages: Vec::new(), host: Vec::new(), resident: Vec::new(), resident_bytes: 0, stats }
    }

    /// Adds a page (in host memory) and returns its index.
    pub fn add_page(&mut self, info: PageInfo, state: PageState) -> Result<usize, OptimError> {
        if let Some(budget) = self.budget
            && info.bytes > budget
        {
            return Err(OptimError::BudgetTooSmall { budget, page_bytes: info.bytes });
        }
        self.stats.state_bytes += info.bytes as u64;
        self.pages.push(info);
        self.host.push(Some(state));
        self.resident.push(None);
        Ok(self.pages.len() - 1)
    }

    pub fn pages(&self) -> &[PageInfo] {
        &self.pages
    }

    pub fn stats(&self) -> PagerStats {
        self.stats
    }

    /// Starts a step's accounting.
    pub fn begin_step(&mut self) {
        self.stats.paged_in_bytes = 0;
        self.stats.paged_out_bytes = 0;
    }

    /// Makes page `index` resident (evicting others if the budget requires) and updates it.
    pub fn update(&mut self, index: usize, rule: UpdateRule, param: &mut [f32], grad: &[f32], hyper: &AdamHyper) {
        self.make_resident(index);
        let page = self.resident[index].as_mut().expect("page made resident");
        self.device.update(page, rule, param, grad, hyper);
    }

    fn make_resident(&mut self, index: usize) {
        if self.resident[index].is_some() {
            return;
        }
        let bytes = self.pages[index].bytes;
        if let Some(budget) = self.budget {
            while self.resident_bytes + bytes > budget {
                let victim = self.furthest_next_use(index).expect("a page is resident while the budget is exceeded");
                self.evict(victim);
            }
        }
        let host = self.host[index].take().expect("a non-resident page is on the host");
        self.resident[index] = Some(self.device.upload(host));
        self.resident_bytes += bytes;
        self.stats.paged_in_bytes += bytes as u64;
        self.stats.total_paged_in_bytes += bytes as u64;
        self.stats.resident_bytes = self.resident_bytes as u64;
        self.stats.peak_resident_bytes = self.stats.peak_resident_bytes.max(self.resident_bytes as u64);
    }

    fn evict(&mut self, index: usize) {
        let page = self.resident[index].take().expect("evicting a resident page");
        self.host[index] = Some(self.device.download(page));
        let bytes = self.pages[index].bytes;
        self.resident_bytes -= bytes;
        self.stats.paged_out_bytes += bytes as u64;
        self.stats.total_paged_out_bytes += bytes as u64;
        self.stats.resident_bytes = self.resident_bytes as u64;
    }

    /// The resident page (other than `current`) used furthest in the future, pages being visited in index
    /// order, cyclically.
    fn furthest_next_use(&self, current: usize) -> Option<usize> {
        let n = self.pages.len();
        (0..n).filter(|&i| i != current && self.resident[i].is_some()).max_by_key(|&i| (i + n - current) % n)
    }

    /// A host copy of page `index`, wherever it lives.
    pub fn read(&self, index: usize) -> PageState {
        match (&self.host[index], &self.resident[index]) {
            (Some(host), _) => host.clone(),
            (None, Some(page)) => self.device.snapshot(page),
            (None, None) => unreachable!("page {index} is neither on the host nor resident"),
        }
    }
}
