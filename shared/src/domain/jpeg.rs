//! Injecting the MAP* description JSON into a JPEG's EXIF ImageDescription (0th IFD, tag 0x010E)
//! without the whole file: only the head of the file up to the end of its Exif APP1 segment.
//!
//! mapillary_tools (`exif_write.py` `ExifEdit`) loads the EXIF with piexif, replaces the 0th-IFD
//! ImageDescription and re-serialises the whole block. Re-serialising would move every value and
//! break offsets we do not understand (MakerNotes with absolute offsets, unknown tags), so this
//! module edits the TIFF block in place instead:
//!
//! 1. the new ImageDescription value (ASCII, NUL-terminated) and a copy of IFD0 — its entries plus
//!    the new 0x010E entry, sorted by tag, with the original next-IFD pointer — are appended at the
//!    END of the TIFF block;
//! 2. the TIFF header's IFD0 offset is pointed at the copy.
//!
//! Nothing else moves, so every other offset (Exif/GPS/Interop sub-IFDs, IFD1 and its thumbnail,
//! MakerNotes) stays valid; the old IFD0 and old description stay behind as unreferenced bytes.
//! Byte order (`II`/`MM`) is preserved. The edit is hand-rolled because no maintained crate
//! rewrites one tag of an existing EXIF block without re-laying it out.

use std::ops::Range;

/// Tag number of ImageDescription in the 0th IFD.
pub const IMAGE_DESCRIPTION_TAG: u16 = 0x010E;
/// Largest APP1 segment (marker excluded): the 16-bit length field counts itself.
pub const MAX_SEGMENT_LEN: usize = 0xFFFF;

const EXIF_HEADER: &[u8; 6] = b"Exif\0\0";
const TIFF_ASCII: u16 = 2;
const IFD_ENTRY_LEN: usize = 12;

