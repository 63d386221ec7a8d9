//! `cargo xtask bench zip-and-push`: the benchmark, in one run.
//!
//! A private moto + a stack of `infra/template.yaml` + an in-process simulator storing uploads in
//! files (`StorageMode::Directory`, so 2 GiB do not sit in RAM). 400 geotagged 5 MiB JPEGs (padded
//! with COM segments by `relay-fixtures`) are written to disk and put into S3 as two sequences: the
//! first 40 (200 MiB) and all 400 (2 GiB).
//!
//! **S3 is served two ways**, each behind a [`latency::LatencyProxy`] that holds the first bytes of
//! every response 25 ms (S3 within a region), for the function and the baselines alike:
//! * **moto** (as the other tiers use it; one Python thread, whole object read for every GET);
//! * **s3s-fs**, an S3 server implementation in Rust (the `s3s` protocol crate over the `s3s-fs`
//!   file-system backend), run in this process ([`s3fs`]): ranged GETs answered in parallel, for the
//!   bytes asked. The function reaches it through `AWS_ENDPOINT_URL_S3` (the SDK's
//!   service-specific endpoint; DynamoDB, SQS and KMS stay on moto), and gets the same S3 event
//!   a bucket notification would carry (synthesised: s3s-fs sends no notifications).
//!
//! Measured on each S3:
//! * the **release** `zip-and-push` binary, run as a child process behind the minimal Lambda Runtime
//!   API of `cargo xtask package` ([`crate::runtime_api`]), once per sequence: wall time from
//!   handing out the event to the response, and peak RSS (`VmHWM` of the child from
//!   `/proc/<pid>/status`);
//! * (a) raw GETs of the 400 objects with the same SDK adapter call (`S3ObjectStore::get_object_chunks`)
//!   and the same number in flight as the function's fetcher (`zipstream::fetch_concurrency`);
//! * (c) **the raw pipe**: the same GETs streamed unchanged, as they arrive, into one rupload POST to
//!   the same simulator (no EXIF, no zip, no checkpoints), for 200 MiB and 2 GiB — the limit of
//!   this data path on this machine, and what the function's wall time is compared with;
//!
//! and once: (b) one raw streamed POST of the same byte count to the simulator's rupload. Each
//! baseline runs three times; the median counts. Then mapillary_tools 0.14.7 on the same files from
//! local disk to the same simulator: `process`, then the default per-image `upload`, and `zip` +
//! `upload` of the zip (time and peak RSS each).
//!
//! Prints a Markdown table, the ratios, and as its **last line** (machine-readable):
//! `zip-and-push: wall/raw-pipe=<x> (200MiB) <y> (2GiB); rss=<a>/<b> MiB; vs mapillary_tools=<z>x`
//! — on the s3s-fs server; `<z>` is the faster mapillary_tools way (per-image `upload`, or `zip` +
//! `upload` of the zip; `process` counted in neither) over the function's 2 GiB wall.
//! `docs/benchmarks.md` records the figures.
//!
//! For quick iterations: `RELAY_BENCH_SKIP_TOOLS=1` skips the mapillary_tools rows (the last line
//! then says `vs mapillary_tools=skipped`); `RELAY_BENCH_LOG=<filter>` (e.g. `info`) runs the
//! function with that `RUST_LOG`, keeps its logs in `target/bench-logs/` and splits each run into
//! planning / streaming / `finish_upload` from the log's timestamps (by default it logs at `warn`
//! into the temporary directory); `RELAY_BENCH_FN_ENV="K=V K=V"` adds variables to the function's
//! environment (experiments, e.g. glibc `MALLOC_ARENA_MAX=2`); `RELAY_BENCH_FN_BIN=<path>` runs that
//! zip-and-push binary instead of building the release one (profiling: `cargo build --profile
//! bench-harness -p zip-and-push` keeps symbols, then `RELAY_BENCH_FN_BIN=target/bench-harness/zip-and-push`).

