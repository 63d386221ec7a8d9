//! [`DropStore`] over the UploadsTable: the status API's announcements (pk `SEQ#<user>#<sequence>`,
//! sk `ANNOUNCED#<chunk:04>`, each item one chunk of the file list plus the options and `chunks`, the
//! number of chunks) and deleting a sequence's records partition by partition.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::item::{decode, delete_request, encode, key, put_request, repo_error, s, string_of, Item};
use super::uploads::{image_pk, sequence_gsi1sk, sequence_pk, user_gsi1pk, DynamoRepository, SEQUENCE_SK};
use crate::drops::{AnnouncedFile, Announcement, ANNOUNCED_FILES_PER_ITEM};
use crate::model::{SequenceRecord, SequenceState};
use crate::ports::{DropStore, RepoError};

/// Sort-key prefix of the announcement's items.
const ANNOUNCED_PREFIX: &str = "ANNOUNCED#";

fn announced_sk(chunk: usize) -> String {
    format!("{ANNOUNCED_PREFIX}{chunk:04}")
}

/// One announcement item.
#[derive(Serialize, Deserialize)]
struct AnnouncedItem {
    user_id: String,
    sequence_id: String,
    chunk: usize,
    chunks: usize,
    #[serde(default)]
    organization_id: Option<String>,
    #[serde(default)]
    max_images_per_upload: Option<u32>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    files: Vec<AnnouncedFile>,
    /// The UploadsTable's TTL attribute (epoch seconds): DynamoDB removes an expired announcement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<i64>,
}

impl DynamoRepository {
    /// The keys (`pk`, `sk`) of every item of partition `pk` (all pages, consistent).
    async fn partition_keys(&self, pk: &str) -> Result<Vec<Item>, RepoError> {
        let mut pages = self
            .client
            .query()
            .table_name(&self.uploads_table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", s(pk))
            .projection_expression("pk, sk")
            .consistent_read(true)
            .into_paginator()
            .send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| repo_error(&e, &format!("Query {pk} (keys)")))?;
            for item in page.items.unwrap_or_default() {
                if let Some(sk) = string_of(&item, "sk") {
                    keys.push(key(pk, sk));
                }
            }
        }
        Ok(keys)
    }

    /// Delete the items of `keys` (batches of 25).
    async fn delete_keys(&self, keys: Vec<Item>) -> Result<(), RepoError> {
        let requests = keys
            .into_iter()
            .map(delete_request)
            .collect::<Result<Vec<_>, _>>()?;
        self.batch_write(requests).await
    }
}

impl DropStore for DynamoRepository {
    async fn put_announcement(&self, a: &Announcement) -> Result<(), RepoError> {
        let pk = sequence_pk(&a.user_id, &a.sequence_id);
        let chunks = a.files.len().div_ceil(ANNOUNCED_FILES_PER_ITEM).max(1);
        let mut puts = Vec::with_capacity(chunks);
        for chunk in 0..chunks {
            let files = a
                .files
                .iter()
                .skip(chunk * ANNOUNCED_FILES_PER_ITEM)
                .take(ANNOUNCED_FILES_PER_ITEM)
                .cloned()
                .collect();
            let mut item = encode(
                &AnnouncedItem {
                    user_id: a.user_id.clone(),
                    sequence_id: a.sequence_id.clone(),
                    chunk,
                    chunks,
                    organization_id: a.organization_id.clone(),
                    max_images_per_upload: a.max_images_per_upload,
                    created_at: a.created_at,
                    files,
                    expires_at: a.expires_at.map(OffsetDateTime::unix_timestamp),
                },
                &format!("announcement of {pk}"),
            )?;
            item.insert("pk".into(), s(&pk));
            item.insert("sk".into(), s(announced_sk(chunk)));
            puts.push(put_request(item)?);
        }
        // Chunks of an earlier announcement beyond this one's would be read as corrupt: drop them.
        let stale: Vec<Item> = self
            .query_prefix(&pk, ANNOUNCED_PREFIX)
            .await?
            .into_iter()
            .filter_map(|item| {
                let sk = string_of(&item, "sk")?;
                let n: usize = sk.strip_prefix(ANNOUNCED_PREFIX)?.parse().ok()?;
                (n >= chunks).then(|| key(&pk, sk))
            })
            .collect();
        self.batch_write(puts).await?;
        self.delete_keys(stale).await
    }

