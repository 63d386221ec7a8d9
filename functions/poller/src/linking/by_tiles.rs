//! Linking by coverage tiles: the documented fallback ("Plan A" in the seed write-up), used for a
//! user whose activity feed is unusable. The z14 coverage tiles around the upload's images → tile
//! image points near ours (time and distance) → their sequences → `image_ids` → image entities →
//! [`match_candidates`]. Uploads appear in tiles only once `tiler_status` is FINISHED, so a match
//! also says "all four stages finished".
//!
//! Tiles show every user's public images: only sequences whose creator is this user's Mapillary
//! account are candidates (tile `creator_id` when the tile has it, and the sequence's first image
//! entity's `creator` always), so another user's drive along the same road at the same time is
//! never taken for ours (issue 15, item 7).

use std::collections::{BTreeSet, HashMap, HashSet};

use shared::domain::linking::{match_candidates, MapillaryImage, Tolerances};
use shared::domain::tiles::{
    decode_coverage_tile, tiles_covering_points, CoverageTile, LonLat, TileId, COVERAGE_ZOOM,
};
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::replies::creator_id;
use shared::mapillary::session::TokenSession;
use shared::model::TrackingRecord;
use tracing::{debug, info, warn};

use crate::deps::Deps;
use crate::linking::common::{near, sequence_images, Linked, LinkingError};
use crate::ours::{our_images, OurImages};

/// Tiles asked for one upload at most.
const MAX_TILES_PER_UPLOAD: usize = 64;

/// Decoded tiles of one run and user (uploads of a user usually share tiles).
#[derive(Debug, Default)]
pub struct TileCache {
    tiles: HashMap<TileId, CoverageTile>,
}

/// Find an upload through coverage tiles. `Ok(None)`: not (yet) in the tiles. Sequences in
/// `taken` (linked to other uploads already) are never candidates, so two uploads at the same
/// place are not linked to the same sequence. `known`: our images when already read (else they
/// are read here).
pub async fn find_upload<D: Deps>(
    d: &D,
    tok: &mut TokenSession<'_, D::Tokens, MapillaryApp>,
    record: &TrackingRecord,
    cache: &mut TileCache,
    taken: &HashSet<String>,
    known: Option<OurImages>,
) -> Result<Option<Linked>, LinkingError> {
    let OurImages {
        entries,
        inputs: ours,
    } = match known {
        Some(k) => k,
        None => our_images(d.uploads(), &record.upload_id).await?,
    };
    if ours.is_empty() {
        return Err(LinkingError::Nothing(format!(
            "upload {} has no image entries",
            record.upload_id
        )));
    }
    let mine = tok
        .mapillary_user_id(record.mapillary_user_id.clone())
        .await
        .map_err(LinkingError::Token)?;
    let tol = d.tunables().tolerances;
    let points: Vec<LonLat> = ours.iter().map(|o| LonLat::new(o.lon, o.lat)).collect();
    let tiles = tiles_covering_points(
        &points,
        COVERAGE_ZOOM,
        d.tunables().tile_margin_m,
        MAX_TILES_PER_UPLOAD,
    )
    .map_err(|e| LinkingError::Nothing(format!("tile maths: {e}")))?;
    let mut sequences: BTreeSet<String> = BTreeSet::new();
    for tile in tiles {
        if let std::collections::hash_map::Entry::Vacant(slot) = cache.tiles.entry(tile) {
            let api = d.mapillary();
            let bytes = tok
                .call(|t| async move { api.coverage_tile(&t, tile).await })
                .await?;
            let decoded = match bytes {
                None => CoverageTile::default(),
                Some(b) => match decode_coverage_tile(tile, &b) {
                    Ok(t) => t,
                    Err(e) => {
                        warn!(?tile, error = %e, "coverage tile unreadable: treated as empty");
                        CoverageTile::default()
                    }
                },
            };
            slot.insert(decoded);
        }
        let Some(content) = cache.tiles.get(&tile) else {
            continue;
        };
        for pt in &content.images {
            let Some(at) = pt.captured_at_ms else { continue };
            if pt.creator_id.as_ref().is_some_and(|c| c != &mine) {
                continue;
            }
            let cand = MapillaryImage {
                id: pt.id.clone(),
                sequence_id: pt.sequence_id.clone(),
                captured_at_ms: at,
                lon: pt.position.lon,
                lat: pt.position.lat,
                altitude: None,
            };
            // Tile positions are quantised (~0.6 m at z14): allow one extra metre.
            let loose = Tolerances {
                distance_m: tol.distance_m + 1.0,
                ..tol
            };
            if !taken.contains(&pt.sequence_id) && ours.iter().any(|o| near(o, &cand, &loose)) {
                sequences.insert(pt.sequence_id.clone());
            }
        }
    }
    if sequences.is_empty() {
        return Ok(None);
    }
    let mut candidates = Vec::new();
    for s in &sequences {
        let images = sequence_images(d, tok, s).await?.images;
        let Some(first) = images.first() else { continue };
        let api = d.mapillary();
        let first_id = first.id.as_str();
        let entity = tok
            .call(|t| async move { api.image(&t, first_id, &["creator"]).await })
            .await?;
        match creator_id(&entity.raw) {
            Some(c) if c == mine => candidates.extend(images),
            other => {
                debug!(sequence_id = %s, creator = other.as_deref().unwrap_or("-"),
                    "coverage-tile sequence of another creator: not a candidate");
            }
        }
    }
    let report = match_candidates(&ours, &candidates, &tol)?;
    if report.linked_count() == 0 {
        return Ok(None);
    }
    info!(
        upload_id = %record.upload_id,
        sequences = report.sequence_ids.len(),
        linked = report.linked_count(),
        dropped = report.dropped_count(),
        "linked through coverage tiles"
    );
    Ok(Some(Linked { entries, report }))
}
