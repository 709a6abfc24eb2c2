//! Dropout whose mask is a function of a seed, so the backward regenerates it instead of storing it.
//!
//! `y = x ⊙ m`, `m ∈ {0, 1/keep}` drawn from a counter-based generator (SplitMix64 over chunks of 2^16
//! elements, the same mask for any thread count). The derivative is the same product, `dx = dy ⊙ m`, so
//! the backward is this op again with the same seed: nothing of the size of x lives between the forward
//! and the backward (burn's `Dropout` keeps its f32 mask — 20 MiB per decoder layer of SmolLM2 at 1,024
//! tokens — and draws it with ChaCha one f64 at a time). Same distribution as PEFT's dropout: each element
//! is kept with probability `keep` (to 2^-32) and scaled by `1/keep`.

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::{
    Backend, Dispatch, Flex, FloatDType, TensorMetadata, backend_extension, tensor::FloatTensor,
};
use burn::tensor::{Distribution, Tensor, TensorData};
use rayon::prelude::*;

const CHUNK: usize = 1 << 16;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The mask for `numel` elements: `scale` where kept, 0 where dropped, written by `write(kept, slot)`.
fn fill_mask<T: Copy + Send + Sync>(
    numel: usize,
    seed: u64,
    keep: f64,
    kept: T,
    dropped: T,
) -> Vec<T> {
    let threshold = (keep * 4_294_967_296.0).round().min(4_294_967_296.0) as u64;
    let mut mask = vec![dropped; numel];
    mask.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(chunk, out)| {
            let mut state = seed ^ (chunk as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
            splitmix(&mut state);
            for pair in out.chunks_mut(2) {
                let bits = splitmix(&mut state);
                for (i, slot) in pair.iter_mut().enumerate() {
                    if (bits >> (32 * i)) & 0xFFFF_FFFF < threshold {
                        *slot = kept;
                    }
                }
            }
        });
    mask
}

/// `x ⊙ m` with plain backend ops: the mask is made on the host in x's dtype and multiplied in.
pub fn apply_mask<B: Backend>(x: FloatTensor<B>, seed: u64, keep: f64) -> FloatTensor<B> {
    let shape = x.shape();
    let numel = shape.num_elements();
    let scale = 1.0 / keep;
    let dtype: FloatDType = x.dtype().into();
    let data = match dtype {
        FloatDType::BF16 => TensorData::new(
            fill_mask(
                numel,
                seed,
                keep,
                half::bf16::from_f64(scale),
                half::bf16::ZERO,
            ),
            shape,
        ),
        FloatDType::F16 => TensorData::new(
            fill_mask(
                numel,
                seed,
                keep,
                half::f16::from_f64(scale),
                half::f16::ZERO,
            ),
            shape,
        ),
        FloatDType::F64 => TensorData::new(fill_mask(numel, seed, keep, scale, 0.0f64), shape),
        _ => TensorData::new(fill_mask(numel, seed, keep, scale as f32, 0.0f32), shape),
    };
    let mask = B::float_from_data(data, &x.device());
    B::float_mul(x, mask)
}

/// The extension: `Flex` multiplies in a host-made mask, `Autodiff` routes the backward through the
/// same op with the same seed.
#[backend_extension(Flex, Cube: cfg(feature = "cube"), Autodiff)]
pub trait SeededDropoutBackend: Backend {
    /// `x ⊙ m(seed, keep)`, any shape, in x's dtype.
    fn seeded_dropout(x: FloatTensor<Self>, seed: u64, keep: f64) -> FloatTensor<Self>;
}

impl SeededDropoutBackend for Flex {
    fn seeded_dropout(x: FloatTensor<Self>, seed: u64, keep: f64) -> FloatTensor<Self> {
        apply_mask::<Self>(x, seed, keep)
    }
}

impl<B: Backend + SeededDropoutBackend, C: CheckpointStrategy> SeededDropoutBackend
    for Autodiff<B, C>
{
    fn seeded_dropout(x: FloatTensor<Self>, seed: u64, keep: f64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SeededDropoutBackward;

        impl<B: Backend + SeededDropoutBackend> Backward<B, 1> for SeededDropoutBackward {
            /// The seed and the keep probability: the mask is made again.
            type State = (u64, f64);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_x] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (seed, keep) = ops.state;
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, B::seeded_dropout(grad, seed, keep));
                }
            }
        }

        let (x, x_node) = x.into_parts();
        match SeededDropoutBackward
            .prepare::<C>([x_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((seed, keep), B::seeded_dropout(x, seed, keep)),
            OpsKind::UnTracked(prep) => prep.finish(B::seeded_dropout(x, seed, keep)),
        }
    }
}

/// Dropout with probability `prob` and a mask drawn from `seed` (`prob` 0: x unchanged).
pub fn seeded_dropout<const D: usize>(x: Tensor<D>, prob: f64, seed: u64) -> Tensor<D> {
    if prob <= 0.0 {
        return x;
    }
    Tensor::from_dispatch(<Dispatch as SeededDropoutBackend>::seeded_dropout(
        x.into_dispatch(),
        seed,
        1.0 - prob,
    ))
}

/// A fresh seed from the device's generator (what `device.seed(..)` makes reproducible).
pub fn draw_seed(device: &burn::tensor::Device) -> u64 {
    let draws: Vec<f32> = Tensor::<1>::random([4], Distribution::Default, device)
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap_or_default();
    draws.iter().fold(0u64, |acc, v| {
        (acc << 16) ^ ((v * 65_536.0) as u64 & 0xFFFF)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    /// The mask keeps about `keep` of the elements, scaled by `1/keep`; it depends on the seed only; the
    /// gradient is the same mask; bf16 masks drop the same elements.
    #[test]
    fn seeded_masks_are_bernoulli_reproducible_and_their_own_gradient() {
        let keep = 0.9;
        let n = 300_001;
        let mask = fill_mask(n, 42, keep, 1.0f32 / keep as f32, 0.0);
        let kept = mask.iter().filter(|&&m| m != 0.0).count() as f64 / n as f64;
        assert!((kept - keep).abs() < 0.003, "kept {kept}");
        assert_eq!(mask, fill_mask(n, 42, keep, 1.0f32 / keep as f32, 0.0));
        assert_ne!(mask, fill_mask(n, 43, keep, 1.0f32 / keep as f32, 0.0));
        let bf: Vec<half::bf16> = fill_mask(n, 42, keep, half::bf16::ONE, half::bf16::ZERO);
        assert!(
            bf.iter()
                .zip(&mask)
                .all(|(b, m)| (b.to_f32() != 0.0) == (*m != 0.0))
        );
        // Neighbouring chunks are not copies of each other.
        assert_ne!(mask[..CHUNK], mask[CHUNK..2 * CHUNK]);

        let device = Device::flex().autodiff();
        let x = Tensor::<2>::ones([37, 70], &device).require_grad();
        let y = seeded_dropout(x.clone(), 1.0 - keep, 7);
        let dx = x.grad(&(y.clone() * 3.0).sum().backward()).unwrap();
        let (y, dx): (Vec<f32>, Vec<f32>) = (
            y.into_data().try_into_vec().unwrap(),
            dx.into_data().try_into_vec().unwrap(),
        );
        assert!(
            y.iter().zip(&dx).all(|(a, g)| (a * 3.0 - g).abs() < 1e-6),
            "dx = 3 · mask"
        );
        assert!(
            y.iter()
                .all(|&v| v == 0.0 || (v - 1.0 / keep as f32).abs() < 1e-6)
        );
    }
}
