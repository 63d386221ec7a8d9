//! Typed configuration, read once from the environment at cold start; a missing or malformed
//! variable fails the start (never a silent default for required values). Built on
//! [`shared::config`] (the Mapillary app and the tables every function reads), plus this function's
//! bucket, queues and pipeline tunables with their ranges.

use std::time::Duration;

use shared::config::{ConfigError, Env, MapillaryConfig, Tables};
use shared::domain::sequence::SequenceConfig;

/// Tunables of the pipeline (all have defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct Tunables {
    /// `RELAY_MAX_IMAGES_PER_UPLOAD` (default 500): cap when the manifest does not set one.
    pub max_images_per_upload: usize,
    /// `RELAY_CUTOFF_TIME_S` (60).
    pub cutoff_time_s: f64,
    /// `RELAY_CUTOFF_DISTANCE_M` (100).
    pub cutoff_distance_m: f64,
    /// `RELAY_DUPLICATE_DISTANCE_M` (0.1).
    pub duplicate_distance_m: f64,
    /// `RELAY_DUPLICATE_ANGLE_DEG` (5).
    pub duplicate_angle_deg: f64,
    /// `RELAY_EXIF_CONCURRENCY` (64): images read at once during the EXIF pass (their head bytes in
    /// flight are capped at `exifpass::HEAD_BUDGET`, 16 MiB).
    pub exif_concurrency: usize,
    /// `RELAY_PREFETCH_BYTES` (32 MiB): object bytes held for the upload body (GETs ahead, the
    /// entry ready and the entry being sent; see `zipstream::fetch_concurrency`).
    pub prefetch_bytes: u64,
    /// `RELAY_DEADLINE_MARGIN_S` (30): start no upload POST this close to the Lambda deadline; one
    /// POST of `max_post_bytes` must fit in it.
    pub deadline_margin: Duration,
    /// `RELAY_MAX_POST_BYTES` (64 MiB, at least 1 MiB): largest body of one upload POST. Each POST is
    /// a complete request, so whatever the server does with interrupted bodies, every finished POST
    /// is stored and a continuation never re-sends it.
    pub max_post_bytes: u64,
    /// `RELAY_TOKEN_REFRESH_MARGIN_S` (3600): refresh a token expiring within this.
    pub token_refresh_margin: Duration,
    /// `RELAY_MAX_RECEIVES` (5): at this `ApproximateReceiveCount` a transient failure is final.
    pub max_receives: u32,
    /// `RELAY_MAX_MANIFEST_BYTES` (4 MiB): a larger `manifest.json` fails its sequence unread.
    pub max_manifest_bytes: u64,
    /// `RELAY_MAX_IMAGES_PER_SEQUENCE` (10,000): a sequence naming more images fails.
    pub max_images_per_sequence: usize,
    /// `RELAY_MAX_IMAGE_BYTES` (100 MiB): a larger image is rejected (the others go on).
    pub max_image_bytes: u64,
    /// `RELAY_MAX_HEADER_BYTES` (256 MiB, at least 2 MiB): the JPEG headers of a sequence's images,
    /// kept in memory from the EXIF pass until the zip is planned, may total this much; a sequence
    /// whose headers need more fails with this reason instead of running the function out of memory.
    pub max_header_bytes: u64,
    /// `RELAY_MAX_INVOCATIONS_WITHOUT_PROGRESS` (5, at least 1): a sequence whose invocations end
    /// this many times in a row before it is final without progress (continuations and retries
    /// alike) is FAILED with the last error.
    pub max_invocations_without_progress: u32,
    /// `RELAY_HELD_RETRY_DELAY_SECONDS` (30, at most 900): a delivery that finds its sequence claimed
    /// by another invocation is put back on the queue with this delay and acknowledged (it does not
    /// count toward the DLQ).
    pub held_retry_delay_s: u32,
    /// `RELAY_MAX_ACTIVE_SEQUENCES_PER_USER` (2; 0 = no cap): a user's sequences processed at once
    /// (fair share); a delivery over the cap is put back with `RELAY_HELD_RETRY_DELAY_SECONDS`.
    pub max_active_sequences_per_user: u32,
    /// `RELAY_FINISH_TIMEOUT_S` (60): longest wait for a `finish_upload` reply (a reply not there by
    /// then is an unknown outcome, FINISH_UNCERTAIN).
    pub finish_timeout: Duration,
    /// `RELAY_CLUSTER_SAVE_BUDGET_S` (10): how long saving a returned `cluster_id` is retried.
    /// `finish_upload` is only started while `finish_timeout` + this is left before the deadline.
    pub cluster_save_budget: Duration,
    /// `RELAY_BUCKET`: the only bucket whose notifications are handled (any other is a recorded
    /// ingest error). Always set from the environment; `None` (the default) only in tests that
    /// build tunables by hand.
    pub own_bucket: Option<String>,
    /// Whether upload-state changes are recorded as status-change events (issue 14): `RELAY_EVENT_BUS`
    /// is set (the poller publishes them on it). Off in tests that build tunables by hand.
    pub publish_events: bool,
}

