//! Adapters: the ports implemented with AWS SDK clients (S3, SQS, DynamoDB, KMS, Secrets Manager).
//! The Mapillary ports are implemented by `MapillaryApp` (`mapillary::app`).

mod aws_error;
mod batch;
pub mod dynamo;
pub mod oauth_state;
pub mod s3;
pub mod secrets;
pub mod sqs;
pub mod tokens;
pub mod tracking;
