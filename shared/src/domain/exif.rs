//! Capture metadata from the head of a JPEG, the way mapillary_tools 0.14.7 reads it
//! (`exif_read.py` `ExifReadFromEXIF`, `geotag/image_extractors/exif.py`).
//!
//! The functions only ever see a prefix of the file (ranged S3 GETs): [`header_extent`] says
//! whether the prefix already holds the whole EXIF block and, if not, how many bytes to fetch;
//! [`read_metadata`] decodes the TIFF block inside the APP1 `Exif` segment with kamadak-exif.
//!
//! Deliberate differences from mapillary_tools:
//! * A capture time without a UTC offset is taken as **UTC**. mapillary_tools uses the local time
//!   zone of the machine it runs on; on Lambda (and in our tests, `TZ=UTC`) that is UTC too.
//! * No XMP fallback (mapillary_tools reads XMP when EXIF lacks GPS or time). Such images are
//!   rejected with [`ExifError::NoGps`] / [`ExifError::NoCaptureTime`].
//! * (0, 0) is rejected here already ([`ExifError::NullIsland`]); mapillary_tools does it in its
//!   sequence step (which [`crate::domain::sequence`] repeats), and coordinates outside ±90/±180
//!   are rejected here ([`ExifError::InvalidGps`]) where mapillary_tools fails its schema check
//!   (after its sequence rules, where such an image can still drop its neighbours).
//! * Capture times outside 1000-01-01..=9999-12-31 UTC are rejected here
//!   ([`ExifError::CaptureTimeOutOfRange`]). mapillary_tools fails the image at its schema check
//!   for years before 1000 (its `MAPCaptureTime` then has fewer than 4 year digits) and when its
//!   date arithmetic overflows (`24:00:00` on 9999-12-31, hours beyond any date); a time that is
//!   in year 10000 only in UTC (9999-12-31 at a negative offset) ends its whole run with a
//!   ValueError. Python's quirk of turning an unconvertible naive time in year 1 into 1970 is not
//!   copied: that image is rejected too.
//! * ISO-8601 date strings in EXIF date tags are accepted in the common forms only (see
//!   [`parse_exif_datetime`]); camera EXIF uses `YYYY:MM:DD HH:MM:SS`, which is fully covered.

use std::ops::Range;

use exif::{Exif, In, Reader, Tag, Value};
use serde::{Deserialize, Serialize};

use super::jpeg::{self, Fetch, MarkerWalk, WalkError};
use time::{Date, Duration, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// Why no metadata could be read from an image. Every message is a precise human reason,
/// suitable for the `rejected[].reason` of the status document.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExifError {
    /// The bytes do not start with a JPEG SOI marker.
    #[error("not a JPEG: {0}")]
    NotJpeg(String),
    /// The marker structure before the image data is broken.
    #[error("malformed JPEG: {0}")]
    MalformedJpeg(String),
    /// The JPEG has no APP1 `Exif` segment before its image data.
    #[error("no EXIF data: the JPEG has no APP1 Exif segment")]
    NoExif,
    /// The EXIF (TIFF) block cannot be decoded.
    #[error("corrupt EXIF: {0}")]
    CorruptExif(String),
    /// GPSLatitude/GPSLongitude are missing.
    #[error("no GPS position: {0}")]
    NoGps(String),
    /// The GPS tags are present but unusable (zero denominators, too few values, out of range).
    #[error("invalid GPS position: {0}")]
    InvalidGps(String),
    /// No usable capture time in the GPS or EXIF date tags.
    #[error("no capture time: none of GPSDateStamp+GPSTimeStamp, DateTimeOriginal, DateTimeDigitized or DateTime holds a valid date and time")]
    NoCaptureTime,
    /// The capture time parses but lies outside what a MAP* description can carry (see
    /// [`EARLIEST_CAPTURE_TIME`] and [`LATEST_CAPTURE_TIME`]), or its date arithmetic leaves the
    /// years 1–9999 (where mapillary_tools fails the image with an OverflowError).
    #[error("capture time out of range: {0}")]
    CaptureTimeOutOfRange(String),
    /// Latitude and longitude are both exactly 0.
    #[error("GPS position is (0, 0) (\"null island\"), which marks a missing GPS fix")]
    NullIsland,
    /// The file ends before the EXIF block (or the image data) does.
    #[error("truncated JPEG: the header needs at least {need} bytes but the file has {have}")]
    Truncated {
        /// Bytes available.
        have: usize,
        /// Bytes the header needs at least.
        need: usize,
    },
}

/// How much of a JPEG's head is needed to read its EXIF block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderExtent {
    /// The walk ended inside the given bytes: at the end of the APP1 `Exif` segment, or at the
    /// first SOS/EOI marker when there is no such segment before it.
    Complete {
        /// The TIFF block (after `Exif\0\0`) of the first APP1 Exif segment.
        exif: Option<Range<usize>>,
        /// Offset just past the Exif segment, or of the SOS/EOI marker when there is no Exif.
        header_end: usize,
    },
    /// The head ends inside the marker segments: fetch at least `at_least` bytes from the
    /// start of the file (always more than were given) and call again. When the object is
    /// shorter than that, the file is truncated ([`ExifError::Truncated`]).
    ///
    /// Each step asks for at most one more segment (≤ 64 KiB); callers should cap the total
    /// they are willing to fetch.
    NeedMore {
        /// Minimum prefix length for the next attempt.
        at_least: usize,
    },
}

/// Where the capture time came from (mapillary_tools' order of preference).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeSource {
    /// GPSDateStamp + GPSTimeStamp (UTC).
    Gps,
    /// DateTimeOriginal + SubSecTimeOriginal + OffsetTimeOriginal.
    DateTimeOriginal,
    /// DateTimeDigitized + SubSecTimeDigitized + OffsetTimeDigitized.
    DateTimeDigitized,
    /// DateTime (ModifyDate) + SubSecTime + OffsetTime.
    DateTime,
}

/// Capture metadata of one image, as mapillary_tools extracts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageMetadata {
    /// WGS84 degrees, negative in the south.
    pub lat: f64,
    /// WGS84 degrees, negative in the west.
    pub lon: f64,
    /// Metres; negative below sea level (GPSAltitudeRef 1).
    pub altitude: Option<f64>,
    /// UTC instant with microsecond precision (like mapillary_tools' Python datetimes); the
    /// MAP* description truncates it to milliseconds.
    #[serde(with = "time::serde::rfc3339")]
    pub captured_at: OffsetDateTime,
    /// Which tags [`Self::captured_at`] came from.
    pub time_source: TimeSource,
    /// Degrees: GPSImgDirection, else GPSTrack (as mapillary_tools), else `None`.
    pub heading: Option<f64>,
    /// 0th-IFD Make (else LensMake), whitespace-trimmed.
    pub make: Option<String>,
    /// 0th-IFD Model (else LensModel), whitespace-trimmed.
    pub model: Option<String>,
    /// EXIF orientation 1–8; 1 when missing or invalid.
    pub orientation: u16,
    /// ImageWidth, else PixelXDimension.
    pub width: Option<u32>,
    /// ImageLength, else PixelYDimension.
    pub height: Option<u32>,
    /// BodySerialNumber and LensSerialNumber, alphanumerics only, joined by `_`
    /// (mapillary_tools' `MAPCameraUUID`).
    pub camera_uuid: Option<String>,
}

