//! Adapters held beside a model instead of inside it, for serving several of them on one base: a
//! [`SideAdapter`] per PEFT directory ([`crate::attach::read_side_adapter`]), and [`AdapterGroups`], which
//! runs each linear layer once over a flattened batch whose rows belong to different adapters.

use std::ops::Range;

use burn::tensor::Tensor;

use crate::{LoraAdapter, LoraLinear};

/// One optional LoRA pair per linear layer, in the order of the model family's `linears()` list.
#[derive(Debug)]
pub struct SideAdapter {
    pub modules: Vec<Option<LoraAdapter>>,
}

/// The row ranges of a flattened batch that share a side adapter: consecutive sequences with the same
/// adapter form one group (order the sequences by adapter so that each adapter's products run once).
pub struct AdapterGroups<'a> {
    groups: Vec<(Range<usize>, &'a SideAdapter)>,
}

impl<'a> AdapterGroups<'a> {
    /// Groups from each sequence's rows of the batch (in order, adjoining) and its adapter (`None`: the
    /// base alone).
    pub fn new(sequences: impl IntoIterator<Item = (Range<usize>, Option<&'a SideAdapter>)>) -> Self {
        let mut groups: Vec<(Range<usize>, &SideAdapter)> = Vec::new();
        for (span, adapter) in sequences {
            let Some(adapter) = adapter else { continue };
            match groups.last_mut() {
                Some((range, last)) if std::ptr::eq(*last, adapter) && range.end == span.start => range.end = span.end,
                _ => groups.push((span, adapter)),
            }
        }
        AdapterGroups { groups }
    }

    /// `layer` (the `module`-th of the `linears()` list) over `x` `[rows, in]` → `[rows, out]`: the base
    /// product once for all rows, each group's own low-rank term on its rows
    /// ([`LoraLinear::forward_grouped`]).
    pub fn forward(&self, x: Tensor<2>, layer: &LoraLinear, module: usize) -> Tensor<2> {
        let own: Vec<(Range<usize>, &LoraAdapter)> = self
            .groups
            .iter()
            .filter_map(|(range, adapter)| adapter.modules[module].as_ref().map(|a| (range.clone(), a)))
            .collect();
        layer.forward_grouped(x, &own)
    }
}
