//! Bounded mutation fuzzing of the feed parser and the coverage-tile decoder on the stable
//! toolchain, as an ordinary test (~5 s per parser; `POLLER_FUZZ_SECS` overrides). The libFuzzer
//! targets in `fuzz/` go deeper; this one runs in every `cargo test`.
//!
//! Inputs: the protocol doc's sample bodies and simulator-shaped tiles, mutated structurally
//! (JSON values swapped for other types, keys dropped; random tile features) and byte-wise
//! (flips, cuts, splices, insertions). Every input must give `Ok` or an error: a panic fails the
//! test with the seed that reproduces it.
//!
//! The random generator is a hand-rolled xorshift: a fixed, reproducible stream is all that is
//! needed, and `shared` has no RNG dependency.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use mvt::{GeomEncoder, GeomType, Tile};
use serde_json::{json, Value};
use shared::domain::tiles::{decode_coverage_tile, TileId};
use shared::domain::tracking::{apply_node, FeedWalk, TrackedUpload, TrackingPolicy, WalkLimits};
use shared::mapillary::feed::parse_page;
use time::macros::datetime;

use crate::rng;
use rng::Rng;

fn budget() -> Duration {
    let secs = std::env::var("POLLER_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(5);
    Duration::from_secs(secs)
}

/// The protocol doc's §6.1 reply, verbatim.
const SEED_FEED: &str = include_str!("../../fuzz/seeds/feed_parser/protocol_6_1_sample.json");

fn feed_seeds() -> Vec<String> {
    vec![
        SEED_FEED.to_string(),
        r#"{"data":{"fetch__User":{"id":"1","feed":{"page_info":{"start_cursor":null,"end_cursor":null,"has_next_page":false,"has_previous_page":false},"nodes":[],"__typename":"UserFeedConnection"},"__typename":"User"},"__typename":"Query"},"extensions":{"is_final":true}}"#.to_string(),
        r#"{"data":{"fetch__User":null,"__typename":"Query"},"extensions":{"is_final":true}}"#.to_string(),
        r#"{"errors":[{"message":"Unknown document"}],"data":null}"#.to_string(),
        r#"{"error":{"code":1,"message":"Please reduce the amount of data you're asking for, then retry your request"}}"#.to_string(),
    ]
}

const ODD_VALUES: &[&str] = &[
    "null",
    "true",
    "0",
    "-1",
    "1e400",
    "18446744073709551616",
    "\"\"",
    "\"FAILED\"",
    "\"NOT_STARTED\"",
    "[]",
    "{}",
    "[null,{}]",
    "\"\\u0000\"",
];

fn random_value(rng: &mut Rng) -> Value {
    serde_json::from_str(ODD_VALUES[rng.below(ODD_VALUES.len())]).unwrap_or(Value::Null)
}

/// Walk to a random node of the JSON tree and replace, drop or duplicate something there.
fn mutate_json(v: &mut Value, rng: &mut Rng, depth: usize) {
    let descend = depth < 12 && rng.below(4) != 0;
    match v {
        Value::Object(map) if !map.is_empty() => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = keys[rng.below(keys.len())].clone();
            if descend {
                if let Some(child) = map.get_mut(&key) {
                    mutate_json(child, rng, depth + 1);
                }
            } else {
                match rng.below(3) {
                    0 => {
                        map.remove(&key);
                    }
                    1 => {
                        map.insert(key, random_value(rng));
                    }
                    _ => {
                        map.insert(format!("{key}_extra"), random_value(rng));
                    }
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let i = rng.below(items.len());
            if descend {
                mutate_json(&mut items[i], rng, depth + 1);
            } else if rng.chance(2) {
                let copy = items[i].clone();
                items.push(copy);
            } else {
                items.remove(i);
            }
        }
        other => *other = random_value(rng),
    }
}

fn mutate_bytes(data: &mut Vec<u8>, rng: &mut Rng, donors: &[Vec<u8>]) {
    for _ in 0..=rng.below(4) {
        let len = data.len();
        match rng.below(6) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next() as u8;
            }
            2 => data.truncate(rng.below(len + 1)),
            3 => {
                let i = rng.below(len + 1);
                let bytes: Vec<u8> = (0..=rng.below(8)).map(|_| rng.next() as u8).collect();
                data.splice(i..i, bytes);
            }
            4 if len > 1 => {
                let a = rng.below(len);
                let b = a + rng.below(len - a);
                data.drain(a..b);
            }
            _ => {
                // Splice in a piece of another seed.
                let donor = &donors[rng.below(donors.len())];
                if !donor.is_empty() {
                    let a = rng.below(donor.len());
                    let b = a + rng.below(donor.len() - a) + 1;
                    let i = rng.below(data.len() + 1);
                    data.splice(i..i, donor[a..b].iter().copied());
                }
            }
        }
    }
}

