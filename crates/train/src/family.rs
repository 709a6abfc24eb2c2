//! What the trainer needs of a model family, so that one training loop serves the decoder-only Llama family
//! and the encoder–decoder T5 family: [`TrainModel`] (the module: loss of a micro-batch, adapters in and
//! out) and [`Family`] (the loaded model with its tokenizer: loading as configured, data to examples and
//! micro-batches, a sample answer). `qlora train` picks the family from `--model` ([`crate::seq2seq::is_t5`]).
//!
//! | | Llama ([`LoadedModel`]) | T5 ([`LoadedT5`]) |
//! |---|---|---|
//! | example | [`TokenizedExample`]: one sequence, a target mask | [`Seq2SeqExample`]: source and target |
//! | micro-batch | [`Batch`]: right-padded, labels shifted left | [`Seq2SeqBatch`]: padded source (masked), decoder input shifted right |
//! | loss | next-token NLL on the target tokens | NLL of the target given the source |
//! | adapter | PEFT `CAUSAL_LM` | PEFT `SEQ_2_SEQ_LM` |

use std::path::Path;

use burn::module::Module;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use data::{Batch, Limits, Seq2SeqBatch, Seq2SeqExample, TokenCount, TokenizedExample};
use formats::tokenizer::{ChatMessage, TextTokenizer};
use llama::{LlamaModel, LoadOptions, LoadedModel};
use lora::LoraConfig;
use lora::peft::PeftAdapter;
use t5::{LoadedT5, T5Model};

use crate::TrainError;
use crate::config::TrainConfig;

/// A padded micro-batch as the trainer counts it.
pub trait MicroBatch: Clone + Send + 'static {
    /// Tokens the loss is computed on.
    fn targets(&self) -> usize;
    /// Tokens the model reads (padding included): the throughput's numerator.
    fn tokens(&self) -> usize;
}

impl MicroBatch for Batch {
    fn targets(&self) -> usize {
        self.targets
    }
    fn tokens(&self) -> usize {
        self.batch * self.len
    }
}

impl MicroBatch for Seq2SeqBatch {
    fn targets(&self) -> usize {
        self.targets
    }
    fn tokens(&self) -> usize {
        self.batch * (self.source_len + self.target_len)
    }
}

/// A model the trainer can train: the summed loss of a micro-batch, and LoRA adapters in PEFT's files.
pub trait TrainModel: Module + Sync + 'static {
    type Batch: MicroBatch;
    /// The summed negative log-likelihood `[1]` of the batch's target tokens.
    fn nll_sum(&self, batch: &Self::Batch, device: &Device) -> Tensor<1>;
    /// The summed negative log-likelihood of each row's target tokens (scoring, no gradients).
    fn nll_rows(&self, batch: &Self::Batch, device: &Device) -> Vec<f64>;
    /// Fresh adapters on the configured layers; returns how many.
    fn add_lora(&mut self, config: &LoraConfig, device: &Device) -> Result<usize, TrainError>;
    /// Reads a PEFT adapter directory into the model's adapters.
    fn load_peft_adapter(&mut self, dir: &Path) -> Result<PeftAdapter, TrainError>;
    /// Writes the adapters as a PEFT adapter directory.
    fn save_peft_adapter(&self, dir: &Path, config: &LoraConfig, base: &str) -> Result<(), TrainError>;
}

fn ids_tensor(ids: &[u32], shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    Tensor::from_data(TensorData::new(ids, shape), device)
}

/// Per row: `Σ_t mask · −log p(label)` from `logits` `[batch, len, vocab]`.
fn rows_nll(logits: Tensor<3>, labels: &[u32], mask: &[f32], device: &Device) -> Vec<f64> {
    let [b, t, _] = logits.dims();
    let labels: Vec<i64> = labels.iter().map(|&i| i64::from(i)).collect();
    let labels = Tensor::<3, Int>::from_data(TensorData::new(labels, [b, t, 1]), device);
    let mask = Tensor::<2>::from_data(TensorData::new(mask.to_vec(), [b, t]), device);
    let log_probs = log_softmax(logits.cast(DType::F32), 2);
    let nll = (log_probs.gather(2, labels).reshape([b, t]) * mask).sum_dim(1).neg();
    nll.into_data().convert::<f64>().try_to_vec::<f64>().expect("f64")
}

impl TrainModel for LlamaModel {
    type Batch = Batch;

    fn nll_sum(&self, batch: &Batch, device: &Device) -> Tensor<1> {
        let shape = [batch.batch, batch.len];
        let mask = Tensor::<2>::from_data(TensorData::new(batch.label_mask.clone(), shape), device);
        let hidden = self.forward_hidden(ids_tensor(&batch.ids, shape, device), None);
        LlamaModel::nll_sum(self, hidden, ids_tensor(&batch.labels, shape, device), mask)
    }
    fn nll_rows(&self, batch: &Batch, device: &Device) -> Vec<f64> {
        let logits = self.forward(ids_tensor(&batch.ids, [batch.batch, batch.len], device), None);
        rows_nll(logits, &batch.labels, &batch.label_mask, device)
    }
    fn add_lora(&mut self, config: &LoraConfig, device: &Device) -> Result<usize, TrainError> {
        Ok(LlamaModel::add_lora(self, config, device)?)
    }
    fn load_peft_adapter(&mut self, dir: &Path) -> Result<PeftAdapter, TrainError> {
        Ok(LlamaModel::load_peft_adapter(self, dir)?)
    }
    fn save_peft_adapter(&self, dir: &Path, config: &LoraConfig, base: &str) -> Result<(), TrainError> {
        LlamaModel::save_peft_adapter(self, dir, config, Some(base))?;
        Ok(())
    }
}

