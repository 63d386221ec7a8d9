//! The poller's ports over DynamoDB — [`TrackingStore`] (and [`TrackingReader`]), [`RunLease`],
//! [`ReconcileStore`] — in the UploadsTable, with the layout of [`crate::model`]'s "Tracking"
//! section:
//! * tracking: pk `UPLOAD#<upload_id>`, sk `TRACK`; the record as one JSON string `doc` (plus
//!   `user_id` and, once checked, `last_checked_at` for the optimistic-concurrency condition).
//!   One attribute instead of a deep map: the poller reads and writes ten thousand of these per
//!   run, and a flat string is both smaller (fewer request units) and cheaper to (de)serialize.
//!   Items in the map layout of earlier versions are still read;
//! * a user's pending uploads: pk `PENDING#<user_id>`, sk `PENDING`, gsi2pk `PENDING_USERS`,
//!   gsi2sk `<user_id>`, `uploads` = string set of the upload ids not final yet. A run queries the
//!   (small: one item per user) partition, then reads the records by key. The index changes only
//!   when an upload starts or ends being tracked, not on every status write (a per-record index
//!   entry would be rewritten with each record, all in one hot partition);
//! * image links: pk `UPLOAD#<upload_id>`, sk `LINKS#<chunk:03>`: up to [`LINKS_PER_ITEM`] links of
//!   the upload as one JSON string (`links`), with `chunks` = how many such items the upload has.
//!   One item per upload instead of one per image: a run links thousands of uploads, and the item
//!   count, not the bytes, is what costs (request units are per KB either way). Per-image items
//!   `LINK#<index:05>` written by earlier versions are still read;
//! * feed health: pk `HEALTH`, sk `FEED`;
//! * the run lease: pk `HEALTH`, sk `POLLER_LEASE` (`owner`, `lease_until_ms`): one conditional
//!   write per run keeps overlapping runs apart, so a run writes its records in batches;
//! * once final, a tracking record is in gsi2 under `TRACKED#<user_id>` / `<upload_id>` instead
//!   (a user's linked sequences, for Plan A's exclusion);
//! * the time of the last FINISH_UNCERTAIN scan: pk `HEALTH`, sk `RECONCILE_SCAN`;
//! * the outbox: a tracking record with status-change events not yet published
//!   (`pending_events` in its `doc`) is in gsi1 under `OUTBOX` / `<upload_id>` — same item, so the
//!   change and its events are one write; zip-and-push's upload-state events are there too, as
//!   items of their own (`OUTBOX` / `<upload_id>#EVENT#<position>`, [`super::upload_events`]).
//!
//! Items are the model types serialized with `serde_dynamo` plus the key attributes. A struct of
//! its own (not [`super::DynamoRepository`]): the poller's items never share code paths
//! with zip-and-push's.

use std::collections::{HashMap, HashSet};

use aws_sdk_dynamodb::types::{AttributeValue, WriteRequest};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

mod webhook_queue;

pub use webhook_queue::{QUEUE_TTL_DAYS, WEBHOOK_QUEUE_GSI1PK};

use super::batch::{batch_get, batch_write};
use super::item::{
    decode, delete_request, encode, gsi2_partition, index_partition, key, n, number_of, put_request,
    repo_error, rfc3339, s, string_of, Item,
};
use super::upload_events::{decode_event, event_key, is_event_item, EVENT_SK_PREFIX};
use super::uploads::{sequence_pk, upload_sk, UNCERTAIN_GSI2PK};
use crate::model::{FeedHealth, ImageLink, TrackingRecord, UploadEvent, UploadRecord, UploadState};
use crate::ports::{
    Outbox, OutboxStore, PendingTracking, ReconcileStore, RepoError, RunLease, TrackingReader, TrackingStore,
};

/// Sort key of a tracking record.
pub const TRACK_SK: &str = "TRACK";
pub use super::upload_events::OUTBOX_GSI1PK;
/// gsi2 partition key of the users' pending-uploads items.
pub const PENDING_USERS_GSI2PK: &str = "PENDING_USERS";
/// Sort key of a user's pending-uploads item.
pub const PENDING_SK: &str = "PENDING";

