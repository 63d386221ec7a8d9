//! Coverage tiles: any bytes → a decoded tile or a `DecodeError`, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_fuzz::tiles::{decode_coverage_tile, TileId};

fuzz_target!(|data: &[u8]| {
    let tile = TileId {
        z: 14,
        x: 8800,
        y: 5373,
    };
    if let Ok(decoded) = decode_coverage_tile(tile, data) {
        for p in decoded.images.iter().chain(&decoded.overview) {
            assert!(!p.id.is_empty() && !p.sequence_id.is_empty());
        }
        for s in &decoded.sequences {
            assert!(!s.parts.is_empty());
        }
    }
});
