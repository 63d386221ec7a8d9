//! Fidelity of the Mapillary simulator, proven with the real client (issue 2 §3): `mapillary_tools` 0.14.7
//! from `.venv/mapillary-tools` uploads generated, geotagged JPEGs into an in-process simulator
//!
//! - (a) per image with a bundle manifest,
//! - (b) as zips made by `mapillary_tools zip`,
//! - (c) as a zip whose first POST loses its connection mid-body, so the client must resume,
//!
//! and the tests assert on the simulator's state (stored bytes, the MAP* JSON it read, clusters, the request log)
//! and on what the service will poll: the GraphQL activity feed and the graph entities.
//!
//! Each scenario runs in three simulator worlds (issue 13): `lenient`, `seed-2022` (every strictness rule on:
//! only `Authorization: OAuth` on rupload, `Offset` and `X-Entity-Name` required, JSON-only `finish_upload`,
//! mapillary_tools-shaped zips, MAP* descriptions required, the feed only with the web-app token) and
//! `oauth-upload-refused` (rupload and `finish_upload` refuse OAuth tokens; mapillary_tools gets its user upload
//! token the way a user does, with `mapillary_tools authenticate` and an e-mail and password). In every world the
//! simulator must refuse none of mapillary_tools' requests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use integration_tests::mapillary_tools::{
    write_empty_descriptions, Account, Description, Endpoints, HistoryRecord, MapillaryTools,
};
use mapillary_sim::config::DEFAULT_STAGE_SECONDS;
use mapillary_sim::{defaults, SimConfig, SimHandle, Simulator, World as SimWorld};
use md5::{Digest as _, Md5};
use relay_fixtures::{track, write_jpegs, TrackSpec};
use serde_json::{json, Value};
use sha2::Sha256;
use tempfile::TempDir;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

/// `getLatestActivity` exactly as in the protocol document §6.1 (TV-2023a, whitespace condensed).
const FEED_DOC: &str = "query getLatestActivity($id: ID!, $first: Int, $after: ID, $hide_after: Int) { \
fetch__User(id: $id) { id feed(first: $first, after: $after, hide_failed_sequences_after_days: $hide_after) { \
page_info { start_cursor end_cursor has_next_page has_previous_page } nodes { cluster_id type created_at_seconds \
captured_at_seconds thumb_url item_count image_id status initial_processing_status anonymization_status \
tiler_status error_code timezone __typename } __typename } __typename } __typename }";

const STAGES: [&str; 4] = [
    "status",
    "initial_processing_status",
    "anonymization_status",
    "tiler_status",
];

/// One test's world: its own simulator (frozen clock, in a named simulator world), scratch directory and
/// configured mapillary_tools.
struct World {
    sim: SimHandle,
    world: SimWorld,
    tools: Arc<MapillaryTools>,
    dir: TempDir,
    http: reqwest::Client,
}

/// Runs blocking work (mapillary_tools, file I/O) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

impl World {
    async fn start(world: SimWorld) -> World {
        let venvs = blocking(|| integration_tests::venv::ensure(&integration_tests::repo_root()))
            .await
            .unwrap_or_else(|e| {
                panic!("the mapillary_tools venv is not available ({e:#}): run `cargo xtask setup`")
            });
        let sim = Simulator::start(SimConfig::world(world), "127.0.0.1:0")
            .await
            .expect("simulator starts");
        assert_eq!(sim.sim().world().settings.world(), Some(world));
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoints = Endpoints {
            graph: sim.graph_url(),
            upload: sim.upload_url(),
        };
        let program = venvs.mapillary_tools();
        let scratch = dir.path().join("mapillary-tools");
        let tools = if world == SimWorld::OauthUploadRefused {
            // Only a user upload token uploads here: let mapillary_tools obtain one as a user would.
            let tools =
                MapillaryTools::without_profile(program, &scratch, &endpoints, defaults::CLIENT_TOKEN)
                    .unwrap_or_else(|e| panic!("{e}"));
            blocking(move || {
                tools
                    .authenticate_with_password(defaults::DEMO_EMAIL, defaults::DEMO_PASSWORD)
                    .unwrap_or_else(|e| panic!("{e}"));
                tools
            })
            .await
        } else {
            let account = Account {
                client_token: defaults::CLIENT_TOKEN.to_string(),
                user_token: defaults::DEMO_USER_TOKEN.to_string(),
                username: defaults::DEMO_USERNAME.to_string(),
                user_id: defaults::DEMO_USER_ID.to_string(),
            };
            MapillaryTools::new(program, &scratch, &endpoints, &account).unwrap_or_else(|e| panic!("{e}"))
        };
        World {
            sim,
            world,
            tools: Arc::new(tools),
            dir,
            http: reqwest::Client::new(),
        }
    }

