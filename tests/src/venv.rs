//! The project's Python virtualenvs: `.venv/aws` (moto, cargo-lambda, cfn-lint, aws-sam-translator),
//! `.venv/mapillary-tools` (Mapillary's own client; its pins conflict with aws-sam-translator) and
//! `.venv/checkov` (checkov pins an older boto3 than moto's) and `.venv/schemathesis` (property-based API
//! tests of the status API's OpenAPI document; its own hypothesis/jsonschema pins). `.venv/sam` (the AWS
//! SAM CLI, for `sam validate --lint`) is made on request by [`ensure_sam`].
//!
//! Each is installed when first needed, not all up front (a newcomer's `cargo xtask demo` needs only
//! `.venv/aws`): [`ensure`] makes `.venv/aws` ready, and [`Venvs::mapillary_tools`], [`Venvs::checkov`] and
//! [`Venvs::schemathesis`] install their own venv on first use. An install is `python3 -m venv` + pip from the
//! pinned `requirements/<name>.txt`, when the venv is missing or the requirements changed since the last
//! install (a stamp file records them). When a venv is current this only reads two small files.
//! `cargo xtask` (xtask/launcher) installs the same venvs, with the same stamps and per-venv lock files,
//! in parallel with its build.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Name of the stamp file written inside each venv after a successful install.
const STAMP: &str = ".relay-requirements";

/// Paths of the virtualenvs and the tools inside them.
#[derive(Debug, Clone)]
pub struct Venvs {
    /// `.venv/aws`
    pub aws: PathBuf,
    /// `.venv/mapillary-tools`
    pub mapillary_tools: PathBuf,
    /// `.venv/checkov`
    pub checkov: PathBuf,
    /// `.venv/schemathesis`
    pub schemathesis: PathBuf,
}

impl Venvs {
    /// `.venv/aws/bin`: put it first on `PATH` so `cargo lambda` finds `cargo-lambda`.
    pub fn aws_bin(&self) -> PathBuf {
        self.aws.join("bin")
    }
    /// The `moto_server` executable.
    pub fn moto_server(&self) -> PathBuf {
        self.aws.join("bin/moto_server")
    }
    /// The `cargo-lambda` executable.
    pub fn cargo_lambda(&self) -> PathBuf {
        self.aws.join("bin/cargo-lambda")
    }
    /// The `cfn-lint` executable.
    pub fn cfn_lint(&self) -> PathBuf {
        self.aws.join("bin/cfn-lint")
    }
    /// The Python interpreter of `.venv/aws` (has aws-sam-translator and boto3).
    pub fn python(&self) -> PathBuf {
        self.aws.join("bin/python")
    }
    /// The `mapillary_tools` executable (`.venv/mapillary-tools` installed on first use).
    pub fn mapillary_tools(&self) -> PathBuf {
        tool(&self.mapillary_tools, "mapillary-tools", "mapillary_tools")
    }
    /// The `checkov` executable (`.venv/checkov` installed on first use).
    pub fn checkov(&self) -> PathBuf {
        tool(&self.checkov, "checkov", "checkov")
    }
    /// The `schemathesis` executable (`.venv/schemathesis` installed on first use).
    pub fn schemathesis(&self) -> PathBuf {
        tool(&self.schemathesis, "schemathesis", "schemathesis")
    }
    /// `PATH` with `.venv/aws/bin` prepended (trap 9 in docs/local-stack.md).
    pub fn path_with_aws_bin(&self) -> std::ffi::OsString {
        let mut paths = vec![self.aws_bin()];
        if let Some(old) = std::env::var_os("PATH") {
            paths.extend(std::env::split_paths(&old));
        }
        std::env::join_paths(paths).unwrap_or_else(|_| self.aws_bin().into_os_string())
    }
}

/// Makes sure `.venv/aws` exists and matches `requirements/aws.txt`; returns the paths of every venv (the
/// others are installed by their accessors on first use, or all at once by [`ensure_all`]).
///
/// Safe to call concurrently from several processes (an exclusive `flock` on `.venv/<name>.lock` serializes
/// the installs of one venv). Progress goes to stderr. The base interpreter is `$RELAY_PYTHON` or `python3`.
pub fn ensure(repo_root: &Path) -> Result<Venvs> {
    let venvs = paths(repo_root);
    ensure_one(repo_root, "aws", "moto_server")?;
    Ok(venvs)
}

/// Every venv, now (`cargo xtask setup`).
pub fn ensure_all(repo_root: &Path) -> Result<Venvs> {
    let venvs = paths(repo_root);
    for (name, bin) in VENVS {
        ensure_one(repo_root, name, bin)?;
    }
    Ok(venvs)
}

/// Each venv's name (directory under `.venv/`, requirements file under `requirements/`) and main binary.
const VENVS: [(&str, &str); 4] = [
    ("aws", "moto_server"),
    ("mapillary-tools", "mapillary_tools"),
    ("checkov", "checkov"),
    ("schemathesis", "schemathesis"),
];

