//! [`TrackingRepository`] over DynamoDB (UploadsTable), with the layout of [`crate::model`]'s
//! "Tracking" section:
//! * tracking: pk `UPLOAD#<upload_id>`, sk `TRACK`; while not final also gsi2pk `TRACKING`,
//!   gsi2sk `<user_id>#<upload_id>` (sparse: one Query finds every pending upload);
//! * image link: pk `UPLOAD#<upload_id>`, sk `LINK#<index:05>`;
//! * feed health: pk `HEALTH`, sk `FEED`;
//! * once final, a tracking record is in gsi2 under `TRACKED#<user_id>` / `<upload_id>` instead
//!   (a user's linked sequences, for Plan A's exclusion);
//! * the time of the last FINISH_UNCERTAIN scan: pk `HEALTH`, sk `RECONCILE_SCAN`.
//!
//! Items are the model types serialized with `serde_dynamo` plus the key attributes. A struct of
//! its own (not [`super::dynamo::DynamoRepository`]): the poller's items never share code paths
//! with zip-and-push's.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use backon::BackoffBuilder;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_dynamo::aws_sdk_dynamodb_1::{from_item, to_item};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::aws_error::classify;
use crate::model::{FeedHealth, ImageLink, TrackingRecord, UploadRecord, UploadState};
use crate::ports::{RepoError, TrackingRepository};

type Item = HashMap<String, AttributeValue>;

/// Sort key of a tracking record.
pub const TRACK_SK: &str = "TRACK";
/// gsi2 partition key of tracking records that are not final.
pub const TRACKING_GSI2PK: &str = "TRACKING";
/// Partition key of the feed health record.
pub const HEALTH_PK: &str = "HEALTH";
/// Sort key of the feed health record.
pub const FEED_SK: &str = "FEED";
/// Sort key of the record of the last FINISH_UNCERTAIN scan.
pub const RECONCILE_SCAN_SK: &str = "RECONCILE_SCAN";

/// gsi2 partition key of a user's final tracking records.
pub fn tracked_gsi2pk(user_id: &str) -> String {
    format!("TRACKED#{user_id}")
}
const BATCH_WRITE_MAX: usize = 25;
const BATCH_ATTEMPTS: usize = 8;

/// Partition key of an upload's poller items (the same partition as its image entries).
pub fn upload_pk(upload_id: &str) -> String {
    format!("UPLOAD#{upload_id}")
}

/// Sort key of an image link.
pub fn link_sk(index: u32) -> String {
    format!("LINK#{index:05}")
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn encode<T: Serialize>(value: &T, what: &str) -> Result<Item, RepoError> {
    to_item(value).map_err(|e| RepoError::Other(format!("encoding {what}: {e}")))
}

fn decode<T: DeserializeOwned>(item: Item, what: &str) -> Result<T, RepoError> {
    from_item(item).map_err(|e| RepoError::Corrupt(format!("{what}: {e}")))
}

fn repo_error<E>(err: &SdkError<E, HttpResponse>, what: &str) -> RepoError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let f = classify(err);
    let msg = format!("{what}: {}", f.detail);
    if f.has_code("ConditionalCheckFailedException") {
        RepoError::ConditionFailed(msg)
    } else if f.transient {
        RepoError::Transient(msg)
    } else {
        RepoError::Other(msg)
    }
}

/// Poller-owned items in the uploads table.
#[derive(Debug, Clone)]
pub struct DynamoTracking {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl DynamoTracking {
    /// Items in `uploads_table`.
    pub fn new(client: aws_sdk_dynamodb::Client, uploads_table: impl Into<String>) -> Self {
        Self {
            client,
            table: uploads_table.into(),
        }
    }

