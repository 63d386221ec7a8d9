//! Status-change events end to end on the local stack (moto: the stack from `infra/template.yaml`
//! with its `RelayEventBus`, DynamoDB, SQS, EventBridge) and the in-process simulator: a rule on the
//! bus sends every `mapillary-relay` event to an SQS queue, as a subscriber would. The poller is
//! composed from the function's environment (`RELAY_EVENT_BUS` from the stack).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use integration_tests::moto::shared_moto;
use integration_tests::stack::{self, LocalStack, SimEndpoints};
use integration_tests::webhook_receiver::{Received, WebhookReceiver};
use mapillary_sim::defaults::{APP_ID, CLIENT_SECRET};
use mapillary_sim::{SimConfig, SimHandle, Simulator};
use poller::clock::Clock;
use poller::compose::{compose, ProductionPoller};
use poller::config::{Config, Tunables};
use poller::{run_once, RunReport};
use relay_fixtures::{jpeg, track, TrackSpec};
use secrecy::SecretString;
use serde_json::{json, Value};
use shared::adapters::events::EventBridgePublisher;
use shared::adapters::sqs::SqsClusterQueue;
use shared::adapters::webhook_http::WebhookSender;
use shared::domain::tracking::OverallState;
use shared::events::{
    detail_type, event_id, outbox_events, upload_event_id, SOURCE, STAGE_CHANGED, STAGE_FIELDS,
    UPLOAD_STATE_CHANGED, UPLOAD_STATE_FIELD,
};
use shared::mapillary::client::MapillaryClient;
use shared::mapillary::retry::RetryPolicy;
use shared::mapillary::Endpoints;
use shared::model::{
    upload_id, ClusterMessage, StoredToken, TrackingRecord, UploadImage, UploadRecord, UploadState,
};
use shared::ports::{
    ClusterQueue, ImageEntryStore, OutboxStore, TokenStore, TrackingReader, UploadReader, UploadStore,
    WebhookQueue,
};
use shared::webhook::WebhookPolicy;
use time::OffsetDateTime;

struct World {
    stack: LocalStack,
    /// The functions' environment (the status API is composed from it too).
    env: Vec<(String, String)>,
    sim: SimHandle,
    poller: ProductionPoller,
    client: MapillaryClient,
    http: reqwest::Client,
    /// The subscriber's queue (target of a rule on the relay's bus).
    events_queue: String,
}

fn sim_now(sim: &SimHandle) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(sim.sim().now_ms()) * 1_000_000).expect("time")
}

async fn world(tag: &str) -> Result<World> {
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
    let env = stack.lambda_env(&SimEndpoints::from_base(sim.base_url(), APP_ID, CLIENT_SECRET));
    let config = Config::from_lookup(|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))?;
    ensure!(
        config.event_bus.as_deref() == Some(stack.event_bus.as_str()),
        "RELAY_EVENT_BUS is the stack's bus: {:?}",
        config.event_bus
    );
    let mut poller = compose(&config, stack.sdk_config()).await?;
    poller.mapillary = poller.mapillary.with_retry_policy(RetryPolicy::fast());
    poller.tunables = Tunables::default();
    poller.clock = Clock::manual(sim_now(&sim));

    // The subscriber: a rule on the relay's bus for its source, an SQS queue as the target.
    let sqs = stack.sqs();
    let events_queue = sqs
        .create_queue()
        .queue_name(format!("{}-subscriber", stack.stack_name))
        .send()
        .await?
        .queue_url
        .context("queue url")?;
    let queue_arn = sqs
        .get_queue_attributes()
        .queue_url(&events_queue)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await?
        .attributes
        .and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::QueueArn).cloned())
        .context("queue arn")?;
    let eb = aws_sdk_eventbridge::Client::new(stack.sdk_config());
    eb.put_rule()
        .name("subscriber")
        .event_bus_name(&stack.event_bus)
        .event_pattern(json!({"source": [SOURCE]}).to_string())
        .send()
        .await?;
    eb.put_targets()
        .rule("subscriber")
        .event_bus_name(&stack.event_bus)
        .targets(
            aws_sdk_eventbridge::types::Target::builder()
                .id("queue")
                .arn(queue_arn)
                .build()?,
        )
        .send()
        .await?;
    let w = World {
        stack,
        env,
        sim,
        poller,
        client,
        http,
        events_queue,
    };
    // The test's plain zips are not mapillary_tools' (the default world checks the archive comment).
    let v = w
        .http
        .post(format!("{}/world", w.sim.admin_url()))
        .json(&json!({"world": "lenient"}))
        .send()
        .await?;
    ensure!(
        v.status().is_success(),
        "switching the simulator's world: {}",
        v.status()
    );
    Ok(w)
}

