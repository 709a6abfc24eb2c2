//! Paging, accounting, checkpoints and the burn bridge.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};

use crate::*;

/// Deterministic pseudo-random values (SplitMix64 → uniform [-1, 1)).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = splitmix::SplitMix64(seed);
    (0..n).map(|_| (rng.unit_f32() * 2.0 - 1.0) * scale).collect()
}

/// Parameter sizes: a small one (32-bit even in 8-bit mode), ragged and multi-page ones.
const SIZES: [usize; 4] = [1000, 7807, 20_000, 4100];

struct Problem {
    params: Vec<Vec<f32>>,
    keys: Vec<String>,
}

impl Problem {
    fn new() -> Self {
        Problem {
            params: SIZES.iter().enumerate().map(|(i, &n)| values(i as u64 + 1, n, 0.1)).collect(),
            keys: (0..SIZES.len()).map(|i| format!("layer{i}.lora_a")).collect(),
        }
    }

    fn step<D: PageDevice<Values = [f32]>>(&mut self, opt: &mut PagedAdamW<D>, step: u64) -> PagerStats {
        let grads: Vec<Vec<f32>> =
            SIZES.iter().enumerate().map(|(i, &n)| values(1000 * step + i as u64, n, 0.5)).collect();
        let mut updates: Vec<ParamGrad<'_>> = self
            .params
            .iter_mut()
            .zip(&grads)
            .zip(&self.keys)
            .map(|((p, g), k)| ParamGrad { key: k, param: &mut p[..], grad: &g[..] })
            .collect();
        opt.step(1e-3, &mut updates).unwrap()
    }
}

fn config(precision: AdamPrecision, budget: Option<usize>) -> PagedAdamWConfig {
    PagedAdamWConfig::new()
        .with_precision(precision)
        .with_weight_decay(0.01)
        .with_page_bytes(16 * 1024)
        .with_device_budget_bytes(budget)
}

fn discrete() -> HostMemory {
    HostMemory { copy_on_transfer: true }
}

#[test]
fn paged_equals_resident_for_any_budget_and_stays_under_it() {
    for precision in [AdamPrecision::Bits32, AdamPrecision::Bits8] {
        let mut resident = Problem::new();
        let mut opt = config(precision, None).init_on(discrete()).unwrap();
        for s in 1..=50 {
            let stats = resident.step(&mut opt, s);
            if s > 1 {
                assert_eq!(
                    (stats.paged_in_bytes, stats.paged_out_bytes),
                    (0, 0),
                    "unlimited budget: nothing moves after step 1"
                );
            }
        }
        let total = opt.state_bytes() as usize;
        let page = 16 * 1024;
        for budget in [page, page + 1000, 3 * page, total / 2, total - 1] {
            let mut paged = Problem::new();
            let mut opt = config(precision, Some(budget)).init_on(discrete()).unwrap();
            let mut moved = 0;
            for s in 1..=50 {
                let stats = paged.step(&mut opt, s);
                assert!(
                    stats.resident_bytes <= budget as u64 && stats.peak_resident_bytes <= budget as u64,
                    "{stats:?}"
                );
                moved += stats.paged_in_bytes;
            }
            assert_eq!(paged.params, resident.params, "{precision:?}, budget {budget}: paged parameters differ");
            for key in &resident.keys {
                assert_eq!(opt.state_of(key), opt.state_of(key));
            }
            let stats = opt.stats();
            assert!(moved > total as u64, "budget {budget} < state {total}: pages must stream ({stats:?})");
            println!(
                "{precision:?} budget {budget:>7} of {total}: peak resident {}, paged in {} per step",
                stats.peak_resident_bytes, stats.paged_in_bytes
            );
        }
    }
}

#[test]
fn belady_eviction_streams_only_what_does_not_fit() {
    // 10 equal pages, room for 4: per step only the other 6 stream, the minimum (LRU would stream all 10).
    let page = 8 * 1024;
    let mut opt =
        PagedAdamWConfig::new().with_page_bytes(page).with_device_budget_bytes(Some(4 * page)).init().unwrap();
    let mut p = vec![0.5f32; 10 * page / 8];
    let g = vec![0.1f32; p.len()];
    for s in 0..3 {
        let stats = opt.step(1e-3, &mut [ParamGrad { key: "w", param: &mut p[..], grad: &g[..] }]).unwrap();
        if s > 0 {
            assert_eq!(stats.paged_in_bytes, 6 * page as u64, "{stats:?}");
        }
    }
}

#[test]
fn state_bytes_8bit_is_about_a_quarter() {
    let n = 64 * 4096;
    let mut bytes = Vec::new();
    for precision in [AdamPrecision::Bits32, AdamPrecision::Bits8] {
        let mut opt = config(precision, None).init().unwrap();
        let mut p = vec![0.0f32; n];
        let g = values(3, n, 1.0);
        opt.step(1e-3, &mut [ParamGrad { key: "w", param: &mut p[..], grad: &g[..] }]).unwrap();
        bytes.push(opt.state_bytes() as f64);
    }
    let ratio = bytes[1] / bytes[0];
    assert!(ratio <= 0.27, "8-bit state is {ratio:.3} of 32-bit");
}

