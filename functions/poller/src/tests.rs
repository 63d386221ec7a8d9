//! The run on in-memory fakes (`shared::fakes`: the poller's store, zip-and-push's records, the
//! token store, the clusters queue) and the real in-process Mapillary simulator (frozen clock,
//! loopback): each upload is a real zip uploaded to the simulator and finished, so its cluster goes
//! through the simulator's stages. No AWS, no moto: the same paths as `tests/tests/poller.rs`,
//! in seconds.

use std::time::{Duration, Instant};

use mapillary_sim::defaults::{APP_ID, CLIENT_SECRET, DEMO_USER_ID, DEMO_USER_TOKEN, WEB_APP_CLIENT_TOKEN};
use mapillary_sim::{SimConfig, SimHandle, Simulator, World as SimWorld};
use relay_fixtures::{jpeg, track, TrackSpec};
use secrecy::SecretString;
use serde_json::{json, Value};
use shared::domain::linking::{ImageOutcome, LinkPath};
use shared::domain::tracking::{FeedErrorClass, FeedSource, OverallState};
use shared::fakes::{MemClaims, MemEvents, MemInbox, MemRepo, MemTokens, MemTracking};
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::client::{FileType, MapillaryClient};
use shared::mapillary::retry::RetryPolicy;
use shared::mapillary::Endpoints;
use shared::model::{
    upload_id, ClusterMessage, StoredToken, TrackingRecord, UploadImage, UploadRecord, UploadState,
};
use shared::ports::{ImageEntryStore, OutboxStore, RunLease, TrackingReader, UploadStore};
use time::OffsetDateTime;

use crate::clock::Clock;
use crate::config::Tunables;
use crate::deps::PollerDeps;
use crate::report::RunReport;
use crate::run::run_once;

const USER: &str = "user-1";

pub(crate) type TestDeps = PollerDeps<MemTracking, MemRepo, MemTokens, MemInbox, MemClaims, MemEvents>;

pub(crate) struct World {
    pub(crate) sim: SimHandle,
    pub(crate) deps: TestDeps,
    pub(crate) client: MapillaryClient,
    pub(crate) http: reqwest::Client,
}

/// One of our users with a Mapillary token.
struct Account {
    ours: String,
    token: String,
}

impl Account {
    /// The seeded demo user as [`USER`].
    fn demo() -> Self {
        Self {
            ours: USER.into(),
            token: DEMO_USER_TOKEN.into(),
        }
    }
}

pub(crate) fn sim_now(sim: &SimHandle) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(sim.sim().now_ms()) * 1_000_000).expect("sim time")
}

/// The simulator's default world (`seed-2022`) and a poller configured as deployed: with the web-app
/// feed token (the local stack's MAPILLARY_FEED_TOKEN).
async fn world() -> World {
    world_with(Some(WEB_APP_CLIENT_TOKEN)).await
}

/// A world whose poller calls the feed with `feed_token` first (the web-app token), if given, against
/// the simulator's default world (`seed-2022`). The test uploads are the zips the relay makes, so every
/// world accepts them; tests that need another world switch to it ([`World::set_world`]) or start in it
/// ([`world_in`]).
async fn world_with(feed_token: Option<&str>) -> World {
    world_in(SimConfig::frozen(), feed_token).await
}

/// [`world_with`] on a simulator started with `cfg`.
pub(crate) async fn world_in(cfg: SimConfig, feed_token: Option<&str>) -> World {
    let sim = Simulator::start(cfg, "127.0.0.1:0")
        .await
        .expect("simulator starts");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client");
    let client = MapillaryClient::new(
        Endpoints::under(sim.base_url()),
        http.clone(),
        RetryPolicy::fast(),
    );
    let tokens = MemTokens::new();
    tokens.insert(
        USER,
        StoredToken {
            access_token: SecretString::from(DEMO_USER_TOKEN),
            refresh_token: None,
            expires_at: None,
            mapillary_user_id: Some(DEMO_USER_ID.into()),
            username: None,
            updated_at: OffsetDateTime::now_utc(),
        },
    );
    let uploads = MemRepo::new();
    let deps = PollerDeps {
        tracking: MemTracking::over(&uploads),
        uploads,
        tokens,
        inbox: MemInbox::default(),
        claims: MemClaims::new(),
        events: MemEvents::new(),
        webhooks: shared::adapters::webhook_http::WebhookSender::new(shared::webhook::WebhookPolicy {
            allow_local: true,
            ..Default::default()
        }),
        mapillary: MapillaryApp::new(client.clone(), APP_ID, SecretString::from(CLIENT_SECRET)),
        feed_token: feed_token.map(SecretString::from),
        tunables: Tunables::default(),
        clock: Clock::manual(sim_now(&sim)),
    };
    let w = World {
        sim,
        deps,
        client,
        http,
    };
    // As documented above: the simulator's default world is strict about mapillary_tools' archive
    // comment, which the test uploads' plain zips do not carry.
    w.set_world(SimWorld::Lenient).await;
    w
}

impl World {
    /// Upload `n` images (a straight track, 2 s and 8 m apart) as one zip to the simulator, finish
    /// it, write what zip-and-push would have written and put its cluster message on the inbox.
    /// Returns the upload id.
    async fn upload(&self, seq: &str, n: usize, lat: f64, lon: f64) -> String {
        self.upload_as(&Account::demo(), seq, n, lat, lon).await
    }

