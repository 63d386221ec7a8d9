//! Simulator configuration: clock mode, runtime switches ([`Settings`]) and processing plans.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Default stage durations in seconds, in order `status`, `initial_processing_status`,
/// `anonymization_status`, `tiler_status`.
pub const DEFAULT_STAGE_SECONDS: [u64; 4] = [60, 600, 1800, 3600];

/// 2024-05-01T10:00:00Z, the default frozen start instant (ms since the epoch).
pub const DEFAULT_FROZEN_START_MS: i64 = 1_714_557_600_000;

/// How the simulator clock runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum ClockMode {
    /// Time stands still at `start_ms` and moves only through the admin API (tests).
    Frozen { start_ms: i64 },
    /// Time follows the wall clock; the admin API can still jump it forward (demo).
    RealTime,
}

/// Where rupload bytes are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageMode {
    /// In memory (tests; fine up to a few hundred MiB).
    Memory,
    /// One file per upload key in this directory (bounded memory, e.g. the 2 GiB benchmark).
    Directory(PathBuf),
}

/// Which tokens `/graph/graphql` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GraphqlPolicy {
    /// Any valid user or client token.
    AnyToken,
    /// Only the designated web-app client token ([`crate::defaults::WEB_APP_CLIENT_TOKEN`]).
    WebAppOnly,
}

/// A named world: one reading of everything the sources leave open about the real service, as a preset
/// of the world switches of [`Settings`] (see [`World::apply`] and the table in README.md).
///
/// Every world except [`World::Lenient`] applies the strictness rules (rupload takes only
/// `Authorization: OAuth`, requires `Offset` and an `X-Entity-Name` equal to the key, handles are bound
/// to their uploader, `finish_upload` takes JSON only and checks organization membership, uploads must be
/// mapillary_tools-shaped zips of images carrying a MAP* description) and lets only the web-app client
/// token call the GraphQL documents (the seed letter: the app's own token "was denied").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum World {
    /// The most lenient reading of every unknown (every switch off): the simulator before worlds existed.
    #[serde(rename = "lenient")]
    Lenient,
    /// The seed's world (TV-2022) with the protocol doc's strictest reading: the feed only with the web-app
    /// token; OAuth tokens upload; a dropped POST keeps its prefix; a refresh leaves the old token valid.
    #[serde(rename = "seed-2022")]
    Seed2022,
    /// `seed-2022`, but rupload and `finish_upload` refuse OAuth-app tokens as unauthorised (TV-2023a); only
    /// a user upload token (what `mapillary_tools authenticate` stores, from `POST /graph/login`) uploads.
    #[serde(rename = "oauth-upload-refused")]
    OauthUploadRefused,
    /// `seed-2022`, but a rupload POST that does not complete stores nothing.
    #[serde(rename = "partial-bytes-dropped")]
    PartialBytesDropped,
    /// `seed-2022`, but a refresh revokes the previous access token at once.
    #[serde(rename = "refresh-revokes")]
    RefreshRevokes,
    /// `seed-2022`, and the activity feed answers in a drifted shape ([`Settings::feed_drift`]).
    #[serde(rename = "feed-drift")]
    FeedDrift,
    /// `seed-2022`, but every GraphQL document is unknown ([`Settings::graphql_documents_gone`]).
    #[serde(rename = "feed-gone")]
    FeedGone,
}

/// The world of `Settings::default()`, `SimConfig::default()` and the binary without `--world`.
///
/// The seed's world with the strictest reading of the protocol: the relay's tests and demo run in it unless
/// they pick another world (the relay is adapted to every world, issue 13).
pub const DEFAULT_WORLD: World = World::Seed2022;

/// An unknown world name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown world {given:?}; known worlds: {}", World::names().join(", "))]
pub struct UnknownWorld {
    /// The name that was given.
    pub given: String,
}

