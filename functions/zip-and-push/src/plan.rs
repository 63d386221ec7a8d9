//! Planning one sequence, or resuming the plan a previous attempt wrote: manifest → EXIF pass
//! (ranged reads of the images' heads) → sequence rules → records (image entries, uploads, then
//! the sequence as UPLOADING). Nothing goes to Mapillary before those records exist; a later
//! attempt that finds the sequence UPLOADING resumes from them instead of planning again.
//!
//! Also the vocabulary of one attempt at a sequence that `upload` and `handler` build on:
//! [`ManifestJob`] (what to process) and [`SequenceError`] (why an attempt stops early).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use md5::{Digest, Md5};
use shared::domain::jpeg;
use shared::domain::sequence::{plan_sequences, SequenceInput};
use shared::domain::zipfmt::ZipPlan;
use shared::mapillary::session::SessionError;
use shared::model::{
    upload_id, RejectedImage, SequenceProgress, SequenceRecord, SequenceState, UploadImage, UploadRecord,
    UploadState,
};
use shared::ports::{ImageEntryStore, ObjectStore, RepoError, SequenceStore, StoreError};
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::deps::Deps;
use crate::exifpass::{read_heads, Candidate, HeadOutcome, HeadPassError, HeadRead};
use crate::manifest::{check_relative_key, is_default_image, parse_manifest, SequenceKey, MANIFEST_NAME};
use crate::reasons;
use crate::records::{planned, save};
use crate::zipstream::comment_len;

/// One manifest to process: where it is, which version, whose sequence, and until when.
#[derive(Debug, Clone)]
pub struct ManifestJob {
    /// Bucket.
    pub bucket: String,
    /// Manifest key (decoded).
    pub manifest_key: String,
    /// Manifest etag (no quotes).
    pub manifest_etag: String,
    /// Which notification of the manifest this is (etag and S3 sequencer): see
    /// [`shared::model::SequenceProgress::manifest_event`].
    pub manifest_event: String,
    /// The SQS message it came in (for records of ignored notifications).
    pub message_id: String,
    /// Ids from the key.
    pub seq: SequenceKey,
    /// Lambda deadline.
    pub deadline: Instant,
}

/// Why an attempt at a sequence stopped before the sequence was final.
#[derive(Debug)]
pub enum SequenceError {
    /// Retrying later may help: the message is retried.
    Transient(String),
    /// The sequence fails with this reason.
    Permanent(String),
    /// Mapillary refuses uploads with the user's token: the sequence waits for the user to hand over
    /// an upload token (the reason says how); its uploads stay as they are.
    AwaitingToken(String),
}

impl From<RepoError> for SequenceError {
    fn from(e: RepoError) -> Self {
        if e.is_transient() {
            SequenceError::Transient(reasons::internal_transient(&e))
        } else {
            SequenceError::Permanent(reasons::internal(&e))
        }
    }
}

/// What the user reads when uploads with the account's OAuth token are refused.
pub fn oauth_upload_refused(mapillary_message: &str) -> String {
    format!(
        "waiting for an upload token: Mapillary refuses uploads with this account's OAuth token \
         ({mapillary_message}). Hand over a Mapillary user upload token with PUT /v1/mapillary/connection, \
         then deliver the manifest again (upload the same manifest.json again) to resume."
    )
}

/// What the user reads when Mapillary refuses the handed-over upload token.
pub fn upload_token_refused(mapillary_message: &str) -> String {
    format!(
        "waiting for an upload token: Mapillary refused the upload token ({mapillary_message}). Hand over \
         a new one with PUT /v1/mapillary/connection, then deliver the manifest again (upload the same \
         manifest.json again) to resume."
    )
}

