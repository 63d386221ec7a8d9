//! The SQS batch handler: one S3 notification per record, each processed under a claim of its
//! manifest (idempotency), failures reported per record (`ReportBatchItemFailures`).

use std::time::{Duration, Instant};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use futures::StreamExt;
use shared::idempotency::{claim_id, Claim, ClaimOutcome, ClaimStatus};
use shared::model::{IngestError, SequenceStatus};
use shared::ports::{
    ClusterQueue, IdempotencyStore, ImageEntryStore, IngestErrorLog, IngestRequeue, MapillaryAuth,
    MapillaryUploads, ObjectStore, RepoError, SequenceReader, SequenceStore, TokenStore, UploadReader,
    UploadStore,
};
use shared::s3event::{self, Notification, ObjectCreated};
use time::OffsetDateTime;
use tracing::{error, info, info_span, warn, Instrument};

use crate::config::Tunables;
use crate::manifest::parse_manifest_key;
use crate::pipeline::{fail_sequence, run_sequence, Job, Outcome};

/// Records processed at the same time.
const RECORD_CONCURRENCY: usize = 4;
/// Claims are kept (TTL) this long after their last write.
const CLAIM_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The ports and settings the handler needs.
pub trait Deps: Send + Sync {
    /// S3.
    type Store: ObjectStore;
    /// DynamoDB records: sequences, uploads, image entries, ingest errors.
    type Repo: SequenceStore + UploadStore + ImageEntryStore + IngestErrorLog;
    /// Manifest claims (idempotency).
    type Claims: IdempotencyStore;
    /// Tokens.
    type Tokens: TokenStore;
    /// Clusters queue.
    type Clusters: ClusterQueue;
    /// Ingest queue (continuations).
    type Requeue: IngestRequeue;
    /// Mapillary: uploads, and refresh for the token session.
    type Mapillary: MapillaryUploads + MapillaryAuth;
    /// S3.
    fn store(&self) -> &Self::Store;
    /// DynamoDB records.
    fn repo(&self) -> &Self::Repo;
    /// Manifest claims.
    fn claims(&self) -> &Self::Claims;
    /// Tokens.
    fn tokens(&self) -> &Self::Tokens;
    /// Clusters queue.
    fn clusters(&self) -> &Self::Clusters;
    /// Ingest queue.
    fn requeue(&self) -> &Self::Requeue;
    /// Mapillary.
    fn mapillary(&self) -> &Self::Mapillary;
    /// Tunables.
    fn tunables(&self) -> &Tunables;
}

/// The usual [`Deps`]: one value per port.
#[derive(Debug, Clone)]
pub struct HandlerDeps<S, R, I, T, C, Q, M> {
    /// S3.
    pub store: S,
    /// DynamoDB records.
    pub repo: R,
    /// Manifest claims.
    pub claims: I,
    /// Tokens.
    pub tokens: T,
    /// Clusters queue.
    pub clusters: C,
    /// Ingest queue.
    pub requeue: Q,
    /// Mapillary.
    pub mapillary: M,
    /// Tunables.
    pub tunables: Tunables,
}

impl<S, R, I, T, C, Q, M> Deps for HandlerDeps<S, R, I, T, C, Q, M>
where
    S: ObjectStore,
    R: SequenceStore + UploadStore + ImageEntryStore + IngestErrorLog,
    I: IdempotencyStore,
    T: TokenStore,
    C: ClusterQueue,
    Q: IngestRequeue,
    M: MapillaryUploads + MapillaryAuth,
{
    type Store = S;
    type Repo = R;
    type Claims = I;
    type Tokens = T;
    type Clusters = C;
    type Requeue = Q;
    type Mapillary = M;
    fn store(&self) -> &S {
        &self.store
    }
    fn repo(&self) -> &R {
        &self.repo
    }
    fn claims(&self) -> &I {
        &self.claims
    }
    fn tokens(&self) -> &T {
        &self.tokens
    }
    fn clusters(&self) -> &C {
        &self.clusters
    }
    fn requeue(&self) -> &Q {
        &self.requeue
    }
    fn mapillary(&self) -> &M {
        &self.mapillary
    }
    fn tunables(&self) -> &Tunables {
        &self.tunables
    }
}

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
    let seq = match parse_manifest_key(&o.key) {
        Ok(s) => s,
        Err(e) => return ingest_error(d, message_id, Some(&o.bucket), &o.key, &e.to_string()).await,
    };
    let span = info_span!("sequence", user_id = %seq.user_id, sequence_id = %seq.sequence_id);
    async {
        let etag = match o.etag.as_deref().map(|e| e.trim_matches('"')).filter(|e| !e.is_empty()) {
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
        let id = claim_id(&o.bucket, &o.key, &etag);
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
        match d.claims().claim(&claim, now).await {
            Ok(ClaimOutcome::Completed) => {
                info!("manifest already processed: duplicate acknowledged");
                return true;
            }
            Ok(ClaimOutcome::Held { lease_until_ms }) => {
                info!(lease_until_ms, "manifest is being processed by another invocation: retry later");
                return false;
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
        let job = Job {
            bucket: o.bucket.clone(),
            manifest_key: o.key.clone(),
            manifest_etag: etag,
            seq,
            deadline,
        };
        match run_sequence(d, &job).await {
            Outcome::Done => {
                if let Err(e) = d.claims().complete_claim(&id, &owner).await {
                    warn!(error = %e, "completing the claim failed (a duplicate will find the sequence final)");
                }
                true
            }
            Outcome::Continue => {
                release(d, &id, &owner).await;
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
            Outcome::Retry(reason) if receives >= d.tunables().max_receives => {
                let reason = format!("gave up after {receives} deliveries: {reason}");
                error!(%reason, "sequence failed");
                match fail_sequence(d, &job, &reason).await {
                    Ok(()) => {
                        if let Err(e) = d.claims().complete_claim(&id, &owner).await {
                            warn!(error = %e, "completing the claim failed");
                        }
                        true
                    }
                    Err(e) => {
                        warn!(error = %e, "recording the failure failed");
                        release(d, &id, &owner).await;
                        false
                    }
                }
            }
            Outcome::Retry(reason) => {
                warn!(%reason, receives, "transient failure: the message will be retried");
                release(d, &id, &owner).await;
                false
            }
        }
    }
    .instrument(span)
    .await
}

async fn release<D: Deps>(d: &D, id: &str, owner: &str) {
    if let Err(e) = d.claims().renew_claim(id, owner, now_ms() - 1).await {
        warn!(error = %e, "releasing the claim failed (it expires with its lease)");
    }
}