    /// The token the activity feed takes in this world: in `lenient` the user's own (any token works), in the
    /// strict worlds only the web-app client token (the seed letter).
    fn feed_token(&self) -> &'static str {
        if self.world.is_strict() {
            defaults::WEB_APP_CLIENT_TOKEN
        } else {
            defaults::DEMO_USER_TOKEN
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn admin(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.sim.admin_url());
        let r = self.http.get(&url).send().await.expect("admin GET");
        assert!(r.status().is_success(), "GET {url}: {}", r.status());
        r.json().await.expect("admin JSON")
    }

    async fn admin_post(&self, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.sim.admin_url());
        let r = self.http.post(&url).json(&body).send().await.expect("admin POST");
        assert!(r.status().is_success(), "POST {url}: {}", r.status());
        r.json().await.expect("admin JSON")
    }

    /// A graph API GET with the user token, as the service will make it.
    async fn graph(&self, path_and_query: &str) -> Value {
        let url = format!("{}/{path_and_query}", self.sim.graph_url());
        let r = self
            .http
            .get(&url)
            .header("Authorization", format!("OAuth {}", defaults::DEMO_USER_TOKEN))
            .send()
            .await
            .expect("graph GET");
        let status = r.status();
        let text = r.text().await.expect("graph body");
        assert!(status.is_success(), "GET {url}: {status}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {url}: non-JSON ({e}): {text}"))
    }

    /// The activity feed nodes (first page of 200), checking the §6.1 envelope.
    async fn feed(&self) -> Vec<Value> {
        let variables =
            json!({"id": defaults::DEMO_USER_ID, "first": 200, "after": null, "hide_after": 14}).to_string();
        let url = format!("{}/graphql", self.sim.graph_url());
        let r = self
            .http
            .get(&url)
            .query(&[("doc", FEED_DOC), ("variables", variables.as_str())])
            .header("Authorization", format!("OAuth {}", self.feed_token()))
            .send()
            .await
            .expect("graphql GET");
        assert_eq!(r.status(), 200, "getLatestActivity status");
        let v: Value = r.json().await.expect("graphql JSON");
        assert_eq!(v["extensions"]["is_final"], true, "{v}");
        assert_eq!(v["data"]["__typename"], "Query", "{v}");
        let user = &v["data"]["fetch__User"];
        assert_eq!(user["id"], defaults::DEMO_USER_ID, "{v}");
        assert_eq!(user["__typename"], "User", "{v}");
        assert_eq!(user["feed"]["__typename"], "UserFeedConnection", "{v}");
        assert_eq!(user["feed"]["page_info"]["has_next_page"], false, "{v}");
        user["feed"]["nodes"].as_array().cloned().unwrap_or_default()
    }

    async fn clusters(&self) -> Vec<Value> {
        self.admin("/clusters")
            .await
            .as_array()
            .cloned()
            .expect("cluster list")
    }

    async fn sessions(&self) -> Vec<Value> {
        self.admin("/sessions")
            .await
            .as_array()
            .cloned()
            .expect("session list")
    }

    async fn session_bytes(&self, key: &str) -> Vec<u8> {
        let url = format!("{}/sessions/{key}/bytes", self.sim.admin_url());
        let r = self.http.get(&url).send().await.expect("bytes GET");
        assert!(r.status().is_success(), "GET {url}: {}", r.status());
        r.bytes().await.expect("bytes").to_vec()
    }

    async fn requests(&self) -> Vec<Value> {
        self.admin("/requests")
            .await
            .as_array()
            .cloned()
            .expect("request log")
    }
}

/// Two tracks in one folder: `first` images from 08:00:00 UTC, `second` images from 08:05:00 (a 4-minute gap,
/// beyond mapillary_tools' 60 s cutoff), 1 s and 5 m apart. Returns the written paths.
fn two_tracks(dir: &Path, first: usize, second: usize, seed: u64) -> Vec<PathBuf> {
    // 2024-05-01T08:00:00Z, two hours before the simulator's frozen "now".
    let start = OffsetDateTime::from_unix_timestamp(1_714_550_400).expect("valid instant");
    let mut a = TrackSpec::new(50.8966, -0.5591, start);
    a.seed_base = seed;
    let mut b = TrackSpec::new(50.9012, -0.5502, start + time::Duration::minutes(5));
    b.seed_base = seed + 1000;
    b.bearing_deg = 120.0;
    let mut specs = track(first, &a);
    specs.extend(track(second, &b));
    write_jpegs(dir, &specs).expect("write JPEGs")
}