/// Walks the JPEG marker segments in `head` (a prefix of the file) up to the APP1 Exif segment,
/// with the shared walker [`jpeg::walk_markers`] (on to SOS/EOI), asking for whole segments at a
/// time ([`Fetch::WholeSegments`]).
///
/// Errors: [`ExifError::NotJpeg`] (empty, or another format's signature) and
/// [`ExifError::MalformedJpeg`] (broken marker structure).
pub fn header_extent(head: &[u8]) -> Result<HeaderExtent, ExifError> {
    if head.is_empty() {
        return Err(ExifError::NotJpeg("the file is empty (0 bytes)".into()));
    }
    match jpeg::walk_markers(head, Fetch::WholeSegments) {
        Ok(MarkerWalk::Exif(seg)) => Ok(HeaderExtent::Complete {
            header_end: seg.segment.end,
            exif: Some(seg.tiff),
        }),
        Ok(MarkerWalk::NoExif(stop)) => Ok(HeaderExtent::Complete {
            exif: None,
            header_end: stop.at,
        }),
        Ok(MarkerWalk::NeedMore { at_least }) => Ok(HeaderExtent::NeedMore { at_least }),
        Err(WalkError::NoSoi) => Err(ExifError::NotJpeg(describe_signature(head))),
        Err(WalkError::NotAMarker { at, found }) => Err(ExifError::MalformedJpeg(format!(
            "expected a marker at byte {at}, found 0x{found:02X}"
        ))),
        Err(WalkError::InvalidMarker { at, code: 0x00, .. }) => Err(ExifError::MalformedJpeg(format!(
            "stuffed byte 0xFF00 at byte {at} outside the image data"
        ))),
        Err(WalkError::InvalidMarker { at, .. }) => Err(ExifError::MalformedJpeg(format!(
            "second start-of-image marker at byte {at}"
        ))),
        Err(WalkError::BadLength { at, code, len, .. }) => Err(ExifError::MalformedJpeg(format!(
            "segment 0xFF{code:02X} at byte {at} has an invalid length {len}"
        ))),
    }
}

/// What a non-JPEG file looks like, for the rejection reason.
fn describe_signature(head: &[u8]) -> String {
    let what = if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("PNG")
    } else if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
        Some("GIF")
    } else if head.starts_with(b"II*\0") || head.starts_with(b"MM\0*") {
        Some("TIFF")
    } else if head.starts_with(b"RIFF") && head.get(8..12) == Some(b"WEBP") {
        Some("WebP")
    } else if head.get(4..8) == Some(b"ftyp") {
        Some("ISO-BMFF (HEIC/AVIF/MP4)")
    } else if head.starts_with(b"%PDF") {
        Some("PDF")
    } else if head.starts_with(b"BM") {
        Some("BMP")
    } else {
        None
    };
    let first: Vec<String> = head.iter().take(4).map(|b| format!("{b:02X}")).collect();
    match what {
        Some(kind) => format!(
            "the file has a {kind} signature (starts with {})",
            first.join(" ")
        ),
        None => format!(
            "the file starts with {} instead of the JPEG start-of-image FF D8",
            first.join(" ")
        ),
    }
}

/// Reads the capture metadata from `head`, which must contain the whole EXIF block
/// (see [`header_extent`]); when `head` is the whole file and that is not enough, the
/// file is truncated ([`ExifError::Truncated`]).
pub fn read_metadata(head: &[u8]) -> Result<ImageMetadata, ExifError> {
    let tiff = match header_extent(head)? {
        HeaderExtent::NeedMore { at_least } => {
            return Err(ExifError::Truncated {
                have: head.len(),
                need: at_least,
            })
        }
        HeaderExtent::Complete { exif: None, .. } => return Err(ExifError::NoExif),
        HeaderExtent::Complete {
            exif: Some(range), ..
        } => &head[range],
    };
    read_tiff_metadata(tiff)
}

/// Like [`read_metadata`], for a bare TIFF/EXIF block (what follows `Exif\0\0`).
pub fn read_tiff_metadata(tiff: &[u8]) -> Result<ImageMetadata, ExifError> {
    // Lenient parse, like exifread: keep what could be read, and only blame the corruption
    // when it cost us a field we need.
    let (exif, parse_errors) = match Reader::new().continue_on_error(true).read_raw(tiff.to_vec()) {
        Ok(exif) => (exif, Vec::new()),
        Err(exif::Error::PartialResult(partial)) => {
            let (exif, errors) = partial.into_inner();
            (exif, errors.iter().map(|e| e.to_string()).collect())
        }
        Err(e) => return Err(ExifError::CorruptExif(e.to_string())),
    };
    let corrupt =
        |missing: &str| ExifError::CorruptExif(format!("{missing} unreadable: {}", parse_errors.join("; ")));
    if !parse_errors.is_empty() {
        tracing::warn!(errors = ?parse_errors, "EXIF block partly unreadable");
    }

    let (lat, lon) = match extract_lat_lon(&exif) {
        Ok(v) => v,
        Err(ExifError::NoGps(_)) if !parse_errors.is_empty() => return Err(corrupt("GPS")),
        Err(e) => return Err(e),
    };
    let (captured_at, time_source) = match extract_capture_time(&exif)? {
        Some(v) => v,
        None if !parse_errors.is_empty() => return Err(corrupt("capture time")),
        None => return Err(ExifError::NoCaptureTime),
    };
    if lat == 0.0 && lon == 0.0 {
        return Err(ExifError::NullIsland);
    }
    if !(-90.0..=90.0).contains(&lat) {
        return Err(ExifError::InvalidGps(format!(
            "latitude {lat} is outside -90..90"
        )));
    }
    if !(-180.0..=180.0).contains(&lon) {
        return Err(ExifError::InvalidGps(format!(
            "longitude {lon} is outside -180..180"
        )));
    }

    let altitude = single_ratio(&exif, Tag::GPSAltitude).map(|alt| {
        // exifread: ref 1 → below sea level; missing or any other value → above.
        match uint(&exif, Tag::GPSAltitudeRef) {
            Some(1) => -alt,
            _ => alt,
        }
    });
    let heading = single_ratio(&exif, Tag::GPSImgDirection).or_else(|| single_ratio(&exif, Tag::GPSTrack));
    let make = ascii(&exif, Tag::Make)
        .or_else(|| ascii(&exif, Tag::LensMake))
        .map(|s| s.trim().to_string());
    let model = ascii(&exif, Tag::Model)
        .or_else(|| ascii(&exif, Tag::LensModel))
        .map(|s| s.trim().to_string());
    let orientation = match uint(&exif, Tag::Orientation) {
        Some(o @ 1..=8) => o as u16,
        _ => 1,
    };
    let width = uint(&exif, Tag::ImageWidth).or_else(|| uint(&exif, Tag::PixelXDimension));
    let height = uint(&exif, Tag::ImageLength).or_else(|| uint(&exif, Tag::PixelYDimension));
    let camera_uuid = {
        let parts: Vec<String> = [Tag::BodySerialNumber, Tag::LensSerialNumber]
            .into_iter()
            .filter_map(|t| ascii(&exif, t))
            .map(|s| s.chars().filter(|c| c.is_alphanumeric()).collect::<String>())
            .filter(|s| !s.is_empty())
            .collect();
        (!parts.is_empty()).then(|| parts.join("_"))
    };

    Ok(ImageMetadata {
        lat,
        lon,
        altitude,
        captured_at,
        time_source,
        heading,
        make,
        model,
        orientation,
        width,
        height,
        camera_uuid,
    })
}

