//! `GET|POST /graph/graphql`: `getLatestActivity` and `getNewSequences` (§6, §14.3).
//!
//! No GraphQL engine: the operation is picked by `operationName` or by the name after `query` in
//! `doc`, and the reply always carries the complete documented selection.

use std::cmp::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};

use super::{id_string, round7, Params};
use crate::auth::{check_graph, form_pairs, presented_token, Need};
use crate::reply::{self, graphql_error, ok};
use crate::server::Sim;
use crate::state::{Cluster, State as World, STAGE_FIELDS};

const DAY_MS: i64 = 24 * 3600 * 1000;

struct GqlRequest {
    doc: String,
    variables: Value,
    operation: Option<String>,
}

fn bad(message: &str) -> Response {
    graphql_error(StatusCode::BAD_REQUEST, 100, message)
}

fn from_params(p: &Params) -> Result<GqlRequest, Response> {
    let doc = p
        .get("doc")
        .or_else(|| p.get("query"))
        .cloned()
        .unwrap_or_default();
    let variables = match p.get("variables").map(String::as_str) {
        None | Some("") => json!({}),
        Some(s) => serde_json::from_str(s).map_err(|_| bad("variables is not valid JSON"))?,
    };
    Ok(GqlRequest {
        doc,
        variables,
        operation: p.get("operationName").cloned(),
    })
}

/// `GET /graph/graphql?doc=…&variables=…[&operationName=…]`
pub async fn graphql_get(State(sim): State<Arc<Sim>>, headers: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let p: Params = form_pairs(q.unwrap_or_default().as_bytes()).into_iter().collect();
    match from_params(&p) {
        Ok(req) => run(&sim, &headers, p.get("access_token").cloned(), req),
        Err(r) => r,
    }
}

/// `POST /graph/graphql` with the same fields as form or JSON body.
pub async fn graphql_post(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    let mut p: Params = form_pairs(q.unwrap_or_default().as_bytes()).into_iter().collect();
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(&body) {
        for (k, v) in map {
            let s = match v {
                Value::String(s) => s,
                Value::Null => continue,
                other => other.to_string(),
            };
            p.insert(k, s);
        }
    } else {
        p.extend(form_pairs(&body));
    }
    match from_params(&p) {
        Ok(req) => run(&sim, &headers, p.get("access_token").cloned(), req),
        Err(r) => r,
    }
}

fn operation_name(req: &GqlRequest) -> Option<String> {
    if let Some(op) = &req.operation {
        return Some(op.clone());
    }
    let rest = req.doc.trim_start().strip_prefix("query")?;
    let name: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

fn run(sim: &Sim, headers: &HeaderMap, query_token: Option<String>, req: GqlRequest) -> Response {
    let token = presented_token(headers, None).or(query_token);
    let w = sim.world();
    if let Err(r) = check_graph(&w, token.as_deref(), sim.now_ms(), Need::Graphql) {
        return r;
    }
    if w.settings.graphql_documents_gone {
        return document_gone();
    }
    match operation_name(&req).as_deref() {
        Some("getLatestActivity") if req.doc.contains("fetch__User") || req.operation.is_some() => {
            latest_activity(&w, sim, &req.variables)
        }
        Some("getNewSequences") => new_sequences(&w, sim, &req.variables),
        Some(other) => bad(&format!("Unknown GraphQL document or operation {other:?}")),
        None => bad("Unknown GraphQL document: no operation name"),
    }
}

/// The reply to a document the server no longer knows (`feed-gone`).
///
/// The protocol doc has no reply of Mapillary's for a removed persisted query or document. The simulator
/// uses the usual GraphQL persisted-query shape, `{"errors":[{"message":"PersistedQueryNotFound",…}]}`
/// with no `data`, and answers it with HTTP 200 (as persisted-query servers do): the stricter reading,
/// since only the body, not the status, tells the client that the feed is gone.
fn document_gone() -> Response {
    ok(json!({
        "errors": [{
            "message": "PersistedQueryNotFound",
            "extensions": {"code": "PERSISTED_QUERY_NOT_FOUND"},
        }],
    }))
}

/// Stage value of a failed stage in the drifted feed (the help centre's "failed" state, spelled unlike the
/// simulator's default `FAILED`).
pub const DRIFT_FAILED: &str = "FAILURE";
/// Stage value of the next stage not started yet in the drifted feed.
pub const DRIFT_NOT_STARTED: &str = "NOT_STARTED";

/// Rewrite a node for `feed-drift`: the stage after the running one is [`DRIFT_NOT_STARTED`], the stages
/// after that are `null`, a failed stage is [`DRIFT_FAILED`], and `created_at_seconds` is a string. Stages
/// that finished stay `FINISHED`, so a drifted upload still visibly completes.
fn drift_node(node: &mut Value, progress: &crate::state::Progress) {
    for (i, field) in STAGE_FIELDS.iter().enumerate() {
        let value = if i < progress.current {
            continue;
        } else if i == progress.current {
            if !progress.failed {
                continue;
            }
            json!(DRIFT_FAILED)
        } else if i == progress.current + 1 {
            json!(DRIFT_NOT_STARTED)
        } else {
            Value::Null
        };
        node[*field] = value;
    }
    if let Some(secs) = node.get("created_at_seconds").and_then(Value::as_i64) {
        node["created_at_seconds"] = json!(secs.to_string());
    }
}

/// The node without `cluster_id` that the drifted feed puts among the good ones.
fn drift_stray_node(now: i64) -> Value {
    json!({
        "type": "UPLOAD",
        "created_at_seconds": now.div_euclid(1000).to_string(),
        "captured_at_seconds": null,
        "thumb_url": null,
        "item_count": null,
        "image_id": null,
        "status": "FINISHED",
        "initial_processing_status": null,
        "anonymization_status": null,
        "tiler_status": null,
        "error_code": "UNSET",
        "timezone": null,
        "__typename": "ClusterLatestActivityItem",
    })
}

/// Sort key: newest first by (created_at_seconds, cluster_id).
fn key_of(c: &Cluster) -> (i64, String) {
    (c.created_at_ms.div_euclid(1000), c.id.clone())
}

fn cmp_id(a: &str, b: &str) -> Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// Descending feed order: `Less` means `a` comes first.
fn feed_order(a: &(i64, String), b: &(i64, String)) -> Ordering {
    b.0.cmp(&a.0).then_with(|| cmp_id(&b.1, &a.1))
}

fn encode_cursor(k: &(i64, String)) -> String {
    URL_SAFE_NO_PAD.encode(format!("sim1:{}:{}", k.0, k.1))
}

fn decode_cursor(s: &str) -> Option<(i64, String)> {
    let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(s).ok()?).ok()?;
    let rest = raw.strip_prefix("sim1:")?;
    let (secs, id) = rest.split_once(':')?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((secs.parse().ok()?, id.to_string()))
}

