//! The paged optimizer's ops on the training device: one AdamW update of one page of state (32-bit: torch's or
//! bitsandbytes' rule; 8-bit blockwise: bitsandbytes') and the L2 norm of a gradient, on the tensors where they
//! live, so a training step never copies a parameter or a gradient to the host.
//!
//! - The **reference** (the trait's default bodies, which flex uses as they are: its tensors are host memory)
//!   runs `adamw_rules`' host rules on the tensors' values, so the CPU keeps its bit-for-bit results.
//! - The **Cube arm** runs the fused `qlora-kernels` updates in place on the tensors' own buffers (parameter
//!   and state buffers copied first only when another tensor shares them), and the norm as a device reduction.
//!
//! Parameters, gradients and f32 moments are flat f32 tensors of the page's `n` elements; 8-bit codes are u32
//! tensors of `n.div_ceil(4)` words (four codes per word, little-endian, the kernels' layout), one f32 absmax
//! per 256-element block. No autodiff: the optimizer works on the parameters' inner tensors.

// The 8-bit update returns five tensors; the extension macro reads the tuple from the signature, so no alias.
#![allow(clippy::type_complexity)]

use adamw_rules::UpdateRule;
use adamw_rules::page::PageState;
use adamw_rules::update::{AdamHyper, STATE_BLOCKSIZE};
use burn::backend::{
    Backend, Dispatch, Flex, TensorMetadata, backend_extension, tensor::FloatTensor, tensor::IntTensor,
};
use burn::tensor::{DType, Int, Tensor, TensorData, read_sync};

/// The optimizer's device ops.
#[backend_extension(Flex, Cube: cfg(feature = "cube"))]
pub trait OptimizerBackend: Backend {
    /// `‖x‖₂` of an f32 tensor (any shape) as a `[1]` f32 tensor; the reference accumulates in f64 and
    /// rounds once (torch's `_foreach_norm` on the CPU).
    fn l2_norm(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let device = x.device();
        let values = host_f32::<Self>(x);
        let norm = adamw_rules::clip::tensor_norm(&values);
        Self::float_from_data(TensorData::new(vec![norm], [1]), &device)
    }

    /// One update with f32 state (`rule`: torch's AdamW or bitsandbytes' 32-bit rule): returns the new
    /// parameter, first and second moment, each `[n]` f32.
    fn adamw_f32(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        exp_avg: FloatTensor<Self>,
        exp_avg_sq: FloatTensor<Self>,
        rule: UpdateRule,
        hyper: AdamHyper,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let device = param.device();
        let n = param.shape().num_elements();
        let mut values = host_f32::<Self>(param);
        let grad = host_f32::<Self>(grad);
        let mut page = PageState::F32 { exp_avg: host_f32::<Self>(exp_avg), exp_avg_sq: host_f32::<Self>(exp_avg_sq) };
        adamw_rules::update_host_page(&mut page, rule, &mut values, &grad, &hyper);
        let PageState::F32 { exp_avg, exp_avg_sq } = page else { unreachable!("an f32 page stays f32") };
        let f32_tensor = |v: Vec<f32>| Self::float_from_data(TensorData::new(v, [n]), &device);
        (f32_tensor(values), f32_tensor(exp_avg), f32_tensor(exp_avg_sq))
    }

    /// One update of bitsandbytes' 8-bit blockwise AdamW: returns the new parameter `[n]`, codes and absmax
    /// of both moments (`[n.div_ceil(4)]` u32 words, `[n.div_ceil(256)]` f32).
    fn adamw_8bit(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        codes1: IntTensor<Self>,
        absmax1: FloatTensor<Self>,
        codes2: IntTensor<Self>,
        absmax2: FloatTensor<Self>,
        hyper: AdamHyper,
    ) -> (FloatTensor<Self>, IntTensor<Self>, FloatTensor<Self>, IntTensor<Self>, FloatTensor<Self>) {
        let device = param.device();
        let n = param.shape().num_elements();
        let mut values = host_f32::<Self>(param);
        let grad = host_f32::<Self>(grad);
        let mut page = PageState::Blockwise8 {
            codes1: words_to_bytes(&host_u32::<Self>(codes1), n),
            absmax1: host_f32::<Self>(absmax1),
            codes2: words_to_bytes(&host_u32::<Self>(codes2), n),
            absmax2: host_f32::<Self>(absmax2),
        };
        adamw_rules::update_host_page(&mut page, UpdateRule::Bnb8, &mut values, &grad, &hyper);
        let PageState::Blockwise8 { codes1, absmax1, codes2, absmax2 } = page else {
            unreachable!("an 8-bit page stays 8-bit")
        };
        let blocks = n.div_ceil(STATE_BLOCKSIZE);
        let words = |codes: Vec<u8>| {
            let data = TensorData::new(bytes_to_words(&codes), [n.div_ceil(4)]);
            Self::int_from_data(data, &device)
        };
        (
            Self::float_from_data(TensorData::new(values, [n]), &device),
            words(codes1),
            Self::float_from_data(TensorData::new(absmax1, [blocks]), &device),
            words(codes2),
            Self::float_from_data(TensorData::new(absmax2, [blocks]), &device),
        )
    }
}

