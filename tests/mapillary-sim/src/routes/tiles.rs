//! Coverage vector tiles (§7.1, §14.3): `GET /tiles/maps/vtp/{mly1_public|mly1_computed_public}/2/{z}/{x}/{y}`.
//!
//! Mapbox Vector Tile spec v2, extent 4096, standard XYZ (slippy-map, Web Mercator) tiling, served
//! uncompressed as `application/vnd.mapbox-vector-tile`. Layers by zoom:
//! - z14: `image` (one Point per image) and `sequence` (one LineString per sequence);
//! - z6–13: `sequence`;
//! - z0–5: `overview` (one Point per sequence, at its first image; sim choice).
//!
//! Only sequences of clusters whose `tiler_status` is FINISHED appear. Encoding uses the `mvt`
//! crate; the tile maths and line clipping (a few lines of Web Mercator and Liang–Barsky) live here.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use mvt::{Feature, GeomEncoder, GeomType, Layer, Tile};
use tracing::{debug, warn};

use super::Params;
use crate::auth::{check_graph, presented_token, Need};
use crate::reply::{graph_bad_request, graph_error};
use crate::server::Sim;
use crate::state::{Image, Sequence, State as World, TokenClass};

/// MVT extent (units per tile side).
pub const EXTENT: u32 = 4096;
/// Highest zoom with data; the `image` layer exists only here.
pub const MAX_ZOOM: u32 = 14;
/// Zooms up to this one carry the `overview` layer instead of `sequence`.
pub const OVERVIEW_MAX_ZOOM: u32 = 5;
/// Lines are clipped to the tile plus this many units on every side.
pub const LINE_BUFFER: f64 = 64.0;
/// Media type of a tile reply.
pub const CONTENT_TYPE: &str = "application/vnd.mapbox-vector-tile";
/// Web Mercator latitude limit.
const MAX_LAT: f64 = 85.051_128_779_806_59;
/// Metres per degree of latitude used for `computed_geometry` (same as the entity API).
const M_PER_DEG_LAT: f64 = 111_320.0;

/// Which positions a tileset shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// `mly1_public`: the uploaded positions (`geometry`).
    Original,
    /// `mly1_computed_public`: the positions after processing (`computed_geometry`).
    Computed,
}

impl Positions {
    fn from_tileset(name: &str) -> Option<Self> {
        match name {
            "mly1_public" => Some(Self::Original),
            "mly1_computed_public" => Some(Self::Computed),
            _ => None,
        }
    }
}

/// A tile address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileId {
    pub z: u32,
    pub x: u32,
    pub y: u32,
}

impl TileId {
    /// Parse and range-check `z/x/y` (z ≤ [`MAX_ZOOM`], x and y < 2^z).
    pub fn parse(z: &str, x: &str, y: &str) -> Result<Self, String> {
        let num = |name: &str, v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("tile {name} must be a non-negative integer, got {v:?}"))
        };
        let t = Self {
            z: num("z", z)?,
            x: num("x", x)?,
            y: num("y", y)?,
        };
        if t.z > MAX_ZOOM {
            return Err(format!("zoom {} is above the maximum zoom {MAX_ZOOM}", t.z));
        }
        let n = 1u32 << t.z;
        if t.x >= n || t.y >= n {
            return Err(format!("tile {}/{}/{} is outside the grid", t.z, t.x, t.y));
        }
        Ok(t)
    }

    /// Position of `lon`/`lat` in this tile's coordinates (0..EXTENT inside the tile; y grows south).
    pub fn project(&self, lon: f64, lat: f64) -> (f64, f64) {
        let n = f64::from(1u32 << self.z);
        let lat = lat.clamp(-MAX_LAT, MAX_LAT).to_radians();
        let wx = (lon + 180.0) / 360.0 * n;
        let wy = (1.0 - (lat.tan() + 1.0 / lat.cos()).ln() / std::f64::consts::PI) / 2.0 * n;
        let e = f64::from(EXTENT);
        ((wx - f64::from(self.x)) * e, (wy - f64::from(self.y)) * e)
    }
}

