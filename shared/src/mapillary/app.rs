//! [`MapillaryApp`]: the relay's registered Mapillary app — a [`MapillaryClient`] plus the app's
//! OAuth client id and secret — and the one place every Mapillary call the relay makes goes
//! through: the account connection (authorize URL, code exchange, `/me`), token refresh, rupload and
//! `finish_upload`, the activity feed, image entities and searches, and coverage tiles.
//!
//! The client secret stays a [`SecretString`] and only leaves through the client's `Authorization`
//! header; the functions handle user tokens only. It implements the [`MapillaryUploads`] and
//! [`MapillaryAuth`] ports, so handlers stay generic and tests can wrap or replace it.

use bytes::Bytes;
use futures::Stream;
use secrecy::SecretString;

use super::client::{
    FileType, Image, MapillaryClient, Me, TokenGrant, UploadLimits, UploadOutcome, UploadReport,
};
use super::error::MapillaryError;
use super::feed::ActivityPage;
use super::retry::RetryPolicy;
use crate::domain::linking::MapillaryImage;
use crate::domain::tiles::{BBox, TileId};
use crate::ports::{BoxError, MapillaryAuth, MapillaryUploads};

/// The Mapillary client with the app's OAuth credentials.
#[derive(Clone)]
pub struct MapillaryApp {
    client: MapillaryClient,
    client_id: String,
    client_secret: SecretString,
}

impl std::fmt::Debug for MapillaryApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapillaryApp")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl MapillaryApp {
    /// The app `client_id` with its `client_secret`, talking through `client`.
    pub fn new(client: MapillaryClient, client_id: impl Into<String>, client_secret: SecretString) -> Self {
        Self {
            client,
            client_id: client_id.into(),
            client_secret,
        }
    }

    /// The same app with another retry policy (tests use [`RetryPolicy::fast`]).
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.client = self.client.with_retry_policy(policy);
        self
    }

    /// The wrapped client.
    pub fn client(&self) -> &MapillaryClient {
        &self.client
    }

    /// The app's OAuth client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    // ---------------------------------------------------------------- OAuth (§1)

    /// The consent page: `{www}/connect?client_id=…&response_type=code&scope=…&state=…&redirect_uri=…`.
    pub fn authorize_url(
        &self,
        redirect_uri: &str,
        state: &str,
        scope: Option<&str>,
    ) -> Result<String, MapillaryError> {
        self.client
            .authorize_url(&self.client_id, redirect_uri, state, scope)
    }

    /// `POST {graph}/token` with an authorization code (§1.3).
    pub async fn exchange_code(
        &self,
        code: &str,
        redirect_uri: Option<&str>,
    ) -> Result<TokenGrant, MapillaryError> {
        self.client
            .exchange_code(&self.client_id, &self.client_secret, code, redirect_uri)
            .await
    }

    /// Refresh grant (§1.4) with the stored refresh token or, when there is none, the access token.
    pub async fn refresh(&self, refresh_token: &SecretString) -> Result<TokenGrant, MapillaryError> {
        self.client
            .refresh(&self.client_id, &self.client_secret, refresh_token)
            .await
    }

    /// The token's user (`GET {graph}/me?fields=id,username`).
    pub async fn me(&self, token: &SecretString) -> Result<Me, MapillaryError> {
        self.client.me(token).await
    }

    // ---------------------------------------------------------------- uploads (§2, §3)

    /// Bytes the server holds for `key` (rupload offset).
    pub async fn fetch_offset(&self, token: &SecretString, key: &str) -> Result<u64, MapillaryError> {
        self.client.fetch_offset(token, key).await
    }

    /// Resumable upload of `total_len` bytes under `key`; see [`MapillaryClient::upload_resumable`].
    pub async fn upload_resumable<F, S, E>(
        &self,
        token: &SecretString,
        key: &str,
        total_len: u64,
        make_body: F,
    ) -> Result<UploadReport, MapillaryError>
    where
        F: FnMut(u64) -> S,
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.client
            .upload_resumable(token, key, total_len, make_body)
            .await
    }

    /// Resumable upload in bounded POSTs until complete or paused; see
    /// [`MapillaryClient::upload_until`].
    pub async fn upload_until<F, S, E>(
        &self,
        token: &SecretString,
        key: &str,
        total_len: u64,
        make_body: F,
        limits: UploadLimits,
    ) -> Result<UploadOutcome, MapillaryError>
    where
        F: FnMut(u64) -> S,
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.client
            .upload_until(token, key, total_len, make_body, limits)
            .await
    }

    /// `finish_upload` of a zip handle → `cluster_id`. Never retried (each call creates a cluster).
    pub async fn finish_upload(
        &self,
        token: &SecretString,
        handle: &str,
        organization_id: Option<&str>,
    ) -> Result<String, MapillaryError> {
        self.client
            .finish_upload(token, handle, FileType::Zip, organization_id)
            .await
    }

    // ---------------------------------------------------------------- graph (§6, §7)

    /// One page of the user's activity feed (`getLatestActivity`), newest first.
    pub async fn feed_page(
        &self,
        token: &SecretString,
        mapillary_user_id: &str,
        first: u32,
        after: Option<&str>,
        hide_after_days: u32,
    ) -> Result<ActivityPage, MapillaryError> {
        self.client
            .latest_activity(token, mapillary_user_id, first, after, hide_after_days)
            .await
    }

    /// An image entity with `fields` (see [`super::client::IMAGE_FIELDS`]).
    pub async fn image(
        &self,
        token: &SecretString,
        image_id: &str,
        fields: &[&str],
    ) -> Result<Image, MapillaryError> {
        self.client.image(token, image_id, fields).await
    }

    /// The sequence id of an image.
    pub async fn image_sequence(
        &self,
        token: &SecretString,
        image_id: &str,
    ) -> Result<String, MapillaryError> {
        let img = self.client.image(token, image_id, &["id", "sequence"]).await?;
        img.sequence.ok_or_else(|| MapillaryError::BadReply {
            status: 200,
            message: format!("image {image_id} has no `sequence`"),
        })
    }

    /// Image ids of a sequence, capture order.
    pub async fn image_ids(
        &self,
        token: &SecretString,
        sequence_id: &str,
    ) -> Result<Vec<String>, MapillaryError> {
        self.client.image_ids(token, sequence_id).await
    }

    /// Image entities by id, `batch` ids per request; see [`MapillaryClient::images`].
    pub async fn images(
        &self,
        token: &SecretString,
        ids: &[String],
        batch: usize,
    ) -> Result<Vec<MapillaryImage>, MapillaryError> {
        self.client.images(token, ids, batch).await
    }

    /// Images in `bbox` captured in `start_ms..=end_ms`; see [`MapillaryClient::search_images`].
    pub async fn search_images(
        &self,
        token: &SecretString,
        bbox: &BBox,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Vec<MapillaryImage>, MapillaryError> {
        self.client.search_images(token, bbox, start_ms, end_ms).await
    }

    /// Every image of `sequence_ids` in one search; see [`MapillaryClient::images_of_sequences`].
    pub async fn images_of_sequences(
        &self,
        token: &SecretString,
        sequence_ids: &[String],
    ) -> Result<Vec<MapillaryImage>, MapillaryError> {
        self.client.images_of_sequences(token, sequence_ids).await
    }

    /// One coverage tile, `None` when it does not exist; see [`MapillaryClient::coverage_tile`].
    pub async fn coverage_tile(
        &self,
        token: &SecretString,
        tile: TileId,
    ) -> Result<Option<Bytes>, MapillaryError> {
        self.client.coverage_tile(token, tile).await
    }
}

