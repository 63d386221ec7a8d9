//! mapillary-relay's library.
//!
//! * [`domain`] — pure logic (EXIF, MAP* descriptions, sequence rules, zip format): no AWS types, no I/O.
//! * [`mapillary`] — Mapillary wire protocol, client side (endpoints, activity feed).
//! * [`s3event`] — lenient parsing of S3 notifications as delivered through SQS (real AWS and moto shapes).
//! * [`telemetry`] — structured JSON logging set-up shared by every function.

pub mod domain;
pub mod mapillary;
pub mod s3event;
pub mod telemetry;
