//! Idempotency of manifest processing, in the design of Powertools for AWS Lambda: one claim per
//! sequence (bucket and manifest key, [`sequence_claim_id`]; issue 15, item 4: a second manifest
//! version waits for the one in progress instead of running beside it) in the IdempotencyTable,
//! stored through the [`IdempotencyStore`](crate::ports::IdempotencyStore) port.
//!
//! * An attempt starts by putting an INPROGRESS claim with a lease (until the invocation's
//!   deadline plus a margin), conditionally: the put succeeds only while the claim is free
//!   ([`outcome_over`]): no claim, a claim past its TTL, or an INPROGRESS claim whose lease ran
//!   out — the last one is a crashed or timed-out attempt, and the new holder resumes its work.
//! * Otherwise the stored claim decides: COMPLETED → the manifest was processed (acknowledge the
//!   duplicate); INPROGRESS with a live lease → another invocation works on it (retry later).
//! * The holder may extend or give back its lease ([`may_renew`]: "release" is a lease that ends
//!   now), and marks the claim COMPLETED when the sequence is final ([`may_complete`]).
//! * A COMPLETED claim can be taken again ([`may_reopen`]): a manifest delivered after its
//!   sequence was final is a duplicate, a re-drop after FAILED (retry the failed uploads) or a
//!   re-drop after UPLOADED (a recorded no-op) — the sequence record tells them apart, under the
//!   claim.
//!
//! The rules are here once: the in-memory fake applies them directly, the DynamoDB adapter states
//! the same ones as condition expressions (and reads the stored claim with them when its put was
//! refused).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Status of a manifest claim in the idempotency table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClaimStatus {
    /// Someone works on it (or crashed while doing so: see the lease).
    Inprogress,
    /// Done; duplicates are acknowledged.
    Completed,
}

/// A claim of a manifest (idempotency item, key `id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// [`claim_id`] of bucket, key and etag.
    pub id: String,
    /// Status.
    pub status: ClaimStatus,
    /// Epoch ms until which an INPROGRESS claim is held by `owner`.
    pub lease_until_ms: i64,
    /// Who holds it (e.g. the Lambda request id).
    pub owner: String,
    /// TTL, epoch seconds.
    pub expiration: i64,
}

/// `sha256(bucket + "/" + key + "#" + etag)` as lowercase hex: the idempotency key of a manifest.
/// The etag is used without surrounding quotes.
pub fn claim_id(bucket: &str, key: &str, etag: &str) -> String {
    let etag = etag.trim_matches('"');
    hex::encode(Sha256::digest(format!("{bucket}/{key}#{etag}").as_bytes()))
}

/// The idempotency key of a sequence: [`claim_id`] of its manifest's bucket and key, without a
/// version — every version of `manifest.json` of a sequence takes the same claim.
pub fn sequence_claim_id(bucket: &str, manifest_key: &str) -> String {
    claim_id(bucket, manifest_key, "")
}

/// What claiming a manifest found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The caller now holds the claim (new, or an INPROGRESS claim whose lease had expired —
    /// then `previous` is that claim: a crashed or timed-out attempt to resume).
    Acquired {
        /// The expired claim that was taken over, if any.
        previous: Option<Claim>,
    },
    /// The manifest was fully processed before: acknowledge the duplicate.
    Completed,
    /// Another invocation holds a live lease until `lease_until_ms` (epoch ms): retry later.
    Held {
        /// End of the other holder's lease.
        lease_until_ms: i64,
    },
}

