//! FINISH_UNCERTAIN reconciliation. zip-and-push marks an upload FINISH_UNCERTAIN when
//! `finish_upload`'s reply was lost (it must never call it again: every call creates a cluster)
//! and sends no cluster message. The poller finds such uploads (a query of the sparse gsi2
//! partition `UNCERTAIN` that holds them, at most every `RELAY_RECONCILE_SCAN_EVERY_S`), creates a tracking record without a
//! cluster id but with what identifies the cluster ([`Reconcile`]: the time window of the
//! `finish_upload` call, our first capture second, our image count), and the user's feed walk then
//! looks for a node that matches (see `user::status`): found → the cluster id is adopted and tracking
//! continues as for any upload; not found within `RELAY_RECONCILE_WINDOW_H` → FAILED with a reason.

use std::time::Instant;

use shared::domain::tracking::{OverallState, Reconcile, TrackedUpload};
use shared::model::{TrackingRecord, UploadRecord};
use shared::ports::{ImageEntryReader, ReconcileStore, RepoError, TrackingReader, TrackingStore};
use tracing::{info, warn};

use crate::deps::Deps;

/// Slack around the `finish_upload` window (clock skew between Mapillary and us), seconds.
pub const CREATED_SLACK_S: i64 = 120;

/// What the discovery step did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryReport {
    /// The uploads table was scanned in this run.
    pub scanned: bool,
    /// FINISH_UNCERTAIN uploads seen.
    pub found: usize,
    /// Tracking records created for them (the rest were tracked already).
    pub created: usize,
    /// Uploads whose reconciliation was resolved (cluster adopted, or FAILED), taken out of the
    /// FINISH_UNCERTAIN index so that later scans no longer read them.
    pub resolved: usize,
    /// Problems (each also logged).
    pub errors: Vec<String>,
}

/// Take FINISH_UNCERTAIN uploads into tracking (when a scan is due).
pub async fn discover_uncertain<D: Deps>(d: &D, deadline: Instant) -> DiscoveryReport {
    let mut rep = DiscoveryReport::default();
    let now = d.clock().now();
    let every = time::Duration::try_from(d.tunables().reconcile_scan_every).unwrap_or(time::Duration::HOUR);
    match d.tracking().reconcile_scan_mark().await {
        Ok(Some(last)) if now - last < every && now >= last => return rep,
        Ok(_) => {}
        Err(e) => {
            warn!(error = %e, "reading the reconcile scan mark failed");
            rep.errors.push(format!("reconcile scan mark: {e}"));
            return rep;
        }
    }
    let uploads = match d.tracking().finish_uncertain_uploads().await {
        Ok(u) => u,
        Err(e) => {
            warn!(error = %e, "scanning for FINISH_UNCERTAIN uploads failed");
            rep.errors.push(format!("FINISH_UNCERTAIN scan: {e}"));
            return rep;
        }
    };
    rep.scanned = true;
    rep.found = uploads.len();
    let mut complete = true;
    for up in &uploads {
        if Instant::now() >= deadline {
            complete = false;
            break;
        }
        match d.tracking().get_tracking(&up.upload_id).await {
            // Owner checked: a record of another user under this id is not this upload's outcome.
            Ok(Some(t)) if t.user_id == up.user_id && is_resolved(&t) => {
                match d.tracking().resolve_uncertain(up).await {
                    Ok(()) => {
                        info!(upload_id = %up.upload_id, "FINISH_UNCERTAIN upload resolved: taken out of the index");
                        rep.resolved += 1;
                    }
                    Err(e) => {
                        rep.errors.push(format!("upload {}: {e}", up.upload_id));
                        complete = false;
                    }
                }
                continue;
            }
            Ok(Some(_)) => continue,
            Ok(None) => {}
            Err(e) => {
                rep.errors.push(format!("upload {}: {e}", up.upload_id));
                complete = false;
                continue;
            }
        }
        let record = match reconcile_record(d, up).await {
            Ok(r) => r,
            Err(e) => {
                rep.errors.push(format!("upload {}: {e}", up.upload_id));
                complete = false;
                continue;
            }
        };
        match d.tracking().create_tracking(&record).await {
            Ok(true) => {
                info!(upload_id = %up.upload_id, state = record.tracked.state.as_str(),
                    "FINISH_UNCERTAIN upload taken into tracking: looking for its cluster in the feed");
                rep.created += 1;
            }
            Ok(false) => {}
            Err(e) => {
                rep.errors.push(format!("upload {}: {e}", up.upload_id));
                complete = false;
            }
        }
    }
    if complete {
        if let Err(e) = d.tracking().set_reconcile_scan_mark(now).await {
            rep.errors.push(format!("reconcile scan mark: {e}"));
        }
    }
    rep
}

/// Whether a FINISH_UNCERTAIN upload's reconciliation is over: its cluster was adopted (or it was
/// tracked with a cluster id all along), or its tracking ended (FINISHED or FAILED).
pub fn is_resolved(t: &TrackingRecord) -> bool {
    !t.tracked.is_reconciling() || t.tracked.state.is_final()
}

/// The tracking record of a FINISH_UNCERTAIN upload: no cluster id, the [`Reconcile`] facts.
/// Without image entries nothing identifies the cluster: the record is FAILED at once.
pub async fn reconcile_record<D: Deps>(d: &D, up: &UploadRecord) -> Result<TrackingRecord, RepoError> {
    let now = d.clock().now();
    let images = d.uploads().list_images(&up.upload_id).await?;
    let ended = up.finished_at.unwrap_or(now);
    let began = up.started_at.unwrap_or(up.created_at).min(ended);
    let mut tracked = TrackedUpload::new(String::new(), ended);
    let first = images.iter().map(|i| i.captured_at).min();
    match first {
        Some(first) => {
            let window =
                time::Duration::try_from(d.tunables().reconcile_window).unwrap_or(time::Duration::DAY);
            tracked.reconcile = Some(Reconcile {
                created_from_s: began.unix_timestamp() - CREATED_SLACK_S,
                created_until_s: ended.unix_timestamp() + CREATED_SLACK_S,
                first_captured_at_s: first.unix_timestamp(),
                image_count: up
                    .image_count
                    .max(u32::try_from(images.len()).unwrap_or(u32::MAX)),
                give_up_at: ended + window,
                adopted_at: None,
                refinishes: 0,
            });
        }
        None => {
            tracked.state = OverallState::Failed {
                error_code: None,
                stage: None,
                reason: "finish_upload's reply was lost and the upload has no image entries to identify \
                         its cluster by"
                    .into(),
            };
        }
    }
    Ok(TrackingRecord::new(
        up.user_id.clone(),
        up.sequence_id.clone(),
        up.upload_id.clone(),
        tracked,
        Some(u32::try_from(images.len()).unwrap_or(u32::MAX)),
    ))
}