    /// [`Self::upload`] as `account`.
    async fn upload_as(&self, account: &Account, seq: &str, n: usize, lat: f64, lon: f64) -> String {
        let user = account.ours.as_str();
        let mut t = TrackSpec::new(lat, lon, time::macros::datetime!(2024-04-20 08:00:00 UTC));
        t.interval_ms = 2000;
        t.step_m = 8.0;
        t.altitude = Some(120.0);
        let specs = track(n, &t);
        // The zip the relay makes (MAP* descriptions, mapillary_tools' comment): a strict world takes it.
        let originals: Vec<Vec<u8>> = specs.iter().map(jpeg).collect();
        let zip = shared::domain::toolszip::tools_zip(&originals).expect("tools zip");
        let bytes = bytes::Bytes::from(zip);
        let total = bytes.len() as u64;
        let token = SecretString::from(account.token.clone());
        let key = format!("mly_relay_{user}_{seq}.zip");
        let report = self
            .client
            .upload_resumable(&token, &key, total, |off| {
                let b = bytes.slice(usize::try_from(off).expect("offset")..);
                futures::stream::iter([Ok::<_, std::io::Error>(b)])
            })
            .await
            .expect("upload");
        let cluster = self
            .client
            .finish_upload(&token, &report.handle, FileType::Zip, None)
            .await
            .expect("finish");
        let id = upload_id(user, seq, 0);
        let now = sim_now(&self.sim);
        let repo = &self.deps.uploads;
        repo.put_upload(&UploadRecord {
            user_id: user.into(),
            sequence_id: seq.into(),
            upload_id: id.clone(),
            index: 0,
            state: UploadState::HandedOff,
            session_key: key,
            total_len: total,
            image_count: u32::try_from(n).expect("count"),
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
        .await
        .expect("upload record");
        let images: Vec<UploadImage> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| UploadImage {
                upload_id: id.clone(),
                index: u32::try_from(i).expect("index"),
                key: format!("sequences/{user}/{seq}/img_{i:04}.jpg"),
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
        repo.put_images(&images).await.expect("image entries");
        let msg = ClusterMessage {
            upload_id: id.clone(),
            user_id: user.into(),
            sequence_id: seq.into(),
            cluster_id: cluster,
        };
        self.deps
            .inbox
            .send(serde_json::to_string(&msg).expect("message"));
        id
    }

    pub(crate) async fn admin(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.sim.admin_url()))
            .json(&body)
            .send()
            .await
            .expect("admin request");
        assert!(resp.status().is_success(), "admin {path}: {}", resp.status());
        resp.json().await.unwrap_or(Value::Null)
    }

    /// Switch the simulator to `world` (its switches only; state and clock stay).
    async fn set_world(&self, world: SimWorld) {
        let v = self
            .admin(
                reqwest::Method::POST,
                "/world",
                json!({"world": world.to_string()}),
            )
            .await;
        assert_eq!(v["world"], world.to_string(), "{v}");
    }

    /// A new simulator user with a refreshable OAuth token, connected as our user `ours`.
    async fn account(&self, ours: &str, username: &str) -> Account {
        let u = self
            .admin(
                reqwest::Method::POST,
                "/users",
                json!({"username": username, "oauth": true}),
            )
            .await;
        let token = u["access_token"].as_str().expect("token").to_string();
        self.deps.tokens.insert(
            ours,
            StoredToken {
                access_token: SecretString::from(token.clone()),
                refresh_token: None,
                expires_at: None,
                mapillary_user_id: Some(u["id"].as_str().expect("id").to_string()),
                username: Some(username.into()),
                updated_at: OffsetDateTime::now_utc(),
            },
        );
        Account {
            ours: ours.into(),
            token,
        }
    }

    /// Requests the simulator logged for `path` since the last [`Self::clear_requests`].
    async fn requests(&self, path: &str) -> Vec<Value> {
        let v = self.admin(reqwest::Method::GET, "/requests", Value::Null).await;
        let list = v
            .as_array()
            .or_else(|| v["requests"].as_array())
            .cloned()
            .unwrap_or_default();
        list.into_iter()
            .filter(|r| r["path"].as_str() == Some(path))
            .collect()
    }

    async fn clear_requests(&self) {
        self.admin(reqwest::Method::DELETE, "/requests", Value::Null)
            .await;
    }

    /// The stored token of our user `ours`, as text.
    async fn stored_token(&self, ours: &str) -> String {
        use secrecy::ExposeSecret;
        use shared::ports::TokenStore;
        let t = self.deps.tokens.load(ours).await.expect("store").expect("token");
        t.access_token.expose_secret().to_string()
    }

    /// Advance the simulator and the poller's clock together.
    pub(crate) fn advance(&self, seconds: i64) {
        self.sim.advance_clock(seconds);
        self.deps.clock.set_ms(self.sim.sim().now_ms());
    }

    async fn run(&self) -> RunReport {
        run_once(&self.deps, Instant::now() + Duration::from_secs(60)).await
    }

    pub(crate) async fn record(&self, id: &str) -> TrackingRecord {
        self.deps
            .tracking
            .get_tracking(id)
            .await
            .expect("store")
            .expect("tracked")
    }
}

/// Past every stage of the simulator's default plan (60 s, 600 s, 1800 s, 3600 s).
const ALL_STAGES_S: i64 = 7000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_goes_from_the_inbox_to_a_finished_record_with_links() {
    let w = world().await;
    let id = w.upload("s1", 5, 48.2, 16.37).await;

    let r = w.run().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        (r.intake.received, r.intake.created, r.intake.deleted),
        (1, 1, 1),
        "{r:?}"
    );
    assert!(w.deps.inbox.is_empty(), "the message is deleted after the write");
    assert_eq!((r.users, r.checked, r.written), (1, 1, 1), "{r:?}");
    let rec = w.record(&id).await;
    assert_eq!(rec.tracked.state, OverallState::InProgress);
    assert_eq!(rec.mapillary_user_id.as_deref(), Some(DEMO_USER_ID));
    assert!(rec.linked_via.is_none());