/// What a new claim at `now_ms` (epoch ms) meets when `stored` is the claim stored under its id:
/// [`ClaimOutcome::Acquired`] when the claim is free — nothing stored, a claim whose TTL
/// `expiration` (epoch s) is past, or an INPROGRESS claim whose lease ended before `now_ms` (a
/// lease is live up to and including its `lease_until_ms`). `previous` is the stored claim when it
/// was INPROGRESS (work to resume); a TTL-expired COMPLETED claim is gone for DynamoDB too, so
/// there is nothing to resume.
pub fn outcome_over(stored: Option<&Claim>, now_ms: i64) -> ClaimOutcome {
    let Some(c) = stored else {
        return ClaimOutcome::Acquired { previous: None };
    };
    let resumable = (c.status == ClaimStatus::Inprogress).then(|| c.clone());
    if c.expiration < now_ms.div_euclid(1000) {
        return ClaimOutcome::Acquired { previous: resumable };
    }
    match c.status {
        ClaimStatus::Completed => ClaimOutcome::Completed,
        ClaimStatus::Inprogress if c.lease_until_ms >= now_ms => ClaimOutcome::Held {
            lease_until_ms: c.lease_until_ms,
        },
        ClaimStatus::Inprogress => ClaimOutcome::Acquired { previous: resumable },
    }
}

/// Whether `owner` may set the lease of the stored claim `c` (extend it, or release it early by
/// ending it now): only while it is INPROGRESS and held by `owner`.
pub fn may_renew(c: &Claim, owner: &str) -> bool {
    c.status == ClaimStatus::Inprogress && c.owner == owner
}

/// Whether `owner` may mark the stored claim `c` COMPLETED: when it holds it. Completing twice
/// succeeds (a retried call must not fail); a claim taken over by another owner cannot be
/// completed by the one who lost it.
pub fn may_complete(c: &Claim, owner: &str) -> bool {
    c.owner == owner
}

/// Whether a new claim may replace the stored claim `c` that [`outcome_over`] found COMPLETED (a
/// delivery after the sequence was final): only while it is still COMPLETED.
pub fn may_reopen(c: &Claim) -> bool {
    c.status == ClaimStatus::Completed
}

/// The fair-share item of a user in the IdempotencyTable (key `id` = [`user_slots_id`]): the
/// invocations working on one of the user's sequences, each with the end of its lease. At most
/// `RELAY_MAX_ACTIVE_SEQUENCES_PER_USER` live slots: one user's drops cannot take all of the
/// function's concurrency. A slot ends with its holder's release, or with its lease (a crashed
/// invocation never blocks the user for longer than its claim).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSlots {
    /// [`user_slots_id`].
    pub id: String,
    /// Holder (the claim owner) → end of its lease, epoch ms.
    pub slots: std::collections::BTreeMap<String, i64>,
    /// Bumped by every write (optimistic concurrency of [`take_slot`]'s read-modify-write).
    pub version: u64,
    /// TTL, epoch seconds.
    pub expiration: i64,
}

/// The id of `user_id`'s fair-share item: a prefix no claim id (lowercase hex) has, and the hash
/// of the user id (any length, any characters).
pub fn user_slots_id(user_id: &str) -> String {
    format!("user-slots#{}", hex::encode(Sha256::digest(user_id.as_bytes())))
}

