//! Linking an upload's images to Mapillary image ids (issue 4, items 4 and 5).
//!
//! * Plan B, [`link_by_order`]: Mapillary's images of the cluster's sequence(s) (from
//!   `image_ids?sequence_id=` and image entities) are merged by `captured_at` and aligned with our
//!   images in upload order. Every pair is verified by capture time and distance (and altitude
//!   when configured), so a dropped image shifts nothing: it is reported as dropped.
//! * Plan A, [`match_candidates`]: candidate images from coverage tiles and entity lookups (any
//!   order, any sequences, duplicates allowed) → the sequences that contain our images → the same
//!   alignment as Plan B. Given the same images, both plans produce the same links.
//!
//! The alignment maximises the number of verified pairs while keeping both orders (a longest
//! common subsequence), breaking ties by the smallest total deviation. Unpaired images that sit
//! at the same place in both orders are reported as mismatches, the rest as dropped / unexpected.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::domain::tiles::{distance_m, LonLat};

/// Web link of an image (the help centre's "shortcut URL"; sequences have no documented URL).
/// Defined here rather than in `mapillary` so that this file needs nothing outside `domain` (the
/// fuzz crate compiles it on its own); `shared::mapillary::image_link` re-exports it.
pub fn image_link(image_id: &str) -> String {
    format!("https://www.mapillary.com/app/?pKey={image_id}")
}

/// Largest alignment (our images × Mapillary images) computed; one byte per cell.
pub const MAX_ALIGNMENT_CELLS: usize = 16 * 1024 * 1024;

/// One of our uploaded images, in upload order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OurImage {
    /// Our key for the image (S3 key or zip entry name).
    pub key: String,
    pub lat: f64,
    pub lon: f64,
    /// Metres.
    pub altitude: Option<f64>,
    /// Capture time as uploaded (`MAPCaptureTime`), ms since the epoch.
    pub captured_at_ms: i64,
    /// Degrees.
    pub heading: Option<f64>,
}

/// One Mapillary image (entity fields `id`, `sequence`, `captured_at`, `geometry`, `altitude`,
/// or the same from a coverage tile).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapillaryImage {
    pub id: String,
    pub sequence_id: String,
    /// ms since the epoch.
    pub captured_at_ms: i64,
    /// Original (uploaded) position: entity `geometry`, or the `mly1_public` tile position.
    pub lon: f64,
    pub lat: f64,
    /// Original altitude, metres.
    pub altitude: Option<f64>,
}

/// One Mapillary sequence with its images in capture order (`image_ids` order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapillarySequence {
    pub id: String,
    pub images: Vec<MapillaryImage>,
}

/// How close a Mapillary image must be to one of ours to be the same image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tolerances {
    /// Capture-time difference, ms (default 1 s).
    pub captured_at_ms: i64,
    /// Horizontal distance, metres (default 5 m).
    pub distance_m: f64,
    /// Altitude difference, metres; `None` (default) does not compare altitudes, because how
    /// Mapillary stores altitudes (datum) is unknown. Checked only when both sides have one.
    pub altitude_m: Option<f64>,
}

impl Default for Tolerances {
    fn default() -> Self {
        Self {
            captured_at_ms: 1_000,
            distance_m: 5.0,
            altitude_m: None,
        }
    }
}

/// Which way a link was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LinkPath {
    /// Plan B: activity feed → image entity → `image_ids`.
    ActivityFeed,
    /// Plan A: coverage tiles → candidates → matching.
    CoverageTiles,
}

/// What became of one of our images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ImageOutcome {
    /// Mapillary has it as `image_id`.
    Linked {
        image_id: String,
        sequence_id: String,
        /// Web link (`https://www.mapillary.com/app/?pKey=<id>`).
        link: String,
    },
    /// Mapillary has no image for it (dropped during processing, or a mismatch).
    Dropped { reason: DropReason },
}

/// Why one of our images has no Mapillary image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DropReason {
    /// No Mapillary image sits at its place in the order: Mapillary dropped it.
    NotInSequence,
    /// The Mapillary image at its place in the order fails verification.
    Mismatch {
        image_id: String,
        sequence_id: String,
        /// Mapillary's `captured_at` minus ours.
        time_delta_ms: i64,
        distance_m: f64,
        /// Mapillary's altitude minus ours, when both are known.
        altitude_delta_m: Option<f64>,
    },
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DropReason::NotInSequence => f.write_str("not in the Mapillary sequence(s)"),
            DropReason::Mismatch {
                image_id,
                time_delta_ms,
                distance_m,
                ..
            } => write!(
                f,
                "Mapillary image {image_id} at its place differs by {time_delta_ms} ms and {distance_m:.1} m"
            ),
        }
    }
}

