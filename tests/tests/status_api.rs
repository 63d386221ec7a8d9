//! status-api on the local stack: the router's dependencies composed by `status_api::compose` as
//! `main.rs` composes them (DynamoDB and KMS of a stack created from `infra/template.yaml` in the
//! shared moto, the DynamoDB OAuth-state store, the Mapillary app against the in-process simulator;
//! only the retry policy made fast), called with the API Gateway v2 events of `events/apigw-v2/`
//! (path, query and `sub` adjusted per call).
//!
//! The records it reads are written by the real producers: zip-and-push's handler (sequences,
//! uploads, images) and the poller (tracking records, image links), both with the token that the
//! OAuth flow of this API stored; or, for the listing test, through `DynamoRepository`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use aws_lambda_events::event::sqs::SqsEvent;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use http_body_util::BodyExt;
use integration_tests::moto::shared_moto;
use integration_tests::repo_root;
use integration_tests::stack::{self, LocalStack, SimEndpoints};
use mapillary_sim::defaults::{self, APP_ID, CLIENT_SECRET, DEMO_USERNAME, DEMO_USER_ID};
use mapillary_sim::{SimConfig, SimHandle, Simulator};
use relay_fixtures::{jpeg, track, TrackSpec};
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use shared::adapters::s3::S3ObjectStore;
use shared::mapillary::retry::RetryPolicy;
use shared::model::{RejectedImage, SequenceRecord, SequenceState};
use shared::ports::{AccountClaims, SequenceStore, TokenStore, UploadStore};
use status_api::compose::ProductionDeps;
use status_api::config::Settings;
use status_api::router;
use time::macros::datetime;
use time::OffsetDateTime;
use tower::ServiceExt;

type Api = ProductionDeps;

/// The `sub` of the sample events.
const USER: &str = "user-1";
const OTHER: &str = "user-2";
const SQS_SAMPLE: &str = include_str!("../../events/sqs/s3-manifest-created-moto.json");

struct World {
    stack: LocalStack,
    sim: SimHandle,
    api: Arc<Api>,
    app: axum::Router,
    http: reqwest::Client,
}

fn http() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

fn settings() -> Settings {
    Settings {
        redirect_uri: Some(defaults::REDIRECT_URI.into()),
        ..Settings::default()
    }
}

/// A function's environment for `stack` and `sim` (what `cargo lambda watch` would pass, the web-app feed
/// token included, as the local stack gives it), as a lookup.
fn lambda_env(stack: &LocalStack, sim: &SimHandle) -> impl Fn(&str) -> Option<String> {
    let env = stack.lambda_env(
        &SimEndpoints::from_base(sim.base_url(), APP_ID, CLIENT_SECRET)
            .with_feed_token(defaults::WEB_APP_CLIENT_TOKEN),
    );
    move |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
}

/// The API's dependencies as `main.rs` composes them, for `stack` and `sim` (fast retries, `settings`).
async fn api_deps(stack: &LocalStack, sim: &SimHandle, settings: Settings) -> Result<Arc<Api>> {
    let config = status_api::config::Config::from_lookup(lambda_env(stack, sim))?;
    let mut deps = status_api::compose::compose(&config, stack.sdk_config()).await?;
    deps.mapillary = deps.mapillary.with_retry_policy(RetryPolicy::fast());
    deps.settings = settings;
    Ok(Arc::new(deps))
}

async fn world(tag: &str) -> Result<World> {
    let stack = LocalStack::create(&shared_moto()?, &stack::unique_stack_name(tag)).await?;
    let sim = Simulator::start(SimConfig::frozen(), "127.0.0.1:0").await?;
    let http = http()?;
    let api = api_deps(&stack, &sim, settings()).await?;
    let app = router(api.clone());
    Ok(World {
        stack,
        sim,
        api,
        app,
        http,
    })
}

// ------------------------------------------------------------------ events and calls

/// A sample event from `events/apigw-v2/`.
fn event(name: &str) -> Value {
    let path = repo_root().join("events/apigw-v2").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `v` for another path and query (raw and parsed forms kept consistent).
fn at(mut v: Value, path: &str, query: &str) -> Value {
    v["rawPath"] = path.into();
    v["requestContext"]["http"]["path"] = path.into();
    v["rawQueryString"] = query.into();
    let obj = v.as_object_mut().expect("an event object");
    obj.remove("queryStringParameters");
    obj.remove("pathParameters");
    if let Some(rest) = path.strip_prefix("/v1/sequences/") {
        let id = rest.trim_end_matches("/images");
        v["pathParameters"] = json!({ "sequence_id": id });
    }
    v
}

/// `v` as signed in by `user` (the JWT authorizer's `sub` claim).
fn as_user(mut v: Value, user: &str) -> Value {
    v["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] = user.into();
    v
}

#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: String,
    headers: http::HeaderMap,
    body: Value,
    raw: String,
}

async fn call(app: &axum::Router, v: &Value) -> Reply {
    let req = lambda_http::request::from_str(&v.to_string()).expect("an API Gateway v2 event");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let raw = String::from_utf8_lossy(&bytes).into_owned();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    assert_user_facing(&body, &raw);
    Reply {
        status,
        content_type,
        headers,
        body,
        raw,
    }
}

/// The JSON keys whose values are texts for users: reasons, errors and problem details.
const REASON_KEYS: [&str; 7] = [
    "reason",
    "error",
    "error_explanation",
    "message",
    "detail",
    "title",
    "note",
];

/// What Rust debug formatting and internal errors look like inside a text (issue 15, item 7: a
/// reason shown to users never quotes them).
const INTERNAL_MARKS: [&str; 16] = [
    "Some(",
    "None,",
    "Ok(",
    "Err(",
    "Error {",
    "Error(",
    "::",
    "{ ",
    " }",
    "\\\"",
    "SdkError",
    "DispatchFailure",
    "ServiceError",
    "RepoError",
    "StoreError",
    "TokenError",
];

/// The texts under [`REASON_KEYS`] anywhere in `v`.
fn reasons_in(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match v {
                    Value::String(s) if REASON_KEYS.contains(&k.as_str()) => out.push(s.clone()),
                    _ => reasons_in(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| reasons_in(v, out)),
        _ => {}
    }
}

/// Every answer of the status API in these tests goes through this: no `s3://` URL anywhere in
/// it, and no reason, error or problem detail with debug formatting or internal error names.
fn assert_user_facing(body: &Value, raw: &str) {
    assert!(
        !raw.contains("s3://"),
        "the status API served an s3:// URL: {raw}"
    );
    let mut texts = Vec::new();
    reasons_in(body, &mut texts);
    for text in texts {
        for mark in INTERNAL_MARKS {
            assert!(
                !text.contains(mark),
                "a user-facing text holds {mark:?} (debug formatting or an internal error): {text:?}"
            );
        }
    }
}

fn assert_problem(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.raw);
    assert_eq!(r.content_type, "application/problem+json", "{}", r.raw);
    assert_eq!(r.body["code"], code, "{}", r.raw);
}

