//! Records the functions keep about sequences, uploads and images, and the messages they exchange.
//!
//! Plain serde types (no AWS types). Key layout in DynamoDB is the adapters' business; the ids
//! here (`user_id`, `sequence_id`, `upload_id`, entry `index`) are all an adapter needs to build keys:
//! * sequence: pk `SEQ#<user_id>#<sequence_id>`, sk `META`
//! * upload: pk `SEQ#<user_id>#<sequence_id>`, sk `UPLOAD#<index:03>`
//! * image entry: pk `UPLOAD#<upload_id>`, sk `IMG#<index:05>`
//!
//! Timestamps are RFC 3339 strings on the wire (`time::serde::rfc3339`).

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// Lifecycle of a sequence (one manifest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SequenceState {
    /// The manifest was seen; nothing planned yet.
    Received,
    /// Uploads are planned and in progress.
    Uploading,
    /// Every upload reached a final state and at least one has a cluster.
    Uploaded,
    /// Nothing was (or will be) uploaded; `reason` says why.
    Failed,
    /// Mapillary refused uploads with the user's token; the uploads wait, unchanged, for the user to
    /// hand over a Mapillary user upload token (`reason` says how). Not final: the next delivery of
    /// the manifest resumes them.
    AwaitingUploadToken,
    /// Announced through the status API (`POST /v1/sequences`): the caller is uploading the files
    /// with presigned URLs; `POST /v1/sequences/{id}/complete` writes the manifest. Nothing runs yet.
    AwaitingFiles,
}

impl SequenceState {
    /// The wire name (`RECEIVED`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            SequenceState::Received => "RECEIVED",
            SequenceState::Uploading => "UPLOADING",
            SequenceState::Uploaded => "UPLOADED",
            SequenceState::Failed => "FAILED",
            SequenceState::AwaitingUploadToken => "AWAITING_UPLOAD_TOKEN",
            SequenceState::AwaitingFiles => "AWAITING_FILES",
        }
    }
}

/// Lifecycle of one upload (one zip, one Mapillary cluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum UploadState {
    /// Planned and persisted; no byte sent yet.
    Pending,
    /// Bytes are being sent to rupload (possibly across invocations).
    Uploading,
    /// `finish_upload` is about to be / is being called. Found in this state on resume without a
    /// `cluster_id`, the call's outcome is unknown → [`UploadState::FinishUncertain`].
    Finishing,
    /// `finish_upload` returned `cluster_id` (recorded); the cluster message may not be sent yet.
    Uploaded,
    /// The cluster message was sent to the clusters queue. Final.
    HandedOff,
    /// `finish_upload` may or may not have created a cluster; the poller reconciles. Final here.
    FinishUncertain,
    /// Given up; `error` says why. Final.
    Failed,
}

impl UploadState {
    /// The wire name (`PENDING`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            UploadState::Pending => "PENDING",
            UploadState::Uploading => "UPLOADING",
            UploadState::Finishing => "FINISHING",
            UploadState::Uploaded => "UPLOADED",
            UploadState::HandedOff => "HANDED_OFF",
            UploadState::FinishUncertain => "FINISH_UNCERTAIN",
            UploadState::Failed => "FAILED",
        }
    }

    /// No more work for zip-and-push (the sparse `PENDING` index entry is removed in these states).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            UploadState::HandedOff | UploadState::FinishUncertain | UploadState::Failed
        )
    }
}

/// An image left out of the uploads, and why (precise, human-readable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedImage {
    /// Object key relative to the sequence prefix (as listed in the manifest), or the full key
    /// when it lies outside the prefix.
    pub key: String,
    /// Why it was rejected.
    pub reason: String,
}

/// The sequence record: pk `SEQ#<user_id>#<sequence_id>`, sk `META` (gsi1: the user's sequences).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceRecord {
    /// Producer's user id (from the S3 key).
    pub user_id: String,
    /// Producer's sequence id (from the S3 key).
    pub sequence_id: String,
    /// Lifecycle state.
    pub state: SequenceState,
    /// Why the sequence failed (or a note), `None` otherwise.
    pub reason: Option<String>,
    /// Bucket of the manifest.
    pub bucket: String,
    /// Full key of the manifest.
    pub manifest_key: String,
    /// ETag of the manifest that was processed.
    pub manifest_etag: String,
    /// `organization_id` from the manifest.
    pub organization_id: Option<String>,
    /// Images considered (listed in the manifest, or found under the prefix).
    pub image_count: u32,
    /// Images placed into uploads.
    pub accepted_count: u32,
    /// Upload ids, in order.
    pub upload_ids: Vec<String>,
    /// Rejected images (may be long: adapters must round-trip any length, e.g. as separate items).
    pub rejected: Vec<RejectedImage>,
    /// First seen.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Invocations that worked on this sequence.
    pub attempts: u32,
    /// Progress across invocations and re-drops (issue 15, items 2 and 4); absent in records
    /// written before it existed.
    #[serde(default)]
    pub progress: SequenceProgress,
}

