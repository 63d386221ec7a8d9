//! The strictness rules of every world but `lenient`, one test per rule: each asserts the refusal (status and
//! body) in `seed-2022`, and that the same request is accepted in `lenient` or, in `seed-2022`, once it has
//! the right shape.

use crate::common;

use common::*;
use mapillary_sim::defaults::{
    CLIENT_TOKEN, DEMO_EMAIL, DEMO_ORG_ID, DEMO_PASSWORD, DEMO_USERNAME, DEMO_USER_ID, WEB_APP_CLIENT_TOKEN,
};
use mapillary_sim::{SimHandle, World};
use reqwest::Response;
use serde_json::{json, Value};

/// A strict (`seed-2022`) and a `lenient` simulator.
async fn pair() -> (SimHandle, SimHandle) {
    (
        start_world(World::Seed2022).await,
        start_world(World::Lenient).await,
    )
}

/// Status and JSON body of a reply.
async fn reply(r: Response) -> (u16, Value) {
    let s = r.status().as_u16();
    (s, body(r).await)
}

/// rupload `GET` with a raw `Authorization` value (or none) and an optional query string.
async fn offset_with(
    h: &SimHandle,
    key: &str,
    authorization: Option<&str>,
    query: &[(&str, &str)],
) -> Response {
    let mut req = client().get(format!("{}/{key}", h.upload_url())).query(query);
    if let Some(a) = authorization {
        req = req.header("Authorization", a);
    }
    req.send().await.expect("GET")
}

/// rupload `POST` of `bytes` with exactly the given headers.
async fn post_with(
    h: &SimHandle,
    key: &str,
    headers: &[(&str, &str)],
    query: &[(&str, &str)],
    bytes: Vec<u8>,
) -> Response {
    let mut req = client()
        .post(format!("{}/{key}", h.upload_url()))
        .query(query)
        .body(bytes);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("POST")
}

