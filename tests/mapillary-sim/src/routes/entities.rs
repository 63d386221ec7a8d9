//! Graph entities: `/graph/me`, `/graph/{id}` (image, user, organization), `/graph/image_ids`,
//! `/graph/images` (batch and search).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::{fields_of, round7, Params};
use crate::auth::{check_graph, presented_token, Need};
use crate::reply::{graph_bad_request, graph_not_found, ok};
use crate::server::Sim;
use crate::state::{Image, State as World};

/// Every image field the simulator can render (§7.3).
pub const IMAGE_FIELDS: [&str; 31] = [
    "id",
    "altitude",
    "atomic_scale",
    "camera_parameters",
    "camera_type",
    "captured_at",
    "compass_angle",
    "computed_altitude",
    "computed_compass_angle",
    "computed_geometry",
    "computed_rotation",
    "creator",
    "exif_orientation",
    "geometry",
    "height",
    "width",
    "is_pano",
    "make",
    "model",
    "thumb_256_url",
    "thumb_1024_url",
    "thumb_2048_url",
    "thumb_original_url",
    "merge_cc",
    "mesh",
    "quality_score",
    "sequence",
    "sfm_cluster",
    "organization",
    "detections",
    "cluster_id",
];

fn token_of(headers: &HeaderMap, params: &Params) -> Option<String> {
    presented_token(headers, None).or_else(|| params.get("access_token").cloned())
}

fn point(lon: f64, lat: f64) -> Value {
    json!({"type": "Point", "coordinates": [round7(lon), round7(lat)]})
}

/// Render one image with `id` plus the requested fields (`Err` names an unknown field).
pub fn render_image(w: &World, sim: &Sim, img: &Image, fields: &[String]) -> Result<Value, String> {
    let mut out = Map::new();
    out.insert("id".into(), json!(img.id));
    let m = &img.meta;
    let now = sim.now_ms();
    let exp = now + w.settings.thumb_lifetime_seconds * 1000;
    let thumb = |size: &str| {
        json!(format!(
            "{}/_sim/thumbs/{}/{size}?exp={exp}",
            sim.base_url(),
            img.id
        ))
    };
    for f in fields {
        let v = match f.as_str() {
            "id" => continue,
            "altitude" => json!(m.altitude),
            "atomic_scale" => json!(1.0),
            "camera_parameters" => json!([0.85, 0.0, 0.0]),
            "camera_type" => json!("perspective"),
            "captured_at" => json!(m.captured_at_ms),
            "compass_angle" => json!(m.compass_angle),
            "computed_altitude" => json!(m.altitude.map(|a| a - 0.5)),
            "computed_compass_angle" => json!(m.compass_angle),
            "computed_geometry" => {
                let dlat = w.settings.computed_offset_m / 111_320.0;
                point(m.lon, m.lat + dlat)
            }
            "computed_rotation" => json!([0.0, 0.0, 0.0]),
            "creator" => {
                let name = w
                    .users
                    .get(&img.owner_id)
                    .map(|u| u.username.clone())
                    .unwrap_or_default();
                json!({"username": name, "id": img.owner_id})
            }
            "exif_orientation" => json!(m.orientation.unwrap_or(1)),
            "geometry" => point(m.lon, m.lat),
            "height" => json!(m.height),
            "width" => json!(m.width),
            "is_pano" => json!(img.is_pano),
            "make" => json!(m.make),
            "model" => json!(m.model),
            "thumb_256_url" => thumb("256"),
            "thumb_1024_url" => thumb("1024"),
            "thumb_2048_url" => thumb("2048"),
            "thumb_original_url" => thumb("original"),
            "merge_cc" => json!(img.cluster_id.parse::<u64>().unwrap_or(0) % 1_000_000),
            "mesh" => {
                json!({"id": format!("mesh_{}", img.id), "url": format!("{}/_sim/none", sim.base_url())})
            }
            "quality_score" => json!(0.9),
            "sequence" => json!(img.sequence_id),
            "sfm_cluster" => {
                json!({"id": format!("sfm_{}", img.cluster_id), "url": format!("{}/_sim/none", sim.base_url())})
            }
            "organization" => match &img.organization_id {
                Some(o) => json!({"id": o}),
                None => continue,
            },
            "detections" => json!({"data": []}),
            "cluster_id" => continue,
            other => return Err(other.to_string()),
        };
        if !v.is_null() {
            out.insert(f.clone(), v);
        }
    }
    Ok(Value::Object(out))
}

