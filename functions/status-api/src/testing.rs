//! In-memory fakes of the tracking and OAuth-state ports (they follow the port docs).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use shared::model::{FeedHealth, ImageLink, TrackingRecord};
use shared::ports::{OAuthState, OAuthStateStore, RepoError, StateOutcome, TrackingRepository};
use time::OffsetDateTime;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tracking records, links and feed health in memory.
#[derive(Debug, Default)]
pub struct MemTracking {
    /// Records by upload id.
    pub records: Mutex<HashMap<String, TrackingRecord>>,
    /// Links by (upload id, index).
    pub links: Mutex<BTreeMap<(String, u32), ImageLink>>,
    /// Feed health.
    pub health: Mutex<Option<FeedHealth>>,
}

impl TrackingRepository for MemTracking {
    async fn create_tracking(&self, record: &TrackingRecord) -> Result<bool, RepoError> {
        let mut r = lock(&self.records);
        if r.contains_key(&record.upload_id) {
            return Ok(false);
        }
        r.insert(record.upload_id.clone(), record.clone());
        Ok(true)
    }

    async fn update_tracking(
        &self,
        record: &TrackingRecord,
        expected_last_checked_at: Option<OffsetDateTime>,
    ) -> Result<(), RepoError> {
        let mut r = lock(&self.records);
        match r.get(&record.upload_id) {
            Some(old) if old.tracked.last_checked_at == expected_last_checked_at => {
                r.insert(record.upload_id.clone(), record.clone());
                Ok(())
            }
            _ => Err(RepoError::ConditionFailed(format!(
                "tracking {}",
                record.upload_id
            ))),
        }
    }

    async fn get_tracking(&self, upload_id: &str) -> Result<Option<TrackingRecord>, RepoError> {
        Ok(lock(&self.records).get(upload_id).cloned())
    }

    async fn list_pending_tracking(&self) -> Result<Vec<TrackingRecord>, RepoError> {
        Ok(lock(&self.records)
            .values()
            .filter(|r| !r.tracked.state.is_final())
            .cloned()
            .collect())
    }

    async fn put_links(&self, links: &[ImageLink]) -> Result<(), RepoError> {
        let mut l = lock(&self.links);
        for link in links {
            l.insert((link.upload_id.clone(), link.index), link.clone());
        }
        Ok(())
    }

    async fn list_links(&self, upload_id: &str) -> Result<Vec<ImageLink>, RepoError> {
        Ok(lock(&self.links)
            .iter()
            .filter(|((u, _), _)| u == upload_id)
            .map(|(_, v)| v.clone())
            .collect())
    }

    async fn get_feed_health(&self) -> Result<Option<FeedHealth>, RepoError> {
        Ok(lock(&self.health).clone())
    }

    async fn put_feed_health(&self, health: &FeedHealth) -> Result<(), RepoError> {
        *lock(&self.health) = Some(health.clone());
        Ok(())
    }
}

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
        s.remove(state);
        Ok(StateOutcome::Consumed { user_id })
    }
}