impl World {
    /// Every world, lenient first.
    pub const ALL: [World; 7] = [
        World::Lenient,
        World::Seed2022,
        World::OauthUploadRefused,
        World::PartialBytesDropped,
        World::RefreshRevokes,
        World::FeedDrift,
        World::FeedGone,
    ];

    /// The world's name as used by `--world`, `/_sim/world` and in README.md.
    pub fn name(self) -> &'static str {
        match self {
            World::Lenient => "lenient",
            World::Seed2022 => "seed-2022",
            World::OauthUploadRefused => "oauth-upload-refused",
            World::PartialBytesDropped => "partial-bytes-dropped",
            World::RefreshRevokes => "refresh-revokes",
            World::FeedDrift => "feed-drift",
            World::FeedGone => "feed-gone",
        }
    }

    /// Every world's name, in [`World::ALL`] order.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|w| w.name()).collect()
    }

    /// Whether the strictness rules apply (every world but `lenient`).
    pub fn is_strict(self) -> bool {
        self != World::Lenient
    }

    /// Set every world switch of `settings` to this world's value; every other setting (stage durations,
    /// sequence cap, lifetimes, …) is left as it is, so a running demo keeps its clock and plans.
    pub fn apply(self, settings: &mut Settings) {
        let strict = self.is_strict();
        settings.rupload_oauth_header_only = strict;
        settings.rupload_require_offset = strict;
        settings.rupload_require_entity_name = strict;
        settings.handles_bound_to_uploader = strict;
        settings.finish_json_only = strict;
        settings.finish_checks_org_membership = strict;
        settings.require_tools_zip = strict;
        settings.require_map_description = strict;
        settings.graphql_policy = if strict {
            GraphqlPolicy::WebAppOnly
        } else {
            GraphqlPolicy::AnyToken
        };
        settings.oauth_tokens_can_upload = self != World::OauthUploadRefused;
        settings.keep_prefix_on_drop = self != World::PartialBytesDropped;
        settings.refresh_revokes_old = self == World::RefreshRevokes;
        settings.feed_drift = self == World::FeedDrift;
        settings.graphql_documents_gone = self == World::FeedGone;
    }
}

impl std::fmt::Display for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for World {
    type Err = UnknownWorld;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|w| w.name() == s.trim())
            .ok_or_else(|| UnknownWorld { given: s.to_string() })
    }
}