/// `YYYY_MM_DD_HH_MM_SS_mmm` (UTC) → Unix ms.
fn capture_ms(s: &str) -> i64 {
    let p: Vec<i64> = s
        .split('_')
        .map(|x| x.parse().unwrap_or_else(|_| panic!("bad MAPCaptureTime {s}")))
        .collect();
    assert_eq!(p.len(), 7, "MAPCaptureTime {s}");
    let n = |i: usize| u8::try_from(p[i]).expect("field fits");
    let month = Month::try_from(n(1)).expect("month");
    let date = Date::from_calendar_date(i32::try_from(p[0]).expect("year"), month, n(2)).expect("date");
    let time = Time::from_hms(n(3), n(4), n(5)).expect("time");
    PrimitiveDateTime::new(date, time).assume_utc().unix_timestamp() * 1000 + p[6]
}

/// The images of one client-side sequence, in mapillary_tools' sequence order (capture time, then name).
#[derive(Debug)]
struct ExpectedSequence {
    uuid: String,
    images: Vec<Description>,
}

/// Groups the description file by `MAPSequenceUUID` and keys each group by its `sequence_md5sum` (§4.3),
/// computed here from the original files' bytes.
fn expected_sequences(descs: &[Description], import_dir: &Path) -> BTreeMap<String, ExpectedSequence> {
    let mut groups: BTreeMap<String, Vec<Description>> = BTreeMap::new();
    for d in descs {
        assert!(d.error().is_none(), "process rejected an image: {:?}", d.raw);
        let uuid = d.sequence_uuid().expect("MAPSequenceUUID").to_string();
        groups.entry(uuid).or_default().push(d.clone());
    }
    groups
        .into_iter()
        .map(|(uuid, mut images)| {
            images.sort_by_key(|d| (d.capture_time().map(str::to_string), d.file_name()));
            let mut seq_md5 = Md5::new();
            for d in &images {
                let name = d.file_name().expect("filename");
                let bytes = std::fs::read(import_dir.join(&name)).expect("read original image");
                seq_md5.update(hex::encode(Md5::digest(&bytes)).as_bytes());
            }
            (hex::encode(seq_md5.finalize()), ExpectedSequence { uuid, images })
        })
        .collect()
}

/// History records ↔ expected sequences ↔ simulator clusters: one cluster per sequence, and the cluster id the
/// client recorded is the one the simulator issued. Returns cluster id → its expected sequence.
async fn clusters_match_history<'a>(
    w: &World,
    history: &[HistoryRecord],
    expected: &'a BTreeMap<String, ExpectedSequence>,
    file_type: &str,
) -> BTreeMap<String, &'a ExpectedSequence> {
    let clusters = w.clusters().await;
    assert_eq!(
        clusters.len(),
        expected.len(),
        "one cluster per sequence: {clusters:#?}"
    );
    for c in &clusters {
        assert_eq!(c["file_type"], file_type, "{c}");
        assert_eq!(c["owner_id"], defaults::DEMO_USER_ID, "{c}");
        assert_eq!(c["content_error"], Value::Null, "{c}");
        assert_eq!(c["rejected"], json!([]), "{c}");
    }
    let sim_ids: BTreeSet<String> = clusters
        .iter()
        .map(|c| c["id"].as_str().expect("cluster id").to_string())
        .collect();
    assert_eq!(
        history.len(),
        expected.len(),
        "one history record per sequence: {history:#?}"
    );
    let mut by_cluster = BTreeMap::new();
    for h in history {
        let md5 = h.sequence_md5sum.as_deref().expect("history sequence_md5sum");
        let seq = expected
            .get(md5)
            .unwrap_or_else(|| panic!("history record {} names no processed sequence", h.path.display()));
        if let Some(uuid) = &h.sequence_uuid {
            assert_eq!(uuid, &seq.uuid, "history sequence_uuid");
        }
        let cluster = h.cluster_id.clone().expect("history cluster_id");
        assert!(
            by_cluster.insert(cluster, seq).is_none(),
            "cluster id recorded twice"
        );
    }
    let recorded: BTreeSet<String> = by_cluster.keys().cloned().collect();
    assert_eq!(recorded, sim_ids, "history cluster ids == simulator cluster ids");
    by_cluster
}

