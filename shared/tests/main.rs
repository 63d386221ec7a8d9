//! `shared`'s tests against its public API, one test binary: each file of this directory is a module.
//! One file's tests: `cargo test -p shared --test integration domain_zip::`.

/// `fuzz/src/planning.rs` (included by `domain_planning_fuzz`) reaches the domain as `crate::domain`, as in
/// the fuzz crate.
mod domain {
    pub use shared::domain::*;
}

/// The seeded generator the fuzz-style tests share.
#[path = "common/rng.rs"]
mod rng;

mod domain_jpeg;
mod domain_jpeg_walker;
mod domain_planning_fuzz;
mod domain_poller_fuzz;
mod domain_poller_linking;
mod domain_poller_tiles;
mod domain_poller_tracking;
mod domain_vs_mapillary_tools;
mod domain_zip;
mod mapillary_client;
