//! `cargo xtask demo` (being built).

use std::path::Path;

use anyhow::Result;

pub async fn run(_root: &Path, _ci: bool, _images: usize) -> Result<()> {
    anyhow::bail!("the demo is not assembled yet")
}
