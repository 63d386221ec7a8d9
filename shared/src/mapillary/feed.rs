//! The undocumented GraphQL activity feed, `getLatestActivity` (protocol doc §6.1).
//!
//! The endpoint may change without notice, so the reply is read field by field from a
//! `serde_json::Value`: a missing optional field is `None`, an unknown stage value is kept verbatim
//! ([`StageStatus::Other`]), and a reply that lost the path `data.fetch__User.feed` is a
//! [`FeedError::Shape`] — the signal for the tiles fallback.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The document exactly as Mapillary's web app sends it (whitespace condensed).
pub const LATEST_ACTIVITY_DOC: &str = "query getLatestActivity($id: ID!, $first: Int, $after: ID, $hide_after: Int) { fetch__User(id: $id) { id feed(first: $first, after: $after, hide_failed_sequences_after_days: $hide_after) { page_info { start_cursor end_cursor has_next_page has_previous_page } nodes { cluster_id type created_at_seconds captured_at_seconds thumb_url item_count image_id status initial_processing_status anonymization_status tiler_status error_code timezone __typename } __typename } __typename } __typename }";

/// The value of one processing stage. Only `IN_PROGRESS` and `FINISHED` have been seen for real;
/// anything else is kept as sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum StageStatus {
    InProgress,
    Finished,
    Failed,
    Other(String),
}

impl From<String> for StageStatus {
    fn from(s: String) -> Self {
        match s.as_str() {
            "IN_PROGRESS" => Self::InProgress,
            "FINISHED" => Self::Finished,
            "FAILED" => Self::Failed,
            _ => Self::Other(s),
        }
    }
}

impl From<StageStatus> for String {
    fn from(s: StageStatus) -> Self {
        s.as_str().to_string()
    }
}

impl StageStatus {
    pub fn as_str(&self) -> &str {
        match self {
            Self::InProgress => "IN_PROGRESS",
            Self::Finished => "FINISHED",
            Self::Failed => "FAILED",
            Self::Other(s) => s,
        }
    }
}

impl std::fmt::Display for StageStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The four stages of one upload, in processing order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stages {
    /// 1. Image ingestion (`status`).
    pub ingestion: Option<StageStatus>,
    /// 2. Image processing (`initial_processing_status`).
    pub image_processing: Option<StageStatus>,
    /// 3. Map data processing (`anonymization_status`).
    pub map_data: Option<StageStatus>,
    /// 4. Map update (`tiler_status`).
    pub map_update: Option<StageStatus>,
}

impl Stages {
    /// Every stage FINISHED.
    pub fn all_finished(&self) -> bool {
        [
            &self.ingestion,
            &self.image_processing,
            &self.map_data,
            &self.map_update,
        ]
        .iter()
        .all(|s| matches!(s, Some(StageStatus::Finished)))
    }

    /// Some stage FAILED.
    pub fn any_failed(&self) -> bool {
        [
            &self.ingestion,
            &self.image_processing,
            &self.map_data,
            &self.map_update,
        ]
        .iter()
        .any(|s| matches!(s, Some(StageStatus::Failed)))
    }

    /// (label, value) pairs in processing order, for display.
    pub fn labelled(&self) -> [(&'static str, Option<&StageStatus>); 4] {
        [
            ("Image ingestion", self.ingestion.as_ref()),
            ("Image processing", self.image_processing.as_ref()),
            ("Map data processing", self.map_data.as_ref()),
            ("Map update", self.map_update.as_ref()),
        ]
    }
}

/// One feed item (`ClusterLatestActivityItem`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityNode {
    pub cluster_id: String,
    pub kind: Option<String>,
    pub created_at_seconds: Option<i64>,
    pub captured_at_seconds: Option<i64>,
    pub item_count: Option<i64>,
    pub image_id: Option<String>,
    pub stages: Stages,
    /// `UNSET` when there is no error.
    pub error_code: Option<String>,
    pub timezone: Option<String>,
}

/// One page of the feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityPage {
    /// False when Mapillary answered `fetch__User: null` (unknown user).
    pub user_found: bool,
    pub nodes: Vec<ActivityNode>,
    pub has_next_page: bool,
    pub end_cursor: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FeedError {
    #[error("activity feed reply is not JSON: {0}")]
    NotJson(String),
    #[error("activity feed answered a GraphQL error: {0}")]
    GraphQl(String),
    #[error("activity feed reply has an unexpected shape: {0}")]
    Shape(String),
}

