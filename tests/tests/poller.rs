//! The poller end to end on the local stack (moto: the stack from `infra/template.yaml`, DynamoDB,
//! SQS, KMS through `shared::adapters`) and the in-process Mapillary simulator with its frozen
//! clock. zip-and-push's state is written directly through the adapters: each upload is a real zip
//! uploaded to the simulator and finished (a real cluster), its upload record and image entries are
//! put with `DynamoRepository`, and its cluster message is sent with `SqsClusterQueue`. The poller's
//! "now" follows the simulator's clock.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use integration_tests::moto::shared_moto;
use integration_tests::stack::{self, LocalStack, SimEndpoints};
use mapillary_sim::defaults::{APP_ID, CLIENT_SECRET};
use mapillary_sim::{SimConfig, SimHandle, Simulator};
use poller::clock::Clock;
use poller::compose::{compose, ProductionPoller};
use poller::config::{Config, Tunables};
use poller::{run_once, Deps, RunReport};
use relay_fixtures::{jpeg, track, TrackSpec};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use shared::adapters::sqs::SqsClusterQueue;
use shared::domain::linking::{ImageOutcome, LinkPath};
use shared::domain::tracking::{FeedErrorClass, FeedSource, OverallState};
use shared::mapillary::client::MapillaryClient;
use shared::mapillary::retry::RetryPolicy;
use shared::mapillary::session::TokenSession;
use shared::mapillary::Endpoints;
use shared::model::{upload_id, ClusterMessage, StoredToken, UploadImage, UploadRecord, UploadState};
use shared::ports::{
    ClusterQueue, ImageEntryStore, RunLease, TokenStore, TrackingReader, TrackingStore, UploadStore,
};
use time::{Duration as TDuration, OffsetDateTime};

type P = ProductionPoller;

struct World {
    _stack: LocalStack,
    sim: SimHandle,
    poller: P,
    client: MapillaryClient,
    clusters: SqsClusterQueue,
    http: reqwest::Client,
}

/// A simulator user: our user id, the token.
struct SimUser {
    ours: String,
    token: String,
}

fn sim_now(sim: &SimHandle) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(sim.sim().now_ms()) * 1_000_000).expect("time")
}

async fn world(tag: &str, tunables: Tunables) -> Result<World> {
    let endpoint = shared_moto()?;
    let stack = LocalStack::create(&endpoint, &stack::unique_stack_name(tag)).await?;
    let sim = Simulator::start(SimConfig::frozen(), "127.0.0.1:0").await?;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let client = MapillaryClient::new(
        Endpoints::under(sim.base_url()),
        http.clone(),
        RetryPolicy::fast(),
    );
    // The poller composed by `poller::compose` from the function's environment, as `main.rs` does;
    // then fast retries, the test's tunables and a clock that follows the simulator's.
    // With the web-app feed token, as the local stack and the template configure the poller (the
    // default world, seed-2022, lets only that token read the feed).
    let env = stack.lambda_env(
        &SimEndpoints::from_base(sim.base_url(), APP_ID, CLIENT_SECRET)
            .with_feed_token(mapillary_sim::defaults::WEB_APP_CLIENT_TOKEN),
    );
    let config = Config::from_lookup(|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))?;
    let mut poller = compose(&config, stack.sdk_config()).await?;
    poller.mapillary = poller.mapillary.with_retry_policy(RetryPolicy::fast());
    poller.tunables = tunables;
    poller.clock = Clock::manual(sim_now(&sim));
    let clusters = SqsClusterQueue::new(stack.sqs(), &stack.clusters_queue_url);
    Ok(World {
        _stack: stack,
        sim,
        poller,
        client,
        clusters,
        http,
    })
}