/// How far a sequence got, across continuations, retries and re-drops: what decides that a
/// sequence which keeps failing without progress is given up (`RELAY_MAX_INVOCATIONS_WITHOUT_PROGRESS`),
/// whatever SQS's receive count says (a continuation is a new message, its count starts again).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceProgress {
    /// The highest progress mark an invocation ended with (see zip-and-push's `progress` module:
    /// bytes stored, uploads planned and moved on in their lifecycle).
    #[serde(default)]
    pub mark: u64,
    /// Invocations in a row that ended before the sequence was final without raising `mark`.
    #[serde(default)]
    pub stalled: u32,
    /// Why the last invocation ended early (as the user reads it), `None` after progress.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Which run of the sequence this is: 1 for the first manifest, one more for each re-drop
    /// after FAILED that retries its failed uploads (0 in records from before: read as 1, see
    /// [`SequenceProgress::attempt`]).
    #[serde(default)]
    pub attempt: u32,
    /// The manifest notification the current run is for (etag and S3 sequencer/version): a
    /// delivery of another one after the sequence is final is a re-drop, of this one a duplicate.
    #[serde(default)]
    pub manifest_event: Option<String>,
}

impl SequenceProgress {
    /// The run shown to users (`attempt` in the status documents), from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt.max(1)
    }
}

/// The upload record: pk `SEQ#<user_id>#<sequence_id>`, sk `UPLOAD#<index:03>`; while not
/// [`UploadState::is_final`], also in the sparse gsi2 (`PENDING`, `<user_id>#<upload_id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadRecord {
    /// Owner.
    pub user_id: String,
    /// Sequence this upload belongs to.
    pub sequence_id: String,
    /// Globally unique and deterministic: see [`upload_id`].
    pub upload_id: String,
    /// Position among the sequence's uploads, from 0.
    pub index: u32,
    /// Lifecycle state.
    pub state: UploadState,
    /// rupload session key (`mly_relay_<md5>.zip`), deterministic for the same content.
    pub session_key: String,
    /// Zip length in bytes.
    pub total_len: u64,
    /// Images in the zip.
    pub image_count: u32,
    /// Mapillary `cluster_id`, once `finish_upload` returned it.
    pub cluster_id: Option<String>,
    /// rupload file handle (`h`), once all bytes were accepted.
    pub handle: Option<String>,
    /// Organization to upload for.
    pub organization_id: Option<String>,
    /// Body bytes handed to Mapillary over all attempts (an upper bound of what arrived).
    pub bytes_sent: u64,
    /// Planned.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// First byte sent.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub started_at: Option<OffsetDateTime>,
    /// Reached a final state.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub finished_at: Option<OffsetDateTime>,
    /// Why it failed / why the finish is uncertain (Mapillary's message when it gave one).
    pub error: Option<String>,
    /// Invocations that worked on this upload.
    pub attempts: u32,
    /// Its state changes as status-change events (issue 14): how many were recorded, and those
    /// made to this copy that its next write stores (see [`UploadOutbox`]).
    #[serde(default)]
    pub outbox: UploadOutbox,
}

/// The upload-state changes of an [`UploadRecord`] as status-change events (see `crate::events`).
///
/// A change made with [`crate::events::set_upload_state`] adds an [`OutboxEvent`] to `unwritten`;
/// the next write of the record ([`crate::ports::UploadStore::put_upload`],
/// [`crate::ports::UploadStore::transition_upload`], [`crate::ports::SweepStore::settle_upload`])
/// stores each as an [`UploadEvent`] item of its own in the same transaction as the record, so the
/// change and its event are one write; the writer then clears `unwritten`
/// ([`UploadOutbox::written`]). The stored event items are the upload's outbox: the poller publishes
/// and deletes them. Kept out of the upload item, so that zip-and-push's later writes of the record
/// never bring back an event the poller already published.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadOutbox {
    /// State changes recorded as events so far: the position of the next one (its id).
    #[serde(default)]
    pub recorded: u32,
    /// Events of changes to this copy not written yet (never serialized).
    #[serde(skip)]
    pub unwritten: Vec<OutboxEvent>,
}