fn assert_not_authorized(status: u16, b: &Value, what: &str) {
    assert_eq!(status, 401, "{what}: {b}");
    assert_eq!(b["debug_info"]["type"], "NotAuthorizedError", "{what}: {b}");
    assert!(
        b["debug_info"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Authorization: OAuth")),
        "{what}: the message names the accepted form: {b}"
    );
}

fn assert_header_error(status: u16, b: &Value, header: &str) {
    assert_eq!(status, 400, "{b}");
    assert_eq!(
        b,
        &json!({"debug_info": {"type": "InvalidHeaderError", "retriable": false,
            "message": b["debug_info"]["message"].clone()}}),
        "rupload debug_info shape"
    );
    assert!(
        b["debug_info"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(header)),
        "names {header}: {b}"
    );
}

/// A §8.2 graph error: status, `code`, `error_subcode` and a message containing `needle`.
fn assert_graph_error(
    status: u16,
    b: &Value,
    want_status: u16,
    code: i64,
    subcode: Option<i64>,
    needle: &str,
) {
    assert_eq!(status, want_status, "{b}");
    let e = &b["error"];
    assert_eq!(e["code"], code, "{b}");
    assert_eq!(e["type"], "MLYApiException", "{b}");
    assert!(e["fbtrace_id"].is_string(), "{b}");
    match subcode {
        Some(s) => assert_eq!(e["error_subcode"], s, "{b}"),
        None => assert!(e.get("error_subcode").is_none(), "{b}"),
    }
    assert!(
        e["message"].as_str().is_some_and(|m| m.contains(needle)),
        "message should contain {needle:?}: {b}"
    );
}

async fn stored(h: &SimHandle, key: &str) -> Option<u64> {
    let r = client()
        .get(format!("{}/sessions/{key}", h.admin_url()))
        .send()
        .await
        .unwrap();
    if r.status() == 404 {
        return None;
    }
    body(r).await["bytes_stored"].as_u64()
}

// ------------------------------------------------------------------------------------------- rupload

#[tokio::test]
async fn rupload_refuses_bearer_tokens() {
    let (strict, lenient) = pair().await;
    let bearer = format!("Bearer {TOKEN}");
    let (s, b) = reply(offset_with(&strict, "b.zip", Some(&bearer), &[]).await).await;
    assert_not_authorized(s, &b, "GET with Bearer");
    let headers = [
        ("Authorization", bearer.as_str()),
        ("Offset", "0"),
        ("X-Entity-Name", "b.zip"),
    ];
    let (s, b) = reply(post_with(&strict, "b.zip", &headers, &[], vec![7; 100]).await).await;
    assert_not_authorized(s, &b, "POST with Bearer");
    assert_eq!(stored(&strict, "b.zip").await, None, "nothing stored");

    // The same token as `OAuth` is accepted in the strict world; `Bearer` in lenient.
    assert_eq!(get_offset(&strict, "b.zip").await, 0);
    let (s, b) = reply(offset_with(&lenient, "b.zip", Some(&bearer), &[]).await).await;
    assert_eq!((s, b), (200, json!({"offset": 0})));
    let (s, b) = reply(post_with(&lenient, "b.zip", &headers, &[], vec![7; 100]).await).await;
    assert_eq!(s, 200, "{b}");
    assert!(b["h"].is_string());
}

#[tokio::test]
async fn rupload_refuses_query_string_tokens() {
    let (strict, lenient) = pair().await;
    let q = [("access_token", TOKEN)];
    let (s, b) = reply(offset_with(&strict, "q.zip", None, &q).await).await;
    assert_not_authorized(s, &b, "GET with access_token=");
    let headers = [("Offset", "0"), ("X-Entity-Name", "q.zip")];
    let (s, b) = reply(post_with(&strict, "q.zip", &headers, &q, vec![7; 100]).await).await;
    assert_not_authorized(s, &b, "POST with access_token=");
    assert_eq!(stored(&strict, "q.zip").await, None, "nothing stored");

    let (s, b) = reply(offset_with(&lenient, "q.zip", None, &q).await).await;
    assert_eq!((s, b), (200, json!({"offset": 0})));
    let (s, b) = reply(post_with(&lenient, "q.zip", &headers, &q, vec![7; 100]).await).await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test]
async fn rupload_post_requires_offset() {
    let (strict, lenient) = pair().await;
    let oauth = auth(TOKEN);
    let without = [("Authorization", oauth.as_str()), ("X-Entity-Name", "o.zip")];
    let (s, b) = reply(post_with(&strict, "o.zip", &without, &[], vec![1; 50]).await).await;
    assert_header_error(s, &b, "Offset");
    assert_eq!(stored(&strict, "o.zip").await, None, "nothing stored");
    let with = [
        ("Authorization", oauth.as_str()),
        ("X-Entity-Name", "o.zip"),
        ("Offset", "0"),
    ];
    let (s, b) = reply(post_with(&strict, "o.zip", &with, &[], vec![1; 50]).await).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(stored(&strict, "o.zip").await, Some(50));

    let (s, b) = reply(post_with(&lenient, "o.zip", &without, &[], vec![1; 50]).await).await;
    assert_eq!(s, 200, "lenient: a missing Offset counts as 0: {b}");
    assert_eq!(stored(&lenient, "o.zip").await, Some(50));
}

#[tokio::test]
async fn rupload_post_requires_entity_name_equal_to_key() {
    let (strict, lenient) = pair().await;
    let oauth = auth(TOKEN);
    let missing = [("Authorization", oauth.as_str()), ("Offset", "0")];
    let wrong = [
        ("Authorization", oauth.as_str()),
        ("Offset", "0"),
        ("X-Entity-Name", "other.zip"),
    ];
    let right = [
        ("Authorization", oauth.as_str()),
        ("Offset", "0"),
        ("X-Entity-Name", "e.zip"),
    ];
    for headers in [&missing[..], &wrong[..]] {
        let (s, b) = reply(post_with(&strict, "e.zip", headers, &[], vec![2; 40]).await).await;
        assert_header_error(s, &b, "X-Entity-Name");
    }
    assert_eq!(stored(&strict, "e.zip").await, None, "nothing stored");
    let (s, b) = reply(post_with(&strict, "e.zip", &right, &[], vec![2; 40]).await).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        admin_get(&strict, "/sessions/e.zip").await["entity_name"],
        "e.zip"
    );

    let (s, _) = reply(post_with(&lenient, "e.zip", &missing, &[], vec![2; 40]).await).await;
    assert_eq!(s, 200);
    let (s, _) = reply(post_with(&lenient, "e2.zip", &wrong, &[], vec![2; 40]).await).await;
    assert_eq!(s, 200, "lenient: a mismatch is only logged");
    assert_eq!(stored(&lenient, "e2.zip").await, Some(40));
}

// ------------------------------------------------------------------------------------------ finish_upload

