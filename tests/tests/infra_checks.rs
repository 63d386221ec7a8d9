//! Static checks of `infra/template.yaml`: `sam validate --lint` passes; cfn-lint and checkov find
//! nothing, on the SAM source and on the CloudFormation that aws-sam-translator makes of it (cfn-lint 1.58 misses errors inside
//! `AWS::Serverless::*` resources that it catches after translation), every checkov skip carries its
//! reason, every dead-letter queue has a depth alarm, and the IAM roles are scoped to single resources.
//!
//! The drift test (moto vs the template) is `local_stack_does_not_drift_from_the_template` in
//! `local_stack.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::stack;
use integration_tests::venv::{self, Venvs};
use serde_json::Value;

/// The venvs, or a failure telling how to get them (tests never install tools behind your back).
fn venvs() -> Venvs {
    let root = integration_tests::repo_root();
    for tool in [
        ".venv/aws/bin/python",
        ".venv/aws/bin/cfn-lint",
        ".venv/checkov/bin/checkov",
    ] {
        assert!(
            root.join(tool).exists(),
            "{tool} is missing: run cargo xtask setup"
        );
    }
    venv::ensure(&root).unwrap_or_else(|e| panic!("the venvs are not usable ({e:#}): run cargo xtask setup"))
}

fn translated(venvs: &Venvs) -> Value {
    stack::translate_template(venvs, &stack::template_path())
        .unwrap_or_else(|e| panic!("translating the template: {e:#}"))
        .as_ref()
        .clone()
}

/// The translated template written to a temporary file (the tools read files).
fn translated_file(venvs: &Venvs) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("template.translated.json");
    let json = serde_json::to_string_pretty(&translated(venvs)).expect("serialize");
    std::fs::write(&path, json).expect("write the translated template");
    (dir, path)
}

fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}: run cargo xtask setup"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_cfn_lint_clean(venvs: &Venvs, template: &Path) {
    let (code, stdout, stderr) = run(Command::new(venvs.cfn_lint())
        .arg("--format")
        .arg("parseable")
        .arg("--")
        .arg(template));
    assert!(
        code == Some(0) && stdout.trim().is_empty(),
        "cfn-lint found problems in {} (exit {code:?}):\n{stdout}\n{stderr}",
        template.display()
    );
}

/// Runs checkov on `template`; asserts no failed check and no parsing error, that it really evaluated
/// the resources, and that every skip carries a written reason. Returns the skipped check ids.
fn assert_checkov_clean(venvs: &Venvs, template: &Path) -> BTreeSet<(String, String)> {
    let (code, stdout, stderr) = run(Command::new(venvs.checkov())
        .args([
            "--skip-download",
            "--framework",
            "cloudformation",
            "--output",
            "json",
            "--file",
        ])
        .arg(template)
        // No telemetry, no update check, no network.
        .env("CHECKOV_RUN_SCA_PACKAGE_SCAN_V2", "false")
        .env("BC_SKIP_MAPPING", "TRUE"));
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "checkov output on {} is not a JSON report ({e}; exit {code:?}):\n{stdout}\n{stderr}",
            template.display()
        )
    });
    let failed: Vec<String> = report["results"]["failed_checks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{} {} on {} (lines {})",
                c["check_id"].as_str().unwrap_or("?"),
                c["check_name"].as_str().unwrap_or("?"),
                c["resource"].as_str().unwrap_or("?"),
                c["file_line_range"]
            )
        })
        .collect();
    let summary = &report["summary"];
    assert!(
        failed.is_empty() && summary["failed"] == 0 && summary["parsing_errors"] == 0,
        "checkov findings in {} ({summary}):\n{}",
        template.display(),
        failed.join("\n")
    );
    assert_eq!(
        code,
        Some(0),
        "checkov exit status on {}: {stderr}",
        template.display()
    );
    assert!(
        summary["passed"].as_u64().unwrap_or(0) >= 20,
        "checkov evaluated almost nothing in {}: {summary}",
        template.display()
    );
    let mut skipped = BTreeSet::new();
    for check in report["results"]["skipped_checks"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let id = check["check_id"].as_str().unwrap_or("?").to_string();
        let resource = check["resource"].as_str().unwrap_or("?").to_string();
        let reason = check["check_result"]["suppress_comment"]
            .as_str()
            .unwrap_or_default();
        assert!(
            reason.len() >= 40 && reason != "No comment provided",
            "checkov skip {id} on {resource} in {} is not justified: {reason:?}",
            template.display()
        );
        skipped.insert((id, resource));
    }
    skipped
}

