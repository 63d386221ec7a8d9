//! Step 1b of a user's turn: finish again the FINISH_UNCERTAIN uploads whose first `finish_upload`
//! the activity feed proved to have created nothing (`user::status` sets [`UploadTurn::refinish`]:
//! the feed, read successfully back to the call, shows no matching cluster `RELAY_REFINISH_AFTER_S`
//! after the call ended).
//!
//! `finish_upload` is not known to be idempotent (every call creates a cluster), so each proof
//! allows exactly one call: the attempt is written to the tracking record before the call (a
//! fresh window — `created_until_s` and `give_up_at` move past the call — and `refinishes` + 1).
//! A new proof then needs the feed to show nothing for another `RELAY_REFINISH_AFTER_S` after this
//! call. A run killed during the call, a lost reply, a timeout: the record already says "uncertain
//! again, fresh window", and the feed decides as for the first call.

use std::time::Instant;

use shared::domain::tracking::{adopt_cluster, OverallState, Transition};
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::session::{CallError, TokenSession};
use shared::model::{UploadRecord, UploadState};
use shared::ports::{TrackingStore, UploadReader};
use time::OffsetDateTime;
use tracing::{info, info_span, warn, Instrument};

use crate::deps::Deps;
use crate::reconcile::CREATED_SLACK_S;
use crate::report::UserReport;
use crate::user::status::UploadTurn;

/// Finish again every turn marked [`UploadTurn::refinish`] (until `deadline`).
pub(crate) async fn refinish<D: Deps>(
    d: &D,
    user_id: &str,
    tok: &mut TokenSession<'_, D::Tokens, MapillaryApp>,
    turns: &mut [UploadTurn],
    deadline: Instant,
    out: &mut UserReport,
) {
    for turn in turns.iter_mut().filter(|t| t.refinish) {
        turn.refinish = false;
        // The call plus its timeout must fit: a run cut at its deadline would lose the reply.
        if deadline.saturating_duration_since(Instant::now()) < d.tunables().finish_timeout {
            out.cut_off = true;
            continue;
        }
        let span = info_span!("refinish", upload_id = %turn.record.upload_id);
        if let Err(e) = refinish_one(d, user_id, tok, turn, out).instrument(span).await {
            out.errors.push(format!("upload {}: {e}", turn.record.upload_id));
        }
    }
}

async fn refinish_one<D: Deps>(
    d: &D,
    user_id: &str,
    tok: &mut TokenSession<'_, D::Tokens, MapillaryApp>,
    turn: &mut UploadTurn,
    out: &mut UserReport,
) -> Result<(), String> {
    let t = &turn.record;
    // The handle is zip-and-push's: its upload record, the same owner's, still FINISH_UNCERTAIN.
    let up: UploadRecord = d
        .uploads()
        .list_uploads(user_id, &t.sequence_id)
        .await
        .map_err(|e| format!("reading the upload record: {e}"))?
        .into_iter()
        .find(|u| u.upload_id == t.upload_id && u.user_id == t.user_id)
        .ok_or("no upload record")?;
    if up.state != UploadState::FinishUncertain || up.cluster_id.is_some() {
        return Err(format!(
            "upload record is {}, not FINISH_UNCERTAIN",
            up.state.as_str()
        ));
    }
    let handle = up.handle.clone().ok_or("no upload handle recorded")?;

    // Persist the attempt first: one call per proof, whatever happens to this run.
    let now = d.clock().now();
    let timeout = d.tunables().finish_timeout;
    let window = time::Duration::try_from(d.tunables().reconcile_window).unwrap_or(time::Duration::DAY);
    let call_end = now + time::Duration::try_from(timeout).unwrap_or(time::Duration::MINUTE);
    let mut attempt = turn.old.clone();
    let Some(rc) = attempt.tracked.reconcile.as_mut() else {
        return Err("not reconciling".into());
    };
    rc.refinishes = rc.refinishes.saturating_add(1);
    rc.created_until_s = rc
        .created_until_s
        .max(call_end.unix_timestamp().saturating_add(CREATED_SLACK_S));
    rc.give_up_at = rc.give_up_at.max(call_end + window);
    let rc = rc.clone();
    attempt.history.push(Transition {
        at: now,
        field: "finish_upload".into(),
        from: None,
        to: Some(format!("called again ({})", rc.refinishes)),
    });
    d.tracking()
        .update_tracking(&attempt, turn.old.tracked.last_checked_at)
        .await
        .map_err(|e| format!("recording the finish_upload attempt: {e}"))?;
    // What this turn writes at its end builds on the attempt.
    turn.old = attempt.clone();
    turn.record.tracked.reconcile = Some(rc.clone());
    turn.record.history = attempt.history.clone();

    info!(refinishes = rc.refinishes, "calling finish_upload again");
    let (mly, org) = (d.mapillary(), up.organization_id.clone());
    let call = tok.call(|tk| {
        let (handle, org) = (&handle, org.as_deref());
        async move { mly.finish_upload(&tk, handle, org).await }
    });
    let res = match tokio::time::timeout(timeout, call).await {
        Ok(r) => r,
        Err(_) => {
            warn!("finish_upload did not answer in time: outcome unknown again (fresh window)");
            return Ok(());
        }
    };
    match res {
        Ok(cluster_id) => {
            info!(cluster_id = %cluster_id, "finish_upload returned a cluster: tracked from now on");
            let at: OffsetDateTime = d.clock().now();
            let tr = adopt_cluster(&mut turn.record.tracked, &cluster_id, at);
            turn.update.transitions.insert(0, tr);
            turn.update.changed = true;
            out.refinished += 1;
        }
        Err(CallError::Call(e)) if e.is_ambiguous() => {
            warn!(error = %e, "finish_upload outcome unknown again: fresh window");
        }
        Err(CallError::Call(e)) if e.is_retriable() || e.is_unauthorized() => {
            // Nothing was created; the next proof (after RELAY_REFINISH_AFTER_S) calls again.
            warn!(error = %e, "finish_upload refused for now: called again after the next proof");
        }
        Err(CallError::Refresh(e)) => {
            warn!(error = %e, "no usable token for finish_upload: called again after the next proof");
        }
        Err(CallError::Call(e)) => {
            warn!(error = %e, "finish_upload refused the upload: FAILED");
            let state = OverallState::Failed {
                error_code: None,
                stage: None,
                reason: "finish_upload's reply was lost, Mapillary created no cluster, and it refused to \
                         finish the upload again: upload the sequence again"
                    .into(),
            };
            turn.update.transitions.push(Transition {
                at: now,
                field: "state".into(),
                from: Some(turn.record.tracked.state.as_str().to_string()),
                to: Some(state.as_str().to_string()),
            });
            turn.update.state = state;
            turn.update.changed = true;
        }
    }
    Ok(())
}
