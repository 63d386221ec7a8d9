//! Reply builders for the wire error shapes of the protocol doc (§2.5, §8.2, §14.1).

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// A JSON reply with `Content-Type: application/json`.
pub fn json_reply(status: StatusCode, body: Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A 200 JSON reply.
pub fn ok(body: Value) -> Response {
    json_reply(StatusCode::OK, body)
}

fn fbtrace() -> &'static str {
    "AsimTraceId0000000000"
}

/// A graph-API error body (§8.2).
pub fn graph_error(
    status: StatusCode,
    code: i64,
    subcode: Option<i64>,
    kind: &str,
    message: &str,
) -> Response {
    let mut err = json!({"message": message, "type": kind, "code": code, "fbtrace_id": fbtrace()});
    if let Some(s) = subcode {
        err["error_subcode"] = json!(s);
    }
    if code == 190 {
        err["error_data"] = json!({});
    }
    json_reply(status, json!({ "error": err }))
}

/// 401 code 190 (missing, unknown, expired or revoked token).
pub fn graph_unauthorized(message: &str) -> Response {
    graph_error(StatusCode::UNAUTHORIZED, 190, None, "MLYApiException", message)
}

/// 400 code 100 subcode 33 (unknown object).
pub fn graph_not_found(id: &str) -> Response {
    graph_error(
        StatusCode::BAD_REQUEST,
        100,
        Some(33),
        "MLYApiException",
        &format!(
            "Unsupported get request. Object with ID '{id}' does not exist, cannot be loaded due to missing \
             permissions, or does not support this operation"
        ),
    )
}

/// 400 code 100 subcode 33 for a POST on an object the caller may not use (another user's upload handle,
/// an organization the caller is not a member of): the same §8.2 body as an unknown object, whose real
/// message already covers "cannot be loaded due to missing permissions".
pub fn graph_post_not_permitted(id: &str) -> Response {
    graph_error(
        StatusCode::BAD_REQUEST,
        100,
        Some(33),
        "MLYApiException",
        &format!(
            "Unsupported post request. Object with ID '{id}' does not exist, cannot be loaded due to missing \
             permissions, or does not support this operation"
        ),
    )
}

/// 400 code 100 (bad parameter).
pub fn graph_bad_request(message: &str) -> Response {
    graph_error(StatusCode::BAD_REQUEST, 100, None, "MLYApiException", message)
}

/// 403 code 4 (application request limit).
pub fn graph_rate_limited() -> Response {
    let body = json!({"error": {"message": "Application request limit reached", "type": "MLYApiException",
        "is_transient": true, "code": 4, "fbtrace_id": fbtrace()}});
    json_reply(StatusCode::FORBIDDEN, body)
}

/// rupload `debug_info` error body.
pub fn rupload_error(status: StatusCode, kind: &str, message: &str, retriable: Option<bool>) -> Response {
    let mut info = json!({"type": kind, "message": message});
    if let Some(r) = retriable {
        info["retriable"] = json!(r);
    }
    json_reply(status, json!({ "debug_info": info }))
}

/// rupload 401 `NotAuthorizedError`.
pub fn rupload_unauthorized(message: &str) -> Response {
    rupload_error(StatusCode::UNAUTHORIZED, "NotAuthorizedError", message, None)
}

/// rupload 412 `OffsetInvalidError`.
pub fn offset_invalid() -> Response {
    rupload_error(
        StatusCode::PRECONDITION_FAILED,
        "OffsetInvalidError",
        "Request starting offset is invalid",
        Some(true),
    )
}

/// A GraphQL-endpoint error (graph error shape; code 1 is the "reduce the amount of data" error).
pub fn graphql_error(status: StatusCode, code: i64, message: &str) -> Response {
    json_reply(
        status,
        json!({"error": {"code": code, "message": message, "type": "MLYApiException",
        "fbtrace_id": fbtrace()}}),
    )
}

/// The "reduce the amount of data" error of §6.3.
pub fn reduce_data() -> Response {
    json_reply(
        StatusCode::INTERNAL_SERVER_ERROR,
        json!({"error": {"code": 1, "message": "Please reduce the amount of data you're asking for, then retry your request"}}),
    )
}
