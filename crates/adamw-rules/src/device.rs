//! The page interface between the pager (crate `optim`) and the memory that holds resident pages: host memory
//! here, device buffers with the fused CubeCL update in `qlora-kernels`.

use crate::page::PageState;
use crate::update::{AdamHyper, Blockwise8Mut, adamw_bnb8, adamw_bnb32, adamw_torch};

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
/// the fused CubeCL update kernel (`qlora-kernels`).
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
            (PageState::F32 { exp_avg, exp_avg_sq }, UpdateRule::TorchAdamW) => {
                adamw_torch(param, grad, exp_avg, exp_avg_sq, hyper)
            }
            (PageState::F32 { exp_avg, exp_avg_sq }, UpdateRule::Bnb32) => {
                adamw_bnb32(param, grad, exp_avg, exp_avg_sq, hyper)
            }
            (PageState::Blockwise8 { codes1, absmax1, codes2, absmax2 }, UpdateRule::Bnb8) => {
                let state = Blockwise8Mut { codes1, absmax1, codes2, absmax2 };
                adamw_bnb8(param, grad, state, crate::codebooks::signed(), crate::codebooks::unsigned(), hyper)
            }
            (page, rule) => unreachable!("update rule {rule:?} on a {:?} page", page.format()),
        }
    }
}
