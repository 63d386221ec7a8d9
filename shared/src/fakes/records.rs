//! zip-and-push's records in memory (the UploadsTable of [`crate::adapters::dynamodb::uploads`]):
//! sequences, uploads, image entries, ingest errors, behind the records ports.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::lock;
use crate::model::{
    EntryCheckpoint, IngestError, SequenceRecord, UploadEvent, UploadImage, UploadRecord, UploadState,
};
use crate::ports::{
    ImageEntryReader, ImageEntryStore, IngestErrorLog, RepoError, SequencePage, SequenceReader,
    SequenceStore, SweepStore, UploadReader, UploadStore,
};

/// Everything the repository holds.
#[derive(Debug, Default, Clone)]
pub struct RepoState {
    /// Sequences by (user, sequence).
    pub sequences: BTreeMap<(String, String), SequenceRecord>,
    /// Uploads by (user, sequence, index).
    pub uploads: BTreeMap<(String, String, u32), UploadRecord>,
    /// Images by (upload, index).
    pub images: BTreeMap<(String, u32), UploadImage>,
    /// Ingest errors.
    pub ingest_errors: Vec<IngestError>,
    /// Announcements of sequences dropped through the API, by (user, sequence)
    /// ([`crate::ports::DropStore`], in `super::drops`).
    pub announcements: BTreeMap<(String, String), crate::drops::Announcement>,
    /// Claim ids deleted through [`crate::ports::DropStore::delete_sequence_claim`], in order.
    pub deleted_claims: Vec<String>,
    /// Upload-state events not published yet, by (upload, position): written with the upload
    /// record that made them, read and deleted by a [`super::MemTracking`] made
    /// [`over`](super::MemTracking::over) this repository.
    pub upload_events: BTreeMap<(String, u32), UploadEvent>,
    /// Calls of [`ImageEntryReader::list_images`] served (reads of image entries back).
    pub image_lists: u64,
}

impl RepoState {
    /// Store `upload` and the events of its write (one step, as the adapter's transaction).
    fn write_upload(&mut self, upload: &UploadRecord) {
        for ev in UploadEvent::of_write(upload) {
            self.upload_events
                .insert((upload.upload_id.clone(), ev.position), ev);
        }
        let mut stored = upload.clone();
        stored.outbox.written();
        self.uploads.insert(
            (upload.user_id.clone(), upload.sequence_id.clone(), upload.index),
            stored,
        );
    }
}

/// zip-and-push's records in memory (the fake of
/// [`DynamoRepository`](crate::adapters::dynamodb::DynamoRepository)).
#[derive(Debug, Default)]
pub struct MemRepo {
    /// The data (tests may inspect and edit it). Shared with a [`super::MemTracking`] made with
    /// [`super::MemTracking::over`], as both adapters share the UploadsTable.
    pub state: Arc<Mutex<RepoState>>,
    /// Injected failures ([`MemRepo::fail_upload_puts`]): writes of uploads in this state fail
    /// transiently this many more times.
    put_upload_failures: Mutex<Option<(UploadState, u32)>>,
}

impl MemRepo {
    /// Empty repository.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next `times` [`UploadStore::put_upload`] calls writing an upload in `state` fail with
    /// [`RepoError::Transient`] (and write nothing): a DynamoDB outage around one write.
    pub fn fail_upload_puts(&self, state: UploadState, times: u32) {
        *lock(&self.put_upload_failures) = Some((state, times));
    }

    /// A copy of the data.
    pub fn snapshot(&self) -> RepoState {
        lock(&self.state).clone()
    }
}

impl SequenceReader for MemRepo {
    async fn get_sequence(
        &self,
        user_id: &str,
        sequence_id: &str,
    ) -> Result<Option<SequenceRecord>, RepoError> {
        Ok(lock(&self.state)
            .sequences
            .get(&(user_id.into(), sequence_id.into()))
            .cloned())
    }

    async fn list_sequences(
        &self,
        user_id: &str,
        limit: u32,
        after: Option<&str>,
    ) -> Result<SequencePage, RepoError> {
        // Same order and cursor as the DynamoDB adapter: gsi1 sort keys, descending.
        let st = lock(&self.state);
        let mut keyed = Vec::new();
        for seq in st.sequences.values().filter(|s| s.user_id == user_id) {
            let sk = crate::adapters::dynamodb::uploads::sequence_gsi1sk(seq.created_at, &seq.sequence_id)?;
            keyed.push((sk, seq));
        }
        keyed.sort_by(|a, b| b.0.cmp(&a.0));
        let limit = limit.max(1) as usize;
        let mut page: Vec<_> = keyed
            .into_iter()
            .filter(|(sk, _)| after.is_none_or(|a| sk.as_str() < a))
            .take(limit + 1)
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        let next = if more {
            page.last().map(|(sk, _)| sk.clone())
        } else {
            None
        };
        let sequences = page
            .into_iter()
            .map(|(_, s)| SequenceRecord {
                rejected: Vec::new(),
                ..s.clone()
            })
            .collect();
        Ok(SequencePage { sequences, next })
    }
}

