//! Failure classification and the retry policy of Mapillary calls (protocol doc §2.5, §2.6, §8.2).
//!
//! Everything here is pure: an HTTP status, a `Retry-After` value and a body go in, a
//! [`MapillaryError`] (defined in [`super::error`]) comes out, and [`upload_retry_action`] says what
//! the upload loop does with it. Error messages carry Mapillary's own message, never a token or a
//! URL with a query string.

use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use serde_json::Value;

use super::error::MapillaryError;
use super::replies::rupload_backoff;

/// Wait when a rate-limit reply says nothing about how long (mapillary_tools: 10 s).
pub const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::from_secs(10);

/// The longest body excerpt kept in an error message.
const MAX_MESSAGE_CHARS: usize = 300;

/// Retry budget and timing of the resumable upload loop.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries without progress before giving up (mapillary_tools: 200). Progress (the server's
    /// offset moved past every offset seen before) resets the count.
    pub max_retries: u32,
    /// First exponential wait (mapillary_tools: 2 s).
    pub min_delay: Duration,
    /// Cap of the exponential wait, jitter included (mapillary_tools: 16 s).
    pub max_delay: Duration,
    /// Add up to 100 % random jitter to each exponential wait (still capped by `max_delay`).
    pub jitter: bool,
    /// Wait for a rate-limit reply that names no duration (mapillary_tools: 10 s).
    pub rate_limit_wait: Duration,
    /// Longest server-requested wait (`backoff`, `Retry-After`) the loop sleeps through; a longer
    /// one is returned to the caller as [`MapillaryError::RateLimited`] / [`MapillaryError::Server`]
    /// so a Lambda can reschedule instead of sleeping past its deadline.
    pub max_server_wait: Duration,
    /// Minimum timeout of one request (mapillary_tools: 60 s).
    pub min_request_timeout: Duration,
    /// A POST may take `remaining bytes / min_upload_speed` seconds when that exceeds the minimum
    /// (mapillary_tools: 51 200 B/s).
    pub min_upload_speed: u64,
}

impl Default for RetryPolicy {
    /// mapillary_tools 0.14.7's numbers, with jitter and a 5-minute ceiling on server-requested waits.
    fn default() -> Self {
        Self {
            max_retries: 200,
            min_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(16),
            jitter: true,
            rate_limit_wait: DEFAULT_RATE_LIMIT_WAIT,
            max_server_wait: Duration::from_secs(300),
            min_request_timeout: Duration::from_secs(60),
            min_upload_speed: 51_200,
        }
    }
}

impl RetryPolicy {
    /// Tiny delays for tests (1–5 ms exponential, 50 ms default rate-limit wait, 10 s server cap).
    pub fn fast() -> Self {
        Self {
            max_retries: 10,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            jitter: true,
            rate_limit_wait: Duration::from_millis(50),
            max_server_wait: Duration::from_secs(10),
            min_request_timeout: Duration::from_secs(30),
            min_upload_speed: 51_200,
        }
    }

    /// A fresh sequence of exponential waits (call again to reset after progress).
    pub fn backoff(&self) -> Backoff {
        let mut b = ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .without_max_times();
        if self.jitter {
            b = b.with_jitter();
        }
        Backoff {
            inner: b.build(),
            cap: self.max_delay,
        }
    }

    /// Timeout of a request that sends `remaining` body bytes.
    pub fn request_timeout(&self, remaining: u64) -> Duration {
        let by_speed = Duration::from_secs(remaining / self.min_upload_speed.max(1));
        self.min_request_timeout.max(by_speed)
    }
}

/// Exponential waits with jitter, capped (backed by `backon`).
#[derive(Debug)]
pub struct Backoff {
    inner: <ExponentialBuilder as BackoffBuilder>::Backoff,
    cap: Duration,
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // backon's jitter adds up to 100 % on top of its own cap; keep the cap a real cap.
        self.inner.next().map(|d| d.min(self.cap))
    }
}

