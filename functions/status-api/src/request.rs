//! What every route reads first, in this order: the caller (401 without one), the sequence id of
//! the path and the query parameters (400 for an invalid id or any parameter the route does not
//! take), then — where the route works on one sequence — the caller's sequence (another user's
//! sequence is simply not found: 404).

use axum::extract::rejection::PathRejection;
use axum::extract::Path;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use shared::model::SequenceRecord;
use shared::ports::SequenceReader;

use crate::deps::Deps;
use crate::identity;
use crate::problem::Problem;
use crate::reply::sequence_not_found;
use crate::validate;

type Result<T, E = Problem> = std::result::Result<T, E>;

/// A `{sequence_id}` path segment as axum extracts it.
pub(crate) type PathArg = std::result::Result<Path<String>, PathRejection>;

/// Query parameters as (name, value) pairs.
pub(crate) type Query = Vec<(String, String)>;

/// The caller and the query parameters, of which only `allowed` are accepted.
pub(crate) fn caller<D: Deps>(d: &D, parts: &Parts, allowed: &[&str]) -> Result<(String, Query)> {
    let user = identity::require(parts, d.settings().dev_auth_header.as_ref())?;
    let q = validate::query_pairs(parts.uri.query(), allowed)?;
    Ok((user, q))
}

/// The caller, the sequence id of the path, and the query parameters (only `allowed`).
pub(crate) fn sequence_call<D: Deps>(
    d: &D,
    path: PathArg,
    parts: &Parts,
    allowed: &[&str],
) -> Result<(String, String, Query)> {
    let user = identity::require(parts, d.settings().dev_auth_header.as_ref())?;
    let Path(raw) = path.map_err(|_| Problem::invalid_parameter("sequence_id is not valid UTF-8"))?;
    validate::sequence_id(&raw)?;
    let q = validate::query_pairs(parts.uri.query(), allowed)?;
    Ok((user, raw, q))
}

/// The caller's sequence `id`, or 404.
pub(crate) async fn owned_sequence<D: Deps>(d: &D, user: &str, id: &str) -> Result<SequenceRecord> {
    d.repo()
        .get_sequence(user, id)
        .await?
        .ok_or_else(|| sequence_not_found(id))
}

/// 415 unless the body is declared `application/json`; `detail` says what body the route takes.
pub(crate) fn require_json(parts: &Parts, detail: &str) -> Result<()> {
    let json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
    if json {
        Ok(())
    } else {
        Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "JSON body required",
            format!("Send Content-Type: application/json with {detail}."),
        ))
    }
}