/// Why a JPEG header cannot be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JpegError {
    /// The data does not start with the JPEG SOI marker (FF D8).
    #[error("not a JPEG: no SOI marker at the start")]
    NotJpeg,
    /// `head` ends before the marker structure could be followed far enough. Supply at least
    /// `needed` bytes of the file (if the file is shorter than that, it is truncated/corrupt).
    #[error("JPEG header truncated: at least {needed} bytes needed, {available} given")]
    Truncated {
        /// Minimum length of `head` to make progress.
        needed: usize,
        /// Length of the `head` that was given.
        available: usize,
    },
    /// The marker/segment structure before the image data is malformed.
    #[error("malformed JPEG segment structure at byte {offset}: {reason}")]
    BadMarker {
        /// Byte offset of the problem in the file.
        offset: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The Exif APP1 segment holds a TIFF block that cannot be edited safely.
    #[error("corrupt EXIF: {0}")]
    CorruptExif(&'static str),
    /// The rewritten Exif APP1 segment would exceed the 65535-byte JPEG segment limit.
    #[error("EXIF APP1 segment would be {size} bytes with the description; the JPEG limit is 65535")]
    ExifTooLarge {
        /// Length the rewritten segment would have (length field included).
        size: usize,
    },
    /// The description cannot be stored in an EXIF ASCII field.
    #[error("invalid ImageDescription: {0}")]
    InvalidDescription(&'static str),
}

/// New bytes for the start of a JPEG: they replace `head[..consumed]`; the rest of the original
/// file follows unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrittenHeader {
    /// Replacement for the first `consumed` bytes of the original file.
    pub header: Vec<u8>,
    /// How many original bytes `header` replaces.
    pub consumed: usize,
}

impl RewrittenHeader {
    /// Size of the rewritten file given the original's size (`None` if `original_len` is smaller
    /// than `consumed`, i.e. it is not the file this header was computed from).
    pub fn transformed_len(&self, original_len: u64) -> Option<u64> {
        original_len
            .checked_sub(self.consumed as u64)?
            .checked_add(self.header.len() as u64)
    }
}

/// Put `description` into the EXIF ImageDescription of the JPEG whose first bytes are `head`.
///
/// `head` must hold the file at least through the end of its Exif APP1 segment, or — when there is
/// none — through its SOS (or EOI) marker: the Exif APP1 rewritten is the one the EXIF reader reads
/// ([`walk_markers`]), wherever it sits before the image data. When `head` is too short,
/// [`JpegError::Truncated`] says how many bytes are needed.
///
/// Every other EXIF tag, the byte order, all other segments and the image data are preserved.
/// A JPEG without EXIF gets a fresh APP1 (after any leading APP0 segments) holding a minimal TIFF
/// block with only ImageDescription; callers normally reject such images earlier (no GPS/time),
/// so this path exists for completeness rather than for uploads.
///
/// `description` must be ASCII without NUL bytes (mapillary_tools writes ASCII-only JSON).
pub fn rewrite_header(head: &[u8], description: &str) -> Result<RewrittenHeader, JpegError> {
    if description.bytes().any(|b| b == 0) {
        return Err(JpegError::InvalidDescription("contains a NUL byte"));
    }
    if !description.is_ascii() {
        return Err(JpegError::InvalidDescription(
            "contains non-ASCII characters (escape them as \\uXXXX)",
        ));
    }
    match scan(head)? {
        Scan::Exif { segment, tiff } => {
            let tiff_bytes = head.get(tiff).ok_or(JpegError::BadMarker {
                offset: segment.start,
                reason: "Exif segment out of range",
            })?;
            let new_tiff = rewrite_tiff(tiff_bytes, description.as_bytes())?;
            let mut header = head
                .get(..segment.start)
                .ok_or(JpegError::BadMarker {
                    offset: segment.start,
                    reason: "Exif segment out of range",
                })?
                .to_vec();
            push_app1(&mut header, &new_tiff)?;
            Ok(RewrittenHeader {
                header,
                consumed: segment.end,
            })
        }
        Scan::NoExif { insert_at } => {
            let tiff = minimal_tiff(description.as_bytes())?;
            let mut header = head
                .get(..insert_at)
                .ok_or(JpegError::BadMarker {
                    offset: insert_at,
                    reason: "insertion point out of range",
                })?
                .to_vec();
            push_app1(&mut header, &tiff)?;
            Ok(RewrittenHeader {
                header,
                consumed: insert_at,
            })
        }
    }
}

/// Result of walking the segments before the image data.
enum Scan {
    /// `segment`: the whole Exif APP1 (from its FF marker byte); `tiff`: the TIFF block in it.
    Exif {
        segment: Range<usize>,
        tiff: Range<usize>,
    },
    /// No Exif APP1 before SOS/EOI; a new one goes at `insert_at`.
    NoExif { insert_at: usize },
}

fn truncated(needed: usize, head: &[u8]) -> JpegError {
    JpegError::Truncated {
        needed,
        available: head.len(),
    }
}

/// The header rewrite's walk ([`Fetch::Minimal`]) with its own error wording.
fn scan(head: &[u8]) -> Result<Scan, JpegError> {
    match walk_markers(head, Fetch::Minimal) {
        Ok(MarkerWalk::Exif(ExifSegment { segment, tiff })) => Ok(Scan::Exif { segment, tiff }),
        Ok(MarkerWalk::NoExif(stop)) => Ok(Scan::NoExif {
            insert_at: stop.after_leading_app0,
        }),
        Ok(MarkerWalk::NeedMore { at_least }) => Err(truncated(at_least, head)),
        Err(WalkError::NoSoi) => Err(JpegError::NotJpeg),
        Err(WalkError::NotAMarker { at, .. }) => Err(JpegError::BadMarker {
            offset: at,
            reason: "expected a marker (FF xx)",
        }),
        Err(WalkError::InvalidMarker { marker_at, .. }) => Err(JpegError::BadMarker {
            offset: marker_at,
            reason: "invalid marker before the image data",
        }),
        Err(WalkError::BadLength { marker_at, .. }) => Err(JpegError::BadMarker {
            offset: marker_at,
            reason: "segment length below 2",
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// The marker walker shared by the header rewrite and the EXIF reader

/// How much more of the file a walk asks for when `head` ends too early: the one rule in which
/// the two callers of [`walk_markers`] differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// The least that lets the walk go on: the next marker byte, then the length field, then
    /// the 6 bytes that say whether an APP1 is `Exif\0\0`; only an Exif APP1 is needed whole.
    /// The header rewrite's rule ([`rewrite_header`]: its callers grow a contiguous buffer they
    /// already hold, and report the exact end of the Exif APP1 as the bytes consumed).
    Minimal,
    /// Whole units: a marker together with its length field, and every APP1 segment in full
    /// before looking into it. The EXIF reader's rule ([`crate::domain::exif::header_extent`]:
    /// its callers fetch by ranged reads, where each extra round trip costs more than a few bytes).
    WholeSegments,
}

/// The first APP1 segment whose payload starts with `Exif\0\0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExifSegment {
    /// The whole segment, from the `FF` directly before the `E1` to its last byte.
    pub segment: Range<usize>,
    /// The TIFF block: the payload after `Exif\0\0`.
    pub tiff: Range<usize>,
}

/// Where a walk stopped (at SOS or EOI) without finding an Exif APP1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkStop {
    /// The marker code that ended the walk: `0xDA` (SOS) or `0xD9` (EOI).
    pub marker: u8,
    /// Offset of the marker's first `FF` (fill bytes included): where the segments before it end.
    pub at: usize,
    /// Offset just past the APP0 segments that directly follow SOI (2 when there are none): where
    /// a new APP1 belongs.
    pub after_leading_app0: usize,
}

/// The outcome of [`walk_markers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkerWalk {
    /// An Exif APP1 came before the stop marker; `head` holds it whole.
    Exif(ExifSegment),
    /// The stop marker came first.
    NoExif(WalkStop),
    /// `head` ends before the walk could decide: supply at least `at_least` bytes from the start
    /// of the file (always more than `head` has). Each step asks for at most one more segment
    /// (≤ 64 KiB); a file shorter than `at_least` is truncated.
    NeedMore {
        /// Minimum length of the next `head`.
        at_least: usize,
    },
}

/// A broken marker structure (callers word it for their own error type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The data does not start with SOI (`FF D8`).
    NoSoi,
    /// A segment ends where no `FF` follows.
    NotAMarker {
        /// Offset where a marker was expected.
        at: usize,
        /// The byte found there.
        found: u8,
    },
    /// `FF00` (a stuffed byte, only valid inside scan data) or a second SOI before the image data.
    InvalidMarker {
        /// Offset of the marker's first `FF` (fill bytes included).
        at: usize,
        /// Offset of the `FF` directly before the code.
        marker_at: usize,
        /// `0x00` or `0xD8`.
        code: u8,
    },
    /// A segment length field below 2 (it counts its own two bytes).
    BadLength {
        /// Offset of the marker's first `FF` (fill bytes included).
        at: usize,
        /// Offset of the `FF` directly before the code.
        marker_at: usize,
        /// The marker code.
        code: u8,
        /// The length field's value.
        len: u16,
    },
}

