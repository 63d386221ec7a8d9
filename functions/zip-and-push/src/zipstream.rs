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
//! `MapillaryClient::upload_resumable` wants a `'static` body stream per POST while the sources
//! here borrow the ports; [`upload_zip`] therefore runs the producer next to the upload in the same
//! task and hands each POST a channel receiver.

use std::sync::Mutex;

use bytes::Bytes;
use futures::StreamExt;
use md5::{Digest, Md5};
use secrecy::SecretString;
use shared::domain::jpeg::{self, JpegError};
use shared::domain::zipfmt::{self, ZipFormatError, ZipPlan, ZipPosition};
use shared::mapillary::client::UploadReport;
use shared::mapillary::retry::MapillaryError;
use shared::model::{EntryCheckpoint, UploadImage};
use shared::ports::{MapillaryUploads, ObjectStore, StoreError, UploadRepository};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Body chunks handed to the HTTP client (zero-copy slices of the objects).
const CHUNK: usize = 256 * 1024;
/// Chunks buffered between producer and connection.
const CHANNEL_CHUNKS: usize = 8;
/// Checkpoints written per repository call.
const CHECKPOINT_BATCH: usize = 25;

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
}

impl ZipError {
    /// Whether producing the body again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, ZipError::Store { source, .. } if source.is_transient())
    }
}

/// One produced entry.
struct Entry {
    index: usize,
    pieces: [Bytes; 3],
    checkpoint: EntryCheckpoint,
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

impl<'a, S: ObjectStore, R: UploadRepository> ZipSource<'a, S, R> {
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
        let largest = sizes.iter().copied().max().unwrap_or(1).max(1);
        let read_ahead = (prefetch_bytes / largest).clamp(1, 32) as usize;
        let checkpoints = images
            .iter()
            .zip(plan.entries())
            .map(|(img, pe)| {
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
        let obj = match self
            .store
            .get_object(self.bucket, &img.key, Some(&img.etag))
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
        if obj.bytes.len() as u64 != img.size {
            return Err(changed(format!(
                "size {} instead of {}",
                obj.bytes.len(),
                img.size
            )));
        }
        let md5 = hex::encode(Md5::digest(&obj.bytes));
        let rh = jpeg::rewrite_header(&obj.bytes, &img.description).map_err(|source| ZipError::Header {
            key: img.key.clone(),
            source,
        })?;
        if rh.consumed as u64 != img.header_consumed || rh.transformed_len(img.size) != Some(img.entry_size) {
            return Err(changed("its JPEG header differs from the one planned".into()));
        }
        let data = obj.bytes.slice(rh.consumed..);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&rh.header);
        crc.update(&data);
        let crc32 = crc.finalize();
        let local = zipfmt::local_header(&pe.name, crc32, pe.size)?;
        Ok(Entry {
            index,
            pieces: [Bytes::from(local), Bytes::from(rh.header), data],
            checkpoint: EntryCheckpoint {
                index: index as u32,
                crc32,
                md5,
                local_header_offset: pe.local_header_offset,
            },
        })
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
        let mut pending = Vec::new();
        let mut entries = futures::stream::iter(start..n)
            .map(|i| self.build_entry(i))
            .buffered(self.read_ahead);
        while let Some(entry) = entries.next().await {
            let entry = entry?;
            self.remember(&entry.checkpoint);
            pending.push(entry.checkpoint.clone());
            if pending.len() >= CHECKPOINT_BATCH {
                self.flush(&mut pending).await;
            }
            let mut pos = self
                .plan
                .entries()
                .get(entry.index)
                .map(|e| e.local_header_offset)
                .unwrap_or_default();
            for piece in entry.pieces {
                let len = piece.len() as u64;
                if !emit(tx, piece, pos, offset).await {
                    self.flush(&mut pending).await;
                    return Ok(());
                }
                pos += len;
            }
        }
        self.flush(&mut pending).await;
        drop(entries);

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

/// Upload `source` under `key` with `token`, resuming from the server's offset.
pub async fn upload_zip<M, S, R>(
    mly: &M,
    source: &ZipSource<'_, S, R>,
    token: &SecretString,
    key: &str,
) -> Result<UploadReport, UploadFailure>
where
    M: MapillaryUploads,
    S: ObjectStore,
    R: UploadRepository,
{
    let (req_tx, req_rx) = mpsc::unbounded_channel::<(u64, BodySender)>();
    let make_body = move |offset: u64| {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        // The driver lives as long as the upload; a failed send only means the upload is over.
        let _ = req_tx.send((offset, tx));
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
    };
    let upload = mly.upload_resumable(token, key, source.total_len(), make_body);
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
