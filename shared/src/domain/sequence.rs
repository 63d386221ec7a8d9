//! mapillary_tools 0.14.7's sequence rules (`process_sequence_properties.py`) for the images
//! of one manifest: which images become which upload, which are dropped and why, and each
//! image's final capture time, heading and MAP* description.
//!
//! Order of operations, as in `process_sequence_properties`:
//! 1. group by (folder of the key, camera serials, make, model, width, height) — groups are
//!    ordered by their earliest image (mapillary_tools: by the order files were found);
//! 2. sort each group by (capture time, base name), the full key breaking remaining ties;
//! 3. de-tie equal millisecond timestamps (`_interpolate_subsecs_for_sorting`);
//! 4. split by image count, time gap, total file size and total pixels;
//! 5. drop (0, 0) images; 6. drop duplicates of the last kept image;
//! 7. interpolate missing headings; 8. drop whole sequences faster than the speed limit;
//! 9. (zig-zag check — **not implemented**: mapillary_tools' `_check_sequences_zigzag` drops
//!    points that jump ≥ 30 m away and back within a window of 5; a producer's own tracks rarely
//!    do that and a false drop costs more than a kept outlier, so we keep those images);
//! 10. split at distance gaps.
//!
//! Times are handled as `f64` Unix seconds exactly like the Python floats, so de-tied times and
//! the resulting `MAPCaptureTime` strings match mapillary_tools to the millisecond.
//! Distances are chord distances between WGS84 ECEF points (`geo.gps_distance`).
//!
//! Difference: `max_images_per_upload` defaults to 500 (the seed's per-sequence cap) where
//! mapillary_tools uses `MAX_SEQUENCE_LENGTH` = 1000.

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use super::description;
use super::exif::ImageMetadata;

/// Thresholds of the sequence rules; defaults are mapillary_tools' (`constants.py`) except
/// `max_images_per_upload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceConfig {
    /// A gap of more than this many seconds starts a new sequence (`CUTOFF_TIME`, 60).
    pub cutoff_time_s: f64,
    /// A gap of more than this many metres starts a new sequence (`CUTOFF_DISTANCE`, 100).
    pub cutoff_distance_m: f64,
    /// The (n+1)-th image starts a new sequence (500; mapillary_tools: 1000).
    pub max_images_per_upload: usize,
    /// Running sum of file sizes above which a new sequence starts (`MAX_SEQUENCE_FILESIZE`,
    /// 110 GiB); `None` disables the check.
    pub max_sequence_filesize: Option<u64>,
    /// Running sum of width × height (unknown: 1024 × 1024) above which a new sequence starts
    /// (`MAX_SEQUENCE_PIXELS`, 6e9); `None` disables the check.
    pub max_sequence_pixels: Option<u64>,
    /// An image within this many metres of the last kept image… (`DUPLICATE_DISTANCE`, 0.1)
    pub duplicate_distance_m: f64,
    /// …and heading within this many degrees (or either heading unknown) is a duplicate
    /// (`DUPLICATE_ANGLE`, 5).
    pub duplicate_angle_deg: f64,
    /// Sequences whose average speed exceeds this are dropped (`MAX_CAPTURE_SPEED_KMH`, 400).
    pub max_capture_speed_kmh: f64,
    /// Recompute every heading from the track (`--interpolate_directions`), default false.
    pub interpolate_directions: bool,
}

impl Default for SequenceConfig {
    fn default() -> Self {
        SequenceConfig {
            cutoff_time_s: 60.0,
            cutoff_distance_m: 100.0,
            max_images_per_upload: 500,
            max_sequence_filesize: Some(110 * 1024 * 1024 * 1024),
            max_sequence_pixels: Some(6_000_000_000),
            duplicate_distance_m: 0.1,
            duplicate_angle_deg: 5.0,
            max_capture_speed_kmh: 400.0,
            interpolate_directions: false,
        }
    }
}

/// One image to plan: its key (relative path; the base name becomes `MAPFilename`), metadata
/// and object size (for the file-size limit; `None` counts as 0).
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceInput {
    /// Object key or relative path.
    pub name: String,
    /// Metadata read from the EXIF.
    pub meta: ImageMetadata,
    /// Size of the object in bytes.
    pub file_size: Option<u64>,
}

impl From<(String, ImageMetadata)> for SequenceInput {
    fn from((name, meta): (String, ImageMetadata)) -> Self {
        SequenceInput {
            name,
            meta,
            file_size: None,
        }
    }
}

