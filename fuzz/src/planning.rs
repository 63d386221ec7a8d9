//! zip-and-push's planning path, pure, as one function: image bytes → EXIF head walk (as the ranged
//! reads of `exifpass` grow it) → capture metadata → sequence rules and MAP* descriptions → header
//! rewrite → zip entry sizes → zip plan, local headers and tail. Any bytes must end in a plan or
//! in recorded rejections; a panic or an arithmetic overflow (the fuzz builds have overflow checks
//! on) is a finding, and so is a broken invariant (the `assert!`s below).
//!
//! Shared by the libFuzzer targets `planning_path` (raw bytes) and `planning_fields` (EXIF field
//! values from a structured generator, [`jpeg_from_fields`]) and by the stable mutation test
//! `shared/tests/domain_planning_fuzz.rs`, which includes this file with `crate::domain` pointing
//! at `shared::domain`.

use std::collections::HashMap;

use crate::domain::description;
use crate::domain::exif::{self, HeaderExtent, ImageMetadata};
use crate::domain::jpeg;
use crate::domain::sequence::{plan_sequences, SequenceConfig, SequenceInput};
use crate::domain::zipfmt::{self, EntryRecord, ZipPlan};

/// Separates the files of one input (several images make the sequence rules do something).
pub const NEXT_FILE: &[u8] = b"NEXTJPEG";
/// At most this many files per input.
pub const MAX_FILES: usize = 8;
/// zip-and-push's first ranged read (`exifpass::INITIAL_HEAD`), scaled down so that small inputs
/// still take the grow-and-retry path.
const INITIAL_HEAD: usize = 64;
/// zip-and-push's largest head (`exifpass::MAX_HEAD`).
const MAX_HEAD: usize = 2 * 1024 * 1024;

/// Splits `data` at [`NEXT_FILE`] into at most [`MAX_FILES`] files and plans them.
pub fn run_bytes(data: &[u8]) {
    let files: Vec<(String, Vec<u8>)> = split_files(data)
        .into_iter()
        .enumerate()
        .map(|(i, f)| (format!("dir{}/IMG_{i}.jpg", i % 2), f.to_vec()))
        .collect();
    plan_files(&files);
}

/// Decodes each part of `data` (split as in [`run_bytes`]) into EXIF field values, builds a JPEG
/// from them ([`jpeg_from_fields`]) and plans the files.
pub fn run_fields(data: &[u8]) {
    let mut files = Vec::new();
    for (i, part) in split_files(data).into_iter().enumerate() {
        let fields = Fields::decode(part);
        let Some(bytes) = jpeg_from_fields(&fields) else {
            continue;
        };
        if fields.twin {
            // The same camera one second later, a few metres on: sequences of more than one image.
            let mut next = fields.clone();
            next.seconds_later = 1;
            if let Some(b) = jpeg_from_fields(&next) {
                files.push((format!("IMG_{i}b.jpg"), b));
            }
        }
        files.push((format!("IMG_{i}.jpg"), bytes));
    }
    plan_files(&files);
}