/// Variables for one page request.
pub fn variables(user_id: &str, first: u32, after: Option<&str>, hide_after_days: u32) -> Value {
    serde_json::json!({"id": user_id, "first": first, "after": after, "hide_after": hide_after_days})
}

/// Parse a `getLatestActivity` reply.
pub fn parse_page(body: &str) -> Result<ActivityPage, FeedError> {
    let v: Value = serde_json::from_str(body).map_err(|e| FeedError::NotJson(e.to_string()))?;
    if let Some(msg) = error_message(&v) {
        return Err(FeedError::GraphQl(msg));
    }
    let data = v
        .get("data")
        .ok_or_else(|| FeedError::Shape("no `data`".into()))?;
    let user = data
        .get("fetch__User")
        .ok_or_else(|| FeedError::Shape("no `data.fetch__User`".into()))?;
    if user.is_null() {
        return Ok(ActivityPage {
            user_found: false,
            nodes: vec![],
            has_next_page: false,
            end_cursor: None,
        });
    }
    let feed = user
        .get("feed")
        .ok_or_else(|| FeedError::Shape("no `fetch__User.feed`".into()))?;
    let nodes = feed
        .get("nodes")
        .and_then(Value::as_array)
        .ok_or_else(|| FeedError::Shape("no `feed.nodes` array".into()))?;
    let page_info = feed
        .get("page_info")
        .ok_or_else(|| FeedError::Shape("no `feed.page_info`".into()))?;
    let has_next_page = page_info
        .get("has_next_page")
        .and_then(Value::as_bool)
        .ok_or_else(|| FeedError::Shape("no boolean `page_info.has_next_page`".into()))?;
    let end_cursor = page_info
        .get("end_cursor")
        .and_then(Value::as_str)
        .map(str::to_string);
    if has_next_page && end_cursor.is_none() {
        return Err(FeedError::Shape(
            "`has_next_page` is true but `end_cursor` is missing".into(),
        ));
    }
    let nodes = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| parse_node(i, n))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ActivityPage {
        user_found: true,
        nodes,
        has_next_page,
        end_cursor,
    })
}

fn error_message(v: &Value) -> Option<String> {
    if let Some(errors) = v.get("errors").and_then(Value::as_array) {
        let msgs: Vec<String> = errors
            .iter()
            .map(|e| {
                e.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("(no message)")
                    .to_string()
            })
            .collect();
        if !msgs.is_empty() {
            return Some(msgs.join("; "));
        }
    }
    let err = v.get("error")?;
    Some(
        err.get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| err.to_string()),
    )
}

fn parse_node(index: usize, n: &Value) -> Result<ActivityNode, FeedError> {
    let cluster_id = id_field(n, "cluster_id")
        .ok_or_else(|| FeedError::Shape(format!("node {index} has no `cluster_id`")))?;
    let stage = |field: &str| {
        n.get(field)
            .and_then(Value::as_str)
            .map(|s| StageStatus::from(s.to_string()))
    };
    Ok(ActivityNode {
        cluster_id,
        kind: n.get("type").and_then(Value::as_str).map(str::to_string),
        created_at_seconds: n.get("created_at_seconds").and_then(Value::as_i64),
        captured_at_seconds: n.get("captured_at_seconds").and_then(Value::as_i64),
        item_count: n.get("item_count").and_then(Value::as_i64),
        image_id: id_field(n, "image_id"),
        stages: Stages {
            ingestion: stage("status"),
            image_processing: stage("initial_processing_status"),
            map_data: stage("anonymization_status"),
            map_update: stage("tiler_status"),
        },
        error_code: n.get("error_code").and_then(Value::as_str).map(str::to_string),
        timezone: n.get("timezone").and_then(Value::as_str).map(str::to_string),
    })
}

