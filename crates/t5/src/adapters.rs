//! LoRA on the model: its linear layers under transformers' module names (what PEFT names a T5 adapter's
//! tensors by, `base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight`); attaching fresh
//! adapters and reading / writing PEFT `SEQ_2_SEQ_LM` adapter directories go through `lora::attach`.

use std::path::Path;

use burn::tensor::Device;
use lora::peft::{PeftAdapter, TaskType};
use lora::{LoraConfig, LoraError, LoraLinear, attach};

use crate::T5Model;
use crate::model::{Attention, FeedForward};

fn attention<'a>(prefix: String, a: &'a Attention, out: &mut Vec<(String, &'a LoraLinear)>) {
    for (name, l) in [("q", &a.q), ("k", &a.k), ("v", &a.v), ("o", &a.o)] {
        out.push((format!("{prefix}.{name}"), l));
    }
}

fn attention_mut<'a>(prefix: String, a: &'a mut Attention, out: &mut Vec<(String, &'a mut LoraLinear)>) {
    for (name, l) in [("q", &mut a.q), ("k", &mut a.k), ("v", &mut a.v), ("o", &mut a.o)] {
        out.push((format!("{prefix}.{name}"), l));
    }
}

fn ff<'a>(prefix: String, f: &'a FeedForward, out: &mut Vec<(String, &'a LoraLinear)>) {
    match &f.wi_1 {
        Some(wi_1) => {
            out.push((format!("{prefix}.wi_0"), &f.wi_0));
            out.push((format!("{prefix}.wi_1"), wi_1));
        }
        None => out.push((format!("{prefix}.wi"), &f.wi_0)),
    }
    out.push((format!("{prefix}.wo"), &f.wo));
}

fn ff_mut<'a>(prefix: String, f: &'a mut FeedForward, out: &mut Vec<(String, &'a mut LoraLinear)>) {
    match &mut f.wi_1 {
        Some(wi_1) => {
            out.push((format!("{prefix}.wi_0"), &mut f.wi_0));
            out.push((format!("{prefix}.wi_1"), wi_1));
        }
        None => out.push((format!("{prefix}.wi"), &mut f.wi_0)),
    }
    out.push((format!("{prefix}.wo"), &mut f.wo));
}

impl T5Model {
    /// Every linear layer of both stacks with its HF module name (`encoder.block.0.layer.0.SelfAttention.q`,
    /// `decoder.block.1.layer.1.EncDecAttention.v`, `decoder.block.1.layer.2.DenseReluDense.wi_0`, ...); not
    /// lm_head.
    pub fn linears(&self) -> Vec<(String, &LoraLinear)> {
        let mut out = Vec::new();
        for (i, layer) in self.encoder.iter().enumerate() {
            attention(format!("encoder.block.{i}.layer.0.SelfAttention"), &layer.self_attention, &mut out);
            ff(format!("encoder.block.{i}.layer.1.DenseReluDense"), &layer.ff, &mut out);
        }
        for (i, layer) in self.decoder.iter().enumerate() {
            attention(format!("decoder.block.{i}.layer.0.SelfAttention"), &layer.self_attention, &mut out);
            attention(format!("decoder.block.{i}.layer.1.EncDecAttention"), &layer.cross_attention, &mut out);
            ff(format!("decoder.block.{i}.layer.2.DenseReluDense"), &layer.ff, &mut out);
        }
        out
    }

