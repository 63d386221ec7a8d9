//! The bodies Mapillary answers with, parsed: the token grant (§1.3), the rupload offset and
//! handle (§2), `finish_upload`'s cluster id (§3.1), image entities and `image_ids` (§7.2–7.3), and
//! rupload's `backoff` (§2.5). Also the one place a token lifetime becomes a date
//! ([`token_expiry`]).
//!
//! Every function here is pure and total: any reply, however hostile (huge numbers, wrong types,
//! NaN-like values), is a value or a [`BadReply`], never a panic. The fuzz crate (`fuzz/`, target
//! `mapillary_replies`) compiles this file on its own, so it uses nothing from the crate but
//! `domain::linking` and only external crates the fuzz crate also depends on.

use std::time::Duration;

use secrecy::SecretString;
use serde_json::Value;
use time::OffsetDateTime;

use crate::domain::linking::MapillaryImage;

/// Longest token lifetime accepted (10 years). Mapillary grants tokens for about 60 days; a
/// lifetime past this is not a plausible reply, and taking it as given would let a token never be
/// refreshed for its age (or overflow the date arithmetic).
pub const MAX_TOKEN_LIFETIME_S: u64 = 10 * 366 * 24 * 3600;

/// Longest server-requested wait kept as such (one day). rupload's `backoff` is in milliseconds
/// and any JSON number; a longer one is clamped to this, which is still far past every retry
/// policy's `max_server_wait`, so the upload stops with the rate-limit error instead of sleeping.
pub const MAX_SERVER_BACKOFF: Duration = Duration::from_secs(24 * 3600);

/// A 2xx reply without the expected content (e.g. no `offset`, no `h`, no `cluster_id`, an absurd
/// `expires_in`). Becomes [`super::error::MapillaryError::BadReply`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected reply from Mapillary (HTTP {status}): {message}")]
pub struct BadReply {
    /// HTTP status of the reply.
    pub status: u16,
    /// What was wrong (never quotes a token).
    pub message: String,
}

/// A [`BadReply`] for a reply with `status`.
pub fn bad_reply(status: u16, message: impl Into<String>) -> BadReply {
    BadReply {
        status,
        message: message.into(),
    }
}

/// Reply of `POST /token` (§1.3).
#[derive(Debug, Clone)]
pub struct TokenGrant {
    /// The user access token.
    pub access_token: SecretString,
    /// Lifetime in seconds, when Mapillary sent one (at most [`MAX_TOKEN_LIFETIME_S`]).
    pub expires_in: Option<u64>,
    /// Always `bearer` (other values are rejected).
    pub token_type: String,
    /// A separate refresh token, if Mapillary ever sends one; otherwise refresh with the access token.
    pub refresh_token: Option<SecretString>,
}

/// Why a token lifetime cannot be turned into an expiry date.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenLifetimeError {
    /// Longer than [`MAX_TOKEN_LIFETIME_S`] (or past what a date can hold).
    #[error("token lifetime of {0} s is out of range (at most {MAX_TOKEN_LIFETIME_S} s)")]
    OutOfRange(u64),
}

/// When a token granted at `now` for `expires_in` seconds expires (`None` when Mapillary sent no
/// lifetime). Every `now + expires_in` of the relay goes through here: a lifetime past
/// [`MAX_TOKEN_LIFETIME_S`], or one whose end a date cannot hold, is an error, never a panic.
pub fn token_expiry(
    now: OffsetDateTime,
    expires_in: Option<u64>,
) -> Result<Option<OffsetDateTime>, TokenLifetimeError> {
    let Some(secs) = expires_in else {
        return Ok(None);
    };
    if secs > MAX_TOKEN_LIFETIME_S {
        return Err(TokenLifetimeError::OutOfRange(secs));
    }
    let secs = i64::try_from(secs).map_err(|_| TokenLifetimeError::OutOfRange(secs))?;
    now.checked_add(time::Duration::seconds(secs))
        .map(Some)
        .ok_or(TokenLifetimeError::OutOfRange(secs.unsigned_abs()))
}

/// The token grant in a `POST /token` reply. `expires_in`, when present, must be a whole number of
/// seconds up to [`MAX_TOKEN_LIFETIME_S`]: anything else is a [`BadReply`] (the token is not
/// stored, the caller reports the failure).
pub fn token_grant(v: &Value) -> Result<TokenGrant, BadReply> {
    let access_token = v
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad_reply(200, "token reply has no `access_token`"))?;
    let token_type = v
        .get("token_type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if !token_type.eq_ignore_ascii_case("bearer") {
        return Err(bad_reply(
            200,
            format!("token_type {token_type:?} is not \"bearer\""),
        ));
    }
    let expires_in = match v.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(e) => {
            let secs = number_u64(e).ok_or_else(|| {
                bad_reply(
                    200,
                    "token reply has an `expires_in` that is not a whole number of seconds",
                )
            })?;
            if secs > MAX_TOKEN_LIFETIME_S {
                return Err(bad_reply(
                    200,
                    format!("token reply has an `expires_in` of {secs} s, past {MAX_TOKEN_LIFETIME_S} s"),
                ));
            }
            Some(secs)
        }
    };
    Ok(TokenGrant {
        access_token: SecretString::from(access_token),
        expires_in,
        token_type,
        refresh_token: v
            .get("refresh_token")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(SecretString::from),
    })
}

