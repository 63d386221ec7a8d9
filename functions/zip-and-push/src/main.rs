//! Composition root: telemetry, SDK config, typed config, adapters, then the Lambda runtime.

use std::time::{Duration, Instant, SystemTime};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use secrecy::SecretString;
use shared::adapters::dynamo::DynamoRepository;
use shared::adapters::mapillary::MapillaryAdapter;
use shared::adapters::s3::S3ObjectStore;
use shared::adapters::sqs::{SqsClusterQueue, SqsIngestRequeue};
use shared::adapters::tokens::KmsTokenStore;
use shared::mapillary::client::MapillaryClient;
use shared::mapillary::retry::RetryPolicy;
use zip_and_push::config::{ClientSecretSource, Config};
use zip_and_push::{handle_batch, HandlerDeps};

/// The Lambda deadline as an `Instant` (the context carries epoch milliseconds).
fn deadline_of(deadline_ms: u64) -> Instant {
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

async fn client_secret(
    source: ClientSecretSource,
    sdk: &aws_config::SdkConfig,
) -> Result<SecretString, Error> {
    match source {
        ClientSecretSource::Plain(s) => Ok(s),
        ClientSecretSource::SecretArn(arn) => {
            let out = aws_sdk_secretsmanager::Client::new(sdk)
                .get_secret_value()
                .secret_id(&arn)
                .send()
                .await
                .map_err(|e| {
                    format!(
                        "reading MAPILLARY_CLIENT_SECRET_ARN: {}",
                        aws_sdk_secretsmanager::error::DisplayErrorContext(e)
                    )
                })?;
            let s = out
                .secret_string()
                .ok_or("MAPILLARY_CLIENT_SECRET_ARN: the secret has no string value")?;
            Ok(SecretString::from(s.to_string()))
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let config = Config::from_env()?;
    let sdk = aws_config::load_from_env().await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let secret = client_secret(config.client_secret.clone(), &sdk).await?;
    let mapillary = MapillaryAdapter::new(
        MapillaryClient::new(config.endpoints.clone(), http, RetryPolicy::default()),
        config.client_id.clone(),
        secret,
    );
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let deps = HandlerDeps {
        store: S3ObjectStore::new(aws_sdk_s3::Client::new(&sdk)),
        repo: DynamoRepository::new(dynamodb.clone(), &config.uploads_table, &config.idempotency_table),
        tokens: KmsTokenStore::new(
            dynamodb,
            aws_sdk_kms::Client::new(&sdk),
            &config.users_table,
            &config.token_key_id,
        ),
        clusters: SqsClusterQueue::new(sqs.clone(), &config.clusters_queue_url),
        requeue: SqsIngestRequeue::new(sqs, &config.ingest_queue_url),
        mapillary,
        tunables: config.tunables.clone(),
    };
    let deps = &deps;
    run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let deadline = deadline_of(event.context.deadline);
        Ok::<SqsBatchResponse, Error>(handle_batch(deps, event.payload, deadline).await)
    }))
    .await
}
