//! Pieces of replies that several route modules share.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::problem::Problem;

pub(crate) fn json_no_store<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub(crate) fn sequence_not_found(id: &str) -> Problem {
    Problem::not_found(format!("you have no sequence {id:?}"))
}
