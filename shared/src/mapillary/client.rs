//! HTTP client of Mapillary: OAuth (§1), rupload with resume (§2), `finish_upload` (§3.1), the
//! activity feed (§6.1), graph entities (§7.2–7.3), image searches (§7.4) and coverage tiles (§7.1).
//! `MapillaryApp` (in `app.rs`) adds the app's OAuth credentials; the functions call that.
//!
//! Tokens and client secrets are [`SecretString`]s: they are only exposed to build the
//! `Authorization` header (marked sensitive) or a form field, and never appear in `Debug` output,
//! logs or [`MapillaryError`] messages. Only the upload steps (GET offset, POST bytes) are retried
//! here; `finish_upload` is never retried (each call creates a cluster), and graph reads are single
//! calls whose errors say [`MapillaryError::is_retriable`].

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::header::{HeaderValue, AUTHORIZATION, RETRY_AFTER};
use serde_json::Value;
use tracing::{debug, info, warn};

pub use secrecy::{ExposeSecret, SecretString};

use super::error::MapillaryError;
use super::feed::{self, ActivityPage};
use super::replies::{self as reply, data_images, id_of, number_f64, number_i64};
pub use super::replies::{entity_to_image, TokenGrant, LINK_FIELDS};
use super::retry::{classify_graph, classify_rupload, upload_retry_action, RetryAction, RetryPolicy};
use super::Endpoints;
use crate::domain::linking::MapillaryImage;
use crate::domain::tiles::{BBox, TileId, PUBLIC_TILESET};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the token travels on GraphQL calls (§6: unknown which one Mapillary wants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenTransport {
    /// `Authorization: OAuth <token>` (default).
    #[default]
    Header,
    /// `access_token=<token>` in the query string.
    QueryParam,
}

/// The user behind a token (`/me`, §1.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Me {
    pub id: String,
    pub username: String,
}

/// `file_type` of `finish_upload` (§3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    Zip,
    BundleManifest,
    CammVideo,
    BlackvueVideo,
}

impl FileType {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Zip => "zip",
            Self::BundleManifest => "mly_bundle_manifest",
            Self::CammVideo => "mly_camm_video",
            Self::BlackvueVideo => "mly_blackvue_video",
        }
    }
}

/// One POST of an upload: where it started and how many body bytes the stream handed to the
/// connection (an upper bound of what reached the server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostRecord {
    pub offset: u64,
    pub bytes_sent: u64,
    /// `None` when the POST returned the handle.
    pub error: Option<String>,
}

/// Result of [`MapillaryClient::upload_from`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedPart {
    /// The file handle (`h`).
    pub handle: String,
    pub offset: u64,
    pub bytes_sent: u64,
}

/// Result of [`MapillaryClient::upload_resumable`]: the handle and every step taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadReport {
    /// The file handle for `finish_upload`.
    pub handle: String,
    pub total_len: u64,
    /// Offsets the server reported, in order.
    pub offsets_fetched: Vec<u64>,
    /// Every POST, in order; each starts at the offset fetched just before it.
    pub posts: Vec<PostRecord>,
    /// Failed steps that were retried.
    pub retries: u32,
}

impl UploadReport {
    /// Body bytes handed to the connection over all POSTs.
    pub fn bytes_sent(&self) -> u64 {
        self.posts.iter().map(|p| p.bytes_sent).sum()
    }
}

/// Default bound of one upload POST (64 MiB): at the 51 200 B/s mapillary_tools assumes as the
/// slowest acceptable link it would take 22 minutes, at a Lambda's usual 10–50 MB/s 1–7 s, well
/// inside zip-and-push's default 30 s deadline margin.
pub const DEFAULT_MAX_POST_BYTES: u64 = 64 * 1024 * 1024;

/// How far one [`MapillaryClient::upload_until`] call may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadLimits {
    /// Largest body of one POST. Every POST is a complete request of known length, so a server
    /// commits it whatever it does with interrupted ones.
    pub max_post_bytes: u64,
    /// No new step (offset request, POST or retry wait) starts after this instant; the call then
    /// returns [`UploadOutcome::Paused`]. A POST already started runs to its end.
    pub stop_at: Option<Instant>,
}

impl Default for UploadLimits {
    /// [`DEFAULT_MAX_POST_BYTES`], no stop time.
    fn default() -> Self {
        Self {
            max_post_bytes: DEFAULT_MAX_POST_BYTES,
            stop_at: None,
        }
    }
}

