//! The SQS batch handler: one S3 notification per record, each processed under a claim of its
//! manifest (idempotency), failures reported per record (`ReportBatchItemFailures`). For each
//! claimed manifest, one attempt at its sequence ([`run_sequence`]): plan ([`crate::plan`]), then
//! upload ([`crate::upload`]); how the attempt ended decides the record's result (acknowledge,
//! continuation, retry, or give up after `max_receives` deliveries).

use std::time::{Duration, Instant};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use futures::StreamExt;
use shared::idempotency::{sequence_claim_id, Claim, ClaimOutcome, ClaimStatus};
use shared::mapillary::session::{SessionContext, TokenSession};
use shared::model::{
    IngestError, SequenceProgress, SequenceRecord, SequenceState, SequenceStatus, UploadState,
};
use shared::ports::{
    IdempotencyStore, IngestErrorLog, IngestRequeue, ObjectStore, RepoError, SequenceReader, SequenceStore,
    UploadReader,
};
use shared::s3event::{self, Notification, ObjectCreated};
use time::OffsetDateTime;
use tracing::{error, info, info_span, warn, Instrument};

use crate::deps::Deps;
use crate::manifest::{parse_manifest_key, SequenceKey};
use crate::plan::{base_record, plan_or_resume, ManifestJob, Planned, SequenceError};
use crate::progress::{count_invocation, progress_mark, Verdict};
use crate::reasons;
use crate::records::{save, set_state};
use crate::upload::{upload_sequence, UploadStop};

/// Records processed at the same time.
const RECORD_CONCURRENCY: usize = 4;
/// Claims are kept (TTL) this long after their last write.
const CLAIM_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Handle an SQS batch; `deadline` is the Lambda deadline. Records run concurrently (bounded);
/// every record that should be retried is listed in the response. (Unlike Powertools, an
/// all-failed batch is not turned into an `Err`: the response already reports each record.)
pub async fn handle_batch<D: Deps>(deps: &D, event: SqsEvent, deadline: Instant) -> SqsBatchResponse {
    let results: Vec<(Option<String>, bool)> = futures::stream::iter(event.records)
        .map(|rec| async move {
            let acked = handle_record(deps, &rec, deadline).await;
            (rec.message_id.clone(), acked)
        })
        .buffer_unordered(RECORD_CONCURRENCY)
        .collect()
        .await;
    let mut resp = SqsBatchResponse::default();
    for (id, acked) in results {
        if !acked {
            match id {
                Some(id) => resp.add_failure(id),
                None => error!("a record without messageId failed; it cannot be reported for retry"),
            }
        }
    }
    resp
}

/// The status document of a sequence, `None` when it is unknown.
pub async fn sequence_status<R: SequenceReader + UploadReader>(
    repo: &R,
    user_id: &str,
    sequence_id: &str,
) -> Result<Option<SequenceStatus>, RepoError> {
    let Some(seq) = repo.get_sequence(user_id, sequence_id).await? else {
        return Ok(None);
    };
    let uploads = repo.list_uploads(user_id, sequence_id).await?;
    Ok(Some(SequenceStatus::from_records(&seq, &uploads)))
}

fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// `true` = acknowledge, `false` = report as a batch item failure.
async fn handle_record<D: Deps>(d: &D, rec: &SqsMessage, deadline: Instant) -> bool {
    let message_id = rec.message_id.clone().unwrap_or_default();
    let span = info_span!("message", message_id = %message_id);
    async {
        let Some(body) = rec.body.as_deref() else {
            return ingest_error(d, &message_id, None, "<no body>", "SQS message has no body").await;
        };
        match s3event::parse_body(body) {
            Err(e) => {
                let excerpt: String = body.chars().take(200).collect();
                ingest_error(d, &message_id, None, &excerpt, &e.to_string()).await
            }
            Ok(Notification::TestEvent) => {
                info!("s3:TestEvent acknowledged");
                true
            }
            Ok(Notification::Records(objects)) => {
                let receives = rec
                    .attributes
                    .get("ApproximateReceiveCount")
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(1);
                let mut acked = true;
                for o in &objects {
                    acked &= handle_object(d, &message_id, body, o, receives, deadline).await;
                }
                acked
            }
        }
    }
    .instrument(span)
    .await
}

async fn ingest_error<D: Deps>(
    d: &D,
    message_id: &str,
    bucket: Option<&str>,
    key: &str,
    reason: &str,
) -> bool {
    warn!(key, reason, "notification ignored");
    let e = IngestError {
        at: OffsetDateTime::now_utc(),
        message_id: message_id.to_string(),
        bucket: bucket.map(str::to_string),
        key: key.to_string(),
        reason: reason.to_string(),
    };
    match d.repo().record_ingest_error(&e).await {
        Ok(()) => true,
        Err(err) => {
            error!(error = %err, "recording the ingest error failed");
            !err.is_transient()
        }
    }
}

