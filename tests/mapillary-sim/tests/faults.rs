//! Every fault kind fires, replies with its documented shape, and is counted.

use crate::common;

use std::time::Instant;

use common::*;
use serde_json::{json, Value};

async fn rule(h: &mapillary_sim::SimHandle, spec: Value) -> u64 {
    admin(h, "/faults", spec).await["id"].as_u64().unwrap()
}

async fn hits(h: &mapillary_sim::SimHandle, id: u64) -> u64 {
    let all = admin_get(h, "/faults").await;
    all.as_array().unwrap().iter().find(|r| r["id"] == id).unwrap()["hits"]
        .as_u64()
        .unwrap()
}

async fn offset_req(h: &mapillary_sim::SimHandle) -> reqwest::Response {
    client()
        .get(format!("{}/f.zip", h.upload_url()))
        .header("Authorization", auth(TOKEN))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn rate_limit_variants() {
    let h = start().await;
    let a = rule(
        &h,
        json!({"path": "/rupload/*", "times": 1, "action": {"kind": "rate_limited"}}),
    )
    .await;
    let r = offset_req(&h).await;
    assert_eq!(r.status(), 429);
    let b = body(r).await;
    assert_eq!(b["backoff"], 13000);
    assert_eq!(b["debug_info"]["type"], "RequestRateLimitedError");
    assert_eq!(b["debug_info"]["retriable"], false);
    assert_eq!(offset_req(&h).await.status(), 200, "times: 1");
    assert_eq!(hits(&h, a).await, 1);

    rule(&h, json!({"path": "/rupload/*", "times": 1, "action": {"kind": "rate_limited", "status": 400, "backoff": "soon"}})).await;
    let r = offset_req(&h).await;
    assert_eq!(r.status(), 400);
    assert_eq!(body(r).await["backoff"], "soon");

    rule(
        &h,
        json!({"path": "/rupload/*", "times": 1, "action": {"kind": "bare429", "retry_after": "7"}}),
    )
    .await;
    let r = offset_req(&h).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    assert!(r.text().await.unwrap().is_empty());
    rule(
        &h,
        json!({"path": "/rupload/*", "times": 1, "action": {"kind": "bare429"}}),
    )
    .await;
    assert!(offset_req(&h).await.headers().get("retry-after").is_none());
}

#[tokio::test]
async fn server_errors_with_and_without_retry_after() {
    let h = start().await;
    rule(&h, json!({"path": "/rupload/*", "times": 1, "action": {"kind": "server_error", "status": 502, "retry_after": "3"}})).await;
    let r = offset_req(&h).await;
    assert_eq!(
        (r.status().as_u16(), r.headers()["retry-after"].to_str().unwrap()),
        (502, "3")
    );
    rule(&h, json!({"path": "/rupload/*", "times": 1, "action": {"kind": "server_error", "retry_after_date_in": 30}})).await;
    let r = offset_req(&h).await;
    assert_eq!(r.status(), 503);
    let date = r.headers()["retry-after"].to_str().unwrap().to_string();
    assert!(date.ends_with(" GMT") && date.contains(','), "{date}");
    rule(
        &h,
        json!({"path": "/rupload/*", "times": 1, "action": {"kind": "server_error", "status": 500}}),
    )
    .await;
    let r = offset_req(&h).await;
    assert_eq!(r.status(), 500);
    assert!(r.headers().get("retry-after").is_none());
}

#[tokio::test]
async fn forced_412_401_and_graph_rate_limit() {
    let h = start().await;
    rule(
        &h,
        json!({"method": "POST", "path": "/rupload/*", "times": 1, "action": {"kind": "offset_invalid"}}),
    )
    .await;
    let r = post_bytes(&h, "x.zip", 0, vec![1, 2, 3]).await;
    assert_eq!(r.status(), 412);
    assert_eq!(body(r).await["debug_info"]["type"], "OffsetInvalidError");
    assert_eq!(get_offset(&h, "x.zip").await, 0);

    rule(
        &h,
        json!({"path": "/rupload/*", "times": 1, "action": {"kind": "unauthorized"}}),
    )
    .await;
    let r = offset_req(&h).await;
    assert_eq!(r.status(), 401);
    assert_eq!(body(r).await["debug_info"]["type"], "NotAuthorizedError");
    rule(
        &h,
        json!({"path": "/graph/me", "times": 1, "action": {"kind": "unauthorized"}}),
    )
    .await;
    let r = client()
        .get(format!("{}/me", h.graph_url()))
        .header("Authorization", auth(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(body(r).await["error"]["code"], 190);

    rule(
        &h,
        json!({"path": "/graph/*", "times": 1, "action": {"kind": "graph_rate_limit"}}),
    )
    .await;
    let r = client()
        .get(format!("{}/me", h.graph_url()))
        .header("Authorization", auth(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let e = body(r).await;
    assert_eq!(
        (e["error"]["code"].clone(), e["error"]["is_transient"].clone()),
        (json!(4), json!(true))
    );
}

#[tokio::test]
async fn latency_every_probability_and_user_filters() {
    let h = start().await;
    let lat = rule(
        &h,
        json!({"path": "/rupload/*", "times": 1, "action": {"kind": "latency", "ms": 120}}),
    )
    .await;
    let t = Instant::now();
    assert_eq!(offset_req(&h).await.status(), 200);
    assert!(t.elapsed().as_millis() >= 120);
    assert_eq!(hits(&h, lat).await, 1);

    let every = rule(
        &h,
        json!({"path": "/rupload/*", "every": 2, "action": {"kind": "server_error"}}),
    )
    .await;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(offset_req(&h).await.status().as_u16());
        }
        v
    };
    assert_eq!(statuses, [200, 503, 200, 503]);
    assert_eq!(hits(&h, every).await, 2);
    let r = client()
        .delete(format!("{}/faults/{every}", h.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let p = rule(
        &h,
        json!({"path": "/rupload/*", "probability": 0.5, "seed": 3, "action": {"kind": "server_error"}}),
    )
    .await;
    let mut fired = 0;
    for _ in 0..40 {
        if offset_req(&h).await.status() == 503 {
            fired += 1;
        }
    }
    assert!((8..=32).contains(&fired), "{fired}");
    assert_eq!(hits(&h, p).await, fired);
    client()
        .delete(format!("{}/faults", h.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(admin_get(&h, "/faults").await, json!([]));

    // Only for one user.
    let u = admin(&h, "/users", json!({"username": "bob"})).await;
    rule(
        &h,
        json!({"path": "/rupload/*", "user": "bob", "action": {"kind": "unauthorized"}}),
    )
    .await;
    assert_eq!(offset_req(&h).await.status(), 200);
    let r = client()
        .get(format!("{}/f.zip", h.upload_url()))
        .header("Authorization", auth(u["access_token"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn ambiguous_finish_after_vs_before() {
    let h = start().await;
    let handle = upload(&h, "amb.zip", zip_of(&jpegs(1, 0))).await;
    rule(
        &h,
        json!({"path": "/graph/finish_upload", "times": 1, "action": {"kind": "server_error"}}),
    )
    .await;
    assert_eq!(finish(&h, &handle, "zip").await.status(), 503);
    assert_eq!(
        admin_get(&h, "/clusters").await.as_array().unwrap().len(),
        0,
        "failed before creating"
    );

    rule(&h, json!({"path": "/graph/finish_upload", "times": 1, "phase": "after", "action": {"kind": "server_error"}})).await;
    assert_eq!(finish(&h, &handle, "zip").await.status(), 503);
    assert_eq!(
        admin_get(&h, "/clusters").await.as_array().unwrap().len(),
        1,
        "created, then failed"
    );

    rule(&h, json!({"path": "/graph/finish_upload", "times": 1, "phase": "after", "action": {"kind": "drop_connection"}})).await;
    let r = client()
        .post(format!("{}/finish_upload", h.graph_url()))
        .header("Authorization", auth(TOKEN))
        .json(&json!({"file_handle": handle, "file_type": "zip"}))
        .send()
        .await;
    assert!(r.is_err());
    assert_eq!(admin_get(&h, "/clusters").await.as_array().unwrap().len(), 2);
    let r = client()
        .get(format!("{}/me", h.graph_url()))
        .header("Authorization", auth(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "server keeps serving after a dropped connection");
}

#[tokio::test]
async fn feed_drift_faults() {
    let h = start().await;
    zip_cluster(&h, "drift.zip", &jpegs(1, 0)).await;
    rule(&h, json!({"path": "/graph/graphql", "times": 1, "action": {"kind": "set_node_field", "field": "status", "value": "QUEUED_FOR_LATER"}})).await;
    assert_eq!(nodes(&feed(&h, json!({})).await)[0]["status"], "QUEUED_FOR_LATER");
    rule(&h, json!({"path": "/graph/graphql", "times": 1, "action": {"kind": "remove_node_field", "field": "image_id"}})).await;
    assert!(nodes(&feed(&h, json!({})).await)[0].get("image_id").is_none());
    rule(&h, json!({"path": "/graph/graphql", "times": 1, "action": {"kind": "rename_node_field", "from": "error_code", "to": "errorCode"}})).await;
    assert_eq!(nodes(&feed(&h, json!({})).await)[0]["errorCode"], "UNSET");
    rule(
        &h,
        json!({"path": "/graph/graphql", "times": 1, "action": {"kind": "graphql_error"}}),
    )
    .await;
    let r = graphql(
        &h,
        FEED_TOKEN,
        FEED_DOC,
        json!({"id": mapillary_sim::defaults::DEMO_USER_ID}),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert!(body(r).await["error"]["message"].is_string());
    rule(
        &h,
        json!({"path": "/graph/graphql", "times": 1, "action": {"kind": "reduce_data"}}),
    )
    .await;
    let r = graphql(
        &h,
        FEED_TOKEN,
        FEED_DOC,
        json!({"id": mapillary_sim::defaults::DEMO_USER_ID}),
    )
    .await;
    assert_eq!(body(r).await["error"]["code"], 1);
    assert_eq!(
        nodes(&feed(&h, json!({})).await)[0]["status"],
        "IN_PROGRESS",
        "rules were one-shot"
    );
}

#[tokio::test]
async fn token_endpoint_and_generic_status_faults() {
    let h = start().await;
    rule(
        &h,
        json!({"path": "/graph/token", "times": 1, "action": {"kind": "status", "status": 418,
        "body": {"error": {"message": "teapot"}}, "headers": [["x-sim", "1"]]}}),
    )
    .await;
    let r = client()
        .post(format!("{}/token", h.graph_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 418);
    assert_eq!(r.headers()["x-sim"], "1");
    let r = client()
        .post(format!("{}/faults", h.admin_url()))
        .json(&json!({"path": "/x", "action": {"kind": "nope"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}
