//! The JSON documents of the API (see `openapi.yaml`), built from the records. Timestamps are
//! RFC 3339; absent values are `null`, never omitted, so clients see one shape.

use serde::Serialize;
use shared::domain::linking::{ImageOutcome, LinkPath};
use shared::domain::tracking::{FeedErrorClass, FeedSource, FeedState, OverallState, NO_ERROR};
use shared::mapillary::feed::StageStatus;
use shared::mapillary::image_link;
use shared::model::{FeedHealth, ImageLink, SequenceRecord, TrackingRecord, UploadImage, UploadRecord};
use time::OffsetDateTime;

/// RFC 3339, or `null`.
type Ts = Option<String>;

fn ts(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

fn ots(t: Option<OffsetDateTime>) -> Ts {
    t.map(ts)
}

/// Which way the status or links of an upload were obtained.
fn path_name(p: LinkPath) -> &'static str {
    match p {
        LinkPath::ActivityFeed => "ACTIVITY_FEED",
        LinkPath::CoverageTiles => "COVERAGE_TILES",
    }
}

/// `GET /v1/sequences`.
#[derive(Debug, Serialize)]
pub struct SequenceList {
    /// Newest first.
    pub sequences: Vec<SequenceSummary>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// One sequence in the list.
#[derive(Debug, Serialize)]
pub struct SequenceSummary {
    pub sequence_id: String,
    pub state: &'static str,
    pub reason: Option<String>,
    pub image_count: u32,
    pub accepted_count: u32,
    pub upload_count: usize,
    pub created_at: String,
    pub updated_at: String,
    /// Which run of the sequence this is: 1, then one more per re-drop after FAILED.
    pub attempt: u32,
}

impl From<&SequenceRecord> for SequenceSummary {
    fn from(s: &SequenceRecord) -> Self {
        Self {
            sequence_id: s.sequence_id.clone(),
            state: s.state.as_str(),
            reason: s.reason.clone(),
            image_count: s.image_count,
            accepted_count: s.accepted_count,
            upload_count: s.upload_ids.len(),
            created_at: ts(s.created_at),
            updated_at: ts(s.updated_at),
            attempt: s.progress.attempt(),
        }
    }
}

/// `GET /v1/sequences/{sequence_id}`.
#[derive(Debug, Serialize)]
pub struct SequenceDetail {
    pub sequence_id: String,
    /// Our pipeline's state (`RECEIVED`, `UPLOADING`, `UPLOADED`, `FAILED`, `AWAITING_UPLOAD_TOKEN`).
    pub state: &'static str,
    pub reason: Option<String>,
    pub image_count: u32,
    pub accepted_count: u32,
    pub rejected_count: usize,
    /// One page of the rejected images (`rejected_limit`, from `rejected_cursor`).
    pub rejected: Vec<Rejected>,
    /// The `rejected_cursor` of the next page, `None` on the last.
    pub rejected_next_cursor: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    /// Which run of the sequence this is: 1, then one more per re-drop after FAILED.
    pub attempt: u32,
    pub uploads: Vec<UploadView>,
    /// The activity feed over all users (each upload's `mapillary.feed` says how the owner's own
    /// status is read).
    pub feed: Option<FeedView>,
}

/// An image left out of the uploads.
#[derive(Debug, Serialize)]
pub struct Rejected {
    pub key: String,
    pub reason: String,
}

/// The activity feed's health, summed up over the users of the poller's last run.
#[derive(Debug, Serialize)]
pub struct FeedView {
    /// False when the last run could read the feed for nobody (everyone on coverage tiles).
    pub healthy: bool,
    pub degraded_since: Ts,
    /// `REFUSED`, `GONE` or `UNUSABLE`: the class of the last feed error (its detail is internal).
    pub last_error_class: Option<&'static str>,
    /// Users read with the web-app token, with their own token, and through coverage tiles.
    pub users_web_app_token: u32,
    pub users_user_token: u32,
    pub users_coverage_tiles: u32,
    pub updated_at: String,
}

/// How the poller reads an upload's status: the owner's own activity-feed state.
#[derive(Debug, Serialize)]
pub struct UploadFeedView {
    /// `WEB_APP_TOKEN`, `USER_TOKEN` (the activity feed, with that token) or `COVERAGE_TILES`.
    pub source: &'static str,
    /// Whether Mapillary's activity feed is available for this user.
    pub available: bool,
    /// Why an earlier source was not used: `REFUSED`, `GONE`, `UNUSABLE`; `null` when none failed.
    pub error_class: Option<&'static str>,
    /// The same in words.
    pub message: String,
    /// Since when.
    pub since: String,
}

/// The owner's feed state in words.
fn feed_message(source: FeedSource, class: Option<FeedErrorClass>) -> String {
    const TILES: &str = "status and links come from Mapillary's coverage tiles, which show an upload \
                         only once all four stages finished";
    match (source, class) {
        (FeedSource::WebAppToken, _) => "Status is read from Mapillary's activity feed.".into(),
        (FeedSource::UserToken, Some(FeedErrorClass::Refused)) => {
            "The activity feed refused the relay's web-app token; status is read from it with your own \
             token."
                .into()
        }
        (FeedSource::UserToken, _) => {
            "Status is read from Mapillary's activity feed with your own token.".into()
        }
        (FeedSource::CoverageTiles, Some(FeedErrorClass::Gone)) => {
            format!("Mapillary's activity feed is unavailable (its query is no longer known): {TILES}.")
        }
        (FeedSource::CoverageTiles, Some(FeedErrorClass::Refused)) => {
            format!("Mapillary's activity feed is unavailable: it refused every token the relay has for you; {TILES}.")
        }
        (FeedSource::CoverageTiles, _) => format!(
            "Mapillary's activity feed is unavailable: it answered in a form the relay cannot read; {TILES}."
        ),
    }
}

fn upload_feed_view(f: &FeedState) -> UploadFeedView {
    UploadFeedView {
        source: f.source.as_str(),
        available: f.source != FeedSource::CoverageTiles,
        error_class: f.error_class.map(FeedErrorClass::as_str),
        message: feed_message(f.source, f.error_class),
        since: ts(f.since),
    }
}

/// One upload (one zip, one Mapillary cluster).
#[derive(Debug, Serialize)]
pub struct UploadView {
    pub upload_id: String,
    pub index: u32,
    /// Our upload state (`PENDING` … `HANDED_OFF`, `FINISH_UNCERTAIN`, `FAILED`).
    pub state: &'static str,
    pub cluster_id: Option<String>,
    pub image_count: u32,
    pub bytes: u64,
    pub error: Option<String>,
    pub created_at: String,
    pub started_at: Ts,
    pub finished_at: Ts,
    /// What Mapillary did with it, once the poller tracks it.
    pub mapillary: Option<MapillaryView>,
}

/// Mapillary's processing of one upload.
#[derive(Debug, Serialize)]
pub struct MapillaryView {
    /// `IN_PROGRESS`, `FINISHED`, `STALE`, `FAILED`.
    pub state: &'static str,
    /// Why it is STALE or FAILED.
    pub reason: Option<String>,
    /// The four stages, in processing order.
    pub stages: Vec<StageView>,
    pub error_code: Option<String>,
    /// `error_code` in words.
    pub error_explanation: Option<String>,
    pub finish_upload_at: String,
    pub last_checked_at: Ts,
    /// Mapillary sequences the upload became, with a web link each (to its first image of ours).
    pub sequences: Vec<MapillarySequenceView>,
    /// Images Mapillary has (linked).
    pub accepted_count: u32,
    /// Images Mapillary dropped.
    pub rejected_count: u32,
    /// `item_count` of Mapillary's activity-feed entry.
    pub item_count: Option<i64>,
    /// Which path produced the links: `ACTIVITY_FEED` or `COVERAGE_TILES`; `null` until linked.
    pub status_source: Option<&'static str>,
    /// How the poller reads this upload's status now (the owner's feed state); `null` until a run
    /// read it.
    pub feed: Option<UploadFeedView>,
}

/// One processing stage.
#[derive(Debug, Serialize)]
pub struct StageView {
    /// Mapillary's field name (`status`, `initial_processing_status`, …).
    pub field: &'static str,
    /// Human label.
    pub label: &'static str,
    /// As Mapillary reported it (`IN_PROGRESS`, `FINISHED`, `FAILED`, or any other value); `null`
    /// while not reported.
    pub status: Option<String>,
}

/// A Mapillary sequence.
#[derive(Debug, Serialize)]
pub struct MapillarySequenceView {
    pub id: String,
    pub link: Option<String>,
}

/// The four stages: wire field and label.
pub const STAGES: [(&str, &str); 4] = [
    ("status", "Image ingestion"),
    ("initial_processing_status", "Image processing"),
    ("anonymization_status", "Map data processing"),
    ("tiler_status", "Map update"),
];

/// `error_code` in words. Mapillary documents no codes; only `UNSET` ("no error") has been seen.
pub fn explain_error_code(code: &str) -> String {
    if code == NO_ERROR || code.is_empty() {
        "No error reported by Mapillary.".to_string()
    } else {
        format!(
            "Mapillary reported error code {code} while processing this upload. Mapillary does not \
             document its error codes; the upload will not progress further. Check it in the Mapillary \
             app and upload the sequence again if needed."
        )
    }
}

fn mapillary_view(t: &TrackingRecord, links: &[ImageLink]) -> MapillaryView {
    let s = &t.tracked.stages;
    let values: [&Option<StageStatus>; 4] = [&s.ingestion, &s.image_processing, &s.map_data, &s.map_update];
    let stages = STAGES
        .iter()
        .zip(values)
        .map(|((field, label), v)| StageView {
            field,
            label,
            status: v.as_ref().map(|v| v.as_str().to_string()),
        })
        .collect();
    let reason = match &t.tracked.state {
        OverallState::Stale { reason } | OverallState::Failed { reason, .. } => Some(reason.clone()),
        _ => None,
    };
    let sequences = t
        .sequence_ids
        .iter()
        .map(|id| MapillarySequenceView {
            id: id.clone(),
            link: links.iter().find_map(|l| match &l.outcome {
                ImageOutcome::Linked {
                    image_id,
                    sequence_id,
                    ..
                } if sequence_id == id => Some(image_link(image_id)),
                _ => None,
            }),
        })
        .collect();
    let error_code = t.tracked.error_code.clone();
    MapillaryView {
        state: t.tracked.state.as_str(),
        reason,
        stages,
        error_explanation: error_code.as_deref().map(explain_error_code),
        error_code,
        finish_upload_at: ts(t.tracked.finished_upload_at),
        last_checked_at: ots(t.tracked.last_checked_at),
        sequences,
        accepted_count: t.linked_count,
        rejected_count: t.dropped_count,
        item_count: t.item_count,
        status_source: t.linked_via.map(path_name),
        feed: t.tracked.feed.as_ref().map(upload_feed_view),
    }
}

/// The upload's cluster id: zip-and-push's, or — for an upload whose `finish_upload` reply was lost
/// (FINISH_UNCERTAIN) — the one the poller adopted from the activity feed or got from finishing
/// again (its tracking record, the same owner's, no longer reconciling).
fn cluster_id(u: &UploadRecord, tracking: Option<&TrackingRecord>) -> Option<String> {
    u.cluster_id.clone().or_else(|| {
        tracking
            .filter(|t| t.user_id == u.user_id && t.upload_id == u.upload_id)
            .filter(|t| !t.tracked.is_reconciling() && !t.tracked.cluster_id.is_empty())
            .map(|t| t.tracked.cluster_id.clone())
    })
}

/// One upload with what the poller knows about it.
pub fn upload_view(u: &UploadRecord, tracking: Option<(&TrackingRecord, &[ImageLink])>) -> UploadView {
    UploadView {
        upload_id: u.upload_id.clone(),
        index: u.index,
        state: u.state.as_str(),
        cluster_id: cluster_id(u, tracking.map(|(t, _)| t)),
        image_count: u.image_count,
        bytes: u.total_len,
        error: u.error.clone(),
        created_at: ts(u.created_at),
        started_at: ots(u.started_at),
        finished_at: ots(u.finished_at),
        mapillary: tracking.map(|(t, l)| mapillary_view(t, l)),
    }
}

/// Which part of a list a response shows: `limit` entries from position `start`; `next` turns the
/// position after the page into the next page's cursor.
pub struct Page<F: Fn(usize) -> String> {
    /// Position of the first entry shown.
    pub start: usize,
    /// Entries shown at most.
    pub limit: usize,
    /// The cursor of a position.
    pub next: F,
}

/// The sequence document, with one page of its rejected images.
pub fn sequence_detail<F: Fn(usize) -> String>(
    seq: &SequenceRecord,
    uploads: Vec<UploadView>,
    feed: Option<&FeedHealth>,
    page: Page<F>,
) -> SequenceDetail {
    let after = page.start.saturating_add(page.limit);
    SequenceDetail {
        sequence_id: seq.sequence_id.clone(),
        state: seq.state.as_str(),
        reason: seq.reason.clone(),
        image_count: seq.image_count,
        accepted_count: seq.accepted_count,
        rejected_count: seq.rejected.len(),
        rejected: seq
            .rejected
            .iter()
            .skip(page.start)
            .take(page.limit)
            .map(|r| Rejected {
                key: r.key.clone(),
                reason: r.reason.clone(),
            })
            .collect(),
        rejected_next_cursor: (after < seq.rejected.len()).then(|| (page.next)(after)),
        created_at: ts(seq.created_at),
        updated_at: ts(seq.updated_at),
        attempt: seq.progress.attempt(),
        uploads,
        feed: feed.map(|f| FeedView {
            healthy: f.healthy,
            degraded_since: ots(f.degraded_since),
            last_error_class: f.last_error_class.map(FeedErrorClass::as_str),
            users_web_app_token: f.users_web_app_token,
            users_user_token: f.users_user_token,
            users_coverage_tiles: f.users_coverage_tiles,
            updated_at: ts(f.updated_at),
        }),
    }
}

/// `GET /v1/sequences/{sequence_id}/images`.
#[derive(Debug, Serialize)]
pub struct ImageList {
    pub sequence_id: String,
    /// One page (`limit`, from `cursor`): every upload's images in upload order, then the
    /// rejected ones.
    pub images: Vec<ImageView>,
    /// The `cursor` of the next page, `None` on the last.
    pub next_cursor: Option<String>,
}

/// One of our images and its Mapillary counterpart.
#[derive(Debug, Serialize)]
pub struct ImageView {
    /// Our object key (relative to the sequence prefix for rejected images, as the manifest lists
    /// them; full key otherwise).
    pub key: String,
    /// `LINKED`, `DROPPED` (Mapillary has no image for it), `PENDING` (not linked yet) or
    /// `REJECTED` (we did not upload it).
    pub status: &'static str,
    pub upload_id: Option<String>,
    pub index: Option<u32>,
    pub mapillary_image_id: Option<String>,
    pub mapillary_sequence_id: Option<String>,
    pub link: Option<String>,
    /// Why it was dropped or rejected.
    pub reason: Option<String>,
    /// Which path found the link or the drop.
    pub found_via: Option<&'static str>,
}

/// Our uploaded images with their links (by index), in upload order.
pub fn uploaded_images(images: &[UploadImage], links: &[ImageLink]) -> Vec<ImageView> {
    images
        .iter()
        .map(|img| {
            let link = links.iter().find(|l| l.index == img.index);
            let mut v = ImageView {
                key: img.key.clone(),
                status: "PENDING",
                upload_id: Some(img.upload_id.clone()),
                index: Some(img.index),
                mapillary_image_id: None,
                mapillary_sequence_id: None,
                link: None,
                reason: None,
                found_via: None,
            };
            if let Some(l) = link {
                v.found_via = Some(path_name(l.via));
                match &l.outcome {
                    ImageOutcome::Linked {
                        image_id,
                        sequence_id,
                        link,
                    } => {
                        v.status = "LINKED";
                        v.mapillary_image_id = Some(image_id.clone());
                        v.mapillary_sequence_id = Some(sequence_id.clone());
                        v.link = Some(link.clone());
                    }
                    ImageOutcome::Dropped { reason } => {
                        v.status = "DROPPED";
                        v.reason = Some(format!("Mapillary has no image for it: {reason}"));
                    }
                }
            }
            v
        })
        .collect()
}

/// The images we did not upload.
pub fn rejected_images(seq: &SequenceRecord) -> Vec<ImageView> {
    seq.rejected
        .iter()
        .map(|r| ImageView {
            key: r.key.clone(),
            status: "REJECTED",
            upload_id: None,
            index: None,
            mapillary_image_id: None,
            mapillary_sequence_id: None,
            link: None,
            reason: Some(r.reason.clone()),
            found_via: None,
        })
        .collect()
}

/// `POST /v1/mapillary/connect`.
#[derive(Debug, Serialize)]
pub struct ConnectStart {
    /// Send the user's browser here.
    pub authorize_url: String,
    /// The `state` stops working then.
    pub expires_at: String,
}

/// `GET` and `PUT /v1/mapillary/connection` (and the callback's JSON answer). Never the token.
#[derive(Debug, Serialize)]
pub struct Connection {
    pub connected: bool,
    /// `oauth` (connected through `/v1/mapillary/connect`) or `upload_token` (handed over with
    /// `PUT`); `null` when not connected.
    pub kind: Option<&'static str>,
    pub mapillary_user_id: Option<String>,
    pub username: Option<String>,
    /// Token expiry, when Mapillary gave one.
    pub expires_at: Ts,
    /// The token's expiry has passed (zip-and-push refreshes before use; reconnect if that fails).
    pub expired: bool,
    /// The stored token cannot be used (e.g. the key changed): connect again.
    pub reconnect_required: bool,
    /// Mapillary refused uploads with this OAuth token: hand over an upload token with `PUT`;
    /// sequences wait in `AWAITING_UPLOAD_TOKEN` until then.
    pub upload_token_required: bool,
    /// Mapillary's message when it refused the uploads, and when.
    pub upload_refusal: Option<UploadRefusalView>,
    pub updated_at: Ts,
}

/// Why uploads with the connection's OAuth token were refused.
#[derive(Debug, Serialize)]
pub struct UploadRefusalView {
    pub at: String,
    pub message: String,
}

impl Connection {
    /// No connection.
    pub fn none() -> Self {
        Self {
            connected: false,
            kind: None,
            mapillary_user_id: None,
            username: None,
            expires_at: None,
            expired: false,
            reconnect_required: false,
            upload_token_required: false,
            upload_refusal: None,
            updated_at: None,
        }
    }