/// Where an image's final heading came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeadingSource {
    /// GPSImgDirection/GPSTrack from the EXIF.
    Exif,
    /// Bearing to the next image of the sequence.
    BearingToNext,
    /// The last image copies the heading of the one before it.
    CopiedFromPrevious,
    /// A sequence of one image without heading gets 0.
    LoneImageDefault,
}

/// An image in a planned upload, with its final capture time and heading.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedImage {
    /// The input name.
    pub name: String,
    /// Metadata with the final (de-tied) `captured_at` and the final `heading` (always set,
    /// normalised into [0, 360)).
    pub meta: ImageMetadata,
    /// Where `meta.heading` came from.
    pub heading_source: HeadingSource,
    /// The MAP* EXIF ImageDescription JSON for this image.
    pub description: String,
}

/// Images that go into one upload (one Mapillary sequence), in upload order.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedSequence {
    /// Ordered by capture time, then name.
    pub images: Vec<PlannedImage>,
}

/// Why an image is not uploaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum DropReason {
    /// Latitude and longitude are both 0.
    #[error("GPS position is (0, 0) (\"null island\")")]
    NullIsland,
    /// Same place (and heading) as the previous kept image.
    #[error("duplicate of {of}: {distance_m:.3} m apart (≤ {max_distance_m} m) and {}", angle_text(*.angle_diff_deg, *.max_angle_deg))]
    Duplicate {
        /// Name of the kept image it duplicates.
        of: String,
        /// Distance between the two, metres.
        distance_m: f64,
        /// Heading difference; `None` when either heading is unknown.
        angle_diff_deg: Option<f64>,
        /// The configured distance threshold.
        max_distance_m: f64,
        /// The configured angle threshold.
        max_angle_deg: f64,
    },
    /// Its metadata cannot be written as a valid MAP* description (position or capture time out
    /// of range, a non-finite number; see [`description::DescriptionError`]). Such images are
    /// left out before any rule runs, so they affect no other image.
    #[error("{0}")]
    InvalidMetadata(String),
    /// Its sequence moves faster than the speed limit on average.
    #[error("its sequence's average capture speed {speed_kmh:.3} km/h exceeds {max_kmh} km/h")]
    TooFast {
        /// Average speed of the sequence.
        speed_kmh: f64,
        /// The configured limit.
        max_kmh: f64,
    },
}

fn angle_text(diff: Option<f64>, max: f64) -> String {
    match diff {
        Some(d) => format!("headings {d:.3}° apart (≤ {max}°)"),
        None => "a heading is missing".to_string(),
    }
}

/// An image left out of every upload.
#[derive(Debug, Clone, PartialEq)]
pub struct DroppedImage {
    /// The input name.
    pub name: String,
    /// Why.
    pub reason: DropReason,
}

/// The result: every input image is in exactly one sequence or in `dropped`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SequencePlan {
    /// Uploads in order.
    pub sequences: Vec<PlannedSequence>,
    /// Images not uploaded, in the order they were dropped.
    pub dropped: Vec<DroppedImage>,
}

/// Working state of one image (mapillary_tools' `ImageMetadata` as a `geo.Point`).
#[derive(Debug, Clone)]
struct Point {
    input: usize,
    time: f64,
    lat: f64,
    lon: f64,
    angle: Option<f64>,
    heading_source: HeadingSource,
}

type Seq = Vec<Point>;

