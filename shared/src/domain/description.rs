//! The MAP* ImageDescription JSON that mapillary_tools 0.14.7 writes into every uploaded JPEG
//! (`serializer/description.py` `_as_image_desc` + `desc_file_to_exif`, `exif_write.py`
//! `add_image_description`), byte for byte:
//!
//! * compact (`,` and `:`), keys sorted, ASCII-only with `\uXXXX` escapes (Python
//!   `json.dumps(..., sort_keys=True, separators=(",", ":"))`);
//! * numbers as Python's `repr` of the rounded float: lat/lon `round(x, 7)`, altitude and heading
//!   `round(x, 3)` (half-to-even on the exact binary value, like Python);
//! * `MAPCaptureTime` in UTC as `%Y_%m_%d_%H_%M_%S_%f` with the last 3 digits cut (milliseconds
//!   truncated);
//! * no `MAPSequenceUUID` (description file only).
//!
//! [`validate`] implements `ImageDescriptionEXIFSchema` plus the `strptime` check of
//! `validate_image_desc`. [`map_description`] refuses metadata that no valid description can hold
//! ([`DescriptionError`]: non-finite numbers, coordinates or capture times out of range) instead of
//! writing a description the schema rejects — or panicking on an instant with no UTC form.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;
use time::{OffsetDateTime, UtcOffset};

use super::exif::{self, ImageMetadata};

const COORDINATES_PRECISION: usize = 7;
const ALTITUDE_PRECISION: usize = 3;
const ANGLE_PRECISION: usize = 3;

/// Why an image's metadata cannot be written as a MAP* description. mapillary_tools' schema (or
/// its `strftime`) would fail the image for each of these; the reasons name the field and value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DescriptionError {
    /// Latitude not finite or outside -90..=90 (`MAPLatitude` minimum/maximum).
    #[error("latitude {0} is not a number between -90 and 90")]
    Latitude(f64),
    /// Longitude not finite or outside -180..=180 (`MAPLongitude` minimum/maximum).
    #[error("longitude {0} is not a number between -180 and 180")]
    Longitude(f64),
    /// Altitude not finite (JSON has no NaN or infinity).
    #[error("altitude {0} is not a finite number")]
    Altitude(f64),
    /// Heading not finite.
    #[error("compass heading {0} is not a finite number")]
    Heading(f64),
    /// Capture time outside 1000-01-01..=9999-12-31 UTC (see
    /// [`crate::domain::exif::EARLIEST_CAPTURE_TIME`]).
    #[error(
        "capture time {0} is not between 1000-01-01 and 9999-12-31 in UTC; correct the camera clock or the image's EXIF date"
    )]
    CaptureTime(String),
}

/// Checks that `meta` can be written as a valid MAP* description (the ranges of
/// [`DescriptionError`]); [`map_description`] does this first.
pub fn check_describable(meta: &ImageMetadata) -> Result<(), DescriptionError> {
    if !meta.lat.is_finite() || !(-90.0..=90.0).contains(&meta.lat) {
        return Err(DescriptionError::Latitude(meta.lat));
    }
    if !meta.lon.is_finite() || !(-180.0..=180.0).contains(&meta.lon) {
        return Err(DescriptionError::Longitude(meta.lon));
    }
    if let Some(alt) = meta.altitude.filter(|a| !a.is_finite()) {
        return Err(DescriptionError::Altitude(alt));
    }
    if let Some(h) = meta.heading.filter(|h| !h.is_finite()) {
        return Err(DescriptionError::Heading(h));
    }
    utc_in_range(meta.captured_at)?;
    Ok(())
}

/// `at` in UTC, if within the MAP* range (checked conversion: an instant near the limits of
/// `time` with a non-UTC offset has no UTC representation and must not panic).
fn utc_in_range(at: OffsetDateTime) -> Result<OffsetDateTime, DescriptionError> {
    at.checked_to_offset(UtcOffset::UTC)
        .filter(|t| exif::capture_time_in_range(*t))
        .ok_or_else(|| DescriptionError::CaptureTime(at.to_string()))
}

