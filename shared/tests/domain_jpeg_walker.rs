//! The one JPEG marker walker (`jpeg::walk_markers`) and its two callers: the EXIF reader
//! (`exif::header_extent`, [`WalkRules::EXIF_READ`]) and the header rewrite
//! (`jpeg::rewrite_header`, [`WalkRules::REWRITE`]). Each test pins one of the places where the
//! two used to walk with separate code and different rules: how much a short head asks for, where
//! fill bytes put the offsets, which offset an error names, and which segments count as Exif.

use relay_fixtures::{jpeg, ImageSpec};
use shared::domain::exif::{header_extent, read_metadata, ExifError, HeaderExtent};
use shared::domain::jpeg::{
    rewrite_header, walk_markers, ExifSegment, Fetch, JpegError, MarkerWalk, StopAt, WalkError, WalkRules,
    WalkStop,
};
use time::macros::datetime;

const JFIF: &[u8] = b"JFIF\0\x01\x02\0\0\x01\0\x01\0\0";

fn segment(marker: u8, payload: &[u8]) -> Vec<u8> {
    let mut s = vec![0xFF, marker];
    s.extend_from_slice(&u16::try_from(payload.len() + 2).expect("fits").to_be_bytes());
    s.extend_from_slice(payload);
    s
}

/// A fixture JPEG (SOI, Exif APP1, tables, scan, EOI) and the range of its Exif APP1.
fn fixture() -> (Vec<u8>, std::ops::Range<usize>) {
    let bytes = jpeg(&ImageSpec::new(
        50.8966,
        -0.5591,
        datetime!(2024-05-01 10:00:00.257 UTC),
    ));
    let len = usize::from(u16::from_be_bytes([bytes[4], bytes[5]]));
    (bytes, 2..4 + len)
}

#[test]
fn rules_are_the_documented_pairs() {
    assert_eq!(WalkRules::EXIF_READ.stop_at, StopAt::ScanOrEnd);
    assert_eq!(WalkRules::EXIF_READ.fetch, Fetch::WholeSegments);
    assert_eq!(WalkRules::REWRITE.fetch, Fetch::Minimal);
}

#[test]
fn both_callers_find_the_same_exif_segment_in_a_fixture() {
    let (bytes, app1) = fixture();
    let want = ExifSegment {
        segment: app1.clone(),
        tiff: app1.start + 10..app1.end,
    };
    for rules in [WalkRules::EXIF_READ, WalkRules::REWRITE] {
        assert_eq!(walk_markers(&bytes, rules), Ok(MarkerWalk::Exif(want.clone())));
    }
    assert_eq!(
        header_extent(&bytes),
        Ok(HeaderExtent::Complete {
            exif: Some(want.tiff.clone()),
            header_end: app1.end,
        })
    );
    assert_eq!(rewrite_header(&bytes, "x").expect("rewrite").consumed, app1.end);
}

#[test]
fn a_short_head_asks_for_a_whole_marker_header_or_for_the_next_byte() {
    // SOI + a complete APP0: the head ends exactly where the next marker starts (offset 20).
    let mut head = vec![0xFF, 0xD8];
    head.extend(segment(0xE0, JFIF));
    let end = head.len();
    // The EXIF reader asks for the marker and its length field at once; the rewrite for the
    // marker's two bytes.
    assert_eq!(
        header_extent(&head),
        Ok(HeaderExtent::NeedMore { at_least: end + 4 })
    );
    assert_eq!(
        rewrite_header(&head, "x"),
        Err(JpegError::Truncated {
            needed: end + 2,
            available: end,
        })
    );
    // Cut inside fill bytes (FF FF FF): the code byte is at `end + 3` at the earliest.
    head.extend([0xFF, 0xFF, 0xFF]);
    assert_eq!(
        header_extent(&head),
        Ok(HeaderExtent::NeedMore { at_least: end + 6 })
    );
    assert_eq!(
        rewrite_header(&head, "x"),
        Err(JpegError::Truncated {
            needed: end + 4,
            available: end + 3,
        })
    );
    // Marker code there but not its length: both ask for the length field.
    head.push(0xE2);
    assert_eq!(
        header_extent(&head),
        Ok(HeaderExtent::NeedMore { at_least: end + 6 })
    );
    assert_eq!(
        rewrite_header(&head, "x"),
        Err(JpegError::Truncated {
            needed: end + 6,
            available: end + 4,
        })
    );
    // SOI only, and a lone FF.
    for head in [&[0xFF, 0xD8][..], &[0xFF]] {
        let n = head.len();
        let reader_wants = if n == 1 { 2 } else { 6 };
        assert_eq!(
            header_extent(head),
            Ok(HeaderExtent::NeedMore {
                at_least: reader_wants
            })
        );
        let rewrite_wants = if n == 1 { 2 } else { 4 };
        assert_eq!(
            rewrite_header(head, "x"),
            Err(JpegError::Truncated {
                needed: rewrite_wants,
                available: n,
            })
        );
    }
}