fn paths(repo_root: &Path) -> Venvs {
    let venv_root = repo_root.join(".venv");
    Venvs {
        aws: venv_root.join("aws"),
        mapillary_tools: venv_root.join("mapillary-tools"),
        checkov: venv_root.join("checkov"),
        schemathesis: venv_root.join("schemathesis"),
    }
}

/// `.venv/<name>` current with `requirements/<name>.txt`, installing it under its lock if not.
fn ensure_one(repo_root: &Path, name: &str, main_bin: &str) -> Result<()> {
    let venv_root = repo_root.join(".venv");
    let dir = venv_root.join(name);
    let req = repo_root.join("requirements").join(format!("{name}.txt"));
    // Fast path, no lock.
    if is_fresh(&dir, &req, main_bin)? {
        return Ok(());
    }
    fs::create_dir_all(&venv_root).with_context(|| format!("creating {}", venv_root.display()))?;
    let _lock = FileLock::exclusive(&venv_root.join(format!("{name}.lock")))?;
    // Re-check under the lock: another process may just have finished.
    if !is_fresh(&dir, &req, main_bin)? {
        install(&dir, &req)?;
    }
    Ok(())
}

/// The venv a tool lives in, installed on first use; an install failure is reported on stderr here and
/// the missing executable's path returned, so the caller's spawn fails naming it (the accessors return a
/// path, as they did when every venv was installed up front).
fn tool(venv: &Path, name: &str, bin: &str) -> PathBuf {
    let root = venv.parent().and_then(Path::parent).unwrap_or(Path::new("."));
    if let Err(e) = ensure_one(root, name, bin) {
        eprintln!("venv: installing .venv/{name} failed: {e:#}");
    }
    venv.join("bin").join(bin)
}

/// Makes sure `.venv/sam` (the AWS SAM CLI, `requirements/sam.txt`) exists and is current; returns
/// the `sam` executable. Its own venv because aws-sam-cli pins boto3 and click below what moto
/// installs, and not part of [`ensure`]: the template checks need it, the demo does not. `cargo xtask
/// setup`/`test` install it while they build (the same stamp and `.venv/sam.lock` as here).
pub fn ensure_sam(repo_root: &Path) -> Result<PathBuf> {
    ensure_one(repo_root, "sam", "sam")?;
    Ok(repo_root.join(".venv/sam/bin/sam"))
}

fn is_fresh(dir: &Path, requirements: &Path, main_bin: &str) -> Result<bool> {
    let wanted =
        fs::read_to_string(requirements).with_context(|| format!("reading {}", requirements.display()))?;
    let stamp = fs::read_to_string(dir.join(STAMP)).unwrap_or_default();
    Ok(stamp == wanted && dir.join("bin").join(main_bin).exists())
}

fn install(dir: &Path, requirements: &Path) -> Result<()> {
    let wanted =
        fs::read_to_string(requirements).with_context(|| format!("reading {}", requirements.display()))?;
    if !dir.join("bin/python").exists() {
        let python = std::env::var_os("RELAY_PYTHON").unwrap_or_else(|| "python3".into());
        eprintln!("venv: creating {}", dir.display());
        run(Command::new(&python).arg("-m").arg("venv").arg(dir)).with_context(|| {
            format!(
                "creating the venv {} (is python3 with venv installed?)",
                dir.display()
            )
        })?;
    }
    eprintln!(
        "venv: installing {} into {}",
        requirements.display(),
        dir.display()
    );
    run(Command::new(dir.join("bin/pip"))
        .args([
            "install",
            // As xtask/launcher: no .pyc for every file; Python writes those it imports.
            "--no-compile",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "-r",
        ])
        .arg(requirements))
    .with_context(|| format!("installing {}", requirements.display()))?;
    fs::write(dir.join(STAMP), wanted).with_context(|| format!("writing the stamp in {}", dir.display()))?;
    eprintln!("venv: {} is ready", dir.display());
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    // pip's output goes to our stderr: stdout is reserved for `export` lines in `xtask stack up`.
    let status = cmd
        .stdout(std::io::stderr())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// An exclusive advisory lock, released when dropped (the fd closes).
struct FileLock {
    _file: File,
}

impl FileLock {
    fn exclusive(path: &Path) -> Result<Self> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // std's File::lock needs Rust 1.89; the workspace MSRV is 1.85, so flock(2) directly.
        // SAFETY: flock on a valid, owned file descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_only_when_stamp_matches_and_binary_exists() {
        let dir = tempfile::tempdir().unwrap();
        let req = dir.path().join("req.txt");
        fs::write(&req, "moto==1\n").unwrap();
        let venv = dir.path().join("v");
        fs::create_dir_all(venv.join("bin")).unwrap();
        assert!(!is_fresh(&venv, &req, "tool").unwrap(), "no stamp");
        fs::write(venv.join(STAMP), "moto==1\n").unwrap();
        assert!(!is_fresh(&venv, &req, "tool").unwrap(), "no binary");
        fs::write(venv.join("bin/tool"), "").unwrap();
        assert!(is_fresh(&venv, &req, "tool").unwrap());
        fs::write(&req, "moto==2\n").unwrap();
        assert!(!is_fresh(&venv, &req, "tool").unwrap(), "requirements changed");
    }
}