/// The slots after `holder` takes one until `lease_until_ms` at `now_ms`, with slots whose lease
/// ended before `now_ms` dropped; `None` when `cap` live slots are held by others. Taking again a
/// slot one holds renews it.
pub fn take_slot(
    slots: &std::collections::BTreeMap<String, i64>,
    holder: &str,
    lease_until_ms: i64,
    now_ms: i64,
    cap: u32,
) -> Option<std::collections::BTreeMap<String, i64>> {
    let mut live: std::collections::BTreeMap<String, i64> = slots
        .iter()
        .filter(|(h, until)| **until >= now_ms && h.as_str() != holder)
        .map(|(h, until)| (h.clone(), *until))
        .collect();
    if live.len() >= cap as usize {
        return None;
    }
    live.insert(holder.to_string(), lease_until_ms);
    Some(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(owner: &str, status: ClaimStatus, lease_until_ms: i64, expiration: i64) -> Claim {
        Claim {
            id: "id".into(),
            status,
            lease_until_ms,
            owner: owner.into(),
            expiration,
        }
    }

    #[test]
    fn claim_id_ignores_etag_quotes_and_differs_by_etag() {
        assert_eq!(claim_id("b", "k", "\"abc\""), claim_id("b", "k", "abc"));
        assert_ne!(claim_id("b", "k", "abc"), claim_id("b", "k", "abd"));
        assert_eq!(claim_id("b", "k", "e").len(), 64);
    }

    #[test]
    fn a_live_lease_holds_up_to_its_last_millisecond() {
        let now = 1_000_000_000_000;
        let c = claim("a", ClaimStatus::Inprogress, now + 60_000, 4_000_000_000);
        assert_eq!(outcome_over(None, now), ClaimOutcome::Acquired { previous: None });
        assert_eq!(
            outcome_over(Some(&c), now),
            ClaimOutcome::Held {
                lease_until_ms: now + 60_000
            }
        );
        assert!(matches!(
            outcome_over(Some(&c), now + 60_000),
            ClaimOutcome::Held { .. }
        ));
        assert_eq!(
            outcome_over(Some(&c), now + 60_001),
            ClaimOutcome::Acquired {
                previous: Some(c.clone())
            }
        );
    }

    #[test]
    fn completed_claims_stay_completed_until_their_ttl() {
        let now = 2_000_000_000_000;
        let c = claim("a", ClaimStatus::Completed, now, now / 1000 + 10);
        assert_eq!(outcome_over(Some(&c), now + 5_000), ClaimOutcome::Completed);
        // Past the TTL (DynamoDB deletes such items lazily): free, nothing to resume.
        assert_eq!(
            outcome_over(Some(&c), now + 11_000),
            ClaimOutcome::Acquired { previous: None }
        );
        // An INPROGRESS claim past its TTL but within its lease is free too, and resumed.
        let c = claim("a", ClaimStatus::Inprogress, now + 60_000, now / 1000 + 10);
        assert_eq!(
            outcome_over(Some(&c), now + 11_000),
            ClaimOutcome::Acquired {
                previous: Some(c.clone())
            }
        );
    }

    #[test]
    fn only_the_holder_renews_or_completes() {
        let c = claim("a", ClaimStatus::Inprogress, 0, 0);
        assert!(may_renew(&c, "a"));
        assert!(!may_renew(&c, "b"));
        assert!(may_complete(&c, "a"));
        assert!(!may_complete(&c, "b"));
        let done = Claim {
            status: ClaimStatus::Completed,
            ..c.clone()
        };
        assert!(!may_renew(&done, "a"), "a completed claim has no lease");
        assert!(may_complete(&done, "a"), "completing twice succeeds");
        assert!(may_reopen(&done));
        assert!(!may_reopen(&c), "an INPROGRESS claim is not reopened");
    }

    #[test]
    fn a_user_holds_at_most_cap_live_slots_and_dead_ones_free_theirs() {
        let now = 1_000_000;
        let none = std::collections::BTreeMap::new();
        let one = take_slot(&none, "a", now + 100, now, 2).expect("free");
        let two = take_slot(&one, "b", now + 100, now, 2).expect("one left");
        assert_eq!(two.len(), 2);
        assert_eq!(take_slot(&two, "c", now + 100, now, 2), None, "full");
        // A holder renews its own slot even when full.
        assert_eq!(
            take_slot(&two, "a", now + 500, now, 2).expect("own")["a"],
            now + 500
        );
        // A lease is live to its last millisecond; past it the slot is free (a crashed holder).
        assert_eq!(take_slot(&two, "c", now + 200, now + 100, 2), None);
        let after = take_slot(&two, "c", now + 300, now + 101, 2).expect("expired slots dropped");
        assert_eq!(after.keys().collect::<Vec<_>>(), ["c"]);
        assert_ne!(user_slots_id("u"), user_slots_id("v"));
        assert!(user_slots_id("u").starts_with("user-slots#"));
    }

    #[test]
    fn every_version_of_a_manifest_takes_the_claim_of_its_sequence() {
        let a = sequence_claim_id("b", "sequences/u/s/manifest.json");
        assert_eq!(a, sequence_claim_id("b", "sequences/u/s/manifest.json"));
        assert_ne!(a, sequence_claim_id("b", "sequences/u/t/manifest.json"));
        assert_ne!(a, sequence_claim_id("c", "sequences/u/s/manifest.json"));
    }
}
