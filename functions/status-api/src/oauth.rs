//! The OAuth `state` of an account connection and the verifier that binds it to the browser that
//! started it. The Mapillary side (consent URL, code exchange, `/me`) is
//! `shared::mapillary::app::MapillaryApp`'s.
//!
//! `POST /v1/mapillary/connect` returns a random verifier in an `HttpOnly` cookie scoped to the
//! callback path and stores only its SHA-256 with the `state`. The callback must present the
//! cookie: a consent link forwarded to someone else arrives without it (or with another attempt's),
//! so it cannot link the recipient's Mapillary account to the sender.

use std::time::Duration;

use axum::http::{header, HeaderMap};
use base64::Engine;
use sha2::{Digest, Sha256};

/// Name of the browser-binding cookie.
pub const VERIFIER_COOKIE: &str = "relay_oauth_verifier";

/// A fresh `state`: 32 random bytes from the OS-seeded CSPRNG, base64url without padding
/// (43 characters).
pub fn new_state() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A fresh browser-binding verifier: the same shape as a `state` (32 random bytes, base64url).
pub fn new_verifier() -> String {
    new_state()
}

/// Lowercase hex SHA-256 of `verifier`: what is stored with the `state`.
pub fn verifier_sha256(verifier: &str) -> String {
    Sha256::digest(verifier.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `Set-Cookie` value carrying `verifier`: sent back only to the callback path, never readable
/// by scripts, and `SameSite=Lax` so that the top-level redirect from Mapillary's consent page
/// carries it. `Secure` is always set: browsers treat `http://localhost` as a secure context, and
/// the local tests copy the cookie themselves, so no mode needs it dropped.
pub fn set_cookie(verifier: &str, max_age: Duration) -> String {
    format!(
        "{VERIFIER_COOKIE}={verifier}; Max-Age={}; Path={}; HttpOnly; Secure; SameSite=Lax",
        max_age.as_secs(),
        crate::base::ROUTE_CALLBACK
    )
}

/// The `Set-Cookie` value that removes the verifier once the callback has used it.
pub fn clear_cookie() -> String {
    format!(
        "{VERIFIER_COOKIE}=; Max-Age=0; Path={}; HttpOnly; Secure; SameSite=Lax",
        crate::base::ROUTE_CALLBACK
    )
}

/// The verifier cookie among the request's `Cookie` headers (API Gateway v2 joins its `cookies`
/// with `;`), if present and shaped like one this API issues.
pub fn verifier_of(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == VERIFIER_COOKIE)
        .map(|(_, value)| value)
        .filter(|v| crate::validate::state(v).is_ok())
}

/// Whether `verifier` hashes to `expected` (hex). The comparison does not stop at the first
/// differing byte, so its time says nothing about how much of a guess matched.
pub fn verifier_matches(verifier: &str, expected: &str) -> bool {
    let actual = verifier_sha256(verifier);
    actual.len() == expected.len()
        && actual
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn states_are_long_url_safe_and_distinct() {
        let a = new_state();
        let b = new_state();
        assert_eq!(a.len(), crate::validate::STATE_LEN);
        assert!(crate::validate::state(&a).is_ok());
        assert_ne!(a, b);
    }

    #[test]
    fn verifiers_match_only_their_own_hash() {
        let a = new_verifier();
        let b = new_verifier();
        assert_ne!(a, b);
        let hash = verifier_sha256(&a);
        assert_eq!(hash.len(), 64);
        assert!(verifier_matches(&a, &hash));
        assert!(!verifier_matches(&b, &hash));
        assert!(!verifier_matches(&a, ""));
        assert!(!verifier_matches(&a, &hash[..63]));
        // Known vector: SHA-256("abc").
        assert_eq!(
            verifier_sha256("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_cookie_is_scoped_and_found_among_others() {
        let v = new_verifier();
        let set = set_cookie(&v, Duration::from_secs(600));
        for attr in [
            "HttpOnly",
            "Secure",
            "SameSite=Lax",
            "Path=/v1/mapillary/callback",
            "Max-Age=600",
        ] {
            assert!(set.contains(attr), "{set} lacks {attr}");
        }
        let mut headers = HeaderMap::new();
        assert_eq!(verifier_of(&headers), None);
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=1;{VERIFIER_COOKIE}={v}; b=2")).unwrap(),
        );
        assert_eq!(verifier_of(&headers), Some(v.as_str()));
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("relay_oauth_verifier=not a verifier"),
        );
        assert_eq!(verifier_of(&headers), None);
    }
}
