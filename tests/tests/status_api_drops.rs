//! Sequences dropped through the status API, on the local stack: the router composed by
//! `status_api::compose` as `main.rs` composes it (DynamoDB, KMS and S3 of a stack created from
//! `infra/template.yaml` in the shared moto; only the S3 client made path-style for moto and the
//! retry policy fast), zip-and-push and the poller composed the same way against the in-process
//! simulator.
//!
//! The whole path: `POST /v1/sequences` → one `PUT` per file to its presigned URL with reqwest →
//! `complete` (first with a file missing: 409 naming it) → the manifest's S3 notification → zip-and-push
//! → the poller to FINISHED → `DELETE` (links in the reply, no object version and no record left,
//! 404 afterwards).
//!
//! **moto does not verify SigV4 signatures** (a presigned URL used for another key, another prefix
//! or another length is accepted by moto). So what binds a URL to its key and size is proven here
//! by verifying the signature ourselves (`sigv4_valid`: the SigV4 query-string algorithm with the
//! stack's credentials, checked first to accept the URL exactly as issued): the same signature over
//! another key, another user's prefix, another `Content-Length` or another `Content-MD5` does not
//! verify, i.e. S3 would refuse it with `SignatureDoesNotMatch`; and S3 refuses a body whose md5 is
//! not the signed `Content-MD5` (`BadDigest`), which moto does not check on these PUTs either.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use aws_lambda_events::event::sqs::SqsEvent;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use http_body_util::BodyExt;
use integration_tests::moto::shared_moto;
use integration_tests::repo_root;
use integration_tests::stack::{self, LocalStack, SimEndpoints};
use mapillary_sim::defaults::{self, APP_ID, CLIENT_SECRET, DEMO_USERNAME, DEMO_USER_ID, DEMO_USER_TOKEN};
use mapillary_sim::{SimConfig, SimHandle, Simulator};
use md5::Md5;
use relay_fixtures::{jpeg, track, TrackSpec};
use secrecy::SecretString;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shared::adapters::s3::S3ObjectStore;
use shared::mapillary::retry::RetryPolicy;
use shared::model::StoredToken;
use shared::ports::TokenStore;
use status_api::compose::ProductionDeps;
use status_api::router;
use time::macros::datetime;
use time::OffsetDateTime;
use tower::ServiceExt;

const USER: &str = "user-1";
const OTHER: &str = "user-2";
const SQS_SAMPLE: &str = include_str!("../../events/sqs/s3-manifest-created-moto.json");

struct World {
    stack: LocalStack,
    sim: SimHandle,
    api: Arc<ProductionDeps>,
    app: axum::Router,
}

fn lambda_env(stack: &LocalStack, sim: &SimHandle) -> impl Fn(&str) -> Option<String> {
    let env = stack.lambda_env(&SimEndpoints::from_base(sim.base_url(), APP_ID, CLIENT_SECRET));
    move |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
}

async fn world(tag: &str) -> Result<World> {
    let stack = LocalStack::create(&shared_moto()?, &stack::unique_stack_name(tag)).await?;
    let sim = Simulator::start(SimConfig::frozen(), "127.0.0.1:0").await?;
    let config = status_api::config::Config::from_lookup(lambda_env(&stack, &sim))?;
    ensure!(
        config.settings.drops.bucket.as_deref() == Some(stack.bucket.as_str()),
        "the template gives the status API RELAY_BUCKET"
    );
    let mut deps = status_api::compose::compose(&config, stack.sdk_config()).await?;
    deps.mapillary = deps.mapillary.with_retry_policy(RetryPolicy::fast());
    deps.objects = S3ObjectStore::new(stack.s3());
    deps.settings.redirect_uri = Some(defaults::REDIRECT_URI.into());
    let api = Arc::new(deps);
    let app = router(api.clone());
    Ok(World { stack, sim, api, app })
}

#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: String,
    body: Value,
    raw: String,
}