const SOI_CODE: u8 = 0xD8;
const EOI_CODE: u8 = 0xD9;
const SOS_CODE: u8 = 0xDA;
const APP0_CODE: u8 = 0xE0;
const APP1_CODE: u8 = 0xE1;

/// RSTn and TEM carry no length field.
fn is_standalone(code: u8) -> bool {
    matches!(code, 0xD0..=0xD7 | 0x01)
}

/// Walks the marker segments of `head` (a prefix of a JPEG file) from SOI to the first APP1
/// segment whose payload starts with `Exif\0\0`, or else to start-of-scan (`FFDA`) or
/// end-of-image (`FFD9`). The single JPEG marker walker of the domain: the header rewrite
/// ([`rewrite_header`]) and the EXIF reader ([`crate::domain::exif::header_extent`]) differ only
/// in how much they ask for at a time ([`Fetch`]) and in what they take from the stop (the end of
/// the segments, or where a new APP1 belongs).
///
/// Stop rule, shared on purpose: table and frame segments (DQT, SOF, DHT, DRI, …) are stepped
/// over by their length and standalone markers (RSTn, TEM) by their two bytes, so an Exif APP1
/// anywhere before the image data is found, as exifread (mapillary_tools' reader) and piexif (its
/// writer) find it. The rewrite once stopped at the first marker that was neither APPn nor COM;
/// for an Exif APP1 behind a DQT it then inserted a second, description-only Exif APP1 in front
/// of it, and every reader lost the image's GPS position and time.
///
/// Also common: any number of `FF` fill bytes may precede a marker code; `FF00`, a second SOI and
/// a length field below 2 are errors; APP1 segments shorter than the identifier are not Exif.
/// Every offset is bounds-checked: any bytes give a result or an error, never a panic.
pub fn walk_markers(head: &[u8], fetch: Fetch) -> Result<MarkerWalk, WalkError> {
    match head {
        [0xFF, SOI_CODE, ..] => {}
        [] | [0xFF] => return Ok(MarkerWalk::NeedMore { at_least: 2 }),
        _ => return Err(WalkError::NoSoi),
    }
    let need = |at_least: usize| Ok(MarkerWalk::NeedMore { at_least });
    // For a marker whose code byte sits at `m`: the code alone, or the code and its length field.
    let marker_need = |m: usize| match fetch {
        Fetch::Minimal => m + 1,
        Fetch::WholeSegments => m + 3,
    };
    let mut pos = 2usize;
    let mut after_leading_app0 = 2usize;
    let mut leading_app0 = true;
    loop {
        match head.get(pos) {
            None => return need(marker_need(pos + 1)),
            Some(0xFF) => {}
            Some(&found) => return Err(WalkError::NotAMarker { at: pos, found }),
        }
        let mut m = pos + 1;
        while head.get(m) == Some(&0xFF) {
            m += 1;
        }
        let Some(&code) = head.get(m) else {
            return need(marker_need(m));
        };
        let marker_at = m - 1;
        if code == 0x00 || code == SOI_CODE {
            return Err(WalkError::InvalidMarker {
                at: pos,
                marker_at,
                code,
            });
        }
        if code == SOS_CODE || code == EOI_CODE {
            return Ok(MarkerWalk::NoExif(WalkStop {
                marker: code,
                at: pos,
                after_leading_app0,
            }));
        }
        if is_standalone(code) {
            pos = m + 1;
            leading_app0 = false;
            continue;
        }
        let Some(&[hi, lo]) = head.get(m + 1..m + 3).and_then(|b| <&[u8; 2]>::try_from(b).ok()) else {
            return need(m + 3);
        };
        let len = u16::from_be_bytes([hi, lo]);
        if len < 2 {
            return Err(WalkError::BadLength {
                at: pos,
                marker_at,
                code,
                len,
            });
        }
        let payload = m + 3;
        let seg_end = m + 1 + usize::from(len);
        if code == APP1_CODE {
            let probe_end = match fetch {
                Fetch::Minimal => (payload + EXIF_HEADER.len()).min(seg_end),
                Fetch::WholeSegments => seg_end,
            };
            let Some(probe) = head.get(payload..probe_end) else {
                return need(probe_end);
            };
            if probe.starts_with(EXIF_HEADER) {
                if seg_end > head.len() {
                    return need(seg_end);
                }
                return Ok(MarkerWalk::Exif(ExifSegment {
                    segment: marker_at..seg_end,
                    tiff: payload + EXIF_HEADER.len()..seg_end,
                }));
            }
        }
        if code == APP0_CODE && leading_app0 {
            after_leading_app0 = seg_end;
        } else {
            leading_app0 = false;
        }
        pos = seg_end;
    }
}