    /// From a connection's clear metadata (no token involved).
    pub fn of(t: &shared::model::ConnectionMetadata, now: OffsetDateTime) -> Self {
        Self {
            connected: true,
            kind: Some(t.kind.as_str()),
            mapillary_user_id: t.mapillary_user_id.clone(),
            username: t.username.clone(),
            expires_at: ots(t.expires_at),
            expired: t.expires_at.is_some_and(|e| e <= now),
            reconnect_required: false,
            upload_token_required: t.upload_token_required(),
            upload_refusal: t.upload_refused.as_ref().map(|u| UploadRefusalView {
                at: ts(u.at),
                message: u.message.clone(),
            }),
            updated_at: Some(ts(t.updated_at)),
        }
    }
}

#[cfg(test)]
mod cluster_id_tests {
    use shared::domain::tracking::{adopt_cluster, Reconcile, TrackedUpload};
    use shared::model::{upload_id, UploadState};
    use time::macros::datetime;

    use super::*;

    fn uncertain() -> UploadRecord {
        UploadRecord {
            user_id: "u1".into(),
            sequence_id: "s1".into(),
            upload_id: upload_id("u1", "s1", 0),
            index: 0,
            state: UploadState::FinishUncertain,
            session_key: "mly_relay_0.zip".into(),
            total_len: 1000,
            image_count: 3,
            cluster_id: None,
            handle: Some("h".into()),
            organization_id: None,
            bytes_sent: 1000,
            created_at: datetime!(2026-03-01 10:00 UTC),
            started_at: Some(datetime!(2026-03-01 10:01 UTC)),
            finished_at: Some(datetime!(2026-03-01 10:02 UTC)),
            error: Some("finish_upload outcome unknown: 500".into()),
            attempts: 1,
            outbox: Default::default(),
        }
    }