/// The sample `events/apigw-v2/post-sequences.json` as `method path` with `body`, signed in as `user`.
fn event(method: &str, path: &str, body: Option<&Value>, user: &str) -> Value {
    let file = repo_root().join("events/apigw-v2/post-sequences.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(file).expect("sample")).expect("json");
    v["rawPath"] = path.into();
    v["requestContext"]["http"]["path"] = path.into();
    v["requestContext"]["http"]["method"] = method.into();
    v["routeKey"] = format!("{method} {path}").into();
    v["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] = user.into();
    match body {
        Some(b) => v["body"] = b.to_string().into(),
        None => {
            v.as_object_mut().expect("object").remove("body");
        }
    }
    v
}

async fn call(app: &axum::Router, v: &Value) -> Reply {
    let req = lambda_http::request::from_str(&v.to_string()).expect("an API Gateway v2 event");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let raw = String::from_utf8_lossy(&bytes).into_owned();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        content_type,
        body,
        raw,
    }
}

// ------------------------------------------------------------------ SigV4, verified by hand

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let (mut ipad, mut opad) = ([0x36u8; 64], [0x5cu8; 64]);
    for i in 0..64 {
        ipad[i] ^= k[i];
        opad[i] ^= k[i];
    }
    let inner = Sha256::new().chain_update(ipad).chain_update(msg).finalize();
    Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

/// RFC 3986 encoding as SigV4 wants it (unreserved characters kept, everything else `%XX`).
fn aws_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Whether a `PUT` of `path` on the URL's host, with the URL's query and `headers`, carries a valid
/// SigV4 query-string signature for the stack's credentials (S3's check of a presigned request).
fn sigv4_valid(url: &url::Url, path: &str, headers: &BTreeMap<String, String>) -> Result<bool> {
    let q: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let signature = get("X-Amz-Signature").context("X-Amz-Signature")?;
    let date = get("X-Amz-Date").context("X-Amz-Date")?;
    let credential = get("X-Amz-Credential").context("X-Amz-Credential")?;
    let signed = get("X-Amz-SignedHeaders").context("X-Amz-SignedHeaders")?;
    let scope = credential
        .split_once('/')
        .context("credential scope")?
        .1
        .to_string();
    let mut pairs: Vec<(String, String)> = q
        .iter()
        .filter(|(k, _)| k != "X-Amz-Signature")
        .map(|(k, v)| (aws_encode(k), aws_encode(v)))
        .collect();
    pairs.sort();
    let query = pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let host = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    };
    let mut canonical_headers = String::new();
    for name in signed.split(';') {
        let value = if name == "host" {
            host.clone()
        } else {
            headers.get(name).cloned().unwrap_or_default()
        };
        canonical_headers.push_str(&format!("{name}:{}\n", value.trim()));
    }
    let canonical = format!("PUT\n{path}\n{query}\n{canonical_headers}\n{signed}\nUNSIGNED-PAYLOAD");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let mut parts = scope.split('/');
    let (day, region, service) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let mut key = hmac(
        format!("AWS4{}", stack::SECRET_ACCESS_KEY).as_bytes(),
        day.as_bytes(),
    );
    key = hmac(&key, region.as_bytes());
    key = hmac(&key, service.as_bytes());
    key = hmac(&key, b"aws4_request");
    Ok(hex::encode(hmac(&key, to_sign.as_bytes())) == signature)
}

// ------------------------------------------------------------------ helpers

