//! Publishing the outbox of status-change events (issue 14, item 2).
//!
//! Two kinds of outbox entries, both written with the change that made them:
//! * the tracking record's ([`shared::model::TrackingRecord::pending_events`]): the poller's write
//!   step adds an event per recorded Mapillary transition to the record it writes;
//! * upload-state events ([`shared::model::UploadEvent`]): zip-and-push (and the sweep) store one
//!   item per change of the upload's own state in the same transaction as the upload record.
//!
//! [`publish_outbox`] runs at the start of each run (what a run, or a zip-and-push invocation,
//! left behind) and at its end (this run's changes): it reads everything whose outbox is not empty
//! (a sparse index), and per upload publishes its upload-state events first, then its tracking
//! record's, each in position order, then clears them (the upload's event items are deleted; the
//! tracking record's outbox is cleared with a write conditional on the record not having changed
//! since). Delivery is at-least-once: a run that dies after publishing and before clearing
//! publishes the same events again next time, with the same ids. An upload whose own events cannot
//! be published has none of its Mapillary events published in that step either, so a subscriber
//! always sees an upload handed off before its Mapillary stages; and because the index is
//! eventually consistent, a tracking record publishing its first events reads the upload's own
//! events consistently first.
//!
//! The same step queues the events for the user's webhook, if they registered an enabled one
//! (`crate::webhooks` delivers the queue) in publishing order: the outbox is cleared only once the
//! bus took the events and the queue holds them, so a run dying anywhere in between loses none.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use shared::events::{event_id, relay_event, relay_upload_event, RelayEvent};
use shared::model::{TrackingRecord, UploadEvent};
use shared::ports::{EventPublisher, OutboxStore, RepoError, WebhookQueue, WebhookRegistry};
use shared::webhook::deliveries;
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::deps::Deps;

/// What one publish step did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxReport {
    /// Records with events found.
    pub records: usize,
    /// Events published.
    pub published: usize,
    /// Problems (each also logged); the events concerned stay in their outboxes.
    pub errors: Vec<String>,
}

/// Per upload: its unpublished upload-state events and its tracking record with events.
type Pending = BTreeMap<String, (Vec<UploadEvent>, Option<TrackingRecord>)>;

/// Publish every outbox (see the module docs). Stops starting uploads after `deadline`.
pub async fn publish_outbox<D: Deps>(d: &D, deadline: Instant) -> OutboxReport {
    let mut rep = OutboxReport::default();
    if !d.events().enabled() {
        return rep;
    }
    let outbox = match d.tracking().list_outbox().await {
        Ok(o) => o,
        Err(e) => {
            warn!(error = %e, "reading the event outbox failed; retried next run");
            rep.errors.push(format!("outbox: {e}"));
            return rep;
        }
    };
    // Per upload, in a stable order.
    let mut pending: Pending = BTreeMap::new();
    for ev in outbox.uploads {
        pending.entry(ev.upload.upload_id.clone()).or_default().0.push(ev);
    }
    for record in outbox.tracking {
        let id = record.upload_id.clone();
        pending.entry(id).or_default().1 = Some(record);
    }
    rep.records = pending.len();
    let mut q = Queueing::new(d.clock().now());
    for (upload_id, (mut own, record)) in pending {
        if Instant::now() >= deadline {
            break;
        }
        if record.as_ref().is_some_and(first_events) {
            // The index may not show the upload's own events yet: read them consistently.
            match d.tracking().upload_outbox(&upload_id).await {
                Ok(found) => own.extend(found),
                Err(e) => {
                    warn!(upload_id = %upload_id, error = %e, "reading the upload's own events failed; retried next run");
                    rep.errors.push(format!("upload {upload_id}: its events: {e}"));
                    continue;
                }
            }
        }
        if !own.is_empty() && !publish_upload_events(d, &upload_id, own, &mut q, &mut rep).await {
            continue; // its Mapillary events wait too: order per upload
        }
        if let Some(record) = record {
            publish_record(d, record, &mut q, &mut rep).await;
        }
    }
    rep
}

/// Whether `record`'s outbox holds its first change (position 0): the upload was just handed off.
fn first_events(record: &TrackingRecord) -> bool {
    let first = event_id(&record.upload_id, 0);
    record.pending_events.iter().any(|e| e.id == first)
}