    fn reconciling(u: &UploadRecord) -> TrackingRecord {
        let mut tracked = TrackedUpload::new(String::new(), datetime!(2026-03-01 10:02 UTC));
        tracked.reconcile = Some(Reconcile {
            created_from_s: 0,
            created_until_s: 1,
            first_captured_at_s: 0,
            image_count: 3,
            give_up_at: datetime!(2026-03-02 10:02 UTC),
            adopted_at: None,
            refinishes: 0,
        });
        TrackingRecord::new(
            u.user_id.clone(),
            u.sequence_id.clone(),
            u.upload_id.clone(),
            tracked,
            Some(3),
        )
    }

    #[test]
    fn an_adopted_cluster_is_shown_for_a_finish_uncertain_upload() {
        let u = uncertain();
        let mut t = reconciling(&u);
        // Still looking for it: nothing to show.
        assert_eq!(upload_view(&u, Some((&t, &[]))).cluster_id, None);
        adopt_cluster(&mut t.tracked, "c-42", datetime!(2026-03-01 10:05 UTC));
        assert_eq!(
            upload_view(&u, Some((&t, &[]))).cluster_id.as_deref(),
            Some("c-42")
        );
        // Another user's record under the same id is not this upload's outcome.
        let mut other = t.clone();
        other.user_id = "u2".into();
        assert_eq!(upload_view(&u, Some((&other, &[]))).cluster_id, None);
        // zip-and-push's own cluster id wins.
        let mut handed = u.clone();
        handed.cluster_id = Some("c-1".into());
        assert_eq!(
            upload_view(&handed, Some((&t, &[]))).cluster_id.as_deref(),
            Some("c-1")
        );
    }
}