mod baselines;
mod latency;
mod s3fs;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use integration_tests::mapillary_tools::{Account, Endpoints as ToolsEndpoints, MapillaryTools};
use integration_tests::moto::MotoServer;
use integration_tests::stack::{self, LocalStack, SimEndpoints};
use mapillary_sim::defaults;
use mapillary_sim::{SimConfig, Simulator, StorageMode};
use relay_fixtures::{track, try_jpeg, TrackSpec};
use serde_json::{json, Value};
use shared::adapters::s3::S3ObjectStore;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::binaries::vm_hwm_kib;
use crate::push;
use crate::runtime_api::{Observed, RuntimeApi};
use crate::venv;
use latency::{LatencyProxy, S3_FIRST_BYTE_LATENCY};

const USER: &str = "bench";
const IMAGES: usize = 400;
const SMALL_IMAGES: usize = 40;
const IMAGE_BYTES: usize = 5 * 1024 * 1024;
const MIB: f64 = 1024.0 * 1024.0;
/// Label of the moto rows.
const MOTO: &str = "moto";
/// Label of the real S3 server's rows; the ratios of the last line are taken on these.
const S3S: &str = "s3s-fs";

/// CPU seconds during a row: (the measured process if separate, moto, this process — the
/// simulator, the runtime API, the latency proxies and the s3s-fs server live here).
type Cpu = (Option<f64>, f64, f64);

/// What a row measured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    RawGet,
    RawPost,
    RawPipe,
    Function,
    Tools,
}

/// One measured row.
struct Row {
    what: String,
    kind: Kind,
    /// The S3 server the row read from (`—` when none).
    s3: &'static str,
    /// Images in the row's sequence (0 when not a sequence).
    images: usize,
    bytes: u64,
    wall: Duration,
    peak_rss_kib: Option<u64>,
    cpu: Option<Cpu>,
    /// From the function's log: planning, streaming, `finish_upload` (seconds).
    phases: Option<[f64; 3]>,
    /// S3 requests the row made (responses through the latency proxy).
    s3_requests: Option<u64>,
}

impl Row {
    fn new(what: String, kind: Kind, s3: &'static str, images: usize, bytes: u64, wall: Duration) -> Self {
        Self {
            what,
            kind,
            s3,
            images,
            bytes,
            wall,
            peak_rss_kib: None,
            cpu: None,
            phases: None,
            s3_requests: None,
        }
    }
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

    fn since(&self, process: Option<f64>) -> Option<Cpu> {
        Some((
            process,
            cpu_secs(&self.moto_pid) - self.moto,
            cpu_secs("self") - self.own,
        ))
    }
}

