//! The code under fuzzing, compiled from `shared`'s own source files. Depending on `shared`
//! itself would build the AWS SDKs with sanitizer instrumentation (many minutes on CI); these
//! files use nothing from `shared` but each other and external crates, so they compile here as
//! they are.

#[path = "../../shared/src/mapillary/feed.rs"]
pub mod feed;

#[path = "../../shared/src/domain/tiles.rs"]
pub mod tiles;

// The planning path's modules sit at the crate root so that their `super::…` paths to each
// other resolve as they do inside `shared::domain`.
#[path = "../../shared/src/domain/description.rs"]
pub mod description;
#[path = "../../shared/src/domain/exif.rs"]
pub mod exif;
#[path = "../../shared/src/domain/jpeg.rs"]
pub mod jpeg;
#[path = "../../shared/src/domain/sequence.rs"]
pub mod sequence;
#[path = "../../shared/src/domain/zipfmt.rs"]
pub mod zipfmt;

// The reply parsers and the image type they produce. At the crate root like the others (a
// `#[path]` inside an inline module is resolved through a directory that does not exist here).
#[path = "../../shared/src/domain/linking.rs"]
pub mod linking;
#[path = "../../shared/src/mapillary/replies.rs"]
pub mod replies;

/// The planning path's modules under their `shared::domain` names, for [`planning`]; `linking`
/// (the image type of the entity parsers) and `tiles` for [`mapillary::replies`].
pub mod domain {
    pub use super::{description, exif, jpeg, linking, sequence, tiles, zipfmt};
}

/// `shared::mapillary`'s reply parsers under their `shared` names (the HTTP client around them is
/// not compiled here).
pub mod mapillary {
    pub use super::{feed, replies};
}

pub mod planning;