impl SequenceStore for MemRepo {
    async fn put_sequence(&self, seq: &SequenceRecord) -> Result<(), RepoError> {
        lock(&self.state)
            .sequences
            .insert((seq.user_id.clone(), seq.sequence_id.clone()), seq.clone());
        Ok(())
    }
}

impl UploadReader for MemRepo {
    async fn list_uploads(&self, user_id: &str, sequence_id: &str) -> Result<Vec<UploadRecord>, RepoError> {
        Ok(lock(&self.state)
            .uploads
            .iter()
            .filter(|((u, s, _), _)| u == user_id && s == sequence_id)
            .map(|(_, v)| v.clone())
            .collect())
    }
}

impl UploadStore for MemRepo {
    async fn put_upload(&self, upload: &UploadRecord) -> Result<(), RepoError> {
        if let Some((state, times)) = lock(&self.put_upload_failures).as_mut() {
            if *state == upload.state && *times > 0 {
                *times -= 1;
                return Err(RepoError::Transient(format!(
                    "put upload {}: injected failure",
                    upload.upload_id
                )));
            }
        }
        lock(&self.state).write_upload(upload);
        Ok(())
    }

    async fn transition_upload(&self, upload: &UploadRecord, expected: UploadState) -> Result<(), RepoError> {
        let mut st = lock(&self.state);
        let k = (upload.user_id.clone(), upload.sequence_id.clone(), upload.index);
        match st.uploads.get(&k) {
            Some(u) if u.state == expected => {
                st.write_upload(upload);
                Ok(())
            }
            Some(u) => Err(RepoError::ConditionFailed(format!(
                "upload {} is {}, not {}",
                u.upload_id,
                u.state.as_str(),
                expected.as_str()
            ))),
            None => Err(RepoError::ConditionFailed(format!(
                "upload {} missing",
                upload.upload_id
            ))),
        }
    }
}

impl SweepStore for MemRepo {
    async fn unfinished_uploads(&self) -> Result<Vec<UploadRecord>, RepoError> {
        let mut out: Vec<UploadRecord> = lock(&self.state)
            .uploads
            .values()
            .filter(|u| !u.state.is_final())
            .cloned()
            .collect();
        // The adapter's order: the index's sort key `<user_id>#<upload_id>`.
        out.sort_by_key(|u| format!("{}#{}", u.user_id, u.upload_id));
        Ok(out)
    }

