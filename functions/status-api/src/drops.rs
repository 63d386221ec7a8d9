//! Sequences dropped through the API, without AWS credentials and only into the caller's own prefix:
//!
//! * `POST /v1/sequences` — the caller announces the files (names, sizes, optional md5) and the
//!   manifest options; the API issues a sequence id, records the sequence as `AWAITING_FILES` with the
//!   announcement, and answers one presigned S3 `PUT` per file for exactly
//!   `sequences/<sub>/<sequence>/<name>`, with the size (and md5) bound into the signature.
//! * `POST /v1/sequences/{id}/uploads` — fresh URLs for the announced files not uploaded yet (resume).
//! * `POST /v1/sequences/{id}/complete` — every announced file must be there with its size (else 409
//!   naming each one); then the sequence is `RECEIVED` and the API writes `manifest.json` in
//!   zip-and-push's format, the same trigger as an S3 drop.
//! * `POST /v1/sequences/{id}/retry` — writes the sequence's manifest again (a new `drop_id`, so a new
//!   ETag and a new notification) so that zip-and-push runs the failed uploads again.
//! * `DELETE /v1/sequences/{id}` — removes every object version under the prefix, zip-and-push's
//!   claim of the sequence and every record; Mapillary's copy stays (the reply says so and gives its
//!   links).
//!
//! An announcement expires after `RELAY_ANNOUNCE_TTL_HOURS` (24): a sequence still `AWAITING_FILES`
//! then reads as `FAILED` with the reason ([`settle_expired`]), refuses files, `complete` and
//! `retry` (409 `announcement-expired`), and its announcement items carry the UploadsTable's TTL.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use shared::drops::{
    announcement_expired, check_files, check_options, expired_reason, manifest_json, AnnouncedFile,
    Announcement, MANIFEST_NAME,
};
use shared::idempotency::sequence_claim_id;
use shared::model::{SequenceRecord, SequenceState, UploadState};
use shared::ports::{
    DropStore, ObjectStore, ObjectWriter, RepoError, SequenceStore, StoreError, TrackingReader, UploadReader,
};
use time::OffsetDateTime;
use tracing::{error, info, info_span, warn, Instrument, Span};

use crate::base::{json_caller, json_no_store, owned_sequence, sequence_call, Deps, PathArg};
use crate::problem::{Problem, PROBLEM_JSON};
use crate::views;

type Result<T, E = Problem> = std::result::Result<T, E>;

/// Files named in a 409's `detail` (all of them are in its `files` member).
const DETAIL_NAMES: usize = 20;

/// `sequences/<user>/<sequence>/`.
pub fn sequence_prefix(user: &str, sequence: &str) -> String {
    format!("sequences/{user}/{sequence}/")
}

/// The `Content-MD5` header value of a 32-hex-digit md5 (base64 of the 16 bytes).
pub fn content_md5_header(md5_hex: &str) -> Option<String> {
    if md5_hex.len() != 32 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..16)
        .map(|i| u8::from_str_radix(md5_hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    Some(base64::engine::general_purpose::STANDARD.encode(bytes?))
}

/// A new sequence id: UTC time of the announcement and 48 random bits
/// (`20261203-071503-9f2c4a1b7e30`), within the id rules of the key layout.
fn new_sequence_id(now: OffsetDateTime) -> String {
    let r: [u8; 6] = rand::random();
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{hex}", shared::drops::compact_stamp(now, '-'))
}

/// A value unique to one write of a manifest (see [`manifest_json`]).
fn new_drop_id() -> String {
    let r: [u8; 12] = rand::random();
    r.iter().map(|b| format!("{b:02x}")).collect()
}

fn rfc3339(t: OffsetDateTime) -> Result<String> {
    t.format(&time::format_description::well_known::Rfc3339)
        .map_err(|_| Problem::internal())
}

/// The bucket, or 503 when drops are not configured.
/// What a route on one dropped sequence starts with: the caller, the sequence id (no query
/// parameters), the bucket, and the span its work runs in.
fn drop_call<'d, D: Deps>(d: &'d D, path: PathArg, parts: &Parts) -> Result<(String, String, &'d str, Span)> {
    let (user, id, _) = sequence_call(d, path, parts, &[])?;
    let bucket = bucket(d)?;
    let span = info_span!("drop", user = %user, sequence_id = %id);
    Ok((user, id, bucket, span))
}

