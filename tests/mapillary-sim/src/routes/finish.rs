//! `POST /graph/finish_upload`: validate the uploaded content and create a cluster.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{json, Value};
use tracing::info;

use crate::auth::{check_graph, form_pairs, presented_token, Need};
use crate::content::{self, Rejected};
use crate::reply::{graph_bad_request, graph_not_found, ok};
use crate::server::Sim;
use crate::state::{Cluster, ClusterContent, ImageSource, PendingImage};
use crate::storage::StoredContent;

/// Error codes a cluster can fail with because of its content (documented in README.md).
pub mod codes {
    /// The zip could not be read as an archive, or it has no entries.
    pub const INVALID_ZIP: &str = "INVALID_ZIP";
    /// The bundle manifest is not the §3.2 JSON.
    pub const INVALID_MANIFEST: &str = "INVALID_MANIFEST";
    /// A manifest handle does not name a completed `.jpg` upload.
    pub const MANIFEST_HANDLE_INVALID: &str = "MANIFEST_HANDLE_INVALID";
    /// Every image was rejected (no usable position or capture time).
    pub const NO_VALID_IMAGES: &str = "NO_VALID_IMAGES";
    /// Video uploads are accepted but their processing is not emulated.
    pub const VIDEO_NOT_EMULATED: &str = "VIDEO_NOT_EMULATED";
    /// The stored upload could not be read back.
    pub const STORAGE_ERROR: &str = "STORAGE_ERROR";
}

const FILE_TYPES: [&str; 4] = [
    "zip",
    "mly_bundle_manifest",
    "mly_camm_video",
    "mly_blackvue_video",
];

fn invalid(code: &str, reason: impl Into<String>, rejected: Vec<Rejected>) -> ClusterContent {
    ClusterContent::Invalid {
        error_code: code.to_string(),
        reason: reason.into(),
        rejected,
    }
}

fn images_or_invalid(images: Vec<PendingImage>, rejected: Vec<Rejected>) -> ClusterContent {
    if images.is_empty() {
        invalid(
            codes::NO_VALID_IMAGES,
            "no image has a usable position and capture time",
            rejected,
        )
    } else {
        ClusterContent::Images { images, rejected }
    }
}

async fn read_content(sim: &Sim, key: &str, file_type: &str) -> ClusterContent {
    let Some(session) = sim.store.get(key) else {
        return invalid(codes::STORAGE_ERROR, "upload session vanished", Vec::new());
    };
    match file_type {
        "zip" => {
            let stored = match session.content().await {
                Ok(c) => c,
                Err(e) => return invalid(codes::STORAGE_ERROR, e.to_string(), Vec::new()),
            };
            let parsed = tokio::task::spawn_blocking(move || match stored {
                StoredContent::Memory(bytes) => content::parse_zip(&bytes),
                StoredContent::File(f) => {
                    content::parse_zip_from(std::io::BufReader::with_capacity(1 << 16, f))
                }
            })
            .await;
            match parsed {
                Ok(Ok(p)) => {
                    let images = p
                        .images
                        .into_iter()
                        .map(|(name, meta)| PendingImage {
                            source: ImageSource::ZipEntry {
                                upload_key: key.to_string(),
                                entry_name: name.clone(),
                            },
                            name,
                            meta,
                        })
                        .collect();
                    images_or_invalid(images, p.rejected)
                }
                Ok(Err(e)) => invalid(codes::INVALID_ZIP, e.to_string(), Vec::new()),
                Err(e) => invalid(codes::INVALID_ZIP, format!("zip reader failed: {e}"), Vec::new()),
            }
        }
        "mly_bundle_manifest" => {
            let bytes = match session.read_all().await {
                Ok(b) => b,
                Err(e) => return invalid(codes::STORAGE_ERROR, e.to_string(), Vec::new()),
            };
            let manifest = match content::parse_manifest(&bytes) {
                Ok(m) => m,
                Err(e) => return invalid(codes::INVALID_MANIFEST, e.to_string(), Vec::new()),
            };
            let mut images = Vec::new();
            let mut rejected = Vec::new();
            for handle in &manifest.image_handles {
                let image_key = sim.store.key_for_handle(handle);
                let Some(image_key) = image_key.filter(|k| k.to_ascii_lowercase().ends_with(".jpg")) else {
                    return invalid(
                        codes::MANIFEST_HANDLE_INVALID,
                        format!("handle {handle:?} does not name a completed .jpg upload"),
                        rejected,
                    );
                };
                let Some(img) = sim.store.get(&image_key) else {
                    return invalid(
                        codes::MANIFEST_HANDLE_INVALID,
                        format!("upload {image_key} vanished"),
                        rejected,
                    );
                };
                let bytes = match img.read_all().await {
                    Ok(b) => b,
                    Err(e) => return invalid(codes::STORAGE_ERROR, e.to_string(), rejected),
                };
                match content::parse_jpeg(&image_key, &bytes) {
                    Ok(meta) => images.push(PendingImage {
                        name: image_key.clone(),
                        meta,
                        source: ImageSource::Upload {
                            upload_key: image_key,
                        },
                    }),
                    Err(r) => rejected.push(r),
                }
            }
            images_or_invalid(images, rejected)
        }
        _ => invalid(
            codes::VIDEO_NOT_EMULATED,
            "video processing is not emulated by mapillary-sim",
            Vec::new(),
        ),
    }
}

