//! Step 1 of a user's turn: the status of every due upload. The user's activity feed is walked
//! once ([`read_feed`]); then, per upload and without I/O ([`statuses`]), a FINISH_UNCERTAIN
//! upload may adopt its cluster from the feed (or fail after the reconcile window), and the feed
//! node — or, without one, the clock — moves the upload's stages and state.

use std::collections::{HashMap, HashSet};

use shared::domain::tracking::{
    adopt_cluster, apply_node, check_deadlines, reconcile_failed, FeedErrorClass, FeedSource, FeedState,
    OverallState, Transition, Update,
};
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::feed::ActivityNode;
use shared::mapillary::session::TokenSession;
use shared::model::{ImageLink, TrackingRecord};
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::deps::Deps;
use crate::feed::{self, FeedOutcome};
use crate::reconcile::CREATED_SLACK_S;
use crate::report::UserReport;

/// What the user's feed walk tells the status step.
#[derive(Debug, Default)]
pub(crate) struct FeedView {
    /// Nodes of the pending clusters seen, by cluster id.
    pub nodes: HashMap<String, ActivityNode>,
    /// Reconciliation candidates (nodes created since the earliest open FINISH_UNCERTAIN window).
    pub recent: Vec<ActivityNode>,
    /// The user's Mapillary id, when the feed was walked.
    pub mapillary_user_id: Option<String>,
    /// Where this run got the user's status from, and why an earlier source was not used; `None`
    /// when the run learned nothing about the feed (no token, a transient failure).
    pub state: Option<(FeedSource, Option<FeedErrorClass>)>,
}

/// One upload during a user's turn: the record as loaded, as it will be written, and its links.
#[derive(Debug)]
pub(crate) struct UploadTurn {
    /// As it will be written.
    pub record: TrackingRecord,
    /// As loaded.
    pub old: TrackingRecord,
    /// What the status step found.
    pub update: Update,
    /// Links found in this run (stored before the record).
    pub links: Vec<ImageLink>,
    /// A FINISH_UNCERTAIN upload whose `finish_upload` the feed proved to have created nothing:
    /// finish it again (see `user::refinish`).
    pub refinish: bool,
}

impl UploadTurn {
    /// Not linked yet, and not failed (a failed upload has nothing to link).
    pub fn needs_link(&self) -> bool {
        self.record.linked_via.is_none() && !matches!(self.update.state, OverallState::Failed { .. })
    }
}

/// Read the user's feed (without a token session: not at all; see [`feed::read`] for the order of
/// tokens). Records `feed_ok`, `feed_source`, `feed_unusable` and the counts on `out`.
pub(crate) async fn read_feed<D: Deps>(
    d: &D,
    session: Option<&mut TokenSession<'_, D::Tokens, MapillaryApp>>,
    records: &[TrackingRecord],
    out: &mut UserReport,
) -> FeedView {
    // FINISH_UNCERTAIN uploads: walk the feed back to the earliest moment their cluster can have
    // been created, and keep every node since then as a candidate.
    let horizon = records
        .iter()
        .filter_map(|r| r.tracked.reconcile.as_ref().filter(|c| c.is_open()))
        .map(|c| c.created_from_s)
        .min();
    let outcome = match session {
        Some(tok) => {
            let clusters: Vec<String> = records
                .iter()
                .filter(|r| !r.tracked.is_reconciling())
                .map(|r| r.tracked.cluster_id.clone())
                .collect();
            let hint = records.iter().find_map(|r| r.mapillary_user_id.clone());
            feed::read(d, tok, hint, &clusters, horizon).await
        }
        None => FeedOutcome::Skipped("no token".into()),
    };
    match outcome {
        FeedOutcome::Walked {
            source,
            web_app_refused,
            mapillary_user_id,
            nodes,
            recent,
            skipped_nodes,
            graphql_errors,
            ..
        } => {
            out.feed_ok = true;
            out.feed_source = Some(source);
            out.feed_skipped_nodes = skipped_nodes;
            out.feed_graphql_errors = graphql_errors;
            let class = web_app_refused.map(|e| {
                out.feed_error = Some((FeedErrorClass::Refused, format!("web-app token refused: {e}")));
                FeedErrorClass::Refused
            });
            FeedView {
                nodes,
                recent,
                mapillary_user_id: Some(mapillary_user_id),
                state: Some((source, class)),
            }
        }
        FeedOutcome::Unusable { class, error } => {
            warn!(error = %error, class = class.as_str(),
                "activity feed unusable for this user: linking by coverage tiles");
            out.feed_source = Some(FeedSource::CoverageTiles);
            out.feed_error = Some((class, error.clone()));
            out.feed_unusable = Some(error);
            FeedView {
                state: Some((FeedSource::CoverageTiles, Some(class))),
                ..FeedView::default()
            }
        }
        FeedOutcome::Skipped(e) => {
            info!(reason = %e, "feed not read this run");
            FeedView::default()
        }
    }
}