/// For each cluster, the MAP* JSON the simulator read from each stored JPEG's EXIF ImageDescription equals the
/// description-file entry minus the non-EXIF keys, and the cluster holds exactly its sequence's images.
async fn descriptions_match(w: &World, by_cluster: &BTreeMap<String, &ExpectedSequence>) {
    let mut seen = BTreeSet::new();
    for (cluster, seq) in by_cluster {
        let detail = w.admin(&format!("/clusters/{cluster}")).await;
        let images = detail["pending_images"].as_array().expect("pending_images");
        let want: BTreeMap<String, &Description> = seq
            .images
            .iter()
            .map(|d| (d.file_name().expect("filename"), d))
            .collect();
        assert_eq!(images.len(), want.len(), "images of cluster {cluster}");
        for img in images {
            let got = &img["meta"]["description"];
            assert_eq!(img["meta"]["source"], "description", "{img}");
            let name = got["MAPFilename"]
                .as_str()
                .expect("MAPFilename in the stored EXIF");
            let d = want
                .get(name)
                .unwrap_or_else(|| panic!("cluster {cluster} holds {name}, not part of its sequence"));
            assert_eq!(got, &d.exif_description(), "EXIF ImageDescription of {name}");
            assert!(seen.insert(name.to_string()), "{name} stored twice");
        }
    }
}

/// Before the clock moves every node is IN_PROGRESS; after all stage durations have passed, every cluster shows
/// four FINISHED stages and its `image_id` resolves to a sequence holding exactly its images in capture order.
async fn feed_finishes_and_resolves(w: &World, by_cluster: &BTreeMap<String, &ExpectedSequence>) {
    let nodes = w.feed().await;
    assert_eq!(nodes.len(), by_cluster.len(), "feed nodes: {nodes:#?}");
    for n in &nodes {
        assert_eq!(n["status"], "IN_PROGRESS", "{n}");
        assert_eq!(n["image_id"], Value::Null, "{n}");
    }

    let total: u64 = DEFAULT_STAGE_SECONDS.iter().sum();
    let clock = w
        .admin_post("/clock/advance", json!({"seconds": total + 1}))
        .await;
    assert!(clock["now_ms"].as_i64().is_some(), "{clock}");

    let nodes = w.feed().await;
    let mut sequences = BTreeSet::new();
    for (cluster, seq) in by_cluster {
        let node = nodes
            .iter()
            .find(|n| n["cluster_id"] == cluster.as_str())
            .unwrap_or_else(|| panic!("cluster {cluster} missing from the feed: {nodes:#?}"));
        for stage in STAGES {
            assert_eq!(node[stage], "FINISHED", "{stage} of {node}");
        }
        assert_eq!(node["error_code"], "UNSET", "{node}");
        assert_eq!(node["type"], "UPLOAD", "{node}");
        assert_eq!(node["__typename"], "ClusterLatestActivityItem", "{node}");
        assert_eq!(node["item_count"], seq.images.len(), "{node}");
        let first_ms = capture_ms(seq.images[0].capture_time().expect("capture time"));
        assert_eq!(node["captured_at_seconds"], first_ms.div_euclid(1000), "{node}");

        let image_id = node["image_id"].as_str().expect("image_id once finished");
        let sequence = w.graph(&format!("{image_id}?fields=sequence")).await["sequence"]
            .as_str()
            .expect("sequence of the representative image")
            .to_string();
        assert!(
            sequences.insert(sequence.clone()),
            "two clusters share sequence {sequence}"
        );
        let ids: Vec<String> = w.graph(&format!("image_ids?sequence_id={sequence}")).await["data"]
            .as_array()
            .expect("image_ids data")
            .iter()
            .map(|x| x["id"].as_str().expect("image id").to_string())
            .collect();
        assert_eq!(ids.len(), seq.images.len(), "images of sequence {sequence}");
        assert!(
            ids.contains(&image_id.to_string()),
            "image_id belongs to its sequence"
        );
        for (id, d) in ids.iter().zip(&seq.images) {
            let img = w
                .graph(&format!("{id}?fields=sequence,captured_at,geometry"))
                .await;
            assert_eq!(img["sequence"], sequence.as_str(), "{img}");
            let want_ms = capture_ms(d.capture_time().expect("capture time"));
            assert_eq!(
                img["captured_at"],
                want_ms,
                "capture order of {:?}: {img}",
                d.file_name()
            );
            let coords = &img["geometry"]["coordinates"];
            let close = |v: &Value, key: &str| {
                let want = d.raw[key].as_f64().expect("coordinate");
                (v.as_f64().expect("number") - want).abs() < 1e-9
            };
            assert!(
                close(&coords[0], "MAPLongitude") && close(&coords[1], "MAPLatitude"),
                "geometry of {:?}: {img}",
                d.file_name()
            );
        }
    }
}

