//! Publishing the outbox of status-change events (issue 14, item 2).
//!
//! The write step adds an event per recorded transition to the tracking record it writes
//! ([`shared::model::TrackingRecord::pending_events`]): the change and its events are one write.
//! [`publish_outbox`] runs at the start of each run (what a run that died between its writes and
//! its publish left behind) and at its end (this run's changes): it reads the records whose outbox
//! is not empty (a sparse index), publishes their events in history order, then clears each
//! record's outbox with a write conditional on the record not having changed since. Delivery is
//! at-least-once: a run that dies after publishing and before clearing publishes the same events
//! again next time, with the same ids.
//!
//! The same step queues the events for the user's webhook, if they registered an enabled one
//! (`crate::webhooks` delivers the queue): the outbox is cleared only once the bus took the events
//! and the queue holds them, so a run dying anywhere in between loses none.

use std::time::Instant;

use std::collections::HashMap;

use shared::events::{relay_event, RelayEvent};
use shared::ports::{EventPublisher, OutboxStore, RepoError, WebhookQueue, WebhookRegistry};
use shared::webhook::deliveries;
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

/// Publish every outbox (see the module docs). Stops starting records after `deadline`.
pub async fn publish_outbox<D: Deps>(d: &D, deadline: Instant) -> OutboxReport {
    let mut rep = OutboxReport::default();
    if !d.events().enabled() {
        return rep;
    }
    let mut records = match d.tracking().list_outbox().await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "reading the event outbox failed; retried next run");
            rep.errors.push(format!("outbox: {e}"));
            return rep;
        }
    };
    // Per upload, in history order; uploads in a stable order.
    records.sort_by(|a, b| a.upload_id.cmp(&b.upload_id));
    rep.records = records.len();
    // Per user: whether they have an enabled webhook (read once per step).
    let mut hooks: HashMap<String, bool> = HashMap::new();
    for mut record in records {
        if Instant::now() >= deadline {
            break;
        }
        let mut events = std::mem::take(&mut record.pending_events);
        events.sort_by(|a, b| a.id.cmp(&b.id));
        let wire: Vec<RelayEvent> = events.iter().map(|ev| relay_event(&record, ev)).collect();
        if let Err(e) = d.events().publish(&wire).await {
            warn!(upload_id = %record.upload_id, events = wire.len(), error = %e,
                "publishing status-change events failed; kept in the outbox");
            rep.errors.push(format!("upload {}: {e}", record.upload_id));
            continue;
        }
        rep.published += wire.len();
        info!(upload_id = %record.upload_id, events = wire.len(), "status-change events published");
        if let Err(e) = queue_for_webhook(d, &record.user_id, &wire, &mut hooks).await {
            warn!(upload_id = %record.upload_id, error = %e,
                "queueing webhook deliveries failed; the outbox is kept (published again next run)");
            rep.errors
                .push(format!("upload {}: webhook queue: {e}", record.upload_id));
            continue;
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
    rep
}

/// Queue `wire` (events of `user_id`) for the user's webhook when they have an enabled one.
async fn queue_for_webhook<D: Deps>(
    d: &D,
    user_id: &str,
    wire: &[RelayEvent],
    hooks: &mut HashMap<String, bool>,
) -> Result<(), String> {
    let enabled = match hooks.get(user_id) {
        Some(e) => *e,
        None => {
            let e = d
                .tokens()
                .get_webhook(user_id)
                .await
                .map_err(|e| e.to_string())?
                .is_some_and(|w| w.enabled);
            hooks.insert(user_id.to_string(), e);
            e
        }
    };
    if !enabled {
        return Ok(());
    }
    d.tracking()
        .enqueue_webhooks(&deliveries(user_id, wire, d.clock().now()))
        .await
        .map_err(|e| e.to_string())
}
