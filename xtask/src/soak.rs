//! `cargo xtask soak [--sequences N] [--users U] [--seed S] [--short]`: many users' sequences, some
//! hostile, through the whole relay under faults — the proof of issue 15 (docs/reliability.md).
//!
//! 1. The local stack ([`stack::up`]: moto, the simulator in its default world with real-time
//!    processing of [`STAGE_SECONDS`] per stage, resources from `infra/template.yaml`). Time is
//!    scaled down: the functions get a deadline of [`Scale::zip_timeout`] / [`Scale::poller_timeout`]
//!    instead of 900 / 300 s, and the ingest and clusters queues' visibility timeouts are scaled
//!    with them (SetQueueAttributes), so a killed invocation's messages come back in seconds.
//! 2. status-api under `cargo lambda watch` (as in the demo); zip-and-push and the poller as their
//!    plain binaries behind a Runtime API each ([`FunctionProcess`]): [`Scale::zip_envs`]
//!    execution environments of zip-and-push fed by the emulated SQS event-source mapping
//!    ([`SqsEventSource`]: batches of the template's size; failed items and killed invocations come
//!    back after the queue's visibility timeout, as from SQS), one poller invoked by the emulated
//!    schedule. Any invocation may be SIGKILLed at a random point; the next one starts a new process.
//! 3. Every user connects over the status API's OAuth flow as their own simulator user.
//! 4. Sequences are dropped into S3 (`manifest.json` last) over a short window: small walks, some
//!    in two walks (two uploads), a catalogue of bad files mixed in (not a JPEG, truncated, empty, no
//!    GPS, latitude and longitude out of range, year 10000 in UTC), a few with bad files only, the
//!    dotted-id pair (user `h` + sequence `a.b`, user `h.a` + sequence `b`), manifests dropped again
//!    (the same and changed), notifications delivered twice.
//! 5. Faults: the simulator fails rupload and `finish_upload` with 5xx and 429, drops connections,
//!    loses `finish_upload` replies after committing, and tokens are expired while the relay runs.
//! 6. Once nothing is in flight (every sequence final, both queues empty) or the time is up, every
//!    invariant is checked through the status API (as each user) and the simulator's admin API, a
//!    table printed, and the command fails naming each broken invariant with its ids.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_sqs::types::QueueAttributeName;
use integration_tests::esm::{scheduled_event, SqsEventSource};
use integration_tests::moto::free_port;
use integration_tests::stack::{s3_client, sdk_config, ACCOUNT_ID, REGION};
use integration_tests::watch::LambdaWatch;
use mapillary_sim::defaults;
use relay_fixtures::{jpeg, track, ImageSpec, TimeTags, TrackSpec};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::demo::{self, api_get_as, json_of, stamp};
use crate::lambda_proc::{FunctionProcess, Outcome};
use crate::rng::Rng;
use crate::stack::{self, StackState};
use crate::{package, push, venv};

/// Seconds per simulated processing stage.
const STAGE_SECONDS: u64 = 1;

/// `cargo xtask soak`'s options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Sequences to drop.
    pub sequences: usize,
    /// Users (the first two are the dotted pair `h` and `h.a`).
    pub users: usize,
    /// Seeds the mix, the kill points, the token expiries and the simulator's fault rules.
    pub seed: u64,
    /// The short variant (tighter time scale, every fault rule deterministic).
    pub short: bool,
}

/// Sequences and users of `--short`.
pub const SHORT_SEQUENCES: usize = 20;
/// Users of `--short`.
pub const SHORT_USERS: usize = 4;

/// The time scale and intensity of a run.
#[derive(Debug, Clone)]
struct Scale {
    /// zip-and-push's deadline per invocation (the template's is 900 s).
    zip_timeout: Duration,
    /// The ingest queue's visibility timeout, seconds (the template's is 5400 = 6 × 900).
    zip_visibility: i32,
    /// The poller's deadline per invocation (the template's is 300 s; the poller stops starting work
    /// 20 s before it, and after `poller_budget_s` anyway).
    poller_timeout: Duration,
    /// The clusters queue's visibility timeout, seconds (the template's is 1800; longer than a run,
    /// which the budget bounds).
    clusters_visibility: i32,
    /// `RELAY_POLL_BUDGET_S` of the poller (the template's 240 with a 300 s timeout).
    poller_budget_s: u64,
    /// The emulated schedule's period (the template's is a minute).
    schedule_every: Duration,
    /// zip-and-push execution environments (concurrent invocations).
    zip_envs: usize,
    /// Probability that a zip-and-push invocation is SIGKILLed at a random point.
    kill_probability: f64,
    /// The same for a poller invocation. A killed run holds the poller's run lease for its budget
    /// plus `RELAY_RUN_LEASE_SLACK_S` (5 s here): no tracking meanwhile.
    poller_kill_probability: f64,
    /// Window over which the sequences are dropped.
    drop_window: Duration,
    /// How often some user's Mapillary token is expired.
    expire_every: Duration,
    /// How long everything may take to settle after the last drop.
    settle_timeout: Duration,
    /// Settling stops early when nothing is in flight (both queues empty) and no sequence became
    /// final for this long: what is left is stuck.
    stall_after: Duration,
}

impl Scale {
    fn of(short: bool) -> Self {
        if short {
            Self {
                zip_timeout: Duration::from_secs(10),
                zip_visibility: 14,
                poller_timeout: Duration::from_secs(40),
                clusters_visibility: 10,
                poller_budget_s: 6,
                schedule_every: Duration::from_secs(2),
                zip_envs: 2,
                kill_probability: 0.1,
                // One forced kill of the poller (its first run): each costs the run lease's 60 s.
                poller_kill_probability: 0.0,
                drop_window: Duration::from_secs(4),
                expire_every: Duration::from_secs(8),
                settle_timeout: Duration::from_secs(100),
                stall_after: Duration::from_secs(30),
            }
        } else {
            Self {
                zip_timeout: Duration::from_secs(20),
                zip_visibility: 30,
                poller_timeout: Duration::from_secs(40),
                clusters_visibility: 15,
                poller_budget_s: 8,
                schedule_every: Duration::from_secs(2),
                zip_envs: 3,
                kill_probability: 0.08,
                poller_kill_probability: 0.08,
                drop_window: Duration::from_secs(30),
                expire_every: Duration::from_secs(7),
                settle_timeout: Duration::from_secs(600),
                stall_after: Duration::from_secs(90),
            }
        }
    }
}

/// One file of the catalogue of bad files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bad {
    NotJpeg,
    Truncated,
    Empty,
    NoGps,
    LatOutOfRange,
    LonOutOfRange,
    Year10000,
}

const CATALOGUE: [Bad; 7] = [
    Bad::NotJpeg,
    Bad::Truncated,
    Bad::Empty,
    Bad::NoGps,
    Bad::LatOutOfRange,
    Bad::LonOutOfRange,
    Bad::Year10000,
];

