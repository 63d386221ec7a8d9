//! splitmix64: deterministic scenarios without a dependency (any decent generator would do), for the
//! poller benchmark's city and the soak's mix, kill points and token expiries.

/// The generator; the same seed gives the same numbers.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below(hi - lo)
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn same_seed_same_numbers_and_ranges_hold() {
        let (mut a, mut b) = (Rng(42), Rng(42));
        for _ in 0..1000 {
            assert_eq!(a.next(), b.next());
        }
        for _ in 0..1000 {
            let r = a.range(10, 20);
            assert!((10..20).contains(&r), "{r}");
            let u = a.unit();
            assert!((0.0..1.0).contains(&u), "{u}");
        }
        assert_eq!(a.range(5, 5), 5);
        assert!(!a.chance(0.0));
        assert!(a.chance(1.0));
    }
}
