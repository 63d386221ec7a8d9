//! An S3 server in this process: the `s3s` protocol crate (HTTP, SigV4, XML, ranges) over the
//! `s3s-fs` file-system backend, served by hyper on a loopback port.
//!
//! Why not moto for this: moto answers S3 requests one at a time in one Python thread and reads
//! the whole object for every GET, ranged or not, so a bench on moto measures moto. s3s answers
//! requests in parallel on tokio, like S3's front ends.
//!
//! `s3s-fs` is used as it is for buckets, PUTs, HEADs and listings, with what a real S3 does
//! differently put right in a thin wrapper ([`BenchFs`]):
//! * **GET reads the bytes asked, nothing more.** s3s-fs's `get_object` seeks to the range but then
//!   reads the file to its end in 4 KiB reads, dropping what lies past the range (a 64 KiB head
//!   read of a 5 MiB object reads all 5 MiB), and ignores `If-Match`. The wrapper serves GETs
//!   itself: the ETag S3 computed at PUT (kept from the PUT's response), a seek to the range and
//!   64 KiB reads of just that range, `If-Match` honoured (the function's fetcher sends it).
//! * **Listings carry the ETag**, which S3 always returns and the function requires; s3s-fs leaves
//!   it out, the wrapper adds the one kept from the PUT.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use integration_tests::stack;
use s3s::dto::{
    CreateBucketInput, CreateBucketOutput, ETag, GetObjectInput, GetObjectOutput, HeadObjectInput,
    HeadObjectOutput, ListObjectsV2Input, ListObjectsV2Output, PutObjectInput, PutObjectOutput,
    StreamingBlob, Timestamp,
};
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;

/// Read size of GET bodies (s3s-fs reads 4 KiB at a time).
const READ_CHUNK: usize = 64 * 1024;

/// The server; stops accepting when dropped.
pub struct S3sFs {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl S3sFs {
    /// Serves the objects under `root` (`<root>/<bucket>/<key>`) on `127.0.0.1:<free port>`,
    /// accepting the local stack's credentials (SigV4 checked, as S3 does).
    pub async fn start(root: &Path) -> Result<Self> {
        let fs = s3s_fs::FileSystem::new(root)
            .map_err(|e| anyhow::anyhow!("s3s-fs at {}: {e:?}", root.display()))?;
        let wrapper = BenchFs {
            fs,
            root: root.to_path_buf(),
            etags: Arc::default(),
        };
        let mut builder = s3s::service::S3ServiceBuilder::new(wrapper);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(
            stack::ACCESS_KEY_ID,
            stack::SECRET_ACCESS_KEY,
        ));
        let service = builder.build();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the s3s-fs listener")?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let service = service.clone();
                tokio::spawn(async move {
                    let _ = socket.set_nodelay(true);
                    // A connection ends with an error when the client drops it; nothing to report.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, task })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// s3s-fs with GETs of the bytes asked and ETags in listings (see the module comment).
struct BenchFs {
    fs: s3s_fs::FileSystem,
    root: PathBuf,
    /// `(bucket, key)` → the ETag (MD5 hex, no quotes) the PUT answered.
    etags: Arc<Mutex<HashMap<(String, String), String>>>,
}

impl BenchFs {
    fn etag(&self, bucket: &str, key: &str) -> Option<String> {
        let map = match self.etags.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.get(&(bucket.to_string(), key.to_string())).cloned()
    }

    /// `<root>/<bucket>/<key>`; keys with `..`, root or prefix components are refused.
    fn object_path(&self, bucket: &str, key: &str) -> S3Result<PathBuf> {
        let rel = Path::new(bucket).join(key);
        if rel.components().all(|c| matches!(c, Component::Normal(_))) {
            Ok(self.root.join(rel))
        } else {
            Err(s3_error!(
                InvalidArgument,
                "key {key:?} is not a plain relative path"
            ))
        }
    }
}

#[async_trait::async_trait]
impl S3 for BenchFs {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        self.fs.create_bucket(req).await
    }

    async fn head_object(&self, req: S3Request<HeadObjectInput>) -> S3Result<S3Response<HeadObjectOutput>> {
        self.fs.head_object(req).await
    }

    async fn put_object(&self, req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        let resp = self.fs.put_object(req).await?;
        let etag = resp
            .output
            .e_tag
            .as_ref()
            .map(|e| e.value().to_string())
            .ok_or_else(|| s3_error!(InternalError, "s3s-fs answered the PUT of {key} without an ETag"))?;
        let mut map = match self.etags.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.insert((bucket, key), etag);
        Ok(resp)
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let bucket = req.input.bucket.clone();
        let mut resp = self.fs.list_objects_v2(req).await?;
        for o in resp.output.contents.iter_mut().flatten() {
            if let Some(key) = &o.key {
                o.e_tag = self.etag(&bucket, key).map(ETag::Strong);
            }
        }
        Ok(resp)
    }

    async fn get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        let input = req.input;
        let etag = self
            .etag(&input.bucket, &input.key)
            .ok_or_else(|| s3_error!(NoSuchKey))?;
        // `*` matches any existing object; otherwise the ETag must be this one.
        if let Some(cond) = &input.if_match {
            if cond.as_etag().is_some_and(|want| want.value() != etag) {
                return Err(s3_error!(PreconditionFailed));
            }
        }
        let path = self.object_path(&input.bucket, &input.key)?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|_| s3_error!(NoSuchKey))?;
        let meta = file
            .metadata()
            .await
            .map_err(|e| s3_error!(InternalError, "{e}"))?;
        let size = meta.len();
        let (start, end, content_range) = match &input.range {
            None => (0, size, None),
            Some(range) => {
                let r = range.check(size)?;
                (
                    r.start,
                    r.end,
                    Some(format!("bytes {}-{}/{size}", r.start, r.end.saturating_sub(1))),
                )
            }
        };
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| s3_error!(InternalError, "{e}"))?;
        let body = tokio_util::io::ReaderStream::with_capacity(file.take(end - start), READ_CHUNK);
        let last_modified = meta.modified().ok().map(Timestamp::from);
        let output = GetObjectOutput {
            body: Some(StreamingBlob::wrap(body)),
            content_length: Some(i64::try_from(end - start).map_err(|e| s3_error!(InternalError, "{e}"))?),
            content_range,
            e_tag: Some(ETag::Strong(etag)),
            last_modified,
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }
}