/// `sam validate --lint` (AWS SAM CLI from `.venv/sam`): SAM's own validation of the source template
/// and its cfn-lint run on the transformed one, offline (dummy credentials and region, no telemetry,
/// a throwaway HOME for SAM's metadata file).
#[test]
fn sam_validate_lint_is_clean() {
    let root = integration_tests::repo_root();
    // `.venv/sam` is installed on first use, like the other test-only venvs.
    let sam =
        integration_tests::venv::ensure_sam(&root).expect("installing .venv/sam (requirements/sam.txt)");
    let home = tempfile::tempdir().expect("tempdir");
    let (code, stdout, stderr) = run(Command::new(&sam)
        .current_dir(root.join("infra"))
        .args(["validate", "--lint", "--template"])
        .arg(stack::template_path())
        .env("AWS_DEFAULT_REGION", stack::REGION)
        .env("AWS_REGION", stack::REGION)
        .env("AWS_ACCESS_KEY_ID", stack::ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", stack::SECRET_ACCESS_KEY)
        .env("SAM_CLI_TELEMETRY", "0")
        .env("HOME", home.path()));
    assert!(
        code == Some(0) && stdout.contains("is a valid SAM Template"),
        "sam validate --lint failed (exit {code:?}):\n{stdout}\n{stderr}"
    );
}

#[test]
fn cfn_lint_is_clean_on_the_source_template() {
    let venvs = venvs();
    assert_cfn_lint_clean(&venvs, &stack::template_path());
}

#[test]
fn cfn_lint_is_clean_on_the_translated_template() {
    let venvs = venvs();
    let (_dir, path) = translated_file(&venvs);
    assert_cfn_lint_clean(&venvs, &path);
}

#[test]
fn checkov_is_clean_on_the_source_template() {
    let venvs = venvs();
    let skipped = assert_checkov_clean(&venvs, &stack::template_path());
    assert!(
        !skipped.is_empty(),
        "the template's justified skips were not seen"
    );
}

#[test]
fn checkov_is_clean_on_the_translated_template() {
    let venvs = venvs();
    let (_dir, path) = translated_file(&venvs);
    let skipped = assert_checkov_clean(&venvs, &path);
    // The skips live in resource Metadata, which survives translation: the same exemptions apply to
    // the generated AWS::Lambda::Function resources, not new blanket ones.
    let source = assert_checkov_clean(&venvs, &stack::template_path());
    let names = |set: &BTreeSet<(String, String)>| -> BTreeSet<(String, String)> {
        set.iter()
            .map(|(id, resource)| {
                let logical = resource.rsplit('.').next().unwrap_or(resource).to_string();
                (id.clone(), logical)
            })
            .collect()
    };
    assert_eq!(names(&skipped), names(&source));
}

// ------------------------------------------------------------------ template structure

fn resources(template: &Value) -> &serde_json::Map<String, Value> {
    template["Resources"]
        .as_object()
        .expect("translated template has Resources")
}

/// The logical id an `Fn::GetAtt` (either form) or `Ref` points at, with the attribute.
fn target(v: &Value) -> Option<(String, Option<String>)> {
    if let Some(r) = v["Ref"].as_str() {
        return Some((r.to_string(), None));
    }
    match &v["Fn::GetAtt"] {
        Value::Array(parts) => Some((
            parts.first()?.as_str()?.to_string(),
            parts.get(1).and_then(Value::as_str).map(str::to_string),
        )),
        Value::String(s) => {
            let (l, a) = s.split_once('.')?;
            Some((l.to_string(), Some(a.to_string())))
        }
        _ => None,
    }
}

/// Queues used as dead-letter queues: SQS redrive targets and Lambda `DeadLetterConfig` targets.
fn dead_letter_queues(template: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for resource in resources(template).values() {
        let props = &resource["Properties"];
        let arn = match resource["Type"].as_str() {
            Some("AWS::SQS::Queue") => &props["RedrivePolicy"]["deadLetterTargetArn"],
            Some("AWS::Lambda::Function") => &props["DeadLetterConfig"]["TargetArn"],
            _ => continue,
        };
        if let Some((logical, _)) = target(arn) {
            out.insert(logical);
        }
    }
    out
}

#[test]
fn every_dead_letter_queue_has_a_depth_alarm_with_the_optional_topic() {
    let venvs = venvs();
    let template = translated(&venvs);
    let dlqs = dead_letter_queues(&template);
    assert_eq!(
        dlqs,
        BTreeSet::from(["ClustersDLQ", "IngestDLQ", "PollerDLQ"].map(String::from)),
        "the dead-letter queues the functions rely on"
    );
    for dlq in &dlqs {
        let alarms: Vec<(&String, &Value)> = resources(&template)
            .iter()
            .filter(|(_, r)| r["Type"] == "AWS::CloudWatch::Alarm")
            .filter(|(_, r)| {
                r["Properties"]["Dimensions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|d| {
                        d["Name"] == "QueueName"
                            && target(&d["Value"]) == Some((dlq.clone(), Some("QueueName".into())))
                    })
            })
            .collect();
        assert_eq!(alarms.len(), 1, "{dlq} needs exactly one depth alarm: {alarms:?}");
        let (name, alarm) = alarms[0];
        let p = &alarm["Properties"];
        assert_eq!(p["Namespace"], "AWS/SQS", "{name}");
        assert_eq!(p["MetricName"], "ApproximateNumberOfMessagesVisible", "{name}");
        assert_eq!(p["ComparisonOperator"], "GreaterThanThreshold", "{name}");
        assert_eq!(p["Threshold"].as_f64(), Some(0.0), "{name}: any message alarms");
        assert_eq!(p["TreatMissingData"], "notBreaching", "{name}");
        let notify = serde_json::json!({
            "Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]
        });
        assert_eq!(p["AlarmActions"], notify, "{name} notifies the optional topic");
    }
    assert_eq!(template["Parameters"]["AlarmTopicArn"]["Default"], "");
}

