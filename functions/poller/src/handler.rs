//! One scheduled run: the run lease, intake, then every user with pending uploads (bounded
//! concurrency), then the feed health record. The run starts no new work after its budget.
//!
//! Overlapping runs (a run can outlive the schedule's interval, and reserved concurrency is not
//! guaranteed) are kept apart by one conditional write per run, the lease, instead of a condition
//! on every record: a run that finds the lease held does nothing. Holding it, a run writes each
//! user's changed records and links in `BatchWriteItem`s (links first); whatever a cut-off run did
//! not write is simply picked up by the next.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use futures::StreamExt;
use secrecy::SecretString;
use shared::domain::linking::{ImageOutcome, LinkPath, LinkReport, OurImage};
use shared::domain::tracking::{
    adopt_cluster, apply_node, check_deadlines, is_due, reconcile_failed, OverallState, Transition, Update,
};
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::feed::{ActivityNode, StageStatus, Stages};
use shared::mapillary::session::{SessionContext, TokenSession};
use shared::model::{FeedHealth, ImageLink, ImagePosition, TrackingRecord};
use shared::ports::{
    ClusterInbox, ImageEntryReader, ReconcileStore, RepoError, RunLease, TokenStore, TrackingStore,
    UploadReader,
};
use tracing::{info, info_span, warn, Instrument};

use crate::clock::Clock;
use crate::config::{GraphqlToken, Tunables};
use crate::intake::{intake, IntakeReport};
use crate::plana::{find_by_tiles, TileCache};
use crate::planb::{link_many, walk_feed, FeedOutcome};
use crate::reconcile::discover_uncertain;

/// The ports and settings of a run.
#[derive(Debug, Clone)]
pub struct Poller<R, U, T, Q> {
    /// Tracking records, links, feed health.
    pub tracking: R,
    /// zip-and-push's records (upload records and image entries).
    pub uploads: U,
    /// Users' tokens.
    pub tokens: T,
    /// The clusters queue.
    pub inbox: Q,
    /// Mapillary.
    pub api: MapillaryApp,
    /// `MAPILLARY_CLIENT_TOKEN`, for `RELAY_GRAPHQL_TOKEN=client`.
    pub client_token: Option<SecretString>,
    /// Tunables.
    pub tunables: Tunables,
    /// "Now".
    pub clock: Clock,
}

impl<R, U, T, Q> Poller<R, U, T, Q> {
    /// What the run's token sessions share: the token store, Mapillary, the refresh margin and the
    /// run's clock.
    pub fn token_context(&self) -> SessionContext<'_, T, MapillaryApp> {
        SessionContext::new(&self.tokens, &self.api, self.tunables.token_refresh_margin)
            .with_clock(&self.clock)
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunReport {
    /// Intake.
    pub intake: IntakeReport,
    /// FINISH_UNCERTAIN uploads taken into tracking.
    pub reconcile: crate::reconcile::DiscoveryReport,
    /// Users worked on.
    pub users: usize,
    /// Users whose feed was unusable (Plan A used).
    pub plan_a_users: usize,
    /// Uploads looked at.
    pub checked: usize,
    /// Tracking records written.
    pub written: usize,
    /// Uploads linked in this run, by path.
    pub linked_feed: usize,
    /// Uploads linked through coverage tiles.
    pub linked_tiles: usize,
    /// The budget ran out before everything was looked at.
    pub cut_off: bool,
    /// Another run held the lease: this one did nothing.
    pub lease_held: bool,
    /// Where the time went.
    pub timings: RunTimings,
    /// Every transition written, with the upload id.
    pub transitions: Vec<(String, Transition)>,
    /// Problems (each also logged).
    pub errors: Vec<String>,
}

/// Milliseconds spent per phase of a run. The per-user phases are sums over users, who run
/// `RELAY_USER_CONCURRENCY` at a time, so they add up to more than the run's wall time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunTimings {
    /// Intake and the FINISH_UNCERTAIN discovery (wall).
    pub intake_ms: u64,
    /// Listing the pending uploads (wall).
    pub list_ms: u64,
    /// Every user's turn (wall).
    pub users_ms: u64,
    /// Loading every user's token up front (wall), plus refreshing them (summed over users).
    pub token_ms: u64,
    /// Walking the activity feed, summed over users.
    pub feed_ms: u64,
    /// Linking (our image entries + Mapillary lookups), summed over users.
    pub link_ms: u64,
    /// Writing records and links, summed over users.
    pub write_ms: u64,
}

