//! Coverage tiles (§7.1, §14.3): decoded with `mvt-reader`, an MVT decoder independent of the
//! simulator's encoder, and checked against tile maths written here from scratch.

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use common::*;
use geo_types::Geometry;
use mapillary_sim::defaults::{CLIENT_TOKEN, DEMO_ORG_ID};
use mapillary_sim::SimHandle;
use mvt_reader::feature::{Feature, Value};
use relay_fixtures::{jpeg, track, TrackSpec};
use serde_json::json;

const PUBLIC: &str = "mly1_public";
const COMPUTED: &str = "mly1_computed_public";

/// Slippy-map tile of `lon`/`lat` at `z`, and the position inside it in 4096-unit tile coordinates.
fn locate(lon: f64, lat: f64, z: u32) -> ((u32, u32), (f64, f64)) {
    let n = 2f64.powi(z as i32);
    let x = (lon + 180.0) / 360.0 * n;
    let lat_r = lat.to_radians();
    let y = (1.0 - lat_r.tan().asinh() / std::f64::consts::PI) / 2.0 * n;
    let (tx, ty) = (x.floor(), y.floor());
    ((tx as u32, ty as u32), ((x - tx) * 4096.0, (y - ty) * 4096.0))
}

/// What the test knows about a server image.
#[derive(Debug, Clone)]
struct Img {
    id: String,
    seq: String,
    lon: f64,
    lat: f64,
    captured_at: i64,
    compass: Option<f64>,
}

/// The cluster's images in capture order, from the simulator state.
fn images_of(h: &SimHandle, cluster: &str) -> Vec<Img> {
    let w = h.sim().world();
    let c = w.cluster(cluster).expect("cluster");
    c.sequence_ids
        .iter()
        .flat_map(|s| w.sequences[s].image_ids.clone())
        .map(|id| {
            let i = &w.images[&id];
            Img {
                id: id.clone(),
                seq: i.sequence_id.clone(),
                lon: i.meta.lon,
                lat: i.meta.lat,
                captured_at: i.meta.captured_at_ms,
                compass: i.meta.compass_angle,
            }
        })
        .collect()
}

async fn get_tile(
    h: &SimHandle,
    set: &str,
    z: u32,
    x: u32,
    y: u32,
    token: Option<&str>,
) -> reqwest::Response {
    let mut req = client().get(format!("{}/maps/vtp/{set}/2/{z}/{x}/{y}", h.tiles_url()));
    if let Some(t) = token {
        req = req.header("Authorization", auth(t));
    }
    req.send().await.expect("tile request")
}

type Layers = BTreeMap<String, Vec<Feature<f64>>>;

/// Decode a tile, checking spec version 2 and extent 4096 on every layer.
fn decode(bytes: Vec<u8>) -> Layers {
    let reader = mvt_reader::Reader::new(bytes).expect("valid MVT");
    let mut out = BTreeMap::new();
    for meta in reader.get_layer_metadata().expect("layers") {
        assert_eq!(meta.version, 2, "layer {}", meta.name);
        assert_eq!(meta.extent, 4096, "layer {}", meta.name);
        let features = reader.get_features_as::<f64>(meta.layer_index).expect("features");
        assert_eq!(features.len(), meta.feature_count);
        out.insert(meta.name, features);
    }
    out
}

/// A 200 tile with the MVT content type, decoded.
async fn tile_ok(h: &SimHandle, set: &str, z: u32, (x, y): (u32, u32)) -> Layers {
    let r = get_tile(h, set, z, x, y, Some(TOKEN)).await;
    assert_eq!(r.status(), 200, "{set} {z}/{x}/{y}");
    assert_eq!(r.headers()["content-type"], "application/vnd.mapbox-vector-tile");
    decode(r.bytes().await.expect("bytes").to_vec())
}

fn names(l: &Layers) -> Vec<&str> {
    l.keys().map(String::as_str).collect()
}

fn props(f: &Feature<f64>) -> &HashMap<String, Value> {
    f.properties.as_ref().expect("properties")
}

fn keys(f: &Feature<f64>) -> BTreeSet<&str> {
    props(f).keys().map(String::as_str).collect()
}

fn int(f: &Feature<f64>, k: &str) -> i64 {
    match props(f).get(k) {
        Some(Value::Int(n) | Value::SInt(n)) => *n,
        Some(Value::UInt(n)) => i64::try_from(*n).expect("fits"),
        other => panic!("{k} is not an int: {other:?}"),
    }
}

fn string(f: &Feature<f64>, k: &str) -> String {
    match props(f).get(k) {
        Some(Value::String(s)) => s.clone(),
        other => panic!("{k} is not a string: {other:?}"),
    }
}

