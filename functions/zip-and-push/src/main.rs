//! Composition root: telemetry, SDK config, typed config, adapters, then the Lambda runtime.

use std::time::Duration;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use secrecy::SecretString;
use shared::adapters::dynamodb::{DynamoIdempotency, DynamoRepository};
use shared::adapters::mapillary::MapillaryAdapter;
use shared::adapters::s3::S3ObjectStore;
use shared::adapters::sqs::{SqsClusterQueue, SqsIngestRequeue};
use shared::adapters::tokens::KmsTokenStore;
use shared::mapillary::client::MapillaryClient;
use shared::mapillary::retry::RetryPolicy;
use zip_and_push::config::{ClientSecretSource, Config};
use zip_and_push::{handle_batch, HandlerDeps};

/// The function's timeout in infra/template.yaml: the deadline assumed when the invocation carries
/// none that is usable (see `shared::deadline`).
const FALLBACK_TIMEOUT: Duration = Duration::from_secs(900);

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

/// glibc malloc settings that keep the peak RSS flat with the upload size.
///
/// The body streams through buffers of a few hundred KiB (hyper's read buffers, split into
/// frames). glibc serves allocations above `M_MMAP_THRESHOLD` (128 KiB) with `mmap` and returns
/// them on free — but its *dynamic* threshold rises to the size of every mmapped chunk freed, after
/// which those buffers come from the heaps of per-thread arenas that fragment and keep freed memory
/// (measured with the default settings: 50.7 MiB at 200 MiB, 87.6 MiB at 2 GiB; with these: 50.1 and 61.0). Setting the threshold explicitly turns the
/// dynamic adjustment off, and two arenas bound the heaps the worker and blocking threads spread
/// over (`docs/benchmarks.md` has the before/after figures). Must run before any other thread
/// exists, hence before the runtime is built. A different allocator would also do; these two
/// settings need no new dependency.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    // SAFETY: `mallopt` only changes allocator parameters; it is called before any other thread
    // exists, with documented parameters and values.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() -> Result<(), Error> {
    tune_malloc();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run_function())
}

async fn run_function() -> Result<(), Error> {
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
        repo: DynamoRepository::new(dynamodb.clone(), &config.uploads_table),
        claims: DynamoIdempotency::new(dynamodb.clone(), &config.idempotency_table),
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
        let deadline = shared::deadline::from_epoch_ms(event.context.deadline, FALLBACK_TIMEOUT);
        Ok::<SqsBatchResponse, Error>(handle_batch(deps, event.payload, deadline).await)
    }))
    .await
}