/// `/me` and `/logging` were exercised (auth verification and API logging stay on), and finish_upload was
/// called once per sequence.
async fn control_calls_seen(w: &World, sequences: usize) {
    let log = w.requests().await;
    let count = |method: &str, path: &str| {
        log.iter()
            .filter(|e| e["method"] == method && e["path"] == path && e["status"] == 200)
            .count()
    };
    assert!(count("GET", "/graph/me") >= 1, "GET /graph/me: {log:#?}");
    assert!(
        count("POST", "/graph/logging") >= 1,
        "POST /graph/logging: {log:#?}"
    );
    assert_eq!(
        count("POST", "/graph/finish_upload"),
        sequences,
        "finish_upload calls"
    );
    no_refusals(w, &log);
}

/// The simulator refused none of the run's requests (every logged reply is below 400; a dropped connection
/// has no status), and in `oauth-upload-refused` every upload call carried the user upload token that
/// `mapillary_tools authenticate` obtained from `POST /graph/login`.
fn no_refusals(w: &World, log: &[Value]) {
    let refused: Vec<&Value> = log
        .iter()
        .filter(|e| e["status"].as_u64().is_some_and(|s| s >= 400))
        .collect();
    assert!(refused.is_empty(), "refused in {}: {refused:#?}", w.world);
    if w.world == SimWorld::OauthUploadRefused {
        let logins: Vec<&Value> = log.iter().filter(|e| e["path"] == "/graph/login").collect();
        assert_eq!(logins.len(), 1, "one login: {logins:#?}");
        assert_eq!(logins[0]["token_kind"], "client", "{:?}", logins[0]);
        assert_eq!(logins[0]["status"], 200);
        let profile = w.tools.profile().expect("profile");
        let token = profile
            .iter()
            .find(|(k, _)| k == "user_upload_token")
            .map(|(_, v)| v.as_str())
            .expect("authenticate stored user_upload_token");
        assert_ne!(
            token,
            defaults::DEMO_USER_TOKEN,
            "a freshly issued token, not the seeded one"
        );
        assert!(
            profile.contains(&(
                "MAPSettingsUserKey".to_string(),
                defaults::DEMO_USER_ID.to_string()
            )),
            "MAPSettingsUserKey from the login reply"
        );
        let uploads: Vec<&Value> = log
            .iter()
            .filter(|e| {
                e["path"].as_str().is_some_and(|p| p.starts_with("/rupload/"))
                    || e["path"] == "/graph/finish_upload"
            })
            .collect();
        assert!(!uploads.is_empty());
        for e in uploads {
            assert_eq!(e["token_kind"], "user", "a user upload token, not OAuth: {e}");
            assert_eq!(e["user_id"], defaults::DEMO_USER_ID, "{e}");
        }
    }
}

/// Processes `import` and returns the descriptions with the expected sequences.
async fn process(w: &World, import: &Path) -> (Vec<Description>, BTreeMap<String, ExpectedSequence>) {
    let tools = w.tools.clone();
    let dir = import.to_path_buf();
    let descs = blocking(move || {
        tools.process(&dir, &[]).unwrap_or_else(|e| panic!("{e}"));
        tools.descriptions(&dir).unwrap_or_else(|e| panic!("{e}"))
    })
    .await;
    let expected = expected_sequences(&descs, import);
    (descs, expected)
}

/// `mapillary_tools zip`; returns the zip files (path, bytes) sorted by name.
async fn zip(w: &World, import: &Path, zip_dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let tools = w.tools.clone();
    let (import, zip_dir) = (import.to_path_buf(), zip_dir.to_path_buf());
    blocking(move || {
        tools.zip(&import, &zip_dir).unwrap_or_else(|e| panic!("{e}"));
        let mut zips: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&zip_dir)
            .expect("zip dir")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "zip"))
            .map(|p| {
                let bytes = std::fs::read(&p).expect("read zip");
                (p, bytes)
            })
            .collect();
        zips.sort();
        zips
    })
    .await
}

fn file_name(p: &Path) -> String {
    p.file_name().expect("file name").to_string_lossy().into_owned()
}

/// The zip's name is its upload key `mly_tools_<md5 of its bytes>.zip`, and the simulator stored exactly its
/// bytes under that key.
async fn zip_stored_exactly(w: &World, path: &Path, bytes: &[u8]) -> Value {
    let key = file_name(path);
    assert_eq!(
        key,
        format!("mly_tools_{}.zip", hex::encode(Md5::digest(bytes))),
        "upload key"
    );
    let s = w.admin(&format!("/sessions/{key}")).await;
    assert_eq!(
        s["sha256"],
        hex::encode(Sha256::digest(bytes)),
        "stored bytes of {key}: {s}"
    );
    assert_eq!(s["bytes_stored"], bytes.len(), "{s}");
    assert_eq!(s["completed"], true, "{s}");
    assert_eq!(s["entity_name"], key.as_str(), "X-Entity-Name: {s}");
    s
}

