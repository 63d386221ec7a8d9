//! Typed configuration, read once from the environment at cold start (same names as the template's
//! `RELAY_*` / `MAPILLARY_*` globals plus the poller's tunables). A missing or malformed variable
//! fails the start. Built on [`shared::config`] (the Mapillary app and the tables every function
//! reads), plus the clusters queue, the activity-feed token and the tunables with their ranges.

use std::time::Duration;

use shared::config::{ClientSecretSource, ConfigError, Env, MapillaryConfig, Tables};
use shared::domain::linking::Tolerances;
use shared::domain::tracking::{TrackingPolicy, WalkLimits};

/// The variable holding the web-app client token itself (local runs).
pub const FEED_TOKEN_VAR: &str = "MAPILLARY_FEED_TOKEN";
/// The variable holding the Secrets Manager ARN of the web-app client token (deployed).
pub const FEED_TOKEN_ARN_VAR: &str = "MAPILLARY_FEED_TOKEN_SECRET_ARN";

/// Tunables of a run (all have defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct Tunables {
    /// `RELAY_POLL_BUDGET_S` (240; the function's timeout is 300): a run starts no new work after it.
    pub budget: Duration,
    /// `RELAY_FEED_PAGE_SIZE` (50, the web app's `first`).
    pub feed_page_size: u32,
    /// `RELAY_FEED_MAX_PAGES` (40): pages of one user's feed walk at most.
    pub feed_max_pages: u32,
    /// `RELAY_FEED_HIDE_AFTER_DAYS` (14, the web app's `hide_after`).
    pub hide_after_days: u32,
    /// `RELAY_USER_CONCURRENCY` (8): users worked on in parallel.
    pub user_concurrency: usize,
    /// `RELAY_INTAKE_MAX_MESSAGES` (1000): clusters-queue messages taken per run at most.
    pub intake_max_messages: usize,
    /// `RELAY_STALE_AFTER_H` (72), `RELAY_HARD_STOP_DAYS` (14), `RELAY_STALE_POLL_H` (6),
    /// `RELAY_POLL_EVERY_S` (0).
    pub policy: TrackingPolicy,
    /// `RELAY_TOKEN_REFRESH_MARGIN_S` (3600): refresh a user token expiring within this.
    pub token_refresh_margin: Duration,
    /// `RELAY_LINK_TIME_TOLERANCE_MS` (1000), `RELAY_LINK_DISTANCE_M` (5).
    pub tolerances: Tolerances,
    /// `RELAY_TILE_MARGIN_M` (30): Plan A asks for the z14 tiles within this of our images.
    pub tile_margin_m: f64,
    /// `RELAY_ENTITY_BATCH` (50): image ids per `images?image_ids=` request.
    pub entity_batch: usize,
    /// `RELAY_UPLOAD_CONCURRENCY` (8): one user's uploads read and written in parallel.
    pub upload_concurrency: usize,
    /// `RELAY_RECONCILE_WINDOW_H` (24; `RELAY_RECONCILE_WINDOW_S`, seconds, takes precedence): a FINISH_UNCERTAIN upload whose cluster has not shown up in
    /// the activity feed this long after zip-and-push gave up on `finish_upload`'s reply is FAILED.
    pub reconcile_window: Duration,
    /// `RELAY_REFINISH_AFTER_S` (900): a FINISH_UNCERTAIN upload whose cluster the user's activity
    /// feed — read successfully back to the `finish_upload` call — has not shown this long after the
    /// call is finished again (the call provably created nothing; feed nodes appear at ingestion).
    pub refinish_after: Duration,
    /// `RELAY_FINISH_TIMEOUT_S` (60): longest wait for the reply of such a second `finish_upload`
    /// (no reply in time: the outcome is unknown again, a fresh window).
    pub finish_timeout: Duration,
    /// `RELAY_RUN_LEASE_SLACK_S` (60): how long the run lease outlives the run's deadline (covers the
    /// function's stop margin). A killed run blocks tracking for its budget plus this.
    pub run_lease_slack: Duration,
    /// `RELAY_RECONCILE_SCAN_EVERY_S` (900): how often the uploads table is scanned for new
    /// FINISH_UNCERTAIN uploads (0: every run).
    pub reconcile_scan_every: Duration,
    /// `RELAY_STUCK_AFTER_SECONDS` (7200, at least 900): an unfinished upload whose sequence was
    /// not touched for this long and whose manifest claim no invocation holds is settled by the
    /// sweep (`crate::sweep`). Longer than zip-and-push's longest run with its retries.
    pub stuck_after: Duration,
}

