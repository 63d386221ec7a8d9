//! `cargo xtask bench poller`: the issue's poller benchmark.
//!
//! **Scenario (a city).** 1,000 users × 10 uploads = 10,000 tracked uploads of 5 images each
//! (8 m and 2 s apart), placed on the street grid of a 4 km × 4 km city centre (streets every
//! 100 m, centre 48.2082 N 16.3738 E): each upload drives along a random street from a random point,
//! captured at a random time within the last 14 days. A z14 tile (≈ 1.6 km wide here) therefore
//! holds about a thousand sequences of many users, and a street segment is driven by several —
//! which is what makes finding an upload through coverage tiles (Plan A) expensive.
//!
//! **Seeding (fast, not 10,000 real uploads).** The simulator's users, tokens and clusters are
//! put straight into its world (the same records `finish_upload` creates; processing then runs on
//! its clock as usual); DynamoDB gets what zip-and-push and intake would have written: the token
//! items (KMS-encrypted, through the token store), the image entries and one tracking record per
//! upload. A private moto and an in-process simulator; every simulator request is delayed 20 ms.
//!
//! **Measured.** (i) a status run: every upload mid-processing (stage 1); (ii) the run after every
//! stage finished, which links everything (Plan B); (iii) Plan A for the same linking, run with the
//! poller's own `linking::by_tiles::find_upload` per upload (a tile cache per user, as in a run), its links checked
//! against Plan B's; (iv) the *documented* Plan A's request count, computed from the simulator's
//! world (every candidate sequence of the upload's z14 tiles → `image_ids` → entities, per upload).
//! Request counts come from the simulator's request log. The poller runs with its defaults.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use integration_tests::moto::MotoServer;
use integration_tests::stack::{self, LocalStack, SimEndpoints};
use mapillary_sim::content::{ImageMeta, MetaSource};
use mapillary_sim::state::{Cluster, ClusterContent, ImageSource, PendingImage, User};
use mapillary_sim::{defaults, ProcessingPlan, SimConfig, SimHandle, Simulator};
use poller::clock::Clock;
use poller::linking::by_tiles::{find_upload, TileCache};
use poller::linking::common::Linked;
use poller::{run_once, Deps};
use secrecy::SecretString;
use serde_json::{json, Value};
use shared::domain::linking::LinkPath;
use shared::domain::tiles::{distance_m, tiles_covering_points, LonLat, TileId, COVERAGE_ZOOM};
use shared::domain::tracking::TrackedUpload;
use shared::mapillary::session::TokenSession;
use shared::model::{upload_id, StoredToken, TrackingRecord, UploadImage};
use shared::ports::{ImageEntryStore, TokenStore, TrackingStore};
use time::OffsetDateTime;

use crate::rng::Rng;
use crate::track::poller_from_env;
use crate::venv;

const USERS: usize = 1_000;
const UPLOADS_PER_USER: usize = 10;
const IMAGES_PER_UPLOAD: usize = 5;
const LATENCY_MS: u64 = 20;
const SEED_CONCURRENCY: usize = 16;
const CITY_M: f64 = 4_000.0;
const STREET_EVERY_M: f64 = 100.0;
const CENTRE: (f64, f64) = (48.2082, 16.3738);
const STEP_M: f64 = 8.0;
const STEP_MS: i64 = 2_000;

/// One planned image: position (lat, lon), altitude, capture time.
#[derive(Clone, Copy)]
struct Point {
    lat: f64,
    lon: f64,
    alt: f64,
    at_ms: i64,
}

/// A city drive of `IMAGES_PER_UPLOAD` images along one street.
fn drive(rng: &mut Rng, now_ms: i64) -> Vec<Point> {
    let streets = (CITY_M / STREET_EVERY_M) as u64 + 1;
    let street = rng.below(streets) as f64 * STREET_EVERY_M;
    let length = STEP_M * (IMAGES_PER_UPLOAD - 1) as f64;
    let along = rng.unit() * (CITY_M - length);
    let north_south = rng.below(2) == 0;
    let backwards = rng.below(2) == 0;
    let start_ms = now_ms - 3_600_000 - rng.below(14 * 24 * 3600) as i64 * 1000;
    let m_per_deg_lat = 111_320.0;
    let m_per_deg_lon = 111_320.0 * CENTRE.0.to_radians().cos();
    (0..IMAGES_PER_UPLOAD)
        .map(|i| {
            let d = if backwards {
                along + length - STEP_M * i as f64
            } else {
                along + STEP_M * i as f64
            };
            let (x, y) = if north_south { (street, d) } else { (d, street) };
            Point {
                lat: CENTRE.0 + (y - CITY_M / 2.0) / m_per_deg_lat,
                lon: CENTRE.1 + (x - CITY_M / 2.0) / m_per_deg_lon,
                alt: 170.0 + rng.unit() * 10.0,
                at_ms: start_ms + STEP_MS * i as i64,
            }
        })
        .collect()
}

