//! `PUT`, `GET`, `DELETE /v1/webhook`: the caller's webhook (issue 14, item 2).
//!
//! `PUT {url}` checks the URL against the SSRF policy (`https` only and every resolved address public;
//! `RELAY_WEBHOOK_ALLOW_LOCAL=true` also admits loopback, over `http` too), stores it with a fresh
//! secret (KMS-encrypted, as the tokens) and answers the secret **once**: `GET` shows the URL and the
//! delivery state (enabled, why disabled, the last failures), never the secret. A `PUT` replaces any
//! earlier registration (a new secret, enabled again, failures forgotten; deliveries already queued
//! go to the new URL). The poller delivers (`poller::webhooks`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use shared::adapters::webhook_http::resolve_checked;
use shared::ports::WebhookRegistry;
use shared::webhook::{
    new_secret, DeliveryFailure, WebhookRecord, WebhookUrlError, EVENT_ID_HEADER, SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
};
use time::OffsetDateTime;
use tracing::info;

use crate::base::{json_caller, json_no_store, json_object, Deps};
use crate::identity;
use crate::problem::Problem;
use crate::validate;

type Result<T, E = Problem> = std::result::Result<T, E>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    url: String,
}

/// How deliveries are signed (in every answer, so a receiver can be written from it).
#[derive(Debug, Serialize)]
struct Signing {
    algorithm: &'static str,
    signed_text: &'static str,
    signature_header: &'static str,
    timestamp_header: &'static str,
    event_id_header: &'static str,
}

const SIGNING: Signing = Signing {
    algorithm: "HMAC-SHA256, hex, prefixed v1=",
    signed_text: "<timestamp>.<raw body>",
    signature_header: SIGNATURE_HEADER,
    timestamp_header: TIMESTAMP_HEADER,
    event_id_header: EVENT_ID_HEADER,
};

/// `GET /v1/webhook` (and `PUT`'s answer, which adds the secret).
#[derive(Debug, Serialize)]
struct WebhookView<'a> {
    url: &'a str,
    enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    created_at: String,
    disabled_reason: Option<&'a str>,
    disabled_at: Option<String>,
    consecutive_failures: u32,
    next_attempt_at: Option<String>,
    last_success_at: Option<String>,
    last_failures: Vec<FailureView<'a>>,
    signing: Signing,
}

#[derive(Debug, Serialize)]
struct FailureView<'a> {
    at: String,
    event_id: &'a str,
    error: &'a str,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn view(r: &WebhookRecord, secret: Option<String>) -> WebhookView<'_> {
    WebhookView {
        url: &r.url,
        enabled: r.enabled,
        secret,
        created_at: rfc3339(r.created_at),
        disabled_reason: r.disabled_reason.as_deref(),
        disabled_at: r.disabled_at.map(rfc3339),
        consecutive_failures: r.consecutive_failures,
        next_attempt_at: r.next_attempt_at.filter(|_| r.enabled).map(rfc3339),
        last_success_at: r.last_success_at.map(rfc3339),
        last_failures: r
            .last_failures
            .iter()
            .map(|f: &DeliveryFailure| FailureView {
                at: rfc3339(f.at),
                event_id: &f.event_id,
                error: &f.error,
            })
            .collect(),
        signing: SIGNING,
    }
}

fn refused(e: &WebhookUrlError) -> Problem {
    let why = match e {
        WebhookUrlError::Forbidden(_) => "it names or resolves to a non-public address".to_string(),
        other => other.to_string(),
    };
    Problem::new(
        StatusCode::BAD_REQUEST,
        "webhook-url-refused",
        "Webhook URL refused",
        format!(
            "{why}. A webhook must be an https URL whose host resolves only to public addresses \
             (not loopback, link-local, private or unique-local ones)."
        ),
    )
}

/// `PUT /v1/webhook`.
pub(crate) async fn put_webhook<D: Deps>(
    State(d): State<Arc<D>>,
    parts: Parts,
    body: axum::body::Bytes,
) -> Result<Response> {
    let user = json_caller(&parts, d.settings())?;
    let parsed: PutBody = json_object(&body, r#"{"url": "https://…"}"#)?;
    let allow_local = d.settings().webhook_allow_local;
    let (url, _) = resolve_checked(parsed.url.trim(), allow_local)
        .await
        .map_err(|e| refused(&e))?;
    let existed = d.tokens().get_webhook(&user).await?.is_some();
    let record = WebhookRecord::new(&user, url.as_str(), OffsetDateTime::now_utc());
    let secret = new_secret();
    d.tokens().put_webhook(&record, &secret).await?;
    info!(user = %user, replaced = existed, "webhook registered");
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(json_no_store(
        status,
        &view(&record, Some(secret.expose_secret().to_string())),
    ))
}

/// `GET /v1/webhook`.
pub(crate) async fn get_webhook<D: Deps>(State(d): State<Arc<D>>, parts: Parts) -> Result<Response> {
    let user = identity::require(&parts, d.settings().dev_auth_header.as_ref())?;
    validate::query_pairs(parts.uri.query(), &[])?;
    match d.tokens().get_webhook(&user).await? {
        Some(r) => Ok(json_no_store(StatusCode::OK, &view(&r, None))),
        None => Err(Problem::not_found(
            "you have no webhook; register one with PUT /v1/webhook",
        )),
    }
}

/// `DELETE /v1/webhook`.
pub(crate) async fn delete_webhook<D: Deps>(State(d): State<Arc<D>>, parts: Parts) -> Result<Response> {
    let user = identity::require(&parts, d.settings().dev_auth_header.as_ref())?;
    validate::query_pairs(parts.uri.query(), &[])?;
    if d.tokens().delete_webhook(&user).await? {
        info!(user = %user, "webhook deleted");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(Problem::not_found("you have no webhook"))
    }
}
