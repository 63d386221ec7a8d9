//! The local AWS stack, created from THE definition: `infra/template.yaml`.
//!
//! The SAM template is translated offline by aws-sam-translator (`infra/sam_translate.py`), created as a
//! CloudFormation stack in moto, and then the properties moto's CloudFormation ignores are applied with
//! direct API calls read from the same translated resources (see [`LocalStack::create`]). Nothing about
//! the resources is written down twice.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_s3::config::Credentials;
use serde_json::Value;

use crate::cfn::Cfn;
use crate::venv::{self, Venvs};

/// moto's fixed account id.
pub const ACCOUNT_ID: &str = "123456789012";
/// The one region used locally (trap 2).
pub const REGION: &str = "us-east-1";
/// Dummy credentials moto accepts.
pub const ACCESS_KEY_ID: &str = "test";
/// Dummy credentials moto accepts.
pub const SECRET_ACCESS_KEY: &str = "test";
/// Bucket holding the placeholder function code the translated template points at.
pub const ARTIFACTS_BUCKET: &str = "relay-local-artifacts";
/// Key of the placeholder function code.
pub const ARTIFACT_KEY: &str = "bootstrap.zip";
/// Longest stack name the template supports (the bucket name adds `-sequences-<account>-<region>`).
pub const MAX_STACK_NAME_LEN: usize = 25;

/// An empty but valid zip archive (just the end-of-central-directory record): moto's Lambda only stores
/// the code, it cannot run it (no Docker), so the placeholder needs no content. Hand-written to avoid a
/// zip dependency for 22 constant bytes.
const EMPTY_ZIP: [u8; 22] = [
    0x50, 0x4b, 0x05, 0x06, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// Where the Mapillary simulator (or the real service) is, as the functions are configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimEndpoints {
    /// `MAPILLARY_GRAPH_URL`
    pub graph_url: String,
    /// `MAPILLARY_UPLOAD_URL`
    pub upload_url: String,
    /// `MAPILLARY_TILES_URL`
    pub tiles_url: String,
    /// `MAPILLARY_WWW_URL`
    pub www_url: String,
    /// `MAPILLARY_CLIENT_ID`
    pub client_id: String,
    /// `MAPILLARY_CLIENT_SECRET` (plain; local use only).
    pub client_secret: String,
    /// `MAPILLARY_FEED_TOKEN` (plain; local use only): the web-app client token the poller calls the
    /// activity feed with first. `None` (the default of [`SimEndpoints::from_base`]) leaves it unset, so
    /// the poller falls back to each user's own token.
    pub feed_token: Option<String>,
}

impl SimEndpoints {
    /// The simulator's four bases under one base URL (`/graph`, `/rupload`, `/tiles`, `/www`).
    pub fn from_base(base_url: &str, client_id: &str, client_secret: &str) -> Self {
        let base = base_url.trim_end_matches('/');
        Self {
            graph_url: format!("{base}/graph"),
            upload_url: format!("{base}/rupload"),
            tiles_url: format!("{base}/tiles"),
            www_url: format!("{base}/www"),
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            feed_token: None,
        }
    }

    /// The same endpoints with a web-app feed token (e.g. the simulator's
    /// `mapillary_sim::defaults::WEB_APP_CLIENT_TOKEN`, the only token its strict worlds' feed takes).
    pub fn with_feed_token(mut self, token: impl Into<String>) -> Self {
        self.feed_token = Some(token.into());
        self
    }
}

/// `infra/template.yaml` in the repository.
pub fn template_path() -> PathBuf {
    crate::repo_root().join("infra/template.yaml")
}

/// Translates the SAM template into CloudFormation JSON with `infra/sam_translate.py` (run by the
/// `.venv/aws` interpreter). Function `CodeUri`s point at the placeholder artifact. Cached per process
/// and template path.
pub fn translate_template(venvs: &Venvs, template: &Path) -> Result<Arc<Value>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<Value>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().map_err(|_| anyhow!("template cache poisoned"))?;
    if let Some(hit) = cache.get(template) {
        return Ok(hit.clone());
    }
    let script = template
        .parent()
        .map(|dir| dir.join("sam_translate.py"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| crate::repo_root().join("infra/sam_translate.py"));
    let output = Command::new(venvs.python())
        .arg(&script)
        .arg(template)
        .arg("--code-uri")
        .arg(format!("s3://{ARTIFACTS_BUCKET}/{ARTIFACT_KEY}"))
        .env("AWS_DEFAULT_REGION", REGION)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "translating {} failed ({}): {}",
            template.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let value: Value = serde_json::from_slice(&output.stdout).context("parsing the translated template")?;
    let value = Arc::new(value);
    cache.insert(template.to_path_buf(), value.clone());
    Ok(value)
}

/// SDK configuration for moto at `endpoint`: region us-east-1, dummy credentials.
/// For S3 build the client with [`s3_client`] (path-style addressing, trap 1).
pub async fn sdk_config(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(
            ACCESS_KEY_ID,
            SECRET_ACCESS_KEY,
            None,
            None,
            "relay-local",
        ))
        .load()
        .await
}

/// An S3 client for moto: path-style addressing.
pub fn s3_client(config: &SdkConfig) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::config::Builder::from(config)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// A stack name that fits the template's limits: `t-<tag>-<8 random hex>`, lowercase, at most
/// [`MAX_STACK_NAME_LEN`] characters.
pub fn unique_stack_name(tag: &str) -> String {
    let clean: String = tag
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let random = uuid::Uuid::new_v4().simple().to_string();
    let max_tag = MAX_STACK_NAME_LEN - "t--".len() - 8;
    let tag = clean.trim_matches('-');
    let tag = &tag[..tag.len().min(max_tag)];
    format!("t-{}-{}", tag.trim_end_matches('-'), &random[..8])
}