/// Why a tile could not be encoded (an `mvt` encoder error; never expected for valid input).
#[derive(Debug, thiserror::Error)]
#[error("tile encoding failed: {0}")]
pub struct EncodeError(#[from] mvt::Error);

/// `GET /tiles/maps/vtp/{tileset}/2/{z}/{x}/{y}`
pub async fn tile(
    State(sim): State<Arc<Sim>>,
    Path((tileset, z, x, y)): Path<(String, String, String, String)>,
    headers: HeaderMap,
    Query(p): Query<Params>,
) -> Response {
    let w = sim.world();
    let now = sim.now_ms();
    let token = presented_token(&headers, None).or_else(|| p.get("access_token").cloned());
    // Tiles accept user and client (app) tokens alike; everything else gets the graph 401.
    if !matches!(w.classify(token.as_deref(), now), TokenClass::Client { .. }) {
        if let Err(r) = check_graph(&w, token.as_deref(), now, Need::User) {
            return r;
        }
    }
    let Some(positions) = Positions::from_tileset(&tileset) else {
        return graph_error(
            StatusCode::NOT_FOUND,
            100,
            None,
            "MLYApiException",
            &format!("Unknown tileset {tileset:?}"),
        );
    };
    let id = match TileId::parse(&z, &x, &y) {
        Ok(t) => t,
        Err(msg) => return graph_bad_request(&msg),
    };
    match render(&w, now, positions, id) {
        Ok(Some(bytes)) => mvt_reply(bytes),
        Ok(None) if w.settings.empty_tile_ok => mvt_reply(Vec::new()),
        Ok(None) => {
            debug!(z = id.z, x = id.x, y = id.y, "empty tile → 403");
            graph_error(
                StatusCode::FORBIDDEN,
                100,
                None,
                "MLYApiException",
                "Tile does not exist",
            )
        }
        Err(e) => {
            warn!(error = %e, z = id.z, x = id.x, y = id.y, "tile encoding failed");
            graph_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                2,
                None,
                "MLYApiException",
                "Tile encoding failed (sim)",
            )
        }
    }
}

fn mvt_reply(bytes: Vec<u8>) -> Response {
    let mut r = (StatusCode::OK, bytes).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    r
}

/// Longitude/latitude of an image in the given tileset (computed = the entity API's `computed_geometry`).
pub fn position(w: &World, img: &Image, positions: Positions) -> (f64, f64) {
    match positions {
        Positions::Original => (img.meta.lon, img.meta.lat),
        Positions::Computed => (
            img.meta.lon,
            img.meta.lat + w.settings.computed_offset_m / M_PER_DEG_LAT,
        ),
    }
}

/// One visible sequence with its images (capture order) and their tile coordinates.
struct SeqView<'a> {
    seq: &'a Sequence,
    images: Vec<(&'a Image, (f64, f64))>,
}

/// Encode the tile, or `None` when it holds no feature.
pub fn render(
    w: &World,
    now_ms: i64,
    positions: Positions,
    id: TileId,
) -> Result<Option<Vec<u8>>, EncodeError> {
    let mut views = Vec::new();
    let lat_shift = match positions {
        Positions::Original => 0.0,
        Positions::Computed => w.settings.computed_offset_m / M_PER_DEG_LAT,
    };
    // A sequence whose bounding box misses the tile plus the line buffer has no point or segment in it.
    let near = |b: &[f64; 4]| {
        let (x0, y0) = id.project(b[0], b[1] + lat_shift);
        let (x1, y1) = id.project(b[2], b[3] + lat_shift);
        let (lo, hi) = (-LINE_BUFFER, f64::from(EXTENT) + LINE_BUFFER);
        x0.min(x1) <= hi && x0.max(x1) >= lo && y0.min(y1) <= hi && y0.max(y1) >= lo
    };
    for cluster in w
        .clusters
        .iter()
        .filter(|c| c.materialized && c.tiles_visible(now_ms))
    {
        for seq in cluster
            .sequence_ids
            .iter()
            .filter_map(|s| w.sequences.get(s))
            .filter(|s| !s.bbox[0].is_finite() || near(&s.bbox))
        {
            let mut images: Vec<(&Image, (f64, f64))> = seq
                .image_ids
                .iter()
                .filter_map(|i| w.images.get(i))
                .map(|img| {
                    let (lon, lat) = position(w, img, positions);
                    (img, id.project(lon, lat))
                })
                .collect();
            if images.is_empty() {
                continue;
            }
            // image_ids are in capture order already; keep it explicit (stable for ties).
            images.sort_by_key(|(img, _)| img.meta.captured_at_ms);
            views.push(SeqView { seq, images });
        }
    }

    let mut tile = Tile::new(EXTENT);
    if id.z <= OVERVIEW_MAX_ZOOM {
        let mut layer = tile.create_layer("overview");
        for v in &views {
            let (img, xy) = v.images[0];
            if inside(xy) {
                let mut f = point_feature(layer, xy)?;
                f.add_tag_int("captured_at", img.meta.captured_at_ms);
                add_id(&mut f, "id", &img.id);
                f.add_tag_string("sequence_id", &img.sequence_id);
                f.add_tag_bool("is_pano", img.is_pano);
                layer = f.into_layer();
            }
        }
        add_nonempty(&mut tile, layer)?;
    } else {
        let mut layer = tile.create_layer("sequence");
        for v in &views {
            let pts: Vec<(f64, f64)> = v.images.iter().map(|(_, xy)| *xy).collect();
            let runs = clip_polyline(&pts, -LINE_BUFFER, f64::from(EXTENT) + LINE_BUFFER);
            if runs.is_empty() {
                continue;
            }
            let mut enc = GeomEncoder::new(GeomType::Linestring);
            for run in runs {
                for (x, y) in run {
                    enc.add_point(x, y)?;
                }
                enc.complete_geom()?;
            }
            let (first, _) = v.images[0];
            let mut f = layer.into_feature(enc.encode()?);
            f.add_tag_int("captured_at", first.meta.captured_at_ms);
            f.add_tag_string("id", &v.seq.id);
            add_id(&mut f, "image_id", &first.id);
            if let Some(org) = &v.seq.organization_id {
                add_id(&mut f, "organization_id", org);
            }
            f.add_tag_bool("is_pano", v.seq.is_pano);
            layer = f.into_layer();
        }
        add_nonempty(&mut tile, layer)?;
        if id.z == MAX_ZOOM {
            let mut layer = tile.create_layer("image");
            for (img, xy) in views.iter().flat_map(|v| v.images.iter()) {
                if !inside(*xy) {
                    continue;
                }
                let mut f = point_feature(layer, *xy)?;
                f.add_tag_int("captured_at", img.meta.captured_at_ms);
                if let Some(angle) = img.meta.compass_angle {
                    f.add_tag_double("compass_angle", angle);
                }
                add_id(&mut f, "id", &img.id);
                f.add_tag_string("sequence_id", &img.sequence_id);
                if let Some(org) = &img.organization_id {
                    add_id(&mut f, "organization_id", org);
                }
                f.add_tag_bool("is_pano", img.is_pano);
                layer = f.into_layer();
            }
            add_nonempty(&mut tile, layer)?;
        }
    }
    if tile.num_layers() == 0 {
        return Ok(None);
    }
    Ok(Some(tile.to_bytes()?))
}

