//! zip-and-push's records over DynamoDB: [`SequenceStore`], [`UploadStore`], [`ImageEntryStore`]
//! (and their readers) and [`IngestErrorLog`] in the UploadsTable (sequences, uploads, image
//! entries, ingest errors). Manifest claims live in their own table and adapter
//! ([`super::idempotency`]).
//!
//! Items are the model types serialized with `serde_dynamo`, plus the key attributes:
//! * sequence: pk `SEQ#<user_id>#<sequence_id>`, sk `META`, gsi1pk `USER#<user_id>`,
//!   gsi1sk `SEQ#<created_at>#<sequence_id>` (created_at in UTC with a fixed 6-digit fraction, so
//!   the index sorts by time). A `rejected` list larger than [`INLINE_REJECTED_BYTES`] is kept as
//!   items sk `REJECTED#<position:06>` (`key`, `reason`, `position`), with `rejected_count` on META;
//! * upload: pk `SEQ#<user_id>#<sequence_id>`, sk `UPLOAD#<index:03>`; while not final also
//!   gsi2pk `PENDING`, gsi2sk `<user_id>#<upload_id>` (sparse); FINISH_UNCERTAIN ones under
//!   gsi2pk `UNCERTAIN` instead (the poller's reconciliation queries them, and removes the entry
//!   once the reconciliation is resolved: `ReconcileStore::resolve_uncertain`);
//! * image entry: pk `UPLOAD#<upload_id>`, sk `IMG#<index:05>`;
//! * an upload's state-change events not published yet: pk `UPLOAD#<upload_id>`, sk
//!   `EVENT#<position:05>`, written in one transaction with the upload record that made them
//!   ([`super::upload_events`]);
//! * entry checkpoints: pk `UPLOAD#<upload_id>`, sk `CKPT#<first:05>-<last:05>`, attribute
//!   `checkpoints` (a list of up to [`CHECKPOINTS_PER_ITEM`]): one write per batch of entries, not one
//!   per entry; [`ImageEntryReader::list_images`] reads them with the entries (one query: `CKPT#` and
//!   `IMG#` are neighbours in the partition) and attaches those whose fingerprint matches;
//! * ingest error: pk `INGEST_ERROR`, sk `<at>#<key>`.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, WriteRequest};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::batch::{batch_get, batch_write};
use super::item::{
    condition_failed, decode, delete_request, encode, gsi2_partition, key, n, number_of, put_request,
    repo_error, rfc3339, s, string_of, Item,
};
use super::upload_events::{put_with_events, with_condition, EventWriteError, WriteCondition};
use crate::model::{
    EntryCheckpoint, ImagePosition, IngestError, RejectedImage, SequenceRecord, UploadEvent, UploadImage,
    UploadRecord, UploadState,
};
use crate::ports::{
    ImageEntryReader, ImageEntryStore, IngestErrorLog, RepoError, SequencePage, SequenceReader,
    SequenceStore, SweepStore, UploadReader, UploadStore,
};

/// Rejected lists whose keys and reasons exceed this many bytes are stored as separate items
/// (an item is limited to 400 KB).
pub const INLINE_REJECTED_BYTES: usize = 64 * 1024;
/// Checkpoints per checkpoint item (about 150 bytes each: far below the 400 KB item limit).
pub const CHECKPOINTS_PER_ITEM: usize = 100;
/// The attributes of an image entry that make an [`ImagePosition`].
const POSITION_ATTRIBUTES: &[&str] = &[
    "upload_id",
    "index",
    "key",
    "lat",
    "lon",
    "altitude",
    "captured_at",
    "heading",
];
/// Concurrent `BatchWriteItem` calls of one repository call.
const WRITE_CONCURRENCY: usize = 4;
/// Longest part of an object key kept in an ingest error's sort key (sort keys are ≤ 1024 bytes).
const INGEST_SK_KEY_BYTES: usize = 900;

/// Partition key of a sequence and its uploads.
pub fn sequence_pk(user_id: &str, sequence_id: &str) -> String {
    format!("SEQ#{user_id}#{sequence_id}")
}

