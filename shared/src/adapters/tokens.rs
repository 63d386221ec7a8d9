//! [`TokenStore`] over DynamoDB (UsersTable) and KMS.
//!
//! Item pk `USER#<user_id>`, sk `MAPILLARY`:
//! * `ciphertext` (B): KMS `Encrypt` of the JSON `{"access_token", "refresh_token"}` under the
//!   EncryptionContext `{"user_id": <user_id>}`, so a ciphertext copied to another user's item does
//!   not decrypt;
//! * `token_expires_at` (S, RFC 3339), `mapillary_user_id`, `username`, `updated_at` (S) in clear;
//! * `token_kind` (S, `oauth` | `upload_token`; absent in items written before kinds existed, which
//!   hold OAuth tokens), `upload_refused_at` / `upload_refused_message` (S) once uploads with the
//!   OAuth token were refused, `refresh_lease_until` (S) while a session refreshes;
//! * `revision` (S): a fresh UUID on every write. The relay's own writes (refresh, user id, upload
//!   refusal) are conditional on the revision they read, so they never overwrite a newer record and a
//!   `DeleteItem` always wins over a refresh in flight (the condition fails on a missing item).
//!
//! Item pk `MLYUSER#<mapillary user id>`, sk `OWNER` ([`AccountClaims`]): `user_id`, `claimed_at`
//! (S) — the relay user whose connection uses that Mapillary account. Written in one
//! `TransactWriteItems` with the token item (a `Put` conditional on the claim being free or the
//! same user's), released in one with the token item's deletion (a `Delete` conditional on the
//! user holding it); connecting another account releases the previous account's claim in the same
//! transaction.
//!
//! The clear attributes are what the status API shows ([`ConnectionReader`]): it reads them without
//! a KMS `Decrypt`, so its role has no `kms:Decrypt` on the token key.
//!
//! The expiry is deliberately **not** stored as `expires_at`: that is the UsersTable's TTL attribute,
//! and a numeric token expiry there would make DynamoDB delete the item (and with it the refresh
//! token) once the access token expires.
//!
//! Plaintext leaves this module only as [`SecretString`]; decrypted buffers are zeroized, and error
//! messages never quote decrypted content.

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, TransactWriteItem};
use aws_sdk_kms::primitives::Blob;
use secrecy::zeroize::Zeroize;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

mod webhooks;

pub use webhooks::WEBHOOK_SK;

use super::aws_error::{classify, AwsFailure};
use super::dynamodb::batch::batch_get;
use super::dynamodb::item::{key, s, string_of, Item};
use crate::model::{
    CasOutcome, ConnectOutcome, ConnectionMetadata, StoredToken, TokenKind, TokenRecord, UploadRefusal,
};
use crate::ports::{AccountClaims, ConnectionReader, TokenError, TokenStore};

/// Sort key of the Mapillary token item.
pub const TOKEN_SK: &str = "MAPILLARY";
/// Encryption context key bound to every ciphertext.
pub const CONTEXT_KEY: &str = "user_id";

/// KMS-encrypted Mapillary tokens in the UsersTable.
#[derive(Debug, Clone)]
pub struct KmsTokenStore {
    dynamodb: aws_sdk_dynamodb::Client,
    kms: aws_sdk_kms::Client,
    table: String,
    key_id: String,
}

impl KmsTokenStore {
    /// Tokens in `table`, encrypted with the KMS key `key_id` (id, ARN or alias).
    pub fn new(
        dynamodb: aws_sdk_dynamodb::Client,
        kms: aws_sdk_kms::Client,
        table: impl Into<String>,
        key_id: impl Into<String>,
    ) -> Self {
        Self {
            dynamodb,
            kms,
            table: table.into(),
            key_id: key_id.into(),
        }
    }
}

/// Partition key of a user's items.
pub fn user_pk(user_id: &str) -> String {
    format!("USER#{user_id}")
}

/// Sort key of a Mapillary account's claim.
pub const CLAIM_SK: &str = "OWNER";