#[test]
fn a_cut_non_exif_app1_is_fetched_whole_by_the_reader_and_probed_by_the_rewrite() {
    let xmp: Vec<u8> = [b"http://ns.adobe.com/xap/1.0/\0".as_slice(), &[b'x'; 1000]].concat();
    let mut file = vec![0xFF, 0xD8];
    file.extend(segment(0xE1, &xmp));
    let seg_end = file.len();
    let (fixture, app1) = fixture();
    file.extend_from_slice(&fixture[app1.start..]);
    let payload = 6;
    // Cut 10 bytes into the XMP payload: the reader wants the whole APP1 before it looks into it;
    // the rewrite has seen that it is not `Exif\0\0` and wants the next marker after it.
    let head = &file[..payload + 10];
    assert_eq!(
        header_extent(head),
        Ok(HeaderExtent::NeedMore { at_least: seg_end })
    );
    assert_eq!(
        rewrite_header(head, "x"),
        Err(JpegError::Truncated {
            needed: seg_end + 2,
            available: payload + 10,
        })
    );
    // Cut inside the 6 identifier bytes: the rewrite asks for exactly those.
    let head = &file[..payload + 3];
    assert_eq!(
        header_extent(head),
        Ok(HeaderExtent::NeedMore { at_least: seg_end })
    );
    assert_eq!(
        rewrite_header(head, "x"),
        Err(JpegError::Truncated {
            needed: payload + 6,
            available: payload + 3,
        })
    );
    // Whole: both skip the XMP APP1 and find the Exif one behind it.
    let exif_at = seg_end;
    let exif_end = exif_at + app1.len();
    assert_eq!(
        header_extent(&file),
        Ok(HeaderExtent::Complete {
            exif: Some(exif_at + 10..exif_end),
            header_end: exif_end,
        })
    );
    assert_eq!(rewrite_header(&file, "x").expect("rewrite").consumed, exif_end);
}

#[test]
fn an_app1_shorter_than_the_exif_identifier_is_not_exif() {
    let (fixture, app1) = fixture();
    let mut file = vec![0xFF, 0xD8];
    file.extend(segment(0xE1, b"Exif")); // 4 of the 6 identifier bytes
    file.extend(segment(0xE1, b"")); // empty payload
    let exif_at = file.len();
    file.extend_from_slice(&fixture[app1.start..]);
    let exif_end = exif_at + app1.len();
    assert_eq!(
        header_extent(&file),
        Ok(HeaderExtent::Complete {
            exif: Some(exif_at + 10..exif_end),
            header_end: exif_end,
        })
    );
    assert_eq!(rewrite_header(&file, "x").expect("rewrite").consumed, exif_end);
    assert!(read_metadata(&file).is_ok());
}