/// One S3 server as the bench measures it: behind its latency proxy, with its two sequences.
struct S3Under {
    label: &'static str,
    proxy: LatencyProxy,
    /// The 200 MiB and the 2 GiB sequence's id.
    seqs: [&'static str; 2],
    /// The S3 event (SQS message body) of each sequence's manifest.
    events: [String; 2],
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
    let sim_tmp = memory_tempdir("relay-bench-sim-")?;
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
    let small: Vec<(String, PathBuf)> = files[..SMALL_IMAGES].to_vec();

    // moto: the stack's bucket; its notifications (through the ingest queue) are the events.
    let s3 = stack.s3();
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
    let moto_addr = SocketAddr::from(([127, 0, 0, 1], moto.port()));
    let moto_s3 = S3Under {
        label: MOTO,
        proxy: LatencyProxy::start(moto_addr, S3_FIRST_BYTE_LATENCY).await?,
        seqs: ["s200m", "s2g"],
        events: [body_for("s200m")?, body_for("s2g")?],
    };

    // s3s-fs: a bucket of the same name (the function's RELAY_BUCKET), objects in memory (tmpfs)
    // like the simulator's uploads, other sequence ids (the stack's records are shared).
    let fs_tmp = memory_tempdir("relay-bench-s3s-")?;
    let server = s3fs::S3sFs::start(fs_tmp.path()).await?;
    eprintln!(
        "bench: s3s-fs at {} (objects in {})",
        server.url(),
        fs_tmp.path().display()
    );
    let fs_client = stack::s3_client(&stack::sdk_config(&server.url()).await);
    fs_client
        .create_bucket()
        .bucket(&stack.bucket)
        .send()
        .await
        .context("CreateBucket on s3s-fs")?;
    let t0 = Instant::now();
    let m200 = put_sequence(&fs_client, &stack.bucket, "r200m", &small).await?;
    let m2g = put_sequence(&fs_client, &stack.bucket, "r2g", &files).await?;
    eprintln!("bench: put into s3s-fs in {:.1} s", t0.elapsed().as_secs_f64());
    let real_s3 = S3Under {
        label: S3S,
        proxy: LatencyProxy::start(server.addr(), S3_FIRST_BYTE_LATENCY).await?,
        seqs: ["r200m", "r2g"],
        events: [
            s3_notification(&stack.bucket, &m200)?,
            s3_notification(&stack.bucket, &m2g)?,
        ],
    };

    let total: u64 = files.iter().map(|(_, p)| file_len(p)).sum();
    let small_total: u64 = small.iter().map(|(_, p)| file_len(p)).sum();
    let mut rows = Vec::new();
    let log_filter = std::env::var("RELAY_BENCH_LOG").ok().filter(|v| !v.is_empty());
    let log_dir = match &log_filter {
        Some(_) => root.join("target").join("bench-logs"),
        None => work.path().to_path_buf(),
    };
    std::fs::create_dir_all(&log_dir)?;
    let skip_tools = std::env::var("RELAY_BENCH_SKIP_TOOLS").is_ok_and(|v| !v.is_empty() && v != "0");
    let read_ahead =
        zip_and_push::zipstream::fetch_concurrency(config.tunables.prefetch_bytes, IMAGE_BYTES as u64);

    // (b) raw POST of the same byte count to rupload (a new upload key each round).
    let zip_len = total + (IMAGES as u64) * 200; // about the zip's size; the byte count is what matters
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    for round in 0..BASELINE_RUNS {
        let mark = CpuMark::now(moto.pid());
        let t0 = Instant::now();
        baselines::raw_post(
            &sim_endpoints.upload_url,
            &format!("bench_raw_post_{round}.zip"),
            zip_len,
        )
        .await?;
        walls.push(t0.elapsed());
        cpus.push(mark.since(None));
        clear_dir(&sim_dir)?;
    }
    let mut row = Row::new(
        format!(
            "(b) raw POST of the same byte count to rupload (median of {})",
            runs_label(&walls)
        ),
        Kind::RawPost,
        "—",
        IMAGES,
        zip_len,
        median(&walls),
    );
    row.cpu = mean_cpu(&cpus);
    report(&row);
    rows.push(row);

    for under in [&moto_s3, &real_s3] {
        let store = S3ObjectStore::new(stack::s3_client(&stack::sdk_config(&under.proxy.url()).await));
        let keys_of = |seq: &str, n: usize| -> Vec<String> {
            files[..n]
                .iter()
                .map(|(k, _)| format!("sequences/{USER}/{seq}/{k}"))
                .collect()
        };

        // (a) raw GETs of the 2 GiB, same adapter call and the same number in flight as the fetcher.
        let keys = keys_of(under.seqs[1], IMAGES);
        let mut walls = Vec::new();
        let mut cpus = Vec::new();
        let requests0 = under.proxy.responses();
        for round in 0..BASELINE_RUNS {
            let mark = CpuMark::now(moto.pid());
            let t0 = Instant::now();
            let got = baselines::raw_get(&store, &stack.bucket, &keys, read_ahead).await?;
            walls.push(t0.elapsed());
            cpus.push(mark.since(None));
            ensure!(got.bytes == total, "GET {} bytes, expected {total}", got.bytes);
            if round == 0 {
                eprintln!(
                    "bench: {}: (a) the body arrived in {} segments, {:.0} KiB on average",
                    under.label,
                    got.segments,
                    got.bytes as f64 / 1024.0 / got.segments.max(1) as f64
                );
            }
        }
        let mut row = Row::new(
            format!(
                "(a) raw S3 GET of the 400 objects (read-ahead {read_ahead}; median of {})",
                runs_label(&walls)
            ),
            Kind::RawGet,
            under.label,
            IMAGES,
            total,
            median(&walls),
        );
        row.cpu = mean_cpu(&cpus);
        row.s3_requests = Some((under.proxy.responses() - requests0) / BASELINE_RUNS as u64);
        report(&row);
        rows.push(row);

        // (c) the raw pipe, 200 MiB and 2 GiB.
        for (i, (n, bytes)) in [(SMALL_IMAGES, small_total), (IMAGES, total)]
            .into_iter()
            .enumerate()
        {
            let keys = keys_of(under.seqs[i], n);
            let mut walls = Vec::new();
            let mut cpus = Vec::new();
            let requests0 = under.proxy.responses();
            for round in 0..BASELINE_RUNS {
                let mark = CpuMark::now(moto.pid());
                let t0 = Instant::now();
                baselines::raw_pipe(
                    store.clone(),
                    stack.bucket.clone(),
                    keys.clone(),
                    read_ahead,
                    &sim_endpoints.upload_url,
                    &format!("bench_raw_pipe_{}_{n}_{round}.zip", under.label),
                    bytes,
                )
                .await?;
                walls.push(t0.elapsed());
                cpus.push(mark.since(None));
                clear_dir(&sim_dir)?;
            }
            let mut row = Row::new(
                format!(
                    "(c) raw pipe: GET → one rupload POST, {n} objects (read-ahead {read_ahead}; median of {})",
                    runs_label(&walls)
                ),
                Kind::RawPipe,
                under.label,
                n,
                bytes,
                median(&walls),
            );
            row.cpu = mean_cpu(&cpus);
            row.s3_requests = Some((under.proxy.responses() - requests0) / BASELINE_RUNS as u64);
            report(&row);
            rows.push(row);
        }

        // The function (release binary, own process), 200 MiB then 2 GiB.
        for (i, n) in [SMALL_IMAGES, IMAGES].into_iter().enumerate() {
            let seq = under.seqs[i];
            let event = sqs_event_json(&under.events[i])?;
            let log = log_dir.join(format!("function-{seq}.log"));
            let filter = log_filter.as_deref().unwrap_or("warn");
            let mut fn_env = env.clone();
            fn_env.insert("AWS_ENDPOINT_URL_S3".into(), under.proxy.url());
            let mark = CpuMark::now(moto.pid());
            let requests0 = under.proxy.responses();
            let run = run_function(&bin, &fn_env, &event, &log, filter).await?;
            let cpu = mark.since(Some(run.cpu));
            let s3_requests = under.proxy.responses() - requests0;
            ensure!(
                run.response["batchItemFailures"]
                    .as_array()
                    .is_some_and(Vec::is_empty),
                "{seq}: {} (see {})",
                run.response,
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
            clear_dir(&sim_dir)?;
            let bytes: u64 = status.uploads.iter().map(|u| u.bytes).sum();
            let mut row = Row::new(
                format!("zip-and-push, {n} images ({:.0} MiB)", bytes as f64 / MIB),
                Kind::Function,
                under.label,
                n,
                bytes,
                run.wall,
            );
            row.peak_rss_kib = Some(run.rss_kib);
            row.cpu = cpu;
            row.phases = log_phases(&log, run.delivered_utc);
            row.s3_requests = Some(s3_requests);
            report(&row);
            rows.push(row);
        }
    }
    // The S3 server and its objects are not needed any more: memory back for mapillary_tools.
    drop(real_s3);
    drop(server);
    drop(fs_tmp);

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
        clear_dir(&sim_dir)?;
        let mut row = Row::new(what.into(), Kind::Tools, "—", IMAGES, total, wall);
        row.peak_rss_kib = Some(rss);
        report(&row);
        rows.push(row);
    }

    print_table(&rows, skip_tools);
    sim.shutdown().await;
    drop(moto);
    Ok(())
}

/// A temporary directory in memory (`/dev/shm`) when the machine has one, else the system's.
fn memory_tempdir(prefix: &str) -> Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let b = tempfile::Builder::new().prefix(prefix).clone();
    Ok(if shm.is_dir() {
        b.tempdir_in(shm)?
    } else {
        b.tempdir()?
    })
}

