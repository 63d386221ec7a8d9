//! Step 3 of a user's turn: write what changed — links, then records — in one batch per user (the
//! run holds the lease, so no record needs a condition). An upload that is final but not linked is
//! never written: it stays pending and the whole step is retried next run.

use std::time::Instant;

use shared::domain::tracking::{OverallState, Transition};
use shared::events::outbox_events;
use shared::model::{ImageLink, TrackingRecord};
use shared::ports::{EventPublisher, TrackingStore};
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::clock::elapsed_ms;
use crate::deps::Deps;
use crate::report::UserReport;
use crate::user::status::UploadTurn;

/// A record ready to be written.
struct PendingWrite {
    record: TrackingRecord,
    links: Vec<ImageLink>,
    transitions: Vec<Transition>,
}

/// Write the changed `turns` of `user_id` at `now`. `pending`: how many of the user's uploads are
/// pending in all (when every one is written final, the user's pending item goes too).
/// `mapillary_user_id`: from the feed walk, for records that do not know it yet.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn write<D: Deps>(
    d: &D,
    user_id: &str,
    turns: Vec<UploadTurn>,
    mapillary_user_id: Option<String>,
    pending: usize,
    now: OffsetDateTime,
    deadline: Instant,
    out: &mut UserReport,
) {
    let policy = &d.tunables().policy;
    let mut jobs: Vec<PendingWrite> = Vec::new();
    for w in turns {
        let UploadTurn {
            mut record,
            old,
            update,
            links,
            ..
        } = w;
        let needs_link = old.linked_via.is_none() && !matches!(update.state, OverallState::Failed { .. });
        if needs_link && record.linked_via.is_none() && update.state.is_final() {
            // Never let an unlinked upload leave the pending index: retry the whole step next run.
            out.errors.push(format!(
                "upload {}: FINISHED but not linked yet",
                record.upload_id
            ));
            continue;
        }
        if record.mapillary_user_id.is_none() {
            record.mapillary_user_id = mapillary_user_id.clone();
        }
        let stale = matches!(update.state, OverallState::Stale { .. });
        let changed = update.changed || !links.is_empty() || record != old;
        if !changed && !stale {
            continue;
        }
        record.tracked.apply(&update);
        record.tracked.last_checked_at = Some(now);
        if d.events().enabled() {
            // The outbox: the change's events are written with it (see `crate::outbox`).
            let events = outbox_events(&record.upload_id, record.history.len(), &update.transitions);
            record.pending_events.extend(events);
        }
        record.history.extend(update.transitions.iter().cloned());
        record.next_check_at = match &record.tracked.state {
            OverallState::Stale { .. } => Some(now + policy.stale_poll_every),
            s if s.is_final() => None,
            _ => Some(now + policy.poll_every),
        };
        jobs.push(PendingWrite {
            record,
            links,
            transitions: update.transitions,
        });
    }
    if jobs.is_empty() {
        return;
    }
    if Instant::now() >= deadline {
        out.cut_off = true;
        return;
    }
    let t = Instant::now();
    let mut records: Vec<TrackingRecord> = Vec::with_capacity(jobs.len());
    let mut links: Vec<ImageLink> = Vec::new();
    let mut transitions: Vec<Vec<Transition>> = Vec::with_capacity(jobs.len());
    for job in jobs {
        records.push(job.record);
        links.extend(job.links);
        transitions.push(job.transitions);
    }
    // Every pending upload of the user written and final: its pending-uploads item goes too.
    let all_final = records.len() == pending && records.iter().all(|r| r.tracked.state.is_final());
    let written = d
        .tracking()
        .put_tracking_batch(&records, &links, all_final.then_some(user_id))
        .await;
    out.timings.write_ms = elapsed_ms(t);
    match written {
        Ok(()) => {
            for (record, changes) in records.iter().zip(transitions) {
                for t in &changes {
                    info!(upload_id = %record.upload_id, field = %t.field, from = t.from.as_deref().unwrap_or("-"),
                        to = t.to.as_deref().unwrap_or("-"), "transition");
                }
                out.written += 1;
                out.transitions
                    .extend(changes.into_iter().map(|t| (record.upload_id.clone(), t)));
            }
        }
        Err(e) => {
            warn!(error = %e, records = records.len(), "writing the user's tracking records failed; retried next run");
            out.errors
                .push(format!("user {user_id}: writing {} records: {e}", records.len()));
        }
    }
}
