//! One scheduled run: intake, then every user with pending uploads (bounded concurrency), then the
//! feed health record. The run starts no new work after its budget; each record write is one
//! conditional PutItem, so whatever a cut-off run did not reach is simply picked up next time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use futures::StreamExt;
use secrecy::SecretString;
use shared::domain::linking::{ImageOutcome, LinkPath, LinkReport, OurImage};
use shared::domain::tracking::{
    adopt_cluster, apply_node, check_deadlines, is_due, reconcile_failed, OverallState, Transition, Update,
};
use shared::mapillary::feed::{ActivityNode, StageStatus, Stages};
use shared::model::{FeedHealth, ImageLink, TrackingRecord, UploadImage};
use shared::ports::{RepoError, TokenStore, TrackingRepository, UploadRepository};
use tracing::{info, info_span, warn, Instrument};

use crate::api::MapillaryApi;
use crate::clock::Clock;
use crate::config::{GraphqlToken, Tunables};
use crate::inbox::ClusterInbox;
use crate::intake::{intake, IntakeReport};
use crate::plana::{find_by_tiles, TileCache};
use crate::planb::{link_many, walk_feed, FeedOutcome};
use crate::reconcile::{discover_uncertain, TrackingExtra};
use crate::tokens::UserToken;

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
    pub api: MapillaryApi,
    /// `MAPILLARY_CLIENT_TOKEN`, for `RELAY_GRAPHQL_TOKEN=client`.
    pub client_token: Option<SecretString>,
    /// Tunables.
    pub tunables: Tunables,
    /// "Now".
    pub clock: Clock,
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
    /// Every transition written, with the upload id.
    pub transitions: Vec<(String, Transition)>,
    /// Problems (each also logged).
    pub errors: Vec<String>,
}

impl RunReport {
    fn merge(&mut self, o: UserOutcome) {
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
}

/// One run. `deadline` is when the run must have stopped starting new work (the Lambda deadline
/// minus a margin, or `now + budget`, whichever is earlier).
pub async fn run_once<R, U, T, Q>(p: &Poller<R, U, T, Q>, deadline: Instant) -> RunReport
where
    R: TrackingRepository + TrackingExtra,
    U: UploadRepository,
    T: TokenStore,
    Q: ClusterInbox,
{
    let deadline = deadline.min(Instant::now() + p.tunables.budget);
    let mut report = RunReport {
        intake: intake(p, deadline).await,
        ..RunReport::default()
    };
    report.reconcile = discover_uncertain(p, deadline).await;
    let pending = match p.tracking.list_pending_tracking().await {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "listing pending uploads failed");
            report.errors.push(format!("listing pending uploads: {e}"));
            return report;
        }
    };
    let now = p.clock.now();
    let mut by_user: BTreeMap<String, Vec<TrackingRecord>> = BTreeMap::new();
    for r in pending {
        if is_due(&r.tracked, now, &p.tunables.policy) {
            by_user.entry(r.user_id.clone()).or_default().push(r);
        }
    }
    report.users = by_user.len();
    let linked_in_run: Mutex<HashSet<String>> = Mutex::new(HashSet::new());
    let linked_in_run = &linked_in_run;
    let outcomes: Vec<UserOutcome> = futures::stream::iter(by_user)
        .map(|(user, records)| {
            let span = info_span!("user", user_id = %user);
            async move { track_user(p, &user, records, deadline, linked_in_run).await }.instrument(span)
        })
        .buffer_unordered(p.tunables.user_concurrency)
        .collect()
        .await;
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
        "poller run done"
    );
    report
}

/// Degraded as soon as one user's feed was unusable; healthy again once a run used the feed
/// without any such failure. Written only when something changed.
async fn update_health<R, U, T, Q>(
    p: &Poller<R, U, T, Q>,
    unusable: Option<String>,
    any_ok: bool,
) -> Result<(), RepoError>
where
    R: TrackingRepository,
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
pub async fn our_images<U: UploadRepository>(
    uploads: &U,
    upload_id: &str,
) -> Result<(Vec<UploadImage>, Vec<OurImage>), RepoError> {
    let entries = uploads.list_images(upload_id).await?;
    let ours = entries
        .iter()
        .map(|e| OurImage {
            key: e.key.clone(),
            lat: e.lat,
            lon: e.lon,
            altitude: e.altitude,
            captured_at_ms: i64::try_from(e.captured_at.unix_timestamp_nanos() / 1_000_000)
                .unwrap_or(i64::MAX),
            heading: e.heading,
        })
        .collect();
    Ok((entries, ours))
}