impl World {
    /// A simulator user connected as `ours`.
    async fn user(&self, ours: &str) -> Result<String> {
        let resp = self
            .http
            .post(format!("{}/users", self.sim.admin_url()))
            .json(&json!({"username": format!("{ours}_m"), "oauth": true}))
            .send()
            .await?;
        ensure!(resp.status().is_success(), "admin /users: {}", resp.status());
        let u: Value = resp.json().await?;
        let token = u["access_token"].as_str().context("token")?.to_string();
        self.poller
            .tokens
            .save(
                ours,
                &StoredToken {
                    access_token: SecretString::from(token.clone()),
                    refresh_token: None,
                    expires_at: None,
                    mapillary_user_id: None,
                    username: None,
                    updated_at: OffsetDateTime::now_utc(),
                },
            )
            .await?;
        Ok(token)
    }

    /// One zip of `n` images uploaded and finished at the simulator, what zip-and-push writes, and
    /// the cluster message. Returns the upload id.
    async fn upload(&self, ours: &str, token: &str, seq: &str, n: usize) -> Result<String> {
        let mut t = TrackSpec::new(48.2, 16.37, time::macros::datetime!(2024-04-20 08:00:00 UTC));
        t.interval_ms = 2000;
        t.step_m = 8.0;
        t.altitude = Some(120.0);
        let specs = track(n, &t);
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut zw = zip::ZipWriter::new(&mut buf);
            for (i, s) in specs.iter().enumerate() {
                zw.start_file(
                    format!("{i}.jpg"),
                    zip::write::SimpleFileOptions::default()
                        .compression_method(zip::CompressionMethod::Stored),
                )?;
                zw.write_all(&jpeg(s))?;
            }
            zw.finish()?;
        }
        let bytes = bytes::Bytes::from(buf.into_inner());
        let total = bytes.len() as u64;
        let token = SecretString::from(token.to_string());
        let key = format!("mly_relay_{ours}_{seq}.zip");
        let report = self
            .client
            .upload_resumable(&token, &key, total, |off| {
                let b = bytes.slice(usize::try_from(off).unwrap_or(0)..);
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
        let id = upload_id(ours, seq, 0);
        let now = sim_now(&self.sim);
        self.poller
            .uploads
            .put_upload(&UploadRecord {
                user_id: ours.into(),
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
                key: format!("sequences/{ours}/{seq}/img_{i:04}.jpg"),
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
        self.poller.uploads.put_images(&images).await?;
        SqsClusterQueue::new(self.stack.sqs(), &self.stack.clusters_queue_url)
            .send_cluster(&ClusterMessage {
                upload_id: id.clone(),
                user_id: ours.into(),
                sequence_id: seq.into(),
                cluster_id: cluster,
            })
            .await?;
        Ok(id)
    }

    /// A publisher whose bus cannot be reached (as a poller killed between its record write and
    /// its publish: the events stay in the outbox).
    fn dead_bus(&self) -> EventBridgePublisher {
        let dead = aws_sdk_eventbridge::Client::from_conf(
            aws_sdk_eventbridge::config::Builder::from(self.stack.sdk_config())
                .endpoint_url("http://127.0.0.1:9")
                .build(),
        );
        EventBridgePublisher::new(dead, Some(self.stack.event_bus.clone()))
    }

    fn advance(&self, seconds: i64) {
        self.sim.advance_clock(seconds);
        self.poller.clock.set_ms(self.sim.sim().now_ms());
    }

    async fn run(&self) -> RunReport {
        run_once(&self.poller, Instant::now() + Duration::from_secs(120)).await
    }

    /// The status API, composed from the functions' environment (KMS, DynamoDB of this stack),
    /// called in-process as `user` (dev identity header): `(status, JSON body)`.
    async fn api(&self, method: &str, path: &str, user: &str, body: Option<Value>) -> Result<(u16, Value)> {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let config = status_api::config::Config::from_lookup(|k| {
            self.env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })?;
        let mut deps = status_api::compose::compose(&config, self.stack.sdk_config()).await?;
        deps.settings.dev_auth_header = Some(http::HeaderName::from_static("x-relay-user"));
        let app = status_api::router(std::sync::Arc::new(deps));
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("x-relay-user", user)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            ))?;
        let resp = app.oneshot(req).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    /// Register `url` as `user`'s webhook through the API; the secret it answers.
    async fn register(&self, user: &str, url: &str) -> Result<String> {
        let (status, body) = self
            .api("PUT", "/v1/webhook", user, Some(json!({ "url": url })))
            .await?;
        ensure!(status == 200 || status == 201, "PUT /v1/webhook: {status} {body}");
        Ok(body["secret"].as_str().context("secret")?.to_string())
    }

    async fn webhook(&self, user: &str) -> Result<Value> {
        let (status, body) = self.api("GET", "/v1/webhook", user, None).await?;
        ensure!(status == 200, "GET /v1/webhook: {status} {body}");
        Ok(body)
    }

    async fn record(&self, id: &str) -> Result<TrackingRecord> {
        self.poller.tracking.get_tracking(id).await?.context("tracked")
    }

    /// Every message on the subscriber's queue now (received and deleted), as EventBridge delivered
    /// them.
    async fn drain_events(&self) -> Result<Vec<Value>> {
        let sqs = self.stack.sqs();
        let mut out = Vec::new();
        loop {
            let got = sqs
                .receive_message()
                .queue_url(&self.events_queue)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await?;
            let msgs = got.messages.unwrap_or_default();
            if msgs.is_empty() {
                return Ok(out);
            }
            for m in msgs {
                out.push(serde_json::from_str(m.body().unwrap_or_default())?);
                if let Some(h) = m.receipt_handle() {
                    sqs.delete_message()
                        .queue_url(&self.events_queue)
                        .receipt_handle(h)
                        .send()
                        .await?;
                }
            }
        }
    }
}

/// The record's history as events: (id, detail-type, field, to).
fn expected(rec: &TrackingRecord) -> Vec<(String, String, String, Option<String>)> {
    rec.history
        .iter()
        .enumerate()
        .map(|(k, t)| {
            (
                event_id(&rec.upload_id, k),
                detail_type(&t.field).to_string(),
                t.field.clone(),
                t.to.clone(),
            )
        })
        .collect()
}

/// Delivered EventBridge events as (id, detail-type, field, to), checking the envelope.
fn delivered(events: &[Value]) -> Vec<(String, String, String, Option<String>)> {
    events
        .iter()
        .map(|e| {
            assert_eq!(e["source"], SOURCE, "{e}");
            let d = &e["detail"];
            (
                d["event_id"].as_str().unwrap_or_default().to_string(),
                e["detail-type"].as_str().unwrap_or_default().to_string(),
                d["change"]["field"].as_str().unwrap_or_default().to_string(),
                d["change"]["to"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// `events` without repeats of an id (a repeat must be the same change), in delivery order.
fn dedup(
    events: Vec<(String, String, String, Option<String>)>,
) -> Vec<(String, String, String, Option<String>)> {
    let mut out: Vec<(String, String, String, Option<String>)> = Vec::new();
    for e in events {
        match out.iter().find(|o| o.0 == e.0) {
            Some(first) => assert_eq!(first, &e, "a duplicate carries its id and the same change"),
            None => out.push(e),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_stages_reach_the_bus_in_order_and_a_failed_publish_loses_nothing() -> Result<()> {
    let w = world("events").await?;
    let token = w.user("alice").await?;
    let id = w.upload("alice", &token, "s1", 4).await?;

    // Stage by stage (the simulator's default plan: 60 s, then 600 s, 1800 s, 3600 s more).
    let mut got = Vec::new();
    for step in [0, 100, 600, 1800, 3600] {
        w.advance(step);
        let r = w.run().await;
        ensure!(r.errors.is_empty(), "{:?}", r.errors);
        got.extend(w.drain_events().await?);
    }
    let rec = w.record(&id).await?;
    assert_eq!(rec.tracked.state, OverallState::Finished);
    assert!(rec.pending_events.is_empty(), "the outbox is cleared");
    let seen = delivered(&got);
    assert_eq!(seen.len(), rec.history.len(), "one delivery per change: {seen:?}");
    assert_eq!(seen, expected(&rec), "exactly the recorded changes, in order");
    let stages: Vec<String> = seen
        .iter()
        .filter(|e| e.1 == STAGE_CHANGED && e.3.as_deref() == Some("FINISHED"))
        .map(|e| e.2.clone())
        .collect();
    assert_eq!(
        stages,
        STAGE_FIELDS.map(String::from).to_vec(),
        "the four stages, in order"
    );
    for e in &got {
        assert_eq!(e["detail"]["upload_id"], id.as_str());
        assert_eq!(e["detail"]["user_id"], "alice");
    }
    assert!(w.poller.tracking.list_outbox().await?.is_empty());

    // A second upload; its poller run writes the change, then cannot publish (the bus is
    // unreachable): as a poller killed between the write and the publish.
    let id2 = w.upload("alice", &token, "s2", 3).await?;
    let real = w.poller.events.clone();
    let mut w = w;
    w.poller.events = w.dead_bus();
    w.run().await;
    w.advance(100);
    let r = w.run().await;
    assert!(
        r.errors.iter().any(|e| e.contains("publishing events failed")),
        "{:?}",
        r.errors
    );
    assert!(w.drain_events().await?.is_empty(), "nothing reached the bus");
    let stranded = w.record(&id2).await?.pending_events;
    ensure!(!stranded.is_empty(), "the changes wait in the outbox");
    assert_eq!(
        w.poller.tracking.list_outbox().await?.tracking.len(),
        1,
        "the outbox index finds them"
    );

    // The next run (bus back) publishes them first; nothing new has happened for it.
    w.poller.events = real;
    let r = w.run().await;
    ensure!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.events_published, stranded.len(), "{r:?}");
    let mut got2 = w.drain_events().await?;

    // Published but the run died before clearing the outbox: the events come again, same ids.
    let mut rec2 = w.record(&id2).await?;
    rec2.pending_events = outbox_events(&id2, 0, &rec2.history);
    w.poller.tracking.ack_outbox(&rec2).await?;
    let r = w.run().await;
    ensure!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.events_published, rec2.history.len(), "{r:?}");
    got2.extend(w.drain_events().await?);

    for step in [600, 1800, 3600] {
        w.advance(step);
        let r = w.run().await;
        ensure!(r.errors.is_empty(), "{:?}", r.errors);
        got2.extend(w.drain_events().await?);
    }
    let rec2 = w.record(&id2).await?;
    assert_eq!(rec2.tracked.state, OverallState::Finished);
    let all = delivered(&got2);
    let replayed = all.len() - dedup(all.clone()).len();
    assert!(replayed > 0, "the replay delivered duplicates: {all:?}");
    assert_eq!(dedup(all), expected(&rec2), "none lost, none invented, in order");
    assert!(w.poller.tracking.list_outbox().await?.is_empty());
    w.stack.delete().await.ok();
    Ok(())
}

// ------------------------------------------------------------------ webhooks

/// Webhook deliveries as (id, detail-type, field, to), checking each was signed right.
fn hooked(got: &[Received]) -> Vec<(String, String, String, Option<String>)> {
    got.iter()
        .map(|r| {
            assert!(
                r.verified,
                "signature verified with the registered secret: {:?}",
                r.body
            );
            assert_eq!(r.body["source"], SOURCE);
            assert_eq!(r.body["type"], r.event_type.as_str());
            let d = &r.body["detail"];
            (
                r.event_id.clone(),
                r.event_type.clone(),
                d["change"]["field"].as_str().unwrap_or_default().to_string(),
                d["change"]["to"].as_str().map(str::to_string),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_gets_every_change_in_order_signed_even_after_being_down_or_a_lost_publish() -> Result<()> {
    let w = world("hooks").await?;
    let rx = WebhookReceiver::start().await?;
    let secret = w.register("alice", &rx.url).await?;
    rx.set_secret(&secret);
    // Stored KMS-encrypted: the item holds a ciphertext and nowhere the secret.
    let item = w
        .stack
        .dynamodb()
        .get_item()
        .table_name(&w.stack.users_table)
        .key(
            "pk",
            aws_sdk_dynamodb::types::AttributeValue::S("USER#alice".into()),
        )
        .key("sk", aws_sdk_dynamodb::types::AttributeValue::S("WEBHOOK".into()))
        .send()
        .await?
        .item
        .context("webhook item")?;
    assert!(matches!(
        item.get("ciphertext"),
        Some(aws_sdk_dynamodb::types::AttributeValue::B(_))
    ));
    assert!(
        !format!("{item:?}").contains(&secret),
        "the secret is not stored in clear"
    );

    let token = w.user("alice").await?;
    let id = w.upload("alice", &token, "s1", 4).await?;
    let mut bus = Vec::new();
    for step in [0, 100, 600, 1800, 3600] {
        w.advance(step);
        let r = w.run().await;
        ensure!(r.errors.is_empty(), "{:?}", r.errors);
        bus.extend(w.drain_events().await?);
    }
    let rec = w.record(&id).await?;
    assert_eq!(rec.tracked.state, OverallState::Finished);
    let first = rx.received();
    assert_eq!(
        hooked(&first),
        expected(&rec),
        "the webhook got exactly the changes, in order"
    );
    assert_eq!(delivered(&bus), expected(&rec), "and so did the bus");
    let stages: Vec<String> = hooked(&first)
        .into_iter()
        .filter(|e| e.1 == STAGE_CHANGED && e.3.as_deref() == Some("FINISHED"))
        .map(|e| e.2)
        .collect();
    assert_eq!(
        stages,
        STAGE_FIELDS.map(String::from).to_vec(),
        "the four stages, in order"
    );
    assert!(w.poller.tracking.list_webhook_queue().await?.is_empty());
    let hook = w.webhook("alice").await?;
    assert_eq!(hook["consecutive_failures"], 0, "{hook}");
    assert!(hook["last_success_at"].is_string(), "{hook}");
    assert!(hook.get("secret").is_none() && !hook.to_string().contains(&secret));

    // The receiver is down for a while: every attempt fails and backs off; the bus is unaffected.
    rx.set_down(true);
    let id2 = w.upload("alice", &token, "s2", 3).await?;
    let mut bus2 = Vec::new();
    for step in [0, 100, 600] {
        w.advance(step);
        w.run().await;
        bus2.extend(w.drain_events().await?);
    }
    assert!(rx.refused() >= 2, "attempted and refused: {}", rx.refused());
    assert_eq!(rx.received().len(), first.len(), "nothing got through");
    let hook = w.webhook("alice").await?;
    assert_eq!(hook["enabled"], true, "{hook}");
    assert!(hook["consecutive_failures"].as_u64() >= Some(2), "{hook}");
    assert!(hook["next_attempt_at"].is_string(), "backing off: {hook}");
    assert!(
        hook["last_failures"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "{hook}"
    );
    // Back up: everything queued meanwhile arrives, in order, once.
    rx.set_down(false);
    for step in [1800, 3600] {
        w.advance(step);
        let r = w.run().await;
        ensure!(r.errors.is_empty(), "{:?}", r.errors);
        bus2.extend(w.drain_events().await?);
    }
    let rec2 = w.record(&id2).await?;
    assert_eq!(rec2.tracked.state, OverallState::Finished);
    let second: Vec<Received> = rx.received()[first.len()..].to_vec();
    assert_eq!(hooked(&second), expected(&rec2), "none lost while down, in order");
    assert_eq!(delivered(&bus2), expected(&rec2));
    let hook = w.webhook("alice").await?;
    assert_eq!(hook["consecutive_failures"], 0, "{hook}");

    // The poller dies between the record write and the publish (the bus unreachable: nothing is
    // published, so nothing is queued for the webhook either); the next run delivers both.
    let id3 = w.upload("alice", &token, "s3", 3).await?;
    let real = w.poller.events.clone();
    let mut w = w;
    w.poller.events = w.dead_bus();
    w.run().await;
    w.advance(100);
    w.run().await;
    let before = rx.received().len();
    assert_eq!(
        before,
        first.len() + second.len(),
        "nothing delivered without the publish"
    );
    ensure!(
        !w.record(&id3).await?.pending_events.is_empty(),
        "kept in the outbox"
    );
    w.poller.events = real;
    for step in [0, 600, 1800, 3600] {
        w.advance(step);
        let r = w.run().await;
        ensure!(r.errors.is_empty(), "{:?}", r.errors);
        w.drain_events().await?;
    }
    let rec3 = w.record(&id3).await?;
    assert_eq!(rec3.tracked.state, OverallState::Finished);
    let third: Vec<Received> = rx.received()[before..].to_vec();
    assert_eq!(
        hooked(&third),
        expected(&rec3),
        "none lost between write and publish"
    );
    w.stack.delete().await.ok();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_failing_repeatedly_is_disabled_with_its_reason_until_put_again() -> Result<()> {
    let mut w = world("hookoff").await?;
    w.poller.webhooks = WebhookSender::new(WebhookPolicy {
        allow_local: true,
        max_failures: 3,
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(1),
        ..WebhookPolicy::default()
    });
    let rx = WebhookReceiver::start().await?;
    rx.set_secret(&w.register("bob", &rx.url).await?);
    rx.set_down(true);
    let token = w.user("bob").await?;
    let id = w.upload("bob", &token, "s1", 3).await?;
    for step in [0, 100, 600, 1800] {
        w.advance(step);
        w.run().await;
    }
    let hook = w.webhook("bob").await?;
    assert_eq!(hook["enabled"], false, "{hook}");
    let reason = hook["disabled_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("3 consecutive") && reason.contains("503"),
        "{hook}"
    );
    assert!(hook["disabled_at"].is_string(), "{hook}");
    assert_eq!(rx.refused(), 3, "three attempts, then none");
    w.advance(3600);
    let r = w.run().await;
    assert_eq!(r.webhook_failures, 0, "a disabled webhook is not called: {r:?}");
    assert_eq!(rx.refused(), 3);
    let queued = w.poller.tracking.list_webhook_queue().await?;
    ensure!(!queued.is_empty(), "what could not be delivered stays queued");

    // PUT again: enabled, a new secret; the queue is delivered.
    rx.set_down(false);
    rx.set_secret(&w.register("bob", &rx.url).await?);
    assert_eq!(w.webhook("bob").await?["enabled"], true);
    w.advance(10);
    let r = w.run().await;
    ensure!(r.errors.is_empty(), "{:?}", r.errors);
    let got = hooked(&rx.received());
    assert_eq!(got.len(), queued.len(), "{got:?}");
    let want: Vec<String> = queued.iter().map(|q| q.event_id.clone()).collect();
    let ids: Vec<String> = got.iter().map(|g| g.0.clone()).collect();
    assert_eq!(ids, want, "in queue order");
    assert!(ids.iter().all(|i| i.starts_with(&id)));
    assert!(w.poller.tracking.list_webhook_queue().await?.is_empty());
    w.stack.delete().await.ok();
    Ok(())
}

// ------------------------------------------------------------------ zip-and-push's own changes

impl World {
    /// zip-and-push composed from the same environment: `RELAY_EVENT_BUS` is set, so it records its
    /// upload-state changes as events (it never publishes: the poller does).
    async fn zip_and_push(&self) -> Result<zip_and_push::compose::ProductionDeps> {
        let config = zip_and_push::config::Config::from_lookup(|k| {
            self.env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })?;
        ensure!(
            config.tunables.publish_events,
            "RELAY_EVENT_BUS turns the events on"
        );
        let mut deps = zip_and_push::compose::compose(&config, self.stack.sdk_config()).await?;
        deps.store = shared::adapters::s3::S3ObjectStore::new(self.stack.s3());
        deps.mapillary = deps.mapillary.with_retry_policy(RetryPolicy::fast());
        Ok(deps)
    }

    /// Drop `n` geotagged images and a manifest under `sequences/<user>/<seq>/` and run
    /// zip-and-push on moto's notification, as the event source mapping would (the message is
    /// deleted once acknowledged).
    async fn push(&self, user: &str, seq: &str, n: usize) -> Result<()> {
        let s3 = self.stack.s3();
        let mut t = TrackSpec::new(48.21, 16.38, time::macros::datetime!(2024-04-20 09:00:00 UTC));
        t.interval_ms = 2000;
        t.step_m = 8.0;
        let prefix = format!("sequences/{user}/{seq}/");
        for (i, spec) in track(n, &t).iter().enumerate() {
            s3.put_object()
                .bucket(&self.stack.bucket)
                .key(format!("{prefix}img_{i:04}.jpg"))
                .body(jpeg(spec).into())
                .send()
                .await?;
        }
        s3.put_object()
            .bucket(&self.stack.bucket)
            .key(format!("{prefix}manifest.json"))
            .body(b"{}".to_vec().into())
            .send()
            .await?;
        let sqs = self.stack.sqs();
        let url = &self.stack.ingest_queue_url;
        let until = Instant::now() + Duration::from_secs(30);
        let msgs = loop {
            ensure!(Instant::now() < until, "no notification of the manifest");
            let got = sqs
                .receive_message()
                .queue_url(url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
                .send()
                .await?;
            let mut records = Vec::new();
            for m in got.messages.unwrap_or_default() {
                let body: Value = serde_json::from_str(m.body().unwrap_or_default())?;
                if body.get("Records").is_some() {
                    records.push(m);
                } else if let Some(h) = m.receipt_handle() {
                    sqs.delete_message()
                        .queue_url(url)
                        .receipt_handle(h)
                        .send()
                        .await?;
                }
            }
            if !records.is_empty() {
                break records;
            }
        };
        let event: aws_lambda_events::event::sqs::SqsEvent = serde_json::from_value(
            integration_tests::esm::sqs_event(&msgs, &integration_tests::esm::queue_arn(url)),
        )?;
        let deps = self.zip_and_push().await?;
        let resp = zip_and_push::handle_batch(&deps, event, Instant::now() + Duration::from_secs(600)).await;
        ensure!(resp.batch_item_failures.is_empty(), "zip-and-push: {resp:?}");
        for m in &msgs {
            if let Some(h) = m.receipt_handle() {
                sqs.delete_message()
                    .queue_url(url)
                    .receipt_handle(h)
                    .send()
                    .await?;
            }
        }
        Ok(())
    }
}

/// What zip-and-push records on its way to HANDED_OFF: (id, detail-type, field, to).
fn handed_off(id: &str) -> Vec<(String, String, String, Option<String>)> {
    ["PENDING", "UPLOADING", "FINISHING", "UPLOADED", "HANDED_OFF"]
        .iter()
        .enumerate()
        .map(|(k, to)| {
            (
                upload_event_id(id, k as u32),
                UPLOAD_STATE_CHANGED.to_string(),
                UPLOAD_STATE_FIELD.to_string(),
                Some(to.to_string()),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_sequence_publishes_its_upload_states_then_its_four_stages_once_each_in_order() -> Result<()>
{
    let w = world("zapevents").await?;
    let rx = WebhookReceiver::start().await?;
    rx.set_secret(&w.register("alice", &rx.url).await?);
    w.user("alice").await?;
    w.push("alice", "walk", 4).await?;
    let id = upload_id("alice", "walk", 0);

    // zip-and-push is done (as if it stopped right after its last write): it published nothing,
    // every change waits in the outbox, written with the record that made it.
    assert!(
        w.drain_events().await?.is_empty(),
        "zip-and-push publishes nothing itself"
    );
    let outbox = w.poller.tracking.list_outbox().await?;
    let ids: Vec<String> = outbox.uploads.iter().map(|e| e.event.id.clone()).collect();
    let want: Vec<String> = handed_off(&id).into_iter().map(|e| e.0).collect();
    assert_eq!(ids, want, "one event item per change");
    assert_eq!(
        w.poller.tracking.upload_outbox(&id).await?.len(),
        want.len(),
        "read consistently too"
    );
    let stored = w.poller.uploads.list_uploads("alice", "walk").await?;
    assert_eq!(stored[0].state, UploadState::HandedOff);
    assert_eq!(stored[0].outbox.recorded, 5);

    // The poller publishes them, then the Mapillary stages as they happen.
    let mut bus = Vec::new();
    for step in [0, 100, 600, 1800, 3600] {
        w.advance(step);
        let r = w.run().await;
        ensure!(r.errors.is_empty(), "{:?}", r.errors);
        bus.extend(w.drain_events().await?);
    }
    let rec = w.record(&id).await?;
    assert_eq!(rec.tracked.state, OverallState::Finished);
    let mut want = handed_off(&id);
    want.extend(expected(&rec));
    assert_eq!(
        delivered(&bus),
        want,
        "on the bus: ours, then Mapillary's, each once, in order"
    );
    assert_eq!(
        hooked(&rx.received()),
        want,
        "on the webhook (signatures verified): the same"
    );
    let handed = &bus[4]["detail"];
    assert_eq!(handed["upload"]["state"], "HANDED_OFF", "{handed}");
    assert_eq!(handed["change"]["from"], "UPLOADED", "{handed}");
    assert_eq!(handed["cluster_id"], rec.tracked.cluster_id.as_str(), "{handed}");
    assert_eq!(bus[4]["detail-type"], UPLOAD_STATE_CHANGED);
    assert!(w.poller.tracking.list_outbox().await?.is_empty(), "all cleared");
    assert!(w.poller.tracking.upload_outbox(&id).await?.is_empty());
    w.stack.delete().await.ok();
    Ok(())
}
