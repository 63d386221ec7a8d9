//! Tracking an upload through Mapillary's four stages (issue 4, items 2, 3 and 6), and planning
//! the walk through a user's activity feed. Pure: the poller loads a [`TrackedUpload`], feeds in
//! what it saw and the current time, and writes back the [`Update`] when it says `changed`.
//!
//! Overall state, derived from the stages, `error_code` and age:
//! * `FINISHED`: every stage `FINISHED`.
//! * `FAILED`: a stage `FAILED` (with its `error_code`, if any), or still not finished
//!   [`TrackingPolicy::hard_stop_after`] after `finish_upload`. An `error_code` other than `UNSET`
//!   is recorded but fails an upload only together with a failed stage: Mapillary documents no
//!   codes, and a drifted feed may send one beside stages still running.
//! * `STALE`: not finished [`TrackingPolicy::stale_after`] after `finish_upload` (checked at
//!   the slower [`TrackingPolicy::stale_poll_every`]).
//! * `IN_PROGRESS`: anything else, including stage values never seen before (kept verbatim).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::mapillary::feed::{ActivityNode, ActivityPage, StageStatus, Stages};

/// The `error_code` that means "no error".
pub const NO_ERROR: &str = "UNSET";

/// Timing rules. Every field is configurable; [`Default`] gives the values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackingPolicy {
    /// Not FINISHED this long after `finish_upload` → STALE (default 72 h).
    pub stale_after: Duration,
    /// Not FINISHED this long after `finish_upload` → FAILED, polling stops (default 14 days).
    pub hard_stop_after: Duration,
    /// Minimum time between two checks of an IN_PROGRESS upload (default 0: every run).
    pub poll_every: Duration,
    /// Minimum time between two checks of a STALE upload (default 6 h).
    pub stale_poll_every: Duration,
}

impl Default for TrackingPolicy {
    fn default() -> Self {
        Self {
            stale_after: Duration::hours(72),
            hard_stop_after: Duration::days(14),
            poll_every: Duration::ZERO,
            stale_poll_every: Duration::hours(6),
        }
    }
}

/// Overall state of a tracked upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OverallState {
    InProgress,
    Finished,
    /// Not finished in time; still checked, at a slower rate.
    Stale {
        reason: String,
    },
    /// Final. `stage` is the wire name of the failed (or first unfinished) stage.
    Failed {
        error_code: Option<String>,
        stage: Option<String>,
        reason: String,
    },
}

impl OverallState {
    /// Wire name: `IN_PROGRESS`, `FINISHED`, `STALE`, `FAILED`.
    pub fn as_str(&self) -> &'static str {
        match self {
            OverallState::InProgress => "IN_PROGRESS",
            OverallState::Finished => "FINISHED",
            OverallState::Stale { .. } => "STALE",
            OverallState::Failed { .. } => "FAILED",
        }
    }

    /// No more polling.
    pub fn is_final(&self) -> bool {
        matches!(self, OverallState::Finished | OverallState::Failed { .. })
    }
}

/// One recorded change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Wire name: `status`, `initial_processing_status`, `anonymization_status`, `tiler_status`,
    /// `error_code`, or `state` (the overall state).
    pub field: String,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// What the poller keeps about one upload between runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackedUpload {
    pub cluster_id: String,
    /// When `finish_upload` returned the cluster.
    #[serde(with = "time::serde::rfc3339")]
    pub finished_upload_at: OffsetDateTime,
    pub stages: Stages,
    pub error_code: Option<String>,
    pub state: OverallState,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub last_checked_at: Option<OffsetDateTime>,
    /// Set for a FINISH_UNCERTAIN upload: `cluster_id` is empty until the cluster was found in the
    /// activity feed (then the reconciliation stays as a record of how it was found).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile: Option<Reconcile>,
    /// How the last run read the owner's status (the user's feed state, kept on each of the user's
    /// uploads the run looked at); `None` until a run read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feed: Option<FeedState>,
}