async fn handle_object<D: Deps>(
    d: &D,
    message_id: &str,
    body: &str,
    o: &ObjectCreated,
    receives: u32,
    deadline: Instant,
) -> bool {
    // Only our own bucket: a notification naming another one (a misrouted or forged message) would
    // make the function read and upload objects it was never meant to handle.
    if let Some(own) = &d.tunables().own_bucket {
        if &o.bucket != own {
            return ingest_error(
                d,
                message_id,
                Some(&o.bucket),
                &o.key,
                "notification for a bucket other than RELAY_BUCKET: ignored",
            )
            .await;
        }
    }
    let seq = match parse_manifest_key(&o.key) {
        Ok(s) => s,
        Err(e) => return ingest_error(d, message_id, Some(&o.bucket), &o.key, &e.to_string()).await,
    };
    let span = info_span!("sequence", user_id = %seq.user_id, sequence_id = %seq.sequence_id);
    async {
        let etag = match o
            .etag
            .as_deref()
            .map(|e| e.trim_matches('"'))
            .filter(|e| !e.is_empty())
        {
            Some(e) => e.to_string(),
            None => match d.store().head(&o.bucket, &o.key).await {
                Ok(info) => info.etag,
                Err(e) if e.is_transient() => {
                    warn!(error = %e, "HEAD of the manifest failed");
                    return false;
                }
                Err(e) => {
                    return ingest_error(d, message_id, Some(&o.bucket), &o.key, &e.to_string()).await;
                }
            },
        };
        // One claim per sequence: a second manifest version waits for the run in progress.
        let id = sequence_claim_id(&o.bucket, &o.key);
        let owner = format!("{message_id}/{}", uuid::Uuid::new_v4());
        let now = now_ms();
        let remaining = deadline.saturating_duration_since(Instant::now());
        let lease_until_ms = now + (remaining + d.tunables().deadline_margin).as_millis() as i64;
        let claim = Claim {
            id: id.clone(),
            status: ClaimStatus::Inprogress,
            lease_until_ms,
            owner: owner.clone(),
            expiration: now / 1000 + CLAIM_TTL.as_secs() as i64,
        };
        let mut outcome = d.claims().claim(&claim, now).await;
        if let Ok(ClaimOutcome::Completed) = outcome {
            // The sequence was final when the claim was completed. Take it again: under it, the
            // sequence record tells a duplicate from a re-drop ([`attempt`]).
            outcome = match d.claims().reopen_claim(&claim).await {
                Ok(true) => Ok(ClaimOutcome::Acquired { previous: None }),
                // Taken or gone meanwhile: what is it now?
                Ok(false) => d.claims().claim(&claim, now).await,
                Err(e) => Err(e),
            };
        }
        match outcome {
            Ok(ClaimOutcome::Completed) => {
                info!("sequence already processed: duplicate acknowledged");
                return true;
            }
            Ok(ClaimOutcome::Held { lease_until_ms }) => {
                info!(
                    lease_until_ms,
                    "sequence is being processed by another invocation"
                );
                return put_back(d, body).await;
            }
            Ok(ClaimOutcome::Acquired { previous }) => {
                if previous.is_some() {
                    info!("took over an expired claim: resuming");
                }
            }
            Err(e) => {
                warn!(error = %e, "claiming the manifest failed");
                return false;
            }
        }
        // Fair share: at most RELAY_MAX_ACTIVE_SEQUENCES_PER_USER of a user's sequences at once.
        let user_id = seq.user_id.clone();
        let cap = d.tunables().max_active_sequences_per_user;
        if cap > 0 {
            match d
                .claims()
                .take_user_slot(&user_id, &owner, lease_until_ms, now, cap)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    release(d, &id, &owner).await;
                    info!(cap, "the user has as many sequences in progress as allowed");
                    return put_back(d, body).await;
                }
                Err(e) => {
                    warn!(error = %e, "taking a slot of the user failed");
                    release(d, &id, &owner).await;
                    return false;
                }
            }
        }
        let acked = run_claimed(
            d, body, o, &etag, seq, deadline, message_id, &id, &owner, receives,
        )
        .await;
        if cap > 0 {
            if let Err(e) = d.claims().release_user_slot(&user_id, &owner).await {
                warn!(error = %e, "giving the user's slot back failed (it ends with its lease)");
            }
        }
        acked
    }
    .instrument(span)
    .await
}

