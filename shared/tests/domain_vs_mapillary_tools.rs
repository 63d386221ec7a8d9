//! Cross-checks `shared::domain::{exif, sequence, description}` against the real
//! mapillary_tools 0.14.7 (the pinned venv): the same generated JPEGs go through
//! `mapillary_tools process`, and per image the MAP* EXIF JSON it would upload and the sequence
//! grouping must equal ours; also Python's float rounding/`repr` on many values, and
//! `validate_image_desc` on our descriptions.
//!
//! Needs `.venv/mapillary-tools` (created by `cargo xtask setup`); without it the tests FAIL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use relay_fixtures::{write_jpegs, ImageSpec, TimeTags};
use serde_json::Value;
use shared::domain::description::{self, py_float_repr, py_round};
use shared::domain::exif::{header_extent, read_metadata, HeaderExtent};
use shared::domain::sequence::{plan_sequences, SequenceConfig, SequenceInput};
use time::macros::datetime;
use time::Duration;

fn venv() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/mapillary-tools");
    let tool = dir.join("bin/mapillary_tools");
    assert!(
        tool.exists(),
        "mapillary_tools venv missing at {}: run cargo xtask setup",
        dir.display()
    );
    dir
}

/// A fresh scratch directory under the system temp dir.
fn scratch(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("relay-domain-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn python(venv: &Path, script: &str, args: &[&str]) -> String {
    let out = Command::new(venv.join("bin/python"))
        .arg("-c")
        .arg(script)
        .args(args)
        .env("TZ", "UTC")
        .output()
        .expect("run the venv's python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// ~`m` metres north of the start.
fn north(m: f64) -> f64 {
    50.8966 + m / 111_250.0
}

fn specs() -> Vec<ImageSpec> {
    let t0 = datetime!(2024-05-01 10:00:00.250 UTC);
    let lon = -0.5591;
    let at = |s: i64| t0 + Duration::seconds(s);
    let model = "Modèle \"X\" 📷".to_string();
    let mk = |m: f64, s: i64, heading: Option<f64>| {
        let mut spec = ImageSpec::new(north(m), lon, at(s));
        spec.heading = heading;
        spec.model = Some(model.clone());
        spec
    };
    let mut v = Vec::new();
    // IMG_0000..0003: a walk north with headings; one big-endian, altitudes, orientation.
    let mut a0 = mk(0.0, 0, Some(1.5));
    a0.altitude = Some(77.42);
    v.push(a0);
    let mut a1 = mk(5.0, 1, Some(2.25));
    a1.big_endian = true;
    a1.altitude = Some(-3.5);
    v.push(a1);
    // 359.9995 is written as 360.000, which mapillary_tools normalises to 0.
    let mut a2 = mk(10.0, 2, Some(359.9995));
    a2.orientation = Some(3);
    v.push(a2);
    v.push(mk(15.0, 3, Some(0.0625)));
    // IMG_0004: duplicate of IMG_0003 (same place, no heading).
    v.push(mk(15.0, 4, None));
    // IMG_0005..0008: after a 120 s gap, no headings; DateTimeOriginal variants; 0007/0008 tie.
    let mut b0 = mk(30.0, 124, None);
    b0.time_tags = TimeTags::DateTimeOriginal {
        offset: Some("+02:00".into()),
    };
    v.push(b0);
    let mut b1 = mk(35.0, 125, None);
    b1.time_tags = TimeTags::DateTimeOriginal { offset: None };
    b1.big_endian = true;
    v.push(b1);
    v.push(mk(40.0, 126, None));
    v.push(mk(44.0, 126, None));
    // IMG_0009: a lone image much later, no heading (gets 0).
    v.push(mk(60.0, 500, None));
    // IMG_0010, 0011: 150 m further after 10 s (distance split), then 5 m on.
    v.push(mk(194.0, 136, None));
    let mut b5 = mk(199.0, 137, Some(12.0));
    b5.altitude = Some(0.0625);
    v.push(b5);
    v
}

const DUMP_DESCS: &str = r#"
import json, sys, os
from mapillary_tools.serializer.description import DescriptionJSONSerializer, desc_file_to_exif
for d in json.load(open(sys.argv[1])):
    name = os.path.basename(d["filename"])
    if "error" in d:
        print(json.dumps({"file": name, "error": d["error"]["type"]}))
        continue
    # What the uploader writes into the EXIF (uploader.py dump_image_bytes).
    m = DescriptionJSONSerializer.from_desc(d)
    exif = desc_file_to_exif(DescriptionJSONSerializer.as_desc(m))
    print(json.dumps({"file": name, "seq": d["MAPSequenceUUID"],
                      "exif": json.dumps(exif, sort_keys=True, separators=(",", ":"))}))
"#;

const VALIDATE: &str = r#"
import json, sys
from mapillary_tools.serializer.description import validate_image_desc
from mapillary_tools import exceptions
for line in sys.stdin.read().splitlines():
    d = json.loads(line)
    d.update({"filename": "/x.jpg", "filetype": "image"})
    try:
        validate_image_desc(d)
        print("ok")
    except exceptions.MapillaryMetadataValidationError as e:
        print("invalid: " + str(e))
"#;

#[test]
fn descriptions_and_sequences_match_mapillary_tools() {
    let venv = venv();
    let dir = scratch("process");
    let paths = write_jpegs(&dir, &specs()).expect("write fixtures");

    // Ours: read the head as ranged GETs would, then plan.
    let mut inputs = Vec::new();
    for path in &paths {
        let bytes = std::fs::read(path).expect("read fixture");
        let mut have = 512.min(bytes.len());
        let head_end = loop {
            match header_extent(&bytes[..have]).expect("jpeg") {
                HeaderExtent::NeedMore { at_least } => {
                    assert!(at_least <= bytes.len(), "{}", path.display());
                    have = at_least.max(have * 2).min(bytes.len());
                }
                HeaderExtent::Complete { header_end, .. } => break header_end,
            }
        };
        let meta = read_metadata(&bytes[..head_end]).expect("metadata");
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_string();
        inputs.push(SequenceInput {
            name,
            meta,
            file_size: Some(bytes.len() as u64),
        });
    }
    let plan = plan_sequences(inputs, &SequenceConfig::default());

    // Theirs.
    let out = Command::new(venv.join("bin/mapillary_tools"))
        .arg("process")
        .arg(&dir)
        .arg("--skip_process_errors")
        .env("MAPILLARY_TOOLS_PROMPT_DISABLED", "YES")
        .env("TZ", "UTC")
        .output()
        .expect("run mapillary_tools");
    assert!(
        out.status.success(),
        "mapillary_tools process failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let desc_file = dir.join("mapillary_image_description.json");
    let dump = python(&venv, DUMP_DESCS, &[desc_file.to_str().expect("utf-8 path")]);
    let mut their_seqs: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut their_exif: BTreeMap<String, String> = BTreeMap::new();
    let mut their_errors: BTreeMap<String, String> = BTreeMap::new();
    for line in dump.lines() {
        let v: Value = serde_json::from_str(line).expect("json line");
        let file = v["file"].as_str().expect("file").to_string();
        if let Some(e) = v["error"].as_str() {
            their_errors.insert(file, e.to_string());
            continue;
        }
        let seq: usize = v["seq"].as_str().expect("seq").parse().expect("numeric seq");
        their_seqs.entry(seq).or_default().push(file.clone());
        their_exif.insert(file, v["exif"].as_str().expect("exif").to_string());
    }

    // Grouping (and order inside each sequence).
    let our_seqs: Vec<Vec<String>> = plan
        .sequences
        .iter()
        .map(|s| s.images.iter().map(|i| i.name.clone()).collect())
        .collect();
    let their_seqs: Vec<Vec<String>> = their_seqs.into_values().collect();
    assert_eq!(our_seqs, their_seqs, "sequence grouping differs");
    assert_eq!(
        our_seqs.len(),
        4,
        "expected the time gap, distance gap and lone image to split: {our_seqs:?}"
    );

    // Drops.
    let our_drops: Vec<&str> = plan.dropped.iter().map(|d| d.name.as_str()).collect();
    let their_drops: Vec<&str> = their_errors.keys().map(String::as_str).collect();
    assert_eq!(our_drops, their_drops, "dropped images differ");
    assert_eq!(our_drops, vec!["IMG_0004.jpg"]);
    assert_eq!(their_errors["IMG_0004.jpg"], "MapillaryDuplicationError");

    // Per-image description: parsed comparison (lat/lon exact at 7 decimals, time exact,
    // heading within 1e-3), then byte equality.
    let mut ours_for_validation = String::new();
    for img in plan.sequences.iter().flat_map(|s| &s.images) {
        let theirs = &their_exif[&img.name];
        let a: Value = serde_json::from_str(&img.description).expect("our json");
        let b: Value = serde_json::from_str(theirs).expect("their json");
        for k in ["MAPLatitude", "MAPLongitude"] {
            assert_eq!(a[k].as_f64(), b[k].as_f64(), "{} {k}", img.name);
        }
        assert_eq!(a["MAPCaptureTime"], b["MAPCaptureTime"], "{}", img.name);
        let h = |v: &Value| v["MAPCompassHeading"]["TrueHeading"].as_f64().unwrap_or(f64::NAN);
        assert!(
            (h(&a) - h(&b)).abs() <= 1e-3,
            "{} heading: ours {} theirs {theirs}",
            img.name,
            img.description
        );
        assert_eq!(&img.description, theirs, "{}: description bytes differ", img.name);
        description::validate(&img.description).expect("our validator accepts it");
        ours_for_validation.push_str(&img.description);
        ours_for_validation.push('\n');
    }
    assert!(their_exif["IMG_0009.jpg"].contains(r#""TrueHeading":0.0}"#));
    assert!(their_exif["IMG_0002.jpg"].contains(r#""TrueHeading":0.0}"#));
    assert!(their_exif["IMG_0008.jpg"].contains("_10_02_06_625\""));

    // mapillary_tools' own validator accepts our descriptions.
    let verdicts = python_stdin(&venv, VALIDATE, &ours_for_validation);
    assert!(verdicts.lines().all(|l| l == "ok"), "{verdicts}");

    let _ = std::fs::remove_dir_all(&dir);
}

/// `spec` as JPEG bytes with the first `from` replaced by `to` (same length).
fn patched(spec: &ImageSpec, from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut bytes = relay_fixtures::jpeg(spec);
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern in the fixture");
    bytes[at..at + to.len()].copy_from_slice(to);
    bytes
}

/// `mapillary_tools process` on `dir`: `Ok(file → error type, or "" for an accepted image)`, or
/// `Err(stderr)` when the command itself fails.
fn process(venv: &Path, dir: &Path) -> Result<BTreeMap<String, String>, String> {
    let out = Command::new(venv.join("bin/mapillary_tools"))
        .arg("process")
        .arg(dir)
        .arg("--skip_process_errors")
        .env("MAPILLARY_TOOLS_PROMPT_DISABLED", "YES")
        .env("TZ", "UTC")
        .output()
        .expect("run mapillary_tools");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let desc_file = dir.join("mapillary_image_description.json");
    let dump = python(venv, DUMP_DESCS, &[desc_file.to_str().expect("utf-8 path")]);
    Ok(dump
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("json line");
            let file = v["file"].as_str().expect("file").to_string();
            (file, v["error"].as_str().unwrap_or("").to_string())
        })
        .collect())
}

/// Out-of-range coordinates and capture times: which images mapillary_tools 0.14.7 refuses, and
/// that ours refuses the same ones (earlier, at the EXIF read, with a reason that says why).
#[test]
fn hostile_positions_and_times_are_rejected_where_mapillary_tools_rejects_them() {
    let venv = venv();
    let dir = scratch("hostile");
    let t0 = datetime!(2024-05-01 10:00:00.250 UTC);
    let ok = ImageSpec::new(50.8966, -0.5591, t0);
    let dto_only = |mut s: ImageSpec| {
        s.time_tags = TimeTags::DateTimeOriginal { offset: None };
        s
    };
    // One camera model each: mapillary_tools keeps out-of-range images in its sequence rules until
    // its final validation, so sharing a sequence would drop the good image too (capture speed).
    let camera = |mut s: ImageSpec, k: usize| {
        s.model = Some(format!("Model {k}"));
        s
    };
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("IMG_0000.jpg", relay_fixtures::jpeg(&ok)),
        (
            "IMG_0001.jpg",
            relay_fixtures::jpeg(&camera(ImageSpec::new(90.5, -0.5591, t0), 1)),
        ),
        (
            "IMG_0002.jpg",
            relay_fixtures::jpeg(&camera(ImageSpec::new(50.8966, -180.5, t0), 2)),
        ),
        (
            "IMG_0003.jpg",
            patched(
                &camera(dto_only(ok.clone()), 3),
                b"2024:05:01 10:00:00",
                b"0999:05:01 10:00:00",
            ),
        ),
        (
            "IMG_0004.jpg",
            patched(
                &camera(dto_only(ok.clone()), 4),
                b"2024:05:01 10:00:00",
                b"0000:05:01 10:00:00",
            ),
        ),
    ];
    for (name, bytes) in &files {
        std::fs::write(dir.join(name), bytes).expect("write");
    }
    let theirs = process(&venv, &dir).expect("mapillary_tools process");
    let ours: BTreeMap<String, String> = files
        .iter()
        .map(|(name, bytes)| {
            let r = read_metadata(bytes)
                .map(|_| String::new())
                .unwrap_or_else(|e| e.to_string());
            (name.to_string(), r)
        })
        .collect();
    let rejected = |m: &BTreeMap<String, String>| -> Vec<String> {
        m.iter()
            .filter(|(_, e)| !e.is_empty())
            .map(|(f, _)| f.clone())
            .collect()
    };
    assert_eq!(
        rejected(&ours),
        rejected(&theirs),
        "ours {ours:?}, theirs {theirs:?}"
    );
    // Theirs: the schema check (MAPLatitude/MAPLongitude minimum/maximum, the 4-digit-year
    // MAPCaptureTime pattern); year 0 has no timestamp at all (the error type then names the
    // next geotag source it tried, which depends on the machine, e.g. exiftool missing).
    assert_eq!(theirs["IMG_0000.jpg"], "");
    assert_eq!(theirs["IMG_0001.jpg"], "MapillaryMetadataValidationError");
    assert_eq!(theirs["IMG_0002.jpg"], "MapillaryMetadataValidationError");
    assert_eq!(theirs["IMG_0003.jpg"], "MapillaryMetadataValidationError");
    assert_ne!(theirs["IMG_0004.jpg"], "");
    assert_eq!(
        ours["IMG_0001.jpg"],
        "invalid GPS position: latitude 90.5 is outside -90..90"
    );
    assert_eq!(
        ours["IMG_0002.jpg"],
        "invalid GPS position: longitude -180.5 is outside -180..180"
    );
    assert!(
        ours["IMG_0003.jpg"].starts_with(
            "capture time out of range: DateTimeOriginal \"0999:05:01 10:00:00\" is not between 1000-01-01"
        ),
        "{}",
        ours["IMG_0003.jpg"]
    );
    assert_eq!(ours["IMG_0004.jpg"], "no capture time: none of GPSDateStamp+GPSTimeStamp, DateTimeOriginal, DateTimeDigitized or DateTime holds a valid date and time");
    let _ = std::fs::remove_dir_all(&dir);

    // Issue 15's file (9999-12-31 23:59:59 at -01:00 is in year 10000 in UTC): mapillary_tools
    // reads it, then fails the whole run formatting MAPCaptureTime. Ours rejects just the image.
    let dir = scratch("year10000");
    let mut s = ok;
    s.time_tags = TimeTags::DateTimeOriginal {
        offset: Some("-01:00".into()),
    };
    let bytes = patched(&s, b"2024:05:01 09:00:00", b"9999:12:31 23:59:59");
    std::fs::write(dir.join("IMG_0000.jpg"), &bytes).expect("write");
    let err = process(&venv, &dir).expect_err("mapillary_tools cannot process it");
    assert!(err.contains("year 10000 is out of range"), "{err}");
    assert!(matches!(
        read_metadata(&bytes),
        Err(shared::domain::exif::ExifError::CaptureTimeOutOfRange(_))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

fn python_stdin(venv: &Path, script: &str, input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(venv.join("bin/python"))
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("python output");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn validator_agrees_with_mapillary_tools() {
    let venv = venv();
    let cases = [
        r#"{"MAPLatitude":1,"MAPLongitude":2,"MAPCaptureTime":"2024_05_01_10_00_00_250"}"#,
        r#"{"MAPLatitude":90,"MAPLongitude":-180,"MAPCaptureTime":"2024_05_01_10_00_00_2","MAPOrientation":3.0}"#,
        r#"{"MAPLatitude":90.0000001,"MAPLongitude":0,"MAPCaptureTime":"2024_05_01_10_00_00_250"}"#,
        r#"{"MAPLatitude":1,"MAPLongitude":2}"#,
        r#"{"MAPLatitude":1,"MAPLongitude":2,"MAPCaptureTime":"2024_02_30_10_00_00_250"}"#,
        r#"{"MAPLatitude":1,"MAPLongitude":2,"MAPCaptureTime":"2024_05_01_10_00_60_250"}"#,
        r#"{"MAPLatitude":1,"MAPLongitude":2,"MAPCaptureTime":"2024_5_01_10_00_00_250"}"#,
        r#"{"MAPLatitude":1,"MAPLongitude":2,"MAPCaptureTime":"2024_05_01_10_00_00_1234567"}"#,
        r#"{"MAPLatitude":1,"MAPLongitude":2,"MAPCaptureTime":"2024_05_01_10_00_00_250","MAPX":1}"#,
        r#"{"MAPLatitude":1,"MAPLongitude":2,"MAPCaptureTime":"2024_05_01_10_00_00_250","MAPOrientation":1.5}"#,
        r#"{"MAPLatitude":1,"MAPLongitude":2,"MAPCaptureTime":"2024_05_01_10_00_00_250","MAPCompassHeading":{"TrueHeading":1}}"#,
        r#"{"MAPLatitude":1,"MAPLongitude":2,"MAPCaptureTime":"2024_05_01_10_00_00_250","MAPCompassHeading":{"TrueHeading":1,"MagneticHeading":2}}"#,
        r#"{"MAPLatitude":true,"MAPLongitude":2,"MAPCaptureTime":"2024_05_01_10_00_00_250"}"#,
        r#"{"MAPLatitude":1,"MAPLongitude":2,"MAPCaptureTime":"2024_05_01_10_00_00_250","MAPDeviceMake":5}"#,
    ];
    let verdicts = python_stdin(&venv, VALIDATE, &(cases.join("\n") + "\n"));
    let verdicts: Vec<&str> = verdicts.lines().collect();
    assert_eq!(verdicts.len(), cases.len());
    for (case, verdict) in cases.iter().zip(verdicts) {
        let ours = description::validate(case);
        assert_eq!(
            ours.is_ok(),
            verdict == "ok",
            "{case}: ours {ours:?}, mapillary_tools {verdict}"
        );
    }
}

#[test]
fn float_rounding_and_repr_match_python() {
    let venv = venv();
    // Deterministic spread of magnitudes, signs and exact binary ties.
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut values: Vec<f64> = vec![
        0.0,
        -0.0,
        0.0625,
        0.1875,
        77.0625,
        0.00390625,
        1e-5,
        359.9995,
        179.99999995,
        -90.0,
        1e16,
        1e-300,
    ];
    for i in 0..3000u64 {
        let r = next();
        let unit = (r >> 11) as f64 / (1u64 << 53) as f64;
        let v = match i % 5 {
            0 => unit * 360.0 - 180.0,
            1 => unit * 1e-4,
            2 => (r % 1_000_000) as f64 / 1024.0,
            3 => (unit - 0.5) * 1e6,
            _ => f64::from_bits(r >> 2),
        };
        values.push(v);
    }
    let input: String = values.iter().map(|v| format!("{}\n", v.to_bits())).collect();
    let script = r#"
import sys, json, struct
for line in sys.stdin.read().split():
    x = struct.unpack("<d", struct.pack("<Q", int(line)))[0]
    print(json.dumps([x, round(x, 7), round(x, 3)]))
"#;
    let out = python_stdin(&venv, script, &input);
    for (v, line) in values.iter().zip(out.lines()) {
        let want: Vec<&str> = line.trim_matches(['[', ']']).split(", ").collect();
        let got = [
            py_float_repr(*v),
            py_float_repr(py_round(*v, 7)),
            py_float_repr(py_round(*v, 3)),
        ];
        assert_eq!(got.as_slice(), want.as_slice(), "x = {v:e}");
    }
    assert_eq!(out.lines().count(), values.len());
}