/// Checks a stack name against what the template needs (it derives the bucket name from it).
pub fn validate_stack_name(name: &str) -> Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let starts = name.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    if !ok_chars || !starts || name.len() > MAX_STACK_NAME_LEN || name.ends_with('-') {
        bail!(
            "stack name {name:?} must be 1-{MAX_STACK_NAME_LEN} chars of [a-z0-9-], start with a letter and not \
             end with '-' (the bucket name is derived from it)"
        );
    }
    Ok(())
}

/// One stack of the template, created in moto. Each test creates its own (own stack name → own bucket,
/// queues, tables and key).
#[derive(Debug, Clone)]
pub struct LocalStack {
    /// The CloudFormation stack name.
    pub stack_name: String,
    /// moto's endpoint.
    pub endpoint: String,
    /// Every stack output (`OutputKey` → `OutputValue`).
    pub outputs: BTreeMap<String, String>,
    /// `RELAY_BUCKET`
    pub bucket: String,
    /// `RELAY_INGEST_QUEUE_URL`
    pub ingest_queue_url: String,
    /// The ingest queue's dead-letter queue.
    pub ingest_dlq_url: String,
    /// `RELAY_CLUSTERS_QUEUE_URL`
    pub clusters_queue_url: String,
    /// The clusters queue's dead-letter queue.
    pub clusters_dlq_url: String,
    /// `RELAY_UPLOADS_TABLE`
    pub uploads_table: String,
    /// `RELAY_USERS_TABLE`
    pub users_table: String,
    /// `RELAY_IDEMPOTENCY_TABLE`
    pub idempotency_table: String,
    /// `RELAY_TOKEN_KEY_ID`
    pub token_key_id: String,
    /// `RELAY_EVENT_BUS`: the bus status-change events are published on.
    pub event_bus: String,
    /// The token key's ARN.
    pub token_key_arn: String,
    /// The value given to the `MapillaryClientSecretArn` parameter (no such secret exists locally;
    /// [`LocalStack::lambda_env`] passes the plain secret too).
    pub client_secret_arn: String,
    sdk_config: SdkConfig,
}

impl LocalStack {
    /// Creates stack `stack_name` from `infra/template.yaml` in the moto at `endpoint` and waits for it.
    ///
    /// Steps: ensure the venvs; translate the template (cached); upload the placeholder code zip to
    /// [`ARTIFACTS_BUCKET`]; `CreateStack` (parameters `Env=local`, a local `MapillaryClientSecretArn`);
    /// wait for `CREATE_COMPLETE`; read the outputs; then apply, from the same translated resources, what
    /// moto's CloudFormation ignores ([`apply_skipped_properties`]), and disable moto's own event-source
    /// mappings ([`disable_moto_event_source_mappings`]).
    pub async fn create(endpoint: &str, stack_name: &str) -> Result<Self> {
        validate_stack_name(stack_name)?;
        let venvs = venv::ensure(&crate::repo_root())?;
        let template = translate_template(&venvs, &template_path())?;
        let sdk_config = sdk_config(endpoint).await;
        upload_placeholder_code(&s3_client(&sdk_config)).await?;

        let client_secret_arn = local_client_secret_arn(stack_name);
        let params = stack_params(stack_name);
        let cfn = Cfn::new(endpoint);
        cfn.create_stack(stack_name, &template.to_string(), &params, &["CAPABILITY_IAM"])
            .await
            .with_context(|| format!("CreateStack {stack_name}"))?;
        let outputs = wait_for_outputs(&cfn, stack_name).await?;

        let resources = stack_resources(&cfn, stack_name).await?;
        let resolver = Resolver::new(&template, stack_name, &params, resources)?;
        apply_skipped_properties(&sdk_config, &template, &resolver).await?;
        disable_moto_event_source_mappings(endpoint).await?;

        let out = |key: &str| {
            outputs
                .get(key)
                .cloned()
                .ok_or_else(|| anyhow!("stack {stack_name} has no output {key}"))
        };
        Ok(Self {
            stack_name: stack_name.to_string(),
            endpoint: endpoint.to_string(),
            bucket: out("BucketName")?,
            ingest_queue_url: out("IngestQueueUrl")?,
            ingest_dlq_url: out("IngestDLQUrl")?,
            clusters_queue_url: out("ClustersQueueUrl")?,
            clusters_dlq_url: out("ClustersDLQUrl")?,
            uploads_table: out("UploadsTableName")?,
            users_table: out("UsersTableName")?,
            idempotency_table: out("IdempotencyTableName")?,
            token_key_id: out("TokenKeyId")?,
            event_bus: out("EventBusName")?,
            token_key_arn: out("TokenKeyArn")?,
            client_secret_arn,
            outputs,
            sdk_config,
        })
    }

    /// A [`Resolver`] for `template` (the translated template) as this stack instantiated it: the
    /// parameters [`LocalStack::create`] passed and the physical ids CloudFormation reports. Lets a test
    /// compare what moto holds with what the template says.
    pub async fn resolver(&self, template: &Value) -> Result<Resolver> {
        let cfn = Cfn::new(&self.endpoint);
        let resources = stack_resources(&cfn, &self.stack_name).await?;
        Resolver::new(
            template,
            &self.stack_name,
            &stack_params(&self.stack_name),
            resources,
        )
    }