/// Removes the files in `dir` (the simulator's finished uploads: memory, when on tmpfs).
fn clear_dir(dir: &Path) -> Result<()> {
    for f in std::fs::read_dir(dir)? {
        let p = f?.path();
        if p.is_file() {
            std::fs::remove_file(p)?;
        }
    }
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
    crate::binaries::release_binary(root, "zip-and-push")
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

/// The manifest object a sequence's S3 event names.
struct Manifest {
    key: String,
    size: u64,
    etag: String,
}

/// Puts `files` and then an empty manifest under `sequences/<USER>/<seq>/`.
async fn put_sequence(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    seq: &str,
    files: &[(String, PathBuf)],
) -> Result<Manifest> {
    let prefix = format!("sequences/{USER}/{seq}/");
    push::put_files(s3, bucket, &prefix, files).await?;
    let key = format!("{prefix}manifest.json");
    let body = b"{}";
    let put = s3
        .put_object()
        .bucket(bucket)
        .key(&key)
        .body(aws_sdk_s3::primitives::ByteStream::from_static(body))
        .send()
        .await
        .with_context(|| format!("PutObject {key}"))?;
    let etag = put.e_tag().unwrap_or_default().trim_matches('"').to_string();
    Ok(Manifest {
        key,
        size: body.len() as u64,
        etag,
    })
}

/// The SQS message body S3 would send for the creation of `m` in `bucket` (the shape of
/// `events/sqs/s3-manifest-created.json`): s3s-fs sends no notifications, so the bench writes the
/// one the function would get. Checked with the function's own parser before use.
fn s3_notification(bucket: &str, m: &Manifest) -> Result<String> {
    let body = json!({"Records": [{
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": stack::REGION,
        "eventTime": OffsetDateTime::now_utc().format(&Rfc3339)?,
        "eventName": "ObjectCreated:Put",
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "manifest-created",
            "bucket": {"name": bucket, "arn": format!("arn:aws:s3:::{bucket}")},
            "object": {"key": m.key, "size": m.size, "eTag": m.etag, "sequencer": "0000000000000000A1"}
        }
    }]})
    .to_string();
    match shared::s3event::parse_body(&body) {
        Ok(shared::s3event::Notification::Records(r)) if r.len() == 1 && r[0].key == m.key => Ok(body),
        other => bail!(
            "synthesised S3 event for {} does not parse as one record: {other:?}",
            m.key
        ),
    }
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

/// One run of the function.
struct FnRun {
    /// From handing out the event to the response.
    wall: Duration,
    /// When the event was handed out (to line the function's log timestamps up with).
    delivered_utc: OffsetDateTime,
    /// `VmHWM` of the process after the response.
    rss_kib: u64,
    /// CPU seconds of the process.
    cpu: f64,
    /// The response document.
    response: Value,
}

/// Runs the release binary against `cargo xtask package`'s Runtime API with one event.
async fn run_function(
    bin: &Path,
    env: &BTreeMap<String, String>,
    event: &Value,
    log: &Path,
    log_filter: &str,
) -> Result<FnRun> {
    let arn = format!(
        "arn:aws:lambda:{}:{}:function:zip-and-push",
        stack::REGION,
        stack::ACCOUNT_ID
    );
    let mut api = RuntimeApi::start(&arn).await?;
    let extra: Vec<(String, String)> = std::env::var("RELAY_BENCH_FN_ENV")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let mut child = Command::new(bin)
        .envs(env)
        .envs(extra)
        .env("AWS_LAMBDA_RUNTIME_API", api.address())
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
    let outcome: Result<(Duration, OffsetDateTime, Value)> = async {
        api.invoke(Bytes::from(event.to_string()), FUNCTION_TIMEOUT)
            .await?;
        let mut delivered = None;
        loop {
            let observed = tokio::time::timeout(FUNCTION_TIMEOUT, api.observe())
                .await
                .map_err(|_| anyhow!("no response within {} s", FUNCTION_TIMEOUT.as_secs()))?;
            match observed {
                None => bail!("the Runtime API stopped"),
                Some(Observed::NextRequested(_)) => {}
                Some(Observed::Delivered { at, .. }) => delivered = Some((at, OffsetDateTime::now_utc())),
                Some(Observed::Response { at, body, .. }) => {
                    let (sent, sent_utc) = delivered.ok_or_else(|| anyhow!("a response before the event"))?;
                    let response = serde_json::from_slice::<Value>(&body).context("response JSON")?;
                    return Ok((at - sent, sent_utc, response));
                }
                Some(Observed::Error { body, .. }) | Some(Observed::InitError { body, .. }) => {
                    bail!(
                        "the function reported an error: {}",
                        String::from_utf8_lossy(&body)
                    )
                }
                Some(Observed::Refused { what }) => bail!("the Runtime API refused {what}"),
            }
        }
    }
    .await;
    // The process is still alive (waiting for its next event): its VmHWM is exact.
    let rss_kib = vm_hwm_kib(pid).unwrap_or(0);
    let cpu = cpu_secs(&pid.to_string());
    child.kill()?;
    child.wait()?;
    let (wall, delivered_utc, response) = outcome?;
    Ok(FnRun {
        wall,
        delivered_utc,
        rss_kib,
        cpu,
        response,
    })
}

/// How long the function may take (its deadline header), as the template's timeout.
const FUNCTION_TIMEOUT: Duration = Duration::from_secs(900);

/// Planning, streaming and `finish_upload` seconds of a run from its JSON log (info level):
/// event handed out → `sequence planned` → `upload bytes complete` → `finish_upload returned a
/// cluster`. `None` when the log does not have all three (e.g. logged at `warn`).
fn log_phases(log: &Path, delivered: OffsetDateTime) -> Option<[f64; 3]> {
    let text = std::fs::read_to_string(log).ok()?;
    let at = |message: &str| -> Option<OffsetDateTime> {
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["message"].as_str().is_some_and(|m| m.starts_with(message)))
            .and_then(|v| OffsetDateTime::parse(v["timestamp"].as_str()?, &Rfc3339).ok())
    };
    let planned = at("sequence planned")?;
    let sent = at("upload bytes complete")?;
    let finished = at("finish_upload returned a cluster")?;
    let secs = |a: OffsetDateTime, b: OffsetDateTime| (b - a).as_seconds_f64();
    Some([
        secs(delivered, planned),
        secs(planned, sent),
        secs(sent, finished),
    ])
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
        "bench: [{}] {}: {:.2} s{}{}{}, CPU s (function / moto / xtask) {}",
        r.s3,
        r.what,
        r.wall.as_secs_f64(),
        r.peak_rss_kib
            .map(|k| format!(", peak RSS {:.1} MiB", k as f64 / 1024.0))
            .unwrap_or_default(),
        r.s3_requests
            .map(|n| format!(", {n} S3 requests"))
            .unwrap_or_default(),
        r.phases
            .map(|p| format!(
                ", planning {:.2} s / streaming {:.2} s / finish {:.2} s",
                p[0], p[1], p[2]
            ))
            .unwrap_or_default(),
        cpu_cell(r)
    );
}