fn bucket<D: Deps>(d: &D) -> Result<&str> {
    d.settings().drops.bucket.as_deref().ok_or_else(|| {
        error!("RELAY_BUCKET is not set: sequences cannot be dropped through the API");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "drops-unavailable",
            "Uploads through the API are not configured",
            "This deployment does not accept sequences through the API (no bucket configured).",
        )
    })
}

/// A storage failure as the client sees it (the message, which names keys, is logged).
fn store_problem(e: StoreError) -> Problem {
    if e.is_transient() {
        warn!(error = %e, "object store unavailable");
        Problem::unavailable()
    } else {
        error!(error = %e, "object store error");
        Problem::internal()
    }
}

fn conflict(code: &str, title: &str, detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::CONFLICT, code, title, detail)
}

// ------------------------------------------------------------------ announce

/// Body of `POST /v1/sequences`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnnounceBody {
    files: Vec<FileBody>,
    #[serde(default)]
    organization_id: Option<String>,
    #[serde(default)]
    max_images_per_upload: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBody {
    name: String,
    size: u64,
    #[serde(default)]
    md5: Option<String>,
}

/// One presigned upload of the reply.
#[derive(Debug, Serialize)]
pub struct UploadUrl {
    /// The announced name.
    pub name: String,
    /// The object key it is written to.
    pub key: String,
    /// Always `PUT`.
    pub method: &'static str,
    /// The presigned URL.
    pub url: String,
    /// Headers the `PUT` must carry as given (signed): `content-length`, `content-md5` when an md5
    /// was announced.
    pub headers: std::collections::BTreeMap<String, String>,
}

/// Reply of `POST /v1/sequences`.
#[derive(Debug, Serialize)]
pub struct Announced {
    pub sequence_id: String,
    /// `AWAITING_FILES`.
    pub state: &'static str,
    /// When the URLs stop working.
    pub expires_at: String,
    /// One per announced file, in the order given.
    pub uploads: Vec<UploadUrl>,
    /// Where to `POST` once every file is uploaded.
    pub complete_path: String,
}

/// `POST /v1/sequences`.
pub async fn announce<D: Deps>(
    State(d): State<Arc<D>>,
    parts: Parts,
    body: axum::body::Bytes,
) -> Result<Response> {
    let user = json_caller(&parts, d.settings())?;
    let bucket = bucket(&*d)?;
    let parsed: AnnounceBody = serde_json::from_slice(&body).map_err(|e| {
        let msg: String = e.to_string().chars().take(200).collect();
        Problem::invalid_parameter(format!("the body is not an announcement: {msg}"))
    })?;
    let caps = d.settings().drops.clone();
    let files = check_files(
        parsed
            .files
            .into_iter()
            .map(|f| AnnouncedFile {
                name: f.name,
                size: f.size,
                md5: f.md5,
            })
            .collect(),
        caps.max_files,
        caps.max_image_bytes,
    )
    .map_err(|e| Problem::invalid_parameter(e.to_string()))?;
    let max_images_per_upload =
        check_options(parsed.organization_id.as_deref(), parsed.max_images_per_upload)
            .map_err(|e| Problem::invalid_parameter(e.to_string()))?;
    let now = OffsetDateTime::now_utc();
    let sequence_id = new_sequence_id(now);
    let prefix = sequence_prefix(&user, &sequence_id);
    let span = info_span!("drop", user = %user, sequence_id = %sequence_id, files = files.len());
    async {
        // Signing is local: every URL exists before anything is recorded.
        let uploads = presign_all(&*d, bucket, &prefix, files.iter()).await?;
        let announcement = Announcement {
            user_id: user.clone(),
            sequence_id: sequence_id.clone(),
            files,
            organization_id: parsed.organization_id,
            max_images_per_upload,
            created_at: now,
            expires_at: Some(now + caps.announce_ttl),
        };
        let record = SequenceRecord {
            user_id: user.clone(),
            sequence_id: sequence_id.clone(),
            state: SequenceState::AwaitingFiles,
            reason: Some(format!(
                "waiting for the announced files: PUT each to its presigned URL, then POST \
                 /v1/sequences/{sequence_id}/complete"
            )),
            bucket: bucket.to_string(),
            manifest_key: format!("{prefix}{MANIFEST_NAME}"),
            manifest_etag: String::new(),
            organization_id: announcement.organization_id.clone(),
            image_count: announcement.files.len() as u32,
            accepted_count: 0,
            upload_ids: Vec::new(),
            rejected: Vec::new(),
            created_at: now,
            updated_at: now,
            attempts: 0,
            progress: Default::default(),
        };
        // The announcement first: a visible AWAITING_FILES sequence always has one.
        d.repo().put_announcement(&announcement).await?;
        d.repo().put_sequence(&record).await?;
        info!("sequence announced");
        let body = Announced {
            complete_path: format!("/v1/sequences/{sequence_id}/complete"),
            sequence_id: sequence_id.clone(),
            state: SequenceState::AwaitingFiles.as_str(),
            expires_at: rfc3339(now + caps.presign_ttl)?,
            uploads,
        };
        let mut resp = json_no_store(StatusCode::CREATED, &body);
        if let Ok(v) = HeaderValue::from_str(&format!("/v1/sequences/{sequence_id}")) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        Ok(resp)
    }
    .instrument(span)
    .await
}