/// Append an APP1 Exif segment holding `tiff`.
fn push_app1(out: &mut Vec<u8>, tiff: &[u8]) -> Result<(), JpegError> {
    let seg_len = 2 + EXIF_HEADER.len() + tiff.len();
    let len16 = u16::try_from(seg_len).map_err(|_| JpegError::ExifTooLarge { size: seg_len })?;
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&len16.to_be_bytes());
    out.extend_from_slice(EXIF_HEADER);
    out.extend_from_slice(tiff);
    Ok(())
}

#[derive(Clone, Copy)]
enum Order {
    Little,
    Big,
}

impl Order {
    fn u16(self, b: [u8; 2]) -> u16 {
        match self {
            Order::Little => u16::from_le_bytes(b),
            Order::Big => u16::from_be_bytes(b),
        }
    }
    fn u32(self, b: [u8; 4]) -> u32 {
        match self {
            Order::Little => u32::from_le_bytes(b),
            Order::Big => u32::from_be_bytes(b),
        }
    }
    fn put_u16(self, out: &mut Vec<u8>, v: u16) {
        match self {
            Order::Little => out.extend_from_slice(&v.to_le_bytes()),
            Order::Big => out.extend_from_slice(&v.to_be_bytes()),
        }
    }
    fn put_u32(self, out: &mut Vec<u8>, v: u32) {
        match self {
            Order::Little => out.extend_from_slice(&v.to_le_bytes()),
            Order::Big => out.extend_from_slice(&v.to_be_bytes()),
        }
    }
    fn u32_bytes(self, v: u32) -> [u8; 4] {
        match self {
            Order::Little => v.to_le_bytes(),
            Order::Big => v.to_be_bytes(),
        }
    }
}

