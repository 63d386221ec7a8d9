//! One sequence, from its manifest to handed-off clusters: plan (manifest → EXIF pass → sequence
//! rules → records), then drive each upload (stream → finish_upload → cluster message), resuming
//! whatever a previous attempt left.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use md5::{Digest, Md5};
use shared::domain::jpeg;
use shared::domain::sequence::{plan_sequences, SequenceInput};
use shared::domain::zipfmt::ZipPlan;
use shared::mapillary::error::MapillaryError;
use shared::mapillary::session::{CallError, SessionContext, SessionError, TokenSession};
use shared::model::{
    upload_id, ClusterMessage, RejectedImage, SequenceRecord, SequenceState, UploadImage, UploadRecord,
    UploadState,
};
use shared::ports::{
    ClusterQueue, ImageEntryReader, ImageEntryStore, MapillaryUploads, ObjectStore, RepoError,
    SequenceReader, SequenceStore, StoreError, UploadReader, UploadStore,
};
use time::OffsetDateTime;
use tracing::{info, info_span, warn, Instrument};

use crate::exifpass::{read_heads, Candidate, HeadOutcome, HeadRead};
use crate::handler::Deps;
use crate::manifest::{check_relative_key, is_default_image, parse_manifest, SequenceKey, MANIFEST_NAME};
use crate::zipstream::{comment_len, upload_zip, UploadFailure, ZipSource};

/// One manifest to process.
#[derive(Debug, Clone)]
pub struct Job {
    /// Bucket.
    pub bucket: String,
    /// Manifest key (decoded).
    pub manifest_key: String,
    /// Manifest etag (no quotes).
    pub manifest_etag: String,
    /// Ids from the key.
    pub seq: SequenceKey,
    /// Lambda deadline.
    pub deadline: Instant,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Final (uploaded or failed, recorded): acknowledge and complete the claim.
    Done,
    /// Out of time: release the claim and continue in a follow-up invocation.
    Continue,
    /// Transient failure: retry the message later.
    Retry(String),
}

/// Internal failure classes.
#[derive(Debug)]
enum Fail {
    /// Retrying later may help.
    Transient(String),
    /// The sequence fails with this reason.
    Permanent(String),
}

impl From<RepoError> for Fail {
    fn from(e: RepoError) -> Self {
        if e.is_transient() {
            Fail::Transient(e.to_string())
        } else {
            Fail::Permanent(format!("internal error: {e}"))
        }
    }
}

