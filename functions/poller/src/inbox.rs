//! The clusters queue as the poller reads it: receive a batch, delete what was durably handled.
//! A port of its own (the shared ports only cover sending), with the SQS implementation.

use std::future::Future;

use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;

/// One received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMessage {
    /// SQS message id (for logs).
    pub message_id: String,
    /// Receipt handle (to delete it).
    pub receipt_handle: String,
    /// The body.
    pub body: String,
}

/// Failure of the queue.
#[derive(Debug, thiserror::Error)]
#[error("clusters queue: {0}")]
pub struct InboxError(pub String);

/// Receiving from and deleting on the clusters queue.
pub trait ClusterInbox: Send + Sync {
    /// Up to 10 messages, without waiting (empty = the queue looks empty).
    fn receive(&self) -> impl Future<Output = Result<Vec<InboxMessage>, InboxError>> + Send;
    /// Delete these messages (one batch of ≤ 10); returns the receipt handles that failed.
    fn delete(
        &self,
        receipt_handles: &[String],
    ) -> impl Future<Output = Result<Vec<String>, InboxError>> + Send;
}

/// [`ClusterInbox`] over SQS.
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
