//! `cargo xtask demo [--ci]`: the whole relay, offline, with the real Lambda binaries.
//!
//! 1. The local stack (moto + the Mapillary simulator with real-time processing, [`STAGE_SECONDS`]
//!    per stage; resources from `infra/template.yaml`) — [`stack::up`].
//! 2. The three functions under `cargo lambda watch` ([`LambdaWatch`]) with the template's
//!    environment, plus status-api's dev identity header and an OAuth callback URL on watch.
//! 3. The demo user connects their Mapillary account over HTTP: `POST /v1/mapillary/connect` →
//!    the simulator's consent page → its redirect to `GET /v1/mapillary/callback?code&state`,
//!    carrying the connect reply's browser-binding cookie.
//! 4. A generated sequence (two walks five minutes apart → two uploads, plus one image without GPS)
//!    goes to S3, `manifest.json` last; moto puts the notification on the ingest queue.
//! 5. The SQS event-source mapping ([`SqsEventSource`]) feeds zip-and-push, a schedule invokes the
//!    poller every [`SCHEDULE_EVERY`], and the status API (over HTTP) is read every second: each
//!    change of an upload is printed as one line, until every upload is FINISHED (or failed).
//! 6. The status document, the Mapillary links and the rejected image are printed; the run fails
//!    unless every upload is FINISHED and linked, every accepted image is linked and the image
//!    without GPS is reported. Without `--ci`, on a terminal, it then waits for Enter (the functions
//!    stay up to be explored).
//!
//! Everything started is stopped at the end, on error, and on Ctrl-C / SIGTERM / SIGHUP.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use aws_sdk_s3::primitives::ByteStream;
use integration_tests::esm::{scheduled_event, SqsEventSource};
use integration_tests::moto::free_port;
use integration_tests::stack::{s3_client, sdk_config};
use integration_tests::watch::LambdaWatch;
use mapillary_sim::defaults;
use relay_fixtures::{track, write_jpegs, ImageSpec, TrackSpec};
use serde_json::Value;
use tokio::sync::watch;

use crate::stack::{self, StackState};
use crate::{push, venv};

/// Geotagged images the demo generates by default (plus one without GPS).
pub const DEFAULT_IMAGES: usize = 60;
/// Seconds each simulated processing stage takes in the demo.
const STAGE_SECONDS: u64 = 2;
/// How often the emulated schedule invokes the poller.
const SCHEDULE_EVERY: Duration = Duration::from_secs(3);
/// How long the demo waits, after the manifest is written, for every upload to be final.
const TRACK_TIMEOUT: Duration = Duration::from_secs(180);
/// The demo's user id (the JWT `sub` it would have behind API Gateway).
const USER: &str = "demo-user";
/// status-api's dev identity header (`RELAY_DEV_AUTH_HEADER`): watch's function URLs carry no JWT
/// authorizer context.
const DEV_AUTH_HEADER: &str = "x-relay-user";
/// The image generated without GPS (zip-and-push must reject it).
const NO_GPS_IMAGE: &str = "IMG_NOGPS.jpg";

