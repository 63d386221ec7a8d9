//! EXIF ImageDescription injection: description read back by kamadak-exif and by mapillary_tools'
//! own reader, every other tag preserved in both byte orders, head-only operation, robustness.

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use exif::experimental::Writer;
use exif::{Exif, Field, In, Rational, Tag, Value};
use relay_fixtures::{jpeg, ImageSpec};
use shared::domain::jpeg::{rewrite_header, JpegError, RewrittenHeader};
use time::macros::datetime;

// ---------------------------------------------------------------------------------------------
// helpers

const DESC: &str = r#"{"MAPAltitude":77.42,"MAPCaptureTime":"2024_05_01_10_00_00_250","MAPCompassHeading":{"MagneticHeading":133.54,"TrueHeading":133.54},"MAPDeviceMake":"TestMake","MAPDeviceModel":"TestModel","MAPFilename":"IMG_0000.jpg","MAPLatitude":50.8966,"MAPLongitude":-0.5591,"MAPOrientation":1}"#;

fn spec(big_endian: bool) -> ImageSpec {
    let mut s = ImageSpec::new(50.8966, -0.5591, datetime!(2024-05-01 10:00:00.250 UTC));
    s.altitude = Some(77.42);
    s.heading = Some(133.54);
    s.orientation = Some(6);
    s.big_endian = big_endian;
    s.seed = u64::from(big_endian) + 7;
    s
}

/// Apply a rewrite the way the streaming uploader does: new header, then the original tail.
fn apply(original: &[u8], r: &RewrittenHeader) -> Vec<u8> {
    let mut out = r.header.clone();
    out.extend_from_slice(&original[r.consumed..]);
    assert_eq!(
        r.transformed_len(original.len() as u64),
        Some(out.len() as u64),
        "transformed_len predicts the streamed size"
    );
    out
}

fn read_exif(jpeg: &[u8]) -> Exif {
    exif::Reader::new()
        .read_from_container(&mut Cursor::new(jpeg))
        .expect("kamadak-exif reads the JPEG")
}

fn description(e: &Exif) -> Option<String> {
    match &e.get_field(Tag::ImageDescription, In::PRIMARY)?.value {
        Value::Ascii(v) => Some(String::from_utf8(v.first()?.clone()).expect("ascii")),
        other => panic!("ImageDescription has type {other:?}"),
    }
}

/// Every field except ImageDescription, as comparable strings (tag, IFD, value incl. offsets).
fn other_fields(e: &Exif) -> Vec<String> {
    let mut v: Vec<String> = e
        .fields()
        .filter(|f| !(f.tag == Tag::ImageDescription && f.ifd_num == In::PRIMARY))
        .map(|f| format!("{:?}/{:?}/{:?}", f.ifd_num, f.tag, f.value))
        .collect();
    v.sort();
    v
}

/// Byte range of the first Exif APP1's TIFF block (test-side parser, independent of the code).
fn tiff_range(jpeg: &[u8]) -> std::ops::Range<usize> {
    let mut pos = 2;
    loop {
        assert_eq!(jpeg[pos], 0xFF);
        let marker = jpeg[pos + 1];
        let len = usize::from(u16::from_be_bytes([jpeg[pos + 2], jpeg[pos + 3]]));
        if marker == 0xE1 && &jpeg[pos + 4..pos + 10] == b"Exif\0\0" {
            return pos + 10..pos + 2 + len;
        }
        pos += 2 + len;
    }
}

fn segment(marker: u8, payload: &[u8]) -> Vec<u8> {
    let mut s = vec![0xFF, marker];
    s.extend_from_slice(&u16::try_from(payload.len() + 2).expect("fits").to_be_bytes());
    s.extend_from_slice(payload);
    s
}

/// Replace a fixture's Exif APP1 with one holding `tiff`.
fn with_tiff(fixture: &[u8], tiff: &[u8]) -> Vec<u8> {
    let r = tiff_range(fixture);
    let mut out = fixture[..r.start - 10].to_vec();
    out.extend(segment(0xE1, &[b"Exif\0\0".as_slice(), tiff].concat()));
    out.extend_from_slice(&fixture[r.end..]);
    out
}

