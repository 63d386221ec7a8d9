//! OAuth connect/token/refresh, /login, /logging and token-kind enforcement.

use crate::common;

use common::*;
use mapillary_sim::defaults::{
    APP_ID, CLIENT_SECRET, CLIENT_TOKEN, DEMO_EMAIL, DEMO_PASSWORD, DEMO_USER_ID, REDIRECT_URI,
};
use serde_json::{json, Value};

async fn code(h: &mapillary_sim::SimHandle, client_id: &str, redirect: &str) -> url::Url {
    let r = client()
        .get(format!("{}/connect", h.www_url()))
        .query(&[
            ("client_id", client_id),
            ("response_type", "code"),
            ("scope", "read"),
            ("state", "st8"),
            ("redirect_uri", redirect),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap()
}

fn param(u: &url::Url, k: &str) -> Option<String> {
    u.query_pairs().find(|(n, _)| n == k).map(|(_, v)| v.into_owned())
}

async fn token_req(h: &mapillary_sim::SimHandle, form: &[(&str, &str)]) -> (u16, Value) {
    let r = client()
        .post(format!("{}/token", h.graph_url()))
        .header("Authorization", auth(CLIENT_SECRET))
        .form(form)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, body(r).await)
}

async fn me_status(h: &mapillary_sim::SimHandle, token: &str) -> u16 {
    client()
        .get(format!("{}/me?fields=id", h.graph_url()))
        .header("Authorization", auth(token))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn code_exchange_refresh_and_expiry() {
    let h = start().await;
    let loc = code(&h, APP_ID, REDIRECT_URI).await;
    assert_eq!(loc.path(), "/oauth/callback");
    assert_eq!(param(&loc, "state").as_deref(), Some("st8"));
    let c = param(&loc, "code").unwrap();
    let (s, t) = token_req(
        &h,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", APP_ID),
            ("code", &c),
        ],
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(t["token_type"], "bearer");
    assert_eq!(t["expires_in"], 60 * 86400);
    assert!(t.get("refresh_token").is_none());
    let access = t["access_token"].as_str().unwrap().to_string();
    assert_eq!(me_status(&h, &access).await, 200);
    // Codes are single-use.
    let (s, e) = token_req(
        &h,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", APP_ID),
            ("code", &c),
        ],
    )
    .await;
    assert_eq!((s, e["error"]["type"].clone()), (400, json!("OAuthException")));

    // Expiry → 401 code 190 on graph and 401 on rupload; refresh still works afterwards.
    advance(&h, 61 * 86400).await;
    let r = client()
        .get(format!("{}/me", h.graph_url()))
        .header("Authorization", auth(&access))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(body(r).await["error"]["code"], 190);
    let r = client()
        .get(format!("{}/k", h.upload_url()))
        .header("Authorization", auth(&access))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (s, t) = token_req(
        &h,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", APP_ID),
            ("refresh_token", &access),
        ],
    )
    .await;
    assert_eq!(s, 200);
    let fresh = t["access_token"].as_str().unwrap().to_string();
    assert_ne!(fresh, access);
    assert_eq!(me_status(&h, &fresh).await, 200);
}

