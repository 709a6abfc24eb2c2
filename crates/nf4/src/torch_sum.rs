//! torch's float32 `sum` / `mean` on the CPU, operation for operation.
//!
//! bitsandbytes' double quantization subtracts `absmax.mean()` from the block absmax values, and that mean
//! is torch's cascade summation (`aten/src/ATen/native/cpu/SumKernel.cpp`): vectors of `lanes` floats summed
//! in four interleaved rows with a four-level cascade, the scalar tail first, then the lanes in order, and
//! the sum divided by the count in float32. Reproducing it makes our offset equal bitsandbytes' to the bit.
//! `lanes` is 8 for torch's AVX2 kernel (what torch dispatches to on the machines we checked, Zen 5
//! included) and 16 for its AVX-512 kernel. torch splits sums of 32768 or more elements across threads;
//! this is the single-threaded order.

/// torch's AVX2 vector width, the kernel it picked on every machine we checked.
pub const TORCH_AVX2_LANES: usize = 8;

/// `torch.mean(x)` of a float32 tensor on the CPU (single-threaded summation order).
pub fn torch_mean_f32(values: &[f32], lanes: usize) -> f32 {
    torch_sum_f32(values, lanes) / values.len() as f32
}

/// `torch.sum(x)` of a contiguous float32 tensor on the CPU (single-threaded summation order).
pub fn torch_sum_f32(values: &[f32], lanes: usize) -> f32 {
    let n = values.len();
    if n >= lanes {
        let vectors = n / lanes;
        let load = |i: usize| -> Vec<f32> { values[i * lanes..(i + 1) * lanes].to_vec() };
        let lane_sums = row_sum(&load, vectors, || vec![0.0f32; lanes], |a: &mut Vec<f32>, b: &Vec<f32>| add_vec(a, b));
        let mut acc = 0.0f32;
        for &v in &values[vectors * lanes..] {
            acc += v;
        }
        for v in lane_sums {
            acc += v;
        }
        acc
    } else {
        row_sum(&|i: usize| values[i], n, || 0.0f32, |a: &mut f32, b: &f32| *a += *b)
    }
}

fn add_vec(a: &mut [f32], b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += *y;
    }
}

/// `row_sum`: the row viewed as `(-1, 4)`, four partial sums by `multi_row_sum`, the leftovers added to the
/// first, then the four combined in order.
fn row_sum<T: Clone>(load: &dyn Fn(usize) -> T, size: usize, zero: impl Fn() -> T, add: impl Fn(&mut T, &T)) -> T {
    const ILP: usize = 4;
    let size_ilp = size / ILP;
    let mut partial = multi_row_sum::<T, ILP>(&|i, k| load(i * ILP + k), size_ilp, &zero, &add);
    for i in size_ilp * ILP..size {
        add(&mut partial[0], &load(i));
    }
    let (first, rest) = partial.split_at_mut(1);
    for p in rest.iter() {
        add(&mut first[0], p);
    }
    partial.swap_remove(0)
}

/// `multi_row_sum`: `ROWS` running sums, each a cascade of four accumulator levels of `2^level_power`.
fn multi_row_sum<T: Clone, const ROWS: usize>(
    load: &dyn Fn(usize, usize) -> T,
    size: usize,
    zero: &impl Fn() -> T,
    add: &impl Fn(&mut T, &T),
) -> Vec<T> {
    const LEVELS: usize = 4;
    let level_power = 4.max(ceil_log2(size) / LEVELS as u32);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc: Vec<Vec<T>> = (0..LEVELS).map(|_| (0..ROWS).map(|_| zero()).collect()).collect();
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for k in 0..ROWS {
                add(&mut acc[0][k], &load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ROWS {
                let lower = std::mem::replace(&mut acc[j - 1][k], zero());
                add(&mut acc[j][k], &lower);
            }
            let mask = level_mask << (j as u32 * level_power);
            if i & mask != 0 {
                break;
            }
        }
    }
    while i < size {
        for k in 0..ROWS {
            add(&mut acc[0][k], &load(i, k));
        }
        i += 1;
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest.iter() {
        for k in 0..ROWS {
            add(&mut first[0][k], &level[k]);
        }
    }
    acc.swap_remove(0)
}

/// ATen's `CeilLog2`: 1 for x ≤ 2, else ⌈log2 x⌉.
fn ceil_log2(x: usize) -> u32 {
    if x <= 2 { 1 } else { usize::BITS - (x - 1).leading_zeros() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_sums_are_exact() {
        assert_eq!(torch_sum_f32(&[1.0, 2.0, 3.0], 8), 6.0);
        assert_eq!(torch_mean_f32(&(1..=100).map(|i| i as f32).collect::<Vec<_>>(), 8), 50.5);
    }

    #[test]
    fn cascade_is_more_accurate_than_a_running_sum() {
        let values = vec![0.1f32; 1 << 20];
        let naive: f32 = values.iter().sum();
        let cascade = torch_sum_f32(&values, 8);
        let exact = 0.1f64 as f32 as f64 * (1 << 20) as f64;
        assert!((cascade as f64 - exact).abs() < (naive as f64 - exact).abs());
    }
}