/// Applies the sequence rules to one manifest's images.
pub fn plan_sequences(inputs: Vec<SequenceInput>, cfg: &SequenceConfig) -> SequencePlan {
    let total = inputs.len();
    let mut dropped: Vec<DroppedImage> = Vec::new();
    // 0. Metadata no description can hold. The EXIF reader rejects these already; metadata from
    // elsewhere (checkpoints, other readers) must not reach the arithmetic below either.
    let mut points: Vec<Point> = Vec::with_capacity(total);
    for (i, inp) in inputs.iter().enumerate() {
        if let Err(e) = description::check_describable(&inp.meta) {
            dropped.push(DroppedImage {
                name: inp.name.clone(),
                reason: DropReason::InvalidMetadata(e.to_string()),
            });
            continue;
        }
        points.push(Point {
            input: i,
            time: unix_time(inp.meta.captured_at),
            lat: inp.meta.lat,
            lon: inp.meta.lon,
            angle: inp.meta.heading,
            heading_source: HeadingSource::Exif,
        });
    }
    // Sort once globally; grouping keeps the order, so every group is sorted too.
    points.sort_by(|a, b| {
        let (na, nb) = (&inputs[a.input].name, &inputs[b.input].name);
        a.time
            .total_cmp(&b.time)
            .then_with(|| base_name(na).cmp(base_name(nb)))
            .then_with(|| na.cmp(nb))
    });

    // 1. Group by folder and camera.
    let mut groups: Vec<(GroupKey, Seq)> = Vec::new();
    for p in points {
        let key = group_key(&inputs[p.input]);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push(p),
            None => groups.push((key, vec![p])),
        }
    }
    let mut sequences: Vec<Seq> = groups.into_iter().map(|(_, g)| g).collect();

    // 3. De-tie equal timestamps.
    for s in &mut sequences {
        interpolate_subsecs_for_sorting(s);
    }

    // 4. Split by count, time, file size and pixels (not distance: it would hide speeding).
    sequences = sequences
        .into_iter()
        .flat_map(|s| split_by_limits(s, &inputs, cfg))
        .collect();

    let drop = |dropped: &mut Vec<DroppedImage>, p: &Point, reason: DropReason| {
        dropped.push(DroppedImage {
            name: inputs[p.input].name.clone(),
            reason,
        })
    };

    // 5. Null island.
    for s in &mut sequences {
        s.retain(|p| {
            let null = p.lat == 0.0 && p.lon == 0.0;
            if null {
                drop(&mut dropped, p, DropReason::NullIsland);
            }
            !null
        });
    }
    sequences.retain(|s| !s.is_empty());

    // 6. Duplicates of the last kept image.
    for s in &mut sequences {
        let mut kept: Seq = Vec::with_capacity(s.len());
        for cur in s.drain(..) {
            if let Some(prev) = kept.last() {
                let distance = gps_distance((prev.lat, prev.lon), (cur.lat, cur.lon));
                let angle_diff = match (prev.angle, cur.angle) {
                    (Some(a), Some(b)) => Some(diff_bearing(a, b)),
                    _ => None,
                };
                if distance <= cfg.duplicate_distance_m
                    && angle_diff.is_none_or(|d| d <= cfg.duplicate_angle_deg)
                {
                    let reason = DropReason::Duplicate {
                        of: inputs[prev.input].name.clone(),
                        distance_m: distance,
                        angle_diff_deg: angle_diff,
                        max_distance_m: cfg.duplicate_distance_m,
                        max_angle_deg: cfg.duplicate_angle_deg,
                    };
                    drop(&mut dropped, &cur, reason);
                    continue;
                }
            }
            kept.push(cur);
        }
        *s = kept;
    }
    sequences.retain(|s| !s.is_empty());

    // 7. Headings.
    for s in &mut sequences {
        if cfg.interpolate_directions {
            for p in s.iter_mut() {
                p.angle = None;
            }
        }
        interpolate_directions_if_none(s);
    }

    // 8. Speed limit, per sequence.
    sequences.retain(|s| {
        let speed_kmh = avg_speed(s) * 3.6;
        let too_fast = s.len() >= 2 && speed_kmh > cfg.max_capture_speed_kmh;
        if too_fast {
            tracing::info!(
                speed_kmh,
                images = s.len(),
                "sequence dropped: capture speed too high"
            );
            for p in s {
                drop(
                    &mut dropped,
                    p,
                    DropReason::TooFast {
                        speed_kmh,
                        max_kmh: cfg.max_capture_speed_kmh,
                    },
                );
            }
        }
        !too_fast
    });

    // 9. Zig-zag: deliberately skipped (see the module docs).

    // 10. Split at distance gaps.
    let sequences: Vec<Seq> = sequences
        .into_iter()
        .flat_map(|s| split_by_distance(s, cfg.cutoff_distance_m))
        .collect();

    let mut planned_sequences: Vec<PlannedSequence> = Vec::with_capacity(sequences.len());
    for s in sequences {
        let mut images = Vec::with_capacity(s.len());
        for p in s {
            match planned_image(&inputs, &p) {
                Ok(image) => images.push(image),
                Err(reason) => drop(&mut dropped, &p, DropReason::InvalidMetadata(reason.to_string())),
            }
        }
        if !images.is_empty() {
            planned_sequences.push(PlannedSequence { images });
        }
    }
    let sequences = planned_sequences;

    let planned: usize = sequences.iter().map(|s| s.images.len()).sum();
    debug_assert_eq!(planned + dropped.len(), total, "every image is accounted for");
    SequencePlan { sequences, dropped }
}

