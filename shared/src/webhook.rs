//! Webhooks (issue 14, item 2): a user's HTTPS endpoint that receives every status-change event of
//! their uploads, signed, at least once, in order.
//!
//! * Registration ([`WebhookRecord`]): `PUT /v1/webhook {url}` stores the URL and a fresh secret
//!   (KMS-encrypted like the Mapillary tokens; returned once); `GET` shows the URL and the delivery
//!   state, never the secret; `DELETE` removes it.
//! * Delivery: the poller publishes each tracking record's outbox to the bus and, in the same step,
//!   queues one [`WebhookDelivery`] per event for a user with an enabled webhook (the outbox is
//!   cleared only after both). Queued deliveries are POSTed in order; the first failure stops that
//!   user's deliveries until [`backoff`] has passed (across runs: nothing is lost while the receiver
//!   is down), and [`WebhookPolicy::max_failures`] consecutive failures disable the webhook with the
//!   reason shown by `GET /v1/webhook` (a new `PUT` enables it again; the queue is kept).
//! * Signature ([`sign`]): `X-Relay-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>`
//!   with `X-Relay-Timestamp` (Unix seconds) and `X-Relay-Event-Id` (the event id, for
//!   de-duplication).
//! * SSRF ([`check_url`], [`check_ip`]): deployed, only `https` URLs whose every address is public
//!   are accepted (loopback, link-local, private, unique-local, CGNAT, multicast, unspecified,
//!   documentation and IPv4-mapped forms of these are refused), both at registration and at every
//!   delivery (DNS may change; the request is pinned to the checked address). Local mode
//!   (`RELAY_WEBHOOK_ALLOW_LOCAL=true`) also accepts loopback, over `http` too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use time::OffsetDateTime;

use crate::events::{RelayEvent, SOURCE};

/// Header: Unix seconds of the delivery attempt (part of the signed text).
pub const TIMESTAMP_HEADER: &str = "x-relay-timestamp";
/// Header: `v1=<hex HMAC-SHA256>` over `timestamp + "." + body`.
pub const SIGNATURE_HEADER: &str = "x-relay-signature";
/// Header: the event id (also the body's `id`), for de-duplication.
pub const EVENT_ID_HEADER: &str = "x-relay-event-id";
/// Header: the event's `detail-type`.
pub const EVENT_TYPE_HEADER: &str = "x-relay-event-type";
/// Longest URL accepted.
pub const MAX_URL_LEN: usize = 2048;
/// Failures kept in [`WebhookRecord::last_failures`].
pub const KEPT_FAILURES: usize = 5;

/// Why a webhook URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookUrlError {
    /// Not an absolute URL, too long, or with user info or a fragment.
    #[error("not a usable URL: {0}")]
    Malformed(String),
    /// Not `https` (local mode: `http` only to loopback).
    #[error("the URL must use https")]
    Scheme,
    /// It names or resolves to an address that is not public.
    #[error("the URL resolves to a non-public address ({0}): refused")]
    Forbidden(IpAddr),
    /// Its host does not resolve.
    #[error("the URL's host does not resolve: {0}")]
    Unresolvable(String),
}

/// Why a delivery failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The URL is (now) refused.
    #[error(transparent)]
    Url(#[from] WebhookUrlError),
    /// Connection failure, timeout.
    #[error("request failed: {0}")]
    Request(String),
    /// The receiver answered, but not 2xx.
    #[error("the receiver answered HTTP {0}")]
    Status(u16),
}

/// How webhooks are delivered (poller) and which URLs are accepted (both functions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookPolicy {
    /// `RELAY_WEBHOOK_ALLOW_LOCAL` (default `false`): also accept loopback addresses, over `http`
    /// too. Local stacks only; never in the template.
    pub allow_local: bool,
    /// `RELAY_WEBHOOK_MAX_FAILURES` (default 15): consecutive failed deliveries that disable a
    /// webhook.
    pub max_failures: u32,
    /// `RELAY_WEBHOOK_BACKOFF_S` (default 30): wait after the first failure, doubled after each
    /// further one …
    pub backoff_base: Duration,
    /// `RELAY_WEBHOOK_BACKOFF_MAX_S` (default 3600): … up to this.
    pub backoff_max: Duration,
    /// Per-request timeout (connect + answer).
    pub timeout: Duration,
}

