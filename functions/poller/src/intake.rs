//! Intake: clusters-queue messages → tracking records. A message is deleted only after its record
//! was written (or found already written: `create_tracking` is idempotent); a message that cannot
//! be read or written stays, is retried by later runs and ends in the DLQ after maxReceiveCount.

use std::time::Instant;

use shared::domain::tracking::TrackedUpload;
use shared::model::{ClusterMessage, TrackingRecord};
use shared::ports::{ClusterInbox, TrackingStore, UploadReader};
use tracing::{info, warn};

use crate::deps::Deps;

/// What the intake did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntakeReport {
    /// Messages received.
    pub received: usize,
    /// Tracking records created.
    pub created: usize,
    /// Messages for uploads already tracked (re-deliveries).
    pub duplicates: usize,
    /// Messages deleted.
    pub deleted: usize,
    /// Messages left on the queue (unreadable, write failed, delete failed).
    pub left: usize,
}

/// Drain the queue (up to `intake_max_messages`, until it looks empty or the deadline passes).
pub async fn intake<D: Deps>(d: &D, deadline: Instant) -> IntakeReport {
    let mut rep = IntakeReport::default();
    while rep.received < d.tunables().intake_max_messages && Instant::now() < deadline {
        let batch = match d.inbox().receive().await {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "receiving cluster messages failed");
                break;
            }
        };
        if batch.is_empty() {
            break;
        }
        rep.received += batch.len();
        let mut done = Vec::new();
        for m in &batch {
            let msg: ClusterMessage = match serde_json::from_str(&m.body) {
                Ok(msg) => msg,
                Err(e) => {
                    warn!(message_id = %m.message_id, error = %e, "unreadable cluster message left on the queue");
                    rep.left += 1;
                    continue;
                }
            };
            match create(d, &msg).await {
                Ok(true) => {
                    rep.created += 1;
                    done.push(m.receipt_handle.clone());
                }
                Ok(false) => {
                    rep.duplicates += 1;
                    done.push(m.receipt_handle.clone());
                }
                Err(e) => {
                    warn!(upload_id = %msg.upload_id, error = %e, "tracking record not written: message stays");
                    rep.left += 1;
                }
            }
        }
        match d.inbox().delete(&done).await {
            Ok(failed) => {
                rep.deleted += done.len() - failed.len();
                rep.left += failed.len();
            }
            Err(e) => {
                warn!(error = %e, "deleting cluster messages failed (they come back; intake is idempotent)");
                rep.left += done.len();
            }
        }
    }
    if rep.received > 0 {
        info!(?rep, "intake done");
    }
    rep
}

/// The tracking record of `msg`'s upload (idempotent: `false` when it exists already).
pub(crate) async fn create<D: Deps>(d: &D, msg: &ClusterMessage) -> Result<bool, shared::ports::RepoError> {
    // When did `finish_upload` return? zip-and-push's upload record knows; else "now".
    let uploads = d.uploads().list_uploads(&msg.user_id, &msg.sequence_id).await?;
    let upload = uploads.iter().find(|u| u.upload_id == msg.upload_id);
    let finished_at = upload
        .and_then(|u| u.finished_at.or(u.started_at))
        .unwrap_or_else(|| d.clock().now());
    let record = TrackingRecord::new(
        msg.user_id.clone(),
        msg.sequence_id.clone(),
        msg.upload_id.clone(),
        TrackedUpload::new(msg.cluster_id.clone(), finished_at),
        upload.map(|u| u.image_count),
    );
    d.tracking().create_tracking(&record).await
}
