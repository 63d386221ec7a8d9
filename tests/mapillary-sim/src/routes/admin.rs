//! The control and inspection API under `/_sim` (documented in README.md).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use super::{id_string, Params};
use crate::config::{ProcessingPlan, Settings, World};
use crate::faults::{FaultRule, FaultSpec};
use crate::reply::{json_reply, ok};
use crate::server::Sim;
use crate::state::{ClusterContent, ImageSource, Org, TokenRecord, User, STAGE_FIELDS};

type S = State<Arc<Sim>>;

pub fn router() -> Router<Arc<Sim>> {
    Router::new()
        .route("/_sim/clock", get(clock))
        .route("/_sim/clock/advance", post(clock_advance))
        .route("/_sim/clock/set", post(clock_set))
        .route("/_sim/config", get(config_get).post(config_set))
        .route("/_sim/world", get(world_get).post(world_set))
        .route(
            "/_sim/plans/default",
            get(plan_default_get).post(plan_default_set),
        )
        .route(
            "/_sim/plans/next",
            get(plans_next_get).post(plans_next_push).delete(plans_next_clear),
        )
        .route(
            "/_sim/faults",
            get(faults_list).post(faults_add).delete(faults_clear),
        )
        .route("/_sim/faults/{id}", delete(fault_delete))
        .route("/_sim/sessions", get(sessions))
        .route("/_sim/sessions/{key}", get(session))
        .route("/_sim/sessions/{key}/bytes", get(session_bytes))
        .route("/_sim/clusters", get(clusters))
        .route("/_sim/clusters/{id}", get(cluster))
        .route("/_sim/clusters/{id}/plan", post(cluster_plan))
        .route("/_sim/users", get(users).post(user_add))
        .route("/_sim/tokens", post(token_add))
        .route("/_sim/tokens/expire", post(tokens_expire))
        .route("/_sim/organizations", post(org_add))
        .route("/_sim/requests", get(requests).delete(requests_clear))
        .route("/_sim/logging", get(logging))
        .route("/_sim/thumbs/{image_id}/{size}", get(thumb))
}

fn bad(msg: impl Into<String>) -> Response {
    json_reply(StatusCode::BAD_REQUEST, json!({ "error": msg.into() }))
}

fn not_found(what: &str) -> Response {
    json_reply(
        StatusCode::NOT_FOUND,
        json!({ "error": format!("{what} not found") }),
    )
}

/// Recursively merge `patch` into `base` (objects merge, everything else replaces).
fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}

fn patched<T: Serialize + DeserializeOwned>(base: &T, patch: Value) -> Result<T, Response> {
    let mut v = serde_json::to_value(base).map_err(|e| bad(e.to_string()))?;
    merge(&mut v, patch);
    serde_json::from_value(v).map_err(|e| bad(format!("invalid value: {e}")))
}