fn point(f: &Feature<f64>) -> (f64, f64) {
    match &f.geometry {
        Geometry::Point(p) => (p.x(), p.y()),
        Geometry::MultiPoint(m) if m.0.len() == 1 => (m.0[0].x(), m.0[0].y()),
        g => panic!("expected a Point, got {g:?}"),
    }
}

/// Every vertex of a (multi)line.
fn vertices(f: &Feature<f64>) -> Vec<(f64, f64)> {
    match &f.geometry {
        Geometry::LineString(l) => l.0.iter().map(|c| (c.x, c.y)).collect(),
        Geometry::MultiLineString(m) => m.0.iter().flat_map(|l| l.0.iter().map(|c| (c.x, c.y))).collect(),
        g => panic!("expected a LineString, got {g:?}"),
    }
}

fn near(a: (f64, f64), b: (f64, f64)) -> bool {
    (a.0 - b.0).abs() <= 1.0 && (a.1 - b.1).abs() <= 1.0
}

fn image_feature<'a>(layer: &'a [Feature<f64>], id: &str) -> &'a Feature<f64> {
    let n: i64 = id.parse().expect("numeric id");
    layer
        .iter()
        .find(|f| int(f, "id") == n)
        .unwrap_or_else(|| panic!("image {id} not in the tile"))
}

#[tokio::test]
async fn z14_tile_appears_once_tiler_finished_with_image_and_sequence_layers() {
    let h = start().await;
    short_stages(&h).await;
    let cluster = zip_cluster(&h, "t.zip", &jpegs(5, 1)).await;

    // Stage 2 done: the images exist, but the tiler has not finished.
    advance(&h, 25).await;
    let imgs = images_of(&h, &cluster);
    assert_eq!(imgs.len(), 5);
    let (tile, _) = locate(imgs[2].lon, imgs[2].lat, 14);
    let r = get_tile(&h, PUBLIC, 14, tile.0, tile.1, Some(TOKEN)).await;
    assert_eq!(r.status(), 403, "not visible before tiler_status FINISHED");
    let e = body(r).await;
    assert_eq!(e["error"]["message"], "Tile does not exist");
    assert_eq!(e["error"]["code"], 100);

    advance(&h, 20).await;
    assert_eq!(node_of(&h, &cluster).await["tiler_status"], "FINISHED");
    let layers = tile_ok(&h, PUBLIC, 14, tile).await;
    assert_eq!(names(&layers), ["image", "sequence"]);

    let in_tile: Vec<&Img> = imgs
        .iter()
        .filter(|i| locate(i.lon, i.lat, 14).0 == tile)
        .collect();
    assert!(!in_tile.is_empty());
    let image_layer = &layers["image"];
    assert_eq!(image_layer.len(), in_tile.len());
    for img in &in_tile {
        let f = image_feature(image_layer, &img.id);
        assert_eq!(
            keys(f),
            BTreeSet::from(["captured_at", "compass_angle", "id", "is_pano", "sequence_id"]),
            "no organization_id without an organization, never creator_id"
        );
        assert_eq!(int(f, "captured_at"), img.captured_at);
        match props(f)["compass_angle"] {
            Value::Double(a) => assert!((a - img.compass.expect("heading")).abs() < 1e-9),
            ref v => panic!("compass_angle {v:?}"),
        }
        assert_eq!(string(f, "sequence_id"), img.seq);
        assert_eq!(props(f)["is_pano"], Value::Bool(false));
        let want = locate(img.lon, img.lat, 14).1;
        assert!(
            near(point(f), want),
            "image {} at {:?}, want {want:?}",
            img.id,
            point(f)
        );
    }

    let seq_layer = &layers["sequence"];
    assert_eq!(seq_layer.len(), 1);
    let s = &seq_layer[0];
    assert_eq!(
        keys(s),
        BTreeSet::from(["captured_at", "id", "image_id", "is_pano"])
    );
    assert_eq!(string(s, "id"), imgs[0].seq);
    assert_eq!(int(s, "image_id"), imgs[0].id.parse::<i64>().unwrap());
    assert_eq!(int(s, "captured_at"), imgs[0].captured_at);
    assert_eq!(props(s)["is_pano"], Value::Bool(false));
    let verts = vertices(s);
    assert!(verts.len() >= 2);
    for img in &in_tile {
        let want = locate(img.lon, img.lat, 14).1;
        assert!(
            verts.iter().any(|v| near(*v, want)),
            "line misses image {}",
            img.id
        );
    }
}

