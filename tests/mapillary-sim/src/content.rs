//! The simulated server's reading of uploaded content: zips (`file_type: "zip"`), single JPEGs
//! (bundle-manifest uploads) and bundle manifests (protocol §3.2, §4, §14.2).
//!
//! Metadata comes from the MAP* JSON in the 0th-IFD ImageDescription when it is there (validated
//! like mapillary_tools' `ImageDescriptionEXIFSchema`), else from raw EXIF GPS and time tags
//! (sim choice, §14.6). Nothing here panics on any input: bad input becomes a [`Rejected`] entry
//! or a [`ContentError`].

use std::io::{Cursor, Read, Seek};

use exif::{Exif, In, Reader, Tag, Value};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use time::{Date, Month, PrimitiveDateTime, Time, UtcOffset};

/// Largest decompressed zip entry the simulator reads (guards against zip bombs).
pub const MAX_ENTRY_BYTES: u64 = 128 * 1024 * 1024;

/// Where an image's metadata came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetaSource {
    /// The MAP* JSON in the EXIF ImageDescription.
    Description,
    /// Raw EXIF GPS and date/time tags.
    RawExif,
}

/// What the server keeps of one accepted image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageMeta {
    /// WGS84 decimal degrees.
    pub lat: f64,
    /// WGS84 decimal degrees.
    pub lon: f64,
    /// Metres.
    pub altitude: Option<f64>,
    /// Capture instant, Unix milliseconds (UTC).
    pub captured_at_ms: i64,
    /// Degrees (`MAPCompassHeading.TrueHeading`, or GPSImgDirection / GPSTrack).
    pub compass_angle: Option<f64>,
    /// Camera make.
    pub make: Option<String>,
    /// Camera model.
    pub model: Option<String>,
    /// EXIF orientation.
    pub orientation: Option<u16>,
    /// `MAPFilename` (description source only).
    pub filename: Option<String>,
    /// Pixel width from the JPEG frame header (else EXIF PixelXDimension).
    pub width: Option<u32>,
    /// Pixel height from the JPEG frame header (else EXIF PixelYDimension).
    pub height: Option<u32>,
    /// Which metadata source was used.
    pub source: MetaSource,
    /// The validated MAP* JSON, when that was the source.
    pub description: Option<Json>,
}

/// One image (or archive entry) the server dropped, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    /// Entry or upload name.
    pub name: String,
    /// Human-readable reason.
    pub reason: String,
    /// What kind of problem it is.
    pub kind: RejectKind,
}

/// Why an image or archive entry was dropped, by kind (so strict worlds can refuse some kinds outright).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectKind {
    /// A zip entry that cannot be an image (directory, unsupported compression, too big, corrupt data).
    Entry,
    /// Not a well-formed JPEG (markers, frame, scan).
    Jpeg,
    /// No EXIF, or EXIF that cannot be read.
    Exif,
    /// An ImageDescription that looks like a MAP* description (JSON) but is not a valid one.
    Description,
    /// Raw EXIF (no MAP* description) without a usable position or capture time.
    RawExif,
    /// A position at (0, 0): no real GPS fix.
    NullIsland,
}

impl RejectKind {
    /// Whether the image lacks a valid MAP* description (what
    /// [`crate::Settings::require_map_description`] refuses).
    pub fn lacks_description(self) -> bool {
        matches!(
            self,
            RejectKind::Exif | RejectKind::Description | RejectKind::RawExif
        )
    }
}

/// The container facts of a zip that mapillary_tools fixes (§4.1), for
/// [`crate::Settings::require_tools_zip`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ZipLayout {
    /// The archive comment, as stored.
    pub comment: Vec<u8>,
    /// Every entry, in archive order.
    pub entries: Vec<ZipEntryInfo>,
}

/// Name and MS-DOS timestamp of one zip entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ZipEntryInfo {
    /// Entry name (lossy UTF-8).
    pub name: String,
    /// `(date, time)` in MS-DOS format from the central directory; `None` when the stored value is
    /// not a valid date.
    pub dos_datetime: Option<(u16, u16)>,
}

/// MS-DOS `(date, time)` of 1980-01-01 00:00:00, the timestamp mapillary_tools gives every entry.
pub const DOS_1980_01_01: (u16, u16) = ((1 << 5) | 1, 0);

impl ZipLayout {
    /// Why this archive is not shaped like `mapillary_tools zip` output (§4.1), or `None` when it is: the
    /// comment must be the compact JSON object `{"sequence_md5sum":"<32 lowercase hex>"}` and nothing else,
    /// and entry `i` must be named `<i>.jpg` and dated 1980-01-01 00:00:00. DEFLATE entries stay accepted
    /// (the June-2021 client wrote them, §4.1).
    pub fn tools_shape_problem(&self) -> Option<String> {
        let comment_ok = serde_json::from_slice::<Json>(&self.comment)
            .ok()
            .and_then(|v| {
                let obj = v.as_object()?;
                let md5 = obj.get("sequence_md5sum")?.as_str()?;
                let hex = md5.len() == 32 && md5.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
                (obj.len() == 1 && hex).then_some(())
            })
            .is_some();
        if !comment_ok {
            let shown: String = String::from_utf8_lossy(&self.comment).chars().take(80).collect();
            return Some(format!(
                "the archive comment must be mapillary_tools' {{\"sequence_md5sum\":\"<md5>\"}}, got {shown:?}"
            ));
        }
        for (i, e) in self.entries.iter().enumerate() {
            let want = format!("{i}.jpg");
            if e.name != want {
                return Some(format!(
                    "entry {i} is named {:?}; entry {i} must be {want:?}",
                    e.name
                ));
            }
            if e.dos_datetime != Some(DOS_1980_01_01) {
                let shown = e
                    .dos_datetime
                    .map_or_else(|| "an invalid date".to_string(), |(d, t)| dos_display(d, t));
                return Some(format!(
                    "entry {:?} is dated {shown}; every entry must be dated 1980-01-01 00:00:00",
                    e.name
                ));
            }
        }
        None
    }
}

fn dos_display(date: u16, time: u16) -> String {
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        1980 + (date >> 9),
        (date >> 5) & 0xF,
        date & 0x1F,
        time >> 11,
        (time >> 5) & 0x3F,
        (time & 0x1F) * 2
    )
}

/// The result of reading an uploaded zip.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParsedUpload {
    /// Accepted images as `(entry name, metadata)`, in archive order.
    pub images: Vec<(String, ImageMeta)>,
    /// Rejected entries, in archive order.
    pub rejected: Vec<Rejected>,
    /// The archive's comment and entry names and dates.
    pub layout: ZipLayout,
}

/// Why a whole upload could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// The bytes are not a readable zip archive.
    #[error("not a zip archive: {0}")]
    NotZip(String),
    /// The archive has no entries.
    #[error("empty archive: the zip has no entries")]
    EmptyArchive,
    /// The bundle manifest is malformed.
    #[error("bad bundle manifest: {0}")]
    BadManifest(String),
}

/// The per-sequence bundle manifest of §3.2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    /// rupload handles of the images, in sequence order.
    pub image_handles: Vec<String>,
    /// Always `"images"`.
    pub upload_type: String,
    /// Always `"1"`.
    pub version: String,
}