/// Runtime switches; all can be changed through `POST /_sim/config`, the world switches as a preset
/// through `POST /_sim/world`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Processing plan given to clusters when no per-cluster plan is queued.
    pub default_plan: ProcessingPlan,
    /// Server-side images-per-sequence cap (1000 today, 500 per the seed).
    pub sequence_cap: usize,
    /// Lifetime of OAuth-issued and `/login` tokens, seconds of simulator time.
    pub token_lifetime_seconds: i64,
    /// Lifetime of `/connect` authorization codes, seconds.
    pub code_lifetime_seconds: i64,
    /// Refresh revokes the token it was given (else the old token stays valid until expiry). World switch.
    pub refresh_revokes_old: bool,
    /// Include a separate `refresh_token` field in token replies.
    pub refresh_token_field: bool,
    /// Whether OAuth-issued tokens are accepted by rupload and `finish_upload`. World switch.
    pub oauth_tokens_can_upload: bool,
    /// Token policy of the GraphQL endpoint. World switch.
    pub graphql_policy: GraphqlPolicy,
    /// Whether entity reads (`/graph/{id}`, `image_ids`, `images`) also accept client tokens.
    pub entities_accept_client_token: bool,
    /// On a connection dropped mid-body, keep the received prefix (else roll back to the POST's offset).
    /// World switch.
    pub keep_prefix_on_drop: bool,
    /// rupload takes the token only as `Authorization: OAuth <t>` (no `Bearer`, no `access_token=`).
    /// World switch (strictness rule).
    pub rupload_oauth_header_only: bool,
    /// A rupload POST without an `Offset` header is refused (else it counts as offset 0).
    /// World switch (strictness rule).
    pub rupload_require_offset: bool,
    /// A rupload POST needs `X-Entity-Name` equal to the upload key (else a mismatch is only logged).
    /// World switch (strictness rule).
    pub rupload_require_entity_name: bool,
    /// `finish_upload` refuses a handle that another user uploaded. World switch (strictness rule).
    pub handles_bound_to_uploader: bool,
    /// `finish_upload` takes only a JSON body (`Content-Type: application/json`), no form bodies.
    /// World switch (strictness rule).
    pub finish_json_only: bool,
    /// `finish_upload` with `organization_id` requires the caller to be a member of that organization.
    /// World switch (strictness rule).
    pub finish_checks_org_membership: bool,
    /// `finish_upload` of a `zip` refuses archives without mapillary_tools' shape: the
    /// `{"sequence_md5sum":"…"}` comment, entries named `0.jpg`, `1.jpg`, … and dated 1980-01-01 00:00:00.
    /// World switch (strictness rule).
    pub require_tools_zip: bool,
    /// `finish_upload` refuses uploads holding an image without a valid MAP* description in its EXIF
    /// ImageDescription (else such images fall back to raw EXIF). World switch (strictness rule).
    pub require_map_description: bool,
    /// The activity feed answers in a drifted shape: stages not reached yet are `NOT_STARTED` (the next one)
    /// or `null` (the rest), a failed stage is `FAILURE`, `created_at_seconds` is a string, a node without
    /// `cluster_id` sits among the good ones and GraphQL `errors` come beside valid `data`. World switch.
    pub feed_drift: bool,
    /// Every GraphQL document is unknown (a removed persisted query). World switch.
    pub graphql_documents_gone: bool,
    /// Distance in metres between `geometry` and `computed_geometry` (moved due north).
    pub computed_offset_m: f64,
    /// Lifetime of thumbnail URLs, seconds.
    pub thumb_lifetime_seconds: i64,
    /// `getNewSequences`: sequences whose stage 2 finished within this many days count as new.
    pub new_sequences_window_days: i64,
    /// `getNewSequences`: more new sequences than this → "reduce the amount of data" error.
    pub new_sequences_max: usize,
    /// `getLatestActivity` page size when `first` is absent.
    pub feed_default_first: usize,
    /// `getLatestActivity` maximum page size.
    pub feed_max_first: usize,
    /// User id that `/www/connect` consents as (unless `sim_user` is passed).
    pub connect_user_id: String,
    /// Accept any `http://127.0.0.1:*` / `http://localhost:*` redirect URI for every app.
    pub allow_loopback_redirects: bool,
    /// Coverage tiles without data: 200 with an empty MVT (else 403 "tile does not exist", as documented).
    pub empty_tile_ok: bool,
}

impl Default for Settings {
    /// The [`DEFAULT_WORLD`] (`seed-2022`).
    fn default() -> Self {
        Self::for_world(DEFAULT_WORLD)
    }
}

impl Settings {
    /// Every non-world setting at its default, with the world switches of `world`.
    pub fn for_world(world: World) -> Self {
        let mut s = Self {
            default_plan: ProcessingPlan::default(),
            sequence_cap: 1000,
            token_lifetime_seconds: 60 * 24 * 3600,
            code_lifetime_seconds: 600,
            refresh_revokes_old: false,
            refresh_token_field: false,
            oauth_tokens_can_upload: true,
            graphql_policy: GraphqlPolicy::AnyToken,
            entities_accept_client_token: false,
            keep_prefix_on_drop: true,
            rupload_oauth_header_only: false,
            rupload_require_offset: false,
            rupload_require_entity_name: false,
            handles_bound_to_uploader: false,
            finish_json_only: false,
            finish_checks_org_membership: false,
            require_tools_zip: false,
            require_map_description: false,
            feed_drift: false,
            graphql_documents_gone: false,
            computed_offset_m: 1.5,
            thumb_lifetime_seconds: 3600,
            new_sequences_window_days: 30,
            new_sequences_max: 100,
            feed_default_first: 50,
            feed_max_first: 200,
            connect_user_id: crate::defaults::DEMO_USER_ID.to_string(),
            allow_loopback_redirects: true,
            empty_tile_ok: false,
        };
        world.apply(&mut s);
        s
    }

