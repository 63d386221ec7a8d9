//! The upload body: a mapillary_tools-format zip streamed from S3 objects, from any byte offset.
//!
//! The archive layout is known from the entry sizes alone ([`ZipPlan`]), so the total length is
//! announced before any byte is read. For an offset X the stream starts at the entry that holds X
//! ([`ZipPlan::locate`]), fetches whole objects (GET with `If-Match` on the recorded etag) with a
//! bounded read-ahead, rewrites each header (MAP* ImageDescription), computes CRC-32 and the
//! original's md5, and emits local header + data, dropping every byte below X. The tail needs the
//! CRC/md5 of every entry: entries below X come from the checkpoints in the repository (or, when
//! one is missing, from re-reading that object — never re-sending it).
//!
//! `MapillaryClient::upload_until` wants a `'static` body stream while the sources
//! here borrow the ports; [`upload_zip`] therefore runs the producer next to the upload in the same
//! task and hands each POST a channel receiver.
//!
//! Inside the producer three futures are polled concurrently, so no stage waits for another:
//! the *fetcher* (GETs with bounded read-ahead, all polled all the time → a one-slot channel of
//! ready entries), the
//! *emitter* (ready entries → the POST's body channel) and the *checkpointer* (entry checkpoints
//! → the repository in batches). The hashing (CRC-32 of the transformed entry; md5 of the original
//! unless S3 vouches for it through the ETag, see [`ObjectChunks::content_md5`]) runs on the
//! blocking pool, off the threads that drive the connections. Objects stay in the segments the S3
//! connection delivered them in: nothing is copied except the JPEG head that is rewritten.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use md5::{Digest, Md5};
use secrecy::SecretString;
use shared::domain::jpeg::{self, JpegError};
use shared::domain::zipfmt::{self, ZipFormatError, ZipPlan, ZipPosition};
use shared::mapillary::client::{UploadLimits, UploadOutcome};
use shared::mapillary::error::MapillaryError;
use shared::model::{EntryCheckpoint, UploadImage};
use shared::ports::{ImageEntryStore, MapillaryUploads, ObjectChunks, ObjectStore, StoreError};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Body chunks handed to the HTTP client (zero-copy slices of the objects).
const CHUNK: usize = 256 * 1024;
/// Chunks buffered between producer and connection.
const CHANNEL_CHUNKS: usize = 8;
/// Checkpoints written per repository call.
const CHECKPOINT_BATCH: usize = 25;
/// First guess of the JPEG head to make contiguous for the rewrite (grown on demand).
const HEAD_GUESS: usize = 64 * 1024;

/// Objects fetched concurrently (GETs in flight or finished, waiting their turn) for a budget of
/// `prefetch_bytes` of object data held and a largest entry of `largest` bytes. Besides the fetched
/// ones, one object waits in the ready slot and one is being sent; the budget counts them too, so
/// at most `max(prefetch_bytes, 3 × largest)` object bytes are held.
pub fn fetch_concurrency(prefetch_bytes: u64, largest: u64) -> usize {
    (prefetch_bytes / largest.max(1)).saturating_sub(2).clamp(1, 32) as usize
}

/// Length of the archive comment `{"sequence_md5sum":"<32 hex>"}`.
pub fn comment_len() -> usize {
    zipfmt::archive_comment(&"0".repeat(32)).len()
}

/// Why the body could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum ZipError {
    /// An object differs from what was planned (etag, size or header changed, or it was deleted).
    #[error("{key}: the object changed after the upload was planned ({what}); drop the sequence again")]
    Changed {
        /// Object key.
        key: String,
        /// What differs.
        what: String,
    },
    /// S3 failed.
    #[error("reading {key}: {source}")]
    Store {
        /// Object key.
        key: String,
        /// Cause.
        source: StoreError,
    },
    /// The header rewrite failed.
    #[error("{key}: cannot write the MAP* description into the EXIF: {source}")]
    Header {
        /// Object key.
        key: String,
        /// Cause.
        source: JpegError,
    },
    /// The archive cannot be represented.
    #[error("zip format: {0}")]
    Format(#[from] ZipFormatError),
    /// Entry metadata is inconsistent with the plan (corrupt records).
    #[error("inconsistent upload records: {0}")]
    Inconsistent(String),
    /// The hashing task on the blocking pool did not complete (runtime shutting down).
    #[error("hashing an entry failed: {0}")]
    Hashing(String),
}

