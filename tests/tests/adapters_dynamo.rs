//! `DynamoRepository` and `DynamoIdempotency` against real moto DynamoDB tables (a stack of
//! `infra/template.yaml`).

use anyhow::{Context, Result};
use aws_sdk_dynamodb::types::AttributeValue;
use integration_tests::moto::shared_moto;
use integration_tests::stack::{self, LocalStack};
use shared::adapters::dynamodb::{DynamoIdempotency, DynamoRepository};
use shared::idempotency::{claim_id, Claim, ClaimOutcome, ClaimStatus};
use shared::model::{
    upload_id, EntryCheckpoint, IngestError, RejectedImage, SequenceRecord, SequenceState, UploadImage,
    UploadRecord, UploadState,
};
use shared::ports::{
    IdempotencyStore, ImageEntryReader, ImageEntryStore, IngestErrorLog, RepoError, SequenceReader,
    SequenceStore, UploadReader, UploadStore,
};
use time::macros::datetime;
use time::OffsetDateTime;

async fn new_stack(tag: &str) -> Result<(LocalStack, DynamoRepository)> {
    let endpoint = shared_moto()?;
    let stack = LocalStack::create(&endpoint, &stack::unique_stack_name(tag)).await?;
    let repo = DynamoRepository::new(stack.dynamodb(), &stack.uploads_table);
    Ok((stack, repo))
}

async fn claims_stack(tag: &str) -> Result<(LocalStack, DynamoIdempotency)> {
    let endpoint = shared_moto()?;
    let stack = LocalStack::create(&endpoint, &stack::unique_stack_name(tag)).await?;
    let claims = DynamoIdempotency::new(stack.dynamodb(), &stack.idempotency_table);
    Ok((stack, claims))
}

fn claim(id: &str, owner: &str, lease_until_ms: i64) -> Claim {
    Claim {
        id: id.to_string(),
        status: ClaimStatus::Inprogress,
        lease_until_ms,
        owner: owner.to_string(),
        // TTL far in the future unless a test says otherwise.
        expiration: 4_000_000_000,
    }
}

async fn raw_claim(
    stack: &LocalStack,
    id: &str,
) -> Result<std::collections::HashMap<String, AttributeValue>> {
    stack
        .dynamodb()
        .get_item()
        .table_name(&stack.idempotency_table)
        .key("id", AttributeValue::S(id.into()))
        .consistent_read(true)
        .send()
        .await?
        .item
        .context("claim item missing")
}

fn n_attr(item: &std::collections::HashMap<String, AttributeValue>, name: &str) -> i64 {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} in {item:?}"))
}

fn s_attr<'a>(item: &'a std::collections::HashMap<String, AttributeValue>, name: &str) -> &'a str {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .unwrap_or_else(|| panic!("{name} in {item:?}"))
}