/// Ids are strings on the wire, but accept numbers too (never parse them further).
fn id_field(n: &Value, field: &str) -> Option<String> {
    match n.get(field)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(num) => Some(num.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The finished node of TV-2023a and the in-progress node of TV-2022 (protocol doc §6.1).
    const SEED_SAMPLE: &str = r#"{"data":{"fetch__User":{"id":"101176865463974","feed":{"page_info":{"start_cursor":null,"end_cursor":"AQHRfgT-x","has_next_page":true,"has_previous_page":false},"nodes":[{"cluster_id":"151552211058876","type":"UPLOAD","created_at_seconds":1683759912,"captured_at_seconds":1683629036,"thumb_url":"https://scontent.example/x","item_count":43,"image_id":"202467835974822","status":"FINISHED","initial_processing_status":"FINISHED","anonymization_status":"FINISHED","tiler_status":"FINISHED","error_code":"UNSET","timezone":"EUROPE_MADRID","__typename":"ClusterLatestActivityItem"},{"cluster_id":"151552211058877","type":"UPLOAD","thumb_url":null,"item_count":null,"image_id":null,"status":"IN_PROGRESS","initial_processing_status":"IN_PROGRESS","anonymization_status":"IN_PROGRESS","tiler_status":"IN_PROGRESS","error_code":"UNSET","__typename":"ClusterLatestActivityItem"}],"__typename":"UserFeedConnection"},"__typename":"User"},"__typename":"Query"},"extensions":{"is_final":true}}"#;

    #[test]
    fn when_seed_sample_should_parse_both_nodes() {
        let page = parse_page(SEED_SAMPLE).expect("parses");
        assert!(page.user_found && page.has_next_page);
        assert_eq!(page.end_cursor.as_deref(), Some("AQHRfgT-x"));
        assert_eq!(page.nodes.len(), 2);
        assert!(page.nodes[0].stages.all_finished());
        assert_eq!(page.nodes[0].image_id.as_deref(), Some("202467835974822"));
        assert_eq!(page.nodes[0].item_count, Some(43));
        assert_eq!(page.nodes[1].stages.ingestion, Some(StageStatus::InProgress));
        assert_eq!(page.nodes[1].image_id, None);
        assert!(!page.nodes[1].stages.all_finished());
    }

    #[test]
    fn when_stage_value_is_unknown_should_keep_it_verbatim() {
        let body = SEED_SAMPLE.replacen(
            "\"tiler_status\":\"FINISHED\"",
            "\"tiler_status\":\"QUEUED_FOR_TILES\"",
            1,
        );
        let page = parse_page(&body).expect("parses");
        assert_eq!(
            page.nodes[0].stages.map_update,
            Some(StageStatus::Other("QUEUED_FOR_TILES".into()))
        );
        assert!(!page.nodes[0].stages.all_finished());
        assert!(!page.nodes[0].stages.any_failed());
    }

    #[test]
    fn when_reply_is_an_error_or_drifted_should_say_why() {
        assert!(matches!(parse_page("<html>"), Err(FeedError::NotJson(_))));
        let gql = r#"{"errors":[{"message":"Unknown document"}],"data":null}"#;
        assert_eq!(
            parse_page(gql),
            Err(FeedError::GraphQl("Unknown document".into()))
        );
        let reduce = r#"{"error":{"code":1,"message":"Please reduce the amount of data you're asking for, then retry your request"}}"#;
        assert!(matches!(parse_page(reduce), Err(FeedError::GraphQl(m)) if m.starts_with("Please reduce")));
        let renamed = SEED_SAMPLE.replace("\"feed\":", "\"activity\":");
        assert!(matches!(parse_page(&renamed), Err(FeedError::Shape(_))));
        let no_cluster = SEED_SAMPLE.replace("\"cluster_id\":\"151552211058876\",", "");
        assert!(matches!(parse_page(&no_cluster), Err(FeedError::Shape(m)) if m.contains("node 0")));
        let no_cursor = SEED_SAMPLE.replace("\"AQHRfgT-x\"", "null");
        assert!(matches!(parse_page(&no_cursor), Err(FeedError::Shape(_))));
    }

    #[test]
    fn when_user_unknown_should_report_not_found() {
        let page = parse_page(
            r#"{"data":{"fetch__User":null,"__typename":"Query"},"extensions":{"is_final":true}}"#,
        )
        .expect("parses");
        assert!(!page.user_found && page.nodes.is_empty() && !page.has_next_page);
    }

    #[test]
    fn stage_status_round_trips_through_serde() {
        for s in ["IN_PROGRESS", "FINISHED", "FAILED", "SOMETHING_NEW"] {
            let v: StageStatus = serde_json::from_value(serde_json::json!(s)).expect("de");
            assert_eq!(serde_json::to_value(&v).expect("ser"), serde_json::json!(s));
        }
    }
}
