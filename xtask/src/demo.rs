//! `cargo xtask demo [--ci] [--world NAME]`: the whole relay, offline, with the real Lambda binaries.
//!
//! 1. The local stack (moto + the Mapillary simulator in the chosen world — `--world`, default the
//!    simulator's [`DEFAULT_WORLD`] — with real-time processing, [`STAGE_SECONDS`] per stage; resources
//!    from `infra/template.yaml`; the poller gets the simulator's web-app token as its feed token) —
//!    [`stack::up`].
//! 2. The three functions under `cargo lambda watch` ([`LambdaWatch`]) with the template's
//!    environment, plus status-api's dev identity header and an OAuth callback URL on watch.
//! 3. The demo user connects their Mapillary account over HTTP: `POST /v1/mapillary/connect` →
//!    the simulator's consent page → its redirect to `GET /v1/mapillary/callback?code&state`,
//!    carrying the connect reply's browser-binding cookie. Then it registers a webhook
//!    (`PUT /v1/webhook`) pointing at a receiver on loopback that verifies each signature.
//! 4. A generated sequence (two walks five minutes apart → two uploads, plus one image without GPS)
//!    is dropped through the status API as a browser would (`upload::drop_folder`, what
//!    `cargo xtask upload` does): `POST /v1/sequences`
//!    announces the files (names, sizes, md5s), each file is `PUT` to its presigned URL (moto's S3),
//!    and `POST /v1/sequences/{id}/complete` writes `manifest.json`; moto puts its notification on
//!    the ingest queue.
//! 5. The SQS event-source mapping ([`SqsEventSource`]) feeds zip-and-push, a schedule invokes the
//!    poller every [`SCHEDULE_EVERY`], and the status API (over HTTP) is read every second: each
//!    change of an upload is printed as one line, until every upload is FINISHED (or failed). When
//!    the sequence waits in `AWAITING_UPLOAD_TOKEN` (Mapillary refused the OAuth token for uploads,
//!    as in `oauth-upload-refused`), the demo does what the user would: it gets a user upload token
//!    as `mapillary_tools authenticate` does (`POST /graph/login`), hands it over with
//!    `PUT /v1/mapillary/connection`, and asks the API to deliver the manifest again
//!    (`POST /v1/sequences/{id}/retry`) to resume.
//! 6. The status document, the Mapillary links, the rejected image, which token each Mapillary
//!    call presented (the simulator's request log, per route) and the notifications the webhook
//!    received (one line per change, signature checked) are printed; the run fails unless every
//!    notification was signed right, each FINISHED upload's `upload_state → HANDED_OFF` (zip-and-push)
//!    and then its `state → FINISHED` (Mapillary) arrived, every
//!    upload is FINISHED and linked, every accepted image is linked and the image without GPS is
//!    reported — and, in `feed-gone`, unless the uploads were linked through coverage tiles and their
//!    status says the feed is unavailable. Without `--ci`, on a terminal, it then waits for Enter (the
//!    functions stay up to be explored).
//!
//! `--all-worlds` runs steps 4–6 once per world ([`ALL_WORLDS`], `oauth-upload-refused` last: once the
//! user handed over an upload token it stays connected), on the same stack, simulator and functions,
//! switching the simulator's world (`POST /_sim/world`) and clearing its request log between runs.
//!
//! Everything started is stopped at the end, on error, and on Ctrl-C / SIGTERM / SIGHUP.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use integration_tests::esm::{scheduled_event, SqsEventSource};
use integration_tests::moto::free_port;
use integration_tests::stack::sdk_config;
use integration_tests::watch::LambdaWatch;
use integration_tests::webhook_receiver::WebhookReceiver;
use mapillary_sim::{defaults, World};
use relay_fixtures::{track, write_jpegs, ImageSpec, TrackSpec};
use serde_json::Value;
use tokio::sync::watch;

use crate::stack::{self, StackState};
use crate::{upload, venv};

/// Geotagged images the demo generates by default (plus one without GPS).
pub const DEFAULT_IMAGES: usize = 60;
/// Geotagged images per world in `cargo xtask test`'s run of every world (fewer than the demo's: the
/// worlds differ in how calls are made, not in how many images there are).
pub const WORLDS_IMAGES: usize = 12;
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
pub(crate) const DEV_AUTH_HEADER: &str = "x-relay-user";
/// The image generated without GPS (zip-and-push must reject it).
const NO_GPS_IMAGE: &str = "IMG_NOGPS.jpg";