/// How [`MapillaryClient::upload_until`] ended (errors aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadOutcome {
    /// Every byte is stored; the report carries the handle.
    Complete(UploadReport),
    /// The stop time came between two POSTs; the report's handle is empty. Every POST that ended
    /// normally is stored: a later call resumes from the server's offset.
    Paused(UploadReport),
}

/// A GeoJSON point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeoPoint {
    pub lon: f64,
    pub lat: f64,
}

/// The image fields the service reads (§7.3); pass to [`MapillaryClient::image`].
pub const IMAGE_FIELDS: &[&str] = &[
    "id",
    "sequence",
    "captured_at",
    "geometry",
    "altitude",
    "compass_angle",
];

/// An image entity; the typed fields are `None` when not requested or not sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub id: String,
    /// Sequence id.
    pub sequence: Option<String>,
    /// Capture time, ms since the epoch.
    pub captured_at_ms: Option<i64>,
    /// Original (uploaded) position.
    pub geometry: Option<GeoPoint>,
    /// Position after Mapillary's processing.
    pub computed_geometry: Option<GeoPoint>,
    pub altitude: Option<f64>,
    pub compass_angle: Option<f64>,
    /// The whole reply, for fields without a typed accessor.
    pub raw: Value,
}

impl Image {
    fn from_json(v: Value) -> Result<Self, MapillaryError> {
        let id = id_of(v.get("id")).ok_or_else(|| bad_reply(200, "image reply has no `id`"))?;
        Ok(Self {
            id,
            sequence: id_of(v.get("sequence")),
            captured_at_ms: v.get("captured_at").and_then(number_i64),
            geometry: point_of(v.get("geometry")),
            computed_geometry: point_of(v.get("computed_geometry")),
            altitude: v.get("altitude").and_then(number_f64),
            compass_angle: v.get("compass_angle").and_then(number_f64),
            raw: v,
        })
    }
}

/// Most results of one image search (Mapillary's maximum and default `limit`).
pub const SEARCH_LIMIT: usize = 2000;

fn point_of(v: Option<&Value>) -> Option<GeoPoint> {
    let c = v?.get("coordinates")?.as_array()?;
    Some(GeoPoint {
        lon: number_f64(c.first()?)?,
        lat: number_f64(c.get(1)?)?,
    })
}

fn bad_reply(status: u16, message: impl Into<String>) -> MapillaryError {
    reply::bad_reply(status, message).into()
}

/// The `Authorization: OAuth <secret>` value, marked sensitive.
fn oauth_header(secret: &SecretString) -> Result<HeaderValue, MapillaryError> {
    let mut v = HeaderValue::from_str(&format!("OAuth {}", secret.expose_secret())).map_err(|_| {
        MapillaryError::InvalidInput("token contains characters not allowed in an HTTP header".into())
    })?;
    v.set_sensitive(true);
    Ok(v)
}

/// Failure recorded by [`CountingBody`] so a broken source is not mistaken for a network error.
type SourceFailure = Arc<Mutex<Option<String>>>;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BodyError(String);

/// Upload body that counts what it hands out and enforces the announced length.
struct CountingBody {
    inner: Pin<Box<dyn Stream<Item = Result<Bytes, BoxError>> + Send>>,
    sent: Arc<AtomicU64>,
    expected: Option<u64>,
    failure: SourceFailure,
    done: bool,
}

impl CountingBody {
    fn fail(&mut self, msg: String) -> Poll<Option<Result<Bytes, BodyError>>> {
        self.done = true;
        if let Ok(mut f) = self.failure.lock() {
            *f = Some(msg.clone());
        }
        Poll::Ready(Some(Err(BodyError(msg))))
    }
}

impl Stream for CountingBody {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                let before = self.sent.load(Ordering::Relaxed);
                let after = before + chunk.len() as u64;
                if let Some(exp) = self.expected.filter(|e| after > *e) {
                    return self.fail(format!("body stream yielded more than the announced {exp} bytes"));
                }
                self.sent.store(after, Ordering::Relaxed);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => self.fail(format!("body stream failed: {e}")),
            Poll::Ready(None) => {
                let sent = self.sent.load(Ordering::Relaxed);
                if let Some(exp) = self.expected.filter(|e| sent != *e) {
                    return self.fail(format!("body stream ended after {sent} of {exp} bytes"));
                }
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The body stream of an upload, shared by the POSTs that read on from it (see [`Window`]).
struct Pump {
    inner: Pin<Box<dyn Stream<Item = Result<Bytes, BoxError>> + Send>>,
    /// The rest of a chunk the previous window split.
    leftover: Option<Bytes>,
}

impl Pump {
    fn new<S, E>(body: S) -> Arc<Mutex<Pump>>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        Arc::new(Mutex::new(Pump {
            inner: Box::pin(body.map(|r| r.map_err(Into::into))),
            leftover: None,
        }))
    }
}

/// The next `remaining` bytes of a [`Pump`]: the body of one bounded POST. A chunk that crosses
/// the window's end is split and its rest kept for the next window.
struct Window {
    pump: Arc<Mutex<Pump>>,
    remaining: u64,
}

impl Stream for Window {
    type Item = Result<Bytes, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let pump = self.pump.clone();
        let Ok(mut p) = pump.lock() else {
            return Poll::Ready(Some(Err("upload body pump poisoned".into())));
        };
        let chunk = match p.leftover.take() {
            Some(c) => c,
            None => match p.inner.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(c))) => c,
                other => return other,
            },
        };
        let mut chunk = chunk;
        if chunk.len() as u64 > self.remaining {
            // `remaining` < chunk length, so it fits a usize.
            let rest = chunk.split_off(self.remaining as usize);
            p.leftover = Some(rest);
        }
        self.remaining -= chunk.len() as u64;
        Poll::Ready(Some(Ok(chunk)))
    }
}