/// Where a run got a user's upload status from, in the order the poller tries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FeedSource {
    /// The activity feed, called with the configured web-app client token.
    WebAppToken,
    /// The activity feed, called with the user's own token.
    UserToken,
    /// Coverage tiles ("Plan A"): the feed could not be used for this user.
    CoverageTiles,
}

impl FeedSource {
    /// The wire name (`WEB_APP_TOKEN`, `USER_TOKEN`, `COVERAGE_TILES`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WebAppToken => "WEB_APP_TOKEN",
            Self::UserToken => "USER_TOKEN",
            Self::CoverageTiles => "COVERAGE_TILES",
        }
    }
}

/// Why the activity feed could not be used with a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FeedErrorClass {
    /// The feed refused the token (an auth error). Never a reason to refresh the token: the feed
    /// may accept only the web app's own token.
    Refused,
    /// The feed's GraphQL document is unknown to the server (a removed persisted query): the feed
    /// is unavailable for every token.
    Gone,
    /// The feed answered something unusable: a GraphQL error without data, a reply in a shape that
    /// cannot be read, a looping or unknown-user walk.
    Unusable,
}

impl FeedErrorClass {
    /// The wire name (`REFUSED`, `GONE`, `UNUSABLE`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "REFUSED",
            Self::Gone => "GONE",
            Self::Unusable => "UNUSABLE",
        }
    }
}

/// A user's activity-feed state as a run found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedState {
    /// Where the status came from.
    pub source: FeedSource,
    /// Why an earlier source in the order was not used (e.g. the web-app token was refused and the
    /// user's token worked, or why coverage tiles are used); `None` when the first source tried
    /// worked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<FeedErrorClass>,
    /// Since when the user is on this source with this error class.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

impl FeedState {
    /// Same source and error class (`since` aside): nothing to write.
    pub fn same_as(&self, other: &FeedState) -> bool {
        self.source == other.source && self.error_class == other.error_class
    }
}

/// What identifies the cluster of an upload whose `finish_upload` reply was lost (zip-and-push's
/// FINISH_UNCERTAIN). A feed node matches when it was created in the window in which
/// `finish_upload` ran, starts at our first capture second and holds no more images than we sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconcile {
    /// The earliest `created_at_seconds` the cluster can have (the upload started, minus slack).
    pub created_from_s: i64,
    /// The latest `created_at_seconds` it can have (zip-and-push gave up on the reply, plus slack).
    pub created_until_s: i64,
    /// Our first image's capture time, epoch seconds (the node's `captured_at_seconds`).
    pub first_captured_at_s: i64,
    /// Images in our zip (the node's `item_count` cannot be larger).
    pub image_count: u32,
    /// Give up (FAILED) when no cluster was found by then.
    #[serde(with = "time::serde::rfc3339")]
    pub give_up_at: OffsetDateTime,
    /// When the cluster was found and adopted.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub adopted_at: Option<OffsetDateTime>,
    /// How often the poller called `finish_upload` again after the activity feed proved that the
    /// previous call created nothing (each call moves `created_until_s` and `give_up_at`: a fresh
    /// window).
    #[serde(default)]
    pub refinishes: u32,
}

impl Reconcile {
    /// Whether the upload still waits for its cluster.
    pub fn is_open(&self) -> bool {
        self.adopted_at.is_none()
    }

    /// Whether `node` can be this upload's cluster (created in the window, same first capture
    /// second ±1, `item_count` — once known — not above ours).
    pub fn matches(&self, node: &ActivityNode) -> bool {
        let created = node
            .created_at_seconds
            .is_some_and(|c| (self.created_from_s..=self.created_until_s).contains(&c));
        let captured = node
            .captured_at_seconds
            // abs_diff: a reply's i64 can be anything; `c - first` could overflow.
            .is_some_and(|c| c.abs_diff(self.first_captured_at_s) <= 1);
        let count = node
            .item_count
            .is_none_or(|n| n > 0 && n <= i64::from(self.image_count));
        created && captured && count
    }