fn int_var(v: &Value, name: &str) -> Result<Option<i64>, Response> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_i64()
            .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
            .map(Some)
            .ok_or_else(|| bad(&format!("Variable ${name} must be an Int"))),
    }
}

fn node(w: &World, sim: &Sim, c: &Cluster, now: i64) -> Value {
    let p = c.progress(now);
    let done2 = p.current >= 2;
    let first = if done2 { w.cluster_first_image(c) } else { None };
    let thumb = first.map(|i| {
        let exp = now + w.settings.thumb_lifetime_seconds * 1000;
        format!("{}/_sim/thumbs/{}/256?exp={exp}", sim.base_url(), i.id)
    });
    let item_count: Option<usize> = done2.then(|| {
        c.sequence_ids
            .iter()
            .filter_map(|s| w.sequences.get(s))
            .map(|s| s.image_ids.len())
            .sum()
    });
    json!({
        "cluster_id": c.id,
        "type": "UPLOAD",
        "created_at_seconds": c.created_at_ms.div_euclid(1000),
        "captured_at_seconds": c.first_capture_ms().map(|m| m.div_euclid(1000)),
        "thumb_url": thumb,
        "item_count": item_count,
        "image_id": first.map(|i| i.id.clone()),
        "status": p.stages[0],
        "initial_processing_status": p.stages[1],
        "anonymization_status": p.stages[2],
        "tiler_status": p.stages[3],
        "error_code": p.error_code,
        "timezone": c.plan.timezone,
        "__typename": "ClusterLatestActivityItem",
    })
}