fn unknown_field(f: &str) -> Response {
    graph_bad_request(&format!("Tried accessing nonexisting field ({f})"))
}

/// `GET /graph/me`
pub async fn me(State(sim): State<Arc<Sim>>, headers: HeaderMap, Query(p): Query<Params>) -> Response {
    let w = sim.world();
    let caller = match check_graph(&w, token_of(&headers, &p).as_deref(), sim.now_ms(), Need::User) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Some(user) = caller.user_id().and_then(|u| w.users.get(u)) else {
        return graph_not_found("me");
    };
    let mut out = json!({"id": user.id});
    if fields_of(&p).iter().any(|f| f == "username") {
        out["username"] = json!(user.username);
    }
    ok(out)
}

/// `GET /graph/{id}`: an image, a user or an organization.
pub async fn object(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(p): Query<Params>,
) -> Response {
    let w = sim.world();
    if let Err(r) = check_graph(&w, token_of(&headers, &p).as_deref(), sim.now_ms(), Need::Entity) {
        return r;
    }
    let fields = fields_of(&p);
    if let Some(img) = w.images.get(&id) {
        return match render_image(&w, &sim, img, &fields) {
            Ok(v) => ok(v),
            Err(f) => unknown_field(&f),
        };
    }
    if let Some(user) = w.users.get(&id) {
        let mut out = json!({"id": user.id});
        for f in &fields {
            match f.as_str() {
                "id" => {}
                "username" => out["username"] = json!(user.username),
                other => return unknown_field(other),
            }
        }
        return ok(out);
    }
    if let Some(org) = w.orgs.get(&id) {
        let mut out = json!({"id": org.id});
        for f in &fields {
            match f.as_str() {
                "id" => {}
                "name" => out["name"] = json!(org.name),
                "slug" => out["slug"] = json!(org.slug),
                "description" => out["description"] = json!(org.description),
                other => return unknown_field(other),
            }
        }
        return ok(out);
    }
    graph_not_found(&id)
}

/// `GET /graph/image_ids?sequence_id=…` → ids in capture order.
pub async fn image_ids(State(sim): State<Arc<Sim>>, headers: HeaderMap, Query(p): Query<Params>) -> Response {
    let w = sim.world();
    if let Err(r) = check_graph(&w, token_of(&headers, &p).as_deref(), sim.now_ms(), Need::Entity) {
        return r;
    }
    let Some(seq_id) = p.get("sequence_id") else {
        return graph_bad_request("sequence_id is required");
    };
    let Some(seq) = w.sequences.get(seq_id) else {
        return graph_not_found(seq_id);
    };
    let data: Vec<Value> = seq.image_ids.iter().map(|id| json!({ "id": id })).collect();
    ok(json!({ "data": data }))
}