/// Client of Mapillary's graph API, rupload and OAuth endpoints.
#[derive(Debug, Clone)]
pub struct MapillaryClient {
    endpoints: Endpoints,
    http: reqwest::Client,
    policy: RetryPolicy,
    graphql_token: TokenTransport,
}

impl MapillaryClient {
    /// A client for `endpoints`. `http` should not follow redirects blindly and may carry a
    /// connect timeout; per-request timeouts come from `policy`.
    pub fn new(endpoints: Endpoints, http: reqwest::Client, policy: RetryPolicy) -> Self {
        Self {
            endpoints,
            http,
            policy,
            graphql_token: TokenTransport::Header,
        }
    }

    /// The same client with another retry policy.
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Send the token of GraphQL calls as a header (default) or as `access_token`.
    pub fn with_graphql_token_transport(mut self, transport: TokenTransport) -> Self {
        self.graphql_token = transport;
        self
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    fn url(base: &str, segments: &[&str]) -> Result<reqwest::Url, MapillaryError> {
        let mut url = reqwest::Url::parse(base)
            .map_err(|e| MapillaryError::InvalidInput(format!("endpoint {base:?} is not a URL: {e}")))?;
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|_| MapillaryError::InvalidInput(format!("endpoint {base:?} cannot take a path")))?;
            path.pop_if_empty();
            path.extend(segments);
        }
        Ok(url)
    }

    // ---------------------------------------------------------------- OAuth (§1)

    /// The consent page URL (`{www}/connect`, §1.2); `redirect_uri` goes last as JOSM sends it.
    pub fn authorize_url(
        &self,
        client_id: &str,
        redirect_uri: &str,
        state: &str,
        scope: Option<&str>,
    ) -> Result<String, MapillaryError> {
        let mut url = Self::url(&self.endpoints.www, &["connect"])?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("client_id", client_id)
                .append_pair("response_type", "code");
            if let Some(scope) = scope {
                q.append_pair("scope", scope);
            }
            q.append_pair("state", state)
                .append_pair("redirect_uri", redirect_uri);
        }
        Ok(url.into())
    }

    /// Exchange an authorization code for a user token (§1.3). `redirect_uri` is sent when given
    /// (whether Mapillary requires it is unknown).
    pub async fn exchange_code(
        &self,
        client_id: &str,
        client_secret: &SecretString,
        code: &str,
        redirect_uri: Option<&str>,
    ) -> Result<TokenGrant, MapillaryError> {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("client_id", client_id),
            ("code", code),
        ];
        if let Some(r) = redirect_uri {
            form.push(("redirect_uri", r));
        }
        self.token_request(client_secret, &form).await
    }

    /// Refresh (§1.4): JOSM sends the current **access** token as `refresh_token`; pass
    /// [`TokenGrant::refresh_token`] instead if Mapillary issued one.
    pub async fn refresh(
        &self,
        client_id: &str,
        client_secret: &SecretString,
        refresh_token: &SecretString,
    ) -> Result<TokenGrant, MapillaryError> {
        let form = [
            ("grant_type", "refresh_token"),
            ("client_id", client_id),
            ("refresh_token", refresh_token.expose_secret()),
        ];
        self.token_request(client_secret, &form).await
    }

    async fn token_request(
        &self,
        client_secret: &SecretString,
        form: &[(&str, &str)],
    ) -> Result<TokenGrant, MapillaryError> {
        let url = Self::url(&self.endpoints.graph, &["token"])?;
        let req = self
            .http
            .post(url)
            .header(AUTHORIZATION, oauth_header(client_secret)?)
            .form(form)
            .timeout(self.policy.min_request_timeout);
        let v = self.graph_json(req).await?;
        Ok(reply::token_grant(&v)?)
    }

    /// The token's user (`GET {graph}/me?fields=id,username`).
    pub async fn me(&self, token: &SecretString) -> Result<Me, MapillaryError> {
        self.user_at(token, "me").await
    }

    /// Another user by id (`GET {graph}/<id>?fields=id,username`).
    pub async fn user(&self, token: &SecretString, user_id: &str) -> Result<Me, MapillaryError> {
        self.user_at(token, user_id).await
    }

    async fn user_at(&self, token: &SecretString, segment: &str) -> Result<Me, MapillaryError> {
        let v = self
            .graph_get(token, &[segment], &[("fields", "id,username")])
            .await?;
        let id = id_of(v.get("id")).ok_or_else(|| bad_reply(200, "user reply has no `id`"))?;
        let username = v
            .get("username")
            .and_then(Value::as_str)
            .ok_or_else(|| bad_reply(200, "user reply has no `username`"))?
            .to_string();
        Ok(Me { id, username })
    }

    // ---------------------------------------------------------------- rupload (§2)

    /// Bytes the server holds for `key` (`GET {upload}/{key}`; 0 for a new key).
    pub async fn fetch_offset(&self, token: &SecretString, key: &str) -> Result<u64, MapillaryError> {
        let url = Self::url(&self.endpoints.upload, &[key])?;
        let req = self
            .http
            .get(url)
            .header(AUTHORIZATION, oauth_header(token)?)
            .timeout(self.policy.min_request_timeout);
        let resp = req.send().await.map_err(MapillaryError::from_transport)?;
        let (status, retry_after, body) = read_reply(resp).await?;
        if !(200..300).contains(&status) {
            return Err(classify_rupload(
                status,
                retry_after.as_deref(),
                &body,
                SystemTime::now(),
            ));
        }
        Ok(reply::upload_offset(status, &body)?)
    }

    /// One streaming POST of `body` (the file from `offset` on) with `Offset` and `X-Entity-Name`
    /// (§2.3). No retry: see [`Self::upload_resumable`].
    pub async fn upload_from<S, E>(
        &self,
        token: &SecretString,
        key: &str,
        offset: u64,
        body: S,
    ) -> Result<UploadedPart, MapillaryError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let (bytes_sent, res) = self.post_body(token, key, offset, body, None).await;
        let handle = res?.ok_or_else(|| bad_reply(200, "upload reply has no handle `h`"))?;
        Ok(UploadedPart {
            handle,
            offset,
            bytes_sent,
        })
    }

    /// The `(bytes handed out, result)` of one POST; `expected` (the body length) is enforced when
    /// known. The result is the handle `h` when the reply carried one: only the POST that completes
    /// the file is known to return it (older clients read `h` only from their last POST), so a reply
    /// to an intermediate POST may lack it.
    async fn post_body<S, E>(
        &self,
        token: &SecretString,
        key: &str,
        offset: u64,
        body: S,
        expected: Option<u64>,
    ) -> (u64, Result<Option<String>, MapillaryError>)
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let sent = Arc::new(AtomicU64::new(0));
        let failure: SourceFailure = Arc::default();
        let res = async {
            let url = Self::url(&self.endpoints.upload, &[key])?;
            let counting = CountingBody {
                inner: Box::pin(body.map(|r| r.map_err(Into::into))),
                sent: sent.clone(),
                expected,
                failure: failure.clone(),
                done: false,
            };
            let timeout = self.policy.request_timeout(expected.unwrap_or(0));
            let req = self
                .http
                .post(url)
                .header(AUTHORIZATION, oauth_header(token)?)
                .header("Offset", offset.to_string())
                .header("X-Entity-Name", key)
                .body(reqwest::Body::wrap_stream(counting))
                .timeout(timeout);
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    let source = failure.lock().ok().and_then(|f| f.clone());
                    return Err(match source {
                        Some(msg) => MapillaryError::BodySource(msg),
                        None => MapillaryError::from_transport(e),
                    });
                }
            };
            let (status, retry_after, body) = read_reply(resp).await?;
            if !(200..300).contains(&status) {
                return Err(classify_rupload(
                    status,
                    retry_after.as_deref(),
                    &body,
                    SystemTime::now(),
                ));
            }
            Ok(reply::upload_handle_if_any(status, &body)?)
        }
        .await;
        (sent.load(Ordering::Relaxed), res)
    }

    /// Upload a file of `total_len` bytes under `key`, resuming from whatever the server holds, in
    /// POSTs of at most [`DEFAULT_MAX_POST_BYTES`]; see [`Self::upload_until`]. Runs until the file
    /// is complete or the retry budget is spent.
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
        match self
            .upload_until(token, key, total_len, make_body, UploadLimits::default())
            .await?
        {
            UploadOutcome::Complete(report) => Ok(report),
            // Without `stop_at` the loop never pauses.
            UploadOutcome::Paused(report) => Err(bad_reply(
                200,
                format!(
                    "upload paused at {} of {total_len} bytes without a stop time",
                    report.offsets_fetched.last().copied().unwrap_or(0)
                ),
            )),
        }
    }

    /// Upload a file of `total_len` bytes under `key`, resuming from whatever the server holds.
    ///
    /// Each step GETs the offset, then POSTs the next at most [`UploadLimits::max_post_bytes`] bytes
    /// from there, a **complete** request with a body of known length that ends normally: a server
    /// that drops the bytes of an interrupted POST still commits every finished one, and a Lambda
    /// never has to cut a body at its deadline. `make_body(offset)` yields the file from `offset` to
    /// the end; consecutive POSTs read on from the same stream (it is only asked for again after a
    /// failure or when the server reports another offset), so the body is produced once. When the
    /// server already has everything, an empty POST returns the handle. Before each step, a
    /// [`UploadLimits::stop_at`] that has passed ends the call with [`UploadOutcome::Paused`]: the
    /// bytes sent so far are stored and a later call resumes from the server's offset.
    ///
    /// Failures are retried per §2.6 (see [`upload_retry_action`]): exponential backoff with jitter
    /// plus any server-requested wait, 412 at once, at most [`RetryPolicy::max_retries`] failures in
    /// a row without progress. [`MapillaryError::Unauthorized`] is returned at once: refresh the
    /// token and call again. A body stream that fails or has the wrong length ends the upload with
    /// [`MapillaryError::BodySource`].
    pub async fn upload_until<F, S, E>(
        &self,
        token: &SecretString,
        key: &str,
        total_len: u64,
        mut make_body: F,
        limits: UploadLimits,
    ) -> Result<UploadOutcome, MapillaryError>
    where
        F: FnMut(u64) -> S,
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let max_post = limits.max_post_bytes.max(1);
        let mut report = UploadReport {
            handle: String::new(),
            total_len,
            offsets_fetched: Vec::new(),
            posts: Vec::new(),
            retries: 0,
        };
        let mut backoff = self.policy.backoff();
        let mut since_progress = 0u32;
        let mut high_water: Option<u64> = None;
        // The body stream and the file offset it is positioned at, kept between POSTs.
        let mut pump: Option<(u64, Arc<Mutex<Pump>>)> = None;
        loop {
            if limits.stop_at.is_some_and(|s| Instant::now() >= s) {
                info!(
                    key,
                    posts = report.posts.len(),
                    "stop time reached between POSTs: upload paused"
                );
                return Ok(UploadOutcome::Paused(report));
            }
            let step = async {
                let offset = self.fetch_offset(token, key).await?;
                report.offsets_fetched.push(offset);
                if offset > total_len {
                    return Err(bad_reply(
                        200,
                        format!(
                            "server holds {offset} bytes under this key, more than the {total_len} of this \
                             upload (the key was used for other content)"
                        ),
                    ));
                }
                if high_water.is_some_and(|h| offset > h) {
                    backoff = self.policy.backoff();
                    since_progress = 0;
                }
                high_water = Some(high_water.map_or(offset, |h| h.max(offset)));
                let len = (total_len - offset).min(max_post);
                let (sent, res) = if len == 0 {
                    let empty = futures::stream::empty::<Result<Bytes, BoxError>>();
                    self.post_body(token, key, offset, empty, Some(0)).await
                } else {
                    let source = match pump.take() {
                        Some((at, p)) if at == offset => p,
                        _ => Pump::new(make_body(offset)),
                    };
                    let window = Window {
                        pump: source.clone(),
                        remaining: len,
                    };
                    let (sent, res) = self.post_body(token, key, offset, window, Some(len)).await;
                    if res.is_ok() {
                        // The window consumed exactly `len` bytes (enforced): the stream is at the
                        // next POST's offset. After a failure its position is unknown: dropped.
                        pump = Some((offset + len, source));
                    }
                    (sent, res)
                };
                debug!(key, offset, bytes_sent = sent, ok = res.is_ok(), "upload POST");
                report.posts.push(PostRecord {
                    offset,
                    bytes_sent: sent,
                    error: res.as_ref().err().map(ToString::to_string),
                });
                let handle = res?;
                if offset + len < total_len {
                    return Ok(None);
                }
                handle
                    .map(Some)
                    .ok_or_else(|| bad_reply(200, "upload reply has no handle `h`"))
            }
            .await;
            let err = match step {
                Ok(Some(handle)) => {
                    info!(
                        key,
                        total_len,
                        posts = report.posts.len(),
                        retries = report.retries,
                        "upload complete"
                    );
                    report.handle = handle;
                    return Ok(UploadOutcome::Complete(report));
                }
                // A bounded POST ended normally: the next one follows on the same connection.
                Ok(None) => continue,
                Err(e) => e,
            };
            let wait = match upload_retry_action(&err, &self.policy) {
                RetryAction::Stop => return Err(err),
                RetryAction::Immediate => Duration::ZERO,
                RetryAction::Backoff { extra } => backoff.next().unwrap_or(self.policy.max_delay) + extra,
            };
            if since_progress >= self.policy.max_retries {
                return Err(MapillaryError::Exhausted {
                    attempts: report.retries + 1,
                    last: Box::new(err),
                });
            }
            since_progress += 1;
            report.retries += 1;
            warn!(key, error = %err, wait_ms = wait.as_millis() as u64, retry = since_progress, "upload step failed; retrying");
            if limits.stop_at.is_some_and(|s| Instant::now() + wait >= s) {
                info!(key, error = %err, "stop time reached before the retry: upload paused");
                return Ok(UploadOutcome::Paused(report));
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// `POST {graph}/finish_upload` → `cluster_id` (§3.1). **Never retried**: every call creates a
    /// cluster. On error, [`MapillaryError::is_ambiguous`] tells "maybe created" (5xx, connection
    /// lost after sending, unreadable 2xx) from "definitely not created" (4xx, connect failure).
    pub async fn finish_upload(
        &self,
        token: &SecretString,
        handle: &str,
        file_type: FileType,
        organization_id: Option<&str>,
    ) -> Result<String, MapillaryError> {
        let url = Self::url(&self.endpoints.graph, &["finish_upload"])?;
        let mut body = serde_json::json!({"file_handle": handle, "file_type": file_type.as_str()});
        if let Some(org) = organization_id {
            body["organization_id"] = Value::from(org);
        }
        let req = self
            .http
            .post(url)
            .header(AUTHORIZATION, oauth_header(token)?)
            .json(&body)
            .timeout(self.policy.min_request_timeout);
        let v = self.graph_json(req).await?;
        let cluster_id = reply::finish_cluster_id(&v)?;
        info!(cluster_id, file_type = file_type.as_str(), "upload finished");
        Ok(cluster_id)
    }

    // ---------------------------------------------------------------- graph (§6, §7)

    /// One page of `getLatestActivity` for `user_id` (§6.1), newest first.
    pub async fn latest_activity(
        &self,
        token: &SecretString,
        user_id: &str,
        first: u32,
        after: Option<&str>,
        hide_after_days: u32,
    ) -> Result<ActivityPage, MapillaryError> {
        let variables = feed::variables(user_id, first, after, hide_after_days).to_string();
        let mut url = Self::url(&self.endpoints.graph, &["graphql"])?;
        url.query_pairs_mut()
            .append_pair("doc", feed::LATEST_ACTIVITY_DOC)
            .append_pair("variables", &variables);
        if self.graphql_token == TokenTransport::QueryParam {
            url.query_pairs_mut()
                .append_pair("access_token", token.expose_secret());
        }
        let mut req = self.http.get(url).timeout(self.policy.min_request_timeout);
        if self.graphql_token == TokenTransport::Header {
            req = req.header(AUTHORIZATION, oauth_header(token)?);
        }
        let resp = req.send().await.map_err(MapillaryError::from_transport)?;
        let (status, retry_after, body) = read_reply(resp).await?;
        if !(200..300).contains(&status) {
            return Err(classify_graph(
                status,
                retry_after.as_deref(),
                &body,
                SystemTime::now(),
            ));
        }
        let text = String::from_utf8_lossy(&body);
        Ok(feed::parse_page(&text)?)
    }

    /// An image entity with `fields` (`id` is always returned; see [`IMAGE_FIELDS`]).
    pub async fn image(
        &self,
        token: &SecretString,
        image_id: &str,
        fields: &[&str],
    ) -> Result<Image, MapillaryError> {
        let fields = fields.join(",");
        let v = self.graph_get(token, &[image_id], &[("fields", &fields)]).await?;
        Image::from_json(v)
    }

    /// Image ids of a sequence in capture order (`GET {graph}/image_ids?sequence_id=`, §7.2).
    pub async fn image_ids(
        &self,
        token: &SecretString,
        sequence_id: &str,
    ) -> Result<Vec<String>, MapillaryError> {
        let v = self
            .graph_get(token, &["image_ids"], &[("sequence_id", sequence_id)])
            .await?;
        Ok(reply::image_ids(&v)?)
    }

    /// Image entities by id (`GET {graph}/images?image_ids=…&fields=`[`LINK_FIELDS`], one request
    /// per `batch` ids). Ids Mapillary does not return are simply absent.
    pub async fn images(
        &self,
        token: &SecretString,
        ids: &[String],
        batch: usize,
    ) -> Result<Vec<MapillaryImage>, MapillaryError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(batch.max(1)) {
            let ids = chunk.join(",");
            let v = self
                .graph_get(
                    token,
                    &["images"],
                    &[("image_ids", &ids), ("fields", LINK_FIELDS)],
                )
                .await?;
            out.extend(data_images(&v)?);
        }
        Ok(out)
    }

    /// Images in `bbox` captured between `start_ms` and `end_ms` (`GET {graph}/images?bbox=…`, one
    /// request, at most [`SEARCH_LIMIT`] results: Mapillary's search has no pagination).
    pub async fn search_images(
        &self,
        token: &SecretString,
        bbox: &BBox,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Vec<MapillaryImage>, MapillaryError> {
        let bbox = format!("{},{},{},{}", bbox.west, bbox.south, bbox.east, bbox.north);
        let (start, end, limit) = (start_ms.to_string(), end_ms.to_string(), SEARCH_LIMIT.to_string());
        let query = [
            ("bbox", bbox.as_str()),
            ("start_captured_at", &start),
            ("end_captured_at", &end),
            ("fields", LINK_FIELDS),
            ("limit", &limit),
        ];
        let v = self.graph_get(token, &["images"], &query).await?;
        Ok(data_images(&v)?)
    }

    /// Every image of `sequence_ids` (`GET {graph}/images?sequence_id=a,b,…&fields=…&limit=2000`, one
    /// request; §7.4's search filter). No pagination: a reply of [`SEARCH_LIMIT`] images may be
    /// truncated, and the order is not capture order (callers sort and verify).
    pub async fn images_of_sequences(
        &self,
        token: &SecretString,
        sequence_ids: &[String],
    ) -> Result<Vec<MapillaryImage>, MapillaryError> {
        let (ids, limit) = (sequence_ids.join(","), SEARCH_LIMIT.to_string());
        let query = [
            ("sequence_id", ids.as_str()),
            ("fields", LINK_FIELDS),
            ("limit", &limit),
        ];
        let v = self.graph_get(token, &["images"], &query).await?;
        Ok(data_images(&v)?)
    }

    /// One z/x/y coverage tile of `mly1_public` (`GET {tiles}/maps/vtp/mly1_public/2/z/x/y`, token
    /// as `access_token`). A tile that does not exist (403 code 100, or 404) is `None`; 403 code 4
    /// is a rate limit (an error).
    pub async fn coverage_tile(
        &self,
        token: &SecretString,
        tile: TileId,
    ) -> Result<Option<Bytes>, MapillaryError> {
        let (z, x, y) = (tile.z.to_string(), tile.x.to_string(), tile.y.to_string());
        let mut url = Self::url(
            &self.endpoints.tiles,
            &["maps", "vtp", PUBLIC_TILESET, "2", &z, &x, &y],
        )?;
        url.query_pairs_mut()
            .append_pair("access_token", token.expose_secret());
        let resp = self
            .http
            .get(url)
            .timeout(self.policy.min_request_timeout)
            .send()
            .await
            .map_err(MapillaryError::from_transport)?;
        let (status, retry_after, body) = read_reply(resp).await?;
        if (200..300).contains(&status) {
            return Ok((!body.is_empty()).then_some(body));
        }
        if status == 404 {
            return Ok(None);
        }
        match classify_graph(status, retry_after.as_deref(), &body, SystemTime::now()) {
            MapillaryError::Api {
                status: 403,
                code: Some(100) | None,
                ..
            } => Ok(None),
            e => Err(e),
        }
    }

    async fn graph_get(
        &self,
        token: &SecretString,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<Value, MapillaryError> {
        let mut url = Self::url(&self.endpoints.graph, segments)?;
        url.query_pairs_mut().extend_pairs(query);
        let req = self
            .http
            .get(url)
            .header(AUTHORIZATION, oauth_header(token)?)
            .timeout(self.policy.min_request_timeout);
        self.graph_json(req).await
    }

    /// Send a graph request; a non-2xx reply or a 2xx carrying `error` is classified (§8.2).
    async fn graph_json(&self, req: reqwest::RequestBuilder) -> Result<Value, MapillaryError> {
        let resp = req.send().await.map_err(MapillaryError::from_transport)?;
        let (status, retry_after, body) = read_reply(resp).await?;
        if !(200..300).contains(&status) {
            return Err(classify_graph(
                status,
                retry_after.as_deref(),
                &body,
                SystemTime::now(),
            ));
        }
        let v: Value = serde_json::from_slice(&body).map_err(|_| bad_reply(status, "reply is not JSON"))?;
        if v.get("error").is_some_and(Value::is_object) {
            return Err(classify_graph(
                status,
                retry_after.as_deref(),
                &body,
                SystemTime::now(),
            ));
        }
        Ok(v)
    }
}

/// Status, `Retry-After` and body of a reply.
async fn read_reply(resp: reqwest::Response) -> Result<(u16, Option<String>, Bytes), MapillaryError> {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.bytes().await.map_err(MapillaryError::from_transport)?;
    Ok((status, retry_after, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug_output() {
        let grant = TokenGrant {
            access_token: SecretString::from("MLYsecret-token-value"),
            expires_in: Some(10),
            token_type: "bearer".into(),
            refresh_token: Some(SecretString::from("MLYsecret-refresh")),
        };
        let dbg = format!("{grant:?}");
        assert!(
            !dbg.contains("secret-token-value") && !dbg.contains("secret-refresh"),
            "{dbg}"
        );
        let header = oauth_header(&grant.access_token).expect("header");
        assert!(header.is_sensitive());
        assert!(!format!("{header:?}").contains("secret-token-value"));
    }

    #[test]
    fn header_unsafe_tokens_are_rejected_without_echoing_them() {
        let err = oauth_header(&SecretString::from("bad\ntoken")).expect_err("newline");
        assert!(!err.to_string().contains("bad"), "{err}");
    }

    #[test]
    fn image_reply_is_read_tolerantly() {
        let v = serde_json::json!({"id": 148137757289079u64, "sequence": "u8v5JabHqDiGcxVPl7oF3n",
            "captured_at": 1714557600000i64, "geometry": {"type": "Point", "coordinates": [-0.5591, 50.8966]},
            "altitude": "12.5", "unknown": true});
        let img = Image::from_json(v).expect("parses");
        assert_eq!(img.id, "148137757289079");
        assert_eq!(img.sequence.as_deref(), Some("u8v5JabHqDiGcxVPl7oF3n"));
        assert_eq!(img.captured_at_ms, Some(1_714_557_600_000));
        assert_eq!(
            img.geometry,
            Some(GeoPoint {
                lon: -0.5591,
                lat: 50.8966
            })
        );
        assert_eq!(img.altitude, Some(12.5));
        assert_eq!(img.compass_angle, None);
        assert!(Image::from_json(serde_json::json!({"sequence": "x"})).is_err());
    }

    #[test]
    fn entity_to_image_reads_strings_and_numbers() {
        let v = serde_json::json!({"id": 148137757289079u64, "sequence": "u8v5JabHqDiGcxVPl7oF3n",
            "captured_at": 1714557600000i64, "geometry": {"type":"Point","coordinates":["16.37","48.2"]},
            "altitude": 187.25});
        let img = entity_to_image(&v).unwrap();
        assert_eq!(img.id, "148137757289079");
        assert_eq!((img.lon, img.lat), (16.37, 48.2));
        assert_eq!(img.altitude, Some(187.25));
        let err = entity_to_image(&serde_json::json!({"id": "1", "sequence": "s"})).unwrap_err();
        assert!(err.contains("captured_at"), "{err}");
    }

    #[test]
    fn urls_get_segments_encoded_and_authorize_url_has_josm_order() {
        let u = MapillaryClient::url("http://127.0.0.1:9/rupload/", &["a b/c.zip"]).expect("url");
        assert_eq!(u.as_str(), "http://127.0.0.1:9/rupload/a%20b%2Fc.zip");
        let c = MapillaryClient::new(
            Endpoints::under("http://127.0.0.1:9"),
            reqwest::Client::new(),
            RetryPolicy::fast(),
        );
        let a = c
            .authorize_url("123", "http://127.0.0.1:8787/cb", "st", Some("read"))
            .expect("url");
        assert_eq!(
            a,
            "http://127.0.0.1:9/www/connect?client_id=123&response_type=code&scope=read&state=st&redirect_uri=http%3A%2F%2F127.0.0.1%3A8787%2Fcb"
        );
    }
}