impl Default for Tunables {
    fn default() -> Self {
        Self {
            max_images_per_upload: 500,
            cutoff_time_s: 60.0,
            cutoff_distance_m: 100.0,
            duplicate_distance_m: 0.1,
            duplicate_angle_deg: 5.0,
            exif_concurrency: 64,
            prefetch_bytes: 32 * 1024 * 1024,
            deadline_margin: Duration::from_secs(30),
            max_post_bytes: shared::mapillary::client::DEFAULT_MAX_POST_BYTES,
            token_refresh_margin: Duration::from_secs(3600),
            max_receives: 5,
            max_manifest_bytes: 4 * 1024 * 1024,
            max_images_per_sequence: 10_000,
            max_image_bytes: 100 * 1024 * 1024,
            max_header_bytes: 256 * 1024 * 1024,
            max_invocations_without_progress: 5,
            held_retry_delay_s: 30,
            max_active_sequences_per_user: 2,
            finish_timeout: Duration::from_secs(60),
            cluster_save_budget: Duration::from_secs(10),
            own_bucket: None,
            publish_events: false,
        }
    }
}

impl Tunables {
    /// The sequence rules with these thresholds and a per-upload cap of `max_images`.
    pub fn sequence_config(&self, max_images: usize) -> SequenceConfig {
        SequenceConfig {
            cutoff_time_s: self.cutoff_time_s,
            cutoff_distance_m: self.cutoff_distance_m,
            max_images_per_upload: max_images,
            duplicate_distance_m: self.duplicate_distance_m,
            duplicate_angle_deg: self.duplicate_angle_deg,
            ..SequenceConfig::default()
        }
    }
}

