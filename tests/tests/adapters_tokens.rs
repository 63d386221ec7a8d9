//! `KmsTokenStore` against real moto DynamoDB and KMS (a stack of `infra/template.yaml`).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use aws_sdk_dynamodb::types::AttributeValue;
use integration_tests::moto::shared_moto;
use integration_tests::stack::{self, LocalStack};
use mapillary_sim::defaults::{APP_ID, CLIENT_SECRET, DEMO_USER_ID};
use mapillary_sim::{SimConfig, SimHandle, Simulator, World as SimWorld};
use secrecy::{ExposeSecret, SecretString};
use shared::adapters::tokens::KmsTokenStore;
use shared::mapillary::app::MapillaryApp;
use shared::mapillary::client::MapillaryClient;
use shared::mapillary::retry::RetryPolicy;
use shared::mapillary::session::{SessionContext, SessionError, TokenSession};
use shared::mapillary::Endpoints;
use shared::model::{CasOutcome, StoredToken, TokenKind, TokenRecord, UploadRefusal};
use shared::ports::{ConnectionReader, TokenError, TokenStore};
use time::macros::datetime;
use time::OffsetDateTime;

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
    assert_eq!(meta, TokenRecord::new(token(), TokenKind::Oauth).metadata());
    // And the same through the real store.
    assert_eq!(
        store.load_connection("alice").await?,
        Some(TokenRecord::new(token(), TokenKind::Oauth).metadata())
    );
    Ok(())
}

#[tokio::test]
async fn records_keep_their_kind_and_writes_are_a_compare_and_set_on_the_revision() -> Result<()> {
    let (stack, store) = new_stack("tokens-cas").await?;
    // An item from before kinds and revisions: read as OAuth, replaced only while still revision-less.
    store.save("legacy", &token()).await?;
    stack
        .dynamodb()
        .update_item()
        .table_name(&stack.users_table)
        .key("pk", AttributeValue::S("USER#legacy".into()))
        .key("sk", AttributeValue::S("MAPILLARY".into()))
        .update_expression("REMOVE #r, token_kind")
        .expression_attribute_names("#r", "revision")
        .send()
        .await?;
    let old = store.load_record("legacy").await?.context("legacy")?;
    assert_eq!((old.kind, old.revision.as_deref()), (TokenKind::Oauth, None));
    let CasOutcome::Written(rev) = store.replace_if("legacy", &old, None).await? else {
        panic!("a revision-less item is replaced over `None`")
    };
    assert_eq!(
        store.replace_if("legacy", &old, None).await?,
        CasOutcome::Conflict
    );

    // An upload token with a refusal note and a lease round-trips.
    let mut up = TokenRecord::new(token(), TokenKind::UploadToken);
    up.upload_refused = Some(UploadRefusal {
        at: datetime!(2026-03-03 10:00:00 UTC),
        message: "not authorized to upload".into(),
    });
    up.refresh_lease_until = Some(datetime!(2026-03-03 10:00:30 UTC));
    let rev2 = store.replace_if("legacy", &up, Some(&rev)).await?;
    let CasOutcome::Written(rev2) = rev2 else {
        panic!("written over the current revision")
    };
    let got = store.load_record("legacy").await?.context("record")?;
    assert_eq!(got.kind, TokenKind::UploadToken);
    assert_eq!(got.upload_refused, up.upload_refused);
    assert_eq!(got.refresh_lease_until, up.refresh_lease_until);
    assert_eq!(got.revision.as_deref(), Some(rev2.as_str()));
    // The kind and the refusal are clear metadata: the status API reads them without decrypting.
    let meta = store.load_connection("legacy").await?.context("metadata")?;
    assert_eq!(meta.kind, TokenKind::UploadToken);
    assert_eq!(meta.upload_refused, up.upload_refused);
    assert_eq!(
        raw_item(&stack, "legacy").await?["token_kind"]
            .as_s()
            .ok()
            .map(String::as_str),
        Some("upload_token")
    );
    // A stale revision loses; a deleted record is never written back.
    assert_eq!(
        store.replace_if("legacy", &up, Some(&rev)).await?,
        CasOutcome::Conflict
    );
    assert!(store.delete("legacy").await?);
    assert_eq!(
        store.replace_if("legacy", &up, Some(&rev2)).await?,
        CasOutcome::Conflict
    );
    assert!(store.load_record("legacy").await?.is_none());
    Ok(())
}

