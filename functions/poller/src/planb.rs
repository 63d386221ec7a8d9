//! Plan B: one walk of the user's activity feed per run (newest first, stopping as soon as every
//! pending cluster was seen, guarded by [`FeedWalk`]), and linking through the node's `image_id`:
//! image → `sequence` → `image_ids` → image entities → [`link_by_order`].

use std::collections::{HashMap, HashSet};

use futures::StreamExt;
use secrecy::SecretString;
use shared::domain::linking::{link_by_order, LinkReport, MapillaryImage, MapillarySequence, OurImage};
use shared::domain::tiles::{BBox, LonLat};
use shared::domain::tracking::{FeedWalk, WalkEnd, WalkLimits, WalkStep};
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::client::SEARCH_LIMIT;
use shared::mapillary::error::MapillaryError;
use shared::mapillary::feed::ActivityNode;
use shared::mapillary::session::{CallError, SessionError, TokenSession};
use shared::model::{ImagePosition, TrackingRecord};
use shared::ports::{ImageEntryReader, TokenStore};
use tracing::{debug, info, warn};

use crate::handler::{our_images, Poller};

/// What the feed walk produced.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedOutcome {
    /// The feed answered; `nodes` are the pending clusters seen (by cluster id).
    Walked {
        /// The user's Mapillary id.
        mapillary_user_id: String,
        /// Nodes of pending clusters.
        nodes: HashMap<String, ActivityNode>,
        /// With a horizon: every node created at or after it (reconciliation candidates).
        recent: Vec<ActivityNode>,
        /// Pages fetched.
        pages: u32,
        /// Why the walk ended.
        end: WalkEnd,
    },
    /// The feed cannot be used (GraphQL error, changed shape, unknown document, auth a refresh
    /// does not cure): use Plan A.
    Unusable(String),
    /// A transient failure (rate limit, 5xx, network): nothing learned, try next run.
    Skipped(String),
}

/// Whether a feed failure means "the feed path is broken" rather than "try again later".
fn unusable(e: &MapillaryError) -> bool {
    match e {
        MapillaryError::Feed(_) | MapillaryError::BadReply { .. } | MapillaryError::Unauthorized { .. } => {
            true
        }
        // "Please reduce the amount of data" (HTTP 500, code 1) will not go away by itself.
        MapillaryError::Server { message, .. } => message.starts_with("Please reduce"),
        MapillaryError::Api { status, .. } => (400..500).contains(status),
        _ => false,
    }
}

/// Walk the feed for `clusters`. `graphql_token` overrides the user's token for the feed calls
/// (a client token cannot be refreshed: a 401 with it makes the feed unusable).
pub async fn walk_feed<R, U, T: TokenStore, Q>(
    p: &Poller<R, U, T, Q>,
    tok: &mut TokenSession<'_, T, MapillaryApp>,
    graphql_token: Option<&SecretString>,
    hint: Option<String>,
    clusters: &[String],
    horizon: Option<i64>,
) -> FeedOutcome {
    let mapillary_user_id = match tok.mapillary_user_id(hint).await {
        Ok(id) => id,
        Err(SessionError::Mapillary(e)) if e.is_retriable() => return FeedOutcome::Skipped(e.to_string()),
        Err(e) => return FeedOutcome::Skipped(format!("Mapillary user id unknown: {e}")),
    };
    let limits = WalkLimits {
        max_pages: p.tunables.feed_max_pages,
    };
    let mut walk = FeedWalk::new(clusters.iter().cloned(), limits);
    if let Some(h) = horizon {
        walk = walk.with_horizon(h);
    }
    let mut nodes = HashMap::new();
    let mut recent = Vec::new();
    loop {
        let after = match walk.step() {
            WalkStep::Done(end) => {
                let end = end.clone();
                if end.is_anomaly() {
                    warn!(?end, "feed walk ended abnormally");
                }
                if !matches!(end, WalkEnd::AllSeen) {
                    debug!(
                        unseen = walk.unseen().len(),
                        ?end,
                        "not every pending cluster is in the feed"
                    );
                }
                if matches!(
                    end,
                    WalkEnd::UserNotFound | WalkEnd::RepeatedCursor { .. } | WalkEnd::MissingCursor
                ) {
                    return FeedOutcome::Unusable(format!("feed walk ended abnormally: {end:?}"));
                }
                return FeedOutcome::Walked {
                    mapillary_user_id,
                    nodes,
                    recent,
                    pages: walk.pages(),
                    end,
                };
            }
            WalkStep::Fetch { after } => after.clone(),
        };
        let page = loop {
            let token = graphql_token.unwrap_or(tok.access());
            match p
                .api
                .feed_page(
                    token,
                    &mapillary_user_id,
                    p.tunables.feed_page_size,
                    after.as_deref(),
                    p.tunables.hide_after_days,
                )
                .await
            {
                Ok(page) => break page,
                Err(e) if e.is_unauthorized() && graphql_token.is_none() => {
                    match tok.on_unauthorized().await {
                        Ok(true) => continue,
                        Ok(false) => return FeedOutcome::Unusable(format!("feed: {e} (after a refresh)")),
                        Err(SessionError::Mapillary(r)) if r.is_retriable() => {
                            return FeedOutcome::Skipped(r.to_string())
                        }
                        Err(r) => return FeedOutcome::Unusable(format!("feed: {e}; refresh failed: {r}")),
                    }
                }
                Err(e) if unusable(&e) => return FeedOutcome::Unusable(format!("feed: {e}")),
                Err(e) => return FeedOutcome::Skipped(format!("feed: {e}")),
            }
        };
        for n in &page.nodes {
            if walk.is_pending(&n.cluster_id) {
                nodes.insert(n.cluster_id.clone(), n.clone());
            }
            if horizon.is_some_and(|h| n.created_at_seconds.is_some_and(|c| c >= h)) {
                recent.push(n.clone());
            }
        }
        walk.on_page(&page);
    }
}

