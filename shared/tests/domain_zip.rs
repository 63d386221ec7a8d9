//! Zip format tests: byte identity with CPython's `zipfile` used the way mapillary_tools 0.14.7 uses
//! it, read-back with the `zip` crate and mapillary_tools' own zip checks, ZIP64 tails, planning and
//! resuming at arbitrary offsets.

use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use md5::{Digest, Md5};
use shared::domain::zipfmt::{
    archive_comment, central_directory_and_end, entry_name, local_header, local_header_len, sequence_md5sum,
    EntryRecord, ZipFormatError, ZipPlan, ZipPosition, ZIP64_LIMIT,
};

// ---------------------------------------------------------------------------------------------
// helpers

/// The pinned mapillary_tools interpreter; missing venv is a test FAILURE, never a silent pass.
fn mapillary_python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/mapillary-tools/bin/python");
    assert!(
        p.exists(),
        "mapillary_tools venv missing at {}: run cargo xtask setup",
        p.display()
    );
    p
}

/// Run a Python snippet with the mapillary_tools interpreter; returns stdout; panics with stderr.
fn run_python(script: &str, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let mut child = Command::new(mapillary_python())
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        input.write_all(&data).expect("write stdin");
    });
    let out = child.wait_with_output().expect("python output");
    writer.join().expect("stdin writer");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A temporary directory removed on drop (std only; keeps shared's dev-dependencies small).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "shared-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).expect("mkdir temp");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic pseudo-random bytes (xorshift), so entries have non-trivial CRCs.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn md5_hex(data: &[u8]) -> String {
    hex::encode(Md5::digest(data))
}

/// Build a whole archive with our building blocks, the way the streaming uploader does.
fn build_ours(entries: &[(String, Vec<u8>)], comment: &[u8]) -> (Vec<u8>, Vec<EntryRecord>) {
    let plan = ZipPlan::new(
        entries.iter().map(|(n, d)| (n.clone(), d.len() as u64)).collect(),
        comment.len(),
    )
    .expect("plan");
    let mut out = Vec::new();
    let mut records = Vec::new();
    for ((name, data), planned) in entries.iter().zip(plan.entries()) {
        assert_eq!(planned.local_header_offset, out.len() as u64);
        let crc = crc32fast::hash(data);
        out.extend(local_header(name, crc, data.len() as u64).expect("local header"));
        assert_eq!(planned.data_offset, out.len() as u64);
        out.extend_from_slice(data);
        records.push(planned.record(crc));
    }
    assert_eq!(plan.central_directory_offset(), out.len() as u64);
    out.extend(central_directory_and_end(&records, comment).expect("tail"));
    assert_eq!(plan.total_len(), out.len() as u64);
    (out, records)
}

/// CPython reference: exactly mapillary_tools' `_zip_sequence_fp` calls (ZipFile(fp, "w",
/// ZIP_DEFLATED), ZipInfo(name, date_time=(1980,1,1,0,0,0)), writestr, comment), from entry files.
const PY_ZIP: &str = r#"
import io, json, os, sys, zipfile
src, comment = sys.argv[1], sys.argv[2].encode("utf-8")
names = json.loads(sys.stdin.read())
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zipf:
    for i, name in enumerate(names):
        with open(os.path.join(src, str(i)), "rb") as f:
            data = f.read()
        zipinfo = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        zipf.writestr(zipinfo, data)
    zipf.comment = comment
sys.stdout.buffer.write(buf.getvalue())
"#;

fn python_zip(entries: &[(String, Vec<u8>)], comment: &str) -> Vec<u8> {
    let dir = TempDir::new("pyzip");
    for (i, (_, data)) in entries.iter().enumerate() {
        std::fs::write(dir.0.join(i.to_string()), data).expect("write entry");
    }
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    let names_json = serde_json::to_string(&names).expect("json");
    run_python(
        PY_ZIP,
        &[dir.0.to_str().expect("utf8 path"), comment],
        names_json.as_bytes(),
    )
}

