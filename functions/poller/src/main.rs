use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

async fn handler(event: LambdaEvent<SqsEvent>) -> Result<(), Error> {
    tracing::info!(records = event.payload.records.len(), "received");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    run(service_fn(handler)).await
}
