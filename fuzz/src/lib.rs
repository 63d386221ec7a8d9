//! The parsers under fuzzing, compiled from `shared`'s own source files. Depending on `shared`
//! itself would build the AWS SDKs with sanitizer instrumentation (many minutes on CI); these two
//! files use nothing from `shared` but external crates, so they compile here as they are.

#[path = "../../shared/src/mapillary/feed.rs"]
pub mod feed;

#[path = "../../shared/src/domain/tiles.rs"]
pub mod tiles;