    async fn get_announcement(
        &self,
        user_id: &str,
        sequence_id: &str,
    ) -> Result<Option<Announcement>, RepoError> {
        let pk = sequence_pk(user_id, sequence_id);
        let items = self.query_prefix(&pk, ANNOUNCED_PREFIX).await?;
        if items.is_empty() {
            return Ok(None);
        }
        let mut parts: Vec<AnnouncedItem> = items
            .into_iter()
            .map(|i| decode(i, &format!("announcement of {pk}")))
            .collect::<Result<_, _>>()?;
        parts.sort_by_key(|p| p.chunk);
        let chunks = parts.first().map(|p| p.chunks).unwrap_or_default();
        let complete = parts.len() == chunks
            && parts
                .iter()
                .enumerate()
                .all(|(i, p)| p.chunk == i && p.chunks == chunks);
        if !complete {
            return Err(RepoError::Corrupt(format!(
                "{pk}: announcement of {chunks} items, {} found",
                parts.len()
            )));
        }
        let mut files = Vec::new();
        let mut head = None;
        for p in parts {
            files.extend(p.files);
            if head.is_none() {
                head = Some((
                    p.user_id,
                    p.sequence_id,
                    p.organization_id,
                    p.max_images_per_upload,
                    p.created_at,
                    p.expires_at,
                ));
            }
        }
        Ok(head.map(
            |(user_id, sequence_id, organization_id, max_images_per_upload, created_at, expires_at)| {
                Announcement {
                    user_id,
                    sequence_id,
                    files,
                    organization_id,
                    max_images_per_upload,
                    created_at,
                    expires_at: expires_at.and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok()),
                }
            },
        ))
    }

    async fn replace_sequence_if(
        &self,
        seq: &SequenceRecord,
        expected: SequenceState,
    ) -> Result<(), RepoError> {
        let pk = sequence_pk(&seq.user_id, &seq.sequence_id);
        if !seq.rejected.is_empty() {
            return Err(RepoError::Other(format!(
                "{pk}: a conditional replace does not store rejected images"
            )));
        }
        let mut item = encode(seq, &format!("sequence {pk}"))?;
        item.insert("pk".into(), s(&pk));
        item.insert("sk".into(), s(SEQUENCE_SK));
        item.insert("gsi1pk".into(), s(user_gsi1pk(&seq.user_id)));
        item.insert(
            "gsi1sk".into(),
            s(sequence_gsi1sk(seq.created_at, &seq.sequence_id)?),
        );
        self.client
            .put_item()
            .table_name(&self.uploads_table)
            .set_item(Some(item))
            .condition_expression("#state = :expected")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":expected", s(expected.as_str()))
            .send()
            .await
            .map_err(|e| repo_error(&e, &format!("PutItem {pk} if {}", expected.as_str())))?;
        Ok(())
    }

    async fn delete_sequence_records(
        &self,
        user_id: &str,
        sequence_id: &str,
        upload_ids: &[String],
    ) -> Result<(), RepoError> {
        for upload_id in upload_ids {
            let keys = self.partition_keys(&image_pk(upload_id)).await?;
            self.delete_keys(keys).await?;
        }
        let pk = sequence_pk(user_id, sequence_id);
        let (meta, rest): (Vec<Item>, Vec<Item>) = self
            .partition_keys(&pk)
            .await?
            .into_iter()
            .partition(|k| string_of(k, "sk") == Some(SEQUENCE_SK));
        self.delete_keys(rest).await?;
        self.delete_keys(meta).await
    }

    async fn delete_sequence_claim(&self, claim_id: &str) -> Result<(), RepoError> {
        let Some(table) = &self.idempotency_table else {
            return Err(RepoError::Other(
                "no idempotency table configured: the sequence's claim cannot be deleted".into(),
            ));
        };
        self.client
            .delete_item()
            .table_name(table)
            .key("id", s(claim_id))
            .send()
            .await
            .map_err(|e| repo_error(&e, &format!("DeleteItem claim {claim_id}")))?;
        Ok(())
    }
}
