//! Status-change events (issue 14, item 2): what a subscriber learns when an upload's state (ours:
//! zip-and-push's lifecycle) or its Mapillary stage or state changes, and the outbox that makes
//! their delivery at-least-once.
//!
//! Upload-state changes (`PENDING` → `UPLOADING` → `FINISHING` → `UPLOADED` → `HANDED_OFF`, or
//! `FAILED` / `FINISH_UNCERTAIN`, and `FAILED` → `PENDING` when a re-drop retries) are recorded by
//! whoever changes the upload record ([`set_upload_state`]; zip-and-push, and the poller's sweep of
//! stuck uploads) and written with it as [`UploadEvent`] items ([`crate::model::UploadOutbox`]); the
//! poller publishes them like the tracking record's, before the tracking record's of the same
//! upload, so a subscriber sees an upload handed off before its Mapillary stages.
//!
//! The outbox is part of the tracking record itself ([`TrackingRecord::pending_events`]): the poller
//! adds one [`OutboxEvent`] per recorded [`Transition`] to the record it writes, so the change and its
//! event are one write — a poller that dies before publishing loses nothing, the next run finds the
//! record by its outbox index entry and publishes it. An event's id is derived from the upload id
//! and the transition's position in the record's history: an event published twice (published,
//! then the run died before the outbox was cleared) carries the same id both times, for subscribers
//! to de-duplicate.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::domain::tracking::{OverallState, Transition};
use crate::model::{TrackingRecord, UploadRecord, UploadState};

/// `source` of every event.
pub const SOURCE: &str = "mapillary-relay";
/// `detail-type` of a change of one of Mapillary's four processing stages.
pub const STAGE_CHANGED: &str = "Mapillary Stage Changed";
/// `detail-type` of a change of the upload's overall Mapillary state (`IN_PROGRESS`, `FINISHED`,
/// `STALE`, `FAILED`).
pub const STATE_CHANGED: &str = "Mapillary State Changed";
/// `detail-type` of a change of Mapillary's `error_code`.
pub const ERROR_CODE_CHANGED: &str = "Mapillary Error Code Changed";
/// `detail-type` of a change of the upload's own state (zip-and-push's lifecycle: `PENDING`,
/// `UPLOADING`, `FINISHING`, `UPLOADED`, `HANDED_OFF`, `FINISH_UNCERTAIN`, `FAILED`).
pub const UPLOAD_STATE_CHANGED: &str = "Upload State Changed";
/// The `change.field` of an upload-state change.
pub const UPLOAD_STATE_FIELD: &str = "upload_state";

/// The wire names of Mapillary's four stages, in processing order.
pub const STAGE_FIELDS: [&str; 4] = [
    "status",
    "initial_processing_status",
    "anonymization_status",
    "tiler_status",
];

pub use crate::model::{OutboxEvent, UploadEvent};

/// An event as published (EventBridge entry: `source` is [`SOURCE`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayEvent {
    /// De-duplication id (also `detail.event_id`).
    pub id: String,
    /// `detail-type`.
    pub detail_type: String,
    /// `detail`.
    pub detail: Value,
}

/// Why events could not be published.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The bus refused or the call failed; publishing is retried (the outbox keeps the events).
    #[error("publishing events failed: {0}")]
    Publish(String),
    /// Some entries were refused (the others were published).
    #[error("{failed} of {total} events refused: {detail}")]
    Partial {
        /// Refused entries.
        failed: usize,
        /// Entries sent.
        total: usize,
        /// The first refusal.
        detail: String,
    },
    /// An event could not be encoded.
    #[error("encoding event {0}")]
    Encode(String),
}

/// The `detail-type` of a change of `field`.
pub fn detail_type(field: &str) -> &'static str {
    match field {
        "state" => STATE_CHANGED,
        "error_code" => ERROR_CODE_CHANGED,
        _ => STAGE_CHANGED,
    }
}

/// The event id of the transition at `position` in the history of `upload_id`.
pub fn event_id(upload_id: &str, position: usize) -> String {
    format!("{upload_id}:{position:05}")
}