/// Put the delivery `body` back on the queue with `RELAY_HELD_RETRY_DELAY_SECONDS` and acknowledge
/// it: waiting (for another invocation, or for a slot of the user) is no failure and must not
/// count toward the DLQ the way a visibility timeout would.
async fn put_back<D: Deps>(d: &D, body: &str) -> bool {
    let delay = d.tunables().held_retry_delay_s;
    match d.requeue().requeue(body, delay).await {
        Ok(()) => {
            info!(delay, "delivery put back to wait");
            true
        }
        Err(e) => {
            warn!(error = %e, "putting the delivery back failed: leaving the message to SQS");
            false
        }
    }
}

/// One attempt at a claimed sequence, and what its end means for the claim and the message.
#[allow(clippy::too_many_arguments)]
async fn run_claimed<D: Deps>(
    d: &D,
    body: &str,
    o: &ObjectCreated,
    etag: &str,
    seq: SequenceKey,
    deadline: Instant,
    message_id: &str,
    id: &str,
    owner: &str,
    receives: u32,
) -> bool {
    let job = ManifestJob {
        bucket: o.bucket.clone(),
        manifest_key: o.key.clone(),
        manifest_event: manifest_event(etag, o),
        manifest_etag: etag.to_string(),
        seq,
        deadline,
        message_id: message_id.to_string(),
    };
    let end = match run_sequence(d, &job).await {
        end @ (AttemptEnd::OutOfTime | AttemptEnd::Retry(_)) => count_progress(d, &job, end).await,
        end => end,
    };
    match end {
        AttemptEnd::Final => {
            if let Err(e) = d.claims().complete_claim(id, owner).await {
                warn!(error = %e, "completing the claim failed (a duplicate will find the sequence final)");
            }
            true
        }
        AttemptEnd::OutOfTime => {
            release(d, id, owner).await;
            match d.requeue().requeue(body, 0).await {
                Ok(()) => {
                    info!("out of time: continuation queued");
                    true
                }
                Err(e) => {
                    warn!(error = %e, "queueing the continuation failed: leaving the message to SQS");
                    false
                }
            }
        }
        AttemptEnd::AwaitingToken => {
            // Not completed: the same manifest delivered again (after the user hands over an
            // upload token) claims it again and resumes the recorded uploads.
            release(d, id, owner).await;
            info!("sequence waits for an upload token: acknowledged, claim released");
            true
        }
        AttemptEnd::Retry(reason) if receives >= d.tunables().max_receives => {
            error!(%reason, receives, "sequence failed: last delivery");
            let reason = format!(
                "gave up after {receives} deliveries: {}",
                reasons::public(&reason)
            );
            match fail_sequence(d, &job, &reason).await {
                Ok(()) => {
                    if let Err(e) = d.claims().complete_claim(id, owner).await {
                        warn!(error = %e, "completing the claim failed");
                    }
                    true
                }
                Err(e) => {
                    warn!(error = %e, "recording the failure failed");
                    release(d, id, owner).await;
                    false
                }
            }
        }
        AttemptEnd::Retry(reason) => {
            warn!(%reason, receives, "transient failure: the message will be retried");
            release(d, id, owner).await;
            false
        }
    }
}

/// Count an invocation that ended before its sequence was final ([`crate::progress`]): at
/// `RELAY_MAX_INVOCATIONS_WITHOUT_PROGRESS` in a row without progress the sequence is FAILED with
/// the last error and the attempt is [`AttemptEnd::Final`]; otherwise `end` stands. A failure to
/// count leaves `end` as it is (SQS's receive count still bounds plain retries).
async fn count_progress<D: Deps>(d: &D, job: &ManifestJob, end: AttemptEnd) -> AttemptEnd {
    let error = match &end {
        AttemptEnd::Retry(r) => Some(reasons::public(r)),
        _ => None,
    };
    let repo = d.repo();
    let (user, sequence) = (&job.seq.user_id, &job.seq.sequence_id);
    let counted = async {
        let Some(mut seq) = repo.get_sequence(user, sequence).await? else {
            return Ok(None);
        };
        if matches!(seq.state, SequenceState::Uploaded | SequenceState::Failed) {
            return Ok(None);
        }
        let mark = progress_mark(&repo.list_uploads(user, sequence).await?);
        let max = d.tunables().max_invocations_without_progress;
        let verdict = count_invocation(&mut seq.progress, mark, error.as_deref(), max);
        seq.updated_at = OffsetDateTime::now_utc();
        repo.put_sequence(&seq).await?;
        info!(
            mark,
            stalled = seq.progress.stalled,
            max,
            "invocation ended before the sequence was final"
        );
        Ok::<_, RepoError>(Some(verdict))
    }
    .await;
    match counted {
        Ok(Some(Verdict::GiveUp(reason))) => {
            error!(%reason, "sequence makes no progress: giving up");
            match fail_sequence(d, job, &reason).await {
                Ok(()) => AttemptEnd::Final,
                Err(e) => {
                    warn!(error = %e, "recording the failure failed");
                    end
                }
            }
        }
        Ok(_) => end,
        Err(e) => {
            warn!(error = %e, "counting the invocation failed");
            end
        }
    }
}

