//! What every handler module uses (below the router in the import graph, so that `app`, `drops`,
//! `oauth` and `webhooks` form no circle): the route templates, the [`Deps`] trait and its usual
//! implementation [`AppDeps`], JSON answers that are not cached, and the sequence id of a path.

use axum::extract::Path;
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use shared::mapillary::app::MapillaryApp;
use shared::model::SequenceRecord;
use shared::ports::{
    AccountClaims, ConnectionReader, DropStore, ImageEntryReader, OAuthStateStore, ObjectStore, ObjectWriter,
    SequenceReader, TokenStore, TrackingReader, UploadReader, WebhookRegistry,
};

use crate::config::Settings;
use crate::problem::Problem;
use crate::validate;

type Result<T, E = Problem> = std::result::Result<T, E>;

/// `GET` — the caller's sequences; `POST` — announce a sequence, get presigned upload URLs.
pub const ROUTE_SEQUENCES: &str = "/v1/sequences";
/// `GET` — one sequence; `DELETE` — remove its objects and records.
pub const ROUTE_SEQUENCE: &str = "/v1/sequences/{sequence_id}";
/// `POST` — the announced files are uploaded: write the manifest.
pub const ROUTE_SEQUENCE_COMPLETE: &str = "/v1/sequences/{sequence_id}/complete";
/// `POST` — fresh upload URLs for the announced files not uploaded yet.
pub const ROUTE_SEQUENCE_UPLOADS: &str = "/v1/sequences/{sequence_id}/uploads";
/// `POST` — write the manifest again so that failed uploads run again.
pub const ROUTE_SEQUENCE_RETRY: &str = "/v1/sequences/{sequence_id}/retry";
/// `GET` — one sequence's images.
pub const ROUTE_SEQUENCE_IMAGES: &str = "/v1/sequences/{sequence_id}/images";
/// `POST` — start a Mapillary connection.
pub const ROUTE_CONNECT: &str = "/v1/mapillary/connect";
/// `GET` — Mapillary's redirect back (no JWT).
pub const ROUTE_CALLBACK: &str = "/v1/mapillary/callback";
/// `GET`, `PUT` (hand over an upload token), `DELETE` — the caller's connection.
pub const ROUTE_CONNECTION: &str = "/v1/mapillary/connection";

/// `PUT` (register, the secret answered once), `GET`, `DELETE` — the caller's webhook.
pub const ROUTE_WEBHOOK: &str = "/v1/webhook";

/// Every (method, route template) the router serves; `openapi.yaml` documents exactly these.
pub const ROUTES: [(&str, &str); 16] = [
    ("GET", ROUTE_SEQUENCES),
    ("POST", ROUTE_SEQUENCES),
    ("GET", ROUTE_SEQUENCE),
    ("DELETE", ROUTE_SEQUENCE),
    ("POST", ROUTE_SEQUENCE_UPLOADS),
    ("POST", ROUTE_SEQUENCE_COMPLETE),
    ("POST", ROUTE_SEQUENCE_RETRY),
    ("GET", ROUTE_SEQUENCE_IMAGES),
    ("POST", ROUTE_CONNECT),
    ("GET", ROUTE_CALLBACK),
    ("GET", ROUTE_CONNECTION),
    ("PUT", ROUTE_CONNECTION),
    ("DELETE", ROUTE_CONNECTION),
    ("PUT", ROUTE_WEBHOOK),
    ("GET", ROUTE_WEBHOOK),
    ("DELETE", ROUTE_WEBHOOK),
];

/// What the handlers use.
pub trait Deps: Send + Sync + 'static {
    /// Sequences, uploads and image entries (read; written only for sequences dropped through the
    /// API: announcement, state, deletion).
    type Repo: SequenceReader + UploadReader + ImageEntryReader + DropStore + 'static;
    /// The poller's tracking records, image links and feed health (read only).
    type Tracking: TrackingReader + 'static;
    /// Users' Mapillary tokens (saved and deleted here; shown from their clear metadata only) and
    /// webhook registrations.
    type Tokens: TokenStore + ConnectionReader + AccountClaims + WebhookRegistry + 'static;
    /// OAuth `state` values.
    type States: OAuthStateStore + 'static;
    /// The sequences bucket (presigned uploads, the manifest, deletion).
    type Objects: ObjectStore + ObjectWriter + 'static;
    /// Sequences and uploads.
    fn repo(&self) -> &Self::Repo;
    /// Tracking records.
    fn tracking(&self) -> &Self::Tracking;
    /// Token store.
    fn tokens(&self) -> &Self::Tokens;
    /// OAuth states.
    fn states(&self) -> &Self::States;
    /// The sequences bucket.
    fn objects(&self) -> &Self::Objects;
    /// Mapillary OAuth.
    fn mapillary(&self) -> &MapillaryApp;
    /// Settings.
    fn settings(&self) -> &Settings;
}

