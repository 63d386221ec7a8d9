//! Shared helpers for the simulator's integration tests.
#![allow(dead_code)]

use std::io::Write;

use mapillary_sim::defaults::{DEMO_USER_TOKEN, WEB_APP_CLIENT_TOKEN};
use mapillary_sim::{SimConfig, SimHandle, Simulator};
use relay_fixtures::{jpeg, track, TrackSpec};
use reqwest::{Client, Response};
use serde_json::{json, Value};

pub const TOKEN: &str = DEMO_USER_TOKEN;

/// The token the GraphQL documents accept in every world: the web app's client token (in `seed-2022` and
/// every strict world a user's token is refused there, as the seed letter says).
pub const FEED_TOKEN: &str = WEB_APP_CLIENT_TOKEN;

pub async fn start() -> SimHandle {
    start_with(SimConfig::frozen()).await
}

pub async fn start_with(cfg: SimConfig) -> SimHandle {
    Simulator::start(cfg, "127.0.0.1:0")
        .await
        .expect("simulator starts")
}

pub fn client() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

pub fn auth(token: &str) -> String {
    format!("OAuth {token}")
}

pub async fn body(r: Response) -> Value {
    let status = r.status();
    let text = r.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON reply ({status}): {e}: {text}"))
}

/// `n` geotagged JPEGs one second apart, starting 2024-05-01T09:00:00Z, each carrying the MAP* description
/// mapillary_tools would inject (accepted in every world; see [`raw_jpegs`] for images without it).
pub fn jpegs(n: usize, seed_base: u64) -> Vec<Vec<u8>> {
    described_jpegs(n, seed_base)
}

/// `n` geotagged JPEGs as [`jpegs`] but without a MAP* description (raw EXIF only): refused in every strict
/// world, read from their EXIF in `lenient`.
pub fn raw_jpegs(n: usize, seed_base: u64) -> Vec<Vec<u8>> {
    let mut t = TrackSpec::new(50.8966, -0.5591, time::macros::datetime!(2024-05-01 09:00:00 UTC));
    t.seed_base = seed_base;
    track(n, &t).iter().map(jpeg).collect()
}

/// A STORED zip of `files` in mapillary_tools' shape (entries `0.jpg`, `1.jpg`, … dated 1980-01-01 and the
/// `{"sequence_md5sum":…}` archive comment): accepted in every world if the images carry MAP* descriptions.
pub fn zip_of(files: &[Vec<u8>]) -> Vec<u8> {
    zip_shaped(files, &ZipShape::tools())
}

