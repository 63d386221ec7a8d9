//! Process-group helpers for the daemons `cargo xtask stack up` leaves running.

use std::time::{Duration, Instant};

/// Whether a process with this pid exists (and is not a zombie we could see as alive: `kill(pid, 0)`).
pub fn is_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence and permission.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// Sends SIGTERM to the process group `pgid`, waits up to `grace` for its leader to go, then SIGKILLs
/// the group. Returns whether the leader is gone.
pub fn stop_group(pgid: u32, grace: Duration) -> bool {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return false;
    };
    if pgid <= 1 {
        return false;
    }
    // SAFETY: plain kill(2) on a negative pid (= a process group) we started.
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !is_alive(pgid as u32) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(100));
    !is_alive(pgid as u32)
}

/// A `cargo` command for a nested build (`cargo build`, `cargo lambda watch/invoke`) started from a test or
/// the xtask: the variables cargo sets for the program it runs (`CARGO_PKG_*`, `CARGO_MANIFEST_*`, …) are
/// removed. Inherited, they differ from a top-level build's environment, and ring's build script watches
/// `CARGO_PKG_NAME`/`CARGO_MANIFEST_DIR`: ring, rustls and the AWS SDK would compile again for the nested
/// build and once more for the next top-level one.
pub fn nested_cargo() -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        if k.starts_with("CARGO_PKG_")
            || matches!(
                k,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
            )
        {
            cmd.env_remove(k);
        }
    }
    cmd
}
