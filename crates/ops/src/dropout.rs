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
use burn::backend::{Backend, Dispatch, Flex, FloatDType, TensorMetadata, backend_extension, tensor::FloatTensor};
use burn::tensor::{Distribution, Tensor, TensorData};
use rayon::prelude::*;

use crate::host_matmul::{HostFloat, host_values};

const CHUNK: usize = 1 << 16;

/// The generator state of chunk `chunk`.
fn chunk_seed(seed: u64, chunk: usize) -> u64 {
    seed ^ (chunk as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// The random word of elements `2p` (low half) and `2p + 1` (high half) of a chunk: SplitMix64's output at
/// counter `p + 2` from the chunk's state (the first output is skipped). Counter-based, so a chunk's words
/// are independent of each other and the loops below vectorise.
#[inline(always)]
fn pair_bits(chunk_seed: u64, p: usize) -> u64 {
    splitmix::SplitMix64::at(chunk_seed, p as u64 + 2)
}

/// Elements with a 32-bit draw below this are kept.
fn keep_threshold(keep: f64) -> u64 {
    (keep * 4_294_967_296.0).round().min(4_294_967_296.0) as u64
}

/// `out[i] = f(i, kept)` over one chunk, `kept` drawn as the mask does.
#[inline(always)]
fn for_chunk<T>(chunk_seed: u64, threshold: u64, out: &mut [T], f: impl Fn(usize, bool) -> T) {
    let last = out.len() / 2;
    let mut pairs = out.chunks_exact_mut(2);
    for (p, pair) in (&mut pairs).enumerate() {
        let bits = pair_bits(chunk_seed, p);
        pair[0] = f(2 * p, bits & 0xFFFF_FFFF < threshold);
        pair[1] = f(2 * p + 1, bits >> 32 < threshold);
    }
    if let [slot] = pairs.into_remainder() {
        *slot = f(2 * last, pair_bits(chunk_seed, last) & 0xFFFF_FFFF < threshold);
    }
}

/// The mask for `numel` elements: `kept` where kept, `dropped` where dropped.
fn fill_mask<T: Copy + Send + Sync>(numel: usize, seed: u64, keep: f64, kept: T, dropped: T) -> Vec<T> {
    let threshold = keep_threshold(keep);
    let mut mask = vec![dropped; numel];
    mask.par_chunks_mut(CHUNK).enumerate().for_each(|(chunk, out)| {
        for_chunk(chunk_seed(seed, chunk), threshold, out, |_, k| if k { kept } else { dropped })
    });
    mask
}

#[inline(always)]
fn dropout_chunk<T: HostFloat>(chunk_seed: u64, threshold: u64, scale: f32, x: &[T], out: &mut [T]) {
    for_chunk(chunk_seed, threshold, out, |i, kept| T::from32(x[i].to32() * if kept { scale } else { 0.0 }))
}

/// `x ⊙ m` on flex in one pass: the mask is drawn and multiplied in per chunk, never stored.
///
/// The mask's value is rounded to the element type and the product computed in f32 and rounded once: what
/// flex's `float_mul` with the mask tensor computes.
fn host_dropout<T: HostFloat>(
    x: &burn::backend::flex::FlexTensor,
    seed: u64,
    keep: f64,
) -> burn::backend::flex::FlexTensor {
    let shape = x.layout().shape().clone();
    let numel = shape.num_elements();
    let values = host_values::<T>(x);
    let (threshold, scale) = (keep_threshold(keep), T::from64(1.0 / keep).to32());
    let mut out = vec![T::from32(0.0); numel];
    out.par_chunks_mut(CHUNK).zip(values.par_chunks(CHUNK)).enumerate().for_each(|(chunk, (out, x))| {
        let seed = chunk_seed(seed, chunk);
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512dq") {
            #[target_feature(enable = "avx512f,avx512dq")]
            unsafe fn wide<T: HostFloat>(seed: u64, threshold: u64, scale: f32, x: &[T], out: &mut [T]) {
                dropout_chunk(seed, threshold, scale, x, out)
            }
            // Safety: the CPU has AVX512-DQ (checked above).
            return unsafe { wide(seed, threshold, scale, x, out) };
        }
        dropout_chunk(seed, threshold, scale, x, out)
    });
    burn::backend::flex::FlexTensor::from_data(TensorData::new(out, shape))
}

/// `x ⊙ m` with plain backend ops: the mask is made on the host in x's dtype and multiplied in.
pub fn apply_mask<B: Backend>(x: FloatTensor<B>, seed: u64, keep: f64) -> FloatTensor<B> {
    let shape = x.shape();
    let numel = shape.num_elements();
    let scale = 1.0 / keep;
    let dtype: FloatDType = x.dtype().into();
    let data = match dtype {
        FloatDType::BF16 => {
            TensorData::new(fill_mask(numel, seed, keep, half::bf16::from_f64(scale), half::bf16::ZERO), shape)
        }
        FloatDType::F16 => {
            TensorData::new(fill_mask(numel, seed, keep, half::f16::from_f64(scale), half::f16::ZERO), shape)
        }
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
        match x.dtype() {
            burn::tensor::DType::F32 => host_dropout::<f32>(&x, seed, keep),
            burn::tensor::DType::BF16 => host_dropout::<half::bf16>(&x, seed, keep),
            _ => apply_mask::<Self>(x, seed, keep),
        }
    }
}

impl<B: Backend + SeededDropoutBackend, C: CheckpointStrategy> SeededDropoutBackend for Autodiff<B, C> {
    fn seeded_dropout(x: FloatTensor<Self>, seed: u64, keep: f64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SeededDropoutBackward;

        impl<B: Backend + SeededDropoutBackend> Backward<B, 1> for SeededDropoutBackward {
            /// The seed and the keep probability: the mask is made again.
            type State = (u64, f64);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_x] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (seed, keep) = ops.state;
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, B::seeded_dropout(grad, seed, keep));
                }
            }
        }

        let (x, x_node) = x.into_parts();
        match SeededDropoutBackward.prepare::<C>([x_node]).compute_bound().stateful() {
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
    Tensor::from_dispatch(<Dispatch as SeededDropoutBackend>::seeded_dropout(x.into_dispatch(), seed, 1.0 - prob))
}

