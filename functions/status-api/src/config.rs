//! Typed configuration, read once from the environment at cold start; a missing or malformed
//! variable fails the start. Built on [`shared::config`] (the Mapillary app and the tables every
//! function reads), plus the handlers' [`Settings`] with their checks.

use std::time::Duration;

use shared::config::{ConfigError, Env, MapillaryConfig, Tables};

/// What the handlers need to know (no AWS resources, no secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `RELAY_OAUTH_REDIRECT_URI`: the callback URL registered with the Mapillary app. When unset,
    /// `https://<request host>/v1/mapillary/callback` of the `connect` call is used.
    pub redirect_uri: Option<String>,
    /// `RELAY_OAUTH_SCOPE` (default `read`, what JOSM sends; see the protocol notes §1.2/§1.7).
    pub scope: String,
    /// `RELAY_OAUTH_STATE_TTL_S` (default 600, 60–3600): lifetime of a connect `state`.
    pub state_ttl: Duration,
    /// `RELAY_CONNECT_SUCCESS_URL`: where the callback redirects the browser after a successful
    /// connection; unset → the callback answers JSON.
    pub success_url: Option<String>,
    /// `RELAY_DEV_AUTH_HEADER` (dev only, never set in the template): a request header whose value
    /// is taken as the caller's user id when the request has no JWT authorizer context.
    pub dev_auth_header: Option<http::HeaderName>,
    /// `RELAY_ALLOW_SHARED_MAPILLARY_ACCOUNTS` (default `false`): when `true`, several relay users
    /// may connect the same Mapillary account (no account claim is checked or written).
    pub allow_shared_accounts: bool,
    /// Sequences dropped through the API.
    pub drops: DropSettings,
    /// `RELAY_WEBHOOK_ALLOW_LOCAL` (default `false`, strict): webhook URLs may also be loopback,
    /// over `http` too (local stacks only; never in the template).
    pub webhook_allow_local: bool,
}

/// Most files one sequence dropped through the API may announce: the reply carries one presigned
/// URL per file (about 1.5 KB each with a Lambda role's session token), and a Lambda reply is at
/// most 6 MB.
pub const MAX_API_FILES: usize = 2000;

/// Settings of `POST /v1/sequences` and the routes under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropSettings {
    /// `RELAY_BUCKET`: the sequences bucket. Unset: the drop routes answer 503 (the template always
    /// sets it).
    pub bucket: Option<String>,
    /// `RELAY_PRESIGN_SECONDS` (default 900, 60–3600): lifetime of a presigned upload URL.
    pub presign_ttl: Duration,
    /// Files per sequence: `RELAY_MAX_IMAGES_PER_SEQUENCE` (default 10,000, zip-and-push's cap), at
    /// most [`MAX_API_FILES`].
    pub max_files: usize,
    /// `RELAY_MAX_IMAGE_BYTES` (default 100 MiB, zip-and-push's cap): the largest file.
    pub max_image_bytes: u64,
    /// `RELAY_ANNOUNCE_TTL_HOURS` (default 24, 1–720): how long an announced sequence waits for its
    /// files and `complete`. After it the sequence reads as FAILED with the reason, takes no files
    /// and no `complete`, and its announcement items carry the UploadsTable's TTL (`expires_at`).
    pub announce_ttl: Duration,
    /// `RELAY_IDEMPOTENCY_TABLE`: zip-and-push's claims, one of which `DELETE /v1/sequences/{id}`
    /// removes (its sequence's). Unset: a delete fails rather than leave the claim (the template
    /// always sets it).
    pub idempotency_table: Option<String>,
}

impl Default for DropSettings {
    fn default() -> Self {
        Self {
            bucket: None,
            presign_ttl: Duration::from_secs(900),
            max_files: MAX_API_FILES,
            max_image_bytes: 100 * 1024 * 1024,
            announce_ttl: Duration::from_secs(24 * 3600),
            idempotency_table: None,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            redirect_uri: None,
            scope: "read".into(),
            state_ttl: Duration::from_secs(600),
            success_url: None,
            dev_auth_header: None,
            allow_shared_accounts: false,
            drops: DropSettings::default(),
            webhook_allow_local: false,
        }
    }
}

/// Everything status-api reads from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// The tables and the token key.
    pub tables: Tables,
    /// The Mapillary app (endpoints, client id, client secret).
    pub mapillary: MapillaryConfig,
    /// Handler settings.
    pub settings: Settings,
}

