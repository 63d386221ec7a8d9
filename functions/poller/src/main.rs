//! Composition root: telemetry, SDK config, typed config, adapters, then the Lambda runtime. The
//! EventBridge schedule's event content is ignored: every invocation is one run.

use std::time::{Duration, Instant};

use aws_lambda_events::event::eventbridge::EventBridgeEvent;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use poller::api::MapillaryApi;
use poller::clock::Clock;
use poller::config::{ClientSecretSource, Config};
use poller::{run_once, Poller};
use secrecy::SecretString;
use shared::adapters::dynamodb::{DynamoRepository, DynamoTracking};
use shared::adapters::sqs::SqsInbox;
use shared::adapters::tokens::KmsTokenStore;
use shared::mapillary::client::MapillaryClient;
use shared::mapillary::retry::RetryPolicy;

/// Stop starting new work this long before the Lambda deadline.
const DEADLINE_MARGIN: Duration = Duration::from_secs(20);

/// The function's timeout in infra/template.yaml: the deadline assumed when the invocation carries
/// none that is usable (see `shared::deadline`).
const FALLBACK_TIMEOUT: Duration = Duration::from_secs(300);

fn deadline_of(deadline_ms: u64) -> Instant {
    let at = shared::deadline::from_epoch_ms(deadline_ms, FALLBACK_TIMEOUT);
    let left = at.saturating_duration_since(Instant::now());
    Instant::now() + left.saturating_sub(DEADLINE_MARGIN)
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
    let api = MapillaryApi::new(
        MapillaryClient::new(config.endpoints.clone(), http.clone(), RetryPolicy::default()),
        http,
        config.client_id.clone(),
        secret,
    );
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let poller = Poller {
        tracking: DynamoTracking::new(dynamodb.clone(), &config.uploads_table),
        uploads: DynamoRepository::new(dynamodb.clone(), &config.uploads_table),
        tokens: KmsTokenStore::new(
            dynamodb,
            aws_sdk_kms::Client::new(&sdk),
            &config.users_table,
            &config.token_key_id,
        ),
        inbox: SqsInbox::new(aws_sdk_sqs::Client::new(&sdk), &config.clusters_queue_url),
        api,
        client_token: config.client_token.clone(),
        tunables: config.tunables.clone(),
        clock: Clock::System,
    };
    let poller = &poller;
    run(service_fn(
        move |event: LambdaEvent<EventBridgeEvent>| async move {
            let report = run_once(poller, deadline_of(event.context.deadline)).await;
            Ok::<serde_json::Value, Error>(serde_json::json!({
                "received": report.intake.received,
                "created": report.intake.created,
                "users": report.users,
                "checked": report.checked,
                "written": report.written,
                "linked_feed": report.linked_feed,
                "linked_tiles": report.linked_tiles,
                "plan_a_users": report.plan_a_users,
                "cut_off": report.cut_off,
                "lease_held": report.lease_held,
                "errors": report.errors.len(),
            }))
        },
    ))
    .await
}