impl MapillaryUploads for MapillaryApp {
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
        MapillaryApp::upload_until(self, token, key, total_len, make_body, limits).await
    }

    async fn finish_upload(
        &self,
        token: &SecretString,
        handle: &str,
        organization_id: Option<&str>,
    ) -> Result<String, MapillaryError> {
        MapillaryApp::finish_upload(self, token, handle, organization_id).await
    }
}

impl MapillaryAuth for MapillaryApp {
    async fn refresh(&self, refresh_token: &SecretString) -> Result<TokenGrant, MapillaryError> {
        MapillaryApp::refresh(self, refresh_token).await
    }

    async fn me(&self, token: &SecretString) -> Result<Me, MapillaryError> {
        MapillaryApp::me(self, token).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapillary::Endpoints;

    fn app() -> MapillaryApp {
        MapillaryApp::new(
            MapillaryClient::new(
                Endpoints::under("http://127.0.0.1:9"),
                reqwest::Client::new(),
                RetryPolicy::fast(),
            ),
            "123",
            SecretString::from("app-secret-value"),
        )
    }

    #[test]
    fn debug_output_shows_the_client_id_but_never_the_secret() {
        let dbg = format!("{:?}", app());
        assert!(dbg.contains("123"), "{dbg}");
        assert!(!dbg.contains("app-secret-value"), "{dbg}");
    }

    #[test]
    fn authorize_url_carries_the_app_client_id() {
        let a = app()
            .authorize_url("http://127.0.0.1:8787/cb", "st", Some("read"))
            .expect("url");
        assert!(
            a.starts_with("http://127.0.0.1:9/www/connect?client_id=123&"),
            "{a}"
        );
        let p = app().with_retry_policy(RetryPolicy::default());
        assert_eq!(p.client().policy(), &RetryPolicy::default());
    }
}
