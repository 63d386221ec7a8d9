//! Handler tests of the drop routes ([`crate::drops`]) on the in-memory ports: the sample event
//! `events/apigw-v2/post-sequences.json`, then complete / retry / delete on the sequence it created.
//! (The presigned URLs themselves and S3's side are proven against moto in
//! `tests/tests/status_api_drops.rs`.)

use std::sync::Arc;

use http_body_util::BodyExt;
use mapillary_sim::defaults;
use secrecy::SecretString;
use serde_json::{json, Value};
use shared::fakes::{MemRepo, MemStates, MemStore, MemTokens, MemTracking};
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::client::MapillaryClient;
use shared::mapillary::retry::RetryPolicy;
use shared::mapillary::Endpoints;
use shared::model::{SequenceState, UploadRecord, UploadState};
use shared::ports::{ObjectStore, SequenceReader, SequenceStore, UploadStore};
use time::OffsetDateTime;
use tower::ServiceExt;

use crate::app::{router, AppDeps};
use crate::config::{DropSettings, Settings};

type TestDeps = AppDeps<MemRepo, MemTracking, MemTokens, MemStates, MemStore>;

const BUCKET: &str = "seqs";
const USER: &str = "user-1";

fn deps(drops: DropSettings) -> Arc<TestDeps> {
    Arc::new(AppDeps {
        repo: MemRepo::new(),
        tracking: MemTracking::default(),
        tokens: MemTokens::new(),
        states: MemStates::default(),
        objects: MemStore::new(),
        mapillary: MapillaryApp::new(
            MapillaryClient::new(
                Endpoints::under("http://127.0.0.1:9"),
                reqwest::Client::new(),
                RetryPolicy::default(),
            ),
            defaults::APP_ID,
            SecretString::from(defaults::CLIENT_SECRET),
        ),
        settings: Settings {
            drops,
            ..Settings::default()
        },
    })
}

fn drops() -> DropSettings {
    DropSettings {
        bucket: Some(BUCKET.into()),
        max_files: 3,
        max_image_bytes: 1000,
        ..DropSettings::default()
    }
}

