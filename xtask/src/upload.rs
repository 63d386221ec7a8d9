//! `cargo xtask upload DIR [--api URL --token JWT] [--user U]`: upload a folder of JPEGs through the
//! status API, as an app or a person without AWS credentials does, then follow it until every
//! upload is final and print the Mapillary links.
//!
//! 1. `POST /v1/sequences` announces DIR's `.jpg`/`.jpeg` files (names, sizes, md5s); the answer's
//!    `sequence_id` is kept in `DIR/.relay-upload.json` with the file list.
//! 2. Every file is `PUT` to its presigned URL (8 at a time), with a progress line (files, bytes).
//! 3. `POST …/complete` writes the manifest.
//! 4. The status is followed (`GET /v1/sequences/{id}`), one line per change, until final; then the
//!    links (`https://www.mapillary.com/app/?pKey=…`).
//!
//! **Resumable**: run it again on the same folder. A sequence still `AWAITING_FILES` gets fresh URLs
//! for the files not uploaded yet (`POST …/uploads`); a completed one is only followed. The state
//! file is removed once the sequence is final.
//!
//! Without `--api` it works against the local stack (started if needed, the user connected to the
//! simulator's demo user, as `push` does): the status API runs in-process (composed by
//! `status_api::compose` with the dev identity header), its presigned URLs point at moto, and after
//! `complete` zip-and-push and the poller run in-process as in `push --track`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use http_body_util::BodyExt;
use integration_tests::stack::{s3_client, sdk_config};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shared::adapters::s3::S3ObjectStore;
use shared::model::SequenceState;
use tower::ServiceExt;

use crate::push;

/// Files uploaded at the same time.
const PUT_CONCURRENCY: usize = 8;
/// Name of the resume file inside DIR.
pub const STATE_FILE: &str = ".relay-upload.json";
/// The dev identity header of the in-process API (local mode only).
const DEV_HEADER: &str = "x-relay-user";
/// How often a deployed API is asked for the status.
const POLL_EVERY: Duration = Duration::from_secs(5);
/// How long the status is followed at most.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// How a remote API is told who calls.
pub(crate) enum Auth {
    /// A bearer JWT (a deployed API).
    Bearer(String),
    /// The dev identity header `x-relay-user` (the status API under `cargo lambda watch`, local
    /// only: `RELAY_DEV_AUTH_HEADER`).
    DevUser(String),
}

/// Where the API is.
pub(crate) enum Api {
    /// An API over HTTP: base URL and how the caller is identified.
    Remote {
        base: String,
        auth: Auth,
        http: reqwest::Client,
    },
    /// The status API in-process against the local stack, called as `user`.
    Local { app: axum::Router, user: String },
}

impl Api {
    /// The status API over HTTP at `base`, called as `user` through the dev identity header (the
    /// demo's functions under watch).
    pub(crate) fn dev(base: &str, user: &str, http: reqwest::Client) -> Self {
        Api::Remote {
            base: base.to_string(),
            auth: Auth::DevUser(user.to_string()),
            http,
        }
    }

    /// `method path` with an optional JSON body → (status, JSON body).
    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let bytes = body.map(serde_json::to_vec).transpose()?.unwrap_or_default();
        match self {
            Api::Remote { base, auth, http } => {
                let url = format!("{}{path}", base.trim_end_matches('/'));
                let method = reqwest::Method::from_bytes(method.as_bytes())?;
                let mut req = http.request(method, &url);
                req = match auth {
                    Auth::Bearer(token) => req.bearer_auth(token),
                    Auth::DevUser(user) => req.header(DEV_HEADER, user),
                };
                if body.is_some() {
                    req = req.header("content-type", "application/json").body(bytes);
                }
                let resp = req.send().await.with_context(|| url.clone())?;
                let status = resp.status().as_u16();
                let text = resp.text().await?;
                Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
            }
            Api::Local { app, user } => {
                let req = axum::http::Request::builder()
                    .method(method)
                    .uri(path)
                    .header(DEV_HEADER, user.as_str())
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(bytes))?;
                let resp = app.clone().oneshot(req).await?;
                let status = resp.status().as_u16();
                let bytes = resp.into_body().collect().await?.to_bytes();
                Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
            }
        }
    }

    /// Where the resume file says the sequence lives.
    fn label(&self) -> String {
        match self {
            Api::Remote { base, .. } => base.trim_end_matches('/').to_string(),
            Api::Local { user, .. } => format!("local:{user}"),
        }
    }
}