    /// Whether the activity feed, read at `now` back to `created_from_s` without a matching node,
    /// proves that the last `finish_upload` call (it ended by `created_until_s - slack_s`) created
    /// nothing: `after` has passed since it ended (feed nodes appear at ingestion).
    pub fn refinish_due(&self, now: OffsetDateTime, slack_s: i64, after: Duration) -> bool {
        self.is_open()
            && now.unix_timestamp()
                >= self
                    .created_until_s
                    .saturating_sub(slack_s)
                    .saturating_add(after.whole_seconds())
    }

    /// The single node among `candidates` that matches, leaving out clusters in `taken`
    /// (tracked by other uploads). `Err(n)`: `n` (≥ 2) nodes match, none is adopted.
    pub fn pick<'a>(
        &self,
        candidates: impl IntoIterator<Item = &'a ActivityNode>,
        taken: &HashSet<String>,
    ) -> Result<Option<&'a ActivityNode>, usize> {
        let hits: Vec<&ActivityNode> = candidates
            .into_iter()
            .filter(|n| !taken.contains(&n.cluster_id) && self.matches(n))
            .collect();
        match hits.len() {
            0 => Ok(None),
            1 => Ok(hits.first().copied()),
            n => Err(n),
        }
    }
}

/// The update that records an adopted cluster id (`cluster_id` transition) on a reconciled upload.
pub fn adopt_cluster(upload: &mut TrackedUpload, cluster_id: &str, now: OffsetDateTime) -> Transition {
    upload.cluster_id = cluster_id.to_string();
    if let Some(r) = upload.reconcile.as_mut() {
        r.adopted_at = Some(now);
    }
    Transition {
        at: now,
        field: "cluster_id".into(),
        from: None,
        to: Some(cluster_id.to_string()),
    }
}

/// FAILED for a FINISH_UNCERTAIN upload whose cluster never showed up in the activity feed.
pub fn reconcile_failed(
    upload: &TrackedUpload,
    now: OffsetDateTime,
    window: Duration,
    ambiguous: Option<usize>,
) -> Update {
    let reason = match ambiguous {
        Some(n) => format!(
            "finish_upload's reply was lost and {n} clusters in the activity feed match the upload: \
             none could be adopted safely within {}",
            human(window)
        ),
        None => format!(
            "finish_upload's reply was lost and no matching cluster appeared in the activity feed within {}: \
             Mapillary did not create one; upload the sequence again",
            human(window)
        ),
    };
    let state = OverallState::Failed {
        error_code: None,
        stage: None,
        reason,
    };
    Update {
        changed: true,
        stages: upload.stages.clone(),
        error_code: upload.error_code.clone(),
        transitions: vec![Transition {
            at: now,
            field: "state".into(),
            from: Some(upload.state.as_str().to_string()),
            to: Some(state.as_str().to_string()),
        }],
        state,
    }
}

impl TrackedUpload {
    /// A newly handed-off upload: nothing seen yet.
    pub fn new(cluster_id: impl Into<String>, finished_upload_at: OffsetDateTime) -> Self {
        Self {
            cluster_id: cluster_id.into(),
            finished_upload_at,
            stages: Stages {
                ingestion: None,
                image_processing: None,
                map_data: None,
                map_update: None,
            },
            error_code: None,
            state: OverallState::InProgress,
            last_checked_at: None,
            reconcile: None,
            feed: None,
        }
    }

    /// Waiting for the cluster of a FINISH_UNCERTAIN upload (no cluster id yet).
    pub fn is_reconciling(&self) -> bool {
        self.reconcile.as_ref().is_some_and(Reconcile::is_open)
    }

    /// Copy an update's values in (`last_checked_at` is the caller's business).
    pub fn apply(&mut self, update: &Update) {
        self.stages = update.stages.clone();
        self.error_code = update.error_code.clone();
        self.state = update.state.clone();
    }
}

