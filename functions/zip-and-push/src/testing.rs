//! In-memory fakes of the ports, for unit tests (here and in other crates with the `testing`
//! feature). They follow the port docs: etags are the md5 of the content, claims follow the
//! lease rules, conditional writes check the stored state.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use md5::{Digest, Md5};
use secrecy::SecretString;
use shared::idempotency::{may_complete, may_renew, outcome_over, Claim, ClaimOutcome, ClaimStatus};
use shared::mapillary::client::{TokenGrant, UploadReport};
use shared::mapillary::retry::MapillaryError;
use shared::model::{
    ClusterMessage, EntryCheckpoint, IngestError, SequenceRecord, StoredToken, UploadImage, UploadRecord,
    UploadState,
};
use shared::ports::{
    BoxError, ClusterQueue, IdempotencyStore, IngestRequeue, MapillaryUploads, ObjectBody, ObjectChunks,
    ObjectInfo, ObjectStore, QueueError, RangeBody, RepoError, StoreError, TokenError, TokenStore,
    UploadRepository,
};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking test thread poisons the lock; the data is still fine for the others.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// S3 in memory.
#[derive(Debug, Default)]
pub struct MemStore {
    objects: Mutex<BTreeMap<(String, String), (Bytes, String)>>,
    /// Whole-object GETs served.
    pub full_gets: AtomicU64,
    /// Bytes served by ranged GETs.
    pub range_bytes: AtomicU64,
    /// Whether [`ObjectStore::get_object_chunks`] vouches for the md5 of the content (as S3 does
    /// through the ETag of single-part plain/SSE-S3 objects). Off: the caller must hash.
    pub vouch_md5: AtomicBool,
}

/// Segment size of [`MemStore::get_object_chunks`] bodies: odd, so JPEG headers and CRC/md5
/// inputs straddle segment boundaries as they do with real connections.
pub const MEM_CHUNK: usize = 7919;

impl MemStore {
    /// Empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Put an object; returns its etag (md5 hex).
    pub fn put(&self, bucket: &str, key: &str, bytes: impl Into<Bytes>) -> String {
        let bytes = bytes.into();
        let etag = hex::encode(Md5::digest(&bytes));
        lock(&self.objects).insert((bucket.into(), key.into()), (bytes, etag.clone()));
        etag
    }

    /// Remove an object.
    pub fn delete(&self, bucket: &str, key: &str) {
        lock(&self.objects).remove(&(bucket.to_string(), key.to_string()));
    }

    fn get(&self, bucket: &str, key: &str) -> Result<(Bytes, String), StoreError> {
        lock(&self.objects)
            .get(&(bucket.to_string(), key.to_string()))
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("{bucket}/{key}")))
    }
}

impl ObjectStore for MemStore {
    async fn get_range(
        &self,
        bucket: &str,
        key: &str,
        start: u64,
        end: u64,
    ) -> Result<RangeBody, StoreError> {
        let (b, etag) = self.get(bucket, key)?;
        let len = b.len() as u64;
        let s = start.min(len) as usize;
        let e = end.min(len).max(s as u64) as usize;
        self.range_bytes.fetch_add((e - s) as u64, Ordering::Relaxed);
        Ok(RangeBody {
            bytes: b.slice(s..e),
            total_size: len,
            etag,
        })
    }

    async fn get_object(
        &self,
        bucket: &str,
        key: &str,
        if_match: Option<&str>,
    ) -> Result<ObjectBody, StoreError> {
        let (bytes, etag) = self.get(bucket, key)?;
        if let Some(want) = if_match {
            if want != etag {
                return Err(StoreError::Changed {
                    key: key.into(),
                    expected: want.into(),
                });
            }
        }
        self.full_gets.fetch_add(1, Ordering::Relaxed);
        Ok(ObjectBody { bytes, etag })
    }