#[tokio::test]
async fn refresh_switches_revoke_old_and_refresh_token_field() {
    let h = start().await;
    admin(
        &h,
        "/config",
        json!({"refresh_revokes_old": true, "refresh_token_field": true, "token_lifetime_seconds": 3600}),
    )
    .await;
    let c = param(&code(&h, APP_ID, "http://127.0.0.1:9999/cb").await, "code").unwrap();
    let (_, t) = token_req(
        &h,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", APP_ID),
            ("code", &c),
        ],
    )
    .await;
    assert_eq!(t["expires_in"], 3600);
    let (a1, rt) = (
        t["access_token"].as_str().unwrap().to_string(),
        t["refresh_token"].as_str().unwrap().to_string(),
    );
    let (s, t2) = token_req(
        &h,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", APP_ID),
            ("refresh_token", &rt),
        ],
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(me_status(&h, &a1).await, 401, "old token revoked");
    assert_eq!(me_status(&h, t2["access_token"].as_str().unwrap()).await, 200);
    // JSON bodies are accepted too.
    let r = client()
        .post(format!("{}/token", h.graph_url()))
        .header("Authorization", auth("wrong-secret"))
        .json(&json!({"grant_type": "refresh_token", "client_id": APP_ID, "refresh_token": rt}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn connect_errors_redirect_with_error_parameters() {
    let h = start().await;
    let u = code(&h, "999", "http://127.0.0.1:1/cb").await;
    assert_eq!(param(&u, "error").as_deref(), Some("unauthorized_client"));
    assert!(param(&u, "error_description").is_some());
    assert_eq!(param(&u, "state").as_deref(), Some("st8"));
    let u = code(&h, APP_ID, "https://evil.example/cb").await;
    assert_eq!(param(&u, "error").as_deref(), Some("invalid_request"));
    assert!(param(&u, "code").is_none());
}

#[tokio::test]
async fn oauth_tokens_can_be_refused_for_uploads() {
    let h = start().await;
    let c = param(&code(&h, APP_ID, REDIRECT_URI).await, "code").unwrap();
    let (_, t) = token_req(
        &h,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", APP_ID),
            ("code", &c),
        ],
    )
    .await;
    let access = t["access_token"].as_str().unwrap().to_string();
    let get = |tok: String| {
        let url = format!("{}/k.zip", h.upload_url());
        async move {
            client()
                .get(url)
                .header("Authorization", auth(&tok))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(get(access.clone()).await, 200);
    admin(&h, "/config", json!({"oauth_tokens_can_upload": false})).await;
    assert_eq!(get(access.clone()).await, 401);
    assert_eq!(
        get(TOKEN.to_string()).await,
        200,
        "non-OAuth user tokens still upload"
    );
    let r = client()
        .post(format!("{}/finish_upload", h.graph_url()))
        .header("Authorization", auth(&access))
        .json(&json!({"file_handle": "x", "file_type": "zip"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn login_and_logging_take_the_client_token() {
    let h = start().await;
    let login = |tok: &'static str, pw: &'static str| {
        let url = format!("{}/login", h.graph_url());
        async move {
            client()
                .post(url)
                .header("Authorization", auth(tok))
                .json(&json!({"email": DEMO_EMAIL, "password": pw, "locale": "en_US"}))
                .send()
                .await
                .unwrap()
        }
    };
    let r = login(CLIENT_TOKEN, DEMO_PASSWORD).await;
    assert_eq!(r.status(), 200);
    let v = body(r).await;
    assert_eq!(v["user_id"], DEMO_USER_ID);
    assert_eq!(me_status(&h, v["access_token"].as_str().unwrap()).await, 200);
    let r = login(CLIENT_TOKEN, "wrong").await;
    assert!(r.status().is_client_error());
    assert_eq!(body(r).await["error"]["error_subcode"], 1348028);
    assert_eq!(
        login(TOKEN, DEMO_PASSWORD).await.status(),
        401,
        "user token on /login"
    );

    let r = client()
        .post(format!("{}/logging", h.graph_url()))
        .header("Authorization", auth(CLIENT_TOKEN))
        .json(&json!({"action_type": "upload_finished_upload", "properties": {"images": 5}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let events = admin_get(&h, "/logging").await;
    assert_eq!(events[0]["body"]["action_type"], "upload_finished_upload");
    assert_eq!(events[0]["token_kind"], "client");
}

#[tokio::test]
async fn seeded_users_and_forced_expiry() {
    let h = start().await;
    let u = admin(
        &h,
        "/users",
        json!({"username": "alice", "token_lifetime_seconds": 100}),
    )
    .await;
    let tok = u["access_token"].as_str().unwrap().to_string();
    assert_eq!(me_status(&h, &tok).await, 200);
    advance(&h, 100).await;
    assert_eq!(me_status(&h, &tok).await, 401);
    let t2 = admin(&h, "/tokens", json!({"user": "alice"})).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(me_status(&h, &t2).await, 200);
    admin(&h, "/tokens/expire", json!({"token": t2})).await;
    assert_eq!(me_status(&h, &t2).await, 401);
    let log = admin_get(&h, "/requests").await;
    let kinds: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["token_kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["user", "expired", "user", "expired"]);
    assert!(!log.to_string().contains(&tok), "token values are never logged");
}
