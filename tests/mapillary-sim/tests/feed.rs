//! GraphQL: getLatestActivity pagination and shapes, getNewSequences, token policy, errors.

use crate::common;

use common::*;
use mapillary_sim::defaults::{DEMO_USERNAME, WEB_APP_CLIENT_TOKEN};
use serde_json::{json, Value};

async fn clusters(h: &mapillary_sim::SimHandle, n: usize) -> Vec<String> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let key = format!("feed{}.zip", N.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
    let handle = upload(h, &key, zip_of(&jpegs(1, 0))).await;
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(
            body(finish(h, &handle, "zip").await).await["cluster_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        advance(h, 1).await; // distinct created_at_seconds
    }
    ids
}

fn ids_of(page: &Value) -> Vec<String> {
    nodes(page)
        .iter()
        .map(|n| n["cluster_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn feed_shape_is_exactly_the_documented_one() {
    let h = start().await;
    let c = clusters(&h, 1).await;
    let page = feed(&h, json!({"first": 10, "after": null, "hide_after": 14})).await;
    assert_eq!(page["extensions"], json!({"is_final": true}));
    assert_eq!(page["data"]["__typename"], "Query");
    let user = &page["data"]["fetch__User"];
    assert_eq!(user["__typename"], "User");
    assert_eq!(user["id"], mapillary_sim::defaults::DEMO_USER_ID);
    assert_eq!(user["feed"]["__typename"], "UserFeedConnection");
    assert_eq!(
        user["feed"]["page_info"],
        json!({"start_cursor": null, "end_cursor": null, "has_next_page": false, "has_previous_page": false})
    );
    let n = &nodes(&page)[0];
    let mut keys: Vec<&str> = n.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "__typename",
            "anonymization_status",
            "captured_at_seconds",
            "cluster_id",
            "created_at_seconds",
            "error_code",
            "image_id",
            "initial_processing_status",
            "item_count",
            "status",
            "thumb_url",
            "tiler_status",
            "timezone",
            "type"
        ]
    );
    assert_eq!(n["cluster_id"], c[0].as_str());
    assert_eq!(n["type"], "UPLOAD");
    assert_eq!(n["timezone"], "UTC");
    assert_eq!(n["__typename"], "ClusterLatestActivityItem");
    assert_eq!(
        n["created_at_seconds"],
        mapillary_sim::config::DEFAULT_FROZEN_START_MS / 1000
    );
}

#[tokio::test]
async fn pagination_is_newest_first_and_stable_under_inserts() {
    let h = start().await;
    let mut ids = clusters(&h, 5).await;
    ids.reverse(); // newest first
    let p1 = feed(&h, json!({"first": 2})).await;
    assert_eq!(ids_of(&p1), ids[..2]);
    let info = &p1["data"]["fetch__User"]["feed"]["page_info"];
    assert_eq!(info["has_next_page"], true);
    assert_eq!(info["has_previous_page"], false);
    assert!(info["start_cursor"].is_null());
    let cursor = info["end_cursor"].as_str().unwrap().to_string();
    assert!(cursor
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));

    // New uploads between page requests do not shift later pages.
    clusters(&h, 2).await;
    let p2 = feed(&h, json!({"first": 2, "after": cursor})).await;
    assert_eq!(ids_of(&p2), ids[2..4]);
    assert_eq!(
        p2["data"]["fetch__User"]["feed"]["page_info"]["has_previous_page"],
        true
    );
    let c2 = p2["data"]["fetch__User"]["feed"]["page_info"]["end_cursor"]
        .as_str()
        .unwrap()
        .to_string();
    let p3 = feed(&h, json!({"first": 2, "after": c2})).await;
    assert_eq!(ids_of(&p3), ids[4..]);
    let last = &p3["data"]["fetch__User"]["feed"]["page_info"];
    assert_eq!(last["has_next_page"], false);
    assert!(last["end_cursor"].is_null());
}

#[tokio::test]
async fn first_defaults_to_50_and_caps_at_200() {
    let h = start().await;
    let handle = upload(&h, "many.zip", zip_of(&jpegs(1, 0))).await;
    for _ in 0..205 {
        finish(&h, &handle, "zip").await;
    }
    assert_eq!(nodes(&feed(&h, json!({})).await).len(), 50);
    let big = feed(&h, json!({"first": 1000})).await;
    assert_eq!(nodes(&big).len(), 200);
    assert_eq!(
        big["data"]["fetch__User"]["feed"]["page_info"]["has_next_page"],
        true
    );
}

