//! The activity feed, the main path for status ("Plan B" in the seed write-up): one walk of a
//! user's feed per run, newest first, page by page, stopping as soon as every pending cluster was
//! seen (guarded by [`FeedWalk`]: page limit, repeated or missing cursors). Its outcome also says
//! whether the feed is usable for this user — when it is not, the user's uploads are linked by
//! coverage tiles instead (see `linking::by_tiles`).
//!
//! Which token, per user and in this order ([`read`]):
//! 1. the web-app client token, when configured (the seed found that the feed answers only the
//!    Mapillary web app's own token);
//! 2. the user's own token;
//! 3. neither: coverage tiles ("Plan A") for this user.
//!
//! Only a refusal (an auth error) moves on to the next token. A refusal never refreshes the user's
//! token: the token is fine, the feed just does not take it (other calls still refresh on their own
//! 401). A feed that is gone (unknown document) or unreadable is so for every token, so the walk
//! stops there. One user's outcome never decides another's.

use std::collections::HashMap;

use secrecy::SecretString;
use shared::domain::tracking::{FeedErrorClass, FeedSource, FeedWalk, WalkEnd, WalkLimits, WalkStep};
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::error::MapillaryError;
use shared::mapillary::feed::{ActivityNode, FeedError};
use shared::mapillary::session::{SessionError, TokenSession};
use tracing::{debug, info, warn};

use crate::deps::Deps;

/// What reading a user's feed produced.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedOutcome {
    /// The feed answered; `nodes` are the pending clusters seen (by cluster id).
    Walked {
        /// Which token read it.
        source: FeedSource,
        /// Set when the web-app token was refused before the user's token worked.
        web_app_refused: Option<String>,
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
        /// Nodes the pages held that could not be read (skipped; the rest was used).
        skipped_nodes: u32,
        /// GraphQL errors that came beside usable data.
        graphql_errors: u32,
    },
    /// The feed cannot be used for this user (every token refused, document gone, unreadable
    /// reply): link by coverage tiles.
    Unusable {
        /// What kind of failure.
        class: FeedErrorClass,
        /// The failure (internal detail, logged and kept in the health summary).
        error: String,
    },
    /// A transient failure (rate limit, 5xx, network): nothing learned, try next run.
    Skipped(String),
}

/// One walk with one token.
enum Attempt {
    Walked {
        nodes: HashMap<String, ActivityNode>,
        recent: Vec<ActivityNode>,
        pages: u32,
        end: WalkEnd,
        skipped_nodes: u32,
        graphql_errors: u32,
    },
    Refused(String),
    Unusable(FeedErrorClass, String),
    Skipped(String),
}

/// What a feed failure means: refused (try the next token), unusable (with its class), or `None`
/// for "try again later".
fn classify(e: &MapillaryError) -> Option<FeedErrorClass> {
    if e.is_unauthorized() {
        return Some(FeedErrorClass::Refused);
    }
    match e {
        MapillaryError::Feed(FeedError::Gone(_)) => Some(FeedErrorClass::Gone),
        MapillaryError::Feed(_) | MapillaryError::BadReply { .. } => Some(FeedErrorClass::Unusable),
        // "Please reduce the amount of data" (HTTP 500, code 1) will not go away by itself.
        MapillaryError::Server { message, .. } if message.starts_with("Please reduce") => {
            Some(FeedErrorClass::Unusable)
        }
        MapillaryError::Api { status, .. } if (400..500).contains(status) => Some(FeedErrorClass::Unusable),
        _ => None,
    }
}