/// Sort key of the sequence record.
pub const SEQUENCE_SK: &str = "META";

/// Sort key of an upload record.
pub fn upload_sk(index: u32) -> String {
    format!("UPLOAD#{index:03}")
}

/// Partition key of an upload's image entries.
pub fn image_pk(upload_id: &str) -> String {
    format!("UPLOAD#{upload_id}")
}

/// Sort key of an image entry.
pub fn image_sk(index: u32) -> String {
    format!("IMG#{index:05}")
}

/// Sort key of the checkpoint item holding the checkpoints of entries `first ..= last`.
pub fn checkpoint_sk(first: u32, last: u32) -> String {
    format!("CKPT#{first:05}-{last:05}")
}

/// The non-key attributes of a checkpoint item.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointItem {
    checkpoints: Vec<EntryCheckpoint>,
}

/// Sort key of an externally stored rejected image.
fn rejected_sk(position: usize) -> String {
    format!("REJECTED#{position:06}")
}

/// How long an ingest error is kept (30 days): the UploadsTable's TTL (`expires_at`) deletes it
/// afterwards.
pub const INGEST_ERROR_RETENTION_S: i64 = 30 * 24 * 3600;

/// Partition key of the ingest errors.
pub const INGEST_ERROR_PK: &str = "INGEST_ERROR";
/// gsi2 partition key of uploads that are not final.
pub const PENDING_GSI2PK: &str = "PENDING";
/// gsi2 partition key of FINISH_UNCERTAIN upload records (sparse: the poller's reconciliation
/// finds them with one query instead of scanning the table).
pub const UNCERTAIN_GSI2PK: &str = "UNCERTAIN";

/// RFC 3339 in UTC with a fixed-width fraction: lexicographic order = time order.
pub fn sortable_timestamp(t: OffsetDateTime) -> Result<String, RepoError> {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    t.to_offset(time::UtcOffset::UTC)
        .format(&format)
        .map_err(|e| RepoError::Other(format!("formatting timestamp {t}: {e}")))
}

/// One rejected image stored as its own item.
#[derive(Serialize, Deserialize)]
struct RejectedItem {
    position: usize,
    key: String,
    reason: String,
}

/// zip-and-push's records in the UploadsTable (every records port of [`crate::ports`]).
#[derive(Debug, Clone)]
pub struct DynamoRepository {
    pub(super) client: aws_sdk_dynamodb::Client,
    pub(super) uploads_table: String,
    query_limit: Option<i32>,
    /// The IdempotencyTable, for [`crate::ports::DropStore::delete_sequence_claim`] (the status
    /// API's repository only: [`DynamoRepository::with_idempotency_table`]).
    pub(super) idempotency_table: Option<String>,
}

impl DynamoRepository {
    /// Records in `uploads_table`.
    pub fn new(client: aws_sdk_dynamodb::Client, uploads_table: impl Into<String>) -> Self {
        Self {
            client,
            uploads_table: uploads_table.into(),
            query_limit: None,
            idempotency_table: None,
        }
    }

    /// The same repository, deleting sequence claims in `table` (the IdempotencyTable).
    pub fn with_idempotency_table(mut self, table: impl Into<String>) -> Self {
        self.idempotency_table = Some(table.into());
        self
    }

    /// Read at most `limit` items per Query page (default: DynamoDB's 1 MB pages).
    pub fn with_query_page_size(mut self, limit: i32) -> Self {
        self.query_limit = Some(limit.max(1));
        self
    }

    /// Every item of partition `pk` whose sort key starts with `sk_prefix` (all pages, consistent).
    pub(super) async fn query_prefix(&self, pk: &str, sk_prefix: &str) -> Result<Vec<Item>, RepoError> {
        let req = self
            .client
            .query()
            .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
            .expression_attribute_values(":prefix", s(sk_prefix));
        self.query_all(req, pk, &format!("{sk_prefix}*")).await
    }

