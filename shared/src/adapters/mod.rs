//! Adapters: the ports implemented with AWS SDK clients (S3, SQS, DynamoDB, KMS) and Mapillary HTTP.

mod aws_error;
pub mod dynamodb;
pub mod mapillary;
pub mod s3;
pub mod secrets;
pub mod sqs;
pub mod tokens;
