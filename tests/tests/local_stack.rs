//! The local stack created from `infra/template.yaml` in a real moto, checked with the real SDK clients.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aws_sdk_dynamodb::types::TimeToLiveStatus;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ServerSideEncryption;
use aws_sdk_sqs::types::QueueAttributeName;
use integration_tests::moto::shared_moto;
use integration_tests::stack::{self, LocalStack, SimEndpoints};
use serde_json::Value;

async fn new_stack(tag: &str) -> Result<LocalStack> {
    let endpoint = shared_moto()?;
    LocalStack::create(&endpoint, &stack::unique_stack_name(tag)).await
}

/// S3 event keys are form-urlencoded: `+` is a space, then percent-decoding (trap 4).
fn decode_event_key(raw: &str) -> String {
    percent_encoding::percent_decode_str(&raw.replace('+', " "))
        .decode_utf8()
        .expect("event key is UTF-8")
        .into_owned()
}

/// Drains the queue for `for_at_least`, returning the S3 records' (event name, decoded key), skipping
/// bodies without `Records` (the `s3:TestEvent`, trap 5). Short polls only (trap 7).
async fn drain_s3_records(
    stack: &LocalStack,
    queue_url: &str,
    for_at_least: Duration,
) -> Vec<(String, String)> {
    let sqs = stack.sqs();
    let mut records = Vec::new();
    let deadline = Instant::now() + for_at_least;
    while Instant::now() < deadline {
        let received = sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .expect("ReceiveMessage");
        for message in received.messages() {
            let body: Value = serde_json::from_str(message.body().unwrap_or_default()).expect("JSON body");
            for record in body["Records"].as_array().into_iter().flatten() {
                records.push((
                    record["eventName"].as_str().unwrap_or_default().to_string(),
                    decode_event_key(record["s3"]["object"]["key"].as_str().expect("key")),
                ));
            }
            sqs.delete_message()
                .queue_url(queue_url)
                .receipt_handle(message.receipt_handle().unwrap_or_default())
                .send()
                .await
                .expect("DeleteMessage");
        }
    }
    records
}

