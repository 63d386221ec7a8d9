//! The drop adapters against moto (a stack of `infra/template.yaml`): `DynamoRepository` as
//! `DropStore` (announcements chunked over items, a sequence's records deleted partition by
//! partition) and `S3ObjectStore` as `ObjectWriter` (deleting a prefix's versions page by page,
//! PutObject).

use std::collections::HashMap;

use anyhow::Result;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_s3::primitives::ByteStream;
use integration_tests::moto::shared_moto;
use integration_tests::stack::{self, LocalStack};
use shared::adapters::dynamodb::DynamoRepository;
use shared::adapters::s3::S3ObjectStore;
use shared::drops::{AnnouncedFile, Announcement};
use shared::model::{SequenceRecord, SequenceState};
use shared::ports::{DropStore, ObjectStore, ObjectWriter, RepoError, SequenceReader, SequenceStore};
use time::OffsetDateTime;

async fn new_stack(tag: &str) -> Result<LocalStack> {
    LocalStack::create(&shared_moto()?, &stack::unique_stack_name(tag)).await
}

fn announcement(user: &str, seq: &str, n: usize) -> Announcement {
    Announcement {
        user_id: user.into(),
        sequence_id: seq.into(),
        files: (0..n)
            .map(|i| AnnouncedFile {
                name: format!("img_{i:05}.jpg"),
                size: 1000 + i as u64,
                md5: (i % 2 == 0).then(|| format!("{i:032x}")),
            })
            .collect(),
        organization_id: Some("42".into()),
        max_images_per_upload: Some(300),
        created_at: time::macros::datetime!(2026-12-03 07:00:00 UTC),
        expires_at: Some(time::macros::datetime!(2026-12-04 07:00:00 UTC)),
    }
}

fn record(user: &str, seq: &str) -> SequenceRecord {
    let now = OffsetDateTime::now_utc();
    SequenceRecord {
        user_id: user.into(),
        sequence_id: seq.into(),
        state: SequenceState::AwaitingFiles,
        reason: None,
        bucket: "b".into(),
        manifest_key: format!("sequences/{user}/{seq}/manifest.json"),
        manifest_etag: String::new(),
        organization_id: None,
        image_count: 1,
        accepted_count: 0,
        upload_ids: Vec::new(),
        rejected: Vec::new(),
        created_at: now,
        updated_at: now,
        attempts: 0,
        progress: Default::default(),
    }
}

async fn partition(stack: &LocalStack, pk: &str) -> Result<Vec<String>> {
    let out = stack
        .dynamodb()
        .query()
        .table_name(&stack.uploads_table)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(":pk", AttributeValue::S(pk.into()))
        .consistent_read(true)
        .send()
        .await?;
    Ok(out
        .items()
        .iter()
        .filter_map(|i| i.get("sk")?.as_s().ok().cloned())
        .collect())
}

async fn put_item(stack: &LocalStack, pk: &str, sk: &str) -> Result<()> {
    let item: HashMap<String, AttributeValue> = [
        ("pk".to_string(), AttributeValue::S(pk.into())),
        ("sk".to_string(), AttributeValue::S(sk.into())),
    ]
    .into();
    stack
        .dynamodb()
        .put_item()
        .table_name(&stack.uploads_table)
        .set_item(Some(item))
        .send()
        .await?;
    Ok(())
}

#[tokio::test]
async fn announcements_round_trip_over_chunks_and_a_shorter_one_replaces_them() -> Result<()> {
    let stack = new_stack("drops-ann").await?;
    let repo = DynamoRepository::new(stack.dynamodb(), &stack.uploads_table);
    assert_eq!(repo.get_announcement("u1", "s1").await?, None);

    // 2500 files: three items of ≤ 1000, read back complete and in order.
    let big = announcement("u1", "s1", 2500);
    repo.put_announcement(&big).await?;
    assert_eq!(repo.get_announcement("u1", "s1").await?, Some(big));
    let sks = partition(&stack, "SEQ#u1#s1").await?;
    assert_eq!(sks, ["ANNOUNCED#0000", "ANNOUNCED#0001", "ANNOUNCED#0002"]);

    // A shorter announcement of the same sequence: the chunks beyond it are dropped.
    let small = announcement("u1", "s1", 3);
    repo.put_announcement(&small).await?;
    assert_eq!(repo.get_announcement("u1", "s1").await?, Some(small));
    assert_eq!(partition(&stack, "SEQ#u1#s1").await?, ["ANNOUNCED#0000"]);
    // Another user's sequence of the same id is another announcement.
    assert_eq!(repo.get_announcement("u2", "s1").await?, None);
    Ok(())
}

