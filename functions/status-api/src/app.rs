//! The router and its handlers, generic over the ports ([`Deps`]).
//!
//! Every handler: caller identity first (401), then input validation (400), then data access
//! scoped by the caller's user id (another user's sequence is simply not found: 404). Errors are
//! [`Problem`]s. Request logs carry method, route template, status and latency — never the query
//! string (the OAuth callback's `code` and `state` are secrets) nor any body.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use lambda_http::request::RequestContext;
use shared::mapillary::error::MapillaryError;
use shared::mapillary::replies::token_expiry;
use shared::model::{ConnectOutcome, StoredToken, TokenKind, TokenRecord};
use shared::ports::{
    AccountClaims, ConnectionReader, ImageEntryReader, OAuthState, OAuthStateStore, SequenceReader,
    StateOutcome, TokenError, TokenStore, TrackingReader, UploadReader,
};
use time::OffsetDateTime;
use tracing::{info, info_span, warn, Instrument};

use crate::base::{json_caller, json_no_store, json_object, owned_sequence, sequence_call, PathArg};
pub use crate::base::{
    AppDeps, Deps, ROUTES, ROUTE_CALLBACK, ROUTE_CONNECT, ROUTE_CONNECTION, ROUTE_SEQUENCE, ROUTE_SEQUENCES,
    ROUTE_SEQUENCE_COMPLETE, ROUTE_SEQUENCE_IMAGES, ROUTE_SEQUENCE_RETRY, ROUTE_SEQUENCE_UPLOADS,
    ROUTE_WEBHOOK,
};
use crate::config::Settings;
use crate::drops;
use crate::identity;
use crate::oauth;
use crate::problem::Problem;
use crate::validate;
use crate::views;
use crate::webhooks;

/// The API. Serve it with `lambda_http::run(router(deps))`.
pub fn router<D: Deps>(deps: Arc<D>) -> Router {
    Router::new()
        .route(
            ROUTE_SEQUENCES,
            get(list_sequences::<D>).post(drops::announce::<D>),
        )
        .route(
            ROUTE_SEQUENCE,
            get(get_sequence::<D>).delete(drops::delete_sequence::<D>),
        )
        .route(ROUTE_SEQUENCE_UPLOADS, post(drops::uploads_again::<D>))
        .route(ROUTE_SEQUENCE_COMPLETE, post(drops::complete::<D>))
        .route(ROUTE_SEQUENCE_RETRY, post(drops::retry::<D>))
        .route(ROUTE_SEQUENCE_IMAGES, get(get_images::<D>))
        .route(ROUTE_CONNECT, post(connect::<D>))
        .route(ROUTE_CALLBACK, get(callback::<D>))
        .route(
            ROUTE_CONNECTION,
            get(get_connection::<D>)
                .put(put_connection::<D>)
                .delete(delete_connection::<D>),
        )
        .route(
            ROUTE_WEBHOOK,
            get(webhooks::get_webhook::<D>)
                .put(webhooks::put_webhook::<D>)
                .delete(webhooks::delete_webhook::<D>),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(log_request))
        .with_state(deps)
}

type Result<T, E = Problem> = std::result::Result<T, E>;

async fn log_request(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "<unmatched>".into());
    let request_id = match req.extensions().get::<RequestContext>() {
        Some(RequestContext::ApiGatewayV2(ctx)) => ctx.request_id.clone(),
        _ => None,
    };
    let span = info_span!("request", method = %req.method(), route = %route, request_id = request_id.as_deref().unwrap_or("-"));
    async move {
        let start = Instant::now();
        let resp = next.run(req).await;
        info!(
            status = resp.status().as_u16(),
            latency_us = start.elapsed().as_micros() as u64,
            "handled"
        );
        resp
    }
    .instrument(span)
    .await
}

async fn no_route() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "no-such-route",
        "No such route",
        "This API has no route at this path; see the OpenAPI document.",
    )
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "This route does not accept this HTTP method; see the OpenAPI document.",
    )
}

// ------------------------------------------------------------------ sequences

/// The text inside a cursor this API issued (base64url of it), or `bad()`.
fn cursor_text(raw: &str, bad: impl Fn() -> Problem) -> Result<String> {
    if raw.is_empty() || raw.len() > validate::MAX_CURSOR_LEN {
        return Err(bad());
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw)
        .map_err(|_| bad())?;
    String::from_utf8(bytes).map_err(|_| bad())
}

