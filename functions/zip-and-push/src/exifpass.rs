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
    /// Size from the listing, when the candidates came from one: lets the end-of-image read go
    /// out together with the first head read instead of after it.
    pub listed_size: Option<u64>,
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
    // With the size known from the listing, the 2-byte end-of-image read goes out together with
    // the first head read: one round trip per image instead of two (S3 answers each request after
    // tens of milliseconds, whatever its size). Not when the first head read holds the whole file.
    let mut tail_of = c.listed_size.filter(|&size| size > INITIAL_HEAD);
    let mut tail = None;
    loop {
        let head = store.get_range(bucket, &c.key, 0, want);
        let got = match tail_of.take() {
            Some(size) => {
                let (h, t) = futures::join!(head, store.get_range(bucket, &c.key, size - 2, size));
                tail = Some((size, t));
                h
            }
            None => head.await,
        };
        let r = match got {
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
                // The early tail counts only if it was read from the end of the object the head came
                // from (the listed size is its size, same ETag); otherwise, and on any failure of it,
                // `check_eoi` reads the end again and words a failure.
                let early = match tail.take() {
                    Some((size, Ok(t))) if size == r.total_size && t.etag == r.etag => Some(t.bytes),
                    _ => None,
                };
                if let Some(reason) = check_eoi(store, bucket, &c.key, &r.bytes, r.total_size, early).await? {
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
/// hand when they are the whole file, else `early_tail` (the last 2 bytes, read with the head),
/// else one 2-byte ranged GET. `Some(reason)` when truncated.
async fn check_eoi<S: ObjectStore>(
    store: &S,
    bucket: &str,
    key: &str,
    head: &Bytes,
    size: u64,
    early_tail: Option<Bytes>,
) -> Result<Option<String>, StoreError> {
    const REASON: &str = "truncated JPEG: the file does not end with the end-of-image marker FF D9";
    if size < 4 {
        return Ok(Some(REASON.into()));
    }
    let tail = if head.len() as u64 >= size {
        head.slice(head.len() - 2..)
    } else if let Some(t) = early_tail.filter(|t| t.len() == 2) {
        t
    } else {
        match store.get_range(bucket, key, size - 2, size).await {
            Ok(r) => r.bytes,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => return Ok(Some(reasons::object("the image", &e))),
        }
    };
    Ok((tail.as_ref() != [0xFF, 0xD9]).then(|| REASON.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_fixtures::{jpeg, track, TrackSpec};
    use shared::fakes::MemStore;
    use time::macros::datetime;

    const BUCKET: &str = "b";

    /// A geotagged JPEG padded to 200 KiB: larger than the first head read, so its end-of-image
    /// marker needs a read of its own.
    fn big_jpeg() -> Vec<u8> {
        let t = TrackSpec::new(48.2, 16.37, datetime!(2024-04-20 08:00:00 UTC));
        let mut spec = track(1, &t).remove(0);
        spec.pad_to = Some(200 * 1024);
        jpeg(&spec)
    }

    fn candidate(key: &str, listed_size: Option<u64>) -> Candidate {
        Candidate {
            rel: key.into(),
            key: key.into(),
            listed_size,
        }
    }

    async fn read(store: &MemStore, c: Candidate) -> HeadOutcome {
        read_heads(store, BUCKET, vec![c], 4, u64::MAX)
            .await
            .expect("no transient error")
            .remove(0)
    }

    #[tokio::test]
    async fn when_size_is_listed_should_check_the_end_with_the_head_read_and_reject_a_cut_file() {
        let good = big_jpeg();
        assert!(
            good.len() as u64 > INITIAL_HEAD,
            "the fixture must be larger than the first read"
        );
        let cut = good[..good.len() - 1000].to_vec();
        let store = MemStore::new();
        store.put(BUCKET, "good.jpg", good.clone());
        store.put(BUCKET, "cut.jpg", cut.clone());

        match read(&store, candidate("good.jpg", Some(good.len() as u64))).await {
            HeadOutcome::Read(r) => assert_eq!(r.size, good.len() as u64),
            other => panic!("good.jpg: {other:?}"),
        }
        match read(&store, candidate("cut.jpg", Some(cut.len() as u64))).await {
            HeadOutcome::Rejected(k, reason) => {
                assert_eq!(k, "cut.jpg");
                assert!(reason.starts_with("truncated JPEG"), "{reason}");
            }
            other => panic!("cut.jpg: {other:?}"),
        }
    }

    #[tokio::test]
    async fn when_the_listed_size_is_stale_should_judge_the_end_of_the_object_read() {
        let good = big_jpeg();
        let cut = good[..good.len() - 1000].to_vec();
        let store = MemStore::new();
        // Listed before the object was replaced: the early tail read the wrong bytes (or none);
        // the end-of-image check must be made on the object the head came from.
        store.put(BUCKET, "now-cut.jpg", cut.clone());
        store.put(BUCKET, "now-good.jpg", good.clone());
        match read(&store, candidate("now-cut.jpg", Some(good.len() as u64))).await {
            HeadOutcome::Rejected(_, reason) => assert!(reason.starts_with("truncated JPEG"), "{reason}"),
            other => panic!("now-cut.jpg: {other:?}"),
        }
        match read(&store, candidate("now-good.jpg", Some(cut.len() as u64))).await {
            HeadOutcome::Read(r) => assert_eq!(r.size, good.len() as u64),
            other => panic!("now-good.jpg: {other:?}"),
        }
        // Without a listed size (a manifest names the images) the check reads the end afterwards.
        match read(&store, candidate("now-cut.jpg", None)).await {
            HeadOutcome::Rejected(_, reason) => assert!(reason.starts_with("truncated JPEG"), "{reason}"),
            other => panic!("now-cut.jpg without a size: {other:?}"),
        }
    }
}