/// Run `check` on generated inputs until the time budget is spent; report the reproducer seed.
fn run(name: &str, mut make: impl FnMut(&mut Rng) -> Vec<u8>, check: impl Fn(&[u8])) -> u64 {
    let start = Instant::now();
    let mut runs = 0u64;
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    while start.elapsed() < budget() {
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut rng = Rng(seed | 1);
        // A panic in the generator (the `mvt` encoder has a few) is not the parser's: skip it.
        let Ok(input) = catch_unwind(AssertUnwindSafe(|| make(&mut rng))) else {
            continue;
        };
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            panic!(
                "{name}: panic on input from seed {seed:#x}: {:?}",
                String::from_utf8_lossy(&input)
            );
        }
        runs += 1;
    }
    runs
}

/// The JSON seeds of the `mapillary_replies` libFuzzer target (token, offset, handle,
/// `finish_upload`, entities, `image_ids`, rupload `backoff`).
const REPLY_SEEDS: &[&str] = &[
    include_str!("../../fuzz/seeds/mapillary_replies/token.json"),
    include_str!("../../fuzz/seeds/mapillary_replies/token_string_lifetime.json"),
    include_str!("../../fuzz/seeds/mapillary_replies/token_absurd_lifetime.json"),
    include_str!("../../fuzz/seeds/mapillary_replies/offset.json"),
    include_str!("../../fuzz/seeds/mapillary_replies/handle.json"),
    include_str!("../../fuzz/seeds/mapillary_replies/finish.json"),
    include_str!("../../fuzz/seeds/mapillary_replies/images.json"),
    include_str!("../../fuzz/seeds/mapillary_replies/image_ids.json"),
    include_str!("../../fuzz/seeds/mapillary_replies/backoff.json"),
    include_str!("../../fuzz/seeds/mapillary_replies/backoff_huge.json"),
];

#[test]
fn reply_parsers_never_panic_on_mutated_replies() {
    use shared::mapillary::replies::{
        creator_id, data_images, finish_cluster_id, image_ids, rupload_backoff, token_expiry, token_grant,
        upload_handle, upload_offset, MAX_SERVER_BACKOFF, MAX_TOKEN_LIFETIME_S,
    };
    let trees: Vec<Value> = REPLY_SEEDS
        .iter()
        .map(|s| serde_json::from_str(s).expect("seed is JSON"))
        .collect();
    let donors: Vec<Vec<u8>> = REPLY_SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect();
    let now = datetime!(2026-03-01 10:00 UTC);
    let runs = run(
        "replies",
        |rng| {
            let mut tree = trees[rng.below(trees.len())].clone();
            for _ in 0..=rng.below(3) {
                mutate_json(&mut tree, rng, 0);
            }
            let mut bytes = tree.to_string().into_bytes();
            if rng.chance(3) {
                mutate_bytes(&mut bytes, rng, &donors);
            }
            bytes
        },
        |input| {
            let _ = upload_offset(200, input);
            let _ = upload_handle(200, input);
            let Ok(v) = serde_json::from_slice::<Value>(input) else {
                return;
            };
            if let Ok(g) = token_grant(&v) {
                assert!(g.expires_in.is_none_or(|s| s <= MAX_TOKEN_LIFETIME_S));
                assert!(token_expiry(now, g.expires_in).is_ok());
            }
            let _ = finish_cluster_id(&v);
            let _ = data_images(&v);
            let _ = image_ids(&v);
            let _ = creator_id(&v);
            assert!(rupload_backoff(&v).is_none_or(|d| d <= MAX_SERVER_BACKOFF));
        },
    );
    assert!(runs > 100, "only {runs} runs");
}

#[test]
fn feed_parser_never_panics_on_mutated_replies() {
    let seeds = feed_seeds();
    let trees: Vec<Value> = seeds
        .iter()
        .map(|s| serde_json::from_str(s).expect("seed is JSON"))
        .collect();
    let donors: Vec<Vec<u8>> = seeds.iter().map(|s| s.clone().into_bytes()).collect();
    let policy = TrackingPolicy::default();
    let now = datetime!(2023-05-12 00:00 UTC);
    let runs = run(
        "feed",
        |rng| {
            let mut tree = trees[rng.below(trees.len())].clone();
            for _ in 0..=rng.below(3) {
                mutate_json(&mut tree, rng, 0);
            }
            let mut bytes = tree.to_string().into_bytes();
            if rng.chance(3) {
                mutate_bytes(&mut bytes, rng, &donors);
            }
            bytes
        },
        |input| {
            let body = String::from_utf8_lossy(input);
            if let Ok(page) = parse_page(&body) {
                // Whatever parses must also drive the tracker and the walk without a panic.
                let mut walk = FeedWalk::new(["151552211058876"], WalkLimits::default());
                let _ = walk.on_page(&page);
                for n in &page.nodes {
                    let upload = TrackedUpload::new(n.cluster_id.clone(), now);
                    let update = apply_node(&upload, n, now, &policy).expect("same cluster");
                    assert!(update.changed || update.transitions.is_empty());
                }
            }
        },
    );
    assert!(runs > 100, "only {runs} inputs in the time budget");
    eprintln!("feed parser: {runs} inputs");
}