/// Partition key of a user's pending-uploads item.
pub fn pending_pk(user_id: &str) -> String {
    format!("PENDING#{user_id}")
}
/// Partition key of the feed health record.
pub const HEALTH_PK: &str = "HEALTH";
/// Sort key of the feed health record.
pub const FEED_SK: &str = "FEED";
/// Sort key of the record of the last FINISH_UNCERTAIN scan.
pub const RECONCILE_SCAN_SK: &str = "RECONCILE_SCAN";
/// Sort key of the poller's run lease.
pub const LEASE_SK: &str = "POLLER_LEASE";
/// Image links per links item (≈ 300 bytes each as JSON: far below the 400 KB item limit).
pub const LINKS_PER_ITEM: usize = 200;

/// gsi2 partition key of a user's final tracking records.
pub fn tracked_gsi2pk(user_id: &str) -> String {
    format!("TRACKED#{user_id}")
}

/// Partition key of an upload's poller items (the same partition as its image entries).
pub fn upload_pk(upload_id: &str) -> String {
    format!("UPLOAD#{upload_id}")
}

/// Sort key of the `chunk`-th links item of an upload.
pub fn links_sk(chunk: usize) -> String {
    format!("LINKS#{chunk:03}")
}

/// The links items of one upload's links (all of them, in index order).
fn links_items(upload_id: &str, links: &[&ImageLink]) -> Result<Vec<Item>, RepoError> {
    let chunks = links.len().div_ceil(LINKS_PER_ITEM);
    links
        .chunks(LINKS_PER_ITEM)
        .enumerate()
        .map(|(k, part)| {
            let json = serde_json::to_string(part)
                .map_err(|e| RepoError::Other(format!("encoding links of {upload_id}: {e}")))?;
            Ok(HashMap::from([
                ("pk".to_string(), s(upload_pk(upload_id))),
                ("sk".to_string(), s(links_sk(k))),
                ("upload_id".to_string(), s(upload_id)),
                ("chunk".to_string(), n(k)),
                ("chunks".to_string(), n(chunks)),
                ("links".to_string(), s(json)),
            ]))
        })
        .collect()
}

/// The links of an upload from its links items (only those of the latest write: `chunk` below the
/// `chunks` that chunk 0 names) and any older per-image items (overridden by the chunked ones).
fn merge_links(pk: &str, chunked: Vec<Item>, single: Vec<ImageLink>) -> Result<Vec<ImageLink>, RepoError> {
    let total = chunked
        .iter()
        .find(|i| number_of::<usize>(i, "chunk") == Some(0))
        .and_then(|i| number_of::<usize>(i, "chunks"))
        .unwrap_or(0);
    let mut by_index: std::collections::BTreeMap<u32, ImageLink> =
        single.into_iter().map(|l| (l.index, l)).collect();
    for item in chunked {
        if number_of::<usize>(&item, "chunk").is_none_or(|c| c >= total) {
            continue; // left over from an earlier, longer write
        }
        let Some(AttributeValue::S(json)) = item.get("links") else {
            return Err(RepoError::Corrupt(format!("links item of {pk} without `links`")));
        };
        let part: Vec<ImageLink> =
            serde_json::from_str(json).map_err(|e| RepoError::Corrupt(format!("links of {pk}: {e}")))?;
        for l in part {
            by_index.insert(l.index, l);
        }
    }
    Ok(by_index.into_values().collect())
}