    /// The world whose preset the world switches currently match (`None` after a `/_sim/config` patch that
    /// mixes worlds).
    pub fn world(&self) -> Option<World> {
        World::ALL.into_iter().find(|w| {
            let mut preset = self.clone();
            w.apply(&mut preset);
            preset == *self
        })
    }
}

/// How one cluster is processed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessingPlan {
    /// Duration of each stage in seconds; stages run one after another.
    pub stage_seconds: [u64; 4],
    /// Fail at a stage with an error code.
    pub fail: Option<FailurePlan>,
    /// Stage (1..=4) that never finishes.
    pub stuck_at: Option<u8>,
    /// Value shown by stages that have not started yet (default: `IN_PROGRESS` everywhere, as seen).
    pub not_started_value: Option<String>,
    /// Value of a failed stage.
    pub failed_value: String,
    /// Force the cluster's images into exactly this many sequences (contiguous, capture order).
    pub split_into: Option<usize>,
    /// Feed `timezone` value.
    pub timezone: String,
}

impl Default for ProcessingPlan {
    fn default() -> Self {
        Self {
            stage_seconds: DEFAULT_STAGE_SECONDS,
            fail: None,
            stuck_at: None,
            not_started_value: None,
            failed_value: "FAILED".to_string(),
            split_into: None,
            timezone: "UTC".to_string(),
        }
    }
}

/// Fail at `stage` (1..=4) with `error_code`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailurePlan {
    pub stage: u8,
    pub error_code: String,
}

/// Everything [`crate::Simulator::start`] needs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seed of every id and token generator.
    pub seed: u64,
    pub clock: ClockMode,
    pub settings: Settings,
    pub storage: StorageMode,
    /// Seed the default app, web app, demo user and demo organization ([`crate::defaults`]).
    pub seed_defaults: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            clock: ClockMode::Frozen {
                start_ms: DEFAULT_FROZEN_START_MS,
            },
            settings: Settings::default(),
            storage: StorageMode::Memory,
            seed_defaults: true,
        }
    }
}

impl SimConfig {
    /// Frozen clock at the default instant, in-memory storage (the usual test setup), [`DEFAULT_WORLD`].
    pub fn frozen() -> Self {
        Self::default()
    }

    /// Frozen clock, in-memory storage, in the named world (`SimConfig::world(World::Seed2022)`).
    pub fn world(world: World) -> Self {
        Self::default().with_world(world)
    }

    /// The same configuration with the world switches of `world` (every other setting kept).
    pub fn with_world(mut self, world: World) -> Self {
        world.apply(&mut self.settings);
        self
    }