    async fn settle_upload(&self, upload: &UploadRecord, expected: &UploadRecord) -> Result<bool, RepoError> {
        let mut st = lock(&self.state);
        let k = (upload.user_id.clone(), upload.sequence_id.clone(), upload.index);
        match st.uploads.get(&k) {
            Some(u) if u.state == expected.state && u.attempts == expected.attempts => {
                st.write_upload(upload);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn settle_sequence(
        &self,
        seq: &SequenceRecord,
        expected_updated_at: time::OffsetDateTime,
    ) -> Result<bool, RepoError> {
        let mut st = lock(&self.state);
        match st
            .sequences
            .get_mut(&(seq.user_id.clone(), seq.sequence_id.clone()))
        {
            Some(s) if s.updated_at == expected_updated_at => {
                s.state = seq.state;
                s.reason = seq.reason.clone();
                s.updated_at = seq.updated_at;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

impl ImageEntryReader for MemRepo {
    async fn list_images(&self, upload_id: &str) -> Result<Vec<UploadImage>, RepoError> {
        let mut st = lock(&self.state);
        st.image_lists += 1;
        Ok(st
            .images
            .iter()
            .filter(|((u, _), _)| u == upload_id)
            .map(|(_, v)| v.clone())
            .collect())
    }
}

impl ImageEntryStore for MemRepo {
    async fn put_images(&self, images: &[UploadImage]) -> Result<(), RepoError> {
        let mut st = lock(&self.state);
        for i in images {
            st.images.insert((i.upload_id.clone(), i.index), i.clone());
        }
        Ok(())
    }

    async fn save_checkpoints(
        &self,
        upload_id: &str,
        checkpoints: &[EntryCheckpoint],
    ) -> Result<(), RepoError> {
        // As the DynamoDB adapter: attached to existing entries with the same fingerprint only.
        let mut st = lock(&self.state);
        for cp in checkpoints {
            if let Some(img) = st.images.get_mut(&(upload_id.to_string(), cp.index)) {
                if img.fingerprint() == cp.fingerprint {
                    img.checkpoint = Some(cp.clone());
                }
            }
        }
        Ok(())
    }
}

impl IngestErrorLog for MemRepo {
    async fn record_ingest_error(&self, error: &IngestError) -> Result<(), RepoError> {
        lock(&self.state).ingest_errors.push(error.clone());
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use time::macros::datetime;
    use time::OffsetDateTime;

    use super::*;
    use crate::model::{SequenceState, UploadState};

    /// A PENDING upload record of `user`'s sequence `seq`.
    pub(crate) fn upload_record(user: &str, seq: &str, upload_id: &str) -> UploadRecord {
        UploadRecord {
            user_id: user.into(),
            sequence_id: seq.into(),
            upload_id: upload_id.into(),
            index: 0,
            state: UploadState::Pending,
            session_key: format!("mly_relay_{upload_id}.zip"),
            total_len: 100,
            image_count: 2,
            cluster_id: None,
            handle: None,
            organization_id: None,
            bytes_sent: 0,
            created_at: datetime!(2026-03-01 10:00:00 UTC),
            started_at: None,
            finished_at: None,
            error: None,
            attempts: 0,
            outbox: Default::default(),
        }
    }

    fn sequence(user: &str, seq: &str, created_at: OffsetDateTime) -> SequenceRecord {
        SequenceRecord {
            user_id: user.into(),
            sequence_id: seq.into(),
            state: SequenceState::Uploading,
            reason: None,
            bucket: "b".into(),
            manifest_key: format!("sequences/{user}/{seq}/manifest.json"),
            manifest_etag: "e".into(),
            organization_id: None,
            image_count: 1,
            accepted_count: 1,
            upload_ids: Vec::new(),
            rejected: vec![crate::model::RejectedImage {
                key: "bad.jpg".into(),
                reason: "not a JPEG".into(),
            }],
            created_at,
            updated_at: created_at,
            attempts: 1,
            progress: Default::default(),
        }
    }

    #[tokio::test]
    async fn sequences_page_newest_first_without_their_rejected_lists() {
        let repo = MemRepo::new();
        for (i, seq) in ["s0", "s1", "s2"].iter().enumerate() {
            let at = datetime!(2026-03-01 10:00:00 UTC) + time::Duration::days(i as i64);
            repo.put_sequence(&sequence("u", seq, at)).await.unwrap();
        }
        repo.put_sequence(&sequence("other", "x", datetime!(2026-04-01 00:00 UTC)))
            .await
            .unwrap();
        let first = repo.list_sequences("u", 2, None).await.unwrap();
        let names = |p: &SequencePage| {
            p.sequences
                .iter()
                .map(|s| s.sequence_id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&first), ["s2", "s1"]);
        assert!(first.sequences.iter().all(|s| s.rejected.is_empty()));
        let rest = repo.list_sequences("u", 2, first.next.as_deref()).await.unwrap();
        assert_eq!(names(&rest), ["s0"]);
        assert_eq!(rest.next, None);
        // The record itself keeps its list.
        let one = repo.get_sequence("u", "s0").await.unwrap().unwrap();
        assert_eq!(one.rejected.len(), 1);
    }

    #[tokio::test]
    async fn injected_put_failures_hit_only_the_named_state_and_then_stop() {
        let repo = MemRepo::new();
        let mut up = upload_record("u", "s", "u~s~000");
        repo.fail_upload_puts(UploadState::Uploaded, 2);
        repo.put_upload(&up).await.unwrap();
        up.state = UploadState::Uploaded;
        up.cluster_id = Some("c".into());
        for _ in 0..2 {
            assert!(matches!(repo.put_upload(&up).await, Err(RepoError::Transient(_))));
            assert_eq!(
                repo.snapshot().uploads.values().next().unwrap().state,
                UploadState::Pending
            );
        }
        repo.put_upload(&up).await.unwrap();
        assert_eq!(
            repo.snapshot()
                .uploads
                .values()
                .next()
                .unwrap()
                .cluster_id
                .as_deref(),
            Some("c")
        );
    }

    #[tokio::test]
    async fn transitions_check_the_stored_state() {
        let repo = MemRepo::new();
        let up = upload_record("u", "s", "u.s.000");
        assert!(matches!(
            repo.transition_upload(&up, UploadState::Pending).await,
            Err(RepoError::ConditionFailed(_))
        ));
        repo.put_upload(&up).await.unwrap();
        let uploading = UploadRecord {
            state: UploadState::Uploading,
            ..up.clone()
        };
        repo.transition_upload(&uploading, UploadState::Pending)
            .await
            .unwrap();
        assert!(matches!(
            repo.transition_upload(&up, UploadState::Pending).await,
            Err(RepoError::ConditionFailed(_))
        ));
        assert_eq!(repo.list_uploads("u", "s").await.unwrap(), [uploading]);
    }
}