/// The worlds of `--all-worlds`, in order: `oauth-upload-refused` last, because the upload token the
/// user hands over there replaces their OAuth connection for every later run.
pub const ALL_WORLDS: [World; 7] = [
    World::Lenient,
    World::Seed2022,
    World::PartialBytesDropped,
    World::RefreshRevokes,
    World::FeedDrift,
    World::FeedGone,
    World::OauthUploadRefused,
];

/// `cargo xtask demo [--ci] [--images N] [--world NAME]`; with several `worlds`, one sequence per
/// world on the same stack (see the module docs).
pub async fn run(root: &Path, ci: bool, images: usize, worlds: &[World]) -> Result<()> {
    let Some(&world) = worlds.first() else {
        bail!("no world to run the demo in");
    };
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
        opts.sim_args = realtime_args(STAGE_SECONDS);
        opts.sim_args.extend(["--world".into(), world.name().into()]);
        opts.print_exports = false;
        println!("{} demo: simulator world {world}", stamp(started));
        let state = stack::up(root, &opts).await?;
        demo(root, &state, ci, images, worlds, started).await
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

/// The simulator's arguments for real-time processing, `s` seconds per stage.
pub(crate) fn realtime_args(s: u64) -> Vec<String> {
    vec![
        "--realtime".into(),
        "--stage-seconds".into(),
        format!("{s},{s},{s},{s}"),
    ]
}

/// Resolves on SIGINT, SIGTERM or SIGHUP (never, if the handlers cannot be installed).
pub(crate) async fn shutdown_signal() -> &'static str {
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
pub(crate) fn stamp(started: Instant) -> String {
    format!("[{:>5.1}s]", started.elapsed().as_secs_f64())
}

async fn demo(
    root: &Path,
    state: &StackState,
    ci: bool,
    images: usize,
    worlds: &[World],
    started: Instant,
) -> Result<()> {
    let venvs = venv::ensure(root)?;
    let work = root.join(".scratch").join("demo");
    let _ = std::fs::remove_dir_all(&work);

    // 2. The functions under watch. The callback URL must be watch's own, so pick the port first.
    let port = free_port()?;
    let api = LambdaWatch::function_url_on(port, "status-api");
    let env = watch_env(state, &api);
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

    // 3. Connect the demo user's Mapillary account through the status API's OAuth routes, and
    //    register a webhook (a receiver on loopback) for the status-change notifications.
    connect(&http, &api, USER, None, started).await?;
    let receiver = WebhookReceiver::start().await?;
    register_webhook(&http, &api, &receiver, started).await?;

    let sdk = sdk_config(&state.moto.url).await;
    let env_map: BTreeMap<String, String> = env.iter().cloned().collect();
    let var = |k: &str| crate::stack::exported(&env_map, k);
    let run = Run {
        http: &http,
        api: &api,
        sim_url: &state.sim.url,
        lambda: &lambda,
        esm: SqsEventSource::new(
            aws_sdk_sqs::Client::new(&sdk),
            &var("RELAY_INGEST_QUEUE_URL")?,
            "zip-and-push",
        ),
        stack_name: var("RELAY_STACK_NAME")?,
        images,
        started,
        receiver: &receiver,
    };
    let mut failed = Vec::new();
    for (i, &world) in worlds.iter().enumerate() {
        if i > 0 {
            run.switch_world(world).await?;
        }
        let result = run.sequence(world, &work.join(world.name())).await;
        if worlds.len() == 1 {
            result?;
        } else if let Err(e) = result {
            println!("{} demo: world {world} FAILED: {e:#}", stamp(started));
            failed.push(format!("{world}: {e:#}"));
        } else {
            println!("{} demo: world {world} passed", stamp(started));
        }
    }
    if !failed.is_empty() {
        bail!(
            "the demo failed in {} world(s): {}",
            failed.len(),
            failed.join("; ")
        );
    }

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

/// The environment of the functions under watch: the stack's exports (without the test-only moto URL),
/// status-api's dev identity header, and the OAuth callback on watch's status-api URL `api`.
pub(crate) fn watch_env(state: &StackState, api: &str) -> Vec<(String, String)> {
    let mut env = state.exports.clone();
    env.retain(|(k, _)| k != integration_tests::moto::MOTO_URL_ENV);
    env.push(("RELAY_DEV_AUTH_HEADER".into(), DEV_AUTH_HEADER.into()));
    env.push((
        "RELAY_OAUTH_REDIRECT_URI".into(),
        format!("{api}/v1/mapillary/callback"),
    ));
    env
}

/// What one sequence's run needs (shared by the worlds of `--all-worlds`).
struct Run<'a> {
    http: &'a reqwest::Client,
    api: &'a str,
    sim_url: &'a str,
    lambda: &'a LambdaWatch,
    esm: SqsEventSource,
    stack_name: String,
    images: usize,
    started: Instant,
    /// The demo user's webhook receiver.
    receiver: &'a WebhookReceiver,
}

impl Run<'_> {
    /// `POST /_sim/world` and a cleared request log, so the next run's token summary is its own.
    async fn switch_world(&self, world: World) -> Result<()> {
        let admin = format!("{}/_sim", self.sim_url.trim_end_matches('/'));
        let r = self
            .http
            .post(format!("{admin}/world"))
            .json(&serde_json::json!({ "world": world.name() }))
            .send()
            .await
            .context("POST /_sim/world")?;
        json_of(r, "POST /_sim/world").await?;
        let r = self
            .http
            .delete(format!("{admin}/requests"))
            .send()
            .await
            .context("DELETE /_sim/requests")?;
        if !r.status().is_success() {
            bail!("DELETE /_sim/requests: HTTP {}", r.status());
        }
        println!("\n{} demo: simulator world {world}", stamp(self.started));
        Ok(())
    }

    /// Steps 4–6 for one sequence in `world`.
    async fn sequence(&self, world: World, work: &Path) -> Result<()> {
        let (http, api, started) = (self.http, self.api, self.started);
        let _ = std::fs::remove_dir_all(work);
        // 4. The sample sequence, dropped through the status API.
        let photos = work.join("images");
        let count = generate(&photos, self.images)?;
        let sequence = upload::drop_folder(&upload::Api::dev(api, USER, http.clone()), &photos).await?;
        let manifest = Manifest {
            http,
            api,
            sequence: sequence.clone(),
        };
        println!(
            "{} demo: {count} images ({} with GPS, 1 without) dropped through the API as sequence {sequence}: \
             announced, PUT to their presigned URLs, completed (manifest.json written)",
            stamp(started),
            count - 1
        );

        // 5. The triggers and the live status, until every upload is final.
        let (stop_tx, stop_rx) = watch::channel(false);
        let user_side = UserSide {
            http,
            api,
            sim_url: self.sim_url,
            manifest: &manifest,
        };
        let tracked = async {
            let r = follow(&user_side, &sequence, started).await;
            let _ = stop_tx.send(true);
            r
        };
        let (ingest, schedule, finals) = tokio::join!(
            run_ingest(&self.esm, self.lambda, stop_rx.clone(), started),
            run_schedule(http, self.lambda, &self.stack_name, stop_rx.clone(), started),
            tracked,
        );
        let detail = finals?;
        ingest?;
        schedule?;

        // 6. The answer of the status API, the links, the rejected image and the tokens used.
        let images_doc = api_get(http, &format!("{api}/v1/sequences/{sequence}/images")).await?;
        print_token_use(http, self.sim_url).await?;
        let notified = notifications(self.receiver, &detail, &sequence).await;
        let reported = report(&detail, &images_doc, &sequence, world, started);
        notified.and(reported)
    }
}

