//! A user's Mapillary token during one invocation (zip-and-push) or one run (poller):
//! [`TokenSession`], over the [`TokenStore`] and [`MapillaryAuth`] ports.
//!
//! * The token record is loaded from the store; no record means the account is not connected.
//! * An OAuth token is refreshed when it expires within the caller's margin
//!   ([`TokenSession::ensure_fresh`]), and after a 401 ([`TokenSession::call`],
//!   [`TokenSession::on_unauthorized`]) — at most once per session: a token already refreshed in this
//!   invocation that is still refused is refused for good (no refresh loops). An upload token
//!   ([`TokenKind::UploadToken`]) is never refreshed.
//! * The refresh is a compare-and-set on the token record ([`TokenSession::refresh`]): the record is
//!   re-read first; a token that changed meanwhile (another session refreshed it, the user
//!   reconnected) is used as it is; otherwise the session takes a short refresh lease on the record
//!   (a conditional write on its revision), so concurrent sessions wait for its result instead of
//!   refreshing too — with `refresh-revokes` semantics a second refresh would revoke the first one's
//!   token. The new token is written on the leased revision: a record deleted meanwhile
//!   (`DELETE /v1/mapillary/connection`) makes the write fail and the session stop — the deletion
//!   wins, the token is never written back.
//! * The refresh sends the stored refresh token, else the access token (what JOSM does; Mapillary
//!   issues no separate refresh token today). A failed write of the new token (store unavailable) is
//!   logged and the new token still used, since the old one may already be invalid.
//! * The Mapillary user id comes from the token record, else a hint (e.g. a tracking record's), else
//!   `/me` (then written back, on the revision read).

use std::future::Future;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;
use tracing::{info, warn};

use super::error::MapillaryError;
use super::replies::{bad_reply, token_expiry};
use crate::model::{CasOutcome, StoredToken, TokenKind, TokenRecord, UploadRefusal};
use crate::ports::{MapillaryAuth, TokenError, TokenStore};

/// How long a refresh lease holds off other sessions (a refresh is one HTTP call).
const REFRESH_LEASE: Duration = Duration::from_secs(30);
/// How often a session waiting for another one's refresh re-reads the record.
const LEASE_POLL: Duration = Duration::from_millis(100);
/// How long a session waits for another one's refresh before giving up (transient).
const LEASE_WAIT: Duration = Duration::from_secs(15);
/// Compare-and-set attempts before giving up (transient): each conflict means another writer won.
const MAX_CAS_ATTEMPTS: u32 = 20;

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
    /// No token record (never connected, or the connection was deleted): the user must connect.
    #[error("no Mapillary token: connect the account")]
    Missing,
    /// The token store failed (or the record cannot be decrypted).
    #[error("token store: {0}")]
    Store(TokenError),
    /// Mapillary refused the refresh or `/me`.
    #[error("Mapillary: {0}")]
    Mapillary(MapillaryError),
    /// An upload token cannot be refreshed: the user hands over a new one.
    #[error("Mapillary refused the upload token and upload tokens cannot be refreshed: hand over a new one")]
    NotRefreshable,
    /// Another session holds the refresh lease and its result did not arrive in time, or the
    /// record kept changing under the compare-and-set.
    #[error("the token record is busy: {0}")]
    Busy(String),
}

impl SessionError {
    /// Whether trying again later may succeed (a transient store failure, a retriable Mapillary
    /// error, a busy record).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Missing | Self::NotRefreshable => false,
            Self::Store(e) => e.is_transient(),
            Self::Mapillary(e) => e.is_retriable(),
            Self::Busy(_) => true,
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
    record: TokenRecord,
    refreshed: bool,
}

impl<T, A> std::fmt::Debug for TokenSession<'_, T, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSession")
            .field("user_id", &self.user_id)
            .field("kind", &self.record.kind)
            .field("expires_at", &self.record.token.expires_at)
            .field("refreshed", &self.refreshed)
            .finish_non_exhaustive()
    }
}

/// Same secret (compared without copying it out of the `SecretString`s).
fn same_token(a: &SecretString, b: &SecretString) -> bool {
    a.expose_secret() == b.expose_secret()
}