#[test]
fn checkpoint_round_trip_resumes_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for precision in [AdamPrecision::Bits32, AdamPrecision::Bits8] {
        let mut straight = Problem::new();
        let mut opt = config(precision, Some(40 * 1024)).init().unwrap();
        for s in 1..=20 {
            straight.step(&mut opt, s);
        }

        let mut resumed = Problem::new();
        let mut first = config(precision, Some(40 * 1024)).init().unwrap();
        for s in 1..=10 {
            resumed.step(&mut first, s);
        }
        let path = dir.path().join(format!("{precision:?}.safetensors"));
        first.save(&path).unwrap();
        // A different page size and budget on resume: state is re-split, values unchanged.
        let mut second = config(precision, None).with_page_bytes(64 * 1024).init().unwrap();
        second.load(&path).unwrap();
        for key in &resumed.keys {
            assert_eq!(second.state_of(key), first.state_of(key), "{key}: loaded state");
            assert_eq!(second.steps_of(key), Some(10));
        }
        for s in 11..=20 {
            resumed.step(&mut second, s);
        }
        assert_eq!(resumed.params, straight.params, "{precision:?}: resumed run differs");
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    assert!(matches!(PagedAdamWConfig::new().with_page_bytes(100).init(), Err(OptimError::Config(_))));
    assert!(matches!(
        PagedAdamWConfig::new().with_device_budget_bytes(Some(1000)).init(),
        Err(OptimError::BudgetTooSmall { .. })
    ));
    assert!(matches!(PagedAdamWConfig::new().with_beta2(1.0).init(), Err(OptimError::Config(_))));
    let mut opt = PagedAdamWConfig::new().init().unwrap();
    let mut p = [0.0f32; 10];
    let err = opt.step(1e-3, &mut [ParamGrad { key: "w", param: &mut p[..], grad: &[0.0; 9][..] }]).unwrap_err();
    assert!(err.to_string().contains("parameter w"), "{err}");
    opt.step(1e-3, &mut [ParamGrad { key: "w", param: &mut p[..], grad: &[0.0; 10][..] }]).unwrap();
    let mut q = [0.0f32; 11];
    let err = opt.step(1e-3, &mut [ParamGrad { key: "w", param: &mut q[..], grad: &[0.0; 11][..] }]).unwrap_err();
    assert!(err.to_string().contains("11 elements"), "{err}");
    assert!(opt.step(f64::NAN, &mut []).is_err());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    opt.save(&path).unwrap();
    // Another precision, a truncated file, not a safetensors file, a missing file.
    let err = PagedAdamWConfig::new().with_precision(AdamPrecision::Bits8).init().unwrap().load(&path).unwrap_err();
    assert!(err.to_string().contains("Bits32"), "{err}");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    assert!(PagedAdamWConfig::new().init().unwrap().load(&path).is_err());
    std::fs::write(&path, b"{}").unwrap();
    assert!(PagedAdamWConfig::new().init().unwrap().load(&path).is_err());
    assert!(PagedAdamWConfig::new().init().unwrap().load(&dir.path().join("missing")).is_err());
}

#[derive(Module, Debug)]
struct TwoLayer {
    a: Param<Tensor<2>>,
    inner: Inner,
    frozen: Tensor<2>,
}

#[derive(Module, Debug)]
struct Inner {
    b: Param<Tensor<2>>,
}

#[test]
fn module_bridge_reads_grads_by_path_and_steps_like_the_flat_optimizer() {
    let device = Device::flex().autodiff();
    let tensor = |seed: u64, rows: usize, cols: usize| {
        Tensor::<2>::from_data(TensorData::new(values(seed, rows * cols, 0.3), [rows, cols]), &device)
    };
    let model = TwoLayer {
        a: Param::from_tensor(tensor(1, 3, 4)),
        inner: Inner { b: Param::from_tensor(tensor(2, 4, 2)) },
        frozen: tensor(3, 2, 5),
    };
    let x = tensor(4, 5, 3);
    let loss = x.matmul(model.a.val()).matmul(model.inner.b.val()).matmul(model.frozen.clone()).powf_scalar(2.0).sum();
    let grads = loss.backward();
    let grads = gradients_of(&model, &grads).unwrap();
    assert_eq!(grads.keys().collect::<Vec<_>>(), ["a", "inner.b"]);
    let before = trainable_tensors(&model).unwrap();

    let mut opt = PagedAdamWConfig::new().init().unwrap();
    let (model, report) = opt.step_module(&model, grads.clone(), 1e-2, Some(0.3)).unwrap();
    let after = trainable_tensors(&model).unwrap();

    // The same step through the flat API.
    let mut flat = PagedAdamWConfig::new().init().unwrap();
    let mut clipped: BTreeMap<String, HostTensor> = grads.clone();
    let mut slices: Vec<&mut [f32]> = clipped.values_mut().map(|g| g.values.as_mut_slice()).collect();
    let norm = clip::clip_grad_norm(&mut slices, 0.3);
    assert_eq!(norm, report.grad_norm);
    let mut expected = before.clone();
    let mut updates: Vec<ParamGrad<'_>> = expected
        .iter_mut()
        .map(|(k, p)| ParamGrad { key: k, param: &mut p.values[..], grad: &clipped[k].values[..] })
        .collect();
    flat.step(1e-2, &mut updates).unwrap();
    assert_eq!(after, expected);
    assert_ne!(after, before);
    // Still trainable after the update.
    assert!(model.a.val().is_require_grad() && model.inner.b.val().is_require_grad());

    // A non-finite gradient stops before any change.
    let mut bad = grads;
    bad.get_mut("a").unwrap().values[0] = f32::NAN;
    let err = opt.step_module(&model, bad, 1e-2, Some(0.3)).unwrap_err();
    assert!(matches!(err, OptimError::NonFiniteGradient { ref key, .. } if key == "a"), "{err}");
    assert_eq!(opt.steps_of("a"), Some(1));
}