fn planned_image(inputs: &[SequenceInput], p: &Point) -> Result<PlannedImage, description::DescriptionError> {
    let inp = &inputs[p.input];
    let mut meta = inp.meta.clone();
    // De-tied times stay below the next whole second of a checked time; only one rounded up onto
    // 10000-01-01 has no instant, and it keeps its own (sub-microsecond earlier) time.
    meta.captured_at = from_unix_time(p.time).unwrap_or(meta.captured_at);
    // process_finalize's `_apply_offsets`: angle = (angle + 0) % 360.
    meta.heading = p.angle.map(description::normalize_heading);
    let description = description::map_description(&meta, base_name(&inp.name))?;
    Ok(PlannedImage {
        name: inp.name.clone(),
        meta,
        heading_source: p.heading_source,
        description,
    })
}

/// The part of a key after its last `/`.
pub fn base_name(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

fn folder(name: &str) -> &str {
    name.rsplit_once('/').map(|(dir, _)| dir).unwrap_or("")
}

type GroupKey = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<u32>,
    Option<u32>,
);

fn group_key(inp: &SequenceInput) -> GroupKey {
    let m = &inp.meta;
    (
        folder(&inp.name).to_string(),
        m.camera_uuid.clone(),
        m.make.clone(),
        m.model.clone(),
        m.width,
        m.height,
    )
}

/// Python `datetime.timestamp()` of an aware datetime: microseconds / 1e6, correctly rounded.
fn unix_time(at: OffsetDateTime) -> f64 {
    let micros = at.unix_timestamp_nanos().div_euclid(1000);
    micros as f64 / 1e6
}

/// Python `datetime.fromtimestamp(t, timezone.utc)`: `modf`, fraction rounded half-to-even to
/// microseconds.
fn from_unix_time(t: f64) -> Option<OffsetDateTime> {
    if !t.is_finite() {
        return None;
    }
    let mut int = t.trunc();
    let mut us = ((t - int) * 1e6).round_ties_even();
    if us >= 1e6 {
        us -= 1e6;
        int += 1.0;
    } else if us < 0.0 {
        us += 1e6;
        int -= 1.0;
    }
    let secs = OffsetDateTime::from_unix_timestamp(int as i64).ok()?;
    secs.checked_add(Duration::microseconds(us as i64))
}

/// `_interpolate_subsecs_for_sorting`: images sharing a millisecond get evenly spread times up
/// to the next image or the next whole second, whichever comes first.
fn interpolate_subsecs_for_sorting(seq: &mut [Point]) {
    let key = |t: f64| (t * 1e3).trunc();
    let mut gidx = 0;
    while gidx < seq.len() {
        let k = key(seq[gidx].time);
        let mut end = gidx + 1;
        while end < seq.len() && key(seq[end].time) == k {
            end += 1;
        }
        let n = end - gidx;
        if n > 1 {
            let t = seq[gidx].time;
            let ceil_second = (t + 1.0).floor();
            let nt = if end < seq.len() {
                seq[end].time.min(ceil_second)
            } else {
                ceil_second
            };
            let interval = (nt - t) / n as f64;
            for (i, p) in seq[gidx..end].iter_mut().enumerate() {
                p.time = t + i as f64 * interval;
            }
        }
        gidx = end;
    }
}

/// `_split_sequences_by_limits` with count, time, file size and pixels.
fn split_by_limits(seq: Seq, inputs: &[SequenceInput], cfg: &SequenceConfig) -> Vec<Seq> {
    let mut out: Vec<Seq> = Vec::new();
    let (mut count, mut size, mut pixels) = (0usize, 0u64, 0u64);
    let mut last_time: Option<f64> = None;
    for p in seq {
        let inp = &inputs[p.input];
        let file_size = inp.file_size.unwrap_or(0);
        let px = u64::from(inp.meta.width.unwrap_or(1024)) * u64::from(inp.meta.height.unwrap_or(1024));
        let split = cfg.max_images_per_upload < count + 1
            || last_time.is_some_and(|t| cfg.cutoff_time_s < p.time - t)
            || cfg
                .max_sequence_filesize
                .is_some_and(|max| max < size.saturating_add(file_size))
            || cfg
                .max_sequence_pixels
                .is_some_and(|max| max < pixels.saturating_add(px));
        if split || out.is_empty() {
            count = 1;
            size = file_size;
            pixels = px;
            last_time = Some(p.time);
            out.push(vec![p]);
        } else {
            count += 1;
            size = size.saturating_add(file_size);
            pixels = pixels.saturating_add(px);
            last_time = Some(p.time);
            if let Some(last) = out.last_mut() {
                last.push(p);
            }
        }
    }
    out
}

