//! Reading a function's configuration from its environment: the pieces every function shares
//! (required names, typed tunables with defaults, the Mapillary app — endpoints, client id, the
//! client secret's source — and the tables). Each function's `config.rs` builds its own typed
//! `Config` with these and adds its own variables and range checks.
//!
//! Hand-rolled over a lookup function rather than figment/envy: a few dozen flat variables, and the
//! lookup makes every parser testable without touching the process environment.

use secrecy::SecretString;

use crate::mapillary::Endpoints;

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

impl ConfigError {
    /// `name` is present but out of its range (`reason` says the range).
    pub fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            name,
            reason: reason.into(),
        }
    }
}

/// Where a secret comes from: the OAuth client secret, or the poller's activity-feed token.
#[derive(Debug, Clone)]
pub enum ClientSecretSource {
    /// The value itself, e.g. `MAPILLARY_CLIENT_SECRET` (local stacks).
    Plain(SecretString),
    /// A Secrets Manager ARN, e.g. `MAPILLARY_CLIENT_SECRET_ARN` (resolved at init by
    /// `adapters::secrets::resolve_secret`).
    SecretArn(String),
}

/// The Mapillary app every function talks as.
#[derive(Debug, Clone)]
pub struct MapillaryConfig {
    /// `MAPILLARY_GRAPH_URL`, `MAPILLARY_UPLOAD_URL`, `MAPILLARY_TILES_URL`, `MAPILLARY_WWW_URL`.
    pub endpoints: Endpoints,
    /// `MAPILLARY_CLIENT_ID`.
    pub client_id: String,
    /// `MAPILLARY_CLIENT_SECRET` or `MAPILLARY_CLIENT_SECRET_ARN`.
    pub client_secret: ClientSecretSource,
}

/// Where the relay's records live: the template's DynamoDB tables and the KMS key of the tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    /// `RELAY_UPLOADS_TABLE`.
    pub uploads_table: String,
    /// `RELAY_USERS_TABLE`.
    pub users_table: String,
    /// `RELAY_TOKEN_KEY_ID`: the KMS key that encrypts the tokens in the users table.
    pub token_key_id: String,
}

/// Typed access to variables through a lookup function (the process environment, or a map in tests).
/// Values are trimmed; an empty value counts as absent.
pub struct Env<F> {
    get: F,
}

impl Env<fn(&str) -> Option<String>> {
    /// The process environment.
    pub fn process() -> Self {
        Env {
            get: |k: &str| std::env::var(k).ok(),
        }
    }
}

impl<F: Fn(&str) -> Option<String>> Env<F> {
    /// Variables looked up through `get`.
    pub fn new(get: F) -> Self {
        Env { get }
    }

    /// The trimmed value of `name`, `None` when absent or empty.
    pub fn optional(&self, name: &str) -> Option<String> {
        (self.get)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    /// The value of `name`, which must be set.
    pub fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        self.optional(name).ok_or(ConfigError::Missing(name))
    }

