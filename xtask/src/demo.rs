//! `cargo xtask demo`: the local stack with real-time Mapillary processing, a generated sequence
//! uploaded into the simulator by the real `mapillary_tools`, and every upload followed through the
//! activity feed to FINISHED and linked to its Mapillary sequence and images.
//!
//! Later issues replace the mapillary_tools step with the relay's own pipeline (S3 drop →
//! zip-and-push → poller → status API); the feed client and links are already the relay's own
//! ([`shared::mapillary::feed`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use integration_tests::mapillary_tools::{Account, Endpoints as ToolsEndpoints, MapillaryTools};
use mapillary_sim::defaults;
use relay_fixtures::{track, write_jpegs, TrackSpec};
use serde_json::Value;
use shared::mapillary::feed::{self, ActivityNode};
use shared::mapillary::{image_link, Endpoints};

use crate::{stack, venv};

/// Seconds each simulated processing stage takes in the demo.
const STAGE_SECONDS: u64 = 2;
/// How long the demo waits for every upload to finish.
const TRACK_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn run(root: &Path, ci: bool, images: usize) -> Result<()> {
    if images < 2 {
        bail!("--images must be at least 2");
    }
    if stack::read_state(root)?.is_some_and(|s| s.is_running()) {
        bail!(
            "a local stack is already running; stop it with `cargo xtask stack down` \
             (the demo starts its own, with real-time processing)"
        );
    }
    let mut opts = stack::UpOptions::new(defaults::APP_ID, defaults::CLIENT_SECRET);
    let s = STAGE_SECONDS;
    opts.sim_args = vec![
        "--realtime".into(),
        "--stage-seconds".into(),
        format!("{s},{s},{s},{s}"),
    ];
    opts.print_exports = false;
    let state = stack::up(root, &opts).await?;
    let result = demo(root, &state.sim.url, ci, images).await;
    if let Err(e) = stack::down(root) {
        eprintln!("demo: stopping the stack failed: {e:#}");
    }
    result
}

