//! Epoch order (seeded shuffle, optional grouping by length) and padded micro-batches.
//!
//! The shuffle is a Fisher–Yates over SplitMix64, written here so that an order depends only on the seed and
//! the epoch, never on a library version: a resumed run sees exactly the batches of an uninterrupted one.

use serde::{Deserialize, Serialize};

use crate::tokenize::TokenizedExample;

/// The epoch order's generator (serialisable: the data cursor stores it).
pub use splitmix::SplitMix64;

/// How examples are ordered each epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConfig {
    pub shuffle: bool,
    pub seed: u64,
    /// transformers' `group_by_length`: megabatches of 50 micro-batches, each sorted by length (longest
    /// first), the longest megabatch head moved to the front.
    pub group_by_length: bool,
    pub micro_batch_size: usize,
}

/// The order of example indices in epoch `epoch`.
pub fn epoch_order(lengths: &[usize], config: &OrderConfig, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    if config.shuffle {
        let mut rng = SplitMix64(config.seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
        for i in (1..order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
    }
    if config.group_by_length {
        let mega = 50 * config.micro_batch_size.max(1);
        let mut megabatches: Vec<Vec<usize>> = order.chunks(mega).map(|c| c.to_vec()).collect();
        for m in &mut megabatches {
            m.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
        }
        if let Some(longest) = (0..megabatches.len()).max_by_key(|&i| (lengths[megabatches[i][0]], usize::MAX - i)) {
            let head = megabatches[longest][0];
            megabatches[longest][0] = megabatches[0][0];
            megabatches[0][0] = head;
        }
        order = megabatches.concat();
    }
    order
}

/// Where the trainer is in the data: the epoch and the position in that epoch's order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    pub epoch: u64,
    pub position: usize,
}

/// A padded micro-batch, row-major `[batch, len]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub len: usize,
    pub ids: Vec<u32>,
    /// `labels[b, t]` is the token that logits at `t` must predict (`ids[b, t + 1]`), 0 where unused.
    pub labels: Vec<u32>,
    /// 1.0 where `labels[b, t]` counts in the loss.
    pub label_mask: Vec<f32>,
    /// Number of target tokens (sum of `label_mask`).
    pub targets: usize,
}

impl Batch {
    /// Right-pads `examples` with `pad_id` (causal attention never looks right, so padding needs no mask).
    pub fn new(examples: &[&TokenizedExample], pad_id: u32) -> Batch {
        let batch = examples.len();
        let len = examples.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut ids = vec![pad_id; batch * len];
        let mut labels = vec![0u32; batch * len];
        let mut label_mask = vec![0.0f32; batch * len];
        let mut targets = 0;
        for (b, e) in examples.iter().enumerate() {
            ids[b * len..b * len + e.len()].copy_from_slice(&e.ids);
            for t in 0..e.len().saturating_sub(1) {
                if e.target[t + 1] {
                    labels[b * len + t] = e.ids[t + 1];
                    label_mask[b * len + t] = 1.0;
                    targets += 1;
                }
            }
        }
        Batch { batch, len, ids, labels, label_mask, targets }
    }
}

/// Walks the data in micro-batches, epoch after epoch.
#[derive(Debug, Clone)]
pub struct BatchStream<'a, E = TokenizedExample> {
    examples: &'a [E],
    lengths: Vec<usize>,
    config: OrderConfig,
    order: Vec<usize>,
    pub cursor: DataCursor,
}

/// What the epoch order needs to know of an example: its length in tokens (for `group_by_length`).
pub trait TokenCount {
    fn token_count(&self) -> usize;
}

impl TokenCount for TokenizedExample {
    fn token_count(&self) -> usize {
        self.len()
    }
}

impl<'a, E: TokenCount> BatchStream<'a, E> {
    /// A stream positioned at `cursor` (the start, or where a checkpoint left off).
    pub fn new(examples: &'a [E], config: OrderConfig, cursor: DataCursor) -> Self {
        let lengths: Vec<usize> = examples.iter().map(E::token_count).collect();
        let order = epoch_order(&lengths, &config, cursor.epoch);
        BatchStream { examples, lengths, config, order, cursor }
    }

    /// The next micro-batch's examples (the last of an epoch may be smaller).
    pub fn next_examples(&mut self) -> Vec<&'a E> {
        if self.cursor.position >= self.order.len() {
            self.cursor = DataCursor { epoch: self.cursor.epoch.wrapping_add(1), position: 0 };
            self.order = epoch_order(&self.lengths, &self.config, self.cursor.epoch);
        }
        let end = (self.cursor.position + self.config.micro_batch_size).min(self.order.len());
        let picked = self.order[self.cursor.position..end].iter().map(|&i| &self.examples[i]).collect();
        self.cursor.position = end;
        picked
    }

    /// Micro-batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.examples.len().div_ceil(self.config.micro_batch_size.max(1))
    }
}
