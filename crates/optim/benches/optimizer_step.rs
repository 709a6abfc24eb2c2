//! Optimizer step time, resident vs paged, and state bytes 32-bit vs 8-bit, at the LoRA shapes of
//! SmolLM2-135M (r = 64 on all 7 linears of 30 layers: 420 tensors, 19.5 M parameters).
//!
//!     cargo bench -p qlora-optim --bench optimizer_step
//!
//! "unified" is the CPU device (a transfer hands the buffer over); "discrete" copies on every transfer, as a
//! GPU does, so its paged rows show what streaming state through a small budget costs in bytes moved.

use std::time::Instant;

use optim::{AdamPrecision, HostMemory, PageDevice, PagedAdamW, PagedAdamWConfig, ParamGrad};

const RANK: usize = 64;
const LAYERS: usize = 30;
/// (in, out) of q, k, v, o, gate, up, down in SmolLM2-135M.
const LINEARS: [(usize, usize); 7] =
    [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)];

fn shapes() -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for layer in 0..LAYERS {
        for (i, (d_in, d_out)) in LINEARS.iter().enumerate() {
            out.push((format!("layers.{layer}.{i}.lora_a"), RANK * d_in));
            out.push((format!("layers.{layer}.{i}.lora_b"), d_out * RANK));
        }
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench<D: PageDevice<Values = [f32]>>(
    mut opt: PagedAdamW<D>,
    params: &mut [Vec<f32>],
    grads: &[Vec<f32>],
    keys: &[(String, usize)],
) -> (f64, u64, u64, u64) {
    let mut times = Vec::new();
    let mut stats = opt.stats();
    for step in 0..7 {
        let mut updates: Vec<ParamGrad<'_>> = params
            .iter_mut()
            .zip(grads)
            .zip(keys)
            .map(|((p, g), (k, _))| ParamGrad { key: k, param: &mut p[..], grad: &g[..] })
            .collect();
        let start = Instant::now();
        stats = opt.step(1e-4, &mut updates).unwrap();
        if step >= 2 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    (median(times), stats.paged_in_bytes + stats.paged_out_bytes, stats.peak_resident_bytes, opt.state_bytes())
}

fn main() {
    let keys = shapes();
    let total: usize = keys.iter().map(|(_, n)| n).sum();
    let grads: Vec<Vec<f32>> = keys
        .iter()
        .enumerate()
        .map(|(i, (_, n))| (0..*n).map(|j| ((i * 31 + j * 17) % 1000) as f32 * 1e-4 - 0.05).collect())
        .collect();
    println!(
        "optimizer step, {} tensors, {:.1} M parameters, {} threads",
        keys.len(),
        total as f64 / 1e6,
        rayon::current_num_threads()
    );
    println!(
        "{:<6} {:<9} {:>12} {:>10} {:>14} {:>14} {:>12}",
        "state", "device", "budget", "step ms", "moved MiB/step", "peak res. MiB", "state MiB"
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut state_bytes = [0u64; 2];
    for (pi, precision) in [AdamPrecision::Bits32, AdamPrecision::Bits8].into_iter().enumerate() {
        let base = PagedAdamWConfig::new().with_precision(precision);
        for (device_name, copy) in [("unified", false), ("discrete", true)] {
            for budget in [None, Some(64 << 20), Some(1 << 20)] {
                let mut params: Vec<Vec<f32>> = keys.iter().map(|(_, n)| vec![0.01f32; *n]).collect();
                let opt = base
                    .clone()
                    .with_device_budget_bytes(budget)
                    .init_on(HostMemory { copy_on_transfer: copy })
                    .unwrap();
                let (ms, moved, peak, bytes) = bench(opt, &mut params, &grads, &keys);
                state_bytes[pi] = bytes;
                let budget = budget.map_or("resident".to_string(), |b| format!("{} MiB", b >> 20));
                println!(
                    "{:<6} {:<9} {:>12} {:>10.1} {:>14.1} {:>14.1} {:>12.1}",
                    format!("{precision:?}").replace("Bits", ""),
                    device_name,
                    budget,
                    ms,
                    mib(moved),
                    mib(peak),
                    mib(bytes)
                );
            }
        }
    }
    println!("8-bit state / 32-bit state = {:.4}", state_bytes[1] as f64 / state_bytes[0] as f64);
}
