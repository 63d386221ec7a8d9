//! Ports: one small trait per capability the functions need. Handlers are generic over them
//! (native `async` in traits, `Send` futures), so tests plug in in-memory fakes and `main`
//! plugs in the AWS/Mapillary adapters of [`crate::adapters`].
//!
//! Every error enum has `is_transient()`: `true` means "the same call may succeed later"
//! (throttling, 5xx, timeouts, connection errors) — the caller then releases its work and lets SQS
//! redeliver; `false` means retrying the same call will not help.

use std::future::Future;

use bytes::Bytes;
use futures::Stream;
use secrecy::SecretString;

use crate::idempotency::{Claim, ClaimOutcome};
use crate::mapillary::client::{TokenGrant, UploadReport};
use crate::mapillary::retry::MapillaryError;
use crate::model::{
    ClusterMessage, EntryCheckpoint, IngestError, SequenceRecord, StoredToken, UploadImage, UploadRecord,
    UploadState,
};

/// Boxed error of an upload body stream (what `reqwest::Body::wrap_stream` accepts).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

// ------------------------------------------------------------------ object store (S3)

/// Failure of an [`ObjectStore`] call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The bucket or key does not exist (S3 `NoSuchKey` / `NoSuchBucket` / 404 on HEAD).
    #[error("object not found: {0}")]
    NotFound(String),
    /// `If-Match` failed: the object changed since its etag was recorded (S3 412).
    #[error("object changed: {key} no longer has ETag {expected}")]
    Changed {
        /// Key.
        key: String,
        /// The etag that was required.
        expected: String,
    },
    /// Access denied (403): a configuration problem, not transient.
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// Throttling, 5xx, timeouts, connection or body-read errors.
    #[error("object store unavailable: {0}")]
    Transient(String),
    /// Anything else (message keeps the service error code and message).
    #[error("object store error: {0}")]
    Other(String),
}

impl StoreError {
    /// Whether the same call may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }
}

/// An object listed under a prefix, or its HEAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Full key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// ETag **without** surrounding quotes.
    pub etag: String,
}

/// A whole object.
#[derive(Debug, Clone)]
pub struct ObjectBody {
    /// The bytes.
    pub bytes: Bytes,
    /// ETag without quotes.
    pub etag: String,
}

/// A whole object as the segments the connection delivered (no copy into one buffer).
#[derive(Debug, Clone)]
pub struct ObjectChunks {
    /// The bytes, in order; their concatenation is the object.
    pub chunks: Vec<Bytes>,
    /// ETag without quotes.
    pub etag: String,
    /// The md5 (32 lowercase hex) of the object's bytes when the store vouches for it without
    /// hashing (S3: the ETag of a single-part, unencrypted or SSE-S3 object); `None` otherwise.
    pub content_md5: Option<String>,
}

impl ObjectChunks {
    /// Total length of the chunks.
    pub fn len(&self) -> u64 {
        self.chunks.iter().map(|c| c.len() as u64).sum()
    }

    /// Whether the object is empty.
    pub fn is_empty(&self) -> bool {
        self.chunks.iter().all(Bytes::is_empty)
    }
}

/// Part of an object.
#[derive(Debug, Clone)]
pub struct RangeBody {
    /// Bytes `start..min(end, total_size)`; empty when `start >= total_size`.
    pub bytes: Bytes,
    /// Size of the whole object (from `Content-Range`, or `Content-Length` when the range covered
    /// the whole object).
    pub total_size: u64,
    /// ETag without quotes.
    pub etag: String,
}

/// Read access to objects (S3).
pub trait ObjectStore: Send + Sync {
    /// Bytes `start..end` (end exclusive, `start < end`) of `bucket/key` with one ranged GET
    /// (`Range: bytes=start-(end-1)`). A range reaching past the end returns the available bytes;
    /// a `start` at or past the end of the object (S3 416 `InvalidRange`, e.g. a 0-byte object)
    /// returns empty `bytes` with the real `total_size` (an adapter may HEAD to learn it).
    /// Errors: [`StoreError::NotFound`] for a missing key/bucket.
    fn get_range(
        &self,
        bucket: &str,
        key: &str,
        start: u64,
        end: u64,
    ) -> impl Future<Output = Result<RangeBody, StoreError>> + Send;