enum Step {
    Final,
    OutOfTime,
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Process `job` as far as the deadline allows.
pub async fn run_sequence<D: Deps>(d: &D, job: &Job) -> Outcome {
    match run_inner(d, job).await {
        Ok(o) => o,
        Err(Fail::Transient(r)) => Outcome::Retry(r),
        Err(Fail::Permanent(reason)) => {
            warn!(%reason, "sequence failed");
            match fail_sequence(d, job, &reason).await {
                Ok(()) => Outcome::Done,
                Err(e) => Outcome::Retry(format!("recording the failure ({reason}) failed: {e}")),
            }
        }
    }
}

/// Record the sequence as FAILED with `reason` (keeping what is known), and every upload that is
/// not final as FAILED too.
pub async fn fail_sequence<D: Deps>(d: &D, job: &Job, reason: &str) -> Result<(), RepoError> {
    let repo = d.repo();
    let mut seq = repo
        .get_sequence(&job.seq.user_id, &job.seq.sequence_id)
        .await?
        .unwrap_or_else(|| base_record(job));
    for mut up in repo.list_uploads(&job.seq.user_id, &job.seq.sequence_id).await? {
        if !up.state.is_final() && up.state != UploadState::Uploaded {
            up.state = UploadState::Failed;
            up.error = Some(reason.to_string());
            up.finished_at = Some(now());
            repo.put_upload(&up).await?;
        }
    }
    seq.state = SequenceState::Failed;
    seq.reason = Some(reason.to_string());
    seq.updated_at = now();
    repo.put_sequence(&seq).await
}

fn base_record(job: &Job) -> SequenceRecord {
    let t = now();
    SequenceRecord {
        user_id: job.seq.user_id.clone(),
        sequence_id: job.seq.sequence_id.clone(),
        state: SequenceState::Received,
        reason: None,
        bucket: job.bucket.clone(),
        manifest_key: job.manifest_key.clone(),
        manifest_etag: job.manifest_etag.clone(),
        organization_id: None,
        image_count: 0,
        accepted_count: 0,
        upload_ids: Vec::new(),
        rejected: Vec::new(),
        created_at: t,
        updated_at: t,
        attempts: 0,
    }
}

async fn run_inner<D: Deps>(d: &D, job: &Job) -> Result<Outcome, Fail> {
    let repo = d.repo();
    let existing = repo.get_sequence(&job.seq.user_id, &job.seq.sequence_id).await?;
    if let Some(s) = &existing {
        if matches!(s.state, SequenceState::Uploaded | SequenceState::Failed) {
            info!(state = s.state.as_str(), "sequence already final");
            return Ok(Outcome::Done);
        }
    }
    let ctx = SessionContext::new(d.tokens(), d.mapillary(), d.tunables().token_refresh_margin);
    let mut token = TokenSession::load(ctx, &job.seq.user_id)
        .await
        .map_err(|e| token_fail(&job.seq.user_id, e))?;
    let mut seq = match existing {
        Some(s) if s.state == SequenceState::Uploading => s,
        _ => {
            let s = prepare(d, job).await?;
            if s.state == SequenceState::Failed {
                repo.put_sequence(&s).await?;
                warn!(
                    reason = s.reason.as_deref().unwrap_or_default(),
                    "sequence failed"
                );
                return Ok(Outcome::Done);
            }
            s
        }
    };
    seq.attempts += 1;
    seq.updated_at = now();
    repo.put_sequence(&seq).await?;

    let uploads = repo.list_uploads(&job.seq.user_id, &job.seq.sequence_id).await?;
    for up in uploads {
        if up.state.is_final() {
            continue;
        }
        let span = info_span!("upload", upload_id = %up.upload_id);
        match drive_upload(d, job, &seq, up, &mut token)
            .instrument(span)
            .await?
        {
            Step::Final => {}
            Step::OutOfTime => return Ok(Outcome::Continue),
        }
    }

    let uploads = repo.list_uploads(&job.seq.user_id, &job.seq.sequence_id).await?;
    let delivered = uploads
        .iter()
        .filter(|u| matches!(u.state, UploadState::HandedOff | UploadState::FinishUncertain))
        .count();
    if delivered > 0 {
        seq.state = SequenceState::Uploaded;
        let failed = uploads.len() - delivered;
        seq.reason = (failed > 0).then(|| format!("{failed} of {} uploads failed", uploads.len()));
    } else {
        seq.state = SequenceState::Failed;
        let first = uploads.iter().find_map(|u| u.error.clone()).unwrap_or_default();
        seq.reason = Some(format!("every upload failed: {first}"));
    }
    seq.updated_at = now();
    repo.put_sequence(&seq).await?;
    info!(
        state = seq.state.as_str(),
        uploads = uploads.len(),
        "sequence done"
    );
    Ok(Outcome::Done)
}

// ------------------------------------------------------------------ tokens

/// The user's token session of this invocation (see `shared::mapillary::session`).
type Session<'a, D> = TokenSession<'a, <D as Deps>::Tokens, <D as Deps>::Mapillary>;

/// Why the user's token cannot be used, as this function reports it.
fn token_fail(user_id: &str, e: SessionError) -> Fail {
    match e {
        SessionError::Missing => Fail::Permanent(format!(
            "no Mapillary token for user {user_id}: connect the account"
        )),
        SessionError::Store(e) if e.is_transient() => Fail::Transient(e.to_string()),
        SessionError::Store(e) => {
            Fail::Permanent(format!("the Mapillary token of user {user_id} is unusable: {e}"))
        }
        SessionError::Mapillary(e) if e.is_retriable() => Fail::Transient(format!("token refresh: {e}")),
        SessionError::Mapillary(e) => Fail::Permanent(format!("Mapillary rejected the token: {e}")),
    }
}

// ------------------------------------------------------------------ planning

async fn prepare<D: Deps>(d: &D, job: &Job) -> Result<SequenceRecord, Fail> {
    let store = d.store();
    let tun = d.tunables();
    let mut seq = base_record(job);
    let prefix = job.seq.prefix();
    let fail = |mut seq: SequenceRecord, reason: String| {
        seq.state = SequenceState::Failed;
        seq.reason = Some(reason);
        Ok(seq)
    };
    let manifest_bytes = match store.get_object(&job.bucket, &job.manifest_key, None).await {
        Ok(o) => o.bytes,
        Err(StoreError::NotFound(_)) => {
            return fail(seq, "manifest.json was deleted before it could be read".into())
        }
        Err(e) if e.is_transient() => return Err(Fail::Transient(e.to_string())),
        Err(e) => return fail(seq, format!("manifest.json is unreadable: {e}")),
    };
    let manifest = match parse_manifest(&manifest_bytes) {
        Ok(m) => m,
        Err(e) => return fail(seq, e.to_string()),
    };
    seq.organization_id = manifest.organization_id.clone();

    let mut candidates = Vec::new();
    match &manifest.images {
        Some(list) => {
            let mut seen = HashSet::new();
            for rel in list {
                if let Err(reason) = check_relative_key(rel) {
                    seq.rejected.push(RejectedImage {
                        key: rel.clone(),
                        reason,
                    });
                } else if rel == MANIFEST_NAME {
                    seq.rejected.push(RejectedImage {
                        key: rel.clone(),
                        reason: "invalid key: the manifest itself is not an image".into(),
                    });
                } else if !seen.insert(rel.clone()) {
                    seq.rejected.push(RejectedImage {
                        key: rel.clone(),
                        reason: "listed more than once in the manifest".into(),
                    });
                } else {
                    candidates.push(Candidate {
                        rel: rel.clone(),
                        key: format!("{prefix}{rel}"),
                    });
                }
            }
            seq.image_count = list.len() as u32;
        }
        None => {
            let listed = match store.list(&job.bucket, &prefix).await {
                Ok(l) => l,
                Err(e) if e.is_transient() => return Err(Fail::Transient(e.to_string())),
                Err(e) => return fail(seq, format!("listing the sequence failed: {e}")),
            };
            for o in listed {
                let rel = o.key.strip_prefix(&prefix).unwrap_or(&o.key).to_string();
                if rel != MANIFEST_NAME && is_default_image(&rel) {
                    candidates.push(Candidate { rel, key: o.key });
                }
            }
            seq.image_count = candidates.len() as u32;
            if candidates.is_empty() {
                return fail(seq, format!("no images: no .jpg/.jpeg object under {prefix}"));
            }
        }
    }

    let heads = read_heads(store, &job.bucket, candidates, tun.exif_concurrency)
        .await
        .map_err(|e| Fail::Transient(e.to_string()))?;
    let mut reads: HashMap<String, HeadRead> = HashMap::new();
    let mut inputs = Vec::new();
    for h in heads {
        match h {
            HeadOutcome::Read(r) => {
                inputs.push(SequenceInput {
                    name: r.rel.clone(),
                    meta: r.meta.clone(),
                    file_size: Some(r.size),
                });
                reads.insert(r.rel.clone(), *r);
            }
            HeadOutcome::Rejected(key, reason) => seq.rejected.push(RejectedImage { key, reason }),
        }
    }
    let max = manifest
        .max_images_per_upload
        .unwrap_or(tun.max_images_per_upload);
    let plan = plan_sequences(inputs, &tun.sequence_config(max));
    for dropped in plan.dropped {
        seq.rejected.push(RejectedImage {
            key: dropped.name,
            reason: dropped.reason.to_string(),
        });
    }

    let created = now();
    let mut uploads = Vec::new();
    let mut all_images = Vec::new();
    for planned in plan.sequences {
        let index = uploads.len() as u32;
        let up_id = upload_id(&job.seq.user_id, &job.seq.sequence_id, index);
        let mut images: Vec<UploadImage> = Vec::new();
        for pi in planned.images {
            let Some(r) = reads.get(&pi.name) else {
                seq.rejected.push(RejectedImage {
                    key: pi.name,
                    reason: "internal error: planned image without metadata".into(),
                });
                continue;
            };
            let rh = match jpeg::rewrite_header(&r.head, &pi.description) {
                Ok(h) => h,
                Err(e) => {
                    seq.rejected.push(RejectedImage {
                        key: pi.name,
                        reason: format!("cannot write the MAP* description into the EXIF: {e}"),
                    });
                    continue;
                }
            };
            let Some(entry_size) = rh.transformed_len(r.size) else {
                seq.rejected.push(RejectedImage {
                    key: pi.name,
                    reason: "corrupt EXIF: header longer than the file".into(),
                });
                continue;
            };
            images.push(UploadImage {
                upload_id: up_id.clone(),
                index: images.len() as u32,
                key: r.key.clone(),
                etag: r.etag.clone(),
                size: r.size,
                entry_size,
                header_consumed: rh.consumed as u64,
                description: pi.description,
                lat: pi.meta.lat,
                lon: pi.meta.lon,
                altitude: pi.meta.altitude,
                captured_at: pi.meta.captured_at,
                heading: pi.meta.heading,
                checkpoint: None,
            });
        }
        if images.is_empty() {
            continue;
        }
        let sizes: Vec<u64> = images.iter().map(|i| i.entry_size).collect();
        let zplan = match ZipPlan::from_sizes(&sizes, comment_len()) {
            Ok(p) => p,
            Err(e) => return fail(seq, format!("upload {up_id} cannot be zipped: {e}")),
        };
        uploads.push(UploadRecord {
            user_id: job.seq.user_id.clone(),
            sequence_id: job.seq.sequence_id.clone(),
            upload_id: up_id,
            index,
            state: UploadState::Pending,
            session_key: session_key(&images),
            total_len: zplan.total_len(),
            image_count: images.len() as u32,
            cluster_id: None,
            handle: None,
            organization_id: manifest.organization_id.clone(),
            bytes_sent: 0,
            created_at: created,
            started_at: None,
            finished_at: None,
            error: None,
            attempts: 0,
        });
        all_images.extend(images);
    }
    seq.accepted_count = all_images.len() as u32;
    seq.upload_ids = uploads.iter().map(|u| u.upload_id.clone()).collect();
    if uploads.is_empty() {
        let n = seq.rejected.len();
        return fail(seq, format!("no usable images: all {n} images were rejected"));
    }
    // Records before any byte goes to Mapillary: images, then uploads, then the sequence (whose
    // UPLOADING state is what a later attempt resumes from).
    let repo = d.repo();
    repo.put_images(&all_images).await?;
    for up in &uploads {
        repo.put_upload(up).await?;
    }
    seq.state = SequenceState::Uploading;
    info!(
        uploads = uploads.len(),
        accepted = seq.accepted_count,
        rejected = seq.rejected.len(),
        "sequence planned"
    );
    Ok(seq)
}

/// `mly_relay_<md5 of (key, etag, description) of every image, in order>.zip`.
pub fn session_key(images: &[UploadImage]) -> String {
    let mut h = Md5::new();
    for i in images {
        for part in [i.key.as_bytes(), i.etag.as_bytes(), i.description.as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    format!("mly_relay_{}.zip", hex::encode(h.finalize()))
}

// ------------------------------------------------------------------ uploading

async fn drive_upload<D: Deps>(
    d: &D,
    job: &Job,
    seq: &SequenceRecord,
    mut up: UploadRecord,
    token: &mut Session<'_, D>,
) -> Result<Step, Fail> {
    let repo = d.repo();
    let mut finish_now = false;
    loop {
        match up.state {
            UploadState::Pending | UploadState::Uploading => {
                let images = repo.list_images(&up.upload_id).await?;
                if images.len() != up.image_count as usize {
                    let msg = format!(
                        "internal error: {} image entries recorded, {} expected",
                        images.len(),
                        up.image_count
                    );
                    fail_upload(d, &mut up, msg).await?;
                    continue;
                }
                let source = match ZipSource::new(
                    d.store(),
                    repo,
                    &job.bucket,
                    &up.upload_id,
                    &images,
                    d.tunables().prefetch_bytes,
                ) {
                    Ok(s) if s.total_len() == up.total_len => s,
                    Ok(s) => {
                        let msg = format!(
                            "internal error: zip of {} bytes planned, {} recorded",
                            s.total_len(),
                            up.total_len
                        );
                        fail_upload(d, &mut up, msg).await?;
                        continue;
                    }
                    Err(e) => {
                        fail_upload(d, &mut up, e.to_string()).await?;
                        continue;
                    }
                };
                if up.state == UploadState::Pending {
                    up.state = UploadState::Uploading;
                    up.started_at = Some(now());
                }
                up.attempts += 1;
                repo.put_upload(&up).await?;
                token
                    .ensure_fresh()
                    .await
                    .map_err(|e| token_fail(&seq.user_id, e))?;
                let report = loop {
                    let Some(budget) = job
                        .deadline
                        .saturating_duration_since(Instant::now())
                        .checked_sub(d.tunables().deadline_margin)
                        .filter(|b| !b.is_zero())
                    else {
                        return Ok(Step::OutOfTime);
                    };
                    let attempt = upload_zip(d.mapillary(), &source, token.access(), &up.session_key);
                    match tokio::time::timeout(budget, attempt).await {
                        Err(_) => {
                            info!("deadline near: stopping the upload to continue in a follow-up invocation");
                            return Ok(Step::OutOfTime);
                        }
                        Ok(Ok(report)) => break report,
                        Ok(Err(UploadFailure::Mapillary(e))) if e.is_unauthorized() => {
                            // Refreshed at most once per invocation (the session's rule).
                            match token.on_unauthorized().await {
                                Ok(true) => {}
                                Ok(false) => {
                                    return Err(Fail::Permanent(format!("Mapillary rejected the token: {e}")))
                                }
                                Err(r) => return Err(token_fail(&seq.user_id, r)),
                            }
                        }
                        Ok(Err(UploadFailure::Mapillary(e))) if retry_later(&e) => {
                            return Err(Fail::Transient(format!("upload {}: {e}", up.upload_id)));
                        }
                        Ok(Err(UploadFailure::Source(e))) if e.is_transient() => {
                            return Err(Fail::Transient(format!("upload {}: {e}", up.upload_id)));
                        }
                        Ok(Err(e)) => {
                            // Not retriable: this upload fails, the others go on.
                            fail_upload(d, &mut up, e.to_string()).await?;
                            return Ok(Step::Final);
                        }
                    }
                };
                info!(
                    bytes_sent = report.bytes_sent(),
                    total_len = report.total_len,
                    posts = report.posts.len(),
                    retries = report.retries,
                    "upload bytes complete"
                );
                up.bytes_sent += report.bytes_sent();
                up.handle = Some(report.handle);
                up.state = UploadState::Finishing;
                repo.transition_upload(&up, UploadState::Uploading).await?;
                finish_now = true;
            }
            UploadState::Finishing if finish_now => {
                finish(d, seq, &mut up, token).await?;
                finish_now = false;
            }
            UploadState::Finishing => {
                up.state = UploadState::FinishUncertain;
                up.error = Some(
                    "a previous attempt stopped while calling finish_upload: whether a cluster was created \
                     is unknown (the poller reconciles through the activity feed)"
                        .into(),
                );
                up.finished_at = Some(now());
                repo.put_upload(&up).await?;
                warn!("upload left in FINISHING: marked FINISH_UNCERTAIN");
            }
            UploadState::Uploaded => {
                let Some(cluster_id) = up.cluster_id.clone() else {
                    up.state = UploadState::FinishUncertain;
                    up.error = Some("internal error: UPLOADED without cluster_id".into());
                    repo.put_upload(&up).await?;
                    continue;
                };
                let msg = ClusterMessage {
                    upload_id: up.upload_id.clone(),
                    user_id: up.user_id.clone(),
                    sequence_id: up.sequence_id.clone(),
                    cluster_id,
                };
                d.clusters()
                    .send_cluster(&msg)
                    .await
                    .map_err(|e| Fail::Transient(format!("sending the cluster message: {e}")))?;
                up.state = UploadState::HandedOff;
                repo.put_upload(&up).await?;
                info!(cluster_id = %msg.cluster_id, "cluster handed off");
            }
            UploadState::HandedOff | UploadState::FinishUncertain | UploadState::Failed => {
                return Ok(Step::Final)
            }
        }
    }
}

/// Errors worth another delivery (the client already retried within its budget).
fn retry_later(e: &MapillaryError) -> bool {
    e.is_retriable() || matches!(e, MapillaryError::Exhausted { last, .. } if last.is_retriable())
}

async fn fail_upload<D: Deps>(d: &D, up: &mut UploadRecord, error: String) -> Result<(), Fail> {
    warn!(%error, "upload failed");
    up.state = UploadState::Failed;
    up.error = Some(error);
    up.finished_at = Some(now());
    d.repo().put_upload(up).await?;
    Ok(())
}

/// `finish_upload` exactly once per handle. On success the cluster id is logged first, then
/// recorded (UPLOADED), and only then handed off — so no crash leaves it recorded nowhere.
async fn finish<D: Deps>(
    d: &D,
    seq: &SequenceRecord,
    up: &mut UploadRecord,
    token: &mut Session<'_, D>,
) -> Result<(), Fail> {
    let repo = d.repo();
    let Some(handle) = up.handle.clone() else {
        // No handle recorded: upload again (the server holds every byte; an empty POST returns it).
        up.state = UploadState::Uploading;
        return repo
            .transition_upload(up, UploadState::Finishing)
            .await
            .map_err(Into::into);
    };
    let (mly, org) = (d.mapillary(), up.organization_id.clone());
    // A 401 created nothing: the session refreshes the token (once per invocation) and calls again.
    let res = token
        .call(|t| {
            let (handle, org) = (&handle, org.as_deref());
            async move { mly.finish_upload(&t, handle, org).await }
        })
        .await;
    let e = match res {
        Ok(cluster_id) => {
            info!(upload_id = %up.upload_id, cluster_id = %cluster_id, "finish_upload returned a cluster");
            up.cluster_id = Some(cluster_id);
            up.state = UploadState::Uploaded;
            up.finished_at = Some(now());
            up.error = None;
            repo.put_upload(up).await?;
            return Ok(());
        }
        Err(CallError::Refresh(r)) => return Err(token_fail(&seq.user_id, r)),
        Err(CallError::Call(e)) => e,
    };
    if e.is_ambiguous() {
        warn!(error = %e, "finish_upload outcome unknown");
        up.state = UploadState::FinishUncertain;
        up.error = Some(format!("finish_upload outcome unknown: {e}"));
        up.finished_at = Some(now());
        repo.put_upload(up).await?;
        Ok(())
    } else if e.is_retriable() {
        // Definitely not created (e.g. rate limited before sending): go back to UPLOADING so the next
        // attempt gets the handle again and finishes.
        up.state = UploadState::Uploading;
        repo.transition_upload(up, UploadState::Finishing).await?;
        Err(Fail::Transient(format!("finish_upload: {e}")))
    } else if e.is_unauthorized() {
        Err(Fail::Permanent(format!("Mapillary rejected the token: {e}")))
    } else {
        fail_upload(d, up, format!("finish_upload failed: {e}")).await
    }
}
