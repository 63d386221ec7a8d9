//! The queues in memory: [`MemQueues`] records what zip-and-push sends (clusters,
//! continuations); [`MemInbox`] is the clusters queue with SQS's receive/delete rules, for the
//! poller (and for zip-and-push's sending side, when a test wires both through one queue).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use super::lock;
use crate::model::ClusterMessage;
use crate::ports::{ClusterInbox, ClusterQueue, InboxError, InboxMessage, IngestRequeue, QueueError};

/// Both queues in memory.
#[derive(Debug, Default)]
pub struct MemQueues {
    /// Cluster messages sent.
    pub clusters: Mutex<Vec<ClusterMessage>>,
    /// Continuation bodies sent, with their delay.
    pub requeued: Mutex<Vec<(String, u32)>>,
}

impl MemQueues {
    /// Empty queues.
    pub fn new() -> Self {
        Self::default()
    }

    /// Take the continuation bodies.
    pub fn take_requeued(&self) -> Vec<(String, u32)> {
        std::mem::take(&mut *lock(&self.requeued))
    }

    /// A copy of the cluster messages.
    pub fn cluster_messages(&self) -> Vec<ClusterMessage> {
        lock(&self.clusters).clone()
    }
}

impl ClusterQueue for MemQueues {
    async fn send_cluster(&self, msg: &ClusterMessage) -> Result<(), QueueError> {
        lock(&self.clusters).push(msg.clone());
        Ok(())
    }
}

impl IngestRequeue for MemQueues {
    async fn requeue(&self, body: &str, delay_seconds: u32) -> Result<(), QueueError> {
        lock(&self.requeued).push((body.into(), delay_seconds));
        Ok(())
    }
}

/// What [`ClusterInbox::receive`] returns at most (SQS's `MaxNumberOfMessages` limit).
const RECEIVE_MAX: usize = 10;

/// One message on the queue.
#[derive(Debug, Clone)]
struct Queued {
    message_id: String,
    body: String,
    /// Invisible until then (the queue's own clock, see [`MemInbox::advance`]).
    visible_at: Duration,
    /// The receipt handle of the latest receive, the only one that deletes the message.
    receipt: Option<String>,
    /// Times received.
    receives: u32,
}

#[derive(Debug, Default)]
struct InboxState {
    /// In the order sent.
    messages: VecDeque<Queued>,
    /// Bodies moved to the dead-letter queue.
    dead_letters: Vec<String>,
    /// The queue's clock: how much time has passed since it was made.
    now: Duration,
    /// Messages sent so far (message ids).
    sent: u64,
    /// Receipt handles issued so far.
    receipts: u64,
}

/// The clusters queue in memory, with SQS's rules: a received message is invisible to later
/// receives for the visibility timeout and comes back after it unless deleted with the receipt
/// handle of its latest receive; with a `maxReceiveCount`, a message received that often moves to
/// the dead-letter queue instead of being delivered again. Time is the queue's own clock, moved
/// with [`MemInbox::advance`], so tests never sleep.
#[derive(Debug)]
pub struct MemInbox {
    state: Mutex<InboxState>,
    visibility: Duration,
    max_receives: Option<u32>,
    /// Failures to inject: the next this many `receive` calls fail.
    pub fail_receives: std::sync::atomic::AtomicU32,
    /// Failures to inject: the next this many `delete` calls fail.
    pub fail_deletes: std::sync::atomic::AtomicU32,
}

impl Default for MemInbox {
    fn default() -> Self {
        Self::new(Duration::from_secs(30))
    }
}

fn take_failure(counter: &std::sync::atomic::AtomicU32) -> bool {
    counter
        .fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |n| n.checked_sub(1),
        )
        .is_ok()
}

impl MemInbox {
    /// An empty queue whose received messages stay invisible for `visibility`, without a
    /// dead-letter queue.
    pub fn new(visibility: Duration) -> Self {
        Self {
            state: Mutex::default(),
            visibility,
            max_receives: None,
            fail_receives: Default::default(),
            fail_deletes: Default::default(),
        }
    }

    /// With a dead-letter queue after `max_receives` receives (the redrive policy's
    /// `maxReceiveCount`).
    pub fn with_max_receives(mut self, max_receives: u32) -> Self {
        self.max_receives = Some(max_receives.max(1));
        self
    }

    /// Put a message with `body` on the queue (visible at once); returns its message id.
    pub fn send(&self, body: impl Into<String>) -> String {
        let mut st = lock(&self.state);
        st.sent += 1;
        let message_id = format!("msg-{}", st.sent);
        let visible_at = st.now;
        st.messages.push_back(Queued {
            message_id: message_id.clone(),
            body: body.into(),
            visible_at,
            receipt: None,
            receives: 0,
        });
        message_id
    }

    /// Let `d` pass on the queue's clock (received messages become visible again once their
    /// visibility timeout is over).
    pub fn advance(&self, d: Duration) {
        lock(&self.state).now += d;
    }

    /// Messages on the queue (visible or in flight), not counting dead letters.
    pub fn len(&self) -> usize {
        lock(&self.state).messages.len()
    }

    /// Whether no message is on the queue (dead letters aside).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bodies of the messages on the queue, in the order sent.
    pub fn bodies(&self) -> Vec<String> {
        lock(&self.state)
            .messages
            .iter()
            .map(|m| m.body.clone())
            .collect()
    }

    /// The bodies moved to the dead-letter queue, in the order moved.
    pub fn dead_letters(&self) -> Vec<String> {
        lock(&self.state).dead_letters.clone()
    }
}