/// Parses a bundle manifest strictly: exact keys, `upload_type` `"images"`, `version` `"1"`,
/// at least one non-empty handle.
pub fn parse_manifest(bytes: &[u8]) -> Result<BundleManifest, ContentError> {
    let m: BundleManifest =
        serde_json::from_slice(bytes).map_err(|e| ContentError::BadManifest(e.to_string()))?;
    if m.upload_type != "images" {
        return Err(ContentError::BadManifest(format!(
            "upload_type must be \"images\", got {:?}",
            m.upload_type
        )));
    }
    if m.version != "1" {
        return Err(ContentError::BadManifest(format!(
            "version must be \"1\", got {:?}",
            m.version
        )));
    }
    if m.image_handles.is_empty() {
        return Err(ContentError::BadManifest("image_handles is empty".to_string()));
    }
    if let Some(i) = m.image_handles.iter().position(|h| h.is_empty()) {
        return Err(ContentError::BadManifest(format!(
            "image_handles[{i}] is an empty string"
        )));
    }
    Ok(m)
}

/// Reads a zip upload: every entry is parsed as a JPEG ([`parse_jpeg`]); STORED and DEFLATE
/// entries are accepted, the archive comment is ignored, anything else is rejected per entry.
pub fn parse_zip(bytes: &[u8]) -> Result<ParsedUpload, ContentError> {
    parse_zip_from(Cursor::new(bytes))
}

/// [`parse_zip`] over any seekable reader (a stored upload file): one entry in memory at a time.
pub fn parse_zip_from<R: Read + Seek>(reader: R) -> Result<ParsedUpload, ContentError> {
    let mut archive = zip::ZipArchive::new(reader).map_err(|e| ContentError::NotZip(e.to_string()))?;
    if archive.is_empty() {
        return Err(ContentError::EmptyArchive);
    }
    let mut out = ParsedUpload {
        images: Vec::new(),
        rejected: Vec::new(),
        layout: ZipLayout {
            comment: archive.comment().to_vec(),
            entries: Vec::with_capacity(archive.len()),
        },
    };
    for i in 0..archive.len() {
        if let Ok(entry) = archive.by_index_raw(i) {
            out.layout.entries.push(ZipEntryInfo {
                name: String::from_utf8_lossy(entry.name_raw()).into_owned(),
                dos_datetime: entry.last_modified().map(|d| (d.datepart(), d.timepart())),
            });
        } else {
            out.layout.entries.push(ZipEntryInfo {
                name: format!("#{i}"),
                dos_datetime: None,
            });
        }
        match read_entry(&mut archive, i) {
            Ok((name, data)) => match parse_jpeg(&name, &data) {
                Ok(meta) => out.images.push((name, meta)),
                Err(r) => out.rejected.push(r),
            },
            Err(r) => out.rejected.push(r),
        }
    }
    for r in &out.rejected {
        tracing::debug!(name = %r.name, reason = %r.reason, "zip entry rejected");
    }
    Ok(out)
}

fn read_entry<R: Read + Seek>(
    archive: &mut zip::ZipArchive<R>,
    index: usize,
) -> Result<(String, Vec<u8>), Rejected> {
    let fallback_name = format!("#{index}");
    let entry = archive.by_index(index).map_err(|e| Rejected {
        name: fallback_name.clone(),
        reason: format!("unreadable zip entry: {e}"),
        kind: RejectKind::Entry,
    })?;
    let name = String::from_utf8_lossy(entry.name_raw()).into_owned();
    let reject = |reason: String| Rejected {
        name: name.clone(),
        reason,
        kind: RejectKind::Entry,
    };
    if entry.is_dir() {
        return Err(reject("directory entry, not an image".to_string()));
    }
    match entry.compression() {
        zip::CompressionMethod::Stored | zip::CompressionMethod::Deflated => {}
        other => {
            return Err(reject(format!(
                "unsupported compression method {other:?} (only STORED and DEFLATE)"
            )))
        }
    }
    if entry.size() > MAX_ENTRY_BYTES {
        return Err(reject(format!(
            "entry is {} bytes, above the {MAX_ENTRY_BYTES}-byte limit",
            entry.size()
        )));
    }
    let mut data = Vec::new();
    entry
        .take(MAX_ENTRY_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(|e| reject(format!("corrupt entry data: {e}")))?;
    if data.len() as u64 > MAX_ENTRY_BYTES {
        return Err(reject(format!(
            "entry inflates beyond the {MAX_ENTRY_BYTES}-byte limit"
        )));
    }
    Ok((name, data))
}

/// The parts of a JPEG's marker structure the server needs.
struct JpegLayout<'a> {
    /// TIFF data of the first APP1 `Exif\0\0` segment.
    exif: Option<&'a [u8]>,
    width: u32,
    height: u32,
}

/// Walks the JPEG markers up to the first scan and checks the scan is terminated by EOI.
///
/// Hand-rolled (kamadak-exif only extracts the APP1 payload) so that rejections name the exact
/// structural problem and the frame size is known.
fn jpeg_layout(bytes: &[u8]) -> Result<JpegLayout<'_>, String> {
    if bytes.len() < 2 || bytes[..2] != [0xFF, 0xD8] {
        let head: Vec<String> = bytes.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(format!(
            "not a JPEG: missing SOI marker (starts with [{}])",
            head.join(" ")
        ));
    }
    let mut pos = 2;
    let mut exif = None;
    let mut frame = None;
    loop {
        if bytes.get(pos) != Some(&0xFF) {
            return match bytes.get(pos) {
                None => Err(format!("truncated JPEG: ends at offset {pos} before image data")),
                Some(b) => Err(format!(
                    "corrupt JPEG: expected a marker at offset {pos}, found byte {b:02x}"
                )),
            };
        }
        // Skip fill bytes (0xFF 0xFF …).
        while bytes.get(pos + 1) == Some(&0xFF) {
            pos += 1;
        }
        let Some(&marker) = bytes.get(pos + 1) else {
            return Err(format!("truncated JPEG: ends inside a marker at offset {pos}"));
        };
        pos += 2;
        match marker {
            0xD9 => return Err("corrupt JPEG: EOI before any image data".to_string()),
            0x01 | 0xD0..=0xD7 => continue, // standalone markers
            0x00 => return Err(format!("corrupt JPEG: invalid marker ff00 at offset {}", pos - 2)),
            _ => {}
        }
        let len_bytes = bytes
            .get(pos..pos + 2)
            .ok_or_else(|| format!("truncated JPEG: segment ff{marker:02x} has no length"))?;
        let len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
        if len < 2 {
            return Err(format!(
                "corrupt JPEG: segment ff{marker:02x} at offset {} has length {len}",
                pos - 2
            ));
        }
        let payload = bytes.get(pos + 2..pos + len).ok_or_else(|| {
            format!(
                "truncated JPEG: segment ff{marker:02x} at offset {} declares {len} bytes, {} remain",
                pos - 2,
                bytes.len() - pos
            )
        })?;
        pos += len;
        match marker {
            0xE1 if exif.is_none() && payload.starts_with(b"Exif\0\0") => {
                exif = Some(&payload[6..]);
            }
            // SOF0–SOF15 except DHT (c4), JPG (c8) and DAC (cc).
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                if payload.len() < 5 {
                    return Err(format!("corrupt JPEG: frame header ff{marker:02x} too short"));
                }
                let height = u32::from(u16::from_be_bytes([payload[1], payload[2]]));
                let width = u32::from(u16::from_be_bytes([payload[3], payload[4]]));
                if width == 0 || height == 0 {
                    return Err(format!("corrupt JPEG: frame size {width}x{height}"));
                }
                frame = Some((width, height));
            }
            0xDA => {
                let (width, height) = frame.ok_or("corrupt JPEG: scan without a frame header (SOF)")?;
                let rest = &bytes[pos..];
                if !rest.windows(2).any(|w| w == [0xFF, 0xD9]) {
                    return Err("truncated JPEG: no EOI marker after the scan data".to_string());
                }
                return Ok(JpegLayout { exif, width, height });
            }
            _ => {}
        }
    }
}

