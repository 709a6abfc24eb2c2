//! The pager: optimizer state in host pages, at most `budget` bytes of it resident on the compute device.
//!
//! Every step visits the pages in the same order, so the pager evicts with Belady's rule (the resident page
//! whose next use is furthest away): with room for k of n pages, k of them stay resident from step to step
//! and only the other n - k stream through (the minimum), where least-recently-used eviction would move every page every
//! step. With a budget of at least the whole state nothing moves after the first step.

use adamw_rules::page::{PageInfo, PageState};
use adamw_rules::update::AdamHyper;
use adamw_rules::{PageDevice, UpdateRule};

use crate::OptimError;

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

    /// Makes page `index` resident (evicting others if the budget requires) and updates it; `param` and `grad`
    /// are the whole parameter the page belongs to.
    pub fn update(
        &mut self,
        index: usize,
        rule: UpdateRule,
        param: &mut D::Values,
        grad: &D::Values,
        hyper: &AdamHyper,
    ) {
        self.make_resident(index);
        let range = self.pages[index].range.clone();
        let page = self.resident[index].as_mut().expect("page made resident");
        self.device.update(page, rule, param, grad, range, hyper);
    }

    /// The page device.
    pub fn device(&self) -> &D {
        &self.device
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