async fn demo(root: &Path, sim_url: &str, ci: bool, images: usize) -> Result<()> {
    let venvs = venv::ensure(root)?;
    let endpoints = Endpoints::under(sim_url);

    // 1. A sequence with a 5-minute pause in the middle: mapillary_tools splits it into two uploads.
    let work = root.join(".scratch").join("demo");
    let _ = std::fs::remove_dir_all(&work);
    let photos = work.join("images");
    let start = time::OffsetDateTime::now_utc() - time::Duration::hours(2);
    let first = images / 2;
    let mut specs = track(first, &TrackSpec::new(50.8225, -0.1372, start));
    let mut second = TrackSpec::new(
        50.8240,
        -0.1340,
        start + time::Duration::minutes(first as i64 / 60 + 5),
    );
    second.seed_base = 10_000;
    specs.extend(track(images - first, &second));
    write_jpegs(&photos, &specs).context("writing demo images")?;
    println!(
        "demo: generated {} geotagged JPEGs in {}",
        specs.len(),
        photos.display()
    );

    // 2. The real mapillary_tools processes and uploads them into the simulator.
    let tools = MapillaryTools::new(
        venvs.mapillary_tools(),
        &work.join("mapillary_tools"),
        &ToolsEndpoints {
            graph: endpoints.graph.clone(),
            upload: endpoints.upload.clone(),
        },
        &Account {
            client_token: defaults::CLIENT_TOKEN.into(),
            user_token: defaults::DEMO_USER_TOKEN.into(),
            username: defaults::DEMO_USERNAME.into(),
            user_id: defaults::DEMO_USER_ID.into(),
        },
    )?;
    let (tools, photos2) = (std::sync::Arc::new(tools), photos.clone());
    let t = tools.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        t.process(&photos2, &[])?;
        t.upload(&photos2, None, false, &[])?;
        Ok(())
    })
    .await
    .context("mapillary_tools task")??;
    let clusters: Vec<String> = tools
        .history()?
        .into_iter()
        .filter_map(|h| h.cluster_id)
        .collect();
    if clusters.is_empty() {
        bail!("mapillary_tools recorded no cluster_id");
    }
    println!(
        "demo: mapillary_tools uploaded {} sequence(s): cluster ids {}",
        clusters.len(),
        clusters.join(", ")
    );

    // 3. Follow the activity feed until every cluster is final.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + TRACK_TIMEOUT;
    let mut last: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let finals = loop {
        let nodes = feed_nodes(&http, &endpoints, &clusters).await?;
        for node in nodes.values() {
            let now: Vec<String> = node
                .stages
                .labelled()
                .iter()
                .map(|(_, s)| s.map(|s| s.to_string()).unwrap_or("-".into()))
                .collect();
            if last.get(&node.cluster_id) != Some(&now) {
                let shown: Vec<String> = node
                    .stages
                    .labelled()
                    .iter()
                    .zip(&now)
                    .map(|((label, _), v)| format!("{label}: {v}"))
                    .collect();
                println!("  cluster {} | {}", node.cluster_id, shown.join(" | "));
                last.insert(node.cluster_id.clone(), now);
            }
        }
        let done = clusters.iter().all(|c| {
            nodes
                .get(c)
                .is_some_and(|n| n.stages.all_finished() || n.stages.any_failed())
        });
        if done {
            break nodes;
        }
        if Instant::now() > deadline {
            bail!("uploads did not finish within {TRACK_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // 4. Link each cluster to its Mapillary sequence and images.
    println!("\ndemo: status");
    let mut all_ok = true;
    for cluster in &clusters {
        let node = finals
            .get(cluster)
            .ok_or_else(|| anyhow!("cluster {cluster} left the feed"))?;
        let state = if node.stages.all_finished() {
            "FINISHED"
        } else {
            "FAILED"
        };
        println!(
            "  cluster {cluster}: {state} ({} images, error_code {})",
            node.item_count.unwrap_or(0),
            node.error_code.as_deref().unwrap_or("-")
        );
        match &node.image_id {
            Some(image_id) if state == "FINISHED" => {
                let seq = image_sequence(&http, &endpoints, image_id).await?;
                let ids = sequence_image_ids(&http, &endpoints, &seq).await?;
                println!(
                    "    sequence {seq}: {} images, first {}",
                    ids.len(),
                    image_link(image_id)
                );
                if ids.len() as i64 != node.item_count.unwrap_or(-1) {
                    all_ok = false;
                    println!(
                        "    !! the sequence has {} images, the feed says {:?}",
                        ids.len(),
                        node.item_count
                    );
                }
            }
            _ => all_ok = false,
        }
    }
    if ci && !all_ok {
        bail!("not every upload ended FINISHED and linked");
    }
    println!("\ndemo: done — every upload FINISHED and linked");
    Ok(())
}

/// The feed nodes for `clusters` (walks pages until all are seen or the feed ends).
async fn feed_nodes(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    clusters: &[String],
) -> Result<BTreeMap<String, ActivityNode>> {
    let mut found = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let vars = feed::variables(defaults::DEMO_USER_ID, 50, after.as_deref(), 14);
        let body = http
            .get(format!("{}/graphql", endpoints.graph))
            .header("Authorization", format!("OAuth {}", defaults::DEMO_USER_TOKEN))
            .query(&[
                ("doc", feed::LATEST_ACTIVITY_DOC),
                ("variables", &vars.to_string()),
            ])
            .send()
            .await
            .context("activity feed request")?
            .text()
            .await?;
        let page = feed::parse_page(&body)?;
        for node in page.nodes {
            if clusters.contains(&node.cluster_id) {
                found.insert(node.cluster_id.clone(), node);
            }
        }
        if found.len() == clusters.len() || !page.has_next_page {
            return Ok(found);
        }
        after = page.end_cursor;
    }
}

async fn graph_get(http: &reqwest::Client, url: String) -> Result<Value> {
    let reply = http
        .get(&url)
        .header("Authorization", format!("OAuth {}", defaults::DEMO_USER_TOKEN))
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = reply.status();
    let body: Value = reply
        .json()
        .await
        .with_context(|| format!("GET {url}: not JSON"))?;
    if !status.is_success() {
        bail!("GET {url}: {status} {body}");
    }
    Ok(body)
}

async fn image_sequence(http: &reqwest::Client, endpoints: &Endpoints, image_id: &str) -> Result<String> {
    let v = graph_get(http, format!("{}/{image_id}?fields=id,sequence", endpoints.graph)).await?;
    v.get("sequence")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("image {image_id} has no sequence"))
}

async fn sequence_image_ids(http: &reqwest::Client, endpoints: &Endpoints, seq: &str) -> Result<Vec<String>> {
    let v = graph_get(http, format!("{}/image_ids?sequence_id={seq}", endpoints.graph)).await?;
    Ok(v.get("data")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|i| i.get("id").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}