impl World {
    /// Receives from the ingest queue until the S3 notification of `manifest_key` arrived; other
    /// messages (moto's `s3:TestEvent`, any other key) are deleted on the way.
    async fn manifest_notification(&self, manifest_key: &str) -> Result<Message> {
        let sqs = self.stack.sqs();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            ensure!(Instant::now() < deadline, "no notification of {manifest_key}");
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
                // moto URL-encodes keys in notifications (docs/local-stack.md).
                let raw = body["Records"][0]["s3"]["object"]["key"]
                    .as_str()
                    .unwrap_or_default();
                let key = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
                if key == manifest_key {
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

    /// Every object version and delete marker under `prefix`.
    async fn versions(&self, prefix: &str) -> Result<usize> {
        let out = self
            .stack
            .s3()
            .list_object_versions()
            .bucket(&self.stack.bucket)
            .prefix(prefix)
            .send()
            .await?;
        Ok(out.versions().len() + out.delete_markers().len())
    }

    /// The UploadsTable items of partition `pk`.
    async fn items(&self, pk: &str) -> Result<usize> {
        let out = self
            .stack
            .dynamodb()
            .query()
            .table_name(&self.stack.uploads_table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", AttributeValue::S(pk.into()))
            .consistent_read(true)
            .send()
            .await?;
        Ok(out.items().len())
    }
}

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

/// PUT `body` to a presigned upload of the API's reply, with its headers.
async fn put(http: &reqwest::Client, upload: &Value, body: Vec<u8>) -> Result<reqwest::Response> {
    let mut req = http.put(upload["url"].as_str().context("url")?);
    for (k, v) in upload["headers"].as_object().context("headers")? {
        if k != "content-length" {
            // reqwest sets Content-Length from the body itself.
            req = req.header(k, v.as_str().unwrap_or_default());
        }
    }
    Ok(req.body(body).send().await?)
}

// ------------------------------------------------------------------ the test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_dropped_through_the_api_is_uploaded_tracked_and_deleted() -> Result<()> {
    let w = world("api-drop").await?;
    let http = reqwest::Client::new();
    // The user's Mapillary token (the simulator's demo user), as the OAuth callback stores it.
    w.api
        .tokens
        .save(
            USER,
            &StoredToken {
                access_token: SecretString::from(DEMO_USER_TOKEN),
                refresh_token: None,
                expires_at: None,
                mapillary_user_id: Some(DEMO_USER_ID.into()),
                username: Some(DEMO_USERNAME.into()),
                updated_at: OffsetDateTime::now_utc(),
            },
        )
        .await?;

    // Four geotagged JPEGs, announced with their sizes and md5s.
    let n = 4;
    let mut t = TrackSpec::new(48.2, 16.37, datetime!(2024-04-20 08:00:00 UTC));
    t.interval_ms = 2000;
    t.step_m = 8.0;
    let images: Vec<(String, Vec<u8>)> = track(n, &t)
        .iter()
        .enumerate()
        .map(|(i, spec)| (format!("img_{i:04}.jpg"), jpeg(spec)))
        .collect();
    let announce = json!({
        "files": images.iter().map(|(name, bytes)| json!({
            "name": name, "size": bytes.len(), "md5": hex::encode(Md5::digest(bytes)),
        })).collect::<Vec<_>>(),
    });
    let r = call(&w.app, &event("POST", "/v1/sequences", Some(&announce), USER)).await;
    assert_eq!(r.status, 201, "{}", r.raw);
    let id = r.body["sequence_id"].as_str().context("sequence_id")?.to_string();
    let prefix = format!("sequences/{USER}/{id}/");
    let uploads = r.body["uploads"].as_array().context("uploads")?.clone();
    assert_eq!(uploads.len(), n);
    let r = call(&w.app, &event("GET", &format!("/v1/sequences/{id}"), None, USER)).await;
    assert_eq!(
        (r.status, r.body["state"].as_str()),
        (200, Some("AWAITING_FILES")),
        "{}",
        r.raw
    );

    // Each URL: exactly its key under the caller's prefix, size and md5 signed, 900 s.
    for (u, (name, bytes)) in uploads.iter().zip(&images) {
        let url = url::Url::parse(u["url"].as_str().context("url")?)?;
        let key = format!("{prefix}{name}");
        assert_eq!(u["key"], key.as_str());
        assert_eq!(
            url.path(),
            format!("/{}/{key}", w.stack.bucket),
            "path-style URL of the key"
        );
        let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
        assert_eq!(q["X-Amz-Expires"], "900");
        let signed: Vec<&str> = q["X-Amz-SignedHeaders"].split(';').collect();
        for h in ["content-length", "content-md5", "host"] {
            assert!(signed.contains(&h), "{h} is signed: {signed:?}");
        }
        assert!(
            !q.keys()
                .any(|k| k.starts_with("x-amz-checksum") || k == "x-amz-sdk-checksum-algorithm"),
            "no checksum of an empty body is bound: {q:?}"
        );
        let headers: BTreeMap<String, String> = u["headers"]
            .as_object()
            .context("headers")?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect();
        assert_eq!(headers["content-length"], bytes.len().to_string());
        // moto does not check signatures: verify them as S3 would (see the module comment).
        assert!(
            sigv4_valid(&url, url.path(), &headers)?,
            "the URL as issued verifies"
        );
        let elsewhere = [
            format!("/{}/{prefix}img_9999.jpg", w.stack.bucket),
            format!("/{}/sequences/{OTHER}/{id}/{name}", w.stack.bucket),
            format!("/{}/sequences/{USER}/other-seq/{name}", w.stack.bucket),
            format!("/{}/{prefix}manifest.json", w.stack.bucket),
        ];
        for path in &elsewhere {
            assert!(!sigv4_valid(&url, path, &headers)?, "signature reused for {path}");
        }
        let mut longer = headers.clone();
        longer.insert("content-length".into(), (bytes.len() + 1).to_string());
        assert!(!sigv4_valid(&url, url.path(), &longer)?, "another length");
        let mut other_md5 = headers.clone();
        other_md5.insert("content-md5".into(), "1B2M2Y8AsgTpgAmY7PhCfg==".into());
        assert!(!sigv4_valid(&url, url.path(), &other_md5)?, "another md5");
    }

    // All files but the last; complete names the missing one.
    for (u, (_, bytes)) in uploads.iter().zip(&images).take(n - 1) {
        let resp = put(&http, u, bytes.clone()).await?;
        assert!(resp.status().is_success(), "{}", resp.text().await?);
    }
    let complete = format!("/v1/sequences/{id}/complete");
    let r = call(&w.app, &event("POST", &complete, None, USER)).await;
    assert_eq!(r.status, 409, "{}", r.raw);
    assert_eq!(r.content_type, "application/problem+json");
    assert_eq!(r.body["code"], "files-missing");
    let last = &images[n - 1].0;
    assert_eq!(
        r.body["files"],
        json!([{ "name": last, "problem": "missing", "expected_size": images[n - 1].1.len() }])
    );
    assert!(r.body["detail"]
        .as_str()
        .unwrap_or_default()
        .contains(last.as_str()));
    // Another user cannot complete it.
    let r = call(&w.app, &event("POST", &complete, None, OTHER)).await;
    assert_eq!(r.status, 404, "{}", r.raw);

    // Resume: fresh URLs for what is left, i.e. the last file only; its new URL is the one used.
    let r = call(
        &w.app,
        &event("POST", &format!("/v1/sequences/{id}/uploads"), None, USER),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    let again = r.body["uploads"].as_array().context("uploads")?.clone();
    assert_eq!(again.len(), 1, "{}", r.raw);
    assert_eq!(again[0]["name"], last.as_str());
    let resp = put(&http, &again[0], images[n - 1].1.clone()).await?;
    assert!(resp.status().is_success(), "{}", resp.text().await?);
    let r = call(&w.app, &event("POST", &complete, None, USER)).await;
    assert_eq!(r.status, 202, "{}", r.raw);
    assert_eq!(r.body["state"], "RECEIVED");

    // The manifest's notification runs zip-and-push as for an S3 drop.
    let config = zip_and_push::config::Config::from_lookup(lambda_env(&w.stack, &w.sim))?;
    let mut zp = zip_and_push::compose::compose(&config, w.stack.sdk_config()).await?;
    zp.store = S3ObjectStore::new(w.stack.s3());
    zp.mapillary = zp.mapillary.with_retry_policy(RetryPolicy::fast());
    let m = w.manifest_notification(&format!("{prefix}manifest.json")).await?;
    let resp =
        zip_and_push::handle_batch(&zp, sqs_event(&m)?, Instant::now() + Duration::from_secs(600)).await;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let r = call(&w.app, &event("GET", &format!("/v1/sequences/{id}"), None, USER)).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["state"], "UPLOADED", "{}", r.raw);
    assert_eq!(r.body["accepted_count"], n, "{}", r.raw);
    assert_eq!(r.body["uploads"][0]["state"], "HANDED_OFF", "{}", r.raw);
    let upload_id = r.body["uploads"][0]["upload_id"]
        .as_str()
        .context("upload_id")?
        .to_string();

    // The poller follows it to FINISHED and links it.
    let config = poller::config::Config::from_lookup(lambda_env(&w.stack, &w.sim))?;
    let mut poller = poller::compose::compose(&config, w.stack.sdk_config()).await?;
    poller.mapillary = poller.mapillary.with_retry_policy(RetryPolicy::fast());
    poller.tunables = poller::config::Tunables::default();
    poller.clock = poller::clock::Clock::manual(sim_now(&w.sim));
    poller::run_once(&poller, Instant::now() + Duration::from_secs(120)).await;
    for secs in [61, 600, 1800, 3600] {
        w.sim.advance_clock(secs);
        poller.clock.set_ms(w.sim.sim().now_ms());
        let run = poller::run_once(&poller, Instant::now() + Duration::from_secs(120)).await;
        assert!(run.errors.is_empty(), "{:?}", run.errors);
    }
    let r = call(&w.app, &event("GET", &format!("/v1/sequences/{id}"), None, USER)).await;
    let mly = &r.body["uploads"][0]["mapillary"];
    assert_eq!(mly["state"], "FINISHED", "{}", r.raw);
    let linked = mly["sequences"].clone();
    assert_eq!(linked.as_array().map(Vec::len), Some(1), "{mly:#}");

    // Nothing to retry in a sequence whose uploads all went through.
    let r = call(
        &w.app,
        &event("POST", &format!("/v1/sequences/{id}/retry"), None, USER),
    )
    .await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (409, Some("nothing-to-retry")),
        "{}",
        r.raw
    );

    // Delete: another user cannot; the owner gets Mapillary's links and the note.
    let path = format!("/v1/sequences/{id}");
    let r = call(&w.app, &event("DELETE", &path, None, OTHER)).await;
    assert_eq!(r.status, 404, "{}", r.raw);
    assert!(w.versions(&prefix).await? > n, "nothing deleted by another user");
    let r = call(&w.app, &event("DELETE", &path, None, USER)).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["mapillary_deleted"], false);
    assert_eq!(r.body["mapillary_sequences"], linked, "{}", r.raw);
    assert!(
        linked[0]["link"]
            .as_str()
            .is_some_and(|l| l.starts_with("https://www.mapillary.com/app/?pKey=")),
        "{linked:#}"
    );
    // n images + the manifest.
    assert_eq!(r.body["objects_deleted"], n + 1, "{}", r.raw);
    assert_eq!(
        w.versions(&prefix).await?,
        0,
        "no object version or delete marker left"
    );
    assert_eq!(
        w.items(&format!("SEQ#{USER}#{id}")).await?,
        0,
        "no sequence record left"
    );
    assert_eq!(
        w.items(&format!("UPLOAD#{upload_id}")).await?,
        0,
        "no upload item left"
    );
    let r = call(&w.app, &event("GET", &path, None, USER)).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (404, Some("not-found")),
        "{}",
        r.raw
    );
    let r = call(&w.app, &event("GET", "/v1/sequences", None, USER)).await;
    assert_eq!(r.body["sequences"], json!([]), "{}", r.raw);
    w.sim.shutdown().await;
    Ok(())
}