/// The outcome for one of our images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkedImage {
    pub key: String,
    pub outcome: ImageOutcome,
}

/// The result of linking one upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkReport {
    pub path: LinkPath,
    /// Sequences holding at least one of our images, in capture order.
    pub sequence_ids: Vec<String>,
    /// One entry per image of ours, in upload order.
    pub images: Vec<LinkedImage>,
    /// Images of those sequences that match none of ours, in capture order.
    pub unmatched_mapillary: Vec<String>,
}

impl LinkReport {
    /// Images linked.
    pub fn linked_count(&self) -> usize {
        self.images
            .iter()
            .filter(|i| matches!(i.outcome, ImageOutcome::Linked { .. }))
            .count()
    }

    /// Images without a Mapillary image.
    pub fn dropped_count(&self) -> usize {
        self.images.len() - self.linked_count()
    }

    /// Pairs that order says belong together but verification rejects.
    pub fn mismatches(&self) -> impl Iterator<Item = (&str, &DropReason)> {
        self.images.iter().filter_map(|i| match &i.outcome {
            ImageOutcome::Dropped {
                reason: r @ DropReason::Mismatch { .. },
            } => Some((i.key.as_str(), r)),
            _ => None,
        })
    }

    /// `(our key, Mapillary image id)` of every linked image, in upload order.
    pub fn links(&self) -> impl Iterator<Item = (&str, &str)> {
        self.images.iter().filter_map(|i| match &i.outcome {
            ImageOutcome::Linked { image_id, .. } => Some((i.key.as_str(), image_id.as_str())),
            _ => None,
        })
    }
}

/// Why linking could not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinkError {
    #[error("tolerances must be finite and non-negative")]
    BadTolerances,
    #[error("our image `{key}` has an invalid position (lat {lat}, lon {lon})")]
    BadOurPosition { key: String, lat: f64, lon: f64 },
    #[error("Mapillary image {id} has an invalid position (lat {lat}, lon {lon})")]
    BadMapillaryPosition { id: String, lat: f64, lon: f64 },
    #[error("Mapillary image {id} is listed under sequence {listed} but says sequence {own}")]
    SequenceMismatch { id: String, listed: String, own: String },
    #[error("Mapillary image {0} appears more than once")]
    DuplicateImage(String),
    #[error("too many images to align: {ours} of ours × {theirs} of Mapillary's")]
    TooLarge { ours: usize, theirs: usize },
}

/// Plan B: link our images (upload order) to the images of the cluster's sequence(s).
pub fn link_by_order(
    ours: &[OurImage],
    sequences: &[MapillarySequence],
    tol: &Tolerances,
) -> Result<LinkReport, LinkError> {
    validate(ours, tol)?;
    let mut seen = HashSet::new();
    let mut merged: Vec<(usize, usize, &MapillaryImage)> = Vec::new();
    for (si, seq) in sequences.iter().enumerate() {
        for (ii, img) in seq.images.iter().enumerate() {
            if img.sequence_id != seq.id {
                return Err(LinkError::SequenceMismatch {
                    id: img.id.clone(),
                    listed: seq.id.clone(),
                    own: img.sequence_id.clone(),
                });
            }
            check_mapillary(img)?;
            if !seen.insert(img.id.as_str()) {
                return Err(LinkError::DuplicateImage(img.id.clone()));
            }
            merged.push((si, ii, img));
        }
    }
    // Merge the sequences by capture time; within a sequence keep Mapillary's order.
    merged.sort_by_key(|(si, ii, img)| (img.captured_at_ms, *si, *ii));
    let theirs: Vec<&MapillaryImage> = merged.into_iter().map(|(_, _, i)| i).collect();
    align(ours, &theirs, tol, LinkPath::ActivityFeed)
}

