//! Mapillary's wire protocol, client side, and the relay's use of it.
//!
//! * [`app`] — [`app::MapillaryApp`], the client with the app's OAuth credentials: every Mapillary
//!   call the functions make goes through it.
//! * [`session`] — a user's token during one invocation: load, refresh when it expires soon or after
//!   a 401, the Mapillary user id.
//! * [`client`] — the HTTP client (OAuth, rupload, `finish_upload`, feed, entities, searches, tiles).
//! * [`feed`] — the GraphQL activity feed's document and parser.
//! * [`replies`] — the parsers of every other reply (token, offset, upload handle, `finish_upload`,
//!   entities, `image_ids`, rupload `backoff`) and the token lifetime check.
//! * [`error`] — every failure of a call; [`retry`] — the upload retry policy and reply classification.
//!
//! Parsing is pure and tolerant: unknown JSON fields are ignored, unknown enum values are kept
//! verbatim, and ids, handles and cursors stay opaque strings.

pub mod app;
pub mod client;
pub mod error;
pub mod feed;
pub mod replies;
pub mod retry;
pub mod session;

/// The four base URLs of Mapillary's services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// Graph API, e.g. `https://graph.mapillary.com` (no trailing slash).
    pub graph: String,
    /// rupload base, e.g. `https://rupload.facebook.com/mapillary_public_uploads`.
    pub upload: String,
    /// Coverage tiles, e.g. `https://tiles.mapillary.com`.
    pub tiles: String,
    /// Web (the OAuth `/connect` page), e.g. `https://www.mapillary.com`.
    pub www: String,
}

impl Endpoints {
    /// The real Mapillary services.
    pub fn production() -> Self {
        Self {
            graph: "https://graph.mapillary.com".into(),
            upload: "https://rupload.facebook.com/mapillary_public_uploads".into(),
            tiles: "https://tiles.mapillary.com".into(),
            www: "https://www.mapillary.com".into(),
        }
    }

    /// Endpoints of the simulator (or any server with the same path layout) at `base`.
    pub fn under(base: &str) -> Self {
        let base = base.trim_end_matches('/');
        Self {
            graph: format!("{base}/graph"),
            upload: format!("{base}/rupload"),
            tiles: format!("{base}/tiles"),
            www: format!("{base}/www"),
        }
    }
}

pub use crate::domain::linking::image_link;
