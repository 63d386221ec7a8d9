//! `cargo xtask …`: the project's commands (see README.md). `cargo xtask` runs `xtask/launcher` first, which
//! builds this binary and every binary the commands start in one cargo invocation, with progress lines, and
//! installs the venvs the command needs meanwhile; then it runs this binary.
//!
//! * `setup` — create every pinned Python venv now (`.venv/{aws,mapillary-tools,checkov,schemathesis}`);
//!   otherwise each is installed when first needed.
//! * `stack up | down | status` — moto + the Mapillary simulator + the stack from `infra/template.yaml`.
//! * `test` — every check CI runs: fmt, the workspace-hack check, clippy -D warnings within the test build,
//!   each test tier, fuzzing, then `demo --ci`, the same in every other simulator world, and `soak --short`
//!   (`--no-demo` skips these three); a per-phase timing table at the end.
//! * `demo` — the main job, end to end on the local stack (`--world NAME`, `--all-worlds`).
//! * `soak` — many users' sequences, some hostile, under faults and killed function processes; invariants checked
//!   (docs/reliability.md).
//! * `package` — the functions built as Lambda runs them, sized, and started behind a Runtime API.

// Only `cargo xtask bench zip-and-push` uses it, and it needs the s3s crates: see xtask/Cargo.toml.
#[cfg(feature = "bench-s3")]
mod bench;
mod bench_api;
mod bench_poller;
mod binaries;
mod demo;
mod fuzz;
mod lambda_proc;
mod package;
mod push;
mod rng;
mod runtime_api;
mod soak;
mod stack;
mod track;
mod upload;
mod venv;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "mapillary-relay developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create or refresh every pinned Python venv now (idempotent; otherwise each installs on first use).
    Setup,
    /// Local stack: moto_server + Mapillary simulator + resources from infra/template.yaml.
    Stack {
        #[command(subcommand)]
        action: StackCmd,
    },
    /// Run every check: fmt, clippy -D warnings, unit + integration tests (starts and stops its own moto),
    /// fuzzing, the demo; prints a per-phase timing table at the end.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Seconds per fuzz target after the tests (0 skips fuzzing).
        #[arg(long, default_value_t = 15)]
        fuzz_seconds: u64,
        /// Skip the last steps: `cargo xtask demo --ci` (the demo end to end under `cargo lambda watch`),
        /// the same in every other world, and `cargo xtask soak --short`.
        #[arg(long)]
        no_demo: bool,
        /// Extra arguments for `cargo test` (after `--`), e.g. a test-name filter.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Fuzz the feed and coverage-tile parsers and the planning path (libFuzzer with cargo-fuzz's flags; see fuzz/README.md).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// The demo: moto + simulator + the three functions under `cargo lambda watch`; a generated
    /// sequence dropped into S3 and followed through the status API to FINISHED and linked.
    Demo {
        /// Non-interactive: exit non-zero unless every upload ends FINISHED and linked and the image
        /// without GPS is reported.
        #[arg(long)]
        ci: bool,
        /// Number of geotagged images to generate (plus one without GPS).
        #[arg(long, default_value_t = demo::DEFAULT_IMAGES)]
        images: usize,
        /// The simulator's world (docs/worlds.md): lenient, seed-2022, oauth-upload-refused,
        /// partial-bytes-dropped, refresh-revokes, feed-drift or feed-gone; default the simulator's.
        #[arg(long, default_value_t = mapillary_sim::DEFAULT_WORLD)]
        world: mapillary_sim::World,
        /// One sequence per world (lenient, seed-2022, partial-bytes-dropped, refresh-revokes, feed-drift,
        /// feed-gone, oauth-upload-refused) on one stack, simulator and set of functions.
        #[arg(long, conflicts_with = "world")]
        all_worlds: bool,
    },
    /// The soak (docs/reliability.md): many users' sequences, some hostile, through the whole relay with
    /// the simulator injecting faults and function processes killed at random points; ends with a table
    /// of invariants (lost, duplicate clusters, uploads not final, cross-tenant reads, panics) and
    /// exits non-zero if one is broken.
    Soak {
        /// Sequences to drop (default 100; 20 with --short).
        #[arg(long)]
        sequences: Option<usize>,
        /// Users, each connected over OAuth as their own simulator user (default 10; 4 with --short).
        #[arg(long)]
        users: Option<usize>,
        /// Seeds the mix of sequences, kill points, token expiries and fault rules.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The short variant: about 20 sequences from 4 users, every fault rule firing on every k-th
        /// match, a tighter time scale.
        #[arg(long)]
        short: bool,
    },
    /// Drop a local folder of JPEGs as a sequence into the local stack, run zip-and-push on it and
    /// print the sequence's status document (JSON) on stdout.
    Push {
        /// Folder with the images (`.jpg`/`.jpeg`, recursively).
        dir: PathBuf,
        /// Producer user id (`[A-Za-z0-9._-]`); connected to the simulator's demo user if needed.
        #[arg(long)]
        user: Option<String>,
        /// Sequence id (default: the folder name and a UTC timestamp).
        #[arg(long)]
        sequence: Option<String>,
        /// Then run the poller until every upload is final, printing each stage transition.
        #[arg(long)]
        track: bool,
    },
    /// Upload a flat folder of JPEGs through the status API (presigned PUTs, resumable by running it
    /// again), then follow it until every upload is final and print the Mapillary links. Without
    /// --api: against the local stack (started if needed), the API and the functions in-process.
    Upload {
        /// Folder with the images (`.jpg`/`.jpeg`, no subfolders).
        dir: PathBuf,
        /// Base URL of a deployed status API (e.g. the stack output StatusApiUrl).
        #[arg(long)]
        api: Option<String>,
        /// Bearer JWT for --api (default: $RELAY_API_TOKEN).
        #[arg(long, requires = "api")]
        token: Option<String>,
        /// Local mode only: the user id the local API takes the call as (default local-user).
        #[arg(long, conflicts_with = "api")]
        user: Option<String>,
    },
    /// Build the functions as Lambda runs them (cargo lambda build --release, zips with `bootstrap`),
    /// print their sizes, and start each behind a local Runtime API with a sample event (cold init
    /// and first response times; docs/deploy.md).
    Package {
        /// Instruction set (default: this machine's; the template's Architecture defaults to arm64).
        #[arg(long, value_enum)]
        arch: Option<package::Arch>,
    },
    /// Benchmarks (results go to docs/benchmarks.md by hand).
    Bench {
        /// What to benchmark: `zip-and-push`, `poller` or `status-api`.
        what: String,
    },
}