#[tokio::test]
async fn finish_upload_refuses_another_users_handle() {
    let (strict, lenient) = pair().await;
    for (h, is_strict) in [(&strict, true), (&lenient, false)] {
        let (alice, alice_token) = new_user(h, "alice").await;
        let handle = upload_as(h, TOKEN, "mine.zip", tools_zip(2, 10)).await;
        assert_eq!(
            admin_get(h, "/sessions/mine.zip").await["owner_id"],
            DEMO_USER_ID,
            "the handle is bound to its uploader"
        );
        let alice_finish = reply(
            finish_as(
                h,
                &alice_token,
                json!({"file_handle": handle, "file_type": "zip"}),
            )
            .await,
        )
        .await;
        if is_strict {
            let (s, b) = alice_finish;
            assert_graph_error(s, &b, 400, 100, Some(33), &handle);
            assert!(b["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("missing permissions"));
            assert_eq!(cluster_count(h).await, 0, "no cluster for a refused finish");

            // A bundle manifest naming another user's image handle is refused the same way.
            let img = upload_as(h, TOKEN, "mly_tools_a.jpg", described_jpegs(1, 20).remove(0)).await;
            let manifest =
                json!({"image_handles": [img], "upload_type": "images", "version": "1"}).to_string();
            let m = upload_as(h, &alice_token, "uuid_alice.json", manifest.into_bytes()).await;
            let (s, b) = reply(
                finish_as(
                    h,
                    &alice_token,
                    json!({"file_handle": m, "file_type": "mly_bundle_manifest"}),
                )
                .await,
            )
            .await;
            assert_graph_error(s, &b, 400, 100, Some(33), &img);

            // The uploader itself finishes it.
            let (s, b) =
                reply(finish_as(h, TOKEN, json!({"file_handle": handle, "file_type": "zip"})).await).await;
            assert_eq!(s, 200, "{b}");
            assert_eq!(cluster_count(h).await, 1);
        } else {
            let (s, b) = alice_finish;
            assert_eq!(s, 200, "lenient: any user may finish any handle: {b}");
            let c = cluster_info(h, b["cluster_id"].as_str().unwrap()).await;
            assert_eq!(c["owner_id"], alice.as_str());
        }
    }
}

#[tokio::test]
async fn finish_upload_takes_json_only() {
    let (strict, lenient) = pair().await;
    for (h, is_strict) in [(&strict, true), (&lenient, false)] {
        let handle = upload_as(h, TOKEN, "f.zip", tools_zip(2, 30)).await;
        let form = client()
            .post(format!("{}/finish_upload", h.graph_url()))
            .header("Authorization", auth(TOKEN))
            .form(&[("file_handle", handle.as_str()), ("file_type", "zip")])
            .send()
            .await
            .unwrap();
        let (s, b) = reply(form).await;
        if is_strict {
            assert_graph_error(s, &b, 400, 100, None, "JSON");
            // A JSON body under another content type is refused too.
            let plain = client()
                .post(format!("{}/finish_upload", h.graph_url()))
                .header("Authorization", auth(TOKEN))
                .header("Content-Type", "text/plain")
                .body(json!({"file_handle": handle, "file_type": "zip"}).to_string())
                .send()
                .await
                .unwrap();
            let (s, b) = reply(plain).await;
            assert_graph_error(s, &b, 400, 100, None, "application/json");
            assert_eq!(cluster_count(h).await, 0);
            let (s, b) =
                reply(finish_as(h, TOKEN, json!({"file_handle": handle, "file_type": "zip"})).await).await;
            assert_eq!(s, 200, "JSON is accepted: {b}");
        } else {
            assert_eq!(s, 200, "lenient: form bodies are accepted: {b}");
        }
        assert_eq!(cluster_count(h).await, 1);
    }
}

#[tokio::test]
async fn finish_upload_checks_organization_membership() {
    let (strict, lenient) = pair().await;
    for (h, is_strict) in [(&strict, true), (&lenient, false)] {
        let (bob, _) = new_user(h, "bob").await;
        let org = admin(
            h,
            "/organizations",
            json!({"name": "Other Org", "id": "555000111", "members": ["bob"]}),
        )
        .await;
        assert_eq!(org["members"], json!([bob]));
        let handle = upload_as(h, TOKEN, "org.zip", tools_zip(2, 40)).await;
        let fields = json!({"file_handle": handle, "file_type": "zip", "organization_id": "555000111"});
        let (s, b) = reply(finish_as(h, TOKEN, fields).await).await;
        if is_strict {
            assert_graph_error(s, &b, 400, 100, Some(33), "555000111");
            assert_eq!(cluster_count(h).await, 0);
            // The demo user is a member of the demo organization (as an int, as mapillary_tools may send it).
            let ok_fields = json!({"file_handle": handle, "file_type": "zip",
                "organization_id": DEMO_ORG_ID.parse::<u64>().unwrap()});
            let (s, b) = reply(finish_as(h, TOKEN, ok_fields).await).await;
            assert_eq!(s, 200, "{b}");
            let c = cluster_info(h, b["cluster_id"].as_str().unwrap()).await;
            assert_eq!(c["organization_id"], DEMO_ORG_ID);
        } else {
            assert_eq!(s, 200, "lenient: membership is not checked: {b}");
        }
        // An unknown organization is refused in every world.
        let fields = json!({"file_handle": handle, "file_type": "zip", "organization_id": "999"});
        let (s, b) = reply(finish_as(h, TOKEN, fields).await).await;
        assert_graph_error(s, &b, 400, 100, Some(33), "999");
    }
}

// ------------------------------------------------------------------------------------------- content

/// Uploads `bytes` as a zip and finishes it in both worlds: the strict reply must be the 400 graph error
/// naming `needle` (and create nothing); the lenient reply a cluster with `accepted` images.
async fn zip_refused_strict_accepted_lenient(bytes: Vec<u8>, needle: &str, accepted: usize) {
    let (strict, lenient) = pair().await;
    let handle = upload_as(&strict, TOKEN, "z.zip", bytes.clone()).await;
    let (s, b) =
        reply(finish_as(&strict, TOKEN, json!({"file_handle": handle, "file_type": "zip"})).await).await;
    assert_graph_error(s, &b, 400, 100, None, "Invalid zip upload");
    assert_graph_error(s, &b, 400, 100, None, needle);
    assert_eq!(cluster_count(&strict).await, 0, "no cluster for a refused zip");

    let handle = upload_as(&lenient, TOKEN, "z.zip", bytes).await;
    let (s, b) = reply(
        finish_as(
            &lenient,
            TOKEN,
            json!({"file_handle": handle, "file_type": "zip"}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let c = cluster_info(&lenient, b["cluster_id"].as_str().unwrap()).await;
    assert_eq!(c["accepted_images"], accepted, "{c}");
}

#[tokio::test]
async fn zip_without_the_tools_comment_is_refused() {
    let files = described_jpegs(3, 50);
    let none = ZipShape {
        comment: None,
        ..ZipShape::tools()
    };
    zip_refused_strict_accepted_lenient(zip_shaped(&files, &none), "sequence_md5sum", 3).await;
    // ≤ 0.13's comment is not 0.14.7's.
    let old = ZipShape {
        comment: Some(r#"{"upload_md5sum": "0123456789abcdef0123456789abcdef"}"#.to_string()),
        ..ZipShape::tools()
    };
    zip_refused_strict_accepted_lenient(zip_shaped(&files, &old), "upload_md5sum", 3).await;

    // With the comment the strict world takes it.
    let strict = start_world(World::Seed2022).await;
    let handle = upload_as(&strict, TOKEN, "ok.zip", zip_shaped(&files, &ZipShape::tools())).await;
    let (s, b) =
        reply(finish_as(&strict, TOKEN, json!({"file_handle": handle, "file_type": "zip"})).await).await;
    assert_eq!(s, 200, "{b}");
    let c = cluster_info(&strict, b["cluster_id"].as_str().unwrap()).await;
    assert_eq!(c["accepted_images"], 3, "{c}");
}

#[tokio::test]
async fn zip_entries_must_carry_the_tools_names() {
    let files = described_jpegs(2, 60);
    let named = ZipShape {
        names: Some(vec!["IMG_0001.jpg".into(), "IMG_0002.jpg".into()]),
        ..ZipShape::tools()
    };
    zip_refused_strict_accepted_lenient(zip_shaped(&files, &named), "entry 0 is named \"IMG_0001.jpg\"", 2)
        .await;
    let swapped = ZipShape {
        names: Some(vec!["1.jpg".into(), "0.jpg".into()]),
        ..ZipShape::tools()
    };
    zip_refused_strict_accepted_lenient(zip_shaped(&files, &swapped), "must be \"0.jpg\"", 2).await;
}

#[tokio::test]
async fn zip_entries_must_be_dated_1980() {
    let files = described_jpegs(2, 70);
    let dated = ZipShape {
        modified: Some(zip::DateTime::from_date_and_time(2024, 5, 1, 9, 30, 10).expect("valid date")),
        ..ZipShape::tools()
    };
    zip_refused_strict_accepted_lenient(zip_shaped(&files, &dated), "dated 2024-05-01 09:30:10", 2).await;
}

#[tokio::test]
async fn images_without_a_map_description_are_refused() {
    // A tools-shaped zip of images with raw EXIF only: lenient reads the raw EXIF.
    let raw = zip_shaped(&raw_jpegs(2, 80), &ZipShape::tools());
    zip_refused_strict_accepted_lenient(raw, "has no MAP* description", 2).await;
    // A description that is present but invalid (no MAPLatitude): lenient drops that image only.
    let mut files = described_jpegs(2, 90);
    let mut spec =
        relay_fixtures::ImageSpec::new(50.9, -0.55, time::macros::datetime!(2024-05-01 09:10:00 UTC));
    spec.image_description =
        Some(r#"{"MAPLongitude":-0.55,"MAPCaptureTime":"2024_05_01_09_10_00_000"}"#.into());
    files.push(relay_fixtures::jpeg(&spec));
    let bad = zip_shaped(&files, &ZipShape::tools());
    zip_refused_strict_accepted_lenient(bad, "\"2.jpg\" has no valid MAP* description", 2).await;

    // Bundle manifests: an image without a description is refused as well.
    let (strict, lenient) = pair().await;
    for (h, is_strict) in [(&strict, true), (&lenient, false)] {
        let img = upload_as(h, TOKEN, "mly_tools_raw.jpg", raw_jpegs(1, 95).remove(0)).await;
        let manifest = json!({"image_handles": [img], "upload_type": "images", "version": "1"}).to_string();
        let m = upload_as(h, TOKEN, "uuid_m.json", manifest.into_bytes()).await;
        let (s, b) = reply(
            finish_as(
                h,
                TOKEN,
                json!({"file_handle": m, "file_type": "mly_bundle_manifest"}),
            )
            .await,
        )
        .await;
        if is_strict {
            assert_graph_error(s, &b, 400, 100, None, "Invalid bundle upload");
            assert_graph_error(s, &b, 400, 100, None, "mly_tools_raw.jpg");
            assert_eq!(cluster_count(h).await, 0);
        } else {
            assert_eq!(s, 200, "{b}");
        }
    }
    // With a description the strict world takes the bundle.
    let img = upload_as(
        &strict,
        TOKEN,
        "mly_tools_ok.jpg",
        described_jpegs(1, 96).remove(0),
    )
    .await;
    let manifest = json!({"image_handles": [img], "upload_type": "images", "version": "1"}).to_string();
    let m = upload_as(&strict, TOKEN, "uuid_ok.json", manifest.into_bytes()).await;
    let (s, b) = reply(
        finish_as(
            &strict,
            TOKEN,
            json!({"file_handle": m, "file_type": "mly_bundle_manifest"}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        cluster_info(&strict, b["cluster_id"].as_str().unwrap()).await["accepted_images"],
        1
    );
}

// ------------------------------------------------------------------------------------------- GraphQL

#[tokio::test]
async fn feed_and_new_sequences_take_only_the_web_app_token() {
    let (strict, lenient) = pair().await;
    let feed_vars = json!({"id": DEMO_USER_ID, "first": 50});
    let seq_vars = json!({"username": DEMO_USERNAME});
    let oauth = oauth_token(&strict, DEMO_USERNAME).await;
    for token in [TOKEN, oauth.as_str(), CLIENT_TOKEN] {
        for (doc, vars) in [(FEED_DOC, &feed_vars), (NEW_SEQ_DOC, &seq_vars)] {
            let (s, b) = reply(graphql(&strict, token, doc, vars.clone()).await).await;
            assert_eq!(s, 401, "{b}");
            assert_eq!(b["error"]["code"], 190, "{b}");
            assert_eq!(b["error"]["type"], "MLYApiException", "{b}");
            assert_eq!(b["error"]["error_data"], json!({}), "{b}");
        }
    }
    let (s, b) = reply(graphql(&strict, WEB_APP_CLIENT_TOKEN, FEED_DOC, feed_vars.clone()).await).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"]["fetch__User"]["id"], DEMO_USER_ID);
    let (s, b) = reply(graphql(&strict, WEB_APP_CLIENT_TOKEN, NEW_SEQ_DOC, seq_vars.clone()).await).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"]["user_by_username"]["id"], DEMO_USER_ID);

    for (doc, vars) in [(FEED_DOC, &feed_vars), (NEW_SEQ_DOC, &seq_vars)] {
        let (s, b) = reply(graphql(&lenient, TOKEN, doc, vars.clone()).await).await;
        assert_eq!(s, 200, "lenient: the user's token reads the feed: {b}");
    }
}

// ------------------------------------------------------------------------------- oauth-upload-refused

#[tokio::test]
async fn oauth_upload_refused_takes_only_user_upload_tokens() {
    let h = start_world(World::OauthUploadRefused).await;
    let oauth = oauth_token(&h, DEMO_USERNAME).await;
    let zip = tools_zip(2, 100);

    // rupload (GET and POST) refuses the OAuth token with the NotAuthorizedError body.
    let (s, b) = reply(offset_with(&h, "u.zip", Some(&auth(&oauth)), &[]).await).await;
    assert_eq!(s, 401, "{b}");
    assert_eq!(b["debug_info"]["type"], "NotAuthorizedError", "{b}");
    let headers = [
        ("Authorization", auth(&oauth)),
        ("Offset", "0".to_string()),
        ("X-Entity-Name", "u.zip".to_string()),
    ];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (s, b) = reply(post_with(&h, "u.zip", &headers, &[], zip.clone()).await).await;
    assert_eq!(s, 401, "{b}");
    assert_eq!(b["debug_info"]["type"], "NotAuthorizedError", "{b}");
    assert_eq!(stored(&h, "u.zip").await, None);
    // The OAuth token is still a valid token elsewhere (/me), so a connection check passes.
    let me = client()
        .get(format!("{}/me?fields=id,username", h.graph_url()))
        .header("Authorization", auth(&oauth))
        .send()
        .await
        .unwrap();
    assert_eq!(body(me).await["id"], DEMO_USER_ID);

    // A user upload token, obtained the way `mapillary_tools authenticate` does: POST /graph/login with the
    // client token and the user's e-mail and password.
    let login = client()
        .post(format!("{}/login", h.graph_url()))
        .header("Authorization", auth(CLIENT_TOKEN))
        .json(&json!({"email": DEMO_EMAIL, "password": DEMO_PASSWORD, "locale": "en_US"}))
        .send()
        .await
        .unwrap();
    let (s, b) = reply(login).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["user_id"], DEMO_USER_ID);
    let upload_token = b["access_token"].as_str().expect("access_token").to_string();
    let handle = upload_as(&h, &upload_token, "u.zip", zip).await;

    // finish_upload refuses the OAuth token (401 code 190), takes the upload token.
    let fields = json!({"file_handle": handle, "file_type": "zip"});
    let (s, b) = reply(finish_as(&h, &oauth, fields.clone()).await).await;
    assert_graph_error(s, &b, 401, 190, None, "not authorized to upload");
    assert_eq!(cluster_count(&h).await, 0);
    let (s, b) = reply(finish_as(&h, &upload_token, fields).await).await;
    assert_eq!(s, 200, "{b}");

    // The request log tells the two token kinds apart.
    let log = admin_get(&h, "/requests").await;
    let kinds: Vec<(String, String, u64)> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["path"] == "/rupload/u.zip" || e["path"] == "/graph/finish_upload")
        .map(|e| {
            (
                e["path"].as_str().unwrap().to_string(),
                e["token_kind"].as_str().unwrap().to_string(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let owned = |p: &str, k: &str, s: u64| (p.to_string(), k.to_string(), s);
    assert_eq!(
        kinds,
        vec![
            owned("/rupload/u.zip", "user_oauth", 401),
            owned("/rupload/u.zip", "user_oauth", 401),
            owned("/rupload/u.zip", "user", 200),
            owned("/graph/finish_upload", "user_oauth", 401),
            owned("/graph/finish_upload", "user", 200),
        ]
    );

    // In seed-2022 the same OAuth token uploads.
    let seed = start_world(World::Seed2022).await;
    let oauth = oauth_token(&seed, DEMO_USERNAME).await;
    let handle = upload_as(&seed, &oauth, "u.zip", tools_zip(2, 100)).await;
    let (s, b) =
        reply(finish_as(&seed, &oauth, json!({"file_handle": handle, "file_type": "zip"})).await).await;
    assert_eq!(s, 200, "{b}");
}