/// Why linking failed (retried next run).
#[derive(Debug, thiserror::Error)]
pub enum LinkFail {
    /// A Mapillary call failed.
    #[error("{0}")]
    Mapillary(MapillaryError),
    /// The token could not be refreshed.
    #[error("{0}")]
    Token(SessionError),
    /// Our records could not be read.
    #[error("records: {0}")]
    Repo(#[from] shared::ports::RepoError),
    /// The alignment refused its inputs.
    #[error("linking: {0}")]
    Link(#[from] shared::domain::linking::LinkError),
    /// Nothing of ours to link.
    #[error("{0}")]
    Nothing(String),
}

/// A Mapillary read with the user's token (refreshed once on a 401, see [`TokenSession::call`]).
impl From<CallError> for LinkFail {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Call(e) => LinkFail::Mapillary(e),
            CallError::Refresh(r) => LinkFail::Token(r),
        }
    }
}

/// The images of `sequence_id`, in `image_ids` order (entities batched).
pub async fn sequence_images<R, U, T: TokenStore, Q>(
    p: &Poller<R, U, T, Q>,
    tok: &mut TokenSession<'_, T, MapillaryApp>,
    sequence_id: &str,
) -> Result<MapillarySequence, LinkFail> {
    let api = &p.api;
    let ids: Vec<String> = tok
        .call(|t| async move { api.image_ids(&t, sequence_id).await })
        .await?;
    let (wanted, batch) = (&ids, p.tunables.entity_batch);
    let imgs: Vec<MapillaryImage> = tok
        .call(|t| async move { api.images(&t, wanted, batch).await })
        .await?;
    let mut by_id: HashMap<String, MapillaryImage> = imgs.into_iter().map(|i| (i.id.clone(), i)).collect();
    let images = ids.iter().filter_map(|id| by_id.remove(id)).collect();
    Ok(MapillarySequence {
        id: sequence_id.to_string(),
        images,
    })
}