/// The simulator in `refresh-revokes` and a token of the demo user that expires within the margin.
async fn revoking_sim() -> Result<(SimHandle, MapillaryApp, String)> {
    let sim = Simulator::start(SimConfig::world(SimWorld::RefreshRevokes), "127.0.0.1:0").await?;
    let http = reqwest::Client::new();
    let t: serde_json::Value = http
        .post(format!("{}/tokens", sim.admin_url()))
        .json(&serde_json::json!({"user": DEMO_USER_ID, "oauth": true}))
        .send()
        .await?
        .json()
        .await?;
    let access = t["access_token"].as_str().context("token")?.to_string();
    let app = MapillaryApp::new(
        MapillaryClient::new(Endpoints::under(sim.base_url()), http, RetryPolicy::fast()),
        APP_ID,
        SecretString::from(CLIENT_SECRET),
    );
    Ok((sim, app, access))
}

fn expiring(access: &str) -> StoredToken {
    StoredToken {
        access_token: SecretString::from(access),
        refresh_token: None,
        expires_at: Some(OffsetDateTime::now_utc() + time::Duration::minutes(5)),
        mapillary_user_id: Some(DEMO_USER_ID.into()),
        username: None,
        updated_at: OffsetDateTime::now_utc(),
    }
}

fn token_requests(sim: &SimHandle) -> usize {
    sim.sim()
        .world()
        .request_log
        .iter()
        .filter(|e| e.method == "POST" && e.path == "/graph/token")
        .count()
}

#[tokio::test]
async fn a_refresh_race_between_two_sessions_makes_one_refresh_and_both_use_its_token() -> Result<()> {
    let (_stack, store) = new_stack("tokens-race").await?;
    let (sim, app, old) = revoking_sim().await?;
    store.save("racer", &expiring(&old)).await?;
    let ctx = SessionContext::new(&store, &app, Duration::from_secs(3600));
    // Both sessions load the same expiring token, then refresh at once.
    let mut a = TokenSession::load(ctx, "racer").await?;
    let mut b = TokenSession::load(ctx, "racer").await?;
    let (ra, rb) = tokio::join!(a.ensure_fresh(), b.ensure_fresh());
    ra?;
    rb?;
    assert_eq!(token_requests(&sim), 1, "one refresh reached Mapillary");
    let new = a.access().expose_secret().to_string();
    assert_ne!(new, old);
    assert_eq!(
        b.access().expose_secret(),
        new,
        "the loser uses the winner's token"
    );
    let stored = store.load_record("racer").await?.context("record")?;
    assert_eq!(stored.token.access_token.expose_secret(), new);
    assert!(stored.refresh_lease_until.is_none());
    // The old token is revoked (refresh-revokes); the shared new one works for both.
    assert!(app.me(&SecretString::from(old)).await.is_err());
    assert_eq!(app.me(b.access()).await?.id, DEMO_USER_ID);
    sim.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_delete_during_a_refresh_wins() -> Result<()> {
    let (_stack, store) = new_stack("tokens-delete").await?;
    let (sim, app, old) = revoking_sim().await?;
    store.save("leaver", &expiring(&old)).await?;
    // Hold the refresh in flight for a second.
    reqwest::Client::new()
        .post(format!("{}/faults", sim.admin_url()))
        .json(&serde_json::json!({"path": "/graph/token", "times": 1,
            "action": {"kind": "latency", "ms": 1000}}))
        .send()
        .await?
        .error_for_status()?;
    let ctx = SessionContext::new(&store, &app, Duration::from_secs(3600));
    let mut s = TokenSession::load(ctx, "leaver").await?;
    let delete = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.delete("leaver").await
    };
    let (refreshed, deleted) = tokio::join!(s.ensure_fresh(), delete);
    assert!(deleted?, "the record existed when DELETE ran");
    assert!(matches!(refreshed, Err(SessionError::Missing)), "{refreshed:?}");
    assert_eq!(token_requests(&sim), 1, "the refresh was in flight");
    assert!(store.load_record("leaver").await?.is_none(), "no resurrection");
    sim.shutdown().await;
    Ok(())
}
