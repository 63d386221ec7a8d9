//! [`ObjectStore`] over S3: ranged and conditional GETs, HEAD, and paginated ListObjectsV2; and
//! [`ObjectWriter`] (the status API's drops): presigned PUTs, PutObject, and deleting a prefix's
//! versions page by page.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectOutput;
use aws_sdk_s3::types::ServerSideEncryption;
use bytes::Bytes;

use super::aws_error::classify;
use crate::ports::{
    ObjectBody, ObjectChunks, ObjectInfo, ObjectStore, ObjectWriter, PresignedPut, RangeBody, StoreError,
};

/// S3 implementation of [`ObjectStore`].
#[derive(Debug, Clone)]
pub struct S3ObjectStore {
    client: aws_sdk_s3::Client,
    page_size: Option<i32>,
}

impl S3ObjectStore {
    /// Wrap a client built once at start-up.
    pub fn new(client: aws_sdk_s3::Client) -> Self {
        Self {
            client,
            page_size: None,
        }
    }

    /// Ask ListObjectsV2 for at most `max_keys` keys per page (default: S3's 1000).
    pub fn with_page_size(mut self, max_keys: i32) -> Self {
        self.page_size = Some(max_keys.max(1));
        self
    }

    /// Whole-object GET, `If-Match` when asked; the body is not read yet.
    async fn send_get(
        &self,
        bucket: &str,
        key: &str,
        if_match: Option<&str>,
    ) -> Result<GetObjectOutput, StoreError> {
        let mut req = self.client.get_object().bucket(bucket).key(key);
        if let Some(etag) = if_match {
            req = req.if_match(format!("\"{}\"", etag.trim_matches('"')));
        }
        match req.send().await {
            Ok(resp) => Ok(resp),
            Err(err) if if_match.is_some() && is_precondition_failed(&err) => Err(StoreError::Changed {
                key: key.to_string(),
                expected: if_match.map(unquote).unwrap_or_default(),
            }),
            Err(err) => Err(store_error(&err, "GetObject", bucket, key)),
        }
    }
}

/// The md5 of the object's bytes when its ETag is documented to be exactly that.
///
/// AWS (S3 User Guide, "Checking object integrity" / `Object.ETag` in the API reference): objects
/// created by PUT Object, POST Object or Copy that are plaintext or encrypted with SSE-S3 have an
/// ETag that is the MD5 digest of their data; with SSE-C, SSE-KMS or DSSE-KMS it is not; objects
/// created by multipart upload or part copy never have an MD5 ETag, and theirs carry a `-<parts>`
/// suffix (so they are not 32 hex digits). Hence: 32 hex digits, and the GET response names no
/// encryption or `AES256` (SSE-S3), and no SSE-C algorithm. Anything else → `None` (hash it).
fn etag_content_md5(
    etag: &str,
    sse: Option<&ServerSideEncryption>,
    sse_customer_algorithm: Option<&str>,
) -> Option<String> {
    let plain_or_sse_s3 = matches!(sse, None | Some(ServerSideEncryption::Aes256));
    let md5_shaped = etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit());
    (plain_or_sse_s3 && sse_customer_algorithm.is_none() && md5_shaped).then(|| etag.to_ascii_lowercase())
}

/// Map an SDK error of an S3 call on `bucket/key` into a [`StoreError`].
fn store_error<E>(err: &SdkError<E, HttpResponse>, op: &str, bucket: &str, key: &str) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let f = classify(err);
    let what = format!("{op} s3://{bucket}/{key}: {}", f.detail);
    if f.has_code("NoSuchKey")
        || f.has_code("NoSuchBucket")
        || f.has_code("NotFound")
        || f.status == Some(404)
    {
        StoreError::NotFound(what)
    } else if f.has_code("AccessDenied") || f.status == Some(403) {
        StoreError::AccessDenied(what)
    } else if f.transient {
        StoreError::Transient(what)
    } else {
        StoreError::Other(what)
    }
}

