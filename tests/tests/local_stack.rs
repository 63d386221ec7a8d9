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
            "MAPILLARY_FEED_TOKEN_SECRET_ARN",
            "MAPILLARY_GRAPH_URL",
            "MAPILLARY_TILES_URL",
            "MAPILLARY_UPLOAD_URL",
            "MAPILLARY_WWW_URL",
            "RELAY_BUCKET",
            "RELAY_CLUSTERS_QUEUE_URL",
            "RELAY_EVENT_BUS",
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

// ------------------------------------------------------------------ drift: moto vs the template

/// An integer given as a JSON number or a string (CloudFormation and SQS attributes use both).
fn as_int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// Fails on a property the drift test does not compare, so the template cannot gain a setting that is
/// checked nowhere.
fn only_known(logical: &str, props: &Value, known: &[&str], problems: &mut Vec<String>) {
    for name in props.as_object().into_iter().flat_map(|o| o.keys()) {
        if !known.contains(&name.as_str()) {
            problems.push(format!(
                "{logical}: property {name} is not compared with moto: extend the drift test"
            ));
        }
    }
}

fn check_eq<T: PartialEq + std::fmt::Debug>(problems: &mut Vec<String>, what: String, moto: T, template: T) {
    if moto != template {
        problems.push(format!(
            "{what}: moto has {moto:?}, the template says {template:?}"
        ));
    }
}

