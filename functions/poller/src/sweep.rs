//! The sweep of uploads stuck before a final state (issue 15, item 7). zip-and-push works on a
//! sequence in invocations holding its manifest claim; when they keep failing, the ingest message
//! ends in the dead-letter queue and nothing works on the sequence any more: its uploads would stay
//! `PENDING`/`UPLOADING` forever and the user would wait for nothing.
//!
//! Each run, the poller reads the unfinished uploads (the sparse gsi2 partition `PENDING`). One is
//! stuck when neither it nor its sequence was touched for `RELAY_STUCK_AFTER_SECONDS` (longer than
//! zip-and-push's longest run with its retries) and no invocation holds the sequence's manifest
//! claim ([`verdict`]). A stuck upload is settled by what it had reached:
//! * nothing finished at Mapillary (`PENDING`, `UPLOADING`): `FAILED`, with a reason that tells the
//!   user to drop the manifest again;
//! * `finish_upload` running without a recorded cluster (`FINISHING`): `FINISH_UNCERTAIN`, so the
//!   reconciliation looks for its cluster in the activity feed (never `FAILED`: a cluster may exist);
//! * a cluster recorded but never handed to the poller (`UPLOADED`): taken into tracking and
//!   `HANDED_OFF`, as the lost cluster message would have done.
//!
//! Every write is conditional on what was read (the upload's state and attempt count, the
//! sequence's `updated_at`), so an invocation that resumes meanwhile always wins. A sequence whose
//! uploads are then all final gets zip-and-push's final state ([`sequence_outcome`]); one waiting
//! for an upload token (`AWAITING_UPLOAD_TOKEN`) is never swept.

use std::collections::BTreeMap;
use std::time::Instant;

use shared::events::set_upload_state;
use shared::idempotency::{sequence_claim_id, Claim, ClaimStatus};
use shared::model::{ClusterMessage, SequenceRecord, SequenceState, UploadRecord, UploadState};
use shared::ports::{ClaimReader, EventPublisher, RepoError, SequenceReader, SweepStore, UploadReader};
use time::OffsetDateTime;
use tracing::{info, info_span, warn, Instrument};

use crate::deps::Deps;

/// What the sweep did in one run (part of the run report).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Unfinished uploads read.
    pub unfinished: usize,
    /// Uploads found stuck.
    pub stuck: usize,
    /// Stuck uploads marked FAILED.
    pub failed: usize,
    /// Stuck uploads marked FINISH_UNCERTAIN (reconciliation takes over).
    pub uncertain: usize,
    /// Stuck uploads with a known cluster taken into tracking (HANDED_OFF).
    pub handed_off: usize,
    /// Stuck uploads that moved on before they could be settled (an invocation resumed them).
    pub raced: usize,
    /// Sequences given their final state.
    pub sequences_settled: usize,
    /// Problems (each also logged).
    pub errors: Vec<String>,
}

/// What to do with an unfinished upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Recently touched, claimed by an invocation, waiting for an upload token, or final: leave it.
    Leave,
    /// Stuck before anything finished at Mapillary: FAILED.
    Fail,
    /// Stuck while `finish_upload` ran without a recorded cluster: FINISH_UNCERTAIN.
    Uncertain,
    /// Stuck with a known cluster that was never handed off: tracking + HANDED_OFF.
    HandOff,
}

/// The latest time the upload record says it was worked on.
fn upload_touched(u: &UploadRecord) -> OffsetDateTime {
    [Some(u.created_at), u.started_at, u.finished_at]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(u.created_at)
}

/// Whether the upload record alone shows work within `stuck_after` of `now` (then its sequence
/// and claim need not be read).
pub fn recently_touched(u: &UploadRecord, now: OffsetDateTime, stuck_after: time::Duration) -> bool {
    now - upload_touched(u) < stuck_after
}

/// Whether `claim` is held by a live invocation at `now` (a lease is live up to and including its
/// end, as in `shared::idempotency`).
pub fn claim_held(claim: Option<&Claim>, now: OffsetDateTime) -> bool {
    let now_ms = i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
    claim.is_some_and(|c| c.status == ClaimStatus::Inprogress && c.lease_until_ms >= now_ms)
}

