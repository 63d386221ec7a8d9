//! [`TokenStore`] in memory, with the revision compare-and-set of the DynamoDB store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::lock;
use crate::model::{CasOutcome, ConnectionMetadata, StoredToken, TokenKind, TokenRecord};
use crate::ports::{ConnectionReader, TokenError, TokenStore};

/// Token store in memory (no encryption: nothing leaves the process).
#[derive(Debug, Default)]
pub struct MemTokens {
    /// Records by user id.
    pub records: Mutex<HashMap<String, TokenRecord>>,
    /// Number of records written (`put_record`, successful `replace_if`), not counting the writes
    /// that only take a refresh lease.
    pub saves: AtomicU64,
    revisions: AtomicU64,
}

impl MemTokens {
    /// Empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Store an OAuth token directly.
    pub fn insert(&self, user_id: &str, token: StoredToken) {
        self.insert_record(user_id, TokenRecord::new(token, TokenKind::Oauth));
    }

    /// Store a record directly (a fresh revision is assigned).
    pub fn insert_record(&self, user_id: &str, mut record: TokenRecord) {
        record.revision = Some(self.next_revision());
        lock(&self.records).insert(user_id.into(), record);
    }

    /// The user's token, if any.
    pub fn get(&self, user_id: &str) -> Option<StoredToken> {
        lock(&self.records).get(user_id).map(|r| r.token.clone())
    }

    /// The user's record, if any.
    pub fn record(&self, user_id: &str) -> Option<TokenRecord> {
        lock(&self.records).get(user_id).cloned()
    }

    fn count(&self, record: &TokenRecord) {
        if record.refresh_lease_until.is_none() {
            self.saves.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn next_revision(&self) -> String {
        format!("rev-{}", self.revisions.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

impl TokenStore for MemTokens {
    async fn load_record(&self, user_id: &str) -> Result<Option<TokenRecord>, TokenError> {
        Ok(self.record(user_id))
    }

    async fn put_record(&self, user_id: &str, record: &TokenRecord) -> Result<String, TokenError> {
        self.count(record);
        let rev = self.next_revision();
        let mut r = record.clone();
        r.revision = Some(rev.clone());
        lock(&self.records).insert(user_id.into(), r);
        Ok(rev)
    }

    async fn replace_if(
        &self,
        user_id: &str,
        record: &TokenRecord,
        expected: Option<&str>,
    ) -> Result<CasOutcome, TokenError> {
        let mut records = lock(&self.records);
        match records.get(user_id) {
            Some(current) if current.revision.as_deref() == expected => {
                self.count(record);
                let rev = self.next_revision();
                let mut r = record.clone();
                r.revision = Some(rev.clone());
                records.insert(user_id.into(), r);
                Ok(CasOutcome::Written(rev))
            }
            _ => Ok(CasOutcome::Conflict),
        }
    }

    async fn delete(&self, user_id: &str) -> Result<bool, TokenError> {
        Ok(lock(&self.records).remove(user_id).is_some())
    }
}

impl ConnectionReader for MemTokens {
    async fn load_connection(&self, user_id: &str) -> Result<Option<ConnectionMetadata>, TokenError> {
        Ok(lock(&self.records).get(user_id).map(TokenRecord::metadata))
    }
}

#[cfg(test)]
mod tests {
    use secrecy::{ExposeSecret, SecretString};
    use time::OffsetDateTime;

    use super::*;

    fn token(t: &str) -> StoredToken {
        StoredToken {
            access_token: SecretString::from(t),
            refresh_token: None,
            expires_at: None,
            mapillary_user_id: None,
            username: None,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[tokio::test]
    async fn replace_if_writes_only_over_the_revision_read_and_never_recreates_a_deleted_record() {
        let s = MemTokens::new();
        s.save("u", &token("a")).await.unwrap();
        let read = s.load_record("u").await.unwrap().expect("record");
        assert_eq!(read.kind, TokenKind::Oauth);
        let mut next = read.clone();
        next.token = token("b");
        let rev = match s.replace_if("u", &next, read.revision.as_deref()).await.unwrap() {
            CasOutcome::Written(rev) => rev,
            CasOutcome::Conflict => panic!("first write over the revision read"),
        };
        assert_ne!(Some(rev.as_str()), read.revision.as_deref());
        // The same expectation again: the record moved on.
        assert_eq!(
            s.replace_if("u", &next, read.revision.as_deref()).await.unwrap(),
            CasOutcome::Conflict
        );
        assert_eq!(s.get("u").unwrap().access_token.expose_secret(), "b");
        assert!(s.delete("u").await.unwrap());
        assert_eq!(
            s.replace_if("u", &next, Some(&rev)).await.unwrap(),
            CasOutcome::Conflict
        );
        assert!(s.load("u").await.unwrap().is_none(), "no resurrection");
    }
}
