//! status-api: the caller's sequences and their Mapillary status, and the Mapillary account
//! connection (OAuth), as an axum [`Router`](axum::Router) served by `lambda_http` behind an API
//! Gateway HTTP API with a JWT authorizer.
//!
//! * [`app`] — the router ([`app::router`]), generic over the ports ([`app::Deps`]); one handler
//!   per route of `openapi.yaml`.
//! * [`identity`] — the caller: the JWT `sub` claim, or (dev only, opt-in) a header.
//! * [`views`] — the JSON documents the routes answer with.
//! * [`drops`] — sequences dropped through the API: announce (presigned PUT URLs), complete (the
//!   manifest), retry, delete.
//! * [`validate`] — path and query input rules.
//! * [`problem`] — `application/problem+json` errors (RFC 9457).
//! * [`oauth`] — the connection's `state`; the Mapillary side (authorize URL, code exchange, `/me`)
//!   is `shared::mapillary::app::MapillaryApp`'s.
//! * [`config`] — environment configuration; [`compose`] — config + SDK config → production deps.
//!
//! The unit tests run on the in-memory fakes of `shared::fakes`.

pub mod app;
pub mod base;
pub mod compose;
pub mod config;
pub mod drops;
pub mod identity;
pub mod oauth;
pub mod problem;
pub mod validate;
pub mod views;
pub mod webhooks;

pub use app::{router, AppDeps, Deps};

#[cfg(test)]
mod drops_tests;
#[cfg(test)]
mod tests;