    /// The whole object. With `if_match` (an etag without quotes) the GET carries `If-Match`, and a
    /// different current etag fails with [`StoreError::Changed`] (S3 412 `PreconditionFailed`).
    /// Errors: [`StoreError::NotFound`].
    fn get_object(
        &self,
        bucket: &str,
        key: &str,
        if_match: Option<&str>,
    ) -> impl Future<Output = Result<ObjectBody, StoreError>> + Send;

    /// Like [`ObjectStore::get_object`], but keeps the body in the segments it arrived in and says
    /// whether the ETag is the md5 of the content. The default wraps `get_object` (one chunk, no
    /// md5 claim); adapters override it to avoid copying large bodies.
    fn get_object_chunks(
        &self,
        bucket: &str,
        key: &str,
        if_match: Option<&str>,
    ) -> impl Future<Output = Result<ObjectChunks, StoreError>> + Send {
        async move {
            let o = self.get_object(bucket, key, if_match).await?;
            Ok(ObjectChunks {
                chunks: vec![o.bytes],
                etag: o.etag,
                content_md5: None,
            })
        }
    }

    /// Every object whose key starts with `prefix` (all pages of ListObjectsV2), in key order.
    /// An empty result is not an error.
    fn list(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<ObjectInfo>, StoreError>> + Send;

    /// Size and etag of `bucket/key`. Errors: [`StoreError::NotFound`].
    fn head(&self, bucket: &str, key: &str) -> impl Future<Output = Result<ObjectInfo, StoreError>> + Send;
}

// ------------------------------------------------------------------ repository (DynamoDB)

/// Failure of an [`UploadRepository`] call.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// A conditional write's condition did not hold (DynamoDB `ConditionalCheckFailedException`).
    #[error("conditional write rejected: {0}")]
    ConditionFailed(String),
    /// Throttling, 5xx, timeouts, connection errors, unprocessed batch items left after retries.
    #[error("repository unavailable: {0}")]
    Transient(String),
    /// A stored item cannot be decoded into the model type.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// Anything else (validation errors, access denied…), with the service code and message.
    #[error("repository error: {0}")]
    Other(String),
}

impl RepoError {
    /// Whether the same call may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, RepoError::Transient(_))
    }
}

/// Records of sequences, uploads, images and manifest claims (DynamoDB).
pub trait UploadRepository: Send + Sync {
    /// The sequence record, `None` when absent.
    fn get_sequence(
        &self,
        user_id: &str,
        sequence_id: &str,
    ) -> impl Future<Output = Result<Option<SequenceRecord>, RepoError>> + Send;

    /// Write (create or replace) the sequence record, including the gsi1 keys
    /// (`USER#<user_id>`, `SEQ#<created_at>#<sequence_id>`) and every `rejected` entry (however many:
    /// store a large list as separate items and replace the old ones; `get_sequence` must return
    /// exactly this list, in this order).
    fn put_sequence(&self, seq: &SequenceRecord) -> impl Future<Output = Result<(), RepoError>> + Send;

    /// Write (create or replace) an upload record. The sparse gsi2 keys (`PENDING`,
    /// `<user_id>#<upload_id>`) are present iff `!upload.state.is_final()`.
    fn put_upload(&self, upload: &UploadRecord) -> impl Future<Output = Result<(), RepoError>> + Send;

    /// Replace the upload record with `upload` only if the stored record's `state` is `expected`
    /// (gsi2 keys as in [`Self::put_upload`]). Errors: [`RepoError::ConditionFailed`] when the
    /// stored state differs or the record is missing.
    fn transition_upload(
        &self,
        upload: &UploadRecord,
        expected: UploadState,
    ) -> impl Future<Output = Result<(), RepoError>> + Send;

    /// The sequence's upload records, ordered by `index` (empty when none).
    fn list_uploads(
        &self,
        user_id: &str,
        sequence_id: &str,
    ) -> impl Future<Output = Result<Vec<UploadRecord>, RepoError>> + Send;

    /// Write image entries (create or replace; batch writes of ≤ 25, unprocessed items retried).
    /// All entries of one call may belong to different uploads (each carries its `upload_id`).
    fn put_images(&self, images: &[UploadImage]) -> impl Future<Output = Result<(), RepoError>> + Send;

