//! Typed configuration, read once from the environment at cold start; a missing or malformed
//! variable fails the start (never a silent default for required values).
//!
//! Hand-rolled over a lookup function rather than figment/envy: a dozen flat variables, and the
//! lookup makes the parser testable without touching the process environment.

use std::time::Duration;

use secrecy::SecretString;
use shared::domain::sequence::SequenceConfig;
use shared::mapillary::Endpoints;

/// A variable is missing or malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Required and absent (or empty).
    #[error("missing environment variable {0}")]
    Missing(&'static str),
    /// Present but unusable.
    #[error("environment variable {name}: {reason}")]
    Invalid {
        /// Variable.
        name: &'static str,
        /// Why.
        reason: String,
    },
}

/// Where the OAuth client secret comes from.
#[derive(Debug, Clone)]
pub enum ClientSecretSource {
    /// `MAPILLARY_CLIENT_SECRET` (local stacks).
    Plain(SecretString),
    /// `MAPILLARY_CLIENT_SECRET_ARN` (Secrets Manager, resolved by `main` at init).
    SecretArn(String),
}

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
    /// `RELAY_EXIF_CONCURRENCY` (16): ranged GETs in flight during the EXIF pass.
    pub exif_concurrency: usize,
    /// `RELAY_PREFETCH_BYTES` (32 MiB): object bytes held for the upload body (GETs ahead, the
    /// entry ready and the entry being sent; see `zipstream::fetch_concurrency`).
    pub prefetch_bytes: u64,
    /// `RELAY_DEADLINE_MARGIN_S` (30): stop uploading this long before the Lambda deadline.
    pub deadline_margin: Duration,
    /// `RELAY_TOKEN_REFRESH_MARGIN_S` (3600): refresh a token expiring within this.
    pub token_refresh_margin: Duration,
    /// `RELAY_MAX_RECEIVES` (5): at this `ApproximateReceiveCount` a transient failure is final.
    pub max_receives: u32,
}

