//! In-memory fakes of every port of [`crate::ports`] kept in AWS, for unit tests of the functions
//! (feature `fakes`; function crates enable it in their dev-dependencies only). Each fake stands
//! for one adapter and follows its port docs and that adapter's rules: etags are the md5 of the
//! content, claims follow [`crate::idempotency`], conditional writes check the stored state, the
//! run lease expires, the inbox hides received messages for its visibility timeout. Each module
//! tests its fake's contract.
//!
//! | Fake | Ports | Stands for |
//! |---|---|---|
//! | [`MemStore`] | [`ObjectStore`](crate::ports::ObjectStore), [`ObjectWriter`](crate::ports::ObjectWriter) | S3 |
//! | [`MemRepo`] | sequences, uploads, image entries, ingest errors, [`DropStore`](crate::ports::DropStore) | `DynamoRepository` |
//! | [`MemClaims`] | [`IdempotencyStore`](crate::ports::IdempotencyStore) | `DynamoIdempotency` |
//! | [`MemTracking`] | tracking, run lease, reconciliation | `DynamoTracking` |
//! | [`MemTokens`] | [`TokenStore`](crate::ports::TokenStore) | `KmsTokenStore` |
//! | [`MemStates`] | [`OAuthStateStore`](crate::ports::OAuthStateStore) | `DynamoStateStore` |
//! | [`MemQueues`] | [`ClusterQueue`](crate::ports::ClusterQueue), [`IngestRequeue`](crate::ports::IngestRequeue) | SQS sends |
//! | [`MemEvents`] | [`EventPublisher`](crate::ports::EventPublisher) | EventBridge |
//! | [`MemInbox`] | [`ClusterInbox`](crate::ports::ClusterInbox) (and `ClusterQueue`) | the clusters queue |
//!
//! Mapillary itself is not faked (tests run the offline simulator); [`RecordingMapillary`] wraps
//! the real client and records its upload reports and `finish_upload` calls.

use std::sync::{Mutex, MutexGuard};

pub mod drops;
pub mod env;
pub mod events;
pub mod idempotency;
pub mod mapillary;
pub mod oauth_state;
pub mod queues;
pub mod records;
pub mod store;
pub mod tokens;
pub mod tracking;

pub use env::common_env;
pub use events::MemEvents;
pub use idempotency::MemClaims;
pub use mapillary::RecordingMapillary;
pub use oauth_state::MemStates;
pub use queues::{MemInbox, MemQueues};
pub use records::{MemRepo, RepoState};
pub use store::{MemStore, MEM_CHUNK};
pub use tokens::MemTokens;
pub use tracking::{LeaseState, MemTracking, TrackingState};

/// A fake's lock. A panicking test thread poisons it; the data is still fine for the others.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
