//! Shared helpers for the workspace end-to-end tests (`e2e/`): reading the golden fixtures that
//! `xtask/fixtures/*.py` made with the reference implementations.

use std::path::{Path, PathBuf};

/// The fixtures directory, `tests/fixtures/` of the workspace.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// burn's flex backend has one process-wide random generator: tests that seed it and expect the same draws
/// (dropout masks of a resumed run, LoRA initialisation) hold this lock while they use it.
pub fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Panics unless `ours` and `theirs` are equally long: an element-wise comparison through `zip` stops at the
/// shorter side, so a missing tail would pass unchecked.
#[track_caller]
pub fn assert_same_len<A, B>(ours: &[A], theirs: &[B], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths differ (ours {}, reference {})", ours.len(), theirs.len());
}

/// The larger of `m` and `d`, where a NaN wins (`f64::max` would drop it, so a NaN output would pass).
fn nan_max(m: f64, d: f64) -> f64 {
    if m.is_nan() || d.is_nan() { f64::NAN } else { m.max(d) }
}

/// `max |ours − theirs|` over two equally long sequences (computed in f64; 0 for empty ones; NaN when any
/// element is NaN, so that every `diff < tolerance` check fails on it).
#[track_caller]
pub fn max_abs_diff<T: Copy + Into<f64>>(ours: &[T], theirs: &[T]) -> f64 {
    assert_same_len(ours, theirs, "max_abs_diff");
    ours.iter().zip(theirs).fold(0.0f64, |m, (&a, &b)| nan_max(m, (a.into() - b.into()).abs()))
}

/// `max |ours − theirs| / max |theirs|`: the error relative to the reference's largest magnitude, for tensors
/// whose elements may cancel to near zero (where an element-wise relative error means nothing). An all-zero
/// reference is scaled by 1e-12, so that anything but (near) zeros on our side fails.
#[track_caller]
pub fn max_scaled_diff<T: Copy + Into<f64>>(ours: &[T], theirs: &[T]) -> f64 {
    let scale = theirs.iter().fold(0.0f64, |m, &v| m.max(v.into().abs()));
    max_abs_diff(ours, theirs) / scale.max(1e-12)
}

/// `max |ours − theirs| / |theirs|` element by element, for sequences of nonzero scalars (losses, norms);
/// NaN when any element is NaN.
#[track_caller]
pub fn max_rel_diff<T: Copy + Into<f64>>(ours: &[T], theirs: &[T]) -> f64 {
    assert_same_len(ours, theirs, "max_rel_diff");
    ours.iter().zip(theirs).fold(0.0f64, |m, (&a, &b)| {
        let (a, b) = (a.into(), b.into());
        assert!(b != 0.0, "max_rel_diff: a reference value is zero");
        nan_max(m, ((a - b) / b).abs())
    })
}
