//! rupload: offsets, 412, chunked bodies, handles, interrupted connections.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[tokio::test]
async fn new_key_has_offset_zero_and_appends_with_offsets() {
    let h = start().await;
    assert_eq!(get_offset(&h, "mly_tools_a.zip").await, 0);
    let bytes = data(5000);
    let r = post_bytes(&h, "mly_tools_a.zip", 0, bytes[..2000].to_vec()).await;
    assert_eq!(r.status(), 200);
    let h1 = body(r).await["h"].as_str().unwrap().to_string();
    assert_eq!(get_offset(&h, "mly_tools_a.zip").await, 2000);

    // Wrong offset → 412 OffsetInvalidError, nothing stored.
    let r = post_bytes(&h, "mly_tools_a.zip", 0, bytes[2000..].to_vec()).await;
    assert_eq!(r.status(), 412);
    let b = body(r).await;
    assert_eq!(b["debug_info"]["type"], "OffsetInvalidError");
    assert_eq!(b["debug_info"]["retriable"], true);
    assert_eq!(get_offset(&h, "mly_tools_a.zip").await, 2000);

    let r = post_bytes(&h, "mly_tools_a.zip", 2000, bytes[2000..].to_vec()).await;
    assert_eq!(body(r).await["h"], h1.as_str(), "same key → same handle");
    // Already complete: empty body with Offset = size still returns the handle.
    let r = post_bytes(&h, "mly_tools_a.zip", 5000, Vec::new()).await;
    assert_eq!(body(r).await["h"], h1.as_str());

    let s = admin_get(&h, "/sessions/mly_tools_a.zip").await;
    assert_eq!(s["bytes_stored"], 5000);
    assert_eq!(s["sha256"], sha(&bytes));
    assert_eq!(s["completed"], true);
    let stored = client()
        .get(format!("{}/sessions/mly_tools_a.zip/bytes", h.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(stored.bytes().await.unwrap().to_vec(), bytes);
    assert_eq!(admin_get(&h, "/sessions").await.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn chunked_streaming_body_is_stored_whole() {
    let h = start().await;
    let bytes = data(300_000);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = bytes.chunks(2097).map(|c| Ok(c.to_vec())).collect();
    let r = client()
        .post(format!("{}/chunked.zip", h.upload_url()))
        .header("Authorization", auth(TOKEN))
        .header("Offset", "0")
        .header("X-Entity-Name", "chunked.zip")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(body(r).await["h"].is_string());
    let s = admin_get(&h, "/sessions/chunked.zip").await;
    assert_eq!(s["bytes_stored"], 300_000);
    assert_eq!(s["sha256"], sha(&bytes));
}

#[tokio::test]
async fn tokens_are_checked() {
    let h = start().await;
    let r = client()
        .get(format!("{}/k.zip", h.upload_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(body(r).await["debug_info"]["type"], "NotAuthorizedError");
    let r = client()
        .get(format!("{}/k.zip", h.upload_url()))
        .header("Authorization", auth(mapillary_sim::defaults::CLIENT_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "client tokens cannot upload");
}

#[tokio::test]
async fn client_disconnect_mid_body_keeps_prefix_and_resume_completes() {
    let h = start().await;
    let bytes = data(10_000);
    let mut s = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
    let head = format!(
        "POST /rupload/resume.zip HTTP/1.1\r\nHost: x\r\nAuthorization: OAuth {TOKEN}\r\nOffset: 0\r\n\
         X-Entity-Name: resume.zip\r\nContent-Length: 10000\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&bytes[..3000]).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(s);
    let mut offset = 0;
    for _ in 0..100 {
        offset = get_offset(&h, "resume.zip").await;
        if offset == 3000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(offset, 3000);
    let r = post_bytes(&h, "resume.zip", 3000, bytes[3000..].to_vec()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(admin_get(&h, "/sessions/resume.zip").await["sha256"], sha(&bytes));
}

#[tokio::test]
async fn fault_drop_after_bytes_then_resume_gives_identical_bytes() {
    let h = start().await;
    let rule = admin(
        &h,
        "/faults",
        json!({"method": "POST", "path": "/rupload/*", "times": 1, "action": {"kind": "drop_after_bytes", "bytes": 4096}}),
    )
    .await;
    let bytes = data(20_000);
    let err = client()
        .post(format!("{}/drop.zip", h.upload_url()))
        .header("Authorization", auth(TOKEN))
        .header("Offset", "0")
        .header("X-Entity-Name", "drop.zip")
        .body(bytes.clone())
        .send()
        .await;
    assert!(err.is_err(), "connection must close without a reply: {err:?}");
    assert_eq!(get_offset(&h, "drop.zip").await, 4096);
    let r = post_bytes(&h, "drop.zip", 4096, bytes[4096..].to_vec()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(admin_get(&h, "/sessions/drop.zip").await["sha256"], sha(&bytes));
    let faults = admin_get(&h, "/faults").await;
    assert_eq!(faults[0]["id"], rule["id"]);
    assert_eq!(faults[0]["hits"], 1);
    let log = admin_get(&h, "/requests").await;
    let dropped = log
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["fault_rule"] == rule["id"])
        .unwrap();
    assert!(dropped["status"].is_null());
}

#[tokio::test]
async fn discard_policy_rolls_back_the_prefix() {
    let h = start().await;
    admin(&h, "/config", json!({"keep_prefix_on_drop": false})).await;
    post_bytes(&h, "d.zip", 0, data(100)).await; // 100 bytes stored, then a dropped POST
    admin(
        &h,
        "/faults",
        json!({"path": "/rupload/*", "method": "POST", "times": 1,
        "action": {"kind": "drop_after_bytes", "bytes": 1000}}),
    )
    .await;
    let _ = post_bytes_result(&h, "d.zip", 100, data(5000)).await;
    assert_eq!(get_offset(&h, "d.zip").await, 100);
}

async fn post_bytes_result(
    h: &mapillary_sim::SimHandle,
    key: &str,
    offset: u64,
    b: Vec<u8>,
) -> reqwest::Result<reqwest::Response> {
    client()
        .post(format!("{}/{key}", h.upload_url()))
        .header("Authorization", auth(TOKEN))
        .header("Offset", offset.to_string())
        .header("X-Entity-Name", key)
        .body(b)
        .send()
        .await
}

#[tokio::test]
async fn lost_reply_stores_everything_and_empty_post_returns_handle() {
    let h = start().await;
    admin(
        &h,
        "/faults",
        json!({"path": "/rupload/*", "method": "POST", "times": 1, "action": {"kind": "lost_reply"}}),
    )
    .await;
    let bytes = data(8000);
    assert!(post_bytes_result(&h, "lost.zip", 0, bytes.clone()).await.is_err());
    assert_eq!(get_offset(&h, "lost.zip").await, 8000);
    let r = post_bytes(&h, "lost.zip", 8000, Vec::new()).await;
    assert_eq!(r.status(), 200);
    let handle = body(r).await["h"].as_str().unwrap().to_string();
    assert_eq!(
        admin_get(&h, "/sessions/lost.zip").await["handle"],
        handle.as_str()
    );
}

#[tokio::test]
async fn keep_alive_connection_serves_several_requests() {
    let h = start().await;
    let c = client();
    for i in 0..5u64 {
        let r = c
            .post(format!("{}/ka.bin", h.upload_url()))
            .header("Authorization", auth(TOKEN))
            .header("Offset", (i * 10).to_string())
            .header("X-Entity-Name", "ka.bin")
            .body(vec![1u8; 10])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(get_offset(&h, "ka.bin").await, 50);
}
