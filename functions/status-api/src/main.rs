use lambda_http::{run, service_fn, Body, Error, Request, Response};

async fn handler(_req: Request) -> Result<Response<Body>, Error> {
    Ok(Response::builder().status(404).body(Body::Empty)?)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    run(service_fn(handler)).await
}
