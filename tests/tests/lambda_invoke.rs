//! Every sample in `events/` works with `cargo lambda invoke --data-file`: the three functions run as
//! real Lambda binaries under `cargo lambda watch` with the template's environment
//! ([`LocalStack::lambda_env`]) against a stack in the shared moto and an in-process simulator, and
//! each sample is sent with `cargo lambda invoke <function> --data-file <file> --invoke-address
//! 127.0.0.1 --invoke-port <port>` (the command the README documents).
//!
//! What the samples need is seeded first: the demo user's token for `user-1`; the manifest and
//! images of `user-1/seq-2026-11-24` (the S3 samples' sequence) and `user-1/seq-1` (what the API
//! Gateway samples ask for), dropped into the stack's bucket and handed to zip-and-push by the
//! emulated SQS event-source mapping ([`SqsEventSource`]). The S3 samples name the bucket of the
//! `relay-local` stack (`relay-local-sequences-123456789012`); zip-and-push handles only its own
//! bucket (`RELAY_BUCKET`), so each is sent with that name replaced by this stack's bucket. Every
//! sample must have an expectation here: a new file fails the test until one is added.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use aws_sdk_s3::primitives::ByteStream;
use integration_tests::esm::SqsEventSource;
use integration_tests::moto::shared_moto;
use integration_tests::stack::{self, LocalStack, SimEndpoints};
use integration_tests::watch::LambdaWatch;
use integration_tests::{repo_root, venv};
use mapillary_sim::defaults::{APP_ID, CLIENT_SECRET, DEMO_USERNAME, DEMO_USER_ID, DEMO_USER_TOKEN};
use mapillary_sim::{SimConfig, Simulator};
use relay_fixtures::{jpeg, track, TrackSpec};
use secrecy::SecretString;
use serde_json::Value;
use shared::adapters::dynamodb::DynamoRepository;
use shared::adapters::tokens::KmsTokenStore;
use shared::model::{SequenceState, StoredToken};
use shared::ports::TokenStore;
use time::OffsetDateTime;

/// The user every sample acts for.
const USER: &str = "user-1";
/// The bucket named in the S3 samples.
const SAMPLE_BUCKET: &str = "relay-local-sequences-123456789012";
/// The sequence of `events/sqs/s3-manifest-created*.json`.
const SAMPLE_SEQUENCE: &str = "seq-2026-11-24";
/// The sequence the API Gateway samples ask for.
const API_SEQUENCE: &str = "seq-1";

/// Puts `n` geotagged JPEGs and then `manifest.json` (`{}`) under `sequences/<USER>/<sequence>/`.
async fn put_sequence(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    sequence: &str,
    n: usize,
    seed: u64,
) -> Result<()> {
    let mut spec = TrackSpec::new(
        50.8225,
        -0.1372,
        OffsetDateTime::now_utc() - time::Duration::hours(3),
    );
    spec.seed_base = seed;
    for (i, img) in track(n, &spec).iter().enumerate() {
        s3.put_object()
            .bucket(bucket)
            .key(format!("sequences/{USER}/{sequence}/IMG_{i:04}.jpg"))
            .body(ByteStream::from(jpeg(img)))
            .send()
            .await
            .with_context(|| format!("PutObject {sequence} image {i}"))?;
    }
    s3.put_object()
        .bucket(bucket)
        .key(format!("sequences/{USER}/{sequence}/manifest.json"))
        .body(ByteStream::from_static(b"{}"))
        .send()
        .await
        .context("PutObject manifest.json")?;
    Ok(())
}

/// `cargo lambda invoke <function> --data-file <file>` against watch; the function's JSON answer.
async fn invoke(venvs: &venv::Venvs, port: u16, function: &str, file: &Path) -> Result<Value> {
    let out = tokio::process::Command::from(integration_tests::process::nested_cargo())
        .current_dir(repo_root())
        .env("PATH", venvs.path_with_aws_bin())
        .args(["lambda", "invoke", function, "--data-file"])
        .arg(file)
        .args(["--invoke-address", "127.0.0.1", "--invoke-port"])
        .arg(port.to_string())
        .output()
        .await
        .context("running cargo lambda invoke")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "cargo lambda invoke {function} --data-file {} failed ({}): {stdout} {}",
        file.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).with_context(|| format!("{function} answered non-JSON: {stdout}"))
}

/// The samples of `events/<dir>`, sorted.
fn samples(dir: &str) -> Result<Vec<PathBuf>> {
    let dir = repo_root().join("events").join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    Ok(files)
}