/// Plan A: find our images among `candidates` (from coverage tiles and entity lookups; any
/// order, duplicates by id are ignored) and link them exactly as [`link_by_order`] would link the
/// sequences that contain them. Candidates of other sequences are ignored; exclude sequences
/// already linked to other uploads before calling (a re-upload of the same images matches too).
pub fn match_candidates(
    ours: &[OurImage],
    candidates: &[MapillaryImage],
    tol: &Tolerances,
) -> Result<LinkReport, LinkError> {
    validate(ours, tol)?;
    let mut by_id: HashSet<&str> = HashSet::new();
    let mut unique: Vec<&MapillaryImage> = Vec::new();
    for c in candidates {
        check_mapillary(c)?;
        if by_id.insert(c.id.as_str()) {
            unique.push(c);
        }
    }
    // Time-sorted index: each of ours looks only at candidates within the time tolerance.
    let mut by_time = unique.clone();
    by_time.sort_by_key(|c| c.captured_at_ms);
    let mut hit: HashSet<&str> = HashSet::new();
    for o in ours {
        // Saturating: capture times and the tolerance are i64s from records and replies.
        let (from, until) = (
            o.captured_at_ms.saturating_sub(tol.captured_at_ms),
            o.captured_at_ms.saturating_add(tol.captured_at_ms),
        );
        let lo = by_time.partition_point(|c| c.captured_at_ms < from);
        for c in &by_time[lo..] {
            if c.captured_at_ms > until {
                break;
            }
            if deviation(o, c).within(tol) {
                hit.insert(c.sequence_id.as_str());
            }
        }
    }
    // The sequences that hold our images, each in capture order, merged as Plan B does.
    let mut groups: HashMap<&str, Vec<&MapillaryImage>> = HashMap::new();
    for c in unique.iter().filter(|c| hit.contains(c.sequence_id.as_str())) {
        groups.entry(c.sequence_id.as_str()).or_default().push(c);
    }
    let mut theirs: Vec<&MapillaryImage> = groups.into_values().flatten().collect();
    // Capture order; ties (same millisecond) keep sequence then id order, deterministic.
    theirs.sort_by(|a, b| {
        (a.captured_at_ms, &a.sequence_id, &a.id).cmp(&(b.captured_at_ms, &b.sequence_id, &b.id))
    });
    align(ours, &theirs, tol, LinkPath::CoverageTiles)
}

fn validate(ours: &[OurImage], tol: &Tolerances) -> Result<(), LinkError> {
    let alt_ok = tol.altitude_m.is_none_or(|a| a.is_finite() && a >= 0.0);
    if tol.captured_at_ms < 0 || !tol.distance_m.is_finite() || tol.distance_m < 0.0 || !alt_ok {
        return Err(LinkError::BadTolerances);
    }
    for o in ours {
        if LonLat::new(o.lon, o.lat).validate().is_err() {
            return Err(LinkError::BadOurPosition {
                key: o.key.clone(),
                lat: o.lat,
                lon: o.lon,
            });
        }
    }
    Ok(())
}

fn check_mapillary(img: &MapillaryImage) -> Result<(), LinkError> {
    if LonLat::new(img.lon, img.lat).validate().is_err() {
        return Err(LinkError::BadMapillaryPosition {
            id: img.id.clone(),
            lat: img.lat,
            lon: img.lon,
        });
    }
    Ok(())
}

/// How far a Mapillary image is from one of ours.
struct Deviation {
    time_ms: i64,
    distance_m: f64,
    altitude_m: Option<f64>,
}

impl Deviation {
    fn within(&self, tol: &Tolerances) -> bool {
        self.time_ms.unsigned_abs() <= tol.captured_at_ms.unsigned_abs()
            && self.distance_m <= tol.distance_m
            && match (tol.altitude_m, self.altitude_m) {
                (Some(max), Some(d)) => d.abs() <= max,
                _ => true,
            }
    }

    /// Tie-breaking cost in thousandths of each tolerance (time and distance; altitude too when
    /// compared, otherwise as a small extra so the nearest altitude wins an exact tie).
    fn cost(&self, tol: &Tolerances) -> u64 {
        let part = |d: f64, t: f64| -> u64 {
            if t > 0.0 {
                (d.abs() / t * 1000.0).min(1e6) as u64
            } else {
                0
            }
        };
        let alt = match (self.altitude_m, tol.altitude_m) {
            (Some(d), Some(t)) => part(d, t),
            (Some(d), None) => (d.abs().min(1000.0)) as u64,
            _ => 0,
        };
        part(self.time_ms as f64, tol.captured_at_ms as f64) + part(self.distance_m, tol.distance_m) + alt
    }
}

fn deviation(o: &OurImage, m: &MapillaryImage) -> Deviation {
    Deviation {
        time_ms: m.captured_at_ms.saturating_sub(o.captured_at_ms),
        distance_m: distance_m(LonLat::new(o.lon, o.lat), LonLat::new(m.lon, m.lat)),
        altitude_m: match (o.altitude, m.altitude) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
    }
}

