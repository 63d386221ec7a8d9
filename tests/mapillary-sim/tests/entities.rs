//! Graph entities: /me, users, organizations, images, image_ids, image search.

use crate::common;

use common::*;
use mapillary_sim::defaults::{CLIENT_TOKEN, DEMO_ORG_ID, DEMO_USERNAME, DEMO_USER_ID};
use serde_json::{json, Value};

async fn get(h: &mapillary_sim::SimHandle, path: &str, token: &str) -> (u16, Value) {
    let r = client()
        .get(format!("{}{path}", h.graph_url()))
        .header("Authorization", auth(token))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, body(r).await)
}

#[tokio::test]
async fn me_users_and_organizations() {
    let h = start().await;
    assert_eq!(
        get(&h, "/me?fields=id,username", TOKEN).await,
        (200, json!({"id": DEMO_USER_ID, "username": DEMO_USERNAME}))
    );
    assert_eq!(
        get(&h, &format!("/{DEMO_USER_ID}?fields=id,username"), TOKEN)
            .await
            .1["username"],
        DEMO_USERNAME
    );
    let (s, org) = get(&h, &format!("/{DEMO_ORG_ID}?fields=slug,description,name"), TOKEN).await;
    assert_eq!(s, 200);
    assert_eq!(org["id"], DEMO_ORG_ID);
    assert_eq!(org["slug"], "demo-org");
    let (s, e) = get(&h, "/424242?fields=id", TOKEN).await;
    assert_eq!(s, 400);
    assert_eq!(
        (e["error"]["code"].clone(), e["error"]["error_subcode"].clone()),
        (json!(100), json!(33))
    );
    let (s, e) = get(&h, "/me?fields=id", CLIENT_TOKEN).await;
    assert_eq!(s, 401, "/me needs a user token");
    assert_eq!(e["error"]["code"], 190);
    let (s, e) = get(&h, "/me?fields=id", "MLYARnot-a-token").await;
    assert_eq!((s, e["error"]["type"].clone()), (401, json!("MLYApiException")));
}

/// One cluster of 3 images whose MAP* description differs from its raw EXIF.
async fn described_cluster(h: &mapillary_sim::SimHandle) -> String {
    short_stages(h).await;
    let specs = relay_fixtures::track(
        3,
        &relay_fixtures::TrackSpec::new(10.0, 20.0, time::macros::datetime!(2023-01-01 00:00 UTC)),
    );
    let files: Vec<Vec<u8>> = specs
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            s.image_description = Some(
                json!({"MAPLatitude": 50.8966123 + i as f64 * 1e-4, "MAPLongitude": -0.5591,
                    "MAPCaptureTime": format!("2024_05_01_10_00_0{i}_250"), "MAPAltitude": 77.42,
                    "MAPCompassHeading": {"TrueHeading": 133.54, "MagneticHeading": 133.54},
                    "MAPDeviceMake": "TestMake", "MAPDeviceModel": "TestModel", "MAPOrientation": 1})
                .to_string(),
            );
            relay_fixtures::jpeg(&s)
        })
        .collect();
    let c = zip_cluster(h, "desc.zip", &files).await;
    advance(h, 20).await;
    c
}