/// The byte offset of a rupload `GET {upload}/{key}` reply body (`{"offset": n}`).
pub fn upload_offset(status: u16, body: &[u8]) -> Result<u64, BadReply> {
    let v: Value = serde_json::from_slice(body).map_err(|_| bad_reply(status, "offset reply is not JSON"))?;
    v.get("offset")
        .and_then(number_u64)
        .ok_or_else(|| bad_reply(status, "offset reply has no `offset`"))
}

/// The file handle of a rupload POST reply body (`{"h": "…"}`).
pub fn upload_handle(status: u16, body: &[u8]) -> Result<String, BadReply> {
    upload_handle_if_any(status, body)?.ok_or_else(|| bad_reply(status, "upload reply has no handle `h`"))
}

/// The file handle of a rupload POST reply body, if it has one: a POST that does not complete the
/// file (bounded POSTs) may be answered without `h`; the reply must still be JSON.
pub fn upload_handle_if_any(status: u16, body: &[u8]) -> Result<Option<String>, BadReply> {
    let v: Value = serde_json::from_slice(body).map_err(|_| bad_reply(status, "upload reply is not JSON"))?;
    Ok(id_of(v.get("h")))
}

/// The `cluster_id` of a `finish_upload` reply.
pub fn finish_cluster_id(v: &Value) -> Result<String, BadReply> {
    id_of(v.get("cluster_id")).ok_or_else(|| {
        bad_reply(
            200,
            "finish_upload reply has no `cluster_id` (a cluster may exist)",
        )
    })
}

/// rupload's `backoff` (milliseconds, §2.5) of a rate-limit reply, as a wait. Not a finite,
/// non-negative number: `None` (the `Retry-After` header or the policy's default applies); longer
/// than [`MAX_SERVER_BACKOFF`]: clamped to it (`Duration::from_secs_f64` would panic on a huge
/// value).
pub fn rupload_backoff(v: &Value) -> Option<Duration> {
    let ms = v.get("backoff").and_then(Value::as_f64)?;
    if !ms.is_finite() || ms < 0.0 {
        return None;
    }
    Some(
        Duration::try_from_secs_f64(ms / 1000.0)
            .unwrap_or(MAX_SERVER_BACKOFF)
            .min(MAX_SERVER_BACKOFF),
    )
}

/// Entity fields the linking needs (see [`entity_to_image`]).
pub const LINK_FIELDS: &str = "id,sequence,captured_at,geometry,altitude";

/// An image entity (fields of [`LINK_FIELDS`]) as a linking input; the error names what is missing.
pub fn entity_to_image(v: &Value) -> Result<MapillaryImage, String> {
    let id = id_of(v.get("id")).ok_or("image entity has no `id`")?;
    let sequence_id = id_of(v.get("sequence")).ok_or_else(|| format!("image {id} has no `sequence`"))?;
    let captured_at_ms = v
        .get("captured_at")
        .and_then(|c| c.as_i64().or_else(|| c.as_str().and_then(|s| s.parse().ok())))
        .ok_or_else(|| format!("image {id} has no `captured_at`"))?;
    let coords = v
        .get("geometry")
        .and_then(|g| g.get("coordinates"))
        .and_then(Value::as_array)
        .ok_or_else(|| format!("image {id} has no `geometry`"))?;
    let lon = coords.first().and_then(number_f64);
    let lat = coords.get(1).and_then(number_f64);
    let (Some(lon), Some(lat)) = (lon, lat) else {
        return Err(format!("image {id} has unreadable coordinates"));
    };
    Ok(MapillaryImage {
        id,
        sequence_id,
        captured_at_ms,
        lon,
        lat,
        altitude: v.get("altitude").and_then(number_f64),
    })
}

/// The `data` array of an image search or batch read, as linking inputs.
pub fn data_images(v: &Value) -> Result<Vec<MapillaryImage>, BadReply> {
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| bad_reply(200, "images reply has no `data` array"))?;
    data.iter()
        .map(|e| entity_to_image(e).map_err(|m| bad_reply(200, m)))
        .collect()
}

/// The ids of an `image_ids?sequence_id=` reply, in order.
pub fn image_ids(v: &Value) -> Result<Vec<String>, BadReply> {
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| bad_reply(200, "image_ids reply has no `data` array"))?;
    data.iter()
        .enumerate()
        .map(|(i, item)| {
            id_of(item.get("id")).ok_or_else(|| bad_reply(200, format!("image_ids item {i} has no `id`")))
        })
        .collect()
}