impl World {
    async fn admin(&self, method: reqwest::Method, path: &str, body: Value) -> Result<Value> {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.sim.admin_url()))
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        ensure!(status.is_success(), "admin {path}: {status} {text}");
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A new simulator user with an OAuth token (refreshable), connected as `ours`.
    async fn user(&self, ours: &str, username: &str, with_mapillary_id: bool) -> Result<SimUser> {
        let u = self
            .admin(
                reqwest::Method::POST,
                "/users",
                json!({"username": username, "oauth": true}),
            )
            .await?;
        let token = u["access_token"].as_str().context("token")?.to_string();
        let id = u["id"].as_str().context("id")?.to_string();
        self.poller
            .tokens
            .save(
                ours,
                &StoredToken {
                    access_token: SecretString::from(token.clone()),
                    refresh_token: None,
                    expires_at: None,
                    mapillary_user_id: with_mapillary_id.then_some(id),
                    username: Some(username.into()),
                    updated_at: OffsetDateTime::now_utc(),
                },
            )
            .await?;
        Ok(SimUser {
            ours: ours.into(),
            token,
        })
    }

    /// Upload `n` images (a straight track starting at `lat`,`lon`, 2 s apart, starting at
    /// `start`) as one zip, finish it, and write what zip-and-push would have written. Returns the
    /// upload id and cluster id. `send` = also put the cluster message on the queue.
    #[allow(clippy::too_many_arguments)]
    async fn upload(
        &self,
        u: &SimUser,
        seq: &str,
        n: usize,
        lat: f64,
        lon: f64,
        start: OffsetDateTime,
        send: bool,
    ) -> Result<(String, String)> {
        let mut t = TrackSpec::new(lat, lon, start);
        t.interval_ms = 2000;
        t.step_m = 8.0;
        t.altitude = Some(120.0);
        let specs = track(n, &t);
        // The zip the relay makes (MAP* descriptions, mapillary_tools' comment): every world takes it.
        let originals: Vec<Vec<u8>> = specs.iter().map(jpeg).collect();
        let bytes = bytes::Bytes::from(shared::domain::toolszip::tools_zip(&originals)?);
        let total = bytes.len() as u64;
        let token = SecretString::from(u.token.clone());
        let key = format!("mly_relay_{}_{seq}.zip", u.ours);
        let report = self
            .client
            .upload_resumable(&token, &key, total, |off| {
                let b = bytes.slice(off as usize..);
                futures::stream::iter([Ok::<_, std::io::Error>(b)])
            })
            .await?;
        let cluster = self
            .client
            .finish_upload(
                &token,
                &report.handle,
                shared::mapillary::client::FileType::Zip,
                None,
            )
            .await?;
        let id = upload_id(&u.ours, seq, 0);
        let now = sim_now(&self.sim);
        let repo = &self.poller.uploads;
        repo.put_upload(&UploadRecord {
            user_id: u.ours.clone(),
            sequence_id: seq.into(),
            upload_id: id.clone(),
            index: 0,
            state: UploadState::HandedOff,
            session_key: key,
            total_len: total,
            image_count: n as u32,
            cluster_id: Some(cluster.clone()),
            handle: Some(report.handle.clone()),
            organization_id: None,
            bytes_sent: total,
            created_at: now,
            started_at: Some(now),
            finished_at: Some(now),
            error: None,
            attempts: 1,
            outbox: Default::default(),
        })
        .await?;
        let images: Vec<UploadImage> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| UploadImage {
                upload_id: id.clone(),
                index: i as u32,
                key: format!("sequences/{}/{seq}/img_{i:04}.jpg", u.ours),
                etag: "e".into(),
                size: 1,
                entry_size: 1,
                header_consumed: 0,
                description: String::new(),
                lat: s.lat,
                lon: s.lon,
                altitude: s.altitude,
                captured_at: s.captured_at,
                heading: None,
                checkpoint: None,
            })
            .collect();
        repo.put_images(&images).await?;
        if send {
            self.send(&u.ours, seq, &id, &cluster).await?;
        }
        Ok((id, cluster))
    }

    async fn send(&self, user: &str, seq: &str, id: &str, cluster: &str) -> Result<()> {
        self.clusters
            .send_cluster(&ClusterMessage {
                upload_id: id.into(),
                user_id: user.into(),
                sequence_id: seq.into(),
                cluster_id: cluster.into(),
            })
            .await?;
        Ok(())
    }

    /// Advance the simulator and the poller's clock together.
    fn advance(&self, seconds: i64) {
        self.sim.advance_clock(seconds);
        self.poller.clock.set_ms(self.sim.sim().now_ms());
    }

    async fn run(&self) -> RunReport {
        run_once(&self.poller, Instant::now() + Duration::from_secs(120)).await
    }

    async fn requests(&self, path: &str) -> Result<usize> {
        let v = self.admin(reqwest::Method::GET, "/requests", Value::Null).await?;
        let list = v
            .as_array()
            .or_else(|| v["requests"].as_array())
            .context("request log")?;
        Ok(list.iter().filter(|r| r["path"].as_str() == Some(path)).count())
    }

    async fn clear_requests(&self) -> Result<()> {
        self.admin(reqwest::Method::DELETE, "/requests", Value::Null)
            .await?;
        Ok(())
    }
}