fn read2(b: &[u8], at: usize) -> Option<[u8; 2]> {
    b.get(at..at.checked_add(2)?)?.try_into().ok()
}

fn read4(b: &[u8], at: usize) -> Option<[u8; 4]> {
    b.get(at..at.checked_add(4)?)?.try_into().ok()
}

/// The 12-byte IFD entry for ImageDescription: value inline when it fits 4 bytes (NUL included),
/// otherwise the offset `value_offset` where the caller appends it.
fn description_entry(order: Order, desc: &[u8], value_offset: usize) -> Result<[u8; 12], JpegError> {
    let count = desc.len() + 1; // NUL terminator
    let count32 = u32::try_from(count).map_err(|_| JpegError::ExifTooLarge { size: count })?;
    let value: [u8; 4] = if count <= 4 {
        let mut v = [0u8; 4];
        v[..desc.len()].copy_from_slice(desc);
        v
    } else {
        let off = u32::try_from(value_offset).map_err(|_| JpegError::ExifTooLarge { size: value_offset })?;
        order.u32_bytes(off)
    };
    let mut e = Vec::with_capacity(IFD_ENTRY_LEN);
    order.put_u16(&mut e, IMAGE_DESCRIPTION_TAG);
    order.put_u16(&mut e, TIFF_ASCII);
    order.put_u32(&mut e, count32);
    e.extend_from_slice(&value);
    let mut out = [0u8; IFD_ENTRY_LEN];
    out.copy_from_slice(&e);
    Ok(out)
}

fn pad_even(out: &mut Vec<u8>) {
    if out.len() % 2 == 1 {
        out.push(0);
    }
}