impl SequenceError {
    /// Why the token of `user_id` cannot be used, as this function reports it.
    pub fn from_session(user_id: &str, e: SessionError) -> Self {
        match e {
            SessionError::Missing => SequenceError::Permanent(format!(
                "no Mapillary token for user {user_id}: connect the account"
            )),
            SessionError::Store(e) if e.is_transient() => {
                SequenceError::Transient(reasons::internal_transient(&e))
            }
            SessionError::Store(e) => {
                // The store's message names KMS and the table: logged, not shown.
                warn!(error = %e, "stored token unusable");
                SequenceError::Permanent(format!(
                    "the stored Mapillary token of user {user_id} cannot be used: connect the account again"
                ))
            }
            SessionError::Mapillary(e) if e.is_retriable() => {
                SequenceError::Transient(format!("token refresh: {e}"))
            }
            SessionError::Mapillary(e) => {
                SequenceError::Permanent(format!("Mapillary rejected the token: {e}"))
            }
            SessionError::NotRefreshable => SequenceError::AwaitingToken(upload_token_refused(
                "Mapillary refused it and upload tokens cannot be refreshed",
            )),
            SessionError::Busy(why) => SequenceError::Transient(format!("token record: {why}")),
        }
    }
}

/// What planning left for this attempt.
#[derive(Debug)]
pub enum Planned {
    /// The sequence (UPLOADING, this attempt counted) and its upload records are written: upload.
    /// With the image entries this attempt planned and wrote (empty when it resumed an earlier
    /// plan): the first upload attempt takes them from here instead of reading them back.
    Uploading(Box<SequenceRecord>, Vec<UploadImage>),
    /// The sequence cannot be uploaded; it is recorded FAILED with its reason.
    Failed,
}

/// The wall clock of records' timestamps.
pub(crate) fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// The record of a sequence not seen before: RECEIVED, nothing planned yet.
pub fn base_record(job: &ManifestJob) -> SequenceRecord {
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
        progress: SequenceProgress {
            attempt: 1,
            manifest_event: Some(job.manifest_event.clone()),
            ..SequenceProgress::default()
        },
    }
}

/// The plan of this attempt: the one a previous attempt wrote when `existing` is UPLOADING
/// (resume), else a new one from the manifest. Either way the attempt is counted on the sequence
/// record before any upload starts.
pub async fn plan_or_resume<D: Deps>(
    d: &D,
    job: &ManifestJob,
    existing: Option<SequenceRecord>,
) -> Result<Planned, SequenceError> {
    let repo = d.repo();
    // A sequence planned again (a re-drop after it failed before anything was planned) keeps its
    // first sighting and its run number.
    let prior = existing
        .as_ref()
        .map(|e| (e.created_at, e.attempts, e.progress.clone()));
    let mut fresh = Vec::new();
    let mut seq = match existing {
        Some(s) if s.state == SequenceState::Uploading => s,
        // Planned, then held for an upload token: resume the recorded uploads.
        Some(mut s) if s.state == SequenceState::AwaitingUploadToken && !s.upload_ids.is_empty() => {
            info!("sequence was waiting for an upload token: resuming");
            s.state = SequenceState::Uploading;
            s.reason = None;
            s
        }
        _ => {
            let mut s = plan_sequence(d, job, &mut fresh).await?;
            if let Some((created_at, attempts, progress)) = prior {
                s.created_at = created_at;
                s.attempts = attempts;
                s.progress.attempt = progress.attempt();
            }
            if s.state == SequenceState::Failed {
                repo.put_sequence(&s).await?;
                warn!(
                    reason = s.reason.as_deref().unwrap_or_default(),
                    "sequence failed"
                );
                return Ok(Planned::Failed);
            }
            s
        }
    };
    seq.attempts += 1;
    seq.progress.manifest_event = Some(job.manifest_event.clone());
    seq.updated_at = now();
    repo.put_sequence(&seq).await?;
    Ok(Planned::Uploading(Box::new(seq), fresh))
}