#[derive(Subcommand)]
enum StackCmd {
    /// Start everything and print `export` lines (use with `eval "$(cargo xtask stack up)"`).
    Up {
        /// Simulator stages advance in real time, this many seconds each (default: simulator default).
        #[arg(long)]
        stage_seconds: Option<u64>,
    },
    /// Stop what `up` started.
    Down,
    /// Say whether the stack is up (prints its exports if so).
    Status,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = repo_root();
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    match cli.command {
        Cmd::Setup => {
            integration_tests::venv::ensure_all(&root)?;
            venv::ensure_sam(&root)?;
            eprintln!("setup: venvs ready in {}", root.join(".venv").display());
            Ok(())
        }
        Cmd::Stack { action } => match action {
            StackCmd::Up { stage_seconds } => {
                let mut opts = stack::UpOptions::new(
                    mapillary_sim::defaults::APP_ID,
                    mapillary_sim::defaults::CLIENT_SECRET,
                );
                if let Some(s) = stage_seconds {
                    opts.sim_args = demo::realtime_args(s);
                }
                rt.block_on(stack::up(&root, &opts)).map(|_| ())
            }
            StackCmd::Down => stack::down(&root),
            StackCmd::Status => stack::status(&root).map(|_| ()),
        },
        Cmd::Test {
            no_lint,
            fuzz_seconds,
            no_demo,
            cargo_test_args,
        } => test_all(&root, &rt, no_lint, fuzz_seconds, no_demo, &cargo_test_args),
        Cmd::Fuzz { seconds } => fuzz(&root, seconds),
        Cmd::Demo {
            ci,
            images,
            world,
            all_worlds,
        } => {
            let worlds = if all_worlds {
                demo::ALL_WORLDS.to_vec()
            } else {
                vec![world]
            };
            rt.block_on(demo::run(&root, ci, images, &worlds))
        }
        Cmd::Soak {
            sequences,
            users,
            seed,
            short,
        } => {
            let (default_sequences, default_users) = if short {
                (soak::SHORT_SEQUENCES, soak::SHORT_USERS)
            } else {
                (100, 10)
            };
            rt.block_on(soak::run(
                &root,
                soak::Options {
                    sequences: sequences.unwrap_or(default_sequences),
                    users: users.unwrap_or(default_users),
                    seed,
                    short,
                },
            ))
        }
        Cmd::Push {
            dir,
            user,
            sequence,
            track,
        } => rt.block_on(push::run(&root, &dir, user, sequence, track)),
        Cmd::Upload {
            dir,
            api,
            token,
            user,
        } => rt.block_on(upload::run(&root, &dir, api, token, user)),
        Cmd::Package { arch } => rt.block_on(package::run(&root, arch)),
        Cmd::Bench { what } if cfg!(debug_assertions) && std::env::var_os(BENCH_DEBUG_ENV).is_none() => {
            rerun_optimized(&root, &what)
        }
        Cmd::Bench { what } => match what.as_str() {
            #[cfg(feature = "bench-s3")]
            "zip-and-push" => rt.block_on(bench::run(&root)),
            #[cfg(not(feature = "bench-s3"))]
            "zip-and-push" => bail!(
                "this xtask was built without the `bench-s3` feature, which the zip-and-push benchmark \
                 needs (its s3s-fs server): run `cargo xtask bench zip-and-push` without {BENCH_DEBUG_ENV} \
                 (it re-runs itself optimized with the feature), or, to keep a debug build, \
                 `{BENCH_DEBUG_ENV}=1 cargo run -p xtask --features {BENCH_FEATURE} -- bench zip-and-push`"
            ),
            "poller" => rt.block_on(bench_poller::run(&root)),
            "status-api" => rt.block_on(bench_api::run(&root)),
            other => bail!("unknown benchmark {other:?} (known: zip-and-push, poller, status-api)"),
        },
    }
}

