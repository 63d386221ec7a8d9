//! The deterministic xorshift the domain's mutation and fuzz-style tests share (included with
//! `#[path = "common/rng.rs"] mod rng;`): a fixed seed replays the same inputs on every run.

/// Deterministic xorshift64.
pub struct Rng(pub u64);

// Each test file includes this module on its own and uses a subset of it.
#[allow(dead_code)]
impl Rng {
    /// The next 64 pseudo-random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// True once in `one_in` draws on average.
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}