impl UploadOutbox {
    /// The record was written (with `unwritten`): nothing left to write.
    pub fn written(&mut self) {
        self.unwritten.clear();
    }
}

/// One upload-state change waiting to be published: an item of its own beside the upload's other
/// items (pk `UPLOAD#<upload_id>`, sk `EVENT#<position:05>`, in the outbox index), written with the
/// change. `upload` is the record as that write stored it (what the event's `detail` shows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadEvent {
    /// Position among the upload's state changes, from 0.
    pub position: u32,
    /// The event.
    pub event: OutboxEvent,
    /// The upload as written with the change.
    pub upload: UploadRecord,
}

impl UploadEvent {
    /// The items `upload`'s write stores: one per unwritten event, at the positions before
    /// `upload.outbox.recorded`.
    pub fn of_write(upload: &UploadRecord) -> Vec<UploadEvent> {
        let n = upload.outbox.unwritten.len() as u32;
        let first = upload.outbox.recorded.saturating_sub(n);
        let mut snapshot = upload.clone();
        snapshot.outbox.unwritten.clear();
        upload
            .outbox
            .unwritten
            .iter()
            .enumerate()
            .map(|(k, e)| UploadEvent {
                position: first + k as u32,
                event: e.clone(),
                upload: snapshot.clone(),
            })
            .collect()
    }
}

/// What the zip's tail needs about one entry after its bytes were produced (checkpoint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryCheckpoint {
    /// Entry index in the zip (`<index>.jpg`).
    pub index: u32,
    /// CRC-32 of the transformed entry bytes (header rewritten).
    pub crc32: u32,
    /// Lowercase hex md5 of the ORIGINAL object bytes (for `sequence_md5sum`).
    pub md5: String,
    /// Offset of the entry's local header in the zip.
    pub local_header_offset: u64,
    /// [`UploadImage::fingerprint`] of the entry it was computed for: a checkpoint is only used for
    /// an entry with the same fingerprint (empty in checkpoints stored inside the entry's own item
    /// by earlier versions, which a rewrite of the entry clears).
    #[serde(default)]
    pub fingerprint: String,
}

/// One image of an upload: pk `UPLOAD#<upload_id>`, sk `IMG#<index:05>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadImage {
    /// Upload it belongs to.
    pub upload_id: String,
    /// Entry index in the zip.
    pub index: u32,
    /// Full object key.
    pub key: String,
    /// ETag seen when reading the EXIF; the object is read with `If-Match` on it.
    pub etag: String,
    /// Original object size.
    pub size: u64,
    /// Entry size in the zip (after the ImageDescription rewrite).
    pub entry_size: u64,
    /// Original header bytes replaced by the rewritten header.
    pub header_consumed: u64,
    /// MAP* ImageDescription JSON.
    pub description: String,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// Altitude, metres.
    pub altitude: Option<f64>,
    /// Capture time (final, as in the description).
    #[serde(with = "time::serde::rfc3339")]
    pub captured_at: OffsetDateTime,
    /// Final heading, degrees.
    pub heading: Option<f64>,
    /// Set once the entry's CRC/md5 were computed.
    pub checkpoint: Option<EntryCheckpoint>,
}

impl UploadImage {
    /// What the entry's bytes are made of — object, version, index, place in the zip and the
    /// description written into it — as 32 hex digits (sha-256, truncated). A checkpoint carries
    /// the fingerprint of the entry it was computed for, so a re-planned entry never picks up the
    /// CRC of a different one.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.index.to_le_bytes());
        h.update(self.size.to_le_bytes());
        h.update(self.entry_size.to_le_bytes());
        h.update(self.header_consumed.to_le_bytes());
        for part in [
            self.key.as_bytes(),
            self.etag.as_bytes(),
            self.description.as_bytes(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        hex::encode(&h.finalize()[..16])
    }
}

/// What linking needs of one of our images: a projection of [`UploadImage`] (read without the
/// description and checkpoint, which make up most of an entry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImagePosition {
    /// Upload it belongs to.
    pub upload_id: String,
    /// Entry index in the zip.
    pub index: u32,
    /// Full object key.
    pub key: String,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// Altitude, metres.
    pub altitude: Option<f64>,
    /// Capture time (final, as in the description).
    #[serde(with = "time::serde::rfc3339")]
    pub captured_at: OffsetDateTime,
    /// Final heading, degrees.
    pub heading: Option<f64>,
}