/// Whether `err` is S3's answer to a range starting at or past the end of the object.
fn is_invalid_range<E>(err: &SdkError<E, HttpResponse>) -> bool
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let f = classify(err);
    f.has_code("InvalidRange") || f.status == Some(416)
}

/// Whether `err` is a failed `If-Match` precondition (S3 412).
fn is_precondition_failed<E>(err: &SdkError<E, HttpResponse>) -> bool
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let f = classify(err);
    f.has_code("PreconditionFailed") || f.status == Some(412)
}

/// ETag without the surrounding quotes S3 puts around it.
fn unquote(etag: &str) -> String {
    etag.trim_matches('"').to_string()
}

fn required_etag(etag: Option<&str>, bucket: &str, key: &str) -> Result<String, StoreError> {
    etag.map(unquote)
        .filter(|e| !e.is_empty())
        .ok_or_else(|| StoreError::Other(format!("s3://{bucket}/{key}: response has no ETag")))
}

fn size_of(size: Option<i64>, bucket: &str, key: &str) -> Result<u64, StoreError> {
    size.and_then(|s| u64::try_from(s).ok())
        .ok_or_else(|| StoreError::Other(format!("s3://{bucket}/{key}: response has no valid size")))
}

/// Total size from a `Content-Range: bytes a-b/total` header (`None` when absent or `*`).
fn total_from_content_range(content_range: &str) -> Option<u64> {
    content_range.rsplit_once('/')?.1.trim().parse().ok()
}

impl ObjectStore for S3ObjectStore {
    async fn get_range(
        &self,
        bucket: &str,
        key: &str,
        start: u64,
        end: u64,
    ) -> Result<RangeBody, StoreError> {
        if start >= end {
            return Err(StoreError::Other(format!(
                "GetObject s3://{bucket}/{key}: empty range {start}..{end}"
            )));
        }
        // HTTP ranges are inclusive: `start..end` is `bytes=start-(end-1)`.
        let range = format!("bytes={start}-{}", end - 1);
        let resp = match self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .range(range)
            .send()
            .await
        {
            Ok(resp) => resp,
            Err(err) if is_invalid_range(&err) => {
                // `start` at or past the end of the object (e.g. a 0-byte object): nothing to read.
                let head = self.head(bucket, key).await?;
                return Ok(RangeBody {
                    bytes: Bytes::new(),
                    total_size: head.size,
                    etag: head.etag,
                });
            }
            Err(err) => return Err(store_error(&err, "GetObject", bucket, key)),
        };
        let etag = required_etag(resp.e_tag(), bucket, key)?;
        let content_range_total = resp.content_range().and_then(total_from_content_range);
        let body = resp.body.collect().await.map_err(|e| {
            StoreError::Transient(format!("GetObject s3://{bucket}/{key}: reading the body: {e}"))
        })?;
        let bytes = body.into_bytes();
        match content_range_total {
            Some(total_size) => Ok(RangeBody {
                bytes,
                total_size,
                etag,
            }),
            None => {
                // No Content-Range: the server answered with the whole object (200); cut the range.
                let total_size = bytes.len() as u64;
                let from = usize::try_from(start.min(total_size))
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                let to = usize::try_from(end.min(total_size))
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                Ok(RangeBody {
                    bytes: bytes.slice(from..to),
                    total_size,
                    etag,
                })
            }
        }
    }

    async fn get_object(
        &self,
        bucket: &str,
        key: &str,
        if_match: Option<&str>,
    ) -> Result<ObjectBody, StoreError> {
        let resp = self.send_get(bucket, key, if_match).await?;
        let etag = required_etag(resp.e_tag(), bucket, key)?;
        let body = resp.body.collect().await.map_err(|e| {
            StoreError::Transient(format!("GetObject s3://{bucket}/{key}: reading the body: {e}"))
        })?;
        Ok(ObjectBody {
            bytes: body.into_bytes(),
            etag,
        })
    }