/// The outbox entries of `transitions`, the first of which is at `first_position` in the record's
/// history (the history's length before they were appended).
pub fn outbox_events(upload_id: &str, first_position: usize, transitions: &[Transition]) -> Vec<OutboxEvent> {
    transitions
        .iter()
        .enumerate()
        .map(|(k, t)| OutboxEvent {
            id: event_id(upload_id, first_position + k),
            detail_type: detail_type(&t.field).to_string(),
            change: t.clone(),
        })
        .collect()
}

/// The event id of the upload-state change at `position` among `upload_id`'s (apart from the
/// tracking record's ids: `<upload_id>:upload:<position>`).
pub fn upload_event_id(upload_id: &str, position: u32) -> String {
    format!("{upload_id}:upload:{position:05}")
}

/// Record in `up`'s outbox that its state became `up.state` (from `from`; `None`: the upload was
/// just planned) at `at`: the event is written with the record's next write.
pub fn record_upload_state(up: &mut UploadRecord, from: Option<UploadState>, at: OffsetDateTime) {
    let position = up.outbox.recorded;
    up.outbox.unwritten.push(OutboxEvent {
        id: upload_event_id(&up.upload_id, position),
        detail_type: UPLOAD_STATE_CHANGED.to_string(),
        change: Transition {
            at,
            field: UPLOAD_STATE_FIELD.to_string(),
            from: from.map(|s| s.as_str().to_string()),
            to: Some(up.state.as_str().to_string()),
        },
    });
    up.outbox.recorded = position + 1;
}

/// Set `up`'s state to `to` at `at`; a change is recorded as an event when `publish` (a bus is
/// configured: `RELAY_EVENT_BUS`).
pub fn set_upload_state(up: &mut UploadRecord, to: UploadState, at: OffsetDateTime, publish: bool) {
    let from = up.state;
    up.state = to;
    if publish && from != to {
        record_upload_state(up, Some(from), at);
    }
}

/// The published form of an upload-state change: `detail` names the change and the upload as the
/// status API serves it (`uploads[]` of `GET /v1/sequences/{id}`, without the `mapillary` part,
/// which the `Mapillary …` events carry) as written with the change.
pub fn relay_upload_event(ev: &UploadEvent) -> RelayEvent {
    let u = &ev.upload;
    let detail = json!({
        "event_id": ev.event.id,
        "user_id": u.user_id,
        "sequence_id": u.sequence_id,
        "upload_id": u.upload_id,
        "cluster_id": u.cluster_id,
        "change": {
            "field": ev.event.change.field,
            "from": ev.event.change.from,
            "to": ev.event.change.to,
            "at": rfc3339(ev.event.change.at),
        },
        "upload": {
            "index": u.index,
            "state": u.state.as_str(),
            "cluster_id": u.cluster_id,
            "image_count": u.image_count,
            "bytes": u.total_len,
            "error": u.error,
            "created_at": rfc3339(u.created_at),
            "started_at": u.started_at.and_then(rfc3339),
            "finished_at": u.finished_at.and_then(rfc3339),
        },
    });
    RelayEvent {
        id: ev.event.id.clone(),
        detail_type: ev.event.detail_type.clone(),
        detail,
    }
}

fn rfc3339(t: OffsetDateTime) -> Option<String> {
    t.format(&time::format_description::well_known::Rfc3339).ok()
}