#[tokio::test]
async fn claims_follow_the_lease_protocol() -> Result<()> {
    let (stack, claims) = claims_stack("ddb-claim").await?;
    let id = claim_id(&stack.bucket, "sequences/u/s/manifest.json", "\"etag1\"");
    let now = 1_000_000_000_000i64;

    // First claim acquires, with nothing to resume.
    assert_eq!(
        claims.claim(&claim(&id, "req-a", now + 60_000), now).await?,
        ClaimOutcome::Acquired { previous: None }
    );
    // A second invocation during the lease sees it held.
    assert_eq!(
        claims
            .claim(&claim(&id, "req-b", now + 90_000), now + 1_000)
            .await?,
        ClaimOutcome::Held {
            lease_until_ms: now + 60_000
        }
    );
    // The lease ends exactly at its `lease_until_ms`: still held at that instant.
    assert!(matches!(
        claims
            .claim(&claim(&id, "req-b", now + 90_000), now + 60_000)
            .await?,
        ClaimOutcome::Held { .. }
    ));
    let item = raw_claim(&stack, &id).await?;
    assert_eq!(s_attr(&item, "owner"), "req-a");
    assert_eq!(s_attr(&item, "status"), "INPROGRESS");
    assert_eq!(n_attr(&item, "expiration"), 4_000_000_000);

    // Only the owner may renew; renewing extends the lease.
    match claims.renew_claim(&id, "req-b", now + 120_000).await {
        Err(RepoError::ConditionFailed(msg)) => assert!(msg.contains("req-a"), "{msg}"),
        other => panic!("expected ConditionFailed, got {other:?}"),
    }
    claims.renew_claim(&id, "req-a", now + 120_000).await?;
    assert_eq!(
        n_attr(&raw_claim(&stack, &id).await?, "lease_until_ms"),
        now + 120_000
    );
    assert!(matches!(
        claims.claim(&claim(&id, "req-b", now + 200_000), now + 100_000).await?,
        ClaimOutcome::Held {
            lease_until_ms: l
        } if l == now + 120_000
    ));

    // The holder crashes: after the lease, the next delivery takes over and learns what it resumes.
    let taken = claims
        .claim(&claim(&id, "req-c", now + 300_000), now + 120_001)
        .await?;
    assert_eq!(
        taken,
        ClaimOutcome::Acquired {
            previous: Some(Claim {
                lease_until_ms: now + 120_000,
                ..claim(&id, "req-a", 0)
            })
        }
    );
    // The old holder lost it: it can neither renew nor complete.
    assert!(matches!(
        claims.renew_claim(&id, "req-a", now + 400_000).await,
        Err(RepoError::ConditionFailed(_))
    ));
    assert!(matches!(
        claims.complete_claim(&id, "req-a").await,
        Err(RepoError::ConditionFailed(_))
    ));

    // Release early (lease = now): the next claim after that instant acquires.
    claims.renew_claim(&id, "req-c", now + 130_000).await?;
    assert!(matches!(
        claims.claim(&claim(&id, "req-d", now + 400_000), now + 130_001).await?,
        ClaimOutcome::Acquired { previous: Some(Claim { ref owner, .. }) } if owner == "req-c"
    ));

    // Completed: every later delivery is a duplicate, even long after any lease.
    claims.complete_claim(&id, "req-d").await?;
    claims.complete_claim(&id, "req-d").await?; // a retried completion succeeds
    assert_eq!(s_attr(&raw_claim(&stack, &id).await?, "status"), "COMPLETED");
    assert_eq!(
        claims
            .claim(&claim(&id, "req-e", now + 999_000), now + 900_000)
            .await?,
        ClaimOutcome::Completed
    );
    // A completed claim cannot be renewed (it is no longer INPROGRESS).
    assert!(matches!(
        claims.renew_claim(&id, "req-d", now).await,
        Err(RepoError::ConditionFailed(_))
    ));

    // Unknown claims.
    match claims.renew_claim("no-such-claim", "x", now).await {
        Err(RepoError::ConditionFailed(msg)) => assert!(msg.contains("does not exist"), "{msg}"),
        other => panic!("expected ConditionFailed, got {other:?}"),
    }
    assert!(matches!(
        claims.complete_claim("no-such-claim", "x").await,
        Err(RepoError::ConditionFailed(_))
    ));
    // A claim must be INPROGRESS.
    let bad = Claim {
        status: ClaimStatus::Completed,
        ..claim("other", "x", now)
    };
    assert!(matches!(claims.claim(&bad, now).await, Err(RepoError::Other(_))));
    Ok(())
}

#[tokio::test]
async fn ttl_expired_claims_are_free_again() -> Result<()> {
    let (_stack, claims) = claims_stack("ddb-ttl").await?;
    let now = 2_000_000_000_000i64;
    // A completed claim whose TTL passed (DynamoDB deletes such items lazily).
    let id = "ttl-completed";
    let expiring = Claim {
        expiration: now / 1000 + 10,
        ..claim(id, "old", now + 1_000)
    };
    claims.claim(&expiring, now).await?;
    claims.complete_claim(id, "old").await?;
    assert_eq!(
        claims.claim(&claim(id, "new", now + 5_000), now + 5_000).await?,
        ClaimOutcome::Completed
    );
    assert_eq!(
        claims
            .claim(&claim(id, "new", now + 20_000), now + 11_000)
            .await?,
        ClaimOutcome::Acquired { previous: None }
    );
    // An INPROGRESS claim past its TTL but within its lease is taken over too, and resumed.
    let id = "ttl-inprogress";
    let expiring = Claim {
        expiration: now / 1000 + 10,
        ..claim(id, "old", now + 60_000)
    };
    claims.claim(&expiring, now).await?;
    assert!(matches!(
        claims
            .claim(&claim(id, "new", now + 90_000), now + 11_000)
            .await?,
        ClaimOutcome::Acquired { previous: Some(_) }
    ));
    Ok(())
}