impl Default for Tunables {
    fn default() -> Self {
        Self {
            max_images_per_upload: 500,
            cutoff_time_s: 60.0,
            cutoff_distance_m: 100.0,
            duplicate_distance_m: 0.1,
            duplicate_angle_deg: 5.0,
            exif_concurrency: 16,
            prefetch_bytes: 32 * 1024 * 1024,
            deadline_margin: Duration::from_secs(30),
            token_refresh_margin: Duration::from_secs(3600),
            max_receives: 5,
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
    /// `RELAY_UPLOADS_TABLE`.
    pub uploads_table: String,
    /// `RELAY_USERS_TABLE`.
    pub users_table: String,
    /// `RELAY_IDEMPOTENCY_TABLE`.
    pub idempotency_table: String,
    /// `RELAY_TOKEN_KEY_ID`.
    pub token_key_id: String,
    /// `MAPILLARY_GRAPH_URL`, `MAPILLARY_UPLOAD_URL`, `MAPILLARY_TILES_URL`, `MAPILLARY_WWW_URL`.
    pub endpoints: Endpoints,
    /// `MAPILLARY_CLIENT_ID`.
    pub client_id: String,
    /// `MAPILLARY_CLIENT_SECRET` or `MAPILLARY_CLIENT_SECRET_ARN`.
    pub client_secret: ClientSecretSource,
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
        let req = |name: &'static str| -> Result<String, ConfigError> {
            get(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .ok_or(ConfigError::Missing(name))
        };
        let client_secret = match (
            get("MAPILLARY_CLIENT_SECRET").filter(|v| !v.is_empty()),
            get("MAPILLARY_CLIENT_SECRET_ARN").filter(|v| !v.is_empty()),
        ) {
            (Some(s), _) => ClientSecretSource::Plain(SecretString::from(s)),
            (None, Some(arn)) => ClientSecretSource::SecretArn(arn),
            (None, None) => return Err(ConfigError::Missing("MAPILLARY_CLIENT_SECRET")),
        };
        let d = Tunables::default();
        let tunables = Tunables {
            max_images_per_upload: parse(&get, "RELAY_MAX_IMAGES_PER_UPLOAD", d.max_images_per_upload)?,
            cutoff_time_s: parse(&get, "RELAY_CUTOFF_TIME_S", d.cutoff_time_s)?,
            cutoff_distance_m: parse(&get, "RELAY_CUTOFF_DISTANCE_M", d.cutoff_distance_m)?,
            duplicate_distance_m: parse(&get, "RELAY_DUPLICATE_DISTANCE_M", d.duplicate_distance_m)?,
            duplicate_angle_deg: parse(&get, "RELAY_DUPLICATE_ANGLE_DEG", d.duplicate_angle_deg)?,
            exif_concurrency: parse(&get, "RELAY_EXIF_CONCURRENCY", d.exif_concurrency)?,
            prefetch_bytes: parse(&get, "RELAY_PREFETCH_BYTES", d.prefetch_bytes)?,
            deadline_margin: Duration::from_secs(parse(&get, "RELAY_DEADLINE_MARGIN_S", 30u64)?),
            token_refresh_margin: Duration::from_secs(parse(&get, "RELAY_TOKEN_REFRESH_MARGIN_S", 3600u64)?),
            max_receives: parse(&get, "RELAY_MAX_RECEIVES", d.max_receives)?,
        };
        if !(1..=500).contains(&tunables.max_images_per_upload) {
            return Err(ConfigError::Invalid {
                name: "RELAY_MAX_IMAGES_PER_UPLOAD",
                reason: "must be between 1 and 500".into(),
            });
        }
        if tunables.exif_concurrency == 0 {
            return Err(ConfigError::Invalid {
                name: "RELAY_EXIF_CONCURRENCY",
                reason: "must be at least 1".into(),
            });
        }
        Ok(Config {
            bucket: req("RELAY_BUCKET")?,
            ingest_queue_url: req("RELAY_INGEST_QUEUE_URL")?,
            clusters_queue_url: req("RELAY_CLUSTERS_QUEUE_URL")?,
            uploads_table: req("RELAY_UPLOADS_TABLE")?,
            users_table: req("RELAY_USERS_TABLE")?,
            idempotency_table: req("RELAY_IDEMPOTENCY_TABLE")?,
            token_key_id: req("RELAY_TOKEN_KEY_ID")?,
            endpoints: Endpoints {
                graph: req("MAPILLARY_GRAPH_URL")?.trim_end_matches('/').to_string(),
                upload: req("MAPILLARY_UPLOAD_URL")?.trim_end_matches('/').to_string(),
                tiles: req("MAPILLARY_TILES_URL")?.trim_end_matches('/').to_string(),
                www: req("MAPILLARY_WWW_URL")?.trim_end_matches('/').to_string(),
            },
            client_id: req("MAPILLARY_CLIENT_ID")?,
            client_secret,
            tunables,
        })
    }
}

fn parse<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: T,
) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match get(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|e: T::Err| ConfigError::Invalid {
            name,
            reason: format!("{v:?}: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn base() -> HashMap<&'static str, String> {
        [
            ("RELAY_BUCKET", "b"),
            ("RELAY_INGEST_QUEUE_URL", "http://q/ingest"),
            ("RELAY_CLUSTERS_QUEUE_URL", "http://q/clusters"),
            ("RELAY_UPLOADS_TABLE", "uploads"),
            ("RELAY_USERS_TABLE", "users"),
            ("RELAY_IDEMPOTENCY_TABLE", "idem"),
            ("RELAY_TOKEN_KEY_ID", "alias/relay"),
            ("MAPILLARY_GRAPH_URL", "http://127.0.0.1:1/graph/"),
            ("MAPILLARY_UPLOAD_URL", "http://127.0.0.1:1/rupload"),
            ("MAPILLARY_TILES_URL", "http://127.0.0.1:1/tiles"),
            ("MAPILLARY_WWW_URL", "http://127.0.0.1:1/www"),
            ("MAPILLARY_CLIENT_ID", "123"),
            ("MAPILLARY_CLIENT_SECRET", "s3cret"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect()
    }

    #[test]
    fn when_all_required_set_should_load_with_defaults() {
        let env = base();
        let c = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert_eq!(c.endpoints.graph, "http://127.0.0.1:1/graph");
        assert_eq!(c.tunables, Tunables::default());
        assert!(matches!(c.client_secret, ClientSecretSource::Plain(_)));
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
    }

    #[test]
    fn when_only_secret_arn_should_use_it() {
        let mut env = base();
        env.remove("MAPILLARY_CLIENT_SECRET");
        env.insert("MAPILLARY_CLIENT_SECRET_ARN", "arn:aws:secretsmanager:x".into());
        let c = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert!(matches!(c.client_secret, ClientSecretSource::SecretArn(_)));
    }
}