fn start_time() -> OffsetDateTime {
    time::macros::datetime!(2024-04-20 08:00:00 UTC)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_progress_to_finished_and_link_through_the_feed_and_intake_is_idempotent() -> Result<()> {
    let w = world("poll-stages", Tunables::default()).await?;
    let u = w.user("alice", "alice_m", false).await?;
    let (id, cluster) = w.upload(&u, "s1", 6, 48.2, 16.37, start_time(), true).await?;
    // A re-delivered message must not create a second record nor reset progress.
    w.send("alice", "s1", &id, &cluster).await?;

    let r = w.run().await;
    assert_eq!(r.intake.received, 2, "{r:?}");
    assert_eq!(
        (r.intake.created, r.intake.duplicates, r.intake.deleted),
        (1, 1, 2),
        "{r:?}"
    );
    let rec = w.poller.tracking.get_tracking(&id).await?.context("tracked")?;
    assert_eq!(rec.tracked.state, OverallState::InProgress);
    // The Mapillary user id was resolved with /me and saved to the token record.
    let tok = w.poller.tokens.load("alice").await?.context("token")?;
    assert!(tok.mapillary_user_id.is_some());
    assert_eq!(rec.mapillary_user_id, tok.mapillary_user_id);

    // Stage by stage (default plan 60 s, 600 s, 1800 s, 3600 s).
    let mut states = Vec::new();
    for secs in [61, 600, 1800, 3600] {
        w.advance(secs);
        let r = w.run().await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let rec = w.poller.tracking.get_tracking(&id).await?.context("tracked")?;
        states.push(rec.tracked.stages.clone());
    }
    assert_eq!(states[0].ingestion.as_ref().map(|s| s.as_str()), Some("FINISHED"));
    assert_eq!(
        states[0].image_processing.as_ref().map(|s| s.as_str()),
        Some("IN_PROGRESS")
    );
    assert!(states[3].all_finished());
    let rec = w.poller.tracking.get_tracking(&id).await?.context("tracked")?;
    assert_eq!(rec.tracked.state, OverallState::Finished);
    assert_eq!(rec.linked_via, Some(LinkPath::ActivityFeed));
    assert_eq!((rec.linked_count, rec.dropped_count), (6, 0));
    assert_eq!(rec.sequence_ids.len(), 1);
    assert_eq!(rec.item_count, Some(6));
    let fields: Vec<&str> = rec.history.iter().map(|t| t.field.as_str()).collect();
    for f in [
        "status",
        "initial_processing_status",
        "anonymization_status",
        "tiler_status",
        "state",
    ] {
        assert!(fields.contains(&f), "{fields:?}");
    }
    let links = w.poller.tracking.list_links(&id).await?;
    assert_eq!(links.len(), 6);
    for l in &links {
        match &l.outcome {
            ImageOutcome::Linked { image_id, link, .. } => {
                assert_eq!(link, &format!("https://www.mapillary.com/app/?pKey={image_id}"))
            }
            other => panic!("not linked: {other:?}"),
        }
    }
    // Final: no longer pending; a further run writes nothing; the re-delivered message changes nothing.
    assert!(w
        .poller
        .tracking
        .list_pending_tracking()
        .await?
        .records
        .is_empty());
    w.send("alice", "s1", &id, &cluster).await?;
    let r = w.run().await;
    assert_eq!((r.intake.duplicates, r.written), (1, 0), "{r:?}");
    let again = w.poller.tracking.get_tracking(&id).await?.context("tracked")?;
    assert_eq!(again, rec);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_is_recorded_with_its_error_code() -> Result<()> {
    let w = world("poll-fail", Tunables::default()).await?;
    let u = w.user("bob", "bob_m", true).await?;
    w.admin(
        reqwest::Method::POST,
        "/plans/next",
        json!({"fail": {"stage": 2, "error_code": "SIM_PROCESSING_FAILED"}}),
    )
    .await?;
    let (id, _) = w.upload(&u, "s1", 3, 48.2, 16.37, start_time(), true).await?;
    w.run().await;
    w.advance(61 + 600);
    let r = w.run().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let rec = w.poller.tracking.get_tracking(&id).await?.context("tracked")?;
    match &rec.tracked.state {
        OverallState::Failed {
            error_code, stage, ..
        } => {
            assert_eq!(error_code.as_deref(), Some("SIM_PROCESSING_FAILED"));
            assert_eq!(stage.as_deref(), Some("initial_processing_status"));
        }
        s => panic!("expected FAILED, got {s:?}"),
    }
    assert!(rec.sequence_ids.is_empty());
    assert!(w
        .poller
        .tracking
        .list_pending_tracking()
        .await?
        .records
        .is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_broken_falls_back_to_tiles_and_links_the_same_images() -> Result<()> {
    let w = world("poll-tiles", Tunables::default()).await?;
    let u = w.user("carol", "carol_m", true).await?;
    let (id, _) = w
        .upload(&u, "s1", 8, 40.4168, -3.7038, start_time(), true)
        .await?;
    w.run().await;
    w.advance(7000);
    w.admin(
        reqwest::Method::POST,
        "/faults",
        json!({"path": "/graph/graphql", "action": {"kind": "graphql_error", "message": "Unknown document"}}),
    )
    .await?;
    let r = w.run().await;
    assert_eq!(
        (r.feed_unusable_users, r.linked_tiles, r.linked_feed),
        (1, 1, 0),
        "{r:?}"
    );
    let rec = w.poller.tracking.get_tracking(&id).await?.context("tracked")?;
    assert_eq!(rec.linked_via, Some(LinkPath::CoverageTiles));
    assert_eq!(rec.tracked.state, OverallState::Finished);
    let health = w.poller.tracking.get_feed_health().await?.context("health")?;
    assert!(!health.healthy && health.degraded_since.is_some());
    assert!(health.last_error.unwrap_or_default().contains("Unknown document"));
    let via_tiles: Vec<(String, ImageOutcome)> = w
        .poller
        .tracking
        .list_links(&id)
        .await?
        .into_iter()
        .map(|l| {
            assert_eq!(l.via, LinkPath::CoverageTiles);
            (l.key, l.outcome)
        })
        .collect();

    // What linking by the feed links for the same upload, once the feed works again.
    w.admin(reqwest::Method::DELETE, "/faults", Value::Null).await?;
    let mut tok = TokenSession::load_fresh(w.poller.token_context(), "carol").await?;
    let image_id = rec.image_id.clone().context("image id")?;
    let report = poller::linking::by_feed::link_upload(&w.poller, &mut tok, &rec, &image_id)
        .await?
        .report;
    let via_feed: Vec<(String, ImageOutcome)> =
        report.images.into_iter().map(|i| (i.key, i.outcome)).collect();
    assert_eq!(via_tiles, via_feed);
    assert_eq!(report.path, LinkPath::ActivityFeed);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_then_failed_at_the_hard_stop() -> Result<()> {
    let w = world("poll-stale", Tunables::default()).await?;
    let u = w.user("dave", "dave_m", true).await?;
    w.admin(reqwest::Method::POST, "/plans/next", json!({"stuck_at": 2}))
        .await?;
    let (id, _) = w.upload(&u, "s1", 2, 48.2, 16.37, start_time(), true).await?;
    w.run().await;
    w.advance(73 * 3600);
    w.run().await;
    let rec = w.poller.tracking.get_tracking(&id).await?.context("tracked")?;
    match &rec.tracked.state {
        OverallState::Stale { reason } => assert!(reason.contains("72 h"), "{reason}"),
        s => panic!("expected STALE, got {s:?}"),
    }
    // Checked at the slower rate: a run right after does not look at it.
    w.clear_requests().await?;
    let r = w.run().await;
    assert_eq!(r.checked, 0, "{r:?}");
    assert_eq!(w.requests("/graph/graphql").await?, 0);
    w.advance(14 * 24 * 3600);
    w.run().await;
    let rec = w.poller.tracking.get_tracking(&id).await?.context("tracked")?;
    assert!(
        matches!(&rec.tracked.state, OverallState::Failed { reason, .. } if reason.contains("gave up")),
        "{:?}",
        rec.tracked.state
    );
    assert!(w
        .poller
        .tracking
        .list_pending_tracking()
        .await?
        .records
        .is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_refusal_never_refreshes_the_token_and_the_next_run_reads_the_feed_again() -> Result<()> {
    let w = world("poll-401", Tunables::default()).await?;
    let u = w.user("erin", "erin_m", true).await?;
    let (id, _) = w.upload(&u, "s1", 2, 48.2, 16.37, start_time(), true).await?;
    w.admin(
        reqwest::Method::POST,
        "/faults",
        json!({"path": "/graph/graphql", "times": 1, "action": {"kind": "unauthorized"}}),
    )
    .await?;
    w.advance(61);
    w.clear_requests().await?;
    // The feed refuses the web-app token once (the fault) and then the user's token (seed-2022 lets
    // only the web app's token read the feed): refusals, not an expired token. This run tracks the user
    // through coverage tiles, and refreshes nothing.
    let r = w.run().await;
    assert_eq!(r.feed_unusable_users, 1, "{r:?}");
    assert_eq!(
        w.requests("/graph/graphql").await?,
        2,
        "web-app token, then the user's"
    );
    assert_eq!(w.requests("/graph/token").await?, 0, "no refresh");
    let tok = w.poller.tokens.load("erin").await?.context("token")?;
    assert_eq!(
        tok.access_token.expose_secret(),
        u.token,
        "the token is unchanged"
    );
    let rec = w.poller.tracking.get_tracking(&id).await?.context("tracked")?;
    assert_eq!(
        rec.tracked.feed.as_ref().map(|f| (f.source, f.error_class)),
        Some((FeedSource::CoverageTiles, Some(FeedErrorClass::Refused)))
    );
    // Next run: the feed takes the web-app token again.
    let r = w.run().await;
    assert_eq!((r.feed_unusable_users, r.feed_web_app_users), (0, 1), "{r:?}");
    let rec = w.poller.tracking.get_tracking(&id).await?.context("tracked")?;
    assert_eq!(
        rec.tracked.stages.ingestion.as_ref().map(|s| s.as_str()),
        Some("FINISHED")
    );
    assert_eq!(
        rec.tracked.feed.as_ref().map(|f| (f.source, f.error_class)),
        Some((FeedSource::WebAppToken, None))
    );
    assert_eq!(w.requests("/graph/token").await?, 0, "still no refresh");
    Ok(())
}

/// The seed's exact sample body (protocol doc §6.1, TV-2023a/TV-2022 nodes), served for every feed
/// request: its clusters are not ours and it always says `has_next_page` with the same cursor.
const SEED_SAMPLE: &str = r#"{"data":{"fetch__User":{"id":"101176865463974","feed":{"page_info":{"start_cursor":null,"end_cursor":"AQHRfgT-…","has_next_page":true,"has_previous_page":false},"nodes":[{"cluster_id":"151552211058876","type":"UPLOAD","created_at_seconds":1683759912,"captured_at_seconds":1683629036,"thumb_url":"https://scontent-….fbcdn.net/…","item_count":43,"image_id":"202467835974822","status":"FINISHED","initial_processing_status":"FINISHED","anonymization_status":"FINISHED","tiler_status":"FINISHED","error_code":"UNSET","timezone":"EUROPE_MADRID","__typename":"ClusterLatestActivityItem"},{"cluster_id":"…","type":"UPLOAD","thumb_url":null,"item_count":null,"image_id":null,"status":"IN_PROGRESS","initial_processing_status":"IN_PROGRESS","anonymization_status":"IN_PROGRESS","tiler_status":"IN_PROGRESS","error_code":"UNSET","__typename":"ClusterLatestActivityItem"}],"__typename":"UserFeedConnection"},"__typename":"User"},"__typename":"Query"},"extensions":{"is_final":true}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_unknown_and_looping_feed_replies_are_handled() -> Result<()> {
    let w = world("poll-drift", Tunables::default()).await?;
    let u = w.user("finn", "finn_m", true).await?;
    let (id, _) = w.upload(&u, "s1", 2, 48.2, 16.37, start_time(), true).await?;
    w.run().await;
    let health = |w: &World| {
        let t = w.poller.tracking.clone();
        async move { t.get_feed_health().await }
    };

    // 1. The seed's sample, forever: the repeated cursor stops the walk after two pages.
    w.admin(
        reqwest::Method::POST,
        "/faults",
        json!({"path": "/graph/graphql", "action": {"kind": "status", "status": 200,
            "body": serde_json::from_str::<Value>(SEED_SAMPLE)?}}),
    )
    .await?;
    w.clear_requests().await?;
    let r = w.run().await;
    assert_eq!(r.feed_unusable_users, 1, "{r:?}");
    assert_eq!(w.requests("/graph/graphql").await?, 2);
    assert!(!health(&w).await?.context("health")?.healthy);

    // 2. A reply that is a bare JSON string (the simulator's fault bodies are JSON), and a renamed
    //    field: the feed is unusable, the run completes.
    for action in [
        json!({"kind": "status", "status": 200, "body": "<html>oops</html>"}),
        json!({"kind": "rename_node_field", "from": "cluster_id", "to": "clusterId"}),
    ] {
        w.admin(reqwest::Method::DELETE, "/faults", Value::Null).await?;
        w.admin(
            reqwest::Method::POST,
            "/faults",
            json!({"path": "/graph/graphql", "action": action}),
        )
        .await?;
        let r = w.run().await;
        assert_eq!(r.feed_unusable_users, 1, "{r:?}");
    }

    // 3. Unknown enum value in a stage: stored verbatim, shown in the history; the feed is healthy.
    w.admin(reqwest::Method::DELETE, "/faults", Value::Null).await?;
    w.admin(
        reqwest::Method::POST,
        "/faults",
        json!({"path": "/graph/graphql", "action": {"kind": "set_node_field", "field": "tiler_status", "value": "QUEUED_FOR_TILES"}}),
    )
    .await?;
    let r = w.run().await;
    assert_eq!(r.feed_unusable_users, 0, "{r:?}");
    let rec = w.poller.tracking.get_tracking(&id).await?.context("tracked")?;
    assert_eq!(
        rec.tracked.stages.map_update.as_ref().map(|s| s.as_str()),
        Some("QUEUED_FOR_TILES")
    );
    assert!(rec
        .history
        .iter()
        .any(|t| t.field == "tiler_status" && t.to.as_deref() == Some("QUEUED_FOR_TILES")));
    assert_eq!(rec.tracked.state, OverallState::InProgress);
    let h = health(&w).await?.context("health")?;
    assert!(h.healthy && h.degraded_since.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_page_feed_stops_as_soon_as_every_pending_cluster_was_seen() -> Result<()> {
    let w = world("poll-pages", Tunables::default()).await?;
    let u = w.user("gina", "gina_m", true).await?;
    // 230 uploads; only the oldest and the newest are tracked.
    let mut ids = Vec::new();
    for i in 0..230 {
        let at = start_time() + TDuration::minutes(i);
        let lat = 48.0 + (i as f64) * 0.01;
        let (id, cluster) = w
            .upload(&u, &format!("s{i:03}"), 1, lat, 16.37, at, false)
            .await?;
        ids.push((id, cluster));
        w.advance(1); // distinct created_at_seconds, newest last
    }
    let (newest, newest_cluster) = ids.last().cloned().context("newest")?;
    w.send("gina", "s229", &newest, &newest_cluster).await?;
    w.clear_requests().await?;
    w.run().await;
    assert_eq!(w.requests("/graph/graphql").await?, 1, "the newest is on page 1");
    let (oldest, oldest_cluster) = ids[0].clone();
    w.send("gina", "s000", &oldest, &oldest_cluster).await?;
    w.clear_requests().await?;
    w.run().await;
    // 230 items at 50 per page: the oldest is on page 5 (and the walk never asks for more).
    assert_eq!(w.requests("/graph/graphql").await?, 5);
    let rec = w
        .poller
        .tracking
        .get_tracking(&oldest)
        .await?
        .context("tracked")?;
    assert!(rec.tracked.stages.ingestion.is_some(), "{rec:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_holding_the_lease_keeps_other_runs_out_until_it_is_released_or_expires() -> Result<()> {
    let w = world("poll-lease", Tunables::default()).await?;
    let u = w.user("lea", "lea_m", false).await?;
    let (id, _) = w.upload(&u, "s1", 3, 48.3, 16.4, start_time(), true).await?;
    let t = &w.poller.tracking;
    let now = OffsetDateTime::now_utc();
    let minute = TDuration::minutes(1);
    // Another run holds the lease: this one does nothing at all (the message stays queued).
    assert!(t.acquire_run_lease("other-run", now, now + minute).await?);
    let r = w.run().await;
    assert!(r.lease_held, "{r:?}");
    assert_eq!((r.intake.received, r.users, r.written), (0, 0, 0), "{r:?}");
    assert!(t.get_tracking(&id).await?.is_none());
    // Its holder may renew it; nobody else may take it before it expires.
    assert!(t.acquire_run_lease("other-run", now, now + minute).await?);
    assert!(!t.acquire_run_lease("third", now, now + minute).await?);
    // Released: the next run works, and gives the lease back when done.
    t.release_run_lease("other-run").await?;
    let r = w.run().await;
    assert!(!r.lease_held && r.intake.created == 1 && r.written == 1, "{r:?}");
    assert!(t.get_tracking(&id).await?.is_some());
    assert!(
        t.acquire_run_lease("third", now, now + TDuration::seconds(1))
            .await?,
        "a run releases its lease when it ends"
    );
    // An expired lease is taken over; releasing a lease one does not hold changes nothing.
    let later = now + TDuration::seconds(5);
    assert!(t.acquire_run_lease("fourth", later, later + minute).await?);
    t.release_run_lease("third").await?;
    assert!(!t.acquire_run_lease("fifth", later, later + minute).await?);
    t.release_run_lease("fourth").await?;
    Ok(())
}

fn record(user: &str, upload: &str) -> shared::model::TrackingRecord {
    shared::model::TrackingRecord::new(
        user.into(),
        "s".into(),
        upload.into(),
        shared::domain::tracking::TrackedUpload::new(format!("c-{upload}"), start_time()),
        Some(2),
    )
}

async fn items_under(w: &World, pk: &str, prefix: &str) -> Result<Vec<String>> {
    let out = w
        ._stack
        .dynamodb()
        .query()
        .table_name(&w._stack.uploads_table)
        .key_condition_expression("pk = :pk AND begins_with(sk, :p)")
        .expression_attribute_values(":pk", aws_sdk_dynamodb::types::AttributeValue::S(pk.into()))
        .expression_attribute_values(":p", aws_sdk_dynamodb::types::AttributeValue::S(prefix.into()))
        .send()
        .await?;
    Ok(out
        .items()
        .iter()
        .filter_map(|i| i.get("sk").and_then(|v| v.as_s().ok()).cloned())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_sets_follow_the_records_and_links_are_stored_per_upload() -> Result<()> {
    let w = world("poll-layout", Tunables::default()).await?;
    let t = &w.poller.tracking;
    // Three pending uploads of one user, one of another; a re-created record is not duplicated.
    for (u, id) in [("pat", "p1"), ("pat", "p2"), ("pat", "p3"), ("quin", "q1")] {
        assert!(t.create_tracking(&record(u, id)).await?);
    }
    assert!(!t.create_tracking(&record("pat", "p1")).await?);
    let ids = |v: Vec<shared::model::TrackingRecord>| v.into_iter().map(|r| r.upload_id).collect::<Vec<_>>();
    assert_eq!(
        ids(t.list_pending_tracking().await?.records),
        ["p1", "p2", "p3", "q1"]
    );
    // The records are one JSON document each, and round-trip.
    assert_eq!(t.get_tracking("p2").await?, Some(record("pat", "p2")));

    // One of pat's uploads final: it leaves the pending set (the others stay).
    let mut done = record("pat", "p2");
    done.tracked.state = OverallState::Finished;
    t.put_tracking_batch(std::slice::from_ref(&done), &[], None)
        .await?;
    assert_eq!(ids(t.list_pending_tracking().await?.records), ["p1", "p3", "q1"]);
    assert_eq!(t.get_tracking("p2").await?, Some(done.clone()));
    // A final record back in its set (a re-delivered cluster message after it finished) is tidied
    // by the listing, and its record is not reset.
    let mut q1 = record("quin", "q1");
    q1.tracked.state = OverallState::Finished;
    t.update_tracking(&q1, None).await?;
    assert!(!t.create_tracking(&record("quin", "q1")).await?);
    t.create_tracking(&record("quin", "q2")).await?;
    assert_eq!(ids(t.list_pending_tracking().await?.records), ["p1", "p3", "q2"]);
    assert_eq!(t.get_tracking("q1").await?, Some(q1));
    assert_eq!(ids(t.list_pending_tracking().await?.records), ["p1", "p3", "q2"]);
    // Every remaining upload of pat final, the user's pending item deleted with them.
    let finals: Vec<_> = ["p1", "p3"]
        .iter()
        .map(|id| {
            let mut r = record("pat", id);
            r.tracked.state = OverallState::Finished;
            r
        })
        .collect();
    t.put_tracking_batch(&finals, &[], Some("pat")).await?;
    assert_eq!(ids(t.list_pending_tracking().await?.records), ["q2"]);
    assert!(items_under(&w, "PENDING#pat", "PENDING").await?.is_empty());

    // Links: one item per 200 links of an upload, all read back in order; a shorter rewrite wins.
    let link = |i: u32| shared::model::ImageLink {
        upload_id: "p1".into(),
        index: i,
        key: format!("sequences/pat/s/img {i}.jpg"),
        outcome: ImageOutcome::Linked {
            image_id: format!("{}", 1000 + i),
            sequence_id: "seqA".into(),
            link: format!("https://www.mapillary.com/app/?pKey={}", 1000 + i),
        },
        via: LinkPath::ActivityFeed,
    };
    let mut many: Vec<_> = (0..450).rev().map(link).collect();
    many.push(link(7)); // the same index twice: one link
    t.put_links(&many).await?;
    assert_eq!(
        items_under(&w, "UPLOAD#p1", "LINK").await?,
        ["LINKS#000", "LINKS#001", "LINKS#002"]
    );
    let got = t.list_links("p1").await?;
    assert_eq!(got, (0..450).map(link).collect::<Vec<_>>());
    t.put_links(&(0..10).map(link).collect::<Vec<_>>()).await?;
    assert_eq!(t.list_links("p1").await?, (0..10).map(link).collect::<Vec<_>>());
    assert!(t.list_links("p3").await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_poisoned_or_duplicated_record_does_not_stop_tracking_for_the_others() -> Result<()> {
    // Issue 15: an upload id in two users' pending sets (what the colliding `<user>.<seq>.<n>` ids
    // produced) made every run fail "listing pending uploads" (BatchGetItem: duplicate keys), and
    // one unreadable record failed the listing the same way: tracking stopped for every user.
    use aws_sdk_dynamodb::types::AttributeValue::S;
    let w = world("poll-poison", Tunables::default()).await?;
    let y = w.user("yara", "yara_m", false).await?;
    let (yid, _) = w.upload(&y, "s1", 4, 48.2, 16.37, start_time(), true).await?;
    let r = w.run().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let t = &w.poller.tracking;
    // X: a tracking record whose document is not JSON…
    let xid = upload_id("xavier", "s1", 0);
    assert!(t.create_tracking(&record("xavier", &xid)).await?);
    w._stack
        .dynamodb()
        .update_item()
        .table_name(&w._stack.uploads_table)
        .key("pk", S(format!("UPLOAD#{xid}")))
        .key("sk", S("TRACK".into()))
        .update_expression("SET #d = :d")
        .expression_attribute_names("#d", "doc")
        .expression_attribute_values(":d", S("{not json".into()))
        .send()
        .await?;
    // …and Y's upload in X's pending set too (the record exists: only the set changes).
    assert!(!t.create_tracking(&record("xavier", &yid)).await?);

    w.advance(61);
    let r = w.run().await;
    // Y is still tracked (its first stage finished), X's record is a reported error.
    let rec = t.get_tracking(&yid).await?.context("tracked")?;
    assert_eq!(rec.user_id, "yara");
    assert_eq!(
        rec.tracked.stages.ingestion.as_ref().map(|s| s.as_str()),
        Some("FINISHED"),
        "{:?}",
        r.errors
    );
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert!(
        r.errors[0].contains(&xid) && r.errors[0].contains("unreadable"),
        "{:?}",
        r.errors
    );
    // Y's upload is listed once, for Y; it left X's set, X's unreadable record stayed in it.
    let listing = t.list_pending_tracking().await?;
    let listed: Vec<(&str, &str)> = listing
        .records
        .iter()
        .map(|r| (r.user_id.as_str(), r.upload_id.as_str()))
        .collect();
    assert_eq!(listed, [("yara", yid.as_str())]);
    assert_eq!(listing.unreadable.len(), 1, "{:?}", listing.unreadable);
    let x_set = w
        ._stack
        .dynamodb()
        .get_item()
        .table_name(&w._stack.uploads_table)
        .key("pk", S("PENDING#xavier".into()))
        .key("sk", S("PENDING".into()))
        .consistent_read(true)
        .send()
        .await?
        .item
        .context("X's pending item")?;
    let x_ids = x_set
        .get("uploads")
        .and_then(|v| v.as_ss().ok())
        .cloned()
        .unwrap_or_default();
    assert_eq!(x_ids, std::slice::from_ref(&xid));
    Ok(())
}
