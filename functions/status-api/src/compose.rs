//! Composition root: the typed [`Config`] and the AWS SDK configuration become the router's
//! production dependencies (DynamoDB, KMS and S3 adapters, the OAuth-state store, the Mapillary app).
//! `main.rs` and the integration tests compose through [`compose`]; tests then swap single fields
//! (a faster retry policy, settings).

use std::time::Duration;

use shared::adapters::dynamodb::{DynamoRepository, DynamoStateStore, DynamoTracking};
use shared::adapters::s3::S3ObjectStore;
use shared::adapters::tokens::KmsTokenStore;
use shared::compose::{mapillary_app, token_store, ComposeError};

use crate::app::AppDeps;
use crate::config::Config;

/// The router's dependencies in production.
pub type ProductionDeps =
    AppDeps<DynamoRepository, DynamoTracking, KmsTokenStore, DynamoStateStore, S3ObjectStore>;

/// Connection set-up limit of Mapillary requests (an API caller is waiting).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The production dependencies of `config`, with AWS clients from `sdk` (which also reads the client
/// secret from Secrets Manager when the config names an ARN).
pub async fn compose(config: &Config, sdk: &aws_config::SdkConfig) -> Result<ProductionDeps, ComposeError> {
    if let Some(h) = &config.settings.dev_auth_header {
        tracing::warn!(header = %h, "RELAY_DEV_AUTH_HEADER is set: requests without a JWT authorizer context are trusted by that header (local development only)");
    }
    let mapillary = mapillary_app(&config.mapillary, sdk, CONNECT_TIMEOUT).await?;
    let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
    let tables = &config.tables;
    let mut repo = DynamoRepository::new(dynamodb.clone(), &tables.uploads_table);
    if let Some(t) = &config.settings.drops.idempotency_table {
        repo = repo.with_idempotency_table(t);
    }
    Ok(AppDeps {
        repo,
        tracking: DynamoTracking::new(dynamodb.clone(), &tables.uploads_table),
        tokens: token_store(dynamodb.clone(), sdk, tables),
        states: DynamoStateStore::new(dynamodb, &tables.users_table),
        objects: S3ObjectStore::new(aws_sdk_s3::Client::new(sdk)),
        mapillary,
        settings: config.settings.clone(),
    })
}