/// The EXIF MAP* JSON for one image; `filename` is the original base name (`MAPFilename`).
///
/// The heading is normalised into [0, 360) first, as `process_finalize` (`_apply_offsets`)
/// does; a missing heading omits `MAPCompassHeading` (after [`crate::domain::sequence`] every
/// image has one). Metadata that no valid description can hold is an error
/// ([`check_describable`]).
pub fn map_description(meta: &ImageMetadata, filename: &str) -> Result<String, DescriptionError> {
    check_describable(meta)?;
    let mut fields: BTreeMap<&str, String> = BTreeMap::new();
    fields.insert(
        "MAPLatitude",
        py_float_repr(py_round(meta.lat, COORDINATES_PRECISION)),
    );
    fields.insert(
        "MAPLongitude",
        py_float_repr(py_round(meta.lon, COORDINATES_PRECISION)),
    );
    fields.insert(
        "MAPCaptureTime",
        json_string(&format_capture_time(meta.captured_at)?),
    );
    if let Some(alt) = meta.altitude {
        fields.insert("MAPAltitude", py_float_repr(py_round(alt, ALTITUDE_PRECISION)));
    }
    if let Some(h) = meta.heading {
        let v = py_float_repr(py_round(normalize_heading(h), ANGLE_PRECISION));
        // Keys sorted: MagneticHeading < TrueHeading.
        fields.insert(
            "MAPCompassHeading",
            format!("{{\"MagneticHeading\":{v},\"TrueHeading\":{v}}}"),
        );
    }
    if let Some(make) = &meta.make {
        fields.insert("MAPDeviceMake", json_string(make));
    }
    if let Some(model) = &meta.model {
        fields.insert("MAPDeviceModel", json_string(model));
    }
    if let Some(uuid) = &meta.camera_uuid {
        fields.insert("MAPCameraUUID", json_string(uuid));
    }
    fields.insert("MAPOrientation", meta.orientation.to_string());
    fields.insert("MAPFilename", json_string(filename));

    let mut out = String::with_capacity(320);
    out.push('{');
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&json_string(k));
        out.push(':');
        out.push_str(v);
    }
    out.push('}');
    Ok(out)
}

/// Python `(h + 0.0) % 360` (`_apply_offsets`): into [0, 360), `-0.0` becoming `0.0`.
pub fn normalize_heading(h: f64) -> f64 {
    let m = h % 360.0;
    if m == 0.0 {
        0.0
    } else if m < 0.0 {
        m + 360.0
    } else {
        m
    }
}

/// `MAPCaptureTime`: UTC `YYYY_MM_DD_HH_MM_SS_mmm`, milliseconds truncated. Instants outside
/// 1000-01-01..=9999-12-31 UTC are an error (their year would not have 4 digits, or would not
/// exist in Python).
pub fn format_capture_time(at: OffsetDateTime) -> Result<String, DescriptionError> {
    let t = utc_in_range(at)?;
    Ok(format!(
        "{:04}_{:02}_{:02}_{:02}_{:02}_{:02}_{:03}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    ))
}

/// Python's `round(x, ndigits)` for floats: the exact binary value rounded half-to-even at
/// `ndigits` decimals (Rust's fixed-precision formatting is exact and rounds the same way).
pub fn py_round(x: f64, ndigits: usize) -> f64 {
    if !x.is_finite() {
        return x;
    }
    format!("{x:.ndigits$}").parse().unwrap_or(x)
}

/// Python's `repr(float)` (what `json.dumps` writes): the shortest round-trip digits, in fixed
/// notation for decimal exponents -4..16 (with a `.0` for integral values), otherwise as
/// `d.ddde±XX`.
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: "-1.2345e-5", "0e0", "1e16".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (neg, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let n = digits.len() as i32;
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        let decpt = exp + 1;
        if decpt <= 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-decpt) as usize));
            out.push_str(&digits);
        } else if decpt >= n {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', (decpt - n) as usize));
            out.push_str(".0");
        } else {
            out.push_str(&digits[..decpt as usize]);
            out.push('.');
            out.push_str(&digits[decpt as usize..]);
        }
    } else {
        out.push_str(&digits[..1]);
        if n > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    out
}

/// A JSON string literal as Python's `json.dumps(ensure_ascii=True)` writes it.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
    out
}