    /// SDK configuration pointing at this stack's moto (region, dummy credentials, endpoint).
    pub fn sdk_config(&self) -> &SdkConfig {
        &self.sdk_config
    }

    /// A path-style S3 client for this stack's moto.
    pub fn s3(&self) -> aws_sdk_s3::Client {
        s3_client(&self.sdk_config)
    }

    /// An SQS client for this stack's moto.
    pub fn sqs(&self) -> aws_sdk_sqs::Client {
        aws_sdk_sqs::Client::new(&self.sdk_config)
    }

    /// A DynamoDB client for this stack's moto.
    pub fn dynamodb(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::new(&self.sdk_config)
    }

    /// A KMS client for this stack's moto.
    pub fn kms(&self) -> aws_sdk_kms::Client {
        aws_sdk_kms::Client::new(&self.sdk_config)
    }

    /// The environment a function of this stack sees: the template's variables (`RELAY_*`,
    /// `MAPILLARY_*`) with this stack's values and `sim`'s endpoints, plus `MAPILLARY_CLIENT_SECRET`
    /// (plain, local only), `MAPILLARY_FEED_TOKEN` when `sim` has one (plain, local only),
    /// `RELAY_WEBHOOK_ALLOW_LOCAL=true` (local only: loopback webhook receivers), and what
    /// points the SDK at moto (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_DEFAULT_REGION`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
    pub fn lambda_env(&self, sim: &SimEndpoints) -> Vec<(String, String)> {
        let feed_token = sim.feed_token.as_deref().map(|t| ("MAPILLARY_FEED_TOKEN", t));
        [
            ("RELAY_BUCKET", self.bucket.as_str()),
            ("RELAY_INGEST_QUEUE_URL", &self.ingest_queue_url),
            ("RELAY_CLUSTERS_QUEUE_URL", &self.clusters_queue_url),
            ("RELAY_UPLOADS_TABLE", &self.uploads_table),
            ("RELAY_USERS_TABLE", &self.users_table),
            ("RELAY_IDEMPOTENCY_TABLE", &self.idempotency_table),
            ("RELAY_TOKEN_KEY_ID", &self.token_key_id),
            ("RELAY_EVENT_BUS", &self.event_bus),
            ("MAPILLARY_GRAPH_URL", &sim.graph_url),
            ("MAPILLARY_UPLOAD_URL", &sim.upload_url),
            ("MAPILLARY_TILES_URL", &sim.tiles_url),
            ("MAPILLARY_WWW_URL", &sim.www_url),
            ("MAPILLARY_CLIENT_ID", &sim.client_id),
            ("MAPILLARY_CLIENT_SECRET_ARN", &self.client_secret_arn),
            ("MAPILLARY_CLIENT_SECRET", &sim.client_secret),
            // The secret's ARN stays empty locally: `sim.feed_token` is passed plain (below), if any.
            ("MAPILLARY_FEED_TOKEN_SECRET_ARN", ""),
            ("AWS_ENDPOINT_URL", &self.endpoint),
            ("AWS_REGION", REGION),
            ("AWS_DEFAULT_REGION", REGION),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY),
            // Local only (the template never sets it: deployed, webhooks are strict): webhook
            // receivers of tests and the demo listen on loopback, over http.
            ("RELAY_WEBHOOK_ALLOW_LOCAL", "true"),
        ]
        .into_iter()
        .chain(feed_token)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Deletes the stack (moto deletes its resources; the bucket must be empty for that to succeed).
    pub async fn delete(&self) -> Result<()> {
        Cfn::new(&self.endpoint)
            .delete_stack(&self.stack_name)
            .await
            .with_context(|| format!("DeleteStack {}", self.stack_name))?;
        Ok(())
    }
}

/// The `MapillaryClientSecretArn` given to a local stack (no such secret exists in moto).
fn local_client_secret_arn(stack_name: &str) -> String {
    format!("arn:aws:secretsmanager:{REGION}:{ACCOUNT_ID}:secret:{stack_name}-mapillary-client-secret")
}

/// The parameters a local stack is created with; every other parameter keeps the template's default.
fn stack_params(stack_name: &str) -> Vec<(&'static str, String)> {
    vec![
        ("Env", "local".to_string()),
        ("MapillaryClientSecretArn", local_client_secret_arn(stack_name)),
    ]
}

/// The `Authorization` header of a request made to moto without the SDK: unsigned (moto does not check
/// signatures); moto reads the region, and the service, from its credential scope.
pub(crate) fn moto_authorization(service: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential=testing/20260101/{REGION}/{service}/aws4_request, SignedHeaders=host, Signature=0"
    )
}