impl ClusterQueue for MemInbox {
    async fn send_cluster(&self, msg: &ClusterMessage) -> Result<(), QueueError> {
        // The body the SQS adapter sends.
        let body = serde_json::to_string(msg)
            .map_err(|e| QueueError::Other(format!("encoding the cluster message: {e}")))?;
        self.send(body);
        Ok(())
    }
}

impl ClusterInbox for MemInbox {
    async fn receive(&self) -> Result<Vec<InboxMessage>, InboxError> {
        if take_failure(&self.fail_receives) {
            return Err(InboxError("ReceiveMessage: injected failure".into()));
        }
        let mut st = lock(&self.state);
        let InboxState {
            messages,
            dead_letters,
            now,
            receipts,
            ..
        } = &mut *st;
        let now = *now;
        // Messages received `max_receives` times and visible again go to the dead-letter queue.
        if let Some(max) = self.max_receives {
            messages.retain(|m| {
                let dead = m.visible_at <= now && m.receives >= max;
                if dead {
                    dead_letters.push(m.body.clone());
                }
                !dead
            });
        }
        let mut out = Vec::new();
        for m in messages
            .iter_mut()
            .filter(|m| m.visible_at <= now)
            .take(RECEIVE_MAX)
        {
            *receipts += 1;
            let receipt = format!("rh-{receipts}-{}", m.message_id);
            m.receipt = Some(receipt.clone());
            m.receives += 1;
            m.visible_at = now + self.visibility;
            out.push(InboxMessage {
                message_id: m.message_id.clone(),
                receipt_handle: receipt,
                body: m.body.clone(),
            });
        }
        Ok(out)
    }

    async fn delete(&self, receipt_handles: &[String]) -> Result<Vec<String>, InboxError> {
        if take_failure(&self.fail_deletes) {
            return Err(InboxError("DeleteMessageBatch: injected failure".into()));
        }
        if receipt_handles.len() > RECEIVE_MAX {
            return Err(InboxError(format!(
                "DeleteMessageBatch: {} entries, at most {RECEIVE_MAX}",
                receipt_handles.len()
            )));
        }
        let mut st = lock(&self.state);
        let mut failed = Vec::new();
        for h in receipt_handles {
            match st.messages.iter().position(|m| m.receipt.as_ref() == Some(h)) {
                Some(at) => {
                    st.messages.remove(at);
                }
                // Unknown, or superseded by a later receive of the same message.
                None => failed.push(h.clone()),
            }
        }
        Ok(failed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[tokio::test]
    async fn received_messages_are_invisible_until_deleted_or_timed_out() {
        let q = MemInbox::new(Duration::from_secs(30));
        for i in 0..12 {
            q.send(format!("m{i}"));
        }
        let first = q.receive().await.unwrap();
        assert_eq!(first.len(), 10, "at most 10 per receive");
        assert_eq!(first[0].body, "m0");
        let second = q.receive().await.unwrap();
        assert_eq!(
            second.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
            ["m10", "m11"]
        );
        assert!(q.receive().await.unwrap().is_empty(), "all in flight");

        // Deleted messages are gone; the others come back after the visibility timeout.
        let handles: Vec<String> = first.iter().map(|m| m.receipt_handle.clone()).collect();
        assert!(q.delete(&handles).await.unwrap().is_empty());
        assert_eq!(q.len(), 2);
        q.advance(Duration::from_secs(29));
        assert!(q.receive().await.unwrap().is_empty());
        q.advance(Duration::from_secs(1));
        let again = q.receive().await.unwrap();
        assert_eq!(again.len(), 2);

        // Only the latest receive's handle deletes; unknown handles fail.
        let stale = vec![second[0].receipt_handle.clone(), "nope".to_string()];
        assert_eq!(q.delete(&stale).await.unwrap(), stale);
        assert_eq!(q.len(), 2);
        let fresh: Vec<String> = again.iter().map(|m| m.receipt_handle.clone()).collect();
        assert!(q.delete(&fresh).await.unwrap().is_empty());
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn messages_received_too_often_go_to_the_dead_letter_queue() {
        let q = MemInbox::new(Duration::from_secs(10)).with_max_receives(2);
        q.send("poison");
        for _ in 0..2 {
            assert_eq!(q.receive().await.unwrap().len(), 1);
            q.advance(Duration::from_secs(10));
        }
        assert!(q.receive().await.unwrap().is_empty());
        assert_eq!(q.dead_letters(), ["poison"]);
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn cluster_messages_are_the_adapters_json_and_failures_can_be_injected() {
        let q = MemInbox::default();
        let msg = ClusterMessage {
            upload_id: "u.s.000".into(),
            user_id: "u".into(),
            sequence_id: "s".into(),
            cluster_id: "c1".into(),
        };
        q.send_cluster(&msg).await.unwrap();
        let got = q.receive().await.unwrap();
        let back: ClusterMessage = serde_json::from_str(&got[0].body).unwrap();
        assert_eq!(back, msg);

        q.fail_receives.store(1, Ordering::Relaxed);
        assert!(q.receive().await.is_err());
        q.fail_deletes.store(1, Ordering::Relaxed);
        assert!(q.delete(&[got[0].receipt_handle.clone()]).await.is_err());
        assert_eq!(q.len(), 1, "a failed delete leaves the message");
        assert!(q
            .delete(&[got[0].receipt_handle.clone()])
            .await
            .unwrap()
            .is_empty());
    }
}