impl Bad {
    fn name(self) -> &'static str {
        match self {
            Bad::NotJpeg => "not-jpeg",
            Bad::Truncated => "truncated",
            Bad::Empty => "empty",
            Bad::NoGps => "no-gps",
            Bad::LatOutOfRange => "lat-out-of-range",
            Bad::LonOutOfRange => "lon-out-of-range",
            Bad::Year10000 => "year-10000",
        }
    }

    /// The file's bytes; `near` is a good image of the same sequence.
    fn bytes(self, near: &ImageSpec) -> Result<Vec<u8>> {
        let mut s = near.clone();
        s.seed = near.seed + 50_000;
        Ok(match self {
            Bad::NotJpeg => b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR soak".to_vec(),
            Bad::Truncated => {
                let good = jpeg(&s);
                good[..good.len() / 2].to_vec()
            }
            Bad::Empty => Vec::new(),
            Bad::NoGps => {
                s.with_gps = false;
                jpeg(&s)
            }
            Bad::LatOutOfRange => {
                s.lat = 91.5;
                jpeg(&s)
            }
            Bad::LonOutOfRange => {
                s.lon = -180.5;
                jpeg(&s)
            }
            Bad::Year10000 => {
                // DateTimeOriginal 9999:12:31 23:59:59 with OffsetTimeOriginal -01:00: year 10000 in
                // UTC (issue 15's file). The fixture writes a known wall time, patched in place.
                s.time_tags = TimeTags::DateTimeOriginal {
                    offset: Some("-01:00".into()),
                };
                s.captured_at = time::OffsetDateTime::from_unix_timestamp(1_714_557_600)?; // 2024-05-01 10:00:00 UTC
                let mut bytes = jpeg(&s);
                let (from, to) = (b"2024:05:01 09:00:00", b"9999:12:31 23:59:59");
                let at = bytes
                    .windows(from.len())
                    .position(|w| w == from)
                    .ok_or_else(|| anyhow!("the fixture's DateTimeOriginal was not found"))?;
                bytes[at..at + to.len()].copy_from_slice(to);
                bytes
            }
        })
    }
}

/// How a sequence's manifest is dropped again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Redrop {
    None,
    /// The same bytes again (same ETag).
    Same,
    /// Changed content (a new manifest version).
    Changed,
}

/// One sequence of the run.
#[derive(Debug, Clone)]
struct Plan {
    /// Starts every file name of the sequence (`S007_…`): an image another user's read shows is recognisable.
    tag: String,
    user: String,
    id: String,
    good: Vec<ImageSpec>,
    bad: Vec<Bad>,
    /// Two walks five minutes apart (two uploads).
    split: bool,
    redrop: Redrop,
    /// The S3 notification is delivered twice.
    dup_notification: bool,
}

impl Plan {
    fn prefix(&self) -> String {
        format!("sequences/{}/{}/", self.user, self.id)
    }
    fn files(&self) -> usize {
        self.good.len() + self.bad.len()
    }
}

/// The users: the dotted pair first (`h`, `h.a`), then `soak-u02`, ….
fn users(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i {
            0 => "h".to_string(),
            1 => "h.a".to_string(),
            i => format!("soak-u{i:02}"),
        })
        .collect()
}

/// The run's sequences (deterministic in `seed`).
fn plans(o: &Options, users: &[String], rng: &mut Rng) -> Vec<Plan> {
    let start = time::OffsetDateTime::now_utc() - time::Duration::hours(3);
    (0..o.sequences)
        .map(|i| {
            // The dotted pair: `h` + `a.b` and `h.a` + `b` would both be `h.a.b` if ids were joined with dots.
            let (user, id) = match i {
                0 => (users[0].clone(), "a.b".to_string()),
                1 => (users[1].clone(), "b".to_string()),
                i => (users[i % users.len()].clone(), format!("s{i:03}")),
            };
            let at = start + time::Duration::minutes(i as i64 * 20);
            let (lat, lon) = (48.0 + (i / 40) as f64 * 0.05, 2.0 + (i % 40) as f64 * 0.01);
            let all_bad = i % 15 == 7;
            let split = !all_bad && i % 12 == 5;
            let mut good = Vec::new();
            if !all_bad {
                let n = if split {
                    3
                } else {
                    3 + rng.range(0, if o.short { 1 } else { 3 }) as usize
                };
                let mut t = TrackSpec::new(lat, lon, at);
                t.seed_base = i as u64 * 1000;
                good = track(n, &t);
                if split {
                    let mut second = TrackSpec::new(
                        lat + 0.002,
                        lon + 0.002,
                        at + time::Duration::seconds(n as i64) + time::Duration::minutes(5),
                    );
                    second.seed_base = i as u64 * 1000 + 500;
                    good.extend(track(n, &second));
                }
            }
            let mut bad = Vec::new();
            if all_bad {
                bad.push(CATALOGUE[i % CATALOGUE.len()]);
                bad.push(CATALOGUE[(i + 3) % CATALOGUE.len()]);
            } else if i % 2 == 0 || o.short {
                bad.push(CATALOGUE[i % CATALOGUE.len()]);
            }
            let redrop = match i % 10 {
                3 => Redrop::Same,
                8 => Redrop::Changed,
                _ => Redrop::None,
            };
            Plan {
                tag: format!("S{i:03}"),
                user,
                id,
                good,
                bad,
                split,
                redrop,
                dup_notification: i % 6 == 1,
            }
        })
        .collect()
}

/// When to kill an invocation: at a uniformly random point of a typical invocation (the mean of
/// the last ones), with probability `p` (or always when `force`); `None` = let it run.
/// A forced kill comes in the first third of a typical invocation, so it lands before the answer.
fn kill_point(rng: &mut Rng, p: f64, force: bool, typical: &Mean) -> Option<Duration> {
    let random = rng.chance(p);
    (random || force).then(|| {
        let ms = typical.ms().max(20);
        let end = if random { ms } else { ms / 3 };
        Duration::from_millis(rng.range(ms / 20, end.max(ms / 20 + 1)))
    })
}

/// One invocation, killed after `kill` if given; a response's duration goes into `typical`. The
/// outcome and how it reads in the trace.
async fn invoke_timed(
    proc: &mut FunctionProcess,
    payload: &Value,
    timeout: Duration,
    kill: Option<Duration>,
    typical: &mut Mean,
) -> Result<(Outcome, String)> {
    let t0 = Instant::now();
    let outcome = proc.invoke(payload, timeout, kill).await?;
    if matches!(outcome, Outcome::Response(_)) {
        typical.add(t0.elapsed());
    }
    let text = match &outcome {
        Outcome::Response(v) => format!("response {v}"),
        Outcome::Killed => format!("KILLED after {} ms", kill.map_or(0, |d| d.as_millis())),
        other => format!("{other:?}"),
    };
    Ok((outcome, text))
}

/// A running mean of invocation durations (exponentially weighted), milliseconds.
#[derive(Debug, Clone)]
struct Mean(f64);

impl Mean {
    fn add(&mut self, d: Duration) {
        self.0 = 0.8 * self.0 + 0.2 * d.as_millis() as f64;
    }
    fn ms(&self) -> u64 {
        self.0 as u64
    }
}

/// Counters of the run.
#[derive(Debug, Default)]
struct Stats {
    zip_invocations: u64,
    zip_kills: u64,
    zip_errors: u64,
    zip_exits: Vec<String>,
    zip_timeouts: u64,
    poller_invocations: u64,
    poller_kills: u64,
    poller_errors: u64,
    poller_exits: Vec<String>,
    poller_timeouts: u64,
    duplicated_notifications: u64,
    redrops: u64,
    token_expiries: u64,
    /// One line per invocation (`.scratch/soak/invocations.log`).
    trace: Vec<String>,
}

type Shared = Arc<Mutex<Stats>>;

fn trace(ctx: &Ctx, line: &str) {
    stats(&ctx.stats).trace.push(line.to_string());
}

/// `key (receive count n)` of a message, for the trace.
fn describe(m: &aws_sdk_sqs::types::Message) -> String {
    let body = m.body().unwrap_or_default();
    let key = body
        .split("\"key\": \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("?")
        .replace("%2F", "/");
    let receives = m
        .attributes()
        .and_then(|a| a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount))
        .map_or("?", String::as_str);
    format!("{key} (receive {receives})")
}

fn stats(s: &Shared) -> std::sync::MutexGuard<'_, Stats> {
    match s.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// `cargo xtask soak`.
