//! [`WebhookRegistry`] on the token store: the webhook registration of a user beside their token.
//!
//! Item pk `USER#<user_id>`, sk `WEBHOOK`: `doc` (S, the [`WebhookRecord`] as JSON: URL and delivery
//! state, shown by the status API without a KMS call), `registration_id` (S, the condition of the
//! poller's state writes) and `ciphertext` (B): KMS `Encrypt` of the secret under the same
//! EncryptionContext `{"user_id": <user_id>}` as the tokens, so only the poller (which may decrypt)
//! can sign with it.

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kms::primitives::Blob;
use secrecy::zeroize::Zeroize;
use secrecy::{ExposeSecret, SecretString};

use super::{classify, key, s, string_of, token_error, user_pk, KmsTokenStore, CONTEXT_KEY};
use crate::ports::{TokenError, WebhookRegistry};
use crate::webhook::WebhookRecord;

/// Sort key of the webhook item.
pub const WEBHOOK_SK: &str = "WEBHOOK";

fn doc_of(record: &WebhookRecord) -> Result<String, TokenError> {
    serde_json::to_string(record).map_err(|e| TokenError::Other(format!("encoding a webhook: {e}")))
}

fn record_of(user_id: &str, item: &super::Item) -> Result<WebhookRecord, TokenError> {
    let doc = string_of(item, "doc")
        .ok_or_else(|| TokenError::Corrupt(format!("webhook item of user {user_id} has no doc")))?;
    serde_json::from_str(doc).map_err(|e| TokenError::Corrupt(format!("webhook item of user {user_id}: {e}")))
}

impl KmsTokenStore {
    async fn webhook_item(&self, user_id: &str) -> Result<Option<super::Item>, TokenError> {
        let out = self
            .dynamodb
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(user_pk(user_id), WEBHOOK_SK)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| token_error(classify(&e), &format!("GetItem webhook of user {user_id}")))?;
        Ok(out.item)
    }
}

impl WebhookRegistry for KmsTokenStore {
    async fn put_webhook(&self, record: &WebhookRecord, secret: &SecretString) -> Result<(), TokenError> {
        let user_id = record.user_id.as_str();
        let encrypted = self
            .kms
            .encrypt()
            .key_id(&self.key_id)
            .plaintext(Blob::new(secret.expose_secret().as_bytes().to_vec()))
            .encryption_context(CONTEXT_KEY, user_id)
            .send()
            .await
            .map_err(|e| {
                token_error(
                    classify(&e),
                    &format!("KMS Encrypt webhook secret of user {user_id}"),
                )
            })?;
        let ciphertext = encrypted.ciphertext_blob.ok_or_else(|| {
            TokenError::Other(format!(
                "KMS Encrypt webhook secret of user {user_id}: no ciphertext"
            ))
        })?;
        self.dynamodb
            .put_item()
            .table_name(&self.table)
            .set_item(Some(key(user_pk(user_id), WEBHOOK_SK)))
            .item("user_id", s(user_id))
            .item("doc", s(doc_of(record)?))
            .item("registration_id", s(&record.registration_id))
            .item("ciphertext", AttributeValue::B(ciphertext))
            .send()
            .await
            .map_err(|e| token_error(classify(&e), &format!("PutItem webhook of user {user_id}")))?;
        Ok(())
    }

    async fn get_webhook(&self, user_id: &str) -> Result<Option<WebhookRecord>, TokenError> {
        self.webhook_item(user_id)
            .await?
            .map(|item| record_of(user_id, &item))
            .transpose()
    }

    async fn delete_webhook(&self, user_id: &str) -> Result<bool, TokenError> {
        let out = self
            .dynamodb
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(user_pk(user_id), WEBHOOK_SK)))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| token_error(classify(&e), &format!("DeleteItem webhook of user {user_id}")))?;
        Ok(out.attributes.is_some_and(|a| !a.is_empty()))
    }

    async fn webhook_secret(&self, record: &WebhookRecord) -> Result<Option<SecretString>, TokenError> {
        let user_id = record.user_id.as_str();
        let Some(item) = self.webhook_item(user_id).await? else {
            return Ok(None);
        };
        if string_of(&item, "registration_id") != Some(record.registration_id.as_str()) {
            return Ok(None);
        }
        let Some(AttributeValue::B(ciphertext)) = item.get("ciphertext") else {
            return Err(TokenError::Corrupt(format!(
                "webhook item of user {user_id} has no binary ciphertext"
            )));
        };
        let out = self
            .kms
            .decrypt()
            .key_id(&self.key_id)
            .ciphertext_blob(ciphertext.clone())
            .encryption_context(CONTEXT_KEY, user_id)
            .send()
            .await
            .map_err(|e| {
                token_error(
                    classify(&e),
                    &format!("KMS Decrypt webhook secret of user {user_id}"),
                )
            })?;
        let mut plaintext = out.plaintext.map(Blob::into_inner).ok_or_else(|| {
            TokenError::Corrupt(format!(
                "KMS Decrypt webhook secret of user {user_id}: no plaintext"
            ))
        })?;
        let secret = String::from_utf8(plaintext.clone())
            .map_err(|_| TokenError::Corrupt(format!("webhook secret of user {user_id} is not UTF-8")));
        plaintext.zeroize();
        Ok(Some(SecretString::from(secret?)))
    }

    async fn save_webhook_state(&self, record: &WebhookRecord) -> Result<bool, TokenError> {
        let user_id = record.user_id.as_str();
        let result = self
            .dynamodb
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(user_pk(user_id), WEBHOOK_SK)))
            .update_expression("SET #doc = :doc")
            .condition_expression("#rid = :rid")
            .expression_attribute_names("#doc", "doc")
            .expression_attribute_names("#rid", "registration_id")
            .expression_attribute_values(":doc", s(doc_of(record)?))
            .expression_attribute_values(":rid", s(&record.registration_id))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) => {
                let f = classify(&e);
                if f.has_code("ConditionalCheckFailedException") {
                    Ok(false)
                } else {
                    Err(token_error(f, &format!("UpdateItem webhook of user {user_id}")))
                }
            }
        }
    }
}