/// Shape of the gsi1 sort key inside a cursor: `SEQ#YYYY-MM-DDTHH:MM:SS.ffffffZ#<sequence_id>`.
fn decode_cursor(raw: &str) -> Result<String> {
    let bad = || Problem::invalid_parameter("cursor is not a value this API returned as next_cursor");
    let sk = cursor_text(raw, bad)?;
    let rest = sk.strip_prefix("SEQ#").ok_or_else(bad)?;
    let (stamp, sequence_id) = rest.split_once('#').ok_or_else(bad)?;
    let stamp_ok = stamp.len() == 27
        && stamp.ends_with('Z')
        && stamp
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'T' | b':' | b'.' | b'Z'));
    if !stamp_ok || !validate::is_valid_id(sequence_id) {
        return Err(bad());
    }
    Ok(sk)
}

fn encode_cursor(sk: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sk.as_bytes())
}

/// Largest position a page cursor may name (far past any sequence the caps allow).
const MAX_PAGE_POSITION: usize = 100_000_000;

/// A cursor of a sequence's image list (`kind` `I`) or rejected list (`R`): the position of the
/// next entry, opaque to clients.
fn encode_position_cursor(kind: char, position: usize) -> String {
    encode_cursor(&format!("{kind}{position}"))
}

/// [`encode_position_cursor`]'s position, for a cursor of `kind`.
fn decode_position_cursor(kind: char, raw: &str) -> Result<usize> {
    let bad = || Problem::invalid_parameter("cursor is not a value this API returned as a next cursor");
    let text = cursor_text(raw, bad)?;
    let digits = text.strip_prefix(kind).ok_or_else(bad)?;
    if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    digits
        .parse::<usize>()
        .ok()
        .filter(|p| *p <= MAX_PAGE_POSITION)
        .ok_or_else(bad)
}

/// A page of a positional list: (first position, page size) from the `[limit, cursor]` parameters,
/// cursors of kind `kind`.
fn position_page(
    q: &[(String, String)],
    [limit_key, cursor_key]: [&str; 2],
    kind: char,
) -> Result<(usize, usize)> {
    let limit = validate::page_limit(limit_key, validate::get(q, limit_key))? as usize;
    let start = validate::get(q, cursor_key)
        .map(|c| decode_position_cursor(kind, c))
        .transpose()?
        .unwrap_or(0);
    Ok((start, limit))
}

async fn list_sequences<D: Deps>(State(d): State<Arc<D>>, parts: Parts) -> Result<Response> {
    let user = identity::require(&parts, d.settings().dev_auth_header.as_ref())?;
    let q = validate::query_pairs(parts.uri.query(), &["limit", "cursor"])?;
    let limit = validate::limit(validate::get(&q, "limit"))?;
    let after = validate::get(&q, "cursor").map(decode_cursor).transpose()?;
    let mut page = d.repo().list_sequences(&user, limit, after.as_deref()).await?;
    let (ttl, now) = (d.settings().drops.announce_ttl, OffsetDateTime::now_utc());
    for s in &mut page.sequences {
        drops::settle_expired(s, ttl, now);
    }
    let body = views::SequenceList {
        sequences: page.sequences.iter().map(views::SequenceSummary::from).collect(),
        next_cursor: page.next.as_deref().map(encode_cursor),
    };
    Ok(json_no_store(StatusCode::OK, &body))
}

