//! Byte format of a mapillary_tools-style upload zip, as pure building blocks for a streaming,
//! resumable writer.
//!
//! mapillary_tools 0.14.7 (`uploader.py` `ZipUploader._zip_sequence_fp`) writes one zip per sequence
//! with Python's `zipfile` on a seekable file: entries `0.jpg`, `1.jpg`, … created from
//! `ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))` (so STORED, no data descriptor, CRC-32 and sizes
//! in the local header), and the archive comment `{"sequence_md5sum":"<32 hex>"}`.
//!
//! This module reproduces those bytes exactly — including CPython 3.11 `zipfile`'s ZIP64 rules, which
//! switch to ZIP64 at `(1 << 31) - 1` bytes, not at `0xFFFFFFFF` — so that a zip streamed entry by
//! entry is byte-identical to the one mapillary_tools would write from the same entry bytes.
//! The zip format is hand-rolled rather than written with the `zip` crate because the uploader must
//! know every offset and the total length before streaming, emit the archive in pieces across Lambda
//! invocations, and resume at an arbitrary byte offset; no writer crate exposes that.
//!
//! Layout of an archive (`n` entries):
//! `[local header 0][data 0] … [local header n-1][data n-1][central directory][zip64 end + locator]?[end record + comment]`.

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// CPython `zipfile.ZIP64_LIMIT`: sizes and offsets strictly above this need ZIP64 records.
pub const ZIP64_LIMIT: u64 = (1 << 31) - 1;
/// CPython `zipfile.ZIP_FILECOUNT_LIMIT`: more entries than this need the ZIP64 end records.
pub const ZIP_FILECOUNT_LIMIT: u64 = (1 << 16) - 1;
/// Longest archive comment the end record can carry.
pub const MAX_COMMENT_LEN: usize = 0xFFFF;

const LOCAL_HEADER_SIG: u32 = 0x0403_4b50;
const CENTRAL_DIR_SIG: u32 = 0x0201_4b50;
const END_SIG: u32 = 0x0605_4b50;
const ZIP64_END_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const LOCAL_HEADER_FIXED_LEN: u64 = 30;
const CENTRAL_DIR_FIXED_LEN: u64 = 46;
const END_RECORD_FIXED_LEN: u64 = 22;
const ZIP64_END_LEN: u64 = 56;
const ZIP64_LOCATOR_LEN: u64 = 20;
/// `zipfile.DEFAULT_VERSION` (2.0) and `ZIP64_VERSION` (4.5).
const DEFAULT_VERSION: u16 = 20;
const ZIP64_VERSION: u16 = 45;
/// `ZipInfo.create_system` on non-Windows hosts (Unix).
const CREATE_SYSTEM_UNIX: u8 = 3;
/// `zipfile` sets `external_attr = 0o600 << 16` (`?rw-------`) when it is zero.
const EXTERNAL_ATTR: u32 = 0o600 << 16;
/// General-purpose flag bit 11: the name is UTF-8 (set only for non-ASCII names, as `zipfile` does).
const FLAG_UTF8: u16 = 0x0800;
/// DOS date of 1980-01-01 (`(1980-1980) << 9 | 1 << 5 | 1`); the DOS time of 00:00:00 is 0.
const DOS_DATE_1980_01_01: u16 = (1 << 5) | 1;
const DOS_TIME_MIDNIGHT: u16 = 0;

/// Errors for archives that cannot be represented.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZipFormatError {
    /// An entry name is empty or longer than the 16-bit name length field allows.
    #[error("zip entry name must be 1..=65535 bytes, got {len} bytes")]
    BadName {
        /// Byte length of the rejected name.
        len: usize,
    },
    /// The archive comment does not fit the 16-bit comment length field.
    #[error("zip archive comment is {len} bytes; the limit is 65535")]
    CommentTooLong {
        /// Byte length of the rejected comment.
        len: usize,
    },
    /// Offsets or sizes overflow 64 bits.
    #[error("zip archive layout overflows 64-bit offsets")]
    TooLarge,
}

