//! [`OAuthStateStore`] over DynamoDB (UsersTable).
//!
//! Item pk `STATE#<state>`, sk `STATE`, `user_id`, `created_at` (S, RFC 3339) and `expires_at`
//! (N, epoch seconds: the table's TTL attribute, so DynamoDB removes stale items by itself).
//! TTL deletion is lazy (up to days late), so expiry is also part of the consume condition.
//! Consuming is one `DeleteItem` with a condition: only one caller can ever win a given state.

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::delete_item::DeleteItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::aws_error::classify;
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

fn repo_error<E>(err: &SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>, what: &str) -> RepoError
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    let f = classify(err);
    let msg = format!("{what}: {}", f.detail);
    if f.has_code("ConditionalCheckFailedException") {
        RepoError::ConditionFailed(msg)
    } else if f.transient {
        RepoError::Transient(msg)
    } else {
        RepoError::Other(msg)
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
        let created = state
            .created_at
            .format(&Rfc3339)
            .map_err(|e| RepoError::Other(format!("formatting a timestamp: {e}")))?;
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", AttributeValue::S(state_pk(&state.state)))
            .item("sk", AttributeValue::S(STATE_SK.to_string()))
            .item("user_id", AttributeValue::S(state.user_id.clone()))
            .item("created_at", AttributeValue::S(created))
            .item(
                "expires_at",
                AttributeValue::N(state.expires_at.unix_timestamp().to_string()),
            )
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
            .key("pk", AttributeValue::S(state_pk(state)))
            .key("sk", AttributeValue::S(STATE_SK.to_string()))
            .expression_attribute_names("#exp", "expires_at")
            .expression_attribute_values(":now", AttributeValue::N(now.unix_timestamp().to_string()))
            .return_values(ReturnValue::AllOld)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        req = match expected_user {
            Some(user) => req
                .condition_expression("attribute_exists(pk) AND #exp > :now AND #user = :user")
                .expression_attribute_names("#user", "user_id")
                .expression_attribute_values(":user", AttributeValue::S(user.to_string())),
            None => req.condition_expression("attribute_exists(pk) AND #exp > :now"),
        };
        match req.send().await {
            Ok(out) => {
                let user_id = out
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get("user_id"))
                    .and_then(|v| v.as_s().ok())
                    .cloned()
                    .ok_or_else(|| RepoError::Corrupt(format!("state {}… has no user_id", short(state))))?;
                Ok(StateOutcome::Consumed { user_id })
            }
            Err(err) => {
                let old = match &err {
                    SdkError::ServiceError(ctx) => match ctx.err() {
                        DeleteItemError::ConditionalCheckFailedException(e) => {
                            Some(e.item().filter(|i| !i.is_empty()).cloned())
                        }
                        _ => None,
                    },
                    _ => None,
                };
                let Some(old) = old else {
                    return Err(repo_error(&err, &format!("DeleteItem state {}…", short(state))));
                };
                let Some(old) = old else {
                    return Ok(StateOutcome::Unknown);
                };
                let expires = old
                    .get("expires_at")
                    .and_then(|v| v.as_n().ok())
                    .and_then(|n| n.parse::<i64>().ok());
                let owner = old.get("user_id").and_then(|v| v.as_s().ok());
                Ok(match expires {
                    Some(e) if e <= now.unix_timestamp() => StateOutcome::Expired,
                    _ if expected_user.is_some() && owner.map(String::as_str) != expected_user => {
                        StateOutcome::Foreign
                    }
                    // The item changed between the check and now (cannot happen for a single
                    // delete, but never report success without having deleted it).
                    _ => StateOutcome::Unknown,
                })
            }
        }
    }
}