/// One file of DIR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LocalFile {
    name: String,
    size: u64,
    /// Hex MD5 of the content: the API binds it into the presigned URL (S3 checks it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    md5: Option<String>,
}

/// `DIR/.relay-upload.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ResumeState {
    api: String,
    sequence_id: String,
    files: Vec<LocalFile>,
}

/// DIR's JPEGs (flat: the API takes one file name per image).
fn files_of(dir: &Path) -> Result<Vec<(LocalFile, PathBuf)>> {
    let mut out = Vec::new();
    for (rel, path) in push::jpegs_under(dir)? {
        if rel.contains('/') {
            bail!(
                "{} is in a subfolder: upload takes a flat folder of JPEGs (one name per image)",
                path.display()
            );
        }
        let bytes = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
        let size = bytes.len() as u64;
        let md5 = Some(hex::encode(<md5::Md5 as md5::Digest>::digest(&bytes)));
        out.push((LocalFile { name: rel, size, md5 }, path));
    }
    if out.is_empty() {
        bail!("no .jpg/.jpeg files in {}", dir.display());
    }
    Ok(out)
}

fn problem(what: &str, status: u16, body: &Value) -> anyhow::Error {
    let detail = body["detail"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| body.to_string());
    anyhow!("{what}: HTTP {status}: {detail}")
}

/// The sequence to upload into and the URLs still to use: resumed from DIR's state file when it
/// names a sequence of this API with the same files, else announced anew.
async fn start(api: &Api, dir: &Path, files: &[LocalFile]) -> Result<(String, Vec<Value>)> {
    let state_path = dir.join(STATE_FILE);
    if let Ok(text) = std::fs::read_to_string(&state_path) {
        let st: ResumeState =
            serde_json::from_str(&text).with_context(|| format!("{}", state_path.display()))?;
        if st.api == api.label() && st.files == files {
            let (status, body) = api
                .call("POST", &format!("/v1/sequences/{}/uploads", st.sequence_id), None)
                .await?;
            match (status, body["code"].as_str()) {
                (200, _) => {
                    let uploads = body["uploads"].as_array().cloned().unwrap_or_default();
                    eprintln!(
                        "upload: resuming sequence {} ({} of {} file(s) left)",
                        st.sequence_id,
                        uploads.len(),
                        files.len()
                    );
                    return Ok((st.sequence_id, uploads));
                }
                (409, Some("not-awaiting-files")) => {
                    eprintln!(
                        "upload: sequence {} is already complete; following it",
                        st.sequence_id
                    );
                    return Ok((st.sequence_id, Vec::new()));
                }
                (404, _) => eprintln!("upload: sequence {} is gone; starting anew", st.sequence_id),
                _ => return Err(problem("resuming", status, &body)),
            }
        } else {
            eprintln!(
                "upload: {} belongs to another API or file list; starting anew",
                state_path.display()
            );
        }
    }
    let announce = json!({ "files": files });
    let (status, body) = api.call("POST", "/v1/sequences", Some(&announce)).await?;
    if status != 201 {
        return Err(problem("announcing the sequence", status, &body));
    }
    let id = body["sequence_id"]
        .as_str()
        .context("no sequence_id")?
        .to_string();
    let st = ResumeState {
        api: api.label(),
        sequence_id: id.clone(),
        files: files.to_vec(),
    };
    std::fs::write(&state_path, serde_json::to_vec_pretty(&st)?)
        .with_context(|| format!("writing {}", state_path.display()))?;
    eprintln!("upload: announced sequence {id} ({} file(s))", files.len());
    Ok((id, body["uploads"].as_array().cloned().unwrap_or_default()))
}