    /// Real-time clock with the given stage durations (the demo setup).
    pub fn realtime(stage_seconds: [u64; 4]) -> Self {
        let mut cfg = Self {
            clock: ClockMode::RealTime,
            ..Self::default()
        };
        cfg.settings.default_plan.stage_seconds = stage_seconds;
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default is the strict `seed-2022` world (issue 13), everywhere a default is taken.
    #[test]
    fn default_is_seed_2022() {
        let d = Settings::default();
        assert_eq!(DEFAULT_WORLD, World::Seed2022);
        assert_eq!(d, Settings::for_world(World::Seed2022));
        assert_eq!(d.world(), Some(World::Seed2022));
        assert_eq!(SimConfig::default().settings, d);
        assert_eq!(SimConfig::frozen().settings, d);
        assert_eq!(
            SimConfig::realtime([1, 2, 3, 4]).settings.world(),
            Some(World::Seed2022)
        );
    }

    /// `lenient` is exactly the simulator's defaults from before worlds existed, switch by switch.
    #[test]
    fn lenient_keeps_every_pre_world_value() {
        let d = Settings::for_world(World::Lenient);
        assert_eq!(d.world(), Some(World::Lenient));
        assert_eq!(d.default_plan, ProcessingPlan::default());
        assert_eq!(d.sequence_cap, 1000);
        assert_eq!(d.token_lifetime_seconds, 60 * 24 * 3600);
        assert_eq!(d.code_lifetime_seconds, 600);
        assert!(!d.refresh_revokes_old);
        assert!(!d.refresh_token_field);
        assert!(d.oauth_tokens_can_upload);
        assert_eq!(d.graphql_policy, GraphqlPolicy::AnyToken);
        assert!(!d.entities_accept_client_token);
        assert!(d.keep_prefix_on_drop);
        assert_eq!(d.computed_offset_m, 1.5);
        assert_eq!(d.thumb_lifetime_seconds, 3600);
        assert_eq!(d.new_sequences_window_days, 30);
        assert_eq!(d.new_sequences_max, 100);
        assert_eq!(d.feed_default_first, 50);
        assert_eq!(d.feed_max_first, 200);
        assert_eq!(d.connect_user_id, crate::defaults::DEMO_USER_ID);
        assert!(d.allow_loopback_redirects);
        assert!(!d.empty_tile_ok);
        // The switches added with the worlds are all off.
        assert!(!d.rupload_oauth_header_only);
        assert!(!d.rupload_require_offset);
        assert!(!d.rupload_require_entity_name);
        assert!(!d.handles_bound_to_uploader);
        assert!(!d.finish_json_only);
        assert!(!d.finish_checks_org_membership);
        assert!(!d.require_tools_zip);
        assert!(!d.require_map_description);
        assert!(!d.feed_drift);
        assert!(!d.graphql_documents_gone);
        assert_eq!(SimConfig::world(World::Lenient).settings, d);
    }

    #[test]
    fn strict_worlds_turn_every_strictness_rule_on() {
        for w in World::ALL.into_iter().filter(|w| w.is_strict()) {
            let s = Settings::for_world(w);
            let rules = [
                s.rupload_oauth_header_only,
                s.rupload_require_offset,
                s.rupload_require_entity_name,
                s.handles_bound_to_uploader,
                s.finish_json_only,
                s.finish_checks_org_membership,
                s.require_tools_zip,
                s.require_map_description,
            ];
            assert!(rules.iter().all(|r| *r), "{w}");
            assert_eq!(s.graphql_policy, GraphqlPolicy::WebAppOnly, "{w}");
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_the_known_ones() {
        for w in World::ALL {
            assert_eq!(w.name().parse::<World>(), Ok(w));
            assert_eq!(w.to_string(), w.name());
            assert_eq!(serde_json::to_value(w).ok(), Some(serde_json::json!(w.name())));
        }
        let e = "seed2022".parse::<World>().expect_err("unknown");
        assert_eq!(e.to_string().matches(", ").count(), World::ALL.len() - 1);
        assert!(e.to_string().contains("\"seed2022\""), "{e}");
    }

    #[test]
    fn with_world_keeps_every_other_setting() {
        let mut c = SimConfig::realtime([1, 2, 3, 4]);
        c.settings.sequence_cap = 500;
        let c = c.with_world(World::FeedGone);
        assert_eq!(c.settings.default_plan.stage_seconds, [1, 2, 3, 4]);
        assert_eq!(c.settings.sequence_cap, 500);
        assert_eq!(c.settings.world(), Some(World::FeedGone));
        assert_eq!(c.clock, ClockMode::RealTime);
    }
}