/// Set to run `cargo xtask bench` in the debug build it was started from (figures not comparable).
const BENCH_DEBUG_ENV: &str = "RELAY_BENCH_DEBUG";

/// The xtask feature with the zip-and-push benchmark's dependencies; on in every bench-harness build
/// so that the one optimized xtask binary runs all the benchmarks.
const BENCH_FEATURE: &str = "bench-s3";

/// Benchmarks measure optimized code: the simulator and the poller run inside this process, so a debug
/// `cargo xtask bench X` re-runs itself as
/// `cargo run --profile bench-harness -p xtask --features bench-s3 -- bench X`.
fn rerun_optimized(root: &Path, what: &str) -> Result<()> {
    eprintln!("xtask: building xtask with --profile bench-harness for the benchmark");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .current_dir(root)
        .args([
            "run",
            "--quiet",
            "--profile",
            "bench-harness",
            "--package",
            "xtask",
            "--features",
            BENCH_FEATURE,
            "--",
            "bench",
            what,
        ])
        .env(BENCH_DEBUG_ENV, "0")
        .status()
        .context("running cargo run --profile bench-harness")?;
    if !status.success() {
        bail!("cargo xtask bench {what} (bench-harness profile) failed ({status})");
    }
    Ok(())
}

/// Set by the launcher (xtask/launcher): how long its venv installs and its build took, and its whole
/// run before it started this process (`venvs=…,build=…,wall=…`).
const LAUNCH_TIMES_ENV: &str = "RELAY_XTASK_LAUNCH_TIMES";

/// How many test tiers `cargo xtask test` runs at once, each worker with its own moto (default 2).
const TEST_WORKERS_ENV: &str = "RELAY_TEST_WORKERS";

/// One row of the phase table `cargo xtask test` prints at the end.
struct Phase {
    name: String,
    /// Seconds after this process started (`None`: the launcher's phases, before it).
    start: Option<f64>,
    secs: f64,
    ok: bool,
}

/// The phases of `cargo xtask test`, timed; a failed phase does not stop the later ones (like
/// `--no-fail-fast`), the table and the list of failures are printed at the end. Some phases overlap
/// (test tiers run on [`TEST_WORKERS_ENV`] workers, fuzzing beside the demo): the `start` column
/// shows it, and the last row is the wall time, not the sum.
struct Phases {
    rows: Vec<Phase>,
    started: std::time::Instant,
    /// The launcher's wall time before this process (its build and venvs).
    launch_wall: f64,
}