#[tokio::test]
async fn a_sequence_moves_on_only_from_the_expected_state() -> Result<()> {
    let stack = new_stack("drops-cas").await?;
    let repo = DynamoRepository::new(stack.dynamodb(), &stack.uploads_table);
    let mut seq = record("u1", "s1");
    assert!(
        matches!(
            repo.replace_sequence_if(&seq, SequenceState::AwaitingFiles).await,
            Err(RepoError::ConditionFailed(_))
        ),
        "missing"
    );
    repo.put_sequence(&seq).await?;
    seq.state = SequenceState::Received;
    repo.replace_sequence_if(&seq, SequenceState::AwaitingFiles)
        .await?;
    assert_eq!(repo.get_sequence("u1", "s1").await?, Some(seq.clone()));
    assert!(
        matches!(
            repo.replace_sequence_if(&seq, SequenceState::AwaitingFiles).await,
            Err(RepoError::ConditionFailed(_))
        ),
        "already moved on"
    );
    // Still listed under the user (gsi1 keys written).
    let page = repo.list_sequences("u1", 10, None).await?;
    assert_eq!(page.sequences.len(), 1);
    Ok(())
}

#[tokio::test]
async fn deleting_a_sequence_removes_every_item_of_its_partitions_and_nothing_else() -> Result<()> {
    let stack = new_stack("drops-del").await?;
    let repo = DynamoRepository::new(stack.dynamodb(), &stack.uploads_table);
    for seq in ["s1", "s2"] {
        repo.put_sequence(&record("u1", seq)).await?;
        repo.put_announcement(&announcement("u1", seq, 1200)).await?;
        put_item(&stack, &format!("SEQ#u1#{seq}"), "UPLOAD#000").await?;
        put_item(&stack, &format!("SEQ#u1#{seq}"), "REJECTED#000000").await?;
        let upload = format!("UPLOAD#u1~{seq}~000");
        for sk in ["IMG#00000", "IMG#00001", "CKPT#00000-00001", "TRACK", "LINKS#000"] {
            put_item(&stack, &upload, sk).await?;
        }
    }
    repo.delete_sequence_records("u1", "s1", &["u1~s1~000".to_string()])
        .await?;
    assert!(partition(&stack, "SEQ#u1#s1").await?.is_empty());
    assert!(partition(&stack, "UPLOAD#u1~s1~000").await?.is_empty());
    assert_eq!(repo.get_sequence("u1", "s1").await?, None);
    // The other sequence is whole.
    assert_eq!(partition(&stack, "SEQ#u1#s2").await?.len(), 5);
    assert_eq!(partition(&stack, "UPLOAD#u1~s2~000").await?.len(), 5);
    assert!(repo.get_sequence("u1", "s2").await?.is_some());
    // Deleting again is not an error.
    repo.delete_sequence_records("u1", "s1", &["u1~s1~000".to_string()])
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_prefix_is_deleted_with_every_version_page_by_page() -> Result<()> {
    let stack = new_stack("drops-s3").await?;
    let s3 = stack.s3();
    let b = stack.bucket.as_str();
    // Two versions of five objects, and a delete marker (the bucket is versioned), plus a neighbour.
    for i in 0..5 {
        for v in 0..2 {
            s3.put_object()
                .bucket(b)
                .key(format!("sequences/u/s/img_{i}.jpg"))
                .body(ByteStream::from(vec![v as u8; 10]))
                .send()
                .await?;
        }
    }
    s3.delete_object()
        .bucket(b)
        .key("sequences/u/s/img_0.jpg")
        .send()
        .await?;
    let store = S3ObjectStore::new(s3.clone()).with_page_size(3);
    let etag = store
        .put_object(
            b,
            "sequences/u/s2/manifest.json",
            b"{}".to_vec(),
            "application/json",
        )
        .await?;
    assert_eq!(store.head(b, "sequences/u/s2/manifest.json").await?.etag, etag);

    assert_eq!(store.delete_prefix(b, "sequences/u/s/").await?, 11);
    let left = s3
        .list_object_versions()
        .bucket(b)
        .prefix("sequences/u/s/")
        .send()
        .await?;
    assert!(
        left.versions().is_empty() && left.delete_markers().is_empty(),
        "{left:?}"
    );
    assert_eq!(
        store.list(b, "sequences/u/s2/").await?.len(),
        1,
        "the neighbour stays"
    );
    assert_eq!(store.delete_prefix(b, "sequences/u/s/").await?, 0);
    Ok(())
}