impl Default for WebhookPolicy {
    fn default() -> Self {
        Self {
            allow_local: false,
            max_failures: 15,
            backoff_base: Duration::from_secs(30),
            backoff_max: Duration::from_secs(3600),
            timeout: Duration::from_secs(10),
        }
    }
}

/// One recorded delivery failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryFailure {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The event that was being delivered.
    pub event_id: String,
    /// What went wrong (never the secret or the body).
    pub error: String,
}

/// A user's webhook (UsersTable `USER#<user>` / `WEBHOOK`; the secret is stored beside it,
/// encrypted, and never part of this type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookRecord {
    /// Owner.
    pub user_id: String,
    /// A fresh id per `PUT`: the poller's state updates are conditional on it, so a registration
    /// replaced meanwhile is not overwritten with the old one's state.
    pub registration_id: String,
    /// Where events are POSTed.
    pub url: String,
    /// Registered at.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// `false` once disabled after repeated failure.
    pub enabled: bool,
    /// Why it was disabled.
    #[serde(default)]
    pub disabled_reason: Option<String>,
    /// When it was disabled.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub disabled_at: Option<OffsetDateTime>,
    /// Failed deliveries since the last success.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// No delivery is attempted before this (backoff).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// The last [`KEPT_FAILURES`] failures, oldest first.
    #[serde(default)]
    pub last_failures: Vec<DeliveryFailure>,
    /// The last successful delivery.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_success_at: Option<OffsetDateTime>,
}

impl WebhookRecord {
    /// A fresh, enabled registration.
    pub fn new(user_id: &str, url: &str, now: OffsetDateTime) -> Self {
        Self {
            user_id: user_id.to_string(),
            registration_id: uuid::Uuid::new_v4().to_string(),
            url: url.to_string(),
            created_at: now,
            enabled: true,
            disabled_reason: None,
            disabled_at: None,
            consecutive_failures: 0,
            next_attempt_at: None,
            last_failures: Vec::new(),
            last_success_at: None,
        }
    }

    /// Whether a delivery may be attempted at `now`.
    pub fn due(&self, now: OffsetDateTime) -> bool {
        self.enabled && self.next_attempt_at.is_none_or(|t| t <= now)
    }

    /// Record a failed delivery of `event_id` at `now`: backoff, and disabled at
    /// `policy.max_failures` consecutive failures.
    pub fn record_failure(
        &mut self,
        event_id: &str,
        error: &str,
        now: OffsetDateTime,
        policy: &WebhookPolicy,
    ) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.last_failures.push(DeliveryFailure {
            at: now,
            event_id: event_id.to_string(),
            error: error.to_string(),
        });
        if self.last_failures.len() > KEPT_FAILURES {
            let extra = self.last_failures.len() - KEPT_FAILURES;
            self.last_failures.drain(..extra);
        }
        let wait = backoff(self.consecutive_failures, policy);
        self.next_attempt_at = Some(now + wait);
        if self.consecutive_failures >= policy.max_failures {
            self.enabled = false;
            self.disabled_at = Some(now);
            self.disabled_reason = Some(format!(
                "disabled after {} consecutive failed deliveries; the last: {error}",
                self.consecutive_failures
            ));
        }
    }

    /// Record a successful delivery at `now` (the failure count starts again).
    pub fn record_success(&mut self, now: OffsetDateTime) {
        self.consecutive_failures = 0;
        self.next_attempt_at = None;
        self.last_success_at = Some(now);
    }
}

/// The wait after the `failures`-th consecutive failure: base · 2^(failures − 1), at most the max.
pub fn backoff(failures: u32, policy: &WebhookPolicy) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    policy
        .backoff_base
        .saturating_mul(1u32 << exp)
        .min(policy.backoff_max)
}

