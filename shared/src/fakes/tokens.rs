//! [`TokenStore`] in memory, with the revision compare-and-set of the DynamoDB store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use secrecy::SecretString;

use super::lock;
use crate::model::{CasOutcome, ConnectOutcome, ConnectionMetadata, StoredToken, TokenKind, TokenRecord};
use crate::ports::{AccountClaims, ConnectionReader, TokenError, TokenStore, WebhookRegistry};
use crate::webhook::WebhookRecord;

/// Token store in memory (no encryption: nothing leaves the process).
#[derive(Debug, Default)]
pub struct MemTokens {
    /// Records by user id.
    pub records: Mutex<HashMap<String, TokenRecord>>,
    /// Mapillary account claims: Mapillary user id → relay user id.
    pub claims: Mutex<HashMap<String, String>>,
    /// Number of records written (`put_record`, successful `replace_if`), not counting the writes
    /// that only take a refresh lease.
    pub saves: AtomicU64,
    revisions: AtomicU64,
    /// Webhook registrations by user id, with their secrets.
    pub webhooks: Mutex<HashMap<String, (WebhookRecord, SecretString)>>,
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
        let removed = lock(&self.records).remove(user_id);
        // As the DynamoDB store: the claim of the account the record named goes with it, if held.
        if let Some(account) = removed
            .as_ref()
            .and_then(|r| r.token.mapillary_user_id.as_deref())
        {
            let mut claims = lock(&self.claims);
            if claims.get(account).is_some_and(|holder| holder == user_id) {
                claims.remove(account);
            }
        }
        Ok(removed.is_some())
    }
}

impl AccountClaims for MemTokens {
    async fn put_connection(
        &self,
        user_id: &str,
        record: &TokenRecord,
        claim: bool,
    ) -> Result<ConnectOutcome, TokenError> {
        let account = record.token.mapillary_user_id.clone();
        {
            let mut claims = lock(&self.claims);
            if let Some(account) = account.as_ref().filter(|_| claim) {
                if claims.get(account).is_some_and(|holder| holder != user_id) {
                    return Ok(ConnectOutcome::AccountTaken);
                }
            }
            let previous = lock(&self.records)
                .get(user_id)
                .and_then(|r| r.token.mapillary_user_id.clone());
            if let Some(previous) = previous.filter(|p| Some(p) != account.as_ref()) {
                if claims.get(&previous).is_some_and(|holder| holder == user_id) {
                    claims.remove(&previous);
                }
            }
            if let Some(account) = account.filter(|_| claim) {
                claims.insert(account, user_id.to_string());
            }
        }
        self.put_record(user_id, record)
            .await
            .map(ConnectOutcome::Connected)
    }

    async fn claim_holder(&self, mapillary_user_id: &str) -> Result<Option<String>, TokenError> {
        Ok(lock(&self.claims).get(mapillary_user_id).cloned())
    }
}

impl WebhookRegistry for MemTokens {
    async fn put_webhook(&self, record: &WebhookRecord, secret: &SecretString) -> Result<(), TokenError> {
        lock(&self.webhooks).insert(record.user_id.clone(), (record.clone(), secret.clone()));
        Ok(())
    }

    async fn get_webhook(&self, user_id: &str) -> Result<Option<WebhookRecord>, TokenError> {
        Ok(lock(&self.webhooks).get(user_id).map(|(r, _)| r.clone()))
    }

    async fn delete_webhook(&self, user_id: &str) -> Result<bool, TokenError> {
        Ok(lock(&self.webhooks).remove(user_id).is_some())
    }

    async fn webhook_secret(&self, record: &WebhookRecord) -> Result<Option<SecretString>, TokenError> {
        Ok(lock(&self.webhooks)
            .get(&record.user_id)
            .filter(|(r, _)| r.registration_id == record.registration_id)
            .map(|(_, s)| s.clone()))
    }

    async fn save_webhook_state(&self, record: &WebhookRecord) -> Result<bool, TokenError> {
        let mut w = lock(&self.webhooks);
        match w.get_mut(&record.user_id) {
            Some((r, _)) if r.registration_id == record.registration_id => {
                *r = record.clone();
                Ok(true)
            }
            _ => Ok(false),
        }
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

    fn of_account(t: &str, account: &str) -> TokenRecord {
        let mut tok = token(t);
        tok.mapillary_user_id = Some(account.into());
        TokenRecord::new(tok, TokenKind::Oauth)
    }

    #[tokio::test]
    async fn a_mapillary_account_is_claimed_by_one_user_until_released() {
        let s = MemTokens::new();
        assert!(matches!(
            s.put_connection("amy", &of_account("a", "mly-1"), true)
                .await
                .unwrap(),
            ConnectOutcome::Connected(_)
        ));
        // The same user again: fine. Another user: refused, nothing written.
        assert!(matches!(
            s.put_connection("amy", &of_account("a2", "mly-1"), true)
                .await
                .unwrap(),
            ConnectOutcome::Connected(_)
        ));
        assert_eq!(
            s.put_connection("bob", &of_account("b", "mly-1"), true)
                .await
                .unwrap(),
            ConnectOutcome::AccountTaken
        );
        assert!(s.record("bob").is_none());
        assert_eq!(s.claim_holder("mly-1").await.unwrap().as_deref(), Some("amy"));
        // Amy moves to another account: the first one is free for Bob.
        assert!(matches!(
            s.put_connection("amy", &of_account("a3", "mly-2"), true)
                .await
                .unwrap(),
            ConnectOutcome::Connected(_)
        ));
        assert_eq!(s.claim_holder("mly-1").await.unwrap(), None);
        assert!(matches!(
            s.put_connection("bob", &of_account("b", "mly-1"), true)
                .await
                .unwrap(),
            ConnectOutcome::Connected(_)
        ));
        // Deleting releases.
        assert!(s.delete("amy").await.unwrap());
        assert_eq!(s.claim_holder("mly-2").await.unwrap(), None);
        assert_eq!(s.claim_holder("mly-1").await.unwrap().as_deref(), Some("bob"));
        // Unclaimed (shared accounts allowed): stored beside Bob's claim, which stays his; moving
        // on still releases the mover's own previous claim.
        assert!(matches!(
            s.put_connection("amy", &of_account("a4", "mly-1"), false)
                .await
                .unwrap(),
            ConnectOutcome::Connected(_)
        ));
        assert_eq!(s.claim_holder("mly-1").await.unwrap().as_deref(), Some("bob"));
        assert!(matches!(
            s.put_connection("bob", &of_account("b2", "mly-3"), false)
                .await
                .unwrap(),
            ConnectOutcome::Connected(_)
        ));
        assert_eq!(s.claim_holder("mly-1").await.unwrap(), None);
        assert_eq!(s.claim_holder("mly-3").await.unwrap(), None);
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