#[test]
fn fill_bytes_before_a_marker_shift_offsets_as_each_caller_reports_them() {
    // SOI, APP0, then SOS preceded by two fill bytes at offset `end`.
    let mut file = vec![0xFF, 0xD8];
    file.extend(segment(0xE0, JFIF));
    let end = file.len();
    file.extend([0xFF, 0xFF, 0xFF, 0xDA, 0x00, 0x02, 0xFF, 0xD9]);
    // The walk reports the first fill byte: the segments before the marker end there.
    assert_eq!(
        walk_markers(&file, WalkRules::EXIF_READ),
        Ok(MarkerWalk::NoExif(WalkStop {
            marker: 0xDA,
            at: end,
            after_leading_app0: end,
        }))
    );
    assert_eq!(
        header_extent(&file),
        Ok(HeaderExtent::Complete {
            exif: None,
            header_end: end,
        })
    );
    assert_eq!(read_metadata(&file), Err(ExifError::NoExif));
    // The rewrite puts a fresh APP1 after the leading APP0, before the fill bytes.
    let r = rewrite_header(&file, "x").expect("rewrite");
    assert_eq!(r.consumed, end);
    assert_eq!(&r.header[end..end + 2], &[0xFF, 0xE1]);
}

#[test]
fn broken_markers_name_the_offset_each_caller_always_named() {
    // SOI, two fill bytes, then the stuffed-byte code 00.
    let file = [0xFF, 0xD8, 0xFF, 0xFF, 0x00, 0x00];
    assert_eq!(
        walk_markers(&file, WalkRules::EXIF_READ),
        Err(WalkError::InvalidMarker {
            at: 2,
            marker_at: 3,
            code: 0x00,
        })
    );
    // The reader names the first FF, the rewrite the FF before the code.
    assert_eq!(
        header_extent(&file),
        Err(ExifError::MalformedJpeg(
            "stuffed byte 0xFF00 at byte 2 outside the image data".into()
        ))
    );
    assert!(matches!(
        rewrite_header(&file, "x"),
        Err(JpegError::BadMarker { offset: 3, .. })
    ));
    // A second SOI, a length below 2, a byte that is no marker.
    let second_soi = [0xFF, 0xD8, 0xFF, 0xD8];
    assert_eq!(
        header_extent(&second_soi),
        Err(ExifError::MalformedJpeg(
            "second start-of-image marker at byte 2".into()
        ))
    );
    assert!(matches!(
        rewrite_header(&second_soi, "x"),
        Err(JpegError::BadMarker { offset: 2, .. })
    ));
    let short_len = [0xFF, 0xD8, 0xFF, 0xFF, 0xE1, 0x00, 0x01];
    assert_eq!(
        walk_markers(&short_len, WalkRules::REWRITE),
        Err(WalkError::BadLength {
            at: 2,
            marker_at: 3,
            code: 0xE1,
            len: 1,
        })
    );
    assert_eq!(
        header_extent(&short_len),
        Err(ExifError::MalformedJpeg(
            "segment 0xFFE1 at byte 2 has an invalid length 1".into()
        ))
    );
    assert!(matches!(
        rewrite_header(&short_len, "x"),
        Err(JpegError::BadMarker { offset: 3, .. })
    ));
    let no_marker = [0xFF, 0xD8, 0x12];
    assert_eq!(
        walk_markers(&no_marker, WalkRules::REWRITE),
        Err(WalkError::NotAMarker { at: 2, found: 0x12 })
    );
    assert_eq!(
        header_extent(&no_marker),
        Err(ExifError::MalformedJpeg(
            "expected a marker at byte 2, found 0x12".into()
        ))
    );
    assert!(matches!(
        rewrite_header(&no_marker, "x"),
        Err(JpegError::BadMarker { offset: 2, .. })
    ));
    // Not a JPEG at all.
    assert_eq!(walk_markers(b"GIF89a", WalkRules::REWRITE), Err(WalkError::NoSoi));
    assert!(matches!(header_extent(b"GIF89a"), Err(ExifError::NotJpeg(m)) if m.contains("GIF")));
    assert_eq!(rewrite_header(b"GIF89a", "x"), Err(JpegError::NotJpeg));
    assert!(matches!(header_extent(b""), Err(ExifError::NotJpeg(m)) if m.contains("empty")));
}
