//! `cargo xtask bench status-api`: the status API's figures, in one run.
//!
//! * **Release binary size**: `cargo build --release -p status-api --bin status-api`; the size of the
//!   executable cargo reports (the workspace release profile has `strip = true`, so it is stripped).
//! * **Warm handler latency**, p50/p99 over 1,000 calls per route after 50 warm-up calls: the router
//!   built as `main.rs` builds it (DynamoDB, KMS and the OAuth-state store of a stack of
//!   `infra/template.yaml` in a private moto), called in process with the API Gateway v2 samples of
//!   `events/apigw-v2/`. One call = parse the event (`lambda_http::request::from_str`) → router
//!   (identity, validation, the DynamoDB/KMS requests to moto over loopback HTTP) → response body
//!   collected. Not included: the Lambda Runtime API round trip and API Gateway.
//! * **Cold init**: the release binary started as a child process behind a minimal Lambda Runtime
//!   API served here (as `cargo xtask bench zip-and-push` does), with one `GET /v1/sequences/{id}`
//!   event waiting: time from spawning the process to its `GET …/invocation/next` (init: config,
//!   SDK config, clients) and to its first `POST …/response` (init + the first request, cold
//!   connections to moto included). Repeated [`COLD_RUNS`] times.
//!
//! Everything runs against moto (Python) on this machine: the latencies are mostly moto's.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use http_body_util::BodyExt;
use integration_tests::moto::MotoServer;
use integration_tests::stack::{self, LocalStack, SimEndpoints};
use mapillary_sim::defaults;
use mapillary_sim::{SimConfig, Simulator};
use secrecy::SecretString;
use serde_json::{json, Value};
use shared::adapters::dynamodb::{DynamoRepository, DynamoTracking};
use shared::adapters::tokens::KmsTokenStore;
use shared::domain::linking::{ImageOutcome, LinkPath};
use shared::domain::tracking::{OverallState, TrackedUpload};
use shared::mapillary::feed::StageStatus;
use shared::mapillary::image_link;
use shared::model::{
    upload_id, ImageLink, SequenceRecord, SequenceState, StoredToken, TrackingRecord, UploadImage,
    UploadRecord, UploadState,
};
use shared::ports::{ImageEntryStore, SequenceStore, TokenStore, TrackingStore, UploadStore};
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tower::ServiceExt;

use crate::venv;

const USER: &str = "bench";
/// Sequences of the user (the list route reads a page of 20).
const SEQUENCES: usize = 30;
/// Images of the one tracked upload (the status and images routes read them and their links).
const IMAGES: u32 = 20;
const WARMUP: usize = 50;
const CALLS: usize = 1000;
/// Cold starts measured.
pub const COLD_RUNS: usize = 10;

