//! Uploading a planned sequence: each upload that is not final is driven through its states —
//! stream the zip (resumable, checkpointed per image entry by `zipstream`) → `finish_upload`
//! (exactly once per handle; a lost reply becomes FINISH_UNCERTAIN) → cluster message — then the
//! sequence is concluded UPLOADED or FAILED. Uploads go as bounded, complete POSTs and no POST
//! starts within the deadline margin, so a continuation resumes from the server's offset without
//! re-sending a byte. A 401 with a token that `/me` still accepts means Mapillary refuses uploads
//! with it: the connection is marked and the sequence waits for an upload token instead of failing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};

use shared::mapillary::client::{UploadLimits, UploadOutcome};
use shared::mapillary::error::MapillaryError;
use shared::mapillary::session::{CallError, SessionError, TokenSession};
use shared::model::{
    ClusterMessage, SequenceRecord, SequenceState, TokenKind, UploadImage, UploadRecord, UploadState,
};
use shared::ports::{
    ClusterQueue, ImageEntryReader, MapillaryAuth, MapillaryUploads, RepoError, SequenceStore, UploadReader,
};
use tracing::{error, info, info_span, warn, Instrument};

use crate::deps::Deps;
use crate::plan::{now, oauth_upload_refused, upload_token_refused, ManifestJob, SequenceError};
use crate::reasons;
use crate::records::{save, save_transition, set_state};
use crate::zipstream::{upload_zip, UploadFailure, ZipSource};

/// The user's token session of this invocation (see `shared::mapillary::session`).
pub type Session<'a, D> = TokenSession<'a, <D as Deps>::Tokens, <D as Deps>::Mapillary>;

/// Where driving stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadStop {
    /// Final: the upload (or, from [`upload_sequence`], the sequence) is recorded in a final state.
    Final,
    /// The deadline is near: a continuation resumes from the records.
    OutOfTime,
}