/// Rich EXIF: GPS, times, make/model, orientation, an existing ImageDescription, a MakerNote and
/// UserComment (UNDEFINED, in the Exif IFD), an IFD1 with a JPEG thumbnail.
fn rich_tiff(little_endian: bool, thumbnail: &[u8]) -> Vec<u8> {
    let f = |tag, ifd_num, value| Field { tag, ifd_num, value };
    let ascii = |s: &str| Value::Ascii(vec![s.as_bytes().to_vec()]);
    let r = |num, denom| Rational { num, denom };
    let maker_note: Vec<u8> = (0..300u32).map(|i| (i * 37 % 256) as u8).collect();
    let fields = vec![
        f(
            Tag::ImageDescription,
            In::PRIMARY,
            ascii("old description, to be replaced"),
        ),
        f(Tag::Make, In::PRIMARY, ascii("RichMake")),
        f(Tag::Model, In::PRIMARY, ascii("RichModel 9000")),
        f(Tag::Orientation, In::PRIMARY, Value::Short(vec![3])),
        f(Tag::XResolution, In::PRIMARY, Value::Rational(vec![r(300, 1)])),
        f(Tag::DateTime, In::PRIMARY, ascii("2024:05:01 12:00:00")),
        f(Tag::Artist, In::PRIMARY, ascii("A")),
        f(Tag::DateTimeOriginal, In::PRIMARY, ascii("2024:05:01 12:00:00")),
        f(Tag::SubSecTimeOriginal, In::PRIMARY, ascii("250")),
        f(Tag::OffsetTimeOriginal, In::PRIMARY, ascii("+02:00")),
        f(
            Tag::ExifVersion,
            In::PRIMARY,
            Value::Undefined(b"0232".to_vec(), 0),
        ),
        f(Tag::MakerNote, In::PRIMARY, Value::Undefined(maker_note, 0)),
        f(
            Tag::UserComment,
            In::PRIMARY,
            Value::Undefined(b"ASCII\0\0\0hello maker".to_vec(), 0),
        ),
        f(Tag::GPSVersionID, In::PRIMARY, Value::Byte(vec![2, 3, 0, 0])),
        f(Tag::GPSLatitudeRef, In::PRIMARY, ascii("S")),
        f(
            Tag::GPSLatitude,
            In::PRIMARY,
            Value::Rational(vec![r(33, 1), r(51, 1), r(3_512_345, 100_000)]),
        ),
        f(Tag::GPSLongitudeRef, In::PRIMARY, ascii("E")),
        f(
            Tag::GPSLongitude,
            In::PRIMARY,
            Value::Rational(vec![r(151, 1), r(12, 1), r(4_412_345, 100_000)]),
        ),
        f(Tag::GPSAltitudeRef, In::PRIMARY, Value::Byte(vec![1])),
        f(
            Tag::GPSAltitude,
            In::PRIMARY,
            Value::Rational(vec![r(12_345, 1000)]),
        ),
        f(Tag::GPSImgDirectionRef, In::PRIMARY, ascii("T")),
        f(
            Tag::GPSImgDirection,
            In::PRIMARY,
            Value::Rational(vec![r(27_150, 100)]),
        ),
        f(Tag::Compression, In::THUMBNAIL, Value::Short(vec![6])),
        f(Tag::XResolution, In::THUMBNAIL, Value::Rational(vec![r(72, 1)])),
    ];
    let mut w = Writer::new();
    for field in &fields {
        w.push_field(field);
    }
    w.set_jpeg(thumbnail, In::THUMBNAIL);
    let mut buf = Cursor::new(Vec::new());
    w.write(&mut buf, little_endian).expect("write tiff");
    buf.into_inner()
}

fn thumbnail_bytes(e: &Exif) -> Vec<u8> {
    let off = e
        .get_field(Tag::JPEGInterchangeFormat, In::THUMBNAIL)
        .and_then(|f| f.value.get_uint(0))
        .expect("thumbnail offset") as usize;
    let len = e
        .get_field(Tag::JPEGInterchangeFormatLength, In::THUMBNAIL)
        .and_then(|f| f.value.get_uint(0))
        .expect("thumbnail length") as usize;
    e.buf()[off..off + len].to_vec()
}

use crate::rng;
use rng::Rng;

// ---------------------------------------------------------------------------------------------
// kamadak-exif read-back

