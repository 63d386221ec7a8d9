//! The Lambda invocation deadline as an [`Instant`].
//!
//! The Runtime API gives the deadline as epoch milliseconds (`Lambda-Runtime-Deadline-Ms`). AWS
//! always sends a time in the future. `cargo lambda watch` (1.9.x) sends the constant `600000`, i.e.
//! 1970-01-01T00:10:00Z (`runtime/functions_router.rs` in cargo-lambda): taken literally, every
//! invocation would start out of time, and zip-and-push would only queue continuations. A deadline
//! that has already passed when the invocation arrives therefore means "no usable deadline": the
//! function then assumes `fallback` (its configured timeout) from now, and says so in the log.

use std::time::{Duration, Instant, SystemTime};

/// The deadline `deadline_ms` (epoch ms) names, or `fallback` from now when it is not in the future.
pub fn from_epoch_ms(deadline_ms: u64, fallback: Duration) -> Instant {
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    resolve(deadline_ms, now_ms, fallback, Instant::now())
}

fn resolve(deadline_ms: u64, now_ms: u64, fallback: Duration, now: Instant) -> Instant {
    if deadline_ms <= now_ms {
        tracing::warn!(
            deadline_ms,
            fallback_s = fallback.as_secs(),
            "the invocation's deadline has already passed (a local emulator's constant?): assuming the fallback timeout"
        );
        return now + fallback;
    }
    now + Duration::from_millis(deadline_ms - now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_deadline_is_ahead_should_use_it() {
        let now = Instant::now();
        let at = resolve(
            1_700_000_090_000,
            1_700_000_000_000,
            Duration::from_secs(900),
            now,
        );
        assert_eq!(at - now, Duration::from_secs(90));
    }

    #[test]
    fn when_deadline_is_cargo_lambda_watch_constant_should_fall_back() {
        let now = Instant::now();
        let at = resolve(600_000, 1_700_000_000_000, Duration::from_secs(900), now);
        assert_eq!(at - now, Duration::from_secs(900));
        let at = resolve(1_700_000_000_000, 1_700_000_000_000, Duration::from_secs(60), now);
        assert_eq!(at - now, Duration::from_secs(60));
    }
}
