//! The optimizer on the training device: gradients, their sum over micro-batches, the global norm and clipping,
//! and the AdamW update all stay where the model is (flex, wgpu, CUDA); per step only scalars come back.
//!
//! [`TensorPages`] is the [`PageDevice`] of a burn device: resident pages are tensors there and the update is
//! `ops::adamw` (the host rules on flex, bit for bit; the fused CubeCL kernels on wgpu/CUDA). Pages still live in
//! host memory and page in through the device budget as the [`Pager`](crate::Pager) decides. Every value the step
//! reads back goes through [`read_scalars`], which counts the bytes ([`readback_bytes`]), so a test can check that
//! no parameter or gradient makes the round trip.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ops::Range;

use adamw_rules::update::AdamHyper;
use adamw_rules::{PageDevice, PageState, ParamValues, UpdateRule};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{DType, Device, Gradients, Tensor};
use ops::adamw::{TensorState, adamw_update, l2_norm};

use crate::{OptimError, PagedAdamW, ParamGrad, StepReport, clip};

/// A parameter's (or gradient's) values as one flat f32 tensor on the training device.
#[derive(Debug, Clone)]
pub struct FlatTensor(pub Tensor<1>);

impl ParamValues for FlatTensor {
    fn numel(&self) -> usize {
        self.0.shape().num_elements()
    }
}

impl FlatTensor {
    /// `t` flattened and cast to f32 (no autodiff: the inner tensor).
    pub fn of<const D: usize>(t: Tensor<D>) -> Self {
        let n = t.shape().num_elements();
        FlatTensor(t.inner().cast(DType::F32).reshape([n]))
    }
}

thread_local! {
    static READBACK_BYTES: Cell<u64> = const { Cell::new(0) };
}

/// Reads a tensor back to the host as f64 values, counting its bytes in [`readback_bytes`].
pub fn read_scalars(t: Tensor<1>) -> Vec<f64> {
    let data = t.into_data();
    count_readback(data.as_bytes().len());
    data.convert::<f64>().try_into_vec::<f64>().expect("float values")
}

/// Counts `bytes` read back from the device by this thread (for reads that do not go through
/// [`read_scalars`], such as a host all-reduce).
pub fn count_readback(bytes: usize) {
    READBACK_BYTES.with(|c| c.set(c.get() + bytes as u64));
}

/// Bytes this thread read back through [`read_scalars`] / [`count_readback`] so far (the trainer logs the
/// difference per step; per thread, so data-parallel ranks count their own).
pub fn readback_bytes() -> u64 {
    READBACK_BYTES.with(Cell::get)
}

/// A resident page: its state tensors and element count.
pub struct TensorPage {
    state: TensorState,
    elements: usize,
}

/// A burn device as the pager's page device (parameters and gradients are [`FlatTensor`]s on it).
#[derive(Debug, Clone)]
pub struct TensorPages {
    device: Device,
}

impl TensorPages {
    /// Pages on `device` (its inner device: the optimizer does not record autodiff graphs).
    pub fn new(device: &Device) -> Self {
        TensorPages { device: device.clone().inner() }
    }
}

impl PageDevice for TensorPages {
    type Page = TensorPage;
    type Values = FlatTensor;

    fn upload(&mut self, host: PageState) -> TensorPage {
        let elements = host.elements();
        TensorPage { state: TensorState::upload(host, &self.device), elements }
    }

    fn download(&mut self, page: TensorPage) -> PageState {
        page.state.download(page.elements)
    }

    fn snapshot(&self, page: &TensorPage) -> PageState {
        page.state.download(page.elements)
    }

    fn update(
        &mut self,
        page: &mut TensorPage,
        rule: UpdateRule,
        param: &mut FlatTensor,
        grad: &FlatTensor,
        range: Range<usize>,
        hyper: &AdamHyper,
    ) {
        if range == (0..param.numel()) {
            param.0 = adamw_update(param.0.clone(), grad.0.clone(), &mut page.state, rule, hyper);
        } else {
            let slice = [range.clone()];
            let updated = adamw_update(
                param.0.clone().slice(slice.clone()),
                grad.0.clone().slice(slice.clone()),
                &mut page.state,
                rule,
                hyper,
            );
            param.0 = param.0.clone().slice_assign(slice, updated);
        }
    }
}

struct Collector<'a> {
    path: Vec<String>,
    grads: Option<&'a Gradients>,
    out: BTreeMap<String, FlatTensor>,
}

impl ModuleVisitor for Collector<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let tensor = match self.grads {
            None if value.is_require_grad() => Some(value),
            None => None,
            Some(grads) => value.grad(grads),
        };
        if let Some(tensor) = tensor {
            self.out.insert(self.path.join("."), FlatTensor::of(tensor));
        }
    }
}

/// Every trainable (require-grad) float parameter of `module` by module path, as flat f32 tensors on its device.
pub fn trainable_on_device<M: Module>(module: &M) -> BTreeMap<String, FlatTensor> {
    let mut c = Collector { path: Vec::new(), grads: None, out: BTreeMap::new() };
    module.visit(&mut c);
    c.out
}