fn to_json<T: Serialize>(v: &T) -> Response {
    match serde_json::to_value(v) {
        Ok(v) => ok(v),
        Err(e) => json_reply(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": e.to_string()})),
    }
}

fn clock_view(sim: &Sim) -> Value {
    let now = sim.now_ms();
    json!({"now_ms": now, "now_seconds": now.div_euclid(1000), "frozen": sim.clock.is_frozen()})
}

async fn clock(State(sim): S) -> Response {
    ok(clock_view(&sim))
}

async fn clock_advance(State(sim): S, Json(v): Json<Value>) -> Response {
    let ms = match (
        v.get("seconds").and_then(Value::as_f64),
        v.get("ms").and_then(Value::as_i64),
    ) {
        (Some(s), _) => (s * 1000.0).round() as i64,
        (None, Some(ms)) => ms,
        _ => return bad("give \"seconds\" or \"ms\""),
    };
    sim.clock.advance_ms(ms);
    ok(clock_view(&sim))
}

async fn clock_set(State(sim): S, Json(v): Json<Value>) -> Response {
    let at = if let Some(ms) = v.get("at_ms").and_then(Value::as_i64) {
        ms
    } else if let Some(s) = v.get("at_seconds").and_then(Value::as_i64) {
        s * 1000
    } else if let Some(iso) = v.get("at").and_then(Value::as_str) {
        match time::OffsetDateTime::parse(iso, &time::format_description::well_known::Rfc3339) {
            Ok(t) => i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
            Err(e) => return bad(format!("at: {e}")),
        }
    } else {
        return bad("give \"at_ms\", \"at_seconds\" or \"at\" (RFC 3339)");
    };
    sim.clock.set_ms(at);
    ok(clock_view(&sim))
}

async fn config_get(State(sim): S) -> Response {
    to_json(&sim.world().settings)
}

async fn config_set(State(sim): S, Json(patch): Json<Value>) -> Response {
    let mut w = sim.world();
    match patched::<Settings>(&w.settings, patch) {
        Ok(s) => {
            w.settings = s;
            to_json(&w.settings)
        }
        Err(r) => r,
    }
}

fn world_view(settings: &Settings) -> Value {
    json!({
        "world": settings.world().map(World::name),
        "worlds": World::names(),
        "settings": settings,
    })
}

/// `GET /_sim/world`: the world the switches match (`null` when a `/_sim/config` patch mixed worlds).
async fn world_get(State(sim): S) -> Response {
    ok(world_view(&sim.world().settings))
}

/// `POST /_sim/world {"world": NAME}`: set every world switch to NAME's preset (other settings kept).
async fn world_set(State(sim): S, Json(v): Json<Value>) -> Response {
    let Some(name) = v.get("world").and_then(Value::as_str) else {
        return bad(format!(
            "give {{\"world\": NAME}}, one of: {}",
            World::names().join(", ")
        ));
    };
    let world: World = match name.parse() {
        Ok(w) => w,
        Err(e) => return bad(format!("{e}")),
    };
    let mut w = sim.world();
    world.apply(&mut w.settings);
    tracing::info!(world = world.name(), "world selected");
    ok(world_view(&w.settings))
}

async fn plan_default_get(State(sim): S) -> Response {
    to_json(&sim.world().settings.default_plan)
}

async fn plan_default_set(State(sim): S, Json(patch): Json<Value>) -> Response {
    let mut w = sim.world();
    match patched::<ProcessingPlan>(&w.settings.default_plan, patch) {
        Ok(p) => {
            w.settings.default_plan = p;
            to_json(&w.settings.default_plan)
        }
        Err(r) => r,
    }
}

async fn plans_next_get(State(sim): S) -> Response {
    to_json(&sim.world().next_plans)
}

async fn plans_next_push(State(sim): S, Json(patch): Json<Value>) -> Response {
    let mut w = sim.world();
    match patched::<ProcessingPlan>(&w.settings.default_plan, patch) {
        Ok(p) => {
            w.next_plans.push_back(p);
            ok(json!({"queued": w.next_plans.len()}))
        }
        Err(r) => r,
    }
}

async fn plans_next_clear(State(sim): S) -> Response {
    sim.world().next_plans.clear();
    ok(json!({"queued": 0}))
}

async fn cluster_plan(State(sim): S, Path(id): Path<String>, Json(patch): Json<Value>) -> Response {
    let mut w = sim.world();
    let Some(c) = w.cluster_index(&id).and_then(|i| w.clusters.get_mut(i)) else {
        return not_found("cluster");
    };
    match patched::<ProcessingPlan>(&c.plan, patch) {
        Ok(p) => {
            c.plan = p;
            to_json(&c.plan)
        }
        Err(r) => r,
    }
}

async fn faults_list(State(sim): S) -> Response {
    to_json(&sim.world_raw().faults)
}

async fn faults_add(State(sim): S, Json(v): Json<Value>) -> Response {
    let spec: FaultSpec = match serde_json::from_value(v) {
        Ok(s) => s,
        Err(e) => return bad(format!("invalid fault rule: {e}")),
    };
    let mut w = sim.world_raw();
    let id = w.next_fault_id;
    w.next_fault_id += 1;
    w.faults.push(FaultRule::new(id, spec, sim.seed));
    ok(json!({"id": id}))
}

async fn faults_clear(State(sim): S) -> Response {
    sim.world_raw().faults.clear();
    ok(json!({"cleared": true}))
}

async fn fault_delete(State(sim): S, Path(id): Path<u64>) -> Response {
    let mut w = sim.world_raw();
    let before = w.faults.len();
    w.faults.retain(|f| f.id != id);
    if w.faults.len() == before {
        return not_found("fault rule");
    }
    ok(json!({"deleted": id}))
}

async fn sessions(State(sim): S) -> Response {
    to_json(&sim.store.list())
}

async fn session(State(sim): S, Path(key): Path<String>) -> Response {
    match sim.store.get(&key) {
        Some(s) => to_json(&s.view()),
        None => not_found("session"),
    }
}

async fn session_bytes(State(sim): S, Path(key): Path<String>) -> Response {
    let Some(s) = sim.store.get(&key) else {
        return not_found("session");
    };
    match s.read_all().await {
        Ok(bytes) => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            Body::from(bytes),
        )
            .into_response(),
        Err(e) => json_reply(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": e.to_string()})),
    }
}

fn cluster_summary(sim: &Sim, c: &crate::state::Cluster) -> Value {
    let p = c.progress(sim.now_ms());
    let mut stages = serde_json::Map::new();
    for (name, v) in STAGE_FIELDS.iter().zip(p.stages.iter()) {
        stages.insert((*name).to_string(), json!(v));
    }
    let (error_reason, rejected) = match &c.content {
        ClusterContent::Images { rejected, .. } => (None, rejected.clone()),
        ClusterContent::Invalid { reason, rejected, .. } => (Some(reason.clone()), rejected.clone()),
    };
    json!({
        "id": c.id, "owner_id": c.owner_id, "organization_id": c.organization_id, "file_type": c.file_type,
        "file_handle": c.file_handle, "upload_key": c.upload_key, "created_at_ms": c.created_at_ms,
        "plan": c.plan, "stages": stages, "error_code": p.error_code, "failed": p.failed,
        "content_error": error_reason, "accepted_images": c.accepted_count(), "rejected": rejected,
        "sequence_ids": c.sequence_ids, "materialized": c.materialized, "tiles_visible": c.tiles_visible(sim.now_ms()),
    })
}

async fn clusters(State(sim): S) -> Response {
    let w = sim.world();
    let v: Vec<Value> = w.clusters.iter().map(|c| cluster_summary(&sim, c)).collect();
    ok(Value::Array(v))
}

async fn cluster(State(sim): S, Path(id): Path<String>) -> Response {
    let w = sim.world();
    let Some(c) = w.cluster(&id) else {
        return not_found("cluster");
    };
    let mut v = cluster_summary(&sim, c);
    let seqs: Vec<Value> = c
        .sequence_ids
        .iter()
        .filter_map(|s| w.sequences.get(s))
        .map(|s| {
            let images: Vec<Value> = s
                .image_ids
                .iter()
                .filter_map(|i| w.images.get(i))
                .map(|i| json!({"id": i.id, "name": i.name, "meta": i.meta, "source": i.source}))
                .collect();
            json!({"id": s.id, "created_at_ms": s.created_at_ms, "image_ids": s.image_ids, "images": images})
        })
        .collect();
    v["sequences"] = Value::Array(seqs);
    if let ClusterContent::Images { images, .. } = &c.content {
        v["pending_images"] = json!(images
            .iter()
            .map(|i| json!({"name": i.name, "meta": i.meta}))
            .collect::<Vec<_>>());
    }
    ok(v)
}

async fn users(State(sim): S) -> Response {
    to_json(&sim.world().users.values().collect::<Vec<_>>())
}

async fn user_add(State(sim): S, Json(v): Json<Value>) -> Response {
    let now = sim.now_ms();
    let mut w = sim.world();
    let Some(username) = v.get("username").and_then(Value::as_str).map(str::to_string) else {
        return bad("username is required");
    };
    if w.users.values().any(|u| u.username == username) {
        return bad("username already exists");
    }
    let id = match v.get("id").and_then(id_string) {
        Some(id) if w.users.contains_key(&id) => return bad("id already exists"),
        Some(id) => id,
        None => w.ids.numeric(),
    };
    let lifetime = v
        .get("token_lifetime_seconds")
        .and_then(Value::as_i64)
        .unwrap_or(w.settings.token_lifetime_seconds);
    w.users.insert(
        id.clone(),
        User {
            id: id.clone(),
            username: username.clone(),
            email: v.get("email").and_then(Value::as_str).map(str::to_string),
            password: v.get("password").and_then(Value::as_str).map(str::to_string),
        },
    );
    let oauth = v.get("oauth").and_then(Value::as_bool).unwrap_or(false);
    let app = oauth.then(|| crate::defaults::APP_ID.to_string());
    let token = w.issue_token(&id, app, lifetime, now);
    ok(json!({"id": id, "username": username, "access_token": token, "expires_at_ms": now + lifetime * 1000}))
}

async fn token_add(State(sim): S, Json(v): Json<Value>) -> Response {
    let now = sim.now_ms();
    let mut w = sim.world();
    let Some(user_id) = v
        .get("user")
        .and_then(Value::as_str)
        .and_then(|u| w.find_user(u))
        .map(|u| u.id.clone())
    else {
        return bad("user (id or username) is required and must exist");
    };
    let lifetime = v
        .get("lifetime_seconds")
        .and_then(Value::as_i64)
        .unwrap_or(w.settings.token_lifetime_seconds);
    let app = v.get("oauth_app").and_then(id_string).or_else(|| {
        v.get("oauth")
            .and_then(Value::as_bool)
            .filter(|b| *b)
            .map(|_| crate::defaults::APP_ID.to_string())
    });
    let token = w.issue_token(&user_id, app, lifetime, now);
    ok(json!({"access_token": token, "user_id": user_id, "expires_at_ms": now + lifetime * 1000}))
}

async fn tokens_expire(State(sim): S, Json(v): Json<Value>) -> Response {
    let now = sim.now_ms();
    let at = v.get("at_ms").and_then(Value::as_i64).unwrap_or(now);
    let mut w = sim.world();
    let user = v
        .get("user")
        .and_then(Value::as_str)
        .and_then(|u| w.find_user(u))
        .map(|u| u.id.clone());
    let token = v.get("token").and_then(Value::as_str).map(str::to_string);
    if user.is_none() && token.is_none() {
        return bad("give \"token\" or \"user\"");
    }
    let mut n = 0;
    for (t, rec) in w.tokens.iter_mut() {
        let hit = token.as_deref() == Some(t.as_str()) || user.as_deref() == Some(rec.user_id.as_str());
        if hit {
            let rec: &mut TokenRecord = rec;
            rec.expires_at_ms = Some(at);
            n += 1;
        }
    }
    ok(json!({"expired": n, "at_ms": at}))
}

async fn org_add(State(sim): S, Json(v): Json<Value>) -> Response {
    let mut w = sim.world();
    let Some(name) = v.get("name").and_then(Value::as_str).map(str::to_string) else {
        return bad("name is required");
    };
    let id = v.get("id").and_then(id_string).unwrap_or_else(|| w.ids.numeric());
    let slug = v
        .get("slug")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| name.to_lowercase().replace(' ', "-"));
    let description = v
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut members = std::collections::BTreeSet::new();
    for m in v.get("members").and_then(Value::as_array).into_iter().flatten() {
        let Some(user) = m.as_str().and_then(|u| w.find_user(u)) else {
            return bad(format!("members: {m} is not a known user id or username"));
        };
        members.insert(user.id.clone());
    }
    let org = Org {
        id: id.clone(),
        name,
        slug,
        description,
        members,
    };
    w.orgs.insert(id, org.clone());
    to_json(&org)
}