/// Everything zip-and-push reads from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// `RELAY_BUCKET`.
    pub bucket: String,
    /// `RELAY_INGEST_QUEUE_URL`.
    pub ingest_queue_url: String,
    /// `RELAY_CLUSTERS_QUEUE_URL`.
    pub clusters_queue_url: String,
    /// The tables and the token key.
    pub tables: Tables,
    /// `RELAY_IDEMPOTENCY_TABLE`: the message claims (one per S3 object version).
    pub idempotency_table: String,
    /// The Mapillary app (endpoints, client id, client secret).
    pub mapillary: MapillaryConfig,
    /// Pipeline tunables.
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
        let d = Tunables::default();
        let tunables = Tunables {
            max_images_per_upload: env.parse_or("RELAY_MAX_IMAGES_PER_UPLOAD", d.max_images_per_upload)?,
            cutoff_time_s: env.parse_or("RELAY_CUTOFF_TIME_S", d.cutoff_time_s)?,
            cutoff_distance_m: env.parse_or("RELAY_CUTOFF_DISTANCE_M", d.cutoff_distance_m)?,
            duplicate_distance_m: env.parse_or("RELAY_DUPLICATE_DISTANCE_M", d.duplicate_distance_m)?,
            duplicate_angle_deg: env.parse_or("RELAY_DUPLICATE_ANGLE_DEG", d.duplicate_angle_deg)?,
            exif_concurrency: env.parse_or("RELAY_EXIF_CONCURRENCY", d.exif_concurrency)?,
            prefetch_bytes: env.parse_or("RELAY_PREFETCH_BYTES", d.prefetch_bytes)?,
            deadline_margin: Duration::from_secs(env.parse_or("RELAY_DEADLINE_MARGIN_S", 30u64)?),
            max_post_bytes: env.parse_or("RELAY_MAX_POST_BYTES", d.max_post_bytes)?,
            token_refresh_margin: Duration::from_secs(env.parse_or("RELAY_TOKEN_REFRESH_MARGIN_S", 3600u64)?),
            max_receives: env.parse_or("RELAY_MAX_RECEIVES", d.max_receives)?,
            max_manifest_bytes: env.parse_or("RELAY_MAX_MANIFEST_BYTES", d.max_manifest_bytes)?,
            max_images_per_sequence: env
                .parse_or("RELAY_MAX_IMAGES_PER_SEQUENCE", d.max_images_per_sequence)?,
            max_image_bytes: env.parse_or("RELAY_MAX_IMAGE_BYTES", d.max_image_bytes)?,
            max_header_bytes: env.parse_or("RELAY_MAX_HEADER_BYTES", d.max_header_bytes)?,
            max_invocations_without_progress: env.parse_or(
                "RELAY_MAX_INVOCATIONS_WITHOUT_PROGRESS",
                d.max_invocations_without_progress,
            )?,
            held_retry_delay_s: env.parse_or("RELAY_HELD_RETRY_DELAY_SECONDS", d.held_retry_delay_s)?,
            max_active_sequences_per_user: env.parse_or(
                "RELAY_MAX_ACTIVE_SEQUENCES_PER_USER",
                d.max_active_sequences_per_user,
            )?,
            finish_timeout: Duration::from_secs(env.parse_or("RELAY_FINISH_TIMEOUT_S", 60u64)?),
            cluster_save_budget: Duration::from_secs(env.parse_or("RELAY_CLUSTER_SAVE_BUDGET_S", 10u64)?),
            own_bucket: Some(env.required("RELAY_BUCKET")?),
            publish_events: env.optional("RELAY_EVENT_BUS").is_some_and(|b| !b.is_empty()),
        };
        if tunables.max_invocations_without_progress == 0 {
            return Err(ConfigError::invalid(
                "RELAY_MAX_INVOCATIONS_WITHOUT_PROGRESS",
                "must be at least 1",
            ));
        }
        if tunables.held_retry_delay_s > 900 {
            return Err(ConfigError::invalid(
                "RELAY_HELD_RETRY_DELAY_SECONDS",
                "must be at most 900 (the SQS delay limit)",
            ));
        }
        if tunables.finish_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "RELAY_FINISH_TIMEOUT_S",
                "must be at least 1",
            ));
        }
        for (name, value) in [
            ("RELAY_MAX_MANIFEST_BYTES", tunables.max_manifest_bytes),
            (
                "RELAY_MAX_IMAGES_PER_SEQUENCE",
                tunables.max_images_per_sequence as u64,
            ),
            ("RELAY_MAX_IMAGE_BYTES", tunables.max_image_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(name, "must be at least 1"));
            }
        }
        if !(1..=500).contains(&tunables.max_images_per_upload) {
            return Err(ConfigError::invalid(
                "RELAY_MAX_IMAGES_PER_UPLOAD",
                "must be between 1 and 500",
            ));
        }
        if tunables.max_post_bytes < 1024 * 1024 {
            return Err(ConfigError::invalid(
                "RELAY_MAX_POST_BYTES",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        if tunables.max_header_bytes < crate::exifpass::MAX_HEAD {
            return Err(ConfigError::invalid(
                "RELAY_MAX_HEADER_BYTES",
                "must be at least 2097152 (2 MiB, the largest header of one image)",
            ));
        }
        if tunables.exif_concurrency == 0 {
            return Err(ConfigError::invalid(
                "RELAY_EXIF_CONCURRENCY",
                "must be at least 1",
            ));
        }
        Ok(Config {
            bucket: env.required("RELAY_BUCKET")?,
            ingest_queue_url: env.required("RELAY_INGEST_QUEUE_URL")?,
            clusters_queue_url: env.required("RELAY_CLUSTERS_QUEUE_URL")?,
            tables: env.tables()?,
            idempotency_table: env.required("RELAY_IDEMPOTENCY_TABLE")?,
            mapillary,
            tunables,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use shared::config::ClientSecretSource;

    use super::*;

    fn base() -> HashMap<&'static str, String> {
        let mut env = shared::fakes::common_env();
        env.extend(
            [
                ("RELAY_BUCKET", "b"),
                ("RELAY_INGEST_QUEUE_URL", "http://q/ingest"),
                ("RELAY_CLUSTERS_QUEUE_URL", "http://q/clusters"),
            ]
            .map(|(k, v)| (k, v.to_string())),
        );
        env
    }

    #[test]
    fn when_all_required_set_should_load_with_defaults() {
        let env = base();
        let c = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert_eq!(c.mapillary.endpoints.graph, "http://127.0.0.1:1/graph");
        assert_eq!(
            c.tunables,
            Tunables {
                own_bucket: Some("b".into()),
                ..Tunables::default()
            }
        );
        assert!(matches!(c.mapillary.client_secret, ClientSecretSource::Plain(_)));
    }

    #[test]
    fn when_required_missing_should_fail_naming_it() {
        let mut env = base();
        env.remove("RELAY_UPLOADS_TABLE");
        let e = Config::from_lookup(|k| env.get(k).cloned()).unwrap_err();
        assert_eq!(e, ConfigError::Missing("RELAY_UPLOADS_TABLE"));
    }

    #[test]
    fn when_tunable_malformed_should_fail() {
        let mut env = base();
        env.insert("RELAY_CUTOFF_TIME_S", "soon".into());
        let e = Config::from_lookup(|k| env.get(k).cloned()).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    name: "RELAY_CUTOFF_TIME_S",
                    ..
                }
            ),
            "{e}"
        );
        let mut env = base();
        env.insert("RELAY_MAX_IMAGES_PER_UPLOAD", "501".into());
        assert!(Config::from_lookup(|k| env.get(k).cloned()).is_err());
        for cap in [
            "RELAY_MAX_MANIFEST_BYTES",
            "RELAY_MAX_IMAGES_PER_SEQUENCE",
            "RELAY_MAX_IMAGE_BYTES",
        ] {
            let mut env = base();
            env.insert(cap, "0".into());
            assert!(Config::from_lookup(|k| env.get(k).cloned()).is_err(), "{cap}");
            env.insert(cap, "12".into());
            assert!(Config::from_lookup(|k| env.get(k).cloned()).is_ok(), "{cap}");
        }
        for (name, bad) in [
            ("RELAY_MAX_HEADER_BYTES", "2097151"),
            ("RELAY_MAX_INVOCATIONS_WITHOUT_PROGRESS", "0"),
            ("RELAY_HELD_RETRY_DELAY_SECONDS", "901"),
            ("RELAY_FINISH_TIMEOUT_S", "0"),
            ("RELAY_CLUSTER_SAVE_BUDGET_S", "-1"),
        ] {
            let mut env = base();
            env.insert(name, bad.into());
            assert!(
                Config::from_lookup(|k| env.get(k).cloned()).is_err(),
                "{name}={bad}"
            );
        }
        let mut env = base();
        env.insert("RELAY_MAX_INVOCATIONS_WITHOUT_PROGRESS", "2".into());
        env.insert("RELAY_HELD_RETRY_DELAY_SECONDS", "900".into());
        env.insert("RELAY_MAX_ACTIVE_SEQUENCES_PER_USER", "0".into());
        let c = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert_eq!(c.tunables.max_active_sequences_per_user, 0, "no cap");
        assert_eq!(c.tunables.max_invocations_without_progress, 2);
        assert_eq!(c.tunables.held_retry_delay_s, 900);
        let mut env = base();
        env.insert("RELAY_MAX_POST_BYTES", "1000".into());
        let e = Config::from_lookup(|k| env.get(k).cloned()).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    name: "RELAY_MAX_POST_BYTES",
                    ..
                }
            ),
            "{e}"
        );
        env.insert("RELAY_MAX_POST_BYTES", "16777216".into());
        let c = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert_eq!(c.tunables.max_post_bytes, 16 << 20);
    }

    #[test]
    fn when_only_secret_arn_should_use_it() {
        let mut env = base();
        env.remove("MAPILLARY_CLIENT_SECRET");
        env.insert("MAPILLARY_CLIENT_SECRET_ARN", "arn:aws:secretsmanager:x".into());
        let c = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert!(matches!(
            c.mapillary.client_secret,
            ClientSecretSource::SecretArn(_)
        ));
    }
}