    fn tracking_item(record: &TrackingRecord) -> Result<Item, RepoError> {
        let mut item = encode(record, &format!("tracking {}", record.upload_id))?;
        item.insert("pk".into(), s(upload_pk(&record.upload_id)));
        item.insert("sk".into(), s(TRACK_SK));
        if !record.tracked.state.is_final() {
            item.insert("gsi2pk".into(), s(TRACKING_GSI2PK));
            item.insert(
                "gsi2sk".into(),
                s(format!("{}#{}", record.user_id, record.upload_id)),
            );
        } else {
            item.insert("gsi2pk".into(), s(tracked_gsi2pk(&record.user_id)));
            item.insert("gsi2sk".into(), s(&record.upload_id));
        }
        Ok(item)
    }

    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, RepoError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(pk))
            .key("sk", s(sk))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| repo_error(&e, &format!("GetItem {pk} {sk}")))?;
        Ok(out.item)
    }

    async fn write_chunk(&self, mut pending: Vec<WriteRequest>) -> Result<(), RepoError> {
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(BATCH_ATTEMPTS - 1)
            .with_jitter()
            .build();
        loop {
            let out = self
                .client
                .batch_write_item()
                .request_items(&self.table, pending)
                .send()
                .await
                .map_err(|e| repo_error(&e, "BatchWriteItem links"))?;
            pending = out
                .unprocessed_items
                .and_then(|mut m| m.remove(&self.table))
                .unwrap_or_default();
            if pending.is_empty() {
                return Ok(());
            }
            match delays.next() {
                Some(d) => tokio::time::sleep(d).await,
                None => {
                    return Err(RepoError::Transient(format!(
                        "BatchWriteItem links: {} items still unprocessed",
                        pending.len()
                    )))
                }
            }
        }
    }
}

impl DynamoTracking {
    /// The user's final tracking records (gsi2 `TRACKED#<user_id>`).
    pub async fn list_final_tracking(&self, user_id: &str) -> Result<Vec<TrackingRecord>, RepoError> {
        let mut pages = self
            .client
            .query()
            .table_name(&self.table)
            .index_name("gsi2")
            .key_condition_expression("#pk = :pk")
            .expression_attribute_names("#pk", "gsi2pk")
            .expression_attribute_values(":pk", s(tracked_gsi2pk(user_id)))
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| repo_error(&e, "Query gsi2 TRACKED#"))?;
            for item in page.items.unwrap_or_default() {
                out.push(decode(item, "final tracking record")?);
            }
        }
        Ok(out)
    }

    /// zip-and-push's upload records in `state`, all users (a Scan with a filter: upload items
    /// leave every index once final, so there is no cheaper way without a change to their layout).
    pub async fn scan_uploads_in_state(&self, state: UploadState) -> Result<Vec<UploadRecord>, RepoError> {
        let mut pages = self
            .client
            .scan()
            .table_name(&self.table)
            .filter_expression("#st = :st AND begins_with(#pk, :seq) AND begins_with(#sk, :up)")
            .expression_attribute_names("#st", "state")
            .expression_attribute_names("#pk", "pk")
            .expression_attribute_names("#sk", "sk")
            .expression_attribute_values(":st", s(state.as_str()))
            .expression_attribute_values(":seq", s("SEQ#"))
            .expression_attribute_values(":up", s("UPLOAD#"))
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| repo_error(&e, "Scan uploads by state"))?;
            for item in page.items.unwrap_or_default() {
                out.push(decode(item, "upload record")?);
            }
        }
        Ok(out)
    }

    /// When the last FINISH_UNCERTAIN scan completed.
    pub async fn reconcile_scan_mark(&self) -> Result<Option<OffsetDateTime>, RepoError> {
        let Some(item) = self.get(HEALTH_PK, RECONCILE_SCAN_SK).await? else {
            return Ok(None);
        };
        match item.get("at") {
            Some(AttributeValue::S(v)) => OffsetDateTime::parse(v, &Rfc3339)
                .map(Some)
                .map_err(|e| RepoError::Corrupt(format!("reconcile scan mark {v:?}: {e}"))),
            _ => Err(RepoError::Corrupt("reconcile scan mark has no `at`".into())),
        }
    }

    /// Record a completed FINISH_UNCERTAIN scan.
    pub async fn set_reconcile_scan_mark(&self, at: OffsetDateTime) -> Result<(), RepoError> {
        let v = at
            .format(&Rfc3339)
            .map_err(|e| RepoError::Other(format!("formatting {at}: {e}")))?;
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(HEALTH_PK))
            .item("sk", s(RECONCILE_SCAN_SK))
            .item("at", s(v))
            .send()
            .await
            .map_err(|e| repo_error(&e, "PutItem reconcile scan mark"))?;
        Ok(())
    }
}