    async fn get_object_chunks(
        &self,
        bucket: &str,
        key: &str,
        if_match: Option<&str>,
    ) -> Result<ObjectChunks, StoreError> {
        let o = self.get_object(bucket, key, if_match).await?;
        let chunks = (0..o.bytes.len())
            .step_by(MEM_CHUNK)
            .map(|at| o.bytes.slice(at..(at + MEM_CHUNK).min(o.bytes.len())))
            .collect();
        let content_md5 = self.vouch_md5.load(Ordering::Relaxed).then(|| o.etag.clone());
        Ok(ObjectChunks {
            chunks,
            etag: o.etag,
            content_md5,
        })
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        Ok(lock(&self.objects)
            .iter()
            .filter(|((b, k), _)| b == bucket && k.starts_with(prefix))
            .map(|((_, k), (bytes, etag))| ObjectInfo {
                key: k.clone(),
                size: bytes.len() as u64,
                etag: etag.clone(),
            })
            .collect())
    }

    async fn head(&self, bucket: &str, key: &str) -> Result<ObjectInfo, StoreError> {
        let (bytes, etag) = self.get(bucket, key)?;
        Ok(ObjectInfo {
            key: key.into(),
            size: bytes.len() as u64,
            etag,
        })
    }
}

/// Everything the repository holds.
#[derive(Debug, Default, Clone)]
pub struct RepoState {
    /// Sequences by (user, sequence).
    pub sequences: BTreeMap<(String, String), SequenceRecord>,
    /// Uploads by (user, sequence, index).
    pub uploads: BTreeMap<(String, String, u32), UploadRecord>,
    /// Images by (upload, index).
    pub images: BTreeMap<(String, u32), UploadImage>,
    /// Ingest errors.
    pub ingest_errors: Vec<IngestError>,
}

/// DynamoDB in memory.
#[derive(Debug, Default)]
pub struct MemRepo {
    /// The data (tests may inspect and edit it).
    pub state: Mutex<RepoState>,
}

impl MemRepo {
    /// Empty repository.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the data.
    pub fn snapshot(&self) -> RepoState {
        lock(&self.state).clone()
    }
}

impl UploadRepository for MemRepo {
    async fn get_sequence(
        &self,
        user_id: &str,
        sequence_id: &str,
    ) -> Result<Option<SequenceRecord>, RepoError> {
        Ok(lock(&self.state)
            .sequences
            .get(&(user_id.into(), sequence_id.into()))
            .cloned())
    }

    async fn put_sequence(&self, seq: &SequenceRecord) -> Result<(), RepoError> {
        lock(&self.state)
            .sequences
            .insert((seq.user_id.clone(), seq.sequence_id.clone()), seq.clone());
        Ok(())
    }

    async fn put_upload(&self, upload: &UploadRecord) -> Result<(), RepoError> {
        lock(&self.state).uploads.insert(
            (upload.user_id.clone(), upload.sequence_id.clone(), upload.index),
            upload.clone(),
        );
        Ok(())
    }

    async fn transition_upload(&self, upload: &UploadRecord, expected: UploadState) -> Result<(), RepoError> {
        let mut st = lock(&self.state);
        let k = (upload.user_id.clone(), upload.sequence_id.clone(), upload.index);
        match st.uploads.get(&k) {
            Some(u) if u.state == expected => {
                st.uploads.insert(k, upload.clone());
                Ok(())
            }
            Some(u) => Err(RepoError::ConditionFailed(format!(
                "upload {} is {}, not {}",
                u.upload_id,
                u.state.as_str(),
                expected.as_str()
            ))),
            None => Err(RepoError::ConditionFailed(format!(
                "upload {} missing",
                upload.upload_id
            ))),
        }
    }

    async fn list_uploads(&self, user_id: &str, sequence_id: &str) -> Result<Vec<UploadRecord>, RepoError> {
        Ok(lock(&self.state)
            .uploads
            .iter()
            .filter(|((u, s, _), _)| u == user_id && s == sequence_id)
            .map(|(_, v)| v.clone())
            .collect())
    }

    async fn put_images(&self, images: &[UploadImage]) -> Result<(), RepoError> {
        let mut st = lock(&self.state);
        for i in images {
            st.images.insert((i.upload_id.clone(), i.index), i.clone());
        }
        Ok(())
    }