/// Reads one uploaded JPEG: MAP* description first, raw EXIF as fallback (module docs).
pub fn parse_jpeg(name: &str, bytes: &[u8]) -> Result<ImageMeta, Rejected> {
    let reject = |kind: RejectKind| {
        move |reason: String| Rejected {
            name: name.to_string(),
            reason,
            kind,
        }
    };
    let layout = jpeg_layout(bytes).map_err(reject(RejectKind::Jpeg))?;
    let tiff = layout.exif.ok_or_else(|| {
        reject(RejectKind::Exif)("no EXIF (APP1 Exif segment) so no position or capture time".to_string())
    })?;
    // Lenient like real readers: piexif (used by mapillary_tools to inject the description)
    // leaves non-zero next-IFD pointers on the Exif/GPS IFDs, which the strict parser refuses.
    let exif = Reader::new()
        .continue_on_error(true)
        .read_raw(tiff.to_vec())
        .or_else(|e| {
            e.distill_partial_result(|errors| {
                for error in errors {
                    tracing::debug!(name, %error, "tolerated EXIF defect");
                }
            })
        })
        .map_err(|e| reject(RejectKind::Exif)(format!("corrupt EXIF: {e}")))?;

    let description = ascii_tag(&exif, Tag::ImageDescription);
    let mut meta = match description.as_deref().map(str::trim_start) {
        // A JSON object (or array) means the uploader meant a MAP* description: it must be valid.
        Some(text) if text.starts_with(['{', '[']) => {
            meta_from_description(text).map_err(reject(RejectKind::Description))?
        }
        // Absent, or plain camera text ("OLYMPUS DIGITAL CAMERA"): raw EXIF.
        _ => meta_from_raw_exif(&exif).map_err(reject(RejectKind::RawExif))?,
    };
    meta.width = Some(layout.width);
    meta.height = Some(layout.height);
    if meta.lat.abs() < 1e-9 && meta.lon.abs() < 1e-9 {
        return Err(reject(RejectKind::NullIsland)(
            "position is (0, 0) (null island): no real GPS fix".to_string(),
        ));
    }
    Ok(meta)
}

fn meta_from_description(text: &str) -> Result<ImageMeta, String> {
    let v: Json =
        serde_json::from_str(text).map_err(|e| format!("ImageDescription is not valid JSON: {e}"))?;
    validate_description(&v).map_err(|e| format!("invalid MAP* description: {e}"))?;
    // validate_description guarantees the required keys and their types.
    let num = |k: &str| v.get(k).and_then(Json::as_f64);
    let string = |k: &str| v.get(k).and_then(Json::as_str).map(str::to_string);
    let (Some(lat), Some(lon), Some(time)) = (
        num("MAPLatitude"),
        num("MAPLongitude"),
        v.get("MAPCaptureTime").and_then(Json::as_str),
    ) else {
        return Err("invalid MAP* description: required keys missing".to_string());
    };
    let captured_at_ms =
        parse_capture_time(time).map_err(|e| format!("invalid MAP* description: MAPCaptureTime: {e}"))?;
    Ok(ImageMeta {
        lat,
        lon,
        altitude: num("MAPAltitude"),
        captured_at_ms,
        compass_angle: v
            .get("MAPCompassHeading")
            .and_then(|c| c.get("TrueHeading"))
            .and_then(Json::as_f64),
        make: string("MAPDeviceMake"),
        model: string("MAPDeviceModel"),
        orientation: v
            .get("MAPOrientation")
            .and_then(Json::as_f64)
            .and_then(|o| (0.0..=f64::from(u16::MAX)).contains(&o).then_some(o as u16)),
        filename: string("MAPFilename"),
        width: None,
        height: None,
        source: MetaSource::Description,
        description: Some(v),
    })
}

const DESCRIPTION_KEYS: &[&str] = &[
    "MAPLatitude",
    "MAPLongitude",
    "MAPAltitude",
    "MAPCaptureTime",
    "MAPCompassHeading",
    "MAPSequenceUUID",
    "MAPMetaTags",
    "MAPDeviceMake",
    "MAPDeviceModel",
    "MAPGPSAccuracyMeters",
    "MAPCameraUUID",
    "MAPFilename",
    "MAPOrientation",
];

fn json_type(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "boolean",
        Json::Number(_) => "number",
        Json::String(_) => "string",
        Json::Array(_) => "array",
        Json::Object(_) => "object",
    }
}

fn want_number(key: &str, v: &Json) -> Result<f64, String> {
    v.as_f64()
        .ok_or_else(|| format!("{key}: {v} is not of type 'number' (got {})", json_type(v)))
}

fn want_string<'a>(key: &str, v: &'a Json) -> Result<&'a str, String> {
    v.as_str()
        .ok_or_else(|| format!("{key}: {v} is not of type 'string' (got {})", json_type(v)))
}

