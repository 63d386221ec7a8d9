//! FINISH_UNCERTAIN uploads finished again once the activity feed proves the first
//! `finish_upload` created nothing (`user::refinish`), on the in-memory fakes and the in-process
//! simulator (frozen clock): the feed without the node → one more call, then tracked as usual; with
//! the node → adopted, never called again; the feed unavailable → no proof, no call.

use std::io::Write;
use std::time::{Duration, Instant};

use mapillary_sim::defaults::{DEMO_USER_TOKEN, WEB_APP_CLIENT_TOKEN};
use mapillary_sim::{SimConfig, World as SimWorld};
use relay_fixtures::{jpeg, track, TrackSpec};
use secrecy::SecretString;
use serde_json::{json, Value};
use shared::domain::tracking::OverallState;
use shared::mapillary::client::FileType;
use shared::model::{upload_id, UploadImage, UploadRecord, UploadState};
use shared::ports::{ImageEntryStore, UploadStore};

use crate::config::Tunables;
use crate::report::RunReport;
use crate::run::run_once;
use crate::tests::sim_now;

const USER: &str = "user-1";
/// `RELAY_REFINISH_AFTER_S` of these tests.
const AFTER_S: i64 = 900;

/// The poller unit tests' world (`tests::world_in`, lenient simulator) with the web-app feed token,
/// the reconcile scan on every run and `RELAY_REFINISH_AFTER_S` = [`AFTER_S`].
type W = crate::tests::World;

async fn world() -> W {
    let mut w = crate::tests::world_in(SimConfig::world(SimWorld::Lenient), Some(WEB_APP_CLIENT_TOKEN)).await;
    w.deps.tunables = Tunables {
        reconcile_scan_every: Duration::ZERO,
        refinish_after: Duration::from_secs(AFTER_S as u64),
        ..Tunables::default()
    };
    w
}