    async fn list_images(&self, upload_id: &str) -> Result<Vec<UploadImage>, RepoError> {
        Ok(lock(&self.state)
            .images
            .iter()
            .filter(|((u, _), _)| u == upload_id)
            .map(|(_, v)| v.clone())
            .collect())
    }

    async fn save_checkpoints(
        &self,
        upload_id: &str,
        checkpoints: &[EntryCheckpoint],
    ) -> Result<(), RepoError> {
        // As the DynamoDB adapter: attached to existing entries with the same fingerprint only.
        let mut st = lock(&self.state);
        for cp in checkpoints {
            if let Some(img) = st.images.get_mut(&(upload_id.to_string(), cp.index)) {
                if img.fingerprint() == cp.fingerprint {
                    img.checkpoint = Some(cp.clone());
                }
            }
        }
        Ok(())
    }

    async fn record_ingest_error(&self, error: &IngestError) -> Result<(), RepoError> {
        lock(&self.state).ingest_errors.push(error.clone());
        Ok(())
    }

    async fn list_sequences(
        &self,
        user_id: &str,
        limit: u32,
        after: Option<&str>,
    ) -> Result<shared::ports::SequencePage, RepoError> {
        // Same order and cursor as the DynamoDB adapter: gsi1 sort keys, descending.
        let st = lock(&self.state);
        let mut keyed = Vec::new();
        for seq in st.sequences.values().filter(|s| s.user_id == user_id) {
            let sk = shared::adapters::dynamodb::uploads::sequence_gsi1sk(seq.created_at, &seq.sequence_id)?;
            keyed.push((sk, seq));
        }
        keyed.sort_by(|a, b| b.0.cmp(&a.0));
        let limit = limit.max(1) as usize;
        let mut page: Vec<_> = keyed
            .into_iter()
            .filter(|(sk, _)| after.is_none_or(|a| sk.as_str() < a))
            .take(limit + 1)
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        let next = if more {
            page.last().map(|(sk, _)| sk.clone())
        } else {
            None
        };
        let sequences = page
            .into_iter()
            .map(|(_, s)| SequenceRecord {
                rejected: Vec::new(),
                ..s.clone()
            })
            .collect();
        Ok(shared::ports::SequencePage { sequences, next })
    }
}

/// Manifest claims in memory, with the rules of [`shared::idempotency`].
#[derive(Debug, Default)]
pub struct MemClaims {
    /// Claims by id (tests may inspect and edit them, e.g. to end a lease).
    pub claims: Mutex<HashMap<String, Claim>>,
}

impl MemClaims {
    /// No claims.
    pub fn new() -> Self {
        Self::default()
    }
}

impl IdempotencyStore for MemClaims {
    async fn claim(&self, claim: &Claim, now_ms: i64) -> Result<ClaimOutcome, RepoError> {
        if claim.status != ClaimStatus::Inprogress {
            return Err(RepoError::Other(format!(
                "claim {}: a new claim must be INPROGRESS, got {:?}",
                claim.id, claim.status
            )));
        }
        let mut claims = lock(&self.claims);
        let outcome = outcome_over(claims.get(&claim.id), now_ms);
        if matches!(outcome, ClaimOutcome::Acquired { .. }) {
            claims.insert(claim.id.clone(), claim.clone());
        }
        Ok(outcome)
    }

    async fn renew_claim(&self, id: &str, owner: &str, lease_until_ms: i64) -> Result<(), RepoError> {
        match lock(&self.claims).get_mut(id) {
            Some(c) if may_renew(c, owner) => {
                c.lease_until_ms = lease_until_ms;
                Ok(())
            }
            _ => Err(RepoError::ConditionFailed(format!(
                "claim {id} not held by {owner}"
            ))),
        }
    }

    async fn complete_claim(&self, id: &str, owner: &str) -> Result<(), RepoError> {
        match lock(&self.claims).get_mut(id) {
            Some(c) if may_complete(c, owner) => {
                c.status = ClaimStatus::Completed;
                Ok(())
            }
            _ => Err(RepoError::ConditionFailed(format!(
                "claim {id} not held by {owner}"
            ))),
        }
    }
}

