//! Composition root: the typed [`Config`] and the AWS SDK configuration become the handler's
//! production dependencies (S3, DynamoDB, KMS, SQS adapters and the Mapillary app). `main.rs`,
//! `cargo xtask push` and the integration tests all compose through [`compose`]; tests then swap
//! single fields (a faster retry policy, a path-style S3 client for moto).

use std::time::Duration;

use shared::adapters::dynamodb::{DynamoIdempotency, DynamoRepository};
use shared::adapters::s3::S3ObjectStore;
use shared::adapters::sqs::{SqsClusterQueue, SqsIngestRequeue};
use shared::adapters::tokens::KmsTokenStore;
use shared::compose::{mapillary_app, token_store, ComposeError};
use shared::mapillary::app::MapillaryApp;

use crate::config::Config;
use crate::deps::HandlerDeps;

/// The handler's dependencies in production.
pub type ProductionDeps = HandlerDeps<
    S3ObjectStore,
    DynamoRepository,
    DynamoIdempotency,
    KmsTokenStore,
    SqsClusterQueue,
    SqsIngestRequeue,
    MapillaryApp,
>;

/// Connection set-up limit of Mapillary requests.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The production dependencies of `config`, with AWS clients from `sdk` (which also reads the client
/// secret from Secrets Manager when the config names an ARN).
pub async fn compose(config: &Config, sdk: &aws_config::SdkConfig) -> Result<ProductionDeps, ComposeError> {
    let mapillary = mapillary_app(&config.mapillary, sdk, CONNECT_TIMEOUT).await?;
    let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
    let sqs = aws_sdk_sqs::Client::new(sdk);
    let tables = &config.tables;
    Ok(HandlerDeps {
        store: S3ObjectStore::new(aws_sdk_s3::Client::new(sdk)),
        repo: DynamoRepository::new(dynamodb.clone(), &tables.uploads_table),
        claims: DynamoIdempotency::new(dynamodb.clone(), &config.idempotency_table),
        tokens: token_store(dynamodb, sdk, tables),
        clusters: SqsClusterQueue::new(sqs.clone(), &config.clusters_queue_url),
        requeue: SqsIngestRequeue::new(sqs, &config.ingest_queue_url),
        mapillary,
        tunables: config.tunables.clone(),
    })
}