/// Partition key of the claim of Mapillary account `mapillary_user_id` (see [`AccountClaims`]).
pub fn claim_pk(mapillary_user_id: &str) -> String {
    format!("MLYUSER#{mapillary_user_id}")
}

/// The encrypted part, borrowed for serialization (no copies of the secrets besides the buffer).
#[derive(Serialize)]
struct PayloadRef<'a> {
    access_token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<&'a str>,
}

/// The decrypted part. No `Debug`: it holds secrets until moved into `SecretString`s.
#[derive(Deserialize)]
struct Payload {
    access_token: String,
    #[serde(default)]
    refresh_token: Option<String>,
}

fn token_error(f: AwsFailure, what: &str) -> TokenError {
    let msg = format!("{what}: {}", f.detail);
    if f.transient {
        TokenError::Transient(msg)
    } else {
        TokenError::Other(msg)
    }
}

fn string_attr(item: &Item, name: &str) -> Result<Option<String>, TokenError> {
    match item.get(name) {
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(AttributeValue::S(s)) => Ok(Some(s.clone())),
        Some(_) => Err(TokenError::Corrupt(format!("attribute {name} is not a string"))),
    }
}

fn time_attr(item: &Item, name: &str) -> Result<Option<OffsetDateTime>, TokenError> {
    string_attr(item, name)?
        .map(|s| {
            OffsetDateTime::parse(&s, &Rfc3339)
                .map_err(|e| TokenError::Corrupt(format!("attribute {name} is not RFC 3339 ({s:?}): {e}")))
        })
        .transpose()
}

fn rfc3339(t: OffsetDateTime) -> Result<String, TokenError> {
    t.format(&Rfc3339)
        .map_err(|e| TokenError::Other(format!("formatting a timestamp: {e}")))
}

/// The clear attributes of a token item.
fn metadata_of(user_id: &str, item: &Item) -> Result<ConnectionMetadata, TokenError> {
    let kind = match string_attr(item, "token_kind")? {
        None => TokenKind::Oauth,
        Some(k) => TokenKind::parse(&k).ok_or_else(|| {
            TokenError::Corrupt(format!(
                "token item of user {user_id} has an unknown token_kind {k:?}"
            ))
        })?,
    };
    let upload_refused = match time_attr(item, "upload_refused_at")? {
        None => None,
        Some(at) => Some(UploadRefusal {
            at,
            message: string_attr(item, "upload_refused_message")?.unwrap_or_default(),
        }),
    };
    Ok(ConnectionMetadata {
        expires_at: time_attr(item, "token_expires_at")?,
        mapillary_user_id: string_attr(item, "mapillary_user_id")?,
        username: string_attr(item, "username")?,
        updated_at: time_attr(item, "updated_at")?
            .ok_or_else(|| TokenError::Corrupt(format!("token item of user {user_id} has no updated_at")))?,
        kind,
        upload_refused,
    })
}

/// Attributes [`ConnectionReader::load_connection`] reads (never the ciphertext).
const METADATA_ATTRIBUTES: [&str; 7] = [
    "token_expires_at",
    "mapillary_user_id",
    "username",
    "updated_at",
    "token_kind",
    "upload_refused_at",
    "upload_refused_message",
];