impl RunReport {
    fn merge(&mut self, o: UserOutcome) {
        self.timings.token_ms += o.timings.token_ms;
        self.timings.feed_ms += o.timings.feed_ms;
        self.timings.link_ms += o.timings.link_ms;
        self.timings.write_ms += o.timings.write_ms;
        self.checked += o.checked;
        self.written += o.written;
        self.linked_feed += o.linked_feed;
        self.linked_tiles += o.linked_tiles;
        self.cut_off |= o.cut_off;
        self.transitions.extend(o.transitions);
        self.errors.extend(o.errors);
        if o.feed_unusable.is_some() {
            self.plan_a_users += 1;
        }
    }
}

#[derive(Debug, Default)]
struct UserOutcome {
    checked: usize,
    written: usize,
    linked_feed: usize,
    linked_tiles: usize,
    cut_off: bool,
    feed_ok: bool,
    feed_unusable: Option<String>,
    transitions: Vec<(String, Transition)>,
    errors: Vec<String>,
    timings: RunTimings,
}

fn ms(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One run. `deadline` is when the run must have stopped starting new work (the Lambda deadline
/// minus a margin, or `now + budget`, whichever is earlier).
pub async fn run_once<R, U, T, Q>(p: &Poller<R, U, T, Q>, deadline: Instant) -> RunReport
where
    R: TrackingStore + RunLease + ReconcileStore,
    U: UploadReader + ImageEntryReader,
    T: TokenStore,
    Q: ClusterInbox,
{
    let deadline = deadline.min(Instant::now() + p.tunables.budget);
    let started = Instant::now();
    let mut report = RunReport::default();
    // The lease is wall-clock time (it is about processes, not the tracked uploads' clock) and
    // lasts past the deadline by the function's stop margin, so it outlives every write of the run.
    let owner = uuid::Uuid::new_v4().to_string();
    let wall = time::OffsetDateTime::now_utc();
    let until = wall
        + deadline.saturating_duration_since(Instant::now())
        + std::time::Duration::from_secs(LEASE_SLACK_S);
    match p.tracking.acquire_run_lease(&owner, wall, until).await {
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
    run_leased(p, deadline, &mut report).await;
    if let Err(e) = p.tracking.release_run_lease(&owner).await {
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
        plan_a_users = report.plan_a_users,
        cut_off = report.cut_off,
        elapsed_ms = ms(started),
        "poller run done"
    );
    report
}

/// How long the lease outlives the run's deadline (covers the function's stop margin).
const LEASE_SLACK_S: u64 = 60;

async fn run_leased<R, U, T, Q>(p: &Poller<R, U, T, Q>, deadline: Instant, report: &mut RunReport)
where
    R: TrackingStore + ReconcileStore,
    U: UploadReader + ImageEntryReader,
    T: TokenStore,
    Q: ClusterInbox,
{
    let t = Instant::now();
    report.intake = intake(p, deadline).await;
    report.reconcile = discover_uncertain(p, deadline).await;
    report.timings.intake_ms = ms(t);
    let t = Instant::now();
    let pending = match p.tracking.list_pending_tracking().await {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "listing pending uploads failed");
            report.errors.push(format!("listing pending uploads: {e}"));
            return;
        }
    };
    report.timings.list_ms = ms(t);
    info!(
        pending = pending.len(),
        intake_ms = report.timings.intake_ms,
        list_ms = report.timings.list_ms,
        "pending uploads listed"
    );
    let t = Instant::now();
    let now = p.clock.now();
    // user → (its due records, how many of its uploads are pending in all)
    let mut by_user: BTreeMap<String, (Vec<TrackingRecord>, usize)> = BTreeMap::new();
    for r in pending {
        let entry = by_user.entry(r.user_id.clone()).or_default();
        entry.1 += 1;
        if is_due(&r.tracked, now, &p.tunables.policy) {
            entry.0.push(r);
        }
    }
    by_user.retain(|_, (due, _)| !due.is_empty());
    // Every user's token up front: the records in batches, one KMS Decrypt each.
    let t_tokens = Instant::now();
    let users: Vec<String> = by_user.keys().cloned().collect();
    let loaded = p.tokens.load_many(&users).await;
    report.timings.token_ms = ms(t_tokens);
    report.users = by_user.len();
    let linked_in_run: Mutex<HashSet<String>> = Mutex::new(HashSet::new());
    let linked_in_run = &linked_in_run;
    let outcomes: Vec<UserOutcome> = futures::stream::iter(by_user.into_iter().zip(loaded))
        .map(|((user, (records, pending)), token)| {
            let span = info_span!("user", user_id = %user);
            async move { track_user(p, &user, token, records, pending, deadline, linked_in_run).await }
                .instrument(span)
        })
        .buffer_unordered(p.tunables.user_concurrency)
        .collect()
        .await;
    report.timings.users_ms = ms(t);
    let mut unusable: Option<String> = None;
    let mut any_ok = false;
    for o in outcomes {
        any_ok |= o.feed_ok;
        if let Some(e) = &o.feed_unusable {
            unusable.get_or_insert_with(|| e.clone());
        }
        report.merge(o);
    }
    if let Err(e) = update_health(p, unusable, any_ok).await {
        report.errors.push(format!("feed health: {e}"));
    }
}

/// Degraded as soon as one user's feed was unusable; healthy again once a run used the feed
/// without any such failure. Written only when something changed.
async fn update_health<R, U, T, Q>(
    p: &Poller<R, U, T, Q>,
    unusable: Option<String>,
    any_ok: bool,
) -> Result<(), RepoError>
where
    R: TrackingStore,
{
    let old = p.tracking.get_feed_health().await?;
    let now = p.clock.now();
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
        p.tracking.put_feed_health(&new).await?;
    }
    Ok(())
}