    /// Items of partition `pk` with a sort key in `low ..= high`.
    async fn query_between(&self, pk: &str, low: &str, high: &str) -> Result<Vec<Item>, RepoError> {
        let req = self
            .client
            .query()
            .key_condition_expression("#pk = :pk AND #sk BETWEEN :low AND :high")
            .expression_attribute_values(":low", s(low))
            .expression_attribute_values(":high", s(high));
        self.query_all(req, pk, &format!("{low}..{high}")).await
    }

    /// Every page of a consistent query of partition `pk` on the uploads table (`req` carries the
    /// key condition, naming `#pk`, `#sk` and `:pk`).
    async fn query_all(
        &self,
        req: aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder,
        pk: &str,
        what: &str,
    ) -> Result<Vec<Item>, RepoError> {
        let mut req = req
            .table_name(&self.uploads_table)
            .expression_attribute_names("#pk", "pk")
            .expression_attribute_names("#sk", "sk")
            .expression_attribute_values(":pk", s(pk))
            .consistent_read(true);
        if let Some(limit) = self.query_limit {
            req = req.limit(limit);
        }
        let mut pages = req.into_paginator().send();
        let mut items = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| repo_error(&e, &format!("Query {pk} {what}")))?;
            items.extend(page.items.unwrap_or_default());
        }
        Ok(items)
    }

    /// `BatchWriteItem` of `requests` on the uploads table: chunks of 25, a few in parallel, each
    /// retrying its `UnprocessedItems` with jittered exponential backoff.
    pub(super) async fn batch_write(&self, requests: Vec<WriteRequest>) -> Result<(), RepoError> {
        batch_write(&self.client, &self.uploads_table, requests, WRITE_CONCURRENCY)
            .await
            .map_err(|e| e.into_repo("BatchWriteItem"))
    }

    /// The upload item: record + keys (+ sparse gsi2 keys while not final).
    fn upload_item(upload: &UploadRecord) -> Result<Item, RepoError> {
        let mut item = encode(upload, &format!("upload {}", upload.upload_id))?;
        item.insert("pk".into(), s(sequence_pk(&upload.user_id, &upload.sequence_id)));
        item.insert("sk".into(), s(upload_sk(upload.index)));
        if !upload.state.is_final() || upload.state == UploadState::FinishUncertain {
            let pk = if upload.state.is_final() {
                UNCERTAIN_GSI2PK
            } else {
                PENDING_GSI2PK
            };
            item.insert("gsi2pk".into(), s(pk));
            item.insert(
                "gsi2sk".into(),
                s(format!("{}#{}", upload.user_id, upload.upload_id)),
            );
        }
        Ok(item)
    }

    /// Delete externally stored rejected items of a sequence from position `keep` on.
    async fn delete_rejected_from(&self, pk: &str, keep: usize) -> Result<(), RepoError> {
        let mut deletes = Vec::new();
        for item in self.query_prefix(pk, "REJECTED#").await? {
            let position = number_of::<usize>(&item, "position");
            if position.is_some_and(|p| p < keep) {
                continue;
            }
            let Some(sk) = string_of(&item, "sk") else {
                continue;
            };
            deletes.push(delete_request(key(pk, sk))?);
        }
        self.batch_write(deletes).await
    }
}

fn rejected_bytes(rejected: &[RejectedImage]) -> usize {
    rejected.iter().map(|r| r.key.len() + r.reason.len() + 32).sum()
}