/// Simulator-shaped tiles with random properties and geometry.
fn random_tile(rng: &mut Rng) -> Vec<u8> {
    let mut tile = Tile::new(4096);
    for name in ["image", "sequence", "overview", "other"] {
        if rng.chance(3) {
            continue;
        }
        let mut layer = tile.create_layer(name);
        for _ in 0..rng.below(4) {
            let kind = match rng.below(3) {
                0 => GeomType::Point,
                1 => GeomType::Linestring,
                _ => GeomType::Polygon,
            };
            // The encoder itself panics on an empty geometry: give each kind its minimum.
            let min = match kind {
                GeomType::Point => 1,
                GeomType::Linestring => 2,
                GeomType::Polygon => 3,
            };
            let mut enc = GeomEncoder::new(kind);
            for _ in 0..min + rng.below(5) {
                let x = rng.below(9000) as f64 - 2000.0;
                let y = rng.below(9000) as f64 - 2000.0;
                if enc.add_point(x, y).is_err() {
                    break;
                }
            }
            let Ok(geom) = enc.encode() else { continue };
            let mut f = layer.into_feature(geom);
            for key in [
                "id",
                "sequence_id",
                "captured_at",
                "compass_angle",
                "image_id",
                "is_pano",
                "creator_id",
                "organization_id",
            ] {
                match rng.below(8) {
                    0 => {}
                    1 => f.add_tag_string(key, "abc"),
                    2 => f.add_tag_string(key, "123"),
                    3 => f.add_tag_int(key, rng.next() as i64),
                    4 => f.add_tag_uint(key, rng.next()),
                    5 => f.add_tag_double(key, f64::from_bits(rng.next())),
                    6 => f.add_tag_float(key, f32::from_bits(rng.next() as u32)),
                    _ => f.add_tag_bool(key, rng.chance(2)),
                }
            }
            layer = f.into_layer();
        }
        let _ = tile.add_layer(layer);
    }
    tile.to_bytes().unwrap_or_default()
}

#[test]
fn tile_decoder_never_panics_on_mutated_tiles() {
    let mut rng = Rng(0xDEAD_BEEF);
    let donors: Vec<Vec<u8>> = (0..16).map(|_| random_tile(&mut rng)).collect();
    let tile = TileId::new(14, 8800, 5373).expect("tile");
    let runs = run(
        "tile",
        |rng| {
            let mut bytes = random_tile(rng);
            if rng.chance(2) {
                mutate_bytes(&mut bytes, rng, &donors);
            }
            bytes
        },
        |input| {
            if let Ok(decoded) = decode_coverage_tile(tile, input) {
                for p in decoded.images.iter().chain(&decoded.overview) {
                    assert!(!p.id.is_empty() && !p.sequence_id.is_empty());
                }
            }
        },
    );
    assert!(runs > 100, "only {runs} inputs in the time budget");
    eprintln!("tile decoder: {runs} inputs");
}

/// Writes the libFuzzer seed corpus for `coverage_tile` (run on demand:
/// `cargo test -p shared --test integration -- --ignored domain_poller_fuzz::write_fuzz_seeds`).
#[test]
#[ignore = "writes files under fuzz/seeds"]
fn write_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let tiles = dir.join("coverage_tile");
    std::fs::create_dir_all(&tiles).expect("mkdir");
    let mut rng = Rng(0x5EED);
    for k in 0..8 {
        std::fs::write(tiles.join(format!("random_{k}.mvt")), random_tile(&mut rng)).expect("write");
    }
    let feed = dir.join("feed_parser");
    std::fs::create_dir_all(&feed).expect("mkdir");
    for (k, s) in feed_seeds().iter().enumerate().skip(1) {
        std::fs::write(feed.join(format!("shape_{k}.json")), s).expect("write");
    }
    let unknown = json!({"data":{"fetch__User":{"id":"1","feed":{"page_info":{"end_cursor":"X","has_next_page":true},"nodes":[{"cluster_id":1,"status":"NOT_STARTED","tiler_status":"QUEUED","error_code":"E_1"}]}}}});
    std::fs::write(feed.join("unknown_values.json"), unknown.to_string()).expect("write");
}