/// The outcome of looking at an upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// Something differs from the tracked upload (write it, conditionally).
    pub changed: bool,
    pub stages: Stages,
    pub error_code: Option<String>,
    pub state: OverallState,
    /// The changes, in stage order, then `error_code`, then `state`.
    pub transitions: Vec<Transition>,
}

/// Why an update was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackingError {
    #[error("feed node is for cluster {node}, not the tracked cluster {tracked}")]
    WrongCluster { tracked: String, node: String },
}

const STAGE_FIELDS: [&str; 4] = [
    "status",
    "initial_processing_status",
    "anonymization_status",
    "tiler_status",
];
const STAGE_LABELS: [&str; 4] = [
    "Image ingestion",
    "Image processing",
    "Map data processing",
    "Map update",
];

fn stage_values(s: &Stages) -> [Option<&StageStatus>; 4] {
    [
        s.ingestion.as_ref(),
        s.image_processing.as_ref(),
        s.map_data.as_ref(),
        s.map_update.as_ref(),
    ]
}

/// Apply what the feed says about the upload. A field the node lacks keeps its tracked value
/// (a field that vanished from the reply is not a regression).
pub fn apply_node(
    upload: &TrackedUpload,
    node: &ActivityNode,
    now: OffsetDateTime,
    policy: &TrackingPolicy,
) -> Result<Update, TrackingError> {
    if node.cluster_id != upload.cluster_id {
        return Err(TrackingError::WrongCluster {
            tracked: upload.cluster_id.clone(),
            node: node.cluster_id.clone(),
        });
    }
    let keep = |new: &Option<StageStatus>, old: &Option<StageStatus>| new.clone().or(old.clone());
    let stages = Stages {
        ingestion: keep(&node.stages.ingestion, &upload.stages.ingestion),
        image_processing: keep(&node.stages.image_processing, &upload.stages.image_processing),
        map_data: keep(&node.stages.map_data, &upload.stages.map_data),
        map_update: keep(&node.stages.map_update, &upload.stages.map_update),
    };
    let error_code = node.error_code.clone().or(upload.error_code.clone());
    Ok(evaluate(upload, stages, error_code, now, policy))
}

/// Re-derive the state from the clock alone (STALE, then FAILED at the hard stop). Call it for
/// every non-final upload each run, whether or not the feed showed it.
pub fn check_deadlines(upload: &TrackedUpload, now: OffsetDateTime, policy: &TrackingPolicy) -> Update {
    evaluate(
        upload,
        upload.stages.clone(),
        upload.error_code.clone(),
        now,
        policy,
    )
}

/// Whether the upload should be looked up in this run.
pub fn is_due(upload: &TrackedUpload, now: OffsetDateTime, policy: &TrackingPolicy) -> bool {
    let every = match upload.state {
        OverallState::Finished | OverallState::Failed { .. } => return false,
        OverallState::InProgress => policy.poll_every,
        OverallState::Stale { .. } => policy.stale_poll_every,
    };
    match upload.last_checked_at {
        None => true,
        Some(last) => now - last >= every,
    }
}

fn evaluate(
    upload: &TrackedUpload,
    stages: Stages,
    error_code: Option<String>,
    now: OffsetDateTime,
    policy: &TrackingPolicy,
) -> Update {
    let state = derive_state(upload, &stages, error_code.as_deref(), now, policy);
    let mut transitions = Vec::new();
    let mut record = |field: &str, from: Option<&str>, to: Option<&str>| {
        if from != to {
            transitions.push(Transition {
                at: now,
                field: field.to_string(),
                from: from.map(str::to_string),
                to: to.map(str::to_string),
            });
        }
    };
    let old = stage_values(&upload.stages);
    let new = stage_values(&stages);
    for k in 0..4 {
        record(
            STAGE_FIELDS[k],
            old[k].map(StageStatus::as_str),
            new[k].map(StageStatus::as_str),
        );
    }
    record("error_code", upload.error_code.as_deref(), error_code.as_deref());
    record("state", Some(upload.state.as_str()), Some(state.as_str()));
    // A reason change (e.g. STALE's wording) without a state change is still a change to store.
    let changed = !transitions.is_empty() || state != upload.state;
    Update {
        changed,
        stages,
        error_code,
        state,
        transitions,
    }
}

