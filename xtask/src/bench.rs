//! `cargo xtask bench zip-and-push`: the benchmark, in one run.
//!
//! A private moto + a stack of `infra/template.yaml` + an in-process simulator storing uploads in
//! files (`StorageMode::Directory`, so 2 GiB do not sit in RAM). 400 geotagged 5 MiB JPEGs (padded
//! with COM segments by `relay-fixtures`) are written to disk and put into S3 as two sequences: the
//! first 40 (200 MiB) and all 400 (2 GiB). Measured:
//! * the **release** `zip-and-push` binary, run as a child process behind a minimal Lambda Runtime
//!   API served here, once per sequence: wall time from handing out the event to the response, and
//!   peak RSS (`VmHWM` of the child from `/proc/<pid>/status`);
//! * (a) raw GETs of the same 400 objects with the same SDK adapter call
//!   (`S3ObjectStore::get_object_chunks`) and the same number in flight as the function's fetcher
//!   (`zipstream::fetch_concurrency`);
//! * (b) one raw streamed POST of the same byte count to the simulator's rupload (each baseline
//!   three times; the median counts);
//! * mapillary_tools 0.14.7 on the same files from local disk to the same simulator: `process`,
//!   then the default per-image `upload`, and `zip` + `upload` of the zip (time and peak RSS each).
//!
//! Prints a Markdown table; `docs/benchmarks.md` records the figures.
//!
//! For quick iterations: `RELAY_BENCH_SKIP_TOOLS=1` skips the mapillary_tools rows;
//! `RELAY_BENCH_LOG=<filter>` (e.g. `info`) runs the function with that `RUST_LOG` and keeps its
//! logs in `target/bench-logs/` (by default it logs at `warn` into the temporary directory);
//! `RELAY_BENCH_FN_ENV="K=V K=V"` adds variables to the function's environment (experiments,
//! e.g. glibc `MALLOC_ARENA_MAX=2`); `RELAY_BENCH_FN_BIN=<path>` runs that zip-and-push binary
//! instead of building the release one (profiling: `cargo build --profile bench-harness -p
//! zip-and-push` keeps symbols, then `RELAY_BENCH_FN_BIN=target/bench-harness/zip-and-push`).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use integration_tests::mapillary_tools::{Account, Endpoints as ToolsEndpoints, MapillaryTools};
use integration_tests::moto::MotoServer;
use integration_tests::stack::{self, LocalStack, SimEndpoints};
use mapillary_sim::defaults;
use mapillary_sim::{SimConfig, Simulator, StorageMode};
use relay_fixtures::{track, try_jpeg, TrackSpec};
use serde_json::{json, Value};
use shared::adapters::s3::S3ObjectStore;
use shared::ports::ObjectStore;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::push;
use crate::venv;

const USER: &str = "bench";
const IMAGES: usize = 400;
const SMALL_IMAGES: usize = 40;
const IMAGE_BYTES: usize = 5 * 1024 * 1024;
const MIB: f64 = 1024.0 * 1024.0;

/// One measured row.
struct Row {
    what: String,
    bytes: u64,
    wall: Duration,
    peak_rss_kib: Option<u64>,
    /// CPU seconds during the row: (the measured process if separate, moto, this process — the
    /// simulator and the runtime API live here).
    cpu: Option<(Option<f64>, f64, f64)>,
}

/// User + system CPU seconds of a live process (`/proc/<pid>/stat`, fields 14 and 15, in clock
/// ticks of 1/100 s — `USER_HZ` is 100 on every Linux ABI that matters here).
fn cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

/// CPU seconds of moto and of this process, for deltas around a measurement.
struct CpuMark {
    moto_pid: String,
    moto: f64,
    own: f64,
}

impl CpuMark {
    fn now(moto_pid: u32) -> Self {
        let moto_pid = moto_pid.to_string();
        Self {
            moto: cpu_secs(&moto_pid),
            own: cpu_secs("self"),
            moto_pid,
        }
    }

    fn since(&self, process: Option<f64>) -> Option<(Option<f64>, f64, f64)> {
        Some((
            process,
            cpu_secs(&self.moto_pid) - self.moto,
            cpu_secs("self") - self.own,
        ))
    }
}

