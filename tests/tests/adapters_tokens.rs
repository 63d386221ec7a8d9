//! `KmsTokenStore` against real moto DynamoDB and KMS (a stack of `infra/template.yaml`).

use std::collections::HashMap;

use anyhow::{Context, Result};
use aws_sdk_dynamodb::types::AttributeValue;
use integration_tests::moto::shared_moto;
use integration_tests::stack::{self, LocalStack};
use secrecy::{ExposeSecret, SecretString};
use shared::adapters::tokens::KmsTokenStore;
use shared::model::StoredToken;
use shared::ports::{ConnectionReader, TokenError, TokenStore};
use time::macros::datetime;

const ACCESS: &str = "MLYARB-access-7f3c2a9e1d5b4c8a";
const REFRESH: &str = "MLYARB-refresh-0b1c2d3e4f5a6b7c";

async fn new_stack(tag: &str) -> Result<(LocalStack, KmsTokenStore)> {
    let endpoint = shared_moto()?;
    let stack = LocalStack::create(&endpoint, &stack::unique_stack_name(tag)).await?;
    let store = KmsTokenStore::new(
        stack.dynamodb(),
        stack.kms(),
        &stack.users_table,
        &stack.token_key_id,
    );
    Ok((stack, store))
}

fn token() -> StoredToken {
    StoredToken {
        access_token: SecretString::from(ACCESS),
        refresh_token: Some(SecretString::from(REFRESH)),
        expires_at: Some(datetime!(2026-05-01 00:00:00 UTC)),
        mapillary_user_id: Some("1029384756".into()),
        username: Some("relay-tester".into()),
        updated_at: datetime!(2026-03-01 09:30:15.5 UTC),
    }
}

async fn raw_item(stack: &LocalStack, user: &str) -> Result<HashMap<String, AttributeValue>> {
    stack
        .dynamodb()
        .get_item()
        .table_name(&stack.users_table)
        .key("pk", AttributeValue::S(format!("USER#{user}")))
        .key("sk", AttributeValue::S("MAPILLARY".into()))
        .send()
        .await?
        .item
        .context("token item missing")
}

