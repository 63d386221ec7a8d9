//! Emulated Lambda triggers for functions running under `cargo lambda watch` (moto cannot invoke
//! Lambda, and never fires schedules — see docs/local-stack.md).
//!
//! * [`SqsEventSource`] — the SQS event-source mapping with `ReportBatchItemFailures`: receive a batch
//!   from the queue, wrap it in a Lambda SQS event (the shape of `events/sqs/*.json`), invoke the
//!   function through watch's Invoke API, delete the messages the function did not list in
//!   `batchItemFailures`, and make the listed ones (or the whole batch, when the invocation itself
//!   failed) visible again after a short retry delay.
//! * [`scheduled_event`] — the EventBridge scheduled event (the shape of
//!   `events/eventbridge/scheduled.json`) a schedule rule sends.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use serde_json::{json, Value};

use crate::stack::{ACCOUNT_ID, REGION};
use crate::watch::LambdaWatch;

/// The ARN of the queue at `queue_url` (its name is the URL's last segment; moto's account and region).
pub fn queue_arn(queue_url: &str) -> String {
    let name = queue_url
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    format!("arn:aws:sqs:{REGION}:{ACCOUNT_ID}:{name}")
}

/// A Lambda SQS event with one record per message: body, ids and system attributes as SQS returned
/// them, `eventSourceARN` = `source_arn`.
pub fn sqs_event(msgs: &[Message], source_arn: &str) -> Value {
    let records: Vec<Value> = msgs
        .iter()
        .map(|m| {
            let attrs: BTreeMap<String, String> = m
                .attributes()
                .map(|a| {
                    a.iter()
                        .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "messageId": m.message_id(),
                "receiptHandle": m.receipt_handle(),
                "body": m.body(),
                "md5OfBody": m.md5_of_body(),
                "attributes": attrs,
                "messageAttributes": {},
                "eventSource": "aws:sqs",
                "eventSourceARN": source_arn,
                "awsRegion": REGION,
            })
        })
        .collect();
    json!({ "Records": records })
}

/// An EventBridge "Scheduled Event" from rule `rule_name`, fired now.
pub fn scheduled_event(rule_name: &str) -> Value {
    let now = time::OffsetDateTime::now_utc();
    let time = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    json!({
        "version": "0",
        "id": uuid::Uuid::new_v4().to_string(),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": ACCOUNT_ID,
        "time": time,
        "region": REGION,
        "resources": [format!("arn:aws:events:{REGION}:{ACCOUNT_ID}:rule/{rule_name}")],
        "detail": {}
    })
}

/// What one poll of an [`SqsEventSource`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchOutcome {
    /// Messages received and handed to the function.
    pub received: usize,
    /// Messages deleted (acknowledged by the function).
    pub deleted: usize,
    /// Message ids left on the queue for a retry (listed in `batchItemFailures`, or the whole batch
    /// when the invocation failed).
    pub retried: Vec<String>,
    /// The function's answer (`null` when the invocation failed).
    pub response: Value,
    /// Why the invocation failed, if it did (the function error or watch's HTTP error).
    pub invoke_error: Option<String>,
}

/// The SQS event-source mapping of one queue → one function under watch.
#[derive(Debug, Clone)]
pub struct SqsEventSource {
    sqs: aws_sdk_sqs::Client,
    http: reqwest::Client,
    queue_url: String,
    source_arn: String,
    function: String,
    /// Messages per batch (1–10; the template's `BatchSize` is 10 or less).
    pub batch_size: i32,
    /// Long-poll wait per receive, seconds (trap 7: waits are real).
    pub wait_seconds: i32,
    /// Visibility timeout given to failed messages, seconds (a short retry delay; Lambda would
    /// wait for the queue's visibility timeout).
    pub retry_after_seconds: i32,
}

impl SqsEventSource {
    /// A mapping from `queue_url` to `function` (batch 10, 1 s long poll, 2 s retry delay).
    pub fn new(sqs: aws_sdk_sqs::Client, queue_url: &str, function: &str) -> Self {
        Self {
            sqs,
            http: reqwest::Client::new(),
            queue_url: queue_url.to_string(),
            source_arn: queue_arn(queue_url),
            function: function.to_string(),
            batch_size: 10,
            wait_seconds: 1,
            retry_after_seconds: 2,
        }
    }

    /// Receives one batch (with every system attribute, as Lambda's poller does).
    pub async fn receive(&self) -> Result<Vec<Message>> {
        Ok(self
            .sqs
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(self.batch_size.clamp(1, 10))
            .wait_time_seconds(self.wait_seconds.clamp(0, 20))
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .with_context(|| format!("ReceiveMessage {}", self.queue_url))?
            .messages()
            .to_vec())
    }