fn check_preserved(original: &[u8], desc: &str) -> Vec<u8> {
    let r = rewrite_header(original, desc).expect("rewrite");
    let out = apply(original, &r);
    let before = read_exif(original);
    let after = read_exif(&out);
    assert_eq!(description(&after).as_deref(), Some(desc));
    assert_eq!(before.little_endian(), after.little_endian(), "byte order kept");
    assert_eq!(other_fields(&before), other_fields(&after));
    // Nothing in the old TIFF block moved: it is a prefix of the new one (bar the IFD0 offset).
    let (old_t, new_t) = (&original[tiff_range(original)], &out[tiff_range(&out)]);
    assert_eq!(&old_t[..4], &new_t[..4]);
    assert_eq!(&old_t[8..], &new_t[8..old_t.len()]);
    // Everything after the Exif segment (image data) is untouched.
    assert_eq!(
        &original[tiff_range(original).end..],
        &out[tiff_range(&out).end..]
    );
    out
}

#[test]
fn fixture_little_and_big_endian_keep_all_other_fields() {
    for big_endian in [false, true] {
        let original = jpeg(&spec(big_endian));
        let before = read_exif(&original);
        assert_eq!(before.little_endian(), !big_endian);
        assert!(description(&before).is_none());
        let out = check_preserved(&original, DESC);
        let after = read_exif(&out);
        for tag in [
            Tag::GPSLatitude,
            Tag::GPSLongitude,
            Tag::GPSAltitude,
            Tag::GPSTimeStamp,
            Tag::GPSDateStamp,
            Tag::DateTimeOriginal,
            Tag::Make,
            Tag::Model,
            Tag::Orientation,
        ] {
            let a = before.get_field(tag, In::PRIMARY).expect("tag present");
            let b = after.get_field(tag, In::PRIMARY).expect("tag kept");
            assert_eq!(format!("{:?}", a.value), format!("{:?}", b.value), "{tag}");
        }
    }
}

#[test]
fn rich_exif_with_makernote_thumbnail_and_old_description_both_orders() {
    let thumb = jpeg(&{
        let mut s = spec(false);
        s.width = 16;
        s.height = 16;
        s
    });
    for little_endian in [true, false] {
        let original = with_tiff(&jpeg(&spec(!little_endian)), &rich_tiff(little_endian, &thumb));
        let before = read_exif(&original);
        assert_eq!(
            description(&before).as_deref(),
            Some("old description, to be replaced")
        );
        let out = check_preserved(&original, DESC);
        let after = read_exif(&out);
        assert_eq!(thumbnail_bytes(&after), thumb, "thumbnail preserved");
        let mn = |e: &Exif| {
            format!(
                "{:?}",
                e.get_field(Tag::MakerNote, In::PRIMARY).expect("mn").value
            )
        };
        assert_eq!(mn(&before), mn(&after), "MakerNote bytes and offset unchanged");
        // exactly one ImageDescription remains
        let n = after.fields().filter(|f| f.tag == Tag::ImageDescription).count();
        assert_eq!(n, 1);
    }
}

#[test]
fn short_empty_and_repeated_descriptions() {
    let original = jpeg(&spec(true));
    for desc in ["", "a", "abc", "abcd", "{}"] {
        check_preserved(&original, desc);
    }
    // rewriting an already rewritten file replaces the description again
    let once = apply(&original, &rewrite_header(&original, "first one").expect("1"));
    let twice = check_preserved(&once, DESC);
    assert_eq!(description(&read_exif(&twice)).as_deref(), Some(DESC));
    assert_eq!(
        other_fields(&read_exif(&original)),
        other_fields(&read_exif(&twice))
    );
}

#[test]
fn works_from_a_head_only_and_reports_how_much_is_needed() {
    for big_endian in [false, true] {
        let mut s = spec(big_endian);
        s.pad_to = Some(300_000); // COM padding after the APP1: the file is much longer than the head
        let original = jpeg(&s);
        let full = rewrite_header(&original, DESC).expect("full");
        assert!(full.consumed < 70_000);
        // Grow the head as a ranged-GET caller would, starting tiny.
        let mut have = 4usize;
        let r = loop {
            match rewrite_header(&original[..have], DESC) {
                Ok(r) => break r,
                Err(JpegError::Truncated { needed, available }) => {
                    assert_eq!(available, have);
                    assert!(needed > have, "progress: {needed} > {have}");
                    have = needed;
                }
                Err(e) => panic!("unexpected {e}"),
            }
        };
        assert_eq!(have, full.consumed, "exactly through the end of the APP1");
        assert_eq!(r, full);
        let out = apply(&original, &r);
        assert_eq!(description(&read_exif(&out)).as_deref(), Some(DESC));
    }
}

