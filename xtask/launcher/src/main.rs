//! `cargo xtask …` (the alias in `.cargo/config.toml` runs this binary first).
//!
//! Why a launcher: the real `xtask` links the AWS SDK, the simulator and the three functions; on a fresh
//! clone that build takes minutes, and `cargo run --quiet -p xtask` printed nothing meanwhile. This binary
//! has no dependencies, so it compiles in a second or two, and then:
//!
//! 1. starts installing the pinned Python venvs the command needs (only those: the demo needs `.venv/aws`,
//!    the tests all four) in background threads — they download while cargo compiles;
//! 2. builds, in **one** cargo invocation, the `xtask` binary and every binary the demo, `push`, `stack up`
//!    and `cargo lambda watch` run (the three functions, the simulator). With the workspace hack
//!    (`workspace-hack/`) every later `cargo build/test/run` of those crates finds them fresh;
//! 3. prints a progress line at least every [`TICK`] (units built / total, the last crate finished, each
//!    venv's state, elapsed time) besides cargo's own `Compiling …` lines;
//! 4. then replaces itself with `xtask <args>` (exec), passing how long the venvs and the build took
//!    ([`TIMES_ENV`]) for `cargo xtask test`'s phase table.
//!
//! `cargo xtask setup` is handled here alone (venvs only, nothing compiled).

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest silence on screen while building or installing.
const TICK: Duration = Duration::from_secs(10);
/// Tells the heavy xtask how long the launcher's phases took and its whole run before it
/// (`venvs=12.3,build=45.6,wall=47.0`, seconds).
const TIMES_ENV: &str = "RELAY_XTASK_LAUNCH_TIMES";
/// Every binary the project's commands run: built together so that features and artifacts are shared.
const PACKAGES: [&str; 5] = ["xtask", "zip-and-push", "poller", "status-api", "mapillary-sim"];

/// A venv of `.venv/` (the same list, stamp and lock files as `integration_tests::venv`).
#[derive(Clone, Copy)]
struct Venv {
    name: &'static str,
    main_bin: &'static str,
}

const AWS: Venv = Venv {
    name: "aws",
    main_bin: "moto_server",
};
const MAPILLARY_TOOLS: Venv = Venv {
    name: "mapillary-tools",
    main_bin: "mapillary_tools",
};
const CHECKOV: Venv = Venv {
    name: "checkov",
    main_bin: "checkov",
};
const SCHEMATHESIS: Venv = Venv {
    name: "schemathesis",
    main_bin: "schemathesis",
};
const SAM: Venv = Venv {
    name: "sam",
    main_bin: "sam",
};

/// Which venvs a subcommand needs before it starts (tests needing more install them on first use too).
fn venvs_for(command: &str) -> Vec<Venv> {
    match command {
        "setup" | "test" => vec![AWS, MAPILLARY_TOOLS, CHECKOV, SCHEMATHESIS, SAM],
        "bench" => vec![AWS, MAPILLARY_TOOLS],
        "demo" | "soak" | "stack" | "push" | "upload" => vec![AWS],
        _ => Vec::new(),
    }
}

#[derive(Clone, Debug)]
enum State {
    Waiting,
    Installing(Instant),
    Ready(Option<f64>),
    Failed,
}

