//! `BatchGetItem` and `BatchWriteItem` for every DynamoDB adapter: keys in chunks of 100, writes in
//! chunks of 25 (DynamoDB's limits), a few chunks in flight, each chunk's `UnprocessedKeys` /
//! `UnprocessedItems` retried with jittered exponential backoff. The adapters map a
//! [`BatchFailure`] into their own error type.

use std::time::Duration;

use aws_sdk_dynamodb::types::{KeysAndAttributes, WriteRequest};
use backon::BackoffBuilder;
use futures::{StreamExt, TryStreamExt};

use super::item::Item;
use crate::adapters::aws_error::{classify, AwsFailure};
use crate::ports::RepoError;

/// Keys per `BatchGetItem` call (DynamoDB's limit).
const BATCH_GET_MAX: usize = 100;
/// Requests per `BatchWriteItem` call (DynamoDB's limit).
const BATCH_WRITE_MAX: usize = 25;
/// Chunks in flight at once.
const CONCURRENCY: usize = 4;
/// Attempts of one chunk while DynamoDB returns `UnprocessedKeys` / `UnprocessedItems`.
const ATTEMPTS: usize = 8;

/// Why a batched read or write failed.
#[derive(Debug)]
pub(crate) enum BatchFailure {
    /// The call failed (classified).
    Call(AwsFailure),
    /// The request could not be built.
    Build(String),
    /// Keys (reads) or items (writes) were still unprocessed after every attempt.
    Unprocessed {
        /// How many.
        count: usize,
        /// `"keys"` or `"items"`.
        what: &'static str,
    },
}

impl BatchFailure {
    /// As a repository error, `what` naming the call.
    pub(crate) fn into_repo(self, what: &str) -> RepoError {
        match self {
            BatchFailure::Call(f) if f.transient => RepoError::Transient(format!("{what}: {}", f.detail)),
            BatchFailure::Call(f) => RepoError::Other(format!("{what}: {}", f.detail)),
            BatchFailure::Build(e) => RepoError::Other(format!("{what}: building the request: {e}")),
            BatchFailure::Unprocessed { count, what: kind } => RepoError::Transient(format!(
                "{what}: {count} {kind} still unprocessed after {ATTEMPTS} attempts"
            )),
        }
    }
}

fn backoff() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(ATTEMPTS - 1)
        .with_jitter()
        .build()
}

/// Write `requests` to `table` in chunks of 25, at most `concurrency` chunks at once (1: one after
/// the other, in order). The caller names each key once per chunk (DynamoDB rejects a repeat).
pub(crate) async fn batch_write(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    requests: Vec<WriteRequest>,
    concurrency: usize,
) -> Result<(), BatchFailure> {
    let mut chunks: Vec<Vec<WriteRequest>> = Vec::new();
    let mut rest = requests.into_iter().peekable();
    while rest.peek().is_some() {
        chunks.push(rest.by_ref().take(BATCH_WRITE_MAX).collect());
    }
    futures::stream::iter(chunks.into_iter().map(|c| write_chunk(client, table, c)))
        .buffer_unordered(concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

async fn write_chunk(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    mut pending: Vec<WriteRequest>,
) -> Result<(), BatchFailure> {
    let mut delays = backoff();
    loop {
        let out = client
            .batch_write_item()
            .request_items(table, pending)
            .send()
            .await
            .map_err(|e| BatchFailure::Call(classify(&e)))?;
        pending = out
            .unprocessed_items
            .and_then(|mut m| m.remove(table))
            .unwrap_or_default();
        if pending.is_empty() {
            return Ok(());
        }
        match delays.next() {
            Some(delay) => {
                tracing::debug!(
                    unprocessed = pending.len(),
                    "BatchWriteItem left items unprocessed"
                );
                tokio::time::sleep(delay).await;
            }
            None => {
                return Err(BatchFailure::Unprocessed {
                    count: pending.len(),
                    what: "items",
                })
            }
        }
    }
}

/// Every item of `table` named by `keys` (consistent reads), in no particular order; keys that do
/// not exist are simply absent. `projection`: only these attributes (each name also serves as its
/// own `#name` placeholder). The caller passes each key once (DynamoDB rejects a repeated key).
pub(crate) async fn batch_get(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    keys: Vec<Item>,
    projection: Option<&[&str]>,
) -> Result<Vec<Item>, BatchFailure> {
    let mut chunks: Vec<Vec<Item>> = Vec::new();
    let mut rest = keys.into_iter().peekable();
    while rest.peek().is_some() {
        chunks.push(rest.by_ref().take(BATCH_GET_MAX).collect());
    }
    let pages: Vec<Vec<Item>> = futures::stream::iter(
        chunks
            .into_iter()
            .map(|c| get_chunk(client, table, c, projection)),
    )
    .buffer_unordered(CONCURRENCY)
    .try_collect()
    .await?;
    Ok(pages.into_iter().flatten().collect())
}

async fn get_chunk(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    mut keys: Vec<Item>,
    projection: Option<&[&str]>,
) -> Result<Vec<Item>, BatchFailure> {
    let mut delays = backoff();
    let mut items = Vec::with_capacity(keys.len());
    loop {
        let mut ka = KeysAndAttributes::builder()
            .set_keys(Some(keys))
            .consistent_read(true);
        if let Some(names) = projection {
            let list: Vec<String> = names.iter().map(|n| format!("#{n}")).collect();
            ka = ka.projection_expression(list.join(", "));
            for n in names {
                ka = ka.expression_attribute_names(format!("#{n}"), *n);
            }
        }
        let ka = ka.build().map_err(|e| BatchFailure::Build(e.to_string()))?;
        let out = client
            .batch_get_item()
            .request_items(table, ka)
            .send()
            .await
            .map_err(|e| BatchFailure::Call(classify(&e)))?;
        if let Some(mut r) = out.responses {
            items.extend(r.remove(table).unwrap_or_default());
        }
        keys = out
            .unprocessed_keys
            .and_then(|mut m| m.remove(table))
            .map(|ka| ka.keys)
            .unwrap_or_default();
        if keys.is_empty() {
            return Ok(items);
        }
        match delays.next() {
            Some(delay) => tokio::time::sleep(delay).await,
            None => {
                return Err(BatchFailure::Unprocessed {
                    count: keys.len(),
                    what: "keys",
                })
            }
        }
    }
}
