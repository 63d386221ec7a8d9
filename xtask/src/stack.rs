//! `cargo xtask stack up | down | status`: moto + the Mapillary simulator as daemons on free loopback
//! ports, and the `relay-local` stack created from `infra/template.yaml` by the same code the
//! integration tests use ([`integration_tests::stack::LocalStack::create`]).
//!
//! State lives in `.stack/`: `state.json`, `moto.log`, `sim.log` (stderr), `sim.out` (stdout; its first
//! line is the simulator's base URL), and `*.pid`. `up` prints `export NAME='value'` lines on stdout and
//! everything else on stderr, so `eval "$(cargo xtask stack up)"` configures the shell.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use aws_config::SdkConfig;
use integration_tests::moto;
use integration_tests::process::{is_alive, stop_group};
use integration_tests::stack::{sdk_config, LocalStack, SimEndpoints};
use serde::{Deserialize, Serialize};
use shared::config::{ClientSecretSource, MapillaryConfig};

use crate::venv;

/// Stack name of the local stack.
pub const LOCAL_STACK_NAME: &str = "relay-local";

/// What `up` starts.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// CloudFormation stack name (default `relay-local`).
    pub stack_name: String,
    /// Extra simulator arguments after `--listen 127.0.0.1:0` (e.g. real-time stage durations for the demo).
    pub sim_args: Vec<String>,
    /// `MAPILLARY_CLIENT_ID` given to the functions (the simulator's seeded app).
    pub client_id: String,
    /// `MAPILLARY_CLIENT_SECRET` given to the functions (the simulator's seeded app).
    pub client_secret: String,
    /// `MAPILLARY_FEED_TOKEN` given to the poller (default: the simulator's web-app client token, the only
    /// token the activity feed takes in every world but `lenient`; see docs/worlds.md).
    pub feed_token: Option<String>,
    /// Print the `export` lines on stdout (default true; the demo turns it off).
    pub print_exports: bool,
}

impl UpOptions {
    /// Defaults for the seeded simulator app `client_id` / `client_secret`.
    pub fn new(client_id: impl Into<String>, client_secret: impl Into<String>) -> Self {
        Self {
            stack_name: LOCAL_STACK_NAME.to_string(),
            sim_args: Vec::new(),
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            feed_token: Some(mapillary_sim::defaults::WEB_APP_CLIENT_TOKEN.to_string()),
            print_exports: true,
        }
    }
}

/// A daemon `up` started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Daemon {
    /// Process id (also its process group id).
    pub pid: u32,
    /// Base URL it serves.
    pub url: String,
    /// Its log file.
    pub log: PathBuf,
}

/// Contents of `.stack/state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StackState {
    /// CloudFormation stack name.
    pub stack_name: String,
    /// moto_server.
    pub moto: Daemon,
    /// The Mapillary simulator.
    pub sim: Daemon,
    /// Every stack output (bucket, queue URLs, DLQ URLs, tables, key id/ARN, …).
    pub outputs: BTreeMap<String, String>,
    /// The `export` lines, in order.
    pub exports: Vec<(String, String)>,
}

impl StackState {
    /// Whether both daemons are still running.
    pub fn is_running(&self) -> bool {
        is_alive(self.moto.pid) && is_alive(self.sim.pid)
    }
}

/// `.stack/` under the repository root.
pub fn stack_dir(repo_root: &Path) -> PathBuf {
    repo_root.join(".stack")
}

fn state_path(repo_root: &Path) -> PathBuf {
    stack_dir(repo_root).join("state.json")
}

