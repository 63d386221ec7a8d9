//! `cargo xtask` side of the Python venvs: the harness's [`integration_tests::venv`] does the work.

use std::path::Path;

use anyhow::Result;
pub use integration_tests::venv::Venvs;

/// Creates or refreshes `.venv/aws` and `.venv/mapillary-tools` from `requirements/*.txt` (fast no-op
/// when they are current). Progress goes to stderr.
pub fn ensure(repo_root: &Path) -> Result<Venvs> {
    integration_tests::venv::ensure(repo_root)
}

/// Creates or refreshes `.venv/sam` (AWS SAM CLI, for the template checks); returns `sam`'s path.
pub fn ensure_sam(repo_root: &Path) -> Result<std::path::PathBuf> {
    integration_tests::venv::ensure_sam(repo_root)
}