async fn get_sequence<D: Deps>(State(d): State<Arc<D>>, path: PathArg, parts: Parts) -> Result<Response> {
    let (user, id, q) = sequence_call(&*d, path, &parts, &["rejected_limit", "rejected_cursor"])?;
    let (start, limit) = position_page(&q, ["rejected_limit", "rejected_cursor"], 'R')?;
    let mut seq = owned_sequence(&*d, &user, &id).await?;
    drops::settle_expired(
        &mut seq,
        d.settings().drops.announce_ttl,
        OffsetDateTime::now_utc(),
    );
    let uploads = d.repo().list_uploads(&user, &id).await?;
    let mut views_ = Vec::with_capacity(uploads.len());
    for u in &uploads {
        // Tracking items are keyed by upload id; the owner check is defence in depth.
        let tracking = d
            .tracking()
            .get_tracking(&u.upload_id)
            .await?
            .filter(|t| t.user_id == user);
        let links = match &tracking {
            Some(_) => d.tracking().list_links(&u.upload_id).await?,
            None => Vec::new(),
        };
        views_.push(views::upload_view(
            u,
            tracking.as_ref().map(|t| (t, links.as_slice())),
        ));
    }
    let feed = d.tracking().get_feed_health().await?;
    let page = views::Page {
        start,
        limit,
        next: |p| encode_position_cursor('R', p),
    };
    let body = views::sequence_detail(&seq, views_, feed.as_ref(), page);
    Ok(json_no_store(StatusCode::OK, &body))
}

async fn get_images<D: Deps>(State(d): State<Arc<D>>, path: PathArg, parts: Parts) -> Result<Response> {
    let (user, id, q) = sequence_call(&*d, path, &parts, &["limit", "cursor"])?;
    let (start, limit) = position_page(&q, ["limit", "cursor"], 'I')?;
    let seq = owned_sequence(&*d, &user, &id).await?;
    // The list is every upload's images in upload order, then the rejected images. A page reads
    // only the uploads it shows: whole uploads before it are skipped by their image count.
    let mut images = Vec::new();
    let mut position = 0usize;
    for u in d.repo().list_uploads(&user, &id).await? {
        let count = u.image_count as usize;
        let end = position + count;
        if end <= start {
            position = end;
            continue;
        }
        if images.len() >= limit {
            position = end;
            continue;
        }
        let ours = d.repo().list_images(&u.upload_id).await?;
        // Tracking items are keyed by upload id; the owner check is defence in depth.
        let owned = d
            .tracking()
            .get_tracking(&u.upload_id)
            .await?
            .is_some_and(|t| t.user_id == user);
        let links = if owned {
            d.tracking().list_links(&u.upload_id).await?
        } else {
            Vec::new()
        };
        let skip = start.saturating_sub(position);
        let room = limit - images.len();
        images.extend(
            views::uploaded_images(&ours, &links)
                .into_iter()
                .take(count)
                .skip(skip)
                .take(room),
        );
        position = end;
    }
    let rejected = views::rejected_images(&seq);
    let skip = start.saturating_sub(position);
    let room = limit - images.len();
    let total = position + rejected.len();
    images.extend(rejected.into_iter().skip(skip).take(room));
    let next = start + limit;
    let body = views::ImageList {
        sequence_id: seq.sequence_id.clone(),
        images,
        next_cursor: (next < total).then(|| encode_position_cursor('I', next)),
    };
    Ok(json_no_store(StatusCode::OK, &body))
}

// ------------------------------------------------------------------ Mapillary connection

/// The callback URL registered with the Mapillary app: configured, or derived from the host the
/// API was called on (API Gateway's domain name; loopback hosts stay plain http for local runs).
fn redirect_uri(settings: &Settings, parts: &Parts) -> Result<String> {
    if let Some(uri) = &settings.redirect_uri {
        return Ok(uri.clone());
    }
    let from_context = match parts.extensions.get::<RequestContext>() {
        Some(RequestContext::ApiGatewayV2(ctx)) => ctx.domain_name.clone(),
        _ => None,
    };
    let host = from_context
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 253
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
        })
        .ok_or_else(|| {
            warn!("no RELAY_OAUTH_REDIRECT_URI and no usable host to derive the callback URL from");
            Problem::internal()
        })?;
    let loopback = host.starts_with("127.0.0.1") || host.starts_with("localhost");
    let scheme = if loopback { "http" } else { "https" };
    Ok(format!("{scheme}://{host}{ROUTE_CALLBACK}"))
}