/// `(attribute, key type)` pairs of a CloudFormation `KeySchema`.
fn cfn_key_schema(schema: &Value) -> Vec<(String, String)> {
    schema
        .as_array()
        .into_iter()
        .flatten()
        .map(|k| {
            (
                k["AttributeName"].as_str().unwrap_or_default().to_string(),
                k["KeyType"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn sdk_key_schema(schema: &[aws_sdk_dynamodb::types::KeySchemaElement]) -> Vec<(String, String)> {
    schema
        .iter()
        .map(|k| (k.attribute_name().to_string(), k.key_type().as_str().to_string()))
        .collect()
}

async fn queue_drift(
    stack: &LocalStack,
    logical: &str,
    url: &str,
    props: &Value,
    problems: &mut Vec<String>,
) -> Result<()> {
    only_known(
        logical,
        props,
        &[
            "SqsManagedSseEnabled",
            "VisibilityTimeout",
            "MessageRetentionPeriod",
            "RedrivePolicy",
        ],
        problems,
    );
    let attrs = stack
        .sqs()
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .with_context(|| format!("{logical}: GetQueueAttributes"))?;
    let attrs = attrs.attributes().cloned().unwrap_or_default();
    let attr = |name: QueueAttributeName| attrs.get(&name).cloned().unwrap_or_default();
    // AWS defaults for what the template leaves out.
    let visibility = as_int(&props["VisibilityTimeout"]).unwrap_or(30);
    let retention = as_int(&props["MessageRetentionPeriod"]).unwrap_or(345_600);
    check_eq(
        problems,
        format!("{logical} VisibilityTimeout"),
        attr(QueueAttributeName::VisibilityTimeout),
        visibility.to_string(),
    );
    check_eq(
        problems,
        format!("{logical} MessageRetentionPeriod"),
        attr(QueueAttributeName::MessageRetentionPeriod),
        retention.to_string(),
    );
    check_eq(
        problems,
        format!("{logical} SqsManagedSseEnabled"),
        attr(QueueAttributeName::SqsManagedSseEnabled),
        props["SqsManagedSseEnabled"]
            .as_bool()
            .unwrap_or(false)
            .to_string(),
    );
    let redrive = &props["RedrivePolicy"];
    if redrive.is_object() {
        let moto: Value = serde_json::from_str(&attr(QueueAttributeName::RedrivePolicy))
            .with_context(|| format!("{logical}: RedrivePolicy is not JSON"))?;
        check_eq(
            problems,
            format!("{logical} RedrivePolicy.deadLetterTargetArn"),
            moto["deadLetterTargetArn"].as_str(),
            redrive["deadLetterTargetArn"].as_str(),
        );
        check_eq(
            problems,
            format!("{logical} RedrivePolicy.maxReceiveCount"),
            as_int(&moto["maxReceiveCount"]),
            as_int(&redrive["maxReceiveCount"]),
        );
    } else {
        check_eq(
            problems,
            format!("{logical} RedrivePolicy"),
            attr(QueueAttributeName::RedrivePolicy),
            String::new(),
        );
    }
    Ok(())
}

async fn table_drift(
    stack: &LocalStack,
    logical: &str,
    table: &str,
    props: &Value,
    problems: &mut Vec<String>,
) -> Result<()> {
    use aws_sdk_dynamodb::types::PointInTimeRecoveryStatus;
    // SSESpecification is not compared: moto does not model table encryption (DescribeTable has no
    // SSEDescription); tests/src/stack.rs documents the same.
    only_known(
        logical,
        props,
        &[
            "BillingMode",
            "AttributeDefinitions",
            "KeySchema",
            "GlobalSecondaryIndexes",
            "TimeToLiveSpecification",
            "PointInTimeRecoverySpecification",
            "SSESpecification",
        ],
        problems,
    );
    let ddb = stack.dynamodb();
    let described = ddb
        .describe_table()
        .table_name(table)
        .send()
        .await
        .with_context(|| format!("{logical}: DescribeTable"))?;
    let described = described.table().context("no table description")?;
    check_eq(
        problems,
        format!("{logical} KeySchema"),
        sdk_key_schema(described.key_schema()),
        cfn_key_schema(&props["KeySchema"]),
    );
    let mut moto_attrs: Vec<(String, String)> = described
        .attribute_definitions()
        .iter()
        .map(|a| {
            (
                a.attribute_name().to_string(),
                a.attribute_type().as_str().to_string(),
            )
        })
        .collect();
    moto_attrs.sort();
    let mut template_attrs: Vec<(String, String)> = props["AttributeDefinitions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["AttributeName"].as_str().unwrap_or_default().to_string(),
                a["AttributeType"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    template_attrs.sort();
    check_eq(
        problems,
        format!("{logical} AttributeDefinitions"),
        moto_attrs,
        template_attrs,
    );
    check_eq(
        problems,
        format!("{logical} BillingMode"),
        described
            .billing_mode_summary()
            .and_then(|b| b.billing_mode())
            .map(|m| m.as_str().to_string()),
        props["BillingMode"].as_str().map(str::to_string),
    );
    // GSIs: name → (key schema, projection type).
    type Gsi = (String, Vec<(String, String)>, Option<String>);
    let mut moto_gsis: Vec<Gsi> = described
        .global_secondary_indexes()
        .iter()
        .map(|g| {
            (
                g.index_name().unwrap_or_default().to_string(),
                sdk_key_schema(g.key_schema()),
                g.projection()
                    .and_then(|p| p.projection_type())
                    .map(|t| t.as_str().to_string()),
            )
        })
        .collect();
    moto_gsis.sort();
    let mut template_gsis: Vec<Gsi> = props["GlobalSecondaryIndexes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            (
                g["IndexName"].as_str().unwrap_or_default().to_string(),
                cfn_key_schema(&g["KeySchema"]),
                g["Projection"]["ProjectionType"].as_str().map(str::to_string),
            )
        })
        .collect();
    template_gsis.sort();
    check_eq(
        problems,
        format!("{logical} GlobalSecondaryIndexes"),
        moto_gsis,
        template_gsis,
    );

    let ttl = ddb
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .with_context(|| format!("{logical}: DescribeTimeToLive"))?;
    let ttl = ttl.time_to_live_description();
    let spec = &props["TimeToLiveSpecification"];
    check_eq(
        problems,
        format!("{logical} TimeToLiveSpecification"),
        (
            ttl.and_then(|t| t.attribute_name()).map(str::to_string),
            ttl.and_then(|t| t.time_to_live_status()) == Some(&TimeToLiveStatus::Enabled),
        ),
        (
            spec["AttributeName"].as_str().map(str::to_string),
            spec["Enabled"].as_bool().unwrap_or(false),
        ),
    );

    let backups = ddb
        .describe_continuous_backups()
        .table_name(table)
        .send()
        .await
        .with_context(|| format!("{logical}: DescribeContinuousBackups"))?;
    let pitr = backups
        .continuous_backups_description()
        .and_then(|d| d.point_in_time_recovery_description())
        .and_then(|p| p.point_in_time_recovery_status());
    check_eq(
        problems,
        format!("{logical} PointInTimeRecoverySpecification"),
        pitr == Some(&PointInTimeRecoveryStatus::Enabled),
        props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"]
            .as_bool()
            .unwrap_or(false),
    );
    Ok(())
}

async fn bucket_drift(
    stack: &LocalStack,
    logical: &str,
    bucket: &str,
    props: &Value,
    problems: &mut Vec<String>,
) -> Result<()> {
    only_known(
        logical,
        props,
        &[
            "BucketName",
            "BucketEncryption",
            "VersioningConfiguration",
            "PublicAccessBlockConfiguration",
            "OwnershipControls",
            "LifecycleConfiguration",
            "NotificationConfiguration",
        ],
        problems,
    );
    let s3 = stack.s3();
    check_eq(
        problems,
        format!("{logical} BucketName"),
        Some(bucket),
        props["BucketName"].as_str(),
    );

    let encryption = s3
        .get_bucket_encryption()
        .bucket(bucket)
        .send()
        .await
        .with_context(|| format!("{logical}: GetBucketEncryption"))?;
    let moto_sse: Vec<(Option<String>, Option<bool>)> = encryption
        .server_side_encryption_configuration()
        .map(|c| c.rules())
        .unwrap_or_default()
        .iter()
        .map(|r| {
            (
                r.apply_server_side_encryption_by_default()
                    .map(|d| d.sse_algorithm().as_str().to_string()),
                r.bucket_key_enabled(),
            )
        })
        .collect();
    let template_sse: Vec<(Option<String>, Option<bool>)> = props["BucketEncryption"]
        ["ServerSideEncryptionConfiguration"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["ServerSideEncryptionByDefault"]["SSEAlgorithm"]
                    .as_str()
                    .map(str::to_string),
                r["BucketKeyEnabled"].as_bool(),
            )
        })
        .collect();
    check_eq(
        problems,
        format!("{logical} BucketEncryption"),
        moto_sse,
        template_sse,
    );

    // GetBucketVersioning over plain HTTP: moto 5.2.5's response root element trips the SDK (see
    // bucket_is_versioned_encrypted_and_private).
    let raw = reqwest::get(format!("{}/{bucket}?versioning", stack.endpoint))
        .await?
        .text()
        .await?;
    let status = props["VersioningConfiguration"]["Status"]
        .as_str()
        .unwrap_or("Suspended");
    if !raw.contains(&format!("<Status>{status}</Status>")) {
        problems.push(format!(
            "{logical} VersioningConfiguration: moto says {raw}, the template says {status}"
        ));
    }

    let pab = s3
        .get_public_access_block()
        .bucket(bucket)
        .send()
        .await
        .with_context(|| format!("{logical}: GetPublicAccessBlock"))?;
    let pab = pab.public_access_block_configuration();
    let want = &props["PublicAccessBlockConfiguration"];
    check_eq(
        problems,
        format!("{logical} PublicAccessBlockConfiguration"),
        [
            pab.and_then(|p| p.block_public_acls()),
            pab.and_then(|p| p.block_public_policy()),
            pab.and_then(|p| p.ignore_public_acls()),
            pab.and_then(|p| p.restrict_public_buckets()),
        ],
        [
            want["BlockPublicAcls"].as_bool(),
            want["BlockPublicPolicy"].as_bool(),
            want["IgnorePublicAcls"].as_bool(),
            want["RestrictPublicBuckets"].as_bool(),
        ],
    );

    let ownership = s3
        .get_bucket_ownership_controls()
        .bucket(bucket)
        .send()
        .await
        .with_context(|| format!("{logical}: GetBucketOwnershipControls"))?;
    check_eq(
        problems,
        format!("{logical} OwnershipControls"),
        ownership
            .ownership_controls()
            .map(|c| c.rules())
            .unwrap_or_default()
            .iter()
            .map(|r| r.object_ownership().as_str().to_string())
            .collect::<Vec<_>>(),
        props["OwnershipControls"]["Rules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["ObjectOwnership"].as_str().map(str::to_string))
            .collect::<Vec<_>>(),
    );

    let lifecycle = s3
        .get_bucket_lifecycle_configuration()
        .bucket(bucket)
        .send()
        .await
        .with_context(|| format!("{logical}: GetBucketLifecycleConfiguration"))?;
    type Rule = (Option<String>, String, Option<i32>, Option<i32>);
    let moto_rules: Vec<Rule> = lifecycle
        .rules()
        .iter()
        .map(|r| {
            (
                r.id().map(str::to_string),
                r.status().as_str().to_string(),
                r.noncurrent_version_expiration()
                    .and_then(|e| e.noncurrent_days()),
                r.abort_incomplete_multipart_upload()
                    .and_then(|a| a.days_after_initiation()),
            )
        })
        .collect();
    let template_rules: Vec<Rule> = props["LifecycleConfiguration"]["Rules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["Id"].as_str().map(str::to_string),
                r["Status"].as_str().unwrap_or_default().to_string(),
                as_int(&r["NoncurrentVersionExpiration"]["NoncurrentDays"]).map(|d| d as i32),
                as_int(&r["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"]).map(|d| d as i32),
            )
        })
        .collect();
    check_eq(
        problems,
        format!("{logical} LifecycleConfiguration"),
        moto_rules,
        template_rules,
    );

    let notification = s3
        .get_bucket_notification_configuration()
        .bucket(bucket)
        .send()
        .await
        .with_context(|| format!("{logical}: GetBucketNotificationConfiguration"))?;
    // (queue ARN, events, filter rules as (lowercase name, value), sorted).
    type Target = (String, Vec<String>, Vec<(String, String)>);
    let moto_targets: Vec<Target> = notification
        .queue_configurations()
        .iter()
        .map(|q| {
            let mut rules: Vec<(String, String)> = q
                .filter()
                .and_then(|f| f.key())
                .map(|k| k.filter_rules())
                .unwrap_or_default()
                .iter()
                .map(|r| {
                    (
                        r.name()
                            .map(|n| n.as_str().to_ascii_lowercase())
                            .unwrap_or_default(),
                        r.value().unwrap_or_default().to_string(),
                    )
                })
                .collect();
            rules.sort();
            (
                q.queue_arn().to_string(),
                q.events().iter().map(|e| e.as_str().to_string()).collect(),
                rules,
            )
        })
        .collect();
    let template_targets: Vec<Target> = props["NotificationConfiguration"]["QueueConfigurations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|q| {
            let mut rules: Vec<(String, String)> = q["Filter"]["S3Key"]["Rules"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    (
                        r["Name"].as_str().unwrap_or_default().to_ascii_lowercase(),
                        r["Value"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect();
            rules.sort();
            (
                q["Queue"].as_str().unwrap_or_default().to_string(),
                vec![q["Event"].as_str().unwrap_or_default().to_string()],
                rules,
            )
        })
        .collect();
    check_eq(
        problems,
        format!("{logical} NotificationConfiguration"),
        moto_targets,
        template_targets,
    );
    Ok(())
}

async fn key_drift(
    stack: &LocalStack,
    logical: &str,
    key_id: &str,
    props: &Value,
    problems: &mut Vec<String>,
) -> Result<()> {
    // Not compared: the key policy (moto stores it but never evaluates it) and the description (moto
    // 5.2.5's DescribeKey response, which carries `"SigningAlgorithms": null`, fails in the Rust SDK).
    only_known(
        logical,
        props,
        &["Description", "EnableKeyRotation", "KeyPolicy"],
        problems,
    );
    let kms = stack.kms();
    let keys = kms
        .list_keys()
        .limit(1000)
        .send()
        .await
        .with_context(|| format!("{logical}: ListKeys"))?;
    if !keys.keys().iter().any(|k| k.key_id() == Some(key_id)) {
        problems.push(format!("{logical}: key {key_id} is not in moto"));
    }
    let rotation = kms
        .get_key_rotation_status()
        .key_id(key_id)
        .send()
        .await
        .with_context(|| format!("{logical}: GetKeyRotationStatus"))?;
    check_eq(
        problems,
        format!("{logical} EnableKeyRotation"),
        rotation.key_rotation_enabled(),
        props["EnableKeyRotation"].as_bool().unwrap_or(false),
    );
    Ok(())
}

/// Every queue, queue policy, table, bucket, key and alias of the translated template exists in moto
/// after `LocalStack::create`, with the template's settings. Values come from the template (resolved
/// for this stack), never from constants here, and a property the test does not compare fails it.
#[tokio::test]
async fn local_stack_does_not_drift_from_the_template() -> Result<()> {
    let stack = new_stack("drift").await?;
    let venvs = integration_tests::venv::ensure(&integration_tests::repo_root())?;
    let template = stack::translate_template(&venvs, &stack::template_path())?;
    let resolver = stack.resolver(&template).await?;
    let resources = template["Resources"]
        .as_object()
        .context("translated template has no Resources")?;

    let mut problems = Vec::new();
    let mut compared = std::collections::BTreeMap::<&str, usize>::new();
    for (logical, resource) in resources {
        let kind = resource["Type"].as_str().unwrap_or_default();
        if !matches!(
            kind,
            "AWS::SQS::Queue"
                | "AWS::SQS::QueuePolicy"
                | "AWS::DynamoDB::Table"
                | "AWS::S3::Bucket"
                | "AWS::KMS::Key"
                | "AWS::KMS::Alias"
        ) {
            continue;
        }
        let props = resolver
            .resolve(&resource["Properties"])
            .with_context(|| format!("resolving {logical}"))?;
        let physical = match kind {
            // moto's CloudFormation does not create queue policies (the harness sets them itself).
            "AWS::SQS::QueuePolicy" => String::new(),
            _ => resolver
                .physical_id(logical)
                .with_context(|| format!("{logical} ({kind}) is in the template but not in moto"))?,
        };
        match kind {
            "AWS::SQS::Queue" => queue_drift(&stack, logical, &physical, &props, &mut problems).await?,
            "AWS::DynamoDB::Table" => table_drift(&stack, logical, &physical, &props, &mut problems).await?,
            "AWS::S3::Bucket" => bucket_drift(&stack, logical, &physical, &props, &mut problems).await?,
            "AWS::KMS::Key" => key_drift(&stack, logical, &physical, &props, &mut problems).await?,
            "AWS::KMS::Alias" => {
                only_known(logical, &props, &["AliasName", "TargetKeyId"], &mut problems);
                let alias = props["AliasName"].as_str().context("alias without AliasName")?;
                let aliases = stack
                    .kms()
                    .list_aliases()
                    .key_id(
                        props["TargetKeyId"]
                            .as_str()
                            .context("alias without TargetKeyId")?,
                    )
                    .send()
                    .await
                    .with_context(|| format!("{logical}: ListAliases"))?;
                if !aliases.aliases().iter().any(|a| a.alias_name() == Some(alias)) {
                    problems.push(format!(
                        "{logical}: alias {alias} does not target its key in moto"
                    ));
                }
            }
            "AWS::SQS::QueuePolicy" => {
                only_known(logical, &props, &["Queues", "PolicyDocument"], &mut problems);
                for url in props["Queues"].as_array().into_iter().flatten() {
                    let url = url.as_str().context("queue policy target is not a URL")?;
                    let attrs = stack
                        .sqs()
                        .get_queue_attributes()
                        .queue_url(url)
                        .attribute_names(QueueAttributeName::Policy)
                        .send()
                        .await
                        .with_context(|| format!("{logical}: GetQueueAttributes Policy"))?;
                    let policy: Value = attrs
                        .attributes()
                        .and_then(|a| a.get(&QueueAttributeName::Policy))
                        .map(|p| serde_json::from_str(p))
                        .transpose()?
                        .unwrap_or(Value::Null);
                    check_eq(
                        &mut problems,
                        format!("{logical} PolicyDocument on {url}"),
                        &policy,
                        &props["PolicyDocument"],
                    );
                }
            }
            _ => unreachable!("filtered above"),
        }
        *compared.entry(kind).or_default() += 1;
    }
    assert!(
        problems.is_empty(),
        "the local stack drifted from the template:\n{}",
        problems.join("\n")
    );
    // The comparison really covered the stack (5 queues incl. the poller's DLQ, 3 tables, 1 bucket, ...).
    assert_eq!(compared.get("AWS::SQS::Queue"), Some(&5), "{compared:?}");
    assert_eq!(compared.get("AWS::DynamoDB::Table"), Some(&3), "{compared:?}");
    assert_eq!(compared.get("AWS::S3::Bucket"), Some(&1), "{compared:?}");
    assert_eq!(compared.get("AWS::KMS::Key"), Some(&1), "{compared:?}");
    assert_eq!(compared.get("AWS::SQS::QueuePolicy"), Some(&1), "{compared:?}");
    Ok(())
}

/// moto's own event-source mappings (trap 13 of docs/local-stack.md) are disabled by
/// `LocalStack::create`: a message sent to the ingest queue is received once, by us, with a receive
/// count of 1 — not already received (and made visible again) by moto's mapping on SendMessage.
#[tokio::test]
async fn moto_event_source_mappings_are_disabled_and_never_receive_messages() -> Result<()> {
    let stack = new_stack("esm-off").await?;
    let sqs = stack.sqs();
    for _ in 0..3 {
        sqs.send_message()
            .queue_url(&stack.ingest_queue_url)
            .message_body(r#"{"probe":true}"#)
            .send()
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut counts = Vec::new();
    let started = Instant::now();
    while counts.len() < 3 && started.elapsed() < Duration::from_secs(10) {
        let r = sqs
            .receive_message()
            .queue_url(&stack.ingest_queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_system_attribute_names(
                aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount,
            )
            .send()
            .await?;
        for m in r.messages() {
            if m.body() == Some(r#"{"probe":true}"#) {
                counts.push(
                    m.attributes()
                        .and_then(|a| {
                            a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount)
                        })
                        .cloned()
                        .unwrap_or_default(),
                );
            }
        }
    }
    assert_eq!(counts, vec!["1", "1", "1"], "received by moto's mapping first");
    // And every mapping moto holds says so.
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential=testing/20260101/{}/lambda/aws4_request, SignedHeaders=host, Signature=0",
        stack::REGION
    );
    let list: Value = reqwest::Client::new()
        .get(format!(
            "{}/2015-03-31/event-source-mappings/",
            stack.endpoint.trim_end_matches('/')
        ))
        .header(reqwest::header::AUTHORIZATION, auth)
        .send()
        .await?
        .json()
        .await?;
    // This stack's (other tests' stacks share the moto): by the queues they read.
    let queues: Vec<&str> = [&stack.ingest_queue_url, &stack.clusters_queue_url]
        .iter()
        .filter_map(|u| u.rsplit('/').next())
        .collect();
    let states: Vec<&str> = list["EventSourceMappings"]
        .as_array()
        .context("mappings")?
        .iter()
        .filter(|m| {
            m["EventSourceArn"]
                .as_str()
                .is_some_and(|a| queues.iter().any(|q| a.ends_with(&format!(":{q}"))))
        })
        .filter_map(|m| m["State"].as_str())
        .collect();
    assert!(
        !states.is_empty(),
        "the template's mappings exist in moto: {list}"
    );
    assert!(states.iter().all(|s| *s == "Disabled"), "{states:?}");
    Ok(())
}

/// The harness's CloudFormation calls (`integration_tests::cfn`) against moto itself: a stack it created
/// reads back with its status, outputs and resources; a stack that does not exist, and a template moto
/// refuses, are errors that carry moto's own code and message, not an empty answer.
#[tokio::test]
async fn cloudformation_calls_read_moto_and_report_its_errors() -> Result<()> {
    use integration_tests::cfn::Cfn;
    let stack = new_stack("cfn").await?;
    let cfn = Cfn::new(&stack.endpoint);
    let described = cfn
        .describe_stack(&stack.stack_name)
        .await?
        .context("the stack just created is described")?;
    assert_eq!(described.status, "CREATE_COMPLETE");
    assert!(
        described
            .outputs
            .iter()
            .any(|(k, v)| k == "BucketName" && v == &stack.bucket),
        "{described:?}"
    );
    let resources = cfn.list_stack_resources(&stack.stack_name).await?;
    assert!(
        resources.iter().any(|r| r.resource_type == "AWS::S3::Bucket"
            && r.physical_id.as_deref() == Some(stack.bucket.as_str())),
        "{resources:?}"
    );

    let missing = stack::unique_stack_name("none");
    let err = format!("{:#}", cfn.describe_stack(&missing).await.unwrap_err());
    assert!(err.contains("ValidationError") && err.contains(&missing), "{err}");

    let bad = cfn
        .create_stack(&stack::unique_stack_name("bad"), "{\"Resources\": 7}", &[], &[])
        .await
        .unwrap_err();
    assert!(format!("{bad:#}").contains("CreateStack"), "{bad:#}");
    Ok(())
}
