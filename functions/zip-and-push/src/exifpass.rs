//! EXIF pass: read each image's head with ranged GETs (never the whole object) and decode its
//! capture metadata; failures become per-image rejections with a precise reason.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use shared::domain::exif::{self, ExifError, HeaderExtent, ImageMetadata};
use shared::ports::{ObjectStore, StoreError};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Semaphore;

use crate::reasons;

/// First ranged read.
pub const INITIAL_HEAD: u64 = 64 * 1024;
/// Largest head read to find the end of the EXIF block.
pub const MAX_HEAD: u64 = 2 * 1024 * 1024;
/// Bytes of head reads in flight at once, whatever the concurrency: a read holds
/// `ceil(want / INITIAL_HEAD)` permits of [`INITIAL_HEAD`] bytes while its GET runs. With the usual
/// 64 KiB heads the request concurrency is the limit (64 in flight = 4 MiB); a sequence whose
/// headers all need the 2 MiB maximum is held to 8 such reads at a time.
pub const HEAD_BUDGET: u64 = 16 * 1024 * 1024;

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

/// Why the EXIF pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum HeadPassError {
    /// A transient store error: the caller retries the whole sequence later.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The headers kept for planning would exceed `limit` bytes (`RELAY_MAX_HEADER_BYTES`).
    #[error(
        "the images' JPEG headers (through the EXIF block) total more than the {limit} bytes allowed \
         (RELAY_MAX_HEADER_BYTES): split the sequence or strip large metadata before the EXIF block"
    )]
    HeadersTooLarge {
        /// The limit.
        limit: u64,
    },
}

/// Read every candidate with at most `concurrency` objects in flight and at most [`HEAD_BUDGET`]
/// bytes of head reads outstanding, in input order, keeping at most `max_kept` bytes of headers in
/// all. Only transient store errors and too many header bytes fail the pass.
///
/// S3 answers each request after tens of milliseconds whatever its size, so the pass is a number of
/// latency rounds: 400 images at 16 in flight wait 25 rounds, at 64 seven. The byte budget keeps the
/// memory of a hostile sequence (every header near [`MAX_HEAD`]) bounded as the concurrency grows.
pub async fn read_heads<S: ObjectStore>(
    store: &S,
    bucket: &str,
    candidates: Vec<Candidate>,
    concurrency: usize,
    max_image_bytes: u64,
    max_kept: u64,
) -> Result<Vec<HeadOutcome>, HeadPassError> {
    let budget = Semaphore::new(permits(HEAD_BUDGET) as usize);
    let kept = AtomicU64::new(0);
    let (budget, kept) = (&budget, &kept);
    futures::stream::iter(candidates)
        .map(|c| async move {
            let out = read_one(store, bucket, c, max_image_bytes, budget).await?;
            if let HeadOutcome::Read(r) = &out {
                let len = r.head.len() as u64;
                if kept.fetch_add(len, Ordering::Relaxed) + len > max_kept {
                    return Err(HeadPassError::HeadersTooLarge { limit: max_kept });
                }
            }
            Ok(out)
        })
        .buffered(concurrency.max(1))
        .try_collect()
        .await
}

/// Budget permits for a head read of `want` bytes (at least one, at most the whole budget).
fn permits(want: u64) -> u32 {
    let n = want.div_ceil(INITIAL_HEAD).clamp(1, HEAD_BUDGET / INITIAL_HEAD);
    u32::try_from(n).unwrap_or(u32::MAX)
}

