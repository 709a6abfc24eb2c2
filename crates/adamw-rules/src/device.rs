//! The page interface between the pager (crate `optim`) and the memory that holds resident pages: host memory
//! here, burn tensors on the training device in `optim`, raw device buffers in `qlora-kernels`.

use std::ops::Range;

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

/// The values of one parameter (or its gradient) where a [`PageDevice`] reads them: host slices, or tensors on
/// the device.
pub trait ParamValues {
    /// Number of elements.
    fn numel(&self) -> usize;
}

impl ParamValues for [f32] {
    fn numel(&self) -> usize {
        self.len()
    }
}

/// A device that holds resident pages and runs the update on them.
///
/// [`HostMemory`] is the CPU with host slices. `optim::TensorPages` keeps pages, parameters and gradients as burn
/// tensors on the training device (the trainer's path on every backend); `qlora_kernels::adamw::DevicePages`
/// holds raw CubeCL buffers and takes host slices (the kernel checks).
pub trait PageDevice {
    type Page: Send;
    /// Where parameters and gradients live for the update.
    type Values: ParamValues + ?Sized;
    /// Moves a page from host memory to the device.
    fn upload(&mut self, host: PageState) -> Self::Page;
    /// Moves a page back to host memory.
    fn download(&mut self, page: Self::Page) -> PageState;
    /// A host copy of a resident page (for checkpoints), leaving it resident.
    fn snapshot(&self, page: &Self::Page) -> PageState;
    /// Runs the update on a resident page for the elements `range` of the parameter (the page covers exactly
    /// those): `param` is updated in place; `param` and `grad` are the whole parameter.
    fn update(
        &mut self,
        page: &mut Self::Page,
        rule: UpdateRule,
        param: &mut Self::Values,
        grad: &Self::Values,
        range: Range<usize>,
        hyper: &AdamHyper,
    );
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
    type Values = [f32];

    fn upload(&mut self, host: PageState) -> PageState {
        if self.copy_on_transfer { host.clone() } else { host }
    }

    fn download(&mut self, page: PageState) -> PageState {
        if self.copy_on_transfer { page.clone() } else { page }
    }

    fn snapshot(&self, page: &PageState) -> PageState {
        page.clone()
    }

    fn update(
        &mut self,
        page: &mut PageState,
        rule: UpdateRule,
        param: &mut [f32],
        grad: &[f32],
        range: Range<usize>,
        hyper: &AdamHyper,
    ) {
        update_host_page(page, rule, &mut param[range.clone()], &grad[range], hyper)
    }
}

/// Runs `rule` on a host page for the parameter elements it covers (the host reference of every device).
pub fn update_host_page(page: &mut PageState, rule: UpdateRule, param: &mut [f32], grad: &[f32], hyper: &AdamHyper) {
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
