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

/// Runtime switches; all can be changed through `POST /_sim/config`.
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
    /// Refresh revokes the token it was given (else the old token stays valid until expiry).
    pub refresh_revokes_old: bool,
    /// Include a separate `refresh_token` field in token replies.
    pub refresh_token_field: bool,
    /// Whether OAuth-issued tokens are accepted by rupload and `finish_upload`.
    pub oauth_tokens_can_upload: bool,
    /// Token policy of the GraphQL endpoint.
    pub graphql_policy: GraphqlPolicy,
    /// Whether entity reads (`/graph/{id}`, `image_ids`, `images`) also accept client tokens.
    pub entities_accept_client_token: bool,
    /// On a connection dropped mid-body, keep the received prefix (else roll back to the POST's offset).
    pub keep_prefix_on_drop: bool,
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
    fn default() -> Self {
        Self {
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
            computed_offset_m: 1.5,
            thumb_lifetime_seconds: 3600,
            new_sequences_window_days: 30,
            new_sequences_max: 100,
            feed_default_first: 50,
            feed_max_first: 200,
            connect_user_id: crate::defaults::DEMO_USER_ID.to_string(),
            allow_loopback_redirects: true,
            empty_tile_ok: false,
        }
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
    /// Frozen clock at the default instant, in-memory storage (the usual test setup).
    pub fn frozen() -> Self {
        Self::default()
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