async fn connect<D: Deps>(State(d): State<Arc<D>>, parts: Parts) -> Result<Response> {
    let settings = d.settings();
    let user = identity::require(&parts, settings.dev_auth_header.as_ref())?;
    validate::query_pairs(parts.uri.query(), &[])?;
    let redirect = redirect_uri(settings, &parts)?;
    let now = OffsetDateTime::now_utc();
    let ttl = time::Duration::try_from(settings.state_ttl).unwrap_or(time::Duration::minutes(10));
    // The browser-binding secret: only its hash is stored; the browser gets it as a cookie the
    // callback must present.
    let verifier = oauth::new_verifier();
    let state = OAuthState {
        state: oauth::new_state(),
        user_id: user.clone(),
        created_at: now,
        expires_at: now + ttl,
        verifier_sha256: oauth::verifier_sha256(&verifier),
    };
    let url = d
        .mapillary()
        .authorize_url(&redirect, &state.state, Some(&settings.scope))
        .map_err(|e| {
            tracing::error!(error = %e, "building the authorize URL");
            Problem::internal()
        })?;
    d.states().create(&state).await?;
    info!(user = %user, "Mapillary connection started");
    let body = views::ConnectStart {
        authorize_url: url,
        expires_at: state
            .expires_at
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|_| Problem::internal())?,
    };
    let mut resp = json_no_store(StatusCode::OK, &body);
    let max_age = std::time::Duration::try_from(ttl).unwrap_or(settings.state_ttl);
    let cookie =
        HeaderValue::from_str(&oauth::set_cookie(&verifier, max_age)).map_err(|_| Problem::internal())?;
    resp.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(resp)
}

/// Refuses a callback whose browser does not hold the verifier cookie of the connection attempt
/// (the state is already used up, so a forwarded link is dead after one try).
fn check_verifier(parts: &Parts, user: &str, expected: Option<&str>) -> Result<()> {
    let Some(presented) = oauth::verifier_of(&parts.headers) else {
        info!(user = %user, "callback without the connection cookie refused");
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "verifier-missing",
            "Connection attempt not started in this browser",
            "This browser did not start this connection attempt (its connection cookie is missing);              start again with POST /v1/mapillary/connect in the browser that opens the consent page.",
        ));
    };
    match expected {
        Some(hash) if oauth::verifier_matches(presented, hash) => Ok(()),
        _ => {
            info!(user = %user, "callback with another attempt's connection cookie refused");
            Err(Problem::new(
                StatusCode::FORBIDDEN,
                "verifier-mismatch",
                "Connection attempt of another browser",
                "This connection attempt was started in another browser or another attempt; start again                  with POST /v1/mapillary/connect in the browser that opens the consent page.",
            ))
        }
    }
}