/// The callback event carrying `cookie` (the `name=value` pair the connect reply set; empty: none).
fn callback(code: &str, state: &str, cookie: &str) -> Value {
    let mut v = at(
        event("get-callback.json"),
        "/v1/mapillary/callback",
        &format!("code={code}&state={state}"),
    );
    let obj = v.as_object_mut().expect("an event object");
    obj.remove("cookies");
    if !cookie.is_empty() {
        v["cookies"] = json!([cookie]);
    }
    v
}

impl World {
    /// `POST /v1/mapillary/connect` as `user`, then the simulator's consent page: (code, state,
    /// the browser-binding cookie pair the connect reply set).
    async fn consent(&self, app: &axum::Router, user: &str) -> Result<(String, String, String)> {
        self.consent_as(app, user, None).await
    }

    /// [`Self::consent`], the simulator consenting as Mapillary user `sim_user` (default: the demo
    /// user).
    async fn consent_as(
        &self,
        app: &axum::Router,
        user: &str,
        sim_user: Option<&str>,
    ) -> Result<(String, String, String)> {
        let r = call(app, &as_user(event("post-connect.json"), user)).await;
        ensure!(r.status == 200, "connect: {}", r.raw);
        let cookie = r
            .headers
            .get(http::header::SET_COOKIE)
            .context("connect sets the verifier cookie")?
            .to_str()?
            .split(';')
            .next()
            .unwrap_or_default()
            .to_string();
        ensure!(cookie.starts_with("relay_oauth_verifier="), "{cookie}");
        let url = url::Url::parse(r.body["authorize_url"].as_str().context("authorize_url")?)?;
        ensure!(
            url.as_str()
                .starts_with(&format!("{}/www/connect?", self.sim.base_url())),
            "{url}"
        );
        let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
        ensure!(
            q["client_id"] == APP_ID && q["redirect_uri"] == defaults::REDIRECT_URI,
            "{q:?}"
        );
        let mut consent_url = url.clone();
        if let Some(who) = sim_user {
            consent_url.query_pairs_mut().append_pair("sim_user", who);
        }
        let resp = self.http.get(consent_url).send().await?;
        ensure!(resp.status().is_redirection(), "consent: {}", resp.status());
        let location = url::Url::parse(
            resp.headers()
                .get("location")
                .context("consent redirect")?
                .to_str()?,
        )?;
        ensure!(
            location.as_str().starts_with(defaults::REDIRECT_URI),
            "{location}"
        );
        let back: HashMap<String, String> = location.query_pairs().into_owned().collect();
        ensure!(back.get("state") == q.get("state"), "the state comes back");
        Ok((back["code"].clone(), back["state"].clone(), cookie))
    }

    /// The raw UsersTable items of `user` (token item) — what an operator with table access sees.
    async fn user_items(&self, user: &str) -> Result<Vec<HashMap<String, AttributeValue>>> {
        let out = self
            .stack
            .dynamodb()
            .query()
            .table_name(&self.stack.users_table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", AttributeValue::S(format!("USER#{user}")))
            .consistent_read(true)
            .send()
            .await?;
        Ok(out.items().to_vec())
    }

    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.stack
            .s3()
            .put_object()
            .bucket(&self.stack.bucket)
            .key(key)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .with_context(|| format!("PutObject {key}"))?;
        Ok(())
    }

    /// Receives from the ingest queue until one S3 notification with `Records` arrived (moto's
    /// `s3:TestEvent` is deleted on the way).
    async fn notification(&self) -> Result<Message> {
        let sqs = self.stack.sqs();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            ensure!(Instant::now() < deadline, "no S3 notification arrived");
            let got = sqs
                .receive_message()
                .queue_url(&self.stack.ingest_queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send()
                .await?;
            for m in got.messages() {
                let body: Value = serde_json::from_str(m.body().unwrap_or_default())?;
                if body.get("Records").is_some() {
                    return Ok(m.clone());
                }
                sqs.delete_message()
                    .queue_url(&self.stack.ingest_queue_url)
                    .receipt_handle(m.receipt_handle().unwrap_or_default())
                    .send()
                    .await?;
            }
        }
    }
}

/// A Lambda SQS event shaped like `events/sqs/s3-manifest-created-moto.json` for `m`.
fn sqs_event(m: &Message) -> Result<SqsEvent> {
    let sample: Value = serde_json::from_str(SQS_SAMPLE)?;
    let mut r = sample["Records"][0].clone();
    r["messageId"] = json!(m.message_id());
    r["receiptHandle"] = json!(m.receipt_handle());
    r["body"] = json!(m.body());
    r["md5OfBody"] = json!(m.md5_of_body());
    let attrs: BTreeMap<String, String> = m
        .attributes()
        .map(|a| {
            a.iter()
                .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    r["attributes"] = json!(attrs);
    Ok(serde_json::from_value(json!({ "Records": [r] }))?)
}

fn sim_now(sim: &SimHandle) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(sim.sim().now_ms()) * 1_000_000).expect("time")
}

// ------------------------------------------------------------------ the whole path