#[tokio::test]
async fn failed_or_stuck_tiler_never_shows_in_tiles() {
    let h = start().await;
    short_stages(&h).await;
    admin(
        &h,
        "/plans/next",
        json!({"fail": {"stage": 4, "error_code": "TILER_BROKE"}}),
    )
    .await;
    admin(&h, "/plans/next", json!({"stuck_at": 4})).await;
    let failed = zip_cluster(&h, "f.zip", &jpegs(3, 1)).await;
    let stuck = zip_cluster(&h, "s.zip", &jpegs(3, 20)).await;
    advance(&h, 7 * 24 * 3600).await;
    assert_eq!(node_of(&h, &failed).await["tiler_status"], "FAILED");
    assert_eq!(node_of(&h, &stuck).await["tiler_status"], "IN_PROGRESS");
    for c in [&failed, &stuck] {
        let imgs = images_of(&h, c);
        assert_eq!(imgs.len(), 3, "stage 2 finished, images exist");
        for z in [14, 10, 3] {
            let (t, _) = locate(imgs[0].lon, imgs[0].lat, z);
            let r = get_tile(&h, PUBLIC, z, t.0, t.1, Some(TOKEN)).await;
            assert_eq!(r.status(), 403, "z{z}");
        }
    }
}

#[tokio::test]
async fn organization_and_split_sequences() {
    let h = start().await;
    short_stages(&h).await;
    admin(&h, "/plans/next", json!({"split_into": 2})).await;
    let handle = upload(&h, "org.zip", zip_of(&jpegs(6, 3))).await;
    let r = client()
        .post(format!("{}/finish_upload", h.graph_url()))
        .header("Authorization", auth(TOKEN))
        .json(&json!({"file_handle": handle, "file_type": "zip", "organization_id": DEMO_ORG_ID}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cluster = body(r).await["cluster_id"].as_str().unwrap().to_string();
    advance(&h, 40).await;
    let imgs = images_of(&h, &cluster);
    let (tile, _) = locate(imgs[0].lon, imgs[0].lat, 14);
    let layers = tile_ok(&h, PUBLIC, 14, tile).await;
    let org: i64 = DEMO_ORG_ID.parse().unwrap();

    let seqs: BTreeSet<String> = imgs.iter().map(|i| i.seq.clone()).collect();
    assert_eq!(seqs.len(), 2);
    let seq_layer = &layers["sequence"];
    assert_eq!(
        seq_layer.iter().map(|f| string(f, "id")).collect::<BTreeSet<_>>(),
        seqs
    );
    for f in seq_layer {
        assert_eq!(int(f, "organization_id"), org);
        let first = imgs.iter().find(|i| i.seq == string(f, "id")).unwrap();
        assert_eq!(int(f, "image_id"), first.id.parse::<i64>().unwrap());
        assert_eq!(int(f, "captured_at"), first.captured_at);
    }
    for img in imgs.iter().filter(|i| locate(i.lon, i.lat, 14).0 == tile) {
        let f = image_feature(&layers["image"], &img.id);
        assert_eq!(int(f, "organization_id"), org);
        assert!(!keys(f).contains("creator_id"));
    }
}

#[tokio::test]
async fn zoom_levels_pick_their_layers() {
    let h = start().await;
    short_stages(&h).await;
    let cluster = zip_cluster(&h, "z.zip", &jpegs(4, 5)).await;
    advance(&h, 40).await;
    let imgs = images_of(&h, &cluster);
    let first = &imgs[0];

    for z in [13, 10, 6] {
        let (t, _) = locate(first.lon, first.lat, z);
        let layers = tile_ok(&h, PUBLIC, z, t).await;
        assert_eq!(names(&layers), ["sequence"], "z{z}");
        let s = &layers["sequence"][0];
        assert_eq!(string(s, "id"), first.seq);
        let verts = vertices(s);
        assert!(
            verts.len() >= 2,
            "z{z}: a valid line even when the sequence is tiny"
        );
        let want = locate(first.lon, first.lat, z).1;
        assert!(near(verts[0], want), "z{z}: line starts at the first image");
    }
    for z in [5, 2, 0] {
        let (t, want) = locate(first.lon, first.lat, z);
        let layers = tile_ok(&h, PUBLIC, z, t).await;
        assert_eq!(names(&layers), ["overview"], "z{z}");
        let o = &layers["overview"];
        assert_eq!(o.len(), 1, "one overview point per sequence");
        assert_eq!(
            keys(&o[0]),
            BTreeSet::from(["captured_at", "id", "is_pano", "sequence_id"])
        );
        assert_eq!(int(&o[0], "id"), first.id.parse::<i64>().unwrap());
        assert_eq!(string(&o[0], "sequence_id"), first.seq);
        assert_eq!(int(&o[0], "captured_at"), first.captured_at);
        assert!(near(point(&o[0]), want), "z{z}");
    }

    let status = |p: String| {
        let h = &h;
        async move {
            client()
                .get(format!("{}/maps/vtp/{p}", h.tiles_url()))
                .header("Authorization", auth(TOKEN))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(format!("{PUBLIC}/2/15/0/0")).await, 400, "above z14");
    assert_eq!(status(format!("{PUBLIC}/2/3/8/0")).await, 400, "outside the grid");
    assert_eq!(status(format!("{PUBLIC}/2/3/a/0")).await, 400);
    assert_eq!(status("mly1_nope/2/3/0/0".into()).await, 404);
}

#[tokio::test]
async fn a_long_track_is_clipped_across_tiles_and_each_image_is_in_one_tile() {
    let h = start().await;
    short_stages(&h).await;
    let mut spec = TrackSpec::new(50.8966, -0.5591, time::macros::datetime!(2024-05-01 09:00:00 UTC));
    spec.bearing_deg = 90.0;
    spec.step_m = 4000.0;
    let files: Vec<Vec<u8>> = track(4, &spec)
        .into_iter()
        .map(|mut s| {
            s.image_description = Some(map_description(&s));
            jpeg(&s)
        })
        .collect();
    let cluster = zip_cluster(&h, "long.zip", &files).await;
    advance(&h, 40).await;
    let imgs = images_of(&h, &cluster);
    assert_eq!(imgs.len(), 4);

    let tiles: BTreeSet<(u32, u32)> = imgs.iter().map(|i| locate(i.lon, i.lat, 14).0).collect();
    assert!(tiles.len() >= 2, "the track spans several z14 tiles: {tiles:?}");
    let mut seen = 0;
    for t in &tiles {
        let layers = tile_ok(&h, PUBLIC, 14, *t).await;
        let want: BTreeSet<i64> = imgs
            .iter()
            .filter(|i| locate(i.lon, i.lat, 14).0 == *t)
            .map(|i| i.id.parse().unwrap())
            .collect();
        let got: BTreeSet<i64> = layers["image"].iter().map(|f| int(f, "id")).collect();
        assert_eq!(got, want, "tile {t:?} holds exactly its own images");
        seen += got.len();
        let line = &layers["sequence"];
        assert_eq!(line.len(), 1);
        for v in vertices(&line[0]) {
            assert!(
                (-64.0..=4160.0).contains(&v.0) && (-64.0..=4160.0).contains(&v.1),
                "vertex {v:?} clipped to the buffered tile"
            );
        }
    }
    assert_eq!(seen, imgs.len());
    // Tiles the line only crosses between two images (steps are wider than a tile) carry the
    // sequence but no image.
    let mut crossed = 0;
    for w in imgs.windows(2) {
        let mid = locate((w[0].lon + w[1].lon) / 2.0, (w[0].lat + w[1].lat) / 2.0, 14).0;
        if tiles.contains(&mid) {
            continue;
        }
        let layers = tile_ok(&h, PUBLIC, 14, mid).await;
        assert_eq!(names(&layers), ["sequence"], "tile {mid:?}");
        assert_eq!(string(&layers["sequence"][0], "id"), imgs[0].seq);
        crossed += 1;
    }
    assert!(crossed >= 1, "some tile lies between two images");
}

#[tokio::test]
async fn computed_tiles_use_the_entity_apis_computed_geometry() {
    let h = start().await;
    short_stages(&h).await;
    admin(&h, "/config", json!({"computed_offset_m": 12.0})).await;
    let cluster = zip_cluster(&h, "c.zip", &jpegs(3, 7)).await;
    advance(&h, 40).await;
    let mut compared = 0;
    for img in images_of(&h, &cluster) {
        let r = client()
            .get(format!(
                "{}/{}?fields=geometry,computed_geometry",
                h.graph_url(),
                img.id
            ))
            .header("Authorization", auth(TOKEN))
            .send()
            .await
            .unwrap();
        let e = body(r).await;
        let c = &e["computed_geometry"]["coordinates"];
        let (clon, clat) = (c[0].as_f64().unwrap(), c[1].as_f64().unwrap());
        let g = &e["geometry"]["coordinates"];
        let (glon, glat) = (g[0].as_f64().unwrap(), g[1].as_f64().unwrap());

        let (ct, cpos) = locate(clon, clat, 14);
        let computed = tile_ok(&h, COMPUTED, 14, ct).await;
        let cp = point(image_feature(&computed["image"], &img.id));
        assert!(near(cp, cpos), "computed {cp:?} vs {cpos:?}");

        let (pt, ppos) = locate(glon, glat, 14);
        let public = tile_ok(&h, PUBLIC, 14, pt).await;
        let pp = point(image_feature(&public["image"], &img.id));
        assert!(near(pp, ppos), "public {pp:?} vs {ppos:?}");
        if ct == pt {
            // 12 m north is ~32 units up at this latitude.
            assert!(pp.1 - cp.1 > 25.0, "computed point lies north: {pp:?} vs {cp:?}");
            compared += 1;
        }
    }
    assert!(compared > 0, "some image kept its tile");
}

#[tokio::test]
async fn empty_tiles_are_403_or_empty_200_by_switch() {
    let h = start().await;
    for (z, x, y) in [(14, 0, 0), (8, 3, 3), (0, 0, 0)] {
        let r = get_tile(&h, PUBLIC, z, x, y, Some(TOKEN)).await;
        assert_eq!(r.status(), 403);
        let e = body(r).await;
        assert_eq!(e["error"]["message"], "Tile does not exist");
        assert_ne!(e["error"]["code"], 4, "not the rate-limit 403");
    }
    let cfg = admin(&h, "/config", json!({"empty_tile_ok": true})).await;
    assert_eq!(cfg["empty_tile_ok"], true);
    for set in [PUBLIC, COMPUTED] {
        let r = get_tile(&h, set, 14, 0, 0, Some(TOKEN)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/vnd.mapbox-vector-tile");
        let bytes = r.bytes().await.unwrap().to_vec();
        assert!(bytes.is_empty());
        assert!(decode(bytes).is_empty(), "an empty tile has no layers");
    }
}

#[tokio::test]
async fn tiles_take_user_or_client_tokens_by_header_or_query() {
    let h = start().await;
    short_stages(&h).await;
    let cluster = zip_cluster(&h, "tok.zip", &jpegs(2, 9)).await;
    advance(&h, 40).await;
    let img = images_of(&h, &cluster)[0].clone();
    let ((x, y), _) = locate(img.lon, img.lat, 14);
    let url = format!("{}/maps/vtp/{PUBLIC}/2/14/{x}/{y}", h.tiles_url());

    let by_header = get_tile(&h, PUBLIC, 14, x, y, Some(TOKEN)).await;
    assert_eq!(by_header.status(), 200);
    let header_bytes = by_header.bytes().await.unwrap();
    let by_query = client()
        .get(&url)
        .query(&[("access_token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), 200);
    assert_eq!(by_query.bytes().await.unwrap(), header_bytes);
    let client_token = client()
        .get(&url)
        .query(&[("access_token", CLIENT_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(client_token.status(), 200, "client tokens read tiles");

    for token in [None, Some("MLYARnot-a-token")] {
        let r = get_tile(&h, PUBLIC, 14, x, y, token).await;
        assert_eq!(r.status(), 401);
        assert_eq!(body(r).await["error"]["code"], 190);
    }
    admin(&h, "/tokens/expire", json!({"token": TOKEN})).await;
    let r = get_tile(&h, PUBLIC, 14, x, y, Some(TOKEN)).await;
    assert_eq!(r.status(), 401, "expired token");
    assert_eq!(body(r).await["error"]["code"], 190);
}

#[tokio::test]
async fn fault_rules_match_tile_paths() {
    let h = start().await;
    short_stages(&h).await;
    let cluster = zip_cluster(&h, "fault.zip", &jpegs(2, 11)).await;
    advance(&h, 40).await;
    let img = images_of(&h, &cluster)[0].clone();
    let ((x, y), _) = locate(img.lon, img.lat, 14);
    let rule = admin(
        &h,
        "/faults",
        json!({"path": "/tiles/*", "times": 1, "action": {"kind": "graph_rate_limit"}}),
    )
    .await;
    let r = get_tile(&h, PUBLIC, 14, x, y, Some(TOKEN)).await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        body(r).await["error"]["code"],
        4,
        "the rate-limit 403, not an empty tile"
    );
    assert_eq!(get_tile(&h, PUBLIC, 14, x, y, Some(TOKEN)).await.status(), 200);
    let faults = admin_get(&h, "/faults").await;
    let hits = faults
        .as_array()
        .and_then(|a| a.iter().find(|f| f["id"] == rule["id"]))
        .map(|f| f["hits"].clone());
    assert_eq!(hits, Some(json!(1)));
    let log = admin_get(&h, "/requests").await;
    let tile_paths = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/tiles/maps/vtp/"))
        })
        .count();
    assert_eq!(tile_paths, 2);
}
