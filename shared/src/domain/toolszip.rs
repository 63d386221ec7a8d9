//! A whole mapillary_tools-style upload zip in memory, from original JPEGs: each image gets the MAP*
//! description the relay writes ([`description::map_description`] of its EXIF, injected with
//! [`jpeg::rewrite_header`]), the entries are laid out with [`zipfmt`]'s blocks (the bytes
//! mapillary_tools 0.14.7 writes) and the archive comment is the `sequence_md5sum` of the originals.
//!
//! zip-and-push streams the same blocks across invocations; this is the one-shot form for small uploads
//! (tests, demo fixtures) that must be accepted by a strict Mapillary (the simulator's `seed-2022`).

use md5::{Digest, Md5};

use super::description::{self, DescriptionError};
use super::exif::{self, ExifError};
use super::jpeg::{self, JpegError};
use super::zipfmt::{self, EntryRecord, ZipFormatError};

/// Why an image or archive could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ToolsZipError {
    /// The image's EXIF could not be read.
    #[error("image {index}: {source}")]
    Exif {
        /// Position of the image.
        index: usize,
        /// What was wrong.
        source: ExifError,
    },
    /// The image's metadata cannot be described.
    #[error("image {index}: {source}")]
    Description {
        /// Position of the image.
        index: usize,
        /// What was wrong.
        source: DescriptionError,
    },
    /// The description could not be injected.
    #[error("image {index}: {source}")]
    Jpeg {
        /// Position of the image.
        index: usize,
        /// What was wrong.
        source: JpegError,
    },
    /// The archive could not be laid out.
    #[error(transparent)]
    Zip(#[from] ZipFormatError),
}

/// `original` with the MAP* description of its own EXIF in its ImageDescription (`filename` is the
/// `MAPFilename`), as zip-and-push writes it; `index` only labels errors.
pub fn describe(original: &[u8], filename: &str, index: usize) -> Result<Vec<u8>, ToolsZipError> {
    let meta = exif::read_metadata(original).map_err(|source| ToolsZipError::Exif { index, source })?;
    let desc = description::map_description(&meta, filename)
        .map_err(|source| ToolsZipError::Description { index, source })?;
    let rewritten =
        jpeg::rewrite_header(original, &desc).map_err(|source| ToolsZipError::Jpeg { index, source })?;
    let rest = original.get(rewritten.consumed..).unwrap_or_default();
    let mut out = rewritten.header;
    out.extend_from_slice(rest);
    Ok(out)
}

/// The archive of `entries` (already described) named `0.jpg`, `1.jpg`, … with `comment`.
pub fn archive(entries: &[Vec<u8>], comment: &[u8]) -> Result<Vec<u8>, ZipFormatError> {
    let mut out = Vec::new();
    let mut records = Vec::with_capacity(entries.len());
    for (i, data) in entries.iter().enumerate() {
        let name = zipfmt::entry_name(i);
        let crc32 = crc32(data);
        let size = data.len() as u64;
        let header = zipfmt::local_header(&name, crc32, size)?;
        records.push(EntryRecord {
            name,
            crc32,
            size,
            local_header_offset: out.len() as u64,
        });
        out.extend_from_slice(&header);
        out.extend_from_slice(data);
    }
    out.extend_from_slice(&zipfmt::central_directory_and_end(&records, comment)?);
    Ok(out)
}

/// CRC-32 (IEEE), bit by bit: small archives only (zip-and-push hashes its streams elsewhere).
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// The upload zip mapillary_tools (and the relay) would make of these ORIGINAL images, in order.
pub fn tools_zip(originals: &[Vec<u8>]) -> Result<Vec<u8>, ToolsZipError> {
    let md5s: Vec<String> = originals.iter().map(|o| hex::encode(Md5::digest(o))).collect();
    let comment = zipfmt::archive_comment(&zipfmt::sequence_md5sum(&md5s));
    let described = originals
        .iter()
        .enumerate()
        .map(|(i, o)| describe(o, &zipfmt::entry_name(i), i))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(archive(&described, &comment)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn originals(n: usize) -> Vec<Vec<u8>> {
        let t = relay_fixtures::TrackSpec::new(50.0, 8.0, time::macros::datetime!(2024-05-01 09:00 UTC));
        relay_fixtures::track(n, &t)
            .iter()
            .map(relay_fixtures::jpeg)
            .collect()
    }

    #[test]
    fn every_entry_is_described_and_the_comment_is_the_sequence_md5sum() {
        let imgs = originals(3);
        let z = tools_zip(&imgs).expect("zip");
        let mut a = zip::ZipArchive::new(std::io::Cursor::new(z)).expect("readable zip");
        let md5s: Vec<String> = imgs.iter().map(|o| hex::encode(Md5::digest(o))).collect();
        assert_eq!(
            a.comment(),
            &zipfmt::archive_comment(&zipfmt::sequence_md5sum(&md5s))[..]
        );
        assert_eq!(a.len(), 3);
        for (i, original) in imgs.iter().enumerate() {
            let mut e = a.by_index(i).expect("entry");
            assert_eq!(e.name().map(|n| n.to_string()).ok(), Some(format!("{i}.jpg")));
            assert_eq!(e.compression(), zip::CompressionMethod::Stored);
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut bytes).expect("read");
            let meta = exif::read_metadata(&bytes).expect("exif");
            let desc = description::map_description(&meta, &format!("{i}.jpg")).expect("desc");
            assert!(description::validate(&desc).is_ok());
            assert_ne!(&bytes, original, "the description was injected");
            assert!(
                bytes.windows(desc.len()).any(|w| w == desc.as_bytes()),
                "entry {i} carries its MAP* description"
            );
        }
    }

    #[test]
    fn crc32_is_the_ieee_one() {
        for data in [&b""[..], b"a", b"123456789", &[0xFFu8; 1000][..]] {
            assert_eq!(crc32(data), crc32fast::hash(data));
        }
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn a_non_jpeg_is_an_error_naming_its_position() {
        let mut imgs = originals(2);
        imgs.push(b"not a jpeg".to_vec());
        let e = tools_zip(&imgs).expect_err("not a jpeg");
        assert!(e.to_string().starts_with("image 2:"), "{e}");
    }
}