impl SequenceReader for DynamoRepository {
    async fn get_sequence(
        &self,
        user_id: &str,
        sequence_id: &str,
    ) -> Result<Option<SequenceRecord>, RepoError> {
        let pk = sequence_pk(user_id, sequence_id);
        let out = self
            .client
            .get_item()
            .table_name(&self.uploads_table)
            .key("pk", s(&pk))
            .key("sk", s(SEQUENCE_SK))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| repo_error(&e, &format!("GetItem {pk}")))?;
        let Some(item) = out.item else {
            return Ok(None);
        };
        let external = number_of::<i64>(&item, "rejected_count")
            .map(|c| usize::try_from(c).map_err(|_| RepoError::Corrupt(format!("{pk}: rejected_count {c}"))))
            .transpose()?;
        let mut record: SequenceRecord = decode(item, &format!("sequence {pk}"))?;
        if let Some(count) = external {
            let mut entries: Vec<RejectedItem> = Vec::with_capacity(count);
            for item in self.query_prefix(&pk, "REJECTED#").await? {
                let entry: RejectedItem = decode(item, &format!("rejected image of {pk}"))?;
                if entry.position < count {
                    entries.push(entry);
                }
            }
            entries.sort_by_key(|e| e.position);
            entries.dedup_by_key(|e| e.position);
            if entries.len() != count {
                return Err(RepoError::Corrupt(format!(
                    "{pk}: {count} rejected images recorded, {} found",
                    entries.len()
                )));
            }
            record.rejected = entries
                .into_iter()
                .map(|e| RejectedImage {
                    key: e.key,
                    reason: e.reason,
                })
                .collect();
        }
        Ok(Some(record))
    }

    async fn list_sequences(
        &self,
        user_id: &str,
        limit: u32,
        after: Option<&str>,
    ) -> Result<SequencePage, RepoError> {
        self.query_sequences(user_id, limit, after).await
    }
}

impl SequenceStore for DynamoRepository {
    async fn put_sequence(&self, seq: &SequenceRecord) -> Result<(), RepoError> {
        let pk = sequence_pk(&seq.user_id, &seq.sequence_id);
        let mut item = encode(seq, &format!("sequence {pk}"))?;
        let external = rejected_bytes(&seq.rejected) > INLINE_REJECTED_BYTES;
        if external {
            // Entries first, META (which makes them visible) second.
            let mut puts = Vec::with_capacity(seq.rejected.len());
            for (position, r) in seq.rejected.iter().enumerate() {
                let mut entry = encode(
                    &RejectedItem {
                        position,
                        key: r.key.clone(),
                        reason: r.reason.clone(),
                    },
                    "rejected image",
                )?;
                entry.insert("pk".into(), s(&pk));
                entry.insert("sk".into(), s(rejected_sk(position)));
                puts.push(put_request(entry)?);
            }
            self.batch_write(puts).await?;
            item.insert("rejected".into(), AttributeValue::L(Vec::new()));
            item.insert("rejected_count".into(), n(seq.rejected.len()));
        }
        item.insert("pk".into(), s(&pk));
        item.insert("sk".into(), s(SEQUENCE_SK));
        item.insert("gsi1pk".into(), s(user_gsi1pk(&seq.user_id)));
        item.insert(
            "gsi1sk".into(),
            s(sequence_gsi1sk(seq.created_at, &seq.sequence_id)?),
        );
        let old = self
            .client
            .put_item()
            .table_name(&self.uploads_table)
            .set_item(Some(item))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| repo_error(&e, &format!("PutItem {pk}")))?
            .attributes;
        let had_external = old
            .as_ref()
            .and_then(|o| number_of::<i64>(o, "rejected_count"))
            .is_some();
        if external || had_external {
            let keep = if external { seq.rejected.len() } else { 0 };
            self.delete_rejected_from(&pk, keep).await?;
        }
        Ok(())
    }
}

impl UploadReader for DynamoRepository {
    async fn list_uploads(&self, user_id: &str, sequence_id: &str) -> Result<Vec<UploadRecord>, RepoError> {
        let pk = sequence_pk(user_id, sequence_id);
        let mut uploads = self
            .query_prefix(&pk, "UPLOAD#")
            .await?
            .into_iter()
            .map(|item| decode::<UploadRecord>(item, &format!("upload of {pk}")))
            .collect::<Result<Vec<_>, _>>()?;
        uploads.sort_by_key(|u| u.index);
        Ok(uploads)
    }
}

impl UploadStore for DynamoRepository {
    async fn put_upload(&self, upload: &UploadRecord) -> Result<(), RepoError> {
        self.write_upload(upload, None).await
    }

