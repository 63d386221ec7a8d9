//! A user's Mapillary token during one invocation (zip-and-push) or one run (poller):
//! [`TokenSession`], over the [`TokenStore`] and [`MapillaryAuth`] ports.
//!
//! * The token is loaded from the store; no record means the account is not connected.
//! * It is refreshed when it expires within the caller's margin ([`TokenSession::ensure_fresh`]), and
//!   after a 401 ([`TokenSession::call`], [`TokenSession::on_unauthorized`]) — at most once per
//!   session: a token already refreshed in this invocation that is still refused is refused for good
//!   (no refresh loops, whatever the number of calls).
//! * The refresh sends the stored refresh token, else the access token (what JOSM does; Mapillary
//!   issues no separate refresh token today). The new token is saved; a failed save is logged and the
//!   new token still used, since the old one may already be invalid.
//! * The Mapillary user id comes from the token record, else a hint (e.g. a tracking record's), else
//!   `/me` (then saved back to the record).
//!
//! [`TokenSession::refresh`] is the only place a refresh happens, so turning it into a
//! compare-and-set on the token record (re-read first; the loser of a race uses the winner's token)
//! changes that one method.

use std::future::Future;
use std::time::Duration;

use secrecy::SecretString;
use time::OffsetDateTime;
use tracing::{info, warn};

use super::error::MapillaryError;
use super::replies::{bad_reply, token_expiry};
use crate::model::StoredToken;
use crate::ports::{MapillaryAuth, TokenError, TokenStore};

/// "Now", injectable: the poller's clock follows the simulator's frozen clock in tests.
pub trait Now: Send + Sync {
    /// The current time.
    fn now(&self) -> OffsetDateTime;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Now for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// Why a user's token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No token record: the user must connect the account.
    #[error("no Mapillary token: connect the account")]
    Missing,
    /// The token store failed (or the record cannot be decrypted).
    #[error("token store: {0}")]
    Store(TokenError),
    /// Mapillary refused the refresh or `/me`.
    #[error("Mapillary: {0}")]
    Mapillary(MapillaryError),
}

impl SessionError {
    /// Whether trying again later may succeed (a transient store failure, a retriable Mapillary
    /// error).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Missing => false,
            Self::Store(e) => e.is_transient(),
            Self::Mapillary(e) => e.is_retriable(),
        }
    }
}

/// Failure of [`TokenSession::call`].
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The call failed: any error but a 401, or a 401 the session's one refresh did not cure.
    #[error("{0}")]
    Call(MapillaryError),
    /// A 401 asked for a refresh, and the refresh failed.
    #[error("{0}")]
    Refresh(SessionError),
}

/// What the sessions of an invocation share: the ports, the refresh margin and the clock.
pub struct SessionContext<'a, T, A> {
    /// Where tokens are loaded from and saved to.
    pub store: &'a T,
    /// Refresh and `/me`.
    pub auth: &'a A,
    /// Refresh a token that expires within this (`RELAY_TOKEN_REFRESH_MARGIN_S`).
    pub refresh_margin: Duration,
    /// The current time.
    pub now: &'a dyn Now,
}

impl<T, A> Clone for SessionContext<'_, T, A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T, A> Copy for SessionContext<'_, T, A> {}

impl<'a, T, A> SessionContext<'a, T, A> {
    /// The ports and margin, with the system clock.
    pub fn new(store: &'a T, auth: &'a A, refresh_margin: Duration) -> Self {
        Self {
            store,
            auth,
            refresh_margin,
            now: &SystemClock,
        }
    }

    /// The same with another clock.
    pub fn with_clock(mut self, now: &'a dyn Now) -> Self {
        self.now = now;
        self
    }
}

/// One user's token for one invocation or run.
pub struct TokenSession<'a, T, A> {
    ctx: SessionContext<'a, T, A>,
    user_id: String,
    token: StoredToken,
    refreshed: bool,
}

impl<T, A> std::fmt::Debug for TokenSession<'_, T, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSession")
            .field("user_id", &self.user_id)
            .field("expires_at", &self.token.expires_at)
            .field("refreshed", &self.refreshed)
            .finish_non_exhaustive()
    }
}

impl<'a, T: TokenStore, A: MapillaryAuth> TokenSession<'a, T, A> {
    /// The user's token as stored (not refreshed yet: see [`Self::ensure_fresh`]).
    pub async fn load(ctx: SessionContext<'a, T, A>, user_id: &str) -> Result<Self, SessionError> {
        Self::from_loaded(ctx, user_id, ctx.store.load(user_id).await)
    }