impl Default for Tunables {
    fn default() -> Self {
        Self {
            budget: Duration::from_secs(240),
            feed_page_size: 50,
            feed_max_pages: WalkLimits::default().max_pages,
            hide_after_days: 14,
            user_concurrency: 8,
            intake_max_messages: 1000,
            policy: TrackingPolicy::default(),
            token_refresh_margin: Duration::from_secs(3600),
            tolerances: Tolerances::default(),
            tile_margin_m: 30.0,
            entity_batch: 50,
            upload_concurrency: 8,
            reconcile_window: Duration::from_secs(24 * 3600),
            reconcile_scan_every: Duration::from_secs(900),
            refinish_after: Duration::from_secs(900),
            finish_timeout: Duration::from_secs(60),
            run_lease_slack: Duration::from_secs(60),
            stuck_after: Duration::from_secs(7200),
        }
    }
}

/// Everything the poller reads from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// `RELAY_CLUSTERS_QUEUE_URL`.
    pub clusters_queue_url: String,
    /// The tables and the token key.
    pub tables: Tables,
    /// `RELAY_IDEMPOTENCY_TABLE`: zip-and-push's manifest claims (read by the sweep).
    pub idempotency_table: String,
    /// The Mapillary app (endpoints, client id, client secret).
    pub mapillary: MapillaryConfig,
    /// The web-app client token the activity feed is called with first: `MAPILLARY_FEED_TOKEN`
    /// (plain, local runs) or `MAPILLARY_FEED_TOKEN_SECRET_ARN` (Secrets Manager, resolved by
    /// `compose`). Unset: the feed is called with each user's own token only.
    pub feed_token: Option<ClientSecretSource>,
    /// `RELAY_EVENT_BUS`: the EventBridge bus status-change events are published on (name or
    /// ARN). Unset: no events are written or published.
    pub event_bus: Option<String>,
    /// `RELAY_WEBHOOK_*`: webhook delivery (SSRF policy, failure limit, backoff).
    pub webhooks: shared::webhook::WebhookPolicy,
    /// Tunables.
    pub tunables: Tunables,
}

