//! Handler tests: API Gateway v2 events from `events/apigw-v2/` through the router, in-memory
//! ports, and the OAuth flow against the in-process Mapillary simulator.

use std::collections::BTreeSet;
use std::sync::Arc;

use http_body_util::BodyExt;
use mapillary_sim::{defaults, SimConfig, SimHandle, Simulator};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use shared::domain::linking::{DropReason, ImageOutcome, LinkPath};
use shared::domain::tracking::{FeedErrorClass, FeedSource, FeedState, OverallState, TrackedUpload};
use shared::fakes::{MemRepo, MemStates, MemStore, MemTokens, MemTracking};
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::client::MapillaryClient;
use shared::mapillary::feed::StageStatus;
use shared::mapillary::retry::RetryPolicy;
use shared::mapillary::{image_link, Endpoints};
use shared::model::{
    FeedHealth, ImageLink, RejectedImage, SequenceRecord, SequenceState, TokenKind, TokenRecord,
    TrackingRecord, UploadImage, UploadRecord, UploadRefusal, UploadState,
};
use shared::ports::{
    AccountClaims, ImageEntryStore, OAuthState, SequenceStore, TokenStore, TrackingStore, UploadStore,
};
use time::macros::datetime;
use time::OffsetDateTime;
use tower::ServiceExt;

use crate::app::{router, AppDeps, ROUTES};
use crate::config::Settings;

type TestDeps = AppDeps<MemRepo, MemTracking, MemTokens, MemStates, MemStore>;

const STATE_PLACEHOLDER: &str = "STATE_PLACEHOLDER_0000000000000000000000000";