fn derive_state(
    upload: &TrackedUpload,
    stages: &Stages,
    error_code: Option<&str>,
    now: OffsetDateTime,
    policy: &TrackingPolicy,
) -> OverallState {
    if stages.all_finished() {
        return OverallState::Finished;
    }
    let values = stage_values(stages);
    let first_unfinished = values
        .iter()
        .position(|v| !matches!(v, Some(StageStatus::Finished)));
    let error = error_code.filter(|e| *e != NO_ERROR && !e.is_empty());
    if let Some(k) = values.iter().position(|v| matches!(v, Some(StageStatus::Failed))) {
        return OverallState::Failed {
            error_code: error.map(str::to_string),
            stage: Some(STAGE_FIELDS[k].to_string()),
            reason: format!(
                "Mapillary reports {} FAILED (error_code {})",
                STAGE_LABELS[k],
                error.unwrap_or(NO_ERROR)
            ),
        };
    }
    let age = now - upload.finished_upload_at;
    let pending = describe_unfinished(stages);
    if age >= policy.hard_stop_after {
        return OverallState::Failed {
            error_code: None,
            stage: first_unfinished.map(|k| STAGE_FIELDS[k].to_string()),
            reason: format!(
                "gave up: not FINISHED {} after finish_upload ({pending})",
                human(policy.hard_stop_after)
            ),
        };
    }
    if age >= policy.stale_after {
        return OverallState::Stale {
            reason: format!(
                "not FINISHED {} after finish_upload ({pending})",
                human(policy.stale_after)
            ),
        };
    }
    OverallState::InProgress
}

fn describe_unfinished(stages: &Stages) -> String {
    let parts: Vec<String> = stage_values(stages)
        .iter()
        .zip(STAGE_LABELS)
        .filter(|(v, _)| !matches!(v, Some(StageStatus::Finished)))
        .map(|(v, label)| format!("{label}: {}", v.map(StageStatus::as_str).unwrap_or("not seen")))
        .collect();
    parts.join(", ")
}

fn human(d: Duration) -> String {
    if d.whole_hours() >= 7 * 24 && d.whole_hours() % 24 == 0 {
        format!("{} days", d.whole_days())
    } else if d.whole_minutes() % 60 == 0 {
        format!("{} h", d.whole_hours())
    } else {
        format!("{} min", d.whole_minutes())
    }
}

/// Bounds of one feed walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalkLimits {
    /// Pages fetched at most (default 40: 2,000 uploads at 50 per page).
    pub max_pages: u32,
}

impl Default for WalkLimits {
    fn default() -> Self {
        Self { max_pages: 40 }
    }
}

/// Why a feed walk ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "end", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WalkEnd {
    /// Every pending cluster was seen (the normal early stop).
    AllSeen,
    /// The feed has no more pages.
    EndOfFeed,
    /// Mapillary does not know the user (`fetch__User: null`).
    UserNotFound,
    /// The feed handed back a cursor it had given before (it would loop).
    RepeatedCursor { cursor: String },
    /// `has_next_page` without an `end_cursor`.
    MissingCursor,
    /// [`WalkLimits::max_pages`] pages fetched.
    PageLimit { pages: u32 },
}

impl WalkEnd {
    /// The feed misbehaved (counts against its health).
    pub fn is_anomaly(&self) -> bool {
        matches!(
            self,
            WalkEnd::RepeatedCursor { .. } | WalkEnd::MissingCursor | WalkEnd::UserNotFound
        )
    }
}

/// What the poller should do next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WalkStep {
    /// Fetch a page with this `after` (`None`: the first page).
    Fetch { after: Option<String> },
    /// Stop.
    Done(WalkEnd),
}