fn links_of(entries: &[UploadImage], report: &LinkReport) -> Vec<ImageLink> {
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
    expected: Option<time::OffsetDateTime>,
    links: Vec<ImageLink>,
    transitions: Vec<Transition>,
}

async fn track_user<R, U, T, Q>(
    p: &Poller<R, U, T, Q>,
    user_id: &str,
    records: Vec<TrackingRecord>,
    deadline: Instant,
    linked_in_run: &Mutex<HashSet<String>>,
) -> UserOutcome
where
    R: TrackingRepository + TrackingExtra,
    U: UploadRepository,
    T: TokenStore,
    Q: ClusterInbox,
{
    let mut out = UserOutcome::default();
    if Instant::now() >= deadline {
        out.cut_off = true;
        return out;
    }
    let mut token = match UserToken::load(p, user_id).await {
        Ok(t) => Some(t),
        Err(e) => {
            warn!(error = %e, "no usable token: only the deadlines are checked");
            out.errors.push(format!("user {user_id}: {e}"));
            None
        }
    };
    // FINISH_UNCERTAIN uploads: walk the feed back to the earliest moment their cluster can have
    // been created, and keep every node since then as a candidate.
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
            for w in works.iter_mut().filter(|w| w.needs_link()) {
                if Instant::now() >= deadline {
                    out.cut_off = true;
                    break;
                }
                if let Ok(run) = linked_in_run.lock() {
                    taken.extend(run.iter().cloned());
                }
                // Plan A: the upload shows in coverage tiles only once all four stages finished.
                match find_by_tiles(p, tok, &w.record, &mut tiles, &taken).await {
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

    // 3. Write what changed (bounded concurrency; each write is one conditional PutItem).
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
            expected: old.tracked.last_checked_at,
            links,
            transitions: update.transitions,
        });
    }
    let written: Vec<WriteOutcome> = futures::stream::iter(jobs)
        .map(|job| write_one(p, job, deadline))
        .buffer_unordered(p.tunables.upload_concurrency.max(1))
        .collect()
        .await;
    for w in written {
        match w {
            WriteOutcome::Written(upload_id, transitions) => {
                out.written += 1;
                out.transitions
                    .extend(transitions.into_iter().map(|t| (upload_id.clone(), t)));
            }
            WriteOutcome::Lost => {}
            WriteOutcome::CutOff => out.cut_off = true,
            WriteOutcome::Failed(e) => out.errors.push(e),
        }
    }
    out
}

enum WriteOutcome {
    Written(String, Vec<Transition>),
    /// Another run updated the record first.
    Lost,
    CutOff,
    Failed(String),
}

async fn write_one<R, U, T, Q>(p: &Poller<R, U, T, Q>, job: WriteJob, deadline: Instant) -> WriteOutcome
where
    R: TrackingRepository,
{
    if Instant::now() >= deadline {
        return WriteOutcome::CutOff;
    }
    let WriteJob {
        record,
        expected,
        links,
        transitions,
    } = job;
    if !links.is_empty() {
        if let Err(e) = p.tracking.put_links(&links).await {
            warn!(upload_id = %record.upload_id, error = %e, "storing links failed");
            return WriteOutcome::Failed(format!("upload {}: links: {e}", record.upload_id));
        }
    }
    match p.tracking.update_tracking(&record, expected).await {
        Ok(()) => {
            for t in &transitions {
                info!(upload_id = %record.upload_id, field = %t.field, from = t.from.as_deref().unwrap_or("-"),
                    to = t.to.as_deref().unwrap_or("-"), "transition");
            }
            WriteOutcome::Written(record.upload_id, transitions)
        }
        Err(RepoError::ConditionFailed(m)) => {
            info!(upload_id = %record.upload_id, reason = %m, "another run updated the record first");
            WriteOutcome::Lost
        }
        Err(e) => {
            warn!(upload_id = %record.upload_id, error = %e, "writing the tracking record failed");
            WriteOutcome::Failed(format!("upload {}: {e}", record.upload_id))
        }
    }
}

/// The link path label, for printing.
pub fn path_label(p: Option<LinkPath>) -> &'static str {
    match p {
        Some(LinkPath::ActivityFeed) => "activity feed",
        Some(LinkPath::CoverageTiles) => "coverage tiles",
        None => "-",
    }
}
