//! `SqsClusterQueue` and `SqsIngestRequeue` against real moto SQS queues (a stack of
//! `infra/template.yaml`).

use std::time::{Duration, Instant};

use anyhow::Result;
use aws_sdk_sqs::types::MessageSystemAttributeName;
use integration_tests::moto::shared_moto;
use integration_tests::stack::{self, LocalStack};
use serde_json::{json, Value};
use shared::adapters::sqs::{SqsClusterQueue, SqsIngestRequeue};
use shared::model::ClusterMessage;
use shared::ports::{ClusterQueue, IngestRequeue, QueueError};

async fn new_stack(tag: &str) -> Result<LocalStack> {
    let endpoint = shared_moto()?;
    LocalStack::create(&endpoint, &stack::unique_stack_name(tag)).await
}

/// Bodies received from `queue_url` within `within` (short polls), deleting them; the S3 test event
/// moto puts on the ingest queue is skipped.
async fn receive(stack: &LocalStack, queue_url: &str, within: Duration) -> Result<Vec<(String, Instant)>> {
    let sqs = stack.sqs();
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        let got = sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .wait_time_seconds(1)
            .send()
            .await?;
        for m in got.messages() {
            let body = m.body().unwrap_or_default().to_string();
            if !body.contains("s3:TestEvent") {
                out.push((body, Instant::now()));
            }
            sqs.delete_message()
                .queue_url(queue_url)
                .receipt_handle(m.receipt_handle().unwrap_or_default())
                .send()
                .await?;
        }
    }
    Ok(out)
}

#[tokio::test]
async fn cluster_messages_are_the_documented_json() -> Result<()> {
    let stack = new_stack("sqs-clusters").await?;
    let queue = SqsClusterQueue::new(stack.sqs(), &stack.clusters_queue_url);
    let msgs = [
        ClusterMessage {
            upload_id: "u1.s1.000".into(),
            user_id: "u1".into(),
            sequence_id: "s1".into(),
            cluster_id: "9876543210".into(),
        },
        ClusterMessage {
            upload_id: "u1.s1.001".into(),
            user_id: "u1".into(),
            sequence_id: "s1".into(),
            cluster_id: "9876543211".into(),
        },
    ];
    for m in &msgs {
        queue.send_cluster(m).await?;
    }
    let mut bodies: Vec<Value> = receive(&stack, &stack.clusters_queue_url, Duration::from_secs(2))
        .await?
        .into_iter()
        .map(|(b, _)| serde_json::from_str(&b))
        .collect::<Result<_, _>>()?;
    bodies.sort_by_key(|b| b["upload_id"].as_str().unwrap_or_default().to_string());
    assert_eq!(
        bodies,
        [
            json!({"upload_id": "u1.s1.000", "user_id": "u1", "sequence_id": "s1", "cluster_id": "9876543210"}),
            json!({"upload_id": "u1.s1.001", "user_id": "u1", "sequence_id": "s1", "cluster_id": "9876543211"}),
        ]
    );
    let parsed: ClusterMessage = serde_json::from_value(bodies[0].clone())?;
    assert_eq!(parsed, msgs[0]);
    Ok(())
}

#[tokio::test]
async fn continuations_go_back_verbatim_with_their_delay() -> Result<()> {
    let stack = new_stack("sqs-requeue").await?;
    let queue = SqsIngestRequeue::new(stack.sqs(), &stack.ingest_queue_url);
    let body = r#"{"Records":[{"eventSource":"aws:s3","s3":{"bucket":{"name":"b"},"object":{"key":"sequences/u+1/s%2B1/manifest.json","eTag":"e"}}}]}"#;
    queue.requeue(body, 0).await?;
    let got = receive(&stack, &stack.ingest_queue_url, Duration::from_secs(2)).await?;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, body);

    // A delayed continuation is not visible before its delay.
    let sent = Instant::now();
    queue.requeue("delayed", 3).await?;
    let got = receive(&stack, &stack.ingest_queue_url, Duration::from_secs(6)).await?;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "delayed");
    assert!(got[0].1.duration_since(sent) >= Duration::from_secs(2), "{got:?}");

    // Out-of-range delays are refused before anything is sent.
    match queue.requeue("too late", 901).await {
        Err(e @ QueueError::Other(_)) => assert!(!e.is_transient() && e.to_string().contains("901")),
        other => panic!("expected Other, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn send_failures_are_classified() -> Result<()> {
    let stack = new_stack("sqs-errors").await?;
    let missing = format!("{}-nope", stack.clusters_queue_url);
    let queue = SqsClusterQueue::new(stack.sqs(), missing);
    let msg = ClusterMessage {
        upload_id: "a".into(),
        user_id: "b".into(),
        sequence_id: "c".into(),
        cluster_id: "d".into(),
    };
    let err = queue.send_cluster(&msg).await.expect_err("queue does not exist");
    assert!(matches!(err, QueueError::Other(_)), "{err:?}");

    let config = stack::sdk_config("http://127.0.0.1:1").await;
    let dead = SqsIngestRequeue::new(aws_sdk_sqs::Client::new(&config), "http://127.0.0.1:1/123/q");
    let err = dead.requeue("x", 0).await.expect_err("no server");
    assert!(err.is_transient(), "{err:?}");
    Ok(())
}
