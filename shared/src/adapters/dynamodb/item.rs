//! Item helpers of every DynamoDB adapter: attribute values, model types to and from items
//! (`serde_dynamo`), lenient attribute reads, write requests, and SDK errors (conditional-check
//! failures included) as [`RepoError`]s. One copy, so that every adapter classifies a failure,
//! names a corrupt item and builds a key the same way.

use std::collections::HashMap;
use std::str::FromStr;

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::delete_item::DeleteItemError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, DeleteRequest, PutRequest, WriteRequest};
use aws_sdk_dynamodb::Client;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_dynamo::aws_sdk_dynamodb_1::{from_item, to_item};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::adapters::aws_error::classify;
use crate::ports::RepoError;

/// Every item of one partition of a global secondary index (`<index>pk = pk`: `gsi1pk` of `gsi1`,
/// `gsi2pk` of `gsi2`) of `table`, all pages, in sort-key order; `what` names the query in errors.
/// The partitions read this way (pending, uncertain, tracked, outbox, webhook queue) are sparse
/// indexes of small items, read whole by design.
pub(crate) async fn index_partition(
    client: &Client,
    table: &str,
    index: &str,
    pk: AttributeValue,
    what: &str,
) -> Result<Vec<Item>, RepoError> {
    let mut pages = client
        .query()
        .table_name(table)
        .index_name(index)
        .key_condition_expression("#pk = :pk")
        .expression_attribute_names("#pk", format!("{index}pk"))
        .expression_attribute_values(":pk", pk)
        .into_paginator()
        .send();
    let mut items = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| repo_error(&e, what))?;
        items.extend(page.items.unwrap_or_default());
    }
    Ok(items)
}

/// [`index_partition`] of `gsi2`.
pub(crate) async fn gsi2_partition(
    client: &Client,
    table: &str,
    pk: AttributeValue,
    what: &str,
) -> Result<Vec<Item>, RepoError> {
    index_partition(client, table, "gsi2", pk, what).await
}

/// A DynamoDB item (or key).
pub(crate) type Item = HashMap<String, AttributeValue>;

/// A string attribute.
pub(crate) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

/// A number attribute.
pub(crate) fn n(v: impl std::fmt::Display) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// The key `{pk, sk}` of the tables with a composite key (UploadsTable, UsersTable).
pub(crate) fn key(pk: impl Into<String>, sk: impl Into<String>) -> Item {
    HashMap::from([("pk".to_string(), s(pk)), ("sk".to_string(), s(sk))])
}

/// `value` as an item (`what` names it in the error).
pub(crate) fn encode<T: Serialize>(value: &T, what: &str) -> Result<Item, RepoError> {
    to_item(value).map_err(|e| RepoError::Other(format!("encoding {what}: {e}")))
}

/// An item as a `T`; an item that does not fit is [`RepoError::Corrupt`].
pub(crate) fn decode<T: DeserializeOwned>(item: Item, what: &str) -> Result<T, RepoError> {
    from_item(item).map_err(|e| RepoError::Corrupt(format!("{what}: {e}")))
}

/// The string attribute `name`, if the item has one.
pub(crate) fn string_of<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Some(v),
        _ => None,
    }
}

/// The number attribute `name` as a `T`, if the item has one that fits.
pub(crate) fn number_of<T: FromStr>(item: &Item, name: &str) -> Option<T> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse().ok(),
        _ => None,
    }
}

/// RFC 3339, as timestamps are stored in clear attributes.
pub(crate) fn rfc3339(t: OffsetDateTime) -> Result<String, RepoError> {
    t.format(&Rfc3339)
        .map_err(|e| RepoError::Other(format!("formatting {t}: {e}")))
}

/// A `BatchWriteItem` put of `item`.
pub(crate) fn put_request(item: Item) -> Result<WriteRequest, RepoError> {
    let put = PutRequest::builder()
        .set_item(Some(item))
        .build()
        .map_err(|e| RepoError::Other(format!("building a put request: {e}")))?;
    Ok(WriteRequest::builder().put_request(put).build())
}

/// A `BatchWriteItem` delete of the item with `key`.
pub(crate) fn delete_request(key: Item) -> Result<WriteRequest, RepoError> {
    let delete = DeleteRequest::builder()
        .set_key(Some(key))
        .build()
        .map_err(|e| RepoError::Other(format!("building a delete request: {e}")))?;
    Ok(WriteRequest::builder().delete_request(delete).build())
}

/// Map an SDK error into a [`RepoError`], keeping code and message (`what` names the call).
pub(crate) fn repo_error<E>(err: &SdkError<E, HttpResponse>, what: &str) -> RepoError
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

/// An operation error that can be a `ConditionalCheckFailedException` carrying the old item
/// (`ReturnValuesOnConditionCheckFailure=ALL_OLD`).
pub(crate) trait ConditionFailure {
    /// `Some(old item)` when this is a conditional-check failure (the item is `None` when there
    /// was none, or the server did not return it); `None` for any other error.
    fn old_item(&self) -> Option<Option<Item>>;
}

macro_rules! condition_failure {
    ($($error:ident),*) => {$(
        impl ConditionFailure for $error {
            fn old_item(&self) -> Option<Option<Item>> {
                match self {
                    $error::ConditionalCheckFailedException(e) => {
                        Some(e.item().filter(|i| !i.is_empty()).cloned())
                    }
                    _ => None,
                }
            }
        }
    )*};
}

condition_failure!(PutItemError, UpdateItemError, DeleteItemError);

/// The old item returned with a conditional-check failure, if `err` is one (see
/// [`ConditionFailure::old_item`]).
pub(crate) fn condition_failed<E: ConditionFailure>(err: &SdkError<E, HttpResponse>) -> Option<Option<Item>> {
    match err {
        SdkError::ServiceError(ctx) => ctx.err().old_item(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_read_back_leniently() {
        let mut item = key("P", "S");
        item.insert("count".into(), n(42));
        item.insert("bad".into(), s("x"));
        assert_eq!(string_of(&item, "pk"), Some("P"));
        assert_eq!(string_of(&item, "count"), None);
        assert_eq!(number_of::<i64>(&item, "count"), Some(42));
        assert_eq!(number_of::<usize>(&item, "bad"), None);
        assert_eq!(number_of::<u8>(&item, "missing"), None);
    }

    #[test]
    fn undecodable_items_are_corrupt() {
        let item = key("P", "S");
        match decode::<crate::model::FeedHealth>(item, "feed health") {
            Err(RepoError::Corrupt(msg)) => assert!(msg.starts_with("feed health: "), "{msg}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