/// `PUT /v1/webhook` with the receiver's URL, as the demo user; the receiver verifies signatures
/// with the secret answered (once).
async fn register_webhook(
    http: &reqwest::Client,
    api: &str,
    receiver: &WebhookReceiver,
    started: Instant,
) -> Result<()> {
    let r = http
        .put(format!("{api}/v1/webhook"))
        .header(DEV_AUTH_HEADER, USER)
        .json(&serde_json::json!({ "url": receiver.url }))
        .send()
        .await
        .context("PUT /v1/webhook")?;
    let body = json_of(r, "PUT /v1/webhook").await?;
    receiver.set_secret(body["secret"].as_str().context("PUT /v1/webhook: no secret")?);
    println!(
        "{} demo: PUT /v1/webhook → notifications go to {} (HMAC-SHA256 secret answered once)",
        stamp(started),
        receiver.url
    );
    Ok(())
}

/// Prints the notifications the webhook received for `sequence` (waiting a little for the last
/// ones: the poller publishes at the end of the run that saw FINISHED); fails unless each was
/// signed right and every upload's `upload_state → HANDED_OFF` (zip-and-push's) and then its `state →
/// FINISHED` (Mapillary's) arrived.
async fn notifications(receiver: &WebhookReceiver, detail: &Value, sequence: &str) -> Result<()> {
    let uploads: Vec<String> = detail["uploads"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|u| u["mapillary"]["state"] == "FINISHED")
        .filter_map(|u| u["upload_id"].as_str().map(str::to_string))
        .collect();
    let mine = || -> Vec<integration_tests::webhook_receiver::Received> {
        receiver
            .received()
            .into_iter()
            .filter(|r| r.body["detail"]["sequence_id"] == sequence)
            .collect()
    };
    // Where in `got` the change of `field` to `to` for `upload` arrived.
    let at = |got: &[integration_tests::webhook_receiver::Received], upload: &str, field: &str, to: &str| {
        got.iter().position(|r| {
            let d = &r.body["detail"];
            d["upload_id"] == upload && d["change"]["field"] == field && d["change"]["to"] == to
        })
    };
    let finished = |got: &[integration_tests::webhook_receiver::Received], upload: &str| {
        at(got, upload, "state", "FINISHED").is_some()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = mine();
    while !uploads.iter().all(|u| finished(&got, u)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        got = mine();
    }
    println!(
        "
Notifications received by the webhook ({}):",
        got.len()
    );
    for r in &got {
        let d = &r.body["detail"];
        println!(
            "  {} {:<30} {} {} → {} ({})",
            r.event_id,
            r.event_type,
            d["change"]["field"].as_str().unwrap_or("?"),
            d["change"]["from"].as_str().unwrap_or("-"),
            d["change"]["to"].as_str().unwrap_or("-"),
            if r.verified {
                "signature ok"
            } else {
                "BAD SIGNATURE"
            }
        );
    }
    let bad = got.iter().filter(|r| !r.verified).count();
    if bad > 0 {
        bail!("{bad} notification(s) with a bad signature");
    }
    let missing: Vec<&String> = uploads.iter().filter(|u| !finished(&got, u)).collect();
    if !missing.is_empty() {
        bail!("no state → FINISHED notification for upload(s) {missing:?}");
    }
    // zip-and-push's own changes are published too, before the upload's Mapillary ones.
    for u in &uploads {
        let handed_off = at(&got, u, shared::events::UPLOAD_STATE_FIELD, "HANDED_OFF");
        match (handed_off, at(&got, u, "state", "FINISHED")) {
            (Some(h), Some(f)) if h < f => {}
            (Some(_), _) => bail!("upload {u}: upload_state → HANDED_OFF arrived after state → FINISHED"),
            (None, _) => bail!("no upload_state → HANDED_OFF notification for upload {u}"),
        }
    }
    Ok(())
}

/// `POST /v1/mapillary/connect` → the simulator's consent page → the redirect to our callback, as
/// relay user `user`; the simulator consents as `sim_user` (its id or username; default its demo user).
pub(crate) async fn connect(
    http: &reqwest::Client,
    api: &str,
    user: &str,
    sim_user: Option<&str>,
    started: Instant,
) -> Result<()> {
    let start = http
        .post(format!("{api}/v1/mapillary/connect"))
        .header(DEV_AUTH_HEADER, user)
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
    // The user's browser would show Mapillary's consent page; the simulator consents as its demo user
    // (or as `sim_user`, its stand-in for whoever is logged in to Mapillary in that browser).
    let authorize = match sim_user {
        Some(u) => format!("{authorize}&sim_user={u}"),
        None => authorize.to_string(),
    };
    let consent = http
        .get(&authorize)
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
        "{} demo: consent → GET /v1/mapillary/callback?code&state → {user} connected as Mapillary user {} ({}); token stored KMS-encrypted",
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
    stop: watch::Receiver<bool>,
    started: Instant,
) -> Result<()> {
    // `stop` is checked between polls, never by dropping a poll in flight: moto completes an
    // abandoned long-poll receive anyway, and the message it hides (for the queue's visibility
    // timeout) is the next demo's manifest when worlds run one after another on one stack.
    while !*stop.borrow() {
        let outcome = esm.poll_once(lambda).await?;
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

/// The sequence's `manifest.json`, written again by the status API (`POST /v1/sequences/{id}/retry`):
/// it delivers the sequence again.
struct Manifest<'a> {
    http: &'a reqwest::Client,
    api: &'a str,
    sequence: String,
}

impl Manifest<'_> {
    async fn put(&self) -> Result<()> {
        let path = format!("/v1/sequences/{}/retry", self.sequence);
        let r = self
            .http
            .post(format!("{}{path}", self.api))
            .header(DEV_AUTH_HEADER, USER)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        json_of(r, "POST /v1/sequences/{id}/retry").await?;
        Ok(())
    }
}

/// What the demo user can do while the sequence is followed: read the status API, and hand over an
/// upload token when Mapillary wants one.
struct UserSide<'a> {
    http: &'a reqwest::Client,
    api: &'a str,
    /// The simulator's base URL (Mapillary, as the user's `mapillary_tools` would reach it).
    sim_url: &'a str,
    manifest: &'a Manifest<'a>,
}