/// `cargo xtask demo [--ci] [--images N]`.
pub async fn run(root: &Path, ci: bool, images: usize) -> Result<()> {
    if images < 4 {
        bail!("--images must be at least 4 (two walks of at least two images)");
    }
    if stack::read_state(root)?.is_some_and(|s| s.is_running()) {
        bail!(
            "a local stack is already running; stop it with `cargo xtask stack down` \
             (the demo starts its own, with real-time processing)"
        );
    }
    let started = Instant::now();
    let work = async {
        let mut opts = stack::UpOptions::new(defaults::APP_ID, defaults::CLIENT_SECRET);
        let s = STAGE_SECONDS;
        opts.sim_args = vec![
            "--realtime".into(),
            "--stage-seconds".into(),
            format!("{s},{s},{s},{s}"),
        ];
        opts.print_exports = false;
        let state = stack::up(root, &opts).await?;
        demo(root, &state, ci, images, started).await
    };
    // Dropping `work` (on a signal) drops the LambdaWatch, which stops watch's process group.
    let result = tokio::select! {
        r = work => r,
        sig = shutdown_signal() => Err(anyhow!("interrupted ({sig}); stopping everything")),
    };
    if let Err(e) = stack::down(root) {
        eprintln!("demo: stopping the stack failed: {e:#}");
    }
    if result.is_ok() {
        println!(
            "demo: everything stopped; total {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    result
}

/// Resolves on SIGINT, SIGTERM or SIGHUP (never, if the handlers cannot be installed).
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

/// Seconds since the demo started, for the progress lines.
fn stamp(started: Instant) -> String {
    format!("[{:>5.1}s]", started.elapsed().as_secs_f64())
}

async fn demo(root: &Path, state: &StackState, ci: bool, images: usize, started: Instant) -> Result<()> {
    let venvs = venv::ensure(root)?;
    let work = root.join(".scratch").join("demo");
    let _ = std::fs::remove_dir_all(&work);

    // 2. The functions under watch. The callback URL must be watch's own, so pick the port first.
    let port = free_port()?;
    let api = LambdaWatch::function_url_on(port, "status-api");
    let mut env = state.exports.clone();
    env.retain(|(k, _)| k != integration_tests::moto::MOTO_URL_ENV);
    env.push(("RELAY_DEV_AUTH_HEADER".into(), DEV_AUTH_HEADER.into()));
    env.push((
        "RELAY_OAUTH_REDIRECT_URI".into(),
        format!("{api}/v1/mapillary/callback"),
    ));
    println!(
        "{} demo: building the three functions and starting `cargo lambda watch`",
        stamp(started)
    );
    let lambda = LambdaWatch::start_on(root, &venvs, &env, &work.join("watch"), port)?;
    println!(
        "{} demo: functions on {} (log {})",
        stamp(started),
        lambda.base_url(),
        lambda.log().display()
    );
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()?;

    // 3. Connect the demo user's Mapillary account through the status API's OAuth routes.
    connect(&http, &api, started).await?;

    // 4. The sample sequence, into S3.
    let sequence = format!("demo-{}", time::OffsetDateTime::now_utc().unix_timestamp());
    let photos = work.join("images");
    let count = generate(&photos, images)?;
    let sdk = sdk_config(&state.moto.url).await;
    let s3 = s3_client(&sdk);
    let env_map: BTreeMap<String, String> = env.iter().cloned().collect();
    let var = |k: &str| {
        env_map
            .get(k)
            .cloned()
            .ok_or_else(|| anyhow!("the stack exports no {k}"))
    };
    let bucket = var("RELAY_BUCKET")?;
    let prefix = format!("sequences/{USER}/{sequence}/");
    let files = push::jpegs_under(&photos)?;
    push::put_files(&s3, &bucket, &prefix, &files).await?;
    s3.put_object()
        .bucket(&bucket)
        .key(format!("{prefix}manifest.json"))
        .body(ByteStream::from_static(b"{}"))
        .send()
        .await
        .context("PutObject manifest.json")?;
    println!(
        "{} demo: {count} images ({} with GPS, 1 without) in s3://{bucket}/{prefix}, manifest.json last",
        stamp(started),
        count - 1
    );

    // 5. The triggers and the live status, until every upload is final.
    let esm = SqsEventSource::new(
        aws_sdk_sqs::Client::new(&sdk),
        &var("RELAY_INGEST_QUEUE_URL")?,
        "zip-and-push",
    );
    let stack_name = var("RELAY_STACK_NAME")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let tracked = async {
        let r = follow(&http, &api, &sequence, started).await;
        let _ = stop_tx.send(true);
        r
    };
    let (ingest, schedule, finals) = tokio::join!(
        run_ingest(&esm, &lambda, stop_rx.clone(), started),
        run_schedule(&http, &lambda, &stack_name, stop_rx.clone(), started),
        tracked,
    );
    let detail = finals?;
    ingest?;
    schedule?;

    // 6. The answer of the status API, the links and the rejected image.
    let images_doc = api_get(&http, &format!("{api}/v1/sequences/{sequence}/images")).await?;
    report(&detail, &images_doc, &sequence, started)?;

    if !ci && std::io::stdin().is_terminal() {
        println!(
            "\nThe functions are still up: try\n  curl -H '{DEV_AUTH_HEADER}: {USER}' {api}/v1/sequences\n\
             Press Enter to stop everything."
        );
        wait_for_enter().await;
    }
    drop(lambda);
    Ok(())
}

/// `POST /v1/mapillary/connect` → the simulator's consent page → the redirect to our callback.
async fn connect(http: &reqwest::Client, api: &str, started: Instant) -> Result<()> {
    let start = http
        .post(format!("{api}/v1/mapillary/connect"))
        .header(DEV_AUTH_HEADER, USER)
        .send()
        .await
        .context("POST /v1/mapillary/connect")?;
    // The connect reply binds the attempt to this client with a cookie the callback requires; a
    // browser keeps it by itself, the demo copies its `name=value` pair.
    let cookie = start
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|c| c.to_str().ok())
        .and_then(|c| c.split(';').next())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("connect answered {} without a Set-Cookie", start.status()))?;
    let start = json_of(start, "POST /v1/mapillary/connect").await?;
    let authorize = start["authorize_url"]
        .as_str()
        .ok_or_else(|| anyhow!("connect answered no authorize_url: {start}"))?;
    println!(
        "{} demo: POST /v1/mapillary/connect → authorize URL {}",
        stamp(started),
        authorize.split('?').next().unwrap_or(authorize)
    );
    // The user's browser would show Mapillary's consent page; the simulator consents as its demo user.
    let consent = http
        .get(authorize)
        .send()
        .await
        .context("GET the authorize URL")?;
    let location = consent
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| {
            anyhow!(
                "the consent page answered {} without a redirect",
                consent.status()
            )
        })?;
    if !location.starts_with(&format!("{api}/v1/mapillary/callback?")) {
        bail!("the consent page redirected to {location:?}, not to the status API's callback");
    }
    let connected = http
        .get(&location)
        .header(reqwest::header::COOKIE, cookie)
        .send()
        .await
        .context("GET /v1/mapillary/callback")?;
    let connected = json_of(connected, "GET /v1/mapillary/callback").await?;
    if connected["connected"] != true {
        bail!("the callback did not connect the account: {connected}");
    }
    println!(
        "{} demo: consent → GET /v1/mapillary/callback?code&state → {USER} connected as Mapillary user {} ({}); token stored KMS-encrypted",
        stamp(started),
        connected["username"].as_str().unwrap_or("?"),
        connected["mapillary_user_id"].as_str().unwrap_or("?"),
    );
    Ok(())
}