/// Token store in memory (no encryption: nothing leaves the process).
#[derive(Debug, Default)]
pub struct MemTokens {
    /// Tokens by user id.
    pub tokens: Mutex<HashMap<String, StoredToken>>,
    /// Number of `save` calls.
    pub saves: AtomicU64,
}

impl MemTokens {
    /// Empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Store a token directly.
    pub fn insert(&self, user_id: &str, token: StoredToken) {
        lock(&self.tokens).insert(user_id.into(), token);
    }
}

impl TokenStore for MemTokens {
    async fn load(&self, user_id: &str) -> Result<Option<StoredToken>, TokenError> {
        Ok(lock(&self.tokens).get(user_id).cloned())
    }

    async fn save(&self, user_id: &str, token: &StoredToken) -> Result<(), TokenError> {
        self.saves.fetch_add(1, Ordering::Relaxed);
        lock(&self.tokens).insert(user_id.into(), token.clone());
        Ok(())
    }

    async fn delete(&self, user_id: &str) -> Result<bool, TokenError> {
        Ok(lock(&self.tokens).remove(user_id).is_some())
    }
}

/// Both queues in memory.
#[derive(Debug, Default)]
pub struct MemQueues {
    /// Cluster messages sent.
    pub clusters: Mutex<Vec<ClusterMessage>>,
    /// Continuation bodies sent, with their delay.
    pub requeued: Mutex<Vec<(String, u32)>>,
}

impl MemQueues {
    /// Empty queues.
    pub fn new() -> Self {
        Self::default()
    }

    /// Take the continuation bodies.
    pub fn take_requeued(&self) -> Vec<(String, u32)> {
        std::mem::take(&mut *lock(&self.requeued))
    }

    /// A copy of the cluster messages.
    pub fn cluster_messages(&self) -> Vec<ClusterMessage> {
        lock(&self.clusters).clone()
    }
}

impl ClusterQueue for MemQueues {
    async fn send_cluster(&self, msg: &ClusterMessage) -> Result<(), QueueError> {
        lock(&self.clusters).push(msg.clone());
        Ok(())
    }
}

impl IngestRequeue for MemQueues {
    async fn requeue(&self, body: &str, delay_seconds: u32) -> Result<(), QueueError> {
        lock(&self.requeued).push((body.into(), delay_seconds));
        Ok(())
    }
}

/// Wraps a [`MapillaryUploads`] and keeps every [`UploadReport`] it returned (to check resumes).
#[derive(Debug, Default)]
pub struct RecordingMapillary<M> {
    /// The wrapped implementation.
    pub inner: M,
    /// Reports of successful uploads, in order.
    pub reports: Mutex<Vec<UploadReport>>,
    /// `finish_upload` calls.
    pub finishes: AtomicU64,
}

impl<M> RecordingMapillary<M> {
    /// Wrap `inner`.
    pub fn new(inner: M) -> Self {
        Self {
            inner,
            reports: Mutex::new(Vec::new()),
            finishes: AtomicU64::new(0),
        }
    }

    /// A copy of the reports.
    pub fn reports(&self) -> Vec<UploadReport> {
        lock(&self.reports).clone()
    }
}

impl<M: MapillaryUploads> MapillaryUploads for RecordingMapillary<M> {
    async fn refresh(&self, refresh_token: &SecretString) -> Result<TokenGrant, MapillaryError> {
        self.inner.refresh(refresh_token).await
    }

    async fn upload_resumable<F, S, E>(
        &self,
        token: &SecretString,
        key: &str,
        total_len: u64,
        make_body: F,
    ) -> Result<UploadReport, MapillaryError>
    where
        F: FnMut(u64) -> S + Send,
        S: futures::Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let r = self
            .inner
            .upload_resumable(token, key, total_len, make_body)
            .await?;
        lock(&self.reports).push(r.clone());
        Ok(r)
    }

    async fn finish_upload(
        &self,
        token: &SecretString,
        handle: &str,
        organization_id: Option<&str>,
    ) -> Result<String, MapillaryError> {
        self.finishes.fetch_add(1, Ordering::Relaxed);
        self.inner.finish_upload(token, handle, organization_id).await
    }
}