/// `resp` with the verifier cookie removed (the callback has used it, whatever the outcome).
fn clearing_cookie(mut resp: Response) -> Response {
    if let Ok(v) = HeaderValue::from_str(&oauth::clear_cookie()) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

/// Only a short token-free word of Mapillary's `error` parameter is echoed.
fn consent_error_word(raw: &str) -> Option<&str> {
    Some(raw)
        .filter(|e| (1..=64).contains(&e.len()) && e.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
}

async fn callback<D: Deps>(State(d): State<Arc<D>>, parts: Parts) -> Response {
    let resp = match callback_inner(d, parts).await {
        Ok(resp) => resp,
        Err(problem) => problem.into_response(),
    };
    clearing_cookie(resp)
}

async fn callback_inner<D: Deps>(d: Arc<D>, parts: Parts) -> Result<Response> {
    let settings = d.settings();
    let q = validate::query_pairs(
        parts.uri.query(),
        &["code", "state", "error", "error_description", "error_reason"],
    )?;
    let state = validate::get(&q, "state")
        .ok_or_else(|| Problem::invalid_parameter("state is required"))
        .and_then(validate::state)?;
    let consent_error = validate::get(&q, "error");
    let code = match (validate::get(&q, "code"), consent_error) {
        (Some(code), None) => Some(validate::code(code)?),
        (None, Some(_)) => None,
        (Some(_), Some(_)) => {
            return Err(Problem::invalid_parameter(
                "code and error cannot both be present",
            ))
        }
        (None, None) => return Err(Problem::invalid_parameter("code is required")),
    };
    // A JWT (or the dev header) is optional here; when present, the state must be the caller's.
    let presenter = identity::caller(&parts, settings.dev_auth_header.as_ref())?;
    let now = OffsetDateTime::now_utc();
    let (user, verifier_sha256) = match d.states().consume(state, presenter.as_deref(), now).await? {
        StateOutcome::Consumed {
            user_id,
            verifier_sha256,
        } => (user_id, verifier_sha256),
        StateOutcome::Expired => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "state-expired",
                "Connection attempt expired",
                "This connection attempt expired; start again with POST /v1/mapillary/connect.",
            ))
        }
        StateOutcome::Unknown => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "state-invalid",
                "Unknown or used connection attempt",
                "This state was never issued or has already been used; start again with POST /v1/mapillary/connect.",
            ))
        }
        StateOutcome::Foreign => {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "state-foreign",
                "Connection attempt of another user",
                "This connection attempt was started by another user.",
            ))
        }
    };
    // Before anything is exchanged or stored: the browser must be the one that started it.
    check_verifier(&parts, &user, verifier_sha256.as_deref())?;
    let Some(code) = code else {
        let word = consent_error.and_then(consent_error_word).unwrap_or("unknown");
        info!(user = %user, error = word, "Mapillary consent not granted");
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "consent-denied",
            "Mapillary did not grant access",
            format!("Mapillary returned error {word:?} instead of an authorization code."),
        ));
    };
    let redirect = redirect_uri(settings, &parts)?;
    let grant = d
        .mapillary()
        .exchange_code(code, Some(&redirect))
        .await
        .map_err(|e| {
            // MapillaryError messages never contain tokens, secrets or the code.
            warn!(user = %user, error = %e, "code exchange failed");
            // A reply we cannot use (e.g. an absurd `expires_in`) is Mapillary's fault, not the code's.
            if e.is_retriable() || matches!(e, MapillaryError::BadReply { .. }) {
                mapillary_unavailable("start again with POST /v1/mapillary/connect")
            } else {
                Problem::new(
                StatusCode::BAD_REQUEST,
                "code-rejected",
                "Authorization code rejected",
                "Mapillary rejected the authorization code (invalid, expired or already used); start again \
                 with POST /v1/mapillary/connect.",
            )
            }
        })?;
    let me = d.mapillary().me(&grant.access_token).await.map_err(|e| {
        warn!(user = %user, error = %e, "/me with the new token failed");
        mapillary_unavailable("start again with POST /v1/mapillary/connect")
    })?;
    // The client refuses absurd lifetimes already; the checked helper keeps `now + expires_in` from
    // ever panicking here (release builds abort on panic).
    let expires_at = token_expiry(now, grant.expires_in).map_err(|e| {
        warn!(user = %user, error = %e, "Mapillary granted a token with an unusable lifetime");
        mapillary_unavailable("start again with POST /v1/mapillary/connect")
    })?;
    let token = StoredToken {
        access_token: grant.access_token,
        refresh_token: grant.refresh_token,
        expires_at,
        mapillary_user_id: Some(me.id),
        username: Some(me.username),
        updated_at: now,
    };
    let mut record = TokenRecord::new(token, TokenKind::Oauth);
    record.revision = Some(store_connection(&*d, &user, &record).await?);
    info!(user = %user, token_kind = "oauth", mapillary_user = record.token.mapillary_user_id.as_deref().unwrap_or("-"), "Mapillary account connected");
    match &settings.success_url {
        Some(url) => {
            let mut resp = StatusCode::SEE_OTHER.into_response();
            let location = HeaderValue::from_str(url).map_err(|_| Problem::internal())?;
            resp.headers_mut().insert(header::LOCATION, location);
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(resp)
        }
        None => Ok(json_no_store(
            StatusCode::OK,
            &views::Connection::of(&record.metadata(), now),
        )),
    }
}

/// Store `record` as `user`'s connection (returns its revision): together with the claim of its
/// Mapillary account, so that one account is connected to at most one relay user, unless the
/// operator allows shared accounts. Another user's claim → 409 `mapillary-account-taken`, nothing
/// stored, nothing said about the other user.
async fn store_connection<D: Deps>(d: &D, user: &str, record: &TokenRecord) -> Result<String> {
    let claim = !d.settings().allow_shared_accounts;
    match d.tokens().put_connection(user, record, claim).await? {
        ConnectOutcome::Connected(revision) => Ok(revision),
        ConnectOutcome::AccountTaken => {
            info!(user = %user, "Mapillary account connected to another relay user: connection refused");
            Err(Problem::new(
                StatusCode::CONFLICT,
                "mapillary-account-taken",
                "Mapillary account already connected",
                "This Mapillary account is connected to another user of this relay; a Mapillary account can \
                 be connected to one user only. Disconnect it there first (DELETE /v1/mapillary/connection), \
                 or connect another Mapillary account.",
            ))
        }
    }
}