/// Publish (bus, webhook queue) and delete the upload-state events `own` of `upload_id`. `false`
/// when they could not be published and queued (they stay).
async fn publish_upload_events<D: Deps>(
    d: &D,
    upload_id: &str,
    mut own: Vec<UploadEvent>,
    q: &mut Queueing,
    rep: &mut OutboxReport,
) -> bool {
    own.sort_by_key(|e| e.position);
    own.dedup_by_key(|e| e.position);
    let user_id = own[0].upload.user_id.clone();
    let wire: Vec<RelayEvent> = own.iter().map(relay_upload_event).collect();
    if !publish_and_queue(d, upload_id, &user_id, &wire, q, rep).await {
        return false;
    }
    if let Err(e) = d.tracking().ack_upload_events(&own).await {
        warn!(upload_id = %upload_id, error = %e, "deleting published upload-state events failed; published again next run");
        rep.errors
            .push(format!("upload {upload_id}: clearing its events: {e}"));
    }
    true
}

/// Publish (bus, webhook queue) the tracking record's outbox, then clear it.
async fn publish_record<D: Deps>(
    d: &D,
    mut record: TrackingRecord,
    q: &mut Queueing,
    rep: &mut OutboxReport,
) {
    let mut events = std::mem::take(&mut record.pending_events);
    events.sort_by(|a, b| a.id.cmp(&b.id));
    let wire: Vec<RelayEvent> = events.iter().map(|ev| relay_event(&record, ev)).collect();
    if !publish_and_queue(d, &record.upload_id, &record.user_id, &wire, q, rep).await {
        return;
    }
    match d.tracking().ack_outbox(&record).await {
        Ok(()) => {}
        Err(RepoError::ConditionFailed(why)) => {
            info!(upload_id = %record.upload_id, why = %why, "record changed meanwhile: its outbox is kept (same ids next time)");
        }
        Err(e) => {
            warn!(upload_id = %record.upload_id, error = %e, "clearing the outbox failed; published again next run");
            rep.errors
                .push(format!("upload {}: clearing the outbox: {e}", record.upload_id));
        }
    }
}

/// Publish `wire` (events of `upload_id`, owned by `user_id`) on the bus, then queue them for the
/// user's webhook. `false` (logged, in `rep.errors`) when either failed.
async fn publish_and_queue<D: Deps>(
    d: &D,
    upload_id: &str,
    user_id: &str,
    wire: &[RelayEvent],
    q: &mut Queueing,
    rep: &mut OutboxReport,
) -> bool {
    if let Err(e) = d.events().publish(wire).await {
        warn!(upload_id = %upload_id, events = wire.len(), error = %e,
            "publishing status-change events failed; kept in the outbox");
        rep.errors.push(format!("upload {upload_id}: {e}"));
        return false;
    }
    rep.published += wire.len();
    info!(upload_id = %upload_id, events = wire.len(), "status-change events published");
    if let Err(e) = queue_for_webhook(d, user_id, wire, q).await {
        warn!(upload_id = %upload_id, error = %e,
            "queueing webhook deliveries failed; the outbox is kept (published again next run)");
        rep.errors.push(format!("upload {upload_id}: webhook queue: {e}"));
        return false;
    }
    true
}

/// The webhook queue of one publish step: who has an enabled webhook (read once per user), and
/// the time the next delivery is queued at — one microsecond apart, so the queue keeps publishing
/// order.
struct Queueing {
    hooks: HashMap<String, bool>,
    next_at: OffsetDateTime,
}

impl Queueing {
    fn new(now: OffsetDateTime) -> Self {
        Self {
            hooks: HashMap::new(),
            next_at: now,
        }
    }
}

/// Queue `wire` (events of `user_id`) for the user's webhook when they have an enabled one.
async fn queue_for_webhook<D: Deps>(
    d: &D,
    user_id: &str,
    wire: &[RelayEvent],
    q: &mut Queueing,
) -> Result<(), String> {
    let enabled = match q.hooks.get(user_id) {
        Some(e) => *e,
        None => {
            let e = d
                .tokens()
                .get_webhook(user_id)
                .await
                .map_err(|e| e.to_string())?
                .is_some_and(|w| w.enabled);
            q.hooks.insert(user_id.to_string(), e);
            e
        }
    };
    if !enabled {
        return Ok(());
    }
    let first = q.next_at.max(d.clock().now());
    d.tracking()
        .enqueue_webhooks(&deliveries(user_id, wire, first))
        .await
        .map_err(|e| e.to_string())?;
    q.next_at = first + time::Duration::microseconds(wire.len() as i64);
    Ok(())
}