impl<'a, T: TokenStore, A: MapillaryAuth> TokenSession<'a, T, A> {
    /// The user's token record as stored (not refreshed yet: see [`Self::ensure_fresh`]).
    pub async fn load(ctx: SessionContext<'a, T, A>, user_id: &str) -> Result<Self, SessionError> {
        let loaded = ctx.store.load_record(user_id).await;
        Self::from_record(ctx, user_id, loaded)
    }

    /// [`Self::load`] from a record the store returned.
    pub fn from_record(
        ctx: SessionContext<'a, T, A>,
        user_id: &str,
        loaded: Result<Option<TokenRecord>, TokenError>,
    ) -> Result<Self, SessionError> {
        match loaded {
            Ok(Some(record)) => Ok(Self {
                ctx,
                user_id: user_id.to_string(),
                record,
                refreshed: false,
            }),
            Ok(None) => Err(SessionError::Missing),
            Err(e) => Err(SessionError::Store(e)),
        }
    }

    /// [`Self::load`] from a token the store returned (e.g. one result of
    /// [`TokenStore::load_many`]). Its kind is taken as OAuth until the record is re-read, which
    /// every write and refresh does first.
    pub fn from_loaded(
        ctx: SessionContext<'a, T, A>,
        user_id: &str,
        loaded: Result<Option<StoredToken>, TokenError>,
    ) -> Result<Self, SessionError> {
        Self::from_record(
            ctx,
            user_id,
            loaded.map(|t| t.map(|t| TokenRecord::new(t, TokenKind::Oauth))),
        )
    }