fn finished_node(cluster_id: &str) -> ActivityNode {
    ActivityNode {
        cluster_id: cluster_id.to_string(),
        kind: None,
        created_at_seconds: None,
        captured_at_seconds: None,
        item_count: None,
        image_id: None,
        stages: Stages {
            ingestion: Some(StageStatus::Finished),
            image_processing: Some(StageStatus::Finished),
            map_data: Some(StageStatus::Finished),
            map_update: Some(StageStatus::Finished),
        },
        error_code: None,
        timezone: None,
    }
}

/// Our images of an upload, in zip order, as linking inputs (and their entries for the links).
pub async fn our_images<U: ImageEntryReader>(
    uploads: &U,
    upload_id: &str,
) -> Result<(Vec<ImagePosition>, Vec<OurImage>), RepoError> {
    let entries: Vec<ImagePosition> = uploads
        .list_images(upload_id)
        .await?
        .iter()
        .map(ImagePosition::from)
        .collect();
    let ours = entries.iter().map(our_image).collect();
    Ok((entries, ours))
}

/// One image entry as a linking input.
pub fn our_image(e: &ImagePosition) -> OurImage {
    OurImage {
        key: e.key.clone(),
        lat: e.lat,
        lon: e.lon,
        altitude: e.altitude,
        captured_at_ms: i64::try_from(e.captured_at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX),
        heading: e.heading,
    }
}

fn links_of(entries: &[ImagePosition], report: &LinkReport) -> Vec<ImageLink> {
    entries
        .iter()
        .zip(&report.images)
        .map(|(e, li)| ImageLink {
            upload_id: e.upload_id.clone(),
            index: e.index,
            key: e.key.clone(),
            outcome: li.outcome.clone(),
            via: report.path,
        })
        .collect()
}