/// What the central directory needs to know about one entry after its bytes have been written.
///
/// Checkpointed (e.g. in DynamoDB) so that a resumed upload can emit the archive's tail without
/// re-reading the entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRecord {
    /// Entry name (e.g. `0.jpg`).
    pub name: String,
    /// CRC-32 (IEEE) of the entry's bytes.
    pub crc32: u32,
    /// Entry size in bytes (STORED: compressed size == size).
    pub size: u64,
    /// Offset of the entry's local header from the start of the archive.
    pub local_header_offset: u64,
}

/// Name of the `index`-th entry, as mapillary_tools names them (`0.jpg`, `1.jpg`, …).
pub fn entry_name(index: usize) -> String {
    format!("{index}.jpg")
}

/// The archive comment mapillary_tools writes: compact, key-sorted JSON `{"sequence_md5sum":"…"}`.
pub fn archive_comment(sequence_md5sum: &str) -> Vec<u8> {
    // One key, so "sorted" is trivially true; serde_json gives the compact separators and the same
    // escaping as Python's json.dumps for any ASCII input.
    let mut map = serde_json::Map::new();
    map.insert(
        "sequence_md5sum".to_owned(),
        serde_json::Value::String(sequence_md5sum.to_owned()),
    );
    serde_json::Value::Object(map).to_string().into_bytes()
}

/// `sequence_md5sum` (protocol §4.3, `types.update_sequence_md5sum`): the md5 of the concatenated
/// lowercase hex md5 digests of the ORIGINAL images (before EXIF injection), in sequence order.
///
/// Inputs are expected to be 32-hex-digit digests; they are lower-cased before hashing, as the
/// Python `hexdigest()` strings always are.
pub fn sequence_md5sum<S: AsRef<str>>(original_md5_hex: &[S]) -> String {
    let mut md5 = Md5::new();
    for digest in original_md5_hex {
        md5.update(digest.as_ref().to_ascii_lowercase().as_bytes());
    }
    hex::encode(md5.finalize())
}

/// Whether CPython writes a ZIP64 extra into the LOCAL header of an entry of `size` bytes:
/// `_open_to_write` uses `file_size * 1.05 > ZIP64_LIMIT` (float arithmetic, reproduced exactly).
pub fn local_header_is_zip64(size: u64) -> bool {
    (size as f64) * 1.05 > ZIP64_LIMIT as f64
}

fn check_name(name: &str) -> Result<(), ZipFormatError> {
    if name.is_empty() || name.len() > 0xFFFF {
        return Err(ZipFormatError::BadName { len: name.len() });
    }
    Ok(())
}

fn name_flags(name: &str) -> u16 {
    if name.is_ascii() {
        0
    } else {
        FLAG_UTF8
    }
}

/// Length of the local header `local_header(name, _, size)` produces.
pub fn local_header_len(name: &str, size: u64) -> u64 {
    let extra = if local_header_is_zip64(size) { 20 } else { 0 };
    LOCAL_HEADER_FIXED_LEN + name.len() as u64 + extra
}

/// Local file header of a STORED entry with known CRC-32 and size, exactly as CPython's
/// `ZipInfo.FileHeader` writes it for a `ZipInfo(name, date_time=(1980,1,1,0,0,0))`.
/// The entry's `size` bytes follow it directly (no data descriptor).
pub fn local_header(name: &str, crc32: u32, size: u64) -> Result<Vec<u8>, ZipFormatError> {
    check_name(name)?;
    let zip64 = local_header_is_zip64(size);
    let (version, size32, extra_len) = if zip64 {
        (ZIP64_VERSION, u32::MAX, 20u16)
    } else {
        // Not ZIP64 implies size <= ZIP64_LIMIT < u32::MAX.
        (DEFAULT_VERSION, size as u32, 0u16)
    };
    let mut out = Vec::with_capacity(local_header_len(name, size) as usize);
    put_u32(&mut out, LOCAL_HEADER_SIG);
    put_u16(&mut out, version); // version needed to extract
    put_u16(&mut out, name_flags(name));
    put_u16(&mut out, 0); // method: STORED
    put_u16(&mut out, DOS_TIME_MIDNIGHT);
    put_u16(&mut out, DOS_DATE_1980_01_01);
    put_u32(&mut out, crc32);
    put_u32(&mut out, size32); // compressed size
    put_u32(&mut out, size32); // uncompressed size
    put_u16(&mut out, name.len() as u16);
    put_u16(&mut out, extra_len);
    out.extend_from_slice(name.as_bytes());
    if zip64 {
        put_u16(&mut out, 0x0001);
        put_u16(&mut out, 16);
        put_u64(&mut out, size); // file size
        put_u64(&mut out, size); // compress size
    }
    Ok(out)
}

