//! Composition root: malloc tuning, telemetry, typed config, SDK config, [`compose`], then the
//! Lambda runtime.

use std::time::Duration;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use zip_and_push::compose::compose;
use zip_and_push::config::Config;
use zip_and_push::handle_batch;

/// The function's timeout in infra/template.yaml: the deadline assumed when the invocation carries
/// none that is usable (see `shared::deadline`).
const FALLBACK_TIMEOUT: Duration = Duration::from_secs(900);

fn main() -> Result<(), Error> {
    // Before the runtime's threads exist.
    zip_and_push::malloc::tune();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run_function())
}

async fn run_function() -> Result<(), Error> {
    shared::telemetry::init();
    let config = Config::from_env()?;
    let sdk = aws_config::load_from_env().await;
    let deps = compose(&config, &sdk).await?;
    let deps = &deps;
    run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let deadline = shared::deadline::from_epoch_ms(event.context.deadline, FALLBACK_TIMEOUT);
        Ok::<SqsBatchResponse, Error>(handle_batch(deps, event.payload, deadline).await)
    }))
    .await
}