impl W {
    /// Upload `n` images as one zip and call `finish_upload` under a fault rule: `created` — the
    /// cluster is created and the reply lost; otherwise a 500 before anything is created. Writes
    /// what zip-and-push writes then (FINISH_UNCERTAIN, no cluster message). Returns the upload id.
    async fn uncertain(&self, seq: &str, n: usize, hour: i64, created: bool) -> String {
        let mut t = TrackSpec::new(
            48.2,
            16.37,
            time::macros::datetime!(2024-04-20 08:00:00 UTC) + time::Duration::hours(hour),
        );
        t.interval_ms = 2000;
        t.step_m = 8.0;
        let specs = track(n, &t);
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut zw = zip::ZipWriter::new(&mut buf);
            for (i, s) in specs.iter().enumerate() {
                zw.start_file(
                    format!("{i}.jpg"),
                    zip::write::SimpleFileOptions::default()
                        .compression_method(zip::CompressionMethod::Stored),
                )
                .expect("zip entry");
                zw.write_all(&jpeg(s)).expect("zip write");
            }
            zw.finish().expect("zip");
        }
        let bytes = bytes::Bytes::from(buf.into_inner());
        let total = bytes.len() as u64;
        let token = SecretString::from(DEMO_USER_TOKEN);
        let key = format!("mly_relay_{USER}_{seq}.zip");
        let report = self
            .client
            .upload_resumable(&token, &key, total, |off| {
                let b = bytes.slice(usize::try_from(off).expect("offset")..);
                futures::stream::iter([Ok::<_, std::io::Error>(b)])
            })
            .await
            .expect("upload");
        let rule = if created {
            json!({"path": "/graph/finish_upload", "times": 1, "phase": "after",
                "action": {"kind": "lost_reply"}})
        } else {
            json!({"path": "/graph/finish_upload", "times": 1, "phase": "before",
                "action": {"kind": "server_error", "status": 500}})
        };
        self.admin(reqwest::Method::POST, "/faults", rule).await;
        let e = self
            .client
            .finish_upload(&token, &report.handle, FileType::Zip, None)
            .await
            .expect_err("the fault answers");
        assert!(e.is_ambiguous(), "{e}");
        let id = upload_id(USER, seq, 0);
        let now = sim_now(&self.sim);
        let repo = &self.deps.uploads;
        repo.put_upload(&UploadRecord {
            user_id: USER.into(),
            sequence_id: seq.into(),
            upload_id: id.clone(),
            index: 0,
            state: UploadState::FinishUncertain,
            session_key: key,
            total_len: total,
            image_count: u32::try_from(n).expect("count"),
            cluster_id: None,
            handle: Some(report.handle.clone()),
            organization_id: None,
            bytes_sent: total,
            created_at: now,
            started_at: Some(now),
            finished_at: Some(now),
            error: Some(format!("finish_upload outcome unknown: {e}")),
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
                key: format!("sequences/{USER}/{seq}/img_{i:04}.jpg"),
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
        id
    }

    /// The simulator's clusters (ids), all users.
    async fn clusters(&self) -> Vec<String> {
        let v = self.admin(reqwest::Method::GET, "/clusters", Value::Null).await;
        v.as_array()
            .or_else(|| v["clusters"].as_array())
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_string))
            .collect()
    }

    /// `finish_upload` calls the simulator logged since it started.
    async fn finish_calls(&self) -> usize {
        let v = self.admin(reqwest::Method::GET, "/requests", Value::Null).await;
        v.as_array()
            .or_else(|| v["requests"].as_array())
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|r| r["path"].as_str() == Some("/graph/finish_upload"))
            .count()
    }

    /// One poller run with a 120 s deadline (the refinish's `finish_upload` fits in it).
    async fn run_long(&self) -> RunReport {
        run_once(&self.deps, Instant::now() + Duration::from_secs(120)).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_the_feed_proves_uncommitted_is_called_again_once_and_then_tracked() {
    let w = world().await;
    let id = w.uncertain("s1", 4, 0, false).await;
    assert!(w.clusters().await.is_empty(), "the 500 created nothing");
    assert_eq!(w.finish_calls().await, 1);

    // Taken into tracking; the feed shows nothing, but too early to be proof.
    let r = w.run_long().await;
    assert_eq!((r.reconcile.created, r.refinished), (1, 0), "{r:?}");
    w.advance(AFTER_S - 10);
    let r = w.run_long().await;
    assert_eq!(r.refinished, 0, "{r:?}");
    assert_eq!(w.finish_calls().await, 1);
    assert!(w.record(&id).await.tracked.is_reconciling());

    // RELAY_REFINISH_AFTER_S after the call, the feed still shows nothing: finished again, once.
    w.advance(20);
    let r = w.run_long().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.refinished, 1, "{r:?}");
    assert_eq!(w.finish_calls().await, 2);
    let clusters = w.clusters().await;
    assert_eq!(clusters.len(), 1, "{clusters:?}");
    let rec = w.record(&id).await;
    assert_eq!(rec.tracked.cluster_id, clusters[0]);
    assert!(!rec.tracked.is_reconciling());
    let rc = rec.tracked.reconcile.clone().expect("reconcile kept");
    assert_eq!(rc.refinishes, 1);
    assert!(rec
        .history
        .iter()
        .any(|t| t.field == "cluster_id" && t.to.as_deref() == Some(clusters[0].as_str())));

    // Tracked like any upload from then on, never finished a third time.
    w.advance(7000);
    let r = w.run_long().await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let rec = w.record(&id).await;
    assert_eq!(rec.tracked.state, OverallState::Finished, "{rec:?}");
    assert_eq!(rec.linked_count, 4);
    w.advance(AFTER_S * 3);
    w.run_long().await;
    assert_eq!(w.finish_calls().await, 2);
    assert_eq!(w.clusters().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_uncertain_outcome_gets_a_fresh_window_and_one_more_call_per_proof() {
    let w = world().await;
    let id = w.uncertain("s1", 3, 0, false).await;
    w.run_long().await;
    // The second call fails the same way (500 before anything is created).
    w.admin(
        reqwest::Method::POST,
        "/faults",
        json!({"path": "/graph/finish_upload", "times": 1, "phase": "before",
            "action": {"kind": "server_error", "status": 500}}),
    )
    .await;
    w.advance(AFTER_S + 10);
    let r = w.run_long().await;
    assert_eq!(r.refinished, 0, "{r:?}");
    assert_eq!(w.finish_calls().await, 2);
    let rec = w.record(&id).await;
    assert!(rec.tracked.is_reconciling(), "uncertain again: {rec:?}");
    assert_eq!(rec.tracked.reconcile.as_ref().map(|r| r.refinishes), Some(1));
    // No new proof yet (the window restarted at the second call): no third call.
    w.advance(60);
    w.run_long().await;
    assert_eq!(w.finish_calls().await, 2);
    // Proof again: the third call creates the one cluster.
    w.advance(AFTER_S);
    let r = w.run_long().await;
    assert_eq!(r.refinished, 1, "{r:?}");
    assert_eq!(w.finish_calls().await, 3);
    assert_eq!(w.clusters().await.len(), 1);
    assert_eq!(
        w.record(&id).await.tracked.reconcile.map(|r| r.refinishes),
        Some(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_the_feed_shows_is_adopted_and_finish_upload_is_never_called_again() {
    let w = world().await;
    let id = w.uncertain("s1", 5, 0, true).await;
    let clusters = w.clusters().await;
    assert_eq!(clusters.len(), 1, "the lost reply created one");
    w.advance(AFTER_S * 2);
    let r = w.run_long().await;
    assert_eq!(r.refinished, 0, "{r:?}");
    let rec = w.record(&id).await;
    assert_eq!(rec.tracked.cluster_id, clusters[0]);
    w.advance(AFTER_S * 2);
    w.run_long().await;
    assert_eq!(w.finish_calls().await, 1);
    assert_eq!(w.clusters().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_readable_feed_there_is_no_proof_and_no_second_call() {
    let w = world().await;
    let id = w.uncertain("s1", 3, 0, false).await;
    w.admin(
        reqwest::Method::POST,
        "/world",
        json!({"world": SimWorld::FeedGone.to_string()}),
    )
    .await;
    w.run_long().await;
    w.advance(AFTER_S * 4);
    let r = w.run_long().await;
    assert_eq!((r.refinished, r.feed_unusable_users), (0, 1), "{r:?}");
    assert_eq!(w.finish_calls().await, 1);
    assert!(w.clusters().await.is_empty());
    assert!(w.record(&id).await.tracked.is_reconciling());
}