/// The device path (gradients, norm, clipping and the update as tensors on the device, pages as tensors) gives
/// the host path's results bit for bit on flex, for 32-bit and 8-bit state, resident and paged through a budget
/// smaller than the state, over several steps with a checkpoint in between; only scalars are read back.
#[test]
fn device_step_equals_the_host_step_bit_for_bit() {
    use crate::device::{gradients_on_device, readback_bytes, trainable_on_device};
    let device = Device::flex().autodiff();
    let tensor = |seed: u64, rows: usize, cols: usize| {
        Tensor::<2>::from_data(TensorData::new(values(seed, rows * cols, 0.3), [rows, cols]), &device)
    };
    // 8-bit state needs ≥ 4096 elements per tensor; pages of 2,080 bytes hold 1,024 8-bit or 260 f32 elements.
    let fresh = || TwoLayer {
        a: Param::from_tensor(tensor(1, 64, 80)),
        inner: Inner { b: Param::from_tensor(tensor(2, 80, 70)) },
        frozen: tensor(3, 70, 5),
    };
    let x = tensor(4, 6, 64);
    let grads_of = |m: &TwoLayer| {
        let loss = x.clone().matmul(m.a.val()).matmul(m.inner.b.val()).matmul(m.frozen.clone()).powf_scalar(2.0).sum();
        loss.backward()
    };
    for precision in [AdamPrecision::Bits32, AdamPrecision::Bits8] {
        for budget in [None, Some(8 * 2080)] {
            let config = PagedAdamWConfig::new()
                .with_precision(precision)
                .with_page_bytes(2080)
                .with_device_budget_bytes(budget)
                .with_weight_decay(0.01);
            let mut host = config.init().unwrap();
            let mut on_device = config.init_on(TensorPages::new(&device)).unwrap();
            let (mut host_model, mut device_model) = (fresh(), fresh());
            for step in 0..4 {
                let g = grads_of(&host_model);
                let (m, host_report) =
                    host.step_module(&host_model, gradients_of(&host_model, &g).unwrap(), 1e-2, Some(0.3)).unwrap();
                host_model = m;
                let g = grads_of(&device_model);
                let before = readback_bytes();
                let (m, report) = on_device
                    .step_module_on_device(&device_model, gradients_on_device(&device_model, &g), 1e-2, Some(0.3))
                    .unwrap();
                device_model = m;
                let what = format!("{precision:?} budget {budget:?} step {step}");
                // Only the global norm came back (paged-out state is the pager's, counted apart).
                assert_eq!(readback_bytes() - before, 4, "{what}");
                assert_eq!(report.grad_norm, host_report.grad_norm, "{what}");
                if step <= 1 {
                    // (After the reload the device optimizer pages its state in afresh.)
                    assert_eq!(report.pager, host_report.pager, "{what}");
                }
                assert_eq!(
                    trainable_tensors(&device_model).unwrap(),
                    trainable_tensors(&host_model).unwrap(),
                    "{what}"
                );
                if step == 1 {
                    let dir = tempfile::tempdir().unwrap();
                    let path = dir.path().join("opt.safetensors");
                    on_device.save(&path).unwrap();
                    for key in ["a", "inner.b"] {
                        assert!(on_device.state_of(key) == host.state_of(key), "{what}: state of {key}");
                    }
                    on_device = config.init_on(TensorPages::new(&device)).unwrap();
                    on_device.load(&path).unwrap();
                }
            }
            if budget.is_some() {
                assert!(on_device.stats().total_paged_out_bytes > 0, "the budget made pages move");
            }
            assert!(device_model.a.val().is_require_grad() && device_model.inner.b.val().is_require_grad());
            assert_eq!(trainable_on_device(&device_model).len(), 2);
        }
    }
}