pub async fn run(root: &Path, o: Options) -> Result<()> {
    if o.users < 2 {
        bail!("--users must be at least 2 (the dotted pair h and h.a)");
    }
    if o.sequences < o.users {
        bail!("--sequences must be at least --users");
    }
    if stack::read_state(root)?.is_some_and(|s| s.is_running()) {
        bail!("a local stack is already running; stop it with `cargo xtask stack down` (the soak starts its own)");
    }
    let started = Instant::now();
    let work = async {
        let mut opts = stack::UpOptions::new(defaults::APP_ID, defaults::CLIENT_SECRET);
        opts.sim_args = demo::realtime_args(STAGE_SECONDS);
        opts.sim_args.extend(["--seed".into(), o.seed.to_string()]);
        opts.print_exports = false;
        println!(
            "{} soak: {} sequences, {} users, seed {}{}",
            stamp(started),
            o.sequences,
            o.users,
            o.seed,
            if o.short { " (short)" } else { "" }
        );
        let state = stack::up(root, &opts).await?;
        soak(root, &state, &o, started).await
    };
    let result = tokio::select! {
        r = work => r,
        sig = demo::shutdown_signal() => Err(anyhow!("interrupted ({sig}); stopping everything")),
    };
    if let Err(e) = stack::down(root) {
        eprintln!("soak: stopping the stack failed: {e:#}");
    }
    println!(
        "soak: everything stopped; total {:.0} s",
        started.elapsed().as_secs_f64()
    );
    result
}

/// What the run's tasks share.
struct Ctx {
    http: reqwest::Client,
    api: String,
    sim: String,
    s3: aws_sdk_s3::Client,
    sqs: aws_sdk_sqs::Client,
    bucket: String,
    ingest_url: String,
    clusters_url: String,
    stats: Shared,
    started: Instant,
    scale: Scale,
}

async fn soak(root: &Path, state: &StackState, o: &Options, started: Instant) -> Result<()> {
    let scale = Scale::of(o.short);
    let venvs = venv::ensure(root)?;
    let work = root.join(".scratch").join("soak");
    let _ = std::fs::remove_dir_all(&work);
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;

    // status-api under watch, as in the demo.
    let port = free_port()?;
    let api = LambdaWatch::function_url_on(port, "status-api");
    let env = demo::watch_env(state, &api);
    println!(
        "{} soak: building the functions and starting status-api under `cargo lambda watch`",
        stamp(started)
    );
    let lambda = LambdaWatch::start_on(root, &venvs, &env, &work.join("watch"), port)?;

    let env_map: BTreeMap<String, String> = env.iter().cloned().collect();
    let var = |k: &str| crate::stack::exported(&env_map, k);
    let sdk = sdk_config(&state.moto.url).await;
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let ctx = Arc::new(Ctx {
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .build()?,
        api: api.clone(),
        sim: state.sim.url.trim_end_matches('/').to_string(),
        s3: s3_client(&sdk),
        sqs: sqs.clone(),
        bucket: var("RELAY_BUCKET")?,
        ingest_url: var("RELAY_INGEST_QUEUE_URL")?,
        clusters_url: var("RELAY_CLUSTERS_QUEUE_URL")?,
        stats: Shared::default(),
        started,
        scale: scale.clone(),
    });
    let stack_name = var("RELAY_STACK_NAME")?;

    // Time scaled down: the queues' visibility timeouts follow the functions' shorter deadlines.
    for (url, secs) in [
        (&ctx.ingest_url, scale.zip_visibility),
        (&ctx.clusters_url, scale.clusters_visibility),
    ] {
        sqs.set_queue_attributes()
            .queue_url(url)
            .attributes(QueueAttributeName::VisibilityTimeout, secs.to_string())
            .send()
            .await
            .with_context(|| format!("SetQueueAttributes {url}"))?;
    }

    // zip-and-push and the poller as plain binaries behind Runtime APIs, with the template's environment.
    let template =
        integration_tests::stack::translate_template(&venvs, &integration_tests::stack::template_path())?;
    let functions = package::functions(&template)?;
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("xtask's executable has no directory"))?;
    let stack_env: Vec<(String, String)> = state
        .exports
        .iter()
        .filter(|(k, _)| k != integration_tests::moto::MOTO_URL_ENV)
        .cloned()
        .collect();
    let mut zips = Vec::new();
    for k in 0..scale.zip_envs {
        let mut env = function_env(&functions, "zip-and-push", &stack_env, &work)?;
        set(&mut env, "RELAY_DEADLINE_MARGIN_S", "3");
        // finish_upload starts only when its timeout plus the cluster_id save fit before the deadline
        // (60 s + 10 s by default: never, in a 10–20 s invocation); a held sequence's message comes
        // back after 30 s by default. Scaled like the deadline.
        set(&mut env, "RELAY_FINISH_TIMEOUT_S", "3");
        set(&mut env, "RELAY_CLUSTER_SAVE_BUDGET_S", "2");
        set(&mut env, "RELAY_HELD_RETRY_DELAY_SECONDS", "2");
        zips.push(
            start_function(
                &bin_dir,
                &stack_name,
                &functions,
                "zip-and-push",
                env,
                &logs.join(format!("zip-and-push-{k}.log")),
            )
            .await?,
        );
    }
    let mut env = function_env(&functions, "poller", &stack_env, &work)?;
    set(
        &mut env,
        "RELAY_POLL_BUDGET_S",
        &scale.poller_budget_s.to_string(),
    );
    // FINISH_UNCERTAIN uploads are looked for every 900 s by default; scaled like everything else.
    set(&mut env, "RELAY_RECONCILE_SCAN_EVERY_S", "5");
    // A finish_upload that created nothing (a 500 before the handler, a kill before the call) is
    // finished again once the feed shows no cluster for it this long after the call (900 s by
    // default; the simulator's feed node appears within a second here); the window and the second
    // call's timeout are scaled with it, and so is the run lease's slack (a killed run holds the
    // lease for its budget plus this).
    set(&mut env, "RELAY_REFINISH_AFTER_S", "10");
    set(&mut env, "RELAY_RECONCILE_WINDOW_S", "120");
    set(&mut env, "RELAY_FINISH_TIMEOUT_S", "3");
    set(&mut env, "RELAY_RUN_LEASE_SLACK_S", "5");
    let poller = start_function(
        &bin_dir,
        &stack_name,
        &functions,
        "poller",
        env,
        &logs.join("poller.log"),
    )
    .await?;

    // Users, each their own simulator user, connected over OAuth.
    let mut rng = Rng(o.seed);
    let users = users(o.users);
    let mut sim_users = BTreeMap::new();
    for (i, u) in users.iter().enumerate() {
        let created = ctx
            .http
            .post(format!("{}/_sim/users", ctx.sim))
            .json(&json!({ "username": format!("soak-sim-{i:02}") }))
            .send()
            .await
            .context("POST /_sim/users")?;
        let created = json_of(created, "POST /_sim/users").await?;
        let id = created["id"]
            .as_str()
            .map(str::to_string)
            .or_else(|| created["id"].as_u64().map(|n| n.to_string()))
            .ok_or_else(|| anyhow!("POST /_sim/users answered no id: {created}"))?;
        demo::connect(&ctx.http, &api, u, Some(&id), started).await?;
        sim_users.insert(u.clone(), id);
    }

    let plans = plans(o, &users, &mut rng);
    faults(&ctx, o).await?;

    // The run: drops, the event source, the schedule, token expiries, until settled.
    let (stop_tx, stop_rx) = watch::channel(false);
    let dup_keys: Arc<Mutex<BTreeSet<String>>> = Arc::new(Mutex::new(
        plans
            .iter()
            .filter(|p| p.dup_notification)
            // As S3 notifications carry the key (form-encoded: `/` as `%2F`).
            .map(|p| format!("{}manifest.json", p.prefix()).replace('/', "%2F"))
            .collect(),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    for (k, z) in zips.into_iter().enumerate() {
        let mut esm = SqsEventSource::new(sqs.clone(), &ctx.ingest_url, "zip-and-push");
        // Failed items come back after the queue's visibility timeout, as from SQS (Lambda does not
        // shorten it).
        esm.batch_size = 2;
        esm.retry_after_seconds = scale.zip_visibility;
        tasks.spawn(ingest(
            ctx.clone(),
            esm,
            z,
            dup_keys.clone(),
            Rng(o.seed.wrapping_add(100 + k as u64)),
            k,
            stop_rx.clone(),
        ));
    }
    tasks.spawn(schedule(
        ctx.clone(),
        poller,
        format!("{stack_name}-PollerSchedule"),
        Rng(o.seed.wrapping_add(7)),
        stop_rx.clone(),
    ));
    tasks.spawn(expire_tokens(
        ctx.clone(),
        sim_users.values().cloned().collect(),
        Rng(o.seed.wrapping_add(9)),
        stop_rx.clone(),
    ));

    let dropped = drop_all(&ctx, &work, &plans, &mut rng).await;
    let settled = match dropped {
        Ok(()) => settle(&ctx, &plans, &users).await,
        Err(e) => Err(e),
    };
    let _ = stop_tx.send(true);
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => println!("{} soak: a task failed: {e:#}", stamp(started)),
            Err(e) => println!("{} soak: a task panicked: {e}", stamp(started)),
        }
    }
    let wall = started.elapsed();
    let _ = std::fs::write(work.join("invocations.log"), stats(&ctx.stats).trace.join("\n"));
    let settled = settled?;

    let report = check(&ctx, &plans, &users, &logs, lambda.log()).await?;
    drop(lambda);
    report.print(o, &ctx, wall, settled);
    if report.failures.is_empty() {
        Ok(())
    } else {
        bail!(
            "soak: {} invariant(s) broken: {}",
            report.failures.len(),
            report.failures.join("; ")
        )
    }
}