#[test]
fn poller_runs_on_the_schedule_parameter() {
    let venvs = venvs();
    let template = translated(&venvs);
    assert_eq!(
        template["Parameters"]["PollerSchedule"]["Default"],
        "rate(5 minutes)"
    );
    let rules: Vec<&Value> = resources(&template)
        .values()
        .filter(|r| r["Type"] == "AWS::Events::Rule")
        .collect();
    assert_eq!(rules.len(), 1);
    let rule = &rules[0]["Properties"];
    assert_eq!(
        rule["ScheduleExpression"],
        serde_json::json!({"Ref": "PollerSchedule"})
    );
    assert_eq!(
        target(&rule["Targets"][0]["Arn"]),
        Some(("PollerFunction".into(), Some("Arn".into())))
    );
}

/// `(actions, resource JSON)` of every inline statement of `role`, flattened.
fn statements(template: &Value, role: &str) -> Vec<(Vec<String>, String)> {
    let role = &resources(template)[role]["Properties"];
    let mut out = Vec::new();
    for policy in role["Policies"].as_array().into_iter().flatten() {
        for s in policy["PolicyDocument"]["Statement"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert_eq!(s["Effect"], "Allow", "{s}");
            let actions = match &s["Action"] {
                Value::String(a) => vec![a.clone()],
                Value::Array(a) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
                other => panic!("statement action {other}"),
            };
            out.push((actions, s["Resource"].to_string()));
        }
    }
    out
}