impl KmsTokenStore {
    /// A consistent `GetItem` of (`pk`, `sk`) reading only `attributes` (every attribute when empty);
    /// `what` names it in errors.
    async fn get_consistent(
        &self,
        pk: String,
        sk: &str,
        attributes: &[&str],
        what: impl FnOnce() -> String,
    ) -> Result<Option<Item>, TokenError> {
        let mut req = self
            .dynamodb
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(pk, sk)))
            .consistent_read(true);
        if !attributes.is_empty() {
            let projection: Vec<String> = attributes.iter().map(|a| format!("#{a}")).collect();
            req = req.projection_expression(projection.join(", "));
            for a in attributes {
                req = req.expression_attribute_names(format!("#{a}"), *a);
            }
        }
        let out = req.send().await.map_err(|e| token_error(classify(&e), &what()))?;
        Ok(out.item)
    }

    /// Decrypt and decode one token item.
    async fn decrypt_item(&self, user_id: &str, item: Item) -> Result<TokenRecord, TokenError> {
        let ciphertext = match item.get("ciphertext") {
            Some(AttributeValue::B(blob)) => blob.clone(),
            _ => {
                return Err(TokenError::Corrupt(format!(
                    "token item of user {user_id} has no binary ciphertext"
                )))
            }
        };
        let decrypted = self
            .kms
            .decrypt()
            .key_id(&self.key_id)
            .ciphertext_blob(ciphertext)
            .encryption_context(CONTEXT_KEY, user_id)
            .send()
            .await
            .map_err(|e| {
                let f = classify(&e);
                let what = format!("KMS Decrypt token of user {user_id}");
                if ["InvalidCiphertextException", "IncorrectKeyException"]
                    .iter()
                    .any(|c| f.has_code(c))
                {
                    TokenError::Corrupt(format!("{what}: {}", f.detail))
                } else {
                    token_error(f, &what)
                }
            })?;
        let mut plaintext = decrypted.plaintext.map(Blob::into_inner).ok_or_else(|| {
            TokenError::Corrupt(format!("KMS Decrypt token of user {user_id}: no plaintext"))
        })?;
        let parsed = serde_json::from_slice::<Payload>(&plaintext);
        plaintext.zeroize();
        // serde_json messages may quote the input: report only where and what kind of error it was.
        let payload = parsed.map_err(|e| {
            TokenError::Corrupt(format!(
                "decrypted token of user {user_id} is not the expected JSON ({:?} error at column {})",
                e.classify(),
                e.column()
            ))
        })?;
        let meta = metadata_of(user_id, &item)?;
        let token = StoredToken {
            access_token: SecretString::from(payload.access_token),
            refresh_token: payload.refresh_token.map(SecretString::from),
            expires_at: meta.expires_at,
            mapillary_user_id: meta.mapillary_user_id,
            username: meta.username,
            updated_at: meta.updated_at,
        };
        Ok(TokenRecord {
            token,
            kind: meta.kind,
            upload_refused: meta.upload_refused,
            refresh_lease_until: time_attr(&item, "refresh_lease_until")?,
            revision: string_attr(&item, "revision")?,
        })
    }

    /// Encrypt `record` and build its item under a fresh revision (returned).
    async fn encrypted_item(
        &self,
        user_id: &str,
        record: &TokenRecord,
    ) -> Result<(Item, String), TokenError> {
        let token = &record.token;
        // The buffer moves into the KMS request (the SDK owns it from there).
        let plaintext = serde_json::to_vec(&PayloadRef {
            access_token: token.access_token.expose_secret(),
            refresh_token: token.refresh_token.as_ref().map(|t| t.expose_secret()),
        })
        .map_err(|e| {
            TokenError::Other(format!(
                "encoding the token of user {user_id}: {:?} error",
                e.classify()
            ))
        })?;
        let blob = Blob::new(plaintext);
        let encrypted = self
            .kms
            .encrypt()
            .key_id(&self.key_id)
            .plaintext(blob)
            .encryption_context(CONTEXT_KEY, user_id)
            .send()
            .await
            .map_err(|e| token_error(classify(&e), &format!("KMS Encrypt token of user {user_id}")))?;
        let ciphertext = encrypted.ciphertext_blob.ok_or_else(|| {
            TokenError::Other(format!("KMS Encrypt token of user {user_id}: no ciphertext"))
        })?;
        let revision = uuid::Uuid::new_v4().to_string();
        let mut item = key(user_pk(user_id), TOKEN_SK);
        item.insert("user_id".into(), s(user_id));
        item.insert("ciphertext".into(), AttributeValue::B(ciphertext));
        item.insert("updated_at".into(), s(rfc3339(token.updated_at)?));
        item.insert("token_kind".into(), s(record.kind.as_str()));
        item.insert("revision".into(), s(&revision));
        if let Some(key_id) = encrypted.key_id {
            item.insert("kms_key_id".into(), s(key_id));
        }
        if let Some(expires_at) = token.expires_at {
            item.insert("token_expires_at".into(), s(rfc3339(expires_at)?));
        }
        if let Some(id) = &token.mapillary_user_id {
            item.insert("mapillary_user_id".into(), s(id));
        }
        if let Some(name) = &token.username {
            item.insert("username".into(), s(name));
        }
        if let Some(r) = &record.upload_refused {
            item.insert("upload_refused_at".into(), s(rfc3339(r.at)?));
            item.insert("upload_refused_message".into(), s(&r.message));
        }
        if let Some(until) = record.refresh_lease_until {
            item.insert("refresh_lease_until".into(), s(rfc3339(until)?));
        }
        Ok((item, revision))
    }

    /// Encrypt `record` and build its PutItem under a fresh revision (returned).
    async fn put_request(
        &self,
        user_id: &str,
        record: &TokenRecord,
    ) -> Result<
        (
            aws_sdk_dynamodb::operation::put_item::builders::PutItemFluentBuilder,
            String,
        ),
        TokenError,
    > {
        let (item, revision) = self.encrypted_item(user_id, record).await?;
        let req = self
            .dynamodb
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item));
        Ok((req, revision))
    }

    /// The `mapillary_user_id` of the user's token item (clear attribute), if any.
    async fn connected_account(&self, user_id: &str) -> Result<Option<Option<String>>, TokenError> {
        let item = self
            .get_consistent(user_pk(user_id), TOKEN_SK, &["pk", "mapillary_user_id"], || {
                format!("GetItem token of user {user_id}")
            })
            .await?;
        item.map(|item| string_attr(&item, "mapillary_user_id"))
            .transpose()
    }

    /// The claim item of Mapillary account `mapillary_user_id` held by `user_id`.
    fn claim_put(
        &self,
        user_id: &str,
        mapillary_user_id: &str,
        at: OffsetDateTime,
    ) -> Result<TransactWriteItem, TokenError> {
        let mut item = key(claim_pk(mapillary_user_id), CLAIM_SK);
        item.insert("user_id".into(), s(user_id));
        item.insert("claimed_at".into(), s(rfc3339(at)?));
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            // Free, or already this user's.
            .condition_expression("attribute_not_exists(pk) OR #user = :user")
            .expression_attribute_names("#user", "user_id")
            .expression_attribute_values(":user", s(user_id))
            .build()
            .map_err(|e| TokenError::Other(format!("building the claim put: {e}")))?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// Release of the claim of `mapillary_user_id`, only if `user_id` holds it.
    fn claim_release(&self, user_id: &str, mapillary_user_id: &str) -> Result<TransactWriteItem, TokenError> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(key(claim_pk(mapillary_user_id), CLAIM_SK)))
            .condition_expression("#user = :user")
            .expression_attribute_names("#user", "user_id")
            .expression_attribute_values(":user", s(user_id))
            .build()
            .map_err(|e| TokenError::Other(format!("building the claim release: {e}")))?;
        Ok(TransactWriteItem::builder().delete(delete).build())
    }

    /// `TransactWriteItems` of `items`: `Ok(None)` when written, `Ok(Some(codes))` when DynamoDB
    /// cancelled it with these per-item reasons (`"None"` for items that were fine).
    async fn transact(
        &self,
        items: Vec<TransactWriteItem>,
        what: &str,
    ) -> Result<Option<Vec<String>>, TokenError> {
        match self
            .dynamodb
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
        {
            Ok(_) => Ok(None),
            Err(e) => {
                if let Some(TransactWriteItemsError::TransactionCanceledException(c)) = e.as_service_error() {
                    let codes: Vec<String> = c
                        .cancellation_reasons()
                        .iter()
                        .map(|r| r.code().unwrap_or("None").to_string())
                        .collect();
                    // A conflict with a concurrent write, or throttling: worth another try.
                    if codes.iter().any(|c| {
                        matches!(
                            c.as_str(),
                            "TransactionConflict" | "ThrottlingError" | "ProvisionedThroughputExceeded"
                        )
                    }) {
                        return Err(TokenError::Transient(format!(
                            "{what}: cancelled ({})",
                            codes.join(", ")
                        )));
                    }
                    if !codes.is_empty() {
                        return Ok(Some(codes));
                    }
                }
                Err(token_error(classify(&e), what))
            }
        }
    }
}