/// Checks a MAP* EXIF description against mapillary_tools' `ImageDescriptionEXIFSchema`
/// (types, ranges, required keys, no unknown keys, the `MAPCaptureTime` pattern) and its
/// `strptime("%Y_%m_%d_%H_%M_%S_%f")` check. The error says what is wrong.
pub fn validate(json: &str) -> Result<(), String> {
    let value: Value = serde_json::from_str(json).map_err(|e| format!("not valid JSON: {e}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| format!("{value} is not of type 'object'"))?;
    for required in ["MAPLatitude", "MAPLongitude", "MAPCaptureTime"] {
        if !obj.contains_key(required) {
            return Err(format!("'{required}' is a required property"));
        }
    }
    for (key, v) in obj {
        match key.as_str() {
            "MAPLatitude" => number_in(key, v, -90.0, 90.0)?,
            "MAPLongitude" => number_in(key, v, -180.0, 180.0)?,
            "MAPAltitude" | "MAPGPSAccuracyMeters" => number(key, v).map(|_| ())?,
            "MAPCaptureTime" => {
                let s = string(key, v)?;
                if !capture_time_pattern(s) {
                    return Err(format!(
                        "{key} {s:?} does not match '[0-9]{{4}}_[0-9]{{2}}_[0-9]{{2}}_[0-9]{{2}}_[0-9]{{2}}_[0-9]{{2}}_[0-9]+'"
                    ));
                }
                parse_capture_time(s)?;
            }
            "MAPCompassHeading" => {
                let h = v
                    .as_object()
                    .ok_or_else(|| format!("{key} {v} is not of type 'object'"))?;
                for k in ["TrueHeading", "MagneticHeading"] {
                    let x = h
                        .get(k)
                        .ok_or_else(|| format!("{key}: '{k}' is a required property"))?;
                    number(k, x)?;
                }
                if let Some(extra) = h.keys().find(|k| *k != "TrueHeading" && *k != "MagneticHeading") {
                    return Err(format!("{key}: additional property '{extra}' is not allowed"));
                }
            }
            "MAPSequenceUUID" => {
                let s = string(key, v)?;
                if !s
                    .chars()
                    .any(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(format!("{key} {s:?} does not match '[a-zA-Z0-9_-]+'"));
                }
            }
            "MAPMetaTags" => {
                if !v.is_object() {
                    return Err(format!("{key} {v} is not of type 'object'"));
                }
            }
            "MAPDeviceMake" | "MAPDeviceModel" | "MAPCameraUUID" | "MAPFilename" => {
                string(key, v)?;
            }
            "MAPOrientation" => {
                let n = number(key, v)?;
                if n.fract() != 0.0 {
                    return Err(format!("{key} {v} is not of type 'integer'"));
                }
            }
            other => {
                return Err(format!(
                    "Additional properties are not allowed ('{other}' was unexpected)"
                ))
            }
        }
    }
    Ok(())
}

fn number(key: &str, v: &Value) -> Result<f64, String> {
    v.as_f64()
        .filter(|_| v.is_number())
        .ok_or_else(|| format!("{key} {v} is not of type 'number'"))
}

fn number_in(key: &str, v: &Value, min: f64, max: f64) -> Result<(), String> {
    let n = number(key, v)?;
    if n < min {
        return Err(format!("{key} {v} is less than the minimum of {min}"));
    }
    if n > max {
        return Err(format!("{key} {v} is greater than the maximum of {max}"));
    }
    Ok(())
}

fn string<'a>(key: &str, v: &'a Value) -> Result<&'a str, String> {
    v.as_str()
        .ok_or_else(|| format!("{key} {v} is not of type 'string'"))
}

/// The (unanchored) schema regex `[0-9]{4}_[0-9]{2}_[0-9]{2}_[0-9]{2}_[0-9]{2}_[0-9]{2}_[0-9]+`.
fn capture_time_pattern(s: &str) -> bool {
    let b = s.as_bytes();
    let widths = [4usize, 2, 2, 2, 2, 2];
    (0..b.len()).any(|start| {
        let mut i = start;
        for w in widths {
            if i + w >= b.len() || !b[i..i + w].iter().all(u8::is_ascii_digit) || b[i + w] != b'_' {
                return false;
            }
            i += w + 1;
        }
        b.get(i).is_some_and(u8::is_ascii_digit)
    })
}

