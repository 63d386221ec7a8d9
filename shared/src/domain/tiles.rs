//! Slippy-map tile maths and decoding of Mapillary coverage tiles (protocol doc §7.1).
//!
//! * [`TileId`], [`BBox`], [`tiles_covering_points`]: standard XYZ (Web Mercator) tiles; Plan A asks
//!   for the z14 tile(s) around an upload's images.
//! * [`decode_coverage_tile`]: Mapbox Vector Tile v2 bytes → typed [`ImagePoint`]s and
//!   [`SequenceLine`]s. Decoding is done by the `mvt-reader` crate; this module only checks the
//!   tile's size first and reads the properties leniently (ids as ints or strings, extra keys
//!   ignored). A feature it cannot read is listed in [`CoverageTile::rejected`] with the reason.
//!
//! This file uses no `crate::` items on purpose: the fuzz crate (`fuzz/`) compiles it on its own.

use std::collections::{BTreeSet, HashMap};

use geo_types::Geometry;
use mvt_reader::feature::Value as MvtValue;
use serde::{Deserialize, Serialize};

/// Zoom of the coverage tiles that carry the `image` layer.
pub const COVERAGE_ZOOM: u8 = 14;
/// Highest zoom accepted (so that `2^z` tiles per axis fit a `u32`).
pub const MAX_ZOOM: u8 = 30;
/// Tileset of original (uploaded) positions.
pub const PUBLIC_TILESET: &str = "mly1_public";
/// Largest tile body [`decode_coverage_tile`] accepts (real z14 tiles are a few MiB at most).
pub const MAX_TILE_BYTES: usize = 32 * 1024 * 1024;
/// Web Mercator's latitude limit.
const MAX_LAT: f64 = 85.051_128_779_806_59;
/// Mean Earth radius (IUGG), metres.
const EARTH_RADIUS_M: f64 = 6_371_008.8;
/// Decoding budget: sum over features of (geometry parts + 1) × geometry length. `mvt-reader`
/// reserves `geometry length` coordinates for every part, so a garbage feature with many tiny
/// parts would otherwise make it reserve gigabytes. Real tiles stay far below this.
const GEOMETRY_BUDGET: u64 = 16 * 1024 * 1024;

/// A longitude/latitude pair, degrees (WGS 84).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LonLat {
    /// Longitude, degrees east.
    pub lon: f64,
    /// Latitude, degrees north.
    pub lat: f64,
}

impl LonLat {
    /// A pair; see [`LonLat::validate`].
    pub fn new(lon: f64, lat: f64) -> Self {
        Self { lon, lat }
    }

    /// Finite and within ±180 / ±90.
    pub fn validate(self) -> Result<Self, TileError> {
        if self.lon.is_finite()
            && self.lat.is_finite()
            && (-180.0..=180.0).contains(&self.lon)
            && (-90.0..=90.0).contains(&self.lat)
        {
            Ok(self)
        } else {
            Err(TileError::BadCoordinate {
                lon: self.lon,
                lat: self.lat,
            })
        }
    }
}

/// Great-circle (haversine) distance in metres.
pub fn distance_m(a: LonLat, b: LonLat) -> f64 {
    let (la1, la2) = (a.lat.to_radians(), b.lat.to_radians());
    let dlat = la2 - la1;
    let dlon = (b.lon - a.lon).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

/// Errors of the tile maths.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TileError {
    #[error("zoom {0} is out of range 0..={MAX_ZOOM}")]
    Zoom(u8),
    #[error("tile {z}/{x}/{y} does not exist")]
    NoSuchTile { z: u8, x: u32, y: u32 },
    #[error("not a valid longitude/latitude: lon {lon}, lat {lat}")]
    BadCoordinate { lon: f64, lat: f64 },
    #[error("margin must be a finite, non-negative number of metres, got {0}")]
    BadMargin(f64),
    #[error("the area needs {needed} tiles at z{z}, more than the limit of {limit}")]
    TooManyTiles { z: u8, needed: u64, limit: usize },
}

/// One XYZ tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TileId {
    pub z: u8,
    pub x: u32,
    pub y: u32,
}

