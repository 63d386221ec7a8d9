//! The baselines the function is measured against: (a) raw GETs, (b) one raw POST, and (c) the raw
//! pipe — both at once, the way the function moves the bytes, with none of its work in between.

use anyhow::{ensure, Result};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use mapillary_sim::defaults;
use shared::adapters::s3::S3ObjectStore;
use shared::ports::{ObjectStore, StoreError};

/// What (a) read.
pub struct Got {
    /// Bytes received.
    pub bytes: u64,
    /// Body segments they arrived in.
    pub segments: usize,
}

/// (a): GETs of `keys` with the adapter call the function's fetcher uses
/// (`S3ObjectStore::get_object_chunks`) and `read_ahead` in flight, bodies dropped as they come.
pub async fn raw_get(store: &S3ObjectStore, bucket: &str, keys: &[String], read_ahead: usize) -> Result<Got> {
    let mut got = Got {
        bytes: 0,
        segments: 0,
    };
    let mut stream = futures::stream::iter(keys)
        .map(|key| store.get_object_chunks(bucket, key, None))
        .buffered(read_ahead.max(1));
    while let Some(o) = stream.next().await {
        let o = o?;
        got.bytes += o.len();
        got.segments += o.chunks.len();
    }
    Ok(got)
}

/// (b): one streamed POST of `len` bytes (1 MiB slices of one buffer) to `<upload_url>/<key>`.
pub async fn raw_post(upload_url: &str, key: &str, len: u64) -> Result<()> {
    let chunk = Bytes::from(vec![0x5Au8; 1024 * 1024]);
    let chunks = len.div_ceil(chunk.len() as u64);
    let body = futures::stream::iter(0..chunks).map(move |i| {
        let rest = len - i * chunk.len() as u64;
        Ok::<_, std::io::Error>(chunk.slice(..(rest.min(chunk.len() as u64) as usize)))
    });
    rupload(upload_url, key, len, reqwest::Body::wrap_stream(body)).await
}

/// (c) the raw pipe: GETs `keys` as (a) does (same call, `read_ahead` in flight, in order) and
/// streams their bodies unchanged, as they arrive, into one rupload POST of `total` bytes to
/// `<upload_url>/<key>`. No EXIF, no zip framing, no checksums, no records: the cost of the
/// function's data path alone, with both ends busy at once as they are in the function.
pub async fn raw_pipe(
    store: S3ObjectStore,
    bucket: String,
    keys: Vec<String>,
    read_ahead: usize,
    upload_url: &str,
    key: &str,
    total: u64,
) -> Result<()> {
    let body = futures::stream::iter(keys)
        .map(move |k| {
            let (store, bucket) = (store.clone(), bucket.clone());
            async move { store.get_object_chunks(&bucket, &k, None).await }
        })
        .buffered(read_ahead.max(1))
        .map_ok(|o| futures::stream::iter(o.chunks.into_iter().map(Ok::<Bytes, StoreError>)))
        .try_flatten();
    rupload(upload_url, key, total, reqwest::Body::wrap_stream(body)).await
}

/// POST `body` (`len` bytes) as a new rupload entity `key`, as the function's first POST does.
async fn rupload(upload_url: &str, key: &str, len: u64, body: reqwest::Body) -> Result<()> {
    let r = reqwest::Client::new()
        .post(format!("{upload_url}/{key}"))
        .header("Authorization", format!("OAuth {}", defaults::DEMO_USER_TOKEN))
        .header("Offset", "0")
        .header("X-Entity-Name", key)
        .header("X-Entity-Length", len.to_string())
        .header("X-Entity-Type", "application/zip")
        .header("Content-Length", len.to_string())
        .body(body)
        .send()
        .await?;
    ensure!(r.status().is_success(), "rupload POST {key}: {}", r.status());
    Ok(())
}