async fn read_one<S: ObjectStore>(
    store: &S,
    bucket: &str,
    c: Candidate,
    max_image_bytes: u64,
    budget: &Semaphore,
) -> Result<HeadOutcome, StoreError> {
    let reject = |reason: String| Ok(HeadOutcome::Rejected(c.rel.clone(), reason));
    let mut want = INITIAL_HEAD;
    // With the size known from the listing, the 2-byte end-of-image read goes out together with
    // the first head read: one round trip per image instead of two (S3 answers each request after
    // tens of milliseconds, whatever its size). Not when the first head read holds the whole file.
    let mut tail_of = c.listed_size.filter(|&size| size > INITIAL_HEAD);
    let mut tail = None;
    loop {
        // Held until this attempt's bytes are parsed (the semaphore is never closed: `None` cannot
        // happen, and would only mean an unbudgeted read).
        let _held = budget.acquire_many(permits(want)).await.ok();
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
        read_heads(store, BUCKET, vec![c], 4, u64::MAX, u64::MAX)
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

    /// Counts the bytes of head reads (ranges from 0) in flight and remembers the most at once;
    /// each ranged GET takes a few milliseconds, as S3's do, so reads overlap.
    struct InFlight {
        inner: MemStore,
        now: AtomicU64,
        most: AtomicU64,
        reads: AtomicU64,
    }

    impl ObjectStore for InFlight {
        async fn get_range(
            &self,
            bucket: &str,
            key: &str,
            start: u64,
            end: u64,
        ) -> Result<shared::ports::RangeBody, StoreError> {
            let held = if start == 0 { end } else { 0 };
            let now = self.now.fetch_add(held, Ordering::SeqCst) + held;
            self.most.fetch_max(now, Ordering::SeqCst);
            self.reads.fetch_add(u64::from(start == 0), Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            let r = self.inner.get_range(bucket, key, start, end).await;
            self.now.fetch_sub(held, Ordering::SeqCst);
            r
        }
        async fn get_object(
            &self,
            bucket: &str,
            key: &str,
            if_match: Option<&str>,
        ) -> Result<shared::ports::ObjectBody, StoreError> {
            self.inner.get_object(bucket, key, if_match).await
        }
        async fn list(
            &self,
            bucket: &str,
            prefix: &str,
        ) -> Result<Vec<shared::ports::ObjectInfo>, StoreError> {
            self.inner.list(bucket, prefix).await
        }
        async fn head(&self, bucket: &str, key: &str) -> Result<shared::ports::ObjectInfo, StoreError> {
            self.inner.head(bucket, key).await
        }
    }

    #[tokio::test]
    async fn head_reads_in_flight_should_stay_within_the_byte_budget_whatever_the_concurrency() {
        let store = InFlight {
            inner: MemStore::new(),
            now: Default::default(),
            most: Default::default(),
            reads: Default::default(),
        };
        let img = big_jpeg();
        // More first reads than the budget holds at once.
        let n = (HEAD_BUDGET / INITIAL_HEAD) as usize + 64;
        let candidates: Vec<Candidate> = (0..n)
            .map(|i| {
                let key = format!("{i:04}.jpg");
                store.inner.put(BUCKET, &key, img.clone());
                candidate(&key, Some(img.len() as u64))
            })
            .collect();
        let out = read_heads(&store, BUCKET, candidates, 10_000, u64::MAX, u64::MAX)
            .await
            .expect("no transient error");
        assert_eq!(out.len(), n);
        assert!(
            out.iter().all(|o| matches!(o, HeadOutcome::Read(_))),
            "every image is read"
        );
        assert_eq!(
            store.reads.load(Ordering::SeqCst),
            n as u64,
            "one head read per image"
        );
        let most = store.most.load(Ordering::SeqCst);
        assert!(
            most <= HEAD_BUDGET,
            "{most} bytes of head reads in flight at once, budget {HEAD_BUDGET}"
        );
        assert!(
            most >= HEAD_BUDGET / 2,
            "the budget, not a smaller limit, bounds the reads: at most {most} bytes in flight"
        );
    }

    #[test]
    fn permits_cover_the_read_and_never_exceed_the_budget() {
        assert_eq!(permits(1), 1);
        assert_eq!(permits(INITIAL_HEAD), 1);
        assert_eq!(permits(INITIAL_HEAD + 1), 2);
        assert_eq!(permits(MAX_HEAD), (MAX_HEAD / INITIAL_HEAD) as u32);
        assert_eq!(permits(u64::MAX), (HEAD_BUDGET / INITIAL_HEAD) as u32);
    }

    #[tokio::test]
    async fn the_headers_kept_may_total_the_limit_and_not_a_byte_more() {
        let store = MemStore::new();
        let img = big_jpeg();
        let candidates: Vec<Candidate> = (0..5)
            .map(|i| {
                let key = format!("{i}.jpg");
                store.put(BUCKET, &key, img.clone());
                candidate(&key, Some(img.len() as u64))
            })
            .collect();
        let all = read_heads(&store, BUCKET, candidates.clone(), 2, u64::MAX, u64::MAX)
            .await
            .expect("no limit");
        let kept: u64 = all
            .iter()
            .map(|o| match o {
                HeadOutcome::Read(r) => r.head.len() as u64,
                HeadOutcome::Rejected(k, why) => panic!("{k}: {why}"),
            })
            .sum();
        assert!(kept > 0);
        let exact = read_heads(&store, BUCKET, candidates.clone(), 2, u64::MAX, kept).await;
        assert_eq!(
            exact.map(|v| v.len()).ok(),
            Some(5),
            "exactly the limit is allowed"
        );
        match read_heads(&store, BUCKET, candidates, 2, u64::MAX, kept - 1).await {
            Err(e @ HeadPassError::HeadersTooLarge { limit }) => {
                assert_eq!(limit, kept - 1);
                assert!(e.to_string().contains("RELAY_MAX_HEADER_BYTES"), "{e}");
            }
            other => panic!("one byte over the limit: {:?}", other.map(|v| v.len())),
        }
    }
}
