//! The functions' release binaries: building one the way the benchmarks run it, and measuring a
//! running process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::Value;

/// `cargo build --release -p <name> --bin <name>` (a function crate and its binary share the name);
/// the executable's path, as cargo reports it.
pub fn release_binary(root: &Path, name: &str) -> Result<PathBuf> {
    eprintln!("bench: building the release {name} binary");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            name,
            "--bin",
            name,
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running cargo build --release -p {name}"))?;
    ensure!(
        output.status.success(),
        "cargo build --release failed ({})",
        output.status
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| anyhow!("cargo did not report the {name} executable"))
}

/// Peak RSS (`VmHWM`, KiB) of a live process, from `/proc/<pid>/status`.
///
/// Not `ru_maxrss` from `wait4`: Linux folds the parent's high-water mark at `exec` time into the
/// child's (the pre-exec address space is the parent's), so a child of a big parent looks big.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
