//! finish_upload, content validation, the processing clock, failure plans and sequence splits.

use crate::common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn zip_cluster_moves_through_the_stages() {
    let h = start().await;
    short_stages(&h).await;
    let cluster = zip_cluster(&h, "mly_tools_z.zip", &jpegs(5, 0)).await;
    assert!(cluster.bytes().all(|b| b.is_ascii_digit()));

    let n = node_of(&h, &cluster).await;
    for f in [
        "status",
        "initial_processing_status",
        "anonymization_status",
        "tiler_status",
    ] {
        assert_eq!(n[f], "IN_PROGRESS", "{f}");
    }
    assert_eq!(n["error_code"], "UNSET");
    assert!(n["item_count"].is_null() && n["image_id"].is_null() && n["thumb_url"].is_null());
    assert_eq!(n["captured_at_seconds"], 1_714_554_000);

    advance(&h, 10).await;
    let n = node_of(&h, &cluster).await;
    assert_eq!(n["status"], "FINISHED");
    assert_eq!(n["initial_processing_status"], "IN_PROGRESS");
    assert!(n["image_id"].is_null());

    advance(&h, 10).await;
    let n = node_of(&h, &cluster).await;
    assert_eq!(n["initial_processing_status"], "FINISHED");
    assert_eq!(n["item_count"], 5);
    let image_id = n["image_id"].as_str().unwrap().to_string();
    assert!(n["thumb_url"].as_str().unwrap().starts_with(h.base_url()));

    advance(&h, 20).await;
    let n = node_of(&h, &cluster).await;
    assert_eq!(n["tiler_status"], "FINISHED");
    let info = cluster_info(&h, &cluster).await;
    assert_eq!(info["tiles_visible"], true);
    let seqs = info["sequences"].as_array().unwrap();
    assert_eq!(seqs.len(), 1);
    assert_eq!(seqs[0]["id"].as_str().unwrap().len(), 22);
    assert_eq!(seqs[0]["image_ids"][0], image_id.as_str());
}