/// Disable every event-source mapping moto created from the template. moto "runs" an SQS mapping on
/// every SendMessage: it receives a batch, fails to invoke the function (it has none to run) and
/// makes the batch visible again — raising `ApproximateReceiveCount` without any delivery, so under
/// many notifications messages reach the redrive policy's `maxReceiveCount` and the DLQ unseen.
/// Deliveries are the emulated mapping's job ([`crate::esm::SqsEventSource`]). Through moto's Lambda
/// API (ListEventSourceMappings, UpdateEventSourceMapping `Enabled: false`); moto_server routes a
/// request by the credential scope of its Authorization header and checks no signature.
pub async fn disable_moto_event_source_mappings(endpoint: &str) -> Result<()> {
    let http = reqwest::Client::new();
    let base = format!(
        "{}/2015-03-31/event-source-mappings/",
        endpoint.trim_end_matches('/')
    );
    let auth = moto_authorization("lambda");
    let list = http
        .get(&base)
        .header(reqwest::header::AUTHORIZATION, &auth)
        .send()
        .await
        .context("ListEventSourceMappings (moto)")?;
    let status = list.status();
    let list: Value = list
        .json()
        .await
        .context("ListEventSourceMappings (moto): reply")?;
    if !status.is_success() {
        bail!("ListEventSourceMappings (moto): {status} {list}");
    }
    for m in list["EventSourceMappings"].as_array().into_iter().flatten() {
        let Some(uuid) = m["UUID"].as_str() else { continue };
        let r = http
            .put(format!("{base}{uuid}"))
            .header(reqwest::header::AUTHORIZATION, &auth)
            .json(&serde_json::json!({ "Enabled": false }))
            .send()
            .await
            .context("UpdateEventSourceMapping (moto)")?;
        let status = r.status();
        let r: Value = r.json().await.context("UpdateEventSourceMapping (moto): reply")?;
        if !status.is_success() || r["State"] != "Disabled" {
            bail!(
                "moto's event-source mapping {uuid} is still {} ({status})",
                r["State"]
            );
        }
    }
    Ok(())
}

/// The names of the function environment variables the template sets in its Globals (the names every
/// function has), sorted.
pub fn template_env_names(template: &Value) -> Vec<String> {
    // After translation the Globals are merged into each function, beside the function's own
    // variables: the Globals are the names every function has.
    let mut per_function = template["Resources"]
        .as_object()
        .into_iter()
        .flat_map(|r| r.values())
        .filter(|r| r["Type"] == "AWS::Lambda::Function")
        .map(|f| {
            f["Properties"]["Environment"]["Variables"]
                .as_object()
                .map(|vars| {
                    vars.keys()
                        .cloned()
                        .collect::<std::collections::BTreeSet<String>>()
                })
                .unwrap_or_default()
        });
    let Some(first) = per_function.next() else {
        return Vec::new();
    };
    per_function
        .fold(first, |common, vars| {
            common.intersection(&vars).cloned().collect()
        })
        .into_iter()
        .collect()
}

async fn upload_placeholder_code(s3: &aws_sdk_s3::Client) -> Result<()> {
    if let Err(err) = s3.create_bucket().bucket(ARTIFACTS_BUCKET).send().await {
        let already = err
            .as_service_error()
            .is_some_and(|e| e.is_bucket_already_owned_by_you() || e.is_bucket_already_exists());
        if !already {
            return Err(err).context("creating the artifacts bucket");
        }
    }
    s3.put_object()
        .bucket(ARTIFACTS_BUCKET)
        .key(ARTIFACT_KEY)
        .body(EMPTY_ZIP.to_vec().into())
        .send()
        .await
        .context("uploading the placeholder function code")?;
    Ok(())
}