impl std::fmt::Display for TileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.z, self.x, self.y)
    }
}

fn tiles_per_axis(z: u8) -> Result<u64, TileError> {
    if z > MAX_ZOOM {
        return Err(TileError::Zoom(z));
    }
    Ok(1u64 << z)
}

/// Fractional world position in tile units at zoom `z` (x grows east, y grows south).
/// Latitudes beyond Web Mercator's limit are clamped to it.
fn world_xy(p: LonLat, n: f64) -> (f64, f64) {
    let lat = p.lat.clamp(-MAX_LAT, MAX_LAT).to_radians();
    let x = (p.lon + 180.0) / 360.0 * n;
    let y = (1.0 - (lat.tan() + 1.0 / lat.cos()).ln() / std::f64::consts::PI) / 2.0 * n;
    (x, y)
}

/// Clamp a fractional tile coordinate into `0..n` and make it an index.
fn clamp_index(v: f64, n: u64) -> u64 {
    if v <= 0.0 {
        0
    } else {
        // `as` saturates for large floats; `n - 1` bounds it anyway.
        (v.floor() as u64).min(n - 1)
    }
}

impl TileId {
    /// A tile, checked to exist at its zoom.
    pub fn new(z: u8, x: u32, y: u32) -> Result<Self, TileError> {
        let n = tiles_per_axis(z)?;
        if u64::from(x) >= n || u64::from(y) >= n {
            return Err(TileError::NoSuchTile { z, x, y });
        }
        Ok(Self { z, x, y })
    }

    /// The tile at zoom `z` that contains `p` (longitude 180 belongs to the last column).
    pub fn containing(p: LonLat, z: u8) -> Result<Self, TileError> {
        let p = p.validate()?;
        let n = tiles_per_axis(z)?;
        let (x, y) = world_xy(p, n as f64);
        // n ≤ 2^30, so both indices fit a u32.
        Ok(Self {
            z,
            x: clamp_index(x, n) as u32,
            y: clamp_index(y, n) as u32,
        })
    }

    /// The position of tile-local coordinates `(px, py)` (0..`extent`, y down) as lon/lat.
    /// Coordinates outside the tile (MVT buffers) extrapolate naturally. `extent` must be > 0.
    pub fn lon_lat_at(&self, px: f64, py: f64, extent: u32) -> LonLat {
        let n = (1u64 << self.z.min(MAX_ZOOM)) as f64;
        let e = f64::from(extent.max(1));
        let wx = f64::from(self.x) + px / e;
        let wy = f64::from(self.y) + py / e;
        let lon = wx / n * 360.0 - 180.0;
        let lat = (std::f64::consts::PI * (1.0 - 2.0 * wy / n))
            .sinh()
            .atan()
            .to_degrees();
        LonLat { lon, lat }
    }

    /// The tile's edges.
    pub fn bounds(&self) -> BBox {
        let nw = self.lon_lat_at(0.0, 0.0, 1);
        let se = self.lon_lat_at(1.0, 1.0, 1);
        BBox {
            west: nw.lon,
            south: se.lat,
            east: se.lon,
            north: nw.lat,
        }
    }

    /// Path of this tile under the tiles endpoint, e.g. `/maps/vtp/mly1_public/2/14/8185/5448`.
    pub fn coverage_path(&self) -> String {
        format!("/maps/vtp/{PUBLIC_TILESET}/2/{}/{}/{}", self.z, self.x, self.y)
    }
}

/// A lon/lat box, degrees. `west > east` means the box crosses the antimeridian.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BBox {
    pub west: f64,
    pub south: f64,
    pub east: f64,
    pub north: f64,
}

impl BBox {
    /// The smallest box holding every point (`None` for no points). Points are validated.
    pub fn of_points(points: &[LonLat]) -> Result<Option<Self>, TileError> {
        let mut bbox: Option<BBox> = None;
        for p in points {
            let p = p.validate()?;
            bbox = Some(match bbox {
                None => BBox {
                    west: p.lon,
                    south: p.lat,
                    east: p.lon,
                    north: p.lat,
                },
                Some(b) => BBox {
                    west: b.west.min(p.lon),
                    south: b.south.min(p.lat),
                    east: b.east.max(p.lon),
                    north: b.north.max(p.lat),
                },
            });
        }
        Ok(bbox)
    }

