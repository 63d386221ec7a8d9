//! One scheduled run: the run lease, intake, FINISH_UNCERTAIN discovery, then every user with due
//! uploads (bounded concurrency, see `user`), then the feed health record. The run starts no new
//! work after its budget.
//!
//! Overlapping runs (a run can outlive the schedule's interval, and reserved concurrency is not
//! guaranteed) are kept apart by one conditional write per run, the lease, instead of a condition
//! on every record: a run that finds the lease held does nothing. Holding it, a run writes each
//! user's changed records and links in `BatchWriteItem`s (links first); whatever a cut-off run did
//! not write is simply picked up by the next.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use shared::domain::tracking::is_due;
use shared::model::{FeedHealth, TrackingRecord};
use shared::ports::{RepoError, RunLease, TokenStore, TrackingReader, TrackingStore};
use tracing::{info, info_span, warn, Instrument};

use crate::clock::elapsed_ms;
use crate::deps::Deps;
use crate::intake::intake;
use crate::reconcile::discover_uncertain;
use crate::report::{RunReport, UserReport};
use crate::user::track_user;

/// How long the lease outlives the run's deadline (covers the function's stop margin).
const LEASE_SLACK: Duration = Duration::from_secs(60);

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
    let until = wall + deadline.saturating_duration_since(Instant::now()) + LEASE_SLACK;
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
        feed_unusable_users = report.feed_unusable_users,
        cut_off = report.cut_off,
        elapsed_ms = elapsed_ms(started),
        "poller run done"
    );
    report
}

/// The run under the lease.
async fn run_leased<D: Deps>(d: &D, deadline: Instant, report: &mut RunReport) {
    let t = Instant::now();
    report.intake = intake(d, deadline).await;
    report.reconcile = discover_uncertain(d, deadline).await;
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
    let mut unusable: Option<String> = None;
    let mut any_ok = false;
    for o in outcomes {
        any_ok |= o.feed_ok;
        if let Some(e) = &o.feed_unusable {
            unusable.get_or_insert_with(|| e.clone());
        }
        report.merge(o);
    }
    if let Err(e) = update_health(d, unusable, any_ok).await {
        report.errors.push(format!("feed health: {e}"));
    }
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

/// Feed health: degraded as soon as one user's feed was unusable; healthy again once a run used
/// the feed without any such failure. Written only when something changed.
async fn update_health<D: Deps>(d: &D, unusable: Option<String>, any_ok: bool) -> Result<(), RepoError> {
    let old = d.tracking().get_feed_health().await?;
    let now = d.clock().now();
    let new = match (&unusable, any_ok, &old) {
        (Some(err), _, _) => FeedHealth {
            healthy: false,
            degraded_since: old
                .as_ref()
                .filter(|h| !h.healthy)
                .and_then(|h| h.degraded_since)
                .or(Some(now)),
            last_error: Some(err.clone()),
            updated_at: now,
        },
        (None, true, _) => FeedHealth {
            healthy: true,
            degraded_since: None,
            last_error: old.as_ref().and_then(|h| h.last_error.clone()),
            updated_at: now,
        },
        (None, false, _) => return Ok(()),
    };
    let same = old
        .as_ref()
        .is_some_and(|o| o.healthy == new.healthy && o.last_error == new.last_error);
    if !same {
        if !new.healthy {
            warn!(
                error = new.last_error.as_deref().unwrap_or(""),
                "activity feed degraded: using coverage tiles"
            );
        } else {
            info!("activity feed healthy");
        }
        d.tracking().put_feed_health(&new).await?;
    }
    Ok(())
}