#[tokio::test]
async fn hide_after_omits_old_failed_clusters() {
    let h = start().await;
    short_stages(&h).await;
    admin(
        &h,
        "/plans/next",
        json!({"fail": {"stage": 1, "error_code": "E"}}),
    )
    .await;
    let ids = clusters(&h, 2).await; // first fails, second succeeds
    advance(&h, 3 * 86400).await;
    assert_eq!(ids_of(&feed(&h, json!({"hide_after": 14})).await).len(), 2);
    let visible = ids_of(&feed(&h, json!({"hide_after": 2})).await);
    assert_eq!(visible, [ids[1].clone()]);
    assert_eq!(ids_of(&feed(&h, json!({})).await).len(), 2);
}

#[tokio::test]
async fn errors_unknown_documents_cursors_and_users() {
    let h = start().await;
    let r = graphql(&h, FEED_TOKEN, "query somethingElse { x }", json!({})).await;
    assert_eq!(r.status(), 400);
    assert!(body(r).await["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Unknown"));
    let r = graphql(
        &h,
        FEED_TOKEN,
        FEED_DOC,
        json!({"id": mapillary_sim::defaults::DEMO_USER_ID, "after": "garbage!"}),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert!(body(r).await["error"].is_object());
    let r = graphql(&h, FEED_TOKEN, FEED_DOC, json!({"id": "999"})).await;
    assert_eq!(body(r).await["data"]["fetch__User"], Value::Null);
    let r = client()
        .get(format!("{}/graphql", h.graph_url()))
        .query(&[("doc", FEED_DOC)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn post_with_operation_name_and_web_app_policy() {
    let h = start().await;
    admin(&h, "/config", json!({"graphql_policy": "web_app_only"})).await;
    let r = graphql(&h, TOKEN, FEED_DOC, json!({"id": "1"})).await;
    assert_eq!(r.status(), 401);
    let r = client()
        .post(format!("{}/graphql", h.graph_url()))
        .header("Authorization", auth(WEB_APP_CLIENT_TOKEN))
        .json(&json!({"doc": NEW_SEQ_DOC, "variables": {"username": DEMO_USERNAME}, "operationName": "getNewSequences"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        body(r).await["data"]["user_by_username"]["new_sequences"]["sequence_keys"],
        json!([])
    );
}

#[tokio::test]
async fn new_sequences_geojson_is_a_string_with_string_coordinates() {
    let h = start().await;
    short_stages(&h).await;
    let empty = body(graphql(&h, FEED_TOKEN, NEW_SEQ_DOC, json!({"username": DEMO_USERNAME})).await).await;
    let ns = &empty["data"]["user_by_username"]["new_sequences"];
    assert_eq!(ns["geojson"], r#"{"features":[],"type":"FeatureCollection"}"#);
    assert_eq!(ns["__typename"], "MLYNewSequencesData");

    let c = zip_cluster(&h, "ns.zip", &jpegs(3, 0)).await;
    advance(&h, 20).await;
    let v = body(graphql(&h, FEED_TOKEN, NEW_SEQ_DOC, json!({"username": DEMO_USERNAME})).await).await;
    assert_eq!(v["extensions"]["is_final"], true);
    let u = &v["data"]["user_by_username"];
    assert_eq!(u["__typename"], "User");
    let seq = cluster_info(&h, &c).await["sequence_ids"][0].clone();
    assert_eq!(u["new_sequences"]["sequence_keys"], json!([seq]));
    let gj: Value = serde_json::from_str(u["new_sequences"]["geojson"].as_str().unwrap()).unwrap();
    let f = &gj["features"][0];
    assert_eq!(f["id"], Value::Null);
    assert_eq!(f["geometry"]["coordinates"], json!(["-0.5591", "50.8966"]));
    assert!(f["properties"]["creator_id"].is_u64());
    assert!(f["properties"]["id"].is_u64());
    assert_eq!(f["properties"]["sequence_id"], seq);
    assert_eq!(f["properties"]["captured_at"], 1_714_554_000_000i64);
    assert_eq!(f["properties"]["is_pano"], false);
    assert!(f["properties"]["compass_angle"].is_number());

    admin(&h, "/config", json!({"new_sequences_max": 0})).await;
    let r = graphql(&h, FEED_TOKEN, NEW_SEQ_DOC, json!({"username": DEMO_USERNAME})).await;
    assert_eq!(body(r).await["error"]["code"], 1);
    let nobody = body(graphql(&h, FEED_TOKEN, NEW_SEQ_DOC, json!({"username": "ghost"})).await).await;
    assert_eq!(nobody["data"]["user_by_username"], Value::Null);
}