/// Every byte of an attribute value, to look for the plaintext in it.
fn bytes_of(value: &AttributeValue) -> Vec<u8> {
    match value {
        AttributeValue::S(s) | AttributeValue::N(s) => s.as_bytes().to_vec(),
        AttributeValue::B(b) => b.as_ref().to_vec(),
        other => format!("{other:?}").into_bytes(),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn tokens_round_trip_encrypted_under_the_user_context() -> Result<()> {
    let (stack, store) = new_stack("tokens").await?;
    assert!(store.load("alice").await?.is_none());

    store.save("alice", &token()).await?;
    let loaded = store.load("alice").await?.context("token saved")?;
    assert_eq!(loaded.access_token.expose_secret(), ACCESS);
    assert_eq!(
        loaded.refresh_token.as_ref().map(|t| t.expose_secret()),
        Some(REFRESH)
    );
    assert_eq!(loaded.expires_at, token().expires_at);
    assert_eq!(loaded.mapillary_user_id.as_deref(), Some("1029384756"));
    assert_eq!(loaded.username.as_deref(), Some("relay-tester"));
    assert_eq!(loaded.updated_at, token().updated_at);
    // Debug output of what the store returns never shows the secrets.
    let debug = format!("{loaded:?}");
    assert!(!debug.contains(ACCESS) && !debug.contains(REFRESH), "{debug}");

    // The stored item holds no plaintext anywhere (checked on every attribute's bytes, including the
    // ciphertext blob), and no numeric `expires_at` for the table's TTL to delete the item by.
    let item = raw_item(&stack, "alice").await?;
    for (name, value) in &item {
        let bytes = bytes_of(value);
        assert!(!contains(&bytes, ACCESS.as_bytes()), "access token in {name}");
        assert!(!contains(&bytes, REFRESH.as_bytes()), "refresh token in {name}");
    }
    assert!(matches!(item.get("ciphertext"), Some(AttributeValue::B(b)) if b.as_ref().len() > 32));
    assert!(!item.contains_key("expires_at"), "{:?}", item.keys());
    assert_eq!(
        item.get("token_expires_at")
            .and_then(|v| v.as_s().ok())
            .map(String::as_str),
        Some("2026-05-01T00:00:00Z")
    );

    // The ciphertext is bound to its user: copied to another user's item, it does not decrypt.
    let mut stolen = item.clone();
    stolen.insert("pk".into(), AttributeValue::S("USER#mallory".into()));
    stack
        .dynamodb()
        .put_item()
        .table_name(&stack.users_table)
        .set_item(Some(stolen))
        .send()
        .await?;
    match store.load("mallory").await {
        Err(e @ TokenError::Corrupt(_)) => {
            assert!(!e.is_transient());
            let msg = e.to_string();
            assert!(!msg.contains(ACCESS) && !msg.contains(REFRESH), "{msg}");
        }
        other => panic!(
            "expected Corrupt, got {:?}",
            other.map(|t| t.map(|t| t.updated_at))
        ),
    }

    // Replacing the token (e.g. after a refresh) without the optional parts.
    let refreshed = StoredToken {
        access_token: SecretString::from("MLYARB-second-access"),
        refresh_token: None,
        expires_at: None,
        mapillary_user_id: None,
        username: None,
        updated_at: datetime!(2026-03-02 00:00:00 UTC),
    };
    store.save("alice", &refreshed).await?;
    let loaded = store.load("alice").await?.context("token saved")?;
    assert_eq!(loaded.access_token.expose_secret(), "MLYARB-second-access");
    assert!(loaded.refresh_token.is_none());
    assert_eq!(loaded.expires_at, None);
    assert_eq!(loaded.mapillary_user_id, None);
    assert_eq!(loaded.updated_at, refreshed.updated_at);
    let item = raw_item(&stack, "alice").await?;
    assert!(!item.contains_key("token_expires_at") && !item.contains_key("username"));
    Ok(())
}

#[tokio::test]
async fn damaged_items_are_corrupt_not_panics() -> Result<()> {
    let (stack, store) = new_stack("tokens-bad").await?;
    let put = |user: &str, extra: Vec<(&str, AttributeValue)>| {
        let mut req = stack
            .dynamodb()
            .put_item()
            .table_name(&stack.users_table)
            .item("pk", AttributeValue::S(format!("USER#{user}")))
            .item("sk", AttributeValue::S("MAPILLARY".into()))
            .item("updated_at", AttributeValue::S("2026-03-01T00:00:00Z".into()));
        for (k, v) in extra {
            req = req.item(k, v);
        }
        req.send()
    };
    put("no-ciphertext", vec![]).await?;
    put(
        "not-binary",
        vec![("ciphertext", AttributeValue::S("abc".into()))],
    )
    .await?;
    // A real ciphertext with one bit flipped (fails KMS's authentication).
    store.save("tampered", &token()).await?;
    let mut blob = match raw_item(&stack, "tampered").await?.remove("ciphertext") {
        Some(AttributeValue::B(b)) => b.into_inner(),
        other => panic!("no ciphertext: {other:?}"),
    };
    let last = blob.len() - 1;
    blob[last] ^= 1;
    put(
        "tampered",
        vec![(
            "ciphertext",
            AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(blob)),
        )],
    )
    .await?;
    for user in ["no-ciphertext", "not-binary", "tampered"] {
        let got = store.load(user).await;
        assert!(matches!(got, Err(TokenError::Corrupt(_))), "{user}: {got:?}");
    }

    // Valid ciphertext, broken clear attributes.
    store.save("bad-time", &token()).await?;
    stack
        .dynamodb()
        .update_item()
        .table_name(&stack.users_table)
        .key("pk", AttributeValue::S("USER#bad-time".into()))
        .key("sk", AttributeValue::S("MAPILLARY".into()))
        .update_expression("SET token_expires_at = :t")
        .expression_attribute_values(":t", AttributeValue::S("tomorrow".into()))
        .send()
        .await?;
    assert!(matches!(
        store.load("bad-time").await,
        Err(TokenError::Corrupt(_))
    ));

    // A key that does not exist is a configuration error, not corruption.
    let wrong_key = KmsTokenStore::new(stack.dynamodb(), stack.kms(), &stack.users_table, "no-such-key");
    let err = wrong_key.save("alice", &token()).await.expect_err("no such key");
    assert!(matches!(err, TokenError::Other(_)), "{err:?}");
    assert!(!err.to_string().contains(ACCESS));
    Ok(())
}

#[tokio::test]
async fn many_tokens_load_in_batches_in_the_order_asked() -> Result<()> {
    let (_stack, store) = new_stack("tokens-many").await?;
    // 230 users (three BatchGetItems), every third without a token, one asked twice.
    let users: Vec<String> = (0..230).map(|i| format!("user-{i:03}")).collect();
    for (i, u) in users.iter().enumerate() {
        if i % 3 != 0 {
            let mut t = token();
            t.access_token = SecretString::from(format!("{ACCESS}-{i}"));
            store.save(u, &t).await?;
        }
    }
    let mut asked = users.clone();
    asked.push("user-005".into());
    let got = store.load_many(&asked).await;
    assert_eq!(got.len(), asked.len());
    for (i, (u, r)) in asked.iter().zip(got).enumerate() {
        let i = if i == 230 { 5 } else { i };
        match r? {
            None => assert_eq!(i % 3, 0, "{u} has a token"),
            Some(t) => {
                assert_ne!(i % 3, 0, "{u} has no token");
                assert_eq!(t.access_token.expose_secret(), format!("{ACCESS}-{i}"), "{u}");
                assert_eq!(t.mapillary_user_id.as_deref(), Some("1029384756"));
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn connection_metadata_is_read_in_clear_without_decrypting() -> Result<()> {
    // Issue 15, item 3: the status API shows a connection without being able to decrypt tokens.
    let (stack, store) = new_stack("tokens-meta").await?;
    assert!(store.load_connection("alice").await?.is_none());
    store.save("alice", &token()).await?;
    // A store whose KMS cannot be reached still reads the metadata (no KMS call is made), while
    // loading the token itself fails.
    let unreachable_kms = aws_sdk_kms::Client::from_conf(
        aws_sdk_kms::config::Builder::from(stack.sdk_config())
            .endpoint_url("http://127.0.0.1:1")
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .build(),
    );
    let no_key = KmsTokenStore::new(
        stack.dynamodb(),
        unreachable_kms,
        &stack.users_table,
        &stack.token_key_id,
    );
    assert!(no_key.load("alice").await.is_err());
    let meta = no_key.load_connection("alice").await?.context("metadata")?;
    assert_eq!(meta, token().metadata());
    // And the same through the real store.
    assert_eq!(store.load_connection("alice").await?, Some(token().metadata()));
    Ok(())
}
