//! Tracking state machine and feed-walk planner (shared::domain::tracking), driven by the
//! protocol doc's exact sample bodies (§6.1) where it matters.

use shared::domain::tracking::{
    apply_node, check_deadlines, is_due, FeedWalk, OverallState, TrackedUpload, TrackingError,
    TrackingPolicy, WalkEnd, WalkLimits, WalkStep,
};
use shared::mapillary::feed::{parse_page, ActivityNode, ActivityPage, StageStatus, Stages};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

/// The protocol doc's §6.1 response, byte for byte (finished node of TV-2023a, in-progress
/// node of TV-2022, ellipses included).
const SEED_FEED_BODY: &str = r#"{
  "data": {
    "fetch__User": {
      "id": "101176865463974",
      "feed": {
        "page_info": {"start_cursor": null, "end_cursor": "AQHRfgT-…", "has_next_page": true, "has_previous_page": false},
        "nodes": [
          {"cluster_id": "151552211058876", "type": "UPLOAD",
           "created_at_seconds": 1683759912, "captured_at_seconds": 1683629036,
           "thumb_url": "https://scontent-….fbcdn.net/…", "item_count": 43, "image_id": "202467835974822",
           "status": "FINISHED", "initial_processing_status": "FINISHED",
           "anonymization_status": "FINISHED", "tiler_status": "FINISHED",
           "error_code": "UNSET", "timezone": "EUROPE_MADRID",
           "__typename": "ClusterLatestActivityItem"},
          {"cluster_id": "…", "type": "UPLOAD", "thumb_url": null, "item_count": null, "image_id": null,
           "status": "IN_PROGRESS", "initial_processing_status": "IN_PROGRESS",
           "anonymization_status": "IN_PROGRESS", "tiler_status": "IN_PROGRESS",
           "error_code": "UNSET", "__typename": "ClusterLatestActivityItem"}
        ],
        "__typename": "UserFeedConnection"
      },
      "__typename": "User"
    },
    "__typename": "Query"
  },
  "extensions": {"is_final": true}
}"#;

/// TV-2022's single-page shape: both cursors null, no next page.
const SEED_SINGLE_PAGE: &str = r#"{"data":{"fetch__User":{"id":"101176865463974","feed":{"page_info":{"start_cursor":null,"end_cursor":null,"has_next_page":false,"has_previous_page":false},"nodes":[{"cluster_id":"151552211058876","type":"UPLOAD","thumb_url":null,"item_count":null,"image_id":null,"status":"IN_PROGRESS","initial_processing_status":"IN_PROGRESS","anonymization_status":"IN_PROGRESS","tiler_status":"IN_PROGRESS","error_code":"UNSET","__typename":"ClusterLatestActivityItem"}],"__typename":"UserFeedConnection"},"__typename":"User"},"__typename":"Query"},"extensions":{"is_final":true}}"#;

const FINISHED_AT: OffsetDateTime = datetime!(2023-05-10 22:25:12 UTC);

fn upload(cluster: &str) -> TrackedUpload {
    TrackedUpload::new(cluster, FINISHED_AT)
}

fn node(cluster: &str, stages: [&str; 4], error_code: &str) -> ActivityNode {
    let s = |v: &str| Some(StageStatus::from(v.to_string()));
    ActivityNode {
        cluster_id: cluster.into(),
        kind: Some("UPLOAD".into()),
        created_at_seconds: None,
        captured_at_seconds: None,
        item_count: None,
        image_id: None,
        stages: Stages {
            ingestion: s(stages[0]),
            image_processing: s(stages[1]),
            map_data: s(stages[2]),
            map_update: s(stages[3]),
        },
        error_code: Some(error_code.into()),
        timezone: None,
    }
}

const IP: &str = "IN_PROGRESS";
const FIN: &str = "FINISHED";