/// Read the user's feed for `clusters`, back to `horizon` (creation second) when given, with the
/// web-app token if configured, then the user's own token. `hint`: the user's Mapillary id if
/// known (else `/me` is asked with the user's token).
pub async fn read<D: Deps>(
    d: &D,
    tok: &mut TokenSession<'_, D::Tokens, MapillaryApp>,
    hint: Option<String>,
    clusters: &[String],
    horizon: Option<i64>,
) -> FeedOutcome {
    let mapillary_user_id = match tok.mapillary_user_id(hint).await {
        Ok(id) => id,
        Err(SessionError::Mapillary(e)) if e.is_retriable() => return FeedOutcome::Skipped(e.to_string()),
        Err(e) => return FeedOutcome::Skipped(format!("Mapillary user id unknown: {e}")),
    };
    let mut web_app_refused = None;
    if let Some(web) = d.feed_token() {
        match walk(d, web, &mapillary_user_id, clusters, horizon).await {
            Attempt::Refused(e) => {
                info!(error = %e, "the activity feed refused the web-app token: trying the user's own token");
                web_app_refused = Some(e);
            }
            other => return outcome(other, FeedSource::WebAppToken, None, mapillary_user_id),
        }
    }
    let user_token = tok.access().clone();
    match walk(d, &user_token, &mapillary_user_id, clusters, horizon).await {
        Attempt::Refused(e) => {
            let error = match &web_app_refused {
                Some(w) => format!("feed refused the web-app token ({w}) and the user's token ({e})"),
                None => format!("feed refused the user's token ({e}); no web-app token is configured"),
            };
            FeedOutcome::Unusable {
                class: FeedErrorClass::Refused,
                error,
            }
        }
        other => outcome(other, FeedSource::UserToken, web_app_refused, mapillary_user_id),
    }
}

fn outcome(
    attempt: Attempt,
    source: FeedSource,
    web_app_refused: Option<String>,
    mapillary_user_id: String,
) -> FeedOutcome {
    match attempt {
        Attempt::Walked {
            nodes,
            recent,
            pages,
            end,
            skipped_nodes,
            graphql_errors,
        } => FeedOutcome::Walked {
            source,
            web_app_refused,
            mapillary_user_id,
            nodes,
            recent,
            pages,
            end,
            skipped_nodes,
            graphql_errors,
        },
        Attempt::Refused(e) => FeedOutcome::Unusable {
            class: FeedErrorClass::Refused,
            error: e,
        },
        Attempt::Unusable(class, error) => FeedOutcome::Unusable { class, error },
        Attempt::Skipped(e) => FeedOutcome::Skipped(e),
    }
}

/// One walk of the feed with `token`. An auth error is a refusal, never a refresh.
async fn walk<D: Deps>(
    d: &D,
    token: &SecretString,
    mapillary_user_id: &str,
    clusters: &[String],
    horizon: Option<i64>,
) -> Attempt {
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
    let (mut skipped_nodes, mut graphql_errors) = (0u32, 0u32);
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
                    return Attempt::Unusable(
                        FeedErrorClass::Unusable,
                        format!("feed walk ended abnormally: {end:?}"),
                    );
                }
                if skipped_nodes > 0 || graphql_errors > 0 {
                    warn!(
                        skipped_nodes,
                        graphql_errors, "feed pages held unreadable nodes or errors; the rest was used"
                    );
                }
                return Attempt::Walked {
                    nodes,
                    recent,
                    pages: walk.pages(),
                    end,
                    skipped_nodes,
                    graphql_errors,
                };
            }
            WalkStep::Fetch { after } => after.clone(),
        };
        let page = match d
            .mapillary()
            .feed_page(
                token,
                mapillary_user_id,
                tunables.feed_page_size,
                after.as_deref(),
                tunables.hide_after_days,
            )
            .await
        {
            Ok(page) => page,
            Err(e) => {
                return match classify(&e) {
                    Some(FeedErrorClass::Refused) => Attempt::Refused(e.to_string()),
                    Some(class) => Attempt::Unusable(class, format!("feed: {e}")),
                    None => Attempt::Skipped(format!("feed: {e}")),
                }
            }
        };
        skipped_nodes = skipped_nodes.saturating_add(page.skipped_nodes);
        let errors = u32::try_from(page.errors.len()).unwrap_or(u32::MAX);
        graphql_errors = graphql_errors.saturating_add(errors);
        for e in &page.errors {
            debug!(error = %e, "GraphQL error beside usable feed data");
        }
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