/// A tracking record from its item: the `doc` JSON, or the map layout of earlier versions.
fn decode_record(item: Item, what: &str) -> Result<TrackingRecord, RepoError> {
    match item.get("doc") {
        Some(AttributeValue::S(doc)) => {
            serde_json::from_str(doc).map_err(|e| RepoError::Corrupt(format!("{what}: {e}")))
        }
        _ => decode(item, what),
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
        let doc = serde_json::to_string(record)
            .map_err(|e| RepoError::Other(format!("encoding tracking {}: {e}", record.upload_id)))?;
        let mut item: Item = HashMap::from([
            ("doc".to_string(), s(doc)),
            ("user_id".to_string(), s(&record.user_id)),
            ("upload_id".to_string(), s(&record.upload_id)),
        ]);
        if let Some(t) = record.tracked.last_checked_at {
            item.insert("last_checked_at".into(), s(rfc3339(t)?));
        }
        item.insert("pk".into(), s(upload_pk(&record.upload_id)));
        item.insert("sk".into(), s(TRACK_SK));
        if record.tracked.state.is_final() {
            item.insert("gsi2pk".into(), s(tracked_gsi2pk(&record.user_id)));
            item.insert("gsi2sk".into(), s(&record.upload_id));
        }
        if !record.pending_events.is_empty() {
            // The outbox index: sparse, only records with events to publish (same item, same write).
            item.insert("gsi1pk".into(), s(OUTBOX_GSI1PK));
            item.insert("gsi1sk".into(), s(&record.upload_id));
        }
        Ok(item)
    }

    /// Add (`add`) or remove upload ids in the user's pending set (one UpdateItem; a set that
    /// becomes empty loses its attribute, and the item is then dropped by the next listing).
    async fn change_pending(&self, user_id: &str, ids: Vec<String>, add: bool) -> Result<(), RepoError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(pending_pk(user_id)))
            .key("sk", s(PENDING_SK))
            .expression_attribute_names("#u", "uploads")
            .expression_attribute_values(":ids", AttributeValue::Ss(ids));
        req = if add {
            req.update_expression("ADD #u :ids SET #g = :g, #gs = :gs, #user = :user")
                .expression_attribute_names("#g", "gsi2pk")
                .expression_attribute_names("#gs", "gsi2sk")
                .expression_attribute_names("#user", "user_id")
                .expression_attribute_values(":g", s(PENDING_USERS_GSI2PK))
                .expression_attribute_values(":gs", s(user_id))
                .expression_attribute_values(":user", s(user_id))
        } else {
            req.update_expression("DELETE #u :ids")
        };
        req.send()
            .await
            .map_err(|e| repo_error(&e, &format!("UpdateItem pending uploads of {user_id}")))?;
        Ok(())
    }

    /// Tracking records by upload id (BatchGetItem, consistent, each id read once): the readable
    /// ones by id, and (id, why) for each record that cannot be decoded.
    async fn get_records_lenient(
        &self,
        ids: &[String],
    ) -> Result<(HashMap<String, TrackingRecord>, Vec<(String, String)>), RepoError> {
        let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
        let keys: Vec<Item> = unique
            .into_iter()
            .map(|id| key(upload_pk(id), TRACK_SK))
            .collect();
        let items = batch_get(&self.client, &self.table, keys, None)
            .await
            .map_err(|e| e.into_repo("BatchGetItem tracking"))?;
        let mut records = HashMap::with_capacity(items.len());
        let mut unreadable = Vec::new();
        for item in items {
            let id = string_of(&item, "pk")
                .and_then(|pk| pk.strip_prefix("UPLOAD#"))
                .unwrap_or("?")
                .to_string();
            match decode_record(item, "tracking record") {
                Ok(r) if r.upload_id == id => {
                    records.insert(id, r);
                }
                Ok(r) => {
                    let why = format!("tracking record {id} names upload {} instead", r.upload_id);
                    unreadable.push((id, why));
                }
                Err(e) => {
                    let why = format!("tracking record {id} is unreadable: {e}");
                    unreadable.push((id, why));
                }
            }
        }
        for (id, why) in &unreadable {
            tracing::warn!(upload_id = %id, problem = %why, "pending tracking record skipped");
        }
        Ok((records, unreadable))
    }

    /// Tracking records by upload id (BatchGetItem, consistent): found ones, in no particular order.
    pub async fn get_records(&self, ids: &[String]) -> Result<Vec<TrackingRecord>, RepoError> {
        // Each key once: DynamoDB refuses a BatchGetItem with a repeated key.
        let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
        let keys: Vec<Item> = unique
            .into_iter()
            .map(|id| key(upload_pk(id), TRACK_SK))
            .collect();
        batch_get(&self.client, &self.table, keys, None)
            .await
            .map_err(|e| e.into_repo("BatchGetItem tracking"))?
            .into_iter()
            .map(|item| decode_record(item, "tracking record"))
            .collect()
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
}