/// `env` with `key` set to `value` (replaced if present).
fn set(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    env.retain(|(k, _)| k != key);
    env.push((key.to_string(), value.to_string()));
}

fn function_env(
    functions: &[package::Function],
    binary: &str,
    stack_env: &[(String, String)],
    work: &Path,
) -> Result<Vec<(String, String)>> {
    let f = functions
        .iter()
        .find(|f| f.binary == binary)
        .ok_or_else(|| anyhow!("the template has no function {binary}"))?;
    let root = work.join(binary);
    std::fs::create_dir_all(&root)?;
    package::function_env(f, stack_env, &root)
}

async fn start_function(
    bin_dir: &Path,
    stack_name: &str,
    functions: &[package::Function],
    binary: &str,
    env: Vec<(String, String)>,
    log: &Path,
) -> Result<FunctionProcess> {
    let logical = functions
        .iter()
        .find(|f| f.binary == binary)
        .map(|f| f.logical_id.clone())
        .unwrap_or_else(|| binary.to_string());
    let arn = format!("arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{stack_name}-{logical}");
    let path: PathBuf = bin_dir.join(binary);
    if !path.is_file() {
        bail!("{} is not built (cargo build --bin {binary})", path.display());
    }
    FunctionProcess::start(&path, &arn, env, log).await
}

/// The simulator's fault rules: 5xx and 429 on rupload and `finish_upload`, dropped connections,
/// lost `finish_upload` replies. `--short` fires each on every k-th match (so each fires in a small
/// run); a full run fires them with a probability, seeded.
async fn faults(ctx: &Ctx, o: &Options) -> Result<()> {
    let rules = [
        (
            "POST",
            "/rupload/*",
            json!({"kind": "server_error", "status": 503}),
            9,
            0.05,
        ),
        (
            "POST",
            "/rupload/*",
            json!({"kind": "rate_limited", "backoff": 500}),
            11,
            0.04,
        ),
        (
            "POST",
            "/rupload/*",
            json!({"kind": "drop_after_bytes", "bytes": 512}),
            13,
            0.03,
        ),
        ("GET", "/rupload/*", json!({"kind": "drop_connection"}), 7, 0.03),
        (
            "POST",
            "/graph/finish_upload",
            json!({"kind": "server_error", "status": 500}),
            6,
            0.05,
        ),
        (
            "POST",
            "/graph/finish_upload",
            json!({"kind": "bare429", "retry_after": "1"}),
            8,
            0.04,
        ),
        (
            "POST",
            "/graph/finish_upload",
            json!({"kind": "lost_reply"}),
            4,
            0.08,
        ),
    ];
    for (i, (method, path, action, every, p)) in rules.into_iter().enumerate() {
        let mut rule = json!({ "method": method, "path": path, "action": action });
        if action["kind"] == "lost_reply" {
            rule["phase"] = json!("after");
        }
        if o.short {
            rule["every"] = json!(every);
        } else {
            rule["probability"] = json!(p);
            rule["seed"] = json!(o.seed.wrapping_add(i as u64));
        }
        let r = ctx
            .http
            .post(format!("{}/_sim/faults", ctx.sim))
            .json(&rule)
            .send()
            .await
            .context("POST /_sim/faults")?;
        json_of(r, "POST /_sim/faults").await?;
    }
    Ok(())
}

/// Drops every sequence over the drop window (images, then `manifest.json`), and the re-drops a
/// few seconds after their first drop.
async fn drop_all(ctx: &Ctx, work: &Path, plans: &[Plan], rng: &mut Rng) -> Result<()> {
    let window = ctx.scale.drop_window.as_millis() as u64;
    let mut events: Vec<(u64, usize, bool)> = Vec::new();
    for (i, p) in plans.iter().enumerate() {
        let at = window * i as u64 / plans.len().max(1) as u64;
        events.push((at, i, false));
        if p.redrop != Redrop::None {
            events.push((at + rng.range(2_000, 10_000), i, true));
        }
    }
    events.sort();
    let t0 = Instant::now();
    for (at, i, again) in events {
        let due = t0 + Duration::from_millis(at);
        tokio::time::sleep_until(due.into()).await;
        let p = &plans[i];
        let key = format!("{}manifest.json", p.prefix());
        if again {
            let body: &'static [u8] = match p.redrop {
                Redrop::Changed => b"{\"soak\": \"changed\"}",
                _ => b"{}",
            };
            put(ctx, &key, body).await?;
            stats(&ctx.stats).redrops += 1;
            continue;
        }
        let dir = work.join("images").join(&p.user).join(&p.id);
        std::fs::create_dir_all(&dir)?;
        for (k, spec) in p.good.iter().enumerate() {
            let bytes = relay_fixtures::try_jpeg(spec).map_err(|e| anyhow!("building an image: {e}"))?;
            std::fs::write(dir.join(format!("{}_{k:04}.jpg", p.tag)), bytes)?;
        }
        if let Some(near) = p.good.first().cloned().or_else(|| {
            let t = TrackSpec::new(
                48.0,
                2.0,
                time::OffsetDateTime::now_utc() - time::Duration::hours(1),
            );
            track(1, &t).pop()
        }) {
            for (k, b) in p.bad.iter().enumerate() {
                std::fs::write(
                    dir.join(format!("{}_BAD_{k}_{}.jpg", p.tag, b.name())),
                    b.bytes(&near)?,
                )?;
            }
        }
        let files = push::jpegs_under(&dir)?;
        if files.len() != p.files() {
            bail!(
                "{}: wrote {} files, planned {}",
                p.prefix(),
                files.len(),
                p.files()
            );
        }
        push::put_files(&ctx.s3, &ctx.bucket, &p.prefix(), &files).await?;
        put(ctx, &key, b"{}").await?;
    }
    println!(
        "{} soak: {} sequences dropped ({} images), {} re-dropped",
        stamp(ctx.started),
        plans.len(),
        plans.iter().map(Plan::files).sum::<usize>(),
        stats(&ctx.stats).redrops
    );
    Ok(())
}