pub async fn run(root: &Path) -> Result<()> {
    let load_start = uptime();
    let bin = crate::binaries::release_binary(root, "status-api")?;
    let size = std::fs::metadata(&bin)
        .with_context(|| format!("{}", bin.display()))?
        .len();
    eprintln!("bench: {} is {} bytes", bin.display(), size);

    let venvs = venv::ensure(root)?;
    let moto = MotoServer::start(&venvs)?;
    eprintln!("bench: moto at {}", moto.endpoint());
    let stack = LocalStack::create(moto.endpoint(), &stack::unique_stack_name("bench-api")).await?;
    let sim = Simulator::start(SimConfig::frozen(), "127.0.0.1:0").await?;
    seed(&stack).await?;

    // ---- warm, in process, composed as `main.rs` composes it
    let sim_endpoints = SimEndpoints::from_base(sim.base_url(), defaults::APP_ID, defaults::CLIENT_SECRET);
    let env = stack.lambda_env(&sim_endpoints);
    let config = status_api::config::Config::from_lookup(|k| {
        env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    })?;
    let deps = Arc::new(status_api::compose::compose(&config, stack.sdk_config()).await?);
    let app = status_api::router(deps);
    let routes = [
        (
            "GET /v1/sequences (page of 20; 1 Query)",
            event(root, "list-sequences.json", "/v1/sequences")?,
        ),
        (
            "GET /v1/sequences/{id} (1 upload, tracked; 5 DynamoDB requests)",
            event(root, "get-status.json", "/v1/sequences/seq-000")?,
        ),
        (
            "GET /v1/sequences/{id}/images (20 images; 5 DynamoDB requests)",
            event(root, "get-images.json", "/v1/sequences/seq-000/images")?,
        ),
        (
            "GET /v1/mapillary/connection (GetItem + KMS Decrypt)",
            event(root, "get-connection.json", "/v1/mapillary/connection")?,
        ),
    ];
    let mut warm = Vec::new();
    for (what, ev) in &routes {
        let text = ev.to_string();
        for _ in 0..WARMUP {
            call(&app, &text).await?;
        }
        let mut times = Vec::with_capacity(CALLS);
        for _ in 0..CALLS {
            let t0 = Instant::now();
            call(&app, &text).await?;
            times.push(t0.elapsed());
        }
        times.sort();
        let (p50, p99) = (percentile(&times, 50), percentile(&times, 99));
        eprintln!("bench: {what}: p50 {:.2} ms, p99 {:.2} ms", ms(p50), ms(p99));
        warm.push((*what, p50, p99, times[times.len() - 1]));
    }

    // ---- cold init, release binary behind a Runtime API
    let cold_event = event(root, "get-status.json", "/v1/sequences/seq-000")?.to_string();
    let mut inits = Vec::new();
    let mut firsts = Vec::new();
    for _ in 0..COLD_RUNS {
        let (init, first, resp) = cold_start(&bin, &env, &cold_event).await?;
        ensure!(resp["statusCode"] == 200, "cold call answered {resp}");
        inits.push(init);
        firsts.push(first);
    }
    inits.sort();
    firsts.sort();
    let load_end = uptime();

    println!("## status-api\n");
    println!(
        "`cargo xtask bench status-api` — moto {} (private), in-process simulator; machine load (`uptime`) \
         before: {load_start}; after: {load_end}.\n",
        moto.endpoint()
    );
    println!("Release binary `target/release/status-api` (profile `release`: `strip = true`, thin LTO, x86_64): **{:.2} MiB** ({size} bytes, stripped).\n", size as f64 / (1024.0 * 1024.0));
    println!(
        "Warm handler latency, {CALLS} calls per route after {WARMUP} warm-up calls, in process against moto \
         (event parse → router → DynamoDB/KMS in moto → body collected; no Runtime API, no API Gateway):\n"
    );
    println!("| route | p50 | p99 | max |");
    println!("|---|---:|---:|---:|");
    for (what, p50, p99, max) in &warm {
        println!(
            "| {what} | {:.2} ms | {:.2} ms | {:.2} ms |",
            ms(*p50),
            ms(*p99),
            ms(*max)
        );
    }
    println!(
        "\nCold init, release binary spawned behind a minimal Lambda Runtime API with a \
         `GET /v1/sequences/{{id}}` event waiting ({COLD_RUNS} runs, median [min–max]):\n"
    );
    println!("| from process start to | median | min | max |");
    println!("|---|---:|---:|---:|");
    for (what, v) in [
        ("`GET /invocation/next` (init done)", &inits),
        ("first `POST /response`", &firsts),
    ] {
        println!(
            "| {what} | {:.1} ms | {:.1} ms | {:.1} ms |",
            ms(v[v.len() / 2]),
            ms(v[0]),
            ms(v[v.len() - 1])
        );
    }
    sim.shutdown().await;
    drop(moto);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted `v`.
fn percentile(v: &[Duration], p: usize) -> Duration {
    let rank = (p * v.len()).div_ceil(100).max(1);
    v[rank.min(v.len()) - 1]
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().take(3).collect();
            format!("load average {}", f.join(", "))
        })
        .unwrap_or_else(|_| "load average unknown".into())
}

