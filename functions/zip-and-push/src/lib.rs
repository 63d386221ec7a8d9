//! zip-and-push: an S3 sequence drop (via SQS) becomes Mapillary clusters.
//!
//! * [`handler`] — the SQS batch handler ([`handler::handle_batch`]), generic over the ports
//!   ([`handler::Deps`]), and [`handler::sequence_status`].
//! * [`pipeline`] — one sequence: manifest → EXIF pass → sequence rules → records → uploads →
//!   `finish_upload` → cluster messages, resuming whatever a previous attempt left.
//! * [`zipstream`] — the mapillary_tools-format zip streamed from S3 from any offset.
//! * [`exifpass`] — metadata from ranged reads of the images' heads.
//! * [`manifest`] — the trigger contract (key layout, manifest JSON).
//! * [`config`] — environment configuration; [`compose`] — config + SDK config → production deps.
//! * [`malloc`] — glibc allocator settings `main` applies first.
//!
//! The unit tests run on the in-memory fakes of `shared::fakes`.

pub mod compose;
pub mod config;
pub mod exifpass;
pub mod handler;
pub mod malloc;
pub mod manifest;
pub mod pipeline;
#[cfg(test)]
mod testing;
pub mod zipstream;

pub use handler::{handle_batch, sequence_status, Deps, HandlerDeps};

#[cfg(test)]
mod tests;