fn field(exif: &Exif, tag: Tag) -> Option<&Value> {
    exif.get_field(tag, In::PRIMARY).map(|f| &f.value)
}

/// First string of an ASCII field (exifread keeps the bytes before the first NUL).
fn ascii(exif: &Exif, tag: Tag) -> Option<String> {
    match field(exif, tag)? {
        Value::Ascii(strings) => Some(
            strings
                .first()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .unwrap_or_default(),
        ),
        _ => None,
    }
}

fn uint(exif: &Exif, tag: Tag) -> Option<u32> {
    field(exif, tag)?.get_uint(0)
}

/// The i-th rational of a (S)RATIONAL field as f64; `None` for a zero denominator.
fn ratio_at(value: &Value, i: usize) -> Option<f64> {
    match value {
        Value::Rational(v) => v
            .get(i)
            .filter(|r| r.denom != 0)
            .map(|r| f64::from(r.num) / f64::from(r.denom)),
        Value::SRational(v) => v
            .get(i)
            .filter(|r| r.denom != 0)
            .map(|r| f64::from(r.num) / f64::from(r.denom)),
        _ => None,
    }
}

fn ratio_count(value: &Value) -> usize {
    match value {
        Value::Rational(v) => v.len(),
        Value::SRational(v) => v.len(),
        _ => 0,
    }
}

/// exifread `_extract_alternative_fields(.., float)`: exactly one rational, non-zero denominator.
fn single_ratio(exif: &Exif, tag: Tag) -> Option<f64> {
    let value = field(exif, tag)?;
    (ratio_count(value) == 1).then(|| ratio_at(value, 0)).flatten()
}

/// `exif_read.gps_to_decimal` + refs.
fn extract_lat_lon(exif: &Exif) -> Result<(f64, f64), ExifError> {
    let (lat_v, lon_v) = match (field(exif, Tag::GPSLatitude), field(exif, Tag::GPSLongitude)) {
        (Some(a), Some(b)) => (a, b),
        (None, None) => {
            return Err(ExifError::NoGps(
                "GPSLatitude and GPSLongitude are missing".into(),
            ))
        }
        (None, Some(_)) => return Err(ExifError::NoGps("GPSLatitude is missing".into())),
        (Some(_), None) => return Err(ExifError::NoGps("GPSLongitude is missing".into())),
    };
    let decimal = |name: &str, v: &Value| -> Result<f64, ExifError> {
        if ratio_count(v) < 3 {
            return Err(ExifError::InvalidGps(format!(
                "{name} needs 3 rationals (degrees, minutes, seconds), found {}",
                ratio_count(v)
            )));
        }
        match (ratio_at(v, 0), ratio_at(v, 1), ratio_at(v, 2)) {
            (Some(d), Some(m), Some(s)) => Ok(d + m / 60.0 + s / 3600.0),
            _ => Err(ExifError::InvalidGps(format!("{name} has a zero denominator"))),
        }
    };
    let mut lon = decimal("GPSLongitude", lon_v)?;
    if ascii(exif, Tag::GPSLongitudeRef).is_some_and(|r| r.to_uppercase() == "W") {
        lon *= -1.0;
    }
    let mut lat = decimal("GPSLatitude", lat_v)?;
    if ascii(exif, Tag::GPSLatitudeRef).is_some_and(|r| r.to_uppercase() == "S") {
        lat *= -1.0;
    }
    Ok((lat, lon))
}

/// The earliest capture time a MAP* description can carry: mapillary_tools writes
/// `MAPCaptureTime` with `strftime("%Y_…")`, which gives years before 1000 fewer than 4 digits,
/// and its schema (`[0-9]{4}_…`) then rejects the image.
pub const EARLIEST_CAPTURE_TIME: OffsetDateTime = time::macros::datetime!(1000-01-01 00:00:00 UTC);
/// The latest capture time a MAP* description can carry (Python's `datetime.MAXYEAR` is 9999;
/// mapillary_tools fails on anything later).
pub const LATEST_CAPTURE_TIME: OffsetDateTime = time::macros::datetime!(9999-12-31 23:59:59.999_999 UTC);

/// Whether `at` lies in [`EARLIEST_CAPTURE_TIME`]..=[`LATEST_CAPTURE_TIME`].
pub fn capture_time_in_range(at: OffsetDateTime) -> bool {
    (EARLIEST_CAPTURE_TIME..=LATEST_CAPTURE_TIME).contains(&at)
}

/// The rejection for a capture time outside the MAP* range; `what` names the tags and values.
fn time_out_of_range(what: &str) -> ExifError {
    ExifError::CaptureTimeOutOfRange(format!(
        "{what} is not between 1000-01-01 and 9999-12-31 in UTC; correct the camera clock or the image's EXIF date"
    ))
}

