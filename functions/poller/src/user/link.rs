//! Step 2 of a user's turn: link the uploads that need it. Through the activity feed for every
//! upload whose image processing finished, batched for the user (`linking::by_feed`); when the
//! user's feed is unusable, through coverage tiles upload by upload (`linking::by_tiles`), which
//! also says that all four stages finished. Sequences linked to other uploads — earlier, or by
//! another user's turn in this run (`linked_in_run`) — are never candidates by tiles.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use shared::domain::tracking::{apply_node, Transition};
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::feed::{ActivityNode, StageStatus, Stages};
use shared::mapillary::session::TokenSession;
use shared::model::TrackingRecord;
use shared::ports::TrackingStore;
use time::OffsetDateTime;
use tracing::warn;

use crate::deps::Deps;
use crate::linking::by_tiles::TileCache;
use crate::linking::{by_feed, by_tiles};
use crate::ours::{our_images_many, OurImages};
use crate::report::UserReport;
use crate::user::status::UploadTurn;

/// Link `turns` (only those that [need it](UploadTurn::needs_link)), by tiles when
/// `out.feed_unusable`, else by the feed; then add their sequences to `linked_in_run`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn link<D: Deps>(
    d: &D,
    user_id: &str,
    tok: &mut TokenSession<'_, D::Tokens, MapillaryApp>,
    turns: &mut [UploadTurn],
    now: OffsetDateTime,
    deadline: Instant,
    linked_in_run: &Mutex<HashSet<String>>,
    out: &mut UserReport,
) {
    if out.feed_unusable.is_some() {
        link_by_tiles(d, user_id, tok, turns, now, deadline, linked_in_run, out).await;
    } else {
        link_by_feed(d, tok, turns, deadline, out).await;
    }
    if let Ok(mut run) = linked_in_run.lock() {
        for w in turns.iter() {
            if !w.links.is_empty() {
                run.extend(w.record.sequence_ids.iter().cloned());
            }
        }
    }
}

/// The feed node a match in the coverage tiles stands for: all four stages finished.
fn finished_node(cluster_id: &str) -> ActivityNode {
    ActivityNode {
        cluster_id: cluster_id.to_string(),
        kind: None,
        created_at_seconds: None,
        captured_at_seconds: None,
        item_count: None,
        image_id: None,
        stages: Stages {
            ingestion: Some(StageStatus::Finished),
            image_processing: Some(StageStatus::Finished),
            map_data: Some(StageStatus::Finished),
            map_update: Some(StageStatus::Finished),
        },
        error_code: None,
        timezone: None,
    }
}

#[allow(clippy::too_many_arguments)]
async fn link_by_tiles<D: Deps>(
    d: &D,
    user_id: &str,
    tok: &mut TokenSession<'_, D::Tokens, MapillaryApp>,
    turns: &mut [UploadTurn],
    now: OffsetDateTime,
    deadline: Instant,
    linked_in_run: &Mutex<HashSet<String>>,
    out: &mut UserReport,
) {
    let mut taken: HashSet<String> = match d.tracking().user_linked_sequences(user_id).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "listing the user's linked sequences failed");
            out.errors.push(format!("user {user_id}: linked sequences: {e}"));
            HashSet::new()
        }
    };
    taken.extend(turns.iter().flat_map(|w| w.record.sequence_ids.iter().cloned()));
    // Our images of every upload to link, read in batches up front.
    let mut known: HashMap<String, OurImages> = HashMap::new();
    let wanted: Vec<&TrackingRecord> = turns
        .iter()
        .filter(|w| w.needs_link())
        .map(|w| &w.record)
        .collect();
    let read = our_images_many(
        d.uploads(),
        wanted.iter().copied(),
        d.tunables().upload_concurrency,
    )
    .await;
    for (r, mine) in wanted.iter().zip(read) {
        if let Ok(m) = mine {
            known.insert(r.upload_id.clone(), m);
        }
    }
    let mut tiles = TileCache::default();
    for w in turns.iter_mut().filter(|w| w.needs_link()) {
        if Instant::now() >= deadline {
            out.cut_off = true;
            break;
        }
        if let Ok(run) = linked_in_run.lock() {
            taken.extend(run.iter().cloned());
        }
        let mine = known.remove(&w.record.upload_id);
        match by_tiles::find_upload(d, tok, &w.record, &mut tiles, &taken, mine).await {
            Ok(Some(linked)) => {
                // In the tiles means all four stages finished; keep a cluster adoption of this run.
                let node = finished_node(&w.record.tracked.cluster_id);
                if let Ok(u) = apply_node(&w.record.tracked, &node, now, &d.tunables().policy) {
                    let adopted: Vec<Transition> = w
                        .update
                        .transitions
                        .iter()
                        .filter(|t| t.field == "cluster_id")
                        .cloned()
                        .collect();
                    w.update = u;
                    w.update.transitions.splice(0..0, adopted);
                }
                w.links = linked.links();
                linked.apply_to(&mut w.record);
                taken.extend(linked.report.sequence_ids.iter().cloned());
                out.linked_tiles += 1;
            }
            Ok(None) => {}
            Err(e) => {
                warn!(upload_id = %w.record.upload_id, error = %e, "lookup by coverage tiles failed");
                out.errors
                    .push(format!("upload {}: coverage tiles: {e}", w.record.upload_id));
            }
        }
    }
}

async fn link_by_feed<D: Deps>(
    d: &D,
    tok: &mut TokenSession<'_, D::Tokens, MapillaryApp>,
    turns: &mut [UploadTurn],
    deadline: Instant,
    out: &mut UserReport,
) {
    let jobs: Vec<(usize, String)> = turns
        .iter()
        .enumerate()
        .filter(|(_, w)| {
            w.needs_link() && matches!(w.update.stages.image_processing, Some(StageStatus::Finished))
        })
        .filter_map(|(k, w)| w.record.image_id.clone().map(|i| (k, i)))
        .collect();
    if jobs.is_empty() {
        return;
    }
    if Instant::now() >= deadline {
        out.cut_off = true;
        return;
    }
    let refs: Vec<(&TrackingRecord, String)> =
        jobs.iter().map(|(k, i)| (&turns[*k].record, i.clone())).collect();
    let results = by_feed::link_uploads(d, tok, &refs).await;
    drop(refs);
    for ((k, _), res) in jobs.iter().zip(results) {
        let w = &mut turns[*k];
        match res {
            Ok(linked) => {
                w.links = linked.links();
                linked.apply_to(&mut w.record);
                out.linked_feed += 1;
            }
            Err(e) => {
                warn!(upload_id = %w.record.upload_id, error = %e, "linking failed; retried next run");
                out.errors
                    .push(format!("upload {}: linking: {e}", w.record.upload_id));
            }
        }
    }
}