/// `_split_sequences_by_limits(cutoff_distance=…)`.
fn split_by_distance(seq: Seq, cutoff_m: f64) -> Vec<Seq> {
    let mut out: Vec<Seq> = Vec::new();
    for p in seq {
        let split = out
            .last()
            .and_then(|s| s.last())
            .is_some_and(|prev| cutoff_m < gps_distance((prev.lat, prev.lon), (p.lat, p.lon)));
        match out.last_mut() {
            Some(last) if !split => last.push(p),
            _ => out.push(vec![p]),
        }
    }
    out
}

/// `geo.interpolate_directions_if_none`.
fn interpolate_directions_if_none(seq: &mut [Point]) {
    for i in 0..seq.len().saturating_sub(1) {
        if seq[i].angle.is_none() {
            let b = compute_bearing((seq[i].lat, seq[i].lon), (seq[i + 1].lat, seq[i + 1].lon));
            seq[i].angle = Some(b);
            seq[i].heading_source = HeadingSource::BearingToNext;
        }
    }
    match seq {
        [only] if only.angle.is_none() => {
            only.angle = Some(0.0);
            only.heading_source = HeadingSource::LoneImageDefault;
        }
        [.., prev, last] if last.angle.is_none() => {
            last.angle = prev.angle;
            last.heading_source = HeadingSource::CopiedFromPrevious;
        }
        _ => {}
    }
}

/// `geo.avg_speed` in m/s (NaN for a zero time span, 0 below two points).
fn avg_speed(seq: &[Point]) -> f64 {
    if seq.len() < 2 {
        return 0.0;
    }
    let total: f64 = seq
        .windows(2)
        .map(|w| gps_distance((w[0].lat, w[0].lon), (w[1].lat, w[1].lon)))
        .sum();
    let (first, last) = (&seq[0], &seq[seq.len() - 1]);
    let dt = last.time - first.time;
    if dt == 0.0 {
        return f64::NAN;
    }
    total / dt
}

const WGS84_A: f64 = 6_378_137.0;
const WGS84_B: f64 = 6_356_752.314_245;

fn ecef(lat: f64, lon: f64) -> (f64, f64, f64) {
    let (lat, lon) = (lat.to_radians(), lon.to_radians());
    let (cos_lat, sin_lat) = (lat.cos(), lat.sin());
    let a2 = WGS84_A * WGS84_A;
    let b2 = WGS84_B * WGS84_B;
    let l = 1.0 / (a2 * cos_lat.powi(2) + b2 * sin_lat.powi(2)).sqrt();
    let k = a2 * l * cos_lat;
    (k * lon.cos(), k * lon.sin(), b2 * l * sin_lat)
}

/// `geo.gps_distance`: straight-line distance in metres between two (lat, lon) on the WGS84
/// ellipsoid surface.
pub fn gps_distance(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (x1, y1, z1) = ecef(a.0, a.1);
    let (x2, y2, z2) = ecef(b.0, b.1);
    ((x1 - x2).powi(2) + (y1 - y2).powi(2) + (z1 - z2).powi(2)).sqrt()
}

/// `geo.compute_bearing`: initial compass bearing from `a` to `b`, degrees in [0, 360).
pub fn compute_bearing(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (lat1, lon1) = (a.0.to_radians(), a.1.to_radians());
    let (lat2, lon2) = (b.0.to_radians(), b.1.to_radians());
    let mut dlon = lon2 - lon1;
    if dlon.abs() > std::f64::consts::PI {
        dlon = if dlon > 0.0 {
            -(2.0 * std::f64::consts::PI - dlon)
        } else {
            2.0 * std::f64::consts::PI + dlon
        };
    }
    let y = dlon.sin() * lat2.cos();
    let x = lat1.cos() * lat2.sin() - lat1.sin() * lat2.cos() * dlon.cos();
    // Python's `%` takes the divisor's sign, like rem_euclid for a positive divisor.
    (y.atan2(x).to_degrees() + 360.0).rem_euclid(360.0)
}

