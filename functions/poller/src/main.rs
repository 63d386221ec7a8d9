//! Composition root: telemetry, typed config, SDK config, [`compose`], then the Lambda runtime
//! (each invocation is one run, see [`poller::lambda`]).

use aws_lambda_events::event::eventbridge::EventBridgeEvent;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use poller::compose::compose;
use poller::config::Config;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let config = Config::from_env()?;
    let sdk = aws_config::load_from_env().await;
    let poller = compose(&config, &sdk).await?;
    let poller = &poller;
    run(service_fn(
        move |event: LambdaEvent<EventBridgeEvent>| async move {
            Ok::<serde_json::Value, Error>(poller::lambda::invoke(poller, event.context.deadline).await)
        },
    ))
    .await
}
