//! LoRA on the model: which linear layers there are (by their Hugging Face module names); attaching fresh
//! adapters per a [`LoraConfig`] and reading / writing PEFT adapter directories go through `lora::attach`.

use std::path::Path;

use burn::tensor::Device;
use lora::peft::{PeftAdapter, TaskType};
use lora::{LoraConfig, LoraError, LoraLinear, SideAdapter, attach};

use crate::LlamaModel;

const ATTENTION: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
const MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

impl LlamaModel {
    /// Every decoder linear layer with its HF module name (`model.layers.N.self_attn.q_proj`, ...).
    pub fn linears(&self) -> Vec<(String, &LoraLinear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let a = &layer.self_attn;
            for (name, l) in ATTENTION.iter().zip([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]) {
                out.push((format!("model.layers.{i}.self_attn.{name}"), l));
            }
            let m = &layer.mlp;
            for (name, l) in MLP.iter().zip([&m.gate_proj, &m.up_proj, &m.down_proj]) {
                out.push((format!("model.layers.{i}.mlp.{name}"), l));
            }
        }
        out
    }

    /// [`linears`](Self::linears), mutably.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut LoraLinear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let a = &mut layer.self_attn;
            for (name, l) in ATTENTION.iter().zip([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]) {
                out.push((format!("model.layers.{i}.self_attn.{name}"), l));
            }
            let m = &mut layer.mlp;
            for (name, l) in MLP.iter().zip([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]) {
                out.push((format!("model.layers.{i}.mlp.{name}"), l));
            }
        }
        out
    }

    /// Attaches fresh adapters to the targeted layers (lm_head never). Returns how many; an error when the
    /// targets match no layer or the rank does not fit a layer.
    pub fn add_lora(&mut self, config: &LoraConfig, device: &Device) -> Result<usize, LoraError> {
        attach::add_lora(self.linears_mut(), config, device)
    }

    /// Loads a PEFT adapter directory onto the model; every module in it must exist with matching shapes.
    pub fn load_peft_adapter(&mut self, dir: &Path) -> Result<PeftAdapter, LoraError> {
        let device = self.device();
        attach::load_peft_adapter(self.linears_mut(), dir, &device)
    }

    /// Reads a PEFT adapter directory for this model without attaching it (for serving several adapters on
    /// one base, [`crate::batch`]); every module in it must exist with matching shapes.
    pub fn read_side_adapter(&self, dir: &Path) -> Result<(PeftAdapter, SideAdapter), LoraError> {
        let device = self.device();
        attach::read_side_adapter(self.linears(), dir, &device)
    }

    /// Writes the model's adapters as a PEFT adapter directory (`CAUSAL_LM`).
    pub fn save_peft_adapter(
        &self,
        dir: &Path,
        config: &LoraConfig,
        base_model_name_or_path: Option<&str>,
    ) -> Result<usize, LoraError> {
        attach::save_peft_adapter(self.linears(), dir, config, base_model_name_or_path, TaskType::CausalLm)
    }
}