    /// All image entries of an upload, ordered by `index`, with their checkpoints.
    fn list_images(
        &self,
        upload_id: &str,
    ) -> impl Future<Output = Result<Vec<UploadImage>, RepoError>> + Send;

    /// The positions of image entries `0 .. count` of several uploads at once (`(upload_id, count)`
    /// pairs), by key rather than by a query per upload: one result per pair, in the same order,
    /// each ordered by `index`. An entry that does not exist is simply missing from its upload's
    /// list (the caller compares the length with `count`). The default reads each upload with
    /// [`Self::list_images`].
    fn get_image_positions(
        &self,
        uploads: &[(String, u32)],
    ) -> impl Future<Output = Result<Vec<Vec<crate::model::ImagePosition>>, RepoError>> + Send {
        async move {
            let mut out = Vec::with_capacity(uploads.len());
            for (upload_id, count) in uploads {
                let images = self.list_images(upload_id).await?;
                out.push(
                    images
                        .iter()
                        .filter(|i| i.index < *count)
                        .map(crate::model::ImagePosition::from)
                        .collect(),
                );
            }
            Ok(out)
        }
    }

    /// Store checkpoints of an upload's entries, as few writes as the store allows (DynamoDB: one
    /// item per ≤ 100 checkpoints, not one write per entry). [`Self::list_images`] returns each entry
    /// with the checkpoint of its index whose `fingerprint` matches the entry's
    /// ([`UploadImage::fingerprint`]); checkpoints of entries that do not exist, or that were
    /// re-planned since, are never attached. Calls may run concurrently and overlap; storing the
    /// same values again must succeed.
    fn save_checkpoints(
        &self,
        upload_id: &str,
        checkpoints: &[EntryCheckpoint],
    ) -> impl Future<Output = Result<(), RepoError>> + Send;

    /// Record a notification that could not be processed (pk `INGEST_ERROR`).
    fn record_ingest_error(&self, error: &IngestError) -> impl Future<Output = Result<(), RepoError>> + Send;

    /// One page of the user's sequences, newest first (gsi1: `USER#<user_id>`, sort key
    /// `SEQ#<created_at>#<sequence_id>` descending). At most `limit` (≥ 1) records, each **without**
    /// its `rejected` list (use [`Self::get_sequence`] for that). `after` is the `next` of the previous
    /// page: the gsi1 sort key of its last record, as returned (callers keep it opaque).
    fn list_sequences(
        &self,
        user_id: &str,
        limit: u32,
        after: Option<&str>,
    ) -> impl Future<Output = Result<SequencePage, RepoError>> + Send;
}

/// A page of [`UploadRepository::list_sequences`].
#[derive(Debug, Clone, PartialEq)]
pub struct SequencePage {
    /// Newest first.
    pub sequences: Vec<SequenceRecord>,
    /// Sort key to continue after, `None` on the last page.
    pub next: Option<String>,
}

// ------------------------------------------------------------------ idempotency (DynamoDB)

/// Manifest claims (IdempotencyTable), with the rules of [`crate::idempotency`].
pub trait IdempotencyStore: Send + Sync {
    /// Claim a manifest: store `claim` (status INPROGRESS, `lease_until_ms`, `owner`,
    /// `expiration`) atomically if the claim stored under `claim.id` is free at `now_ms`; else
    /// report what holds it. The outcome is [`crate::idempotency::outcome_over`] of the claim
    /// stored before, decided atomically (two concurrent claims never both acquire). A `claim`
    /// that is not INPROGRESS is refused with [`RepoError::Other`].
    fn claim(
        &self,
        claim: &Claim,
        now_ms: i64,
    ) -> impl Future<Output = Result<ClaimOutcome, RepoError>> + Send;

    /// Set `lease_until_ms` of claim `id` to `lease_until_ms` if `owner` may
    /// ([`crate::idempotency::may_renew`]: INPROGRESS and held by `owner`); used to extend, or to
    /// release early by passing "now". Errors: [`RepoError::ConditionFailed`] when the claim is
    /// missing or not held by `owner` any more.
    fn renew_claim(
        &self,
        id: &str,
        owner: &str,
        lease_until_ms: i64,
    ) -> impl Future<Output = Result<(), RepoError>> + Send;

