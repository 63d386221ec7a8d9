//! [`IdempotencyStore`] in memory: the claims of [`crate::idempotency`], decided by the same rules
//! the DynamoDB adapter states as condition expressions.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use super::lock;
use crate::idempotency::{
    may_complete, may_renew, may_reopen, outcome_over, take_slot, Claim, ClaimOutcome, ClaimStatus,
};
use crate::ports::{ClaimReader, IdempotencyStore, RepoError};

/// Manifest claims in memory, with the rules of [`crate::idempotency`].
#[derive(Debug, Default)]
pub struct MemClaims {
    /// Claims by id (tests may inspect and edit them, e.g. to end a lease).
    pub claims: Mutex<HashMap<String, Claim>>,
    /// Fair-share slots: user → holder → end of lease (epoch ms).
    pub user_slots: Mutex<HashMap<String, BTreeMap<String, i64>>>,
}

impl MemClaims {
    /// No claims.
    pub fn new() -> Self {
        Self::default()
    }
}

impl ClaimReader for MemClaims {
    async fn get_claim(&self, id: &str) -> Result<Option<Claim>, RepoError> {
        Ok(lock(&self.claims).get(id).cloned())
    }
}

impl IdempotencyStore for MemClaims {
    async fn claim(&self, claim: &Claim, now_ms: i64) -> Result<ClaimOutcome, RepoError> {
        if claim.status != ClaimStatus::Inprogress {
            return Err(RepoError::Other(format!(
                "claim {}: a new claim must be INPROGRESS, got {:?}",
                claim.id, claim.status
            )));
        }
        let mut claims = lock(&self.claims);
        let outcome = outcome_over(claims.get(&claim.id), now_ms);
        if matches!(outcome, ClaimOutcome::Acquired { .. }) {
            claims.insert(claim.id.clone(), claim.clone());
        }
        Ok(outcome)
    }

    async fn renew_claim(&self, id: &str, owner: &str, lease_until_ms: i64) -> Result<(), RepoError> {
        match lock(&self.claims).get_mut(id) {
            Some(c) if may_renew(c, owner) => {
                c.lease_until_ms = lease_until_ms;
                Ok(())
            }
            _ => Err(RepoError::ConditionFailed(format!(
                "claim {id} not held by {owner}"
            ))),
        }
    }