async fn put(ctx: &Ctx, key: &str, body: &'static [u8]) -> Result<()> {
    ctx.s3
        .put_object()
        .bucket(&ctx.bucket)
        .key(key)
        .body(ByteStream::from_static(body))
        .send()
        .await
        .with_context(|| format!("PutObject {key}"))?;
    Ok(())
}

/// One zip-and-push execution environment fed by the event source: each batch is delivered to the
/// process, which may be SIGKILLed at a random point; a killed or crashed invocation settles nothing
/// (its messages come back after the visibility timeout). The first batch carrying a notification of
/// a `dup_keys` sequence sends that body to the queue once more (a duplicated notification).
async fn ingest(
    ctx: Arc<Ctx>,
    esm: SqsEventSource,
    mut proc: FunctionProcess,
    dup_keys: Arc<Mutex<BTreeSet<String>>>,
    mut rng: Rng,
    k: usize,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let force_kill = k == 0;
    let mut n = 0u64;
    let mut typical = Mean(1_000.0);
    let mut killed_once = false;
    // `stop` is checked between receives, never by dropping one in flight (moto completes an abandoned
    // long poll anyway and hides what it took: see demo::run_ingest).
    while !*stop.borrow() {
        let msgs = esm.receive().await?;
        if msgs.is_empty() {
            continue;
        }
        for m in &msgs {
            let Some(body) = m.body() else { continue };
            let hit = {
                let mut keys = match dup_keys.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                let hit = keys.iter().find(|k| body.contains(k.as_str())).cloned();
                if let Some(k) = &hit {
                    keys.remove(k);
                }
                hit
            };
            if hit.is_some() {
                ctx.sqs
                    .send_message()
                    .queue_url(&ctx.ingest_url)
                    .message_body(body)
                    .send()
                    .await
                    .context("SendMessage (duplicated notification)")?;
                stats(&ctx.stats).duplicated_notifications += 1;
            }
        }
        n += 1;
        let kill = kill_point(
            &mut rng,
            ctx.scale.kill_probability,
            // The first environment kills one invocation for sure (from its second on, until one lands).
            force_kill && n >= 2 && !killed_once,
            &typical,
        );
        let (outcome, text) = invoke_timed(
            &mut proc,
            &esm.event(&msgs),
            ctx.scale.zip_timeout,
            kill,
            &mut typical,
        )
        .await?;
        killed_once |= outcome == Outcome::Killed;
        trace(
            &ctx,
            &format!(
                "{:.1}s zip-and-push[{k}] #{n}: {} → {text}",
                ctx.started.elapsed().as_secs_f64(),
                msgs.iter().map(describe).collect::<Vec<_>>().join(", "),
            ),
        );
        let answer = {
            let mut s = stats(&ctx.stats);
            s.zip_invocations += 1;
            match outcome {
                Outcome::Response(v) => Some(Ok(v)),
                Outcome::Error(e) => {
                    s.zip_errors += 1;
                    Some(Err(e))
                }
                Outcome::Killed => {
                    s.zip_kills += 1;
                    None
                }
                Outcome::TimedOut => {
                    s.zip_timeouts += 1;
                    None
                }
                Outcome::Exited(why) => {
                    s.zip_exits.push(why);
                    None
                }
            }
        };
        if let Some(answer) = answer {
            esm.settle(&msgs, answer).await?;
        }
    }
    Ok(())
}

/// The poller's schedule: one invocation every [`Scale::schedule_every`], any of them possibly killed.
async fn schedule(
    ctx: Arc<Ctx>,
    mut proc: FunctionProcess,
    rule: String,
    mut rng: Rng,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut n = 0u64;
    let mut typical = Mean(200.0);
    let mut killed_once = false;
    while !*stop.borrow() {
        n += 1;
        // One run is killed for sure (from the first on, until one lands).
        let kill = kill_point(
            &mut rng,
            ctx.scale.poller_kill_probability,
            !killed_once,
            &typical,
        );
        let event = scheduled_event(&rule);
        let (outcome, text) =
            invoke_timed(&mut proc, &event, ctx.scale.poller_timeout, kill, &mut typical).await?;
        killed_once |= outcome == Outcome::Killed;
        trace(
            &ctx,
            &format!("{:.1}s poller #{n}: {text}", ctx.started.elapsed().as_secs_f64()),
        );
        {
            let mut s = stats(&ctx.stats);
            s.poller_invocations += 1;
            match outcome {
                Outcome::Response(v) => {
                    if v["errors"].as_u64().unwrap_or(0) > 0 {
                        s.poller_errors += 1;
                    }
                }
                Outcome::Error(_) => s.poller_errors += 1,
                Outcome::Killed => s.poller_kills += 1,
                Outcome::TimedOut => s.poller_timeouts += 1,
                Outcome::Exited(why) => s.poller_exits.push(why),
            }
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(ctx.scale.schedule_every) => {}
        }
    }
    Ok(())
}

/// Expires the Mapillary tokens of one user after another (from a random one) every
/// [`Scale::expire_every`] (`POST /_sim/tokens/expire`): each user's token expires now and then, as
/// tokens do, not again right after the relay refreshed it.
async fn expire_tokens(
    ctx: Arc<Ctx>,
    sim_users: Vec<String>,
    mut rng: Rng,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut next = rng.range(0, sim_users.len() as u64) as usize;
    while !*stop.borrow() {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(ctx.scale.expire_every) => {}
        }
        let Some(user) = sim_users.get(next % sim_users.len().max(1)) else {
            continue;
        };
        next += 1;
        let r = ctx
            .http
            .post(format!("{}/_sim/tokens/expire", ctx.sim))
            .json(&json!({ "user": user }))
            .send()
            .await
            .context("POST /_sim/tokens/expire")?;
        json_of(r, "POST /_sim/tokens/expire").await?;
        stats(&ctx.stats).token_expiries += 1;
    }
    Ok(())
}

/// The simulator's fault rules with their counters (`GET /_sim/faults`).
async fn fault_rules(ctx: &Ctx) -> Result<Vec<Value>> {
    let faults = ctx
        .http
        .get(format!("{}/_sim/faults", ctx.sim))
        .send()
        .await
        .context("GET /_sim/faults")?;
    let faults = json_of(faults, "GET /_sim/faults").await?;
    Ok(faults.as_array().cloned().unwrap_or_default())
}

/// A count that grows with every `finish_upload` call the simulator sees (the matches of its
/// `finish_upload` fault rules: each call is matched against them in turn).
async fn finish_upload_calls(ctx: &Ctx) -> Result<u64> {
    Ok(fault_rules(ctx)
        .await?
        .iter()
        .filter(|f| f["path"].as_str().is_some_and(|p| p.contains("finish_upload")))
        .filter_map(|f| f["matches"].as_u64())
        .sum())
}

/// Messages in `url` (visible, in flight and delayed).
async fn queue_depth(ctx: &Ctx, url: &str) -> Result<u64> {
    let a = ctx
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .with_context(|| format!("GetQueueAttributes {url}"))?;
    let attrs = a.attributes().cloned().unwrap_or_default();
    Ok([
        QueueAttributeName::ApproximateNumberOfMessages,
        QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        QueueAttributeName::ApproximateNumberOfMessagesDelayed,
    ]
    .iter()
    .filter_map(|k| attrs.get(k).and_then(|v| v.parse::<u64>().ok()))
    .sum())
}