pub async fn run(root: &Path) -> Result<()> {
    let bin = build_release(root)?;
    let venvs = venv::ensure(root)?;
    let work = tempfile::Builder::new().prefix("relay-bench-").tempdir()?;
    let moto = MotoServer::start(&venvs)?;
    eprintln!("bench: moto at {}", moto.endpoint());
    let stack = LocalStack::create(moto.endpoint(), &stack::unique_stack_name("bench")).await?;
    // The simulator's upload files in memory (tmpfs) when the machine has one: on the disk, each
    // 2 GiB round adds dirty pages until the kernel's writeback throttling makes the receiver wait,
    // and the baselines and the function would measure the disk instead of the upload.
    let shm = Path::new("/dev/shm");
    let sim_tmp = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("relay-bench-sim-")
            .tempdir_in(shm)?
    } else {
        tempfile::Builder::new().prefix("relay-bench-sim-").tempdir()?
    };
    let sim_dir = sim_tmp.path().to_path_buf();
    eprintln!("bench: simulator uploads in {}", sim_dir.display());
    let sim = Simulator::start(
        SimConfig {
            storage: StorageMode::Directory(sim_dir.clone()),
            ..SimConfig::frozen()
        },
        "127.0.0.1:0",
    )
    .await?;
    eprintln!("bench: simulator at {} (directory storage)", sim.base_url());
    let sim_endpoints = SimEndpoints::from_base(sim.base_url(), defaults::APP_ID, defaults::CLIENT_SECRET);
    let env: BTreeMap<String, String> = stack.lambda_env(&sim_endpoints).into_iter().collect();
    let (config, deps) = push::deps_from_env(&env).await?;
    push::connect_user(&deps.tokens, USER).await?;

    // Images on disk (mapillary_tools reads these) and in S3 (the function reads those).
    let images = work.path().join("images");
    let t0 = Instant::now();
    let files = write_images(&images)?;
    eprintln!(
        "bench: {} images of {} MiB written in {:.1} s",
        files.len(),
        IMAGE_BYTES / (1024 * 1024),
        t0.elapsed().as_secs_f64()
    );
    let s3 = stack.s3();
    let small: Vec<(String, PathBuf)> = files[..SMALL_IMAGES].to_vec();
    let t0 = Instant::now();
    put_sequence(&s3, &stack.bucket, "s200m", &small).await?;
    put_sequence(&s3, &stack.bucket, "s2g", &files).await?;
    eprintln!("bench: put into moto S3 in {:.1} s", t0.elapsed().as_secs_f64());
    let notes = notifications(&stack, 2).await?;
    let body_for = |seq: &str| -> Result<String> {
        notes
            .iter()
            .find(|(k, _)| k.contains(&format!("/{seq}/")))
            .map(|(_, b)| b.clone())
            .ok_or_else(|| anyhow!("no notification for {seq}"))
    };
    let total: u64 = files.iter().map(|(_, p)| file_len(p)).sum();
    let mut rows = Vec::new();
    let log_filter = std::env::var("RELAY_BENCH_LOG").ok().filter(|v| !v.is_empty());
    let log_dir = match &log_filter {
        Some(_) => root.join("target").join("bench-logs"),
        None => work.path().to_path_buf(),
    };
    std::fs::create_dir_all(&log_dir)?;
    let skip_tools = std::env::var("RELAY_BENCH_SKIP_TOOLS").is_ok_and(|v| !v.is_empty() && v != "0");

    // (a) raw GETs, same adapter call and the same number in flight as the function's fetcher.
    let read_ahead =
        zip_and_push::zipstream::fetch_concurrency(config.tunables.prefetch_bytes, IMAGE_BYTES as u64);
    let store = S3ObjectStore::new(s3.clone());
    // (a) and (b) are cheap next to the function runs and vary from run to run (the raw POST took
    // 3.65 s in one run and 6.03 s in the next on the same machine): each is run BASELINE_RUNS times
    // and its median is the baseline; the CPU column is the mean per run.
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    for round in 0..BASELINE_RUNS {
        let mark = CpuMark::now(moto.pid());
        let t0 = Instant::now();
        let mut got = 0u64;
        let mut chunks = 0usize;
        let mut stream = futures::stream::iter(files.iter())
            .map(|(key, _)| {
                let store = &store;
                let bucket = &stack.bucket;
                async move {
                    store
                        .get_object_chunks(bucket, &format!("sequences/{USER}/s2g/{key}"), None)
                        .await
                }
            })
            .buffered(read_ahead);
        while let Some(o) = stream.next().await {
            let o = o?;
            got += o.len();
            chunks += o.chunks.len();
        }
        drop(stream);
        walls.push(t0.elapsed());
        cpus.push(mark.since(None));
        if round == 0 {
            eprintln!(
                "bench: (a) the body arrived in {chunks} segments, {:.0} KiB on average",
                got as f64 / 1024.0 / chunks.max(1) as f64
            );
        }
        ensure!(got == total, "GET {got} bytes, expected {total}");
    }
    rows.push(Row {
        what: format!(
            "(a) raw S3 GET of the 400 objects (read-ahead {read_ahead}; median of {})",
            runs_label(&walls)
        ),
        bytes: total,
        wall: median(&walls),
        peak_rss_kib: None,
        cpu: mean_cpu(&cpus),
    });
    if let Some(r) = rows.last() {
        report(r);
    }

    // (b) raw POST of the same byte count to rupload (a new upload key each round).
    let zip_len = total + (IMAGES as u64) * 200; // about the zip's size; the byte count is what matters
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    for round in 0..BASELINE_RUNS {
        let mark = CpuMark::now(moto.pid());
        let t0 = Instant::now();
        raw_post(
            &sim_endpoints.upload_url,
            &format!("bench_raw_post_{round}.zip"),
            zip_len,
        )
        .await?;
        walls.push(t0.elapsed());
        cpus.push(mark.since(None));
        // Each round's upload file goes (only raw POSTs are stored so far): tmpfs is memory.
        for f in std::fs::read_dir(&sim_dir)? {
            std::fs::remove_file(f?.path())?;
        }
    }
    rows.push(Row {
        what: format!(
            "(b) raw POST of the same byte count to rupload (median of {})",
            runs_label(&walls)
        ),
        bytes: zip_len,
        wall: median(&walls),
        peak_rss_kib: None,
        cpu: mean_cpu(&cpus),
    });
    if let Some(r) = rows.last() {
        report(r);
    }

    // The function (release binary, own process), 200 MiB then 2 GiB.
    for (seq, n) in [("s200m", SMALL_IMAGES), ("s2g", IMAGES)] {
        let event = sqs_event_json(&body_for(seq)?)?;
        let log = log_dir.join(format!("function-{seq}.log"));
        let filter = log_filter.as_deref().unwrap_or("warn");
        let mark = CpuMark::now(moto.pid());
        let (wall, rss, fn_cpu, response) = run_function(&bin, &env, &event, &log, filter).await?;
        let cpu = mark.since(Some(fn_cpu));
        ensure!(
            response["batchItemFailures"]
                .as_array()
                .is_some_and(Vec::is_empty),
            "{seq}: {response} (see {})",
            log.display()
        );
        let status = zip_and_push::sequence_status(&deps.repo, USER, seq)
            .await?
            .ok_or_else(|| anyhow!("{seq}: no status"))?;
        ensure!(
            status.state == shared::model::SequenceState::Uploaded
                && status
                    .uploads
                    .iter()
                    .map(|u| u.image_count as usize)
                    .sum::<usize>()
                    == n,
            "{seq}: {}",
            serde_json::to_string(&status)?
        );
        let bytes: u64 = status.uploads.iter().map(|u| u.bytes).sum();
        rows.push(Row {
            what: format!("zip-and-push, {n} images ({:.0} MiB)", bytes as f64 / MIB),
            bytes,
            wall,
            peak_rss_kib: Some(rss),
            cpu,
        });
        if let Some(r) = rows.last() {
            report(r);
        }
    }

    // mapillary_tools from local disk to the same simulator.
    let tools_endpoints = ToolsEndpoints {
        graph: sim_endpoints.graph_url.clone(),
        upload: sim_endpoints.upload_url.clone(),
    };
    let account = Account {
        client_token: defaults::CLIENT_TOKEN.into(),
        user_token: defaults::DEMO_USER_TOKEN.into(),
        username: defaults::DEMO_USERNAME.into(),
        user_id: defaults::DEMO_USER_ID.into(),
    };
    let per_image = MapillaryTools::new(
        venvs.mapillary_tools(),
        &work.path().join("mt-images"),
        &tools_endpoints,
        &account,
    )?;
    let zipper = MapillaryTools::new(
        venvs.mapillary_tools(),
        &work.path().join("mt-zip"),
        &tools_endpoints,
        &account,
    )?;
    let img_arg = images.as_os_str().to_owned();
    let zip_dir = work.path().join("zips");
    std::fs::create_dir_all(&zip_dir)?;
    let empty_desc = work.path().join("empty-descriptions.json");
    integration_tests::mapillary_tools::write_empty_descriptions(&empty_desc)?;
    let mut steps: Vec<(&str, &MapillaryTools, Vec<std::ffi::OsString>)> = vec![
        (
            "mapillary_tools process (EXIF → descriptions)",
            &per_image,
            vec!["process".into(), img_arg.clone()],
        ),
        (
            "mapillary_tools upload (per-image, default)",
            &per_image,
            vec![
                "upload".into(),
                img_arg.clone(),
                "--user_name".into(),
                integration_tests::mapillary_tools::PROFILE.into(),
            ],
        ),
        (
            "mapillary_tools zip",
            &zipper,
            vec!["zip".into(), img_arg.clone(), zip_dir.as_os_str().to_owned()],
        ),
        (
            "mapillary_tools upload of the zip",
            &zipper,
            vec![
                "upload".into(),
                zip_dir.as_os_str().to_owned(),
                "--user_name".into(),
                integration_tests::mapillary_tools::PROFILE.into(),
                // A folder of zips needs a description file; the zips carry their own.
                "--desc_path".into(),
                empty_desc.as_os_str().to_owned(),
            ],
        ),
    ];
    if skip_tools {
        eprintln!("bench: RELAY_BENCH_SKIP_TOOLS set: skipping mapillary_tools");
        steps.clear();
    }
    for (what, tools, args) in steps {
        let log = work.path().join(format!("{}.log", what.replace(' ', "_")));
        let mut cmd = tools.command(&args);
        cmd.stdout(File::create(&log)?)
            .stderr(File::create(log.with_extension("err"))?);
        let (wall, rss, ok) = run_measured(cmd).await?;
        if !ok {
            let tail = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(20).collect();
            bail!(
                "{what} failed:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        rows.push(Row {
            what: what.into(),
            bytes: total,
            wall,
            peak_rss_kib: Some(rss),
            cpu: None,
        });
        if let Some(r) = rows.last() {
            report(r);
        }
    }

    print_table(&rows);
    sim.shutdown().await;
    drop(moto);
    Ok(())
}