/// `geo.diff_bearing`: absolute difference of two bearings, in [0, 180].
pub fn diff_bearing(a: f64, b: f64) -> f64 {
    let d = (b - a).abs();
    if d > 180.0 {
        360.0 - d
    } else {
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::exif::TimeSource;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2024-05-01 10:00:00 UTC);

    fn meta(lat: f64, lon: f64, secs: f64, heading: Option<f64>) -> ImageMetadata {
        ImageMetadata {
            lat,
            lon,
            altitude: None,
            captured_at: T0 + Duration::seconds_f64(secs),
            time_source: TimeSource::Gps,
            heading,
            make: Some("M".into()),
            model: Some("X".into()),
            orientation: 1,
            width: Some(64),
            height: Some(48),
            camera_uuid: None,
        }
    }

    /// ~`m` metres north of (50, 0).
    fn north(m: f64) -> f64 {
        50.0 + m / 111_200.0
    }

    fn inp(name: &str, m: ImageMetadata) -> SequenceInput {
        (name.to_string(), m).into()
    }

    fn names(plan: &SequencePlan) -> Vec<Vec<&str>> {
        plan.sequences
            .iter()
            .map(|s| s.images.iter().map(|i| i.name.as_str()).collect())
            .collect()
    }

    fn accounted(plan: &SequencePlan, n: usize) {
        let mut all: Vec<&str> = plan
            .sequences
            .iter()
            .flat_map(|s| s.images.iter().map(|i| i.name.as_str()))
            .chain(plan.dropped.iter().map(|d| d.name.as_str()))
            .collect();
        assert_eq!(all.len(), n, "each image exactly once");
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "no image twice");
    }

    #[test]
    fn geo_matches_mapillary_tools_doctest() {
        let d = gps_distance((42.1, -11.1), (42.2, -11.3));
        assert!(19_000.0 < d && d < 20_000.0, "{d}");
        assert!((compute_bearing((50.0, 0.0), (51.0, 0.0)) - 0.0).abs() < 1e-9);
        assert!((compute_bearing((50.0, 0.0), (50.0, 1.0)) - 89.617).abs() < 1e-2);
        assert!((compute_bearing((0.0, 179.5), (0.0, -179.5)) - 90.0).abs() < 1e-9);
        assert_eq!(diff_bearing(350.0, 10.0), 20.0);
        assert_eq!(diff_bearing(10.0, 350.0), 20.0);
    }

    #[test]
    fn sorts_splits_by_time_and_count() {
        let cfg = SequenceConfig {
            max_images_per_upload: 3,
            ..Default::default()
        };
        let mut v = Vec::new();
        for i in 0..5 {
            v.push(inp(
                &format!("b{i}.jpg"),
                meta(north(i as f64 * 5.0), 0.0, i as f64, Some(0.0)),
            ));
        }
        // 61 s gap after b4.
        v.push(inp("c.jpg", meta(north(30.0), 0.0, 65.0, Some(0.0))));
        v.reverse();
        let plan = plan_sequences(v, &cfg);
        assert_eq!(
            names(&plan),
            vec![
                vec!["b0.jpg", "b1.jpg", "b2.jpg"],
                vec!["b3.jpg", "b4.jpg"],
                vec!["c.jpg"]
            ]
        );
        accounted(&plan, 6);
    }

    #[test]
    fn time_gap_of_exactly_cutoff_does_not_split() {
        let v = vec![
            inp("a.jpg", meta(north(0.0), 0.0, 0.0, Some(0.0))),
            inp("b.jpg", meta(north(5.0), 0.0, 60.0, Some(0.0))),
        ];
        assert_eq!(plan_sequences(v, &SequenceConfig::default()).sequences.len(), 1);
    }

    #[test]
    fn duplicates_are_dropped_against_the_last_kept_image() {
        let v = vec![
            inp("a.jpg", meta(north(0.0), 0.0, 0.0, Some(10.0))),
            // 5 cm away, 3° off: duplicate.
            inp("b.jpg", meta(north(0.05), 0.0, 1.0, Some(13.0))),
            // 8 cm from a (kept), heading missing: duplicate of a.
            inp("c.jpg", meta(north(0.08), 0.0, 2.0, None)),
            // 5 cm away but 90° turned: kept.
            inp("d.jpg", meta(north(0.05), 0.0, 3.0, Some(100.0))),
            inp("e.jpg", meta(north(10.0), 0.0, 4.0, None)),
        ];
        let plan = plan_sequences(v, &SequenceConfig::default());
        assert_eq!(names(&plan), vec![vec!["a.jpg", "d.jpg", "e.jpg"]]);
        let dropped: Vec<(&str, String)> = plan
            .dropped
            .iter()
            .map(|d| (d.name.as_str(), d.reason.to_string()))
            .collect();
        assert_eq!(dropped.len(), 2);
        assert_eq!(dropped[0].0, "b.jpg");
        assert!(dropped[0].1.starts_with("duplicate of a.jpg"), "{}", dropped[0].1);
        assert!(dropped[0].1.contains("3.000°"), "{}", dropped[0].1);
        assert_eq!(dropped[1].0, "c.jpg");
        assert!(dropped[1].1.contains("heading is missing"), "{}", dropped[1].1);
        accounted(&plan, 5);
    }

    #[test]
    fn headings_are_interpolated() {
        let v = vec![
            inp("a.jpg", meta(50.0, 0.0, 0.0, None)),
            inp("b.jpg", meta(50.0, 0.0005, 1.0, Some(42.0))),
            inp("c.jpg", meta(50.0005, 0.0005, 2.0, None)),
            inp("d.jpg", meta(50.001, 0.0005, 3.0, None)),
            // lone image after a time gap
            inp("e.jpg", meta(50.001, 0.001, 100.0, None)),
        ];
        let plan = plan_sequences(v, &SequenceConfig::default());
        assert_eq!(plan.sequences.len(), 2);
        let s = &plan.sequences[0].images;
        let srcs: Vec<HeadingSource> = s.iter().map(|i| i.heading_source).collect();
        assert_eq!(
            srcs,
            vec![
                HeadingSource::BearingToNext,
                HeadingSource::Exif,
                HeadingSource::BearingToNext,
                HeadingSource::CopiedFromPrevious
            ]
        );
        assert!((s[0].meta.heading.unwrap_or(-1.0) - 90.0).abs() < 1e-3);
        assert_eq!(s[1].meta.heading, Some(42.0));
        assert!(s[2].meta.heading.unwrap_or(-1.0).abs() < 1e-9);
        assert_eq!(s[3].meta.heading, s[2].meta.heading);
        let lone = &plan.sequences[1].images[0];
        assert_eq!(lone.heading_source, HeadingSource::LoneImageDefault);
        assert!(
            lone.description
                .contains(r#""MAPCompassHeading":{"MagneticHeading":0.0,"TrueHeading":0.0}"#),
            "{}",
            lone.description
        );
        assert!(
            s[3].description.contains(r#""TrueHeading":0.0}"#),
            "{}",
            s[3].description
        );
    }

    #[test]
    fn equal_timestamps_are_spread_within_the_second() {
        let v = vec![
            inp("c.jpg", meta(north(10.0), 0.0, 0.0, Some(0.0))),
            inp("a.jpg", meta(north(0.0), 0.0, 0.0, Some(0.0))),
            inp("b.jpg", meta(north(5.0), 0.0, 0.0, Some(0.0))),
            inp("d.jpg", meta(north(15.0), 0.0, 0.5, Some(0.0))),
            inp("e.jpg", meta(north(20.0), 0.0, 7.25, Some(0.0))),
            inp("f.jpg", meta(north(25.0), 0.0, 7.25, Some(0.0))),
        ];
        let plan = plan_sequences(v, &SequenceConfig::default());
        let times: Vec<String> = plan.sequences[0]
            .images
            .iter()
            .map(|i| {
                format!(
                    "{}:{}",
                    i.name,
                    description::format_capture_time(i.meta.captured_at).expect("in range")
                )
            })
            .collect();
        // Python: [0, 0, 0] next 0.5 → 0, 0.1666.., 0.3333..; [7.25, 7.25] → 7.25, 7.625.
        assert_eq!(
            times,
            vec![
                "a.jpg:2024_05_01_10_00_00_000",
                "b.jpg:2024_05_01_10_00_00_166",
                "c.jpg:2024_05_01_10_00_00_333",
                "d.jpg:2024_05_01_10_00_00_500",
                "e.jpg:2024_05_01_10_00_07_250",
                "f.jpg:2024_05_01_10_00_07_625",
            ]
        );
    }

    #[test]
    fn distance_gap_splits_after_speed_check() {
        let v = vec![
            inp("a.jpg", meta(north(0.0), 0.0, 0.0, Some(0.0))),
            inp("b.jpg", meta(north(5.0), 0.0, 1.0, Some(0.0))),
            inp("c.jpg", meta(north(200.0), 0.0, 20.0, Some(0.0))),
            inp("d.jpg", meta(north(205.0), 0.0, 21.0, Some(0.0))),
        ];
        let plan = plan_sequences(v, &SequenceConfig::default());
        assert_eq!(names(&plan), vec![vec!["a.jpg", "b.jpg"], vec!["c.jpg", "d.jpg"]]);
    }

    #[test]
    fn too_fast_sequences_are_dropped_whole() {
        // 2 km in 10 s = 720 km/h.
        let v = vec![
            inp("a.jpg", meta(north(0.0), 0.0, 0.0, Some(0.0))),
            inp("b.jpg", meta(north(2000.0), 0.0, 10.0, Some(0.0))),
            inp("c.jpg", meta(north(2005.0), 0.0, 100.0, Some(0.0))),
        ];
        let plan = plan_sequences(v, &SequenceConfig::default());
        assert_eq!(names(&plan), vec![vec!["c.jpg"]]);
        assert_eq!(plan.dropped.len(), 2);
        assert!(matches!(plan.dropped[0].reason, DropReason::TooFast { speed_kmh, .. } if speed_kmh > 700.0));
        accounted(&plan, 3);
    }

    #[test]
    fn null_island_and_camera_groups() {
        let mut other = meta(north(10.0), 0.0, 2.0, Some(0.0));
        other.model = Some("Other".into());
        let v = vec![
            inp("a.jpg", meta(north(0.0), 0.0, 0.0, Some(0.0))),
            inp("z.jpg", meta(0.0, 0.0, 1.0, Some(0.0))),
            inp("o.jpg", other),
            inp("b.jpg", meta(north(5.0), 0.0, 3.0, Some(0.0))),
            inp("sub/c.jpg", meta(north(10.0), 0.0, 4.0, Some(0.0))),
        ];
        let plan = plan_sequences(v, &SequenceConfig::default());
        assert_eq!(
            names(&plan),
            vec![vec!["a.jpg", "b.jpg"], vec!["o.jpg"], vec!["sub/c.jpg"]]
        );
        assert_eq!(plan.dropped[0].reason, DropReason::NullIsland);
        assert!(plan.sequences[2].images[0]
            .description
            .contains("\"MAPFilename\":\"c.jpg\""));
        accounted(&plan, 5);
    }

    #[test]
    fn undescribable_inputs_are_dropped_with_a_reason_before_any_rule() {
        let mut late = meta(north(10.0), 0.0, 2.0, Some(0.0));
        late.captured_at = datetime!(9999-12-31 23:59:59 -01:00);
        let v = vec![
            inp("a.jpg", meta(north(0.0), 0.0, 0.0, Some(0.0))),
            inp("late.jpg", late),
            inp("lat.jpg", meta(95.0, 0.0, 1.0, Some(0.0))),
            inp("nan.jpg", meta(f64::NAN, f64::NAN, 1.5, None)),
            inp("b.jpg", meta(north(5.0), 0.0, 1.0, Some(0.0))),
        ];
        let plan = plan_sequences(v, &SequenceConfig::default());
        assert_eq!(names(&plan), vec![vec!["a.jpg", "b.jpg"]]);
        let dropped: Vec<(&str, String)> = plan
            .dropped
            .iter()
            .map(|d| (d.name.as_str(), d.reason.to_string()))
            .collect();
        assert_eq!(
            dropped,
            vec![
                (
                    "late.jpg",
                    "capture time 9999-12-31 23:59:59.0 -01:00:00 is not between 1000-01-01 and 9999-12-31 in \
                     UTC; correct the camera clock or the image's EXIF date"
                        .to_string()
                ),
                ("lat.jpg", "latitude 95 is not a number between -90 and 90".to_string()),
                ("nan.jpg", "latitude NaN is not a number between -90 and 90".to_string()),
            ]
        );
        assert!(matches!(plan.dropped[0].reason, DropReason::InvalidMetadata(_)));
        accounted(&plan, 5);
    }

    #[test]
    fn pixel_limit_splits() {
        let cfg = SequenceConfig {
            max_sequence_pixels: Some(64 * 48 * 2),
            ..Default::default()
        };
        let v: Vec<SequenceInput> = (0..5)
            .map(|i| {
                inp(
                    &format!("{i}.jpg"),
                    meta(north(i as f64 * 5.0), 0.0, i as f64, Some(0.0)),
                )
            })
            .collect();
        let plan = plan_sequences(v, &cfg);
        assert_eq!(
            plan.sequences.iter().map(|s| s.images.len()).collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
    }

    #[test]
    fn time_round_trip_is_exact() {
        for us in [0i64, 1, 257_000, 999_999, 123_456] {
            let at = T0 + Duration::microseconds(us);
            assert_eq!(from_unix_time(unix_time(at)), Some(at));
        }
    }

    #[test]
    fn empty_input() {
        assert_eq!(
            plan_sequences(vec![], &SequenceConfig::default()),
            SequencePlan::default()
        );
    }
}
