//! Ports: one small trait per capability the functions need. Handlers are generic over them
//! (native `async` in traits, `Send` futures), so tests plug in in-memory fakes and `main`
//! plugs in the AWS/Mapillary adapters of [`crate::adapters`].
//!
//! Capabilities kept in DynamoDB are cut by what each caller needs: a reader per entity (status-api
//! and the poller only read zip-and-push's records; status-api only reads the poller's) and a
//! store that adds the writes; one adapter per table implements several of them.
//!
//! Every error enum has `is_transient()`: `true` means "the same call may succeed later"
//! (throttling, 5xx, timeouts, connection errors) — the caller then releases its work and lets SQS
//! redeliver; `false` means retrying the same call will not help.

use std::collections::HashSet;
use std::future::Future;

use bytes::Bytes;
use futures::Stream;
use secrecy::SecretString;

use crate::idempotency::{Claim, ClaimOutcome};
use crate::mapillary::client::{Me, TokenGrant, UploadLimits, UploadOutcome};
use crate::mapillary::error::MapillaryError;
use crate::model::{
    CasOutcome, ClusterMessage, ConnectOutcome, ConnectionMetadata, EntryCheckpoint, FeedHealth, ImageLink,
    IngestError, SequenceRecord, StoredToken, TokenKind, TokenRecord, TrackingRecord, UploadImage,
    UploadRecord, UploadState,
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

// ------------------------------------------------------------------ records (DynamoDB)
//
// zip-and-push's records, cut by what each caller needs: every entity has a reader (status-api
// and the poller only read) and a store that adds the writes (zip-and-push, the only writer).
// One adapter implements them all (`DynamoRepository`, the UploadsTable).

/// Failure of a port kept in DynamoDB (records, claims, tracking, OAuth states).
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

/// Reading a user's sequence records (status-api's listing and detail, zip-and-push's resume).
pub trait SequenceReader: Send + Sync {
    /// The sequence record, `None` when absent.
    fn get_sequence(
        &self,
        user_id: &str,
        sequence_id: &str,
    ) -> impl Future<Output = Result<Option<SequenceRecord>, RepoError>> + Send;

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

/// Writing sequence records (zip-and-push).
pub trait SequenceStore: SequenceReader {
    /// Write (create or replace) the sequence record, including the gsi1 keys
    /// (`USER#<user_id>`, `SEQ#<created_at>#<sequence_id>`) and every `rejected` entry (however many:
    /// store a large list as separate items and replace the old ones; `get_sequence` must return
    /// exactly this list, in this order).
    fn put_sequence(&self, seq: &SequenceRecord) -> impl Future<Output = Result<(), RepoError>> + Send;
}

/// Reading a sequence's upload records (status-api, the poller's intake, zip-and-push).
pub trait UploadReader: Send + Sync {
    /// The sequence's upload records, ordered by `index` (empty when none).
    fn list_uploads(
        &self,
        user_id: &str,
        sequence_id: &str,
    ) -> impl Future<Output = Result<Vec<UploadRecord>, RepoError>> + Send;
}

/// Writing upload records (zip-and-push).
pub trait UploadStore: UploadReader {
    /// Write (create or replace) an upload record. The sparse gsi2 keys are `PENDING`,
    /// `<user_id>#<upload_id>` while `!upload.state.is_final()`, and `UNCERTAIN` (same sort key)
    /// while it is FINISH_UNCERTAIN (the poller's reconciliation reads that partition).
    ///
    /// Every write of an upload record (this one, [`Self::transition_upload`],
    /// [`SweepStore::settle_upload`]) also stores the record's unwritten state-change events
    /// (`upload.outbox.unwritten`, one [`crate::model::UploadEvent`] item each) in the same
    /// transaction: both or neither. The caller then clears them
    /// ([`crate::model::UploadOutbox::written`]).
    fn put_upload(&self, upload: &UploadRecord) -> impl Future<Output = Result<(), RepoError>> + Send;

    /// Replace the upload record with `upload` only if the stored record's `state` is `expected`
    /// (gsi2 keys as in [`Self::put_upload`]). Errors: [`RepoError::ConditionFailed`] when the
    /// stored state differs or the record is missing.
    fn transition_upload(
        &self,
        upload: &UploadRecord,
        expected: UploadState,
    ) -> impl Future<Output = Result<(), RepoError>> + Send;
}

/// Reading an upload's image entries (status-api, the poller's linking, zip-and-push's resume).
pub trait ImageEntryReader: Send + Sync {
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
}

/// Writing image entries and their upload checkpoints (zip-and-push).
pub trait ImageEntryStore: ImageEntryReader {
    /// Write image entries (create or replace; batch writes of ≤ 25, unprocessed items retried).
    /// All entries of one call may belong to different uploads (each carries its `upload_id`).
    fn put_images(&self, images: &[UploadImage]) -> impl Future<Output = Result<(), RepoError>> + Send;

    /// Store checkpoints of an upload's entries, as few writes as the store allows (DynamoDB: one
    /// item per ≤ 100 checkpoints, not one write per entry). [`ImageEntryReader::list_images`]
    /// returns each entry with the checkpoint of its index whose `fingerprint` matches the entry's
    /// ([`UploadImage::fingerprint`]); checkpoints of entries that do not exist, or that were
    /// re-planned since, are never attached. Calls may run concurrently and overlap; storing the
    /// same values again must succeed.
    fn save_checkpoints(
        &self,
        upload_id: &str,
        checkpoints: &[EntryCheckpoint],
    ) -> impl Future<Output = Result<(), RepoError>> + Send;
}

/// Notifications that could not be processed (zip-and-push).
pub trait IngestErrorLog: Send + Sync {
    /// Record a notification that could not be processed (pk `INGEST_ERROR`).
    fn record_ingest_error(&self, error: &IngestError) -> impl Future<Output = Result<(), RepoError>> + Send;
}

/// A page of [`SequenceReader::list_sequences`].
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

    /// Replace the stored claim under `claim.id` by `claim` (INPROGRESS) if it is COMPLETED
    /// ([`crate::idempotency::may_reopen`]), atomically: `true` when the caller now holds it,
    /// `false` when the stored claim is not COMPLETED (any more) or missing — claim it again to see.
    fn reopen_claim(&self, claim: &Claim) -> impl Future<Output = Result<bool, RepoError>> + Send;

    /// Take one of `user_id`'s fair-share slots ([`crate::idempotency::UserSlots`]) for `holder`
    /// until `lease_until_ms`, atomically with the rule [`crate::idempotency::take_slot`] at
    /// `now_ms`: `false` when `cap` live slots are held by others.
    fn take_user_slot(
        &self,
        user_id: &str,
        holder: &str,
        lease_until_ms: i64,
        now_ms: i64,
        cap: u32,
    ) -> impl Future<Output = Result<bool, RepoError>> + Send;

    /// Give `holder`'s slot of `user_id` back (nothing when it holds none).
    fn release_user_slot(
        &self,
        user_id: &str,
        holder: &str,
    ) -> impl Future<Output = Result<(), RepoError>> + Send;

    /// Mark claim `id` COMPLETED if `owner` may ([`crate::idempotency::may_complete`]); errors:
    /// [`RepoError::ConditionFailed`] when it is missing or held by another owner.
    fn complete_claim(&self, id: &str, owner: &str) -> impl Future<Output = Result<(), RepoError>> + Send;
}

/// Read access to manifest claims (the poller's sweeper: is an invocation working on a sequence?).
pub trait ClaimReader: Send + Sync {
    /// The claim stored under `id` ([`crate::idempotency::claim_id`]), if any.
    fn get_claim(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<crate::idempotency::Claim>, RepoError>> + Send;
}

/// The poller's sweep of uploads that stopped without reaching a final state (their invocations
/// ended in the ingest DLQ): it reads every unfinished upload and settles the stuck ones.
pub trait SweepStore: Send + Sync {
    /// Every upload record that is not final, all users (the sparse gsi2 partition `PENDING`).
    fn unfinished_uploads(&self) -> impl Future<Output = Result<Vec<UploadRecord>, RepoError>> + Send;

    /// Write `upload` only if the stored record still has `expected`'s state and attempt count
    /// (zip-and-push made no progress since it was read). `false`: it moved on, nothing written.
    fn settle_upload(
        &self,
        upload: &UploadRecord,
        expected: &UploadRecord,
    ) -> impl Future<Output = Result<bool, RepoError>> + Send;

    /// Set the sequence's `state`, `reason` and `updated_at` only if it was not updated since
    /// `expected_updated_at`. `false`: it changed, nothing written.
    fn settle_sequence(
        &self,
        seq: &SequenceRecord,
        expected_updated_at: time::OffsetDateTime,
    ) -> impl Future<Output = Result<bool, RepoError>> + Send;
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

/// Users' Mapillary connections (UsersTable item pk `USER#<user_id>`, sk `MAPILLARY`): a
/// [`TokenRecord`], the secrets encrypted with KMS under EncryptionContext `{"user_id": <user_id>}`.
///
/// Writes are either a user's own action ([`Self::put_record`]: connect, hand over an upload token),
/// which replaces whatever is stored, or the relay's ([`Self::replace_if`]: refresh, the Mapillary
/// user id, an upload refusal), a compare-and-set on the revision read before, which never
/// overwrites a newer record and never recreates a deleted one.
pub trait TokenStore: Send + Sync {
    /// The user's connection record, `None` when the user has no token item.
    fn load_record(
        &self,
        user_id: &str,
    ) -> impl Future<Output = Result<Option<TokenRecord>, TokenError>> + Send;

    /// Create or replace the user's record unconditionally (encrypting the token); returns the new
    /// revision. For a user's own action only.
    fn put_record(
        &self,
        user_id: &str,
        record: &TokenRecord,
    ) -> impl Future<Output = Result<String, TokenError>> + Send;

    /// Replace the user's record only if it still exists with revision `expected` (`None`: a record
    /// written before revisions existed). [`CasOutcome::Conflict`] when it changed or was deleted.
    fn replace_if(
        &self,
        user_id: &str,
        record: &TokenRecord,
        expected: Option<&str>,
    ) -> impl Future<Output = Result<CasOutcome, TokenError>> + Send;

    /// Forget the user's token; returns whether there was one.
    fn delete(&self, user_id: &str) -> impl Future<Output = Result<bool, TokenError>> + Send;

    /// The user's token, `None` when the user has no token item.
    fn load(&self, user_id: &str) -> impl Future<Output = Result<Option<StoredToken>, TokenError>> + Send {
        async move { Ok(self.load_record(user_id).await?.map(|r| r.token)) }
    }

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

    /// Create or replace the user's connection with an OAuth token (a [`Self::put_record`] of a new
    /// [`TokenKind::Oauth`] record).
    fn save(
        &self,
        user_id: &str,
        token: &StoredToken,
    ) -> impl Future<Output = Result<(), TokenError>> + Send {
        async move {
            let record = TokenRecord::new(token.clone(), TokenKind::Oauth);
            self.put_record(user_id, &record).await.map(|_| ())
        }
    }
}

/// One Mapillary account per relay user: the UsersTable item pk `MLYUSER#<mapillary user id>`,
/// sk `OWNER` names the relay user (`user_id`) whose connection uses that account. It is written in
/// the same transaction as the connection's token item, and released in the same transaction as
/// its deletion ([`TokenStore::delete`] releases the claim of the account the deleted record named,
/// when the user holds it).
pub trait AccountClaims: Send + Sync {
    /// [`TokenStore::put_record`] of `record`, and in the same transaction, when `claim`, the claim
    /// of its Mapillary account (`record.token.mapillary_user_id`; a record without one is stored
    /// unclaimed) for `user_id`: [`ConnectOutcome::AccountTaken`] when another user holds it (nothing
    /// is written); the same user claiming again is fine. `claim` is false when the operator allows
    /// shared accounts: the record is stored without a claim. Either way the claim of the account
    /// the user's previous record named, if another one and held by the user, is released in the
    /// same transaction.
    fn put_connection(
        &self,
        user_id: &str,
        record: &TokenRecord,
        claim: bool,
    ) -> impl Future<Output = Result<ConnectOutcome, TokenError>> + Send;

    /// The relay user holding the claim of Mapillary account `mapillary_user_id`, if any.
    fn claim_holder(
        &self,
        mapillary_user_id: &str,
    ) -> impl Future<Output = Result<Option<String>, TokenError>> + Send;
}

/// The clear part of users' token items (the status API): never decrypts, so its role needs no
/// KMS `Decrypt` on the token key.
pub trait ConnectionReader: Send + Sync {
    /// The user's connection metadata, `None` when the user has no token item.
    fn load_connection(
        &self,
        user_id: &str,
    ) -> impl Future<Output = Result<Option<ConnectionMetadata>, TokenError>> + Send;
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

/// The clusters queue as zip-and-push writes it (zip-and-push → poller).
pub trait ClusterQueue: Send + Sync {
    /// Send `msg` as a JSON body (`{"upload_id","user_id","sequence_id","cluster_id"}`).
    fn send_cluster(&self, msg: &ClusterMessage) -> impl Future<Output = Result<(), QueueError>> + Send;
}

/// The ingest queue, for continuation messages (an upload that needs another invocation).
pub trait IngestRequeue: Send + Sync {
    /// Send `body` verbatim (the original S3 notification body) with `delay_seconds` (0–900).
    fn requeue(&self, body: &str, delay_seconds: u32) -> impl Future<Output = Result<(), QueueError>> + Send;
}

/// One message received from the clusters queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMessage {
    /// SQS message id (for logs).
    pub message_id: String,
    /// Receipt handle (to delete it).
    pub receipt_handle: String,
    /// The body.
    pub body: String,
}

/// Failure of the clusters queue's receive or delete.
#[derive(Debug, thiserror::Error)]
#[error("clusters queue: {0}")]
pub struct InboxError(pub String);

/// The clusters queue as the poller reads it: receive a batch, delete what was durably handled
/// (a message that is not deleted comes back after its visibility timeout).
pub trait ClusterInbox: Send + Sync {
    /// Up to 10 visible messages, without waiting (empty = the queue looks empty). Received
    /// messages are invisible to other receivers for the queue's visibility timeout.
    fn receive(&self) -> impl Future<Output = Result<Vec<InboxMessage>, InboxError>> + Send;
    /// Delete these messages (one batch of ≤ 10); returns the receipt handles that failed.
    fn delete(
        &self,
        receipt_handles: &[String],
    ) -> impl Future<Output = Result<Vec<String>, InboxError>> + Send;
}

// ------------------------------------------------------------------ Mapillary

/// The Mapillary upload calls of zip-and-push (implemented by `MapillaryApp` of `mapillary::app`).
/// Token refresh is not here: it goes through [`MapillaryAuth`], called by the token session.
pub trait MapillaryUploads: Send + Sync {
    /// Upload `total_len` bytes under `key` in bounded POSTs, resuming from the server's offset,
    /// until complete or until `limits.stop_at` passes between two POSTs; `make_body(offset)`
    /// yields the file from `offset` to the end. See
    /// [`crate::mapillary::client::MapillaryClient::upload_until`].
    fn upload_until<F, S, E>(
        &self,
        token: &SecretString,
        key: &str,
        total_len: u64,
        make_body: F,
        limits: UploadLimits,
    ) -> impl Future<Output = Result<UploadOutcome, MapillaryError>> + Send
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

/// The Mapillary calls of a token session (`TokenSession` of `mapillary::session`): refresh and
/// `/me` (implemented by `MapillaryApp` of `mapillary::app`).
pub trait MapillaryAuth: Send + Sync {
    /// OAuth refresh grant (client id/secret held by the implementation); `refresh_token` is the
    /// stored refresh token or, when there is none, the current access token.
    fn refresh(
        &self,
        refresh_token: &SecretString,
    ) -> impl Future<Output = Result<TokenGrant, MapillaryError>> + Send;

    /// The user behind `token` (`GET {graph}/me`).
    fn me(&self, token: &SecretString) -> impl Future<Output = Result<Me, MapillaryError>> + Send;
}

// ------------------------------------------------------------------ tracking (DynamoDB)
//
// The poller's state: status-api reads it ([`TrackingReader`]); the poller writes it
// ([`TrackingStore`]), keeps overlapping runs apart ([`RunLease`]) and reconciles uploads whose
// `finish_upload` reply was lost ([`ReconcileStore`]). One adapter implements them all
// (`DynamoTracking`, the UploadsTable); see the layout in [`crate::model`].

/// What [`TrackingStore::list_pending_tracking`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PendingTracking {
    /// The pending records, ordered by user id then upload id.
    pub records: Vec<TrackingRecord>,
    /// Why a record (or a user's records) could not be listed, one line each (no secrets).
    pub unreadable: Vec<String>,
}

/// Reading tracking state (status-api; the poller through [`TrackingStore`]).
pub trait TrackingReader: Send + Sync {
    /// One tracking record.
    fn get_tracking(
        &self,
        upload_id: &str,
    ) -> impl Future<Output = Result<Option<TrackingRecord>, RepoError>> + Send;
    /// An upload's image links, by index.
    fn list_links(&self, upload_id: &str) -> impl Future<Output = Result<Vec<ImageLink>, RepoError>> + Send;
    /// The activity feed's health record.
    fn get_feed_health(&self) -> impl Future<Output = Result<Option<FeedHealth>, RepoError>> + Send;
}

/// The poller's tracking records, links and feed health.
///
/// Pending uploads are found through per-user pending sets, not by scanning records: a record
/// enters its user's set when it is created (or written by [`Self::update_tracking`]) while not
/// final, and leaves it once written final; [`Self::list_pending_tracking`] reads the sets and
/// drops ids whose record is final or gone.
pub trait TrackingStore: TrackingReader {
    /// Create the tracking record of a handed-off upload unless it exists (intake is idempotent:
    /// a re-delivered cluster message must not reset progress). Returns whether it was created.
    /// A record that is not final is (again) put in its user's pending set either way.
    fn create_tracking(
        &self,
        record: &TrackingRecord,
    ) -> impl Future<Output = Result<bool, RepoError>> + Send;
    /// Write a changed record, only if its stored `tracked.last_checked_at` still equals
    /// `expected_last_checked_at` (optimistic concurrency → `RepoError::ConditionFailed`, also
    /// when the record does not exist). Puts it in its user's pending set, or removes it once final.
    fn update_tracking(
        &self,
        record: &TrackingRecord,
        expected_last_checked_at: Option<time::OffsetDateTime>,
    ) -> impl Future<Output = Result<(), RepoError>> + Send;
    /// Every tracking record in a pending set that is not final (all users), ordered by user id
    /// then upload id, for a poller run. Ids of final or missing records, and of records another
    /// user owns, are dropped from their sets on the way (best effort). One bad record never
    /// fails the listing: a record that cannot be read, or a user whose records cannot be read,
    /// is named in [`PendingTracking::unreadable`] and the others are listed.
    fn list_pending_tracking(&self) -> impl Future<Output = Result<PendingTracking, RepoError>> + Send;
    /// Store image links (batch): each upload named in `links` gets exactly the given links (the
    /// last one given for an index wins; its earlier links are replaced).
    fn put_links(&self, links: &[ImageLink]) -> impl Future<Output = Result<(), RepoError>> + Send;
    /// Write the links (as [`Self::put_links`]), then the tracking records, in batches, without a
    /// per-record condition (the caller holds the [`RunLease`]). Links first, so a record that says
    /// "linked" never exists without its links. Records that are final then leave their users'
    /// pending sets; `clear_pending_of`: the caller knows none of that user's uploads is pending
    /// any more, so the user's whole pending set is dropped instead.
    fn put_tracking_batch(
        &self,
        records: &[TrackingRecord],
        links: &[ImageLink],
        clear_pending_of: Option<&str>,
    ) -> impl Future<Output = Result<(), RepoError>> + Send;
    /// Replace the activity feed's health record.
    fn put_feed_health(&self, health: &FeedHealth) -> impl Future<Output = Result<(), RepoError>> + Send;
    /// Sequence ids linked to the user's final uploads (linking by tiles leaves them out).
    fn user_linked_sequences(
        &self,
        user_id: &str,
    ) -> impl Future<Output = Result<HashSet<String>, RepoError>> + Send;
}

/// The poller's run lease: one holder at a time, so overlapping runs (a run can outlive the
/// schedule's interval) never write the same records.
pub trait RunLease: Send + Sync {
    /// Take the lease for `owner` until `until` unless another owner holds one that has not
    /// expired at `now` (a lease is held up to and including its end; its holder may take it again
    /// to extend it). `false`: another run holds it.
    fn acquire_run_lease(
        &self,
        owner: &str,
        now: time::OffsetDateTime,
        until: time::OffsetDateTime,
    ) -> impl Future<Output = Result<bool, RepoError>> + Send;
    /// Give the lease back if `owner` still holds it (otherwise nothing changes).
    fn release_run_lease(&self, owner: &str) -> impl Future<Output = Result<(), RepoError>> + Send;
}

/// What waits to be published: tracking records with [`TrackingRecord::pending_events`] and the
/// upload-state events written with upload records ([`crate::model::UploadEvent`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outbox {
    /// Tracking records whose outbox is not empty.
    pub tracking: Vec<TrackingRecord>,
    /// Upload-state events not published yet.
    pub uploads: Vec<crate::model::UploadEvent>,
}

impl Outbox {
    /// Nothing waits.
    pub fn is_empty(&self) -> bool {
        self.tracking.is_empty() && self.uploads.is_empty()
    }
}

/// The outbox of status-change events: tracking records with [`TrackingRecord::pending_events`]
/// and upload-state event items (a sparse index holds exactly those, so a run reads only them).
pub trait OutboxStore: Send + Sync {
    /// Everything whose outbox is not empty (all users; an eventually consistent index).
    fn list_outbox(&self) -> impl Future<Output = Result<Outbox, RepoError>> + Send;
    /// The unpublished upload-state events of one upload, read consistently (in position order).
    fn upload_outbox(
        &self,
        upload_id: &str,
    ) -> impl Future<Output = Result<Vec<crate::model::UploadEvent>, RepoError>> + Send;
    /// Remove published upload-state events (deleting one already gone is no error).
    fn ack_upload_events(
        &self,
        events: &[crate::model::UploadEvent],
    ) -> impl Future<Output = Result<(), RepoError>> + Send;
    /// Write `record` (read by [`Self::list_outbox`], its published events removed from
    /// `pending_events`) only if the stored record was not checked since (its `last_checked_at`
    /// is still `record`'s): a newer write keeps its own outbox (`RepoError::ConditionFailed`, and
    /// the events are published again next time, with the same ids). The pending sets are not
    /// touched.
    fn ack_outbox(&self, record: &TrackingRecord) -> impl Future<Output = Result<(), RepoError>> + Send;
}

/// Where status-change events go (EventBridge; users' webhooks are queued beside it, [`WebhookQueue`]).
pub trait EventPublisher: Send + Sync {
    /// Whether events are published at all (a bus is configured): when not, none are written to
    /// outboxes either.
    fn enabled(&self) -> bool;
    /// Publish `events`, in order (at most 10 per call for EventBridge; the adapter splits).
    fn publish(
        &self,
        events: &[crate::events::RelayEvent],
    ) -> impl Future<Output = Result<(), crate::events::EventError>> + Send;
}

/// Users' webhooks (UsersTable `USER#<user>` / `WEBHOOK`): the registration and its delivery state
/// in clear, the secret KMS-encrypted beside it (EncryptionContext `{"user_id": <user>}`, as the
/// tokens). The status API registers, shows and deletes; the poller decrypts and records delivery
/// state.
pub trait WebhookRegistry: Send + Sync {
    /// Store `record` with `secret` (replacing any earlier registration of the user).
    fn put_webhook(
        &self,
        record: &crate::webhook::WebhookRecord,
        secret: &secrecy::SecretString,
    ) -> impl Future<Output = Result<(), TokenError>> + Send;
    /// The user's registration (never the secret), `None` when there is none.
    fn get_webhook(
        &self,
        user_id: &str,
    ) -> impl Future<Output = Result<Option<crate::webhook::WebhookRecord>, TokenError>> + Send;
    /// Remove the user's registration; `false` when there was none.
    fn delete_webhook(&self, user_id: &str) -> impl Future<Output = Result<bool, TokenError>> + Send;
    /// The decrypted secret of `record`'s registration, `None` when it was replaced or deleted.
    fn webhook_secret(
        &self,
        record: &crate::webhook::WebhookRecord,
    ) -> impl Future<Output = Result<Option<secrecy::SecretString>, TokenError>> + Send;
    /// Write `record`'s delivery state if its registration is still the stored one; `false` when it
    /// was replaced or deleted meanwhile (nothing written).
    fn save_webhook_state(
        &self,
        record: &crate::webhook::WebhookRecord,
    ) -> impl Future<Output = Result<bool, TokenError>> + Send;
}

/// Webhook deliveries waiting to be POSTed (UploadsTable `WEBHOOK#<user>` items, listed through a
/// sparse index): written by the outbox step, removed once delivered.
pub trait WebhookQueue: Send + Sync {
    /// Queue `deliveries` (writing one again is harmless: the same key).
    fn enqueue_webhooks(
        &self,
        deliveries: &[crate::webhook::WebhookDelivery],
    ) -> impl Future<Output = Result<(), RepoError>> + Send;
    /// Every queued delivery (all users), by user, then in queue order.
    fn list_webhook_queue(
        &self,
    ) -> impl Future<Output = Result<Vec<crate::webhook::WebhookDelivery>, RepoError>> + Send;
    /// Remove a delivered (or abandoned) delivery.
    fn remove_webhook_delivery(
        &self,
        delivery: &crate::webhook::WebhookDelivery,
    ) -> impl Future<Output = Result<(), RepoError>> + Send;
}

/// FINISH_UNCERTAIN reconciliation: the uploads whose `finish_upload` reply was lost, and when the
/// poller last looked for them.
pub trait ReconcileStore: Send + Sync {
    /// Every FINISH_UNCERTAIN upload record (zip-and-push's, all users).
    fn finish_uncertain_uploads(&self) -> impl Future<Output = Result<Vec<UploadRecord>, RepoError>> + Send;
    /// Take `upload` out of the FINISH_UNCERTAIN index once its reconciliation is resolved (the
    /// cluster was adopted, or the upload FAILED): later scans no longer read it. The upload record
    /// itself is unchanged. Idempotent.
    fn resolve_uncertain(&self, upload: &UploadRecord) -> impl Future<Output = Result<(), RepoError>> + Send;
    /// When the last complete FINISH_UNCERTAIN scan ran.
    fn reconcile_scan_mark(
        &self,
    ) -> impl Future<Output = Result<Option<time::OffsetDateTime>, RepoError>> + Send;
    /// Record a complete FINISH_UNCERTAIN scan.
    fn set_reconcile_scan_mark(
        &self,
        at: time::OffsetDateTime,
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
    /// Lowercase hex SHA-256 of the browser-binding verifier set as a cookie on the browser that
    /// started the connection; the callback must present a verifier with this hash. Only the hash
    /// is stored, so a read of the table cannot forge the cookie.
    pub verifier_sha256: String,
}

/// What [`OAuthStateStore::consume`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateOutcome {
    /// The state was live and is now used up; it belonged to `user_id`.
    Consumed {
        /// Who started the connection.
        user_id: String,
        /// [`OAuthState::verifier_sha256`]; `None` for an item written before states were bound
        /// to a browser (the callback refuses those).
        verifier_sha256: Option<String>,
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

// ------------------------------------------------------------------ drops through the API (status-api)

/// A presigned S3 `PUT` of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresignedPut {
    /// The URL (signature in the query string).
    pub url: String,
    /// Headers the `PUT` must carry exactly as given (they are part of the signature), lowercase
    /// names: `content-length`, and `content-md5` when one was bound.
    pub headers: Vec<(String, String)>,
}

/// Writing the sequences bucket on a caller's behalf (status-api): presigned uploads, the manifest,
/// and deleting a sequence's objects.
pub trait ObjectWriter: Send + Sync {
    /// A `PUT` URL for exactly `bucket/key`, valid for `expires_in`, with `Content-Length:
    /// content_length` (and `Content-MD5: content_md5`, base64 of the digest, when given) bound into
    /// the signature: a request for another key, another length or other content fails the
    /// signature check. Signing is local (no request is sent).
    fn presign_put(
        &self,
        bucket: &str,
        key: &str,
        content_length: u64,
        content_md5: Option<&str>,
        expires_in: std::time::Duration,
    ) -> impl Future<Output = Result<PresignedPut, StoreError>> + Send;

    /// Create or replace `bucket/key` with `body`; returns the new ETag (without quotes).
    fn put_object(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// Delete every object under `prefix` — every version and delete marker in a versioned bucket —
    /// page by page (list, then one batch delete of up to 1000 keys per page). Returns how many
    /// object versions (and markers) were deleted. Nothing under the prefix is not an error.
    fn delete_prefix(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// The records of sequences dropped through the API (status-api): the announcement beside the
/// sequence record, and deleting a sequence's records.
pub trait DropStore: SequenceStore + UploadReader {
    /// Store the announcement (replacing any of the same sequence), in items of
    /// [`crate::drops::ANNOUNCED_FILES_PER_ITEM`] files.
    fn put_announcement(
        &self,
        announcement: &crate::drops::Announcement,
    ) -> impl Future<Output = Result<(), RepoError>> + Send;

    /// The announcement of a sequence, `None` when it was not dropped through the API.
    fn get_announcement(
        &self,
        user_id: &str,
        sequence_id: &str,
    ) -> impl Future<Output = Result<Option<crate::drops::Announcement>, RepoError>> + Send;

    /// Replace the sequence record with `seq` only if the stored record is in state `expected`
    /// (a record without external rejected items, as the drop routes write). Errors:
    /// [`RepoError::ConditionFailed`] when it is in another state or missing — two concurrent
    /// `complete` calls never both move a sequence on.
    fn replace_sequence_if(
        &self,
        seq: &SequenceRecord,
        expected: crate::model::SequenceState,
    ) -> impl Future<Output = Result<(), RepoError>> + Send;

    /// Delete every record of the sequence: the items of each of `upload_ids` (image entries,
    /// checkpoints, tracking record, image links), then the sequence's own items (uploads, rejected
    /// images, the announcement) and its record last, so a failure part-way leaves the sequence
    /// visible and the call can be repeated. The poller drops the ids of deleted tracking records
    /// from its pending sets by itself.
    fn delete_sequence_records(
        &self,
        user_id: &str,
        sequence_id: &str,
        upload_ids: &[String],
    ) -> impl Future<Output = Result<(), RepoError>> + Send;

    /// Delete zip-and-push's claim of a sequence (IdempotencyTable item `claim_id`, i.e.
    /// [`crate::idempotency::sequence_claim_id`] of its bucket and manifest key), so that a sequence
    /// dropped again under the same key — even with a byte-identical manifest — starts afresh
    /// instead of meeting the deleted sequence's claim. Deleting a missing claim succeeds.
    fn delete_sequence_claim(&self, claim_id: &str) -> impl Future<Output = Result<(), RepoError>> + Send;
}
