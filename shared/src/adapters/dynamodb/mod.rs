//! The DynamoDB adapters, one per table or item family, over one set of item helpers:
//!
//! * [`uploads`] — [`DynamoRepository`]: zip-and-push's records in the UploadsTable (sequences,
//!   uploads, image entries and their checkpoints, ingest errors); `drops` adds the status API's
//!   announcements of sequences dropped through it, and deleting a sequence's records;
//! * [`tracking`] — [`DynamoTracking`]: the poller's items in the UploadsTable (tracking records,
//!   pending sets, links, feed health, the run lease, the reconcile scan mark);
//! * [`idempotency`] — [`DynamoIdempotency`]: manifest claims in the IdempotencyTable;
//! * [`oauth_state`] — [`DynamoStateStore`]: single-use OAuth `state` values in the UsersTable;
//! * `item` — attribute values, (de)serialization, write requests and error mapping every adapter
//!   uses; `batch` — `BatchGetItem` / `BatchWriteItem` with their unprocessed-key retries.
//!
//! The KMS token store ([`crate::adapters::tokens`]) keeps its items in the UsersTable with the
//! same helpers.

pub(crate) mod batch;
mod drops;
pub mod idempotency;
pub(crate) mod item;
pub mod oauth_state;
pub mod tracking;
pub mod upload_events;
pub mod uploads;

pub use idempotency::DynamoIdempotency;
pub use oauth_state::DynamoStateStore;
pub use tracking::DynamoTracking;
pub use uploads::DynamoRepository;
