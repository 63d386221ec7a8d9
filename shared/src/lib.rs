//! mapillary-relay's library.
//!
//! * [`domain`] — pure logic (EXIF, MAP* descriptions, sequence rules, zip format): no AWS types, no I/O.
//! * [`mapillary`] — Mapillary, client side: the app client every call goes through, users' token
//!   sessions (refresh), the wire protocol (rupload, feed, entities, tiles).
//! * [`s3event`] — lenient parsing of S3 notifications as delivered through SQS (real AWS and moto shapes).
//! * [`drops`] — sequences dropped through the status API: the announcement and its rules.
//! * [`events`] — status-change events and the tracking record's outbox.
//! * [`model`] — the records kept about sequences, uploads and images.
//! * [`idempotency`] — manifest claims: the lease rules that keep one invocation per manifest.
//! * [`ports`] — one small trait per capability; [`adapters`] implement them with AWS and Mapillary clients.
//! * [`config`] — typed reading of a function's environment (required names, tunables, endpoints).
//! * [`compose`] — what every function's composition root builds the same way (Mapillary app, tokens).
//! * [`telemetry`] — structured JSON logging set-up shared by every function.
//! * `fakes` (feature `fakes`, and in this crate's tests) — in-memory fakes of the ports.

pub mod adapters;
pub mod compose;
pub mod config;
pub mod deadline;
pub mod domain;
pub mod drops;
pub mod events;
#[cfg(any(test, feature = "fakes"))]
pub mod fakes;
pub mod idempotency;
pub mod mapillary;
pub mod model;
pub mod ports;
pub mod s3event;
pub mod telemetry;
pub mod webhook;
