//! [`OAuthStateStore`] over DynamoDB (UsersTable).
//!
//! Item pk `STATE#<state>`, sk `STATE`, `user_id`, `verifier_sha256` (S, hex SHA-256 of the
//! browser-binding cookie), `created_at` (S, RFC 3339) and `expires_at` (N, epoch seconds: the
//! table's TTL attribute, so DynamoDB removes stale items by itself).
//! TTL deletion is lazy (up to days late), so expiry is also part of the consume condition.
//! Consuming is one `DeleteItem` with a condition: only one caller can ever win a given state.

use aws_sdk_dynamodb::types::{ReturnValue, ReturnValuesOnConditionCheckFailure};
use time::OffsetDateTime;

use super::item::{condition_failed, n, number_of, repo_error, rfc3339, s, string_of};
use crate::ports::{OAuthState, OAuthStateStore, RepoError, StateOutcome};

/// Sort key of a state item.
pub const STATE_SK: &str = "STATE";

/// Partition key of a state item.
pub fn state_pk(state: &str) -> String {
    format!("STATE#{state}")
}

/// OAuth states in the UsersTable.
#[derive(Debug, Clone)]
pub struct DynamoStateStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl DynamoStateStore {
    /// States in `table` (the UsersTable, TTL attribute `expires_at`).
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }
}

/// The state value is not logged in full: a prefix is enough to correlate and cannot be replayed.
fn short(state: &str) -> &str {
    let mut end = state.len().min(6);
    while !state.is_char_boundary(end) {
        end -= 1;
    }
    &state[..end]
}

impl OAuthStateStore for DynamoStateStore {
    async fn create(&self, state: &OAuthState) -> Result<(), RepoError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(state_pk(&state.state)))
            .item("sk", s(STATE_SK))
            .item("user_id", s(&state.user_id))
            .item("verifier_sha256", s(&state.verifier_sha256))
            .item("created_at", s(rfc3339(state.created_at)?))
            .item("expires_at", n(state.expires_at.unix_timestamp()))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await
            .map_err(|e| repo_error(&e, &format!("PutItem state {}…", short(&state.state))))?;
        Ok(())
    }

    async fn consume(
        &self,
        state: &str,
        expected_user: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<StateOutcome, RepoError> {
        let mut req = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(state_pk(state)))
            .key("sk", s(STATE_SK))
            .expression_attribute_names("#exp", "expires_at")
            .expression_attribute_values(":now", n(now.unix_timestamp()))
            .return_values(ReturnValue::AllOld)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        req = match expected_user {
            Some(user) => req
                .condition_expression("attribute_exists(pk) AND #exp > :now AND #user = :user")
                .expression_attribute_names("#user", "user_id")
                .expression_attribute_values(":user", s(user)),
            None => req.condition_expression("attribute_exists(pk) AND #exp > :now"),
        };
        match req.send().await {
            Ok(out) => {
                let attributes = out.attributes.as_ref();
                let user_id = attributes
                    .and_then(|a| string_of(a, "user_id"))
                    .map(str::to_string)
                    .ok_or_else(|| RepoError::Corrupt(format!("state {}… has no user_id", short(state))))?;
                let verifier_sha256 = attributes
                    .and_then(|a| string_of(a, "verifier_sha256"))
                    .map(str::to_string);
                Ok(StateOutcome::Consumed {
                    user_id,
                    verifier_sha256,
                })
            }
            Err(err) => {
                let Some(old) = condition_failed(&err) else {
                    return Err(repo_error(&err, &format!("DeleteItem state {}…", short(state))));
                };
                let Some(old) = old else {
                    return Ok(StateOutcome::Unknown);
                };
                let expires = number_of::<i64>(&old, "expires_at");
                let owner = string_of(&old, "user_id");
                Ok(match expires {
                    Some(e) if e <= now.unix_timestamp() => StateOutcome::Expired,
                    _ if expected_user.is_some() && owner != expected_user => StateOutcome::Foreign,
                    // The item changed between the check and now (cannot happen for a single
                    // delete, but never report success without having deleted it).
                    _ => StateOutcome::Unknown,
                })
            }
        }
    }
}
