//! poller: an EventBridge-scheduled run that drains the clusters queue into tracking state and
//! tracks every handed-off upload through Mapillary's four stages, then links it.
//!
//! * [`handler`] — one run ([`handler::run_once`]) within a time budget, generic over the ports
//!   ([`handler::Poller`]); one conditional write (the run lease) keeps overlapping runs apart, and
//!   each user's records and links are written in batches, links first, so a run cut off at any
//!   point leaves consistent state and the next run continues.
//! * [`intake`] — clusters queue → `create_tracking` (idempotent) → delete after the write.
//! * [`planb`] — the activity feed (one walk per user and run) and linking by order.
//! * [`plana`] — the fallback when the feed is unusable: coverage tiles → candidates → matching.
//! * User tokens (refresh on expiry/401, Mapillary user id from `/me`) are
//!   `shared::mapillary::session`'s; every Mapillary call goes through `shared::mapillary::app`.
//! * [`clock`] — "now". The ports (the clusters queue's
//!   [`ClusterInbox`](shared::ports::ClusterInbox), the tracking store, the run lease…) and their
//!   adapters are in `shared`.
//! * [`reconcile`] — FINISH_UNCERTAIN uploads: found by scan, their cluster looked for in the feed.
//! * [`config`] — environment configuration; [`compose`] — config + SDK config → the production
//!   [`Poller`]; [`lambda`] — one invocation (deadline, response document).

pub mod clock;
pub mod compose;
pub mod config;
pub mod handler;
pub mod intake;
pub mod lambda;
pub mod plana;
pub mod planb;
pub mod reconcile;

pub use handler::{run_once, Poller, RunReport, RunTimings};