/// A sample of `events/apigw-v2/` for USER at `path`.
fn event(root: &Path, name: &str, path: &str) -> Result<Value> {
    let file = root.join("events/apigw-v2").join(name);
    let mut v: Value = serde_json::from_str(
        &std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?,
    )?;
    v["rawPath"] = json!(path);
    v["requestContext"]["http"]["path"] = json!(path);
    v["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] = json!(USER);
    if let Some(rest) = path.strip_prefix("/v1/sequences/") {
        v["pathParameters"] = json!({ "sequence_id": rest.trim_end_matches("/images") });
    }
    Ok(v)
}

async fn call(app: &axum::Router, event: &str) -> Result<()> {
    let req = lambda_http::request::from_str(event).map_err(|e| anyhow!("event: {e}"))?;
    let resp = app.clone().oneshot(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    ensure!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(())
}

async fn seed(stack: &LocalStack) -> Result<()> {
    let repo = DynamoRepository::new(stack.dynamodb(), &stack.uploads_table);
    let tracking = DynamoTracking::new(stack.dynamodb(), &stack.uploads_table);
    let base = time::macros::datetime!(2026-03-01 00:00 UTC);
    for i in 0..SEQUENCES {
        let id = format!("seq-{i:03}");
        let uploads = if i == 0 { 1 } else { 0 };
        repo.put_sequence(&SequenceRecord {
            user_id: USER.into(),
            sequence_id: id.clone(),
            state: SequenceState::Uploaded,
            reason: None,
            bucket: "b".into(),
            manifest_key: format!("sequences/{USER}/{id}/manifest.json"),
            manifest_etag: "e".into(),
            organization_id: None,
            image_count: IMAGES,
            accepted_count: IMAGES,
            upload_ids: (0..uploads).map(|u| upload_id(USER, &id, u)).collect(),
            rejected: Vec::new(),
            created_at: base + time::Duration::hours(i as i64),
            updated_at: base + time::Duration::hours(i as i64),
            attempts: 1,
            progress: Default::default(),
        })
        .await?;
    }
    let up = upload_id(USER, "seq-000", 0);
    repo.put_upload(&UploadRecord {
        user_id: USER.into(),
        sequence_id: "seq-000".into(),
        upload_id: up.clone(),
        index: 0,
        state: UploadState::HandedOff,
        session_key: "mly_relay_0.zip".into(),
        total_len: 1 << 20,
        image_count: IMAGES,
        cluster_id: Some("cluster-1".into()),
        handle: None,
        organization_id: None,
        bytes_sent: 1 << 20,
        created_at: base,
        started_at: Some(base),
        finished_at: Some(base),
        error: None,
        attempts: 1,
        outbox: Default::default(),
    })
    .await?;
    let images: Vec<UploadImage> = (0..IMAGES)
        .map(|i| UploadImage {
            upload_id: up.clone(),
            index: i,
            key: format!("sequences/{USER}/seq-000/img_{i:04}.jpg"),
            etag: "e".into(),
            size: 1,
            entry_size: 1,
            header_consumed: 0,
            description: String::new(),
            lat: 48.2,
            lon: 16.37,
            altitude: None,
            captured_at: base,
            heading: None,
            checkpoint: None,
        })
        .collect();
    repo.put_images(&images).await?;
    let mut tracked = TrackedUpload::new("cluster-1", base);
    for s in [
        &mut tracked.stages.ingestion,
        &mut tracked.stages.image_processing,
        &mut tracked.stages.map_data,
        &mut tracked.stages.map_update,
    ] {
        *s = Some(StageStatus::Finished);
    }
    tracked.state = OverallState::Finished;
    tracking
        .create_tracking(&TrackingRecord {
            user_id: USER.into(),
            sequence_id: "seq-000".into(),
            upload_id: up.clone(),
            mapillary_user_id: Some(defaults::DEMO_USER_ID.into()),
            tracked,
            history: Vec::new(),
            item_count: Some(i64::from(IMAGES)),
            image_count: Some(IMAGES),
            image_id: Some("9000".into()),
            sequence_ids: vec!["mly-seq".into()],
            linked_via: Some(LinkPath::ActivityFeed),
            linked_count: IMAGES,
            dropped_count: 0,
            next_check_at: None,
            pending_events: Vec::new(),
        })
        .await?;
    let links: Vec<ImageLink> = images
        .iter()
        .map(|img| ImageLink {
            upload_id: up.clone(),
            index: img.index,
            key: img.key.clone(),
            outcome: ImageOutcome::Linked {
                image_id: (9000 + img.index).to_string(),
                sequence_id: "mly-seq".into(),
                link: image_link(&(9000 + img.index).to_string()),
            },
            via: LinkPath::ActivityFeed,
        })
        .collect();
    tracking.put_links(&links).await?;
    KmsTokenStore::new(
        stack.dynamodb(),
        stack.kms(),
        &stack.users_table,
        &stack.token_key_id,
    )
    .save(
        USER,
        &StoredToken {
            access_token: SecretString::from(defaults::DEMO_USER_TOKEN),
            refresh_token: None,
            expires_at: None,
            mapillary_user_id: Some(defaults::DEMO_USER_ID.into()),
            username: Some(defaults::DEMO_USERNAME.into()),
            updated_at: OffsetDateTime::now_utc(),
        },
    )
    .await?;
    Ok(())
}

// ------------------------------------------------------------------ cold start

enum Runtime {
    Next(Instant),
    Response(Instant, String),
    Error(String),
}

/// Spawns `bin` with `env` behind a one-event Runtime API: (spawn → first `next`, spawn → first
/// response, the response).
async fn cold_start(
    bin: &Path,
    env: &[(String, String)],
    event: &str,
) -> Result<(Duration, Duration, Value)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, mut rx) = mpsc::channel::<Runtime>(4);
    let server = tokio::spawn(serve_runtime(listener, event.to_string(), tx));
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", "status-api")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut next = None;
    let outcome = loop {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Err(_) => break Err(anyhow!("no response within 60 s")),
            Ok(None) => break Err(anyhow!("the runtime API server stopped")),
            Ok(Some(Runtime::Next(at))) => {
                next.get_or_insert(at - t0);
            }
            Ok(Some(Runtime::Response(at, body))) => {
                break serde_json::from_str::<Value>(&body)
                    .context("response JSON")
                    .map(|v| (at - t0, v))
            }
            Ok(Some(Runtime::Error(body))) => break Err(anyhow!("the function reported an error: {body}")),
        }
    };
    child.kill()?;
    child.wait()?;
    server.abort();
    let (first, resp) = outcome?;
    let init = next.ok_or_else(|| anyhow!("no invocation/next before the response"))?;
    Ok((init, first, resp))
}