/// `cargo build --release -p zip-and-push --bin zip-and-push`; the binary's path.
fn build_release(root: &Path) -> Result<PathBuf> {
    // Profiling: `RELAY_BENCH_FN_BIN=target/bench-harness/zip-and-push` runs a build with symbols.
    if let Some(bin) = std::env::var_os("RELAY_BENCH_FN_BIN").filter(|b| !b.is_empty()) {
        let bin = root.join(bin);
        eprintln!(
            "bench: zip-and-push binary from RELAY_BENCH_FN_BIN: {}",
            bin.display()
        );
        ensure!(bin.is_file(), "RELAY_BENCH_FN_BIN: no file {}", bin.display());
        return Ok(bin);
    }
    eprintln!("bench: building the release zip-and-push binary");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "zip-and-push",
            "--bin",
            "zip-and-push",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build --release -p zip-and-push")?;
    ensure!(
        output.status.success(),
        "cargo build --release failed ({})",
        output.status
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "zip-and-push")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| anyhow!("cargo did not report the zip-and-push executable"))
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// 400 images along a track, each padded to 5 MiB; (key, path).
fn write_images(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    std::fs::create_dir_all(dir)?;
    let start = time::OffsetDateTime::now_utc() - time::Duration::hours(3);
    let specs = track(IMAGES, &TrackSpec::new(47.3769, 8.5417, start));
    specs
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            s.pad_to = Some(IMAGE_BYTES);
            let name = format!("IMG_{i:04}.jpg");
            let path = dir.join(&name);
            std::fs::write(&path, try_jpeg(&s)?)?;
            Ok((name, path))
        })
        .collect()
}