/// Which notification of the manifest this is: its etag, S3's `sequencer` (or the version id) and
/// `eventTime` — the same in every delivery of one notification (SQS duplicates, continuations
/// carry its body verbatim), different for a manifest put again (S3 orders the puts of a key by
/// `sequencer`; the time also tells puts apart where the sequencer is constant, as in moto).
fn manifest_event(etag: &str, o: &ObjectCreated) -> String {
    let put = o
        .sequencer
        .as_deref()
        .or(o.version_id.as_deref())
        .unwrap_or_default();
    let at = o.event_time.as_deref().unwrap_or_default();
    format!("{etag}@{put}@{at}")
}

async fn release<D: Deps>(d: &D, id: &str, owner: &str) {
    if let Err(e) = d.claims().renew_claim(id, owner, now_ms() - 1).await {
        warn!(error = %e, "releasing the claim failed (it expires with its lease)");
    }
}

// ------------------------------------------------------------------ one sequence

/// How an attempt at a sequence ended, i.e. what the handler does with its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptEnd {
    /// Final (uploaded or failed, recorded): acknowledge and complete the claim.
    Final,
    /// Out of time: release the claim and continue in a follow-up invocation.
    OutOfTime,
    /// Recorded AWAITING_UPLOAD_TOKEN: acknowledge and release the claim (a new delivery of the
    /// manifest resumes).
    AwaitingToken,
    /// Transient failure: retry the message later.
    Retry(String),
}

/// Process `job` as far as the deadline allows: plan (or resume the plan), then upload
/// ([`crate::plan`], [`crate::upload`]).
pub async fn run_sequence<D: Deps>(d: &D, job: &ManifestJob) -> AttemptEnd {
    match attempt(d, job).await {
        Ok(end) => end,
        Err(SequenceError::Transient(r)) => AttemptEnd::Retry(r),
        Err(SequenceError::AwaitingToken(reason)) => match await_token(d, job, &reason).await {
            Ok(()) => AttemptEnd::AwaitingToken,
            Err(e) => AttemptEnd::Retry(format!("recording the wait for an upload token failed: {e}")),
        },
        Err(SequenceError::Permanent(reason)) => {
            warn!(%reason, "sequence failed");
            match fail_sequence(d, job, &reason).await {
                Ok(()) => AttemptEnd::Final,
                Err(e) => AttemptEnd::Retry(format!("recording the failure ({reason}) failed: {e}")),
            }
        }
    }
}

/// Record the sequence as AWAITING_UPLOAD_TOKEN with `reason` (what the user does); its uploads
/// stay as they are, to be resumed.
async fn await_token<D: Deps>(d: &D, job: &ManifestJob, reason: &str) -> Result<(), RepoError> {
    let repo = d.repo();
    let mut seq = repo
        .get_sequence(&job.seq.user_id, &job.seq.sequence_id)
        .await?
        .unwrap_or_else(|| base_record(job));
    warn!(%reason, "sequence waits for an upload token");
    seq.state = SequenceState::AwaitingUploadToken;
    seq.reason = Some(reason.to_string());
    seq.updated_at = OffsetDateTime::now_utc();
    repo.put_sequence(&seq).await
}

/// Record the sequence as FAILED with `reason` (keeping what is known), and every upload that is
/// not final as FAILED too.
pub async fn fail_sequence<D: Deps>(d: &D, job: &ManifestJob, reason: &str) -> Result<(), RepoError> {
    let repo = d.repo();
    let mut seq = repo
        .get_sequence(&job.seq.user_id, &job.seq.sequence_id)
        .await?
        .unwrap_or_else(|| base_record(job));
    for mut up in repo.list_uploads(&job.seq.user_id, &job.seq.sequence_id).await? {
        if !up.state.is_final() && up.state != UploadState::Uploaded {
            set_state(d, &mut up, UploadState::Failed);
            up.error = Some(reasons::public(reason));
            up.finished_at = Some(OffsetDateTime::now_utc());
            save(d, &mut up).await?;
        }
    }
    seq.state = SequenceState::Failed;
    seq.reason = Some(reasons::public(reason));
    seq.updated_at = OffsetDateTime::now_utc();
    repo.put_sequence(&seq).await
}