pub async fn get_offset(h: &SimHandle, key: &str) -> u64 {
    let r = client()
        .get(format!("{}/{key}", h.upload_url()))
        .header("Authorization", auth(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    body(r).await["offset"].as_u64().expect("offset")
}

pub async fn post_bytes(h: &SimHandle, key: &str, offset: u64, bytes: Vec<u8>) -> Response {
    client()
        .post(format!("{}/{key}", h.upload_url()))
        .header("Authorization", auth(TOKEN))
        .header("Offset", offset.to_string())
        .header("X-Entity-Name", key)
        .body(bytes)
        .send()
        .await
        .expect("POST")
}

/// Upload all of `bytes` under `key` and return the handle.
pub async fn upload(h: &SimHandle, key: &str, bytes: Vec<u8>) -> String {
    let r = post_bytes(h, key, 0, bytes).await;
    assert_eq!(r.status(), 200);
    body(r).await["h"].as_str().expect("handle").to_string()
}

pub async fn finish(h: &SimHandle, handle: &str, file_type: &str) -> Response {
    client()
        .post(format!("{}/finish_upload", h.graph_url()))
        .header("Authorization", auth(TOKEN))
        .json(&json!({"file_handle": handle, "file_type": file_type}))
        .send()
        .await
        .expect("finish")
}

/// Upload a zip and finish it; returns the cluster id.
pub async fn zip_cluster(h: &SimHandle, key: &str, files: &[Vec<u8>]) -> String {
    let handle = upload(h, key, zip_of(files)).await;
    let r = finish(h, &handle, "zip").await;
    assert_eq!(r.status(), 200);
    body(r).await["cluster_id"]
        .as_str()
        .expect("cluster_id")
        .to_string()
}

pub async fn admin(h: &SimHandle, path: &str, v: Value) -> Value {
    let r = client()
        .post(format!("{}{path}", h.admin_url()))
        .json(&v)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "admin {path}");
    body(r).await
}

pub async fn admin_get(h: &SimHandle, path: &str) -> Value {
    let r = client()
        .get(format!("{}{path}", h.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "admin {path}");
    body(r).await
}

pub async fn advance(h: &SimHandle, seconds: i64) {
    admin(h, "/clock/advance", json!({ "seconds": seconds })).await;
}

pub const FEED_DOC: &str = "query getLatestActivity($id: ID!, $first: Int, $after: ID, $hide_after: Int) { fetch__User(id: $id) { id feed(first: $first, after: $after, hide_failed_sequences_after_days: $hide_after) { page_info { start_cursor end_cursor has_next_page has_previous_page } nodes { cluster_id type created_at_seconds captured_at_seconds thumb_url item_count image_id status initial_processing_status anonymization_status tiler_status error_code timezone __typename } __typename } __typename } __typename }";

pub const NEW_SEQ_DOC: &str = "query getNewSequences($username: String!) { user_by_username(username: $username) { id new_sequences { sequence_keys geojson __typename } __typename } __typename }";

pub async fn graphql(h: &SimHandle, token: &str, doc: &str, vars: Value) -> Response {
    client()
        .get(format!("{}/graphql", h.graph_url()))
        .header("Authorization", auth(token))
        .query(&[("doc", doc), ("variables", &vars.to_string())])
        .send()
        .await
        .expect("graphql")
}

/// The feed page for the demo user.
pub async fn feed(h: &SimHandle, vars: Value) -> Value {
    let mut v = json!({"id": mapillary_sim::defaults::DEMO_USER_ID});
    if let (Some(a), Some(b)) = (v.as_object_mut(), vars.as_object()) {
        a.extend(b.clone());
    }
    let r = graphql(h, FEED_TOKEN, FEED_DOC, v).await;
    assert_eq!(r.status(), 200);
    body(r).await
}

pub fn nodes(feed: &Value) -> Vec<Value> {
    feed["data"]["fetch__User"]["feed"]["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

pub async fn node_of(h: &SimHandle, cluster: &str) -> Value {
    let f = feed(h, json!({"first": 200})).await;
    nodes(&f)
        .into_iter()
        .find(|n| n["cluster_id"] == cluster)
        .expect("cluster in feed")
}

pub async fn cluster_info(h: &SimHandle, id: &str) -> Value {
    admin_get(h, &format!("/clusters/{id}")).await
}

/// Stage durations used by most tests: 10 s each.
pub async fn short_stages(h: &SimHandle) {
    admin(h, "/plans/default", json!({"stage_seconds": [10, 10, 10, 10]})).await;
}

/// The simulator in a named world (frozen clock).
pub async fn start_world(world: mapillary_sim::World) -> SimHandle {
    start_with(SimConfig::world(world)).await
}

/// The MAP* description mapillary_tools would inject for `spec` (§4.4): 7-decimal position, UTC capture
/// time with truncated milliseconds, the compass heading when the image has one, compact JSON.
pub fn map_description(spec: &relay_fixtures::ImageSpec) -> String {
    let t = spec.captured_at.to_offset(time::UtcOffset::UTC);
    let capture = format!(
        "{:04}_{:02}_{:02}_{:02}_{:02}_{:02}_{:03}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    );
    let round7 = |x: f64| (x * 1e7).round() / 1e7;
    let mut d = json!({
        "MAPLatitude": round7(spec.lat),
        "MAPLongitude": round7(spec.lon),
        "MAPCaptureTime": capture,
        "MAPOrientation": 1,
    });
    if let (Some(h), Some(o)) = (spec.heading, d.as_object_mut()) {
        o.insert(
            "MAPCompassHeading".to_string(),
            json!({"TrueHeading": h, "MagneticHeading": h}),
        );
    }
    d.to_string()
}

/// `n` geotagged JPEGs one second apart (as [`jpegs`]), each carrying its MAP* description.
pub fn described_jpegs(n: usize, seed_base: u64) -> Vec<Vec<u8>> {
    let mut t = TrackSpec::new(50.8966, -0.5591, time::macros::datetime!(2024-05-01 09:00:00 UTC));
    t.seed_base = seed_base;
    track(n, &t)
        .into_iter()
        .map(|mut spec| {
            spec.image_description = Some(map_description(&spec));
            jpeg(&spec)
        })
        .collect()
}

/// How to build a zip for the strict-world tests.
#[derive(Debug, Clone)]
pub struct ZipShape {
    /// Archive comment (`None`: no comment).
    pub comment: Option<String>,
    /// Entry names (`None`: `0.jpg`, `1.jpg`, …).
    pub names: Option<Vec<String>>,
    /// Entry timestamp (`None`: 1980-01-01 00:00:00, the zip crate's default).
    pub modified: Option<zip::DateTime>,
}

impl ZipShape {
    /// Exactly what `mapillary_tools zip` writes (§4.1).
    pub fn tools() -> Self {
        Self {
            comment: Some(format!(
                "{{\"sequence_md5sum\":\"{}\"}}",
                "0123456789abcdef0123456789abcdef"
            )),
            names: None,
            modified: None,
        }
    }
}

/// A STORED zip of `files` in the given shape.
pub fn zip_shaped(files: &[Vec<u8>], shape: &ZipShape) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let mut opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    if let Some(m) = shape.modified {
        opts = opts.last_modified_time(m);
    }
    for (i, f) in files.iter().enumerate() {
        let name = shape
            .names
            .as_ref()
            .map_or_else(|| format!("{i}.jpg"), |n| n[i].clone());
        w.start_file(name, opts).expect("zip entry");
        w.write_all(f).expect("zip write");
    }
    if let Some(c) = &shape.comment {
        w.set_comment(c.clone()).expect("zip comment");
    }
    w.finish().expect("zip finish").into_inner()
}

/// A mapillary_tools-shaped zip of `n` described images: accepted in every world.
pub fn tools_zip(n: usize, seed_base: u64) -> Vec<u8> {
    zip_shaped(&described_jpegs(n, seed_base), &ZipShape::tools())
}

/// Upload all of `bytes` under `key` as the holder of `token` and return the handle.
pub async fn upload_as(h: &SimHandle, token: &str, key: &str, bytes: Vec<u8>) -> String {
    let r = client()
        .post(format!("{}/{key}", h.upload_url()))
        .header("Authorization", auth(token))
        .header("Offset", "0")
        .header("X-Entity-Name", key)
        .body(bytes)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 200, "upload {key}");
    body(r).await["h"].as_str().expect("handle").to_string()
}

/// `finish_upload` with a JSON body as the holder of `token`.
pub async fn finish_as(h: &SimHandle, token: &str, fields: Value) -> Response {
    client()
        .post(format!("{}/finish_upload", h.graph_url()))
        .header("Authorization", auth(token))
        .json(&fields)
        .send()
        .await
        .expect("finish")
}

/// A new user with a user upload token (admin-made, not OAuth): `(id, token)`.
pub async fn new_user(h: &SimHandle, username: &str) -> (String, String) {
    let v = admin(h, "/users", json!({ "username": username })).await;
    (
        v["id"].as_str().expect("id").to_string(),
        v["access_token"].as_str().expect("token").to_string(),
    )
}

/// An OAuth token of the relay's app for `user` (admin-made, as the OAuth flow would issue it).
pub async fn oauth_token(h: &SimHandle, user: &str) -> String {
    admin(h, "/tokens", json!({"user": user, "oauth": true})).await["access_token"]
        .as_str()
        .expect("token")
        .to_string()
}

/// The number of clusters the simulator holds.
pub async fn cluster_count(h: &SimHandle) -> usize {
    admin_get(h, "/clusters").await.as_array().map_or(0, Vec::len)
}