/// Per-entry central-directory facts that depend only on size and offset.
struct CentralShape {
    extra: Vec<u64>,
    version: u16,
}

fn central_shape(size: u64, offset: u64) -> CentralShape {
    let mut extra = Vec::new();
    if size > ZIP64_LIMIT {
        extra.push(size); // file size
        extra.push(size); // compress size
    }
    if offset > ZIP64_LIMIT {
        extra.push(offset);
    }
    // The local header call already raised ZipInfo.extract/create_version to 45 when the local
    // header was ZIP64; CPython keeps that in the central directory too.
    let version = if !extra.is_empty() || local_header_is_zip64(size) {
        ZIP64_VERSION
    } else {
        DEFAULT_VERSION
    };
    CentralShape { extra, version }
}

fn central_entry_len(name: &str, size: u64, offset: u64) -> u64 {
    let shape = central_shape(size, offset);
    let extra_len = if shape.extra.is_empty() {
        0
    } else {
        4 + 8 * shape.extra.len() as u64
    };
    CENTRAL_DIR_FIXED_LEN + name.len() as u64 + extra_len
}

fn end_records_len(count: u64, cd_offset: u64, cd_size: u64, comment_len: usize) -> u64 {
    let zip64 = if end_needs_zip64(count, cd_offset, cd_size) {
        ZIP64_END_LEN + ZIP64_LOCATOR_LEN
    } else {
        0
    };
    zip64 + END_RECORD_FIXED_LEN + comment_len as u64
}

fn end_needs_zip64(count: u64, cd_offset: u64, cd_size: u64) -> bool {
    count > ZIP_FILECOUNT_LIMIT || cd_offset > ZIP64_LIMIT || cd_size > ZIP64_LIMIT
}

