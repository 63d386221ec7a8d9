//! [`MapillaryUploads`] over [`MapillaryClient`]: the OAuth client credentials live here so the
//! application only handles user tokens.

use bytes::Bytes;
use futures::Stream;
use secrecy::SecretString;

use crate::mapillary::client::{FileType, MapillaryClient, TokenGrant, UploadReport};
use crate::mapillary::error::MapillaryError;
use crate::ports::{BoxError, MapillaryUploads};

/// Mapillary client plus the app's OAuth client id and secret.
#[derive(Clone)]
pub struct MapillaryAdapter {
    client: MapillaryClient,
    client_id: String,
    client_secret: SecretString,
}

impl std::fmt::Debug for MapillaryAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapillaryAdapter")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl MapillaryAdapter {
    /// Wrap `client` with the app's OAuth credentials (used for the refresh grant).
    pub fn new(client: MapillaryClient, client_id: impl Into<String>, client_secret: SecretString) -> Self {
        Self {
            client,
            client_id: client_id.into(),
            client_secret,
        }
    }

    /// The wrapped client.
    pub fn client(&self) -> &MapillaryClient {
        &self.client
    }
}

impl MapillaryUploads for MapillaryAdapter {
    async fn refresh(&self, refresh_token: &SecretString) -> Result<TokenGrant, MapillaryError> {
        self.client
            .refresh(&self.client_id, &self.client_secret, refresh_token)
            .await
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
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.client
            .upload_resumable(token, key, total_len, make_body)
            .await
    }

    async fn finish_upload(
        &self,
        token: &SecretString,
        handle: &str,
        organization_id: Option<&str>,
    ) -> Result<String, MapillaryError> {
        self.client
            .finish_upload(token, handle, FileType::Zip, organization_id)
            .await
    }
}