/// The published form of `ev`, an entry of `record`'s outbox: `detail` names the change and the
/// upload's Mapillary status as the record holds it when published (the status API's `mapillary`
/// fields: state, reason, the four stages in order, error code, sequences).
pub fn relay_event(record: &TrackingRecord, ev: &OutboxEvent) -> RelayEvent {
    let t = &record.tracked;
    let s = &t.stages;
    let values = [&s.ingestion, &s.image_processing, &s.map_data, &s.map_update];
    let stages: Vec<Value> = STAGE_FIELDS
        .iter()
        .zip(values)
        .map(|(field, v)| json!({"field": field, "status": v.as_ref().map(|v| v.as_str())}))
        .collect();
    let reason = match &t.state {
        OverallState::Stale { reason } | OverallState::Failed { reason, .. } => Some(reason.clone()),
        _ => None,
    };
    let detail = json!({
        "event_id": ev.id,
        "user_id": record.user_id,
        "sequence_id": record.sequence_id,
        "upload_id": record.upload_id,
        "cluster_id": t.cluster_id,
        "change": {
            "field": ev.change.field,
            "from": ev.change.from,
            "to": ev.change.to,
            "at": rfc3339(ev.change.at),
        },
        "mapillary": {
            "state": t.state.as_str(),
            "reason": reason,
            "stages": stages,
            "error_code": t.error_code,
            "finish_upload_at": rfc3339(t.finished_upload_at),
            "last_checked_at": t.last_checked_at.and_then(rfc3339),
            "sequences": record.sequence_ids,
            "accepted_count": record.linked_count,
            "rejected_count": record.dropped_count,
        },
    });
    RelayEvent {
        id: ev.id.clone(),
        detail_type: ev.detail_type.clone(),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn tr(field: &str, from: Option<&str>, to: &str) -> Transition {
        Transition {
            at: datetime!(2026-12-01 10:00:00 UTC),
            field: field.into(),
            from: from.map(str::to_string),
            to: Some(to.into()),
        }
    }

    #[test]
    fn ids_follow_the_history_position_and_types_the_field() {
        let evs = outbox_events(
            "u~s~000",
            3,
            &[
                tr("status", Some("IN_PROGRESS"), "FINISHED"),
                tr("state", Some("IN_PROGRESS"), "FINISHED"),
                tr("error_code", None, "UNSET"),
            ],
        );
        let ids: Vec<&str> = evs.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["u~s~000:00003", "u~s~000:00004", "u~s~000:00005"]);
        let types: Vec<&str> = evs.iter().map(|e| e.detail_type.as_str()).collect();
        assert_eq!(types, [STAGE_CHANGED, STATE_CHANGED, ERROR_CODE_CHANGED]);
        // Deterministic: the same transitions at the same place give the same ids.
        assert_eq!(
            outbox_events("u~s~000", 3, &[tr("status", Some("IN_PROGRESS"), "FINISHED")])[0].id,
            evs[0].id
        );
    }

    /// The keys of a JSON object, sorted.
    fn keys(v: &Value) -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    }

    fn sample_upload() -> UploadRecord {
        UploadRecord {
            user_id: "alice".into(),
            sequence_id: "s1".into(),
            upload_id: "alice~s1~000".into(),
            index: 0,
            state: UploadState::Pending,
            session_key: "mly_relay_x.zip".into(),
            total_len: 10,
            image_count: 3,
            cluster_id: None,
            handle: None,
            organization_id: None,
            bytes_sent: 0,
            created_at: datetime!(2026-12-01 10:00:00 UTC),
            started_at: None,
            finished_at: None,
            error: None,
            attempts: 0,
            outbox: Default::default(),
        }
    }

    #[test]
    fn upload_state_changes_get_consecutive_ids_and_are_written_with_their_record() {
        let at = datetime!(2026-12-01 10:00:01 UTC);
        let mut up = sample_upload();
        let created = up.created_at;
        record_upload_state(&mut up, None, created);
        set_upload_state(&mut up, UploadState::Uploading, at, true);
        set_upload_state(&mut up, UploadState::Uploading, at, true); // no change, no event
        set_upload_state(&mut up, UploadState::Failed, at, false); // no bus, no event
        set_upload_state(&mut up, UploadState::Pending, at, true);
        let ids: Vec<&str> = up.outbox.unwritten.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "alice~s1~000:upload:00000",
                "alice~s1~000:upload:00001",
                "alice~s1~000:upload:00002"
            ]
        );
        let changes: Vec<(Option<&str>, Option<&str>)> = up
            .outbox
            .unwritten
            .iter()
            .map(|e| (e.change.from.as_deref(), e.change.to.as_deref()))
            .collect();
        assert_eq!(
            changes,
            [
                (None, Some("PENDING")),
                (Some("PENDING"), Some("UPLOADING")),
                (Some("FAILED"), Some("PENDING"))
            ]
        );
        assert_eq!(up.outbox.recorded, 3);
        // The write stores one item per event, each with the record as written (without them).
        let items = UploadEvent::of_write(&up);
        assert_eq!(items.iter().map(|e| e.position).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(items.iter().all(|e| e.upload.outbox.unwritten.is_empty()));
        up.outbox.written();
        assert!(UploadEvent::of_write(&up).is_empty());
        // The next change continues the positions.
        set_upload_state(&mut up, UploadState::Uploading, at, true);
        let items = UploadEvent::of_write(&up);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].position, 3);
        assert_eq!(items[0].event.id, upload_event_id(&up.upload_id, 3));
    }

    /// The sample of an upload-state change (`events/published/upload-state-change.json`) has the
    /// fields [`relay_upload_event`] writes; a FAILED change carries the upload's error.
    #[test]
    fn the_upload_state_sample_is_what_a_subscriber_receives() {
        let sample: aws_lambda_events::eventbridge::EventBridgeEvent<Value> =
            serde_json::from_str(include_str!("../../events/published/upload-state-change.json"))
                .expect("sample deserializes");
        assert_eq!(sample.source, SOURCE);
        assert_eq!(sample.detail_type, UPLOAD_STATE_CHANGED);
        let mut up = sample_upload();
        set_upload_state(
            &mut up,
            UploadState::Failed,
            datetime!(2026-12-01 10:00:02 UTC),
            true,
        );
        up.error = Some("finish_upload failed: 400".into());
        let ours = relay_upload_event(&UploadEvent::of_write(&up)[0]);
        let d = &sample.detail;
        assert_eq!(keys(d), keys(&ours.detail));
        assert_eq!(keys(&d["change"]), keys(&ours.detail["change"]));
        assert_eq!(keys(&d["upload"]), keys(&ours.detail["upload"]));
        assert_eq!(d["change"]["field"], UPLOAD_STATE_FIELD);
        assert_eq!(ours.detail_type, UPLOAD_STATE_CHANGED);
        assert_eq!(ours.detail["change"]["to"], "FAILED");
        assert_eq!(ours.detail["upload"]["state"], "FAILED");
        assert_eq!(ours.detail["upload"]["error"], "finish_upload failed: 400");
        assert_eq!(ours.id, "alice~s1~000:upload:00000");
    }

    /// The sample a subscriber receives (`events/published/status-change.json`) deserializes as an
    /// EventBridge event, and its `detail` has exactly the fields [`relay_event`] writes.
    #[test]
    fn the_sample_event_is_what_a_subscriber_receives() {
        let sample: aws_lambda_events::eventbridge::EventBridgeEvent<Value> =
            serde_json::from_str(include_str!("../../events/published/status-change.json"))
                .expect("sample deserializes");
        assert_eq!(sample.source, SOURCE);
        assert_eq!(sample.detail_type, STAGE_CHANGED);
        let d = &sample.detail;
        let mut tracked =
            crate::domain::tracking::TrackedUpload::new("1234567890", datetime!(2026-12-01 10:00:00 UTC));
        tracked.error_code = Some("UNSET".into());
        let rec = TrackingRecord::new("alice".into(), "s1".into(), "alice~s1~000".into(), tracked, None);
        let ev = &outbox_events(
            &rec.upload_id,
            3,
            &[tr("anonymization_status", Some("IN_PROGRESS"), "FINISHED")],
        )[0];
        let ours = relay_event(&rec, ev);
        assert_eq!(keys(d), keys(&ours.detail));
        assert_eq!(keys(&d["change"]), keys(&ours.detail["change"]));
        assert_eq!(keys(&d["mapillary"]), keys(&ours.detail["mapillary"]));
        assert_eq!(d["event_id"], ours.id.as_str());
        assert_eq!(d["upload_id"], "alice~s1~000");
        assert_eq!(d["change"]["field"], "anonymization_status");
        let fields: Vec<&str> = d["mapillary"]["stages"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s["field"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(fields, STAGE_FIELDS);
    }
}
