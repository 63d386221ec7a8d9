//! One scheduled run: the run lease, intake, FINISH_UNCERTAIN discovery, then every user with due
//! uploads (bounded concurrency, see `user`), then the feed health summary. The run starts no new
//! work after its budget.
//!
//! Feed health is per user (each user's [`FeedState`](shared::domain::tracking::FeedState) on their
//! tracking records, set in `user::status`); the [`FeedHealth`] item only sums the run up: how many
//! users were read with the web-app token, with their own token, or through coverage tiles, and the
//! last error with its class. It is unhealthy only when the feed could be read for nobody — one
//! user's refusal never makes it so while the feed works for others.
//!
//! Overlapping runs (a run can outlive the schedule's interval, and reserved concurrency is not
//! guaranteed) are kept apart by one conditional write per run, the lease, instead of a condition
//! on every record: a run that finds the lease held does nothing. Holding it, a run writes each
//! user's changed records and links in `BatchWriteItem`s (links first); whatever a cut-off run did
//! not write is simply picked up by the next.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use futures::StreamExt;
use shared::domain::tracking::{is_due, FeedErrorClass, FeedSource};
use shared::model::{FeedHealth, TrackingRecord};
use shared::ports::{RepoError, RunLease, TokenStore, TrackingReader, TrackingStore};
use tracing::{info, info_span, warn, Instrument};

use crate::clock::elapsed_ms;
use crate::deps::Deps;
use crate::intake::intake;
use crate::outbox::publish_outbox;
use crate::reconcile::discover_uncertain;
use crate::report::{RunReport, UserReport};
use crate::sweep::sweep_stuck;
use crate::user::track_user;
use crate::webhooks::deliver_webhooks;

/// One run. `deadline` is when the run must have stopped starting new work (the Lambda deadline
/// minus a margin, or `now + budget`, whichever is earlier).
pub async fn run_once<D: Deps>(d: &D, deadline: Instant) -> RunReport {
    let deadline = deadline.min(Instant::now() + d.tunables().budget);
    let started = Instant::now();
    let mut report = RunReport::default();
    // The lease is wall-clock time (it is about processes, not the tracked uploads' clock) and
    // lasts past the deadline by the function's stop margin, so it outlives every write of the run.
    let owner = uuid::Uuid::new_v4().to_string();
    let wall = time::OffsetDateTime::now_utc();
    let until = wall + deadline.saturating_duration_since(Instant::now()) + d.tunables().run_lease_slack;
    match d.tracking().acquire_run_lease(&owner, wall, until).await {
        Ok(true) => {}
        Ok(false) => {
            info!("another poller run holds the lease: nothing to do");
            report.lease_held = true;
            return report;
        }
        Err(e) => {
            warn!(error = %e, "taking the run lease failed");
            report.errors.push(format!("run lease: {e}"));
            return report;
        }
    }
    run_leased(d, deadline, &mut report).await;
    if let Err(e) = d.tracking().release_run_lease(&owner).await {
        warn!(error = %e, "releasing the run lease failed (it expires by itself)");
    }
    info!(
        received = report.intake.received,
        created = report.intake.created,
        users = report.users,
        checked = report.checked,
        written = report.written,
        linked_feed = report.linked_feed,
        linked_tiles = report.linked_tiles,
        refinished = report.refinished,
        stuck_failed = report.sweep.failed,
        stuck_uncertain = report.sweep.uncertain,
        stuck_handed_off = report.sweep.handed_off,
        events_published = report.events_published,
        webhooks_delivered = report.webhooks_delivered,
        webhook_failures = report.webhook_failures,
        feed_unusable_users = report.feed_unusable_users,
        feed_web_app_users = report.feed_web_app_users,
        feed_user_token_users = report.feed_user_token_users,
        feed_skipped_nodes = report.feed_skipped_nodes,
        feed_graphql_errors = report.feed_graphql_errors,
        cut_off = report.cut_off,
        elapsed_ms = elapsed_ms(started),
        "poller run done"
    );
    report
}

/// The run under the lease.
async fn run_leased<D: Deps>(d: &D, deadline: Instant, report: &mut RunReport) {
    // Events an earlier run wrote but did not publish (it died or its publish failed) go first.
    publish_events(d, deadline, report).await;
    users_and_health(d, deadline, report).await;
    // This run's changes.
    publish_events(d, deadline, report).await;
}

/// Publish the outbox of status-change events (`crate::outbox`) into `report`.
async fn publish_events<D: Deps>(d: &D, deadline: Instant, report: &mut RunReport) {
    let o = publish_outbox(d, deadline).await;
    report.events_published += o.published;
    report.errors.extend(o.errors);
    let w = deliver_webhooks(d, deadline).await;
    report.webhooks_delivered += w.delivered;
    report.webhook_failures += w.failed;
    report.errors.extend(w.errors);
}