async fn wait_for_outputs(cfn: &Cfn, stack_name: &str) -> Result<BTreeMap<String, String>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stack = cfn
            .describe_stack(stack_name)
            .await
            .with_context(|| format!("DescribeStacks {stack_name}"))?
            .ok_or_else(|| anyhow!("stack {stack_name} not found"))?;
        match stack.status.as_str() {
            "CREATE_COMPLETE" => {
                // moto leaves `${…}` in outputs that refer to resources it does not create (the HTTP API:
                // moto has no ApiGatewayV2 in CloudFormation); locally the status API runs under
                // `cargo lambda watch` instead, so such outputs are dropped rather than reported wrongly.
                return Ok(stack
                    .outputs
                    .into_iter()
                    .filter(|(_, value)| !value.contains("${"))
                    .collect());
            }
            "CREATE_IN_PROGRESS" | "" => {}
            other => bail!(
                "stack {stack_name} ended {other}: {}",
                stack.reason.as_deref().unwrap_or("no reason given")
            ),
        }
        if Instant::now() > deadline {
            bail!("stack {stack_name} not CREATE_COMPLETE after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Logical id → (type, physical id).
async fn stack_resources(cfn: &Cfn, stack_name: &str) -> Result<HashMap<String, (String, String)>> {
    Ok(cfn
        .list_stack_resources(stack_name)
        .await
        .with_context(|| format!("ListStackResources {stack_name}"))?
        .into_iter()
        .filter_map(|r| Some((r.logical_id, (r.resource_type, r.physical_id?))))
        .collect())
}

// ------------------------------------------------------------------ what moto's CloudFormation skips

/// Properties moto 5.2.5's CloudFormation honours itself, per resource type (found by creating the
/// stack and reading the resources back). Everything else the template sets on these types is applied
/// by [`apply_skipped_properties`]; a property in neither list fails stack creation, so the template
/// cannot quietly gain a setting the local stack lacks.
const HONOURED: &[(&str, &[&str])] = &[
    ("AWS::S3::Bucket", &["BucketName"]),
    (
        "AWS::SQS::Queue",
        &[
            "SqsManagedSseEnabled",
            "VisibilityTimeout",
            "MessageRetentionPeriod",
            "RedrivePolicy",
        ],
    ),
    (
        "AWS::DynamoDB::Table",
        &[
            "BillingMode",
            "AttributeDefinitions",
            "KeySchema",
            "GlobalSecondaryIndexes",
        ],
    ),
];

/// Properties applied by direct API calls after CreateStack.
const APPLIED: &[(&str, &[&str])] = &[
    (
        "AWS::S3::Bucket",
        &[
            "BucketEncryption",
            "VersioningConfiguration",
            "PublicAccessBlockConfiguration",
            "OwnershipControls",
            "LifecycleConfiguration",
            "NotificationConfiguration",
        ],
    ),
    ("AWS::SQS::Queue", &[]),
    (
        "AWS::DynamoDB::Table",
        // SSESpecification: DynamoDB always encrypts; moto does not model the setting (DescribeTable has
        // no SSEDescription) and the owned-key default is what the template asks for. Accepted as is.
        &[
            "TimeToLiveSpecification",
            "PointInTimeRecoverySpecification",
            "SSESpecification",
        ],
    ),
];

/// Applies what moto's CloudFormation ignores, reading every value from the translated template:
/// bucket encryption, versioning, public access block, ownership controls, lifecycle and the
/// notification configuration (S3 → ingest queue); table TTL and point-in-time recovery; queue policies.
/// Bucket policies are not applied: moto does not evaluate them, and the template's deny-insecure-
/// transport statement would only describe plain-HTTP moto as "insecure".
/// CloudWatch alarms are not created: moto 5.2.5's CloudFormation skips `AWS::CloudWatch::Alarm` and
/// nothing local would ever evaluate them; `tests/tests/infra_checks.rs` checks them in the template.
pub async fn apply_skipped_properties(
    config: &SdkConfig,
    template: &Value,
    resolver: &Resolver,
) -> Result<()> {
    let s3 = s3_client(config);
    let ddb = aws_sdk_dynamodb::Client::new(config);
    let sqs = aws_sdk_sqs::Client::new(config);
    let resources = template["Resources"]
        .as_object()
        .ok_or_else(|| anyhow!("translated template has no Resources"))?;
    for (logical, resource) in resources {
        let kind = resource["Type"].as_str().unwrap_or_default();
        if !matches!(
            kind,
            "AWS::S3::Bucket" | "AWS::DynamoDB::Table" | "AWS::SQS::Queue" | "AWS::SQS::QueuePolicy"
        ) {
            continue;
        }
        let props = resolver
            .resolve(&resource["Properties"])
            .with_context(|| format!("resolving {logical}'s properties"))?;
        check_known_properties(logical, kind, &props)?;
        match kind {
            "AWS::S3::Bucket" => apply_bucket(&s3, &resolver.physical_id(logical)?, &props)
                .await
                .with_context(|| format!("applying {logical}'s properties"))?,
            "AWS::DynamoDB::Table" => apply_table(&ddb, &resolver.physical_id(logical)?, &props)
                .await
                .with_context(|| format!("applying {logical}'s properties"))?,
            "AWS::SQS::QueuePolicy" => {
                let policy = serde_json::to_string(&props["PolicyDocument"])?;
                for queue_url in props["Queues"].as_array().into_iter().flatten() {
                    let url = queue_url
                        .as_str()
                        .ok_or_else(|| anyhow!("{logical}: queue is not a string"))?;
                    sqs.set_queue_attributes()
                        .queue_url(url)
                        .attributes(aws_sdk_sqs::types::QueueAttributeName::Policy, &policy)
                        .send()
                        .await
                        .with_context(|| format!("{logical}: SetQueueAttributes Policy"))?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_known_properties(logical: &str, kind: &str, props: &Value) -> Result<()> {
    let known = |table: &[(&str, &[&'static str])]| {
        table
            .iter()
            .find(|(t, _)| *t == kind)
            .map(|(_, names)| names.to_vec())
    };
    let (Some(honoured), Some(applied)) = (known(HONOURED), known(APPLIED)) else {
        return Ok(());
    };
    for name in props.as_object().into_iter().flat_map(|o| o.keys()) {
        if !honoured.contains(&name.as_str()) && !applied.contains(&name.as_str()) {
            bail!(
                "{logical} ({kind}) sets {name}, which moto's CloudFormation may ignore and the local stack does \
                 not apply: teach tests/src/stack.rs (HONOURED/APPLIED) about it"
            );
        }
    }
    Ok(())
}

async fn apply_bucket(s3: &aws_sdk_s3::Client, bucket: &str, props: &Value) -> Result<()> {
    use aws_sdk_s3::types::*;

    if let Some(rules) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"].as_array() {
        let mut conf = ServerSideEncryptionConfiguration::builder();
        for rule in rules {
            let default = &rule["ServerSideEncryptionByDefault"];
            let algorithm = default["SSEAlgorithm"].as_str().unwrap_or("AES256");
            let by_default = ServerSideEncryptionByDefault::builder()
                .sse_algorithm(ServerSideEncryption::from(algorithm))
                .set_kms_master_key_id(default["KMSMasterKeyID"].as_str().map(str::to_string))
                .build()?;
            conf = conf.rules(
                ServerSideEncryptionRule::builder()
                    .apply_server_side_encryption_by_default(by_default)
                    .set_bucket_key_enabled(rule["BucketKeyEnabled"].as_bool())
                    .build(),
            );
        }
        s3.put_bucket_encryption()
            .bucket(bucket)
            .server_side_encryption_configuration(conf.build()?)
            .send()
            .await
            .context("PutBucketEncryption")?;
    }
    if let Some(status) = props["VersioningConfiguration"]["Status"].as_str() {
        s3.put_bucket_versioning()
            .bucket(bucket)
            .versioning_configuration(
                VersioningConfiguration::builder()
                    .status(BucketVersioningStatus::from(status))
                    .build(),
            )
            .send()
            .await
            .context("PutBucketVersioning")?;
    }
    let pab = &props["PublicAccessBlockConfiguration"];
    if pab.is_object() {
        s3.put_public_access_block()
            .bucket(bucket)
            .public_access_block_configuration(
                PublicAccessBlockConfiguration::builder()
                    .set_block_public_acls(pab["BlockPublicAcls"].as_bool())
                    .set_block_public_policy(pab["BlockPublicPolicy"].as_bool())
                    .set_ignore_public_acls(pab["IgnorePublicAcls"].as_bool())
                    .set_restrict_public_buckets(pab["RestrictPublicBuckets"].as_bool())
                    .build(),
            )
            .send()
            .await
            .context("PutPublicAccessBlock")?;
    }
    if let Some(rules) = props["OwnershipControls"]["Rules"].as_array() {
        let mut controls = OwnershipControls::builder();
        for rule in rules {
            let ownership = rule["ObjectOwnership"]
                .as_str()
                .ok_or_else(|| anyhow!("OwnershipControls rule without ObjectOwnership"))?;
            controls = controls.rules(
                OwnershipControlsRule::builder()
                    .object_ownership(ObjectOwnership::from(ownership))
                    .build()?,
            );
        }
        s3.put_bucket_ownership_controls()
            .bucket(bucket)
            .ownership_controls(controls.build()?)
            .send()
            .await
            .context("PutBucketOwnershipControls")?;
    }
    if let Some(rules) = props["LifecycleConfiguration"]["Rules"].as_array() {
        let mut conf = BucketLifecycleConfiguration::builder();
        for rule in rules {
            conf = conf.rules(lifecycle_rule(rule)?);
        }
        s3.put_bucket_lifecycle_configuration()
            .bucket(bucket)
            .lifecycle_configuration(conf.build()?)
            .send()
            .await
            .context("PutBucketLifecycleConfiguration")?;
    }
    let notification = &props["NotificationConfiguration"];
    if notification.is_object() {
        s3.put_bucket_notification_configuration()
            .bucket(bucket)
            .notification_configuration(notification_configuration(notification)?)
            .send()
            .await
            .context("PutBucketNotificationConfiguration")?;
    }
    Ok(())
}

fn lifecycle_rule(rule: &Value) -> Result<aws_sdk_s3::types::LifecycleRule> {
    use aws_sdk_s3::types::*;
    let known = [
        "Id",
        "Status",
        "Prefix",
        "NoncurrentVersionExpiration",
        "AbortIncompleteMultipartUpload",
        "ExpirationInDays",
    ];
    if let Some(unknown) = rule
        .as_object()
        .into_iter()
        .flat_map(|o| o.keys())
        .find(|k| !known.contains(&k.as_str()))
    {
        bail!("lifecycle rule field {unknown} is not applied locally: extend lifecycle_rule()");
    }
    let status = rule["Status"].as_str().unwrap_or("Enabled");
    let filter = LifecycleRuleFilter::builder()
        .prefix(rule["Prefix"].as_str().unwrap_or_default())
        .build();
    Ok(LifecycleRule::builder()
        .set_id(rule["Id"].as_str().map(str::to_string))
        .status(ExpirationStatus::from(status))
        .filter(filter)
        .set_expiration(
            rule["ExpirationInDays"]
                .as_i64()
                .map(|d| LifecycleExpiration::builder().days(d as i32).build()),
        )
        .set_noncurrent_version_expiration(
            rule["NoncurrentVersionExpiration"]["NoncurrentDays"]
                .as_i64()
                .map(|d| {
                    NoncurrentVersionExpiration::builder()
                        .noncurrent_days(d as i32)
                        .build()
                }),
        )
        .set_abort_incomplete_multipart_upload(
            rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"]
                .as_i64()
                .map(|d| {
                    AbortIncompleteMultipartUpload::builder()
                        .days_after_initiation(d as i32)
                        .build()
                }),
        )
        .build()?)
}

/// CloudFormation's `NotificationConfiguration` (queue configurations only; the template has no topic or
/// function targets, and anything else is an error) → the S3 API shape.
fn notification_configuration(cfn: &Value) -> Result<aws_sdk_s3::types::NotificationConfiguration> {
    use aws_sdk_s3::types::*;
    if let Some(other) = cfn
        .as_object()
        .into_iter()
        .flat_map(|o| o.keys())
        .find(|k| k.as_str() != "QueueConfigurations")
    {
        bail!(
            "NotificationConfiguration.{other} is not applied locally: extend notification_configuration()"
        );
    }
    let mut conf = NotificationConfiguration::builder();
    for queue in cfn["QueueConfigurations"].as_array().into_iter().flatten() {
        let arn = queue["Queue"]
            .as_str()
            .ok_or_else(|| anyhow!("QueueConfiguration without a resolved Queue ARN"))?;
        let event = queue["Event"]
            .as_str()
            .ok_or_else(|| anyhow!("QueueConfiguration without Event"))?;
        let mut rules = Vec::new();
        for rule in queue["Filter"]["S3Key"]["Rules"].as_array().into_iter().flatten() {
            rules.push(
                FilterRule::builder()
                    .name(FilterRuleName::from(rule["Name"].as_str().unwrap_or_default()))
                    .value(rule["Value"].as_str().unwrap_or_default())
                    .build(),
            );
        }
        let mut qc = QueueConfiguration::builder()
            .queue_arn(arn)
            .events(Event::from(event));
        if !rules.is_empty() {
            qc = qc.filter(
                NotificationConfigurationFilter::builder()
                    .key(S3KeyFilter::builder().set_filter_rules(Some(rules)).build())
                    .build(),
            );
        }
        conf = conf.queue_configurations(qc.build()?);
    }
    Ok(conf.build())
}

async fn apply_table(ddb: &aws_sdk_dynamodb::Client, table: &str, props: &Value) -> Result<()> {
    use aws_sdk_dynamodb::types::*;
    let ttl = &props["TimeToLiveSpecification"];
    if let Some(attribute) = ttl["AttributeName"].as_str() {
        ddb.update_time_to_live()
            .table_name(table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .attribute_name(attribute)
                    .enabled(ttl["Enabled"].as_bool().unwrap_or(false))
                    .build()?,
            )
            .send()
            .await
            .context("UpdateTimeToLive")?;
    }
    if let Some(enabled) = props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"].as_bool() {
        ddb.update_continuous_backups()
            .table_name(table)
            .point_in_time_recovery_specification(
                PointInTimeRecoverySpecification::builder()
                    .point_in_time_recovery_enabled(enabled)
                    .build()?,
            )
            .send()
            .await
            .context("UpdateContinuousBackups")?;
    }
    Ok(())
}

// ------------------------------------------------------------------ intrinsic functions

/// Resolves the CloudFormation intrinsics the translated template uses in the properties applied
/// locally: `Ref` (parameters, pseudo parameters, resources), `Fn::GetAtt` (`Arn`/`QueueName` of queues,
/// `Arn` of buckets and keys), `Fn::Sub` and `Fn::Join`. Anything else is an error, never a guess.
#[derive(Debug)]
pub struct Resolver {
    refs: HashMap<String, String>,
    resources: HashMap<String, (String, String)>,
}

impl Resolver {
    /// `params` override the template's parameter defaults; `resources` maps logical id → (type,
    /// physical id) as ListStackResources reports them.
    pub fn new(
        template: &Value,
        stack_name: &str,
        params: &[(&str, String)],
        resources: HashMap<String, (String, String)>,
    ) -> Result<Self> {
        let mut refs: HashMap<String, String> = [
            ("AWS::AccountId", ACCOUNT_ID),
            ("AWS::Region", REGION),
            ("AWS::Partition", "aws"),
            ("AWS::URLSuffix", "amazonaws.com"),
            ("AWS::StackName", stack_name),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (name, param) in template["Parameters"].as_object().into_iter().flatten() {
            if let Some(default) = param.get("Default") {
                let default = match default {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                refs.insert(name.clone(), default);
            }
        }
        for (name, value) in params {
            refs.insert(name.to_string(), value.clone());
        }
        for (logical, (_, physical)) in &resources {
            refs.insert(logical.clone(), physical.clone());
        }
        Ok(Self { refs, resources })
    }

    /// The physical id of a resource.
    pub fn physical_id(&self, logical: &str) -> Result<String> {
        self.resources
            .get(logical)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| anyhow!("resource {logical} was not created"))
    }

    fn get_att(&self, logical: &str, attribute: &str) -> Result<String> {
        let (kind, physical) = self
            .resources
            .get(logical)
            .ok_or_else(|| anyhow!("Fn::GetAtt: resource {logical} was not created"))?;
        let last_segment = || physical.rsplit('/').next().unwrap_or(physical).to_string();
        Ok(match (kind.as_str(), attribute) {
            ("AWS::SQS::Queue", "Arn") => format!("arn:aws:sqs:{REGION}:{ACCOUNT_ID}:{}", last_segment()),
            ("AWS::SQS::Queue", "QueueName") => last_segment(),
            ("AWS::SQS::Queue", "QueueUrl") => physical.clone(),
            ("AWS::S3::Bucket", "Arn") => format!("arn:aws:s3:::{physical}"),
            ("AWS::KMS::Key", "Arn") => format!("arn:aws:kms:{REGION}:{ACCOUNT_ID}:key/{physical}"),
            (kind, attribute) => bail!("Fn::GetAtt {logical}.{attribute} ({kind}) is not resolved locally"),
        })
    }

    fn lookup(&self, name: &str) -> Result<String> {
        if let Some((logical, attribute)) = name.split_once('.') {
            return self.get_att(logical, attribute);
        }
        self.refs
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("Ref {name}: no such parameter or resource"))
    }

    /// Returns `value` with every intrinsic function replaced by its value.
    pub fn resolve(&self, value: &Value) -> Result<Value> {
        Ok(match value {
            Value::Array(items) => {
                Value::Array(items.iter().map(|v| self.resolve(v)).collect::<Result<_>>()?)
            }
            Value::Object(map) if map.len() == 1 => {
                let (key, arg) = map
                    .iter()
                    .next()
                    .ok_or_else(|| anyhow!("unreachable: empty map"))?;
                match key.as_str() {
                    "Ref" => Value::String(
                        self.lookup(arg.as_str().ok_or_else(|| anyhow!("Ref of a non-string"))?)?,
                    ),
                    "Fn::GetAtt" => {
                        let parts: Vec<&str> = match arg {
                            Value::String(s) => s.splitn(2, '.').collect(),
                            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                            _ => bail!("malformed Fn::GetAtt"),
                        };
                        let [logical, attribute] = parts[..] else {
                            bail!("malformed Fn::GetAtt {arg}")
                        };
                        Value::String(self.get_att(logical, attribute)?)
                    }
                    "Fn::Sub" => Value::String(self.sub(arg)?),
                    "Fn::Join" => {
                        let (Some(sep), Some(items)) = (arg[0].as_str(), arg[1].as_array()) else {
                            bail!("malformed Fn::Join {arg}")
                        };
                        let items = items
                            .iter()
                            .map(|v| match self.resolve(v)? {
                                Value::String(s) => Ok(s),
                                other => bail!("Fn::Join of a non-string {other}"),
                            })
                            .collect::<Result<Vec<_>>>()?;
                        Value::String(items.join(sep))
                    }
                    k if k.starts_with("Fn::") => bail!("{k} is not resolved locally"),
                    _ => Value::Object(
                        map.iter()
                            .map(|(k, v)| Ok((k.clone(), self.resolve(v)?)))
                            .collect::<Result<_>>()?,
                    ),
                }
            }
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), self.resolve(v)?)))
                    .collect::<Result<_>>()?,
            ),
            other => other.clone(),
        })
    }

    fn sub(&self, arg: &Value) -> Result<String> {
        let (text, vars) = match arg {
            Value::String(s) => (s.as_str(), serde_json::Map::new()),
            Value::Array(a) => (
                a.first()
                    .and_then(Value::as_str)
                    .ok_or_else(|| anyhow!("malformed Fn::Sub {arg}"))?,
                a.get(1).and_then(Value::as_object).cloned().unwrap_or_default(),
            ),
            _ => bail!("malformed Fn::Sub {arg}"),
        };
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| anyhow!("unterminated ${{ in Fn::Sub {text:?}"))?;
            let name = &after[..end];
            if let Some(literal) = name.strip_prefix('!') {
                out.push_str("${");
                out.push_str(literal);
                out.push('}');
            } else if let Some(v) = vars.get(name) {
                match self.resolve(v)? {
                    Value::String(s) => out.push_str(&s),
                    other => bail!("Fn::Sub variable {name} is not a string: {other}"),
                }
            } else {
                out.push_str(&self.lookup(name)?);
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resolver() -> Resolver {
        let template = json!({"Parameters": {"P": {"Type": "String", "Default": "dflt"}}});
        let resources = HashMap::from([
            (
                "Q".to_string(),
                (
                    "AWS::SQS::Queue".to_string(),
                    "https://sqs.us-east-1.amazonaws.com/123456789012/s-Q-1".to_string(),
                ),
            ),
            (
                "B".to_string(),
                ("AWS::S3::Bucket".to_string(), "bkt".to_string()),
            ),
        ]);
        Resolver::new(&template, "stk", &[], resources).unwrap()
    }

    #[test]
    fn resolves_the_intrinsics_the_template_uses() {
        let r = resolver();
        let v = json!({
            "a": {"Ref": "P"},
            "b": {"Fn::GetAtt": ["Q", "Arn"]},
            "c": {"Fn::Sub": "arn:${AWS::Partition}:s3:::${AWS::StackName}-x-${AWS::AccountId} ${!Lit}"},
            "d": {"Fn::Sub": ["${q}/${B.Arn}", {"q": {"Fn::GetAtt": "Q.QueueName"}}]},
            "e": {"Fn::Join": ["-", [{"Ref": "B"}, "z"]]},
            "f": [{"Ref": "Q"}],
        });
        assert_eq!(
            r.resolve(&v).unwrap(),
            json!({
                "a": "dflt",
                "b": "arn:aws:sqs:us-east-1:123456789012:s-Q-1",
                "c": "arn:aws:s3:::stk-x-123456789012 ${Lit}",
                "d": "s-Q-1/arn:aws:s3:::bkt",
                "e": "bkt-z",
                "f": ["https://sqs.us-east-1.amazonaws.com/123456789012/s-Q-1"],
            })
        );
    }

    #[test]
    fn unknown_references_are_errors_not_guesses() {
        let r = resolver();
        assert!(r.resolve(&json!({"Ref": "Nope"})).is_err());
        assert!(r.resolve(&json!({"Fn::GetAtt": ["B", "DomainName"]})).is_err());
        assert!(r.resolve(&json!({"Fn::If": ["C", 1, 2]})).is_err());
    }

    #[test]
    fn stack_names_fit_the_bucket_name() {
        for tag in ["notification", "A Very Long Test Name With Spaces", "x"] {
            let name = unique_stack_name(tag);
            validate_stack_name(&name).unwrap();
        }
        assert!(validate_stack_name("Relay").is_err());
        assert!(validate_stack_name("relay-local-with-a-name-too-long").is_err());
        assert!(validate_stack_name("relay-local").is_ok());
    }

    #[test]
    fn sim_endpoints_follow_the_simulator_prefixes() {
        let s = SimEndpoints::from_base("http://127.0.0.1:9/", "1", "s");
        assert_eq!(s.graph_url, "http://127.0.0.1:9/graph");
        assert_eq!(s.upload_url, "http://127.0.0.1:9/rupload");
        assert_eq!(s.tiles_url, "http://127.0.0.1:9/tiles");
        assert_eq!(s.www_url, "http://127.0.0.1:9/www");
        assert_eq!(s.feed_token, None);
        assert_eq!(
            s.with_feed_token("MLY|1|t").feed_token.as_deref(),
            Some("MLY|1|t")
        );
    }
}
