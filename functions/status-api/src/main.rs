//! Composition root: telemetry, SDK config, typed config, adapters, then the Lambda HTTP runtime
//! serving the axum router.

use std::sync::Arc;
use std::time::Duration;

use lambda_http::{run, Error};
use secrecy::SecretString;
use shared::adapters::dynamodb::{DynamoRepository, DynamoStateStore, DynamoTracking};
use shared::adapters::tokens::KmsTokenStore;
use shared::mapillary::client::MapillaryClient;
use shared::mapillary::retry::RetryPolicy;
use status_api::config::{ClientSecretSource, Config};
use status_api::oauth::MapillaryConnector;
use status_api::{router, AppDeps};

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
    if let Some(h) = &config.settings.dev_auth_header {
        tracing::warn!(header = %h, "RELAY_DEV_AUTH_HEADER is set: requests without a JWT authorizer context are trusted by that header (local development only)");
    }
    let sdk = aws_config::load_from_env().await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .build()?;
    let secret = client_secret(config.client_secret.clone(), &sdk).await?;
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let deps = AppDeps {
        repo: DynamoRepository::new(dynamodb.clone(), &config.uploads_table),
        tracking: DynamoTracking::new(dynamodb.clone(), &config.uploads_table),
        tokens: KmsTokenStore::new(
            dynamodb.clone(),
            aws_sdk_kms::Client::new(&sdk),
            &config.users_table,
            &config.token_key_id,
        ),
        states: DynamoStateStore::new(dynamodb, &config.users_table),
        mapillary: MapillaryConnector::new(
            MapillaryClient::new(config.endpoints.clone(), http, RetryPolicy::default()),
            config.client_id.clone(),
            secret,
        ),
        settings: config.settings.clone(),
    };
    run(router(Arc::new(deps))).await
}