/// The archive's tail: the central directory for `entries` (in archive order), ZIP64 end record
/// and locator when CPython would write them, and the end record carrying `comment`.
///
/// The central directory starts right after the last entry's data, i.e. at
/// `last.local_header_offset + local_header_len(last) + last.size` (0 for an empty archive).
pub fn central_directory_and_end(entries: &[EntryRecord], comment: &[u8]) -> Result<Vec<u8>, ZipFormatError> {
    if comment.len() > MAX_COMMENT_LEN {
        return Err(ZipFormatError::CommentTooLong { len: comment.len() });
    }
    let cd_offset = match entries.last() {
        Some(last) => last
            .local_header_offset
            .checked_add(local_header_len(&last.name, last.size))
            .and_then(|v| v.checked_add(last.size))
            .ok_or(ZipFormatError::TooLarge)?,
        None => 0,
    };
    let mut out = Vec::new();
    for e in entries {
        check_name(&e.name)?;
        let shape = central_shape(e.size, e.local_header_offset);
        let size32 = if e.size > ZIP64_LIMIT {
            u32::MAX
        } else {
            e.size as u32
        };
        let offset32 = if e.local_header_offset > ZIP64_LIMIT {
            u32::MAX
        } else {
            e.local_header_offset as u32
        };
        let extra_len = if shape.extra.is_empty() {
            0
        } else {
            4 + 8 * shape.extra.len() as u16
        };
        put_u32(&mut out, CENTRAL_DIR_SIG);
        out.push(shape.version as u8); // create version
        out.push(CREATE_SYSTEM_UNIX);
        put_u16(&mut out, shape.version); // extract version
        put_u16(&mut out, name_flags(&e.name));
        put_u16(&mut out, 0); // STORED
        put_u16(&mut out, DOS_TIME_MIDNIGHT);
        put_u16(&mut out, DOS_DATE_1980_01_01);
        put_u32(&mut out, e.crc32);
        put_u32(&mut out, size32); // compressed
        put_u32(&mut out, size32); // uncompressed
        put_u16(&mut out, e.name.len() as u16);
        put_u16(&mut out, extra_len);
        put_u16(&mut out, 0); // comment length
        put_u16(&mut out, 0); // disk number start
        put_u16(&mut out, 0); // internal attributes
        put_u32(&mut out, EXTERNAL_ATTR);
        put_u32(&mut out, offset32);
        out.extend_from_slice(e.name.as_bytes());
        if !shape.extra.is_empty() {
            put_u16(&mut out, 0x0001);
            put_u16(&mut out, 8 * shape.extra.len() as u16);
            for v in &shape.extra {
                put_u64(&mut out, *v);
            }
        }
    }
    let cd_size = out.len() as u64;
    let count = entries.len() as u64;
    let zip64_end_offset = cd_offset.checked_add(cd_size).ok_or(ZipFormatError::TooLarge)?;
    let (mut count16, mut cd_size32, mut cd_offset32) = (count, cd_size, cd_offset);
    if end_needs_zip64(count, cd_offset, cd_size) {
        put_u32(&mut out, ZIP64_END_SIG);
        put_u64(&mut out, ZIP64_END_LEN - 12); // size of the rest of the record: 44
        put_u16(&mut out, ZIP64_VERSION); // version made by
        put_u16(&mut out, ZIP64_VERSION); // version needed
        put_u32(&mut out, 0); // this disk
        put_u32(&mut out, 0); // disk with the central directory
        put_u64(&mut out, count); // entries on this disk
        put_u64(&mut out, count); // entries total
        put_u64(&mut out, cd_size);
        put_u64(&mut out, cd_offset);
        put_u32(&mut out, ZIP64_LOCATOR_SIG);
        put_u32(&mut out, 0); // disk with the zip64 end record
        put_u64(&mut out, zip64_end_offset);
        put_u32(&mut out, 1); // total disks
        count16 = count16.min(0xFFFF);
        cd_size32 = cd_size32.min(0xFFFF_FFFF);
        cd_offset32 = cd_offset32.min(0xFFFF_FFFF);
    }
    put_u32(&mut out, END_SIG);
    put_u16(&mut out, 0); // this disk
    put_u16(&mut out, 0); // disk with the central directory
                          // The three values were clamped above whenever they could exceed their fields.
    put_u16(&mut out, count16 as u16);
    put_u16(&mut out, count16 as u16);
    put_u32(&mut out, cd_size32 as u32);
    put_u32(&mut out, cd_offset32 as u32);
    put_u16(&mut out, comment.len() as u16);
    out.extend_from_slice(comment);
    Ok(out)
}

/// Where one entry sits in a planned archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedEntry {
    /// Entry name.
    pub name: String,
    /// Entry size in bytes.
    pub size: u64,
    /// Offset of the local header.
    pub local_header_offset: u64,
    /// Offset of the first data byte (after the local header).
    pub data_offset: u64,
}

impl PlannedEntry {
    /// The checkpointable record for this entry once its CRC-32 is known.
    pub fn record(&self, crc32: u32) -> EntryRecord {
        EntryRecord {
            name: self.name.clone(),
            crc32,
            size: self.size,
            local_header_offset: self.local_header_offset,
        }
    }

    /// Offset one past the entry's last data byte. [`ZipPlan`] checks that this fits a u64 for
    /// every entry it plans; a hand-built (or deserialised) entry saturates instead of wrapping.
    pub fn end_offset(&self) -> u64 {
        self.data_offset.saturating_add(self.size)
    }
}

/// Which part of the archive a byte offset falls in (see [`ZipPlan::locate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZipPosition {
    /// Inside entry `index`'s local header, `within` bytes into it.
    LocalHeader {
        /// Entry index.
        index: usize,
        /// Bytes into the local header.
        within: u64,
    },
    /// Inside entry `index`'s data, `within` bytes into it.
    Data {
        /// Entry index.
        index: usize,
        /// Bytes into the entry data.
        within: u64,
    },
    /// Inside the tail (central directory + end records), `within` bytes into it.
    Tail {
        /// Bytes into the tail.
        within: u64,
    },
    /// At or past the end of the archive.
    End,
}

/// Complete layout of an archive computed from entry names and sizes alone (CRCs do not change
/// any length), so the total length — needed up front for the upload — is known before streaming.
/// Cheap to recompute from the sizes, so it is not itself checkpointed (its invariants hold by
/// construction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipPlan {
    entries: Vec<PlannedEntry>,
    central_directory_offset: u64,
    tail_len: u64,
    comment_len: usize,
}

