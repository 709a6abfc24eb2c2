//! LoRA on a whole model, for any model family: each family lists its linear layers under their Hugging
//! Face module names (`model.layers.0.self_attn.q_proj`, `encoder.block.0.layer.0.SelfAttention.q`), and
//! these functions attach fresh adapters per a [`LoraConfig`], load a PEFT adapter directory onto them, or
//! write theirs as one.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{DType, Device, Tensor};

use crate::peft::{PeftAdapter, StoredAdapter, TaskType, read_peft_adapter, write_peft_adapter};
use crate::side::SideAdapter;
use crate::{LoraAdapter, LoraConfig, LoraError, LoraLinear};

/// Attaches fresh adapters to the targeted layers of `linears` (the output layer is never among them).
/// Returns how many; an error when the targets match no layer or the rank does not fit a layer.
pub fn add_lora(
    linears: Vec<(String, &mut LoraLinear)>,
    config: &LoraConfig,
    device: &Device,
) -> Result<usize, LoraError> {
    let mut count = 0;
    for (name, linear) in linears {
        if config.target_modules.matches(&name, false)? {
            linear.adapter = Some(config.init_adapter(&name, linear.in_features(), linear.out_features(), device)?);
            count += 1;
        }
    }
    if count == 0 {
        return Err(LoraError::Config(format!(
            "target_modules {:?} match no linear layer of the model",
            config.target_modules
        )));
    }
    Ok(count)
}

/// The adapter of `module` for `linear` from its stored PEFT tensors, after checking the shapes.
fn checked_adapter(
    adapter: &PeftAdapter,
    module: &str,
    stored: &StoredAdapter,
    linear: &LoraLinear,
    dir: &Path,
    device: &Device,
) -> Result<LoraAdapter, LoraError> {
    let (r, a_in) = (stored.a.1[0], stored.a.1[1]);
    let (b_out, b_r) = (stored.b.1[0], stored.b.1[1]);
    if a_in != linear.in_features() || b_out != linear.out_features() || r != b_r {
        return Err(LoraError::Adapter(format!(
            "{}: `{module}` has lora_A {:?} and lora_B {:?}, but the layer is {} in, {} out",
            dir.display(),
            stored.a.1,
            stored.b.1,
            linear.in_features(),
            linear.out_features()
        )));
    }
    let scaling = adapter.config.scaling();
    Ok(LoraAdapter::from_values(stored.a.clone(), stored.b.clone(), scaling, adapter.config.dropout, device))
}

fn not_a_layer(dir: &Path, module: &str) -> LoraError {
    LoraError::Adapter(format!("{}: module `{module}` is not a linear layer of this model", dir.display()))
}

/// Loads a PEFT adapter directory onto `linears`; every module in it must be one of them, with matching
/// shapes.
pub fn load_peft_adapter(
    linears: Vec<(String, &mut LoraLinear)>,
    dir: &Path,
    device: &Device,
) -> Result<PeftAdapter, LoraError> {
    let adapter = read_peft_adapter(dir)?;
    let mut linears: BTreeMap<String, &mut LoraLinear> = linears.into_iter().collect();
    for (module, stored) in &adapter.modules {
        let linear = linears.get_mut(module).ok_or_else(|| not_a_layer(dir, module))?;
        linear.adapter = Some(checked_adapter(&adapter, module, stored, linear, dir, device)?);
    }
    Ok(adapter)
}

/// Reads a PEFT adapter directory for `linears` without attaching it: a [`SideAdapter`] in their order.
/// Every module in it must be one of them, with matching shapes.
pub fn read_side_adapter(
    linears: Vec<(String, &LoraLinear)>,
    dir: &Path,
    device: &Device,
) -> Result<(PeftAdapter, SideAdapter), LoraError> {
    let adapter = read_peft_adapter(dir)?;
    let index: BTreeMap<&str, usize> = linears.iter().enumerate().map(|(i, (name, _))| (name.as_str(), i)).collect();
    let mut modules: Vec<Option<LoraAdapter>> = (0..linears.len()).map(|_| None).collect();
    for (module, stored) in &adapter.modules {
        let &i = index.get(module.as_str()).ok_or_else(|| not_a_layer(dir, module))?;
        modules[i] = Some(checked_adapter(&adapter, module, stored, linears[i].1, dir, device)?);
    }
    Ok((adapter, SideAdapter { modules }))
}

/// Writes the adapters of `linears` as a PEFT adapter directory of `task_type`. Returns how many modules.
pub fn save_peft_adapter(
    linears: Vec<(String, &LoraLinear)>,
    dir: &Path,
    config: &LoraConfig,
    base_model_name_or_path: Option<&str>,
    task_type: TaskType,
) -> Result<usize, LoraError> {
    let values = |t: Tensor<2>| -> (Vec<f32>, [usize; 2]) {
        let dims = t.dims();
        (t.cast(DType::F32).into_data().try_into_vec::<f32>().expect("f32"), dims)
    };
    let mut modules = BTreeMap::new();
    for (name, linear) in linears {
        if let Some(adapter) = &linear.adapter {
            modules.insert(name, StoredAdapter { a: values(adapter.lora_a.val()), b: values(adapter.lora_b.val()) });
        }
    }
    if modules.is_empty() {
        return Err(LoraError::Adapter("the model has no adapters to save".into()));
    }
    let count = modules.len();
    write_peft_adapter(dir, config, base_model_name_or_path, &modules, task_type)?;
    Ok(count)
}
