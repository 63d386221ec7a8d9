//! End-to-end tests of the handler: in-memory fakes for AWS, the real in-process simulator for
//! Mapillary (frozen clock, loopback).

use std::io::Read;
use std::time::{Duration, Instant};

use aws_lambda_events::event::sqs::SqsEvent;
use mapillary_sim::defaults::{APP_ID, CLIENT_SECRET, DEMO_USER_ID, DEMO_USER_TOKEN};
use mapillary_sim::{SimConfig, SimHandle, Simulator, World as SimWorld};
use relay_fixtures::{jpeg, track, ImageSpec, TrackSpec};
use secrecy::SecretString;
use serde_json::{json, Value};
use shared::domain::description::parse_capture_time;
use shared::domain::exif::read_metadata;
use shared::fakes::{MemClaims, MemQueues, MemRepo, MemStore, MemTokens, RecordingMapillary};
use shared::idempotency::{Claim, ClaimOutcome, ClaimStatus};
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::client::{MapillaryClient, UploadReport};
use shared::mapillary::retry::RetryPolicy;
use shared::mapillary::Endpoints;
use shared::model::{SequenceState, SequenceStatus, StoredToken, TokenKind, TokenRecord, UploadState};
use shared::ports::{IdempotencyStore, TokenStore};
use time::macros::datetime;
use time::OffsetDateTime;

use crate::config::Tunables;
use crate::deps::HandlerDeps;
use crate::handler::{handle_batch, sequence_status};

const BUCKET: &str = "relay-test";
const USER: &str = "user-1";

type TestDeps = HandlerDeps<
    MemStore,
    MemRepo,
    MemClaims,
    MemTokens,
    MemQueues,
    MemQueues,
    RecordingMapillary<MapillaryApp>,
>;

struct World {
    sim: SimHandle,
    deps: TestDeps,
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

fn token(t: &str, expires_at: Option<OffsetDateTime>) -> StoredToken {
    StoredToken {
        access_token: SecretString::from(t),
        refresh_token: None,
        expires_at,
        mapillary_user_id: Some(DEMO_USER_ID.into()),
        username: None,
        updated_at: OffsetDateTime::now_utc(),
    }
}

async fn world() -> World {
    world_with(SimConfig::frozen()).await
}

/// The handler against a simulator in the named world (strictness rules included).
async fn world_in(w: SimWorld) -> World {
    world_with(SimConfig::world(w)).await
}

async fn world_with(config: SimConfig) -> World {
    let sim = Simulator::start(config, "127.0.0.1:0")
        .await
        .expect("simulator starts");
    let client = MapillaryClient::new(Endpoints::under(sim.base_url()), http(), RetryPolicy::fast());
    let mly = MapillaryApp::new(client, APP_ID, SecretString::from(CLIENT_SECRET));
    let tokens = MemTokens::new();
    tokens.insert(USER, token(DEMO_USER_TOKEN, None));
    let deps = HandlerDeps {
        store: MemStore::new(),
        repo: MemRepo::new(),
        claims: MemClaims::new(),
        tokens,
        clusters: MemQueues::new(),
        requeue: MemQueues::new(),
        mapillary: RecordingMapillary::new(mly),
        tunables: Tunables {
            deadline_margin: Duration::from_millis(0),
            own_bucket: Some(BUCKET.into()),
            ..Tunables::default()
        },
    };
    World { sim, deps }
}

async fn admin(h: &SimHandle, path: &str, v: Value) -> Value {
    let r = http()
        .post(format!("{}{path}", h.admin_url()))
        .json(&v)
        .send()
        .await
        .expect("admin POST");
    assert_eq!(r.status(), 200, "admin {path}");
    r.json().await.expect("admin JSON")
}

async fn admin_get(h: &SimHandle, path: &str) -> reqwest::Response {
    let r = http()
        .get(format!("{}{path}", h.admin_url()))
        .send()
        .await
        .expect("admin GET");
    assert_eq!(r.status(), 200, "admin {path}");
    r
}

fn specs(n: usize, seed_base: u64) -> Vec<ImageSpec> {
    let mut t = TrackSpec::new(48.2, 16.37, datetime!(2024-04-20 08:00:00 UTC));
    t.seed_base = seed_base;
    track(n, &t)
}

/// Put images `img_0000.jpg…` and a manifest; returns the manifest etag.
fn drop_sequence(store: &MemStore, seq: &str, images: &[(String, Vec<u8>)], manifest: &[u8]) -> String {
    for (name, bytes) in images {
        store.put(BUCKET, &format!("sequences/{USER}/{seq}/{name}"), bytes.clone());
    }
    store.put(
        BUCKET,
        &format!("sequences/{USER}/{seq}/manifest.json"),
        manifest.to_vec(),
    )
}

fn named(specs: &[ImageSpec]) -> Vec<(String, Vec<u8>)> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("img_{i:04}.jpg"), jpeg(s)))
        .collect()
}

fn s3_body(user: &str, seq: &str, etag: &str) -> String {
    json!({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2024-04-20T10:00:00.000Z", "eventName": "ObjectCreated:Put",
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": BUCKET, "arn": format!("arn:aws:s3:::{BUCKET}")},
               "object": {"key": format!("sequences/{user}/{seq}/manifest.json"), "size": 10, "eTag": etag}}
    }]})
    .to_string()
}

fn event(bodies: &[String]) -> SqsEvent {
    let records: Vec<Value> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| {
            json!({"messageId": format!("msg-{i}"), "receiptHandle": "rh", "body": b,
                   "attributes": {"ApproximateReceiveCount": "1"}, "messageAttributes": {},
                   "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:1:ingest", "awsRegion": "us-east-1"})
        })
        .collect();
    serde_json::from_value(json!({ "Records": records })).expect("SQS event")
}

/// The claim id every delivery of `seq`'s manifest takes (one per sequence).
fn held_claim_id(seq: &str) -> String {
    shared::idempotency::sequence_claim_id(BUCKET, &format!("sequences/{USER}/{seq}/manifest.json"))
}

/// [`s3_body`] of a manifest put again: S3 gives each put its own `sequencer`.
fn s3_body_put(user: &str, seq: &str, etag: &str, sequencer: &str) -> String {
    let mut v: Value = serde_json::from_str(&s3_body(user, seq, etag)).expect("body");
    v["Records"][0]["s3"]["object"]["sequencer"] = json!(sequencer);
    v.to_string()
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(600)
}

async fn status(w: &World, seq: &str) -> SequenceStatus {
    sequence_status(&w.deps.repo, USER, seq)
        .await
        .expect("status read")
        .expect("sequence known")
}

async fn stored_zip(w: &World, upload_id: &str) -> Vec<u8> {
    let key = w
        .deps
        .repo
        .snapshot()
        .uploads
        .values()
        .find(|u| u.upload_id == upload_id)
        .expect("upload record")
        .session_key
        .clone();
    admin_get(&w.sim, &format!("/sessions/{key}/bytes"))
        .await
        .bytes()
        .await
        .expect("bytes")
        .to_vec()
}

/// Check the zip's layout and that each entry's MAP* description matches its EXIF; returns the
/// number of entries.
fn check_zip(bytes: &[u8]) -> usize {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).expect("readable zip");
    let comment = String::from_utf8(z.comment().to_vec()).expect("utf8 comment");
    assert!(comment.starts_with("{\"sequence_md5sum\":\""), "{comment}");
    for i in 0..z.len() {
        let mut f = z.by_index(i).expect("entry");
        assert_eq!(f.name().expect("entry name"), format!("{i}.jpg"));
        assert_eq!(f.compression(), zip::CompressionMethod::Stored);
        let mut data = Vec::new();
        f.read_to_end(&mut data).expect("entry data");
        let meta = read_metadata(&data).expect("EXIF of the entry");
        let ex = exif::Reader::new()
            .read_from_container(&mut std::io::Cursor::new(&data))
            .expect("exif");
        let desc = ex
            .get_field(exif::Tag::ImageDescription, exif::In::PRIMARY)
            .expect("ImageDescription");
        let exif::Value::Ascii(ref v) = desc.value else {
            panic!("ImageDescription is not ASCII")
        };
        let d: Value = serde_json::from_slice(&v[0]).expect("MAP* JSON");
        let lat = d["MAPLatitude"].as_f64().expect("lat");
        let lon = d["MAPLongitude"].as_f64().expect("lon");
        assert!((lat - meta.lat).abs() <= 1e-7, "lat {lat} vs {}", meta.lat);
        assert!((lon - meta.lon).abs() <= 1e-7, "lon {lon} vs {}", meta.lon);
        let t = parse_capture_time(d["MAPCaptureTime"].as_str().expect("time")).expect("capture time");
        assert!(
            (t - meta.captured_at).abs() <= time::Duration::milliseconds(1),
            "{t} vs {}",
            meta.captured_at
        );
        shared::domain::description::validate(std::str::from_utf8(&v[0]).expect("utf8")).expect("valid MAP*");
    }
    z.len()
}

async fn cluster(w: &World, id: &str) -> Value {
    admin_get(&w.sim, &format!("/clusters/{id}"))
        .await
        .json()
        .await
        .expect("cluster JSON")
}