    /// `name` parsed as `T`, or `default` when unset.
    pub fn parse_or<T>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        match self.optional(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|e: T::Err| ConfigError::invalid(name, format!("{v:?}: {e}"))),
        }
    }

    /// `MAPILLARY_GRAPH_URL`, `MAPILLARY_UPLOAD_URL`, `MAPILLARY_TILES_URL`, `MAPILLARY_WWW_URL`
    /// (trailing slashes removed).
    pub fn endpoints(&self) -> Result<Endpoints, ConfigError> {
        let base = |name: &'static str| -> Result<String, ConfigError> {
            let v = self.required(name)?;
            if !(v.starts_with("https://") || v.starts_with("http://")) {
                return Err(ConfigError::invalid(name, format!("{v:?} is not an http(s) URL")));
            }
            Ok(v.trim_end_matches('/').to_string())
        };
        Ok(Endpoints {
            graph: base("MAPILLARY_GRAPH_URL")?,
            upload: base("MAPILLARY_UPLOAD_URL")?,
            tiles: base("MAPILLARY_TILES_URL")?,
            www: base("MAPILLARY_WWW_URL")?,
        })
    }

    /// The endpoints ([`Self::endpoints`]), `MAPILLARY_CLIENT_ID` and the client secret's source
    /// ([`Self::client_secret`]).
    pub fn mapillary(&self) -> Result<MapillaryConfig, ConfigError> {
        Ok(MapillaryConfig {
            endpoints: self.endpoints()?,
            client_id: self.required("MAPILLARY_CLIENT_ID")?,
            client_secret: self.client_secret()?,
        })
    }

    /// `RELAY_UPLOADS_TABLE`, `RELAY_USERS_TABLE`, `RELAY_TOKEN_KEY_ID` (zip-and-push also reads
    /// `RELAY_IDEMPOTENCY_TABLE`, its own).
    pub fn tables(&self) -> Result<Tables, ConfigError> {
        Ok(Tables {
            uploads_table: self.required("RELAY_UPLOADS_TABLE")?,
            users_table: self.required("RELAY_USERS_TABLE")?,
            token_key_id: self.required("RELAY_TOKEN_KEY_ID")?,
        })
    }

    /// An optional secret: `plain` (the value, local stacks) or else `arn` (a Secrets Manager ARN);
    /// `None` when neither is set (or both are empty).
    pub fn optional_secret(&self, plain: &str, arn: &str) -> Option<ClientSecretSource> {
        match ((self.get)(plain).filter(|v| !v.is_empty()), self.optional(arn)) {
            (Some(s), _) => Some(ClientSecretSource::Plain(SecretString::from(s))),
            (None, Some(a)) => Some(ClientSecretSource::SecretArn(a)),
            (None, None) => None,
        }
    }

    /// The webhook policy: `RELAY_WEBHOOK_ALLOW_LOCAL` (`true`/`false`, default `false`: strict),
    /// `RELAY_WEBHOOK_MAX_FAILURES` (15, at least 1), `RELAY_WEBHOOK_BACKOFF_S` (30, at least 1),
    /// `RELAY_WEBHOOK_BACKOFF_MAX_S` (3600, at least the base).
    pub fn webhook_policy(&self) -> Result<crate::webhook::WebhookPolicy, ConfigError> {
        let d = crate::webhook::WebhookPolicy::default();
        let allow_local = match self.optional("RELAY_WEBHOOK_ALLOW_LOCAL").as_deref() {
            None | Some("false") | Some("0") => false,
            Some("true") | Some("1") => true,
            Some(v) => {
                return Err(ConfigError::invalid(
                    "RELAY_WEBHOOK_ALLOW_LOCAL",
                    format!("{v:?} is neither true nor false"),
                ))
            }
        };
        let max_failures = self.parse_or("RELAY_WEBHOOK_MAX_FAILURES", d.max_failures)?;
        if max_failures == 0 {
            return Err(ConfigError::invalid("RELAY_WEBHOOK_MAX_FAILURES", "at least 1"));
        }
        let base = self.parse_or("RELAY_WEBHOOK_BACKOFF_S", d.backoff_base.as_secs())?;
        let max = self.parse_or("RELAY_WEBHOOK_BACKOFF_MAX_S", d.backoff_max.as_secs())?;
        if base == 0 || max < base {
            return Err(ConfigError::invalid(
                "RELAY_WEBHOOK_BACKOFF_S",
                "at least 1, and RELAY_WEBHOOK_BACKOFF_MAX_S at least it",
            ));
        }
        Ok(crate::webhook::WebhookPolicy {
            allow_local,
            max_failures,
            backoff_base: std::time::Duration::from_secs(base),
            backoff_max: std::time::Duration::from_secs(max),
            ..d
        })
    }

    /// `MAPILLARY_CLIENT_SECRET` (plain, local stacks) or else `MAPILLARY_CLIENT_SECRET_ARN`.
    pub fn client_secret(&self) -> Result<ClientSecretSource, ConfigError> {
        match (
            (self.get)("MAPILLARY_CLIENT_SECRET").filter(|v| !v.is_empty()),
            self.optional("MAPILLARY_CLIENT_SECRET_ARN"),
        ) {
            (Some(s), _) => Ok(ClientSecretSource::Plain(SecretString::from(s))),
            (None, Some(arn)) => Ok(ClientSecretSource::SecretArn(arn)),
            (None, None) => Err(ConfigError::Missing("MAPILLARY_CLIENT_SECRET")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use secrecy::ExposeSecret;

    use super::*;

    fn env(pairs: &[(&'static str, &str)]) -> Env<impl Fn(&str) -> Option<String>> {
        let map: HashMap<&'static str, String> = pairs.iter().map(|(k, v)| (*k, v.to_string())).collect();
        Env::new(move |k: &str| map.get(k).cloned())
    }

    #[test]
    fn when_required_is_blank_should_report_it_missing() {
        let e = env(&[("A", "  ")]);
        assert_eq!(e.required("A"), Err(ConfigError::Missing("A")));
        assert_eq!(e.required("B"), Err(ConfigError::Missing("B")));
    }

    #[test]
    fn webhook_policy_is_strict_by_default_and_checked() {
        let p = env(&[]).webhook_policy().expect("defaults");
        assert!(!p.allow_local);
        assert_eq!(p.max_failures, 15);
        let p = env(&[
            ("RELAY_WEBHOOK_ALLOW_LOCAL", "true"),
            ("RELAY_WEBHOOK_MAX_FAILURES", "3"),
        ])
        .webhook_policy()
        .expect("set");
        assert!(p.allow_local);
        assert_eq!(p.max_failures, 3);
        assert!(env(&[("RELAY_WEBHOOK_ALLOW_LOCAL", "yes")])
            .webhook_policy()
            .is_err());
        assert!(env(&[("RELAY_WEBHOOK_MAX_FAILURES", "0")])
            .webhook_policy()
            .is_err());
        assert!(env(&[
            ("RELAY_WEBHOOK_BACKOFF_S", "100"),
            ("RELAY_WEBHOOK_BACKOFF_MAX_S", "10")
        ])
        .webhook_policy()
        .is_err());
    }

    #[test]
    fn when_value_does_not_parse_should_name_variable_and_value() {
        let e = env(&[("N", " 12 "), ("BAD", "twelve")]);
        assert_eq!(e.parse_or("N", 1u32), Ok(12));
        assert_eq!(e.parse_or("UNSET", 7u32), Ok(7));
        match e.parse_or("BAD", 1u32) {
            Err(ConfigError::Invalid { name, reason }) => {
                assert_eq!(name, "BAD");
                assert!(reason.contains("\"twelve\""), "{reason}");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn when_endpoints_have_trailing_slash_should_trim_and_reject_non_urls() {
        let mut pairs = vec![
            ("MAPILLARY_GRAPH_URL", "http://h/graph/"),
            ("MAPILLARY_UPLOAD_URL", "https://rupload.facebook.com"),
            ("MAPILLARY_TILES_URL", "http://h/tiles"),
            ("MAPILLARY_WWW_URL", "http://h/www//"),
        ];
        let ep = env(&pairs).endpoints().unwrap();
        assert_eq!(ep.graph, "http://h/graph");
        assert_eq!(ep.www, "http://h/www");
        pairs[2] = ("MAPILLARY_TILES_URL", "tiles.mapillary.com");
        assert!(matches!(
            env(&pairs).endpoints(),
            Err(ConfigError::Invalid {
                name: "MAPILLARY_TILES_URL",
                ..
            })
        ));
    }

    #[test]
    fn when_app_and_tables_set_should_read_them_and_name_what_is_missing() {
        let mut pairs = vec![
            ("MAPILLARY_GRAPH_URL", "http://h/graph"),
            ("MAPILLARY_UPLOAD_URL", "http://h/rupload"),
            ("MAPILLARY_TILES_URL", "http://h/tiles"),
            ("MAPILLARY_WWW_URL", "http://h/www"),
            ("MAPILLARY_CLIENT_ID", "123"),
            ("MAPILLARY_CLIENT_SECRET_ARN", "arn:x"),
            ("RELAY_UPLOADS_TABLE", "uploads"),
            ("RELAY_USERS_TABLE", "users"),
            ("RELAY_IDEMPOTENCY_TABLE", "idem"),
            ("RELAY_TOKEN_KEY_ID", "alias/relay"),
        ];
        let app = env(&pairs).mapillary().unwrap();
        assert_eq!(app.endpoints.tiles, "http://h/tiles");
        assert_eq!(app.client_id, "123");
        assert!(matches!(app.client_secret, ClientSecretSource::SecretArn(a) if a == "arn:x"));
        let t = env(&pairs).tables().unwrap();
        assert_eq!(
            (t.uploads_table.as_str(), t.users_table.as_str()),
            ("uploads", "users")
        );
        assert_eq!(t.token_key_id, "alias/relay");
        pairs.retain(|(k, _)| *k != "MAPILLARY_CLIENT_ID" && *k != "RELAY_TOKEN_KEY_ID");
        assert_eq!(
            env(&pairs).mapillary().unwrap_err(),
            ConfigError::Missing("MAPILLARY_CLIENT_ID")
        );
        assert_eq!(
            env(&pairs).tables().unwrap_err(),
            ConfigError::Missing("RELAY_TOKEN_KEY_ID")
        );
    }

    #[test]
    fn when_both_secret_sources_set_should_prefer_plain_and_never_show_it() {
        let both = env(&[
            ("MAPILLARY_CLIENT_SECRET", "s3cret"),
            ("MAPILLARY_CLIENT_SECRET_ARN", "arn:x"),
        ]);
        match both.client_secret().unwrap() {
            ClientSecretSource::Plain(s) => {
                assert_eq!(s.expose_secret(), "s3cret");
                assert!(!format!("{s:?}").contains("s3cret"));
            }
            other => panic!("expected the plain secret, got {other:?}"),
        }
        let arn = env(&[("MAPILLARY_CLIENT_SECRET_ARN", "arn:x")]);
        assert!(matches!(arn.client_secret(), Ok(ClientSecretSource::SecretArn(a)) if a == "arn:x"));
        assert_eq!(
            env(&[]).client_secret().unwrap_err(),
            ConfigError::Missing("MAPILLARY_CLIENT_SECRET")
        );
    }
}