impl DynamoTracking {
    /// The links items for `links` (grouped by upload; each upload's links are taken as all of
    /// them: its items are rewritten whole).
    fn links_requests(links: &[ImageLink]) -> Result<Vec<Item>, RepoError> {
        let mut by_upload: std::collections::BTreeMap<&str, std::collections::BTreeMap<u32, &ImageLink>> =
            std::collections::BTreeMap::new();
        for l in links {
            // The last link given for an index wins.
            by_upload
                .entry(l.upload_id.as_str())
                .or_default()
                .insert(l.index, l);
        }
        let mut items = Vec::new();
        for (upload_id, by_index) in by_upload {
            let ordered: Vec<&ImageLink> = by_index.into_values().collect();
            items.extend(links_items(upload_id, &ordered)?);
        }
        Ok(items)
    }

    /// `BatchWriteItem` of `requests` in chunks of 25, one after the other (order kept between chunks).
    async fn write_all(&self, requests: Vec<WriteRequest>) -> Result<(), RepoError> {
        batch_write(&self.client, &self.table, requests, 1)
            .await
            .map_err(|e| e.into_repo("BatchWriteItem"))
    }

    /// The user's final tracking records (gsi2 `TRACKED#<user_id>`).
    async fn list_final_tracking(&self, user_id: &str) -> Result<Vec<TrackingRecord>, RepoError> {
        let mut out = Vec::new();
        for item in gsi2_partition(
            &self.client,
            &self.table,
            s(tracked_gsi2pk(user_id)),
            "Query gsi2 TRACKED#",
        )
        .await?
        {
            out.push(decode_record(item, "final tracking record")?);
        }
        Ok(out)
    }
}

impl TrackingReader for DynamoTracking {
    async fn get_tracking(&self, upload_id: &str) -> Result<Option<TrackingRecord>, RepoError> {
        match self.get(&upload_pk(upload_id), TRACK_SK).await? {
            Some(item) => Ok(Some(decode_record(item, &format!("tracking {upload_id}"))?)),
            None => Ok(None),
        }
    }

    async fn list_links(&self, upload_id: &str) -> Result<Vec<ImageLink>, RepoError> {
        let pk = upload_pk(upload_id);
        // "LINK" covers both layouts: `LINKS#<chunk>` items and older per-image `LINK#<index>` items.
        let mut pages = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
            .expression_attribute_names("#pk", "pk")
            .expression_attribute_names("#sk", "sk")
            .expression_attribute_values(":pk", s(&pk))
            .expression_attribute_values(":prefix", s("LINK"))
            .consistent_read(true)
            .into_paginator()
            .send();
        let mut chunked: Vec<Item> = Vec::new();
        let mut single: Vec<ImageLink> = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| repo_error(&e, &format!("Query {pk} LINK*")))?;
            for item in page.items.unwrap_or_default() {
                match item.get("sk") {
                    Some(AttributeValue::S(sk)) if sk.starts_with("LINKS#") => chunked.push(item),
                    _ => single.push(decode(item, &format!("link of {pk}"))?),
                }
            }
        }
        merge_links(&pk, chunked, single)
    }

    async fn get_feed_health(&self) -> Result<Option<FeedHealth>, RepoError> {
        match self.get(HEALTH_PK, FEED_SK).await? {
            Some(item) => Ok(Some(decode(item, "feed health")?)),
            None => Ok(None),
        }
    }
}