#[tokio::test]
async fn concurrent_claims_have_exactly_one_winner() -> Result<()> {
    let (_stack, store) = claims_stack("ddb-race").await?;
    let now = 1_500_000_000_000i64;
    for round in 0..3 {
        let id = format!("race-{round}");
        let claims: Vec<Claim> = (0..8)
            .map(|i| claim(&id, &format!("owner-{i}"), now + 60_000 + i))
            .collect();
        let outcomes = futures::future::join_all(claims.iter().map(|c| store.claim(c, now))).await;
        let outcomes: Vec<ClaimOutcome> = outcomes.into_iter().collect::<Result<_, _>>()?;
        let winners = outcomes
            .iter()
            .filter(|o| matches!(o, ClaimOutcome::Acquired { .. }))
            .count();
        assert_eq!(winners, 1, "{outcomes:?}");
        assert!(
            outcomes.iter().all(|o| matches!(
                o,
                ClaimOutcome::Acquired { previous: None } | ClaimOutcome::Held { .. }
            )),
            "{outcomes:?}"
        );
        // Everyone who lost saw the winner's lease.
        let item = raw_claim(&_stack, &id).await?;
        let lease = n_attr(&item, "lease_until_ms");
        for o in &outcomes {
            if let ClaimOutcome::Held { lease_until_ms } = o {
                assert_eq!(*lease_until_ms, lease);
            }
        }
    }
    Ok(())
}

fn sequence(user: &str, seq: &str, rejected: Vec<RejectedImage>) -> SequenceRecord {
    SequenceRecord {
        user_id: user.into(),
        sequence_id: seq.into(),
        state: SequenceState::Uploading,
        reason: None,
        bucket: "bucket".into(),
        manifest_key: format!("sequences/{user}/{seq}/manifest.json"),
        manifest_etag: "abc123".into(),
        organization_id: Some("org-1".into()),
        image_count: 30,
        accepted_count: 28,
        upload_ids: vec![upload_id(user, seq, 0), upload_id(user, seq, 1)],
        rejected,
        created_at: datetime!(2026-03-01 10:00:00.25 UTC),
        updated_at: datetime!(2026-03-01 10:05:00 +01:00),
        attempts: 2,
        progress: Default::default(),
    }
}

fn rejected(n: usize, reason_len: usize, tag: &str) -> Vec<RejectedImage> {
    (0..n)
        .map(|i| RejectedImage {
            // Not in key order: the stored order must be the list's order.
            key: format!("{tag}/img {:05}+ü.jpg", (i * 7919) % n),
            reason: format!("{i}: {}", "r".repeat(reason_len)),
        })
        .collect()
}

async fn count_items(stack: &LocalStack, pk: &str, prefix: &str) -> Result<usize> {
    let mut pages = stack
        .dynamodb()
        .query()
        .table_name(&stack.uploads_table)
        .key_condition_expression("pk = :pk AND begins_with(sk, :p)")
        .expression_attribute_values(":pk", AttributeValue::S(pk.into()))
        .expression_attribute_values(":p", AttributeValue::S(prefix.into()))
        .into_paginator()
        .send();
    let mut count = 0;
    while let Some(page) = pages.next().await {
        count += page?.items().len();
    }
    Ok(count)
}

#[tokio::test]
async fn sequences_round_trip_with_any_number_of_rejections() -> Result<()> {
    let (stack, repo) = new_stack("ddb-seq").await?;
    assert_eq!(repo.get_sequence("u1", "s1").await?, None);

    // Small: inline.
    let small = sequence("u1", "s1", rejected(3, 20, "small"));
    repo.put_sequence(&small).await?;
    assert_eq!(repo.get_sequence("u1", "s1").await?, Some(small.clone()));
    assert_eq!(count_items(&stack, "SEQ#u1#s1", "REJECTED#").await?, 0);

    // Large (~600 KB of reasons, more than one item could hold): separate items, order kept.
    let large = SequenceRecord {
        state: SequenceState::Failed,
        reason: Some("no usable images".into()),
        ..sequence("u1", "s1", rejected(3000, 200, "large"))
    };
    repo.put_sequence(&large).await?;
    assert_eq!(repo.get_sequence("u1", "s1").await?, Some(large.clone()));
    assert_eq!(count_items(&stack, "SEQ#u1#s1", "REJECTED#").await?, 3000);

    // Replaced by a shorter large list: the surplus items are deleted.
    let shorter = sequence("u1", "s1", rejected(1200, 200, "shorter"));
    repo.put_sequence(&shorter).await?;
    assert_eq!(repo.get_sequence("u1", "s1").await?, Some(shorter));
    assert_eq!(count_items(&stack, "SEQ#u1#s1", "REJECTED#").await?, 1200);

    // Replaced by an inline list (and then by an empty one): no separate items remain.
    repo.put_sequence(&small).await?;
    assert_eq!(repo.get_sequence("u1", "s1").await?, Some(small.clone()));
    assert_eq!(count_items(&stack, "SEQ#u1#s1", "REJECTED#").await?, 0);
    let none = sequence("u1", "s1", Vec::new());
    repo.put_sequence(&none).await?;
    assert_eq!(repo.get_sequence("u1", "s1").await?, Some(none));

    // gsi1: the user's sequences, newest first, with a sortable timestamp.
    let mut later = sequence("u1", "s2", Vec::new());
    later.created_at = datetime!(2026-03-01 10:00:01 UTC);
    repo.put_sequence(&later).await?;
    repo.put_sequence(&sequence("u2", "s9", Vec::new())).await?;
    let found = stack
        .dynamodb()
        .query()
        .table_name(&stack.uploads_table)
        .index_name("gsi1")
        .key_condition_expression("gsi1pk = :p")
        .expression_attribute_values(":p", AttributeValue::S("USER#u1".into()))
        .scan_index_forward(false)
        .send()
        .await?;
    let sks: Vec<&str> = found.items().iter().map(|i| s_attr(i, "gsi1sk")).collect();
    assert_eq!(
        sks,
        [
            "SEQ#2026-03-01T10:00:01.000000Z#s2",
            "SEQ#2026-03-01T10:00:00.250000Z#s1"
        ]
    );
    Ok(())
}