/// Plan B linking of one upload whose image processing finished.
pub async fn link_by_feed<R, U: ImageEntryReader, T: TokenStore, Q>(
    p: &Poller<R, U, T, Q>,
    tok: &mut TokenSession<'_, T, MapillaryApp>,
    record: &TrackingRecord,
    image_id: &str,
) -> Result<(Vec<ImagePosition>, LinkReport), LinkFail> {
    let (entries, ours) = our_images(&p.uploads, &record.upload_id).await?;
    if ours.is_empty() {
        return Err(LinkFail::Nothing(format!(
            "upload {} has no image entries",
            record.upload_id
        )));
    }
    let api = &p.api;
    let first: String = tok
        .call(|t| async move { api.image_sequence(&t, image_id).await })
        .await?;
    let mut sequences = vec![sequence_images(p, tok, &first).await?];
    let tol = p.tunables.tolerances;
    let mut report = link_by_order(&ours, &sequences, &tol)?;
    if report.dropped_count() > 0 {
        // The cluster may have become several sequences (§6.2 item 4): search around the images
        // that are still missing and add the sequences holding them.
        let missing: Vec<usize> = report
            .images
            .iter()
            .enumerate()
            .filter(|(_, i)| matches!(i.outcome, shared::domain::linking::ImageOutcome::Dropped { .. }))
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
                .filter(|h| missing.iter().any(|&k| crate::plana::near(&ours[k], h, &tol)))
                .map(|h| h.sequence_id.clone())
                .collect();
            extra.sort();
            extra.dedup();
            if !extra.is_empty() {
                info!(extra = extra.len(), "the cluster spans more sequences");
                for s in extra {
                    sequences.push(sequence_images(p, tok, &s).await?);
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
    Ok((entries, report))
}

/// Sequence ids per `images?sequence_id=` search (keeps the URL short).
const SEQUENCES_PER_SEARCH: usize = 50;

/// An upload's images and its link report.
pub type Linked = (Vec<ImagePosition>, LinkReport);

/// An upload's image entries and the same as linking inputs.
pub type OursOf = (Vec<ImagePosition>, Vec<OurImage>);

/// Our image entries of `records`, in order: by key in batches for every record that knows its
/// `image_count` (and got exactly that many), by a query per upload for the others.
pub async fn our_images_many<'r, R, U: ImageEntryReader, T, Q>(
    p: &Poller<R, U, T, Q>,
    records: impl IntoIterator<Item = &'r TrackingRecord>,
) -> Vec<Result<OursOf, shared::ports::RepoError>> {
    let records: Vec<&TrackingRecord> = records.into_iter().collect();
    let keyed: Vec<(String, u32)> = records
        .iter()
        .filter_map(|r| r.image_count.filter(|c| *c > 0).map(|c| (r.upload_id.clone(), c)))
        .collect();
    let mut batched: HashMap<String, Vec<ImagePosition>> = HashMap::new();
    if !keyed.is_empty() {
        match p.uploads.get_image_positions(&keyed).await {
            Ok(lists) => {
                for ((id, count), images) in keyed.iter().zip(lists) {
                    if images.len() == *count as usize {
                        batched.insert(id.clone(), images);
                    } else {
                        warn!(upload_id = %id, found = images.len(), expected = count,
                            "image entries missing from the batched read: reading the upload's partition");
                    }
                }
            }
            Err(e) => warn!(error = %e, "batched read of image entries failed: one query per upload"),
        }
    }
    futures::stream::iter(records)
        .map(|r| {
            let hit = batched.remove(&r.upload_id);
            async move {
                match hit {
                    Some(entries) => {
                        let ours = entries.iter().map(crate::handler::our_image).collect();
                        Ok((entries, ours))
                    }
                    None => our_images(&p.uploads, &r.upload_id).await,
                }
            }
        })
        .buffered(p.tunables.upload_concurrency.max(1))
        .collect()
        .await
}

/// Plan B linking of several uploads of one user at once (each with the feed node's
/// representative `image_id`), in a handful of requests instead of three per upload:
/// 1. our image entries, by key in `BatchGetItem`s when the record knows the upload's image count,
///    else one query per upload (`RELAY_UPLOAD_CONCURRENCY` at a time);
/// 2. every representative image's `sequence` in one batch (`images?image_ids=`);
/// 3. the images of all those sequences with `images?sequence_id=a,b,…` searches (§7.4), at
///    most [`SEARCH_LIMIT`] expected images and [`SEQUENCES_PER_SEARCH`] ids per request;
/// 4. [`link_by_order`] per upload, the search's images sorted by `captured_at`.
///
/// An upload falls back to [`link_by_feed`] (the documented per-upload path with `image_ids`'
/// authoritative order and the search for further sequences of a split cluster) when the batch
/// could not vouch for its result: a failed or possibly truncated request, equal capture times in
/// the sequence (the order would be a guess), or any image left unlinked. Results are in `jobs` order.
pub async fn link_many<R, U: ImageEntryReader, T: TokenStore, Q>(
    p: &Poller<R, U, T, Q>,
    tok: &mut TokenSession<'_, T, MapillaryApp>,
    jobs: &[(&TrackingRecord, String)],
) -> Vec<Result<Linked, LinkFail>> {
    let ours = our_images_many(p, jobs.iter().map(|(r, _)| *r)).await;
    let mut reps: Vec<String> = jobs.iter().map(|(_, i)| i.clone()).collect();
    reps.sort();
    reps.dedup();
    let (api, batch, wanted_reps) = (&p.api, p.tunables.entity_batch, &reps);
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
        let ours_len = ours[k].as_ref().map(|(_, o)| o.len()).unwrap_or(0);
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
    let tol = p.tunables.tolerances;
    let mut out = Vec::with_capacity(jobs.len());
    for ((record, image_id), mine) in jobs.iter().zip(ours) {
        let (entries, ours) = match mine {
            Ok(v) => v,
            Err(e) => {
                out.push(Err(LinkFail::Repo(e)));
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
                    out.push(Ok((entries, report)));
                    continue;
                }
                _ => {}
            }
        }
        out.push(link_by_feed(p, tok, record, image_id).await);
    }
    out
}
