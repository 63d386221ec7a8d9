//! One Lambda invocation: the EventBridge schedule's event content is ignored, every invocation is
//! one run ([`run_once`]) that stops starting new work [`DEADLINE_MARGIN`] before the deadline.

use std::time::{Duration, Instant};

use crate::deps::Deps;
use crate::run::run_once;

/// Stop starting new work this long before the Lambda deadline.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(20);

/// The function's timeout in infra/template.yaml: the deadline assumed when the invocation carries
/// none that is usable (see `shared::deadline`).
pub const FALLBACK_TIMEOUT: Duration = Duration::from_secs(300);

/// When a run invoked with `deadline_ms` (the invocation's deadline, epoch ms) must stop starting
/// new work.
pub fn deadline_of(deadline_ms: u64) -> Instant {
    let at = shared::deadline::from_epoch_ms(deadline_ms, FALLBACK_TIMEOUT);
    let left = at.saturating_duration_since(Instant::now());
    Instant::now() + left.saturating_sub(DEADLINE_MARGIN)
}

/// One run for an invocation with deadline `deadline_ms`; the response document sums it up (its
/// keys are documented in README.md; `plan_a_users` keeps its name there: users whose feed was
/// unusable, linked by coverage tiles).
pub async fn invoke<D: Deps>(d: &D, deadline_ms: u64) -> serde_json::Value {
    let report = run_once(d, deadline_of(deadline_ms)).await;
    serde_json::json!({
        "received": report.intake.received,
        "created": report.intake.created,
        "users": report.users,
        "checked": report.checked,
        "written": report.written,
        "linked_feed": report.linked_feed,
        "linked_tiles": report.linked_tiles,
        "plan_a_users": report.feed_unusable_users,
        "feed_web_app_users": report.feed_web_app_users,
        "feed_user_token_users": report.feed_user_token_users,
        "feed_skipped_nodes": report.feed_skipped_nodes,
        "cut_off": report.cut_off,
        "lease_held": report.lease_held,
        "stuck_failed": report.sweep.failed,
        "stuck_uncertain": report.sweep.uncertain,
        "stuck_handed_off": report.sweep.handed_off,
        "uncertain_resolved": report.reconcile.resolved,
        "events_published": report.events_published,
        "webhooks_delivered": report.webhooks_delivered,
        "webhook_failures": report.webhook_failures,
        "errors": report.errors.len(),
    })
}