    /// [`Self::load`] from what the store returned (e.g. one result of [`TokenStore::load_many`]).
    pub fn from_loaded(
        ctx: SessionContext<'a, T, A>,
        user_id: &str,
        loaded: Result<Option<StoredToken>, TokenError>,
    ) -> Result<Self, SessionError> {
        match loaded {
            Ok(Some(token)) => Ok(Self {
                ctx,
                user_id: user_id.to_string(),
                token,
                refreshed: false,
            }),
            Ok(None) => Err(SessionError::Missing),
            Err(e) => Err(SessionError::Store(e)),
        }
    }

    /// [`Self::load`], then [`Self::ensure_fresh`].
    pub async fn load_fresh(ctx: SessionContext<'a, T, A>, user_id: &str) -> Result<Self, SessionError> {
        let loaded = ctx.store.load(user_id).await;
        Self::from_loaded_fresh(ctx, user_id, loaded).await
    }

    /// [`Self::from_loaded`], then [`Self::ensure_fresh`].
    pub async fn from_loaded_fresh(
        ctx: SessionContext<'a, T, A>,
        user_id: &str,
        loaded: Result<Option<StoredToken>, TokenError>,
    ) -> Result<Self, SessionError> {
        let mut s = Self::from_loaded(ctx, user_id, loaded)?;
        s.ensure_fresh().await?;
        Ok(s)
    }

    /// Our user id.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The token record as it is now (refreshed or not).
    pub fn token(&self) -> &StoredToken {
        &self.token
    }

    /// The access token.
    pub fn access(&self) -> &SecretString {
        &self.token.access_token
    }

    /// Whether the token was refreshed in this session (then it is not refreshed again).
    pub fn refreshed(&self) -> bool {
        self.refreshed
    }

    /// The token expires within the margin (a token without a known expiry never does).
    pub fn expires_soon(&self) -> bool {
        let margin = time::Duration::try_from(self.ctx.refresh_margin).unwrap_or(time::Duration::HOUR);
        self.token
            .expires_at
            .is_some_and(|e| e - self.ctx.now.now() < margin)
    }

    /// Refresh the token if it expires within the margin.
    pub async fn ensure_fresh(&mut self) -> Result<(), SessionError> {
        if self.expires_soon() {
            info!("token expires soon: refreshing");
            self.refresh().await?;
        }
        Ok(())
    }

    /// Refresh the token now and save it (a failed save is logged; the new token is used anyway).
    /// Counts as this session's one refresh.
    pub async fn refresh(&mut self) -> Result<(), SessionError> {
        let with = self
            .token
            .refresh_token
            .clone()
            .unwrap_or_else(|| self.token.access_token.clone());
        self.refreshed = true;
        let grant = self
            .ctx
            .auth
            .refresh(&with)
            .await
            .map_err(SessionError::Mapillary)?;
        let now = self.ctx.now.now();
        // An absurd lifetime is an error of this refresh (the caller records it), not a token that
        // is never refreshed for its age, nor a panic in the date arithmetic.
        let expires_at = token_expiry(now, grant.expires_in)
            .map_err(|e| SessionError::Mapillary(bad_reply(200, e.to_string()).into()))?;
        self.token.access_token = grant.access_token;
        if grant.refresh_token.is_some() {
            self.token.refresh_token = grant.refresh_token;
        }
        self.token.expires_at = expires_at;
        self.token.updated_at = now;
        if let Err(e) = self.ctx.store.save(&self.user_id, &self.token).await {
            warn!(error = %e, "saving the refreshed token failed; using it anyway");
        }
        info!("token refreshed");
        Ok(())
    }

    /// After a 401: refresh unless this session already did. `Ok(true)` = call again.
    pub async fn on_unauthorized(&mut self) -> Result<bool, SessionError> {
        if self.refreshed {
            return Ok(false);
        }
        info!("Mapillary rejected the token: refreshing once");
        self.refresh().await?;
        Ok(true)
    }