fn sample() -> Value {
    let path = format!(
        "{}/../../events/apigw-v2/post-sequences.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The sample event as `method path` with `body` (JSON) as `user`.
fn req(method: &str, path: &str, body: Option<Value>, user: &str) -> lambda_http::Request {
    let mut v = sample();
    v["rawPath"] = path.into();
    v["requestContext"]["http"]["path"] = path.into();
    v["requestContext"]["http"]["method"] = method.into();
    v["routeKey"] = format!("{method} {path}").into();
    v["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] = user.into();
    match body {
        Some(b) => v["body"] = b.to_string().into(),
        None => {
            v.as_object_mut().unwrap().remove("body");
        }
    }
    lambda_http::request::from_str(&v.to_string()).unwrap()
}

struct Reply {
    status: u16,
    content_type: String,
    body: Value,
}

async fn call(app: &axum::Router, r: lambda_http::Request) -> Reply {
    let resp = app.clone().oneshot(r).await.unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        content_type,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

fn announcement(files: &[(&str, u64)]) -> Value {
    json!({
        "files": files.iter().map(|(n, s)| json!({"name": n, "size": s})).collect::<Vec<_>>(),
        "max_images_per_upload": 2,
    })
}

/// Announce `files` as USER; the new sequence id.
async fn announce(app: &axum::Router, files: &[(&str, u64)]) -> String {
    let r = call(app, req("POST", "/v1/sequences", Some(announcement(files)), USER)).await;
    assert_eq!(r.status, 201, "{:#}", r.body);
    r.body["sequence_id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn the_sample_event_announces_a_sequence_awaiting_its_files() {
    let d = deps(DropSettings {
        bucket: Some(BUCKET.into()),
        ..DropSettings::default()
    });
    let app = router(d.clone());
    let r = call(
        &app,
        lambda_http::request::from_str(&sample().to_string()).unwrap(),
    )
    .await;
    assert_eq!(r.status, 201, "{:#}", r.body);
    assert_eq!(r.body["state"], "AWAITING_FILES");
    let id = r.body["sequence_id"].as_str().unwrap();
    let uploads = r.body["uploads"].as_array().unwrap();
    assert_eq!(uploads.len(), 2);
    assert_eq!(uploads[0]["key"], format!("sequences/{USER}/{id}/img_0001.jpg"));
    assert_eq!(uploads[0]["method"], "PUT");
    assert_eq!(uploads[0]["headers"]["content-length"], "1048576");
    // md5 0f343b0931126a20f133d67c2b018a3b as Content-MD5 (base64 of the digest).
    assert_eq!(uploads[0]["headers"]["content-md5"], "DzQ7CTESaiDxM9Z8KwGKOw==");
    assert!(uploads[1]["headers"].get("content-md5").is_none());
    assert_eq!(r.body["complete_path"], format!("/v1/sequences/{id}/complete"));

    // Recorded: GET shows AWAITING_FILES with the organization and the count.
    let r = call(&app, req("GET", &format!("/v1/sequences/{id}"), None, USER)).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    assert_eq!(r.body["state"], "AWAITING_FILES");
    assert_eq!(r.body["image_count"], 2);
    let seq = d.repo.get_sequence(USER, id).await.unwrap().unwrap();
    assert_eq!(seq.organization_id.as_deref(), Some("1234567890"));
    let r = call(&app, req("GET", "/v1/sequences", None, USER)).await;
    assert_eq!(r.body["sequences"][0]["state"], "AWAITING_FILES", "{:#}", r.body);
}

#[tokio::test]
async fn bad_announcements_are_refused_before_anything_is_recorded() {
    let d = deps(drops());
    let app = router(d.clone());
    for (body, what) in [
        (announcement(&[]), "no files"),
        (
            announcement(&[("a.jpg", 1), ("b.jpg", 1), ("c.jpg", 1), ("d.jpg", 1)]),
            "more than max_files",
        ),
        (announcement(&[("a.jpg", 1001)]), "larger than max_image_bytes"),
        (announcement(&[("a.jpg", 0)]), "empty"),
        (announcement(&[("../b/a.jpg", 1)]), "a path"),
        (announcement(&[("x/a.jpg", 1)]), "a slash"),
        (announcement(&[("a\u{7}.jpg", 1)]), "a control character"),
        (announcement(&[("a.png", 1)]), "not a JPEG"),
        (announcement(&[("manifest.json", 1)]), "the manifest"),
        (announcement(&[("a.jpg", 1), ("a.jpg", 2)]), "a duplicate"),
        (
            json!({"files": [{"name": "a.jpg", "size": 1, "md5": "nothex"}]}),
            "a bad md5",
        ),
        (
            json!({"files": [{"name": "a.jpg", "size": 1}], "organization_id": "x"}),
            "a bad org",
        ),
        (
            json!({"files": [{"name": "a.jpg", "size": 1}], "max_images_per_upload": 501}),
            "split",
        ),
        (
            json!({"files": [{"name": "a.jpg", "size": 1}], "bucket": "other"}),
            "an unknown field",
        ),
        (json!({"files": "a.jpg"}), "not a list"),
    ] {
        let r = call(&app, req("POST", "/v1/sequences", Some(body), USER)).await;
        assert_eq!(r.status, 400, "{what}: {:#}", r.body);
        assert_eq!(r.content_type, "application/problem+json", "{what}");
        assert_eq!(r.body["code"], "invalid-parameter", "{what}");
    }
    // Not JSON; no caller.
    let mut r = req("POST", "/v1/sequences", Some(announcement(&[("a.jpg", 1)])), USER);
    r.headers_mut().remove("content-type");
    assert_eq!(call(&app, r).await.status, 415);
    let mut v = sample();
    v["requestContext"].as_object_mut().unwrap().remove("authorizer");
    let r = call(&app, lambda_http::request::from_str(&v.to_string()).unwrap()).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    assert!(d.repo.snapshot().sequences.is_empty(), "nothing recorded");
    assert!(d.repo.snapshot().announcements.is_empty(), "nothing recorded");

    // Without a bucket the routes are unavailable, not broken.
    let app = router(deps(DropSettings::default()));
    let r = call(
        &app,
        req("POST", "/v1/sequences", Some(announcement(&[("a.jpg", 1)])), USER),
    )
    .await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (503, Some("drops-unavailable"))
    );
}

#[tokio::test]
async fn complete_names_missing_files_then_writes_the_manifest_once() {
    let d = deps(drops());
    let app = router(d.clone());
    let id = announce(&app, &[("a.jpg", 3), ("b.jpg", 4), ("c.jpg", 5)]).await;
    let prefix = format!("sequences/{USER}/{id}/");
    d.objects.put(BUCKET, &format!("{prefix}a.jpg"), vec![1u8; 3]);
    d.objects.put(BUCKET, &format!("{prefix}c.jpg"), vec![1u8; 6]);
    let complete = format!("/v1/sequences/{id}/complete");

    let r = call(&app, req("POST", &complete, None, USER)).await;
    assert_eq!(r.status, 409, "{:#}", r.body);
    assert_eq!(r.content_type, "application/problem+json");
    assert_eq!(r.body["code"], "files-missing");
    let detail = r.body["detail"].as_str().unwrap();
    assert!(detail.contains("b.jpg (missing)"), "{detail}");
    assert!(detail.contains("c.jpg (6 bytes, announced 5)"), "{detail}");
    assert_eq!(
        r.body["files"],
        json!([
            {"name": "b.jpg", "problem": "missing", "expected_size": 4},
            {"name": "c.jpg", "problem": "size_mismatch", "expected_size": 5, "actual_size": 6},
        ])
    );
    assert!(
        d.objects
            .list(BUCKET, &format!("{prefix}manifest.json"))
            .await
            .unwrap()
            .is_empty(),
        "no manifest while files are missing"
    );
    let seq = d.repo.get_sequence(USER, &id).await.unwrap().unwrap();
    assert_eq!(seq.state, SequenceState::AwaitingFiles);

    // Another user cannot complete it.
    let r = call(&app, req("POST", &complete, None, "user-2")).await;
    assert_eq!(r.status, 404, "{:#}", r.body);

    // Resume: fresh URLs for exactly the files not uploaded as announced.
    let again = format!("/v1/sequences/{id}/uploads");
    let r = call(&app, req("POST", &again, None, USER)).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    let names: Vec<&str> = r.body["uploads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b.jpg", "c.jpg"]);
    assert_eq!(r.body["uploads"][1]["headers"]["content-length"], "5");
    let r = call(&app, req("POST", &again, None, "user-2")).await;
    assert_eq!(r.status, 404, "{:#}", r.body);

    d.objects.put(BUCKET, &format!("{prefix}b.jpg"), vec![1u8; 4]);
    d.objects.put(BUCKET, &format!("{prefix}c.jpg"), vec![1u8; 5]);
    let r = call(&app, req("POST", &again, None, USER)).await;
    assert_eq!((r.status, &r.body["uploads"]), (200, &json!([])), "all there");
    let r = call(&app, req("POST", &complete, None, USER)).await;
    assert_eq!(r.status, 202, "{:#}", r.body);
    assert_eq!(r.body["state"], "RECEIVED");
    assert_eq!(r.body["count"], 3);
    let manifest = d
        .objects
        .get_object(BUCKET, &format!("{prefix}manifest.json"), None)
        .await
        .unwrap();
    let m: Value = serde_json::from_slice(&manifest.bytes).unwrap();
    assert_eq!(m["images"], json!(["a.jpg", "b.jpg", "c.jpg"]));
    assert_eq!(m["max_images_per_upload"], 2);
    assert!(m["drop_id"].is_string());
    let seq = d.repo.get_sequence(USER, &id).await.unwrap().unwrap();
    assert_eq!(seq.state, SequenceState::Received);

    // Once: a second complete is refused (the manifest is not written again).
    let r = call(&app, req("POST", &complete, None, USER)).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (409, Some("not-awaiting-files"))
    );
    let r = call(&app, req("POST", &again, None, USER)).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (409, Some("not-awaiting-files"))
    );
    let again = d
        .objects
        .get_object(BUCKET, &format!("{prefix}manifest.json"), None)
        .await
        .unwrap();
    assert_eq!(again.etag, manifest.etag);
}

fn failed_upload(id: &str) -> UploadRecord {
    let now = OffsetDateTime::now_utc();
    UploadRecord {
        user_id: USER.into(),
        sequence_id: id.into(),
        upload_id: format!("{USER}~{id}~000"),
        index: 0,
        state: UploadState::Failed,
        session_key: "k".into(),
        total_len: 1,
        image_count: 1,
        cluster_id: None,
        handle: None,
        organization_id: None,
        bytes_sent: 0,
        created_at: now,
        started_at: None,
        finished_at: Some(now),
        error: Some("Mapillary refused".into()),
        attempts: 5,
        outbox: Default::default(),
    }
}

#[tokio::test]
async fn retry_writes_the_manifest_again_only_when_something_failed() {
    let d = deps(drops());
    let app = router(d.clone());
    let id = announce(&app, &[("a.jpg", 3)]).await;
    let prefix = format!("sequences/{USER}/{id}/");
    let retry = format!("/v1/sequences/{id}/retry");
    let r = call(&app, req("POST", &retry, None, USER)).await;
    assert_eq!((r.status, r.body["code"].as_str()), (409, Some("not-completed")));

    d.objects.put(BUCKET, &format!("{prefix}a.jpg"), vec![1u8; 3]);
    let r = call(
        &app,
        req("POST", &format!("/v1/sequences/{id}/complete"), None, USER),
    )
    .await;
    assert_eq!(r.status, 202, "{:#}", r.body);
    let r = call(&app, req("POST", &retry, None, USER)).await;
    assert_eq!((r.status, r.body["code"].as_str()), (409, Some("sequence-busy")));

    // zip-and-push finished it without failures: nothing to retry.
    let mut seq = d.repo.get_sequence(USER, &id).await.unwrap().unwrap();
    seq.state = SequenceState::Uploaded;
    d.repo.put_sequence(&seq).await.unwrap();
    let r = call(&app, req("POST", &retry, None, USER)).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (409, Some("nothing-to-retry"))
    );

    // One upload failed: the manifest is written again, same content but a new drop_id (new ETag).
    d.repo.put_upload(&failed_upload(&id)).await.unwrap();
    let key = format!("{prefix}manifest.json");
    let before = d.objects.get_object(BUCKET, &key, None).await.unwrap();
    let r = call(&app, req("POST", &retry, None, USER)).await;
    assert_eq!(r.status, 202, "{:#}", r.body);
    assert_eq!(r.body["count"], 1);
    let after = d.objects.get_object(BUCKET, &key, None).await.unwrap();
    assert_ne!(after.etag, before.etag, "a new notification, not a duplicate");
    let (b, a): (Value, Value) = (
        serde_json::from_slice(&before.bytes).unwrap(),
        serde_json::from_slice(&after.bytes).unwrap(),
    );
    assert_eq!(a["images"], b["images"]);
    assert_ne!(a["drop_id"], b["drop_id"]);

    // The manifest gone: refused, with a way out.
    d.objects.delete(BUCKET, &key);
    let r = call(&app, req("POST", &retry, None, USER)).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (409, Some("manifest-missing"))
    );
}