#[test]
fn when_seed_sample_arrives_should_track_both_nodes() {
    let page = parse_page(SEED_FEED_BODY).expect("the seed's sample parses");
    assert_eq!(page.nodes.len(), 2);
    assert_eq!(page.end_cursor.as_deref(), Some("AQHRfgT-…"));
    let now = FINISHED_AT + Duration::hours(1);
    let policy = TrackingPolicy::default();

    let done = apply_node(&upload("151552211058876"), &page.nodes[0], now, &policy).expect("ok");
    assert!(done.changed);
    assert_eq!(done.state, OverallState::Finished);
    assert_eq!(done.error_code.as_deref(), Some("UNSET"));
    let fields: Vec<&str> = done.transitions.iter().map(|t| t.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "status",
            "initial_processing_status",
            "anonymization_status",
            "tiler_status",
            "error_code",
            "state"
        ]
    );
    assert!(done.transitions.iter().all(|t| t.at == now));
    let last = done.transitions.last().expect("state change");
    assert_eq!(
        (last.from.as_deref(), last.to.as_deref()),
        (Some("IN_PROGRESS"), Some("FINISHED"))
    );

    // The in-progress node's cluster id is the doc's literal "…".
    let pending = apply_node(&upload("…"), &page.nodes[1], now, &policy).expect("ok");
    assert_eq!(pending.state, OverallState::InProgress);
    assert_eq!(pending.stages.ingestion, Some(StageStatus::InProgress));
    assert!(pending.changed, "first sighting records the stages");

    let single = parse_page(SEED_SINGLE_PAGE).expect("parses");
    let mut walk = FeedWalk::new(["151552211058876", "other"], WalkLimits::default());
    assert_eq!(walk.on_page(&single), &WalkStep::Done(WalkEnd::EndOfFeed));
    assert_eq!(walk.unseen(), ["other"]);
}

#[test]
fn stage_progression_records_each_transition_once() {
    let policy = TrackingPolicy::default();
    let mut u = upload("C1");
    let steps: [([&str; 4], &str); 5] = [
        ([IP, IP, IP, IP], "IN_PROGRESS"),
        ([FIN, IP, IP, IP], "IN_PROGRESS"),
        ([FIN, FIN, IP, IP], "IN_PROGRESS"),
        ([FIN, FIN, FIN, IP], "IN_PROGRESS"),
        ([FIN, FIN, FIN, FIN], "FINISHED"),
    ];
    let mut history = Vec::new();
    for (k, (stages, state)) in steps.iter().enumerate() {
        let now = FINISHED_AT + Duration::minutes(5 * (k as i64 + 1));
        let up = apply_node(&u, &node("C1", *stages, "UNSET"), now, &policy).expect("ok");
        assert!(up.changed);
        assert_eq!(up.state.as_str(), *state);
        u.apply(&up);
        history.extend(up.transitions);
        // Seeing the same node again changes nothing.
        let again = apply_node(&u, &node("C1", *stages, "UNSET"), now, &policy).expect("ok");
        assert!(!again.changed && again.transitions.is_empty());
    }
    // 4 initial values + error_code, then one per stage, then the state.
    assert_eq!(history.len(), 5 + 4 + 1);
    assert!(u.state.is_final());
    assert!(!is_due(&u, FINISHED_AT + Duration::days(1), &policy));
}