/// Reads `.stack/state.json`, if any.
pub fn read_state(repo_root: &Path) -> Result<Option<StackState>> {
    let path = state_path(repo_root);
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Starts moto and the simulator, creates the stack, writes `.stack/state.json` and prints the
/// `export` lines on stdout. If a previous `up` is still running, only prints its exports.
pub async fn up(repo_root: &Path, opts: &UpOptions) -> Result<StackState> {
    if let Some(state) = read_state(repo_root)? {
        if state.is_running() && state.stack_name == opts.stack_name {
            eprintln!(
                "stack: {} is already up (moto pid {}, simulator pid {})",
                state.stack_name, state.moto.pid, state.sim.pid
            );
            if opts.print_exports {
                print_exports(&state);
            }
            return Ok(state);
        }
        eprintln!("stack: stale state in .stack/, cleaning up first");
    }
    // Also stops anything a crashed `up` left behind (pid files).
    down_quietly(repo_root);

    let dir = stack_dir(repo_root);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let venvs = venv::ensure(repo_root)?;

    let mut started = Started::default();
    let result = async {
        eprintln!("stack: starting moto_server");
        let moto_log = dir.join("moto.log");
        let moto = moto::start_detached(&venvs, &moto_log, &dir.join("moto.pid"))?;
        started.pids.push(moto.pid);
        eprintln!("stack: moto at {}", moto.endpoint);

        let sim_bin = build_simulator(repo_root)?;
        let (sim_pid, sim_url) = start_simulator(&sim_bin, &dir, &opts.sim_args)?;
        started.pids.push(sim_pid);
        eprintln!("stack: simulator at {sim_url}");

        eprintln!(
            "stack: creating stack {} from infra/template.yaml",
            opts.stack_name
        );
        let stack = LocalStack::create(&moto.endpoint, &opts.stack_name).await?;
        let mut sim = SimEndpoints::from_base(&sim_url, &opts.client_id, &opts.client_secret);
        sim.feed_token = opts.feed_token.clone();
        let state = StackState {
            stack_name: opts.stack_name.clone(),
            moto: Daemon {
                pid: moto.pid,
                url: moto.endpoint.clone(),
                log: moto_log,
            },
            sim: Daemon {
                pid: sim_pid,
                url: sim_url.clone(),
                log: dir.join("sim.log"),
            },
            exports: exports(&stack, &sim, &sim_url),
            outputs: stack.outputs.clone(),
        };
        let path = state_path(repo_root);
        fs::write(&path, serde_json::to_vec_pretty(&state)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok::<_, anyhow::Error>(state)
    }
    .await;

    match result {
        Ok(state) => {
            if opts.print_exports {
                print_exports(&state);
            }
            eprintln!("stack: up. Stop it with `cargo xtask stack down`.");
            Ok(state)
        }
        Err(err) => {
            for pid in started.pids {
                stop_group(pid, Duration::from_secs(3));
            }
            Err(err.context("stack up failed (logs in .stack/)"))
        }
    }
}

#[derive(Default)]
struct Started {
    pids: Vec<u32>,
}

/// Stops what `.stack/state.json` (or the pid files of an interrupted `up`) names and removes the state.
pub fn down(repo_root: &Path) -> Result<()> {
    let state = read_state(repo_root).ok().flatten();
    let stopped = down_quietly(repo_root);
    match (state, stopped) {
        (None, 0) => eprintln!("stack: nothing was running"),
        (_, n) => eprintln!("stack: stopped {n} process group(s), removed .stack/state.json"),
    }
    Ok(())
}

/// Prints the state of the local stack on stderr (and the exports on stdout when it is up).
/// Returns whether it is up.
pub fn status(repo_root: &Path) -> Result<bool> {
    let Some(state) = read_state(repo_root)? else {
        eprintln!("stack: down");
        return Ok(false);
    };
    let alive = |pid| if is_alive(pid) { "running" } else { "NOT RUNNING" };
    eprintln!("stack: {}", state.stack_name);
    eprintln!(
        "  moto       {} (pid {}, {})",
        state.moto.url,
        state.moto.pid,
        alive(state.moto.pid)
    );
    eprintln!(
        "  simulator  {} (pid {}, {})",
        state.sim.url,
        state.sim.pid,
        alive(state.sim.pid)
    );
    for (key, value) in &state.outputs {
        eprintln!("  {key:<24} {value}");
    }
    let up = state.is_running();
    if up {
        print_exports(&state);
    }
    Ok(up)
}

/// Prints `export NAME='value'` lines on stdout.
pub fn print_exports(state: &StackState) {
    for (name, value) in &state.exports {
        println!("export {name}={}", shell_quote(value));
    }
}

fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// Stops every process group named by the state file or a pid file; removes them. Returns how many
/// groups were running.
fn down_quietly(repo_root: &Path) -> usize {
    let dir = stack_dir(repo_root);
    let mut pids = Vec::new();
    if let Ok(Some(state)) = read_state(repo_root) {
        pids.extend([state.moto.pid, state.sim.pid]);
    }
    for file in ["moto.pid", "sim.pid"] {
        if let Ok(text) = fs::read_to_string(dir.join(file)) {
            pids.extend(text.trim().parse::<u32>().ok());
        }
    }
    pids.sort_unstable();
    pids.dedup();
    let mut stopped = 0;
    for pid in pids {
        if is_alive(pid) {
            stop_group(pid, Duration::from_secs(5));
            stopped += 1;
        }
    }
    for file in ["state.json", "moto.pid", "sim.pid"] {
        let _ = fs::remove_file(dir.join(file));
    }
    stopped
}

fn exports(stack: &LocalStack, sim: &SimEndpoints, sim_url: &str) -> Vec<(String, String)> {
    let mut exports = stack.lambda_env(sim);
    let extra = [
        ("RELAY_STACK_NAME", stack.stack_name.as_str()),
        ("RELAY_INGEST_DLQ_URL", &stack.ingest_dlq_url),
        ("RELAY_CLUSTERS_DLQ_URL", &stack.clusters_dlq_url),
        ("RELAY_TOKEN_KEY_ARN", &stack.token_key_arn),
        ("MAPILLARY_SIM_URL", sim_url),
        // Integration tests run in this shell reuse this moto instead of starting their own.
        (moto::MOTO_URL_ENV, &stack.endpoint),
    ];
    exports.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v.to_string())));
    exports
}