    /// Mark claim `id` COMPLETED if `owner` may ([`crate::idempotency::may_complete`]); errors:
    /// [`RepoError::ConditionFailed`] when it is missing or held by another owner.
    fn complete_claim(&self, id: &str, owner: &str) -> impl Future<Output = Result<(), RepoError>> + Send;
}

// ------------------------------------------------------------------ tokens (DynamoDB + KMS)

/// Failure of a [`TokenStore`] call. Messages never contain token material.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The stored record cannot be decrypted or decoded (wrong key, wrong encryption context, bad JSON).
    #[error("stored token unusable: {0}")]
    Corrupt(String),
    /// DynamoDB/KMS throttling, 5xx, timeouts, connection errors.
    #[error("token store unavailable: {0}")]
    Transient(String),
    /// Anything else (access denied, disabled key…).
    #[error("token store error: {0}")]
    Other(String),
}

impl TokenError {
    /// Whether the same call may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, TokenError::Transient(_))
    }
}

/// Users' Mapillary tokens (UsersTable item pk `USER#<user_id>`, sk `MAPILLARY`), the secrets
/// encrypted with KMS under EncryptionContext `{"user_id": <user_id>}`.
pub trait TokenStore: Send + Sync {
    /// The user's token, `None` when the user has no token item.
    fn load(&self, user_id: &str) -> impl Future<Output = Result<Option<StoredToken>, TokenError>> + Send;
    /// [`Self::load`] for several users, in the same order (the default loads one after the other;
    /// the DynamoDB store reads the records in batches).
    fn load_many(
        &self,
        user_ids: &[String],
    ) -> impl Future<Output = Vec<Result<Option<StoredToken>, TokenError>>> + Send {
        async move {
            let mut out = Vec::with_capacity(user_ids.len());
            for id in user_ids {
                out.push(self.load(id).await);
            }
            out
        }
    }

    /// Create or replace the user's token item (encrypting `access_token` and `refresh_token`).
    fn save(&self, user_id: &str, token: &StoredToken)
        -> impl Future<Output = Result<(), TokenError>> + Send;

    /// Forget the user's token; returns whether there was one.
    fn delete(&self, user_id: &str) -> impl Future<Output = Result<bool, TokenError>> + Send;
}

// ------------------------------------------------------------------ queues (SQS)

/// Failure of a queue send.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Throttling, 5xx, timeouts, connection errors.
    #[error("queue unavailable: {0}")]
    Transient(String),
    /// Anything else (missing queue, access denied, message too large…).
    #[error("queue error: {0}")]
    Other(String),
}

impl QueueError {
    /// Whether the same call may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, QueueError::Transient(_))
    }
}

/// The clusters queue (zip-and-push → poller).
pub trait ClusterQueue: Send + Sync {
    /// Send `msg` as a JSON body (`{"upload_id","user_id","sequence_id","cluster_id"}`).
    fn send_cluster(&self, msg: &ClusterMessage) -> impl Future<Output = Result<(), QueueError>> + Send;
}

/// The ingest queue, for continuation messages (an upload that needs another invocation).
pub trait IngestRequeue: Send + Sync {
    /// Send `body` verbatim (the original S3 notification body) with `delay_seconds` (0–900).
    fn requeue(&self, body: &str, delay_seconds: u32) -> impl Future<Output = Result<(), QueueError>> + Send;
}

// ------------------------------------------------------------------ Mapillary

/// The Mapillary calls of zip-and-push (implemented over
/// [`crate::mapillary::client::MapillaryClient`] in [`crate::adapters::mapillary`]).
pub trait MapillaryUploads: Send + Sync {
    /// OAuth refresh grant (client id/secret held by the implementation); `refresh_token` is the
    /// stored refresh token or, when there is none, the current access token.
    fn refresh(
        &self,
        refresh_token: &SecretString,
    ) -> impl Future<Output = Result<TokenGrant, MapillaryError>> + Send;

    /// Upload `total_len` bytes under `key`, resuming from the server's offset; `make_body(offset)`
    /// yields the file from `offset` to the end. See
    /// [`crate::mapillary::client::MapillaryClient::upload_resumable`].
    fn upload_resumable<F, S, E>(
        &self,
        token: &SecretString,
        key: &str,
        total_len: u64,
        make_body: F,
    ) -> impl Future<Output = Result<UploadReport, MapillaryError>> + Send
    where
        F: FnMut(u64) -> S + Send,
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>;