#[test]
fn exif_after_app0_xmp_and_comments_with_fill_bytes() {
    let fixture = jpeg(&spec(false));
    let t = tiff_range(&fixture);
    let app1 = fixture[t.start - 10..t.end].to_vec();
    let mut original = vec![0xFF, 0xD8];
    original.extend(segment(0xE0, b"JFIF\0\x01\x02\0\0\x01\0\x01\0\0"));
    original.extend(segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>"));
    original.extend(segment(0xFE, b"a comment"));
    original.extend([0xFF, 0xFF]); // fill bytes before the next marker
    original.extend(&app1);
    original.extend(segment(0xE2, b"ICC_PROFILE\0\x01\x01stuff"));
    original.extend_from_slice(&fixture[t.end..]);
    let r = rewrite_header(&original, DESC).expect("rewrite");
    let out = apply(&original, &r);
    assert_eq!(description(&read_exif(&out)).as_deref(), Some(DESC));
    assert_eq!(
        other_fields(&read_exif(&original)),
        other_fields(&read_exif(&out))
    );
    // the segments before the Exif APP1 are carried over verbatim
    let prefix = 2 + 18 + 4 + 41 + 13 + 2;
    assert_eq!(&out[..prefix], &original[..prefix]);
}

#[test]
fn jpeg_without_exif_gets_a_fresh_app1() {
    let fixture = jpeg(&spec(false));
    let t = tiff_range(&fixture);
    let mut original = vec![0xFF, 0xD8];
    original.extend(segment(0xE0, b"JFIF\0\x01\x02\0\0\x01\0\x01\0\0"));
    original.extend_from_slice(&fixture[t.end..]);
    assert!(exif::Reader::new()
        .read_from_container(&mut Cursor::new(&original))
        .is_err());
    let r = rewrite_header(&original, DESC).expect("rewrite");
    assert_eq!(r.consumed, 2 + 18, "inserted after the JFIF APP0");
    let out = apply(&original, &r);
    let e = read_exif(&out);
    assert_eq!(description(&e).as_deref(), Some(DESC));
    assert_eq!(e.fields().count(), 1);
    // also without any APPn: right after SOI
    let mut bare = vec![0xFF, 0xD8];
    bare.extend_from_slice(&fixture[t.end..]);
    let r = rewrite_header(&bare, "x").expect("rewrite");
    assert_eq!(r.consumed, 2);
    assert_eq!(description(&read_exif(&apply(&bare, &r))).as_deref(), Some("x"));
}

#[test]
fn oversize_and_invalid_descriptions_are_clear_errors() {
    let original = jpeg(&spec(false));
    let app1_len = tiff_range(&original).len() + 8;
    let huge = "x".repeat(65_000);
    match rewrite_header(&original, &huge) {
        Err(JpegError::ExifTooLarge { size }) => assert!(size > 65_535 && size > app1_len),
        other => panic!("expected ExifTooLarge, got {other:?}"),
    }
    // the largest description that fits gives a segment of at most 65535 bytes; one more byte fails
    let (mut lo, mut hi) = (0usize, 65_535usize);
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if rewrite_header(&original, &"y".repeat(mid)).is_ok() {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let r = rewrite_header(&original, &"y".repeat(lo)).expect("fits");
    let app1 = &r.header[tiff_range(&r.header).start - 10..];
    let seg_len = usize::from(u16::from_be_bytes([app1[2], app1[3]]));
    assert_eq!(seg_len + 2, app1.len());
    assert!(seg_len >= 65_534, "{seg_len}");
    assert_eq!(
        description(&read_exif(&apply(&original, &r))).map(|d| d.len()),
        Some(lo)
    );
    assert!(matches!(
        rewrite_header(&original, &"y".repeat(lo + 1)),
        Err(JpegError::ExifTooLarge { size: 65_536.. })
    ));
    assert_eq!(
        rewrite_header(&original, "caf\u{e9}"),
        Err(JpegError::InvalidDescription(
            "contains non-ASCII characters (escape them as \\uXXXX)"
        ))
    );
    assert!(matches!(
        rewrite_header(&original, "a\0b"),
        Err(JpegError::InvalidDescription(_))
    ));
}

#[test]
fn garbage_inputs_are_errors() {
    assert_eq!(
        rewrite_header(b"", "x").map(|_| ()),
        Err(JpegError::Truncated {
            needed: 2,
            available: 0
        })
    );
    assert_eq!(rewrite_header(b"\x89PNG\r\n\x1a\n", "x"), Err(JpegError::NotJpeg));
    assert_eq!(rewrite_header(&[0u8; 100], "x"), Err(JpegError::NotJpeg));
    assert!(matches!(
        rewrite_header(b"\xFF\xD8\x00\x00", "x"),
        Err(JpegError::BadMarker { offset: 2, .. })
    ));
    assert!(matches!(
        rewrite_header(b"\xFF\xD8\xFF\xE1\x00\x01", "x"),
        Err(JpegError::BadMarker { .. })
    ));
    // Exif APP1 whose TIFF header is broken
    let bad_tiff = |tiff: &[u8]| {
        let mut j = vec![0xFF, 0xD8];
        j.extend(segment(0xE1, &[b"Exif\0\0".as_slice(), tiff].concat()));
        j.extend([0xFF, 0xDB]);
        rewrite_header(&j, "x")
    };
    assert!(matches!(
        bad_tiff(b"XX*\0\x08\0\0\0"),
        Err(JpegError::CorruptExif(_))
    ));
    assert!(matches!(
        bad_tiff(b"II+\0\x08\0\0\0"),
        Err(JpegError::CorruptExif(_))
    ));
    assert!(matches!(
        bad_tiff(b"II*\0\xff\0\0\0"),
        Err(JpegError::CorruptExif(_))
    ));
    assert!(matches!(
        bad_tiff(b"II*\0\x04\0\0\0"),
        Err(JpegError::CorruptExif(_))
    ));
    assert!(matches!(
        bad_tiff(b"II*\0\x08\0\0\0\x05\0"),
        Err(JpegError::CorruptExif(_))
    ));
    assert!(matches!(
        bad_tiff(b"MM\0*\0\0\0\x08\0\0"),
        Err(JpegError::CorruptExif(_))
    ));
    // an empty IFD0 with its next pointer is fine
    assert!(bad_tiff(b"MM\0*\0\0\0\x08\0\0\0\0\0\0").is_ok());
}

#[test]
fn truncations_and_mutations_never_panic() {
    for big_endian in [false, true] {
        let original = jpeg(&spec(big_endian));
        let end = tiff_range(&original).end;
        // every truncation through the Exif segment: Truncated (or, for tiny heads, NotJpeg)
        for n in 0..end {
            match rewrite_header(&original[..n], DESC) {
                Err(JpegError::Truncated { needed, .. }) => assert!(needed > n && needed <= end),
                other => panic!("prefix {n}: {other:?}"),
            }
        }
        // random byte mutations in the header region
        let mut rng = Rng(0x5eed ^ u64::from(big_endian));
        let mut ok = 0;
        for _ in 0..20_000 {
            let mut m = original.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(end + 8);
                m[at] = rng.next() as u8;
            }
            let cut = if rng.below(4) == 0 {
                rng.below(m.len())
            } else {
                m.len()
            };
            if let Ok(r) = rewrite_header(&m[..cut], DESC) {
                assert!(r.consumed <= cut);
                ok += 1;
            }
        }
        assert!(ok > 0, "some mutations (e.g. inside values) still rewrite fine");
    }
}

// ---------------------------------------------------------------------------------------------
// mapillary_tools' own reader

fn mapillary_python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/mapillary-tools/bin/python");
    assert!(
        p.exists(),
        "mapillary_tools venv missing at {}: run cargo xtask setup",
        p.display()
    );
    p
}