/// `ExifReadFromEXIF.extract_capture_time`: GPS stamps (unless 1970-01-01), then the three
/// EXIF date tags, each with its SubSec and Offset tags; the first that parses wins.
///
/// A value that parses but whose date arithmetic leaves Python's years 1–9999 (e.g. `24:00:00`
/// on 9999-12-31, an offset that pushes 9999-12-31 past midnight UTC, a GPSTimeStamp of a
/// million hours) fails the image, as mapillary_tools' OverflowError/ValueError does, with
/// [`ExifError::CaptureTimeOutOfRange`]; so does a result outside the MAP* range (see
/// [`EARLIEST_CAPTURE_TIME`]).
fn extract_capture_time(exif: &Exif) -> Result<Option<(OffsetDateTime, TimeSource)>, ExifError> {
    let in_range = |dt: OffsetDateTime, source: TimeSource, what: &dyn Fn() -> String| {
        if capture_time_in_range(dt) {
            Ok(Some((dt, source)))
        } else {
            Err(time_out_of_range(&what()))
        }
    };
    let gps_what = || {
        let date = ascii(exif, Tag::GPSDateStamp).unwrap_or_default();
        let time = match field(exif, Tag::GPSTimeStamp) {
            Some(v) => (0..3)
                .map(|i| ratio_at(v, i).map_or_else(|| "?".to_string(), |x| x.to_string()))
                .collect::<Vec<_>>()
                .join(":"),
            None => "?".into(),
        };
        format!("GPSDateStamp {date:?} with GPSTimeStamp {time}")
    };
    match gps_datetime(exif) {
        Ok(Some(dt))
            if dt.date() != Date::from_calendar_date(1970, Month::January, 1).unwrap_or(Date::MIN) =>
        {
            return in_range(dt, TimeSource::Gps, &gps_what);
        }
        Ok(_) => {}
        Err(OutOfRange) => return Err(time_out_of_range(&gps_what())),
    }
    let candidates = [
        (
            Tag::DateTimeOriginal,
            Tag::SubSecTimeOriginal,
            Tag::OffsetTimeOriginal,
            TimeSource::DateTimeOriginal,
        ),
        (
            Tag::DateTimeDigitized,
            Tag::SubSecTimeDigitized,
            Tag::OffsetTimeDigitized,
            TimeSource::DateTimeDigitized,
        ),
        (
            Tag::DateTime,
            Tag::SubSecTime,
            Tag::OffsetTime,
            TimeSource::DateTime,
        ),
    ];
    for (dt_tag, subsec_tag, offset_tag, source) in candidates {
        let Some(dtstr) = ascii(exif, dt_tag) else {
            continue;
        };
        // GoPro pads sub-seconds with spaces (mapillary_tools issue 388).
        let subsec = ascii(exif, subsec_tag).map(|s| if s.is_empty() { s } else { s.replace(' ', "0") });
        let offset = ascii(exif, offset_tag);
        let what = || match &offset {
            Some(o) => format!("{dt_tag} {dtstr:?} with {offset_tag} {o:?}"),
            None => format!("{dt_tag} {dtstr:?}"),
        };
        match parse_exif_datetime(&dtstr, subsec.as_deref(), offset.as_deref()) {
            Ok(Some(dt)) => return in_range(dt, source, &what),
            Ok(None) => continue,
            Err(DateTimeError::SubSec(reason)) => {
                return Err(ExifError::CorruptExif(format!("{dt_tag}: {reason}")));
            }
            Err(DateTimeError::OutOfRange) => return Err(time_out_of_range(&what())),
        }
    }
    Ok(None)
}

/// Date/time arithmetic that leaves what Python's `datetime`/`timedelta` hold (years 1–9999,
/// ±999,999,999 days; offsets strictly within ±24 h): mapillary_tools raises there and the image
/// fails, so it is an error here too, never a wrapped or clamped value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OutOfRange;

/// `Ok(None)`: not parseable (the next tag is tried); `Err`: parseable but out of range.
type Parsed<T> = Result<Option<T>, OutOfRange>;

/// Why [`parse_exif_datetime`] cannot give an instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DateTimeError {
    /// The sub-second tag is not a number (mapillary_tools fails the image then too).
    SubSec(String),
    /// The date, time or offset is readable but the instant lies outside the years 1–9999 (in
    /// local time or in UTC), or the offset is not within ±24 h.
    OutOfRange,
}

/// `ExifReadFromEXIF.extract_gps_datetime`: GPSDateStamp (`%Y:%m:%d` or `%Y-%m-%d`) plus the
/// GPSTimeStamp rationals (hours and minutes truncated to integers), UTC.
fn gps_datetime(exif: &Exif) -> Parsed<OffsetDateTime> {
    let Some(datestr) = ascii(exif, Tag::GPSDateStamp) else {
        return Ok(None);
    };
    let Some(date) = parse_ymd(&datestr, ':').or_else(|| parse_ymd(&datestr, '-')) else {
        return Ok(None);
    };
    let Some(ts) = field(exif, Tag::GPSTimeStamp) else {
        return Ok(None);
    };
    if ratio_count(ts) < 3 {
        return Ok(None);
    }
    let (Some(h), Some(m), Some(s)) = (ratio_at(ts, 0), ratio_at(ts, 1), ratio_at(ts, 2)) else {
        return Ok(None);
    };
    // Ratios of 32-bit integers: finite, and their integer parts fit an i64.
    let delta = timedelta(h.trunc() as i64, m.trunc() as i64, s)?;
    Ok(Some(add_to_midnight(date, delta)?.assume_utc()))
}

/// `datetime(date) + delta`, which raises OverflowError outside the years 1–9999.
fn add_to_midnight(date: Date, delta: Duration) -> Result<PrimitiveDateTime, OutOfRange> {
    PrimitiveDateTime::new(date, Time::MIDNIGHT)
        .checked_add(delta)
        .filter(|dt| dt.year() >= 1)
        .ok_or(OutOfRange)
}

/// Python's `timedelta.max.days`.
const PY_TIMEDELTA_MAX_DAYS: i64 = 999_999_999;

/// Python `datetime.timedelta(hours=h, minutes=m, seconds=s)`: the fraction of `s` rounded to
/// microseconds, half to even. Beyond ±999,999,999 days, or for a non-finite `s`, Python raises.
fn timedelta(h: i64, m: i64, s: f64) -> Result<Duration, OutOfRange> {
    let whole = s.trunc();
    if !whole.is_finite() || whole.abs() >= 1e15 {
        return Err(OutOfRange);
    }
    let frac_us = ((s - whole) * 1e6).round_ties_even();
    // |whole| < 1e15, so the cast is exact.
    let secs = h
        .checked_mul(3600)
        .and_then(|hs| hs.checked_add(m.checked_mul(60)?))
        .and_then(|v| v.checked_add(whole as i64))
        .ok_or(OutOfRange)?;
    if secs.unsigned_abs() >= (PY_TIMEDELTA_MAX_DAYS as u64 + 1) * 86_400 {
        return Err(OutOfRange);
    }
    // |frac_us| < 1e6.
    Duration::seconds(secs)
        .checked_add(Duration::microseconds(frac_us as i64))
        .ok_or(OutOfRange)
}