impl From<&UploadImage> for ImagePosition {
    fn from(i: &UploadImage) -> Self {
        Self {
            upload_id: i.upload_id.clone(),
            index: i.index,
            key: i.key.clone(),
            lat: i.lat,
            lon: i.lon,
            altitude: i.altitude,
            captured_at: i.captured_at,
            heading: i.heading,
        }
    }
}

/// A notification that could not be turned into work (bad key, unparsable body):
/// pk `INGEST_ERROR`, sk `<at rfc3339>#<key>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestError {
    /// When it was seen.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// SQS message id.
    pub message_id: String,
    /// Bucket, when known.
    pub bucket: Option<String>,
    /// Object key (decoded) or an excerpt of the body when no key could be read.
    pub key: String,
    /// What was wrong.
    pub reason: String,
}

/// The message sent to the clusters queue once a cluster exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMessage {
    /// Upload id.
    pub upload_id: String,
    /// Owner.
    pub user_id: String,
    /// Sequence id.
    pub sequence_id: String,
    /// Mapillary cluster id.
    pub cluster_id: String,
}

/// A user's Mapillary token as the functions use it (the plaintext only as [`SecretString`]).
#[derive(Debug, Clone)]
pub struct StoredToken {
    /// The user access token.
    pub access_token: SecretString,
    /// A separate refresh token, if Mapillary issued one (otherwise refresh with the access token).
    pub refresh_token: Option<SecretString>,
    /// Expiry, when known.
    pub expires_at: Option<OffsetDateTime>,
    /// Mapillary's user id.
    pub mapillary_user_id: Option<String>,
    /// Mapillary username.
    pub username: Option<String>,
    /// Last written.
    pub updated_at: OffsetDateTime,
}

/// What kind of token a user's Mapillary connection holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// A user access token from the app's OAuth flow (`/connect` → `/token`); refreshed with the
    /// app's client secret.
    Oauth,
    /// A Mapillary user upload token, handed over by the user (what `mapillary_tools authenticate`
    /// stores as `user_upload_token`). Never refreshed: when Mapillary refuses it, the user hands
    /// over a new one.
    UploadToken,
}

impl TokenKind {
    /// The wire name (`oauth`, `upload_token`), also written to the token item and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Oauth => "oauth",
            TokenKind::UploadToken => "upload_token",
        }
    }

    /// The kind of a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "oauth" => Some(TokenKind::Oauth),
            "upload_token" => Some(TokenKind::UploadToken),
            _ => None,
        }
    }
}

/// A user's Mapillary connection without its secrets: the attributes the token item keeps in clear
/// beside the ciphertext, readable without a KMS `Decrypt` (what the status API shows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionMetadata {
    /// Token expiry, when known.
    pub expires_at: Option<OffsetDateTime>,
    /// Mapillary's user id.
    pub mapillary_user_id: Option<String>,
    /// Mapillary username.
    pub username: Option<String>,
    /// Last written.
    pub updated_at: OffsetDateTime,
    /// Which kind of token the connection holds.
    pub kind: TokenKind,
    /// Set when uploads with this OAuth token were refused: uploads wait for an upload token.
    pub upload_refused: Option<UploadRefusal>,
}

impl ConnectionMetadata {
    /// Uploads are known to need an upload token this connection does not hold.
    pub fn upload_token_required(&self) -> bool {
        self.kind == TokenKind::Oauth && self.upload_refused.is_some()
    }
}

/// Mapillary refused an upload (rupload or `finish_upload`) as unauthorised with a token that is
/// otherwise valid (`/me` accepts it): uploads need a user upload token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRefusal {
    /// When the refusal was seen.
    pub at: OffsetDateTime,
    /// Mapillary's message (never token material).
    pub message: String,
}