    w.advance(ALL_STAGES_S);
    let r = w.run().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        (r.linked_feed, r.linked_tiles, r.feed_unusable_users, r.written),
        (1, 0, 0, 1),
        "{r:?}"
    );
    assert!(
        r.transitions.iter().any(|(u, t)| u == &id && t.field == "state"),
        "{r:?}"
    );
    let rec = w.record(&id).await;
    assert_eq!(rec.tracked.state, OverallState::Finished);
    assert!(rec.tracked.stages.all_finished());
    assert_eq!(rec.linked_via, Some(LinkPath::ActivityFeed));
    assert_eq!((rec.linked_count, rec.dropped_count), (5, 0));
    assert_eq!(rec.sequence_ids.len(), 1);
    assert_eq!(rec.next_check_at, None, "final records are not polled again");
    let links = w.deps.tracking.list_links(&id).await.expect("links");
    assert_eq!(links.len(), 5);
    for (k, l) in links.iter().enumerate() {
        assert_eq!(l.index as usize, k);
        assert_eq!(l.via, LinkPath::ActivityFeed);
        match &l.outcome {
            ImageOutcome::Linked { sequence_id, .. } => assert_eq!(sequence_id, &rec.sequence_ids[0]),
            other => panic!("not linked: {other:?}"),
        }
    }
    let st = w.deps.tracking.snapshot();
    assert!(st.pending.values().all(|s| s.is_empty()), "{:?}", st.pending);
    assert_eq!(st.health.map(|h| h.healthy), Some(true));
    assert_eq!(st.lease, None, "the run gave its lease back");

    // Final: a further run finds nothing to do and writes nothing.
    let r = w.run().await;
    assert_eq!((r.users, r.written), (0, 0), "{r:?}");
    assert_eq!(w.record(&id).await, rec);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_feed_falls_back_to_coverage_tiles_and_marks_the_feed_degraded() {
    let w = world().await;
    let id = w.upload("s1", 6, 40.4168, -3.7038).await;
    w.run().await;
    w.advance(ALL_STAGES_S);
    w.admin(
        reqwest::Method::POST,
        "/faults",
        json!({"path": "/graph/graphql", "action": {"kind": "graphql_error", "message": "Unknown document"}}),
    )
    .await;

    let r = w.run().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        (r.feed_unusable_users, r.linked_tiles, r.linked_feed),
        (1, 1, 0),
        "{r:?}"
    );
    let rec = w.record(&id).await;
    assert_eq!(
        rec.tracked.state,
        OverallState::Finished,
        "in the tiles: all stages finished"
    );
    assert_eq!(rec.linked_via, Some(LinkPath::CoverageTiles));
    assert_eq!((rec.linked_count, rec.dropped_count), (6, 0));
    let links = w.deps.tracking.list_links(&id).await.expect("links");
    assert_eq!(links.len(), 6);
    assert!(links
        .iter()
        .all(|l| l.via == LinkPath::CoverageTiles && matches!(l.outcome, ImageOutcome::Linked { .. })));
    let health = w.deps.tracking.snapshot().health.expect("feed health written");
    assert!(!health.healthy && health.degraded_since.is_some(), "{health:?}");
    assert!(
        health
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("Unknown document"),
        "{health:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coverage_tiles_only_match_sequences_the_user_created() {
    // Issue 15, item 7: the tiles show everyone's images. Here the images at our upload's places
    // and times were pushed by another Mapillary account: Plan A must not take them for ours.
    let w = world().await;
    let resp = w
        .http
        .post(format!("{}/users", w.sim.admin_url()))
        .json(&json!({"username": "someone_else", "oauth": true}))
        .send()
        .await
        .expect("admin users");
    assert!(resp.status().is_success());
    let other: Value = resp.json().await.expect("user JSON");
    let other_token = other["access_token"].as_str().expect("token").to_string();
    assert_ne!(other["id"].as_str(), Some(DEMO_USER_ID));
    let id = w
        .upload_as(
            &Account {
                ours: USER.into(),
                token: other_token,
            },
            "s1",
            6,
            40.4168,
            -3.7038,
        )
        .await;
    w.run().await;
    w.advance(ALL_STAGES_S);
    w.admin(
        reqwest::Method::POST,
        "/faults",
        json!({"path": "/graph/graphql", "action": {"kind": "graphql_error", "message": "Unknown document"}}),
    )
    .await;
    let r = w.run().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.feed_unusable_users, r.linked_tiles), (1, 0), "{r:?}");
    let rec = w.record(&id).await;
    assert_eq!(rec.linked_via, None);
    assert_eq!(rec.linked_count, 0);
    assert!(w.deps.tracking.list_links(&id).await.expect("links").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_held_by_another_run_keeps_this_run_out() {
    let w = world().await;
    let id = w.upload("s1", 2, 48.3, 16.4).await;
    let now = OffsetDateTime::now_utc();
    let t = &w.deps.tracking;
    assert!(t
        .acquire_run_lease("other-run", now, now + time::Duration::minutes(1))
        .await
        .expect("lease"));

    let r = w.run().await;
    assert!(r.lease_held, "{r:?}");
    assert_eq!((r.intake.received, r.users, r.written), (0, 0, 0), "{r:?}");
    assert_eq!(w.deps.inbox.len(), 1, "the message stays queued");
    assert!(t.get_tracking(&id).await.expect("store").is_none());
    assert_eq!(t.snapshot().lease.map(|l| l.owner).as_deref(), Some("other-run"));

    t.release_run_lease("other-run").await.expect("release");
    let r = w.run().await;
    assert!(!r.lease_held && r.intake.created == 1 && r.written == 1, "{r:?}");
    assert!(t.get_tracking(&id).await.expect("store").is_some());
    assert_eq!(t.snapshot().lease, None, "the run gave its lease back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_past_its_deadline_starts_no_work_and_the_next_run_continues() {
    let w = world().await;
    let id = w.upload("s1", 3, 48.21, 16.38).await;
    w.run().await;
    let before = w.record(&id).await;
    assert_eq!(before.tracked.state, OverallState::InProgress);
    w.advance(ALL_STAGES_S);
    let second = w.upload("s2", 2, 48.25, 16.40).await;

    // Deadline already passed: no intake, the user's turn is cut off before any request.
    let r = run_once(&w.deps, Instant::now()).await;
    assert!(r.cut_off, "{r:?}");
    assert_eq!(
        (r.intake.received, r.checked, r.written, r.linked_feed),
        (0, 0, 0, 0),
        "{r:?}"
    );
    assert_eq!(w.deps.inbox.len(), 1, "the second message stays queued");
    assert_eq!(w.record(&id).await, before, "nothing written");
    assert_eq!(
        w.deps.tracking.snapshot().lease,
        None,
        "the lease is released all the same"
    );

    // The next run picks everything up.
    let r = w.run().await;
    assert!(!r.cut_off && r.errors.is_empty(), "{r:?}");
    assert_eq!((r.intake.created, r.linked_feed), (1, 1), "{r:?}");
    let rec = w.record(&id).await;
    assert_eq!(rec.tracked.state, OverallState::Finished);
    assert_eq!(rec.linked_via, Some(LinkPath::ActivityFeed));
    assert_eq!(w.record(&second).await.tracked.state, OverallState::InProgress);
}

// ------------------------------------------------------------------ the feed in every world

/// `/graph/token` requests seen (any refresh).
async fn refreshes(w: &World) -> usize {
    w.requests("/graph/token").await.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_2022_with_the_web_app_token_reads_the_feed_with_it() {
    let w = world_with(Some(WEB_APP_CLIENT_TOKEN)).await;
    let id = w.upload("s1", 4, 48.2, 16.37).await;
    w.set_world(SimWorld::Seed2022).await;
    w.clear_requests().await;

    let r = w.run().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        (
            r.feed_web_app_users,
            r.feed_user_token_users,
            r.feed_unusable_users
        ),
        (1, 0, 0),
        "{r:?}"
    );
    w.advance(ALL_STAGES_S);
    let r = w.run().await;
    assert_eq!((r.linked_feed, r.linked_tiles), (1, 0), "{r:?}");
    let rec = w.record(&id).await;
    assert_eq!(rec.tracked.state, OverallState::Finished);
    assert_eq!(rec.linked_via, Some(LinkPath::ActivityFeed));
    let feed = rec.tracked.feed.expect("feed state");
    assert_eq!((feed.source, feed.error_class), (FeedSource::WebAppToken, None));
    // Every feed call carried the web-app client token, never the user's.
    let calls = w.requests("/graph/graphql").await;
    assert!(!calls.is_empty());
    assert!(
        calls.iter().all(|c| c["status"] == 200 && c["user_id"].is_null()),
        "{calls:?}"
    );
    let h = w.deps.tracking.snapshot().health.expect("summary");
    assert!(h.healthy, "{h:?}");
    assert_eq!(
        (h.users_web_app_token, h.users_user_token, h.users_coverage_tiles),
        (1, 0, 0)
    );
    assert_eq!(refreshes(&w).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_2022_without_a_web_app_token_uses_tiles_for_the_refused_user_and_never_refreshes() {
    let w = world_with(None).await;
    let id = w.upload("s1", 5, 40.4168, -3.7038).await;
    let before = w.stored_token(USER).await;
    w.set_world(SimWorld::Seed2022).await;
    w.clear_requests().await;

    let r = w.run().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.feed_unusable_users, r.feed_user_token_users), (1, 0), "{r:?}");
    // One feed call per run: the refusal is final for this run, no refresh, no second try.
    assert_eq!(w.requests("/graph/graphql").await.len(), 1);
    let rec = w.record(&id).await;
    let feed = rec.tracked.feed.clone().expect("feed state");
    assert_eq!(
        (feed.source, feed.error_class),
        (FeedSource::CoverageTiles, Some(FeedErrorClass::Refused))
    );

    w.advance(ALL_STAGES_S);
    let r = w.run().await;
    assert_eq!((r.linked_tiles, r.linked_feed), (1, 0), "{r:?}");
    let rec = w.record(&id).await;
    assert_eq!(rec.tracked.state, OverallState::Finished);
    assert_eq!(rec.linked_via, Some(LinkPath::CoverageTiles));
    assert_eq!((rec.linked_count, rec.dropped_count), (5, 0));
    assert_eq!(
        rec.tracked.feed.map(|f| f.since),
        Some(feed.since),
        "same state, same since"
    );
    assert_eq!(refreshes(&w).await, 0, "a feed refusal never refreshes the token");
    assert_eq!(w.stored_token(USER).await, before);
    let h = w.deps.tracking.snapshot().health.expect("summary");
    assert!(!h.healthy, "nobody could read the feed: {h:?}");
    assert_eq!(h.last_error_class, Some(FeedErrorClass::Refused));
    assert_eq!(
        (h.users_web_app_token, h.users_user_token, h.users_coverage_tiles),
        (0, 0, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_for_one_user_keeps_the_others_on_the_feed_and_the_summary_healthy() {
    // Per-user feed health is world-independent, but only the lenient world lets users' own tokens
    // read the feed (the path where one user can be refused while another is not); seed-2022's
    // refusal of every user token is covered by the test above.
    let w = world_in(SimConfig::world(SimWorld::Lenient), None).await;
    let bob = w.account("user-2", "bob_m").await;
    let mine = w.upload("s1", 3, 48.2, 16.37).await;
    let bobs = w.upload_as(&bob, "s1", 3, 40.4168, -3.7038).await;
    let bob_before = w.stored_token("user-2").await;
    // Lenient world (any token reads the feed), but the feed refuses bob's token.
    w.admin(
        reqwest::Method::POST,
        "/faults",
        json!({"path": "/graph/graphql", "user": "bob_m", "action": {"kind": "unauthorized"}}),
    )
    .await;
    w.clear_requests().await;

    w.run().await;
    w.advance(ALL_STAGES_S);
    let r = w.run().await;
    assert_eq!(
        (
            r.feed_user_token_users,
            r.feed_unusable_users,
            r.linked_feed,
            r.linked_tiles
        ),
        (1, 1, 1, 1),
        "{r:?}"
    );
    assert_eq!(w.record(&mine).await.linked_via, Some(LinkPath::ActivityFeed));
    let b = w.record(&bobs).await;
    assert_eq!(b.linked_via, Some(LinkPath::CoverageTiles));
    assert_eq!(b.tracked.state, OverallState::Finished);
    assert_eq!(
        b.tracked.feed.map(|f| (f.source, f.error_class)),
        Some((FeedSource::CoverageTiles, Some(FeedErrorClass::Refused)))
    );
    let h = w.deps.tracking.snapshot().health.expect("summary");
    assert!(h.healthy && h.degraded_since.is_none(), "{h:?}");
    assert_eq!((h.users_user_token, h.users_coverage_tiles), (1, 1));
    assert_eq!(h.last_error_class, Some(FeedErrorClass::Refused));
    assert_eq!(refreshes(&w).await, 0);
    assert_eq!(w.stored_token("user-2").await, bob_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_web_app_token_falls_back_to_the_users_own_token() {
    // A web-app token the feed does not take (unknown to the simulator: 401 code 190 in every
    // world); the lenient world's feed takes the user's own token, which is tried next.
    // Lenient on purpose: the fallback to the user's token only succeeds where user tokens read the feed.
    let w = world_in(
        SimConfig::world(SimWorld::Lenient),
        Some("MLY|999|not-the-web-app"),
    )
    .await;
    let id = w.upload("s1", 2, 48.2, 16.37).await;
    w.clear_requests().await;

    let r = w.run().await;
    assert_eq!((r.feed_user_token_users, r.feed_unusable_users), (1, 0), "{r:?}");
    let calls = w.requests("/graph/graphql").await;
    assert_eq!(
        calls.iter().map(|c| c["status"].as_i64()).collect::<Vec<_>>(),
        [Some(401), Some(200)],
        "web-app token, then the user's: {calls:?}"
    );
    let feed = w.record(&id).await.tracked.feed.expect("feed state");
    assert_eq!(
        (feed.source, feed.error_class),
        (FeedSource::UserToken, Some(FeedErrorClass::Refused))
    );
    let h = w.deps.tracking.snapshot().health.expect("summary");
    assert!(h.healthy, "{h:?}");
    assert_eq!(refreshes(&w).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_drift_is_read_node_by_node() {
    let w = world_with(Some(WEB_APP_CLIENT_TOKEN)).await;
    let good = w.upload("s1", 3, 48.2, 16.37).await;
    w.admin(
        reqwest::Method::POST,
        "/plans/next",
        json!({"fail": {"stage": 2, "error_code": "SIM_PROCESSING_FAILED"}}),
    )
    .await;
    let failing = w.upload("s2", 2, 48.3, 16.40).await;
    w.set_world(SimWorld::FeedDrift).await;

    // Stage 1 done: the next stage reads NOT_STARTED, the ones after null.
    w.advance(61);
    let r = w.run().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.feed_web_app_users, r.feed_unusable_users), (1, 0), "{r:?}");
    assert!(r.feed_skipped_nodes >= 1, "the node without cluster_id: {r:?}");
    assert!(r.feed_graphql_errors >= 1, "the errors beside the data: {r:?}");
    let rec = w.record(&good).await;
    assert_eq!(rec.tracked.state, OverallState::InProgress);
    let stage = |r: &TrackingRecord, k: usize| {
        let s = &r.tracked.stages;
        [&s.ingestion, &s.image_processing, &s.map_data, &s.map_update][k]
            .as_ref()
            .map(|v| v.as_str().to_string())
    };
    assert_eq!(stage(&rec, 0).as_deref(), Some("FINISHED"));
    assert_eq!(stage(&rec, 1).as_deref(), Some("IN_PROGRESS"));
    assert_eq!(
        stage(&rec, 2).as_deref(),
        Some("NOT_STARTED"),
        "unknown values verbatim"
    );
    assert_eq!(stage(&rec, 3), None, "null stays unknown");

    // Past every stage: the good upload finishes and links through the drifted feed; the failing
    // one shows FAILURE verbatim with its error code, which alone does not fail it.
    w.advance(ALL_STAGES_S);
    let r = w.run().await;
    assert_eq!(
        (r.linked_feed, r.linked_tiles, r.feed_unusable_users),
        (1, 0, 0),
        "{r:?}"
    );
    let rec = w.record(&good).await;
    assert_eq!(rec.tracked.state, OverallState::Finished);
    assert_eq!(rec.linked_via, Some(LinkPath::ActivityFeed));
    assert_eq!((rec.linked_count, rec.dropped_count), (3, 0));
    let bad = w.record(&failing).await;
    assert_eq!(stage(&bad, 1).as_deref(), Some("FAILURE"));
    assert_eq!(bad.tracked.error_code.as_deref(), Some("SIM_PROCESSING_FAILED"));
    assert_eq!(
        bad.tracked.state,
        OverallState::InProgress,
        "{:?}",
        bad.tracked.state
    );
    assert!(w.deps.tracking.snapshot().health.expect("summary").healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_gone_links_through_tiles_and_says_the_feed_is_unavailable() {
    let w = world_with(Some(WEB_APP_CLIENT_TOKEN)).await;
    let id = w.upload("s1", 6, 40.4168, -3.7038).await;
    w.set_world(SimWorld::FeedGone).await;
    w.clear_requests().await;

    let r = w.run().await;
    assert_eq!(r.feed_unusable_users, 1, "{r:?}");
    // Gone for the web-app token is gone for every token: the user's is not tried.
    assert_eq!(w.requests("/graph/graphql").await.len(), 1);
    w.advance(ALL_STAGES_S);
    let r = w.run().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.linked_tiles, r.linked_feed), (1, 0), "{r:?}");
    let rec = w.record(&id).await;
    assert_eq!(rec.tracked.state, OverallState::Finished);
    assert_eq!(rec.linked_via, Some(LinkPath::CoverageTiles));
    assert_eq!((rec.linked_count, rec.dropped_count), (6, 0));
    let feed = rec.tracked.feed.expect("feed state");
    assert_eq!(
        (feed.source, feed.error_class),
        (FeedSource::CoverageTiles, Some(FeedErrorClass::Gone))
    );
    let h = w.deps.tracking.snapshot().health.expect("summary");
    assert!(!h.healthy && h.degraded_since.is_some(), "{h:?}");
    assert_eq!(h.last_error_class, Some(FeedErrorClass::Gone));
    assert!(
        h.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("PersistedQueryNotFound"),
        "{h:?}"
    );
    assert_eq!(refreshes(&w).await, 0);
}

/// A world whose simulator takes the test uploads' plain zips (the default world is strict about
/// mapillary_tools' archive comment).
async fn lenient_world() -> World {
    let w = world().await;
    w.set_world(SimWorld::Lenient).await;
    w
}

/// The events published for `id`, de-duplicated by event id (a copy must equal the first), in
/// publish order.
fn events_of(w: &World, id: &str) -> Vec<shared::events::RelayEvent> {
    let mut seen: std::collections::BTreeMap<String, shared::events::RelayEvent> = Default::default();
    let mut out = Vec::new();
    for ev in w.deps.events.published() {
        if ev.detail["upload_id"].as_str() != Some(id) {
            continue;
        }
        match seen.get(&ev.id) {
            Some(first) => assert_eq!(
                first.detail["change"], ev.detail["change"],
                "a duplicate carries the same change"
            ),
            None => {
                seen.insert(ev.id.clone(), ev.clone());
                out.push(ev);
            }
        }
    }
    out
}

/// The record's history as the events it must have produced: (id, detail-type, field, to).
fn expected_events(rec: &TrackingRecord) -> Vec<(String, String, String, Option<String>)> {
    rec.history
        .iter()
        .enumerate()
        .map(|(k, t)| {
            (
                shared::events::event_id(&rec.upload_id, k),
                shared::events::detail_type(&t.field).to_string(),
                t.field.clone(),
                t.to.clone(),
            )
        })
        .collect()
}

fn as_tuples(evs: &[shared::events::RelayEvent]) -> Vec<(String, String, String, Option<String>)> {
    evs.iter()
        .map(|e| {
            (
                e.id.clone(),
                e.detail_type.clone(),
                e.detail["change"]["field"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e.detail["change"]["to"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// The stage fields that reached FINISHED, in the order their events were published.
fn finished_stages(evs: &[shared::events::RelayEvent]) -> Vec<String> {
    evs.iter()
        .filter(|e| e.detail_type == shared::events::STAGE_CHANGED && e.detail["change"]["to"] == "FINISHED")
        .filter_map(|e| e.detail["change"]["field"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_recorded_change_is_published_once_in_order_through_the_four_stages() {
    let w = lenient_world().await;
    let id = w.upload("s1", 4, 48.2, 16.37).await;
    // Past each of the simulator's stage deadlines (60 s, then 600 s, 1800 s, 3600 s more): one stage per run.
    let mut published_per_run = Vec::new();
    for step in [0, 100, 600, 1800, 3600] {
        w.advance(step);
        let r = w.run().await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        published_per_run.push(r.events_published);
    }
    let rec = w.record(&id).await;
    assert_eq!(rec.tracked.state, OverallState::Finished);
    assert!(
        rec.pending_events.is_empty(),
        "the outbox is cleared after publishing"
    );
    let evs = events_of(&w, &id);
    assert_eq!(
        w.deps.events.published().len(),
        evs.len(),
        "no duplicates when nothing failed"
    );
    assert_eq!(
        as_tuples(&evs),
        expected_events(&rec),
        "exactly the recorded changes, in order"
    );
    assert_eq!(
        finished_stages(&evs),
        shared::events::STAGE_FIELDS.map(String::from).to_vec(),
        "the four stages finish in processing order"
    );
    assert!(
        evs.iter().any(|e| e.detail_type == shared::events::STATE_CHANGED
            && e.detail["change"]["to"] == "FINISHED"
            && e.detail["mapillary"]["state"] == "FINISHED"),
        "{evs:?}"
    );
    assert!(
        published_per_run.iter().filter(|n| **n > 0).count() >= 4,
        "{published_per_run:?}"
    );
    for e in &evs {
        assert_eq!(e.detail["event_id"], e.id.as_str());
        assert_eq!(e.detail["user_id"], USER);
        assert_eq!(e.detail["sequence_id"], "s1");
        assert_eq!(e.detail["mapillary"]["stages"].as_array().map(Vec::len), Some(4));
    }
    // Nothing changes any more: nothing more is published.
    let before = w.deps.events.published().len();
    w.advance(600);
    w.run().await;
    assert_eq!(w.deps.events.published().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_dies_between_its_write_and_its_publish_loses_no_event() {
    let w = lenient_world().await;
    let id = w.upload("s1", 4, 48.2, 16.37).await;
    w.run().await;
    w.advance(100);
    // The run writes its changes, then its publish fails (as if it died right after the write).
    w.deps.events.fail_next(1);
    let r = w.run().await;
    assert_eq!(r.events_published, 0, "{r:?}");
    assert!(
        r.errors.iter().any(|e| e.contains("publishing events failed")),
        "{:?}",
        r.errors
    );
    let rec = w.record(&id).await;
    assert!(
        !rec.pending_events.is_empty(),
        "the changes' events wait in the outbox"
    );
    assert_eq!(
        w.deps
            .tracking
            .list_outbox()
            .await
            .expect("outbox")
            .tracking
            .len(),
        1,
        "the outbox index finds the record"
    );
    let stranded: Vec<String> = rec.pending_events.iter().map(|e| e.id.clone()).collect();
    // The next run publishes them first, even though nothing new happens for it.
    let r = w.run().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.events_published, stranded.len(), "{r:?}");
    let ids: Vec<String> = events_of(&w, &id).into_iter().map(|e| e.id).collect();
    for s in &stranded {
        assert!(ids.contains(s), "{s} published");
    }
    // Published, then died before the outbox was cleared: published again, same ids (simulated by
    // putting the cleared events back as the crash would have left them).
    let mut rec = w.record(&id).await;
    assert!(rec.pending_events.is_empty());
    let replay = shared::events::outbox_events(&id, 0, &rec.history[..1]);
    rec.pending_events = replay.clone();
    w.deps
        .tracking
        .state
        .lock()
        .expect("lock")
        .records
        .insert(id.clone(), rec);
    let r = w.run().await;
    assert_eq!(r.events_published, 1, "{r:?}");
    // Through every stage: the de-duplicated events are exactly the record's changes, in order.
    for step in [600, 1800, 3600] {
        w.advance(step);
        let r = w.run().await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }
    let rec = w.record(&id).await;
    assert_eq!(rec.tracked.state, OverallState::Finished);
    let evs = events_of(&w, &id);
    assert_eq!(as_tuples(&evs), expected_events(&rec), "none lost, none invented");
    assert_eq!(
        w.deps.events.published().len(),
        evs.len() + 1,
        "exactly one duplicate (the replayed one), with its id"
    );
    assert!(w.deps.tracking.list_outbox().await.expect("outbox").is_empty());
}

/// Give `id`'s upload record (written HANDED_OFF by [`World::upload`]) the upload-state events
/// zip-and-push writes on its way there (null → PENDING … → HANDED_OFF): 5 event items.
async fn with_upload_state_events(w: &World, id: &str) {
    use shared::events::{record_upload_state, set_upload_state};
    let now = sim_now(&w.sim);
    let mut up = w
        .deps
        .uploads
        .snapshot()
        .uploads
        .into_values()
        .find(|u| u.upload_id == id)
        .expect("upload record");
    up.state = UploadState::Pending;
    record_upload_state(&mut up, None, now);
    for s in [
        UploadState::Uploading,
        UploadState::Finishing,
        UploadState::Uploaded,
        UploadState::HandedOff,
    ] {
        set_upload_state(&mut up, s, now, true);
    }
    w.deps
        .uploads
        .put_upload(&up)
        .await
        .expect("upload record with its events");
}

/// The upload-state changes zip-and-push makes on the way to HANDED_OFF, as (id, detail-type,
/// field, to).
fn handed_off_events(id: &str) -> Vec<(String, String, String, Option<String>)> {
    ["PENDING", "UPLOADING", "FINISHING", "UPLOADED", "HANDED_OFF"]
        .iter()
        .enumerate()
        .map(|(k, to)| {
            (
                shared::events::upload_event_id(id, k as u32),
                shared::events::UPLOAD_STATE_CHANGED.to_string(),
                shared::events::UPLOAD_STATE_FIELD.to_string(),
                Some(to.to_string()),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploads_own_state_changes_are_published_before_its_mapillary_stages() {
    let w = lenient_world().await;
    let id = w.upload("s1", 4, 48.2, 16.37).await;
    with_upload_state_events(&w, &id).await;
    for step in [0, 100, 600, 1800, 3600] {
        w.advance(step);
        let r = w.run().await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }
    let rec = w.record(&id).await;
    assert_eq!(rec.tracked.state, OverallState::Finished);
    let evs = events_of(&w, &id);
    assert_eq!(w.deps.events.published().len(), evs.len(), "each once");
    let mut want = handed_off_events(&id);
    want.extend(expected_events(&rec));
    assert_eq!(
        as_tuples(&evs),
        want,
        "ours first, then Mapillary's, each in order"
    );
    let handed = &evs[4].detail;
    assert_eq!(handed["change"]["from"], "UPLOADED", "{handed}");
    assert_eq!(handed["upload"]["state"], "HANDED_OFF", "{handed}");
    assert_eq!(handed["upload"]["image_count"], 4, "{handed}");
    assert_eq!(handed["cluster_id"], rec.tracked.cluster_id.as_str(), "{handed}");
    assert!(handed.get("mapillary").is_none(), "{handed}");
    assert!(evs[0].detail["change"]["from"].is_null());
    assert!(
        w.deps.uploads.snapshot().upload_events.is_empty(),
        "published events are deleted"
    );
    assert!(w.deps.tracking.list_outbox().await.expect("outbox").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_an_uploads_own_events_cannot_be_published_its_mapillary_events_wait_too() {
    let w = lenient_world().await;
    let id = w.upload("s1", 4, 48.2, 16.37).await;
    with_upload_state_events(&w, &id).await;
    // Both publish steps of the run fail for the upload's own events (as a poller that dies after
    // its writes): its Mapillary changes are recorded, and held back behind them.
    w.deps.events.fail_next(2);
    let r = w.run().await;
    assert_eq!(r.events_published, 0, "{r:?}");
    let rec = w.record(&id).await;
    assert!(!rec.pending_events.is_empty(), "Mapillary's first changes wait");
    let waiting = w.deps.tracking.list_outbox().await.expect("outbox");
    assert_eq!((waiting.uploads.len(), waiting.tracking.len()), (5, 1));
    // The next run publishes both, ours first.
    let r = w.run().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let evs = events_of(&w, &id);
    let mut want = handed_off_events(&id);
    want.extend(expected_events(&w.record(&id).await));
    assert_eq!(as_tuples(&evs), want);
    assert!(w.deps.tracking.list_outbox().await.expect("outbox").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_bus_no_event_is_written() {
    let mut w = lenient_world().await;
    w.deps.events = MemEvents::disabled();
    let id = w.upload("s1", 3, 48.2, 16.37).await;
    w.run().await;
    w.advance(ALL_STAGES_S);
    w.run().await;
    let rec = w.record(&id).await;
    assert_eq!(rec.tracked.state, OverallState::Finished);
    assert!(rec.pending_events.is_empty());
    assert!(w.deps.events.published().is_empty());
}