/// Retry is a new write of the manifest: a sequence that FAILED (here: its user had no Mapillary
/// token) gets its manifest written again with another ETag, so S3 notifies again and zip-and-push's
/// claim (per bucket, key and ETag) does not take it for a duplicate. What zip-and-push then re-runs
/// (the uploads that failed) is its own behaviour, not asserted here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_writes_a_new_manifest_version_that_s3_notifies_again() -> Result<()> {
    let w = world("api-retry").await?;
    let http = reqwest::Client::new();
    let t = TrackSpec::new(48.2, 16.37, datetime!(2024-04-20 08:00:00 UTC));
    let images: Vec<(String, Vec<u8>)> = track(2, &t)
        .iter()
        .enumerate()
        .map(|(i, spec)| (format!("img_{i:04}.jpg"), jpeg(spec)))
        .collect();
    let announce = json!({
        "files": images.iter().map(|(name, bytes)| json!({"name": name, "size": bytes.len()})).collect::<Vec<_>>(),
    });
    let r = call(&w.app, &event("POST", "/v1/sequences", Some(&announce), USER)).await;
    assert_eq!(r.status, 201, "{}", r.raw);
    let id = r.body["sequence_id"].as_str().context("sequence_id")?.to_string();
    let manifest_key = format!("sequences/{USER}/{id}/manifest.json");
    for (u, (_, bytes)) in r.body["uploads"]
        .as_array()
        .context("uploads")?
        .iter()
        .zip(&images)
    {
        let resp = put(&http, u, bytes.clone()).await?;
        assert!(resp.status().is_success(), "{}", resp.text().await?);
    }
    let r = call(
        &w.app,
        &event("POST", &format!("/v1/sequences/{id}/complete"), None, USER),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.raw);

    // zip-and-push without a token for the user: the sequence FAILED.
    let config = zip_and_push::config::Config::from_lookup(lambda_env(&w.stack, &w.sim))?;
    let mut zp = zip_and_push::compose::compose(&config, w.stack.sdk_config()).await?;
    zp.store = S3ObjectStore::new(w.stack.s3());
    zp.mapillary = zp.mapillary.with_retry_policy(RetryPolicy::fast());
    let first = w.manifest_notification(&manifest_key).await?;
    let resp =
        zip_and_push::handle_batch(&zp, sqs_event(&first)?, Instant::now() + Duration::from_secs(600)).await;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let r = call(&w.app, &event("GET", &format!("/v1/sequences/{id}"), None, USER)).await;
    assert_eq!(r.body["state"], "FAILED", "{}", r.raw);
    assert!(
        r.body["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("no Mapillary token"),
        "{}",
        r.raw
    );

    let r = call(
        &w.app,
        &event("POST", &format!("/v1/sequences/{id}/retry"), None, USER),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.raw);
    assert_eq!(r.body["state"], "FAILED");
    let second = w.manifest_notification(&manifest_key).await?;
    let etag_of = |m: &Message| -> Result<String> {
        let body: Value = serde_json::from_str(m.body().unwrap_or_default())?;
        Ok(body["Records"][0]["s3"]["object"]["eTag"]
            .as_str()
            .context("eTag")?
            .to_string())
    };
    assert_ne!(etag_of(&second)?, etag_of(&first)?, "a new manifest version");
    let m: Value = serde_json::from_slice(
        &w.stack
            .s3()
            .get_object()
            .bucket(&w.stack.bucket)
            .key(&manifest_key)
            .send()
            .await?
            .body
            .collect()
            .await?
            .into_bytes(),
    )?;
    assert_eq!(m["images"], json!(["img_0000.jpg", "img_0001.jpg"]), "{m}");
    w.sim.shutdown().await;
    Ok(())
}

