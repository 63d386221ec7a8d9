//! One Lambda execution environment of a function: its plain binary (as `cargo lambda build` would
//! package it as `bootstrap`) started behind its own [`RuntimeApi`], invoked one event at a time,
//! and killable at any point of an invocation — SIGKILL, as when Lambda ends an environment — after
//! which a fresh process is started (a cold start), as Lambda does for the next invocation.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;

use crate::runtime_api::{Observed, RuntimeApi};

/// Slack beyond an invocation's timeout (the deadline the function is given) before it counts as
/// hung and is killed.
const HUNG_SLACK: Duration = Duration::from_secs(10);

/// How one invocation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The function posted this response.
    Response(Value),
    /// The function posted an invocation error (its error document).
    Error(String),
    /// Killed by the caller (`kill_after`) before it answered.
    Killed,
    /// The process exited (or crashed, or posted an init error) before answering.
    Exited(String),
    /// No answer by its deadline plus [`HUNG_SLACK`]: killed.
    TimedOut,
}

/// A function process behind a Runtime API; restarted after it is killed or exits.
pub struct FunctionProcess {
    binary: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    api: RuntimeApi,
    child: tokio::process::Child,
    /// Processes started (1 + restarts).
    pub starts: u32,
}

impl FunctionProcess {
    /// Starts `binary` with exactly `env` (plus `AWS_LAMBDA_RUNTIME_API`), stdout and stderr appended
    /// to `log`, invoked as `function_arn`.
    pub async fn start(
        binary: &Path,
        function_arn: &str,
        env: Vec<(String, String)>,
        log: &Path,
    ) -> Result<Self> {
        let api = RuntimeApi::start(function_arn).await?;
        let child = spawn(binary, &env, &api, log)?;
        Ok(Self {
            binary: binary.to_path_buf(),
            env,
            log: log.to_path_buf(),
            api,
            child,
            starts: 1,
        })
    }

    async fn restart(&mut self) -> Result<()> {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        self.child = spawn(&self.binary, &self.env, &self.api, &self.log)?;
        self.starts += 1;
        Ok(())
    }

    /// Invokes the function with `payload` and a deadline `timeout` from now; with `kill_after`, the
    /// process is SIGKILLed that long after the event was queued unless it answered first.
    pub async fn invoke(
        &mut self,
        payload: &Value,
        timeout: Duration,
        kill_after: Option<Duration>,
    ) -> Result<Outcome> {
        let id = self.api.invoke(Bytes::from(payload.to_string()), timeout).await?;
        let now = Instant::now();
        let hung_at = now + timeout + HUNG_SLACK;
        let kill_at = kill_after.map(|d| now + d);
        loop {
            let (api, child) = (&mut self.api, &mut self.child);
            // What happened, decided first; the restart (which needs `self`) after the select.
            let (outcome, restart) = tokio::select! {
                biased;
                observed = api.observe() => match observed {
                    None => bail!("the Runtime API server stopped"),
                    Some(Observed::Response { request_id, body, .. }) if request_id == id => {
                        (Outcome::Response(serde_json::from_slice(&body).unwrap_or(Value::Null)), false)
                    }
                    Some(Observed::Error { request_id, body, .. }) if request_id == id => {
                        (Outcome::Error(String::from_utf8_lossy(&body).into_owned()), false)
                    }
                    Some(Observed::InitError { body, .. }) => (
                        Outcome::Exited(format!("init error: {}", String::from_utf8_lossy(&body))),
                        true,
                    ),
                    Some(_) => continue,
                },
                status = child.wait() => {
                    let why = match status {
                        Ok(s) => format!("the process exited ({s})"),
                        Err(e) => format!("waiting for the process: {e}"),
                    };
                    (Outcome::Exited(why), true)
                }
                _ = tokio::time::sleep_until(kill_at.unwrap_or(hung_at)), if kill_at.is_some() => {
                    (Outcome::Killed, true)
                }
                _ = tokio::time::sleep_until(hung_at) => (Outcome::TimedOut, true),
            };
            if restart {
                self.restart().await?;
            }
            return Ok(outcome);
        }
    }
}

impl Drop for FunctionProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Starts `binary` as Lambda starts `bootstrap`: a clean environment, `AWS_LAMBDA_RUNTIME_API` set.
/// SIGKILL is what `start_kill` sends.
fn spawn(
    binary: &Path,
    env: &[(String, String)],
    api: &RuntimeApi,
    log: &Path,
) -> Result<tokio::process::Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    tokio::process::Command::new(binary)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("AWS_LAMBDA_RUNTIME_API", api.address())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}
