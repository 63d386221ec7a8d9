//! The undocumented GraphQL activity feed, `getLatestActivity` (protocol doc §6.1).
//!
//! The endpoint may change without notice, so the reply is read field by field from a
//! `serde_json::Value`, node by node:
//! * a missing or `null` optional field is `None`; an unknown stage value is kept verbatim
//!   ([`StageStatus::Other`]); `created_at_seconds`, `captured_at_seconds` and `item_count` are read
//!   as JSON numbers or as numeric strings;
//! * a node without a `cluster_id` is skipped and counted ([`ActivityPage::skipped_nodes`]); the rest
//!   of the page is used. Only a page on which *every* node is unreadable is a [`FeedError::Shape`]
//!   (the field was renamed or removed, not one bad node);
//! * GraphQL `errors` beside usable `data` are kept ([`ActivityPage::errors`]) and the data is used;
//!   `errors` without usable data are a [`FeedError::GraphQl`], or [`FeedError::Gone`] when they say
//!   the document itself is unknown (a removed persisted query);
//! * a reply that lost the path `data.fetch__User.feed`, or that says `has_next_page` without a
//!   cursor, is a [`FeedError::Shape`]. A `null` cursor on the last page is normal.
//!
//! Every error is the signal for the coverage-tiles fallback for that user.

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
    /// Nodes left out because they could not be read (no `cluster_id`, not an object).
    #[serde(default)]
    pub skipped_nodes: u32,
    /// GraphQL `errors` that came beside usable `data` (message, with the path when given).
    #[serde(default)]
    pub errors: Vec<String>,
}

/// Why a reply gives no usable page.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FeedError {
    /// Not JSON at all.
    #[error("activity feed reply is not JSON: {0}")]
    NotJson(String),
    /// GraphQL errors (or a graph API error object) without usable data.
    #[error("activity feed answered a GraphQL error: {0}")]
    GraphQl(String),
    /// The server does not know the document any more (`PersistedQueryNotFound`, what GraphQL
    /// servers answer for a removed persisted query): the feed is gone, for every token.
    #[error("activity feed document is unknown to the server (feed gone): {0}")]
    Gone(String),
    /// JSON, but not the shape of a feed page.
    #[error("activity feed reply has an unexpected shape: {0}")]
    Shape(String),
}

/// Variables for one page request.
pub fn variables(user_id: &str, first: u32, after: Option<&str>, hide_after_days: u32) -> Value {
    serde_json::json!({"id": user_id, "first": first, "after": after, "hide_after": hide_after_days})
}

/// Parse a `getLatestActivity` reply (see the module doc for what is tolerated).
pub fn parse_page(body: &str) -> Result<ActivityPage, FeedError> {
    let v: Value = serde_json::from_str(body).map_err(|e| FeedError::NotJson(e.to_string()))?;
    // The graph API's own error object never comes with data.
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        return Err(FeedError::GraphQl(
            err.get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| err.to_string()),
        ));
    }
    let errors = graphql_errors(&v);
    let no_data = |what: &str| -> FeedError {
        if errors.is_empty() {
            FeedError::Shape(what.to_string())
        } else if errors.iter().any(|e| e.gone) {
            FeedError::Gone(join(&errors))
        } else {
            FeedError::GraphQl(join(&errors))
        }
    };
    let data = v
        .get("data")
        .filter(|d| !d.is_null())
        .ok_or_else(|| no_data("no `data`"))?;
    let user = data
        .get("fetch__User")
        .ok_or_else(|| no_data("no `data.fetch__User`"))?;
    if user.is_null() {
        // With errors, a null user is what the errors caused, not an unknown user.
        if !errors.is_empty() {
            return Err(no_data("`fetch__User` is null"));
        }
        return Ok(ActivityPage {
            user_found: false,
            nodes: vec![],
            has_next_page: false,
            end_cursor: None,
            skipped_nodes: 0,
            errors: vec![],
        });
    }
    let feed = user
        .get("feed")
        .filter(|f| !f.is_null())
        .ok_or_else(|| no_data("no `fetch__User.feed`"))?;
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
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    if has_next_page && end_cursor.is_none() {
        return Err(FeedError::Shape(
            "`has_next_page` is true but `end_cursor` is missing".into(),
        ));
    }
    let total = nodes.len();
    let parsed: Vec<ActivityNode> = nodes.iter().filter_map(parse_node).collect();
    if total > 0 && parsed.is_empty() {
        return Err(FeedError::Shape(format!(
            "none of the {total} feed nodes has a `cluster_id`"
        )));
    }
    let skipped_nodes = u32::try_from(total - parsed.len()).unwrap_or(u32::MAX);
    Ok(ActivityPage {
        user_found: true,
        nodes: parsed,
        has_next_page,
        end_cursor,
        skipped_nodes,
        errors: errors.into_iter().map(|e| e.text).collect(),
    })
}

