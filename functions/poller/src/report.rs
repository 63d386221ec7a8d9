//! What a run did ([`RunReport`], [`RunTimings`]) and what one user's turn did (`UserReport`,
//! summed into the run's). A leaf of the run: the steps fill it, the run sums it up.

use shared::domain::tracking::{FeedErrorClass, FeedSource, Transition};

use crate::intake::IntakeReport;
use crate::reconcile::DiscoveryReport;
use crate::sweep::SweepReport;

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunReport {
    /// Intake.
    pub intake: IntakeReport,
    /// FINISH_UNCERTAIN uploads taken into tracking.
    pub reconcile: DiscoveryReport,
    /// Uploads stuck before a final state, settled.
    pub sweep: SweepReport,
    /// Status-change events published (from earlier runs' outboxes at the start, this run's at
    /// the end).
    pub events_published: usize,
    /// Webhook deliveries POSTed successfully.
    pub webhooks_delivered: usize,
    /// Webhook deliveries that failed (each backs its user off; see `crate::webhooks`).
    pub webhook_failures: usize,
    /// Users worked on.
    pub users: usize,
    /// Users whose activity feed was unusable (their uploads were linked by coverage tiles).
    pub feed_unusable_users: usize,
    /// Users whose activity feed was read with the web-app token.
    pub feed_web_app_users: usize,
    /// Users whose activity feed was read with their own token.
    pub feed_user_token_users: usize,
    /// Feed nodes that could not be read and were skipped (the rest of their pages was used).
    pub feed_skipped_nodes: u32,
    /// GraphQL errors that came beside usable feed data.
    pub feed_graphql_errors: u32,
    /// Uploads looked at.
    pub checked: usize,
    /// Tracking records written.
    pub written: usize,
    /// Uploads linked in this run through the activity feed.
    pub linked_feed: usize,
    /// Uploads linked through coverage tiles.
    pub linked_tiles: usize,
    /// FINISH_UNCERTAIN uploads finished again (the feed proved the first call created nothing).
    pub refinished: usize,
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

/// What one user's turn did.
#[derive(Debug, Default)]
pub(crate) struct UserReport {
    pub checked: usize,
    pub written: usize,
    pub linked_feed: usize,
    pub linked_tiles: usize,
    pub refinished: usize,
    pub cut_off: bool,
    /// The feed was walked.
    pub feed_ok: bool,
    /// Where the user's status came from (`None`: nothing learned about the feed this run).
    pub feed_source: Option<FeedSource>,
    /// Why the feed was unusable, if it was.
    pub feed_unusable: Option<String>,
    /// The feed error of this turn with its class: why the feed is unusable, or that the web-app
    /// token was refused before the user's token worked.
    pub feed_error: Option<(FeedErrorClass, String)>,
    /// Feed nodes skipped as unreadable.
    pub feed_skipped_nodes: u32,
    /// GraphQL errors beside usable feed data.
    pub feed_graphql_errors: u32,
    pub transitions: Vec<(String, Transition)>,
    pub errors: Vec<String>,
    /// Only the per-user phases (token, feed, link, write) are set.
    pub timings: RunTimings,
}

impl RunReport {
    /// Add one user's turn.
    pub(crate) fn merge(&mut self, o: UserReport) {
        self.timings.token_ms += o.timings.token_ms;
        self.timings.feed_ms += o.timings.feed_ms;
        self.timings.link_ms += o.timings.link_ms;
        self.timings.write_ms += o.timings.write_ms;
        self.checked += o.checked;
        self.written += o.written;
        self.linked_feed += o.linked_feed;
        self.linked_tiles += o.linked_tiles;
        self.refinished += o.refinished;
        self.cut_off |= o.cut_off;
        self.transitions.extend(o.transitions);
        self.errors.extend(o.errors);
        if o.feed_unusable.is_some() {
            self.feed_unusable_users += 1;
        }
        match o.feed_source {
            Some(FeedSource::WebAppToken) => self.feed_web_app_users += 1,
            Some(FeedSource::UserToken) => self.feed_user_token_users += 1,
            Some(FeedSource::CoverageTiles) | None => {}
        }
        self.feed_skipped_nodes = self.feed_skipped_nodes.saturating_add(o.feed_skipped_nodes);
        self.feed_graphql_errors = self.feed_graphql_errors.saturating_add(o.feed_graphql_errors);
    }
}