struct PlannedUser {
    ours: String,
    mapillary_id: String,
    token: String,
    /// (upload id, cluster id, images)
    uploads: Vec<(String, String, Vec<Point>)>,
}

/// Users, tokens and clusters straight into the simulator's world (as `finish_upload` makes them).
fn seed_simulator(sim: &SimHandle) -> Vec<PlannedUser> {
    let now = sim.sim().now_ms();
    let mut rng = Rng(0x5EED_CAFE);
    let mut w = sim.sim().world_raw();
    let mut users = Vec::with_capacity(USERS);
    for u in 0..USERS {
        let id = w.ids.numeric();
        let username = format!("bench_{u:04}");
        w.users.insert(
            id.clone(),
            User {
                id: id.clone(),
                username,
                email: None,
                password: None,
            },
        );
        let token = w.issue_token(&id, None, 60 * 24 * 3600, now);
        let ours = format!("bench-{u:04}");
        let mut uploads = Vec::with_capacity(UPLOADS_PER_USER);
        for k in 0..UPLOADS_PER_USER {
            let points = drive(&mut rng, now);
            let cluster_id = w.ids.numeric();
            let key = format!("mly_relay_{ours}_s{k:02}.zip");
            let images = points
                .iter()
                .enumerate()
                .map(|(i, p)| PendingImage {
                    name: format!("{i:04}.jpg"),
                    meta: ImageMeta {
                        lat: p.lat,
                        lon: p.lon,
                        altitude: Some(p.alt),
                        captured_at_ms: p.at_ms,
                        compass_angle: None,
                        make: None,
                        model: None,
                        orientation: None,
                        filename: None,
                        width: None,
                        height: None,
                        source: MetaSource::Description,
                        description: None,
                    },
                    source: ImageSource::ZipEntry {
                        upload_key: key.clone(),
                        entry_name: format!("{i:04}.jpg"),
                    },
                })
                .collect();
            w.clusters.push(Cluster {
                id: cluster_id.clone(),
                owner_id: id.clone(),
                organization_id: None,
                file_type: "zip".into(),
                file_handle: format!("bench-handle-{cluster_id}"),
                upload_key: key,
                // Ten seconds apart: distinct `created_at_seconds`, all still in stage 1.
                created_at_ms: now - ((UPLOADS_PER_USER - k) as i64) * 1000,
                plan: ProcessingPlan::default(),
                sequence_cap: 1000,
                content: ClusterContent::Images {
                    images,
                    rejected: Vec::new(),
                },
                sequence_ids: Vec::new(),
                materialized: false,
            });
            uploads.push((upload_id(&ours, &format!("s{k:02}"), 0), cluster_id, points));
        }
        users.push(PlannedUser {
            ours,
            mapillary_id: id,
            token,
            uploads,
        });
    }
    users
}

fn at(ms: i64) -> Result<OffsetDateTime> {
    Ok(OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(ms) * 1_000_000,
    )?)
}