impl TokenStore for KmsTokenStore {
    async fn load_record(&self, user_id: &str) -> Result<Option<TokenRecord>, TokenError> {
        let item = self
            .get_consistent(user_pk(user_id), TOKEN_SK, &[], || {
                format!("GetItem token of user {user_id}")
            })
            .await?;
        let Some(item) = item else {
            return Ok(None);
        };
        self.decrypt_item(user_id, item).await.map(Some)
    }

    async fn load_many(&self, user_ids: &[String]) -> Vec<Result<Option<StoredToken>, TokenError>> {
        use futures::StreamExt;
        // The items in BatchGetItems; then one KMS Decrypt each (KMS has no batch call).
        let mut unique: Vec<&String> = user_ids.iter().collect();
        unique.sort();
        unique.dedup();
        let keys = unique.iter().map(|id| key(user_pk(id), TOKEN_SK)).collect();
        let mut items: HashMap<String, Item> = HashMap::new();
        let failed = match batch_get(&self.dynamodb, &self.table, keys, None).await {
            Ok(found) => {
                for item in found {
                    let id = string_of(&item, "pk").and_then(|pk| pk.strip_prefix("USER#"));
                    if let Some(id) = id.map(str::to_string) {
                        items.insert(id, item);
                    }
                }
                false
            }
            Err(_) => true,
        };
        let work: Vec<(String, Option<Item>)> = user_ids
            .iter()
            .map(|id| (id.clone(), items.get(id).cloned()))
            .collect();
        futures::stream::iter(work)
            .map(|(id, item)| async move {
                match item {
                    Some(item) => self.decrypt_item(&id, item).await.map(|r| Some(r.token)),
                    // Not found by a batch read that worked: the user has no token. Else read it alone.
                    None if !failed => Ok(None),
                    None => self.load(&id).await,
                }
            })
            .buffered(8)
            .collect()
            .await
    }