struct Shared {
    started: Instant,
    units_total: Option<usize>,
    units_done: usize,
    /// Crates cargo said it is compiling that have not finished yet (from its `Compiling …` lines).
    compiling: Vec<String>,
    build_done: Option<f64>,
    venvs: Vec<(&'static str, State)>,
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask test` lints while it builds: clippy-driver is the compiler of the workspace's own crates
/// (`RUSTC_WORKSPACE_WRAPPER`, `-D warnings` in `CLIPPY_ARGS`, what `cargo clippy` passes). Set here, for
/// this build and for everything xtask starts (its test build, `cargo lambda watch`, the simulator's build):
/// cargo fingerprints the wrapper and `CLIPPY_ARGS`, so one build without them would compile the workspace
/// crates again and the next one with them once more. Set once, every build of the run shares one set of
/// artifacts. xtask's `test` uses the values found here.
fn lint_everything() {
    let beside = std::env::var_os("CARGO")
        .map(|c| Path::new(&c).with_file_name("clippy-driver"))
        .filter(|p| p.is_file());
    let driver = beside.map_or_else(|| "clippy-driver".into(), |p| p.into_os_string());
    // Edition 2021: not `unsafe` yet; called first in main, before any thread starts.
    std::env::set_var("RUSTC_WORKSPACE_WRAPPER", driver);
    std::env::set_var("CLIPPY_ARGS", CLIPPY_ARGS);
}

/// `-D warnings` as `cargo clippy` passes it to clippy-driver.
const CLIPPY_ARGS: &str = "-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__";

/// The variables `cargo run` sets for the program it runs (this launcher), which every cargo started from here
/// would inherit. They must go: cargo compares the variables a build script watches (`rerun-if-env-changed`)
/// against its own environment, and ring's build script watches `CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR` and
/// `CARGO_PKG_VERSION_*`. Inherited, they made ring and everything above it (rustls, the AWS SDK) compile
/// again every time a command switched between `cargo xtask …` and a plain `cargo build/test`.
fn clear_cargo_run_env() {
    let inherited: Vec<_> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| {
            k.starts_with("CARGO_PKG_")
                || matches!(
                    k.as_str(),
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_MANIFEST_LINKS"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_RUSTC_CURRENT_DIR"
                        | "OUT_DIR"
                )
        })
        .collect();
    for k in inherited {
        // Edition 2021: not `unsafe` yet; called first in main, before any thread starts.
        std::env::remove_var(k);
    }
}

fn run() -> Result<ExitCode, String> {
    clear_cargo_run_env();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = args.first().map(String::as_str).unwrap_or("");
    if command == "test" && !args.iter().any(|a| a == "--no-lint") {
        lint_everything();
    }
    let root = repo_root();
    let venvs = if args.iter().any(|a| a == "-h" || a == "--help") {
        Vec::new()
    } else {
        venvs_for(command)
    };
    let shared = Arc::new(Mutex::new(Shared {
        started: Instant::now(),
        units_total: None,
        units_done: 0,
        compiling: Vec::new(),
        build_done: None,
        venvs: venvs.iter().map(|v| (v.name, State::Waiting)).collect(),
    }));

    let installers: Vec<_> = venvs
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let (root, shared, v) = (root.clone(), Arc::clone(&shared), *v);
            std::thread::spawn(move || {
                let result = ensure_venv(&root, v, |s| lock(&shared).venvs[i].1 = s);
                if let Err(e) = &result {
                    lock(&shared).venvs[i].1 = State::Failed;
                    eprintln!("xtask: .venv/{}: {e}", v.name);
                }
                result
            })
        })
        .collect();
    let ticker = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || tick(&shared))
    };

    let build = if command == "setup" {
        Ok(None)
    } else {
        build(&root, &shared)
    };
    let mut failures = Vec::new();
    for (handle, v) in installers.into_iter().zip(&venvs) {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!(".venv/{}: {e}", v.name)),
            Err(_) => failures.push(format!(".venv/{}: the installer panicked", v.name)),
        }
    }
    lock(&shared).build_done.get_or_insert(0.0);
    let _ = ticker.join();
    let xtask = build?;
    if !failures.is_empty() {
        return Err(failures.join("\n"));
    }
    let elapsed = lock(&shared).started.elapsed().as_secs_f64();
    let Some(xtask) = xtask else {
        eprintln!(
            "setup: venvs ready in {} ({elapsed:.0} s)",
            root.join(".venv").display()
        );
        return Ok(ExitCode::SUCCESS);
    };
    let times = {
        let s = lock(&shared);
        let venv_secs: f64 = s
            .venvs
            .iter()
            .filter_map(|(_, st)| match st {
                State::Ready(Some(secs)) => Some(*secs),
                _ => None,
            })
            .fold(0.0, f64::max);
        format!(
            "venvs={venv_secs:.1},build={:.1},wall={:.1}",
            s.build_done.unwrap_or(0.0),
            s.started.elapsed().as_secs_f64()
        )
    };
    // exec: Ctrl-C and the exit code go straight to the real xtask.
    let err = Command::new(&xtask).args(&args).env(TIMES_ENV, times).exec();
    Err(format!("running {}: {err}", xtask.display()))
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Prints one progress line every [`TICK`] until the build is done and no venv is installing.
fn tick(shared: &Mutex<Shared>) {
    let mut last = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let s = lock(shared);
        let installing = s
            .venvs
            .iter()
            .any(|(_, st)| matches!(st, State::Waiting | State::Installing(_)));
        if s.build_done.is_some() && !installing {
            return;
        }
        if last.elapsed() < TICK {
            continue;
        }
        last = Instant::now();
        let mut parts = Vec::new();
        match (s.build_done, s.units_total) {
            (Some(_), _) => parts.push("build done".to_string()),
            (None, total) => {
                let done = match total {
                    Some(total) => format!("{}/{total}", s.units_done.min(total)),
                    None => s.units_done.to_string(),
                };
                let now = match s.compiling.len() {
                    0 => String::new(),
                    n if n <= 3 => format!(", compiling {}", s.compiling.join(", ")),
                    n => format!(", compiling {} and {} more", s.compiling[..3].join(", "), n - 3),
                };
                parts.push(format!("build {done} units done{now}"));
            }
        }
        for (name, st) in &s.venvs {
            parts.push(match st {
                State::Waiting => format!(".venv/{name} checking"),
                State::Installing(t) => format!(".venv/{name} pip install {:.0}s", t.elapsed().as_secs_f64()),
                State::Ready(_) => format!(".venv/{name} ready"),
                State::Failed => format!(".venv/{name} FAILED"),
            });
        }
        eprintln!("xtask: [{}] {}", clock(s.started.elapsed()), parts.join("; "));
    }
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn build_args() -> Vec<String> {
    let mut args = vec!["build".to_string(), "--bins".to_string()];
    for p in PACKAGES {
        args.extend(["-p".to_string(), p.to_string()]);
    }
    args
}

/// The one build; returns the `xtask` executable.
fn build(root: &Path, shared: &Mutex<Shared>) -> Result<Option<PathBuf>, String> {
    // How many units there are (read-only; the flag is unstable, RUSTC_BOOTSTRAP allows it on stable). Only
    // for the "n/total" in the progress line: without it the line shows the count alone.
    let total = cargo()
        .current_dir(root)
        .args(build_args())
        .args(["--unit-graph", "-Z", "unstable-options"])
        .env("RUSTC_BOOTSTRAP", "1")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).matches("\"pkg_id\"").count());
    lock(shared).units_total = total;

    eprintln!(
        "xtask: building {} (one cargo build for every command; progress every {} s)",
        PACKAGES.join(", "),
        TICK.as_secs()
    );
    let mut child = cargo()
        .current_dir(root)
        .args(build_args())
        .arg("--message-format=json-render-diagnostics")
        // Lines, not a progress bar, between our own progress lines.
        .env("CARGO_TERM_PROGRESS_WHEN", "never")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running cargo build: {e}"))?;
    // cargo's stderr (Compiling lines, diagnostics) is passed through as it comes; its Compiling lines also
    // tell the progress line what is in progress.
    let compiling = Arc::new(Mutex::new(Vec::<String>::new()));
    let stderr_thread = child.stderr.take().map(|err| {
        let seen = Arc::clone(&compiling);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let name = line
                    .trim_start()
                    .strip_prefix("Compiling ")
                    .and_then(|rest| rest.split_whitespace().next());
                if let Some(name) = name {
                    seen.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(name.to_string());
                }
            }
        })
    });
    let mut xtask = None;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let artifact = line.contains("\"reason\":\"compiler-artifact\"");
            if !artifact && !line.contains("\"reason\":\"build-script-executed\"") {
                continue;
            }
            let package = json_str(&line, "\"package_id\":\"")
                .and_then(|id| id.split('"').next())
                .map(package_name)
                .unwrap_or_default();
            let in_progress = {
                let mut c = compiling.lock().unwrap_or_else(|p| p.into_inner());
                // A build script's artifact is not the end of its package's compilation.
                if artifact && !line.contains("\"custom-build\"") {
                    c.retain(|n| *n != package);
                }
                c.clone()
            };
            let mut s = lock(shared);
            s.units_done += 1;
            s.compiling = in_progress;
            if artifact {
                if let Some(exe) = json_str(&line, "\"executable\":\"") {
                    let exe = exe.split('"').next().unwrap_or("");
                    if exe.ends_with("/xtask") {
                        xtask = Some(PathBuf::from(exe));
                    }
                }
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for cargo build: {e}"))?;
    if let Some(handle) = stderr_thread {
        let _ = handle.join();
    }
    let secs = lock(shared).started.elapsed().as_secs_f64();
    lock(shared).build_done = Some(secs);
    if !status.success() {
        return Err(format!("cargo build failed ({status})"));
    }
    eprintln!("xtask: [{}] build done", clock(Duration::from_secs_f64(secs)));
    xtask
        .map(Some)
        .ok_or_else(|| "cargo build reported no xtask executable".to_string())
}

/// A package name from a cargo package id: `registry+…#name@1.2.3` or `path+file:///…/name#0.1.0`.
fn package_name(id: &str) -> String {
    let (source, rest) = id.split_once('#').unwrap_or((id, ""));
    match rest.split_once('@') {
        Some((name, _)) => name.to_string(),
        None => source.rsplit('/').next().unwrap_or("").to_string(),
    }
}

/// The text after `key` in `line` (cargo's JSON messages are one object per line; a full JSON parser
/// would be this crate's only dependency, for two string fields).
fn json_str<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.find(key).map(|i| &line[i + key.len()..])
}

fn repo_root() -> PathBuf {
    // xtask/launcher → the repository root.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    dir.ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.to_path_buf())
}

/// `program` at the lowest CPU priority (`nice -n 19`, where coreutils' `nice` is installed). The venvs
/// install while the build runs, and the build's first minutes are one chain (proc-macro2 → syn →
/// serde_derive → …) that everything else waits for: five pip installs at equal priority slowed `syn`
/// alone from ~10 s to 60–90 s in CI. At nice 19 pip takes what the build leaves; the venvs are still
/// ready long before the tests need them.
fn low_priority(program: impl AsRef<std::ffi::OsStr>) -> Command {
    match ["/usr/bin/nice", "/bin/nice"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
    {
        Some(nice) => {
            let mut cmd = Command::new(nice);
            cmd.args(["-n", "19"]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Creates or refreshes `.venv/<name>` from `requirements/<name>.txt` (the same stamp file and per-venv
/// `flock` as `integration_tests::venv`, so either side may install and the other waits). pip's output goes to
/// `.venv/<name>.log` (shown if it fails); the progress line says what is installing.
fn ensure_venv(root: &Path, v: Venv, set: impl Fn(State)) -> Result<(), String> {
    let dir = root.join(".venv").join(v.name);
    let req = root.join("requirements").join(format!("{}.txt", v.name));
    let fresh = || -> Result<bool, String> {
        let wanted = fs::read_to_string(&req).map_err(|e| format!("reading {}: {e}", req.display()))?;
        let stamp = fs::read_to_string(dir.join(".relay-requirements")).unwrap_or_default();
        Ok(stamp == wanted && dir.join("bin").join(v.main_bin).exists())
    };
    if fresh()? {
        set(State::Ready(None));
        return Ok(());
    }
    let venv_root = root.join(".venv");
    fs::create_dir_all(&venv_root).map_err(|e| format!("creating {}: {e}", venv_root.display()))?;
    let lock_path = venv_root.join(format!("{}.lock", v.name));
    let lock_file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("opening {}: {e}", lock_path.display()))?;
    lock_file
        .lock()
        .map_err(|e| format!("locking {}: {e}", lock_path.display()))?;
    if fresh()? {
        set(State::Ready(None));
        return Ok(());
    }
    let started = Instant::now();
    set(State::Installing(started));
    eprintln!(
        "xtask: installing requirements/{}.txt into .venv/{} (log .venv/{}.log)",
        v.name, v.name, v.name
    );
    let log_path = venv_root.join(format!("{}.log", v.name));
    let log = File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
    let quiet = |cmd: &mut Command| -> Result<(), String> {
        let out = log.try_clone().map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let status = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| format!("running {cmd:?}: {e}"))?;
        if status.success() {
            return Ok(());
        }
        let mut text = String::new();
        let _ = File::open(&log_path).and_then(|mut f| f.read_to_string(&mut text));
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(format!(
            "{cmd:?} failed ({status}); last lines of {}:\n{}",
            log_path.display(),
            tail.join("\n")
        ))
    };
    if !dir.join("bin/python").exists() {
        let python = std::env::var_os("RELAY_PYTHON").unwrap_or_else(|| "python3".into());
        quiet(low_priority(python).arg("-m").arg("venv").arg(&dir))?;
    }
    quiet(
        low_priority(dir.join("bin/pip"))
            .args([
                "install",
                // No .pyc for every installed file: that is a third of pip's CPU time while the build needs
                // both cores; Python writes the ones it imports on first use.
                "--no-compile",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                "-r",
            ])
            .arg(&req),
    )?;
    let wanted = fs::read_to_string(&req).map_err(|e| format!("reading {}: {e}", req.display()))?;
    fs::write(dir.join(".relay-requirements"), wanted).map_err(|e| format!("writing the stamp: {e}"))?;
    let secs = started.elapsed().as_secs_f64();
    set(State::Ready(Some(secs)));
    eprintln!("xtask: .venv/{} ready ({secs:.0} s)", v.name);
    Ok(())
}