/// Record a link report on the record (the links themselves are stored first).
fn apply_links(record: &mut TrackingRecord, report: &LinkReport) {
    record.sequence_ids = report.sequence_ids.clone();
    record.linked_via = Some(report.path);
    record.linked_count = u32::try_from(report.linked_count()).unwrap_or(u32::MAX);
    record.dropped_count = u32::try_from(report.dropped_count()).unwrap_or(u32::MAX);
    if record.image_id.is_none() {
        record.image_id = report.images.iter().find_map(|i| match &i.outcome {
            ImageOutcome::Linked { image_id, .. } => Some(image_id.clone()),
            _ => None,
        });
    }
}

/// One upload during a user's turn: the record as loaded, as it will be written, and its links.
struct Work {
    record: TrackingRecord,
    old: TrackingRecord,
    update: Update,
    links: Vec<ImageLink>,
}

impl Work {
    fn needs_link(&self) -> bool {
        self.record.linked_via.is_none() && !matches!(self.update.state, OverallState::Failed { .. })
    }
}

/// A record ready to be written.
struct WriteJob {
    record: TrackingRecord,
    links: Vec<ImageLink>,
    transitions: Vec<Transition>,
}

async fn track_user<R, U, T, Q>(
    p: &Poller<R, U, T, Q>,
    user_id: &str,
    token: Result<Option<shared::model::StoredToken>, shared::ports::TokenError>,
    records: Vec<TrackingRecord>,
    pending: usize,
    deadline: Instant,
    linked_in_run: &Mutex<HashSet<String>>,
) -> UserOutcome
where
    R: TrackingStore,
    U: ImageEntryReader,
    T: TokenStore,
{
    let mut out = UserOutcome::default();
    if Instant::now() >= deadline {
        out.cut_off = true;
        return out;
    }
    let t = Instant::now();
    let mut token = match TokenSession::from_loaded_fresh(p.token_context(), user_id, token).await {
        Ok(t) => Some(t),
        Err(e) => {
            warn!(error = %e, "no usable token: only the deadlines are checked");
            out.errors.push(format!("user {user_id}: {e}"));
            None
        }
    };
    // FINISH_UNCERTAIN uploads: walk the feed back to the earliest moment their cluster can have
    // been created, and keep every node since then as a candidate.
    out.timings.token_ms = ms(t);
    let t = Instant::now();
    let horizon = records
        .iter()
        .filter_map(|r| r.tracked.reconcile.as_ref().filter(|c| c.is_open()))
        .map(|c| c.created_from_s)
        .min();
    let feed = match token.as_mut() {
        Some(tok) => {
            let graphql = match p.tunables.graphql_token {
                GraphqlToken::User => None,
                GraphqlToken::Client => p.client_token.clone(),
            };
            let clusters: Vec<String> = records
                .iter()
                .filter(|r| !r.tracked.is_reconciling())
                .map(|r| r.tracked.cluster_id.clone())
                .collect();
            let hint = records.iter().find_map(|r| r.mapillary_user_id.clone());
            walk_feed(p, tok, graphql.as_ref(), hint, &clusters, horizon).await
        }
        None => FeedOutcome::Skipped("no token".into()),
    };
    out.timings.feed_ms = ms(t);
    let mut tiles = TileCache::default();
    let (mut nodes, recent): (HashMap<String, ActivityNode>, Vec<ActivityNode>) = match &feed {
        FeedOutcome::Walked { nodes, recent, .. } => {
            out.feed_ok = true;
            (nodes.clone(), recent.clone())
        }
        FeedOutcome::Unusable(e) => {
            warn!(error = %e, "activity feed unusable for this user: Plan A (coverage tiles)");
            out.feed_unusable = Some(e.clone());
            (HashMap::new(), Vec::new())
        }
        FeedOutcome::Skipped(e) => {
            info!(reason = %e, "feed not read this run");
            (HashMap::new(), Vec::new())
        }
    };
    let mapillary_user_id = match &feed {
        FeedOutcome::Walked {
            mapillary_user_id, ..
        } => Some(mapillary_user_id.clone()),
        _ => None,
    };

    // 1. Status of every upload (pure, from the feed nodes and the clock).
    let now = p.clock.now();
    let mut taken_clusters: HashSet<String> = records
        .iter()
        .filter(|r| !r.tracked.is_reconciling())
        .map(|r| r.tracked.cluster_id.clone())
        .collect();
    let window = time::Duration::try_from(p.tunables.reconcile_window).unwrap_or(time::Duration::DAY);
    let mut works: Vec<Work> = Vec::with_capacity(records.len());
    for mut record in records {
        out.checked += 1;
        let old = record.clone();
        let mut adopted: Option<Transition> = None;
        let mut forced: Option<Update> = None;
        if let (Some(rc), true) = (record.tracked.reconcile.clone(), record.tracked.is_reconciling()) {
            // Only a feed walked to the horizon can say "no such cluster".
            if out.feed_ok {
                match rc.pick(&recent, &taken_clusters) {
                    Ok(Some(node)) => {
                        info!(upload_id = %record.upload_id, cluster_id = %node.cluster_id,
                            "FINISH_UNCERTAIN: cluster found in the activity feed; adopted");
                        adopted = Some(adopt_cluster(&mut record.tracked, &node.cluster_id, now));
                        taken_clusters.insert(node.cluster_id.clone());
                        nodes.insert(node.cluster_id.clone(), node.clone());
                    }
                    Ok(None) if now >= rc.give_up_at => {
                        warn!(upload_id = %record.upload_id, "FINISH_UNCERTAIN: no cluster in the feed within the window: FAILED");
                        forced = Some(reconcile_failed(&record.tracked, now, window, None));
                    }
                    Err(n) if now >= rc.give_up_at => {
                        forced = Some(reconcile_failed(&record.tracked, now, window, Some(n)));
                    }
                    Err(n) => {
                        warn!(upload_id = %record.upload_id, candidates = n, "FINISH_UNCERTAIN: several clusters match; waiting");
                    }
                    Ok(None) => {}
                }
            }
        }
        let mut update: Update = match (forced, nodes.get(&record.tracked.cluster_id)) {
            (Some(u), _) => u,
            (None, Some(node)) => match apply_node(&record.tracked, node, now, &p.tunables.policy) {
                Ok(u) => {
                    if node.item_count.is_some() {
                        record.item_count = node.item_count;
                    }
                    if node.image_id.is_some() {
                        record.image_id = node.image_id.clone();
                    }
                    u
                }
                Err(e) => {
                    out.errors.push(e.to_string());
                    check_deadlines(&record.tracked, now, &p.tunables.policy)
                }
            },
            (None, None) => check_deadlines(&record.tracked, now, &p.tunables.policy),
        };
        if let Some(t) = adopted {
            update.transitions.insert(0, t);
            update.changed = true;
        }
        works.push(Work {
            record,
            old,
            update,
            links: Vec::new(),
        });
    }

    // 2. Linking: Plan A per upload when the feed is unusable, else Plan B batched for the user.
    let t = Instant::now();
    if let Some(tok) = token.as_mut() {
        if out.feed_unusable.is_some() {
            let mut taken: HashSet<String> = match p.tracking.user_linked_sequences(user_id).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "listing the user's linked sequences failed");
                    out.errors.push(format!("user {user_id}: linked sequences: {e}"));
                    HashSet::new()
                }
            };
            taken.extend(works.iter().flat_map(|w| w.record.sequence_ids.iter().cloned()));
            // Our images of every upload to link, read in batches up front.
            let mut known: HashMap<String, crate::planb::OursOf> = HashMap::new();
            let wanted: Vec<&TrackingRecord> = works
                .iter()
                .filter(|w| w.needs_link())
                .map(|w| &w.record)
                .collect();
            for (r, mine) in wanted
                .iter()
                .zip(crate::planb::our_images_many(p, wanted.iter().copied()).await)
            {
                if let Ok(m) = mine {
                    known.insert(r.upload_id.clone(), m);
                }
            }
            for w in works.iter_mut().filter(|w| w.needs_link()) {
                if Instant::now() >= deadline {
                    out.cut_off = true;
                    break;
                }
                if let Ok(run) = linked_in_run.lock() {
                    taken.extend(run.iter().cloned());
                }
                // Plan A: the upload shows in coverage tiles only once all four stages finished.
                let mine = known.remove(&w.record.upload_id);
                match find_by_tiles(p, tok, &w.record, &mut tiles, &taken, mine).await {
                    Ok(Some((entries, report))) => {
                        let node = finished_node(&w.record.tracked.cluster_id);
                        if let Ok(u) = apply_node(&w.record.tracked, &node, now, &p.tunables.policy) {
                            let adopted: Vec<Transition> = w
                                .update
                                .transitions
                                .iter()
                                .filter(|t| t.field == "cluster_id")
                                .cloned()
                                .collect();
                            w.update = u;
                            w.update.transitions.splice(0..0, adopted);
                        }
                        w.links = links_of(&entries, &report);
                        apply_links(&mut w.record, &report);
                        taken.extend(report.sequence_ids.iter().cloned());
                        out.linked_tiles += 1;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(upload_id = %w.record.upload_id, error = %e, "Plan A lookup failed");
                        out.errors
                            .push(format!("upload {}: Plan A: {e}", w.record.upload_id));
                    }
                }
            }
        } else {
            let jobs: Vec<(usize, String)> = works
                .iter()
                .enumerate()
                .filter(|(_, w)| {
                    w.needs_link() && matches!(w.update.stages.image_processing, Some(StageStatus::Finished))
                })
                .filter_map(|(k, w)| w.record.image_id.clone().map(|i| (k, i)))
                .collect();
            if !jobs.is_empty() {
                if Instant::now() >= deadline {
                    out.cut_off = true;
                } else {
                    let refs: Vec<(&TrackingRecord, String)> =
                        jobs.iter().map(|(k, i)| (&works[*k].record, i.clone())).collect();
                    let results = link_many(p, tok, &refs).await;
                    drop(refs);
                    for ((k, _), res) in jobs.iter().zip(results) {
                        let w = &mut works[*k];
                        match res {
                            Ok((entries, report)) => {
                                w.links = links_of(&entries, &report);
                                apply_links(&mut w.record, &report);
                                out.linked_feed += 1;
                            }
                            Err(e) => {
                                warn!(upload_id = %w.record.upload_id, error = %e, "linking failed; retried next run");
                                out.errors
                                    .push(format!("upload {}: linking: {e}", w.record.upload_id));
                            }
                        }
                    }
                }
            }
        }
        if let Ok(mut run) = linked_in_run.lock() {
            for w in &works {
                if !w.links.is_empty() {
                    run.extend(w.record.sequence_ids.iter().cloned());
                }
            }
        }
    }

    out.timings.link_ms = ms(t);

    // 3. Write what changed: links, then records, in batches (the run holds the lease).
    let mut jobs: Vec<WriteJob> = Vec::new();
    for w in works {
        let Work {
            mut record,
            old,
            update,
            links,
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
        record.history.extend(update.transitions.iter().cloned());
        record.next_check_at = match &record.tracked.state {
            OverallState::Stale { .. } => Some(now + p.tunables.policy.stale_poll_every),
            s if s.is_final() => None,
            _ => Some(now + p.tunables.policy.poll_every),
        };
        jobs.push(WriteJob {
            record,
            links,
            transitions: update.transitions,
        });
    }
    if jobs.is_empty() {
        return out;
    }
    if Instant::now() >= deadline {
        out.cut_off = true;
        return out;
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
    let written = p
        .tracking
        .put_tracking_batch(&records, &links, all_final.then_some(user_id))
        .await;
    out.timings.write_ms = ms(t);
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
    out
}

/// The link path label, for printing.
pub fn path_label(p: Option<LinkPath>) -> &'static str {
    match p {
        Some(LinkPath::ActivityFeed) => "activity feed",
        Some(LinkPath::CoverageTiles) => "coverage tiles",
        None => "-",
    }
}
