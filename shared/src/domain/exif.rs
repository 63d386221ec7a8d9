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
//!   are rejected here ([`ExifError::InvalidGps`]) where mapillary_tools fails its schema check.
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

/// `ExifReadFromEXIF.extract_capture_time`: GPS stamps (unless 1970-01-01), then the three
/// EXIF date tags, each with its SubSec and Offset tags; the first that parses wins.
fn extract_capture_time(exif: &Exif) -> Result<Option<(OffsetDateTime, TimeSource)>, ExifError> {
    if let Some(dt) = gps_datetime(exif) {
        if dt.date() != Date::from_calendar_date(1970, Month::January, 1).unwrap_or(Date::MIN) {
            return Ok(Some((dt, TimeSource::Gps)));
        }
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
        match parse_exif_datetime(&dtstr, subsec.as_deref(), offset.as_deref()) {
            Ok(Some(dt)) => return Ok(Some((dt, source))),
            Ok(None) => continue,
            Err(reason) => {
                return Err(ExifError::CorruptExif(format!("{dt_tag}: {reason}")));
            }
        }
    }
    Ok(None)
}

/// `ExifReadFromEXIF.extract_gps_datetime`: GPSDateStamp (`%Y:%m:%d` or `%Y-%m-%d`) plus the
/// GPSTimeStamp rationals (hours and minutes truncated to integers), UTC.
fn gps_datetime(exif: &Exif) -> Option<OffsetDateTime> {
    let datestr = ascii(exif, Tag::GPSDateStamp)?;
    let date = parse_ymd(&datestr, ':').or_else(|| parse_ymd(&datestr, '-'))?;
    let ts = field(exif, Tag::GPSTimeStamp)?;
    if ratio_count(ts) < 3 {
        return None;
    }
    let h = ratio_at(ts, 0)?.trunc();
    let m = ratio_at(ts, 1)?.trunc();
    let s = ratio_at(ts, 2)?;
    let delta = timedelta(h, m, s)?;
    let dt = PrimitiveDateTime::new(date, Time::MIDNIGHT).checked_add(delta)?;
    Some(dt.assume_utc())
}

/// Python `datetime.timedelta(hours=h, minutes=m, seconds=s)`: rounded to microseconds,
/// half to even.
fn timedelta(h: f64, m: f64, s: f64) -> Option<Duration> {
    let whole = s.trunc();
    let frac_us = ((s - whole) * 1e6).round_ties_even();
    let total_us = (h * 3600.0 + m * 60.0 + whole) * 1e6 + frac_us;
    if !total_us.is_finite() || total_us.abs() > 1e17 {
        return None;
    }
    Some(Duration::microseconds(total_us as i64))
}