// ------------------------------------------------------------------ retry, expiry, delete + drop again

/// The simulator's demo user as `user`'s stored Mapillary token (as the OAuth callback stores it).
async fn connect_user(w: &World, user: &str) -> Result<()> {
    w.api
        .tokens
        .save(
            user,
            &StoredToken {
                access_token: SecretString::from(DEMO_USER_TOKEN),
                refresh_token: None,
                expires_at: None,
                mapillary_user_id: Some(DEMO_USER_ID.into()),
                username: Some(DEMO_USERNAME.into()),
                updated_at: OffsetDateTime::now_utc(),
            },
        )
        .await?;
    Ok(())
}

/// `n` geotagged JPEGs of one walk (one upload).
fn walk(n: usize, lat: f64) -> Vec<(String, Vec<u8>)> {
    let mut t = TrackSpec::new(lat, 16.37, datetime!(2024-04-20 08:00:00 UTC));
    t.interval_ms = 2000;
    t.step_m = 8.0;
    track(n, &t)
        .iter()
        .enumerate()
        .map(|(i, spec)| (format!("img_{i:04}.jpg"), jpeg(spec)))
        .collect()
}

/// Announce `images` as `user`, PUT each to its presigned URL, complete: the sequence id.
async fn drop_via_api(w: &World, user: &str, images: &[(String, Vec<u8>)]) -> Result<String> {
    let http = reqwest::Client::new();
    let announce = json!({
        "files": images.iter().map(|(name, bytes)| json!({
            "name": name, "size": bytes.len(), "md5": hex::encode(Md5::digest(bytes)),
        })).collect::<Vec<_>>(),
    });
    let r = call(&w.app, &event("POST", "/v1/sequences", Some(&announce), user)).await;
    ensure!(r.status == 201, "announce: {}", r.raw);
    let id = r.body["sequence_id"].as_str().context("sequence_id")?.to_string();
    for (u, (_, bytes)) in r.body["uploads"]
        .as_array()
        .context("uploads")?
        .iter()
        .zip(images)
    {
        let resp = put(&http, u, bytes.clone()).await?;
        ensure!(resp.status().is_success(), "PUT: {}", resp.text().await?);
    }
    let r = call(
        &w.app,
        &event("POST", &format!("/v1/sequences/{id}/complete"), None, user),
    )
    .await;
    ensure!(r.status == 202, "complete: {}", r.raw);
    Ok(id)
}

