//! Pages of optimizer state: a contiguous element range of one parameter, with both Adam moments.

use std::ops::Range;

use crate::update::STATE_BLOCKSIZE;

/// How a page stores its two moments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFormat {
    /// f32 first and second moments: 8 bytes per element.
    F32,
    /// 8-bit blockwise (bitsandbytes): 2 bytes per element + 8 bytes per 256-element block.
    Blockwise8,
}

impl StateFormat {
    /// State bytes of `elements` elements in this format.
    pub fn bytes_for(self, elements: usize) -> usize {
        match self {
            StateFormat::F32 => 8 * elements,
            StateFormat::Blockwise8 => 2 * elements + 8 * elements.div_ceil(STATE_BLOCKSIZE),
        }
    }

    /// The most elements a page of `page_bytes` holds (whole 256-blocks for 8-bit); 0 if not even one fits.
    pub fn elements_per_page(self, page_bytes: usize) -> usize {
        match self {
            StateFormat::F32 => page_bytes / 8,
            StateFormat::Blockwise8 => page_bytes / (2 * STATE_BLOCKSIZE + 8) * STATE_BLOCKSIZE,
        }
    }
}

/// The state of one page, wherever it currently lives.
#[derive(Debug, Clone, PartialEq)]
pub enum PageState {
    F32 { exp_avg: Vec<f32>, exp_avg_sq: Vec<f32> },
    Blockwise8 { codes1: Vec<u8>, absmax1: Vec<f32>, codes2: Vec<u8>, absmax2: Vec<f32> },
}

impl PageState {
    /// Fresh (zero) state for `elements` elements, as torch and bitsandbytes initialise it.
    pub fn zeros(format: StateFormat, elements: usize) -> Self {
        match format {
            StateFormat::F32 => PageState::F32 { exp_avg: vec![0.0; elements], exp_avg_sq: vec![0.0; elements] },
            StateFormat::Blockwise8 => {
                let blocks = elements.div_ceil(STATE_BLOCKSIZE);
                PageState::Blockwise8 {
                    codes1: vec![0; elements],
                    absmax1: vec![0.0; blocks],
                    codes2: vec![0; elements],
                    absmax2: vec![0.0; blocks],
                }
            }
        }
    }

    pub fn format(&self) -> StateFormat {
        match self {
            PageState::F32 { .. } => StateFormat::F32,
            PageState::Blockwise8 { .. } => StateFormat::Blockwise8,
        }
    }

    pub fn elements(&self) -> usize {
        match self {
            PageState::F32 { exp_avg, .. } => exp_avg.len(),
            PageState::Blockwise8 { codes1, .. } => codes1.len(),
        }
    }

    /// Bytes this page occupies.
    pub fn bytes(&self) -> usize {
        self.format().bytes_for(self.elements())
    }
}

/// Where a page sits in the parameter it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageInfo {
    /// Index of the parameter in the optimizer's table.
    pub param: usize,
    /// Element range of the parameter this page covers.
    pub range: Range<usize>,
    pub format: StateFormat,
    /// State bytes of the page.
    pub bytes: usize,
}

/// Splits a parameter of `numel` elements into pages of at most `elements_per_page` elements.
pub fn split_into_pages(param: usize, numel: usize, format: StateFormat, elements_per_page: usize) -> Vec<PageInfo> {
    (0..numel)
        .step_by(elements_per_page.max(1))
        .map(|start| {
            let end = (start + elements_per_page).min(numel);
            PageInfo { param, range: start..end, format, bytes: format.bytes_for(end - start) }
        })
        .collect()
}
