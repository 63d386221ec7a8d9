//! The queues over SQS: [`ClusterQueue`] and [`IngestRequeue`] (`SendMessage`), and the clusters
//! queue's receiving side, [`ClusterInbox`] (zip-and-push sends to it, the poller reads it).

use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::SdkError;
use aws_sdk_sqs::operation::send_message::SendMessageError;
use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;

use super::aws_error::classify;
use crate::model::ClusterMessage;
use crate::ports::{ClusterInbox, ClusterQueue, InboxError, InboxMessage, IngestRequeue, QueueError};

/// Longest delay SQS accepts on a message, in seconds.
pub const MAX_DELAY_SECONDS: u32 = 900;

fn queue_error(err: &SdkError<SendMessageError, HttpResponse>, queue_url: &str) -> QueueError {
    let f = classify(err);
    let what = format!("SendMessage {queue_url}: {}", f.detail);
    if f.transient {
        QueueError::Transient(what)
    } else {
        QueueError::Other(what)
    }
}

async fn send(
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
    body: String,
    delay_seconds: Option<u32>,
) -> Result<String, QueueError> {
    let mut req = client.send_message().queue_url(queue_url).message_body(body);
    if let Some(delay) = delay_seconds {
        if delay > MAX_DELAY_SECONDS {
            return Err(QueueError::Other(format!(
                "SendMessage {queue_url}: delay {delay} s is outside 0..={MAX_DELAY_SECONDS}"
            )));
        }
        // Lossless: at most 900.
        let delay = delay as i32;
        req = req.delay_seconds(delay);
    }
    let out = req.send().await.map_err(|err| queue_error(&err, queue_url))?;
    Ok(out.message_id().unwrap_or_default().to_string())
}

/// The clusters queue (zip-and-push → poller).
#[derive(Debug, Clone)]
pub struct SqsClusterQueue {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

impl SqsClusterQueue {
    /// Send to `queue_url` with a client built once at start-up.
    pub fn new(client: aws_sdk_sqs::Client, queue_url: impl Into<String>) -> Self {
        Self {
            client,
            queue_url: queue_url.into(),
        }
    }
}

impl ClusterQueue for SqsClusterQueue {
    async fn send_cluster(&self, msg: &ClusterMessage) -> Result<(), QueueError> {
        let body = serde_json::to_string(msg)
            .map_err(|e| QueueError::Other(format!("encoding the cluster message: {e}")))?;
        let message_id = send(&self.client, &self.queue_url, body, None).await?;
        tracing::debug!(
            upload_id = %msg.upload_id,
            cluster_id = %msg.cluster_id,
            message_id = %message_id,
            "cluster message sent"
        );
        Ok(())
    }
}

/// The ingest queue, for continuation messages.
#[derive(Debug, Clone)]
pub struct SqsIngestRequeue {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

impl SqsIngestRequeue {
    /// Send to `queue_url` with a client built once at start-up.
    pub fn new(client: aws_sdk_sqs::Client, queue_url: impl Into<String>) -> Self {
        Self {
            client,
            queue_url: queue_url.into(),
        }
    }
}

impl IngestRequeue for SqsIngestRequeue {
    async fn requeue(&self, body: &str, delay_seconds: u32) -> Result<(), QueueError> {
        let message_id = send(
            &self.client,
            &self.queue_url,
            body.to_string(),
            Some(delay_seconds),
        )
        .await?;
        tracing::debug!(message_id = %message_id, delay_seconds, "continuation message sent");
        Ok(())
    }
}

/// The clusters queue as the poller reads it ([`ClusterInbox`] over SQS `ReceiveMessage` /
/// `DeleteMessageBatch`).
#[derive(Debug, Clone)]
pub struct SqsInbox {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

impl SqsInbox {
    /// Read `queue_url`.
    pub fn new(client: aws_sdk_sqs::Client, queue_url: impl Into<String>) -> Self {
        Self {
            client,
            queue_url: queue_url.into(),
        }
    }
}

impl ClusterInbox for SqsInbox {
    async fn receive(&self) -> Result<Vec<InboxMessage>, InboxError> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(0)
            .send()
            .await
            .map_err(|e| {
                InboxError(format!(
                    "ReceiveMessage: {}",
                    aws_sdk_sqs::error::DisplayErrorContext(e)
                ))
            })?;
        Ok(out
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                Some(InboxMessage {
                    message_id: m.message_id.unwrap_or_default(),
                    receipt_handle: m.receipt_handle?,
                    body: m.body.unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn delete(&self, receipt_handles: &[String]) -> Result<Vec<String>, InboxError> {
        if receipt_handles.is_empty() {
            return Ok(Vec::new());
        }
        let entries = receipt_handles
            .iter()
            .enumerate()
            .map(|(i, h)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(h)
                    .build()
                    .map_err(|e| InboxError(format!("building a delete entry: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = self
            .client
            .delete_message_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| {
                InboxError(format!(
                    "DeleteMessageBatch: {}",
                    aws_sdk_sqs::error::DisplayErrorContext(e)
                ))
            })?;
        Ok(out
            .failed
            .iter()
            .filter_map(|f| f.id.parse::<usize>().ok())
            .filter_map(|i| receipt_handles.get(i).cloned())
            .collect())
    }
}
