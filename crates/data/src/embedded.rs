//! The embedded default dataset: 3,000 WordNet 3.0 word-meaning pairs in the chat format (2,800 train,
//! 200 held out), built by `xtask/data/make_wordnet_dataset.py`. WordNet's licence travels with it.

/// Training pairs, JSONL (`messages`).
pub const WORDNET_TRAIN: &str = include_str!("../datasets/wordnet/train.jsonl");
/// Held-out pairs, JSONL (`messages`).
pub const WORDNET_HELDOUT: &str = include_str!("../datasets/wordnet/heldout.jsonl");
/// The WordNet 3.0 licence.
pub const WORDNET_LICENSE: &str = include_str!("../datasets/wordnet/LICENSE");
/// The name used for the embedded dataset on the command line and in logs.
pub const WORDNET_NAME: &str = "wordnet";