/// `(actions, Condition)` of every inline statement of `role` that allows a `kms:` action.
fn kms_statements(template: &Value, role: &str) -> Vec<(Vec<String>, Value)> {
    let role = &resources(template)[role]["Properties"];
    let mut out = Vec::new();
    for policy in role["Policies"].as_array().into_iter().flatten() {
        for s in policy["PolicyDocument"]["Statement"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let actions: Vec<String> = match &s["Action"] {
                Value::String(a) => vec![a.clone()],
                Value::Array(a) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
                _ => Vec::new(),
            };
            if actions.iter().any(|a| a.starts_with("kms:")) {
                out.push((actions, s["Condition"].clone()));
            }
        }
    }
    assert!(!out.is_empty(), "no KMS statement");
    out
}

/// Whether `role` may call `action` on a resource whose ARN is built from `logical` (and, for
/// `suffix`, ends with it, e.g. `/index/*`).
fn grants(template: &Value, role: &str, action: &str, logical: &str, suffix: &str) -> bool {
    statements(template, role).iter().any(|(actions, resource)| {
        let action_ok = actions.iter().any(|a| match a.strip_suffix('*') {
            Some(prefix) => action.starts_with(prefix),
            None => a == action,
        });
        action_ok && resource.contains(&format!("\"{logical}\"")) && resource.contains(suffix)
    })
}