/// zip-and-push composed as `main.rs` composes it (S3 path-style for moto, fast retries).
async fn zip_and_push_deps(w: &World) -> Result<zip_and_push::compose::ProductionDeps> {
    let config = zip_and_push::config::Config::from_lookup(lambda_env(&w.stack, &w.sim))?;
    let mut zp = zip_and_push::compose::compose(&config, w.stack.sdk_config()).await?;
    zp.store = S3ObjectStore::new(w.stack.s3());
    zp.mapillary = zp.mapillary.with_retry_policy(RetryPolicy::fast());
    Ok(zp)
}

/// Runs zip-and-push on the next notification of `manifest_key`; every message acknowledged.
async fn ingest(
    w: &World,
    zp: &zip_and_push::compose::ProductionDeps,
    manifest_key: &str,
) -> Result<Message> {
    let m = w.manifest_notification(manifest_key).await?;
    let resp =
        zip_and_push::handle_batch(zp, sqs_event(&m)?, Instant::now() + Duration::from_secs(600)).await;
    ensure!(resp.batch_item_failures.is_empty(), "{resp:?}");
    Ok(m)
}

/// GET `path` as `user`.
async fn get(w: &World, path: &str, user: &str) -> Reply {
    call(&w.app, &event("GET", path, None, user)).await
}