impl TrackingStore for DynamoTracking {
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
        let created = match result {
            Ok(_) => true,
            Err(e) => match repo_error(&e, &format!("PutItem tracking {}", record.upload_id)) {
                RepoError::ConditionFailed(_) => false,
                other => return Err(other),
            },
        };
        // Also for an existing record: a crash between the two writes must not leave a pending
        // record outside its user's set (a final one is dropped from the set by the next listing).
        if !record.tracked.state.is_final() {
            self.change_pending(&record.user_id, vec![record.upload_id.clone()], true)
                .await?;
        }
        Ok(created)
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
            .expression_attribute_names("#l", "last_checked_at");
        req = match expected_last_checked_at {
            Some(t) => req
                .condition_expression("attribute_exists(#pk) AND #l = :l")
                .expression_attribute_values(":l", s(rfc3339(t)?)),
            None => req.condition_expression("attribute_exists(#pk) AND attribute_not_exists(#l)"),
        };
        req.send()
            .await
            .map_err(|e| repo_error(&e, &format!("PutItem tracking {}", record.upload_id)))?;
        let final_ = record.tracked.state.is_final();
        self.change_pending(&record.user_id, vec![record.upload_id.clone()], !final_)
            .await
    }

    async fn list_pending_tracking(&self) -> Result<PendingTracking, RepoError> {
        let mut listing = PendingTracking::default();
        // Ids whose record exists but cannot be read: reported, and kept in their sets.
        let mut unreadable_ids: HashSet<String> = HashSet::new();
        // user → its pending upload ids
        let mut sets: Vec<(String, Vec<String>)> = Vec::new();
        for item in gsi2_partition(
            &self.client,
            &self.table,
            s(PENDING_USERS_GSI2PK),
            "Query gsi2 PENDING_USERS",
        )
        .await?
        {
            let Some(AttributeValue::S(user)) = item.get("user_id") else {
                listing.unreadable.push(format!(
                    "pending-uploads item {} has no user_id",
                    string_of(&item, "pk").unwrap_or("?")
                ));
                continue;
            };
            let ids = match item.get("uploads") {
                Some(AttributeValue::Ss(ids)) => ids.clone(),
                _ => Vec::new(),
            };
            sets.push((user.clone(), ids));
        }
        // One read per id even when two sets name it (DynamoDB refuses a BatchGetItem with a
        // repeated key, which stopped every user's tracking: issue 15).
        let ids: Vec<String> = sets
            .iter()
            .flat_map(|(_, ids)| ids.iter().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let by_id: HashMap<String, TrackingRecord> = match self.get_records_lenient(&ids).await {
            Ok((records, unreadable)) => {
                for (id, why) in unreadable {
                    unreadable_ids.insert(id);
                    listing.unreadable.push(why);
                }
                records
            }
            // The batch as a whole failed: read user by user, so that one user's records cannot
            // stop the others'.
            Err(e) => {
                tracing::warn!(error = %e, "reading the pending records failed: reading them per user");
                let mut all = HashMap::new();
                for (user, ids) in &sets {
                    match self.get_records_lenient(ids).await {
                        Ok((records, unreadable)) => {
                            for (id, why) in unreadable {
                                unreadable_ids.insert(id);
                                listing.unreadable.push(why);
                            }
                            all.extend(records);
                        }
                        Err(e) => {
                            unreadable_ids.extend(ids.iter().cloned());
                            listing
                                .unreadable
                                .push(format!("pending uploads of user {user}: {e}"));
                        }
                    }
                }
                all
            }
        };
        let mut out = Vec::with_capacity(ids.len());
        for (user, ids) in sets {
            if ids.is_empty() {
                // Nothing pending any more: drop the item (unless an upload was added meanwhile). A
                // failure only leaves an empty item for the next listing.
                let deleted = self
                    .client
                    .delete_item()
                    .table_name(&self.table)
                    .key("pk", s(pending_pk(&user)))
                    .key("sk", s(PENDING_SK))
                    .condition_expression("attribute_not_exists(#u)")
                    .expression_attribute_names("#u", "uploads")
                    .send()
                    .await;
                if let Err(e) = deleted {
                    tracing::debug!(user_id = %user, error = %repo_error(&e, "DeleteItem pending"), "empty pending item kept");
                }
                continue;
            }
            let mut done = Vec::new();
            for id in ids {
                match by_id.get(&id) {
                    // Every read checks the owner: a record of another user is never listed for
                    // this one (and leaves this user's set).
                    Some(r) if !r.tracked.state.is_final() && r.user_id == user => out.push(r.clone()),
                    // Unreadable: reported above, kept in the set until someone repairs it.
                    None if unreadable_ids.contains(&id) => {}
                    // Final (its removal from the set did not happen), gone, or not this user's.
                    _ => done.push(id),
                }
            }
            // Tidying is best effort: the listing is right either way.
            if let Err(e) = self.change_pending(&user, done, false).await {
                tracing::warn!(user_id = %user, error = %e, "removing final uploads from the pending set failed");
            }
        }
        out.sort_by(|a, b| (&a.user_id, &a.upload_id).cmp(&(&b.user_id, &b.upload_id)));
        listing.records = out;
        Ok(listing)
    }

    async fn put_links(&self, links: &[ImageLink]) -> Result<(), RepoError> {
        let mut requests = Vec::new();
        for item in Self::links_requests(links)? {
            requests.push(put_request(item)?);
        }
        self.write_all(requests).await
    }

    /// Write the links, then the tracking records, in batches (unconditional: the caller holds the
    /// run lease, see [`RunLease::acquire_run_lease`]). Links first, so a record that says "linked"
    /// never exists without its links; a failure part-way leaves records as they were, and the
    /// next run writes everything again.
    ///
    /// Records that became final leave their users' pending sets afterwards. `clear_pending_of`:
    /// the caller knows none of that user's uploads is pending any more, so the user's
    /// pending-uploads item is deleted in the same batch instead.
    async fn put_tracking_batch(
        &self,
        records: &[TrackingRecord],
        links: &[ImageLink],
        clear_pending_of: Option<&str>,
    ) -> Result<(), RepoError> {
        let mut requests = Vec::new();
        for item in Self::links_requests(links)? {
            requests.push(put_request(item)?);
        }
        self.write_all(requests).await?;
        let mut requests = Vec::with_capacity(records.len() + 1);
        for r in records {
            requests.push(put_request(Self::tracking_item(r)?)?);
        }
        if let Some(user) = clear_pending_of {
            requests.push(delete_request(key(pending_pk(user), PENDING_SK))?);
        }
        self.write_all(requests).await?;
        let mut finals: std::collections::BTreeMap<&str, Vec<String>> = std::collections::BTreeMap::new();
        for r in records.iter().filter(|r| r.tracked.state.is_final()) {
            if Some(r.user_id.as_str()) != clear_pending_of {
                finals
                    .entry(r.user_id.as_str())
                    .or_default()
                    .push(r.upload_id.clone());
            }
        }
        for (user, ids) in finals {
            self.change_pending(user, ids, false).await?;
        }
        Ok(())
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

    async fn user_linked_sequences(&self, user_id: &str) -> Result<HashSet<String>, RepoError> {
        Ok(self
            .list_final_tracking(user_id)
            .await?
            .into_iter()
            .flat_map(|r| r.sequence_ids)
            .collect())
    }
}

impl DynamoTracking {
    /// Every item of gsi1 partition `pk` (all pages), in sort-key order.
    async fn gsi1_partition(&self, pk: &str) -> Result<Vec<Item>, RepoError> {
        index_partition(
            &self.client,
            &self.table,
            "gsi1",
            s(pk),
            &format!("Query gsi1 {pk}"),
        )
        .await
    }
}

impl OutboxStore for DynamoTracking {
    async fn list_outbox(&self) -> Result<Outbox, RepoError> {
        let mut out = Outbox::default();
        for item in self.gsi1_partition(OUTBOX_GSI1PK).await? {
            if is_event_item(&item) {
                out.uploads.push(decode_event(&item)?);
                continue;
            }
            let what = format!("outbox record {}", string_of(&item, "pk").unwrap_or("?"));
            out.tracking.push(decode_record(item, &what)?);
        }
        Ok(out)
    }

    async fn upload_outbox(&self, upload_id: &str) -> Result<Vec<UploadEvent>, RepoError> {
        let pk = upload_pk(upload_id);
        let mut pages = self
            .client
            .query()
            .table_name(&self.table)
            .consistent_read(true)
            .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
            .expression_attribute_names("#pk", "pk")
            .expression_attribute_names("#sk", "sk")
            .expression_attribute_values(":pk", s(&pk))
            .expression_attribute_values(":prefix", s(EVENT_SK_PREFIX))
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| repo_error(&e, &format!("Query {pk} events")))?;
            for item in page.items.unwrap_or_default() {
                out.push(decode_event(&item)?);
            }
        }
        Ok(out)
    }

    async fn ack_upload_events(&self, events: &[UploadEvent]) -> Result<(), RepoError> {
        let deletes = events
            .iter()
            .map(|ev| delete_request(event_key(ev)))
            .collect::<Result<Vec<_>, _>>()?;
        batch_write(&self.client, &self.table, deletes, 1)
            .await
            .map_err(|e| e.into_repo("BatchWriteItem upload events"))
    }

    async fn ack_outbox(&self, record: &TrackingRecord) -> Result<(), RepoError> {
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(Self::tracking_item(record)?))
            .expression_attribute_names("#pk", "pk")
            .expression_attribute_names("#l", "last_checked_at");
        req = match record.tracked.last_checked_at {
            Some(t) => req
                .condition_expression("attribute_exists(#pk) AND #l = :l")
                .expression_attribute_values(":l", s(rfc3339(t)?)),
            None => req.condition_expression("attribute_exists(#pk) AND attribute_not_exists(#l)"),
        };
        req.send()
            .await
            .map_err(|e| repo_error(&e, &format!("PutItem outbox of {}", record.upload_id)))?;
        Ok(())
    }
}

