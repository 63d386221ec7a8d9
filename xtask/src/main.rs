//! `cargo xtask …`: the project's commands (see README.md).
//!
//! * `setup` — create the pinned Python venvs (`.venv/aws`, `.venv/mapillary-tools`).
//! * `stack up | down | status` — moto + the Mapillary simulator + the stack from `infra/template.yaml`.
//! * `test` — every check CI runs: fmt, clippy -D warnings, all unit and integration tests, fuzzing,
//!   and `demo --ci` last (`--no-demo` skips it).
//! * `demo` — the main job, end to end on the local stack.
//! * `package` — the functions built as Lambda runs them, sized, and started behind a Runtime API.

mod bench;
mod bench_api;
mod bench_poller;
mod demo;
mod package;
mod push;
mod runtime_api;
mod stack;
mod track;
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
    /// Create or refresh the pinned Python venvs (idempotent).
    Setup,
    /// Local stack: moto_server + Mapillary simulator + resources from infra/template.yaml.
    Stack {
        #[command(subcommand)]
        action: StackCmd,
    },
    /// Run every check: fmt, clippy -D warnings, unit + integration tests (starts and stops its own moto).
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Seconds per fuzz target after the tests (0 skips fuzzing).
        #[arg(long, default_value_t = 30)]
        fuzz_seconds: u64,
        /// Skip the last step, `cargo xtask demo --ci` (the demo end to end under `cargo lambda watch`).
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
            venv::ensure(&root)?;
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
                    opts.sim_args = vec![
                        "--realtime".into(),
                        "--stage-seconds".into(),
                        format!("{s},{s},{s},{s}"),
                    ];
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
        } => {
            test(&root, no_lint, &cargo_test_args)?;
            if fuzz_seconds > 0 {
                fuzz(&root, fuzz_seconds)?;
            }
            if !no_demo {
                // Last step: the demo end to end, non-interactively (fails unless all is FINISHED and linked).
                eprintln!("xtask: cargo xtask demo --ci");
                rt.block_on(demo::run(&root, true, demo::DEFAULT_IMAGES))?;
            }
            Ok(())
        }
        Cmd::Fuzz { seconds } => fuzz(&root, seconds),
        Cmd::Demo { ci, images } => rt.block_on(demo::run(&root, ci, images)),
        Cmd::Push {
            dir,
            user,
            sequence,
            track,
        } => rt.block_on(push::run(&root, &dir, user, sequence, track)),
        Cmd::Package { arch } => rt.block_on(package::run(&root, arch)),
        Cmd::Bench { what } if cfg!(debug_assertions) && std::env::var_os(BENCH_DEBUG_ENV).is_none() => {
            rerun_optimized(&root, &what)
        }
        Cmd::Bench { what } => match what.as_str() {
            "zip-and-push" => rt.block_on(bench::run(&root)),
            "poller" => rt.block_on(bench_poller::run(&root)),
            "status-api" => rt.block_on(bench_api::run(&root)),
            other => bail!("unknown benchmark {other:?} (known: zip-and-push, poller, status-api)"),
        },
    }
}

/// Set to run `cargo xtask bench` in the debug build it was started from (figures not comparable).
const BENCH_DEBUG_ENV: &str = "RELAY_BENCH_DEBUG";

/// Benchmarks measure optimized code: the simulator and the poller run inside this process, so a debug
/// `cargo xtask bench X` re-runs itself as `cargo run --profile bench-harness -p xtask -- bench X`.
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

/// The README's test command.
fn test(root: &Path, no_lint: bool, cargo_test_args: &[String]) -> Result<()> {
    let venvs = venv::ensure(root)?;
    // `sam validate --lint` in tests/tests/infra_checks.rs.
    venv::ensure_sam(root)?;
    if !no_lint {
        run(
            cargo(root).args(["fmt", "--all", "--", "--check"]),
            "cargo fmt --check",
        )?;
        run(
            cargo(root).args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]),
            "cargo clippy",
        )?;
    }
    // One moto for the whole run; each test isolates itself with its own stack name.
    let moto = integration_tests::moto::MotoServer::start(&venvs)?;
    eprintln!("test: moto at {}", moto.endpoint());
    let mut cmd = cargo(root);
    cmd.args(["test", "--workspace", "--no-fail-fast"])
        .args(cargo_test_args)
        .env(integration_tests::moto::MOTO_URL_ENV, moto.endpoint())
        .env("PATH", venvs.path_with_aws_bin());
    let result = run(&mut cmd, "cargo test");
    drop(moto);
    result
}

/// The libFuzzer targets of `fuzz/` (fuzz/Cargo.toml's `[[bin]]`s), run by `fuzz` and `test`.
const FUZZ_TARGETS: [&str; 4] = ["feed_parser", "coverage_tile", "planning_path", "planning_fields"];

/// The fuzz targets of `fuzz/` (their own workspace), each for `seconds`.
fn fuzz(root: &Path, seconds: u64) -> Result<()> {
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
    let dir = root.join("fuzz");
    for target in FUZZ_TARGETS {
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let mut cmd = Command::new(&cargo_fuzz);
        cmd.current_dir(&dir)
            // cargo-fuzz needs nightly-only sanitizer flags; only stable Rust exists here.
            .env("RUSTC_BOOTSTRAP", "1")
            // -a: overflow checks and debug assertions stay on in the optimised build (-O alone
            // turns them off, and an integer overflow is one of the things fuzzing looks for).
            .args(["fuzz", "run", "-O", "-a", target])
            .arg(&corpus)
            .arg(dir.join("seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-rss_limit_mb=2048");
        run(&mut cmd, &format!("fuzz {target} for {seconds} s"))?;
    }
    Ok(())
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