/// `POST /graph/finish_upload` → `{"cluster_id"}`; every call makes a new cluster.
pub async fn finish_upload(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let token = presented_token(&headers, query.as_deref());
    let fields: Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
        Value::Object(
            form_pairs(&body)
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
        )
    });
    let (owner, key, handle, file_type, org) = {
        let w = sim.world();
        let caller = match check_graph(&w, token.as_deref(), sim.now_ms(), Need::Upload) {
            Ok(c) => c,
            Err(r) => return r,
        };
        let Some(handle) = fields.get("file_handle").and_then(super::id_string) else {
            return graph_bad_request("file_handle is required");
        };
        let file_type = fields.get("file_type").and_then(Value::as_str).unwrap_or("");
        if !FILE_TYPES.contains(&file_type) {
            return graph_bad_request(&format!("Invalid file_type {file_type:?}"));
        }
        let Some(key) = sim.store.key_for_handle(&handle) else {
            return graph_bad_request("Invalid file_handle: no completed upload has this handle");
        };
        let org = match fields.get("organization_id").filter(|v| !v.is_null()) {
            None => None,
            Some(v) => match super::id_string(v) {
                Some(id) if w.orgs.contains_key(&id) => Some(id),
                Some(id) => return graph_not_found(&id),
                None => return graph_bad_request("organization_id must be a string or a number"),
            },
        };
        let owner = caller.user_id().unwrap_or_default().to_string();
        (owner, key, handle, file_type.to_string(), org)
    };
    let content = read_content(&sim, &key, &file_type).await;
    let now = sim.now_ms();
    let mut w = sim.world();
    let plan = w
        .next_plans
        .pop_front()
        .unwrap_or_else(|| w.settings.default_plan.clone());
    let id = w.ids.numeric();
    let (accepted, invalid_code) = match &content {
        ClusterContent::Images { images, .. } => (images.len(), None),
        ClusterContent::Invalid { error_code, .. } => (0, Some(error_code.clone())),
    };
    info!(cluster = %id, %file_type, accepted, invalid = ?invalid_code, "cluster created");
    let sequence_cap = w.settings.sequence_cap;
    w.clusters.push(Cluster {
        id: id.clone(),
        owner_id: owner,
        organization_id: org,
        file_type,
        file_handle: handle,
        upload_key: key,
        created_at_ms: now,
        plan,
        sequence_cap,
        content,
        sequence_ids: Vec::new(),
        materialized: false,
    });
    ok(json!({ "cluster_id": id }))
}