impl RunLease for DynamoTracking {
    /// Take the run lease for `owner` until `until` unless another owner holds an unexpired one
    /// (one conditional PutItem). `false`: another run is active.
    async fn acquire_run_lease(
        &self,
        owner: &str,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, RepoError> {
        let ms = |t: OffsetDateTime| t.unix_timestamp_nanos() / 1_000_000;
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(HEALTH_PK))
            .item("sk", s(LEASE_SK))
            .item("owner", s(owner))
            .item("lease_until_ms", n(ms(until)))
            .condition_expression("attribute_not_exists(#pk) OR #until < :now OR #owner = :me")
            .expression_attribute_names("#pk", "pk")
            .expression_attribute_names("#until", "lease_until_ms")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":now", n(ms(now)))
            .expression_attribute_values(":me", s(owner))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) => match repo_error(&e, "PutItem run lease") {
                RepoError::ConditionFailed(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    /// Give the run lease back (only if `owner` still holds it).
    async fn release_run_lease(&self, owner: &str) -> Result<(), RepoError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(HEALTH_PK))
            .key("sk", s(LEASE_SK))
            .condition_expression("#owner = :me")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":me", s(owner))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => match repo_error(&e, "DeleteItem run lease") {
                RepoError::ConditionFailed(_) => Ok(()),
                other => Err(other),
            },
        }
    }
}