/// The TIFF block with IFD0 relocated to its end and ImageDescription set (see module docs).
fn rewrite_tiff(tiff: &[u8], desc: &[u8]) -> Result<Vec<u8>, JpegError> {
    let order = match tiff.get(..2) {
        Some(b"II") => Order::Little,
        Some(b"MM") => Order::Big,
        _ => return Err(JpegError::CorruptExif("TIFF header has no II/MM byte order")),
    };
    let magic = read2(tiff, 2).ok_or(JpegError::CorruptExif("TIFF header truncated"))?;
    if order.u16(magic) != 42 {
        return Err(JpegError::CorruptExif("TIFF magic number is not 42"));
    }
    let ifd0 = read4(tiff, 4).ok_or(JpegError::CorruptExif("TIFF header truncated"))?;
    let ifd0 =
        usize::try_from(order.u32(ifd0)).map_err(|_| JpegError::CorruptExif("IFD0 offset out of range"))?;
    if ifd0 < 8 {
        return Err(JpegError::CorruptExif("IFD0 offset points into the TIFF header"));
    }
    let count = read2(tiff, ifd0).ok_or(JpegError::CorruptExif("IFD0 offset out of range"))?;
    let count = usize::from(order.u16(count));
    let entries_start = ifd0 + 2;
    let entries_end = entries_start + count * IFD_ENTRY_LEN;
    let entries = tiff
        .get(entries_start..entries_end)
        .ok_or(JpegError::CorruptExif("IFD0 entries run past the EXIF block"))?;
    let next_ifd = read4(tiff, entries_end).ok_or(JpegError::CorruptExif(
        "IFD0 next-IFD pointer runs past the EXIF block",
    ))?;
    check_layout(tiff, order, ifd0)?;

    let mut kept: Vec<[u8; IFD_ENTRY_LEN]> = entries
        .chunks_exact(IFD_ENTRY_LEN)
        .filter_map(|c| <[u8; IFD_ENTRY_LEN]>::try_from(c).ok())
        .filter(|e| order.u16([e[0], e[1]]) != IMAGE_DESCRIPTION_TAG)
        .collect();

    let mut out = Vec::with_capacity(tiff.len() + desc.len() + (count + 1) * IFD_ENTRY_LEN + 16);
    out.extend_from_slice(tiff);
    pad_even(&mut out);
    let value_offset = out.len();
    if desc.len() + 1 > 4 {
        out.extend_from_slice(desc);
        out.push(0);
        pad_even(&mut out);
    }
    kept.push(description_entry(order, desc, value_offset)?);
    // Stable: entries with equal tags (malformed, but possible) keep their relative order.
    kept.sort_by_key(|e| order.u16([e[0], e[1]]));
    let new_count = u16::try_from(kept.len())
        .map_err(|_| JpegError::CorruptExif("IFD0 has too many entries to add one"))?;

    let new_ifd0 = out.len();
    let new_ifd0_32 = u32::try_from(new_ifd0).map_err(|_| JpegError::ExifTooLarge { size: new_ifd0 })?;
    order.put_u16(&mut out, new_count);
    for e in &kept {
        out.extend_from_slice(e);
    }
    out.extend_from_slice(&next_ifd);
    out[4..8].copy_from_slice(&order.u32_bytes(new_ifd0_32));
    Ok(out)
}

/// Tags whose LONG value is the offset of a sub-IFD, and the IFD they are read from.
const EXIF_IFD_POINTER: u16 = 0x8769;
const GPS_IFD_POINTER: u16 = 0x8825;
const INTEROP_IFD_POINTER: u16 = 0xA005;
/// More IFDs than this in one EXIF block is not a camera's (IFD0, IFD1, Exif, GPS, Interop).
const MAX_IFDS: usize = 32;

/// Byte size of one value of a TIFF field type (BYTE … DOUBLE, and IFD); `None` for types that
/// readers skip without reading a value.
fn type_size(field_type: u16) -> Option<u64> {
    match field_type {
        1 | 2 | 6 | 7 => Some(1),
        3 | 8 => Some(2),
        4 | 9 | 11 | 13 => Some(4),
        5 | 10 | 12 => Some(8),
        _ => None,
    }
}