    /// `finish_upload` of a zip handle → `cluster_id`. Never retried (each call creates a cluster).
    fn finish_upload(
        &self,
        token: &SecretString,
        handle: &str,
        organization_id: Option<&str>,
    ) -> impl Future<Output = Result<String, MapillaryError>> + Send;
}

/// Tracking state (poller-owned items; status-api reads them). See the layout in [`crate::model`].
pub trait TrackingRepository: Send + Sync {
    /// Create the tracking record of a handed-off upload unless it exists (intake is idempotent:
    /// a re-delivered cluster message must not reset progress). Returns whether it was created.
    fn create_tracking(
        &self,
        record: &crate::model::TrackingRecord,
    ) -> impl Future<Output = Result<bool, RepoError>> + Send;
    /// Write a changed record, only if its stored `tracked.last_checked_at` still equals
    /// `expected_last_checked_at` (optimistic concurrency between overlapping runs →
    /// `RepoError::ConditionFailed`). Maintains the sparse pending index (removed once final).
    fn update_tracking(
        &self,
        record: &crate::model::TrackingRecord,
        expected_last_checked_at: Option<time::OffsetDateTime>,
    ) -> impl Future<Output = Result<(), RepoError>> + Send;
    /// One tracking record.
    fn get_tracking(
        &self,
        upload_id: &str,
    ) -> impl Future<Output = Result<Option<crate::model::TrackingRecord>, RepoError>> + Send;
    /// Every non-final tracking record (all users), for a poller run.
    fn list_pending_tracking(
        &self,
    ) -> impl Future<Output = Result<Vec<crate::model::TrackingRecord>, RepoError>> + Send;
    /// Store image links (batch; overwrites links of the same index).
    fn put_links(
        &self,
        links: &[crate::model::ImageLink],
    ) -> impl Future<Output = Result<(), RepoError>> + Send;
    /// An upload's image links, by index.
    fn list_links(
        &self,
        upload_id: &str,
    ) -> impl Future<Output = Result<Vec<crate::model::ImageLink>, RepoError>> + Send;
    /// The activity feed's health record.
    fn get_feed_health(
        &self,
    ) -> impl Future<Output = Result<Option<crate::model::FeedHealth>, RepoError>> + Send;
    /// Replace the activity feed's health record.
    fn put_feed_health(
        &self,
        health: &crate::model::FeedHealth,
    ) -> impl Future<Output = Result<(), RepoError>> + Send;
}

// ------------------------------------------------------------------ OAuth state (DynamoDB)

/// A pending Mapillary connection: the `state` sent through the consent page, bound to the user
/// who started it. UsersTable item pk `STATE#<state>`, sk `STATE`, TTL `expires_at` (epoch s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthState {
    /// The random, URL-safe state value.
    pub state: String,
    /// Who started the connection.
    pub user_id: String,
    /// Issued.
    pub created_at: time::OffsetDateTime,
    /// Unusable from then on.
    pub expires_at: time::OffsetDateTime,
}

/// What [`OAuthStateStore::consume`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateOutcome {
    /// The state was live and is now used up; it belonged to `user_id`.
    Consumed {
        /// Who started the connection.
        user_id: String,
    },
    /// The state exists but expired (it stays unusable).
    Expired,
    /// Never issued, or already used (a replay).
    Unknown,
    /// The state was issued to another user than the one presenting it (it stays unused).
    Foreign,
}

/// Single-use, expiring OAuth `state` values.
pub trait OAuthStateStore: Send + Sync {
    /// Store a new state (conditional put: an existing item with the same state fails with
    /// [`RepoError::ConditionFailed`]).
    fn create(&self, state: &OAuthState) -> impl Future<Output = Result<(), RepoError>> + Send;

    /// Use up `state` atomically (one conditional delete: live at `now` and, when `expected_user` is
    /// given, issued to that user). Two concurrent calls never both get [`StateOutcome::Consumed`].
    fn consume(
        &self,
        state: &str,
        expected_user: Option<&str>,
        now: time::OffsetDateTime,
    ) -> impl Future<Output = Result<StateOutcome, RepoError>> + Send;
}
