//! The optimizers against torch.optim.AdamW, clip_grad_norm_ and bitsandbytes.optim.AdamW8bit
//! (fixtures: xtask/fixtures/make_optim_fixtures.py). 20 steps on three tensors with given gradients.
//!
//! Moments are compared bit for bit (8-bit state: codes and absmax). Parameters are compared per tensor as
//! max|ours − theirs| / max|theirs| ≤ 1e-6: torch's CPU sqrt is MKL's (not correctly rounded, ~1 in 5
//! elements differ by 1 ulp from the exact sqrt), so a parameter can differ in its last bits, and elementwise
//! relative error is meaningless for parameters that cancel to near zero.

use optim::{AdamPrecision, PageState, PagedAdamW, PagedAdamWConfig, ParamGrad, clip};
use qlora_tests::{assert_same_len, fixtures_dir, max_rel_diff, max_scaled_diff};

use crate::fixture::Fixture;

const NAMES: [&str; 3] = ["small", "ragged", "wide"];
const STEPS: usize = 20;
const SNAPSHOTS: [usize; 4] = [1, 2, 10, 20];
const PARAM_TOLERANCE: f64 = 1e-6; // measured worst 7.4e-8 (step 20, all three runs)

struct Run {
    params: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
}

fn inputs() -> Run {
    let f = Fixture::open(&fixtures_dir().join("optim/inputs.safetensors"));
    Run {
        params: NAMES.iter().map(|n| f.f32(&format!("init.{n}"))).collect(),
        grads: NAMES.iter().map(|n| f.f32(&format!("grads.{n}"))).collect(),
    }
}

fn grad_at(run: &Run, i: usize, step: usize) -> Vec<f32> {
    let n = run.params[i].len();
    run.grads[i][step * n..(step + 1) * n].to_vec()
}

fn snapshot(f: &Fixture, name: &str, k: usize, n: usize) -> Vec<f32> {
    f.f32(name)[k * n..(k + 1) * n].to_vec()
}

/// Runs 20 steps, checking parameters at the snapshots; `on_snapshot` checks more.
fn run_steps(
    opt: &mut PagedAdamW,
    clip_to: Option<f32>,
    reference: &Fixture,
    mut on_snapshot: impl FnMut(&PagedAdamW, usize, usize),
) -> Vec<f32> {
    let mut run = inputs();
    let mut norms = Vec::new();
    for step in 0..STEPS {
        let mut grads: Vec<Vec<f32>> = (0..NAMES.len()).map(|i| grad_at(&run, i, step)).collect();
        if let Some(max) = clip_to {
            let mut slices: Vec<&mut [f32]> = grads.iter_mut().map(|g| g.as_mut_slice()).collect();
            norms.push(clip::clip_grad_norm(&mut slices, max));
        }
        let mut updates: Vec<ParamGrad<'_>> = run
            .params
            .iter_mut()
            .zip(&grads)
            .zip(NAMES)
            .map(|((p, g), key)| ParamGrad { key, param: &mut p[..], grad: &g[..] })
            .collect();
        opt.step(1e-3, &mut updates).unwrap();
        if let Some(k) = SNAPSHOTS.iter().position(|&s| s == step + 1) {
            for (i, name) in NAMES.iter().enumerate() {
                let theirs = snapshot(reference, &format!("params.{name}"), k, run.params[i].len());
                let err = max_scaled_diff(&run.params[i], &theirs); // (also checks the lengths)
                let equal = run.params[i].iter().zip(&theirs).filter(|(a, b)| a == b).count();
                println!(
                    "  step {:2} {name:6}: params max|Δ|/max|p| = {err:.2e}, {equal}/{} bit-equal",
                    step + 1,
                    theirs.len()
                );
                assert!(err <= PARAM_TOLERANCE, "step {} {name}: parameter error {err:e}", step + 1);
                on_snapshot(opt, k, i);
            }
        }
    }
    norms
}

fn config(precision: AdamPrecision) -> PagedAdamWConfig {
    PagedAdamWConfig::new().with_precision(precision).with_weight_decay(0.01).with_page_bytes(4096)
}

#[test]
fn adamw_32bit_matches_torch() {
    let reference = Fixture::open(&fixtures_dir().join("optim/adamw.safetensors"));
    let mut opt = config(AdamPrecision::Bits32).init().unwrap();
    run_steps(&mut opt, None, &reference, |_, _, _| {});
    for name in NAMES {
        let Some(PageState::F32 { exp_avg, exp_avg_sq }) = opt.state_of(name) else { panic!("{name}: f32 state") };
        assert_eq!(exp_avg, reference.f32(&format!("exp_avg.{name}")), "{name}: exp_avg bit-exact");
        assert_eq!(exp_avg_sq, reference.f32(&format!("exp_avg_sq.{name}")), "{name}: exp_avg_sq bit-exact");
    }
}