/// Read the manifest, read the images' heads, apply the sequence rules and write the records
/// (image entries, uploads, then the sequence as UPLOADING). A sequence that cannot be uploaded
/// comes back FAILED with its reason, not yet written. `written` receives the image entries once
/// they are written.
async fn plan_sequence<D: Deps>(
    d: &D,
    job: &ManifestJob,
    written: &mut Vec<UploadImage>,
) -> Result<SequenceRecord, SequenceError> {
    let store = d.store();
    let tun = d.tunables();
    let mut seq = base_record(job);
    let prefix = job.seq.prefix();
    let fail = |mut seq: SequenceRecord, reason: String| {
        seq.state = SequenceState::Failed;
        seq.reason = Some(reasons::public(&reason));
        Ok(seq)
    };
    // One round trip for the manifest and, alongside it, the listing a manifest without an image
    // list needs (S3 answers every request after tens of milliseconds, so the three requests of
    // HEAD, GET and LIST one after another cost three of those): a ranged GET of at most
    // RELAY_MAX_MANIFEST_BYTES tells the whole object's size, so a huge manifest is refused without
    // being read whole. The listing is dropped, unfinished, when the manifest names the images.
    let listing = store.list(&job.bucket, &prefix);
    tokio::pin!(listing);
    let mut listed = None;
    let manifest_read = store.get_range(&job.bucket, &job.manifest_key, 0, tun.max_manifest_bytes.max(1));
    tokio::pin!(manifest_read);
    let manifest_read = loop {
        tokio::select! {
            m = &mut manifest_read => break m,
            l = &mut listing, if listed.is_none() => listed = Some(l),
        }
    };
    let manifest_bytes = match manifest_read {
        Ok(r) if r.total_size > tun.max_manifest_bytes => {
            return fail(
                seq,
                format!(
                    "manifest.json is {} bytes, more than the {} allowed (RELAY_MAX_MANIFEST_BYTES)",
                    r.total_size, tun.max_manifest_bytes
                ),
            )
        }
        Ok(r) => r.bytes,
        Err(StoreError::NotFound(_)) => {
            return fail(seq, "manifest.json was deleted before it could be read".into())
        }
        Err(e) if e.is_transient() => {
            return Err(SequenceError::Transient(reasons::object("manifest.json", &e)))
        }
        Err(e) => return fail(seq, reasons::object("manifest.json", &e)),
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
                        listed_size: None,
                    });
                }
            }
            seq.image_count = list.len() as u32;
        }
        None => {
            let listed = match listed {
                Some(l) => l,
                None => listing.await,
            };
            let listed = match listed {
                Ok(l) => l,
                Err(e) if e.is_transient() => {
                    return Err(SequenceError::Transient(reasons::object(
                        "the sequence's folder",
                        &e,
                    )))
                }
                Err(e) => return fail(seq, reasons::object("the sequence's folder", &e)),
            };
            for o in listed {
                let rel = o.key.strip_prefix(&prefix).unwrap_or(&o.key).to_string();
                if rel != MANIFEST_NAME && is_default_image(&rel) {
                    candidates.push(Candidate {
                        rel,
                        key: o.key,
                        listed_size: Some(o.size),
                    });
                }
            }
            seq.image_count = candidates.len() as u32;
            if candidates.is_empty() {
                return fail(seq, format!("no images: no .jpg/.jpeg object under {prefix}"));
            }
        }
    }

    if seq.image_count as usize > tun.max_images_per_sequence {
        let reason = format!(
            "the sequence has {} images, more than the {} allowed (RELAY_MAX_IMAGES_PER_SEQUENCE)",
            seq.image_count, tun.max_images_per_sequence
        );
        return fail(seq, reason);
    }
    let exif_started = Instant::now();
    let heads = match read_heads(
        store,
        &job.bucket,
        candidates,
        tun.exif_concurrency,
        tun.max_image_bytes,
        tun.max_header_bytes,
    )
    .await
    {
        Ok(h) => h,
        Err(HeadPassError::Store(e)) => {
            return Err(SequenceError::Transient(reasons::object("an image", &e)))
        }
        Err(e @ HeadPassError::HeadersTooLarge { .. }) => return fail(seq, e.to_string()),
    };
    info!(
        images = heads.len(),
        elapsed_ms = exif_started.elapsed().as_millis() as u64,
        "EXIF pass done"
    );
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
                let reason = reasons::internal(&format!("planned image {} without metadata", pi.name));
                seq.rejected.push(RejectedImage { key: pi.name, reason });
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
            outbox: Default::default(),
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
    *written = all_images;
    for up in &mut uploads {
        planned(d, up);
        save(d, up).await?;
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
