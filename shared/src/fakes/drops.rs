//! The status API's drop ports in memory: [`ObjectWriter`] on [`MemStore`] (a presigned URL is a
//! `memory://` URL naming the key and the bound headers; nothing checks it) and [`DropStore`] on
//! [`MemRepo`] (announcements in [`super::RepoState::announcements`]; deleting a sequence removes its
//! sequence, upload and image records and its announcement — tracking items live in
//! [`super::MemTracking`] and are left alone).

use super::{lock, MemRepo, MemStore};
use crate::drops::Announcement;
use crate::ports::{DropStore, ObjectStore, ObjectWriter, PresignedPut, RepoError, StoreError};

impl ObjectWriter for MemStore {
    async fn presign_put(
        &self,
        bucket: &str,
        key: &str,
        content_length: u64,
        content_md5: Option<&str>,
        expires_in: std::time::Duration,
    ) -> Result<PresignedPut, StoreError> {
        let mut headers = vec![("content-length".to_string(), content_length.to_string())];
        if let Some(md5) = content_md5 {
            headers.push(("content-md5".to_string(), md5.to_string()));
        }
        Ok(PresignedPut {
            url: format!("memory://{bucket}/{key}?expires={}", expires_in.as_secs()),
            headers,
        })
    }

    async fn put_object(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        _content_type: &str,
    ) -> Result<String, StoreError> {
        Ok(self.put(bucket, key, body))
    }

    async fn delete_prefix(&self, bucket: &str, prefix: &str) -> Result<u64, StoreError> {
        let listed = self.list(bucket, prefix).await?;
        for o in &listed {
            self.delete(bucket, &o.key);
        }
        Ok(listed.len() as u64)
    }
}

impl DropStore for MemRepo {
    async fn put_announcement(&self, a: &Announcement) -> Result<(), RepoError> {
        lock(&self.state)
            .announcements
            .insert((a.user_id.clone(), a.sequence_id.clone()), a.clone());
        Ok(())
    }

    async fn get_announcement(
        &self,
        user_id: &str,
        sequence_id: &str,
    ) -> Result<Option<Announcement>, RepoError> {
        Ok(lock(&self.state)
            .announcements
            .get(&(user_id.to_string(), sequence_id.to_string()))
            .cloned())
    }

    async fn replace_sequence_if(
        &self,
        seq: &crate::model::SequenceRecord,
        expected: crate::model::SequenceState,
    ) -> Result<(), RepoError> {
        let mut st = lock(&self.state);
        let k = (seq.user_id.clone(), seq.sequence_id.clone());
        match st.sequences.get(&k) {
            Some(s) if s.state == expected => {
                st.sequences.insert(k, seq.clone());
                Ok(())
            }
            other => Err(RepoError::ConditionFailed(format!(
                "sequence {}/{} is {:?}, not {}",
                seq.user_id,
                seq.sequence_id,
                other.map(|s| s.state.as_str()),
                expected.as_str()
            ))),
        }
    }

    async fn delete_sequence_records(
        &self,
        user_id: &str,
        sequence_id: &str,
        upload_ids: &[String],
    ) -> Result<(), RepoError> {
        let mut st = lock(&self.state);
        st.images.retain(|(u, _), _| !upload_ids.contains(u));
        st.upload_events.retain(|(u, _), _| !upload_ids.contains(u));
        st.uploads
            .retain(|(u, s, _), _| !(u == user_id && s == sequence_id));
        let k = (user_id.to_string(), sequence_id.to_string());
        st.announcements.remove(&k);
        st.sequences.remove(&k);
        Ok(())
    }

    async fn delete_sequence_claim(&self, claim_id: &str) -> Result<(), RepoError> {
        lock(&self.state).deleted_claims.push(claim_id.to_string());
        Ok(())
    }
}