/// One attempt: nothing to do for a final sequence; else the user's token session (a user
/// without a usable token fails before the manifest is read), the plan, the uploads.
async fn attempt<D: Deps>(d: &D, job: &ManifestJob) -> Result<AttemptEnd, SequenceError> {
    let mut existing = d
        .repo()
        .get_sequence(&job.seq.user_id, &job.seq.sequence_id)
        .await?;
    if let Some(s) = existing.take_if(|s| matches!(s.state, SequenceState::Uploaded | SequenceState::Failed))
    {
        if s.progress.manifest_event.as_deref() == Some(job.manifest_event.as_str()) {
            info!(
                state = s.state.as_str(),
                "sequence already final: duplicate delivery"
            );
            return Ok(AttemptEnd::Final);
        }
        if s.state == SequenceState::Uploaded {
            redrop_after_uploaded(d, job).await?;
            return Ok(AttemptEnd::Final);
        }
        existing = Some(retry_failed(d, job, s).await?);
    }
    let ctx = SessionContext::new(d.tokens(), d.mapillary(), d.tunables().token_refresh_margin);
    let mut token = TokenSession::load(ctx, &job.seq.user_id)
        .await
        .map_err(|e| SequenceError::from_session(&job.seq.user_id, e))?;
    let (seq, fresh) = match plan_or_resume(d, job, existing).await? {
        Planned::Uploading(seq, fresh) => (*seq, fresh),
        Planned::Failed => return Ok(AttemptEnd::Final),
    };
    Ok(match upload_sequence(d, job, seq, fresh, &mut token).await? {
        UploadStop::Final => AttemptEnd::Final,
        UploadStop::OutOfTime => AttemptEnd::OutOfTime,
    })
}

/// A manifest dropped again after the sequence was UPLOADED: a no-op, recorded as an ingest error
/// (what the operator and the user can see of a notification that did nothing).
async fn redrop_after_uploaded<D: Deps>(d: &D, job: &ManifestJob) -> Result<(), SequenceError> {
    info!("manifest dropped again after the sequence was uploaded: nothing to do");
    let e = IngestError {
        at: OffsetDateTime::now_utc(),
        message_id: job.message_id.clone(),
        bucket: Some(job.bucket.clone()),
        key: job.manifest_key.clone(),
        reason: "the sequence is already uploaded: the manifest dropped again was ignored (upload under a \
                 new sequence id to send it again)"
            .to_string(),
    };
    d.repo().record_ingest_error(&e).await?;
    Ok(())
}

/// A manifest dropped again after the sequence FAILED: the next run (`attempt` + 1) retries the
/// uploads that failed — back to PENDING, resumed from the server's offset — and keeps those
/// delivered (HANDED_OFF, UPLOADED, FINISH_UNCERTAIN: never sent again). A sequence that failed
/// before anything was planned is planned again from the manifest. Returns the sequence to resume.
async fn retry_failed<D: Deps>(
    d: &D,
    job: &ManifestJob,
    mut seq: SequenceRecord,
) -> Result<SequenceRecord, SequenceError> {
    let repo = d.repo();
    let mut uploads = repo.list_uploads(&job.seq.user_id, &job.seq.sequence_id).await?;
    let mut retried = 0;
    for up in uploads.iter_mut().filter(|u| u.state == UploadState::Failed) {
        set_state(d, up, UploadState::Pending);
        up.error = None;
        up.finished_at = None;
        // The server returns the handle again when every byte is there (an empty POST).
        up.handle = None;
        save(d, up).await?;
        retried += 1;
    }
    let attempt = seq.progress.attempt() + 1;
    seq.state = if seq.upload_ids.is_empty() {
        SequenceState::Received
    } else {
        SequenceState::Uploading
    };
    seq.reason = None;
    seq.manifest_etag = job.manifest_etag.clone();
    seq.progress = SequenceProgress {
        mark: progress_mark(&uploads),
        stalled: 0,
        last_error: None,
        attempt,
        manifest_event: Some(job.manifest_event.clone()),
    };
    seq.updated_at = OffsetDateTime::now_utc();
    repo.put_sequence(&seq).await?;
    info!(
        attempt,
        retried,
        kept = uploads.len() - retried,
        "manifest dropped again after the sequence failed: retrying its failed uploads"
    );
    Ok(seq)
}