/// A point strictly inside the tile (each image lands in exactly one tile per zoom).
fn inside((x, y): (f64, f64)) -> bool {
    let e = f64::from(EXTENT);
    (0.0..e).contains(&x) && (0.0..e).contains(&y)
}

fn point_feature(layer: Layer, (x, y): (f64, f64)) -> Result<Feature, EncodeError> {
    let geom = GeomEncoder::new(GeomType::Point).point(x, y)?.encode()?;
    Ok(layer.into_feature(geom))
}

fn add_nonempty(tile: &mut Tile, layer: Layer) -> Result<(), EncodeError> {
    if layer.num_features() > 0 {
        tile.add_layer(layer)?;
    }
    Ok(())
}

/// Ids are numeric strings and go out as MVT ints; a non-numeric id (never issued by the
/// simulator) goes out as a string rather than being dropped.
fn add_id(f: &mut Feature, key: &str, id: &str) {
    match id.parse::<i64>() {
        Ok(n) => f.add_tag_int(key, n),
        Err(_) => {
            warn!(key, id, "non-numeric id in a tile, sent as a string");
            f.add_tag_string(key, id);
        }
    }
}

/// Clip a polyline to the square `[min, max]²`, round to tile units and drop repeated vertices.
///
/// Returns the parts inside (a line that leaves and re-enters gives several parts). A part that
/// collapses to one unit is widened to two vertices one unit apart, so short sequences stay
/// visible as valid LineStrings at low zooms (sim choice).
pub fn clip_polyline(pts: &[(f64, f64)], min: f64, max: f64) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut cur: Vec<(f64, f64)> = Vec::new();
    let in_box = |(x, y): (f64, f64)| x >= min && x <= max && y >= min && y <= max;
    if let [p] = pts {
        if in_box(*p) {
            cur.push(*p);
        }
    }
    for pair in pts.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        match clip_segment(a, b, min, max) {
            None => {
                if !cur.is_empty() {
                    runs.push(std::mem::take(&mut cur));
                }
            }
            Some((t0, t1)) => {
                let at = |t: f64| (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
                if t0 > 0.0 || cur.is_empty() {
                    if !cur.is_empty() {
                        runs.push(std::mem::take(&mut cur));
                    }
                    cur.push(at(t0));
                }
                cur.push(at(t1));
                if t1 < 1.0 {
                    runs.push(std::mem::take(&mut cur));
                }
            }
        }
    }
    if !cur.is_empty() {
        runs.push(cur);
    }
    runs.into_iter()
        .map(|run| {
            let mut out: Vec<(f64, f64)> = Vec::with_capacity(run.len());
            for (x, y) in run {
                let p = (x.round(), y.round());
                if out.last() != Some(&p) {
                    out.push(p);
                }
            }
            if let [p] = out[..] {
                out.push((p.0 + 1.0, p.1));
            }
            out
        })
        .collect()
}