    /// The box grown by `margin_m` metres on every side (latitudes clamped to ±90; longitudes
    /// may leave ±180, which [`tiles_covering_bbox`] wraps).
    pub fn expanded_m(&self, margin_m: f64) -> Result<Self, TileError> {
        if !margin_m.is_finite() || margin_m < 0.0 {
            return Err(TileError::BadMargin(margin_m));
        }
        let dlat = (margin_m / EARTH_RADIUS_M).to_degrees();
        let worst_lat = self.south.abs().max(self.north.abs()).min(89.0);
        let dlon = (dlat / worst_lat.to_radians().cos()).min(180.0);
        Ok(BBox {
            west: self.west - dlon,
            south: (self.south - dlat).max(-90.0),
            east: self.east + dlon,
            north: (self.north + dlat).min(90.0),
        })
    }
}

/// Every tile at zoom `z` that intersects `bbox`, sorted; at most `limit` tiles.
pub fn tiles_covering_bbox(bbox: &BBox, z: u8, limit: usize) -> Result<Vec<TileId>, TileError> {
    let mut out = BTreeSet::new();
    add_bbox_tiles(bbox, z, limit, &mut out)?;
    Ok(out.into_iter().collect())
}

/// The tiles at zoom `z` within `margin_m` metres of any point, sorted and deduplicated: usually
/// one tile per stretch of images, two to four where images lie near a tile edge. At most
/// `limit` tiles.
pub fn tiles_covering_points(
    points: &[LonLat],
    z: u8,
    margin_m: f64,
    limit: usize,
) -> Result<Vec<TileId>, TileError> {
    let mut out = BTreeSet::new();
    for p in points {
        let p = p.validate()?;
        let b = BBox {
            west: p.lon,
            south: p.lat,
            east: p.lon,
            north: p.lat,
        }
        .expanded_m(margin_m)?;
        add_bbox_tiles(&b, z, limit, &mut out)?;
    }
    Ok(out.into_iter().collect())
}

fn add_bbox_tiles(bbox: &BBox, z: u8, limit: usize, out: &mut BTreeSet<TileId>) -> Result<(), TileError> {
    let n = tiles_per_axis(z)?;
    for v in [bbox.west, bbox.south, bbox.east, bbox.north] {
        if !v.is_finite() {
            return Err(TileError::BadCoordinate {
                lon: bbox.west,
                lat: bbox.south,
            });
        }
    }
    let nf = n as f64;
    // Longitudes are not clamped: columns wrap around the antimeridian.
    let col = |lon: f64| ((lon + 180.0) / 360.0 * nf).floor();
    let x0 = col(bbox.west);
    let mut x1 = col(bbox.east);
    if bbox.west > bbox.east {
        x1 += nf;
    }
    let columns = if x1 - x0 + 1.0 >= nf {
        n
    } else {
        (x1 - x0) as u64 + 1
    };
    let (_, ny0) = world_xy(LonLat::new(0.0, bbox.north), nf);
    let (_, ny1) = world_xy(LonLat::new(0.0, bbox.south), nf);
    let (y0, y1) = (clamp_index(ny0, n), clamp_index(ny1, n));
    let rows = y1.saturating_sub(y0) + 1;
    let needed = columns.saturating_mul(rows);
    if needed.saturating_add(out.len() as u64) > limit as u64 {
        return Err(TileError::TooManyTiles {
            z,
            needed: needed.saturating_add(out.len() as u64),
            limit,
        });
    }
    // Reduced into 0..n first: `x0` is only known to be finite (any longitude), and adding
    // columns to a saturated cast would overflow.
    let x_start = x0.rem_euclid(nf) as u64;
    for dx in 0..columns {
        let x = ((x_start + dx) % n) as u32;
        for y in y0..=y1 {
            out.insert(TileId { z, x, y: y as u32 });
        }
    }
    Ok(())
}