/// Which IFD a walk is in: the main chain (IFD0, IFD1, …) holds the Exif and GPS pointers, the
/// Exif IFD the Interop pointer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum IfdKind {
    Chain,
    Exif,
    Other,
}

/// The TIFF header (byte order, 42, IFD0 offset): the rewrite changes its IFD0 offset.
const TIFF_HEADER_LEN: usize = 8;

/// Every IFD the readers reach (the IFD0/IFD1 chain, the Exif, GPS and Interop IFDs) and every
/// field value they point to must lie inside `tiff`, behind its 8-byte header.
///
/// Why: the rewrite appends the description and the new IFD0 at the end of the block. A table or
/// value that ran past the old end was cut off for every reader (kamadak-exif and exifread keep the
/// rest); after the append it would read the appended bytes instead — as bogus entries that
/// replace real ones (seen: GPSLongitudeRef lost, the longitude's sign flipped) — so the uploaded
/// file would no longer say what the original said. The same holds for a table or value that
/// overlaps the header, whose IFD0 offset the rewrite changes. Such a block is refused (the image is rejected
/// with this reason) rather than rewritten into different metadata. ImageDescription in IFD0 is
/// not checked: it is replaced. Thumbnail and strip byte ranges (IFD1) are not field values and
/// are not checked either: a cut-off thumbnail changes no capture metadata.
fn check_layout(tiff: &[u8], order: Order, ifd0: usize) -> Result<(), JpegError> {
    let len = tiff.len() as u64;
    let mut todo: Vec<(usize, IfdKind)> = vec![(ifd0, IfdKind::Chain)];
    let mut seen: Vec<usize> = Vec::new();
    while let Some((at, kind)) = todo.pop() {
        // A loop (an IFD pointing back to one already read): readers stop there too.
        if seen.contains(&at) {
            continue;
        }
        if seen.len() >= MAX_IFDS {
            return Err(JpegError::CorruptExif(
                "the EXIF block links more IFDs than any camera writes",
            ));
        }
        seen.push(at);
        if at < TIFF_HEADER_LEN {
            return Err(JpegError::CorruptExif("an IFD overlaps the TIFF header"));
        }
        let count = read2(tiff, at).ok_or(JpegError::CorruptExif(
            "an IFD offset points past the end of the EXIF block",
        ))?;
        let entries_start = at.saturating_add(2);
        let entries_end = entries_start.saturating_add(usize::from(order.u16(count)) * IFD_ENTRY_LEN);
        let entries = tiff
            .get(entries_start..entries_end)
            .ok_or(JpegError::CorruptExif(
                "an IFD's entries run past the end of the EXIF block",
            ))?;
        let next = read4(tiff, entries_end).ok_or(JpegError::CorruptExif(
            "an IFD's next-IFD pointer runs past the end of the EXIF block",
        ))?;
        for e in entries.chunks_exact(IFD_ENTRY_LEN) {
            let tag = order.u16([e[0], e[1]]);
            let field_type = order.u16([e[2], e[3]]);
            let count = u64::from(order.u32([e[4], e[5], e[6], e[7]]));
            let value = order.u32([e[8], e[9], e[10], e[11]]);
            if at == ifd0 && tag == IMAGE_DESCRIPTION_TAG {
                continue;
            }
            if let Some(size) = type_size(field_type) {
                // count < 2^32 and size ≤ 8: no overflow in u64.
                let bytes = count * size;
                if bytes > 4 && u64::from(value) + bytes > len {
                    return Err(JpegError::CorruptExif(
                        "a field value runs past the end of the EXIF block",
                    ));
                }
                if bytes > 4 && u64::from(value) < TIFF_HEADER_LEN as u64 {
                    return Err(JpegError::CorruptExif("a field value overlaps the TIFF header"));
                }
            }
            let is_pointer = matches!(field_type, 4 | 13) && count >= 1;
            let sub = match (kind, tag) {
                (IfdKind::Chain, EXIF_IFD_POINTER) => Some(IfdKind::Exif),
                (IfdKind::Chain, GPS_IFD_POINTER) | (IfdKind::Exif, INTEROP_IFD_POINTER) => {
                    Some(IfdKind::Other)
                }
                _ => None,
            };
            if let Some(sub) = sub {
                // The pointer tags are LONG (or IFD) offsets. Readers follow them whatever the type
                // says (a BYTE "200" is read as offset 200), so one typed otherwise would point at an
                // IFD this walk never checked — the fuzz finding: a GPS pointer typed BYTE to a GPS IFD
                // whose entry count ran into the appended bytes, which then replaced GPSLatitude.
                if !is_pointer {
                    return Err(JpegError::CorruptExif(
                        "an Exif, GPS or Interop IFD pointer is not a LONG offset",
                    ));
                }
                let to =
                    usize::try_from(value).map_err(|_| JpegError::CorruptExif("IFD offset out of range"))?;
                todo.push((to, sub));
            }
        }
        let next = order.u32(next);
        if kind == IfdKind::Chain && next != 0 {
            let to = usize::try_from(next).map_err(|_| JpegError::CorruptExif("IFD offset out of range"))?;
            todo.push((to, IfdKind::Chain));
        }
    }
    Ok(())
}