/// One presigned PUT per file of `files`, under `prefix`.
async fn presign_all<'a, D: Deps>(
    d: &D,
    bucket: &str,
    prefix: &str,
    files: impl Iterator<Item = &'a AnnouncedFile>,
) -> Result<Vec<UploadUrl>> {
    let ttl = d.settings().drops.presign_ttl;
    let mut uploads = Vec::new();
    for f in files {
        let key = format!("{prefix}{}", f.name);
        let md5 = f.md5.as_deref().and_then(content_md5_header);
        let p = d
            .objects()
            .presign_put(bucket, &key, f.size, md5.as_deref(), ttl)
            .await
            .map_err(store_problem)?;
        uploads.push(UploadUrl {
            name: f.name.clone(),
            key,
            method: "PUT",
            url: p.url,
            headers: p.headers.into_iter().collect(),
        });
    }
    Ok(uploads)
}

/// `seq` as the caller reads it: a sequence still AWAITING_FILES after `RELAY_ANNOUNCE_TTL_HOURS`
/// reads as FAILED with the reason (the record itself is not written: nothing runs for it, and
/// DELETE removes it with its objects).
pub fn settle_expired(seq: &mut SequenceRecord, ttl: std::time::Duration, now: OffsetDateTime) {
    if announcement_expired(seq.state, seq.created_at, ttl, now) {
        seq.state = SequenceState::Failed;
        seq.reason = Some(expired_reason(ttl));
    }
}

fn expired(id: &str, ttl: std::time::Duration) -> Problem {
    conflict(
        "announcement-expired",
        "Announcement expired",
        format!("sequence {id:?}: {}", expired_reason(ttl)),
    )
}

/// The sequence, if it is the caller's and AWAITING_FILES, with its announcement (404 / 409 otherwise,
/// also when the announcement expired).
async fn awaiting<D: Deps>(d: &D, user: &str, id: &str) -> Result<(SequenceRecord, Announcement)> {
    let seq = owned_sequence(d, user, id).await?;
    let ttl = d.settings().drops.announce_ttl;
    if announcement_expired(seq.state, seq.created_at, ttl, OffsetDateTime::now_utc()) {
        info!("announcement expired: files and complete refused");
        return Err(expired(id, ttl));
    }
    if seq.state != SequenceState::AwaitingFiles {
        return Err(conflict(
            "not-awaiting-files",
            "Sequence not awaiting files",
            format!(
                "sequence {id:?} is {}: only a sequence announced with POST /v1/sequences and not \
                 completed yet takes files",
                seq.state.as_str()
            ),
        ));
    }
    let Some(announcement) = d.repo().get_announcement(user, id).await? else {
        error!("an AWAITING_FILES sequence without its announcement");
        return Err(Problem::internal());
    };
    Ok((seq, announcement))
}