/// A user's Mapillary connection as stored: the token, its kind, what the relay learnt about it and
/// the record's revision, which every write changes (refresh and the relay's own updates are a
/// compare-and-set on it, so a refresh never overwrites a newer token and never brings back a
/// deleted connection).
#[derive(Debug, Clone)]
pub struct TokenRecord {
    /// The token and its metadata.
    pub token: StoredToken,
    /// Which kind of token it is.
    pub kind: TokenKind,
    /// Set when uploads with this OAuth token were refused: uploads wait for an upload token.
    pub upload_refused: Option<UploadRefusal>,
    /// A session is refreshing the token until then (others wait for its result instead of
    /// refreshing too).
    pub refresh_lease_until: Option<OffsetDateTime>,
    /// Opaque revision of the stored record (`None` for a record not written yet, or written before
    /// revisions existed).
    pub revision: Option<String>,
}

impl TokenRecord {
    /// A new record of `kind` holding `token`.
    pub fn new(token: StoredToken, kind: TokenKind) -> Self {
        Self {
            token,
            kind,
            upload_refused: None,
            refresh_lease_until: None,
            revision: None,
        }
    }

    /// Uploads are known to need an upload token this connection does not hold.
    pub fn upload_token_required(&self) -> bool {
        self.kind == TokenKind::Oauth && self.upload_refused.is_some()
    }

    /// What is stored in clear beside the encrypted secrets.
    pub fn metadata(&self) -> ConnectionMetadata {
        ConnectionMetadata {
            expires_at: self.token.expires_at,
            mapillary_user_id: self.token.mapillary_user_id.clone(),
            username: self.token.username.clone(),
            updated_at: self.token.updated_at,
            kind: self.kind,
            upload_refused: self.upload_refused.clone(),
        }
    }
}

/// Result of a compare-and-set write of a [`TokenRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// Written; the record's new revision.
    Written(String),
    /// The stored record changed (or was deleted) since it was read: nothing was written.
    Conflict,
}

/// Result of [`crate::ports::AccountClaims::put_connection`]: storing a user's connection together
/// with the claim of its Mapillary account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// Stored, and the Mapillary account is claimed for the user; the record's new revision.
    Connected(String),
    /// Another relay user holds the claim of this Mapillary account: nothing was written.
    AccountTaken,
}

/// One upload in the status document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadStatus {
    /// Upload id.
    pub upload_id: String,
    /// State.
    pub state: UploadState,
    /// Cluster id once known.
    pub cluster_id: Option<String>,
    /// Images in the zip.
    pub image_count: u32,
    /// Zip length.
    pub bytes: u64,
    /// Planned.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Final.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub finished_at: Option<OffsetDateTime>,
    /// Error, if any.
    pub error: Option<String>,
}

/// The status document of a sequence (also served by status-api).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceStatus {
    /// Owner.
    pub user_id: String,
    /// Sequence id.
    pub sequence_id: String,
    /// State.
    pub state: SequenceState,
    /// Reason of a failure.
    pub reason: Option<String>,
    /// Images considered.
    pub image_count: u32,
    /// Images placed into uploads.
    pub accepted_count: u32,
    /// Uploads in order.
    pub uploads: Vec<UploadStatus>,
    /// Rejected images.
    pub rejected: Vec<RejectedImage>,
    /// Which run of the sequence this is (1, then one more per re-drop after FAILED).
    #[serde(default)]
    pub attempt: u32,
}

impl SequenceStatus {
    /// The document for a sequence record and its uploads (sorted by index here).
    pub fn from_records(seq: &SequenceRecord, uploads: &[UploadRecord]) -> Self {
        let mut ups: Vec<&UploadRecord> = uploads.iter().collect();
        ups.sort_by_key(|u| u.index);
        SequenceStatus {
            user_id: seq.user_id.clone(),
            sequence_id: seq.sequence_id.clone(),
            state: seq.state,
            reason: seq.reason.clone(),
            image_count: seq.image_count,
            accepted_count: seq.accepted_count,
            uploads: ups
                .into_iter()
                .map(|u| UploadStatus {
                    upload_id: u.upload_id.clone(),
                    state: u.state,
                    cluster_id: u.cluster_id.clone(),
                    image_count: u.image_count,
                    bytes: u.total_len,
                    created_at: u.created_at,
                    finished_at: u.finished_at,
                    error: u.error.clone(),
                })
                .collect(),
            rejected: seq.rejected.clone(),
            attempt: seq.progress.attempt(),
        }
    }
}

/// Separator of the parts of an upload id: outside the id alphabet (`[A-Za-z0-9._-]`), unreserved
/// in URLs, plain in DynamoDB keys and SQS messages.
pub const UPLOAD_ID_SEPARATOR: char = '~';

