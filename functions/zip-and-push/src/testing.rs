//! Test helpers of this crate's own tests. The in-memory fakes of the AWS ports are in
//! `shared::fakes` (feature `fakes`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use secrecy::SecretString;
use shared::mapillary::client::{Me, TokenGrant, UploadReport};
use shared::mapillary::error::MapillaryError;
use shared::ports::{BoxError, MapillaryAuth, MapillaryUploads};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking test thread poisons the lock; the data is still fine for the others.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Wraps a [`MapillaryUploads`] and keeps every [`UploadReport`] it returned (to check resumes).
#[derive(Debug, Default)]
pub struct RecordingMapillary<M> {
    /// The wrapped implementation.
    pub inner: M,
    /// Reports of successful uploads, in order.
    pub reports: Mutex<Vec<UploadReport>>,
    /// `finish_upload` calls.
    pub finishes: AtomicU64,
}

impl<M> RecordingMapillary<M> {
    /// Wrap `inner`.
    pub fn new(inner: M) -> Self {
        Self {
            inner,
            reports: Mutex::new(Vec::new()),
            finishes: AtomicU64::new(0),
        }
    }

    /// A copy of the reports.
    pub fn reports(&self) -> Vec<UploadReport> {
        lock(&self.reports).clone()
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
    async fn refresh(&self, refresh_token: &SecretString) -> Result<TokenGrant, MapillaryError> {
        self.inner.refresh(refresh_token).await
    }

    async fn upload_resumable<F, S, E>(
        &self,
        token: &SecretString,
        key: &str,
        total_len: u64,
        make_body: F,
    ) -> Result<UploadReport, MapillaryError>
    where
        F: FnMut(u64) -> S + Send,
        S: futures::Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let r = self
            .inner
            .upload_resumable(token, key, total_len, make_body)
            .await?;
        lock(&self.reports).push(r.clone());
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
