//! Harness for the integration tests and `cargo xtask`: the project's Python venvs ([`venv`]), moto
//! ([`moto`]), the local AWS stack created from `infra/template.yaml` ([`stack`]) and daemon process
//! groups ([`process`]), the functions under `cargo lambda watch` ([`watch`]) and their emulated
//! triggers ([`esm`]).

pub mod cfn;
pub mod esm;
pub mod mapillary_tools;
pub mod moto;
pub mod process;
pub mod stack;
pub mod venv;
pub mod watch;
pub mod webhook_receiver;

use std::path::PathBuf;

/// The repository root (the workspace directory), found from this crate's manifest directory.
pub fn repo_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().map(PathBuf::from).unwrap_or(manifest_dir)
}