/// `datetime.strptime(s, "%Y_%m_%d_%H_%M_%S_%f")` as a UTC instant.
pub fn parse_capture_time(s: &str) -> Result<OffsetDateTime, String> {
    let bad = || format!("time data {s:?} does not match format '%Y_%m_%d_%H_%M_%S_%f'");
    let parts: Vec<&str> = s.split('_').collect();
    let [y, mo, d, h, mi, sec, f] = parts.as_slice() else {
        return Err(bad());
    };
    let digits = |p: &str, min: usize, max: usize| {
        (min..=max).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(y, 4, 4) || ![mo, d, h, mi, sec].iter().all(|p| digits(p, 1, 2)) || !digits(f, 1, 6) {
        return Err(bad());
    }
    let num = |p: &str| p.parse::<u32>().map_err(|_| bad());
    let (yv, mov, dv, hv, miv, sv) = (num(y)?, num(mo)?, num(d)?, num(h)?, num(mi)?, num(sec)?);
    // strptime's field ranges (%S allows 60 and 61, which datetime() then refuses).
    if !(1..=12).contains(&mov) || !(1..=31).contains(&dv) || hv > 23 || miv > 59 || sv > 61 {
        return Err(bad());
    }
    let us: u32 = format!("{f:0<6}").parse().map_err(|_| bad())?;
    let month = time::Month::try_from(mov as u8).map_err(|_| bad())?;
    let date =
        time::Date::from_calendar_date(yv as i32, month, dv as u8).map_err(|e| format!("{s:?}: {e}"))?;
    let t =
        time::Time::from_hms_micro(hv as u8, miv as u8, sv as u8, us).map_err(|e| format!("{s:?}: {e}"))?;
    Ok(time::PrimitiveDateTime::new(date, t).assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::exif::TimeSource;
    use time::macros::datetime;

    fn meta() -> ImageMetadata {
        ImageMetadata {
            lat: 50.8966,
            lon: -0.5591,
            altitude: Some(77.42),
            captured_at: datetime!(2024-05-01 10:00:00.250 UTC),
            time_source: TimeSource::Gps,
            heading: Some(133.54),
            make: Some("TestMake".into()),
            model: Some("TestModel".into()),
            orientation: 1,
            width: Some(64),
            height: Some(48),
            camera_uuid: None,
        }
    }

    #[test]
    fn matches_the_protocol_example() {
        assert_eq!(
            map_description(&meta(), "IMG_0000.jpg").expect("describable"),
            r#"{"MAPAltitude":77.42,"MAPCaptureTime":"2024_05_01_10_00_00_250","MAPCompassHeading":{"MagneticHeading":133.54,"TrueHeading":133.54},"MAPDeviceMake":"TestMake","MAPDeviceModel":"TestModel","MAPFilename":"IMG_0000.jpg","MAPLatitude":50.8966,"MAPLongitude":-0.5591,"MAPOrientation":1}"#
        );
    }

    #[test]
    fn optional_fields_and_escapes() {
        let mut m = meta();
        m.altitude = None;
        m.heading = None;
        m.make = None;
        m.model = Some("Cam \"Ø\" 📷\n\u{7f}".into());
        m.camera_uuid = Some("AB12_CD".into());
        let d = map_description(&m, "b\\ä.jpg").expect("describable");
        assert_eq!(
            d,
            r#"{"MAPCameraUUID":"AB12_CD","MAPCaptureTime":"2024_05_01_10_00_00_250","MAPDeviceModel":"Cam \"\u00d8\" \ud83d\udcf7\n\u007f","MAPFilename":"b\\\u00e4.jpg","MAPLatitude":50.8966,"MAPLongitude":-0.5591,"MAPOrientation":1}"#
        );
        assert!(d.is_ascii());
        validate(&d).expect("valid");
    }

    #[test]
    fn undescribable_metadata_is_an_error_not_a_panic() {
        let cases: Vec<(ImageMetadata, &str)> = vec![
            (ImageMetadata { lat: 90.5, ..meta() }, "latitude 90.5 is not a number between -90 and 90"),
            (ImageMetadata { lat: f64::NAN, ..meta() }, "latitude NaN is not a number between -90 and 90"),
            (
                ImageMetadata { lon: -180.000_001, ..meta() },
                "longitude -180.000001 is not a number between -180 and 180",
            ),
            (
                ImageMetadata { lon: f64::INFINITY, ..meta() },
                "longitude inf is not a number between -180 and 180",
            ),
            (
                ImageMetadata { altitude: Some(f64::NAN), ..meta() },
                "altitude NaN is not a finite number",
            ),
            (
                ImageMetadata { heading: Some(f64::NEG_INFINITY), ..meta() },
                "compass heading -inf is not a finite number",
            ),
            (
                // Issue 15's instant: `to_offset(UTC)` panicked on it.
                ImageMetadata { captured_at: datetime!(9999-12-31 23:59:59 -01:00), ..meta() },
                "capture time 9999-12-31 23:59:59.0 -01:00:00 is not between 1000-01-01 and 9999-12-31 in UTC",
            ),
            (
                ImageMetadata { captured_at: datetime!(0999-12-31 23:59:59.999 UTC), ..meta() },
                "capture time 0999-12-31 23:59:59.999 +00:00:00 is not between",
            ),
        ];
        for (m, want) in cases {
            let e = map_description(&m, "a.jpg").expect_err(want);
            assert!(e.to_string().starts_with(want), "{e}");
            // (Compared as text: NaN ≠ NaN.)
            assert_eq!(
                check_describable(&m).map_err(|e| e.to_string()),
                Err(e.to_string())
            );
        }
        assert!(format_capture_time(datetime!(9999-12-31 23:59:59 -01:00)).is_err());
        // The boundaries themselves are fine.
        for m in [
            ImageMetadata {
                lat: -90.0,
                lon: 180.0,
                ..meta()
            },
            ImageMetadata {
                lat: 90.0,
                lon: -180.0,
                ..meta()
            },
            ImageMetadata {
                captured_at: datetime!(1000-01-01 00:00 UTC),
                ..meta()
            },
            ImageMetadata {
                captured_at: datetime!(9999-12-31 23:59:59.999_999 UTC),
                ..meta()
            },
            ImageMetadata {
                captured_at: datetime!(9999-12-31 23:59:59 +01:00),
                ..meta()
            },
        ] {
            let d = map_description(&m, "a.jpg").expect("describable");
            validate(&d).expect("valid");
        }
        assert_eq!(
            format_capture_time(datetime!(1000-01-01 00:00 UTC)).as_deref(),
            Ok("1000_01_01_00_00_00_000")
        );
    }

    #[test]
    fn heading_is_normalised_like_apply_offsets() {
        let mut m = meta();
        for (h, want) in [(360.0, "0.0"), (-0.0, "0.0"), (-90.0, "270.0"), (725.5, "5.5")] {
            m.heading = Some(h);
            let d = map_description(&m, "a.jpg").expect("describable");
            let expect = format!("{{\"MagneticHeading\":{want},\"TrueHeading\":{want}}}");
            assert!(d.contains(&expect), "{h}: {d}");
        }
    }

    #[test]
    fn capture_time_truncates_milliseconds() {
        assert_eq!(
            format_capture_time(datetime!(2024-12-31 23:59:59.999_999 UTC)).as_deref(),
            Ok("2024_12_31_23_59_59_999")
        );
        assert_eq!(
            format_capture_time(datetime!(2024-05-01 12:00:00.0019 +02:00)).as_deref(),
            Ok("2024_05_01_10_00_00_001")
        );
    }

    #[test]
    fn python_rounding_and_repr() {
        // Expected values from CPython 3.11: repr(round(x, n)).
        let cases: &[(f64, usize, &str)] = &[
            (0.0625, 3, "0.062"),
            (0.1875, 3, "0.188"),
            (77.0625, 3, "77.062"),
            (0.00390625, 7, "0.0039062"),
            (1e-5, 7, "1e-05"),
            (1.5e-5, 7, "1.5e-05"),
            (-0.00001234567, 7, "-1.23e-05"),
            (0.0001, 7, "0.0001"),
            (50.0, 7, "50.0"),
            (-0.0, 3, "-0.0"),
            (0.0, 7, "0.0"),
            (1e16, 3, "1e+16"),
            (123456789012345.6, 3, "123456789012345.6"),
            (179.99999996, 7, "180.0"),
            (0.1 + 0.2, 7, "0.3"),
            (48.858_370_123_456, 7, "48.8583701"),
            (359.9995, 3, "360.0"),
        ];
        for (x, n, want) in cases {
            assert_eq!(py_float_repr(py_round(*x, *n)), *want, "round({x}, {n})");
        }
        assert_eq!(py_float_repr(0.30000000000000004), "0.30000000000000004");
        assert_eq!(py_float_repr(1e22), "1e+22");
        assert_eq!(py_float_repr(1.5e300), "1.5e+300");
        assert_eq!(py_float_repr(5e-324), "5e-324");
    }

    #[test]
    fn validate_rejects_what_the_schema_rejects() {
        let ok = map_description(&meta(), "a.jpg").expect("describable");
        validate(&ok).expect("valid");
        let bad = [
            (r#"[]"#, "object"),
            (
                r#"{"MAPLongitude":1,"MAPCaptureTime":"2024_05_01_10_00_00_250"}"#,
                "required",
            ),
            (
                r#"{"MAPLatitude":90.5,"MAPLongitude":1,"MAPCaptureTime":"2024_05_01_10_00_00_250"}"#,
                "maximum",
            ),
            (
                r#"{"MAPLatitude":1,"MAPLongitude":-181,"MAPCaptureTime":"2024_05_01_10_00_00_250"}"#,
                "minimum",
            ),
            (
                r#"{"MAPLatitude":"1","MAPLongitude":1,"MAPCaptureTime":"2024_05_01_10_00_00_250"}"#,
                "number",
            ),
            (
                r#"{"MAPLatitude":true,"MAPLongitude":1,"MAPCaptureTime":"2024_05_01_10_00_00_250"}"#,
                "number",
            ),
            (
                r#"{"MAPLatitude":1,"MAPLongitude":1,"MAPCaptureTime":"2024-05-01 10:00:00"}"#,
                "match",
            ),
            (
                r#"{"MAPLatitude":1,"MAPLongitude":1,"MAPCaptureTime":"2024_02_30_10_00_00_250"}"#,
                "day",
            ),
            (
                r#"{"MAPLatitude":1,"MAPLongitude":1,"MAPCaptureTime":"2024_05_01_10_00_00_1234567"}"#,
                "format",
            ),
            (
                r#"{"MAPLatitude":1,"MAPLongitude":1,"MAPCaptureTime":"2024_05_01_10_00_00_250","MAPSequenceUUID":"0"}"#,
                "",
            ),
            (
                r#"{"MAPLatitude":1,"MAPLongitude":1,"MAPCaptureTime":"2024_05_01_10_00_00_250","MAPFoo":1}"#,
                "MAPFoo",
            ),
            (
                r#"{"MAPLatitude":1,"MAPLongitude":1,"MAPCaptureTime":"2024_05_01_10_00_00_250","MAPCompassHeading":{"TrueHeading":1}}"#,
                "MagneticHeading",
            ),
            (
                r#"{"MAPLatitude":1,"MAPLongitude":1,"MAPCaptureTime":"2024_05_01_10_00_00_250","MAPCompassHeading":{"TrueHeading":1,"MagneticHeading":1,"X":2}}"#,
                "X",
            ),
            (
                r#"{"MAPLatitude":1,"MAPLongitude":1,"MAPCaptureTime":"2024_05_01_10_00_00_250","MAPOrientation":1.5}"#,
                "integer",
            ),
        ];
        for (json, needle) in bad {
            let r = validate(json);
            if needle.is_empty() {
                // MAPSequenceUUID is allowed by the schema (it is simply never written).
                assert_eq!(r, Ok(()), "{json}");
            } else {
                let e = r.expect_err(json);
                assert!(e.contains(needle), "{json}: {e}");
            }
        }
        validate(r#"{"MAPLatitude":1,"MAPLongitude":1,"MAPCaptureTime":"2024_05_01_10_00_00_2","MAPOrientation":3.0}"#)
            .expect("1-digit fraction and integral float are fine");
    }
}