impl ZipError {
    /// Whether producing the body again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, ZipError::Store { source, .. } if source.is_transient())
            || matches!(self, ZipError::Hashing(_))
    }
}

/// One produced entry.
struct Entry {
    index: usize,
    /// Local header, rewritten JPEG header, then the object's segments after its original header.
    pieces: Vec<Bytes>,
    checkpoint: EntryCheckpoint,
}

/// The first `len` bytes of `chunks` in one buffer (zero-copy when the first chunk holds them).
fn contiguous_prefix(chunks: &[Bytes], len: usize) -> Bytes {
    if let Some(first) = chunks.first() {
        if first.len() >= len {
            return first.slice(..len);
        }
    }
    let mut out = Vec::with_capacity(len);
    for c in chunks {
        if out.len() >= len {
            break;
        }
        let take = (len - out.len()).min(c.len());
        out.extend_from_slice(&c[..take]);
    }
    Bytes::from(out)
}

/// The segments of `chunks` from byte `from` on (zero-copy slices).
fn chunks_from(chunks: &[Bytes], from: usize) -> Vec<Bytes> {
    let mut skip = from;
    let mut out = Vec::with_capacity(chunks.len());
    for c in chunks {
        if skip >= c.len() {
            skip -= c.len();
            continue;
        }
        out.push(c.slice(skip..));
        skip = 0;
    }
    out
}

/// CRC-32 of the transformed entry (`header` then `data`) and the md5 hex of the original
/// (`original`), unless `content_md5` already is that md5 (S3 vouched for it through the ETag).
/// CPU-bound: callers run it on the blocking pool.
fn entry_hashes(
    header: &[u8],
    data: &[Bytes],
    original: &[Bytes],
    content_md5: Option<String>,
) -> (u32, String) {
    let mut crc = crc32fast::Hasher::new();
    crc.update(header);
    for c in data {
        crc.update(c);
    }
    let md5 = content_md5.unwrap_or_else(|| {
        let mut h = Md5::new();
        for c in original {
            h.update(c);
        }
        hex::encode(h.finalize())
    });
    (crc.finalize(), md5)
}

/// The zip of one upload, producible from any offset.
pub struct ZipSource<'a, S, R> {
    store: &'a S,
    repo: &'a R,
    bucket: &'a str,
    upload_id: &'a str,
    images: &'a [UploadImage],
    plan: ZipPlan,
    read_ahead: usize,
    checkpoints: Mutex<Vec<Option<EntryCheckpoint>>>,
    failure: Mutex<Option<ZipError>>,
}

impl<'a, S: ObjectStore, R: ImageEntryStore> ZipSource<'a, S, R> {
    /// A source for `images` (ordered by index, with any stored checkpoints); `prefetch_bytes`
    /// bounds the object bytes read ahead of the connection.
    pub fn new(
        store: &'a S,
        repo: &'a R,
        bucket: &'a str,
        upload_id: &'a str,
        images: &'a [UploadImage],
        prefetch_bytes: u64,
    ) -> Result<Self, ZipError> {
        for (i, img) in images.iter().enumerate() {
            if img.index as usize != i {
                return Err(ZipError::Inconsistent(format!(
                    "upload {upload_id}: image entry {i} has index {}",
                    img.index
                )));
            }
        }
        let sizes: Vec<u64> = images.iter().map(|i| i.entry_size).collect();
        let plan = ZipPlan::from_sizes(&sizes, comment_len())?;
        let largest = sizes.iter().copied().max().unwrap_or(1);
        let read_ahead = fetch_concurrency(prefetch_bytes, largest);
        let checkpoints = images
            .iter()
            .zip(plan.entries())
            .map(|(img, pe)| {
                // The repository attaches only checkpoints with the entry's fingerprint.
                img.checkpoint
                    .clone()
                    .filter(|cp| cp.local_header_offset == pe.local_header_offset && cp.index == img.index)
            })
            .collect();
        Ok(Self {
            store,
            repo,
            bucket,
            upload_id,
            images,
            plan,
            read_ahead,
            checkpoints: Mutex::new(checkpoints),
            failure: Mutex::new(None),
        })
    }