/// Reads `GET /v1/sequences/{id}` every second, prints each change, and returns the document once
/// the sequence failed or every upload is final at Mapillary. A sequence in `AWAITING_UPLOAD_TOKEN`
/// gets an upload token handed over once ([`hand_over_upload_token`]) and its manifest delivered again.
async fn follow(user: &UserSide<'_>, sequence: &str, started: Instant) -> Result<Value> {
    let (http, api) = (user.http, user.api);
    let url = format!("{api}/v1/sequences/{sequence}");
    let deadline = Instant::now() + TRACK_TIMEOUT;
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    let mut handed_over = false;
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
            // Once: until the manifest delivered again is processed, the sequence still shows the wait.
            if doc["state"] == "AWAITING_UPLOAD_TOKEN" && !handed_over {
                hand_over_upload_token(user, started).await?;
                user.manifest.put().await?;
                println!(
                    "{} demo: manifest.json delivered again to resume the waiting uploads",
                    stamp(started)
                );
                handed_over = true;
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

/// What the user does when Mapillary refuses their OAuth token for uploads: check the connection says
/// so, get a user upload token the way `mapillary_tools authenticate` does (`POST /graph/login` with
/// the client token and the user's e-mail and password), and hand it over with
/// `PUT /v1/mapillary/connection`.
async fn hand_over_upload_token(user: &UserSide<'_>, started: Instant) -> Result<()> {
    let connection_url = format!("{}/v1/mapillary/connection", user.api);
    let connection = api_get(user.http, &connection_url).await?;
    println!(
        "{} demo: the sequence waits in AWAITING_UPLOAD_TOKEN; GET /v1/mapillary/connection → kind {}, upload_token_required {}, {}",
        stamp(started),
        connection["kind"],
        connection["upload_token_required"],
        connection["upload_refusal"]["message"]
    );
    if connection["upload_token_required"] != true {
        bail!("the sequence waits for an upload token but the connection does not say one is required: {connection}");
    }
    let login = user
        .http
        .post(format!("{}/graph/login", user.sim_url.trim_end_matches('/')))
        .header(
            reqwest::header::AUTHORIZATION,
            format!("OAuth {}", defaults::WEB_APP_CLIENT_TOKEN),
        )
        .json(&serde_json::json!({
            "email": defaults::DEMO_EMAIL,
            "password": defaults::DEMO_PASSWORD,
            "locale": "en_US",
        }))
        .send()
        .await
        .context("POST /graph/login")?;
    let login = json_of(login, "POST /graph/login").await?;
    let token = login["access_token"]
        .as_str()
        .ok_or_else(|| anyhow!("POST /graph/login answered no access_token"))?;
    println!(
        "{} demo: POST /graph/login (as `mapillary_tools authenticate`) → a user upload token for Mapillary user {}",
        stamp(started),
        login["user_id"].as_str().unwrap_or("?")
    );
    let put = user
        .http
        .put(&connection_url)
        .header(DEV_AUTH_HEADER, USER)
        .json(&serde_json::json!({ "upload_token": token }))
        .send()
        .await
        .context("PUT /v1/mapillary/connection")?;
    let put = json_of(put, "PUT /v1/mapillary/connection").await?;
    if put["kind"] != "upload_token" || put["upload_token_required"] != false {
        bail!("PUT /v1/mapillary/connection did not connect the upload token: {put}");
    }
    println!(
        "{} demo: PUT /v1/mapillary/connection → connected with an upload token (kind {}, upload_token_required {})",
        stamp(started),
        put["kind"],
        put["upload_token_required"]
    );
    Ok(())
}

/// Prints, per Mapillary route, which kind of token the relay (and the demo's user side) presented and
/// how often, from the simulator's request log (`GET /_sim/requests`, which never holds token values).
async fn print_token_use(http: &reqwest::Client, sim_url: &str) -> Result<()> {
    let log = http
        .get(format!("{}/_sim/requests", sim_url.trim_end_matches('/')))
        .send()
        .await
        .context("GET /_sim/requests")?;
    let log = json_of(log, "GET /_sim/requests").await?;
    let mut counts: BTreeMap<(String, String), BTreeMap<String, u64>> = BTreeMap::new();
    for e in log.as_array().into_iter().flatten() {
        let route = format!(
            "{} {}",
            e["method"].as_str().unwrap_or("?"),
            route_of(e["path"].as_str().unwrap_or("?"))
        );
        let status = e["status"]
            .as_u64()
            .map_or_else(|| "dropped".to_string(), |s| s.to_string());
        let kind = token_kind(e);
        *counts
            .entry((route, kind))
            .or_default()
            .entry(status)
            .or_default() += 1;
    }
    println!(
        "
Mapillary calls by route and token (simulator request log; reply statuses with counts):"
    );
    for ((route, kind), statuses) in &counts {
        let statuses: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}×{n}")).collect();
        println!("  {route:<40} {kind:<13} {}", statuses.join(" "));
    }
    Ok(())
}

/// The token kind of a request-log entry in the words of docs/worlds.md: `oauth` (an OAuth-app user
/// token), `upload_token` (a user upload token), `web_app` (the web app's client token), `app_client`
/// (another app's client token), `client_secret` (`/graph/token`), else the simulator's own label
/// (`none`, `expired`, `revoked`, …).
fn token_kind(entry: &Value) -> String {
    if entry["path"] == "/graph/token" {
        // The code exchange and refresh present the app's client secret, which is no token.
        return "client_secret".into();
    }
    match entry["token_kind"].as_str().unwrap_or("?") {
        "user_oauth" => "oauth".into(),
        "user" => "upload_token".into(),
        "client" if entry["client_app_id"] == defaults::WEB_APP_ID => "web_app".into(),
        "client" => "app_client".into(),
        other => other.into(),
    }
}

/// A request path with its ids folded (`/rupload/{key}`, `/graph/{id}`, tile coordinates), so calls
/// group by route.
fn route_of(path: &str) -> String {
    if path.starts_with("/rupload/") {
        return "/rupload/{key}".into();
    }
    path.split('/')
        .map(|seg| {
            if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
                "{n}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
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
fn report(detail: &Value, images: &Value, sequence: &str, world: World, started: Instant) -> Result<()> {
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
        let feed = &m["feed"];
        println!(
            "    feed: source {}, available {}, error {} — {}",
            feed["source"].as_str().unwrap_or("-"),
            feed["available"],
            feed["error_class"].as_str().unwrap_or("-"),
            feed["message"].as_str().unwrap_or("-")
        );
        if world == World::FeedGone {
            // The feed's document is unknown: the uploads can only have been linked through tiles
            // (Plan A), and the status must say that the feed is unavailable.
            if m["status_source"] != "COVERAGE_TILES" {
                problems.push(format!(
                    "upload {} was linked via {}, not COVERAGE_TILES, in feed-gone",
                    u["index"], m["status_source"]
                ));
            }
            if feed["available"] != false || feed["error_class"] != "GONE" {
                problems.push(format!(
                    "upload {}'s status does not say the feed is gone (feed {feed})",
                    u["index"]
                ));
            }
        }
        if state != "FINISHED" {
            problems.push(format!("upload {} ended {state}", u["index"]));
        } else if links.is_empty() || links.iter().any(|(_, l)| l.is_empty()) {
            problems.push(format!("upload {} is FINISHED but not linked", u["index"]));
        }
    }

    if !detail["feed"].is_null() {
        println!("  feed summary (last poller run): {}", detail["feed"]);
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
    api_get_as(http, url, USER).await
}

/// GET as relay user `user` (status-api's dev identity header); the JSON body of a 2xx answer.
pub(crate) async fn api_get_as(http: &reqwest::Client, url: &str, user: &str) -> Result<Value> {
    let reply = http
        .get(url)
        .header(DEV_AUTH_HEADER, user)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    json_of(reply, url).await
}

pub(crate) async fn json_of(reply: reqwest::Response, what: &str) -> Result<Value> {
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
