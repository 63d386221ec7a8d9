//! Upload-state events in the UploadsTable (issue 14): written by [`super::DynamoRepository`] with
//! the upload record whose change they record (one `TransactWriteItems`), read and deleted by
//! [`super::DynamoTracking`]'s outbox.
//!
//! * event item: pk `UPLOAD#<upload_id>` (the upload's partition: a deleted sequence takes them
//!   along), sk `EVENT#<position:05>`, the [`UploadEvent`] as one JSON string `doc`; in the outbox
//!   index gsi1 `OUTBOX` / `<upload_id>#EVENT#<position:05>` beside the tracking records
//!   (`OUTBOX` / `<upload_id>`), until published.

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{Put, TransactWriteItem};
use aws_sdk_dynamodb::Client;

use super::item::{repo_error, s, string_of, Item};
use crate::model::UploadEvent;
use crate::ports::RepoError;

/// gsi1 partition key of everything whose events are not published yet (tracking records and
/// upload-state event items).
pub const OUTBOX_GSI1PK: &str = "OUTBOX";
/// Sort-key prefix of an upload's event items.
pub const EVENT_SK_PREFIX: &str = "EVENT#";

/// Partition key of an upload's own items (image entries, tracking, events).
fn upload_partition(upload_id: &str) -> String {
    format!("UPLOAD#{upload_id}")
}

/// Sort key of the event at `position`.
pub fn event_sk(position: u32) -> String {
    format!("{EVENT_SK_PREFIX}{position:05}")
}

/// The key of `ev`'s item.
pub fn event_key(ev: &UploadEvent) -> Item {
    super::item::key(upload_partition(&ev.upload.upload_id), event_sk(ev.position))
}

/// The item of `ev`.
pub fn event_item(ev: &UploadEvent) -> Result<Item, RepoError> {
    let id = &ev.upload.upload_id;
    let doc = serde_json::to_string(ev)
        .map_err(|e| RepoError::Other(format!("encoding event {}: {e}", ev.event.id)))?;
    let mut item = event_key(ev);
    item.extend(HashMap::from([
        ("doc".to_string(), s(doc)),
        ("upload_id".to_string(), s(id)),
        ("gsi1pk".to_string(), s(OUTBOX_GSI1PK)),
        ("gsi1sk".to_string(), s(format!("{id}#{}", event_sk(ev.position)))),
    ]));
    Ok(item)
}

/// Whether `item` (of the outbox index) is an event item.
pub fn is_event_item(item: &Item) -> bool {
    string_of(item, "sk").is_some_and(|sk| sk.starts_with(EVENT_SK_PREFIX))
}

/// An event from its item.
pub fn decode_event(item: &Item) -> Result<UploadEvent, RepoError> {
    let what = || {
        format!(
            "event item {}/{}",
            string_of(item, "pk").unwrap_or("?"),
            string_of(item, "sk").unwrap_or("?")
        )
    };
    let doc =
        string_of(item, "doc").ok_or_else(|| RepoError::Corrupt(format!("{} without `doc`", what())))?;
    serde_json::from_str(doc).map_err(|e| RepoError::Corrupt(format!("{}: {e}", what())))
}

/// A condition on the upload item's write: the expression, its names and values.
pub struct WriteCondition {
    /// `ConditionExpression`.
    pub expression: &'static str,
    /// `#name` → attribute.
    pub names: Vec<(&'static str, &'static str)>,
    /// `:value` → value.
    pub values: Vec<(&'static str, aws_sdk_dynamodb::types::AttributeValue)>,
}

/// `builder` (a `PutItem` request or a transaction's `Put`: the same methods on two types) with the
/// [`WriteCondition`] `c`, returning the stored item when it fails.
macro_rules! with_condition {
    ($builder:expr, $c:expr) => {{
        let c: WriteCondition = $c;
        let mut b = $builder
            .condition_expression(c.expression)
            .return_values_on_condition_check_failure(
                aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure::AllOld,
            );
        for (k, v) in c.names {
            b = b.expression_attribute_names(k, v);
        }
        for (k, v) in c.values {
            b = b.expression_attribute_values(k, v);
        }
        b
    }};
}
pub(crate) use with_condition;

/// Why a write of an upload item with events failed.
pub enum EventWriteError {
    /// The condition failed; the stored item when DynamoDB returned it.
    Condition(Option<Item>),
    /// Anything else.
    Other(RepoError),
}

/// Write `upload_item` (under `condition`) and the items of `events` in one `TransactWriteItems`.
pub async fn put_with_events(
    client: &Client,
    table: &str,
    upload_item: Item,
    condition: Option<WriteCondition>,
    events: &[UploadEvent],
    what: &str,
) -> Result<(), EventWriteError> {
    let mut put = Put::builder().table_name(table).set_item(Some(upload_item));
    if let Some(c) = condition {
        put = with_condition!(put, c);
    }
    let build = |p: aws_sdk_dynamodb::types::builders::PutBuilder| {
        p.build()
            .map(|p| TransactWriteItem::builder().put(p).build())
            .map_err(|e| EventWriteError::Other(RepoError::Other(format!("building {what}: {e}"))))
    };
    let mut items = vec![build(put)?];
    for ev in events {
        let item = event_item(ev).map_err(EventWriteError::Other)?;
        items.push(build(Put::builder().table_name(table).set_item(Some(item)))?);
    }
    match client
        .transact_write_items()
        .set_transact_items(Some(items))
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            if let Some(TransactWriteItemsError::TransactionCanceledException(c)) = e.as_service_error() {
                let reasons = c.cancellation_reasons();
                if let Some(first) = reasons
                    .first()
                    .filter(|r| r.code() == Some("ConditionalCheckFailed"))
                {
                    return Err(EventWriteError::Condition(
                        first.item().filter(|i| !i.is_empty()).cloned(),
                    ));
                }
                // A conflict with a concurrent write, or throttling: worth another try.
                let codes: Vec<&str> = reasons.iter().filter_map(|r| r.code()).collect();
                if codes.iter().any(|c| {
                    matches!(
                        *c,
                        "TransactionConflict" | "ThrottlingError" | "ProvisionedThroughputExceeded"
                    )
                }) {
                    return Err(EventWriteError::Other(RepoError::Transient(format!(
                        "{what}: cancelled ({})",
                        codes.join(", ")
                    ))));
                }
            }
            Err(EventWriteError::Other(repo_error(&e, what)))
        }
    }
}
