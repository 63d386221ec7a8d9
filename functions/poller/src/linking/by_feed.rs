//! Linking by the activity feed: the main path ("Plan B" in the seed write-up). The feed node of
//! an upload whose image processing finished names a representative `image_id`: image →
//! `sequence` → `image_ids` → image entities → [`link_by_order`]. [`link_uploads`] does this for
//! all of a user's uploads in a handful of requests; [`link_upload`] is the documented per-upload
//! path it falls back to.

use std::collections::{HashMap, HashSet};

use shared::domain::linking::{link_by_order, ImageOutcome, MapillaryImage, MapillarySequence};
use shared::domain::tiles::{BBox, LonLat};
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::client::SEARCH_LIMIT;
use shared::mapillary::session::TokenSession;
use shared::model::TrackingRecord;
use tracing::{debug, info, warn};

use crate::deps::Deps;
use crate::linking::common::{near, sequence_images, Linked, LinkingError};
use crate::ours::{our_images, our_images_many, OurImages};

/// Sequence ids per `images?sequence_id=` search (keeps the URL short).
const SEQUENCES_PER_SEARCH: usize = 50;

/// Link one upload whose image processing finished, from the feed node's `image_id`.
pub async fn link_upload<D: Deps>(
    d: &D,
    tok: &mut TokenSession<'_, D::Tokens, MapillaryApp>,
    record: &TrackingRecord,
    image_id: &str,
) -> Result<Linked, LinkingError> {
    let OurImages {
        entries,
        inputs: ours,
    } = our_images(d.uploads(), &record.upload_id).await?;
    if ours.is_empty() {
        return Err(LinkingError::Nothing(format!(
            "upload {} has no image entries",
            record.upload_id
        )));
    }
    let api = d.mapillary();
    let first: String = tok
        .call(|t| async move { api.image_sequence(&t, image_id).await })
        .await?;
    let mut sequences = vec![sequence_images(d, tok, &first).await?];
    let tol = d.tunables().tolerances;
    let mut report = link_by_order(&ours, &sequences, &tol)?;
    if report.dropped_count() > 0 {
        // The cluster may have become several sequences (§6.2 item 4): search around the images
        // that are still missing and add the sequences holding them.
        let missing: Vec<usize> = report
            .images
            .iter()
            .enumerate()
            .filter(|(_, i)| matches!(i.outcome, ImageOutcome::Dropped { .. }))
            .map(|(k, _)| k)
            .collect();
        let pts: Vec<LonLat> = missing
            .iter()
            .map(|&k| LonLat::new(ours[k].lon, ours[k].lat))
            .collect();
        if let Ok(Some(bbox)) = BBox::of_points(&pts).and_then(|b| match b {
            Some(b) => b.expanded_m(tol.distance_m + 1.0).map(Some),
            None => Ok(None),
        }) {
            let start =
                missing.iter().map(|&k| ours[k].captured_at_ms).min().unwrap_or(0) - tol.captured_at_ms;
            let end = missing.iter().map(|&k| ours[k].captured_at_ms).max().unwrap_or(0) + tol.captured_at_ms;
            let bbox = &bbox;
            let hits: Vec<MapillaryImage> = tok
                .call(|t| async move { api.search_images(&t, bbox, start, end).await })
                .await?;
            let known: HashSet<String> = sequences.iter().map(|s| s.id.clone()).collect();
            let mut extra: Vec<String> = hits
                .iter()
                .filter(|h| !known.contains(&h.sequence_id))
                .filter(|h| missing.iter().any(|&k| near(&ours[k], h, &tol)))
                .map(|h| h.sequence_id.clone())
                .collect();
            extra.sort();
            extra.dedup();
            if !extra.is_empty() {
                info!(extra = extra.len(), "the cluster spans more sequences");
                for s in extra {
                    sequences.push(sequence_images(d, tok, &s).await?);
                }
                report = link_by_order(&ours, &sequences, &tol)?;
            }
        }
    }
    info!(
        upload_id = %record.upload_id,
        sequences = report.sequence_ids.len(),
        linked = report.linked_count(),
        dropped = report.dropped_count(),
        "linked through the activity feed"
    );
    Ok(Linked { entries, report })
}