    /// Archive length.
    pub fn total_len(&self) -> u64 {
        self.plan.total_len()
    }

    /// The layout.
    pub fn plan(&self) -> &ZipPlan {
        &self.plan
    }

    /// The failure that ended the last body stream, if it was the source's fault.
    pub fn take_failure(&self) -> Option<ZipError> {
        self.failure.lock().ok().and_then(|mut f| f.take())
    }

    fn known_checkpoint(&self, index: usize) -> Option<EntryCheckpoint> {
        self.checkpoints
            .lock()
            .ok()
            .and_then(|c| c.get(index).cloned().flatten())
    }

    fn remember(&self, cp: &EntryCheckpoint) {
        if let Ok(mut c) = self.checkpoints.lock() {
            if let Some(slot) = c.get_mut(cp.index as usize) {
                *slot = Some(cp.clone());
            }
        }
    }

    async fn build_entry(&self, index: usize) -> Result<Entry, ZipError> {
        let img = self
            .images
            .get(index)
            .ok_or_else(|| ZipError::Inconsistent(format!("no image entry {index}")))?;
        let pe = self
            .plan
            .entries()
            .get(index)
            .ok_or_else(|| ZipError::Inconsistent(format!("no planned entry {index}")))?;
        let changed = |what: String| ZipError::Changed {
            key: img.key.clone(),
            what,
        };
        let obj: ObjectChunks = match self
            .store
            .get_object_chunks(self.bucket, &img.key, Some(&img.etag))
            .await
        {
            Ok(o) => o,
            Err(StoreError::Changed { expected, .. }) => {
                return Err(changed(format!("its ETag is no longer {expected}")))
            }
            Err(StoreError::NotFound(_)) => return Err(changed("it was deleted".into())),
            Err(source) => {
                return Err(ZipError::Store {
                    key: img.key.clone(),
                    source,
                })
            }
        };
        let size = obj.len();
        if size != img.size {
            return Err(changed(format!("size {size} instead of {}", img.size)));
        }
        // Only the head is rewritten, so only the head is made contiguous; grow it if the marker
        // structure needs more than the first guess.
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let consumed = usize::try_from(img.header_consumed).unwrap_or(usize::MAX);
        let mut want = consumed.max(HEAD_GUESS).min(size);
        let rh = loop {
            let head = contiguous_prefix(&obj.chunks, want);
            match jpeg::rewrite_header(&head, &img.description) {
                Ok(rh) => break rh,
                Err(JpegError::Truncated { needed, .. }) if needed > want && want < size => {
                    want = needed.min(size);
                }
                Err(source) => {
                    return Err(ZipError::Header {
                        key: img.key.clone(),
                        source,
                    })
                }
            }
        };
        if rh.consumed as u64 != img.header_consumed || rh.transformed_len(img.size) != Some(img.entry_size) {
            return Err(changed("its JPEG header differs from the one planned".into()));
        }
        let header = Bytes::from(rh.header);
        let data = chunks_from(&obj.chunks, rh.consumed);
        let (crc32, md5) = {
            let (header, data) = (header.clone(), data.clone());
            let (original, content_md5) = (obj.chunks, obj.content_md5);
            tokio::task::spawn_blocking(move || entry_hashes(&header, &data, &original, content_md5))
                .await
                .map_err(|e| ZipError::Hashing(e.to_string()))?
        };
        let local = zipfmt::local_header(&pe.name, crc32, pe.size)?;
        let mut pieces = Vec::with_capacity(data.len() + 2);
        pieces.push(Bytes::from(local));
        pieces.push(header);
        pieces.extend(data);
        Ok(Entry {
            index,
            pieces,
            checkpoint: EntryCheckpoint {
                index: index as u32,
                crc32,
                md5,
                local_header_offset: pe.local_header_offset,
                fingerprint: img.fingerprint(),
            },
        })
    }