async fn per_image_upload_with_bundle_manifest(world: SimWorld) {
    let w = World::start(world).await;
    let import = w.path("images");
    let files = two_tracks(&import, 12, 10, 1);
    assert!(files.len() >= 20);

    let (descs, expected) = process(&w, &import).await;
    assert_eq!(descs.len(), files.len(), "one description per image");
    assert_eq!(
        expected.len(),
        2,
        "the 5-minute gap splits two sequences: {expected:#?}"
    );

    let tools = w.tools.clone();
    let dir = import.clone();
    blocking(move || {
        tools
            .upload(&dir, None, false, &[])
            .unwrap_or_else(|e| panic!("{e}"))
    })
    .await;

    // One stored JPEG per input, each under mly_tools_<md5 of the stored bytes>.jpg, plus one manifest per
    // sequence.
    let sessions = w.sessions().await;
    let jpgs: Vec<&Value> = sessions
        .iter()
        .filter(|s| s["key"].as_str().is_some_and(|k| k.ends_with(".jpg")))
        .collect();
    assert_eq!(jpgs.len(), files.len(), "{sessions:#?}");
    for s in &jpgs {
        let key = s["key"].as_str().expect("key");
        assert_eq!(s["completed"], true, "{s}");
        let bytes = w.session_bytes(key).await;
        assert_eq!(key, format!("mly_tools_{}.jpg", hex::encode(Md5::digest(&bytes))));
    }
    let manifests = sessions
        .iter()
        .filter(|s| {
            s["key"]
                .as_str()
                .is_some_and(|k| k.starts_with("uuid_") && k.ends_with(".json"))
        })
        .count();
    assert_eq!(manifests, expected.len(), "{sessions:#?}");

    let history = w.tools.history().expect("history");
    let by_cluster = clusters_match_history(&w, &history, &expected, "mly_bundle_manifest").await;
    descriptions_match(&w, &by_cluster).await;
    control_calls_seen(&w, expected.len()).await;
    feed_finishes_and_resolves(&w, &by_cluster).await;
}

async fn zip_upload_stores_the_exact_zip_bytes(world: SimWorld) {
    let w = World::start(world).await;
    let import = w.path("images");
    let files = two_tracks(&import, 11, 10, 100);
    let (_, expected) = process(&w, &import).await;
    assert_eq!(expected.len(), 2, "{expected:#?}");
    let zip_dir = w.path("zips");
    let zips = zip(&w, &import, &zip_dir).await;
    assert_eq!(zips.len(), expected.len(), "one zip per sequence");

    let desc = w.path("empty-descriptions.json");
    write_empty_descriptions(&desc).expect("write []");
    let tools = w.tools.clone();
    let (dir, d) = (zip_dir.clone(), desc.clone());
    blocking(move || {
        tools
            .upload(&dir, Some(&d), false, &[])
            .unwrap_or_else(|e| panic!("{e}"))
    })
    .await;

    for (path, bytes) in &zips {
        zip_stored_exactly(&w, path, bytes).await;
    }
    let history = w.tools.history().expect("history");
    let by_cluster = clusters_match_history(&w, &history, &expected, "zip").await;
    let clusters = w.clusters().await;
    let keys: BTreeSet<String> = clusters
        .iter()
        .map(|c| c["upload_key"].as_str().expect("upload_key").to_string())
        .collect();
    let zip_names: BTreeSet<String> = zips.iter().map(|(p, _)| file_name(p)).collect();
    assert_eq!(keys, zip_names, "each cluster was made from one of the zips");
    let images: usize = clusters
        .iter()
        .map(|c| c["accepted_images"].as_u64().unwrap_or(0) as usize)
        .sum();
    assert_eq!(images, files.len(), "every image in the zips was accepted");
    descriptions_match(&w, &by_cluster).await;
    control_calls_seen(&w, expected.len()).await;
    feed_finishes_and_resolves(&w, &by_cluster).await;
}