    /// Run `f` with the access token; on a 401, refresh (once per session) and run it again.
    pub async fn call<R, F, Fut>(&mut self, mut f: F) -> Result<R, CallError>
    where
        F: FnMut(SecretString) -> Fut,
        Fut: Future<Output = Result<R, MapillaryError>>,
    {
        loop {
            match f(self.token.access_token.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_unauthorized() => match self.on_unauthorized().await {
                    Ok(true) => {}
                    Ok(false) => return Err(CallError::Call(e)),
                    Err(r) => return Err(CallError::Refresh(r)),
                },
                Err(e) => return Err(CallError::Call(e)),
            }
        }
    }

    /// The user's Mapillary id: from the token record, else `hint`, else `/me` (saved to the record;
    /// a failed save is logged).
    pub async fn mapillary_user_id(&mut self, hint: Option<String>) -> Result<String, SessionError> {
        if let Some(id) = self.token.mapillary_user_id.clone().or(hint) {
            return Ok(id);
        }
        let auth = self.ctx.auth;
        let me = match self.call(|t| async move { auth.me(&t).await }).await {
            Ok(me) => me,
            Err(CallError::Call(e)) => return Err(SessionError::Mapillary(e)),
            Err(CallError::Refresh(r)) => return Err(r),
        };
        info!(mapillary_user_id = %me.id, "Mapillary user id resolved with /me");
        self.token.mapillary_user_id = Some(me.id.clone());
        if self.token.username.is_none() {
            self.token.username = Some(me.username);
        }
        if let Err(e) = self.ctx.store.save(&self.user_id, &self.token).await {
            warn!(error = %e, "saving the Mapillary user id failed");
        }
        Ok(me.id)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Mutex;

    use secrecy::ExposeSecret;
    use time::macros::datetime;

    use super::*;
    use crate::mapillary::client::{Me, TokenGrant};

    const NOW: OffsetDateTime = datetime!(2024-05-01 10:00 UTC);

    struct Frozen;

    impl Now for Frozen {
        fn now(&self) -> OffsetDateTime {
            NOW
        }
    }

    #[derive(Default)]
    struct Store {
        tokens: Mutex<HashMap<String, StoredToken>>,
        saves: AtomicU32,
        fail_saves: AtomicBool,
    }

    impl TokenStore for Store {
        async fn load(&self, user_id: &str) -> Result<Option<StoredToken>, TokenError> {
            Ok(self.tokens.lock().unwrap().get(user_id).cloned())
        }
        async fn save(&self, user_id: &str, token: &StoredToken) -> Result<(), TokenError> {
            self.saves.fetch_add(1, Ordering::SeqCst);
            if self.fail_saves.load(Ordering::SeqCst) {
                return Err(TokenError::Transient("throttled".into()));
            }
            self.tokens.lock().unwrap().insert(user_id.into(), token.clone());
            Ok(())
        }
        async fn delete(&self, user_id: &str) -> Result<bool, TokenError> {
            Ok(self.tokens.lock().unwrap().remove(user_id).is_some())
        }
    }

    /// Accepts only the tokens it granted last (`valid`), hands out `new-<n>`.
    struct Auth {
        valid: Mutex<String>,
        refreshed_with: Mutex<Vec<String>>,
        expires_in: Option<u64>,
        refresh_fails: bool,
    }

    impl Auth {
        fn new(valid: &str) -> Self {
            Self {
                valid: Mutex::new(valid.into()),
                refreshed_with: Mutex::new(Vec::new()),
                expires_in: Some(3600),
                refresh_fails: false,
            }
        }
        fn check(&self, token: &SecretString) -> Result<(), MapillaryError> {
            if *self.valid.lock().unwrap() == token.expose_secret() {
                Ok(())
            } else {
                Err(MapillaryError::Unauthorized {
                    message: "expired".into(),
                })
            }
        }
        fn refreshes(&self) -> Vec<String> {
            self.refreshed_with.lock().unwrap().clone()
        }
    }

    impl MapillaryAuth for Auth {
        async fn refresh(&self, refresh_token: &SecretString) -> Result<TokenGrant, MapillaryError> {
            let mut with = self.refreshed_with.lock().unwrap();
            with.push(refresh_token.expose_secret().to_string());
            if self.refresh_fails {
                return Err(MapillaryError::Server {
                    status: 502,
                    message: "down".into(),
                    retry_after: None,
                });
            }
            let new = format!("new-{}", with.len());
            *self.valid.lock().unwrap() = new.clone();
            Ok(TokenGrant {
                access_token: SecretString::from(new),
                expires_in: self.expires_in,
                token_type: "bearer".into(),
                refresh_token: None,
            })
        }
        async fn me(&self, token: &SecretString) -> Result<Me, MapillaryError> {
            self.check(token)?;
            Ok(Me {
                id: "mly-7".into(),
                username: "ann".into(),
            })
        }
    }

    fn token(access: &str, refresh: Option<&str>, expires_at: Option<OffsetDateTime>) -> StoredToken {
        StoredToken {
            access_token: SecretString::from(access),
            refresh_token: refresh.map(SecretString::from),
            expires_at,
            mapillary_user_id: None,
            username: None,
            updated_at: NOW - time::Duration::days(1),
        }
    }

    fn store_with(t: StoredToken) -> Store {
        let s = Store::default();
        s.tokens.lock().unwrap().insert("u1".into(), t);
        s
    }

    fn ctx<'a>(store: &'a Store, auth: &'a Auth) -> SessionContext<'a, Store, Auth> {
        SessionContext::new(store, auth, Duration::from_secs(3600)).with_clock(&Frozen)
    }

    #[tokio::test]
    async fn a_missing_record_or_a_failing_store_is_reported() {
        let (store, auth) = (Store::default(), Auth::new("a"));
        let e = TokenSession::load(ctx(&store, &auth), "u1").await.unwrap_err();
        assert!(matches!(e, SessionError::Missing));
        assert_eq!(e.to_string(), "no Mapillary token: connect the account");
        let e = TokenSession::from_loaded(
            ctx(&store, &auth),
            "u1",
            Err(TokenError::Transient("slow down".into())),
        )
        .unwrap_err();
        assert!(e.is_transient());
        assert_eq!(e.to_string(), "token store: token store unavailable: slow down");
    }

    #[tokio::test]
    async fn a_token_expiring_within_the_margin_is_refreshed_with_the_refresh_token_and_saved() {
        let store = store_with(token("a", Some("r"), Some(NOW + time::Duration::minutes(5))));
        let auth = Auth::new("a");
        let s = TokenSession::load_fresh(ctx(&store, &auth), "u1").await.unwrap();
        assert_eq!(auth.refreshes(), ["r"]);
        assert_eq!(s.access().expose_secret(), "new-1");
        assert!(s.refreshed());
        let saved = store.tokens.lock().unwrap()["u1"].clone();
        assert_eq!(saved.access_token.expose_secret(), "new-1");
        assert_eq!(
            saved
                .refresh_token
                .as_ref()
                .map(|r| r.expose_secret().to_string()),
            Some("r".into()),
            "kept when the grant has none"
        );
        assert_eq!(saved.expires_at, Some(NOW + time::Duration::hours(1)));
        assert_eq!(saved.updated_at, NOW);
    }

    #[tokio::test]
    async fn a_token_valid_past_the_margin_or_without_expiry_is_not_refreshed() {
        for expires_at in [Some(NOW + time::Duration::hours(2)), None] {
            let store = store_with(token("a", None, expires_at));
            let auth = Auth::new("a");
            let s = TokenSession::load_fresh(ctx(&store, &auth), "u1").await.unwrap();
            assert!(auth.refreshes().is_empty() && !s.refreshed());
        }
    }

    #[tokio::test]
    async fn a_401_refreshes_once_with_the_access_token_and_retries_the_call() {
        let store = store_with(token("old", None, None));
        let auth = Auth::new("valid-elsewhere");
        let mut s = TokenSession::load(ctx(&store, &auth), "u1").await.unwrap();
        let calls = AtomicU32::new(0);
        let (a, c) = (&auth, &calls);
        let me = s
            .call(|t| async move {
                c.fetch_add(1, Ordering::SeqCst);
                a.me(&t).await
            })
            .await
            .unwrap();
        assert_eq!(me.id, "mly-7");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(auth.refreshes(), ["old"]);
        // The refreshed token is refused too: no second refresh, the 401 is returned.
        *auth.valid.lock().unwrap() = "revoked".into();
        let e = s.call(|t| async move { a.me(&t).await }).await.unwrap_err();
        assert!(matches!(e, CallError::Call(ref m) if m.is_unauthorized()), "{e}");
        assert_eq!(auth.refreshes().len(), 1);
        assert!(!s.on_unauthorized().await.unwrap());
    }

    #[tokio::test]
    async fn a_refresh_for_expiry_counts_as_the_sessions_one_refresh() {
        let store = store_with(token("a", None, Some(NOW)));
        let auth = Auth::new("a");
        let mut s = TokenSession::load_fresh(ctx(&store, &auth), "u1").await.unwrap();
        *auth.valid.lock().unwrap() = "revoked".into();
        let a = &auth;
        let e = s.call(|t| async move { a.me(&t).await }).await.unwrap_err();
        assert!(matches!(e, CallError::Call(_)), "{e}");
        assert_eq!(auth.refreshes().len(), 1);
    }

    #[tokio::test]
    async fn a_failed_refresh_after_a_401_is_a_refresh_error() {
        let store = store_with(token("old", None, None));
        let mut auth = Auth::new("other");
        auth.refresh_fails = true;
        let mut s = TokenSession::load(ctx(&store, &auth), "u1").await.unwrap();
        let a = &auth;
        let e = s.call(|t| async move { a.me(&t).await }).await.unwrap_err();
        match e {
            CallError::Refresh(r) => {
                assert!(r.is_transient());
                assert!(r.to_string().starts_with("Mapillary: "), "{r}");
            }
            other => panic!("expected a refresh error, got {other:?}"),
        }
        assert_eq!(store.saves.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_failed_save_after_a_refresh_still_uses_the_new_token() {
        let store = store_with(token("a", None, Some(NOW)));
        store.fail_saves.store(true, Ordering::SeqCst);
        let auth = Auth::new("a");
        let mut s = TokenSession::load_fresh(ctx(&store, &auth), "u1").await.unwrap();
        assert_eq!(store.saves.load(Ordering::SeqCst), 1);
        assert_eq!(s.access().expose_secret(), "new-1");
        let a = &auth;
        assert!(s.call(|t| async move { a.me(&t).await }).await.is_ok());
    }

    #[tokio::test]
    async fn an_absurd_lifetime_is_a_refresh_error_not_an_overflow() {
        // The client rejects such replies already; a grant that gets here anyway (another
        // `MapillaryAuth`) must not become a token that never expires, nor panic.
        for absurd in [u64::MAX, i64::MAX as u64] {
            let store = store_with(token("a", None, Some(NOW)));
            let mut auth = Auth::new("a");
            auth.expires_in = Some(absurd);
            match TokenSession::load_fresh(ctx(&store, &auth), "u1").await {
                Err(SessionError::Mapillary(MapillaryError::BadReply { message, .. })) => {
                    assert!(message.contains("out of range"), "{message}")
                }
                other => panic!(
                    "expected a bad reply, got {:?}",
                    other.map(|s| s.token().expires_at)
                ),
            }
            let mut s = TokenSession::load(ctx(&store, &auth), "u1").await.unwrap();
            assert!(s.refresh().await.is_err());
            // Nothing of the rejected grant was kept or saved.
            assert_eq!(s.token().access_token.expose_secret(), "a");
            assert_eq!(store.saves.load(Ordering::SeqCst), 0);
        }
        let store = store_with(token("a", None, Some(NOW)));
        let mut auth = Auth::new("a");
        auth.expires_in = Some(60);
        let s = TokenSession::load_fresh(ctx(&store, &auth), "u1").await.unwrap();
        assert_eq!(s.token().expires_at, Some(NOW + time::Duration::minutes(1)));
    }

    #[tokio::test]
    async fn the_mapillary_user_id_comes_from_the_record_then_the_hint_then_me_saved_back() {
        let mut t = token("a", None, None);
        t.mapillary_user_id = Some("from-record".into());
        let store = store_with(t);
        let auth = Auth::new("a");
        let mut s = TokenSession::load(ctx(&store, &auth), "u1").await.unwrap();
        assert_eq!(
            s.mapillary_user_id(Some("hint".into())).await.unwrap(),
            "from-record"
        );

        let store = store_with(token("a", None, None));
        let mut s = TokenSession::load(ctx(&store, &auth), "u1").await.unwrap();
        assert_eq!(s.mapillary_user_id(Some("hint".into())).await.unwrap(), "hint");
        assert_eq!(store.saves.load(Ordering::SeqCst), 0);
        assert_eq!(s.mapillary_user_id(None).await.unwrap(), "mly-7");
        let saved = store.tokens.lock().unwrap()["u1"].clone();
        assert_eq!(saved.mapillary_user_id.as_deref(), Some("mly-7"));
        assert_eq!(saved.username.as_deref(), Some("ann"));
    }
}