/// One user's feed walk: fetch pages (newest first) until every pending cluster was seen, with
/// guards against endless or looping feeds. Drive it with [`FeedWalk::step`] and
/// [`FeedWalk::on_page`].
#[derive(Debug, Clone)]
pub struct FeedWalk {
    pending: HashSet<String>,
    seen: HashSet<String>,
    cursors: HashSet<String>,
    pages: u32,
    limits: WalkLimits,
    step: WalkStep,
    horizon: Option<i64>,
    horizon_reached: bool,
}

impl FeedWalk {
    /// A walk looking for `pending` cluster ids. With nothing pending it is done at once.
    pub fn new<I, S>(pending: I, limits: WalkLimits) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let pending: HashSet<String> = pending.into_iter().map(Into::into).collect();
        let step = if pending.is_empty() {
            WalkStep::Done(WalkEnd::AllSeen)
        } else if limits.max_pages == 0 {
            WalkStep::Done(WalkEnd::PageLimit { pages: 0 })
        } else {
            WalkStep::Fetch { after: None }
        };
        Self {
            pending,
            seen: HashSet::new(),
            cursors: HashSet::new(),
            pages: 0,
            limits,
            step,
            horizon: None,
            horizon_reached: false,
        }
    }

    /// Also walk until a node created before `created_before_s` (epoch seconds) was seen, or the
    /// feed ends: used to see every cluster created since then (FINISH_UNCERTAIN reconciliation).
    pub fn with_horizon(mut self, created_before_s: i64) -> Self {
        self.horizon = Some(created_before_s);
        if self.limits.max_pages > 0 && self.pages == 0 {
            self.step = WalkStep::Fetch { after: None };
        }
        self
    }

    /// The next thing to do.
    pub fn step(&self) -> &WalkStep {
        &self.step
    }

    /// Record a fetched page and decide what comes next. Pages after the walk ended are ignored.
    pub fn on_page(&mut self, page: &ActivityPage) -> &WalkStep {
        if matches!(self.step, WalkStep::Done(_)) {
            return &self.step;
        }
        self.pages = self.pages.saturating_add(1);
        for n in &page.nodes {
            if self.pending.contains(&n.cluster_id) {
                self.seen.insert(n.cluster_id.clone());
            }
            if let (Some(h), Some(c)) = (self.horizon, n.created_at_seconds) {
                self.horizon_reached |= c < h;
            }
        }
        let horizon_done = self.horizon.is_none() || self.horizon_reached;
        self.step = WalkStep::Done(if self.seen.len() == self.pending.len() && horizon_done {
            WalkEnd::AllSeen
        } else if !page.user_found {
            WalkEnd::UserNotFound
        } else if !page.has_next_page {
            WalkEnd::EndOfFeed
        } else {
            match page.end_cursor.as_deref().filter(|c| !c.is_empty()) {
                None => WalkEnd::MissingCursor,
                Some(c) if self.cursors.contains(c) => WalkEnd::RepeatedCursor {
                    cursor: c.to_string(),
                },
                Some(_) if self.pages >= self.limits.max_pages => WalkEnd::PageLimit { pages: self.pages },
                Some(c) => {
                    self.cursors.insert(c.to_string());
                    self.step = WalkStep::Fetch {
                        after: Some(c.to_string()),
                    };
                    return &self.step;
                }
            }
        });
        &self.step
    }

    /// Whether a node's cluster is one this walk looks for.
    pub fn is_pending(&self, cluster_id: &str) -> bool {
        self.pending.contains(cluster_id)
    }

    /// Pending clusters not seen (yet), sorted.
    pub fn unseen(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .pending
            .iter()
            .filter(|c| !self.seen.contains(*c))
            .map(String::as_str)
            .collect();
        v.sort_unstable();
        v
    }

    /// Pages recorded so far.
    pub fn pages(&self) -> u32 {
        self.pages
    }
}