/// The verdict on `upload` at `now`: `seq` is its sequence record (if it exists), `claim` the
/// sequence's manifest claim (if any).
pub fn verdict(
    upload: &UploadRecord,
    seq: Option<&SequenceRecord>,
    claim: Option<&Claim>,
    now: OffsetDateTime,
    stuck_after: time::Duration,
) -> Verdict {
    if upload.state.is_final() || seq.is_some_and(|s| s.state == SequenceState::AwaitingUploadToken) {
        return Verdict::Leave;
    }
    let touched = seq
        .map(|s| s.updated_at)
        .into_iter()
        .chain([upload_touched(upload)])
        .max()
        .unwrap_or(upload.created_at);
    if now - touched < stuck_after || claim_held(claim, now) {
        return Verdict::Leave;
    }
    let has_cluster = upload.cluster_id.as_deref().is_some_and(|c| !c.is_empty());
    match upload.state {
        _ if has_cluster => Verdict::HandOff,
        UploadState::Finishing | UploadState::Uploaded => Verdict::Uncertain,
        _ => Verdict::Fail,
    }
}

/// The user-facing reason of an upload the sweep FAILED (no internal detail).
pub fn stuck_reason(stuck_after: time::Duration) -> String {
    format!(
        "processing stopped: no progress for more than {} after repeated failures, and nothing is \
         working on it any more; drop the manifest again to retry",
        human(stuck_after)
    )
}

/// The reason of an upload the sweep made FINISH_UNCERTAIN.
pub const UNCERTAIN_REASON: &str = "processing stopped while finish_upload was running: whether Mapillary \
     created the upload's cluster is unknown; it is looked for in the activity feed";

