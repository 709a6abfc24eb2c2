//! # splitmix — SplitMix64, the workspace's one seeded generator
//!
//! At the bottom of the stack, beside `nf4`: every crate that needs reproducible random numbers from a seed
//! takes them from here — the epoch order of `data`, the dropout masks of `ops` (counter-based), the
//! `random:` weights of `llama`, the kernels' and benchmarks' test inputs. SplitMix64 (Steele, Lea and Flood,
//! 2014; the seeding generator of Java's `SplittableRandom` and of the xoshiro family) is tiny and its output
//! sequence is fixed by its definition, so a seed gives the same numbers on every machine and in every
//! version: a resumed run finds its data order and masks again. Not for cryptography.

/// The golden-ratio increment of the state.
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// A SplitMix64 generator; the tuple field is its state (the seed before the first draw).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SplitMix64(pub u64);

/// SplitMix64's output function: a bijective mix of a 64-bit word.
#[inline(always)]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    /// The `n`-th output (1-based: `at(state, 1)` is the first `next_u64`) of a generator in `state`, without
    /// stepping through the others: outputs are independent of each other, so loops over them vectorise.
    #[inline(always)]
    pub fn at(state: u64, n: u64) -> u64 {
        mix(state.wrapping_add(n.wrapping_mul(GOLDEN_GAMMA)))
    }

    #[inline(always)]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix(self.0)
    }

    /// Uniform in `0..n` (n > 0), by rejection (no modulo bias).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }

    /// Uniform in `[0, 1)` with 24 random bits.
    pub fn unit_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / 16_777_216.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference sequence for seed 1234567 (from the algorithm's published C code, `splitmix64.c`).
    #[test]
    fn matches_the_reference_sequence() {
        let mut g = SplitMix64(1234567);
        let expected = [
            6457827717110365317u64,
            3203168211198807973,
            9817491932198370423,
            4593380528125082431,
            16408922859458223821,
        ];
        for e in expected {
            assert_eq!(g.next_u64(), e);
        }
    }

    #[test]
    fn at_is_the_nth_output() {
        let mut g = SplitMix64(42);
        for n in 1..=10 {
            assert_eq!(SplitMix64::at(42, n), g.next_u64());
        }
    }

    #[test]
    fn below_stays_below() {
        let mut g = SplitMix64(9);
        assert!((0..1000).all(|_| g.below(7) < 7));
        assert_eq!(g.below(1), 0);
    }
}