/// Flex: its tensors are host memory, so the reference (the host rules) is its kernel.
impl OptimizerBackend for Flex {}

fn host_f32<B: Backend>(t: FloatTensor<B>) -> Vec<f32> {
    read_sync(B::float_into_data(t))
        .expect("readable f32 values")
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 values")
}

fn host_u32<B: Backend>(t: IntTensor<B>) -> Vec<u32> {
    read_sync(B::int_into_data(t))
        .expect("readable words")
        .convert_dtype(DType::U32)
        .try_into_vec::<u32>()
        .expect("u32")
}

/// Packs bytes four to a little-endian u32 word (the kernels' layout of 8-bit codes).
pub fn bytes_to_words(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks(4).map(|c| c.iter().enumerate().fold(0u32, |w, (i, &b)| w | (u32::from(b) << (8 * i)))).collect()
}

/// The inverse of [`bytes_to_words`], keeping `len` bytes.
pub fn words_to_bytes(words: &[u32], len: usize) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).take(len).collect()
}

/// `‖x‖₂` of a float tensor as a `[1]` f32 tensor on its device (x is read as f32).
pub fn l2_norm<const D: usize>(x: Tensor<D>) -> Tensor<1> {
    let x = x.cast(DType::F32);
    Tensor::from_dispatch(<Dispatch as OptimizerBackend>::l2_norm(x.into_dispatch()))
}

/// The state of one page on the training device.
#[derive(Debug, Clone)]
pub enum TensorState {
    F32 { exp_avg: Tensor<1>, exp_avg_sq: Tensor<1> },
    Blockwise8 { codes1: Tensor<1, Int>, absmax1: Tensor<1>, codes2: Tensor<1, Int>, absmax2: Tensor<1> },
}

impl TensorState {
    /// A host page moved to `device` (u32 words for 8-bit codes).
    pub fn upload(page: PageState, device: &burn::tensor::Device) -> Self {
        match page {
            PageState::F32 { exp_avg, exp_avg_sq } => {
                let n = exp_avg.len();
                TensorState::F32 {
                    exp_avg: Tensor::from_data(TensorData::new(exp_avg, [n]), (device, DType::F32)),
                    exp_avg_sq: Tensor::from_data(TensorData::new(exp_avg_sq, [n]), (device, DType::F32)),
                }
            }
            PageState::Blockwise8 { codes1, absmax1, codes2, absmax2 } => {
                let words = |codes: &[u8]| {
                    let words = bytes_to_words(codes);
                    let len = words.len();
                    Tensor::<1, Int>::from_data(TensorData::new(words, [len]), (device, DType::U32))
                };
                let blocks = absmax1.len();
                TensorState::Blockwise8 {
                    codes1: words(&codes1),
                    absmax1: Tensor::from_data(TensorData::new(absmax1, [blocks]), (device, DType::F32)),
                    codes2: words(&codes2),
                    absmax2: Tensor::from_data(TensorData::new(absmax2, [blocks]), (device, DType::F32)),
                }
            }
        }
    }

    /// A host copy of the page's `n` elements of state.
    pub fn download(&self, n: usize) -> PageState {
        let f32s = |t: &Tensor<1>| t.to_data().convert::<f32>().try_into_vec::<f32>().expect("f32 state");
        let bytes = |t: &Tensor<1, Int>| {
            words_to_bytes(&t.to_data().convert_dtype(DType::U32).try_into_vec::<u32>().expect("u32 codes"), n)
        };
        match self {
            TensorState::F32 { exp_avg, exp_avg_sq } => {
                PageState::F32 { exp_avg: f32s(exp_avg), exp_avg_sq: f32s(exp_avg_sq) }
            }
            TensorState::Blockwise8 { codes1, absmax1, codes2, absmax2 } => PageState::Blockwise8 {
                codes1: bytes(codes1),
                absmax1: f32s(absmax1),
                codes2: bytes(codes2),
                absmax2: f32s(absmax2),
            },
        }
    }
}

