//! zip-and-push end to end on the local stack: real moto (S3, SQS, DynamoDB, KMS through the
//! `shared::adapters`; the stack created from `infra/template.yaml`) and the real in-process Mapillary
//! simulator. Objects are put into S3, the notification moto puts on the ingest queue is received and
//! wrapped into a Lambda `SqsEvent` shaped like `events/sqs/s3-manifest-created-moto.json`, and the
//! handler is called with it (acknowledged messages are then deleted, as the event source mapping
//! does). The stored zips are checked with mapillary_tools' own code (zip reader, EXIF reader,
//! `validate_image_desc`) from the pinned venv.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use futures::StreamExt;
use integration_tests::moto::shared_moto;
use integration_tests::stack::{self, LocalStack, SimEndpoints};
use integration_tests::{repo_root, venv};
use mapillary_sim::defaults::{APP_ID, CLIENT_SECRET, DEMO_USERNAME, DEMO_USER_ID, DEMO_USER_TOKEN};
use mapillary_sim::{SimConfig, SimHandle, Simulator, World as SimWorld};
use md5::{Digest, Md5};
use relay_fixtures::{jpeg, track, ImageSpec, TrackSpec};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use shared::adapters::s3::S3ObjectStore;
use shared::mapillary::retry::RetryPolicy;
use shared::model::{
    ClusterMessage, SequenceState, SequenceStatus, StoredToken, TokenKind, TokenRecord, UploadState,
};
use shared::ports::{ImageEntryReader, SequenceReader, TokenStore, UploadReader};
use time::macros::datetime;
use time::OffsetDateTime;
use zip_and_push::compose::{compose, ProductionDeps};
use zip_and_push::config::{Config, Tunables};
use zip_and_push::{handle_batch, sequence_status};

/// The producer's user id in S3 keys (mapped to the simulator's demo user by its token).
const USER: &str = "user-1";
/// The Lambda event sample whose shape the events are built from.
const EVENT_SAMPLE: &str = include_str!("../../events/sqs/s3-manifest-created-moto.json");

type Deps = ProductionDeps;

struct World {
    stack: LocalStack,
    sim: SimHandle,
    deps: Deps,
    http: reqwest::Client,
}

fn http() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

fn stored_token(access: &str, expires_at: Option<OffsetDateTime>) -> StoredToken {
    StoredToken {
        access_token: SecretString::from(access),
        refresh_token: None,
        expires_at,
        mapillary_user_id: Some(DEMO_USER_ID.into()),
        username: Some(DEMO_USERNAME.into()),
        updated_at: OffsetDateTime::now_utc(),
    }
}

/// A fresh stack in the shared moto, a fresh simulator, the handler's dependencies composed by
/// `zip_and_push::compose` from the function's environment exactly as `main.rs` composes them (then
/// the fast retry policy, `tunables` and a path-style S3 client for moto), and the demo user's token
/// written through the KMS token store for [`USER`].
async fn world(tag: &str, tunables: Tunables) -> Result<World> {
    world_with(tag, tunables, SimConfig::frozen()).await
}

/// [`world`] with the simulator in the named world.
async fn world_in(tag: &str, tunables: Tunables, sim_world: SimWorld) -> Result<World> {
    world_with(tag, tunables, SimConfig::world(sim_world)).await
}

async fn world_with(tag: &str, tunables: Tunables, sim_config: SimConfig) -> Result<World> {
    let endpoint = shared_moto()?;
    let stack = LocalStack::create(&endpoint, &stack::unique_stack_name(tag)).await?;
    let sim = Simulator::start(sim_config, "127.0.0.1:0").await?;
    let http = http()?;
    let env = stack.lambda_env(&SimEndpoints::from_base(sim.base_url(), APP_ID, CLIENT_SECRET));
    let config = Config::from_lookup(|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))?;
    let mut deps = compose(&config, stack.sdk_config()).await?;
    deps.store = S3ObjectStore::new(stack.s3());
    deps.mapillary = deps.mapillary.with_retry_policy(RetryPolicy::fast());
    // The test's tunables, but the bucket check as composed from the environment (RELAY_BUCKET).
    let own_bucket = deps.tunables.own_bucket.take();
    deps.tunables = Tunables {
        own_bucket: tunables.own_bucket.clone().or(own_bucket),
        ..tunables
    };
    deps.tokens
        .save(USER, &stored_token(DEMO_USER_TOKEN, None))
        .await?;
    Ok(World {
        stack,
        sim,
        deps,
        http,
    })
}

fn far_deadline() -> Instant {
    Instant::now() + Duration::from_secs(900)
}

fn specs(n: usize, seed_base: u64) -> Vec<ImageSpec> {
    let mut t = TrackSpec::new(48.2, 16.37, datetime!(2024-04-20 08:00:00.125 UTC));
    t.seed_base = seed_base;
    t.altitude = Some(187.25);
    track(n, &t)
}

fn named(specs: &[ImageSpec]) -> Vec<(String, Vec<u8>)> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("img_{i:04}.jpg"), jpeg(s)))
        .collect()
}

fn prefix(user: &str, seq: &str) -> String {
    format!("sequences/{user}/{seq}/")
}