fn event(name: &str) -> String {
    let path = format!("{}/../../events/apigw-v2/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn request(json: &str) -> lambda_http::Request {
    lambda_http::request::from_str(json).expect("an API Gateway v2 event")
}

/// `event` with its query string replaced (raw and parsed alike).
fn with_query(name: &str, query: &str) -> String {
    let mut v: Value = serde_json::from_str(&event(name)).unwrap();
    v["rawQueryString"] = Value::String(query.into());
    v.as_object_mut().unwrap().remove("queryStringParameters");
    v.to_string()
}

struct Reply {
    status: u16,
    content_type: String,
    headers: http::HeaderMap,
    body: Value,
}

/// Issue 15, item 7: every answer in these tests is scanned — no `s3://` URL anywhere, and no
/// reason, error or problem text with Rust debug formatting or internal error names.
fn assert_user_facing(body: &Value) {
    const KEYS: [&str; 7] = [
        "reason",
        "error",
        "error_explanation",
        "message",
        "detail",
        "title",
        "note",
    ];
    const MARKS: [&str; 12] = [
        "Some(",
        "Ok(",
        "Err(",
        "Error {",
        "Error(",
        "::",
        "{ ",
        " }",
        "\\\"",
        "SdkError",
        "ServiceError",
        "RepoError",
    ];
    fn walk(v: &Value, key: Option<&str>) {
        match v {
            Value::Object(m) => m.iter().for_each(|(k, v)| walk(v, Some(k))),
            Value::Array(a) => a.iter().for_each(|v| walk(v, key)),
            Value::String(s) => {
                assert!(!s.contains("s3://"), "an s3:// URL served: {s:?}");
                if key.is_some_and(|k| KEYS.contains(&k)) {
                    for mark in MARKS {
                        assert!(!s.contains(mark), "a user-facing text holds {mark:?}: {s:?}");
                    }
                }
            }
            _ => {}
        }
    }
    walk(body, None);
}

async fn call(app: &axum::Router, req: lambda_http::Request) -> Reply {
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    assert_user_facing(&body);
    Reply {
        status,
        content_type,
        headers,
        body,
    }
}

fn assert_problem(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{:#}", r.body);
    assert_eq!(r.content_type, "application/problem+json");
    assert_eq!(r.body["status"], status);
    assert_eq!(r.body["code"], code, "{:#}", r.body);
    assert!(r.body["detail"].as_str().is_some_and(|d| !d.is_empty()));
}

fn connector(endpoints: Endpoints) -> MapillaryApp {
    MapillaryApp::new(
        MapillaryClient::new(
            endpoints,
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            RetryPolicy::default(),
        ),
        defaults::APP_ID,
        SecretString::from(defaults::CLIENT_SECRET),
    )
}

fn deps(endpoints: Endpoints, settings: Settings) -> Arc<TestDeps> {
    Arc::new(AppDeps {
        repo: MemRepo::new(),
        tracking: MemTracking::default(),
        tokens: MemTokens::new(),
        states: MemStates::default(),
        objects: MemStore::new(),
        mapillary: connector(endpoints),
        settings,
    })
}

fn offline() -> (Arc<TestDeps>, axum::Router) {
    let d = deps(Endpoints::under("http://127.0.0.1:9"), Settings::default());
    (d.clone(), router(d))
}

fn sequence(user: &str, id: &str, created: OffsetDateTime, uploads: u32) -> SequenceRecord {
    SequenceRecord {
        user_id: user.into(),
        sequence_id: id.into(),
        state: SequenceState::Uploaded,
        reason: None,
        bucket: "b".into(),
        manifest_key: format!("sequences/{user}/{id}/manifest.json"),
        manifest_etag: "e".into(),
        organization_id: None,
        image_count: 4,
        accepted_count: 3,
        upload_ids: (0..uploads)
            .map(|i| shared::model::upload_id(user, id, i))
            .collect(),
        rejected: vec![RejectedImage {
            key: "img-9.jpg".into(),
            reason: "no GPS position in EXIF".into(),
        }],
        created_at: created,
        updated_at: created,
        attempts: 1,
        progress: Default::default(),
    }
}

fn upload(user: &str, seq: &str, index: u32, cluster: Option<&str>) -> UploadRecord {
    UploadRecord {
        user_id: user.into(),
        sequence_id: seq.into(),
        upload_id: shared::model::upload_id(user, seq, index),
        index,
        state: if cluster.is_some() {
            UploadState::HandedOff
        } else {
            UploadState::Pending
        },
        session_key: format!("mly_relay_{index}.zip"),
        total_len: 1000,
        image_count: 3,
        cluster_id: cluster.map(str::to_string),
        handle: None,
        organization_id: None,
        bytes_sent: 1000,
        created_at: datetime!(2026-03-01 10:00 UTC),
        started_at: Some(datetime!(2026-03-01 10:01 UTC)),
        finished_at: cluster.map(|_| datetime!(2026-03-01 10:02 UTC)),
        error: None,
        attempts: 1,
        outbox: Default::default(),
    }
}

fn image(upload_id: &str, index: u32) -> UploadImage {
    UploadImage {
        upload_id: upload_id.into(),
        index,
        key: format!("sequences/user-1/seq-1/img-{index}.jpg"),
        etag: "e".into(),
        size: 10,
        entry_size: 10,
        header_consumed: 0,
        description: "{}".into(),
        lat: 1.0,
        lon: 2.0,
        altitude: None,
        captured_at: datetime!(2026-03-01 09:00 UTC),
        heading: None,
        checkpoint: None,
    }
}

/// user-1: seq-1 (one tracked upload with 3 images: linked, dropped, pending; one rejected image)
/// and seq-0/seq-2 (older/newer); user-2: seq-x.
async fn seed(d: &TestDeps) {
    let repo = &d.repo;
    repo.put_sequence(&sequence("user-1", "seq-0", datetime!(2026-02-01 00:00 UTC), 0))
        .await
        .unwrap();
    repo.put_sequence(&sequence("user-1", "seq-1", datetime!(2026-03-01 00:00 UTC), 1))
        .await
        .unwrap();
    repo.put_sequence(&sequence("user-1", "seq-2", datetime!(2026-04-01 00:00 UTC), 0))
        .await
        .unwrap();
    repo.put_sequence(&sequence("user-2", "seq-x", datetime!(2026-03-15 00:00 UTC), 0))
        .await
        .unwrap();
    let up = upload("user-1", "seq-1", 0, Some("cluster-77"));
    repo.put_upload(&up).await.unwrap();
    repo.put_images(&[
        image(&up.upload_id, 0),
        image(&up.upload_id, 1),
        image(&up.upload_id, 2),
    ])
    .await
    .unwrap();
    let mut tracked = TrackedUpload::new("cluster-77", datetime!(2026-03-01 10:02 UTC));
    tracked.stages.ingestion = Some(StageStatus::Finished);
    tracked.stages.image_processing = Some(StageStatus::Finished);
    tracked.stages.map_data = Some(StageStatus::Failed);
    tracked.error_code = Some("ANONYMIZATION_FAILED".into());
    tracked.state = OverallState::Failed {
        error_code: Some("ANONYMIZATION_FAILED".into()),
        stage: Some("anonymization_status".into()),
        reason: "Mapillary reports Map data processing FAILED".into(),
    };
    tracked.last_checked_at = Some(datetime!(2026-03-01 12:00 UTC));
    tracked.feed = Some(FeedState {
        source: FeedSource::CoverageTiles,
        error_class: Some(FeedErrorClass::Gone),
        since: datetime!(2026-03-01 11:00 UTC),
    });
    d.tracking
        .create_tracking(&TrackingRecord {
            user_id: "user-1".into(),
            sequence_id: "seq-1".into(),
            upload_id: up.upload_id.clone(),
            mapillary_user_id: Some(defaults::DEMO_USER_ID.into()),
            tracked,
            history: Vec::new(),
            item_count: Some(2),
            image_count: Some(2),
            image_id: Some("5001".into()),
            sequence_ids: vec!["mly-seq-A".into()],
            linked_via: Some(LinkPath::CoverageTiles),
            linked_count: 1,
            dropped_count: 1,
            next_check_at: None,
            pending_events: Vec::new(),
        })
        .await
        .unwrap();
    d.tracking
        .put_links(&[
            ImageLink {
                upload_id: up.upload_id.clone(),
                index: 0,
                key: "sequences/user-1/seq-1/img-0.jpg".into(),
                outcome: ImageOutcome::Linked {
                    image_id: "5001".into(),
                    sequence_id: "mly-seq-A".into(),
                    link: image_link("5001"),
                },
                via: LinkPath::CoverageTiles,
            },
            ImageLink {
                upload_id: up.upload_id.clone(),
                index: 1,
                key: "sequences/user-1/seq-1/img-1.jpg".into(),
                outcome: ImageOutcome::Dropped {
                    reason: DropReason::NotInSequence,
                },
                via: LinkPath::CoverageTiles,
            },
        ])
        .await
        .unwrap();
    d.tracking
        .put_feed_health(&FeedHealth {
            healthy: false,
            degraded_since: Some(datetime!(2026-03-01 11:00 UTC)),
            last_error: Some("GraphQL drift".into()),
            last_error_class: Some(FeedErrorClass::Unusable),
            users_web_app_token: 0,
            users_user_token: 0,
            users_coverage_tiles: 2,
            updated_at: datetime!(2026-03-01 12:00 UTC),
        })
        .await
        .unwrap();
}

// ------------------------------------------------------------------ sequences

#[tokio::test]
async fn list_is_newest_first_and_paginates_with_an_opaque_cursor() {
    let (d, app) = offline();
    seed(&d).await;
    let r = call(&app, request(&event("list-sequences.json"))).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    assert_eq!(r.content_type, "application/json");
    let ids: Vec<&str> = r.body["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sequence_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["seq-2", "seq-1", "seq-0"], "only user-1's, newest first");
    assert!(r.body["next_cursor"].is_null());
    assert!(r.body["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["attempt"] == 1));

    let r = call(&app, request(&event("list-sequences-page.json"))).await;
    assert_eq!(r.body["sequences"].as_array().unwrap().len(), 2);
    let cursor = r.body["next_cursor"].as_str().expect("a next page").to_string();
    assert!(
        !cursor.contains("SEQ#") && !cursor.contains("user-1"),
        "opaque: {cursor}"
    );
    let r = call(
        &app,
        request(&with_query(
            "list-sequences.json",
            &format!("limit=2&cursor={cursor}"),
        )),
    )
    .await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    assert_eq!(r.body["sequences"][0]["sequence_id"], "seq-0");
    assert!(r.body["next_cursor"].is_null());
}

#[tokio::test]
async fn list_rejects_bad_limits_cursors_and_unknown_parameters() {
    let (d, app) = offline();
    seed(&d).await;
    let r = call(&app, request(&event("list-sequences-bad-limit.json"))).await;
    assert_problem(&r, 400, "invalid-parameter");
    assert!(r.body["detail"].as_str().unwrap().contains("limit"));
    for q in [
        "limit=0",
        "limit=abc",
        "cursor=%%%",
        "cursor=U0VRI3g",
        "cursor=",
        "other=1",
        "limit=1&limit=2",
    ] {
        let r = call(&app, request(&with_query("list-sequences.json", q))).await;
        assert_problem(&r, 400, "invalid-parameter");
    }
}

#[tokio::test]
async fn sequence_status_merges_uploads_with_tracking() {
    let (d, app) = offline();
    seed(&d).await;
    let r = call(&app, request(&event("get-status.json"))).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    let b = &r.body;
    assert_eq!(b["sequence_id"], "seq-1");
    assert_eq!(b["state"], "UPLOADED");
    assert_eq!(
        b["attempt"], 1,
        "a record from before run numbers is the first run"
    );
    assert_eq!(b["rejected_count"], 1);
    assert_eq!(b["feed"]["healthy"], false);
    assert!(
        b["feed"].get("last_error").is_none(),
        "internal feed errors are not exposed"
    );
    assert_eq!(b["feed"]["last_error_class"], "UNUSABLE");
    assert_eq!(
        (
            &b["feed"]["users_web_app_token"],
            &b["feed"]["users_user_token"],
            &b["feed"]["users_coverage_tiles"]
        ),
        (
            &serde_json::json!(0),
            &serde_json::json!(0),
            &serde_json::json!(2)
        )
    );
    let u = &b["uploads"][0];
    assert_eq!(u["state"], "HANDED_OFF");
    assert_eq!(u["cluster_id"], "cluster-77");
    let m = &u["mapillary"];
    assert_eq!(m["state"], "FAILED");
    let labels: Vec<&str> = m["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        [
            "Image ingestion",
            "Image processing",
            "Map data processing",
            "Map update"
        ]
    );
    assert_eq!(m["stages"][2]["status"], "FAILED");
    assert!(m["stages"][3]["status"].is_null());
    assert_eq!(m["error_code"], "ANONYMIZATION_FAILED");
    assert!(m["error_explanation"]
        .as_str()
        .unwrap()
        .contains("ANONYMIZATION_FAILED"));
    assert_eq!(m["accepted_count"], 1);
    assert_eq!(m["rejected_count"], 1);
    assert_eq!(m["status_source"], "COVERAGE_TILES");
    // The owner's own feed state, on the upload.
    let f = &m["feed"];
    assert_eq!(f["source"], "COVERAGE_TILES");
    assert_eq!(f["available"], false);
    assert_eq!(f["error_class"], "GONE");
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("activity feed is unavailable"),
        "{f}"
    );
    assert_eq!(f["since"], "2026-03-01T11:00:00Z");
    assert_eq!(m["sequences"][0]["id"], "mly-seq-A");
    assert_eq!(m["sequences"][0]["link"], image_link("5001"));
    assert_eq!(r.headers.get("cache-control").unwrap(), "no-store");
}

#[tokio::test]
async fn another_users_sequence_is_not_found_and_input_is_validated() {
    let (d, app) = offline();
    seed(&d).await;
    assert_problem(
        &call(&app, request(&event("get-status-other-user.json"))).await,
        404,
        "not-found",
    );
    assert_problem(
        &call(&app, request(&event("get-status-not-found.json"))).await,
        404,
        "not-found",
    );
    assert_problem(
        &call(&app, request(&event("get-status-bad-id.json"))).await,
        400,
        "invalid-parameter",
    );
    assert_problem(
        &call(&app, request(&event("get-status-no-auth.json"))).await,
        401,
        "unauthenticated",
    );
    // The images of another user's sequence are not found either.
    let mut v: Value = serde_json::from_str(&event("get-images.json")).unwrap();
    v["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] = "user-2".into();
    assert_problem(&call(&app, request(&v.to_string())).await, 404, "not-found");
    // A subject that cannot be a user id.
    v["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] = "auth0|../x".into();
    assert_problem(&call(&app, request(&v.to_string())).await, 401, "unauthenticated");
    // Unknown routes and methods.
    let mut v: Value = serde_json::from_str(&event("list-sequences.json")).unwrap();
    v["rawPath"] = "/v1/nothing".into();
    assert_problem(&call(&app, request(&v.to_string())).await, 404, "no-such-route");
    v["rawPath"] = "/v1/sequences".into();
    v["requestContext"]["http"]["method"] = "PUT".into();
    assert_problem(
        &call(&app, request(&v.to_string())).await,
        405,
        "method-not-allowed",
    );
}

#[tokio::test]
async fn images_map_our_keys_to_mapillary_or_a_reason() {
    let (d, app) = offline();
    seed(&d).await;
    let r = call(&app, request(&event("get-images.json"))).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    let images = r.body["images"].as_array().unwrap();
    assert_eq!(images.len(), 4);
    assert_eq!(images[0]["status"], "LINKED");
    assert_eq!(images[0]["mapillary_image_id"], "5001");
    assert_eq!(images[0]["link"], image_link("5001"));
    assert_eq!(images[0]["found_via"], "COVERAGE_TILES");
    assert_eq!(images[1]["status"], "DROPPED");
    assert!(images[1]["reason"]
        .as_str()
        .unwrap()
        .contains("not in the Mapillary sequence"));
    assert_eq!(images[2]["status"], "PENDING");
    assert_eq!(images[3]["status"], "REJECTED");
    assert_eq!(images[3]["reason"], "no GPS position in EXIF");
}

#[tokio::test]
async fn images_and_rejected_images_come_in_pages() {
    // Issue 15, item 5: a sequence of 10,000 images is not one response.
    use base64::Engine;
    let (d, app) = offline();
    seed(&d).await;
    let all = call(&app, request(&event("get-images.json"))).await;
    assert_eq!(all.status, 200, "{:#}", all.body);
    assert!(all.body["next_cursor"].is_null());
    let every: Vec<Value> = all.body["images"].as_array().unwrap().clone();
    assert_eq!(every.len(), 4);
    // Page by page (sizes 1 and 3) gives the same list in the same order.
    for size in [1usize, 3] {
        let mut got = Vec::new();
        let mut query = format!("limit={size}");
        for _ in 0..10 {
            let r = call(&app, request(&with_query("get-images.json", &query))).await;
            assert_eq!(r.status, 200, "{:#}", r.body);
            let page = r.body["images"].as_array().unwrap();
            assert!(page.len() <= size);
            got.extend(page.iter().cloned());
            match r.body["next_cursor"].as_str() {
                Some(c) => query = format!("limit={size}&cursor={c}"),
                None => break,
            }
        }
        assert_eq!(got, every, "pages of {size}");
    }
    // A rejected-list cursor, a sequences-list cursor, garbage, or a limit out of range: 400.
    let list_cursor = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("R1");
    for q in [
        "limit=0",
        "limit=1001",
        "cursor=%%%",
        &format!("cursor={list_cursor}"),
        "cursor=U0VRI3g",
        "page=2",
    ] {
        let r = call(&app, request(&with_query("get-images.json", q))).await;
        assert_problem(&r, 400, "invalid-parameter");
    }

    // The rejected list of the sequence document.
    let mut many = sequence("user-1", "seq-r", datetime!(2026-03-02 00:00 UTC), 0);
    many.rejected = (0..5)
        .map(|i| RejectedImage {
            key: format!("img-{i}.jpg"),
            reason: format!("reason {i}"),
        })
        .collect();
    d.repo.put_sequence(&many).await.unwrap();
    let seq_query = |q: &str| {
        let mut v: Value = serde_json::from_str(&with_query("get-status.json", q)).unwrap();
        let path = v["rawPath"].as_str().unwrap().replace("seq-1", "seq-r");
        v["rawPath"] = path.into();
        if let Some(p) = v.get_mut("pathParameters") {
            p["sequence_id"] = "seq-r".into();
        }
        v.to_string()
    };
    let mut keys = Vec::new();
    let mut query = "rejected_limit=2".to_string();
    for _ in 0..5 {
        let r = call(&app, request(&seq_query(&query))).await;
        assert_eq!(r.status, 200, "{:#}", r.body);
        assert_eq!(r.body["rejected_count"], 5);
        let page = r.body["rejected"].as_array().unwrap();
        assert!(page.len() <= 2);
        keys.extend(page.iter().map(|x| x["key"].as_str().unwrap().to_string()));
        match r.body["rejected_next_cursor"].as_str() {
            Some(c) => query = format!("rejected_limit=2&rejected_cursor={c}"),
            None => break,
        }
    }
    assert_eq!(
        keys,
        ["img-0.jpg", "img-1.jpg", "img-2.jpg", "img-3.jpg", "img-4.jpg"]
    );
    let images_cursor = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("I1");
    let r = call(
        &app,
        request(&seq_query(&format!("rejected_cursor={images_cursor}"))),
    )
    .await;
    assert_problem(&r, 400, "invalid-parameter");
}

// ------------------------------------------------------------------ dev identity mode

#[tokio::test]
async fn dev_identity_header_is_honoured_only_when_configured_and_never_over_a_jwt() {
    let mut no_auth: Value = serde_json::from_str(&event("get-status-no-auth.json")).unwrap();
    no_auth["headers"]["x-relay-user"] = "user-1".into();
    // Off by default.
    let (d, app) = offline();
    seed(&d).await;
    assert_problem(
        &call(&app, request(&no_auth.to_string())).await,
        401,
        "unauthenticated",
    );
    // On when configured.
    let d = deps(
        Endpoints::under("http://127.0.0.1:9"),
        Settings {
            dev_auth_header: Some(http::HeaderName::from_static("x-relay-user")),
            ..Settings::default()
        },
    );
    seed(&d).await;
    let app = router(d);
    assert_eq!(call(&app, request(&no_auth.to_string())).await.status, 200);
    // With a JWT context the header is ignored: user-2's JWT cannot read user-1's data by header.
    let mut jwt: Value = serde_json::from_str(&event("get-status-other-user.json")).unwrap();
    jwt["headers"]["x-relay-user"] = "user-1".into();
    assert_problem(&call(&app, request(&jwt.to_string())).await, 404, "not-found");
}

// ------------------------------------------------------------------ OAuth

/// A router against a fresh simulator, redirect URI registered there.
async fn oauth_setup() -> (SimHandle, Arc<TestDeps>, axum::Router) {
    let sim = Simulator::start(SimConfig::frozen(), "127.0.0.1:0")
        .await
        .unwrap();
    let d = deps(
        Endpoints::under(sim.base_url()),
        Settings {
            redirect_uri: Some(defaults::REDIRECT_URI.into()),
            ..Settings::default()
        },
    );
    let app = router(d.clone());
    (sim, d, app)
}

/// POST connect, then let the simulator consent: returns (code, state, the `Cookie` pair the
/// connect reply set for the callback).
async fn consent(app: &axum::Router) -> (String, String, String) {
    let r = call(app, request(&event("post-connect.json"))).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    let set_cookie = r.headers[http::header::SET_COOKIE].to_str().unwrap().to_string();
    for attr in [
        "HttpOnly",
        "Secure",
        "SameSite=Lax",
        "Path=/v1/mapillary/callback",
    ] {
        assert!(set_cookie.contains(attr), "{set_cookie} lacks {attr}");
    }
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    assert!(cookie.starts_with("relay_oauth_verifier="), "{set_cookie}");
    let url = url::Url::parse(r.body["authorize_url"].as_str().unwrap()).unwrap();
    let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(q["client_id"], defaults::APP_ID);
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["scope"], "read");
    assert_eq!(q["redirect_uri"], defaults::REDIRECT_URI);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = http.get(url).send().await.unwrap();
    assert!(resp.status().is_redirection(), "{}", resp.status());
    let location = url::Url::parse(resp.headers()["location"].to_str().unwrap()).unwrap();
    let back: std::collections::HashMap<_, _> = location.query_pairs().into_owned().collect();
    assert_eq!(back["state"], q["state"], "the simulator echoes our state");
    (back["code"].clone(), back["state"].clone(), cookie)
}

/// The callback event; `cookie` (a `name=value` pair) goes in API Gateway v2's `cookies`.
fn callback_event(code: &str, state: &str, cookie: Option<&str>) -> String {
    let raw = event("get-callback.json").replace(STATE_PLACEHOLDER, state);
    let mut v: Value = serde_json::from_str(&raw).unwrap();
    match cookie {
        Some(c) => v["cookies"] = serde_json::json!([c]),
        None => {
            v.as_object_mut().unwrap().remove("cookies");
        }
    }
    let query = format!("code={code}&state={state}");
    v["rawQueryString"] = Value::String(query);
    v.as_object_mut().unwrap().remove("queryStringParameters");
    v.to_string()
}

#[tokio::test]
async fn oauth_flow_connects_and_rejects_replays_expired_and_bad_codes() {
    let (sim, d, app) = oauth_setup().await;
    let (code, state, cookie) = consent(&app).await;

    let r = call(&app, request(&callback_event(&code, &state, Some(&cookie)))).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    assert_eq!(r.body["connected"], true);
    assert_eq!(r.body["username"], defaults::DEMO_USERNAME);
    assert_eq!(r.body["mapillary_user_id"], defaults::DEMO_USER_ID);
    assert!(r.body["expires_at"].is_string());
    let stored = d
        .tokens
        .load("user-1")
        .await
        .unwrap()
        .expect("token saved for the state's user");
    let token = stored.access_token.expose_secret().to_string();
    assert!(
        !r.body.to_string().contains(&token),
        "the token is never in a response"
    );

    // The connection, without the token.
    let r = call(&app, request(&event("get-connection.json"))).await;
    assert_eq!(r.body["connected"], true);
    assert_eq!(r.body["username"], defaults::DEMO_USERNAME);
    assert!(!r.body.to_string().contains(&token));

    // Replayed state (even with a fresh, valid code): rejected.
    let (code2, _unused_state, cookie2) = consent(&app).await;
    let r = call(&app, request(&callback_event(&code2, &state, Some(&cookie)))).await;
    assert_problem(&r, 400, "state-invalid");

    // Expired state.
    let expired = crate::oauth::new_state();
    d.states.insert(OAuthState {
        state: expired.clone(),
        user_id: "user-1".into(),
        created_at: OffsetDateTime::now_utc() - time::Duration::minutes(20),
        expires_at: OffsetDateTime::now_utc() - time::Duration::minutes(10),
        verifier_sha256: crate::oauth::verifier_sha256("x"),
    });
    assert_problem(
        &call(&app, request(&callback_event(&code2, &expired, Some(&cookie2)))).await,
        400,
        "state-expired",
    );

    // Never-issued state.
    let unknown = crate::oauth::new_state();
    assert_problem(
        &call(&app, request(&callback_event(&code2, &unknown, Some(&cookie2)))).await,
        400,
        "state-invalid",
    );

    // Bad code with a live state: Mapillary rejects it; the state is used up.
    let (_code3, state3, cookie3) = consent(&app).await;
    let r = call(
        &app,
        request(&callback_event("AQbogus0code", &state3, Some(&cookie3))),
    )
    .await;
    assert_problem(&r, 400, "code-rejected");
    assert_problem(
        &call(&app, request(&callback_event(&code2, &state3, Some(&cookie3)))).await,
        400,
        "state-invalid",
    );

    // Foreign state: presented by a signed-in other user.
    let (code4, state4, cookie4) = consent(&app).await;
    let mut v: Value = serde_json::from_str(&callback_event(&code4, &state4, Some(&cookie4))).unwrap();
    v["requestContext"]["authorizer"] =
        serde_json::json!({"jwt": {"claims": {"sub": "user-2"}, "scopes": null}});
    assert_problem(&call(&app, request(&v.to_string())).await, 403, "state-foreign");
    // …which leaves it usable by its owner.
    assert_eq!(
        call(&app, request(&callback_event(&code4, &state4, Some(&cookie4))))
            .await
            .status,
        200
    );

    // Malformed input.
    assert_problem(
        &call(&app, request(&event("get-callback-bad-state.json"))).await,
        400,
        "invalid-parameter",
    );

    // Forget the connection.
    let r = call(&app, request(&event("delete-connection.json"))).await;
    assert_eq!(r.status, 204);
    let r = call(&app, request(&event("get-connection.json"))).await;
    assert_eq!(r.body["connected"], false);
    sim.shutdown().await;
}

const UPLOAD_TOKEN_PLACEHOLDER: &str = "UPLOAD_TOKEN_PLACEHOLDER_0000000000000000";

/// `PUT /v1/mapillary/connection` with `body` (the sample event's body replaced).
fn put_connection_event(body: &str) -> String {
    let mut v: Value = serde_json::from_str(&event("put-connection.json")).unwrap();
    assert!(v["body"].as_str().unwrap().contains(UPLOAD_TOKEN_PLACEHOLDER));
    v["body"] = body.into();
    v["headers"]["content-length"] = body.len().to_string().into();
    v.to_string()
}

#[tokio::test]
async fn an_upload_token_is_checked_with_me_stored_with_its_kind_and_never_shown() {
    let (sim, d, app) = oauth_setup().await;
    let put = |token: &str| put_connection_event(&serde_json::json!({ "upload_token": token }).to_string());

    // Refused by /me: nothing stored.
    let r = call(&app, request(&put("MLYARnot0a0token0the0simulator0knows"))).await;
    assert_problem(&r, 400, "upload-token-rejected");
    assert!(!r.body.to_string().contains("MLYARnot0a0token"));
    assert!(d.tokens.record("user-1").is_none());
    // Malformed bodies and tokens, never echoed.
    for body in [
        r#"{"token": "MLYARsomething0long0enough"}"#,
        r#"{"upload_token": "short"}"#,
        "not json",
    ] {
        let r = call(&app, request(&put_connection_event(body))).await;
        assert_problem(&r, 400, "invalid-parameter");
        assert!(!r.body.to_string().contains("something0long"), "{:#}", r.body);
    }
    let mut no_json: Value = serde_json::from_str(&put(defaults::DEMO_USER_TOKEN)).unwrap();
    no_json["headers"]["content-type"] = "text/plain".into();
    assert_problem(
        &call(&app, request(&no_json.to_string())).await,
        415,
        "unsupported-media-type",
    );
    assert!(d.tokens.record("user-1").is_none());

    // The demo user's upload token: checked with /me, stored as kind upload_token.
    let r = call(&app, request(&put(defaults::DEMO_USER_TOKEN))).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    assert_eq!(r.body["connected"], true);
    assert_eq!(r.body["kind"], "upload_token");
    assert_eq!(r.body["mapillary_user_id"], defaults::DEMO_USER_ID);
    assert_eq!(r.body["username"], defaults::DEMO_USERNAME);
    assert_eq!(r.body["upload_token_required"], false);
    assert!(r.body["expires_at"].is_null());
    assert!(!r.body.to_string().contains(defaults::DEMO_USER_TOKEN));
    let rec = d.tokens.record("user-1").expect("stored");
    assert_eq!(rec.kind, TokenKind::UploadToken);
    assert_eq!(rec.token.access_token.expose_secret(), defaults::DEMO_USER_TOKEN);
    assert!(rec.token.refresh_token.is_none());
    let r = call(&app, request(&event("get-connection.json"))).await;
    assert_eq!(r.body["kind"], "upload_token");
    assert!(!r.body.to_string().contains(defaults::DEMO_USER_TOKEN));

    // An OAuth connection whose uploads were refused says so; handing over a token clears it.
    let mut oauth = TokenRecord::new(rec.token.clone(), TokenKind::Oauth);
    oauth.upload_refused = Some(UploadRefusal {
        at: OffsetDateTime::now_utc(),
        message: "This token is not authorized to upload".into(),
    });
    d.tokens.insert_record("user-1", oauth);
    let r = call(&app, request(&event("get-connection.json"))).await;
    assert_eq!(r.body["kind"], "oauth");
    assert_eq!(r.body["upload_token_required"], true);
    assert_eq!(
        r.body["upload_refusal"]["message"],
        "This token is not authorized to upload"
    );
    assert!(r.body["upload_refusal"]["at"].is_string());
    let r = call(&app, request(&put(defaults::DEMO_USER_TOKEN))).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    assert_eq!(r.body["upload_token_required"], false);
    assert!(r.body["upload_refusal"].is_null());
    assert!(!d.tokens.record("user-1").unwrap().upload_token_required());
    sim.shutdown().await;
}

#[tokio::test]
async fn the_callback_needs_the_cookie_of_the_browser_that_started_the_connection() {
    // Issue 15, item 3: a consent link forwarded to someone else must not link their Mapillary
    // account to the sender.
    let (sim, d, app) = oauth_setup().await;

    // No cookie (the link opened in another browser): refused, nothing stored, state used up.
    let (code, state, cookie) = consent(&app).await;
    let r = call(&app, request(&callback_event(&code, &state, None))).await;
    assert_problem(&r, 400, "verifier-missing");
    assert!(d.tokens.load("user-1").await.unwrap().is_none());
    assert_problem(
        &call(&app, request(&callback_event(&code, &state, Some(&cookie)))).await,
        400,
        "state-invalid",
    );

    // Another connect's cookie (the recipient started their own attempt): refused the same way.
    let (code_a, state_a, cookie_a) = consent(&app).await;
    let (_code_b, _state_b, cookie_b) = consent(&app).await;
    let r = call(&app, request(&callback_event(&code_a, &state_a, Some(&cookie_b)))).await;
    assert_problem(&r, 403, "verifier-mismatch");
    assert!(
        r.headers.get_all(http::header::SET_COOKIE).iter().any(|v| v
            .to_str()
            .unwrap()
            .starts_with("relay_oauth_verifier=; Max-Age=0")),
        "the used cookie is cleared"
    );
    assert!(d.tokens.load("user-1").await.unwrap().is_none());
    assert_problem(
        &call(&app, request(&callback_event(&code_a, &state_a, Some(&cookie_a)))).await,
        400,
        "state-invalid",
    );

    // A cookie that looks right but was never issued.
    let (code_c, state_c, _) = consent(&app).await;
    let forged = format!("relay_oauth_verifier={}", crate::oauth::new_verifier());
    assert_problem(
        &call(&app, request(&callback_event(&code_c, &state_c, Some(&forged)))).await,
        403,
        "verifier-mismatch",
    );
    assert!(d.tokens.load("user-1").await.unwrap().is_none());

    // The right cookie: connected.
    let (code_d, state_d, cookie_d) = consent(&app).await;
    let r = call(&app, request(&callback_event(&code_d, &state_d, Some(&cookie_d)))).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    assert_eq!(r.body["connected"], true);
    assert!(d.tokens.load("user-1").await.unwrap().is_some());
    sim.shutdown().await;
}

#[tokio::test]
async fn callback_redirects_to_the_success_url_when_configured() {
    let sim = Simulator::start(SimConfig::frozen(), "127.0.0.1:0")
        .await
        .unwrap();
    let d = deps(
        Endpoints::under(sim.base_url()),
        Settings {
            redirect_uri: Some(defaults::REDIRECT_URI.into()),
            success_url: Some("https://app.example/connected".into()),
            ..Settings::default()
        },
    );
    let app = router(d);
    let (code, state, cookie) = consent(&app).await;
    let r = call(&app, request(&callback_event(&code, &state, Some(&cookie)))).await;
    assert_eq!(r.status, 303);
    assert_eq!(r.headers["location"], "https://app.example/connected");
    sim.shutdown().await;
}

#[tokio::test]
async fn an_absurd_token_lifetime_is_a_502_and_nothing_is_stored() {
    // Issue 15, item 1: `now + expires_in` overflowed (a panic, an aborted Lambda) for a reply
    // with a huge `expires_in`; now the reply is refused and the callback says Mapillary failed.
    let mut config = SimConfig::frozen();
    config.settings.token_lifetime_seconds = i64::MAX;
    let sim = Simulator::start(config, "127.0.0.1:0").await.unwrap();
    let d = deps(
        Endpoints::under(sim.base_url()),
        Settings {
            redirect_uri: Some(defaults::REDIRECT_URI.into()),
            ..Settings::default()
        },
    );
    let app = router(d.clone());
    let (code, state, cookie) = consent(&app).await;
    let r = call(&app, request(&callback_event(&code, &state, Some(&cookie)))).await;
    assert_problem(&r, 502, "mapillary-unavailable");
    assert!(d.tokens.load("user-1").await.unwrap().is_none());
    sim.shutdown().await;
}

// ------------------------------------------------------------------ OpenAPI

fn openapi() -> serde_yaml::Value {
    let path = format!("{}/openapi.yaml", env!("CARGO_MANIFEST_DIR"));
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test]
async fn openapi_document_and_router_agree() {
    let doc = openapi();
    assert_eq!(doc["openapi"].as_str().unwrap(), "3.1.0");
    let methods = ["get", "put", "post", "delete", "patch"];
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        let path = path.as_str().unwrap();
        for m in methods {
            if item.get(m).is_some() {
                documented.insert((m.to_uppercase(), path.to_string()));
            }
        }
    }
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served, "openapi.yaml paths vs app::ROUTES");

    // The router serves exactly those: documented operations route somewhere, other methods are 405.
    let (d, app) = offline();
    seed(&d).await;
    let base: Value = serde_json::from_str(&event("list-sequences.json")).unwrap();
    let paths: BTreeSet<&String> = documented.iter().map(|(_, p)| p).collect();
    for path in paths {
        let concrete = path.replace("{sequence_id}", "seq-1");
        for m in methods {
            let mut v = base.clone();
            v["rawPath"] = concrete.clone().into();
            v["requestContext"]["http"]["method"] = m.to_uppercase().into();
            let r = call(&app, request(&v.to_string())).await;
            if documented.contains(&(m.to_uppercase(), path.clone())) {
                assert!(
                    r.status != 405 && r.body["code"] != "no-such-route",
                    "{m} {path} is documented but not routed: {:#}",
                    r.body
                );
            } else {
                assert_eq!(
                    r.status, 405,
                    "{m} {path} is not documented but answered {}",
                    r.status
                );
            }
        }
    }
}

/// `event` (JSON) as signed in by `user` (the JWT authorizer's `sub`).
fn as_user(event: &str, user: &str) -> String {
    let mut v: Value = serde_json::from_str(event).unwrap();
    v["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] = user.into();
    v.to_string()
}

#[tokio::test]
async fn one_mapillary_account_connects_to_one_user_unless_shared_accounts_are_allowed() {
    let (sim, d, app) = oauth_setup().await;
    let put =
        put_connection_event(&serde_json::json!({ "upload_token": defaults::DEMO_USER_TOKEN }).to_string());
    let r = call(&app, request(&as_user(&put, "user-1"))).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    // Another relay user with the same Mapillary account: 409, nothing stored, nothing revealed.
    let r = call(&app, request(&as_user(&put, "user-2"))).await;
    assert_problem(&r, 409, "mapillary-account-taken");
    assert!(!r.body.to_string().contains("user-1"), "{:#}", r.body);
    assert!(d.tokens.record("user-2").is_none());
    // The holder again: fine.
    assert_eq!(call(&app, request(&as_user(&put, "user-1"))).await.status, 200);
    // Released by the holder's DELETE: the other user connects.
    let del = as_user(&event("delete-connection.json"), "user-1");
    assert_eq!(call(&app, request(&del)).await.status, 204);
    let r = call(&app, request(&as_user(&put, "user-2"))).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    assert_eq!(
        d.tokens
            .claim_holder(defaults::DEMO_USER_ID)
            .await
            .unwrap()
            .as_deref(),
        Some("user-2")
    );
    // Shared accounts allowed: both connect.
    let shared = deps(
        Endpoints::under(sim.base_url()),
        Settings {
            allow_shared_accounts: true,
            ..Settings::default()
        },
    );
    let shared_app = router(shared.clone());
    for user in ["user-1", "user-2"] {
        let r = call(&shared_app, request(&as_user(&put, user))).await;
        assert_eq!(r.status, 200, "{user}: {:#}", r.body);
    }
    sim.shutdown().await;
}

// ------------------------------------------------------------------ webhook

fn put_webhook(url: &str) -> lambda_http::Request {
    let mut v: Value = serde_json::from_str(&event("put-webhook.json")).unwrap();
    v["body"] = Value::String(serde_json::json!({ "url": url }).to_string());
    request(&v.to_string())
}

fn local_webhooks() -> (Arc<TestDeps>, axum::Router) {
    let d = deps(
        Endpoints::under("http://127.0.0.1:9"),
        Settings {
            webhook_allow_local: true,
            ..Settings::default()
        },
    );
    (d.clone(), router(d))
}

#[tokio::test]
async fn webhook_secret_is_answered_once_never_shown_again_and_delete_removes_it() {
    let (d, app) = local_webhooks();
    let r = call(&app, put_webhook("http://127.0.0.1:8787/hook")).await;
    assert_eq!(r.status, 201, "{:#}", r.body);
    assert_eq!(r.headers["cache-control"], "no-store");
    let secret = r.body["secret"].as_str().unwrap_or_default().to_string();
    assert!(secret.starts_with("whsec_") && secret.len() == 70, "{secret}");
    assert_eq!(r.body["signing"]["signed_text"], "<timestamp>.<raw body>");
    let stored = d.tokens.webhooks.lock().unwrap().get("user-1").cloned();
    let (rec, s) = stored.expect("stored");
    assert_eq!(s.expose_secret(), secret, "the answered secret is the stored one");
    assert_eq!(rec.url, "http://127.0.0.1:8787/hook");

    let g = call(&app, request(&event("get-webhook.json"))).await;
    assert_eq!(g.status, 200, "{:#}", g.body);
    assert!(g.body.get("secret").is_none(), "{:#}", g.body);
    assert!(!g.body.to_string().contains(&secret));
    assert_eq!(g.body["enabled"], true);
    assert_eq!(g.body["url"], "http://127.0.0.1:8787/hook");

    // A PUT again replaces it: a new secret, 200.
    let r2 = call(&app, put_webhook("http://127.0.0.1:8788/other")).await;
    assert_eq!(r2.status, 200, "{:#}", r2.body);
    assert_ne!(r2.body["secret"].as_str(), Some(secret.as_str()));

    let del = call(&app, request(&event("delete-webhook.json"))).await;
    assert_eq!(del.status, 204);
    assert_problem(
        &call(&app, request(&event("get-webhook.json"))).await,
        404,
        "not-found",
    );
    assert_problem(
        &call(&app, request(&event("delete-webhook.json"))).await,
        404,
        "not-found",
    );
}

#[tokio::test]
async fn webhook_urls_that_are_not_public_https_are_refused_in_deployed_mode() {
    let (d, app) = offline();
    assert!(
        !Settings::default().webhook_allow_local,
        "strict unless configured"
    );
    for url in [
        "http://127.0.0.1:8787/hook",
        "https://127.0.0.1/hook",
        "https://10.0.0.8/hook",
        "https://172.20.1.1/hook",
        "https://192.168.1.1/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://100.100.1.1/hook",
        "https://[fd00::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://localhost/hook",
        "http://93.184.215.14/hook",
        "ftp://93.184.215.14/hook",
        "https://user:pw@93.184.215.14/hook",
        "not a url",
    ] {
        let r = call(&app, put_webhook(url)).await;
        assert_problem(&r, 400, "webhook-url-refused");
    }
    assert!(d.tokens.webhooks.lock().unwrap().is_empty(), "nothing stored");
    // Local mode still refuses private and link-local addresses.
    let (_, local) = local_webhooks();
    for url in ["http://10.0.0.8/hook", "http://169.254.169.254/latest/meta-data/"] {
        assert_problem(&call(&local, put_webhook(url)).await, 400, "webhook-url-refused");
    }
    // A public address is accepted (an IP literal: no DNS needed here).
    let r = call(&app, put_webhook("https://93.184.215.14/hook")).await;
    assert_eq!(r.status, 201, "{:#}", r.body);
}

#[tokio::test]
async fn webhook_put_needs_a_json_url_object() {
    let (_, app) = local_webhooks();
    let mut v: Value = serde_json::from_str(&event("put-webhook.json")).unwrap();
    v["body"] = Value::String("{\"url\": 5}".into());
    assert_problem(
        &call(&app, request(&v.to_string())).await,
        400,
        "invalid-parameter",
    );
    v["body"] = Value::String("{\"url\": \"http://127.0.0.1:1/h\", \"secret\": \"mine\"}".into());
    assert_problem(
        &call(&app, request(&v.to_string())).await,
        400,
        "invalid-parameter",
    );
    v["headers"]["content-type"] = Value::String("text/plain".into());
    assert_problem(
        &call(&app, request(&v.to_string())).await,
        415,
        "unsupported-media-type",
    );
}
