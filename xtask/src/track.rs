//! `cargo xtask push DIR --track`: after zip-and-push handled the sequence, run the poller
//! in-process against the local stack (composed as its `main.rs` does) until every upload of the
//! sequence is final, printing each transition as it is written (stderr).
//!
//! The poller's "now" follows the simulator's clock (`GET /_sim/clock`): with the real-time
//! simulator of `cargo xtask stack up --stage-seconds N` the rounds wait a little between runs;
//! with a frozen one each round advances it by `step` so the stages move.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use poller::clock::Clock;
use poller::compose::{compose, ProductionPoller};
use poller::config::Config;
use poller::linking::path_label;
use poller::run_once;
use serde_json::Value;
use shared::model::{TrackingRecord, UploadRecord, UploadState};
use shared::ports::{TrackingReader, UploadReader};

/// The poller over the AWS adapters.
pub type RelayPoller = ProductionPoller;

/// The poller composed by its own [`compose`] (as its `main.rs` does), from a function environment
/// (`stack up`'s exports), with `clock` as "now".
pub async fn poller_from_env(env: &BTreeMap<String, String>, clock: Clock) -> Result<RelayPoller> {
    let config = Config::from_lookup(|k| env.get(k).cloned())?;
    let sdk = crate::stack::local_sdk(env, &config.mapillary).await?;
    let mut poller = compose(&config, &sdk).await?;
    poller.clock = clock;
    Ok(poller)
}

