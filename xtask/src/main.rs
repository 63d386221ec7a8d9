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
    /// Fuzz the feed and coverage-tile parsers and the planning path (cargo-fuzz on stable via RUSTC_BOOTSTRAP; see fuzz/README.md).
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

/// Set by the launcher (xtask/launcher): how long its venv installs and its build took (`venvs=…,build=…`).
const LAUNCH_TIMES_ENV: &str = "RELAY_XTASK_LAUNCH_TIMES";

/// One row of the phase table `cargo xtask test` prints at the end.
struct Phase {
    name: String,
    secs: f64,
    ok: bool,
}

/// The phases of `cargo xtask test`, timed; a failed phase does not stop the later ones (like
/// `--no-fail-fast`), the table and the list of failures are printed at the end.
#[derive(Default)]
struct Phases {
    rows: Vec<Phase>,
}

impl Phases {
    /// The launcher's phases (they ran before this process, in parallel with each other).
    fn from_launcher() -> Self {
        let mut phases = Self::default();
        let times = std::env::var(LAUNCH_TIMES_ENV).unwrap_or_default();
        for (key, name) in [
            ("venvs", "venvs (pip, in parallel with the build)"),
            ("build", "build: xtask + function and simulator binaries"),
        ] {
            let secs = times
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.parse::<f64>().ok());
            if let Some(secs) = secs {
                phases.rows.push(Phase {
                    name: name.into(),
                    secs,
                    ok: true,
                });
            }
        }
        phases
    }

    fn time(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> bool {
        let start = std::time::Instant::now();
        let result = f();
        if let Err(e) = &result {
            eprintln!("xtask: {name} FAILED: {e:#}");
        }
        self.rows.push(Phase {
            name: name.to_string(),
            secs: start.elapsed().as_secs_f64(),
            ok: result.is_ok(),
        });
        result.is_ok()
    }

    fn print(&self) {
        let total: f64 = self.rows.iter().map(|r| r.secs).sum();
        let width = self.rows.iter().map(|r| r.name.len()).max().unwrap_or(5).max(5);
        eprintln!("\nxtask test: phases");
        eprintln!("| {:<width$} | {:>8} | result |", "phase", "seconds");
        eprintln!("|-{:-<width$}-|-{:->8}-|--------|", "", "");
        for r in &self.rows {
            let result = if r.ok { "ok" } else { "FAILED" };
            eprintln!("| {:<width$} | {:>8.1} | {result:<6} |", r.name, r.secs);
        }
        eprintln!("| {:<width$} | {:>8.1} |        |", "total", total);
    }

    fn failed(&self) -> Vec<&str> {
        self.rows
            .iter()
            .filter(|r| !r.ok)
            .map(|r| r.name.as_str())
            .collect()
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
    if fuzz_seconds > 0 {
        fuzz_phases(root, fuzz_seconds, &mut phases);
    }
    if !no_demo {
        // Last step: the demo end to end, non-interactively (fails unless all is FINISHED and linked).
        // Its binaries are the launcher's build: nothing compiles here.
        phases.time("demo --ci", || {
            eprintln!("xtask: cargo xtask demo --ci");
            rt.block_on(demo::run(
                root,
                true,
                demo::DEFAULT_IMAGES,
                &[mapillary_sim::DEFAULT_WORLD],
            ))
        });
    }
    if !no_demo {
        // Then the relay in every other world, one sequence each on one stack (the default world ran
        // just above).
        let others: Vec<mapillary_sim::World> = demo::ALL_WORLDS
            .into_iter()
            .filter(|w| *w != mapillary_sim::DEFAULT_WORLD)
            .collect();
        phases.time("demo --ci, every other world", || {
            eprintln!("xtask: cargo xtask demo --ci in {} more worlds", others.len());
            rt.block_on(demo::run(root, true, demo::WORLDS_IMAGES, &others))
        });
    }
    if !no_demo {
        // The short soak (issue 15): 20 sequences of 4 users, some hostile, under every fault rule and
        // killed function processes, through the emulated SQS mapping and schedule; fails on any broken
        // invariant (lost, duplicate clusters, not final, cross-tenant reads, panics).
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
    phases.print();
    let failed = phases.failed();
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

/// fmt, the workspace-hack check, clippy + the test build (one compilation), then each test tier.
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
        phases.time("workspace-hack check", || {
            run(
                Command::new("python3")
                    .current_dir(root)
                    .args([".ci/workspace-hack.py", "--check"]),
                "python3 .ci/workspace-hack.py --check",
            )
        });
    }
    let build_name = if no_lint {
        "test build"
    } else {
        "clippy -D warnings + test build"
    };
    let built = phases.time(build_name, || {
        run(
            &mut cargo_test(&["--workspace", "--all-targets", "--no-run"]),
            build_name,
        )
    });
    if !built {
        return;
    }
    // One moto for the whole run; each test isolates itself with its own stack name.
    let venvs = match venv::ensure(root) {
        Ok(v) => v,
        Err(e) => {
            phases.time("venvs", || Err(e));
            return;
        }
    };
    let moto = match integration_tests::moto::MotoServer::start(&venvs) {
        Ok(m) => m,
        Err(e) => {
            phases.time("moto", || Err(e));
            return;
        }
    };
    eprintln!("test: moto at {}", moto.endpoint());
    let tiers = match test_tiers(root) {
        Ok(t) => t,
        Err(e) => {
            phases.time("list test targets", || Err(e));
            return;
        }
    };
    for (name, args) in tiers {
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.push("--no-fail-fast");
        if !cargo_test_args.is_empty() {
            args.push("--");
            args.extend(cargo_test_args.iter().map(String::as_str));
        }
        let mut cmd = cargo_test(&args);
        cmd.env(integration_tests::moto::MOTO_URL_ENV, moto.endpoint())
            .env("PATH", venvs.path_with_aws_bin());
        phases.time(&name, || run(&mut cmd, &format!("cargo test {}", args.join(" "))));
    }
    drop(moto);
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

/// The test tiers, each a `cargo test` argument list: every crate's unit tests (lib + bins) together,
/// then each integration-test target on its own (so the table shows where the time goes), then doc tests.
fn test_tiers(root: &Path) -> Result<Vec<(String, Vec<String>)>> {
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
    let mut tiers = vec![(
        s("unit tests (every crate's lib + bins)"),
        vec![s("--workspace"), s("--lib"), s("--bins")],
    )];
    let mut targets = Vec::new();
    for package in meta["packages"].as_array().into_iter().flatten() {
        let pkg = package["name"].as_str().unwrap_or_default();
        for target in package["targets"].as_array().into_iter().flatten() {
            let is_test = target["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
            if let (true, Some(name)) = (is_test, target["name"].as_str()) {
                targets.push((pkg.to_string(), name.to_string()));
            }
        }
    }
    targets.sort();
    for (pkg, name) in targets {
        tiers.push((
            format!("tests: {pkg} --test {name}"),
            vec![s("-p"), pkg, s("--test"), name],
        ));
    }
    tiers.push((s("doc tests"), vec![s("--workspace"), s("--doc")]));
    Ok(tiers)
}

/// The libFuzzer targets of `fuzz/` (fuzz/Cargo.toml's `[[bin]]`s), run by `fuzz` and `test`.
const FUZZ_TARGETS: [&str; 5] = [
    "feed_parser",
    "coverage_tile",
    "planning_path",
    "planning_fields",
    "mapillary_replies",
];

/// The fuzz targets of `fuzz/` (their own workspace), each for `seconds`.
fn fuzz(root: &Path, seconds: u64) -> Result<()> {
    let cargo_fuzz = install_cargo_fuzz(root)?;
    for target in FUZZ_TARGETS {
        fuzz_one(root, &cargo_fuzz, target, seconds)?;
    }
    Ok(())
}

/// [`fuzz`] as phases of `cargo xtask test` (the first one includes building the fuzz crate).
fn fuzz_phases(root: &Path, seconds: u64, phases: &mut Phases) {
    let mut cargo_fuzz = None;
    phases.time("install cargo-fuzz", || {
        cargo_fuzz = Some(install_cargo_fuzz(root)?);
        Ok(())
    });
    let Some(cargo_fuzz) = cargo_fuzz else { return };
    for target in FUZZ_TARGETS {
        phases.time(&format!("fuzz {target} (build + {seconds} s)"), || {
            fuzz_one(root, &cargo_fuzz, target, seconds)
        });
    }
}

fn install_cargo_fuzz(root: &Path) -> Result<PathBuf> {
    const CARGO_FUZZ_VERSION: &str = "0.13.2";
    let tools = root.join(".tools");
    let cargo_fuzz = tools.join("bin/cargo-fuzz");
    if !cargo_fuzz.exists() {
        run(
            cargo(root)
                .args([
                    "install",
                    "cargo-fuzz",
                    "--locked",
                    "--version",
                    CARGO_FUZZ_VERSION,
                    "--root",
                ])
                .arg(&tools),
            "cargo install cargo-fuzz",
        )?;
    }
    Ok(cargo_fuzz)
}

fn fuzz_one(root: &Path, cargo_fuzz: &Path, target: &str, seconds: u64) -> Result<()> {
    let dir = root.join("fuzz");
    let corpus = dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let mut cmd = Command::new(cargo_fuzz);
    cmd.current_dir(&dir)
        // cargo-fuzz passes nightly-only flags; only stable Rust exists here.
        .env("RUSTC_BOOTSTRAP", "1")
        // -a: overflow checks and debug assertions stay on in the optimised build (-O alone
        // turns them off, and an integer overflow is one of the things fuzzing looks for).
        // -s none: no AddressSanitizer. The fuzzed code is safe Rust (no `unsafe` in shared/ or
        // fuzz/), where ASan has nothing to find that the bounds checks do not already; without it the
        // build is shorter and each second runs 5–8× the inputs (measured in CI: feed_parser 119k
        // exec/s against 18k with ASan; libFuzzer's coverage instrumentation stays).
        .args(["fuzz", "run", "-O", "-a", "-s", "none", target])
        .arg(&corpus)
        .arg(dir.join("seeds").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-rss_limit_mb=2048");
    run(&mut cmd, &format!("fuzz {target} for {seconds} s"))
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
