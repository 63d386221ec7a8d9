//! The one simulator clock (milliseconds since the Unix epoch).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::ClockMode;

/// Frozen (moves only when told) or real time plus an adjustable offset.
#[derive(Debug)]
pub struct Clock {
    frozen: bool,
    /// Frozen: the current instant. Real time: offset added to the wall clock.
    value: AtomicI64,
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Clock {
    pub fn new(mode: ClockMode) -> Self {
        match mode {
            ClockMode::Frozen { start_ms } => Self {
                frozen: true,
                value: AtomicI64::new(start_ms),
            },
            ClockMode::RealTime => Self {
                frozen: false,
                value: AtomicI64::new(0),
            },
        }
    }

    /// Current simulator time, ms.
    pub fn now_ms(&self) -> i64 {
        let v = self.value.load(Ordering::SeqCst);
        if self.frozen {
            v
        } else {
            wall_ms().saturating_add(v)
        }
    }

    /// Whether the clock is frozen.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Move the clock forward (or back, with a negative value).
    pub fn advance_ms(&self, ms: i64) {
        self.value.fetch_add(ms, Ordering::SeqCst);
    }

    /// Jump to an absolute instant.
    pub fn set_ms(&self, at_ms: i64) {
        if self.frozen {
            self.value.store(at_ms, Ordering::SeqCst);
        } else {
            self.value
                .store(at_ms.saturating_sub(wall_ms()), Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_clock_moves_only_when_told() {
        let c = Clock::new(ClockMode::Frozen { start_ms: 1000 });
        assert_eq!(c.now_ms(), 1000);
        c.advance_ms(500);
        assert_eq!(c.now_ms(), 1500);
        c.set_ms(42);
        assert_eq!(c.now_ms(), 42);
    }

    #[test]
    fn realtime_clock_can_jump_forward() {
        let c = Clock::new(ClockMode::RealTime);
        let before = c.now_ms();
        c.advance_ms(3_600_000);
        assert!(c.now_ms() >= before + 3_600_000);
    }
}
