//! Composition root: telemetry, typed config, SDK config, [`compose`], then the Lambda HTTP runtime
//! serving the axum router.

use std::sync::Arc;

use lambda_http::{run, Error};
use status_api::compose::compose;
use status_api::config::Config;
use status_api::router;

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let config = Config::from_env()?;
    let sdk = aws_config::load_from_env().await;
    let deps = compose(&config, &sdk).await?;
    run(router(Arc::new(deps))).await
}