    async fn transition_upload(&self, upload: &UploadRecord, expected: UploadState) -> Result<(), RepoError> {
        let condition = WriteCondition {
            expression: "#state = :expected",
            names: vec![("#state", "state")],
            values: vec![(":expected", s(expected.as_str()))],
        };
        self.write_upload(upload, Some(condition))
            .await
            .map_err(|e| match e {
                RepoError::ConditionFailed(found) => RepoError::ConditionFailed(format!(
                    "upload {} {found}, expected {}",
                    upload.upload_id,
                    expected.as_str()
                )),
                other => other,
            })
    }
}

impl DynamoRepository {
    /// Write the upload item (under `condition`) and its unwritten state-change events: one
    /// PutItem without events, one `TransactWriteItems` with them. A failed condition is
    /// [`RepoError::ConditionFailed`] saying what is stored (`is <STATE>` / `does not exist`).
    async fn write_upload(
        &self,
        upload: &UploadRecord,
        condition: Option<WriteCondition>,
    ) -> Result<(), RepoError> {
        let what = format!("PutItem upload {}", upload.upload_id);
        let found = |old: Option<Item>| match &old {
            Some(item) => format!("is {}", string_of(item, "state").unwrap_or("?")),
            None => "does not exist".to_string(),
        };
        let item = Self::upload_item(upload)?;
        let events = UploadEvent::of_write(upload);
        if !events.is_empty() {
            return put_with_events(&self.client, &self.uploads_table, item, condition, &events, &what)
                .await
                .map_err(|e| match e {
                    EventWriteError::Condition(old) => RepoError::ConditionFailed(found(old)),
                    EventWriteError::Other(e) => e,
                });
        }
        let mut req = self
            .client
            .put_item()
            .table_name(&self.uploads_table)
            .set_item(Some(item));
        if let Some(c) = condition {
            req = with_condition!(req, c);
        }
        match req.send().await {
            Ok(_) => Ok(()),
            Err(err) => match condition_failed(&err) {
                Some(old) => Err(RepoError::ConditionFailed(found(old))),
                None => Err(repo_error(&err, &what)),
            },
        }
    }
}

impl SweepStore for DynamoRepository {
    async fn unfinished_uploads(&self) -> Result<Vec<UploadRecord>, RepoError> {
        let mut out = Vec::new();
        for item in gsi2_partition(
            &self.client,
            &self.uploads_table,
            s(PENDING_GSI2PK),
            "Query gsi2 PENDING",
        )
        .await?
        {
            // One unreadable record must not stop the sweep for everyone: it is skipped.
            match decode::<UploadRecord>(item, "upload record") {
                // The index is eventually consistent: skip one that has become final since.
                Ok(record) if !record.state.is_final() => out.push(record),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable upload record in the PENDING index skipped")
                }
            }
        }
        Ok(out)
    }

    async fn settle_upload(&self, upload: &UploadRecord, expected: &UploadRecord) -> Result<bool, RepoError> {
        let condition = WriteCondition {
            expression: "#state = :state AND #attempts = :attempts",
            names: vec![("#state", "state"), ("#attempts", "attempts")],
            values: vec![
                (":state", s(expected.state.as_str())),
                (":attempts", n(expected.attempts)),
            ],
        };
        match self.write_upload(upload, Some(condition)).await {
            Ok(()) => Ok(true),
            Err(RepoError::ConditionFailed(_)) => Ok(false),
            Err(other) => Err(other),
        }
    }

    async fn settle_sequence(
        &self,
        seq: &SequenceRecord,
        expected_updated_at: OffsetDateTime,
    ) -> Result<bool, RepoError> {
        let pk = sequence_pk(&seq.user_id, &seq.sequence_id);
        let reason = match &seq.reason {
            Some(r) => s(r),
            None => AttributeValue::Null(true),
        };
        let result = self
            .client
            .update_item()
            .table_name(&self.uploads_table)
            .key("pk", s(&pk))
            .key("sk", s(SEQUENCE_SK))
            .update_expression("SET #state = :state, #reason = :reason, #updated = :updated")
            .condition_expression("#updated = :expected")
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#reason", "reason")
            .expression_attribute_names("#updated", "updated_at")
            .expression_attribute_values(":state", s(seq.state.as_str()))
            .expression_attribute_values(":reason", reason)
            .expression_attribute_values(":updated", s(rfc3339(seq.updated_at)?))
            .expression_attribute_values(":expected", s(rfc3339(expected_updated_at)?))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) => match repo_error(&e, &format!("UpdateItem {pk}")) {
                RepoError::ConditionFailed(_) => Ok(false),
                other => Err(other),
            },
        }
    }
}