/// Post-conditions of a successful single-upload run.
fn assert_one_clean_post(r: &UploadReport) {
    for (post, fetched) in r.posts.iter().zip(&r.offsets_fetched) {
        assert_eq!(
            post.offset, *fetched,
            "each POST starts at the offset the server reported"
        );
    }
    let last = r.posts.last().expect("a POST");
    assert!(last.error.is_none());
    assert_eq!(
        last.bytes_sent,
        r.total_len - last.offset,
        "the final POST sends exactly the rest"
    );
}

#[tokio::test]
async fn when_30_images_dropped_should_land_as_one_finished_cluster_with_valid_zip() {
    let w = world().await;
    let imgs = named(&specs(30, 0));
    let etag = drop_sequence(&w.deps.store, "s30", &imgs, b"{}");
    let resp = handle_batch(&w.deps, event(&[s3_body(USER, "s30", &etag)]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());

    let st = status(&w, "s30").await;
    assert_eq!(st.state, SequenceState::Uploaded, "{st:?}");
    assert_eq!((st.image_count, st.accepted_count), (30, 30));
    assert!(st.rejected.is_empty(), "{:?}", st.rejected);
    assert_eq!(st.uploads.len(), 1);
    let up = &st.uploads[0];
    assert_eq!(up.state, UploadState::HandedOff);
    assert_eq!(up.image_count, 30);
    let cluster_id = up.cluster_id.clone().expect("cluster id");
    let msgs = w.deps.clusters.cluster_messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].cluster_id, cluster_id);
    assert_eq!(msgs[0].upload_id, up.upload_id);
    assert_eq!(
        w.deps.repo.snapshot().image_lists,
        0,
        "the entries planned in this invocation are streamed from memory, not read back"
    );

    // EXIF came from ranged reads, the manifest from one ranged read too; each image was read
    // whole exactly once (for the upload).
    assert_eq!(
        w.deps.store.full_gets.load(std::sync::atomic::Ordering::Relaxed),
        30
    );

    let bytes = stored_zip(&w, &up.upload_id).await;
    assert_eq!(bytes.len() as u64, up.bytes);
    assert_eq!(check_zip(&bytes), 30);

    w.sim.advance_clock(24 * 3600);
    let c = cluster(&w, &cluster_id).await;
    assert_eq!(c["failed"], false, "{c}");
    assert_eq!(c["accepted_images"], 30, "{c}");
    for (_, v) in c["stages"].as_object().expect("stages") {
        assert_eq!(v, "FINISHED", "{c}");
    }
    assert_eq!(c["sequences"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn when_same_event_delivered_three_times_concurrently_should_upload_once() {
    let w = world().await;
    let imgs = named(&specs(10, 100));
    let etag = drop_sequence(&w.deps.store, "dup", &imgs, b"{}");
    let body = s3_body(USER, "dup", &etag);
    let (a, b, c) = tokio::join!(
        handle_batch(&w.deps, event(std::slice::from_ref(&body)), deadline()),
        handle_batch(&w.deps, event(std::slice::from_ref(&body)), deadline()),
        handle_batch(&w.deps, event(std::slice::from_ref(&body)), deadline()),
    );
    let failures = a.batch_item_failures.len() + b.batch_item_failures.len() + c.batch_item_failures.len();
    // The losers either saw the claim held (retry later) or completed (ack).
    assert!(failures <= 2);
    // Redeliveries after completion are acknowledged without work.
    let again = handle_batch(&w.deps, event(&[body.clone(), body]), deadline()).await;
    assert!(again.batch_item_failures.is_empty());
    assert_eq!(
        w.deps
            .mapillary
            .finishes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(w.deps.clusters.cluster_messages().len(), 1);
    assert_eq!(w.sim.sim().world().clusters.len(), 1);
}

#[tokio::test]
async fn when_1100_images_should_make_three_uploads_and_three_clusters() {
    let w = world().await;
    let imgs = named(&specs(1100, 2000));
    let etag = drop_sequence(&w.deps.store, "big", &imgs, b"{}");
    let resp = handle_batch(&w.deps, event(&[s3_body(USER, "big", &etag)]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    let st = status(&w, "big").await;
    assert_eq!(st.state, SequenceState::Uploaded);
    let counts: Vec<u32> = st.uploads.iter().map(|u| u.image_count).collect();
    assert_eq!(counts, [500, 500, 100]);
    assert!(st.uploads.iter().all(|u| u.state == UploadState::HandedOff));
    let mut ids: Vec<String> = st.uploads.iter().filter_map(|u| u.cluster_id.clone()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    assert_eq!(w.sim.sim().world().clusters.len(), 3);
    assert_eq!(w.deps.clusters.cluster_messages().len(), 3);
}

async fn clean_zip(seq: &str, imgs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let w = world().await;
    let etag = drop_sequence(&w.deps.store, seq, imgs, b"{}");
    let resp = handle_batch(&w.deps, event(&[s3_body(USER, seq, &etag)]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    let st = status(&w, seq).await;
    stored_zip(&w, &st.uploads[0].upload_id).await
}

#[tokio::test]
async fn when_store_vouches_for_the_md5_should_produce_the_identical_zip() {
    let imgs = named(&specs(12, 250));
    // The store does not vouch: every original is hashed (the fallback).
    let hashed = clean_zip("md5", &imgs).await;

    // The store vouches (S3: plain ETag of a single-part plain/SSE-S3 object): no hashing, same zip.
    let w = world().await;
    w.deps
        .store
        .vouch_md5
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let etag = drop_sequence(&w.deps.store, "md5", &imgs, b"{}");
    let resp = handle_batch(&w.deps, event(&[s3_body(USER, "md5", &etag)]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    let st = status(&w, "md5").await;
    let vouched = stored_zip(&w, &st.uploads[0].upload_id).await;
    assert_eq!(vouched, hashed);

    // And the comment is mapillary_tools' sequence_md5sum of the originals' md5s.
    let md5s: Vec<String> = imgs
        .iter()
        .map(|(_, b)| hex::encode(<md5::Md5 as md5::Digest>::digest(b)))
        .collect();
    let z = zip::ZipArchive::new(std::io::Cursor::new(vouched)).expect("zip");
    assert_eq!(
        z.comment(),
        &shared::domain::zipfmt::archive_comment(&shared::domain::zipfmt::sequence_md5sum(&md5s))[..]
    );
}

#[tokio::test]
async fn when_connection_dropped_mid_body_should_resume_with_identical_bytes() {
    let imgs = named(&specs(30, 300));
    let clean = clean_zip("drop", &imgs).await;

    let w = world().await;
    admin(
        &w.sim,
        "/faults",
        json!({"method": "POST", "path": "/rupload/*", "times": 1, "action": {"kind": "drop_after_bytes", "bytes": 20000}}),
    )
    .await;
    let etag = drop_sequence(&w.deps.store, "drop", &imgs, b"{}");
    let resp = handle_batch(&w.deps, event(&[s3_body(USER, "drop", &etag)]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    let st = status(&w, "drop").await;
    assert_eq!(st.uploads[0].state, UploadState::HandedOff, "{st:?}");
    let reports = w.deps.mapillary.reports();
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    assert_eq!(r.posts.len(), 2, "{r:?}");
    assert!(r.posts[1].offset > 0 && r.posts[1].offset <= 20000, "{r:?}");
    assert_one_clean_post(r);
    assert_eq!(stored_zip(&w, &st.uploads[0].upload_id).await, clean);
}

#[tokio::test]
async fn when_handler_killed_mid_upload_should_resume_on_redelivery_with_identical_bytes() {
    let imgs = named(&specs(30, 400));
    let clean = clean_zip("kill", &imgs).await;

    let w = world().await;
    // First POST: 3 s latency then the body breaks after 20000 bytes; second POST: 3 s latency,
    // during which the handler is killed.
    admin(
        &w.sim,
        "/faults",
        json!({"method": "POST", "path": "/rupload/*", "times": 1,
        "action": {"kind": "drop_after_bytes", "bytes": 20000}}),
    )
    .await;
    admin(
        &w.sim,
        "/faults",
        json!({"method": "POST", "path": "/rupload/*", "times": 2,
        "action": {"kind": "latency", "ms": 1500}}),
    )
    .await;
    let etag = drop_sequence(&w.deps.store, "kill", &imgs, b"{}");
    let body = s3_body(USER, "kill", &etag);
    let killed = tokio::time::timeout(
        Duration::from_millis(2500),
        handle_batch(&w.deps, event(std::slice::from_ref(&body)), deadline()),
    )
    .await;
    assert!(killed.is_err(), "the handler should still be uploading");
    let st = status(&w, "kill").await;
    assert_eq!(st.uploads[0].state, UploadState::Uploading);
    assert!(w.deps.mapillary.reports().is_empty());

    // The dead invocation's lease runs out; SQS redelivers.
    for c in w.deps.claims.claims.lock().expect("lock").values_mut() {
        c.lease_until_ms = 0;
    }
    let resp = handle_batch(&w.deps, event(&[body]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    let st = status(&w, "kill").await;
    assert_eq!(st.uploads[0].state, UploadState::HandedOff, "{st:?}");
    let reports = w.deps.mapillary.reports();
    let r = &reports[0];
    assert!(
        r.offsets_fetched[0] > 0,
        "resumed from the server's offset: {r:?}"
    );
    assert_eq!(r.posts.len(), 1, "{r:?}");
    assert_one_clean_post(r);
    assert_eq!(stored_zip(&w, &st.uploads[0].upload_id).await, clean);
}

#[tokio::test]
async fn when_bad_inputs_mixed_in_should_reject_each_precisely_and_upload_the_good() {
    let w = world().await;
    let base = specs(8, 500);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    // Good images, some with awkward names and one big-endian (all in one folder: mapillary_tools
    // starts a new sequence per folder).
    let good_names = ["a.jpg", "with space.jpg", "a+b.jpg", "ünïcode.jpg", "e.jpg"];
    for (i, n) in good_names.iter().enumerate() {
        let mut s = base[i].clone();
        s.big_endian = i == 1;
        files.push((n.to_string(), jpeg(&s)));
    }
    let good = jpeg(&base[5]);
    files.push(("fake.jpg".into(), b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec()));
    files.push(("truncated.jpg".into(), good[..good.len() / 2].to_vec()));
    files.push(("truncated-exif.jpg".into(), good[..60].to_vec()));
    files.push(("empty.jpg".into(), Vec::new()));
    let mut nogps = base[6].clone();
    nogps.with_gps = false;
    files.push(("nogps.jpg".into(), jpeg(&nogps)));
    let mut null = base[7].clone();
    null.lat = 0.0;
    null.lon = 0.0;
    files.push(("null.jpg".into(), jpeg(&null)));
    // Corrupt IFD0 offset in the TIFF header.
    let mut corrupt = jpeg(&base[5]);
    let at = corrupt.windows(6).position(|w| w == b"Exif\0\0").expect("Exif") + 6;
    let ifd = if &corrupt[at..at + 2] == b"II" {
        0xFFFF_FF00u32.to_le_bytes()
    } else {
        0xFFFF_FF00u32.to_be_bytes()
    };
    corrupt[at + 4..at + 8].copy_from_slice(&ifd);
    files.push(("corrupt-ifd.jpg".into(), corrupt));
    let mut listed: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    listed.push("missing.jpg".into());
    listed.push("../other/x.jpg".into());
    listed.push("a.jpg".into());
    let manifest = json!({"images": listed}).to_string();
    let etag = drop_sequence(&w.deps.store, "bad", &files, manifest.as_bytes());
    let resp = handle_batch(&w.deps, event(&[s3_body(USER, "bad", &etag)]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());

    let st = status(&w, "bad").await;
    assert_eq!(st.state, SequenceState::Uploaded, "{st:?}");
    assert_eq!(st.accepted_count, 5, "{:#?}", st.rejected);
    assert_eq!(st.uploads[0].image_count, 5);
    assert_eq!(st.uploads[0].state, UploadState::HandedOff);
    let reason = |k: &str| {
        st.rejected
            .iter()
            .find(|r| r.key == k)
            .map(|r| r.reason.clone())
            .unwrap_or_else(|| panic!("{k} not rejected: {:?}", st.rejected))
    };
    assert!(
        reason("fake.jpg").starts_with("not a JPEG"),
        "{}",
        reason("fake.jpg")
    );
    assert!(
        reason("truncated.jpg").starts_with("truncated JPEG"),
        "{}",
        reason("truncated.jpg")
    );
    assert!(
        reason("truncated-exif.jpg").starts_with("truncated JPEG"),
        "{}",
        reason("truncated-exif.jpg")
    );
    assert!(
        reason("empty.jpg").contains("empty (0 bytes)"),
        "{}",
        reason("empty.jpg")
    );
    assert!(
        reason("nogps.jpg").starts_with("no GPS position"),
        "{}",
        reason("nogps.jpg")
    );
    assert!(reason("null.jpg").contains("(0, 0)"), "{}", reason("null.jpg"));
    assert!(
        reason("corrupt-ifd.jpg").starts_with("corrupt EXIF"),
        "{}",
        reason("corrupt-ifd.jpg")
    );
    assert!(
        reason("missing.jpg").starts_with("missing key"),
        "{}",
        reason("missing.jpg")
    );
    assert!(
        reason("../other/x.jpg").contains("'..'"),
        "{}",
        reason("../other/x.jpg")
    );
    assert!(reason("a.jpg").contains("more than once"), "{}", reason("a.jpg"));
    assert_eq!(st.rejected.len(), 10, "{:?}", st.rejected);
    let bytes = stored_zip(&w, &st.uploads[0].upload_id).await;
    assert_eq!(check_zip(&bytes), 5);
}

#[tokio::test]
async fn when_manifest_malformed_or_no_token_or_bad_key_should_fail_with_reason() {
    let w = world().await;
    let imgs = named(&specs(3, 600));
    let etag = drop_sequence(&w.deps.store, "badjson", &imgs, b"{\"images\": [");
    // A user without a token.
    for (n, b) in &imgs {
        w.deps
            .store
            .put(BUCKET, &format!("sequences/nobody/s1/{n}"), b.clone());
    }
    let etag2 = w
        .deps
        .store
        .put(BUCKET, "sequences/nobody/s1/manifest.json", b"{}".to_vec());
    let bad_key = json!({"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": BUCKET},
        "object": {"key": "sequences/u/s/not-a-manifest.jpg", "size": 1, "eTag": "x"}}}]})
    .to_string();
    let resp = handle_batch(
        &w.deps,
        event(&[
            s3_body(USER, "badjson", &etag),
            s3_body("nobody", "s1", &etag2),
            bad_key,
            "not json".into(),
        ]),
        deadline(),
    )
    .await;
    assert!(
        resp.batch_item_failures.is_empty(),
        "{:?}",
        resp.batch_item_failures
    );
    let st = status(&w, "badjson").await;
    assert_eq!(st.state, SequenceState::Failed);
    assert!(
        st.reason
            .as_deref()
            .unwrap_or_default()
            .starts_with("malformed manifest.json"),
        "{st:?}"
    );
    let st = sequence_status(&w.deps.repo, "nobody", "s1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st.state, SequenceState::Failed);
    assert_eq!(
        st.reason.as_deref(),
        Some("no Mapillary token for user nobody: connect the account")
    );
    let errs = w.deps.repo.snapshot().ingest_errors;
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs[0].reason.contains("not of the form") || errs[1].reason.contains("not of the form"));
    assert!(w.sim.sim().world().clusters.is_empty());
}

#[tokio::test]
async fn when_upload_gets_401_should_refresh_once_and_continue() {
    let w = world().await;
    let t = admin(&w.sim, "/tokens", json!({"user": DEMO_USER_ID, "oauth": true})).await;
    let old = t["access_token"].as_str().expect("token").to_string();
    w.deps.tokens.insert(
        USER,
        token(&old, Some(OffsetDateTime::now_utc() + time::Duration::days(30))),
    );
    admin(
        &w.sim,
        "/faults",
        json!({"method": "POST", "path": "/rupload/*", "times": 1,
        "action": {"kind": "unauthorized"}}),
    )
    .await;
    let imgs = named(&specs(5, 700));
    let etag = drop_sequence(&w.deps.store, "auth", &imgs, b"{}");
    let resp = handle_batch(&w.deps, event(&[s3_body(USER, "auth", &etag)]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    let st = status(&w, "auth").await;
    assert_eq!(st.uploads[0].state, UploadState::HandedOff, "{st:?}");
    assert_eq!(w.deps.tokens.saves.load(std::sync::atomic::Ordering::Relaxed), 1);
    let saved = w.deps.tokens.get(USER).expect("token");
    use secrecy::ExposeSecret;
    assert_ne!(saved.access_token.expose_secret(), old);
}

#[tokio::test]
async fn a_token_refused_again_right_after_its_refresh_is_retried_in_a_later_invocation_not_failed() {
    let w = world().await;
    let t = admin(&w.sim, "/tokens", json!({"user": DEMO_USER_ID, "oauth": true})).await;
    let old = t["access_token"].as_str().expect("token").to_string();
    w.deps.tokens.insert(
        USER,
        token(&old, Some(OffsetDateTime::now_utc() + time::Duration::days(30))),
    );
    // The stored token is refused (the first 401: refreshed); the refreshed one is refused at once
    // too — by rupload and by /me — as a token that expires again right after its refresh does.
    admin(
        &w.sim,
        "/faults",
        json!({"method": "POST", "path": "/rupload/*", "times": 2,
        "action": {"kind": "unauthorized"}}),
    )
    .await;
    admin(
        &w.sim,
        "/faults",
        json!({"path": "/graph/me", "times": 1, "action": {"kind": "unauthorized"}}),
    )
    .await;
    let imgs = named(&specs(4, 750));
    let etag = drop_sequence(&w.deps.store, "again", &imgs, b"{}");
    let resp = handle_batch(&w.deps, event(&[s3_body(USER, "again", &etag)]), deadline()).await;
    let st = status(&w, "again").await;
    assert_ne!(st.state, SequenceState::Failed, "not failed for good: {st:?}");
    assert!(!st.uploads[0].state.is_final(), "{st:?}");
    assert_eq!(resp.batch_item_failures.len(), 1, "retried later: {resp:?}");
    assert_eq!(w.deps.tokens.saves.load(std::sync::atomic::Ordering::Relaxed), 1);
    // The next invocation (a new session) uploads with the refreshed token.
    let resp = handle_batch(&w.deps, event(&[s3_body(USER, "again", &etag)]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let st = status(&w, "again").await;
    assert_eq!(st.uploads[0].state, UploadState::HandedOff, "{st:?}");
}

#[tokio::test]
async fn when_token_expiring_soon_should_refresh_before_upload() {
    let w = world().await;
    let t = admin(&w.sim, "/tokens", json!({"user": DEMO_USER_ID, "oauth": true})).await;
    let old = t["access_token"].as_str().expect("token").to_string();
    w.deps.tokens.insert(
        USER,
        token(&old, Some(OffsetDateTime::now_utc() + time::Duration::minutes(5))),
    );
    let imgs = named(&specs(3, 800));
    let etag = drop_sequence(&w.deps.store, "soon", &imgs, b"{}");
    handle_batch(&w.deps, event(&[s3_body(USER, "soon", &etag)]), deadline()).await;
    assert_eq!(status(&w, "soon").await.uploads[0].state, UploadState::HandedOff);
    let saved = w.deps.tokens.get(USER).expect("token");
    assert!(saved.expires_at.expect("expiry") > OffsetDateTime::now_utc() + time::Duration::days(1));
}

#[tokio::test]
async fn when_token_revoked_should_fail_sequence_with_mapillary_message() {
    let w = world().await;
    w.deps.tokens.insert(USER, token("not-a-valid-token", None));
    let imgs = named(&specs(3, 900));
    let etag = drop_sequence(&w.deps.store, "revoked", &imgs, b"{}");
    let resp = handle_batch(&w.deps, event(&[s3_body(USER, "revoked", &etag)]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    let st = status(&w, "revoked").await;
    assert_eq!(st.state, SequenceState::Failed, "{st:?}");
    assert!(
        st.reason
            .as_deref()
            .unwrap_or_default()
            .starts_with("Mapillary rejected the token"),
        "{st:?}"
    );
    assert_eq!(st.uploads[0].state, UploadState::Failed);
}

#[tokio::test]
async fn when_finish_upload_fails_ambiguously_should_mark_uncertain_and_never_call_twice() {
    let w = world().await;
    admin(
        &w.sim,
        "/faults",
        json!({"path": "/graph/finish_upload", "times": 1, "phase": "after",
        "action": {"kind": "server_error", "status": 502}}),
    )
    .await;
    let imgs = named(&specs(3, 1000));
    let etag = drop_sequence(&w.deps.store, "amb", &imgs, b"{}");
    let body = s3_body(USER, "amb", &etag);
    handle_batch(&w.deps, event(std::slice::from_ref(&body)), deadline()).await;
    let st = status(&w, "amb").await;
    assert_eq!(st.uploads[0].state, UploadState::FinishUncertain, "{st:?}");
    assert_eq!(st.state, SequenceState::Uploaded);
    handle_batch(&w.deps, event(&[body]), deadline()).await;
    assert_eq!(
        w.deps
            .mapillary
            .finishes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn when_out_of_time_should_requeue_and_continue_next_invocation() {
    let w = world().await;
    admin(
        &w.sim,
        "/faults",
        json!({"method": "POST", "path": "/rupload/*", "times": 1,
        "action": {"kind": "latency", "ms": 1500}}),
    )
    .await;
    let imgs = named(&specs(5, 1100));
    let etag = drop_sequence(&w.deps.store, "slow", &imgs, b"{}");
    let body = s3_body(USER, "slow", &etag);
    let resp = handle_batch(
        &w.deps,
        event(std::slice::from_ref(&body)),
        Instant::now() + Duration::from_millis(700),
    )
    .await;
    assert!(resp.batch_item_failures.is_empty());
    let requeued = w.deps.requeue.take_requeued();
    assert_eq!(requeued, vec![(body.clone(), 0)]);
    assert_eq!(status(&w, "slow").await.uploads[0].state, UploadState::Uploading);
    let lists_before = w.deps.repo.snapshot().image_lists;
    // The continuation runs right away: the lease was released.
    let resp = handle_batch(&w.deps, event(&[body]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    assert_eq!(status(&w, "slow").await.uploads[0].state, UploadState::HandedOff);
    assert_eq!(
        w.deps.repo.snapshot().image_lists,
        lists_before + 1,
        "a continuation resumes from the recorded entries"
    );
}

#[tokio::test]
async fn a_sequence_failing_transiently_forever_is_failed_after_max_invocations_without_progress() {
    // Issue 15, item 2: every upload request answers 503, SQS would redeliver for ever (the receive
    // limit is out of the way here); the sequence is given up after 3 invocations without progress.
    let mut w = world().await;
    w.deps.tunables.max_receives = 100;
    w.deps.tunables.max_invocations_without_progress = 3;
    admin(
        &w.sim,
        "/faults",
        json!({"path": "/rupload/*", "times": 100000,
        "action": {"kind": "server_error", "status": 503}}),
    )
    .await;
    let imgs = named(&specs(3, 1200));
    let etag = drop_sequence(&w.deps.store, "stuck", &imgs, b"{}");
    let body = s3_body(USER, "stuck", &etag);
    // Invocation 1 plans (progress) and fails; 2 and 3 fail without progress: retried.
    for i in 1..=3 {
        let resp = handle_batch(&w.deps, event(std::slice::from_ref(&body)), deadline()).await;
        assert_eq!(resp.batch_item_failures.len(), 1, "invocation {i} is retried");
        let seq = w
            .deps
            .repo
            .snapshot()
            .sequences
            .values()
            .next()
            .cloned()
            .expect("sequence record");
        assert_eq!(seq.state, SequenceState::Uploading, "invocation {i}");
        assert_eq!(seq.progress.stalled, i - 1, "invocation {i}");
        assert!(
            seq.progress
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("503")),
            "{seq:?}"
        );
    }
    // Invocation 4 is the third without progress: FAILED with the last error, acknowledged.
    let resp = handle_batch(&w.deps, event(std::slice::from_ref(&body)), deadline()).await;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let st = status(&w, "stuck").await;
    assert_eq!(st.state, SequenceState::Failed, "{st:?}");
    let reason = st.reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with("gave up after 3 invocations without progress: "),
        "{reason}"
    );
    assert!(reason.contains("503"), "{reason}");
    assert!(
        st.uploads.iter().all(|u| u.state == UploadState::Failed),
        "{st:?}"
    );
    // A redelivery finds it final: no more work, acknowledged.
    let before = logged(&w, "POST", "/rupload/").len() + logged(&w, "GET", "/rupload/").len();
    let resp = handle_batch(&w.deps, event(&[body]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    assert_eq!(
        logged(&w, "POST", "/rupload/").len() + logged(&w, "GET", "/rupload/").len(),
        before
    );
    assert!(w.deps.requeue.take_requeued().is_empty());
}

#[tokio::test]
async fn continuations_without_progress_are_counted_too() {
    // A continuation is a new message (receive count 1 again): only the sequence's own count stops
    // a sequence whose every invocation runs out of time before anything is stored.
    let mut w = world().await;
    w.deps.tunables.max_invocations_without_progress = 2;
    admin(
        &w.sim,
        "/faults",
        json!({"method": "POST", "path": "/rupload/*", "times": 100,
        "action": {"kind": "latency", "ms": 1500}}),
    )
    .await;
    let imgs = named(&specs(3, 1300));
    let etag = drop_sequence(&w.deps.store, "slowpoke", &imgs, b"{}");
    let body = s3_body(USER, "slowpoke", &etag);
    let mut invocations = 0;
    loop {
        invocations += 1;
        assert!(invocations <= 4, "it loops");
        let resp = handle_batch(
            &w.deps,
            event(std::slice::from_ref(&body)),
            Instant::now() + Duration::from_millis(500),
        )
        .await;
        assert!(resp.batch_item_failures.is_empty());
        if w.deps.requeue.take_requeued().is_empty() {
            break;
        }
    }
    // 1: planned (progress) and out of time; 2, 3: out of time without progress → FAILED.
    assert_eq!(invocations, 3);
    let st = status(&w, "slowpoke").await;
    assert_eq!(st.state, SequenceState::Failed, "{st:?}");
    assert!(
        st.reason
            .as_deref()
            .is_some_and(|r| r.contains("2 invocations without progress")),
        "{st:?}"
    );
}

#[tokio::test]
async fn a_delivery_finding_the_sequence_held_is_put_back_with_a_short_delay_and_acknowledged() {
    let mut w = world().await;
    w.deps.tunables.held_retry_delay_s = 17;
    let imgs = named(&specs(2, 1400));
    let etag = drop_sequence(&w.deps.store, "held", &imgs, b"{}");
    let body = s3_body(USER, "held", &etag);
    // Another invocation holds the claim with a live lease.
    let now = OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let other = Claim {
        id: held_claim_id("held"),
        status: ClaimStatus::Inprogress,
        lease_until_ms: now + 600_000,
        owner: "someone-else".into(),
        expiration: now / 1000 + 3600,
    };
    assert!(matches!(
        w.deps.claims.claim(&other, now).await,
        Ok(ClaimOutcome::Acquired { .. })
    ));
    let resp = handle_batch(&w.deps, event(std::slice::from_ref(&body)), deadline()).await;
    assert!(resp.batch_item_failures.is_empty(), "acknowledged: {resp:?}");
    assert_eq!(w.deps.requeue.take_requeued(), vec![(body.clone(), 17)]);
    assert!(w.deps.repo.snapshot().sequences.is_empty(), "no work done");
    assert_eq!(
        w.deps
            .mapillary
            .finishes
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn a_cluster_id_is_saved_through_failed_writes_without_a_second_finish_upload() {
    // Issue 15, item 6: the first two writes of the UPLOADED record fail; the third saves it.
    let w = world().await;
    w.deps.repo.fail_upload_puts(UploadState::Uploaded, 2);
    let imgs = named(&specs(3, 1500));
    let etag = drop_sequence(&w.deps.store, "save", &imgs, b"{}");
    let body = s3_body(USER, "save", &etag);
    let resp = handle_batch(&w.deps, event(std::slice::from_ref(&body)), deadline()).await;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let st = status(&w, "save").await;
    assert_eq!(st.state, SequenceState::Uploaded, "{st:?}");
    assert_eq!(st.uploads[0].state, UploadState::HandedOff, "{st:?}");
    let cluster_id = st.uploads[0].cluster_id.clone().expect("cluster_id saved");
    assert_eq!(
        w.deps
            .mapillary
            .finishes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let world = w.sim.sim().world();
    assert_eq!(world.clusters.len(), 1);
    assert_eq!(world.clusters[0].id, cluster_id, "the cluster Mapillary made");
    assert_eq!(w.deps.clusters.cluster_messages().len(), 1);
}

#[tokio::test]
async fn a_cluster_id_that_cannot_be_saved_in_its_budget_is_never_finished_twice() {
    let mut w = world().await;
    w.deps.tunables.cluster_save_budget = Duration::from_millis(300);
    w.deps.repo.fail_upload_puts(UploadState::Uploaded, 1000);
    let imgs = named(&specs(3, 1600));
    let etag = drop_sequence(&w.deps.store, "lost", &imgs, b"{}");
    let body = s3_body(USER, "lost", &etag);
    let resp = handle_batch(&w.deps, event(std::slice::from_ref(&body)), deadline()).await;
    assert_eq!(resp.batch_item_failures.len(), 1, "retried: {resp:?}");
    assert_eq!(status(&w, "lost").await.uploads[0].state, UploadState::Finishing);
    w.deps.repo.fail_upload_puts(UploadState::Uploaded, 0);
    let resp = handle_batch(&w.deps, event(&[body]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    // Left to the poller's reconciliation (the activity feed), never a second cluster.
    assert_eq!(
        status(&w, "lost").await.uploads[0].state,
        UploadState::FinishUncertain
    );
    assert_eq!(
        w.deps
            .mapillary
            .finishes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(w.sim.sim().world().clusters.len(), 1);
}

#[tokio::test]
async fn finish_upload_is_deferred_when_its_timeout_and_the_save_do_not_fit_before_the_deadline() {
    let mut w = world().await;
    w.deps.tunables.finish_timeout = Duration::from_secs(20);
    w.deps.tunables.cluster_save_budget = Duration::from_secs(5);
    let imgs = named(&specs(3, 1700));
    let etag = drop_sequence(&w.deps.store, "late", &imgs, b"{}");
    let body = s3_body(USER, "late", &etag);
    // 24 s left: every byte goes, finish_upload (20 s + 5 s) does not start.
    let resp = handle_batch(
        &w.deps,
        event(std::slice::from_ref(&body)),
        Instant::now() + Duration::from_secs(24),
    )
    .await;
    assert!(resp.batch_item_failures.is_empty());
    assert_eq!(
        w.deps.requeue.take_requeued(),
        vec![(body.clone(), 0)],
        "continuation"
    );
    assert_eq!(
        w.deps
            .mapillary
            .finishes
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let up = w
        .deps
        .repo
        .snapshot()
        .uploads
        .values()
        .next()
        .cloned()
        .expect("upload");
    assert_eq!(up.state, UploadState::Uploading);
    assert!(up.handle.is_some(), "the handle is kept: {up:?}");
    let posts = logged(&w, "POST", "/rupload/").len();
    // The continuation calls finish_upload with the kept handle: no upload request at all.
    let resp = handle_batch(&w.deps, event(&[body]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    let st = status(&w, "late").await;
    assert_eq!(st.uploads[0].state, UploadState::HandedOff, "{st:?}");
    assert_eq!(
        w.deps
            .mapillary
            .finishes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(logged(&w, "POST", "/rupload/").len(), posts);
    assert_eq!(w.sim.sim().world().clusters.len(), 1);
}

/// Six images in two uploads of three: the first finish_upload succeeds, the second is rate
/// limited (nothing created) and the single delivery allowed gives the sequence up: FAILED, upload 0
/// handed off, upload 1 FAILED.
async fn failed_after_one_upload(w: &mut World, seq: &str, seed: u64) -> String {
    w.deps.tunables.max_images_per_upload = 3;
    w.deps.tunables.max_receives = 1;
    admin(
        &w.sim,
        "/faults",
        json!({"path": "/graph/finish_upload", "every": 2, "times": 1,
        "action": {"kind": "rate_limited"}}),
    )
    .await;
    let imgs = named(&specs(6, seed));
    let etag = drop_sequence(&w.deps.store, seq, &imgs, b"{}");
    let body = s3_body_put(USER, seq, &etag, "0001");
    let resp = handle_batch(&w.deps, event(std::slice::from_ref(&body)), deadline()).await;
    assert!(
        resp.batch_item_failures.is_empty(),
        "given up, acknowledged: {resp:?}"
    );
    let st = status(w, seq).await;
    assert_eq!(st.state, SequenceState::Failed, "{st:?}");
    assert_eq!(st.attempt, 1);
    assert_eq!(st.uploads.len(), 2, "{st:?}");
    assert_eq!(st.uploads[0].state, UploadState::HandedOff, "{st:?}");
    assert_eq!(st.uploads[1].state, UploadState::Failed, "{st:?}");
    etag
}

#[tokio::test]
async fn a_manifest_dropped_again_after_failed_retries_the_failed_uploads_and_keeps_the_delivered() {
    // Issue 15, item 4.
    let mut w = world().await;
    let etag = failed_after_one_upload(&mut w, "again", 1800).await;
    let before = status(&w, "again").await;
    let kept_cluster = before.uploads[0].cluster_id.clone().expect("cluster of upload 0");
    // An SQS duplicate of the first notification changes nothing.
    let dup = s3_body_put(USER, "again", &etag, "0001");
    let resp = handle_batch(&w.deps, event(&[dup]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    assert_eq!(status(&w, "again").await, before, "a duplicate is no re-drop");
    // The user puts the manifest again (same content, a new S3 event).
    let redrop = s3_body_put(USER, "again", &etag, "0002");
    let resp = handle_batch(&w.deps, event(&[redrop]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let st = status(&w, "again").await;
    assert_eq!(st.state, SequenceState::Uploaded, "{st:?}");
    assert_eq!(st.attempt, 2, "the second run");
    assert_eq!(st.reason, None, "{st:?}");
    assert_eq!(st.uploads[0].state, UploadState::HandedOff);
    assert_eq!(
        st.uploads[0].cluster_id.as_deref(),
        Some(kept_cluster.as_str()),
        "kept, not re-sent"
    );
    assert_eq!(st.uploads[1].state, UploadState::HandedOff, "{st:?}");
    {
        let world = w.sim.sim().world();
        assert_eq!(world.clusters.len(), 2, "one cluster per upload, none twice");
        assert_eq!(world.clusters.iter().filter(|c| c.id == kept_cluster).count(), 1);
    }
    let cluster_msgs = w.deps.clusters.cluster_messages();
    assert_eq!(cluster_msgs.len(), 2, "{cluster_msgs:?}");
    assert_eq!(
        cluster_msgs
            .iter()
            .filter(|m| m.cluster_id == kept_cluster)
            .count(),
        1
    );
    // The delivered upload's zip was sent once: one session per upload, upload 0's untouched by
    // the second run (its bytes went in the first).
    let up0_key = w
        .deps
        .repo
        .snapshot()
        .uploads
        .values()
        .next()
        .expect("upload 0")
        .session_key
        .clone();
    let posts_to_up0 = logged(&w, "POST", &format!("/rupload/{up0_key}")).len();
    assert_eq!(posts_to_up0, 1, "upload 0 sent once");
}

/// A stored upload-state event: (id, from, to, error of the upload as written with the change).
type StoredEvent = (String, Option<String>, Option<String>, Option<String>);

/// The upload-state events stored for `upload_id`, in position order.
fn upload_events(w: &World, upload_id: &str) -> Vec<StoredEvent> {
    w.deps
        .repo
        .snapshot()
        .upload_events
        .into_iter()
        .filter(|((u, _), _)| u == upload_id)
        .map(|(_, e)| (e.event.id, e.event.change.from, e.event.change.to, e.upload.error))
        .collect()
}

#[tokio::test]
async fn each_upload_state_change_is_written_as_an_event_with_its_record_in_order_with_stable_ids() {
    // Issue 14: zip-and-push's own state changes go out like the Mapillary stages.
    let mut w = world().await;
    w.deps.tunables.publish_events = true;
    let etag = failed_after_one_upload(&mut w, "evs", 2100).await;
    let st = status(&w, "evs").await;
    let (up0, up1) = (st.uploads[0].upload_id.clone(), st.uploads[1].upload_id.clone());
    let s = |v: &str| Some(v.to_string());
    let ids = |id: &str, n: u32| -> Vec<String> {
        (0..n).map(|k| shared::events::upload_event_id(id, k)).collect()
    };
    let first = upload_events(&w, &up0);
    let changes: Vec<(Option<String>, Option<String>)> =
        first.iter().map(|e| (e.1.clone(), e.2.clone())).collect();
    assert_eq!(
        changes,
        [
            (None, s("PENDING")),
            (s("PENDING"), s("UPLOADING")),
            (s("UPLOADING"), s("FINISHING")),
            (s("FINISHING"), s("UPLOADED")),
            (s("UPLOADED"), s("HANDED_OFF")),
        ],
        "every change of the delivered upload, in order"
    );
    assert_eq!(
        first.iter().map(|e| e.0.clone()).collect::<Vec<_>>(),
        ids(&up0, 5)
    );
    // The failed one: its finish_upload was rate limited (back to UPLOADING), then the sequence
    // was given up; the FAILED event carries the error the status shows.
    let failed = upload_events(&w, &up1);
    let last = failed.last().expect("events of the failed upload").clone();
    assert_eq!(last.2, s("FAILED"), "{failed:?}");
    assert!(
        last.3.is_some() && last.3 == st.uploads[1].error,
        "{last:?} vs {:?}",
        st.uploads[1]
    );
    assert!(
        failed
            .iter()
            .any(|e| e.1 == s("FINISHING") && e.2 == s("UPLOADING")),
        "{failed:?}"
    );
    assert_eq!(
        failed.iter().map(|e| e.0.clone()).collect::<Vec<_>>(),
        ids(&up1, failed.len() as u32)
    );
    for pair in failed.windows(2) {
        assert_eq!(pair[0].2, pair[1].1, "a chain of changes: {failed:?}");
    }

    // The re-drop retries it: FAILED → PENDING … HANDED_OFF, at the next positions; the earlier
    // events keep their ids and contents, the delivered upload gets none.
    let redrop = s3_body_put(USER, "evs", &etag, "0002");
    let resp = handle_batch(&w.deps, event(&[redrop]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    assert_eq!(
        upload_events(&w, &up0),
        first,
        "nothing new for the delivered upload"
    );
    let all = upload_events(&w, &up1);
    assert_eq!(
        all[..failed.len()],
        failed[..],
        "stable ids: the same events at the same ids"
    );
    let retried: Vec<(Option<String>, Option<String>)> = all[failed.len()..]
        .iter()
        .map(|e| (e.1.clone(), e.2.clone()))
        .collect();
    assert_eq!(retried.first(), Some(&(s("FAILED"), s("PENDING"))), "{retried:?}");
    assert_eq!(
        retried.last().map(|c| c.1.clone()),
        Some(s("HANDED_OFF")),
        "{retried:?}"
    );
    assert_eq!(
        all.iter().map(|e| e.0.clone()).collect::<Vec<_>>(),
        ids(&up1, all.len() as u32)
    );
    // The record counts them (the next change continues from there).
    let stored = w.deps.repo.snapshot();
    let rec1 = stored
        .uploads
        .values()
        .find(|u| u.upload_id == up1)
        .expect("upload 1");
    assert_eq!(rec1.outbox.recorded as usize, all.len());
    assert!(rec1.outbox.unwritten.is_empty());
}

#[tokio::test]
async fn without_a_bus_no_upload_state_event_is_written() {
    let w = world().await;
    assert!(!w.deps.tunables.publish_events);
    let imgs = named(&specs(3, 2200));
    let etag = drop_sequence(&w.deps.store, "quiet", &imgs, b"{}");
    let resp = handle_batch(&w.deps, event(&[s3_body(USER, "quiet", &etag)]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    assert_eq!(status(&w, "quiet").await.uploads[0].state, UploadState::HandedOff);
    let st = w.deps.repo.snapshot();
    assert!(st.upload_events.is_empty(), "{:?}", st.upload_events);
    assert!(st.uploads.values().all(|u| u.outbox.recorded == 0));
}

#[tokio::test]
async fn a_manifest_dropped_again_after_uploaded_is_a_recorded_no_op() {
    let w = world().await;
    let imgs = named(&specs(3, 1900));
    let etag = drop_sequence(&w.deps.store, "done", &imgs, b"{}");
    let body = s3_body_put(USER, "done", &etag, "0001");
    handle_batch(&w.deps, event(&[body]), deadline()).await;
    let before = status(&w, "done").await;
    assert_eq!(before.state, SequenceState::Uploaded);
    let redrop = s3_body_put(USER, "done", &etag, "0002");
    let resp = handle_batch(&w.deps, event(&[redrop]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    assert_eq!(status(&w, "done").await, before);
    assert_eq!(
        w.deps
            .mapillary
            .finishes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let errors = w.deps.repo.snapshot().ingest_errors;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].reason.contains("already uploaded"), "{errors:?}");
    assert_eq!(errors[0].key, "sequences/user-1/done/manifest.json");
    assert!(w.deps.requeue.take_requeued().is_empty());
}

#[tokio::test]
async fn a_manifest_dropped_again_while_its_sequence_is_in_progress_waits() {
    let w = world().await;
    // The first run's POST takes 1.5 s.
    admin(
        &w.sim,
        "/faults",
        json!({"method": "POST", "path": "/rupload/*", "times": 1,
        "action": {"kind": "latency", "ms": 1500}}),
    )
    .await;
    let imgs = named(&specs(3, 2000));
    let etag = drop_sequence(&w.deps.store, "busy", &imgs, b"{}");
    let first = s3_body_put(USER, "busy", &etag, "0001");
    let (a, (b, second)) = tokio::join!(
        handle_batch(&w.deps, event(std::slice::from_ref(&first)), deadline()),
        async {
            // A second version of the manifest arrives while the first run uploads.
            tokio::time::sleep(Duration::from_millis(400)).await;
            let etag2 = w
                .deps
                .store
                .put(BUCKET, "sequences/user-1/busy/manifest.json", b"{ }".to_vec());
            assert_ne!(etag, etag2);
            let second = s3_body_put(USER, "busy", &etag2, "0002");
            let resp = handle_batch(&w.deps, event(std::slice::from_ref(&second)), deadline()).await;
            (resp, second)
        }
    );
    assert!(a.batch_item_failures.is_empty() && b.batch_item_failures.is_empty());
    assert_eq!(
        w.deps.requeue.take_requeued(),
        vec![(second, 30)],
        "put back to wait"
    );
    let st = status(&w, "busy").await;
    assert_eq!(st.state, SequenceState::Uploaded);
    assert_eq!(st.attempt, 1);
    assert_eq!(
        w.sim.sim().world().clusters.len(),
        1,
        "never two runs side by side"
    );
}

#[tokio::test]
async fn one_user_takes_at_most_its_share_of_sequences_at_once() {
    // Issue 15, item 2: user-1 drops three sequences, user-2 one, in one batch; two per user.
    let w = world().await;
    w.deps.tokens.insert("user-2", token(DEMO_USER_TOKEN, None));
    admin(
        &w.sim,
        "/faults",
        json!({"method": "POST", "path": "/rupload/*", "times": 10,
        "action": {"kind": "latency", "ms": 400}}),
    )
    .await;
    let mut bodies = Vec::new();
    for (i, (user, seq)) in [
        ("user-1", "a1"),
        ("user-1", "a2"),
        ("user-1", "a3"),
        ("user-2", "b1"),
    ]
    .into_iter()
    .enumerate()
    {
        for (name, bytes) in named(&specs(2, 2100 + 10 * i as u64)) {
            w.deps
                .store
                .put(BUCKET, &format!("sequences/{user}/{seq}/{name}"), bytes);
        }
        let etag = w.deps.store.put(
            BUCKET,
            &format!("sequences/{user}/{seq}/manifest.json"),
            b"{}".to_vec(),
        );
        bodies.push(s3_body(user, seq, &etag));
    }
    let resp = handle_batch(&w.deps, event(&bodies), deadline()).await;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    // user-2's sequence went; one of user-1's waits, put back with the short delay.
    let requeued = w.deps.requeue.take_requeued();
    assert_eq!(requeued.len(), 1, "{requeued:?}");
    assert_eq!(requeued[0].1, 30);
    assert!(!requeued[0].0.contains("user-2"), "{requeued:?}");
    let uploaded = |user: &str, seq: &str| {
        w.deps
            .repo
            .snapshot()
            .sequences
            .get(&(user.to_string(), seq.to_string()))
            .is_some_and(|s| s.state == SequenceState::Uploaded)
    };
    assert!(uploaded("user-2", "b1"));
    let done: Vec<&str> = ["a1", "a2", "a3"]
        .into_iter()
        .filter(|s| uploaded("user-1", s))
        .collect();
    assert_eq!(done.len(), 2, "{done:?}");
    // Every slot was given back: the waiting one goes when it comes back.
    assert!(w
        .deps
        .claims
        .user_slots
        .lock()
        .unwrap()
        .values()
        .all(|s| s.is_empty()));
    let resp = handle_batch(&w.deps, event(&[requeued[0].0.clone()]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    assert!(["a1", "a2", "a3"].into_iter().all(|s| uploaded("user-1", s)));
}

#[tokio::test]
async fn a_slot_of_a_crashed_invocation_ends_with_its_lease() {
    let w = world().await;
    let now = OffsetDateTime::now_utc().unix_timestamp() * 1000;
    // Two invocations crashed while holding user-1's slots; their leases end in 1.5 s.
    for holder in ["crashed-1", "crashed-2"] {
        assert!(w
            .deps
            .claims
            .take_user_slot(USER, holder, now + 1500, now, 2)
            .await
            .unwrap());
    }
    let imgs = named(&specs(2, 2200));
    let etag = drop_sequence(&w.deps.store, "after-crash", &imgs, b"{}");
    let body = s3_body(USER, "after-crash", &etag);
    let resp = handle_batch(&w.deps, event(std::slice::from_ref(&body)), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    assert_eq!(
        w.deps.requeue.take_requeued(),
        vec![(body.clone(), 30)],
        "waits for a slot"
    );
    assert!(w.deps.repo.snapshot().sequences.is_empty());
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let resp = handle_batch(&w.deps, event(&[body]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    assert!(w.deps.requeue.take_requeued().is_empty());
    assert_eq!(status(&w, "after-crash").await.state, SequenceState::Uploaded);
}

#[tokio::test]
async fn caps_fail_the_sequence_or_reject_the_image_with_a_clear_reason() {
    // Issue 15, item 5: manifest size, images per sequence, bytes per image.
    let mut w = world().await;
    let mut big = specs(3, 70);
    big[2].width *= 4;
    big[2].height *= 4;
    let imgs = named(&big);
    let small = imgs[..2].iter().map(|(_, b)| b.len()).max().expect("sizes") as u64;
    assert!(imgs[2].1.len() as u64 > small, "the third image is the big one");
    w.deps.tunables.max_manifest_bytes = 40;
    w.deps.tunables.max_images_per_sequence = 3;
    w.deps.tunables.max_image_bytes = small;

    let padded = format!(r#"{{"organization_id": null, "note": "{}"}}"#, "x".repeat(40));
    let e1 = drop_sequence(&w.deps.store, "bigmanifest", &imgs, padded.as_bytes());
    let four = named(&specs(4, 80));
    let e2 = drop_sequence(&w.deps.store, "toomany", &four, b"{}");
    let e3 = drop_sequence(&w.deps.store, "bigimage", &imgs, b"{}");
    let bodies = [
        s3_body(USER, "bigmanifest", &e1),
        s3_body(USER, "toomany", &e2),
        s3_body(USER, "bigimage", &e3),
    ];
    let resp = handle_batch(&w.deps, event(&bodies), deadline()).await;
    assert!(
        resp.batch_item_failures.is_empty(),
        "{:?}",
        resp.batch_item_failures
    );

    let st = status(&w, "bigmanifest").await;
    assert_eq!(st.state, SequenceState::Failed);
    let reason = st.reason.unwrap_or_default();
    assert!(
        reason.contains(&format!("{} bytes", padded.len())) && reason.contains("RELAY_MAX_MANIFEST_BYTES"),
        "{reason}"
    );
    assert!(st.uploads.is_empty());

    let st = status(&w, "toomany").await;
    assert_eq!(st.state, SequenceState::Failed);
    let reason = st.reason.unwrap_or_default();
    assert!(
        reason.contains("4 images") && reason.contains("RELAY_MAX_IMAGES_PER_SEQUENCE"),
        "{reason}"
    );
    assert!(st.uploads.is_empty());

    let st = status(&w, "bigimage").await;
    assert_eq!(st.state, SequenceState::Uploaded, "{st:?}");
    assert_eq!((st.image_count, st.accepted_count), (3, 2));
    assert_eq!(st.rejected.len(), 1, "{:?}", st.rejected);
    assert_eq!(st.rejected[0].key, imgs[2].0);
    assert!(
        st.rejected[0].reason.contains("RELAY_MAX_IMAGE_BYTES"),
        "{:?}",
        st.rejected
    );
}

#[tokio::test]
async fn a_sequence_whose_headers_exceed_the_memory_cap_fails_with_a_clear_reason() {
    // Headers are kept from the EXIF pass until the zip is planned: a sequence of many images with
    // huge metadata must fail with a reason, not run the function out of memory.
    let mut w = world().await;
    w.deps.tunables.max_header_bytes = 1000;
    let imgs = named(&specs(4, 90));
    let etag = drop_sequence(&w.deps.store, "fatheads", &imgs, b"{}");
    let resp = handle_batch(&w.deps, event(&[s3_body(USER, "fatheads", &etag)]), deadline()).await;
    assert!(
        resp.batch_item_failures.is_empty(),
        "{:?}",
        resp.batch_item_failures
    );
    let st = status(&w, "fatheads").await;
    assert_eq!(st.state, SequenceState::Failed, "{st:?}");
    let reason = st.reason.unwrap_or_default();
    assert!(
        reason.contains("RELAY_MAX_HEADER_BYTES") && reason.contains("1000 bytes"),
        "{reason}"
    );
    assert!(st.uploads.is_empty(), "nothing is uploaded");
    assert!(w.deps.clusters.cluster_messages().is_empty());
}

#[tokio::test]
async fn notifications_of_another_bucket_are_recorded_ingest_errors_and_do_no_work() {
    // Issue 15, item 3: the sample event from `events/`, pointed at another bucket that holds a
    // perfectly good sequence: nothing is read, planned or uploaded; the message is acknowledged.
    let w = world().await;
    let file = include_str!("../../../events/sqs/s3-manifest-created.json");
    let sample_bucket = "relay-local-sequences-123456789012";
    assert!(file.contains(sample_bucket));
    let foreign = "someone-elses-bucket";
    let seq = "seq-2026-11-24";
    for bucket in [foreign, BUCKET] {
        for (name, bytes) in named(&specs(3, 40)) {
            w.deps
                .store
                .put(bucket, &format!("sequences/{USER}/{seq}/{name}"), bytes);
        }
        w.deps.store.put(
            bucket,
            &format!("sequences/{USER}/{seq}/manifest.json"),
            b"{}".to_vec(),
        );
    }
    let event: SqsEvent = serde_json::from_str(&file.replace(sample_bucket, foreign)).expect("event file");
    let resp = handle_batch(&w.deps, event, deadline()).await;
    assert!(resp.batch_item_failures.is_empty(), "acknowledged");
    let errs = w.deps.repo.snapshot().ingest_errors;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].bucket.as_deref(), Some(foreign));
    assert_eq!(errs[0].key, format!("sequences/{USER}/{seq}/manifest.json"));
    assert!(errs[0].reason.contains("RELAY_BUCKET"), "{errs:?}");
    assert!(sequence_status(&w.deps.repo, USER, seq).await.unwrap().is_none());
    assert!(w.sim.sim().world().clusters.is_empty());

    // The same event for our bucket is handled (the check is what stopped it).
    let event: SqsEvent = serde_json::from_str(&file.replace(sample_bucket, BUCKET)).expect("event file");
    let resp = handle_batch(&w.deps, event, deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    assert_eq!(status(&w, seq).await.state, SequenceState::Uploaded);
    assert_eq!(w.deps.repo.snapshot().ingest_errors.len(), 1);
}

// ------------------------------------------------------------------ worlds (issue 13)

/// An OAuth-issued token of the demo user (what the OAuth connection stores), valid for `days`.
async fn oauth_token(w: &World, lifetime_s: i64) -> String {
    let t = admin(
        &w.sim,
        "/tokens",
        json!({"user": DEMO_USER_ID, "oauth": true, "lifetime_seconds": lifetime_s}),
    )
    .await;
    t["access_token"].as_str().expect("token").to_string()
}

/// Requests the simulator logged for `path_prefix` (method, path, token kind, status, detail).
fn logged(w: &World, method: &str, path_prefix: &str) -> Vec<mapillary_sim::state::RequestLogEntry> {
    w.sim
        .sim()
        .world()
        .request_log
        .iter()
        .filter(|e| e.method == method && e.path.starts_with(path_prefix))
        .cloned()
        .collect()
}

#[tokio::test]
async fn in_seed_2022_an_oauth_token_uploads_a_strict_zip() {
    let w = world_in(SimWorld::Seed2022).await;
    let t = oauth_token(&w, 30 * 24 * 3600).await;
    w.deps.tokens.insert(USER, token(&t, None));
    let imgs = named(&specs(8, 5000));
    let etag = drop_sequence(&w.deps.store, "seed", &imgs, b"{}");
    let resp = handle_batch(&w.deps, event(&[s3_body(USER, "seed", &etag)]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    let st = status(&w, "seed").await;
    assert_eq!(st.state, SequenceState::Uploaded, "{st:?}");
    assert_eq!(st.uploads[0].state, UploadState::HandedOff, "{st:?}");
    assert_eq!(check_zip(&stored_zip(&w, &st.uploads[0].upload_id).await), 8);
    // Every upload call went with the OAuth token.
    for e in logged(&w, "POST", "/rupload/")
        .into_iter()
        .chain(logged(&w, "POST", "/graph/finish_upload"))
    {
        assert_eq!(e.status, Some(200), "{e:?}");
        assert_eq!(e.token_kind, "user_oauth", "{e:?}");
    }
}

#[tokio::test]
async fn in_oauth_upload_refused_the_sequence_waits_for_an_upload_token_then_resumes_with_it() {
    let w = world_in(SimWorld::OauthUploadRefused).await;
    let t = oauth_token(&w, 30 * 24 * 3600).await;
    w.deps.tokens.insert(USER, token(&t, None));
    let imgs = named(&specs(6, 5100));
    let etag = drop_sequence(&w.deps.store, "refused", &imgs, b"{}");
    let body = s3_body(USER, "refused", &etag);
    let resp = handle_batch(&w.deps, event(std::slice::from_ref(&body)), deadline()).await;
    assert!(
        resp.batch_item_failures.is_empty(),
        "acknowledged: it waits, not retried"
    );

    // The sequence waits, visibly, with what to do; its upload is neither failed nor final.
    let st = status(&w, "refused").await;
    assert_eq!(st.state, SequenceState::AwaitingUploadToken, "{st:?}");
    let reason = st.reason.clone().unwrap_or_default();
    assert!(reason.contains("PUT /v1/mapillary/connection"), "{reason}");
    assert!(
        reason.contains("not authorized to upload"),
        "Mapillary's message: {reason}"
    );
    assert!(!st.uploads[0].state.is_final(), "{st:?}");
    // The connection is marked, per user.
    let rec = w.deps.tokens.record(USER).expect("record");
    assert!(rec.upload_token_required(), "{:?}", rec.upload_refused);
    assert!(w.sim.sim().world().clusters.is_empty());
    // One refresh was tried (an expired token looks the same), then /me told a valid token apart.
    assert_eq!(logged(&w, "POST", "/graph/token").len(), 1);
    assert!(!logged(&w, "GET", "/graph/me").is_empty());

    // A second drop while marked: no upload request at all, it waits at once.
    let before = logged(&w, "GET", "/rupload/").len() + logged(&w, "POST", "/rupload/").len();
    let etag2 = drop_sequence(&w.deps.store, "refused2", &imgs[..3], b"{}");
    handle_batch(&w.deps, event(&[s3_body(USER, "refused2", &etag2)]), deadline()).await;
    assert_eq!(
        status(&w, "refused2").await.state,
        SequenceState::AwaitingUploadToken
    );
    let after = logged(&w, "GET", "/rupload/").len() + logged(&w, "POST", "/rupload/").len();
    assert_eq!(before, after, "no request Mapillary is known to refuse");

    // The user hands over an upload token (status-api's PUT stores this record); the manifest is
    // delivered again: the recorded upload resumes with the upload token.
    let mut up = TokenRecord::new(token(DEMO_USER_TOKEN, None), TokenKind::UploadToken);
    up.token.expires_at = None;
    w.deps.tokens.put_record(USER, &up).await.expect("put");
    let resp = handle_batch(&w.deps, event(&[body]), deadline()).await;
    assert!(resp.batch_item_failures.is_empty());
    let st = status(&w, "refused").await;
    assert_eq!(st.state, SequenceState::Uploaded, "{st:?}");
    assert_eq!(st.reason, None);
    assert_eq!(st.uploads[0].state, UploadState::HandedOff, "{st:?}");
    assert_eq!(check_zip(&stored_zip(&w, &st.uploads[0].upload_id).await), 6);
    let ok: Vec<_> = logged(&w, "POST", "/rupload/")
        .into_iter()
        .chain(logged(&w, "POST", "/graph/finish_upload"))
        .filter(|e| e.status == Some(200))
        .collect();
    assert!(!ok.is_empty());
    assert!(
        ok.iter().all(|e| e.token_kind == "user"),
        "only the upload token uploaded: {ok:?}"
    );
    assert_eq!(w.sim.sim().world().clusters.len(), 1);
}

#[tokio::test]
async fn in_partial_bytes_dropped_three_invocations_of_bounded_posts_resend_nothing() {
    let imgs = named(&specs(24, 5200));
    let clean = clean_zip("three", &imgs).await;
    let total = clean.len() as u64;

    let mut w = world_in(SimWorld::PartialBytesDropped).await;
    // Three POSTs make the zip; each takes 1 s (latency), and an invocation starts no POST after
    // its first 0.5 s: one POST per invocation, each a complete request.
    w.deps.tunables.max_post_bytes = total.div_ceil(3);
    w.deps.tunables.deadline_margin = Duration::from_millis(2500);
    // finish_upload (and saving its cluster_id) must fit in what the last invocation has left.
    w.deps.tunables.finish_timeout = Duration::from_millis(300);
    w.deps.tunables.cluster_save_budget = Duration::from_millis(200);
    admin(
        &w.sim,
        "/faults",
        json!({"method": "POST", "path": "/rupload/*", "times": 10,
        "action": {"kind": "latency", "ms": 1000}}),
    )
    .await;
    let etag = drop_sequence(&w.deps.store, "three", &imgs, b"{}");
    let body = s3_body(USER, "three", &etag);
    let mut invocations = 0;
    loop {
        invocations += 1;
        assert!(invocations <= 5, "too many invocations");
        let resp = handle_batch(
            &w.deps,
            event(std::slice::from_ref(&body)),
            Instant::now() + Duration::from_millis(3000),
        )
        .await;
        assert!(resp.batch_item_failures.is_empty());
        if w.deps.requeue.take_requeued().is_empty() {
            break;
        }
    }
    assert_eq!(invocations, 3, "one bounded POST per invocation");
    let st = status(&w, "three").await;
    assert_eq!(st.uploads[0].state, UploadState::HandedOff, "{st:?}");

    // Server side: every POST completed and started where the previous one ended.
    let posts = logged(&w, "POST", "/rupload/");
    let mut stored = 0u64;
    for p in &posts {
        let d = p.detail.clone().expect("POST detail");
        assert_eq!(d["complete"], true, "{p:?}");
        assert_eq!(
            d["start"], stored,
            "0 bytes re-sent below the server's offset: {posts:?}"
        );
        stored += d["bytes_received"].as_u64().expect("bytes");
    }
    assert_eq!(posts.len(), 3, "{posts:?}");
    assert_eq!(stored, total);
    assert_eq!(stored_zip(&w, &st.uploads[0].upload_id).await, clean);
    assert_eq!(w.deps.mapillary.paused_reports().len(), 2);
}

#[tokio::test]
async fn in_refresh_revokes_two_invocations_refreshing_at_once_make_one_refresh_and_both_upload() {
    let w = world_in(SimWorld::RefreshRevokes).await;
    // Expires within the refresh margin: both invocations refresh before uploading.
    let t = oauth_token(&w, 30 * 24 * 3600).await;
    w.deps.tokens.insert(
        USER,
        token(&t, Some(OffsetDateTime::now_utc() + time::Duration::minutes(5))),
    );
    let (a, b) = (named(&specs(4, 5300)), named(&specs(4, 5400)));
    let ea = drop_sequence(&w.deps.store, "ra", &a, b"{}");
    let eb = drop_sequence(&w.deps.store, "rb", &b, b"{}");
    let (ra, rb) = tokio::join!(
        handle_batch(&w.deps, event(&[s3_body(USER, "ra", &ea)]), deadline()),
        handle_batch(&w.deps, event(&[s3_body(USER, "rb", &eb)]), deadline()),
    );
    assert!(ra.batch_item_failures.is_empty() && rb.batch_item_failures.is_empty());
    assert_eq!(
        logged(&w, "POST", "/graph/token").len(),
        1,
        "one refresh reached Mapillary (a second would revoke the first one's token)"
    );
    for seq in ["ra", "rb"] {
        let st = status(&w, seq).await;
        assert_eq!(st.uploads[0].state, UploadState::HandedOff, "{seq}: {st:?}");
    }
    // Nobody kept using the revoked token.
    let refused: Vec<_> = w
        .sim
        .sim()
        .world()
        .request_log
        .iter()
        .filter(|e| e.status == Some(401))
        .cloned()
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
    let stored = w.deps.tokens.get(USER).expect("token");
    use secrecy::ExposeSecret;
    assert_ne!(stored.access_token.expose_secret(), t);
}

#[test]
fn sqs_event_files_deserialize() {
    for f in [
        include_str!("../../../events/sqs/s3-manifest-created.json"),
        include_str!("../../../events/sqs/s3-test-event.json"),
    ] {
        let e: SqsEvent = serde_json::from_str(f).expect("event file");
        assert!(!e.records.is_empty());
    }
}