/// Deterministic upload id: `<user_id>~<sequence_id>~<index:03>`, e.g. `h~a.b~000`.
///
/// Distinct (user, sequence, index) triples never meet, whatever the strings: user and sequence
/// ids cannot contain `~`, and should one ever do, `%` and `~` inside a part are percent-encoded
/// (`%25`, `%7E`), so the separators still split the id unambiguously. Ids of earlier versions
/// were `<user_id>.<sequence_id>.<index:03>`, and both ids may contain dots: user `h` with
/// sequence `a.b` and user `h.a` with sequence `b` both got `h.a.b.000` (issue 15). Records
/// written with such ids are not migrated; they keep working under their old id (nothing parses
/// an upload id), only new plans get the new form.
pub fn upload_id(user_id: &str, sequence_id: &str, index: u32) -> String {
    fn part(s: &str) -> std::borrow::Cow<'_, str> {
        if s.contains(['%', UPLOAD_ID_SEPARATOR]) {
            s.replace('%', "%25").replace(UPLOAD_ID_SEPARATOR, "%7E").into()
        } else {
            s.into()
        }
    }
    let sep = UPLOAD_ID_SEPARATOR;
    format!("{}{sep}{}{sep}{index:03}", part(user_id), part(sequence_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_number_shown_starts_at_one() {
        let mut p = SequenceProgress::default();
        assert_eq!(p.attempt(), 1, "records from before run numbers");
        p.attempt = 3;
        assert_eq!(p.attempt(), 3);
        // Records without `progress` read with its defaults.
        let p: SequenceProgress = serde_json::from_str("{}").unwrap();
        assert_eq!(p, SequenceProgress::default());
    }

    #[test]
    fn upload_ids_of_different_users_and_sequences_never_meet() {
        // Issue 15: with `.` as the separator both were `h.a.b.000`.
        assert_eq!(upload_id("h", "a.b", 0), "h~a.b~000");
        assert_eq!(upload_id("h.a", "b", 0), "h.a~b~000");
        assert_ne!(upload_id("h", "a.b", 0), upload_id("h.a", "b", 0));
        assert_eq!(upload_id("u", "s", 12), "u~s~012");
        // Every triple of tricky parts gives its own id (also parts the key rules refuse).
        let parts = [
            "", "h", "a", "b", ".", "..", "h.a", "a.b", "a.b.000", "~", "h~a", "a~b", "%", "%7E", "%25",
            "-_.",
        ];
        let mut seen = std::collections::HashMap::new();
        for u in parts {
            for s in parts {
                for i in [0, 1, 999, 1000] {
                    let id = upload_id(u, s, i);
                    if let Some(prev) = seen.insert(id.clone(), (u, s, i)) {
                        panic!("{id:?} from both {prev:?} and {:?}", (u, s, i));
                    }
                }
            }
        }
    }

    #[test]
    fn states_serialize_as_screaming_snake() {
        assert_eq!(
            serde_json::to_string(&UploadState::FinishUncertain).unwrap(),
            "\"FINISH_UNCERTAIN\""
        );
        assert_eq!(
            serde_json::to_string(&SequenceState::Uploaded).unwrap(),
            "\"UPLOADED\""
        );
        assert_eq!(
            serde_json::to_string(&SequenceState::AwaitingUploadToken).unwrap(),
            format!("\"{}\"", SequenceState::AwaitingUploadToken.as_str())
        );
        for k in [TokenKind::Oauth, TokenKind::UploadToken] {
            assert_eq!(TokenKind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), serde_json::json!(k.as_str()));
        }
        assert_eq!(TokenKind::parse("bearer"), None);
        assert!(UploadState::HandedOff.is_final());
        assert!(!UploadState::Uploaded.is_final());
    }
}

// ------------------------------------------------------------------------------------------------
// Tracking (written by the poller, read by status-api). Kept in items of their own so that the
// poller never rewrites an item zip-and-push owns, and vice versa:
// * tracking: pk `UPLOAD#<upload_id>`, sk `TRACK` (the record as one JSON attribute); a user's
//   pending uploads: pk `PENDING#<user_id>`, sk `PENDING` in gsi2 `PENDING_USERS`, so a run finds
//   every pending upload with one query over one item per user
// * image links: pk `UPLOAD#<upload_id>`, sk `LINKS#<chunk:03>`, up to 200 links per item as one
//   JSON string (one item per upload instead of one per image; older per-image `LINK#<index:05>`
//   items are still read)
// * feed health: pk `HEALTH`, sk `FEED`; the run lease: pk `HEALTH`, sk `POLLER_LEASE`

