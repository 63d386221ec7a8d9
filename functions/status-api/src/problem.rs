//! Errors as `application/problem+json` (RFC 9457). A [`Problem`] is what the client sees; it
//! never carries internal error text (those are logged, without secrets, where they happen).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// One error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// `urn:mapillary-relay:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short, fixed summary of the problem type.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// What was wrong with this request, for a human.
    pub detail: String,
    /// Stable machine-readable code (the last part of `type`).
    pub code: String,
    /// Seconds to wait before retrying (with 503).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u32>,
}

impl Problem {
    /// A problem of `status` with stable `code`, `title` and a request-specific `detail`.
    pub fn new(status: StatusCode, code: &str, title: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("urn:mapillary-relay:problem:{code}"),
            title: title.into(),
            status: status.as_u16(),
            detail: detail.into(),
            code: code.into(),
            retry_after: None,
        }
    }

    /// 400 for a malformed path or query parameter.
    pub fn invalid_parameter(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid-parameter",
            "Invalid request parameter",
            detail,
        )
    }

    /// 401: no usable caller identity.
    pub fn unauthenticated(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "Authentication required",
            detail,
        )
    }

    /// 404 (also for other users' resources: their existence is not revealed).
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 500 with a fixed text (the cause is logged, not shown).
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "The request could not be completed because of an internal error; it has been logged.",
        )
    }

    /// 503: a dependency is throttling or briefly unavailable.
    pub fn unavailable() -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Temporarily unavailable",
                "A backing service is busy or briefly unavailable; retry shortly.",
            )
        }
    }

    /// The HTTP status.
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let retry_after = self.retry_after;
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut resp = (status, body).into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(s) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<shared::ports::RepoError> for Problem {
    fn from(e: shared::ports::RepoError) -> Self {
        // RepoError messages name tables and keys, never token material.
        if e.is_transient() {
            tracing::warn!(error = %e, "repository unavailable");
            Problem::unavailable()
        } else {
            tracing::error!(error = %e, "repository error");
            Problem::internal()
        }
    }
}

impl From<shared::ports::TokenError> for Problem {
    fn from(e: shared::ports::TokenError) -> Self {
        // TokenError messages never contain token material (port contract).
        if e.is_transient() {
            tracing::warn!(error = %e, "token store unavailable");
            Problem::unavailable()
        } else {
            tracing::error!(error = %e, "token store error");
            Problem::internal()
        }
    }
}