    async fn put_record(&self, user_id: &str, record: &TokenRecord) -> Result<String, TokenError> {
        let (req, revision) = self.put_request(user_id, record).await?;
        req.send()
            .await
            .map_err(|e| token_error(classify(&e), &format!("PutItem token of user {user_id}")))?;
        Ok(revision)
    }

    async fn replace_if(
        &self,
        user_id: &str,
        record: &TokenRecord,
        expected: Option<&str>,
    ) -> Result<CasOutcome, TokenError> {
        let (req, revision) = self.put_request(user_id, record).await?;
        // A missing item fails both conditions: a deleted connection is never written back.
        let req = match expected {
            Some(rev) => req
                .condition_expression("#rev = :rev")
                .expression_attribute_names("#rev", "revision")
                .expression_attribute_values(":rev", s(rev)),
            None => req
                .condition_expression("attribute_exists(pk) AND attribute_not_exists(#rev)")
                .expression_attribute_names("#rev", "revision"),
        };
        match req.send().await {
            Ok(_) => Ok(CasOutcome::Written(revision)),
            Err(e) => {
                let f = classify(&e);
                if f.has_code("ConditionalCheckFailedException") {
                    Ok(CasOutcome::Conflict)
                } else {
                    Err(token_error(
                        f,
                        &format!("conditional PutItem token of user {user_id}"),
                    ))
                }
            }
        }
    }

