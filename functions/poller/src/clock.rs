//! "Now" for the tracking rules (stale, hard stop, token expiry), injectable so tests can follow the
//! simulator's frozen clock; and the wall-time measure of a run's timings.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use time::OffsetDateTime;

/// The poller's notion of the current time.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// A settable clock (epoch milliseconds), shared by clones.
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// A manual clock at `at`.
    pub fn manual(at: OffsetDateTime) -> Self {
        Clock::Manual(Arc::new(AtomicI64::new(to_ms(at))))
    }

    /// The current time.
    pub fn now(&self) -> OffsetDateTime {
        match self {
            Clock::System => OffsetDateTime::now_utc(),
            Clock::Manual(ms) => from_ms(ms.load(Ordering::SeqCst)),
        }
    }

    /// Set a manual clock to epoch milliseconds `ms` (no effect on the system clock).
    pub fn set_ms(&self, ms: i64) {
        if let Clock::Manual(v) = self {
            v.store(ms, Ordering::SeqCst);
        }
    }
}

/// The token sessions of a run read this clock (token expiry follows the same "now").
impl shared::mapillary::session::Now for Clock {
    fn now(&self) -> OffsetDateTime {
        Clock::now(self)
    }
}

/// Milliseconds since `t` (for the run's timings; saturates instead of wrapping).
pub fn elapsed_ms(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn to_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn from_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_is_shared_by_clones() {
        let c = Clock::manual(OffsetDateTime::UNIX_EPOCH);
        let c2 = c.clone();
        c.set_ms(1_714_557_600_000);
        assert_eq!(c2.now().unix_timestamp(), 1_714_557_600);
    }
}