const PY_READ: &str = r#"
import json, sys
from pathlib import Path
from mapillary_tools.exif_read import ExifRead
from mapillary_tools.exif_write import ExifEdit
def piexif_description(p):
    # mapillary_tools' writer side (piexif) must load our EXIF too
    d = ExifEdit(Path(p))._ef["0th"].get(270)
    return None if d is None else d.decode("ascii")
out = []
for p in sys.argv[1:]:
    r = ExifRead(Path(p))
    d = r.tags.get("Image ImageDescription")
    t = r.extract_capture_time()
    out.append({
        "description": None if d is None else str(d.values),
        "lon_lat": r.extract_lon_lat(),
        "altitude": r.extract_altitude(),
        "direction": r.extract_direction(),
        "time": None if t is None else t.isoformat(),
        "make": r.extract_make(),
        "model": r.extract_model(),
        "orientation": r.extract_orientation(),
        "width": r.extract_width(),
        "height": r.extract_height(),
        "tag_count": len(r.tags),
        "piexif_description": piexif_description(p),
    })
print(json.dumps(out))
"#;

#[test]
fn mapillary_tools_exif_read_sees_description_and_unchanged_metadata() {
    let python = mapillary_python();
    let dir = std::env::temp_dir().join(format!("shared-jpeg-mly-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let thumb = jpeg(&spec(false));
    let mut paths = Vec::new();
    for variant in 0..4 {
        let big_endian = variant % 2 == 1;
        let original = if variant < 2 {
            jpeg(&spec(big_endian))
        } else {
            with_tiff(&jpeg(&spec(false)), &rich_tiff(!big_endian, &thumb))
        };
        let out = apply(&original, &rewrite_header(&original, DESC).expect("rewrite"));
        for (name, bytes) in [("orig", &original), ("new", &out)] {
            let p = dir.join(format!("{name}-{variant}.jpg"));
            std::fs::File::create(&p)
                .and_then(|mut f| f.write_all(bytes))
                .expect("write");
            paths.push(p);
        }
    }
    let out = Command::new(python)
        .arg("-c")
        .arg(PY_READ)
        .args(&paths)
        .stderr(Stdio::inherit())
        .output()
        .expect("run python");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "python failed");
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v.len(), 8);
    for (variant, pair) in v.chunks(2).enumerate() {
        let (orig, new) = (&pair[0], &pair[1]);
        assert_eq!(new["description"], DESC);
        assert_eq!(new["piexif_description"], DESC);
        let lon_lat = new["lon_lat"].as_array().expect("GPS read");
        let (lon, lat) = (
            lon_lat[0].as_f64().expect("lon"),
            lon_lat[1].as_f64().expect("lat"),
        );
        if variant < 2 {
            assert_eq!(orig["description"], serde_json::Value::Null);
            assert!((lon + 0.5591).abs() < 1e-7 && (lat - 50.8966).abs() < 1e-7);
            assert_eq!(new["time"], "2024-05-01T10:00:00.250000+00:00");
            assert_eq!(new["make"], "TestMake");
            assert_eq!(new["orientation"], 6);
        } else {
            assert_eq!(orig["description"], "old description, to be replaced");
            let want_lat = -(33.0 + 51.0 / 60.0 + 35.12345 / 3600.0);
            let want_lon = 151.0 + 12.0 / 60.0 + 44.12345 / 3600.0;
            assert!((lon - want_lon).abs() < 1e-7 && (lat - want_lat).abs() < 1e-7);
            assert_eq!(new["make"], "RichMake");
            assert_eq!(new["orientation"], 3);
            assert_ne!(new["time"], serde_json::Value::Null);
        }
        for key in [
            "lon_lat",
            "altitude",
            "direction",
            "time",
            "make",
            "model",
            "orientation",
            "width",
            "height",
        ] {
            assert_eq!(orig[key], new[key], "{key} unchanged");
        }
        let added = u64::from(variant < 2);
        assert_eq!(
            new["tag_count"].as_u64().expect("n"),
            orig["tag_count"].as_u64().expect("n") + added,
            "only ImageDescription added or replaced"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// EXIF structures that reach past the block (found by the planning fuzz target)

/// A little-endian TIFF block: IFD0 {Make, ImageDescription, GPS pointer}, GPS IFD
/// {GPSLatitudeRef "N", GPSLongitudeRef "W"}, then the values. `edit` changes it before use.
fn layout_tiff(edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let entry = |tag: u16, typ: u16, count: u32, value: u32| {
        let mut e = Vec::new();
        e.extend_from_slice(&tag.to_le_bytes());
        e.extend_from_slice(&typ.to_le_bytes());
        e.extend_from_slice(&count.to_le_bytes());
        e.extend_from_slice(&value.to_le_bytes());
        e
    };
    // IFD0 at 8: 3 entries → 2 + 36 + 4 = 42 bytes, GPS IFD at 50: 2 entries → 30 bytes, values at 80.
    let mut t = b"II*\0\x08\0\0\0".to_vec();
    t.extend_from_slice(&3u16.to_le_bytes());
    t.extend(entry(0x010E, 2, 12, 86)); // ImageDescription "old old old\0"
    t.extend(entry(0x010F, 2, 6, 80)); // Make "Maker\0"
    t.extend(entry(0x8825, 4, 1, 50)); // GPS IFD pointer
    t.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(t.len(), 50);
    t.extend_from_slice(&2u16.to_le_bytes());
    t.extend(entry(0x0001, 2, 2, u32::from_le_bytes(*b"N\0\0\0")));
    t.extend(entry(0x0003, 2, 2, u32::from_le_bytes(*b"W\0\0\0")));
    t.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(t.len(), 80);
    t.extend_from_slice(b"Maker\0old old old\0");
    edit(&mut t);
    t
}

fn rewrite_tiff_block(tiff: &[u8]) -> Result<RewrittenHeader, JpegError> {
    let mut j = vec![0xFF, 0xD8];
    j.extend(segment(0xE1, &[b"Exif\0\0".as_slice(), tiff].concat()));
    j.extend([0xFF, 0xDA, 0x00, 0x02]);
    rewrite_header(&j, "{\"MAPFilename\":\"x.jpg\"}")
}

#[test]
fn exif_structures_reaching_past_the_block_are_refused_not_rewritten_into_other_metadata() {
    let ok = rewrite_tiff_block(&layout_tiff(|_| {})).expect("a sound block rewrites");
    assert!(ok.header.len() > ok.consumed);
    // The GPS IFD claims 5 entries where the block ends after 3½: the rest would be read from the
    // appended bytes (the fuzz finding: the longitude reference was replaced and the longitude's
    // sign flipped).
    let overrun = layout_tiff(|t| t[50] = 5);
    assert_eq!(
        rewrite_tiff_block(&overrun),
        Err(JpegError::CorruptExif(
            "an IFD's entries run past the end of the EXIF block"
        ))
    );
    // Make's value (6 → 60 bytes) runs past the end.
    let value = layout_tiff(|t| t[8 + 2 + 12 + 4] = 60);
    assert_eq!(
        rewrite_tiff_block(&value),
        Err(JpegError::CorruptExif(
            "a field value runs past the end of the EXIF block"
        ))
    );
    // The same overrunning GPS IFD behind a pointer typed BYTE (count 1, the offset inline): readers
    // still follow it, so the rewrite must not take it for a plain value (the second fuzz finding:
    // GPSLatitude replaced by appended bytes, "needs 3 rationals, found 0" on the re-read).
    let byte_pointer = layout_tiff(|t| {
        t[8 + 2 + 24 + 2] = 1;
        t[50] = 5;
    });
    assert_eq!(
        rewrite_tiff_block(&byte_pointer),
        Err(JpegError::CorruptExif(
            "an Exif, GPS or Interop IFD pointer is not a LONG offset"
        ))
    );
    // The GPS pointer points past the end.
    let pointer = layout_tiff(|t| t[8 + 2 + 24 + 8] = 200);
    assert_eq!(
        rewrite_tiff_block(&pointer),
        Err(JpegError::CorruptExif(
            "an IFD offset points past the end of the EXIF block"
        ))
    );
    // IFD0's next-IFD pointer points past the end (an IFD1 the append would create).
    let next = layout_tiff(|t| t[46] = 250);
    assert_eq!(
        rewrite_tiff_block(&next),
        Err(JpegError::CorruptExif(
            "an IFD offset points past the end of the EXIF block"
        ))
    );
    // A value or an IFD over the TIFF header, whose IFD0 offset the rewrite changes.
    let in_header = layout_tiff(|t| t[8 + 2 + 12 + 8] = 2);
    assert_eq!(
        rewrite_tiff_block(&in_header),
        Err(JpegError::CorruptExif("a field value overlaps the TIFF header"))
    );
    let ifd_in_header = layout_tiff(|t| t[8 + 2 + 24 + 8] = 4);
    assert_eq!(
        rewrite_tiff_block(&ifd_in_header),
        Err(JpegError::CorruptExif("an IFD overlaps the TIFF header"))
    );
    // Not refused: the old ImageDescription's value (it is replaced), a type no reader reads,
    // and an IFD chain that loops back to IFD0 (readers stop there).
    assert!(rewrite_tiff_block(&layout_tiff(|t| t[8 + 2 + 4] = 200)).is_ok());
    assert!(rewrite_tiff_block(&layout_tiff(|t| {
        t[8 + 2 + 12 + 2] = 99;
        t[8 + 2 + 12 + 4] = 255;
    }))
    .is_ok());
    assert!(rewrite_tiff_block(&layout_tiff(|t| t[46] = 8)).is_ok());
}