/// The production composition (and the tests' with fakes).
#[derive(Debug)]
pub struct AppDeps<R, T, K, S, O> {
    /// Sequences and uploads.
    pub repo: R,
    /// Tracking records.
    pub tracking: T,
    /// Token store.
    pub tokens: K,
    /// OAuth states.
    pub states: S,
    /// The sequences bucket.
    pub objects: O,
    /// Mapillary OAuth.
    pub mapillary: MapillaryApp,
    /// Settings.
    pub settings: Settings,
}

impl<R, T, K, S, O> Deps for AppDeps<R, T, K, S, O>
where
    R: SequenceReader + UploadReader + ImageEntryReader + DropStore + 'static,
    T: TrackingReader + 'static,
    K: TokenStore + ConnectionReader + AccountClaims + WebhookRegistry + 'static,
    S: OAuthStateStore + 'static,
    O: ObjectStore + ObjectWriter + 'static,
{
    type Repo = R;
    type Tracking = T;
    type Tokens = K;
    type States = S;
    type Objects = O;
    fn repo(&self) -> &R {
        &self.repo
    }
    fn tracking(&self) -> &T {
        &self.tracking
    }
    fn tokens(&self) -> &K {
        &self.tokens
    }
    fn states(&self) -> &S {
        &self.states
    }
    fn objects(&self) -> &O {
        &self.objects
    }
    fn mapillary(&self) -> &MapillaryApp {
        &self.mapillary
    }
    fn settings(&self) -> &Settings {
        &self.settings
    }
}

pub(crate) fn json_no_store<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub(crate) fn sequence_path(
    path: std::result::Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<String> {
    let Path(raw) = path.map_err(|_| Problem::invalid_parameter("sequence_id is not valid UTF-8"))?;
    validate::sequence_id(&raw)?;
    Ok(raw)
}

pub(crate) fn sequence_not_found(id: &str) -> Problem {
    Problem::not_found(format!("you have no sequence {id:?}"))
}

/// Query parameters as (name, value) pairs.
pub(crate) type Query = Vec<(String, String)>;

/// A `{sequence_id}` path segment as axum extracts it.
pub(crate) type PathArg = std::result::Result<Path<String>, axum::extract::rejection::PathRejection>;

/// What a route on one sequence reads first, in this order: the caller (401), the sequence id of
/// the path (400), the query parameters, of which only `allowed` are accepted (400).
pub(crate) fn sequence_call<D: Deps>(
    d: &D,
    path: PathArg,
    parts: &Parts,
    allowed: &[&str],
) -> Result<(String, String, Query)> {
    let user = crate::identity::require(parts, d.settings().dev_auth_header.as_ref())?;
    let id = sequence_path(path)?;
    let q = validate::query_pairs(parts.uri.query(), allowed)?;
    Ok((user, id, q))
}

/// The caller's sequence `id` (another user's sequence is simply not found: 404).
pub(crate) async fn owned_sequence<D: Deps>(d: &D, user: &str, id: &str) -> Result<SequenceRecord> {
    d.repo()
        .get_sequence(user, id)
        .await?
        .ok_or_else(|| sequence_not_found(id))
}

/// Refuses a body that is not declared `application/json` (415).
pub(crate) fn require_json(parts: &Parts) -> Result<()> {
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
            "Send Content-Type: application/json with the body described in the OpenAPI document.",
        ))
    }
}

/// The JSON body as `T`; otherwise 400 naming the expected `shape` and only the kind and place of
/// the error (serde_json's messages may quote the input, which can hold a secret).
pub(crate) fn json_object<T: serde::de::DeserializeOwned>(body: &[u8], shape: &str) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        Problem::invalid_parameter(format!(
            "the body must be the JSON object {shape} ({:?} error at column {})",
            e.classify(),
            e.column()
        ))
    })
}

/// The caller of a route that takes a JSON body and no query parameters: identity (401), no query
/// (400), `application/json` (415).
pub(crate) fn json_caller(parts: &Parts, settings: &Settings) -> Result<String> {
    let user = crate::identity::require(parts, settings.dev_auth_header.as_ref())?;
    validate::query_pairs(parts.uri.query(), &[])?;
    require_json(parts)?;
    Ok(user)
}