/// PUTs each upload's file (by name) to its presigned URL, [`PUT_CONCURRENCY`] at a time, with a
/// progress line on stderr.
async fn put_all(uploads: &[Value], paths: &BTreeMap<String, PathBuf>) -> Result<()> {
    if uploads.is_empty() {
        return Ok(());
    }
    let http = reqwest::Client::new();
    let total_files = uploads.len();
    let total_bytes: u64 = uploads
        .iter()
        .filter_map(|u| u["headers"]["content-length"].as_str()?.parse::<u64>().ok())
        .sum();
    let done_files = Arc::new(AtomicU64::new(0));
    let done_bytes = Arc::new(AtomicU64::new(0));
    // MiB for real photos, KiB for small test images.
    let (unit, scale) = if total_bytes >= 1024 * 1024 {
        ("MiB", 1024.0 * 1024.0)
    } else {
        ("KiB", 1024.0)
    };
    let size = move |b: u64| b as f64 / scale;
    let results: Vec<Result<()>> = futures::stream::iter(uploads)
        .map(|u| {
            let (http, done_files, done_bytes) = (http.clone(), done_files.clone(), done_bytes.clone());
            async move {
                let name = u["name"].as_str().context("upload without name")?;
                let path = paths
                    .get(name)
                    .with_context(|| format!("{name} is not in the folder"))?;
                let bytes = tokio::fs::read(path)
                    .await
                    .with_context(|| format!("{}", path.display()))?;
                let len = bytes.len() as u64;
                let mut req = http.put(u["url"].as_str().context("upload without url")?);
                for (k, v) in u["headers"].as_object().into_iter().flatten() {
                    // reqwest sets Content-Length from the body (the signed value: the file's size).
                    if k != "content-length" {
                        req = req.header(k, v.as_str().unwrap_or_default());
                    }
                }
                let resp = req
                    .body(bytes)
                    .send()
                    .await
                    .with_context(|| format!("PUT {name}"))?;
                if !resp.status().is_success() {
                    bail!(
                        "PUT {name}: HTTP {}: {}",
                        resp.status(),
                        resp.text().await.unwrap_or_default()
                    );
                }
                let files = done_files.fetch_add(1, Ordering::Relaxed) + 1;
                let bytes = done_bytes.fetch_add(len, Ordering::Relaxed) + len;
                eprint!(
                    "\rupload: {files}/{total_files} file(s), {:.1}/{:.1} {unit}",
                    size(bytes),
                    size(total_bytes)
                );
                Ok(())
            }
        })
        .buffer_unordered(PUT_CONCURRENCY)
        .collect()
        .await;
    eprintln!();
    results.into_iter().collect()
}

