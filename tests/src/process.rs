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