/// Two straight walks five minutes apart (zip-and-push splits them into two uploads) and one image
/// without GPS; returns how many images were written.
fn generate(dir: &Path, images: usize) -> Result<usize> {
    let start = time::OffsetDateTime::now_utc() - time::Duration::hours(2);
    let first = images / 2;
    let mut specs = track(first, &TrackSpec::new(50.8225, -0.1372, start));
    let mut second = TrackSpec::new(
        50.8240,
        -0.1340,
        start + time::Duration::seconds(first as i64) + time::Duration::minutes(5),
    );
    second.seed_base = 10_000;
    specs.extend(track(images - first, &second));
    write_jpegs(dir, &specs).context("writing the demo images")?;
    let mut no_gps = ImageSpec::new(50.8230, -0.1360, start + time::Duration::seconds(3));
    no_gps.with_gps = false;
    no_gps.seed = 99_999;
    let bytes = relay_fixtures::try_jpeg(&no_gps).map_err(|e| anyhow!("building {NO_GPS_IMAGE}: {e}"))?;
    std::fs::write(dir.join(NO_GPS_IMAGE), bytes).context("writing the image without GPS")?;
    Ok(specs.len() + 1)
}

/// The emulated SQS event-source mapping of the ingest queue, until `stop`.
async fn run_ingest(
    esm: &SqsEventSource,
    lambda: &LambdaWatch,
    mut stop: watch::Receiver<bool>,
    started: Instant,
) -> Result<()> {
    while !*stop.borrow() {
        let outcome = tokio::select! {
            _ = stop.changed() => break,
            o = esm.poll_once(lambda) => o?,
        };
        let Some(o) = outcome else { continue };
        match &o.invoke_error {
            Some(e) => println!(
                "{} zip-and-push: invocation with {} message(s) failed, retrying: {e}",
                stamp(started),
                o.received
            ),
            None => println!(
                "{} zip-and-push: batch of {} message(s) → {} acknowledged, {} to retry",
                stamp(started),
                o.received,
                o.deleted,
                o.retried.len()
            ),
        }
    }
    Ok(())
}