async fn requests(State(sim): S) -> Response {
    to_json(&sim.world_raw().request_log)
}

async fn requests_clear(State(sim): S) -> Response {
    sim.world_raw().request_log.clear();
    ok(json!({"cleared": true}))
}

async fn logging(State(sim): S) -> Response {
    ok(Value::Array(sim.world_raw().logging_events.clone()))
}

/// `GET /_sim/thumbs/{image_id}/{size}?exp=…`: the image's uploaded JPEG until `exp` (sim ms).
async fn thumb(
    State(sim): S,
    Path((image_id, _size)): Path<(String, String)>,
    Query(p): Query<Params>,
) -> Response {
    let now = sim.now_ms();
    if p.get("exp")
        .and_then(|e| e.parse::<i64>().ok())
        .is_none_or(|e| now >= e)
    {
        return (StatusCode::FORBIDDEN, "URL signature expired").into_response();
    }
    let source = match sim.world().images.get(&image_id) {
        Some(i) => i.source.clone(),
        None => return not_found("image"),
    };
    let (key, entry) = match source {
        ImageSource::Upload { upload_key } => (upload_key, None),
        ImageSource::ZipEntry {
            upload_key,
            entry_name,
        } => (upload_key, Some(entry_name)),
    };
    let Some(session) = sim.store.get(&key) else {
        return not_found("upload");
    };
    let bytes = match session.read_all().await {
        Ok(b) => b,
        Err(e) => return json_reply(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": e.to_string()})),
    };
    let bytes = match entry {
        None => bytes,
        Some(name) => match zip_entry(&bytes, &name) {
            Some(b) => b,
            None => return not_found("zip entry"),
        },
    };
    ([(header::CONTENT_TYPE, "image/jpeg")], Body::from(bytes)).into_response()
}

fn zip_entry(bytes: &[u8], name: &str) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).ok()?;
    let mut f = archive.by_name(name).ok()?;
    let mut out = Vec::new();
    f.by_ref()
        .take(crate::content::MAX_ENTRY_BYTES)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}