/// A minimal Lambda Runtime API (hand-rolled HTTP/1.1 over `TcpListener`, like the zip-and-push bench:
/// `GET …/invocation/next` hands out the one event, later polls wait; `POST …/response` and `…/error`
/// are reported through `tx`).
async fn serve_runtime(listener: TcpListener, event: String, tx: mpsc::Sender<Runtime>) {
    let event = Arc::new(tokio::sync::Mutex::new(Some(event)));
    while let Ok((conn, _)) = listener.accept().await {
        let (event, tx) = (event.clone(), tx.clone());
        tokio::spawn(async move {
            let _ = serve_conn(conn, event, tx).await;
        });
    }
}

async fn serve_conn(
    conn: TcpStream,
    event: Arc<tokio::sync::Mutex<Option<String>>>,
    tx: mpsc::Sender<Runtime>,
) -> Result<()> {
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let (mut len, mut chunked) = (0usize, false);
        loop {
            let mut h = String::new();
            r.read_line(&mut h).await?;
            let lower = h.trim_end().to_ascii_lowercase();
            if lower.is_empty() {
                break;
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                r.read_line(&mut size).await?;
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0u8; n + 2];
                r.read_exact(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else {
            body.resize(len, 0);
            r.read_exact(&mut body).await?;
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        if method == "GET" && path.ends_with("/invocation/next") {
            let _ = tx.send(Runtime::Next(Instant::now())).await;
            let Some(ev) = event.lock().await.take() else {
                std::future::pending::<()>().await;
                return Ok(());
            };
            let deadline_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis()
                + 30_000;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Lambda-Runtime-Aws-Request-Id: bench-request\r\nLambda-Runtime-Deadline-Ms: {deadline_ms}\r\n\
                 Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:{}:{}:function:status-api\r\n\
                 Lambda-Runtime-Trace-Id: Root=1-00000000-000000000000000000000000\r\n\r\n",
                ev.len(),
                stack::REGION,
                stack::ACCOUNT_ID
            );
            r.get_mut().write_all(head.as_bytes()).await?;
            r.get_mut().write_all(ev.as_bytes()).await?;
        } else if method == "POST" && path.ends_with("/response") {
            let _ = tx.send(Runtime::Response(Instant::now(), body)).await;
            r.get_mut()
                .write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                .await?;
        } else if method == "POST" {
            let _ = tx.send(Runtime::Error(format!("{method} {path}: {body}"))).await;
            r.get_mut()
                .write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                .await?;
        } else {
            bail!("unexpected runtime API call {method} {path}");
        }
        r.get_mut().flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=1000).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50), Duration::from_millis(500));
        assert_eq!(percentile(&v, 99), Duration::from_millis(990));
        assert_eq!(percentile(&v[..1], 99), Duration::from_millis(1));
    }
}