/// A point of the `image` (z14) or `overview` (z0–5) layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImagePoint {
    /// Image id (ints are turned into their decimal string).
    pub id: String,
    /// Sequence id.
    pub sequence_id: String,
    /// Capture time, ms since the epoch.
    pub captured_at_ms: Option<i64>,
    /// Original heading, degrees (absent in `overview`).
    pub compass_angle: Option<f64>,
    pub is_pano: Option<bool>,
    pub organization_id: Option<String>,
    /// Not in the 2022 fixture; `getNewSequences` carries it, so tiles might.
    pub creator_id: Option<String>,
    /// Position, from the tile coordinates (precision about extent⁻¹ of a tile: ~0.6 m at z14).
    pub position: LonLat,
}

/// A line of the `sequence` layer (z6–14): the images of one sequence, clipped to the tile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceLine {
    /// Sequence id.
    pub id: String,
    /// The sequence's "best"/first image.
    pub image_id: Option<String>,
    /// Capture time, ms since the epoch.
    pub captured_at_ms: Option<i64>,
    pub is_pano: Option<bool>,
    pub organization_id: Option<String>,
    pub creator_id: Option<String>,
    /// One or more parts (clipping can split a line).
    pub parts: Vec<Vec<LonLat>>,
}

/// A feature that could not be read, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedFeature {
    pub layer: String,
    /// Index of the feature in its layer.
    pub index: usize,
    pub reason: String,
}

/// The typed content of one coverage tile.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CoverageTile {
    /// `image` layer.
    pub images: Vec<ImagePoint>,
    /// `overview` layer.
    pub overview: Vec<ImagePoint>,
    /// `sequence` layer.
    pub sequences: Vec<SequenceLine>,
    /// Features of known layers that could not be read.
    pub rejected: Vec<RejectedFeature>,
    /// Names of layers this decoder does not read (kept for diagnostics).
    pub other_layers: Vec<String>,
}

/// Why a coverage tile could not be decoded at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("coverage tile is {len} bytes, more than the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("coverage tile is not a vector tile: {0}")]
    Malformed(String),
    #[error("coverage tile geometry is too complex to decode (budget {GEOMETRY_BUDGET} exceeded at layer {layer}, feature {feature})")]
    TooComplex { layer: usize, feature: usize },
    #[error("coverage tile layer `{0}` has extent 0")]
    ZeroExtent(String),
}

