//! The integration tests (real moto, the in-process simulator, the real binaries), one test binary: each
//! file of this directory is a module, compiled and linked once instead of once per file (each was its own
//! binary linking the AWS SDK). One file's tests: `cargo test -p integration-tests --test integration zip_and_push::`.

mod adapters_drops;
mod adapters_dynamo;
mod adapters_s3;
mod adapters_sqs;
mod adapters_tokens;
mod infra_checks;
mod lambda_invoke;
mod local_stack;
mod mapillary_tools_conformance;
mod poller;
mod poller_events;
mod poller_reconcile;
mod status_api;
mod status_api_drops;
mod status_api_watch;
mod zip_and_push;