    async fn get_object_chunks(
        &self,
        bucket: &str,
        key: &str,
        if_match: Option<&str>,
    ) -> Result<ObjectChunks, StoreError> {
        let resp = self.send_get(bucket, key, if_match).await?;
        let etag = required_etag(resp.e_tag(), bucket, key)?;
        let content_md5 = etag_content_md5(
            &etag,
            resp.server_side_encryption(),
            resp.sse_customer_algorithm(),
        );
        // The frames as hyper delivers them: no second buffer, no copy (a 5 MiB object collected
        // into one `Bytes` costs a memcpy and twice its size in memory while it is assembled).
        let mut body = resp.body;
        let mut chunks = Vec::new();
        while let Some(frame) = body.next().await {
            let frame = frame.map_err(|e| {
                StoreError::Transient(format!("GetObject s3://{bucket}/{key}: reading the body: {e}"))
            })?;
            if !frame.is_empty() {
                chunks.push(frame);
            }
        }
        Ok(ObjectChunks {
            chunks,
            etag,
            content_md5,
        })
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut req = self.client.list_objects_v2().bucket(bucket).prefix(prefix);
        if let Some(max_keys) = self.page_size {
            req = req.max_keys(max_keys);
        }
        let mut pages = req.into_paginator().send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|err| store_error(&err, "ListObjectsV2", bucket, prefix))?;
            for object in page.contents() {
                let Some(key) = object.key() else { continue };
                out.push(ObjectInfo {
                    key: key.to_string(),
                    size: size_of(object.size(), bucket, key)?,
                    etag: required_etag(object.e_tag(), bucket, key)?,
                });
            }
        }
        // S3 lists in UTF-8 byte order already; sorting makes the contract independent of the server.
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn head(&self, bucket: &str, key: &str) -> Result<ObjectInfo, StoreError> {
        let resp = self
            .client
            .head_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|err| store_error(&err, "HeadObject", bucket, key))?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: size_of(resp.content_length(), bucket, key)?,
            etag: required_etag(resp.e_tag(), bucket, key)?,
        })
    }
}

/// Keys of one `DeleteObjects` call (S3's limit).
const DELETE_BATCH: usize = 1000;

impl ObjectWriter for S3ObjectStore {
    async fn presign_put(
        &self,
        bucket: &str,
        key: &str,
        content_length: u64,
        content_md5: Option<&str>,
        expires_in: std::time::Duration,
    ) -> Result<PresignedPut, StoreError> {
        let config = aws_sdk_s3::presigning::PresigningConfig::expires_in(expires_in)
            .map_err(|e| StoreError::Other(format!("presigning s3://{bucket}/{key}: {e}")))?;
        let length = i64::try_from(content_length).map_err(|_| {
            StoreError::Other(format!("presigning s3://{bucket}/{key}: length {content_length}"))
        })?;
        let mut req = self
            .client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_length(length);
        if let Some(md5) = content_md5 {
            req = req.content_md5(md5);
        }
        // No flexible checksum: its value would be the checksum of the empty body presigning sees.
        let presigned = req
            .customize()
            .config_override(
                aws_sdk_s3::config::Builder::default().request_checksum_calculation(
                    aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
                ),
            )
            .presigned(config)
            .await
            .map_err(|err| store_error(&err, "presign PutObject", bucket, key))?;
        Ok(PresignedPut {
            url: presigned.uri().to_string(),
            headers: presigned
                .headers()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
                .collect(),
        })
    }