/// `strptime(s, "%Y{sep}%m{sep}%d")`: a 4-digit year, 1–2 digit month and day, a valid date.
fn parse_ymd(s: &str, sep: char) -> Option<Date> {
    let mut parts = s.split(sep);
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || !(1..=2).contains(&m.len()) || !(1..=2).contains(&d.len()) {
        return None;
    }
    if ![y, m, d].iter().all(|p| p.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let month = Month::try_from(m.parse::<u8>().ok()?).ok()?;
    Date::from_calendar_date(y.parse().ok()?, month, d.parse().ok()?).ok()
}

/// Python `int()` of a decimal string: optional sign, ASCII digits (surrounding blanks allowed).
fn py_int(s: &str) -> Option<i64> {
    let t = s.trim();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
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
fn parse_timestr(s: &str) -> Option<Duration> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    let (h, m, sec) = match parts.as_slice() {
        [h] => (py_int(h)?, 0, 0.0),
        [h, m] => (py_int(h)?, py_int(m)?, 0.0),
        [h, m, s, ..] => (py_int(h)?, py_int(m)?, py_float(s)?),
        [] => return None,
    };
    timedelta(h as f64, m as f64, sec)
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

/// `exif_read.parse_datetimestr_with_subsec_and_offset` → UTC instant.
///
/// `dtstr` is `YYYY:MM:DD HH:MM:SS[.f][Z|±HH:MM]` (or with `-` date separators, or ISO
/// `YYYY-MM-DD[THH:MM[:SS[.f]]][Z|±HH:MM]`); `subsec` replaces the microseconds (padded or cut
/// to 6 digits); a parseable `offset` (`±HH:MM`) replaces any zone. No zone → UTC.
///
/// `Ok(None)`: the date string does not parse (the next tag is tried, as in mapillary_tools).
/// `Err`: the sub-second tag is not a number (mapillary_tools fails the image then too).
pub fn parse_exif_datetime(
    dtstr: &str,
    subsec: Option<&str>,
    offset: Option<&str>,
) -> Result<Option<OffsetDateTime>, String> {
    let Some((mut dt, mut zone)) = parse_datetime_str(dtstr.trim()) else {
        return Ok(None);
    };
    if let Some(subsec) = subsec {
        let mut s: String = subsec.trim().to_string();
        if s.chars().count() < 6 {
            s.push_str("000000");
        }
        let first6: String = s.chars().take(6).collect();
        let us = py_int(&first6)
            .ok_or_else(|| format!("sub-second value {subsec:?} is not a number"))?
            .rem_euclid(1_000_000);
        dt = dt
            .replace_microsecond(us as u32)
            .map_err(|e| format!("sub-second value {subsec:?}: {e}"))?;
    }
    if let Some(offset) = offset {
        let o = offset.trim();
        let delta = if let Some(rest) = o.strip_prefix('+') {
            parse_timestr(rest)
        } else if let Some(rest) = o.strip_prefix('-') {
            parse_timestr(rest).map(|d| -d)
        } else {
            parse_timestr(o)
        };
        if let Some(off) = delta.and_then(offset_from) {
            zone = Some(off);
        }
    }
    let zone = zone.unwrap_or(UtcOffset::UTC);
    Ok(Some(dt.assume_offset(zone).to_offset(UtcOffset::UTC)))
}

/// `parse_gps_datetime(dtstr, default_tz=None)`: ISO first, then "date time" split on blanks.
fn parse_datetime_str(s: &str) -> Option<(PrimitiveDateTime, Option<UtcOffset>)> {
    if let Some(v) = parse_iso(s) {
        return Some(v);
    }
    let mut it = s.split_whitespace();
    let (datestr, timestr) = (it.next()?, it.next()?);
    parse_date_and_time(datestr, timestr)
}

/// `parse_gps_datetime_separately`.
fn parse_date_and_time(datestr: &str, timestr: &str) -> Option<(PrimitiveDateTime, Option<UtcOffset>)> {
    let datestr = datestr.trim();
    let date = parse_ymd(datestr, ':').or_else(|| parse_ymd(datestr, '-'))?;
    let timestr = timestr.trim();
    let (timepart, zone) = if let Some(t) = timestr.strip_suffix('Z') {
        (t, Some(UtcOffset::UTC))
    } else if let Some(idx) = timestr.find('+').or_else(|| timestr.find('-')) {
        let sign = if timestr.as_bytes()[idx] == b'-' { -1 } else { 1 };
        let zone = parse_timestr(&timestr[idx + 1..])
            .map(|d| d * sign)
            .and_then(offset_from);
        (&timestr[..idx], zone)
    } else {
        (timestr, None)
    };
    let delta = parse_timestr(timepart)?;
    let dt = PrimitiveDateTime::new(date, Time::MIDNIGHT).checked_add(delta)?;
    Some((dt, zone))
}

/// The common subset of Python 3.11 `datetime.fromisoformat`: `YYYY-MM-DD`, optionally
/// followed by `T` or a space and `HH:MM[:SS[.ffffff]]` and `Z`/`±HH:MM[:SS]`.
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
            let delta = parse_timestr(z)? * sign;
            (&rest[..i], Some(offset_from(delta)?))
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
        assert!(p("2021:07:15 15:37:30", Some("ab"), None).is_err());
    }
}