    /// [`linears`](Self::linears), mutably.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut LoraLinear)> {
        let mut out = Vec::new();
        for (i, layer) in self.encoder.iter_mut().enumerate() {
            attention_mut(format!("encoder.block.{i}.layer.0.SelfAttention"), &mut layer.self_attention, &mut out);
            ff_mut(format!("encoder.block.{i}.layer.1.DenseReluDense"), &mut layer.ff, &mut out);
        }
        for (i, layer) in self.decoder.iter_mut().enumerate() {
            attention_mut(format!("decoder.block.{i}.layer.0.SelfAttention"), &mut layer.self_attention, &mut out);
            attention_mut(format!("decoder.block.{i}.layer.1.EncDecAttention"), &mut layer.cross_attention, &mut out);
            ff_mut(format!("decoder.block.{i}.layer.2.DenseReluDense"), &mut layer.ff, &mut out);
        }
        out
    }

    /// Attaches fresh adapters to the targeted layers (lm_head never). Returns how many.
    pub fn add_lora(&mut self, config: &LoraConfig, device: &Device) -> Result<usize, LoraError> {
        attach::add_lora(self.linears_mut(), config, device)
    }

    /// Loads a PEFT adapter directory onto the model; every module in it must exist with matching shapes.
    pub fn load_peft_adapter(&mut self, dir: &Path) -> Result<PeftAdapter, LoraError> {
        let device = self.device();
        attach::load_peft_adapter(self.linears_mut(), dir, &device)
    }

    /// Writes the model's adapters as a PEFT adapter directory (`task_type` `SEQ_2_SEQ_LM`).
    pub fn save_peft_adapter(
        &self,
        dir: &Path,
        config: &LoraConfig,
        base_model_name_or_path: Option<&str>,
    ) -> Result<usize, LoraError> {
        attach::save_peft_adapter(self.linears(), dir, config, base_model_name_or_path, TaskType::Seq2SeqLm)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Int, Tensor, TensorData};
    use lora::TargetModules;

    use crate::config::tiny_test_config;

    /// Names follow transformers' modules; an adapter written and read back gives the same logits, and its
    /// config says SEQ_2_SEQ_LM.
    #[test]
    fn adapters_round_trip_through_peft_files() {
        let device = Device::flex();
        let config = tiny_test_config();
        let mut model = config.init(&device);
        let names: Vec<String> = model.linears().into_iter().map(|(n, _)| n).collect();
        // 2 encoder blocks × (4 + 3), 3 decoder blocks × (4 + 4 + 3).
        assert_eq!(names.len(), 2 * 7 + 3 * 11);
        assert!(names.contains(&"decoder.block.2.layer.1.EncDecAttention.o".to_string()));
        assert!(names.contains(&"encoder.block.1.layer.1.DenseReluDense.wi_1".to_string()));
        let lora = lora::LoraConfig::new().with_r(2).with_dropout(0.0);
        assert_eq!(model.add_lora(&lora, &device).unwrap(), names.len());
        // B starts at zero: give it values so the adapter changes the output.
        for (_, linear) in model.linears_mut() {
            let adapter = linear.adapter.as_mut().unwrap();
            let [o, r] = adapter.lora_b.dims();
            adapter.lora_b = burn::module::Param::from_tensor(Tensor::random(
                [o, r],
                burn::tensor::Distribution::Normal(0.0, 0.5),
                &device,
            ));
        }
        let dir = tempfile::tempdir().unwrap();
        model.save_peft_adapter(dir.path(), &lora, Some("tiny")).unwrap();
        let text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
        assert!(text.contains("SEQ_2_SEQ_LM"), "{text}");

        let enc = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 3], [1, 4]), &device);
        let dec = Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 5, 9], [1, 3]), &device);
        let ours: Vec<f32> = model.forward(enc.clone(), dec.clone()).into_data().try_into_vec().unwrap();
        let mut fresh = config.init(&device);
        // Same frozen weights: copy them over by rebuilding from the first model's bases.
        for ((_, to), (_, from)) in fresh.linears_mut().into_iter().zip(model.linears()) {
            to.base = from.base.clone();
        }
        fresh.shared = model.shared.clone();
        fresh.lm_head = model.lm_head.clone();
        fresh.encoder[0].self_attention.relative_attention_bias =
            model.encoder[0].self_attention.relative_attention_bias.clone();
        fresh.decoder[0].self_attention.relative_attention_bias =
            model.decoder[0].self_attention.relative_attention_bias.clone();
        let before: Vec<f32> = fresh.forward(enc.clone(), dec.clone()).into_data().try_into_vec().unwrap();
        let loaded = fresh.load_peft_adapter(dir.path()).unwrap();
        assert_eq!(loaded.modules.len(), names.len());
        let after: Vec<f32> = fresh.forward(enc, dec).into_data().try_into_vec().unwrap();
        let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(diff(&before, &ours) > 1e-3, "the adapter changes the logits");
        assert!(diff(&after, &ours) < 1e-6, "{}", diff(&after, &ours));

        let only_q = lora::LoraConfig::new().with_r(2).with_target_modules(TargetModules::Names(vec!["q".into()]));
        assert_eq!(config.init(&device).add_lora(&only_q, &device).unwrap(), 2 + 2 * 3);
    }
}
