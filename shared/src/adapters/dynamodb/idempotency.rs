//! [`IdempotencyStore`] over DynamoDB: the IdempotencyTable (key `id`), one item per manifest
//! claim — `id`, `status`, `lease_until_ms`, `owner`, `expiration` (the table's TTL attribute,
//! epoch s). The rules of [`crate::idempotency`] as condition expressions: a claim is one
//! conditional put (`ReturnValuesOnConditionCheckFailure=ALL_OLD`, so a refused put says who holds
//! the claim without another read), renewing and completing are conditional updates.

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{ReturnValue, ReturnValuesOnConditionCheckFailure};

use super::item::{condition_failed, decode, encode, n, number_of, repo_error, s, string_of, Item};
use crate::idempotency::{
    outcome_over, take_slot, user_slots_id, Claim, ClaimOutcome, ClaimStatus, UserSlots,
};
use crate::ports::{ClaimReader, IdempotencyStore, RepoError};

/// A user's fair-share item is kept (TTL) this long after its last lease ends.
const SLOTS_TTL_S: i64 = 24 * 3600;

/// Manifest claims in the IdempotencyTable.
#[derive(Debug, Clone)]
pub struct DynamoIdempotency {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl DynamoIdempotency {
    /// Claims in `idempotency_table`.
    pub fn new(client: aws_sdk_dynamodb::Client, idempotency_table: impl Into<String>) -> Self {
        Self {
            client,
            table: idempotency_table.into(),
        }
    }
}

/// "held by X until T" / "COMPLETED" / "missing": why a claim condition failed.
fn describe_claim(item: Option<&Item>) -> String {
    match item {
        None => "the claim does not exist".to_string(),
        Some(item) => format!(
            "the claim is {} held by {} until {} ms",
            string_of(item, "status").unwrap_or("?"),
            string_of(item, "owner").unwrap_or("?"),
            number_of::<i64>(item, "lease_until_ms").unwrap_or_default()
        ),
    }
}

impl IdempotencyStore for DynamoIdempotency {
    async fn claim(&self, claim: &Claim, now_ms: i64) -> Result<ClaimOutcome, RepoError> {
        if claim.status != ClaimStatus::Inprogress {
            return Err(RepoError::Other(format!(
                "claim {}: a new claim must be INPROGRESS, got {:?}",
                claim.id, claim.status
            )));
        }
        let item = encode(claim, &format!("claim {}", claim.id))?;
        // A lost race (the blocking item vanished between the put and the read) is retried.
        for _ in 0..3 {
            let result = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item.clone()))
                .condition_expression(
                    "attribute_not_exists(#id) OR #exp < :now_s \
                     OR (#status = :inprogress AND #lease < :now_ms)",
                )
                .expression_attribute_names("#id", "id")
                .expression_attribute_names("#exp", "expiration")
                .expression_attribute_names("#status", "status")
                .expression_attribute_names("#lease", "lease_until_ms")
                .expression_attribute_values(":now_s", n(now_ms.div_euclid(1000)))
                .expression_attribute_values(":now_ms", n(now_ms))
                .expression_attribute_values(":inprogress", s("INPROGRESS"))
                .return_values(ReturnValue::AllOld)
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                .send()
                .await;
            let err = match result {
                Ok(out) => {
                    let previous = match out.attributes.filter(|a| !a.is_empty()) {
                        Some(old) => Some(decode::<Claim>(old, &format!("claim {}", claim.id))?),
                        None => None,
                    };
                    return Ok(ClaimOutcome::Acquired {
                        // A TTL-expired COMPLETED claim is gone for DynamoDB too: nothing to resume.
                        previous: previous.filter(|p| p.status == ClaimStatus::Inprogress),
                    });
                }
                Err(err) => err,
            };
            let Some(old) = condition_failed(&err) else {
                return Err(repo_error(&err, &format!("PutItem claim {}", claim.id)));
            };
            let old = match old {
                Some(old) => Some(old),
                // Older servers do not return the item with the failure: read it.
                None => {
                    self.client
                        .get_item()
                        .table_name(&self.table)
                        .key("id", s(&claim.id))
                        .consistent_read(true)
                        .send()
                        .await
                        .map_err(|e| repo_error(&e, &format!("GetItem claim {}", claim.id)))?
                        .item
                }
            };
            let Some(old) = old else { continue };
            let old: Claim = decode(old, &format!("claim {}", claim.id))?;
            match outcome_over(Some(&old), now_ms) {
                // Free when read (its lease or TTL ran out since the put): try again.
                ClaimOutcome::Acquired { .. } => continue,
                other => return Ok(other),
            }
        }
        Err(RepoError::Transient(format!(
            "claim {}: the item kept changing under concurrent claims",
            claim.id
        )))
    }

    async fn renew_claim(&self, id: &str, owner: &str, lease_until_ms: i64) -> Result<(), RepoError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("id", s(id))
            .update_expression("SET #lease = :lease")
            .condition_expression("#status = :inprogress AND #owner = :owner")
            .expression_attribute_names("#lease", "lease_until_ms")
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":lease", n(lease_until_ms))
            .expression_attribute_values(":inprogress", s("INPROGRESS"))
            .expression_attribute_values(":owner", s(owner))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        claim_updated(result, "renew", id, owner)
    }

    async fn reopen_claim(&self, claim: &Claim) -> Result<bool, RepoError> {
        if claim.status != ClaimStatus::Inprogress {
            return Err(RepoError::Other(format!(
                "claim {}: a reopened claim must be INPROGRESS, got {:?}",
                claim.id, claim.status
            )));
        }
        let item = encode(claim, &format!("claim {}", claim.id))?;
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("#status = :completed")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":completed", s("COMPLETED"))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(err) if condition_failed(&err).is_some() => Ok(false),
            Err(err) => Err(repo_error(&err, &format!("PutItem reopen claim {}", claim.id))),
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
        let id = user_slots_id(user_id);
        // Read, decide with the rule, write conditioned on the version read; a lost race reads again.
        for _ in 0..5 {
            let stored = self
                .client
                .get_item()
                .table_name(&self.table)
                .key("id", s(&id))
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| repo_error(&e, &format!("GetItem user slots {id}")))?
                .item;
            let stored: Option<UserSlots> = match stored {
                Some(item) => Some(decode(item, &format!("user slots {id}"))?),
                None => None,
            };
            let current = stored.as_ref().map(|u| &u.slots).cloned().unwrap_or_default();
            let Some(slots) = take_slot(&current, holder, lease_until_ms, now_ms, cap) else {
                return Ok(false);
            };
            let latest = slots.values().copied().max().unwrap_or(lease_until_ms);
            let next = UserSlots {
                id: id.clone(),
                slots,
                version: stored.as_ref().map_or(0, |u| u.version) + 1,
                expiration: latest.div_euclid(1000) + SLOTS_TTL_S,
            };
            let put = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(encode(&next, &format!("user slots {id}"))?));
            let put = match &stored {
                Some(u) => put
                    .condition_expression("#version = :version")
                    .expression_attribute_names("#version", "version")
                    .expression_attribute_values(":version", n(u.version)),
                None => put
                    .condition_expression("attribute_not_exists(#id)")
                    .expression_attribute_names("#id", "id"),
            };
            match put.send().await {
                Ok(_) => return Ok(true),
                Err(err) if condition_failed(&err).is_some() => continue,
                Err(err) => return Err(repo_error(&err, &format!("PutItem user slots {id}"))),
            }
        }
        Err(RepoError::Transient(format!(
            "user slots {id}: the item kept changing under concurrent invocations"
        )))
    }

    async fn release_user_slot(&self, user_id: &str, holder: &str) -> Result<(), RepoError> {
        let id = user_slots_id(user_id);
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("id", s(&id))
            .update_expression("REMOVE #slots.#holder SET #version = #version + :one")
            .condition_expression("attribute_exists(#id)")
            .expression_attribute_names("#id", "id")
            .expression_attribute_names("#slots", "slots")
            .expression_attribute_names("#holder", holder)
            .expression_attribute_names("#version", "version")
            .expression_attribute_values(":one", n(1))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // No item: nothing held.
            Err(err) if condition_failed(&err).is_some() => Ok(()),
            Err(err) => Err(repo_error(&err, &format!("UpdateItem user slots {id}"))),
        }
    }

    async fn complete_claim(&self, id: &str, owner: &str) -> Result<(), RepoError> {
        // Completing twice by the same owner succeeds (a retried call must not fail).
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("id", s(id))
            .update_expression("SET #status = :completed")
            .condition_expression("#owner = :owner")
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":completed", s("COMPLETED"))
            .expression_attribute_values(":owner", s(owner))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        claim_updated(result, "complete", id, owner)
    }
}

impl ClaimReader for DynamoIdempotency {
    async fn get_claim(&self, id: &str) -> Result<Option<Claim>, RepoError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("id", s(id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| repo_error(&e, &format!("GetItem claim {id}")))?;
        out.item
            .map(|item| decode(item, &format!("claim {id}")))
            .transpose()
    }
}

/// The outcome of a conditional `UpdateItem` of claim `id` by `owner` (`verb`: what it did, for the
/// error): a failed condition says whose claim it is now.
fn claim_updated<T>(
    result: Result<T, SdkError<UpdateItemError, HttpResponse>>,
    verb: &str,
    id: &str,
    owner: &str,
) -> Result<(), RepoError> {
    match result {
        Ok(_) => Ok(()),
        Err(err) => match condition_failed(&err) {
            Some(old) => Err(RepoError::ConditionFailed(format!(
                "{verb} claim {id} for {owner}: {}",
                describe_claim(old.as_ref())
            ))),
            None => Err(repo_error(&err, &format!("UpdateItem claim {id}"))),
        },
    }
}
