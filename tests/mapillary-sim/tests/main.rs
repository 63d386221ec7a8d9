//! The simulator's tests, one test binary: each file of this directory is a module, `common` their helpers.
//! One file's tests: `cargo test -p mapillary-sim --test integration strict::`.

mod common;

mod binary;
mod entities;
mod faults;
mod feed;
mod oauth;
mod processing;
mod rupload;
mod strict;
mod tiles;
mod worlds;