/// A little-endian TIFF block whose IFD0 holds only ImageDescription.
fn minimal_tiff(desc: &[u8]) -> Result<Vec<u8>, JpegError> {
    let order = Order::Little;
    let mut out = b"II*\0".to_vec();
    order.put_u32(&mut out, 8);
    order.put_u16(&mut out, 1);
    // header (8) + count (2) + one entry (12) + next-IFD pointer (4)
    let value_offset = 8 + 2 + IFD_ENTRY_LEN + 4;
    out.extend_from_slice(&description_entry(order, desc, value_offset)?);
    order.put_u32(&mut out, 0);
    if desc.len() + 1 > 4 {
        out.extend_from_slice(desc);
        out.push(0);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(marker: u8, payload: &[u8]) -> Vec<u8> {
        let mut s = vec![0xFF, marker];
        s.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        s.extend_from_slice(payload);
        s
    }

    #[test]
    fn no_exif_inserts_app1_after_leading_app0() {
        let mut jpeg = vec![0xFF, 0xD8];
        jpeg.extend(segment(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"));
        let app0_end = jpeg.len();
        jpeg.extend(segment(0xDB, &[0u8; 65]));
        // The walk goes on to the scan (an Exif APP1 may follow the tables).
        jpeg.extend([0xFF, 0xDA, 0x00, 0x02]);
        let r = rewrite_header(&jpeg, "hi").expect("rewrite");
        assert_eq!(r.consumed, app0_end);
        assert_eq!(&r.header[..app0_end], &jpeg[..app0_end]);
        assert_eq!(&r.header[app0_end..app0_end + 2], &[0xFF, 0xE1]);
        assert!(r
            .header
            .ends_with(b"Exif\0\0II*\0\x08\0\0\0\x01\0\x0e\x01\x02\0\x03\0\0\0hi\0\0\0\0\0\0"));
    }

    #[test]
    fn truncated_head_reports_needed_length() {
        let mut jpeg = vec![0xFF, 0xD8];
        jpeg.extend(segment(0xE1, &[b"Exif\0\0".as_slice(), &[0u8; 100]].concat()));
        let err = rewrite_header(&jpeg[..50], "x").expect_err("truncated");
        assert_eq!(
            err,
            JpegError::Truncated {
                needed: jpeg.len(),
                available: 50
            }
        );
    }
}