async fn put(stack: &LocalStack, key: &str) {
    stack
        .s3()
        .put_object()
        .bucket(&stack.bucket)
        .key(key)
        .body(ByteStream::from_static(b"{}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("PutObject {key}: {e:?}"));
}

#[tokio::test]
async fn bucket_is_versioned_encrypted_and_private() -> Result<()> {
    let stack = new_stack("bucket").await?;
    let s3 = stack.s3();
    // moto 5.2.5 answers GetBucketVersioning with the root element `GetBucketVersioningResponse`,
    // which the Rust SDK rejects; read the status over plain HTTP (moto does not check signatures) and
    // prove versioning by behaviour below.
    let raw = reqwest::get(format!("{}/{}?versioning", stack.endpoint, stack.bucket))
        .await?
        .text()
        .await?;
    assert!(raw.contains("<Status>Enabled</Status>"), "{raw}");

    let encryption = s3.get_bucket_encryption().bucket(&stack.bucket).send().await?;
    let rule = &encryption
        .server_side_encryption_configuration()
        .context("no SSE configuration")?
        .rules()[0];
    assert_eq!(
        rule.apply_server_side_encryption_by_default()
            .map(|d| d.sse_algorithm()),
        Some(&ServerSideEncryption::Aes256)
    );

    let pab = s3.get_public_access_block().bucket(&stack.bucket).send().await?;
    let pab = pab
        .public_access_block_configuration()
        .context("no public access block")?;
    assert_eq!(
        (
            pab.block_public_acls(),
            pab.block_public_policy(),
            pab.ignore_public_acls(),
            pab.restrict_public_buckets()
        ),
        (Some(true), Some(true), Some(true), Some(true))
    );

    // Versioning is real: two puts of one key keep two versions.
    put(&stack, "other/x.json").await;
    put(&stack, "other/x.json").await;
    let versions = s3
        .list_object_versions()
        .bucket(&stack.bucket)
        .prefix("other/x.json")
        .send()
        .await?;
    assert_eq!(versions.versions().len(), 2);
    Ok(())
}

#[tokio::test]
async fn manifest_puts_notify_the_ingest_queue_and_nothing_else_does() -> Result<()> {
    let stack = new_stack("notify").await?;
    let notification = stack
        .s3()
        .get_bucket_notification_configuration()
        .bucket(&stack.bucket)
        .send()
        .await?;
    assert_eq!(notification.queue_configurations().len(), 1, "{notification:?}");

    // Not matching: wrong suffix, wrong prefix, and a key merely containing the suffix.
    put(&stack, "sequences/u1/s1/a.jpg").await;
    put(&stack, "other/manifest.json").await;
    put(&stack, "sequences/u1/s1/manifest.json.bak").await;
    // Matching, including a key with a space and a '+' (form-urlencoded in the event).
    put(&stack, "sequences/u1/s1/manifest.json").await;
    put(&stack, "sequences/u 2/s+2/manifest.json").await;

    let mut records = drain_s3_records(&stack, &stack.ingest_queue_url, Duration::from_secs(3)).await;
    records.sort();
    assert_eq!(
        records,
        vec![
            (
                "ObjectCreated:Put".to_string(),
                "sequences/u 2/s+2/manifest.json".to_string()
            ),
            (
                "ObjectCreated:Put".to_string(),
                "sequences/u1/s1/manifest.json".to_string()
            ),
        ]
    );
    // The decoded key is the one GetObject needs.
    let got = stack
        .s3()
        .get_object()
        .bucket(&stack.bucket)
        .key(&records[0].1)
        .send()
        .await?;
    assert_eq!(got.body.collect().await?.into_bytes().as_ref(), b"{}");
    Ok(())
}

#[tokio::test]
async fn queues_have_dead_letter_queues() -> Result<()> {
    let stack = new_stack("queues").await?;
    let sqs = stack.sqs();
    for (queue, dlq) in [
        (&stack.ingest_queue_url, &stack.ingest_dlq_url),
        (&stack.clusters_queue_url, &stack.clusters_dlq_url),
    ] {
        let dlq_arn = sqs
            .get_queue_attributes()
            .queue_url(dlq)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await?
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .context("DLQ has no ARN")?;
        let attrs = sqs
            .get_queue_attributes()
            .queue_url(queue)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await?;
        let attrs = attrs.attributes().context("no attributes")?;
        let redrive: Value = serde_json::from_str(&attrs[&QueueAttributeName::RedrivePolicy])?;
        assert_eq!(redrive["deadLetterTargetArn"], dlq_arn.as_str(), "{queue}");
        let max_receive = redrive["maxReceiveCount"].to_string();
        assert!(
            ["3", "5", "\"3\"", "\"5\""].contains(&max_receive.as_str()),
            "{redrive}"
        );
        assert_eq!(attrs[&QueueAttributeName::SqsManagedSseEnabled], "true");
    }
    // The ingest queue's visibility covers the zip function's runtime several times over.
    let ingest = sqs
        .get_queue_attributes()
        .queue_url(&stack.ingest_queue_url)
        .attribute_names(QueueAttributeName::VisibilityTimeout)
        .attribute_names(QueueAttributeName::Policy)
        .send()
        .await?;
    let ingest = ingest.attributes().context("no attributes")?;
    assert!(ingest[&QueueAttributeName::VisibilityTimeout].parse::<u32>()? >= 6 * 900);
    // The queue policy from the template lets S3 (only this bucket) send.
    let policy: Value = serde_json::from_str(&ingest[&QueueAttributeName::Policy])?;
    let statement = &policy["Statement"][0];
    assert_eq!(statement["Principal"]["Service"], "s3.amazonaws.com");
    assert_eq!(
        statement["Condition"]["ArnEquals"]["aws:SourceArn"],
        format!("arn:aws:s3:::{}", stack.bucket)
    );
    Ok(())
}

#[tokio::test]
async fn tables_have_their_keys_indexes_and_ttl() -> Result<()> {
    let stack = new_stack("tables").await?;
    let ddb = stack.dynamodb();
    for (table, gsis, ttl) in [
        (&stack.uploads_table, vec!["gsi1", "gsi2"], "expires_at"),
        (&stack.users_table, vec!["gsi1"], "expires_at"),
        (&stack.idempotency_table, vec![], "expiration"),
    ] {
        let described = ddb.describe_table().table_name(table).send().await?;
        let described = described.table().context("no table")?;
        let mut names: Vec<&str> = described
            .global_secondary_indexes()
            .iter()
            .filter_map(|g| g.index_name())
            .collect();
        names.sort();
        assert_eq!(names, gsis, "{table}");
        let keys: Vec<&str> = described
            .key_schema()
            .iter()
            .map(|k| k.attribute_name())
            .collect();
        if table == &stack.idempotency_table {
            assert_eq!(keys, ["id"]);
        } else {
            assert_eq!(keys, ["pk", "sk"]);
        }
        for gsi in described.global_secondary_indexes() {
            let index = gsi.index_name().unwrap_or_default();
            let gsi_keys: Vec<&str> = gsi.key_schema().iter().map(|k| k.attribute_name()).collect();
            assert_eq!(gsi_keys, [format!("{index}pk"), format!("{index}sk")]);
        }
        let ttl_desc = ddb.describe_time_to_live().table_name(table).send().await?;
        let ttl_desc = ttl_desc
            .time_to_live_description()
            .context("no TTL description")?;
        assert_eq!(ttl_desc.attribute_name(), Some(ttl), "{table}");
        assert_eq!(
            ttl_desc.time_to_live_status(),
            Some(&TimeToLiveStatus::Enabled),
            "{table}"
        );
    }
    // A GSI query works on the real table.
    ddb.put_item()
        .table_name(&stack.uploads_table)
        .item("pk", aws_sdk_dynamodb::types::AttributeValue::S("U#1".into()))
        .item("sk", aws_sdk_dynamodb::types::AttributeValue::S("S#1".into()))
        .item(
            "gsi2pk",
            aws_sdk_dynamodb::types::AttributeValue::S("OPEN".into()),
        )
        .item(
            "gsi2sk",
            aws_sdk_dynamodb::types::AttributeValue::S("2026".into()),
        )
        .send()
        .await?;
    let found = ddb
        .query()
        .table_name(&stack.uploads_table)
        .index_name("gsi2")
        .key_condition_expression("gsi2pk = :p")
        .expression_attribute_values(":p", aws_sdk_dynamodb::types::AttributeValue::S("OPEN".into()))
        .send()
        .await?;
    assert_eq!(found.count(), 1);
    Ok(())
}

#[tokio::test]
async fn token_key_round_trips() -> Result<()> {
    let stack = new_stack("kms").await?;
    let kms = stack.kms();
    let encrypted = kms
        .encrypt()
        .key_id(&stack.token_key_id)
        .plaintext(aws_sdk_kms::primitives::Blob::new(b"user-token".to_vec()))
        .send()
        .await?;
    let blob = encrypted.ciphertext_blob().context("no ciphertext")?;
    assert_ne!(blob.as_ref(), b"user-token");
    let decrypted = kms.decrypt().ciphertext_blob(blob.clone()).send().await?;
    assert_eq!(
        decrypted.plaintext().context("no plaintext")?.as_ref(),
        b"user-token"
    );
    assert_eq!(decrypted.key_id(), Some(stack.token_key_arn.as_str()));
    let rotation = kms
        .get_key_rotation_status()
        .key_id(&stack.token_key_id)
        .send()
        .await?;
    assert!(rotation.key_rotation_enabled());
    Ok(())
}

#[tokio::test]
async fn two_stacks_in_one_moto_are_isolated() -> Result<()> {
    let (a, b) = tokio::try_join!(new_stack("iso-a"), new_stack("iso-b"))?;
    assert_ne!(a.bucket, b.bucket);
    assert_ne!(a.ingest_queue_url, b.ingest_queue_url);
    assert_ne!(a.uploads_table, b.uploads_table);
    assert_ne!(a.token_key_id, b.token_key_id);

    put(&a, "sequences/ua/sa/manifest.json").await;
    let (in_a, in_b) = tokio::join!(
        drain_s3_records(&a, &a.ingest_queue_url, Duration::from_secs(2)),
        drain_s3_records(&b, &b.ingest_queue_url, Duration::from_secs(2)),
    );
    assert_eq!(in_a.len(), 1, "{in_a:?}");
    assert!(in_b.is_empty(), "{in_b:?}");
    let b_objects = b.s3().list_objects_v2().bucket(&b.bucket).send().await?;
    assert_eq!(b_objects.key_count(), Some(0));
    Ok(())
}

#[tokio::test]
async fn lambda_env_matches_the_template_variables() -> Result<()> {
    let stack = new_stack("env").await?;
    let sim = SimEndpoints::from_base("http://127.0.0.1:1", "42", "local-secret");
    let env = stack.lambda_env(&sim);
    let venvs = integration_tests::venv::ensure(&integration_tests::repo_root())?;
    let template = stack::translate_template(&venvs, &stack::template_path())?;
    let names = stack::template_env_names(&template);
    // Exactly the names the Rust code reads.
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "MAPILLARY_CLIENT_ID",
            "MAPILLARY_CLIENT_SECRET_ARN",
            "MAPILLARY_GRAPH_URL",
            "MAPILLARY_TILES_URL",
            "MAPILLARY_UPLOAD_URL",
            "MAPILLARY_WWW_URL",
            "RELAY_BUCKET",
            "RELAY_CLUSTERS_QUEUE_URL",
            "RELAY_IDEMPOTENCY_TABLE",
            "RELAY_INGEST_QUEUE_URL",
            "RELAY_TOKEN_KEY_ID",
            "RELAY_UPLOADS_TABLE",
            "RELAY_USERS_TABLE",
        ]
    );
    for name in &names {
        assert!(env.iter().any(|(k, _)| k == name), "lambda_env lacks {name}");
    }
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("RELAY_BUCKET"), Some(stack.bucket.as_str()));
    assert_eq!(get("MAPILLARY_GRAPH_URL"), Some("http://127.0.0.1:1/graph"));
    assert_eq!(get("AWS_ENDPOINT_URL"), Some(stack.endpoint.as_str()));
    assert_eq!(get("AWS_REGION"), Some("us-east-1"));

    Ok(())
}
