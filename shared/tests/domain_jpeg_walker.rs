//! The one JPEG marker walker (`jpeg::walk_markers`) and its two callers: the EXIF reader
//! (`exif::header_extent`, `Fetch::WholeSegments`) and the header rewrite (`jpeg::rewrite_header`,
//! `Fetch::Minimal`). Each test pins one of the places where the two used to walk with separate
//! code and different rules: which segments they pass to find the Exif APP1 (the rewrite used to
//! stop at the first table), how much a short head asks for, where fill bytes put the offsets,
//! which offset an error names, and which segments count as Exif.

use relay_fixtures::{jpeg, ImageSpec};
use shared::domain::exif::{header_extent, read_metadata, ExifError, HeaderExtent};
use shared::domain::jpeg::{
    rewrite_header, walk_markers, ExifSegment, Fetch, JpegError, MarkerWalk, RewrittenHeader, WalkError,
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
fn both_callers_find_the_same_exif_segment_in_a_fixture() {
    let (bytes, app1) = fixture();
    let want = ExifSegment {
        segment: app1.clone(),
        tiff: app1.start + 10..app1.end,
    };
    for fetch in [Fetch::WholeSegments, Fetch::Minimal] {
        assert_eq!(walk_markers(&bytes, fetch), Ok(MarkerWalk::Exif(want.clone())));
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
        walk_markers(&file, Fetch::WholeSegments),
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
        walk_markers(&file, Fetch::WholeSegments),
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
        walk_markers(&short_len, Fetch::Minimal),
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
        walk_markers(&no_marker, Fetch::Minimal),
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
    assert_eq!(walk_markers(b"GIF89a", Fetch::Minimal), Err(WalkError::NoSoi));
    assert!(matches!(header_extent(b"GIF89a"), Err(ExifError::NotJpeg(m)) if m.contains("GIF")));
    assert_eq!(rewrite_header(b"GIF89a", "x"), Err(JpegError::NotJpeg));
    assert!(matches!(header_extent(b""), Err(ExifError::NotJpeg(m)) if m.contains("empty")));
}

/// Apply a rewrite: the new header, then the original from `consumed` on.
fn apply(original: &[u8], r: &RewrittenHeader) -> Vec<u8> {
    let mut out = r.header.clone();
    out.extend_from_slice(&original[r.consumed..]);
    out
}

/// The fixture with `before` (e.g. a DQT segment) between SOI and its Exif APP1.
fn with_segments_before_exif(before: &[u8]) -> (Vec<u8>, std::ops::Range<usize>) {
    let (fixture, app1) = fixture();
    let mut file = vec![0xFF, 0xD8];
    file.extend_from_slice(before);
    let at = file.len();
    file.extend_from_slice(&fixture[app1.start..]);
    (file, at..at + app1.len())
}

#[test]
fn an_exif_app1_behind_tables_or_standalone_markers_is_rewritten_in_place() {
    let dqt = segment(0xDB, &[0u8; 65]);
    let dri = segment(0xDD, &[0, 16]);
    let rst_tem = [0xFF, 0xD0, 0xFF, 0x01];
    for before in [dqt.clone(), [dqt.clone(), dri.clone()].concat(), rst_tem.to_vec()] {
        let (file, app1) = with_segments_before_exif(&before);
        let original = read_metadata(&file).expect("the reader finds the Exif APP1 behind them");
        assert_eq!(
            header_extent(&file),
            Ok(HeaderExtent::Complete {
                exif: Some(app1.start + 10..app1.end),
                header_end: app1.end,
            })
        );
        // The rewrite edits that same segment (it used to stop at the DQT/RST and insert a second,
        // description-only Exif APP1 after SOI, hiding the GPS position from every reader).
        let r = rewrite_header(&file, "{\"MAPFilename\":\"a.jpg\"}").expect("rewrite");
        assert_eq!(r.consumed, app1.end);
        assert_eq!(
            &r.header[..app1.start],
            &file[..app1.start],
            "segments before it kept"
        );
        let out = apply(&file, &r);
        let count = out.windows(6).filter(|w| *w == b"Exif\0\0").count();
        assert_eq!(count, 1, "exactly one Exif APP1");
        let after = read_metadata(&out).expect("still readable");
        assert_eq!((after.lat, after.lon), (original.lat, original.lon));
        assert_eq!(after.captured_at, original.captured_at);
        // Rewriting again finds the rewritten segment.
        assert_eq!(rewrite_header(&out, "x").expect("again").consumed, r.header.len());
    }
}

#[test]
fn without_exif_the_rewrite_needs_the_head_through_sos() {
    // SOI, APP0, DQT and no Exif: the walk passes the DQT, so a head ending there is short.
    let mut file = vec![0xFF, 0xD8];
    file.extend(segment(0xE0, JFIF));
    let app0_end = file.len();
    file.extend(segment(0xDB, &[0u8; 65]));
    let dqt_end = file.len();
    assert_eq!(
        rewrite_header(&file, "x"),
        Err(JpegError::Truncated {
            needed: dqt_end + 2,
            available: dqt_end,
        })
    );
    assert_eq!(
        header_extent(&file),
        Ok(HeaderExtent::NeedMore {
            at_least: dqt_end + 4
        })
    );
    file.extend([0xFF, 0xDA, 0x00, 0x02, 0xFF, 0xD9]);
    assert_eq!(
        walk_markers(&file, Fetch::Minimal),
        Ok(MarkerWalk::NoExif(WalkStop {
            marker: 0xDA,
            at: dqt_end,
            after_leading_app0: app0_end,
        }))
    );
    // The fresh APP1 still goes right after the leading APP0.
    assert_eq!(rewrite_header(&file, "x").expect("rewrite").consumed, app0_end);
}

use crate::rng;
use rng::Rng;

#[test]
fn on_any_head_the_reader_and_the_rewrite_agree_on_the_exif_segment() {
    let (plain, _) = fixture();
    let (behind_dqt, _) = with_segments_before_exif(&segment(0xDB, &[7u8; 65]));
    let markers = [0x00, 0x01, 0xD0, 0xD8, 0xD9, 0xDA, 0xDB, 0xE0, 0xE1, 0xFE, 0xFF];
    let mut rng = Rng(0x00C0_FFEE);
    let mut both = 0;
    for round in 0..20_000 {
        let mut m = if round % 2 == 0 {
            plain.clone()
        } else {
            behind_dqt.clone()
        };
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(120.min(m.len()));
            m[at] = if rng.below(2) == 0 {
                markers[rng.below(markers.len())]
            } else {
                rng.next() as u8
            };
        }
        let cut = if rng.below(3) == 0 {
            rng.below(m.len() + 1)
        } else {
            m.len()
        };
        let head = &m[..cut];
        let reader = walk_markers(head, Fetch::WholeSegments);
        let rewrite = walk_markers(head, Fetch::Minimal);
        match (&reader, &rewrite) {
            // Complete walks agree exactly; only how much a short head asks for differs (either
            // can ask for more: the reader a whole APP1, the rewrite the marker behind it).
            (Ok(MarkerWalk::NeedMore { at_least: a }), Ok(MarkerWalk::NeedMore { at_least: b })) => {
                assert!(*a > cut && *b > cut, "{a} {b} {cut}");
            }
            (Ok(MarkerWalk::NeedMore { at_least }), Ok(found)) => {
                // The rewrite decided on fewer bytes: only by probing a non-Exif APP1 or by not
                // needing a length field the reader asks for.
                assert!(*at_least > cut, "{found:?}");
            }
            (Ok(r), Ok(w)) => {
                assert_eq!(r, w, "prefix {cut} of round {round}");
                if let Ok(MarkerWalk::Exif(seg)) = &reader {
                    if let (Ok(HeaderExtent::Complete { header_end, .. }), Ok(rh)) =
                        (header_extent(head), rewrite_header(head, "x"))
                    {
                        assert_eq!(rh.consumed, header_end);
                        assert_eq!(rh.consumed, seg.segment.end);
                        both += 1;
                    }
                }
            }
            (Err(a), Err(b)) => assert_eq!(a, b),
            (Err(e), Ok(MarkerWalk::NeedMore { .. })) => {
                panic!("the reader saw {e:?} in bytes the rewrite has not reached: prefix {cut}")
            }
            (a, b) => panic!("reader {a:?} vs rewrite {b:?} on prefix {cut} of round {round}"),
        }
    }
    assert!(both > 1000, "only {both} heads rewritten");
}