/// `strptime(s, "%Y{sep}%m{sep}%d")`: a 4-digit year from 1 (Python's `MINYEAR`), 1–2 digit
/// month and day, a valid date.
fn parse_ymd(s: &str, sep: char) -> Option<Date> {
    let mut parts = s.split(sep);
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || !(1..=2).contains(&m.len()) || !(1..=2).contains(&d.len()) {
        return None;
    }
    if ![y, m, d].iter().all(|p| p.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let year: i32 = y.parse().ok()?;
    if year < 1 {
        return None;
    }
    let month = Month::try_from(m.parse::<u8>().ok()?).ok()?;
    Date::from_calendar_date(year, month, d.parse().ok()?).ok()
}

/// Python `int()` of a decimal string: optional sign, ASCII digits (surrounding blanks allowed).
/// `None`: not an integer (Python's ValueError); `Some(Err)`: an integer beyond i64, which is
/// far beyond what any `timedelta` it feeds can hold (Python's OverflowError later).
fn py_int(s: &str) -> Option<Result<i64, OutOfRange>> {
    let t = s.trim();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(t.parse().map_err(|_| OutOfRange))
}

/// Python `float()` of a plain decimal string (no exponent/inf/nan forms are expected here).
fn py_float(s: &str) -> Option<f64> {
    let t = s.trim();
    let body = t.strip_prefix(['+', '-']).unwrap_or(t);
    let ok = !body.is_empty()
        && body.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && body.bytes().filter(|b| *b == b'.').count() <= 1
        && body.bytes().any(|b| b.is_ascii_digit());
    if ok {
        t.parse().ok()
    } else {
        None
    }
}

/// `exif_read.parse_timestr_as_timedelta`: `H`, `H:M` or `H:M:S[.f]` (further parts ignored).
fn parse_timestr(s: &str) -> Parsed<Duration> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    // Python parses all parts first (ValueError → None), then builds the timedelta (which can raise).
    let (h, m, sec) = match parts.as_slice() {
        [h] => (py_int(h), Some(Ok(0)), Some(0.0)),
        [h, m] => (py_int(h), py_int(m), Some(0.0)),
        [h, m, s, ..] => (py_int(h), py_int(m), py_float(s)),
        [] => return Ok(None),
    };
    let (Some(h), Some(m), Some(sec)) = (h, m, sec) else {
        return Ok(None);
    };
    timedelta(h?, m?, sec).map(Some)
}

/// A UTC offset from a duration, folded into (-24 h, 24 h) like `make_valid_timezone_offset`.
fn offset_from(delta: Duration) -> Option<UtcOffset> {
    let day = 86_400;
    let mut secs = delta.whole_seconds();
    if secs >= day {
        secs = secs.rem_euclid(day);
    } else if secs <= -day {
        secs = -((-secs).rem_euclid(day));
    }
    UtcOffset::from_whole_seconds(i32::try_from(secs).ok()?).ok()
}

/// `datetime.timezone(delta)` without folding: Python raises ValueError unless the offset is
/// strictly within ±24 h.
fn strict_offset(delta: Duration) -> Result<UtcOffset, OutOfRange> {
    let secs = delta.whole_seconds();
    if secs.unsigned_abs() >= 86_400 {
        return Err(OutOfRange);
    }
    i32::try_from(secs)
        .ok()
        .and_then(|s| UtcOffset::from_whole_seconds(s).ok())
        .ok_or(OutOfRange)
}

/// `exif_read.parse_datetimestr_with_subsec_and_offset` → UTC instant.
///
/// `dtstr` is `YYYY:MM:DD HH:MM:SS[.f][Z|±HH:MM]` (or with `-` date separators, or ISO
/// `YYYY-MM-DD[THH:MM[:SS[.f]]][Z|±HH:MM]`); `subsec` replaces the microseconds (padded or cut
/// to 6 digits); a parseable `offset` (`±HH:MM`) replaces any zone. No zone → UTC.
///
/// `Ok(None)`: the date string does not parse (the next tag is tried, as in mapillary_tools).
/// `Err`: the sub-second tag is not a number, or the value parses but lies outside what
/// Python's `datetime` holds (see [`DateTimeError`]); mapillary_tools fails the image then too.
/// The result is always a valid UTC instant (never a panic on the UTC conversion), but may still
/// be outside the MAP* range ([`capture_time_in_range`]).
pub fn parse_exif_datetime(
    dtstr: &str,
    subsec: Option<&str>,
    offset: Option<&str>,
) -> Result<Option<OffsetDateTime>, DateTimeError> {
    let Some((mut dt, mut zone)) =
        parse_datetime_str(dtstr.trim()).map_err(|OutOfRange| DateTimeError::OutOfRange)?
    else {
        return Ok(None);
    };
    if let Some(subsec) = subsec {
        let mut s: String = subsec.trim().to_string();
        if s.chars().count() < 6 {
            s.push_str("000000");
        }
        let first6: String = s.chars().take(6).collect();
        // Six characters at most: always fits an i64.
        let us = py_int(&first6)
            .and_then(Result::ok)
            .ok_or_else(|| DateTimeError::SubSec(format!("sub-second value {subsec:?} is not a number")))?
            .rem_euclid(1_000_000);
        dt = dt
            .replace_microsecond(us as u32)
            .map_err(|e| DateTimeError::SubSec(format!("sub-second value {subsec:?}: {e}")))?;
    }
    if let Some(offset) = offset {
        let o = offset.trim();
        let delta = if let Some(rest) = o.strip_prefix('+') {
            parse_timestr(rest)
        } else if let Some(rest) = o.strip_prefix('-') {
            parse_timestr(rest).map(|d| d.map(|d| -d))
        } else {
            parse_timestr(o)
        };
        let delta = delta.map_err(|OutOfRange| DateTimeError::OutOfRange)?;
        if let Some(off) = delta.and_then(offset_from) {
            zone = Some(off);
        }
    }
    let zone = zone.unwrap_or(UtcOffset::UTC);
    // 9999-12-31 23:59:59 at -01:00 is in year 10000 in UTC: out of range, not a panic.
    dt.assume_offset(zone)
        .checked_to_offset(UtcOffset::UTC)
        .map(Some)
        .ok_or(DateTimeError::OutOfRange)
}

/// `parse_gps_datetime(dtstr, default_tz=None)`: ISO first, then "date time" split on blanks.
fn parse_datetime_str(s: &str) -> Parsed<(PrimitiveDateTime, Option<UtcOffset>)> {
    if let Some(v) = parse_iso(s) {
        return Ok(Some(v));
    }
    let mut it = s.split_whitespace();
    let (Some(datestr), Some(timestr)) = (it.next(), it.next()) else {
        return Ok(None);
    };
    parse_date_and_time(datestr, timestr)
}

/// `parse_gps_datetime_separately`.
fn parse_date_and_time(datestr: &str, timestr: &str) -> Parsed<(PrimitiveDateTime, Option<UtcOffset>)> {
    let datestr = datestr.trim();
    let Some(date) = parse_ymd(datestr, ':').or_else(|| parse_ymd(datestr, '-')) else {
        return Ok(None);
    };
    let timestr = timestr.trim();
    let (timepart, zone) = if let Some(t) = timestr.strip_suffix('Z') {
        (t, Some(UtcOffset::UTC))
    } else if let Some(idx) = timestr.find('+').or_else(|| timestr.find('-')) {
        let sign = if timestr.as_bytes()[idx] == b'-' { -1 } else { 1 };
        // `datetime.timezone(delta)` (no folding here): ±24 h or more raises.
        let zone = match parse_timestr(&timestr[idx + 1..])? {
            Some(d) => Some(strict_offset(d * sign)?),
            None => None,
        };
        (&timestr[..idx], zone)
    } else {
        (timestr, None)
    };
    let Some(delta) = parse_timestr(timepart)? else {
        return Ok(None);
    };
    Ok(Some((add_to_midnight(date, delta)?, zone)))
}

