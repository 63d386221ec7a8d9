//! `S3ObjectStore` against a real moto S3 (a stack of `infra/template.yaml`), with the real SDK client.

use anyhow::Result;
use aws_sdk_s3::primitives::ByteStream;
use futures::StreamExt;
use integration_tests::moto::shared_moto;
use integration_tests::stack::{self, LocalStack};
use shared::adapters::s3::S3ObjectStore;
use shared::ports::{ObjectStore, StoreError};

async fn new_stack(tag: &str) -> Result<LocalStack> {
    let endpoint = shared_moto()?;
    LocalStack::create(&endpoint, &stack::unique_stack_name(tag)).await
}

async fn put(stack: &LocalStack, key: &str, body: Vec<u8>) -> Result<String> {
    let out = stack
        .s3()
        .put_object()
        .bucket(&stack.bucket)
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await?;
    Ok(out.e_tag().unwrap_or_default().trim_matches('"').to_string())
}

/// Bytes whose value depends on their position, so an off-by-one shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[tokio::test]
async fn ranged_reads_at_the_boundaries() -> Result<()> {
    let stack = new_stack("s3-range").await?;
    let store = S3ObjectStore::new(stack.s3());
    let data = pattern(1000);
    let etag = put(&stack, "r/obj.bin", data.clone()).await?;
    put(&stack, "r/empty.bin", Vec::new()).await?;
    let b = stack.bucket.as_str();

    for (start, end, expected) in [
        (0u64, 1u64, &data[0..1]),
        (0, 64, &data[0..64]),
        (1, 2, &data[1..2]),
        (0, 1000, &data[..]),
        (999, 1000, &data[999..1000]),
        (998, 1000, &data[998..]),
        (500, 1001, &data[500..]),
        (990, 65536, &data[990..]),
        (0, 1 << 40, &data[..]),
    ] {
        let got = store.get_range(b, "r/obj.bin", start, end).await?;
        assert_eq!(got.bytes.as_ref(), expected, "{start}..{end}");
        assert_eq!(got.total_size, 1000, "{start}..{end}");
        assert_eq!(got.etag, etag, "{start}..{end}");
    }
    // At or past the end: empty, with the real size (S3 answers 416 InvalidRange).
    for start in [1000u64, 1001, 5000] {
        let got = store.get_range(b, "r/obj.bin", start, start + 10).await?;
        assert!(got.bytes.is_empty(), "{start}");
        assert_eq!(got.total_size, 1000);
        assert_eq!(got.etag, etag);
    }
    // A 0-byte object.
    let empty = store.get_range(b, "r/empty.bin", 0, 65536).await?;
    assert!(empty.bytes.is_empty());
    assert_eq!(empty.total_size, 0);
    assert!(!empty.etag.is_empty() && !empty.etag.contains('"'));

    // Bad input and missing things.
    assert!(matches!(
        store.get_range(b, "r/obj.bin", 5, 5).await,
        Err(StoreError::Other(_))
    ));
    match store.get_range(b, "r/missing.bin", 0, 10).await {
        Err(StoreError::NotFound(msg)) => assert!(msg.contains("r/missing.bin"), "{msg}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(matches!(
        store.get_range("no-such-bucket-xyz", "k", 0, 10).await,
        Err(StoreError::NotFound(_))
    ));
    Ok(())
}

