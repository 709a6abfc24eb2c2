//! The dtype policy of the ops, in one place.
//!
//! Models compute in f32, bf16 or f16 (`qlora generate --dtype`). The flex host kernels (RMSNorm, SwiGLU,
//! the attention's softmax, the chunked loss, dropout, the AVX512-BF16 products) read and write f32 and
//! bf16 only: they are where the CPU's training time goes, and both are QLoRA's compute dtypes. Every other
//! float dtype (f16, f64) takes the op's reference formula in backend ops on flex — the same formula the
//! CubeCL backend runs — so each op answers in every dtype burn has, and none panics on one it lacks.

use burn::backend::flex::FlexTensor;
use burn::tensor::DType;

/// A dtype the flex host kernels compute in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostDtype {
    F32,
    Bf16,
}

impl HostDtype {
    /// `Some` for f32 and bf16, `None` for the dtypes that take the reference formula.
    pub fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(HostDtype::F32),
            DType::BF16 => Some(HostDtype::Bf16),
            _ => None,
        }
    }

    /// The host dtype of a flex tensor, if it has one.
    pub fn of_tensor(t: &FlexTensor) -> Option<Self> {
        Self::of(t.dtype())
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Device, Int, Tensor, TensorData};

    use crate::test_util::{values, worst};

    /// f16 (no host kernel) goes through each op's reference formula on flex, forward and backward, and
    /// gives the f32 op's values to f16 precision: it used to panic (`fused ops run in f32 or bf16`).
    #[test]
    fn f16_takes_the_reference_formulas_on_flex() {
        let device = Device::flex().autodiff();
        let tol = 1e-2f32;
        let run = |dtype: DType| {
            let x: Vec<f32> = (0..5 * 24).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
            let x = Tensor::<2>::from_data(TensorData::new(x, [5, 24]), &device).cast(dtype).require_grad();
            let w = Tensor::<1>::ones([24], &device).cast(dtype);
            let normed = crate::fused::rms_norm(x.clone(), w, 1e-5);
            let act = crate::fused::swiglu(normed.clone(), normed);
            let q = act.clone().reshape([1, 2, 5, 12]);
            let kv = act.reshape([1, 2, 5, 12]);
            let att = crate::attention::causal_attention(q, kv.clone(), kv, 0.3).reshape([5, 24]);
            let w: Vec<f32> = (0..24 * 7).map(|i| (i as f32 * 0.71).cos() * 0.3).collect();
            let w_t = Tensor::<2>::from_data(TensorData::new(w, [24, 7]), &device).cast(dtype);
            let labels = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 3, 6, 1, 2], [5]), &device);
            let mask = Tensor::<1>::ones([5], &device);
            let loss = crate::loss::chunked_nll_sum(att, w_t, labels, mask, 2);
            let grads = loss.clone().backward();
            (values(loss), values(x.grad(&grads).expect("dx").cast(DType::F32)))
        };
        let (loss16, dx16) = run(DType::F16);
        let (loss32, dx32) = run(DType::F32);
        assert!(worst(&loss16, &loss32) < tol, "loss {loss16:?} vs {loss32:?}");
        assert!(
            worst(&dx16, &dx32) < tol * 10.0,
            "dx off by {}: {:?} vs {:?}",
            worst(&dx16, &dx32),
            &dx16[..8],
            &dx32[..8]
        );
    }
}