async fn admin(w: &World, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<()> {
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", w.sim.admin_url()));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await?;
    ensure!(r.status().is_success(), "{path}: {}", r.status());
    Ok(())
}

/// Issue 14's proof line "retry after a simulated failure → FINISHED": Mapillary refuses
/// `finish_upload` for good (a 400, not retriable), so the run ends FAILED with the upload FAILED;
/// the fault is cleared; `POST /v1/sequences/{id}/retry` writes the manifest again, zip-and-push's
/// re-drop semantics run the failed upload again (attempt 2), and the poller follows it to FINISHED
/// and linked — one cluster for the one upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_a_simulated_failure_runs_the_failed_upload_again_to_finished() -> Result<()> {
    let w = world("api-retry-fin").await?;
    connect_user(&w, USER).await?;
    admin(
        &w,
        reqwest::Method::POST,
        "/faults",
        Some(json!({"path": "/graph/finish_upload", "times": 1000,
            "action": {"kind": "status", "status": 400, "body": {"error": {
                "message": "Invalid parameter", "type": "OAuthException", "code": 100}}}})),
    )
    .await?;
    let images = walk(4, 48.21);
    let id = drop_via_api(&w, USER, &images).await?;
    let manifest_key = format!("sequences/{USER}/{id}/manifest.json");
    let zp = zip_and_push_deps(&w).await?;
    ingest(&w, &zp, &manifest_key).await?;
    let path = format!("/v1/sequences/{id}");
    let r = get(&w, &path, USER).await;
    assert_eq!(r.body["state"], "FAILED", "{}", r.raw);
    assert_eq!(r.body["attempt"], 1, "{}", r.raw);
    assert_eq!(r.body["uploads"][0]["state"], "FAILED", "{}", r.raw);
    assert!(
        w.sim.sim().world().clusters.is_empty(),
        "finish_upload refused: no cluster"
    );

    // The fault is gone; the user retries through the API.
    admin(&w, reqwest::Method::DELETE, "/faults", None).await?;
    let r = call(
        &w.app,
        &event("POST", &format!("/v1/sequences/{id}/retry"), None, USER),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.raw);
    assert_eq!(r.body["count"], 1, "one failed upload to run again: {}", r.raw);
    ingest(&w, &zp, &manifest_key).await?;
    let r = get(&w, &path, USER).await;
    assert_eq!(r.body["state"], "UPLOADED", "{}", r.raw);
    assert_eq!(r.body["attempt"], 2, "{}", r.raw);
    assert_eq!(r.body["uploads"][0]["state"], "HANDED_OFF", "{}", r.raw);
    let clusters = w.sim.sim().world().clusters.len();
    assert_eq!(clusters, 1, "one cluster for the one upload");

    let config = poller::config::Config::from_lookup(lambda_env(&w.stack, &w.sim))?;
    let mut poller = poller::compose::compose(&config, w.stack.sdk_config()).await?;
    poller.mapillary = poller.mapillary.with_retry_policy(RetryPolicy::fast());
    poller.tunables = poller::config::Tunables::default();
    poller.clock = poller::clock::Clock::manual(sim_now(&w.sim));
    poller::run_once(&poller, Instant::now() + Duration::from_secs(120)).await;
    for secs in [61, 600, 1800, 3600] {
        w.sim.advance_clock(secs);
        poller.clock.set_ms(w.sim.sim().now_ms());
        let run = poller::run_once(&poller, Instant::now() + Duration::from_secs(120)).await;
        assert!(run.errors.is_empty(), "{:?}", run.errors);
    }
    let r = get(&w, &path, USER).await;
    let mly = &r.body["uploads"][0]["mapillary"];
    assert_eq!(mly["state"], "FINISHED", "{}", r.raw);
    assert_eq!(
        mly["sequences"].as_array().map(Vec::len),
        Some(1),
        "linked: {mly:#}"
    );
    assert_eq!(w.sim.sim().world().clusters.len(), 1, "still one cluster");
    // Nothing left to retry.
    let r = call(
        &w.app,
        &event("POST", &format!("/v1/sequences/{id}/retry"), None, USER),
    )
    .await;
    assert_eq!(r.body["code"], "nothing-to-retry", "{}", r.raw);
    w.sim.shutdown().await;
    Ok(())
}

/// An announcement that is never completed does not wait forever: its items carry the
/// UploadsTable's TTL (`expires_at`, epoch seconds = announced + RELAY_ANNOUNCE_TTL_HOURS), and once
/// that is past (the record is back-dated here) the sequence reads FAILED with the reason, in the
/// list too, and refuses new URLs, `complete` and `retry` with 409 `announcement-expired`; DELETE
/// still removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announcement_not_completed_in_time_expires_and_reads_failed() -> Result<()> {
    use shared::ports::{SequenceReader, SequenceStore};
    let w = world("api-expire").await?;
    let images = walk(2, 48.22);
    let announce = json!({
        "files": images.iter().map(|(name, bytes)| json!({"name": name, "size": bytes.len()})).collect::<Vec<_>>(),
    });
    let r = call(&w.app, &event("POST", "/v1/sequences", Some(&announce), USER)).await;
    assert_eq!(r.status, 201, "{}", r.raw);
    let id = r.body["sequence_id"].as_str().context("sequence_id")?.to_string();
    let pk = format!("SEQ#{USER}#{id}");

    // The TTL attribute of the announcement: a number, 24 h (the default) after the announcement.
    let item = w
        .stack
        .dynamodb()
        .get_item()
        .table_name(&w.stack.uploads_table)
        .key("pk", AttributeValue::S(pk.clone()))
        .key("sk", AttributeValue::S("ANNOUNCED#0000".into()))
        .consistent_read(true)
        .send()
        .await?
        .item
        .context("announcement item")?;
    let ttl: i64 = item
        .get("expires_at")
        .and_then(|v| v.as_n().ok())
        .context("expires_at is a number")?
        .parse()?;
    let seq = w.api.repo.get_sequence(USER, &id).await?.context("sequence")?;
    assert_eq!(ttl, seq.created_at.unix_timestamp() + 24 * 3600);
    let path = format!("/v1/sequences/{id}");
    let r = get(&w, &path, USER).await;
    assert_eq!(r.body["state"], "AWAITING_FILES", "not expired yet: {}", r.raw);

    // 24 h and a second later.
    let mut old = seq.clone();
    old.created_at -= time::Duration::seconds(24 * 3600 + 1);
    w.api.repo.put_sequence(&old).await?;
    let r = get(&w, &path, USER).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["state"], "FAILED", "{}", r.raw);
    let reason = r.body["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("announcement expired"), "{reason}");
    assert!(reason.contains("24 h"), "{reason}");
    let r = get(&w, "/v1/sequences", USER).await;
    assert_eq!(r.body["sequences"][0]["state"], "FAILED", "{}", r.raw);
    for route in ["uploads", "complete", "retry"] {
        let r = call(
            &w.app,
            &event("POST", &format!("/v1/sequences/{id}/{route}"), None, USER),
        )
        .await;
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (409, Some("announcement-expired")),
            "{route}: {}",
            r.raw
        );
    }
    let r = call(&w.app, &event("DELETE", &path, None, USER)).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(w.items(&pk).await?, 0, "no record left");
    assert_eq!(get(&w, &path, USER).await.status, 404);
    w.sim.shutdown().await;
    Ok(())
}