fn sample_entries(n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            // varied sizes, including an empty entry and a 1-byte one
            let len = match i {
                0 => 0,
                1 => 1,
                _ => 1000 + 7919 * i,
            };
            (entry_name(i), bytes(i as u64 + 1, len))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// byte identity with CPython / mapillary_tools

#[test]
fn zip_is_byte_identical_to_python_zipfile_as_mapillary_tools_uses_it() {
    let entries = sample_entries(12);
    let md5s: Vec<String> = entries.iter().map(|(_, d)| md5_hex(d)).collect();
    let seq = sequence_md5sum(&md5s);
    let comment = archive_comment(&seq);
    let (ours, records) = build_ours(&entries, &comment);
    let theirs = python_zip(&entries, std::str::from_utf8(&comment).expect("ascii"));
    assert_eq!(ours.len(), theirs.len(), "zip length differs from CPython");
    assert!(ours == theirs, "zip bytes differ from CPython's zipfile");
    assert_eq!(records.len(), 12);
}

#[test]
fn non_ascii_names_get_the_utf8_flag_like_python() {
    let entries = vec![
        ("0.jpg".to_owned(), bytes(1, 300)),
        ("ünïcødé €.jpg".to_owned(), bytes(2, 500)),
        ("dir/名前.jpg".to_owned(), bytes(3, 10)),
    ];
    let comment = archive_comment(&"a".repeat(32));
    let (ours, _) = build_ours(&entries, &comment);
    let theirs = python_zip(&entries, std::str::from_utf8(&comment).expect("ascii"));
    assert!(ours == theirs, "zip bytes differ from CPython for UTF-8 names");
    // and the flag really is there (bit 11 of the first non-ASCII local header)
    let second = 30 + "0.jpg".len() + 300;
    let flags = u16::from_le_bytes([ours[second + 6], ours[second + 7]]);
    assert_eq!(flags & 0x0800, 0x0800);
    let first_flags = u16::from_le_bytes([ours[6], ours[7]]);
    assert_eq!(first_flags, 0);
}

#[test]
fn more_than_65535_entries_uses_zip64_end_records_identically_to_python() {
    // Python switches to the ZIP64 end record when the entry count exceeds 0xFFFF.
    let n = 70_000;
    let entries: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| (entry_name(i), vec![(i % 251) as u8; i % 3]))
        .collect();
    let comment = archive_comment(&"0".repeat(32));
    let (ours, _) = build_ours(&entries, &comment);
    let theirs = python_zip(&entries, std::str::from_utf8(&comment).expect("ascii"));
    assert_eq!(ours.len(), theirs.len());
    assert!(ours == theirs, "ZIP64-count archive differs from CPython");
    let end = parse_tail(&ours);
    assert!(end.zip64);
    assert_eq!(end.entries.len(), n);
    // the zip crate reads it too
    let mut za = zip::ZipArchive::new(Cursor::new(&ours)).expect("zip crate opens zip64 archive");
    assert_eq!(za.len(), n);
    let mut content = Vec::new();
    za.by_name("69999.jpg")
        .expect("last entry")
        .read_to_end(&mut content)
        .expect("read");
    assert_eq!(content, entries[69_999].1);
}

#[test]
fn sequence_md5sum_matches_mapillary_tools_update_sequence_md5sum() {
    let dir = TempDir::new("seqmd5");
    let images: Vec<Vec<u8>> = (0..5).map(|i| bytes(100 + i, 2000 + 13 * i as usize)).collect();
    let mut paths = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let p = dir.0.join(format!("IMG_{i:04}.jpg"));
        std::fs::write(&p, img).expect("write");
        paths.push(p.to_str().expect("utf8").to_owned());
    }
    let script = r#"
import sys
from pathlib import Path
from mapillary_tools import types
seq = [types.ImageMetadata(time=float(i), lat=1.0, lon=2.0, alt=None, angle=None, filename=Path(p))
       for i, p in enumerate(sys.argv[1:])]
print(types.update_sequence_md5sum(seq), end="")
"#;
    let args: Vec<&str> = paths.iter().map(String::as_str).collect();
    let theirs = String::from_utf8(run_python(script, &args, &[])).expect("utf8");
    let md5s: Vec<String> = images.iter().map(|d| md5_hex(d)).collect();
    assert_eq!(sequence_md5sum(&md5s), theirs);
    // upper-case input digests are normalised to the lowercase form Python hashes
    let upper: Vec<String> = md5s.iter().map(|s| s.to_uppercase()).collect();
    assert_eq!(sequence_md5sum(&upper), theirs);
    // order matters
    let mut rev = md5s.clone();
    rev.reverse();
    assert_ne!(sequence_md5sum(&rev), theirs);
    // empty sequence: md5 of nothing
    assert_eq!(sequence_md5sum::<String>(&[]), "d41d8cd98f00b204e9800998ecf8427e");
}