/// Intake, reconcile, sweep, every user's turn, feed health.
async fn users_and_health<D: Deps>(d: &D, deadline: Instant, report: &mut RunReport) {
    let t = Instant::now();
    report.intake = intake(d, deadline).await;
    report.reconcile = discover_uncertain(d, deadline).await;
    report.sweep = sweep_stuck(d, deadline).await;
    report.timings.intake_ms = elapsed_ms(t);
    let t = Instant::now();
    let pending = match d.tracking().list_pending_tracking().await {
        Ok(listing) => {
            // Records that could not be read are reported; every other user is tracked as usual.
            report.errors.extend(
                listing
                    .unreadable
                    .into_iter()
                    .map(|why| format!("listing pending uploads: {why}")),
            );
            listing.records
        }
        Err(e) => {
            warn!(error = %e, "listing pending uploads failed");
            report.errors.push(format!("listing pending uploads: {e}"));
            return;
        }
    };
    report.timings.list_ms = elapsed_ms(t);
    info!(
        pending = pending.len(),
        intake_ms = report.timings.intake_ms,
        list_ms = report.timings.list_ms,
        "pending uploads listed"
    );
    let t = Instant::now();
    let by_user = due_by_user(d, pending);
    // Every user's token up front: the records in batches, one KMS Decrypt each.
    let t_tokens = Instant::now();
    let users: Vec<String> = by_user.keys().cloned().collect();
    let loaded = d.tokens().load_many(&users).await;
    report.timings.token_ms = elapsed_ms(t_tokens);
    report.users = by_user.len();
    let linked_in_run: Mutex<HashSet<String>> = Mutex::new(HashSet::new());
    let linked_in_run = &linked_in_run;
    let outcomes: Vec<UserReport> = futures::stream::iter(by_user.into_iter().zip(loaded))
        .map(|((user, (records, pending)), token)| {
            let span = info_span!("user", user_id = %user);
            async move { track_user(d, &user, token, records, pending, deadline, linked_in_run).await }
                .instrument(span)
        })
        .buffer_unordered(d.tunables().user_concurrency)
        .collect()
        .await;
    report.timings.users_ms = elapsed_ms(t);
    let mut summary = FeedSummary::default();
    for o in outcomes {
        match o.feed_source {
            Some(FeedSource::WebAppToken) => summary.web_app += 1,
            Some(FeedSource::UserToken) => summary.user_token += 1,
            Some(FeedSource::CoverageTiles) => summary.tiles += 1,
            None => {}
        }
        if let Some(e) = &o.feed_error {
            // A failure that put a user on tiles says more than a web-app refusal the user's token
            // made up for.
            let unusable = o.feed_unusable.is_some();
            if summary.last_error.is_none() || (unusable && !summary.last_error_made_tiles) {
                summary.last_error = Some(e.clone());
                summary.last_error_made_tiles = unusable;
            }
        }
        report.merge(o);
    }
    if let Err(e) = update_health(d, &summary).await {
        report.errors.push(format!("feed health: {e}"));
    }
}

/// The run's feed outcomes over users.
#[derive(Debug, Default)]
struct FeedSummary {
    web_app: u32,
    user_token: u32,
    tiles: u32,
    last_error: Option<(FeedErrorClass, String)>,
    last_error_made_tiles: bool,
}

/// user → (its due records, how many of its uploads are pending in all); users with nothing due
/// are left out.
fn due_by_user<D: Deps>(
    d: &D,
    pending: Vec<TrackingRecord>,
) -> BTreeMap<String, (Vec<TrackingRecord>, usize)> {
    let now = d.clock().now();
    let mut by_user: BTreeMap<String, (Vec<TrackingRecord>, usize)> = BTreeMap::new();
    for r in pending {
        let entry = by_user.entry(r.user_id.clone()).or_default();
        entry.1 += 1;
        if is_due(&r.tracked, now, &d.tunables().policy) {
            entry.0.push(r);
        }
    }
    by_user.retain(|_, (due, _)| !due.is_empty());
    by_user
}

/// The feed health summary of a run: unhealthy when the feed was read for nobody and someone is on
/// coverage tiles, healthy when it was read for someone. Not written when no user's feed was tried
/// (nothing learned), nor when nothing changed but the time.
async fn update_health<D: Deps>(d: &D, run: &FeedSummary) -> Result<(), RepoError> {
    if run.web_app + run.user_token + run.tiles == 0 {
        return Ok(());
    }
    let old = d.tracking().get_feed_health().await?;
    let now = d.clock().now();
    let healthy = run.web_app + run.user_token > 0;
    let (last_error_class, last_error) = match &run.last_error {
        Some((class, e)) => (Some(*class), Some(e.clone())),
        None => (
            old.as_ref().and_then(|h| h.last_error_class),
            old.as_ref().and_then(|h| h.last_error.clone()),
        ),
    };
    let new = FeedHealth {
        healthy,
        degraded_since: if healthy {
            None
        } else {
            old.as_ref()
                .filter(|h| !h.healthy)
                .and_then(|h| h.degraded_since)
                .or(Some(now))
        },
        last_error,
        last_error_class,
        users_web_app_token: run.web_app,
        users_user_token: run.user_token,
        users_coverage_tiles: run.tiles,
        updated_at: now,
    };
    let same = old.as_ref().is_some_and(|o| {
        FeedHealth {
            updated_at: now,
            ..o.clone()
        } == new
    });
    if !same {
        match (&new.healthy, old.as_ref().map(|o| o.healthy)) {
            (false, Some(true) | None) => warn!(
                error = new.last_error.as_deref().unwrap_or(""),
                class = new.last_error_class.map(FeedErrorClass::as_str).unwrap_or(""),
                users_coverage_tiles = new.users_coverage_tiles,
                "activity feed unavailable for every user: using coverage tiles"
            ),
            (true, Some(false)) => info!("activity feed readable again"),
            _ => {}
        }
        d.tracking().put_feed_health(&new).await?;
    }
    Ok(())
}