fn upload(user: &str, seq: &str, index: u32, state: UploadState) -> UploadRecord {
    UploadRecord {
        user_id: user.into(),
        sequence_id: seq.into(),
        upload_id: upload_id(user, seq, index),
        index,
        state,
        session_key: format!("mly_relay_{index:032x}.zip"),
        total_len: 5_000_000_000 + u64::from(index),
        image_count: 500,
        cluster_id: None,
        handle: None,
        organization_id: None,
        bytes_sent: 0,
        created_at: datetime!(2026-03-01 10:00:00 UTC),
        started_at: None,
        finished_at: None,
        error: None,
        attempts: 1,
        outbox: Default::default(),
    }
}

async fn pending_index(stack: &LocalStack) -> Result<Vec<String>> {
    let found = stack
        .dynamodb()
        .query()
        .table_name(&stack.uploads_table)
        .index_name("gsi2")
        .key_condition_expression("gsi2pk = :p")
        .expression_attribute_values(":p", AttributeValue::S("PENDING".into()))
        .send()
        .await?;
    Ok(found
        .items()
        .iter()
        .map(|i| s_attr(i, "gsi2sk").to_string())
        .collect())
}

#[tokio::test]
async fn uploads_transition_conditionally_and_leave_the_pending_index_when_final() -> Result<()> {
    let (stack, repo) = new_stack("ddb-upl").await?;
    assert!(repo.list_uploads("u", "s").await?.is_empty());
    for i in [2, 0, 1] {
        repo.put_upload(&upload("u", "s", i, UploadState::Pending))
            .await?;
    }
    repo.put_upload(&upload("u", "other", 0, UploadState::Pending))
        .await?;
    let listed = repo.list_uploads("u", "s").await?;
    assert_eq!(listed.iter().map(|u| u.index).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(listed[1], upload("u", "s", 1, UploadState::Pending));
    let mut pending = pending_index(&stack).await?;
    pending.sort();
    assert_eq!(pending, ["u#u~other~000", "u#u~s~000", "u#u~s~001", "u#u~s~002"]);

    // PENDING → UPLOADING → FINISHING → UPLOADED → HANDED_OFF.
    let mut up = upload("u", "s", 0, UploadState::Uploading);
    up.started_at = Some(datetime!(2026-03-01 10:00:05 UTC));
    up.bytes_sent = 1234;
    repo.transition_upload(&up, UploadState::Pending).await?;
    // Replaying the same transition fails: the state moved on.
    match repo.transition_upload(&up, UploadState::Pending).await {
        Err(RepoError::ConditionFailed(msg)) => {
            assert!(msg.contains("UPLOADING") && msg.contains("PENDING"), "{msg}")
        }
        other => panic!("expected ConditionFailed, got {other:?}"),
    }
    up.state = UploadState::Finishing;
    repo.transition_upload(&up, UploadState::Uploading).await?;
    up.state = UploadState::Uploaded;
    up.cluster_id = Some("cluster-1".into());
    up.handle = Some("handle-1".into());
    repo.transition_upload(&up, UploadState::Finishing).await?;
    assert!(pending_index(&stack).await?.contains(&"u#u~s~000".to_string()));
    up.state = UploadState::HandedOff;
    up.finished_at = Some(datetime!(2026-03-01 10:01:00 UTC));
    repo.transition_upload(&up, UploadState::Uploaded).await?;
    assert!(!pending_index(&stack).await?.contains(&"u#u~s~000".to_string()));
    assert_eq!(repo.list_uploads("u", "s").await?[0], up);

    // put_upload of a final state also leaves the index; a missing record cannot transition.
    repo.put_upload(&upload("u", "s", 1, UploadState::Failed)).await?;
    let mut pending = pending_index(&stack).await?;
    pending.sort();
    assert_eq!(pending, ["u#u~other~000", "u#u~s~002"]);
    match repo
        .transition_upload(&upload("u", "s", 7, UploadState::Uploading), UploadState::Pending)
        .await
    {
        Err(RepoError::ConditionFailed(msg)) => assert!(msg.contains("does not exist"), "{msg}"),
        other => panic!("expected ConditionFailed, got {other:?}"),
    }
    Ok(())
}

fn image(upload: &str, index: u32) -> UploadImage {
    UploadImage {
        upload_id: upload.into(),
        index,
        key: format!("sequences/u/s/img {index}.jpg"),
        etag: format!("{index:032x}"),
        size: 5_000_000 + u64::from(index),
        entry_size: 5_000_100 + u64::from(index),
        header_consumed: 20_000,
        description: format!(r#"{{"MAPLatitude":48.1,"MAPCaptureTime":"2026_03_01_10_00_{index:02}_000"}}"#),
        lat: 48.137_154_3 + f64::from(index) * 1e-7,
        lon: -11.575_382_1,
        altitude: if index % 2 == 0 { Some(519.25) } else { None },
        captured_at: datetime!(2026-03-01 10:00:00.123 UTC) + time::Duration::milliseconds(i64::from(index)),
        heading: Some(f64::from(index % 360)),
        checkpoint: None,
    }
}

#[tokio::test]
async fn dotted_ids_of_different_users_never_share_an_upload() -> Result<()> {
    // Issue 15: user `h` with sequence `a.b` and user `h.a` with sequence `b` both got upload id
    // `h.a.b.000`, so the second drop overwrote the first's upload record and image entries.
    let (stack, repo) = new_stack("ddb-dots").await?;
    let first = upload("h", "a.b", 0, UploadState::Pending);
    let second = upload("h.a", "b", 0, UploadState::Pending);
    assert_ne!(first.upload_id, second.upload_id);
    repo.put_upload(&first).await?;
    repo.put_upload(&second).await?;
    let entry = |up: &UploadRecord, key: &str| UploadImage {
        key: key.into(),
        ..image(&up.upload_id, 0)
    };
    repo.put_images(&[entry(&first, "sequences/h/a.b/first.jpg")])
        .await?;
    repo.put_images(&[entry(&second, "sequences/h.a/b/second.jpg")])
        .await?;
    // Each upload keeps its own record and entries.
    assert_eq!(repo.list_uploads("h", "a.b").await?, std::slice::from_ref(&first));
    assert_eq!(
        repo.list_uploads("h.a", "b").await?,
        std::slice::from_ref(&second)
    );
    let keys = |v: Vec<UploadImage>| v.into_iter().map(|i| i.key).collect::<Vec<_>>();
    assert_eq!(
        keys(repo.list_images(&first.upload_id).await?),
        ["sequences/h/a.b/first.jpg"]
    );
    assert_eq!(
        keys(repo.list_images(&second.upload_id).await?),
        ["sequences/h.a/b/second.jpg"]
    );
    let mut pending = pending_index(&stack).await?;
    pending.sort();
    assert_eq!(pending, ["h#h~a.b~000", "h.a#h.a~b~000"]);
    Ok(())
}

#[tokio::test]
async fn images_batch_write_page_and_checkpoint() -> Result<()> {
    let (stack, repo) = new_stack("ddb-img").await?;
    let repo = repo.with_query_page_size(100);
    // 1,100 entries over two uploads in one call (44 batches), plus one duplicate key (last wins).
    let mut images: Vec<UploadImage> = (0..600).map(|i| image("up-a", i)).collect();
    images.extend((0..500).map(|i| image("up-b", i)));
    let mut dup = image("up-a", 5);
    dup.description = "{\"first\":true}".into();
    images.insert(0, dup);
    repo.put_images(&images).await?;
    let a = repo.list_images("up-a").await?;
    let b = repo.list_images("up-b").await?;
    assert_eq!(a.len(), 600);
    assert_eq!(b.len(), 500);
    assert_eq!(a, images[1..601].to_vec());
    assert_eq!(b, images[601..].to_vec());
    assert!(repo.list_images("up-none").await?.is_empty());
    // Positions by key (BatchGetItem, projected), several uploads and a repeated one in one call.
    let asked = [
        ("up-a".to_string(), 600),
        ("up-b".to_string(), 3),
        ("up-none".to_string(), 2),
        ("up-a".to_string(), 2),
    ];
    let got = repo.get_image_positions(&asked).await?;
    let pos = |v: &[UploadImage]| {
        v.iter()
            .map(shared::model::ImagePosition::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(got.len(), 4);
    assert_eq!(got[0], pos(&images[1..601]));
    assert_eq!(got[1], pos(&images[601..604]));
    assert!(got[2].is_empty());
    assert_eq!(got[3], pos(&images[1..3]));

    // Checkpoints: concurrent calls, overlapping runs, an overwrite with the same values, other
    // fields untouched; stored as one item per ≤ 100 checkpoints of a call, not one write per entry.
    let cp_of = |img: &UploadImage| EntryCheckpoint {
        index: img.index,
        crc32: 0xdead_beef ^ img.index,
        md5: format!("{:032x}", u128::from(img.index) * 31),
        local_header_offset: 5_000_000_000 + u64::from(img.index) * 1000,
        fingerprint: img.fingerprint(),
    };
    let cps = |range: std::ops::Range<u32>| -> Vec<EntryCheckpoint> {
        range.map(|i| cp_of(&image("up-a", i))).collect()
    };
    let (low, high) = (cps(0..20), cps(20..40));
    let (first, second) = tokio::join!(
        repo.save_checkpoints("up-a", &low),
        repo.save_checkpoints("up-a", &high)
    );
    first?;
    second?;
    repo.save_checkpoints("up-a", &cps(10..30)).await?;
    assert_eq!(count_items(&stack, "UPLOAD#up-a", "CKPT#").await?, 3);
    // 250 in one call: three items (100 + 100 + 50).
    repo.save_checkpoints("up-a", &cps(300..550)).await?;
    assert_eq!(count_items(&stack, "UPLOAD#up-a", "CKPT#").await?, 6);
    // Checkpoints of entries that do not exist are stored but never attached.
    repo.save_checkpoints("up-a", &cps(599..603)).await?;
    let a = repo.list_images("up-a").await?;
    assert_eq!(a.len(), 600);
    for (i, got) in a.iter().enumerate() {
        let mut want = image("up-a", i as u32);
        if i < 40 || (300..550).contains(&i) || i == 599 {
            want.checkpoint = Some(cp_of(&want));
        }
        assert_eq!(got, &want, "entry {i}");
    }
    // A checkpoint computed for a different entry at the same index (a re-planned upload) is not
    // attached; the entry re-planned with new content loses the old one too.
    let mut other = image("up-a", 41);
    other.description = "{\"another\":true}".into();
    repo.save_checkpoints("up-a", &[cp_of(&other)]).await?;
    let mut replanned = image("up-a", 5);
    replanned.etag = "f".repeat(32);
    repo.put_images(std::slice::from_ref(&replanned)).await?;
    let a = repo.list_images("up-a").await?;
    assert_eq!(a[41].checkpoint, None);
    assert_eq!(
        a[5], replanned,
        "the old checkpoint of entry 5 does not match its new content"
    );
    assert_eq!(a[6].checkpoint, Some(cp_of(&image("up-a", 6))));
    assert_eq!(count_items(&stack, "UPLOAD#up-a", "IMG#").await?, 600);
    repo.save_checkpoints("up-a", &[]).await?;
    repo.put_images(&[]).await?;
    Ok(())
}

#[tokio::test]
async fn ingest_errors_are_recorded_under_their_own_partition() -> Result<()> {
    let (stack, repo) = new_stack("ddb-ingest").await?;
    let at = datetime!(2026-03-01 12:00:00.5 UTC);
    let short = IngestError {
        at,
        message_id: "m-1".into(),
        bucket: Some("b".into()),
        key: "sequences/only-two/manifest.json".into(),
        reason: "key is not sequences/<user_id>/<sequence_id>/manifest.json".into(),
    };
    let long = IngestError {
        at: OffsetDateTime::from_unix_timestamp(1_800_000_000)?,
        message_id: "m-2".into(),
        bucket: None,
        key: "é".repeat(700),
        reason: "too long".into(),
    };
    repo.record_ingest_error(&short).await?;
    repo.record_ingest_error(&long).await?;
    let items = stack
        .dynamodb()
        .query()
        .table_name(&stack.uploads_table)
        .key_condition_expression("pk = :p")
        .expression_attribute_values(":p", AttributeValue::S("INGEST_ERROR".into()))
        .send()
        .await?;
    let items = items.items();
    assert_eq!(items.len(), 2);
    assert_eq!(
        s_attr(&items[0], "sk"),
        "2026-03-01T12:00:00.500000Z#sequences/only-two/manifest.json"
    );
    let decoded: IngestError = serde_dynamo::aws_sdk_dynamodb_1::from_item(items[0].clone())?;
    assert_eq!(decoded, short);
    let decoded: IngestError = serde_dynamo::aws_sdk_dynamodb_1::from_item(items[1].clone())?;
    assert_eq!(decoded, long);
    assert!(s_attr(&items[1], "sk").len() <= 1024);
    // The table's TTL attribute (issue 15, item 7): deleted 30 days after it was seen.
    assert_eq!(
        n_attr(&items[0], "expires_at"),
        at.unix_timestamp() + 30 * 24 * 3600
    );
    assert_eq!(n_attr(&items[1], "expires_at"), 1_800_000_000 + 30 * 24 * 3600);
    Ok(())
}

#[tokio::test]
async fn an_unreachable_endpoint_is_transient() -> Result<()> {
    let config = stack::sdk_config("http://127.0.0.1:1").await;
    let repo = DynamoRepository::new(aws_sdk_dynamodb::Client::new(&config), "t");
    let err = repo.get_sequence("u", "s").await.expect_err("no server");
    assert!(err.is_transient(), "{err:?}");
    let claims = DynamoIdempotency::new(aws_sdk_dynamodb::Client::new(&config), "i");
    let err = claims.claim(&claim("x", "o", 1), 0).await.expect_err("no server");
    assert!(matches!(err, RepoError::Transient(_)), "{err:?}");
    Ok(())
}

/// A minimal DynamoDB stand-in on 127.0.0.1 for what moto never does: answer `BatchWriteItem` with
/// `UnprocessedItems`. Each request's last `keep_back` write requests come back unprocessed (all of
/// them when `keep_back` is `usize::MAX`); every request body is recorded.
mod fake_dynamo {
    use std::sync::{Arc, Mutex};

    use serde_json::{json, Value};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    pub async fn start(keep_back: usize) -> anyhow::Result<(String, Arc<Mutex<Vec<Value>>>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    let mut read = BufReader::new(read);
                    loop {
                        let mut len = 0usize;
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let l = line.trim_end();
                            if l.is_empty() {
                                break;
                            }
                            if let Some((k, v)) = l.split_once(':') {
                                if k.eq_ignore_ascii_case("content-length") {
                                    len = v.trim().parse().unwrap_or(0);
                                }
                            }
                        }
                        let mut body = vec![0u8; len];
                        if read.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        log.lock().unwrap().push(request.clone());
                        let mut unprocessed = serde_json::Map::new();
                        if let Some(tables) = request["RequestItems"].as_object() {
                            for (table, writes) in tables {
                                let writes = writes.as_array().cloned().unwrap_or_default();
                                let back = keep_back.min(writes.len());
                                if back > 0 && (keep_back == usize::MAX || writes.len() > back) {
                                    unprocessed.insert(table.clone(), json!(writes[writes.len() - back..]));
                                }
                            }
                        }
                        let reply = json!({ "UnprocessedItems": unprocessed }).to_string();
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/x-amz-json-1.0\r\n\
                             content-length: {}\r\n\r\n",
                            reply.len()
                        );
                        if write.write_all(head.as_bytes()).await.is_err()
                            || write.write_all(reply.as_bytes()).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Ok((endpoint, seen))
    }
}

fn written_sks(request: &serde_json::Value) -> Vec<String> {
    request["RequestItems"]["uploads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            w["PutRequest"]["Item"]["sk"]["S"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn unprocessed_batch_items_are_retried_until_written() -> Result<()> {
    // Every batch of more than 3 writes leaves its last 3 unprocessed; the retry carries exactly those.
    let (endpoint, seen) = fake_dynamo::start(3).await?;
    let config = stack::sdk_config(&endpoint).await;
    let repo = DynamoRepository::new(aws_sdk_dynamodb::Client::new(&config), "uploads");
    let images: Vec<UploadImage> = (0..60).map(|i| image("up", i)).collect();
    repo.put_images(&images).await?;

    let requests = seen.lock().unwrap().clone();
    let mut sizes: Vec<usize> = requests.iter().map(|r| written_sks(r).len()).collect();
    sizes.sort();
    assert_eq!(sizes, [3, 3, 3, 10, 25, 25]);
    let mut written: Vec<String> = requests.iter().flat_map(written_sks).collect();
    let retried: Vec<Vec<String>> = requests
        .iter()
        .map(written_sks)
        .filter(|sks| sks.len() == 3)
        .collect();
    for batch in requests.iter().map(written_sks).filter(|sks| sks.len() > 3) {
        assert!(
            retried.contains(&batch[batch.len() - 3..].to_vec()),
            "{batch:?} not retried"
        );
    }
    written.sort();
    written.dedup();
    assert_eq!(written.len(), 60);
    Ok(())
}

#[tokio::test]
async fn items_that_stay_unprocessed_end_in_a_transient_error() -> Result<()> {
    let (endpoint, seen) = fake_dynamo::start(usize::MAX).await?;
    let config = stack::sdk_config(&endpoint).await;
    let repo = DynamoRepository::new(aws_sdk_dynamodb::Client::new(&config), "uploads");
    let err = repo
        .put_images(&[image("up", 0), image("up", 1)])
        .await
        .expect_err("never processed");
    match &err {
        RepoError::Transient(msg) => assert!(msg.contains("2 items still unprocessed"), "{msg}"),
        other => panic!("expected Transient, got {other:?}"),
    }
    // Bounded: a fixed number of attempts, each with both items.
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 8);
    assert!(requests.iter().all(|r| written_sks(r).len() == 2));
    Ok(())
}

#[tokio::test]
async fn a_completed_claim_is_reopened_once_and_an_inprogress_one_never() -> Result<()> {
    let (stack, claims) = claims_stack("ddb-reopen").await?;
    let now = 1_700_000_000_000i64;
    let id = "reopen";
    // Nothing stored, or INPROGRESS: no reopening.
    assert!(!claims.reopen_claim(&claim(id, "x", now)).await?);
    claims.claim(&claim(id, "a", now + 1_000), now).await?;
    assert!(!claims.reopen_claim(&claim(id, "x", now)).await?);
    claims.complete_claim(id, "a").await?;
    // Two deliveries after the sequence was final: one reopens, the other finds it held.
    let (cb, cc) = (claim(id, "b", now + 60_000), claim(id, "c", now + 60_000));
    let (b, c) = tokio::join!(claims.reopen_claim(&cb), claims.reopen_claim(&cc));
    assert_eq!(u8::from(b?) + u8::from(c?), 1, "exactly one reopens");
    let raw = raw_claim(&stack, id).await?;
    assert_eq!(raw["status"], AttributeValue::S("INPROGRESS".into()));
    assert!(matches!(
        claims.claim(&claim(id, "d", now + 90_000), now + 1_000).await?,
        ClaimOutcome::Held { .. }
    ));
    Ok(())
}

#[tokio::test]
async fn concurrent_invocations_take_at_most_cap_slots_of_a_user_and_dead_ones_free_theirs() -> Result<()> {
    let (_stack, claims) = claims_stack("ddb-slots").await?;
    let now = 1_700_000_000_000i64;
    // Six invocations at once, two slots: exactly two win (the version condition serialises them).
    let holders: Vec<String> = (0..6).map(|i| format!("h{i}")).collect();
    let takes = futures::future::join_all(
        holders
            .iter()
            .map(|h| claims.take_user_slot("u", h, now + 1_000, now, 2)),
    )
    .await;
    let won: Vec<usize> = takes
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| r.ok().filter(|ok| *ok).map(|_| i))
        .collect();
    assert_eq!(won.len(), 2, "{won:?}");
    assert!(
        claims
            .take_user_slot("v", "other-user", now + 1_000, now, 2)
            .await?,
        "per user"
    );
    // A released slot is free; a holder renews its own; past their leases slots are free.
    claims.release_user_slot("u", &format!("h{}", won[0])).await?;
    claims.release_user_slot("u", "never-held").await?;
    claims.release_user_slot("nobody", "h").await?;
    assert!(claims.take_user_slot("u", "late", now + 1_000, now, 2).await?);
    assert!(!claims.take_user_slot("u", "later", now + 1_000, now, 2).await?);
    assert!(
        claims.take_user_slot("u", "late", now + 5_000, now, 2).await?,
        "own slot renewed"
    );
    assert!(
        claims
            .take_user_slot("u", "after", now + 9_000, now + 1_001, 2)
            .await?,
        "h's lease ended"
    );
    assert!(
        !claims
            .take_user_slot("u", "again", now + 9_000, now + 1_001, 2)
            .await?,
        "late + after"
    );
    Ok(())
}
