//! [`ObjectStore`] in memory (S3): etags are the md5 of the content, as S3's are for single-part
//! plain and SSE-S3 objects.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use md5::{Digest, Md5};

use super::lock;
use crate::ports::{ObjectBody, ObjectChunks, ObjectInfo, ObjectStore, RangeBody, StoreError};

/// S3 in memory.
#[derive(Debug, Default)]
pub struct MemStore {
    objects: Mutex<BTreeMap<(String, String), (Bytes, String)>>,
    /// Whole-object GETs served.
    pub full_gets: AtomicU64,
    /// Bytes served by ranged GETs.
    pub range_bytes: AtomicU64,
    /// Whether [`ObjectStore::get_object_chunks`] vouches for the md5 of the content (as S3 does
    /// through the ETag of single-part plain/SSE-S3 objects). Off: the caller must hash.
    pub vouch_md5: AtomicBool,
}

/// Segment size of [`MemStore::get_object_chunks`] bodies: odd, so JPEG headers and CRC/md5
/// inputs straddle segment boundaries as they do with real connections.
pub const MEM_CHUNK: usize = 7919;

impl MemStore {
    /// Empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Put an object; returns its etag (md5 hex).
    pub fn put(&self, bucket: &str, key: &str, bytes: impl Into<Bytes>) -> String {
        let bytes = bytes.into();
        let etag = hex::encode(Md5::digest(&bytes));
        lock(&self.objects).insert((bucket.into(), key.into()), (bytes, etag.clone()));
        etag
    }

    /// Remove an object.
    pub fn delete(&self, bucket: &str, key: &str) {
        lock(&self.objects).remove(&(bucket.to_string(), key.to_string()));
    }

    fn get(&self, bucket: &str, key: &str) -> Result<(Bytes, String), StoreError> {
        lock(&self.objects)
            .get(&(bucket.to_string(), key.to_string()))
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("{bucket}/{key}")))
    }
}

impl ObjectStore for MemStore {
    async fn get_range(
        &self,
        bucket: &str,
        key: &str,
        start: u64,
        end: u64,
    ) -> Result<RangeBody, StoreError> {
        let (b, etag) = self.get(bucket, key)?;
        let len = b.len() as u64;
        let s = start.min(len) as usize;
        let e = end.min(len).max(s as u64) as usize;
        self.range_bytes.fetch_add((e - s) as u64, Ordering::Relaxed);
        Ok(RangeBody {
            bytes: b.slice(s..e),
            total_size: len,
            etag,
        })
    }

    async fn get_object(
        &self,
        bucket: &str,
        key: &str,
        if_match: Option<&str>,
    ) -> Result<ObjectBody, StoreError> {
        let (bytes, etag) = self.get(bucket, key)?;
        if let Some(want) = if_match {
            if want != etag {
                return Err(StoreError::Changed {
                    key: key.into(),
                    expected: want.into(),
                });
            }
        }
        self.full_gets.fetch_add(1, Ordering::Relaxed);
        Ok(ObjectBody { bytes, etag })
    }

    async fn get_object_chunks(
        &self,
        bucket: &str,
        key: &str,
        if_match: Option<&str>,
    ) -> Result<ObjectChunks, StoreError> {
        let o = self.get_object(bucket, key, if_match).await?;
        let chunks = (0..o.bytes.len())
            .step_by(MEM_CHUNK)
            .map(|at| o.bytes.slice(at..(at + MEM_CHUNK).min(o.bytes.len())))
            .collect();
        let content_md5 = self.vouch_md5.load(Ordering::Relaxed).then(|| o.etag.clone());
        Ok(ObjectChunks {
            chunks,
            etag: o.etag,
            content_md5,
        })
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        Ok(lock(&self.objects)
            .iter()
            .filter(|((b, k), _)| b == bucket && k.starts_with(prefix))
            .map(|((_, k), (bytes, etag))| ObjectInfo {
                key: k.clone(),
                size: bytes.len() as u64,
                etag: etag.clone(),
            })
            .collect())
    }

    async fn head(&self, bucket: &str, key: &str) -> Result<ObjectInfo, StoreError> {
        let (bytes, etag) = self.get(bucket, key)?;
        Ok(ObjectInfo {
            key: key.into(),
            size: bytes.len() as u64,
            etag,
        })
    }
}
