//! The Mapillary side of an account connection: the consent URL, the code exchange and `/me`
//! (protocol notes §1.2, §1.3, §1.5), over [`MapillaryClient`]. The client secret stays a
//! [`SecretString`] and only leaves through the client's `Authorization` header.

use base64::Engine;
use secrecy::SecretString;
use shared::mapillary::client::MapillaryClient;
use shared::mapillary::client::{Me, TokenGrant};
use shared::mapillary::error::MapillaryError;

/// A fresh `state`: 32 random bytes from the OS-seeded CSPRNG, base64url without padding
/// (43 characters).
pub fn new_state() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Mapillary OAuth for one registered app.
#[derive(Debug, Clone)]
pub struct MapillaryConnector {
    client: MapillaryClient,
    client_id: String,
    client_secret: SecretString,
}

impl MapillaryConnector {
    /// The app `client_id` with its `client_secret`, talking through `client`.
    pub fn new(client: MapillaryClient, client_id: impl Into<String>, client_secret: SecretString) -> Self {
        Self {
            client,
            client_id: client_id.into(),
            client_secret,
        }
    }

    /// `{www}/connect?client_id=…&response_type=code&scope=…&state=…&redirect_uri=…`.
    pub fn authorize_url(
        &self,
        redirect_uri: &str,
        state: &str,
        scope: &str,
    ) -> Result<String, MapillaryError> {
        self.client
            .authorize_url(&self.client_id, redirect_uri, state, Some(scope))
    }

    /// `POST {graph}/token` with the authorization code.
    pub async fn exchange_code(&self, code: &str, redirect_uri: &str) -> Result<TokenGrant, MapillaryError> {
        self.client
            .exchange_code(&self.client_id, &self.client_secret, code, Some(redirect_uri))
            .await
    }

    /// `GET {graph}/me?fields=id,username` with the new user token.
    pub async fn me(&self, token: &SecretString) -> Result<Me, MapillaryError> {
        self.client.me(token).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_long_url_safe_and_distinct() {
        let a = new_state();
        let b = new_state();
        assert_eq!(a.len(), crate::validate::STATE_LEN);
        assert!(crate::validate::state(&a).is_ok());
        assert_ne!(a, b);
    }
}