/// Whether the sequence's status says it is final: FAILED, or UPLOADED with every upload final at
/// Mapillary (or failed).
fn is_final(doc: &Value) -> bool {
    let uploads = doc["uploads"].as_array().cloned().unwrap_or_default();
    doc["state"] == "FAILED"
        || (doc["state"] == "UPLOADED"
            && uploads.iter().all(|u| {
                u["state"] == "FAILED"
                    || matches!(u["mapillary"]["state"].as_str(), Some("FINISHED" | "FAILED"))
            }))
}

/// Waits until nothing is in flight (every sequence final, both queues empty) or the settle timeout;
/// whether it settled.
async fn settle(ctx: &Ctx, plans: &[Plan], _users: &[String]) -> Result<bool> {
    let deadline = Instant::now() + ctx.scale.settle_timeout;
    let mut last_line = String::new();
    let mut last_open = usize::MAX;
    let mut last_finishes = 0u64;
    let mut since = Instant::now();
    loop {
        let mut open = 0usize;
        for p in plans {
            let url = format!("{}/v1/sequences/{}", ctx.api, p.id);
            match api_get_as(&ctx.http, &url, &p.user).await {
                Ok(doc) if is_final(&doc) => {}
                _ => open += 1,
            }
        }
        let ingest = queue_depth(ctx, &ctx.ingest_url).await?;
        let clusters = queue_depth(ctx, &ctx.clusters_url).await?;
        let line = {
            let s = stats(&ctx.stats);
            format!(
                "{open} sequence(s) not final, queues: ingest {ingest}, clusters {clusters}; zip-and-push {} invocations ({} killed), poller {} ({} killed), {} token expiries",
                s.zip_invocations, s.zip_kills, s.poller_invocations, s.poller_kills, s.token_expiries
            )
        };
        if line != last_line {
            println!("{} soak: {line}", stamp(ctx.started));
            last_line = line;
        }
        if open == 0 && ingest == 0 && clusters == 0 {
            return Ok(true);
        }
        // A `finish_upload` call is progress too: the poller finishing a FINISH_UNCERTAIN upload again
        // (one call per proof, each `RELAY_REFINISH_AFTER_S` after the last) can take several rounds
        // when the fault rules hit it again, with no sequence becoming final meanwhile.
        let finishes = finish_upload_calls(ctx).await?;
        if open != last_open || ingest + clusters > 0 || finishes != last_finishes {
            last_open = open;
            last_finishes = finishes;
            since = Instant::now();
        } else if since.elapsed() > ctx.scale.stall_after {
            println!(
                "{} soak: stalled — {open} sequence(s) not final, nothing in flight and no progress for {:?}; checking the invariants",
                stamp(ctx.started),
                ctx.scale.stall_after
            );
            return Ok(false);
        }
        if Instant::now() > deadline {
            println!(
                "{} soak: not settled within {:?}; checking the invariants as things stand",
                stamp(ctx.started),
                ctx.scale.settle_timeout
            );
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// What the checks found.
#[derive(Debug, Default)]
struct Report {
    sequences: usize,
    uploads: usize,
    clusters: usize,
    images_dropped: usize,
    images_accepted: u64,
    images_linked: usize,
    images_rejected: u64,
    lost: Vec<String>,
    duplicate_clusters: Vec<String>,
    unknown_clusters: Vec<String>,
    not_final: Vec<String>,
    failed_uploads: Vec<String>,
    cross_tenant: Vec<String>,
    panics: Vec<String>,
    dlq: Vec<String>,
    mismatches: Vec<String>,
    faults: Vec<(String, u64, u64)>,
    failures: Vec<String>,
}

/// Every page of a status-API list (`field`, following `next_cursor`).
async fn all_pages(ctx: &Ctx, url: &str, user: &str, field: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let sep = if url.contains('?') { '&' } else { '?' };
        let page_url = match &cursor {
            Some(c) => format!("{url}{sep}cursor={c}"),
            None => url.to_string(),
        };
        let page = api_get_as(&ctx.http, &page_url, user).await?;
        out.extend(page[field].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return Ok(out),
        }
    }
    bail!("{url}: more than 1000 pages")
}

/// GET `url` as `user`: the status code and the body.
async fn get_raw(ctx: &Ctx, url: &str, user: &str) -> Result<(u16, String)> {
    let r = ctx
        .http
        .get(url)
        .header(demo::DEV_AUTH_HEADER, user)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = r.status().as_u16();
    Ok((status, r.text().await.unwrap_or_default()))
}

async fn check(ctx: &Ctx, plans: &[Plan], users: &[String], logs: &Path, watch_log: &Path) -> Result<Report> {
    let mut r = Report {
        sequences: plans.len(),
        images_dropped: plans.iter().map(Plan::files).sum(),
        ..Report::default()
    };
    let mut relay_clusters: BTreeSet<String> = BTreeSet::new();
    let mut relay_sequences: BTreeSet<String> = BTreeSet::new();

    // Each sequence, as its owner.
    for p in plans {
        let name = format!("{}/{}", p.user, p.id);
        let url = format!("{}/v1/sequences/{}", ctx.api, p.id);
        let (status, body) = get_raw(ctx, &url, &p.user).await?;
        if status == 404 {
            r.lost.push(format!("{name}: no sequence record (404)"));
            continue;
        }
        let doc: Value =
            serde_json::from_str(&body).with_context(|| format!("GET {url}: {status} {body}"))?;
        let (good, bad) = (p.good.len() as u64, p.bad.len() as u64);
        let accepted = doc["accepted_count"].as_u64().unwrap_or(0);
        let rejected = doc["rejected_count"].as_u64().unwrap_or(0);
        r.images_accepted += accepted;
        r.images_rejected += rejected;
        if doc["image_count"].as_u64() != Some(good + bad) || rejected != bad {
            r.mismatches.push(format!(
                "{name}: image_count {} accepted {accepted} rejected {rejected}, dropped {} good + {bad} bad",
                doc["image_count"], good
            ));
        }
        if accepted < good {
            r.lost.push(format!(
                "{name}: {} of {good} good images not accepted",
                good - accepted
            ));
        }
        let theirs = |key: &str| {
            key.rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with(&format!("{}_", p.tag)))
        };
        for rej in doc["rejected"].as_array().into_iter().flatten() {
            let key = rej["key"].as_str().unwrap_or("");
            if !theirs(key) {
                r.cross_tenant.push(format!("{name}: rejected list shows {key}"));
            }
            if rej["reason"].as_str().is_none_or(str::is_empty) {
                r.mismatches
                    .push(format!("{name}: {key} rejected without a reason"));
            }
        }
        if good == 0 {
            if doc["state"] != "FAILED" || doc["reason"].as_str().is_none_or(str::is_empty) {
                r.mismatches.push(format!(
                    "{name}: only bad files, but state {} reason {}",
                    doc["state"], doc["reason"]
                ));
            }
        } else if !is_final(&doc) {
            r.not_final.push(format!("{name}: sequence {}", doc["state"]));
        }
        let uploads = doc["uploads"].as_array().cloned().unwrap_or_default();
        if p.split && uploads.len() < 2 {
            r.mismatches
                .push(format!("{name}: two walks but {} upload(s)", uploads.len()));
        }
        for u in &uploads {
            r.uploads += 1;
            let uid = u["upload_id"].as_str().unwrap_or("?");
            if let Some(c) = u["cluster_id"].as_str() {
                relay_clusters.insert(c.to_string());
            }
            // An upload whose finish_upload reply was lost knows its cluster by the Mapillary
            // sequences it was linked to (the status shows no cluster_id for it).
            for m in u["mapillary"]["sequences"].as_array().into_iter().flatten() {
                if let Some(id) = m["id"].as_str() {
                    relay_sequences.insert(id.to_string());
                }
            }
            let m = u["mapillary"]["state"].as_str();
            let final_ = u["state"] == "FAILED" || matches!(m, Some("FINISHED" | "FAILED"));
            if !final_ {
                r.not_final.push(format!(
                    "{name} upload {uid}: {} / Mapillary {}",
                    u["state"],
                    m.unwrap_or("-")
                ));
            }
            if u["state"] == "FAILED" || m == Some("FAILED") {
                r.failed_uploads.push(format!(
                    "{name} upload {uid}: {} / Mapillary {}: {}",
                    u["state"],
                    m.unwrap_or("-"),
                    u["error"]
                        .as_str()
                        .or(u["mapillary"]["reason"].as_str())
                        .unwrap_or("-")
                ));
            }
        }
        let images = all_pages(ctx, &format!("{url}/images?limit=1000"), &p.user, "images").await?;
        let linked = images.iter().filter(|i| i["status"] == "LINKED").count();
        r.images_linked += linked;
        if (linked as u64) < accepted {
            r.lost.push(format!(
                "{name}: {} of {accepted} accepted images not linked",
                accepted - linked as u64
            ));
        }
        for i in &images {
            let key = i["key"].as_str().unwrap_or("");
            if !theirs(key) {
                r.cross_tenant.push(format!("{name}: image list shows {key}"));
            }
        }
    }

    // Each user's list holds exactly their sequences; another user's sequence id reads 404.
    for (k, u) in users.iter().enumerate() {
        let own: BTreeSet<&str> = plans
            .iter()
            .filter(|p| &p.user == u)
            .map(|p| p.id.as_str())
            .collect();
        let listed = all_pages(
            ctx,
            &format!("{}/v1/sequences?limit=100", ctx.api),
            u,
            "sequences",
        )
        .await?;
        let listed: BTreeSet<String> = listed
            .iter()
            .filter_map(|s| s["sequence_id"].as_str().map(str::to_string))
            .collect();
        for id in &listed {
            if !own.contains(id.as_str()) {
                r.cross_tenant
                    .push(format!("{u}: GET /v1/sequences lists {id}, not theirs"));
            }
        }
        for id in &own {
            if !listed.contains(*id) {
                r.lost.push(format!("{u}/{id}: missing from GET /v1/sequences"));
            }
        }
        let other = &users[(k + 1) % users.len()];
        for p in plans
            .iter()
            .filter(|p| &p.user == other && !own.contains(p.id.as_str()))
        {
            for path in [
                format!("/v1/sequences/{}", p.id),
                format!("/v1/sequences/{}/images", p.id),
            ] {
                let (status, body) = get_raw(ctx, &format!("{}{path}", ctx.api), u).await?;
                if status != 404 {
                    r.cross_tenant.push(format!(
                        "{u}: GET {path} (of {other}) answered {status}: {}",
                        clip(&body)
                    ));
                }
            }
        }
    }

    // The simulator's clusters: one per upload key and owner, each known to the relay.
    let clusters = ctx
        .http
        .get(format!("{}/_sim/clusters", ctx.sim))
        .send()
        .await
        .context("GET /_sim/clusters")?;
    let clusters = json_of(clusters, "GET /_sim/clusters").await?;
    let mut by_content: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for c in clusters.as_array().into_iter().flatten() {
        r.clusters += 1;
        let id = value_str(&c["id"]);
        by_content
            .entry((value_str(&c["owner_id"]), value_str(&c["upload_key"])))
            .or_default()
            .push(id.clone());
        let linked = c["sequence_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| relay_sequences.contains(&value_str(s)));
        if !relay_clusters.contains(&id) && !linked {
            r.unknown_clusters.push(format!(
                "cluster {id} (owner {}, key {})",
                value_str(&c["owner_id"]),
                value_str(&c["upload_key"])
            ));
        }
    }
    for ((owner, key), ids) in &by_content {
        if ids.len() > 1 {
            r.duplicate_clusters
                .push(format!("owner {owner} key {key}: clusters {}", ids.join(", ")));
        }
    }

    // Panics in any function's output.
    let mut files: Vec<PathBuf> = std::fs::read_dir(logs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.push(watch_log.to_path_buf());
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("panicked")) {
            r.panics.push(format!("{}: {}", f.display(), clip(line)));
        }
    }

    // Dead-letter queues (what ended there is lost work, named by its body).
    for (name, url) in [("ingest", &ctx.ingest_url), ("clusters", &ctx.clusters_url)] {
        if let Some(dlq) = dlq_of(ctx, url).await? {
            let msgs = ctx
                .sqs
                .receive_message()
                .queue_url(&dlq)
                .max_number_of_messages(10)
                .visibility_timeout(0)
                .send()
                .await
                .context("ReceiveMessage (DLQ)")?;
            let depth = queue_depth(ctx, &dlq).await?;
            if depth > 0 {
                let bodies: Vec<String> = msgs
                    .messages()
                    .iter()
                    .filter_map(|m| m.body().map(clip))
                    .collect();
                r.dlq.push(format!(
                    "{name} DLQ: {depth} message(s), e.g. {}",
                    bodies.join(" | ")
                ));
            }
        }
    }

    for f in &fault_rules(ctx).await? {
        r.faults.push((
            format!(
                "{} {} {}",
                f["method"].as_str().unwrap_or("*"),
                f["path"].as_str().unwrap_or("?"),
                f["action"]["kind"].as_str().unwrap_or("?")
            ),
            f["matches"].as_u64().unwrap_or(0),
            f["hits"].as_u64().unwrap_or(0),
        ));
    }

    for (what, list) in [
        ("lost", &r.lost),
        ("duplicate clusters", &r.duplicate_clusters),
        ("clusters unknown to the relay", &r.unknown_clusters),
        ("uploads not final", &r.not_final),
        ("uploads failed", &r.failed_uploads),
        ("cross-tenant reads", &r.cross_tenant),
        ("panics", &r.panics),
        ("messages in a DLQ", &r.dlq),
        ("accounting mismatches", &r.mismatches),
    ] {
        if !list.is_empty() {
            r.failures
                .push(format!("{what} {}: {}", list.len(), list.join("; ")));
        }
    }
    Ok(r)
}

/// The DLQ of the queue at `url` (its redrive policy's target), as a URL.
async fn dlq_of(ctx: &Ctx, url: &str) -> Result<Option<String>> {
    let a = ctx
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .context("GetQueueAttributes RedrivePolicy")?;
    let Some(policy) = a
        .attributes()
        .and_then(|m| m.get(&QueueAttributeName::RedrivePolicy))
        .cloned()
    else {
        return Ok(None);
    };
    let policy: Value = serde_json::from_str(&policy).unwrap_or(Value::Null);
    let Some(name) = policy["deadLetterTargetArn"]
        .as_str()
        .and_then(|a| a.rsplit(':').next())
    else {
        return Ok(None);
    };
    let q = ctx
        .sqs
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .context("GetQueueUrl (DLQ)")?;
    Ok(q.queue_url().map(str::to_string))
}

fn value_str(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
}

fn clip(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

impl Report {
    fn print(&self, o: &Options, ctx: &Ctx, wall: Duration, settled: bool) {
        let s = stats(&ctx.stats);
        println!(
            "\nsoak: seed {}, {} sequences, {} users{}; wall time {:.0} s; {}",
            o.seed,
            o.sequences,
            o.users,
            if o.short { " (--short)" } else { "" },
            wall.as_secs_f64(),
            if settled {
                "settled (every sequence final, queues empty)"
            } else {
                "NOT settled in time"
            }
        );
        println!("\n| what | count |\n|---|---:|");
        let rows: [(&str, String); 12] = [
            ("sequences", self.sequences.to_string()),
            ("uploads", self.uploads.to_string()),
            ("clusters (simulator)", self.clusters.to_string()),
            (
                "images dropped / accepted / linked / rejected",
                format!(
                    "{} / {} / {} / {}",
                    self.images_dropped, self.images_accepted, self.images_linked, self.images_rejected
                ),
            ),
            (
                "zip-and-push invocations / killed / timed out / errors",
                format!(
                    "{} / {} / {} / {}",
                    s.zip_invocations, s.zip_kills, s.zip_timeouts, s.zip_errors
                ),
            ),
            (
                "poller invocations / killed / timed out / with errors",
                format!(
                    "{} / {} / {} / {}",
                    s.poller_invocations, s.poller_kills, s.poller_timeouts, s.poller_errors
                ),
            ),
            (
                "function processes that exited by themselves",
                (s.zip_exits.len() + s.poller_exits.len()).to_string(),
            ),
            (
                "notifications duplicated / manifests re-dropped",
                format!("{} / {}", s.duplicated_notifications, s.redrops),
            ),
            ("token expiries", s.token_expiries.to_string()),
            (
                "simulator faults fired",
                self.faults.iter().map(|f| f.2).sum::<u64>().to_string(),
            ),
            ("uploads failed", self.failed_uploads.len().to_string()),
            ("messages in a DLQ", self.dlq.len().to_string()),
        ];
        for (k, v) in rows {
            println!("| {k} | {v} |");
        }
        for (k, v) in [
            ("**lost**", self.lost.len()),
            ("**duplicate clusters**", self.duplicate_clusters.len()),
            ("**clusters unknown to the relay**", self.unknown_clusters.len()),
            ("**uploads not final**", self.not_final.len()),
            ("**cross-tenant reads**", self.cross_tenant.len()),
            ("**panics**", self.panics.len()),
            ("**accounting mismatches**", self.mismatches.len()),
        ] {
            println!("| {k} | {v} |");
        }
        println!("\nfault rules (matches → fired):");
        for (rule, matches, hits) in &self.faults {
            println!("  {rule:<45} {matches:>5} → {hits}");
        }
        for e in s.zip_exits.iter().chain(&s.poller_exits) {
            println!("  a function process exited: {}", clip(e));
        }
        if self.failures.is_empty() {
            println!("\nsoak: every invariant holds");
        } else {
            println!("\nsoak: BROKEN invariants:");
            for f in &self.failures {
                println!("  !! {}", clip_long(f));
            }
        }
    }
}

fn clip_long(s: &str) -> String {
    match s.char_indices().nth(4000) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::domain::exif::{read_metadata, ExifError};

    fn options(sequences: usize, users: usize, short: bool) -> Options {
        Options {
            sequences,
            users,
            seed: 7,
            short,
        }
    }

    /// Every file of the catalogue is one the relay must reject, each for its own reason (so the
    /// soak's hostile mix is what it claims to be).
    #[test]
    fn every_bad_file_is_rejected_by_the_exif_reader_for_its_reason() {
        let at = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        let near = track(1, &TrackSpec::new(48.0, 2.0, at)).remove(0);
        assert!(read_metadata(&jpeg(&near)).is_ok(), "the good image is accepted");
        for bad in CATALOGUE {
            let bytes = bad.bytes(&near).expect("catalogue file");
            if bad == Bad::Truncated {
                // Its header is whole (the EXIF reader reads it); the relay rejects it when it reads the
                // image data (zip-and-push's own tests; the soak checks every bad file is rejected).
                assert!(!bytes.ends_with(&[0xFF, 0xD9]), "no end-of-image marker");
                continue;
            }
            let err = read_metadata(&bytes).expect_err(bad.name());
            let expected = match bad {
                Bad::NotJpeg | Bad::Empty => matches!(err, ExifError::NotJpeg(_)),
                Bad::Truncated => true,
                Bad::NoGps => matches!(err, ExifError::NoGps(_)),
                Bad::LatOutOfRange | Bad::LonOutOfRange => matches!(err, ExifError::InvalidGps(_)),
                Bad::Year10000 => matches!(err, ExifError::CaptureTimeOutOfRange(_)),
            };
            assert!(expected, "{}: {err:?}", bad.name());
        }
    }

    #[test]
    fn the_mix_has_the_dotted_pair_splits_all_bad_redrops_and_duplicates() {
        let o = options(100, 10, false);
        let users = users(o.users);
        let plans = plans(&o, &users, &mut Rng(o.seed));
        assert_eq!(plans.len(), 100);
        assert_eq!((plans[0].user.as_str(), plans[0].id.as_str()), ("h", "a.b"));
        assert_eq!((plans[1].user.as_str(), plans[1].id.as_str()), ("h.a", "b"));
        assert_eq!(
            plans.iter().map(|p| &p.user).collect::<BTreeSet<_>>().len(),
            10,
            "every user drops sequences"
        );
        assert!(plans.iter().filter(|p| p.split).count() >= 5);
        assert!(plans.iter().filter(|p| p.good.is_empty()).count() >= 5);
        assert!(plans.iter().any(|p| p.redrop == Redrop::Same));
        assert!(plans.iter().any(|p| p.redrop == Redrop::Changed));
        assert!(plans.iter().any(|p| p.dup_notification));
        for bad in CATALOGUE {
            assert!(plans.iter().any(|p| p.bad.contains(&bad)), "{}", bad.name());
        }
        // (user, sequence) pairs and file-name tags are unique.
        let pairs: BTreeSet<(&str, &str)> = plans.iter().map(|p| (p.user.as_str(), p.id.as_str())).collect();
        assert_eq!(pairs.len(), plans.len());
        let tags: BTreeSet<&str> = plans.iter().map(|p| p.tag.as_str()).collect();
        assert_eq!(tags.len(), plans.len());

        let short = options(SHORT_SEQUENCES, SHORT_USERS, true);
        let plans = plans_of(&short);
        for bad in CATALOGUE {
            assert!(
                plans.iter().any(|p| p.bad.contains(&bad)),
                "short: {}",
                bad.name()
            );
        }
        assert!(plans.iter().any(|p| p.split) && plans.iter().any(|p| p.dup_notification));
    }

    fn plans_of(o: &Options) -> Vec<Plan> {
        plans(o, &users(o.users), &mut Rng(o.seed))
    }

    #[test]
    fn a_sequence_is_final_only_when_failed_or_every_upload_is_final_at_mapillary() {
        assert!(is_final(&json!({"state": "FAILED", "uploads": []})));
        assert!(!is_final(&json!({"state": "UPLOADING", "uploads": []})));
        let up = |state: &str, m: Value| json!({"state": state, "mapillary": m});
        let doc = |uploads: Vec<Value>| json!({"state": "UPLOADED", "uploads": uploads});
        assert!(is_final(&doc(vec![
            up("HANDED_OFF", json!({"state": "FINISHED"})),
            up("FAILED", Value::Null)
        ])));
        assert!(!is_final(&doc(vec![
            up("HANDED_OFF", json!({"state": "FINISHED"})),
            up("FINISH_UNCERTAIN", json!({"state": "IN_PROGRESS"}))
        ])));
        assert!(!is_final(&doc(vec![up("HANDED_OFF", Value::Null)])));
    }

    #[test]
    fn kill_points_fall_inside_a_typical_invocation() {
        let mut rng = Rng(3);
        let typical = Mean(400.0);
        assert_eq!(kill_point(&mut rng, 0.0, false, &typical), None);
        for _ in 0..100 {
            let d = kill_point(&mut rng, 1.0, false, &typical).expect("p = 1 always kills");
            assert!(
                d >= Duration::from_millis(20) && d < Duration::from_millis(400),
                "{d:?}"
            );
        }
        let forced = kill_point(&mut rng, 0.0, true, &typical).expect("forced");
        assert!(forced < Duration::from_millis(134), "{forced:?}");
    }
}