/// The status of every record at `now`, from the feed's nodes and the clock. Only a feed walked to
/// the horizon (`out.feed_ok`) can say "no such cluster" to a FINISH_UNCERTAIN upload.
pub(crate) fn statuses<D: Deps>(
    d: &D,
    records: Vec<TrackingRecord>,
    feed: &mut FeedView,
    now: OffsetDateTime,
    out: &mut UserReport,
) -> Vec<UploadTurn> {
    let policy = &d.tunables().policy;
    let mut taken_clusters: HashSet<String> = records
        .iter()
        .filter(|r| !r.tracked.is_reconciling())
        .map(|r| r.tracked.cluster_id.clone())
        .collect();
    let window = time::Duration::try_from(d.tunables().reconcile_window).unwrap_or(time::Duration::DAY);
    let refinish_after =
        time::Duration::try_from(d.tunables().refinish_after).unwrap_or(time::Duration::MINUTE * 15);
    let mut turns: Vec<UploadTurn> = Vec::with_capacity(records.len());
    for mut record in records {
        out.checked += 1;
        let old = record.clone();
        if let Some((source, error_class)) = feed.state {
            let state = FeedState {
                source,
                error_class,
                since: now,
            };
            if !record.tracked.feed.as_ref().is_some_and(|f| f.same_as(&state)) {
                record.tracked.feed = Some(state);
            }
        }
        let mut adopted: Option<Transition> = None;
        let mut forced: Option<Update> = None;
        let mut refinish = false;
        if let (Some(rc), true) = (record.tracked.reconcile.clone(), record.tracked.is_reconciling()) {
            if out.feed_ok {
                match rc.pick(&feed.recent, &taken_clusters) {
                    Ok(Some(node)) => {
                        info!(upload_id = %record.upload_id, cluster_id = %node.cluster_id,
                            "FINISH_UNCERTAIN: cluster found in the activity feed; adopted");
                        adopted = Some(adopt_cluster(&mut record.tracked, &node.cluster_id, now));
                        taken_clusters.insert(node.cluster_id.clone());
                        feed.nodes.insert(node.cluster_id.clone(), node.clone());
                    }
                    // The feed, read back to the call, holds no cluster for it long after the
                    // call ended: the call created nothing. Finish again (before giving up: this
                    // is proof, not a guess).
                    Ok(None) if rc.refinish_due(now, CREATED_SLACK_S, refinish_after) => {
                        info!(upload_id = %record.upload_id, refinishes = rc.refinishes,
                            "FINISH_UNCERTAIN: the feed shows no cluster for finish_upload: finishing again");
                        refinish = true;
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
        let mut update: Update = match (forced, feed.nodes.get(&record.tracked.cluster_id)) {
            (Some(u), _) => u,
            (None, Some(node)) => match apply_node(&record.tracked, node, now, policy) {
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
                    check_deadlines(&record.tracked, now, policy)
                }
            },
            (None, None) => check_deadlines(&record.tracked, now, policy),
        };
        if let Some(t) = adopted {
            update.transitions.insert(0, t);
            update.changed = true;
        }
        turns.push(UploadTurn {
            record,
            old,
            update,
            links: Vec::new(),
            refinish,
        });
    }
    turns
}