/// Decode a coverage tile fetched for `tile`. Empty bytes are a valid empty tile.
pub fn decode_coverage_tile(tile: TileId, bytes: &[u8]) -> Result<CoverageTile, DecodeError> {
    if bytes.len() > MAX_TILE_BYTES {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            limit: MAX_TILE_BYTES,
        });
    }
    check_geometry_budget(bytes)?;
    let reader =
        mvt_reader::Reader::new(bytes.to_vec()).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let layers = reader
        .get_layer_metadata()
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let mut out = CoverageTile::default();
    for layer in layers {
        let kind = match layer.name.as_str() {
            "image" => LayerKind::Image,
            "overview" => LayerKind::Overview,
            "sequence" => LayerKind::Sequence,
            _ => {
                out.other_layers.push(layer.name);
                continue;
            }
        };
        if layer.extent == 0 {
            return Err(DecodeError::ZeroExtent(layer.name));
        }
        let features = reader
            .get_features_as::<i32>(layer.layer_index)
            .map_err(|e| DecodeError::Malformed(format!("layer `{}`: {e}", layer.name)))?;
        for (index, f) in features.iter().enumerate() {
            let props = f.properties.as_ref();
            let read = match kind {
                LayerKind::Image | LayerKind::Overview => read_image(tile, layer.extent, &f.geometry, props)
                    .map(|p| {
                        if kind == LayerKind::Image {
                            out.images.push(p)
                        } else {
                            out.overview.push(p)
                        }
                    }),
                LayerKind::Sequence => {
                    read_sequence(tile, layer.extent, &f.geometry, props).map(|s| out.sequences.push(s))
                }
            };
            if let Err(reason) = read {
                out.rejected.push(RejectedFeature {
                    layer: layer.name.clone(),
                    index,
                    reason,
                });
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayerKind {
    Image,
    Overview,
    Sequence,
}

type Props = HashMap<String, MvtValue>;

fn read_image(
    tile: TileId,
    extent: u32,
    geometry: &Geometry<i32>,
    props: Option<&Props>,
) -> Result<ImagePoint, String> {
    let position = match geometry {
        Geometry::Point(p) => (p.x(), p.y()),
        Geometry::MultiPoint(mp) if mp.0.len() == 1 => (mp.0[0].x(), mp.0[0].y()),
        Geometry::MultiPoint(mp) => return Err(format!("image point has {} positions, not 1", mp.0.len())),
        other => return Err(format!("image feature is a {}, not a point", geom_name(other))),
    };
    let position = tile.lon_lat_at(f64::from(position.0), f64::from(position.1), extent);
    Ok(ImagePoint {
        id: required(props, "id", id_value)?,
        sequence_id: required(props, "sequence_id", id_value)?,
        captured_at_ms: optional(props, "captured_at", int_value)?,
        compass_angle: optional(props, "compass_angle", float_value)?,
        is_pano: optional(props, "is_pano", bool_value)?,
        organization_id: optional(props, "organization_id", id_value)?,
        creator_id: optional(props, "creator_id", id_value)?,
        position,
    })
}

fn read_sequence(
    tile: TileId,
    extent: u32,
    geometry: &Geometry<i32>,
    props: Option<&Props>,
) -> Result<SequenceLine, String> {
    let lines: Vec<&geo_types::LineString<i32>> = match geometry {
        Geometry::LineString(l) => vec![l],
        Geometry::MultiLineString(m) => m.0.iter().collect(),
        other => return Err(format!("sequence feature is a {}, not a line", geom_name(other))),
    };
    let parts: Vec<Vec<LonLat>> = lines
        .into_iter()
        .filter(|l| !l.0.is_empty())
        .map(|l| {
            l.0.iter()
                .map(|c| tile.lon_lat_at(f64::from(c.x), f64::from(c.y), extent))
                .collect()
        })
        .collect();
    if parts.is_empty() {
        return Err("sequence line has no positions".into());
    }
    Ok(SequenceLine {
        id: required(props, "id", id_value)?,
        image_id: optional(props, "image_id", id_value)?,
        captured_at_ms: optional(props, "captured_at", int_value)?,
        is_pano: optional(props, "is_pano", bool_value)?,
        organization_id: optional(props, "organization_id", id_value)?,
        creator_id: optional(props, "creator_id", id_value)?,
        parts,
    })
}

fn geom_name<T: geo_types::CoordNum>(g: &Geometry<T>) -> &'static str {
    match g {
        Geometry::Point(_) | Geometry::MultiPoint(_) => "point",
        Geometry::Line(_) | Geometry::LineString(_) | Geometry::MultiLineString(_) => "line",
        Geometry::Polygon(_) | Geometry::MultiPolygon(_) | Geometry::Rect(_) => "polygon",
        Geometry::Triangle(_) => "triangle",
        Geometry::GeometryCollection(_) => "geometry collection",
    }
}

fn lookup<'a>(props: Option<&'a Props>, key: &str) -> Option<&'a MvtValue> {
    props
        .and_then(|p| p.get(key))
        .filter(|v| !matches!(v, MvtValue::Null))
}

fn required<T>(
    props: Option<&Props>,
    key: &str,
    read: fn(&MvtValue) -> Result<T, String>,
) -> Result<T, String> {
    let v = lookup(props, key).ok_or_else(|| format!("property `{key}` is missing"))?;
    read(v).map_err(|e| format!("property `{key}`: {e}"))
}

fn optional<T>(
    props: Option<&Props>,
    key: &str,
    read: fn(&MvtValue) -> Result<T, String>,
) -> Result<Option<T>, String> {
    lookup(props, key)
        .map(|v| read(v).map_err(|e| format!("property `{key}`: {e}")))
        .transpose()
}

/// Largest integer a double holds exactly.
const MAX_EXACT_DOUBLE: f64 = 9_007_199_254_740_992.0;

