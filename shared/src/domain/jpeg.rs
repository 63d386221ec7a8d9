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
/// none — through the first marker that is neither APPn nor COM. When it is too short,
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
    /// No Exif APP1 before the first non-APPn/COM marker; a new one goes at `insert_at`.
    NoExif { insert_at: usize },
}

fn truncated(needed: usize, head: &[u8]) -> JpegError {
    JpegError::Truncated {
        needed,
        available: head.len(),
    }
}

fn scan(head: &[u8]) -> Result<Scan, JpegError> {
    match head {
        [0xFF, 0xD8, ..] => {}
        [0xFF] | [] => return Err(truncated(2, head)),
        _ => return Err(JpegError::NotJpeg),
    }
    let mut pos = 2usize;
    let mut insert_at = 2usize;
    let mut leading_app0 = true;
    loop {
        match head.get(pos) {
            None => return Err(truncated(pos + 2, head)),
            Some(0xFF) => {}
            Some(_) => {
                return Err(JpegError::BadMarker {
                    offset: pos,
                    reason: "expected a marker (FF xx)",
                })
            }
        }
        // Any number of FF fill bytes may precede the marker code.
        let mut m = pos + 1;
        while head.get(m) == Some(&0xFF) {
            m += 1;
        }
        let marker = *head.get(m).ok_or_else(|| truncated(m + 1, head))?;
        let marker_start = m - 1;
        match marker {
            0xE0..=0xEF | 0xFE => {}
            0x00 | 0xD8 => {
                return Err(JpegError::BadMarker {
                    offset: marker_start,
                    reason: "invalid marker before the image data",
                })
            }
            // First marker that is neither APPn nor COM: no Exif before the image data.
            _ => return Ok(Scan::NoExif { insert_at }),
        }
        let len_bytes = head.get(m + 1..m + 3).ok_or_else(|| truncated(m + 3, head))?;
        let seg_len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
        if seg_len < 2 {
            return Err(JpegError::BadMarker {
                offset: marker_start,
                reason: "segment length below 2",
            });
        }
        let payload_start = m + 3;
        let seg_end = m + 1 + seg_len;
        if marker == 0xE1 {
            let probe_end = (payload_start + EXIF_HEADER.len()).min(seg_end);
            let probe = head
                .get(payload_start..probe_end)
                .ok_or_else(|| truncated(probe_end, head))?;
            if probe == EXIF_HEADER {
                if seg_end > head.len() {
                    return Err(truncated(seg_end, head));
                }
                return Ok(Scan::Exif {
                    segment: marker_start..seg_end,
                    tiff: payload_start + EXIF_HEADER.len()..seg_end,
                });
            }
        }
        if marker == 0xE0 && leading_app0 {
            insert_at = seg_end;
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
