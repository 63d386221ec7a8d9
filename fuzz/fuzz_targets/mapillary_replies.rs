//! Mapillary's replies — token grant, rupload offset and handle, `finish_upload`, image entities,
//! `image_ids`, rupload `backoff`, the activity feed page and coverage tiles: any bytes → a value
//! or an error, never a panic, and what is accepted holds the invariants the callers rely on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_fuzz::feed::parse_page;
use relay_fuzz::mapillary::replies::{
    creator_id, data_images, finish_cluster_id, image_ids, rupload_backoff, token_expiry, token_grant,
    upload_handle, upload_offset, MAX_SERVER_BACKOFF, MAX_TOKEN_LIFETIME_S,
};
use relay_fuzz::tiles::{decode_coverage_tile, TileId};
use serde_json::Value;
use time::macros::datetime;

fuzz_target!(|data: &[u8]| {
    let now = datetime!(2026-03-01 10:00 UTC);
    let _ = upload_offset(200, data);
    if let Ok(h) = upload_handle(200, data) {
        assert!(!h.is_empty());
    }
    if let Ok(page) = parse_page(&String::from_utf8_lossy(data)) {
        assert!(!page.has_next_page || page.end_cursor.is_some());
    }
    let tile = TileId {
        z: 14,
        x: 8800,
        y: 5373,
    };
    let _ = decode_coverage_tile(tile, data);
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        match token_grant(&v) {
            Ok(g) => {
                assert!(g.expires_in.is_none_or(|s| s <= MAX_TOKEN_LIFETIME_S));
                // Every lifetime a grant may hold has an expiry date.
                assert!(token_expiry(now, g.expires_in).is_ok());
            }
            Err(e) => assert!(!e.message.is_empty()),
        }
        if let Ok(c) = finish_cluster_id(&v) {
            assert!(!c.is_empty());
        }
        if let Ok(images) = data_images(&v) {
            for i in images {
                assert!(!i.id.is_empty() && !i.sequence_id.is_empty());
            }
        }
        if let Ok(ids) = image_ids(&v) {
            assert!(ids.iter().all(|id| !id.is_empty()));
        }
        let _ = creator_id(&v);
        if let Some(d) = rupload_backoff(&v) {
            assert!(d <= MAX_SERVER_BACKOFF);
        }
    }
    // Any lifetime at all: an expiry or an error.
    if let Some(head) = data.first_chunk::<8>() {
        let secs = u64::from_le_bytes(*head);
        match token_expiry(now, Some(secs)) {
            Ok(at) => assert!(secs <= MAX_TOKEN_LIFETIME_S && at.is_some_and(|t| t >= now)),
            Err(_) => assert!(secs > MAX_TOKEN_LIFETIME_S),
        }
    }
});