/// Link several uploads of one user at once (each with the feed node's representative
/// `image_id`), in a handful of requests instead of three per upload:
/// 1. our image entries, by key in `BatchGetItem`s when the record knows the upload's image count,
///    else one query per upload (`RELAY_UPLOAD_CONCURRENCY` at a time);
/// 2. every representative image's `sequence` in one batch (`images?image_ids=`);
/// 3. the images of all those sequences with `images?sequence_id=a,b,…` searches (§7.4), at
///    most [`SEARCH_LIMIT`] expected images and [`SEQUENCES_PER_SEARCH`] ids per request;
/// 4. [`link_by_order`] per upload, the search's images sorted by `captured_at`.
///
/// An upload falls back to [`link_upload`] (the documented per-upload path with `image_ids`'
/// authoritative order and the search for further sequences of a split cluster) when the batch
/// could not vouch for its result: a failed or possibly truncated request, equal capture times in
/// the sequence (the order would be a guess), or any image left unlinked. Results are in `jobs` order.
pub async fn link_uploads<D: Deps>(
    d: &D,
    tok: &mut TokenSession<'_, D::Tokens, MapillaryApp>,
    jobs: &[(&TrackingRecord, String)],
) -> Vec<Result<Linked, LinkingError>> {
    let ours = our_images_many(
        d.uploads(),
        jobs.iter().map(|(r, _)| *r),
        d.tunables().upload_concurrency,
    )
    .await;
    let mut reps: Vec<String> = jobs.iter().map(|(_, i)| i.clone()).collect();
    reps.sort();
    reps.dedup();
    let (api, batch, wanted_reps) = (d.mapillary(), d.tunables().entity_batch, &reps);
    let seq_of: HashMap<String, String> = match tok
        .call(|t| async move { api.images(&t, wanted_reps, batch).await })
        .await
    {
        Ok(imgs) => imgs.into_iter().map(|i| (i.id, i.sequence_id)).collect(),
        Err(e) => {
            warn!(error = %e, "batched image → sequence lookup failed: per-upload linking");
            HashMap::new()
        }
    };
    // Sequences to fetch, with the number of images expected (for the search limit).
    let mut wanted: Vec<(String, usize)> = Vec::new();
    for (k, (r, image_id)) in jobs.iter().enumerate() {
        let Some(s) = seq_of.get(image_id) else { continue };
        if wanted.iter().any(|(w, _)| w == s) {
            continue;
        }
        let ours_len = ours[k].as_ref().map(|o| o.inputs.len()).unwrap_or(0);
        let expected = r
            .item_count
            .and_then(|c| usize::try_from(c).ok())
            .unwrap_or(ours_len)
            .max(ours_len)
            .max(1);
        wanted.push((s.clone(), expected));
    }
    let mut found: HashMap<String, Vec<MapillaryImage>> = HashMap::new();
    let mut complete: HashSet<String> = HashSet::new();
    let mut rest = wanted.into_iter().peekable();
    while rest.peek().is_some() {
        let mut chunk: Vec<String> = Vec::new();
        let mut expected = 0usize;
        while let Some((s, n)) = rest.peek() {
            if !chunk.is_empty() && (expected + n >= SEARCH_LIMIT || chunk.len() >= SEQUENCES_PER_SEARCH) {
                break;
            }
            expected += n;
            chunk.push(s.clone());
            rest.next();
        }
        let ids = &chunk;
        match tok
            .call(|t| async move { api.images_of_sequences(&t, ids).await })
            .await
        {
            Ok(imgs) if imgs.len() < SEARCH_LIMIT => {
                for i in imgs {
                    found.entry(i.sequence_id.clone()).or_default().push(i);
                }
                complete.extend(chunk);
            }
            Ok(_) => debug!(
                sequences = chunk.len(),
                "search reply may be truncated: per-upload linking"
            ),
            Err(e) => warn!(error = %e, "searching the sequences' images failed: per-upload linking"),
        }
    }
    let tol = d.tunables().tolerances;
    let mut out = Vec::with_capacity(jobs.len());
    for ((record, image_id), mine) in jobs.iter().zip(ours) {
        let OurImages {
            entries,
            inputs: ours,
        } = match mine {
            Ok(v) => v,
            Err(e) => {
                out.push(Err(LinkingError::Repo(e)));
                continue;
            }
        };
        let batch = seq_of
            .get(image_id)
            .filter(|s| complete.contains(*s))
            .and_then(|s| {
                let mut images = found.get(s).cloned().unwrap_or_default();
                images.sort_by(|a, b| {
                    a.captured_at_ms
                        .cmp(&b.captured_at_ms)
                        .then_with(|| a.id.cmp(&b.id))
                });
                let ties = images
                    .windows(2)
                    .any(|w| w[0].captured_at_ms == w[1].captured_at_ms);
                (!ties && !images.is_empty()).then(|| MapillarySequence {
                    id: s.clone(),
                    images,
                })
            });
        if let (Some(seq), false) = (batch, ours.is_empty()) {
            match link_by_order(&ours, std::slice::from_ref(&seq), &tol) {
                Ok(report) if report.dropped_count() == 0 => {
                    debug!(upload_id = %record.upload_id, "linked through the activity feed (batched)");
                    out.push(Ok(Linked { entries, report }));
                    continue;
                }
                _ => {}
            }
        }
        out.push(link_upload(d, tok, record, image_id).await);
    }
    out
}