/// Ids: strings as sent, integers as decimal strings, whole doubles within 2^53 likewise.
fn id_value(v: &MvtValue) -> Result<String, String> {
    match v {
        MvtValue::String(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        MvtValue::String(_) => Err("empty id".into()),
        MvtValue::Int(i) | MvtValue::SInt(i) if *i >= 0 => Ok(i.to_string()),
        MvtValue::UInt(u) => Ok(u.to_string()),
        MvtValue::Double(d) if d.fract() == 0.0 && (0.0..=MAX_EXACT_DOUBLE).contains(d) => {
            Ok((*d as u64).to_string())
        }
        other => Err(format!("not an id: {other:?}")),
    }
}

fn int_value(v: &MvtValue) -> Result<i64, String> {
    let whole = |d: f64| {
        if d.fract() == 0.0 && d.abs() <= MAX_EXACT_DOUBLE {
            Ok(d as i64)
        } else {
            Err(format!("not an integer: {d}"))
        }
    };
    match v {
        MvtValue::Int(i) | MvtValue::SInt(i) => Ok(*i),
        MvtValue::UInt(u) => i64::try_from(*u).map_err(|_| format!("integer too large: {u}")),
        MvtValue::Double(d) => whole(*d),
        MvtValue::Float(f) => whole(f64::from(*f)),
        MvtValue::String(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("not an integer: {s:?}")),
        other => Err(format!("not an integer: {other:?}")),
    }
}

fn float_value(v: &MvtValue) -> Result<f64, String> {
    let f = match v {
        MvtValue::Double(d) => *d,
        MvtValue::Float(f) => f64::from(*f),
        MvtValue::Int(i) | MvtValue::SInt(i) => *i as f64,
        MvtValue::UInt(u) => *u as f64,
        MvtValue::String(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("not a number: {s:?}"))?,
        other => return Err(format!("not a number: {other:?}")),
    };
    if f.is_finite() {
        Ok(f)
    } else {
        Err(format!("not a finite number: {f}"))
    }
}

fn bool_value(v: &MvtValue) -> Result<bool, String> {
    match v {
        MvtValue::Bool(b) => Ok(*b),
        MvtValue::Int(0) | MvtValue::SInt(0) | MvtValue::UInt(0) => Ok(false),
        MvtValue::Int(1) | MvtValue::SInt(1) | MvtValue::UInt(1) => Ok(true),
        MvtValue::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
        MvtValue::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
        other => Err(format!("not a boolean: {other:?}")),
    }
}

/// Just enough of the vector-tile schema to count geometry commands before `mvt-reader` decodes
/// the tile (its own protobuf types are private). Unknown fields are skipped by prost.
mod wire {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Tile {
        #[prost(message, repeated, tag = "3")]
        pub layers: Vec<Layer>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Layer {
        #[prost(message, repeated, tag = "2")]
        pub features: Vec<Feature>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Feature {
        #[prost(uint32, repeated, tag = "4")]
        pub geometry: Vec<u32>,
    }
}

/// Reject tiles whose geometry would make `mvt-reader` reserve unbounded memory (see
/// [`GEOMETRY_BUDGET`]), walking the command stream the way it does.
fn check_geometry_budget(bytes: &[u8]) -> Result<(), DecodeError> {
    use prost::Message;
    let tile = wire::Tile::decode(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let mut used: u64 = 0;
    for (li, layer) in tile.layers.iter().enumerate() {
        for (fi, feature) in layer.features.iter().enumerate() {
            let mut parts: u64 = 1;
            let mut params: u64 = 0;
            for &v in &feature.geometry {
                if params == 0 {
                    match v & 0x7 {
                        1 => {
                            parts += 1;
                            params = u64::from(v >> 3) * 2;
                        }
                        2 => params = u64::from(v >> 3) * 2,
                        7 => parts += 1,
                        _ => {}
                    }
                } else {
                    params -= 1;
                }
            }
            used = used.saturating_add(parts.saturating_mul(feature.geometry.len() as u64 + 1));
            if used > GEOMETRY_BUDGET {
                return Err(DecodeError::TooComplex {
                    layer: li,
                    feature: fi,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_point_is_known_should_find_its_tile() {
        // Berlin Brandenburger Tor at z14 is 8800/5373 (standard slippy-map formula).
        let t = TileId::containing(LonLat::new(13.377_704, 52.516_275), 14).expect("tile");
        assert_eq!((t.z, t.x, t.y), (14, 8800, 5373));
        let b = t.bounds();
        assert!(b.west <= 13.377_704 && 13.377_704 < b.east);
        assert!(b.south <= 52.516_275 && 52.516_275 < b.north);
        // Edges of the world.
        let last = TileId::containing(LonLat::new(180.0, -90.0), 3).expect("tile");
        assert_eq!((last.x, last.y), (7, 7));
        let first = TileId::containing(LonLat::new(-180.0, 90.0), 3).expect("tile");
        assert_eq!((first.x, first.y), (0, 0));
    }

    #[test]
    fn when_input_is_bad_should_say_so() {
        assert!(matches!(
            TileId::containing(LonLat::new(f64::NAN, 0.0), 14),
            Err(TileError::BadCoordinate { .. })
        ));
        assert!(matches!(
            TileId::containing(LonLat::new(0.0, 91.0), 14),
            Err(TileError::BadCoordinate { .. })
        ));
        assert_eq!(
            TileId::containing(LonLat::new(0.0, 0.0), 31),
            Err(TileError::Zoom(31))
        );
        assert!(matches!(TileId::new(2, 4, 0), Err(TileError::NoSuchTile { .. })));
    }

    #[test]
    fn tile_local_coordinates_round_trip() {
        let t = TileId::new(14, 8800, 5373).expect("tile");
        let p = t.lon_lat_at(1234.0, 3000.0, 4096);
        assert_eq!(TileId::containing(p, 14).expect("tile"), t);
        let b = t.bounds();
        assert!((p.lon - (b.west + (b.east - b.west) * 1234.0 / 4096.0)).abs() < 1e-9);
    }

    #[test]
    fn when_box_crosses_antimeridian_should_wrap_columns() {
        let b = BBox {
            west: 179.99,
            south: 0.0,
            east: -179.99,
            north: 0.01,
        };
        let tiles = tiles_covering_bbox(&b, 4, 100).expect("tiles");
        let xs: BTreeSet<u32> = tiles.iter().map(|t| t.x).collect();
        assert_eq!(xs, BTreeSet::from([0, 15]));
    }

    #[test]
    fn when_longitudes_are_huge_should_wrap_not_overflow() {
        // Column 1.1e19 is past i64::MAX: the old `x0 as i64 + dx` overflowed for the 4096
        // columns this box spans.
        let b = BBox {
            west: 1e18,
            south: 0.0,
            east: 1e18 + 1e5,
            north: 0.0,
        };
        let tiles = tiles_covering_bbox(&b, 12, 10_000).expect("tiles");
        assert_eq!(tiles.len(), 4096);
        let xs: BTreeSet<u32> = tiles.iter().map(|t| t.x).collect();
        assert_eq!(xs.len(), 4096);
        assert!(tiles.iter().all(|t| TileId::new(t.z, t.x, t.y).is_ok()));
    }

    #[test]
    fn when_area_is_huge_should_refuse() {
        let b = BBox {
            west: -10.0,
            south: -10.0,
            east: 10.0,
            north: 10.0,
        };
        assert!(matches!(
            tiles_covering_bbox(&b, 14, 64),
            Err(TileError::TooManyTiles { .. })
        ));
    }

    #[test]
    fn distance_matches_known_values() {
        // One degree of latitude ≈ 111.2 km.
        let d = distance_m(LonLat::new(0.0, 0.0), LonLat::new(0.0, 1.0));
        assert!((d - 111_195.0).abs() < 10.0, "{d}");
        assert_eq!(distance_m(LonLat::new(5.0, 5.0), LonLat::new(5.0, 5.0)), 0.0);
    }

    #[test]
    fn when_bytes_are_garbage_should_error_not_panic() {
        let t = TileId::new(14, 0, 0).expect("tile");
        assert!(decode_coverage_tile(t, &[0xff, 0xff, 0xff, 0xff]).is_err());
        assert_eq!(
            decode_coverage_tile(t, &[]).expect("empty tile"),
            CoverageTile::default()
        );
    }
}