#[tokio::test]
async fn image_entity_renders_requested_fields_only() {
    let h = start().await;
    let c = described_cluster(&h).await;
    let info = cluster_info(&h, &c).await;
    let seq = info["sequence_ids"][0].as_str().unwrap().to_string();
    let image = info["sequences"][0]["image_ids"][0].as_str().unwrap().to_string();

    let (s, v) = get(&h, &format!("/{image}"), TOKEN).await;
    assert_eq!((s, v), (200, json!({"id": image})));
    let (s, v) = get(&h, &format!("/{image}?fields=id,geometry,captured_at,altitude,compass_angle,make,model,sequence,creator,computed_geometry,thumb_1024_url"), TOKEN).await;
    assert_eq!(s, 200);
    assert_eq!(
        v["geometry"],
        json!({"type": "Point", "coordinates": [-0.5591, 50.8966123]})
    );
    assert_eq!(v["captured_at"], 1_714_557_600_250i64);
    assert_eq!(v["altitude"], 77.42);
    assert_eq!(v["compass_angle"], 133.54);
    assert_eq!(
        (v["make"].clone(), v["model"].clone()),
        (json!("TestMake"), json!("TestModel"))
    );
    assert_eq!(v["sequence"], seq.as_str());
    assert_eq!(
        v["creator"],
        json!({"username": DEMO_USERNAME, "id": DEMO_USER_ID})
    );
    let computed_lat = v["computed_geometry"]["coordinates"][1].as_f64().unwrap();
    assert!((computed_lat - 50.8966123 - 1.5 / 111_320.0).abs() < 2e-7);
    assert!(v.get("width").is_none(), "unrequested fields are absent");

    // Thumbnail URLs work until they expire.
    let thumb = v["thumb_1024_url"].as_str().unwrap().to_string();
    let r = client().get(&thumb).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(&r.bytes().await.unwrap()[..2], &[0xFF, 0xD8]);
    advance(&h, 7200).await;
    assert_eq!(client().get(&thumb).send().await.unwrap().status(), 403);

    let (s, v) = get(&h, &format!("/image_ids?sequence_id={seq}"), TOKEN).await;
    assert_eq!(s, 200);
    assert_eq!(
        v["data"],
        json!(info["sequences"][0]["image_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| json!({"id": i}))
            .collect::<Vec<_>>())
    );
    assert_eq!(get(&h, "/image_ids?sequence_id=nope", TOKEN).await.0, 400);
    assert_eq!(get(&h, &format!("/{image}?fields=bogus"), TOKEN).await.0, 400);
}

#[tokio::test]
async fn images_batch_and_search() {
    let h = start().await;
    let c = described_cluster(&h).await;
    let ids: Vec<String> = cluster_info(&h, &c).await["sequences"][0]["image_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let (s, v) = get(
        &h,
        &format!("/images?image_ids={},{}&fields=id,captured_at", ids[0], ids[2]),
        TOKEN,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["data"].as_array().unwrap().len(), 2);

    // Search: newest first.
    let (_, v) = get(&h, "/images?bbox=-0.6,50.8,-0.5,50.9&fields=id", TOKEN).await;
    let got: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[2].as_str(), ids[1].as_str(), ids[0].as_str()]);
    let (_, v) = get(&h, "/images?bbox=0,0,1,1", TOKEN).await;
    assert_eq!(v["data"], json!([]));
    let (_, v) = get(
        &h,
        "/images?start_captured_at=2024-05-01T10:00:01Z&end_captured_at=2024-05-01T10:00:01.999Z",
        TOKEN,
    )
    .await;
    assert_eq!(v["data"], json!([{"id": ids[1]}]));
    let (_, v) = get(
        &h,
        &format!("/images?creator_username={DEMO_USERNAME}&limit=1"),
        TOKEN,
    )
    .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    let (_, v) = get(&h, "/images?creator_username=ghost", TOKEN).await;
    assert_eq!(v["data"], json!([]));
    let seq = cluster_info(&h, &c).await["sequence_ids"][0]
        .as_str()
        .unwrap()
        .to_string();
    let (_, v) = get(&h, &format!("/images?sequence_id=x,{seq}&is_pano=false"), TOKEN).await;
    assert_eq!(v["data"].as_array().unwrap().len(), 3);
    let (_, v) = get(&h, &format!("/images?organization_id={DEMO_ORG_ID}"), TOKEN).await;
    assert_eq!(v["data"], json!([]));
    let (s, v) = get(&h, "/images?make=TestMake", TOKEN).await;
    assert_eq!((s, v["error"]["code"].clone()), (400, json!(100)));
    let (_, v) = get(&h, "/images?make=TestMake&bbox=-0.6,50.8,-0.5,50.9", TOKEN).await;
    assert_eq!(v["data"].as_array().unwrap().len(), 3);
    assert_eq!(get(&h, "/images?bbox=1,2,3", TOKEN).await.0, 400);
}

#[tokio::test]
async fn images_do_not_exist_before_stage_two_and_client_tokens_are_a_switch() {
    let h = start().await;
    short_stages(&h).await;
    zip_cluster(&h, "early.zip", &jpegs(2, 0)).await;
    let (_, v) = get(&h, "/images?creator_username=demo_mapper", TOKEN).await;
    assert_eq!(v["data"], json!([]));
    assert_eq!(get(&h, "/images?limit=5", CLIENT_TOKEN).await.0, 401);
    admin(&h, "/config", json!({"entities_accept_client_token": true})).await;
    advance(&h, 20).await;
    let (s, v) = get(&h, "/images?limit=5", CLIENT_TOKEN).await;
    assert_eq!((s, v["data"].as_array().unwrap().len()), (200, 2));
}
