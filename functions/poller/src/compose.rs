//! Composition root: the typed [`Config`] and the AWS SDK configuration become the production
//! [`PollerDeps`] (DynamoDB, KMS and SQS adapters, the Mapillary app, the system clock). `main.rs`,
//! `cargo xtask push --track` and the integration tests all compose through [`compose`]; tests then
//! swap single fields (the clock that follows the simulator, a faster retry policy, tunables).

use std::time::Duration;

use shared::adapters::dynamodb::{DynamoIdempotency, DynamoRepository, DynamoTracking};
use shared::adapters::events::EventBridgePublisher;
use shared::adapters::secrets::resolve_secret;
use shared::adapters::sqs::SqsInbox;
use shared::adapters::tokens::KmsTokenStore;
use shared::adapters::webhook_http::WebhookSender;
use shared::compose::{mapillary_app, token_store, ComposeError};

use crate::clock::Clock;
use crate::config::{Config, FEED_TOKEN_ARN_VAR};
use crate::deps::PollerDeps;

/// The poller over the AWS adapters.
pub type ProductionPoller = PollerDeps<
    DynamoTracking,
    DynamoRepository,
    KmsTokenStore,
    SqsInbox,
    DynamoIdempotency,
    EventBridgePublisher,
>;

/// Connection set-up limit of Mapillary requests.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The production poller of `config`, with AWS clients from `sdk` (which also reads the client
/// secret and the web-app feed token from Secrets Manager when the config names ARNs) and the system
/// clock.
pub async fn compose(config: &Config, sdk: &aws_config::SdkConfig) -> Result<ProductionPoller, ComposeError> {
    let mapillary = mapillary_app(&config.mapillary, sdk, CONNECT_TIMEOUT).await?;
    let feed_token = match &config.feed_token {
        Some(source) => Some(resolve_secret(source.clone(), FEED_TOKEN_ARN_VAR, sdk).await?),
        None => None,
    };
    let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
    let tables = &config.tables;
    Ok(PollerDeps {
        tracking: DynamoTracking::new(dynamodb.clone(), &tables.uploads_table),
        uploads: DynamoRepository::new(dynamodb.clone(), &tables.uploads_table),
        tokens: token_store(dynamodb.clone(), sdk, tables),
        inbox: SqsInbox::new(aws_sdk_sqs::Client::new(sdk), &config.clusters_queue_url),
        claims: DynamoIdempotency::new(dynamodb.clone(), &config.idempotency_table),
        events: EventBridgePublisher::new(aws_sdk_eventbridge::Client::new(sdk), config.event_bus.clone()),
        webhooks: WebhookSender::new(config.webhooks.clone()),
        mapillary,
        feed_token,
        tunables: config.tunables.clone(),
        clock: Clock::System,
    })
}