fn find<'a>(rows: &'a [Row], kind: Kind, s3: &str, images: usize) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.kind == kind && r.s3 == s3 && r.images == images)
}

fn print_table(rows: &[Row], skip_tools: bool) {
    println!(
        "| S3 | Measurement | Bytes | Wall (s) | MiB/s | Peak RSS (MiB) | S3 requests | log: planning / streaming / finish (s) | CPU s: function / moto / xtask |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let secs = r.wall.as_secs_f64();
        println!(
            "| {} | {} | {} | {:.2} | {:.0} | {} | {} | {} | {} |",
            r.s3,
            r.what,
            r.bytes,
            secs,
            r.bytes as f64 / MIB / secs.max(1e-9),
            r.peak_rss_kib
                .map(|k| format!("{:.1}", k as f64 / 1024.0))
                .unwrap_or_else(|| "—".into()),
            r.s3_requests.map(|n| n.to_string()).unwrap_or_else(|| "—".into()),
            r.phases
                .map(|p| format!("{:.2} / {:.2} / {:.2}", p[0], p[1], p[2]))
                .unwrap_or_else(|| "—".into()),
            cpu_cell(r)
        );
    }
    println!();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    for s3 in [MOTO, S3S] {
        for n in [SMALL_IMAGES, IMAGES] {
            let (Some(f), Some(c)) = (
                find(rows, Kind::Function, s3, n),
                find(rows, Kind::RawPipe, s3, n),
            ) else {
                continue;
            };
            println!(
                "{s3}: zip-and-push {n} images wall / raw pipe (c) = {:.2} / {:.2} s = {:.2} (target ≤ 1.15)",
                f.wall.as_secs_f64(),
                c.wall.as_secs_f64(),
                f.wall.as_secs_f64() / c.wall.as_secs_f64().max(1e-9)
            );
        }
        // The processes share this machine's cores: their CPU seconds over the cores is a floor
        // no schedule can beat, whatever the function does with its own share.
        if let Some((Some(fcpu), moto, own)) = find(rows, Kind::Function, s3, IMAGES).and_then(|r| r.cpu) {
            let total = fcpu + moto + own;
            println!(
                "{s3}: zip-and-push 2 GiB CPU: function {fcpu:.1} + moto {moto:.1} + xtask {own:.1} = {total:.1} s \
                 on {cores} cores: no run can take less than {:.2} s",
                total / cores as f64
            );
        }
    }
    println!("{}", last_line(rows, skip_tools));
}