/// One event queued for a user's webhook (UploadsTable `WEBHOOK#<user>` / `<enqueued>#<event id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookDelivery {
    /// Owner.
    pub user_id: String,
    /// The event id (de-duplication).
    pub event_id: String,
    /// `detail-type`.
    pub detail_type: String,
    /// The JSON body POSTed ([`delivery_body`]).
    pub body: String,
    /// When it was queued (deliveries go in this order, then by event id).
    #[serde(with = "time::serde::rfc3339")]
    pub enqueued_at: OffsetDateTime,
}

/// The body POSTed for `ev`: `{"id", "source", "type", "detail"}` (`detail` as on the bus).
pub fn delivery_body(ev: &RelayEvent) -> String {
    serde_json::json!({
        "id": ev.id,
        "source": SOURCE,
        "type": ev.detail_type,
        "detail": ev.detail,
    })
    .to_string()
}

/// The deliveries of `events` for `user_id`, in their order: the k-th queued at `first` + k µs (the
/// queue is ordered by that time, to the microsecond, then by event id — which would not keep
/// an upload's own state changes, `<upload_id>:upload:…`, before its Mapillary ones,
/// `<upload_id>:<position>`).
pub fn deliveries(user_id: &str, events: &[RelayEvent], first: OffsetDateTime) -> Vec<WebhookDelivery> {
    events
        .iter()
        .enumerate()
        .map(|(k, ev)| WebhookDelivery {
            user_id: user_id.to_string(),
            event_id: ev.id.clone(),
            detail_type: ev.detail_type.clone(),
            body: delivery_body(ev),
            enqueued_at: first + time::Duration::microseconds(k as i64),
        })
        .collect()
}

/// A new webhook secret: `whsec_` and 64 hex digits (256 bits from the OS generator).
pub fn new_secret() -> SecretString {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(a.as_bytes());
    bytes[16..].copy_from_slice(b.as_bytes());
    // uuid v4 fixes 6 bits of each half; hashing spreads the remaining 244 bits over the output.
    let digest = <Sha256 as sha2::Digest>::digest(bytes);
    SecretString::from(format!("whsec_{}", hex::encode(digest)))
}

/// The `X-Relay-Signature` value of `body` sent at `timestamp` (Unix seconds).
pub fn sign(secret: &SecretString, timestamp: i64, body: &[u8]) -> String {
    format!(
        "v1={}",
        hex::encode(mac_of(secret, timestamp, body).finalize().into_bytes())
    )
}

/// HMAC-SHA256 keyed with `secret` over `timestamp + "." + body`: what [`sign`] sends and
/// [`verify`] checks.
fn mac_of(secret: &SecretString, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // Not input-derived: HMAC (RFC 2104) accepts keys of any length (longer ones are hashed), so
    // `new_from_slice` has no error case for `Hmac<Sha256>`.
    #[allow(clippy::expect_used)]
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.expose_secret().as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// What a receiver does: whether `signature` is [`sign`]'s for `body` at `timestamp` (constant
/// time).
pub fn verify(secret: &SecretString, timestamp: i64, body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("v1=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    mac_of(secret, timestamp, body).verify_slice(&sig).is_ok()
}

/// Whether `ip` may receive webhooks under `allow_local`.
pub fn check_ip(ip: IpAddr, allow_local: bool) -> Result<(), WebhookUrlError> {
    let ip = match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    if ip.is_loopback() {
        return if allow_local {
            Ok(())
        } else {
            Err(WebhookUrlError::Forbidden(ip))
        };
    }
    let public = match ip {
        IpAddr::V4(v4) => v4_public(v4),
        IpAddr::V6(v6) => v6_public(v6),
    };
    if public {
        Ok(())
    } else {
        Err(WebhookUrlError::Forbidden(ip))
    }
}

fn v4_public(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (64..128).contains(&o[1])) // CGNAT 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF 192.0.0/24
        || (o[0] == 198 && (o[1] == 18 || o[1] == 19)) // benchmarking 198.18/15
        || o[0] >= 240) // reserved
}