/// The id of the image entity's `creator` (`{"creator": {"id": …, "username": …}}`), when sent.
pub fn creator_id(v: &Value) -> Option<String> {
    id_of(v.get("creator").and_then(|c| c.get("id")))
}

/// Ids are strings on the wire; numbers are accepted and printed (never parsed further).
pub fn id_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A JSON number, or a string holding one.
pub fn number_f64(v: &Value) -> Option<f64> {
    v.as_f64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// A JSON integer, or a string holding one.
pub fn number_i64(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// A non-negative JSON integer, or a string holding one.
pub fn number_u64(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;
    use serde_json::json;
    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2026-03-01 10:00 UTC);

    #[test]
    fn token_lifetimes_past_the_limit_are_errors_not_panics() {
        assert_eq!(token_expiry(NOW, None), Ok(None));
        assert_eq!(
            token_expiry(NOW, Some(60)),
            Ok(Some(NOW + time::Duration::minutes(1)))
        );
        assert_eq!(
            token_expiry(NOW, Some(MAX_TOKEN_LIFETIME_S)),
            Ok(Some(NOW + time::Duration::seconds(MAX_TOKEN_LIFETIME_S as i64)))
        );
        for absurd in [MAX_TOKEN_LIFETIME_S + 1, i64::MAX as u64, u64::MAX] {
            assert_eq!(
                token_expiry(NOW, Some(absurd)),
                Err(TokenLifetimeError::OutOfRange(absurd))
            );
        }
        // A clock near the end of what a date holds: the sum does not fit, an error as well.
        let late = time::Date::MAX.midnight().assume_utc();
        assert!(token_expiry(late, Some(3 * 24 * 3600)).is_err());
    }

    #[test]
    fn token_grants_with_absurd_lifetimes_are_bad_replies() {
        let ok = token_grant(&json!({"access_token": "a", "token_type": "bearer", "expires_in": 5184000}))
            .unwrap();
        assert_eq!(ok.access_token.expose_secret(), "a");
        assert_eq!(ok.expires_in, Some(5_184_000));
        let s =
            token_grant(&json!({"access_token": "a", "token_type": "Bearer", "expires_in": "60"})).unwrap();
        assert_eq!(s.expires_in, Some(60));
        assert_eq!(
            token_grant(&json!({"access_token": "a", "token_type": "bearer"}))
                .unwrap()
                .expires_in,
            None
        );
        for bad in [
            json!(u64::MAX),
            json!(1e300),
            json!(-5),
            json!(1.5),
            json!("soon"),
            json!([]),
            json!(MAX_TOKEN_LIFETIME_S + 1),
        ] {
            let e =
                token_grant(&json!({"access_token": "secret-a", "token_type": "bearer", "expires_in": bad}))
                    .unwrap_err();
            assert!(e.message.contains("expires_in"), "{e}");
            assert!(!e.to_string().contains("secret-a"), "{e}");
        }
    }

    #[test]
    fn huge_or_hostile_backoffs_are_clamped_or_ignored() {
        assert_eq!(
            rupload_backoff(&json!({"backoff": 1500})),
            Some(Duration::from_millis(1500))
        );
        for huge in [json!(1e300), json!(f64::MAX), json!(u64::MAX), json!(1.0e20)] {
            assert_eq!(
                rupload_backoff(&json!({ "backoff": huge })),
                Some(MAX_SERVER_BACKOFF),
                "{huge}"
            );
        }
        for ignored in [json!(-1), json!("10"), json!(null), json!(-1e300)] {
            assert_eq!(rupload_backoff(&json!({ "backoff": ignored })), None, "{ignored}");
        }
        assert_eq!(rupload_backoff(&json!({})), None);
    }

    #[test]
    fn offsets_handles_and_clusters_need_their_field() {
        assert_eq!(upload_offset(200, br#"{"offset": 42}"#), Ok(42));
        assert!(upload_offset(200, br#"{"offset": -1}"#).is_err());
        assert!(upload_offset(200, b"<html>").is_err());
        assert_eq!(upload_handle(200, br#"{"h": "hx"}"#), Ok("hx".into()));
        assert!(upload_handle(200, br#"{"h": ""}"#).is_err());
        assert_eq!(finish_cluster_id(&json!({"cluster_id": 77})), Ok("77".into()));
        assert!(finish_cluster_id(&json!({"cluster_id": null})).is_err());
        assert_eq!(
            image_ids(&json!({"data": [{"id": "1"}, {"id": 2}]})),
            Ok(vec!["1".to_string(), "2".to_string()])
        );
        assert!(image_ids(&json!({"data": [{"id": "1"}, {}]})).is_err());
        assert_eq!(
            creator_id(&json!({"creator": {"id": 108, "username": "ann"}})),
            Some("108".into())
        );
        assert_eq!(creator_id(&json!({"creator": "ann"})), None);
    }
}