// ------------------------------------------------------------------ uploads again (resume)

/// `POST /v1/sequences/{id}/uploads`: fresh presigned URLs for the announced files that are not
/// uploaded as announced yet (missing, or of another size) — how a client resumes after its URLs
/// expired or it stopped part-way. Same reply as `POST /v1/sequences`; `uploads` is empty when every
/// file is there (then complete).
pub async fn uploads_again<D: Deps>(
    State(d): State<Arc<D>>,
    path: PathArg,
    parts: Parts,
) -> Result<Response> {
    let (user, id, bucket, span) = drop_call(&*d, path, &parts)?;
    async {
        let (_, announcement) = awaiting(&*d, &user, &id).await?;
        let prefix = sequence_prefix(&user, &id);
        let listed = d.objects().list(bucket, &prefix).await.map_err(store_problem)?;
        let missing: Vec<String> = missing_files(&announcement.files, &prefix, &listed)
            .into_iter()
            .map(|f| f.name)
            .collect();
        let todo = announcement.files.iter().filter(|f| missing.contains(&f.name));
        let uploads = presign_all(&*d, bucket, &prefix, todo).await?;
        info!(files = uploads.len(), "upload URLs issued again");
        let body = Announced {
            complete_path: format!("/v1/sequences/{id}/complete"),
            sequence_id: id.clone(),
            state: SequenceState::AwaitingFiles.as_str(),
            expires_at: rfc3339(OffsetDateTime::now_utc() + d.settings().drops.presign_ttl)?,
            uploads,
        };
        Ok(json_no_store(StatusCode::OK, &body))
    }
    .instrument(span)
    .await
}

// ------------------------------------------------------------------ complete

/// One announced file that is not as announced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileProblem {
    /// The announced name.
    pub name: String,
    /// `missing` or `size_mismatch`.
    pub problem: &'static str,
    /// The announced size.
    pub expected_size: u64,
    /// The size found (`size_mismatch` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
}

/// The 409 of `complete`: a problem document with a `files` member listing every file.
#[derive(Debug, Serialize)]
struct FilesProblem {
    #[serde(flatten)]
    problem: Problem,
    files: Vec<FileProblem>,
}

/// The announced files that are missing under `prefix` or have another size than announced.
pub fn missing_files(
    announced: &[AnnouncedFile],
    prefix: &str,
    listed: &[shared::ports::ObjectInfo],
) -> Vec<FileProblem> {
    let sizes: HashMap<&str, u64> = listed
        .iter()
        .filter_map(|o| Some((o.key.strip_prefix(prefix)?, o.size)))
        .collect();
    announced
        .iter()
        .filter_map(|f| match sizes.get(f.name.as_str()) {
            None => Some(FileProblem {
                name: f.name.clone(),
                problem: "missing",
                expected_size: f.size,
                actual_size: None,
            }),
            Some(&size) if size != f.size => Some(FileProblem {
                name: f.name.clone(),
                problem: "size_mismatch",
                expected_size: f.size,
                actual_size: Some(size),
            }),
            Some(_) => None,
        })
        .collect()
}