// ---------------------------------------------------------------------------------------------
// read-back

#[test]
fn zip_crate_reads_entries_stored_with_1980_timestamps_and_comment() {
    let entries = sample_entries(6);
    let md5s: Vec<String> = entries.iter().map(|(_, d)| md5_hex(d)).collect();
    let comment = archive_comment(&sequence_md5sum(&md5s));
    let (ours, _) = build_ours(&entries, &comment);
    let mut za = zip::ZipArchive::new(Cursor::new(&ours)).expect("open");
    assert_eq!(za.comment(), comment.as_slice());
    assert_eq!(za.len(), entries.len());
    for (i, (name, data)) in entries.iter().enumerate() {
        let mut f = za.by_index(i).expect("entry");
        assert_eq!(f.name().expect("name"), name.as_str());
        assert_eq!(f.compression(), zip::CompressionMethod::Stored);
        assert_eq!(f.size(), data.len() as u64);
        assert_eq!(f.compressed_size(), data.len() as u64);
        let dt = f.last_modified().expect("timestamp");
        assert_eq!(
            (
                dt.year(),
                dt.month(),
                dt.day(),
                dt.hour(),
                dt.minute(),
                dt.second()
            ),
            (1980, 1, 1, 0, 0, 0)
        );
        let mut got = Vec::new();
        f.read_to_end(&mut got).expect("read (CRC checked)");
        assert_eq!(&got, data);
    }
}