impl TrainModel for T5Model {
    type Batch = Seq2SeqBatch;

    fn nll_sum(&self, batch: &Seq2SeqBatch, device: &Device) -> Tensor<1> {
        let source = [batch.batch, batch.source_len];
        let target = [batch.batch, batch.target_len];
        let padding = Tensor::<2, Bool>::from_data(TensorData::new(batch.source_padding.clone(), source), device);
        let mask = Tensor::<2>::from_data(TensorData::new(batch.label_mask.clone(), target), device);
        T5Model::nll_sum(
            self,
            ids_tensor(&batch.source_ids, source, device),
            Some(&padding),
            ids_tensor(&batch.decoder_ids, target, device),
            ids_tensor(&batch.labels, target, device),
            mask,
        )
    }
    fn nll_rows(&self, batch: &Seq2SeqBatch, device: &Device) -> Vec<f64> {
        let source = [batch.batch, batch.source_len];
        let padding = Tensor::<2, Bool>::from_data(TensorData::new(batch.source_padding.clone(), source), device);
        let encoded = self.encode(ids_tensor(&batch.source_ids, source, device), Some(&padding));
        let decoder = ids_tensor(&batch.decoder_ids, [batch.batch, batch.target_len], device);
        let logits = self.logits(self.decode(decoder, &encoded, Some(&padding), None));
        rows_nll(logits, &batch.labels, &batch.label_mask, device)
    }
    fn add_lora(&mut self, config: &LoraConfig, device: &Device) -> Result<usize, TrainError> {
        Ok(T5Model::add_lora(self, config, device)?)
    }
    fn load_peft_adapter(&mut self, dir: &Path) -> Result<PeftAdapter, TrainError> {
        Ok(T5Model::load_peft_adapter(self, dir)?)
    }
    fn save_peft_adapter(&self, dir: &Path, config: &LoraConfig, base: &str) -> Result<(), TrainError> {
        T5Model::save_peft_adapter(self, dir, config, Some(base))?;
        Ok(())
    }
}

/// Tokenized data and what tokenizing it noticed.
pub struct Tokenized<E> {
    pub examples: Vec<E>,
    pub truncated: usize,
    pub dropped: usize,
}

/// A model family as loaded for training: the model, its tokenizer and the ids micro-batches need.
pub trait Family: Sized + Send + 'static {
    type Model: TrainModel;
    type Example: TokenCount + Send + Sync + 'static;

    /// Loads `config.model` onto `device`, quantized as configured (no adapter yet).
    fn load(config: &TrainConfig, device: &Device) -> Result<Self, TrainError>;
    fn model(&self) -> &Self::Model;
    fn model_mut(&mut self) -> &mut Self::Model;
    fn tokenizer(&self) -> Result<&TextTokenizer, TrainError>;
    fn vocab_size(&self) -> usize;
    /// Examples as this family trains on them.
    fn tokenize(&self, examples: &[data::Example], limits: &Limits) -> Result<Tokenized<Self::Example>, TrainError>;
    /// The token ids of an example (checked against the vocabulary).
    fn token_ids(example: &Self::Example) -> Box<dyn Iterator<Item = u32> + '_>;
    /// The example that scores `choice` as the answer to `prompt` (multiple-choice evaluation): the choice
    /// after the prompt for a decoder, the choice as the target of the prompt for an encoder–decoder.
    fn choice_example(&self, prompt: &str, choice: &str) -> Result<Self::Example, TrainError>;
    /// A padded micro-batch of `examples`.
    fn batch(&self, examples: &[&Self::Example]) -> <Self::Model as TrainModel>::Batch;
    /// `model`'s greedy answer to `prompt` (the run's before/after sample).
    fn sample_answer(&self, model: &Self::Model, prompt: &str, max_new_tokens: usize) -> Result<String, TrainError>;
}

fn load_options(config: &TrainConfig) -> Result<LoadOptions, TrainError> {
    nf4::check_blocksize(config.blocksize).map_err(|e| TrainError::Input(e.to_string()))?;
    Ok(LoadOptions {
        dtype: config.compute_dtype.dtype(),
        quant: config.quant.quant_config(config.blocksize, !config.no_double_quant),
    })
}

impl Family for LoadedModel {
    type Model = LlamaModel;
    type Example = TokenizedExample;

