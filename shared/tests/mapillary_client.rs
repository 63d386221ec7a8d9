//! `MapillaryClient` against the real simulator (in-process, loopback, frozen clock).

use std::time::{Duration, Instant};

use bytes::Bytes;
use mapillary_sim::defaults::{
    APP_ID, CLIENT_SECRET, DEMO_USERNAME, DEMO_USER_ID, DEMO_USER_TOKEN, REDIRECT_URI, WEB_APP_CLIENT_TOKEN,
};
use mapillary_sim::{SimConfig, SimHandle, Simulator};
use relay_fixtures::{jpeg, track, TrackSpec};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shared::mapillary::client::{
    ExposeSecret, FileType, MapillaryClient, SecretString, TokenTransport, UploadLimits, UploadOutcome,
    UploadReport, IMAGE_FIELDS,
};
use shared::mapillary::error::{MapillaryError, TransportKind};
use shared::mapillary::retry::RetryPolicy;
use shared::mapillary::Endpoints;

type Chunks = futures::stream::Iter<std::vec::IntoIter<Result<Bytes, std::io::Error>>>;

async fn sim() -> SimHandle {
    Simulator::start(SimConfig::frozen(), "127.0.0.1:0")
        .await
        .expect("simulator starts")
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

fn client(h: &SimHandle, policy: RetryPolicy) -> MapillaryClient {
    MapillaryClient::new(Endpoints::under(h.base_url()), http(), policy)
}

fn demo_token() -> SecretString {
    SecretString::from(DEMO_USER_TOKEN)
}

/// The token the relay reads the feed with (its configured web-app token): the default world,
/// seed-2022, refuses users' tokens there.
fn feed_token() -> SecretString {
    SecretString::from(WEB_APP_CLIENT_TOKEN)
}

async fn admin(h: &SimHandle, path: &str, v: Value) -> Value {
    let r = http()
        .post(format!("{}{path}", h.admin_url()))
        .json(&v)
        .send()
        .await
        .expect("admin POST");
    assert_eq!(r.status(), 200, "admin {path}");
    r.json().await.expect("admin JSON")
}

async fn admin_get(h: &SimHandle, path: &str) -> Value {
    let r = http()
        .get(format!("{}{path}", h.admin_url()))
        .send()
        .await
        .expect("admin GET");
    assert_eq!(r.status(), 200, "admin {path}");
    r.json().await.expect("admin JSON")
}

async fn fault(h: &SimHandle, rule: Value) -> u64 {
    admin(h, "/faults", rule).await["id"].as_u64().expect("fault id")
}

async fn fault_hits(h: &SimHandle, id: u64) -> u64 {
    let all = admin_get(h, "/faults").await;
    let rule = all
        .as_array()
        .expect("faults")
        .iter()
        .find(|r| r["id"] == id)
        .cloned()
        .expect("rule");
    rule["hits"].as_u64().expect("hits")
}

/// Requests the simulator saw with this method and path.
async fn requests_to(h: &SimHandle, method: &str, path: &str) -> usize {
    let log = admin_get(h, "/requests").await;
    log.as_array()
        .expect("log")
        .iter()
        .filter(|e| e["method"] == method && e["path"] == path)
        .count()
}

fn data(n: usize) -> Bytes {
    Bytes::from((0..n).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>())
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// `make_body` for `upload_resumable`: the file from `offset`, in `chunk`-byte pieces.
fn bodies(file: Bytes, chunk: usize) -> impl FnMut(u64) -> Chunks {
    move |offset| {
        let rest = file.slice(usize::try_from(offset).expect("offset fits")..);
        let pieces: Vec<Result<Bytes, std::io::Error>> = (0..rest.len())
            .step_by(chunk)
            .map(|i| Ok(rest.slice(i..(i + chunk).min(rest.len()))))
            .collect();
        futures::stream::iter(pieces)
    }
}

async fn upload(c: &MapillaryClient, key: &str, file: &Bytes) -> Result<UploadReport, MapillaryError> {
    c.upload_resumable(&demo_token(), key, file.len() as u64, bodies(file.clone(), 8192))
        .await
}

async fn assert_stored(h: &SimHandle, key: &str, file: &[u8]) {
    let s = admin_get(h, &format!("/sessions/{key}")).await;
    assert_eq!(s["bytes_stored"], file.len() as u64);
    assert_eq!(s["sha256"], sha(file));
}

/// Every POST starts exactly at the offset the server reported just before it.
fn assert_resumed_at_server_offsets(r: &UploadReport) {
    assert_eq!(r.offsets_fetched.len(), r.posts.len());
    for (p, fetched) in r.posts.iter().zip(&r.offsets_fetched) {
        assert_eq!(p.offset, *fetched, "{r:?}");
    }
    let last = r.posts.last().expect("a POST");
    assert!(last.error.is_none());
    assert_eq!(
        last.bytes_sent,
        r.total_len - last.offset,
        "the final POST sent exactly the missing tail"
    );
}

fn strict_policy() -> RetryPolicy {
    RetryPolicy {
        max_retries: 5,
        ..RetryPolicy::fast()
    }
}

// ------------------------------------------------------------------------------------------ OAuth

#[tokio::test]
async fn oauth_code_flow_exchange_me_and_refresh() {
    let h = sim().await;
    let c = client(&h, RetryPolicy::fast());
    let url = c
        .authorize_url(APP_ID, REDIRECT_URI, "st4te", Some("read"))
        .expect("authorize url");
    let r = http().get(url).send().await.expect("connect");
    assert_eq!(r.status(), 302);
    let location = r.headers()["location"].to_str().expect("location").to_string();
    assert!(location.starts_with(REDIRECT_URI), "{location}");
    let location = url::Url::parse(&location).expect("redirect URL");
    let param = |k: &str| {
        location
            .query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
    };
    assert_eq!(param("state").as_deref(), Some("st4te"));
    let code = param("code").expect("code");

    let secret = SecretString::from(CLIENT_SECRET);
    let grant = c
        .exchange_code(APP_ID, &secret, &code, Some(REDIRECT_URI))
        .await
        .expect("exchange");
    assert_eq!(grant.token_type, "bearer");
    assert_eq!(grant.expires_in, Some(60 * 24 * 3600));
    assert!(grant.refresh_token.is_none());
    let me = c.me(&grant.access_token).await.expect("me");
    assert_eq!(
        (me.id.as_str(), me.username.as_str()),
        (DEMO_USER_ID, DEMO_USERNAME)
    );

    // Codes are single-use: a clear, non-ambiguous 4xx carrying Mapillary's message.
    let again = c
        .exchange_code(APP_ID, &secret, &code, None)
        .await
        .expect_err("reused code");
    assert!(
        matches!(&again, MapillaryError::Api { status: 400, message, .. } if message.contains("has been used")),
        "{again:?}"
    );
    assert!(!again.is_retriable() && !again.is_ambiguous());

    let refreshed = c
        .refresh(APP_ID, &secret, &grant.access_token)
        .await
        .expect("refresh");
    assert_ne!(
        refreshed.access_token.expose_secret(),
        grant.access_token.expose_secret()
    );
    assert_eq!(
        c.me(&refreshed.access_token).await.expect("me after refresh").id,
        DEMO_USER_ID
    );

    // A wrong client secret: Mapillary's message, never the secret itself.
    let wrong = SecretString::from("MLY|7131456283729411|not-the-secret");
    let err = c
        .refresh(APP_ID, &wrong, &grant.access_token)
        .await
        .expect_err("bad secret");
    let text = format!("{err} {err:?}");
    assert!(
        text.contains("client secret") && !text.contains("not-the-secret"),
        "{text}"
    );
    assert!(!text.contains(grant.access_token.expose_secret()), "{text}");
}

#[tokio::test]
async fn expired_token_is_unauthorized_everywhere_until_refreshed() {
    let h = sim().await;
    let c = client(&h, strict_policy());
    let issued = admin(
        &h,
        "/tokens",
        json!({"user": DEMO_USER_ID, "oauth": true, "lifetime_seconds": 60}),
    )
    .await;
    let raw = issued["access_token"].as_str().expect("token").to_string();
    let token = SecretString::from(raw.as_str());
    assert_eq!(c.me(&token).await.expect("valid at first").id, DEMO_USER_ID);
    h.advance_clock(120);

    let err = c.me(&token).await.expect_err("expired");
    assert!(err.is_unauthorized(), "{err:?}");
    assert!(!err.to_string().contains(&raw));
    assert!(c
        .fetch_offset(&token, "mly_tools_x.zip")
        .await
        .expect_err("expired")
        .is_unauthorized());
    let file = data(10_000);
    let err = c
        .upload_resumable(
            &token,
            "mly_tools_x.zip",
            file.len() as u64,
            bodies(file.clone(), 4096),
        )
        .await
        .expect_err("expired");
    assert!(
        matches!(err, MapillaryError::Unauthorized { .. }),
        "returned at once, not retried: {err:?}"
    );
    assert_eq!(
        requests_to(&h, "GET", "/rupload/mly_tools_x.zip").await,
        2,
        "no retry of an auth failure"
    );
    let feed = c
        .latest_activity(&token, DEMO_USER_ID, 50, None, 14)
        .await
        .expect_err("expired");
    assert!(feed.is_unauthorized());

    let grant = c
        .refresh(APP_ID, &SecretString::from(CLIENT_SECRET), &token)
        .await
        .expect("refresh cures");
    let report = c
        .upload_resumable(
            &grant.access_token,
            "mly_tools_x.zip",
            file.len() as u64,
            bodies(file.clone(), 4096),
        )
        .await
        .expect("upload with the new token");
    assert_eq!(report.posts.len(), 1);
    assert_stored(&h, "mly_tools_x.zip", &file).await;
}

// ---------------------------------------------------------------------------------------- rupload

#[tokio::test]
async fn resumable_upload_happy_path_and_already_complete() {
    let h = sim().await;
    let c = client(&h, strict_policy());
    let file = data(300_000);
    let report = upload(&c, "mly_tools_happy.zip", &file).await.expect("upload");
    assert_eq!(report.offsets_fetched, [0]);
    assert_eq!(report.posts.len(), 1);
    assert_eq!((report.posts[0].offset, report.posts[0].bytes_sent), (0, 300_000));
    assert_eq!(report.retries, 0);
    assert_stored(&h, "mly_tools_happy.zip", &file).await;

    // Complete already: an empty POST at Offset = size returns the same handle, 0 bytes sent.
    let again = upload(&c, "mly_tools_happy.zip", &file).await.expect("again");
    assert_eq!(again.handle, report.handle);
    assert_eq!(again.offsets_fetched, [300_000]);
    assert_eq!((again.posts[0].offset, again.posts[0].bytes_sent), (300_000, 0));
    assert_stored(&h, "mly_tools_happy.zip", &file).await;

    // upload_from: one POST from the server's offset.
    let part = c
        .upload_from(
            &demo_token(),
            "mly_tools_part.zip",
            0,
            bodies(file.clone(), 1000)(0),
        )
        .await
        .expect("single POST");
    assert_eq!((part.offset, part.bytes_sent), (0, 300_000));
    assert!(!part.handle.is_empty());
}

#[tokio::test]
async fn dropped_connection_resumes_from_the_server_offset() {
    let h = sim().await;
    let c = client(&h, strict_policy());
    let id = fault(
        &h,
        json!({"method": "POST", "path": "/rupload/*", "times": 1,
               "action": {"kind": "drop_after_bytes", "bytes": 100_000}}),
    )
    .await;
    let file = data(300_000);
    let report = upload(&c, "mly_tools_drop.zip", &file)
        .await
        .expect("upload survives the drop");
    assert_eq!(fault_hits(&h, id).await, 1);
    assert_eq!(report.offsets_fetched, [0, 100_000], "the server kept the prefix");
    assert!(report.posts[0].error.is_some());
    assert_eq!(report.posts[1].offset, 100_000);
    assert_eq!(
        report.posts[1].bytes_sent, 200_000,
        "0 bytes re-sent below the server's offset"
    );
    assert_resumed_at_server_offsets(&report);
    assert_stored(&h, "mly_tools_drop.zip", &file).await;

    // When the server discards the partial body, the client starts again from 0.
    admin(&h, "/config", json!({"keep_prefix_on_drop": false})).await;
    fault(
        &h,
        json!({"method": "POST", "path": "/rupload/*", "times": 1,
               "action": {"kind": "drop_after_bytes", "bytes": 50_000}}),
    )
    .await;
    let report = upload(&c, "mly_tools_drop2.zip", &file).await.expect("upload");
    assert_eq!(report.offsets_fetched, [0, 0]);
    assert_resumed_at_server_offsets(&report);
    assert_stored(&h, "mly_tools_drop2.zip", &file).await;
}

#[tokio::test]
async fn lost_reply_is_finished_with_an_empty_post() {
    let h = sim().await;
    let c = client(&h, strict_policy());
    fault(
        &h,
        json!({"method": "POST", "path": "/rupload/*", "times": 1, "action": {"kind": "lost_reply"}}),
    )
    .await;
    let file = data(40_000);
    let report = upload(&c, "mly_tools_lost.zip", &file).await.expect("upload");
    assert_eq!(report.offsets_fetched, [0, 40_000]);
    assert_eq!(report.posts[1].bytes_sent, 0);
    assert_eq!(report.bytes_sent(), 40_000);
    assert_stored(&h, "mly_tools_lost.zip", &file).await;
}

#[tokio::test]
async fn forced_412_refetches_the_offset_without_backoff() {
    let h = sim().await;
    // Any exponential wait would take 2 s.
    let policy = RetryPolicy {
        min_delay: Duration::from_secs(2),
        max_delay: Duration::from_secs(2),
        ..strict_policy()
    };
    let c = client(&h, policy);
    let id = fault(
        &h,
        json!({"method": "POST", "path": "/rupload/*", "times": 1, "action": {"kind": "offset_invalid"}}),
    )
    .await;
    let file = data(30_000);
    let t = Instant::now();
    let report = upload(&c, "mly_tools_412.zip", &file).await.expect("upload");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(fault_hits(&h, id).await, 1);
    assert_eq!(report.offsets_fetched, [0, 0]);
    assert_eq!(report.retries, 1);
    assert!(
        report.posts[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("offset")),
        "{report:?}"
    );
    assert_resumed_at_server_offsets(&report);
    assert_stored(&h, "mly_tools_412.zip", &file).await;
}

#[tokio::test]
async fn rate_limits_wait_backoff_ms_or_the_default() {
    let h = sim().await;
    let policy = RetryPolicy {
        rate_limit_wait: Duration::from_millis(250),
        ..strict_policy()
    };
    let c = client(&h, policy);
    let a = fault(
        &h,
        json!({"method": "POST", "path": "/rupload/*", "times": 2,
               "action": {"kind": "rate_limited", "backoff": 300}}),
    )
    .await;
    let b = fault(
        &h,
        json!({"method": "POST", "path": "/rupload/*", "times": 1,
               "action": {"kind": "rate_limited", "status": 400, "backoff": "later"}}),
    )
    .await;
    let file = data(20_000);
    let t = Instant::now();
    let report = upload(&c, "mly_tools_429.zip", &file).await.expect("upload");
    // 2 × 300 ms (`backoff`) + 250 ms (non-numeric backoff, no Retry-After → default).
    assert!(
        t.elapsed() >= Duration::from_millis(850),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!((fault_hits(&h, a).await, fault_hits(&h, b).await), (2, 1));
    assert_eq!(report.retries, 3);
    assert_eq!(report.posts.len(), 4);
    assert_resumed_at_server_offsets(&report);
    assert_stored(&h, "mly_tools_429.zip", &file).await;

    // A bare 429 with Retry-After in seconds.
    fault(&h, json!({"method": "POST", "path": "/rupload/*", "times": 1, "action": {"kind": "bare429", "retry_after": "1"}}))
        .await;
    let t = Instant::now();
    upload(&c, "mly_tools_429b.zip", &file).await.expect("upload");
    assert!(t.elapsed() >= Duration::from_secs(1), "took {:?}", t.elapsed());

    // A wait longer than the policy's ceiling is handed back to the caller at once.
    fault(
        &h,
        json!({"method": "POST", "path": "/rupload/*", "times": 1,
               "action": {"kind": "rate_limited", "backoff": 3_600_000}}),
    )
    .await;
    let err = upload(&c, "mly_tools_429c.zip", &file)
        .await
        .expect_err("too long to wait");
    assert!(
        matches!(err, MapillaryError::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(3600)),
        "{err:?}"
    );
    assert!(err.is_retriable());
}

#[tokio::test]
async fn server_errors_are_retried_after_retry_after() {
    let h = sim().await;
    let c = client(&h, strict_policy());
    let id = fault(
        &h,
        json!({"method": "POST", "path": "/rupload/*", "times": 1,
               "action": {"kind": "server_error", "status": 503, "retry_after": "1"}}),
    )
    .await;
    let g = fault(
        &h,
        json!({"method": "GET", "path": "/rupload/*", "times": 1, "action": {"kind": "server_error", "status": 502}}),
    )
    .await;
    let file = data(20_000);
    let t = Instant::now();
    let report = upload(&c, "mly_tools_5xx.zip", &file).await.expect("upload");
    assert!(t.elapsed() >= Duration::from_secs(1), "took {:?}", t.elapsed());
    assert_eq!((fault_hits(&h, id).await, fault_hits(&h, g).await), (1, 1));
    assert_eq!(report.retries, 2, "a failed GET offset and a failed POST");
    assert_eq!(report.posts.len(), 2);
    assert_resumed_at_server_offsets(&report);
    assert_stored(&h, "mly_tools_5xx.zip", &file).await;
}

#[tokio::test]
async fn retries_are_bounded() {
    let h = sim().await;
    let c = client(
        &h,
        RetryPolicy {
            max_retries: 3,
            ..RetryPolicy::fast()
        },
    );
    let id = fault(
        &h,
        json!({"method": "POST", "path": "/rupload/*", "times": 100, "action": {"kind": "server_error", "status": 500}}),
    )
    .await;
    let err = upload(&c, "mly_tools_never.zip", &data(5_000))
        .await
        .expect_err("gives up");
    assert!(
        matches!(&err, MapillaryError::Exhausted { attempts: 4, last } if matches!(**last, MapillaryError::Server { status: 500, .. })),
        "{err:?}"
    );
    assert_eq!(fault_hits(&h, id).await, 4);
}

#[tokio::test]
async fn non_retriable_4xx_fails_with_mapillarys_message() {
    let h = sim().await;
    let c = client(&h, strict_policy());
    let id = fault(
        &h,
        json!({"method": "POST", "path": "/rupload/*", "times": 5,
               "action": {"kind": "status", "status": 400,
                          "body": {"debug_info": {"retriable": false, "type": "InvalidUploadError",
                                                  "message": "The upload is not allowed here"}}}}),
    )
    .await;
    let err = upload(&c, "mly_tools_bad.zip", &data(5_000))
        .await
        .expect_err("fatal");
    assert_eq!(
        err.to_string(),
        "Mapillary error 400 InvalidUploadError: The upload is not allowed here"
    );
    assert!(!err.is_retriable());
    assert_eq!(fault_hits(&h, id).await, 1, "not retried");

    // The same status marked retriable is retried.
    let h = sim().await;
    let id = fault(
        &h,
        json!({"method": "POST", "path": "/rupload/*", "times": 1,
               "action": {"kind": "status", "status": 400,
                          "body": {"debug_info": {"retriable": true, "type": "TransientError", "message": "try again"}}}}),
    )
    .await;
    let c = client(&h, strict_policy());
    let report = upload(&c, "mly_tools_again.zip", &data(5_000))
        .await
        .expect("retried");
    assert_eq!((fault_hits(&h, id).await, report.retries), (1, 1));
}

// ------------------------------------------------------------------------- finish_upload + graph

/// A STORED zip of `n` geotagged JPEGs (1 s apart from 2024-05-01T09:00:00Z, heading 45°).
/// The relay's zip of them ([`shared::domain::toolszip`]: MAP* descriptions, mapillary_tools' comment), which
/// every world accepts.
fn zip_of_images(n: usize) -> Bytes {
    let mut t = TrackSpec::new(50.8966, -0.5591, time::macros::datetime!(2024-05-01 09:00:00 UTC));
    t.altitude = Some(42.5);
    let originals: Vec<Vec<u8>> = track(n, &t).iter().map(jpeg).collect();
    Bytes::from(shared::domain::toolszip::tools_zip(&originals).expect("tools zip"))
}

async fn clusters(h: &SimHandle) -> usize {
    admin_get(h, "/clusters")
        .await
        .as_array()
        .expect("clusters")
        .len()
}

#[tokio::test]
async fn finish_upload_is_called_once_and_classifies_failures() {
    let h = sim().await;
    let c = client(&h, strict_policy());
    let file = zip_of_images(2);
    let report = upload(&c, "mly_tools_fin.zip", &file).await.expect("upload");
    let token = demo_token();

    let cluster = c
        .finish_upload(&token, &report.handle, FileType::Zip, None)
        .await
        .expect("finish");
    assert!(
        !cluster.is_empty() && cluster.chars().all(|ch| ch.is_ascii_digit()),
        "{cluster}"
    );
    assert_eq!(clusters(&h).await, 1);
    assert_eq!(requests_to(&h, "POST", "/graph/finish_upload").await, 1);

    // 5xx after the cluster was created: ambiguous, not retried.
    fault(
        &h,
        json!({"method": "POST", "path": "/graph/finish_upload", "times": 1, "phase": "after",
               "action": {"kind": "server_error", "status": 500}}),
    )
    .await;
    let err = c
        .finish_upload(&token, &report.handle, FileType::Zip, None)
        .await
        .expect_err("5xx");
    assert!(
        matches!(err, MapillaryError::Server { status: 500, .. }) && err.is_ambiguous(),
        "{err:?}"
    );
    assert_eq!(
        requests_to(&h, "POST", "/graph/finish_upload").await,
        2,
        "exactly one request per call"
    );
    assert_eq!(clusters(&h).await, 2, "the ambiguous call did create a cluster");

    // Connection dropped after the handler ran: ambiguous transport failure.
    fault(
        &h,
        json!({"method": "POST", "path": "/graph/finish_upload", "times": 1, "phase": "after",
               "action": {"kind": "drop_connection"}}),
    )
    .await;
    let err = c
        .finish_upload(&token, &report.handle, FileType::Zip, None)
        .await
        .expect_err("dropped");
    assert!(
        matches!(
            err,
            MapillaryError::Transport {
                kind: TransportKind::Other | TransportKind::Timeout,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_ambiguous());
    assert_eq!(requests_to(&h, "POST", "/graph/finish_upload").await, 3);

    // A 4xx definitely created nothing.
    let before = clusters(&h).await;
    let err = c
        .finish_upload(&token, "not-a-handle", FileType::Zip, None)
        .await
        .expect_err("bad handle");
    assert!(
        matches!(&err, MapillaryError::Api { status: 400, message, .. } if message.contains("file_handle")),
        "{err:?}"
    );
    assert!(!err.is_ambiguous() && !err.is_retriable());
    let err = c
        .finish_upload(&token, &report.handle, FileType::Zip, Some("999"))
        .await
        .expect_err("unknown org");
    assert!(
        matches!(
            err,
            MapillaryError::Api {
                code: Some(100),
                subcode: Some(33),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(clusters(&h).await, before);

    // With the seeded organization.
    let with_org = c
        .finish_upload(
            &token,
            &report.handle,
            FileType::Zip,
            Some(mapillary_sim::defaults::DEMO_ORG_ID),
        )
        .await
        .expect("finish with org");
    let info = admin_get(&h, &format!("/clusters/{with_org}")).await;
    assert_eq!(info["organization_id"], mapillary_sim::defaults::DEMO_ORG_ID);
}

#[tokio::test]
async fn feed_then_image_entities_after_processing() {
    let h = sim().await;
    admin(&h, "/plans/default", json!({"stage_seconds": [10, 10, 10, 10]})).await;
    let c = client(&h, strict_policy());
    let token = demo_token();
    let report = upload(&c, "mly_tools_feed.zip", &zip_of_images(3))
        .await
        .expect("upload");
    let cluster = c
        .finish_upload(&token, &report.handle, FileType::Zip, None)
        .await
        .expect("finish");

    let page = c
        .latest_activity(&feed_token(), DEMO_USER_ID, 50, None, 14)
        .await
        .expect("feed");
    assert!(page.user_found && !page.has_next_page);
    let node = page
        .nodes
        .iter()
        .find(|n| n.cluster_id == cluster)
        .expect("cluster in feed");
    assert!(node.image_id.is_none(), "no images before stage 2");
    assert!(!node.stages.all_finished());

    h.advance_clock(25);
    let via_query = client(&h, strict_policy()).with_graphql_token_transport(TokenTransport::QueryParam);
    let page = via_query
        .latest_activity(&feed_token(), DEMO_USER_ID, 50, None, 14)
        .await
        .expect("feed, token as param");
    let node = page
        .nodes
        .iter()
        .find(|n| n.cluster_id == cluster)
        .expect("cluster in feed");
    assert_eq!(node.item_count, Some(3));
    let image_id = node.image_id.clone().expect("image id after stage 2");

    let img = c.image(&token, &image_id, IMAGE_FIELDS).await.expect("image");
    assert_eq!(img.id, image_id);
    assert_eq!(
        img.captured_at_ms,
        Some(1_714_554_000_000),
        "first image at 09:00:00Z"
    );
    let at = img.geometry.expect("geometry");
    assert!(
        (at.lon - -0.5591).abs() < 1e-7 && (at.lat - 50.8966).abs() < 1e-7,
        "{at:?}"
    );
    assert_eq!(img.altitude, Some(42.5));
    assert_eq!(img.compass_angle, Some(45.0));
    let sequence = img.sequence.expect("sequence id");

    let ids = c.image_ids(&token, &sequence).await.expect("image_ids");
    assert_eq!(ids.len(), 3);
    assert_eq!(ids[0], image_id);
    let last = c
        .image(&token, &ids[2], &["id", "captured_at"])
        .await
        .expect("last image");
    assert_eq!(last.captured_at_ms, Some(1_714_554_002_000));
    assert_eq!(last.sequence, None, "only requested fields are read");

    let err = c
        .image(&token, "999999", IMAGE_FIELDS)
        .await
        .expect_err("unknown image");
    assert!(
        matches!(
            err,
            MapillaryError::Api {
                code: Some(100),
                subcode: Some(33),
                ..
            }
        ),
        "{err:?}"
    );

    let nobody = c
        .latest_activity(&feed_token(), "1", 50, None, 14)
        .await
        .expect("unknown user");
    assert!(!nobody.user_found && nobody.nodes.is_empty());
    assert_eq!(
        c.user(&token, DEMO_USER_ID).await.expect("user").username,
        DEMO_USERNAME
    );
}

#[tokio::test]
async fn feed_drift_and_graph_rate_limits_are_classified() {
    let h = sim().await;
    let c = client(&h, strict_policy());
    let token = demo_token();
    fault(
        &h,
        json!({"path": "/graph/graphql", "times": 1, "action": {"kind": "graph_rate_limit"}}),
    )
    .await;
    let err = c
        .latest_activity(&feed_token(), DEMO_USER_ID, 50, None, 14)
        .await
        .expect_err("rate limited");
    assert!(
        matches!(err, MapillaryError::RateLimited { .. }) && err.is_retriable(),
        "{err:?}"
    );

    fault(
        &h,
        json!({"path": "/graph/graphql", "times": 1, "action": {"kind": "reduce_data"}}),
    )
    .await;
    let err = c
        .latest_activity(&feed_token(), DEMO_USER_ID, 50, None, 14)
        .await
        .expect_err("reduce data");
    assert!(
        err.to_string().contains("Please reduce the amount of data"),
        "{err}"
    );

    let report = upload(&c, "mly_tools_drift.zip", &zip_of_images(1))
        .await
        .expect("upload");
    c.finish_upload(&token, &report.handle, FileType::Zip, None)
        .await
        .expect("finish");
    fault(
        &h,
        json!({"path": "/graph/graphql", "times": 1, "action": {"kind": "remove_node_field", "field": "cluster_id"}}),
    )
    .await;
    let err = c
        .latest_activity(&feed_token(), DEMO_USER_ID, 50, None, 14)
        .await
        .expect_err("drifted");
    assert!(
        matches!(
            err,
            MapillaryError::Feed(shared::mapillary::feed::FeedError::Shape(_))
        ),
        "{err:?}"
    );
    assert!(!err.is_retriable());
}

#[tokio::test]
async fn a_broken_body_source_fails_the_upload_without_retry() {
    let h = sim().await;
    let c = client(&h, strict_policy());
    let file = data(20_000);
    // The stream ends early: never let the server complete a short file.
    let short = file.slice(..10_000);
    let err = c
        .upload_resumable(&demo_token(), "mly_tools_short.zip", 20_000, bodies(short, 4096))
        .await
        .expect_err("short body");
    assert!(
        matches!(&err, MapillaryError::BodySource(m) if m.contains("10000 of 20000")),
        "{err:?}"
    );
    assert!(!err.is_retriable());
    // One step only (the POST may not even reach the server before the client aborts it).
    assert_eq!(requests_to(&h, "GET", "/rupload/mly_tools_short.zip").await, 1);
    assert!(requests_to(&h, "POST", "/rupload/mly_tools_short.zip").await <= 1);
    let stored = c
        .fetch_offset(&demo_token(), "mly_tools_short.zip")
        .await
        .expect("offset");
    assert!(
        stored <= 10_000,
        "never more than the bytes the stream gave: {stored}"
    );

    // The source itself fails (e.g. an S3 read).
    let failing = |_offset: u64| {
        futures::stream::iter(vec![
            Ok(Bytes::from_static(b"abc")),
            Err(std::io::Error::other("S3 read failed")),
        ])
    };
    let err = c
        .upload_resumable(&demo_token(), "mly_tools_fail.zip", 100, failing)
        .await
        .expect_err("source fails");
    assert!(
        matches!(&err, MapillaryError::BodySource(m) if m.contains("S3 read failed")),
        "{err:?}"
    );
    assert_eq!(requests_to(&h, "GET", "/rupload/mly_tools_fail.zip").await, 1);
}

#[tokio::test]
async fn bounded_posts_are_complete_requests_read_on_from_one_body_stream() {
    let h = Simulator::start(
        SimConfig::world(mapillary_sim::World::PartialBytesDropped),
        "127.0.0.1:0",
    )
    .await
    .expect("simulator starts");
    let c = client(&h, RetryPolicy::fast());
    let file = data(100_000);
    let key = "mly_tools_bounded.zip";
    let mut made = Vec::new();
    let mut make = bodies(file.clone(), 7_000);
    let limits = UploadLimits {
        max_post_bytes: 30_000,
        stop_at: None,
    };
    let out = c
        .upload_until(
            &demo_token(),
            key,
            file.len() as u64,
            |offset| {
                made.push(offset);
                make(offset)
            },
            limits,
        )
        .await
        .expect("upload");
    let UploadOutcome::Complete(r) = out else {
        panic!("no stop time: {out:?}")
    };
    assert_eq!(made, [0], "the body is produced once and read on by every POST");
    let sizes: Vec<u64> = r.posts.iter().map(|p| p.bytes_sent).collect();
    assert_eq!(sizes, [30_000, 30_000, 30_000, 10_000]);
    assert_eq!(r.offsets_fetched, [0, 30_000, 60_000, 90_000]);
    assert!(!r.handle.is_empty());
    assert_stored(&h, key, &file).await;
    // Each POST ended normally and carried its range (the server says so, not only the client).
    let log = admin_get(&h, "/requests").await;
    let posts: Vec<&Value> = log
        .as_array()
        .expect("log")
        .iter()
        .filter(|e| e["method"] == "POST")
        .collect();
    assert_eq!(posts.len(), 4);
    for (p, start) in posts.iter().zip([0u64, 30_000, 60_000, 90_000]) {
        assert_eq!(p["detail"]["complete"], true, "{p}");
        assert_eq!(p["detail"]["start"], start, "{p}");
    }
}

#[tokio::test]
async fn a_stop_time_pauses_between_posts_and_a_later_call_resumes_from_the_server() {
    let h = sim().await;
    let c = client(&h, RetryPolicy::fast());
    let file = data(90_000);
    let key = "mly_tools_paused.zip";
    // Every POST takes 300 ms; no POST may start 100 ms after the call began: one POST, then paused.
    fault(
        &h,
        json!({"method": "POST", "path": "/rupload/*", "times": 1, "action": {"kind": "latency", "ms": 300}}),
    )
    .await;
    let limits = UploadLimits {
        max_post_bytes: 40_000,
        stop_at: Some(Instant::now() + Duration::from_millis(100)),
    };
    let out = c
        .upload_until(&demo_token(), key, 90_000, bodies(file.clone(), 5_000), limits)
        .await
        .expect("upload");
    let UploadOutcome::Paused(r) = out else {
        panic!("expected a pause: {out:?}")
    };
    assert_eq!(r.posts.len(), 1, "{r:?}");
    assert_eq!(r.posts[0].bytes_sent, 40_000);
    assert!(r.handle.is_empty());
    let s = admin_get(&h, &format!("/sessions/{key}")).await;
    assert_eq!(s["bytes_stored"], 40_000, "the finished POST is stored");
    // A later call asks the server for its offset and sends only the rest.
    let r = upload(&c, key, &file).await.expect("resume");
    assert_eq!(r.offsets_fetched[0], 40_000);
    assert_eq!(r.bytes_sent(), 50_000);
    assert_stored(&h, key, &file).await;
}