/// `cargo build -p mapillary-sim`; returns the binary's path (from cargo's JSON messages, so any
/// `CARGO_TARGET_DIR` works).
fn build_simulator(repo_root: &Path) -> Result<PathBuf> {
    eprintln!("stack: building mapillary-sim");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(repo_root)
        .args([
            "build",
            "-p",
            "mapillary-sim",
            "--bin",
            "mapillary-sim",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build -p mapillary-sim")?;
    if !output.status.success() {
        bail!("cargo build -p mapillary-sim failed ({})", output.status);
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "mapillary-sim")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| anyhow!("cargo did not report the mapillary-sim executable"))
}

/// Starts the simulator as a daemon (own process group) and reads its base URL from the first line
/// of its stdout (`.stack/sim.out`).
fn start_simulator(bin: &Path, dir: &Path, extra_args: &[String]) -> Result<(u32, String)> {
    let out_path = dir.join("sim.out");
    let log_path = dir.join("sim.log");
    let stdout = File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let stderr = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    fs::write(dir.join("sim.pid"), format!("{pid}\n"))?;

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "mapillary-sim exited during startup ({status}); see {}",
                log_path.display()
            );
        }
        let first_line = File::open(&out_path)
            .ok()
            .and_then(|f| BufReader::new(f).lines().next())
            .and_then(|l| l.ok())
            .filter(|l| l.starts_with("http://"));
        if let Some(url) = first_line {
            // Dropping `child` leaves the daemon running (reparented to init when we exit).
            return Ok((pid, url.trim().trim_end_matches('/').to_string()));
        }
        if Instant::now() > deadline {
            stop_group(pid, Duration::from_secs(2));
            bail!(
                "mapillary-sim printed no base URL within 30 s; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The variable `k` of the stack's exports, or an error naming it.
pub fn exported(env: &BTreeMap<String, String>, k: &str) -> Result<String> {
    env.get(k)
        .cloned()
        .ok_or_else(|| anyhow!("the stack exports no {k}"))
}

/// The SDK config for the local stack's `AWS_ENDPOINT_URL` (from `stack up`'s exports), after
/// checking that the function's Mapillary client secret is given in plain, as the stack exports it.
pub async fn local_sdk(env: &BTreeMap<String, String>, mapillary: &MapillaryConfig) -> Result<SdkConfig> {
    let endpoint = env
        .get("AWS_ENDPOINT_URL")
        .ok_or_else(|| anyhow!("the stack exports no AWS_ENDPOINT_URL"))?;
    if !matches!(mapillary.client_secret, ClientSecretSource::Plain(_)) {
        bail!("the local stack must export MAPILLARY_CLIENT_SECRET");
    }
    Ok(sdk_config(endpoint).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_are_shell_safe() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("MLY|1|x$y"), "'MLY|1|x$y'");
    }
}