async fn put_sequence(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    seq: &str,
    files: &[(String, PathBuf)],
) -> Result<()> {
    let prefix = format!("sequences/{USER}/{seq}/");
    push::put_files(s3, bucket, &prefix, files).await?;
    s3.put_object()
        .bucket(bucket)
        .key(format!("{prefix}manifest.json"))
        .body(aws_sdk_s3::primitives::ByteStream::from_static(b"{}"))
        .send()
        .await?;
    Ok(())
}

/// (decoded key, body) of `n` S3 notifications from the ingest queue (deleted; test events skipped).
async fn notifications(stack: &LocalStack, n: usize) -> Result<Vec<(String, String)>> {
    let sqs = stack.sqs();
    let mut out = Vec::new();
    let until = Instant::now() + Duration::from_secs(60);
    while out.len() < n {
        ensure!(Instant::now() < until, "only {} notifications arrived", out.len());
        for m in push::receive(&sqs, &stack.ingest_queue_url).await? {
            let body = m.body().unwrap_or_default().to_string();
            if let Ok(shared::s3event::Notification::Records(recs)) = shared::s3event::parse_body(&body) {
                let key = recs.first().map(|r| r.key.clone()).unwrap_or_default();
                out.push((key, body));
            }
            sqs.delete_message()
                .queue_url(&stack.ingest_queue_url)
                .receipt_handle(m.receipt_handle().unwrap_or_default())
                .send()
                .await?;
        }
    }
    Ok(out)
}

