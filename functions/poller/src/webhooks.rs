//! Delivering users' webhooks (issue 14, item 2): the queue the outbox step fills
//! (`crate::outbox`), POSTed signed and in order, at the start and end of each run.
//!
//! Per user, deliveries go in queue order; the first failure stops that user's deliveries for this
//! run and backs the webhook off ([`shared::webhook::backoff`], across runs: the queue keeps
//! everything while the receiver is down), and `RELAY_WEBHOOK_MAX_FAILURES` consecutive failures
//! disable it with the reason (`GET /v1/webhook` shows it). A delivery is removed once its POST got
//! a 2xx; a run dying in between POSTs it again next time (same event id: at-least-once). A
//! deleted registration's queue is dropped. Users are served in parallel
//! (`RELAY_USER_CONCURRENCY`), so a slow receiver delays only its own user.

use std::collections::BTreeMap;
use std::time::Instant;

use futures::StreamExt;
use shared::ports::{WebhookQueue, WebhookRegistry};
use shared::webhook::WebhookDelivery;
use tracing::{info, warn};

use crate::deps::Deps;

/// What one delivery step did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookReport {
    /// Deliveries POSTed with a 2xx answer.
    pub delivered: usize,
    /// Failed POSTs (one at most per user and step).
    pub failed: usize,
    /// Webhooks disabled in this step.
    pub disabled: usize,
    /// Store problems (each also logged); the deliveries concerned stay queued.
    pub errors: Vec<String>,
}

impl WebhookReport {
    fn add(&mut self, other: WebhookReport) {
        self.delivered += other.delivered;
        self.failed += other.failed;
        self.disabled += other.disabled;
        self.errors.extend(other.errors);
    }
}

/// Deliver every due user's queued webhooks (see the module docs). Starts no POST after
/// `deadline`.
pub async fn deliver_webhooks<D: Deps>(d: &D, deadline: Instant) -> WebhookReport {
    let mut rep = WebhookReport::default();
    let queue = match d.tracking().list_webhook_queue().await {
        Ok(q) => q,
        Err(e) => {
            warn!(error = %e, "reading the webhook queue failed; retried next run");
            rep.errors.push(format!("webhook queue: {e}"));
            return rep;
        }
    };
    let mut by_user: BTreeMap<String, Vec<WebhookDelivery>> = BTreeMap::new();
    for item in queue {
        by_user.entry(item.user_id.clone()).or_default().push(item);
    }
    let concurrency = d.tunables().user_concurrency.max(1);
    let reports: Vec<WebhookReport> = futures::stream::iter(by_user)
        .map(|(user, items)| async move { deliver_user(d, &user, items, deadline).await })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    for r in reports {
        rep.add(r);
    }
    rep
}

/// One user's queue, in order, until the first failure.
async fn deliver_user<D: Deps>(
    d: &D,
    user: &str,
    items: Vec<WebhookDelivery>,
    deadline: Instant,
) -> WebhookReport {
    let mut rep = WebhookReport::default();
    let store_error = |rep: &mut WebhookReport, what: &str, e: &dyn std::fmt::Display| {
        warn!(user_id = %user, error = %e, "{what} failed; retried next run");
        rep.errors.push(format!("webhook of {user}: {what}: {e}"));
    };
    let mut reg = match d.tokens().get_webhook(user).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            // No registration any more: its queue goes.
            for item in &items {
                if let Err(e) = d.tracking().remove_webhook_delivery(item).await {
                    store_error(&mut rep, "dropping the queue of a deleted webhook", &e);
                    break;
                }
            }
            return rep;
        }
        Err(e) => {
            store_error(&mut rep, "reading the registration", &e);
            return rep;
        }
    };
    let now = d.clock().now();
    if !reg.due(now) {
        return rep;
    }
    let secret = match d.tokens().webhook_secret(&reg).await {
        Ok(Some(s)) => s,
        Ok(None) => return rep, // replaced meanwhile: the next step reads the new one
        Err(e) => {
            store_error(&mut rep, "decrypting the secret", &e);
            return rep;
        }
    };
    let policy = d.webhooks().policy().clone();
    let mut changed = false;
    for item in &items {
        if Instant::now() >= deadline {
            break;
        }
        let at = d.clock().now();
        match d
            .webhooks()
            .deliver(&reg.url, &secret, item, at.unix_timestamp())
            .await
        {
            Ok(()) => {
                rep.delivered += 1;
                reg.record_success(at);
                changed = true;
                if let Err(e) = d.tracking().remove_webhook_delivery(item).await {
                    // Delivered but still queued: POSTed again next time (same event id).
                    store_error(&mut rep, "removing a delivered event", &e);
                    break;
                }
            }
            Err(e) => {
                rep.failed += 1;
                let was_enabled = reg.enabled;
                reg.record_failure(&item.event_id, &e.to_string(), at, &policy);
                changed = true;
                warn!(user_id = %user, event_id = %item.event_id, error = %e,
                    failures = reg.consecutive_failures, next_attempt_at = ?reg.next_attempt_at,
                    "webhook delivery failed; backing off");
                if was_enabled && !reg.enabled {
                    rep.disabled += 1;
                    warn!(user_id = %user, reason = reg.disabled_reason.as_deref().unwrap_or(""), "webhook disabled");
                }
                break;
            }
        }
    }
    if changed {
        match d.tokens().save_webhook_state(&reg).await {
            Ok(true) => {}
            Ok(false) => {
                info!(user_id = %user, "webhook replaced meanwhile; its new registration keeps its own state")
            }
            Err(e) => store_error(&mut rep, "saving the delivery state", &e),
        }
    }
    if rep.delivered > 0 {
        info!(user_id = %user, delivered = rep.delivered, "webhook deliveries done");
    }
    rep
}
