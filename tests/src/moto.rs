//! Running `moto_server` (from `.venv/aws`) on a free loopback port.
//!
//! Two modes: [`MotoServer::start`] owns the child and kills it on drop (tests, short-lived tools), and
//! [`start_detached`] leaves a daemon in its own process group for `cargo xtask stack up`.
//! [`shared_moto`] gives each test binary one lazily started server (or reuses `RELAY_TEST_MOTO_URL`).

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::venv::{self, Venvs};

/// Environment variable naming an already running moto endpoint for the tests (set by `cargo xtask test`).
pub const MOTO_URL_ENV: &str = "RELAY_TEST_MOTO_URL";

/// How long moto may take to start listening (it imports a lot of Python on first start).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// A free TCP port on 127.0.0.1 (bound, then released; the caller binds it right after).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding an ephemeral port")?;
    Ok(listener.local_addr()?.port())
}

/// A moto server child process owned by this value; killed and reaped on drop.
#[derive(Debug)]
pub struct MotoServer {
    child: Child,
    port: u16,
    endpoint: String,
}

impl MotoServer {
    /// Starts `moto_server -H 127.0.0.1 -p <free port>` and waits until it accepts connections.
    /// Its output is discarded.
    pub fn start(venvs: &Venvs) -> Result<Self> {
        Self::start_with(venvs, false)
    }

    /// Like [`MotoServer::start`], but the child gets `PR_SET_PDEATHSIG(SIGKILL)`: the kernel kills it
    /// when the *thread* that spawned it exits. Call it from a thread that lives as long as the process
    /// (see [`shared_moto`]), so moto dies with the test binary even though statics are never dropped.
    pub fn start_dying_with_parent(venvs: &Venvs) -> Result<Self> {
        Self::start_with(venvs, true)
    }

    fn start_with(venvs: &Venvs, die_with_parent: bool) -> Result<Self> {
        retry_on_port_race(|port| {
            let mut cmd = moto_command(venvs, port);
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if die_with_parent {
                // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
                unsafe {
                    cmd.pre_exec(|| {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            let mut child = cmd
                .spawn()
                .with_context(|| format!("starting {}", venvs.moto_server().display()))?;
            match wait_listening(port, || child.try_wait().ok().flatten().map(|s| s.to_string())) {
                Ok(()) => Ok(Self {
                    child,
                    port,
                    endpoint: endpoint_for(port),
                }),
                Err(err) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    Err(err)
                }
            }
        })
    }

    /// `http://127.0.0.1:<port>`
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The port moto listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A moto server left running in its own process group (for `cargo xtask stack up`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachedMoto {
    /// Process id; also the process group id.
    pub pid: u32,
    /// Listening port.
    pub port: u16,
    /// `http://127.0.0.1:<port>`
    pub endpoint: String,
}

/// Starts moto as a daemon: own process group (so `kill(-pid)` stops it), stdout+stderr appended to
/// `log_path`, its pid written to `pid_file`. Returns once it accepts connections.
pub fn start_detached(venvs: &Venvs, log_path: &Path, pid_file: &Path) -> Result<DetachedMoto> {
    retry_on_port_race(|port| {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut child = moto_command(venvs, port)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", venvs.moto_server().display()))?;
        let pid = child.id();
        if let Err(err) = wait_listening(port, || child.try_wait().ok().flatten().map(|s| s.to_string())) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err.context(format!("see {}", log_path.display())));
        }
        std::fs::write(pid_file, format!("{pid}\n"))
            .with_context(|| format!("writing {}", pid_file.display()))?;
        // Dropping `child` neither kills nor waits: the daemon outlives us and is reparented to init.
        Ok(DetachedMoto {
            pid,
            port,
            endpoint: endpoint_for(port),
        })
    })
}

/// The moto endpoint shared by every test in this test binary.
///
/// Uses `$RELAY_TEST_MOTO_URL` if set; otherwise ensures the venvs and starts one moto, lazily, from a
/// dedicated thread that never exits (so `PR_SET_PDEATHSIG` fires only when the test process dies).
/// Tests isolate themselves by stack name, never by resetting moto (trap 6).
pub fn shared_moto() -> Result<String> {
    static SHARED: OnceLock<Result<String, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            if let Ok(url) = std::env::var(MOTO_URL_ENV) {
                if !url.is_empty() {
                    return Ok(url.trim_end_matches('/').to_string());
                }
            }
            start_shared().map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(|e| anyhow!("starting the shared moto server: {e}"))
}

fn start_shared() -> Result<String> {
    let venvs = venv::ensure(&crate::repo_root())?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("moto-owner".into())
        .spawn(move || {
            match MotoServer::start_dying_with_parent(&venvs) {
                Ok(server) => {
                    let _ = tx.send(Ok(server.endpoint().to_string()));
                    // Keep the owner thread (the child's "parent" for PDEATHSIG) and the handle alive.
                    let _server = server;
                    loop {
                        std::thread::park();
                    }
                }
                Err(err) => {
                    let _ = tx.send(Err(err));
                }
            }
        })
        .context("spawning the moto owner thread")?;
    rx.recv().context("the moto owner thread died")?
}

fn moto_command(venvs: &Venvs, port: u16) -> Command {
    let mut cmd = Command::new(venvs.moto_server());
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    cmd
}

fn endpoint_for(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// Picks a free port and calls `start`; on failure (typically another process grabbed the port between
/// our probe and moto's bind) tries again with a new port.
fn retry_on_port_race<T>(mut start: impl FnMut(u16) -> Result<T>) -> Result<T> {
    let mut last = None;
    for _ in 0..3 {
        match start(free_port()?) {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("moto did not start")))
}

/// Polls until something accepts TCP connections on 127.0.0.1:`port`; `exited` reports an early exit.
fn wait_listening(port: u16, mut exited: impl FnMut() -> Option<String>) -> Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Some(status) = exited() {
            bail!("moto_server exited during startup ({status})");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("moto_server did not listen on {addr} within {STARTUP_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