#[tokio::test]
async fn delete_removes_objects_and_records_then_answers_404() {
    let d = deps(drops());
    let app = router(d.clone());
    let id = announce(&app, &[("a.jpg", 3), ("b.jpg", 3)]).await;
    let other = announce(&app, &[("a.jpg", 3)]).await;
    let prefix = format!("sequences/{USER}/{id}/");
    d.objects.put(BUCKET, &format!("{prefix}a.jpg"), vec![1u8; 3]);
    d.objects.put(BUCKET, &format!("{prefix}b.jpg"), vec![1u8; 3]);
    d.objects
        .put(BUCKET, &format!("sequences/{USER}/{other}/a.jpg"), vec![1u8; 3]);
    let path = format!("/v1/sequences/{id}");

    // Not while zip-and-push works on it; never another user's.
    let mut seq = d.repo.get_sequence(USER, &id).await.unwrap().unwrap();
    seq.state = SequenceState::Uploading;
    d.repo.put_sequence(&seq).await.unwrap();
    let r = call(&app, req("DELETE", &path, None, USER)).await;
    assert_eq!((r.status, r.body["code"].as_str()), (409, Some("sequence-busy")));
    seq.state = SequenceState::Failed;
    seq.upload_ids = vec![format!("{USER}~{id}~000")];
    d.repo.put_sequence(&seq).await.unwrap();
    d.repo.put_upload(&failed_upload(&id)).await.unwrap();
    let r = call(&app, req("DELETE", &path, None, "user-2")).await;
    assert_eq!(r.status, 404, "{:#}", r.body);

    let r = call(&app, req("DELETE", &path, None, USER)).await;
    assert_eq!(r.status, 200, "{:#}", r.body);
    assert_eq!(r.body["objects_deleted"], 2);
    assert_eq!(r.body["mapillary_deleted"], false);
    assert!(r.body["mapillary_note"].as_str().unwrap().contains("not deleted"));
    assert_eq!(r.body["mapillary_sequences"], json!([]));
    assert!(d.objects.list(BUCKET, &prefix).await.unwrap().is_empty());
    let st = d.repo.snapshot();
    assert!(!st.sequences.contains_key(&(USER.to_string(), id.clone())));
    assert!(st.uploads.keys().all(|(_, s, _)| s != &id), "upload records gone");
    assert!(!st.announcements.contains_key(&(USER.to_string(), id.clone())));
    assert_eq!(
        st.deleted_claims,
        [shared::idempotency::sequence_claim_id(
            BUCKET,
            &format!("{prefix}manifest.json")
        )],
        "zip-and-push's claim of the sequence (and only its) is deleted"
    );

    let r = call(&app, req("GET", &path, None, USER)).await;
    assert_eq!(r.status, 404, "{:#}", r.body);
    let r = call(&app, req("DELETE", &path, None, USER)).await;
    assert_eq!(r.status, 404, "{:#}", r.body);
    // The other sequence is untouched.
    assert_eq!(
        d.objects
            .list(BUCKET, &format!("sequences/{USER}/{other}/"))
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(d.repo.get_sequence(USER, &other).await.unwrap().is_some());
}