impl Phases {
    /// The launcher's phases (they ran before this process, in parallel with each other).
    fn from_launcher() -> Self {
        let times = std::env::var(LAUNCH_TIMES_ENV).unwrap_or_default();
        let get = |key: &str| {
            times
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.parse::<f64>().ok())
        };
        let mut phases = Self {
            rows: Vec::new(),
            started: std::time::Instant::now(),
            launch_wall: get("wall").unwrap_or(0.0),
        };
        for (key, name) in [
            ("venvs", "venvs (pip, in parallel with the build)"),
            ("build", "build: xtask + function and simulator binaries"),
        ] {
            if let Some(secs) = get(key) {
                phases.rows.push(Phase {
                    name: name.into(),
                    start: None,
                    secs,
                    ok: true,
                });
            }
        }
        phases
    }

    /// Seconds since this process started.
    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn time(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> bool {
        let phase = timed(self.started, name, f);
        let ok = phase.ok;
        self.rows.push(phase);
        ok
    }

    fn print(&self) {
        let wall = self.launch_wall + self.now();
        let width = self.rows.iter().map(|r| r.name.len()).max().unwrap_or(5).max(5);
        eprintln!("\nxtask test: phases (start: seconds after the launcher's build)");
        eprintln!(
            "| {:<width$} | {:>7} | {:>8} | result |",
            "phase", "start", "seconds"
        );
        eprintln!("|-{:-<width$}-|-{:->7}-|-{:->8}-|--------|", "", "", "");
        for r in &self.rows {
            let result = if r.ok { "ok" } else { "FAILED" };
            let start = r
                .start
                .map(|s| format!("{:.1}", self.launch_wall + s))
                .unwrap_or_else(|| "0.0".into());
            eprintln!(
                "| {:<width$} | {start:>7} | {:>8.1} | {result:<6} |",
                r.name, r.secs
            );
        }
        eprintln!(
            "| {:<width$} | {:>7} | {:>8.1} |        |",
            "total (wall)", "", wall
        );
    }

    fn failed(&self) -> Vec<&str> {
        self.rows
            .iter()
            .filter(|r| !r.ok)
            .map(|r| r.name.as_str())
            .collect()
    }
}

/// Runs `f` as the phase `name`, timed against `started` (also from a thread other than the one holding
/// [`Phases`]); a failure is printed with its cause.
fn timed(started: std::time::Instant, name: &str, f: impl FnOnce() -> Result<()>) -> Phase {
    let start = started.elapsed().as_secs_f64();
    let result = f();
    if let Err(e) = &result {
        eprintln!("xtask: {name} FAILED: {e:#}");
    }
    Phase {
        name: name.to_string(),
        start: Some(start),
        secs: started.elapsed().as_secs_f64() - start,
        ok: result.is_ok(),
    }
}