impl Config {
    /// Read the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Read variables through `get` (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env::new(get);
        let mapillary = env.mapillary()?;
        // The feed's token order is fixed now (web-app token, then the user's): a leftover setting of
        // the old switch would silently mean something else, so it stops the start instead. (Its
        // companion `MAPILLARY_CLIENT_TOKEN` is simply not read: it is also mapillary_tools' own
        // variable and may well be set in a developer's shell.)
        if env.optional("RELAY_GRAPHQL_TOKEN").is_some() {
            return Err(ConfigError::invalid(
                "RELAY_GRAPHQL_TOKEN",
                format!(
                    "no longer read: the activity feed is called with the web-app token ({FEED_TOKEN_VAR} \
                     or {FEED_TOKEN_ARN_VAR}), then with the user's own token"
                ),
            ));
        }
        let feed_token = env.optional_secret(FEED_TOKEN_VAR, FEED_TOKEN_ARN_VAR);
        let d = Tunables::default();
        let hours = |h: u64| time::Duration::seconds(h.saturating_mul(3600).min(i64::MAX as u64) as i64);
        let policy = TrackingPolicy {
            stale_after: hours(env.parse_or("RELAY_STALE_AFTER_H", 72u64)?),
            hard_stop_after: hours(env.parse_or("RELAY_HARD_STOP_DAYS", 14u64)?.saturating_mul(24)),
            poll_every: time::Duration::seconds(env.parse_or("RELAY_POLL_EVERY_S", 0i64)?),
            stale_poll_every: hours(env.parse_or("RELAY_STALE_POLL_H", 6u64)?),
        };
        if policy.hard_stop_after < policy.stale_after {
            return Err(ConfigError::invalid(
                "RELAY_HARD_STOP_DAYS",
                "the hard stop must not come before the stale limit",
            ));
        }
        let tunables = Tunables {
            budget: Duration::from_secs(env.parse_or("RELAY_POLL_BUDGET_S", 240u64)?),
            feed_page_size: env.parse_or("RELAY_FEED_PAGE_SIZE", d.feed_page_size)?,
            feed_max_pages: env.parse_or("RELAY_FEED_MAX_PAGES", d.feed_max_pages)?,
            hide_after_days: env.parse_or("RELAY_FEED_HIDE_AFTER_DAYS", d.hide_after_days)?,
            user_concurrency: env.parse_or("RELAY_USER_CONCURRENCY", d.user_concurrency)?,
            intake_max_messages: env.parse_or("RELAY_INTAKE_MAX_MESSAGES", d.intake_max_messages)?,
            policy,
            token_refresh_margin: Duration::from_secs(env.parse_or("RELAY_TOKEN_REFRESH_MARGIN_S", 3600u64)?),
            tolerances: Tolerances {
                captured_at_ms: env.parse_or("RELAY_LINK_TIME_TOLERANCE_MS", d.tolerances.captured_at_ms)?,
                distance_m: env.parse_or("RELAY_LINK_DISTANCE_M", d.tolerances.distance_m)?,
                altitude_m: None,
            },
            tile_margin_m: env.parse_or("RELAY_TILE_MARGIN_M", d.tile_margin_m)?,
            entity_batch: env.parse_or("RELAY_ENTITY_BATCH", d.entity_batch)?,
            upload_concurrency: env.parse_or("RELAY_UPLOAD_CONCURRENCY", d.upload_concurrency)?,
            reconcile_window: match env.optional("RELAY_RECONCILE_WINDOW_S") {
                Some(_) => Duration::from_secs(env.parse_or("RELAY_RECONCILE_WINDOW_S", 86_400u64)?),
                None => Duration::from_secs(
                    env.parse_or("RELAY_RECONCILE_WINDOW_H", 24u64)?
                        .saturating_mul(3600),
                ),
            },
            reconcile_scan_every: Duration::from_secs(env.parse_or("RELAY_RECONCILE_SCAN_EVERY_S", 900u64)?),
            refinish_after: Duration::from_secs(env.parse_or("RELAY_REFINISH_AFTER_S", 900u64)?),
            finish_timeout: Duration::from_secs(env.parse_or("RELAY_FINISH_TIMEOUT_S", 60u64)?),
            run_lease_slack: Duration::from_secs(env.parse_or("RELAY_RUN_LEASE_SLACK_S", 60u64)?),
            stuck_after: Duration::from_secs(env.parse_or("RELAY_STUCK_AFTER_SECONDS", 7200u64)?),
        };
        for (name, ok) in [
            (
                "RELAY_FEED_PAGE_SIZE",
                (1..=200).contains(&tunables.feed_page_size),
            ),
            ("RELAY_FEED_MAX_PAGES", tunables.feed_max_pages >= 1),
            ("RELAY_USER_CONCURRENCY", tunables.user_concurrency >= 1),
            ("RELAY_UPLOAD_CONCURRENCY", tunables.upload_concurrency >= 1),
            ("RELAY_ENTITY_BATCH", (1..=2000).contains(&tunables.entity_batch)),
            // Bounded so that `now + window` and `now + slack` never overflow a timestamp.
            (
                "RELAY_RECONCILE_WINDOW_S",
                tunables.reconcile_window.as_secs() <= 3650 * 86_400,
            ),
            (
                "RELAY_REFINISH_AFTER_S",
                tunables.refinish_after.as_secs() <= 3650 * 86_400,
            ),
            (
                "RELAY_FINISH_TIMEOUT_S",
                (1..=900).contains(&tunables.finish_timeout.as_secs()),
            ),
            (
                "RELAY_RUN_LEASE_SLACK_S",
                tunables.run_lease_slack.as_secs() <= 3600,
            ),
            (
                "RELAY_STUCK_AFTER_SECONDS",
                (900..=30 * 24 * 3600).contains(&tunables.stuck_after.as_secs()),
            ),
        ] {
            if !ok {
                return Err(ConfigError::invalid(name, "out of range"));
            }
        }
        Ok(Config {
            clusters_queue_url: env.required("RELAY_CLUSTERS_QUEUE_URL")?,
            event_bus: env.optional("RELAY_EVENT_BUS").filter(|b| !b.is_empty()),
            webhooks: env.webhook_policy()?,
            tables: env.tables()?,
            idempotency_table: env.required("RELAY_IDEMPOTENCY_TABLE")?,
            mapillary,
            feed_token,
            tunables,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn base() -> HashMap<&'static str, String> {
        let mut env = shared::fakes::common_env();
        env.extend([("RELAY_CLUSTERS_QUEUE_URL", "http://q/clusters")].map(|(k, v)| (k, v.to_string())));
        env
    }

    #[test]
    fn when_all_required_set_should_load_with_defaults() {
        let env = base();
        let c = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert_eq!(c.mapillary.endpoints.graph, "http://127.0.0.1:1/graph");
        assert_eq!(c.tunables, Tunables::default());
        assert_eq!(c.tunables.policy.stale_after, time::Duration::hours(72));
        assert_eq!(c.tunables.policy.hard_stop_after, time::Duration::days(14));
    }

    #[test]
    fn when_tunables_set_should_use_them() {
        let mut env = base();
        env.insert("RELAY_STALE_AFTER_H", "1".into());
        env.insert("RELAY_HARD_STOP_DAYS", "2".into());
        env.insert("RELAY_FEED_PAGE_SIZE", "200".into());
        env.insert("RELAY_STUCK_AFTER_SECONDS", "3600".into());
        let c = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert_eq!(c.tunables.stuck_after, Duration::from_secs(3600));
        assert_eq!(c.idempotency_table, "idem");
        assert_eq!(c.tunables.policy.stale_after, time::Duration::hours(1));
        assert_eq!(c.tunables.policy.hard_stop_after, time::Duration::days(2));
        assert_eq!(c.tunables.feed_page_size, 200);
    }

    #[test]
    fn when_reconcile_and_lease_seconds_set_should_use_them_and_the_seconds_window_wins() {
        let mut env = base();
        env.insert("RELAY_RECONCILE_WINDOW_H", "2".into());
        let c = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert_eq!(c.tunables.reconcile_window, Duration::from_secs(7200));
        assert_eq!(c.tunables.refinish_after, Duration::from_secs(900));
        assert_eq!(c.tunables.run_lease_slack, Duration::from_secs(60));
        env.insert("RELAY_RECONCILE_WINDOW_S", "45".into());
        env.insert("RELAY_REFINISH_AFTER_S", "6".into());
        env.insert("RELAY_RUN_LEASE_SLACK_S", "5".into());
        env.insert("RELAY_FINISH_TIMEOUT_S", "10".into());
        let c = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert_eq!(c.tunables.reconcile_window, Duration::from_secs(45));
        assert_eq!(c.tunables.refinish_after, Duration::from_secs(6));
        assert_eq!(c.tunables.run_lease_slack, Duration::from_secs(5));
        assert_eq!(c.tunables.finish_timeout, Duration::from_secs(10));
        for (k, v) in [
            ("RELAY_RUN_LEASE_SLACK_S", "3601"),
            ("RELAY_FINISH_TIMEOUT_S", "0"),
            ("RELAY_RECONCILE_WINDOW_S", "999999999999"),
        ] {
            let mut bad = env.clone();
            bad.insert(k, v.into());
            assert!(Config::from_lookup(|x| bad.get(x).cloned()).is_err(), "{k}={v}");
        }
    }

    #[test]
    fn when_feed_token_is_plain_or_an_arn_should_read_it_and_prefer_the_plain_value() {
        use secrecy::ExposeSecret;
        let mut env = base();
        assert!(Config::from_lookup(|k| env.get(k).cloned())
            .unwrap()
            .feed_token
            .is_none());
        env.insert(
            FEED_TOKEN_ARN_VAR,
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:feed".into(),
        );
        let c = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert!(
            matches!(c.feed_token, Some(ClientSecretSource::SecretArn(a)) if a.ends_with(":secret:feed"))
        );
        env.insert(FEED_TOKEN_VAR, "MLY|27|web".into());
        let c = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert!(
            matches!(c.feed_token, Some(ClientSecretSource::Plain(t)) if t.expose_secret() == "MLY|27|web")
        );
        // The template passes an empty ARN when no feed token is configured.
        let mut env = base();
        env.insert(FEED_TOKEN_ARN_VAR, String::new());
        assert!(Config::from_lookup(|k| env.get(k).cloned())
            .unwrap()
            .feed_token
            .is_none());
    }

    #[test]
    fn when_the_retired_graphql_switch_is_set_should_fail_naming_the_replacement() {
        let mut env = base();
        env.insert("RELAY_GRAPHQL_TOKEN", "client".into());
        match Config::from_lookup(|x| env.get(x).cloned()).unwrap_err() {
            ConfigError::Invalid { name, reason } => {
                assert_eq!(name, "RELAY_GRAPHQL_TOKEN");
                assert!(reason.contains(FEED_TOKEN_VAR), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // mapillary_tools' own variable is not the feed token (nor an error).
        let mut env = base();
        env.insert("MAPILLARY_CLIENT_TOKEN", "MLY|1|x".into());
        assert!(Config::from_lookup(|x| env.get(x).cloned())
            .unwrap()
            .feed_token
            .is_none());
    }

    #[test]
    fn when_values_malformed_or_out_of_range_should_fail() {
        for (k, v) in [
            ("RELAY_FEED_PAGE_SIZE", "0"),
            ("RELAY_FEED_PAGE_SIZE", "fifty"),
            ("RELAY_USER_CONCURRENCY", "0"),
            ("RELAY_STALE_AFTER_H", "-3"),
            ("RELAY_STUCK_AFTER_SECONDS", "60"),
        ] {
            let mut env = base();
            env.insert(k, v.into());
            assert!(Config::from_lookup(|x| env.get(x).cloned()).is_err(), "{k}={v}");
        }
        let mut env = base();
        env.remove("RELAY_UPLOADS_TABLE");
        assert_eq!(
            Config::from_lookup(|k| env.get(k).cloned()).unwrap_err(),
            ConfigError::Missing("RELAY_UPLOADS_TABLE")
        );
    }
}