fn human(d: time::Duration) -> String {
    let s = d.whole_seconds();
    if s % 3600 == 0 {
        format!("{} h", s / 3600)
    } else if s % 60 == 0 {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

/// zip-and-push's final state of a sequence whose uploads are all final (`None` while one is not):
/// UPLOADED when at least one reached Mapillary (with a note of how many failed), else FAILED with
/// the first upload's reason.
pub fn sequence_outcome(uploads: &[UploadRecord]) -> Option<(SequenceState, Option<String>)> {
    if uploads.is_empty() || uploads.iter().any(|u| !u.state.is_final()) {
        return None;
    }
    let delivered = uploads
        .iter()
        .filter(|u| matches!(u.state, UploadState::HandedOff | UploadState::FinishUncertain))
        .count();
    Some(if delivered > 0 {
        let failed = uploads.len() - delivered;
        (
            SequenceState::Uploaded,
            (failed > 0).then(|| format!("{failed} of {} uploads failed", uploads.len())),
        )
    } else {
        let first = uploads.iter().find_map(|u| u.error.clone()).unwrap_or_default();
        (
            SequenceState::Failed,
            Some(format!("every upload failed: {first}")),
        )
    })
}

/// Settle the stuck uploads (see the module docs).
pub async fn sweep_stuck<D: Deps>(d: &D, deadline: Instant) -> SweepReport {
    let mut rep = SweepReport::default();
    let now = d.clock().now();
    let stuck_after = time::Duration::try_from(d.tunables().stuck_after).unwrap_or(time::Duration::HOUR);
    let unfinished = match d.uploads().unfinished_uploads().await {
        Ok(u) => u,
        Err(e) => {
            warn!(error = %e, "listing unfinished uploads failed");
            rep.errors.push(format!("unfinished uploads: {e}"));
            return rep;
        }
    };
    rep.unfinished = unfinished.len();
    // By sequence: its record and claim are read once, and only when an upload is old enough.
    let mut by_sequence: BTreeMap<(String, String), Vec<UploadRecord>> = BTreeMap::new();
    for u in unfinished {
        if !recently_touched(&u, now, stuck_after) {
            by_sequence
                .entry((u.user_id.clone(), u.sequence_id.clone()))
                .or_default()
                .push(u);
        }
    }
    for ((user, sequence), uploads) in by_sequence {
        if Instant::now() >= deadline {
            break;
        }
        let span = info_span!("sweep", user = %user, sequence_id = %sequence);
        if let Err(e) = sweep_sequence(d, &user, &sequence, uploads, now, stuck_after, &mut rep)
            .instrument(span)
            .await
        {
            warn!(user = %user, sequence_id = %sequence, error = %e, "sweeping a sequence failed");
            rep.errors.push(format!("sequence {user}/{sequence}: {e}"));
        }
    }
    if rep.stuck > 0 || !rep.errors.is_empty() {
        info!(?rep, "stuck uploads swept");
    }
    rep
}

async fn sweep_sequence<D: Deps>(
    d: &D,
    user: &str,
    sequence: &str,
    uploads: Vec<UploadRecord>,
    now: OffsetDateTime,
    stuck_after: time::Duration,
    rep: &mut SweepReport,
) -> Result<(), RepoError> {
    let seq = d.uploads().get_sequence(user, sequence).await?;
    let claim = match &seq {
        Some(s) => {
            d.claims()
                .get_claim(&sequence_claim_id(&s.bucket, &s.manifest_key))
                .await?
        }
        None => None,
    };
    let mut settled_any = false;
    for up in uploads {
        // Owner check: the index entry's record must belong to the sequence it was grouped under.
        if up.user_id != user || up.sequence_id != sequence {
            continue;
        }
        let v = verdict(&up, seq.as_ref(), claim.as_ref(), now, stuck_after);
        if v == Verdict::Leave {
            continue;
        }
        rep.stuck += 1;
        let mut next = up.clone();
        // The change's event is written with it (settle_upload: one write), published by the outbox.
        let publish = d.events().enabled();
        next.finished_at = Some(now);
        match v {
            Verdict::Fail => {
                set_upload_state(&mut next, UploadState::Failed, now, publish);
                next.error = Some(stuck_reason(stuck_after));
            }
            Verdict::Uncertain => {
                set_upload_state(&mut next, UploadState::FinishUncertain, now, publish);
                next.error = Some(UNCERTAIN_REASON.to_string());
            }
            Verdict::HandOff => {
                // The tracking record first (idempotent): a crash after it leaves an upload the
                // next sweep hands off again, never a cluster nobody tracks.
                let msg = ClusterMessage {
                    upload_id: up.upload_id.clone(),
                    user_id: up.user_id.clone(),
                    sequence_id: up.sequence_id.clone(),
                    cluster_id: up.cluster_id.clone().unwrap_or_default(),
                };
                crate::intake::create(d, &msg).await?;
                set_upload_state(&mut next, UploadState::HandedOff, now, publish);
                next.finished_at = up.finished_at.or(Some(now));
            }
            Verdict::Leave => continue,
        }
        if d.uploads().settle_upload(&next, &up).await? {
            settled_any = true;
            info!(upload_id = %up.upload_id, from = up.state.as_str(), to = next.state.as_str(),
                "stuck upload settled");
            match v {
                Verdict::Fail => rep.failed += 1,
                Verdict::Uncertain => rep.uncertain += 1,
                Verdict::HandOff => rep.handed_off += 1,
                Verdict::Leave => {}
            }
        } else {
            info!(upload_id = %up.upload_id, "stuck upload moved on meanwhile: left as it is");
            rep.raced += 1;
        }
    }
    let Some(seq) =
        seq.filter(|s| settled_any && matches!(s.state, SequenceState::Received | SequenceState::Uploading))
    else {
        return Ok(());
    };
    let all = d.uploads().list_uploads(user, sequence).await?;
    if let Some((state, reason)) = sequence_outcome(&all) {
        let mut next = seq.clone();
        next.state = state;
        next.reason = reason;
        next.updated_at = now.max(seq.updated_at);
        if d.uploads().settle_sequence(&next, seq.updated_at).await? {
            info!(state = state.as_str(), "sequence of stuck uploads settled");
            rep.sequences_settled += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    const T0: OffsetDateTime = datetime!(2026-12-01 10:00:00 UTC);

    fn upload(state: UploadState, cluster: Option<&str>) -> UploadRecord {
        UploadRecord {
            user_id: "u".into(),
            sequence_id: "s".into(),
            upload_id: "u~s~000".into(),
            index: 0,
            state,
            session_key: "k".into(),
            total_len: 1,
            image_count: 1,
            cluster_id: cluster.map(str::to_string),
            handle: None,
            organization_id: None,
            bytes_sent: 0,
            created_at: T0,
            started_at: Some(T0 + time::Duration::minutes(1)),
            finished_at: None,
            error: None,
            attempts: 1,
            outbox: Default::default(),
        }
    }

    fn sequence(state: SequenceState, updated: OffsetDateTime) -> SequenceRecord {
        SequenceRecord {
            user_id: "u".into(),
            sequence_id: "s".into(),
            state,
            reason: None,
            bucket: "b".into(),
            manifest_key: "sequences/u/s/manifest.json".into(),
            manifest_etag: "e".into(),
            organization_id: None,
            image_count: 1,
            accepted_count: 1,
            upload_ids: vec!["u~s~000".into()],
            rejected: Vec::new(),
            created_at: T0,
            updated_at: updated,
            attempts: 1,
            progress: Default::default(),
        }
    }

    fn claim(status: ClaimStatus, until: OffsetDateTime) -> Claim {
        Claim {
            id: "c".into(),
            status,
            lease_until_ms: (until.unix_timestamp_nanos() / 1_000_000) as i64,
            owner: "o".into(),
            expiration: 0,
        }
    }

    const TWO_H: time::Duration = time::Duration::hours(2);

    #[test]
    fn only_uploads_untouched_past_the_limit_and_unclaimed_are_stuck() {
        let up = upload(UploadState::Uploading, None);
        let seq = sequence(SequenceState::Uploading, T0 + time::Duration::minutes(30));
        // The sequence was touched 30 min after the upload started: 2 h count from there.
        let just_before = T0 + time::Duration::minutes(149);
        let after = T0 + time::Duration::minutes(151);
        assert_eq!(verdict(&up, Some(&seq), None, just_before, TWO_H), Verdict::Leave);
        assert_eq!(verdict(&up, Some(&seq), None, after, TWO_H), Verdict::Fail);
        // A live claim (an invocation is working on it, up to and including its lease end).
        let live = claim(ClaimStatus::Inprogress, after);
        assert_eq!(
            verdict(&up, Some(&seq), Some(&live), after, TWO_H),
            Verdict::Leave
        );
        let expired = claim(ClaimStatus::Inprogress, after - time::Duration::seconds(1));
        assert_eq!(
            verdict(&up, Some(&seq), Some(&expired), after, TWO_H),
            Verdict::Fail
        );
        // A COMPLETED claim holds nothing.
        let completed = claim(ClaimStatus::Completed, after + TWO_H);
        assert_eq!(
            verdict(&up, Some(&seq), Some(&completed), after, TWO_H),
            Verdict::Fail
        );
        // The upload record alone is enough when the sequence record is missing.
        assert_eq!(verdict(&up, None, None, after, TWO_H), Verdict::Fail);
        assert_eq!(
            verdict(&up, None, None, T0 + time::Duration::minutes(100), TWO_H),
            Verdict::Leave
        );
        // A clock behind the records (skew): nothing is stuck.
        assert_eq!(verdict(&up, Some(&seq), None, T0 - TWO_H, TWO_H), Verdict::Leave);
    }

    #[test]
    fn what_a_stuck_upload_becomes_depends_on_what_it_reached() {
        let seq = sequence(SequenceState::Uploading, T0);
        let late = T0 + time::Duration::hours(5);
        let v = |state, cluster| verdict(&upload(state, cluster), Some(&seq), None, late, TWO_H);
        assert_eq!(v(UploadState::Pending, None), Verdict::Fail);
        assert_eq!(v(UploadState::Uploading, None), Verdict::Fail);
        assert_eq!(v(UploadState::Finishing, None), Verdict::Uncertain);
        assert_eq!(v(UploadState::Uploaded, None), Verdict::Uncertain);
        assert_eq!(v(UploadState::Finishing, Some("c1")), Verdict::HandOff);
        assert_eq!(v(UploadState::Uploaded, Some("c1")), Verdict::HandOff);
        assert_eq!(v(UploadState::Uploading, Some("")), Verdict::Fail);
        for final_state in [
            UploadState::HandedOff,
            UploadState::FinishUncertain,
            UploadState::Failed,
        ] {
            assert_eq!(v(final_state, None), Verdict::Leave);
        }
        // Waiting for the user's upload token is not stuck, however long it takes.
        let waiting = sequence(SequenceState::AwaitingUploadToken, T0);
        assert_eq!(
            verdict(
                &upload(UploadState::Pending, None),
                Some(&waiting),
                None,
                late,
                TWO_H
            ),
            Verdict::Leave
        );
    }

    #[test]
    fn the_reason_is_for_users_and_the_sequence_outcome_follows_zip_and_push() {
        let r = stuck_reason(TWO_H);
        assert!(r.starts_with("processing stopped:"), "{r}");
        assert!(r.contains("2 h") && r.contains("drop the manifest again"), "{r}");
        assert!(
            !r.contains("s3://") && !r.contains("Error") && !r.contains('{'),
            "{r}"
        );
        assert_eq!(human(time::Duration::minutes(90)), "90 min");
        let mut failed = upload(UploadState::Failed, None);
        failed.error = Some(r.clone());
        let mut handed = upload(UploadState::HandedOff, Some("c"));
        handed.index = 1;
        assert_eq!(
            sequence_outcome(&[failed.clone()]),
            Some((SequenceState::Failed, Some(format!("every upload failed: {r}"))))
        );
        assert_eq!(
            sequence_outcome(&[failed.clone(), handed]),
            Some((SequenceState::Uploaded, Some("1 of 2 uploads failed".into())))
        );
        assert_eq!(
            sequence_outcome(&[failed, upload(UploadState::Uploading, None)]),
            None
        );
        assert_eq!(sequence_outcome(&[]), None);
    }
}