/// Drive every upload of `seq` that is not final, then record the sequence UPLOADED (at least one
/// upload delivered, possibly FINISH_UNCERTAIN) or FAILED (none). A connection already known to need
/// an upload token ([`shared::model::TokenRecord::upload_token_required`]) sends nothing: the
/// sequence waits ([`SequenceError::AwaitingToken`]). `fresh`: the image entries this invocation
/// just planned and wrote (empty when resuming), used instead of reading them back.
pub async fn upload_sequence<D: Deps>(
    d: &D,
    job: &ManifestJob,
    mut seq: SequenceRecord,
    fresh: Vec<UploadImage>,
    token: &mut Session<'_, D>,
) -> Result<UploadStop, SequenceError> {
    let repo = d.repo();
    if let Some(refusal) = token
        .record()
        .upload_refused
        .as_ref()
        .filter(|_| token.record().upload_token_required())
    {
        // Known from an earlier upload: no request that Mapillary is known to refuse.
        info!(
            token_kind = token.kind().as_str(),
            "connection is marked upload_token_required"
        );
        return Err(SequenceError::AwaitingToken(oauth_upload_refused(
            &refusal.message,
        )));
    }
    let mut fresh_by_upload: HashMap<String, Vec<UploadImage>> = HashMap::new();
    for img in fresh {
        fresh_by_upload
            .entry(img.upload_id.clone())
            .or_default()
            .push(img);
    }
    let uploads = repo.list_uploads(&job.seq.user_id, &job.seq.sequence_id).await?;
    for up in uploads {
        if up.state.is_final() {
            continue;
        }
        let fresh = fresh_by_upload.remove(&up.upload_id);
        let span = info_span!("upload", upload_id = %up.upload_id, token_kind = token.kind().as_str());
        match drive_upload(d, job, &seq, up, fresh, token)
            .instrument(span)
            .await?
        {
            UploadStop::Final => {}
            UploadStop::OutOfTime => return Ok(UploadStop::OutOfTime),
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
    Ok(UploadStop::Final)
}

/// Drive one upload from its recorded state until it is final or the deadline is near. `fresh`:
/// its image entries as this invocation planned and wrote them (ordered by index, no checkpoints
/// yet) — the first attempt uses them instead of reading the entries back; later attempts read them.
async fn drive_upload<D: Deps>(
    d: &D,
    job: &ManifestJob,
    seq: &SequenceRecord,
    mut up: UploadRecord,
    mut fresh: Option<Vec<UploadImage>>,
    token: &mut Session<'_, D>,
) -> Result<UploadStop, SequenceError> {
    let repo = d.repo();
    let mut finish_now = false;
    loop {
        match up.state {
            UploadState::Uploading if up.handle.is_some() => {
                // Every byte was accepted and the handle recorded, but finish_upload was not called
                // (deferred for lack of time) or created nothing (refused): finish with that handle.
                if !finish_fits(d, job) {
                    info!("too little time left for finish_upload and saving its cluster_id: deferred");
                    return Ok(UploadStop::OutOfTime);
                }
                set_state(d, &mut up, UploadState::Finishing);
                save_transition(d, &mut up, UploadState::Uploading).await?;
                finish_now = true;
            }
            UploadState::Pending | UploadState::Uploading => {
                let images = match fresh.take() {
                    Some(images) => images,
                    None => repo.list_images(&up.upload_id).await?,
                };
                if images.len() != up.image_count as usize {
                    let msg = reasons::internal(&format!(
                        "upload {}: {} image entries recorded, {} expected",
                        up.upload_id,
                        images.len(),
                        up.image_count
                    ));
                    fail_upload(d, &mut up, msg).await?;
                    continue;
                }
                let upload_id = up.upload_id.clone();
                let source = match ZipSource::new(
                    d.store(),
                    repo,
                    &job.bucket,
                    &upload_id,
                    &images,
                    d.tunables().prefetch_bytes,
                ) {
                    Ok(s) if s.total_len() == up.total_len => s,
                    Ok(s) => {
                        let msg = reasons::internal(&format!(
                            "upload {}: zip of {} bytes planned, {} recorded",
                            up.upload_id,
                            s.total_len(),
                            up.total_len
                        ));
                        fail_upload(d, &mut up, msg).await?;
                        continue;
                    }
                    Err(e) => {
                        fail_upload(d, &mut up, e.to_string()).await?;
                        continue;
                    }
                };
                if up.state == UploadState::Pending {
                    set_state(d, &mut up, UploadState::Uploading);
                    up.started_at = Some(now());
                }
                up.attempts += 1;
                save(d, &mut up).await?;
                token
                    .ensure_fresh()
                    .await
                    .map_err(|e| SequenceError::from_session(&seq.user_id, e))?;
                let report = loop {
                    let at = Instant::now();
                    let Some(budget) = job
                        .deadline
                        .saturating_duration_since(at)
                        .checked_sub(d.tunables().deadline_margin)
                        .filter(|b| !b.is_zero())
                    else {
                        return Ok(UploadStop::OutOfTime);
                    };
                    // No POST starts after `stop_at`; one already started runs to its end inside the
                    // margin (the bound is sized for that). The timeout at the deadline itself is the
                    // backstop for a POST slower than the margin allows.
                    let limits = UploadLimits {
                        max_post_bytes: d.tunables().max_post_bytes,
                        stop_at: Some(at + budget),
                    };
                    info!(token_kind = token.kind().as_str(), "uploading");
                    let attempt = upload_zip(d.mapillary(), &source, token.access(), &up.session_key, limits);
                    match tokio::time::timeout(job.deadline.saturating_duration_since(at), attempt).await {
                        Err(_) => {
                            warn!(
                                "deadline reached during a POST: it was cut (a POST must fit in \
                                 RELAY_DEADLINE_MARGIN_S; lower RELAY_MAX_POST_BYTES)"
                            );
                            return Ok(UploadStop::OutOfTime);
                        }
                        Ok(Ok(UploadOutcome::Complete(report))) => break report,
                        Ok(Ok(UploadOutcome::Paused(report))) => {
                            info!(
                                posts = report.posts.len(),
                                bytes_sent = report.bytes_sent(),
                                "deadline near: upload paused between two POSTs; a follow-up invocation resumes"
                            );
                            up.bytes_sent += report.bytes_sent();
                            save(d, &mut up).await?;
                            return Ok(UploadStop::OutOfTime);
                        }
                        Ok(Err(UploadFailure::Mapillary(e))) if e.is_unauthorized() => {
                            unauthorized(d, token, &e).await?;
                        }
                        Ok(Err(UploadFailure::Mapillary(e))) if retry_later(&e) => {
                            return Err(SequenceError::Transient(reasons::public(&format!(
                                "upload {}: {e}",
                                up.upload_id
                            ))));
                        }
                        Ok(Err(UploadFailure::Source(e))) if e.is_transient() => {
                            return Err(SequenceError::Transient(reasons::public(&format!(
                                "upload {}: {e}",
                                up.upload_id
                            ))));
                        }
                        Ok(Err(e)) => {
                            // Not retriable: this upload fails, the others go on.
                            fail_upload(d, &mut up, e.to_string()).await?;
                            return Ok(UploadStop::Final);
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
                if !finish_fits(d, job) {
                    // The handle is kept (UPLOADING): the next invocation calls finish_upload with it.
                    save(d, &mut up).await?;
                    info!("too little time left for finish_upload and saving its cluster_id: deferred");
                    return Ok(UploadStop::OutOfTime);
                }
                set_state(d, &mut up, UploadState::Finishing);
                save_transition(d, &mut up, UploadState::Uploading).await?;
                finish_now = true;
            }
            UploadState::Finishing if finish_now => {
                finish(d, seq, &mut up, token).await?;
                finish_now = false;
            }
            UploadState::Finishing => {
                set_state(d, &mut up, UploadState::FinishUncertain);
                up.error = Some(
                    "a previous attempt stopped while calling finish_upload: whether a cluster was created \
                     is unknown (the poller reconciles through the activity feed)"
                        .into(),
                );
                up.finished_at = Some(now());
                save(d, &mut up).await?;
                warn!("upload left in FINISHING: marked FINISH_UNCERTAIN");
            }
            UploadState::Uploaded => {
                let Some(cluster_id) = up.cluster_id.clone() else {
                    set_state(d, &mut up, UploadState::FinishUncertain);
                    up.error = Some(reasons::internal(&format!(
                        "upload {} is UPLOADED without cluster_id",
                        up.upload_id
                    )));
                    save(d, &mut up).await?;
                    continue;
                };
                let msg = ClusterMessage {
                    upload_id: up.upload_id.clone(),
                    user_id: up.user_id.clone(),
                    sequence_id: up.sequence_id.clone(),
                    cluster_id,
                };
                d.clusters().send_cluster(&msg).await.map_err(|e| {
                    SequenceError::Transient(reasons::internal_transient(&format!(
                        "sending the cluster message: {e}"
                    )))
                })?;
                set_state(d, &mut up, UploadState::HandedOff);
                save(d, &mut up).await?;
                info!(cluster_id = %msg.cluster_id, "cluster handed off");
            }
            UploadState::HandedOff | UploadState::FinishUncertain | UploadState::Failed => {
                return Ok(UploadStop::Final)
            }
        }
    }
}

/// After a 401 on rupload or `finish_upload`: refresh once (an expired OAuth token); a token
/// refused again right after this invocation refreshed it, by `/me` too, is retried in a later
/// invocation (transient); a token that is still refused but that `/me` accepts is valid and only refused for uploads — the connection is
/// marked `upload_token_required` and the sequence waits for an upload token. `Ok(())` means: try
/// again with the session's (refreshed or newly stored) token.
async fn unauthorized<D: Deps>(
    d: &D,
    token: &mut Session<'_, D>,
    e: &MapillaryError,
) -> Result<(), SequenceError> {
    let user = token.user_id().to_string();
    match token.on_unauthorized().await {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        Err(SessionError::NotRefreshable) => {
            warn!(token_kind = "upload_token", error = %e, "Mapillary refuses the upload token");
            return Err(SequenceError::AwaitingToken(upload_token_refused(&e.to_string())));
        }
        Err(r) => return Err(SequenceError::from_session(&user, r)),
    }
    match d.mapillary().me(token.access()).await {
        Ok(_) => {}
        // Refreshed in this invocation (Mapillary accepted the refresh and issued this token) and
        // refused again at once: the token expired again right after its refresh, which is not
        // proof the connection is dead. A later invocation starts a new session (and refreshes
        // again: a refused refresh is the connection-broken path); the attempts-without-progress
        // limit bounds the retries.
        Err(me) if me.is_unauthorized() && token.refreshed() => {
            warn!(error = %me, "the token was refused again right after its refresh: retrying in a later invocation");
            return Err(SequenceError::Transient(format!(
                "Mapillary refused the token again right after refreshing it: {e}"
            )));
        }
        Err(me) if me.is_unauthorized() => {
            return Err(SequenceError::Permanent(format!(
                "Mapillary rejected the token: {e}"
            )))
        }
        Err(me) => {
            return Err(SequenceError::Transient(format!(
                "checking the token with /me after an upload refusal: {me}"
            )))
        }
    }
    let message = e.to_string();
    match token.kind() {
        TokenKind::UploadToken => {
            warn!(token_kind = "upload_token", error = %e, "Mapillary refuses uploads with the upload token");
            Err(SequenceError::AwaitingToken(upload_token_refused(&message)))
        }
        TokenKind::Oauth => match token.mark_upload_refused(&message).await {
            Ok(true) => Err(SequenceError::AwaitingToken(oauth_upload_refused(&message))),
            Ok(false) => {
                info!(
                    token_kind = token.kind().as_str(),
                    "another token was stored meanwhile: trying it"
                );
                Ok(())
            }
            Err(r) => Err(SequenceError::from_session(&user, r)),
        },
    }
}

/// Whether `finish_upload` may start now: its timeout (`RELAY_FINISH_TIMEOUT_S`) plus the budget of
/// saving the cluster_id it returns (`RELAY_CLUSTER_SAVE_BUDGET_S`) fit before the deadline. Started
/// later, an invocation cut at the deadline could lose the reply or the cluster_id (issue 15, item 6).
fn finish_fits<D: Deps>(d: &D, job: &ManifestJob) -> bool {
    let t = d.tunables();
    job.deadline.saturating_duration_since(Instant::now()) >= t.finish_timeout + t.cluster_save_budget
}

/// Record `up` (UPLOADED with its cluster_id) with retries and backoff for up to
/// `RELAY_CLUSTER_SAVE_BUDGET_S`: a cluster_id Mapillary returned must not be lost to one failed
/// write. The last error when the budget is spent (the id is in the logs; the record stays
/// FINISHING, which the next attempt turns into FINISH_UNCERTAIN for the poller to reconcile).
async fn save_cluster<D: Deps>(d: &D, up: &mut UploadRecord) -> Result<(), RepoError> {
    let until = Instant::now() + d.tunables().cluster_save_budget;
    let mut waits = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(20))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .build();
    let mut tries = 0u32;
    loop {
        tries += 1;
        let err = match save(d, up).await {
            Ok(()) => {
                if tries > 1 {
                    info!(tries, "cluster_id saved after retries");
                }
                return Ok(());
            }
            Err(e) => e,
        };
        let wait = waits.next().unwrap_or(Duration::from_secs(2));
        if Instant::now() + wait >= until {
            error!(error = %err, tries, cluster_id = up.cluster_id.as_deref().unwrap_or_default(),
                "saving the cluster_id failed within its budget");
            return Err(err);
        }
        warn!(error = %err, tries, "saving the cluster_id failed: retrying");
        tokio::time::sleep(wait).await;
    }
}

/// Errors worth another delivery (the client already retried within its budget).
fn retry_later(e: &MapillaryError) -> bool {
    e.is_retriable() || matches!(e, MapillaryError::Exhausted { last, .. } if last.is_retriable())
}

async fn fail_upload<D: Deps>(d: &D, up: &mut UploadRecord, error: String) -> Result<(), SequenceError> {
    warn!(%error, "upload failed");
    set_state(d, up, UploadState::Failed);
    up.error = Some(reasons::public(&error));
    up.finished_at = Some(now());
    save(d, up).await?;
    Ok(())
}

/// `finish_upload` exactly once per handle. On success the cluster id is logged first, then
/// recorded (UPLOADED), and only then handed off — so no crash leaves it recorded nowhere.
async fn finish<D: Deps>(
    d: &D,
    seq: &SequenceRecord,
    up: &mut UploadRecord,
    token: &mut Session<'_, D>,
) -> Result<(), SequenceError> {
    let Some(handle) = up.handle.clone() else {
        // No handle recorded: upload again (the server holds every byte; an empty POST returns it).
        set_state(d, up, UploadState::Uploading);
        return save_transition(d, up, UploadState::Finishing)
            .await
            .map_err(Into::into);
    };
    let (mly, org) = (d.mapillary(), up.organization_id.clone());
    info!(token_kind = token.kind().as_str(), "calling finish_upload");
    // A 401 created nothing: the session refreshes the token (once per invocation) and calls again.
    let call = token.call(|t| {
        let (handle, org) = (&handle, org.as_deref());
        async move { mly.finish_upload(&t, handle, org).await }
    });
    let Ok(res) = tokio::time::timeout(d.tunables().finish_timeout, call).await else {
        // The request may have reached Mapillary: the outcome is unknown, never called again.
        warn!("finish_upload did not answer within RELAY_FINISH_TIMEOUT_S: outcome unknown");
        set_state(d, up, UploadState::FinishUncertain);
        up.error = Some("finish_upload outcome unknown: no reply in time".into());
        up.finished_at = Some(now());
        save(d, up).await?;
        return Ok(());
    };
    let e = match res {
        Ok(cluster_id) => {
            info!(upload_id = %up.upload_id, cluster_id = %cluster_id, "finish_upload returned a cluster");
            up.cluster_id = Some(cluster_id);
            set_state(d, up, UploadState::Uploaded);
            up.finished_at = Some(now());
            up.error = None;
            save_cluster(d, up).await?;
            return Ok(());
        }
        Err(CallError::Refresh(r)) => {
            if matches!(r, SessionError::NotRefreshable) {
                // The 401 created nothing: resume from the upload (an empty POST returns the handle).
                set_state(d, up, UploadState::Uploading);
                save_transition(d, up, UploadState::Finishing).await?;
            }
            return Err(SequenceError::from_session(&seq.user_id, r));
        }
        Err(CallError::Call(e)) => e,
    };
    if e.is_ambiguous() {
        warn!(error = %e, "finish_upload outcome unknown");
        set_state(d, up, UploadState::FinishUncertain);
        up.error = Some(format!("finish_upload outcome unknown: {e}"));
        up.finished_at = Some(now());
        save(d, up).await?;
        Ok(())
    } else if e.is_retriable() {
        // Definitely not created (e.g. rate limited before sending): go back to UPLOADING so the next
        // attempt gets the handle again and finishes.
        set_state(d, up, UploadState::Uploading);
        save_transition(d, up, UploadState::Finishing).await?;
        Err(SequenceError::Transient(format!("finish_upload: {e}")))
    } else if e.is_unauthorized() {
        // A 401 created nothing: back to UPLOADING, so that the next step (with the session's token
        // if it changed, or in a later invocation) gets the handle again and finishes.
        set_state(d, up, UploadState::Uploading);
        save_transition(d, up, UploadState::Finishing).await?;
        unauthorized(d, token, &e).await
    } else {
        fail_upload(d, up, format!("finish_upload failed: {e}")).await
    }
}