/// `zip-and-push: wall/raw-pipe=<x> (200MiB) <y> (2GiB); rss=<a>/<b> MiB; vs mapillary_tools=<z>x`,
/// on the s3s-fs rows; `n/a` for a figure whose rows are missing.
fn last_line(rows: &[Row], skip_tools: bool) -> String {
    let ratio = |n: usize| -> String {
        match (
            find(rows, Kind::Function, S3S, n),
            find(rows, Kind::RawPipe, S3S, n),
        ) {
            (Some(f), Some(c)) => format!("{:.2}", f.wall.as_secs_f64() / c.wall.as_secs_f64().max(1e-9)),
            _ => "n/a".into(),
        }
    };
    let rss = |n: usize| -> String {
        find(rows, Kind::Function, S3S, n)
            .and_then(|r| r.peak_rss_kib)
            .map(|k| format!("{:.1}", k as f64 / 1024.0))
            .unwrap_or_else(|| "n/a".into())
    };
    let tools = if skip_tools {
        "skipped".to_string()
    } else {
        // The faster way to get the same images to Mapillary with mapillary_tools: its default
        // per-image upload, or zip and then upload the zip (`process` is counted in neither).
        let wall = |prefix: &str| {
            rows.iter()
                .find(|r| r.kind == Kind::Tools && r.what.starts_with(prefix))
                .map(|r| r.wall.as_secs_f64())
        };
        let per_image = wall("mapillary_tools upload (per-image");
        let zipped = wall("mapillary_tools zip").zip(wall("mapillary_tools upload of the zip"));
        let best = [per_image, zipped.map(|(z, u)| z + u)]
            .into_iter()
            .flatten()
            .reduce(f64::min);
        match (best, find(rows, Kind::Function, S3S, IMAGES)) {
            (Some(t), Some(f)) => format!("{:.2}x", t / f.wall.as_secs_f64().max(1e-9)),
            _ => "n/a".into(),
        }
    };
    format!(
        "zip-and-push: wall/raw-pipe={} (200MiB) {} (2GiB); rss={}/{} MiB; vs mapillary_tools={tools}",
        ratio(SMALL_IMAGES),
        ratio(IMAGES),
        rss(SMALL_IMAGES),
        rss(IMAGES)
    )
}