fn parse_time_ms(s: &str) -> Option<i64> {
    if let Ok(n) = s.parse::<i64>() {
        return Some(n);
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// `GET /graph/images`: batch (`image_ids=`) or search (filters), newest first, `limit` ≤ 2000.
pub async fn images(State(sim): State<Arc<Sim>>, headers: HeaderMap, Query(p): Query<Params>) -> Response {
    let w = sim.world();
    if let Err(r) = check_graph(&w, token_of(&headers, &p).as_deref(), sim.now_ms(), Need::Entity) {
        return r;
    }
    let fields = fields_of(&p);
    if let Some(f) = fields.iter().find(|f| !IMAGE_FIELDS.contains(&f.as_str())) {
        return unknown_field(f);
    }
    let render = |imgs: Vec<&Image>| -> Response {
        let mut data = Vec::with_capacity(imgs.len());
        for img in imgs {
            match render_image(&w, &sim, img, &fields) {
                Ok(v) => data.push(v),
                Err(f) => return unknown_field(&f),
            }
        }
        ok(json!({ "data": data }))
    };
    if let Some(ids) = p.get("image_ids") {
        let imgs = ids.split(',').filter_map(|id| w.images.get(id.trim())).collect();
        return render(imgs);
    }
    let bbox = match p.get("bbox") {
        None => None,
        Some(b) => {
            let v: Vec<f64> = b.split(',').filter_map(|x| x.trim().parse().ok()).collect();
            if v.len() != 4 || v[0] > v[2] || v[1] > v[3] {
                return graph_bad_request("bbox must be minLon,minLat,maxLon,maxLat");
            }
            Some([v[0], v[1], v[2], v[3]])
        }
    };
    if bbox.is_none() && (p.contains_key("make") || p.contains_key("model")) {
        return graph_bad_request("make and model filters are only supported together with bbox");
    }
    let time_filter = |name: &str| -> Result<Option<i64>, Response> {
        match p.get(name) {
            None => Ok(None),
            Some(s) => parse_time_ms(s)
                .map(Some)
                .ok_or_else(|| graph_bad_request(&format!("{name} is not ISO 8601"))),
        }
    };
    let start = match time_filter("start_captured_at") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let end = match time_filter("end_captured_at") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let limit = match p.get("limit").map(|l| l.parse::<usize>()) {
        None => 2000,
        Some(Ok(n)) => n.min(2000),
        Some(Err(_)) => return graph_bad_request("limit must be a number"),
    };
    let creator = match p.get("creator_username") {
        None => None,
        Some(name) => match w.users.values().find(|u| &u.username == name) {
            Some(u) => Some(u.id.clone()),
            None => return ok(json!({"data": []})),
        },
    };
    let is_pano = p.get("is_pano").map(|v| v == "true");
    let seqs: Option<Vec<&str>> = p.get("sequence_id").map(|s| {
        let mut v: Vec<&str> = s.split(',').map(str::trim).collect();
        v.sort_unstable();
        v.dedup();
        v
    });
    // With `sequence_id`, the candidates are those sequences' images (no scan of every image).
    let candidates: Box<dyn Iterator<Item = &Image> + '_> = match &seqs {
        Some(ids) => Box::new(
            ids.iter()
                .filter_map(|id| w.sequences.get(*id))
                .flat_map(|q| q.image_ids.iter())
                .filter_map(|id| w.images.get(id)),
        ),
        None => Box::new(w.images.values()),
    };
    let mut hits: Vec<&Image> = candidates
        .filter(|i| {
            bbox.is_none_or(|b| {
                i.meta.lon >= b[0] && i.meta.lat >= b[1] && i.meta.lon <= b[2] && i.meta.lat <= b[3]
            })
        })
        .filter(|i| start.is_none_or(|s| i.meta.captured_at_ms >= s))
        .filter(|i| end.is_none_or(|e| i.meta.captured_at_ms <= e))
        .filter(|i| creator.as_ref().is_none_or(|c| &i.owner_id == c))
        .filter(|i| p.get("make").is_none_or(|m| i.meta.make.as_ref() == Some(m)))
        .filter(|i| p.get("model").is_none_or(|m| i.meta.model.as_ref() == Some(m)))
        .filter(|i| is_pano.is_none_or(|v| i.is_pano == v))
        .filter(|i| {
            p.get("organization_id")
                .is_none_or(|o| i.organization_id.as_ref() == Some(o))
        })
        .filter(|i| seqs.as_ref().is_none_or(|s| s.contains(&i.sequence_id.as_str())))
        .collect();
    hits.sort_by(|a, b| {
        b.meta
            .captured_at_ms
            .cmp(&a.meta.captured_at_ms)
            .then_with(|| b.id.cmp(&a.id))
    });
    hits.truncate(limit);
    render(hits)
}