/// The emulated EventBridge schedule of the poller (every [`SCHEDULE_EVERY`]), until `stop`.
async fn run_schedule(
    http: &reqwest::Client,
    lambda: &LambdaWatch,
    stack_name: &str,
    mut stop: watch::Receiver<bool>,
    started: Instant,
) -> Result<()> {
    let rule = format!("{stack_name}-PollerSchedule");
    while !*stop.borrow() {
        let event = scheduled_event(&rule);
        let answer = tokio::select! {
            _ = stop.changed() => break,
            a = lambda.invoke(http, "poller", &event) => a,
        };
        match answer {
            Ok(v) => {
                let n = |k: &str| v[k].as_u64().unwrap_or(0);
                let busy = ["received", "written", "linked_feed", "linked_tiles", "errors"]
                    .iter()
                    .any(|k| n(k) > 0);
                if busy {
                    println!(
                        "{} poller: {} new cluster(s), {} checked, {} changed, {} linked (feed) / {} (tiles), {} error(s)",
                        stamp(started),
                        n("received"),
                        n("checked"),
                        n("written"),
                        n("linked_feed"),
                        n("linked_tiles"),
                        n("errors"),
                    );
                }
            }
            Err(e) => println!("{} poller: invocation failed: {e:#}", stamp(started)),
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(SCHEDULE_EVERY) => {}
        }
    }
    Ok(())
}

/// Reads `GET /v1/sequences/{id}` every second, prints each change, and returns the document once
/// the sequence failed or every upload is final at Mapillary.
async fn follow(http: &reqwest::Client, api: &str, sequence: &str, started: Instant) -> Result<Value> {
    let url = format!("{api}/v1/sequences/{sequence}");
    let deadline = Instant::now() + TRACK_TIMEOUT;
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let reply = http
            .get(&url)
            .header(DEV_AUTH_HEADER, USER)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        if reply.status() != reqwest::StatusCode::NOT_FOUND {
            let doc = json_of(reply, "GET /v1/sequences/{id}").await?;
            let seq_line = format!(
                "{} ({} images, {} accepted, {} rejected)",
                doc["state"].as_str().unwrap_or("?"),
                doc["image_count"],
                doc["accepted_count"],
                doc["rejected_count"]
            );
            if shown.get("sequence") != Some(&seq_line) {
                println!("{} sequence {sequence}: {seq_line}", stamp(started));
                shown.insert("sequence".into(), seq_line);
            }
            let uploads = doc["uploads"].as_array().cloned().unwrap_or_default();
            for u in &uploads {
                let line = upload_line(u);
                let key = format!("upload {}", u["index"]);
                if shown.get(&key) != Some(&line) {
                    println!("{}   {key}: {line}", stamp(started));
                    shown.insert(key, line);
                }
            }
            let seq_failed = doc["state"] == "FAILED";
            let all_final = !uploads.is_empty()
                && doc["state"] == "UPLOADED"
                && uploads.iter().all(|u| {
                    u["state"] == "FAILED"
                        || matches!(u["mapillary"]["state"].as_str(), Some("FINISHED" | "FAILED"))
                });
            if seq_failed || all_final {
                return Ok(doc);
            }
        }
        if Instant::now() > deadline {
            bail!("the uploads were not final within {TRACK_TIMEOUT:?} (the last lines above show where they stopped)");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `HANDED_OFF 30 img cluster 123 | Mapillary IN_PROGRESS: ingestion FINISHED, processing IN_PROGRESS, …`.
fn upload_line(u: &Value) -> String {
    let mut line = format!("{} {} img", u["state"].as_str().unwrap_or("?"), u["image_count"]);
    if let Some(c) = u["cluster_id"].as_str() {
        line.push_str(&format!(" cluster {c}"));
    }
    if let Some(e) = u["error"].as_str() {
        line.push_str(&format!(" error: {e}"));
    }
    let m = &u["mapillary"];
    if m.is_object() {
        let stages: Vec<String> = m["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                format!(
                    "{} {}",
                    s["label"].as_str().unwrap_or("?"),
                    s["status"].as_str().unwrap_or("-")
                )
            })
            .collect();
        line.push_str(&format!(
            " | Mapillary {}: {}",
            m["state"].as_str().unwrap_or("?"),
            stages.join(", ")
        ));
    }
    line
}