fn split_files(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() + 1 < MAX_FILES {
        match rest.windows(NEXT_FILE.len()).position(|w| w == NEXT_FILE) {
            Some(at) => {
                out.push(&rest[..at]);
                rest = &rest[at + NEXT_FILE.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

/// What `exifpass::read_one` keeps of an accepted image.
struct Head {
    head: Vec<u8>,
    size: u64,
    meta: ImageMetadata,
}

/// `exifpass::read_one` without the store: grow the head as ranged reads would until the walk is
/// complete, then decode. `Err` is the rejection reason.
fn read_head(file: &[u8]) -> Result<Head, String> {
    let mut want = INITIAL_HEAD.min(file.len());
    loop {
        let head = &file[..want];
        match exif::header_extent(head).map_err(|e| e.to_string())? {
            HeaderExtent::Complete { header_end, exif } => {
                assert!(
                    header_end <= want,
                    "header_end {header_end} past the head of {want}"
                );
                if let Some(r) = &exif {
                    assert!(
                        r.start <= r.end && r.end <= header_end,
                        "exif range {r:?} past {header_end}"
                    );
                }
                let meta = exif::read_metadata(head).map_err(|e| e.to_string())?;
                return Ok(Head {
                    head: head[..header_end].to_vec(),
                    size: file.len() as u64,
                    meta,
                });
            }
            HeaderExtent::NeedMore { at_least } => {
                assert!(
                    at_least > want,
                    "NeedMore {at_least} must exceed the {want} bytes given"
                );
                if want == file.len() {
                    return Err(exif::ExifError::Truncated {
                        have: want,
                        need: at_least,
                    }
                    .to_string());
                }
                if at_least > MAX_HEAD {
                    return Err(format!("header extends past {MAX_HEAD} bytes"));
                }
                want = at_least.max(want.saturating_mul(2)).min(file.len());
            }
        }
    }
}

/// The planning path over `files` (name, bytes); panics only on a broken invariant.
pub fn plan_files(files: &[(String, Vec<u8>)]) {
    let mut heads: HashMap<&str, Head> = HashMap::new();
    let mut inputs = Vec::new();
    let mut rejected = 0usize;
    for (name, bytes) in files {
        match read_head(bytes) {
            Ok(h) => {
                let m = &h.meta;
                // What the EXIF reader accepts, a description can hold.
                assert!(
                    m.lat.is_finite() && (-90.0..=90.0).contains(&m.lat),
                    "lat {}",
                    m.lat
                );
                assert!(
                    m.lon.is_finite() && (-180.0..=180.0).contains(&m.lon),
                    "lon {}",
                    m.lon
                );
                assert!(
                    exif::capture_time_in_range(m.captured_at),
                    "time {}",
                    m.captured_at
                );
                assert_eq!(m.captured_at.offset(), time::UtcOffset::UTC);
                assert!((1..=8).contains(&m.orientation));
                if let Err(e) = description::check_describable(m) {
                    panic!("accepted metadata is not describable: {e}: {m:?}");
                }
                inputs.push(SequenceInput {
                    name: name.clone(),
                    meta: h.meta.clone(),
                    file_size: Some(h.size),
                });
                heads.insert(name.as_str(), h);
            }
            Err(reason) => {
                assert!(!reason.is_empty());
                rejected += 1;
            }
        }
    }
    let accepted = inputs.len();
    assert_eq!(accepted + rejected, files.len());
    // Small limits so that a handful of images exercise the splits.
    let cfg = SequenceConfig {
        max_images_per_upload: 3,
        max_sequence_filesize: Some(1 << 20),
        max_sequence_pixels: Some(1 << 24),
        ..SequenceConfig::default()
    };
    let plan = plan_sequences(inputs, &cfg);
    let planned: usize = plan.sequences.iter().map(|s| s.images.len()).sum();
    assert_eq!(
        planned + plan.dropped.len(),
        accepted,
        "every image planned or dropped"
    );
    for d in &plan.dropped {
        assert!(!d.reason.to_string().is_empty());
    }
    let comment_len = zipfmt::archive_comment(&"0".repeat(32)).len();
    for seq in &plan.sequences {
        assert!(!seq.images.is_empty());
        assert!(seq.images.len() <= cfg.max_images_per_upload);
        let mut sizes = Vec::new();
        for pi in &seq.images {
            // Every description we write passes mapillary_tools' schema checks.
            if let Err(e) = description::validate(&pi.description) {
                panic!("invalid description {}: {e}", pi.description);
            }
            assert!(pi.description.is_ascii());
            let Some(h) = heads.get(pi.name.as_str()) else {
                panic!("planned image {} was never read", pi.name);
            };
            let rh = match jpeg::rewrite_header(&h.head, &pi.description) {
                Ok(rh) => rh,
                // e.g. an EXIF block with no room for the description: a recorded rejection.
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    continue;
                }
            };
            assert!(rh.consumed <= h.head.len());
            let Some(entry_size) = rh.transformed_len(h.size) else {
                panic!("consumed {} > size {}", rh.consumed, h.size);
            };
            check_rewritten(h, &rh);
            sizes.push(entry_size);
        }
        if sizes.is_empty() {
            continue;
        }
        check_zip(&sizes, comment_len);
    }
}

/// The rewritten head must still be read the same way: the description changes nothing else.
fn check_rewritten(h: &Head, rh: &jpeg::RewrittenHeader) {
    let mut file = rh.header.clone();
    file.extend_from_slice(&h.head[rh.consumed..]);
    match exif::read_metadata(&file) {
        Ok(m) => {
            assert_eq!(
                (m.lat, m.lon),
                (h.meta.lat, h.meta.lon),
                "position after the rewrite"
            );
            assert_eq!(
                m.captured_at, h.meta.captured_at,
                "capture time after the rewrite"
            );
            assert_eq!(m.time_source, h.meta.time_source);
        }
        Err(e) => panic!("the rewritten header no longer reads: {e}"),
    }
    // Rewriting the rewritten file again consumes exactly the new header.
    if let Ok(again) = jpeg::rewrite_header(&file, "{}") {
        assert_eq!(
            again.consumed,
            rh.header.len(),
            "the rewritten Exif APP1 is found again"
        );
    }
}

fn check_zip(sizes: &[u64], comment_len: usize) {
    let plan = match ZipPlan::from_sizes(sizes, comment_len) {
        Ok(p) => p,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let mut records = Vec::new();
    for (i, e) in plan.entries().iter().enumerate() {
        assert_eq!(e.size, sizes[i]);
        let local = zipfmt::local_header(&e.name, 0, e.size).expect("a planned entry has a valid name");
        assert_eq!(local.len() as u64, e.data_offset - e.local_header_offset);
        records.push(EntryRecord {
            name: e.name.clone(),
            crc32: 0,
            size: e.size,
            local_header_offset: e.local_header_offset,
        });
    }
    let comment = vec![b'x'; comment_len];
    let tail = zipfmt::central_directory_and_end(&records, &comment).expect("tail of a valid plan");
    assert_eq!(tail.len() as u64, plan.tail_len());
    let total = plan.total_len();
    for offset in [0, total / 2, total.saturating_sub(1), total, u64::MAX] {
        let _ = plan.locate(offset);
    }
}

// ---------------------------------------------------------------------------------------------
// Structured generator: EXIF field values from bytes

/// EXIF field values for one image. Each value comes from a list of interesting ones (valid,
/// boundary, hostile) or, for selectors past the list, from the raw bytes that follow the
/// selector block.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    big_endian: bool,
    twin: bool,
    seconds_later: u32,
    lat: Option<Vec<(i64, u32)>>,
    lon: Option<Vec<(i64, u32)>>,
    lat_ref: Option<Vec<u8>>,
    lon_ref: Option<Vec<u8>>,
    altitude: Option<(i64, u32)>,
    altitude_ref: Option<u8>,
    heading: Option<(i64, u32)>,
    gps_date: Option<Vec<u8>>,
    gps_time: Option<Vec<(i64, u32)>>,
    dto: Option<Vec<u8>>,
    dto_subsec: Option<Vec<u8>>,
    dto_offset: Option<Vec<u8>>,
    datetime: Option<Vec<u8>>,
    datetime_offset: Option<Vec<u8>>,
    make: Option<Vec<u8>>,
    orientation: Option<u32>,
    width: Option<u32>,
    serial: Option<Vec<u8>>,
}

/// Reads selectors from the front and raw values from the pool behind them; runs dry as zeros.
struct Cursor<'a> {
    selectors: &'a [u8],
    pool: &'a [u8],
}

/// Number of selector bytes after the flags byte (one per field of [`Fields::decode`]).
const SELECTORS: usize = 18;

impl<'a> Cursor<'a> {
    fn selector(&mut self) -> u8 {
        let (first, rest) = self.selectors.split_first().unwrap_or((&0, &[]));
        self.selectors = rest;
        *first
    }
    fn raw(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.pool.len());
        let (a, b) = self.pool.split_at(n);
        self.pool = b;
        a.to_vec()
    }
    fn u32(&mut self) -> u32 {
        let mut b = self.raw(4);
        b.resize(4, 0);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    /// A template value for small selectors, raw bytes (length from the selector) otherwise;
    /// `None` for 255.
    fn text(&mut self, templates: &[&str]) -> Option<Vec<u8>> {
        let s = usize::from(self.selector());
        match s {
            255 => None,
            s if s < templates.len() => Some(templates[s].as_bytes().to_vec()),
            s => Some(self.raw(s % 40)),
        }
    }
    fn ratios(&mut self, templates: &[&[(i64, u32)]]) -> Option<Vec<(i64, u32)>> {
        let s = usize::from(self.selector());
        match s {
            255 => None,
            s if s < templates.len() => Some(templates[s].to_vec()),
            s => {
                let signed = s % 2 == 1;
                Some(
                    (0..(s % 5))
                        .map(|_| {
                            let num = self.u32();
                            let den = self.u32();
                            let num = if signed {
                                i64::from(num as i32)
                            } else {
                                i64::from(num)
                            };
                            (num, den)
                        })
                        .collect(),
                )
            }
        }
    }
    fn ratio(&mut self, templates: &[(i64, u32)]) -> Option<(i64, u32)> {
        let s = usize::from(self.selector());
        match s {
            255 => None,
            s if s < templates.len() => Some(templates[s]),
            _ => Some((i64::from(self.u32()), self.u32())),
        }
    }
    fn number(&mut self, templates: &[u32]) -> Option<u32> {
        let s = usize::from(self.selector());
        match s {
            255 => None,
            s if s < templates.len() => Some(templates[s]),
            _ => Some(self.u32()),
        }
    }
}

const LATS: &[&[(i64, u32)]] = &[
    &[(50, 1), (53, 1), (479_999, 10_000)],
    &[(50, 1), (53, 1), (480_999, 10_000)],
    &[(0, 1), (0, 1), (0, 1)],
    &[(90, 1), (0, 1), (1, 1)],
    &[(89, 1), (59, 1), (5_999_999, 100_000)],
    &[(50, 1), (53, 0), (0, 1)],
    &[(u32::MAX as i64, 1), (u32::MAX as i64, 1), (u32::MAX as i64, 1)],
    &[(-91, 1), (0, 1), (0, 1)],
    &[(50, 1), (53, 1)],
];
const LONS: &[&[(i64, u32)]] = &[
    &[(0, 1), (33, 1), (2_000, 100)],
    &[(0, 1), (33, 1), (2_100, 100)],
    &[(180, 1), (0, 1), (0, 1)],
    &[(180, 1), (0, 1), (1, 10)],
    &[(0, 1), (0, 1), (0, 1)],
    &[(179, 1), (59, 1), (5_999_999, 100_000)],
];
const LAT_REFS: &[&str] = &["N", "S", "s", "", "NS"];
const LON_REFS: &[&str] = &["E", "W", "w", "", "X"];
const ALTITUDES: &[(i64, u32)] = &[(7_742, 100), (0, 1), (1, 0), (u32::MAX as i64, 1)];
const HEADINGS: &[(i64, u32)] = &[(13_354, 100), (360, 1), (0, 1), (-90, 1), (1, 0)];
const GPS_DATES: &[&str] = &[
    "2024:05:01",
    "9999:12:31",
    "0001:01:01",
    "0999:12:31",
    "1000:01:01",
    "1970:01:01",
    "0000:01:01",
    "2024-05-01",
    "2024:02:30",
];
const GPS_TIMES: &[&[(i64, u32)]] = &[
    &[(10, 1), (0, 1), (257, 1000)],
    &[(23, 1), (59, 1), (59_999, 1000)],
    &[(24, 1), (0, 1), (0, 1)],
    &[(u32::MAX as i64, 1), (u32::MAX as i64, 1), (u32::MAX as i64, 1)],
    &[(-1, 1), (0, 1), (0, 1)],
    &[(10, 0), (0, 1), (0, 1)],
    &[(10, 1), (0, 1)],
];
const DATETIMES: &[&str] = &[
    "2024:05:01 10:00:00",
    "9999:12:31 23:59:59",
    "9999:12:31 24:00:00",
    "0001:01:01 00:00:00",
    "1000:01:01 00:00:00",
    "0999:12:31 23:59:59",
    "2021-07-15T15:37:30+10:00",
    "2021-07-15T15:37:30+25:00",
    "2021:07:15 15:37:30+25:00",
    "2021:07:15 15:37:30-99999999999999999999:00",
    "2021:07:15 99999999999:00:00",
    "2021:07:15 15:37:30.5Z",
    "0000:00:00 00:00:00",
    "9999-12-31T23:59:59.999999",
];
const SUBSECS: &[&str] = &["257", "", "9999999", "ab", " 5 ", "-1"];
const OFFSETS: &[&str] = &[
    "+00:00",
    "-01:00",
    "+14:00",
    "+25:00",
    "-48:30",
    "+99999999999999999999:00",
    "+1:2:3.5",
    "garbage",
];
const MAKES: &[&str] = &["TestMake", "", "  spaced  ", "Caf\u{e9}"];
const ORIENTATIONS: &[u32] = &[1, 6, 0, 9, 65_535];
const WIDTHS: &[u32] = &[64, 0, u32::MAX];
const SERIALS: &[&str] = &["AB-12 34", "", "###"];

impl Fields {
    /// Byte 0: flags (bit 0 big endian, bit 1 a twin one second later); bytes 1..=18: one
    /// selector per field; the rest: raw values for selectors past their lists. Short inputs
    /// read as zeros: an all-zero input is a valid, geotagged image.
    pub fn decode(data: &[u8]) -> Fields {
        let (flags, rest) = data.split_first().unwrap_or((&0, &[]));
        let (selectors, pool) = rest.split_at(rest.len().min(SELECTORS));
        let mut c = Cursor { selectors, pool };
        Fields {
            big_endian: flags & 1 == 1,
            twin: flags & 2 == 2,
            seconds_later: 0,
            lat: c.ratios(LATS),
            lon: c.ratios(LONS),
            lat_ref: c.text(LAT_REFS),
            lon_ref: c.text(LON_REFS),
            altitude: c.ratio(ALTITUDES),
            altitude_ref: c.number(&[0, 1, 2]).map(|v| v as u8),
            heading: c.ratio(HEADINGS),
            gps_date: c.text(GPS_DATES),
            gps_time: c.ratios(GPS_TIMES),
            dto: c.text(DATETIMES),
            dto_subsec: c.text(SUBSECS),
            dto_offset: c.text(OFFSETS),
            datetime: c.text(DATETIMES),
            datetime_offset: c.text(OFFSETS),
            make: c.text(MAKES),
            orientation: c.number(ORIENTATIONS),
            width: c.number(WIDTHS),
            serial: c.text(SERIALS),
        }
    }
}

/// A JPEG (SOI, APP1 Exif with `fields`, a stub scan, EOI) — `None` when the EXIF writer refuses
/// the values or the block does not fit one segment.
pub fn jpeg_from_fields(f: &Fields) -> Option<Vec<u8>> {
    use ::exif::{experimental::Writer, Field, In, Rational, SRational, Tag, Value};
    let rationals = |v: &[(i64, u32)]| -> Value {
        if v.iter().any(|(n, _)| *n < 0) {
            Value::SRational(
                v.iter()
                    .map(|&(num, denom)| SRational {
                        num: num as i32,
                        denom: denom as i32,
                    })
                    .collect(),
            )
        } else {
            Value::Rational(
                v.iter()
                    .map(|&(num, denom)| Rational {
                        num: num as u32,
                        denom,
                    })
                    .collect(),
            )
        }
    };
    let ascii = |b: &[u8]| Value::Ascii(vec![b.to_vec()]);
    let mut fields: Vec<Field> = Vec::new();
    let mut push = |tag: Tag, value: Value| {
        fields.push(Field {
            tag,
            ifd_num: In::PRIMARY,
            value,
        })
    };
    // Twins move ~10 m north and one second on.
    let shift = |v: &[(i64, u32)]| -> Vec<(i64, u32)> {
        let mut v = v.to_vec();
        if f.seconds_later > 0 {
            if let Some(last) = v.last_mut() {
                last.0 = last
                    .0
                    .saturating_add(i64::from(f.seconds_later) * 3 * i64::from(last.1.max(1)) / 10);
            }
        }
        v
    };
    if let Some(v) = &f.lat {
        push(Tag::GPSLatitude, rationals(&shift(v)));
    }
    if let Some(v) = &f.lon {
        push(Tag::GPSLongitude, rationals(v));
    }
    if let Some(v) = &f.lat_ref {
        push(Tag::GPSLatitudeRef, ascii(v));
    }
    if let Some(v) = &f.lon_ref {
        push(Tag::GPSLongitudeRef, ascii(v));
    }
    if let Some(v) = f.altitude {
        push(Tag::GPSAltitude, rationals(&[v]));
    }
    if let Some(v) = f.altitude_ref {
        push(Tag::GPSAltitudeRef, Value::Byte(vec![v]));
    }
    if let Some(v) = f.heading {
        push(Tag::GPSImgDirection, rationals(&[v]));
    }
    if let Some(v) = &f.gps_date {
        push(Tag::GPSDateStamp, ascii(v));
    }
    if let Some(v) = &f.gps_time {
        let mut v = v.clone();
        if let Some(s) = v.get_mut(2) {
            s.0 =
                s.0.saturating_add(i64::from(f.seconds_later) * i64::from(s.1.max(1)));
        }
        push(Tag::GPSTimeStamp, rationals(&v));
    }
    if let Some(v) = &f.dto {
        push(Tag::DateTimeOriginal, ascii(v));
    }
    if let Some(v) = &f.dto_subsec {
        push(Tag::SubSecTimeOriginal, ascii(v));
    }
    if let Some(v) = &f.dto_offset {
        push(Tag::OffsetTimeOriginal, ascii(v));
    }
    if let Some(v) = &f.datetime {
        push(Tag::DateTime, ascii(v));
    }
    if let Some(v) = &f.datetime_offset {
        push(Tag::OffsetTime, ascii(v));
    }
    if let Some(v) = &f.make {
        push(Tag::Make, ascii(v));
        push(Tag::Model, ascii(v));
    }
    if let Some(v) = f.orientation {
        push(Tag::Orientation, Value::Short(vec![v as u16]));
    }
    if let Some(v) = f.width {
        push(Tag::PixelXDimension, Value::Long(vec![v]));
        push(Tag::PixelYDimension, Value::Long(vec![v / 2]));
    }
    if let Some(v) = &f.serial {
        push(Tag::BodySerialNumber, ascii(v));
    }
    let mut w = Writer::new();
    for field in &fields {
        w.push_field(field);
    }
    let mut tiff = std::io::Cursor::new(Vec::new());
    w.write(&mut tiff, !f.big_endian).ok()?;
    let tiff = tiff.into_inner();
    let seg_len = u16::try_from(2 + 6 + tiff.len()).ok()?;
    let mut out = vec![0xFF, 0xD8, 0xFF, 0xE1];
    out.extend_from_slice(&seg_len.to_be_bytes());
    out.extend_from_slice(b"Exif\0\0");
    out.extend_from_slice(&tiff);
    // A stub scan: the walkers stop at SOS; the EOI makes the file look complete.
    out.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x02, 0x00, 0xFF, 0xD9]);
    Some(out)
}

/// Selector positions in [`Fields::decode`] (after the flags byte).
const SEL_GPS_DATE: usize = 7;
const SEL_DTO: usize = 9;
const SEL_DTO_OFFSET: usize = 11;

/// Seed inputs for `planning_fields`: a plain image, its twin, and each hostile capture time
/// (GPS date absent so that DateTimeOriginal counts) with each offset.
pub fn field_seeds() -> Vec<Vec<u8>> {
    let plain = vec![0u8; 1 + SELECTORS];
    let mut out = vec![plain.clone(), {
        let mut twin = plain.clone();
        twin[0] = 2;
        twin
    }];
    for dto in 0..DATETIMES.len() {
        for offset in [0, 1, 3, 5] {
            let mut s = plain.clone();
            s[1 + SEL_GPS_DATE] = 255;
            s[1 + SEL_DTO] = dto as u8;
            s[1 + SEL_DTO_OFFSET] = offset;
            out.push(s);
        }
    }
    for date in 0..GPS_DATES.len() {
        for t in 0..GPS_TIMES.len() {
            let mut s = plain.clone();
            s[1 + SEL_GPS_DATE] = date as u8;
            s[1 + SEL_GPS_DATE + 1] = t as u8;
            out.push(s);
        }
    }
    out
}