    async fn put_object(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<String, StoreError> {
        let resp = self
            .client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .body(aws_sdk_s3::primitives::ByteStream::from(body))
            .send()
            .await
            .map_err(|err| store_error(&err, "PutObject", bucket, key))?;
        required_etag(resp.e_tag(), bucket, key)
    }

    async fn delete_prefix(&self, bucket: &str, prefix: &str) -> Result<u64, StoreError> {
        use aws_sdk_s3::types::{Delete, ObjectIdentifier};
        let mut deleted = 0u64;
        loop {
            // Always the first page: what was deleted is gone, so each round lists what is left.
            let mut req = self.client.list_object_versions().bucket(bucket).prefix(prefix);
            if let Some(max_keys) = self.page_size {
                req = req.max_keys(max_keys);
            }
            let page = req
                .send()
                .await
                .map_err(|err| store_error(&err, "ListObjectVersions", bucket, prefix))?;
            let mut ids = Vec::new();
            let versions = page
                .versions()
                .iter()
                .map(|v| (v.key(), v.version_id()))
                .chain(page.delete_markers().iter().map(|m| (m.key(), m.version_id())));
            for (key, version) in versions {
                let Some(key) = key.filter(|k| k.starts_with(prefix)) else {
                    continue;
                };
                let id = ObjectIdentifier::builder()
                    .key(key)
                    .set_version_id(version.map(str::to_string))
                    .build()
                    .map_err(|e| StoreError::Other(format!("DeleteObjects s3://{bucket}/{key}: {e}")))?;
                ids.push(id);
            }
            if ids.is_empty() {
                return Ok(deleted);
            }
            for batch in ids.chunks(DELETE_BATCH) {
                let delete = Delete::builder()
                    .set_objects(Some(batch.to_vec()))
                    .quiet(true)
                    .build()
                    .map_err(|e| StoreError::Other(format!("DeleteObjects s3://{bucket}/{prefix}: {e}")))?;
                let out = self
                    .client
                    .delete_objects()
                    .bucket(bucket)
                    .delete(delete)
                    .send()
                    .await
                    .map_err(|err| store_error(&err, "DeleteObjects", bucket, prefix))?;
                if let Some(e) = out.errors().first() {
                    let what = format!(
                        "DeleteObjects s3://{bucket}/{}: {} {}",
                        e.key().unwrap_or_default(),
                        e.code().unwrap_or_default(),
                        e.message().unwrap_or_default()
                    );
                    return Err(match e.code() {
                        Some("AccessDenied") => StoreError::AccessDenied(what),
                        Some("SlowDown") | Some("InternalError") | Some("ServiceUnavailable") => {
                            StoreError::Transient(what)
                        }
                        _ => StoreError::Other(what),
                    });
                }
                deleted += batch.len() as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_total_is_parsed() {
        assert_eq!(total_from_content_range("bytes 0-9/1234"), Some(1234));
        assert_eq!(total_from_content_range("bytes */50"), Some(50));
        assert_eq!(total_from_content_range("bytes 0-9/*"), None);
        assert_eq!(total_from_content_range("garbage"), None);
    }

    #[test]
    fn etag_is_the_md5_only_for_single_part_plain_or_sse_s3_objects() {
        let md5 = "0123456789ABCDEF0123456789abcdef";
        let want = Some(md5.to_ascii_lowercase());
        assert_eq!(etag_content_md5(md5, None, None), want);
        assert_eq!(
            etag_content_md5(md5, Some(&ServerSideEncryption::Aes256), None),
            want
        );
        assert_eq!(
            etag_content_md5(md5, Some(&ServerSideEncryption::AwsKms), None),
            None
        );
        assert_eq!(
            etag_content_md5(md5, Some(&ServerSideEncryption::AwsKmsDsse), None),
            None
        );
        assert_eq!(etag_content_md5(md5, None, Some("AES256")), None, "SSE-C");
        assert_eq!(
            etag_content_md5("0123456789abcdef0123456789abcdef-3", None, None),
            None,
            "multipart"
        );
        assert_eq!(
            etag_content_md5("0123456789abcdef0123456789abcdeg", None, None),
            None
        );
        assert_eq!(etag_content_md5("abc", None, None), None);
    }

    #[test]
    fn etags_lose_their_quotes() {
        assert_eq!(unquote("\"abc\""), "abc");
        assert_eq!(unquote("abc"), "abc");
        assert!(required_etag(Some("\"\""), "b", "k").is_err());
    }
}
