//! poller: an EventBridge-scheduled run that drains the clusters queue into tracking state and
//! tracks every handed-off upload through Mapillary's four stages, then links it.
//!
//! Where each behaviour lives (the import graph runs downwards, without circles):
//! * [`run`] — one run ([`run_once`]) within a time budget: the run lease (one conditional write
//!   keeps overlapping runs apart), intake, FINISH_UNCERTAIN discovery, the loop over users, the
//!   feed health record.
//! * `user` — one user's turn, three steps: status (feed walk, then each upload's stages),
//!   link, write (links first, then records, in one batch per user), so a run cut off at any point
//!   leaves consistent state and the next run continues.
//! * [`feed`] — the activity feed walk (paging, stop rules, usable or not).
//! * [`linking`] — by the feed ([`linking::by_feed`], the main path, "Plan B" in the seed
//!   write-up) or by coverage tiles ([`linking::by_tiles`], the documented fallback, "Plan A").
//! * [`ours`] — our image entries as linking inputs (a leaf).
//! * [`intake`] — clusters queue → `create_tracking` (idempotent) → delete after the write.
//! * [`reconcile`] — FINISH_UNCERTAIN uploads: found by scan, their cluster looked for in the feed.
//! * [`sweep`] — uploads stuck before a final state after zip-and-push gave up (DLQ): FAILED,
//!   FINISH_UNCERTAIN or handed off, by what they had reached.
//! * [`outbox`] — status-change events: written with the record change, published at the start
//!   and end of each run, at-least-once with deterministic ids; [`webhooks`] — the same events
//!   queued for users' webhooks, POSTed signed, in order, with backoff and a failure limit.
//! * [`deps`] — the [`Deps`] trait (every port and setting of a run, bounds written once) and
//!   [`PollerDeps`]; [`compose`] — config + SDK config → the production [`PollerDeps`];
//!   [`config`] — environment configuration; [`clock`] — "now"; [`lambda`] — one invocation
//!   (deadline, response document); [`report`] — what a run did.
//! * User tokens (refresh on expiry/401, Mapillary user id from `/me`) are
//!   `shared::mapillary::session`'s; every Mapillary call goes through `shared::mapillary::app`;
//!   the ports and their adapters (and in-memory fakes) are in `shared`.

pub mod clock;
pub mod compose;
pub mod config;
pub mod deps;
pub mod feed;
pub mod intake;
pub mod lambda;
pub mod linking;
pub mod ours;
pub mod outbox;
pub mod reconcile;
pub mod report;
pub mod run;
pub mod sweep;
mod user;
pub mod webhooks;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_refinish;

pub use deps::{Deps, PollerDeps};
pub use report::{RunReport, RunTimings};
pub use run::run_once;