#[tokio::test]
async fn whole_objects_with_and_without_if_match() -> Result<()> {
    let stack = new_stack("s3-get").await?;
    let store = S3ObjectStore::new(stack.s3());
    let b = stack.bucket.as_str();
    let key = "sequences/u 1/s+1/ünï cødé.jpg";
    let data = pattern(4321);
    let etag = put(&stack, key, data.clone()).await?;

    let got = store.get_object(b, key, None).await?;
    assert_eq!(got.bytes.as_ref(), &data[..]);
    assert_eq!(got.etag, etag);
    assert!(!got.etag.contains('"'));

    // If-Match with the current etag (quoted or not) succeeds.
    assert_eq!(store.get_object(b, key, Some(&etag)).await?.bytes.len(), 4321);
    assert_eq!(
        store
            .get_object(b, key, Some(&format!("\"{etag}\"")))
            .await?
            .bytes
            .len(),
        4321
    );

    // The object changes: the old etag no longer matches.
    let new_etag = put(&stack, key, pattern(10)).await?;
    assert_ne!(new_etag, etag);
    match store.get_object(b, key, Some(&etag)).await {
        Err(StoreError::Changed { key: k, expected }) => {
            assert_eq!(k, key);
            assert_eq!(expected, etag);
        }
        other => panic!("expected Changed, got {other:?}"),
    }
    assert!(!StoreError::Changed {
        key: key.into(),
        expected: etag.clone()
    }
    .is_transient());

    match store.get_object(b, "nope.jpg", None).await {
        Err(e @ StoreError::NotFound(_)) => assert!(!e.is_transient()),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(matches!(
        store.get_object(b, "nope.jpg", Some("abc")).await,
        Err(StoreError::NotFound(_))
    ));
    Ok(())
}

#[tokio::test]
async fn head_reports_size_and_etag() -> Result<()> {
    let stack = new_stack("s3-head").await?;
    let store = S3ObjectStore::new(stack.s3());
    let b = stack.bucket.as_str();
    let etag = put(&stack, "h/a.jpg", pattern(777)).await?;
    let info = store.head(b, "h/a.jpg").await?;
    assert_eq!(
        (info.key.as_str(), info.size, info.etag.as_str()),
        ("h/a.jpg", 777, etag.as_str())
    );
    put(&stack, "h/zero", Vec::new()).await?;
    assert_eq!(store.head(b, "h/zero").await?.size, 0);
    assert!(matches!(
        store.head(b, "h/b.jpg").await,
        Err(StoreError::NotFound(_))
    ));
    Ok(())
}

#[tokio::test]
async fn list_follows_every_page_in_key_order() -> Result<()> {
    let stack = new_stack("s3-list").await?;
    let b = stack.bucket.clone();
    // 1,050 keys: more than one default page (1,000).
    let keys: Vec<String> = (0..1050).map(|i| format!("seq/many/{i:05}.jpg")).collect();
    let puts = futures::stream::iter(keys.iter().cloned().enumerate())
        .map(|(i, key)| {
            let stack = &stack;
            async move { put(stack, &key, vec![b'x'; i % 7]).await.map(|etag| (key, etag)) }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let mut expected: Vec<(String, String)> = puts.into_iter().collect::<Result<_>>()?;
    expected.sort();
    // Neighbours that must not be listed.
    put(&stack, "seq/manyx.jpg", vec![1]).await?;
    put(&stack, "seq/other/0.jpg", vec![1]).await?;

    let store = S3ObjectStore::new(stack.s3());
    let listed = store.list(&b, "seq/many/").await?;
    assert_eq!(listed.len(), 1050);
    for ((key, etag), info) in expected.iter().zip(&listed) {
        assert_eq!(&info.key, key);
        assert_eq!(&info.etag, etag);
        let i: usize = key["seq/many/".len()..key.len() - 4].parse()?;
        assert_eq!(info.size, (i % 7) as u64, "{key}");
    }

    // Small pages, odd keys (space, '+', unicode), a prefix that is not a "directory".
    let odd = [
        "seq/odd/a b.jpg",
        "seq/odd/a+b.jpg",
        "seq/odd/z.jpg",
        "seq/odd/é.jpg",
        "seq/odd/ü/1.jpg",
    ];
    for key in odd {
        put(&stack, key, b"abc".to_vec()).await?;
    }
    let small_pages = S3ObjectStore::new(stack.s3()).with_page_size(2);
    let listed: Vec<String> = small_pages
        .list(&b, "seq/odd/")
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    let mut want: Vec<String> = odd.iter().map(|k| k.to_string()).collect();
    want.sort();
    assert_eq!(listed, want);
    let paged_many = small_pages.list(&b, "seq/many/0100").await?;
    assert_eq!(paged_many.len(), 10);
    assert_eq!(small_pages.list(&b, "seq/many").await?.len(), 1051);
    assert!(store.list(&b, "nothing/here/").await?.is_empty());
    assert!(matches!(
        store.list("no-such-bucket-xyz", "x").await,
        Err(StoreError::NotFound(_))
    ));
    Ok(())
}

#[tokio::test]
async fn an_unreachable_endpoint_is_transient() -> Result<()> {
    // Nothing listens on port 1: connection refused → a dispatch failure.
    let config = stack::sdk_config("http://127.0.0.1:1").await;
    let store = S3ObjectStore::new(stack::s3_client(&config));
    let err = store.head("b", "k").await.expect_err("no server");
    assert!(err.is_transient(), "{err:?}");
    let err = store.get_range("b", "k", 0, 10).await.expect_err("no server");
    assert!(matches!(err, StoreError::Transient(_)), "{err:?}");
    Ok(())
}
