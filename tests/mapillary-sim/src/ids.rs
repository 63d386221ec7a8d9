//! Seeded generators for ids, handles, tokens and codes.

use std::collections::HashSet;

use rand::distr::Alphanumeric;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Deterministic id generator; never returns the same value twice.
#[derive(Debug)]
pub struct IdGen {
    rng: StdRng,
    issued: HashSet<String>,
}

impl IdGen {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            issued: HashSet::new(),
        }
    }

    fn unique(&mut self, mut make: impl FnMut(&mut StdRng) -> String) -> String {
        loop {
            let v = make(&mut self.rng);
            if self.issued.insert(v.clone()) {
                return v;
            }
        }
    }

    /// A 15-digit numeric string, like real image, cluster and user ids.
    pub fn numeric(&mut self) -> String {
        self.unique(|r| {
            r.random_range(100_000_000_000_000u64..1_000_000_000_000_000u64)
                .to_string()
        })
    }

    /// A 22-character alphanumeric key, like real sequence ids.
    pub fn sequence_key(&mut self) -> String {
        self.unique(|r| alnum(r, 22))
    }

    /// `prefix` followed by `len` random alphanumeric characters.
    pub fn token(&mut self, prefix: &str, len: usize) -> String {
        self.unique(|r| format!("{prefix}{}", alnum(r, len)))
    }

    /// A random float in [0, 1).
    pub fn fraction(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
}

fn alnum(r: &mut StdRng, len: usize) -> String {
    (0..len).map(|_| char::from(r.sample(Alphanumeric))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_well_formed() {
        let mut a = IdGen::new(7);
        let mut b = IdGen::new(7);
        let (n1, n2) = (a.numeric(), b.numeric());
        assert_eq!(n1, n2);
        assert_eq!(n1.len(), 15);
        assert!(n1.bytes().all(|c| c.is_ascii_digit()));
        let s = a.sequence_key();
        assert_eq!(s.len(), 22);
        assert!(s.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a.numeric(), n1);
    }
}
