//! [`TokenStore`] in memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::lock;
use crate::model::{ConnectionMetadata, StoredToken};
use crate::ports::{ConnectionReader, TokenError, TokenStore};

/// Token store in memory (no encryption: nothing leaves the process).
#[derive(Debug, Default)]
pub struct MemTokens {
    /// Tokens by user id.
    pub tokens: Mutex<HashMap<String, StoredToken>>,
    /// Number of `save` calls.
    pub saves: AtomicU64,
}

impl MemTokens {
    /// Empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Store a token directly.
    pub fn insert(&self, user_id: &str, token: StoredToken) {
        lock(&self.tokens).insert(user_id.into(), token);
    }
}

impl TokenStore for MemTokens {
    async fn load(&self, user_id: &str) -> Result<Option<StoredToken>, TokenError> {
        Ok(lock(&self.tokens).get(user_id).cloned())
    }

    async fn save(&self, user_id: &str, token: &StoredToken) -> Result<(), TokenError> {
        self.saves.fetch_add(1, Ordering::Relaxed);
        lock(&self.tokens).insert(user_id.into(), token.clone());
        Ok(())
    }

    async fn delete(&self, user_id: &str) -> Result<bool, TokenError> {
        Ok(lock(&self.tokens).remove(user_id).is_some())
    }
}

impl ConnectionReader for MemTokens {
    async fn load_connection(&self, user_id: &str) -> Result<Option<ConnectionMetadata>, TokenError> {
        Ok(lock(&self.tokens).get(user_id).map(StoredToken::metadata))
    }
}