/// The common subset of Python 3.11 `datetime.fromisoformat`: `YYYY-MM-DD`, optionally
/// followed by `T` or a space and `HH:MM[:SS[.ffffff]]` and `Z`/`±HH:MM[:SS]` (strictly within
/// ±24 h). Anything else is not ISO (`None`), as `fromisoformat` raises ValueError.
fn parse_iso(s: &str) -> Option<(PrimitiveDateTime, Option<UtcOffset>)> {
    let b = s.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let date = parse_ymd(s.get(..10)?, '-')?;
    if s.get(5..7)?.len() != 2 || s.get(8..10)?.len() != 2 {
        return None;
    }
    if b.len() == 10 {
        return Some((PrimitiveDateTime::new(date, Time::MIDNIGHT), None));
    }
    if b[10] != b'T' && b[10] != b' ' {
        return None;
    }
    let rest = s.get(11..)?;
    let (time_str, zone) = match rest.find(['Z', '+', '-']) {
        Some(i) if rest.as_bytes()[i] == b'Z' && i + 1 == rest.len() => (&rest[..i], Some(UtcOffset::UTC)),
        Some(i) if rest.as_bytes()[i] != b'Z' => {
            let sign = if rest.as_bytes()[i] == b'-' { -1 } else { 1 };
            let z = rest.get(i + 1..)?;
            let zb = z.as_bytes();
            if zb.len() < 5 || zb[2] != b':' {
                return None;
            }
            let delta = parse_timestr(z).ok()?? * sign;
            (&rest[..i], Some(strict_offset(delta).ok()?))
        }
        Some(_) => return None,
        None => (rest, None),
    };
    // HH:MM[:SS[.ffffff]] with 2-digit fields.
    let tb = time_str.as_bytes();
    if tb.len() < 5 || tb[2] != b':' || (tb.len() > 5 && (tb.len() < 8 || tb[5] != b':')) {
        return None;
    }
    let h: u8 = time_str.get(0..2)?.parse().ok()?;
    let m: u8 = time_str.get(3..5)?.parse().ok()?;
    let (sec, us) = if tb.len() > 5 {
        let sec: u8 = time_str.get(6..8)?.parse().ok()?;
        let us = match time_str.get(8..) {
            Some("") | None => 0,
            Some(f) => {
                let digits = f.strip_prefix(['.', ','])?;
                if digits.is_empty() || digits.len() > 6 || !digits.bytes().all(|c| c.is_ascii_digit()) {
                    return None;
                }
                format!("{digits:0<6}").parse().ok()?
            }
        };
        (sec, us)
    } else {
        (0, 0)
    };
    let time = Time::from_hms_micro(h, m, sec, us).ok()?;
    Some((PrimitiveDateTime::new(date, time), zone))
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_fixtures::{jpeg, ImageSpec, TimeTags};
    use time::macros::datetime;

    fn spec() -> ImageSpec {
        ImageSpec::new(50.896_6, -0.559_1, datetime!(2024-05-01 10:00:00.257 UTC))
    }

    #[test]
    fn reads_fixture_little_and_big_endian() {
        for big in [false, true] {
            let mut s = spec();
            s.big_endian = big;
            s.altitude = Some(-12.5);
            s.heading = Some(133.54);
            s.orientation = Some(6);
            let m = read_metadata(&jpeg(&s)).expect("metadata");
            assert!((m.lat - 50.896_6).abs() < 1e-9, "{}", m.lat);
            assert!((m.lon + 0.559_1).abs() < 1e-9, "{}", m.lon);
            assert_eq!(m.altitude, Some(-12.5));
            assert_eq!(m.heading, Some(133.54));
            assert_eq!(m.captured_at, datetime!(2024-05-01 10:00:00.257 UTC));
            assert_eq!(m.time_source, TimeSource::Gps);
            assert_eq!(m.make.as_deref(), Some("TestMake"));
            assert_eq!(m.model.as_deref(), Some("TestModel"));
            assert_eq!(m.orientation, 6);
            assert_eq!((m.width, m.height), (Some(64), Some(48)));
        }
    }

    #[test]
    fn datetime_original_with_offset_and_without() {
        let mut s = spec();
        s.time_tags = TimeTags::DateTimeOriginal {
            offset: Some("+02:00".into()),
        };
        let m = read_metadata(&jpeg(&s)).expect("metadata");
        assert_eq!(m.time_source, TimeSource::DateTimeOriginal);
        assert_eq!(m.captured_at, datetime!(2024-05-01 10:00:00.257 UTC));

        s.time_tags = TimeTags::DateTimeOriginal { offset: None };
        let m = read_metadata(&jpeg(&s)).expect("metadata");
        assert_eq!(m.captured_at, datetime!(2024-05-01 10:00:00.257 UTC));
    }

    #[test]
    fn invalid_orientation_becomes_1() {
        let mut s = spec();
        s.orientation = Some(9);
        assert_eq!(read_metadata(&jpeg(&s)).expect("metadata").orientation, 1);
        s.orientation = None;
        assert_eq!(read_metadata(&jpeg(&s)).expect("metadata").orientation, 1);
    }

    #[test]
    fn rejections() {
        let mut s = spec();
        s.with_gps = false;
        assert!(matches!(read_metadata(&jpeg(&s)), Err(ExifError::NoGps(_))));

        let mut s = spec();
        s.lat = 0.0;
        s.lon = 0.0;
        assert_eq!(read_metadata(&jpeg(&s)), Err(ExifError::NullIsland));

        assert!(matches!(read_metadata(b""), Err(ExifError::NotJpeg(m)) if m.contains("empty")));
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert!(matches!(read_metadata(png), Err(ExifError::NotJpeg(m)) if m.contains("PNG")));

        let full = jpeg(&spec());
        assert!(matches!(
            read_metadata(&full[..40]),
            Err(ExifError::Truncated { have: 40, .. })
        ));
        // SOI directly followed by SOS: a JPEG without EXIF.
        assert_eq!(
            read_metadata(&[0xFF, 0xD8, 0xFF, 0xDA, 0, 2]),
            Err(ExifError::NoExif)
        );
        assert!(matches!(
            read_metadata(&[0xFF, 0xD8, 0x12, 0x34]),
            Err(ExifError::MalformedJpeg(_))
        ));
    }

    #[test]
    fn no_capture_time() {
        // Only GPS position, no time at all: build the TIFF via the fixture with a GPS-only
        // time and then break the date stamp.
        let mut s = spec();
        s.time_tags = TimeTags::Gps;
        let mut bytes = jpeg(&s);
        let pos = bytes
            .windows(10)
            .position(|w| w == b"2024:05:01")
            .expect("GPSDateStamp in the file");
        bytes[pos..pos + 10].copy_from_slice(b"2024:13:01");
        assert_eq!(read_metadata(&bytes), Err(ExifError::NoCaptureTime));
    }

    #[test]
    fn gps_date_1970_falls_back_to_datetime_original() {
        let mut s = spec();
        s.time_tags = TimeTags::Both {
            offset: Some("-05:00".into()),
        };
        let mut bytes = jpeg(&s);
        let pos = bytes
            .windows(10)
            .position(|w| w == b"2024:05:01")
            .expect("date in the file");
        // The first occurrence is DateTimeOriginal (Exif IFD precedes the GPS IFD) or the GPS
        // date; patch every GPSDateStamp-looking occurrence that is not followed by a time.
        let mut patched = false;
        let mut i = pos;
        while let Some(off) = bytes[i..].windows(10).position(|w| w == b"2024:05:01") {
            let at = i + off;
            if bytes.get(at + 10) == Some(&0) {
                bytes[at..at + 10].copy_from_slice(b"1970:01:01");
                patched = true;
            }
            i = at + 10;
        }
        assert!(patched);
        let m = read_metadata(&bytes).expect("metadata");
        assert_eq!(m.time_source, TimeSource::DateTimeOriginal);
        assert_eq!(m.captured_at, datetime!(2024-05-01 10:00:00.257 UTC));
    }

    #[test]
    fn header_extent_asks_for_more_until_complete() {
        let mut s = spec();
        s.pad_to = None;
        let full = jpeg(&s);
        let mut have = 1;
        let mut steps = 0;
        let (exif, end) = loop {
            steps += 1;
            assert!(steps < 20);
            match header_extent(&full[..have.min(full.len())]).expect("jpeg") {
                HeaderExtent::NeedMore { at_least } => {
                    assert!(at_least > have);
                    have = at_least;
                }
                HeaderExtent::Complete { exif, header_end } => break (exif, header_end),
            }
        };
        let exif = exif.expect("exif range");
        assert_eq!(&full[exif.start - 6..exif.start], b"Exif\0\0");
        assert_eq!(exif.end, end);
        assert!(end <= have);
    }

    #[test]
    fn exif_after_app0_and_xmp_app1() {
        let tiff_jpeg = jpeg(&spec());
        // Re-wrap: SOI, APP0 JFIF, APP1 XMP, then the original APP1 Exif and the rest.
        let mut out = vec![0xFF, 0xD8];
        let app0 = b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0";
        out.extend_from_slice(&[0xFF, 0xE0, 0, (app0.len() + 2) as u8]);
        out.extend_from_slice(app0);
        let xmp = b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>";
        out.extend_from_slice(&[0xFF, 0xE1, 0, (xmp.len() + 2) as u8]);
        out.extend_from_slice(xmp);
        out.extend_from_slice(&tiff_jpeg[2..]);
        let m = read_metadata(&out).expect("metadata");
        assert!((m.lat - 50.896_6).abs() < 1e-9);
    }

    #[test]
    fn corrupt_gps_ifd_offset_is_corrupt_exif() {
        let bytes = jpeg(&spec());
        let HeaderExtent::Complete { exif: Some(r), .. } = header_extent(&bytes).expect("jpeg") else {
            panic!("no exif")
        };
        // Find the GPSInfo pointer entry (tag 0x8825, LONG) in IFD0 (little endian) and point
        // it far outside the block.
        let tiff = &bytes[r.clone()];
        let entry = tiff
            .windows(4)
            .position(|w| w == [0x25, 0x88, 0x04, 0x00])
            .expect("GPS pointer entry");
        let mut broken = bytes.clone();
        let value_at = r.start + entry + 8;
        broken[value_at..value_at + 4].copy_from_slice(&0x00FF_FFF0u32.to_le_bytes());
        assert!(matches!(read_metadata(&broken), Err(ExifError::CorruptExif(_))));
    }

    #[test]
    fn out_of_range_coordinates_are_invalid_gps() {
        let at = |lat: f64, lon: f64| {
            let mut s = spec();
            s.lat = lat;
            s.lon = lon;
            read_metadata(&jpeg(&s))
        };
        assert_eq!(
            at(90.5, 10.0),
            Err(ExifError::InvalidGps("latitude 90.5 is outside -90..90".into()))
        );
        assert_eq!(
            at(-91.0, 10.0),
            Err(ExifError::InvalidGps("latitude -91 is outside -90..90".into()))
        );
        assert_eq!(
            at(10.0, 180.25),
            Err(ExifError::InvalidGps(
                "longitude 180.25 is outside -180..180".into()
            ))
        );
        assert_eq!(
            at(10.0, -200.0),
            Err(ExifError::InvalidGps(
                "longitude -200 is outside -180..180".into()
            ))
        );
        let edge = at(-90.0, 180.0).expect("the edges are valid");
        assert_eq!((edge.lat, edge.lon), (-90.0, 180.0));
    }

    /// The fixture with DateTimeOriginal only (and `offset`), its wall time replaced by `wall`
    /// (19 characters, like the `2024:05:01 HH:00:00` it replaces).
    fn with_dto(wall: &str, offset: Option<&str>) -> Vec<u8> {
        let mut s = spec();
        s.time_tags = TimeTags::DateTimeOriginal {
            offset: offset.map(str::to_string),
        };
        let mut bytes = jpeg(&s);
        let pos = bytes
            .windows(11)
            .position(|w| w == b"2024:05:01 ")
            .expect("DateTimeOriginal in the file");
        assert_eq!(wall.len(), 19);
        bytes[pos..pos + 19].copy_from_slice(wall.as_bytes());
        bytes
    }

    /// Issue 15: this file panicked in the UTC conversion (`to_offset`), aborting the whole batch.
    #[test]
    fn year_9999_with_a_negative_offset_is_rejected_not_a_panic() {
        let bytes = with_dto("9999:12:31 23:59:59", Some("-01:00"));
        assert_eq!(
            read_metadata(&bytes),
            Err(ExifError::CaptureTimeOutOfRange(
                "DateTimeOriginal \"9999:12:31 23:59:59\" with OffsetTimeOriginal \"-01:00\" is not between \
                 1000-01-01 and 9999-12-31 in UTC; correct the camera clock or the image's EXIF date"
                    .into()
            ))
        );
        assert_eq!(
            read_metadata(&bytes).map_err(|e| e.to_string()),
            Err("capture time out of range: DateTimeOriginal \"9999:12:31 23:59:59\" with OffsetTimeOriginal \
                 \"-01:00\" is not between 1000-01-01 and 9999-12-31 in UTC; correct the camera clock or the \
                 image's EXIF date"
                .to_string())
        );
        // The last instant of 9999 in UTC is still fine, at +01:00 too.
        let m = read_metadata(&with_dto("9999:12:31 23:59:59", None)).expect("last second");
        assert_eq!(m.captured_at, datetime!(9999-12-31 23:59:59.257 UTC));
        let m = read_metadata(&with_dto("9999:12:31 23:59:59", Some("+01:00"))).expect("an hour earlier");
        assert_eq!(m.captured_at, datetime!(9999-12-31 22:59:59.257 UTC));
    }

    #[test]
    fn capture_times_outside_1000_to_9999_utc_are_rejected() {
        let out_of_range = |r: Result<ImageMetadata, ExifError>| matches!(r, Err(ExifError::CaptureTimeOutOfRange(m)) if m.contains("not between 1000-01-01 and 9999-12-31"));
        // mapillary_tools writes years before 1000 with fewer than 4 digits; its schema rejects them.
        assert!(out_of_range(read_metadata(&with_dto(
            "0999:12:31 23:59:59",
            None
        ))));
        // 1000-01-01 00:30 at +01:00 is 0999-12-31 in UTC.
        assert!(out_of_range(read_metadata(&with_dto(
            "1000:01:01 00:30:00",
            Some("+01:00")
        ))));
        let m = read_metadata(&with_dto("1000:01:01 00:30:00", None)).expect("first year");
        assert_eq!(m.captured_at, datetime!(1000-01-01 00:30:00.257 UTC));
        // 0001-01-01 at +01:00 is in year 0 in UTC: no instant Python can hold.
        assert!(out_of_range(read_metadata(&with_dto(
            "0001:01:01 00:00:00",
            Some("+01:00")
        ))));
        // 24:00:00 on the last day rolls into year 10000 (Python: OverflowError, the image fails).
        assert!(out_of_range(read_metadata(&with_dto(
            "9999:12:31 24:00:00",
            None
        ))));
        // 99,999,999 hours: a valid timedelta, but past year 9999 once added.
        assert!(out_of_range(read_metadata(&with_dto(
            "2024:05:01 99999999",
            None
        ))));
        // Year 0 does not parse at all (Python's MINYEAR is 1): no capture time.
        assert_eq!(
            read_metadata(&with_dto("0000:01:01 00:00:00", None)),
            Err(ExifError::NoCaptureTime)
        );
    }

    #[test]
    fn gps_stamps_past_9999_are_rejected_not_skipped() {
        let mut s = spec();
        s.time_tags = TimeTags::Gps;
        let bytes = jpeg(&s);
        let pos = bytes
            .windows(10)
            .position(|w| w == b"2024:05:01")
            .expect("GPSDateStamp in the file");
        let mut late = bytes.clone();
        late[pos..pos + 10].copy_from_slice(b"9999:12:31");
        // 9999-12-31 10:00:00.257 is fine…
        let m = read_metadata(&late).expect("in range");
        assert_eq!(m.captured_at, datetime!(9999-12-31 10:00:00.257 UTC));
        assert_eq!(m.time_source, TimeSource::Gps);
        // …a GPSTimeStamp hour of 14 more days is not (Python: OverflowError in `dt + delta`).
        let tiff = &late[10..];
        let hours = tiff
            .windows(8)
            .position(|w| w == [10, 0, 0, 0, 1, 0, 0, 0])
            .expect("GPSTimeStamp hours 10/1");
        let mut over = late.clone();
        over[10 + hours] = 250;
        assert!(matches!(
            read_metadata(&over),
            Err(ExifError::CaptureTimeOutOfRange(m))
                if m.starts_with("GPSDateStamp \"9999:12:31\" with GPSTimeStamp 250:0:0.257 is not between")
        ));
        let mut early = bytes;
        early[pos..pos + 10].copy_from_slice(b"0999:05:01");
        assert!(matches!(
            read_metadata(&early),
            Err(ExifError::CaptureTimeOutOfRange(m)) if m.starts_with("GPSDateStamp \"0999:05:01\"")
        ));
    }

    #[test]
    fn offsets_and_hours_python_cannot_hold_fail_the_image() {
        let p = |d: &str, o: Option<&str>| parse_exif_datetime(d, None, o);
        // An inline zone must be strictly within ±24 h (`datetime.timezone`), ISO or not.
        assert_eq!(
            p("2021:07:15 15:37:30+25:00", None),
            Err(DateTimeError::OutOfRange)
        );
        assert_eq!(p("2021-07-15T15:37:30+25:00", None), Ok(None));
        // The OffsetTime tag is folded into ±24 h first (`make_valid_timezone_offset`).
        assert_eq!(
            p("2021:07:15 15:37:30", Some("+25:00")),
            Ok(Some(datetime!(2021-07-15 14:37:30 UTC)))
        );
        // …but a timedelta beyond 999,999,999 days raises in Python before any folding.
        assert_eq!(
            p("2021:07:15 15:37:30", Some("+99999999999999999999:00")),
            Err(DateTimeError::OutOfRange)
        );
        assert_eq!(
            p("2021:07:15 15:37:30", Some("+24000000000:00")),
            Err(DateTimeError::OutOfRange)
        );
        // A minute count too big for any date.
        assert_eq!(
            p("2021:07:15 00:99999999999999:00", None),
            Err(DateTimeError::OutOfRange)
        );
        // Not numbers at all: not a time (the next tag is tried).
        assert_eq!(p("2021:07:15 ab:00:00", None), Ok(None));
        assert_eq!(
            p("2021:07:15 15:37:30", Some("garbage")),
            Ok(Some(datetime!(2021-07-15 15:37:30 UTC)))
        );
    }

    #[test]
    fn datetime_parsing_rules() {
        let p = |d: &str, s: Option<&str>, o: Option<&str>| parse_exif_datetime(d, s, o);
        assert_eq!(
            p("2021:07:15 15:37:30", Some("12"), Some("+10:00")),
            Ok(Some(datetime!(2021-07-15 05:37:30.12 UTC)))
        );
        // Sub-seconds are cut to 6 digits and replace fractional seconds.
        assert_eq!(
            p("2021:07:15 15:37:30.9", Some("1234567"), None),
            Ok(Some(datetime!(2021-07-15 15:37:30.123456 UTC)))
        );
        // 24:00:00 rolls to the next day.
        assert_eq!(
            p("2021:07:15 24:00:00", None, Some("-01:30")),
            Ok(Some(datetime!(2021-07-16 01:30:00 UTC)))
        );
        assert_eq!(
            p("2021-07-15T15:37:30+10:00", None, None),
            Ok(Some(datetime!(2021-07-15 05:37:30 UTC)))
        );
        // An unparsable offset is ignored.
        assert_eq!(
            p("2021:07:15 15:37:30", None, Some("garbage")),
            Ok(Some(datetime!(2021-07-15 15:37:30 UTC)))
        );
        assert_eq!(p("0000:00:00 00:00:00", None, None), Ok(None));
        assert_eq!(p("not a date", None, None), Ok(None));
        assert!(matches!(
            p("2021:07:15 15:37:30", Some("ab"), None),
            Err(DateTimeError::SubSec(_))
        ));
    }
}