fn sqs_event_json(body: &str) -> Result<Value> {
    Ok(json!({"Records": [{
        "messageId": uuid_like(), "receiptHandle": "bench", "body": body,
        "attributes": {"ApproximateReceiveCount": "1"}, "messageAttributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": format!("arn:aws:sqs:{}:{}:ingest", stack::REGION, stack::ACCOUNT_ID),
        "awsRegion": stack::REGION
    }]}))
}

fn uuid_like() -> String {
    format!(
        "bench-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    )
}

/// One streamed POST of `len` bytes (1 MiB chunks of one buffer) to `<upload_url>/<key>`.
async fn raw_post(upload_url: &str, key: &str, len: u64) -> Result<()> {
    let chunk = Bytes::from(vec![0x5Au8; 1024 * 1024]);
    let chunks = len.div_ceil(chunk.len() as u64);
    let body = futures::stream::iter(0..chunks).map(move |i| {
        let rest = len - i * chunk.len() as u64;
        Ok::<_, std::io::Error>(chunk.slice(..(rest.min(chunk.len() as u64) as usize)))
    });
    let r = reqwest::Client::new()
        .post(format!("{upload_url}/{key}"))
        .header("Authorization", format!("OAuth {}", defaults::DEMO_USER_TOKEN))
        .header("Offset", "0")
        .header("X-Entity-Name", key)
        .header("X-Entity-Length", len.to_string())
        .header("X-Entity-Type", "application/zip")
        .header("Content-Length", len.to_string())
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await?;
    ensure!(r.status().is_success(), "raw POST: {}", r.status());
    Ok(())
}

/// Peak RSS (`VmHWM`, KiB) of a live process, from `/proc/<pid>/status`.
///
/// Not `ru_maxrss` from `wait4`: Linux folds the parent's high-water mark at `exec` time into the
/// child's (the pre-exec address space is the parent's), so a child of a big parent looks big.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs `cmd` to completion; (wall, peak RSS KiB, success). The peak is `VmHWM` sampled every
/// 20 ms until exit (it only grows, so the last sample misses at most the final 20 ms).
async fn run_measured(mut cmd: Command) -> Result<(Duration, u64, bool)> {
    let t0 = Instant::now();
    let mut child = cmd.spawn().context("spawning")?;
    let pid = child.id();
    let mut peak = 0;
    loop {
        peak = peak.max(vm_hwm_kib(pid).unwrap_or(0));
        if let Some(status) = child.try_wait()? {
            return Ok((t0.elapsed(), peak, status.success()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the release binary against a one-event Lambda Runtime API served here; (wall from handing
/// out the event to its response, peak RSS KiB, CPU seconds of the process, response JSON).
async fn run_function(
    bin: &Path,
    env: &BTreeMap<String, String>,
    event: &Value,
    log: &Path,
    log_filter: &str,
) -> Result<(Duration, u64, f64, Value)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, mut rx) = mpsc::channel::<Runtime>(4);
    let server = tokio::spawn(serve_runtime(listener, event.to_string(), tx));
    let extra: Vec<(String, String)> = std::env::var("RELAY_BENCH_FN_ENV")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let child = Command::new(bin)
        .envs(env)
        .envs(extra)
        .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", "zip-and-push")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("RUST_LOG", log_filter)
        .stdin(Stdio::null())
        .stdout(File::create(log)?)
        .stderr(File::create(log.with_extension("err"))?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    let mut started = None;
    let outcome = loop {
        match tokio::time::timeout(Duration::from_secs(900), rx.recv()).await {
            Err(_) => break Err(anyhow!("no response within 900 s")),
            Ok(None) => break Err(anyhow!("the runtime API server stopped")),
            Ok(Some(Runtime::EventSent(at))) => started = Some(at),
            Ok(Some(Runtime::Response(at, body))) => {
                let wall = started.map(|s| at - s).unwrap_or_default();
                break serde_json::from_str::<Value>(&body)
                    .map(|v| (wall, v))
                    .context("response JSON");
            }
            Ok(Some(Runtime::Error(body))) => break Err(anyhow!("the function reported an error: {body}")),
        }
    };
    // The process is still alive (waiting for its next event): its VmHWM is exact.
    let rss = vm_hwm_kib(pid).unwrap_or(0);
    let cpu = cpu_secs(&pid.to_string());
    let mut child = child;
    child.kill()?;
    child.wait()?;
    server.abort();
    let (wall, response) = outcome?;
    Ok((wall, rss, cpu, response))
}

enum Runtime {
    EventSent(Instant),
    Response(Instant, String),
    Error(String),
}

/// A minimal Lambda Runtime API (hand-rolled HTTP/1.1 over `TcpListener`: two routes, one event;
/// a server dependency for xtask is not worth it): `GET …/invocation/next` returns the event once
/// (later calls wait forever), `POST …/response` and `…/error` are reported through `tx`.
async fn serve_runtime(listener: TcpListener, event: String, tx: mpsc::Sender<Runtime>) {
    let event = std::sync::Arc::new(tokio::sync::Mutex::new(Some(event)));
    while let Ok((conn, _)) = listener.accept().await {
        let (event, tx) = (event.clone(), tx.clone());
        tokio::spawn(async move {
            let _ = serve_conn(conn, event, tx).await;
        });
    }
}

async fn serve_conn(
    conn: TcpStream,
    event: std::sync::Arc<tokio::sync::Mutex<Option<String>>>,
    tx: mpsc::Sender<Runtime>,
) -> Result<()> {
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
        );
        let mut len = 0usize;
        let mut chunked = false;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).await?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let body = if chunked {
            let mut body = Vec::new();
            loop {
                let mut size = String::new();
                r.read_line(&mut size).await?;
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0u8; n + 2];
                r.read_exact(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body
        } else {
            let mut body = vec![0u8; len];
            r.read_exact(&mut body).await?;
            body
        };
        let body = String::from_utf8_lossy(&body).into_owned();
        if method == "GET" && path.ends_with("/invocation/next") {
            let Some(ev) = event.lock().await.take() else {
                // Only one event: the next poll waits until the process is killed.
                std::future::pending::<()>().await;
                return Ok(());
            };
            let deadline_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis()
                + 900_000;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Lambda-Runtime-Aws-Request-Id: bench-request\r\nLambda-Runtime-Deadline-Ms: {deadline_ms}\r\n\
                 Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:{}:{}:function:zip-and-push\r\n\
                 Lambda-Runtime-Trace-Id: Root=1-00000000-000000000000000000000000\r\n\r\n",
                ev.len(),
                stack::REGION,
                stack::ACCOUNT_ID
            );
            let _ = tx.send(Runtime::EventSent(Instant::now())).await;
            r.get_mut().write_all(head.as_bytes()).await?;
            r.get_mut().write_all(ev.as_bytes()).await?;
        } else if method == "POST" && path.ends_with("/response") {
            let _ = tx.send(Runtime::Response(Instant::now(), body)).await;
            r.get_mut()
                .write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                .await?;
        } else {
            let _ = tx.send(Runtime::Error(format!("{method} {path}: {body}"))).await;
            r.get_mut()
                .write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                .await?;
        }
        r.get_mut().flush().await?;
    }
}

/// `function / moto / xtask` CPU seconds (`—` where not measured).
fn cpu_cell(r: &Row) -> String {
    match r.cpu {
        Some((f, moto, own)) => format!(
            "{} / {moto:.1} / {own:.1}",
            f.map(|f| format!("{f:.1}")).unwrap_or_else(|| "—".into())
        ),
        None => "—".into(),
    }
}

/// Runs of each baseline.
const BASELINE_RUNS: usize = 3;

fn median(walls: &[Duration]) -> Duration {
    let mut v = walls.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// "3: 1.52 / 1.60 / 1.71 s" (sorted).
fn runs_label(walls: &[Duration]) -> String {
    let mut v = walls.to_vec();
    v.sort();
    let list: Vec<String> = v.iter().map(|w| format!("{:.2}", w.as_secs_f64())).collect();
    format!("{}: {} s", v.len(), list.join(" / "))
}

/// The mean of per-run CPU figures.
fn mean_cpu(cpus: &[Option<(Option<f64>, f64, f64)>]) -> Option<(Option<f64>, f64, f64)> {
    let all: Vec<(Option<f64>, f64, f64)> = cpus.iter().flatten().copied().collect();
    if all.is_empty() {
        return None;
    }
    let n = all.len() as f64;
    Some((
        None,
        all.iter().map(|c| c.1).sum::<f64>() / n,
        all.iter().map(|c| c.2).sum::<f64>() / n,
    ))
}

fn report(r: &Row) {
    eprintln!(
        "bench: {}: {:.2} s{}, CPU s (function / moto / xtask+simulator) {}",
        r.what,
        r.wall.as_secs_f64(),
        r.peak_rss_kib
            .map(|k| format!(", peak RSS {:.1} MiB", k as f64 / 1024.0))
            .unwrap_or_default(),
        cpu_cell(r)
    );
}

fn print_table(rows: &[Row]) {
    println!(
        "| Measurement | Bytes | Wall (s) | Throughput (MiB/s) | Peak RSS (MiB) | CPU s: function / moto / xtask+sim |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let secs = r.wall.as_secs_f64();
        println!(
            "| {} | {} | {:.2} | {:.0} | {} | {} |",
            r.what,
            r.bytes,
            secs,
            r.bytes as f64 / MIB / secs.max(1e-9),
            r.peak_rss_kib
                .map(|k| format!("{:.1}", k as f64 / 1024.0))
                .unwrap_or_else(|| "—".into()),
            cpu_cell(r)
        );
    }
    let get = rows.iter().find(|r| r.what.starts_with("(a)")).map(|r| r.wall);
    let post = rows.iter().find(|r| r.what.starts_with("(b)")).map(|r| r.wall);
    let func_row = rows.iter().find(|r| r.what.starts_with("zip-and-push, 400"));
    let func = func_row.map(|r| r.wall);
    if let (Some(a), Some(b), Some(f)) = (get, post, func) {
        let bound = a.max(b).as_secs_f64();
        println!(
            "\nzip-and-push 2 GiB wall / max(a, b) = {:.2} (target ≤ 1.15)",
            f.as_secs_f64() / bound
        );
        // The three processes share this machine's cores: their CPU seconds over the cores is a
        // floor no schedule can beat, whatever the function does with its own share.
        if let Some((Some(fcpu), moto, own)) = func_row.and_then(|r| r.cpu) {
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let total = fcpu + moto + own;
            println!(
                "zip-and-push 2 GiB CPU: function {fcpu:.1} + moto {moto:.1} + simulator/bench {own:.1} = {total:.1} s \
                 on {cores} cores: no run can take less than {:.2} s = {:.2} × max(a, b)",
                total / cores as f64,
                total / cores as f64 / bound
            );
        }
    }
}
