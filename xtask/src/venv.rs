//! `cargo xtask` side of the Python venvs: the harness's [`integration_tests::venv`] does the work.

use std::path::Path;

use anyhow::Result;
pub use integration_tests::venv::Venvs;

/// Creates or refreshes `.venv/aws` and `.venv/mapillary-tools` from `requirements/*.txt` (fast no-op
/// when they are current). Progress goes to stderr.
pub fn ensure(repo_root: &Path) -> Result<Venvs> {
    integration_tests::venv::ensure(repo_root)
}
