//! Adapters: the ports implemented with AWS SDK clients (S3, SQS, DynamoDB, KMS) and Mapillary HTTP.

mod aws_error;
mod batch;
pub mod dynamo;
pub mod mapillary;
pub mod oauth_state;
pub mod s3;
pub mod secrets;
pub mod sqs;
pub mod tokens;
pub mod tracking;