thread_local! {
    /// This thread's dropout generator, when [`seed_dropout`] set one.
    static DROPOUT_SEEDS: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Makes this thread's dropout masks a function of `seed` and the order of the forwards: [`draw_seed`] then
/// takes SplitMix64 draws on the host instead of the device's generator, so nothing is read back from the
/// device and threads training on different devices (data-parallel ranks) do not share a generator.
pub fn seed_dropout(seed: u64) {
    DROPOUT_SEEDS.with(|s| s.set(Some(seed)));
}

/// A fresh dropout seed: the next draw of this thread's generator ([`seed_dropout`]), or else one from the
/// device's generator (what `device.seed(..)` makes reproducible; a small read back from the device).
pub fn draw_seed(device: &burn::tensor::Device) -> u64 {
    if let Some(state) = DROPOUT_SEEDS.with(|s| s.get()) {
        let mut rng = splitmix::SplitMix64(state);
        let seed = rng.next_u64();
        DROPOUT_SEEDS.with(|s| s.set(Some(rng.0)));
        return seed;
    }
    draw_device_seed(device)
}

fn draw_device_seed(device: &burn::tensor::Device) -> u64 {
    let draws: Vec<f32> = Tensor::<1>::random([4], Distribution::Default, device)
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap_or_default();
    draws.iter().fold(0u64, |acc, v| (acc << 16) ^ ((v * 65_536.0) as u64 & 0xFFFF))
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
        assert!(bf.iter().zip(&mask).all(|(b, m)| (b.to_f32() != 0.0) == (*m != 0.0)));
        // The one-pass flex kernel equals multiplying by the mask tensor (f32 and bf16, odd length, 2 chunks).
        for dtype in [burn::tensor::DType::F32, burn::tensor::DType::BF16] {
            let x = Tensor::<1>::random([CHUNK + 77], Distribution::Normal(0.0, 2.0), &Device::flex()).cast(dtype);
            let x = burn::backend::flex::FlexTensor::from_data(x.into_data());
            let fused = <Flex as SeededDropoutBackend>::seeded_dropout(x.clone(), 9, keep);
            let plain = apply_mask::<Flex>(x, 9, keep);
            let (a, b) = (fused.into_data().convert::<f32>(), plain.into_data().convert::<f32>());
            assert_eq!(a.try_into_vec::<f32>().unwrap(), b.try_into_vec::<f32>().unwrap(), "{dtype:?}");
        }
        // Neighbouring chunks are not copies of each other.
        assert_ne!(mask[..CHUNK], mask[CHUNK..2 * CHUNK]);

        let device = Device::flex().autodiff();
        let x = Tensor::<2>::ones([37, 70], &device).require_grad();
        let y = seeded_dropout(x.clone(), 1.0 - keep, 7);
        let dx = x.grad(&(y.clone() * 3.0).sum().backward()).unwrap();
        let (y, dx): (Vec<f32>, Vec<f32>) =
            (y.into_data().try_into_vec().unwrap(), dx.into_data().try_into_vec().unwrap());
        assert!(y.iter().zip(&dx).all(|(a, g)| (a * 3.0 - g).abs() < 1e-6), "dx = 3 · mask");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / keep as f32).abs() < 1e-6));
    }
}
