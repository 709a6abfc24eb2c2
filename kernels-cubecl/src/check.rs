//! What the kernel tests and the GPU check binary share: seeded random inputs (fresh per run unless
//! `QLORA_KERNEL_SEED` is set; the seed is printed), and poisoned output buffers so unwritten elements show;
//! for the tests, one wgpu client per test binary.

use cubecl::prelude::*;
use cubecl::server::Handle;

#[cfg(all(test, feature = "wgpu"))]
pub fn client() -> Client {
    use std::sync::OnceLock;
    static CLIENT: OnceLock<Client> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            crate::client_for(crate::DeviceKind::Wgpu).expect("wgpu device (install mesa-vulkan-drivers for lavapipe)")
        })
        .clone()
}

/// A buffer of `bytes` bytes filled with 0xAB (a NaN as f32, 0xABAB as 16-bit).
pub fn poison(client: &Client, bytes: usize) -> Handle {
    client.create_from_slice(&vec![0xABu8; bytes.div_ceil(4) * 4])
}

/// Seeded test inputs from the workspace's SplitMix64.
pub struct Rng {
    state: splitmix::SplitMix64,
    /// The seed it started from (printed, and replayable through `QLORA_KERNEL_SEED`).
    pub seed: u64,
}

impl Rng {
    /// Seeded from `QLORA_KERNEL_SEED`, or from the clock; prints the seed so a failure can be replayed.
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("QLORA_KERNEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(7)
        });
        println!("{test}: QLORA_KERNEL_SEED={seed}");
        Rng { state: splitmix::SplitMix64(seed), seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        self.state.unit_f32()
    }

    /// Roughly normal (sum of uniforms).
    pub fn normal(&mut self) -> f32 {
        (0..4).map(|_| self.uniform()).sum::<f32>() * 1.732 - 3.464
    }

    /// `n` roughly normal values times `scale`.
    pub fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

/// Weight-like values with hard cases mixed in: an all-zero stretch, exact code values, huge and tiny scales.
pub fn random_weights(n: usize, rng: &mut Rng) -> Vec<f32> {
    let scale = 10f32.powf(rng.uniform() * 4.0 - 3.0);
    let mut v: Vec<f32> = (0..n).map(|_| rng.normal() * scale).collect();
    if n > 200 {
        let start = (rng.next_u64() as usize) % (n - 100);
        v[start..start + 80].fill(0.0);
        let i = (rng.next_u64() as usize) % n;
        v[i] = scale * 40.0;
    }
    v
}
