//! Mapillary seen from a test: [`RecordingMapillary`] wraps a real [`MapillaryUploads`] +
//! [`MapillaryAuth`] implementation (usually `MapillaryApp` against the offline simulator) and
//! keeps what the upload calls returned, so a test can check how an upload resumed (offsets,
//! POSTs) and how often `finish_upload` ran. It changes no reply: every call goes to the wrapped
//! implementation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use futures::Stream;
use secrecy::SecretString;

use super::lock;
use crate::mapillary::client::{Me, TokenGrant, UploadLimits, UploadOutcome, UploadReport};
use crate::mapillary::error::MapillaryError;
use crate::ports::{BoxError, MapillaryAuth, MapillaryUploads};

/// Wraps a [`MapillaryUploads`] and keeps every [`UploadReport`] it returned (to check resumes),
/// complete and paused apart, and the number of `finish_upload` calls (each one creates a cluster).
#[derive(Debug, Default)]
pub struct RecordingMapillary<M> {
    /// The wrapped implementation.
    pub inner: M,
    /// Reports of completed uploads, in order.
    pub reports: Mutex<Vec<UploadReport>>,
    /// Reports of uploads paused at their stop time, in order.
    pub paused: Mutex<Vec<UploadReport>>,
    /// `finish_upload` calls.
    pub finishes: AtomicU64,
}

impl<M> RecordingMapillary<M> {
    /// Wrap `inner`.
    pub fn new(inner: M) -> Self {
        Self {
            inner,
            reports: Mutex::new(Vec::new()),
            paused: Mutex::new(Vec::new()),
            finishes: AtomicU64::new(0),
        }
    }

    /// A copy of the reports of completed uploads.
    pub fn reports(&self) -> Vec<UploadReport> {
        lock(&self.reports).clone()
    }

    /// A copy of the reports of paused uploads.
    pub fn paused_reports(&self) -> Vec<UploadReport> {
        lock(&self.paused).clone()
    }
}

impl<M: MapillaryAuth> MapillaryAuth for RecordingMapillary<M> {
    async fn refresh(&self, refresh_token: &SecretString) -> Result<TokenGrant, MapillaryError> {
        self.inner.refresh(refresh_token).await
    }

    async fn me(&self, token: &SecretString) -> Result<Me, MapillaryError> {
        self.inner.me(token).await
    }
}

impl<M: MapillaryUploads> MapillaryUploads for RecordingMapillary<M> {
    async fn upload_until<F, S, E>(
        &self,
        token: &SecretString,
        key: &str,
        total_len: u64,
        make_body: F,
        limits: UploadLimits,
    ) -> Result<UploadOutcome, MapillaryError>
    where
        F: FnMut(u64) -> S + Send,
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let r = self
            .inner
            .upload_until(token, key, total_len, make_body, limits)
            .await?;
        match &r {
            UploadOutcome::Complete(report) => lock(&self.reports).push(report.clone()),
            UploadOutcome::Paused(report) => lock(&self.paused).push(report.clone()),
        }
        Ok(r)
    }

    async fn finish_upload(
        &self,
        token: &SecretString,
        handle: &str,
        organization_id: Option<&str>,
    ) -> Result<String, MapillaryError> {
        self.finishes.fetch_add(1, Ordering::Relaxed);
        self.inner.finish_upload(token, handle, organization_id).await
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::mapillary::client::PostRecord;

    /// Reads the whole body from offset 0 and answers with a report of it; `finish_upload`
    /// fails for the handle `"bad"`.
    struct Stub;

    impl MapillaryUploads for Stub {
        async fn upload_until<F, S, E>(
            &self,
            _token: &SecretString,
            key: &str,
            total_len: u64,
            mut make_body: F,
            limits: UploadLimits,
        ) -> Result<UploadOutcome, MapillaryError>
        where
            F: FnMut(u64) -> S + Send,
            S: Stream<Item = Result<Bytes, E>> + Send + 'static,
            E: Into<BoxError>,
        {
            let mut report = UploadReport {
                handle: String::new(),
                total_len,
                offsets_fetched: vec![0],
                posts: Vec::new(),
                retries: 0,
            };
            if limits.stop_at.is_some_and(|s| std::time::Instant::now() >= s) {
                return Ok(UploadOutcome::Paused(report));
            }
            let mut body = Box::pin(make_body(0));
            let mut sent = 0;
            while let Some(chunk) = body.next().await {
                sent += chunk
                    .map_err(|e| MapillaryError::BodySource(e.into().to_string()))?
                    .len() as u64;
            }
            report.handle = format!("h-{key}");
            report.posts.push(PostRecord {
                offset: 0,
                bytes_sent: sent,
                error: None,
            });
            Ok(UploadOutcome::Complete(report))
        }

        async fn finish_upload(
            &self,
            _token: &SecretString,
            handle: &str,
            _organization_id: Option<&str>,
        ) -> Result<String, MapillaryError> {
            match handle {
                "bad" => Err(MapillaryError::BadReply {
                    status: 200,
                    message: "no cluster_id".into(),
                }),
                h => Ok(format!("cluster-of-{h}")),
            }
        }
    }

    #[tokio::test]
    async fn records_upload_reports_and_counts_every_finish_call() {
        let m = RecordingMapillary::new(Stub);
        let token = SecretString::from("t");
        let body =
            |_offset: u64| futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"abc"))]);
        let r = m
            .upload_until(&token, "k", 3, body, UploadLimits::default())
            .await
            .unwrap();
        let UploadOutcome::Complete(r) = r else {
            panic!("the stub completes without a stop time: {r:?}")
        };
        assert_eq!(r.handle, "h-k");
        assert_eq!(m.reports(), vec![r], "the report is kept as returned");
        assert!(m.paused_reports().is_empty());
        // A paused upload is kept apart.
        let limits = UploadLimits {
            stop_at: Some(std::time::Instant::now()),
            ..UploadLimits::default()
        };
        let p = m.upload_until(&token, "k", 3, body, limits).await.unwrap();
        assert!(matches!(p, UploadOutcome::Paused(_)), "{p:?}");
        assert_eq!((m.reports().len(), m.paused_reports().len()), (1, 1));

        // Every call counts, failed ones too (each may have created a cluster).
        assert_eq!(
            m.finish_upload(&token, "h-k", None).await.unwrap(),
            "cluster-of-h-k"
        );
        assert!(m.finish_upload(&token, "bad", None).await.is_err());
        assert_eq!(m.finishes.load(Ordering::Relaxed), 2);
        assert_eq!(m.reports().len(), 1, "finish_upload adds no report");
    }
}