/// What the upload loop does after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAction {
    /// Fetch the offset again and retry without the exponential wait (412 `OffsetInvalidError`).
    Immediate,
    /// Wait the next exponential delay plus `extra` (the server-requested wait), then retry.
    Backoff { extra: Duration },
    /// Give up and return the error.
    Stop,
}

/// §2.6: how the resumable upload loop reacts to `err`.
pub fn upload_retry_action(err: &MapillaryError, policy: &RetryPolicy) -> RetryAction {
    let server_wait = |d: Duration| {
        if d > policy.max_server_wait {
            RetryAction::Stop
        } else {
            RetryAction::Backoff { extra: d }
        }
    };
    match err {
        MapillaryError::OffsetInvalid { .. } => RetryAction::Immediate,
        MapillaryError::Transport { .. } => RetryAction::Backoff {
            extra: Duration::ZERO,
        },
        MapillaryError::RateLimited { retry_after, .. } => {
            server_wait(retry_after.unwrap_or(policy.rate_limit_wait))
        }
        MapillaryError::Server { retry_after, .. } => server_wait(retry_after.unwrap_or(Duration::ZERO)),
        MapillaryError::Api { retriable: true, .. } => RetryAction::Backoff {
            extra: Duration::ZERO,
        },
        _ => RetryAction::Stop,
    }
}

/// Parse a `Retry-After` header: delta-seconds or an HTTP-date (relative to `now`). A date in the
/// past is zero; anything unparseable is `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let at = time::PrimitiveDateTime::parse(v, &fmt).ok()?.assume_utc();
    let at = SystemTime::from(at);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.chars().count() > MAX_MESSAGE_CHARS {
        let cut: String = text.chars().take(MAX_MESSAGE_CHARS).collect();
        format!("{cut}…")
    } else {
        text.to_string()
    }
}

fn fallback_message(status: u16, body: &[u8]) -> String {
    let text = excerpt(body);
    if text.is_empty() {
        format!("HTTP {status} without a body")
    } else {
        text
    }
}

