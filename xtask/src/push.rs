//! `cargo xtask push DIR [--user U] [--sequence S]`: drop a local folder of JPEGs as a sequence into
//! the local stack and let zip-and-push handle it, in-process, exactly as the Lambda would.
//!
//! Steps: the stack is started if it is not up (`.stack/state.json` is reused otherwise); the user is
//! connected to the simulator (the simulator's demo user token, KMS-encrypted through the token store,
//! unless the user already has a token); DIR's `.jpg`/`.jpeg` files go to
//! `s3://<bucket>/sequences/<user>/<sequence>/…`, `manifest.json` last; then the ingest queue is
//! drained: every notification moto put there is wrapped as a Lambda SQS event and handed to
//! `zip_and_push::handle_batch` (composed with `zip_and_push::compose`, as `main.rs` does), acknowledged
//! messages are deleted, failed ones made visible again, until the queue is empty and the sequence is
//! final. The status document is printed as JSON on stdout; progress goes to stderr.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use aws_lambda_events::event::sqs::SqsEvent;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use futures::StreamExt;
use integration_tests::stack::{s3_client, sdk_config};
use mapillary_sim::defaults;
use secrecy::SecretString;
use serde_json::{json, Value};
use shared::adapters::s3::S3ObjectStore;
use shared::adapters::tokens::KmsTokenStore;
use shared::model::{SequenceState, StoredToken};
use shared::ports::TokenStore;
use zip_and_push::compose::{compose, ProductionDeps};
use zip_and_push::config::Config;
use zip_and_push::{handle_batch, sequence_status};

use crate::stack::{self, StackState};

/// The handler's dependencies with the AWS and Mapillary adapters.
pub type RelayDeps = ProductionDeps;

/// How long one invocation may run (Lambda's maximum).
const INVOCATION_TIMEOUT: Duration = Duration::from_secs(900);
/// How long `push` waits for its sequence to become final.
const OVERALL_TIMEOUT: Duration = Duration::from_secs(3600);
/// Images uploaded to S3 at the same time.
const PUT_CONCURRENCY: usize = 8;

/// The running local stack, started (without printing exports) when it is not up.
pub async fn ensure_stack(root: &Path) -> Result<StackState> {
    if let Some(state) = stack::read_state(root)? {
        if state.is_running() {
            return Ok(state);
        }
    }
    eprintln!("push: the local stack is not up; starting it");
    let mut opts = stack::UpOptions::new(defaults::APP_ID, defaults::CLIENT_SECRET);
    opts.print_exports = false;
    stack::up(root, &opts).await
}

/// The function's environment as `stack up` exported it.
pub fn env_of(state: &StackState) -> BTreeMap<String, String> {
    state.exports.iter().cloned().collect()
}

/// Config, SDK clients and adapters, composed by the function's own [`compose`] (as its `main.rs`
/// does), with S3 path-style for moto; the local stack's client secret is plain.
pub async fn deps_from_env(env: &BTreeMap<String, String>) -> Result<(Config, RelayDeps)> {
    let config = Config::from_lookup(|k| env.get(k).cloned())?;
    let sdk = stack::local_sdk(env, &config.mapillary).await?;
    let mut deps = compose(&config, &sdk).await?;
    deps.store = S3ObjectStore::new(s3_client(&sdk));
    Ok((config, deps))
}

/// Gives `user` the simulator demo user's token (KMS-encrypted in the UsersTable) unless they
/// already have one. Returns whether a token was written.
pub async fn connect_user(tokens: &KmsTokenStore, user: &str) -> Result<bool> {
    if tokens.load(user).await?.is_some() {
        return Ok(false);
    }
    let token = StoredToken {
        access_token: SecretString::from(defaults::DEMO_USER_TOKEN),
        refresh_token: None,
        expires_at: None,
        mapillary_user_id: Some(defaults::DEMO_USER_ID.into()),
        username: Some(defaults::DEMO_USERNAME.into()),
        updated_at: time::OffsetDateTime::now_utc(),
    };
    tokens.save(user, &token).await?;
    Ok(true)
}