fn name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// An API Gateway v2 response: status code and the JSON body (or `null`).
fn http_response(v: &Value) -> Result<(u64, Value)> {
    let status = v["statusCode"]
        .as_u64()
        .ok_or_else(|| anyhow!("not an API Gateway v2 response: {v}"))?;
    let body = match v["body"].as_str() {
        None | Some("") => Value::Null,
        Some(b) => serde_json::from_str(b).with_context(|| format!("body is not JSON: {b}"))?,
    };
    Ok((status, body))
}

// `cargo lambda watch` (1.9.2) sends a constant `Lambda-Runtime-Deadline-Ms: 600000`; the functions fall back
// to their template timeout (`shared::deadline`), so `seq-1` is uploaded within this one invocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sample_event_works_with_cargo_lambda_invoke() -> Result<()> {
    let venvs = venv::ensure(&repo_root())?;
    let moto = shared_moto()?;
    let stack = LocalStack::create(&moto, &stack::unique_stack_name("invoke")).await?;
    let sim = Simulator::start(SimConfig::frozen(), "127.0.0.1:0").await?;
    // The web-app feed token, as the local stack gives it (seed-2022 lets only that token read the feed).
    let env = stack.lambda_env(
        &SimEndpoints::from_base(sim.base_url(), APP_ID, CLIENT_SECRET)
            .with_feed_token(mapillary_sim::defaults::WEB_APP_CLIENT_TOKEN),
    );

    // Seed: user-1's Mapillary token (the simulator's demo user), KMS-encrypted.
    let tokens = KmsTokenStore::new(
        stack.dynamodb(),
        stack.kms(),
        &stack.users_table,
        &stack.token_key_id,
    );
    let token = StoredToken {
        access_token: SecretString::from(DEMO_USER_TOKEN),
        refresh_token: None,
        expires_at: None,
        mapillary_user_id: Some(DEMO_USER_ID.into()),
        username: Some(DEMO_USERNAME.into()),
        updated_at: OffsetDateTime::now_utc(),
    };
    tokens.save(USER, &token).await?;
    // Seed: the S3 samples' sequence, in the stack's bucket (see the module comment).
    let s3 = stack.s3();
    put_sequence(&s3, &stack.bucket, SAMPLE_SEQUENCE, 6, 0).await?;
    // Seed: seq-1 in the stack's bucket; moto notifies the ingest queue.
    put_sequence(&s3, &stack.bucket, API_SEQUENCE, 5, 500).await?;

    // Kept after the run: watch.log has the functions' logs.
    let dir = repo_root().join(".scratch/lambda-invoke").join(&stack.stack_name);
    let watch = LambdaWatch::start(&repo_root(), &venvs, &env, &dir)?;
    let port = watch.port();
    let repo = DynamoRepository::new(stack.dynamodb(), &stack.uploads_table);

    // seq-1 through the emulated event-source mapping (the queue also holds moto's s3:TestEvent).
    let esm = SqsEventSource::new(stack.sqs(), &stack.ingest_queue_url, "zip-and-push");
    // Generous: a function whose sources changed since the pre-build compiles on its first invoke.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(o) = esm.poll_once(&watch).await? {
            ensure!(o.invoke_error.is_none(), "zip-and-push failed: {o:?}");
            ensure!(o.deleted + o.retried.len() == o.received, "{o:?}");
        }
        let seq = zip_and_push::sequence_status(&repo, USER, API_SEQUENCE).await?;
        if seq.as_ref().is_some_and(|s| s.state == SequenceState::Uploaded) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{API_SEQUENCE} not uploaded in time: {seq:?}; see {}",
            watch.log().display()
        );
    }

    // events/sqs → zip-and-push: an SQS batch response each.
    let sqs = samples("sqs")?;
    ensure!(!sqs.is_empty(), "no samples in events/sqs");
    for file in &sqs {
        let sample = std::fs::read_to_string(file).with_context(|| name(file))?;
        let ours = dir.join(name(file));
        std::fs::write(&ours, sample.replace(SAMPLE_BUCKET, &stack.bucket))
            .with_context(|| format!("writing {}", ours.display()))?;
        let v = invoke(&venvs, port, "zip-and-push", &ours).await?;
        let failures = v["batchItemFailures"]
            .as_array()
            .ok_or_else(|| anyhow!("{}: no batchItemFailures: {v}", name(file)))?;
        let failed: Vec<&str> = failures
            .iter()
            .filter_map(|f| f["itemIdentifier"].as_str())
            .collect();
        let expected: &[&str] = match name(file).as_str() {
            // The sequence is uploaded (first) or a duplicate of that (second): acknowledged.
            "s3-manifest-created.json" | "s3-manifest-created-moto.json" => &[],
            // Not a sequence key (a space in the id) → ingest error, acknowledged.
            "s3-manifest-key-encoded.json" => &[],
            // Skipped.
            "s3-test-event.json" => &[],
            // Missing manifest → sequence FAILED; unparseable body → ingest error: both acknowledged.
            "s3-two-records-one-bad.json" => &[],
            other => bail!("no expectation for events/sqs/{other}: add one to this test"),
        };
        assert_eq!(failed, expected, "{}: {v}", name(file));
    }
    let seq = zip_and_push::sequence_status(&repo, USER, SAMPLE_SEQUENCE)
        .await?
        .ok_or_else(|| anyhow!("{SAMPLE_SEQUENCE} was not recorded"))?;
    assert_eq!(seq.state, SequenceState::Uploaded, "{seq:?}");
    assert_eq!(seq.uploads.len(), 1, "{seq:?}");
    assert!(seq.uploads[0].cluster_id.is_some(), "{seq:?}");

    // events/eventbridge → poller: its run summary; both clusters come off the clusters queue.
    for file in samples("eventbridge")? {
        let v = invoke(&venvs, port, "poller", &file).await?;
        match name(&file).as_str() {
            "scheduled.json" => {
                for k in ["received", "created", "users", "checked", "written", "errors"] {
                    ensure!(v[k].is_u64(), "poller summary without {k}: {v}");
                }
                assert_eq!(v["received"], 2, "the two clusters handed off: {v}");
                assert_eq!(v["created"], 2, "{v}");
                assert_eq!(v["users"], 1, "{v}");
                assert_eq!(v["errors"], 0, "{v}");
                assert_eq!(v["cut_off"], false, "{v}");
            }
            other => bail!("no expectation for events/eventbridge/{other}: add one to this test"),
        }
    }

    // events/apigw-v2 → status-api: API Gateway v2 responses. The connection is deleted last.
    let mut api = samples("apigw-v2")?;
    // The webhook is registered before it is read and deleted.
    api.sort_by_key(|p| match name(p).as_str() {
        "put-webhook.json" => 0,
        "delete-connection.json" | "delete-webhook.json" => 2,
        _ => 1,
    });
    let mut seen = BTreeMap::new();
    for file in &api {
        let v = invoke(&venvs, port, "status-api", file).await?;
        let (status, body) = http_response(&v).with_context(|| name(file))?;
        let code = body["code"].as_str().unwrap_or_default().to_string();
        let n = name(file);
        let ctx = format!("{n}: {status} {body}");
        match n.as_str() {
            "list-sequences.json" => {
                assert_eq!(status, 200, "{ctx}");
                let mut ids: Vec<&str> = body["sequences"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["sequence_id"].as_str())
                    .collect();
                ids.sort_unstable();
                assert!(
                    ids.contains(&API_SEQUENCE) && ids.contains(&SAMPLE_SEQUENCE),
                    "{ctx}"
                );
            }
            "list-sequences-page.json" => {
                assert_eq!(status, 200, "{ctx}");
                let len = body["sequences"].as_array().map_or(0, Vec::len);
                assert!((1..=2).contains(&len), "limit=2: {ctx}");
            }
            "list-sequences-bad-limit.json" => {
                assert_eq!((status, code.as_str()), (400, "invalid-parameter"), "{ctx}")
            }
            "get-status.json" => {
                assert_eq!(status, 200, "{ctx}");
                assert_eq!(body["sequence_id"], API_SEQUENCE, "{ctx}");
                assert_eq!(body["state"], "UPLOADED", "{ctx}");
                assert_eq!(body["uploads"][0]["state"], "HANDED_OFF", "{ctx}");
                assert!(body["uploads"][0]["mapillary"].is_object(), "tracked: {ctx}");
            }
            "get-images.json" => {
                assert_eq!(status, 200, "{ctx}");
                assert_eq!(body["images"].as_array().map_or(0, Vec::len), 5, "{ctx}");
            }
            "get-status-bad-id.json" => {
                assert_eq!((status, code.as_str()), (400, "invalid-parameter"), "{ctx}")
            }
            "get-status-no-auth.json" => {
                assert_eq!((status, code.as_str()), (401, "unauthenticated"), "{ctx}")
            }
            "get-status-not-found.json" | "get-status-other-user.json" => {
                assert_eq!((status, code.as_str()), (404, "not-found"), "{ctx}")
            }
            "post-connect.json" => {
                assert_eq!(status, 200, "{ctx}");
                let url = body["authorize_url"].as_str().unwrap_or_default();
                assert!(
                    url.starts_with(&format!("{}/www/connect?", sim.base_url())),
                    "{ctx}"
                );
                assert!(
                    url.contains("redirect_uri=https%3A%2F%2Fabc123.execute-api.us-east-1.amazonaws.com%2Fv1%2Fmapillary%2Fcallback"),
                    "the callback URL derives from the request's domain: {ctx}"
                );
            }
            // A sequence dropped through the API: recorded AWAITING_FILES, one presigned PUT per file
            // under the caller's prefix (signing is local; nothing is uploaded here).
            "post-sequences.json" => {
                assert_eq!(status, 201, "{ctx}");
                assert_eq!(body["state"], "AWAITING_FILES", "{ctx}");
                let id = body["sequence_id"].as_str().unwrap_or_default();
                let uploads = body["uploads"].as_array().cloned().unwrap_or_default();
                assert_eq!(uploads.len(), 2, "{ctx}");
                assert_eq!(
                    uploads[0]["key"],
                    format!("sequences/{USER}/{id}/img_0001.jpg"),
                    "{ctx}"
                );
                assert_eq!(uploads[0]["headers"]["content-length"], "1048576", "{ctx}");
                assert!(
                    uploads[0]["url"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("X-Amz-Signature="),
                    "{ctx}"
                );
            }
            // The sample's state was never issued (a real one is single-use and expires).
            "get-callback.json" => assert_eq!((status, code.as_str()), (400, "state-invalid"), "{ctx}"),
            "get-callback-bad-state.json" => {
                assert_eq!((status, code.as_str()), (400, "invalid-parameter"), "{ctx}")
            }
            "get-connection.json" => {
                assert_eq!(status, 200, "{ctx}");
                assert_eq!(body["connected"], true, "{ctx}");
                assert_eq!(body["username"], DEMO_USERNAME, "{ctx}");
                assert!(!v.to_string().contains(DEMO_USER_TOKEN), "never the token: {ctx}");
            }
            // The sample's token is a placeholder the simulator does not know: /me refuses it.
            "put-connection.json" => {
                assert_eq!((status, code.as_str()), (400, "upload-token-rejected"), "{ctx}");
                assert!(
                    !v.to_string().contains("UPLOAD_TOKEN_PLACEHOLDER"),
                    "never echoed: {ctx}"
                );
            }
            "delete-connection.json" => {
                assert_eq!(status, 204, "{ctx}");
                assert!(tokens.load(USER).await?.is_none(), "the token is gone");
            }
            // A loopback receiver: accepted because the local stack sets RELAY_WEBHOOK_ALLOW_LOCAL
            // (deployed, it is refused as the private sample is); the secret is answered once.
            "put-webhook.json" => {
                assert_eq!(status, 201, "{ctx}");
                assert_eq!(body["url"], "http://127.0.0.1:8787/mapillary-relay", "{ctx}");
                assert!(
                    body["secret"].as_str().is_some_and(|s| s.starts_with("whsec_")),
                    "{ctx}"
                );
            }
            "put-webhook-private.json" => {
                assert_eq!((status, code.as_str()), (400, "webhook-url-refused"), "{ctx}")
            }
            // What API Gateway sends for a body that is not UTF-8 (schemathesis' negative fuzzing sends
            // `w*\xff)`): base64 with isBase64Encoded. The function answers its own 400 problem+json. (The
            // local `cargo lambda watch` HTTP front end answers such bodies 500 before the function runs,
            // which is why the schemathesis fuzzing phase runs with valid data only.)
            "put-webhook-not-utf8.json" => {
                assert_eq!((status, code.as_str()), (400, "invalid-parameter"), "{ctx}");
                assert!(
                    body["detail"].as_str().is_some_and(|d| d.contains("JSON object")),
                    "{ctx}"
                );
            }
            "get-webhook.json" => {
                assert_eq!(status, 200, "{ctx}");
                assert_eq!(body["enabled"], true, "{ctx}");
                assert!(body.get("secret").is_none(), "never the secret: {ctx}");
            }
            "delete-webhook.json" => assert_eq!(status, 204, "{ctx}"),
            other => bail!("no expectation for events/apigw-v2/{other}: add one to this test"),
        }
        seen.insert(n, status);
    }
    assert!(seen.len() >= 21, "{seen:?}");

    drop(watch);
    sim.shutdown().await;
    Ok(())
}