/// Connect through the API (the simulator consents), then zip-and-push uploads a sequence with the
/// token the callback stored and the poller tracks it with the same token; the API then reports
/// what those two wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_token_feeds_zip_and_push_and_the_poller_and_the_status_reflects_both() -> Result<()> {
    let w = world("api-e2e").await?;

    // Not connected yet.
    let r = call(&w.app, &event("get-connection.json")).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["connected"], false);

    // Connect: authorize URL → simulator consent → callback (no JWT on the callback).
    let (code, state, cookie) = w.consent(&w.app, USER).await?;
    let r = call(&w.app, &callback(&code, &state, &cookie)).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["connected"], true);
    assert_eq!(r.body["username"], DEMO_USERNAME);
    assert_eq!(r.body["mapillary_user_id"], DEMO_USER_ID);
    let stored = w.api.tokens.load(USER).await?.context("token saved")?;
    let token = stored.access_token.expose_secret().to_string();
    assert!(token.len() >= 16, "a real token");
    assert!(!r.raw.contains(&token), "the callback never answers the token");
    let expires_at = stored.expires_at.context("Mapillary gave an expiry")?;
    assert!(expires_at > OffsetDateTime::now_utc());

    // At rest: KMS ciphertext only; no attribute holds the token in clear.
    let items = w.user_items(USER).await?;
    let item = items
        .iter()
        .find(|i| i.get("sk").and_then(|v| v.as_s().ok()).map(String::as_str) == Some("MAPILLARY"))
        .context("token item")?;
    for (name, v) in item {
        match v {
            AttributeValue::S(s) => assert!(!s.contains(&token), "{name} holds the token"),
            AttributeValue::B(b) => {
                assert!(
                    !b.as_ref().windows(token.len()).any(|w| w == token.as_bytes()),
                    "{name} holds the token"
                )
            }
            _ => {}
        }
    }
    let ciphertext = item
        .get("ciphertext")
        .and_then(|v| v.as_b().ok())
        .context("ciphertext")?;
    let plain = w
        .stack
        .kms()
        .decrypt()
        .ciphertext_blob(ciphertext.clone())
        .encryption_context("user_id", USER)
        .send()
        .await
        .context("the ciphertext is a KMS ciphertext bound to the user")?;
    let plain = String::from_utf8(plain.plaintext().context("plaintext")?.as_ref().to_vec())?;
    assert!(plain.contains(&token), "it decrypts to the token");

    // The connection as the API shows it: username and expiry, never the token.
    let r = call(&w.app, &event("get-connection.json")).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["connected"], true);
    assert_eq!(r.body["username"], DEMO_USERNAME);
    assert_eq!(r.body["expired"], false);
    let shown = OffsetDateTime::parse(
        r.body["expires_at"].as_str().context("expires_at")?,
        &time::format_description::well_known::Rfc3339,
    )?;
    assert_eq!(shown.unix_timestamp(), expires_at.unix_timestamp());
    assert!(!r.raw.contains(&token));
    assert_eq!(r.headers["cache-control"], "no-store");

    // zip-and-push with the stored token (the only token of USER), composed as its `main.rs` does
    // (S3 path-style for moto, fast retries).
    let config = zip_and_push::config::Config::from_lookup(lambda_env(&w.stack, &w.sim))?;
    let mut zp = zip_and_push::compose::compose(&config, w.stack.sdk_config()).await?;
    zp.store = S3ObjectStore::new(w.stack.s3());
    zp.mapillary = zp.mapillary.with_retry_policy(RetryPolicy::fast());
    zp.tunables = zip_and_push::config::Tunables::default();
    let n = 6;
    let mut t = TrackSpec::new(48.2, 16.37, datetime!(2024-04-20 08:00:00 UTC));
    t.interval_ms = 2000;
    t.step_m = 8.0;
    t.altitude = Some(120.0);
    for (i, spec) in track(n, &t).iter().enumerate() {
        w.put(&format!("sequences/{USER}/s1/img_{i:04}.jpg"), jpeg(spec))
            .await?;
    }
    w.put(&format!("sequences/{USER}/s1/manifest.json"), b"{}".to_vec())
        .await?;
    let m = w.notification().await?;
    let resp =
        zip_and_push::handle_batch(&zp, sqs_event(&m)?, Instant::now() + Duration::from_secs(600)).await;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");

    // Before the poller: uploaded and handed off, no Mapillary status yet.
    let r = call(&w.app, &at(event("get-status.json"), "/v1/sequences/s1", "")).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["state"], "UPLOADED");
    assert_eq!(r.body["image_count"], n);
    let up = &r.body["uploads"][0];
    assert_eq!(up["state"], "HANDED_OFF");
    assert!(up["cluster_id"].is_string(), "{up:#}");
    assert!(up["mapillary"].is_null(), "{up:#}");

    // The poller, with the same token store, follows the simulator's clock through the stages.
    let config = poller::config::Config::from_lookup(lambda_env(&w.stack, &w.sim))?;
    let mut poller = poller::compose::compose(&config, w.stack.sdk_config()).await?;
    poller.mapillary = poller.mapillary.with_retry_policy(RetryPolicy::fast());
    poller.tunables = poller::config::Tunables::default();
    poller.clock = poller::clock::Clock::manual(sim_now(&w.sim));
    let run = poller::run_once(&poller, Instant::now() + Duration::from_secs(120)).await;
    assert_eq!(run.intake.created, 1, "{run:?}");
    let r = call(&w.app, &at(event("get-status.json"), "/v1/sequences/s1", "")).await;
    assert_eq!(
        r.body["uploads"][0]["mapillary"]["state"], "IN_PROGRESS",
        "{}",
        r.raw
    );
    for secs in [61, 600, 1800, 3600] {
        w.sim.advance_clock(secs);
        poller.clock.set_ms(w.sim.sim().now_ms());
        let run = poller::run_once(&poller, Instant::now() + Duration::from_secs(120)).await;
        assert!(run.errors.is_empty(), "{:?}", run.errors);
    }

    // The status document: stages with labels, links, counts, the path that produced them.
    let r = call(&w.app, &at(event("get-status.json"), "/v1/sequences/s1", "")).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.content_type, "application/json");
    let mly = &r.body["uploads"][0]["mapillary"];
    assert_eq!(mly["state"], "FINISHED", "{mly:#}");
    let stages: Vec<(&str, &str)> = mly["stages"]
        .as_array()
        .context("stages")?
        .iter()
        .map(|s| {
            (
                s["label"].as_str().unwrap_or("?"),
                s["status"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(
        stages,
        [
            ("Image ingestion", "FINISHED"),
            ("Image processing", "FINISHED"),
            ("Map data processing", "FINISHED"),
            ("Map update", "FINISHED"),
        ]
    );
    assert_eq!(mly["status_source"], "ACTIVITY_FEED");
    assert_eq!(mly["accepted_count"], n);
    assert_eq!(mly["rejected_count"], 0);
    let seqs = mly["sequences"].as_array().context("sequences")?;
    assert_eq!(seqs.len(), 1, "{mly:#}");
    assert!(
        seqs[0]["link"]
            .as_str()
            .is_some_and(|l| l.starts_with("https://www.mapillary.com/app/?pKey=")),
        "{mly:#}"
    );
    assert!(mly["error_explanation"].is_string() || mly["error_code"].is_null());

    // The images: each of our keys → its Mapillary image and link.
    let r = call(
        &w.app,
        &at(event("get-images.json"), "/v1/sequences/s1/images", ""),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let images = r.body["images"].as_array().context("images")?;
    assert_eq!(images.len(), n);
    for (i, img) in images.iter().enumerate() {
        assert_eq!(img["key"], format!("sequences/{USER}/s1/img_{i:04}.jpg"));
        assert_eq!(img["status"], "LINKED", "{img:#}");
        assert_eq!(img["found_via"], "ACTIVITY_FEED");
        let id = img["mapillary_image_id"].as_str().context("image id")?;
        assert_eq!(img["link"], format!("https://www.mapillary.com/app/?pKey={id}"));
        assert_eq!(img["mapillary_sequence_id"], seqs[0]["id"]);
    }

    // The other user sees none of it.
    for path in ["/v1/sequences/s1", "/v1/sequences/s1/images"] {
        let r = call(&w.app, &as_user(at(event("get-status.json"), path, ""), OTHER)).await;
        assert_problem(&r, 404, "not-found");
    }
    let r = call(&w.app, &as_user(event("list-sequences.json"), OTHER)).await;
    assert_eq!(r.body["sequences"], json!([]), "{}", r.raw);
    let r = call(&w.app, &as_user(event("get-connection.json"), OTHER)).await;
    assert_eq!(r.body["connected"], false);
    w.sim.shutdown().await;
    Ok(())
}

// ------------------------------------------------------------------ listing and isolation

fn sequence(user: &str, id: &str, created: OffsetDateTime) -> SequenceRecord {
    SequenceRecord {
        user_id: user.into(),
        sequence_id: id.into(),
        state: SequenceState::Uploaded,
        reason: None,
        bucket: "b".into(),
        manifest_key: format!("sequences/{user}/{id}/manifest.json"),
        manifest_etag: "e".into(),
        organization_id: None,
        image_count: 2,
        accepted_count: 1,
        upload_ids: Vec::new(),
        rejected: vec![RejectedImage {
            key: "img-9.jpg".into(),
            reason: "no GPS position in EXIF".into(),
        }],
        created_at: created,
        updated_at: created,
        attempts: 1,
        progress: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_newest_first_and_users_see_only_their_own() -> Result<()> {
    let w = world("api-list").await?;
    let repo = &w.api.repo;
    // 7 sequences of USER, created one day apart, written in shuffled order; 3 of OTHER in between.
    let base = datetime!(2026-03-01 00:00 UTC);
    for i in [3, 0, 6, 1, 5, 2, 4] {
        repo.put_sequence(&sequence(
            USER,
            &format!("seq-{i}"),
            base + time::Duration::days(i),
        ))
        .await?;
    }
    for i in 0..3 {
        repo.put_sequence(&sequence(
            OTHER,
            &format!("theirs-{i}"),
            base + time::Duration::hours(12 + 24 * i),
        ))
        .await?;
    }

    // Whole list: newest first, only USER's.
    let r = call(&w.app, &event("list-sequences.json")).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let all: Vec<String> = r.body["sequences"]
        .as_array()
        .context("sequences")?
        .iter()
        .map(|s| s["sequence_id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(all, (0..7).rev().map(|i| format!("seq-{i}")).collect::<Vec<_>>());
    assert!(r.body["next_cursor"].is_null());
    assert_eq!(r.body["sequences"][0]["rejected"], Value::Null, "summary only");
    assert_eq!(r.body["sequences"][0]["image_count"], 2);

    // Pages of 3 with the cursor (starting from the page sample).
    let mut walked = Vec::new();
    let mut query = "limit=3".to_string();
    let mut pages = 0;
    loop {
        let r = call(
            &w.app,
            &at(event("list-sequences-page.json"), "/v1/sequences", &query),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.raw);
        let page = r.body["sequences"].as_array().context("sequences")?;
        assert!(page.len() <= 3);
        walked.extend(
            page.iter()
                .map(|s| s["sequence_id"].as_str().unwrap_or_default().to_string()),
        );
        pages += 1;
        match r.body["next_cursor"].as_str() {
            Some(c) => {
                assert!(!c.contains("USER#") && !c.contains(USER), "opaque: {c}");
                query = format!("limit=3&cursor={c}");
            }
            None => break,
        }
        ensure!(pages < 10, "the cursor does not advance");
    }
    assert_eq!(walked, all, "pages cover the list once, in order");
    assert_eq!(pages, 3);

    // OTHER's list, and OTHER's cursor does not open USER's data.
    let r = call(
        &w.app,
        &as_user(
            at(event("list-sequences.json"), "/v1/sequences", "limit=2"),
            OTHER,
        ),
    )
    .await;
    let theirs: Vec<&str> = r.body["sequences"]
        .as_array()
        .context("sequences")?
        .iter()
        .filter_map(|s| s["sequence_id"].as_str())
        .collect();
    assert_eq!(theirs, ["theirs-2", "theirs-1"]);
    let their_cursor = r.body["next_cursor"].as_str().context("next page")?.to_string();
    let r = call(
        &w.app,
        &at(
            event("list-sequences.json"),
            "/v1/sequences",
            &format!("cursor={their_cursor}"),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    for s in r.body["sequences"].as_array().context("sequences")? {
        assert!(
            s["sequence_id"].as_str().is_some_and(|id| id.starts_with("seq-")),
            "USER only ever sees USER's: {s}"
        );
    }

    // Another user's sequence: 404 (not 403), for the sequence and its images; its owner sees it.
    let r = call(
        &w.app,
        &at(event("get-status.json"), "/v1/sequences/theirs-1", ""),
    )
    .await;
    assert_problem(&r, 404, "not-found");
    let r = call(
        &w.app,
        &at(event("get-images.json"), "/v1/sequences/theirs-1/images", ""),
    )
    .await;
    assert_problem(&r, 404, "not-found");
    let r = call(&w.app, &event("get-status-not-found.json")).await;
    assert_problem(&r, 404, "not-found");
    let r = call(
        &w.app,
        &as_user(at(event("get-status.json"), "/v1/sequences/theirs-1", ""), OTHER),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["sequence_id"], "theirs-1");
    assert_eq!(r.body["rejected"][0]["reason"], "no GPS position in EXIF");
    let r = call(
        &w.app,
        &as_user(
            at(event("get-images.json"), "/v1/sequences/theirs-1/images", ""),
            OTHER,
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["images"][0]["status"], "REJECTED");

    // Input validation and identity.
    assert_problem(
        &call(&w.app, &event("list-sequences-bad-limit.json")).await,
        400,
        "invalid-parameter",
    );
    assert_problem(
        &call(&w.app, &event("get-status-bad-id.json")).await,
        400,
        "invalid-parameter",
    );
    assert_problem(
        &call(&w.app, &event("get-status-no-auth.json")).await,
        401,
        "unauthenticated",
    );
    for q in [
        "cursor=bm90LWEtY3Vyc29y",
        "limit=0",
        "limit=2&limit=3",
        "evil=1",
        "cursor=",
    ] {
        let r = call(&w.app, &at(event("list-sequences.json"), "/v1/sequences", q)).await;
        assert_problem(&r, 400, "invalid-parameter");
    }
    w.sim.shutdown().await;
    Ok(())
}

// ------------------------------------------------------------------ OAuth failures

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_rejects_bad_codes_replayed_expired_and_foreign_states_and_delete_forgets() -> Result<()> {
    let w = world("api-oauth").await?;

    // Bad code with a live state: Mapillary rejects it, nothing is stored, the state is used up.
    let (good_code, state, cookie) = w.consent(&w.app, USER).await?;
    let r = call(
        &w.app,
        &callback("AQbogus0code0that0mapillary0never0issued", &state, &cookie),
    )
    .await;
    assert_problem(&r, 400, "code-rejected");
    assert!(w.api.tokens.load(USER).await?.is_none());
    let r = call(&w.app, &callback(&good_code, &state, &cookie)).await;
    assert_problem(&r, 400, "state-invalid");

    // A state works once: the replay of a successful callback is rejected.
    let (code, state, cookie) = w.consent(&w.app, USER).await?;
    assert_eq!(call(&w.app, &callback(&code, &state, &cookie)).await.status, 200);
    let (fresh_code, _unused, _) = w.consent(&w.app, USER).await?;
    let r = call(&w.app, &callback(&fresh_code, &state, &cookie)).await;
    assert_problem(&r, 400, "state-invalid");

    // Expired: an API whose states live 1 s (the TTL is a setting), used 2.5 s later.
    let short = api_deps(
        &w.stack,
        &w.sim,
        Settings {
            state_ttl: Duration::from_secs(1),
            ..settings()
        },
    )
    .await?;
    let short_app = router(short);
    let (code, state, cookie) = w.consent(&short_app, USER).await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = call(&short_app, &callback(&code, &state, &cookie)).await;
    assert_problem(&r, 400, "state-expired");
    // The expired item is still there (TTL deletion is lazy) but can never be consumed.
    let r = call(&w.app, &callback(&code, &state, &cookie)).await;
    assert_problem(&r, 400, "state-expired");

    // Foreign: the state of USER presented by a signed-in OTHER; it stays usable by USER.
    let (code, state, cookie) = w.consent(&w.app, USER).await?;
    let mut foreign = callback(&code, &state, &cookie);
    foreign["requestContext"]["authorizer"] = json!({"jwt": {"claims": {"sub": OTHER}, "scopes": null}});
    assert_problem(&call(&w.app, &foreign).await, 403, "state-foreign");
    assert!(w.api.tokens.load(OTHER).await?.is_none());
    assert_eq!(call(&w.app, &callback(&code, &state, &cookie)).await.status, 200);

    // Bound to the browser that started it (issue 15, item 3): through DynamoDB, only the
    // verifier's hash is stored with the state; a callback without the cookie, or with another
    // attempt's, is refused, stores nothing and uses the state up.
    assert!(w.api.tokens.delete(USER).await?);
    let (code, state, cookie) = w.consent(&w.app, USER).await?;
    let item = w
        .stack
        .dynamodb()
        .get_item()
        .table_name(&w.stack.users_table)
        .key("pk", AttributeValue::S(format!("STATE#{state}")))
        .key("sk", AttributeValue::S("STATE".into()))
        .consistent_read(true)
        .send()
        .await?
        .item
        .context("state item")?;
    let verifier = cookie
        .strip_prefix("relay_oauth_verifier=")
        .context("cookie pair")?;
    assert_eq!(
        item.get("verifier_sha256").and_then(|v| v.as_s().ok()),
        Some(&status_api::oauth::verifier_sha256(verifier)),
        "the hash, not the verifier, is stored"
    );
    assert!(item
        .values()
        .all(|v| v.as_s().map_or(true, |s| !s.contains(verifier))));
    let r = call(&w.app, &callback(&code, &state, "")).await;
    assert_problem(&r, 400, "verifier-missing");
    assert!(w.api.tokens.load(USER).await?.is_none());
    assert_problem(
        &call(&w.app, &callback(&code, &state, &cookie)).await,
        400,
        "state-invalid",
    );
    let (code, state, own_cookie) = w.consent(&w.app, USER).await?;
    let (_, _, other_cookie) = w.consent(&w.app, USER).await?;
    let r = call(&w.app, &callback(&code, &state, &other_cookie)).await;
    assert_problem(&r, 403, "verifier-mismatch");
    assert!(w.api.tokens.load(USER).await?.is_none());
    assert_problem(
        &call(&w.app, &callback(&code, &state, &own_cookie)).await,
        400,
        "state-invalid",
    );
    let (code, state, cookie) = w.consent(&w.app, USER).await?;
    assert_eq!(call(&w.app, &callback(&code, &state, &cookie)).await.status, 200);

    // Never issued, malformed.
    let r = call(&w.app, &callback(&code, &status_api::oauth::new_state(), &cookie)).await;
    assert_problem(&r, 400, "state-invalid");
    let r = call(&w.app, &event("get-callback-bad-state.json")).await;
    assert_problem(&r, 400, "invalid-parameter");

    // DELETE forgets the token: the item is gone and the connection shows as not connected.
    assert!(!w.user_items(USER).await?.is_empty());
    let r = call(&w.app, &event("delete-connection.json")).await;
    assert_eq!(r.status, 204, "{}", r.raw);
    assert!(w.user_items(USER).await?.is_empty(), "token item deleted");
    let r = call(&w.app, &event("get-connection.json")).await;
    assert_eq!(r.body["connected"], false);
    assert!(r.body["username"].is_null());
    // Deleting again is fine.
    assert_eq!(call(&w.app, &event("delete-connection.json")).await.status, 204);
    w.sim.shutdown().await;
    Ok(())
}

/// `PUT /v1/mapillary/connection` on the composed API: the upload token is checked with `/me`,
/// stored KMS-encrypted with its kind (no plaintext in the item), shown by kind and never returned.
#[tokio::test]
async fn an_upload_token_is_stored_encrypted_with_its_kind() -> Result<()> {
    let w = world("api-upload-token").await?;
    let mut put = event("put-connection.json");
    let body = json!({ "upload_token": defaults::DEMO_USER_TOKEN }).to_string();
    put["headers"]["content-length"] = body.len().to_string().into();
    put["body"] = body.into();
    let r = call(&w.app, &put).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["kind"], "upload_token");
    assert_eq!(r.body["mapillary_user_id"], defaults::DEMO_USER_ID);
    assert!(!r.raw.contains(defaults::DEMO_USER_TOKEN));
    let items = w.user_items(USER).await?;
    assert_eq!(items.len(), 1);
    let item = &items[0];
    assert_eq!(
        item.get("token_kind")
            .and_then(|v| v.as_s().ok())
            .map(String::as_str),
        Some("upload_token")
    );
    for (name, value) in item {
        assert!(
            !format!("{value:?}").contains(defaults::DEMO_USER_TOKEN),
            "plaintext in {name}"
        );
    }
    let rec = w.api.tokens.load_record(USER).await?.context("record")?;
    assert_eq!(rec.token.access_token.expose_secret(), defaults::DEMO_USER_TOKEN);
    let r = call(&w.app, &event("get-connection.json")).await;
    assert_eq!(r.body["kind"], "upload_token", "{}", r.raw);
    assert_eq!(r.body["upload_token_required"], false);
    // The sample's placeholder token: refused by /me, the stored connection is unchanged.
    let r = call(&w.app, &event("put-connection.json")).await;
    assert_problem(&r, 400, "upload-token-rejected");
    assert_eq!(
        w.api
            .tokens
            .load(USER)
            .await?
            .context("kept")?
            .access_token
            .expose_secret(),
        defaults::DEMO_USER_TOKEN
    );
    w.sim.shutdown().await;
    Ok(())
}

/// `PUT /v1/mapillary/connection` of `token` as `user`.
fn put_upload_token(user: &str, token: &str) -> Value {
    let mut put = as_user(event("put-connection.json"), user);
    let body = json!({ "upload_token": token }).to_string();
    put["headers"]["content-length"] = body.len().to_string().into();
    put["body"] = body.into();
    put
}

/// Issue 15, item 3: one Mapillary account is connected to at most one relay user. Through the
/// composed API on DynamoDB (the claim item beside the token items) and the simulator's OAuth: a
/// second user connecting the same account — by the OAuth callback or with its upload token — gets
/// 409 and nothing is stored; the holder may reconnect; moving to another account or DELETE
/// releases the claim (then the other user connects); with shared accounts allowed both connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mapillary_account_is_connected_to_one_relay_user_unless_allowed() -> Result<()> {
    let w = world("api-one-account").await?;
    let claim_item = |account: String| {
        let db = w.stack.dynamodb();
        let table = w.stack.users_table.clone();
        async move {
            let out = db
                .get_item()
                .table_name(table)
                .key("pk", AttributeValue::S(format!("MLYUSER#{account}")))
                .key("sk", AttributeValue::S("OWNER".into()))
                .consistent_read(true)
                .send()
                .await?;
            anyhow::Ok(out.item)
        }
    };

    // USER connects the demo account: the claim item names USER.
    let (code, state, cookie) = w.consent(&w.app, USER).await?;
    let r = call(&w.app, &callback(&code, &state, &cookie)).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let item = claim_item(DEMO_USER_ID.into()).await?.context("claim item")?;
    assert_eq!(
        item.get("user_id")
            .and_then(|v| v.as_s().ok())
            .map(String::as_str),
        Some(USER)
    );

    // OTHER consents with the same Mapillary account: 409, no token, nothing about USER.
    let (code, state, cookie) = w.consent(&w.app, OTHER).await?;
    let r = call(&w.app, &callback(&code, &state, &cookie)).await;
    assert_problem(&r, 409, "mapillary-account-taken");
    assert!(!r.raw.contains(USER), "{}", r.raw);
    assert!(w.user_items(OTHER).await?.is_empty(), "no token stored");
    assert!(
        r.headers
            .get_all(http::header::SET_COOKIE)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains("Max-Age=0"))),
        "the callback clears the cookie on a refusal too"
    );
    // … nor with the account's upload token.
    let r = call(&w.app, &put_upload_token(OTHER, defaults::DEMO_USER_TOKEN)).await;
    assert_problem(&r, 409, "mapillary-account-taken");
    assert!(w.user_items(OTHER).await?.is_empty(), "no token stored");
    assert_eq!(
        w.api.tokens.claim_holder(DEMO_USER_ID).await?.as_deref(),
        Some(USER)
    );

    // The holder reconnecting is fine, by either route.
    let (code, state, cookie) = w.consent(&w.app, USER).await?;
    assert_eq!(call(&w.app, &callback(&code, &state, &cookie)).await.status, 200);
    let r = call(&w.app, &put_upload_token(USER, defaults::DEMO_USER_TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.raw);

    // A second Mapillary account: OTHER may connect it.
    let added: Value = w
        .http
        .post(format!("{}/users", w.sim.admin_url()))
        .json(&json!({ "username": "second_mapper" }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let second = added["id"].as_str().context("new user id")?.to_string();
    let second_token = added["access_token"].as_str().context("token")?.to_string();
    let (code, state, cookie) = w.consent_as(&w.app, OTHER, Some(&second)).await?;
    let r = call(&w.app, &callback(&code, &state, &cookie)).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["mapillary_user_id"], second.as_str());
    assert_eq!(w.api.tokens.claim_holder(&second).await?.as_deref(), Some(OTHER));

    // USER moves to the second account: taken. USER disconnects: the demo account is free and
    // OTHER moves to it — which releases the second account in the same transaction.
    let r = call(&w.app, &put_upload_token(USER, &second_token)).await;
    assert_problem(&r, 409, "mapillary-account-taken");
    let r = call(&w.app, &as_user(event("delete-connection.json"), USER)).await;
    assert_eq!(r.status, 204, "{}", r.raw);
    assert!(w.user_items(USER).await?.is_empty(), "token item deleted");
    assert!(
        claim_item(DEMO_USER_ID.into()).await?.is_none(),
        "claim released with it"
    );
    let (code, state, cookie) = w.consent(&w.app, OTHER).await?;
    let r = call(&w.app, &callback(&code, &state, &cookie)).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["mapillary_user_id"], DEMO_USER_ID);
    assert_eq!(
        w.api.tokens.claim_holder(DEMO_USER_ID).await?.as_deref(),
        Some(OTHER)
    );
    assert!(
        claim_item(second.clone()).await?.is_none(),
        "the previous account is released"
    );
    let r = call(&w.app, &put_upload_token(USER, &second_token)).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(w.api.tokens.claim_holder(&second).await?.as_deref(), Some(USER));

    // Shared accounts allowed (the operator's choice): USER connects the demo account OTHER holds.
    let shared = router(
        api_deps(
            &w.stack,
            &w.sim,
            Settings {
                allow_shared_accounts: true,
                ..settings()
            },
        )
        .await?,
    );
    let (code, state, cookie) = w.consent(&shared, USER).await?;
    let r = call(&shared, &callback(&code, &state, &cookie)).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    for user in [USER, OTHER] {
        let token = w.api.tokens.load(user).await?.context("connected")?;
        assert_eq!(token.mapillary_user_id.as_deref(), Some(DEMO_USER_ID), "{user}");
    }
    assert!(
        claim_item(second.clone()).await?.is_none(),
        "moving on releases USER's own claim of the second account, shared or not"
    );
    // USER's DELETE leaves OTHER's claim alone.
    let r = call(&shared, &as_user(event("delete-connection.json"), USER)).await;
    assert_eq!(r.status, 204, "{}", r.raw);
    assert_eq!(
        w.api.tokens.claim_holder(DEMO_USER_ID).await?.as_deref(),
        Some(OTHER)
    );
    w.sim.shutdown().await;
    Ok(())
}

/// Issue 15, item 7: every reason the status API serves is written for users. Reasons of every
/// kind are produced by the real producers on moto — zip-and-push's rejections (a listed image
/// missing from S3, a file that is not a JPEG, an image without GPS), a sequence failed by its
/// malformed manifest, the poller's sweep of a stuck upload — then read through every view and
/// page (list, status with its rejected pages, images with theirs). `call` scans each answer
/// ([`assert_user_facing`]); here we check that the reasons were there to be scanned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reason_the_api_serves_is_free_of_s3_urls_and_internal_text() -> Result<()> {
    let w = world("api-reasons").await?;
    let r = call(&w.app, &put_upload_token(USER, defaults::DEMO_USER_TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let config = zip_and_push::config::Config::from_lookup(lambda_env(&w.stack, &w.sim))?;
    let mut zp = zip_and_push::compose::compose(&config, w.stack.sdk_config()).await?;
    zp.store = S3ObjectStore::new(w.stack.s3());
    zp.mapillary = zp.mapillary.with_retry_policy(RetryPolicy::fast());
    zp.tunables = zip_and_push::config::Tunables::default();
    let drop = |seq: &'static str, files: Vec<(String, Vec<u8>)>, manifest: Vec<u8>| {
        let w = &w;
        let zp = &zp;
        async move {
            for (name, bytes) in files {
                w.put(&format!("sequences/{USER}/{seq}/{name}"), bytes).await?;
            }
            w.put(&format!("sequences/{USER}/{seq}/manifest.json"), manifest)
                .await?;
            let m = w.notification().await?;
            let resp =
                zip_and_push::handle_batch(zp, sqs_event(&m)?, Instant::now() + Duration::from_secs(600))
                    .await;
            anyhow::ensure!(resp.batch_item_failures.is_empty(), "{resp:?}");
            anyhow::Ok(())
        }
    };

    // Rejections: missing, not a JPEG, no GPS; three good images are uploaded.
    let mut t = TrackSpec::new(48.2, 16.37, datetime!(2024-04-20 08:00:00 UTC));
    t.interval_ms = 2000;
    t.step_m = 8.0;
    let specs = track(4, &t);
    let mut files: Vec<(String, Vec<u8>)> = specs[..3]
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("img_{i:04}.jpg"), jpeg(s)))
        .collect();
    let mut no_gps = specs[3].clone();
    no_gps.with_gps = false;
    files.push(("nogps.jpg".into(), jpeg(&no_gps)));
    files.push(("notes.jpg".into(), b"these are notes, not a picture".to_vec()));
    let manifest = json!({ "images": [
        "img_0000.jpg", "img_0001.jpg", "img_0002.jpg", "missing.jpg", "notes.jpg", "nogps.jpg"
    ]});
    drop("mixed", files, manifest.to_string().into_bytes()).await?;
    // A manifest that is not JSON: the sequence fails with a reason.
    drop("badjson", Vec::new(), b"{ images: [oops".to_vec()).await?;
    // A stuck upload (its invocations ended in the DLQ), swept by the poller.
    let repo = shared::adapters::dynamodb::DynamoRepository::new(w.stack.dynamodb(), &w.stack.uploads_table);
    let old = OffsetDateTime::now_utc() - time::Duration::hours(3);
    let stuck_id = shared::model::upload_id(USER, "stuck", 0);
    repo.put_sequence(&SequenceRecord {
        upload_ids: vec![stuck_id.clone()],
        state: SequenceState::Uploading,
        accepted_count: 1,
        image_count: 1,
        bucket: w.stack.bucket.clone(),
        manifest_key: format!("sequences/{USER}/stuck/manifest.json"),
        updated_at: old,
        rejected: Vec::new(),
        ..sequence(USER, "stuck", old)
    })
    .await?;
    repo.put_upload(&shared::model::UploadRecord {
        user_id: USER.into(),
        sequence_id: "stuck".into(),
        upload_id: stuck_id,
        index: 0,
        state: shared::model::UploadState::Uploading,
        session_key: "mly_relay_stuck.zip".into(),
        total_len: 100,
        image_count: 1,
        cluster_id: None,
        handle: None,
        organization_id: None,
        bytes_sent: 10,
        created_at: old,
        started_at: Some(old),
        finished_at: None,
        error: Some("rupload answered 503".into()),
        attempts: 5,
        outbox: Default::default(),
    })
    .await?;
    let config = poller::config::Config::from_lookup(lambda_env(&w.stack, &w.sim))?;
    let mut poller = poller::compose::compose(&config, w.stack.sdk_config()).await?;
    poller.mapillary = poller.mapillary.with_retry_policy(RetryPolicy::fast());
    poller.tunables = poller::config::Tunables::default();
    let run = poller::run_once(&poller, Instant::now() + Duration::from_secs(120)).await;
    assert_eq!(run.sweep.failed, 1, "{:?}", run.sweep);

    // Every view and page; `call` scans each answer.
    let mut reasons = Vec::new();
    let r = call(&w.app, &at(event("list-sequences.json"), "/v1/sequences", "")).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    reasons_in(&r.body, &mut reasons);
    let ids: Vec<String> = r.body["sequences"]
        .as_array()
        .context("sequences")?
        .iter()
        .filter_map(|s| s["sequence_id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(ids.len(), 3, "{}", r.raw);
    for id in &ids {
        let mut query = "rejected_limit=1".to_string();
        loop {
            let path = format!("/v1/sequences/{id}");
            let r = call(&w.app, &at(event("get-status.json"), &path, &query)).await;
            assert_eq!(r.status, 200, "{}", r.raw);
            reasons_in(&r.body, &mut reasons);
            match r.body["rejected_next_cursor"].as_str() {
                Some(c) => query = format!("rejected_limit=1&rejected_cursor={c}"),
                None => break,
            }
        }
        let mut query = "limit=2".to_string();
        loop {
            let path = format!("/v1/sequences/{id}/images");
            let r = call(&w.app, &at(event("get-images.json"), &path, &query)).await;
            assert_eq!(r.status, 200, "{}", r.raw);
            reasons_in(&r.body, &mut reasons);
            match r.body["next_cursor"].as_str() {
                Some(c) => query = format!("limit=2&cursor={c}"),
                None => break,
            }
        }
    }
    let has = |what: &str| reasons.iter().any(|r| r.contains(what));
    for what in ["missing.jpg", "not a JPEG", "no GPS position"] {
        assert!(has(what), "the rejection {what:?}: {reasons:#?}");
    }
    assert!(has("drop the manifest again"), "the sweep's reason: {reasons:#?}");
    assert!(
        has("manifest.json"),
        "the malformed manifest's reason: {reasons:#?}"
    );
    assert!(
        reasons.len() >= 6,
        "three rejections, twice (status and images), plus the failures: {reasons:#?}"
    );
    w.sim.shutdown().await;
    Ok(())
}

/// The scan of [`assert_user_facing`] catches what it is there to catch.
#[test]
fn the_user_facing_scan_catches_s3_urls_and_debug_formatting() {
    let caught = |body: Value| {
        let raw = body.to_string();
        std::panic::catch_unwind(|| assert_user_facing(&body, &raw)).is_err()
    };
    assert!(caught(json!({ "reason": "cannot read s3://bucket/key" })));
    assert!(caught(
        json!({ "uploads": [{ "error": "upload failed: Some(DispatchFailure(..))" }] })
    ));
    assert!(caught(
        json!({ "detail": "storage: ServiceError { source: NoSuchKey }" })
    ));
    assert!(caught(json!({ "sequences": [], "link": "s3://bucket/key" })));
    assert!(!caught(
        json!({ "reason": "missing key: no object \"a.jpg\" in the sequence" })
    ));
}
