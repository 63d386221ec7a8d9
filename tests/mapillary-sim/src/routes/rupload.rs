//! rupload: `GET /rupload/{key}` (offset) and `POST /rupload/{key}` (append, resumable).

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use http_body_util::BodyExt;
use serde_json::json;
use tracing::{info, warn};

use crate::auth::check_rupload;
use crate::reply::{self, ok};
use crate::server::{LogSeq, Sim};

/// `GET /rupload/{key}` → `{"offset": n}` (0 for a new key).
pub async fn offset(State(sim): State<Arc<Sim>>, Path(key): Path<String>, req: Request) -> Response {
    {
        let w = sim.world();
        if let Err(r) = check_rupload(&w, req.headers(), req.uri().query(), sim.now_ms()) {
            return r;
        }
    }
    let offset = sim.store.get(&key).map(|s| s.len()).unwrap_or(0);
    sim.log_detail(
        req.extensions().get::<LogSeq>().copied(),
        json!({ "offset": offset }),
    );
    ok(json!({ "offset": offset }))
}

/// A malformed or missing upload header. The real reply is unknown (§13 item 4); the simulator uses
/// rupload's `debug_info` shape (§2.5) with `retriable: false`, so a client sending the wrong shape fails
/// at once instead of retrying it 200 times (mapillary_tools retries 4xx only when `retriable` is true).
fn header_error(message: &str) -> Response {
    reply::rupload_error(
        StatusCode::BAD_REQUEST,
        "InvalidHeaderError",
        message,
        Some(false),
    )
}

/// `POST /rupload/{key}` with `Offset` and `X-Entity-Name`; streams the body into storage.
pub async fn upload(State(sim): State<Arc<Sim>>, Path(key): Path<String>, req: Request) -> Response {
    let now = sim.now_ms();
    let (keep_prefix, require_offset, require_entity_name, uploader) = {
        let w = sim.world();
        let caller = match check_rupload(&w, req.headers(), req.uri().query(), now) {
            Ok(c) => c,
            Err(r) => return r,
        };
        let s = &w.settings;
        (
            s.keep_prefix_on_drop,
            s.rupload_require_offset,
            s.rupload_require_entity_name,
            caller.user_id().map(str::to_string),
        )
    };
    let log_seq = req.extensions().get::<LogSeq>().copied();
    let (parts, mut body) = req.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string())
    };
    let offset = match header("offset") {
        None if require_offset => {
            return header_error("Offset header is required: the byte offset this POST's body starts at")
        }
        None => 0,
        Some(v) => match v.parse::<u64>() {
            Ok(n) => n,
            Err(_) => return header_error("Offset header is not a non-negative integer"),
        },
    };
    let entity_name = header("x-entity-name");
    match &entity_name {
        None if require_entity_name => {
            return header_error("X-Entity-Name header is required and must equal the upload key")
        }
        Some(name) if name != &key => {
            if require_entity_name {
                return header_error("X-Entity-Name does not match the upload key in the URL");
            }
            warn!(%key, entity_name = %name, "X-Entity-Name differs from the upload key");
        }
        _ => {}
    }
    let session = sim.store.get_or_create(&key, now);
    session.note_post(entity_name, now);
    let mut writer = session.writer().await;
    let start = session.len();
    if offset != start {
        info!(%key, offset, stored = start, "offset mismatch");
        return reply::offset_invalid();
    }
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(e) = writer.append(data).await {
                        warn!(%key, error = %e, "storage append failed");
                        return reply::rupload_error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "StorageError",
                            "storage failed",
                            Some(true),
                        );
                    }
                }
            }
            Err(e) => {
                let got = session.len() - start;
                sim.log_detail(
                    log_seq,
                    json!({ "start": start, "bytes_received": got, "complete": false }),
                );
                info!(%key, received = got, keep_prefix, error = %e, "request body broke off");
                if !keep_prefix {
                    if let Err(e) = writer.truncate(start).await {
                        warn!(%key, error = %e, "rollback failed");
                    }
                }
                return reply::rupload_error(
                    StatusCode::BAD_REQUEST,
                    "BodyInterruptedError",
                    "request body ended early",
                    Some(true),
                );
            }
        }
    }
    drop(writer);
    sim.log_detail(
        log_seq,
        json!({ "start": start, "bytes_received": session.len() - start, "complete": true }),
    );
    let candidate = sim.world_raw().ids.token("SIMh", 40);
    let handle = sim
        .store
        .ensure_handle(&session, uploader.as_deref(), || candidate);
    info!(%key, bytes = session.len(), "upload POST complete");
    ok(json!({ "h": handle }))
}