fn v6_public(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique-local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x0064 && s[1] == 0xff9b) // NAT64 (would reach IPv4 behind it)
        || ip.to_ipv4().is_some()) // IPv4-compatible ::a.b.c.d
}

/// Parse and check a webhook URL without resolving it: absolute, `https` (or `http` in local
/// mode), a host, no user info or fragment, at most [`MAX_URL_LEN`]; an IP literal must pass
/// [`check_ip`]. Hosts given by name are checked again once resolved.
pub fn check_url(raw: &str, allow_local: bool) -> Result<url::Url, WebhookUrlError> {
    if raw.len() > MAX_URL_LEN {
        return Err(WebhookUrlError::Malformed(format!(
            "longer than {MAX_URL_LEN} characters"
        )));
    }
    let url = url::Url::parse(raw).map_err(|e| WebhookUrlError::Malformed(e.to_string()))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_local => {}
        _ => return Err(WebhookUrlError::Scheme),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(WebhookUrlError::Malformed("user info is not allowed".into()));
    }
    if url.fragment().is_some() {
        return Err(WebhookUrlError::Malformed("a fragment is not allowed".into()));
    }
    match url.host() {
        None => return Err(WebhookUrlError::Malformed("no host".into())),
        Some(url::Host::Ipv4(ip)) => check_ip(IpAddr::V4(ip), allow_local)?,
        Some(url::Host::Ipv6(ip)) => check_ip(IpAddr::V6(ip), allow_local)?,
        Some(url::Host::Domain(_)) => {}
    }
    Ok(url)
}

