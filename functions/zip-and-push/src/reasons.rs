//! The reasons users read (a sequence's `reason`, an upload's `error`, a rejected image's
//! `reason`, all shown by the status API). They say what happened in the user's terms; internal
//! detail — table and key names, AWS error codes, `s3://` URLs of the relay's bucket — goes to the
//! logs instead (issue 15, item 7). [`object`] and [`internal`] build the reasons of storage and
//! internal failures; [`public`] is the last step before any reason is written.

use std::fmt::Display;

use shared::ports::StoreError;
use tracing::{error, warn};

/// The reason of a failure inside the relay (records not written, a planned image without
/// metadata, …): the user can only retry; the operator has the details in the logs.
pub const INTERNAL: &str = "internal error of the relay (the details are in its logs)";

/// [`INTERNAL`], with `detail` logged.
pub fn internal(detail: &impl Display) -> String {
    error!(detail = %detail, "internal error (the user sees a generic reason)");
    INTERNAL.to_string()
}

/// The reason of a temporary failure inside the relay (its records or queues unavailable), with
/// `detail` logged. Kept for the user only if the failure persists until the last delivery.
pub fn internal_transient(detail: &impl Display) -> String {
    warn!(detail = %detail, "temporary internal failure");
    TEMPORARY.to_string()
}

/// [`internal_transient`]'s reason.
pub const TEMPORARY: &str = "the relay's storage was temporarily unavailable (the details are in its logs)";

/// Why `what` (e.g. `manifest.json`, `the image`) could not be read, in the user's terms; the
/// store's own message (bucket, key, AWS error code) is logged.
pub fn object(what: &str, e: &StoreError) -> String {
    warn!(what, error = %e, "object unreadable");
    match e {
        StoreError::NotFound(_) => format!("{what} was not found"),
        StoreError::Changed { .. } => format!("{what} changed while it was being read"),
        StoreError::AccessDenied(_) => format!("{what} cannot be read: the relay is not allowed to read it"),
        StoreError::Transient(_) | StoreError::Other(_) => {
            format!("{what} cannot be read (a storage error; the details are in the relay's logs)")
        }
    }
}

/// `reason` as stored for the user: every `s3://…` URL is replaced by `<object>` (the key the
/// user knows is named elsewhere in the reason or beside it). Applied to every reason written, so
/// a message from deeper down that still quotes a URL does not reach the user.
pub fn public(reason: &str) -> String {
    const SCHEME: &str = "s3://";
    if !reason.contains(SCHEME) {
        return reason.to_string();
    }
    let mut out = String::with_capacity(reason.len());
    let mut rest = reason;
    while let Some(at) = rest.find(SCHEME) {
        out.push_str(&rest[..at]);
        out.push_str("<object>");
        let url = &rest[at..];
        // The URL runs to the next space; a `:` that ends it belongs to the sentence.
        let end = url.find(char::is_whitespace).unwrap_or(url.len());
        let end = if url[..end].ends_with(':') { end - 1 } else { end };
        rest = &url[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_failures_are_told_without_urls_or_codes() {
        let cases = [
            StoreError::NotFound("GetObject s3://relay-bucket/sequences/u/s/manifest.json".into()),
            StoreError::Changed {
                key: "sequences/u/s/manifest.json".into(),
                expected: "abc".into(),
            },
            StoreError::AccessDenied("GetObject s3://relay-bucket/sequences/u/s/a.jpg: AccessDenied".into()),
            StoreError::Transient("GetObject s3://relay-bucket/k: reading the body: reset".into()),
            StoreError::Other("GetObject s3://relay-bucket/k: InvalidObjectState: archived".into()),
        ];
        for e in &cases {
            let r = object("manifest.json", e);
            assert!(r.starts_with("manifest.json "), "{r}");
            for leak in [
                "s3://",
                "relay-bucket",
                "AccessDenied",
                "InvalidObjectState",
                "GetObject",
            ] {
                assert!(!r.contains(leak), "{r}");
            }
        }
        assert_eq!(object("manifest.json", &cases[0]), "manifest.json was not found");
    }

    #[test]
    fn internal_errors_have_one_stable_reason() {
        let r = internal(&"PutItem SEQ#u#s: ValidationException: Item size has exceeded the maximum");
        assert_eq!(r, INTERNAL);
    }

    #[test]
    fn urls_are_removed_from_any_reason() {
        assert_eq!(public("no EXIF GPS position"), "no EXIF GPS position");
        assert_eq!(
            public("unreadable object: GetObject s3://b/sequences/u/s/x.jpg: reset by peer"),
            "unreadable object: GetObject <object>: reset by peer"
        );
        assert_eq!(public("s3://a and s3://b/c"), "<object> and <object>");
        assert_eq!(public("at the end s3://b/k"), "at the end <object>");
        assert!(!public("x s3://s3://b y").contains("s3://"));
    }
}
