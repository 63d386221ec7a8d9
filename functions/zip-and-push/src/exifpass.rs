//! EXIF pass: read each image's head with ranged GETs (never the whole object) and decode its
//! capture metadata; failures become per-image rejections with a precise reason.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use shared::domain::exif::{self, ExifError, HeaderExtent, ImageMetadata};
use shared::ports::{ObjectStore, StoreError};

use crate::reasons;

/// First ranged read.
pub const INITIAL_HEAD: u64 = 64 * 1024;
/// Largest head read to find the end of the EXIF block.
pub const MAX_HEAD: u64 = 2 * 1024 * 1024;

/// An image to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Key relative to the sequence prefix (as in the manifest) — its name in rejections and plans.
    pub rel: String,
    /// Full object key.
    pub key: String,
}

/// An image whose metadata could be read.
#[derive(Debug, Clone)]
pub struct HeadRead {
    /// Relative key.
    pub rel: String,
    /// Full key.
    pub key: String,
    /// ETag (no quotes) of the object the head came from.
    pub etag: String,
    /// Object size.
    pub size: u64,
    /// File bytes through the end of the Exif APP1 segment (enough for the header rewrite).
    pub head: Bytes,
    /// Decoded metadata.
    pub meta: ImageMetadata,
}

/// Result for one candidate.
#[derive(Debug, Clone)]
pub enum HeadOutcome {
    /// Usable.
    Read(Box<HeadRead>),
    /// Rejected: `(relative key, reason)`.
    Rejected(String, String),
}

/// Read every candidate with at most `concurrency` objects in flight, in input order.
/// Only transient store errors fail the pass (the caller retries the whole sequence later).
pub async fn read_heads<S: ObjectStore>(
    store: &S,
    bucket: &str,
    candidates: Vec<Candidate>,
    concurrency: usize,
    max_image_bytes: u64,
) -> Result<Vec<HeadOutcome>, StoreError> {
    futures::stream::iter(candidates)
        .map(|c| read_one(store, bucket, c, max_image_bytes))
        .buffered(concurrency.max(1))
        .try_collect()
        .await
}

async fn read_one<S: ObjectStore>(
    store: &S,
    bucket: &str,
    c: Candidate,
    max_image_bytes: u64,
) -> Result<HeadOutcome, StoreError> {
    let reject = |reason: String| Ok(HeadOutcome::Rejected(c.rel.clone(), reason));
    let mut want = INITIAL_HEAD;
    loop {
        let r = match store.get_range(bucket, &c.key, 0, want).await {
            Ok(r) => r,
            Err(StoreError::NotFound(_)) => {
                return reject(format!("missing key: no object {:?} in the sequence", c.rel))
            }
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => return reject(reasons::object("the image", &e)),
        };
        if r.total_size > max_image_bytes {
            return reject(format!(
                "the image is {} bytes, more than the {max_image_bytes} allowed (RELAY_MAX_IMAGE_BYTES)",
                r.total_size
            ));
        }
        let have_all = r.bytes.len() as u64 >= r.total_size;
        let extent = match exif::header_extent(&r.bytes) {
            Ok(x) => x,
            Err(e) => return reject(e.to_string()),
        };
        match extent {
            HeaderExtent::Complete { header_end, .. } => {
                let meta = match exif::read_metadata(&r.bytes) {
                    Ok(m) => m,
                    Err(e) => return reject(e.to_string()),
                };
                if let Some(reason) = check_eoi(store, bucket, &c.key, &r.bytes, r.total_size).await? {
                    return reject(reason);
                }
                let end = header_end.min(r.bytes.len());
                // A copy, not a slice: a slice would keep the whole read buffer (the connection's,
                // often several times the header) alive for every image until planning is done.
                return Ok(HeadOutcome::Read(Box::new(HeadRead {
                    rel: c.rel,
                    key: c.key,
                    etag: r.etag,
                    size: r.total_size,
                    head: Bytes::copy_from_slice(&r.bytes[..end]),
                    meta,
                })));
            }
            HeaderExtent::NeedMore { at_least } => {
                if have_all {
                    return reject(
                        ExifError::Truncated {
                            have: r.bytes.len(),
                            need: at_least,
                        }
                        .to_string(),
                    );
                }
                if at_least as u64 > MAX_HEAD {
                    return reject(format!(
                        "corrupt EXIF: the JPEG header extends past {MAX_HEAD} bytes (needs at least {at_least})"
                    ));
                }
                want = (at_least as u64).max(want.saturating_mul(2)).min(MAX_HEAD);
            }
        }
    }
}

/// A complete JPEG ends with the EOI marker `FF D9`; a file cut short does not. Uses the bytes in
/// hand when they are the whole file, else one 2-byte ranged GET. `Some(reason)` when truncated.
async fn check_eoi<S: ObjectStore>(
    store: &S,
    bucket: &str,
    key: &str,
    head: &Bytes,
    size: u64,
) -> Result<Option<String>, StoreError> {
    const REASON: &str = "truncated JPEG: the file does not end with the end-of-image marker FF D9";
    if size < 4 {
        return Ok(Some(REASON.into()));
    }
    let tail = if head.len() as u64 >= size {
        head.slice(head.len() - 2..)
    } else {
        match store.get_range(bucket, key, size - 2, size).await {
            Ok(r) => r.bytes,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => return Ok(Some(reasons::object("the image", &e))),
        }
    };
    Ok((tail.as_ref() != [0xFF, 0xD9]).then(|| REASON.to_string()))
}
