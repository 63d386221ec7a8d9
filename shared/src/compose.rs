//! The parts every function's composition root (`functions/<fn>/src/compose.rs`) builds the same
//! way: the HTTP client for Mapillary, the Mapillary app with its client secret resolved, and the
//! users' token store.

use std::time::Duration;

use crate::adapters::secrets::{resolve_client_secret, SecretError};
use crate::adapters::tokens::KmsTokenStore;
use crate::config::{MapillaryConfig, Tables};
use crate::mapillary::app::MapillaryApp;
use crate::mapillary::client::MapillaryClient;
use crate::mapillary::retry::RetryPolicy;

/// A function's dependencies could not be built (the start fails).
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    /// The HTTP client could not be built (TLS set-up).
    #[error("building the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// The OAuth client secret could not be read.
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// The HTTP client of Mapillary calls: redirects are not followed (a redirect must not carry a
/// token elsewhere) and `connect_timeout` bounds the connection set-up; each request's timeout comes
/// from the [`RetryPolicy`].
pub fn http_client(connect_timeout: Duration) -> Result<reqwest::Client, ComposeError> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .build()?)
}

/// The Mapillary app of `config` with mapillary_tools' retry policy; the client secret is read from
/// Secrets Manager through `sdk` when it is an ARN.
pub async fn mapillary_app(
    config: &MapillaryConfig,
    sdk: &aws_config::SdkConfig,
    connect_timeout: Duration,
) -> Result<MapillaryApp, ComposeError> {
    let http = http_client(connect_timeout)?;
    let secret = resolve_client_secret(config.client_secret.clone(), sdk).await?;
    Ok(MapillaryApp::new(
        MapillaryClient::new(config.endpoints.clone(), http, RetryPolicy::default()),
        config.client_id.clone(),
        secret,
    ))
}

/// The users' tokens (users table, KMS key of `tables`).
pub fn token_store(
    dynamodb: aws_sdk_dynamodb::Client,
    sdk: &aws_config::SdkConfig,
    tables: &Tables,
) -> KmsTokenStore {
    KmsTokenStore::new(
        dynamodb,
        aws_sdk_kms::Client::new(sdk),
        &tables.users_table,
        &tables.token_key_id,
    )
}