    fn load(config: &TrainConfig, device: &Device) -> Result<Self, TrainError> {
        let source = formats::source::resolve(&config.model)?;
        Ok(llama::load(&source, &load_options(config)?, device)?)
    }
    fn model(&self) -> &LlamaModel {
        &self.model
    }
    fn model_mut(&mut self) -> &mut LlamaModel {
        &mut self.model
    }
    fn tokenizer(&self) -> Result<&TextTokenizer, TrainError> {
        Ok(LoadedModel::tokenizer(self)?)
    }
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn tokenize(&self, examples: &[data::Example], limits: &Limits) -> Result<Tokenized<TokenizedExample>, TrainError> {
        let report = data::tokenize_all(examples, Family::tokenizer(self)?, limits)?;
        Ok(Tokenized { examples: report.examples, truncated: report.truncated, dropped: report.dropped })
    }
    fn token_ids(example: &TokenizedExample) -> Box<dyn Iterator<Item = u32> + '_> {
        Box::new(example.ids.iter().copied())
    }
    fn choice_example(&self, prompt: &str, choice: &str) -> Result<TokenizedExample, TrainError> {
        let tokenizer = Family::tokenizer(self)?;
        let bos = tokenizer.bos_token.as_deref().unwrap_or("");
        let prompt = tokenizer.encode(&format!("{bos}{prompt}"), false)?;
        let cont = tokenizer.encode(&format!(" {choice}"), false)?;
        let target = std::iter::repeat_n(false, prompt.len()).chain(std::iter::repeat_n(true, cont.len())).collect();
        Ok(TokenizedExample { ids: prompt.into_iter().chain(cont).collect(), target })
    }
    fn batch(&self, examples: &[&TokenizedExample]) -> Batch {
        // Padding is never attended to (causal attention) nor predicted: any id does; the EOS is at hand.
        let pad = self.tokenizer.as_ref().and_then(|t| t.token_id(t.eos_token.as_deref()?)).unwrap_or(0);
        Batch::new(examples, pad)
    }
    fn sample_answer(&self, model: &LlamaModel, prompt: &str, max_new_tokens: usize) -> Result<String, TrainError> {
        let tokenizer = Family::tokenizer(self)?;
        let text = tokenizer.apply_chat_template(&[ChatMessage::new("user", prompt)], true)?;
        let ids = tokenizer.encode(&text, false)?;
        let stop = tokenizer.stop_ids(&self.config.eos_token_ids);
        let sampling = llama::generate::SamplingConfig::new().with_max_new_tokens(max_new_tokens);
        let (tokens, _) = llama::generate::generate(&model.valid(), &ids, &sampling, &stop, |_| true)?;
        Ok(tokenizer.decode(&tokens, true)?.trim().to_string())
    }
}

impl Family for LoadedT5 {
    type Model = T5Model;
    type Example = Seq2SeqExample;

    fn load(config: &TrainConfig, device: &Device) -> Result<Self, TrainError> {
        let source = formats::source::resolve(&config.model)?;
        Ok(t5::load(&source, &load_options(config)?, device)?)
    }
    fn model(&self) -> &T5Model {
        &self.model
    }
    fn model_mut(&mut self) -> &mut T5Model {
        &mut self.model
    }
    fn tokenizer(&self) -> Result<&TextTokenizer, TrainError> {
        self.tokenizer.as_ref().ok_or_else(|| {
            TrainError::Input("the T5 model directory has no tokenizer.json: training needs one to read text".into())
        })
    }
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn tokenize(&self, examples: &[data::Example], limits: &Limits) -> Result<Tokenized<Seq2SeqExample>, TrainError> {
        let report = data::tokenize_all_seq2seq(examples, Family::tokenizer(self)?, limits)?;
        Ok(Tokenized { examples: report.examples, truncated: report.truncated, dropped: 0 })
    }
    fn token_ids(example: &Seq2SeqExample) -> Box<dyn Iterator<Item = u32> + '_> {
        Box::new(example.source.iter().chain(&example.target).copied())
    }
    fn choice_example(&self, prompt: &str, choice: &str) -> Result<Seq2SeqExample, TrainError> {
        let tokenizer = Family::tokenizer(self)?;
        let eos = self.config.eos_token_id;
        let (source, _) = data::seq2seq::encode_with_eos(tokenizer, prompt, eos, usize::MAX)?;
        let (target, _) = data::seq2seq::encode_with_eos(tokenizer, choice, eos, usize::MAX)?;
        Ok(Seq2SeqExample { source, target })
    }
    fn batch(&self, examples: &[&Seq2SeqExample]) -> Seq2SeqBatch {
        Seq2SeqBatch::new(examples, self.config.pad_token_id, self.config.decoder_start_token_id)
    }
    fn sample_answer(&self, model: &T5Model, prompt: &str, max_new_tokens: usize) -> Result<String, TrainError> {
        let tokenizer = Family::tokenizer(self)?;
        let mut ids = tokenizer.encode(prompt, false)?;
        ids.push(self.config.eos_token_id);
        let c = &self.config;
        let (tokens, _) = t5::generate::generate_greedy(
            &model.valid(),
            &ids,
            c.decoder_start_token_id,
            max_new_tokens,
            &[c.eos_token_id],
            true,
        )?;
        Ok(tokenizer.decode(&tokens, true)?.trim().to_string())
    }
}