impl ZipPlan {
    /// Plan an archive of entries named `0.jpg`, `1.jpg`, … with the given sizes.
    pub fn from_sizes(sizes: &[u64], comment_len: usize) -> Result<Self, ZipFormatError> {
        let named = sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| (entry_name(i), s))
            .collect::<Vec<_>>();
        Self::new(named, comment_len)
    }

    /// Plan an archive of `(name, size)` entries in order, with a comment of `comment_len` bytes.
    pub fn new(entries: Vec<(String, u64)>, comment_len: usize) -> Result<Self, ZipFormatError> {
        if comment_len > MAX_COMMENT_LEN {
            return Err(ZipFormatError::CommentTooLong { len: comment_len });
        }
        let mut planned = Vec::with_capacity(entries.len());
        let mut offset = 0u64;
        let mut cd_len = 0u64;
        for (name, size) in entries {
            check_name(&name)?;
            let data_offset = offset
                .checked_add(local_header_len(&name, size))
                .ok_or(ZipFormatError::TooLarge)?;
            let end = data_offset.checked_add(size).ok_or(ZipFormatError::TooLarge)?;
            cd_len = cd_len
                .checked_add(central_entry_len(&name, size, offset))
                .ok_or(ZipFormatError::TooLarge)?;
            planned.push(PlannedEntry {
                name,
                size,
                local_header_offset: offset,
                data_offset,
            });
            offset = end;
        }
        let tail_len = cd_len
            .checked_add(end_records_len(planned.len() as u64, offset, cd_len, comment_len))
            .ok_or(ZipFormatError::TooLarge)?;
        offset.checked_add(tail_len).ok_or(ZipFormatError::TooLarge)?;
        Ok(Self {
            entries: planned,
            central_directory_offset: offset,
            tail_len,
            comment_len,
        })
    }

    /// The planned entries, in archive order.
    pub fn entries(&self) -> &[PlannedEntry] {
        &self.entries
    }

    /// Offset where the central directory (the tail) starts.
    pub fn central_directory_offset(&self) -> u64 {
        self.central_directory_offset
    }

    /// Length of the tail: central directory, ZIP64 records if any, end record and comment.
    pub fn tail_len(&self) -> u64 {
        self.tail_len
    }

    /// Comment length this plan was made for.
    pub fn comment_len(&self) -> usize {
        self.comment_len
    }

    /// Total archive length in bytes.
    pub fn total_len(&self) -> u64 {
        self.central_directory_offset + self.tail_len
    }

    /// Which part of the archive byte `offset` belongs to — where a resumed upload restarts.
    pub fn locate(&self, offset: u64) -> ZipPosition {
        if offset >= self.total_len() {
            return ZipPosition::End;
        }
        if offset >= self.central_directory_offset {
            return ZipPosition::Tail {
                within: offset - self.central_directory_offset,
            };
        }
        // Entries are contiguous and sorted by offset: find the last one starting at or before.
        let index = self
            .entries
            .partition_point(|e| e.local_header_offset <= offset)
            .saturating_sub(1);
        match self.entries.get(index) {
            Some(e) if offset < e.data_offset => ZipPosition::LocalHeader {
                index,
                within: offset - e.local_header_offset,
            },
            Some(e) => ZipPosition::Data {
                index,
                within: offset - e.data_offset,
            },
            // Unreachable: offset < central_directory_offset implies at least one entry.
            None => ZipPosition::Tail { within: 0 },
        }
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_header_zip64_threshold_matches_cpython_float_rule() {
        // 2045222520 * 1.05 = 2147483646.0 <= ZIP64_LIMIT; one more byte crosses it.
        assert!(!local_header_is_zip64(2_045_222_520));
        assert!(local_header_is_zip64(2_045_222_521));
    }

    #[test]
    fn archive_comment_is_compact_json() {
        assert_eq!(
            archive_comment("0123456789abcdef0123456789abcdef"),
            br#"{"sequence_md5sum":"0123456789abcdef0123456789abcdef"}"#.to_vec()
        );
    }
}