impl World {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.stack
            .s3()
            .put_object()
            .bucket(&self.stack.bucket)
            .key(key)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .with_context(|| format!("PutObject {key}"))?;
        Ok(())
    }

    /// Puts the images (16 at a time), then the manifest last.
    async fn drop_sequence(
        &self,
        user: &str,
        seq: &str,
        images: &[(String, Vec<u8>)],
        manifest: &[u8],
    ) -> Result<()> {
        let p = prefix(user, seq);
        let results: Vec<Result<()>> = futures::stream::iter(images)
            .map(|(name, bytes)| self.put_owned(format!("{p}{name}"), bytes.clone()))
            .buffer_unordered(16)
            .collect()
            .await;
        results.into_iter().collect::<Result<()>>()?;
        self.put(&format!("{p}manifest.json"), manifest.to_vec()).await
    }

    async fn put_owned(&self, key: String, bytes: Vec<u8>) -> Result<()> {
        self.put(&key, bytes).await
    }

    /// Receives from the ingest queue until `n` S3 notifications with `Records` arrived; the
    /// `s3:TestEvent` moto sends when the notification is configured is deleted on the way.
    async fn notifications(&self, n: usize) -> Result<Vec<Message>> {
        let sqs = self.stack.sqs();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.len() < n {
            ensure!(
                Instant::now() < deadline,
                "only {} of {n} notifications arrived",
                out.len()
            );
            let got = sqs
                .receive_message()
                .queue_url(&self.stack.ingest_queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send()
                .await
                .context("ReceiveMessage ingest")?;
            for m in got.messages() {
                let body: Value = serde_json::from_str(m.body().unwrap_or_default())?;
                if body.get("Records").is_some() {
                    out.push(m.clone());
                } else {
                    self.delete_ingest(m).await?;
                }
            }
        }
        Ok(out)
    }

    async fn delete_ingest(&self, m: &Message) -> Result<()> {
        self.stack
            .sqs()
            .delete_message()
            .queue_url(&self.stack.ingest_queue_url)
            .receipt_handle(m.receipt_handle().unwrap_or_default())
            .send()
            .await
            .context("DeleteMessage")?;
        Ok(())
    }

    /// Makes `m` visible again and receives it back (a real SQS redelivery).
    async fn redeliver(&self, m: &Message) -> Result<Message> {
        self.stack
            .sqs()
            .change_message_visibility()
            .queue_url(&self.stack.ingest_queue_url)
            .receipt_handle(m.receipt_handle().unwrap_or_default())
            .visibility_timeout(0)
            .send()
            .await
            .context("ChangeMessageVisibility")?;
        let again = self.notifications(1).await?;
        let again = again.into_iter().next().ok_or_else(|| anyhow!("no redelivery"))?;
        ensure!(
            again.message_id() == m.message_id(),
            "a different message came back"
        );
        Ok(again)
    }

    /// Calls the handler with `msgs` as one batch, then deletes the acknowledged messages.
    async fn deliver(&self, msgs: &[Message], deadline: Instant) -> Result<SqsBatchResponse> {
        let resp = handle_batch(&self.deps, sqs_event(msgs)?, deadline).await;
        let failed: Vec<&str> = resp
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.as_str())
            .collect();
        for m in msgs {
            if !failed.contains(&m.message_id().unwrap_or_default()) {
                self.delete_ingest(m).await?;
            }
        }
        Ok(resp)
    }

    async fn status(&self, user: &str, seq: &str) -> Result<SequenceStatus> {
        sequence_status(&self.deps.repo, user, seq)
            .await?
            .ok_or_else(|| anyhow!("sequence {user}/{seq} unknown"))
    }

    async fn admin_get(&self, path: &str) -> Result<reqwest::Response> {
        let r = self
            .http
            .get(format!("{}{path}", self.sim.admin_url()))
            .send()
            .await?;
        ensure!(r.status() == 200, "GET /_sim{path}: {}", r.status());
        Ok(r)
    }

    async fn admin_post(&self, path: &str, body: Value) -> Result<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.sim.admin_url()))
            .json(&body)
            .send()
            .await?;
        ensure!(r.status() == 200, "POST /_sim{path}: {}", r.status());
        Ok(r.json().await?)
    }

    async fn requests(&self) -> Result<Vec<Value>> {
        Ok(self.admin_get("/requests").await?.json().await?)
    }

    async fn finish_upload_calls(&self) -> Result<usize> {
        Ok(self
            .requests()
            .await?
            .iter()
            .filter(|e| e["path"] == "/graph/finish_upload")
            .count())
    }

    async fn session_key(&self, user: &str, seq: &str, index: usize) -> Result<String> {
        let ups = self.deps.repo.list_uploads(user, seq).await?;
        Ok(ups
            .get(index)
            .ok_or_else(|| anyhow!("no upload {index}"))?
            .session_key
            .clone())
    }

    async fn stored_zip(&self, session_key: &str) -> Result<Vec<u8>> {
        Ok(self
            .admin_get(&format!("/sessions/{session_key}/bytes"))
            .await?
            .bytes()
            .await?
            .to_vec())
    }

    /// Every message on the clusters queue (received and deleted).
    async fn cluster_messages(&self) -> Result<Vec<ClusterMessage>> {
        let sqs = self.stack.sqs();
        let mut out = Vec::new();
        loop {
            let got = sqs
                .receive_message()
                .queue_url(&self.stack.clusters_queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await?;
            if got.messages().is_empty() {
                return Ok(out);
            }
            for m in got.messages() {
                out.push(serde_json::from_str(m.body().unwrap_or_default())?);
                sqs.delete_message()
                    .queue_url(&self.stack.clusters_queue_url)
                    .receipt_handle(m.receipt_handle().unwrap_or_default())
                    .send()
                    .await?;
            }
        }
    }

    /// The raw items of a sequence's partition, by sort key.
    async fn raw_sequence_items(
        &self,
        user: &str,
        seq: &str,
    ) -> Result<BTreeMap<String, HashMap<String, AttributeValue>>> {
        let out = self
            .stack
            .dynamodb()
            .query()
            .table_name(&self.stack.uploads_table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", AttributeValue::S(format!("SEQ#{user}#{seq}")))
            .consistent_read(true)
            .send()
            .await?;
        Ok(out
            .items()
            .iter()
            .filter_map(|i| Some((i.get("sk")?.as_s().ok()?.clone(), i.clone())))
            .collect())
    }
}

/// A Lambda SQS event shaped like the sample in `events/sqs/`, one record per received message
/// (body, message id, receipt handle and system attributes from SQS).
fn sqs_event(msgs: &[Message]) -> Result<SqsEvent> {
    let sample: Value = serde_json::from_str(EVENT_SAMPLE)?;
    let template = sample["Records"][0].clone();
    let records: Vec<Value> = msgs
        .iter()
        .map(|m| {
            let mut r = template.clone();
            r["messageId"] = json!(m.message_id());
            r["receiptHandle"] = json!(m.receipt_handle());
            r["body"] = json!(m.body());
            r["md5OfBody"] = json!(m.md5_of_body());
            let attrs: BTreeMap<String, String> = m
                .attributes()
                .map(|a| {
                    a.iter()
                        .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            r["attributes"] = json!(attrs);
            r
        })
        .collect();
    Ok(serde_json::from_value(json!({ "Records": records }))?)
}

// ------------------------------------------------------------------ mapillary_tools' view of a zip

/// Reads the zip with mapillary_tools 0.14.7's own code: `zipfile.ZipFile` + `namelist()` and
/// `ZipUploader._extract_sequence_md5sum` (what `mapillary_tools upload x.zip` does), then for every
/// entry the EXIF through `exif_read.ExifRead` and the MAP* description through
/// `validate_image_desc` (the description-file schema wants `filename` and `filetype`, which a zip
/// entry's EXIF description does not carry, so they are added as `mapillary_tools process` would).
const PY_CHECK: &str = r#"
import datetime, io, json, sys, zipfile
from pathlib import Path
from mapillary_tools.uploader import ZipUploader
from mapillary_tools.exif_read import ExifRead
from mapillary_tools.serializer.description import validate_image_desc, parse_capture_time

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)

def micros(dt):
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return (dt - EPOCH) // datetime.timedelta(microseconds=1)

path = Path(sys.argv[1])
with zipfile.ZipFile(path) as z:
    names = z.namelist()
    if not names:
        raise SystemExit("no entries")
with path.open("rb") as fp:
    md5sum = ZipUploader._extract_sequence_md5sum(fp)
entries = []
with zipfile.ZipFile(path) as z:
    for info in z.infolist():
        data = z.read(info)
        ex = ExifRead(io.BytesIO(data))
        tag = ex.tags.get("Image ImageDescription")
        desc = json.loads(str(tag.values))
        validate_image_desc({**desc, "filename": info.filename, "filetype": "image"})
        lon, lat = ex.extract_lon_lat()
        heading = ex.extract_direction()
        entries.append({
            "name": info.filename,
            "compress_type": info.compress_type,
            "date_time": list(info.date_time),
            "size": len(data),
            "desc": desc,
            "exif": {
                "lat": lat, "lon": lon,
                "time_us": micros(ex.extract_capture_time()),
                "altitude": ex.extract_altitude(),
                "heading": heading,
                "make": ex.extract_make(), "model": ex.extract_model(),
                "orientation": ex.extract_orientation(),
            },
            "desc_time_us": micros(parse_capture_time(desc["MAPCaptureTime"])),
        })
print(json.dumps({"names": names, "sequence_md5sum": md5sum, "entries": entries}))
"#;

/// mapillary_tools' reading of `zip` (see [`PY_CHECK`]); fails if its reader or validator raises.
fn mapillary_tools_view(zip: &[u8]) -> Result<Value> {
    let venvs = venv::ensure(&repo_root())?;
    let python = venvs
        .mapillary_tools()
        .parent()
        .map(|bin| bin.join("python"))
        .ok_or_else(|| anyhow!("no venv bin dir"))?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("upload.zip");
    std::fs::write(&path, zip)?;
    let out = Command::new(&python)
        .arg("-c")
        .arg(PY_CHECK)
        .arg(&path)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "mapillary_tools rejected the zip ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The zip passes mapillary_tools' reader and schema; entries are `0.jpg…` STORED at 1980-01-01;
/// each MAP* value matches both mapillary_tools' reading of the entry's EXIF and the fixture the
/// image was made from (1e-7°, 1 ms); the comment's md5 is over the originals. Returns the
/// entries' `MAPFilename`s.
fn check_zip(zip: &[u8], originals: &[(&str, &[u8], &ImageSpec)]) -> Result<Vec<String>> {
    let view = mapillary_tools_view(zip)?;
    let entries = view["entries"].as_array().ok_or_else(|| anyhow!("no entries"))?;
    assert_eq!(entries.len(), originals.len(), "entries");
    let by_name: HashMap<&str, (&[u8], &ImageSpec)> =
        originals.iter().map(|(n, b, s)| (*n, (*b, *s))).collect();
    let mut seq_md5 = Md5::new();
    let mut filenames = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e["name"], format!("{i}.jpg"));
        assert_eq!(e["compress_type"], 0, "STORED");
        assert_eq!(e["date_time"], json!([1980, 1, 1, 0, 0, 0]));
        let d = &e["desc"];
        let x = &e["exif"];
        let name = d["MAPFilename"]
            .as_str()
            .ok_or_else(|| anyhow!("no MAPFilename: {d}"))?;
        let (orig, spec) = by_name
            .get(name)
            .copied()
            .ok_or_else(|| anyhow!("entry {i} is {name}, not an input"))?;
        filenames.push(name.to_string());
        seq_md5.update(hex::encode(Md5::digest(orig)).as_bytes());
        // MAP* vs the entry's EXIF as mapillary_tools reads it.
        assert!(
            (f(&d["MAPLatitude"]) - f(&x["lat"])).abs() <= 1e-7,
            "{name}: {d} vs {x}"
        );
        assert!(
            (f(&d["MAPLongitude"]) - f(&x["lon"])).abs() <= 1e-7,
            "{name}: {d} vs {x}"
        );
        let dt = e["desc_time_us"].as_i64().unwrap_or(i64::MIN);
        let xt = x["time_us"].as_i64().unwrap_or(i64::MAX);
        assert!((dt - xt).abs() <= 1000, "{name}: capture time {dt} vs EXIF {xt}");
        assert!(
            (f(&d["MAPAltitude"]) - f(&x["altitude"])).abs() <= 1e-3,
            "{name}: {d} vs {x}"
        );
        assert!(
            (f(&d["MAPCompassHeading"]["TrueHeading"]) - f(&x["heading"])).abs() <= 1e-3,
            "{name}: {d} vs {x}"
        );
        assert_eq!(d["MAPDeviceMake"], x["make"], "{name}");
        assert_eq!(d["MAPDeviceModel"], x["model"], "{name}");
        assert_eq!(d["MAPOrientation"], x["orientation"], "{name}");
        // …and vs the ground truth the fixture was generated from.
        assert!(
            (f(&d["MAPLatitude"]) - spec.lat).abs() <= 1e-7,
            "{name}: {d} vs {}",
            spec.lat
        );
        assert!(
            (f(&d["MAPLongitude"]) - spec.lon).abs() <= 1e-7,
            "{name}: {d} vs {}",
            spec.lon
        );
        let truth = (spec.captured_at.unix_timestamp_nanos() / 1000) as i64;
        assert!((dt - truth).abs() <= 1000, "{name}: {dt} vs fixture {truth}");
    }
    assert_eq!(
        view["sequence_md5sum"].as_str(),
        Some(hex::encode(seq_md5.finalize()).as_str()),
        "sequence_md5sum is the md5 of the originals' md5s in entry order"
    );
    Ok(filenames)
}

/// Rupload log entries of one session key, in order.
fn session_log<'a>(log: &'a [Value], key: &str) -> Vec<&'a Value> {
    let path = format!("/rupload/{key}");
    log.iter().filter(|e| e["path"] == path.as_str()).collect()
}