/// DELETE removes zip-and-push's claim of the sequence with its records: the same sequence dropped
/// again under the same key by the operator's S3 path, with a byte-identical manifest (the same
/// ETag), is processed afresh (a new upload and cluster), never acknowledged as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_sequence_dropped_again_with_an_identical_manifest_is_processed() -> Result<()> {
    use shared::idempotency::sequence_claim_id;
    let w = world("api-redrop").await?;
    connect_user(&w, USER).await?;
    let images = walk(3, 48.23);
    let id = drop_via_api(&w, USER, &images).await?;
    let prefix = format!("sequences/{USER}/{id}/");
    let manifest_key = format!("{prefix}manifest.json");
    let zp = zip_and_push_deps(&w).await?;
    let first = ingest(&w, &zp, &manifest_key).await?;
    let path = format!("/v1/sequences/{id}");
    let r = get(&w, &path, USER).await;
    assert_eq!(r.body["state"], "UPLOADED", "{}", r.raw);
    let manifest = w
        .stack
        .s3()
        .get_object()
        .bucket(&w.stack.bucket)
        .key(&manifest_key)
        .send()
        .await?
        .body
        .collect()
        .await?
        .into_bytes()
        .to_vec();
    let claim_key = || AttributeValue::S(sequence_claim_id(&w.stack.bucket, &manifest_key));
    let claim = |w: &World| {
        let q = w
            .stack
            .dynamodb()
            .get_item()
            .table_name(&w.stack.idempotency_table)
            .key("id", claim_key())
            .consistent_read(true)
            .send();
        async move { Ok::<_, anyhow::Error>(q.await?.item.is_some()) }
    };
    assert!(claim(&w).await?, "zip-and-push claimed the sequence");

    let r = call(&w.app, &event("DELETE", &path, None, USER)).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert!(!claim(&w).await?, "the claim is deleted with the sequence");

    // The operator drops it again under the same key: the images, then the identical manifest.
    let s3 = w.stack.s3();
    for (name, bytes) in &images {
        s3.put_object()
            .bucket(&w.stack.bucket)
            .key(format!("{prefix}{name}"))
            .body(bytes.clone().into())
            .send()
            .await?;
    }
    s3.put_object()
        .bucket(&w.stack.bucket)
        .key(&manifest_key)
        .body(manifest.into())
        .send()
        .await?;
    let etag_of = |m: &Message| -> Result<String> {
        let body: Value = serde_json::from_str(m.body().unwrap_or_default())?;
        Ok(body["Records"][0]["s3"]["object"]["eTag"]
            .as_str()
            .context("eTag")?
            .to_string())
    };
    let second = ingest(&w, &zp, &manifest_key).await?;
    assert_eq!(etag_of(&second)?, etag_of(&first)?, "a byte-identical manifest");
    let r = get(&w, &path, USER).await;
    assert_eq!(r.status, 200, "processed afresh: {}", r.raw);
    assert_eq!(r.body["state"], "UPLOADED", "{}", r.raw);
    assert_eq!(r.body["attempt"], 1, "a new sequence, not a re-drop: {}", r.raw);
    assert_eq!(r.body["accepted_count"], images.len(), "{}", r.raw);
    assert_eq!(
        w.sim.sim().world().clusters.len(),
        2,
        "one cluster per drop: the second was uploaded again"
    );
    w.sim.shutdown().await;
    Ok(())
}