    /// Write the checkpoints arriving on `rx` in batches, one repository call at a time, until the
    /// sender is dropped; then write the rest.
    async fn write_checkpoints(&self, mut rx: mpsc::UnboundedReceiver<EntryCheckpoint>) {
        let mut pending = Vec::new();
        while let Some(cp) = rx.recv().await {
            pending.push(cp);
            if pending.len() >= CHECKPOINT_BATCH {
                self.flush(&mut pending).await;
            }
        }
        self.flush(&mut pending).await;
    }

    async fn flush(&self, pending: &mut Vec<EntryCheckpoint>) {
        if pending.is_empty() {
            return;
        }
        // Checkpoints only save re-reads on resume; losing them costs time, not correctness.
        if let Err(e) = self.repo.save_checkpoints(self.upload_id, pending).await {
            warn!(upload_id = self.upload_id, error = %e, "saving entry checkpoints failed");
        }
        pending.clear();
    }

    /// Produce the archive from `offset` into `tx`. Returns when done, when the receiver is gone,
    /// or with the error that ended the body.
    async fn produce(
        &self,
        offset: u64,
        tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) -> Result<(), ZipError> {
        let n = self.images.len();
        let start = match self.plan.locate(offset) {
            ZipPosition::LocalHeader { index, .. } | ZipPosition::Data { index, .. } => index,
            ZipPosition::Tail { .. } => n,
            ZipPosition::End => return Ok(()),
        };
        debug!(
            upload_id = self.upload_id,
            offset,
            start_entry = start,
            "producing zip body"
        );
        // Fetcher → (one ready entry) → emitter → body channel; emitter → checkpointer.
        let (ready_tx, mut ready_rx) = mpsc::channel::<Result<Entry, ZipError>>(1);
        let (cp_tx, cp_rx) = mpsc::unbounded_channel::<EntryCheckpoint>();
        let fetch = async move {
            // Every GET in flight keeps being polled while a finished entry waits for the ready
            // slot (a `buffered` stream is only polled from `next()`, and hyper stops reading a
            // body nobody polls). At most `read_ahead` entries are in flight or finished here.
            let mut in_flight = FuturesOrdered::new();
            let mut finished: VecDeque<Result<Entry, ZipError>> = VecDeque::new();
            let mut next = start;
            loop {
                while next < n && in_flight.len() + finished.len() < self.read_ahead {
                    in_flight.push_back(self.build_entry(next));
                    next += 1;
                }
                if in_flight.is_empty() && finished.is_empty() {
                    break;
                }
                tokio::select! {
                    permit = ready_tx.reserve(), if !finished.is_empty() => {
                        let (Ok(permit), Some(entry)) = (permit, finished.pop_front()) else {
                            break; // the emitter is gone
                        };
                        let failed = entry.is_err();
                        permit.send(entry);
                        if failed {
                            break;
                        }
                    }
                    Some(entry) = in_flight.next(), if !in_flight.is_empty() => finished.push_back(entry),
                }
            }
        };
        let emit_entries = async move {
            while let Some(entry) = ready_rx.recv().await {
                let entry = entry?;
                self.remember(&entry.checkpoint);
                // The checkpointer outlives this loop; a failed send cannot happen.
                let _ = cp_tx.send(entry.checkpoint.clone());
                let mut pos = self
                    .plan
                    .entries()
                    .get(entry.index)
                    .map(|e| e.local_header_offset)
                    .unwrap_or_default();
                for piece in entry.pieces {
                    let len = piece.len() as u64;
                    if !emit(tx, piece, pos, offset).await {
                        return Ok(false);
                    }
                    pos += len;
                }
            }
            Ok::<bool, ZipError>(true)
        };
        // The checkpointer ends (after its last batch) when the emitter drops its sender.
        let emit_and_checkpoint = async { tokio::join!(emit_entries, self.write_checkpoints(cp_rx)).0 };
        tokio::pin!(fetch, emit_and_checkpoint);
        let mut fetching = true;
        let emitted = loop {
            tokio::select! {
                res = &mut emit_and_checkpoint => break res,
                () = &mut fetch, if fetching => fetching = false,
            }
        };
        if !emitted? {
            // The receiver is gone (connection lost or upload over); checkpoints are written.
            return Ok(());
        }
        let mut pending = Vec::new();

        // The tail: every entry's CRC and the originals' md5s.
        let mut records = Vec::with_capacity(n);
        let mut md5s = Vec::with_capacity(n);
        for (i, pe) in self.plan.entries().iter().enumerate() {
            let cp = match self.known_checkpoint(i) {
                Some(cp) => cp,
                None => {
                    debug!(
                        upload_id = self.upload_id,
                        entry = i,
                        "checkpoint missing: re-reading the object"
                    );
                    let e = self.build_entry(i).await?;
                    self.remember(&e.checkpoint);
                    pending.push(e.checkpoint.clone());
                    e.checkpoint
                }
            };
            records.push(pe.record(cp.crc32));
            md5s.push(cp.md5);
        }
        self.flush(&mut pending).await;
        let comment = zipfmt::archive_comment(&zipfmt::sequence_md5sum(&md5s));
        let tail = zipfmt::central_directory_and_end(&records, &comment)?;
        if tail.len() as u64 != self.plan.tail_len() {
            return Err(ZipError::Inconsistent(format!(
                "tail is {} bytes, planned {}",
                tail.len(),
                self.plan.tail_len()
            )));
        }
        emit(
            tx,
            Bytes::from(tail),
            self.plan.central_directory_offset(),
            offset,
        )
        .await;
        Ok(())
    }

