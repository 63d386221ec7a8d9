//! Linking our images of an upload to Mapillary image ids, two ways:
//! * [`by_feed`] — the main path ("Plan B" in the seed write-up): the activity feed's
//!   representative image → its sequence(s) → alignment by order;
//! * [`by_tiles`] — the documented fallback ("Plan A" in the seed write-up) for a user whose feed
//!   is unusable: coverage tiles → candidates → matching.
//!
//! [`common`] holds what both share (result, error, a sequence's images, nearness).

pub mod by_feed;
pub mod by_tiles;
pub mod common;

use shared::domain::linking::LinkPath;

/// The link path label, for printing.
pub fn path_label(p: Option<LinkPath>) -> &'static str {
    match p {
        Some(LinkPath::ActivityFeed) => "activity feed",
        Some(LinkPath::CoverageTiles) => "coverage tiles",
        None => "-",
    }
}