impl ImageEntryReader for DynamoRepository {
    async fn list_images(&self, upload_id: &str) -> Result<Vec<UploadImage>, RepoError> {
        let pk = image_pk(upload_id);
        // `CKPT#…` sorts right before `IMG#…` (and `IMG$` right after every `IMG#…`): one query.
        let mut images = Vec::new();
        let mut checkpoints: HashMap<u32, Vec<EntryCheckpoint>> = HashMap::new();
        for item in self.query_between(&pk, "CKPT#", "IMG$").await? {
            let is_checkpoints =
                matches!(item.get("sk"), Some(AttributeValue::S(sk)) if sk.starts_with("CKPT#"));
            if is_checkpoints {
                let batch: CheckpointItem = decode(item, &format!("checkpoints of {pk}"))?;
                for cp in batch.checkpoints {
                    checkpoints.entry(cp.index).or_default().push(cp);
                }
            } else if matches!(item.get("sk"), Some(AttributeValue::S(sk)) if sk.starts_with("IMG#")) {
                images.push(decode::<UploadImage>(item, &format!("image of {pk}"))?);
            }
        }
        images.sort_by_key(|i| i.index);
        for image in &mut images {
            let Some(candidates) = checkpoints.remove(&image.index) else {
                continue;
            };
            let fingerprint = image.fingerprint();
            if let Some(cp) = candidates.into_iter().find(|cp| cp.fingerprint == fingerprint) {
                image.checkpoint = Some(cp);
            }
        }
        Ok(images)
    }

    async fn get_image_positions(
        &self,
        uploads: &[(String, u32)],
    ) -> Result<Vec<Vec<ImagePosition>>, RepoError> {
        // A batch must not name a key twice.
        let mut wanted: HashMap<&str, u32> = HashMap::new();
        for (id, count) in uploads {
            let c = wanted.entry(id.as_str()).or_default();
            *c = (*c).max(*count);
        }
        let keys: Vec<Item> = wanted
            .iter()
            .flat_map(|(id, count)| (0..*count).map(move |i| key(image_pk(id), image_sk(i))))
            .collect();
        let items = batch_get(&self.client, &self.uploads_table, keys, Some(POSITION_ATTRIBUTES))
            .await
            .map_err(|e| e.into_repo("BatchGetItem image positions"))?;
        let mut by_upload: HashMap<String, Vec<ImagePosition>> = HashMap::new();
        for item in items {
            let image: ImagePosition = decode(item, "image entry")?;
            by_upload.entry(image.upload_id.clone()).or_default().push(image);
        }
        Ok(uploads
            .iter()
            .map(|(id, count)| {
                let mut images: Vec<ImagePosition> = by_upload
                    .get(id)
                    .map(|v| v.iter().filter(|i| i.index < *count).cloned().collect())
                    .unwrap_or_default();
                images.sort_by_key(|i| i.index);
                images
            })
            .collect())
    }
}