/// From mapillary_tools' `--verbose` log: for each request to `url`, the method, the `Offset` header (POST) and
/// the `offset` in the reply (GET; `None` when no reply line followed, e.g. a dropped connection).
fn rupload_calls(stderr: &str, url: &str) -> Vec<(String, Option<u64>)> {
    let number_after = |line: &str, marker: &str| -> Option<u64> {
        let rest = &line[line.find(marker)? + marker.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let lines: Vec<&str> = stderr.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.contains(&format!("HTTP GET {url} ")) || line.ends_with(&format!("HTTP GET {url}")) {
            // The reply line (`HTTP 200 OK (n ms): {"offset": N}`) follows before the next request.
            let reply = lines[i + 1..]
                .iter()
                .take_while(|l| !l.contains("HTTP GET ") && !l.contains("HTTP POST "))
                .find(|l| l.contains("HTTP 200 "));
            let offset =
                reply.and_then(|l| number_after(l, "\"offset\": ").or_else(|| number_after(l, "'offset': ")));
            out.push(("GET".to_string(), offset));
        } else if line.contains(&format!("HTTP POST {url} ")) {
            // Request headers are logged as a Python dict: `HEADERS={'Offset': 'N', ...}`.
            let offset = number_after(line, "'Offset': '").or_else(|| number_after(line, "\"Offset\": \""));
            out.push(("POST".to_string(), offset));
        }
    }
    out
}

async fn zip_upload_resumes_after_a_connection_dropped_mid_body(world: SimWorld) {
    let w = World::start(world).await;
    let import = w.path("images");
    // One sequence: 20 images 1 s apart.
    let files = two_tracks(&import, 20, 0, 500);
    let (_, expected) = process(&w, &import).await;
    assert_eq!(expected.len(), 1, "{expected:#?}");
    let zip_dir = w.path("zips");
    let zips = zip(&w, &import, &zip_dir).await;
    assert_eq!(zips.len(), 1);
    let (zip_path, zip_bytes) = zips[0].clone();
    let key = file_name(&zip_path);
    let cut = (zip_bytes.len() / 2) as u64;
    assert!(
        cut > 1000 && cut + 1000 < zip_bytes.len() as u64,
        "cut well inside the zip"
    );

    let rule = w
        .admin_post(
            "/faults",
            json!({"method": "POST", "path": format!("/rupload/{key}"), "times": 1,
                   "action": {"kind": "drop_after_bytes", "bytes": cut}}),
        )
        .await;
    let rule_id = rule["id"].as_u64().expect("fault rule id");

    let desc = w.path("empty-descriptions.json");
    write_empty_descriptions(&desc).expect("write []");
    let tools = w.tools.clone();
    let (dir, d) = (zip_dir.clone(), desc.clone());
    let run = blocking(move || {
        tools
            .upload(&dir, Some(&d), true, &[])
            .unwrap_or_else(|e| panic!("{e}"))
    })
    .await;
    assert!(run.success());

    // The fault fired exactly once.
    let faults = w.admin("/faults").await;
    let fault = faults
        .as_array()
        .and_then(|f| f.iter().find(|r| r["id"] == rule_id))
        .expect("fault rule listed");
    assert_eq!(fault["hits"], 1, "{fault}");

    // Simulator side: GET, POST dropped without a reply, GET, POST completed.
    let path = format!("/rupload/{key}");
    let calls: Vec<(String, Option<u64>, Option<u64>)> = w
        .requests()
        .await
        .iter()
        .filter(|e| e["path"] == path.as_str())
        .map(|e| {
            (
                e["method"].as_str().unwrap_or_default().to_string(),
                e["status"].as_u64(),
                e["fault_rule"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        calls,
        vec![
            ("GET".to_string(), Some(200), None),
            ("POST".to_string(), None, Some(rule_id)),
            ("GET".to_string(), Some(200), None),
            ("POST".to_string(), Some(200), None),
        ],
        "request log for {path}"
    );

    // Server side: the dropped POST delivered exactly `cut` bytes from 0, the next GET reported `cut`, and the
    // resumed POST started at `cut` and carried only the rest (0 bytes re-sent below the server's offset).
    let details: Vec<(Option<String>, Value)> = w
        .requests()
        .await
        .iter()
        .filter(|e| e["path"] == path.as_str())
        .map(|e| {
            (
                e["offset_header"].as_str().map(str::to_string),
                e["detail"].clone(),
            )
        })
        .collect();
    let total = zip_bytes.len() as u64;
    assert_eq!(details[0].1["offset"], 0, "{details:?}");
    assert_eq!(details[1].0.as_deref(), Some("0"), "{details:?}");
    assert_eq!(details[1].1["bytes_received"], cut, "{details:?}");
    assert_eq!(details[2].1["offset"], cut, "{details:?}");
    assert_eq!(details[3].0, Some(cut.to_string()), "{details:?}");
    assert_eq!(details[3].1["start"], cut, "{details:?}");
    assert_eq!(details[3].1["bytes_received"], total - cut, "{details:?}");

    // Client side (mapillary_tools' own request log): the second GET returned the kept prefix and the second POST
    // started there.
    let url = format!("{}/{key}", w.sim.upload_url());
    let seen = rupload_calls(&run.stderr, &url);
    assert_eq!(
        seen,
        vec![
            ("GET".to_string(), Some(0)),
            ("POST".to_string(), Some(0)),
            ("GET".to_string(), Some(cut)),
            ("POST".to_string(), Some(cut)),
        ],
        "mapillary_tools --verbose log:\n{}",
        run.tail(60)
    );

    no_refusals(&w, &w.requests().await);
    let s = zip_stored_exactly(&w, &zip_path, &zip_bytes).await;
    assert_eq!(s["posts"], 2, "{s}");
    let history = w.tools.history().expect("history");
    let by_cluster = clusters_match_history(&w, &history, &expected, "zip").await;
    assert_eq!(
        by_cluster.values().map(|s| s.images.len()).sum::<usize>(),
        files.len()
    );
    descriptions_match(&w, &by_cluster).await;
    feed_finishes_and_resolves(&w, &by_cluster).await;
}

/// The three scenarios as tests, one set per simulator world.
macro_rules! in_world {
    ($module:ident, $world:expr) => {
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread")]
            async fn per_image_upload_with_bundle_manifest() {
                super::per_image_upload_with_bundle_manifest($world).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn zip_upload_stores_the_exact_zip_bytes() {
                super::zip_upload_stores_the_exact_zip_bytes($world).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn zip_upload_resumes_after_a_connection_dropped_mid_body() {
                super::zip_upload_resumes_after_a_connection_dropped_mid_body($world).await;
            }
        }
    };
}

in_world!(lenient, SimWorld::Lenient);
in_world!(seed_2022, SimWorld::Seed2022);
in_world!(oauth_upload_refused, SimWorld::OauthUploadRefused);

/// In `oauth-upload-refused`, mapillary_tools holding an OAuth-issued token is refused as unauthorised on its
/// first rupload call and exits with its "unauthorized" code 14 (§11); nothing is stored and no cluster made.
#[tokio::test(flavor = "multi_thread")]
async fn oauth_upload_refused_stops_mapillary_tools_with_an_oauth_token() {
    let w = World::start(SimWorld::OauthUploadRefused).await;
    let oauth = w
        .admin_post(
            "/tokens",
            json!({"user": defaults::DEMO_USER_ID, "oauth_app": defaults::APP_ID}),
        )
        .await["access_token"]
        .as_str()
        .expect("OAuth token")
        .to_string();
    let endpoints = Endpoints {
        graph: w.sim.graph_url(),
        upload: w.sim.upload_url(),
    };
    let account = Account {
        client_token: defaults::CLIENT_TOKEN.to_string(),
        user_token: oauth,
        username: defaults::DEMO_USERNAME.to_string(),
        user_id: defaults::DEMO_USER_ID.to_string(),
    };
    let venvs = blocking(|| integration_tests::venv::ensure(&integration_tests::repo_root()))
        .await
        .unwrap_or_else(|e| panic!("the mapillary_tools venv is not available ({e:#})"));
    let tools = Arc::new(
        MapillaryTools::new(
            venvs.mapillary_tools(),
            &w.path("oauth-tools"),
            &endpoints,
            &account,
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let import = w.path("images");
    two_tracks(&import, 5, 0, 900);
    let (t, dir) = (tools.clone(), import.clone());
    let run = blocking(move || {
        t.process(&dir, &[]).unwrap_or_else(|e| panic!("{e}"));
        let args = [
            std::ffi::OsString::from("upload"),
            dir.into_os_string(),
            "--user_name".into(),
            integration_tests::mapillary_tools::PROFILE.into(),
        ];
        t.run(args).unwrap_or_else(|e| panic!("{e}"))
    })
    .await;
    assert_eq!(
        run.code,
        Some(14),
        "exit code 14 (unauthorized):\n{}",
        run.tail(30)
    );
    let log = w.requests().await;
    let rupload: Vec<(u64, String)> = log
        .iter()
        .filter(|e| e["path"].as_str().is_some_and(|p| p.starts_with("/rupload/")))
        .map(|e| {
            (
                e["status"].as_u64().unwrap_or(0),
                e["token_kind"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(!rupload.is_empty(), "{log:#?}");
    assert!(
        rupload.iter().all(|(s, k)| *s == 401 && k == "user_oauth"),
        "{rupload:?}"
    );
    assert!(w.sessions().await.is_empty(), "nothing stored");
    assert!(w.clusters().await.is_empty(), "no cluster");
}