/// The README's test command: every phase timed, the table printed at the end (also on failure).
fn test_all(
    root: &Path,
    rt: &tokio::runtime::Runtime,
    no_lint: bool,
    fuzz_seconds: u64,
    no_demo: bool,
    cargo_test_args: &[String],
) -> Result<()> {
    let mut phases = Phases::from_launcher();
    test(root, &mut phases, no_lint, cargo_test_args);
    if no_demo {
        if fuzz_seconds > 0 {
            let rows = fuzz_phases(root, fuzz_seconds, None, phases.started);
            phases.rows.extend(rows);
        }
    } else {
        // The demo, the other worlds and the soak mostly wait (real-time simulator stages, the
        // emulated schedule: 20–35 % of 2 cores in CI), and fuzzing is one process on one core: it runs
        // beside them at nice 10 instead of after them (the build of the fuzz crate too).
        let started = phases.started;
        std::thread::scope(|s| {
            let fuzzing = (fuzz_seconds > 0)
                .then(|| s.spawn(move || fuzz_phases(root, fuzz_seconds, Some(10), started)));
            demo_phases(root, rt, &mut phases);
            if let Some(fuzzing) = fuzzing {
                match fuzzing.join() {
                    Ok(rows) => phases.rows.extend(rows),
                    Err(_) => {
                        phases.time("fuzzing", || bail!("the fuzzing thread panicked"));
                    }
                }
            }
        });
    }
    phases.print();
    let failed = phases.failed();
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

/// `demo --ci`, the same in every other world, and `soak --short`, one after another (each starts its own
/// local stack). Their binaries are the launcher's build: nothing compiles here.
fn demo_phases(root: &Path, rt: &tokio::runtime::Runtime, phases: &mut Phases) {
    // The demo end to end, non-interactively (fails unless all is FINISHED and linked).
    phases.time("demo --ci", || {
        eprintln!("xtask: cargo xtask demo --ci");
        rt.block_on(demo::run(
            root,
            true,
            demo::DEFAULT_IMAGES,
            &[mapillary_sim::DEFAULT_WORLD],
        ))
    });
    // Then the relay in every other world, one sequence each on one stack (the default world ran just above).
    let others: Vec<mapillary_sim::World> = demo::ALL_WORLDS
        .into_iter()
        .filter(|w| *w != mapillary_sim::DEFAULT_WORLD)
        .collect();
    phases.time("demo --ci, every other world", || {
        eprintln!("xtask: cargo xtask demo --ci in {} more worlds", others.len());
        rt.block_on(demo::run(root, true, demo::WORLDS_IMAGES, &others))
    });
    // The short soak (issue 15): 20 sequences of 4 users, some hostile, under every fault rule and killed
    // function processes, through the emulated SQS mapping and schedule; fails on any broken invariant
    // (lost, duplicate clusters, not final, cross-tenant reads, panics).
    phases.time("soak --short", || {
        eprintln!("xtask: cargo xtask soak --short");
        rt.block_on(soak::run(
            root,
            soak::Options {
                sequences: soak::SHORT_SEQUENCES,
                users: soak::SHORT_USERS,
                seed: 1,
                short: true,
            },
        ))
    });
}

/// One test tier: a `cargo test` argument list and, for a file of a merged test binary, its module as
/// the test-name filter.
struct Tier {
    name: String,
    args: Vec<String>,
    filter: Option<String>,
}

/// fmt, the workspace-hack check, clippy + the test build (one compilation), then the test tiers on
/// [`TEST_WORKERS_ENV`] workers.
fn test(root: &Path, phases: &mut Phases, no_lint: bool, cargo_test_args: &[String]) {
    // clippy as the compiler of the workspace's own crates in the test build: `cargo clippy` would check every
    // dependency again in check mode (metadata only, unusable by `cargo test`) and each workspace crate once
    // more. With clippy-driver as RUSTC_WORKSPACE_WRAPPER the one `cargo test --no-run` build both lints
    // (-D warnings, as `cargo clippy` passes it: CLIPPY_ARGS) and produces the test binaries, on the
    // dependency artifacts the launcher's build already made. Every later cargo test invocation keeps the same
    // environment, or cargo would rebuild the workspace crates without the wrapper.
    let lint_env: Vec<(&str, String)> = if no_lint {
        Vec::new()
    } else {
        vec![
            ("RUSTC_WORKSPACE_WRAPPER", clippy_driver()),
            (
                "CLIPPY_ARGS",
                "-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__".into(),
            ),
        ]
    };
    let cargo_test = |args: &[&str]| {
        let mut cmd = cargo(root);
        cmd.arg("test").args(args);
        for (k, v) in &lint_env {
            cmd.env(k, v);
        }
        cmd
    };
    if !no_lint {
        phases.time("cargo fmt --check", || {
            run(
                cargo(root).args(["fmt", "--all", "--", "--check"]),
                "cargo fmt --check",
            )
        });
    }
    let build_name = if no_lint {
        "test build"
    } else {
        "clippy -D warnings + test build"
    };
    // The workspace-hack check only resolves (19 `cargo … --unit-graph` runs, nothing compiles, 16–26 s):
    // it runs beside the build, which keeps both cores busy anyway.
    let started = phases.started;
    let built = std::thread::scope(|s| {
        let hack = (!no_lint).then(|| {
            s.spawn(move || {
                timed(started, "workspace-hack check (beside the build)", || {
                    run(
                        Command::new("python3")
                            .current_dir(root)
                            .args([".ci/workspace-hack.py", "--check"]),
                        "python3 .ci/workspace-hack.py --check",
                    )
                })
            })
        });
        let built = phases.time(build_name, || {
            run(
                &mut cargo_test(&["--workspace", "--all-targets", "--no-run"]),
                build_name,
            )
        });
        if let Some(hack) = hack {
            let phase = hack.join().unwrap_or_else(|_| {
                timed(started, "workspace-hack check (beside the build)", || {
                    bail!("the check's thread panicked")
                })
            });
            phases.rows.push(phase);
        }
        built
    });
    if !built {
        return;
    }
    let venvs = match venv::ensure(root) {
        Ok(v) => v,
        Err(e) => {
            phases.time("venvs", || Err(e));
            return;
        }
    };
    // A test-name filter from the command line and a module filter would be OR-ed by libtest: with one,
    // each test binary runs as one tier.
    let tiers = match test_tiers(root, cargo_test_args.is_empty()) {
        Ok(t) => t,
        Err(e) => {
            phases.time("list test targets", || Err(e));
            return;
        }
    };
    let workers = std::env::var(TEST_WORKERS_ENV)
        .ok()
        .and_then(|w| w.parse::<usize>().ok())
        .unwrap_or(2)
        .clamp(1, 8);
    // The integration tests mostly wait for moto, the simulator's stages and the processes they start
    // (45–65 % of 2 cores when they ran one at a time): two tiers at once, each worker with its own moto
    // (one moto serves one request at a time; each test isolates itself with its own stack name). The
    // longest tiers start first; the table keeps the listing order. A tier's output is kept in a file
    // and printed whole when it ends, so two tiers' lines never interleave.
    let logs = root.join("target/test-logs");
    if let Err(e) = std::fs::create_dir_all(&logs) {
        phases.time("test logs directory", || Err(e.into()));
        return;
    }
    let order = run_order(&tiers);
    let queue = std::sync::Mutex::new(order.into_iter().collect::<std::collections::VecDeque<_>>());
    let results = std::sync::Mutex::new(Vec::<(usize, Phase)>::new());
    let print = std::sync::Mutex::new(());
    let started = phases.started;
    std::thread::scope(|s| {
        for worker in 0..workers {
            let (queue, results, print, tiers, venvs, logs) =
                (&queue, &results, &print, &tiers, &venvs, &logs);
            let cargo_test = &cargo_test;
            s.spawn(move || {
                let moto = match integration_tests::moto::MotoServer::start(venvs) {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!("xtask: test worker {worker}: moto did not start: {e:#}");
                        let at = started.elapsed().as_secs_f64();
                        lock(results).push((
                            usize::MAX - worker,
                            Phase {
                                name: format!("moto of test worker {worker}"),
                                start: Some(at),
                                secs: 0.0,
                                ok: false,
                            },
                        ));
                        return;
                    }
                };
                eprintln!("xtask: test worker {worker}: moto at {}", moto.endpoint());
                loop {
                    let Some(i) = lock(queue).pop_front() else {
                        break;
                    };
                    let tier = &tiers[i];
                    let mut args: Vec<&str> = tier.args.iter().map(String::as_str).collect();
                    args.push("--no-fail-fast");
                    if tier.filter.is_some() || !cargo_test_args.is_empty() {
                        args.push("--");
                    }
                    args.extend(tier.filter.as_deref());
                    args.extend(cargo_test_args.iter().map(String::as_str));
                    let what = format!("cargo test {}", args.join(" "));
                    let log = logs.join(format!("{}.log", slug(&tier.name)));
                    let mut cmd = cargo_test(&args);
                    cmd.env(integration_tests::moto::MOTO_URL_ENV, moto.endpoint())
                        .env("PATH", venvs.path_with_aws_bin());
                    eprintln!("xtask: [worker {worker}] {what}");
                    let start = started.elapsed().as_secs_f64();
                    let result = run_to_log(&mut cmd, &log, &what);
                    let secs = started.elapsed().as_secs_f64() - start;
                    {
                        let _one_at_a_time = lock(print);
                        let text = std::fs::read_to_string(&log).unwrap_or_default();
                        eprintln!("xtask: [worker {worker}] {} ({secs:.1} s):", tier.name);
                        eprint!("{text}");
                        if let Err(e) = &result {
                            eprintln!("xtask: {} FAILED: {e:#}", tier.name);
                        }
                    }
                    lock(results).push((
                        i,
                        Phase {
                            name: tier.name.clone(),
                            start: Some(start),
                            secs,
                            ok: result.is_ok(),
                        },
                    ));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|(i, _)| *i);
    phases.rows.extend(results.into_iter().map(|(_, phase)| phase));
    let left = lock(&queue).len();
    if left > 0 {
        phases.time("test tiers not run (no test worker)", || {
            bail!("{left} test tier(s) not run: every test worker's moto failed to start")
        });
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The tiers in the order the workers take them: the ones known to take longest first (measured in CI,
/// docs/benchmarks.md), so that the last tier running alone is a short one; then the listing order.
fn run_order(tiers: &[Tier]) -> Vec<usize> {
    const LONGEST_FIRST: [&str; 7] = [
        "zip_and_push",
        "poller_events",
        "status_api_watch",
        "infra_checks",
        "adapters_dynamo",
        "lambda_invoke",
        "mapillary_tools_conformance",
    ];
    let rank = |t: &Tier| {
        LONGEST_FIRST
            .iter()
            .position(|m| t.filter.as_deref() == Some(&format!("{m}::")))
            .unwrap_or(LONGEST_FIRST.len())
    };
    let mut order: Vec<usize> = (0..tiers.len()).collect();
    order.sort_by_key(|&i| rank(&tiers[i]));
    order
}

/// A tier name as a file name.
fn slug(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// Runs `cmd` with stdout and stderr into `log`.
fn run_to_log(cmd: &mut Command, log: &Path, what: &str) -> Result<()> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().context("cloning a log handle")?;
    let status = cmd
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// The wrapper the launcher set for the whole run (see `lint_everything` in xtask/launcher), else
/// `clippy-driver` next to this toolchain's cargo (as `cargo clippy` finds it), else from `PATH`.
fn clippy_driver() -> String {
    if let Some(set) = std::env::var("RUSTC_WORKSPACE_WRAPPER")
        .ok()
        .filter(|w| !w.is_empty())
    {
        return set;
    }
    let cargo = std::env::var("CARGO").unwrap_or_default();
    let beside = Path::new(&cargo).with_file_name("clippy-driver");
    if beside.is_file() {
        return beside.display().to_string();
    }
    "clippy-driver".into()
}

/// The test tiers: every crate's unit tests (lib + bins) together, then each integration-test file on its
/// own (so the table shows where the time goes), then doc tests. A package's test files are modules of
/// one test binary (`tests/main.rs`, `mod <file>;`: compiled and linked once); with `split`, each such
/// module is a tier of its own, filtered by its `<module>::` prefix.
fn test_tiers(root: &Path, split: bool) -> Result<Vec<Tier>> {
    let out = cargo(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed ({})", out.status);
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let s = |v: &str| v.to_string();
    let mut tiers = vec![Tier {
        name: s("unit tests (every crate's lib + bins)"),
        args: vec![s("--workspace"), s("--lib"), s("--bins")],
        filter: None,
    }];
    let mut targets = Vec::new();
    for package in meta["packages"].as_array().into_iter().flatten() {
        let pkg = package["name"].as_str().unwrap_or_default();
        for target in package["targets"].as_array().into_iter().flatten() {
            let is_test = target["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
            if let (true, Some(name), Some(src)) =
                (is_test, target["name"].as_str(), target["src_path"].as_str())
            {
                targets.push((pkg.to_string(), name.to_string(), PathBuf::from(src)));
            }
        }
    }
    targets.sort();
    for (pkg, name, src) in targets {
        let args = vec![s("-p"), pkg.clone(), s("--test"), name.clone()];
        let modules = if split { test_modules(&src)? } else { Vec::new() };
        if modules.is_empty() {
            tiers.push(Tier {
                name: format!("tests: {pkg} --test {name}"),
                args: args.clone(),
                filter: None,
            });
        }
        for module in modules {
            tiers.push(Tier {
                name: format!("tests: {pkg} {module}"),
                args: args.clone(),
                filter: Some(format!("{module}::")),
            });
        }
    }
    tiers.push(Tier {
        name: s("doc tests"),
        args: vec![s("--workspace"), s("--doc")],
        filter: None,
    });
    Ok(tiers)
}

/// The test files of a merged test binary: its root's `mod <name>;` lines whose `<name>.rs` sits beside
/// it (helper modules — `common/`, a `#[path]` module, an inline one — are not tiers). No module if the
/// root is not `main.rs` (an ordinary one-file test target).
fn test_modules(src: &Path) -> Result<Vec<String>> {
    if src.file_name().is_none_or(|n| n != "main.rs") {
        return Ok(Vec::new());
    }
    let dir = src.parent().unwrap_or(Path::new("."));
    let text = std::fs::read_to_string(src).with_context(|| format!("reading {}", src.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("mod ")?.strip_suffix(';'))
        .filter(|m| dir.join(format!("{m}.rs")).is_file())
        .map(str::to_string)
        .collect())
}

/// `cargo xtask fuzz`: every target of `fuzz/` for `seconds`, one after another, libFuzzer's output shown.
fn fuzz(root: &Path, seconds: u64) -> Result<()> {
    let logs = root.join("target/fuzz-logs");
    fuzz::build(root, &logs.join("build.log"), None)?;
    for target in fuzz::TARGETS {
        fuzz::run(root, target, seconds, &logs.join(format!("{target}.log")), None)?;
    }
    Ok(())
}

/// [`fuzz`] as phases of `cargo xtask test` (the build of the fuzz crate, then each target), at `nice` when
/// it runs beside the demo. Returns the table's rows (timed against `started`).
fn fuzz_phases(root: &Path, seconds: u64, niceness: Option<u8>, started: std::time::Instant) -> Vec<Phase> {
    let logs = root.join("target/fuzz-logs");
    let build = timed(started, "fuzz: build the 5 targets", || {
        fuzz::build(root, &logs.join("build.log"), niceness)
    });
    let built = build.ok;
    let mut rows = vec![build];
    if built {
        for target in fuzz::TARGETS {
            rows.push(timed(started, &format!("fuzz {target} ({seconds} s)"), || {
                fuzz::run(
                    root,
                    target,
                    seconds,
                    &logs.join(format!("{target}.log")),
                    niceness,
                )
            }));
        }
    }
    rows
}

/// `program` at CPU priority `niceness` (`nice -n N`, where coreutils' `nice` is installed; as is without).
pub(crate) fn lowered(program: impl AsRef<std::ffi::OsStr>, niceness: Option<u8>) -> Command {
    let nice = ["/usr/bin/nice", "/bin/nice"]
        .into_iter()
        .find(|p| Path::new(p).is_file());
    match (niceness, nice) {
        (Some(n), Some(nice)) => {
            let mut cmd = Command::new(nice);
            cmd.args(["-n", &n.to_string()]).arg(program);
            cmd
        }
        _ => Command::new(program),
    }
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    eprintln!("xtask: {what}");
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn repo_root() -> PathBuf {
    integration_tests::repo_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merged_test_binary_splits_into_its_file_modules_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("main.rs");
        std::fs::write(
            &main,
            "//! doc\nmod common;\n\n#[path = \"common/rng.rs\"]\nmod rng;\nmod domain {\n    pub use x::*;\n}\nmod alpha;\nmod beta;\nmod gone;\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("common")).unwrap();
        std::fs::write(dir.path().join("common/mod.rs"), "").unwrap();
        std::fs::write(dir.path().join("common/rng.rs"), "").unwrap();
        std::fs::write(dir.path().join("alpha.rs"), "").unwrap();
        std::fs::write(dir.path().join("beta.rs"), "").unwrap();
        assert_eq!(test_modules(&main).unwrap(), ["alpha", "beta"]);
        // An ordinary one-file test target is one tier.
        let single = dir.path().join("alpha.rs");
        assert!(test_modules(&single).unwrap().is_empty());
    }

    #[test]
    fn the_longest_tiers_start_first_and_the_rest_keep_their_order() {
        let tier = |name: &str, filter: Option<&str>| Tier {
            name: name.into(),
            args: Vec::new(),
            filter: filter.map(str::to_string),
        };
        let tiers = [
            tier("unit", None),
            tier("a", Some("adapters_s3::")),
            tier("p", Some("poller_events::")),
            tier("z", Some("zip_and_push::")),
            tier("doc", None),
        ];
        assert_eq!(run_order(&tiers), [3, 2, 0, 1, 4]);
    }
}
