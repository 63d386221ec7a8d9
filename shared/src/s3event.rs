//! Lenient parsing of S3 event notifications as they arrive in SQS message bodies.
//!
//! Real S3 events and moto's differ (moto omits `userIdentity` and `requestParameters`, so
//! `aws_lambda_events::s3::S3Event` rejects them), so only the fields we use are read. Keys arrive
//! form-urlencoded: `+` is a space, `%2B` a plus, and moto also encodes `/` as `%2F`.

use serde::Deserialize;

/// One object-created notification, with its key decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectCreated {
    pub event_name: String,
    pub bucket: String,
    /// The object key, URL-decoded (safe to pass to GetObject).
    pub key: String,
    pub etag: Option<String>,
    pub size: Option<u64>,
    pub version_id: Option<String>,
    pub sequencer: Option<String>,
    /// `eventTime` as sent (the same in every delivery of one notification).
    pub event_time: Option<String>,
}

/// What an SQS message body held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// `s3:TestEvent`, sent once when a notification configuration is saved: nothing to do.
    TestEvent,
    /// Zero or more object-created records (other event kinds are filtered out).
    Records(Vec<ObjectCreated>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum S3EventError {
    #[error("message body is not JSON: {0}")]
    NotJson(String),
    #[error("message body is neither an S3 event nor an S3 test event")]
    NotAnS3Event,
    #[error("record {index}: missing {field}")]
    MissingField { index: usize, field: &'static str },
    #[error("record {index}: object key is not valid percent-encoded UTF-8")]
    BadKeyEncoding { index: usize },
}

#[derive(Deserialize)]
struct Body {
    #[serde(rename = "Records")]
    records: Option<Vec<Record>>,
    #[serde(rename = "Event")]
    event: Option<String>,
}

#[derive(Deserialize)]
struct Record {
    #[serde(rename = "eventSource")]
    event_source: Option<String>,
    #[serde(rename = "eventName")]
    event_name: Option<String>,
    #[serde(rename = "eventTime")]
    event_time: Option<String>,
    s3: Option<S3Entity>,
}

#[derive(Deserialize)]
struct S3Entity {
    bucket: Option<Bucket>,
    object: Option<Object>,
}

#[derive(Deserialize)]
struct Bucket {
    name: Option<String>,
}

#[derive(Deserialize)]
struct Object {
    key: Option<String>,
    size: Option<u64>,
    #[serde(rename = "eTag")]
    etag: Option<String>,
    #[serde(rename = "versionId")]
    version_id: Option<String>,
    sequencer: Option<String>,
}

/// Parse an SQS message body carrying an S3 notification.
pub fn parse_body(body: &str) -> Result<Notification, S3EventError> {
    let parsed: Body = serde_json::from_str(body).map_err(|e| S3EventError::NotJson(e.to_string()))?;
    match (parsed.records, parsed.event) {
        (Some(records), _) => records
            .into_iter()
            .enumerate()
            .filter(|(_, r)| {
                r.event_source.as_deref().is_none_or(|s| s == "aws:s3")
                    && r.event_name
                        .as_deref()
                        .is_none_or(|n| n.starts_with("ObjectCreated"))
            })
            .map(|(index, r)| to_object_created(index, r))
            .collect::<Result<Vec<_>, _>>()
            .map(Notification::Records),
        (None, Some(ev)) if ev == "s3:TestEvent" => Ok(Notification::TestEvent),
        _ => Err(S3EventError::NotAnS3Event),
    }
}

fn to_object_created(index: usize, r: Record) -> Result<ObjectCreated, S3EventError> {
    let s3 = r.s3.ok_or(S3EventError::MissingField { index, field: "s3" })?;
    let bucket = s3.bucket.and_then(|b| b.name).ok_or(S3EventError::MissingField {
        index,
        field: "s3.bucket.name",
    })?;
    let object = s3.object.ok_or(S3EventError::MissingField {
        index,
        field: "s3.object",
    })?;
    let raw_key = object.key.ok_or(S3EventError::MissingField {
        index,
        field: "s3.object.key",
    })?;
    let key = decode_key(&raw_key).ok_or(S3EventError::BadKeyEncoding { index })?;
    Ok(ObjectCreated {
        event_name: r.event_name.unwrap_or_default(),
        bucket,
        key,
        etag: object.etag.map(|e| e.trim_matches('"').to_string()),
        size: object.size,
        version_id: object.version_id,
        sequencer: object.sequencer,
        event_time: r.event_time,
    })
}

/// Decode an S3 event key: `+` → space first, then percent-decoding (so `%2B` → `+`).
pub fn decode_key(raw: &str) -> Option<String> {
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(key: &str) -> String {
        serde_json::json!({"Records": [{
            "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
            "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": "b"}, "object": {"key": key, "size": 12, "eTag": "\"abc\""}}
        }]})
        .to_string()
    }

    fn only_key(body: &str) -> String {
        match parse_body(body) {
            Ok(Notification::Records(r)) if r.len() == 1 => r[0].key.clone(),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn when_key_has_plus_and_escapes_should_decode_space_then_percent() {
        assert_eq!(
            only_key(&body("sequences/u1/my+seq/manifest.json")),
            "sequences/u1/my seq/manifest.json"
        );
        assert_eq!(
            only_key(&body("sequences%2Fu1%2Fa%2Bb%2Fmanifest.json")),
            "sequences/u1/a+b/manifest.json"
        );
        assert_eq!(
            only_key(&body("sequences/u1/caf%C3%A9/manifest.json")),
            "sequences/u1/café/manifest.json"
        );
    }

    #[test]
    fn when_etag_is_quoted_should_strip_quotes() {
        match parse_body(&body("k")) {
            Ok(Notification::Records(r)) => assert_eq!(r[0].etag.as_deref(), Some("abc")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn when_test_event_should_say_so() {
        let b =
            r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2026-01-01T00:00:00Z","Bucket":"b"}"#;
        assert_eq!(parse_body(b), Ok(Notification::TestEvent));
    }

    #[test]
    fn when_body_is_garbage_should_error() {
        assert!(matches!(parse_body("not json"), Err(S3EventError::NotJson(_))));
        assert_eq!(parse_body(r#"{"hello":1}"#), Err(S3EventError::NotAnS3Event));
        let no_key = r#"{"Records":[{"eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{}}}]}"#;
        assert_eq!(
            parse_body(no_key),
            Err(S3EventError::MissingField {
                index: 0,
                field: "s3.object.key"
            })
        );
        assert_eq!(only_key(&body("ok")), "ok");
        assert!(matches!(
            parse_body(&body("bad%FF")),
            Err(S3EventError::BadKeyEncoding { index: 0 })
        ));
    }

    #[test]
    fn when_event_is_a_removal_should_filter_it_out() {
        let b = body("k").replace("ObjectCreated:Put", "ObjectRemoved:Delete");
        assert_eq!(parse_body(&b), Ok(Notification::Records(vec![])));
    }

    fn sqs_bodies(json: &str) -> Vec<String> {
        let ev: aws_lambda_events::event::sqs::SqsEvent = serde_json::from_str(json).expect("sample parses");
        ev.records.into_iter().map(|r| r.body.expect("body")).collect()
    }

    #[test]
    fn when_sample_events_are_parsed_should_yield_decoded_manifest_keys() {
        for sample in [
            include_str!("../../events/sqs/s3-manifest-created.json"),
            include_str!("../../events/sqs/s3-manifest-created-moto.json"),
        ] {
            let bodies = sqs_bodies(sample);
            assert_eq!(
                only_key(&bodies[0]),
                "sequences/user-1/seq-2026-11-24/manifest.json"
            );
        }
        let encoded = sqs_bodies(include_str!("../../events/sqs/s3-manifest-key-encoded.json"));
        assert_eq!(
            only_key(&encoded[0]),
            "sequences/user-1/morning ride + café/manifest.json"
        );
        let test_event = sqs_bodies(include_str!("../../events/sqs/s3-test-event.json"));
        assert_eq!(parse_body(&test_event[0]), Ok(Notification::TestEvent));
        let mixed = sqs_bodies(include_str!("../../events/sqs/s3-two-records-one-bad.json"));
        assert!(parse_body(&mixed[0]).is_ok());
        assert!(matches!(parse_body(&mixed[1]), Err(S3EventError::NotJson(_))));
    }
}