#[test]
fn iam_roles_are_scoped_to_single_resources() {
    let venvs = venvs();
    let template = translated(&venvs);
    // Managed policies: logs and X-Ray only (X-Ray has no resource-level permissions). In particular no
    // AWSLambdaSQSQueueExecutionRole, which would allow every queue in the account.
    let allowed_managed = [
        "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
        "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
    ];
    let roles: Vec<&String> = resources(&template)
        .iter()
        .filter(|(_, r)| r["Type"] == "AWS::IAM::Role")
        .map(|(k, _)| k)
        .collect();
    assert_eq!(roles.len(), 3, "{roles:?}");
    for role in &roles {
        for managed in resources(&template)[role.as_str()]["Properties"]["ManagedPolicyArns"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert!(
                allowed_managed.iter().any(|m| managed == m),
                "{role} has managed policy {managed}"
            );
        }
        for (actions, resource) in statements(&template, role) {
            assert!(
                !resource.contains("\"*\"") && !actions.iter().any(|a| a == "*" || a.ends_with(":*")),
                "{role}: {actions:?} on {resource} is not scoped"
            );
        }
    }

    let z = "ZipAndPushFunctionRole";
    let p = "PollerFunctionRole";
    let s = "StatusApiFunctionRole";
    for role in [z, p, s] {
        assert!(
            grants(&template, role, "kms:Encrypt", "TokenKey", ""),
            "{role} kms:Encrypt"
        );
        // Only under the token adapter's encryption context (issue 15, item 3).
        for (actions, condition) in kms_statements(&template, role) {
            assert_eq!(
                condition["Null"]["kms:EncryptionContext:user_id"], "false",
                "{role}: {actions:?} without the user_id context: {condition}"
            );
            assert_eq!(
                condition["ForAllValues:StringEquals"]["kms:EncryptionContextKeys"],
                serde_json::json!(["user_id"]),
                "{role}: {actions:?} allows other context keys: {condition}"
            );
        }
        assert!(
            grants(
                &template,
                role,
                "secretsmanager:GetSecretValue",
                "MapillaryClientSecretArn",
                ""
            ),
            "{role} reads the client secret"
        );
        assert!(
            grants(&template, role, "dynamodb:GetItem", "UsersTable", ""),
            "{role} users"
        );
        assert!(
            grants(&template, role, "dynamodb:Query", "UsersTable", "/index/*"),
            "{role} users gsi"
        );
        assert!(
            grants(&template, role, "dynamodb:Query", "UploadsTable", "/index/*"),
            "{role} uploads gsi"
        );
    }
    // zip-and-push: reads the bucket, consumes the ingest queue, sends continuations to it and
    // tracking messages to the clusters queue, writes all three tables.
    assert!(grants(&template, z, "s3:GetObject", "SequencesBucket", "/*"));
    assert!(grants(&template, z, "sqs:ReceiveMessage", "IngestQueue", ""));
    assert!(grants(&template, z, "sqs:DeleteMessage", "IngestQueue", ""));
    assert!(grants(&template, z, "sqs:SendMessage", "IngestQueue", ""));
    assert!(grants(&template, z, "sqs:SendMessage", "ClustersQueue", ""));
    for table in ["UploadsTable", "UsersTable", "IdempotencyTable"] {
        assert!(
            grants(&template, z, "dynamodb:PutItem", table, ""),
            "zip-and-push writes {table}"
        );
    }
    // The poller consumes the clusters queue; its failed scheduled runs go to its DLQ.
    assert!(grants(&template, p, "sqs:ReceiveMessage", "ClustersQueue", ""));
    assert!(grants(&template, p, "sqs:SendMessage", "PollerDLQ", ""));
    assert!(grants(&template, p, "dynamodb:UpdateItem", "UploadsTable", ""));
    // Status-change events: the poller puts them on the relay's bus, and nobody else does.
    assert!(grants(&template, p, "events:PutEvents", "RelayEventBus", ""));
    assert!(!grants(&template, z, "events:PutEvents", "RelayEventBus", ""));
    assert!(!grants(&template, s, "events:PutEvents", "RelayEventBus", ""));
    // zip-and-push and the poller use tokens; the status API only stores new ones and shows the
    // clear metadata: it cannot decrypt a token.
    assert!(grants(&template, z, "kms:Decrypt", "TokenKey", ""));
    assert!(grants(&template, p, "kms:Decrypt", "TokenKey", ""));
    assert!(!grants(&template, s, "kms:Decrypt", "TokenKey", ""));
    // The status API writes uploads only for sequences dropped through it (announcement, state,
    // deletion), and only in sequence and upload partitions; it never sends to the ingest queue.
    assert!(grants(&template, s, "dynamodb:PutItem", "UploadsTable", ""));
    assert!(!grants(&template, s, "dynamodb:UpdateItem", "UploadsTable", ""));
    assert!(!grants(&template, s, "sqs:SendMessage", "IngestQueue", ""));
    let role = &resources(&template)[s]["Properties"];
    let mut leading_keys = Vec::new();
    for policy in role["Policies"].as_array().into_iter().flatten() {
        for st in policy["PolicyDocument"]["Statement"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if st["Resource"].to_string().contains("\"UploadsTable\"")
                && st["Action"].to_string().contains("dynamodb:PutItem")
            {
                leading_keys.push(st["Condition"]["ForAllValues:StringLike"]["dynamodb:LeadingKeys"].clone());
            }
        }
    }
    assert_eq!(
        leading_keys,
        [serde_json::json!(["SEQ#*", "UPLOAD#*"])],
        "the status API writes sequence and upload partitions only"
    );
    // The bucket: objects under sequences/ only, listing only that prefix.
    for action in [
        "s3:PutObject",
        "s3:GetObject",
        "s3:DeleteObject",
        "s3:DeleteObjectVersion",
    ] {
        assert!(
            grants(&template, s, action, "SequencesBucket", "/sequences/*"),
            "status API {action}"
        );
        for (actions, resource) in statements(&template, s) {
            if actions.iter().any(|a| a == action) && resource.contains("\"SequencesBucket\"") {
                assert!(
                    resource.contains("/sequences/*"),
                    "{action} beyond sequences/: {resource}"
                );
            }
        }
    }
    assert!(!grants(&template, z, "s3:PutObject", "SequencesBucket", ""));
    assert!(!grants(&template, p, "s3:PutObject", "SequencesBucket", ""));
}