#[test]
fn global_clipping_matches_clip_grad_norm() {
    let reference = Fixture::open(&fixtures_dir().join("optim/adamw_clip.safetensors"));
    let mut opt = config(AdamPrecision::Bits32).init().unwrap();
    let norms = run_steps(&mut opt, Some(0.3), &reference, |_, _, _| {});
    let theirs = reference.f32("total_norm");
    assert_eq!(norms.len(), STEPS);
    let worst = max_rel_diff(&norms, &theirs);
    println!("  clip_grad_norm total norm: max relative difference {worst:.2e} over {STEPS} steps");
    assert!(worst <= 1e-6, "total norms {norms:?} vs {theirs:?}"); // measured 1.75e-7
}

#[test]
fn adamw_8bit_matches_bitsandbytes_state_bytes() {
    let reference = Fixture::open(&fixtures_dir().join("optim/adamw8bit.safetensors"));
    let mut opt = config(AdamPrecision::Bits8).init().unwrap();
    let sizes: Vec<usize> = inputs().params.iter().map(Vec::len).collect();
    run_steps(&mut opt, None, &reference, |opt, k, i| {
        let name = NAMES[i];
        let n = sizes[i];
        match opt.state_of(name).unwrap() {
            PageState::F32 { exp_avg, exp_avg_sq } => {
                assert!(n < 4096, "{name}: small tensors keep 32-bit state");
                assert_eq!(exp_avg, snapshot(&reference, &format!("state1.{name}"), k, n), "{name}: state1");
                assert_eq!(exp_avg_sq, snapshot(&reference, &format!("state2.{name}"), k, n), "{name}: state2");
            }
            PageState::Blockwise8 { codes1, absmax1, codes2, absmax2 } => {
                let blocks = absmax1.len();
                let theirs1 = reference.u8(&format!("state1.{name}"))[k * n..(k + 1) * n].to_vec();
                let theirs2 = reference.u8(&format!("state2.{name}"))[k * n..(k + 1) * n].to_vec();
                assert_same_len(&codes1, &theirs1, &format!("{name}: state1 codes"));
                assert_same_len(&codes2, &theirs2, &format!("{name}: state2 codes"));
                let diff1 = codes1.iter().zip(&theirs1).filter(|(a, b)| a != b).count();
                let diff2 = codes2.iter().zip(&theirs2).filter(|(a, b)| a != b).count();
                println!("           8-bit state: {diff1} + {diff2} of {} codes differ", 2 * n);
                assert_eq!((diff1, diff2), (0, 0), "{name}: 8-bit state codes");
                assert_eq!(absmax1, snapshot(&reference, &format!("absmax1.{name}"), k, blocks), "{name}: absmax1");
                assert_eq!(absmax2, snapshot(&reference, &format!("absmax2.{name}"), k, blocks), "{name}: absmax2");
            }
        }
    });
}

#[test]
fn schedules_match_transformers() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("optim/schedules.json")).unwrap()).unwrap();
    let mut checked = 0;
    let mut worst = 0.0f64; // max |ours − theirs| / base_lr
    for case in cases.as_array().unwrap() {
        let kind: optim::ScheduleKind = case["kind"].as_str().unwrap().parse().unwrap();
        let total = case["total_steps"].as_u64().unwrap();
        let warmup = case["warmup_steps"].as_u64().unwrap();
        let lr = case["base_lr"].as_f64().unwrap();
        let schedule = optim::LrScheduleConfig::new()
            .with_lr(lr)
            .with_kind(kind)
            .with_warmup(optim::Warmup::Steps(warmup))
            .init(total)
            .unwrap();
        for (step, theirs) in case["lrs"].as_array().unwrap().iter().enumerate() {
            let theirs = theirs.as_f64().unwrap();
            let ours = schedule.lr_at(step as u64);
            worst = worst.max((ours - theirs).abs() / lr);
            // Measured: max |Δ| / base lr 1.4e-16 (f64 rounding; the bound is about 7 ulps of base lr).
            assert!(
                (ours - theirs).abs() <= 1.5e-15 * lr,
                "{kind:?} total {total} warmup {warmup} step {step}: {ours} vs {theirs}"
            );
            checked += 1;
        }
    }
    println!("  {checked} learning rates equal transformers' schedules (max |Δ| / base lr {worst:.1e})");
}