/// Check the resolved addresses of `url` (already through [`check_url`]): every one must pass
/// [`check_ip`], and `http` is only for loopback.
pub fn check_resolved(url: &url::Url, addrs: &[IpAddr], allow_local: bool) -> Result<(), WebhookUrlError> {
    if addrs.is_empty() {
        return Err(WebhookUrlError::Unresolvable(
            url.host_str().unwrap_or_default().to_string(),
        ));
    }
    for ip in addrs {
        check_ip(*ip, allow_local)?;
        if url.scheme() == "http" && !ip.is_loopback() {
            return Err(WebhookUrlError::Scheme);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn private_link_local_loopback_and_unique_local_addresses_are_refused() {
        for a in [
            "127.0.0.1",
            "127.8.9.10",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254", // the instance metadata service
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.1.2.3",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(
                matches!(check_ip(ip(a), false), Err(WebhookUrlError::Forbidden(_))),
                "{a} must be refused"
            );
        }
        for a in ["93.184.215.14", "8.8.8.8", "172.32.0.1", "2606:4700::1111"] {
            assert_eq!(check_ip(ip(a), false), Ok(()), "{a} is public");
        }
    }

    #[test]
    fn local_mode_allows_loopback_only() {
        assert_eq!(check_ip(ip("127.0.0.1"), true), Ok(()));
        assert_eq!(check_ip(ip("::1"), true), Ok(()));
        assert!(check_ip(ip("10.0.0.1"), true).is_err());
        assert!(check_ip(ip("169.254.169.254"), true).is_err());
    }

    #[test]
    fn urls_are_checked_before_and_after_resolution() {
        assert_eq!(
            check_url("http://example.com/hook", false),
            Err(WebhookUrlError::Scheme)
        );
        assert_eq!(
            check_url("ftp://example.com/hook", true),
            Err(WebhookUrlError::Scheme)
        );
        assert!(matches!(
            check_url("https://127.0.0.1/hook", false),
            Err(WebhookUrlError::Forbidden(_))
        ));
        assert!(matches!(
            check_url("https://[::1]:8443/hook", false),
            Err(WebhookUrlError::Forbidden(_))
        ));
        assert!(matches!(
            check_url("https://169.254.169.254/latest/meta-data", false),
            Err(WebhookUrlError::Forbidden(_))
        ));
        assert!(matches!(
            check_url("https://user:pw@example.com/", false),
            Err(WebhookUrlError::Malformed(_))
        ));
        assert!(matches!(
            check_url("not a url", false),
            Err(WebhookUrlError::Malformed(_))
        ));
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(matches!(
            check_url(&long, false),
            Err(WebhookUrlError::Malformed(_))
        ));
        let url = check_url("https://hooks.example.com/relay", false).expect("a public name passes");
        // A name that resolves to a private address (DNS rebinding included) is refused once resolved.
        assert!(matches!(
            check_resolved(&url, &[ip("93.184.215.14"), ip("10.0.0.5")], false),
            Err(WebhookUrlError::Forbidden(_))
        ));
        assert!(matches!(
            check_resolved(&url, &[], false),
            Err(WebhookUrlError::Unresolvable(_))
        ));
        assert_eq!(check_resolved(&url, &[ip("93.184.215.14")], false), Ok(()));
        // Local mode: http to loopback only.
        let local = check_url("http://localhost:8080/hook", true).expect("local http");
        assert_eq!(check_resolved(&local, &[ip("127.0.0.1")], true), Ok(()));
        assert!(check_resolved(&local, &[ip("127.0.0.1")], false).is_err());
        let lan = check_url("http://printer.lan/hook", true).expect("syntax");
        assert!(check_resolved(&lan, &[ip("93.184.215.14")], true).is_err());
    }

    #[test]
    fn the_signature_covers_timestamp_and_body() {
        let secret = SecretString::from("whsec_test".to_string());
        let sig = sign(&secret, 1_700_000_000, b"{\"a\":1}");
        assert!(sig.starts_with("v1="));
        assert_eq!(sig.len(), 3 + 64);
        assert!(verify(&secret, 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(!verify(&secret, 1_700_000_001, b"{\"a\":1}", &sig));
        assert!(!verify(&secret, 1_700_000_000, b"{\"a\":2}", &sig));
        let other = SecretString::from("whsec_other".to_string());
        assert!(!verify(&other, 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(!verify(&secret, 1_700_000_000, b"{\"a\":1}", "v1=zz"));
        // Independent computation: HMAC-SHA256("key", "1.x") from RFC 2104's construction.
        let k = SecretString::from("key".to_string());
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"key").expect("key");
        mac.update(b"1.x");
        assert_eq!(
            sign(&k, 1, b"x"),
            format!("v1={}", hex::encode(mac.finalize().into_bytes()))
        );
    }

    #[test]
    fn secrets_are_fresh_and_long() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_eq!(a.expose_secret().len(), 6 + 64);
    }

    #[test]
    fn failures_back_off_and_disable_at_the_limit() {
        let policy = WebhookPolicy {
            max_failures: 3,
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(25),
            ..WebhookPolicy::default()
        };
        assert_eq!(backoff(1, &policy), Duration::from_secs(10));
        assert_eq!(backoff(2, &policy), Duration::from_secs(20));
        assert_eq!(backoff(3, &policy), Duration::from_secs(25));
        assert_eq!(backoff(u32::MAX, &policy), Duration::from_secs(25));
        let t0 = datetime!(2026-12-01 10:00:00 UTC);
        let mut w = WebhookRecord::new("alice", "https://example.com/h", t0);
        assert!(w.due(t0));
        w.record_failure("e1", "the receiver answered HTTP 503", t0, &policy);
        assert!(!w.due(t0 + time::Duration::seconds(9)));
        assert!(w.due(t0 + time::Duration::seconds(10)));
        w.record_failure("e1", "x", t0, &policy);
        w.record_success(t0);
        assert_eq!(w.consecutive_failures, 0);
        assert!(w.enabled && w.due(t0));
        for _ in 0..3 {
            w.record_failure("e2", "connection refused", t0, &policy);
        }
        assert!(!w.enabled);
        assert!(!w.due(t0 + time::Duration::days(1)));
        let reason = w.disabled_reason.clone().unwrap_or_default();
        assert!(
            reason.contains("3 consecutive") && reason.contains("connection refused"),
            "{reason}"
        );
        for _ in 0..10 {
            w.record_failure("e3", "x", t0, &policy);
        }
        assert_eq!(w.last_failures.len(), KEPT_FAILURES);
    }
}