/// The simulator's clock: `(now_ms, frozen)`.
pub async fn sim_clock(http: &reqwest::Client, admin: &str) -> Result<(i64, bool)> {
    let v: Value = http
        .get(format!("{admin}/clock"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok((
        v["now_ms"].as_i64().context("clock has no now_ms")?,
        v["frozen"].as_bool().unwrap_or(false),
    ))
}

/// How the track loop moves time between rounds.
#[derive(Debug, Clone)]
pub enum Pace {
    /// A real-time simulator: sleep this long between runs.
    Wait(Duration),
    /// A frozen simulator under `admin` (`…/_sim`): advance it (and the poller's clock) by this.
    Advance {
        /// Admin base URL.
        admin: String,
        /// Per round.
        step: Duration,
    },
}

/// One line per transition of the sequence's uploads.
pub fn transition_line(upload_id: &str, t: &shared::domain::tracking::Transition) -> String {
    format!(
        "{}  {upload_id}  {}: {} → {}",
        t.at,
        t.field,
        t.from.as_deref().unwrap_or("-"),
        t.to.as_deref().unwrap_or("-")
    )
}

/// The final tracking records of the sequence's uploads, once every upload that can be tracked
/// (handed off or FINISH_UNCERTAIN) is final.
pub async fn track_loop(
    poller: &RelayPoller,
    user: &str,
    sequence: &str,
    pace: &Pace,
    timeout: Duration,
    mut on_line: impl FnMut(&str),
) -> Result<Vec<TrackingRecord>> {
    let http = reqwest::Client::new();
    let uploads: Vec<UploadRecord> = poller
        .uploads
        .list_uploads(user, sequence)
        .await?
        .into_iter()
        .filter(|u| matches!(u.state, UploadState::HandedOff | UploadState::FinishUncertain))
        .collect();
    if uploads.is_empty() {
        bail!("sequence {user}/{sequence} has no upload to track (none handed off)");
    }
    let started = Instant::now();
    loop {
        let report = run_once(poller, Instant::now() + Duration::from_secs(120)).await;
        for (upload_id, t) in &report.transitions {
            if uploads.iter().any(|u| &u.upload_id == upload_id) {
                on_line(&transition_line(upload_id, t));
            }
        }
        for e in &report.errors {
            on_line(&format!("poller: {e}"));
        }
        let mut done = Vec::new();
        for u in &uploads {
            match poller.tracking.get_tracking(&u.upload_id).await? {
                Some(rec) if rec.tracked.state.is_final() => done.push(rec),
                _ => {}
            }
        }
        if done.len() == uploads.len() {
            for rec in &done {
                on_line(&format!(
                    "{}  {} {}via {} ({} linked, {} dropped; sequences {:?})",
                    rec.upload_id,
                    rec.tracked.state.as_str(),
                    rec.tracked
                        .error_code
                        .as_deref()
                        // The feed says `UNSET` when there is no error.
                        .filter(|e| *e != "UNSET")
                        .map(|e| format!("{e} "))
                        .unwrap_or_default(),
                    path_label(rec.linked_via),
                    rec.linked_count,
                    rec.dropped_count,
                    rec.sequence_ids
                ));
            }
            return Ok(done);
        }
        if started.elapsed() > timeout {
            bail!("not every upload is final after {timeout:?}");
        }
        match pace {
            Pace::Wait(d) => tokio::time::sleep(*d).await,
            Pace::Advance { admin, step } => {
                http.post(format!("{admin}/clock/advance"))
                    .json(&serde_json::json!({"seconds": step.as_secs_f64()}))
                    .send()
                    .await?
                    .error_for_status()?;
                poller.clock.set_ms(sim_clock(&http, admin).await?.0);
            }
        }
    }
}

/// `--track`: the poller against the running stack until the sequence's uploads are final.
pub async fn track(
    env: &BTreeMap<String, String>,
    sim_url: &str,
    user: &str,
    sequence: &str,
) -> Result<Vec<TrackingRecord>> {
    let admin = format!("{}/_sim", sim_url.trim_end_matches('/'));
    let http = reqwest::Client::new();
    let (now_ms, frozen) = sim_clock(&http, &admin).await?;
    // A real-time simulator runs on the system clock; a frozen one is followed by hand.
    let clock = if frozen {
        let c = Clock::manual(time::OffsetDateTime::UNIX_EPOCH);
        c.set_ms(now_ms);
        c
    } else {
        Clock::System
    };
    let mut env = env.clone();
    // FINISH_UNCERTAIN uploads of this sequence are looked for at once.
    env.insert("RELAY_RECONCILE_SCAN_EVERY_S".into(), "0".into());
    let poller = poller_from_env(&env, clock.clone()).await?;
    let pace = if frozen {
        Pace::Advance {
            admin: admin.clone(),
            step: Duration::from_secs(600),
        }
    } else {
        Pace::Wait(Duration::from_secs(1))
    };
    eprintln!(
        "track: running the poller until every upload of {user}/{sequence} is final (simulator clock {})",
        if frozen {
            "frozen: advanced 600 s per round"
        } else {
            "real time"
        }
    );
    let timeout = if frozen {
        Duration::from_secs(600)
    } else {
        Duration::from_secs(3600)
    };
    track_loop(&poller, user, sequence, &pace, timeout, |line| {
        eprintln!("track: {line}")
    })
    .await
}

#[cfg(test)]
mod tests {
    //! The `--track` loop on moto (a fresh stack) and the in-process simulator with a frozen clock
    //! that the loop advances: one handed-off upload and one FINISH_UNCERTAIN upload (its cluster
    //! exists, the reply was lost) of one sequence, both tracked to FINISHED.

    use integration_tests::moto::shared_moto;
    use integration_tests::stack::{self as harness, LocalStack, SimEndpoints};
    use mapillary_sim::content::{ImageMeta, MetaSource};
    use mapillary_sim::state::{Cluster, ClusterContent, ImageSource, PendingImage, User};
    use mapillary_sim::{defaults, ProcessingPlan, SimConfig, SimHandle, Simulator};
    use secrecy::SecretString;
    use shared::adapters::sqs::SqsClusterQueue;
    use shared::domain::linking::LinkPath;
    use shared::domain::tracking::OverallState;
    use shared::model::{upload_id, ClusterMessage, StoredToken, UploadImage};
    use shared::ports::{ClusterQueue, TokenStore};
    use time::OffsetDateTime;

    use super::*;
    use shared::ports::{ImageEntryStore, UploadStore};

    fn at(ms: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).expect("time")
    }

    /// A cluster of `n` images (as `finish_upload` creates it); returns its id and the images.
    fn cluster(
        sim: &SimHandle,
        owner: &str,
        key: &str,
        n: usize,
        first_ms: i64,
    ) -> (String, Vec<(f64, f64, i64)>) {
        let now = sim.sim().now_ms();
        let mut w = sim.sim().world_raw();
        let id = w.ids.numeric();
        let pts: Vec<(f64, f64, i64)> = (0..n)
            .map(|i| (48.2 + i as f64 * 0.0001, 16.37, first_ms + 2000 * i as i64))
            .collect();
        let images = pts
            .iter()
            .enumerate()
            .map(|(i, (lat, lon, ms))| PendingImage {
                name: format!("{i}.jpg"),
                meta: ImageMeta {
                    lat: *lat,
                    lon: *lon,
                    altitude: None,
                    captured_at_ms: *ms,
                    compass_angle: None,
                    make: None,
                    model: None,
                    orientation: None,
                    filename: None,
                    width: None,
                    height: None,
                    source: MetaSource::Description,
                    description: None,
                },
                source: ImageSource::ZipEntry {
                    upload_key: key.into(),
                    entry_name: format!("{i}.jpg"),
                },
            })
            .collect();
        w.clusters.push(Cluster {
            id: id.clone(),
            owner_id: owner.into(),
            organization_id: None,
            file_type: "zip".into(),
            file_handle: format!("h-{id}"),
            upload_key: key.into(),
            created_at_ms: now,
            plan: ProcessingPlan::default(),
            sequence_cap: 1000,
            content: ClusterContent::Images {
                images,
                rejected: Vec::new(),
            },
            sequence_ids: Vec::new(),
            materialized: false,
        });
        (id, pts)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn track_loop_follows_a_sequence_to_final_including_a_lost_finish_reply() -> Result<()> {
        let endpoint = shared_moto()?;
        let stack = LocalStack::create(&endpoint, &harness::unique_stack_name("track")).await?;
        let sim = Simulator::start(SimConfig::frozen(), "127.0.0.1:0").await?;
        // The poller reads the feed with the web-app token, as the local stack configures it (the default
        // world, seed-2022, refuses users' tokens there).
        let ep = SimEndpoints::from_base(sim.base_url(), defaults::APP_ID, defaults::CLIENT_SECRET)
            .with_feed_token(defaults::WEB_APP_CLIENT_TOKEN);
        let mut env: BTreeMap<String, String> = stack.lambda_env(&ep).into_iter().collect();
        env.insert("RELAY_RECONCILE_SCAN_EVERY_S".into(), "0".into());
        let now_ms = sim.sim().now_ms();
        let clock = Clock::manual(at(now_ms));
        let poller = poller_from_env(&env, clock).await?;

        let (mapillary_id, token) = {
            let mut w = sim.sim().world_raw();
            let id = w.ids.numeric();
            w.users.insert(
                id.clone(),
                User {
                    id: id.clone(),
                    username: "tess".into(),
                    email: None,
                    password: None,
                },
            );
            let token = w.issue_token(&id, None, 3600 * 24 * 30, now_ms);
            (id, token)
        };
        poller
            .tokens
            .save(
                "tess",
                &StoredToken {
                    access_token: SecretString::from(token),
                    refresh_token: None,
                    expires_at: None,
                    mapillary_user_id: Some(mapillary_id.clone()),
                    username: None,
                    updated_at: at(now_ms),
                },
            )
            .await?;
        let start = 1_713_600_000_000i64;
        let mut ids = Vec::new();
        for (index, (n, handed_off)) in [(4usize, true), (3usize, false)].into_iter().enumerate() {
            let key = format!("k{index}.zip");
            let first = start + index as i64 * 3_600_000;
            let (cluster_id, pts) = cluster(&sim, &mapillary_id, &key, n, first);
            let id = upload_id("tess", "seq", index as u32);
            poller
                .uploads
                .put_upload(&UploadRecord {
                    user_id: "tess".into(),
                    sequence_id: "seq".into(),
                    upload_id: id.clone(),
                    index: index as u32,
                    state: if handed_off {
                        UploadState::HandedOff
                    } else {
                        UploadState::FinishUncertain
                    },
                    session_key: key,
                    total_len: 1,
                    image_count: n as u32,
                    cluster_id: handed_off.then(|| cluster_id.clone()),
                    handle: Some("h".into()),
                    organization_id: None,
                    bytes_sent: 1,
                    created_at: at(now_ms),
                    started_at: Some(at(now_ms)),
                    finished_at: Some(at(now_ms)),
                    error: (!handed_off).then(|| "finish_upload outcome unknown".to_string()),
                    attempts: 1,
                    outbox: Default::default(),
                })
                .await?;
            let entries: Vec<UploadImage> = pts
                .iter()
                .enumerate()
                .map(|(i, (lat, lon, ms))| UploadImage {
                    upload_id: id.clone(),
                    index: i as u32,
                    key: format!("sequences/tess/seq/{index}-{i}.jpg"),
                    etag: "e".into(),
                    size: 1,
                    entry_size: 1,
                    header_consumed: 0,
                    description: String::new(),
                    lat: *lat,
                    lon: *lon,
                    altitude: None,
                    captured_at: at(*ms),
                    heading: None,
                    checkpoint: None,
                })
                .collect();
            poller.uploads.put_images(&entries).await?;
            if handed_off {
                SqsClusterQueue::new(stack.sqs(), &stack.clusters_queue_url)
                    .send_cluster(&ClusterMessage {
                        upload_id: id.clone(),
                        user_id: "tess".into(),
                        sequence_id: "seq".into(),
                        cluster_id,
                    })
                    .await?;
            }
            ids.push(id);
        }

        let pace = Pace::Advance {
            admin: sim.admin_url(),
            step: Duration::from_secs(900),
        };
        let mut lines = Vec::new();
        let done = track_loop(&poller, "tess", "seq", &pace, Duration::from_secs(300), |l| {
            lines.push(l.to_string())
        })
        .await?;
        assert_eq!(done.len(), 2);
        for rec in &done {
            assert_eq!(rec.tracked.state, OverallState::Finished, "{rec:?}");
            assert_eq!(rec.linked_via, Some(LinkPath::ActivityFeed));
            assert!(!rec.tracked.cluster_id.is_empty());
        }
        let text = lines.join("\n");
        for needle in [
            "status: - → IN_PROGRESS",
            "initial_processing_status: IN_PROGRESS → FINISHED",
            "tiler_status: IN_PROGRESS → FINISHED",
            "state: IN_PROGRESS → FINISHED",
            "cluster_id: - →",
        ] {
            assert!(text.contains(needle), "{needle:?} missing in:\n{text}");
        }
        for id in &ids {
            assert!(
                text.contains(&format!("{id}  FINISHED via activity feed")),
                "{text}"
            );
        }
        sim.shutdown().await;
        Ok(())
    }
}