async fn admin(
    http: &reqwest::Client,
    sim: &SimHandle,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> Result<Value> {
    let resp = http
        .request(method, format!("{}{path}", sim.admin_url()))
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    let text = resp.text().await?;
    ensure!(status.is_success(), "{path}: {status} {text}");
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Requests in the simulator's log, total and by kind; clears the log.
async fn take_requests(http: &reqwest::Client, sim: &SimHandle) -> Result<(usize, BTreeMap<String, usize>)> {
    let v = admin(http, sim, reqwest::Method::GET, "/requests", Value::Null).await?;
    let list = v
        .as_array()
        .or_else(|| v["requests"].as_array())
        .context("request log")?;
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for r in list {
        let path = r["path"].as_str().unwrap_or("");
        let kind = if path.starts_with("/tiles/") {
            "tiles"
        } else if path == "/graph/graphql" {
            "feed (graphql)"
        } else if path == "/graph/images" {
            "images (batch/search)"
        } else if path == "/graph/image_ids" {
            "image_ids"
        } else if path == "/graph/token" || path == "/graph/me" {
            "token, /me"
        } else {
            "entity /{id}"
        };
        *by.entry(kind.to_string()).or_default() += 1;
    }
    admin(http, sim, reqwest::Method::DELETE, "/requests", Value::Null).await?;
    Ok((list.len(), by))
}

fn fmt_kinds(by: &BTreeMap<String, usize>) -> String {
    by.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The documented Plan A's requests for every upload, computed from the simulator's world: per
/// user the distinct z14 tiles around its uploads (cached per user, as a run would), per upload
/// every candidate sequence → one `image_ids` + ⌈n/50⌉ entity requests. Two candidate rules:
/// every sequence in the tiles, or only those with an image within `near_m` of one of ours.
fn documented_plan_a(
    sim: &SimHandle,
    users: &[PlannedUser],
    margin_m: f64,
    near_m: f64,
) -> Result<(u64, u64)> {
    let w = sim.sim().world();
    let mut by_tile: HashMap<TileId, HashSet<&str>> = HashMap::new();
    let mut grid: HashMap<(i64, i64), Vec<(&str, LonLat)>> = HashMap::new();
    let cell = |p: LonLat| ((p.lat * 2000.0).floor() as i64, (p.lon * 1400.0).floor() as i64);
    for img in w.images.values() {
        let p = LonLat::new(img.meta.lon, img.meta.lat);
        by_tile
            .entry(TileId::containing(p, COVERAGE_ZOOM)?)
            .or_default()
            .insert(img.sequence_id.as_str());
        grid.entry(cell(p))
            .or_default()
            .push((img.sequence_id.as_str(), p));
    }
    let size = |s: &str| w.sequences.get(s).map(|q| q.image_ids.len()).unwrap_or(0);
    let per_candidate = |s: &str| 1 + size(s).div_ceil(50) as u64;
    let (mut tile_wide, mut near) = (0u64, 0u64);
    for u in users {
        let mut user_tiles: HashSet<TileId> = HashSet::new();
        for (_, _, points) in &u.uploads {
            let pts: Vec<LonLat> = points.iter().map(|p| LonLat::new(p.lon, p.lat)).collect();
            let tiles = tiles_covering_points(&pts, COVERAGE_ZOOM, margin_m, 64)?;
            user_tiles.extend(tiles.iter().copied());
            let in_tiles: HashSet<&str> = tiles
                .iter()
                .filter_map(|t| by_tile.get(t))
                .flat_map(|s| s.iter().copied())
                .collect();
            tile_wide += in_tiles.iter().map(|s| per_candidate(s)).sum::<u64>();
            let mut close: HashSet<&str> = HashSet::new();
            for p in &pts {
                let (a, b) = cell(*p);
                for da in -1..=1 {
                    for db in -1..=1 {
                        for (s, q) in grid.get(&(a + da, b + db)).into_iter().flatten() {
                            if distance_m(*p, *q) <= near_m {
                                close.insert(s);
                            }
                        }
                    }
                }
            }
            near += close.iter().map(|s| per_candidate(s)).sum::<u64>();
        }
        tile_wide += user_tiles.len() as u64;
        near += user_tiles.len() as u64;
    }
    Ok((tile_wide, near))
}

/// Run the benchmark (see the module docs).
pub async fn run(root: &Path) -> Result<()> {
    if let Some(filter) = std::env::var("RELAY_BENCH_LOG").ok().filter(|v| !v.is_empty()) {
        // The poller's own logs (text, stderr), e.g. RELAY_BENCH_LOG=info.
        std::env::set_var("RUST_LOG", filter);
        std::env::set_var("LOG_FORMAT", "text");
        shared::telemetry::init();
    }
    let venvs = venv::ensure(root)?;
    let moto = MotoServer::start(&venvs)?;
    let stack = LocalStack::create(moto.endpoint(), &stack::unique_stack_name("bench-poller")).await?;
    let sim = Simulator::start(SimConfig::frozen(), "127.0.0.1:0").await?;
    // The web-app feed token, as the local stack gives it: the default world (seed-2022) lets only that
    // token read the feed, and the benchmark measures the feed path (every upload linked via the feed).
    let sim_ep = SimEndpoints::from_base(sim.base_url(), defaults::APP_ID, defaults::CLIENT_SECRET)
        .with_feed_token(defaults::WEB_APP_CLIENT_TOKEN);
    let env: BTreeMap<String, String> = stack.lambda_env(&sim_ep).into_iter().collect();
    let clock = Clock::manual(at(sim.sim().now_ms())?);
    let p = poller_from_env(&env, clock.clone()).await?;
    let http = reqwest::Client::new();
    eprintln!(
        "bench: moto at {}, simulator at {}; poller tunables: user concurrency {}, upload concurrency {}, \
         budget {:?}, feed page {}, entity batch {}",
        moto.endpoint(),
        sim.base_url(),
        p.tunables.user_concurrency,
        p.tunables.upload_concurrency,
        p.tunables.budget,
        p.tunables.feed_page_size,
        p.tunables.entity_batch
    );

    // Seeding.
    let t0 = Instant::now();
    let users = seed_simulator(&sim);
    let now = at(sim.sim().now_ms())?;
    let seeded: Vec<Result<()>> = futures::stream::iter(&users)
        .map(|u| {
            let p = &p;
            async move {
                p.tokens
                    .save(
                        &u.ours,
                        &StoredToken {
                            access_token: SecretString::from(u.token.clone()),
                            refresh_token: None,
                            expires_at: None,
                            mapillary_user_id: Some(u.mapillary_id.clone()),
                            username: None,
                            updated_at: now,
                        },
                    )
                    .await?;
                let mut entries = Vec::new();
                for (k, (id, _, points)) in u.uploads.iter().enumerate() {
                    for (i, pt) in points.iter().enumerate() {
                        entries.push(UploadImage {
                            upload_id: id.clone(),
                            index: i as u32,
                            key: format!("sequences/{}/s{k:02}/{i:04}.jpg", u.ours),
                            etag: "bench".into(),
                            size: 1,
                            entry_size: 1,
                            header_consumed: 0,
                            description: String::new(),
                            lat: pt.lat,
                            lon: pt.lon,
                            altitude: Some(pt.alt),
                            captured_at: at(pt.at_ms)?,
                            heading: None,
                            checkpoint: None,
                        });
                    }
                }
                p.uploads.put_images(&entries).await?;
                for (k, (id, cluster, _)) in u.uploads.iter().enumerate() {
                    p.tracking
                        .create_tracking(&TrackingRecord {
                            mapillary_user_id: Some(u.mapillary_id.clone()),
                            ..TrackingRecord::new(
                                u.ours.clone(),
                                format!("s{k:02}"),
                                id.clone(),
                                TrackedUpload::new(cluster.clone(), now),
                                Some(IMAGES_PER_UPLOAD as u32),
                            )
                        })
                        .await?;
                }
                Ok(())
            }
        })
        .buffer_unordered(SEED_CONCURRENCY)
        .collect()
        .await;
    seeded.into_iter().collect::<Result<()>>()?;
    let total = USERS * UPLOADS_PER_USER;
    eprintln!(
        "bench: seeded {USERS} users, {total} uploads, {} images in {:.1} s",
        total * IMAGES_PER_UPLOAD,
        t0.elapsed().as_secs_f64()
    );

    admin(
        &http,
        &sim,
        reqwest::Method::POST,
        "/faults",
        json!({"path": "*", "action": {"kind": "latency", "ms": LATENCY_MS}}),
    )
    .await?;
    take_requests(&http, &sim).await?;

    // (i) Status run: every upload in stage 1.
    let load1 = uptime();
    let t = Instant::now();
    let r1 = run_once(&p, Instant::now() + Duration::from_secs(3600)).await;
    let status_wall = t.elapsed();
    let (status_reqs, status_by) = take_requests(&http, &sim).await?;
    ensure!(
        r1.checked == total && r1.written == total && !r1.cut_off,
        "status run: {} checked, {} written, cut off {} ({:?})",
        r1.checked,
        r1.written,
        r1.cut_off,
        r1.errors.first()
    );
    eprintln!(
        "bench: status run {:.1} s, {status_reqs} requests ({}); {:?}",
        status_wall.as_secs_f64(),
        fmt_kinds(&status_by),
        r1.timings
    );

    // (ii) Every stage finished: the run that links everything.
    sim.advance_clock(7_000);
    clock.set_ms(sim.sim().now_ms());
    drop(sim.sim().world()); // materialize sequences and images outside the measurement
    let load2 = uptime();
    let t = Instant::now();
    let r2 = run_once(&p, Instant::now() + Duration::from_secs(3600)).await;
    let link_wall = t.elapsed();
    let (link_reqs, link_by) = take_requests(&http, &sim).await?;
    ensure!(
        r2.linked_feed == total && !r2.cut_off,
        "linking run: linked {} of {total}, cut off {} ({:?})",
        r2.linked_feed,
        r2.cut_off,
        r2.errors.first()
    );
    ensure!(
        p.tracking.list_pending_tracking().await?.records.is_empty(),
        "uploads left pending"
    );
    eprintln!(
        "bench: linking run {:.1} s, {link_reqs} requests ({}); {:?}",
        link_wall.as_secs_f64(),
        fmt_kinds(&link_by),
        r2.timings
    );

    // (iii) Plan A (the poller's linking::by_tiles::find_upload) for the same linking, users in parallel as a run.
    let t = Instant::now();
    let results: Vec<Result<(usize, usize)>> = futures::stream::iter(&users)
        .map(|u| {
            let (p, stack) = (&p, &stack);
            async move {
                let tracking =
                    shared::adapters::dynamodb::DynamoTracking::new(stack.dynamodb(), &stack.uploads_table);
                // The user's records and our images by key, as a run reads them (moto answers every
                // Query with a scan of the whole table, so a query per user or upload would measure moto).
                let ids: Vec<String> = u.uploads.iter().map(|(id, _, _)| id.clone()).collect();
                let mut linked = tracking.get_records(&ids).await?;
                linked.sort_by(|a, b| a.upload_id.cmp(&b.upload_id));
                ensure!(
                    linked.len() == ids.len(),
                    "{}: {} of {} records",
                    u.ours,
                    linked.len(),
                    ids.len()
                );
                let mine =
                    poller::ours::our_images_many(&p.uploads, linked.iter(), p.tunables.upload_concurrency)
                        .await;
                let mut tok = TokenSession::load_fresh(p.token_context(), &u.ours).await?;
                let mut cache = TileCache::default();
                let mut taken: HashSet<String> = HashSet::new();
                let (mut found, mut same) = (0, 0);
                for (rec, mine) in linked.iter().zip(mine) {
                    ensure!(
                        rec.linked_via == Some(LinkPath::ActivityFeed),
                        "{} not linked by Plan B",
                        rec.upload_id
                    );
                    if let Some(Linked { report, .. }) =
                        find_upload(p, &mut tok, rec, &mut cache, &taken, Some(mine?)).await?
                    {
                        found += 1;
                        if report.sequence_ids == rec.sequence_ids
                            && report.linked_count() as u32 == rec.linked_count
                        {
                            same += 1;
                        }
                        taken.extend(report.sequence_ids);
                    }
                }
                Ok((found, same))
            }
        })
        .buffer_unordered(p.tunables.user_concurrency)
        .collect()
        .await;
    let plan_a_wall = t.elapsed();
    let (mut found, mut same) = (0, 0);
    for r in results {
        let (f, s) = r?;
        found += f;
        same += s;
    }
    let (plan_a_reqs, plan_a_by) = take_requests(&http, &sim).await?;
    eprintln!(
        "bench: Plan A {:.1} s, {plan_a_reqs} requests ({}); {found} found, {same} with Plan B's links",
        plan_a_wall.as_secs_f64(),
        fmt_kinds(&plan_a_by)
    );
    let (doc_tile_wide, doc_near) =
        documented_plan_a(&sim, &users, p.tunables.tile_margin_m, p.tunables.tile_margin_m)?;
    let load3 = uptime();
    sim.shutdown().await;
    let _ = stack.delete().await;

    let ratio = |a: u64, b: usize| a as f64 / b.max(1) as f64;
    println!(
        "| Run | Wall time | HTTP requests to Mapillary | Plan A ÷ this run |\n|---|---|---|---|\n\
| (i) status run: {total} uploads in progress | {:.1} s | {status_reqs} ({}) | {:.0}× |\n\
| (ii) run that links all {total} uploads (Plan B) | {:.1} s | {link_reqs} ({}) | {:.1}× |\n\
| Plan A as the poller implements it (tile image points filtered by time and place; tiles cached per user), same linking | {:.1} s | {plan_a_reqs} ({}) | — |\n\
| Plan A as documented, every sequence within {} m of the upload's images a candidate (computed) | — | {doc_near} | — |\n\
| Plan A as documented, every sequence in the upload's z14 tiles a candidate (computed) | — | {doc_tile_wide} | — |\n",
        status_wall.as_secs_f64(),
        fmt_kinds(&status_by),
        ratio(plan_a_reqs as u64, status_reqs),
        link_wall.as_secs_f64(),
        fmt_kinds(&link_by),
        ratio(plan_a_reqs as u64, link_reqs),
        plan_a_wall.as_secs_f64(),
        fmt_kinds(&plan_a_by),
        p.tunables.tile_margin_m,
    );
    println!(
        "Linking run vs documented Plan A: {:.0}× (nearby candidates), {:.0}× (tile-wide candidates). \
         Plan A found {found} of {total} uploads, {same} with exactly Plan B's sequences and link counts.",
        ratio(doc_near, link_reqs),
        ratio(doc_tile_wide, link_reqs)
    );
    println!(
        "Load (uptime) before the status run: {load1}; before the linking run: {load2}; at the end: {load3}"
    );
    Ok(())
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