/// Every POST started at the offset the server held (the GET's answer or the previous POST's end),
/// and the bytes the server received add up to the zip exactly once: nothing below the server's
/// offset was sent again. Returns the number of POSTs that delivered bytes.
fn assert_no_resend(entries: &[&Value], total_len: u64) -> usize {
    let mut server_offset = 0u64;
    let mut received = 0u64;
    let mut posts = 0;
    for e in entries {
        match e["method"].as_str() {
            Some("GET") => {
                assert_eq!(e["detail"]["offset"], server_offset, "GET offset: {entries:#?}");
            }
            Some("POST") => {
                let Some(detail) = e["detail"].as_object() else {
                    // Never reached the handler (e.g. the client was killed during the latency):
                    // no byte of it was stored.
                    continue;
                };
                let start = detail["start"].as_u64().unwrap_or(u64::MAX);
                assert_eq!(
                    start, server_offset,
                    "POST below/above the server offset: {entries:#?}"
                );
                assert_eq!(e["offset_header"], start.to_string(), "{entries:#?}");
                let got = detail["bytes_received"].as_u64().unwrap_or(0);
                received += got;
                server_offset += got;
                posts += usize::from(got > 0);
            }
            _ => {}
        }
    }
    assert_eq!(received, total_len, "bytes received over all POSTs: {entries:#?}");
    posts
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn thirty_images_land_as_one_cluster_with_a_zip_mapillary_tools_accepts() -> Result<()> {
    let w = world("zp-30", Tunables::default()).await?;
    let sp = specs(30, 0);
    let imgs = named(&sp);
    w.drop_sequence(USER, "s30", &imgs, b"{}").await?;
    let msgs = w.notifications(1).await?;
    let started = OffsetDateTime::now_utc();
    let resp = w.deliver(&msgs, far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");

    // The status document.
    let st = w.status(USER, "s30").await?;
    assert_eq!(st.state, SequenceState::Uploaded, "{st:?}");
    assert_eq!((st.image_count, st.accepted_count), (30, 30));
    assert!(st.rejected.is_empty(), "{:?}", st.rejected);
    assert_eq!(st.uploads.len(), 1);
    let up = &st.uploads[0];
    assert_eq!(up.state, UploadState::HandedOff);
    assert_eq!(up.image_count, 30);
    let cluster_id = up.cluster_id.clone().context("cluster id")?;

    // The DynamoDB records behind it.
    let seq = w
        .deps
        .repo
        .get_sequence(USER, "s30")
        .await?
        .context("sequence record")?;
    assert_eq!(seq.upload_ids, vec![up.upload_id.clone()]);
    assert_eq!(seq.bucket, w.stack.bucket);
    assert_eq!(seq.manifest_key, format!("{}manifest.json", prefix(USER, "s30")));
    assert!(seq.attempts >= 1);
    let ups = w.deps.repo.list_uploads(USER, "s30").await?;
    let u = &ups[0];
    assert_eq!(u.cluster_id.as_deref(), Some(cluster_id.as_str()));
    assert!(u.handle.is_some());
    assert!(u.session_key.starts_with("mly_relay_") && u.session_key.ends_with(".zip"));
    let (created, begun, finished) = (
        u.created_at,
        u.started_at.context("started_at")?,
        u.finished_at.context("finished_at")?,
    );
    assert!(
        created >= started - time::Duration::seconds(5) && created <= begun && begun <= finished,
        "{u:?}"
    );
    assert!(u.bytes_sent >= u.total_len && u.error.is_none(), "{u:?}");
    let images = w.deps.repo.list_images(&u.upload_id).await?;
    assert_eq!(images.len(), 30);
    for (i, im) in images.iter().enumerate() {
        assert_eq!(im.index as usize, i);
        assert_eq!(im.key, format!("{}img_{i:04}.jpg", prefix(USER, "s30")));
        assert_eq!(im.size as usize, imgs[i].1.len());
        let cp = im.checkpoint.as_ref().context("checkpoint")?;
        assert_eq!(cp.md5, hex::encode(Md5::digest(&imgs[i].1)));
    }
    let raw = w.raw_sequence_items(USER, "s30").await?;
    assert!(
        raw.contains_key("META") && raw.contains_key("UPLOAD#000"),
        "{:?}",
        raw.keys()
    );
    assert!(
        !raw["UPLOAD#000"].contains_key("gsi2pk"),
        "a handed-off upload leaves the sparse PENDING index"
    );
    assert_eq!(
        raw["META"]
            .get("gsi1pk")
            .and_then(|v| v.as_s().ok())
            .map(String::as_str),
        Some("USER#user-1")
    );

    // The cluster message.
    let msgs = w.cluster_messages().await?;
    assert_eq!(
        msgs,
        vec![ClusterMessage {
            upload_id: up.upload_id.clone(),
            user_id: USER.into(),
            sequence_id: "s30".into(),
            cluster_id: cluster_id.clone(),
        }]
    );

    // The zip, through mapillary_tools' own code.
    let zip = w.stored_zip(&u.session_key).await?;
    assert_eq!(zip.len() as u64, up.bytes);
    let originals: Vec<(&str, &[u8], &ImageSpec)> = imgs
        .iter()
        .zip(&sp)
        .map(|((n, b), s)| (n.as_str(), b.as_slice(), s))
        .collect();
    check_zip(&zip, &originals)?;

    // One finish_upload; the simulator processes the cluster to the end with all 30 images.
    assert_eq!(w.finish_upload_calls().await?, 1);
    w.sim.advance_clock(24 * 3600);
    let c: Value = w
        .admin_get(&format!("/clusters/{cluster_id}"))
        .await?
        .json()
        .await?;
    assert_eq!(c["failed"], false, "{c}");
    assert_eq!(c["accepted_images"], 30, "{c}");
    assert_eq!(c["sequences"].as_array().map(Vec::len), Some(1), "{c}");
    // The queue is drained: nothing was requeued.
    let sqs = w.stack.sqs();
    let left = sqs
        .receive_message()
        .queue_url(&w.stack.ingest_queue_url)
        .wait_time_seconds(1)
        .send()
        .await?;
    assert!(left.messages().is_empty(), "{:?}", left.messages());
    Ok(())
}

#[tokio::test]
async fn eleven_hundred_images_make_three_uploads_and_three_clusters() -> Result<()> {
    let w = world("zp-1100", Tunables::default()).await?;
    let imgs = named(&specs(1100, 5000));
    w.drop_sequence(USER, "big", &imgs, b"{}").await?;
    let msgs = w.notifications(1).await?;
    let resp = w.deliver(&msgs, far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");

    let st = w.status(USER, "big").await?;
    assert_eq!(st.state, SequenceState::Uploaded, "{st:?}");
    let counts: Vec<u32> = st.uploads.iter().map(|u| u.image_count).collect();
    assert_eq!(counts, [500, 500, 100]);
    assert!(
        st.uploads.iter().all(|u| u.state == UploadState::HandedOff),
        "{st:?}"
    );
    let mut ids: Vec<String> = st.uploads.iter().filter_map(|u| u.cluster_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    assert_eq!(w.finish_upload_calls().await?, 3);
    assert_eq!(w.sim.sim().world().clusters.len(), 3);
    let mut queued: Vec<String> = w
        .cluster_messages()
        .await?
        .into_iter()
        .map(|m| m.cluster_id)
        .collect();
    queued.sort();
    assert_eq!(queued, ids);
    // Each zip has its images in capture order (img_0000…0499, 0500…0999, 1000…1099).
    for (i, range) in [(0usize, 0..500usize), (1, 500..1000), (2, 1000..1100)] {
        let key = w.session_key(USER, "big", i).await?;
        let view = mapillary_tools_view(&w.stored_zip(&key).await?)?;
        let names: Vec<String> = view["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["desc"]["MAPFilename"].as_str().unwrap_or_default().to_string())
            .collect();
        let want: Vec<String> = range.map(|j| format!("img_{j:04}.jpg")).collect();
        assert_eq!(names, want, "upload {i}");
    }
    Ok(())
}

#[tokio::test]
async fn the_same_event_delivered_three_times_concurrently_uploads_once() -> Result<()> {
    let w = world("zp-dup", Tunables::default()).await?;
    let imgs = named(&specs(12, 100));
    w.drop_sequence(USER, "dup", &imgs, b"{}").await?;
    let msg = w.notifications(1).await?;
    let ev = || sqs_event(&msg);
    let (a, b, c) = tokio::join!(
        handle_batch(&w.deps, ev()?, far_deadline()),
        handle_batch(&w.deps, ev()?, far_deadline()),
        handle_batch(&w.deps, ev()?, far_deadline()),
    );
    let failures = [&a, &b, &c]
        .iter()
        .map(|r| r.batch_item_failures.len())
        .sum::<usize>();
    assert!(
        failures <= 2,
        "at least one delivery did the work: {a:?} {b:?} {c:?}"
    );
    // SQS redelivers the failed ones later: acknowledged as duplicates, no work.
    let again = w.redeliver(&msg[0]).await?;
    let resp = w.deliver(&[again], far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");

    assert_eq!(
        w.finish_upload_calls().await?,
        1,
        "one finish_upload in the simulator's log"
    );
    assert_eq!(w.sim.sim().world().clusters.len(), 1);
    let st = w.status(USER, "dup").await?;
    assert_eq!(st.uploads.len(), 1);
    assert_eq!(st.uploads[0].state, UploadState::HandedOff);
    assert_eq!(w.cluster_messages().await?.len(), 1);
    // Exactly one session was written, once.
    let key = w.session_key(USER, "dup", 0).await?;
    let log = w.requests().await?;
    let entries = session_log(&log, &key);
    assert_eq!(assert_no_resend(&entries, st.uploads[0].bytes), 1);
    let sessions: Vec<Value> = w.admin_get("/sessions").await?.json().await?;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    Ok(())
}

#[tokio::test]
async fn dotted_user_and_sequence_ids_never_share_uploads() -> Result<()> {
    // Issue 15, item 3: user `h` with sequence `a.b` and user `h.a` with sequence `b` both got the
    // upload id `h.a.b.000`; the second drop overwrote the first's image entries.
    let w = world("zp-dots", Tunables::default()).await?;
    for user in ["h", "h.a"] {
        w.deps
            .tokens
            .save(user, &stored_token(DEMO_USER_TOKEN, None))
            .await?;
    }
    let first = named(&specs(4, 500));
    let second = named(&specs(5, 600));
    w.drop_sequence("h", "a.b", &first, b"{}").await?;
    w.drop_sequence("h.a", "b", &second, b"{}").await?;
    let msgs = w.notifications(2).await?;
    let resp = w.deliver(&msgs, far_deadline()).await?;
    ensure!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let a = w.status("h", "a.b").await?;
    let b = w.status("h.a", "b").await?;
    assert_eq!(a.state, SequenceState::Uploaded, "{a:?}");
    assert_eq!(b.state, SequenceState::Uploaded, "{b:?}");
    assert_ne!(a.uploads[0].upload_id, b.uploads[0].upload_id);
    // Each upload keeps its own image entries.
    let keys = |v: Vec<shared::model::UploadImage>| v.into_iter().map(|i| i.key).collect::<Vec<_>>();
    let a_keys = keys(w.deps.repo.list_images(&a.uploads[0].upload_id).await?);
    let b_keys = keys(w.deps.repo.list_images(&b.uploads[0].upload_id).await?);
    assert_eq!(a_keys.len(), 4);
    assert_eq!(b_keys.len(), 5);
    assert!(
        a_keys.iter().all(|k| k.starts_with("sequences/h/a.b/")),
        "{a_keys:?}"
    );
    assert!(
        b_keys.iter().all(|k| k.starts_with("sequences/h.a/b/")),
        "{b_keys:?}"
    );
    assert_eq!(w.sim.sim().world().clusters.len(), 2);
    Ok(())
}

/// A clean run of `imgs` as sequence `seq`: the stored zip.
async fn clean_run(w: &World, seq: &str, imgs: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    w.drop_sequence(USER, seq, imgs, b"{}").await?;
    let msgs = w.notifications(1).await?;
    let resp = w.deliver(&msgs, far_deadline()).await?;
    ensure!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let key = w.session_key(USER, seq, 0).await?;
    w.stored_zip(&key).await
}

#[tokio::test]
async fn a_connection_dropped_mid_body_resumes_without_resending() -> Result<()> {
    let w = world("zp-drop", Tunables::default()).await?;
    let imgs = named(&specs(30, 300));
    // Same image bytes and names under another sequence id → the same zip bytes.
    let clean = clean_run(&w, "clean", &imgs).await?;
    assert!(clean.len() > 40_000, "the cut lands mid-body: {}", clean.len());

    w.admin_post(
        "/faults",
        json!({"method": "POST", "path": "/rupload/*", "times": 1,
               "action": {"kind": "drop_after_bytes", "bytes": 20000}}),
    )
    .await?;
    w.drop_sequence(USER, "drop", &imgs, b"{}").await?;
    let msgs = w.notifications(1).await?;
    let resp = w.deliver(&msgs, far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let st = w.status(USER, "drop").await?;
    assert_eq!(st.uploads[0].state, UploadState::HandedOff, "{st:?}");

    let key = w.session_key(USER, "drop", 0).await?;
    assert_ne!(key, w.session_key(USER, "clean", 0).await?);
    let zip = w.stored_zip(&key).await?;
    assert!(zip == clean, "stored bytes differ from the clean run");
    let log = w.requests().await?;
    let entries = session_log(&log, &key);
    let first_post = entries.iter().find(|e| e["method"] == "POST").context("a POST")?;
    assert_eq!(first_post["status"], Value::Null, "the first POST was cut");
    assert_eq!(first_post["detail"]["bytes_received"], 20000);
    assert_eq!(assert_no_resend(&entries, clean.len() as u64), 2, "{entries:#?}");
    assert_eq!(w.finish_upload_calls().await?, 2, "one per sequence");
    Ok(())
}

#[tokio::test]
async fn a_handler_killed_mid_upload_resumes_on_redelivery_without_resending() -> Result<()> {
    // No margin: the claim's lease ends at the invocation's deadline.
    let tunables = Tunables {
        deadline_margin: Duration::ZERO,
        ..Tunables::default()
    };
    let w = Arc::new(world("zp-kill", tunables).await?);
    let imgs = named(&specs(30, 400));
    let clean = clean_run(&w, "clean", &imgs).await?;

    // First POST: cut after 20000 bytes. Second POST (the client's resume): held for a minute,
    // during which the invocation is killed.
    w.admin_post(
        "/faults",
        json!({"method": "POST", "path": "/rupload/*", "times": 1,
               "action": {"kind": "drop_after_bytes", "bytes": 20000}}),
    )
    .await?;
    let hold = w
        .admin_post(
            "/faults",
            json!({"method": "POST", "path": "/rupload/*", "every": 2, "times": 1,
                   "action": {"kind": "latency", "ms": 60000}}),
        )
        .await?;
    let hold_id = hold["id"].as_u64().context("fault id")?;
    w.drop_sequence(USER, "kill", &imgs, b"{}").await?;
    let msgs = w.notifications(1).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    // Boxed, so that dropping it really drops the future (and its connections) mid-flight.
    let mut invocation = Box::pin(handle_batch(&w.deps, sqs_event(&msgs)?, deadline));
    let held = async {
        loop {
            let rules: Vec<Value> = w.admin_get("/faults").await?.json().await?;
            if rules.iter().any(|r| r["id"] == hold_id && r["hits"] == 1) {
                return Ok::<_, anyhow::Error>(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        r = &mut invocation => bail!("the invocation ended before it could be killed: {r:?}"),
        r = held => r?,
    }
    // Kill it: the future is dropped mid-POST (like a Lambda sandbox frozen for good).
    drop(invocation);
    let st = w.status(USER, "kill").await?;
    assert_eq!(st.uploads[0].state, UploadState::Uploading, "{st:?}");
    let key = w.session_key(USER, "kill", 0).await?;
    let session: Value = w.admin_get(&format!("/sessions/{key}")).await?.json().await?;
    assert_eq!(session["bytes_stored"], 20000, "{session}");

    // The dead invocation's lease runs out; SQS redelivers the message.
    tokio::time::sleep(deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1)).await;
    let again = w.redeliver(&msgs[0]).await?;
    let receives: u32 = again
        .attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(receives >= 2, "a redelivery: ApproximateReceiveCount {receives}");
    let resp = w.deliver(&[again], far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let st = w.status(USER, "kill").await?;
    assert_eq!(st.state, SequenceState::Uploaded, "{st:?}");
    assert_eq!(st.uploads[0].state, UploadState::HandedOff, "{st:?}");

    let zip = w.stored_zip(&key).await?;
    assert!(zip == clean, "stored bytes differ from the clean run");
    let log = w.requests().await?;
    let entries = session_log(&log, &key);
    // The resumed invocation asked for the offset first and got 20000.
    let resumed_get = entries.iter().rfind(|e| e["method"] == "GET").context("a GET")?;
    assert_eq!(resumed_get["detail"]["offset"], 20000, "{entries:#?}");
    assert_eq!(assert_no_resend(&entries, clean.len() as u64), 2, "{entries:#?}");
    assert_eq!(w.finish_upload_calls().await?, 2, "one per sequence");
    assert_eq!(w.cluster_messages().await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn bad_inputs_are_each_recorded_with_a_precise_reason_and_good_images_upload() -> Result<()> {
    let w = world("zp-bad", Tunables::default()).await?;
    let base = specs(9, 500);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut good: Vec<(String, Vec<u8>, ImageSpec)> = Vec::new();
    // Good images, with awkward key names, one with big-endian EXIF.
    for (i, n) in ["a.jpg", "with space.jpg", "a+b.jpg", "ünïcödé.jpg", "e.jpeg"]
        .iter()
        .enumerate()
    {
        let mut s = base[i].clone();
        s.big_endian = i == 1;
        let b = jpeg(&s);
        files.push((n.to_string(), b.clone()));
        good.push((n.to_string(), b, s));
    }
    let ok = jpeg(&base[5]);
    files.push((
        "png-named.jpg".into(),
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01".to_vec(),
    ));
    files.push(("truncated.jpg".into(), ok[..ok.len() / 2].to_vec()));
    files.push(("truncated-exif.jpg".into(), ok[..60].to_vec()));
    files.push(("empty.jpg".into(), Vec::new()));
    let mut nogps = base[6].clone();
    nogps.with_gps = false;
    files.push(("nogps.jpg".into(), jpeg(&nogps)));
    let mut null = base[7].clone();
    (null.lat, null.lon) = (0.0, 0.0);
    files.push(("null-island.jpg".into(), jpeg(&null)));
    let mut corrupt = jpeg(&base[8]);
    let at = corrupt
        .windows(6)
        .position(|w| w == b"Exif\0\0")
        .context("Exif")?
        + 6;
    let ifd = if &corrupt[at..at + 2] == b"II" {
        0xFFFF_FF00u32.to_le_bytes()
    } else {
        0xFFFF_FF00u32.to_be_bytes()
    };
    corrupt[at + 4..at + 8].copy_from_slice(&ifd);
    files.push(("corrupt-ifd.jpg".into(), corrupt));
    let mut listed: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    listed.extend(["missing.jpg", "../other/x.jpg", "sub/../../y.jpg", "a.jpg"].map(String::from));
    let manifest = json!({"images": listed, "future_field": true}).to_string();
    w.drop_sequence(USER, "bad", &files, manifest.as_bytes()).await?;

    // Sequence-level failures, in the same batch.
    let three = named(&specs(3, 600));
    w.drop_sequence(USER, "badjson", &three, b"{\"images\": [")
        .await?;
    w.drop_sequence("nobody", "s1", &three, b"{}").await?;
    w.deps
        .tokens
        .save("stranger", &stored_token("MLYARSIMnot0a0token0of0any0user", None))
        .await?;
    w.drop_sequence("stranger", "s1", &three, b"{}").await?;
    let msgs = w.notifications(4).await?;
    let resp = w.deliver(&msgs, far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");

    let st = w.status(USER, "bad").await?;
    assert_eq!(st.state, SequenceState::Uploaded, "{st:?}");
    assert_eq!(st.accepted_count, 5, "{:#?}", st.rejected);
    assert_eq!(st.uploads.len(), 1);
    assert_eq!(st.uploads[0].image_count, 5);
    assert_eq!(st.uploads[0].state, UploadState::HandedOff);
    let reason = |k: &str| -> String {
        st.rejected
            .iter()
            .find(|r| r.key == k)
            .map(|r| r.reason.clone())
            .unwrap_or_else(|| panic!("{k} not rejected: {:#?}", st.rejected))
    };
    let expect: [(&str, &str); 11] = [
        ("png-named.jpg", "not a JPEG"),
        ("truncated.jpg", "truncated JPEG"),
        ("truncated-exif.jpg", "truncated JPEG"),
        ("empty.jpg", "empty (0 bytes)"),
        ("nogps.jpg", "no GPS position"),
        ("null-island.jpg", "(0, 0)"),
        ("corrupt-ifd.jpg", "corrupt EXIF"),
        ("missing.jpg", "missing key"),
        ("../other/x.jpg", "'..'"),
        ("sub/../../y.jpg", "'..'"),
        ("a.jpg", "more than once"),
    ];
    for (key, needle) in expect {
        let r = reason(key);
        assert!(r.contains(needle), "{key}: {r:?} should say {needle:?}");
    }
    assert!(reason("png-named.jpg").starts_with("not a JPEG"));
    assert!(reason("corrupt-ifd.jpg").starts_with("corrupt EXIF"));
    assert!(reason("nogps.jpg").starts_with("no GPS position"));
    assert!(reason("missing.jpg").starts_with("missing key"));
    assert_eq!(st.rejected.len(), 11, "{:#?}", st.rejected);
    // The rejected list is what DynamoDB holds for the sequence.
    let rec = w.deps.repo.get_sequence(USER, "bad").await?.context("record")?;
    assert_eq!(rec.rejected, st.rejected);

    // The good images — awkward names and big-endian EXIF included — are in the zip.
    let key = w.session_key(USER, "bad", 0).await?;
    let zip = w.stored_zip(&key).await?;
    let originals: Vec<(&str, &[u8], &ImageSpec)> = good
        .iter()
        .map(|(n, b, s)| (n.as_str(), b.as_slice(), s))
        .collect();
    let mut in_zip = check_zip(&zip, &originals)?;
    in_zip.sort();
    let mut want: Vec<String> = good.iter().map(|(n, _, _)| n.clone()).collect();
    want.sort();
    assert_eq!(in_zip, want);

    // Sequence-level reasons.
    let bj = w.status(USER, "badjson").await?;
    assert_eq!(bj.state, SequenceState::Failed);
    let r = bj.reason.clone().unwrap_or_default();
    assert!(r.starts_with("malformed manifest.json"), "{r}");
    assert!(r.contains("EOF"), "the JSON error is quoted: {r}");
    let nb = w.status("nobody", "s1").await?;
    assert_eq!(nb.state, SequenceState::Failed);
    assert_eq!(
        nb.reason.as_deref(),
        Some("no Mapillary token for user nobody: connect the account")
    );
    let sg = w.status("stranger", "s1").await?;
    assert_eq!(sg.state, SequenceState::Failed, "{sg:?}");
    let r = sg.reason.clone().unwrap_or_default();
    assert!(r.starts_with("Mapillary rejected the token"), "{r}");
    assert!(
        !r.contains("MLYARSIMnot0a0token"),
        "no token material in reasons: {r}"
    );

    // Exactly one cluster (the good images'), one message.
    assert_eq!(w.finish_upload_calls().await?, 1);
    assert_eq!(w.cluster_messages().await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn malformed_notifications_are_recorded_as_ingest_errors_and_acknowledged() -> Result<()> {
    let w = world("zp-ingest", Tunables::default()).await?;
    // An event sample whose key is not `sequences/<user>/<sequence>/manifest.json` once decoded
    // (`..` as the sequence id), one that is not JSON, and the S3 test event.
    let bad_key: Value =
        serde_json::from_str(include_str!("../../events/sqs/s3-manifest-created-moto.json"))?;
    let mut body: Value = serde_json::from_str(bad_key["Records"][0]["body"].as_str().unwrap_or_default())?;
    body["Records"][0]["s3"]["bucket"]["name"] = json!(w.stack.bucket);
    body["Records"][0]["s3"]["object"]["key"] = json!("sequences%2Fuser-1%2F..%2Fmanifest.json");
    let test_event: Value = serde_json::from_str(include_str!("../../events/sqs/s3-test-event.json"))?;
    let bodies = [
        body.to_string(),
        "not json".to_string(),
        test_event["Records"][0]["body"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    ];
    let sqs = w.stack.sqs();
    for b in &bodies {
        sqs.send_message()
            .queue_url(&w.stack.ingest_queue_url)
            .message_body(b)
            .send()
            .await?;
    }
    // Receive them (plus moto's own TestEvent, which `notifications` would skip).
    let mut msgs = Vec::new();
    let until = Instant::now() + Duration::from_secs(20);
    while msgs.len() < 4 && Instant::now() < until {
        let got = sqs
            .receive_message()
            .queue_url(&w.stack.ingest_queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await?;
        msgs.extend(got.messages().iter().cloned());
    }
    assert_eq!(msgs.len(), 4);
    let resp = w.deliver(&msgs, far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let errors = w
        .stack
        .dynamodb()
        .query()
        .table_name(&w.stack.uploads_table)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(":pk", AttributeValue::S("INGEST_ERROR".into()))
        .send()
        .await?;
    let reasons: Vec<String> = errors
        .items()
        .iter()
        .filter_map(|i| i.get("reason")?.as_s().ok().cloned())
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("invalid sequence_id \"..\" in key")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("message body is not JSON")),
        "{reasons:?}"
    );
    assert!(w.sim.sim().world().clusters.is_empty());
    Ok(())
}

#[tokio::test]
async fn an_expiring_token_is_refreshed_and_saved_encrypted() -> Result<()> {
    let w = world("zp-refresh", Tunables::default()).await?;
    let t = w
        .admin_post("/tokens", json!({"user": DEMO_USER_ID, "oauth": true}))
        .await?;
    let old = t["access_token"].as_str().context("token")?.to_string();
    w.deps
        .tokens
        .save(
            USER,
            &stored_token(&old, Some(OffsetDateTime::now_utc() + time::Duration::minutes(5))),
        )
        .await?;
    let imgs = named(&specs(3, 800));
    w.drop_sequence(USER, "soon", &imgs, b"{}").await?;
    let msgs = w.notifications(1).await?;
    let resp = w.deliver(&msgs, far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    assert_eq!(
        w.status(USER, "soon").await?.uploads[0].state,
        UploadState::HandedOff
    );
    let saved = w.deps.tokens.load(USER).await?.context("token")?;
    assert_ne!(saved.access_token.expose_secret(), old);
    assert!(saved.expires_at.context("expiry")? > OffsetDateTime::now_utc() + time::Duration::days(1));
    let refreshes = w
        .requests()
        .await?
        .iter()
        .filter(|e| e["path"] == "/graph/token")
        .count();
    assert_eq!(refreshes, 1);
    Ok(())
}

#[tokio::test]
async fn in_oauth_upload_refused_a_sequence_waits_for_an_upload_token_then_resumes_with_it() -> Result<()> {
    let w = world_in("zp-refused", Tunables::default(), SimWorld::OauthUploadRefused).await?;
    let t = w
        .admin_post("/tokens", json!({"user": DEMO_USER_ID, "oauth": true}))
        .await?;
    let oauth = t["access_token"].as_str().context("token")?.to_string();
    w.deps.tokens.save(USER, &stored_token(&oauth, None)).await?;
    let imgs = named(&specs(5, 4200));
    w.drop_sequence(USER, "refused", &imgs, b"{}").await?;
    let msgs = w.notifications(1).await?;
    let resp = w.deliver(&msgs, far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let st = w.status(USER, "refused").await?;
    assert_eq!(st.state, SequenceState::AwaitingUploadToken, "{st:?}");
    assert!(
        st.reason
            .as_deref()
            .unwrap_or_default()
            .contains("PUT /v1/mapillary/connection"),
        "{st:?}"
    );
    assert!(!st.uploads[0].state.is_final(), "{st:?}");
    let rec = w.deps.tokens.load_record(USER).await?.context("record")?;
    assert!(rec.upload_token_required(), "marked in the encrypted store");
    assert_eq!(w.finish_upload_calls().await?, 0);

    // The user hands over an upload token; the same manifest uploaded again resumes the upload.
    let up = TokenRecord::new(stored_token(DEMO_USER_TOKEN, None), TokenKind::UploadToken);
    w.deps.tokens.put_record(USER, &up).await?;
    w.put(
        &format!("{}manifest.json", prefix(USER, "refused")),
        b"{}".to_vec(),
    )
    .await?;
    let msgs = w.notifications(1).await?;
    let resp = w.deliver(&msgs, far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let st = w.status(USER, "refused").await?;
    assert_eq!(st.state, SequenceState::Uploaded, "{st:?}");
    assert_eq!(st.uploads[0].state, UploadState::HandedOff, "{st:?}");
    assert_eq!(w.finish_upload_calls().await?, 1);
    let uploads_ok: Vec<Value> = w
        .requests()
        .await?
        .into_iter()
        .filter(|e| {
            e["status"] == 200
                && (e["path"] == "/graph/finish_upload"
                    || e["method"] == "POST"
                        && e["path"].as_str().is_some_and(|p| p.starts_with("/rupload/")))
        })
        .collect();
    assert!(!uploads_ok.is_empty());
    assert!(
        uploads_ok.iter().all(|e| e["token_kind"] == "user"),
        "only the upload token uploaded: {uploads_ok:?}"
    );
    Ok(())
}

#[tokio::test]
async fn in_partial_bytes_dropped_a_sequence_of_three_invocations_resends_nothing() -> Result<()> {
    let imgs = named(&specs(24, 4300));
    let clean = {
        let w = world("zp-three-clean", Tunables::default()).await?;
        clean_run(&w, "clean", &imgs).await?
    };
    let total = clean.len() as u64;
    let tunables = Tunables {
        max_post_bytes: total.div_ceil(3),
        deadline_margin: Duration::from_millis(4000),
        // finish_upload and saving its cluster_id must fit in what the last invocation has left.
        finish_timeout: Duration::from_millis(1000),
        cluster_save_budget: Duration::from_millis(500),
        ..Tunables::default()
    };
    let w = world_in("zp-three", tunables, SimWorld::PartialBytesDropped).await?;
    // Each invocation may start POSTs for 2 s (planning on moto included), and each POST takes
    // 2.5 s: one POST per invocation, ending well before the 6 s deadline.
    w.admin_post(
        "/faults",
        json!({"method": "POST", "path": "/rupload/*", "times": 10,
               "action": {"kind": "latency", "ms": 2500}}),
    )
    .await?;
    w.drop_sequence(USER, "three", &imgs, b"{}").await?;
    let mut invocations = 0;
    loop {
        let msgs = w.notifications(1).await?;
        invocations += 1;
        ensure!(invocations <= 5, "too many invocations");
        let resp = w
            .deliver(&msgs, Instant::now() + Duration::from_millis(6000))
            .await?;
        assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
        if w.status(USER, "three").await?.uploads[0].state == UploadState::HandedOff {
            break;
        }
    }
    assert_eq!(invocations, 3, "one bounded POST per invocation");
    let posts: Vec<Value> = w
        .requests()
        .await?
        .into_iter()
        .filter(|e| e["method"] == "POST" && e["path"].as_str().is_some_and(|p| p.starts_with("/rupload/")))
        .collect();
    let mut stored = 0u64;
    for p in &posts {
        assert_eq!(p["detail"]["complete"], true, "{p}");
        assert_eq!(
            p["detail"]["start"], stored,
            "0 bytes re-sent below the server's offset: {posts:?}"
        );
        stored += p["detail"]["bytes_received"].as_u64().context("bytes")?;
    }
    assert_eq!(posts.len(), 3);
    assert_eq!(stored, total);
    let key = w.session_key(USER, "three", 0).await?;
    assert_eq!(w.stored_zip(&key).await?, clean, "identical to a clean run");
    Ok(())
}

#[tokio::test]
async fn a_sequence_answered_5xx_forever_ends_failed_after_n_invocations_instead_of_looping() -> Result<()> {
    // Issue 15, item 2. The receive limit is out of the way (as it is for continuations, which
    // are new messages): only the sequence's own count of invocations without progress ends it.
    let tunables = Tunables {
        max_receives: 1000,
        max_invocations_without_progress: 3,
        ..Tunables::default()
    };
    let w = world("zp-stuck", tunables).await?;
    w.admin_post(
        "/faults",
        json!({"path": "/rupload/*", "times": 100000,
               "action": {"kind": "server_error", "status": 503}}),
    )
    .await?;
    let imgs = named(&specs(3, 4400));
    w.drop_sequence(USER, "stuck", &imgs, b"{}").await?;
    let mut msg = w.notifications(1).await?.remove(0);
    let mut invocations = 0;
    loop {
        invocations += 1;
        ensure!(invocations <= 6, "the sequence loops");
        let resp = w.deliver(std::slice::from_ref(&msg), far_deadline()).await?;
        if resp.batch_item_failures.is_empty() {
            break;
        }
        let seq = w
            .deps
            .repo
            .get_sequence(USER, "stuck")
            .await?
            .context("sequence")?;
        assert_eq!(seq.state, SequenceState::Uploading);
        assert_eq!(seq.progress.stalled, invocations - 1, "{seq:?}");
        msg = w.redeliver(&msg).await?;
    }
    // 1 planned (progress) + 3 without progress.
    assert_eq!(invocations, 4);
    let st = w.status(USER, "stuck").await?;
    assert_eq!(st.state, SequenceState::Failed, "{st:?}");
    let reason = st.reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with("gave up after 3 invocations without progress: "),
        "{reason}"
    );
    assert!(reason.contains("503"), "{reason}");
    assert!(!reason.contains("s3://"), "{reason}");
    assert!(
        st.uploads.iter().all(|u| u.state == UploadState::Failed),
        "{st:?}"
    );
    assert_eq!(w.finish_upload_calls().await?, 0);
    // Acknowledged and deleted: nothing is left on the ingest queue.
    let left = w
        .stack
        .sqs()
        .receive_message()
        .queue_url(&w.stack.ingest_queue_url)
        .wait_time_seconds(1)
        .send()
        .await?;
    assert!(left.messages().is_empty(), "{left:?}");
    Ok(())
}

#[tokio::test]
async fn a_delivery_finding_its_sequence_held_is_put_back_with_a_short_delay() -> Result<()> {
    use shared::idempotency::{sequence_claim_id, Claim, ClaimOutcome, ClaimStatus};
    use shared::ports::IdempotencyStore;
    let tunables = Tunables {
        held_retry_delay_s: 3,
        ..Tunables::default()
    };
    let w = world("zp-held", tunables).await?;
    let imgs = named(&specs(2, 4500));
    w.drop_sequence(USER, "held", &imgs, b"{}").await?;
    let msg = w.notifications(1).await?;
    let key = format!("{}manifest.json", prefix(USER, "held"));
    let now = OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let other = Claim {
        id: sequence_claim_id(&w.stack.bucket, &key),
        status: ClaimStatus::Inprogress,
        lease_until_ms: now + 600_000,
        owner: "another-invocation".into(),
        expiration: now / 1000 + 3600,
    };
    ensure!(matches!(
        w.deps.claims.claim(&other, now).await?,
        ClaimOutcome::Acquired { .. }
    ));
    let resp = w.deliver(&msg, far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "acknowledged: {resp:?}");
    ensure!(
        w.deps.repo.get_sequence(USER, "held").await?.is_none(),
        "no work done"
    );
    // The same notification is back on the queue, as a new message (its own receive count).
    let started = Instant::now();
    let back = w.notifications(1).await?;
    assert_eq!(back[0].body(), msg[0].body());
    assert_ne!(back[0].message_id(), msg[0].message_id());
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "delayed: {:?}",
        started.elapsed()
    );
    let receives = back[0]
        .attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .cloned();
    assert_eq!(receives.as_deref(), Some("1"));
    Ok(())
}

#[tokio::test]
async fn a_manifest_put_again_after_failed_retries_the_failed_upload_and_keeps_the_handed_off_one(
) -> Result<()> {
    // Issue 15, item 4: two uploads of three images; the second finish_upload is rate limited
    // (nothing created) and the single delivery allowed gives the sequence up.
    let tunables = Tunables {
        max_images_per_upload: 3,
        max_receives: 1,
        ..Tunables::default()
    };
    let w = world("zp-redrop", tunables).await?;
    w.admin_post(
        "/faults",
        json!({"path": "/graph/finish_upload", "every": 2, "times": 1,
               "action": {"kind": "rate_limited"}}),
    )
    .await?;
    let imgs = named(&specs(6, 4600));
    w.drop_sequence(USER, "redrop", &imgs, b"{}").await?;
    let msgs = w.notifications(1).await?;
    let resp = w.deliver(&msgs, far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let failed = w.status(USER, "redrop").await?;
    assert_eq!(failed.state, SequenceState::Failed, "{failed:?}");
    assert_eq!(failed.attempt, 1);
    assert_eq!(failed.uploads[0].state, UploadState::HandedOff);
    assert_eq!(failed.uploads[1].state, UploadState::Failed);
    let kept = failed.uploads[0]
        .cluster_id
        .clone()
        .context("cluster of upload 0")?;
    let handle0 = {
        let ups = w.deps.repo.list_uploads(USER, "redrop").await?;
        ups[0].handle.clone().context("handle of upload 0")?
    };

    // The user puts the same manifest again: a new notification.
    w.put(
        &format!("{}manifest.json", prefix(USER, "redrop")),
        b"{}".to_vec(),
    )
    .await?;
    let msgs = w.notifications(1).await?;
    let resp = w.deliver(&msgs, far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let st = w.status(USER, "redrop").await?;
    assert_eq!(st.state, SequenceState::Uploaded, "{st:?}");
    assert_eq!(st.attempt, 2);
    assert_eq!(st.uploads[0].state, UploadState::HandedOff);
    assert_eq!(st.uploads[0].cluster_id.as_deref(), Some(kept.as_str()), "kept");
    assert_eq!(st.uploads[1].state, UploadState::HandedOff, "{st:?}");
    // The simulator: one finish_upload with upload 0's handle, two clusters, two cluster messages.
    let finishes: Vec<Value> = w
        .requests()
        .await?
        .into_iter()
        .filter(|e| e["path"] == "/graph/finish_upload")
        .collect();
    assert_eq!(finishes.len(), 3, "ok, rate limited, ok: {finishes:?}");
    let clusters: Vec<(String, String)> = w
        .sim
        .sim()
        .world()
        .clusters
        .iter()
        .map(|c| (c.id.clone(), c.file_handle.clone()))
        .collect();
    assert_eq!(clusters.len(), 2, "{clusters:?}");
    assert_eq!(
        clusters.iter().filter(|(_, h)| *h == handle0).count(),
        1,
        "upload 0 finished once: {clusters:?}"
    );
    let msgs = w.cluster_messages().await?;
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_eq!(msgs.iter().filter(|m| m.cluster_id == kept).count(), 1);
    Ok(())
}

#[tokio::test]
async fn one_user_gets_at_most_its_share_and_a_crashed_slot_ends_with_its_lease() -> Result<()> {
    // Issue 15, item 2: user-1 drops three sequences, user-2 one, delivered in one batch with two
    // sequences per user at most (the slots are items of the IdempotencyTable in moto).
    use shared::ports::IdempotencyStore;
    let tunables = Tunables {
        max_active_sequences_per_user: 2,
        held_retry_delay_s: 1,
        ..Tunables::default()
    };
    let w = world("zp-share", tunables).await?;
    w.deps
        .tokens
        .save("user-2", &stored_token(DEMO_USER_TOKEN, None))
        .await?;
    // Every POST takes 0.5 s: the four runs overlap.
    w.admin_post(
        "/faults",
        json!({"method": "POST", "path": "/rupload/*", "times": 10,
               "action": {"kind": "latency", "ms": 500}}),
    )
    .await?;
    let drops = [
        ("user-1", "a1"),
        ("user-1", "a2"),
        ("user-1", "a3"),
        ("user-2", "b1"),
    ];
    for (i, (user, seq)) in drops.iter().enumerate() {
        w.drop_sequence(user, seq, &named(&specs(2, 4700 + 10 * i as u64)), b"{}")
            .await?;
    }
    let msgs = w.notifications(4).await?;
    let resp = w.deliver(&msgs, far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    let uploaded = |st: Option<SequenceState>| st == Some(SequenceState::Uploaded);
    let repo = &w.deps.repo;
    let state = |user: &'static str, seq: &'static str| async move {
        Ok::<_, anyhow::Error>(repo.get_sequence(user, seq).await?.map(|s| s.state))
    };
    assert!(uploaded(state("user-2", "b1").await?), "user-2 is not starved");
    let mut waiting = Vec::new();
    for seq in ["a1", "a2", "a3"] {
        if !uploaded(state("user-1", seq).await?) {
            waiting.push(seq);
        }
    }
    assert_eq!(waiting.len(), 1, "two of user-1's went, one waits: {waiting:?}");
    // The waiting one is back on the queue (a new message, after its delay) and goes now.
    let back = w.notifications(1).await?;
    assert!(
        back[0]
            .body()
            .unwrap_or_default()
            .contains(&format!("user-1%2F{}", waiting[0]))
            || back[0]
                .body()
                .unwrap_or_default()
                .contains(&format!("user-1/{}", waiting[0])),
        "{back:?}"
    );
    let resp = w.deliver(&back, far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    assert!(uploaded(state("user-1", waiting[0]).await?));

    // Two invocations crash holding user-2's slots (leases of 2 s): user-2's next drop waits, then
    // goes once the leases ended.
    let now = OffsetDateTime::now_utc().unix_timestamp() * 1000;
    for holder in ["crashed-1", "crashed-2"] {
        ensure!(
            w.deps
                .claims
                .take_user_slot("user-2", holder, now + 2000, now, 2)
                .await?
        );
    }
    ensure!(
        !w.deps
            .claims
            .take_user_slot("user-2", "third", now + 2000, now, 2)
            .await?
    );
    w.drop_sequence("user-2", "b2", &named(&specs(2, 4800)), b"{}")
        .await?;
    let msgs = w.notifications(1).await?;
    let resp = w.deliver(&msgs, far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    ensure!(
        w.deps.repo.get_sequence("user-2", "b2").await?.is_none(),
        "b2 waits"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let back = w.notifications(1).await?;
    let resp = w.deliver(&back, far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    assert!(
        uploaded(state("user-2", "b2").await?),
        "the crashed slots expired"
    );
    Ok(())
}

#[tokio::test]
async fn a_manifest_put_again_while_its_sequence_runs_waits_then_is_a_recorded_no_op() -> Result<()> {
    // Issue 15, item 4, through moto's notifications: the second put of manifest.json arrives while
    // the first run uploads; it waits (put back, acknowledged) instead of running beside it, and
    // once the sequence is UPLOADED it does nothing but leave a record.
    let tunables = Tunables {
        held_retry_delay_s: 1,
        ..Tunables::default()
    };
    let w = world("zp-busy", tunables).await?;
    w.admin_post(
        "/faults",
        json!({"method": "POST", "path": "/rupload/*", "times": 1,
               "action": {"kind": "latency", "ms": 3000}}),
    )
    .await?;
    let imgs = named(&specs(3, 4900));
    w.drop_sequence(USER, "busy", &imgs, b"{}").await?;
    let first = w.notifications(1).await?;
    let manifest = format!("{}manifest.json", prefix(USER, "busy"));
    let (a, b) = tokio::join!(w.deliver(&first, far_deadline()), async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        w.put(&manifest, b"{ }".to_vec()).await?;
        let second = w.notifications(1).await?;
        w.deliver(&second, far_deadline()).await
    });
    let (a, b) = (a?, b?);
    assert!(a.batch_item_failures.is_empty(), "{a:?}");
    assert!(
        b.batch_item_failures.is_empty(),
        "acknowledged, not failed: {b:?}"
    );
    let st = w.status(USER, "busy").await?;
    assert_eq!(st.state, SequenceState::Uploaded, "{st:?}");
    assert_eq!(st.attempt, 1);
    // The second notification is back after its delay: a re-drop after UPLOADED, recorded.
    let back = w.notifications(1).await?;
    let resp = w.deliver(&back, far_deadline()).await?;
    assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
    assert_eq!(w.status(USER, "busy").await?, st, "nothing changed");
    assert_eq!(w.finish_upload_calls().await?, 1, "never two runs");
    assert_eq!(w.sim.sim().world().clusters.len(), 1);
    let errors = w
        .stack
        .dynamodb()
        .query()
        .table_name(&w.stack.uploads_table)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(":pk", AttributeValue::S("INGEST_ERROR".into()))
        .send()
        .await?;
    let reasons: Vec<String> = errors
        .items()
        .iter()
        .filter_map(|i| i.get("reason")?.as_s().ok().cloned())
        .collect();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].starts_with("the sequence is already uploaded"),
        "{reasons:?}"
    );
    Ok(())
}