    async fn delete(&self, user_id: &str) -> Result<bool, TokenError> {
        // The claim of the account the record names is released in the same transaction, when
        // this user holds it (an unclaimed connection, e.g. of a shared account, just goes).
        if let Some(Some(account)) = self.connected_account(user_id).await? {
            let token = Delete::builder()
                .table_name(&self.table)
                .set_key(Some(key(user_pk(user_id), TOKEN_SK)))
                .condition_expression("attribute_exists(pk)")
                .build()
                .map_err(|e| TokenError::Other(format!("building the token delete: {e}")))?;
            let items = vec![
                TransactWriteItem::builder().delete(token).build(),
                self.claim_release(user_id, &account)?,
            ];
            let what = format!("TransactWriteItems delete token of user {user_id}");
            match self.transact(items, &what).await? {
                None => return Ok(true),
                // Deleted meanwhile (by a concurrent DELETE, which released the claim).
                Some(codes) if codes.first().is_some_and(|c| c == "ConditionalCheckFailed") => {
                    return Ok(false)
                }
                // The claim is not this user's: delete the token alone.
                Some(_) => {}
            }
        }
        let out = self
            .dynamodb
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(user_pk(user_id), TOKEN_SK)))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| token_error(classify(&e), &format!("DeleteItem token of user {user_id}")))?;
        // Only the presence of the old item is looked at (it holds the ciphertext).
        Ok(out.attributes.is_some_and(|a| !a.is_empty()))
    }
}

impl AccountClaims for KmsTokenStore {
    async fn put_connection(
        &self,
        user_id: &str,
        record: &TokenRecord,
        claim: bool,
    ) -> Result<ConnectOutcome, TokenError> {
        let account = record.token.mapillary_user_id.as_deref();
        let previous = self
            .connected_account(user_id)
            .await?
            .flatten()
            .filter(|p| Some(p.as_str()) != account);
        if previous.is_none() && !(claim && account.is_some()) {
            return self
                .put_record(user_id, record)
                .await
                .map(ConnectOutcome::Connected);
        }
        let (item, revision) = self.encrypted_item(user_id, record).await?;
        let token = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .build()
            .map_err(|e| TokenError::Other(format!("building the token put: {e}")))?;
        let mut items = vec![TransactWriteItem::builder().put(token).build()];
        let mut claim_at = None;
        if let Some(account) = account.filter(|_| claim) {
            claim_at = Some(items.len());
            items.push(self.claim_put(user_id, account, record.token.updated_at)?);
        }
        let mut release_at = None;
        if let Some(previous) = &previous {
            release_at = Some(items.len());
            items.push(self.claim_release(user_id, previous)?);
        }
        let what = format!("TransactWriteItems token and account claim of user {user_id}");
        loop {
            let codes = match self.transact(items.clone(), &what).await? {
                None => return Ok(ConnectOutcome::Connected(revision)),
                Some(codes) => codes,
            };
            let failed = |i: Option<usize>| {
                i.and_then(|i| codes.get(i))
                    .is_some_and(|c| c == "ConditionalCheckFailed")
            };
            if failed(claim_at) {
                return Ok(ConnectOutcome::AccountTaken);
            }
            if let Some(i) = release_at.filter(|_| failed(release_at)) {
                // The previous account's claim is not this user's (e.g. connected while shared
                // accounts were allowed): leave it, store the new connection.
                items.remove(i);
                release_at = None;
                continue;
            }
            return Err(TokenError::Other(format!(
                "{what}: cancelled ({})",
                codes.join(", ")
            )));
        }
    }

    async fn claim_holder(&self, mapillary_user_id: &str) -> Result<Option<String>, TokenError> {
        let item = self
            .get_consistent(claim_pk(mapillary_user_id), CLAIM_SK, &[], || {
                "GetItem Mapillary account claim".to_owned()
            })
            .await?;
        item.map(|item| string_attr(&item, "user_id"))
            .transpose()
            .map(Option::flatten)
    }
}

impl ConnectionReader for KmsTokenStore {
    async fn load_connection(&self, user_id: &str) -> Result<Option<ConnectionMetadata>, TokenError> {
        let item = self
            .get_consistent(user_pk(user_id), TOKEN_SK, &METADATA_ATTRIBUTES, || {
                format!("GetItem connection of user {user_id}")
            })
            .await?;
        // A projection of an existing item always holds `updated_at`, which every save writes.
        item.map(|item| metadata_of(user_id, &item)).transpose()
    }
}