/// Validates a MAP* description like mapillary_tools 0.14.7's `ImageDescriptionEXIFSchema`
/// plus its `parse_capture_time` check. The error names the offending key.
pub fn validate_description(v: &Json) -> Result<(), String> {
    let Some(obj) = v.as_object() else {
        return Err(format!("description must be a JSON object, got {}", json_type(v)));
    };
    let mut unknown: Vec<&str> = obj
        .keys()
        .map(String::as_str)
        .filter(|k| !DESCRIPTION_KEYS.contains(k))
        .collect();
    if !unknown.is_empty() {
        unknown.sort_unstable();
        return Err(format!(
            "additional properties are not allowed ({} unexpected)",
            unknown
                .iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for key in ["MAPLatitude", "MAPLongitude", "MAPCaptureTime"] {
        if !obj.contains_key(key) {
            return Err(format!("{key}: is a required property"));
        }
    }
    for (key, value) in obj {
        match key.as_str() {
            "MAPLatitude" | "MAPLongitude" => {
                let limit = if key == "MAPLatitude" { 90.0 } else { 180.0 };
                let x = want_number(key, value)?;
                if x < -limit {
                    return Err(format!("{key}: {x} is less than the minimum of -{limit}"));
                }
                if x > limit {
                    return Err(format!("{key}: {x} is greater than the maximum of {limit}"));
                }
            }
            "MAPAltitude" | "MAPGPSAccuracyMeters" => {
                want_number(key, value)?;
            }
            "MAPCaptureTime" => {
                let s = want_string(key, value)?;
                parse_capture_time(s).map_err(|e| format!("{key}: {e}"))?;
            }
            "MAPCompassHeading" => {
                let Some(c) = value.as_object() else {
                    return Err(format!(
                        "{key}: {value} is not of type 'object' (got {})",
                        json_type(value)
                    ));
                };
                if let Some(extra) = c.keys().find(|k| *k != "TrueHeading" && *k != "MagneticHeading") {
                    return Err(format!(
                        "{key}: additional properties are not allowed ('{extra}' unexpected)"
                    ));
                }
                for sub in ["TrueHeading", "MagneticHeading"] {
                    let Some(h) = c.get(sub) else {
                        return Err(format!("{key}: '{sub}' is a required property"));
                    };
                    want_number(&format!("{key}.{sub}"), h)?;
                }
            }
            "MAPSequenceUUID" => {
                let s = want_string(key, value)?;
                // Unanchored pattern [a-zA-Z0-9_-]+: one such character anywhere suffices.
                if !s
                    .chars()
                    .any(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(format!("{key}: {s:?} does not match '[a-zA-Z0-9_-]+'"));
                }
            }
            "MAPMetaTags" if !value.is_object() => {
                return Err(format!(
                    "{key}: {value} is not of type 'object' (got {})",
                    json_type(value)
                ));
            }
            "MAPDeviceMake" | "MAPDeviceModel" | "MAPCameraUUID" | "MAPFilename" => {
                want_string(key, value)?;
            }
            "MAPOrientation" => {
                // JSON Schema "integer" also admits floats with a zero fraction (1.0).
                let is_integer =
                    value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0);
                if !is_integer {
                    return Err(format!(
                        "{key}: {value} is not of type 'integer' (got {})",
                        json_type(value)
                    ));
                }
            }
            _ => {} // valid MAPMetaTags; unknown keys were refused above
        }
    }
    Ok(())
}

/// Parses `MAPCaptureTime` as mapillary_tools does (regex `[0-9]{4}_[0-9]{2}_…_[0-9]+` and
/// `strptime("%Y_%m_%d_%H_%M_%S_%f")`, UTC) into Unix milliseconds (sub-ms truncated).
///
/// Hand-rolled: the two Python checks together mean exactly 4-digit year, 2-digit month, day,
/// hour, minute and second in range, and 1–6 fraction digits (`%f` pads on the right).
pub fn parse_capture_time(s: &str) -> Result<i64, String> {
    let parts: Vec<&str> = s.split('_').collect();
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let shape_ok = parts.len() == 7
        && parts[0].len() == 4
        && parts[1..6].iter().all(|p| p.len() == 2)
        && (1..=6).contains(&parts[6].len())
        && parts.iter().all(|p| digits(p));
    if !shape_ok {
        return Err(format!(
            "{s:?} does not match format '%Y_%m_%d_%H_%M_%S_%f' (YYYY_MM_DD_HH_MM_SS_fff)"
        ));
    }
    // All parts are ≤ 6 ASCII digits, so these parses cannot overflow.
    let n = |i: usize| parts[i].parse::<u32>().unwrap_or(u32::MAX);
    let year = i32::try_from(n(0)).map_err(|_| format!("{s:?}: bad year"))?;
    let month = u8::try_from(n(1))
        .ok()
        .and_then(|m| Month::try_from(m).ok())
        .ok_or_else(|| format!("{s:?}: month out of range"))?;
    let day = u8::try_from(n(2)).map_err(|_| format!("{s:?}: bad day"))?;
    let date = Date::from_calendar_date(year, month, day).map_err(|e| format!("{s:?}: invalid date: {e}"))?;
    let micro = format!("{:0<6}", parts[6]).parse::<u32>().unwrap_or(0);
    let hms = |i: usize| u8::try_from(n(i)).unwrap_or(u8::MAX);
    let time = Time::from_hms_micro(hms(3), hms(4), hms(5), micro)
        .map_err(|e| format!("{s:?}: invalid time: {e}"))?;
    Ok(unix_ms(PrimitiveDateTime::new(date, time), UtcOffset::UTC))
}

fn unix_ms(local: PrimitiveDateTime, offset: UtcOffset) -> i64 {
    // Dates are within ±9999 years, so milliseconds fit an i64.
    (local.assume_offset(offset).unix_timestamp_nanos() / 1_000_000) as i64
}

fn field_value(exif: &Exif, tag: Tag) -> Option<&Value> {
    exif.get_field(tag, In::PRIMARY).map(|f| &f.value)
}

/// An ASCII (or UNDEFINED) tag as text, trailing NULs and spaces removed; `None` when empty.
fn ascii_tag(exif: &Exif, tag: Tag) -> Option<String> {
    let bytes = match field_value(exif, tag)? {
        Value::Ascii(parts) => parts.first()?.as_slice(),
        Value::Undefined(bytes, _) => bytes.as_slice(),
        _ => return None,
    };
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end_matches(['\0', ' ']).trim_start();
    (!text.is_empty()).then(|| text.to_string())
}

/// The `index`-th value of a RATIONAL (or SRATIONAL) tag, `None` when absent or x/0.
fn rational_at(exif: &Exif, tag: Tag, index: usize) -> Option<f64> {
    let x = match field_value(exif, tag)? {
        Value::Rational(v) => v.get(index).filter(|r| r.denom != 0)?.to_f64(),
        Value::SRational(v) => v.get(index).filter(|r| r.denom != 0)?.to_f64(),
        _ => return None,
    };
    x.is_finite().then_some(x)
}

fn uint_tag(exif: &Exif, tag: Tag) -> Option<u32> {
    field_value(exif, tag)?.get_uint(0)
}

fn coordinate(exif: &Exif, tag: Tag, ref_tag: Tag, negative: char) -> Result<Option<f64>, String> {
    if field_value(exif, tag).is_none() {
        return Ok(None);
    }
    let (Some(d), Some(m), Some(s)) = (
        rational_at(exif, tag, 0),
        rational_at(exif, tag, 1),
        rational_at(exif, tag, 2),
    ) else {
        return Err(format!(
            "{tag} is malformed: need 3 rationals (degrees, minutes, seconds) with non-zero denominators"
        ));
    };
    let value = d + m / 60.0 + s / 3600.0;
    let sign = match ascii_tag(exif, ref_tag) {
        Some(r) if r.to_ascii_uppercase().starts_with(negative) => -1.0,
        _ => 1.0,
    };
    Ok(Some(sign * value))
}

fn meta_from_raw_exif(exif: &Exif) -> Result<ImageMeta, String> {
    let lat = coordinate(exif, Tag::GPSLatitude, Tag::GPSLatitudeRef, 'S')?;
    let lon = coordinate(exif, Tag::GPSLongitude, Tag::GPSLongitudeRef, 'W')?;
    let (Some(lat), Some(lon)) = (lat, lon) else {
        return Err("no GPS position (GPSLatitude/GPSLongitude missing)".to_string());
    };
    if !(-90.0..=90.0).contains(&lat) {
        return Err(format!("GPSLatitude {lat} is outside [-90, 90]"));
    }
    if !(-180.0..=180.0).contains(&lon) {
        return Err(format!("GPSLongitude {lon} is outside [-180, 180]"));
    }
    let captured_at_ms = gps_time_ms(exif)
        .or_else(|| exif_time_ms(exif, Tag::DateTimeOriginal, Tag::SubSecTimeOriginal, Tag::OffsetTimeOriginal))
        .or_else(|| exif_time_ms(exif, Tag::DateTimeDigitized, Tag::SubSecTimeDigitized, Tag::OffsetTimeDigitized))
        .or_else(|| exif_time_ms(exif, Tag::DateTime, Tag::SubSecTime, Tag::OffsetTime))
        .ok_or("no capture time (no usable GPSDateStamp+GPSTimeStamp, DateTimeOriginal, DateTimeDigitized or DateTime)")?;
    let altitude = rational_at(exif, Tag::GPSAltitude, 0).map(|a| {
        if uint_tag(exif, Tag::GPSAltitudeRef) == Some(1) {
            -a
        } else {
            a
        }
    });
    let compass_angle =
        rational_at(exif, Tag::GPSImgDirection, 0).or_else(|| rational_at(exif, Tag::GPSTrack, 0));
    Ok(ImageMeta {
        lat,
        lon,
        altitude,
        captured_at_ms,
        compass_angle,
        make: ascii_tag(exif, Tag::Make),
        model: ascii_tag(exif, Tag::Model),
        orientation: uint_tag(exif, Tag::Orientation)
            .filter(|o| (1..=8).contains(o))
            .and_then(|o| u16::try_from(o).ok()),
        filename: None,
        width: uint_tag(exif, Tag::PixelXDimension),
        height: uint_tag(exif, Tag::PixelYDimension),
        source: MetaSource::RawExif,
        description: None,
    })
}

/// `YYYY:MM:DD` or `YYYY-MM-DD`.
fn parse_exif_date(s: &str) -> Option<Date> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b[7] || !matches!(b[4], b':' | b'-') {
        return None;
    }
    let year: i32 = s.get(0..4)?.parse().ok()?;
    let month: u8 = s.get(5..7)?.parse().ok()?;
    let day: u8 = s.get(8..10)?.parse().ok()?;
    Date::from_calendar_date(year, Month::try_from(month).ok()?, day).ok()
}

/// GPSDateStamp + GPSTimeStamp (UTC); `None` when absent, malformed or dated 1970-01-01.
fn gps_time_ms(exif: &Exif) -> Option<i64> {
    let date = parse_exif_date(&ascii_tag(exif, Tag::GPSDateStamp)?)?;
    if date == Date::from_calendar_date(1970, Month::January, 1).ok()? {
        return None;
    }
    let h = rational_at(exif, Tag::GPSTimeStamp, 0)?;
    let m = rational_at(exif, Tag::GPSTimeStamp, 1)?;
    let s = rational_at(exif, Tag::GPSTimeStamp, 2)?;
    if !(0.0..48.0).contains(&h) || !(0.0..120.0).contains(&m) || !(0.0..120.0).contains(&s) {
        return None;
    }
    // Like Python's timedelta: hours and minutes truncated, seconds kept to the microsecond.
    let micros = (h.trunc() * 3_600e6 + m.trunc() * 60e6 + (s * 1e6).round()) as i64;
    let midnight = unix_ms(PrimitiveDateTime::new(date, Time::MIDNIGHT), UtcOffset::UTC);
    Some(midnight + micros / 1000)
}

/// `±HH:MM` (also `±HH` and `Z`).
fn parse_offset(s: &str) -> Option<UtcOffset> {
    let s = s.trim();
    if s == "Z" {
        return Some(UtcOffset::UTC);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
    let h: i8 = h.parse().ok()?;
    let m: i8 = m.parse().ok()?;
    UtcOffset::from_hms(sign * h, sign * m, 0).ok()
}

/// A date/time tag with its sub-second and offset tags; no (valid) offset → UTC (sim choice:
/// mapillary_tools would use the uploading machine's local zone).
fn exif_time_ms(exif: &Exif, dt_tag: Tag, subsec_tag: Tag, offset_tag: Tag) -> Option<i64> {
    let text = ascii_tag(exif, dt_tag)?;
    let (date, clock) = text.split_once(' ')?;
    let date = parse_exif_date(date)?;
    let clock = clock.trim();
    let mut fields = clock.split(':');
    let h: u8 = fields.next()?.parse().ok()?;
    let m: u8 = fields.next()?.parse().ok()?;
    let sec = fields.next()?;
    if fields.next().is_some() {
        return None;
    }
    let (sec, inline_frac) = sec.split_once('.').unwrap_or((sec, ""));
    let sec: u8 = sec.parse().ok()?;
    let frac = match ascii_tag(exif, subsec_tag) {
        Some(subsec) => subsec.trim().replace(' ', "0"),
        None => inline_frac.to_string(),
    };
    let frac: String = frac.chars().take_while(char::is_ascii_digit).take(6).collect();
    let micro: u32 = format!("{frac:0<6}").parse().ok()?;
    // "24:00:00" means midnight of the next day (as mapillary_tools handles it).
    let (h, day_carry) = if h == 24 { (0, 1) } else { (h, 0) };
    let time = Time::from_hms_micro(h, m, sec, micro).ok()?;
    let offset = ascii_tag(exif, offset_tag)
        .and_then(|o| parse_offset(&o))
        .unwrap_or(UtcOffset::UTC);
    Some(unix_ms(PrimitiveDateTime::new(date, time), offset) + day_carry * 86_400_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_fixtures::{jpeg, ImageSpec, TimeTags};
    use serde_json::json;
    use std::io::Write;
    use time::macros::datetime;

    fn at() -> time::OffsetDateTime {
        datetime!(2024-05-01 10:00:00.257 UTC)
    }

    const AT_MS: i64 = 1_714_557_600_257;

    fn desc() -> Json {
        json!({
            "MAPAltitude": 77.42,
            "MAPCaptureTime": "2024_05_01_10_00_00_250",
            "MAPCompassHeading": {"MagneticHeading": 133.54, "TrueHeading": 133.54},
            "MAPDeviceMake": "DescMake",
            "MAPDeviceModel": "DescModel",
            "MAPFilename": "IMG_0000.jpg",
            "MAPLatitude": 50.8966,
            "MAPLongitude": -0.5591,
            "MAPOrientation": 1
        })
    }

    fn with_desc(d: &Json) -> Vec<u8> {
        // Raw EXIF deliberately disagrees, to prove the description wins.
        let mut spec = ImageSpec::new(10.0, 20.0, at());
        spec.image_description = Some(d.to_string());
        jpeg(&spec)
    }

    #[test]
    fn description_is_the_primary_source() {
        let meta = parse_jpeg("0.jpg", &with_desc(&desc())).expect("accepted");
        assert_eq!(meta.source, MetaSource::Description);
        assert_eq!((meta.lat, meta.lon), (50.8966, -0.5591));
        assert_eq!(meta.captured_at_ms, 1_714_557_600_250);
        assert_eq!(meta.altitude, Some(77.42));
        assert_eq!(meta.compass_angle, Some(133.54));
        assert_eq!(meta.make.as_deref(), Some("DescMake"));
        assert_eq!(meta.model.as_deref(), Some("DescModel"));
        assert_eq!(meta.orientation, Some(1));
        assert_eq!(meta.filename.as_deref(), Some("IMG_0000.jpg"));
        assert_eq!((meta.width, meta.height), (Some(64), Some(48)));
        assert_eq!(meta.description, Some(desc()));
    }

    #[test]
    fn minimal_description_and_fraction_padding() {
        let d = json!({"MAPLatitude": -1, "MAPLongitude": 2.5, "MAPCaptureTime": "2024_05_01_10_00_00_25",
                       "MAPSequenceUUID": "abc", "MAPOrientation": 3.0, "MAPMetaTags": {}});
        let meta = parse_jpeg("x", &with_desc(&d)).expect("accepted");
        assert_eq!(meta.captured_at_ms, 1_714_557_600_250, "%f pads on the right");
        assert_eq!(meta.orientation, Some(3));
        assert_eq!((meta.altitude, meta.compass_angle, meta.make), (None, None, None));
        assert_eq!(
            parse_capture_time("2024_05_01_10_00_00_999999"),
            Ok(1_714_557_600_999)
        );
        assert_eq!(parse_capture_time("1970_01_01_00_00_00_0"), Ok(0));
    }

    #[test]
    fn invalid_descriptions_are_rejected_naming_the_key() {
        let cases: Vec<(&str, Json)> = vec![
            ("MAPLatitude", {
                let mut d = desc();
                d.as_object_mut().map(|o| o.remove("MAPLatitude"));
                d
            }),
            (
                "MAPLatitude",
                json!({"MAPLatitude": 90.5, "MAPLongitude": 1, "MAPCaptureTime": "2024_05_01_10_00_00_000"}),
            ),
            (
                "MAPLongitude",
                json!({"MAPLatitude": 1, "MAPLongitude": -180.1, "MAPCaptureTime": "2024_05_01_10_00_00_000"}),
            ),
            (
                "MAPLatitude",
                json!({"MAPLatitude": "1", "MAPLongitude": 1, "MAPCaptureTime": "2024_05_01_10_00_00_000"}),
            ),
            (
                "MAPLatitude",
                json!({"MAPLatitude": true, "MAPLongitude": 1, "MAPCaptureTime": "2024_05_01_10_00_00_000"}),
            ),
            // regex ok, strptime fails (month 13, Feb 30, second 60)
            (
                "MAPCaptureTime",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": "2024_13_01_10_00_00_000"}),
            ),
            (
                "MAPCaptureTime",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": "2024_02_30_10_00_00_000"}),
            ),
            (
                "MAPCaptureTime",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": "2024_02_01_10_00_60_000"}),
            ),
            // regex fails / %f too long / ISO format
            (
                "MAPCaptureTime",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": "2024_05_01_10_00_00"}),
            ),
            (
                "MAPCaptureTime",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": "2024_05_01_10_00_00_1234567"}),
            ),
            (
                "MAPCaptureTime",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": "2024-05-01T10:00:00Z"}),
            ),
            (
                "MAPCaptureTime",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": 1714557600}),
            ),
            (
                "MAPCompassHeading",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": "2024_05_01_10_00_00_000",
                "MAPCompassHeading": {"TrueHeading": 1}}),
            ),
            (
                "MAPCompassHeading",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": "2024_05_01_10_00_00_000",
                "MAPCompassHeading": {"TrueHeading": 1, "MagneticHeading": 1, "Accuracy": 2}}),
            ),
            (
                "MAPCompassHeading",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": "2024_05_01_10_00_00_000",
                "MAPCompassHeading": 90}),
            ),
            (
                "MAPFoo",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": "2024_05_01_10_00_00_000", "MAPFoo": 1}),
            ),
            (
                "filename",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": "2024_05_01_10_00_00_000", "filename": "a"}),
            ),
            (
                "MAPOrientation",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": "2024_05_01_10_00_00_000", "MAPOrientation": 1.5}),
            ),
            (
                "MAPDeviceMake",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": "2024_05_01_10_00_00_000", "MAPDeviceMake": 7}),
            ),
            (
                "MAPAltitude",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": "2024_05_01_10_00_00_000", "MAPAltitude": null}),
            ),
            (
                "MAPSequenceUUID",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": "2024_05_01_10_00_00_000", "MAPSequenceUUID": "!!"}),
            ),
            (
                "MAPMetaTags",
                json!({"MAPLatitude": 1, "MAPLongitude": 1, "MAPCaptureTime": "2024_05_01_10_00_00_000", "MAPMetaTags": []}),
            ),
            ("object", json!([1, 2])),
        ];
        for (key, d) in cases {
            let err = validate_description(&d).expect_err(&d.to_string());
            assert!(err.contains(key), "{d} → {err:?} should name {key}");
            let rejected = parse_jpeg("bad.jpg", &with_desc(&d)).expect_err(&d.to_string());
            assert_eq!(rejected.name, "bad.jpg");
            assert!(rejected.reason.contains(key), "{}", rejected.reason);
            assert!(rejected.reason.contains("description"), "{}", rejected.reason);
        }
    }

    #[test]
    fn broken_json_description_is_rejected_but_plain_text_falls_back() {
        let mut spec = ImageSpec::new(10.0, 20.0, at());
        spec.image_description = Some("{\"MAPLatitude\": 1,".into());
        let r = parse_jpeg("a", &jpeg(&spec)).expect_err("broken JSON");
        assert!(r.reason.contains("not valid JSON"), "{}", r.reason);

        spec.image_description = Some("OLYMPUS DIGITAL CAMERA         ".into());
        let meta = parse_jpeg("a", &jpeg(&spec)).expect("plain text is ignored");
        assert_eq!(meta.source, MetaSource::RawExif);
        assert_eq!(meta.description, None);
    }

    fn check_raw(big_endian: bool) {
        let mut spec = ImageSpec::new(-33.856_784_3, 151.215_296_7, at());
        spec.big_endian = big_endian;
        spec.altitude = Some(-12.5);
        spec.heading = Some(271.25);
        spec.orientation = Some(6);
        spec.width = 40;
        spec.height = 30;
        let meta = parse_jpeg("r.jpg", &jpeg(&spec)).expect("accepted");
        assert_eq!(meta.source, MetaSource::RawExif);
        assert!((meta.lat - spec.lat).abs() < 1e-7, "{}", meta.lat);
        assert!((meta.lon - spec.lon).abs() < 1e-7, "{}", meta.lon);
        assert_eq!(meta.captured_at_ms, AT_MS);
        assert_eq!(meta.altitude, Some(-12.5));
        assert_eq!(meta.compass_angle, Some(271.25));
        assert_eq!(meta.make.as_deref(), Some("TestMake"));
        assert_eq!(meta.model.as_deref(), Some("TestModel"));
        assert_eq!(meta.orientation, Some(6));
        assert_eq!((meta.width, meta.height), (Some(40), Some(30)));
        assert_eq!(meta.filename, None);

        // Each time source alone gives the same instant.
        for tags in [
            TimeTags::Gps,
            TimeTags::DateTimeOriginal {
                offset: Some("+02:00".into()),
            },
            TimeTags::DateTimeOriginal {
                offset: Some("-09:30".into()),
            },
            TimeTags::DateTimeOriginal { offset: None },
        ] {
            spec.time_tags = tags.clone();
            let meta = parse_jpeg("r.jpg", &jpeg(&spec)).expect("accepted");
            assert_eq!(meta.captured_at_ms, AT_MS, "{tags:?}");
        }
    }

    #[test]
    fn raw_exif_fallback_little_endian() {
        check_raw(false);
    }

    #[test]
    fn raw_exif_fallback_big_endian() {
        check_raw(true);
    }

    #[test]
    fn gps_time_wins_over_datetime_original() {
        // The fixture writes "+05" verbatim with a UTC wall time; this parser reads it as
        // +05:00, so DateTimeOriginal alone gives an instant 5 h earlier than the truth.
        let mut spec = ImageSpec::new(1.0, 1.0, at());
        spec.time_tags = TimeTags::DateTimeOriginal {
            offset: Some("+05".into()),
        };
        let dto = parse_jpeg("a", &jpeg(&spec)).map(|m| m.captured_at_ms);
        assert_eq!(dto, Ok(AT_MS - 5 * 3_600_000));
        spec.time_tags = TimeTags::Both {
            offset: Some("+05".into()),
        };
        let both = parse_jpeg("a", &jpeg(&spec)).map(|m| m.captured_at_ms);
        assert_eq!(both, Ok(AT_MS), "GPS date/time is preferred");
    }

    #[test]
    fn missing_position_time_or_real_fix_is_rejected() {
        let mut spec = ImageSpec::new(1.0, 1.0, at());
        spec.with_gps = false;
        let r = parse_jpeg("nogps.jpg", &jpeg(&spec)).expect_err("no gps");
        assert!(r.reason.contains("no GPS position"), "{}", r.reason);

        let mut spec = ImageSpec::new(1.0, 1.0, at());
        spec.time_tags = TimeTags::None;
        let r = parse_jpeg("notime.jpg", &jpeg(&spec)).expect_err("no time");
        assert!(r.reason.contains("no capture time"), "{}", r.reason);

        let spec = ImageSpec::new(0.0, 0.0, at());
        let r = parse_jpeg("null.jpg", &jpeg(&spec)).expect_err("null island");
        assert!(r.reason.contains("null island"), "{}", r.reason);
        let d = json!({"MAPLatitude": 0, "MAPLongitude": 0.0, "MAPCaptureTime": "2024_05_01_10_00_00_000"});
        let r = parse_jpeg("null.jpg", &with_desc(&d)).expect_err("null island");
        assert!(r.reason.contains("null island"), "{}", r.reason);
    }

    #[test]
    fn structural_problems_have_precise_reasons() {
        let good = jpeg(&ImageSpec::new(1.0, 1.0, at()));
        let reason = |b: &[u8]| parse_jpeg("x", b).expect_err("rejected").reason;
        assert!(reason(b"\x89PNG\r\n\x1a\n").contains("missing SOI"));
        assert!(reason(b"").contains("missing SOI"));
        assert!(reason(&good[..good.len() - 2]).contains("no EOI"));
        assert!(reason(&good[..100]).contains("truncated JPEG"));

        // Drop the APP1 segment → no EXIF.
        let app1_len = usize::from(u16::from_be_bytes([good[4], good[5]]));
        let mut no_exif = good[..2].to_vec();
        no_exif.extend_from_slice(&good[4 + app1_len..]);
        assert!(reason(&no_exif).contains("no EXIF"));

        // Break the TIFF header inside the APP1 segment.
        let mut bad_tiff = good.clone();
        bad_tiff[12..16].copy_from_slice(b"XXXX");
        assert!(reason(&bad_tiff).contains("corrupt EXIF"));
    }

    /// Sets the next-IFD pointer of the Exif and GPS IFDs of a big-endian fixture, as piexif
    /// (mapillary_tools' EXIF writer) does — observed values 842019380 and 50.
    fn piexif_style_next_pointers(jpeg_bytes: &mut [u8]) {
        let tiff_start = 12; // SOI, APP1 marker + length, "Exif\0\0"
        let be16 = |b: &[u8], o: usize| usize::from(u16::from_be_bytes([b[o], b[o + 1]]));
        let be32 = |b: &[u8], o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as usize;
        let t = tiff_start;
        assert_eq!(&jpeg_bytes[t..t + 2], b"MM");
        let ifd0 = t + be32(jpeg_bytes, t + 4);
        let mut patched = 0;
        for k in 0..be16(jpeg_bytes, ifd0) {
            let entry = ifd0 + 2 + 12 * k;
            let tag = be16(jpeg_bytes, entry);
            let garbage: u32 = match tag {
                0x8769 => 842_019_380,
                0x8825 => 50,
                _ => continue,
            };
            let child = t + be32(jpeg_bytes, entry + 8);
            let next = child + 2 + 12 * be16(jpeg_bytes, child);
            jpeg_bytes[next..next + 4].copy_from_slice(&garbage.to_be_bytes());
            patched += 1;
        }
        assert_eq!(patched, 2);
    }

    #[test]
    fn tolerates_piexif_next_ifd_garbage() {
        let mut spec = ImageSpec::new(50.0, 8.0, at());
        spec.big_endian = true;
        spec.image_description = Some(desc().to_string());
        let mut bytes = jpeg(&spec);
        piexif_style_next_pointers(&mut bytes);
        assert!(
            exif::Reader::new()
                .read_from_container(&mut Cursor::new(&bytes))
                .is_err(),
            "the strict reader refuses this, so the test exercises the lenient path"
        );
        let meta = parse_jpeg("0.jpg", &bytes).expect("accepted");
        assert_eq!(meta.source, MetaSource::Description);
        assert_eq!(meta.lat, 50.8966);
        spec.image_description = None;
        let mut bytes = jpeg(&spec);
        piexif_style_next_pointers(&mut bytes);
        let meta = parse_jpeg("0.jpg", &bytes).expect("accepted");
        assert_eq!(meta.source, MetaSource::RawExif);
        assert_eq!(meta.captured_at_ms, AT_MS);
    }

    fn zip_of(entries: &[(&str, &[u8])], method: zip::CompressionMethod) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default().compression_method(method);
        for (name, data) in entries {
            if let Some(dir) = name.strip_suffix('/') {
                w.add_directory(dir, opts).expect("dir");
            } else {
                w.start_file(*name, opts).expect("start");
                w.write_all(data).expect("write");
            }
        }
        w.set_comment("{\"sequence_md5sum\":\"00000000000000000000000000000000\"}")
            .expect("comment");
        w.finish().expect("finish").into_inner()
    }

    fn sample_zip(method: zip::CompressionMethod) -> Vec<u8> {
        let mut a = ImageSpec::new(50.0, 8.0, at());
        a.image_description = Some(desc().to_string());
        let mut b = ImageSpec::new(50.1, 8.1, at());
        b.big_endian = true;
        let mut nogps = ImageSpec::new(50.2, 8.2, at());
        nogps.with_gps = false;
        zip_of(
            &[
                ("0.jpg", &jpeg(&a)),
                ("notes.txt", b"hello"),
                ("dir/", b""),
                ("1.jpg", &jpeg(&b)),
                ("2.jpg", &jpeg(&nogps)),
            ],
            method,
        )
    }

    fn check_zip(method: zip::CompressionMethod) {
        let bytes = sample_zip(method);
        let parsed = parse_zip(&bytes).expect("zip");
        let names: Vec<&str> = parsed.images.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["0.jpg", "1.jpg"]);
        assert_eq!(parsed.images[0].1.source, MetaSource::Description);
        assert_eq!(parsed.images[0].1.lat, 50.8966);
        assert_eq!(parsed.images[1].1.source, MetaSource::RawExif);
        assert!((parsed.images[1].1.lat - 50.1).abs() < 1e-7);
        let rejected: Vec<&str> = parsed.rejected.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(rejected, ["notes.txt", "dir/", "2.jpg"]);
        assert!(parsed.rejected[0].reason.contains("not a JPEG"));
        assert!(parsed.rejected[1].reason.contains("directory"));
        assert!(parsed.rejected[2].reason.contains("no GPS"));
    }

    #[test]
    fn zip_stored() {
        check_zip(zip::CompressionMethod::Stored);
    }

    #[test]
    fn zip_deflated() {
        check_zip(zip::CompressionMethod::Deflated);
    }

    #[test]
    fn zip_level_errors() {
        assert!(matches!(parse_zip(b"not a zip"), Err(ContentError::NotZip(_))));
        assert!(matches!(parse_zip(b""), Err(ContentError::NotZip(_))));
        let empty = zip_of(&[], zip::CompressionMethod::Stored);
        let err = parse_zip(&empty).expect_err("empty");
        assert!(matches!(err, ContentError::EmptyArchive));
        assert!(err.to_string().contains("empty archive"));
    }

    #[test]
    fn truncations_and_corruptions_never_panic() {
        let mut spec = ImageSpec::new(1.0, 1.0, at());
        spec.image_description = Some(desc().to_string());
        let good = jpeg(&spec);
        for n in 0..good.len() {
            let r = parse_jpeg("t", &good[..n]);
            assert!(r.is_err(), "a {n}-byte prefix must not be accepted");
        }
        let zip_bytes = sample_zip(zip::CompressionMethod::Deflated);
        for n in 0..zip_bytes.len() {
            let _ = parse_zip(&zip_bytes[..n]);
        }
        // Deterministic byte flips over both inputs.
        let mut state: u64 = 0x1234_5678_9ABC_DEF1;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let mut j = good.clone();
            let mut z = zip_bytes.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % j.len() as u64) as usize;
                j[i] = next() as u8;
                let i = (next() % z.len() as u64) as usize;
                z[i] = next() as u8;
            }
            let _ = parse_jpeg("f", &j);
            let _ = parse_zip(&z);
        }
    }

    #[test]
    fn tools_shape_is_recognised_and_each_deviation_named() {
        let entry = |name: &str, dt: Option<(u16, u16)>| ZipEntryInfo {
            name: name.to_string(),
            dos_datetime: dt,
        };
        let good = ZipLayout {
            comment: br#"{"sequence_md5sum":"0123456789abcdef0123456789abcdef"}"#.to_vec(),
            entries: vec![
                entry("0.jpg", Some(DOS_1980_01_01)),
                entry("1.jpg", Some(DOS_1980_01_01)),
            ],
        };
        assert_eq!(good.tools_shape_problem(), None);
        let problem = |f: &dyn Fn(&mut ZipLayout)| {
            let mut l = good.clone();
            f(&mut l);
            l.tools_shape_problem().expect("a problem")
        };
        for comment in [
            &b""[..],
            br#"{"upload_md5sum":"0123456789abcdef0123456789abcdef"}"#,
            br#"{"sequence_md5sum":"0123456789ABCDEF0123456789ABCDEF"}"#,
            br#"{"sequence_md5sum":"0123"}"#,
            br#"{"sequence_md5sum":"0123456789abcdef0123456789abcdef","x":1}"#,
            br#"["sequence_md5sum"]"#,
        ] {
            let p = problem(&|l| l.comment = comment.to_vec());
            assert!(p.contains("archive comment"), "{p}");
        }
        let p = problem(&|l| l.entries[1].name = "IMG_1.jpg".into());
        assert!(p.contains("entry 1 is named \"IMG_1.jpg\""), "{p}");
        let p = problem(&|l| l.entries.swap(0, 1));
        assert!(p.contains("must be \"0.jpg\""), "{p}");
        // 2024-05-01 09:30:10 in MS-DOS form.
        let date = ((2024 - 1980) << 9) | (5 << 5) | 1;
        let time = (9 << 11) | (30 << 5) | 5;
        let p = problem(&|l| l.entries[0].dos_datetime = Some((date, time)));
        assert!(p.contains("dated 2024-05-01 09:30:10"), "{p}");
        let p = problem(&|l| l.entries[0].dos_datetime = None);
        assert!(p.contains("an invalid date"), "{p}");
    }

    #[test]
    fn zip_layout_is_read_from_the_archive() {
        let bytes = sample_zip(zip::CompressionMethod::Stored);
        let parsed = parse_zip(&bytes).expect("zip");
        assert_eq!(
            parsed.layout.comment,
            b"{\"sequence_md5sum\":\"00000000000000000000000000000000\"}"
        );
        let names: Vec<&str> = parsed.layout.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["0.jpg", "notes.txt", "dir/", "1.jpg", "2.jpg"]);
        assert!(parsed
            .layout
            .entries
            .iter()
            .all(|e| e.dos_datetime == Some(DOS_1980_01_01)));
        assert!(
            parsed.layout.tools_shape_problem().is_some(),
            "notes.txt is not entry 1"
        );
        let kinds: Vec<RejectKind> = parsed.rejected.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [RejectKind::Jpeg, RejectKind::Entry, RejectKind::RawExif]);
        assert!(RejectKind::RawExif.lacks_description());
        assert!(!RejectKind::Jpeg.lacks_description());
    }

    #[test]
    fn manifest_is_parsed_strictly() {
        let ok = br#"{"image_handles":["h1","h2"],"upload_type":"images","version":"1"}"#;
        let m = parse_manifest(ok).expect("valid");
        assert_eq!(m.image_handles, ["h1", "h2"]);
        let bad: &[&[u8]] = &[
            br#"{"image_handles":["h1"],"upload_type":"video","version":"1"}"#,
            br#"{"image_handles":["h1"],"upload_type":"images","version":"2"}"#,
            br#"{"image_handles":[],"upload_type":"images","version":"1"}"#,
            br#"{"image_handles":[""],"upload_type":"images","version":"1"}"#,
            br#"{"image_handles":["h1"],"upload_type":"images","version":"1","x":1}"#,
            br#"{"image_handles":["h1"],"upload_type":"images"}"#,
            br#"{"image_handles":[1],"upload_type":"images","version":"1"}"#,
            br#"{"image_handles":["h1"],"upload_type":"images","version":1}"#,
            br#"[]"#,
            b"\xff\xfe",
        ];
        for b in bad {
            let e = parse_manifest(b).expect_err(&String::from_utf8_lossy(b));
            assert!(e.to_string().starts_with("bad bundle manifest"), "{e}");
        }
    }
}
