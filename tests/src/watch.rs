//! The three functions as real Lambda binaries under `cargo lambda watch` (the emulated Lambda
//! control plane), for the demo and the end-to-end tests.
//!
//! Watch is started in its own process group, with the function environment in an env file, on a
//! free loopback port, after the function binaries were pre-built (so the first invoke does not
//! compile; trap 9 in docs/local-stack.md). Dropping [`LambdaWatch`] stops the whole group.

use std::fs::File;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::moto::free_port;
use crate::process::stop_group;
use crate::venv::Venvs;

/// The Lambda function binaries of the workspace.
pub const FUNCTIONS: [&str; 3] = ["zip-and-push", "poller", "status-api"];

/// A running `cargo lambda watch`.
#[derive(Debug)]
pub struct LambdaWatch {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl LambdaWatch {
    /// Pre-builds the functions, then starts watch on 127.0.0.1 with `env` (written to `<dir>/lambda.env`)
    /// and its output in `<dir>/watch.log`; returns once it accepts connections.
    pub fn start(root: &Path, venvs: &Venvs, env: &[(String, String)], dir: &Path) -> Result<Self> {
        Self::start_on(root, venvs, env, dir, free_port()?)
    }

    /// Like [`LambdaWatch::start`], on a port the caller picked (e.g. with [`crate::moto::free_port`]) — for an
    /// environment that must name watch's own URLs, such as status-api's `RELAY_OAUTH_REDIRECT_URI`
    /// (see [`LambdaWatch::function_url_on`]).
    pub fn start_on(
        root: &Path,
        venvs: &Venvs,
        env: &[(String, String)],
        dir: &Path,
        port: u16,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Watch starts each function with `cargo run --manifest-path Cargo.toml --bin <f>`; building each
        // binary the same way (one package at a time, so the same feature set) means that run finds
        // nothing to compile. A `-p a -p b -p c` build unifies features across the three and would not.
        for f in FUNCTIONS {
            let status = crate::process::nested_cargo()
                .current_dir(root)
                .args(["build", "--quiet", "--manifest-path", "Cargo.toml", "--bin", f])
                .status()
                .with_context(|| format!("building {f}"))?;
            if !status.success() {
                bail!("building {f} failed ({status})");
            }
        }

        let env_file = dir.join("lambda.env");
        let mut f = File::create(&env_file).with_context(|| format!("writing {}", env_file.display()))?;
        for (k, v) in env {
            if v.contains('\n') {
                bail!("environment value of {k} has a newline");
            }
            writeln!(f, "{k}={v}")?;
        }
        let log = dir.join("watch.log");
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = crate::process::nested_cargo()
            .current_dir(root)
            .env("PATH", venvs.path_with_aws_bin())
            .args([
                "lambda",
                "watch",
                "--ignore-changes",
                "--quiet",
                "--invoke-address",
                "127.0.0.1",
            ])
            .arg("--invoke-port")
            .arg(port.to_string())
            .arg("--env-file")
            .arg(&env_file)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .context("starting `cargo lambda watch` (is .venv/aws installed? run `cargo xtask setup`)")?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if let Some(status) = child.try_wait()? {
                bail!("cargo lambda watch exited ({status}); see {}", log.display());
            }
            if Instant::now() > deadline {
                let _ = stop_group(child.id(), Duration::from_secs(2));
                bail!(
                    "cargo lambda watch did not listen within 120 s; see {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(Self { child, port, log })
    }

    /// Base URL of the emulated Lambda API.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The Invoke API URL of `function`.
    pub fn invoke_url(&self, function: &str) -> String {
        format!("{}/2015-03-31/functions/{function}/invocations", self.base_url())
    }

    /// The function-URL base of `function` (payload v2; no authorizer context). Watch strips this
    /// prefix: the function sees the rest of the path (`…/lambda-url/status-api/v1/sequences` →
    /// `/v1/sequences`).
    pub fn function_url(&self, function: &str) -> String {
        Self::function_url_on(self.port, function)
    }

    /// The function-URL base of `function` for a watch on 127.0.0.1:`port`.
    pub fn function_url_on(port: u16, function: &str) -> String {
        format!("http://127.0.0.1:{port}/lambda-url/{function}")
    }

    /// The port watch listens on (127.0.0.1); `cargo lambda invoke --invoke-port` takes it.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Watch's own log (build output, function logs).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Invoke `function` with `payload` and return its JSON result.
    pub async fn invoke(
        &self,
        http: &reqwest::Client,
        function: &str,
        payload: &serde_json::Value,
    ) -> Result<serde_json::Value> {
        let reply = http
            .post(self.invoke_url(function))
            .json(payload)
            .send()
            .await
            .with_context(|| format!("invoking {function}"))?;
        let status = reply.status();
        let body = reply.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("invoking {function}: HTTP {status}: {body}");
        }
        if body.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&body).with_context(|| format!("{function} answered non-JSON: {body}"))
    }
}

impl Drop for LambdaWatch {
    fn drop(&mut self) {
        stop_group(self.child.id(), Duration::from_secs(3));
        let _ = self.child.wait();
    }
}