    /// [`Self::load`], then [`Self::ensure_fresh`].
    pub async fn load_fresh(ctx: SessionContext<'a, T, A>, user_id: &str) -> Result<Self, SessionError> {
        let mut s = Self::load(ctx, user_id).await?;
        s.ensure_fresh().await?;
        Ok(s)
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

    /// The token as it is now (refreshed or not).
    pub fn token(&self) -> &StoredToken {
        &self.record.token
    }

    /// The whole record as last read or written.
    pub fn record(&self) -> &TokenRecord {
        &self.record
    }

    /// The kind of the token in use (logged with every call; never the token).
    pub fn kind(&self) -> TokenKind {
        self.record.kind
    }

    /// The access token.
    pub fn access(&self) -> &SecretString {
        &self.record.token.access_token
    }

    /// Whether the token was refreshed in this session (then it is not refreshed again).
    pub fn refreshed(&self) -> bool {
        self.refreshed
    }

    /// The token expires within the margin (a token without a known expiry never does).
    pub fn expires_soon(&self) -> bool {
        let margin = time::Duration::try_from(self.ctx.refresh_margin).unwrap_or(time::Duration::HOUR);
        self.record
            .token
            .expires_at
            .is_some_and(|e| e - self.ctx.now.now() < margin)
    }

    /// Refresh the token if it expires within the margin.
    pub async fn ensure_fresh(&mut self) -> Result<(), SessionError> {
        if self.expires_soon() {
            info!(
                token_kind = self.kind().as_str(),
                "token expires soon: refreshing"
            );
            self.refresh().await?;
        }
        Ok(())
    }

    async fn reread(&self) -> Result<Option<TokenRecord>, SessionError> {
        self.ctx
            .store
            .load_record(&self.user_id)
            .await
            .map_err(SessionError::Store)
    }

    /// Take `current` as the session's record (its token is used from now on).
    fn adopt(&mut self, current: TokenRecord) {
        self.record = current;
    }

    /// Refresh the token now, as a compare-and-set on the record (see the module docs). Counts as
    /// this session's one refresh. `Ok` means the session holds a token at least as new as the one
    /// it had: its own refresh's, or the one another session or the user wrote meanwhile.
    pub async fn refresh(&mut self) -> Result<(), SessionError> {
        self.refreshed = true;
        let mut waited = Duration::ZERO;
        let mut attempts = 0u32;
        // 1. Re-read; take the lease on the revision read.
        let (leased, revision) = loop {
            attempts += 1;
            if attempts > MAX_CAS_ATTEMPTS {
                return Err(SessionError::Busy("the token record kept changing".into()));
            }
            let Some(current) = self.reread().await? else {
                info!("token record gone (connection deleted): not refreshing");
                return Err(SessionError::Missing);
            };
            if !same_token(&current.token.access_token, &self.record.token.access_token) {
                info!(
                    token_kind = current.kind.as_str(),
                    "the stored token changed (refreshed by another session, or reconnected): using it"
                );
                self.adopt(current);
                return Ok(());
            }
            if current.kind == TokenKind::UploadToken {
                self.adopt(current);
                return Err(SessionError::NotRefreshable);
            }
            let wall = OffsetDateTime::now_utc();
            if current.refresh_lease_until.is_some_and(|until| until > wall) {
                if waited >= LEASE_WAIT {
                    return Err(SessionError::Busy(
                        "another session is refreshing the token and has not finished".into(),
                    ));
                }
                tokio::time::sleep(LEASE_POLL).await;
                waited += LEASE_POLL;
                attempts -= 1;
                continue;
            }
            let mut lease = current.clone();
            lease.refresh_lease_until =
                wall.checked_add(time::Duration::try_from(REFRESH_LEASE).unwrap_or_default());
            match self
                .ctx
                .store
                .replace_if(&self.user_id, &lease, current.revision.as_deref())
                .await
            {
                Ok(CasOutcome::Written(rev)) => break (lease, Some(rev)),
                Ok(CasOutcome::Conflict) => continue,
                Err(e) => {
                    // The store is failing: refresh unleased; the final write is still conditional.
                    warn!(error = %e, "taking the refresh lease failed; refreshing without it");
                    break (current.clone(), current.revision.clone());
                }
            }
        };
        // 2. Refresh with Mapillary.
        let with = leased
            .token
            .refresh_token
            .clone()
            .unwrap_or_else(|| leased.token.access_token.clone());
        // An absurd lifetime is an error of this refresh (the caller records it), not a token that
        // is never refreshed for its age, nor a panic in the date arithmetic.
        let now = self.ctx.now.now();
        let checked = match self.ctx.auth.refresh(&with).await {
            Ok(g) => match token_expiry(now, g.expires_in) {
                Ok(expires_at) => Ok((g, expires_at)),
                Err(e) => Err(bad_reply(200, e.to_string()).into()),
            },
            Err(e) => Err(e),
        };
        let (grant, expires_at) = match checked {
            Ok(x) => x,
            Err(e) => {
                let mut release = leased.clone();
                release.refresh_lease_until = None;
                if let Err(err) = self
                    .ctx
                    .store
                    .replace_if(&self.user_id, &release, revision.as_deref())
                    .await
                {
                    warn!(error = %err, "releasing the refresh lease failed (it expires)");
                }
                return Err(SessionError::Mapillary(e));
            }
        };
        // 3. Write the new token on the leased revision.
        let mut next = leased;
        next.refresh_lease_until = None;
        next.token.access_token = grant.access_token;
        if grant.refresh_token.is_some() {
            next.token.refresh_token = grant.refresh_token;
        }
        next.token.expires_at = expires_at;
        next.token.updated_at = now;
        match self
            .ctx
            .store
            .replace_if(&self.user_id, &next, revision.as_deref())
            .await
        {
            Ok(CasOutcome::Written(rev)) => {
                next.revision = Some(rev);
                self.adopt(next);
                info!("token refreshed");
                Ok(())
            }
            Ok(CasOutcome::Conflict) => match self.reread().await? {
                None => {
                    warn!("the connection was deleted during the refresh: the new token is dropped");
                    Err(SessionError::Missing)
                }
                Some(current) => {
                    info!(
                        token_kind = current.kind.as_str(),
                        "the connection was replaced during the refresh: using the stored token"
                    );
                    self.adopt(current);
                    Ok(())
                }
            },
            Err(e) => {
                warn!(error = %e, "saving the refreshed token failed; using it anyway");
                self.adopt(next);
                Ok(())
            }
        }
    }

    /// After a 401: refresh unless this session already did. `Ok(true)` = call again.
    pub async fn on_unauthorized(&mut self) -> Result<bool, SessionError> {
        if self.refreshed {
            return Ok(false);
        }
        info!(
            token_kind = self.kind().as_str(),
            "Mapillary rejected the token: refreshing once"
        );
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
            match f(self.record.token.access_token.clone()).await {
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

    /// Record that Mapillary refused an upload with this (OAuth) token although the token is valid:
    /// uploads need a user upload token. A compare-and-set on the record: `Ok(false)` when the
    /// stored token changed meanwhile (the user handed over an upload token, or reconnected) — the
    /// session now holds it and the upload may be tried again; `Ok(true)` once recorded.
    pub async fn mark_upload_refused(&mut self, message: &str) -> Result<bool, SessionError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let Some(current) = self.reread().await? else {
                return Err(SessionError::Missing);
            };
            if !same_token(&current.token.access_token, &self.record.token.access_token) {
                self.adopt(current);
                return Ok(false);
            }
            let mut marked = current.clone();
            marked.upload_refused = Some(UploadRefusal {
                at: self.ctx.now.now(),
                message: message.to_string(),
            });
            match self
                .ctx
                .store
                .replace_if(&self.user_id, &marked, current.revision.as_deref())
                .await
                .map_err(SessionError::Store)?
            {
                CasOutcome::Written(rev) => {
                    marked.revision = Some(rev);
                    self.adopt(marked);
                    warn!(
                        token_kind = self.kind().as_str(),
                        "uploads with this OAuth token are refused: connection marked upload_token_required"
                    );
                    return Ok(true);
                }
                CasOutcome::Conflict => continue,
            }
        }
        Err(SessionError::Busy("the token record kept changing".into()))
    }

    /// The user's Mapillary id: from the token record, else `hint`, else `/me` (written back on the
    /// revision read; a failed or lost write is logged).
    pub async fn mapillary_user_id(&mut self, hint: Option<String>) -> Result<String, SessionError> {
        if let Some(id) = self.record.token.mapillary_user_id.clone().or(hint) {
            return Ok(id);
        }
        let auth = self.ctx.auth;
        let me = match self.call(|t| async move { auth.me(&t).await }).await {
            Ok(me) => me,
            Err(CallError::Call(e)) => return Err(SessionError::Mapillary(e)),
            Err(CallError::Refresh(r)) => return Err(r),
        };
        info!(mapillary_user_id = %me.id, "Mapillary user id resolved with /me");
        self.record.token.mapillary_user_id = Some(me.id.clone());
        if self.record.token.username.is_none() {
            self.record.token.username = Some(me.username.clone());
        }
        match self.reread().await {
            Ok(Some(mut current))
                if same_token(&current.token.access_token, &self.record.token.access_token) =>
            {
                current.token.mapillary_user_id = Some(me.id.clone());
                if current.token.username.is_none() {
                    current.token.username = Some(me.username);
                }
                let expected = current.revision.clone();
                match self
                    .ctx
                    .store
                    .replace_if(&self.user_id, &current, expected.as_deref())
                    .await
                {
                    Ok(CasOutcome::Written(rev)) => {
                        current.revision = Some(rev);
                        self.adopt(current);
                    }
                    Ok(CasOutcome::Conflict) => info!("token record changed meanwhile: user id not saved"),
                    Err(e) => warn!(error = %e, "saving the Mapillary user id failed"),
                }
            }
            Ok(_) => info!("token record changed or gone meanwhile: user id not saved"),
            Err(e) => warn!(error = %e, "re-reading the token record failed: user id not saved"),
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

    /// Records in memory with the revision compare-and-set; `saves` counts attempted token writes
    /// (records without a refresh lease that change something besides the lease: taking and
    /// releasing a lease are not saves), `fail_saves` makes every write fail.
    #[derive(Default)]
    struct Store {
        tokens: Mutex<HashMap<String, TokenRecord>>,
        saves: AtomicU32,
        revs: AtomicU32,
        fail_saves: AtomicBool,
    }

    impl Store {
        fn get(&self, user: &str) -> Option<StoredToken> {
            self.tokens.lock().unwrap().get(user).map(|r| r.token.clone())
        }
        fn write(&self, user_id: &str, record: &TokenRecord) -> Result<String, TokenError> {
            let lease_release = self.tokens.lock().unwrap().get(user_id).is_some_and(|cur| {
                let (a, b) = (&cur.token, &record.token);
                cur.refresh_lease_until.is_some()
                    && a.access_token.expose_secret() == b.access_token.expose_secret()
                    && a.refresh_token.as_ref().map(|t| t.expose_secret().to_string())
                        == b.refresh_token.as_ref().map(|t| t.expose_secret().to_string())
                    && (a.expires_at, &a.mapillary_user_id, &a.username, a.updated_at)
                        == (b.expires_at, &b.mapillary_user_id, &b.username, b.updated_at)
                    && (cur.kind, &cur.upload_refused) == (record.kind, &record.upload_refused)
            });
            if record.refresh_lease_until.is_none() && !lease_release {
                self.saves.fetch_add(1, Ordering::SeqCst);
            }
            if self.fail_saves.load(Ordering::SeqCst) {
                return Err(TokenError::Transient("throttled".into()));
            }
            let rev = format!("r{}", self.revs.fetch_add(1, Ordering::SeqCst));
            let mut r = record.clone();
            r.revision = Some(rev.clone());
            self.tokens.lock().unwrap().insert(user_id.into(), r);
            Ok(rev)
        }
    }

    impl TokenStore for Store {
        async fn load_record(&self, user_id: &str) -> Result<Option<TokenRecord>, TokenError> {
            Ok(self.tokens.lock().unwrap().get(user_id).cloned())
        }
        async fn put_record(&self, user_id: &str, record: &TokenRecord) -> Result<String, TokenError> {
            self.write(user_id, record)
        }
        async fn replace_if(
            &self,
            user_id: &str,
            record: &TokenRecord,
            expected: Option<&str>,
        ) -> Result<CasOutcome, TokenError> {
            let current = self
                .tokens
                .lock()
                .unwrap()
                .get(user_id)
                .map(|r| r.revision.clone());
            match current {
                Some(rev) if rev.as_deref() == expected => {
                    self.write(user_id, record).map(CasOutcome::Written)
                }
                _ => Ok(CasOutcome::Conflict),
            }
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
        let mut r = TokenRecord::new(t, TokenKind::Oauth);
        r.revision = Some("r-initial".into());
        s.tokens.lock().unwrap().insert("u1".into(), r);
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
        let saved = store.get("u1").unwrap();
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
        // No token was written, and the lease taken for the refresh is released.
        assert_eq!(
            store.saves.load(Ordering::SeqCst),
            0,
            "a lease release is not a save"
        );
        let rec = store.tokens.lock().unwrap()["u1"].clone();
        assert_eq!(rec.token.access_token.expose_secret(), "old");
        assert!(rec.refresh_lease_until.is_none());
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
            // Nothing of the rejected grant was kept or saved, and the refresh lease was released.
            assert_eq!(s.token().access_token.expose_secret(), "a");
            assert_eq!(store.saves.load(Ordering::SeqCst), 0);
            let stored = store.tokens.lock().unwrap().get("u1").cloned().expect("record");
            assert_eq!(stored.token.access_token.expose_secret(), "a");
            assert_eq!(stored.token.expires_at, Some(NOW));
            assert!(stored.refresh_lease_until.is_none(), "lease released");
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
        let saved = store.get("u1").unwrap();
        assert_eq!(saved.mapillary_user_id.as_deref(), Some("mly-7"));
        assert_eq!(saved.username.as_deref(), Some("ann"));
    }

    /// Auth whose refresh waits for `gate` before answering (to hold a refresh in flight).
    struct SlowAuth {
        inner: Auth,
        gate: tokio::sync::Notify,
        started: tokio::sync::Notify,
    }

    impl MapillaryAuth for SlowAuth {
        async fn refresh(&self, refresh_token: &SecretString) -> Result<TokenGrant, MapillaryError> {
            self.started.notify_one();
            self.gate.notified().await;
            self.inner.refresh(refresh_token).await
        }
        async fn me(&self, token: &SecretString) -> Result<Me, MapillaryError> {
            self.inner.me(token).await
        }
    }

    fn slow(valid: &str) -> SlowAuth {
        SlowAuth {
            inner: Auth::new(valid),
            gate: tokio::sync::Notify::new(),
            started: tokio::sync::Notify::new(),
        }
    }

    #[tokio::test]
    async fn two_sessions_refreshing_at_once_make_one_refresh_and_both_use_its_token() {
        let store = store_with(token("old", None, Some(NOW)));
        let auth = slow("old");
        let c = SessionContext::new(&store, &auth, Duration::from_secs(3600)).with_clock(&Frozen);
        let mut a = TokenSession::load(c, "u1").await.unwrap();
        let mut b = TokenSession::load(c, "u1").await.unwrap();
        let race = async {
            let (ra, rb) = tokio::join!(a.refresh(), b.refresh());
            ra.unwrap();
            rb.unwrap();
        };
        let open_gate = async {
            auth.started.notified().await;
            // Let the other session find the lease and wait on it, then let the refresh answer.
            tokio::time::sleep(Duration::from_millis(250)).await;
            auth.gate.notify_one();
        };
        tokio::join!(race, open_gate);
        assert_eq!(
            auth.inner.refreshes(),
            ["old"],
            "exactly one refresh reached Mapillary"
        );
        assert_eq!(a.access().expose_secret(), "new-1");
        assert_eq!(
            b.access().expose_secret(),
            "new-1",
            "the loser uses the winner's token"
        );
        let rec = store.tokens.lock().unwrap()["u1"].clone();
        assert_eq!(rec.token.access_token.expose_secret(), "new-1");
        assert!(
            rec.refresh_lease_until.is_none(),
            "lease released with the new token"
        );
    }

    #[tokio::test]
    async fn a_delete_during_a_refresh_wins_and_the_new_token_is_not_written_back() {
        let store = store_with(token("old", None, Some(NOW)));
        let auth = slow("old");
        let c = SessionContext::new(&store, &auth, Duration::from_secs(3600)).with_clock(&Frozen);
        let mut a = TokenSession::load(c, "u1").await.unwrap();
        let delete = async {
            auth.started.notified().await;
            assert!(store.delete("u1").await.unwrap());
            auth.gate.notify_one();
        };
        let (res, ()) = tokio::join!(a.refresh(), delete);
        assert!(matches!(res, Err(SessionError::Missing)), "{res:?}");
        assert_eq!(auth.inner.refreshes().len(), 1);
        assert!(store.get("u1").is_none(), "the deleted connection stays deleted");
    }

    #[tokio::test]
    async fn an_upload_token_is_never_refreshed_and_a_refused_oauth_token_is_marked() {
        let store = Store::default();
        let mut r = TokenRecord::new(token("up", None, None), TokenKind::UploadToken);
        r.revision = Some("r0".into());
        store.tokens.lock().unwrap().insert("u1".into(), r);
        let auth = Auth::new("other");
        let mut s = TokenSession::load(ctx(&store, &auth), "u1").await.unwrap();
        assert_eq!(s.kind(), TokenKind::UploadToken);
        let a = &auth;
        let e = s.call(|t| async move { a.me(&t).await }).await.unwrap_err();
        assert!(
            matches!(e, CallError::Refresh(SessionError::NotRefreshable)),
            "{e}"
        );
        assert!(auth.refreshes().is_empty());

        // An OAuth token refused for uploads: marked on the record, unless it changed meanwhile.
        let store = store_with(token("oauth", None, None));
        let mut s = TokenSession::load(ctx(&store, &auth), "u1").await.unwrap();
        assert!(s.mark_upload_refused("not authorized to upload").await.unwrap());
        let rec = store.tokens.lock().unwrap()["u1"].clone();
        assert!(rec.upload_token_required());
        assert_eq!(
            rec.upload_refused.map(|r| r.message).as_deref(),
            Some("not authorized to upload")
        );
        let mut up = TokenRecord::new(token("handed-over", None, None), TokenKind::UploadToken);
        up.revision = Some("r-user".into());
        store.tokens.lock().unwrap().insert("u1".into(), up);
        assert!(!s.mark_upload_refused("again").await.unwrap());
        assert_eq!(s.kind(), TokenKind::UploadToken);
        assert_eq!(s.access().expose_secret(), "handed-over");
        assert!(!store.tokens.lock().unwrap()["u1"].upload_token_required());
    }
}
