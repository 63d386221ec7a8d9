//! A user's token during a run: refreshed when it expires within the margin, or once after a 401
//! (as zip-and-push does); the Mapillary user id resolved with `/me` when the token record lacks it,
//! and saved back.

use secrecy::SecretString;
use shared::mapillary::error::MapillaryError;
use shared::model::StoredToken;
use shared::ports::TokenStore;
use tracing::{info, warn};

use crate::handler::Poller;

/// Why a user's token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFail {
    /// No token record: the user must connect the account.
    #[error("no Mapillary token: connect the account")]
    Missing,
    /// The store failed.
    #[error("token store: {0}")]
    Store(String),
    /// Mapillary refused the refresh or `/me`.
    #[error("Mapillary: {0}")]
    Mapillary(#[from] MapillaryError),
}

/// A user's token, loaded once per run.
#[derive(Debug)]
pub struct UserToken {
    /// Our user id.
    pub user_id: String,
    /// The token record.
    pub token: StoredToken,
    /// Refreshed in this run already (refresh at most once per run).
    pub refreshed: bool,
}

impl UserToken {
    /// Load the user's token and refresh it if it expires within the margin.
    pub async fn load<R, U, T: TokenStore, Q>(
        p: &Poller<R, U, T, Q>,
        user_id: &str,
    ) -> Result<Self, TokenFail> {
        Self::from_loaded(p, user_id, p.tokens.load(user_id).await).await
    }

    /// [`Self::load`] from what the token store returned (e.g. from [`TokenStore::load_many`]).
    pub async fn from_loaded<R, U, T: TokenStore, Q>(
        p: &Poller<R, U, T, Q>,
        user_id: &str,
        loaded: Result<Option<StoredToken>, shared::ports::TokenError>,
    ) -> Result<Self, TokenFail> {
        let token = match loaded {
            Ok(Some(t)) => t,
            Ok(None) => return Err(TokenFail::Missing),
            Err(e) => return Err(TokenFail::Store(e.to_string())),
        };
        let mut t = Self {
            user_id: user_id.to_string(),
            token,
            refreshed: false,
        };
        let margin =
            time::Duration::try_from(p.tunables.token_refresh_margin).unwrap_or(time::Duration::HOUR);
        if t.token.expires_at.is_some_and(|e| e - p.clock.now() < margin) {
            info!("token expires soon: refreshing");
            t.refresh(p).await?;
        }
        Ok(t)
    }

    /// The access token.
    pub fn access(&self) -> &SecretString {
        &self.token.access_token
    }

    /// Refresh (once per run) and save the new token.
    pub async fn refresh<R, U, T: TokenStore, Q>(&mut self, p: &Poller<R, U, T, Q>) -> Result<(), TokenFail> {
        let with = self
            .token
            .refresh_token
            .clone()
            .unwrap_or_else(|| self.token.access_token.clone());
        self.refreshed = true;
        let grant = p.api.refresh(&with).await?;
        let now = p.clock.now();
        self.token.access_token = grant.access_token;
        if grant.refresh_token.is_some() {
            self.token.refresh_token = grant.refresh_token;
        }
        self.token.expires_at = grant
            .expires_in
            .map(|s| now + time::Duration::seconds(s.min(i64::MAX as u64) as i64));
        self.token.updated_at = now;
        if let Err(e) = p.tokens.save(&self.user_id, &self.token).await {
            warn!(error = %e, "saving the refreshed token failed; using it for this run");
        }
        info!("token refreshed");
        Ok(())
    }

    /// After a 401: refresh if not done yet in this run. `Ok(true)` = retry the call.
    pub async fn on_unauthorized<R, U, T: TokenStore, Q>(
        &mut self,
        p: &Poller<R, U, T, Q>,
    ) -> Result<bool, TokenFail> {
        if self.refreshed {
            return Ok(false);
        }
        info!("Mapillary rejected the token: refreshing once");
        self.refresh(p).await?;
        Ok(true)
    }

    /// The Mapillary user id: from the token record, else `hint` (a tracking record's), else `/me`
    /// (saved to the token record).
    pub async fn mapillary_user_id<R, U, T: TokenStore, Q>(
        &mut self,
        p: &Poller<R, U, T, Q>,
        hint: Option<String>,
    ) -> Result<String, TokenFail> {
        if let Some(id) = self.token.mapillary_user_id.clone().or(hint) {
            return Ok(id);
        }
        let me = loop {
            match p.api.me(self.access()).await {
                Ok(me) => break me,
                Err(e) if e.is_unauthorized() => {
                    if !self.on_unauthorized(p).await? {
                        return Err(e.into());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        info!(mapillary_user_id = %me.id, "Mapillary user id resolved with /me");
        self.token.mapillary_user_id = Some(me.id.clone());
        if self.token.username.is_none() {
            self.token.username = Some(me.username);
        }
        if let Err(e) = p.tokens.save(&self.user_id, &self.token).await {
            warn!(error = %e, "saving the Mapillary user id failed");
        }
        Ok(me.id)
    }
}
