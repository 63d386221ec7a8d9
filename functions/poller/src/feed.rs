//! The activity feed, the main path for status ("Plan B" in the seed write-up): one walk of a
//! user's feed per run, newest first, page by page, stopping as soon as every pending cluster was
//! seen (guarded by [`FeedWalk`]: page limit, repeated or missing cursors). Its outcome also says
//! whether the feed is usable at all — when it is not, the user's uploads are linked by coverage
//! tiles instead (see `linking::by_tiles`).

use std::collections::HashMap;

use secrecy::SecretString;
use shared::domain::tracking::{FeedWalk, WalkEnd, WalkLimits, WalkStep};
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::error::MapillaryError;
use shared::mapillary::feed::ActivityNode;
use shared::mapillary::session::{SessionError, TokenSession};
use tracing::{debug, warn};

use crate::deps::Deps;

/// What the feed walk produced.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedOutcome {
    /// The feed answered; `nodes` are the pending clusters seen (by cluster id).
    Walked {
        /// The user's Mapillary id.
        mapillary_user_id: String,
        /// Nodes of pending clusters.
        nodes: HashMap<String, ActivityNode>,
        /// With a horizon: every node created at or after it (reconciliation candidates).
        recent: Vec<ActivityNode>,
        /// Pages fetched.
        pages: u32,
        /// Why the walk ended.
        end: WalkEnd,
    },
    /// The feed cannot be used (GraphQL error, changed shape, unknown document, auth a refresh
    /// does not cure): link by coverage tiles.
    Unusable(String),
    /// A transient failure (rate limit, 5xx, network): nothing learned, try next run.
    Skipped(String),
}

/// Whether a feed failure means "the feed path is broken" rather than "try again later".
fn unusable(e: &MapillaryError) -> bool {
    match e {
        MapillaryError::Feed(_) | MapillaryError::BadReply { .. } | MapillaryError::Unauthorized { .. } => {
            true
        }
        // "Please reduce the amount of data" (HTTP 500, code 1) will not go away by itself.
        MapillaryError::Server { message, .. } => message.starts_with("Please reduce"),
        MapillaryError::Api { status, .. } => (400..500).contains(status),
        _ => false,
    }
}

/// Walk the feed for `clusters`, back to `horizon` (creation second) when given. `hint`: the
/// user's Mapillary id if known (else `/me` is asked). `graphql_token` overrides the user's token
/// for the feed calls (a client token cannot be refreshed: a 401 with it makes the feed unusable).
pub async fn walk<D: Deps>(
    d: &D,
    tok: &mut TokenSession<'_, D::Tokens, MapillaryApp>,
    graphql_token: Option<&SecretString>,
    hint: Option<String>,
    clusters: &[String],
    horizon: Option<i64>,
) -> FeedOutcome {
    let mapillary_user_id = match tok.mapillary_user_id(hint).await {
        Ok(id) => id,
        Err(SessionError::Mapillary(e)) if e.is_retriable() => return FeedOutcome::Skipped(e.to_string()),
        Err(e) => return FeedOutcome::Skipped(format!("Mapillary user id unknown: {e}")),
    };
    let tunables = d.tunables();
    let limits = WalkLimits {
        max_pages: tunables.feed_max_pages,
    };
    let mut walk = FeedWalk::new(clusters.iter().cloned(), limits);
    if let Some(h) = horizon {
        walk = walk.with_horizon(h);
    }
    let mut nodes = HashMap::new();
    let mut recent = Vec::new();
    loop {
        let after = match walk.step() {
            WalkStep::Done(end) => {
                let end = end.clone();
                if end.is_anomaly() {
                    warn!(?end, "feed walk ended abnormally");
                }
                if !matches!(end, WalkEnd::AllSeen) {
                    debug!(
                        unseen = walk.unseen().len(),
                        ?end,
                        "not every pending cluster is in the feed"
                    );
                }
                if matches!(
                    end,
                    WalkEnd::UserNotFound | WalkEnd::RepeatedCursor { .. } | WalkEnd::MissingCursor
                ) {
                    return FeedOutcome::Unusable(format!("feed walk ended abnormally: {end:?}"));
                }
                return FeedOutcome::Walked {
                    mapillary_user_id,
                    nodes,
                    recent,
                    pages: walk.pages(),
                    end,
                };
            }
            WalkStep::Fetch { after } => after.clone(),
        };
        let page = loop {
            let token = graphql_token.unwrap_or(tok.access());
            match d
                .mapillary()
                .feed_page(
                    token,
                    &mapillary_user_id,
                    tunables.feed_page_size,
                    after.as_deref(),
                    tunables.hide_after_days,
                )
                .await
            {
                Ok(page) => break page,
                Err(e) if e.is_unauthorized() && graphql_token.is_none() => {
                    match tok.on_unauthorized().await {
                        Ok(true) => continue,
                        Ok(false) => return FeedOutcome::Unusable(format!("feed: {e} (after a refresh)")),
                        Err(SessionError::Mapillary(r)) if r.is_retriable() => {
                            return FeedOutcome::Skipped(r.to_string())
                        }
                        Err(r) => return FeedOutcome::Unusable(format!("feed: {e}; refresh failed: {r}")),
                    }
                }
                Err(e) if unusable(&e) => return FeedOutcome::Unusable(format!("feed: {e}")),
                Err(e) => return FeedOutcome::Skipped(format!("feed: {e}")),
            }
        };
        for n in &page.nodes {
            if walk.is_pending(&n.cluster_id) {
                nodes.insert(n.cluster_id.clone(), n.clone());
            }
            if horizon.is_some_and(|h| n.created_at_seconds.is_some_and(|c| c >= h)) {
                recent.push(n.clone());
            }
        }
        walk.on_page(&page);
    }
}