    /// Run `produce` for each body the upload asks for; a new request supersedes the old one.
    async fn drive(&self, mut requests: mpsc::UnboundedReceiver<(u64, BodySender)>) {
        let mut next = requests.recv().await;
        while let Some((offset, tx)) = next.take() {
            let finished = {
                let produce = self.produce(offset, &tx);
                tokio::pin!(produce);
                tokio::select! {
                    res = &mut produce => Some(res),
                    r = requests.recv() => {
                        // Superseded by a new POST (or the upload is over: `None`).
                        next = r;
                        None
                    }
                }
            };
            if let Some(res) = finished {
                if let Err(e) = res {
                    warn!(upload_id = self.upload_id, error = %e, "zip body failed");
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    if let Ok(mut f) = self.failure.lock() {
                        *f = Some(e);
                    }
                }
                drop(tx);
                next = requests.recv().await;
            }
        }
    }
}

type BodySender = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Send the part of `piece` (at archive offset `pos`) at or after `offset`, in chunks.
/// `false` when the receiver is gone.
async fn emit(tx: &BodySender, piece: Bytes, pos: u64, offset: u64) -> bool {
    let end = pos + piece.len() as u64;
    if end <= offset {
        return true;
    }
    let skip = offset.saturating_sub(pos) as usize;
    let mut rest = piece.slice(skip..);
    while !rest.is_empty() {
        let chunk = rest.split_to(rest.len().min(CHUNK));
        if tx.send(Ok(chunk)).await.is_err() {
            return false;
        }
    }
    true
}