/// 502, retry in 5 s; `next` says what to do then.
fn mapillary_unavailable(next: &str) -> Problem {
    Problem {
        retry_after: Some(5),
        ..Problem::new(
            StatusCode::BAD_GATEWAY,
            "mapillary-unavailable",
            "Mapillary unavailable",
            format!("Mapillary did not answer as expected; {next} in a moment."),
        )
    }
}

async fn get_connection<D: Deps>(State(d): State<Arc<D>>, parts: Parts) -> Result<Response> {
    let user = identity::require(&parts, d.settings().dev_auth_header.as_ref())?;
    validate::query_pairs(parts.uri.query(), &[])?;
    // The clear metadata beside the ciphertext: showing a connection never decrypts a token.
    let view = match d.tokens().load_connection(&user).await {
        Ok(None) => views::Connection::none(),
        Ok(Some(m)) => views::Connection::of(&m, OffsetDateTime::now_utc()),
        Err(TokenError::Corrupt(e)) => {
            warn!(user = %user, error = %e, "stored token unusable");
            views::Connection {
                connected: true,
                reconnect_required: true,
                ..views::Connection::none()
            }
        }
        Err(e) => return Err(e.into()),
    };
    Ok(json_no_store(StatusCode::OK, &view))
}

/// Body of `PUT /v1/mapillary/connection`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadTokenBody {
    /// The Mapillary user upload token (what `mapillary_tools authenticate` stores as
    /// `user_upload_token`). Never logged nor echoed.
    upload_token: String,
}

/// Hand over a Mapillary user upload token: checked with `/me`, then stored KMS-encrypted as the
/// caller's connection (kind `upload_token`), replacing any OAuth connection. Uploads waiting for an
/// upload token resume when their manifest is delivered again.
async fn put_connection<D: Deps>(
    State(d): State<Arc<D>>,
    parts: Parts,
    body: axum::body::Bytes,
) -> Result<Response> {
    let user = json_caller(&parts, d.settings())?;
    // Only the kind of a parse error is reported: the input is the token.
    let parsed: UploadTokenBody = json_object(&body, r#"{"upload_token": "…"}"#)?;
    let raw = validate::upload_token(&parsed.upload_token)?;
    let token = secrecy::SecretString::from(raw.to_string());
    drop(parsed);
    let me = d.mapillary().me(&token).await.map_err(|e| {
        warn!(user = %user, token_kind = "upload_token", error = %e, "/me with the handed-over upload token failed");
        if e.is_unauthorized() {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "upload-token-rejected",
                "Upload token rejected",
                "Mapillary did not accept this token (GET /me refused it): check that it is a current user \
                 upload token, e.g. the user_upload_token of `mapillary_tools authenticate`.",
            )
        } else {
            mapillary_unavailable("try again")
        }
    })?;
    let now = OffsetDateTime::now_utc();
    let mut record = TokenRecord::new(
        StoredToken {
            access_token: token,
            refresh_token: None,
            // Mapillary gives no lifetime for upload tokens; they are never refreshed.
            expires_at: None,
            mapillary_user_id: Some(me.id),
            username: Some(me.username),
            updated_at: now,
        },
        TokenKind::UploadToken,
    );
    record.revision = Some(store_connection(&*d, &user, &record).await?);
    info!(
        user = %user,
        token_kind = "upload_token",
        mapillary_user = record.token.mapillary_user_id.as_deref().unwrap_or("-"),
        "Mapillary upload token connected"
    );
    Ok(json_no_store(
        StatusCode::OK,
        &views::Connection::of(&record.metadata(), now),
    ))
}

async fn delete_connection<D: Deps>(State(d): State<Arc<D>>, parts: Parts) -> Result<Response> {
    let user = identity::require(&parts, d.settings().dev_auth_header.as_ref())?;
    validate::query_pairs(parts.uri.query(), &[])?;
    let existed = d.tokens().delete(&user).await?;
    info!(user = %user, existed, "Mapillary connection removed");
    Ok(StatusCode::NO_CONTENT.into_response())
}
