//! The libFuzzer targets of `fuzz/` (their own workspace): one `cargo build` of all of them with the
//! instrumentation flags `cargo fuzz run -O -a -s none` passes, then each binary run for a while.
//!
//! Not cargo-fuzz itself: it is a thin CLI around exactly this build and run, and installing it costs a
//! clean CI run 34–51 s of compiling (`cargo install cargo-fuzz`, measured in docs/benchmarks.md). The
//! flags below are cargo-fuzz 0.13.2's (`src/project.rs`, `Project::cargo`) for `--release
//! --debug-assertions --sanitizer none` on Linux; `libfuzzer-sys` (the maintained runtime) is unchanged, and
//! `cargo fuzz run -O -a -s none <target>` still works by hand (fuzz/README.md).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

/// The targets (fuzz/Cargo.toml's `[[bin]]`s), run by `cargo xtask fuzz` and `cargo xtask test`.
pub const TARGETS: [&str; 5] = [
    "feed_parser",
    "coverage_tile",
    "planning_path",
    "planning_fields",
    "mapillary_replies",
];

/// The triple the fuzz binaries are built for (an explicit `--target`, as cargo-fuzz does, keeps the
/// instrumentation flags away from build scripts and proc macros).
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// cargo-fuzz 0.13.2's RUSTFLAGS for `-O -a -s none` on Linux: SanitizerCoverage (8-bit counters, PC
/// table, compare tracing, stack depth), branch folding off, `cfg(fuzzing)`, debug assertions (and so
/// overflow checks) on in the optimised build, one codegen unit.
const RUSTFLAGS: &str = "-Cpasses=sancov-module \
     -Cllvm-args=-sanitizer-coverage-level=4 \
     -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
     -Cllvm-args=-sanitizer-coverage-pc-table \
     -Cllvm-args=-sanitizer-coverage-trace-compares \
     --cfg fuzzing \
     -Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
     -Cllvm-args=-sanitizer-coverage-stack-depth \
     -Cdebug-assertions \
     -Ccodegen-units=1";

/// Where a target's binary lands.
fn binary(root: &Path, target: &str) -> PathBuf {
    root.join("fuzz/target").join(TRIPLE).join("release").join(target)
}

/// Builds every target in one cargo invocation (`nice` to run beside other work: see
/// [`crate::lowered`]); cargo's output goes to `log`.
pub fn build(root: &Path, log: &Path, niceness: Option<u8>) -> Result<()> {
    let mut cmd = crate::lowered(
        std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()),
        niceness,
    );
    cmd.current_dir(root.join("fuzz"))
        .args(["build", "--release", "--bins", "--target", TRIPLE])
        // Its own target directory whatever CARGO_TARGET_DIR says: [`binary`] looks there.
        .arg("--target-dir")
        .arg(root.join("fuzz/target"))
        .args(["--config", "profile.release.debug=\"line-tables-only\""])
        .env("RUSTFLAGS", RUSTFLAGS)
        // The main workspace's lint wrapper (set for `cargo xtask test`) is not for this workspace.
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CLIPPY_ARGS");
    run_logged(&mut cmd, log, "cargo build (fuzz targets)")
}

/// Runs one built target for `seconds` on its corpus (grown in place) and its committed seeds; a crash
/// leaves its input in `fuzz/artifacts/<target>/` and fails. libFuzzer's output goes to `log`.
pub fn run(root: &Path, target: &str, seconds: u64, log: &Path, niceness: Option<u8>) -> Result<()> {
    let dir = root.join("fuzz");
    let corpus = dir.join("corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    for d in [&corpus, &artifacts] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut cmd = crate::lowered(binary(root, target), niceness);
    cmd.current_dir(&dir)
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(format!("-max_total_time={seconds}"))
        .arg("-rss_limit_mb=2048")
        .arg(&corpus)
        .arg(dir.join("seeds").join(target));
    run_logged(&mut cmd, log, &format!("fuzz {target} for {seconds} s"))?;
    // libFuzzer's last line: "Done N runs in S second(s)".
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if let Some(done) = text.lines().rev().find(|l| l.starts_with("Done ")) {
        eprintln!("xtask: fuzz {target}: {done}");
    }
    Ok(())
}

/// Runs `cmd` with stdout and stderr into `log` ([`crate::run_to_log`]); on failure the error carries the
/// log's last lines.
fn run_logged(cmd: &mut Command, log: &Path, what: &str) -> Result<()> {
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    eprintln!("xtask: {what} (output in {})", log.display());
    crate::run_to_log(cmd, log, what).map_err(|e| {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        e.context(format!("last lines of {}:\n{tail}", log.display()))
    })
}