impl TrackingRepository for DynamoTracking {
    async fn create_tracking(&self, record: &TrackingRecord) -> Result<bool, RepoError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(Self::tracking_item(record)?))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", "pk")
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) => match repo_error(&e, &format!("PutItem tracking {}", record.upload_id)) {
                RepoError::ConditionFailed(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    async fn update_tracking(
        &self,
        record: &TrackingRecord,
        expected_last_checked_at: Option<OffsetDateTime>,
    ) -> Result<(), RepoError> {
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(Self::tracking_item(record)?))
            .expression_attribute_names("#pk", "pk")
            .expression_attribute_names("#t", "tracked")
            .expression_attribute_names("#l", "last_checked_at");
        req = match expected_last_checked_at {
            Some(t) => {
                let v = t
                    .format(&Rfc3339)
                    .map_err(|e| RepoError::Other(format!("formatting {t}: {e}")))?;
                req.condition_expression("attribute_exists(#pk) AND #t.#l = :l")
                    .expression_attribute_values(":l", s(v))
            }
            None => req
                .condition_expression(
                    "attribute_exists(#pk) AND (attribute_not_exists(#t.#l) OR attribute_type(#t.#l, :null))",
                )
                .expression_attribute_values(":null", s("NULL")),
        };
        req.send()
            .await
            .map_err(|e| repo_error(&e, &format!("PutItem tracking {}", record.upload_id)))?;
        Ok(())
    }

    async fn get_tracking(&self, upload_id: &str) -> Result<Option<TrackingRecord>, RepoError> {
        match self.get(&upload_pk(upload_id), TRACK_SK).await? {
            Some(item) => Ok(Some(decode(item, &format!("tracking {upload_id}"))?)),
            None => Ok(None),
        }
    }

    async fn list_pending_tracking(&self) -> Result<Vec<TrackingRecord>, RepoError> {
        let mut pages = self
            .client
            .query()
            .table_name(&self.table)
            .index_name("gsi2")
            .key_condition_expression("#pk = :pk")
            .expression_attribute_names("#pk", "gsi2pk")
            .expression_attribute_values(":pk", s(TRACKING_GSI2PK))
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| repo_error(&e, "Query gsi2 TRACKING"))?;
            for item in page.items.unwrap_or_default() {
                out.push(decode(item, "pending tracking record")?);
            }
        }
        Ok(out)
    }

    async fn put_links(&self, links: &[ImageLink]) -> Result<(), RepoError> {
        let mut last: HashMap<(&str, u32), usize> = HashMap::new();
        for (i, l) in links.iter().enumerate() {
            last.insert((l.upload_id.as_str(), l.index), i);
        }
        let mut requests = Vec::with_capacity(last.len());
        for (i, l) in links.iter().enumerate() {
            if last.get(&(l.upload_id.as_str(), l.index)) != Some(&i) {
                continue;
            }
            let mut item = encode(l, &format!("link {}/{}", l.upload_id, l.index))?;
            item.insert("pk".into(), s(upload_pk(&l.upload_id)));
            item.insert("sk".into(), s(link_sk(l.index)));
            let put = PutRequest::builder()
                .set_item(Some(item))
                .build()
                .map_err(|e| RepoError::Other(format!("building a put request: {e}")))?;
            requests.push(WriteRequest::builder().put_request(put).build());
        }
        let mut rest = requests.into_iter().peekable();
        while rest.peek().is_some() {
            let chunk: Vec<WriteRequest> = rest.by_ref().take(BATCH_WRITE_MAX).collect();
            self.write_chunk(chunk).await?;
        }
        Ok(())
    }

    async fn list_links(&self, upload_id: &str) -> Result<Vec<ImageLink>, RepoError> {
        let pk = upload_pk(upload_id);
        let mut pages = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
            .expression_attribute_names("#pk", "pk")
            .expression_attribute_names("#sk", "sk")
            .expression_attribute_values(":pk", s(&pk))
            .expression_attribute_values(":prefix", s("LINK#"))
            .consistent_read(true)
            .into_paginator()
            .send();
        let mut out: Vec<ImageLink> = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| repo_error(&e, &format!("Query {pk} LINK#*")))?;
            for item in page.items.unwrap_or_default() {
                out.push(decode(item, &format!("link of {pk}"))?);
            }
        }
        out.sort_by_key(|l| l.index);
        Ok(out)
    }

    async fn get_feed_health(&self) -> Result<Option<FeedHealth>, RepoError> {
        match self.get(HEALTH_PK, FEED_SK).await? {
            Some(item) => Ok(Some(decode(item, "feed health")?)),
            None => Ok(None),
        }
    }

    async fn put_feed_health(&self, health: &FeedHealth) -> Result<(), RepoError> {
        let mut item = encode(health, "feed health")?;
        item.insert("pk".into(), s(HEALTH_PK));
        item.insert("sk".into(), s(FEED_SK));
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| repo_error(&e, "PutItem feed health"))?;
        Ok(())
    }
}