#[derive(Clone, Copy)]
enum Step {
    Pair,
    SkipOurs,
    SkipTheirs,
}

/// Order-preserving alignment: most verified pairs, then least total cost.
fn align(
    ours: &[OurImage],
    theirs: &[&MapillaryImage],
    tol: &Tolerances,
    path: LinkPath,
) -> Result<LinkReport, LinkError> {
    let (n, m) = (ours.len(), theirs.len());
    if n.saturating_mul(m) > MAX_ALIGNMENT_CELLS {
        return Err(LinkError::TooLarge { ours: n, theirs: m });
    }
    // Suffix DP, row by row from the end: best[j] = (pairs, cost) for ours[i..] × theirs[j..].
    let mut steps = vec![Step::SkipOurs; n * m];
    let mut next_row = vec![(0u32, 0u64); m + 1];
    let mut row = vec![(0u32, 0u64); m + 1];
    let better = |a: (u32, u64), b: (u32, u64)| a.0 > b.0 || (a.0 == b.0 && a.1 < b.1);
    for i in (0..n).rev() {
        row[m] = (0, 0);
        for j in (0..m).rev() {
            let mut best = next_row[j];
            let mut step = Step::SkipOurs;
            if better(row[j + 1], best) {
                best = row[j + 1];
                step = Step::SkipTheirs;
            }
            let d = deviation(&ours[i], theirs[j]);
            if d.within(tol) {
                let (p, c) = next_row[j + 1];
                let cand = (p + 1, c.saturating_add(d.cost(tol)));
                if better(cand, best) || (cand == best) {
                    best = cand;
                    step = Step::Pair;
                }
            }
            row[j] = best;
            steps[i * m + j] = step;
        }
        std::mem::swap(&mut row, &mut next_row);
    }
    // Walk the chosen path; collect pairs.
    let mut pairs = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n && j < m {
        match steps[i * m + j] {
            Step::Pair => {
                pairs.push((i, j));
                i += 1;
                j += 1;
            }
            Step::SkipOurs => i += 1,
            Step::SkipTheirs => j += 1,
        }
    }
    let mut outcomes: Vec<Option<ImageOutcome>> = vec![None; n];
    let mut their_used = vec![false; m];
    for &(i, j) in &pairs {
        their_used[j] = true;
        outcomes[i] = Some(ImageOutcome::Linked {
            image_id: theirs[j].id.clone(),
            sequence_id: theirs[j].sequence_id.clone(),
            link: image_link(&theirs[j].id),
        });
    }
    // Gaps between pairs: unpaired images at the same place in both orders are mismatches.
    let mut bounds: Vec<(usize, usize)> = vec![(0, 0)];
    bounds.extend(pairs.iter().map(|&(i, j)| (i + 1, j + 1)));
    let mut ends: Vec<(usize, usize)> = pairs.clone();
    ends.push((n, m));
    for (&(i0, j0), &(i1, j1)) in bounds.iter().zip(ends.iter()) {
        let gap_theirs = j1.saturating_sub(j0);
        for (k, i) in (i0..i1).enumerate() {
            let reason = if k < gap_theirs {
                let t = theirs[j0 + k];
                let d = deviation(&ours[i], t);
                DropReason::Mismatch {
                    image_id: t.id.clone(),
                    sequence_id: t.sequence_id.clone(),
                    time_delta_ms: d.time_ms,
                    distance_m: d.distance_m,
                    altitude_delta_m: d.altitude_m,
                }
            } else {
                DropReason::NotInSequence
            };
            outcomes[i] = Some(ImageOutcome::Dropped { reason });
        }
    }
    let images = ours
        .iter()
        .zip(outcomes)
        .map(|(o, outcome)| LinkedImage {
            key: o.key.clone(),
            outcome: outcome.unwrap_or(ImageOutcome::Dropped {
                reason: DropReason::NotInSequence,
            }),
        })
        .collect();
    let mut sequence_ids: Vec<String> = Vec::new();
    for &(_, j) in &pairs {
        let s = &theirs[j].sequence_id;
        if !sequence_ids.contains(s) {
            sequence_ids.push(s.clone());
        }
    }
    let unmatched_mapillary = theirs
        .iter()
        .zip(their_used)
        .filter(|(_, used)| !used)
        .map(|(t, _)| t.id.clone())
        .collect();
    Ok(LinkReport {
        path,
        sequence_ids,
        images,
        unmatched_mapillary,
    })
}