/// Liang–Barsky: the parameter range `[t0, t1]` of segment `a→b` inside `[min, max]²`.
fn clip_segment(a: (f64, f64), b: (f64, f64), min: f64, max: f64) -> Option<(f64, f64)> {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let (mut t0, mut t1) = (0.0f64, 1.0f64);
    for (p, q) in [
        (-dx, a.0 - min),
        (dx, max - a.0),
        (-dy, a.1 - min),
        (dy, max - a.1),
    ] {
        if p == 0.0 {
            if q < 0.0 {
                return None;
            }
        } else {
            let r = q / p;
            if p < 0.0 {
                t0 = t0.max(r);
            } else {
                t1 = t1.min(r);
            }
        }
    }
    (t0 <= t1).then_some((t0, t1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_matches_known_tiles() {
        // Null Island sits on the corner of the four z1 tiles.
        let t = TileId { z: 1, x: 1, y: 1 };
        let (x, y) = t.project(0.0, 0.0);
        assert!(x.abs() < 1e-6 && y.abs() < 1e-6);
        // Berlin (13.4050, 52.5200) is in z14 tile 8802/5373.
        let t = TileId {
            z: 14,
            x: 8802,
            y: 5373,
        };
        let (x, y) = t.project(13.4050, 52.5200);
        assert!(inside((x, y)), "{x},{y}");
        assert!(TileId::parse("15", "0", "0").is_err());
        assert!(TileId::parse("2", "4", "0").is_err());
        assert!(TileId::parse("2", "-1", "0").is_err());
        assert_eq!(TileId::parse("2", "3", "1"), Ok(TileId { z: 2, x: 3, y: 1 }));
    }

    #[test]
    fn clipping_splits_and_keeps_inside_parts() {
        // Enters, leaves and re-enters a 0..100 box.
        let runs = clip_polyline(
            &[
                (-50.0, 50.0),
                (50.0, 50.0),
                (150.0, 50.0),
                (150.0, 10.0),
                (50.0, 10.0),
            ],
            0.0,
            100.0,
        );
        assert_eq!(
            runs,
            vec![
                vec![(0.0, 50.0), (50.0, 50.0), (100.0, 50.0)],
                vec![(100.0, 10.0), (50.0, 10.0)]
            ]
        );
        assert!(clip_polyline(&[(200.0, 200.0), (300.0, 300.0)], 0.0, 100.0).is_empty());
        // A sequence that collapses to one unit becomes a two-vertex line.
        assert_eq!(
            clip_polyline(&[(10.2, 10.1), (10.3, 9.9)], 0.0, 100.0),
            vec![vec![(10.0, 10.0), (11.0, 10.0)]]
        );
        assert_eq!(
            clip_polyline(&[(5.0, 5.0)], 0.0, 100.0),
            vec![vec![(5.0, 5.0), (6.0, 5.0)]]
        );
    }

    #[test]
    fn encoded_multiline_decodes_with_an_independent_reader() {
        let runs = clip_polyline(
            &[
                (-50.0, 50.0),
                (50.0, 50.0),
                (150.0, 50.0),
                (150.0, 10.0),
                (50.0, 10.0),
            ],
            0.0,
            100.0,
        );
        let mut enc = GeomEncoder::new(GeomType::Linestring);
        for run in runs {
            for (x, y) in run {
                enc.add_point(x, y).expect("point");
            }
            enc.complete_geom().expect("complete");
        }
        let mut tile = Tile::new(EXTENT);
        let layer = tile
            .create_layer("sequence")
            .into_feature(enc.encode().expect("encode"));
        tile.add_layer(layer.into_layer()).expect("layer");
        let reader = mvt_reader::Reader::new(tile.to_bytes().expect("bytes")).expect("decodes");
        let f = reader.get_features_as::<i32>(0).expect("features");
        let geo_types::Geometry::MultiLineString(m) = &f[0].geometry else {
            panic!("expected a MultiLineString, got {:?}", f[0].geometry);
        };
        let parts: Vec<Vec<(i32, i32)>> =
            m.0.iter()
                .map(|l| l.0.iter().map(|c| (c.x, c.y)).collect())
                .collect();
        assert_eq!(
            parts,
            vec![vec![(0, 50), (50, 50), (100, 50)], vec![(100, 10), (50, 10)]]
        );
    }
}