impl Config {
    /// Read the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Read variables through `get` (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env::new(get);
        let opt = |name: &str| env.optional(name);
        let mapillary = env.mapillary()?;
        let absolute_url = |name: &'static str, v: String| -> Result<String, ConfigError> {
            match url::Url::parse(&v) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(v),
                _ => Err(ConfigError::invalid(name, "must be an absolute http(s) URL")),
            }
        };
        let redirect_uri = opt("RELAY_OAUTH_REDIRECT_URI")
            .map(|v| absolute_url("RELAY_OAUTH_REDIRECT_URI", v))
            .transpose()?;
        let success_url = opt("RELAY_CONNECT_SUCCESS_URL")
            .map(|v| absolute_url("RELAY_CONNECT_SUCCESS_URL", v))
            .transpose()?;
        let state_ttl_s = match opt("RELAY_OAUTH_STATE_TTL_S") {
            None => 600,
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|s| (60..=3600).contains(s))
                .ok_or_else(|| {
                    ConfigError::invalid(
                        "RELAY_OAUTH_STATE_TTL_S",
                        format!("{v:?} is not a number of seconds between 60 and 3600"),
                    )
                })?,
        };
        let scope = opt("RELAY_OAUTH_SCOPE").unwrap_or_else(|| "read".into());
        let dev_auth_header = opt("RELAY_DEV_AUTH_HEADER")
            .map(|h| {
                http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                    ConfigError::invalid("RELAY_DEV_AUTH_HEADER", format!("{h:?} is not a header name"))
                })
            })
            .transpose()?;
        let allow_shared_accounts = match opt("RELAY_ALLOW_SHARED_MAPILLARY_ACCOUNTS").as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(v) => {
                return Err(ConfigError::invalid(
                    "RELAY_ALLOW_SHARED_MAPILLARY_ACCOUNTS",
                    format!("{v:?} is neither true nor false"),
                ))
            }
        };
        let presign_s: u64 = env.parse_or("RELAY_PRESIGN_SECONDS", 900)?;
        if !(60..=3600).contains(&presign_s) {
            return Err(ConfigError::invalid(
                "RELAY_PRESIGN_SECONDS",
                format!("{presign_s} is not a number of seconds between 60 and 3600"),
            ));
        }
        let max_images: usize = env.parse_or("RELAY_MAX_IMAGES_PER_SEQUENCE", 10_000)?;
        let max_image_bytes: u64 = env.parse_or("RELAY_MAX_IMAGE_BYTES", 100 * 1024 * 1024)?;
        for (name, v) in [
            ("RELAY_MAX_IMAGES_PER_SEQUENCE", max_images as u64),
            ("RELAY_MAX_IMAGE_BYTES", max_image_bytes),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(name, "must be at least 1"));
            }
        }
        let announce_h: u64 = env.parse_or("RELAY_ANNOUNCE_TTL_HOURS", 24)?;
        if !(1..=720).contains(&announce_h) {
            return Err(ConfigError::invalid(
                "RELAY_ANNOUNCE_TTL_HOURS",
                format!("{announce_h} is not a number of hours between 1 and 720"),
            ));
        }
        let drops = DropSettings {
            bucket: opt("RELAY_BUCKET"),
            presign_ttl: Duration::from_secs(presign_s),
            max_files: max_images.min(MAX_API_FILES),
            max_image_bytes,
            announce_ttl: Duration::from_secs(announce_h * 3600),
            idempotency_table: opt("RELAY_IDEMPOTENCY_TABLE"),
        };
        Ok(Config {
            tables: env.tables()?,
            mapillary,
            settings: Settings {
                redirect_uri,
                scope,
                state_ttl: Duration::from_secs(state_ttl_s),
                success_url,
                dev_auth_header,
                allow_shared_accounts,
                drops,
                webhook_allow_local: env.webhook_policy()?.allow_local,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn base() -> HashMap<&'static str, String> {
        shared::fakes::common_env()
    }

    #[test]
    fn defaults_leave_dev_auth_off() {
        let env = base();
        let c = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
        // The common environment names the IdempotencyTable (as the template's Globals do).
        let expected = Settings {
            drops: DropSettings {
                idempotency_table: Some("idem".into()),
                ..DropSettings::default()
            },
            ..Settings::default()
        };
        assert_eq!(c.settings, expected);
        assert_eq!(c.settings.dev_auth_header, None);
        assert_eq!(c.mapillary.endpoints.graph, "http://127.0.0.1:1/graph");
    }

    #[test]
    fn malformed_values_fail_naming_the_variable() {
        for (k, v) in [
            ("RELAY_OAUTH_STATE_TTL_S", "5"),
            ("RELAY_CONNECT_SUCCESS_URL", "/relative"),
            ("RELAY_DEV_AUTH_HEADER", "bad header"),
            ("RELAY_ALLOW_SHARED_MAPILLARY_ACCOUNTS", "yes"),
            ("RELAY_PRESIGN_SECONDS", "30"),
            ("RELAY_PRESIGN_SECONDS", "soon"),
            ("RELAY_MAX_IMAGES_PER_SEQUENCE", "0"),
            ("RELAY_MAX_IMAGE_BYTES", "-1"),
            ("RELAY_ANNOUNCE_TTL_HOURS", "0"),
            ("RELAY_ANNOUNCE_TTL_HOURS", "721"),
        ] {
            let mut env = base();
            env.insert(k, v.into());
            let e = Config::from_lookup(|n| env.get(n).cloned()).unwrap_err();
            assert!(matches!(e, ConfigError::Invalid { name, .. } if name == k), "{e}");
        }
        let mut env = base();
        env.remove("RELAY_USERS_TABLE");
        assert_eq!(
            Config::from_lookup(|n| env.get(n).cloned()).unwrap_err(),
            ConfigError::Missing("RELAY_USERS_TABLE")
        );
    }

    #[test]
    fn optional_settings_are_read() {
        let mut env = base();
        env.insert("RELAY_DEV_AUTH_HEADER", "x-relay-user".into());
        env.insert(
            "RELAY_CONNECT_SUCCESS_URL",
            "https://app.example/connected".into(),
        );
        env.insert("RELAY_OAUTH_STATE_TTL_S", "120".into());
        env.insert("RELAY_ALLOW_SHARED_MAPILLARY_ACCOUNTS", "true".into());
        let c = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert!(c.settings.allow_shared_accounts);
        assert_eq!(c.settings.dev_auth_header.unwrap().as_str(), "x-relay-user");
        assert_eq!(c.settings.state_ttl, Duration::from_secs(120));
        assert_eq!(
            c.settings.success_url.as_deref(),
            Some("https://app.example/connected")
        );
    }

    #[test]
    fn drop_settings_are_read_and_capped() {
        let mut env = base();
        env.insert("RELAY_BUCKET", "seqs".into());
        env.insert("RELAY_PRESIGN_SECONDS", "120".into());
        env.insert("RELAY_MAX_IMAGES_PER_SEQUENCE", "50".into());
        env.insert("RELAY_MAX_IMAGE_BYTES", "1000".into());
        let d = Config::from_lookup(|k| env.get(k).cloned())
            .unwrap()
            .settings
            .drops;
        assert_eq!(d.bucket.as_deref(), Some("seqs"));
        assert_eq!(d.presign_ttl, Duration::from_secs(120));
        assert_eq!((d.max_files, d.max_image_bytes), (50, 1000));
        assert_eq!(d.announce_ttl, Duration::from_secs(24 * 3600), "default 24 h");
        assert_eq!(d.idempotency_table.as_deref(), Some("idem"));
        env.insert("RELAY_ANNOUNCE_TTL_HOURS", "2".into());
        env.insert("RELAY_IDEMPOTENCY_TABLE", "idem-2".into());
        let d = Config::from_lookup(|k| env.get(k).cloned())
            .unwrap()
            .settings
            .drops;
        assert_eq!(d.announce_ttl, Duration::from_secs(2 * 3600));
        assert_eq!(d.idempotency_table.as_deref(), Some("idem-2"));
        env.remove("RELAY_IDEMPOTENCY_TABLE");
        let d = Config::from_lookup(|k| env.get(k).cloned())
            .unwrap()
            .settings
            .drops;
        assert_eq!(d.idempotency_table, None);
        env.insert("RELAY_MAX_IMAGES_PER_SEQUENCE", "10000".into());
        let d = Config::from_lookup(|k| env.get(k).cloned())
            .unwrap()
            .settings
            .drops;
        assert_eq!(
            d.max_files, MAX_API_FILES,
            "the reply size caps the files of one drop"
        );
    }
}