/// How an upload attempt ended badly.
#[derive(Debug, thiserror::Error)]
pub enum UploadFailure {
    /// Mapillary (or the connection) failed.
    #[error(transparent)]
    Mapillary(#[from] MapillaryError),
    /// The body could not be produced.
    #[error(transparent)]
    Source(ZipError),
}

/// Upload `source` under `key` with `token`, resuming from the server's offset, in POSTs of at
/// most `limits.max_post_bytes` until complete or until `limits.stop_at` passes between two POSTs.
/// The zip is produced once and streamed: consecutive POSTs read on from the same body.
pub async fn upload_zip<M, S, R>(
    mly: &M,
    source: &ZipSource<'_, S, R>,
    token: &SecretString,
    key: &str,
    limits: UploadLimits,
) -> Result<UploadOutcome, UploadFailure>
where
    M: MapillaryUploads,
    S: ObjectStore,
    R: ImageEntryStore,
{
    let (req_tx, req_rx) = mpsc::unbounded_channel::<(u64, BodySender)>();
    let make_body = move |offset: u64| {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        // The driver lives as long as the upload; a failed send only means the upload is over.
        let _ = req_tx.send((offset, tx));
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
    };
    let upload = mly.upload_until(token, key, source.total_len(), make_body, limits);
    let (res, ()) = tokio::join!(upload, source.drive(req_rx));
    match res {
        Ok(report) => Ok(report),
        Err(e @ MapillaryError::BodySource(_)) => Err(source
            .take_failure()
            .map(UploadFailure::Source)
            .unwrap_or(UploadFailure::Mapillary(e))),
        Err(e) => Err(UploadFailure::Mapillary(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(data: &[u8], sizes: &[usize]) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut at = 0;
        for &s in sizes {
            out.push(Bytes::copy_from_slice(&data[at..at + s]));
            at += s;
        }
        out.push(Bytes::copy_from_slice(&data[at..]));
        out
    }

    #[test]
    fn prefix_and_suffix_of_chunks_cover_exactly_the_object() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let chunks = chunked(&data, &[10, 300, 1, 0, 400]);
        for cut in [0, 5, 10, 11, 310, 311, 711, 999, 1000] {
            assert_eq!(&contiguous_prefix(&chunks, cut)[..], &data[..cut], "prefix {cut}");
            let rest: Vec<u8> = chunks_from(&chunks, cut)
                .iter()
                .flat_map(|c| c.to_vec())
                .collect();
            assert_eq!(rest, &data[cut..], "suffix from {cut}");
        }
        // The zero-copy path: the first chunk holds the prefix.
        let p = contiguous_prefix(&chunks, 4);
        assert_eq!(p.as_ptr(), chunks[0].as_ptr());
    }

    #[test]
    fn hashes_of_chunks_equal_hashes_of_the_whole_and_a_vouched_md5_is_taken_as_is() {
        let original: Vec<u8> = (0..50_000u32).map(|i| (i * 31 % 256) as u8).collect();
        let header = b"new header".to_vec();
        let consumed = 1234;
        let chunks = chunked(&original, &[100, 2000, 7, 30_000]);
        let data = chunks_from(&chunks, consumed);

        let mut whole = header.clone();
        whole.extend_from_slice(&original[consumed..]);
        let want_crc = crc32fast::hash(&whole);
        let want_md5 = hex::encode(Md5::digest(&original));

        // Fallback: hashed here, from the segments.
        let (crc, md5) = entry_hashes(&header, &data, &chunks, None);
        assert_eq!((crc, md5.as_str()), (want_crc, want_md5.as_str()));
        // Fast path: the store's md5 (S3 ETag) is used without hashing; the CRC is still computed.
        let (crc, md5) = entry_hashes(&header, &data, &chunks, Some(want_md5.clone()));
        assert_eq!((crc, md5), (want_crc, want_md5));
        let (_, md5) = entry_hashes(&header, &data, &chunks, Some("f".repeat(32)));
        assert_eq!(md5, "f".repeat(32), "a vouched md5 is not recomputed");
    }

    #[test]
    fn fetch_concurrency_follows_the_budget() {
        // 32 MiB of 5 MiB objects: 6 held = 4 fetching + the ready slot + the one being sent.
        assert_eq!(fetch_concurrency(32 << 20, 5 << 20), 4);
        assert_eq!(fetch_concurrency(15 << 20, 5 << 20), 1);
        assert_eq!(fetch_concurrency(1, 5 << 20), 1);
        assert_eq!(fetch_concurrency(u64::MAX, 1), 32);
        assert_eq!(fetch_concurrency(10, 0), 8);
    }
}
