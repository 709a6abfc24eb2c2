//! The bridge to burn modules: read a module's trainable tensors and their gradients by module path, and write
//! updated values back with the parameters' autodiff settings intact.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Gradients, Tensor, TensorData};

use crate::OptimError;

/// A trainable tensor, flattened to host f32, under its module path (e.g. `layers.0.attn.q_proj.adapter.lora_a`).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

fn host_values<const D: usize>(path: &str, tensor: Tensor<D>) -> Result<HostTensor, OptimError> {
    let shape = tensor.shape().dims::<D>().to_vec();
    let values = tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| OptimError::Param { key: path.to_string(), reason: format!("cannot read as f32: {e:?}") })?;
    Ok(HostTensor { shape, values })
}

struct Collector<'a> {
    path: Vec<String>,
    grads: Option<&'a Gradients>,
    out: BTreeMap<String, HostTensor>,
    error: Option<OptimError>,
}

impl ModuleVisitor for Collector<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.error.is_some() {
            return;
        }
        let key = self.path.join(".");
        let value = param.val();
        let tensor = match self.grads {
            None if value.is_require_grad() => Some(value),
            None => None,
            Some(grads) => value.grad(grads),
        };
        if let Some(tensor) = tensor {
            match host_values(&key, tensor) {
                Ok(host) => {
                    self.out.insert(key, host);
                }
                Err(e) => self.error = Some(e),
            }
        }
    }
}

/// Every trainable (require-grad) float parameter of `module`, by module path.
pub fn trainable_tensors<M: Module>(module: &M) -> Result<BTreeMap<String, HostTensor>, OptimError> {
    let mut c = Collector { path: Vec::new(), grads: None, out: BTreeMap::new(), error: None };
    module.visit(&mut c);
    c.error.map_or(Ok(c.out), Err)
}

/// The gradient of every parameter of `module` that has one in `grads`, by module path.
pub fn gradients_of<M: Module>(module: &M, grads: &Gradients) -> Result<BTreeMap<String, HostTensor>, OptimError> {
    let mut c = Collector { path: Vec::new(), grads: Some(grads), out: BTreeMap::new(), error: None };
    module.visit(&mut c);
    c.error.map_or(Ok(c.out), Err)
}

struct Writer<'a> {
    path: Vec<String>,
    values: &'a BTreeMap<String, HostTensor>,
    written: usize,
}

impl ModuleMapper for Writer<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(new) = self.values.get(&self.path.join(".")) else { return param };
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let strategy = tensor.gradient_checkpointing_strategy();
        let data = TensorData::new(new.values.clone(), new.shape.clone()).convert_dtype(tensor.dtype());
        let updated = match strategy {
            Some(strategy) => {
                let inner_device = tensor.inner().device();
                let mut t = Tensor::from_inner(Tensor::<D>::from_data(data, &inner_device))
                    .with_gradient_checkpointing_strategy(strategy);
                if require_grad {
                    t = t.require_grad();
                }
                t
            }
            None => Tensor::<D>::from_data(data, &tensor.device()),
        };
        self.written += 1;
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// Writes `values` (by module path) into `module`'s parameters. Every key must name a parameter of matching
/// shape; the module is returned unchanged with an error otherwise.
pub fn write_tensors<M: Module>(module: M, values: &BTreeMap<String, HostTensor>) -> Result<M, OptimError> {
    let current = trainable_tensors(&module)?;
    for (key, value) in values {
        match current.get(key) {
            None => {
                return Err(OptimError::Param {
                    key: key.clone(),
                    reason: "is not a trainable parameter of the module".into(),
                });
            }
            Some(cur) if cur.shape != value.shape || value.values.len() != cur.values.len() => {
                return Err(OptimError::Param {
                    key: key.clone(),
                    reason: format!("shape {:?} does not match the module's {:?}", value.shape, cur.shape),
                });
            }
            Some(_) => {}
        }
    }
    let mut writer = Writer { path: Vec::new(), values, written: 0 };
    let module = module.map(&mut writer);
    debug_assert_eq!(writer.written, values.len());
    Ok(module)
}
