//! [`OAuthStateStore`] in memory, with the DynamoDB adapter's consume rules.

use std::collections::HashMap;
use std::sync::Mutex;

use time::OffsetDateTime;

use super::lock;
use crate::ports::{OAuthState, OAuthStateStore, RepoError, StateOutcome};

/// OAuth states in memory, with the DynamoDB adapter's consume rules.
#[derive(Debug, Default)]
pub struct MemStates {
    /// States by value.
    pub states: Mutex<HashMap<String, OAuthState>>,
}

impl MemStates {
    /// Store a state directly (e.g. an already expired one).
    pub fn insert(&self, state: OAuthState) {
        lock(&self.states).insert(state.state.clone(), state);
    }
}

impl OAuthStateStore for MemStates {
    async fn create(&self, state: &OAuthState) -> Result<(), RepoError> {
        let mut s = lock(&self.states);
        if s.contains_key(&state.state) {
            return Err(RepoError::ConditionFailed("state exists".into()));
        }
        s.insert(state.state.clone(), state.clone());
        Ok(())
    }

    async fn consume(
        &self,
        state: &str,
        expected_user: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<StateOutcome, RepoError> {
        let mut s = lock(&self.states);
        let Some(found) = s.get(state) else {
            return Ok(StateOutcome::Unknown);
        };
        if found.expires_at.unix_timestamp() <= now.unix_timestamp() {
            return Ok(StateOutcome::Expired);
        }
        if expected_user.is_some_and(|u| u != found.user_id) {
            return Ok(StateOutcome::Foreign);
        }
        let user_id = found.user_id.clone();
        let verifier_sha256 = Some(found.verifier_sha256.clone());
        s.remove(state);
        Ok(StateOutcome::Consumed {
            user_id,
            verifier_sha256,
        })
    }
}