/// One line per upload: our state, Mapillary's state and stages.
fn status_line(doc: &Value) -> String {
    let mut parts = vec![doc["state"].as_str().unwrap_or("?").to_string()];
    for u in doc["uploads"].as_array().into_iter().flatten() {
        let mly = &u["mapillary"];
        let stages: Vec<&str> = mly["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s["status"].as_str().unwrap_or("-"))
            .collect();
        parts.push(format!(
            "upload {}: {}{}",
            u["index"],
            u["state"].as_str().unwrap_or("?"),
            if mly.is_object() {
                format!(
                    " / Mapillary {} [{}]",
                    mly["state"].as_str().unwrap_or("?"),
                    stages.join(" ")
                )
            } else {
                String::new()
            }
        ));
    }
    parts.join("; ")
}

/// Whether the status document is final: the sequence FAILED, or UPLOADED with every upload FAILED
/// or tracked to a final Mapillary state.
fn is_final(doc: &Value) -> bool {
    match doc["state"].as_str() {
        Some("FAILED") => true,
        Some("UPLOADED") => doc["uploads"].as_array().into_iter().flatten().all(|u| {
            u["state"] == "FAILED" || matches!(u["mapillary"]["state"].as_str(), Some("FINISHED" | "FAILED"))
        }),
        _ => false,
    }
}

/// The links of a final status document, one line each.
fn links(doc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for u in doc["uploads"].as_array().into_iter().flatten() {
        for s in u["mapillary"]["sequences"].as_array().into_iter().flatten() {
            out.push(format!(
                "upload {}: Mapillary sequence {} {}",
                u["index"],
                s["id"].as_str().unwrap_or("?"),
                s["link"].as_str().unwrap_or("(no link yet)")
            ));
        }
        if let Some(e) = u["error"].as_str() {
            out.push(format!("upload {}: FAILED: {e}", u["index"]));
        }
    }
    out
}

async fn status(api: &Api, id: &str) -> Result<Value> {
    let (code, body) = api.call("GET", &format!("/v1/sequences/{id}"), None).await?;
    if code != 200 {
        return Err(problem("reading the status", code, &body));
    }
    Ok(body)
}

/// Follows a deployed API's status until final, printing each change.
async fn follow_remote(api: &Api, id: &str) -> Result<Value> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let doc = status(api, id).await?;
        let line = status_line(&doc);
        if line != last {
            eprintln!("upload: {line}");
            last = line;
        }
        if is_final(&doc) {
            return Ok(doc);
        }
        if started.elapsed() > FOLLOW_TIMEOUT {
            bail!("sequence {id} not final after {FOLLOW_TIMEOUT:?}; run upload again to keep following");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Drops DIR's JPEGs through `api` as a browser would: announced (or resumed from DIR's state
/// file), each file PUT to its presigned URL, then `complete` (the manifest is written). Returns the
/// sequence id. `cargo xtask upload` and the demo both drop this way.
pub(crate) async fn drop_folder(api: &Api, dir: &Path) -> Result<String> {
    let found = files_of(dir)?;
    let files: Vec<LocalFile> = found.iter().map(|(f, _)| f.clone()).collect();
    let paths: BTreeMap<String, PathBuf> = found.into_iter().map(|(f, p)| (f.name, p)).collect();
    let (id, uploads) = start(api, dir, &files).await?;
    put_all(&uploads, &paths).await?;
    let (code, body) = api
        .call("POST", &format!("/v1/sequences/{id}/complete"), None)
        .await?;
    match (code, body["code"].as_str()) {
        (202, _) => eprintln!("upload: complete; the manifest is written"),
        (409, Some("not-awaiting-files")) => {}
        _ => return Err(problem("completing (run upload again to resume)", code, &body)),
    }
    Ok(id)
}

/// `cargo xtask upload`.
pub async fn run(
    root: &Path,
    dir: &Path,
    api_url: Option<String>,
    token: Option<String>,
    user: Option<String>,
) -> Result<()> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    // Refuse a folder without JPEGs (or with subfolders) before anything starts.
    files_of(dir)?;

    let mut local = None;
    let api = match api_url {
        Some(base) => {
            let token = token
                .or_else(|| std::env::var("RELAY_API_TOKEN").ok())
                .context("--api needs --token JWT (or RELAY_API_TOKEN)")?;
            Api::Remote {
                base,
                auth: Auth::Bearer(token),
                http: reqwest::Client::new(),
            }
        }
        None => {
            let user = user.unwrap_or_else(|| "local-user".to_string());
            let state = push::ensure_stack(root).await?;
            let env = push::env_of(&state);
            let (zp_config, zp) = push::deps_from_env(&env).await?;
            if push::connect_user(&zp.tokens, &user).await? {
                eprintln!("upload: connected user {user} to the simulator's demo user");
            }
            let config = status_api::config::Config::from_lookup(|k| env.get(k).cloned())?;
            let endpoint = env
                .get("AWS_ENDPOINT_URL")
                .context("the stack exports no AWS_ENDPOINT_URL")?;
            let sdk = sdk_config(endpoint).await;
            let mut deps = status_api::compose::compose(&config, &sdk).await?;
            deps.objects = S3ObjectStore::new(s3_client(&sdk));
            deps.settings.dev_auth_header = Some(axum::http::HeaderName::from_static(DEV_HEADER));
            let app = status_api::router(Arc::new(deps));
            local = Some((state, env, zp_config, zp));
            Api::Local { app, user }
        }
    };

    let id = drop_folder(&api, dir).await?;

    let doc = match (&api, &local) {
        (Api::Local { user, .. }, Some((state, env, zp_config, zp))) => {
            // What AWS would do: the ingest queue's event source mapping, then the schedule.
            let sdk = sdk_config(&state.moto.url).await;
            let sqs = aws_sdk_sqs::Client::new(&sdk);
            let started = Instant::now();
            loop {
                let msgs = push::receive(&sqs, &zp_config.ingest_queue_url).await?;
                if !msgs.is_empty() {
                    push::invoke(zp, &sqs, &zp_config.ingest_queue_url, &msgs).await?;
                    continue;
                }
                let st = zip_and_push::sequence_status(&zp.repo, user, &id).await?;
                if st
                    .as_ref()
                    .is_some_and(|s| matches!(s.state, SequenceState::Uploaded | SequenceState::Failed))
                {
                    break;
                }
                if started.elapsed() > Duration::from_secs(600) {
                    bail!("sequence {id} not uploaded after 10 minutes");
                }
            }
            let doc = status(&api, &id).await?;
            eprintln!("upload: {}", status_line(&doc));
            if doc["state"] == "UPLOADED" {
                crate::track::track(env, &state.sim.url, user, &id).await?;
            }
            status(&api, &id).await?
        }
        _ => follow_remote(&api, &id).await?,
    };
    eprintln!("upload: {}", status_line(&doc));
    for line in links(&doc) {
        println!("{line}");
    }
    let _ = std::fs::remove_file(dir.join(STATE_FILE));
    if doc["state"] == "FAILED" {
        bail!(
            "sequence {id} FAILED: {}",
            doc["reason"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_means_failed_or_every_upload_settled() {
        let up = |state: &str, mly: Option<&str>| json!({"index": 0, "state": state, "mapillary": mly.map(|m| json!({"state": m, "stages": []}))});
        assert!(is_final(&json!({"state": "FAILED", "uploads": []})));
        assert!(!is_final(
            &json!({"state": "UPLOADING", "uploads": [up("UPLOADING", None)]})
        ));
        assert!(!is_final(
            &json!({"state": "UPLOADED", "uploads": [up("HANDED_OFF", Some("IN_PROGRESS"))]})
        ));
        assert!(!is_final(
            &json!({"state": "UPLOADED", "uploads": [up("HANDED_OFF", None)]})
        ));
        assert!(is_final(&json!({"state": "UPLOADED",
            "uploads": [up("HANDED_OFF", Some("FINISHED")), up("FAILED", None)]})));
    }

    #[test]
    fn links_and_lines_name_each_upload() {
        let doc = json!({"state": "UPLOADED", "uploads": [{"index": 0, "state": "HANDED_OFF", "error": null,
            "mapillary": {"state": "FINISHED", "stages": [{"status": "FINISHED"}],
                "sequences": [{"id": "abc", "link": "https://www.mapillary.com/app/?pKey=1"}]}}]});
        assert_eq!(
            links(&doc),
            ["upload 0: Mapillary sequence abc https://www.mapillary.com/app/?pKey=1"]
        );
        assert_eq!(
            status_line(&doc),
            "UPLOADED; upload 0: HANDED_OFF / Mapillary FINISHED [FINISHED]"
        );
    }

    #[test]
    fn nested_folders_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.jpg"), b"x").unwrap();
        assert!(files_of(dir.path())
            .unwrap_err()
            .to_string()
            .contains("flat folder"));
        std::fs::remove_dir_all(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("b.JPG"), b"xy").unwrap();
        let files = files_of(dir.path()).unwrap();
        assert_eq!(
            files[0].0,
            LocalFile {
                name: "b.JPG".into(),
                size: 2,
                // md5("xy")
                md5: Some("3e44107170a520582ade522fa73c1d15".into()),
            }
        );
    }
}