/// One AdamW update of a page on its device: `param` and `grad` are the page's `[n]` f32 elements; returns
/// the new parameter values and updates `state` in place. Panics when the rule does not fit the state's format
/// (the optimizer picks them together).
pub fn adamw_update(
    param: Tensor<1>,
    grad: Tensor<1>,
    state: &mut TensorState,
    rule: UpdateRule,
    hyper: &AdamHyper,
) -> Tensor<1> {
    let (param, grad) = (param.cast(DType::F32).into_dispatch(), grad.cast(DType::F32).into_dispatch());
    match (state, rule) {
        (TensorState::F32 { exp_avg, exp_avg_sq }, UpdateRule::TorchAdamW | UpdateRule::Bnb32) => {
            let (p, m, v) = <Dispatch as OptimizerBackend>::adamw_f32(
                param,
                grad,
                exp_avg.clone().into_dispatch(),
                exp_avg_sq.clone().into_dispatch(),
                rule,
                *hyper,
            );
            *exp_avg = Tensor::from_dispatch(m);
            *exp_avg_sq = Tensor::from_dispatch(v);
            Tensor::from_dispatch(p)
        }
        (TensorState::Blockwise8 { codes1, absmax1, codes2, absmax2 }, UpdateRule::Bnb8) => {
            let (p, c1, a1, c2, a2) = <Dispatch as OptimizerBackend>::adamw_8bit(
                param,
                grad,
                codes1.clone().into_dispatch(),
                absmax1.clone().into_dispatch(),
                codes2.clone().into_dispatch(),
                absmax2.clone().into_dispatch(),
                *hyper,
            );
            *codes1 = Tensor::from_dispatch(c1);
            *absmax1 = Tensor::from_dispatch(a1);
            *codes2 = Tensor::from_dispatch(c2);
            *absmax2 = Tensor::from_dispatch(a2);
            Tensor::from_dispatch(p)
        }
        (_, rule) => panic!("update rule {rule:?} on a page of another state format"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adamw_rules::StateFormat;
    use burn::tensor::Device;

    fn hyper(step: u64) -> AdamHyper {
        AdamHyper { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step }
    }

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (splitmix::SplitMix64::at(seed, i as u64) as f64 / u64::MAX as f64 - 0.5) as f32 * scale)
            .collect()
    }

    /// On flex the op is the host rule bit for bit, through upload, five updates and download, for every rule.
    #[test]
    fn flex_updates_are_the_host_rules_bit_for_bit() {
        let device = Device::flex();
        let n = 1000;
        for (rule, format) in [
            (UpdateRule::TorchAdamW, StateFormat::F32),
            (UpdateRule::Bnb32, StateFormat::F32),
            (UpdateRule::Bnb8, StateFormat::Blockwise8),
        ] {
            let mut host_param = values(n, 1, 2.0);
            let mut host_state = PageState::zeros(format, n);
            let mut state = TensorState::upload(PageState::zeros(format, n), &device);
            let mut param = Tensor::<1>::from_data(TensorData::new(host_param.clone(), [n]), &device);
            for step in 1..=5 {
                let grad = values(n, 10 + step, 0.2);
                adamw_rules::update_host_page(&mut host_state, rule, &mut host_param, &grad, &hyper(step));
                let grad = Tensor::<1>::from_data(TensorData::new(grad, [n]), &device);
                param = adamw_update(param, grad, &mut state, rule, &hyper(step));
            }
            let got: Vec<f32> = param.into_data().try_into_vec().unwrap();
            assert_eq!(got, host_param, "{rule:?}: parameters");
            assert_eq!(state.download(n), host_state, "{rule:?}: state");
        }
    }

    #[test]
    fn l2_norm_accumulates_in_f64() {
        let v = values(70_000, 3, 1.0);
        let t = Tensor::<1>::from_data(TensorData::new(v.clone(), [v.len()]), &Device::flex());
        let got: Vec<f32> = l2_norm(t).into_data().try_into_vec().unwrap();
        assert_eq!(got, vec![adamw_rules::clip::tensor_norm(&v)]);
    }

    #[test]
    fn code_words_round_trip() {
        let bytes: Vec<u8> = (0..=254u8).collect();
        assert_eq!(words_to_bytes(&bytes_to_words(&bytes), bytes.len()), bytes);
        assert_eq!(bytes_to_words(&[1, 2, 3, 4]), vec![0x0403_0201]);
    }
}
