//! Offline Mapillary simulator (see README.md in this crate).
//!
//! Start it in-process with [`Simulator::start`]; the binary (`cargo run -p mapillary-sim`) wraps
//! the same library. One port serves `/graph`, `/rupload`, `/www`, `/tiles` and `/_sim`.

// Handlers short-circuit with `Result<_, axum::response::Response>`; boxing the error reply
// would only add noise in a test server, so the size lint is off for the crate.
#![allow(clippy::result_large_err)]

pub mod auth;
pub mod clock;
pub mod config;
pub mod content;
pub mod defaults;
pub mod faults;
pub mod ids;
pub mod reply;
mod routes;
pub mod server;
pub mod state;
pub mod storage;

pub use config::{
    ClockMode, FailurePlan, GraphqlPolicy, ProcessingPlan, Settings, SimConfig, StorageMode, World,
    DEFAULT_WORLD,
};
pub use routes::finish_codes as error_codes;
pub use server::{Sim, SimError, SimHandle, Simulator};
