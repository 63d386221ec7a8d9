//! Counting invocations without progress (issue 15, item 2). A continuation at the deadline is a
//! new SQS message, so SQS's receive count starts again with it, and a sequence that keeps failing
//! transiently would run forever without reaching the DLQ. So every invocation that ends before the
//! sequence is final is counted on the sequence record ([`SequenceProgress`]): if it raised the
//! sequence's [`progress_mark`] the count starts again, otherwise it grows, and at
//! `RELAY_MAX_INVOCATIONS_WITHOUT_PROGRESS` the sequence is given up (FAILED with the last error).
//!
//! Pure rules; the handler reads and writes the records.

use shared::model::{SequenceProgress, UploadRecord, UploadState};

/// How far the uploads of a sequence are, as one number that only grows while work gets done: the
/// bytes the server acknowledged (recorded when an upload pauses between POSTs or completes), one
/// per planned upload, and per upload its step in the lifecycle (PENDING/UPLOADING 0, FINISHING 1,
/// UPLOADED 2, final 3). A plan written, a POST stored, a `finish_upload` answered, a cluster handed
/// off or an upload given up each raise it.
pub fn progress_mark(uploads: &[UploadRecord]) -> u64 {
    uploads
        .iter()
        .map(|u| {
            let step = match u.state {
                UploadState::Pending | UploadState::Uploading => 0,
                UploadState::Finishing => 1,
                UploadState::Uploaded => 2,
                UploadState::HandedOff | UploadState::FinishUncertain | UploadState::Failed => 3,
            };
            u.bytes_sent.saturating_add(1 + step)
        })
        .fold(0u64, u64::saturating_add)
}

/// What one more invocation that ended early means for the sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It made progress, or has not yet reached the limit: go on (continuation or retry).
    GoOn,
    /// `stalled` invocations in a row without progress, the limit: fail the sequence with this reason.
    GiveUp(String),
}

/// Count an invocation that ended before the sequence was final, with the sequence's `mark` at its
/// end and `error` why it ended (`None`: it ran out of time). `max_stalled` (at least 1) is the
/// number of invocations without progress after which the sequence is given up.
pub fn count_invocation(
    p: &mut SequenceProgress,
    mark: u64,
    error: Option<&str>,
    max_stalled: u32,
) -> Verdict {
    if mark > p.mark {
        p.mark = mark;
        p.stalled = 0;
        p.last_error = error.map(str::to_string);
        return Verdict::GoOn;
    }
    p.stalled = p.stalled.saturating_add(1);
    if let Some(e) = error {
        p.last_error = Some(e.to_string());
    }
    if p.stalled < max_stalled.max(1) {
        return Verdict::GoOn;
    }
    let last = p
        .last_error
        .as_deref()
        .unwrap_or("each invocation ran out of time before any upload could move on");
    Verdict::GiveUp(format!(
        "gave up after {} invocations without progress: {last}",
        p.stalled
    ))
}

#[cfg(test)]
mod tests {
    use shared::model::upload_id;
    use time::OffsetDateTime;

    use super::*;

    fn upload(index: u32, state: UploadState, bytes_sent: u64) -> UploadRecord {
        UploadRecord {
            user_id: "u".into(),
            sequence_id: "s".into(),
            upload_id: upload_id("u", "s", index),
            index,
            state,
            session_key: format!("k{index}"),
            total_len: 1000,
            image_count: 1,
            cluster_id: None,
            handle: None,
            organization_id: None,
            bytes_sent,
            attempts: 0,
            created_at: OffsetDateTime::UNIX_EPOCH,
            started_at: None,
            finished_at: None,
            error: None,
            outbox: Default::default(),
        }
    }

    #[test]
    fn the_mark_grows_with_each_kind_of_progress() {
        let planned = progress_mark(&[
            upload(0, UploadState::Pending, 0),
            upload(1, UploadState::Pending, 0),
        ]);
        assert!(planned > progress_mark(&[]), "a plan written is progress");
        let mut prev = planned;
        for (state, bytes) in [
            (UploadState::Uploading, 0),
            (UploadState::Uploading, 400),
            (UploadState::Uploading, 1000),
            (UploadState::Finishing, 1000),
            (UploadState::Uploaded, 1000),
            (UploadState::HandedOff, 1000),
        ] {
            let m = progress_mark(&[upload(0, state, bytes), upload(1, UploadState::Pending, 0)]);
            assert!(m >= prev, "{state:?} {bytes}: {m} < {prev}");
            if bytes > 0 || state != UploadState::Uploading {
                assert!(m > prev, "{state:?} {bytes}: no progress counted");
            }
            prev = m;
        }
        // An upload given up is progress too (the sequence moves towards its end).
        let failed = progress_mark(&[
            upload(0, UploadState::Failed, 0),
            upload(1, UploadState::Pending, 0),
        ]);
        assert!(failed > planned);
        // Huge values saturate instead of overflowing.
        assert_eq!(
            progress_mark(&[upload(0, UploadState::Failed, u64::MAX)]),
            u64::MAX
        );
    }

    #[test]
    fn gives_up_after_max_invocations_in_a_row_without_progress() {
        let mut p = SequenceProgress::default();
        // Invocation 1 planned (mark 2) and then failed: progress, go on.
        assert_eq!(count_invocation(&mut p, 2, Some("503 a"), 3), Verdict::GoOn);
        assert_eq!((p.mark, p.stalled), (2, 0));
        // Two without progress: still going.
        assert_eq!(count_invocation(&mut p, 2, Some("503 b"), 3), Verdict::GoOn);
        assert_eq!(count_invocation(&mut p, 2, None, 3), Verdict::GoOn);
        assert_eq!(p.stalled, 2);
        // The third gives up, with the last error recorded (running out of time keeps it).
        match count_invocation(&mut p, 2, None, 3) {
            Verdict::GiveUp(reason) => {
                assert!(reason.contains("3 invocations without progress"), "{reason}");
                assert!(reason.ends_with("503 b"), "{reason}");
            }
            v => panic!("expected GiveUp, got {v:?}"),
        }
    }

    #[test]
    fn progress_starts_the_count_again_and_a_lower_mark_is_no_progress() {
        let mut p = SequenceProgress::default();
        assert_eq!(count_invocation(&mut p, 5, None, 2), Verdict::GoOn);
        assert_eq!(count_invocation(&mut p, 5, Some("x"), 2), Verdict::GoOn);
        assert_eq!(p.stalled, 1);
        // Progress (a POST stored): the count starts again.
        assert_eq!(count_invocation(&mut p, 900, Some("y"), 2), Verdict::GoOn);
        assert_eq!((p.mark, p.stalled), (900, 0));
        // A mark that went back (FINISHING → UPLOADING after a refused finish) is no progress.
        assert_eq!(count_invocation(&mut p, 899, Some("z"), 2), Verdict::GoOn);
        assert!(matches!(count_invocation(&mut p, 900, None, 2), Verdict::GiveUp(r) if r.ends_with(": z")));
        // Without any recorded error the reason still says what happened.
        let mut p = SequenceProgress::default();
        assert!(
            matches!(count_invocation(&mut p, 0, None, 1), Verdict::GiveUp(r) if r.contains("ran out of time"))
        );
    }
}
