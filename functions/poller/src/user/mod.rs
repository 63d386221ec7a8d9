//! One user's turn in a run, three steps in order: [`status`] (walk the user's activity feed once,
//! then the status of every due upload; [`refinish`]: finish again the FINISH_UNCERTAIN uploads the
//! feed proved uncommitted), [`link`] (our images → Mapillary image ids, by feed or
//! by coverage tiles), [`write`] (links, then records, in one batch). The user's token session is
//! opened first; without one only the deadlines are checked.

pub(crate) mod link;
pub(crate) mod refinish;
pub(crate) mod status;
pub(crate) mod write;

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Instant;

use shared::mapillary::session::TokenSession;
use shared::model::{StoredToken, TrackingRecord};
use shared::ports::TokenError;
use tracing::warn;

use crate::clock::elapsed_ms;
use crate::deps::Deps;
use crate::report::UserReport;

/// One user's turn: `records` are the user's due uploads, `pending` how many of the user's uploads
/// are pending in all, `token` the user's token as loaded up front. `linked_in_run`: sequences
/// linked by every user's turn of this run so far.
pub(crate) async fn track_user<D: Deps>(
    d: &D,
    user_id: &str,
    token: Result<Option<StoredToken>, TokenError>,
    records: Vec<TrackingRecord>,
    pending: usize,
    deadline: Instant,
    linked_in_run: &Mutex<HashSet<String>>,
) -> UserReport {
    let mut out = UserReport::default();
    if Instant::now() >= deadline {
        out.cut_off = true;
        return out;
    }
    let t = Instant::now();
    let mut session = match TokenSession::from_loaded_fresh(d.token_context(), user_id, token).await {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "no usable token: only the deadlines are checked");
            out.errors.push(format!("user {user_id}: {e}"));
            None
        }
    };
    out.timings.token_ms = elapsed_ms(t);

    let t = Instant::now();
    let mut feed = status::read_feed(d, session.as_mut(), &records, &mut out).await;
    out.timings.feed_ms = elapsed_ms(t);
    let now = d.clock().now();
    let mut turns = status::statuses(d, records, &mut feed, now, &mut out);

    if let Some(tok) = session.as_mut() {
        refinish::refinish(d, user_id, tok, &mut turns, deadline, &mut out).await;
    }

    let t = Instant::now();
    if let Some(tok) = session.as_mut() {
        link::link(
            d,
            user_id,
            tok,
            &mut turns,
            now,
            deadline,
            linked_in_run,
            &mut out,
        )
        .await;
    }
    out.timings.link_ms = elapsed_ms(t);

    write::write(
        d,
        user_id,
        turns,
        feed.mapillary_user_id,
        pending,
        now,
        deadline,
        &mut out,
    )
    .await;
    out
}