    async fn reopen_claim(&self, claim: &Claim) -> Result<bool, RepoError> {
        if claim.status != ClaimStatus::Inprogress {
            return Err(RepoError::Other(format!(
                "claim {}: a reopened claim must be INPROGRESS, got {:?}",
                claim.id, claim.status
            )));
        }
        let mut claims = lock(&self.claims);
        match claims.get_mut(&claim.id) {
            Some(c) if may_reopen(c) => {
                *c = claim.clone();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn take_user_slot(
        &self,
        user_id: &str,
        holder: &str,
        lease_until_ms: i64,
        now_ms: i64,
        cap: u32,
    ) -> Result<bool, RepoError> {
        let mut all = lock(&self.user_slots);
        let slots = all.entry(user_id.to_string()).or_default();
        match take_slot(slots, holder, lease_until_ms, now_ms, cap) {
            Some(next) => {
                *slots = next;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn release_user_slot(&self, user_id: &str, holder: &str) -> Result<(), RepoError> {
        if let Some(slots) = lock(&self.user_slots).get_mut(user_id) {
            slots.remove(holder);
        }
        Ok(())
    }

    async fn complete_claim(&self, id: &str, owner: &str) -> Result<(), RepoError> {
        match lock(&self.claims).get_mut(id) {
            Some(c) if may_complete(c, owner) => {
                c.status = ClaimStatus::Completed;
                Ok(())
            }
            _ => Err(RepoError::ConditionFailed(format!(
                "claim {id} not held by {owner}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(id: &str, owner: &str, lease_until_ms: i64) -> Claim {
        Claim {
            id: id.into(),
            status: ClaimStatus::Inprogress,
            lease_until_ms,
            owner: owner.into(),
            expiration: 4_000_000_000,
        }
    }

    // The protocol `tests/tests/adapters_dynamo.rs` asserts against DynamoDB.
    #[tokio::test]
    async fn claims_follow_the_lease_protocol() {
        let claims = MemClaims::new();
        let now = 1_000_000_000_000i64;
        assert_eq!(
            claims.claim(&claim("m", "a", now + 60_000), now).await.unwrap(),
            ClaimOutcome::Acquired { previous: None }
        );
        assert_eq!(
            claims
                .claim(&claim("m", "b", now + 90_000), now + 60_000)
                .await
                .unwrap(),
            ClaimOutcome::Held {
                lease_until_ms: now + 60_000
            }
        );
        // Only the holder renews.
        assert!(matches!(
            claims.renew_claim("m", "b", now + 120_000).await,
            Err(RepoError::ConditionFailed(_))
        ));
        claims.renew_claim("m", "a", now + 120_000).await.unwrap();
        // After the lease, the next attempt takes over and learns what it resumes.
        let taken = claims
            .claim(&claim("m", "c", now + 300_000), now + 120_001)
            .await
            .unwrap();
        assert_eq!(
            taken,
            ClaimOutcome::Acquired {
                previous: Some(claim("m", "a", now + 120_000))
            }
        );
        // The old holder lost it.
        assert!(claims.renew_claim("m", "a", now).await.is_err());
        assert!(claims.complete_claim("m", "a").await.is_err());
        // Completed: duplicates from then on; completing again succeeds; no more renewing.
        claims.complete_claim("m", "c").await.unwrap();
        claims.complete_claim("m", "c").await.unwrap();
        assert_eq!(
            claims
                .claim(&claim("m", "d", now + 999_000), now + 900_000)
                .await
                .unwrap(),
            ClaimOutcome::Completed
        );
        assert!(claims.renew_claim("m", "c", now).await.is_err());
        // A completed claim is reopened once: the second reopen finds it INPROGRESS.
        assert!(claims
            .reopen_claim(&claim("m", "e", now + 990_000))
            .await
            .unwrap());
        assert!(!claims
            .reopen_claim(&claim("m", "f", now + 990_000))
            .await
            .unwrap());
        assert!(!claims.reopen_claim(&claim("missing", "f", now)).await.unwrap());
        claims.renew_claim("m", "e", now + 995_000).await.unwrap();
        assert!(
            claims.renew_claim("m", "c", now).await.is_err(),
            "the old holder lost it"
        );
        // Fair-share slots: two per user here; released or expired slots are free again.
        assert!(claims.take_user_slot("u", "h1", now + 10, now, 2).await.unwrap());
        assert!(claims.take_user_slot("u", "h2", now + 10, now, 2).await.unwrap());
        assert!(!claims.take_user_slot("u", "h3", now + 10, now, 2).await.unwrap());
        assert!(
            claims.take_user_slot("v", "h3", now + 10, now, 2).await.unwrap(),
            "per user"
        );
        claims.release_user_slot("u", "h1").await.unwrap();
        assert!(claims.take_user_slot("u", "h3", now + 10, now, 2).await.unwrap());
        assert!(!claims
            .take_user_slot("u", "h4", now + 10, now + 10, 2)
            .await
            .unwrap());
        assert!(
            claims
                .take_user_slot("u", "h4", now + 20, now + 11, 2)
                .await
                .unwrap(),
            "leases ended"
        );
        claims.release_user_slot("nobody", "h").await.unwrap();
        // Unknown claims, and a new claim that is not INPROGRESS.
        assert!(claims.renew_claim("nope", "x", now).await.is_err());
        assert!(claims.complete_claim("nope", "x").await.is_err());
        let bad = Claim {
            status: ClaimStatus::Completed,
            ..claim("other", "x", now)
        };
        assert!(matches!(claims.claim(&bad, now).await, Err(RepoError::Other(_))));
        assert!(!lock(&claims.claims).contains_key("other"));
    }
}