impl ImageEntryStore for DynamoRepository {
    async fn put_images(&self, images: &[UploadImage]) -> Result<(), RepoError> {
        // One batch must not name a key twice: the last entry for a key wins, as with single puts.
        let mut last: HashMap<(&str, u32), usize> = HashMap::new();
        for (i, image) in images.iter().enumerate() {
            last.insert((image.upload_id.as_str(), image.index), i);
        }
        let mut requests = Vec::with_capacity(last.len());
        for (i, image) in images.iter().enumerate() {
            if last.get(&(image.upload_id.as_str(), image.index)) != Some(&i) {
                continue;
            }
            let mut item = encode(image, &format!("image {}/{}", image.upload_id, image.index))?;
            item.insert("pk".into(), s(image_pk(&image.upload_id)));
            item.insert("sk".into(), s(image_sk(image.index)));
            requests.push(put_request(item)?);
        }
        self.batch_write(requests).await
    }

    async fn save_checkpoints(
        &self,
        upload_id: &str,
        checkpoints: &[EntryCheckpoint],
    ) -> Result<(), RepoError> {
        // One item per run of ≤ CHECKPOINTS_PER_ITEM (by index, the last value for an index wins):
        // its sort key names its first and last index, so items of overlapping runs (a resumed
        // stream starts wherever the server's offset is) never overwrite each other.
        let mut by_index: Vec<&EntryCheckpoint> = checkpoints.iter().collect();
        by_index.reverse();
        by_index.sort_by_key(|cp| cp.index); // stable: the last given value first
        by_index.dedup_by_key(|cp| cp.index);
        let mut requests = Vec::new();
        for chunk in by_index.chunks(CHECKPOINTS_PER_ITEM) {
            let (Some(first), Some(last)) = (chunk.first(), chunk.last()) else {
                continue;
            };
            let batch = CheckpointItem {
                checkpoints: chunk.iter().map(|cp| (*cp).clone()).collect(),
            };
            let mut item = encode(&batch, &format!("checkpoints of {upload_id}"))?;
            item.insert("pk".into(), s(image_pk(upload_id)));
            item.insert("sk".into(), s(checkpoint_sk(first.index, last.index)));
            requests.push(put_request(item)?);
        }
        self.batch_write(requests).await
    }
}

impl IngestErrorLog for DynamoRepository {
    async fn record_ingest_error(&self, error: &IngestError) -> Result<(), RepoError> {
        let mut key_part = error.key.as_str();
        if key_part.len() > INGEST_SK_KEY_BYTES {
            let mut cut = INGEST_SK_KEY_BYTES;
            while !key_part.is_char_boundary(cut) {
                cut -= 1;
            }
            key_part = &key_part[..cut];
        }
        let mut item = encode(error, "ingest error")?;
        item.insert("pk".into(), s(INGEST_ERROR_PK));
        // The table's TTL attribute: the log of bad notifications does not grow forever.
        let expires = error.at.unix_timestamp().saturating_add(INGEST_ERROR_RETENTION_S);
        item.insert("expires_at".into(), n(expires));
        item.insert(
            "sk".into(),
            s(format!("{}#{key_part}", sortable_timestamp(error.at)?)),
        );
        self.client
            .put_item()
            .table_name(&self.uploads_table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| repo_error(&e, "PutItem ingest error"))?;
        Ok(())
    }
}

/// gsi1 partition key of a user's sequences.
pub fn user_gsi1pk(user_id: &str) -> String {
    format!("USER#{user_id}")
}

/// gsi1 sort key of a sequence: `SEQ#<sortable created_at>#<sequence_id>`.
pub fn sequence_gsi1sk(created_at: OffsetDateTime, sequence_id: &str) -> Result<String, RepoError> {
    Ok(format!("SEQ#{}#{sequence_id}", sortable_timestamp(created_at)?))
}

/// The sequence id inside a gsi1 sort key built by [`sequence_gsi1sk`], if it is one.
pub fn sequence_id_of_gsi1sk(sk: &str) -> Option<&str> {
    let rest = sk.strip_prefix("SEQ#")?;
    let (_, sequence_id) = rest.split_once('#')?;
    Some(sequence_id).filter(|s| !s.is_empty())
}