#[test]
fn mapillary_tools_accepts_our_zip_and_reads_its_sequence_md5sum() {
    let entries = sample_entries(4);
    let md5s: Vec<String> = entries.iter().map(|(_, d)| md5_hex(d)).collect();
    let seq = sequence_md5sum(&md5s);
    let (ours, _) = build_ours(&entries, &archive_comment(&seq));
    let dir = TempDir::new("mlyzip");
    let path = dir.0.join("seq.zip");
    std::fs::write(&path, &ours).expect("write zip");
    // The same checks `ZipUploader._upload_zipfile` makes before uploading, plus a CRC test and
    // a per-entry info dump.
    let script = r#"
import json, sys, zipfile
from pathlib import Path
from mapillary_tools.uploader import ZipUploader
p = Path(sys.argv[1])
with zipfile.ZipFile(p) as z:
    names = z.namelist()
    assert names, "Zipfile has no files"
    assert z.testzip() is None, "CRC error"
    infos = [[i.filename, i.compress_type, list(i.date_time), i.file_size, i.flag_bits] for i in z.infolist()]
with p.open("rb") as fp:
    md5 = ZipUploader._extract_sequence_md5sum(fp)
print(json.dumps({"names": names, "md5": md5, "infos": infos}))
"#;
    let out = run_python(script, &[path.to_str().expect("utf8")], &[]);
    let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(v["md5"], seq.as_str());
    let names: Vec<String> = (0..4).map(entry_name).collect();
    assert_eq!(v["names"], serde_json::json!(names));
    for (i, info) in v["infos"].as_array().expect("infos").iter().enumerate() {
        assert_eq!(info[1], 0, "STORED");
        assert_eq!(info[2], serde_json::json!([1980, 1, 1, 0, 0, 0]));
        assert_eq!(info[3], entries[i].1.len());
        assert_eq!(info[4], 0, "no data descriptor, no UTF-8 flag for ASCII names");
    }

    // and a zip without the comment is refused by the same function
    let (bare, _) = build_ours(&entries, b"");
    std::fs::write(&path, &bare).expect("write zip");
    let script = r#"
import sys
from pathlib import Path
from mapillary_tools.uploader import ZipUploader, InvalidMapillaryZipFileError
try:
    with Path(sys.argv[1]).open("rb") as fp:
        ZipUploader._extract_sequence_md5sum(fp)
    print("accepted")
except InvalidMapillaryZipFileError as ex:
    print("rejected:", ex)
"#;
    let out = String::from_utf8(run_python(script, &[path.to_str().expect("utf8")], &[])).expect("utf8");
    assert!(out.starts_with("rejected:"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// ZIP64 with synthetic sizes (no 4 GiB allocation)

/// A central-directory entry as parsed back by our own reader.
#[derive(Debug, PartialEq)]
struct ParsedCd {
    name: String,
    crc32: u32,
    size: u64,
    compressed: u64,
    offset: u64,
    version_made: u16,
    version_needed: u16,
}

struct ParsedTail {
    entries: Vec<ParsedCd>,
    cd_offset: u64,
    zip64: bool,
    comment: Vec<u8>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8"))
}

/// Parse a tail (central directory + end records) that starts at byte 0 of `tail`, locating it
/// from the end record like a real reader does and resolving ZIP64 extras.
fn parse_tail_at(tail: &[u8], tail_start: u64) -> ParsedTail {
    let mut eocd = tail.len() - 22;
    while u32_at(tail, eocd) != 0x0605_4b50 {
        eocd -= 1;
    }
    let comment_len = u16_at(tail, eocd + 20) as usize;
    let comment = tail[eocd + 22..eocd + 22 + comment_len].to_vec();
    assert_eq!(eocd + 22 + comment_len, tail.len(), "comment runs to the end");
    let mut count = u64::from(u16_at(tail, eocd + 10));
    let mut cd_size = u64::from(u32_at(tail, eocd + 12));
    let mut cd_offset = u64::from(u32_at(tail, eocd + 16));
    let mut zip64 = false;
    if eocd >= 20 && u32_at(tail, eocd - 20) == 0x0706_4b50 {
        zip64 = true;
        let rec_abs = u64_at(tail, eocd - 20 + 8);
        assert_eq!(u32_at(tail, eocd - 20 + 16), 1, "total disks");
        let rec = (rec_abs - tail_start) as usize;
        assert_eq!(rec, eocd - 20 - 56, "locator points at the zip64 end record");
        assert_eq!(u32_at(tail, rec), 0x0606_4b50);
        assert_eq!(u64_at(tail, rec + 4), 44);
        assert_eq!(u16_at(tail, rec + 12), 45);
        assert_eq!(u16_at(tail, rec + 14), 45);
        assert_eq!(u64_at(tail, rec + 24), u64_at(tail, rec + 32));
        count = u64_at(tail, rec + 32);
        cd_size = u64_at(tail, rec + 40);
        cd_offset = u64_at(tail, rec + 48);
    }
    assert_eq!(cd_offset, tail_start, "central directory offset");
    let mut entries = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        assert_eq!(u32_at(tail, at), 0x0201_4b50);
        let version_made = u16::from(tail[at + 4]);
        let version_needed = u16_at(tail, at + 6);
        let crc32 = u32_at(tail, at + 16);
        let mut compressed = u64::from(u32_at(tail, at + 20));
        let mut size = u64::from(u32_at(tail, at + 24));
        let name_len = u16_at(tail, at + 28) as usize;
        let extra_len = u16_at(tail, at + 30) as usize;
        let comment_len = u16_at(tail, at + 32) as usize;
        let mut offset = u64::from(u32_at(tail, at + 42));
        let name = String::from_utf8(tail[at + 46..at + 46 + name_len].to_vec()).expect("name");
        let mut extra = &tail[at + 46 + name_len..at + 46 + name_len + extra_len];
        while extra.len() >= 4 {
            let (tag, len) = (u16_at(extra, 0), u16_at(extra, 2) as usize);
            let mut data = &extra[4..4 + len];
            if tag == 1 {
                if size == 0xFFFF_FFFF {
                    size = u64_at(data, 0);
                    data = &data[8..];
                }
                if compressed == 0xFFFF_FFFF {
                    compressed = u64_at(data, 0);
                    data = &data[8..];
                }
                if offset == 0xFFFF_FFFF {
                    offset = u64_at(data, 0);
                    data = &data[8..];
                }
                assert!(data.is_empty(), "no stray zip64 fields");
            }
            extra = &extra[4 + len..];
        }
        entries.push(ParsedCd {
            name,
            crc32,
            size,
            compressed,
            offset,
            version_made,
            version_needed,
        });
        at += 46 + name_len + extra_len + comment_len;
    }
    assert_eq!(at as u64, cd_size, "central directory size");
    ParsedTail {
        entries,
        cd_offset,
        zip64,
        comment,
    }
}

fn parse_tail(zip: &[u8]) -> ParsedTail {
    // find the central directory start through the end record, then parse from there
    let mut eocd = zip.len() - 22;
    while u32_at(zip, eocd) != 0x0605_4b50 {
        eocd -= 1;
    }
    let mut cd_offset = u64::from(u32_at(zip, eocd + 16));
    if eocd >= 20 && u32_at(zip, eocd - 20) == 0x0706_4b50 {
        let rec = u64_at(zip, eocd - 20 + 8) as usize;
        cd_offset = u64_at(zip, rec + 48);
    }
    parse_tail_at(&zip[cd_offset as usize..], cd_offset)
}

/// Synthetic records for entries of the given sizes laid out back to back.
fn synthetic_records(sizes: &[u64]) -> (ZipPlan, Vec<EntryRecord>) {
    let plan = ZipPlan::from_sizes(sizes, 54).expect("plan");
    let records = plan
        .entries()
        .iter()
        .enumerate()
        .map(|(i, e)| e.record(0x1234_5678 ^ i as u32))
        .collect();
    (plan, records)
}

/// CPython reference for the tail of an archive of huge synthetic entries: the real
/// `ZipInfo.FileHeader` / `ZipFile._write_end_record` code, fed ZipInfos shaped exactly as
/// `writestr` + `_open_to_write` + `_ZipWriteFile.close` leave them, into a position-tracking sink.
const PY_SYNTHETIC: &str = r#"
import io, json, sys, zipfile
spec = json.loads(sys.stdin.read())
class Sink:
    def __init__(self, pos): self.pos, self.buf = pos, bytearray()
    def write(self, b): self.buf += b; self.pos += len(b); return len(b)
    def tell(self): return self.pos
    def flush(self): pass
zf = zipfile.ZipFile(io.BytesIO(), "w", zipfile.ZIP_DEFLATED)
headers = []
infos = []
pos = 0
for e in spec["entries"]:
    zi = zipfile.ZipInfo(e["name"], date_time=(1980, 1, 1, 0, 0, 0))
    zi.file_size = e["size"]
    zi.compress_size, zi.CRC, zi.flag_bits = 0, 0, 0
    zi.external_attr = 0o600 << 16
    zip64 = zi.file_size * 1.05 > zipfile.ZIP64_LIMIT
    zi.header_offset = pos
    zi.FileHeader(zip64)
    zi.compress_size, zi.CRC = e["size"], e["crc32"]
    h = zi.FileHeader(zip64)
    headers.append(h.hex())
    pos += len(h) + e["size"]
    infos.append(zi)
zf.filelist = infos
zf.fp = Sink(pos)
zf.start_dir = pos
zf._comment = spec["comment"].encode()
zf._write_end_record()
print(json.dumps({"headers": headers, "tail": zf.fp.buf.hex(), "cd_offset": pos}))
"#;

fn python_synthetic(records: &[EntryRecord], comment: &str) -> (Vec<Vec<u8>>, Vec<u8>, u64) {
    let spec = serde_json::json!({
        "entries": records.iter().map(|r| serde_json::json!({
            "name": r.name, "size": r.size, "crc32": r.crc32
        })).collect::<Vec<_>>(),
        "comment": comment,
    });
    let out = run_python(PY_SYNTHETIC, &[], spec.to_string().as_bytes());
    let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
    let headers = v["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .map(|h| hex::decode(h.as_str().expect("hex")).expect("hex"))
        .collect();
    let tail = hex::decode(v["tail"].as_str().expect("tail")).expect("hex");
    (headers, tail, v["cd_offset"].as_u64().expect("offset"))
}

#[test]
fn zip64_headers_and_tail_for_huge_entries_match_python_and_round_trip() {
    let gib = 1u64 << 30;
    // small; just under/over the local-header float rule; over the central ZIP64_LIMIT;
    // over 4 GiB; then small entries living beyond the 2 GiB / 4 GiB offsets.
    let sizes = [
        10,
        2_045_222_520,
        2_045_222_521,
        ZIP64_LIMIT,
        ZIP64_LIMIT + 1,
        5 * gib,
        0xFFFF_FFFF,
        123,
        0,
    ];
    let (plan, records) = synthetic_records(&sizes);
    let comment = std::str::from_utf8(&archive_comment(&"f".repeat(32)))
        .expect("ascii")
        .to_owned();
    assert_eq!(comment.len(), 54);
    let tail = central_directory_and_end(&records, comment.as_bytes()).expect("tail");
    assert_eq!(tail.len() as u64, plan.tail_len());

    let (py_headers, py_tail, py_cd_offset) = python_synthetic(&records, &comment);
    assert_eq!(py_cd_offset, plan.central_directory_offset());
    for (r, py) in records.iter().zip(&py_headers) {
        let ours = local_header(&r.name, r.crc32, r.size).expect("header");
        assert_eq!(&ours, py, "local header of {} ({} bytes)", r.name, r.size);
        assert_eq!(ours.len() as u64, local_header_len(&r.name, r.size));
    }
    assert_eq!(tail, py_tail, "ZIP64 tail differs from CPython");

    // Our own reader gets every record back.
    let parsed = parse_tail_at(&tail, plan.central_directory_offset());
    assert!(
        parsed.zip64,
        "central directory beyond 2 GiB needs ZIP64 end records"
    );
    assert_eq!(parsed.cd_offset, plan.central_directory_offset());
    assert_eq!(parsed.comment, comment.as_bytes());
    assert_eq!(parsed.entries.len(), records.len());
    for (p, r) in parsed.entries.iter().zip(&records) {
        assert_eq!(p.name, r.name);
        assert_eq!(p.crc32, r.crc32);
        assert_eq!(p.size, r.size);
        assert_eq!(p.compressed, r.size);
        assert_eq!(p.offset, r.local_header_offset);
        let zip64ish = r.size > ZIP64_LIMIT
            || r.local_header_offset > ZIP64_LIMIT
            || (r.size as f64) * 1.05 > ZIP64_LIMIT as f64;
        let v = if zip64ish { 45 } else { 20 };
        assert_eq!((p.version_made, p.version_needed), (v, v), "{}", r.name);
    }
    // local header ZIP64 extra carries the size twice
    let big = local_header("5.jpg", 1, 5 * gib).expect("header");
    assert_eq!(u32_at(&big, 18), 0xFFFF_FFFF);
    assert_eq!(u32_at(&big, 22), 0xFFFF_FFFF);
    assert_eq!(u16_at(&big, 30 + 5), 1);
    assert_eq!(u16_at(&big, 30 + 5 + 2), 16);
    assert_eq!(u64_at(&big, 30 + 5 + 4), 5 * gib);
    assert_eq!(u64_at(&big, 30 + 5 + 12), 5 * gib);
}

#[test]
fn small_archive_has_no_zip64_records() {
    let (plan, records) = synthetic_records(&[100, 200, 300]);
    let tail = central_directory_and_end(&records, &[b'x'; 54]).expect("tail");
    assert_eq!(tail.len() as u64, plan.tail_len());
    let parsed = parse_tail_at(&tail, plan.central_directory_offset());
    assert!(!parsed.zip64);
    assert!(!tail.windows(4).any(|w| w == [0x50, 0x4b, 0x06, 0x06]));
}

// ---------------------------------------------------------------------------------------------
// plan, resume, errors, serde

/// Emit the archive from byte `from` using only the plan, entry bytes and checkpointed records —
/// what a resumed upload does.
fn emit_from(
    plan: &ZipPlan,
    data: &[Vec<u8>],
    records: &[EntryRecord],
    comment: &[u8],
    from: u64,
) -> Vec<u8> {
    let mut out = Vec::new();
    let (first, mut skip) = match plan.locate(from) {
        ZipPosition::End => return out,
        ZipPosition::Tail { within } => {
            let tail = central_directory_and_end(records, comment).expect("tail");
            return tail[within as usize..].to_vec();
        }
        ZipPosition::LocalHeader { index, within } => (index, within as usize),
        ZipPosition::Data { index, within } => {
            let e = &plan.entries()[index];
            (
                index,
                (e.data_offset - e.local_header_offset) as usize + within as usize,
            )
        }
    };
    for i in first..data.len() {
        let e = &plan.entries()[i];
        let mut piece = local_header(&e.name, records[i].crc32, e.size).expect("header");
        piece.extend_from_slice(&data[i]);
        out.extend_from_slice(&piece[skip..]);
        skip = 0;
    }
    out.extend(central_directory_and_end(records, comment).expect("tail"));
    out
}

#[test]
fn resuming_at_every_offset_reproduces_the_same_bytes() {
    let entries = sample_entries(4);
    let comment = archive_comment(&"c".repeat(32));
    let (full, records) = build_ours(&entries, &comment);
    let plan = ZipPlan::from_sizes(
        &entries.iter().map(|(_, d)| d.len() as u64).collect::<Vec<_>>(),
        comment.len(),
    )
    .expect("plan");
    let data: Vec<Vec<u8>> = entries.iter().map(|(_, d)| d.clone()).collect();
    // checkpointed records survive a JSON round trip (they go to DynamoDB)
    let json = serde_json::to_string(&records).expect("ser");
    let restored: Vec<EntryRecord> = serde_json::from_str(&json).expect("de");
    assert_eq!(restored, records);
    for from in 0..=full.len() as u64 {
        let rest = emit_from(&plan, &data, &restored, &comment, from);
        assert_eq!(rest.as_slice(), &full[from as usize..], "resume at byte {from}");
    }
}

#[test]
fn locate_classifies_boundaries() {
    let plan = ZipPlan::from_sizes(&[5, 0, 7], 3).expect("plan");
    let e = plan.entries();
    assert_eq!(e[0].local_header_offset, 0);
    assert_eq!(e[0].data_offset, 35);
    assert_eq!(e[1].local_header_offset, 40);
    assert_eq!(e[1].data_offset, 75);
    assert_eq!(e[2].local_header_offset, 75, "empty entry has no data bytes");
    assert_eq!(plan.locate(0), ZipPosition::LocalHeader { index: 0, within: 0 });
    assert_eq!(plan.locate(35), ZipPosition::Data { index: 0, within: 0 });
    assert_eq!(plan.locate(39), ZipPosition::Data { index: 0, within: 4 });
    assert_eq!(plan.locate(40), ZipPosition::LocalHeader { index: 1, within: 0 });
    assert_eq!(plan.locate(75), ZipPosition::LocalHeader { index: 2, within: 0 });
    let cd = plan.central_directory_offset();
    assert_eq!(cd, 75 + 35 + 7);
    assert_eq!(plan.locate(cd - 1), ZipPosition::Data { index: 2, within: 6 });
    assert_eq!(plan.locate(cd), ZipPosition::Tail { within: 0 });
    assert_eq!(plan.locate(plan.total_len()), ZipPosition::End);
    assert_eq!(plan.total_len(), cd + 3 * (46 + 5) + 22 + 3);
    // an empty archive is just the end record
    let empty = ZipPlan::from_sizes(&[], 0).expect("plan");
    assert_eq!(empty.total_len(), 22);
    assert_eq!(empty.locate(0), ZipPosition::Tail { within: 0 });
    assert_eq!(central_directory_and_end(&[], b"").expect("tail").len(), 22);
}

#[test]
fn unrepresentable_archives_are_errors_not_panics() {
    assert_eq!(local_header("", 0, 1), Err(ZipFormatError::BadName { len: 0 }));
    let long = "a".repeat(70_000);
    assert_eq!(
        local_header(&long, 0, 1),
        Err(ZipFormatError::BadName { len: 70_000 })
    );
    assert_eq!(
        central_directory_and_end(&[], &vec![0u8; 65_536]),
        Err(ZipFormatError::CommentTooLong { len: 65_536 })
    );
    assert_eq!(
        ZipPlan::from_sizes(&[1], 65_536),
        Err(ZipFormatError::CommentTooLong { len: 65_536 })
    );
    assert_eq!(
        ZipPlan::from_sizes(&[u64::MAX - 10], 0),
        Err(ZipFormatError::TooLarge)
    );
    assert_eq!(
        ZipPlan::from_sizes(&[u64::MAX / 2, u64::MAX / 2], 0),
        Err(ZipFormatError::TooLarge)
    );
    let bad = EntryRecord {
        name: "0.jpg".into(),
        crc32: 0,
        size: u64::MAX,
        local_header_offset: 5,
    };
    assert_eq!(
        central_directory_and_end(&[bad], b""),
        Err(ZipFormatError::TooLarge)
    );
}