    /// One poll: receive a batch; if there is one, invoke the function with it and settle the
    /// messages. `Ok(None)` when the queue had nothing. An invocation error is not an `Err` (Lambda
    /// retries the batch): it is reported in [`BatchOutcome::invoke_error`].
    pub async fn poll_once(&self, watch: &LambdaWatch) -> Result<Option<BatchOutcome>> {
        let msgs = self.receive().await?;
        if msgs.is_empty() {
            return Ok(None);
        }
        self.deliver(watch, &msgs).await.map(Some)
    }

    /// Invokes the function with `msgs` and settles them: deletes the acknowledged ones, makes the
    /// failed ones visible again after [`SqsEventSource::retry_after_seconds`].
    pub async fn deliver(&self, watch: &LambdaWatch, msgs: &[Message]) -> Result<BatchOutcome> {
        let event = self.event(msgs);
        let answer = watch
            .invoke(&self.http, &self.function, &event)
            .await
            .map_err(|e| format!("{e:#}"));
        self.settle(msgs, answer).await
    }

    /// The Lambda SQS event for `msgs` from this mapping's queue (what [`SqsEventSource::deliver`]
    /// invokes the function with), for callers that invoke the function themselves.
    pub fn event(&self, msgs: &[Message]) -> Value {
        sqs_event(msgs, &self.source_arn)
    }

    /// Settles `msgs` after an invocation answered `answer` (the function's response, or why the
    /// invocation failed): deletes the acknowledged messages, makes the failed ones (every one, when
    /// the invocation failed) visible again after [`SqsEventSource::retry_after_seconds`].
    pub async fn settle(
        &self,
        msgs: &[Message],
        answer: std::result::Result<Value, String>,
    ) -> Result<BatchOutcome> {
        let (response, invoke_error) = match answer {
            Ok(v) => (v, None),
            Err(e) => (Value::Null, Some(e)),
        };
        let failed: Vec<String> = match &invoke_error {
            Some(_) => msgs
                .iter()
                .filter_map(|m| m.message_id().map(str::to_string))
                .collect(),
            None => response["batchItemFailures"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|f| f["itemIdentifier"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        };
        let mut outcome = BatchOutcome {
            received: msgs.len(),
            response,
            invoke_error,
            ..BatchOutcome::default()
        };
        for m in msgs {
            let handle = m.receipt_handle().unwrap_or_default();
            let id = m.message_id().unwrap_or_default();
            if failed.iter().any(|f| f == id) {
                self.sqs
                    .change_message_visibility()
                    .queue_url(&self.queue_url)
                    .receipt_handle(handle)
                    .visibility_timeout(self.retry_after_seconds.max(0))
                    .send()
                    .await
                    .context("ChangeMessageVisibility")?;
                outcome.retried.push(id.to_string());
            } else {
                self.sqs
                    .delete_message()
                    .queue_url(&self.queue_url)
                    .receipt_handle(handle)
                    .send()
                    .await
                    .context("DeleteMessage")?;
                outcome.deleted += 1;
            }
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_arn_uses_the_url_name() {
        assert_eq!(
            queue_arn("https://sqs.us-east-1.amazonaws.com/123456789012/relay-local-IngestQueue-X1"),
            "arn:aws:sqs:us-east-1:123456789012:relay-local-IngestQueue-X1"
        );
    }

    #[test]
    fn events_have_the_sample_shapes() {
        let msg = Message::builder()
            .message_id("m-1")
            .receipt_handle("rh")
            .body("{}")
            .md5_of_body("99914b932bd37a50b983c5e7c90ae93b")
            .attributes(MessageSystemAttributeName::ApproximateReceiveCount, "1")
            .build();
        let ev = sqs_event(&[msg], "arn:aws:sqs:us-east-1:123456789012:q");
        let sample: Value =
            serde_json::from_str(include_str!("../../events/sqs/s3-manifest-created-moto.json"))
                .expect("sample parses");
        let keys = |v: &Value| -> Vec<String> {
            let mut k: Vec<String> = v
                .as_object()
                .into_iter()
                .flat_map(|o| o.keys().cloned())
                .collect();
            k.sort();
            k
        };
        assert_eq!(keys(&ev["Records"][0]), keys(&sample["Records"][0]));
        assert_eq!(ev["Records"][0]["attributes"]["ApproximateReceiveCount"], "1");

        let sched = scheduled_event("relay-local-PollerSchedule");
        let sample: Value = serde_json::from_str(include_str!("../../events/eventbridge/scheduled.json"))
            .expect("sample parses");
        assert_eq!(keys(&sched), keys(&sample));
        assert_eq!(sched["detail-type"], "Scheduled Event");
        assert!(time::OffsetDateTime::parse(
            sched["time"].as_str().unwrap_or_default(),
            &time::format_description::well_known::Rfc3339
        )
        .is_ok());
    }
}