/// One entry of a GraphQL `errors` array.
struct GraphQlError {
    /// The message, with the path when given.
    text: String,
    /// It says the document is unknown (a removed persisted query).
    gone: bool,
}

fn graphql_errors(v: &Value) -> Vec<GraphQlError> {
    let Some(errors) = v.get("errors").and_then(Value::as_array) else {
        return Vec::new();
    };
    errors
        .iter()
        .map(|e| {
            let message = e.get("message").and_then(Value::as_str).unwrap_or("(no message)");
            let code = e
                .get("extensions")
                .and_then(|x| x.get("code"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            let gone = message.contains("PersistedQueryNotFound") || code == "PERSISTED_QUERY_NOT_FOUND";
            let text = match e.get("path").and_then(Value::as_array) {
                Some(path) if !path.is_empty() => {
                    let path: Vec<String> = path
                        .iter()
                        .map(|p| match p {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect();
                    format!("{message} (at {})", path.join("."))
                }
                _ => message.to_string(),
            };
            GraphQlError { text, gone }
        })
        .collect()
}

fn join(errors: &[GraphQlError]) -> String {
    errors
        .iter()
        .map(|e| e.text.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

/// One node, or `None` when it cannot be used (not an object, no `cluster_id`).
fn parse_node(n: &Value) -> Option<ActivityNode> {
    if !n.is_object() {
        return None;
    }
    let cluster_id = id_field(n, "cluster_id")?;
    let stage = |field: &str| {
        n.get(field)
            .and_then(Value::as_str)
            .map(|s| StageStatus::from(s.to_string()))
    };
    Some(ActivityNode {
        cluster_id,
        kind: n.get("type").and_then(Value::as_str).map(str::to_string),
        created_at_seconds: int_field(n, "created_at_seconds"),
        captured_at_seconds: int_field(n, "captured_at_seconds"),
        item_count: int_field(n, "item_count"),
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

/// An integer sent as a JSON number or as a numeric string (both have been seen for
/// `created_at_seconds`); anything else is `None`.
fn int_field(n: &Value, field: &str) -> Option<i64> {
    match n.get(field)? {
        Value::Number(num) => num.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
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
        // Every node without `cluster_id`: the field is gone, not one bad node.
        let no_cluster = SEED_SAMPLE.replace("\"cluster_id\":", "\"clusterId\":");
        assert!(
            matches!(parse_page(&no_cluster), Err(FeedError::Shape(m)) if m.contains("none of the 2")),
            "{:?}",
            parse_page(&no_cluster)
        );
        let no_cursor = SEED_SAMPLE.replace("\"AQHRfgT-x\"", "null");
        assert!(matches!(parse_page(&no_cursor), Err(FeedError::Shape(_))));
    }

    /// A page in the `feed-drift` shapes: `NOT_STARTED`/`FAILURE`/`null` stages, string
    /// `created_at_seconds`, a node without `cluster_id` after the first good one, `errors` beside
    /// the data, and the last page's `null` cursor.
    const DRIFTED: &str = r#"{"data":{"fetch__User":{"id":"104214208486349","feed":{"page_info":{"start_cursor":null,"end_cursor":null,"has_next_page":false,"has_previous_page":false},"nodes":[
        {"cluster_id":"500000000000001","type":"UPLOAD","created_at_seconds":"1714557600","captured_at_seconds":1713600000,"item_count":null,"image_id":null,"status":"FINISHED","initial_processing_status":"IN_PROGRESS","anonymization_status":"NOT_STARTED","tiler_status":null,"error_code":"UNSET","timezone":"UTC","__typename":"ClusterLatestActivityItem"},
        {"type":"UPLOAD","created_at_seconds":"1714557700","captured_at_seconds":null,"status":"FINISHED","initial_processing_status":null,"anonymization_status":null,"tiler_status":null,"error_code":"UNSET","__typename":"ClusterLatestActivityItem"},
        {"cluster_id":"500000000000002","type":"UPLOAD","created_at_seconds":"1714557500","captured_at_seconds":"1713500000","item_count":"7","image_id":"900","status":"FINISHED","initial_processing_status":"FAILURE","anonymization_status":"NOT_STARTED","tiler_status":null,"error_code":"SIM_PROCESSING_FAILED","timezone":"UTC","__typename":"ClusterLatestActivityItem"}
        ],"__typename":"UserFeedConnection"},"__typename":"User"},"__typename":"Query"},
        "errors":[{"message":"Cannot return null for non-nullable field ClusterLatestActivityItem.cluster_id","path":["fetch__User","feed","nodes",1,"cluster_id"],"severity":"ERROR"}],
        "extensions":{"is_final":true}}"#;

    #[test]
    fn when_a_node_has_no_cluster_id_should_skip_and_count_it_and_keep_the_rest() {
        let page = parse_page(DRIFTED).expect("the good nodes are used");
        let ids: Vec<&str> = page.nodes.iter().map(|n| n.cluster_id.as_str()).collect();
        assert_eq!(ids, ["500000000000001", "500000000000002"]);
        assert_eq!(page.skipped_nodes, 1);
        // One bad node among good ones in the seed's sample too.
        let one_bad = SEED_SAMPLE.replacen("\"cluster_id\":\"151552211058876\",", "", 1);
        let page = parse_page(&one_bad).expect("parses");
        assert_eq!(page.nodes.len(), 1);
        assert_eq!(page.nodes[0].cluster_id, "151552211058877");
        assert_eq!(page.skipped_nodes, 1);
        // Not an object at all counts the same.
        let junk = SEED_SAMPLE.replacen("\"nodes\":[", "\"nodes\":[42,", 1);
        assert_eq!(parse_page(&junk).expect("parses").skipped_nodes, 1);
    }

    #[test]
    fn when_errors_come_beside_valid_data_should_use_the_data_and_keep_the_errors() {
        let page = parse_page(DRIFTED).expect("parses");
        assert_eq!(page.errors.len(), 1);
        assert!(
            page.errors[0].contains("non-nullable field")
                && page.errors[0].contains("fetch__User.feed.nodes.1"),
            "{:?}",
            page.errors
        );
        // Errors with a null user are not "unknown user": the errors caused it.
        let null_user = r#"{"data":{"fetch__User":null},"errors":[{"message":"Internal error"}]}"#;
        assert_eq!(
            parse_page(null_user),
            Err(FeedError::GraphQl("Internal error".into()))
        );
    }

    #[test]
    fn when_stages_are_null_or_unknown_should_keep_them_verbatim_or_absent() {
        let page = parse_page(DRIFTED).expect("parses");
        let a = &page.nodes[0].stages;
        assert_eq!(a.image_processing, Some(StageStatus::InProgress));
        assert_eq!(a.map_data, Some(StageStatus::Other("NOT_STARTED".into())));
        assert_eq!(a.map_update, None);
        let b = &page.nodes[1].stages;
        assert_eq!(b.image_processing, Some(StageStatus::Other("FAILURE".into())));
        assert!(!b.any_failed(), "an unknown spelling is not FAILED");
        assert_eq!(page.nodes[1].error_code.as_deref(), Some("SIM_PROCESSING_FAILED"));
    }

    #[test]
    fn when_numbers_come_as_strings_should_read_them() {
        let page = parse_page(DRIFTED).expect("parses");
        assert_eq!(page.nodes[0].created_at_seconds, Some(1_714_557_600));
        assert_eq!(page.nodes[0].captured_at_seconds, Some(1_713_600_000));
        assert_eq!(page.nodes[1].captured_at_seconds, Some(1_713_500_000));
        assert_eq!(page.nodes[1].item_count, Some(7));
        assert_eq!(page.nodes[0].item_count, None);
        let bad = DRIFTED.replacen("\"1714557600\"", "\"yesterday\"", 1);
        assert_eq!(
            parse_page(&bad).expect("parses").nodes[0].created_at_seconds,
            None
        );
    }

    #[test]
    fn when_the_last_page_has_a_null_cursor_should_end_normally() {
        let page = parse_page(DRIFTED).expect("parses");
        assert!(!page.has_next_page);
        assert_eq!(page.end_cursor, None);
        // An empty cursor is no cursor.
        let empty = SEED_SAMPLE.replace("\"AQHRfgT-x\"", "\"\"");
        assert!(matches!(parse_page(&empty), Err(FeedError::Shape(_))));
    }

    #[test]
    fn when_the_document_is_unknown_should_say_the_feed_is_gone() {
        let gone = r#"{"errors":[{"message":"PersistedQueryNotFound","extensions":{"code":"PERSISTED_QUERY_NOT_FOUND"}}]}"#;
        assert_eq!(
            parse_page(gone),
            Err(FeedError::Gone("PersistedQueryNotFound".into()))
        );
        let by_code = r#"{"errors":[{"message":"not here","extensions":{"code":"PERSISTED_QUERY_NOT_FOUND"}}],"data":null}"#;
        assert!(matches!(parse_page(by_code), Err(FeedError::Gone(_))));
        let other = r#"{"errors":[{"message":"Rate limited"}]}"#;
        assert!(matches!(parse_page(other), Err(FeedError::GraphQl(_))));
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
