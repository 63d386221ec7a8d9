//! zip-and-push: an S3 sequence drop (via SQS) becomes Mapillary clusters.
//!
//! * [`handler`] — the SQS batch handler ([`handler::handle_batch`]): claims, one attempt per
//!   sequence, per-record results; and [`handler::sequence_status`].
//! * [`deps`] — [`deps::Deps`], the ports the handler is generic over, and [`deps::HandlerDeps`].
//! * [`plan`] — manifest → EXIF pass → sequence rules → records, or the resume of the records a
//!   previous attempt wrote.
//! * [`upload`] — each upload: stream → `finish_upload` → cluster message, from its checkpoints.
//! * [`progress`] — invocations without progress, counted across continuations and retries.
//! * [`records`] — upload-record writes with their state-change events (one write each).
//! * [`zipstream`] — the mapillary_tools-format zip streamed from S3 from any offset.
//! * [`exifpass`] — metadata from ranged reads of the images' heads.
//! * [`manifest`] — the trigger contract (key layout, manifest JSON).
//! * [`config`] — environment configuration; [`compose`] — config + SDK config → production deps.
//! * [`malloc`] — glibc allocator settings `main` applies first.
//!
//! The unit tests run on the in-memory fakes of `shared::fakes`.

pub mod compose;
pub mod config;
pub mod deps;
pub mod exifpass;
pub mod handler;
pub mod malloc;
pub mod manifest;
pub mod plan;
pub mod progress;
pub mod reasons;
pub mod records;
pub mod upload;
pub mod zipstream;

pub use deps::{Deps, HandlerDeps};
pub use handler::{handle_batch, sequence_status};

#[cfg(test)]
mod tests;