/// Everything the poller knows about one handed-off upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrackingRecord {
    /// Owner.
    pub user_id: String,
    /// Sequence id.
    pub sequence_id: String,
    /// Upload id.
    pub upload_id: String,
    /// Mapillary user id whose feed lists the cluster (from the token record's `/me`), when known.
    pub mapillary_user_id: Option<String>,
    /// Stages, error code, overall state, timing (the domain's state machine).
    pub tracked: crate::domain::tracking::TrackedUpload,
    /// Every change seen, oldest first.
    pub history: Vec<crate::domain::tracking::Transition>,
    /// `item_count` of the feed node, once known.
    pub item_count: Option<i64>,
    /// Our image entries of the upload (zip-and-push's `image_count`), when known: linking reads
    /// them by key (`IMG#0` … `IMG#<n-1>`) in batches instead of querying the upload's partition.
    #[serde(default)]
    pub image_count: Option<u32>,
    /// The feed node's representative `image_id`, once known.
    pub image_id: Option<String>,
    /// Mapillary sequences the upload became, once linked.
    pub sequence_ids: Vec<String>,
    /// Which path produced the status/links.
    pub linked_via: Option<crate::domain::linking::LinkPath>,
    /// Images linked / dropped, once linked.
    pub linked_count: u32,
    /// Images Mapillary dropped (or that failed verification).
    pub dropped_count: u32,
    /// When the next check is due (slower for STALE).
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub next_check_at: Option<OffsetDateTime>,
    /// The outbox: status-change events written with the change that made them and not yet
    /// published (see [`crate::events`]). While not empty, the record is in the outbox index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_events: Vec<OutboxEvent>,
}

impl TrackingRecord {
    /// A record that starts tracking `tracked` (nothing seen, linked or scheduled yet).
    pub fn new(
        user_id: String,
        sequence_id: String,
        upload_id: String,
        tracked: crate::domain::tracking::TrackedUpload,
        image_count: Option<u32>,
    ) -> Self {
        Self {
            user_id,
            sequence_id,
            upload_id,
            mapillary_user_id: None,
            tracked,
            history: Vec::new(),
            item_count: None,
            image_count,
            image_id: None,
            sequence_ids: Vec::new(),
            linked_via: None,
            linked_count: 0,
            dropped_count: 0,
            next_check_at: None,
            pending_events: Vec::new(),
        }
    }
}

/// The Mapillary counterpart of one of our images (or why there is none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageLink {
    /// Upload id.
    pub upload_id: String,
    /// Entry index in the zip.
    pub index: u32,
    /// Our object key.
    pub key: String,
    /// Linked or dropped, with ids and link.
    pub outcome: crate::domain::linking::ImageOutcome,
    /// Which path found it.
    pub via: crate::domain::linking::LinkPath,
}

/// Health of the activity-feed path (Plan B), a summary over users: each user's own state is on
/// their tracking records (`TrackedUpload::feed`). One user's refusal never makes the summary
/// unhealthy while the feed works for others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedHealth {
    /// False when the last run that read any user's feed could read it for nobody (every user
    /// whose feed was tried is on coverage tiles, e.g. the feed is gone).
    pub healthy: bool,
    /// Since when it is degraded.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub degraded_since: Option<OffsetDateTime>,
    /// The last feed error seen (internal detail: not shown by the status API).
    pub last_error: Option<String>,
    /// The class of the last feed error seen.
    #[serde(default)]
    pub last_error_class: Option<crate::domain::tracking::FeedErrorClass>,
    /// Users whose feed the last run read with the web-app token.
    #[serde(default)]
    pub users_web_app_token: u32,
    /// Users whose feed the last run read with their own token.
    #[serde(default)]
    pub users_user_token: u32,
    /// Users the last run tracked through coverage tiles (Plan A).
    #[serde(default)]
    pub users_coverage_tiles: u32,
    /// Last update.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// One event waiting in a tracking record's outbox ([`TrackingRecord::pending_events`]; published
/// by the poller, see `crate::events`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEvent {
    /// De-duplication id: `<upload_id>:<history position>`.
    pub id: String,
    /// EventBridge `detail-type`.
    pub detail_type: String,
    /// The change.
    pub change: crate::domain::tracking::Transition,
}