/// The bucket policy denies PutObject under sequences/ to every principal but the status API's role
/// (whose presigned URLs carry its signature) and the optional operator principal.
#[test]
fn only_the_status_api_and_the_operator_write_sequences() {
    let venvs = venvs();
    let template = translated(&venvs);
    let policy = &resources(&template)["SequencesBucketPolicy"]["Properties"]["PolicyDocument"];
    let deny = policy["Statement"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|st| st["Sid"] == "DenyForeignSequenceWrites")
        .expect("the DenyForeignSequenceWrites statement");
    assert_eq!(deny["Effect"], "Deny");
    assert_eq!(deny["Principal"], "*");
    assert_eq!(deny["Action"], "s3:PutObject");
    assert!(
        deny["Resource"].to_string().contains("/sequences/*"),
        "{}",
        deny["Resource"]
    );
    let allowed = &deny["Condition"]["ArnNotLike"]["aws:PrincipalArn"]["Fn::If"];
    assert_eq!(allowed[0], "HasSequenceWriter", "{allowed}");
    let role = serde_json::json!({"Fn::GetAtt": ["StatusApiFunctionRole", "Arn"]});
    assert_eq!(
        allowed[1],
        serde_json::json!([role.clone(), {"Ref": "SequenceWriterArn"}])
    );
    assert_eq!(allowed[2], serde_json::json!([role]));
    assert_eq!(template["Parameters"]["SequenceWriterArn"]["Default"], "");
}

#[test]
fn the_feed_token_secret_is_optional_and_read_by_the_poller_only() {
    let venvs = venvs();
    let template = translated(&venvs);
    let param = &template["Parameters"]["MapillaryFeedTokenSecretArn"];
    assert_eq!(param["Default"], "", "optional: no web-app token by default");
    // Every function sees the variable (one set of names); it holds an ARN, never the token.
    for (name, f) in resources(&template)
        .iter()
        .filter(|(_, r)| r["Type"] == "AWS::Lambda::Function")
    {
        assert_eq!(
            f["Properties"]["Environment"]["Variables"]["MAPILLARY_FEED_TOKEN_SECRET_ARN"],
            serde_json::json!({"Ref": "MapillaryFeedTokenSecretArn"}),
            "{name}"
        );
    }
    // Only the poller may read it, scoped to that one secret when set (the client secret otherwise).
    let conditional = serde_json::json!({"Fn::If": [
        "HasFeedTokenSecret",
        {"Ref": "MapillaryFeedTokenSecretArn"},
        {"Ref": "MapillaryClientSecretArn"}
    ]})
    .to_string();
    let poller = statements(&template, "PollerFunctionRole");
    assert!(
        poller.iter().any(
            |(actions, resource)| actions == &["secretsmanager:GetSecretValue"] && resource == &conditional
        ),
        "{poller:?}"
    );
    for role in ["ZipAndPushFunctionRole", "StatusApiFunctionRole"] {
        assert!(
            !grants(
                &template,
                role,
                "secretsmanager:GetSecretValue",
                "MapillaryFeedTokenSecretArn",
                ""
            ),
            "{role} must not read the feed token"
        );
    }
}

#[test]
fn functions_encrypt_their_environment_and_reserve_concurrency() {
    let venvs = venvs();
    let template = translated(&venvs);
    let functions: Vec<(&String, &Value)> = resources(&template)
        .iter()
        .filter(|(_, r)| r["Type"] == "AWS::Lambda::Function")
        .collect();
    assert_eq!(functions.len(), 3);
    for (name, f) in functions {
        let p = &f["Properties"];
        assert_eq!(
            target(&p["KmsKeyArn"]),
            Some(("TokenKey".into(), Some("Arn".into()))),
            "{name}"
        );
        let param = format!("{}ReservedConcurrency", name.trim_end_matches("Function"));
        assert_eq!(
            p["ReservedConcurrentExecutions"]["Fn::If"][1],
            serde_json::json!({"Ref": param}),
            "{name}"
        );
        assert!(template["Parameters"][&param]["Default"].is_number(), "{param}");
    }
}