/// `[A-Za-z0-9._-]{1,128}`, not `.`/`..` (the trigger contract's ids).
fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && id != "."
        && id != ".."
}

/// `<folder name>-<UTC timestamp>` with characters outside the id alphabet replaced by `-`.
fn default_sequence(dir: &Path) -> String {
    let name: String = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let now = time::OffsetDateTime::now_utc();
    let stamp = shared::drops::compact_stamp(now, 'T');
    let name = name.trim_matches('-');
    if name.is_empty() {
        format!("seq-{stamp}")
    } else {
        format!("{name}-{stamp}")
    }
}

/// `.jpg`/`.jpeg` files under `dir` (recursively), as (relative key with `/`, path), sorted.
pub fn jpegs_under(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                walk(base, &path, out)?;
                continue;
            }
            let is_jpeg = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"));
            if is_jpeg {
                let rel = path.strip_prefix(base)?;
                let key: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
                out.push((key.join("/"), path));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Puts every file at `prefix + key` (bounded concurrency).
pub async fn put_files(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    files: &[(String, PathBuf)],
) -> Result<()> {
    let results: Vec<Result<()>> = futures::stream::iter(files)
        .map(|(key, path)| async move {
            let body = ByteStream::from_path(path)
                .await
                .with_context(|| format!("reading {}", path.display()))?;
            s3.put_object()
                .bucket(bucket)
                .key(format!("{prefix}{key}"))
                .body(body)
                .send()
                .await
                .with_context(|| format!("PutObject {prefix}{key}"))?;
            Ok(())
        })
        .buffer_unordered(PUT_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

/// A Lambda SQS event with one record per message (body, ids and system attributes from SQS).
pub fn sqs_event(msgs: &[Message], source_arn: &str) -> Result<SqsEvent> {
    let records: Vec<Value> = msgs
        .iter()
        .map(|m| {
            let attrs: BTreeMap<String, String> = m
                .attributes()
                .map(|a| {
                    a.iter()
                        .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "messageId": m.message_id(),
                "receiptHandle": m.receipt_handle(),
                "body": m.body(),
                "md5OfBody": m.md5_of_body(),
                "attributes": attrs,
                "messageAttributes": {},
                "eventSource": "aws:sqs",
                "eventSourceARN": source_arn,
                "awsRegion": integration_tests::stack::REGION,
            })
        })
        .collect();
    Ok(serde_json::from_value(json!({ "Records": records }))?)
}

/// Receives up to 10 messages (1 s poll) with their system attributes.
pub async fn receive(sqs: &aws_sdk_sqs::Client, queue_url: &str) -> Result<Vec<Message>> {
    Ok(sqs
        .receive_message()
        .queue_url(queue_url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .send()
        .await
        .context("ReceiveMessage")?
        .messages()
        .to_vec())
}

/// One batch: the handler in-process, then acknowledged messages deleted and failed ones made
/// visible again after 2 s (what the event source mapping does, with a short retry delay).
pub async fn invoke(
    deps: &RelayDeps,
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    msgs: &[Message],
) -> Result<usize> {
    let arn = format!(
        "arn:aws:sqs:{}:{}:{}",
        integration_tests::stack::REGION,
        integration_tests::stack::ACCOUNT_ID,
        queue_url.rsplit('/').next().unwrap_or_default()
    );
    let resp = handle_batch(deps, sqs_event(msgs, &arn)?, Instant::now() + INVOCATION_TIMEOUT).await;
    let failed: Vec<&str> = resp
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    for m in msgs {
        let handle = m.receipt_handle().unwrap_or_default();
        if failed.contains(&m.message_id().unwrap_or_default()) {
            sqs.change_message_visibility()
                .queue_url(queue_url)
                .receipt_handle(handle)
                .visibility_timeout(2)
                .send()
                .await
                .context("ChangeMessageVisibility")?;
        } else {
            sqs.delete_message()
                .queue_url(queue_url)
                .receipt_handle(handle)
                .send()
                .await
                .context("DeleteMessage")?;
        }
    }
    Ok(failed.len())
}

/// `cargo xtask push DIR [--user U] [--sequence S] [--track]`. With `track`, the poller then runs
/// against the stack until every upload is final ([`crate::track`]); the status document printed
/// on stdout then carries the tracking records too (`"tracking"`).
pub async fn run(
    root: &Path,
    dir: &Path,
    user: Option<String>,
    sequence: Option<String>,
    track: bool,
) -> Result<()> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let user = user.unwrap_or_else(|| "local-user".to_string());
    let sequence = sequence.unwrap_or_else(|| default_sequence(dir));
    for (what, id) in [("--user", &user), ("--sequence", &sequence)] {
        if !valid_id(id) {
            bail!("{what} {id:?}: ids are 1-128 characters of [A-Za-z0-9._-], not \".\" or \"..\"");
        }
    }
    let files = jpegs_under(dir)?;
    if files.is_empty() {
        bail!("no .jpg/.jpeg files under {}", dir.display());
    }

    let state = ensure_stack(root).await?;
    let env = env_of(&state);
    let (config, deps) = deps_from_env(&env).await?;
    if connect_user(&deps.tokens, &user).await? {
        eprintln!(
            "push: connected user {user} to the simulator as {} ({})",
            defaults::DEMO_USERNAME,
            defaults::DEMO_USER_ID
        );
    }
    let sdk = sdk_config(&state.moto.url).await;
    let s3 = s3_client(&sdk);
    let sqs = aws_sdk_sqs::Client::new(&sdk);

    let prefix = format!("sequences/{user}/{sequence}/");
    eprintln!(
        "push: uploading {} image(s) to s3://{}/{prefix}",
        files.len(),
        config.bucket
    );
    put_files(&s3, &config.bucket, &prefix, &files).await?;
    s3.put_object()
        .bucket(&config.bucket)
        .key(format!("{prefix}manifest.json"))
        .body(ByteStream::from_static(b"{}"))
        .send()
        .await
        .context("PutObject manifest.json")?;
    eprintln!("push: manifest.json written; running zip-and-push on the ingest queue");

    let started = Instant::now();
    loop {
        let msgs = receive(&sqs, &config.ingest_queue_url).await?;
        if !msgs.is_empty() {
            let failed = invoke(&deps, &sqs, &config.ingest_queue_url, &msgs).await?;
            eprintln!(
                "push: handled a batch of {} message(s), {failed} to retry",
                msgs.len()
            );
            continue;
        }
        let status = sequence_status(&deps.repo, &user, &sequence).await?;
        let done = status
            .as_ref()
            .is_some_and(|s| matches!(s.state, SequenceState::Uploaded | SequenceState::Failed));
        if done {
            let status = status.ok_or_else(|| anyhow!("status vanished"))?;
            eprintln!(
                "push: {} — {} upload(s), {} rejected image(s), {:.1} s",
                status.state.as_str(),
                status.uploads.len(),
                status.rejected.len(),
                started.elapsed().as_secs_f64()
            );
            if !track {
                println!("{}", serde_json::to_string_pretty(&status)?);
                return Ok(());
            }
            let records = crate::track::track(&env, &state.sim.url, &user, &sequence).await?;
            let mut doc = serde_json::to_value(&status)?;
            doc["tracking"] = serde_json::to_value(&records)?;
            println!("{}", serde_json::to_string_pretty(&doc)?);
            return Ok(());
        }
        if status.is_none() && started.elapsed() > Duration::from_secs(30) {
            bail!(
                "no notification for s3://{}/{prefix}manifest.json arrived within 30 s",
                config.bucket
            );
        }
        if started.elapsed() > OVERALL_TIMEOUT {
            bail!("sequence {user}/{sequence} not final after {OVERALL_TIMEOUT:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_trigger_contract() {
        assert!(valid_id("user-1") && valid_id("a.b_c"));
        assert!(!valid_id("..") && !valid_id("a b") && !valid_id("") && !valid_id(&"x".repeat(129)));
        let d = default_sequence(Path::new("/tmp/My Photos"));
        assert!(valid_id(&d) && d.starts_with("My-Photos-"), "{d}");
        assert!(valid_id(&default_sequence(Path::new("/"))));
    }
}
