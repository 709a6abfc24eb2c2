//! The extensions on burn's CubeCL backend (`lora::cube`, `llama::loss`), run on wgpu over Mesa's
//! lavapipe: the 4-bit product with each kernel strategy against the flex reference (value and input
//! gradient), the seeded dropout mask bit for bit, and a whole QLoRA run on `--device wgpu` against
//! transformers + PEFT + bitsandbytes.

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use lora::cube::QuantMatmulStrategy;
use lora::quant_matmul::quant_matmul_t;
use qlora_tests::rng_lock;
use quant::{QuantConfig, QuantizedWeight};

fn wgpu() -> Device {
    train::device::parse_device("wgpu")
        .expect("wgpu over lavapipe (mesa-vulkan-drivers) must be available")
}

fn to_vec(t: Tensor<2>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec().unwrap()
}

/// `max |a − b| / max |b|`.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

/// y = x·Wᵀ and dx = dy·W on wgpu equal flex's for the GEMV (4 rows), the fused kernel and the
/// dequantize-then-matmul path, on a ragged weight (last absmax block short) with and without double quant.
#[test]
fn quant_matmul_on_wgpu_matches_flex_for_every_strategy() {
    let _rng = rng_lock();
    let (rows, cols) = (75, 130); // 9750 elements: 152 blocks of 64 and a short one
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i % 13) as f32 / 7.0))
        .collect();
    for double_quant in [true, false] {
        let q = QuantizedWeight::quantize(
            "w",
            &values,
            &[rows, cols],
            &QuantConfig::new().with_double_quant(double_quant),
        )
        .unwrap();
        for m in [4usize, 37] {
            let x0 =
                Tensor::<2>::random([m, cols], Distribution::Uniform(-1.0, 1.0), &Device::flex());
            let x_data = x0.into_data();
            let run = |device: Device| -> (Vec<f32>, Vec<f32>) {
                let ad = device.autodiff();
                let w = q.to_device(&ad);
                let x = Tensor::<2>::from_data(x_data.clone(), &ad).require_grad();
                let y = quant_matmul_t(x.clone(), &w);
                // A non-uniform upstream gradient: d(Σ y ⊙ c)/dy = c.
                let c = Tensor::<2>::from_data(
                    TensorData::new(
                        (0..m * rows)
                            .map(|i| ((i % 7) as f32) - 3.0)
                            .collect::<Vec<f32>>(),
                        [m, rows],
                    ),
                    &ad,
                );
                let grads = (y.clone() * c).sum().backward();
                (to_vec(y), to_vec(x.grad(&grads).unwrap()))
            };
            let (y_ref, dx_ref) = run(Device::flex());
            for strategy in [
                QuantMatmulStrategy::Auto,
                QuantMatmulStrategy::Fused,
                QuantMatmulStrategy::Dequantize,
            ] {
                strategy.set();
                let (y, dx) = run(wgpu());
                let (ey, edx) = (rel_diff(&y, &y_ref), rel_diff(&dx, &dx_ref));
                println!(
                    "  {strategy:?} m {m} double quant {double_quant}: y {ey:.1e}, dx {edx:.1e}"
                );
                assert!(
                    ey < 1e-5 && edx < 1e-5,
                    "{strategy:?} m {m} dq {double_quant}: y {ey:e} dx {edx:e}"
                );
            }
            QuantMatmulStrategy::Auto.set();
        }
    }
}

/// The dropout mask is a function of the seed only: the same on wgpu as on flex.
#[test]
fn seeded_dropout_on_wgpu_equals_flex() {
    let x = |device: &Device| Tensor::<2>::ones([33, 1000], device);
    let on_flex = to_vec(lora::dropout::seeded_dropout(x(&Device::flex()), 0.1, 99));
    let on_wgpu = to_vec(lora::dropout::seeded_dropout(x(&wgpu()), 0.1, 99));
    assert_eq!(on_flex, on_wgpu);
    assert!(on_flex.iter().any(|&v| v == 0.0));
}

/// `qlora train --device wgpu`: the 12-step QLoRA run of the trainer tests, on the CubeCL backend, matches
/// transformers + PEFT + bitsandbytes like the CPU run does.
#[test]
fn training_on_wgpu_matches_the_reference_trajectory() {
    crate::trainer::trajectory_on("wgpu");
}