#[tokio::test]
async fn bundle_manifest_creates_images_in_manifest_order() {
    let h = start().await;
    short_stages(&h).await;
    let mut handles = Vec::new();
    for (i, j) in jpegs(4, 10).into_iter().enumerate() {
        handles.push(upload(&h, &format!("mly_tools_{i}.jpg"), j).await);
    }
    let manifest = json!({"image_handles": handles, "upload_type": "images", "version": "1"}).to_string();
    let mh = upload(&h, "uuid_0123.json", manifest.into_bytes()).await;
    let r = finish(&h, &mh, "mly_bundle_manifest").await;
    assert_eq!(r.status(), 200);
    let cluster = body(r).await["cluster_id"].as_str().unwrap().to_string();
    advance(&h, 20).await;
    let info = cluster_info(&h, &cluster).await;
    assert_eq!(info["accepted_images"], 4);
    let names: Vec<String> = info["sequences"][0]["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "mly_tools_0.jpg",
            "mly_tools_1.jpg",
            "mly_tools_2.jpg",
            "mly_tools_3.jpg"
        ]
    );
    // A second finish of the same handle makes a new cluster.
    let again = body(finish(&h, &mh, "mly_bundle_manifest").await).await;
    assert_ne!(again["cluster_id"], cluster.as_str());
    assert_eq!(admin_get(&h, "/clusters").await.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn finish_upload_rejects_unknown_handles_and_types() {
    let h = start().await;
    let r = finish(&h, "nope", "zip").await;
    assert_eq!(r.status(), 400);
    assert_eq!(body(r).await["error"]["code"], 100);
    let handle = upload(&h, "a.zip", zip_of(&jpegs(1, 0))).await;
    let r = finish(&h, &handle, "tarball").await;
    assert_eq!(r.status(), 400);
    assert!(body(r).await["error"]["message"]
        .as_str()
        .unwrap()
        .contains("file_type"));
    let r = client()
        .post(format!("{}/finish_upload", h.graph_url()))
        .json(&json!({"file_handle": handle, "file_type": "zip"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(body(r).await["error"]["code"], 190);
}

#[tokio::test]
async fn failure_plan_sets_error_code_and_keeps_later_stages() {
    let h = start().await;
    short_stages(&h).await;
    admin(
        &h,
        "/plans/next",
        json!({"fail": {"stage": 3, "error_code": "SIM_MAP_DATA_FAILED"},
        "not_started_value": "NOT_STARTED"}),
    )
    .await;
    let cluster = zip_cluster(&h, "f.zip", &jpegs(2, 0)).await;
    let n = node_of(&h, &cluster).await;
    assert_eq!(n["tiler_status"], "NOT_STARTED");
    advance(&h, 100).await;
    let n = node_of(&h, &cluster).await;
    assert_eq!(n["status"], "FINISHED");
    assert_eq!(n["initial_processing_status"], "FINISHED");
    assert_eq!(n["anonymization_status"], "FAILED");
    assert_eq!(n["tiler_status"], "NOT_STARTED");
    assert_eq!(n["error_code"], "SIM_MAP_DATA_FAILED");
    assert_eq!(n["item_count"], 2, "stage 2 finished before the failure");
    // The next cluster uses the default plan again.
    let ok_cluster = zip_cluster(&h, "g.zip", &jpegs(2, 5)).await;
    advance(&h, 100).await;
    assert_eq!(node_of(&h, &ok_cluster).await["tiler_status"], "FINISHED");
}

#[tokio::test]
async fn stuck_plan_never_finishes() {
    let h = start().await;
    short_stages(&h).await;
    let cluster = zip_cluster(&h, "s.zip", &jpegs(1, 0)).await;
    admin(&h, &format!("/clusters/{cluster}/plan"), json!({"stuck_at": 2})).await;
    advance(&h, 400 * 3600).await;
    let n = node_of(&h, &cluster).await;
    assert_eq!(n["status"], "FINISHED");
    assert_eq!(n["initial_processing_status"], "IN_PROGRESS");
    assert_eq!(n["error_code"], "UNSET");
}

#[tokio::test]
async fn bad_content_still_gets_a_cluster_that_fails() {
    // About the lenient world: there a junk zip and an undated image get a cluster that fails; every strict world refuses such
    // uploads at finish_upload instead (one test per rule in strict.rs).
    let h = start_world(mapillary_sim::World::Lenient).await;
    short_stages(&h).await;
    let junk = upload(&h, "junk.zip", b"definitely not a zip".to_vec()).await;
    let c1 = body(finish(&h, &junk, "zip").await).await["cluster_id"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest = upload(
        &h,
        "uuid_x.json",
        br#"{"image_handles":["missing"],"upload_type":"images","version":"1"}"#.to_vec(),
    )
    .await;
    let c2 = body(finish(&h, &manifest, "mly_bundle_manifest").await).await["cluster_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut undated =
        relay_fixtures::ImageSpec::new(50.0, 8.0, time::macros::datetime!(2024-05-01 09:00 UTC));
    undated.time_tags = relay_fixtures::TimeTags::None;
    let c3 = zip_cluster(&h, "undated.zip", &[relay_fixtures::jpeg(&undated)]).await;

    assert_eq!(node_of(&h, &c1).await["status"], "IN_PROGRESS");
    advance(&h, 10).await;
    for (c, code) in [
        (&c1, "INVALID_ZIP"),
        (&c2, "MANIFEST_HANDLE_INVALID"),
        (&c3, "NO_VALID_IMAGES"),
    ] {
        let n = node_of(&h, c).await;
        assert_eq!(n["status"], "FAILED", "{code}");
        assert_eq!(n["error_code"], code);
        assert_eq!(n["initial_processing_status"], "IN_PROGRESS");
    }
    let info = cluster_info(&h, &c3).await;
    assert_eq!(info["rejected"].as_array().unwrap().len(), 1);
    advance(&h, 100).await;
    assert!(node_of(&h, &c1).await["item_count"].is_null());
}

#[tokio::test]
async fn rejected_images_are_dropped_and_not_counted() {
    // About the lenient world: there an image without GPS is dropped at processing; every strict world refuses such
    // uploads at finish_upload instead (one test per rule in strict.rs).
    let h = start_world(mapillary_sim::World::Lenient).await;
    short_stages(&h).await;
    let mut files = jpegs(3, 0);
    let mut nogps = relay_fixtures::ImageSpec::new(50.0, 8.0, time::macros::datetime!(2024-05-01 09:00 UTC));
    nogps.with_gps = false;
    files.insert(1, relay_fixtures::jpeg(&nogps));
    let c = zip_cluster(&h, "mixed.zip", &files).await;
    advance(&h, 20).await;
    assert_eq!(node_of(&h, &c).await["item_count"], 3);
    assert_eq!(cluster_info(&h, &c).await["rejected"][0]["name"], "1.jpg");
}

#[tokio::test]
async fn sequences_split_at_the_cap_and_by_plan() {
    let h = start().await;
    short_stages(&h).await;
    admin(&h, "/config", json!({"sequence_cap": 3})).await;
    let c = zip_cluster(&h, "cap.zip", &jpegs(7, 0)).await;
    admin(&h, "/plans/next", json!({"split_into": 2})).await;
    admin(&h, "/config", json!({"sequence_cap": 1000})).await;
    let forced = zip_cluster(&h, "forced.zip", &jpegs(5, 20)).await;
    advance(&h, 20).await;
    let sizes = |v: &serde_json::Value| -> Vec<usize> {
        v["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["image_ids"].as_array().unwrap().len())
            .collect()
    };
    let info = cluster_info(&h, &c).await;
    assert_eq!(sizes(&info), [3, 3, 1]);
    // Capture order across sequences.
    let times: Vec<i64> = info["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| {
            s["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["meta"]["captured_at_ms"].as_i64().unwrap())
        })
        .collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(sizes(&cluster_info(&h, &forced).await), [3, 2]);
    assert_eq!(node_of(&h, &c).await["item_count"], 7);
}

#[tokio::test]
async fn camm_video_is_accepted_and_fails_as_not_emulated() {
    let h = start().await;
    short_stages(&h).await;
    let handle = upload(&h, "mly_tools_v.mp4", vec![0u8; 64]).await;
    let r = finish(&h, &handle, "mly_camm_video").await;
    assert_eq!(r.status(), 200);
    let c = body(r).await["cluster_id"].as_str().unwrap().to_string();
    advance(&h, 10).await;
    assert_eq!(node_of(&h, &c).await["error_code"], "VIDEO_NOT_EMULATED");
}