/// Prints the final status document, links and rejections; fails unless every upload is FINISHED
/// and linked, every accepted image is linked and the image without GPS is reported (with or
/// without `--ci`: the flag only makes the run non-interactive).
fn report(detail: &Value, images: &Value, sequence: &str, started: Instant) -> Result<()> {
    println!("\nGET /v1/sequences/{sequence} (status API over HTTP):");
    println!("{}", serde_json::to_string_pretty(detail)?);

    let mut problems = Vec::new();
    let uploads = detail["uploads"].as_array().cloned().unwrap_or_default();
    if uploads.is_empty() {
        problems.push(format!(
            "the sequence has no uploads (state {}, reason {})",
            detail["state"], detail["reason"]
        ));
    }
    println!("\nMapillary:");
    for u in &uploads {
        let m = &u["mapillary"];
        let state = m["state"].as_str().unwrap_or("not tracked");
        println!(
            "  upload {} ({} images, cluster {}): {state}, {} linked, {} dropped, via {}",
            u["index"],
            u["image_count"],
            u["cluster_id"].as_str().unwrap_or("-"),
            m["accepted_count"],
            m["rejected_count"],
            m["status_source"].as_str().unwrap_or("-")
        );
        let links: Vec<(String, String)> = m["sequences"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                (
                    s["id"].as_str().unwrap_or("?").to_string(),
                    s["link"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        for (id, link) in &links {
            println!("    sequence {id}: {link}");
        }
        if state != "FINISHED" {
            problems.push(format!("upload {} ended {state}", u["index"]));
        } else if links.is_empty() || links.iter().any(|(_, l)| l.is_empty()) {
            problems.push(format!("upload {} is FINISHED but not linked", u["index"]));
        }
    }

    let list = images["images"].as_array().cloned().unwrap_or_default();
    let count = |s: &str| list.iter().filter(|i| i["status"] == s).count();
    println!(
        "\nImages (GET /v1/sequences/{sequence}/images): {} linked, {} dropped by Mapillary, {} pending, {} rejected",
        count("LINKED"),
        count("DROPPED"),
        count("PENDING"),
        count("REJECTED")
    );
    if let Some(first) = list.iter().find(|i| i["status"] == "LINKED") {
        println!(
            "  e.g. {} → {}",
            first["key"].as_str().unwrap_or("?"),
            first["link"].as_str().unwrap_or("?")
        );
    }
    let accepted = detail["accepted_count"].as_u64().unwrap_or(0) as usize;
    if count("LINKED") != accepted || accepted == 0 {
        problems.push(format!(
            "{} of {accepted} accepted images are linked",
            count("LINKED")
        ));
    }
    let rejected = detail["rejected"].as_array().cloned().unwrap_or_default();
    for r in &rejected {
        println!(
            "  rejected {}: {}",
            r["key"].as_str().unwrap_or("?"),
            r["reason"].as_str().unwrap_or("?")
        );
    }
    let no_gps_reported = rejected.iter().any(|r| {
        r["key"].as_str().is_some_and(|k| k.ends_with(NO_GPS_IMAGE))
            && r["reason"].as_str().is_some_and(|s| !s.is_empty())
    });
    if !no_gps_reported {
        problems.push(format!("{NO_GPS_IMAGE} (no GPS) is not reported as rejected"));
    }

    if problems.is_empty() {
        println!(
            "\n{} demo: done — {} upload(s) FINISHED and linked, {} images linked, {} rejected with a reason",
            stamp(started),
            uploads.len(),
            count("LINKED"),
            rejected.len()
        );
        return Ok(());
    }
    for p in &problems {
        println!("  !! {p}");
    }
    bail!("the demo did not end as expected: {}", problems.join("; "))
}

/// GET with the demo user's identity; the JSON body of a 2xx answer.
async fn api_get(http: &reqwest::Client, url: &str) -> Result<Value> {
    let reply = http
        .get(url)
        .header(DEV_AUTH_HEADER, USER)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    json_of(reply, url).await
}

async fn json_of(reply: reqwest::Response, what: &str) -> Result<Value> {
    let status = reply.status();
    let body = reply.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{what}: HTTP {status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("{what}: not JSON: {body}"))
}

/// Waits for a line on stdin (a thread of its own: a pending read must not keep the process alive
/// after Ctrl-C).
async fn wait_for_enter() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = tx.send(());
    });
    let _ = rx.await;
}