impl DynamoRepository {
    /// [`SequenceReader::list_sequences`]: reads up to `limit + 1` records (several Query pages if
    /// DynamoDB's 1 MB page limit cuts in) so that a `next` is only returned when more records exist.
    async fn query_sequences(
        &self,
        user_id: &str,
        limit: u32,
        after: Option<&str>,
    ) -> Result<SequencePage, RepoError> {
        let limit = limit.max(1) as usize;
        let gsi1pk = user_gsi1pk(user_id);
        let mut start: Option<Item> = match after {
            None => None,
            Some(sk) => {
                let sequence_id = sequence_id_of_gsi1sk(sk)
                    .ok_or_else(|| RepoError::Other(format!("list sequences: malformed cursor {sk:?}")))?;
                Some(HashMap::from([
                    ("gsi1pk".to_string(), s(&gsi1pk)),
                    ("gsi1sk".to_string(), s(sk)),
                    ("pk".to_string(), s(sequence_pk(user_id, sequence_id))),
                    ("sk".to_string(), s(SEQUENCE_SK)),
                ]))
            }
        };
        let mut items: Vec<Item> = Vec::new();
        loop {
            let want = limit + 1 - items.len();
            let out = self
                .client
                .query()
                .table_name(&self.uploads_table)
                .index_name("gsi1")
                .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
                .expression_attribute_names("#pk", "gsi1pk")
                .expression_attribute_names("#sk", "gsi1sk")
                .expression_attribute_values(":pk", s(&gsi1pk))
                .expression_attribute_values(":prefix", s("SEQ#"))
                .scan_index_forward(false)
                .limit(i32::try_from(want).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| repo_error(&e, &format!("Query gsi1 {gsi1pk}")))?;
            items.extend(out.items.unwrap_or_default());
            match out.last_evaluated_key.filter(|k| !k.is_empty()) {
                Some(key) if items.len() <= limit => start = Some(key),
                _ => break,
            }
        }
        let more = items.len() > limit;
        items.truncate(limit);
        let next = if more {
            items
                .last()
                .and_then(|i| string_of(i, "gsi1sk"))
                .map(str::to_string)
        } else {
            None
        };
        let sequences = items
            .into_iter()
            .map(|item| {
                let mut record: SequenceRecord = decode(item, &format!("sequence of {gsi1pk}"))?;
                record.rejected.clear();
                Ok(record)
            })
            .collect::<Result<Vec<_>, RepoError>>()?;
        Ok(SequencePage { sequences, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsi1_sort_keys_round_trip_the_sequence_id() {
        let t = time::macros::datetime!(2026-01-01 00:00:00 UTC);
        let sk = sequence_gsi1sk(t, "seq-1.a_b").unwrap();
        assert_eq!(sk, "SEQ#2026-01-01T00:00:00.000000Z#seq-1.a_b");
        assert_eq!(sequence_id_of_gsi1sk(&sk), Some("seq-1.a_b"));
        assert_eq!(sequence_id_of_gsi1sk("SEQ#x"), None);
        assert_eq!(sequence_id_of_gsi1sk("USER#x#y"), None);
    }

    #[test]
    fn sortable_timestamps_sort_like_time() {
        let a = time::macros::datetime!(2026-01-01 00:00:00 UTC);
        let b = time::macros::datetime!(2026-01-01 00:00:00.5 UTC);
        let c = time::macros::datetime!(2026-01-01 02:00:01 +02:00);
        let (sa, sb, sc) = (
            sortable_timestamp(a).unwrap(),
            sortable_timestamp(b).unwrap(),
            sortable_timestamp(c).unwrap(),
        );
        assert_eq!(sa, "2026-01-01T00:00:00.000000Z");
        assert!(sa < sb && sb < sc, "{sa} {sb} {sc}");
        assert_eq!(sc, "2026-01-01T00:00:01.000000Z");
    }

    #[test]
    fn keys_are_zero_padded() {
        assert_eq!(upload_sk(7), "UPLOAD#007");
        assert_eq!(image_sk(42), "IMG#00042");
        assert_eq!(sequence_pk("u", "s"), "SEQ#u#s");
    }
}