fn latest_activity(w: &World, sim: &Sim, vars: &Value) -> Response {
    let now = sim.now_ms();
    let Some(user_id) = vars.get("id").and_then(id_string) else {
        return bad("Variable $id of required type ID! was not provided");
    };
    let first = match int_var(vars, "first") {
        Ok(v) => v.map_or(w.settings.feed_default_first, |n| {
            usize::try_from(n.max(1)).unwrap_or(1)
        }),
        Err(r) => return r,
    }
    .min(w.settings.feed_max_first);
    let hide_after = match int_var(vars, "hide_after") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let after = match vars.get("after") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match decode_cursor(s) {
            Some(k) => Some(k),
            None => return bad("Invalid cursor for argument after"),
        },
        Some(_) => return bad("Invalid cursor for argument after"),
    };
    if !w.users.contains_key(&user_id) {
        return ok(
            json!({"data": {"fetch__User": null, "__typename": "Query"}, "extensions": {"is_final": true}}),
        );
    }
    let mut items: Vec<&Cluster> = w
        .clusters_of(&user_id)
        .filter(|c| match hide_after {
            Some(days) => !(c.progress(now).failed && c.created_at_ms < now - days * DAY_MS),
            None => true,
        })
        .collect();
    items.sort_by(|a, b| feed_order(&key_of(a), &key_of(b)));
    if let Some(anchor) = &after {
        items.retain(|c| feed_order(&key_of(c), anchor) == Ordering::Greater);
    }
    let has_next = items.len() > first;
    items.truncate(first);
    let end_cursor = if has_next {
        items.last().map(|c| encode_cursor(&key_of(c)))
    } else {
        None
    };
    let drift = w.settings.feed_drift;
    let mut nodes: Vec<Value> = items
        .iter()
        .map(|c| {
            let mut n = node(w, sim, c, now);
            if drift {
                drift_node(&mut n, &c.progress(now));
            }
            n
        })
        .collect();
    // feed-drift: a node without `cluster_id` right after the first good one, and a GraphQL error about it
    // beside the (otherwise valid) data. It is not one of the `first` nodes and never anchors a cursor.
    let mut errors = Vec::new();
    if drift && !nodes.is_empty() {
        nodes.insert(1, drift_stray_node(now));
        errors.push(json!({
            "message": "Cannot return null for non-nullable field ClusterLatestActivityItem.cluster_id",
            "path": ["fetch__User", "feed", "nodes", 1, "cluster_id"],
            "severity": "ERROR",
        }));
    }
    let mut reply = json!({
        "data": {
            "fetch__User": {
                "id": user_id,
                "feed": {
                    "page_info": {
                        "start_cursor": null,
                        "end_cursor": end_cursor,
                        "has_next_page": has_next,
                        "has_previous_page": after.is_some(),
                    },
                    "nodes": nodes,
                    "__typename": "UserFeedConnection",
                },
                "__typename": "User",
            },
            "__typename": "Query",
        },
        "extensions": {"is_final": true},
    });
    if !errors.is_empty() {
        reply["errors"] = Value::Array(errors);
    }
    ok(reply)
}

fn new_sequences(w: &World, sim: &Sim, vars: &Value) -> Response {
    let now = sim.now_ms();
    let Some(username) = vars.get("username").and_then(Value::as_str) else {
        return bad("Variable $username of required type String! was not provided");
    };
    let Some(user) = w.users.values().find(|u| u.username == username) else {
        return ok(
            json!({"data": {"user_by_username": null, "__typename": "Query"}, "extensions": {"is_final": true}}),
        );
    };
    let since = now - w.settings.new_sequences_window_days * DAY_MS;
    let mut seqs: Vec<_> = w
        .sequences
        .values()
        .filter(|s| s.owner_id == user.id && s.created_at_ms >= since)
        .collect();
    if seqs.len() > w.settings.new_sequences_max {
        return reply::reduce_data();
    }
    seqs.sort_by(|a, b| {
        b.created_at_ms
            .cmp(&a.created_at_ms)
            .then_with(|| a.id.cmp(&b.id))
    });
    let creator_id: Value = user
        .id
        .parse::<u64>()
        .map(Value::from)
        .unwrap_or(Value::String(user.id.clone()));
    let mut features = Vec::new();
    for s in &seqs {
        for img in s.image_ids.iter().filter_map(|i| w.images.get(i)) {
            let image_id: Value = img
                .id
                .parse::<u64>()
                .map(Value::from)
                .unwrap_or(Value::String(img.id.clone()));
            features.push(json!({
                "type": "Feature",
                "id": null,
                "geometry": {"type": "Point", "coordinates": [
                    round7(img.meta.lon).to_string(), round7(img.meta.lat).to_string()]},
                "properties": {
                    "sequence_id": s.id,
                    "captured_at": img.meta.captured_at_ms,
                    "creator_id": creator_id,
                    "is_pano": img.is_pano,
                    "id": image_id,
                    "compass_angle": img.meta.compass_angle.unwrap_or(0.0),
                },
            }));
        }
    }
    let geojson = json!({"type": "FeatureCollection", "features": features}).to_string();
    let keys: Vec<&str> = seqs.iter().map(|s| s.id.as_str()).collect();
    ok(json!({
        "data": {
            "user_by_username": {
                "id": user.id,
                "new_sequences": {"sequence_keys": keys, "geojson": geojson, "__typename": "MLYNewSequencesData"},
                "__typename": "User",
            },
            "__typename": "Query",
        },
        "extensions": {"is_final": true},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let k = (1_714_557_600, "123456789012345".to_string());
        let c = encode_cursor(&k);
        assert!(c
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(decode_cursor(&c), Some(k));
        assert_eq!(decode_cursor("not a cursor"), None);
        assert_eq!(decode_cursor(&URL_SAFE_NO_PAD.encode("sim1:x:1")), None);
    }

    #[test]
    fn feed_order_is_newest_first_then_higher_id() {
        let a = (10, "200".to_string());
        let b = (10, "1000".to_string());
        let c = (9, "999".to_string());
        let mut v = vec![a.clone(), c.clone(), b.clone()];
        v.sort_by(feed_order);
        assert_eq!(v, vec![b, a, c]);
    }
}
