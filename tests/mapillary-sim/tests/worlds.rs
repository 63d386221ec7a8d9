//! Named worlds: selection (config, admin API, binary) and each world behaving as named.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use mapillary_sim::defaults::{APP_ID, CLIENT_SECRET, DEMO_USERNAME, DEMO_USER_ID, WEB_APP_CLIENT_TOKEN};
use mapillary_sim::{GraphqlPolicy, Settings, SimConfig, SimHandle, World, DEFAULT_WORLD};
use serde_json::{json, Value};

#[tokio::test]
async fn default_world_is_seed_2022_and_worlds_switch_at_runtime() {
    assert_eq!(DEFAULT_WORLD, World::Seed2022);
    assert_eq!(
        SimConfig::default().settings,
        Settings::for_world(World::Seed2022)
    );
    let h = start().await;
    let v = admin_get(&h, "/world").await;
    assert_eq!(v["world"], "seed-2022");
    assert_eq!(
        v["worlds"],
        json!([
            "lenient",
            "seed-2022",
            "oauth-upload-refused",
            "partial-bytes-dropped",
            "refresh-revokes",
            "feed-drift",
            "feed-gone"
        ])
    );

    // A world sets only the world switches: the stage durations set before survive it.
    short_stages(&h).await;
    let v = admin(&h, "/world", json!({"world": "oauth-upload-refused"})).await;
    assert_eq!(v["world"], "oauth-upload-refused");
    let s = &v["settings"];
    assert_eq!(s["oauth_tokens_can_upload"], false);
    assert_eq!(s["graphql_policy"], "web_app_only");
    assert_eq!(s["rupload_require_offset"], true);
    assert_eq!(s["default_plan"]["stage_seconds"], json!([10, 10, 10, 10]));
    assert_eq!(admin_get(&h, "/config").await["oauth_tokens_can_upload"], false);

    // A /_sim/config patch that mixes worlds matches no preset.
    admin(&h, "/config", json!({"keep_prefix_on_drop": false})).await;
    assert_eq!(admin_get(&h, "/world").await["world"], Value::Null);
    let v = admin(&h, "/world", json!({"world": "partial-bytes-dropped"})).await;
    assert_eq!(v["world"], "partial-bytes-dropped");
    assert_eq!(v["settings"]["oauth_tokens_can_upload"], true);

    let r = client()
        .post(format!("{}/world", h.admin_url()))
        .json(&json!({"world": "mars"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let msg = body(r).await["error"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("\"mars\"") && msg.contains("seed-2022"), "{msg}");
    assert_eq!(admin_get(&h, "/world").await["world"], "partial-bytes-dropped");
}

#[test]
fn binary_takes_a_world_and_refuses_unknown_ones() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mapillary-sim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--world",
            "feed-drift",
            "--stage-seconds",
            "1,2,3,4",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("base URL line");
    let base = line.trim().to_string();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let v: Value = rt.block_on(async {
        reqwest::get(format!("{base}/_sim/world"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("wait");
    assert_eq!(v["world"], "feed-drift", "{v}");
    assert_eq!(v["settings"]["feed_drift"], true);
    assert_eq!(
        v["settings"]["default_plan"]["stage_seconds"],
        json!([1, 2, 3, 4])
    );
    assert!(status.success(), "{status:?}");

    let out = Command::new(env!("CARGO_BIN_EXE_mapillary-sim"))
        .args(["--listen", "127.0.0.1:0", "--world", "strictest"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown world \"strictest\"") && err.contains("feed-gone"),
        "{err}"
    );
}

#[test]
fn every_world_is_seed_2022_plus_its_one_difference() {
    let seed = Settings::for_world(World::Seed2022);
    assert_eq!(seed.graphql_policy, GraphqlPolicy::WebAppOnly);
    assert!(seed.oauth_tokens_can_upload && seed.keep_prefix_on_drop && !seed.refresh_revokes_old);
    assert_eq!(seed, Settings::default(), "seed-2022 is the default world");
    let lenient = Settings::for_world(World::Lenient);
    assert_ne!(lenient, seed);
    for w in World::ALL {
        let s = Settings::for_world(w);
        assert_eq!(s.world(), Some(w), "{w}");
        assert_eq!(w.name().parse::<World>(), Ok(w));
        let mut diff = Vec::new();
        let base = if w == World::Lenient { &lenient } else { &seed };
        let a = serde_json::to_value(&s).unwrap();
        let b = serde_json::to_value(base).unwrap();
        for (k, v) in a.as_object().unwrap() {
            if b[k] != *v {
                diff.push(k.clone());
            }
        }
        let want: &[&str] = match w {
            World::Lenient | World::Seed2022 => &[],
            World::OauthUploadRefused => &["oauth_tokens_can_upload"],
            World::PartialBytesDropped => &["keep_prefix_on_drop"],
            World::RefreshRevokes => &["refresh_revokes_old"],
            World::FeedDrift => &["feed_drift"],
            World::FeedGone => &["graphql_documents_gone"],
        };
        assert_eq!(diff, want, "{w}");
    }
}

// --------------------------------------------------------------------------------- partial-bytes-dropped

/// Puts `n` bytes under `key`, then sends a POST of `len` more bytes that breaks off after `cut` of them;
/// returns the offset the server reports afterwards.
async fn offset_after_a_broken_post(h: &SimHandle, key: &str, stored: usize, cut: u64) -> u64 {
    if stored > 0 {
        let r = post_bytes(h, key, 0, vec![3; stored]).await;
        assert_eq!(r.status(), 200);
    }
    admin(
        h,
        "/faults",
        json!({"path": "/rupload/*", "method": "POST", "times": 1,
               "action": {"kind": "drop_after_bytes", "bytes": cut}}),
    )
    .await;
    let dropped = client()
        .post(format!("{}/{key}", h.upload_url()))
        .header("Authorization", auth(TOKEN))
        .header("Offset", stored.to_string())
        .header("X-Entity-Name", key)
        .body(vec![4u8; 50_000])
        .send()
        .await;
    assert!(dropped.is_err(), "the connection is dropped without a reply");
    get_offset(h, key).await
}

#[tokio::test]
async fn partial_bytes_dropped_stores_nothing_of_an_incomplete_post() {
    let h = start_world(World::PartialBytesDropped).await;
    assert_eq!(offset_after_a_broken_post(&h, "p0.zip", 0, 20_000).await, 0);
    assert_eq!(
        offset_after_a_broken_post(&h, "p1.zip", 1000, 20_000).await,
        1000,
        "the offset is back at the broken POST's start"
    );
    let log = admin_get(&h, "/requests").await;
    let broken: Vec<&Value> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["method"] == "POST" && e["status"].is_null())
        .collect();
    assert_eq!(broken.len(), 2);
    assert!(broken
        .iter()
        .all(|e| e["detail"]["bytes_received"] == 20_000 && e["detail"]["complete"] == false));

    // The seed world keeps the received prefix.
    let seed = start_world(World::Seed2022).await;
    assert_eq!(
        offset_after_a_broken_post(&seed, "p1.zip", 1000, 20_000).await,
        21_000
    );
}

// --------------------------------------------------------------------------------------- refresh-revokes

async fn refresh(h: &SimHandle, token: &str) -> String {
    let r = client()
        .post(format!("{}/token", h.graph_url()))
        .header("Authorization", auth(CLIENT_SECRET))
        .form(&[
            ("grant_type", "refresh_token"),
            ("client_id", APP_ID),
            ("refresh_token", token),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    body(r).await["access_token"].as_str().unwrap().to_string()
}

async fn me(h: &SimHandle, token: &str) -> (u16, Value) {
    let r = client()
        .get(format!("{}/me?fields=id,username", h.graph_url()))
        .header("Authorization", auth(token))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, body(r).await)
}

#[tokio::test]
async fn refresh_revokes_makes_the_old_token_fail_at_once() {
    let h = start_world(World::RefreshRevokes).await;
    let old = oauth_token(&h, DEMO_USERNAME).await;
    let new = refresh(&h, &old).await;
    assert_ne!(new, old);
    let (s, b) = me(&h, &old).await;
    assert_eq!(s, 401, "{b}");
    assert_eq!(b["error"]["code"], 190);
    assert!(
        b["error"]["message"].as_str().unwrap().contains("invalidated"),
        "{b}"
    );
    let r = client()
        .get(format!("{}/k.zip", h.upload_url()))
        .header("Authorization", auth(&old))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "rupload refuses it too");
    assert_eq!(me(&h, &new).await.0, 200);

    // seed-2022: the old token stays valid until it expires.
    let seed = start_world(World::Seed2022).await;
    let old = oauth_token(&seed, DEMO_USERNAME).await;
    let new = refresh(&seed, &old).await;
    assert_eq!(me(&seed, &old).await.0, 200);
    assert_eq!(me(&seed, &new).await.0, 200);
}

// ------------------------------------------------------------------------------------------- feed-drift

async fn web_feed(h: &SimHandle, vars: Value) -> Value {
    let mut v = json!({"id": DEMO_USER_ID});
    if let (Some(a), Some(b)) = (v.as_object_mut(), vars.as_object()) {
        a.extend(b.clone());
    }
    let r = graphql(h, WEB_APP_CLIENT_TOKEN, FEED_DOC, v).await;
    assert_eq!(r.status(), 200);
    body(r).await
}

fn stages(n: &Value) -> Vec<Value> {
    [
        "status",
        "initial_processing_status",
        "anonymization_status",
        "tiler_status",
    ]
    .iter()
    .map(|f| n[*f].clone())
    .collect()
}

#[tokio::test]
async fn feed_drift_answers_in_the_drifted_shapes() {
    let h = start_world(World::FeedDrift).await;
    short_stages(&h).await;
    admin(
        &h,
        "/plans/next",
        json!({"fail": {"stage": 2, "error_code": "E_DRIFT"}}),
    )
    .await;
    let failing = {
        let handle = upload_as(&h, TOKEN, "a.zip", tools_zip(2, 200)).await;
        body(finish_as(&h, TOKEN, json!({"file_handle": handle, "file_type": "zip"})).await).await
            ["cluster_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    advance(&h, 1).await;
    let good = {
        let handle = upload_as(&h, TOKEN, "b.zip", tools_zip(3, 300)).await;
        body(finish_as(&h, TOKEN, json!({"file_handle": handle, "file_type": "zip"})).await).await
            ["cluster_id"]
            .as_str()
            .unwrap()
            .to_string()
    };

    let v = web_feed(&h, json!({"first": 50})).await;
    // GraphQL errors beside valid data.
    assert!(v["data"]["fetch__User"]["feed"]["nodes"].is_array(), "{v}");
    let errors = v["errors"].as_array().expect("errors beside data");
    assert_eq!(errors.len(), 1, "{v}");
    assert!(errors[0]["message"].as_str().unwrap().contains("cluster_id"));
    let ns = nodes(&v);
    assert_eq!(ns.len(), 3, "two clusters and one node without cluster_id: {v}");
    assert_eq!(ns[0]["cluster_id"], good.as_str(), "newest first");
    assert!(
        ns[1].get("cluster_id").is_none(),
        "a node without cluster_id among good ones: {}",
        ns[1]
    );
    assert_eq!(
        errors[0]["path"],
        json!(["fetch__User", "feed", "nodes", 1, "cluster_id"])
    );
    assert_eq!(ns[2]["cluster_id"], failing.as_str());
    for n in [&ns[0], &ns[2]] {
        assert!(
            n["created_at_seconds"].is_string(),
            "created_at_seconds as a string: {n}"
        );
        assert_eq!(
            stages(n),
            vec![
                json!("IN_PROGRESS"),
                json!("NOT_STARTED"),
                Value::Null,
                Value::Null
            ],
            "{n}"
        );
    }
    let created: i64 = ns[0]["created_at_seconds"].as_str().unwrap().parse().unwrap();
    assert_eq!(created, 1_714_557_601, "the string holds the same number");

    // Later: the failing cluster shows FAILURE at stage 2, the good one progresses and finishes.
    advance(&h, 25).await;
    let ns = nodes(&web_feed(&h, json!({})).await);
    let by_id = |id: &str| ns.iter().find(|n| n["cluster_id"] == id).cloned().expect("node");
    let f = by_id(&failing);
    assert_eq!(
        stages(&f),
        vec![
            json!("FINISHED"),
            json!("FAILURE"),
            json!("NOT_STARTED"),
            Value::Null
        ],
        "{f}"
    );
    assert_eq!(f["error_code"], "E_DRIFT");
    assert_eq!(
        stages(&by_id(&good)),
        vec![
            json!("FINISHED"),
            json!("FINISHED"),
            json!("IN_PROGRESS"),
            json!("NOT_STARTED")
        ]
    );
    advance(&h, 100).await;
    let g = nodes(&web_feed(&h, json!({})).await)
        .into_iter()
        .find(|n| n["cluster_id"] == good.as_str())
        .unwrap();
    assert_eq!(
        stages(&g),
        vec![json!("FINISHED"); 4],
        "a drifted upload still finishes"
    );
    assert_eq!(g["item_count"], 3);
    assert!(g["image_id"].is_string());

    // Pagination: one good node per page; the last page has a null cursor.
    let p1 = web_feed(&h, json!({"first": 1})).await;
    let info = &p1["data"]["fetch__User"]["feed"]["page_info"];
    assert_eq!(info["has_next_page"], true);
    let cursor = info["end_cursor"]
        .as_str()
        .expect("cursor while more pages")
        .to_string();
    let p2 = web_feed(&h, json!({"first": 1, "after": cursor})).await;
    let info = &p2["data"]["fetch__User"]["feed"]["page_info"];
    assert_eq!(info["has_next_page"], false);
    assert_eq!(info["end_cursor"], Value::Null, "null cursor on the last page");
    let ids: Vec<Value> = [&p1, &p2]
        .iter()
        .flat_map(|p| nodes(p))
        .filter_map(|n| n.get("cluster_id").cloned())
        .collect();
    assert_eq!(ids, vec![json!(good), json!(failing)]);

    // The seed world answers the same feed in the documented shape.
    let seed = start_world(World::Seed2022).await;
    let handle = upload_as(&seed, TOKEN, "b.zip", tools_zip(1, 400)).await;
    finish_as(&seed, TOKEN, json!({"file_handle": handle, "file_type": "zip"})).await;
    let v = web_feed(&seed, json!({})).await;
    assert!(v.get("errors").is_none(), "{v}");
    let ns = nodes(&v);
    assert_eq!(ns.len(), 1);
    assert!(ns[0]["created_at_seconds"].is_i64());
    assert_eq!(stages(&ns[0]), vec![json!("IN_PROGRESS"); 4]);
}

// -------------------------------------------------------------------------------------------- feed-gone

#[tokio::test]
async fn feed_gone_answers_persisted_query_not_found() {
    let h = start_world(World::FeedGone).await;
    short_stages(&h).await;
    let handle = upload_as(&h, TOKEN, "g.zip", tools_zip(2, 500)).await;
    let r = finish_as(&h, TOKEN, json!({"file_handle": handle, "file_type": "zip"})).await;
    let cluster = body(r).await["cluster_id"].as_str().unwrap().to_string();
    for (doc, vars) in [
        (FEED_DOC, json!({"id": DEMO_USER_ID})),
        (NEW_SEQ_DOC, json!({"username": DEMO_USERNAME})),
    ] {
        let r = graphql(&h, WEB_APP_CLIENT_TOKEN, doc, vars.clone()).await;
        assert_eq!(r.status(), 200);
        let v = body(r).await;
        assert_eq!(
            v,
            json!({"errors": [{"message": "PersistedQueryNotFound",
                               "extensions": {"code": "PERSISTED_QUERY_NOT_FOUND"}}]}),
            "no data, only the error"
        );
        // The token rule still comes first.
        assert_eq!(graphql(&h, TOKEN, doc, vars).await.status(), 401);
    }
    // Plan A still works: the upload is processed and its images are readable through the graph API.
    advance(&h, 40).await;
    let seq = cluster_info(&h, &cluster).await["sequence_ids"][0]
        .as_str()
        .expect("sequence once processed")
        .to_string();
    let r = client()
        .get(format!("{}/image_ids?sequence_id={seq}", h.graph_url()))
        .header("Authorization", auth(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(body(r).await["data"].as_array().map(Vec::len), Some(2));
}

// ------------------------------------------------------------------------------------------- seed-2022

#[tokio::test]
async fn seed_2022_accepts_mapillary_tools_shaped_uploads() {
    let h = start_world(World::Seed2022).await;
    short_stages(&h).await;
    // A zip as `mapillary_tools zip` writes it.
    let handle = upload_as(&h, TOKEN, "mly_tools_x.zip", tools_zip(4, 600)).await;
    let r = finish_as(&h, TOKEN, json!({"file_handle": handle, "file_type": "zip"})).await;
    assert_eq!(r.status(), 200);
    let zip_cluster = body(r).await["cluster_id"].as_str().unwrap().to_string();
    // Per-image uploads with a bundle manifest, as mapillary_tools 0.14 uploads image directories.
    let mut handles = Vec::new();
    for (i, img) in described_jpegs(3, 700).into_iter().enumerate() {
        handles.push(upload_as(&h, TOKEN, &format!("mly_tools_{i}.jpg"), img).await);
    }
    let manifest = json!({"image_handles": handles, "upload_type": "images", "version": "1"}).to_string();
    let m = upload_as(&h, TOKEN, "uuid_0123.json", manifest.into_bytes()).await;
    let r = finish_as(
        &h,
        TOKEN,
        json!({"file_handle": m, "file_type": "mly_bundle_manifest"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let bundle_cluster = body(r).await["cluster_id"].as_str().unwrap().to_string();

    advance(&h, 41).await;
    let ns = nodes(&web_feed(&h, json!({})).await);
    for (id, n) in [(&zip_cluster, 4), (&bundle_cluster, 3)] {
        let node = ns
            .iter()
            .find(|x| x["cluster_id"] == id.as_str())
            .expect("in the feed");
        assert_eq!(stages(node), vec![json!("FINISHED"); 4], "{node}");
        assert_eq!(node["item_count"], n);
        let c = cluster_info(&h, id).await;
        assert_eq!(c["rejected"], json!([]), "{c}");
        assert_eq!(c["pending_images"][0]["meta"]["source"], "description");
    }
}