fn files_problem(files: Vec<FileProblem>) -> Response {
    let named: Vec<String> = files
        .iter()
        .take(DETAIL_NAMES)
        .map(|f| match f.actual_size {
            None => format!("{} (missing)", f.name),
            Some(a) => format!("{} ({} bytes, announced {})", f.name, a, f.expected_size),
        })
        .collect();
    let more = files.len().saturating_sub(DETAIL_NAMES);
    let detail = format!(
        "{} announced file(s) are not uploaded as announced: {}{}",
        files.len(),
        named.join(", "),
        if more > 0 {
            format!(" and {more} more (see files)")
        } else {
            String::new()
        }
    );
    let body = FilesProblem {
        problem: conflict("files-missing", "Announced files missing", detail),
        files,
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = (StatusCode::CONFLICT, bytes).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    resp
}

/// Reply of `complete` and `retry`.
#[derive(Debug, Serialize)]
pub struct ManifestWritten {
    pub sequence_id: String,
    /// The sequence's state after the call.
    pub state: &'static str,
    /// Images the manifest lists (`complete`), or uploads that were FAILED (`retry`).
    pub count: usize,
    /// Where to follow it.
    pub status_path: String,
}

/// `POST /v1/sequences/{id}/complete`.
pub async fn complete<D: Deps>(State(d): State<Arc<D>>, path: PathArg, parts: Parts) -> Result<Response> {
    let (user, id, bucket, span) = drop_call(&*d, path, &parts)?;
    async {
        let (seq, announcement) = awaiting(&*d, &user, &id).await?;
        let prefix = sequence_prefix(&user, &id);
        let listed = d.objects().list(bucket, &prefix).await.map_err(store_problem)?;
        let missing = missing_files(&announcement.files, &prefix, &listed);
        if !missing.is_empty() {
            info!(missing = missing.len(), "complete refused: files missing");
            return Ok(files_problem(missing));
        }
        // The state first: once the manifest exists zip-and-push owns the record, and a write after
        // it could overwrite its progress.
        let mut received = seq.clone();
        received.state = SequenceState::Received;
        received.reason = None;
        received.updated_at = OffsetDateTime::now_utc();
        // Only from AWAITING_FILES: of two concurrent calls one writes the manifest, the other is told.
        match d
            .repo()
            .replace_sequence_if(&received, SequenceState::AwaitingFiles)
            .await
        {
            Ok(()) => {}
            Err(RepoError::ConditionFailed(_)) => {
                return Err(conflict(
                    "not-awaiting-files",
                    "Sequence not awaiting files",
                    format!("sequence {id:?} was completed meanwhile"),
                ))
            }
            Err(e) => return Err(e.into()),
        }
        let manifest_key = format!("{prefix}{MANIFEST_NAME}");
        let manifest = manifest_json(&announcement, &new_drop_id());
        if let Err(e) = d
            .objects()
            .put_object(bucket, &manifest_key, manifest, "application/json")
            .await
        {
            // No manifest, so nothing runs: back to AWAITING_FILES, so complete can be called again.
            if let Err(re) = d.repo().replace_sequence_if(&seq, SequenceState::Received).await {
                error!(error = %re, "restoring AWAITING_FILES after a failed manifest write failed");
            }
            return Err(store_problem(e));
        }
        info!(files = announcement.files.len(), "manifest written");
        Ok(json_no_store(
            StatusCode::ACCEPTED,
            &ManifestWritten {
                sequence_id: id.clone(),
                state: SequenceState::Received.as_str(),
                count: announcement.files.len(),
                status_path: format!("/v1/sequences/{id}"),
            },
        ))
    }
    .instrument(span)
    .await
}

// ------------------------------------------------------------------ retry

fn busy(id: &str, state: SequenceState) -> Problem {
    conflict(
        "sequence-busy",
        "Sequence in progress",
        format!(
            "sequence {id:?} is {}: wait until it is UPLOADED or FAILED",
            state.as_str()
        ),
    )
}

/// `POST /v1/sequences/{id}/retry`: the manifest written again with a new `drop_id` (a new ETag, so
/// a new notification zip-and-push does not take for a duplicate). What zip-and-push then re-runs is
/// its business: the uploads that FAILED.
pub async fn retry<D: Deps>(State(d): State<Arc<D>>, path: PathArg, parts: Parts) -> Result<Response> {
    let (user, id, bucket, span) = drop_call(&*d, path, &parts)?;
    async {
        let seq = owned_sequence(&*d, &user, &id).await?;
        match seq.state {
            SequenceState::Received | SequenceState::Uploading => return Err(busy(&id, seq.state)),
            SequenceState::AwaitingFiles
                if announcement_expired(
                    seq.state,
                    seq.created_at,
                    d.settings().drops.announce_ttl,
                    OffsetDateTime::now_utc(),
                ) =>
            {
                return Err(expired(&id, d.settings().drops.announce_ttl))
            }
            SequenceState::AwaitingFiles => {
                return Err(conflict(
                    "not-completed",
                    "Sequence not completed",
                    format!("sequence {id:?} is AWAITING_FILES: POST /v1/sequences/{id}/complete first"),
                ))
            }
            _ => {}
        }
        let failed = d
            .repo()
            .list_uploads(&user, &id)
            .await?
            .iter()
            .filter(|u| u.state == UploadState::Failed)
            .count();
        let retryable = failed > 0
            || matches!(
                seq.state,
                SequenceState::Failed | SequenceState::AwaitingUploadToken
            );
        if !retryable {
            return Err(conflict(
                "nothing-to-retry",
                "Nothing to retry",
                format!(
                    "sequence {id:?} is {} and none of its uploads failed",
                    seq.state.as_str()
                ),
            ));
        }
        // Always the caller's own manifest key, whatever the record says.
        let manifest_key = format!("{}{MANIFEST_NAME}", sequence_prefix(&user, &id));
        let current = match d.objects().get_object(bucket, &manifest_key, None).await {
            Ok(o) => o,
            Err(StoreError::NotFound(_)) => {
                return Err(conflict(
                    "manifest-missing",
                    "Manifest missing",
                    format!("sequence {id:?} has no manifest.json any more: drop it again"),
                ))
            }
            Err(e) => return Err(store_problem(e)),
        };
        let mut manifest: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&current.bytes)
            .map_err(|_| {
                conflict(
                    "manifest-unreadable",
                    "Manifest unreadable",
                    format!("the manifest.json of sequence {id:?} is not a JSON object: drop it again"),
                )
            })?;
        manifest.insert("drop_id".into(), new_drop_id().into());
        let bytes = serde_json::to_vec(&manifest).map_err(|_| Problem::internal())?;
        d.objects()
            .put_object(bucket, &manifest_key, bytes, "application/json")
            .await
            .map_err(store_problem)?;
        info!(
            failed,
            state = seq.state.as_str(),
            "manifest written again for a retry"
        );
        Ok(json_no_store(
            StatusCode::ACCEPTED,
            &ManifestWritten {
                sequence_id: id.clone(),
                state: seq.state.as_str(),
                count: failed,
                status_path: format!("/v1/sequences/{id}"),
            },
        ))
    }
    .instrument(span)
    .await
}