/// The gradient of every parameter of `module` that has one in `grads`, by module path, on the device.
pub fn gradients_on_device<M: Module>(module: &M, grads: &Gradients) -> BTreeMap<String, FlatTensor> {
    let mut c = Collector { path: Vec::new(), grads: Some(grads), out: BTreeMap::new() };
    module.visit(&mut c);
    c.out
}

/// Adds `grads` into the running sum `sum` (the sum over micro-batches), on the device.
pub fn accumulate(sum: &mut BTreeMap<String, FlatTensor>, grads: BTreeMap<String, FlatTensor>) {
    for (key, g) in grads {
        match sum.get_mut(&key) {
            Some(a) => a.0 = a.0.clone().add(g.0),
            None => {
                sum.insert(key, g);
            }
        }
    }
}

struct Writer<'a> {
    path: Vec<String>,
    values: &'a BTreeMap<String, FlatTensor>,
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
        let dims = tensor.shape().dims::<D>();
        let value = new.0.clone().reshape(dims).cast(tensor.dtype());
        let updated = match tensor.gradient_checkpointing_strategy() {
            Some(strategy) => {
                let t = Tensor::from_inner(value).with_gradient_checkpointing_strategy(strategy);
                if require_grad { t.require_grad() } else { t }
            }
            None => value,
        };
        self.written += 1;
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// Writes `values` (by module path) into `module`'s trainable parameters, keeping their dtype, autodiff and
/// checkpointing settings. Every key must name a trainable parameter with as many elements.
pub fn write_on_device<M: Module>(module: M, values: &BTreeMap<String, FlatTensor>) -> Result<M, OptimError> {
    let current = trainable_on_device(&module);
    for (key, value) in values {
        match current.get(key) {
            None => {
                return Err(OptimError::Param {
                    key: key.clone(),
                    reason: "is not a trainable parameter of the module".into(),
                });
            }
            Some(cur) if cur.numel() != value.numel() => {
                return Err(OptimError::Param {
                    key: key.clone(),
                    reason: format!("{} values do not fit the module's {}", value.numel(), cur.numel()),
                });
            }
            Some(_) => {}
        }
    }
    Ok(write_trusted(module, values))
}

/// Writes values taken from `module`'s own parameters (keys and sizes known to fit) without reading every
/// parameter again to check them.
fn write_trusted<M: Module>(module: M, values: &BTreeMap<String, FlatTensor>) -> M {
    let mut writer = Writer { path: Vec::new(), values, written: 0 };
    let module = module.map(&mut writer);
    debug_assert_eq!(writer.written, values.len());
    module
}

impl PagedAdamW<TensorPages> {
    /// One step on a burn module with everything on its device: the global norm of `grads` (one scalar read
    /// back), clipping to `max_grad_norm`, the paged AdamW update of every parameter with a gradient, and the
    /// updated module. A non-finite norm stops before anything is changed.
    pub fn step_module_on_device<M: Module>(
        &mut self,
        module: &M,
        mut grads: BTreeMap<String, FlatTensor>,
        lr: f64,
        max_grad_norm: Option<f32>,
    ) -> Result<(M, StepReport), OptimError> {
        let mut params = trainable_on_device(module);
        if let Some(unknown) = grads.keys().find(|k| !params.contains_key(*k)) {
            return Err(OptimError::Param {
                key: unknown.clone(),
                reason: "has a gradient but is not a trainable parameter".into(),
            });
        }
        let norm = global_norm(&grads)?;
        if let Some(max) = max_grad_norm {
            let coef = clip::clip_coefficient(norm, max);
            for g in grads.values_mut() {
                g.0 = g.0.clone().mul_scalar(coef);
            }
        }
        let mut updates: Vec<ParamGrad<'_, FlatTensor>> = Vec::with_capacity(grads.len());
        for (key, param) in params.iter_mut() {
            if let Some(grad) = grads.get(key) {
                updates.push(ParamGrad { key, param, grad });
            }
        }
        let pager = self.step(lr, &mut updates)?;
        drop(updates);
        params.retain(|k, _| grads.contains_key(k));
        // `params` came from this module a moment ago: no need to read its parameters again to check them.
        let module = write_trusted(module.clone(), &params);
        Ok((module, StepReport { grad_norm: norm, lr, pager }))
    }
}

/// The global L2 norm of `grads` (torch's: the norm of the per-tensor norms), one scalar read back; a
/// non-finite norm names the first gradient that is not finite.
fn global_norm(grads: &BTreeMap<String, FlatTensor>) -> Result<f32, OptimError> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let norms = Tensor::cat(grads.values().map(|g| l2_norm(g.0.clone())).collect(), 0);
    let norm = read_scalars(l2_norm(norms.clone()))[0] as f32;
    if norm.is_finite() {
        return Ok(norm);
    }
    let per_tensor = read_scalars(norms);
    let key = grads.keys().zip(per_tensor).find(|(_, n)| !n.is_finite()).map(|(k, _)| k.clone()).unwrap_or_default();
    Err(OptimError::NonFiniteGradient { key, norm })
}
