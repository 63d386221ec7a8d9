//! Offline Mapillary simulator (see README.md in this crate).

pub mod content;