// ------------------------------------------------------------------ delete

/// Reply of `DELETE /v1/sequences/{id}`.
#[derive(Debug, Serialize)]
pub struct Deleted {
    pub sequence_id: String,
    /// Object versions (and delete markers) removed from the bucket.
    pub objects_deleted: u64,
    /// Always `false`: the relay cannot delete what Mapillary published.
    pub mapillary_deleted: bool,
    /// What that means for the caller.
    pub mapillary_note: &'static str,
    /// The Mapillary sequences the uploads became, as far as the relay linked them.
    pub mapillary_sequences: Vec<views::MapillarySequenceView>,
}

const MAPILLARY_NOTE: &str = "Only the relay's copy (images, manifest, records) was deleted. Images already \
     uploaded to Mapillary are not deleted there: delete them in Mapillary (its app or web page) if you \
     want them gone; mapillary_sequences lists the sequences the relay knew of.";

/// `DELETE /v1/sequences/{id}`.
pub async fn delete_sequence<D: Deps>(
    State(d): State<Arc<D>>,
    path: PathArg,
    parts: Parts,
) -> Result<Response> {
    let (user, id, bucket, span) = drop_call(&*d, path, &parts)?;
    async {
        let seq = owned_sequence(&*d, &user, &id).await?;
        if matches!(seq.state, SequenceState::Received | SequenceState::Uploading) {
            return Err(busy(&id, seq.state));
        }
        let uploads = d.repo().list_uploads(&user, &id).await?;
        let mut upload_ids: Vec<String> = uploads.iter().map(|u| u.upload_id.clone()).collect();
        for u in &seq.upload_ids {
            if !upload_ids.contains(u) {
                upload_ids.push(u.clone());
            }
        }
        let mut mapillary_sequences = Vec::new();
        for u in &uploads {
            // Tracking items are keyed by upload id; the owner check is defence in depth.
            let Some(t) = d
                .tracking()
                .get_tracking(&u.upload_id)
                .await?
                .filter(|t| t.user_id == user)
            else {
                continue;
            };
            let links = d.tracking().list_links(&u.upload_id).await?;
            if let Some(m) = views::upload_view(u, Some((&t, &links))).mapillary {
                mapillary_sequences.extend(m.sequences);
            }
        }
        // Objects first, records last: a failure part-way leaves the sequence visible, and the
        // same call finishes the job.
        let objects_deleted = d
            .objects()
            .delete_prefix(bucket, &sequence_prefix(&user, &id))
            .await
            .map_err(store_problem)?;
        // The claim before the records: a manifest dropped again under this key later (even
        // byte-identical) must start afresh, not meet the deleted sequence's claim.
        let claim = sequence_claim_id(bucket, &format!("{}{MANIFEST_NAME}", sequence_prefix(&user, &id)));
        d.repo().delete_sequence_claim(&claim).await?;
        d.repo().delete_sequence_records(&user, &id, &upload_ids).await?;
        info!(objects_deleted, uploads = upload_ids.len(), "sequence deleted");
        Ok(json_no_store(
            StatusCode::OK,
            &Deleted {
                sequence_id: id.clone(),
                objects_deleted,
                mapillary_deleted: false,
                mapillary_note: MAPILLARY_NOTE,
                mapillary_sequences,
            },
        ))
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::ports::ObjectInfo;

    #[test]
    fn content_md5_is_the_base64_of_the_digest() {
        // md5("") = d41d8cd98f00b204e9800998ecf8427e; its Content-MD5 is 1B2M2Y8AsgTpgAmY7PhCfg==.
        assert_eq!(
            content_md5_header("d41d8cd98f00b204e9800998ecf8427e").as_deref(),
            Some("1B2M2Y8AsgTpgAmY7PhCfg==")
        );
        assert_eq!(content_md5_header("zz"), None);
        assert_eq!(content_md5_header(&"g".repeat(32)), None);
    }

    #[test]
    fn sequence_ids_follow_the_id_rules_and_differ() {
        let now = time::macros::datetime!(2026-12-03 07:15:03 UTC);
        let a = new_sequence_id(now);
        assert!(a.starts_with("20261203-071503-"), "{a}");
        assert!(crate::validate::is_valid_id(&a), "{a}");
        assert_ne!(a, new_sequence_id(now));
    }

    #[test]
    fn missing_and_mismatched_files_are_named() {
        let f = |name: &str, size| AnnouncedFile {
            name: name.into(),
            size,
            md5: None,
        };
        let o = |key: &str, size| ObjectInfo {
            key: key.into(),
            size,
            etag: "e".into(),
        };
        let prefix = "sequences/u/s/";
        let announced = [f("a.jpg", 1), f("b.jpg", 2), f("c.jpg", 3)];
        let listed = [
            o("sequences/u/s/a.jpg", 1),
            o("sequences/u/s/c.jpg", 4),
            o("sequences/u/s/extra.jpg", 9),
            o("sequences/u/s2/b.jpg", 2),
        ];
        let got = missing_files(&announced, prefix, &listed);
        assert_eq!(
            got,
            [
                FileProblem {
                    name: "b.jpg".into(),
                    problem: "missing",
                    expected_size: 2,
                    actual_size: None
                },
                FileProblem {
                    name: "c.jpg".into(),
                    problem: "size_mismatch",
                    expected_size: 3,
                    actual_size: Some(4)
                },
            ]
        );
        assert!(missing_files(&announced[..1], prefix, &listed).is_empty());
    }
}