/// Classify a non-2xx rupload reply (GET offset or POST bytes), per §2.5 / §2.6.
pub fn classify_rupload(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    now: SystemTime,
) -> MapillaryError {
    let json: Option<Value> = serde_json::from_slice(body).ok().filter(Value::is_object);
    let info = json.as_ref().and_then(|v| v.get("debug_info"));
    let kind = info
        .and_then(|i| i.get("type"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let retriable = info.and_then(|i| i.get("retriable")).and_then(Value::as_bool) == Some(true);
    let message = info
        .and_then(|i| i.get("message"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| fallback_message(status, body));
    let header_wait = retry_after.and_then(|v| parse_retry_after(v, now));
    let is_4xx = (400..500).contains(&status);

    if status == 429 || (is_4xx && kind.as_deref() == Some("RequestRateLimitedError")) {
        // Clamped (a huge `backoff` made `Duration::from_secs_f64` panic): the wait then exceeds
        // `max_server_wait`, and the upload stops with this error instead of sleeping.
        let backoff = json.as_ref().and_then(rupload_backoff);
        return MapillaryError::RateLimited {
            retry_after: backoff.or(header_wait),
            message,
        };
    }
    if status == 401 || status == 403 || kind.as_deref() == Some("NotAuthorizedError") {
        return MapillaryError::Unauthorized { message };
    }
    if status == 412 && retriable {
        return MapillaryError::OffsetInvalid { message };
    }
    if status >= 500 {
        return MapillaryError::Server {
            status,
            message,
            retry_after: header_wait,
        };
    }
    MapillaryError::Api {
        status,
        code: None,
        subcode: None,
        kind,
        message,
        retriable: is_4xx && retriable,
    }
}

/// Graph rate-limit codes (4 application, 17 user, 32 page, 613 custom; Facebook graph family).
const GRAPH_RATE_LIMIT_CODES: [i64; 4] = [4, 17, 32, 613];

/// Classify a graph API reply that is non-2xx or carries an `error` object (§8.2).
pub fn classify_graph(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    now: SystemTime,
) -> MapillaryError {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let err = json
        .as_ref()
        .and_then(|v| v.get("error"))
        .filter(|e| e.is_object());
    let code = err.and_then(|e| e.get("code")).and_then(Value::as_i64);
    let subcode = err.and_then(|e| e.get("error_subcode")).and_then(Value::as_i64);
    let kind = err
        .and_then(|e| e.get("type"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let transient = err.and_then(|e| e.get("is_transient")).and_then(Value::as_bool) == Some(true);
    let message = err
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| fallback_message(status, body));
    let header_wait = retry_after.and_then(|v| parse_retry_after(v, now));

    if status == 429 || code.is_some_and(|c| GRAPH_RATE_LIMIT_CODES.contains(&c)) {
        return MapillaryError::RateLimited {
            retry_after: header_wait,
            message,
        };
    }
    if status == 401 || code == Some(190) {
        return MapillaryError::Unauthorized { message };
    }
    if status >= 500 {
        return MapillaryError::Server {
            status,
            message,
            retry_after: header_wait,
        };
    }
    MapillaryError::Api {
        status,
        code,
        subcode,
        kind,
        message,
        retriable: transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapillary::error::TransportKind;

    fn now() -> SystemTime {
        // 2024-05-01T10:00:00Z
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_557_600)
    }

    fn rupload(status: u16, retry_after: Option<&str>, body: &str) -> MapillaryError {
        classify_rupload(status, retry_after, body.as_bytes(), now())
    }

    fn action(e: &MapillaryError) -> RetryAction {
        upload_retry_action(e, &RetryPolicy::default())
    }

    const RATE_LIMITED: &str = r#"{"backoff": 13000, "debug_info": {"retriable": false, "type": "RequestRateLimitedError", "message": "Request rate limit has been exceeded"}}"#;

    #[test]
    fn rate_limit_waits_backoff_ms_then_retry_after_then_ten_seconds() {
        let e = rupload(429, Some("5"), RATE_LIMITED);
        assert!(
            matches!(&e, MapillaryError::RateLimited { retry_after: Some(d), message }
            if *d == Duration::from_millis(13_000) && message == "Request rate limit has been exceeded")
        );
        assert_eq!(
            action(&e),
            RetryAction::Backoff {
                extra: Duration::from_secs(13)
            }
        );

        // Same body with HTTP 400 (doctest variant), even though retriable is false.
        let e = rupload(400, None, RATE_LIMITED);
        assert_eq!(
            action(&e),
            RetryAction::Backoff {
                extra: Duration::from_secs(13)
            }
        );

        // Non-numeric backoff → Retry-After.
        let body = RATE_LIMITED.replace("13000", "\"soon\"");
        let e = rupload(429, Some("7"), &body);
        assert_eq!(
            action(&e),
            RetryAction::Backoff {
                extra: Duration::from_secs(7)
            }
        );

        // Bare 429 → default 10 s.
        let e = rupload(429, None, "");
        assert!(matches!(
            e,
            MapillaryError::RateLimited {
                retry_after: None,
                ..
            }
        ));
        assert_eq!(
            action(&e),
            RetryAction::Backoff {
                extra: DEFAULT_RATE_LIMIT_WAIT
            }
        );
    }

    #[test]
    fn server_wait_beyond_the_ceiling_is_handed_back() {
        let body = RATE_LIMITED.replace("13000", "3600000");
        let e = rupload(429, None, &body);
        assert_eq!(action(&e), RetryAction::Stop);
        assert!(e.is_retriable(), "the caller may still reschedule");
    }

    #[test]
    fn a_huge_backoff_is_clamped_and_stops_the_upload_instead_of_panicking() {
        // `Duration::from_secs_f64(1e300 / 1000.0)` panicked (issue 15, item 1).
        for huge in ["1e300", "1.7976931348623157e308", "18446744073709551615000"] {
            let body = RATE_LIMITED.replace("13000", huge);
            let e = rupload(429, Some("5"), &body);
            assert!(
                matches!(&e, MapillaryError::RateLimited { retry_after: Some(d), .. } if *d == crate::mapillary::replies::MAX_SERVER_BACKOFF),
                "{huge}: {e:?}"
            );
            assert_eq!(action(&e), RetryAction::Stop, "{huge}");
        }
        // A negative backoff is no wait the server asked for: Retry-After applies.
        let e = rupload(429, Some("5"), &RATE_LIMITED.replace("13000", "-1e300"));
        assert_eq!(
            action(&e),
            RetryAction::Backoff {
                extra: Duration::from_secs(5)
            }
        );
    }

    #[test]
    fn server_errors_retry_with_retry_after_if_present() {
        let e = rupload(503, Some("3"), "<html>busy</html>");
        assert!(
            matches!(&e, MapillaryError::Server { status: 503, retry_after: Some(d), message }
            if *d == Duration::from_secs(3) && message == "<html>busy</html>")
        );
        assert_eq!(
            action(&e),
            RetryAction::Backoff {
                extra: Duration::from_secs(3)
            }
        );
        let e = rupload(500, None, "");
        assert_eq!(
            action(&e),
            RetryAction::Backoff {
                extra: Duration::ZERO
            }
        );
        assert!(e.is_retriable() && e.is_ambiguous());
    }

    #[test]
    fn offset_invalid_is_immediate() {
        let body = r#"{"debug_info": {"retriable": true, "type": "OffsetInvalidError", "message": "Request starting offset is invalid"}}"#;
        let e = rupload(412, None, body);
        assert!(matches!(e, MapillaryError::OffsetInvalid { .. }));
        assert_eq!(action(&e), RetryAction::Immediate);
        // 412 not marked retriable is an ordinary non-retriable 4xx.
        let e = rupload(412, None, &body.replace("true", "false"));
        assert_eq!(action(&e), RetryAction::Stop);
    }

    #[test]
    fn auth_errors_are_unauthorized() {
        let body = r#"{"debug_info": {"type": "NotAuthorizedError", "message": "no upload for you"}}"#;
        for status in [400, 401, 403] {
            let e = rupload(status, None, body);
            assert!(matches!(&e, MapillaryError::Unauthorized { message } if message == "no upload for you"));
            assert!(e.is_unauthorized() && !e.is_retriable());
            assert_eq!(action(&e), RetryAction::Stop);
        }
        assert!(rupload(401, None, "").is_unauthorized());
    }

    #[test]
    fn other_4xx_retry_only_when_marked_retriable() {
        let e = rupload(
            400,
            None,
            r#"{"debug_info":{"retriable":true,"type":"BodyInterruptedError","message":"x"}}"#,
        );
        assert_eq!(
            action(&e),
            RetryAction::Backoff {
                extra: Duration::ZERO
            }
        );
        let e = rupload(
            400,
            None,
            r#"{"debug_info":{"retriable":false,"type":"InvalidHeaderError","message":"bad offset"}}"#,
        );
        assert!(
            matches!(&e, MapillaryError::Api { status: 400, kind: Some(k), message, retriable: false, .. }
            if k == "InvalidHeaderError" && message == "bad offset")
        );
        assert_eq!(action(&e), RetryAction::Stop);
        assert_eq!(
            e.to_string(),
            "Mapillary error 400 InvalidHeaderError: bad offset"
        );
        // 4xx without JSON: fatal, message from the body.
        let e = rupload(404, None, "nope");
        assert!(matches!(&e, MapillaryError::Api { message, .. } if message == "nope"));
        assert_eq!(action(&e), RetryAction::Stop);
    }

    #[test]
    fn transport_errors_retry_and_connect_errors_are_not_ambiguous() {
        let connect = MapillaryError::Transport {
            kind: TransportKind::Connect,
            message: "refused".into(),
        };
        let broken = MapillaryError::Transport {
            kind: TransportKind::Other,
            message: "reset".into(),
        };
        assert_eq!(
            action(&connect),
            RetryAction::Backoff {
                extra: Duration::ZERO
            }
        );
        assert!(!connect.is_ambiguous() && broken.is_ambiguous());
    }

    #[test]
    fn graph_errors_follow_josm_fixtures() {
        let g = |status, body: &str| classify_graph(status, None, body.as_bytes(), now());
        let e = g(
            403,
            r#"{"error":{"message":"Application request limit reached","type":"MLYApiException","is_transient":true,"code":4,"fbtrace_id":"x"}}"#,
        );
        assert!(matches!(
            e,
            MapillaryError::RateLimited {
                retry_after: None,
                ..
            }
        ));
        let e = g(
            401,
            r#"{"error":{"message":"Invalid OAuth 2.0 Access Token","type":"MLYApiException","code":190,"error_data":{},"fbtrace_id":"x"}}"#,
        );
        assert!(
            matches!(&e, MapillaryError::Unauthorized { message } if message == "Invalid OAuth 2.0 Access Token")
        );
        // code 190 with another status is still an auth error.
        assert!(g(
            400,
            r#"{"error":{"message":"Invalid refresh token.","type":"OAuthException","code":190}}"#
        )
        .is_unauthorized());
        let e = g(
            400,
            r#"{"error":{"message":"Unsupported get request.","type":"MLYApiException","code":100,"error_subcode":33}}"#,
        );
        assert!(matches!(
            &e,
            MapillaryError::Api {
                status: 400,
                code: Some(100),
                subcode: Some(33),
                retriable: false,
                ..
            }
        ));
        assert!(!e.is_ambiguous());
        let e = g(
            500,
            r#"{"error":{"code":1,"message":"Please reduce the amount of data you're asking for, then retry your request"}}"#,
        );
        assert!(
            matches!(&e, MapillaryError::Server { status: 500, message, .. } if message.starts_with("Please reduce"))
        );
        let e = g(502, "");
        assert!(matches!(&e, MapillaryError::Server { message, .. } if message == "HTTP 502 without a body"));
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        assert_eq!(parse_retry_after(" 120 ", now()), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 01 May 2024 10:00:30 GMT", now()),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 01 May 2024 09:00:00 GMT", now()),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now()), None);
        assert_eq!(parse_retry_after("-5", now()), None);
    }

    #[test]
    fn long_bodies_are_cut_in_messages() {
        let body = "x".repeat(5000);
        let e = rupload(418, None, &body);
        assert!(
            matches!(&e, MapillaryError::Api { message, .. } if message.chars().count() == MAX_MESSAGE_CHARS + 1)
        );
    }

    #[test]
    fn backoff_grows_exponentially_and_is_capped_with_jitter() {
        let p = RetryPolicy {
            jitter: false,
            ..RetryPolicy::default()
        };
        let waits: Vec<u64> = p.backoff().take(6).map(|d| d.as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 16, 16]);
        let p = RetryPolicy::default();
        for (i, d) in p.backoff().take(50).enumerate() {
            let base = Duration::from_secs(2u64.pow((i as u32 + 1).min(4)));
            assert!(d >= base && d <= p.max_delay, "wait {i} = {d:?}");
        }
    }

    #[test]
    fn request_timeout_scales_with_remaining_bytes() {
        let p = RetryPolicy::default();
        assert_eq!(p.request_timeout(1000), Duration::from_secs(60));
        assert_eq!(p.request_timeout(51_200 * 600), Duration::from_secs(600));
    }
}
