//! HTTP routes, one module per area.

use std::collections::HashMap;
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;

use crate::server::{edge, Sim};

mod admin;
mod entities;
mod finish;
pub use finish::codes as finish_codes;
mod graphql;
mod oauth;
mod rupload;
mod tiles;

/// The complete router (graph, rupload, www, tiles, admin) with the fault/log edge in front.
pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/graph/token", post(oauth::token))
        .route("/graph/login", post(oauth::login))
        .route("/graph/logging", post(oauth::logging))
        .route("/graph/me", get(entities::me))
        .route("/graph/finish_upload", post(finish::finish_upload))
        .route(
            "/graph/graphql",
            get(graphql::graphql_get).post(graphql::graphql_post),
        )
        .route("/graph/image_ids", get(entities::image_ids))
        .route("/graph/images", get(entities::images))
        .route("/graph/{id}", get(entities::object))
        .route("/rupload/{key}", get(rupload::offset).post(rupload::upload))
        .route("/www/connect", get(oauth::connect))
        .route("/tiles/maps/vtp/{tileset}/2/{z}/{x}/{y}", get(tiles::tile))
        .merge(admin::router())
        .layer(axum::middleware::from_fn_with_state(sim.clone(), edge))
        .with_state(sim)
}

/// Query string as a map (last value wins).
pub(crate) type Params = HashMap<String, String>;

/// The `fields` parameter as a list.
pub(crate) fn fields_of(params: &Params) -> Vec<String> {
    params
        .get("fields")
        .map(|f| {
            f.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// A JSON value as a string id (strings as-is, numbers printed).
pub(crate) fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Round to 7 decimals (the precision of uploaded coordinates).
pub(crate) fn round7(x: f64) -> f64 {
    (x * 1e7).round() / 1e7
}
