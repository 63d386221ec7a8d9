//! Adapters: the ports implemented with AWS SDK clients (S3, SQS, DynamoDB, KMS, Secrets Manager,
//! EventBridge).
//! The Mapillary ports are implemented by `MapillaryApp` (`mapillary::app`).

mod aws_error;
pub mod dynamodb;
pub mod events;
pub mod s3;
pub mod secrets;
pub mod sqs;
pub mod tokens;
pub mod webhook_http;