#[test]
fn when_a_stage_fails_should_be_failed_with_the_error_code() {
    let policy = TrackingPolicy::default();
    let now = FINISHED_AT + Duration::hours(2);
    let up = apply_node(
        &upload("C1"),
        &node("C1", [FIN, "FAILED", IP, IP], "IMAGE_PROCESSING_ERROR"),
        now,
        &policy,
    )
    .expect("ok");
    match &up.state {
        OverallState::Failed {
            error_code,
            stage,
            reason,
        } => {
            assert_eq!(error_code.as_deref(), Some("IMAGE_PROCESSING_ERROR"));
            assert_eq!(stage.as_deref(), Some("initial_processing_status"));
            assert!(reason.contains("Image processing FAILED"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // An error code without a failed stage (real codes unknown; a drifted feed sends them beside
    // running stages) is recorded but does not fail the upload (issue 13).
    let up = apply_node(&upload("C1"), &node("C1", [FIN, IP, IP, IP], "E42"), now, &policy).expect("ok");
    assert_eq!(up.state, OverallState::InProgress);
    assert_eq!(up.error_code.as_deref(), Some("E42"));
    assert!(up
        .transitions
        .iter()
        .any(|t| t.field == "error_code" && t.to.as_deref() == Some("E42")));
    // Nor does it with an unknown spelling of "failed": unknown values count as in progress.
    let up = apply_node(
        &upload("C1"),
        &node("C1", [FIN, "FAILURE", "NOT_STARTED", IP], "E42"),
        now,
        &policy,
    )
    .expect("ok");
    assert_eq!(up.state, OverallState::InProgress);
    // It still ends like any unfinished upload: STALE, then FAILED at the hard stop, with the code.
    let late = FINISHED_AT + policy.hard_stop_after;
    let up = apply_node(
        &upload("C1"),
        &node("C1", [FIN, IP, IP, IP], "E42"),
        late,
        &policy,
    )
    .expect("ok");
    assert!(
        matches!(&up.state, OverallState::Failed { reason, .. } if reason.contains("gave up")),
        "{:?}",
        up.state
    );
}

#[test]
fn when_values_are_unknown_should_keep_them_verbatim_and_stay_in_progress() {
    let policy = TrackingPolicy::default();
    let now = FINISHED_AT + Duration::hours(2);
    let mut u = upload("C1");
    let up = apply_node(
        &u,
        &node("C1", [FIN, "QUEUED", "NOT_STARTED", "NOT_STARTED"], "UNSET"),
        now,
        &policy,
    )
    .expect("ok");
    assert_eq!(up.state, OverallState::InProgress);
    assert_eq!(
        up.stages.image_processing,
        Some(StageStatus::Other("QUEUED".into()))
    );
    let t = up
        .transitions
        .iter()
        .find(|t| t.field == "initial_processing_status")
        .expect("recorded");
    assert_eq!(t.to.as_deref(), Some("QUEUED"));
    u.apply(&up);
    // A node that lost a field keeps the tracked value instead of erasing it.
    let mut partial = node("C1", [FIN, FIN, "NOT_STARTED", "NOT_STARTED"], "UNSET");
    partial.stages.map_data = None;
    partial.error_code = None;
    let up = apply_node(&u, &partial, now, &policy).expect("ok");
    assert_eq!(up.stages.map_data, Some(StageStatus::Other("NOT_STARTED".into())));
    assert_eq!(up.error_code.as_deref(), Some("UNSET"));
    assert_eq!(up.transitions.len(), 1);
    // A node for another cluster is refused.
    assert!(matches!(
        apply_node(&u, &node("C2", [FIN; 4], "UNSET"), now, &policy),
        Err(TrackingError::WrongCluster { .. })
    ));
}

#[test]
fn stale_then_failed_on_the_clock() {
    let policy = TrackingPolicy::default();
    let mut u = upload("C1");
    let up = apply_node(
        &u,
        &node("C1", [FIN, IP, IP, IP], "UNSET"),
        FINISHED_AT + Duration::hours(1),
        &policy,
    )
    .expect("ok");
    u.apply(&up);
    u.last_checked_at = Some(FINISHED_AT + Duration::hours(1));

    let before = check_deadlines(&u, FINISHED_AT + Duration::hours(71), &policy);
    assert!(!before.changed);
    let stale = check_deadlines(&u, FINISHED_AT + Duration::hours(72), &policy);
    assert!(stale.changed);
    match &stale.state {
        OverallState::Stale { reason } => {
            assert!(reason.contains("72 h"), "{reason}");
            assert!(reason.contains("Image processing: IN_PROGRESS"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(stale.transitions.len(), 1);
    assert_eq!(stale.transitions[0].to.as_deref(), Some("STALE"));
    u.apply(&stale);
    u.last_checked_at = Some(FINISHED_AT + Duration::hours(72));

    // Checked at the slower rate.
    assert!(!is_due(&u, FINISHED_AT + Duration::hours(73), &policy));
    assert!(is_due(&u, FINISHED_AT + Duration::hours(78), &policy));

    // Finishing late is still FINISHED.
    let late = apply_node(
        &u,
        &node("C1", [FIN; 4], "UNSET"),
        FINISHED_AT + Duration::hours(80),
        &policy,
    )
    .expect("ok");
    assert_eq!(late.state, OverallState::Finished);

    let gave_up = check_deadlines(&u, FINISHED_AT + Duration::days(14), &policy);
    match &gave_up.state {
        OverallState::Failed {
            error_code,
            stage,
            reason,
        } => {
            assert_eq!(error_code, &None);
            assert_eq!(stage.as_deref(), Some("initial_processing_status"));
            assert!(reason.contains("14 days"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    u.apply(&gave_up);
    assert!(!is_due(&u, FINISHED_AT + Duration::days(20), &policy));

    // Every limit is configurable.
    let quick = TrackingPolicy {
        stale_after: Duration::minutes(30),
        hard_stop_after: Duration::hours(2),
        poll_every: Duration::minutes(10),
        stale_poll_every: Duration::minutes(45),
    };
    let mut v = upload("C9");
    assert!(matches!(
        check_deadlines(&v, FINISHED_AT + Duration::minutes(31), &quick).state,
        OverallState::Stale { .. }
    ));
    assert!(matches!(
        check_deadlines(&v, FINISHED_AT + Duration::hours(2), &quick).state,
        OverallState::Failed { .. }
    ));
    assert!(is_due(&v, FINISHED_AT, &quick), "never checked");
    v.last_checked_at = Some(FINISHED_AT);
    assert!(!is_due(&v, FINISHED_AT + Duration::minutes(9), &quick));
    assert!(is_due(&v, FINISHED_AT + Duration::minutes(10), &quick));
}

fn page(clusters: &[&str], next: Option<&str>) -> ActivityPage {
    ActivityPage {
        user_found: true,
        nodes: clusters.iter().map(|c| node(c, [IP; 4], "UNSET")).collect(),
        has_next_page: next.is_some(),
        end_cursor: next.map(str::to_string),
        skipped_nodes: 0,
        errors: Vec::new(),
    }
}

#[test]
fn feed_walk_stops_once_every_pending_cluster_is_seen() {
    let mut walk = FeedWalk::new(["c3", "c120"], WalkLimits::default());
    assert_eq!(walk.step(), &WalkStep::Fetch { after: None });
    let names: Vec<String> = (0..50).map(|k| format!("c{k}")).collect();
    let p1: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(
        walk.on_page(&page(&p1, Some("CUR1"))),
        &WalkStep::Fetch {
            after: Some("CUR1".into())
        }
    );
    assert!(walk.is_pending("c120") && !walk.is_pending("c4"));
    assert_eq!(walk.unseen(), ["c120"]);
    let names: Vec<String> = (100..150).map(|k| format!("c{k}")).collect();
    let p3: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = walk.on_page(&page(&["c50"], Some("CUR2")));
    assert_eq!(
        walk.on_page(&page(&p3, Some("CUR3"))),
        &WalkStep::Done(WalkEnd::AllSeen)
    );
    assert_eq!(walk.pages(), 3);
    // Pages after the end are ignored.
    let _ = walk.on_page(&page(&["c1"], Some("CUR4")));
    assert_eq!(walk.pages(), 3);
    // Nothing pending: no request at all.
    let none = FeedWalk::new(Vec::<String>::new(), WalkLimits::default());
    assert_eq!(none.step(), &WalkStep::Done(WalkEnd::AllSeen));
}

#[test]
fn feed_walk_guards_against_loops_and_endless_feeds() {
    let mut walk = FeedWalk::new(["x"], WalkLimits::default());
    let _ = walk.on_page(&page(&["a"], Some("A")));
    let _ = walk.on_page(&page(&["b"], Some("B")));
    let end = walk.on_page(&page(&["c"], Some("A"))).clone();
    assert_eq!(
        end,
        WalkStep::Done(WalkEnd::RepeatedCursor { cursor: "A".into() })
    );
    let WalkStep::Done(e) = end else { unreachable!() };
    assert!(e.is_anomaly());

    let mut walk = FeedWalk::new(["x"], WalkLimits::default());
    let broken = ActivityPage {
        end_cursor: None,
        ..page(&["a"], Some("ignored"))
    };
    assert_eq!(walk.on_page(&broken), &WalkStep::Done(WalkEnd::MissingCursor));

    let mut walk = FeedWalk::new(["x"], WalkLimits { max_pages: 3 });
    let mut k = 0;
    while let WalkStep::Fetch { .. } = walk.step() {
        k += 1;
        let _ = walk.on_page(&page(&[], Some(&format!("CUR{k}"))));
    }
    assert_eq!(walk.step(), &WalkStep::Done(WalkEnd::PageLimit { pages: 3 }));
    assert_eq!(k, 3);

    let mut walk = FeedWalk::new(["x"], WalkLimits::default());
    let unknown =
        parse_page(r#"{"data":{"fetch__User":null,"__typename":"Query"},"extensions":{"is_final":true}}"#)
            .expect("parses");
    assert_eq!(walk.on_page(&unknown), &WalkStep::Done(WalkEnd::UserNotFound));

    // The seed sample's next page is fetched with its opaque cursor, unparsed.
    let mut walk = FeedWalk::new(["not-there"], WalkLimits::default());
    let seed = parse_page(SEED_FEED_BODY).expect("parses");
    assert_eq!(
        walk.on_page(&seed),
        &WalkStep::Fetch {
            after: Some("AQHRfgT-…".into())
        }
    );
}

#[test]
fn reconcile_match_with_extreme_capture_seconds_is_false_not_an_overflow() {
    use shared::domain::tracking::Reconcile;
    let r = Reconcile {
        created_from_s: 0,
        created_until_s: i64::MAX,
        first_captured_at_s: 1_683_629_036,
        image_count: 3,
        give_up_at: FINISHED_AT,
        adopted_at: None,
        refinishes: 0,
    };
    let mut n = node("C1", [IP, IP, IP, IP], "UNSET");
    n.created_at_seconds = Some(1_683_759_912);
    for (captured, matches) in [
        (i64::MIN, false),
        (i64::MAX, false),
        (1_683_629_037, true),
        (1_683_629_035, true),
        (1_683_629_038, false),
    ] {
        n.captured_at_seconds = Some(captured);
        assert_eq!(r.matches(&n), matches, "{captured}");
    }
    let r = Reconcile {
        first_captured_at_s: i64::MIN,
        ..r
    };
    n.captured_at_seconds = Some(i64::MAX);
    assert!(!r.matches(&n));
}
