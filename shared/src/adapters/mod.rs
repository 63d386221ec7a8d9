//! Adapters: the ports implemented with AWS SDK clients (S3, SQS, DynamoDB, KMS) and Mapillary HTTP.

pub mod mapillary;