impl ReconcileStore for DynamoTracking {
    /// zip-and-push's FINISH_UNCERTAIN upload records, all users: the sparse gsi2 partition
    /// `UNCERTAIN` that [`super::DynamoRepository`] keeps them in (one query, not a
    /// table scan).
    async fn finish_uncertain_uploads(&self) -> Result<Vec<UploadRecord>, RepoError> {
        let mut out = Vec::new();
        for item in gsi2_partition(
            &self.client,
            &self.table,
            s(UNCERTAIN_GSI2PK),
            "Query gsi2 UNCERTAIN",
        )
        .await?
        {
            let record: UploadRecord = decode(item, "upload record")?;
            // The index is eventually consistent: skip one that has moved on since.
            if record.state == UploadState::FinishUncertain {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Remove the upload item's gsi2 keys while they still say `UNCERTAIN` (a conditional
    /// `UpdateItem`: an entry already gone, or an upload that moved on, is left as it is).
    async fn resolve_uncertain(&self, upload: &UploadRecord) -> Result<(), RepoError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(sequence_pk(&upload.user_id, &upload.sequence_id)))
            .key("sk", s(upload_sk(upload.index)))
            .update_expression("REMOVE #gpk, #gsk")
            .condition_expression("#gpk = :uncertain")
            .expression_attribute_names("#gpk", "gsi2pk")
            .expression_attribute_names("#gsk", "gsi2sk")
            .expression_attribute_values(":uncertain", s(UNCERTAIN_GSI2PK))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => match repo_error(
                &e,
                &format!("UpdateItem upload {} UNCERTAIN index", upload.upload_id),
            ) {
                RepoError::ConditionFailed(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    /// When the last FINISH_UNCERTAIN scan completed.
    async fn reconcile_scan_mark(&self) -> Result<Option<OffsetDateTime>, RepoError> {
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
    async fn set_reconcile_scan_mark(&self, at: OffsetDateTime) -> Result<(), RepoError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(HEALTH_PK))
            .item("sk", s(RECONCILE_SCAN_SK))
            .item("at", s(rfc3339(at)?))
            .send()
            .await
            .map_err(|e| repo_error(&e, "PutItem reconcile scan mark"))?;
        Ok(())
    }
}
